#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""ProvisionDisk as an attacker would call it: the target is created only inside the image
directories, through file descriptors (no symlink anywhere below the directory, nothing
overwritten, nothing left behind on failure); the overlay is a valid qcow2 that QEMU reads
through; a caller gets no overlay on a template it may not read; remote templates only from
the administrator's TemplateURLPrefixes=."""

import os
import pwd
import socket
import stat
import subprocess
import sys
import threading
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
from harness import T, S, MiB  # noqa: E402

SIZE = 32 * MiB
ERR_FILE_EXISTS = 'org.freedesktop.DBus.Error.FileExists'


def free_tcp_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class ProvisionBase(h.TestCase):
    """A daemon whose TemplateURLPrefixes= allows one qemu-nbd socket and one TCP port."""

    needs_daemon = False

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        env = cls.env
        with cls.class_setup():
            cls.nbd_socket = os.path.join(env.dir, 'tpl-nbd.sock')
            cls.nbd_port = free_tcp_port()
            cls.unix_url = 'nbd+unix:///?socket=%s' % cls.nbd_socket
            cls.tcp_url = 'nbd://127.0.0.1:%d' % cls.nbd_port
            cls.named_url = 'nbd://localhost:%d' % cls.nbd_port
            env.daemon = h.Daemon(env, config_extra='TemplateURLPrefixes=%s %s/ %s/\n' % (
                cls.unix_url, cls.tcp_url, cls.named_url))
            env.daemon.start()

    def provision(self, template, target, options=None):
        return self.client.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'ProvisionDisk', 'ssa{sv}', template, target,
                                options if options is not None else h.no_opts(), timeout=60)

    def try_provision(self, expected, template, target, options=None):
        return self.assertDBusError(expected, self.provision, template, target, options)

    def chain(self):
        return h.Chain(os.path.join(self.env.images, self.unique_name('tpl')), SIZE)

    def assertOverlay(self, target, template, fmt, size):
        """A clean qcow2 on template, the size asked for, reading exactly the template's data."""
        rc, out = h.image_check(target)
        self.assertEqual(rc, 0, 'qemu-img check of %s: %s' % (target, out))
        info = h.image_info(target)
        self.assertEqual(info['format'], 'qcow2')
        self.assertEqual(info['virtual-size'], size)
        self.assertEqual(info.get('backing-filename'), template)
        self.assertEqual(info.get('backing-filename-format'), fmt)
        self.assertEqual(info.get('cluster-size'), 64 * 1024)
        self.assertEqual(info['format-specific']['data']['compat'], '1.1')


