#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Guests that are not running: RegisterGuest with an empty QMP socket and the disks as an option,
streamed through D-Bus by the real sandboxed storage helper (`qemu-system-x86_64 -machine none`,
images passed as fds), checked like the running-guest tests check theirs (test_stream.py); the
helper's identity and confinement as the kernel shows them; a helper killed mid-job; image trust
at registration (backings outside the image directories, symlinks, other guests' disks)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import offline as o  # noqa: E402
from harness import T, S, opts, MiB  # noqa: E402

SIZE = 64 * MiB
ZERO_CAPS = '0000000000000000'


class OfflineTest(h.TestCase):

    @classmethod
    def setUpClass(cls):
        o.check_nbd_tools()
        super().setUpClass()

    # -- helpers

    def new_offline_guest(self, aliases=('vda',), size=SIZE, name=None):
        name = name or self.unique_name()
        chains = self.make_chains(aliases, size)
        path = self.register(name, '', o.offline_options({a: c.top for a, c in chains.items()}))
        self.addCleanup(self.unregister_quietly, name)
        return h.Guest(self, name, None, chains, path)

    def helper_uid(self, g):
        return o.identity(self.env, g.name)[0]

    def storage_uid(self, g):
        return o.storage_identity(self.env, g.name)[0]

    def the_helper(self, g, timeout=10):
        hs = h.wait_until(lambda: o.guest_storage_helpers(self.env, g.name), timeout,
                          'the storage helper of %s to run' % g.name)
        self.assertEqual(len(hs), 1, 'more than one storage helper for %s: %r' % (g.name, hs))
        return hs[0]

    def assert_helper_gone(self, g, timeout=10):
        uid = self.storage_uid(g)
        self.assertNotEqual(uid, 0, 'no storage helper identity for %s' % g.name)
        h.wait_until(lambda: not o.storage_helpers(self.env, uid), timeout,
                     'the storage helper of %s to exit after its job' % g.name)

    def stream_refused(self, d, what):
        """The error of a full stream of d that must not run: refused at Start, or Finished as failed
        (what: the assertion's message if it completed)."""
        since = time.monotonic()
        _, e = d.try_call('Start', 'tta{sv}', T(0), T(0), h.no_opts())
        if e is not None:
            return e.message
        res, _, err = d.wait_finished(60, since)
        self.assertEqual(res, 'failed', what)
        return err

    def assert_one_finished(self, d, since, result, settle=1.0):
        self.client.pump(settle)
        f = d.finished(since)
        self.assertEqual(len(f), 1, 'Finished emitted %d times: %r' % (len(f), f))
        self.assertEqual(f[0][0], result, 'Finished%r' % (f[0],))
        return f[0]

    def states_announced(self, d, since):
        return [ch['State'] for _, ch, _ in self.client.props_changed(d.path, h.IFACE_STREAM, since) if 'State' in ch]

    def assert_not_registered(self, name, before, what):
        self.assertDBusError(h.ERR_NO_SUCH_GUEST, self.client.call, h.MANAGER_PATH, h.IFACE_MANAGER, 'GetGuest',
                             's', name)
        self.assertFalse(os.path.exists(o.state_file(self.env, name)), '%s left a state file' % what)
        self.assertNotIn(h.guest_path(name), self.client.managed_objects(), '%s left an object' % what)
        self.assertSnapshotEqual(before, self.snapshot(), what)

    def assert_no_selinux_xattrs(self):
        lines, text = o.getfattr_selinux(self.env.images, self.env.daemon.state_dir, self.env.daemon.runtime_dir)
        self.assertEqual(lines, [], 'security.selinux written although SELinux is off:\n' + text)

    # -- properties

    def test_idle_properties(self):
        g = self.new_offline_guest()
        c = g.chains['vda']
        gp = self.client.get_all(g.path, h.IFACE_GUEST)
        self.assertEqual(gp['Name'], g.name)
        self.assertEqual(gp['QMPSocket'], '')
        self.assertFalse(gp['Running'], 'a guest that is not running shows Running')
        self.assertEqual(gp['Disks'], [h.disk_path(g.name, 'vda')])
        self.assertEqual(gp['SandboxLabel'], '', 'SandboxLabel must be "" where SELinux is off')
        p = g.disk().props()
        expect = {'Guest': g.path, 'Device': 'vda', 'Path': c.top, 'BackingChain': [c.mid, c.base], 'Size': SIZE,
                  'State': 'idle', 'Mode': '', 'BytesDone': 0, 'BytesTotal': 0, 'Bandwidth': 0, 'Rate': 0,
                  'StartTime': 0, 'ExpectedEndTime': 0, 'Error': ''}
        for k, v in expect.items():
            self.assertEqual(p.get(k), v, 'property %s' % k)
        uid, c1, c2 = o.identity(self.env, g.name)
        self.assertTrue(2147418112 <= uid < 2147483646, 'helper uid %d outside the default HelperUIDRange' % uid)
        self.assertLess(c1, c2)
        self.assertLess(c2, 1024)
        # Nothing runs for a guest without a job (nor has its storage helper an identity yet).
        self.assertEqual(o.storage_helpers(self.env, uid), [])
        self.assertEqual(o.storage_identity(self.env, g.name), (0, 0, 0))

    # -- full stream

    def test_full_stream(self):
        g = self.new_offline_guest()
        d = g.disk()
        c = g.chains['vda']
        since = time.monotonic()
        self.assertIsNone(d.start(0, 0, h.no_opts()))
        res, done, err = d.wait_finished(60, since)
        # Finished means the images are free: whoever starts the VM now must not find them
        # locked by the storage helper.
        for path in (c.top, c.mid, c.base):
            self.assertFalse(h.image_locked(path), '%s still locked when Finished arrived' % path)
        self.assertEqual((res, err), ('completed', ''))
        self.assert_one_finished(d, since, 'completed')
        p = d.props()
        self.assertEqual(p['State'], 'completed')
        self.assertEqual(p['Mode'], 'full')
        self.assertGreater(p['BytesTotal'], 0)
        self.assertEqual(p['BytesDone'], p['BytesTotal'])
        self.assertEqual(done, p['BytesDone'])
        self.assertEqual(p['BackingChain'], [], 'BackingChain not re-read after completion')
        self.assertEqual(p['Error'], '')
        states = self.states_announced(d, since)
        self.assertIn('running', states)
        self.assertEqual(states[-1], 'completed')
        self.assert_helper_gone(g)
        self.assertIsNone(h.image_backing(c.top), 'the top image still has a backing file')
        rc, out = c.compare()
        self.assertEqual(rc, 0, 'streamed image differs from the original chain: ' + out)
        rc, out = h.image_check(c.top)
        self.assertEqual(rc, 0, out)
        self.assert_no_selinux_xattrs()
        # The guest's own QEMU can have it now.
        q = self.start_qemu({'vda': c})
        q.quit()

    def test_stream_with_base(self):
        g = self.new_offline_guest()
        d = g.disk()
        c = g.chains['vda']
        since = time.monotonic()
        d.start(0, 0, opts(base=S(c.base)))
        res, done, err = d.wait_finished(60, since)
        for path in (c.top, c.mid, c.base):
            self.assertFalse(h.image_locked(path), '%s still locked when Finished arrived' % path)
        self.assertEqual((res, err), ('completed', ''))
        self.assert_one_finished(d, since, 'completed')
        self.assert_helper_gone(g)
        # The header names the base by its path: the helper only knew it as an fd, but the guest's
        # own QEMU (and qemu-img) must find it after the helper is gone.
        self.assertEqual(h.image_backing(c.top), c.base,
                         'after the stream the top image names its backing file %r, not the base %s'
                         % (h.image_backing(c.top), c.base))
        p = d.props()
        self.assertEqual(p['BackingChain'], [c.base], 'the chain must keep the base')
        self.assertEqual(p['BytesDone'], p['BytesTotal'])
        rc, out = c.compare()
        self.assertEqual(rc, 0, out)
        u = c.u
        self.assertEqual(h.depths_in(c.top, 64 * u, 32 * u), {0}, "mid's data was not copied into the top")
        self.assertEqual(h.depths_in(c.top, 176 * u, 16 * u), {1}, "base's data must stay in the base")
        self.assertEqual(h.image_check(c.top)[0], 0)

    def test_two_disks(self):
        g = self.new_offline_guest(aliases=('vda', 'vdb'), size=32 * MiB)
        a, b = g.disk('vda'), g.disk('vdb')
        since = time.monotonic()
        a.start(0, 0, opts(bandwidth=T(1 * MiB)))
        a.wait_state('running', 10)
        b.start()
        res, _, err = b.wait_finished(30, since)
        self.assertEqual((res, err), ('completed', ''))
        self.assertEqual(b.prop('BackingChain'), [])
        # One helper serves both disks, and stays while vda's job runs.
        self.the_helper(g)
        self.assertEqual(a.prop('State'), 'running')
        a.set_bandwidth(0)
        res, _, err = a.wait_finished(30, since)
        self.assertEqual((res, err), ('completed', ''))
        self.assert_helper_gone(g)
        for c in g.chains.values():
            self.assertEqual(c.compare()[0], 0)
            self.assertEqual(h.image_check(c.top)[0], 0)

    # -- the helper: identity and confinement, seen from outside

    def test_helper_identity_while_running(self):
        g = self.new_offline_guest()
        d = g.disk()
        c = g.chains['vda']
        since = time.monotonic()
        d.start(0, 0, opts(bandwidth=T(2 * MiB)))
        d.wait_state('running', 10)
        hp = self.the_helper(g)
        # Its own identity: not the one of the guest's other helpers (relay, pull helper).
        uid = self.storage_uid(g)
        self.assertNotEqual(uid, self.helper_uid(g), 'the storage helper shares the guest\'s helper uid')
        self.assertEqual(hp.uids, [uid] * 4, 'the helper runs as %s, not as the guest\'s storage helper uid %d'
                         % (hp.status['Uid'], uid))
        self.assertEqual(hp.gids, [uid] * 4, 'the helper\'s gids are %s, expected %d' % (hp.status['Gid'], uid))
        self.assertEqual(hp.groups, [], 'the helper kept supplementary groups')
        for k in ('CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb'):
            self.assertEqual(hp.status[k], ZERO_CAPS, '%s of the helper' % k)
        self.assertEqual(hp.status['NoNewPrivs'], '1')
        self.assertEqual(hp.status['Seccomp'], '2')
        self.assertIn('-sandbox', hp.argv)
        # glibc keeps QEMU's copy buffers in the heap: without it "-machine none" maps and unmaps
        # one per chunk and streams 4-5x slower (storage.c).
        # (glibc cuts GLIBC_TUNABLES at its ':' in place once it has read it.)
        with open('/proc/%d/environ' % hp.pid, 'rb') as f:
            env = f.read()
        tunables = env[env.find(b'GLIBC_TUNABLES='):] if b'GLIBC_TUNABLES=' in env else b''
        self.assertTrue(b'glibc.malloc.mmap_threshold=' in tunables and b'glibc.malloc.trim_threshold=' in tunables,
                        'the storage helper runs without its malloc thresholds: %r' % env)
        # Its own mount and network namespaces; no image is reachable by path from inside.
        for ns in ('mnt', 'net'):
            self.assertNotEqual(os.readlink('/proc/%d/ns/%s' % (hp.pid, ns)), os.readlink('/proc/self/ns/%s' % ns),
                                'the helper shares our %s namespace' % ns)
        root = '/proc/%d/root' % hp.pid
        for img in (c.top, c.mid, c.base, self.env.images):
            self.assertFalse(os.path.exists(root + img), '%s is visible inside the helper' % img)
        self.assertFalse(os.path.exists(root + self.env.daemon.state_dir), 'the state dir is visible inside')
        with open('/proc/%d/limits' % hp.pid) as f:
            core = [l for l in f if l.startswith('Max core file size')][0].split()
        self.assertEqual(core[4:6], ['0', '0'], 'RLIMIT_CORE of the helper: %r' % core)
        o.assert_limits(self, hp.pid, o.STORAGE_HELPER_LIMITS, 'the storage helper')
        # The images are open in it all the same: as fds.
        targets = set()
        for fd in os.listdir('/proc/%d/fd' % hp.pid):
            try:
                targets.add(os.readlink('/proc/%d/fd/%s' % (hp.pid, fd)))
            except OSError:
                pass
        self.assertTrue({c.top, c.mid, c.base} <= targets, 'the helper does not hold the images: %r' % targets)
        d.cancel()
        res, done, err = d.wait_finished(30, since)
        self.assertEqual(res, 'cancelled')
        self.assertGreater(done, 0)
        self.assert_one_finished(d, since, 'cancelled')
        self.assertEqual(d.prop('BackingChain'), [c.mid, c.base], 'a cancelled stream dropped the chain')
        self.assert_helper_gone(g)
        self.assertEqual(h.image_backing(c.top), c.mid)
        self.assertEqual(h.image_check(c.top)[0], 0)
        self.assertEqual(c.compare()[0], 0)

    def test_kill_helper_mid_job(self):
        g = self.new_offline_guest()
        d = g.disk()
        c = g.chains['vda']
        since = time.monotonic()
        d.start(0, 0, opts(bandwidth=T(4 * MiB)))
        d.wait_bytes_done(1 * MiB, 20)
        hp = self.the_helper(g)
        os.kill(hp.pid, signal.SIGKILL)
        d.wait_state('failed', 10)
        res, done, err = d.wait_finished(10, since)
        self.assertEqual(res, 'failed')
        self.assertGreater(done, 0, 'a failed job must say how far it got')
        self.assertIn('storage helper', err, 'the error does not name the storage helper: %r' % err)
        self.assert_one_finished(d, since, 'failed')
        p = d.props()
        self.assertEqual(p['State'], 'failed')
        self.assertEqual(p['BytesDone'], done)
        self.assertEqual(p['Error'], err)
        self.assertEqual(p['BackingChain'], [c.mid, c.base])
        self.assertTrue(self.env.daemon.running(), 'the daemon died with its helper')
        self.assert_helper_gone(g)
        rc, out = h.image_check(c.top)
        self.assertIn(rc, (0, 3), 'the image is corrupt after the helper was killed: ' + out)
        self.assertEqual(h.image_backing(c.top), c.mid)
        self.assertEqual(c.compare()[0], 0, 'the killed stream changed what the chain reads')
        # The guest's own QEMU finds the image unlocked and consistent.
        q = self.start_qemu({'vda': c})
        self.assertTrue(q.running())
        q.quit()
        # And a new job gets a new helper and finishes.
        since2 = time.monotonic()
        d.start()
        res, done, err = d.wait_finished(60, since2)
        self.assertEqual((res, err), ('completed', ''))
        self.assertEqual(d.prop('BackingChain'), [])
        self.assert_helper_gone(g)
        self.assertEqual(c.compare()[0], 0)
        self.assertEqual(h.image_check(c.top)[0], 0)

    # -- the daemon goes away during an offline job

    def test_daemon_restart_during_job(self):
        """The storage helper dies with the daemon (PDEATHSIG, or the shutdown). The restarted
        daemon starts a new helper and carries the same job on to its end: no Finished for the
        interruption, one at the end, the chain dropped, the data the chain's."""
        for sig, with_base in ((signal.SIGTERM, False), (signal.SIGKILL, False), (signal.SIGKILL, True)):
            with self.subTest(signal=sig.name, base=with_base):
                g = self.new_offline_guest()
                d = g.disk()
                c = g.chains['vda']
                since = time.monotonic()
                o_ = {'bandwidth': T(2 * MiB)}
                if with_base:
                    o_['base'] = h.S(c.base)
                d.start(0, 0, opts(**o_))
                d.wait_bytes_done(1 * MiB, 20)
                p0 = d.props()
                hp = self.the_helper(g)
                self.env.daemon.stop(sig)
                o.wait_gone(hp.pid, 5, 'the storage helper to die with the daemon (%s)' % sig.name)
                rc, out = h.image_check(c.top)
                self.assertIn(rc, (0, 3), 'after the daemon died (%s) with its helper: %s' % (sig.name, out))
                self.env.daemon.start()
                restart = time.monotonic()
                self.client.pump(1)
                p = d.props()
                if p['State'] != 'running':
                    self.fail('after a restart (%s) the stream of an offline guest did not go on: %r'
                              % (sig.name, {k: p[k] for k in ('State', 'Error', 'BytesDone')}))
                self.assertEqual((p['Mode'], p['StartTime'], p['Bandwidth']), ('full', p0['StartTime'], 2 * MiB),
                                 'the job after the restart is not the job before it')
                self.assertEqual(d.finished(since), [], 'Finished for a job that goes on')
                hp2 = self.the_helper(g)
                self.assertNotEqual(hp2.pid, hp.pid)
                self.assertIsNone(d.call('SetBandwidth', 't', T(0)))
                res, done, err = d.wait_finished(60, restart)
                self.assertEqual((res, err), ('completed', ''))
                self.assertEqual(len(d.finished(since)), 1, 'Finished more than once for one job')
                p = d.props()
                chain = [c.base] if with_base else []
                self.assertEqual((p['State'], p['BackingChain'], p['StartTime']),
                                 ('completed', chain, p0['StartTime']))
                self.assertEqual(p['BytesDone'], p['BytesTotal'])
                # The header names the base by its real path, not the helper's /dev/fdset/N.
                self.assertEqual(h.image_backing(c.top), c.base if with_base else None)
                self.assert_helper_gone(g)
                self.assertEqual(c.compare()[0], 0)
                self.assertEqual(h.image_check(c.top)[0], 0)
                self.unregister_quietly(g.name)

    def test_storage_identity_of_the_record_is_untrusted(self):
        """The storage helper's identity in the guest's state record is read back as untrusted:
        one that is the guest's other helpers' (uid or MCS pair), outside HelperUIDRange=,
        malformed or missing (a record from before it existed) is never run under; the storage
        helper gets a fresh one, and the guest's helpers keep theirs."""
        g = self.new_offline_guest()
        helper = o.identity(self.env, g.name)

        def serve():
            path, uri = o.export(g.disk())
            hp = self.the_helper(g)
            self.assertIsNone(self.client.call(path, o.IFACE_EXPORT, 'Stop'))
            o.wait_gone(hp.pid, 10, 'the storage helper to exit once its export stopped')
            return hp

        hp = serve()
        sid = o.storage_identity(self.env, g.name)
        self.assertEqual(hp.uids, [sid[0]] * 4)
        self.assertNotEqual(sid[0], helper[0])
        edits = [('the guest\'s helper uid', {'storage_uid': helper[0]}),
                 ('the guest\'s MCS pair', {'storage_mcs_c1': helper[1], 'storage_mcs_c2': helper[2]}),
                 ('uid 1, outside HelperUIDRange=', {'storage_uid': 1}),
                 ('a probe\'s uid, at the top', {'storage_uid': o.helper_uid_range(self.env).stop}),
                 ('a negative uid', {'storage_uid': -5}),
                 ('a string', {'storage_uid': 'x'}),
                 ('no storage identity (an old record)', None)]
        for what, edit in edits:
            with self.subTest(what):
                self.env.daemon.stop()
                s = o.read_state(self.env, g.name)
                if edit is None:
                    for k in ('storage_uid', 'storage_mcs_c1', 'storage_mcs_c2'):
                        s.pop(k, None)
                else:
                    s.update(edit)
                with open(o.state_file(self.env, g.name), 'w') as f:
                    json.dump(s, f)
                self.env.daemon.start()
                self.assertEqual(o.identity(self.env, g.name), helper, 'the guest\'s helpers lost their identity')
                hp = serve()
                now = o.storage_identity(self.env, g.name)
                self.assertIn(now[0], o.helper_uid_range(self.env))
                self.assertNotEqual(now[0], helper[0])
                self.assertNotEqual(now[1:], helper[1:])
                self.assertLess(now[1], now[2])
                self.assertEqual(hp.uids, [now[0]] * 4, 'the storage helper ran under an identity of the record')
                self.assertEqual(hp.gids, [now[0]] * 4)

    def test_helper_identity_outside_the_range_is_replaced(self):
        """A guest's helper uid in its record outside today's HelperUIDRange= (an older range,
        or a hand-edited file) is another's now, perhaps a container's: a storage helper's start
        kills every process of its guest's uid. The guest gets a fresh identity in the range."""
        g = self.new_offline_guest()
        lo, hi = o.helper_uid_range(self.env).start, o.helper_uid_range(self.env).stop
        for what, uid in [('below the range', lo - 1), ('a probe\'s, at the top', hi)]:
            with self.subTest(what):
                self.env.daemon.stop()
                s = o.read_state(self.env, g.name)
                s['helper_uid'] = uid
                with open(o.state_file(self.env, g.name), 'w') as f:
                    json.dump(s, f)
                self.env.daemon.start()
                self.client.wait_for(lambda: o.identity(self.env, g.name)[0] != uid, 30,
                                     'the record to name a new helper uid')
                now = o.identity(self.env, g.name)
                self.assertIn(now[0], o.helper_uid_range(self.env))

    def test_restart_waits_for_an_earlier_helper(self):
        """A daemon restarted at once (SIGKILL, then systemd) may find its predecessor's storage
        helper still exiting, the images still locked. It must wait for that helper to be gone
        (killing what is left of it) and carry the job on, not fail it on the lock. The leftover
        is played by a process of the guest's storage helper uid that holds a lock on the top image."""
        self.restart_with_a_leftover(older_daemon=False)

    def test_upgrade_waits_for_a_helper_of_the_old_identity(self):
        """The same after an upgrade: daemons before the storage helper's own identity ran it
        under the guest's helper uid, and their record has no storage identity. The new daemon
        allocates one, and must still find (and kill) the leftover under the old uid."""
        self.restart_with_a_leftover(older_daemon=True)

    def restart_with_a_leftover(self, older_daemon):
        g = self.new_offline_guest()
        d = g.disk()
        c = g.chains['vda']
        since = time.monotonic()
        d.start(0, 0, opts(bandwidth=T(2 * MiB)))
        d.wait_bytes_done(1 * MiB, 20)
        hp = self.the_helper(g)
        uid = self.storage_uid(g)
        self.env.daemon.stop(signal.SIGKILL)
        o.wait_gone(hp.pid, 5, 'the storage helper to die with the daemon')
        if older_daemon:
            uid = o.identity(self.env, g.name)[0]
            s = o.read_state(self.env, g.name)
            for k in ('storage_uid', 'storage_mcs_c1', 'storage_mcs_c2'):
                self.assertIn(k, s)
                del s[k]
            with open(o.state_file(self.env, g.name), 'w') as f:
                json.dump(s, f)
        script = ('import fcntl, os, struct, sys, time\n'
                  'fd = os.open(sys.argv[1], os.O_RDWR)\n'
                  'fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("@hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))\n'
                  'os.setgroups([]); os.setresgid(%d, %d, %d); os.setresuid(%d, %d, %d)\n'
                  'print("locked", flush=True)\n'
                  'time.sleep(600)\n' % ((uid,) * 6))
        leftover = h.spawn(['/usr/bin/python3', '-c', script, c.top], stdout=subprocess.PIPE)
        self.addCleanup(lambda: leftover.poll() is None and leftover.kill())
        self.assertEqual(leftover.stdout.readline(), b'locked\n')
        self.assertTrue(h.image_locked(c.top))
        self.env.daemon.start()
        restart = time.monotonic()
        res, done, err = d.wait_finished(90, restart)  # ~27 MiB to copy at 2 MiB/s
        self.assertEqual((res, err), ('completed', ''))
        self.assertEqual(leftover.wait(5), -signal.SIGKILL, 'the leftover of the storage helper uid was not killed')
        self.assertEqual(len(d.finished(since)), 1, 'Finished more than once for one job')
        self.assertEqual(c.compare()[0], 0)
        self.assertEqual(h.image_check(c.top)[0], 0)

    # -- image trust at registration

    def _refused(self, name, disks, expect_in_message, formats=None):
        before = self.snapshot()
        e = self.assertDBusError(h.ERR_INVALID_ARGS, self.register, name, '', o.offline_options(disks, formats))
        for s in expect_in_message:
            self.assertIn(s, e.message, 'the error does not say %r: %s' % (s, e.message))
        self.assert_not_registered(name, before, 'a refused registration')
        return e

    def test_backing_outside_image_dirs_refused(self):
        chains = self.make_chains(size=16 * MiB)
        c = chains['vda']
        h.qemu_img('rebase', '-u', '-b', '/etc/passwd', '-F', 'raw', c.top)
        self._refused(self.unique_name(), {'vda': c.top}, ['/etc/passwd', 'outside'])
        # Relative, climbing out.
        h.qemu_img('rebase', '-u', '-b', '../../../../../../etc/shadow', '-F', 'raw', c.top)
        self._refused(self.unique_name(), {'vda': c.top}, ['/etc/shadow', 'outside'])
        # The top itself outside.
        self._refused(self.unique_name(), {'vda': '/etc/passwd'}, ['/etc/passwd', 'outside'], {'vda': 'raw'})

    def test_disk_named_twice_refused(self):
        """A D-Bus dict may repeat a key (dbus-python cannot send one: busctl can). Two disks 'vda'
        shared one object path, one of them out of reach, and the state file written of them was
        refused on the next start: the guest was gone."""
        chains = self.make_chains(('vda', 'vdb'), size=16 * MiB)
        name = self.unique_name()
        before = self.snapshot()
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=self.env.bus.address)
        p = subprocess.run(['busctl', '--system', 'call', h.BUS_NAME, h.MANAGER_PATH, h.IFACE_MANAGER,
                            'RegisterGuest', 'ssa{sv}', name, '', '1', 'disks', 'a{ss}', '2',
                            'vda', chains['vda'].top, 'vda', chains['vdb'].top],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, env=env,
                           timeout=60)
        self.assertNotEqual(p.returncode, 0, 'a guest with two disks vda was registered: %s' % p.stdout)
        self.assertIn("names 'vda' twice", p.stderr)
        self.assert_not_registered(name, before, 'a disk named twice')

    def test_registration_refused_for_its_record_stays_refused(self):
        """RegisterGuest answers an error when the guest's record cannot be written (a full or
        failing disk: here its path is a directory). The state writer tries failed writes again;
        that write must not land once the disk is mended, or the guest the caller was told had
        failed appears at the next start."""
        chains = self.make_chains(size=16 * MiB)
        name = self.unique_name()
        record = o.state_file(self.env, name)
        os.makedirs(os.path.join(record, 'blocked'))
        self.addCleanup(lambda: os.path.isdir(record) and shutil.rmtree(record))
        self.assertDBusError('org.freedesktop.DBus.Error.Failed', self.register, name, '',
                             o.offline_options({'vda': chains['vda'].top}))
        shutil.rmtree(record)
        time.sleep(1.5)  # past the writer's first retries (0.1 s, doubling)
        self.assertFalse(os.path.exists(record), 'the refused guest\'s record was written after all')
        self.env.stop_daemon()
        self.env.start_daemon()
        self.assertDBusError(h.ERR_NO_SUCH_GUEST, self.client.call, h.MANAGER_PATH, h.IFACE_MANAGER, 'GetGuest',
                             's', name)

    def test_registration_past_what_a_start_reads_is_refused(self):
        """A guest's record keeps its disks' chains, and a start reads back at most 512 KiB of their
        text (what a QEMU's report of its disks is held to). 16 disks over one chain of 11 images
        whose paths are 3.7 KiB long are 650 KiB: the registration was answered, and the next start
        dropped the guest. Refused now, with nothing left behind; and 3 such disks still register."""
        deep = os.path.join(self.env.images, self.unique_name('deep'), *(['d' * 200] * 18))
        os.makedirs(deep)
        h.qemu_img('create', '-q', '-f', 'qcow2', os.path.join(deep, 'l0'), '1M')
        for k in range(1, 11):
            h.run(['qemu-img', 'create', '-q', '-f', 'qcow2', '-b', 'l%d' % (k - 1), '-F', 'qcow2', 'l%d' % k],
                  cwd=deep)
        tops = {}
        for i in range(16):
            h.run(['qemu-img', 'create', '-q', '-f', 'qcow2', '-b', 'l10', '-F', 'qcow2', 't%d' % i], cwd=deep)
            tops['vd%d' % i] = os.path.join(deep, 't%d' % i)
        name = self.unique_name()
        before = self.snapshot()
        e = self.assertDBusError(h.ERR_LIMITS_EXCEEDED, self.register, name, '', o.offline_options(tops))
        self.assertIn('bytes of paths', e.message)
        self.assert_not_registered(name, before, 'a registration past the bound')
        # Below the bound: registered, and still there after a restart.
        self.register(name, '', o.offline_options({a: tops[a] for a in ('vd0', 'vd1', 'vd2')}))
        self.addCleanup(self.unregister_quietly, name)
        self.env.stop_daemon()
        self.env.start_daemon()
        self.client.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'GetGuest', 's', name)
    def test_symlink_in_chain_refused(self):
        chains = self.make_chains(size=16 * MiB)
        c = chains['vda']
        link = os.path.join(os.path.dirname(c.mid), 'mid-link.qcow2')
        os.symlink(c.mid, link)
        h.qemu_img('rebase', '-u', '-b', link, '-F', 'qcow2', c.top)
        self._refused(self.unique_name(), {'vda': c.top}, [link, 'symbolic link'])
        # The top named through a symlink.
        h.qemu_img('rebase', '-u', '-b', c.mid, '-F', 'qcow2', c.top)
        toplink = os.path.join(os.path.dirname(c.top), 'top-link.qcow2')
        os.symlink(c.top, toplink)
        self._refused(self.unique_name(), {'vda': toplink}, [toplink, 'symbolic link'])
        # A directory of the chain that is a symlink.
        dirlink = os.path.join(self.env.images, self.unique_name('dirlink'))
        os.symlink(os.path.dirname(c.top), dirlink)
        self._refused(self.unique_name(), {'vda': os.path.join(dirlink, 'top.qcow2')}, ['symbolic link'])
        # The chain itself is fine once named by its real paths.
        name = self.unique_name()
        self.register(name, '', o.offline_options({'vda': c.top}))
        self.unregister_quietly(name)

    def test_other_guests_disk_refused(self):
        a = self.new_offline_guest(size=16 * MiB)
        top_a = a.chains['vda'].top
        # Its disk given directly.
        self._refused(self.unique_name(), {'vda': top_a}, [top_a, 'another guest'])
        # As the backing of another chain.
        other = self.make_chains(size=16 * MiB)['vda']
        h.qemu_img('rebase', '-u', '-b', top_a, '-F', 'qcow2', other.top)
        self._refused(self.unique_name(), {'vda': other.top}, [top_a, 'another guest'])
        # Through a hard link.
        hard = os.path.join(os.path.dirname(other.top), 'hardlink.qcow2')
        os.link(top_a, hard)
        self._refused(self.unique_name(), {'vda': hard}, ['another guest'])
        # A running guest's disk too.
        r = self.new_guest(size=16 * MiB)
        self._refused(self.unique_name(), {'vda': r.chains['vda'].top}, [r.chains['vda'].top, 'another guest'])
        # And the same image twice in one guest.
        self._refused(self.unique_name(), {'vda': other.mid, 'vdb': other.mid}, [other.mid])

    def test_a_disk_made_a_symlink_forbids_nothing_else(self):
        """Other offline guests' disks are no one else's backing, compared by identity. Their paths
        were stat()ed by name, following symlinks: an owner who replaced their disk with a symlink
        to a template had every chain through that template refused as another guest's disk
        (review 34d). They are looked up as images now, beneath the image directories with no
        symlink followed."""
        a = self.new_offline_guest(size=16 * MiB)
        other = self.make_chains(size=16 * MiB)['vda']
        template = other.mid
        os.unlink(a.chains['vda'].top)
        os.symlink(template, a.chains['vda'].top)
        name = self.unique_name()
        self.register(name, '', o.offline_options({'vda': other.top}))
        self.addCleanup(self.unregister_quietly, name)
        self.assertEqual(self.client.get(h.disk_path(name, 'vda'), h.IFACE_STREAM, 'BackingChain')[0], template)

    def test_backing_its_owner_may_not_read_is_not_read(self):
        """The storage helper gets an offline guest's images from us, opened as root. The guest's
        owner may write the header of their top image, and with it name as its backing any file
        beneath an image directory: a file they may not read must not reach their image."""
        owner = h.ensure_test_users()[h.OWNER]
        chains = self.make_chains(('vda',), 16 * MiB)
        c = chains['vda']
        os.chown(c.top, owner, owner)
        name = self.unique_name()
        path = self.register(name, '', o.offline_options({'vda': c.top}, owner=h.U(owner)))
        self.addCleanup(self.unregister_quietly, name)
        g = h.Guest(self, name, None, chains, path)
        # Root's file, beside the owner's image; then the owner names it as their backing.
        secret = os.path.join(os.path.dirname(c.top), 'secret.raw')
        with open(secret, 'wb') as f:
            f.write(b'root only' * (MiB // 9))
            f.truncate(16 * MiB)
        os.chmod(secret, 0o600)
        h.qemu_img('rebase', '-u', '-b', secret, '-F', 'raw', c.top)
        d = g.disk()
        err = self.stream_refused(d, 'a stream copied a file its owner may not read into their image')
        self.assertIn(secret, err)
        self.assertIn('may not read', err)
        self.assertEqual(h.image_backing(c.top), secret)
        # A backing they may read is read.
        os.chmod(secret, 0o644)
        since = time.monotonic()
        self.assertIsNone(d.start(0, 0, h.no_opts()))
        self.assertEqual(d.wait_finished(60, since)[0], 'completed')
        self.assertIsNone(h.image_backing(c.top))


    def test_an_image_its_owner_may_not_write_is_not_theirs(self):
        """Whoever registers a guest that is not running names its images, and the guest's owner then
        maps, streams and exports them. A user (polkit lets them manage their own guests) named
        another's image: a map showed them its layout, a stream wrote into it. Its owner must be able
        to write the top themselves, and read the rest."""
        owner = h.ensure_test_users()[h.OWNER]
        c = self.make_chains(('vda',), 16 * MiB)['vda']  # root's, 0644
        name = self.unique_name()
        e = self.assertDBusError(h.ERR_ACCESS_DENIED, self.client.call, h.MANAGER_PATH, h.IFACE_MANAGER,
                                 'RegisterGuest', 'ssa{sv}', name, '', o.offline_options({'vda': c.top},
                                                                                        owner=h.U(owner)))
        self.assertIn(c.top, e.message)
        self.assertIn('may not write', e.message)
        self.assertDBusError(h.ERR_NO_SUCH_GUEST, self.client.call, h.MANAGER_PATH, h.IFACE_MANAGER, 'GetGuest', 's',
                             name)
        # The owner's own top: theirs.
        os.chown(c.top, owner, owner)
        self.register(name, '', o.offline_options({'vda': c.top}, owner=h.U(owner)))
        self.addCleanup(self.unregister_quietly, name)
        # Theirs no more (given back to root): not streamed for them.
        os.chown(c.top, 0, 0)
        d = h.Guest(self, name, None, {'vda': c}, h.guest_path(name)).disk()
        err = self.stream_refused(d, 'a stream wrote an image its owner may not write')
        self.assertIn('may not write', err)
        self.assertIsNotNone(h.image_backing(c.top))


OWNER_MANAGES_MINE = '''// blockstreamd tests only (test_offline.py)
polkit.addRule(function(action, subject) {
    var guest = action.lookup("guest");
    if (action.id == "org.blockstream1.manage" && guest && guest.indexOf("mine-") == 0 &&
        subject.user == "%s") {
        return polkit.Result.YES;
    }
    return polkit.Result.NOT_HANDLED;
});
''' % h.OWNER


class GuestShareTest(h.TestCase):
    """A user other than root registers at most GUESTS_PER_USER guests of their own: each holds a
    sandbox identity of HelperUIDRange=, a state file and what its QEMU reports in the daemon's
    memory, and one user could take them all. Root is not held to it."""

    GUESTS_PER_USER = 64  # manager.c: GUESTS_PER_USER_MAX
    needs_polkit = True
    polkit_rules = {'10-bstest-offline.rules': OWNER_MANAGES_MINE}

    def test_one_user_registers_a_share_of_the_guests(self):
        users = h.ensure_test_users()
        owner = users[h.OWNER]
        d = os.path.join(self.env.images, self.unique_name('mine'))
        os.makedirs(d)
        os.chown(d, owner, -1)
        tops = []
        for i in range(self.GUESTS_PER_USER + 1):
            p = os.path.join(d, 'g%d.qcow2' % i)
            h.qemu_img('create', '-q', '-f', 'qcow2', p, str(MiB))
            os.chown(p, owner, -1)
            tops.append(p)
        s = h.UserSession(h.OWNER, self.env.bus.address)
        self.addCleanup(s.close)

        def register_as_owner(name, top):
            self.addCleanup(self.unregister_quietly, name)
            return s.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'RegisterGuest', 'ssa{sv}',
                          "('%s', '', {'disks': <{'vda': '%s'}>})" % (name, top))
        for top in tops[:-1]:
            r = register_as_owner('mine-' + self.unique_name(), top)
            self.assertTrue(r['ok'], r)
        r = register_as_owner('mine-' + self.unique_name(), tops[-1])
        self.assertFalse(r['ok'], 'guest %d of one user: %r' % (self.GUESTS_PER_USER + 1, r))
        self.assertEqual(r['error'], h.ERR_LIMITS_EXCEEDED, r)
        self.assertIn('at most %d per user' % self.GUESTS_PER_USER, r['message'])
        # Root registers one more for them.
        name = 'mine-' + self.unique_name()
        self.register(name, '', o.offline_options({'vda': tops[-1]}, owner=h.U(owner)))
        self.addCleanup(self.unregister_quietly, name)


class OwnerRegistrationTest(h.TestCase):
    """A user registering a guest that is not running names its images. Root opened them first and
    answered with what it found: whether a name exists in a directory the user may not search, the
    backing file and format a header they may not read records. They are opened as the user first."""

    needs_polkit = True
    polkit_rules = {'10-bstest-offline.rules': OWNER_MANAGES_MINE}

    def test_root_tells_nothing_of_what_the_owner_may_not_reach(self):
        users = h.ensure_test_users()
        theirs = os.path.join(self.env.images, self.unique_name('theirs'))
        os.makedirs(theirs, mode=0o700)
        os.chown(theirs, users[h.MEMBER], -1)
        there = os.path.join(theirs, 'p.qcow2')
        h.qemu_img('create', '-q', '-f', 'qcow2', '-u', '-b', os.path.join(theirs, 'hidden-backing-name.raw'),
                   '-F', 'raw', there, str(MiB))
        os.chown(there, users[h.MEMBER], -1)
        s = h.UserSession(h.OWNER, self.env.bus.address)
        self.addCleanup(s.close)
        answers = {}
        for what, top in (('there', there), ('missing', os.path.join(theirs, 'missing.qcow2'))):
            name = self.unique_name('mine')  # short: an export's socket is named after it
            self.addCleanup(self.unregister_quietly, name)
            r = s.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'RegisterGuest', 'ssa{sv}',
                       "('%s', '', {'disks': <{'vda': '%s'}>})" % (name, top))
            self.assertFalse(r['ok'], r)
            answers[what] = (r['error'], r['message'].replace(top, 'PATH'))
            self.assertNotIn('hidden-backing-name', r['message'])
            self.assertNotIn('exist', r['message'])
        self.assertEqual(answers['there'], answers['missing'])
        self.assertEqual(answers['there'][0], h.ERR_ACCESS_DENIED)


