#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Persistence and failures: daemon restarts (clean and SIGKILL, with jobs running or ended
meanwhile), QEMU killed in the middle of a stream."""

import os
import signal
import subprocess
import sys
import time
import unittest
import uuid as uuidlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
from harness import T, U, S, opts, MiB  # noqa: E402

SIZE = 256 * MiB
STATIC_GUEST = ('Name', 'UUID', 'Owner', 'QMPSocket', 'Disks')
STATIC_DISK = ('Guest', 'Device', 'NodeName', 'Path', 'BackingChain', 'Size')


class RestartTest(h.TestCase):
    env_per_test = True

    def wait_republished(self, g, timeout=15):
        c = self.client
        c.wait_for(lambda: c.try_call(h.MANAGER_PATH, h.IFACE_MANAGER, 'GetGuest', 's', g.name)[0] == g.path,
                   timeout, 'guest %s to be republished' % g.name)

    def test_clean_restart_keeps_guests(self):
        c = self.client
        given = str(uuidlib.uuid4())
        g = self.new_guest(aliases=('vda', 'vdb'), size=64 * MiB, options=opts(uuid=S(given), owner=U(1234)))
        gp = c.get_all(g.path, h.IFACE_GUEST)
        dp = {a: g.disk(a).props() for a in ('vda', 'vdb')}
        self.assertEqual(self.env.stop_daemon(signal.SIGTERM), 0, 'blockstreamd did not exit cleanly on SIGTERM')
        self.assertTrue(g.qemu.running(), 'stopping the daemon stopped QEMU')
        self.env.start_daemon()
        self.wait_republished(g)
        c.wait_prop(g.path, h.IFACE_GUEST, 'Running', True, timeout=10)
        gp2 = c.get_all(g.path, h.IFACE_GUEST)
        for k in STATIC_GUEST:
            self.assertEqual(gp2[k], gp[k], 'Guest.%s changed over a restart' % k)
        self.assertEqual(gp2['UUID'], given)
        self.assertEqual(gp2['Owner'], 1234)
        objs = c.managed_objects()
        for a in ('vda', 'vdb'):
            d = g.disk(a)
            self.assertIn(d.path, objs)
            c.wait_prop(d.path, h.IFACE_STREAM, 'Path', dp[a]['Path'], timeout=10)
            p = d.props()
            for k in STATIC_DISK:
                self.assertEqual(p[k], dp[a][k], 'BlockStream.%s of %s changed over a restart' % (k, a))
            self.assertEqual(p['State'], 'idle')
        # And they still work.
        since = time.monotonic()
        g.disk('vdb').start()
        res, _, err = g.disk('vdb').wait_finished(30, since)
        self.assertEqual((res, err), ('completed', ''))
        self.assertEqual(g.disk('vdb').prop('BackingChain'), [])
        # SIGINT ends it cleanly too.
        self.assertEqual(self.env.stop_daemon(signal.SIGINT), 0, 'blockstreamd did not exit cleanly on SIGINT')

    def test_sigkill_mid_stream(self):
        c = self.client
        g = self.new_guest(size=SIZE)
        d = g.disk()
        ch = g.chains['vda']
        q = g.qemu
        d.start(0, 0, opts(bandwidth=T(16 * MiB), engine=S('stream')))
        d.wait_state('running', 10)
        d.wait_bytes_done(2 * MiB, 20)
        total = d.prop('BytesTotal')
        self.assertEqual(self.env.kill_daemon(), -signal.SIGKILL)
        jobs = q.qmp.jobs()
        self.assertEqual(len(jobs), 1, 'the job did not outlive the daemon: %r' % jobs)
        self.assertEqual(jobs[0]['status'], 'running')
        self.assertEqual(d.finished(), [], 'Finished before the job ended')
        since = time.monotonic()
        self.env.start_daemon()
        self.wait_republished(g)
        c.wait_prop(d.path, h.IFACE_STREAM, 'State', 'running', timeout=10)
        # State reads running from the state file at once; the progress there may be 0 (it is
        # saved at most every few seconds), and QEMU's own figure comes with the first look at
        # its jobs: wait for that, as a client would, rather than race it.
        c.wait_prop(d.path, h.IFACE_STREAM, 'BytesDone', lambda v: v > 0, timeout=10)
        p = d.props()
        self.assertEqual(p['Mode'], 'full')
        self.assertGreater(p['BytesDone'], 0, 'the job found again shows no progress')
        self.assertEqual(p['BytesTotal'], total)
        self.assertEqual(p['Bandwidth'], 16 * MiB)
        res, done, err = d.wait_finished(60, since)
        self.assertEqual((res, err), ('completed', ''))
        c.pump(1.0)
        self.assertEqual(len(d.finished()), 1, 'Finished emitted %d times' % len(d.finished()))
        p = d.props()
        self.assertEqual(p['State'], 'completed')
        self.assertEqual(p['BytesDone'], p['BytesTotal'])
        self.assertEqual(done, p['BytesDone'])
        self.assertEqual(p['BackingChain'], [])
        h.wait_until(lambda: q.qmp.jobs() == [], 5, 'the job to be dismissed')
        q.quit()
        self.assertIsNone(h.image_backing(ch.top))
        rc, out = ch.compare()
        self.assertEqual(rc, 0, out)

    @unittest.skipUnless(os.environ.get('BLOCKSTREAM_TEST_HOOKS') == '1',
                         'the daemon is built without its test hooks (meson -Dtest_hooks=true)')
    def test_sigkill_before_the_job_is_recorded(self):
        """Killed once QEMU began the job and before the daemon recorded it (its Start never
        answered): the new daemon cancels and dismisses that job, which nothing claims, and the
        next Start runs. Before, QEMU kept the job (pending at its end, never finalized) and the
        next Start was refused: its id was the leftover's."""
        g = self.new_guest(size=SIZE)
        d = g.disk()
        ch = g.chains['vda']
        q = g.qemu
        self.env.restart_daemon_with('BLOCKSTREAM_TEST_STREAM_STOP', 'started')
        self.wait_republished(g)
        pid = self.env.daemon.proc.pid
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=self.env.bus.address)
        p = subprocess.Popen(['busctl', '--system', 'call', h.BUS_NAME, d.path, h.IFACE_STREAM, 'Start', 'tta{sv}',
                              '0', '0', '2', 'bandwidth', 't', str(1 * MiB), 'engine', 's', 'stream'],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.addCleanup(lambda: p.poll() is None and (p.kill(), p.wait(10)))

        def stopped():
            with open('/proc/%d/stat' % pid) as f:
                return f.read().rsplit(')', 1)[1].split()[0] == 'T'
        h.wait_until(stopped, 60, 'the daemon to stop at its test hook')
        self.assertEqual(len(q.qmp.jobs()), 1, 'QEMU has no job at the hook')
        self.assertEqual(self.env.kill_daemon(), -signal.SIGKILL)
        p.communicate(timeout=30)
        self.env.start_daemon()
        self.wait_republished(g)
        h.wait_until(lambda: q.qmp.jobs() == [], 30, 'the unrecorded job to be cancelled and dismissed')
        self.assertEqual(d.prop('State'), 'idle')
        self.assertEqual(d.finished(), [], 'a Start never answered was reported')
        since = time.monotonic()
        d.start(0, 0, opts(bandwidth=T(0), engine=S('stream')))
        res, _, err = d.wait_finished(60, since)
        self.assertEqual((res, err), ('completed', ''))
        q.quit()
        self.assertIsNone(h.image_backing(ch.top))
        rc, out = ch.compare()
        self.assertEqual(rc, 0, out)

    def test_job_completed_while_daemon_down(self):
        c = self.client
        g = self.new_guest(size=SIZE)
        d = g.disk()
        ch = g.chains['vda']
        q = g.qemu
        d.start(0, 0, opts(bandwidth=T(2 * MiB), engine=S('stream')))
        d.wait_state('running', 10)
        d.wait_bytes_done(1, 20)
        self.env.kill_daemon()
        jobs = q.qmp.jobs()
        self.assertEqual(len(jobs), 1, jobs)
        job = jobs[0]['device']
        q.qmp.cmd('block-job-set-speed', device=job, speed=0)
        # auto-finalize off: the copied job waits in "pending" for the daemon to flush the image
        # before QEMU drops the backing file (CompletedStreamDurableTest); the guest runs on.
        h.wait_until(lambda: [j['status'] for j in q.qmp.jobs()] == ['pending'], 30,
                     'the job to wait in pending (was it started with auto-finalize false?)')
        self.assertIsNotNone(h.image_backing(ch.top), 'the backing file went before the daemon finalized the job')
        since = time.monotonic()
        self.env.start_daemon()
        self.wait_republished(g)
        c.wait_prop(d.path, h.IFACE_STREAM, 'State', 'completed', timeout=15)
        res, done, err = d.wait_finished(10, since)
        self.assertEqual((res, err), ('completed', ''))
        c.pump(1.0)
        self.assertEqual(len(d.finished()), 1, 'Finished emitted %d times' % len(d.finished()))
        p = d.props()
        self.assertGreater(p['BytesTotal'], 0)
        self.assertEqual(p['BytesDone'], p['BytesTotal'])
        self.assertEqual(done, p['BytesTotal'])
        self.assertEqual(p['BackingChain'], [])
        self.assertEqual(p['Error'], '')
        h.wait_until(lambda: q.qmp.jobs() == [], 10, 'the daemon to dismiss the concluded job')
        # The restarted daemon flushed before finalizing: QEMU dying now loses nothing.
        q.kill(signal.SIGKILL)
        self.assertIsNone(h.image_backing(ch.top))
        self.assertEqual(ch.compare()[0], 0)

    def test_job_cancelled_while_daemon_down(self):
        c = self.client
        g = self.new_guest(size=SIZE)
        d = g.disk()
        q = g.qemu
        d.start(0, 0, opts(bandwidth=T(2 * MiB), engine=S('stream')))
        d.wait_state('running', 10)
        d.wait_bytes_done(1, 20)
        self.env.kill_daemon()
        job = q.qmp.jobs()[0]['device']
        q.qmp.cmd('block-job-cancel', device=job, force=True)
        h.wait_until(lambda: [j['status'] for j in q.qmp.jobs()] == ['concluded'], 30, 'the job to conclude')
        since = time.monotonic()
        self.env.start_daemon()
        self.wait_republished(g)
        c.wait_prop(d.path, h.IFACE_STREAM, 'State', 'cancelled', timeout=15)
        res, done, err = d.wait_finished(10, since)
        self.assertEqual(res, 'cancelled')
        self.assertGreater(done, 0)
        c.pump(1.0)
        self.assertEqual(len(d.finished()), 1)
        self.assertEqual(d.prop('BytesDone'), done)
        self.assertEqual(d.prop('BackingChain'), g.chains['vda'].backing_files)
        h.wait_until(lambda: q.qmp.jobs() == [], 10, 'the daemon to dismiss the concluded job')

    def test_qemu_killed_mid_stream(self):
        """Finished("failed", bytes > 0, "…QEMU…"), State failed, Running false, images intact."""
        c = self.client
        g = self.new_guest(size=SIZE)
        d = g.disk()
        ch = g.chains['vda']
        since = time.monotonic()
        d.start(0, 0, opts(bandwidth=T(4 * MiB), engine=S('stream')))
        d.wait_state('running', 10)
        d.wait_bytes_done(1 * MiB, 20)
        g.qemu.kill(signal.SIGKILL)
        res, done, err = d.wait_finished(15, since)
        self.assertEqual(res, 'failed')
        self.assertGreater(done, 0, 'a failed job must say how far it got')
        self.assertIn('qemu', err.lower(), 'the error does not say QEMU went away: %r' % err)
        c.pump(1.0)
        self.assertEqual(len(d.finished(since)), 1)
        p = d.props()
        self.assertEqual(p['State'], 'failed')
        self.assertEqual(p['Error'], err)
        self.assertEqual(p['BytesDone'], done)
        self.assertLess(done, p['BytesTotal'])
        c.wait_prop(g.path, h.IFACE_GUEST, 'Running', False, timeout=10)
        rc, out = h.image_check(ch.top)
        self.assertIn(rc, (0, 3), 'qemu-img check found corruption: ' + out)
        self.assertEqual(ch.compare()[0], 0)
        # The guest stays registered (not running); methods say so.
        self.assertEqual(c.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'GetGuest', 's', g.name), g.path)
        self.assertDBusError(h.ERR_NOT_RUNNING, d.start)
        self.assertEqual(p['State'], d.prop('State'))
        c.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'UnregisterGuest', 's', g.name)

    def test_restart_with_qemu_gone(self):
        c = self.client
        g = self.new_guest(size=64 * MiB)
        self.env.kill_daemon()
        g.qemu.kill()
        self.env.start_daemon()
        self.wait_republished(g)
        self.assertIs(c.get(g.path, h.IFACE_GUEST, 'Running'), False)
        self.assertEqual(c.get(g.path, h.IFACE_GUEST, 'QMPSocket'), g.qemu.daemon_socket)
        c.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'UnregisterGuest', 's', g.name)
        self.assertDBusError(h.ERR_NO_SUCH_GUEST, c.call, h.MANAGER_PATH, h.IFACE_MANAGER, 'GetGuest', 's', g.name)
        # Forgotten for good: not back after another restart.
        self.env.stop_daemon()
        self.env.start_daemon()
        c.pump(1.0)
        self.assertDBusError(h.ERR_NO_SUCH_GUEST, c.call, h.MANAGER_PATH, h.IFACE_MANAGER, 'GetGuest', 's', g.name)


if __name__ == '__main__':
    h.main()
