#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""The guest-latency mode's refusals (issue 13): bad values of max_guest_latency and of
SetMaxGuestLatency, and guests that are not running (no guest to follow), are refused with
InvalidArgs and nothing half-done: no job, no histogram on the device, the same properties and
state. The mode at work under a real guest is test_guest.py's."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import offline as o  # noqa: E402
from harness import T, S, opts  # noqa: E402

INVALID = 'org.freedesktop.DBus.Error.InvalidArgs'
QDEV = '/machine/peripheral/vda/virtio-backend'


def histogram_of(q):
    stats = [s for s in q.qmp.cmd('query-blockstats') if s.get('qdev') == QDEV]
    assert len(stats) == 1, stats
    return stats[0]['stats'].get('rd_latency_histogram')


class AdaptiveRefusalTest(h.TestCase):

    def test_bad_values_are_refused_with_nothing_done(self):
        g = self.new_guest()
        d = g.disk()
        before = self.snapshot(block_graph=True)
        for bad in (T(60000001), T(2 ** 63), T(2 ** 64 - 1)):
            self.assertDBusError(INVALID, d.start, 0, 0, opts(max_guest_latency=bad))
            self.assertDBusError(INVALID, d.call, 'SetMaxGuestLatency', 't', bad)
        # The wrong type is refused too, not ignored.
        self.assertDBusError(INVALID, d.start, 0, 0, opts(max_guest_latency=S('2ms')))
        self.assertSnapshotEqual(before, self.snapshot(block_graph=True), 'a refused max_guest_latency')
        self.assertIsNone(histogram_of(g.qemu))
        self.assertEqual(d.prop('MaxGuestLatency'), 0)
        self.assertEqual(d.prop('ThrottleReason'), 'off')

        # With no job, a good value is the default for the next job, and 0 takes it back.
        d.call('SetMaxGuestLatency', 't', T(2000))
        self.assertEqual(d.prop('MaxGuestLatency'), 2000)
        d.call('SetMaxGuestLatency', 't', T(0))
        self.assertEqual(d.prop('MaxGuestLatency'), 0)
        self.assertIsNone(histogram_of(g.qemu))

    def test_offline_guest_refuses_the_mode(self):
        o.check_nbd_tools()
        name = self.unique_name()
        chains = self.make_chains(('vda',), 64 * h.MiB)
        self.register(name, '', o.offline_options({a: c.top for a, c in chains.items()}))
        self.addCleanup(self.unregister_quietly, name)
        d = h.Disk(self.client, h.disk_path(name, 'vda'))
        before = self.snapshot()
        e = self.assertDBusError(INVALID, d.start, 0, 0, opts(max_guest_latency=T(2000)))
        self.assertIn('not running', e.message)
        e = self.assertDBusError(INVALID, d.call, 'SetMaxGuestLatency', 't', T(2000))
        self.assertIn('not running', e.message)
        self.assertSnapshotEqual(before, self.snapshot(), 'a refused max_guest_latency on an offline guest')
        self.assertEqual(d.prop('State'), 'idle')
        self.assertEqual(o.storage_helpers(self.env, o.identity(self.env, name)[0]), [])
        # 0 is "off", which an offline guest is anyway.
        d.call('SetMaxGuestLatency', 't', T(0))
        d.start(0, 0, opts(max_guest_latency=T(0)))
        self.assertEqual(str(d.wait_finished(timeout=120)[0]), 'completed')

    def test_restart_carries_the_mode_on(self):
        """A job in the mode when the daemon is killed goes on in it: MaxGuestLatency is kept, and
        the restarted controller sets its own limit rather than leave the job at whatever the
        one before had set (a crawl, if the guest was busy then)."""
        g = self.new_guest()
        d = g.disk()
        d.start(0, 0, opts(max_guest_latency=T(2000), bandwidth=T(h.MiB)))
        # The -S guest does no I/O: idle, at the ceiling.
        self.client.wait_prop(d.path, h.IFACE_STREAM, 'ThrottleReason', 'idle', 30)
        self.env.kill_daemon()
        # What the daemon of before may have left: a yielding limit.
        job = g.qemu.qmp.jobs()[0]['device']
        g.qemu.qmp.cmd('block-job-set-speed', {'device': job, 'speed': 64 * 1024})
        self.env.start_daemon()
        self.client.wait_prop(d.path, h.IFACE_STREAM, 'State', 'running', 30)
        self.assertEqual(d.prop('MaxGuestLatency'), 2000)
        self.client.wait_prop(d.path, h.IFACE_STREAM, 'ThrottleReason', 'idle', 30)
        self.client.wait_for(lambda: g.qemu.qmp.jobs()[0]['speed'] == h.MiB, 30, 'the ceiling on the job again')
        d.call('SetMaxGuestLatency', 't', T(0))
        self.assertEqual(d.prop('ThrottleReason'), 'off')
        self.assertIsNone(histogram_of(g.qemu))
        d.cancel()
        d.wait_finished(60)


if __name__ == '__main__':
    h.main()
