#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""A guest's QEMU that does its worst to the daemon (issue 9, item 4): it must cost the daemon
neither its memory, nor its thread, nor its disk. The QEMU is a fake (fakeqemu.py): real replies
of QEMU 7.2, then hostile ones."""

import ctypes
import os
import struct
import threading

import harness as h
import offline as o
from fakeqemu import FakeQemu

IN_CREATE = 0x100
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000


class Inotify:
    """The files created in a directory. The state store writes a guest's file as a new temporary
    file (a unique name) renamed over the old one; the renames themselves cannot be counted, as
    inotify merges identical events (same name) that were not read yet."""

    def __init__(self, path):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), 'inotify_init1')
        if self.libc.inotify_add_watch(self.fd, path.encode(), IN_CREATE) < 0:
            raise OSError(ctypes.get_errno(), 'inotify_add_watch')
        self.names = []

    def drain(self):
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return self.names
            off = 0
            while off < len(buf):
                _, mask, _, n = struct.unpack_from('iIII', buf, off)
                name = buf[off + 16:off + 16 + n].rstrip(b'\0').decode()
                if mask & IN_CREATE:
                    self.names.append(name)
                off += 16 + n

    def close(self):
        os.close(self.fd)


class HostileQemuTest(h.TestCase):
    env_per_test = True

    def register_fake(self, **kw):
        return self.register_fake_named(None, **kw)

    def register_fake_named(self, hint, **kw):
        name = self.unique_name(hint)
        path = os.path.join(self.env.dir, '%s.sock' % name)
        fake = FakeQemu(path, os.path.join(self.env.images, name), **kw)
        self.addCleanup(fake.close)
        gpath = self.client.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'RegisterGuest', 'ssa{sv}', name, path,
                                 h.no_opts())
        return fake, name, gpath

    def daemon_peak_rss(self):
        with open('/proc/%d/status' % self.env.daemon.proc.pid) as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) * 1024
        return 0

    def test_an_export_answered_after_it_failed_is_left_alone(self):
        """A QEMU answers out of order: while block-export-add waits for its answer, it says the
        export was deleted (BLOCK_EXPORT_DELETED, and query-block-exports without it), so the
        export fails and, never published, is freed; then it answers the add. The answer's
        callback held the export's address and used it (review 32d: a use-after-free in the
        daemon, which ASan shows on the code before; a plain build wrote into freed memory
        quietly). It looks the export up by id now, and finds nothing to do."""
        fake, name, gpath = self.register_fake_named('exp')  # short: the export's socket is named after it
        fake.hold = {'block-export-add'}
        disk = h.disk_path(name, 'vda')
        box = {}

        def export():
            c = h.Client(self.env.bus.address)
            try:
                box['reply'] = c.try_call(disk, h.IFACE_STREAM, 'Export', 'a{sv}', h.no_opts(), timeout=30)
            finally:
                c.close()
        t = threading.Thread(target=export)
        t.start()
        h.wait_until(lambda: fake.held, 30, 'block-export-add')
        qemu_id = fake.held[0][1]['arguments']['id']
        fake.send_raw(fake.event('BLOCK_EXPORT_DELETED', {'id': qemu_id}))
        t.join(30)
        _, e = box['reply']
        self.assertIsNotNone(e, 'Export succeeded')
        self.assertIn('QEMU removed the export', e.message)
        fake.release()
        # Answered after the add's answer: the daemon has handled it.
        self.client.call(gpath, h.IFACE_GUEST, 'Refresh', timeout=30)
        self.assertTrue(self.env.daemon.running())
        self.assertEqual(o.relays(self.env), [])
        self.assertNotIn('/org/blockstream1/export/', ' '.join(str(p) for p in self.client.managed_objects()))

    def test_an_export_that_fails_as_the_server_starts_leaves_it_to_the_others(self):
        """Two exports of a guest wait for QEMU's NBD server to start; meanwhile QEMU drops the
        first one's disk. When the server runs, the first fails (no node), and its end found no
        user and no waiter (their list was being run) and stopped the server under the second,
        which was told it runs (review 32e). The second is served now, and the server stays."""
        fake, name, gpath = self.register_fake_named('two', n_disks=2)
        fake.hold = {'nbd-server-start'}
        replies = {}

        def export(alias):
            c = h.Client(self.env.bus.address)
            try:
                replies[alias] = c.try_call(h.disk_path(name, alias), h.IFACE_STREAM, 'Export', 'a{sv}',
                                            h.no_opts(), timeout=30)
            finally:
                c.close()
        threads = [threading.Thread(target=export, args=(alias,)) for alias in ('vda', 'vdb')]
        threads[0].start()
        h.wait_until(lambda: fake.held, 30, 'nbd-server-start')
        threads[1].start()
        # The second waits too (one server): it asked for the disks again first.
        h.wait_until(lambda: fake.sequence.count('query-named-block-nodes') >= 3, 30,
                     'the second export to read the disks')
        with fake.lock:
            fake._blocks = fake._blocks[1:]
        self.client.call(gpath, h.IFACE_GUEST, 'Refresh', timeout=30)
        fake.release()
        for t in threads:
            t.join(40)
        self.assertIsNotNone(replies['vda'][1], 'the export of a disk QEMU dropped was made')
        self.assertIsNone(replies['vdb'][1], replies['vdb'][1])
        self.assertNotIn('nbd-server-stop', fake.sequence, 'the server was stopped under the second export')
        self.client.call(replies['vdb'][0][0], 'org.blockstream1.Export', 'Stop')

    def test_many_values_message(self):
        """1 MB of [{},{},...] (json-c: ~270 MB of heap) from a guest's QEMU, and the same again
        on every reconnect: the daemon refuses it unparsed, drops the connection (Running goes
        false), and reconnects with a growing delay, not in a loop; its peak RSS stays under
        64 MiB, and another guest is served meanwhile."""
        fake, name, gpath = self.register_fake()
        other, other_name, other_path = self.register_fake_named('other')
        huge = FakeQemu.many_values_message()
        fake.hostile_replies = lambda cmd: huge
        first = fake.connections
        fake.send_raw(huge)
        self.client.wait_prop(gpath, h.IFACE_GUEST, 'Running', False)
        self.assertTrue(self.client.get(other_path, h.IFACE_GUEST, 'Running'))
        # Three more connections, each answered with the same message.
        self.client.wait_for(lambda: fake.connections >= first + 3, 60, 'three reconnects')
        times = fake.connect_times[first - 1:]
        gaps = [b - a for a, b in zip(times, times[1:])]
        h.log('reconnect gaps: %s' % ', '.join('%.2fs' % g for g in gaps))
        # A lower bound only (a slow machine makes gaps longer, never shorter): the backoff
        # starts at 1 s and doubles. Reconnecting at once made these a few ms.
        self.assertGreaterEqual(gaps[-1], 1.0, 'the daemon reconnected to a hostile QEMU without delay')
        self.assertTrue(self.env.daemon.running())
        self.assertTrue(self.client.get(other_path, h.IFACE_GUEST, 'Running'))
        peak = self.daemon_peak_rss()
        h.log('daemon peak RSS %.1f MiB' % (peak / 1048576))
        self.assertLess(peak, 64 * 1024 * 1024)

    def test_refresh_calls_share_one_query(self):
        """Refresh called 20 times while QEMU sits on its answer: one disks query in flight per
        guest (each holds QEMU's whole query-block reply until the node names come), the
        callers who came meanwhile share the next one, and every call gets its answer."""
        fake, name, gpath = self.register_fake()
        base = fake.commands.get('query-block', 0)
        fake.hold = {'query-block'}
        # No introspection first: dbus-python would hold the calls back until it returns.
        g = h.dbus.Interface(self.client.conn.get_object(h.BUS_NAME, gpath, introspect=False), h.IFACE_GUEST)
        done = []
        n = 20
        for _ in range(n):
            g.Refresh(reply_handler=lambda: done.append(None), error_handler=done.append, timeout=60)
        # Calls of one connection are dispatched in order: once this returns, all 20 were.
        self.client.get(h.MANAGER_PATH, h.IFACE_MANAGER, 'Version')
        self.client.wait_for(lambda: fake.held, 20, 'the first query-block')
        fake.release()
        self.client.wait_for(lambda: len(done) == n, 60, 'all %d Refresh replies' % n)
        self.assertEqual(done, [None] * n)
        queries = fake.commands.get('query-block', 0) - base
        h.log('%d Refresh calls, %d query-block' % (n, queries))
        self.assertLessEqual(queries, 2)

    def test_unregister_while_a_refresh_waits(self):
        """Unregister while QEMU sits on a Refresh's query: the connection is drained after the guest
        is gone, and dropping the Refresh's call then wrote into the freed guest (ASan:
        heap-use-after-free in refresh_ctx_free). The Refresh is answered, the guest is gone, the
        daemon serves on."""
        fake, name, gpath = self.register_fake()
        fake.hold = {'query-block'}
        g = h.dbus.Interface(self.client.conn.get_object(h.BUS_NAME, gpath, introspect=False), h.IFACE_GUEST)
        done = []
        g.Refresh(reply_handler=lambda: done.append(None), error_handler=done.append, timeout=60)
        self.client.wait_for(lambda: fake.held, 20, 'the query-block')
        self.client.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'UnregisterGuest', 's', name)
        fake.release()
        self.client.wait_for(lambda: done, 30, 'the Refresh answered')
        self.assertDBusError(h.ERR_NO_SUCH_GUEST, self.client.call, h.MANAGER_PATH, h.IFACE_MANAGER, 'GetGuest',
                             's', name)
        self.assertTrue(self.env.daemon.running())
        other, _, other_path = self.register_fake_named('after')
        self.client.wait_prop(other_path, h.IFACE_GUEST, 'Running', True)

    def test_unregister_drains_are_bounded(self):
        """An unregistered guest's connection is kept until QEMU answered (at most 10 s), with the
        call's reply: a user's QEMU that never answers, registered and unregistered in a loop, ran
        the daemon out of fds (review 30b). A user's guests keep 16 such drains; the 17th closes at
        once, before any of them. Told by order, not by time: the first 16 end at their deadline."""
        owner = h.ensure_test_users()[h.OWNER]
        n = 17  # guest.c: UNREGISTER_DRAINS_PER_OWNER_MAX + 1
        fakes = []
        for i in range(n):
            name = self.unique_name('drain')
            path = os.path.join(self.env.dir, '%s.sock' % name)
            fake = FakeQemu(path, os.path.join(self.env.images, name))
            self.addCleanup(fake.close)
            gpath = self.client.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'RegisterGuest', 'ssa{sv}', name, path,
                                     h.opts(owner=h.U(owner)))
            fake.hold = {'query-block'}
            g = h.dbus.Interface(self.client.conn.get_object(h.BUS_NAME, gpath, introspect=False), h.IFACE_GUEST)
            g.Refresh(reply_handler=lambda: None, error_handler=lambda e: None, timeout=60)
            self.client.wait_for(lambda: fake.held, 20, 'the query-block of %s' % name)
            fakes.append((name, fake))
        answered = []
        for name, _ in fakes:
            self.client.conn.call_async(h.BUS_NAME, h.MANAGER_PATH, h.IFACE_MANAGER, 'UnregisterGuest', 's', (name,),
                                        lambda *a: answered.append(a), lambda e: answered.append(e), timeout=60)
        self.client.wait_for(lambda: all(f.hangup_times for _, f in fakes), 60, 'every connection closed')
        self.client.wait_for(lambda: len(answered) == n, 30, 'every UnregisterGuest answered')
        last = fakes[-1][1].hangup_times[0]
        first = min(f.hangup_times[0] for _, f in fakes[:-1])
        self.assertLess(last, first, 'the 17th drain of one user was kept like the others')

    def test_event_flood_is_paced(self):
        """A QEMU flapping a job as fast as it can: every state change is still signalled, in
        order, but the daemon reads that QEMU at its own pace (200 events a second after a burst
        of 400), so the bus is not flooded. Checked by a lower bound only: a slow machine makes it
        slower, never faster. The old daemon signalled all 2401 changes as fast as it read them."""
        fake, name, _ = self.register_fake()
        vda = h.disk_path(name, 'vda')
        self.client.call(vda, h.IFACE_STREAM, 'Start', 'tta{sv}', h.T(0), h.T(0), h.no_opts())
        self.client.wait_prop(vda, h.IFACE_STREAM, 'State', 'running')
        job = self.client.wait_for(lambda: next(iter(fake.jobs), None), 10, 'block-stream at the fake')
        since = h.time.monotonic()
        sent = fake.flap(job, 1200)

        def states():
            return [c['State'] for _, c, _ in self.client.props_changed(vda, h.IFACE_STREAM, since) if 'State' in c]
        self.client.wait_for(lambda: len(states()) >= len(sent), 120, '%d State changes' % len(sent))
        took = h.time.monotonic() - since
        self.assertEqual(states(), sent)
        h.log('%d state changes signalled in %.1f s' % (len(sent), took))
        # (2401 - 400) / 200 = 10 s at the budget; half of it as the bound.
        self.assertGreaterEqual(took, 5.0, 'the daemon took %d events in %.1f s: not paced' % (len(sent), took))

    def test_malformed_events_do_not_flood_the_log(self):
        """500 malformed job events: the daemon says so once (then at most once a minute, with a
        count), not 500 times: journald's rate limit would drop the whole daemon's messages, the
        other guests' too. The old daemon logged a warning for each."""
        fake, name, gpath = self.register_fake()
        bad = b''.join(fake.event('JOB_STATUS_CHANGE', {'id': 'bsd-vda-1', 'status': i})
                       for i in range(500))
        fake.send_raw(bad)
        # A reply comes after the events sent before it, and the daemon reads in order.
        self.client.call(gpath, h.IFACE_GUEST, 'Refresh', timeout=120)
        with open(self.env.daemon.log, errors='replace') as f:
            warnings = [line for line in f if 'ignoring malformed JOB_STATUS_CHANGE' in line]
        h.log('%d warnings for 500 malformed events' % len(warnings))
        self.assertTrue(warnings, 'no warning about the malformed events')
        self.assertLessEqual(len(warnings), 5, warnings[:10])
        self.assertTrue(self.client.get(gpath, h.IFACE_GUEST, 'Running'))

    def test_replies_never_asked_for_end_the_connection(self):
        """Replies to ids the daemon never used, sent unasked as fast as a QEMU can, cost it
        nothing and the daemon a parse each: the first ends the connection (Running false, then
        a reconnect after a delay). The old daemon read them on, ignoring each."""
        fake, name, gpath = self.register_fake()
        first = fake.connections
        fake.send_raw(b''.join(b'{"return": {}, "id": %d}\r\n' % (10 ** 9 + i) for i in range(1000)))
        self.client.wait_prop(gpath, h.IFACE_GUEST, 'Running', False, 30)
        self.client.wait_for(lambda: fake.connections > first, 60, 'a reconnect')
        self.client.wait_prop(gpath, h.IFACE_GUEST, 'Running', True, 30)
        with open(self.env.daemon.log, errors='replace') as f:
            self.assertIn('reply to a command never sent', f.read())

    def test_noncharacters_never_break_the_object_tree(self):
        """sd-bus refuses a string with a Unicode noncharacter (U+FDD0..U+FDEF, U+xxFFFE/F), and
        one such property fails the whole GetManagedObjects, for every client. The daemon's own
        UTF-8 check let them through (review 34a): a QEMU that named its image
        '.../a\uffff/vda-0.qcow2' broke the object tree for everyone, and an error QEMU answered
        a Start with left the caller with no reply. A path with one is refused with QEMU's reply
        now, and an error text has them replaced."""
        name = self.unique_name('nonchar')
        path = os.path.join(self.env.dir, '%s.sock' % name)
        fake = FakeQemu(path, os.path.join(self.env.images, name + '\uffff'))
        self.addCleanup(fake.close)
        _, err = self.client.try_call(h.MANAGER_PATH, h.IFACE_MANAGER, 'RegisterGuest', 'ssa{sv}', name, path,
                                      h.no_opts())
        if err is None:
            self.addCleanup(lambda: self.client.try_call(h.guest_path(name), h.IFACE_GUEST, 'Unregister'))
        other = h.Client(self.env.bus.address)
        self.addCleanup(other.close)
        other.managed_objects()  # raises if one string in the tree is one sd-bus refuses
        self.assertIsNotNone(err, 'a guest whose disk is named with U+FFFF was registered')
        self.assertEqual(err.name, h.ERR_QEMU_FAILED, err.message)

        # An error QEMU answers a command with: the caller's error reply could not be sent.
        bad = 'no \ufdd0 \uffff \U0001fffe'
        fake, name, _ = self.register_fake()
        vda = h.disk_path(name, 'vda')
        fake.hostile_replies = lambda cmd: ((h.json.dumps({'error': {'class': 'GenericError', 'desc': bad},
                                                           'id': cmd.get('id')}) + '\r\n').encode()
                                            if cmd.get('execute') == 'block-stream' else None)
        e = self.assertDBusError(h.ERR_QEMU_FAILED, self.client.call, vda, h.IFACE_STREAM, 'Start', 'tta{sv}',
                                 h.T(0), h.T(0), h.no_opts(), timeout=30)
        self.assertIn('no \ufffd', e.message)
        self.assertIn(vda, other.managed_objects())
        self.assertTrue(self.env.daemon.running())

    def test_flapping_job_coalesces_state_saves(self):
        """A job flapping paused/running: one PropertiesChanged per state change, as the API says,
        but not one fsync'ed state file per event."""
        fake, name, _ = self.register_fake()
        vda = h.disk_path(name, 'vda')
        self.client.call(vda, h.IFACE_STREAM, 'Start', 'tta{sv}', h.T(0), h.T(0), h.no_opts())
        self.client.wait_prop(vda, h.IFACE_STREAM, 'State', 'running')
        job = self.client.wait_for(lambda: next(iter(fake.jobs), None), 10, 'block-stream at the fake')

        guests = os.path.join(self.env.daemon.state_dir, 'guests')
        watch = Inotify(guests)
        self.addCleanup(watch.close)
        since = h.time.monotonic()
        n = 200
        sent = fake.flap(job, n)

        def states():
            return [c['State'] for _, c, _ in self.client.props_changed(vda, h.IFACE_STREAM, since) if 'State' in c]
        self.client.wait_for(lambda: len(states()) >= len(sent), 60, '%d State changes' % len(sent))
        self.assertEqual(states(), sent)

        # The last change reaches the disk too, in bounded time.
        def saved_state():
            with open(os.path.join(guests, name + '.json')) as f:
                return h.json.load(f)['disks'][0]['job']['state']
        self.client.wait_for(lambda: saved_state() == 'paused', 10, 'the state file to say paused')
        writes = [f for f in watch.drain() if f.startswith(name + '.json.tmp')]
        h.log('%d job state changes, %d state file writes' % (len(sent), len(writes)))
        self.assertLess(len(writes), n // 2, 'the state file was written %d times for %d events'
                        % (len(writes), len(sent)))
        self.assertTrue(self.env.daemon.running())


if __name__ == '__main__':
    h.main()
