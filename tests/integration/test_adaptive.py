#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""The guest-latency mode's refusals (issue 13): bad values of max_guest_latency and of
SetMaxGuestLatency, and guests that are not running (no guest to follow), are refused with
InvalidArgs and nothing half-done: no job, no histogram on the device, the same properties and
state. The mode at work under a real guest is test_guest.py's."""

import os
import pwd
import select
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import json  # noqa: E402
import offline as o  # noqa: E402
from fakeqemu import FakeQemu  # noqa: E402
from harness import T, S, opts  # noqa: E402

INVALID = 'org.freedesktop.DBus.Error.InvalidArgs'
QDEV = '/machine/peripheral/vda/virtio-backend'
# service/qemu-stats.c's qemu_latency_boundaries_default (ns)
BOUNDARIES = [50000, 100000, 200000, 300000, 500000, 750000, 1000000, 1500000, 2000000, 3000000, 5000000,
              7500000, 10000000, 15000000, 20000000, 30000000, 50000000, 75000000, 100000000, 200000000,
              500000000, 1000000000, 2000000000, 5000000000, 10000000000]


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
        self.assertEqual(o.storage_helper_of(self.env, chains['vda'].top), [])
        # 0 is "off", which an offline guest is anyway.
        d.call('SetMaxGuestLatency', 't', T(0))
        d.start(0, 0, opts(max_guest_latency=T(0), engine=S('stream')))
        self.assertEqual(str(d.wait_finished(timeout=120)[0]), 'completed')

    def test_restart_carries_the_mode_on(self):
        """A job in the mode when the daemon is killed goes on in it: MaxGuestLatency is kept, and
        the restarted controller sets its own limit rather than leave the job at whatever the
        one before had set (a crawl, if the guest was busy then)."""
        g = self.new_guest()
        d = g.disk()
        d.start(0, 0, opts(max_guest_latency=T(2000), bandwidth=T(h.MiB), engine=S('stream')))
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


class AdaptiveEnginesTest(h.TestCase):

    def test_every_engine_runs_in_the_mode(self):
        """max_guest_latency holds for the mirror and for prefetch too: Start answered as for
        block-stream, and the job then ran at its bandwidth with the mode off (review 30a), though
        auto picks the mirror for a -drive guest and prefetch for a remote template."""
        for engine in ('mirror', 'prefetch'):
            with self.subTest(engine=engine):
                g = self.new_guest()
                d = g.disk()
                d.start(0, 0, opts(max_guest_latency=T(2000), bandwidth=T(h.MiB), engine=S(engine)))
                self.assertEqual(d.prop('Engine'), engine)
                # The -S guest does no I/O: idle, at the ceiling.
                self.client.wait_prop(d.path, h.IFACE_STREAM, 'ThrottleReason', 'idle', 30)
                self.assertEqual(d.prop('MaxGuestLatency'), 2000)
                h.wait_until(lambda: histogram_of(g.qemu) is not None, 10, 'the mode to set its histogram')
                d.cancel()
                d.wait_finished(60)
                self.client.wait_prop(d.path, h.IFACE_STREAM, 'ThrottleReason', 'off', 30)
                self.assertIsNone(histogram_of(g.qemu))


    def test_restart_keeps_a_job_out_of_the_mode(self):
        """A job started with max_guest_latency 0 while the disk's default is on runs without the
        mode; a restarted daemon put it in the mode, as the default said (review 30a). Whether the job
        runs in it is kept with the job."""
        g = self.new_guest()
        d = g.disk()
        d.call('SetMaxGuestLatency', 't', T(2000))  # no job: the default for the next
        d.start(0, 0, opts(max_guest_latency=T(0), bandwidth=T(h.MiB), engine=S('stream')))
        self.client.wait_prop(d.path, h.IFACE_STREAM, 'State', 'running', 30)
        self.env.kill_daemon()
        self.env.start_daemon()
        self.client.wait_prop(d.path, h.IFACE_STREAM, 'State', 'running', 30)
        # The mode sets its histogram and its reason at its first window (0.5 s) with the job running.
        time.sleep(3)
        self.assertEqual(d.prop('ThrottleReason'), 'off')
        self.assertIsNone(histogram_of(g.qemu))
        d.cancel()
        d.wait_finished(60)


    def test_restart_keeps_a_job_put_in_the_mode(self):
        """The other way: a job started out of the mode, then put in it at the disk's default target
        (the value unchanged), was not saved as in the mode, and a paused one (no progress to save)
        came back without it (review 30e)."""
        g = self.new_guest()
        d = g.disk()
        d.call('SetMaxGuestLatency', 't', T(2000))
        d.start(0, 0, opts(max_guest_latency=T(0), bandwidth=T(h.MiB), engine=S('stream')))
        self.client.wait_prop(d.path, h.IFACE_STREAM, 'State', 'running', 30)
        d.call('Pause')
        self.client.wait_prop(d.path, h.IFACE_STREAM, 'State', 'paused', 30)
        record = os.path.join(self.env.daemon.state_dir, 'guests', g.name + '.json')

        def recorded():
            with open(record) as f:
                return [(x['job']['state'], x.get('job_latency_mode')) for x in json.load(f)['disks']]
        # Nothing waits to be written any more: the pause is on disk, out of the mode.
        h.wait_until(lambda: recorded() == [('paused', False)], 10, 'the pause recorded')
        d.call('SetMaxGuestLatency', 't', T(2000))

        def in_the_mode():
            return recorded() == [('paused', True)]
        # Written within the state writer's coalescing (0.1 s), or never: then a crash loses it.
        h.wait_until(in_the_mode, 10, "the job's record to say it runs in the mode")
        self.env.kill_daemon()
        self.env.start_daemon()
        self.client.wait_prop(d.path, h.IFACE_STREAM, 'State', 'paused', 30)
        d.call('Resume')
        self.client.wait_prop(d.path, h.IFACE_STREAM, 'ThrottleReason', 'idle', 30)
        d.cancel()
        d.wait_finished(60)


