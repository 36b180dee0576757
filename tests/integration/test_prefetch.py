#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""The "prefetch, then cut" engine (Start option engine=prefetch, service/prefetch.c), against the
real daemon, its pull helper and real QEMU: phase 1 copies the backing chain's data through the
pull helper, phase 2 is QEMU's block-stream that only drops the backing link. To the caller it is
one full-stream job: guest writes during the copy survive, the data is the flattened chain's,
`base` is kept, Pause/Resume/Cancel work in each phase, a daemon restarted in either phase carries
the job on and Finished comes once. Nothing here is timed: each step waits for its event."""

import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import nbdtemplate  # noqa: E402
import ranges as r  # noqa: E402
from harness import GiB, MiB, T, opts  # noqa: E402

SIZE = r.SIZE
U = SIZE // 256
TIB = 1024 * GiB


class SparseChain:
    """base.qcow2 <- top.qcow2 of `size` virtual bytes with 16 MiB of data at each of `spots`: a
    disk whose phase 2 (QEMU's walk of the whole virtual size) lasts long enough to act in it."""

    def __init__(self, directory, size, spots):
        os.makedirs(directory, exist_ok=True)
        self.size = size
        self.spots = spots
        self.base = os.path.join(directory, 'base.qcow2')
        self.top = os.path.join(directory, 'top.qcow2')
        h.qemu_img('create', '-q', '-f', 'qcow2', self.base, str(size))
        h.qemu_img('create', '-q', '-f', 'qcow2', '-b', self.base, '-F', 'qcow2', self.top)
        cmds = []
        for i, off in enumerate(spots):
            cmds += ['-c', 'write -P 0x%02x %d %d' % (0x41 + i, off, 16 * MiB)]
        h.run(['qemu-io', '-f', 'qcow2'] + cmds + [self.base])


def compare_with_base(top, base):
    """qemu-img compare -U of two qcow2 images: (exit status, output)."""
    res = h.run(['qemu-img', 'compare', '-U', '-f', 'qcow2', '-F', 'qcow2', top, base], check=False, timeout=300)
    return res.returncode, res.stdout + res.stderr


class PrefetchBase(r.RangeTestCase):

    def sparse_guest(self, size=TIB):
        name = self.unique_name()
        ch = SparseChain(os.path.join(self.env.images, self.unique_name('img')), size,
                         [0, size // 2, size - 16 * MiB])
        q = self.start_qemu({'vda': ch}, name=name)
        path = self.register(name, q.daemon_socket)
        self.addCleanup(self._drop_guest, name, q)
        g = h.Guest(self, name, q, {'vda': ch}, path)
        self.addCleanup(self.assert_no_leftovers, g)
        return g

    def start(self, d, **kw):
        since = time.monotonic()
        o = {'engine': h.S('prefetch')}
        o.update(kw)
        self.assertIsNone(d.start(0, 0, opts(**o)))
        return since

    def qemu_jobs(self, g):
        return [j for j in g.qemu.qmp.jobs() if j.get('type') == 'stream']

    def wait_phase1(self, g, d, at_least=1):
        """Phase 1 runs: a pull helper, no QEMU job, some progress."""
        helpers = h.wait_until(lambda: r.pull_helpers(self.env), 20, 'the pull helper of phase 1')
        # Local images: the helper's own 128 KiB reads (test_auto_picks_prefetch_for_a_remote_...).
        self.assertEqual([a for a in helpers[0][1] if a.startswith('--chunk')], [])
        d.wait_bytes_done(at_least, 30)
        self.assertEqual(self.qemu_jobs(g), [], 'a QEMU stream job during phase 1')
        self.assertEqual(d.prop('Engine'), 'prefetch')

    def wait_phase2(self, g, timeout=120):
        """Phase 2 runs: QEMU's stream job exists, the helper is gone."""
        jobs = h.wait_until(lambda: self.qemu_jobs(g), timeout, 'QEMU\'s block-stream of phase 2')
        self.assertEqual(len(jobs), 1, jobs)
        self.assertTrue(jobs[0]['device'].startswith('bsd-'), jobs)
        h.wait_until(lambda: r.pull_helpers(self.env) == [], 10, 'the pull helper to go after phase 1')
        return jobs[0]

    def progress_seen(self, d, since):
        return [c['BytesDone'] for t, c, i in self.client.props_changed(d.path, h.IFACE_STREAM, since)
                if 'BytesDone' in c]

    def assert_completed(self, g, d, since, chain_after):
        res, done, err = d.wait_finished(180, since)
        self.assertEqual((res, err), ('completed', ''), 'Finished%r' % ((res, done, err),))
        f = self.assert_one_finished(d, since, settle=0.3)
        p = d.props()
        self.assertEqual((p['State'], p['Mode'], p['Engine']), ('completed', 'full', 'prefetch'))
        self.assertEqual(p['BytesDone'], p['BytesTotal'])
        self.assertEqual(f[1], p['BytesDone'])
        self.assertEqual(list(p['BackingChain']), chain_after)
        seen = self.progress_seen(d, since)
        self.assertEqual(seen, sorted(seen), 'BytesDone went backwards across the phases')
        self.assertEqual(self.qemu_jobs(g), [], 'QEMU still has the job after Finished')
        return p


class PrefetchTest(PrefetchBase):

    def test_options(self):
        g = self.guest()
        d = g.disk()
        self.assertEqual(d.prop('Engine'), '')
        # mirror exists now (test_mirror.py); it keeps no base.
        e = self.assertDBusError(h.ERR_INVALID_ARGS, d.start, 0, 0,
                                 opts(engine=h.S('mirror'), base=h.S(g.chains['vda'].base)))
        self.assertIn('mirror', e.message)
        self.assertDBusError(h.ERR_INVALID_ARGS, d.start, 0, 0, opts(engine=h.S('fastest')))
        self.assertDBusError(h.ERR_INVALID_ARGS, d.start, 0, 0, opts(engine=h.U(1)))
        self.assertDBusError(h.ERR_INVALID_ARGS, d.start, 0, 4 * U, opts(engine=h.S('prefetch')))
        # base = the direct backing: nothing above it to prefetch.
        self.assertDBusError(h.ERR_INVALID_ARGS, d.start, 0, 0,
                             opts(engine=h.S('prefetch'), base=h.S(g.chains['vda'].mid)))
        self.assertEqual(d.prop('State'), 'idle', 'a refused Start changed the state')
        # engine=stream is QEMU's block-stream, as before.
        since = time.monotonic()
        d.start(0, 0, opts(engine=h.S('stream')))
        res, done, err = d.wait_finished(60, since)
        self.assertEqual((res, err), ('completed', ''))
        self.assertEqual(d.prop('Engine'), 'stream')

    def test_cli_pull_engine(self):
        g = self.guest()
        d = g.disk()
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=self.env.bus.address)

        def ctl(*args):
            return h.run([h.BLOCKSTREAMCTL] + list(args), check=False, timeout=120, env=env)
        res = ctl('pull', g.name, 'vda', '--engine=fastest')
        self.assertEqual(res.returncode, 2, res.stdout + res.stderr)
        res = ctl('pull', g.name, 'vda', '--engine=mirror', '--base=' + g.chains['vda'].base)
        self.assertEqual(res.returncode, 1, res.stdout + res.stderr)
        self.assertIn('cannot keep base', res.stderr)
        res = ctl('pull', g.name, 'vda', '--engine=prefetch', '--wait')
        self.assertEqual(res.returncode, 0, res.stdout + res.stderr)
        p = d.props()
        self.assertEqual((p['State'], p['Engine'], list(p['BackingChain'])), ('completed', 'prefetch', []))

    def test_auto_picks_prefetch_for_a_remote_template_only(self):
        # A local chain: QEMU's block-stream.
        g = self.guest()
        d = g.disk()
        since = time.monotonic()
        d.start(0, 0, h.no_opts())
        res, done, err = d.wait_finished(60, since)
        self.assertEqual((res, err, d.prop('Engine')), ('completed', '', 'stream'))
        # A template behind NBD: prefetch, then cut.
        og = nbdtemplate.guest_over_template(self)
        q, rd, top, template = og.qemu, og.disk, og.top, og.template
        since = time.monotonic()
        rd.start(0, 0, opts(bandwidth=T(4 * MiB)))     # throttled: its helper lives to be looked at
        self.assertEqual(rd.prop('Engine'), 'prefetch', 'auto did not pick prefetch for a remote template')
        # From a remote backing the helper reads 2 MiB at a time (each a read of QEMU's NBD client,
        # which keeps 16 in flight): not the 128 KiB it reads local images with.
        helpers = h.wait_until(lambda: r.pull_helpers(self.env), 20, 'the pull helper of phase 1')
        self.assertIn('--chunk=2097152', helpers[0][1])
        rd.set_bandwidth(0)
        res, done, err = rd.wait_finished(120, since)
        self.assertEqual((res, err), ('completed', ''), 'Finished%r' % ((res, done, err),))
        self.assertEqual(list(rd.prop('BackingChain')), [])
        q.quit()
        res = h.qemu_img('compare', '-f', 'qcow2', '-F', 'raw', top, template, check=False)
        self.assertEqual(res.returncode, 0, res.stdout + res.stderr)
        self.assertIsNone(h.image_backing(top), 'the overlay stands alone')

    def test_auto_keeps_stream_for_a_local_chain_named_by_options(self):
        """libvirt's way: every image a -blockdev node, each backing given as a node. QEMU names
        such an image by its options (json:{…, "file": {"driver": "file", …}}): still a local
        file, so auto keeps block-stream and a range reads 128 KiB at a time. (A name that did not
        start with '/' counted as remote: prefetch and 2 MiB reads.)"""
        name = self.unique_name()
        d = os.path.join(self.env.images, self.unique_name('img'))
        os.makedirs(d)
        base, mid, top = (os.path.join(d, n + '.qcow2') for n in ('base', 'mid', 'top'))
        h.qemu_img('create', '-q', '-f', 'qcow2', base, str(SIZE))
        h.run(['qemu-io', '-f', 'qcow2', '-c', 'write -P 0x61 0 %d' % (4 * MiB), base])
        h.qemu_img('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', mid)    # relative names
        h.run(['qemu-io', '-f', 'qcow2', '-c', 'write -P 0x62 %d %d' % (8 * MiB, 4 * MiB), mid])
        h.qemu_img('create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', top)
        self.qemu_guest(name, [
            '-blockdev', 'driver=file,filename=%s,node-name=f-base' % base,
            '-blockdev', '{"driver": "qcow2", "file": "f-base", "backing": null, "node-name": "n-base"}',
            '-blockdev', 'driver=file,filename=%s,node-name=f-mid' % mid,
            '-blockdev', 'driver=qcow2,file=f-mid,backing=n-base,node-name=n-mid',
            '-blockdev', 'driver=file,filename=%s,node-name=f-top' % top,
            '-blockdev', 'driver=qcow2,file=f-top,backing=n-mid,node-name=n-top',
            '-device', 'virtio-blk-pci,drive=n-top,id=vda'])
        disk = h.Disk(self.client, h.disk_path(name, 'vda'))
        chain = list(disk.prop('BackingChain'))
        self.assertEqual(len(chain), 2, chain)
        self.assertTrue(any(c.startswith('json:') for c in chain), 'no image named by its options: %r' % chain)
        # A range, throttled so that its helper can be looked at: local reads.
        since = time.monotonic()
        self.assertIsNone(disk.start(0, 16 * MiB, opts(bandwidth=T(1 * MiB))))
        helpers = h.wait_until(lambda: r.pull_helpers(self.env), 20, 'the pull helper of the range')
        self.assertEqual([a for a in helpers[0][1] if a.startswith('--chunk')], [])
        disk.set_bandwidth(0)
        res, done, err = disk.wait_finished(60, since)
        self.assertEqual((res, err), ('completed', ''))
        # The full stream: auto keeps block-stream.
        since = time.monotonic()
        disk.start(0, 0, h.no_opts())
        self.assertEqual(disk.prop('Engine'), 'stream', 'auto took a local chain named by options for a remote one')
        res, done, err = disk.wait_finished(60, since)
        self.assertEqual((res, err), ('completed', ''), 'Finished%r' % ((res, done, err),))
        self.assertEqual(list(disk.prop('BackingChain')), [])

    def test_data_is_the_chain_and_guest_writes_survive(self):
        g = self.guest()
        d = g.disk()
        q = g.qemu
        ch = g.chains['vda']
        since = self.start(d, bandwidth=T(4 * MiB))
        self.wait_phase1(g, d, 1)
        pos = r.local_bytes(r.get_map(d), 0, SIZE)
        writes = [
            (0x5a, 60 * U, 2 * r.CLUSTER),         # base's data, not yet copied
            (0x5b, 90 * U + 4096, 4096),           # inside a cluster of mid's, not yet copied
            (0x5c, 0, 8192),                       # the start, copied already
            (0x5d, 180 * U - 512, 1024),           # across a cluster boundary in base's second run
            (0x5e, 200 * U, r.CLUSTER),            # absent from the whole chain
        ]
        m = r.get_map(d, 60 * U, 2 * r.CLUSTER)
        self.assertEqual([k for o, l, dep, k in m], ['backing'], 'already copied before the write: %r' % m)
        for pat, o, ln in writes:
            q.guest_write('vda', pat, o, ln)
            ch.apply_to_reference(pat, o, ln)
        self.assertEqual(d.prop('State'), 'running', 'the writes came after the job ended')
        self.assertEqual(self.qemu_jobs(g), [], 'the writes came after phase 1')
        h.log('prefetch: guest writes with %d bytes local' % pos)
        d.set_bandwidth(0)
        self.assert_completed(g, d, since, [])
        for pat, o, ln in writes:
            self.assertTrue(q.guest_read('vda', pat, o, ln),
                            'guest write 0x%02x at [%d, +%d) was lost by the prefetch' % (pat, o, ln))
        r.flush(q)
        self.assertEqual(h.image_backing(ch.top), None, 'the image still names a backing file')
        rc, out = r.image_compare_shared(ch.top, ch.ref)
        self.assertEqual(rc, 0, 'the disk differs from the flattened chain plus the guest writes: ' + out)
        rc, out = r.image_check_shared(ch.top)
        self.assertEqual(rc, 0, out)

    def test_base_is_kept(self):
        g = self.guest()
        d = g.disk()
        ch = g.chains['vda']
        since = self.start(d, base=h.S(ch.base))
        self.assert_completed(g, d, since, [ch.base])
        r.flush(g.qemu)
        self.assertEqual(h.image_backing(ch.top), ch.base)
        m = r.get_map(d)
        # mid's data is local now, base's is not.
        self.assertEqual(r.local_bytes(m, 64 * U, 96 * U), 32 * U, m)
        self.assertEqual(r.local_bytes(m, 0, 32 * U), 0, 'base\'s data was copied: %r' % m)
        rc, out = r.image_compare_shared(ch.top, ch.ref)
        self.assertEqual(rc, 0, out)

    def test_pause_resume_cancel_in_phase1(self):
        g = self.guest()
        d = g.disk()
        ch = g.chains['vda']
        since = self.start(d, bandwidth=T(2 * MiB))
        self.wait_phase1(g, d, 1)
        d.pause()
        d.wait_state('paused', 10)
        m1 = r.get_map(d)
        self.client.pump(1.0)
        self.assertEqual(r.get_map(d), m1, 'the map changed while paused')
        self.assertEqual(self.qemu_jobs(g), [])
        d.resume()
        d.wait_state('running', 10)
        d.wait_bytes_done(d.prop('BytesDone') + 1, 20)
        d.cancel()
        res, done, err = d.wait_finished(30, since)
        self.assertEqual(res, 'cancelled', 'Finished%r' % ((res, done, err),))
        self.assert_one_finished(d, since)
        p = d.props()
        self.assertEqual((p['State'], p['Engine']), ('cancelled', 'prefetch'))
        self.assertEqual(list(p['BackingChain']), ch.backing_files, 'a cancelled prefetch dropped the chain')
        self.assertEqual(self.qemu_jobs(g), [], 'phase 2 began after a cancel in phase 1')
        states = [c['State'] for t, c, i in self.client.props_changed(d.path, h.IFACE_STREAM, since) if 'State' in c]
        self.assertEqual(states, ['running', 'paused', 'running', 'cancelled'])
        r.flush(g.qemu)
        rc, out = r.image_compare_shared(ch.top, ch.ref)
        self.assertEqual(rc, 0, out)
        # And a new stream finishes the job.
        since = self.start(d)
        self.assert_completed(g, d, since, [])

    def test_daemon_restarted_in_phase1(self):
        """SIGKILL in phase 1: the helper dies with the daemon, the new daemon removes its export and
        carries the same job on with a new helper; then phase 2; one Finished."""
        g = self.guest()
        d = g.disk()
        ch = g.chains['vda']
        since = self.start(d, bandwidth=T(2 * MiB))
        self.wait_phase1(g, d, 2 * MiB)
        p0 = d.props()
        old = r.pull_helpers(self.env)
        self.assertEqual(len(old), 1, old)
        self.assertEqual(self.env.kill_daemon(), -signal.SIGKILL)
        h.wait_until(lambda: not r.alive(old[0][0]), 10, 'the pull helper to exit after its daemon died')
        restart = time.monotonic()
        self.env.start_daemon()
        c = self.client
        c.wait_for(lambda: c.try_call(h.MANAGER_PATH, h.IFACE_MANAGER, 'GetGuest', 's', g.name)[0] == g.path,
                   15, 'guest %s to be republished' % g.name)
        helpers = h.wait_until(lambda: r.pull_helpers(self.env), 15, 'a new pull helper to carry phase 1 on')
        self.assertNotEqual(helpers[0][0], old[0][0])
        p = d.props()
        self.assertEqual((p['State'], p['Mode'], p['Engine'], p['StartTime'], p['Bandwidth']),
                         ('running', 'full', 'prefetch', p0['StartTime'], p0['Bandwidth']),
                         'the job after the restart is not the job before it')
        self.assertEqual(d.finished(restart), [], 'Finished for a job that goes on')
        self.assertIsNone(d.call('SetBandwidth', 't', T(0)))
        self.assert_completed(g, d, restart, [])
        self.assertEqual(d.prop('StartTime'), p0['StartTime'])
        r.flush(g.qemu)
        rc, out = r.image_compare_shared(ch.top, ch.ref)
        self.assertEqual(rc, 0, out)
        rc, out = r.image_check_shared(ch.top)
        self.assertEqual(rc, 0, out)

    def test_daemon_restarted_in_phase1_while_paused(self):
        """SIGTERM while phase 1 is paused: the new helper starts paused, nothing more is copied
        until Resume; then phase 2, one Finished."""
        g = self.guest()
        d = g.disk()
        ch = g.chains['vda']
        since = self.start(d, bandwidth=T(2 * MiB))
        self.wait_phase1(g, d, 1)
        d.pause()
        d.wait_state('paused', 10)
        p0 = d.props()
        self.assertEqual(self.env.stop_daemon(signal.SIGTERM), 0)
        restart = time.monotonic()
        self.env.start_daemon()
        c = self.client
        c.wait_for(lambda: c.try_call(h.MANAGER_PATH, h.IFACE_MANAGER, 'GetGuest', 's', g.name)[0] == g.path,
                   15, 'guest %s to be republished' % g.name)
        h.wait_until(lambda: r.pull_helpers(self.env), 15, 'a new pull helper to carry phase 1 on')
        h.wait_until(lambda: len(r.leftovers(g.qemu.qmp)[1]) == 1, 15, 'the new helper\'s export only')
        p = d.props()
        self.assertEqual((p['State'], p['Engine'], p['StartTime']), ('paused', 'prefetch', p0['StartTime']))
        local = r.local_bytes(r.get_map(d), 0, SIZE)
        c.pump(1.0)
        self.assertEqual(r.local_bytes(r.get_map(d), 0, SIZE), local, 'a paused prefetch copies after the restart')
        self.assertEqual(self.qemu_jobs(g), [], 'phase 2 began while paused')
        self.assertIsNone(d.call('SetBandwidth', 't', T(0)))
        self.assertIsNone(d.call('Resume'))
        self.assert_completed(g, d, restart, [])
        self.assertEqual(d.finished(since), d.finished(restart), 'Finished before the restart')
        r.flush(g.qemu)
        rc, out = r.image_compare_shared(ch.top, ch.ref)
        self.assertEqual(rc, 0, out)


class PrefetchPhase2Test(PrefetchBase):
    """Phase 2 of a 1 TiB disk holding 48 MiB: QEMU's stream job walks the whole virtual size in
    512 KiB steps, long enough to pause, cancel or restart the daemon in it."""

    def test_pause_resume_in_phase2(self):
        g = self.sparse_guest()
        d = g.disk()
        ch = g.chains['vda']
        since = self.start(d, bandwidth=T(64 * MiB))
        job = self.wait_phase2(g)
        self.assertEqual(job['speed'], 64 * MiB, 'phase 2 does not run at the job\'s Bandwidth: %r' % job)
        mid = d.prop('BytesDone')
        self.assertGreaterEqual(mid, d.prop('BytesTotal') // 2, 'phase 2 began before phase 1\'s half was counted')
        d.pause()
        d.wait_state('paused', 10)
        h.wait_until(lambda: self.qemu_jobs(g) and self.qemu_jobs(g)[0]['status'] == 'paused', 10,
                     'QEMU\'s job to pause')
        off = self.qemu_jobs(g)[0]['offset']
        self.client.pump(1.0)
        self.assertEqual(self.qemu_jobs(g)[0]['offset'], off, 'QEMU\'s job moved while paused')
        d.resume()
        d.wait_state('running', 10)
        self.assert_completed(g, d, since, [])
        states = [c['State'] for t, c, i in self.client.props_changed(d.path, h.IFACE_STREAM, since) if 'State' in c]
        self.assertEqual(states, ['running', 'paused', 'running', 'completed'])
        h.log('phase 2 job %s' % job['device'])
        r.flush(g.qemu)
        rc, out = compare_with_base(ch.top, ch.base)
        self.assertEqual(rc, 0, out)

    def test_cancel_in_phase2(self):
        g = self.sparse_guest()
        d = g.disk()
        ch = g.chains['vda']
        since = self.start(d)
        self.wait_phase2(g)
        d.cancel()
        res, done, err = d.wait_finished(60, since)
        self.assertEqual(res, 'cancelled', 'Finished%r' % ((res, done, err),))
        self.assert_one_finished(d, since)
        self.assertEqual(list(d.prop('BackingChain')), [ch.base], 'a cancel in phase 2 dropped the chain')
        self.assertEqual(self.qemu_jobs(g), [])
        # What phase 1 copied stays copied.
        m = r.get_map(d, 0, 16 * MiB)
        self.assertEqual([k for o, l, dep, k in m], ['local'], m)

    def test_daemon_restarted_in_phase2(self):
        """SIGKILL in phase 2: QEMU's job runs on; the new daemon picks it up (flush, finalize,
        dismiss) and Finished comes once."""
        g = self.sparse_guest()
        d = g.disk()
        ch = g.chains['vda']
        since = self.start(d)
        job = self.wait_phase2(g)
        p0 = d.props()
        self.assertEqual(self.env.kill_daemon(), -signal.SIGKILL)
        restart = time.monotonic()
        self.env.start_daemon()
        c = self.client
        c.wait_for(lambda: c.try_call(h.MANAGER_PATH, h.IFACE_MANAGER, 'GetGuest', 's', g.name)[0] == g.path,
                   15, 'guest %s to be republished' % g.name)
        self.assertEqual(r.pull_helpers(self.env), [], 'phase 1 started again after a restart in phase 2')
        p = self.assert_completed(g, d, restart, [])
        self.assertEqual((p['StartTime'], p['Engine']), (p0['StartTime'], 'prefetch'))
        self.assertEqual(d.finished(since), d.finished(restart), 'Finished before the restart')
        h.log('phase 2 job %s carried over a restart' % job['device'])
        r.flush(g.qemu)
        self.assertEqual(h.image_backing(ch.top), None)
        rc, out = compare_with_base(ch.top, ch.base)
        self.assertEqual(rc, 0, out)


if __name__ == '__main__':
    h.main()
