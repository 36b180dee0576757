#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""org.blockstream1.BlockStream.Export and org.blockstream1.Export, end to end: a running guest
(QEMU's own NBD server) and an offline one (the sandboxed storage helper), each behind the
sandboxed blockstream-nbd-relay. Real NBD clients (nbdinfo, nbdcopy, qemu-io) read exactly the
disk's content and cannot write; Clients counts them; Stop closes everything; a killed relay
makes the export "failed" and leaves the daemon and QEMU clean."""

import errno
import json
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import offline as o  # noqa: E402
from harness import MiB  # noqa: E402

SIZE = 64 * MiB
ZERO_CAPS = '0000000000000000'


class ExportTest(h.TestCase):

    @classmethod
    def setUpClass(cls):
        o.check_nbd_tools()
        super().setUpClass()

    # -- guests

    def running_guest(self):
        g = self.new_guest(size=SIZE)
        # The reference was made before QEMU started (Chain does that).
        g.expected_sha = o.file_sha256(g.chains['vda'].ref)
        return g

    def offline_guest(self):
        name = self.unique_name()
        chains = self.make_chains(('vda',), SIZE)
        path = self.register(name, '', o.offline_options({'vda': chains['vda'].top}))
        self.addCleanup(self.unregister_quietly, name)
        g = h.Guest(self, name, None, chains, path)
        g.expected_sha = o.chain_sha256(chains['vda'].top)
        return g

    def helper_uid(self, g):
        return o.identity(self.env, g.name)[0]

    def new_export(self, g, listen=None, disk='vda'):
        since = time.monotonic()
        path, uri = o.export(g.disk(disk), listen)
        self.addCleanup(self._stop_quietly, path)
        self.client.wait_for(lambda: [s for s in self.client.signals_of('InterfacesAdded', since=since)
                                      if s['args'][0] == path], 5, 'InterfacesAdded for %s' % path)
        return path, uri

    def _stop_quietly(self, path):
        if self.env.daemon.running():
            self.client.try_call(path, o.IFACE_EXPORT, 'Stop', timeout=10)

    def assert_no_qemu_exports(self, g):
        if g.qemu is not None:
            h.wait_until(lambda: g.qemu.qmp.cmd('query-block-exports') == [], 5,
                         'no block export left in QEMU (query-block-exports: %r)'
                         % g.qemu.qmp.cmd('query-block-exports'))

    def the_relay(self, g):
        uid = self.helper_uid(g)
        rs = h.wait_until(lambda: o.relays(self.env, uid), 5, 'the relay of %s (uid %d)' % (g.name, uid))
        self.assertEqual(len(rs), 1, rs)
        return rs[0]

    # -- the whole life of an export

    def _serve_read_stop(self, g):
        d = g.disk()
        c = g.chains['vda']
        path, uri = self.new_export(g)
        sock = o.unix_socket_of(uri)
        self.assertTrue(uri.startswith('nbd+unix:///'), uri)
        self.assertTrue(sock.startswith(self.env.daemon.runtime_dir + '/'), 'socket %s outside the runtime dir' % sock)
        self.assertTrue(os.path.exists(sock))
        p = o.export_props(self.client, path)
        self.assertEqual(p, {'URI': uri, 'Disk': d.path, 'Clients': 0, 'State': 'serving', 'Error': ''})
        self.assertIn(path, o.exports_on_bus(self.client))
        # Exactly the disk.
        self.assertEqual(o.nbd_size(uri), SIZE)
        self.assertEqual(o.nbd_sha256(uri), g.expected_sha, 'the export does not read as the disk')
        # Read-only.
        info = o.nbd_info(uri)
        exports = info.get('exports') or [info]
        self.assertTrue(exports[0].get('is_read_only'), 'the export is not read-only: %r' % info)
        r = h.run(['qemu-io', '-f', 'raw', '-c', 'write -P 0x99 0 512', uri], check=False)
        self.assertNotEqual(r.returncode, 0, 'qemu-io wrote to the export: %s%s' % (r.stdout, r.stderr))
        r = h.run(['qemu-io', '-f', 'raw', '-c', 'write -P 0x99 0 512', '--image-opts',
                   'driver=nbd,path=%s,export=%s' % (sock, uri.split('///')[1].split('?')[0])], check=False)
        self.assertNotEqual(r.returncode, 0, 'qemu-io wrote to the export: %s%s' % (r.stdout, r.stderr))
        self.assertEqual(o.nbd_sha256(uri), g.expected_sha, 'the export changed')
        # The relay: the guest's helper uid, confined.
        relay = self.the_relay(g)
        uid = self.helper_uid(g)
        self.assertEqual(relay.uids, [uid] * 4)
        self.assertEqual(relay.gids, [uid] * 4)
        self.assertEqual(relay.groups, [])
        for k in ('CapPrm', 'CapEff', 'CapBnd'):
            self.assertEqual(relay.status[k], ZERO_CAPS, '%s of the relay' % k)
        self.assertEqual((relay.status['NoNewPrivs'], relay.status['Seccomp']), ('1', '2'))
        for ns in ('mnt', 'net'):
            self.assertNotEqual(os.readlink('/proc/%d/ns/%s' % (relay.pid, ns)), os.readlink('/proc/self/ns/%s' % ns),
                                'the relay shares our %s namespace' % ns)
        self.assertFalse(os.path.exists('/proc/%d/root%s' % (relay.pid, c.top)), 'the image is visible to the relay')
        o.assert_limits(self, relay.pid, o.OWN_HELPER_LIMITS, 'the relay')
        # Stop.
        since = time.monotonic()
        self.assertIsNone(self.client.call(path, o.IFACE_EXPORT, 'Stop'))
        self.client.wait_for(lambda: [s for s in self.client.signals_of('InterfacesRemoved', since=since)
                                      if s['args'][0] == path], 5, 'InterfacesRemoved for %s' % path)
        self.assertNotIn(path, o.exports_on_bus(self.client))
        self.assertDBusError((h.ERR_UNKNOWN_OBJECT, h.ERR_UNKNOWN_METHOD, 'org.freedesktop.DBus.Error.UnknownInterface'),
                             self.client.get_all, path, o.IFACE_EXPORT)
        self.assertFalse(os.path.exists(sock), 'Stop left the socket %s' % sock)
        r = h.run(['nbdinfo', uri], check=False)
        self.assertNotEqual(r.returncode, 0, 'nbdinfo still reads a stopped export')
        o.wait_gone(relay.pid, 5, 'the relay to exit after Stop')
        self.assert_no_qemu_exports(g)
        return path

    def test_daemon_files_are_root_only(self):
        """Started from a shell's umask 022, the daemon still runs with 077 (as its unit's UMask=
        says): its state files, runtime directories and the export's socket are root's only."""
        self.env.stop_daemon()
        old = os.umask(0o022)
        try:
            self.env.start_daemon()
        finally:
            os.umask(old)
        with open('/proc/%d/status' % self.env.daemon.proc.pid) as f:
            umask = [line.split()[1] for line in f if line.startswith('Umask:')]
        self.assertEqual(umask, ['0077'], 'the daemon\'s umask')
        g = self.offline_guest()
        path, uri = self.new_export(g)
        sock = o.unix_socket_of(uri)
        self.the_relay(g)
        seen, open_to_others = [], []
        for top in (self.env.daemon.state_dir, self.env.daemon.runtime_dir):
            for d, dirs, files in os.walk(top):
                for p in [d] + [os.path.join(d, n) for n in files]:
                    st = os.lstat(p)
                    seen.append(p)
                    if st.st_mode & 0o077:
                        open_to_others.append('%s %o' % (p, st.st_mode & 0o7777))
        self.assertIn(sock, seen)
        self.assertIn(o.state_file(self.env, g.name), seen)
        self.assertEqual(open_to_others, [], 'the daemon made files others may use')

    def test_running_guest(self):
        g = self.running_guest()
        self._serve_read_stop(g)
        self.assertTrue(g.qemu.running(), 'the guest died')
        self.assertEqual(g.disk().prop('State'), 'idle')

    def test_unregister_while_serving_leaves_nothing_in_qemu(self):
        """UnregisterGuest with an export serving: the export object goes, the relay exits, and the
        guest's QEMU keeps neither our NBD server nor its exports (which would hold the disk's node
        and leave a listener nobody can reach)."""
        name = self.unique_name()
        chains = self.make_chains(('vda',), SIZE)
        q = self.start_qemu(chains, name=name)
        self.addCleanup(q.kill)
        path = self.register(name, q.daemon_socket)
        g = h.Guest(self, name, q, chains, path)
        epath, uri = self.new_export(g)
        relay = self.the_relay(g)
        self.assertNotEqual(q.qmp.cmd('query-block-exports'), [])
        self.assertIsNone(self.client.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'UnregisterGuest', 's', name))
        # UnregisterGuest answers once QEMU confirmed: no waiting here. (QEMU drops commands it
        # has read but not dispatched when the client goes: a daemon that closed right after
        # writing them left the export behind.)
        self.assertEqual(q.qmp.cmd('query-block-exports'), [])
        # QEMU runs no NBD server any more: the test's own can start one.
        sock = os.path.join(self.env.dir, name + '-probe.sock')
        q.qmp.cmd('nbd-server-start', addr={'type': 'unix', 'data': {'path': sock}})
        q.qmp.cmd('nbd-server-stop')
        o.wait_gone(relay.pid, 5, 'the relay to exit after UnregisterGuest')
        self.assertNotIn(epath, o.exports_on_bus(self.client))

    def test_offline_guest(self):
        g = self.offline_guest()
        self._serve_read_stop(g)
        h.wait_until(lambda: not o.guest_storage_helpers(self.env, g.name), 10,
                     'the storage helper to exit once its export stopped')
        self.assertEqual(h.image_check(g.chains['vda'].top)[0], 0)
        lines, text = o.getfattr_selinux(self.env.images, self.env.daemon.state_dir, self.env.daemon.runtime_dir)
        self.assertEqual(lines, [], 'security.selinux written although SELinux is off:\n' + text)

    def test_offline_relay_cannot_reach_the_storage_helper(self):
        """Issue 11: the relay faces untrusted NBD clients; the storage helper's QEMU holds the
        offline guest's image read-write. Both ran under the guest's one helper uid, so a relay
        taken over by a hostile client could signal that QEMU and open its /proc/PID/mem for
        writing (run code in it, with the image's fd). The storage helper has an identity of its
        own (uid = gid, from HelperUIDRange=), kept across restarts."""
        g = self.offline_guest()
        top = g.chains['vda'].top
        path, uri = self.new_export(g)
        relay = self.the_relay(g)
        storage = h.wait_until(lambda: o.storage_helper_of(self.env, top), 10, 'the storage helper holding ' + top)
        self.assertEqual(len(storage), 1, storage)
        storage = storage[0]
        # The relay still reaches the storage helper's NBD server (through the fds the daemon hands it).
        self.assertEqual(o.nbd_sha256(uri), g.expected_sha, 'the export does not read as the disk')
        ruid, rgid = relay.uids[0], relay.gids[0]
        suid, sgid = storage.uids[0], storage.gids[0]
        self.assertEqual((len(set(relay.uids)), len(set(relay.gids))), (1, 1), relay)
        self.assertEqual((len(set(storage.uids)), len(set(storage.gids))), (1, 1), storage)
        self.assertEqual(storage.groups, [])
        # Both processes alive at this moment: the relay's identity cannot touch the QEMU that holds
        # the image, nor the other way round.
        self.assertEqual(o.reach_as(self, ruid, rgid, storage.pid), [],
                         "the relay's identity (uid %d) reaches the storage helper (uid %d), and so the image"
                         % (ruid, suid))
        self.assertEqual(o.reach_as(self, suid, sgid, relay.pid), [],
                         "the storage helper's identity reaches the relay")
        # The test can tell: each identity reaches its own process (the relay is not dumpable: its
        # own uid may signal it, not write into it).
        self.assertEqual(o.reach_as(self, suid, sgid, storage.pid), ['signal', 'write memory'])
        self.assertEqual(o.reach_as(self, ruid, rgid, relay.pid), ['signal'])
        # Two identities of the guest, both from HelperUIDRange= (not its reserved top uid), in its
        # state record; uid = gid.
        self.assertNotEqual(ruid, suid)
        self.assertEqual((ruid, suid), (rgid, sgid))
        self.assertEqual(ruid, self.helper_uid(g))
        sid = o.storage_identity(self.env, g.name)
        self.assertEqual(sid[0], suid, 'the storage uid in the state record')
        self.assertLess(sid[1], sid[2])
        self.assertNotEqual(sid[1:], o.identity(self.env, g.name)[1:], 'one MCS pair for both identities')
        for uid in (ruid, suid):
            self.assertIn(uid, o.helper_uid_range(self.env), 'uid outside HelperUIDRange= (or in its probes\' top)')
        # Nothing in the guest's runtime dir belongs to either helper uid: the daemon hands the
        # helpers their sockets as fds.
        for d, dirs, files in os.walk(self.env.daemon.runtime_dir):
            for p in [d] + [os.path.join(d, n) for n in files]:
                st = os.lstat(p)
                self.assertEqual((st.st_uid, st.st_gid), (0, 0), p)

        # Stopped, the daemon restarted: the next storage helper of this guest has the same identity.
        self.assertIsNone(self.client.call(path, o.IFACE_EXPORT, 'Stop'))
        o.wait_gone(storage.pid, 10, 'the storage helper to exit once its export stopped')
        self.env.daemon.stop()
        self.env.daemon.start()
        path, uri = self.new_export(g)
        relay = self.the_relay(g)
        storage = h.wait_until(lambda: o.storage_helper_of(self.env, top), 10, 'the storage helper holding ' + top)
        self.assertEqual((relay.uids[0], storage[0].uids[0]), (ruid, suid), 'identities after a restart')
        self.assertEqual(o.storage_identity(self.env, g.name), sid)
        self.assertEqual(o.nbd_sha256(uri), g.expected_sha)

    def test_two_exports_of_one_disk(self):
        g = self.running_guest()
        p1, u1 = self.new_export(g)
        p2, u2 = self.new_export(g)
        self.assertNotEqual(p1, p2)
        self.assertNotEqual(u1, u2)
        self.assertEqual(o.nbd_sha256(u1), g.expected_sha)
        self.assertEqual(o.nbd_sha256(u2), g.expected_sha)
        self.client.call(p1, o.IFACE_EXPORT, 'Stop')
        self.assertEqual(o.nbd_sha256(u2), g.expected_sha, 'stopping one export broke the other')
        self.client.call(p2, o.IFACE_EXPORT, 'Stop')
        self.assert_no_qemu_exports(g)

    # -- an export serves its disk and nothing else

    def test_export_serves_only_its_disk(self):
        """Two disks, both exported, and a private export of QEMU's NBD server (like the daemon's
        map and range exports): vda's socket lists only vda, opens nothing else under any name,
        reads vda, and takes no write."""
        g = self.new_guest(aliases=('vda', 'vdb'), size=SIZE)
        g.expected_sha = o.file_sha256(g.chains['vda'].ref)
        pa, ua = self.new_export(g, disk='vda')
        pb, ub = self.new_export(g, disk='vdb')
        sock = o.unix_socket_of(ua)
        node = g.disk('vdb').prop('NodeName')
        g.qemu.qmp.cmd('block-export-add', {'type': 'nbd', 'id': 'bsm-test', 'name': 'bsm-test', 'writable': False,
                                            'node-name': node})
        self.addCleanup(lambda: g.qemu.qmp.cmd('block-export-del', id='bsm-test') if g.qemu.running() else None)
        # The export is what the listing shows, whatever name the URI carries.
        for u in (ua, 'nbd+unix:///?socket=' + sock, 'nbd+unix:///vdb?socket=' + sock):
            listed = json.loads(o.nbd(['nbdinfo', '--list', '--json', u]).stdout)
            names = [e.get('export-name') for e in listed.get('exports', [])]
            self.assertEqual(names, ['vda'], 'nbdinfo --list %s' % u)
        # Nothing else opens through it.
        for name in ('vdb', 'bsm-test', 'x', 'vda ', 'VDA'):
            r = h.run(['nbdinfo', '--json', 'nbd+unix:///%s?socket=%s' % (name, sock)], check=False)
            self.assertNotEqual(r.returncode, 0, 'export %r opened through vda\'s socket: %s' % (name, r.stdout))
        # Its own disk reads, under its name and as the default ("").
        info = o.nbd_info(ua)
        self.assertEqual(info['exports'][0]['export-name'], 'vda')
        self.assertTrue(info['exports'][0]['is_read_only'], info)
        self.assertEqual(o.nbd_sha256(ua), g.expected_sha)
        self.assertEqual(o.nbd_sha256('nbd+unix:///?socket=' + sock), g.expected_sha)
        # And a write fails.
        r = h.run(['qemu-io', '-f', 'raw', '-c', 'write -P 0x99 0 512', ua], check=False)
        self.assertNotEqual(r.returncode, 0, 'qemu-io wrote to the export: %s%s' % (r.stdout, r.stderr))
        self.assertEqual(o.nbd_sha256(ua), g.expected_sha, 'the export changed')
        # vdb's own socket serves vdb.
        listed = json.loads(o.nbd(['nbdinfo', '--list', '--json', ub]).stdout)
        self.assertEqual([e.get('export-name') for e in listed.get('exports', [])], ['vdb'])

    # -- a QEMU that stops accepting

    def test_qemu_not_accepting_blocks_nobody(self):
        """A guest's QEMU that stops accepting on its NBD listener (here: stopped, with its backlog
        full, as a hostile QEMU gets with listen(fd, 0)) must not hang the daemon in connect():
        another guest's properties are still served, the export's client is refused with a
        reason, and the export works again once QEMU accepts."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        somaxconn = int(open('/proc/sys/net/core/somaxconn').read())
        if hard < somaxconn + 1000:
            self.skipTest('RLIMIT_NOFILE %d is too small to fill a backlog of %d' % (hard, somaxconn))
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        g = self.running_guest()
        other = self.running_guest()
        path, uri = self.new_export(g)
        sock = o.unix_socket_of(uri)
        self.assertEqual(o.nbd_size(uri), SIZE)
        # Every Clients change so far is in (a Get answers after the signals sent before it).
        self.client.wait_prop(path, o.IFACE_EXPORT, 'Clients', 0, 10)
        nbd_dir = os.path.join(self.env.daemon.runtime_dir, 'nbd')
        servers = [os.path.join(nbd_dir, f) for f in os.listdir(nbd_dir) if f.startswith(g.name + '.')]
        self.assertEqual(len(servers), 1, servers)
        os.kill(g.qemu.proc.pid, signal.SIGSTOP)
        self.addCleanup(lambda: os.kill(g.qemu.proc.pid, signal.SIGCONT))
        fillers = []
        self.addCleanup(lambda: [f.close() for f in fillers])
        while len(fillers) < somaxconn + 1000:
            f = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            try:
                f.connect(servers[0])
            except BlockingIOError:
                f.close()
                break
            fillers.append(f)
        self.assertLessEqual(len(fillers), somaxconn + 1, 'the backlog of QEMU\'s NBD listener never filled')
        # A client of the export: the relay asks the daemon for a connection to QEMU. "Clients"
        # comes after that request, in order: once it shows 1, the daemon has handled it.
        since = time.monotonic()
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(60)
        c.connect(sock)
        self.client.wait_for(
            lambda: [ch for _, ch, _ in self.client.props_changed(path, o.IFACE_EXPORT, since) if ch.get('Clients') == 1],
            30, 'the daemon to take a client of an export whose QEMU does not accept')
        # The daemon answers about another guest at once (a hung daemon: a D-Bus timeout).
        self.assertEqual(self.client.call(other.path, h.IFACE_PROPS, 'Get', 'ss', h.IFACE_GUEST, 'Name', timeout=10),
                         other.name)
        # The client is refused (the daemon gives up on QEMU), not left hanging.
        self.assertEqual(c.recv(1), b'', 'the client of a QEMU that does not accept was not closed')
        c.close()
        h.wait_until(lambda: 'accepts no connection' in open(self.env.daemon.log, errors='replace').read(), 10,
                     'the daemon to log why it refused the client')
        self.assertEqual(self.client.get(path, o.IFACE_EXPORT, 'State'), 'serving')
        for f in fillers:
            f.close()
        os.kill(g.qemu.proc.pid, signal.SIGCONT)
        self.assertEqual(o.nbd_sha256(uri), g.expected_sha, 'the export does not serve once QEMU accepts again')
        self.client.call(path, o.IFACE_EXPORT, 'Stop')
        self.assert_no_qemu_exports(g)

    # -- TCP and Clients

    def _tcp_clients(self, g):
        port = o.free_tcp_port()
        path, uri = self.new_export(g, 'tcp:127.0.0.1:%d' % port)
        self.assertEqual(uri, 'nbd://127.0.0.1:%d/vda' % port)
        self.assertEqual(o.export_props(self.client, path)['URI'], uri)
        self.assertEqual(o.nbd_size(uri), SIZE)
        self.client.wait_prop(path, o.IFACE_EXPORT, 'Clients', 0, 5)
        since = time.monotonic()
        reader = o.SlowReader(uri)
        self.addCleanup(reader.kill)
        self.client.wait_prop(path, o.IFACE_EXPORT, 'Clients', 1, 10)
        self.client.pump(0.5)
        self.assertEqual(self.client.get(path, o.IFACE_EXPORT, 'Clients'), 1, 'nbdcopy --connections=1 is one client')
        rc, sha, err = reader.release()
        self.assertEqual(rc, 0, err)
        self.assertEqual(sha, g.expected_sha)
        self.client.wait_prop(path, o.IFACE_EXPORT, 'Clients', 0, 10)
        seen = [ch['Clients'] for _, ch, _ in self.client.props_changed(path, o.IFACE_EXPORT, since) if 'Clients' in ch]
        self.assertIn(1, seen, 'no PropertiesChanged announced Clients 1')
        self.assertEqual(seen[-1], 0, 'the last Clients announced is %r' % seen)
        self.client.call(path, o.IFACE_EXPORT, 'Stop')
        r = h.run(['nbdinfo', uri], check=False)
        self.assertNotEqual(r.returncode, 0, 'the TCP port still serves after Stop')
        self.assert_no_qemu_exports(g)

    def test_tcp_clients_are_kept_alive(self):
        """A TCP client whose host goes away without a word holds one of the relay's 64 places
        until TCP notices: the relay's connections have keepalive (60 s idle, then 6 probes 10 s
        apart), which ss shows as their timer. They had none: a vanished client's place was
        taken for good."""
        g = self.running_guest()
        port = o.free_tcp_port()
        path, uri = self.new_export(g, 'tcp:127.0.0.1:%d' % port)
        c = o.nbd_hold(('127.0.0.1', port))
        self.addCleanup(c.close)
        # Until the last handshake segment is acknowledged, ss shows the retransmission timer.
        seen = []

        def keepalive():
            seen[:] = [h.run(['ss', '-tnoH', 'state', 'established', '( sport = :%d )' % port]).stdout]
            return 'timer:(keepalive' in seen[0]
        try:
            h.wait_until(keepalive, 10, 'a keepalive timer on the relay\'s side of a TCP client')
        except AssertionError as e:
            raise AssertionError('%s; ss -tno: %r' % (e, seen)) from None

    def test_tcp_running_guest(self):
        self._tcp_clients(self.running_guest())

    def test_tcp_offline_guest(self):
        self._tcp_clients(self.offline_guest())

    # -- a relay that dies

    def _kill_relay(self, g):
        path, uri = self.new_export(g)
        self.assertEqual(o.nbd_size(uri), SIZE)
        relay = self.the_relay(g)
        since = time.monotonic()
        daemon_pid = self.env.daemon.proc.pid
        os.kill(relay.pid, signal.SIGKILL)
        self.client.wait_prop(path, o.IFACE_EXPORT, 'State', 'failed', 10)
        self.client.wait_for(lambda: [ch for _, ch, _ in self.client.props_changed(path, o.IFACE_EXPORT, since)
                                      if ch.get('State') == 'failed'], 5,
                             'a PropertiesChanged signal with State "failed"')
        self.assertIn('the NBD relay helper', self.client.get(path, o.IFACE_EXPORT, 'Error'))
        self.assertTrue(self.env.daemon.running(), 'the daemon died with the relay')
        self.assertEqual(self.env.daemon.proc.pid, daemon_pid)
        self.assertEqual(self.client.get(g.path, h.IFACE_GUEST, 'Name'), g.name, 'the daemon does not answer')
        o.wait_gone(relay.pid, 5, 'the killed relay to be reaped')
        r = h.run(['nbdinfo', uri], check=False)
        self.assertNotEqual(r.returncode, 0, 'a failed export still serves')
        self.assertFalse(os.path.exists(o.unix_socket_of(uri)), 'a failed export left its socket')
        self.assert_no_qemu_exports(g)
        # Stop removes the failed object.
        self.client.call(path, o.IFACE_EXPORT, 'Stop')
        self.assertNotIn(path, o.exports_on_bus(self.client))
        # And a new export works.
        p2, u2 = self.new_export(g)
        self.assertEqual(o.nbd_sha256(u2), g.expected_sha)
        self.client.call(p2, o.IFACE_EXPORT, 'Stop')
        self.assert_no_qemu_exports(g)

    def test_kill_relay_running_guest(self):
        g = self.running_guest()
        self._kill_relay(g)
        self.assertTrue(g.qemu.running())

    def test_relay_killed_while_the_storage_helper_takes_over(self):
        """The guest's QEMU goes while its disk is exported: the guest's storage helper starts to
        serve the export (a handoff). The relay is killed meanwhile, and the export fails. The
        helper, once it was there, was still given the export (review 32c: the wait for it was
        keyed by the export's address and looked at no state), so it held the disks, and the
        handoff never ended, until someone called Stop() on the failed export. It is let go now,
        and the guest waits for its QEMU again."""
        g = self.running_guest()
        path, _ = self.new_export(g)
        relay = self.the_relay(g)
        g.qemu.kill()
        self.client.wait_prop(g.path, h.IFACE_GUEST, 'Running', False, 30)
        os.kill(relay.pid, signal.SIGKILL)
        self.client.wait_prop(path, o.IFACE_EXPORT, 'State', 'failed', 30)
        self.assertIn('the NBD relay helper', self.client.get(path, o.IFACE_EXPORT, 'Error'))
        released = 'Guest %s: the storage helper let go of the disks; waiting for QEMU again.' % g.name

        def log():
            with open(self.env.daemon.log, errors='replace') as f:
                return f.read()
        h.wait_until(lambda: released in log(), 30, 'the storage helper to let go: the export it started for failed')
        self.assertEqual(o.guest_storage_helpers(self.env, g.name), [])
        q = self.env.new_qemu(g.name, [('vda', g.chains['vda'].top)])
        self.addCleanup(q.kill)
        self.client.wait_prop(g.path, h.IFACE_GUEST, 'Running', True, 90)

    def test_a_tcp_address_stays_taken_until_stop(self):
        """A TCP export whose relay died (failed) keeps its address until Stop(): the daemon let go
        of it when the relay said "ready", so the relay's death freed the port, and any local user
        could bind it and answer the export's clients (review 32c: a migration's destination,
        reconnecting, would copy their data into the guest)."""
        g = self.running_guest()
        port = o.free_tcp_port()
        path, _ = self.new_export(g, 'tcp:127.0.0.1:%d' % port)
        relay = self.the_relay(g)
        os.kill(relay.pid, signal.SIGKILL)
        self.client.wait_prop(path, o.IFACE_EXPORT, 'State', 'failed', 10)
        o.wait_gone(relay.pid, 5, 'the killed relay to be reaped')
        squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(squatter.close)
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with self.assertRaises(OSError) as cm:
            squatter.bind(('127.0.0.1', port))
        self.assertEqual(cm.exception.errno, errno.EADDRINUSE)
        # Holding an address, it counts among the guest's 8 exports (review 32d: failed ones piled
        # up, each with a listening socket).
        made = []
        for _ in range(7):
            made.append(o.export(g.disk())[0])
            self.addCleanup(lambda p=made[-1]: self.client.try_call(p, o.IFACE_EXPORT, 'Stop', timeout=10))
        self.assertDBusError(h.ERR_BUSY, o.export, g.disk())
        self.client.call(path, o.IFACE_EXPORT, 'Stop')
        squatter.bind(('127.0.0.1', port))
        p, _ = o.export(g.disk())
        self.client.call(p, o.IFACE_EXPORT, 'Stop')

    def test_kill_relay_offline_guest(self):
        g = self.offline_guest()
        self._kill_relay(g)
        h.wait_until(lambda: not o.guest_storage_helpers(self.env, g.name), 10,
                     'the storage helper to exit once no export is left')

    # -- bad options

    def test_bad_listen_refused(self):
        g = self.running_guest()
        d = g.disk()
        before = self.snapshot()
        bad = ['', 'tcp', 'tcp:', 'tcp:127.0.0.1', 'tcp:127.0.0.1:', 'tcp:127.0.0.1:0', 'tcp:127.0.0.1:65536',
               'tcp:127.0.0.1:-1', 'tcp:127.0.0.1:80x', 'tcp:localhost:10809', 'tcp:999.1.1.1:10809',
               'tcp:[::1:10809', 'unix:/tmp/evil.sock', 'udp:127.0.0.1:10809', 'vsock:2:10809',
               'tcp:127.0.0.1:10809' + 'x' * 100]
        for listen in bad:
            self.assertDBusError(h.ERR_INVALID_ARGS, o.export, d, listen)
        # Wrong types and unknown options.
        for opt in (h.opts(listen=h.U(1)), h.opts(port=h.S('10809')), h.opts(listen=h.S('unix'), writable=True)):
            self.assertDBusError(h.ERR_INVALID_ARGS, d.call, 'Export', 'a{sv}', opt)
        self.assertEqual(o.exports_on_bus(self.client), [])
        self.assertEqual(o.relays(self.env), [])
        self.assertSnapshotEqual(before, self.snapshot(), 'refused Export calls')
        self.assert_no_qemu_exports(g)