def stats_replies(sets):
    """A fake QEMU's answers (FakeQemu.hostile_replies): its device reports read statistics, and
    our histogram once one was set; each block-latency-histogram-set's arguments go to sets."""
    n = [0]

    def replies(cmd):
        if cmd.get('execute') == 'block-latency-histogram-set':
            sets.append(cmd.get('arguments'))
            return None
        if cmd.get('execute') != 'query-blockstats':
            return None
        n[0] += 1
        stats = {'rd_operations': n[0], 'wr_operations': 0, 'flush_operations': 0, 'rd_bytes': n[0] * 4096,
                 'wr_bytes': 0}
        if sets and 'boundaries-read' in sets[-1]:
            stats['rd_latency_histogram'] = {'boundaries': BOUNDARIES, 'bins': [n[0]] + [0] * len(BOUNDARIES)}
        return json.dumps({'return': [{'device': '', 'qdev': QDEV, 'stats': stats}],
                           'id': cmd.get('id')}).encode() + b'\r\n'
    return replies


class PrintedSets(list):
    """The histogram sets of a fake QEMU in another process, one JSON line each on its stdout."""

    def append(self, args):
        super().append(args)
        print(json.dumps(args), flush=True)


def fake_qemu_main(path, image_dir, user):
    """A fake QEMU (stats_replies()) that listens as root, then runs as user: its listener's
    credentials (SO_PEERCRED, taken at listen()) say uid 0, its process another uid, so the daemon
    cannot vouch for the process (no pid and start time known), as for a QEMU started by root with
    -runas. Prints "ready", then the histogram sets; runs until stdin closes."""
    fake = FakeQemu(path, image_dir)
    fake.hostile_replies = stats_replies(PrintedSets())
    uid = pwd.getpwnam(user).pw_uid
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    print('ready', flush=True)
    sys.stdin.read()
    fake.close()


class AdaptiveLeftHistogramTest(h.TestCase):
    """The mode ends while the daemon has no QMP connection to the guest's QEMU, or with one to a
    QEMU it cannot tell apart from another."""

    def fake_with_stats(self, path, name, sets):
        fake = FakeQemu(path, os.path.join(self.env.images, name))
        self.addCleanup(fake.close)
        fake.hostile_replies = stats_replies(sets)
        return fake

    def test_a_histogram_is_removed_over_the_connection_it_was_set_on(self):
        """A QEMU whose process the daemon cannot vouch for (root's, with -runas: here a fake
        one that drops to another uid after it listens) is no known process: 4977c25 removed the
        mode's histogram only from a known process that is the same, so this one's stayed for
        good (review 31a). Over the connection it was set on, it is removed."""
        name = self.unique_name()
        path = os.path.join(self.env.dir, '%s.sock' % name)
        h.ensure_user()
        p = subprocess.Popen([sys.executable, os.path.abspath(__file__), '--fake-qemu', path,
                              os.path.join(self.env.images, name), h.STRANGER],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, universal_newlines=True)
        self.addCleanup(lambda: (p.stdin.close(), p.wait(10)))
        self.assertEqual(p.stdout.readline().strip(), 'ready')
        self.register(name, path)
        self.addCleanup(self.unregister_quietly, name)
        d = h.Disk(self.client, h.disk_path(name, 'vda'))
        d.start(0, 0, opts(max_guest_latency=T(2000), engine=S('stream')))
        self.assertEqual(json.loads(p.stdout.readline()), {'id': QDEV, 'boundaries-read': BOUNDARIES})
        self.client.wait_prop(d.path, h.IFACE_STREAM, 'ThrottleReason', 'idle', 30)
        d.call('SetMaxGuestLatency', 't', T(0))
        ready = select.select([p.stdout], [], [], 30)[0]
        self.assertTrue(ready, 'the histogram was not removed')
        self.assertEqual(json.loads(p.stdout.readline()), {'id': QDEV})

    def test_a_histogram_left_is_removed_at_the_next_connection(self):
        """The mode's histogram was removed only over a working connection: a job that failed
        with its QEMU out of reach left it on the device for good, and the next mode there took it
        for someone else's. It is removed at the next connection to that QEMU now (here the same
        process listens again at the socket; a QEMU started anew there is not touched)."""
        name = self.unique_name()
        path = os.path.join(self.env.dir, '%s.sock' % name)
        sets = []
        fake = self.fake_with_stats(path, name, sets)
        gpath = self.register(name, path)
        self.addCleanup(self.unregister_quietly, name)
        d = h.Disk(self.client, h.disk_path(name, 'vda'))
        d.start(0, 0, opts(max_guest_latency=T(2000), engine=S('stream')))
        h.wait_until(lambda: sets, 30, 'the mode to set its histogram')
        self.assertEqual(sets, [{'id': QDEV, 'boundaries-read': BOUNDARIES}])
        # The connection breaks (a protocol error), and the socket is gone when the daemon tries
        # again: the job fails, and the mode ends, with no connection.
        fake.hang_up_after_caps = True
        fake.close()
        fake._srv.close()
        os.unlink(path)
        fake.send_raw(b'{"not QMP"\r\n')
        self.client.wait_prop(gpath, h.IFACE_GUEST, 'Running', False, 30)
        self.client.wait_prop(d.path, h.IFACE_STREAM, 'State', 'failed', 60)
        # Back at the socket: the histogram goes at the next connection.
        again = []
        self.fake_with_stats(path, name, again)
        self.client.try_call(gpath, h.IFACE_GUEST, 'Refresh', timeout=30)
        self.client.wait_prop(gpath, h.IFACE_GUEST, 'Running', True, 60)
        h.wait_until(lambda: again, 30, 'the histogram left to be removed')
        self.assertEqual(again, [{'id': QDEV}])


