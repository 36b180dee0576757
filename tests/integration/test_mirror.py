#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""The "mirror, then pivot" engine (Start option engine=mirror, service/mirror.c) against the real
daemon and real QEMU: QEMU mirrors the running disk into a new image the daemon creates beside the
overlay, pivots onto it, and the daemon renames it onto the overlay's path. Guest writes during the
copy survive, the data is the flattened chain's, a cancel or a refusal leaves the overlay and no
new file, a swapped overlay is swapped back, and a daemon killed at each step of the journal
recovers. Nothing here is timed: each step waits for its event (a log line, a property)."""

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import nbdtemplate  # noqa: E402
import offline as o  # noqa: E402
import ranges as r  # noqa: E402
from harness import MiB, S, T, opts  # noqa: E402

FAKEQEMU = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fakeqemu.py')]

SIZE = 256 * MiB
ERR_NO_SPACE = 'org.blockstream1.Error.NoSpace'


def tmp_of(path):
    return os.path.join(os.path.dirname(path), '.%s.bs-mirror' % os.path.basename(path))


def unanswered_fuse(target):
    """A FUSE file system mounted on target whose server never answers (nobody reads /dev/fuse):
    whatever asks it waits until the returned function ends it (closes the connection, unmounts)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open('/dev/fuse', os.O_RDWR | os.O_CLOEXEC)
    data = 'fd=%d,rootmode=40000,user_id=0,group_id=0,allow_other' % fd
    if libc.mount(b'blockstream-test', target.encode(), b'fuse', 0, data.encode()) != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise unittest.SkipTest('cannot mount FUSE: %s' % os.strerror(err))

    def end():
        os.close(fd)
        libc.umount2(target.encode(), 2)  # MNT_DETACH
    return end


class MirrorBase(h.TestCase):

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

    def writes_during_copy(self, d, g, c, writes, since):
        """The guest writes these while the (rate-limited) job runs, then the job runs free and
        completes; each write reads back in the guest."""
        for pat, off, ln in writes:
            g.qemu.guest_write('vda', pat, off, ln)
            c.apply_to_reference(pat, off, ln)
        self.assertEqual(d.prop('State'), 'running', 'the writes did not land while the job ran')
        d.set_bandwidth(0)
        self.assert_completed(d, since)
        for pat, off, ln in writes:
            self.assertTrue(g.qemu.guest_read('vda', pat, off, ln), 'guest write 0x%02x at %d lost' % (pat, off))

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

    def guest_with_overlay(self, options):
        """A running guest whose overlay was made with these qemu-img -o options (the same writes)."""
        chains = self.make_chains(('vda',), SIZE)
        c = chains['vda']
        os.unlink(c.top)
        h.qemu_img('create', '-q', '-f', 'qcow2', '-o', options, '-b', c.mid, '-F', 'qcow2', c.top)
        h.run(['qemu-io', '-f', 'qcow2'] + sum((['-c', 'write -P 0x%02x %d %d' % (pat, off, ln)]
                                                 for _, pat, off, ln in c.layers[c.top]), []) + [c.top])
        name = self.unique_name()
        q = self.start_qemu(chains, name=name)
        path = self.register(name, q.daemon_socket)
        self.addCleanup(self._drop_guest, name, q)
        return h.Guest(self, name, q, chains, path)

    def blockdev_guest(self, template_args=None):
        """A guest started the libvirt way: the Chain base <- mid <- top opened node by node, each
        qcow2 node's backing an explicit node, the headers naming their backings relatively, so
        QEMU names the top json:{...}. With template_args (the -blockdev arguments of a node named
        "tmpl"), the top's backing is that node instead of the mid."""
        name = self.unique_name()
        c = self.make_chains(size=SIZE)['vda']
        h.qemu_img('rebase', '-q', '-u', '-F', 'qcow2', '-b', os.path.basename(c.mid), c.top)
        h.qemu_img('rebase', '-q', '-u', '-F', 'qcow2', '-b', os.path.basename(c.base), c.mid)
        args = list(template_args or [
            '-blockdev', 'driver=file,filename=%s,node-name=f2,read-only=on' % c.base,
            '-blockdev', 'driver=qcow2,file=f2,node-name=b2,read-only=on',
            '-blockdev', 'driver=file,filename=%s,node-name=f1,read-only=on' % c.mid,
            '-blockdev', 'driver=qcow2,file=f1,backing=b2,node-name=tmpl,read-only=on'])
        args += ['-blockdev', 'driver=file,filename=%s,node-name=f0' % c.top,
                 '-blockdev', 'driver=qcow2,file=f0,backing=tmpl,node-name=disk0',
                 '-device', 'virtio-blk-pci,drive=disk0,id=vda']
        q, path = self.qemu_guest(name, args)
        g = h.Guest(self, name, q, {'vda': c}, path)
        d = g.disk()
        h.wait_until(lambda: d.prop('NodeName') == 'disk0', 30, 'the disk to be read from QEMU')
        # The premise: QEMU does not name the overlay by its path.
        self.assertTrue(d.prop('Path').startswith('json:{'), d.prop('Path'))
        return g

    def drive_guest(self):
        """A running guest started with -drive: QEMU names every node of the chain itself."""
        name = self.unique_name()
        chains = self.make_chains(size=SIZE)
        c = chains['vda']
        q, path = self.qemu_guest(name, [
            '-drive', 'file=%s,format=qcow2,if=none,id=drive-vda' % c.top,
            '-device', 'virtio-blk-pci,drive=drive-vda,id=vda'])
        g = h.Guest(self, name, q, chains, path)
        d = g.disk()
        h.wait_until(lambda: d.prop('NodeName') != '', 30, 'the disk to be read from QEMU')
        # The premise: every node of the disk is named by QEMU.
        names = [n['node-name'] for n in q.qmp.cmd('query-named-block-nodes')]
        self.assertTrue(names and all(n.startswith('#') for n in names), names)
        self.assertEqual(list(d.prop('BackingChain')), [c.mid, c.base])
        return g

    def assert_untouched(self, c, st):
        now = os.stat(c.top)
        self.assertEqual((now.st_dev, now.st_ino), (st.st_dev, st.st_ino), 'the overlay was replaced')
        self.assertFalse(os.path.lexists(tmp_of(c.top)), 'the mirror\'s image is left beside the overlay')
        # A relative backing name (MirrorBase.blockdev_guest) is the header's own: as QEMU reads it.
        self.assertEqual(os.path.join(os.path.dirname(c.top), h.image_backing(c.top) or ''), c.mid)