class ProvisionTargetTest(ProvisionBase):

    def test_symlinked_directory_is_refused(self):
        """Issue 9, item 1: /X/link -> /elsewhere, /elsewhere/sub exists: /X/link/sub/new.qcow2
        must not reach /elsewhere/sub/new.qcow2 (only the last components were lstat()ed)."""
        c = self.chain()
        elsewhere = os.path.join(self.env.dir, self.unique_name('elsewhere'))
        os.makedirs(os.path.join(elsewhere, 'sub'))
        link = os.path.join(self.env.images, self.unique_name('link'))
        os.symlink(elsewhere, link)
        # A symlink deeper down, and one to a directory inside the image directories, too.
        real = os.path.join(self.env.images, self.unique_name('real'))
        os.makedirs(os.path.join(real, 'sub'))
        inner = os.path.join(real, 'inner')
        os.symlink(os.path.join(elsewhere, 'sub'), inner)
        alias = os.path.join(self.env.images, self.unique_name('alias'))
        os.symlink(real, alias)
        for target in (os.path.join(link, 'sub', 'new.qcow2'), os.path.join(link, 'new.qcow2'),
                       os.path.join(inner, 'new.qcow2'), os.path.join(alias, 'sub', 'new.qcow2')):
            with self.subTest(target=target):
                e = self.try_provision(h.ERR_INVALID_ARGS, c.top, target)
                self.assertIn(target, e.message)
                self.assertEqual(h.tree_snapshot(elsewhere), {'sub': 'dir'}, 'a file appeared outside the image '
                                 'directories through %s' % target)
                self.assertEqual(os.listdir(os.path.join(real, 'sub')), [])
        # The same name without the symlink works.
        target = os.path.join(real, 'sub', 'new.qcow2')
        self.assertEqual(self.provision(c.top, target), SIZE)
        self.assertOverlay(target, c.top, 'qcow2', SIZE)

    def test_existing_target_is_left_alone(self):
        c = self.chain()
        d = os.path.dirname(c.top)
        target = os.path.join(d, 'existing.qcow2')
        with open(target, 'wb') as f:
            f.write(b'precious')
        os.chmod(target, 0o640)
        e = self.try_provision(ERR_FILE_EXISTS, c.top, target)
        self.assertIn(target, e.message)
        with open(target, 'rb') as f:
            self.assertEqual(f.read(), b'precious')
        st = os.stat(target)
        self.assertEqual((st.st_uid, stat.S_IMODE(st.st_mode)), (0, 0o640))
        # One of the template's own images.
        self.try_provision(ERR_FILE_EXISTS, c.top, c.base)
        self.assertEqual(h.image_backing(c.base), None)

    def test_symlink_target_is_refused(self):
        """A target that is a symlink, dangling or not, is neither followed nor replaced."""
        c = self.chain()
        d = os.path.dirname(c.top)
        outside = os.path.join(self.env.dir, self.unique_name('outside'))
        os.makedirs(outside)
        victim = os.path.join(outside, 'victim')
        with open(victim, 'wb') as f:
            f.write(b'victim')
        for name, dest in (('dangling.qcow2', os.path.join(outside, 'new.qcow2')), ('victim.qcow2', victim),
                           ('inside.qcow2', os.path.join(d, 'nothing-yet.qcow2'))):
            target = os.path.join(d, name)
            os.symlink(dest, target)
            with self.subTest(target=name):
                self.try_provision({ERR_FILE_EXISTS, h.ERR_INVALID_ARGS}, c.top, target)
                self.assertTrue(os.path.islink(target))
                self.assertEqual(os.readlink(target), dest)
                self.assertFalse(os.path.exists(os.path.join(outside, 'new.qcow2')))
                self.assertFalse(os.path.exists(os.path.join(d, 'nothing-yet.qcow2')))
                with open(victim, 'rb') as f:
                    self.assertEqual(f.read(), b'victim')

    def test_outside_and_missing_directories(self):
        c = self.chain()
        for target in ('/tmp/x.qcow2', self.env.images, os.path.join(self.env.images, 'no', 'such', 'x.qcow2'),
                       os.path.join(self.env.images, '..', 'x.qcow2'), os.path.join(c.top, 'x.qcow2')):
            with self.subTest(target=target):
                self.try_provision(h.ERR_INVALID_ARGS, c.top, target)
        self.assertFalse(os.path.exists('/tmp/x.qcow2'))
        self.assertFalse(os.path.exists(os.path.join(self.env.dir, 'x.qcow2')))

    def test_failed_provision_leaves_nothing(self):
        c = self.chain()
        d = os.path.dirname(c.top)
        corrupt = os.path.join(d, 'corrupt.qcow2')
        with open(corrupt, 'wb') as f:
            f.write(b'QFI\xfb' + b'\xff' * 4096)
        empty = os.path.join(d, 'empty.raw')
        open(empty, 'wb').close()
        cases = [
            ('corrupt template', corrupt, {}),
            # Went to the URL's probe before, which failed blaming "the server".
            ('empty template', empty, {'template_format': S('raw')}),
            ('missing template', os.path.join(d, 'missing.qcow2'), {}),
            ('template outside the image directories', '/usr/bin/qemu-img', {}),
            ('raw template named as qcow2', c.ref, {}),
            # Created, then refused while writing: more than QEMU opens (2 PiB with 64 KiB clusters).
            ('virtual size too large', c.top, {'size': T(1 << 60)}),
        ]
        for what, template, o in cases:
            target = os.path.join(d, 'failed-%s.qcow2' % what.replace(' ', '-'))
            with self.subTest(what=what):
                self.try_provision(h.ERR_INVALID_ARGS, template, target, h.opts(**o) if o else None)
                self.assertFalse(os.path.lexists(target), '%s left %s behind' % (what, target))
        self.assertEqual(sorted(os.listdir(d)), sorted(['base.qcow2', 'mid.qcow2', 'top.qcow2', 'ref.raw',
                                                        'corrupt.qcow2', 'empty.raw']))

    def test_overlay_is_valid_and_read_by_qemu(self):
        """The header writer's overlay: what qemu-img create -u would make, read through by a real QEMU."""
        c = self.chain()
        d = os.path.dirname(c.top)
        target = os.path.join(d, 'vm.qcow2')
        self.assertEqual(self.provision(c.top, target), SIZE)
        self.assertOverlay(target, c.top, 'qcow2', SIZE)
        st = os.stat(target)
        self.assertEqual((st.st_uid, stat.S_IMODE(st.st_mode)), (0, 0o600))
        rc, out = h.image_compare(target, c.ref)
        self.assertEqual(rc, 0, out)
        # A larger overlay (option size), and a raw template.
        big = os.path.join(d, 'big.qcow2')
        self.assertEqual(self.provision(c.top, big, h.opts(size=T(3 << 40))), 3 << 40)
        self.assertOverlay(big, c.top, 'qcow2', 3 << 40)
        raw = os.path.join(d, 'on-raw.qcow2')
        self.assertEqual(self.provision(c.ref, raw, h.opts(template_format=h.S('raw'))), SIZE)
        self.assertOverlay(raw, c.ref, 'raw', SIZE)
        rc, out = h.image_compare(raw, c.ref)
        self.assertEqual(rc, 0, out)
        # A real QEMU boots on it: reads go to the template, writes to the overlay.
        q = self.env.new_qemu(self.unique_name('q'), [('vda', target)])
        self.addCleanup(q.kill)
        self.assertTrue(q.guest_read('vda', 0x11, 0, c.u), "QEMU does not read the template's data")
        self.assertTrue(q.guest_read('vda', 0x33, 128 * c.u, c.u))
        q.guest_write('vda', 0x77, 0, c.u)
        self.assertTrue(q.guest_read('vda', 0x77, 0, c.u))
        q.quit()
        rc, out = h.image_check(target)
        self.assertEqual(rc, 0, out)
        self.assertTrue(h.read_matches(c.top, 0x11, 0, c.u), 'the template was written to')