class AdaptiveHostileQemuTest(h.TestCase):
    """A guest's QEMU is untrusted (a compromised guest may own it): what it says in
    query-blockstats steers nothing it should not."""

    def test_hostile_blockstats(self):
        name = self.unique_name()
        path = os.path.join(self.env.dir, '%s.sock' % name)
        fake = FakeQemu(path, os.path.join(self.env.images, name))
        self.addCleanup(fake.close)
        self.register(name, path)
        self.addCleanup(self.unregister_quietly, name)
        d = h.Disk(self.client, h.disk_path(name, 'vda'))
        state = {'qdev': '/machine/peripheral/vda/../../../../etc', 'n': 0, 'hist': False}

        def hostile(cmd):
            if cmd.get('execute') != 'query-blockstats':
                return None
            state['n'] += 1
            n = state['n'] * 1000
            stats = {'rd_operations': n, 'wr_operations': 0, 'flush_operations': 0, 'rd_bytes': n * 4096,
                     'wr_bytes': 0}
            if state['hist']:
                # Every read of every window in the last, open bin: "at least 10 s".
                stats['rd_latency_histogram'] = {'boundaries': BOUNDARIES, 'bins': [0] * len(BOUNDARIES) + [n]}
            return json.dumps({'return': [{'device': '', 'qdev': state['qdev'], 'stats': stats}],
                               'id': cmd.get('id')}).encode() + b'\r\n'
        fake.hostile_replies = hostile

        def count(cmd):
            with fake.lock:
                return fake.commands.get(cmd, 0)

        d.start(0, 0, opts(max_guest_latency=T(1000), engine=S('stream')))
        # A device path that climbs out of /machine/peripheral: never handed back to QEMU.
        self.client.wait_for(lambda: count('query-blockstats') >= 4, 60, 'four windows')
        self.assertEqual(count('block-latency-histogram-set'), 0)
        self.assertEqual(d.prop('GuestReadP99'), 0)
        self.assertTrue(self.env.daemon.running())

        # A histogram saying 10 s and more for every read: the controller yields, but to its
        # floor at most, and the property shows the bounded estimate.
        state['qdev'], state['hist'] = QDEV, True
        self.client.wait_prop(d.path, h.IFACE_STREAM, 'ThrottleReason', 'yielding', 60)
        self.assertEqual(d.prop('GuestReadP99'), 10 * 1000 * 1000)
        self.assertGreaterEqual(d.prop('SpeedLimit'), h.MiB)
        self.assertEqual(count('block-latency-histogram-set'), 0, 'a histogram QEMU had was replaced')
        self.assertGreaterEqual(count('block-job-set-speed'), 1)

        # Off: the histogram was not ours, so it is left alone.
        d.call('SetMaxGuestLatency', 't', T(0))
        self.assertEqual(d.prop('ThrottleReason'), 'off')
        self.assertEqual(count('block-latency-histogram-set'), 0)
        self.assertTrue(self.env.daemon.running())


if __name__ == '__main__':
    if sys.argv[1:2] == ['--fake-qemu']:
        fake_qemu_main(*sys.argv[2:5])
    else:
        h.main()