class ExportClientsTest(h.TestCase):
    """QEMU counts the connections to its NBD server, and a QEMU with the fix for CVE-2024-7409
    (Debian's 7.2 has it) takes at most 100 unless told otherwise: the exports' clients must not
    take the connections the daemon needs for the guest's own maps and streams."""

    MAP_TIMEOUT = 20
    daemon_config = 'MapTimeoutSec=%d\n' % MAP_TIMEOUT

    @classmethod
    def setUpClass(cls):
        o.check_nbd_tools()
        super().setUpClass()

    def test_export_clients_leave_qemu_room_for_a_map(self):
        g = self.new_guest(size=SIZE)
        d = g.disk()
        exports = [o.export(d) for _ in range(2)]
        for path, _ in exports:
            self.addCleanup(lambda p=path: self.client.try_call(p, o.IFACE_EXPORT, 'Stop', timeout=10))
        held = []
        self.addCleanup(lambda: [c.close() for c in held])
        # 64 on one export (all its relay takes), 36 on the other: 100 connections in QEMU.
        for k in range(100):
            held.append(o.nbd_hold(o.unix_socket_of(exports[0 if k < 64 else 1][1])))
        extents = d.call('GetAllocationMap', 'tt', h.T(0), h.T(0))
        self.assertTrue(extents, 'no map')
        self.assertEqual(extents[-1][0] + extents[-1][1], SIZE, extents)
        # And one client more still reaches the disk.
        held.append(o.nbd_hold(o.unix_socket_of(exports[1][1])))
        self.assertEqual(o.nbd_size(exports[1][1]), SIZE)

    def test_clients_come_and_go_at_the_relays_limit(self):
        """A relay at its 64 clients whose clients leave and others come: each new one gets its
        connection to QEMU (the daemon counts what the relay holds, and a relay that keeps to
        its places is never refused)."""
        g = self.new_guest(size=SIZE)
        path, uri = o.export(g.disk())
        self.addCleanup(lambda: self.client.try_call(path, o.IFACE_EXPORT, 'Stop', timeout=10))
        sock = o.unix_socket_of(uri)
        held = [o.nbd_hold(sock) for _ in range(64)]
        self.addCleanup(lambda: [c.close() for c in held])
        for _ in range(3):
            for c in held[:10]:
                c.close()
            self.client.wait_prop(path, o.IFACE_EXPORT, 'Clients', 54, 10)
            held[:10] = [o.nbd_hold(sock) for _ in range(10)]
            self.client.wait_prop(path, o.IFACE_EXPORT, 'Clients', 64, 10)
            c = held[0]
            c.sendall(o.nbd_request(o.NBD_CMD_READ, 1, 0, 4096))
            self.assertEqual(o.nbd_simple_read_reply(c, 4096)[0], 1)
        self.assertNotIn('asks for more connections', open(self.env.daemon.log, errors='replace').read())

    def test_exports_per_guest_are_bounded(self):
        """8 exports of a guest at most: their relays' 64 clients each take 512 of QEMU's 768
        connections, not all of them. A 9th gets Busy and leaves nothing behind."""
        g = self.new_guest(aliases=('vda', 'vdb'), size=SIZE)
        made = []
        for k in range(8):
            made.append(o.export(g.disk('vda' if k % 2 else 'vdb')))
            self.addCleanup(lambda p=made[-1][0]: self.client.try_call(p, o.IFACE_EXPORT, 'Stop', timeout=10))
        # The exports' state files are written by the daemon's writer thread after Export()
        # returned: compare once they are on disk.
        before = self.settled_snapshot()
        relays = sorted(r.pid for r in o.relays(self.env))
        self.assertEqual(len(relays), 8)
        for alias in ('vda', 'vdb'):
            self.assertDBusError(h.ERR_BUSY, o.export, g.disk(alias))
        self.assertEqual(o.exports_on_bus(self.client), sorted(p for p, _ in made))
        self.assertEqual(sorted(r.pid for r in o.relays(self.env)), relays)
        self.assertSnapshotEqual(before, self.settled_snapshot(), 'a refused 9th Export')
        # A failed export holds no relay and is not counted; another guest's are not either; one
        # stopped makes room again.
        os.kill(o.relays(self.env)[0].pid, signal.SIGKILL)
        h.wait_until(lambda: any(self.client.get(p, o.IFACE_EXPORT, 'State') == 'failed' for p, _ in made), 10,
                     'an export to fail with its relay')
        failed = [p for p, _ in made if self.client.get(p, o.IFACE_EXPORT, 'State') == 'failed']
        p, _ = o.export(g.disk('vda'))
        self.client.call(p, o.IFACE_EXPORT, 'Stop')
        self.client.call(failed[0], o.IFACE_EXPORT, 'Stop')
        made = [m for m in made if m[0] != failed[0]]
        other = self.new_guest(size=SIZE)
        p, _ = o.export(other.disk())
        self.client.call(p, o.IFACE_EXPORT, 'Stop')
        self.client.call(made[0][0], o.IFACE_EXPORT, 'Stop')
        p, u = o.export(g.disk('vdb'))
        self.addCleanup(lambda: self.client.try_call(p, o.IFACE_EXPORT, 'Stop', timeout=10))
        self.assertEqual(o.nbd_size(u), SIZE)


