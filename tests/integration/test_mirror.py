#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""The "mirror, then pivot" engine (Start option engine=mirror, service/mirror.c) against the real
daemon and real QEMU: QEMU mirrors the running disk into a new image the daemon creates beside the
overlay, pivots onto it, and the daemon renames it onto the overlay's path. Guest writes during the
copy survive, the data is the flattened chain's, a cancel or a refusal leaves the overlay and no
new file, a swapped overlay is swapped back, and a daemon killed at each step of the journal
recovers. Nothing here is timed: each step waits for its event (a log line, a property)."""

import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
from harness import MiB, S, T, opts  # noqa: E402

SIZE = 256 * MiB
ERR_NO_SPACE = 'org.blockstream1.Error.NoSpace'


def tmp_of(path):
    return os.path.join(os.path.dirname(path), '.%s.bs-mirror' % os.path.basename(path))


class MirrorTest(h.TestCase):

    def start(self, d, **kw):
        since = time.monotonic()
        o = {'engine': S('mirror')}
        o.update(kw)
        self.assertIsNone(d.start(0, 0, opts(**o)))
        return since

    def mirror_jobs(self, g):
        return [j for j in g.qemu.qmp.jobs() if j.get('type') == 'mirror']

    def assert_completed(self, d, since):
        res, done, err = d.wait_finished(180, since)
        self.assertEqual((res, err), ('completed', ''), 'Finished%r' % ((res, done, err),))
        self.client.pump(0.3)
        f = d.finished(since)
        self.assertEqual(len(f), 1, 'Finished emitted %d times: %r' % (len(f), f))
        p = d.props()
        self.assertEqual((p['State'], p['Mode'], p['Engine']), ('completed', 'full', 'mirror'))
        self.assertEqual(list(p['BackingChain']), [])
        return p

    def assert_standalone(self, g, c, writes=()):
        """The overlay's path holds one image with the chain's data and the writes, checked clean."""
        self.assertFalse(os.path.lexists(tmp_of(c.top)), 'the mirror\'s image is left beside the overlay')
        g.qemu.quit()
        self.assertIsNone(h.image_backing(c.top))
        for pat, off, ln in writes:
            self.assertTrue(h.read_matches(c.top, pat, off, ln), 'write 0x%02x at %d not in the image' % (pat, off))
        rc, out = c.compare()
        self.assertEqual(rc, 0, 'image differs from the chain plus the guest writes: ' + out)
        self.assertEqual(h.image_check(c.top)[0], 0)

    def assert_untouched(self, c, st):
        now = os.stat(c.top)
        self.assertEqual((now.st_dev, now.st_ino), (st.st_dev, st.st_ino), 'the overlay was replaced')
        self.assertFalse(os.path.lexists(tmp_of(c.top)), 'the mirror\'s image is left beside the overlay')
        self.assertEqual(h.image_backing(c.top), c.mid)

    def test_guest_writes_during_mirror(self):
        g = self.new_guest(size=SIZE)
        d = g.disk()
        c = g.chains['vda']
        q = g.qemu
        u = c.u
        owner = os.stat(c.top)
        since = self.start(d, bandwidth=T(4 * MiB))
        d.wait_bytes_done(1, 60)
        self.assertEqual(d.prop('Engine'), 'mirror')
        self.assertEqual(len(self.mirror_jobs(g)), 1)
        new = os.stat(tmp_of(c.top))
        self.assertEqual((new.st_uid, new.st_gid, new.st_mode), (owner.st_uid, owner.st_gid, owner.st_mode))
        writes = [(0x77, 2 * u, 1 * u), (0x78, 60 * u, 1 * u), (0x79, 37 * u, 2 * u), (0x7a, 100 * u, 1 * u),
                  (0x7b, 130 * u, 1 * u), (0x7c, 180 * u, 2 * u), (0x7d, 49 * u, 1 * u)]
        for pat, off, ln in writes:
            q.guest_write('vda', pat, off, ln)
            c.apply_to_reference(pat, off, ln)
        self.assertEqual(d.prop('State'), 'running', 'the writes did not land while the job ran')
        d.set_bandwidth(0)
        self.assert_completed(d, since)
        for pat, off, ln in writes:
            self.assertTrue(q.guest_read('vda', pat, off, ln), 'guest write 0x%02x at %d lost' % (pat, off))
        self.assertEqual(self.mirror_jobs(g), [], 'QEMU still has the job after Finished')
        self.assert_standalone(g, c, writes)

    def test_cancel_leaves_the_overlay(self):
        g = self.new_guest(size=SIZE)
        d = g.disk()
        c = g.chains['vda']
        st = os.stat(c.top)
        since = self.start(d, bandwidth=T(1 * MiB))
        d.wait_bytes_done(1, 60)
        self.assertTrue(os.path.exists(tmp_of(c.top)))
        d.cancel()
        res, done, err = d.wait_finished(60, since)
        self.assertEqual(res, 'cancelled', (res, done, err))
        self.assertEqual(d.prop('Engine'), 'mirror')
        h.wait_until(lambda: not os.path.lexists(tmp_of(c.top)), 10, 'the mirror\'s image to go')
        self.assert_untouched(c, st)
        self.assertEqual(list(d.prop('BackingChain')), [c.mid, c.base])
        # And QEMU dropped what the mirror added.
        nodes = [n['node-name'] for n in g.qemu.qmp.command('query-named-block-nodes')]
        self.assertEqual([n for n in nodes if n.startswith('bsm')], [])
        # A stream afterwards works as before.
        since = time.monotonic()
        d.start(0, 0, opts(engine=S('stream')))
        res, done, err = d.wait_finished(60, since)
        self.assertEqual((res, err), ('completed', ''))

    def test_base_refused(self):
        g = self.new_guest(size=SIZE)
        d = g.disk()
        c = g.chains['vda']
        e = self.assertDBusError(h.ERR_INVALID_ARGS, d.start, 0, 0, opts(engine=S('mirror'), base=S(c.base)))
        self.assertIn('base', e.message)
        self.assertEqual(d.prop('State'), 'idle')
        self.assertFalse(os.path.lexists(tmp_of(c.top)))

    def test_not_enough_space(self):
        """The images on a small tmpfs: a clear error, nothing created, the overlay as it was."""
        mnt = self.env.images
        self.assertEqual(os.listdir(mnt), [])
        subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=%d,mode=0755' % (64 * MiB), 'tmpfs', mnt], check=True)
        self.addCleanup(lambda: subprocess.run(['umount', '-l', mnt], check=False))
        name = self.unique_name()
        base = os.path.join(mnt, 'base.qcow2')
        top = os.path.join(mnt, 'top.qcow2')
        h.qemu_img('create', '-q', '-f', 'qcow2', base, str(SIZE))
        h.qemu_io(base, 'write -P 0x11 0 %d' % (8 * MiB))
        h.qemu_img('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top)
        q = self.env.new_qemu(name, [], [
            '-blockdev', 'driver=file,filename=%s,node-name=f1,read-only=on' % base,
            '-blockdev', 'driver=qcow2,file=f1,node-name=b1,read-only=on',
            '-blockdev', 'driver=file,filename=%s,node-name=f0' % top,
            '-blockdev', 'driver=qcow2,file=f0,backing=b1,node-name=disk0',
            '-device', 'virtio-blk-pci,drive=disk0,id=vda'])
        self.addCleanup(q.kill)
        self.register(name, q.daemon_socket)
        self.addCleanup(self._drop_guest, name, q)
        d = h.Disk(self.client, h.disk_path(name, 'vda'))
        st = os.stat(top)
        before = sorted(os.listdir(mnt))
        e = self.assertDBusError(ERR_NO_SPACE, d.start, 0, 0, opts(engine=S('mirror')))
        self.assertIn('free', e.message)
        self.assertEqual(sorted(os.listdir(mnt)), before, 'something was created beside the overlay')
        self.assertEqual(d.prop('State'), 'idle')
        # auto: falls back to what it picked before (QEMU's block-stream here).
        since = time.monotonic()
        d.start(0, 0, h.no_opts())
        res, done, err = d.wait_finished(60, since)
        self.assertEqual((res, err, d.prop('Engine')), ('completed', '', 'stream'))
        now = os.stat(top)
        self.assertEqual((now.st_dev, now.st_ino), (st.st_dev, st.st_ino))


if __name__ == '__main__':
    h.main()
