#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Byte-range streaming (Start with an offset and a length) and GetAllocationMap, against the real
daemon, its sandboxed blockstream-pull helper and real QEMU: the map after a range shows exactly
the range's clusters local and nothing else changed, the data still reads as the chain's, guest
writes during a range survive, Pause/Resume/Cancel/SetBandwidth work live, maps agree with
qemu-img map on random chains, and whatever ends a job leaves no filter node or export in QEMU."""

import json
import os
import random
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import nbdtemplate  # noqa: E402
import offline  # noqa: E402
import ranges as r  # noqa: E402
from harness import MiB, T, opts  # noqa: E402

SIZE = r.SIZE
U = SIZE // 256     # harness.Chain's unit: 1 MiB here
CS = r.CLUSTER


def wchar(pid):
    """Bytes process `pid` has written with write(2) and its relatives (/proc/PID/io)."""
    with open('/proc/%d/io' % pid) as f:
        for line in f:
            if line.startswith('wchar:'):
                return int(line.split()[1])
    raise AssertionError('no wchar in /proc/%d/io' % pid)


class RangeBase(r.RangeTestCase):
    """Guests whose every test ends with no filter node, no export and no pull helper left."""

    def api_map(self, d, offset=0, length=0):
        m = r.get_map(d, offset, length)
        size = d.prop('Size')
        ln = (size - offset) if length == 0 else length
        self.assertEqual(r.map_problems(m, offset, ln), [], 'GetAllocationMap(%d, %d) = %r' % (offset, length, m))
        return m

    def assert_map_is_qemu_img(self, g, m, what, alias='vda'):
        """The map equals qemu-img map -U of the top image (after a flush of QEMU's caches)."""
        r.flush(g.qemu, alias)
        expect = r.expected_map(g.chains[alias].top, 0, SIZE)
        self.assertEqual(m, expect, '%s: GetAllocationMap differs from qemu-img map --output=json -U' % what)

    def assert_data_is_chain(self, g, start, end, alias='vda', ref=None):
        """What the guest reads over [start, end) is the chain's data (its raw reference)."""
        ref = ref or g.chains[alias].ref
        for off, ln, v in r.pattern_runs(ref, start, end):
            self.assertIsNotNone(v, 'the reference has mixed data at [%d, +%d)' % (off, ln))
            self.assertTrue(g.qemu.guest_read(alias, v, off, ln),
                            'the guest does not read 0x%02x over [%d, +%d) after the range stream' % (v, off, ln))

    def stream_range(self, g, offset, length, options=None, timeout=60, alias='vda'):
        """Start a range, wait for Finished; check what every completed range must show."""
        d = g.disk(alias)
        size = d.prop('Size')
        a, b = r.widen(offset, length, size)
        since = time.monotonic()
        self.assertIsNone(d.start(offset, length, options if options is not None else h.no_opts()))
        res, done, err = d.wait_finished(timeout, since)
        self.assertEqual((res, err), ('completed', ''), 'range [%d, +%d) ended %s' % (offset, length, res))
        f = self.assert_one_finished(d, since, settle=0.3)
        p = d.props()
        self.assertEqual(p['State'], 'completed')
        self.assertEqual(p['Mode'], 'range')
        self.assertEqual(p['BytesTotal'], b - a, 'BytesTotal is not the widened range [%d, %d)' % (a, b))
        self.assertEqual(p['BytesDone'], p['BytesTotal'], 'BytesDone != BytesTotal at completion')
        self.assertEqual(f[1], p['BytesDone'], 'Finished bytes_done differs from BytesDone')
        self.assertEqual(p['Error'], '')
        # api.md: Offset/Length are "the range asked for" ("to the end" spelled out), not the widened one.
        self.assertEqual((p['Offset'], p['Length']), (offset, (size - offset) if length == 0 else length),
                         'Offset/Length are not the range asked for')
        # The export and the filter go before Finished.
        self.assert_no_leftovers(g, 'Finished of range [%d, +%d)' % (offset, length))
        return a, b, p

    def check_range_effect(self, g, before, a, b, what, alias='vda'):
        """After [a, b) was streamed: exactly its backing clusters became local, nothing else
        changed, the map is qemu-img's, the data is the chain's."""
        d = g.disk(alias)
        after = self.api_map(d)
        zeros = r.zero_clusters(g.chains[alias].ref, a, b)
        bad = r.mismatches(r.after_range(before, a, b, zeros, SIZE), after, SIZE)
        self.assertEqual(bad, [], '%s: the map changed where it should not, or not where it should:\n  %s\n'
                         'before: %r\nafter: %r' % (what, '\n  '.join(bad), before, after))
        self.assert_map_is_qemu_img(g, after, what, alias)
        self.assert_data_is_chain(g, a, b, alias)
        return after


class RangeTest(RangeBase):

    def test_range_makes_exactly_its_clusters_local(self):
        g = self.guest()
        d = g.disk()
        before = self.api_map(d)
        self.assert_map_is_qemu_img(g, before, 'before any range')
        # Unaligned at both ends: [10M+5000, 40M+12345) covers base data, mid data above base,
        # the top's own [36M, 38M) and ends inside base's data.
        offset, end = 10 * U + 5000, 40 * U + 12345
        a, b, p = self.stream_range(g, offset, end - offset)
        self.assertEqual((a, b), (10 * U, 40 * U + CS))
        self.check_range_effect(g, before, a, b, 'range [10M+5000, 40M+12345)')
        # Outside the range the guest still reads the chain (through its backing files).
        self.assert_data_is_chain(g, 0, a)
        self.assert_data_is_chain(g, b, 64 * U)
        self.assertEqual(p['BackingChain'], [g.chains['vda'].mid, g.chains['vda'].base],
                         'a range stream must keep the backing chain')
        r.flush(g.qemu)
        rc, out = r.image_compare_shared(g.chains['vda'].top, g.chains['vda'].ref)
        self.assertEqual(rc, 0, 'the chain no longer reads as before: ' + out)
        rc, out = r.image_check_shared(g.chains['vda'].top)
        self.assertEqual(rc, 0, 'qemu-img check after a range: ' + out)

    def test_range_copies_each_byte_once(self):
        """QEMU writes what a range copies once. The range is NBD_CMD_CACHE on an export of the top
        node, which QEMU serves with the top node's own copy-on-read, serialised against the
        guest's writes to the same clusters. (Through a copy-on-read filter a CACHE copies twice:
        the filter's copy-on-read, then the outer one writing the same old data again, over any
        guest write that came in between.) Counted with the write bytes of QEMU's process."""
        g = self.guest()
        d = g.disk()
        a, b = 0, 64 * U
        before = self.api_map(d)
        copied = sum(ln for off, ln, dep, k in r.clip(before, a, b - a) if k == 'backing')
        zeros = r.zero_clusters(g.chains['vda'].ref, a, b)
        data = copied - sum(CS for c in zeros
                            if any(o <= c < o + ln and k == 'backing' for o, ln, dep, k in before))
        self.assertGreater(data, 32 * MiB, 'the chain has too little backing data in [%d, %d)' % (a, b))
        w0 = wchar(g.qemu.proc.pid)
        self.stream_range(g, a, b - a)
        written = wchar(g.qemu.proc.pid) - w0
        self.assertLessEqual(written, copied * 1.1 + MiB,
                             'QEMU wrote %d bytes to copy %d bytes of backing data: the range copied twice'
                             % (written, copied))
        self.assertGreaterEqual(written, data * 0.9,
                                'QEMU wrote only %d bytes for %d bytes of backing data (is the counter '
                                'right?)' % (written, data))
        self.check_range_effect(g, before, a, b, 'range [0, 64M)')

    def test_range_with_base_keeps_the_base(self):
        """Start(offset, length, {base}): only the images above `base` are copied from (through a
        copy-on-read filter whose bottom is the image above base); what is in base stays there."""
        g = self.guest()
        d = g.disk()
        ch = g.chains['vda']
        before = self.api_map(d)
        a, b = 0, 96 * U
        # Above base: mid (depth 2). base's own data (depth 3) stays in the backing.
        a, b, p = self.stream_range(g, a, b - a, opts(base=h.S(ch.base)))
        after = self.api_map(d)
        zeros = r.zero_clusters(ch.ref, a, b)
        expected = {}
        for c, v in r.per_cluster(before, 0, SIZE).items():
            if a <= c < b and v == (2, 'backing'):
                expected[c] = {(1, 'local'), (1, 'zero')} if c in zeros else {(1, 'local')}
            else:
                expected[c] = {v}
        self.assertIn((3, 'backing'), {v for c, v in r.per_cluster(after, a, b).items()},
                      'nothing of base is left in the range: the test chain does not test base')
        bad = r.mismatches(expected, after, SIZE)
        self.assertEqual(bad, [], 'a range with base=%s changed what it should not, or not what it should:\n  %s'
                         % (ch.base, '\n  '.join(bad)))
        self.assert_map_is_qemu_img(g, after, 'range with base')
        self.assert_data_is_chain(g, 0, SIZE)
        self.assertEqual(p['BackingChain'], [ch.mid, ch.base], 'a range stream must keep the backing chain')
        r.flush(g.qemu)
        rc, out = r.image_check_shared(ch.top)
        self.assertEqual(rc, 0, 'qemu-img check after a range with base: ' + out)

    def test_maps_do_not_speed_up_a_limited_stream(self):
        """GetAllocationMap polled during a full stream with a bandwidth limit. Each map used to add
        and remove an NBD export on the top node; every attach or detach drains the node, and QEMU
        7.2's stream job, woken early from its rate-limit sleep, copies its next chunk at once: a
        stream limited to 4 MiB/s ran at 80 MiB/s. The maps share one export while the stream runs;
        it goes when the stream ends."""
        g = self.guest()
        d = g.disk()
        limit = 2 * MiB
        since = time.monotonic()
        d.start(0, 0, opts(bandwidth=T(limit)))
        d.wait_state('running', 60)
        d.wait_bytes_done(1, 60)
        # At least 12 maps over at least 3 s, however slow a loaded machine makes each map: a count
        # of maps done in a fixed time was a timed assertion.
        maps, b0, t0 = 0, d.prop('BytesDone'), time.monotonic()
        while maps < 12 or time.monotonic() - t0 < 3:
            self.assertLess(time.monotonic() - t0, 120, 'only %d maps in 120 s' % maps)
            self.api_map(d)
            maps += 1
        b1, t1 = d.prop('BytesDone'), time.monotonic()
        rate = (b1 - b0) / (t1 - t0)
        self.assertEqual(d.prop('State'), 'running', 'the stream ended before the maps were done')
        self.assertLess(rate, limit * 1.5, '%d maps in %.1f s made a stream limited to %d B/s copy %d B/s'
                        % (maps, t1 - t0, limit, rate))
        nodes, exports = r.leftovers(g.qemu.qmp)
        self.assertEqual(len(exports), 1, 'the maps during the stream should share one export: %r' % exports)
        self.assertEqual(exports[0].get('node-name'), d.prop('NodeName'), exports)
        # The stream completes with the export on its node: the chain is dropped all the same.
        self.assertIsNone(d.call('SetBandwidth', 't', T(0)))
        res, done, err = d.wait_finished(60, since)
        self.assertEqual((res, err), ('completed', ''))
        self.assertEqual(d.prop('BackingChain'), [])
        h.wait_until(lambda: r.leftovers(g.qemu.qmp) == ([], []), 5, 'the shared export to go after the stream')
        self.assertEqual([k for o, l, dep, k in self.api_map(d) if k == 'backing'], [])
        self.assertEqual(r.leftovers(g.qemu.qmp), ([], []), 'a map with no stream running left its export')

    def test_adjacent_and_overlapping_ranges(self):
        g = self.guest()
        d = g.disk()
        m = self.api_map(d)
        steps = [
            (4 * U, 4 * U),                  # base data
            (8 * U, 4 * U),                  # adjacent, after it
            (2 * U, 3 * U),                  # adjacent before, overlapping the first
            (10 * U + 1, 8 * U),             # overlapping the second, unaligned
            (46 * U, 8 * U),                 # mid's zeros [48M, 52M) inside
            (94 * U + 70000, 4 * U),         # mid's data into the absent [96M, ...)
            (94 * U, 2 * U),                 # already local: nothing to copy
        ]
        for off, ln in steps:
            a, b, p = self.stream_range(g, off, ln)
            m = self.check_range_effect(g, m, a, b, 'range [%d, +%d)' % (off, ln))
        local = r.local_bytes(m, 2 * U, 18 * U + CS)
        self.assertEqual(local, 16 * U + CS, 'the ranges [2M, 18M+64K) should all be local now: %r' % m)

    def test_length_zero_is_to_the_end(self):
        g = self.guest()
        d = g.disk()
        before = self.api_map(d)
        offset = 180 * U + 1
        a, b, p = self.stream_range(g, offset, 0)
        self.assertEqual((a, b), (180 * U, SIZE))
        self.assertEqual(p['BytesTotal'], SIZE - 180 * U)
        self.check_range_effect(g, before, a, b, 'range [180M+1, end)')
        # The last cluster alone, by length 0.
        a, b, p = self.stream_range(g, SIZE - 1, 0)
        self.assertEqual((a, b), (SIZE - CS, SIZE))

    def test_invalid_ranges(self):
        g = self.guest()
        d = g.disk()
        snap = self.snapshot()
        since = time.monotonic()
        cases = [
            (SIZE, 0, 'offset == Size, length 0'),
            (SIZE, 1, 'offset == Size'),
            (SIZE + CS, 0, 'offset past the end'),
            (SIZE - 1, 2, 'one byte past the end'),
            (SIZE - CS, 2 * CS, 'a cluster past the end'),
            (0, SIZE + 1, 'length past the end'),
            (1, h.U64_MAX, 'offset + length overflows'),
            (h.U64_MAX, 1, 'offset + length overflows (2)'),
            (h.U64_MAX, h.U64_MAX, 'both at the maximum'),
            (1 << 63, 1 << 63, 'offset + length wraps to 0'),
        ]
        for off, ln, what in cases:
            e = self.assertDBusError(h.ERR_INVALID_RANGE, d.start, off, ln, h.no_opts())
            self.assertIn(str(SIZE), e.message, 'the InvalidRange message should give the size (%s)' % what)
        for off, ln, what in cases[1:]:
            self.assertDBusError(h.ERR_INVALID_RANGE, d.call, 'GetAllocationMap', 'tt', T(off), T(ln))
        self.client.pump(0.5)
        self.assertEqual(d.finished(since), [], 'a refused Start emitted Finished')
        self.assertSnapshotEqual(snap, self.snapshot(), 'refused range Starts')
        self.assertEqual(d.prop('State'), 'idle')
        # The map at the very end is empty, not an error; a valid range still works afterwards.
        self.assertEqual(r.get_map(d, SIZE, 0), [])
        self.stream_range(g, SIZE - CS, CS)

    def test_cancel_mid_range_then_start_finishes_only_the_rest(self):
        g = self.guest()
        d = g.disk()
        ch = g.chains['vda']
        bw = 4 * MiB
        off, ln = 0, 32 * U           # base data throughout
        before = self.api_map(d)
        self.assertEqual(r.local_bytes(before, off, off + ln), 0)
        since = time.monotonic()
        d.start(off, ln, opts(bandwidth=T(bw)))
        d.wait_state('running', 10)
        d.wait_bytes_done(10 * MiB, 20)
        d.cancel()
        res, done, err = d.wait_finished(20, since)
        self.assertEqual(res, 'cancelled', 'Finished%r' % ((res, done, err),))
        self.assert_one_finished(d, since)
        self.assertEqual(d.prop('State'), 'cancelled')
        self.assertGreaterEqual(done, 10 * MiB)
        self.assertLess(done, ln, 'the cancel came after everything was copied: slow the stream down')
        self.assert_no_leftovers(g, 'a cancelled range')
        mid = self.api_map(d)
        self.assert_map_is_qemu_img(g, mid, 'after the cancel')
        # A prefix is local: starts at the range's start, at least what Finished counted, no gaps
        # but the reads that were in flight (never more than 8 at a time).
        loc = [(o, l) for o, l, dep, k in r.clip(mid, off, ln) if k == 'local']
        self.assertTrue(loc and loc[0][0] == off, 'no local prefix after the cancel: %r' % mid)
        local_before = r.local_bytes(mid, off, off + ln)
        self.assertGreaterEqual(local_before, done, 'Finished says %d bytes were done, %d are local' % (done, local_before))
        self.assertLess(local_before, ln)
        self.assertLessEqual(local_before - loc[0][1], 8 * MiB, 'local clusters scattered far after the prefix: %r' % loc)
        for o, l, dep, k in r.clip(mid, off, ln):
            self.assertIn(k, ('local', 'backing'), mid)
        r.flush(g.qemu)
        rc, out = r.image_check_shared(ch.top)
        self.assertEqual(rc, 0, 'qemu-img check after a cancelled range: ' + out)
        self.assert_data_is_chain(g, off, off + ln)

        # Again: only the rest is copied, at the same bandwidth.
        rest = ln - local_before
        since = time.monotonic()
        t0 = time.monotonic()
        d.start(off, ln, opts(bandwidth=T(bw)))
        res, done2, err = d.wait_finished(30, since)
        elapsed = time.monotonic() - t0
        self.assertEqual((res, err), ('completed', ''))
        self.assertEqual(done2, ln, 'the second run counts the whole range as done')
        after = self.api_map(d)
        self.assertEqual(r.local_bytes(after, off, off + ln), ln, 'the range is not all local: %r' % after)
        self.assertEqual(r.mismatches(r.after_range(mid, off, off + ln, set(), SIZE), after, SIZE), [])
        # What was already local counts as done at once: the second run takes ~rest/bw.
        early = [c.get('BytesDone') for t, c, i in self.client.props_changed(d.path, h.IFACE_STREAM, since)
                 if t - since < 1.0 and 'BytesDone' in c]
        self.assertTrue(early and max(early) >= local_before,
                        'the already-local %d bytes were not counted within 1 s: %r' % (local_before, early))
        expect = rest / bw
        full = ln / bw
        log_line = ('cancel after %d of %d bytes local; second run %.2f s for the remaining %d bytes at %d B/s '
                    '(expected ~%.2f s; the whole range would take %.2f s)' % (local_before, ln, elapsed, rest, bw,
                                                                                 expect, full))
        h.log(log_line)
        self.assertLess(elapsed, expect + 2.0, log_line)
        self.assertGreater(elapsed, max(0.0, (rest - 2 * MiB) / bw - 0.5), log_line)
        self.assertLess(elapsed, full - 0.5 * (full - expect), log_line)
        self.check_range_effect(g, mid, off, off + ln, 'the second run')

    def test_guest_writes_during_a_range_are_preserved(self):
        g = self.guest()
        d = g.disk()
        q = g.qemu
        ch = g.chains['vda']
        off, ln = 0, 32 * U
        since = time.monotonic()
        d.start(off, ln, opts(bandwidth=T(4 * MiB)))
        d.wait_state('running', 10)
        d.wait_bytes_done(2 * MiB, 20)
        writes = [
            (0x5a, 28 * U, 2 * CS),              # whole clusters, not yet streamed
            (0x5b, 30 * U + 4096, 4096),         # inside a cluster not yet streamed (COW from base)
            (0x5c, 0, 8192),                     # already streamed
            (0x5d, 31 * U - 512, 1024),          # across a cluster boundary, not yet streamed
        ]
        pos = d.prop('BytesDone')
        self.assertLess(pos, 20 * MiB, 'the stream ran too fast to write ahead of it')
        m = self.api_map(d, 28 * U, 4 * U)
        self.assertEqual([k for o, l, dep, k in m], ['backing'],
                         'the clusters to write are already local before the write: %r' % m)
        for pat, o, l in writes:
            q.guest_write('vda', pat, o, l)
            ch.apply_to_reference(pat, o, l)
        self.assertEqual(d.prop('State'), 'running', 'the writes came after the stream ended')
        res, done, err = d.wait_finished(30, since)
        self.assertEqual((res, err), ('completed', ''))
        self.assert_one_finished(d, since)
        for pat, o, l in writes:
            self.assertTrue(q.guest_read('vda', pat, o, l),
                            'guest write 0x%02x at [%d, +%d) was overwritten by the range stream' % (pat, o, l))
        # Around the sub-cluster writes, base's data.
        self.assertTrue(q.guest_read('vda', 0x11, 30 * U, 4096))
        self.assertTrue(q.guest_read('vda', 0x11, 30 * U + 8192, CS - 8192))
        self.assertTrue(q.guest_read('vda', 0x11, 31 * U - CS, CS - 512))
        self.assertTrue(q.guest_read('vda', 0x11, 31 * U + 512, CS - 512))
        m = self.api_map(d, off, ln)
        self.assertEqual([k for o, l, dep, k in m], ['local'], 'the range is not all local: %r' % m)
        r.flush(q)
        rc, out = r.image_compare_shared(ch.top, ch.ref)
        self.assertEqual(rc, 0, 'the disk differs from the chain plus the guest writes: ' + out)
        rc, out = r.image_check_shared(ch.top)
        self.assertEqual(rc, 0, out)

    def test_pause_resume_set_bandwidth(self):
        g = self.guest()
        d = g.disk()
        off, ln = 0, 64 * U
        since = time.monotonic()
        d.start(off, ln, opts(bandwidth=T(4 * MiB)))
        p = d.props()
        self.assertEqual(p['Mode'], 'range')
        self.assertEqual((p['Offset'], p['Length']), (off, ln))
        self.assertEqual(p['BytesTotal'], ln)
        self.assertEqual(p['Bandwidth'], 4 * MiB)
        self.assertIn(p['State'], ('running',))
        self.assertGreater(p['StartTime'], 0)
        d.wait_bytes_done(4 * MiB, 20)
        # Pause: BytesDone stops (once the reads in flight are in).
        d.pause()
        d.wait_state('paused', 5)
        self.client.pump(0.6)
        v1 = d.prop('BytesDone')
        m1 = self.api_map(d, off, ln)
        self.client.pump(1.5)
        v2 = d.prop('BytesDone')
        m2 = self.api_map(d, off, ln)
        self.assertEqual(v1, v2, 'BytesDone grew while paused')
        self.assertEqual(m1, m2, 'the map changed while paused')
        self.assertEqual(d.prop('State'), 'paused')
        d.resume()
        d.wait_state('running', 5)
        d.wait_bytes_done(v2 + 1, 5)
        # SetBandwidth live: 1 MiB/s holds, 0 lets it run out.
        d.set_bandwidth(1 * MiB)
        self.assertEqual(d.prop('Bandwidth'), 1 * MiB)
        self.client.pump(1.0)
        b0, t0 = d.prop('BytesDone'), time.monotonic()
        self.client.pump(3.0)
        b1, t1 = d.prop('BytesDone'), time.monotonic()
        rate = (b1 - b0) / (t1 - t0)
        h.log('range at 1 MiB/s: measured %.2f MiB/s' % (rate / MiB))
        self.assertLess(rate, 1.6 * MiB, 'SetBandwidth(1 MiB/s) did not slow the range down (%.0f B/s)' % rate)
        self.assertGreater(rate, 0.5 * MiB, 'SetBandwidth(1 MiB/s): the range crawls at %.0f B/s' % rate)
        self.assertLess(b1, ln, 'the range ended before 0 was set')
        t_unlimited = time.monotonic()
        d.set_bandwidth(0)
        self.assertEqual(d.prop('Bandwidth'), 0)
        res, done, err = d.wait_finished(30, since)
        self.assertEqual((res, done, err), ('completed', ln, ''))
        self.assertLess(time.monotonic() - t_unlimited, 10, 'SetBandwidth(0) did not lift the limit')
        self.assert_one_finished(d, since)
        p = d.props()
        self.assertEqual((p['State'], p['BytesDone'], p['BytesTotal']), ('completed', ln, ln))
        states = [c['State'] for t, c, i in self.client.props_changed(d.path, h.IFACE_STREAM, since) if 'State' in c]
        self.assertEqual(states, ['running', 'paused', 'running', 'completed'], 'State changes announced')
        # BytesDone never goes backwards.
        seen = [c['BytesDone'] for t, c, i in self.client.props_changed(d.path, h.IFACE_STREAM, since)
                if 'BytesDone' in c]
        self.assertEqual(seen, sorted(seen), 'BytesDone went backwards')

    def test_busy_while_a_range_runs(self):
        g = self.guest()
        d = g.disk()
        since = time.monotonic()
        d.start(0, 32 * U, opts(bandwidth=T(4 * MiB)))
        d.wait_state('running', 10)
        self.assertDBusError(h.ERR_BUSY, d.start, 64 * U, U, h.no_opts())
        self.assertDBusError(h.ERR_BUSY, d.start, 0, 0, h.no_opts())
        # A map while the range runs works, and shows part of it local already.
        d.wait_bytes_done(2 * MiB, 20)
        m = self.api_map(d)
        self.assertGreater(r.local_bytes(m, 0, 32 * U), 0)
        d.cancel()
        res, done, err = d.wait_finished(20, since)
        self.assertEqual(res, 'cancelled')
        self.assert_one_finished(d, since)

    def test_back_to_back_operations(self):
        """A map, then at once a range, a map, a range...: each must find QEMU's NBD server up."""
        g = self.guest()
        d = g.disk()
        failures = []
        for i in range(12):
            m, e = d.try_call('GetAllocationMap', 'tt', T(0), T(0))
            if e is not None:
                failures.append('round %d: GetAllocationMap right after the last operation: %s' % (i, e))
            since = time.monotonic()
            off = (i * 4 + 1) * U
            _, e = d.try_call('Start', 'tta{sv}', T(off), T(2 * U), h.no_opts())
            if e is not None:
                failures.append('round %d: Start(%d, %d) right after a map: %s' % (i, off, 2 * U, e))
                continue
            f = d.wait_finished(30, since)
            if f[0] != 'completed':
                failures.append('round %d: range ended %r' % (i, f))
        if failures:
            self.fail('%d of 24 calls failed:\n  %s' % (len(failures), '\n  '.join(failures)))


class RangeFailureTest(RangeBase):
    """Whatever ends a range job, no filter node, export or helper stays."""

    env_per_test = True

    # Each failure in both shapes of a range: an export of the top node (no base), or of a
    # copy-on-read filter whose bottom keeps the base (base given).
    MODES = (False, True)

    def start_slow(self, g, base, ln=64 * U):
        d = g.disk()
        since = time.monotonic()
        o = {'bandwidth': T(2 * MiB)}
        if base:
            o['base'] = h.S(g.chains['vda'].base)
        d.start(0, ln, opts(**o))
        d.wait_state('running', 10)
        d.wait_bytes_done(1, 20)
        nodes, exports = r.leftovers(g.qemu.qmp)
        self.assertEqual(len(exports), 1, 'one export while a range runs: %r' % exports)
        if base:
            self.assertEqual(len(nodes), 1, 'one filter node while a range with base runs: %r' % nodes)
            self.assertEqual(exports[0].get('node-name'), nodes[0], exports)
        else:
            self.assertEqual(nodes, [], 'a filter node while a range without base runs: %r' % nodes)
            self.assertEqual(exports[0].get('node-name'), d.prop('NodeName'), exports)
        return d, since

    def test_helper_killed(self):
        for base in self.MODES:
            with self.subTest(base=base):
                self._helper_killed(base)

    def _helper_killed(self, base):
        g = self.guest()
        d, since = self.start_slow(g, base)
        helpers = r.pull_helpers(self.env)
        self.assertEqual(len(helpers), 1, 'one blockstream-pull child while a range runs: %r' % helpers)
        pid, argv = helpers[0]
        self.assertIn('--pull', argv)
        offline.assert_limits(self, pid, offline.OWN_HELPER_LIMITS, 'blockstream-pull')
        os.kill(pid, signal.SIGKILL)
        res, done, err = d.wait_finished(20, since)
        self.assertEqual(res, 'failed', 'Finished%r' % ((res, done, err),))
        self.assertTrue(err, 'a failed range carries no error text')
        self.assert_one_finished(d, since)
        p = d.props()
        self.assertEqual(p['State'], 'failed')
        self.assertEqual(p['Error'], err)
        self.assert_no_leftovers(g, 'the helper was killed')
        # And the disk works again.
        self.stream_range(g, 0, 2 * U)

    def test_qemu_killed(self):
        for base in self.MODES:
            with self.subTest(base=base):
                self._qemu_killed(base)

    def _qemu_killed(self, base):
        g = self.guest()
        d, since = self.start_slow(g, base)
        g.qemu.kill()
        res, done, err = d.wait_finished(20, since)
        self.assertEqual(res, 'failed', 'Finished%r' % ((res, done, err),))
        self.assertTrue(err)
        self.assert_one_finished(d, since)
        self.assertEqual(d.prop('State'), 'failed')
        h.wait_until(lambda: r.pull_helpers(self.env) == [], 10, 'the pull helper to go')
        try:
            h.wait_until(lambda: self.server_sockets(g) == [], 5, 'the NBD server socket to go')
        except AssertionError:
            self.fail('the daemon left its NBD server socket %s behind after QEMU died mid-range'
                      % self.server_sockets(g))

    def test_daemon_killed_and_restarted(self):
        """A range job survives its daemon: the helper dies with it, the restarted daemon removes
        the old filter and export and carries the same job on with a new helper (what is local is
        skipped), and Finished comes once, at the real end. Without base: SIGKILL while running;
        with base: SIGTERM while paused, and it stays paused until Resume."""
        for base in self.MODES:
            with self.subTest(base=base):
                self._daemon_killed_and_restarted(base)

    def _daemon_killed_and_restarted(self, base):
        g = self.guest()
        ch = g.chains['vda']
        before_map = self.api_map(g.disk())
        d, since = self.start_slow(g, base)
        d.wait_bytes_done(2 * MiB, 20)
        p0 = d.props()
        helpers = r.pull_helpers(self.env)
        self.assertEqual(len(helpers), 1, helpers)
        old_nodes, old_exports = r.leftovers(g.qemu.qmp)
        if base:
            self.assertIsNone(d.call('Pause'))
            self.client.wait_prop(d.path, h.IFACE_STREAM, 'State', 'paused', timeout=10)
            self.assertEqual(self.env.stop_daemon(signal.SIGTERM), 0)
        else:
            self.assertEqual(self.env.kill_daemon(), -signal.SIGKILL)
        # The helper follows its daemon (its control socket closes).
        pid = helpers[0][0]
        h.wait_until(lambda: not r.alive(pid), 10, 'the pull helper to exit after its daemon died')
        restart = time.monotonic()
        self.env.start_daemon()
        c = self.client
        c.wait_for(lambda: c.try_call(h.MANAGER_PATH, h.IFACE_MANAGER, 'GetGuest', 's', g.name)[0] == g.path,
                   15, 'guest %s to be republished' % g.name)
        c.wait_prop(g.path, h.IFACE_GUEST, 'Running', True, timeout=10)
        helpers = h.wait_until(lambda: r.pull_helpers(self.env), 10, 'a new pull helper to carry the range on')
        self.assertEqual(len(helpers), 1, helpers)
        self.assertNotEqual(helpers[0][0], pid)
        # The old filter and export go; the resumed job has its own.
        def only_new():
            nodes, exports = r.leftovers(g.qemu.qmp)
            return (len(exports) == 1 and exports[0]['id'] not in [e['id'] for e in old_exports]
                    and len(nodes) == (1 if base else 0) and not set(nodes) & set(old_nodes))
        h.wait_until(only_new, 10, 'only the resumed job\'s export (and filter) in QEMU')
        p = d.props()
        self.assertEqual((p['State'], p['Mode'], p['Offset'], p['Length'], p['StartTime'], p['Bandwidth']),
                         ('paused' if base else 'running', 'range', p0['Offset'], p0['Length'], p0['StartTime'],
                          p0['Bandwidth']), 'the job after the restart is not the job before it')
        self.assertEqual(p['Error'], '')
        self.assertEqual(d.finished(restart), [], 'Finished for a job that goes on')
        if base:
            # Paused it stays: nothing more becomes local. (BytesDone may still catch up once with
            # what was copied after the last save before the restart.)
            local = r.local_bytes(self.api_map(d), 0, 64 * U)
            c.pump(1.0)
            self.assertEqual(r.local_bytes(self.api_map(d), 0, 64 * U), local, 'a paused job copies after the restart')
            self.assertEqual(d.prop('State'), 'paused')
            self.assertIsNone(d.call('Resume'))
        self.assertIsNone(d.call('SetBandwidth', 't', T(0)))
        res, done, err = d.wait_finished(60, restart)
        self.assertEqual((res, err), ('completed', ''))
        self.assert_one_finished(d, restart)
        p = d.props()
        self.assertEqual((p['State'], p['BytesDone'], p['BytesTotal'], p['StartTime']),
                         ('completed', 64 * U, 64 * U, p0['StartTime']))
        self.assert_no_leftovers(g, 'the resumed range')
        # Exactly what a range does, with or without a restart in the middle.
        after = self.api_map(g.disk())
        if base:
            still = [c_ for c_, v in r.per_cluster(after, 0, 64 * U).items() if v[0] == 2 and v[1] == 'backing']
            self.assertEqual(still, [], 'the resumed range with base left mid\'s data in the backing')
            self.assertIn((3, 'backing'), set(r.per_cluster(after, 0, 64 * U).values()), 'base was copied')
        else:
            self.check_range_effect(g, before_map, 0, 64 * U, 'a range resumed after a restart')
        self.assert_data_is_chain(g, 0, 64 * U)
        rc, out = r.image_check_shared(ch.top)
        self.assertEqual(rc, 0, out)


class SharedMapExportTest(RangeBase):
    """The export that maps share during a full stream, when the daemon dies."""

    env_per_test = True

    def test_daemon_killed_while_maps_share_an_export(self):
        g = self.guest()
        d = g.disk()
        d.start(0, 0, opts(bandwidth=T(2 * MiB)))
        d.wait_state('running', 10)
        self.api_map(d)
        self.assertEqual(len(r.leftovers(g.qemu.qmp)[1]), 1, 'the maps\' export is not kept during the stream')
        self.assertEqual(self.env.kill_daemon(), -signal.SIGKILL)
        self.env.start_daemon()
        c = self.client
        c.wait_prop(g.path, h.IFACE_GUEST, 'Running', True, timeout=10)
        # The restarted daemon stops the NBD server it left in QEMU, and the export with it.
        h.wait_until(lambda: r.leftovers(g.qemu.qmp) == ([], []), 10, 'the export of the dead daemon to go')
        # The stream ran on in QEMU; the daemon follows it, and maps work as before.
        self.assertIn(d.prop('State'), ('running', 'completed'))
        self.api_map(d)
        since = time.monotonic()
        if d.prop('State') == 'running':
            d.cancel()
            res, done, err = d.wait_finished(20, since)
            self.assertEqual(res, 'cancelled')
        h.wait_until(lambda: r.leftovers(g.qemu.qmp) == ([], []), 5, 'the shared export to go after the stream')


class RemoteRangeTest(RangeBase):
    """A range over a template behind NBD: the pull helper's reads are larger there (2 MiB), and
    its first one larger still (QEMU's largest bounce buffer, 16 MiB): none may reach past the
    range."""

    def test_remote_range_copies_exactly_its_clusters(self):
        og = nbdtemplate.guest_over_template(self)
        self.addCleanup(self.assert_no_leftovers, og)
        d = og.disk
        # Unaligned, inside the template's first 4 MiB of 0x60, far shorter than the first read.
        offset, end = 1 * MiB + 5000, 3 * MiB + 12345
        a, b = r.widen(offset, end - offset, d.prop('Size'))
        since = time.monotonic()
        d.start(offset, end - offset, h.no_opts())
        res, done, err = d.wait_finished(60, since)
        self.assertEqual((res, err, done), ('completed', '', b - a))
        top = [(o, ln) for o, ln, depth, kind in r.get_map(d) if depth == 1]
        self.assertEqual(top, [(a, b - a)], 'the overlay holds other clusters than the range [%d, %d)' % (a, b))
        self.assertTrue(og.qemu.guest_read('vda', 0x60, a, b - a), 'the range does not read as the template')
        # The rest of the disk still reads from the template, whole.
        since = time.monotonic()
        d.start(0, 0, opts(engine=h.S('prefetch')))
        res, done, err = d.wait_finished(120, since)
        self.assertEqual((res, err), ('completed', ''))
        og.qemu.quit()
        res = h.qemu_img('compare', '-f', 'qcow2', '-F', 'raw', og.top, og.template, check=False)
        self.assertEqual(res.returncode, 0, res.stdout + res.stderr)


class HeldBackProgressTest(RangeBase):
    """ProgressSignalsPerSecond=1: a disk waits 1 s between two progress signals, and the pull
    helper reports every 250 ms, so most of a range's values are held back for the disk's turn.
    One held back when the source stalls (the template's server hangs) must still go out in its
    turn, though no newer value follows to carry it: a client that follows the signals must not
    show a BytesDone that Get no longer returns."""

    daemon_config = 'ProgressSignalsPerSecond=1\n'

    def cancel_if_running(self, d):
        """A test that failed half-way leaves no job for the checks of leftovers to find."""
        if d.prop('State') in ('running', 'paused'):
            since = time.monotonic()
            d.cancel()
            d.wait_finished(30, since)

    def test_last_value_signalled_in_a_stall(self):
        self.stall_and_resume(0, 32 * MiB)

    def test_last_value_signalled_in_a_qemu_job_stall(self):
        """The same for QEMU's block-stream, whose progress the daemon polls."""
        self.stall_and_resume(0, 0, engine=h.S('stream'))

    def stall_and_resume(self, offset, length, **options):
        """Start a job over a template behind nbdkit, stop nbdkit once the daemon holds a value
        back, and want the last signalled BytesDone to be Get's; then let the job complete."""
        og = nbdtemplate.guest_over_template(self)
        self.addCleanup(self.assert_no_leftovers, og)
        d, nbdkit = og.disk, og.server
        c = self.client

        def signalled():
            """The last BytesDone a PropertiesChanged carried since the start (None: none yet)."""
            c.pump()
            done = [ch['BytesDone'] for _, ch, _ in c.props_changed(d.path, h.IFACE_STREAM, since)
                    if 'BytesDone' in ch]
            return done[-1] if done else None

        def got():
            v = d.prop('BytesDone')
            c.pump()        # a signal sent before the reply is counted before v is compared
            return v

        since = time.monotonic()
        # The template's first 4 MiB of data at 1 MiB/s: seconds of progress, reported often.
        d.start(offset, length, opts(bandwidth=T(1 * MiB), **options))
        self.addCleanup(self.cancel_if_running, d)
        c.wait_for(lambda: (signalled() or 0) > 0, 30, 'a PropertiesChanged with BytesDone > 0')
        # The daemon now holds a newer value back (its turn is 1 s after the last signal): the
        # source stalls right then, with at most a report or two still to come.
        c.wait_for(lambda: got() > signalled(), 30, 'a BytesDone newer than the last signalled one')
        os.kill(nbdkit.pid, signal.SIGSTOP)
        self.addCleanup(lambda: nbdkit.poll() is None and os.kill(nbdkit.pid, signal.SIGCONT))
        box = {'v': got(), 't': time.monotonic()}

        def stable():
            v = got()
            if v != box['v']:
                box['v'], box['t'] = v, time.monotonic()
            return time.monotonic() - box['t'] >= 2.0

        c.wait_for(stable, 30, "Get's BytesDone to stay the same for 2 s")
        self.assertEqual(d.prop('State'), 'running')
        done = box['v']
        self.assertLess(done, d.prop('BytesTotal'), 'the range ended before the source stalled')
        deadline = time.monotonic() + 5     # the turn is 1 s after the last signal
        while signalled() != done and time.monotonic() < deadline:
            c.pump(0.05)
        self.assertEqual(signalled(), done, "the last PropertiesChanged's BytesDone is not Get's, stable for 2 s")
        # The source goes on: the range completes.
        os.kill(nbdkit.pid, signal.SIGCONT)
        d.set_bandwidth(0)
        res, _, err = d.wait_finished(60, since)
        self.assertEqual((res, err), ('completed', ''))
        self.assertEqual(signalled(), d.prop('BytesTotal'))


def dbus_dict(d, sig='sv'):
    import dbus
    return dbus.Dictionary(d, signature=sig)


class MapLimitsTest(RangeBase):
    """Allocation maps hold a helper and an export each (and, for a guest that is not running, a
    storage helper): at most 16 at once across all guests, and each one stopped after
    MapTimeoutSec=. Maps are held up deterministically by stopping the guests' QEMU (SIGSTOP):
    QEMU then answers no QMP command, so a map waits in its setup until QEMU goes on."""

    MAPS_MAX = 16              # range.c
    MAPS_PER_GUEST_MAX = 8     # range.c
    MAP_TIMEOUT = 3            # MapTimeoutSec= of this class's daemon
    daemon_config = 'MapTimeoutSec=%d\n' % MAP_TIMEOUT

    def stopped(self, q):
        os.kill(q.proc.pid, signal.SIGSTOP)
        self.addCleanup(lambda: q.running() and os.kill(q.proc.pid, signal.SIGCONT))

    def send_maps(self, d, n, box):
        for _ in range(n):
            self.client.conn.call_async(h.BUS_NAME, d.path, h.IFACE_STREAM, 'GetAllocationMap', 'tt', (T(0), T(0)),
                                        lambda *a: box.append(('ok', a)),
                                        lambda e: box.append((e.get_dbus_name(), e.get_dbus_message())),
                                        timeout=120)

    def barrier(self):
        """Every call sent before is handled by the daemon (queued, answered or refused) once
        this returns: it handles the messages of one connection in order."""
        self.client.call(h.MANAGER_PATH, 'org.freedesktop.DBus.Peer', 'Ping')

    def test_global_cap(self):
        guests = [self.guest() for _ in range(3)]
        for g in guests:
            self.stopped(g.qemu)
        box = []
        for g in guests:
            self.send_maps(g.disk(), self.MAPS_PER_GUEST_MAX, box)
        self.barrier()
        sent = len(guests) * self.MAPS_PER_GUEST_MAX
        refused = sent - self.MAPS_MAX
        self.client.wait_for(lambda: len(box) >= refused, 10, 'the refusals of the maps beyond %d' % self.MAPS_MAX)
        self.barrier()
        self.client.pump(0)
        self.assertEqual(len(box), refused, 'maps answered while every QEMU is stopped: %r' % box)
        self.assertEqual({b[0] for b in box}, {h.ERR_BUSY}, box)
        self.assertIn('at most %d at once' % self.MAPS_MAX, box[0][1])
        # QEMU goes on: the 16 that were taken complete.
        for g in guests:
            os.kill(g.qemu.proc.pid, signal.SIGCONT)
        self.client.wait_for(lambda: len(box) == sent, 60, 'the %d maps to complete' % self.MAPS_MAX)
        self.assertEqual([b[0] for b in box[refused:]], ['ok'] * self.MAPS_MAX, box[refused:])
        # Places are free again.
        self.assertTrue(self.api_map(guests[0].disk()))

    def test_deadline(self):
        g = self.guest()
        d = g.disk()
        self.stopped(g.qemu)
        box = []
        self.send_maps(d, 1, box)
        self.client.wait_for(lambda: box, 3 * self.MAP_TIMEOUT + 20, 'the map to be stopped at its deadline')
        self.assertEqual(box[0][0], 'org.freedesktop.DBus.Error.Timeout', box)
        self.assertIn('MapTimeoutSec', box[0][1])
        # QEMU goes on: the map's export goes from QEMU, no helper is left, and maps work again.
        os.kill(g.qemu.proc.pid, signal.SIGCONT)
        h.wait_until(lambda: r.leftovers(g.qemu.qmp) == ([], []), 30, "the map's export to leave QEMU")
        h.wait_until(lambda: r.pull_helpers(self.env) == [], 30, "the map's helper to go")
        self.assertTrue(self.api_map(d))
        self.assertTrue(self.env.daemon.running())


class OfflineBase(RangeBase):

    def offline_guest(self, top, name=None):
        """Register a guest that is not running, with the chain at `top` as vda: (name, disk)."""
        name = name or self.unique_name()
        o = dbus_dict({'disks': dbus_dict({'vda': top}, 'ss'), 'formats': dbus_dict({'vda': 'qcow2'}, 'ss')})
        path = self.register(name, '', o)
        self.addCleanup(self.unregister_quietly, name)
        self.assertEqual(self.client.get(path, h.IFACE_GUEST, 'Running'), False)
        dp = h.disk_path(name, 'vda')
        return name, h.Disk(self.client, dp)


class MapTest(OfflineBase):

    cap_image = None

    def test_random_chains_offline(self):
        for seed in (1, 2, 3, 4, 5):
            with self.subTest(seed=seed):
                ch = r.RandomChain(os.path.join(self.env.images, 'rnd%d' % seed), seed, size=32 * MiB)
                name, d = self.offline_guest(ch.top)
                whole = r.expected_map(ch.top)
                kinds = {k for o, l, dep, k in whole}
                self.assertEqual(kinds, set(r.KINDS), 'seed %d makes no chain with all four kinds' % seed)
                self.assertTrue(any(dep == 3 for o, l, dep, k in whole), 'nothing at depth 3')
                m = self.api_map(d)
                self.assertEqual(m, whole, 'seed %d: GetAllocationMap(0, 0) differs from qemu-img map' % seed)
                rng = random.Random(seed * 1000)
                subs = [(0, ch.size), (ch.size - 1, 1), (0, 1), (12345, 0)]
                for _ in range(12):
                    o = rng.randrange(0, ch.size)
                    ln = rng.randrange(1, ch.size - o + 1)
                    if rng.random() < 0.5:
                        o -= o % 512
                    subs.append((o, ln))
                for o, ln in subs:
                    got = self.api_map(d, o, ln)
                    want = r.api_from_qemu_img(r.qemu_img_map(ch.top), o, (ch.size - o) if ln == 0 else ln)
                    self.assertEqual(got, want, 'seed %d: GetAllocationMap(%d, %d)' % (seed, o, ln))
                self.assertEqual(r.pull_helpers(self.env), [])
                h.wait_until(lambda: r.daemon_children(self.env) == [], 15,
                             'the storage helper to exit after the maps')

    def test_map_of_many_status_windows(self):
        """A 40 GiB disk: the helper asks block status in windows of 4 GiB - 2 MiB; the map crosses
        ten windows and must be qemu-img's, in order, an extent that spans a window's end handed
        on once. (A helper that used windows' answers out of order failed here.)"""
        window = 4 * h.GiB - 2 * MiB
        size = 40 * h.GiB
        dd = os.path.join(self.env.images, 'windows')
        os.makedirs(dd)
        base, top = os.path.join(dd, 'base.qcow2'), os.path.join(dd, 'top.qcow2')
        h.qemu_img('create', '-q', '-f', 'qcow2', base, str(size))
        h.qemu_img('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top, str(size))
        n = size // window
        self.assertEqual(n, 10)
        r.script_qemu_io(base, ['write -P 0x42 %d %d' % (i * window + h.GiB, MiB) for i in range(n)])
        cmds = ['write -P 0x44 %d %d' % (n * window + 4 * MiB, CS)]  # the last window, 20 MiB
        for i in range(n):
            cmds.append('write -P 0x%02x %d %d' % (0x11 + i, (i + 1) * window - MiB, 2 * MiB))
            cmds.append('write -z %d %d' % (i * window + 2 * h.GiB, MiB))
            if i % 2 == 0:
                cmds.append('write -P 0x33 %d %d' % (i * window + 3 * h.GiB, CS))
        r.script_qemu_io(top, cmds)
        want = r.expected_map(top)
        self.assertEqual({k for o, l, dep, k in want}, set(r.KINDS))
        for i in range(1, n + 1):
            self.assertIn((i * window - MiB, 2 * MiB, 1, 'local'), want)
        name, d = self.offline_guest(top)
        self.assertEqual(d.prop('Size'), size)
        self.assertEqual(self.api_map(d), want, 'GetAllocationMap(0, 0) of 40 GiB differs from qemu-img map')
        o, ln = window - 5 * MiB - 512, 3 * window + 7 * MiB
        self.assertEqual(self.api_map(d, o, ln), r.clip(want, o, ln),
                         'GetAllocationMap(%d, %d) differs from qemu-img map' % (o, ln))

    def test_offline_back_to_back_calls(self):
        """Calls that come as soon as the one before was answered: each starts the storage helper
        again if it needs to, none fails because the idle helper is on its way out."""
        ch = h.Chain(os.path.join(self.env.images, 'b2b'), SIZE)
        name, d = self.offline_guest(ch.top)
        want = r.expected_map(ch.top)
        failures = []
        for i in range(8):
            got, e = d.try_call('GetAllocationMap', 'tt', T(0), T(0))
            if e is not None:
                failures.append('round %d: GetAllocationMap: %s' % (i, e))
            elif [tuple(x) for x in got] != want:
                failures.append('round %d: GetAllocationMap differs from qemu-img map' % i)
        since = time.monotonic()
        _, e = d.try_call('Start', 'tta{sv}', T(0), T(U), h.no_opts())
        if e is not None:
            failures.append('Start right after a map: %s' % e)
        else:
            f = d.wait_finished(30, since)
            if f[0] != 'completed':
                failures.append('Start right after a map ended %r' % (f,))
            _, e = d.try_call('GetAllocationMap', 'tt', T(0), T(U))
            if e is not None:
                failures.append('GetAllocationMap right after Finished: %s' % e)
        if failures:
            self.fail('%d calls failed:\n  %s' % (len(failures), '\n  '.join(failures)))

    def test_random_chain_running(self):
        ch = r.RandomChain(os.path.join(self.env.images, 'rnd-run'), 7, size=32 * MiB)
        q = self.start_qemu({'vda': ch}, name=self.unique_name('rq'))
        name = self.unique_name()
        self.register(name, q.daemon_socket)
        self.addCleanup(self.unregister_quietly, name)
        d = h.Disk(self.client, h.disk_path(name, 'vda'))
        m = self.api_map(d)
        self.assertEqual(m, r.expected_map(ch.top), 'GetAllocationMap of a running guest differs from qemu-img map')
        for o, ln in ((5 * MiB + 3, 7 * MiB), (31 * MiB, 0)):
            self.assertEqual(self.api_map(d, o, ln), r.api_from_qemu_img(r.qemu_img_map(ch.top), o,
                                                                        ln or ch.size - o))
        self.assertEqual(r.leftovers(q.qmp), ([], []))

    def test_semantics_on_the_standard_chain(self):
        g = self.guest()
        d = g.disk()
        m = self.api_map(d)
        at = {k: [(o, l) for o, l, dep, kk in m if kk == k] for k in r.KINDS}
        # harness.Chain: top's own data local, base's and mid's backing (depth 3 and 2), mid's
        # zeros backing too, [96M, 128M) absent. No zero clusters in the top yet: make some.
        self.assertIn((36 * U, 2 * U), at['local'])
        self.assertIn((0, 32 * U), at['backing'])
        self.assertIn((96 * U, 32 * U), at['absent'])
        self.assertEqual(at['zero'], [])
        depth = {(o, l): dep for o, l, dep, k in m}
        self.assertEqual(depth[(0, 32 * U)], 3)
        self.assertEqual(depth[(48 * U, 4 * U)], 2, 'the zeros of mid are backing, depth 2: %r' % m)
        self.assertEqual(depth[(96 * U, 32 * U)], 0)
        self.assertEqual(depth[(36 * U, 2 * U)], 1)
        r.hmp_qemu_io(g.qemu, 'vda', 'write -z %d %d' % (200 * U, 4 * U))
        m = self.api_map(d)
        self.assertIn((200 * U, 4 * U, 1, 'zero'), m)
        self.assert_map_is_qemu_img(g, m, 'after a zero write')

    def test_map_read_late_by_the_daemon(self):
        """The helper sends its extents and exits before the daemon gets to read them (the
        daemon stopped for a moment, as on a loaded machine): the map must still arrive whole.
        200 extents, all of which fit in the control socket's buffer."""
        dd = os.path.join(self.env.images, 'late')
        os.makedirs(dd)
        top = os.path.join(dd, 'top.qcow2')
        h.qemu_img('create', '-q', '-f', 'qcow2', top, str(SIZE))
        r.script_qemu_io(top, ['write -P 0x11 %d %d' % (2 * i * CS, CS) for i in range(100)])
        want = r.expected_map(top)
        self.assertEqual(len(want), 200)
        q = self.start_qemu({'vda': type('Chain', (), {'top': top})()}, name=self.unique_name('q'))
        name = self.unique_name()
        self.register(name, q.daemon_socket)
        self.addCleanup(self.unregister_quietly, name)
        path = h.disk_path(name, 'vda')
        daemon = self.env.daemon.proc.pid
        results = []
        for rnd in range(4):
            box = {}
            self.client.conn.call_async(h.BUS_NAME, path, h.IFACE_STREAM, 'GetAllocationMap', 'tt', (T(0), T(0)),
                                        lambda *a: box.setdefault('ok', a),
                                        lambda e: box.setdefault('err', e))
            helper = r.wait_for_value(lambda: r.children(daemon), bool, 10, 'the map helper to start', interval=0)
            os.kill(daemon, signal.SIGSTOP)
            try:
                late = r.wait_for_value(lambda: not r.alive(helper[0]), bool, 5, 'the helper to exit', interval=0.01)
            except AssertionError:
                late = False
            finally:
                os.kill(daemon, signal.SIGCONT)
            self.client.wait_for(lambda: box, 30, 'the reply of GetAllocationMap')
            if 'err' in box:
                results.append('round %d (helper gone before the daemon read%s): %s: %s'
                               % (rnd, '' if late else ' (?)', box['err'].get_dbus_name(),
                                  box['err'].get_dbus_message()))
            elif [tuple(h.unwrap(e)) for e in box['ok'][0]] != want:
                results.append('round %d: the map differs from qemu-img map' % rnd)
        self.assertEqual(r.leftovers(q.qmp), ([], []))
        if results:
            self.fail('%d of 4 maps failed:\n  %s' % (len(results), '\n  '.join(results)))

    # -- more than 65536 extents

    CAP_CLUSTER = 4096
    CAP_RUNS = 70000

    def cap_chain(self):
        """A 573 MB chain with 4 KiB clusters whose map has 140000 extents: every other cluster of
        the top holds data or zeros in turn, the one between nothing (absent), but for one
        cluster of the base (backing). Made once per class."""
        cls = type(self)
        if cls.cap_image is None:
            cs, n = self.CAP_CLUSTER, self.CAP_RUNS
            size = 2 * n * cs
            dd = os.path.join(self.env.images, 'cap')
            os.makedirs(dd)
            base, top = os.path.join(dd, 'base.qcow2'), os.path.join(dd, 'top.qcow2')
            h.qemu_img('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=%d' % cs, base, str(size))
            h.qemu_img('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=%d' % cs, '-b', base, '-F', 'qcow2',
                       top, str(size))
            r.script_qemu_io(top, ['write -z %d %d' % (2 * i * cs, cs) if i % 2 else
                                   'write -P 0x%02x %d %d' % (1 + i % 250, 2 * i * cs, cs) for i in range(n)])
            h.qemu_io(base, 'write -P 0x42 %d %d' % (cs, cs))
            want = r.expected_map(top)
            self.assertEqual(len(want), 2 * n)
            cls.cap_image = (top, size, want)
        return cls.cap_image

    def test_extent_cap_and_continuation(self):
        """More than 65536 extents: a reply holds exactly 65536, the next call goes on from the
        end of the last one, and the pages together are qemu-img's map."""
        top, size, want = self.cap_chain()
        name, d = self.offline_guest(top)
        t0 = time.monotonic()
        first = r.get_map(d)
        h.log('GetAllocationMap with %d extents in the reply: %.2f s' % (len(first), time.monotonic() - t0))
        self.assertEqual(len(first), r.MAP_EXTENTS_MAX, 'a reply must hold at most (and here exactly) 65536 extents')
        self.assertEqual(r.map_problems(first, 0, size), [])
        self.assertEqual(first, want[:r.MAP_EXTENTS_MAX])
        whole, pages = r.get_whole_map(d, size=size)
        self.assertEqual([len(p) for p in pages], [65536, 65536, 2 * self.CAP_RUNS - 2 * 65536])
        for p in pages:
            self.assertEqual(r.map_problems(p, p[0][0], size - p[0][0]), [])
        self.assertEqual(whole, want, 'the pages together differ from qemu-img map')
        # A page that starts inside an extent and has a length.
        o = pages[1][0][0] + 100
        page = r.get_map(d, o, size - o - 5)
        self.assertEqual(len(page), r.MAP_EXTENTS_MAX)
        self.assertEqual(page, r.clip(want, o, size - o - 5)[:r.MAP_EXTENTS_MAX])
        # The last page, by an offset and length that end in the middle of the last extent.
        o = pages[2][0][0]
        page = r.get_map(d, o, size - o - 1)
        self.assertEqual(page, r.clip(want, o, size - o - 1))

    def test_cli_map_pages_through_the_cap(self):
        top, size, want = self.cap_chain()
        name, d = self.offline_guest(top)
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=self.env.bus.address)
        res = h.run([h.BLOCKSTREAMCTL, '--json', 'map', name, 'vda'], check=False, env=env, timeout=300)
        self.assertEqual(res.returncode, 0, 'blockstreamctl --json map: %s' % res.stderr)
        cli = [(e['offset'], e['length'], e['depth'], e['kind']) for e in json.loads(res.stdout)]
        self.assertEqual(len(cli), len(want))
        self.assertEqual(cli, want, 'blockstreamctl --json map over %d extents' % len(want))


class OfflineRangeTest(OfflineBase):

    def test_range_on_an_offline_guest(self):
        ch = h.Chain(os.path.join(self.env.images, self.unique_name('img')), SIZE)
        name, d = self.offline_guest(ch.top)
        before = self.api_map(d)
        self.assertEqual(before, r.expected_map(ch.top))
        h.wait_until(lambda: r.daemon_children(self.env) == [], 15, 'the storage helper to exit after the map')
        since = time.monotonic()
        off, ln = 20 * U + 777, 30 * U
        a, b = r.widen(off, ln, SIZE)
        d.start(off, ln, h.no_opts())
        res, done, err = d.wait_finished(60, since)
        # Finished means the storage helper let go of the images (and of their locks).
        for path in (ch.top, ch.mid, ch.base):
            self.assertFalse(h.image_locked(path), '%s still locked when Finished arrived' % path)
        self.assertEqual((res, done, err), ('completed', b - a, ''))
        self.assert_one_finished(d, since)
        p = d.props()
        self.assertEqual((p['State'], p['Mode'], p['BytesDone'], p['BytesTotal']), ('completed', 'range', b - a, b - a))
        self.assertEqual(r.pull_helpers(self.env), [])
        h.wait_until(lambda: r.daemon_children(self.env) == [], 15, 'the storage helper to exit after the range')
        self.assertEqual(self.client.get(h.guest_path(name), h.IFACE_GUEST, 'Running'), False)
        after = r.expected_map(ch.top)
        zeros = r.zero_clusters(ch.ref, a, b)
        bad = r.mismatches(r.after_range(before, a, b, zeros, SIZE), after, SIZE)
        self.assertEqual(bad, [], 'offline range: the image map changed where it should not:\n  ' + '\n  '.join(bad))
        self.assertEqual(self.api_map(d), after)
        # A map answers before its storage helper quits (only a job's Finished waits for that).
        h.wait_until(lambda: r.daemon_children(self.env) == [], 15, 'the storage helper to exit after the last map')
        rc, out = h.image_check(ch.top)
        self.assertEqual(rc, 0, out)
        rc, out = ch.compare()
        self.assertEqual(rc, 0, out)
        self.assertEqual(h.image_backing(ch.top), ch.mid, 'a range must keep the backing file')
        # A rate-limited one, cancelled: the helpers go away too.
        since = time.monotonic()
        d.start(64 * U, 32 * U, opts(bandwidth=T(2 * MiB)))
        d.wait_bytes_done(1, 20)
        self.assertEqual(len(r.storage_helpers(self.env)), 1)
        self.assertEqual(len(r.pull_helpers(self.env)), 1)
        d.cancel()
        res, done, err = d.wait_finished(20, since)
        self.assertEqual(res, 'cancelled')
        h.wait_until(lambda: r.daemon_children(self.env) == [], 15,
                     'the helpers to exit after a cancelled range')
        self.assertEqual(h.image_check(ch.top)[0], 0)
        self.assertEqual(ch.compare()[0], 0)


    def test_pull_helper_cannot_reach_the_storage_helper(self):
        """Issue 11: the pull helper parses NBD replies; the storage helper's QEMU holds the offline
        guest's image read-write. Under one uid, a pull helper taken over could signal that QEMU
        and open its /proc/PID/mem for writing. They run under two identities of the guest."""
        ch = h.Chain(os.path.join(self.env.images, self.unique_name('img')), SIZE)
        name, d = self.offline_guest(ch.top)
        since = time.monotonic()
        d.start(0, 64 * U, opts(bandwidth=T(2 * MiB)))
        d.wait_bytes_done(1, 20)
        pulls, stores = r.pull_helpers(self.env), offline.storage_helper_of(self.env, ch.top)
        self.assertEqual((len(pulls), len(stores)), (1, 1), (pulls, stores))
        pull, storage = offline.Proc(pulls[0][0]), stores[0]
        puid, pgid, suid, sgid = pull.uids[0], pull.gids[0], storage.uids[0], storage.gids[0]
        self.assertEqual(offline.reach_as(self, puid, pgid, storage.pid), [],
                         "the pull helper's identity (uid %d) reaches the storage helper (uid %d)" % (puid, suid))
        self.assertEqual(offline.reach_as(self, suid, sgid, pull.pid), [])
        self.assertEqual(offline.reach_as(self, suid, sgid, storage.pid), ['signal', 'write memory'])
        self.assertNotEqual(puid, suid)
        self.assertEqual(puid, offline.identity(self.env, name)[0])
        self.assertEqual(suid, offline.storage_identity(self.env, name)[0])
        d.cancel()
        res, done, err = d.wait_finished(20, since)
        self.assertEqual(res, 'cancelled')
        h.wait_until(lambda: r.daemon_children(self.env) == [], 15, 'the helpers to exit after a cancelled range')


class OfflineRangeRestartTest(OfflineBase):
    env_per_test = True

    def test_range_of_an_offline_guest_survives_a_restart(self):
        """The storage helper and the pull helper die with the daemon (SIGKILL); the restarted
        daemon starts new ones and carries the same range job to its end."""
        ch = h.Chain(os.path.join(self.env.images, self.unique_name('img')), SIZE)
        name, d = self.offline_guest(ch.top)
        before = self.api_map(d)
        since = time.monotonic()
        a, b = 0, 64 * U
        d.start(a, b - a, opts(bandwidth=T(2 * MiB)))
        d.wait_bytes_done(2 * MiB, 20)
        p0 = d.props()
        old = [pid for pid, argv in r.daemon_children(self.env)]
        self.assertEqual(len(old), 2, 'a storage helper and a pull helper: %r' % r.daemon_children(self.env))
        self.assertEqual(self.env.kill_daemon(), -signal.SIGKILL)
        for pid in old:
            h.wait_until(lambda: not r.alive(pid), 10, 'helper %d to die with the daemon' % pid)
        restart = time.monotonic()
        self.env.start_daemon()
        h.wait_until(lambda: len(r.pull_helpers(self.env)) == 1 and len(r.storage_helpers(self.env)) == 1, 15,
                     'a new storage helper and pull helper to carry the range on')
        p = d.props()
        self.assertEqual((p['State'], p['Mode'], p['StartTime'], p['Error']), ('running', 'range', p0['StartTime'], ''))
        self.assertIsNone(d.call('SetBandwidth', 't', T(0)))
        res, done, err = d.wait_finished(60, restart)
        self.assertEqual((res, done, err), ('completed', b - a, ''))
        self.assert_one_finished(d, restart)
        self.assertEqual(len(d.finished(since)), 1, 'Finished more than once for one job')
        h.wait_until(lambda: r.daemon_children(self.env) == [], 15, 'the helpers to exit after the range')
        after = r.expected_map(ch.top)
        bad = r.mismatches(r.after_range(before, a, b, r.zero_clusters(ch.ref, a, b), SIZE), after, SIZE)
        self.assertEqual(bad, [], 'the resumed offline range: the map changed where it should not:\n  '
                         + '\n  '.join(bad))
        self.assertEqual(h.image_check(ch.top)[0], 0)
        self.assertEqual(ch.compare()[0], 0)


class CliRangeTest(RangeBase):
    needs_cli = True

    def ctl(self, *args, timeout=120):
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=self.env.bus.address)
        return h.run([h.BLOCKSTREAMCTL] + list(args), check=False, timeout=timeout, env=env)

    def test_pull_range_and_map(self):
        g = self.guest()
        d = g.disk()
        before = self.api_map(d)
        res = self.ctl('pull', g.name, 'vda', '--offset=64M', '--length=32M', '--wait')
        self.assertEqual(res.returncode, 0, 'blockstreamctl pull --wait: %s %s' % (res.stdout, res.stderr))
        self.assertIn('completed', res.stdout, 'blockstreamctl pull --wait printed: %r' % res.stdout)
        p = d.props()
        self.assertEqual((p['State'], p['Mode'], p['Offset'], p['Length']), ('completed', 'range', 64 * MiB, 32 * MiB))
        self.assertEqual((p['BytesDone'], p['BytesTotal']), (32 * MiB, 32 * MiB))
        self.check_range_effect(g, before, 64 * MiB, 96 * MiB, 'blockstreamctl pull --offset=64M --length=32M')
        res = self.ctl('--json', 'map', g.name, 'vda')
        self.assertEqual(res.returncode, 0, res.stderr)
        cli = [(e['offset'], e['length'], e['depth'], e['kind']) for e in json.loads(res.stdout)]
        self.assertEqual(cli, self.api_map(d), 'blockstreamctl --json map differs from GetAllocationMap')
        res = self.ctl('--json', 'map', g.name, 'vda', '--offset=60M', '--length=40M')
        self.assertEqual(res.returncode, 0, res.stderr)
        cli = [(e['offset'], e['length'], e['depth'], e['kind']) for e in json.loads(res.stdout)]
        self.assertEqual(cli, self.api_map(d, 60 * MiB, 40 * MiB))
        # --json pull --wait: the Finished signal as JSON.
        since = time.monotonic()
        res = self.ctl('--json', 'pull', g.name, 'vda', '--offset=%d' % (176 * MiB + 5), '--length=1M', '--wait')
        self.assertEqual(res.returncode, 0, res.stderr)
        out = json.loads(res.stdout)
        self.client.pump(0.3)
        self.assertEqual(d.finished(since), [(out['result'], out['bytes_done'], out['error'])])
        self.assertEqual(out, {'result': 'completed', 'bytes_done': MiB + r.CLUSTER, 'error': ''})
        # Plain output: one line per extent with the kind last.
        res = self.ctl('map', g.name, 'vda')
        self.assertEqual(res.returncode, 0, res.stderr)
        lines = [l.split() for l in res.stdout.splitlines() if l.strip() and l.split()[0].isdigit()]
        self.assertEqual([(int(l[0]), int(l[1]), l[-1]) for l in lines],
                         [(o, ln, k) for o, ln, dep, k in self.api_map(d)])


if __name__ == '__main__':
    h.main()
