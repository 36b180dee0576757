#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Self-test of the harness without the daemon: the private bus and its policy, the image
chain and its reference, QEMU and the harness's QMP client (a block-stream run by hand)."""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402


class HarnessSelfTest(h.TestCase):
    needs_daemon = False

    def test_bus_and_policy(self):
        c = self.client
        self.assertTrue(c.name_has_owner('org.freedesktop.DBus'))
        # The project's policy is included: only root may own the name.
        r = h.call_as(h.STRANGER, self.env.bus.address, '/org/freedesktop/DBus', 'org.freedesktop.DBus',
                      'RequestName', 'su', '("org.blockstream1", dbus.UInt32(0))', dest='org.freedesktop.DBus')
        self.assertFalse(r['ok'], r)
        self.assertEqual(r['error'], h.ERR_ACCESS_DENIED, r)
        self.assertNotEqual(r['uid'], 0)
        # ... and root may.
        got = c.call('/org/freedesktop/DBus', 'org.freedesktop.DBus', 'RequestName', 'su', 'org.blockstream1',
                     h.U(0), dest='org.freedesktop.DBus')
        self.assertEqual(got, 1)    # primary owner
        c.call('/org/freedesktop/DBus', 'org.freedesktop.DBus', 'ReleaseName', 's', 'org.blockstream1',
               dest='org.freedesktop.DBus')
        c.wait_for(lambda: c.signals_of('NameOwnerChanged'), 5, 'NameOwnerChanged recorded')

    def test_path_escape(self):
        self.assertEqual(h.path_escape('vda'), 'vda')
        self.assertEqual(h.path_escape('test-1'), 'test_2d1')
        self.assertEqual(h.path_escape('1a'), '_31a')
        self.assertEqual(h.path_escape('a_b'), 'a_5fb')
        self.assertEqual(h.path_escape('..x'), '_2e_2ex')
        self.assertEqual(h.path_escape(''), '_')

    def test_chain_patterns_and_compare(self):
        c = h.Chain(os.path.join(self.env.images, 'c1'), 64 * h.MiB)
        u = c.u
        self.assertEqual(h.image_backing(c.top), c.mid)
        self.assertEqual(h.image_backing(c.mid), c.base)
        for pat, off, ln in [(0x11, 0, 32 * u), (0x24, 32 * u, 4 * u), (0x35, 36 * u, 2 * u), (0x24, 38 * u, 2 * u),
                             (0x11, 40 * u, 8 * u), (0x00, 48 * u, 4 * u), (0x11, 52 * u, 12 * u),
                             (0x22, 64 * u, 16 * u), (0x36, 80 * u, 2 * u), (0x22, 82 * u, 14 * u),
                             (0x00, 96 * u, 32 * u), (0x33, 128 * u, 16 * u), (0x12, 176 * u, 16 * u),
                             (0x00, 192 * u, 64 * u)]:
            self.assertTrue(h.read_matches(c.top, pat, off, ln), 'pattern 0x%02x at %d' % (pat, off))
            self.assertTrue(h.read_matches(c.ref, pat, off, ln, fmt='raw'), 'ref pattern 0x%02x at %d' % (pat, off))
        self.assertFalse(h.read_matches(c.top, 0x11, 48 * u, u))
        rc, out = c.compare()
        self.assertEqual(rc, 0, out)
        # The comparison does see a difference.
        h.qemu_io(c.top, 'write -P 0x99 %d 4096' % (100 * u))
        rc, out = c.compare()
        self.assertEqual(rc, 1, out)
        c.apply_to_reference(0x99, 100 * u, 4096)
        rc, out = c.compare()
        self.assertEqual(rc, 0, out)
        # Depths: the top holds its own data, base data sits two levels down.
        self.assertEqual(h.depths_in(c.top, 128 * u, 16 * u), {0})
        self.assertEqual(h.depths_in(c.top, 176 * u, 16 * u), {2})

    def test_qemu_block_stream_by_hand(self):
        chains = self.make_chains(('vda', 'vdb'), 64 * h.MiB)
        q = self.start_qemu(chains)
        blocks = {b['qdev']: b for b in q.qmp.cmd('query-block')}
        self.assertIn('/machine/peripheral/vda/virtio-backend', blocks)
        self.assertIn('/machine/peripheral/vdb/virtio-backend', blocks)
        self.assertEqual(blocks['/machine/peripheral/vda/virtio-backend']['inserted']['node-name'], 'disk0')
        c = chains['vda']
        self.assertEqual(q.qmp.node_of_file(c.top), 'disk0')
        base_node = q.qmp.node_of_file(c.base)
        # Rate-limited stream so that guest writes land mid-job.
        q.qmp.cmd('block-stream', {'job-id': 'j0', 'device': 'disk0', 'speed': 8 * h.MiB, 'auto-dismiss': False})
        time.sleep(0.3)
        jobs = q.qmp.jobs()
        self.assertEqual(len(jobs), 1, jobs)
        self.assertEqual(jobs[0]['status'], 'running')
        q.guest_write('vda', 0x77, 50 * c.u, c.u)
        c.apply_to_reference(0x77, 50 * c.u, c.u)
        self.assertTrue(q.guest_read('vda', 0x77, 50 * c.u, c.u))
        self.assertFalse(q.guest_read('vda', 0x78, 50 * c.u, c.u))
        q.qmp.cmd('block-job-set-speed', device='j0', speed=0)
        h.wait_until(lambda: q.qmp.jobs()[0]['status'] == 'concluded', 30, 'job concluded')
        q.qmp.cmd('job-dismiss', id='j0')
        self.assertEqual(q.qmp.jobs(), [])
        self.assertIsNone(h.image_backing(c.top))
        # vdb: stream down to base only.
        c2 = chains['vdb']
        q.qmp.cmd('block-stream', {'job-id': 'j1', 'device': 'disk1', 'base-node': q.qmp.node_of_file(c2.base)})
        h.wait_until(lambda: q.qmp.jobs() == [], 30, 'job j1 gone')
        self.assertEqual(h.image_backing(c2.top), c2.base)
        q.quit()
        rc, out = c.compare()
        self.assertEqual(rc, 0, out)
        self.assertTrue(h.read_matches(c.top, 0x77, 50 * c.u, c.u))
        self.assertEqual(h.image_check(c.top)[0], 0)
        rc, out = c2.compare()
        self.assertEqual(rc, 0, out)
        self.assertEqual(h.depths_in(c2.top, 176 * c2.u, 16 * c2.u), {1})
        self.assertEqual(h.depths_in(c2.top, 64 * c2.u, 32 * c2.u), {0})

    def test_qemu_killed_mid_stream(self):
        chains = self.make_chains(('vda',), 64 * h.MiB)
        q = self.start_qemu(chains)
        q.qmp.cmd('block-stream', {'job-id': 'j0', 'device': 'disk0', 'speed': 4 * h.MiB})
        time.sleep(1)
        self.assertGreater(q.qmp.jobs()[0]['offset'], 0)
        q.kill()
        rc, out = h.image_check(chains['vda'].top)
        self.assertIn(rc, (0, 3), out)
        rc, out = chains['vda'].compare()
        self.assertEqual(rc, 0, out)

    def test_stranger_user(self):
        r = h.run_as(h.STRANGER, ['id', '-u'])
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertNotEqual(r.stdout.strip(), '0')


if __name__ == '__main__':
    h.main()