class ExportReadersTest(h.TestCase):
    """An export's client is anybody who reaches its address. QEMU reads up to 16 requests of a
    connection at once and holds a buffer of up to 32 MiB for each until its reply is sent; a
    client that asks and never reads the answers must not make the guest's QEMU hold that much
    on each of the relay's connections (64 of them: 32 GiB)."""

    READ = 32 * MiB
    REQUESTS = 16

    @classmethod
    def setUpClass(cls):
        o.check_nbd_tools()
        super().setUpClass()

    def test_a_client_that_never_reads_cannot_swell_qemu(self):
        g = self.new_guest(size=SIZE)
        d = g.disk()
        path, uri = o.export(d)
        self.addCleanup(lambda: self.client.try_call(path, o.IFACE_EXPORT, 'Stop', timeout=10))
        pid = g.qemu.proc.pid
        before = o.settled_rss_kib(pid)
        conns = [o.nbd_hold(o.unix_socket_of(uri)) for _ in range(2)]
        self.addCleanup(lambda: [c.close() for c in conns])
        for c in conns:
            c.sendall(b''.join(o.nbd_request(o.NBD_CMD_READ, k, 0, self.READ) for k in range(self.REQUESTS)))
        # QEMU answers on each (it has taken reads in), then its size settles.
        for c in conns:
            self.assertTrue(c.recv(1, socket.MSG_PEEK), 'no answer')
        grown = (o.settled_rss_kib(pid) - before) // 1024
        # Two connections, each with 16 reads of 32 MiB unanswered: 1 GiB in QEMU if all were let in.
        self.assertLess(grown, 256, 'QEMU grew by %d MiB for two clients that never read' % grown)
        # All of them are answered once the client reads, in order, with the disk's bytes.
        with open(g.chains['vda'].ref, 'rb') as f:
            want = f.read(self.READ)
        for c in conns:
            for k in range(self.REQUESTS):
                handle, data = o.nbd_simple_read_reply(c, self.READ)
                self.assertEqual(handle, k)
                self.assertTrue(data == want, 'read %d does not read as the disk' % k)
        self.assertTrue(g.qemu.running())