class StorageHelperShareTest(h.TestCase):
    """A user's guests that are not running keep at most HELPERS_PER_USER storage helpers at once,
    those of all users but root HELPERS_IN_ALL: each is a QEMU of 50-100 MiB in the daemon's own
    cgroup (MemoryMax=2G holds about 16), and one user with 64 guests, each streamed slowly or
    paused, took them all and then the memory (reviews 30b, 30c)."""

    HELPERS_PER_USER = 8  # guest.h: GUEST_STORAGE_HELPERS_PER_OWNER_MAX
    HELPERS_IN_ALL = 16   # guest.h: GUEST_STORAGE_HELPERS_USERS_MAX
    needs_polkit = True
    polkit_rules = {'10-bstest-offline.rules': OWNER_MANAGES_MINE}

    def test_one_user_runs_a_share_of_the_storage_helpers(self):
        owner = h.ensure_test_users()[h.OWNER]
        d = os.path.join(self.env.images, self.unique_name('mine'))
        os.makedirs(d)
        os.chown(d, owner, -1)
        base = os.path.join(d, 'base.raw')
        h.qemu_img('create', '-q', '-f', 'raw', base, str(8 * MiB))
        h.qemu_io(base, 'write -P 0x5a 0 %d' % (8 * MiB), fmt='raw')
        os.chmod(base, 0o644)
        s = h.UserSession(h.OWNER, self.env.bus.address)
        self.addCleanup(s.close)
        disks = []
        for i in range(self.HELPERS_PER_USER + 1):
            top = os.path.join(d, 'g%d.qcow2' % i)
            h.qemu_img('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', top)
            os.chown(top, owner, -1)
            name = self.unique_name('mine')  # short: an export's socket is named after it
            self.addCleanup(self.unregister_quietly, name)
            r = s.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'RegisterGuest', 'ssa{sv}',
                       "('%s', '', {'disks': <{'vda': '%s'}>})" % (name, top))
            self.assertTrue(r['ok'], r)
            disks.append(h.disk_path(name, 'vda'))

        def start(path):
            # 64 KiB/s: 8 MiB keeps each job, and its storage helper, for two minutes.
            return s.call(path, h.IFACE_STREAM, 'Start', 'tta{sv}', "(0, 0, {'bandwidth': <uint64 65536>})")
        for path in disks[:-1]:
            r = start(path)
            self.assertTrue(r['ok'], r)
        self.assertEqual(len(o.storage_helpers(self.env)), self.HELPERS_PER_USER)
        r = start(disks[-1])
        self.assertFalse(r['ok'], 'storage helper %d of one user: %r' % (self.HELPERS_PER_USER + 1, r))
        self.assertEqual(r['error'], h.ERR_LIMITS_EXCEEDED, r)
        self.assertIn('at most %d at once per user' % self.HELPERS_PER_USER, r['message'])
        self.assertEqual(len(o.storage_helpers(self.env)), self.HELPERS_PER_USER)
        # An export of one starts (and keeps) its storage helper too: the same share, whoever asks
        # (review 32c: an Export by anyone allowed to export started one more).
        e = self.assertDBusError(h.ERR_LIMITS_EXCEEDED, self.client.call, disks[-1], h.IFACE_STREAM, 'Export',
                                 'a{sv}', h.no_opts(), timeout=30)
        self.assertIn('at most %d at once per user' % self.HELPERS_PER_USER, e.message)
        self.assertEqual(len(o.storage_helpers(self.env)), self.HELPERS_PER_USER)
        # One ends (its helper goes): the next one runs.
        r = s.call(disks[0], h.IFACE_STREAM, 'Cancel', '', '()')
        self.assertTrue(r['ok'], r)
        h.wait_until(lambda: len(o.storage_helpers(self.env)) < self.HELPERS_PER_USER, 30,
                     "the cancelled job's storage helper to exit")
        r = start(disks[-1])
        self.assertTrue(r['ok'], r)

        # Those of all users but root: USERS_MAX in all, whoever asks (root here, for two others).
        users = h.ensure_test_users()

        def guest_of(user, i):
            top = os.path.join(d, '%s-%d.qcow2' % (user, i))
            h.qemu_img('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', top)
            os.chown(top, users[user], -1)
            name = self.unique_name(user)
            self.register(name, '', o.offline_options({'vda': top}, owner=h.U(users[user])))
            self.addCleanup(self.unregister_quietly, name)
            return h.Disk(self.client, h.disk_path(name, 'vda'))
        os.chmod(d, 0o777)
        for i in range(self.HELPERS_IN_ALL - self.HELPERS_PER_USER):
            guest_of(h.MEMBER, i).start(0, 0, h.opts(bandwidth=T(65536)))
        self.assertEqual(len(o.storage_helpers(self.env)), self.HELPERS_IN_ALL)
        e = self.assertDBusError(h.ERR_LIMITS_EXCEEDED, guest_of(h.STRANGER, 0).start, 0, 0,
                                 h.opts(bandwidth=T(65536)))
        self.assertIn('at most %d at once' % self.HELPERS_IN_ALL, e.message)
        self.assertEqual(len(o.storage_helpers(self.env)), self.HELPERS_IN_ALL)
        # Root's own guests are not held to it.
        root_top = os.path.join(d, 'root.qcow2')
        h.qemu_img('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', root_top)
        name = self.unique_name('root')
        self.register(name, '', o.offline_options({'vda': root_top}))
        self.addCleanup(self.unregister_quietly, name)
        h.Disk(self.client, h.disk_path(name, 'vda')).start(0, 0, h.opts(bandwidth=T(65536)))


