#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""The QMP socket of a guest: who the daemon connects to, at registration and on every reconnect.

  - a symlink planted at the socket's path after registration is not followed: the daemon does
    not reach the QEMU it points to (a second QEMU -S), and the guest stays not running until
    its own QEMU is back at the real path;
  - the socket's directory swapped for a symlink to another QEMU's directory is refused too
    (the directory is pinned by identity at registration);
  - the peer is checked with SO_PEERCRED: a guest registered by a non-root user must be served
    by a QEMU running as that user or as a uid that QEMUUsers= allows, at registration and on a
    reconnect;
  - a non-root caller may only register a socket it could connect to itself, and that check is
    never a process the caller could stop while the daemon waits for it.

Run alone: /usr/bin/python3 tests/integration/test_qmpsock.py (root; after ninja -C build).
"""

import json
import os
import pwd
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

PREFIX = 'qsock-'
# Test-only rule: bstest-member may manage (register) guests named qsock-*.
MEMBER_RULES = '''// blockstreamd tests only (test_qmpsock.py)
polkit.addRule(function(action, subject) {
    var guest = action.lookup("guest");
    if (action.id == "org.blockstream1.manage" && guest && guest.indexOf("%s") == 0 &&
        subject.user == "%s") {
        return polkit.Result.YES;
    }
    return polkit.Result.NOT_HANDLED;
});
''' % (PREFIX, h.MEMBER)


def gv(s):
    """A GVariant text-format string literal."""
    return "'%s'" % s.replace('\\', '\\\\').replace("'", "\\'")


def daemon_monitor_connected(q, socket_path):
    """Is a client connected to the QMP monitor of QEMU `q` listening on socket_path? (QEMU names
    a socket chardev 'disconnected:unix:…' while nobody is connected.)"""
    for c in q.qmp.cmd('query-chardev'):
        if socket_path in c.get('filename', ''):
            return not c['filename'].startswith('disconnected:')
    raise AssertionError('QEMU %s has no chardev on %s: %r' % (q.name, socket_path, q.qmp.cmd('query-chardev')))


class QmpSocketCase(h.TestCase):

    def restart_daemon(self, qemu_users=None):
        """Restart the daemon with QEMUUsers= set to qemu_users (None: the key absent)."""
        d = self.env.daemon
        with open(d.conf) as f:
            lines = [ln for ln in f.read().splitlines() if not ln.startswith('QEMUUsers=')]
        if qemu_users is not None:
            lines.append('QEMUUsers=%s' % qemu_users)
        with open(d.conf, 'w') as f:
            f.write('\n'.join(lines) + '\n')
        d.stop()
        d.start()

    def refresh(self, name):
        return self.client.try_call(h.guest_path(name), h.IFACE_GUEST, 'Refresh')

    def wait_hung_up(self, q):
        h.wait_until(lambda: not daemon_monitor_connected(q, q.daemon_socket), 10,
                     "the daemon to hang up on %s's monitor" % q.name)


class SwappedPathTest(QmpSocketCase):
    """Root registers a guest; then whoever controls the socket's directory swaps the path."""

    def swap_and_refuse(self, swap, undo, reason):
        g = self.new_guest(size=64 * h.MiB)
        self.client.wait_prop(g.path, h.IFACE_GUEST, 'Running', True)
        other = self.start_qemu(self.make_chains(('vda',), 64 * h.MiB))
        own_top = g.chains['vda'].top
        self.assertEqual(g.disk().prop('Path'), own_top)

        g.qemu.kill()
        self.client.wait_prop(g.path, h.IFACE_GUEST, 'Running', False)
        swap(g.qemu, other)
        self.addCleanup(undo, g.qemu, other)
        # Refresh connects at once (the daemon answers after its attempt).
        _, err = self.refresh(g.name)
        self.assertIsNotNone(err, 'Refresh succeeded: the daemon talks to the other QEMU')
        self.assertEqual(err.name, h.ERR_NOT_RUNNING, err)
        self.assertIn(reason, err.message)
        self.assertFalse(g.prop('Running'))
        self.assertFalse(daemon_monitor_connected(other, other.daemon_socket),
                         "the daemon connected to the other QEMU's monitor")
        self.assertEqual(g.disk().prop('Path'), own_top)

        # The guest's own QEMU back at the real path (a new socket inode in the same directory):
        # accepted, and still nothing reached the other QEMU.
        undo(g.qemu, other)
        q2 = self.env.new_qemu(g.qemu.name, g.qemu.disks)
        self.addCleanup(q2.kill)
        self.refresh(g.name)
        self.client.wait_prop(g.path, h.IFACE_GUEST, 'Running', True)
        self.assertEqual(g.disk().prop('Path'), own_top)
        self.assertTrue(daemon_monitor_connected(q2, q2.daemon_socket))
        self.assertFalse(daemon_monitor_connected(other, other.daemon_socket))

    def test_symlink_at_the_socket_path(self):
        def swap(mine, other):
            os.unlink(mine.daemon_socket)
            os.symlink(other.daemon_socket, mine.daemon_socket)

        def undo(mine, other):
            if os.path.islink(mine.daemon_socket):
                os.unlink(mine.daemon_socket)
        self.swap_and_refuse(swap, undo, 'a symbolic link, which is never followed')

    def test_directory_replaced_by_a_symlink(self):
        def swap(mine, other):
            os.rename(mine.dir, mine.dir + '.old')
            os.symlink(other.dir, mine.dir)

        def undo(mine, other):
            if os.path.islink(mine.dir):
                os.unlink(mine.dir)
                os.rename(mine.dir + '.old', mine.dir)
        self.swap_and_refuse(swap, undo, 'not the directory it had at registration')


    def test_symlink_refused_at_registration(self):
        q = self.start_qemu(self.make_chains(('vda',), 64 * h.MiB))
        link = os.path.join(self.env.dir, self.unique_name('link') + '.sock')
        os.symlink(q.daemon_socket, link)
        self.addCleanup(os.unlink, link)
        name = self.unique_name()
        self.addCleanup(self.unregister_quietly, name)
        e = self.assertDBusError(h.ERR_INVALID_ARGS, self.register, name, link)
        self.assertIn('a symbolic link, which is never followed', e.message)
        self.assertFalse(daemon_monitor_connected(q, q.daemon_socket))
        # Its own path is fine.
        self.register(name, q.daemon_socket)

    def test_root_registration_pins_the_uid(self):
        """Root registered the guest with a QEMU of uid 0: a QEMU of another uid at the same
        path later is refused, also after a restart of the daemon, until QEMUUsers= allows it."""
        g = self.new_guest(size=64 * h.MiB)
        self.client.wait_prop(g.path, h.IFACE_GUEST, 'Running', True)
        g.qemu.kill()
        self.client.wait_prop(g.path, h.IFACE_GUEST, 'Running', False)
        q2 = self.env.new_qemu(g.qemu.name, g.qemu.disks, user=h.STRANGER)
        self.addCleanup(q2.kill)
        stranger = pwd.getpwnam(h.STRANGER).pw_uid
        for restart in (False, True):
            with self.subTest(restart=restart):
                if restart:
                    self.restart_daemon(None)
                _, err = self.refresh(g.name)
                self.assertIsNotNone(err, 'a QEMU of uid %d now serves a guest registered with one of uid 0'
                                     % stranger)
                self.assertEqual(err.name, h.ERR_NOT_RUNNING, err)
                self.assertIn('uid %d' % stranger, err.message)
                self.assertFalse(g.prop('Running'))
                self.wait_hung_up(q2)
        self.addCleanup(self.restart_daemon, None)
        self.restart_daemon(h.STRANGER)
        self.refresh(g.name)
        self.client.wait_prop(g.path, h.IFACE_GUEST, 'Running', True)