class MirrorTest(MirrorBase):

    def test_guest_writes_during_mirror(self):
        self.guest_writes_during_mirror(self.new_guest(size=SIZE))

    def guest_writes_during_mirror(self, g):
        d = g.disk()
        c = g.chains['vda']
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
        self.writes_during_copy(d, g, c, writes, since)
        self.assertEqual(self.mirror_jobs(g), [], 'QEMU still has the job after Finished')
        self.assert_standalone(g, c, writes)

    def test_new_image_keeps_the_overlays_acl(self):
        """The new image is made in the overlay's directory, so it inherits that directory's
        default ACL, and taking the overlay's mode widened that ACL's mask: a user the directory
        names read the guest's disk that its overlay never let them read. It takes the overlay's
        own access ACL (here: none)."""
        h.ensure_user(h.STRANGER)
        g = self.new_guest(size=SIZE)
        d = g.disk()
        c = g.chains['vda']
        os.chmod(c.top, 0o660)
        h.run(['setfacl', '-d', '-m', 'u:%s:rw' % h.STRANGER, os.path.dirname(c.top)])

        def named_users(path):
            out = h.run(['getfacl', '-cp', path]).stdout
            return [l for l in out.splitlines() if l.startswith('user:') and not l.startswith('user::')]
        self.assertEqual(named_users(c.top), [])
        since = self.start(d, bandwidth=T(0))
        self.assert_completed(d, since)
        self.assertEqual(named_users(c.top), [], 'the new image took the directory\'s default ACL')
        self.assertEqual(os.stat(c.top).st_mode & 0o777, 0o660)

    def test_qemu_in_another_mount_namespace(self):
        """The daemon (under its unit: ProtectSystem=, PrivateTmp=) and a guest's QEMU (libvirt's
        by default) live in mount namespaces of their own, whose mount ids differ for the same
        file: the file QEMU has open for writing is told by device and inode, the device read
        from QEMU's own mountinfo. Before, the mirror refused every such guest."""
        class NsQemu(h.Qemu):
            def argv(self):
                return ['unshare', '--mount', '--propagation', 'private'] + super().argv()
        name = self.unique_name()
        chains = self.make_chains(('vda',), SIZE)
        q = NsQemu(self.env, name, [('vda', chains['vda'].top)])
        self.addCleanup(q.kill)
        q.start()
        path = self.register(name, q.daemon_socket)
        self.addCleanup(self._drop_guest, name, q)
        g = h.Guest(self, name, q, chains, path)
        self.assertNotEqual(os.readlink('/proc/%d/ns/mnt' % q.proc.pid), os.readlink('/proc/self/ns/mnt'))
        d = g.disk()
        since = self.start(d, bandwidth=T(0))
        self.assert_completed(d, since)
        self.assert_standalone(g, chains['vda'])

    def test_a_file_system_that_never_answers_beside_the_overlay_holds_nothing(self):
        """The guest's owner may mount a FUSE file system (with allow_other) at the new image's
        name beside their overlay, whose server never answers: the daemon looked the name up
        following the mount, and its one thread waited on the server for good (review 31c). An
        entry beside the overlay is looked at without crossing a mount now: Busy, at once."""
        g = self.drive_guest()
        d = g.disk()
        kept = tmp_of(g.chains['vda'].top)
        os.mkdir(kept)
        self.addCleanup(os.rmdir, kept)
        fuse = unanswered_fuse(kept)
        self.addCleanup(fuse)
        e = self.assertDBusError(h.ERR_BUSY, self.client.call, d.path, h.IFACE_STREAM, 'Start', 'tta{sv}', T(0), T(0),
                                 opts(engine=S('mirror')), timeout=20)
        self.assertIn('kept from an earlier mirror', e.message)
        self.assertEqual(self.mirror_jobs(g), [])

    def test_an_image_left_beside_the_overlay_is_never_replaced(self):
        """A new image kept from an earlier mirror (QEMU was lost while it pivoted: it may hold the
        guest's only copy of some writes) is neither overwritten nor removed by the next Start:
        engine=mirror is refused (Busy, nothing made), auto streams the disk another way."""
        g = self.drive_guest()
        d = g.disk()
        c = g.chains['vda']
        kept = tmp_of(c.top)
        with open(kept, 'wb') as f:
            f.write(b'the guest\'s writes since the pivot')
        self.addCleanup(lambda: os.path.exists(kept) and os.unlink(kept))
        e = self.assertDBusError(h.ERR_BUSY, d.start, 0, 0, opts(engine=S('mirror')))
        self.assertIn('kept from an earlier mirror', e.message)
        self.assertEqual(self.mirror_jobs(g), [])
        since = time.monotonic()
        self.assertIsNone(d.start(0, 0, opts(bandwidth=T(0))))
        res, _, err = d.wait_finished(120, since)
        self.assertEqual((res, err), ('completed', ''))
        self.assertEqual(d.prop('Engine'), 'stream')
        with open(kept, 'rb') as f:
            self.assertEqual(f.read(), b'the guest\'s writes since the pivot')

    def test_pause_resume_bandwidth(self):
        g = self.new_guest(size=SIZE)
        d = g.disk()
        c = g.chains['vda']
        since = self.start(d, bandwidth=T(1 * MiB))
        d.wait_bytes_done(1, 60)
        self.assertEqual(self.mirror_jobs(g)[0]['speed'], 1 * MiB)
        self.assertIsNone(d.call('Pause'))
        d.wait_state('paused', 30)
        h.wait_until(lambda: self.mirror_jobs(g)[0]['paused'], 30, 'QEMU to pause the mirror')
        self.assertIsNone(d.call('SetBandwidth', 't', T(0)))
        self.assertEqual(self.mirror_jobs(g)[0]['speed'], 0)
        self.assertIsNone(d.call('Resume'))
        self.assert_completed(d, since)
        self.assert_standalone(g, c)

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
        nodes = [n['node-name'] for n in g.qemu.qmp.cmd('query-named-block-nodes')]
        self.assertEqual([n for n in nodes if n.startswith('bsm')], [])
        # A stream afterwards works as before.
        since = time.monotonic()
        d.start(0, 0, opts(engine=S('stream'), bandwidth=T(0)))
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

    def guest_on_tmpfs(self, tmpfs_size, virtual_size, base_writes):
        """A running guest whose base and overlay are on a tmpfs of tmpfs_size mounted over the
        image directory (a mount below one is refused: RESOLVE_NO_XDEV); the base holds
        base_writes (qemu-io commands). Returns (mount point, overlay, QEMU, Disk)."""
        mnt = self.env.images
        subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=%d,mode=0755' % tmpfs_size, 'tmpfs', mnt], check=True)
        self.addCleanup(lambda: subprocess.run(['umount', '-l', mnt], check=False))
        name = self.unique_name()
        base = os.path.join(mnt, 'base.qcow2')
        top = os.path.join(mnt, 'top.qcow2')
        h.qemu_img('create', '-q', '-f', 'qcow2', base, str(virtual_size))
        for w in base_writes:
            h.qemu_io(base, w)
        h.qemu_img('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top)
        q, _ = self.qemu_guest(name, [
            '-blockdev', 'driver=file,filename=%s,node-name=f1,read-only=on' % base,
            '-blockdev', 'driver=qcow2,file=f1,node-name=b1,read-only=on',
            '-blockdev', 'driver=file,filename=%s,node-name=f0' % top,
            '-blockdev', 'driver=qcow2,file=f0,backing=b1,node-name=disk0',
            '-device', 'virtio-blk-pci,drive=disk0,id=vda'])
        return mnt, top, q, h.Disk(self.client, h.disk_path(name, 'vda'))

    def test_not_enough_space(self):
        """The images on a small tmpfs: a clear error, nothing created, the overlay as it was."""
        mnt, top, _, d = self.guest_on_tmpfs(64 * MiB, SIZE, ['write -P 0x11 0 %d' % (8 * MiB)])
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


    def test_space_follows_the_data(self):
        """A sparse 256 GiB disk holding 8 MiB, on a 384 MiB tmpfs: the check counts what the
        chain's images take (plus the new image's metadata and the margin), not the virtual size,
        so the mirror runs, and the flattened image is the chain's data."""
        big = 256 * 1024 * MiB
        _, top, q, d = self.guest_on_tmpfs(384 * MiB, big, ['write -P 0x11 0 %d' % (4 * MiB),
                                                            'write -P 0x22 %d %d' % (big - 4 * MiB, 4 * MiB)])
        since = self.start(d, bandwidth=T(0))
        self.assert_completed(d, since)
        self.assertEqual(d.prop('Path'), top)
        q.quit()
        self.assertIsNone(h.image_backing(top))
        self.assertFalse(os.path.lexists(tmp_of(top)))
        self.assertTrue(h.read_matches(top, 0x11, 0, 4 * MiB))
        self.assertTrue(h.read_matches(top, 0x22, big - 4 * MiB, 4 * MiB))
        self.assertEqual(h.image_check(top)[0], 0)
        # The copy follows the data: no zeroes written over the whole virtual size (that would be
        # 32 MiB of L2 tables here, one entry per 64 KiB cluster), only the 8 MiB and its metadata.
        used = os.stat(top).st_blocks * 512
        self.assertLess(used, 16 * MiB, 'the new image takes %d bytes for 8 MiB of data' % used)


    def test_new_image_takes_the_overlays_format(self):
        """The new image replaces the overlay: it has the overlay's cluster size and the format
        options a user chose for it (compat, lazy_refcounts, extended_l2, compression_type,
        refcount_bits), not QEMU's defaults (64 KiB clusters, ...)."""
        for options in ('cluster_size=131072,lazy_refcounts=on,compression_type=zstd,refcount_bits=64',
                        'cluster_size=1048576,extended_l2=on'):
            with self.subTest(options=options):
                self.overlay_with(options)

    def overlay_with(self, options):
        g = self.guest_with_overlay(options)
        c = g.chains['vda']
        want = h.image_info(c.top)
        d = g.disk()
        since = self.start(d, bandwidth=T(0))
        self.assert_completed(d, since)
        self.assert_standalone(g, c)
        got = h.image_info(c.top)
        self.assertEqual(got['cluster-size'], want['cluster-size'], 'the new image\'s cluster size')
        keys = ('compat', 'lazy-refcounts', 'extended-l2', 'compression-type', 'refcount-bits')
        self.assertEqual({k: got['format-specific']['data'].get(k) for k in keys},
                         {k: want['format-specific']['data'].get(k) for k in keys},
                         'the new image\'s format options')

    def test_auto_picks_mirror_only_when_configured(self):
        g = self.new_guest(size=SIZE)
        d = g.disk()
        # The default configuration: auto is QEMU's block-stream for a local chain whose top node
        # has a name given by someone (the harness's -blockdev node-name=disk0).
        since = time.monotonic()
        d.start(0, 0, opts(bandwidth=T(0)))
        res, done, err = d.wait_finished(60, since)
        self.assertEqual((res, err, d.prop('Engine')), ('completed', '', 'stream'))
        # EngineMirror=all: a running guest, a local chain, room beside the overlay: mirror.
        self.env.stop_daemon()
        self.env.daemon = h.Daemon(self.env, 'EngineMirror=all\n')
        self.addCleanup(self.default_daemon)
        self.env.start_daemon()
        g2 = self.new_guest(size=SIZE)
        d2 = g2.disk()
        since = time.monotonic()
        d2.start(0, 0, opts(bandwidth=T(0)))
        self.assert_completed(d2, since)
        # Not for an overlay with its own format options: the mirror would zero the whole new
        # image first; the stream keeps the overlay, options and all.
        g4 = self.guest_with_overlay('cluster_size=131072')
        d4 = g4.disk()
        since = time.monotonic()
        d4.start(0, 0, opts(bandwidth=T(0)))
        res, done, err = d4.wait_finished(60, since)
        self.assertEqual((res, err, d4.prop('Engine')), ('completed', '', 'stream'))
        self.assertEqual(h.image_info(g4.chains['vda'].top)['cluster-size'], 131072)
        # auto never keeps a base with a mirror.
        g3 = self.new_guest(size=SIZE)
        d3 = g3.disk()
        since = time.monotonic()
        d3.start(0, 0, opts(bandwidth=T(0), base=S(g3.chains['vda'].base)))
        res, done, err = d3.wait_finished(60, since)
        self.assertEqual((res, err, d3.prop('Engine')), ('completed', '', 'stream'))
        self.assert_standalone(g2, g2.chains['vda'])

    def remote_guest(self, tdir):
        """A running guest whose overlay (in tdir) has a raw template served by nbdkit over a unix
        socket as its backing (nbd+unix://): 64 MiB holding 16 MiB. QEMU opens the overlay and
        follows its header to the template. Returns (overlay, template, Disk)."""
        name = self.unique_name()
        template, sock = nbdtemplate.template_behind_nbd(self, tdir)
        top = os.path.join(tdir, 'top.qcow2')
        h.qemu_img('create', '-q', '-f', 'qcow2', '-u', '-b', 'nbd+unix:///?socket=' + sock, '-F', 'raw', top,
                   str(nbdtemplate.SIZE))
        q = self.env.new_qemu(name, [('vda', top)])
        self.addCleanup(q.kill)
        self.register(name, q.daemon_socket)
        self.addCleanup(self._drop_guest, name, q)
        return top, template, q, h.Disk(self.client, h.disk_path(name, 'vda'))

    def test_auto_picks_mirror_for_a_remote_template(self):
        """EngineMirror=all and a template behind NBD: the mirror (bench/remote-bench: about a
        quarter of prefetch's time), when there is room beside the overlay; else prefetch. (all:
        the harness names the top node; a -drive guest's is MirrorDefaultTest's.)"""
        self.env.stop_daemon()
        self.env.daemon = h.Daemon(self.env, 'EngineMirror=all\n')
        self.addCleanup(self.default_daemon)
        self.env.start_daemon()
        tdir = os.path.join(self.env.images, self.unique_name('tmpl'))
        os.makedirs(tdir)
        top, template, q, d = self.remote_guest(tdir)
        since = time.monotonic()
        d.start(0, 0, opts(bandwidth=T(0)))
        self.assertEqual(d.prop('Engine'), 'mirror', 'auto did not pick the mirror for a remote template')
        self.assert_completed(d, since)
        q.quit()
        self.assertIsNone(h.image_backing(top), 'the overlay does not stand alone')
        self.assertFalse(os.path.lexists(tmp_of(top)))
        res = h.qemu_img('compare', '-f', 'qcow2', '-F', 'raw', top, template, check=False)
        self.assertEqual(res.returncode, 0, res.stdout + res.stderr)
        self.assertEqual(h.image_check(top)[0], 0)
        # No room for the virtual size plus the margin (the template's allocation cannot be told
        # over NBD): prefetch, as with the mirror off, and nothing created beside the overlay.
        mnt = self.env.images
        subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=%d,mode=0755' % (128 * MiB), 'tmpfs', mnt], check=True)
        self.addCleanup(lambda: subprocess.run(['umount', '-l', mnt], check=False))
        top, template, q, d = self.remote_guest(mnt)
        since = time.monotonic()
        d.start(0, 0, opts(bandwidth=T(0)))
        self.assertEqual(d.prop('Engine'), 'prefetch', 'auto did not fall back to prefetch without room')
        self.assertFalse(os.path.lexists(tmp_of(top)), 'the mirror\'s image was created without room')
        res, done, err = d.wait_finished(120, since)
        self.assertEqual((res, err), ('completed', ''), 'Finished%r' % ((res, done, err),))
        q.quit()
        res = h.qemu_img('compare', '-f', 'qcow2', '-F', 'raw', top, template, check=False)
        self.assertEqual(res.returncode, 0, res.stdout + res.stderr)

    def default_daemon(self):
        self.env.stop_daemon()
        self.env.daemon = h.Daemon(self.env)
        self.env.start_daemon()

    def test_swapped_overlay_is_swapped_back(self):
        """Another file put at the overlay's path while the mirror runs: the rename finds it is not
        the file QEMU had open, swaps it back untouched, and the job fails."""
        g = self.new_guest(size=SIZE)
        d = g.disk()
        c = g.chains['vda']
        since = self.start(d, bandwidth=T(1 * MiB))
        d.wait_bytes_done(1, 60)
        os.rename(c.top, c.top + '.moved')
        with open(c.top, 'wb') as f:
            f.write(b'another file, not the overlay\n' * 100)
        other = os.stat(c.top)
        d.set_bandwidth(0)
        res, done, err = d.wait_finished(180, since)
        self.assertEqual(res, 'failed', (res, done, err))
        self.assertIn('no longer names the file QEMU had open', err)
        self.client.pump(0.3)
        self.assertEqual(len(d.finished(since)), 1)
        now = os.stat(c.top)
        self.assertEqual((now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns),
                         (other.st_dev, other.st_ino, other.st_size, other.st_mtime_ns), 'the other file was touched')
        with open(c.top, 'rb') as f:
            self.assertEqual(f.read(), b'another file, not the overlay\n' * 100)
        # The guest runs on the new image, left beside it under its temporary name.
        self.assertTrue(os.path.exists(tmp_of(c.top)))
        self.assertTrue(os.path.exists(c.top + '.moved'))


    def test_path_after_the_pivot(self):
        """QEMU opened the new image as /dev/fdset/N: after the rename, Path is the overlay's path
        again (also after a daemon restart), and an export handed to the storage helper when QEMU
        quits opens that file and serves the flattened image."""
        self.path_after_the_pivot(self.new_guest(size=SIZE))

    def path_after_the_pivot(self, g):
        d = g.disk()
        c = g.chains['vda']
        since = self.start(d, bandwidth=T(0))
        self.assert_completed(d, since)
        self.assertEqual(d.prop('Path'), c.top, 'Path names what QEMU calls the new image')
        # A restart reads the disks from QEMU again: the record carries the name across.
        self.env.stop_daemon()
        self.env.start_daemon()
        cl = self.client
        cl.wait_for(lambda: cl.try_call(h.MANAGER_PATH, h.IFACE_MANAGER, 'GetGuest', 's', g.name)[0] == g.path,
                    30, 'guest %s to be republished' % g.name)
        h.wait_until(lambda: d.prop('NodeName') != '', 30, 'the disk to be read from QEMU again')
        self.assertEqual(d.prop('Path'), c.top, 'Path after a restart')
        # The handoff pins and opens the file QEMU has open, by its real path.
        export_path, uri = o.export(d)
        self.assertEqual(h.image_backing(c.top), None)
        raw = os.path.join(self.env.dir, self.unique_name() + ".raw")
        self.addCleanup(lambda: os.path.exists(raw) and os.unlink(raw))
        h.qemu_img('convert', '-U', '-O', 'raw', c.top, raw)
        want = o.file_sha256(raw)
        g.qemu.quit()
        h.wait_until(lambda: o.storage_helpers(self.env), 30, "the guest's storage helper to take the disk")
        self.assertEqual(cl.get(export_path, o.IFACE_EXPORT, 'State'), 'serving')
        self.assertEqual(o.nbd_sha256(uri), want, 'the handed-over export does not serve the flattened image')
        self.assertEqual(cl.get(export_path, o.IFACE_EXPORT, 'State'), 'serving')
        # What it served is the chain's data: the image it was read from equals the reference.
        self.assertEqual(want, o.file_sha256(c.ref), 'the flattened image is not the chain\'s data')


class MirrorBlockdevTest(MirrorBase):
    """Guests started the libvirt way: every image a file node and a qcow2 node, each qcow2 node's
    backing an explicit node (-blockdev ...,backing=<node>). The headers name their backings by
    relative names, as overlays made with `qemu-img create -b base.qcow2` do, so QEMU names the top
    image json:{...}: the mirror finds the overlay through the qcow2 node's file child. The
    MirrorTest checks of a mirrored disk run again on such a guest."""

    def test_guest_writes_during_mirror(self):
        MirrorTest.guest_writes_during_mirror(self, self.blockdev_guest())

    def test_path_after_the_pivot(self):
        MirrorTest.path_after_the_pivot(self, self.blockdev_guest())

    def test_auto_picks_mirror(self):
        """EngineMirror=all: auto mirrors such a guest (its nodes named by someone) as it does one
        opened by its path (it fell back to prefetch, silently, when the overlay had no path)."""
        self.env.stop_daemon()
        self.env.daemon = h.Daemon(self.env, 'EngineMirror=all\n')
        self.addCleanup(MirrorTest.default_daemon, self)
        self.env.start_daemon()
        g = self.blockdev_guest()
        d = g.disk()
        since = time.monotonic()
        d.start(0, 0, opts(bandwidth=T(0)))
        self.assertEqual(d.prop('Engine'), 'mirror', 'auto did not pick the mirror')
        self.assert_completed(d, since)
        self.assert_standalone(g, g.chains['vda'])

    def test_map_after_the_pivot(self):
        """GetAllocationMap of the disk, before the mirror (the chain QEMU reads, through the
        explicit nodes) and after the pivot (one image, all of it local), as qemu-img map sees it."""
        g = self.blockdev_guest()
        d = g.disk()
        c = g.chains['vda']
        before, _ = r.get_whole_map(d)
        self.assertEqual(before, r.expected_map(c.top), 'the map before the mirror differs from qemu-img map')
        since = self.start(d, bandwidth=T(0))
        self.assert_completed(d, since)
        after, _ = r.get_whole_map(d)
        self.assertEqual(after, r.expected_map(c.top), 'the map after the pivot differs from qemu-img map')
        self.assertNotIn('backing', [e[3] for e in after])

    def test_nbd_template_node(self):
        """The top's backing an NBD node (a template served by nbdkit over a unix socket), as
        libvirt opens a network template: the mirror flattens it, no backing link left."""
        tdir = os.path.join(self.env.images, self.unique_name('tmpl'))
        os.makedirs(tdir)
        template, sock = nbdtemplate.template_behind_nbd(self, tdir, SIZE)
        g = self.blockdev_guest([
            '-blockdev', 'driver=nbd,node-name=tmpl,server.type=unix,server.path=%s,read-only=on' % sock])
        c = g.chains['vda']
        d = g.disk()
        since = self.start(d, bandwidth=T(0))
        self.assert_completed(d, since)
        self.assertEqual(d.prop('Path'), c.top)
        g.qemu.guest_write('vda', 0x7e, 3 * MiB, MiB)
        g.qemu.quit()
        self.assertIsNone(h.image_backing(c.top), 'the new image has a backing link')
        self.assertFalse(os.path.lexists(tmp_of(c.top)))
        self.assertEqual(h.image_check(c.top)[0], 0)
        # The data: the top's own clusters over the template, and the write after the pivot.
        want = os.path.join(tdir, 'want.raw')
        shutil.copyfile(template, want)
        for kind, pat, off, ln in c.layers[c.top]:
            h.qemu_io(want, 'write -P 0x%02x %d %d' % (pat, off, ln), fmt='raw')
        h.qemu_io(want, 'write -P 0x7e %d %d' % (3 * MiB, MiB), fmt='raw')
        res = h.qemu_img('compare', '-f', 'qcow2', '-F', 'raw', c.top, want, check=False)
        self.assertEqual(res.returncode, 0, res.stdout + res.stderr)


class MirrorDefaultTest(MirrorBase):
    """Which engine `auto` runs for a full stream under each EngineMirror= (README, "Which engine
    runs a full stream"): by default the mirror only where QEMU named the disk's nodes itself
    ("#block123": a -drive guest), as the mirror replaces them (and the overlay's inode) and a
    management layer that gave the names (libvirt's -blockdev node-name=) tracks them."""

    def daemon_with(self, config):
        self.env.stop_daemon()
        self.env.daemon = h.Daemon(self.env, config)
        self.addCleanup(MirrorTest.default_daemon, self)
        self.env.start_daemon()

    def auto_engine(self, g):
        """A full stream with engine auto (no option) to its end: the engine that ran."""
        d = g.disk()
        top = g.chains['vda'].top
        st = os.stat(top)
        since = time.monotonic()
        d.start(0, 0, opts(bandwidth=T(0)))
        res, done, err = d.wait_finished(120, since)
        self.assertEqual((res, err), ('completed', ''), 'Finished%r' % ((res, done, err),))
        engine = d.prop('Engine')
        if engine != 'mirror':
            now = os.stat(top)
            self.assertEqual((now.st_dev, now.st_ino), (st.st_dev, st.st_ino), 'the overlay was replaced')
            self.assertFalse(os.path.lexists(tmp_of(top)))
        return engine

    def test_default_mirrors_a_drive_guest(self):
        """The default configuration, a -drive guest on a local chain with room: auto mirrors; the
        guest's writes during the copy survive and the image is the flattened chain's."""
        g = self.drive_guest()
        d = g.disk()
        c = g.chains['vda']
        u = c.u
        st = os.stat(c.top)
        since = time.monotonic()
        self.assertIsNone(d.start(0, 0, opts(bandwidth=T(4 * MiB))))
        d.wait_bytes_done(1, 60)
        self.assertEqual(d.prop('Engine'), 'mirror', 'auto did not pick the mirror for a -drive guest')
        self.assertEqual(len(self.mirror_jobs(g)), 1)
        writes = [(0x57, 3 * u, 1 * u), (0x58, 61 * u, 2 * u), (0x59, 129 * u, 1 * u), (0x5a, 181 * u, 1 * u)]
        self.writes_during_copy(d, g, c, writes, since)
        self.assertNotEqual(os.stat(c.top).st_ino, st.st_ino, 'the overlay was not replaced by the mirror\'s image')
        self.assert_standalone(g, c, writes)

    def test_default_streams_where_the_daemon_may_not_write(self):
        """The overlay's directory read-only to the daemon (a bind mount here; under the shipped
        unit, a directory outside ReadWritePaths=): auto streams instead of failing the mirror's
        new image with EROFS; a forced mirror says why and creates nothing."""
        g = self.drive_guest()
        d = g.disk()
        c = g.chains['vda']
        # The image directory itself (a mount point below it would be refused as another file
        # system), after QEMU opened the overlay (its fd stays writable).
        images = self.env.images
        h.run(['mount', '--bind', '-o', 'ro', images, images])
        self.addCleanup(lambda: h.run(['umount', images], check=False))
        e = self.assertDBusError('org.freedesktop.DBus.Error.Failed', d.start, 0, 0, opts(engine=S('mirror')))
        self.assertIn('read-only to the daemon', e.message)
        self.assertIn('ReadWritePaths=', e.message)
        self.assertFalse(os.path.lexists(tmp_of(c.top)))
        self.assertEqual(self.auto_engine(g), 'stream')
        h.run(['umount', images])
        self.assert_standalone(g, c)

    def test_forced_mirror_of_a_drive_guest(self):
        """engine=mirror on a -drive guest: its nodes' auto-read-only=on, which drive-mirror's new
        image inherits, made QEMU open the fd set read-only and the Start fail ("Could not dup FD
        for /dev/fdset/N flags 0"); the image is now formatted first and opened read-write."""
        g = self.drive_guest()
        d = g.disk()
        since = self.start(d, bandwidth=T(0))
        self.assert_completed(d, since)
        self.assertEqual(d.prop('Path'), g.chains['vda'].top)
        self.assert_standalone(g, g.chains['vda'])

    def test_default_leaves_named_nodes_to_the_stream(self):
        """The default configuration, guests whose nodes someone named: the harness's guest
        (-blockdev node-name=disk0 over a chain QEMU opened) and one started the libvirt way
        (every node named, explicit backing nodes): auto runs block-stream, the overlay keeps its
        inode. (The libvirt-way guest got prefetch: QEMU names its images json:{...}, which counted
        as remote; they are local files.)"""
        self.assertEqual(self.auto_engine(self.new_guest(size=SIZE)), 'stream')
        self.assertEqual(self.auto_engine(self.blockdev_guest()), 'stream')

    def test_all_mirrors_named_nodes(self):
        """EngineMirror=all (what `auto` was before): the libvirt-way guest is mirrored too."""
        self.daemon_with('EngineMirror=all\n')
        g = self.blockdev_guest()
        self.assertEqual(self.auto_engine(g), 'mirror')
        self.assert_standalone(g, g.chains['vda'])

    def test_never_does_not_mirror(self):
        """EngineMirror=never: auto never mirrors, not even a -drive guest."""
        self.daemon_with('EngineMirror=never\n')
        self.assertEqual(self.auto_engine(self.drive_guest()), 'stream')


@unittest.skipUnless(os.environ.get('BLOCKSTREAM_TEST_HOOKS') == '1',
                       'the daemon is built without its test hooks (meson -Dtest_hooks=true)')
class MirrorKillTest(MirrorBase):
    """SIGKILL of the daemon at each step of the mirror's journal, stopped there by its test hook
    (BLOCKSTREAM_TEST_MIRROR_STOP: the daemon stops itself with SIGSTOP right before the step,
    its record on disk); the new daemon recovers, Finished comes once or not at all."""

    HOOK = 'BLOCKSTREAM_TEST_MIRROR_STOP'

    def guest(self):
        return self.new_guest(size=SIZE)

    def restart_with_hook(self, step):
        self.env.restart_daemon_with(self.HOOK, step)

    def wait_stopped(self):
        pid = self.env.daemon.proc.pid

        def stopped():
            with open('/proc/%d/stat' % pid) as f:
                return f.read().rsplit(')', 1)[1].split()[0] == 'T'
        h.wait_until(stopped, 120, 'the daemon to stop at its test hook')

    def kill_and_restart(self, g):
        self.assertEqual(self.env.kill_daemon(), -signal.SIGKILL)
        restart = time.monotonic()
        self.env.start_daemon()
        c = self.client
        c.wait_for(lambda: c.try_call(h.MANAGER_PATH, h.IFACE_MANAGER, 'GetGuest', 's', g.name)[0] == g.path,
                   30, 'guest %s to be republished' % g.name)
        return restart

    def mirror_nodes(self, g):
        return [n['node-name'] for n in g.qemu.qmp.cmd('query-named-block-nodes') if n['node-name'].startswith('bsm')]

    def start_async(self, g):
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=self.env.bus.address)
        p = subprocess.Popen([h.BLOCKSTREAMCTL, 'pull', g.name, 'vda', '--engine=mirror', '--bandwidth=0'],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        self.addCleanup(lambda: p.poll() is None and (p.kill(), p.wait(10)))
        return p

    def killed_before_the_job(self, step, overlay_options=None):
        self.restart_with_hook(step)
        g = self.guest_with_overlay(overlay_options) if overlay_options else self.guest()
        d = g.disk()
        c = g.chains['vda']
        st = os.stat(c.top)
        since = time.monotonic()
        p = self.start_async(g)
        self.wait_stopped()
        self.assertTrue(os.path.exists(tmp_of(c.top)), 'the image is made before the step')
        self.kill_and_restart(g)
        p.communicate(timeout=30)
        self.assertNotEqual(p.returncode, 0, 'Start succeeded with its daemon killed before the job ran')
        h.wait_until(lambda: not os.path.lexists(tmp_of(c.top)), 30, 'the mirror\'s image to be removed')
        h.wait_until(lambda: self.mirror_nodes(g) == [], 30, 'the mirror\'s nodes to be removed')
        self.assert_untouched(c, st)
        return g, d, c, since

    def assert_unanswered_then_mirrored(self, g, d, c, since):
        """No Finished (Start was never answered), the disk idle, and nothing stands in the way
        of the next mirror."""
        self.client.pump(0.3)
        self.assertEqual(d.finished(since), [])
        self.assertEqual(d.prop('State'), 'idle')
        since = self.start(d, bandwidth=T(0))
        self.assert_completed(d, since)
        self.assert_standalone(g, c)

    def test_killed_before_the_job_began(self):
        """Image, fd set and nodes made, no job yet: all removed, no Finished (Start was never answered)."""
        g, d, c, since = self.killed_before_the_job('prepare')
        self.assert_unanswered_then_mirrored(g, d, c, since)

    def test_killed_while_qemu_formats(self):
        """An overlay with its own cluster size: killed once QEMU runs the blockdev-create job of
        the new image; the job, the fd set and the image are removed, and the next mirror's image
        has the overlay's cluster size."""
        g, d, c, since = self.killed_before_the_job('format', 'cluster_size=262144')
        h.wait_until(lambda: [j for j in g.qemu.qmp.cmd('query-jobs') if j['type'] == 'create'] == [], 30,
                     'the blockdev-create job to be dismissed')
        self.assert_unanswered_then_mirrored(g, d, c, since)
        self.assertEqual(h.image_info(c.top)['cluster-size'], 262144)

    def test_killed_before_qemu_had_the_job(self):
        """The job recorded, blockdev-mirror not sent: QEMU does not know it, it failed (once), and
        what was made is removed."""
        g, d, c, since = self.killed_before_the_job('copy')
        res, done, err = d.wait_finished(60, since)
        self.assertEqual(res, 'failed', (res, done, err))
        self.client.pump(0.3)
        self.assertEqual(len(d.finished(since)), 1)

    def stopped_at(self, step):
        """A guest whose mirror (started now, at full speed) stopped the daemon before step.
        Returns (guest, disk, chain, time of Start)."""
        self.restart_with_hook(step)
        g = self.guest()
        d = g.disk()
        c = g.chains['vda']
        since = self.start(d, bandwidth=T(0))
        self.wait_stopped()
        return g, d, c, since

    def killed_after_the_copy(self, step):
        g, d, c, since = self.stopped_at(step)
        restart = self.kill_and_restart(g)
        self.assert_completed(d, since)
        self.assertEqual(len(d.finished(restart)), 1)
        self.assertEqual(self.mirror_jobs(g), [])
        self.assert_standalone(g, c)

    def test_killed_before_the_pivot(self):
        """Ready, job-complete not sent: the new daemon completes it (QEMU still has it ready)."""
        self.killed_after_the_copy('pivot')

    def test_killed_before_the_rename(self):
        """QEMU pivoted, the rename not done: the new daemon does it."""
        self.killed_after_the_copy('rename')

    def test_killed_before_the_finalize(self):
        """Pending (both images alike, the guest's I/O held), job-finalize not sent: the new daemon
        finalizes, then renames."""
        self.killed_after_the_copy('finalize')

    def test_cancel_while_pivoting_is_refused(self):
        """From FINALIZE on (pending: both images alike, the guest's I/O held; job-finalize on its
        way) a Cancel would send the guest back to the old overlay while the journal says the new
        image may be the disk: Busy, and the mirror completes."""
        g, d, c, since = self.stopped_at('finalize')
        answer = []
        # Sent (flushed to the bus) before the daemon goes on from its hook.
        self.client.conn.call_async(h.BUS_NAME, d.path, h.IFACE_STREAM, 'Cancel', '', (),
                                    lambda *r: answer.append(('ok', r)),
                                    lambda e: answer.append((e.get_dbus_name(), e.get_dbus_message())))
        self.client.conn.flush()
        os.kill(self.env.daemon.proc.pid, signal.SIGCONT)
        self.client.wait_for(lambda: answer, 60, 'the answer to Cancel')
        self.assertEqual(answer[0][0], h.ERR_BUSY, 'Cancel while the mirror pivoted: %r' % (answer,))
        self.assertIn('pivoting', answer[0][1])
        self.assert_completed(d, since)
        self.assert_standalone(g, c)

    def test_finalize_that_cannot_be_recorded_gives_up(self):
        """Pending (the guest's disk I/O held until job-finalize), and FINALIZE cannot be recorded
        (the guest's state file cannot be replaced: a full or failing disk). The record is tried
        again, but not for ever: after 10 s the mirror is given up, with no pivot, and the guest's
        I/O goes on on its overlay. Before, the guest's I/O waited as long as the disk failed."""
        g, d, c, since = self.stopped_at('pending')
        st = os.stat(c.top)  # the overlay, not renamed before FINALIZE
        record = o.state_file(self.env, g.name)
        os.unlink(record)
        os.makedirs(os.path.join(record, 'blocked'))  # rename() onto it fails: ENOTEMPTY / EISDIR
        self.addCleanup(lambda: os.path.isdir(record) and shutil.rmtree(record))
        os.kill(self.env.daemon.proc.pid, signal.SIGCONT)
        h.wait_until(lambda: [j for j in self.mirror_jobs(g) if j['status'] == 'pending'] == [], 40,
                     'the mirror to be given up')
        g.qemu.guest_write('vda', 0x6e, 0, c.u)  # the guest's I/O goes on
        # Finished waits for the outcome's record: the disk is mended.
        shutil.rmtree(record)
        res, _, err = d.wait_finished(60, since)
        self.assertIn(res, ('cancelled', 'failed'), (res, err))
        h.wait_until(lambda: os.path.isfile(record), 30, 'the state file to be written again')
        now = os.stat(c.top)
        self.assertEqual((now.st_dev, now.st_ino), (st.st_dev, st.st_ino), 'the overlay was replaced')
        h.wait_until(lambda: not os.path.lexists(tmp_of(c.top)), 30, 'the mirror\'s image to be removed')
        job = o.read_state(self.env, g.name)['disks'][0].get('job', {})
        self.assertNotIn(job.get('phase'), (4, 5, 6), 'the record says the guest may run on the new image: %r' % job)

    def guest_gone_at(self, step, writes=(), meanwhile=None):
        """The daemon stopped before step, the guest writes, its QEMU quits (the guest powered
        off), meanwhile(chain) runs, the daemon is killed and started again."""
        g, d, c, since = self.stopped_at(step)
        for pat, off, ln in writes:
            g.qemu.guest_write('vda', pat, off * c.u, ln * c.u)
            c.apply_to_reference(pat, off * c.u, ln * c.u)
        st = os.stat(c.top)
        g.qemu.quit()
        if meanwhile:
            meanwhile(c)
        restart = self.kill_and_restart(g)
        res, done, err = d.wait_finished(60, since)
        self.client.pump(0.3)
        self.assertEqual(len(d.finished(restart)), 1, d.finished(restart))
        return c, st, res, err

    def assert_renamed(self, c, res, err):
        self.assertEqual((res, err), ('completed', ''))
        self.assertFalse(os.path.lexists(tmp_of(c.top)), 'the mirror\'s image is left beside the overlay')
        self.assertIsNone(h.image_backing(c.top))
        rc, out = c.compare()
        self.assertEqual(rc, 0, 'image differs from the chain plus the guest writes: ' + out)
        self.assertEqual(h.image_check(c.top)[0], 0)

    def test_guest_gone_before_the_rename(self):
        """QEMU pivoted and the guest wrote to the new image, then powered off, and the daemon was
        killed before the rename: the new daemon renames without QEMU. Before, the job failed and
        the overlay's path kept the image of before the pivot: the next boot lost those writes."""
        c, _, res, err = self.guest_gone_at('rename', [(0x5b, 3, 1), (0x5c, 90, 2)])
        self.assert_renamed(c, res, err)

    def test_guest_gone_before_the_finalize(self):
        """Pending, then QEMU quit (it may or may not have pivoted; both images hold the same
        data): the new image takes the overlay's place."""
        c, _, res, err = self.guest_gone_at('finalize')
        self.assert_renamed(c, res, err)

    def test_guest_started_again_on_the_old_overlay(self):
        """QEMU pivoted and went away; a process (a QEMU started again) has the old overlay open
        when the daemon comes back: nothing is renamed under it, the new image is kept, and the
        job fails saying so."""
        def hold(c):
            holder = os.open(c.top, os.O_RDONLY)
            self.addCleanup(os.close, holder)
        c, st, res, err = self.guest_gone_at('rename', [(0x5d, 0, 1)], hold)
        self.assertEqual(res, 'failed', (res, err))
        self.assertIn('has the old overlay open', err)
        self.assertIn(tmp_of(c.top).rsplit('/', 1)[1], err)
        now = os.stat(c.top)
        self.assertEqual((now.st_dev, now.st_ino), (st.st_dev, st.st_ino), 'the overlay was replaced under its reader')
        self.assertTrue(os.path.exists(tmp_of(c.top)), 'the image holding the guest\'s writes was removed')
        self.assertTrue(h.read_matches(tmp_of(c.top), 0x5d, 0, c.u), 'the guest\'s write is not in the new image')

    def test_held_in_another_namespace(self):
        """The same, the old overlay held by a process in a mount namespace of its own (a QEMU
        started again by libvirt): its mount ids are not ours, the file is told all the same."""
        def hold(c):
            p = subprocess.Popen(['unshare', '--mount', '--propagation', 'private', sys.executable, '-c',
                                  'import os, sys, time; os.open(sys.argv[1], os.O_RDONLY); print(flush=True); '
                                  'time.sleep(120)', c.top], stdout=subprocess.PIPE)
            self.addCleanup(lambda: (p.kill(), p.wait(10)))
            p.stdout.readline()  # the file is open
        c, st, res, err = self.guest_gone_at('rename', [(0x5d, 0, 1)], hold)
        self.assertEqual(res, 'failed', (res, err))
        self.assertIn('has the old overlay open', err)
        now = os.stat(c.top)
        self.assertEqual((now.st_dev, now.st_ino), (st.st_dev, st.st_ino), 'the overlay was replaced under its reader')
        self.assertTrue(os.path.exists(tmp_of(c.top)), 'the image holding the guest\'s writes was removed')

    def test_killed_after_the_rename(self):
        """Renamed, the outcome not yet recorded: the new daemon reports it completed."""
        self.killed_after_the_copy('done')

    def test_killed_while_copying(self):
        """SIGKILL while QEMU's mirror copies: the job goes on, then pivot and rename."""
        g = self.guest()
        d = g.disk()
        c = g.chains['vda']
        since = self.start(d, bandwidth=T(1 * MiB))
        d.wait_bytes_done(1, 60)
        restart = self.kill_and_restart(g)
        self.assertEqual((d.prop('State'), d.prop('Engine')), ('running', 'mirror'))
        self.assertIsNone(d.call('SetBandwidth', 't', T(0)))
        self.assert_completed(d, since)
        self.assertEqual(len(d.finished(restart)), 1)
        self.assert_standalone(g, c)


class MirrorDriveKillTest(MirrorKillTest):
    """The same kills at each step for a -drive guest (MirrorBase.drive_guest), whose image is
    formatted first (blockdev-create) and opened as it exists."""

    def guest(self):
        return self.drive_guest()

    def test_killed_while_qemu_formats_its_image(self):
        """Killed once QEMU runs the blockdev-create job of the new image (QEMU's default options):
        the job, the fd set and the image are removed, and the next mirror completes."""
        g, d, c, since = self.killed_before_the_job('format')
        h.wait_until(lambda: [j for j in g.qemu.qmp.cmd('query-jobs') if j['type'] == 'create'] == [], 30,
                     'the blockdev-create job to be dismissed')
        self.assert_unanswered_then_mirrored(g, d, c, since)


class MirrorBlockdevKillTest(MirrorKillTest):
    """The same kills at each step for a guest started the libvirt way (MirrorBase.blockdev_guest):
    the journal carries the overlay's path, not QEMU's json:{...} name."""

    def guest(self):
        return self.blockdev_guest()


class MirrorPinScanTest(h.TestCase):
    """What the daemon reads of a QEMU's open files to pin its disks is bounded by what the QEMU
    cannot blow up."""

    def test_a_qemu_with_a_huge_fdinfo_does_not_hold_the_daemon(self):
        """A QEMU (here a fake one in a process of its own) holding an epoll set of 8,000 watches
        dup'd into about 10,000 fds: the daemon read every fd's fdinfo, which the kernel formats
        whole (640 KB here) at each read, so Start(engine=mirror) held its one thread for a long
        while (review 31c: a bigger set, or a file with many locks, for hours). Only a fd whose
        link names a disk has its fdinfo read now: the Start is answered at once (the call's 10 s
        are a hang's bound, not a speed's: the scan itself gives up after 2 s)."""
        name = self.unique_name()
        path = os.path.join(self.env.dir, '%s.sock' % name)
        fake = FAKEQEMU + [path, os.path.join(self.env.images, name), '8000', '12000']
        p = subprocess.Popen(fake, stdin=subprocess.PIPE, stdout=subprocess.PIPE, universal_newlines=True)
        self.addCleanup(lambda: (p.stdin.close(), p.wait(30)))
        h.log(p.stdout.readline().strip())
        self.assertEqual(p.stdout.readline().strip(), 'ready')
        self.register(name, path)
        self.addCleanup(self.unregister_quietly, name)
        d = h.Disk(self.client, h.disk_path(name, 'vda'))
        e = self.assertDBusError('org.freedesktop.DBus.Error.Failed', self.client.call, d.path, h.IFACE_STREAM,
                                 'Start', 'tta{sv}', T(0), T(0), opts(engine=S('mirror')), timeout=10)
        self.assertIn('is not seen with', e.message)


class FakeMirrorGuest:
    """A mirror's Start against a fake QEMU in a process of its own."""

    def fake_guest(self, *fake_args):
        """A guest whose QEMU is fakeqemu.py in a process of its own, holding open a chain whose
        overlay has 128 KiB clusters (not QEMU's default: the new image is formatted first).
        Returns (process, disk, the chain's directory, the files there)."""
        name = self.unique_name()
        images = os.path.join(self.env.images, name)
        os.makedirs(images)
        files = [os.path.join(images, 'vda-%d.qcow2' % level) for level in range(3)]
        h.qemu_img('create', '-q', '-f', 'qcow2', files[2], str(SIZE))
        h.qemu_img('create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b', files[2], files[1])
        h.qemu_img('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=128k', '-F', 'qcow2', '-b', files[1],
                   files[0])
        path = os.path.join(self.env.dir, '%s.sock' % name)
        p = subprocess.Popen(FAKEQEMU + [path, images, '--open-disks'] + list(fake_args), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, universal_newlines=True)
        self.addCleanup(lambda: (p.stdin.close(), p.wait(30), p.stdout.close()))
        self.assertEqual(p.stdout.readline().strip(), 'ready')
        self.register(name, path)
        self.addCleanup(self.unregister_quietly, name)
        return p, h.Disk(self.client, h.disk_path(name, 'vda')), images, sorted(os.listdir(images))


class MirrorFormatJobTest(FakeMirrorGuest, h.TestCase):
    """A QEMU that takes the new image's formatting job (blockdev-create) and never ends it."""
    daemon_config = 'QMPTimeoutSec=3\n'

    def test_a_formatting_job_that_never_ends_fails_the_start(self):
        """The mirror of an overlay of other options than QEMU's defaults (128 KiB clusters) has
        the new image formatted first, and its Start waits for QEMU's job to end. A fake QEMU (in
        a process of its own, holding the chain open as QEMU does) answers blockdev-create and
        never ends the job: the Start was never answered, and the disk stayed "starting" (every
        Start Busy) for as long as that QEMU stayed connected. It fails after QMPTimeoutSec= now,
        as a command never answered does, with nothing left beside the overlay, and the disk can
        be started again: its job has a name of its own, so the first one's, which QEMU still runs
        (and refuses to dismiss), neither blocks it nor passes for it (review 32a: the second Start
        failed at once, "already in use")."""
        p, d, images, files = self.fake_guest()
        for attempt in range(2):
            e = self.assertDBusError('org.freedesktop.DBus.Error.Failed', self.client.call, d.path, h.IFACE_STREAM,
                                     'Start', 'tta{sv}', T(0), T(0), opts(engine=S('mirror')), timeout=20)
            self.assertIn('QMPTimeoutSec', e.message)
            self.assertEqual(sorted(os.listdir(images)), files, 'the new image was left beside the overlay')
        self.assertEqual(d.prop('State'), 'idle')
        # QEMU ends the two jobs at last: the daemon dismisses the last Start's (the first's name
        # it no longer knows: it stays in QEMU's list).
        lines = []
        threading.Thread(target=lambda: lines.extend(line.strip() for line in p.stdout), daemon=True).start()
        p.stdin.write('conclude-create-jobs\n')
        p.stdin.flush()
        h.wait_until(lambda: lines, 20, 'the job that ended late to be dismissed')
        self.assertRegex(lines[0], r'^dismissed bsmc-bsd-vda-\d+$')


class MirrorPrepareCutShortTest(FakeMirrorGuest, h.TestCase):
    """A mirror's preparation that QEMU cuts short. QMPTimeoutSec=10: a Start whose add-fd QEMU
    never answers is answered when that command times out (its MirrorCall is the command's), and
    a test's Refresh has that long to come first."""
    daemon_config = 'QMPTimeoutSec=10\n'

    def test_a_qemu_gone_while_the_image_is_formatted_fails_the_start(self):
        """The fake QEMU answers blockdev-create and exits: the Start waiting for the job's end
        fails at once (NotRunning), and the new image is removed."""
        p, d, images, files = self.fake_guest('--exit-after=blockdev-create')
        e = self.assertDBusError(h.ERR_NOT_RUNNING, self.client.call, d.path, h.IFACE_STREAM, 'Start', 'tta{sv}',
                                 T(0), T(0), opts(engine=S('mirror')), timeout=20)
        self.assertIn('QEMU went away or dropped the disk', e.message)
        self.assertEqual(p.wait(10), 0)
        self.assertEqual(sorted(os.listdir(images)), files, 'the new image was left beside the overlay')

    def disk_dropped(self, *fake_args):
        """The fake QEMU (fake_args) has no disks once it got the command the Start waits on, and the
        guest is refreshed: the Start fails, and the new image is removed."""
        p, d, images, files = self.fake_guest(*fake_args)
        box = {}

        def start():
            c = h.Client(self.env.bus.address)
            try:
                box['reply'] = c.try_call(d.path, h.IFACE_STREAM, 'Start', 'tta{sv}', T(0), T(0),
                                          opts(engine=S('mirror')), timeout=20)
            finally:
                c.close()
        t = threading.Thread(target=start)
        t.start()
        self.assertTrue(p.stdout.readline().startswith('dropped the disks after'))
        guest = h.guest_path(os.path.basename(images))
        self.client.call(guest, h.IFACE_GUEST, 'Refresh', timeout=20)
        t.join(30)
        _, e = box['reply']
        self.assertEqual(e.name, h.ERR_NOT_RUNNING, e.message)
        self.assertEqual(sorted(os.listdir(images)), files, 'the new image was left beside the overlay')
        return e

    def test_a_disk_dropped_while_the_image_is_formatted_fails_the_start(self):
        """While the Start waits for blockdev-create's job (review 32a: the disk's end freed the
        waiting Start without its clean-up, and the image left beside the overlay made every later
        mirror Start of that disk Busy)."""
        e = self.disk_dropped('--drop-disks-after=blockdev-create')
        self.assertIn('QEMU went away or dropped the disk', e.message)

    def test_a_disk_dropped_while_the_image_is_handed_over_fails_the_start(self):
        """While QEMU has not yet answered add-fd (review 32d: only the wait for the formatting job
        was covered)."""
        self.disk_dropped('--hold=add-fd', '--drop-disks-after=add-fd')


if __name__ == '__main__':
    h.main()