class ProvisionRemoteTest(ProvisionBase):

    def serve(self, image, *where):
        """qemu-nbd serving image (raw, read-only), until the end of the test."""
        p = h.spawn(['qemu-nbd', '--read-only', '--persistent', '--shared=4', '-f', 'raw'] + list(where) + [image],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def stop():
            p.kill()
            p.wait(10)
        self.addCleanup(stop)
        return p

    def wait_connectable(self, family, addr):
        def ok():
            with socket.socket(family) as s:
                try:
                    s.connect(addr)
                    return True
                except OSError:
                    return False
        h.wait_until(ok, 20, 'qemu-nbd to listen on %s' % (addr,))

    def test_remote_template_not_allowed(self):
        """Issue 9, item 10: without a matching TemplateURLPrefixes= nothing is probed or made."""
        d = os.path.join(self.env.images, self.unique_name('remote'))
        os.makedirs(d)
        other_socket = os.path.join(self.env.dir, 'other.sock')
        for url in ('nbd+unix:///?socket=%s' % other_socket,
                    'nbd+unix:///?socket=%s/../x' % self.nbd_socket,
                    'nbd://127.0.0.1:%d/x' % (self.nbd_port + 1 if self.nbd_port < 65535 else 1),
                    'nbd://127.0.0.1:%d0/x' % self.nbd_port,
                    'nbd://127.0.0.1:%d@10.0.0.1/x' % self.nbd_port,
                    'http://127.0.0.1:1/template.qcow2',
                    'https://example.invalid/template.qcow2'):
            target = os.path.join(d, 'x.qcow2')
            with self.subTest(url=url):
                e = self.try_provision(h.ERR_ACCESS_DENIED, url, target, h.opts(size=T(SIZE)))
                self.assertIn('TemplateURLPrefixes=', e.message)
                self.assertFalse(os.path.lexists(target))
                e = self.try_provision(h.ERR_ACCESS_DENIED, url, target)
                self.assertIn('TemplateURLPrefixes=', e.message)
                self.assertFalse(os.path.lexists(target))

    def test_remote_template_allowed(self):
        c = self.chain()
        d = os.path.dirname(c.top)
        # A local NBD socket (no probe: the size is given).
        self.serve(c.ref, '-k', self.nbd_socket)
        self.wait_connectable(socket.AF_UNIX, self.nbd_socket)
        target = os.path.join(d, 'on-unix.qcow2')
        self.assertEqual(self.provision(self.unix_url, target, h.opts(size=T(SIZE))), SIZE)
        self.assertOverlay(target, self.unix_url, 'raw', SIZE)
        rc, out = h.image_compare(target, c.ref)
        self.assertEqual(rc, 0, out)
        # TCP: the size probed by the sandboxed qemu-img info.
        self.serve(c.ref, '-b', '127.0.0.1', '-p', str(self.nbd_port))
        self.wait_connectable(socket.AF_INET, ('127.0.0.1', self.nbd_port))
        target = os.path.join(d, 'on-tcp.qcow2')
        url = self.tcp_url + '/'
        self.assertEqual(self.provision(url, target), SIZE)
        self.assertOverlay(target, url, 'raw', SIZE)
        rc, out = h.image_compare(target, c.ref)
        self.assertEqual(rc, 0, out)


    def test_remote_template_named_by_host_name(self):
        """The probe resolves a server's name as the host does (/etc/hosts, nsswitch.conf and
        resolv.conf in its view; it had none: 'localhost' did not resolve)."""
        c = self.chain()
        self.serve(c.ref, '-b', '127.0.0.1', '-p', str(self.nbd_port))
        self.wait_connectable(socket.AF_INET, ('127.0.0.1', self.nbd_port))
        target = os.path.join(os.path.dirname(c.top), 'on-localhost.qcow2')
        url = self.named_url + '/'
        self.assertEqual(self.provision(url, target), SIZE)
        self.assertOverlay(target, url, 'raw', SIZE)

class GatedRelay:
    """A TCP listener that holds every connection until released, then relays it to a unix
    socket: probes that wait on a server for as long as a test needs."""

    def __init__(self, port, upstream):
        self.upstream = upstream
        self.released = threading.Event()
        self.accepted = 0
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(('127.0.0.1', port))
        self.listener.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._relay, args=(conn,), daemon=True).start()

    def _relay(self, conn):
        self.released.wait()
        with conn, socket.socket(socket.AF_UNIX) as up:
            try:
                up.connect(self.upstream)
            except OSError:
                return
            self._pump_both(conn, up)

    def _pump_both(self, conn, up):

        def pump(a, b):
            try:
                while True:
                    data = a.recv(65536)
                    if not data:
                        break
                    b.sendall(data)
            except OSError:
                pass
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        back = threading.Thread(target=pump, args=(up, conn), daemon=True)
        back.start()
        pump(conn, up)
        back.join()

    def close(self):
        self.released.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone would not)
        except OSError:
            pass
        self.listener.close()