class PeerTest(QmpSocketCase):
    """Registrations by bstest-member (polkit lets it manage qsock-* guests)."""

    needs_polkit = True
    polkit_rules = {'10-bstest-qmpsock.rules': MEMBER_RULES}

    @classmethod
    def setUpClass(cls):
        h.check_prerequisites(polkit=True)
        cls.users = h.ensure_test_users()
        super().setUpClass()
        cls.member = h.UserSession(h.MEMBER, cls.env.bus.address)

    @classmethod
    def tearDownClass(cls):
        cls.member.close()
        super().tearDownClass()

    def user_qemu(self, user):
        return self.start_qemu(self.make_chains(('vda',), 64 * h.MiB), user=user)

    def register_as_member(self, name, socket_path):
        self.addCleanup(self.unregister_quietly, name)
        return self.member.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'RegisterGuest', 'ssa{sv}',
                                '(%s, %s, {})' % (gv(name), gv(socket_path)))

    def assertNoGuest(self, name):
        self.assertDBusError(h.ERR_NO_SUCH_GUEST, self.client.call, h.MANAGER_PATH, h.IFACE_MANAGER, 'GetGuest',
                             's', name)

    def test_qemu_of_another_uid(self):
        self.restart_daemon(None)
        q = self.user_qemu(h.STRANGER)
        # bstest-member may reach the socket: only the peer's uid is wrong.
        os.chmod(q.daemon_socket, 0o777)
        stranger = pwd.getpwnam(h.STRANGER).pw_uid
        name = PREFIX + self.unique_name()
        r = self.register_as_member(name, q.daemon_socket)
        self.assertFalse(r['ok'], 'a QEMU of uid %d served a guest of bstest-member: %r' % (stranger, r))
        self.assertEqual(r['error'], h.ERR_ACCESS_DENIED, r)
        self.assertIn('uid %d' % stranger, r['message'])
        self.assertIn('QEMUUsers=', r['message'])
        self.assertNoGuest(name)
        # The daemon connected to learn who listens, then hung up at once.
        self.wait_hung_up(q)

        # The administrator allows that uid: accepted.
        self.restart_daemon(h.STRANGER)
        r = self.register_as_member(name, q.daemon_socket)
        self.assertTrue(r['ok'], r)
        self.client.wait_prop(h.guest_path(name), h.IFACE_GUEST, 'Running', True)
        self.assertEqual(self.client.get(h.guest_path(name), h.IFACE_GUEST, 'Owner'), self.users[h.MEMBER])

        # Allowed no more: the reconnect after the daemon's restart is refused, with the reason.
        self.restart_daemon(None)
        _, err = self.refresh(name)
        self.assertIsNotNone(err)
        self.assertEqual(err.name, h.ERR_NOT_RUNNING, err)
        self.assertIn('uid %d' % stranger, err.message)
        self.assertFalse(self.client.get(h.guest_path(name), h.IFACE_GUEST, 'Running'))
        self.wait_hung_up(q)

    def test_qemu_of_the_caller(self):
        """The member's own QEMU needs no configuration."""
        self.restart_daemon(None)
        q = self.user_qemu(h.MEMBER)
        name = PREFIX + self.unique_name()
        r = self.register_as_member(name, q.daemon_socket)
        self.assertTrue(r['ok'], r)
        self.client.wait_prop(h.guest_path(name), h.IFACE_GUEST, 'Running', True)

    def test_socket_the_caller_cannot_reach(self):
        # Root's QEMU is allowed as a peer here: only the caller's own access decides.
        self.restart_daemon('root')
        q = self.start_qemu(self.make_chains(('vda',), 64 * h.MiB))
        os.chmod(q.dir, 0o700)
        os.chmod(q.daemon_socket, 0o600)
        name = PREFIX + self.unique_name()
        r = self.register_as_member(name, q.daemon_socket)
        self.assertFalse(r['ok'], 'bstest-member registered a socket it cannot connect to: %r' % r)
        self.assertEqual(r['error'], h.ERR_ACCESS_DENIED, r)
        self.assertIn(q.daemon_socket, r['message'])
        self.assertNoGuest(name)
        self.assertFalse(daemon_monitor_connected(q, q.daemon_socket))

        # The directory searchable but the socket not writable: still refused.
        os.chmod(q.dir, 0o755)
        r = self.register_as_member(name, q.daemon_socket)
        self.assertEqual(r.get('error'), h.ERR_ACCESS_DENIED, r)
        self.assertNoGuest(name)

        # Reachable: registered.
        os.chmod(q.daemon_socket, 0o777)
        r = self.register_as_member(name, q.daemon_socket)
        self.assertTrue(r['ok'], r)
        self.client.wait_prop(h.guest_path(name), h.IFACE_GUEST, 'Running', True)

    def test_after_a_reboot_the_owner_finds_the_socket(self):
        """The socket's directory is pinned for one boot: after a reboot the path is followed anew.
        It was followed as root: a member who, meanwhile, made their socket's directory a symlink
        to a directory they may not search, holding another QEMU's monitor (root's, allowed by
        QEMUUsers=), had the daemon drive that QEMU for them. A guest a user registered is now
        found as that user finds it, at every connect."""
        self.restart_daemon('root')
        mine = self.user_qemu(h.MEMBER)
        other = self.start_qemu(self.make_chains(('vda',), 64 * h.MiB))  # root's
        os.chmod(other.dir, 0o700)
        os.chmod(other.daemon_socket, 0o777)
        name = PREFIX + self.unique_name()
        r = self.register_as_member(name, mine.daemon_socket)
        self.assertTrue(r['ok'], r)
        self.client.wait_prop(h.guest_path(name), h.IFACE_GUEST, 'Running', True)
        # The daemon goes; the machine "reboots" (the pin's boot id is another); the member's
        # directory becomes a symlink to the other QEMU's.
        self.env.daemon.stop()
        state = os.path.join(self.env.daemon.state_dir, 'guests', name + '.json')
        with open(state) as f:
            rec = json.load(f)
        self.assertIn('qmp_boot_id', rec)
        rec['qmp_boot_id'] = '0123456789abcdef0123456789abcdef'
        with open(state, 'w') as f:
            json.dump(rec, f)
        mine.kill()
        os.rename(mine.dir, mine.dir + '.old')
        os.symlink(other.dir, mine.dir)
        self.env.daemon.start()
        self.client.wait_prop(h.guest_path(name), h.IFACE_GUEST, 'Running', False)
        _, err = self.refresh(name)
        self.assertIsNotNone(err, 'the guest runs on the other QEMU')
        self.assertFalse(self.client.get(h.guest_path(name), h.IFACE_GUEST, 'Running'))
        self.assertFalse(daemon_monitor_connected(other, other.daemon_socket),
                         "the daemon connected to a QEMU the guest's owner cannot reach")

    def test_no_way_through_another_process(self):
        """The caller's check kept the daemon's capabilities other than those over files: with
        CAP_SYS_PTRACE its walk went through /proc/PID/cwd of any process, into a directory the
        caller may not search, to a QEMU the caller could not reach itself."""
        self.restart_daemon('root')
        q = self.start_qemu(self.make_chains(('vda',), 64 * h.MiB))
        # hidden/ (0700) / vm/ (0755) / qmp.sock (0777): only a directory above it is closed.
        hidden = os.path.join(self.env.dir, self.unique_name('hidden'))
        vm = os.path.join(hidden, 'vm')
        os.makedirs(vm)
        os.chmod(hidden, 0o700)
        os.chmod(vm, 0o755)
        os.rename(q.daemon_socket, os.path.join(vm, 'qmp.sock'))
        os.chmod(os.path.join(vm, 'qmp.sock'), 0o777)
        sleeper = h.spawn(['sleep', '600'], cwd=vm)  # root's, its cwd in there
        self.addCleanup(sleeper.kill)
        name = PREFIX + self.unique_name()
        path = '/proc/%d/cwd/qmp.sock' % sleeper.pid
        r = self.register_as_member(name, path)
        self.assertFalse(r['ok'], 'bstest-member registered a socket it cannot reach, through %s: %r' % (path, r))
        # Refused twice over now: no magic link is followed, and the walk has no capability.
        self.assertIn(r['error'], (h.ERR_ACCESS_DENIED, h.ERR_INVALID_ARGS), r)
        self.assertNoGuest(name)

    def test_a_caller_cannot_stall_the_access_check(self):
        """The check that the caller may reach the socket ran in a child with the caller's uid, which
        the caller may signal: stopped, it held the daemon's only thread until its 5 s deadline, and
        the registration failed. A caller that stops everything of its own that the daemon starts
        (tests/helpers/stopper) still registers, and finds nothing to stop."""
        self.restart_daemon(None)
        q = self.user_qemu(h.MEMBER)
        stopper = h.spawn(h.setpriv_argv(h.MEMBER) + [STOPPER, str(self.env.daemon.proc.pid)],
                          stdout=subprocess.PIPE, text=True)
        self.addCleanup(stopper.kill)
        self.assertEqual(stopper.stdout.readline().strip(), 'ready')
        for _ in range(5):
            name = PREFIX + self.unique_name()
            r = self.register_as_member(name, q.daemon_socket)
            self.assertTrue(r['ok'], r)
            self.client.wait_prop(h.guest_path(name), h.IFACE_GUEST, 'Running', True)
            self.unregister_quietly(name)
        stopper.terminate()
        out, _ = stopper.communicate(timeout=10)
        self.assertEqual(out.splitlines()[-1:], ['stopped 0'], 'the daemon ran processes of the caller: %r' % out)


STOPPER = os.environ.get('STOPPER') or os.path.join(h.SOURCE_ROOT, 'build', 'tests', 'helpers', 'stopper')

if __name__ == '__main__':
    h.main()
