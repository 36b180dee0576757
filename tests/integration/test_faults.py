#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Nothing lost under faults: a failing template (nbdkit with its error and delay filters, the
server killed and restarted) and a full disk (the overlay on a small tmpfs that fills mid-stream).

Real components only: nbdkit serves the template over a unix socket, the overlay lives on a
size-limited tmpfs mounted inside the test's own directory (an image directory of the daemon),
and the guests are real QEMUs started with -S. No sleeps: every wait is for the real event, with
a deadline."""

import os
import shutil
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import offline as o  # noqa: E402
from harness import MiB  # noqa: E402

SMALL_FS = 48 * MiB        # the tmpfs the overlays live on
CHAIN_SIZE = 32 * MiB      # a Chain of this size copies 13.5 MiB in a full stream
HEADROOM = 2 * MiB         # free space left on the tmpfs before a stream: far less than it copies
TEMPLATE_SIZE = 4 * MiB    # the template nbdkit serves: 8 of QEMU's 512 KiB stream chunks


def statvfs_free(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class Nbdkit:
    """nbdkit serving a raw template file on a unix socket, with the given filters and
    parameters. restart() serves the same file on the same socket with other ones."""

    def __init__(self, test, template, socket_path):
        self.test = test
        self.template = template
        self.socket = socket_path
        self.pidfile = socket_path + '.pid'
        self.log = socket_path + '.log'
        self.proc = None

    def start(self, filters=(), params=()):
        for p in (self.socket, self.pidfile):
            if os.path.exists(p):
                os.unlink(p)
        argv = ['nbdkit', '-f', '-U', self.socket, '-P', self.pidfile]
        argv += ['--filter=' + f for f in filters]
        argv += ['file', self.template] + list(params)
        with open(self.log, 'ab') as logf:
            self.proc = h.spawn(argv, stdout=logf, stderr=logf)
        # nbdkit writes its pid file once the socket listens.
        h.wait_until(lambda: os.path.exists(self.pidfile) and os.path.getsize(self.pidfile) > 0 or
                     self.proc.poll() is not None, 20, 'nbdkit to listen on %s' % self.socket)
        if self.proc.poll() is not None:
            with open(self.log) as f:
                raise AssertionError('nbdkit exited: %s' % f.read()[-2000:])
        return self

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def restart(self, filters=(), params=()):
        self.kill()
        return self.start(filters, params)


class FaultsTest(h.TestCase):
    """One daemon for the class; its image directories are the usual one and a small tmpfs."""

    small = None

    @classmethod
    def setUpClass(cls):
        h.check_prerequisites(daemon=True)
        if shutil.which('nbdkit') is None:
            raise AssertionError('nbdkit not found (apt-get install nbdkit)')
        env = h.Env(cls.__name__)
        cls.env = env
        cls.small = os.path.join(env.dir, 'small')
        os.makedirs(cls.small)
        try:
            h.run(['mount', '-t', 'tmpfs', '-o', 'size=%d,mode=0755' % SMALL_FS, 'tmpfs', cls.small])
            env.start(daemon=False)
            env.daemon = h.Daemon(env, 'ImageDirectories=%s %s\n' % (env.images, cls.small))
            env.daemon.start()
        except BaseException:
            sys.stderr.write(env.logs_text() + '\n')
            cls._teardown_env()
            raise

    @classmethod
    def _teardown_env(cls):
        env = cls.env
        # Stop every process that may hold a file of the tmpfs (QEMUs, helpers, the daemon)
        # before it is unmounted; env.close() removes the directory afterwards.
        for q in env.qemus:
            try:
                q.kill()
            except Exception:
                pass
        if env.daemon is not None and env.daemon.running():
            try:
                env.daemon.stop(signal.SIGTERM, timeout=10)
            except Exception:
                pass
        if cls.small and os.path.ismount(cls.small):
            if h.run(['umount', cls.small], check=False).returncode != 0:
                h.run(['umount', '-l', cls.small], check=False)
        env.close()

    @classmethod
    def tearDownClass(cls):
        if cls.env is not None:
            cls._teardown_env()

    # -- helpers

    def small_dir(self):
        d = os.path.join(self.small, self.unique_name('fs'))
        os.makedirs(d)
        self.addCleanup(shutil.rmtree, d, True)
        return d

    def fill(self, directory, leave=HEADROOM):
        """A ballast file that leaves `leave` bytes free on the tmpfs; returns its path."""
        path = os.path.join(directory, 'ballast')
        size = statvfs_free(directory) - leave
        self.assertGreater(size, 0, 'the tmpfs has less than %d bytes free' % leave)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
        self.assertLessEqual(statvfs_free(directory), leave + MiB)
        return path

    def chain_on_small_fs(self):
        """A Chain whose top (the overlay that grows) lives on the tmpfs; its backings do not."""
        c = h.Chain(os.path.join(self.env.images, self.unique_name('img')), CHAIN_SIZE)
        d = self.small_dir()
        top = os.path.join(d, 'top.qcow2')
        shutil.move(c.top, top)
        c.top = top
        return c, d

    def assert_guest_alive(self, q, status='prelaunch'):
        self.assertTrue(q.running(), 'QEMU of the guest exited')
        self.assertEqual(q.qmp.cmd('query-status')['status'], status, "the guest's run state changed")

    def assert_image_clean(self, path):
        # -U: the image may still be open in QEMU (a -S guest writes nothing meanwhile).
        r = h.qemu_img('check', '-U', '-f', 'qcow2', path, check=False)
        rc, out = r.returncode, r.stdout + r.stderr
        self.assertEqual(rc, 0, 'qemu-img check %s: %s' % (path, out))

    def wait_paused_for_space(self, d):
        d.wait_state('paused', timeout=60)
        self.client.wait_for(lambda: 'No space left on device' in d.prop('Error'), 10,
                             'an Error naming the full disk while paused')
        return d.prop('Error')

    # -- a full disk

    def test_full_disk_pauses_and_resume_completes(self):
        c, d_small = self.chain_on_small_fs()
        name = self.unique_name()
        q = self.start_qemu({'vda': c}, name=name)
        self.register(name, q.daemon_socket)
        self.addCleanup(self._drop_guest, name, q)
        # This guest really runs (its firmware finds nothing to boot, and goes on running).
        q.qmp.cmd('cont')
        self.assert_guest_alive(q, 'running')
        ballast = self.fill(d_small)
        d = h.Disk(self.client, h.disk_path(name, 'vda'))
        since = time.monotonic()
        d.start()
        err = self.wait_paused_for_space(d)
        self.assertIn('Resume', err, 'the Error says what to do: %r' % err)
        self.assertEqual(d.finished(since), [], 'a job paused for space is not finished')
        jobs = q.qmp.jobs()
        self.assertEqual([j['status'] for j in jobs], ['paused'], 'QEMU keeps the job, paused: %r' % jobs)
        self.assert_guest_alive(q, 'running')
        os.unlink(ballast)
        d.resume()
        f = d.wait_finished(timeout=60, since=since)
        self.assertEqual(f[0], 'completed', 'Finished%r' % (f,))
        self.assertEqual(d.prop('Error'), '')
        self.assertEqual(d.prop('BackingChain'), [])
        self.assert_guest_alive(q, 'running')
        q.quit()
        self.assert_image_clean(c.top)
        rc, out = c.compare()
        self.assertEqual(rc, 0, out)

    def test_full_disk_pause_survives_a_daemon_restart(self):
        """Paused for space while the daemon restarts: the job, its state and its reason are
        read back from QEMU, and Resume still completes it."""
        c, d_small = self.chain_on_small_fs()
        name = self.unique_name()
        q = self.start_qemu({'vda': c}, name=name)
        self.register(name, q.daemon_socket)
        self.addCleanup(self._drop_guest, name, q)
        ballast = self.fill(d_small)
        d = h.Disk(self.client, h.disk_path(name, 'vda'))
        since = time.monotonic()
        d.start()
        self.wait_paused_for_space(d)
        self.env.stop_daemon()
        self.env.start_daemon()
        self.client.wait_prop(h.guest_path(name), h.IFACE_GUEST, 'Running', True, timeout=30)
        self.assertEqual(d.prop('State'), 'paused')
        self.assertIn('No space left on device', d.prop('Error'))
        os.unlink(ballast)
        d.resume()
        f = d.wait_finished(timeout=60, since=since)
        self.assertEqual(f[0], 'completed', 'Finished%r' % (f,))
        self.assertEqual(len(d.finished(since)), 1, 'Finished once: %r' % (d.finished(since),))
        self.assert_guest_alive(q)
        q.quit()
        self.assert_image_clean(c.top)
        rc, out = c.compare()
        self.assertEqual(rc, 0, out)

    def test_full_disk_range_fails_cleanly_and_restart_completes(self):
        """A range goes through NBD CACHE: QEMU has no job to pause, so the range fails with the
        cause, and a new Start of the same range after space is freed completes."""
        c, d_small = self.chain_on_small_fs()
        name = self.unique_name()
        q = self.start_qemu({'vda': c}, name=name)
        self.register(name, q.daemon_socket)
        self.addCleanup(self._drop_guest, name, q)
        ballast = self.fill(d_small)
        d = h.Disk(self.client, h.disk_path(name, 'vda'))
        u = c.u
        since = time.monotonic()
        d.start(0, 96 * u)
        f = d.wait_finished(timeout=60, since=since)
        self.assertEqual(f[0], 'failed', 'range on a full disk: Finished%r' % (f,))
        self.assertIn('No space left on device', f[2], 'Finished%r' % (f,))
        self.assertIn('into the image', f[2], 'the Error says the copy failed, not a read: %r' % (f,))
        self.assertEqual(d.prop('Error'), f[2])
        self.assert_guest_alive(q)
        os.unlink(ballast)
        since = time.monotonic()
        d.start(0, 96 * u)
        f = d.wait_finished(timeout=60, since=since)
        self.assertEqual(f[0], 'completed', 'Finished%r' % (f,))
        self.assertEqual(d.prop('BackingChain'), [c.mid, c.base], 'a range keeps the chain')
        self.assert_guest_alive(q)
        q.quit()
        self.assert_image_clean(c.top)
        rc, out = c.compare()
        self.assertEqual(rc, 0, out)
        self.assertEqual(h.depths_in(c.top, 0, 96 * u), {0}, 'the range is in the overlay')

    def test_full_disk_offline_guest_pauses_and_resume_completes(self):
        c, d_small = self.chain_on_small_fs()
        name = self.unique_name()
        self.register(name, '', o.offline_options({'vda': c.top}))
        self.addCleanup(self.unregister_quietly, name)
        ballast = self.fill(d_small)
        d = h.Disk(self.client, h.disk_path(name, 'vda'))
        since = time.monotonic()
        d.start()
        err = self.wait_paused_for_space(d)
        self.assertIn('Resume', err)
        self.assertEqual(d.finished(since), [])
        os.unlink(ballast)
        d.resume()
        f = d.wait_finished(timeout=60, since=since)
        self.assertEqual(f[0], 'completed', 'Finished%r' % (f,))
        self.assertEqual(d.prop('BackingChain'), [])
        self.unregister_quietly(name)
        h.wait_until(lambda: not h.image_locked(c.top), 20, 'the storage helper to close the overlay')
        self.assert_image_clean(c.top)
        rc, out = c.compare()
        self.assertEqual(rc, 0, out)

    # -- a failing template

    def template_guest(self, filters=(), params=(), reconnect_delay=0, size=TEMPLATE_SIZE):
        """A raw template served by nbdkit (with these filters from the start), a qcow2 overlay on
        it whose backing is an explicit NBD node (so the test chooses its reconnect-delay), and a
        -S guest on the overlay."""
        name = self.unique_name()
        d = os.path.join(self.env.images, self.unique_name('tmpl'))
        os.makedirs(d)
        template = os.path.join(d, 'template.raw')
        with open(template, 'wb') as f:
            for i in range(size // MiB):
                f.write(bytes([0x40 + i % 64]) * MiB)
        sock = os.path.join(d, 'nbd.sock')
        srv = Nbdkit(self, template, sock).start(filters, params)
        self.addCleanup(srv.kill)
        top = os.path.join(d, 'top.qcow2')
        h.qemu_img('create', '-q', '-f', 'qcow2', '-u', '-b', 'nbd+unix:///?socket=' + sock, '-F', 'raw', top,
                   str(size))
        extra = ['-blockdev', 'driver=nbd,node-name=tmpl,server.type=unix,server.path=%s,reconnect-delay=%d,'
                 'read-only=on' % (sock, reconnect_delay),
                 '-blockdev', 'driver=file,filename=%s,node-name=file0' % top,
                 '-blockdev', 'driver=qcow2,file=file0,backing=tmpl,node-name=disk0',
                 '-device', 'virtio-blk-pci,drive=disk0,id=vda']
        q, _ = self.qemu_guest(name, extra)
        return q, srv, h.Disk(self.client, h.disk_path(name, 'vda')), top, template

    def assert_overlay_is_template(self, q, top, template):
        q.quit()
        self.assert_image_clean(top)
        r = h.qemu_img('compare', '-f', 'qcow2', '-F', 'raw', top, template, check=False)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIsNone(h.image_backing(top), 'the overlay stands alone')

    def test_template_read_errors_fail_cleanly_then_restart_completes(self):
        # Half of the reads fail: over 64 stream chunks at least one surely does.
        # reconnect-delay: the guest's NBD client comes back to the healthy server below.
        q, srv, d, top, template = self.template_guest(
            ['error'], ['error-pread=EIO', 'error-pread-rate=50%'], reconnect_delay=10, size=32 * MiB)
        since = time.monotonic()
        d.start()
        f = d.wait_finished(timeout=60, since=since)
        self.assertEqual(f[0], 'failed', 'Finished%r' % (f,))
        self.assertIn('Input/output error', f[2], 'the Error names the I/O error: %r' % (f,))
        self.assertEqual(d.prop('Error'), f[2])
        self.assertEqual(d.prop('State'), 'failed')
        self.assert_guest_alive(q)
        self.assert_image_clean(top)
        # The template is healthy again: the same file on the same socket, without the error filter.
        srv.restart()
        since = time.monotonic()
        d.start()
        f = d.wait_finished(timeout=60, since=since)
        self.assertEqual(f[0], 'completed', 'Finished%r' % (f,))
        self.assertEqual(d.prop('Error'), '')
        self.assert_guest_alive(q)
        self.assert_overlay_is_template(q, top, template)

    def test_template_delay_completes(self):
        # Every read of the template takes a second: 8 chunks, so some seconds in all.
        q, srv, d, top, template = self.template_guest(['delay'], ['delay-read=1'])
        since = time.monotonic()
        d.start()
        f = d.wait_finished(timeout=90, since=since)
        self.assertEqual(f[0], 'completed', 'Finished%r' % (f,))
        # A lower bound the server sets (8 reads of 1 s each), not a timing guess.
        self.assertGreaterEqual(time.monotonic() - since, 1.0, 'the delay filter was in the way')
        self.assert_guest_alive(q)
        self.assert_overlay_is_template(q, top, template)

    def kill_template_mid_stream(self, reconnect_delay):
        # Slow reads (1 s each, 8 of them), so that the job is surely mid-way when the server dies.
        q, srv, d, top, template = self.template_guest(['delay'], ['delay-read=1'], reconnect_delay=reconnect_delay)
        since = time.monotonic()
        d.start()
        d.wait_state('running', timeout=10)
        srv.kill()  # the first read is still held by the delay filter: the job is mid-way
        srv.start()  # the same template on the same socket, without the delay
        return q, srv, d, top, template, since

    def test_template_killed_with_reconnect_delay_completes(self):
        q, srv, d, top, template, since = self.kill_template_mid_stream(10)
        f = d.wait_finished(timeout=60, since=since)
        self.assertEqual(f[0], 'completed', 'Finished%r' % (f,))
        self.assert_guest_alive(q)
        self.assert_overlay_is_template(q, top, template)

    def test_template_killed_without_reconnect_fails_cleanly(self):
        """reconnect-delay=0: QEMU 7.2's NBD client does not reconnect at all, so the stream fails
        with the I/O error, and so does a new Start, even with the server back: the backing stays
        broken until the guest's QEMU opens it again. Nothing is corrupted meanwhile."""
        q, srv, d, top, template, since = self.kill_template_mid_stream(0)
        f = d.wait_finished(timeout=60, since=since)
        self.assertEqual(f[0], 'failed', 'Finished%r' % (f,))
        self.assertIn('Input/output error', f[2], 'Finished%r' % (f,))
        self.assert_guest_alive(q)
        self.assert_image_clean(top)
        since = time.monotonic()
        d.start()
        f = d.wait_finished(timeout=60, since=since)
        self.assertEqual(f[0], 'failed', 'Finished%r' % (f,))
        self.assertIn('Input/output error', f[2], 'Finished%r' % (f,))
        self.assert_guest_alive(q)
        self.assert_image_clean(top)
        self.assertEqual(len(d.prop('BackingChain')), 1, 'the overlay still has its template')


if __name__ == '__main__':
    h.main()