def children_named(ppid, comm):
    """Pids of ppid's children whose command is comm."""
    out = []
    for pid in os.listdir('/proc'):
        if not pid.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % pid) as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index('(') + 1:stat.rindex(')')]
        fields = stat[stat.rindex(')') + 2:].split()
        if name == comm and int(fields[1]) == ppid:
            out.append(int(pid))
    return sorted(out)


class HeldProbes:
    """Remote templates whose server holds every probe until the test lets it answer."""

    def held_server(self, name):
        """A template (raw, SIZE) served by qemu-nbd behind a GatedRelay on the allowed TCP port:
        (its URL, the directory for targets, the relay)."""
        c = self.chain()
        upstream = os.path.join(self.env.dir, name + '.sock')
        qemu_nbd = h.spawn(['qemu-nbd', '--read-only', '--persistent', '--shared=16', '-f', 'raw', '-k', upstream,
                            c.ref], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(lambda: (qemu_nbd.kill(), qemu_nbd.wait(10)))
        relay = GatedRelay(self.nbd_port, upstream)
        self.addCleanup(relay.close)
        h.wait_until(lambda: os.path.exists(upstream), 20, 'qemu-nbd to listen')
        return self.tcp_url + '/', os.path.dirname(c.top), relay

    def provisions_in_background(self, url, targets):
        """ProvisionDisk(url, target) for each target, all at once (busctl): [(process, target)]."""
        calls = []
        for target in targets:
            p = h.spawn(['busctl', '--address=' + self.env.bus.address, '--timeout=120', 'call', h.BUS_NAME,
                         h.MANAGER_PATH, h.IFACE_MANAGER, 'ProvisionDisk', 'ssa{sv}', url, target, '0'],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            self.addCleanup(lambda p=p: p.poll() is None and (p.kill(), p.wait(10)))
            calls.append((p, target))
        return calls

    def assertProvisioned(self, calls, url):
        for p, target in calls:
            out, err = p.communicate(timeout=120)
            self.assertEqual(p.returncode, 0, err)
            self.assertEqual(out.split(), ['t', str(SIZE)])
            self.assertOverlay(target, url, 'raw', SIZE)

class ProvisionProbeTest(HeldProbes, ProvisionBase):
    """The size probes of remote templates: each runs as a uid of its own (the top ones of
    HelperUIDRange=) and alone in a PID namespace of its own. A probe taken over by a hostile
    server must neither see nor signal another caller's probe, nor share its process limit
    (RLIMIT_NPROC counts per uid), and leaves nothing behind."""

    def test_probes_see_no_other_process_and_leave_nothing(self):
        url, d, relay = self.held_server('probe-upstream')
        calls = self.provisions_in_background(url, [os.path.join(d, 'probed-%d.qcow2' % i) for i in range(2)])
        daemon = self.env.daemon.proc.pid
        h.wait_until(lambda: len(children_named(daemon, 'qemu-img')) == 2 and relay.accepted == 2, 30,
                     'two probes connected to the server')
        probes = children_named(daemon, 'qemu-img')
        uids = [os.stat('/proc/%d' % pid).st_uid for pid in probes]
        top = self.env.daemon.helper_uids()[1]
        self.assertEqual(len(set(uids)), 2, 'two probes share a uid: %r' % uids)
        for uid in uids:
            self.assertIn(uid, range(top + 1 - h.PROBE_UIDS, top + 1), "a probe's uid is not one of the range's top")

        for pid in probes:
            # What the probe's own /proc shows (read as root: nothing hidden): itself only, as pid 1.
            seen = sorted(e for e in os.listdir('/proc/%d/root/proc' % pid) if e.isdigit())
            self.assertEqual(seen, ['1'], 'probe %d sees other processes: %s' % (pid, seen[:20]))

        # A process the first probe left behind (in its PID namespace, its uid) dies with it.
        uid = uids[0]
        leftover = h.spawn(['nsenter', '--target', str(probes[0]), '--pid', '--', 'setpriv', '--reuid=%d' % uid,
                            '--regid=%d' % uid, '--clear-groups', 'sleep', '600'],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(lambda: leftover.poll() is None and (leftover.kill(), leftover.wait(10)))
        h.wait_until(lambda: any(children_named(leftover.pid, n) for n in ('sleep', 'setpriv')), 20,
                     'the leftover to start')

        relay.released.set()
        self.assertProvisioned(calls, url)
        h.wait_until(lambda: leftover.poll() is not None, 20, 'the probe\'s leftover to die with it')
        # And the daemon's next children are born in its own PID namespace again.
        self.assertEqual(os.readlink('/proc/%d/task/%d/ns/pid_for_children' % (daemon, daemon)),
                         os.readlink('/proc/%d/ns/pid' % daemon))

    def test_at_most_eight_probes_at_once(self):
        """Each probe is a qemu-img in the daemon's cgroup: eight at once, each its own uid, the ninth
        is Busy (nothing made) and says what to do; once they are done a new one runs."""
        url, d, relay = self.held_server('probe-upstream8')
        calls = self.provisions_in_background(url, [os.path.join(d, 'eight-%d.qcow2' % i) for i in range(8)])
        h.wait_until(lambda: relay.accepted == 8, 60, 'eight probes connected to the server')
        probes = children_named(self.env.daemon.proc.pid, 'qemu-img')
        self.assertEqual(len(set(os.stat('/proc/%d' % pid).st_uid for pid in probes)), 8,
                         'the eight probes do not have a uid each')
        ninth = os.path.join(d, 'ninth.qcow2')
        e = self.try_provision(h.ERR_BUSY, url, ninth)
        self.assertIn('at most 8 at once', e.message)
        self.assertIn("option 'size'", e.message)
        self.assertFalse(os.path.lexists(ninth))
        relay.released.set()
        self.assertProvisioned(calls, url)
        self.assertEqual(self.provision(url, ninth), SIZE)

    def test_no_probe_as_an_accounts_uid(self):
        """The probes' uids are the top of HelperUIDRange=; one that a group (or user) has after all is
        not the daemon's: no probe runs as it, the call says why, nothing is made."""
        url, d, relay = self.held_server('probe-upstream-acct')
        relay.released.set()
        top = self.env.daemon.helper_uids()[1]
        name = 'bsprobe%d' % os.getpid()
        h.run(['groupadd', '-g', str(top), name])
        self.addCleanup(h.run, ['groupdel', name])
        target = os.path.join(d, 'as-account.qcow2')
        e = self.try_provision(h.ERR_HELPER_FAILED, url, target)
        self.assertIn("an account's", e.message)
        self.assertIn("option 'size'", e.message)
        self.assertFalse(os.path.lexists(target))
        self.assertEqual(relay.accepted, 0)

    @unittest.skipUnless(os.environ.get('BLOCKSTREAM_TEST_HOOKS') == '1',
                         'the daemon is built without its test hooks (meson -Dtest_hooks=true)')
    def test_probe_of_a_silent_server_ends(self):
        """A server that takes the connection and never answers: the probe is killed at its deadline
        (60 s; 2 s by the test hook), the call fails saying so, nothing is made, nothing is left."""
        self.env.restart_daemon_with('BLOCKSTREAM_TEST_PROBE_TIMEOUT_SEC', '2')
        self.addCleanup(lambda: (self.env.stop_daemon(), self.env.start_daemon()))
        relay = GatedRelay(self.nbd_port, os.path.join(self.env.dir, 'nobody-there.sock'))
        self.addCleanup(relay.close)
        target = os.path.join(os.path.dirname(self.chain().top), 'silent.qcow2')
        e = self.try_provision(h.ERR_QEMU_FAILED, self.tcp_url + '/', target)
        self.assertIn('did not tell the template\'s size within 2 s', e.message)
        self.assertIn("option 'size'", e.message)
        self.assertEqual(relay.accepted, 1)
        self.assertFalse(os.path.lexists(target))
        self.assertEqual(children_named(self.env.daemon.proc.pid, 'qemu-img'), [])

OWNER_MAY_MANAGE = '''// blockstreamd tests only (test_provision.py)
polkit.addRule(function(action, subject) {
    if (action.id == "org.blockstream1.manage" && (subject.user == "%s" || subject.user == "%s"))
        return polkit.Result.YES;
    return polkit.Result.NOT_HANDLED;
});
''' % (h.OWNER, h.MEMBER)


class ProvisionProbeShareTest(HeldProbes, ProvisionBase):
    """A caller other than root has 2 of the 8 probes at once (review 32c: one caller's calls at a
    server that never answers kept everyone else's URL provisioning Busy)."""

    needs_polkit = True
    polkit_rules = {'10-bstest-provision.rules': OWNER_MAY_MANAGE}

    def test_one_caller_has_a_share_of_the_probes(self):
        url, _, relay = self.held_server('probe-share')
        mine = os.path.join(self.env.images, self.unique_name('share'))
        os.makedirs(mine)
        os.chown(mine, h.ensure_test_users()[h.OWNER], -1)

        def as_owner(target):
            p = h.spawn(h.setpriv_argv(h.OWNER) + [
                'busctl', '--address=' + self.env.bus.address, '--timeout=120', 'call', h.BUS_NAME, h.MANAGER_PATH,
                h.IFACE_MANAGER, 'ProvisionDisk', 'ssa{sv}', url, target, '0'],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            self.addCleanup(lambda: p.poll() is None and (p.kill(), p.wait(10)))
            return p
        calls = [as_owner(os.path.join(mine, 'p%d.qcow2' % i)) for i in range(2)]
        h.wait_until(lambda: relay.accepted == 2, 60, "the owner's two probes to connect to the server")
        third = os.path.join(mine, 'p2.qcow2')
        out, err = as_owner(third).communicate(timeout=60)
        self.assertIn('at most 2 at once per user', err, out)
        self.assertIn("option 'size'", err)
        self.assertFalse(os.path.lexists(third))
        # Another caller still gets one.
        others = self.provisions_in_background(url, [os.path.join(self.env.images, self.unique_name('root'))])
        h.wait_until(lambda: relay.accepted == 3, 60, "root's probe to connect to the server")
        relay.released.set()
        for p in calls:
            out, err = p.communicate(timeout=120)
            self.assertEqual(p.returncode, 0, err)
        self.assertProvisioned(others, url)


class SharedRangeProbeTest(HeldProbes, ProvisionBase):
    """A second daemon given the same HelperUIDRange= (a mistake the man page warns about): its probe
    would run as the uid of this daemon's live probe, sharing its process limit. It refuses, saying
    why, and leaves this daemon's probe alone."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        with cls.class_setup():
            cls.other = cls.start_second_daemon('HelperUIDRange=%d-%d\nTemplateURLPrefixes=%s/\n' % (
                cls.env.daemon.helper_uids() + (cls.tcp_url,)))

    def test_other_daemons_probe_left_alone(self):
        url, d, relay = self.held_server('probe-upstream-shared')
        calls = self.provisions_in_background(url, [os.path.join(d, 'first.qcow2')])
        daemon = self.env.daemon.proc.pid
        h.wait_until(lambda: len(children_named(daemon, 'qemu-img')) == 1 and relay.accepted == 1, 30,
                     "this daemon's probe connected to the server")
        probe = children_named(daemon, 'qemu-img')[0]
        target = os.path.join(self.other.images, 'second.qcow2')
        e = self.assertDBusError(h.ERR_HELPER_FAILED, self.other.client.call, h.MANAGER_PATH, h.IFACE_MANAGER,
                                 'ProvisionDisk', 'ssa{sv}', url, target, h.no_opts(), timeout=60)
        self.assertIn('another blockstreamd', e.message)
        self.assertFalse(os.path.lexists(target))
        self.assertEqual(relay.accepted, 1, "the other daemon's probe reached the server")
        self.assertTrue(os.path.exists('/proc/%d' % probe), "the other daemon killed this daemon's probe")
        relay.released.set()
        self.assertProvisioned(calls, url)


class ProvisionCallerTest(h.TestCase):
    """An unprivileged caller whom polkit lets manage."""

    needs_polkit = True
    polkit_rules = {'10-bstest-provision.rules': OWNER_MAY_MANAGE}

    @classmethod
    def setUpClass(cls):
        cls.uids = h.ensure_test_users()
        super().setUpClass()

    def provision_as(self, user, template, target, options='{}'):
        return h.call_as(user, self.env.bus.address, h.MANAGER_PATH, h.IFACE_MANAGER, 'ProvisionDisk', 'ssa{sv}',
                         '(%r, %r, %s)' % (template, target, options))

    def test_unreadable_template_is_refused(self):
        """Issue 9, item 10: root must not read a template for a caller who may not read it."""
        c = h.Chain(os.path.join(self.env.images, self.unique_name('tpl')), SIZE)
        d = os.path.dirname(c.top)
        os.chmod(d, 0o1777)  # anyone may create files here, as in /tmp
        for img in (c.base, c.mid, c.top):
            os.chmod(img, 0o644)
        for secret in (c.top, c.base):
            os.chmod(secret, 0o600)
            target = os.path.join(d, 'secret-%s.qcow2' % os.path.basename(secret))
            with self.subTest(unreadable=secret):
                r = self.provision_as(h.OWNER, c.top, target)
                self.assertEqual(r['uid'], self.uids[h.OWNER])
                self.assertFalse(r['ok'], r)
                self.assertEqual(r['error'], h.ERR_ACCESS_DENIED, r)
                self.assertIn(secret, r['message'])
                self.assertFalse(os.path.lexists(target))
            os.chmod(secret, 0o644)
        # Readable: the overlay is made, and it is the caller's, 0600.
        target = os.path.join(d, 'mine.qcow2')
        r = self.provision_as(h.OWNER, c.top, target)
        self.assertTrue(r['ok'], r)
        st = os.lstat(target)
        self.assertTrue(stat.S_ISREG(st.st_mode))
        self.assertEqual((st.st_uid, stat.S_IMODE(st.st_mode)), (self.uids[h.OWNER], 0o600))
        rc, out = h.image_check(target)
        self.assertEqual(rc, 0, out)
        # A template the caller reaches only through a directory it may not search.
        hidden = os.path.join(self.env.images, self.unique_name('hidden'))
        os.makedirs(hidden)
        h.qemu_img('create', '-q', '-f', 'qcow2', os.path.join(hidden, 'tpl.qcow2'), str(SIZE))
        os.chmod(os.path.join(hidden, 'tpl.qcow2'), 0o644)
        os.chmod(hidden, 0o700)
        target = os.path.join(d, 'hidden.qcow2')
        r = self.provision_as(h.OWNER, os.path.join(hidden, 'tpl.qcow2'), target)
        self.assertEqual(r.get('error'), h.ERR_ACCESS_DENIED, r)
        self.assertFalse(os.path.lexists(target))

    def test_template_readable_through_a_group(self):
        """The caller's groups count: a template of group blockstream, mode 0640, is readable by
        bstest-member (in that group) and not by bstest-owner."""
        c = h.Chain(os.path.join(self.env.images, self.unique_name('tpl')), SIZE)
        d = os.path.dirname(c.top)
        os.chmod(d, 0o1777)
        gid = h.grp.getgrnam(h.BLOCKSTREAM_GROUP).gr_gid
        for img in (c.base, c.mid, c.top):
            os.chown(img, 0, gid)
            os.chmod(img, 0o640)
        target = os.path.join(d, 'owner.qcow2')
        r = self.provision_as(h.OWNER, c.top, target)
        self.assertEqual(r.get('error'), h.ERR_ACCESS_DENIED, r)
        self.assertFalse(os.path.lexists(target))
        target = os.path.join(d, 'member.qcow2')
        r = self.provision_as(h.MEMBER, c.top, target)
        self.assertTrue(r['ok'], r)
        st = os.lstat(target)
        self.assertEqual((st.st_uid, stat.S_IMODE(st.st_mode)), (self.uids[h.MEMBER], 0o600))

    def test_target_only_where_the_caller_may_create_it(self):
        """The overlay is created as the caller: where it may create a file itself, owned by it and its
        group. Root created it anywhere beneath an image directory and handed it over, so a caller
        could put a file of its own in a directory of templates (a name an administrator would later
        copy a template onto, the file staying the caller's) or in another user's directory."""
        c = h.Chain(os.path.join(self.env.images, self.unique_name('tpl')), SIZE)
        for img in (c.base, c.mid, c.top):
            os.chmod(img, 0o644)
        d = os.path.dirname(c.top)
        os.chmod(d, 0o755)  # root's, as a directory of templates is
        mine = os.path.join(self.env.images, self.unique_name('mine'))
        os.makedirs(mine)
        theirs = os.path.join(self.env.images, self.unique_name('theirs'))
        os.makedirs(theirs, mode=0o700)
        os.chown(mine, self.uids[h.OWNER], -1)
        os.chown(theirs, self.uids[h.MEMBER], -1)
        # A directory anyone may write, inside one the caller may not search.
        drop = os.path.join(theirs, 'drop')
        os.makedirs(drop)
        os.chmod(drop, 0o1777)
        for target in (os.path.join(d, 'debian-13.qcow2'), os.path.join(theirs, 'squat.qcow2'),
                       os.path.join(drop, 'inside.qcow2')):
            with self.subTest(target=target):
                r = self.provision_as(h.OWNER, c.top, target)
                self.assertFalse(r['ok'], 'bstest-owner made %s: %r' % (target, r))
                self.assertEqual(r['error'], h.ERR_ACCESS_DENIED, r)
                self.assertFalse(os.path.lexists(target))
        # In its own directory: made, its own, with its group.
        target = os.path.join(mine, 'vm.qcow2')
        r = self.provision_as(h.OWNER, c.top, target)
        self.assertTrue(r['ok'], r)
        st = os.lstat(target)
        owner = pwd.getpwuid(self.uids[h.OWNER])
        self.assertEqual((st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)), (owner.pw_uid, owner.pw_gid, 0o600))
        # Created, then refused while writing (more than QEMU opens): removed, as the caller.
        target = os.path.join(mine, 'too-large.qcow2')
        r = self.provision_as(h.OWNER, c.top, target, "{'size': dbus.UInt64(1 << 60, variant_level=1)}")
        self.assertEqual(r.get('error'), h.ERR_INVALID_ARGS, r)
        self.assertFalse(os.path.lexists(target))

    def test_a_caller_cannot_stall_the_read_check(self):
        """Whether the caller may read the template was checked in a child with the caller's uid, which
        the caller may signal: stopped, it left the call unanswered for good, the daemon holding the
        chain's fds and a child for each such call. A caller that stops everything of its own that
        the daemon starts (tests/helpers/stopper) still provisions, and finds nothing to stop."""
        c = h.Chain(os.path.join(self.env.images, self.unique_name('tpl')), SIZE)
        d = os.path.dirname(c.top)
        os.chmod(d, 0o1777)
        for img in (c.base, c.mid, c.top):
            os.chmod(img, 0o644)
        stopper = h.spawn(h.setpriv_argv(h.OWNER) + [STOPPER, str(self.env.daemon.proc.pid)],
                          stdout=subprocess.PIPE, text=True)
        self.addCleanup(stopper.kill)
        self.assertEqual(stopper.stdout.readline().strip(), 'ready')
        for i in range(5):
            target = os.path.join(d, 'stopper-%d.qcow2' % i)
            r = self.provision_as(h.OWNER, c.top, target)
            self.assertTrue(r['ok'], r)
            self.assertEqual(os.lstat(target).st_uid, self.uids[h.OWNER])
        stopper.terminate()
        out, _ = stopper.communicate(timeout=10)
        self.assertEqual(out.splitlines()[-1:], ['stopped 0'], 'the daemon ran processes of the caller: %r' % out)


STOPPER = os.environ.get('STOPPER') or os.path.join(h.SOURCE_ROOT, 'build', 'tests', 'helpers', 'stopper')


if __name__ == '__main__':
    h.main()
