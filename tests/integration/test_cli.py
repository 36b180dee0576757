#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""blockstreamctl against the real daemon: every verb, --json output, exit codes (0 ok,
1 failure, 2 usage), sizes with suffixes; effects checked through D-Bus and on the images."""

import errno
import fcntl
import json
import os
import re
import select
import subprocess
import sys
import termios
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
from harness import MiB  # noqa: E402

SIZE = 64 * MiB


def json_values(obj):
    """Every scalar anywhere in a JSON document."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from json_values(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from json_values(v)
    else:
        yield obj


def dicts_with(obj, key, value):
    """Every JSON object anywhere in the document that has key == value."""
    out = []
    if isinstance(obj, dict):
        if obj.get(key) == value:
            out.append(obj)
        for v in obj.values():
            out += dicts_with(v, key, value)
    elif isinstance(obj, list):
        for v in obj:
            out += dicts_with(v, key, value)
    return out


class CliTest(h.TestCase):
    needs_cli = True

    def ctl(self, *args, user=None, timeout=120):
        env = {'DBUS_SYSTEM_BUS_ADDRESS': self.env.bus.address}
        if user is not None:
            return h.run_as(user, [h.BLOCKSTREAMCTL] + list(args), env=env, timeout=timeout)
        return h.run([h.BLOCKSTREAMCTL] + list(args), check=False, timeout=timeout,
                     env=dict(os.environ, **env))

    def ok(self, *args, **kw):
        r = self.ctl(*args, **kw)
        self.assertEqual(r.returncode, 0, 'blockstreamctl %s: exit %d\nstdout: %s\nstderr: %s'
                         % (' '.join(args), r.returncode, r.stdout, r.stderr))
        return r

    def json_of(self, *args):
        r = self.ok('--json', *args)
        try:
            return json.loads(r.stdout)
        except ValueError as e:
            self.fail('blockstreamctl --json %s printed no valid JSON (%s): %r' % (' '.join(args), e, r.stdout))

    def fails(self, code, *args, mention=None, **kw):
        r = self.ctl(*args, **kw)
        self.assertEqual(r.returncode, code, 'blockstreamctl %s: expected exit %d, got %d\nstdout: %s\nstderr: %s'
                         % (' '.join(args), code, r.returncode, r.stdout, r.stderr))
        self.assertTrue(r.stderr.strip(), 'blockstreamctl %s failed without a message' % ' '.join(args))
        if mention:
            self.assertIn(mention, r.stderr, 'the message does not mention %r' % mention)
        return r

    # -- usage

    def test_help_and_usage_errors(self):
        r = self.ok('--help')
        for verb in ('list', 'status', 'register', 'unregister', 'pull', 'pause', 'resume', 'cancel',
                     'set-bandwidth'):
            self.assertIn(verb, r.stdout, '--help does not mention %s' % verb)
        self.fails(2, 'frobnicate')
        self.fails(2, '--no-such-option', 'list')
        self.fails(2, 'pull')                      # missing GUEST DISK
        self.fails(2, 'status', 'a', 'b', 'c')     # too many
        self.fails(2, 'set-bandwidth', 'g', 'vda')
        self.fails(2, 'set-bandwidth', 'g', 'vda', '4X')
        self.fails(2, 'set-bandwidth', 'g', 'vda', '-1')
        self.fails(2, 'set-bandwidth', 'g', 'vda', '99999999999999999999999')
        self.fails(2, 'pull', 'g', 'vda', '--bandwidth=fast')
        self.fails(2, 'pull', 'g', 'vda', '--bandwidth=4Q/s')
        r = self.ok('--version')
        self.assertIn(self.client.get(h.MANAGER_PATH, h.IFACE_MANAGER, 'Version'), r.stdout)

    # -- register / list / status / unregister

    def test_register_list_status_unregister(self):
        c = self.client
        name = self.unique_name()
        chains = self.make_chains(('vda', 'vdb'), SIZE)
        q = self.start_qemu(chains, name=name)
        self.addCleanup(self.unregister_quietly, name)
        r = self.ok('register', name, q.daemon_socket)
        self.assertIn(h.guest_path(name), r.stdout, 'register does not print the object path')
        self.assertEqual(c.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'GetGuest', 's', name), h.guest_path(name))
        self.assertIs(c.get(h.guest_path(name), h.IFACE_GUEST, 'Running'), True)
        self.assertEqual(c.get(h.guest_path(name), h.IFACE_GUEST, 'Owner'), 0)

        r = self.ok('list')
        self.assertIn(name, r.stdout)
        j = self.json_of('list')
        self.assertTrue(dicts_with(j, 'Name', name), '%s not in list --json: %r' % (name, j))

        r = self.ok('status', name)
        self.assertIn('vda', r.stdout)
        self.assertIn('vdb', r.stdout)
        j = self.json_of('status', name)
        vals = list(json_values(j))
        self.assertIn('vda', vals)
        self.assertIn('vdb', vals)
        j = self.json_of('status', name, 'vda')
        vals = list(json_values(j))
        self.assertNotIn(chains['vdb'].top, vals)
        disk = dicts_with(j, 'Path', chains['vda'].top)
        self.assertEqual(len(disk), 1, 'no object with "Path" in %r' % j)
        self.assertEqual(disk[0].get('Device'), 'vda')
        self.assertEqual(disk[0].get('State'), 'idle')
        self.assertEqual(disk[0].get('BackingChain'), chains['vda'].backing_files)
        self.assertEqual(disk[0].get('Size'), SIZE)
        # A disk by its image path.
        j2 = self.json_of('status', name, chains['vda'].top)
        self.assertEqual(j2, j)

        self.fails(1, 'register', name, q.daemon_socket, mention=name)      # exists
        self.fails(1, 'status', 'no-such-guest', mention='no-such-guest')
        self.fails(1, 'status', name, 'vdz', mention='vdz')
        self.fails(2, 'register', 'a/b', q.daemon_socket)             # a bad name is a bad argument
        self.fails(1, 'unregister', 'no-such-guest', mention='no-such-guest')

        self.ok('unregister', name)
        self.assertDBusError(h.ERR_NO_SUCH_GUEST, c.call, h.MANAGER_PATH, h.IFACE_MANAGER, 'GetGuest', 's', name)
        self.assertNotIn(name, self.ok('list').stdout)

    def test_status_escapes_names_from_qemu(self):
        """Paths come from QEMU, which a guest may own: status prints their control characters
        escaped, so a file name neither moves nor recolours the admin's terminal, nor forges a
        line (--json escapes them as JSON does)."""
        name = self.unique_name()
        chains = self.make_chains(('vda',), SIZE, subdir=self.unique_name('esc') + '\x1b]0;owned\x07\n\x1b[31mred')
        q = self.start_qemu(chains, name=name)
        self.addCleanup(self.unregister_quietly, name)
        self.ok('register', name, q.daemon_socket)
        top = chains['vda'].top
        self.assertIn('\x1b', self.client.get(h.disk_path(name, 'vda'), h.IFACE_STREAM, 'Path'))
        r = self.ok('status', name)
        for c in ('\x1b', '\x07'):
            self.assertNotIn(c, r.stdout, 'a control character from a file name reached the terminal')
        self.assertIn(top.replace('\x1b', '\\x1b').replace('\x07', '\\x07').replace('\n', '\\x0a'), r.stdout)
        for line in r.stdout.splitlines():
            self.assertFalse(line.startswith('\x1b[31mred'), 'a line begun by a file name: %r' % line)
        j = self.json_of('status', name, 'vda')
        self.assertEqual(dicts_with(j, 'Device', 'vda')[0].get('Path'), top)

    def test_register_options(self):
        name = self.unique_name()
        chains = self.make_chains(('vda',), SIZE)
        q = self.start_qemu(chains, name=name)
        self.addCleanup(self.unregister_quietly, name)
        u = '0e3c5a1e-6a53-4d0c-8f0e-4b1f3f4b9a77'
        self.ok('register', name, q.daemon_socket, '--uuid=' + u, '--owner=4242')
        self.assertEqual(self.client.get(h.guest_path(name), h.IFACE_GUEST, 'UUID'), u)
        self.assertEqual(self.client.get(h.guest_path(name), h.IFACE_GUEST, 'Owner'), 4242)
        # An owner by user name.
        other = self.unique_name()
        q2 = self.start_qemu(self.make_chains(('vda',), SIZE), name=other)
        self.addCleanup(self.unregister_quietly, other)
        uid, _ = h.ensure_user(h.STRANGER)
        self.ok('register', other, q2.daemon_socket, '--owner=' + h.STRANGER)
        self.assertEqual(self.client.get(h.guest_path(other), h.IFACE_GUEST, 'Owner'), uid)

    def test_disk_names(self):
        # A guest managed by libvirt: QEMU knows its disks as virtio-disk0..., its users as vda...
        name = self.unique_name()
        chains = self.make_chains(('virtio-disk0', 'virtio-disk1'), SIZE)
        q = self.start_qemu(chains, name=name)
        self.addCleanup(self.unregister_quietly, name)
        self.fails(2, 'register', name, q.daemon_socket, '--disk-name=virtio-disk0')
        self.fails(2, 'register', name, q.daemon_socket, '--disk-name=virtio-disk0=')
        self.fails(2, 'register', name, q.daemon_socket, '--disk-name=virtio-disk0=vda',
                   '--disk-name=virtio-disk0=vdb')
        self.fails(2, 'pull', name, 'vda', '--disk-name=virtio-disk0=vda')   # register's option only
        self.fails(1, 'register', name, q.daemon_socket, '--disk-name=virtio-disk0=..', mention='disk_names')
        self.fails(1, 'register', name, q.daemon_socket, '--disk-name=virtio-disk0=virtio-disk1',
                   mention='disk_names')
        self.assertEqual(self.client.try_call(h.MANAGER_PATH, h.IFACE_MANAGER, 'GetGuest', 's', name)[0], None)
        self.ok('register', name, q.daemon_socket, '--disk-name=virtio-disk0=vda', '--disk-name=virtio-disk1=vdb')

        r = self.ok('status', name)
        self.assertRegex(r.stdout, r'virtio-disk0\n\s*Target: vda\n')
        self.assertRegex(r.stdout, r'virtio-disk1\n\s*Target: vdb\n')
        for disk in ('vdb', 'virtio-disk1', chains['virtio-disk1'].top):
            j = self.json_of('status', name, disk)
            d = dicts_with(j, 'Device', 'virtio-disk1')
            self.assertEqual(len(d), 1, 'status %s %s: %r' % (name, disk, j))
            self.assertEqual(d[0].get('Target'), 'vdb')
            self.assertEqual(dicts_with(j, 'Device', 'virtio-disk0'), [], 'status %s %s: %r' % (name, disk, j))
        r = self.fails(1, 'status', name, 'vdz', mention='vdz')
        self.assertIn('virtio-disk0 (vda)', r.stderr)

        # Every verb on a disk takes the name.
        self.ok('pull', name, 'vdb', '--bandwidth=64K')
        self.ok('pause', name, 'vdb')
        self.client.wait_prop(h.disk_path(name, 'virtio-disk1'), h.IFACE_STREAM, 'State', 'paused')
        self.ok('set-bandwidth', name, 'vdb', '0')
        self.ok('resume', name, 'vdb')
        self.ok('wait', name, 'vdb')
        self.assertEqual(self.client.get(h.disk_path(name, 'virtio-disk1'), h.IFACE_STREAM, 'BackingChain'), [])
        self.assertTrue(self.json_of('map', name, 'vda'))
        self.ok('pull', name, 'vda', '--bandwidth=64K')
        self.ok('cancel', name, 'vda', '--wait')
        j = self.json_of('export', name, 'vda')
        self.assertEqual(self.client.get(j['export'], 'org.blockstream1.Export', 'Disk'),
                         h.disk_path(name, 'virtio-disk0'))
        self.ok('export-stop', j['export'])
        self.ok('pull', name, 'vda', '--bandwidth=0', '--wait')
        self.assertEqual(self.client.get(h.disk_path(name, 'virtio-disk0'), h.IFACE_STREAM, 'BackingChain'), [])

    # -- streaming

    def test_pull_wait(self):
        g = self.new_guest(size=SIZE)
        ch = g.chains['vda']
        since = time.monotonic()
        self.ok('pull', g.name, 'vda', '--wait')
        d = g.disk()
        self.assertEqual(d.prop('State'), 'completed')
        self.assertEqual(d.prop('BackingChain'), [])
        self.assertEqual(len(d.finished(since)), 1)
        j = self.json_of('status', g.name, 'vda')
        disk = dicts_with(j, 'Device', 'vda')
        self.assertTrue(disk, j)
        self.assertEqual(disk[0].get('State'), 'completed')
        self.assertEqual(disk[0].get('BackingChain'), [])
        self.assertEqual(disk[0].get('BytesDone'), disk[0].get('BytesTotal'))
        # wait on an ended job tells how it ended: completed is success.
        self.ok('wait', g.name, 'vda')
        g.qemu.quit()
        self.assertIsNone(h.image_backing(ch.top))
        self.assertEqual(ch.compare()[0], 0)

    def test_pull_with_base_by_path(self):
        g = self.new_guest(size=SIZE)
        ch = g.chains['vda']
        self.ok('pull', g.name, ch.top, '--base=' + ch.base, '--wait')
        self.assertEqual(g.disk().prop('BackingChain'), [ch.base])
        self.assertEqual(h.image_backing(ch.top), ch.base)

    def test_pull_pause_resume_set_bandwidth_cancel(self):
        g = self.new_guest(size=256 * MiB)
        d = g.disk()
        q = g.qemu
        since = time.monotonic()
        self.ok('pull', g.name, 'vda', '--bandwidth=4M')
        self.assertEqual(d.prop('Bandwidth'), 4 * MiB)
        self.assertEqual(q.qmp.jobs()[0]['speed'], 4 * MiB)
        d.wait_state('running', 10)
        self.fails(1, 'pull', g.name, 'vda')                       # Busy
        self.ok('pause', g.name, 'vda')
        d.wait_state('paused', 5)
        self.ok('resume', g.name, 'vda')
        d.wait_state('running', 5)
        self.ok('set-bandwidth', g.name, 'vda', '2Mi')
        self.assertEqual(d.prop('Bandwidth'), 2 * MiB)
        self.assertEqual(q.qmp.jobs()[0]['speed'], 2 * MiB)
        self.ok('set-bandwidth', g.name, 'vda', '512K')
        self.assertEqual(d.prop('Bandwidth'), 512 * 1024)
        self.ok('set-bandwidth', g.name, 'vda', '1048576')
        self.assertEqual(d.prop('Bandwidth'), 1048576)
        self.ok('set-bandwidth', g.name, 'vda', '1Ki')
        self.assertEqual(d.prop('Bandwidth'), 1024)
        j = self.json_of('status', g.name, 'vda')
        disk = dicts_with(j, 'Device', 'vda')
        self.assertTrue(disk, j)
        self.assertEqual(disk[0].get('State'), 'running')
        self.assertEqual(disk[0].get('Bandwidth'), 1024)
        self.ok('cancel', g.name, 'vda', '--wait')
        self.assertEqual(d.prop('State'), 'cancelled', 'cancel --wait returned before the job stopped')
        res = d.wait_finished(30, since)
        self.assertEqual(res[0], 'cancelled')
        self.fails(1, 'wait', g.name, 'vda')                       # the last job was cancelled
        self.fails(1, 'cancel', g.name, 'vda')                      # no job any more
        self.fails(1, 'pause', g.name, 'vda')

    def test_max_guest_latency_and_set_latency(self):
        for args in (('set-latency', 'g', 'vda'), ('set-latency', 'g', 'vda', '2x'),
                     ('set-latency', 'g', 'vda', '-1ms'), ('set-latency', 'g', 'vda', 'ms'),
                     ('set-latency', 'g', 'vda', '99999999999999999999999s'),
                     ('pull', 'g', 'vda', '--max-guest-latency=fast'), ('pull', 'g', 'vda', '--max-guest-latency=1.ms')):
            self.fails(2, *args)
        self.assertIn('--max-guest-latency=', self.ok('--help').stdout)
        g = self.new_guest(size=256 * MiB)
        d = g.disk()
        # With no job: the default for the next one, in any unit.
        for arg, usec in (('2ms', 2000), ('1.5ms', 1500), ('500us', 500), ('0.25s', 250000), ('750', 750),
                          ('off', 0), ('0', 0)):
            self.ok('set-latency', g.name, 'vda', arg)
            self.assertEqual(d.prop('MaxGuestLatency'), usec, arg)
        self.fails(1, 'set-latency', g.name, 'vda', '61s', mention='out of range')
        # A job in the mode (the -S guest does no I/O: idle, at the --bandwidth ceiling).
        self.ok('pull', g.name, 'vda', '--max-guest-latency=2ms', '--bandwidth=1M')
        self.assertEqual(d.prop('MaxGuestLatency'), 2000)
        self.client.wait_prop(d.path, h.IFACE_STREAM, 'ThrottleReason', 'idle', 30)
        out = self.ok('status', g.name, 'vda').stdout
        self.assertIn('2.0ms', out)
        self.assertRegex(out, r'Speed limit: .*\(idle\)')
        j = dicts_with(self.json_of('status', g.name, 'vda'), 'Device', 'vda')[0]
        self.assertEqual((j.get('MaxGuestLatency'), j.get('ThrottleReason')), (2000, 'idle'))
        self.ok('set-latency', g.name, 'vda', 'off')
        self.assertEqual((d.prop('MaxGuestLatency'), d.prop('ThrottleReason')), (0, 'off'))
        self.assertEqual(g.qemu.qmp.jobs()[0]['speed'], MiB)
        self.ok('cancel', g.name, 'vda', '--wait')

    def test_pull_wait_reports_cancellation(self):
        g = self.new_guest(size=256 * MiB)
        d = g.disk()
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=self.env.bus.address)
        p = h.spawn([h.BLOCKSTREAMCTL, 'pull', g.name, 'vda', '--bandwidth=1M', '--wait'], env=env,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(lambda: p.poll() is None and p.kill())
        d.wait_state('running', 10)
        self.assertIsNone(p.poll(), 'pull --wait returned while the job runs')
        self.ok('cancel', g.name, 'vda')
        try:
            out, err = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.fail('pull --wait did not return after the job was cancelled')
        self.assertEqual(p.returncode, 1, 'pull --wait of a cancelled job: exit %d, stderr %r' % (p.returncode, err))
        self.assertIn('cancel', (out + err).decode().lower())

    def test_set_bandwidth_suffixes_while_idle(self):
        g = self.new_guest(size=SIZE)
        d = g.disk()
        for arg, want in (('4M', 4 * MiB), ('4Mi', 4 * MiB), ('4MiB', 4 * MiB), ('4MB', 4 * 10**6),
                          ('1G', 1 << 30), ('1Gi', 1 << 30), ('8K', 8192), ('8Ki', 8192), ('8KB', 8000),
                          ('12345', 12345), ('12345B', 12345), ('1.5M', 3 * MiB // 2), ('100MiB/s', 100 * MiB),
                          ('unlimited', 0), ('7', 7), ('0', 0)):
            with self.subTest(arg):
                self.ok('set-bandwidth', g.name, 'vda', arg)
                self.assertEqual(d.prop('Bandwidth'), want)
        self.assertEqual(d.prop('State'), 'idle')

    # -- access

    def test_stranger(self):
        g = self.new_guest(size=SIZE)
        r = self.ok('list', user=h.STRANGER)            # reading is for everyone
        self.assertIn(g.name, r.stdout)
        self.ok('status', g.name, 'vda', user=h.STRANGER)
        self.fails(1, 'pull', g.name, 'vda', user=h.STRANGER)
        self.fails(1, 'unregister', g.name, user=h.STRANGER)
        self.assertEqual(g.disk().prop('State'), 'idle')
        self.assertEqual(g.qemu.qmp.jobs(), [])
        self.assertIs(g.prop('Running'), True)

    def test_daemon_not_running(self):
        self.env.stop_daemon()
        self.addCleanup(self.env.start_daemon)
        r = self.ctl('list')
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertTrue(r.stderr.strip())


HINT = 'Authentication is required; run as root, or on a terminal without --no-ask-password'
AGENT = '/usr/bin/pkttyagent'
AGENT_STARTED = re.compile(r'Started %s as process (\d+)\.' % re.escape(AGENT))


class CliAuthorizationTest(h.TestCase):
    """blockstreamctl as a user whom polkit would ask for a password (bstest-stranger; polkitd on
    the bus with our policy): the hint when it cannot ask, and polkit's text agent only on a
    terminal, only for a call that needs authorization, and gone when the call returns. The
    agent's own debug messages tell whether it ran (BLOCKSTREAM_LOG_LEVEL=debug)."""

    needs_cli = True
    needs_polkit = True

    def env_vars(self):
        return {'DBUS_SYSTEM_BUS_ADDRESS': self.env.bus.address, 'BLOCKSTREAM_LOG_LEVEL': 'debug'}

    def ctl(self, *args):
        """Not on a terminal: standard input is /dev/null."""
        r = h.run_as(h.STRANGER, [h.BLOCKSTREAMCTL] + list(args), env=self.env_vars())
        return r.returncode, r.stderr

    def ctl_on_terminal(self, *args, user=h.STRANGER, timeout=60):
        """Run as `user` on a new pseudo-terminal: its standard input, output and error and its
        controlling terminal, as script(1) gives. If the agent asks for a password (polkitd uses a
        fallback agent only for a caller in a logind session, so only where the tests run inside
        one), answer a wrong one once the terminal stopped echoing. Returns (exit status, all
        the terminal showed)."""
        uid, gid = h.ensure_user(user)
        env = {'PATH': '/usr/sbin:/usr/bin:/sbin:/bin', 'HOME': '/', 'LANG': 'C.UTF-8', 'TERM': 'dumb'}
        env.update(self.env_vars())
        master, slave = os.openpty()
        try:
            p = subprocess.Popen(['setpriv', '--reuid=%d' % uid, '--regid=%d' % gid, '--init-groups',
                                  h.BLOCKSTREAMCTL] + list(args),
                                 stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
                                 preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        finally:
            os.close(slave)
        out = b''
        answered = False
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.fail('blockstreamctl %s on a terminal did not end within %ds; it showed: %r'
                              % (' '.join(args), timeout, out))
                ready, _, _ = select.select([master], [], [], min(left, 0.1))
                if ready:
                    try:
                        data = os.read(master, 4096)
                    except OSError as e:
                        if e.errno != errno.EIO:    # EIO: nobody has the terminal open any more
                            raise
                        data = b''
                    if not data:
                        break
                    out += data
                if (not answered and b'Password:' in out and
                        not termios.tcgetattr(master)[3] & termios.ECHO):
                    os.write(master, b'not-the-password\n')
                    answered = True
            p.wait(timeout)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            os.close(master)
        return p.returncode, out.decode(errors='replace').replace('\r\n', '\n')

    def assertHint(self, code, text, action):
        self.assertEqual(code, 1, text)
        self.assertIn(HINT, text)
        self.assertIn('ask an administrator to grant you %s (see blockstreamctl --help).' % action, text)
        self.assertRegex(text, r'Failed to [^\n]*: [^\n]*%s' % re.escape(action))

    def assertNoAgent(self, text):
        self.assertNotIn(AGENT, text, 'a polkit agent was started')
        self.assertNotIn('polkit agent', text, 'a polkit agent was started')

    def assertAgentCameAndWent(self, text):
        m = AGENT_STARTED.search(text)
        self.assertTrue(m, 'no polkit agent was started: %r' % text)
        pid = int(m.group(1))
        self.assertIn('Stopped the polkit agent (process %d).' % pid, text)
        self.assertFalse(os.path.exists('/proc/%d' % pid) and
                         os.path.basename(os.readlink('/proc/%d/exe' % pid)) == os.path.basename(AGENT),
                         'the polkit agent %d outlived blockstreamctl' % pid)

    def assertAgentInstalled(self):
        self.assertTrue(os.access(AGENT, os.X_OK), '%s not found (apt-get install pkexec)' % AGENT)

    def test_no_ask_password_hint(self):
        g = self.new_guest(size=SIZE)
        for args, action in ((('provision', '/nonexistent/base.qcow2', '/nonexistent/top.qcow2'),
                              'org.blockstream1.manage'),
                             (('unregister', g.name), 'org.blockstream1.manage'),
                             (('pull', g.name, 'vda'), 'org.blockstream1.stream'),
                             (('set-bandwidth', g.name, 'vda', '1M'), 'org.blockstream1.stream'),
                             (('map', g.name, 'vda'), 'org.blockstream1.inspect'),
                             (('export', g.name, 'vda'), 'org.blockstream1.export')):
            with self.subTest(args[0]):
                code, err = self.ctl('--no-ask-password', *args)
                self.assertHint(code, err, action)
                self.assertNoAgent(err)
                # Not on a terminal, the same without the option.
                code, err = self.ctl(*args)
                self.assertHint(code, err, action)
                self.assertNoAgent(err)
        self.assertEqual(g.disk().prop('State'), 'idle')
        self.assertEqual(g.disk().prop('Bandwidth'), 0)
        self.assertEqual(g.qemu.qmp.jobs(), [])
        self.assertIs(g.prop('Running'), True)

    def test_agent_on_terminal_only(self):
        self.assertAgentInstalled()
        g = self.new_guest(size=SIZE)
        # --no-ask-password: no agent, and polkit is not allowed to ask.
        code, text = self.ctl_on_terminal('--no-ask-password', 'pull', g.name, 'vda')
        self.assertHint(code, text, 'org.blockstream1.stream')
        self.assertNoAgent(text)
        # Reading needs no authorization: no agent.
        for args in (('list',), ('status', g.name, 'vda')):
            code, text = self.ctl_on_terminal(*args)
            self.assertEqual(code, 0, text)
            self.assertNoAgent(text)
        # root is never asked: no agent.
        code, text = self.ctl_on_terminal('set-bandwidth', g.name, 'vda', '2M', user='root')
        self.assertEqual(code, 0, text)
        self.assertNoAgent(text)
        self.assertEqual(g.disk().prop('Bandwidth'), 2 * MiB)
        # A call that needs authorization: the agent runs while it does and is gone after. Outside
        # a logind session polkitd does not use it (see ctl_on_terminal) and the hint follows;
        # inside one it asks, is answered wrongly, and access is denied.
        for args in (('pull', g.name, 'vda'), ('set-bandwidth', g.name, 'vda', '1M'), ('map', g.name, 'vda')):
            with self.subTest(args[0]):
                code, text = self.ctl_on_terminal(*args)
                self.assertEqual(code, 1, text)
                self.assertAgentCameAndWent(text)
                self.assertEqual(len(AGENT_STARTED.findall(text)), 1, text)
                self.assertTrue(HINT in text or 'Access denied' in text, text)
                # A single call: stopped as soon as it returned, before the error was printed (map
                # keeps it across its pages and stops it after).
                if args[0] != 'map':
                    self.assertLess(text.index('Stopped the polkit agent'), text.index('Failed to '), text)
        self.assertEqual(g.disk().prop('State'), 'idle')
        self.assertEqual(g.disk().prop('Bandwidth'), 2 * MiB)
        self.assertEqual(g.qemu.qmp.jobs(), [])


if __name__ == '__main__':
    h.main()
