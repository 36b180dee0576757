#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""A guest's QEMU that another manager uses too (issue 15, section 2: what libvirt's pull-mode
backup does), set up with plain QEMU through the test's own QMP monitor:

- a foreign NBD server already runs in QEMU: Export fails with Busy and leaves nothing behind
  (no export in QEMU, no socket, no object, no relay), the foreign server untouched;
- our export is deleted behind our back (block-export-del from another monitor): the Export
  object stops saying "serving", its relay and socket go;
- a foreign filter node on top of the disk (a backup job's copy-before-write filter): the disk's
  node is the image under it, and once the filter is gone the next operation works (node names
  are looked up afresh, not remembered); a filter put over the disk while its map is read fails
  the map with a clear error (through the filter QEMU counts every depth one deeper)."""

import json
import os
import signal
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import offline as o  # noqa: E402
from harness import MiB  # noqa: E402

SIZE = 64 * MiB


class ForeignTest(h.TestCase):

    @classmethod
    def setUpClass(cls):
        o.check_nbd_tools()
        super().setUpClass()

    def running_guest(self):
        g = self.new_guest(size=SIZE)
        g.expected_sha = o.file_sha256(g.chains['vda'].ref)
        return g

    def helper_uid(self, g):
        return o.identity(self.env, g.name)[0]

    def export_sockets(self, g):
        d = os.path.join(self.env.daemon.runtime_dir, 'guests', g.name)
        return sorted(f for f in os.listdir(d) if f.endswith('.nbd')) if os.path.isdir(d) else []

    def stop_quietly(self, path):
        if self.env.daemon.running():
            self.client.try_call(path, o.IFACE_EXPORT, 'Stop', timeout=10)

    def export_ok(self, g):
        path, uri = o.export(g.disk())
        self.addCleanup(self.stop_quietly, path)
        self.assertEqual(o.export_props(self.client, path)['State'], 'serving')
        self.assertEqual(o.nbd_sha256(uri), g.expected_sha, 'the export does not read as the disk')
        return path, uri

    def start_foreign_server(self, g):
        sock = os.path.join(g.qemu.dir, 'foreign-nbd.sock')
        g.qemu.qmp.cmd('nbd-server-start', addr={'type': 'unix', 'data': {'path': sock}})
        return sock

    # -- a foreign NBD server

    def test_foreign_nbd_server_refuses_export(self):
        g = self.running_guest()
        sock = self.start_foreign_server(g)
        node = g.disk().prop('NodeName')

        _, err = g.disk().try_call('Export', 'a{sv}', h.no_opts())
        self.assertIsNotNone(err, 'Export succeeded although QEMU runs an NBD server we did not start '
                                  '(its export landed on the other server)')
        self.assertEqual(err.name, h.ERR_BUSY, err)
        self.assertIn('NBD server', err.message)
        # Nothing left: no export in QEMU, no object, no socket, no relay.
        self.assertEqual(g.qemu.qmp.cmd('query-block-exports'), [])
        self.assertEqual(o.exports_on_bus(self.client), [])
        self.assertEqual(self.export_sockets(g), [])
        self.assertEqual(o.relays(self.env, self.helper_uid(g)), [])
        # The foreign server is untouched: still running, and it serves what its owner adds.
        with self.assertRaises(h.QMPError):
            g.qemu.qmp.cmd('nbd-server-start', addr={'type': 'unix', 'data': {'path': sock + '.2'}})
        g.qemu.qmp.cmd('block-export-add', {'type': 'nbd', 'id': 'foreign-e', 'name': 'foreign',
                                            'node-name': node, 'writable': False})
        self.assertEqual(o.nbd_sha256('nbd+unix:///foreign?socket=' + sock), g.expected_sha)
        g.qemu.qmp.cmd('block-export-del', id='foreign-e')
        # Once its owner stops it, Export works (no failed server of ours remembered).
        g.qemu.qmp.cmd('nbd-server-stop')
        path, _ = self.export_ok(g)
        self.client.call(path, o.IFACE_EXPORT, 'Stop')
        h.wait_until(lambda: g.qemu.qmp.cmd('query-block-exports') == [], 10, 'our export to leave QEMU')

    # -- our export deleted behind our back

    def test_export_deleted_behind_our_back(self):
        g = self.running_guest()
        path, uri = self.export_ok(g)
        relay = h.wait_until(lambda: o.relays(self.env, self.helper_uid(g)), 5, 'the relay')[0]
        sock = o.unix_socket_of(uri)
        ids = [e['id'] for e in g.qemu.qmp.cmd('query-block-exports')]
        self.assertEqual(len(ids), 1, ids)

        g.qemu.qmp.cmd('block-export-del', id=ids[0])

        def ended():
            if path not in o.exports_on_bus(self.client):
                return True
            return o.export_props(self.client, path)['State'] == 'failed'
        self.client.wait_for(ended, 10, 'the export to stop saying "serving" after block-export-del')
        o.wait_gone(relay.pid, 10, 'the relay to exit')
        self.assertFalse(os.path.exists(sock), 'the export\'s socket is left')
        # Our NBD server, unused now, is stopped: the test can start its own.
        h.wait_until(lambda: self._can_start_server(g), 10, 'QEMU to run no NBD server of ours')

    def test_our_server_stopped_behind_our_back(self):
        """Another monitor stops QEMU's NBD server (ours): the export stops saying "serving", and
        the next Export starts a server again and works."""
        g = self.running_guest()
        path, uri = self.export_ok(g)
        relay = h.wait_until(lambda: o.relays(self.env, self.helper_uid(g)), 5, 'the relay')[0]

        g.qemu.qmp.cmd('nbd-server-stop')

        def ended():
            if path not in o.exports_on_bus(self.client):
                return True
            return o.export_props(self.client, path)['State'] == 'failed'
        self.client.wait_for(ended, 10, 'the export to stop saying "serving" after nbd-server-stop')
        o.wait_gone(relay.pid, 10, 'the relay to exit')
        self.assertFalse(os.path.exists(o.unix_socket_of(uri)), 'the export\'s socket is left')
        path2, _ = self.export_ok(g)
        self.client.call(path2, o.IFACE_EXPORT, 'Stop')
        h.wait_until(lambda: g.qemu.qmp.cmd('query-block-exports') == [], 10, 'our export to leave QEMU')

    def _can_start_server(self, g):
        try:
            g.qemu.qmp.cmd('nbd-server-start',
                           addr={'type': 'unix', 'data': {'path': os.path.join(g.qemu.dir, 'probe.sock')}})
        except h.QMPError:
            return False
        g.qemu.qmp.cmd('nbd-server-stop')
        return True

    # -- a foreign filter node on top of the disk

    def add_backup_filter(self, g):
        """A backup job with a named copy-before-write filter over the disk's node, as libvirt's
        pull-mode backup puts one there."""
        target = os.path.join(g.qemu.dir, 'fleece.qcow2')
        h.run(['qemu-img', 'create', '-q', '-f', 'qcow2', target, str(SIZE)])
        q = g.qemu.qmp
        q.cmd('blockdev-add', {'driver': 'file', 'filename': target, 'node-name': 'fleece-file'})
        q.cmd('blockdev-add', {'driver': 'qcow2', 'file': 'fleece-file', 'node-name': 'fleece'})
        q.cmd('blockdev-backup', {'job-id': 'foreign-backup', 'device': 'disk0', 'target': 'fleece',
                                  'sync': 'none', 'filter-node-name': 'foreign-cbw'})
        self.assertEqual(q.cmd('query-block')[0]['inserted']['node-name'], 'foreign-cbw')

    def remove_backup_filter(self, g):
        q = g.qemu.qmp
        q.cmd('block-job-cancel', device='foreign-backup')
        h.wait_until(lambda: q.cmd('query-block-jobs') == [], 10, 'the foreign backup job to go')
        self.assertEqual(q.cmd('query-block')[0]['inserted']['node-name'], 'disk0')
        q.cmd('blockdev-del', **{'node-name': 'fleece'})
        q.cmd('blockdev-del', **{'node-name': 'fleece-file'})

    def test_filter_over_the_disk_is_skipped(self):
        """The filter is there when the guest registers: the disk is the image under it (its node,
        path and chain), Export and GetAllocationMap work through it; once the filter is gone, the
        next Export and Start work (the filter's node name was not remembered)."""
        name = self.unique_name()
        chains = self.make_chains(('vda',), SIZE)
        q = self.start_qemu(chains, name=name)
        g = h.Guest(self, name, q, chains, None)
        g.expected_sha = o.file_sha256(chains['vda'].ref)
        self.add_backup_filter(g)
        g.path = self.register(name, q.daemon_socket)
        self.addCleanup(self.unregister_quietly, name)
        c = chains['vda']
        d = g.disk()
        self.assertEqual(d.prop('NodeName'), 'disk0', 'the filter was taken for the disk')
        self.assertEqual(d.prop('Path'), c.top)
        self.assertEqual(list(d.prop('BackingChain')), [c.mid, c.base])

        path, _ = self.export_ok(g)
        self.client.call(path, o.IFACE_EXPORT, 'Stop')
        h.wait_until(lambda: q.qmp.cmd('query-block-exports') == [], 10, 'our export to leave QEMU')
        extents = d.call('GetAllocationMap', 'tt', h.T(0), h.T(SIZE))
        self.assertTrue(extents, 'no allocation map through the filter')

        self.remove_backup_filter(g)
        path, _ = self.export_ok(g)
        self.client.call(path, o.IFACE_EXPORT, 'Stop')
        h.wait_until(lambda: q.qmp.cmd('query-block-exports') == [], 10, 'our export to leave QEMU')
        since = time.monotonic()
        d.start()
        res, _, err = d.wait_finished(120, since)
        self.assertEqual((res, err), ('completed', ''))
        self.assertEqual(list(d.prop('BackingChain')), [])

    def test_filter_added_after_registration(self):
        """A filter put on top while we are attached, seen by a Refresh: Export works through it;
        then the filter goes behind our back and the next Export works (no stale node name)."""
        g = self.running_guest()
        self.add_backup_filter(g)
        self.client.call(g.path, h.IFACE_GUEST, 'Refresh')
        self.assertEqual(g.disk().prop('NodeName'), 'disk0', 'the filter was taken for the disk')
        path, _ = self.export_ok(g)
        self.client.call(path, o.IFACE_EXPORT, 'Stop')
        h.wait_until(lambda: g.qemu.qmp.cmd('query-block-exports') == [], 10, 'our export to leave QEMU')
        self.remove_backup_filter(g)
        path, _ = self.export_ok(g)

    def base_depth(self, extents, c):
        """The depth the map gives the base's 0x12 run, [176u, 192u): 3 (top, mid, base)."""
        off = 180 * c.u
        return [e[2] for e in extents if e[0] <= off < e[0] + e[1]]

    @unittest.skipUnless(os.environ.get('BLOCKSTREAM_TEST_HOOKS') == '1',
                         'the daemon is built without its test hooks (meson -Dtest_hooks=true)')
    def test_filter_put_over_the_disk_while_its_map_is_read(self):
        """The daemon stopped once the map's export is in QEMU (test hook), a backup filter put over
        the disk, the daemon let go: the export now reads through the filter, whose depths are one
        deeper; the map fails with a clear error instead of that map. With the filter there before
        the map, the map reads the disk under it and is right."""
        g, c, d, p = self.map_until_the_hook('BLOCKSTREAM_TEST_MAP_STOP', 'export')
        self.add_backup_filter(g)
        os.kill(self.env.daemon.proc.pid, signal.SIGCONT)
        out, err = p.communicate(timeout=60)
        if p.returncode == 0:
            self.fail('the map read through the filter was returned (base depth %r, want [3])'
                      % self.base_depth(json.loads(out)['data'][0], c))
        self.assertIn('changed while its map was read', err)
        # Without the hook: with the filter there before the call, the map is the disk's.
        self.default_daemon()
        self.client.wait_for(lambda: self.client.try_call(h.MANAGER_PATH, h.IFACE_MANAGER, 'GetGuest', 's',
                                                          g.name)[0] == g.path, 30, 'the guest to be republished')
        self.assertEqual(self.base_depth(d.call('GetAllocationMap', 'tt', h.T(0), h.T(0)), c), [3])
        self.remove_backup_filter(g)
        self.assertEqual(self.base_depth(d.call('GetAllocationMap', 'tt', h.T(0), h.T(0)), c), [3])

    @unittest.skipUnless(os.environ.get('BLOCKSTREAM_TEST_HOOKS') == '1',
                         'the daemon is built without its test hooks (meson -Dtest_hooks=true)')
    def test_daemon_killed_with_its_server_stop_unsent(self):
        """A map done, its NBD server's stop queued but not yet sent when the daemon is killed
        (test hook: SIGSTOP right after queueing it): the server runs on in QEMU. The record said
        it was gone, so the next daemon took that server for someone else's and refused every
        map and export of the guest ("QEMU already runs an NBD server that blockstreamd did not
        start"); it is now kept until QEMU answered the stop, and the next daemon stops the server
        first. (Found as a flaky ForeignTest: SIGTERM between the stop's queueing and its answer.)"""
        g, c, d, p = self.map_until_the_hook('BLOCKSTREAM_TEST_NBD_STOP', 'queued')
        self.env.kill_daemon()
        self.default_daemon()
        self.client.wait_for(lambda: self.client.try_call(h.MANAGER_PATH, h.IFACE_MANAGER, 'GetGuest', 's',
                                                          g.name)[0] == g.path, 30, 'the guest to be republished')
        self.assertEqual(self.base_depth(d.call('GetAllocationMap', 'tt', h.T(0), h.T(0)), c), [3])
        self.export_ok(g)

    def test_a_server_of_ours_is_stopped_only_in_its_qemu(self):
        """The record that a server of ours may still run (the daemon killed before its stop went
        out) is of one QEMU: one started anew at the same socket while the daemon was away runs
        none of ours, and the server it runs (libvirt's pull-mode backup's) was stopped by the next
        daemon all the same."""
        g, c, d, p = self.map_until_the_hook('BLOCKSTREAM_TEST_NBD_STOP', 'queued')
        self.env.kill_daemon()
        g.qemu.kill()
        g.qemu.start()
        sock = self.start_foreign_server(g)
        self.default_daemon()
        self.client.wait_for(lambda: self.client.try_call(h.MANAGER_PATH, h.IFACE_MANAGER, 'GetGuest', 's',
                                                          g.name)[0] == g.path, 30, 'the guest to be republished')
        self.client.wait_prop(g.path, h.IFACE_GUEST, 'Running', True)
        # Everything the reconnect sends is answered by the time a Refresh is.
        self.client.call(g.path, h.IFACE_GUEST, 'Refresh')
        with self.assertRaises(h.QMPError, msg='the foreign NBD server was stopped'):
            g.qemu.qmp.cmd('nbd-server-start', addr={'type': 'unix', 'data': {'path': sock + '.2'}})

    def map_until_the_hook(self, hook, value):
        """A daemon with test hook `hook=value`, a running guest, and a GetAllocationMap (busctl, in
        the background) that runs until the daemon stops itself at the hook (SIGSTOP). Returns the
        guest, its chain, its disk and the busctl process."""
        self.env.restart_daemon_with(hook, value)
        self.addCleanup(self.default_daemon)
        g = self.running_guest()
        c = g.chains['vda']
        d = g.disk()
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=self.env.bus.address)
        p = subprocess.Popen(['busctl', '--system', '--json=short', 'call', h.BUS_NAME, d.path, h.IFACE_STREAM,
                              'GetAllocationMap', 'tt', '0', '0'],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, env=env)
        self.addCleanup(lambda: p.poll() is None and (p.kill(), p.wait(10)))
        pid = self.env.daemon.proc.pid

        def stopped():
            with open('/proc/%d/stat' % pid) as f:
                return f.read().rsplit(')', 1)[1].split()[0] == 'T'
        h.wait_until(stopped, 60, 'the daemon to stop at its test hook')
        return g, c, d, p

    def default_daemon(self):
        self.env.stop_daemon()
        self.env.start_daemon()

    # -- the disk's node replaced behind our back

    def replace_node(self, g):
        """What `virsh blockcopy --shallow --pivot` does: a mirror of the top onto a new overlay
        of the same backing, pivoted; the old node deleted. Nothing of ours is told."""
        c = g.chains['vda']
        q = g.qemu.qmp
        copy = os.path.join(g.qemu.dir, 'copy.qcow2')
        h.run(['qemu-img', 'create', '-q', '-f', 'qcow2', '-b', c.mid, '-F', 'qcow2', copy, str(SIZE)])
        q.cmd('blockdev-add', {'driver': 'file', 'filename': copy, 'node-name': 'copy-file'})
        q.cmd('blockdev-add', {'driver': 'qcow2', 'file': 'copy-file', 'node-name': 'copy0',
                               'backing': q.node_of_file(c.mid)})
        q.cmd('blockdev-mirror', {'job-id': 'foreign-copy', 'device': 'disk0', 'target': 'copy0', 'sync': 'top'})
        h.wait_until(lambda: [j for j in q.cmd('query-block-jobs') if j.get('ready')], 30, 'the copy to be ready')
        q.cmd('job-complete', id='foreign-copy')
        h.wait_until(lambda: q.cmd('query-block-jobs') == [], 30, 'the copy to pivot')
        self.assertEqual(q.cmd('query-block')[0]['inserted']['node-name'], 'copy0')
        q.cmd('blockdev-del', **{'node-name': 'disk0'})
        q.cmd('blockdev-del', **{'node-name': 'file0'})

    def test_node_replaced_then_map_and_export(self):
        """The disk's node replaced by another manager (a pivoted copy): GetAllocationMap, then
        Export, use the node QEMU has now, not the one remembered."""
        g = self.running_guest()
        d = g.disk()
        self.assertEqual(d.prop('NodeName'), 'disk0')
        self.replace_node(g)
        extents = d.call('GetAllocationMap', 'tt', h.T(0), h.T(SIZE))
        self.assertTrue(extents, 'no allocation map after the node changed')
        self.assertEqual(d.prop('NodeName'), 'copy0')
        path, _ = self.export_ok(g)
        self.client.call(path, o.IFACE_EXPORT, 'Stop')
        h.wait_until(lambda: g.qemu.qmp.cmd('query-block-exports') == [], 10, 'our export to leave QEMU')

    def test_node_replaced_then_start(self):
        """The same, and Start first: the stream runs on the node QEMU has now."""
        g = self.running_guest()
        d = g.disk()
        self.assertEqual(d.prop('NodeName'), 'disk0')
        self.replace_node(g)
        since = time.monotonic()
        d.start()
        res, _, err = d.wait_finished(120, since)
        self.assertEqual((res, err), ('completed', ''))
        self.assertEqual(d.prop('NodeName'), 'copy0')
        self.assertEqual(list(d.prop('BackingChain')), [])


if __name__ == '__main__':
    h.main()
