#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Regressions found by bench/kill-loop, each made deterministic.

The race of a range whose QEMU (or storage helper) dies: the pull helper loses its NBD connection
at the same moment and says so ("error The NBD server closed the connection."), then exits. When
the daemon reads those last words before the QMP hang-up, range.c keeps them as the job's Error
(op_end() keeps the first error: op->error was set by control_handler's CONTROL_PULL_ERROR), and
range_guest_lost()'s "QEMU went away" / "the storage helper went away" is dropped: the user is
told that some NBD server closed a connection, not that the guest's QEMU died. The kill loop hit
it in about 1 of 7 range trials with QEMU or the storage helper as the victim.

Here tests/helpers/hostile-pull (run with --bandwidth=1234567) holds the honest helper's window
open: it sends those last words before "ready" (so the daemon has read them when Start returns)
and exits only when the daemon closes its control socket."""

import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import offline as o  # noqa: E402
import ranges as r  # noqa: E402
from fakeqemu import FakeQemu  # noqa: E402
from harness import MiB, T, opts  # noqa: E402

SIZE = 64 * MiB
HOSTILE_PULL = os.environ.get('HOSTILE_PULL') or os.path.join(h.SOURCE_ROOT, 'build', 'tests', 'helpers',
                                                              'hostile-pull')
LAST_WORDS_BANDWIDTH = 1234567      # hostile-pull's mode: the helper's last words, then wait


class RangeVictimErrorTest(h.TestCase):
    env_per_test = True
    needs_daemon = False

    def setUp(self):
        super().setUp()
        self.start_daemon_with_helper(HOSTILE_PULL, r.PULL)

    def start_range(self, d):
        since = time.monotonic()
        self.assertIsNone(d.start(0, 4 * MiB, opts(bandwidth=T(LAST_WORDS_BANDWIDTH))))
        self.assertEqual(d.prop('State'), 'running')
        self.assertEqual(len(r.pull_helpers(self.env)), 1, 'the helper does not wait as it should')
        return since

    # bench/kill-loop: range x qemu (trial seed 106813218 of --seed=2).
    def test_range_error_says_qemu_went_away(self):
        g = self.new_guest(size=SIZE)
        d = g.disk()
        since = self.start_range(d)
        g.qemu.kill(signal.SIGKILL)
        res, done, err = d.wait_finished(20, since)
        self.assertEqual(res, 'failed')
        self.assertIn('qemu', err.lower(), 'the range failed because QEMU died, but its Error does not say so: '
                      '%r' % err)
        self.client.wait_prop(g.path, h.IFACE_GUEST, 'Running', False, timeout=10)
        h.wait_until(lambda: r.pull_helpers(self.env) == [], 10, 'the pull helper to go')

    def test_range_error_says_qemu_went_away_when_the_helper_ended_first(self):
        """The other order: the helper's error and exit are handled first (the range ends, its
        export is being removed), then the QMP connection breaks before QEMU answered the
        block-export-del. A fake QEMU holds that answer, so the order is fixed; the hostile-pull
        helper (plain --pull) says "ready", an error, and exits."""
        name = self.unique_name('order')
        path = os.path.join(self.env.dir, '%s.sock' % name)
        fake = FakeQemu(path, os.path.join(self.env.images, name))
        self.addCleanup(fake.close)
        gpath = self.register(name, path)
        self.addCleanup(self.unregister_quietly, name)
        fake.hold = {'block-export-del'}
        d = h.Disk(self.client, h.disk_path(name, 'vda'))
        since = time.monotonic()
        self.assertIsNone(d.start(0, 1 * MiB, h.no_opts()))
        self.client.wait_for(lambda: fake.held, 20, 'the range to remove its export after the helper failed')
        self.assertEqual(d.finished(since), [], 'Finished came before the export was gone')
        with fake.lock:
            conn = fake.conn
        conn.shutdown(2)
        res, done, err = d.wait_finished(20, since)
        self.assertEqual(res, 'failed')
        self.assertIn('qemu', err.lower(), 'the QMP peer went away under the range, but its Error does not say '
                      'so: %r' % err)
        self.client.wait_prop(gpath, h.IFACE_GUEST, 'Running', False, timeout=10)

    # bench/kill-loop: range x storage (trial seed 6627665 of --seed=3).
    def test_range_error_says_the_storage_helper_went_away(self):
        o.check_nbd_tools()
        name = self.unique_name()
        chain = h.Chain(os.path.join(self.env.images, name), SIZE)
        self.register(name, '', o.offline_options({'vda': chain.top}))
        self.addCleanup(self.unregister_quietly, name)
        d = h.Disk(self.client, h.disk_path(name, 'vda'))
        since = self.start_range(d)
        storage = o.guest_storage_helpers(self.env, name)
        self.assertEqual(len(storage), 1, storage)
        os.kill(storage[0].pid, signal.SIGKILL)
        res, done, err = d.wait_finished(20, since)
        self.assertEqual(res, 'failed')
        self.assertIn('storage helper', err, 'the range failed because the storage helper died, but its Error '
                      'does not say so: %r' % err)
        h.wait_until(lambda: r.pull_helpers(self.env) == [], 10, 'the pull helper to go')


class CompletedStreamDurableTest(h.TestCase):
    """bench/kill-loop, full x qemu (trial 45, --replay=146416215 of --seed=11): QEMU killed just
    after a full stream completed; the overlay then read zeros where the stream had copied data.

    QEMU 7.2's stream job, when it completes, rewrites the top image's header without a backing
    file (stream_prepare -> bdrv_change_backing_file -> qcow2_update_header, a direct write), but
    the L2 entries of the clusters it copied sit in QEMU's qcow2 metadata cache (writeback) until
    something flushes the image: a guest flush, a clean quit. Killed in between, QEMU leaves an
    image that no longer has a backing file and does not map the copied clusters either: the
    guest's view of them is gone, although Finished said "completed" (and BackingChain [], so the
    template may be deleted). Nothing the daemon does after the job flushes the image."""

    env_per_test = True

    def test_overlay_intact_when_qemu_dies_right_after_completion(self):
        g = self.new_guest(size=SIZE, name=self.unique_name('durable'))
        d = g.disk()
        ch = g.chains['vda']
        since = time.monotonic()
        d.start(0, 0, h.no_opts())
        res, done, err = d.wait_finished(60, since)
        self.assertEqual((res, err), ('completed', ''))
        self.assertEqual(d.prop('BackingChain'), [])
        # The host crashes, or QEMU does, before the guest happens to flush.
        g.qemu.kill(signal.SIGKILL)
        rc, out = h.image_check(ch.top)
        self.assertIn(rc, (0, 3), 'qemu-img check: ' + out)
        self.assertIsNone(h.image_backing(ch.top), 'the header still names a backing file')
        rc, out = ch.compare()
        self.assertEqual(rc, 0, 'the overlay lost data a completed stream had copied: ' + out)


class ReconnectCleanupTest(h.TestCase):
    """bench/kill-loop, range x qemu (trial 78, --replay=65917893 of --seed=11): after QEMU came
    back (Refresh), a new range Start failed with HelperFailed "server has no export named
    'bsr-N'": the daemon had deleted the new range's own export.

    On a reconnect, guest.c connect_jobs_reply() calls range.c range_cleanup_leftovers(), which
    deletes every disk's d->range_export, meant as the export a range of the daemon's previous
    life (or previous connection) left in QEMU. But Running turns true, and Start is served, as
    soon as QMP capabilities are negotiated, before query-block-jobs has answered: a range started
    in that window has recorded its fresh export in d->range_export, and the cleanup deletes it
    (block-export-del, mode hard) under the pull helper, whose handshake then fails.

    Made deterministic with a fake QEMU (fakeqemu.py) that holds query-block-jobs of the new
    connection until the range has added its export, and keeps the NBD server socket the daemon
    passes (getfd) open without ever speaking NBD: the range's helper waits in its handshake, so
    the range neither starts nor ends meanwhile, and any block-export-del is the cleanup's."""

    env_per_test = True

    def test_reconnect_cleanup_spares_a_range_started_meanwhile(self):
        name = self.unique_name('recon')
        path = os.path.join(self.env.dir, '%s.sock' % name)
        fake = FakeQemu(path, os.path.join(self.env.images, name))
        self.addCleanup(fake.close)
        gpath = self.register(name, path)
        self.addCleanup(self.unregister_quietly, name)
        c = self.client
        # The connection breaks; the next one answers query-block-jobs only when we say so.
        with fake.lock:
            fake.hold = {'query-block-jobs'}
            conn = fake.conn
        conn.shutdown(2)
        c.wait_prop(gpath, h.IFACE_GUEST, 'Running', False, timeout=10)
        c.try_call(gpath, h.IFACE_GUEST, 'Refresh')
        h.wait_until(lambda: fake.held, 10, 'the reconnect to ask for the block jobs')
        running = c.get(gpath, h.IFACE_GUEST, 'Running')
        # A range now (asynchronously: its helper waits for an NBD handshake the fake never gives).
        d = h.disk_path(name, 'vda')
        box = {}
        c.conn.call_async(h.BUS_NAME, d, h.IFACE_STREAM, 'Start', 'tta{sv}', (T(0), T(1 * MiB), h.no_opts()),
                          lambda *a: box.setdefault('ok', a), lambda e: box.setdefault('err', e), timeout=60)
        # A range reads the guest's disks afresh before it names a node (foreign filters), and that
        # query waits behind the held one: the range cannot add its export before the reconnect's
        # cleanup has run. Either order must leave the range's export alone: release the jobs,
        # then the range adds its export, and nothing deletes it. A Get answered after the Start
        # means the daemon has dispatched the Start (one connection's calls are served in order).
        c.get(gpath, h.IFACE_GUEST, 'Running')
        fake.release()
        c.wait_for(lambda: fake.commands.get('block-export-add') or box, 10, 'the range to add its export')
        self.assertFalse(box, 'Start answered before adding an export (Running=%r): %r' % (running, box))
        # The disks asked for after the export was added: any cleanup of the reconnect is before.
        nodes_asked = fake.commands.get('query-named-block-nodes', 0)
        c.try_call(gpath, h.IFACE_GUEST, 'Refresh')
        c.wait_for(lambda: fake.commands.get('query-named-block-nodes', 0) > nodes_asked, 10,
                   'the guest to read its disks again')
        self.assertEqual(fake.commands.get('block-export-del', 0), 0,
                         'the reconnect deleted the export of a range started after it (Running was %r)' % running)



if __name__ == '__main__':
    h.main()
