#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""The host template cache (issue 14 §2): overlays provisioned with option 'cache' read a remote
template through one sandboxed helper per host and template, so each block crosses the network
once; the cache is a D-Bus object (URL, Size, BytesFetched, Users, Socket, Stop, Warm), survives a
daemon restart on the same socket, and once warmed no longer needs the remote.

The remote is nbdkit serving a file over TCP with its log filter, which records every read the
cache's helper makes: the bytes read from the remote are counted exactly. The readers are real
QEMU processes (qemu-img compare) reading each overlay fully, against the template's file."""

import http.server
import json
import os
import pwd
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import dbus

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import offline as o  # noqa: E402
import test_manager as tm  # noqa: E402
from harness import MiB  # noqa: E402

SIZE = 16 * MiB
IFACE_CACHE = 'org.blockstream1.Cache'
CACHE_PREFIX = '/org/blockstream1/cache/'


def free_tcp_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Remote:
    """nbdkit serving a file read-only on 127.0.0.1:port, every read logged."""

    def __init__(self, directory, name, port, size):
        self.file = os.path.join(directory, name + '.raw')
        self.logfile = os.path.join(directory, name + '-nbdkit.log')
        self.port = port
        self.url = 'nbd://127.0.0.1:%d' % port
        with open(self.file, 'wb') as f:
            f.write(os.urandom(size))
        self.proc = None
        self.start_argv = []
        self.params = []

    def start(self):
        self.proc = h.spawn(['nbdkit', '-f', '-r', '--exit-with-parent', '-p', str(self.port), '-i', '127.0.0.1']
                            + self.start_argv + ['--filter=log', 'file', self.file, 'logfile=' + self.logfile]
                            + self.params,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def up():
            with socket.socket() as s:
                try:
                    s.connect(('127.0.0.1', self.port))
                    return True
                except OSError:
                    return False
        h.wait_until(up, 20, 'nbdkit to listen on port %d' % self.port)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def bytes_read(self):
        if not os.path.exists(self.logfile):
            return 0
        with open(self.logfile) as f:
            return sum(int(m.group(1), 16) for m in re.finditer(r' Read id=\d+ offset=0x[0-9a-f]+ count=(0x[0-9a-f]+)',
                                                                 f.read()))


class HttpRemote:
    """A template over HTTP with byte ranges (what QEMU's curl driver needs), counting the bytes
    it sends."""

    def __init__(self, path):
        self.path = path
        self.size = os.path.getsize(path)
        self.sent = 0
        self.lock = threading.Lock()
        remote = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.send_response(200)
                self.send_header('Content-Length', str(remote.size))
                self.send_header('Accept-Ranges', 'bytes')
                self.end_headers()

            def do_GET(self):
                m = re.fullmatch(r'bytes=(\d+)-(\d+)', self.headers.get('Range', ''))
                if not m or int(m.group(1)) > int(m.group(2)) or int(m.group(1)) >= remote.size:
                    self.send_error(416)
                    return
                start, end = int(m.group(1)), min(int(m.group(2)), remote.size - 1)
                with open(remote.path, 'rb') as f:
                    f.seek(start)
                    data = f.read(end - start + 1)
                self.send_response(206)
                self.send_header('Content-Range', 'bytes %d-%d/%d' % (start, end, remote.size))
                self.send_header('Content-Length', str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                with remote.lock:
                    remote.sent += len(data)

        self.server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.server.daemon_threads = True
        self.url = 'http://127.0.0.1:%d' % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


QEMU_USER = 'bstest-cacheqemu'     # QEMUUsers= of the daemon: a non-root QEMU user


def cache_helpers(env, path):
    """The cache's image, and (pid, image fd, uids, gids) of each of the daemon's children that
    hold it open: its helper."""
    image = os.path.join(env.daemon.state_dir, 'caches', path.rsplit('/', 1)[1] + '.qcow2')
    found = []
    for p in o.storage_helpers(env):
        try:
            for fd in os.listdir('/proc/%d/fd' % p.pid):
                if os.readlink('/proc/%d/fd/%s' % (p.pid, fd)) == image:
                    found.append((p.pid, int(fd), p.uids, p.gids))
                    break
        except OSError:
            pass     # gone meanwhile
    return image, found


class CacheTest(h.TestCase):
    needs_daemon = False

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        env = cls.env
        with cls.class_setup():
            cls.remote = Remote(env.dir, 'tpl', free_tcp_port(), SIZE)
            cls.remote2 = Remote(env.dir, 'tpl2', free_tcp_port(), SIZE)
            cls.http = HttpRemote(Remote(env.dir, 'http', 0, SIZE).file)
            # A qcow2 template whose header names a backing of its own, on a server no prefix allows.
            cls.secret = Remote(env.dir, 'secret', free_tcp_port(), SIZE)
            cls.layered = Remote(env.dir, 'layered', free_tcp_port(), SIZE)
            h.qemu_img('create', '-q', '-u', '-f', 'qcow2', '-b', cls.secret.url + '/', '-F', 'raw', cls.layered.file,
                       str(SIZE))
            h.ensure_user(QEMU_USER)
            env.daemon = h.Daemon(env, config_extra='TemplateURLPrefixes=%s/ %s/ %s/ %s/\nQEMUUsers=%s\n' % (
                cls.remote.url, cls.remote2.url, cls.http.url, cls.layered.url, QEMU_USER))
            env.daemon.start()

    def serve(self, remote):
        remote.start()
        self.addCleanup(remote.stop)

    def provision(self, template, target, **options):
        o = {'cache': dbus.Boolean(True)} if options.pop('cache', True) else {}
        o.update(options)
        o = dbus.Dictionary(o, signature='sv')
        return self.client.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'ProvisionDisk', 'ssa{sv}', template, target, o,
                                timeout=120)

    def ctl(self, *args):
        return h.run([h.BLOCKSTREAMCTL] + list(args), check=False, timeout=300,
                     env=dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=self.env.bus.address))

    def caches(self):
        return sorted(p for p in self.client.managed_objects() if str(p).startswith(CACHE_PREFIX))

    def read_all(self, overlay, template_file):
        """A whole read of the overlay by QEMU, compared with the template's data."""
        r = subprocess.run(['qemu-img', 'compare', '-f', 'raw', '-F', 'qcow2', template_file, overlay],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
        self.assertEqual(r.returncode, 0, 'qemu-img compare: %s' % r.stdout.decode(errors='replace'))

    def test_1_two_guests_read_the_template_once(self):
        self.serve(self.remote)
        a = os.path.join(self.env.images, 'a.qcow2')
        b = os.path.join(self.env.images, 'b.qcow2')
        # A caller's 'size' is its overlay's, never the cache's (which is everyone's): the cache
        # holds the whole template, as the server reports it.
        self.assertEqual(h.unwrap(self.provision(self.remote.url + '/', a, size=h.T(2 * SIZE))), 2 * SIZE)
        # The second through the CLI.
        r = self.ctl('provision', '--cache', self.remote.url + '/', b)
        self.assertEqual(r.returncode, 0, r.stderr)
        paths = self.caches()
        self.assertEqual(len(paths), 1, 'one cache for one template: %s' % paths)
        path = paths[0]
        props = h.unwrap(self.client.get_all(path, IFACE_CACHE))
        self.assertEqual(props['URL'], self.remote.url + '/')
        self.assertEqual(props['Size'], SIZE)
        self.assertEqual(props['Users'], 2)
        self.client.wait_prop(path, IFACE_CACHE, 'State', 'serving', timeout=60)
        sock = props['Socket']
        with open(os.path.join(h.SOURCE_ROOT, 'dbus', 'org.blockstream1.Cache.xml')) as f:
            want = tm.members(f.read(), IFACE_CACHE)
        got = tm.members(self.client.call(path, 'org.freedesktop.DBus.Introspectable', 'Introspect'), IFACE_CACHE)
        self.assertTrue(want)
        self.assertEqual(want, got, 'dbus/org.blockstream1.Cache.xml and the live object differ')
        for overlay in (a, b):
            info = h.image_info(overlay)
            self.assertEqual(info.get('backing-filename'), 'nbd+unix:///cache?socket=%s' % sock)
        before = self.remote.bytes_read()  # the size probe's reads, if any
        self.read_all(a, self.remote.file)
        self.read_all(b, self.remote.file)
        fetched = self.remote.bytes_read() - before
        h.log('remote bytes read by two readers: %d (template %d)' % (fetched, SIZE))
        self.assertGreaterEqual(fetched, SIZE)
        self.assertLessEqual(fetched, SIZE * 1.05, 'two readers through the cache read the remote more than once')
        self.assertGreaterEqual(h.unwrap(self.client.get(path, IFACE_CACHE, 'BytesFetched')), SIZE)

        # A daemon restart keeps the cache, its object and its socket; reads go on through it.
        self.env.daemon.stop()
        self.env.daemon.start()
        self.assertEqual(self.caches(), [path])
        self.client.wait_prop(path, IFACE_CACHE, 'State', 'serving', timeout=60)
        props = h.unwrap(self.client.get_all(path, IFACE_CACHE))
        self.assertEqual(props['Socket'], sock)
        self.assertEqual(props['Users'], 2)
        before = self.remote.bytes_read()
        self.read_all(a, self.remote.file)
        self.assertEqual(self.remote.bytes_read() - before, 0, 'what the cache holds is not read again')

        r = self.ctl('--json', 'caches')
        self.assertEqual(r.returncode, 0, r.stderr)
        listed = json.loads(r.stdout)
        self.assertEqual([(c['object'], c['url'], c['users'], c['size']) for c in listed],
                         [(path, self.remote.url + '/', 2, SIZE)])

        # Users counts down (issue 14 §4): an overlay removed, or no longer over the cache, is no
        # user; a file put in an overlay's place is none either, even one naming the cache.
        # (Looked at when read, once a second at most: anyone may read it in a loop.)
        def users():
            return h.unwrap(self.client.get(path, IFACE_CACHE, 'Users'))
        # Stop is refused while an overlay still needs the cache (it used to leave them without
        # their backing).
        self.assertDBusError(h.ERR_BUSY, self.client.call, path, IFACE_CACHE, 'Stop')
        os.unlink(b)
        self.client.wait_for(lambda: users() == 1, 5, 'Users to count the removed overlay out')
        h.qemu_img('create', '-q', '-f', 'qcow2', '-u', '-b', 'nbd+unix:///cache?socket=%s' % sock, '-F', 'raw',
                   b, str(SIZE))
        time.sleep(1.1)  # a look after the new file was made
        self.assertEqual(users(), 1)
        self.assertDBusError(h.ERR_BUSY, self.client.call, path, IFACE_CACHE, 'Stop')
        h.qemu_img('rebase', '-u', '-b', '', a)
        self.client.wait_for(lambda: users() == 0, 5, 'Users to count the rebased overlay out')

        # In use: Stop is refused while a reader is connected (a QEMU on the cache's socket).
        q = h.spawn(['qemu-io', '-r', '-f', 'raw', 'nbd+unix:///cache?socket=%s' % sock], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.addCleanup(lambda: (q.kill(), q.wait(10)))
        self.client.wait_for(lambda: h.unwrap(self.client.get(path, IFACE_CACHE, 'Clients')) > 0, 30,
                             'the reader to connect to the cache')
        self.assertDBusError(h.ERR_BUSY, self.client.call, path, IFACE_CACHE, 'Stop')
        q.communicate(b'quit\n', timeout=30)
        self.client.wait_for(lambda: h.unwrap(self.client.get(path, IFACE_CACHE, 'Clients')) == 0, 30,
                             'the reader to disconnect')
        r = self.ctl('cache-stop', path.rsplit('/', 1)[1])
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(self.caches(), [])
        self.assertFalse(os.path.exists(sock))

    def test_2_warm_then_the_remote_goes_away(self):
        self.serve(self.remote2)
        c = os.path.join(self.env.images, 'c.qcow2')
        self.provision(self.remote2.url + '/', c)
        path = [p for p in self.caches()
                if h.unwrap(self.client.get(p, IFACE_CACHE, 'URL')) == self.remote2.url + '/'][0]
        self.client.wait_prop(path, IFACE_CACHE, 'State', 'serving', timeout=60)
        self.client.call(path, IFACE_CACHE, 'Warm', timeout=300)
        self.assertGreaterEqual(self.remote2.bytes_read(), SIZE)
        self.remote2.stop()
        self.read_all(c, self.remote2.file)
        # and after a restart too: the warmed image names no backing any more.
        self.env.daemon.stop()
        self.env.daemon.start()
        self.client.wait_prop(path, IFACE_CACHE, 'State', 'serving', timeout=60)
        self.read_all(c, self.remote2.file)

    def test_3_bad_input_leaves_nothing(self):
        before = self.caches()
        tpl = os.path.join(self.env.images, 'local.raw')
        with open(tpl, 'wb') as f:
            f.truncate(SIZE)
        cases = [
            (tpl, 'InvalidArgs'),  # a local template: read from its file system, no cache
            ('nbd+unix:///?socket=/tmp/x.sock', 'InvalidArgs'),  # local socket
            ('nbd://127.0.0.1:1/', 'AccessDenied'),  # not in TemplateURLPrefixes=
        ]
        for template, err in cases:
            target = os.path.join(self.env.images, 'bad.qcow2')
            self.assertDBusError('org.freedesktop.DBus.Error.' + err, self.provision, template, target, size=h.T(SIZE))
            self.assertFalse(os.path.exists(target))
            self.assertEqual(self.caches(), before)
        # A cache that cannot serve: the server answers the size probe, then exits (nbdkit's
        # exitlast filter: once its last client left), so the helper cannot open the template. The
        # provisioning fails once the helper found out, and neither the overlay nor the cache
        # made for it stays.
        once = Remote(self.env.dir, 'once', self.remote.port, MiB)
        once.start_argv = ['--filter=exitlast']
        once.start()
        self.addCleanup(once.stop)
        target = os.path.join(self.env.images, 'down.qcow2')
        self.assertDBusError('org.blockstream1.Error.HelperFailed', self.provision, self.remote.url + '/down', target)
        self.assertFalse(os.path.exists(target))
        self.assertEqual(self.caches(), before)
        self.assertEqual(sorted(os.listdir(os.path.join(self.env.daemon.state_dir, 'caches'))),
                         sorted('%s.qcow2' % p.rsplit('/', 1)[1] for p in before))
        once.stop()
        # A target that exists: refused before any cache is made.
        self.serve(self.remote)
        target = os.path.join(self.env.images, 'exists.qcow2')
        with open(target, 'wb') as f:
            f.write(b'x')
        self.assertDBusError('org.freedesktop.DBus.Error.FileExists', self.provision, self.remote.url + '/x', target,
                             size=h.T(SIZE))
        self.assertEqual(self.caches(), before)

    def test_4_guest_reconnects_across_a_daemon_restart(self):
        """A guest's QEMU with its cache backing opened with reconnect-delay reads on through a
        daemon restart: the helper comes back on the same socket."""
        self.serve(self.remote)
        overlay = os.path.join(self.env.images, 'g.qcow2')
        self.provision(self.remote.url + '/g', overlay)
        path = [p for p in self.caches()
                if h.unwrap(self.client.get(p, IFACE_CACHE, 'URL')) == self.remote.url + '/g'][0]
        self.client.wait_prop(path, IFACE_CACHE, 'State', 'serving', timeout=60)
        sock = h.unwrap(self.client.get(path, IFACE_CACHE, 'Socket'))
        # The monitor's socket listens before QEMU starts: QEMU gets it as an fd.
        mon = os.path.join(self.env.dir, 'g.qmp')
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        listener.bind(mon)
        listener.listen(1)
        q = h.spawn(['qemu-system-x86_64', '-machine', 'none', '-S', '-nodefaults', '-display', 'none',
                     '-chardev', 'socket,id=mon0,fd=%d,server=on,wait=off' % listener.fileno(),
                     '-mon', 'chardev=mon0,mode=control',
                     '-blockdev', 'driver=nbd,node-name=tpl,server.type=unix,server.path=%s,export=cache,'
                     'reconnect-delay=60,read-only=on' % sock,
                     '-blockdev', 'driver=file,filename=%s,node-name=f0,read-only=on' % overlay,
                     '-blockdev', 'driver=qcow2,file=f0,backing=tpl,node-name=d0,read-only=on'],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=[listener.fileno()])
        self.addCleanup(lambda: (q.kill(), q.wait(10)))
        qmp = h.QMP(mon, timeout=300)
        self.addCleanup(qmp.close)

        def read(off, length):
            out = qmp.hmp('qemu-io d0 "read -q %d %d"' % (off, length))
            self.assertEqual(out, '', 'qemu-io read %d+%d: %s' % (off, length, out))
        read(0, SIZE // 2)
        self.env.daemon.stop()
        self.env.daemon.start()
        self.client.wait_prop(path, IFACE_CACHE, 'State', 'serving', timeout=60)
        read(SIZE // 2, SIZE // 2)
        read(0, SIZE)
        # And through a daemon SIGKILLed: its helper dies with it (PDEATHSIG), the next one waits
        # for that to be gone (the image's lock) and serves on the same socket.
        self.env.daemon.kill()
        self.env.daemon.start()
        self.client.wait_prop(path, IFACE_CACHE, 'State', 'serving', timeout=60)
        read(0, SIZE)

    def test_5_http_template(self):
        """A template over HTTP (QEMU's curl driver, in the helper): two readers, one fetch."""
        if not os.path.exists('/usr/lib/x86_64-linux-gnu/qemu/block-curl.so'):
            self.skipTest("QEMU's curl driver is not installed (qemu-block-extra, scripts/install-deps)")
        url = self.http.url + '/tpl.raw'
        a = os.path.join(self.env.images, 'ha.qcow2')
        b = os.path.join(self.env.images, 'hb.qcow2')
        self.assertEqual(h.unwrap(self.provision(url, a)), SIZE)
        self.assertEqual(h.unwrap(self.provision(url, b)), SIZE)
        path = [p for p in self.caches() if h.unwrap(self.client.get(p, IFACE_CACHE, 'URL')) == url][0]
        self.assertEqual(h.unwrap(self.client.get(path, IFACE_CACHE, 'Users')), 2)
        before = self.http.sent
        self.read_all(a, self.http.path)
        self.read_all(b, self.http.path)
        fetched = self.http.sent - before
        h.log('HTTP bytes sent for two readers: %d (template %d)' % (fetched, SIZE))
        self.assertGreaterEqual(fetched, SIZE)
        self.assertLessEqual(fetched, SIZE * 1.05)

    def read_socket_as(self, user, sock):
        """qemu-io as user, on the cache's socket directly: its exit status."""
        pw = pwd.getpwnam(user)
        return subprocess.run(['setpriv', '--reuid=%d' % pw.pw_uid, '--regid=%d' % pw.pw_gid, '--clear-groups',
                               'qemu-io', '-r', '-f', 'raw', '-c', 'read 0 65536',
                               'nbd+unix:///cache?socket=%s' % sock],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)

    def test_6_a_non_root_qemu_reaches_the_cache(self):
        """Issue 14 §4: the cache's socket is for the QEMUs it serves (QEMUUsers= here; an
        overlay's owner too), by ACLs: a QEMU of such a user connects, anyone else is refused,
        and neither the socket nor its directories are open to others. (The socket and its
        directories were root's only: a non-root QEMU could not use a cache.)"""
        self.serve(self.remote)
        a = os.path.join(self.env.images, 'nonroot.qcow2')
        self.provision(self.remote.url + '/', a)
        path = [p for p in self.caches()
                if h.unwrap(self.client.get(p, IFACE_CACHE, 'URL')) == self.remote.url + '/'][0]
        self.client.wait_prop(path, IFACE_CACHE, 'State', 'serving', timeout=60)
        sock = h.unwrap(self.client.get(path, IFACE_CACHE, 'Socket'))
        for d in (self.env.daemon.runtime_dir, os.path.dirname(sock), sock):
            self.assertEqual(os.stat(d).st_mode & 0o007, 0, '%s is open to others' % d)
        r = self.read_socket_as(QEMU_USER, sock)
        self.assertEqual(r.returncode, 0, 'a QEMUUsers= user cannot read the cache: %s' % r.stdout.decode(errors='replace'))
        r = self.read_socket_as(h.STRANGER, sock)
        self.assertNotEqual(r.returncode, 0, 'a stranger reads the cache')
        # The socket made again by a restarted daemon is reachable as well.
        self.env.daemon.stop()
        self.env.daemon.start()
        self.client.wait_prop(path, IFACE_CACHE, 'State', 'serving', timeout=60)
        r = self.read_socket_as(QEMU_USER, sock)
        self.assertEqual(r.returncode, 0, 'after a restart: %s' % r.stdout.decode(errors='replace'))
        os.unlink(a)
        self.client.call(path, IFACE_CACHE, 'Stop')

    def test_7_more_guests_than_qemus_default_limit(self):
        """One connection for each guest disk over the cache: a QEMU with the fix for
        CVE-2024-7409 (Debian's 7.2) serves 100 at once unless told otherwise, and the 101st
        guest's QEMU would wait for its backing until one of the others went."""
        self.serve(self.remote)
        a = os.path.join(self.env.images, 'many.qcow2')
        self.provision(self.remote.url + '/', a)
        path = [p for p in self.caches()
                if h.unwrap(self.client.get(p, IFACE_CACHE, 'URL')) == self.remote.url + '/'][0]
        self.client.wait_prop(path, IFACE_CACHE, 'State', 'serving', timeout=60)
        sock = h.unwrap(self.client.get(path, IFACE_CACHE, 'Socket'))
        held = []
        try:
            for _ in range(101):
                held.append(o.nbd_hold(sock, b'cache', timeout=20))
            self.client.wait_for(lambda: h.unwrap(self.client.get(path, IFACE_CACHE, 'Clients')) == 101, 30,
                                 'Clients to count the 101 connections')
            self.read_all(a, self.remote.file)
        finally:
            for c in held:
                c.close()
        self.client.wait_for(lambda: h.unwrap(self.client.get(path, IFACE_CACHE, 'Clients')) == 0, 30,
                             'the clients to disconnect')
        os.unlink(a)
        self.client.call(path, IFACE_CACHE, 'Stop')


    def serving_cache(self, name):
        """A cache of self.remote with an overlay over it: (object path, socket, helper pid)."""
        self.serve(self.remote)
        a = os.path.join(self.env.images, name)
        self.provision(self.remote.url + '/', a)
        self.addCleanup(os.unlink, a)
        path = [p for p in self.caches()
                if h.unwrap(self.client.get(p, IFACE_CACHE, 'URL')) == self.remote.url + '/'][0]
        self.client.wait_prop(path, IFACE_CACHE, 'State', 'serving', timeout=60)
        _, found = cache_helpers(self.env, path)
        self.assertEqual(len(found), 1)
        return path, h.unwrap(self.client.get(path, IFACE_CACHE, 'Socket')), found[0][0]

    def greedy_clients(self, sock, n):
        """n clients of the cache that each ask READS reads of the whole template and read none of
        the answers; returned once each has an answer waiting (its reads were let in)."""
        conns = self.clients(sock, n, timeout=30)
        for c in conns:
            c.sendall(b''.join(o.nbd_request(o.NBD_CMD_READ, k, 0, SIZE) for k in range(self.READS)))
        for c in conns:
            self.assertTrue(c.recv(1, socket.MSG_PEEK), 'no answer')
        return conns

    def clients(self, sock, n, timeout=60):
        """n clients of the cache at sock, through the handshake, closed at the test's end."""
        conns = [o.nbd_hold(sock, b'cache', timeout=timeout) for _ in range(n)]
        self.addCleanup(lambda: [c.close() for c in conns])
        return conns

    @staticmethod
    def started(target, n):
        """n threads of target(k), k = 0..n-1, started."""
        threads = [threading.Thread(target=target, args=(k,)) for k in range(n)]
        for t in threads:
            t.start()
        return threads

    def answered(self, c, handle, offset, length):
        """The data of one read of length at offset on c, once its answer (to that handle) came."""
        c.sendall(o.nbd_request(o.NBD_CMD_READ, handle, offset, length))
        got, data = o.nbd_simple_read_reply(c, length)
        self.assertEqual(got, handle)
        return data

    READS = 16  # QEMU's MAX_NBD_REQUESTS
    # What the relay lets QEMU hold for one connection, and for all of them (cache-relay.c).
    CONNECTION_BUDGET = 32 * MiB
    CACHE_BUDGET = 64 * MiB

    def test_9_d_a_client_that_never_reads_cannot_swell_the_caches_qemu(self):
        """Review 32b: the cache's clients are the QEMUs of every overlay over it, of several
        users. QEMU reads up to 16 requests of a connection at once and keeps a buffer of each
        read's length until its reply is read: two clients that asked for the whole template 16
        times and never read made the cache's QEMU hold 512 MiB here (1 GiB with reads of 32 MiB;
        four took the service's MemoryMax=2G, and the cache's QEMU, killed, cut every guest over
        the template). Through the relay a connection costs QEMU two such reads at most."""
        path, sock, pid = self.serving_cache('greedy.qcow2')
        before = o.settled_rss_kib(pid)
        conns = self.greedy_clients(sock, 2)
        grown = (o.settled_rss_kib(pid) - before) // 1024
        self.assertLess(grown, 2 * self.CONNECTION_BUDGET // MiB + 64,
                        "the cache's QEMU grew by %d MiB for two clients that never read" % grown)
        # All are answered once the clients read, in order, with the template's bytes.
        with open(self.remote.file, 'rb') as f:
            want = f.read()
        for c in conns:
            for k in range(self.READS):
                handle, data = o.nbd_simple_read_reply(c, SIZE)
                self.assertEqual(handle, k)
                self.assertTrue(data == want, 'read %d does not read as the template' % k)
        self.assertEqual(cache_helpers(self.env, path)[1][0][0], pid, "the cache's QEMU is the same")

    def test_9_e_clients_that_hold_the_caches_budget_are_closed_for_one_that_waits(self):
        """What the reads in flight of all the cache's clients cost its QEMU is bounded too (768
        clients of 32 MiB would be 24 GiB): clients that fill that budget and never read must not
        keep it from the others. One that read nothing of its answers for a few seconds while
        another's read waits for the budget is closed, and that read is answered."""
        path, sock, pid = self.serving_cache('fair.qcow2')
        greedy = self.greedy_clients(sock, self.CACHE_BUDGET // self.CONNECTION_BUDGET)
        honest, = self.clients(sock, 1)
        data = self.answered(honest, 7, 4096, 4096)
        with open(self.remote.file, 'rb') as f:
            f.seek(4096)
            self.assertTrue(data == f.read(4096), 'the read does not read as the template')
        # As many greedy ones as that took were closed (the one stuck longest first): each gets what
        # was on its way, then EOF, short of its answers; the others are answered in full as they
        # read.
        closed = 0
        for c in greedy:
            c.settimeout(60)
            got, want = 0, self.READS * (16 + SIZE)
            while got < want:
                more = c.recv(min(want - got, 1 << 20))
                if not more:
                    closed += 1
                    break
                got += len(more)
        self.assertGreater(closed, 0, 'every client holding the budget was answered in full')
        self.assertEqual(cache_helpers(self.env, path)[1][0][0], pid, "the cache's QEMU is the same")

    def test_9_f_busy_clients_cannot_starve_one_that_waits_for_the_budget(self):
        """Review 33a: a client that keeps more reads queued than the budget holds, and reads its
        answers as fast as they come, is never stuck; but the room each of its answers gave back
        went straight to its own next read, before the relay looked at those waiting: two such
        clients kept every other guest over the template waiting for as long as they went on.
        While a request waits, the others' go in only on their turn now, in rotation; and a turn
        whose read does not fit yet holds the rotation until it does: a read of 16 MiB waited
        behind the busy clients' 2 MiB ones until they ran out (0 and 14 of 400 left)."""
        path, sock, pid = self.serving_cache('busy.qcow2')
        reads, length = 400, 2 * MiB
        busy = self.clients(sock, self.CACHE_BUDGET // self.CONNECTION_BUDGET)
        left = [reads] * len(busy)

        def drain(k):
            c = busy[k]
            while left[k] > 0:
                o.nbd_simple_read_reply(c, length)
                left[k] -= 1
        for c in busy:
            c.sendall(b''.join(o.nbd_request(o.NBD_CMD_READ, j, (j * length) % SIZE, length) for j in range(reads)))
        threads = self.started(drain, len(busy))
        try:
            honest, = self.clients(sock, 1, timeout=120)
            self.answered(honest, 9, 0, 4096)
            still = list(left)
            # A large read too, which needs a quarter of the budget free at once.
            self.answered(honest, 10, 0, SIZE)
            still_large = list(left)
            h.log('busy reads left when the reads were answered: %s, %s' % (still, still_large))
        finally:
            for t in threads:
                t.join(300)
        # Before: once their last 16 reads were in flight, nothing more of theirs to let in (15
        # and 30 of 400 left, 15 and 57 in a second run). Now: at once (399 and 399).
        self.assertTrue(all(n > reads // 2 for n in still),
                        'the read waited for the busy clients to run out of reads (%s of %d left)' % (still, reads))
        self.assertTrue(all(n > reads // 2 for n in still_large),
                        'the large read waited for the busy clients to run out of reads (%s of %d left)'
                        % (still_large, reads))
        self.assertEqual(left, [0] * len(busy), 'a busy client was not answered in full')

    def test_9_g_a_client_that_reads_a_trickle_is_closed_for_one_that_waits(self):
        """Review 33a: a client counted as stuck only while it read nothing at all: one that read
        a few KiB every few seconds held its share of the budget for as long as its answers took
        at that pace (here minutes); review 33b: and then while it read more than 1 MiB in 5 s.
        Below 16 MiB in 5 s, owed answers all along, while another waits, it is closed as one
        that reads nothing is."""
        path, sock, pid = self.serving_cache('trickle.qcow2')
        greedy = self.greedy_clients(sock, self.CACHE_BUDGET // self.CONNECTION_BUDGET)
        stop = threading.Event()
        ended = [False] * len(greedy)

        def trickle(k):
            # 320 KiB a second: 1.6 MiB in 5 s, which passed the first threshold (1 MiB)
            while not stop.wait(1):
                got = 0
                while got < 320 * 1024:
                    try:
                        more = greedy[k].recv(320 * 1024 - got)
                    except OSError:
                        more = b''
                    if not more:
                        ended[k] = True
                        return
                    got += len(more)
        threads = self.started(trickle, len(greedy))
        try:
            honest, = self.clients(sock, 1)
            self.answered(honest, 5, 0, 4096)
            self.client.wait_for(lambda: any(ended), 30, 'a trickling client to be closed')
        finally:
            stop.set()
            for t in threads:
                t.join(30)

    def test_9_k_the_caches_qemu_cannot_write_into_its_relay(self):
        """The cache's relay runs as the cache's uid, in a PID namespace nested in the one its QEMU
        runs in: a QEMU taken over by the remote saw the relay and could open its /proc/PID/mem
        for writing (review 34b), i.e. run code in the process that bounds what the cache's
        clients may make it hold. The relay is not dumpable now: a signal is all it can send
        (which ends the cache as its own exit would)."""
        _, _, pid = self.serving_cache('relayed.qcow2')

        def ids(p):
            try:
                with open('/proc/%s/status' % p) as f:
                    text = f.read()
                return (int(re.search(r'^Uid:\s+(\d+)', text, re.M).group(1)),
                        int(re.search(r'^Gid:\s+(\d+)', text, re.M).group(1)))
            except (OSError, AttributeError):
                return None
        uid, gid = ids(pid)
        relays = [int(p) for p in os.listdir('/proc') if p.isdigit() and int(p) != pid and ids(p) == (uid, gid)]
        self.assertEqual(len(relays), 1, "the cache's relay, the other process of its uid: %s" % relays)
        self.assertEqual(o.reach_as(self, uid, gid, relays[0]), ['signal'],
                         "the cache's QEMU's identity reaches into its relay")
        # The test can tell: that identity reaches into its own QEMU.
        self.assertEqual(o.reach_as(self, uid, gid, pid), ['signal', 'write memory'])

    def test_9_l_a_helper_that_dies_as_it_serves_is_not_restarted_forever(self):
        """A cache's helper that dies while it serves is started again, at most 5 times; but the
        count went back to naught each time one came to serve, so one killed as soon as it served
        (by a remote that makes it crash with its first reply) was restarted forever, each restart
        two spawns on the daemon's thread (review 34b). The count goes back to naught only once a
        helper served a minute now."""
        path, _, pid = self.serving_cache('dies.qcow2')
        kills = 0
        while kills < 8 and h.unwrap(self.client.get(path, IFACE_CACHE, 'State')) != 'failed':
            os.kill(pid, signal.SIGKILL)
            kills += 1

            def next_helper():
                state = h.unwrap(self.client.get(path, IFACE_CACHE, 'State'))
                found = cache_helpers(self.env, path)[1]
                if state == 'failed' or (state == 'serving' and found and found[0][0] != pid):
                    return state, found
                return None
            state, found = self.client.wait_for(next_helper, 60, 'the cache to serve again or fail')
            if state == 'serving':
                pid = found[0][0]
        self.assertEqual(h.unwrap(self.client.get(path, IFACE_CACHE, 'State')), 'failed',
                         'a helper killed as soon as it served %d times still served' % kills)
        self.assertEqual(kills, 6, 'restarted %d times' % (kills - 1))

    def test_9_h_a_client_gone_with_reads_in_flight_keeps_them_in_the_budget(self):
        """Review 33c: QEMU keeps a read's buffer until it has read the data, whatever becomes of
        the connection, and the relay gave the budget back as soon as it closed one. Clients that
        each sent a read of what the cache had yet to fetch (from a remote 1 s away here) and,
        right behind it, a write (refused: the connection closed) made the cache's QEMU take all
        their reads in at once, a buffer for each, past the budget. Their reads are drained now,
        and count until their replies are read."""
        self.remote.start_argv = ['--filter=delay']
        self.remote.params = ['rdelay=1']
        self.addCleanup(setattr, self.remote, 'start_argv', [])
        self.addCleanup(setattr, self.remote, 'params', [])
        path, sock, pid = self.serving_cache('gone.qcow2')

        def vm_kib():
            with open('/proc/%d/status' % pid) as f:
                return int(re.search(r'^VmData:\s+(\d+) kB', f.read(), re.M).group(1))
        before = vm_kib()
        conns = self.clients(sock, 12)
        for k, c in enumerate(conns):
            c.sendall(o.nbd_request(o.NBD_CMD_READ, k, 0, SIZE))
        time.sleep(0.3)  # the reads the budget lets in are on their way to QEMU
        for k, c in enumerate(conns):
            c.sendall(o.nbd_request(o.NBD_CMD_WRITE, k + 100, 0, 512))
            time.sleep(0.05)  # the next read goes in, and on
        peak, deadline = before, time.monotonic() + 3
        while time.monotonic() < deadline:
            peak = max(peak, vm_kib())
            time.sleep(0.02)
        grown = (peak - before) // 1024
        # 12 reads of 16 MiB, each with copy-on-read's bounce buffer (as large, up to 16 MiB) while
        # it fetches: 264 MiB at once before (VmData: taken, touched or not; what RLIMIT_AS counts);
        # the budget's 64 MiB and their bounces, 128 MiB, now.
        self.assertLess(grown, 192, "the cache's QEMU took %d MiB for clients that were gone" % grown)
        for c in conns:  # each is closed once the relay saw its write
            c.settimeout(60)
            while c.recv(1 << 20):
                pass
        self.assertEqual(cache_helpers(self.env, path)[1][0][0], pid, "the cache's QEMU is the same")

    def connect_as(self, user, sock):
        """A connection to sock that a process of user's made (its uid is the one the relay sees),
        handed back over a socket pair."""
        pw = pwd.getpwnam(user)
        mine, theirs = socket.socketpair()
        with mine, theirs:
            code = ('import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); '
                    'socket.send_fds(socket.socket(fileno=int(sys.argv[2])), [b"x"], [s.fileno()])')
            r = subprocess.run(['setpriv', '--reuid=%d' % pw.pw_uid, '--regid=%d' % pw.pw_gid, '--clear-groups',
                                sys.executable, '-c', code, sock, str(theirs.fileno())],
                               pass_fds=[theirs.fileno()], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               timeout=60)
            self.assertEqual(r.returncode, 0, r.stdout)
            _, fds, _, _ = socket.recv_fds(mine, 1, 1)
        c = socket.socket(fileno=fds[0])
        c.settimeout(60)
        return c

    def test_9_i_turns_go_by_user_not_by_connection(self):
        """Review 33c: turns went by connection, so a user with many connections got a turn on
        each for every one of another user's: eight busy connections of one user (root here)
        and a QEMU user's one with 16 reads queued, all waiting, let the busy ones through about
        eight reads for each of the other's. Turns go by user now, in rotation: one each."""
        path, sock, pid = self.serving_cache('turns.qcow2')
        reads, length = 2000, 2 * MiB
        busy = self.clients(sock, 8)
        honest = o.nbd_go(self.connect_as(QEMU_USER, sock), b'cache')
        self.addCleanup(honest.close)
        done = [0] * len(busy)
        stop = threading.Event()

        def drain(k):
            try:
                while done[k] < reads and not stop.is_set():
                    o.nbd_simple_read_reply(busy[k], length)
                    done[k] += 1
            except (OSError, AssertionError):
                pass
        for c in busy:
            c.sendall(b''.join(o.nbd_request(o.NBD_CMD_READ, j, (j * length) % SIZE, length) for j in range(reads)))
        threads = self.started(drain, len(busy))
        try:
            time.sleep(0.5)  # all busy, the budget taken
            before = sum(done)
            honest.sendall(b''.join(o.nbd_request(o.NBD_CMD_READ, j, j * 4096, 4096) for j in range(16)))
            for j in range(16):
                handle, _ = o.nbd_simple_read_reply(honest, 4096)
            busy_reads = sum(done) - before
            self.assertTrue(all(n < reads for n in done), 'the busy clients ran out of reads first: %s' % done)
        finally:
            stop.set()
            for c in busy:
                c.shutdown(socket.SHUT_RDWR)
            for t in threads:
                t.join(60)
        # One turn each: about 16 of theirs for the 16 reads (17, 19 and 21 in three runs); by
        # connection, about 8 for each (123, 124 and 127 before).
        self.assertLess(busy_reads, 64, 'the busy user got %d reads in for 16 of the other' % busy_reads)

    def test_8_an_unreadable_record_gives_no_cache_away(self):
        """Overlays name their cache by its socket (caches/N.sock). A caches.json that cannot be
        read after a restart (a crash, a full disk) restores no cache; a new cache then took number
        1 again, its socket the same path, and the overlays made over the old cache 1 read another
        template. Now a new cache takes a number no image or socket has, and the unreadable record
        is kept aside. (Last: the caches of the tests before are not restored.)"""
        self.serve(self.remote)
        self.serve(self.remote2)
        self.provision(self.remote.url + '/rec-a', os.path.join(self.env.images, 'rec-a.qcow2'))
        before = {h.unwrap(self.client.get(p, IFACE_CACHE, 'Socket')) for p in self.caches()}
        record = os.path.join(self.env.daemon.state_dir, 'caches.json')
        self.assertTrue(os.path.exists(record))
        self.env.daemon.stop()
        with open(record, 'w') as f:
            f.write('{"caches": [')
        self.env.daemon.start()
        self.assertEqual(self.caches(), [])
        self.provision(self.remote2.url + '/rec-b', os.path.join(self.env.images, 'rec-b.qcow2'))
        after = {h.unwrap(self.client.get(p, IFACE_CACHE, 'Socket')) for p in self.caches()}
        self.assertEqual(len(after), 1)
        self.assertEqual(after & before, set(), 'a new cache took the socket overlays of an old one still name')
        aside = [f for f in os.listdir(self.env.daemon.state_dir) if f.startswith('caches.json.unreadable-')]
        self.assertEqual(len(aside), 1, os.listdir(self.env.daemon.state_dir))
        with open(os.path.join(self.env.daemon.state_dir, aside[0])) as f:
            self.assertEqual(f.read(), '{"caches": [')

    def test_9_a_templates_own_backing_is_never_opened(self):
        """A qcow2 template's header, the remote server's answer, may name a backing of its own: any
        protocol, address or file the cache's QEMU reaches, past TemplateURLPrefixes=, and what it
        read would be served to every guest of the cache. It is never opened: the cache holds the
        template as it is (here: no data), and the server it names is never read."""
        self.serve(self.secret)
        self.serve(self.layered)
        a = os.path.join(self.env.images, 'layered.qcow2')
        self.assertEqual(h.unwrap(self.provision(self.layered.url + '/', a, template_format='qcow2')), SIZE)
        zeros = os.path.join(self.env.dir, 'zeros.raw')
        with open(zeros, 'wb') as f:
            f.truncate(SIZE)
        self.read_all(a, zeros)
        self.assertEqual(self.secret.bytes_read(), 0, "the template's own backing was read")

    def test_9_b_a_stopped_caches_number_is_never_handed_out_again(self):
        """A cache stopped (its image and socket gone) may still be named by an overlay nobody told
        us of (a copy, a backup put back): after a restart, the next cache took its number, and so
        its socket, and that overlay read another template's blocks. Numbers now go on from the
        last one handed out, which the record keeps."""
        self.serve(self.remote)
        self.serve(self.remote2)
        a = os.path.join(self.env.images, 'num-a.qcow2')
        self.provision(self.remote.url + '/num-a', a)
        path = [p for p in self.caches() if h.unwrap(self.client.get(p, IFACE_CACHE, 'URL')).endswith('/num-a')][0]
        sock = h.unwrap(self.client.get(path, IFACE_CACHE, 'Socket'))
        os.unlink(a)
        self.client.wait_for(lambda: h.unwrap(self.client.get(path, IFACE_CACHE, 'Users')) == 0, 5,
                             'Users to count the removed overlay out')
        self.client.call(path, IFACE_CACHE, 'Stop')
        self.env.daemon.stop()
        self.env.daemon.start()
        self.provision(self.remote2.url + '/num-b', os.path.join(self.env.images, 'num-b.qcow2'))
        socks = {h.unwrap(self.client.get(p, IFACE_CACHE, 'Socket')) for p in self.caches()}
        self.assertNotIn(sock, socks, 'a new cache took the number of one stopped before the restart')

    def test_9_c_a_recorded_url_this_daemon_cannot_open_is_kept(self):
        """A cache recorded by an older daemon with a URL this one cannot give QEMU (here an nbd://
        URL with a query) is restored, and fails to start, saying why: dropping it, as the daemon
        did when its URL check grew, dropped its record, and its overlays' socket with it."""
        self.serve(self.remote)
        self.provision(self.remote.url + '/rec-q', os.path.join(self.env.images, 'rec-q.qcow2'))
        record = os.path.join(self.env.daemon.state_dir, 'caches.json')
        self.env.daemon.stop()
        with open(record) as f:
            data = json.load(f)
        entry = [c for c in data['caches'] if c['url'].endswith('/rec-q')][0]
        entry['url'] += '?x=1'
        with open(record, 'w') as f:
            json.dump(data, f)
        self.env.daemon.start()
        path = [p for p in self.caches() if h.unwrap(self.client.get(p, IFACE_CACHE, 'URL')) == entry['url']]
        self.assertEqual(len(path), 1, 'the recorded cache was not restored')
        self.client.wait_prop(path[0], IFACE_CACHE, 'State', 'failed', timeout=30)
        with open(self.env.daemon.log, errors='replace') as f:
            self.assertIn('recorded by an older daemon', f.read())
        self.env.daemon.stop()
        self.env.daemon.start()
        with open(record) as f:
            self.assertIn(entry['url'], [c['url'] for c in json.load(f)['caches']])


class CacheIdentityTest(h.TestCase):
    """Issue 14: each template cache's helper in a sandbox identity of its own. The helper parses
    what a remote template server sends; one taken over by a hostile server must not reach another
    cache's image (and so poison the guests of another template). All caches' helpers used to run
    under one uid (the reserved provisioning uid): one could signal another's QEMU and open its
    /proc/PID/mem for writing (its own /proc shows its uid's processes, and QEMU's seccomp deny-list
    has no rule against open and pwrite), i.e. run code in it, with its image's fd."""

    needs_daemon = False

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        env = cls.env
        with cls.class_setup():
            cls.remote = Remote(env.dir, 'ident', free_tcp_port(), SIZE)
            # Three uids to give out: one guest, two caches; the top ones are the probes'.
            cls.first = env.helper_uid_first()
            env.daemon = h.Daemon(env, config_extra='TemplateURLPrefixes=%s/\nHelperUIDRange=%d-%d\n' % (
                cls.remote.url, cls.first, cls.first + 2 + h.PROBE_UIDS))
            env.daemon.start()

    def provision(self, template, target):
        return self.client.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'ProvisionDisk', 'ssa{sv}', template, target,
                                dbus.Dictionary({'cache': dbus.Boolean(True)}, signature='sv'), timeout=120)

    def cache_of(self, url):
        paths = [p for p in self.client.managed_objects() if str(p).startswith(CACHE_PREFIX) and
                 h.unwrap(self.client.get(p, IFACE_CACHE, 'URL')) == url]
        self.assertEqual(len(paths), 1, 'the cache of %s' % url)
        self.client.wait_prop(paths[0], IFACE_CACHE, 'State', 'serving', timeout=60)
        return str(paths[0])

    def helper(self, path):
        """(pid, image fd, uid, gid) of the cache's helper: the daemon's child holding its image open."""
        image, found = cache_helpers(self.env, path)
        self.assertEqual(len(found), 1, 'one helper holds %s: %s' % (image, found))
        pid, fd, uids, gids = found[0]
        self.assertEqual(len(set(uids)), 1, 'real, effective, saved and fs uids of %d' % pid)
        self.assertEqual(len(set(gids)), 1, 'real, effective, saved and fs gids of %d' % pid)
        return pid, fd, uids[0], gids[0], image

    def open_as(self, uid, gid, path):
        """Open path for writing as uid/gid with no groups (what a helper of that identity could do
        with the file): True if it opened."""
        r = subprocess.run(['setpriv', '--reuid=%d' % uid, '--regid=%d' % gid, '--clear-groups',
                            sys.executable, '-c', 'import os, sys; os.open(sys.argv[1], os.O_RDWR)', path],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
        out = r.stdout.decode(errors='replace')
        self.assertTrue(r.returncode == 0 or 'PermissionError' in out, 'open as %d: %s' % (uid, out))
        return r.returncode == 0

    def test_each_cache_its_own_identity(self):
        self.remote.start()
        self.addCleanup(self.remote.stop)
        images = self.env.images
        url_a, url_b, url_c = (self.remote.url + '/' + n for n in 'abc')
        # A guest first: its uid is never a cache's.
        raw = o.raw_image(os.path.join(images, 'guest.raw'))
        self.client.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'RegisterGuest', 'ssa{sv}', 'ident', '',
                         o.offline_options({'vda': raw}, {'vda': 'raw'}))
        guest_uid = o.identity(self.env, 'ident')[0]
        self.provision(url_a, os.path.join(images, 'a.qcow2'))
        self.provision(url_b, os.path.join(images, 'b.qcow2'))
        pa, pb = self.cache_of(url_a), self.cache_of(url_b)
        pid_a, fd_a, uid_a, gid_a, image_a = self.helper(pa)
        pid_b, fd_b, uid_b, gid_b, image_b = self.helper(pb)

        # A taken-over helper of cache A cannot reach cache B's helper (nor B's A's): no signal, no
        # write into its memory (which has B's image open for writing).
        self.assertEqual(o.reach_as(self, uid_a, gid_a, pid_b), [],
                         "cache A's helper identity reaches cache B's helper (and so its image)")
        self.assertEqual(o.reach_as(self, uid_b, gid_b, pid_a), [],
                         "cache B's helper identity reaches cache A's helper (and so its image)")
        # Nor B's image itself: by name, or reopened through B's QEMU's fd (root's file, 0600).
        self.assertFalse(self.open_as(uid_a, gid_a, image_b))
        self.assertFalse(self.open_as(uid_a, gid_a, '/proc/%d/fd/%d' % (pid_b, fd_b)))
        # The test can tell: the helper's own identity reaches its own QEMU.
        self.assertEqual(o.reach_as(self, uid_a, gid_a, pid_a), ['signal', 'write memory'])

        # Each its own uid (= gid), from HelperUIDRange=, none of the guest's, nor a probe's.
        self.assertNotEqual(uid_a, uid_b)
        for uid, gid in ((uid_a, gid_a), (uid_b, gid_b)):
            self.assertEqual(uid, gid)
            self.assertIn(uid, range(self.first, self.first + 3))
            self.assertNotEqual(uid, guest_uid)
        # Its image is root's, 0600 (the helper has it as an fd, and needs no access by name), in a
        # directory of root's only.
        for image in (image_a, image_b):
            st = os.stat(image)
            self.assertEqual((st.st_uid, st.st_gid, st.st_mode & 0o7777), (0, 0, 0o600), image)
        st = os.stat(os.path.dirname(image_a))
        self.assertEqual((st.st_uid, st.st_mode & 0o7777), (0, 0o700))

        # A restart keeps them (and the images' owners).
        self.env.daemon.stop()
        self.env.daemon.start()
        self.assertEqual(self.helper(self.cache_of(url_a))[2], uid_a)
        self.assertEqual(self.helper(self.cache_of(url_b))[2], uid_b)
        self.assertEqual(o.identity(self.env, 'ident')[0], guest_uid)

        # The record is read back as untrusted: a cache's uid edited to the guest's is replaced
        # (the guest keeps its own), and the new one is written back.
        records = os.path.join(self.env.daemon.state_dir, 'caches.json')
        self.env.daemon.stop()
        with open(records) as f:
            state = json.load(f)
        ids = {c['id']: c for c in state['caches']}
        self.assertEqual(ids[int(pb.rsplit('/', 1)[1])]['helper_uid'], uid_b)
        ids[int(pb.rsplit('/', 1)[1])]['helper_uid'] = guest_uid
        with open(records, 'w') as f:
            json.dump(state, f)
        self.env.daemon.start()
        uid_b = self.helper(self.cache_of(url_b))[2]
        self.assertNotIn(uid_b, (guest_uid, uid_a))
        self.assertIn(uid_b, range(self.first, self.first + 3), 'a probe\'s uid given to a cache')
        self.assertEqual(self.helper(self.cache_of(url_a))[2], uid_a)
        self.assertEqual(o.identity(self.env, 'ident')[0], guest_uid)
        with open(records) as f:
            self.assertIn(uid_b, [c['helper_uid'] for c in json.load(f)['caches']])

        # All uids given out: neither a third cache nor another guest shares one.
        self.assertDBusError(o.ERR_LIMITS_EXCEEDED, self.provision, url_c, os.path.join(images, 'c.qcow2'))
        self.assertFalse(os.path.exists(os.path.join(images, 'c.qcow2')))
        self.assertDBusError(o.ERR_LIMITS_EXCEEDED, self.client.call, h.MANAGER_PATH, h.IFACE_MANAGER,
                             'RegisterGuest', 'ssa{sv}', 'ident2', '', o.offline_options({'vda': raw}, {'vda': 'raw'}))

        # Stop releases the uid: the next cache gets it.
        os.unlink(os.path.join(images, 'a.qcow2'))
        self.client.call(pa, IFACE_CACHE, 'Stop')
        o.wait_gone(pid_a, 30, "cache A's helper")
        self.provision(url_c, os.path.join(images, 'c.qcow2'))
        self.assertEqual(self.helper(self.cache_of(url_c))[2], uid_a)



OWNER_MANAGES = '''// blockstreamd tests only (test_cache.py)
polkit.addRule(function(action, subject) {
    if (action.id == "org.blockstream1.manage" && (subject.user == "%s" || subject.user == "%s")) {
        return polkit.Result.YES;
    }
    return polkit.Result.NOT_HANDLED;
});
''' % (h.OWNER, h.MEMBER)


class CacheShareTest(h.TestCase):
    """A user other than root makes at most CACHES_PER_USER template caches: each is a QEMU in the
    daemon's own cgroup for as long as an overlay uses it, and URLs that differ only in an export
    name are different templates, so one user with ProvisionDisk took all 64 (review 30b)."""

    CACHES_PER_USER = 4  # cache.h: CACHES_PER_USER_MAX
    needs_daemon = False
    needs_polkit = True
    polkit_rules = {'10-bstest-cache.rules': OWNER_MANAGES}

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        with cls.class_setup() as env:
            cls.remote = Remote(env.dir, 'tpl', free_tcp_port(), SIZE)
            env.daemon = h.Daemon(env, config_extra='TemplateURLPrefixes=%s/\n' % cls.remote.url)
            env.daemon.start()

    def test_a_client_elsewhere_at_the_socket_path_is_not_counted(self):
        """Clients (and Stop's check) counted every socket /proc/net/unix showed at the cache's
        path. A user mounts a tmpfs over its top directory in a user namespace of their own, binds a
        socket at the same path there and connects to it: Stop was Busy for everyone, root too, for
        as long as they liked (review 30b). Only connections to the cache's own socket count."""
        self.remote.start()
        self.addCleanup(self.remote.stop)
        target = os.path.join(self.env.images, 'elsewhere.qcow2')
        url = self.remote.url + '/e-elsewhere'
        self.client.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'ProvisionDisk', 'ssa{sv}', url, target,
                         dbus.Dictionary({'cache': dbus.Boolean(True)}, signature='sv'), timeout=120)
        path = [p for p in self.client.managed_objects() if str(p).startswith(CACHE_PREFIX) and
                self.client.get(p, IFACE_CACHE, 'URL') == url][0]
        self.client.wait_prop(path, IFACE_CACHE, 'State', 'serving', timeout=60)
        sock = str(self.client.get(path, IFACE_CACHE, 'Socket'))
        os.unlink(target)  # no overlay over it any more
        top = '/' + sock.split('/')[1]
        script = ('import os, socket, sys, time\n'
                  'p = sys.argv[1]\n'
                  'os.makedirs(os.path.dirname(p))\n'
                  'l = socket.socket(socket.AF_UNIX)\n'
                  'l.bind(p)\n'
                  'l.listen(1)\n'
                  'c = socket.socket(socket.AF_UNIX)\n'
                  'c.connect(p)\n'
                  'a = l.accept()\n'
                  'print("ready", flush=True)\n'
                  'time.sleep(600)\n')
        fake = h.spawn(h.setpriv_argv(h.OWNER) + ['unshare', '-Urm', 'sh', '-c',
                                                 'mount -t tmpfs tmpfs "$0" && exec python3 -c "$1" "$2"',
                                                 top, script, sock], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(lambda: (fake.kill(), fake.wait(10)))
        self.assertEqual(fake.stdout.readline().strip(), b'ready', fake.stderr.read() if fake.poll() else '')
        time.sleep(1.1)  # Clients is looked at again once a second at most
        self.assertEqual(self.client.get(path, IFACE_CACHE, 'Clients'), 0)
        self.client.call(path, IFACE_CACHE, 'Stop')

    def test_a_record_too_large_keeps_the_caches(self):
        """caches.json beyond what a start reads back (64 MiB) was moved aside, and the next start
        restored no cache: every overlay over one lost its backing. One user's overlays with long
        paths could do it (review 30d). Beyond the bound the caches are kept without their overlays'
        paths, and with their owners, whose QEMUs must still reach the cache's socket (review 30e)
        (a test hook makes the bound small)."""
        self.env.restart_daemon_with('BLOCKSTREAM_TEST_CACHES_RECORD_MAX', '200')
        d, s = self.user_dir_and_session(h.MEMBER, 'record')
        url = self.remote.url + '/e-record'
        for i in range(2):
            r = s.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'ProvisionDisk', 'ssa{sv}',
                       "('%s', '%s', {'cache': <true>})" % (url, os.path.join(d, 'record-%d.qcow2' % i)), timeout=120)
            self.assertTrue(r['ok'], r)
        self.env.daemon.stop()
        self.env.daemon.start()
        paths = [p for p in self.client.managed_objects() if str(p).startswith(CACHE_PREFIX) and
                 self.client.get(p, IFACE_CACHE, 'URL') == url]
        self.assertEqual(len(paths), 1, 'the cache of %s after the restart' % url)
        self.assertEqual(self.client.get(paths[0], IFACE_CACHE, 'Users'), 2)
        self.client.wait_prop(paths[0], IFACE_CACHE, 'State', 'serving', timeout=60)
        sock = str(self.client.get(paths[0], IFACE_CACHE, 'Socket'))
        r = h.run_as(h.MEMBER, ['python3', '-c', 'import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])',
                               sock])
        self.assertEqual(r.returncode, 0, "the overlays' owner cannot reach the cache: %s" % r.stderr)

    def user_dir_and_session(self, user, name):
        """The remote served, a directory of user's beneath the images, and user's session."""
        self.remote.start()
        self.addCleanup(self.remote.stop)
        d = os.path.join(self.env.images, name)
        os.makedirs(d)
        os.chown(d, h.ensure_test_users()[user], -1)
        s = h.UserSession(user, self.env.bus.address)
        self.addCleanup(s.close)
        return d, s

    def test_a_cache_with_no_room_for_another_overlay_refuses_it(self):
        """A cache keeps track of its overlays, whose owners its socket's ACL lets in. Past its list
        (4,096; 2 here, a test hook), the next ProvisionDisk(cache) was made all the same, only
        counted: its owner was left out of the ACL (their QEMU could not read the template), and
        the cache could never be stopped (review 32b). It is refused now, and nothing is made."""
        self.env.restart_daemon_with('BLOCKSTREAM_TEST_CACHE_USERS_MAX', '2')
        self.addCleanup(lambda: (self.env.daemon.stop(), self.env.daemon.start()))
        # MEMBER makes the cache (OWNER's share of caches is another test's).
        d, s = self.user_dir_and_session(h.MEMBER, 'full')
        other = os.path.join(self.env.images, 'full-other')
        os.makedirs(other)
        os.chown(other, h.ensure_test_users()[h.OWNER], -1)
        s2 = h.UserSession(h.OWNER, self.env.bus.address)
        self.addCleanup(s2.close)
        url = self.remote.url + '/e-full'

        def provision(session, target):
            return session.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'ProvisionDisk', 'ssa{sv}',
                                "('%s', '%s', {'cache': <true>})" % (url, target), timeout=120)
        for i in range(2):
            r = provision(s, os.path.join(d, 'o%d.qcow2' % i))
            self.assertTrue(r['ok'], r)
        third = os.path.join(other, 'third.qcow2')
        r = provision(s2, third)
        self.assertFalse(r['ok'], 'a third overlay over a cache that keeps track of 2: %r' % r)
        self.assertEqual(r['error'], h.ERR_LIMITS_EXCEEDED, r)
        self.assertIn('keeps track of as many overlays as it can (2, and 0 being made)', r['message'])
        self.assertFalse(os.path.lexists(third))

    def test_provisionings_waiting_for_a_cache_count_toward_its_list(self):
        """Two ProvisionDisk(cache) at once of a template no cache serves yet: both wait while the
        cache starts, and were not counted against its list until it served (review 32d), so both
        were made past a list with room for one (a test hook). One is refused now, whatever the
        order, and nothing of it is made."""
        self.env.restart_daemon_with('BLOCKSTREAM_TEST_CACHE_USERS_MAX', '1')
        self.addCleanup(lambda: (self.env.daemon.stop(), self.env.daemon.start()))
        self.remote.start()
        self.addCleanup(self.remote.stop)
        d = os.path.join(self.env.images, 'waiters')
        os.makedirs(d)
        targets = [os.path.join(d, 'w%d.qcow2' % i) for i in range(2)]
        calls = [h.spawn(['busctl', '--address=' + self.env.bus.address, '--timeout=120', 'call', h.BUS_NAME,
                          h.MANAGER_PATH, h.IFACE_MANAGER, 'ProvisionDisk', 'ssa{sv}', self.remote.url + '/e-waiters',
                          t, '1', 'cache', 'b', 'true'], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for t in targets]
        results = [c.communicate(timeout=120) + (c.returncode,) for c in calls]
        made = [t for t, (_, _, rc) in zip(targets, results) if rc == 0]
        refused = [err for _, err, rc in results if rc != 0]
        self.assertEqual(len(made), 1, results)
        self.assertEqual(len(refused), 1, results)
        self.assertIn('keeps track of', refused[0])
        self.assertEqual([t for t in targets if os.path.lexists(t)], made)

    def stop_cache_of(self, url, overlays):
        """The overlays removed and the cache of url stopped: its maker's share of caches back."""
        for t in overlays:
            os.unlink(t)
        for p in self.client.managed_objects():
            if str(p).startswith(CACHE_PREFIX) and self.client.get(p, IFACE_CACHE, 'URL') == url:
                self.client.wait_for(lambda: self.client.try_call(p, IFACE_CACHE, 'Stop')[1] is None, 60,
                                     'the cache of %s to stop' % url)

    def test_a_users_provisionings_waiting_for_a_cache_count_toward_their_share(self):
        """A user's share of overlays over caches counted only the overlays made: several
        ProvisionDisk(cache) of theirs at once, of a template no cache serves yet, all wait while
        it starts, and all were made past a share with room for one (a test hook). One is made
        now, the other is refused, and nothing of it is made."""
        self.env.restart_daemon_with('BLOCKSTREAM_TEST_CACHE_OVERLAYS_PER_USER_MAX', '1')
        self.addCleanup(lambda: (self.env.daemon.stop(), self.env.daemon.start()))
        d, _ = self.user_dir_and_session(h.OWNER, 'share')
        uid, gid = h.ensure_user(h.OWNER)
        # Two: a user's third at once would wait for its template's size behind the first two
        # (PROBES_PER_CALLER_MAX), refused for that.
        targets = [os.path.join(d, 's%d.qcow2' % i) for i in range(2)]
        calls = [h.spawn(['setpriv', '--reuid=%d' % uid, '--regid=%d' % gid, '--init-groups', 'busctl',
                          '--address=' + self.env.bus.address, '--timeout=120', 'call', h.BUS_NAME, h.MANAGER_PATH,
                          h.IFACE_MANAGER, 'ProvisionDisk', 'ssa{sv}', self.remote.url + '/e-share', t, '1', 'cache',
                          'b', 'true'], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for t in targets]
        results = [c.communicate(timeout=120) + (c.returncode,) for c in calls]
        made = [t for t, (_, _, rc) in zip(targets, results) if rc == 0]
        refused = [err for _, err, rc in results if rc != 0]
        self.addCleanup(self.stop_cache_of, self.remote.url + '/e-share', made)
        self.assertEqual(len(made), 1, results)
        self.assertEqual(len(refused), 1, results)
        self.assertIn('at most 1 per user', refused[0])
        self.assertEqual([t for t in targets if os.path.lexists(t)], made)

    def test_looks_at_the_overlays_by_path_are_paced(self):
        """Review 32b: Stop(), Users and a ProvisionDisk at its user's share look at every overlay
        of the cache again, by its path (up to 4,000 bytes each, 4,096 a cache, 64 caches), as
        often as they are asked: callers could keep the daemon's one thread at it. The looks are
        paced daemon-wide now (a test hook: one overlay a second). A Stop() right after one that
        looked goes by the count that one found, and says so; the next look comes once the pace
        allows it."""
        self.env.restart_daemon_with('BLOCKSTREAM_TEST_CACHE_CHECKS', '1')
        self.addCleanup(lambda: (self.env.daemon.stop(), self.env.daemon.start()))
        self.remote.start()
        self.addCleanup(self.remote.stop)
        d = os.path.join(self.env.images, 'paced')
        os.makedirs(d)
        url = self.remote.url + '/e-paced'
        overlays = [os.path.join(d, 'p%d.qcow2' % i) for i in range(3)]
        for t in overlays:
            self.client.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'ProvisionDisk', 'ssa{sv}', url, t,
                             dbus.Dictionary({'cache': dbus.Boolean(True)}, signature='sv'), timeout=120)
        path = [p for p in self.client.managed_objects() if str(p).startswith(CACHE_PREFIX) and
                self.client.get(p, IFACE_CACHE, 'URL') == url][0]
        def stop():
            """None once stopped, else the Busy error's message."""
            _, e = self.client.try_call(path, IFACE_CACHE, 'Stop')
            self.assertTrue(e is None or e.name == h.ERR_BUSY, e)
            return e and e.message
        # Reading the objects looked at every cache's overlays (Users): a Stop() that looks comes
        # once the pace allows, and finds the 3 (a debt of some seconds at this pace).
        self.client.wait_for(lambda: 'as last counted' not in stop(), 60, 'a Stop() that looks')
        for t in overlays:
            os.unlink(t)
        message = stop()
        self.assertIsNotNone(message, 'Stop() looked at the overlays again at once')
        self.assertIn('as last counted', message)
        self.assertIn('3 overlays', message)
        # Once the pace allows, the overlays are found gone.
        self.client.wait_for(lambda: stop() is None, 60, 'Stop() to find the overlays gone')

    def test_one_user_makes_a_share_of_the_caches(self):
        d, s = self.user_dir_and_session(h.OWNER, 'mine')

        def provision(export, target):
            return s.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'ProvisionDisk', 'ssa{sv}',
                          "('%s/%s', '%s', {'cache': <true>})" % (self.remote.url, export, os.path.join(d, target)),
                          timeout=120)
        for i in range(self.CACHES_PER_USER):
            r = provision('e%d' % i, 'o%d.qcow2' % i)
            self.assertTrue(r['ok'], r)
        r = provision('e-more', 'more.qcow2')
        self.assertFalse(r['ok'], 'cache %d of one user: %r' % (self.CACHES_PER_USER + 1, r))
        self.assertEqual(r['error'], h.ERR_LIMITS_EXCEEDED, r)
        self.assertIn('at most %d per user' % self.CACHES_PER_USER, r['message'])
        self.assertFalse(os.path.lexists(os.path.join(d, 'more.qcow2')))
        mine = {'%s/e%d' % (self.remote.url, i) for i in range(self.CACHES_PER_USER)} | {self.remote.url + '/e-more'}
        self.assertEqual(len([p for p in self.client.managed_objects() if str(p).startswith(CACHE_PREFIX) and
                              self.client.get(p, IFACE_CACHE, 'URL') in mine]), self.CACHES_PER_USER)
        # Over one of their caches: made.
        r = provision('e0', 'again.qcow2')
        self.assertTrue(r['ok'], r)
        # Root is not held to it.
        self.client.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'ProvisionDisk', 'ssa{sv}', self.remote.url + '/e-root',
                         os.path.join(self.env.images, 'root.qcow2'),
                         dbus.Dictionary({'cache': dbus.Boolean(True)}, signature='sv'), timeout=120)
        # Who made which is kept across a restart.
        self.env.daemon.stop()
        self.env.daemon.start()
        r = provision('e-more', 'more.qcow2')
        self.assertEqual(r.get('error'), h.ERR_LIMITS_EXCEEDED, r)

if __name__ == '__main__':
    h.main()