class OneGuestRangeBase(h.TestCase):
    """A daemon whose HelperUIDRange= has room for exactly one guest and its storage helper (its
    top uids are the probes'); guest(): an offline guest of one disk."""

    needs_daemon = False

    @classmethod
    def setUpClass(cls):
        o.check_nbd_tools()
        super().setUpClass()
        env = cls.env
        with cls.class_setup():
            cls.first = env.helper_uid_first()
            env.daemon = h.Daemon(env, config_extra='HelperUIDRange=%d-%d\n' % (cls.first, cls.first + 1 + h.PROBE_UIDS))
            env.daemon.start()

    def guest(self):
        name = self.unique_name()
        chains = self.make_chains(('vda',), SIZE)
        self.register(name, '', o.offline_options({'vda': chains['vda'].top}))
        self.addCleanup(self.unregister_quietly, name)
        return name, chains['vda'].top


class StorageIdentityRangeTest(OneGuestRangeBase):
    """A guest's storage helper identity comes from HelperUIDRange= like its helpers' one: taken
    while the guest is registered (no other guest gets it), released with the guest."""

    def serve(self, name, top):
        """Export its disk, read it, stop: the uids of its relay and of its storage helper."""
        path, uri = o.export(h.Disk(self.client, h.disk_path(name, 'vda')))
        storage = h.wait_until(lambda: o.storage_helper_of(self.env, top), 10, 'the storage helper of ' + name)[0]
        relay = h.wait_until(lambda: o.relays(self.env), 10, 'the relay of ' + name)[0]
        self.assertEqual(o.nbd_size(uri), SIZE)
        self.assertIsNone(self.client.call(path, o.IFACE_EXPORT, 'Stop'))
        o.wait_gone(storage.pid, 10, 'the storage helper to exit once its export stopped')
        o.wait_gone(relay.pid, 10, 'the relay to exit once its export stopped')
        return relay.uids[0], storage.uids[0]

    def test_released_with_the_guest(self):
        both = {self.first, self.first + 1}
        a, top_a = self.guest()
        self.assertEqual(set(self.serve(a, top_a)), both)
        # Both uids are a's while it is registered: no room for another guest.
        extra = o.raw_image(os.path.join(self.env.images, 'range-extra.raw'))
        e = self.assertDBusError(o.ERR_LIMITS_EXCEEDED, self.client.call, h.MANAGER_PATH, h.IFACE_MANAGER,
                                 'RegisterGuest', 'ssa{sv}', self.unique_name(), '',
                                 o.offline_options({'vda': extra}, {'vda': 'raw'}))
        self.assertIn('HelperUIDRange', e.message)
        # Unregistered, a gives both back: the next guest and its storage helper get them.
        self.assertIsNone(self.client.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'UnregisterGuest', 's', a))
        b, top_b = self.guest()
        self.assertEqual(set(self.serve(b, top_b)), both)
        self.assertIn(o.storage_identity(self.env, b)[0], both)