class QemuNbdClient:
    """QEMU's own NBD client (qemu-io's block/nbd.c, as a migration destination's -blockdev uses
    it) with reconnect-delay: one connection, kept open between commands, that re-opens the
    same address after it broke and holds the requests meanwhile. Commands go in on stdin, one
    at a time; each answer ends with the next prompt."""

    PROMPT = b'qemu-io> '

    def __init__(self, uri, reconnect_delay=90):
        if uri.startswith('nbd+unix:///'):
            name = uri[len('nbd+unix:///'):].split('?')[0]
            server = 'server.type=unix,server.path=%s' % o.unix_socket_of(uri)
        else:
            hostport, name = uri[len('nbd://'):].split('/', 1)
            host, port = hostport.rsplit(':', 1)
            server = 'server.type=inet,server.host=%s,server.port=%s' % (host, port)
        opts = 'driver=nbd,%s,export=%s,reconnect-delay=%d' % (server, name, reconnect_delay)
        self.proc = h.spawn(['qemu-io', '-r', '--image-opts', opts], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.out = b''
        self.answer(30)

    def send(self, cmd):
        self.proc.stdin.write(cmd.encode() + b'\n')
        self.proc.stdin.flush()

    def answer(self, timeout):
        """Everything up to the next prompt, within timeout seconds."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while self.PROMPT not in self.out:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError('qemu-io did not answer within %ds: %r' % (timeout, self.out))
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                b = os.read(fd, 65536)
                if not b:
                    raise AssertionError('qemu-io exited (%s): %r' % (self.proc.wait(5), self.out))
                self.out += b
        text, self.out = self.out.split(self.PROMPT, 1)
        return text.decode(errors='replace')

    def read_ok(self, test, pattern, offset, length, timeout):
        text = self.answer(timeout)
        test.assertIn('read %d/%d bytes at offset %d' % (length, length, offset), text,
                      'the NBD client saw an error reading 0x%02x at %d: %s' % (pattern, offset, text))
        test.assertNotIn('fail', text.lower(), text)

    def close(self):
        if self.proc.poll() is None:
            try:
                self.send('quit')
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


SILENT_HELPER = os.environ.get('SILENT_HELPER') or os.path.join(h.SOURCE_ROOT, 'build', 'tests', 'helpers',
                                                                  'silent-helper')


class SilentRelayTest(h.TestCase):
    """A relay that starts and never says "ready" (hung in its set-up, or compromised)."""
    env_per_test = True
    needs_daemon = False

    def setUp(self):
        super().setUp()
        self.start_daemon_with_helper(SILENT_HELPER, o.RELAY)

    def test_silent_relay(self):
        """Export() is answered (HelperFailed) when the relay never says ready, and nothing is left."""
        g = self.new_guest(size=SIZE)
        t0 = time.monotonic()
        res, err = self.client.try_call(g.disk().path, h.IFACE_STREAM, 'Export', 'a{sv}', h.no_opts(), timeout=60)
        self.assertIsNone(res, 'Export() succeeded with a relay that never said ready')
        self.assertEqual(err.name, o.ERR_HELPER_FAILED, err)
        self.assertIn('did not start', str(err))
        print('Export() answered after %.1f s' % (time.monotonic() - t0), file=sys.stderr)
        # Nothing left: no object, no relay, nothing in QEMU, no socket.
        self.assertEqual(o.exports_on_bus(self.client), [])
        h.wait_until(lambda: o.relays(self.env) == [], 10, 'the silent relay to be stopped')
        h.wait_until(lambda: g.qemu.qmp.cmd('query-block-exports') == [], 10, 'QEMU to drop the export')
        leftovers = [os.path.join(d, f) for d, _, files in os.walk(self.env.daemon.runtime_dir) for f in files
                     if f.endswith('.nbd')]
        self.assertEqual(leftovers, [], 'the export\'s socket is left behind')


class ExportRestartTest(h.TestCase):
    """An export outlives a daemon restart: the same object and URI come back, a client re-opens
    the same address and reads the disk, and QEMU's NBD client with reconnect-delay, in the middle
    of reading, sees no error."""

    env_per_test = True

    @classmethod
    def setUpClass(cls):
        o.check_nbd_tools()
        super().setUpClass()

    def new_export(self, g, listen=None):
        path, uri = o.export(g.disk(), listen)
        self.client.wait_prop(path, o.IFACE_EXPORT, 'State', 'serving', 10)
        return path, uri

    def restart(self, sig):
        if sig == signal.SIGKILL:
            self.assertEqual(self.env.kill_daemon(), -signal.SIGKILL)
        else:
            self.assertEqual(self.env.stop_daemon(sig), 0, 'blockstreamd did not exit cleanly')
        self.env.start_daemon()

    def wait_back(self, paths, timeout=60):
        self.client.wait_for(lambda: set(paths) <= set(o.exports_on_bus(self.client)), timeout,
                             'the exports %s back on the bus' % sorted(paths))

    def _restart_while_reading(self, sig, g):
        u = g.chains['vda'].u
        port = o.free_tcp_port()
        exports = [self.new_export(g), self.new_export(g, 'tcp:127.0.0.1:%d' % port)]
        self.assertTrue(exports[1][1].startswith('nbd://127.0.0.1:%d/vda' % port), exports[1][1])
        before = {p: o.export_props(self.client, p) for p, _ in exports}
        # QEMU's NBD client on each, reading (base: 0x11 over [0, 64u)).
        readers = []
        for path, uri in exports:
            r = QemuNbdClient(uri)
            self.addCleanup(r.close)
            r.send('read -P 0x11 0 %d' % u)
            r.read_ok(self, 0x11, 0, u, 30)
            self.client.wait_prop(path, o.IFACE_EXPORT, 'Clients', 1, 10)
            readers.append(r)
        self.restart(sig)
        # Asked while the daemon is down or starting: held by the client until it reconnected.
        for r in readers:
            r.send('read -P 0x11 %d %d' % (u, u))
        self.wait_back([p for p, _ in exports])
        for (path, uri), r in zip(exports, readers):
            p = o.export_props(self.client, path)
            self.assertEqual((p['URI'], p['Disk'], p['State']),
                             (before[path]['URI'], before[path]['Disk'], 'serving'), 'the export after the restart')
            r.read_ok(self, 0x11, u, u, 120)
            # And it reads on: the same connection, re-opened.
            r.send('read -P 0x11 %d %d' % (2 * u, 4 * u))
            r.read_ok(self, 0x11, 2 * u, 4 * u, 30)
            self.client.wait_prop(path, o.IFACE_EXPORT, 'Clients', 1, 10)
        # A new client of the same URI reads the whole disk.
        for path, uri in exports:
            self.assertEqual(o.nbd_sha256(uri), g.expected_sha, 'the export does not read as the disk after a restart')
        for (path, uri), r in zip(exports, readers):
            r.close()
            self.client.wait_prop(path, o.IFACE_EXPORT, 'Clients', 0, 10)
        # Stop ends them for good: nothing left in QEMU, no socket, and not back after a restart.
        for path, uri in exports:
            self.client.call(path, o.IFACE_EXPORT, 'Stop')
        self.assertFalse(os.path.exists(o.unix_socket_of(exports[0][1])))
        if g.qemu is not None:
            h.wait_until(lambda: g.qemu.qmp.cmd('query-block-exports') == [], 10, 'no block export left in QEMU')
        self.restart(signal.SIGTERM)
        self.client.wait_for(lambda: self.client.try_call(g.path, h.IFACE_PROPS, 'Get', 'ss', h.IFACE_GUEST,
                                                          'Name')[0] == g.name, 30, 'the guest back')
        self.assertEqual(o.exports_on_bus(self.client), [])
        self.assertEqual(o.relays(self.env), [])

    def running_guest(self):
        g = self.new_guest(size=SIZE)
        g.expected_sha = o.file_sha256(g.chains['vda'].ref)
        return g

    def test_sigterm_running_guest(self):
        self._restart_while_reading(signal.SIGTERM, self.running_guest())

    def test_sigkill_running_guest(self):
        self._restart_while_reading(signal.SIGKILL, self.running_guest())

    def test_sigkill_offline_guest(self):
        name = self.unique_name()
        chains = self.make_chains(('vda',), SIZE)
        path = self.register(name, '', o.offline_options({'vda': chains['vda'].top}))
        self.addCleanup(self.unregister_quietly, name)
        g = h.Guest(self, name, None, chains, path)
        g.expected_sha = o.chain_sha256(chains['vda'].top)
        self._restart_while_reading(signal.SIGKILL, g)

    def test_export_of_a_gone_guest_is_dropped(self):
        """The guest's QEMU went away while the daemon was down: its exports are not restored,
        their socket is removed, and they stay gone."""
        g = self.running_guest()
        path, uri = self.new_export(g)
        sock = o.unix_socket_of(uri)
        self.env.kill_daemon()
        g.qemu.kill()
        self.env.start_daemon()
        self.client.wait_for(lambda: self.client.try_call(g.path, h.IFACE_PROPS, 'Get', 'ss', h.IFACE_GUEST,
                                                          'Name')[0] == g.name, 30, 'the guest back')
        h.wait_until(lambda: not os.path.exists(sock), 30, 'the socket %s of the dropped export to go' % sock)
        self.assertNotIn(path, o.exports_on_bus(self.client))
        self.assertEqual(o.relays(self.env), [])
        self.env.stop_daemon()
        self.env.start_daemon()
        self.client.wait_for(lambda: self.client.try_call(g.path, h.IFACE_PROPS, 'Get', 'ss', h.IFACE_GUEST,
                                                          'Name')[0] == g.name, 30, 'the guest back')
        self.assertEqual(o.exports_on_bus(self.client), [])
        self.assertFalse(os.path.exists(sock))

    # -- a TCP address still taken at the restart (the old relay dying, or anybody)

    def _restart_with_port_taken(self):
        g = self.running_guest()
        port = o.free_tcp_port()
        path, uri = self.new_export(g, 'tcp:127.0.0.1:%d' % port)
        record = os.path.join(self.env.daemon.state_dir, 'exports', path.rsplit('/', 1)[1] + '.json')
        self.assertTrue(os.path.exists(record), 'no state record %s for a serving export' % record)
        self.assertEqual(self.env.stop_daemon(), 0)
        holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(holder.close)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(('127.0.0.1', port))
        holder.listen(1)
        log_start = os.path.getsize(self.env.daemon.log)
        self.env.start_daemon()
        h.wait_until(lambda: 'is in use, waiting' in self.log_since(log_start), 30,
                     'the daemon to wait for the address of the export')
        self.assertNotIn(path, o.exports_on_bus(self.client))
        return g, path, uri, record, holder

    def log_since(self, offset):
        with open(self.env.daemon.log, errors='replace') as f:
            f.seek(offset)
            return f.read()

    def test_tcp_port_freed_late_is_served_again(self):
        g, path, uri, record, holder = self._restart_with_port_taken()
        holder.close()
        self.wait_back([path])
        self.client.wait_prop(path, o.IFACE_EXPORT, 'State', 'serving', 10)
        self.assertEqual(o.export_props(self.client, path)['URI'], uri)
        self.assertEqual(o.nbd_sha256(uri), g.expected_sha)

    def test_tcp_port_kept_taken_drops_the_export(self):
        g, path, uri, record, holder = self._restart_with_port_taken()
        h.wait_until(lambda: not os.path.exists(record), 60, 'the export to be dropped (its record %s gone)' % record)
        self.assertNotIn(path, o.exports_on_bus(self.client))
        self.assertEqual(o.relays(self.env), [])
        h.wait_until(lambda: g.qemu.qmp.cmd('query-block-exports') == [], 10, 'no block export left in QEMU')
        # The guest and a new export of its disk are fine.
        p2, u2 = self.new_export(g)
        self.assertEqual(o.nbd_sha256(u2), g.expected_sha)


if __name__ == '__main__':
    h.main()