class SharedUidRangeTest(OneGuestRangeBase):
    """Two daemons on one machine given the same HelperUIDRange= (a mistake: their helpers could
    signal each other): the second, starting a storage helper, used to SIGKILL the first daemon's
    storage helper of the same uid as "a helper left by an earlier daemon", and the first daemon's
    export lost its backend. A live daemon's helper is not a leftover: the second daemon now leaves
    it alone and refuses, saying why."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        with cls.class_setup():
            cls.other = cls.start_second_daemon('HelperUIDRange=%d-%d\n' % (cls.first, cls.first + 1 + h.PROBE_UIDS))

    def test_other_daemons_helper_left_alone(self):
        # The first daemon serves its offline guest's disk through its storage helper.
        a, top = self.guest()
        path_a, uri_a = o.export(h.Disk(self.client, h.disk_path(a, 'vda')))
        helper = h.wait_until(lambda: o.storage_helper_of(self.env, top), 10, 'the storage helper of ' + a)[0]
        # The other daemon's guest gets the same uids; its storage helper must not start.
        other = self.other.client
        b = self.unique_name()
        image = o.raw_image(os.path.join(self.other.images, 'b.raw'))
        other.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'RegisterGuest', 'ssa{sv}', b, '',
                   o.offline_options({'vda': image}, {'vda': 'raw'}))
        self.assertEqual(o.identity(self.other, b)[0], o.identity(self.env, a)[0])
        e = self.assertDBusError(o.ERR_HELPER_FAILED, o.export, h.Disk(other, h.disk_path(b, 'vda')))
        self.assertIn('another blockstreamd', e.message)
        self.assertIn('HelperUIDRange=', e.message)
        self.assertEqual(o.storage_helpers(self.other), [])
        self.assertEqual(o.exports_on_bus(other), [])
        # The first daemon's helper lives on, and its export still serves.
        self.assertTrue(os.path.exists('/proc/%d' % helper.pid),
                        "the other daemon killed this daemon's storage helper")
        self.assertEqual(self.client.get(path_a, o.IFACE_EXPORT, 'State'), 'serving')
        self.assertEqual(o.nbd_size(uri_a), SIZE)
        self.assertEqual([p.pid for p in o.storage_helper_of(self.env, top)], [helper.pid])


SPOOF = '''
import os, sys
uid, binary, fifo = int(sys.argv[1]), sys.argv[2], sys.argv[3]
if os.fork() == 0:
    os.setgroups([]); os.setresgid(uid, uid, uid); os.setresuid(uid, uid, uid)
    os.execvp('sleep', ['sleep', '600'])
os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)
os.execv(binary, [binary, '--config=' + fifo])
'''


class LeftoverSpoofTest(OneGuestRangeBase):
    """A process of a guest's helper uid whose parent runs the daemon's binary, but not as root, is
    not another daemon's helper (a real daemon is root; a helper that execs our binary never is):
    it is killed as a leftover, and the storage helper starts. Otherwise a hostile helper could keep
    processes alive under the guest's uid and deny the guest its storage helper."""

    def test_nonroot_copy_of_the_daemon_is_no_daemon(self):
        name, _ = self.guest()
        uid = o.identity(self.env, name)[0]
        # A sleep as the guest's helper uid, whose parent is our binary running as nobody (not a
        # uid the daemon looks at: it is not killed itself), blocked opening a FIFO.
        fifo = os.path.join(self.env.dir, 'spoof.fifo')
        os.mkfifo(fifo, 0o666)
        spoof = h.spawn([sys.executable, '-c', SPOOF, str(uid), h.BLOCKSTREAMD, fifo])
        self.addCleanup(spoof.kill)
        daemon_exe = os.stat(h.BLOCKSTREAMD)

        def spoofed():
            for p in o.processes():
                if p.uids[0] == uid and p.ppid == spoof.pid:
                    st = os.stat('/proc/%d/exe' % spoof.pid)
                    if (st.st_dev, st.st_ino) == (daemon_exe.st_dev, daemon_exe.st_ino):
                        return p
            return None
        child = h.wait_until(spoofed, 10, "a process of the guest's uid under a non-root copy of the daemon")
        path, uri = o.export(h.Disk(self.client, h.disk_path(name, 'vda')))
        self.assertEqual(self.client.get(path, o.IFACE_EXPORT, 'State'), 'serving')
        self.assertEqual(o.nbd_size(uri), SIZE)
        o.wait_gone(child.pid, 10, 'the leftover under the non-root copy of the daemon to be killed')
        self.assertIsNone(self.client.call(path, o.IFACE_EXPORT, 'Stop'))


if __name__ == '__main__':
    h.main()
