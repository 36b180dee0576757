#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Authorization against a real polkitd, and the shipped policy files.

polkitd runs on the private bus in a mount namespace of its own that shows it the machine's
actions plus our org.blockstream1.policy, and our 50-blockstream.rules (see harness.Polkit);
the machine's polkit configuration is never touched. Test users: bstest-owner (owns guests
that root registers for it), bstest-member (group blockstream), bstest-stranger.

  - the matrix: callers {root, owner, member, stranger} x every method: allowed exactly where
    the policy and rules say, denied everywhere else with nothing changed (state files, QEMU's
    block graph and jobs, every D-Bus property);
  - what blockstreamd asks polkitd (subject, action, details, the interaction flag);
  - the interaction flag without an authentication agent;
  - polkitd stopped, killed in the middle of a check, restarted;
  - a caller that leaves before polkit answers; other clients are served meanwhile;
  - the bus policy; pkaction on the actions; systemd-analyze verify on the unit; dbus-daemon
    with our bus policy (and refusing a broken copy).

Run alone: /usr/bin/python3 tests/integration/test_polkit.py (root; after ninja -C build).
"""

import json
import os
import pwd
import re
import select
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

import dbus  # noqa: E402
import dbus.bus  # noqa: E402

ROOT = 'root'
OWNER, MEMBER, STRANGER = h.OWNER, h.MEMBER, h.STRANGER

MANAGE = 'org.blockstream1.manage'
STREAM = 'org.blockstream1.stream'
INSPECT = 'org.blockstream1.inspect'
EXPORT = 'org.blockstream1.export'
# api.md, "polkit actions": defaults (any, inactive, active). inspect is not "yes" for active
# sessions (issue 9, item 12: any console user read every guest's maps): it follows stream.
ACTION_DEFAULTS = {
    MANAGE: ('auth_admin', 'auth_admin', 'auth_admin_keep'),
    STREAM: ('auth_admin', 'auth_admin', 'auth_admin_keep'),
    INSPECT: ('auth_admin', 'auth_admin', 'auth_admin_keep'),
    EXPORT: ('auth_admin', 'auth_admin', 'auth_admin'),
}

ERR_PROPERTY_READ_ONLY = 'org.freedesktop.DBus.Error.PropertyReadOnly'
# Answers that do not prove that a method's body ran: a refusal, or no answer from the daemon.
NOT_PAST_AUTH = {h.ERR_ACCESS_DENIED, h.ERR_INTERACTIVE, h.ERR_UNKNOWN_OBJECT, h.ERR_UNKNOWN_METHOD,
                 'org.freedesktop.DBus.Error.ServiceUnknown', 'org.freedesktop.DBus.Error.NameHasNoOwner',
                 'org.freedesktop.DBus.Error.NoReply', 'org.freedesktop.DBus.Error.Disconnected',
                 'org.freedesktop.DBus.Error.LimitsExceeded'}

SLOW_PREFIX = 'slow-'
SLOW_SECONDS = 2.0
# Test-only rule: for guests named slow-*, polkitd thinks for 2 s (a busy loop in the rule, so
# polkitd itself is blocked), then lets bstest-member manage them.
SLOW_RULES = '''// blockstreamd tests only (test_polkit.py): a slow answer.
polkit.addRule(function(action, subject) {
    var guest = action.lookup("guest");
    if (action.id == "org.blockstream1.manage" && guest && guest.indexOf("%s") == 0 &&
        subject.user == "%s") {
        var end = Date.now() + %d;
        while (Date.now() < end) {}
        return polkit.Result.YES;
    }
    return polkit.Result.NOT_HANDLED;
});
''' % (SLOW_PREFIX, MEMBER, int(SLOW_SECONDS * 1000))

# Test-only rule: the owner's stream checks on guests named gate-* wait (in polkitd, up to 8 s)
# until the test makes the gate file, then go on to the shipped rules: an answer held back for
# as long as the test needs, whatever the machine's speed.
GATE_PREFIX = 'gate-'
GATE_FILE = '/tmp/bstest-polkit-gate-%d' % os.getpid()
GATE_RULES = '''// blockstreamd tests only (test_polkit.py): an answer held until a file exists.
polkit.addRule(function(action, subject) {
    var guest = action.lookup("guest");
    if (action.id == "org.blockstream1.stream" && guest && guest.indexOf("%s") == 0 &&
        subject.user == "%s") {
        try {
            polkit.spawn(["/bin/sh", "-c", "n=0; while [ ! -e %s ] && [ $n -lt 160 ]; do sleep 0.05; n=$((n+1)); done"]);
        } catch (e) {}
    }
    return polkit.Result.NOT_HANDLED;
});
''' % (GATE_PREFIX, OWNER, GATE_FILE)

HOST_POLICY = os.path.join(h.Polkit.ACTIONS, os.path.basename(h.POLKIT_POLICY))


def host_polkit_config():
    """What the machine's own polkitd would read: file names and contents."""
    out = {}
    for d in (h.Polkit.ACTIONS, h.Polkit.ETC_RULES, h.Polkit.USR_RULES):
        out[d] = h.tree_snapshot(d)
    return out


HOST_CONFIG_BEFORE = host_polkit_config()     # at import, before any polkitd of ours ran


def allowed(caller, action, guest_owner):
    """policy + 50-blockstream.rules: root all; stream/inspect for the guest's owner and for
    members of group blockstream; nothing else without an administrator's authentication."""
    if caller == ROOT:
        return True
    if action in (STREAM, INSPECT):
        return caller == MEMBER or caller == guest_owner
    return False


def gv(s):
    """A GVariant text-format string literal."""
    return "'%s'" % s.replace('\\', '\\\\').replace("'", "\\'")


class PolkitMonitor:
    """Records the CheckAuthorization calls on the bus (root may BecomeMonitor)."""

    def __init__(self, client):
        self.client = client
        self.calls = []
        self.conn = dbus.bus.BusConnection(client.address, mainloop=h.DBusGMainLoop())
        self.conn.add_message_filter(self._filter)
        self.conn.call_blocking('org.freedesktop.DBus', '/org/freedesktop/DBus', 'org.freedesktop.DBus.Monitoring',
                                'BecomeMonitor', 'asu',
                                (["type='method_call',interface='org.freedesktop.PolicyKit1.Authority',"
                                  "member='CheckAuthorization'"], dbus.UInt32(0)))

    def _filter(self, conn, msg):
        if msg.get_member() == 'CheckAuthorization':
            self.calls.append({'t': time.monotonic(), 'sender': msg.get_sender(), 'args': h.unwrap(msg.get_args_list())})

    def close(self):
        try:
            self.conn.close()
        except Exception:
            pass

    def wait(self, n, timeout=5):
        self.client.wait_for(lambda: len(self.calls) >= n, timeout, '%d CheckAuthorization calls' % n)
        return self.calls


class PolkitTestCase(h.TestCase):
    needs_polkit = True
    polkit_rules = {'10-bstest-slow.rules': SLOW_RULES, '11-bstest-gate.rules': GATE_RULES}

    @classmethod
    def setUpClass(cls):
        h.check_prerequisites(polkit=True)
        cls.users = h.ensure_test_users()
        cls.users[ROOT] = 0
        cls.sessions = {}
        super().setUpClass()

    @classmethod
    def tearDownClass(cls):
        for s in cls.sessions.values():
            s.close()
        cls.sessions = {}
        super().tearDownClass()

    def setUp(self):
        super().setUp()
        # One test that killed the daemon must not take the others down with it.
        d = self.env.daemon if self.env is not None else None
        if self.needs_daemon and d is not None and d.proc is not None and not d.running():
            h.log('blockstreamd had exited with status %s; starting it again for %s'
                  % (d.proc.returncode, self.id()))
            d.start()
        if self.needs_polkit and self.env is not None and not self.env.polkit.running():
            self.env.polkit.start()

    def assertDaemonAlive(self, after, settle=0.0):
        d = self.env.daemon
        if settle:
            time.sleep(settle)    # what the call set off (QMP replies, helpers) has happened
        if not d.running():
            self.fail('blockstreamd died (exit status %s) after %s; see its log below'
                      % (d.proc.returncode, after))

    def session(self, user):
        s = self.sessions.get(user)
        if s is None or s.proc.poll() is not None:
            s = self.sessions[user] = h.UserSession(user, self.env.bus.address)
            self.assertEqual(s.uid, self.users[user])
        return s

    def uid(self, user):
        return self.users[user]

    # -- guests
    def owned_guest(self, owner, size=64 * h.MiB):
        """A running guest that root registers for `owner` (None: root's own)."""
        o = h.opts(owner=h.U(self.uid(owner))) if owner not in (None, ROOT) else None
        g = self.new_guest(size=size, options=o)
        self.assertEqual(g.prop('Owner'), self.uid(owner) if owner else 0)
        return g

    def spare_qemu(self, user=None):
        return self.start_qemu(self.make_chains(('vda',), 64 * h.MiB), user=user)

    def wait_job_gone(self, g, timeout=20):
        h.wait_until(lambda: g.qemu.qmp.jobs() == [], timeout, 'the job to leave QEMU')

    # -- assertions
    def assertDenied(self, r, action, what, errors=(h.ERR_INTERACTIVE,)):
        self.assertFalse(r['ok'], '%s was allowed: %r' % (what, r))
        self.assertIn(r['error'], errors, '%s: %r' % (what, r))
        if action:
            self.assertIn(action, r['message'], '%s: the error does not name the action: %r' % (what, r))

    def assertOk(self, r, what):
        self.assertTrue(r['ok'], '%s was refused: %r' % (what, r))

    def shared_dir(self):
        """A directory beneath the image directory where anyone may create files, as in /tmp: an
        overlay is created as its caller (ProvisionDisk)."""
        d = os.path.join(self.env.images, 'shared')
        os.makedirs(d, exist_ok=True)
        os.chmod(d, 0o1777)
        return d

    def assertPastAuth(self, r, what):
        """The call got past authorization: success, or an error of the method itself."""
        self.assertTrue(r['ok'] or (r['error'] not in NOT_PAST_AUTH and not r['error'].startswith('local:')),
                        '%s did not get past authorization: %r' % (what, r))
        self.assertDaemonAlive(what, settle=0.2)

    def assertError(self, r, names, what):
        names = {names} if isinstance(names, str) else set(names)
        self.assertFalse(r['ok'], '%s: expected %s, the call succeeded: %r' % (what, names, r))
        self.assertIn(r['error'], names, what)

    def denied_changes_nothing(self, fn, action, what, errors=(h.ERR_INTERACTIVE,)):
        before = self.snapshot(block_graph=True)
        r = fn()
        self.assertDenied(r, action, what, errors)
        self.assertDaemonAlive(what)
        self.client.pump(0.05)   # a stray PropertiesChanged would have arrived by now
        self.assertSnapshotEqual(before, self.snapshot(block_graph=True), what)
        return r


# ---------------------------------------------------------------------------------------------

class MatrixTest(PolkitTestCase):
    """callers x methods: allowed exactly where policy + rules say."""

    env_per_test = False

    def run_matrix(self, caller):
        s = self.session(caller)
        own = self.owned_guest(OWNER)
        other = self.owned_guest(None)
        spare = self.spare_qemu()
        template = own.chains['vda'].base
        for g, g_owner in ((own, OWNER), (other, ROOT)):
            d = g.disk()
            here = 'as %s on the guest of %s' % (caller, g_owner)

            def do(path, iface, member, sig='', args='()', **kw):
                return s.call(path, iface, member, sig, args, **kw)

            def check(action, label, fn, when_allowed):
                what = '%s %s' % (label, here)
                self.assertDaemonAlive('the calls before %s' % what)    # ends the test: nothing to ask
                with self.subTest(caller=caller, guest_owner=g_owner, call=label):
                    if allowed(caller, action, g_owner):
                        r = fn()
                        when_allowed(r, what)
                    else:
                        self.denied_changes_nothing(fn, action, what)

            # No authorization at all.
            with self.subTest(caller=caller, guest_owner=g_owner, call='GetGuest'):
                r = do(h.MANAGER_PATH, h.IFACE_MANAGER, 'GetGuest', 's', '(%s,)' % gv(g.name))
                self.assertOk(r, 'GetGuest ' + here)
                self.assertEqual(r['result'], [g.path])
                r = do(d.path, h.IFACE_PROPS, 'GetAll', 's', '(%s,)' % gv(h.IFACE_STREAM))
                self.assertOk(r, 'GetAll ' + here)
                self.assertEqual(r['result'][0]['State'], d.prop('State'))

            # inspect
            check(INSPECT, 'Guest.Refresh', lambda: do(g.path, h.IFACE_GUEST, 'Refresh'),
                  lambda r, what: self.assertOk(r, what))
            check(INSPECT, 'GetAllocationMap', lambda: do(d.path, h.IFACE_STREAM, 'GetAllocationMap', 'tt', '(0, 0)'),
                  self.assertPastAuth)

            # stream, on an idle disk
            bw = 3 * h.MiB + self.uid(caller)

            def bandwidth_set(r, what, bw=bw, d=d):
                self.assertOk(r, what)
                self.assertEqual(d.prop('Bandwidth'), bw)
            check(STREAM, 'SetBandwidth', lambda: do(d.path, h.IFACE_STREAM, 'SetBandwidth', 't', '(%d,)' % bw),
                  bandwidth_set)
            lat = 1000 + self.uid(caller)

            def latency_set(r, what, lat=lat, d=d):
                self.assertOk(r, what)
                self.assertEqual(d.prop('MaxGuestLatency'), lat)
                d.call('SetMaxGuestLatency', 't', h.T(0))   # as root: the next jobs run as before
            check(STREAM, 'SetMaxGuestLatency',
                  lambda: do(d.path, h.IFACE_STREAM, 'SetMaxGuestLatency', 't', '(%d,)' % lat), latency_set)
            for m in ('Cancel', 'Pause', 'Resume'):
                check(STREAM, m + ' (idle)', lambda m=m: do(d.path, h.IFACE_STREAM, m),
                      lambda r, what: self.assertError(r, h.ERR_NOT_RUNNING, what))

            def range_started(r, what, d=d, g=g):
                self.assertPastAuth(r, what)
                if r['ok']:      # a 1 MiB range ends soon; the disk had no job before
                    d.wait_finished()
                    self.wait_job_gone(g)
            check(STREAM, 'Start (range)',
                  lambda: do(d.path, h.IFACE_STREAM, 'Start', 'tta{sv}', '(%d, %d, {})' % (h.MiB, h.MiB)),
                  range_started)

            def stream_lifecycle(r, what, d=d, g=g):
                # Start ran: go through Pause, Resume, SetBandwidth and Cancel as the same caller.
                self.assertOk(r, what)
                d.wait_state('running')
                for m, state in (('Pause', 'paused'), ('Resume', 'running')):
                    self.assertOk(do(d.path, h.IFACE_STREAM, m), '%s %s' % (m, here))
                    d.wait_state(state)
                self.assertOk(do(d.path, h.IFACE_STREAM, 'SetBandwidth', 't', '(%d,)' % (512 * h.KiB)),
                              'SetBandwidth on a running job ' + here)
                self.assertEqual(d.prop('Bandwidth'), 512 * h.KiB)
                self.client.pump(0.1)
                n = len(d.finished())
                self.assertOk(do(d.path, h.IFACE_STREAM, 'Cancel'), 'Cancel ' + here)
                self.client.wait_for(lambda: len(d.finished()) > n, 30, 'Finished after Cancel ' + here)
                result = d.finished()[n]
                self.assertEqual(result[0], 'cancelled', result)
                self.wait_job_gone(g)
            check(STREAM, 'Start', lambda: do(d.path, h.IFACE_STREAM, 'Start', 'tta{sv}',
                                              "(0, 0, {'bandwidth': <uint64 %d>})" % h.MiB), stream_lifecycle)

            # export
            def exported(r, what):
                self.assertPastAuth(r, what)
                if r['ok']:
                    self.client.try_call(r['result'][0], 'org.blockstream1.Export', 'Stop')
            check(EXPORT, 'Export', lambda: do(d.path, h.IFACE_STREAM, 'Export', 'a{sv}', '({},)'), exported)

            # manage
            target = os.path.join(self.shared_dir(), 'provisioned-%s-%s.qcow2' % (caller, g_owner))

            def provisioned(r, what, target=target):
                self.assertPastAuth(r, what)
                self.assertEqual(os.path.exists(target), r['ok'], '%s: %r' % (what, r))
                if r['ok']:
                    os.unlink(target)
            check(MANAGE, 'ProvisionDisk', lambda: do(h.MANAGER_PATH, h.IFACE_MANAGER, 'ProvisionDisk', 'ssa{sv}',
                                                      '(%s, %s, {})' % (gv(template), gv(target))), provisioned)
            if not allowed(caller, MANAGE, g_owner):
                self.assertFalse(os.path.exists(target))

            new_name = self.unique_name('new')

            def registered(r, what, new_name=new_name):
                self.assertOk(r, what)
                self.assertEqual(r['result'], [h.guest_path(new_name)])
                self.assertEqual(self.client.get(h.guest_path(new_name), h.IFACE_GUEST, 'Owner'), self.uid(caller))
                self.client.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'UnregisterGuest', 's', new_name)
            check(MANAGE, 'RegisterGuest', lambda: do(h.MANAGER_PATH, h.IFACE_MANAGER, 'RegisterGuest', 'ssa{sv}',
                                                      '(%s, %s, {})' % (gv(new_name), gv(spare.daemon_socket))),
                  registered)

            # Unregistering: root does it to a guest registered for the purpose; the others try
            # the real one.
            for label, iface in (('UnregisterGuest', h.IFACE_MANAGER), ('Guest.Unregister', h.IFACE_GUEST)):
                def unregister(label=label, iface=iface, g=g):
                    name = g.name
                    if caller == ROOT:
                        name = self.unique_name('victim')
                        self.register(name, spare.daemon_socket)
                    if iface == h.IFACE_MANAGER:
                        r = do(h.MANAGER_PATH, iface, 'UnregisterGuest', 's', '(%s,)' % gv(name))
                    else:
                        r = do(h.guest_path(name), iface, 'Unregister')
                    r['name'] = name
                    return r

                def unregistered(r, what):
                    self.assertOk(r, what)
                    e = self.assertDBusError(h.ERR_NO_SUCH_GUEST, self.client.call, h.MANAGER_PATH,
                                             h.IFACE_MANAGER, 'GetGuest', 's', r['name'])
                    self.assertIn(r['name'], e.message)
                check(MANAGE, label, unregister, unregistered)

        # Both guests are still there, and QEMU has no job left.
        for g in (own, other):
            self.assertEqual(self.client.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'GetGuest', 's', g.name), g.path)
            self.assertEqual(g.qemu.qmp.jobs(), [])

    def test_matrix_root(self):
        self.run_matrix(ROOT)

    def test_matrix_owner(self):
        self.run_matrix(OWNER)

    def test_matrix_member(self):
        self.run_matrix(MEMBER)

    def test_matrix_stranger(self):
        self.run_matrix(STRANGER)

    def test_register_for_another_uid(self):
        """Only root may register a guest for another uid; for oneself the manage action decides."""
        q = self.spare_qemu()
        for caller in (OWNER, MEMBER, STRANGER):
            s = self.session(caller)
            name = self.unique_name()
            with self.subTest(caller=caller):
                r = self.denied_changes_nothing(
                    lambda: s.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'RegisterGuest', 'ssa{sv}',
                                   "(%s, %s, {'owner': <uint32 0>})" % (gv(name), gv(q.daemon_socket))),
                    None, 'RegisterGuest for root as %s' % caller, errors=(h.ERR_ACCESS_DENIED,))
                self.assertIn('root', r['message'])
                self.denied_changes_nothing(
                    lambda: s.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'RegisterGuest', 'ssa{sv}',
                                   "(%s, %s, {'owner': <uint32 %d>})" % (gv(name), gv(q.daemon_socket),
                                                                          self.uid(caller))),
                    MANAGE, 'RegisterGuest for oneself as %s' % caller)

    def test_denied_calls_leave_a_running_job_alone(self):
        """A job (paused, so that nothing moves) on root's guest: refused callers change nothing."""
        g = self.owned_guest(None)
        d = g.disk()
        d.start(options=h.opts(bandwidth=h.T(h.MiB)))
        d.wait_state('running')
        d.pause()
        d.wait_state('paused')
        h.wait_until(lambda: [j['status'] for j in g.qemu.qmp.jobs()] == ['paused'], 10, 'QEMU to pause the job')
        done = g.qemu.qmp.jobs()[0]['offset']
        time.sleep(0.3)
        self.assertEqual(g.qemu.qmp.jobs()[0]['offset'], done, 'a paused job still moves')
        try:
            for caller in (OWNER, STRANGER):
                s = self.session(caller)
                for member, sig, args in (('Cancel', '', '()'), ('Resume', '', '()'), ('Pause', '', '()'),
                                          ('SetBandwidth', 't', '(0,)'),
                                          ('Start', 'tta{sv}', '(0, 0, {})')):
                    with self.subTest(caller=caller, member=member):
                        self.denied_changes_nothing(lambda: s.call(d.path, h.IFACE_STREAM, member, sig, args),
                                                    STREAM, '%s of a paused job as %s' % (member, caller))
                with self.subTest(caller=caller, member='UnregisterGuest'):
                    self.denied_changes_nothing(
                        lambda: s.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'UnregisterGuest', 's', '(%s,)' % gv(g.name)),
                        MANAGE, 'UnregisterGuest of a guest with a job as %s' % caller)
            # A member may: the job is the same one, resumed and cancelled by them.
            s = self.session(MEMBER)
            self.assertOk(s.call(d.path, h.IFACE_STREAM, 'Resume'), 'Resume as member')
            d.wait_state('running')
        finally:
            since = time.monotonic() - 1
            d.try_call('Cancel')
        self.assertEqual(d.wait_finished(since=since)[0], 'cancelled')
        self.wait_job_gone(g)


# ---------------------------------------------------------------------------------------------

class PolkitBehaviourTest(PolkitTestCase):

    def test_check_authorization_request(self):
        """What the daemon asks: subject system-bus-name (the caller's unique name), the method's
        action, details guest/disk/owner, AllowUserInteraction exactly when the caller set it. Root
        and the unauthorized members are never checked."""
        g = self.owned_guest(OWNER)
        d = g.disk()
        mon = PolkitMonitor(self.client)
        self.addCleanup(mon.close)
        self.client.pump(0.1)
        member = self.session(MEMBER)
        owner = self.session(OWNER)
        cases = [
            (member, d.path, h.IFACE_STREAM, 'SetBandwidth', 't', '(1048576,)', False, STREAM,
             {'guest': g.name, 'disk': 'vda', 'owner': OWNER}),
            (member, d.path, h.IFACE_STREAM, 'SetBandwidth', 't', '(2097152,)', True, STREAM,
             {'guest': g.name, 'disk': 'vda', 'owner': OWNER}),
            (owner, g.path, h.IFACE_GUEST, 'Refresh', '', '()', True, INSPECT, {'guest': g.name, 'owner': OWNER}),
            (owner, d.path, h.IFACE_STREAM, 'Export', 'a{sv}', '({},)', False, EXPORT,
             {'guest': g.name, 'disk': 'vda', 'owner': OWNER}),
            (member, h.MANAGER_PATH, h.IFACE_MANAGER, 'UnregisterGuest', 's', '(%s,)' % gv(g.name), False, MANAGE,
             {'guest': g.name, 'owner': OWNER}),
        ]
        for i, (s, path, iface, member_name, sig, args, interactive, action, details) in enumerate(cases):
            with self.subTest(member=member_name, interactive=interactive):
                n = len(mon.calls)
                s.call(path, iface, member_name, sig, args, interactive=interactive)
                calls = mon.wait(n + 1)
                self.assertEqual(len(calls), n + 1, 'one check per call: %r' % calls[n:])
                c = calls[n]
                subject, action_id, got_details, flags, cancellation = c['args']
                self.assertEqual(c['sender'], self.client.name_owner(), 'not asked by blockstreamd')
                self.assertEqual(subject, ('system-bus-name', {'name': s.unique_name}))
                self.assertEqual(action_id, action)
                self.assertEqual(got_details, details)
                self.assertEqual(flags, 1 if interactive else 0)
                self.assertEqual(cancellation, '')
        # Root is never checked; reading is never checked.
        n = len(mon.calls)
        self.session(ROOT).call(d.path, h.IFACE_STREAM, 'SetBandwidth', 't', '(0,)')
        self.session(ROOT).call(g.path, h.IFACE_GUEST, 'Refresh')
        self.session(STRANGER).call(h.MANAGER_PATH, h.IFACE_MANAGER, 'GetGuest', 's', '(%s,)' % gv(g.name))
        self.session(STRANGER).call(d.path, h.IFACE_PROPS, 'GetAll', 's', '(%s,)' % gv(h.IFACE_STREAM))
        self.client.pump(0.3)
        self.assertEqual(mon.calls[n:], [], 'root or a read was sent to polkit')

    def test_answer_for_the_guest_asked_about(self):
        """The owner's SetBandwidth waits for polkit; meanwhile root unregisters the guest and
        registers another of the same name (the same object paths) for itself. The answer was
        about the owner's guest: the call must not act on root's. Before, polkit's yes (the owner
        rule) was taken for whatever the path named when it came."""
        if os.path.exists(GATE_FILE):
            os.unlink(GATE_FILE)
        self.addCleanup(lambda: os.path.exists(GATE_FILE) and os.unlink(GATE_FILE))
        name = GATE_PREFIX + self.unique_name()
        first = self.new_guest(size=64 * h.MiB, name=name, options=h.opts(owner=h.U(self.uid(OWNER))))
        spare = self.spare_qemu()
        d = first.disk()
        s = self.session(OWNER)
        mon = PolkitMonitor(self.client)
        self.addCleanup(mon.close)
        self.client.pump(0.1)
        n = len(mon.calls)
        s.send(d.path, h.IFACE_STREAM, 'SetBandwidth', 't', '(1048576,)')
        self.assertEqual(len(mon.wait(n + 1)), n + 1, 'the check was not sent')
        self.assertEqual(d.prop('Bandwidth'), 0, 'SetBandwidth acted before its answer')
        self.assertIsNone(self.client.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'UnregisterGuest', 's', name))
        self.register(name, spare.daemon_socket)
        self.addCleanup(self.unregister_quietly, name)
        self.assertEqual(self.client.get(h.guest_path(name), h.IFACE_GUEST, 'Owner'), 0)
        with open(GATE_FILE, 'w'):
            pass
        r = s.receive(30)
        self.assertDenied(r, STREAM, "SetBandwidth on root's guest, answered for the owner's",
                          errors=(h.ERR_INTERACTIVE, h.ERR_ACCESS_DENIED))
        self.assertEqual(self.client.get(d.path, h.IFACE_STREAM, 'Bandwidth'), 0)

    def test_owner_without_an_account_is_no_detail(self):
        """A guest's owner that is no account (a uid given at registration, or a user deleted
        since) passes no 'owner' detail: in digits it would match a user so named in the rules'
        owner == subject.user (a login "61234" exists with LDAP or --badname)."""
        uid = next(u for u in range(61234, 65000) if not _has_account(u))
        g = self.new_guest(size=64 * h.MiB, options=h.opts(owner=h.U(uid)))
        d = g.disk()
        mon = PolkitMonitor(self.client)
        self.addCleanup(mon.close)
        self.client.pump(0.1)
        n = len(mon.calls)
        self.session(MEMBER).call(d.path, h.IFACE_STREAM, 'SetBandwidth', 't', '(1048576,)')
        calls = mon.wait(n + 1)
        self.assertEqual(len(calls), n + 1, 'one check per call: %r' % calls[n:])
        self.assertEqual(calls[n]['args'][2], {'guest': g.name, 'disk': 'vda'})

    def test_interactive_flag_without_agent(self):
        """With ALLOW_INTERACTIVE_AUTHORIZATION and no authentication agent: what polkitd answers
        (asked directly here) decides; the daemon maps a challenge to
        InteractiveAuthorizationRequired and a plain no to AccessDenied. Nothing changes."""
        own = self.owned_guest(OWNER)
        other = self.owned_guest(None)
        spare = self.spare_qemu()
        cases = [
            (STRANGER, own, STREAM, 'SetBandwidth', 't', '(1048576,)'),
            (STRANGER, own, STREAM, 'Start', 'tta{sv}', '(0, 0, {})'),
            (STRANGER, own, INSPECT, 'GetAllocationMap', 'tt', '(0, 0)'),
            (STRANGER, own, INSPECT, 'Refresh', '', '()'),
            (OWNER, other, STREAM, 'Start', 'tta{sv}', '(0, 0, {})'),
            (OWNER, other, INSPECT, 'Refresh', '', '()'),
            (OWNER, own, EXPORT, 'Export', 'a{sv}', '({},)'),
            (MEMBER, own, MANAGE, 'Unregister', '', '()'),
            (MEMBER, own, MANAGE, 'RegisterGuest', 'ssa{sv}', None),
            (MEMBER, own, EXPORT, 'Export', 'a{sv}', '({},)'),
            (STRANGER, own, MANAGE, 'ProvisionDisk', 'ssa{sv}', None),
        ]
        seen = set()
        for caller, g, action, member, sig, args in cases:
            s = self.session(caller)
            if member == 'RegisterGuest':
                path, iface, args = h.MANAGER_PATH, h.IFACE_MANAGER, '(%s, %s, {})' % (
                    gv(self.unique_name()), gv(spare.daemon_socket))
            elif member == 'ProvisionDisk':
                path, iface, args = h.MANAGER_PATH, h.IFACE_MANAGER, '(%s, %s, {})' % (
                    gv(own.chains['vda'].base), gv(os.path.join(self.env.images, 'p.qcow2')))
            elif member in ('Refresh', 'Unregister'):
                path, iface = g.path, h.IFACE_GUEST
            else:
                path, iface = g.disk().path, h.IFACE_STREAM
            # polkitd's own answer for this caller, with the flag.
            authorized, challenge, details = self.client.call(
                '/org/freedesktop/PolicyKit1/Authority', 'org.freedesktop.PolicyKit1.Authority',
                'CheckAuthorization', '(sa{sv})sa{ss}us',
                ('system-bus-name', {'name': s.unique_name}), action, {'guest': g.name}, h.U(1), '',
                dest='org.freedesktop.PolicyKit1')
            self.assertFalse(authorized, '%s is authorized for %s' % (caller, action))
            expect = h.ERR_INTERACTIVE if challenge else h.ERR_ACCESS_DENIED
            seen.add((action, bool(challenge), expect))
            with self.subTest(caller=caller, member=member):
                self.denied_changes_nothing(lambda: s.call(path, iface, member, sig, args, interactive=True),
                                            action, '%s with the interaction flag as %s' % (member, caller),
                                            errors=(expect,))
        h.log('polkit 122 with AllowUserInteraction and no agent: %s' % sorted(seen))

    def test_polkitd_absent(self):
        """polkitd stopped: every unprivileged call refused with AccessDenied, nothing changed;
        root works; polkitd back: allowed again."""
        g = self.owned_guest(OWNER)
        d = g.disk()
        spare = self.spare_qemu()
        pk = self.env.polkit
        pk.stop()
        try:
            for caller, path, iface, member, sig, args, action in (
                    (MEMBER, d.path, h.IFACE_STREAM, 'SetBandwidth', 't', '(1048576,)', STREAM),
                    (MEMBER, d.path, h.IFACE_STREAM, 'Start', 'tta{sv}', '(0, 0, {})', STREAM),
                    (OWNER, d.path, h.IFACE_STREAM, 'GetAllocationMap', 'tt', '(0, 0)', INSPECT),
                    (OWNER, g.path, h.IFACE_GUEST, 'Refresh', '', '()', INSPECT),
                    (OWNER, g.path, h.IFACE_GUEST, 'Unregister', '', '()', MANAGE),
                    (STRANGER, d.path, h.IFACE_STREAM, 'Export', 'a{sv}', '({},)', EXPORT),
                    (STRANGER, h.MANAGER_PATH, h.IFACE_MANAGER, 'RegisterGuest', 'ssa{sv}',
                     '(%s, %s, {})' % (gv(self.unique_name()), gv(spare.daemon_socket)), MANAGE)):
                for interactive in (False, True):
                    with self.subTest(caller=caller, member=member, interactive=interactive):
                        s = self.session(caller)
                        self.denied_changes_nothing(
                            lambda: s.call(path, iface, member, sig, args, interactive=interactive), action,
                            '%s as %s without polkitd' % (member, caller), errors=(h.ERR_ACCESS_DENIED,))
            # Root does not need polkit.
            self.assertOk(self.session(ROOT).call(d.path, h.IFACE_STREAM, 'SetBandwidth', 't', '(4194304,)'),
                          'SetBandwidth as root without polkitd')
            self.assertEqual(d.prop('Bandwidth'), 4 * h.MiB)
            self.assertTrue(self.env.daemon.running())
        finally:
            if not pk.running():
                pk.start()
        r = self.session(MEMBER).call(d.path, h.IFACE_STREAM, 'SetBandwidth', 't', '(1048576,)')
        self.assertOk(r, 'SetBandwidth as member once polkitd is back')
        self.assertEqual(d.prop('Bandwidth'), h.MiB)
        self.assertOk(self.session(OWNER).call(g.path, h.IFACE_GUEST, 'Refresh'), 'Refresh as owner, polkitd back')

    def test_polkitd_dies_during_a_check(self):
        """polkitd killed while it thinks (the slow rule): the caller is refused at once,
        nothing is registered, later checks work with a new polkitd. (The member registers its
        own QEMU: one it can reach, running as itself.)"""
        q = self.spare_qemu(user=MEMBER)
        name = SLOW_PREFIX + self.unique_name()
        s = self.session(MEMBER)
        before = self.snapshot()
        pk = self.env.polkit
        s.send(h.MANAGER_PATH, h.IFACE_MANAGER, 'RegisterGuest', 'ssa{sv}',
               '(%s, %s, {})' % (gv(name), gv(q.daemon_socket)))
        time.sleep(0.5)
        t0 = time.monotonic()
        try:
            pk.kill()
            r = s.receive(15)
        finally:
            if not pk.running():
                pk.start()
        self.assertDenied(r, MANAGE, 'RegisterGuest while polkitd died', errors=(h.ERR_ACCESS_DENIED,))
        self.assertLess(time.monotonic() - t0, SLOW_SECONDS + 1.0)
        self.assertSnapshotEqual(before, self.snapshot(), 'a RegisterGuest whose check failed')
        self.assertDBusError(h.ERR_NO_SUCH_GUEST, self.client.call, h.MANAGER_PATH, h.IFACE_MANAGER, 'GetGuest',
                             's', name)
        # With polkitd back the same call goes through (slowly).
        r = s.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'RegisterGuest', 'ssa{sv}',
                   '(%s, %s, {})' % (gv(name), gv(q.daemon_socket)))
        self.assertOk(r, 'RegisterGuest of %s as member' % name)
        self.addCleanup(self.unregister_quietly, name)
        self.assertEqual(self.client.get(h.guest_path(name), h.IFACE_GUEST, 'Owner'), self.uid(MEMBER))


    def test_many_checks_pending_at_once(self):
        """More authorized calls waiting for polkit at once than dbus-daemon lets one connection
        have pending replies (max_replies_per_connection, 128 by default on the system bus too):
        every one of them must still be answered as polkit decides. polkitd is held with SIGSTOP
        while the calls arrive, so they all wait together."""
        g = self.owned_guest(OWNER)
        d = g.disk()
        self.client.pump(0.1)
        conns, per_conn = 4, 40
        bw = 5 * h.MiB
        pk = self.env.polkit
        req = json.dumps({'address': self.env.bus.address, 'path': d.path, 'connections': conns,
                          'per_connection': per_conn, 'bandwidth': bw})
        os.kill(pk.proc.pid, signal.SIGSTOP)
        try:
            p = h.spawn(h.setpriv_argv(MEMBER) + ['/usr/bin/python3', '-c', _BURST, req], stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, env={'PATH': '/usr/bin:/bin', 'HOME': '/', 'LANG': 'C.UTF-8'})
            first = p.stdout.readline()
            if not first:
                self.fail('the burst client did not start: %s' % p.stderr.read().decode(errors='replace'))
            self.assertEqual(json.loads(first)['sent'], conns * per_conn)
            time.sleep(1.0)     # the daemon reads them all and asks polkit about each
            # Meanwhile reads are served.
            t0 = time.monotonic()
            self.assertEqual(d.prop('State'), 'idle')
            self.assertLess(time.monotonic() - t0, 0.5)
        finally:
            os.kill(pk.proc.pid, signal.SIGCONT)
        out, err = p.communicate(timeout=60)
        res = json.loads(out.decode().strip().splitlines()[-1])
        self.assertDaemonAlive('%d concurrent calls' % (conns * per_conn))
        self.assertEqual(res['outcomes'], {'ok': conns * per_conn},
                         'authorized calls refused while %d checks were pending (dbus-daemon refuses a '
                         'connection more than max_replies_per_connection pending calls with LimitsExceeded, '
                         'which must not become a refusal of an authorized caller): %r'
                         % (conns * per_conn, res))
        self.assertEqual(d.prop('Bandwidth'), bw)


_BURST = r'''
import json, sys
from gi.repository import Gio, GLib
cfg = json.loads(sys.argv[1])
flags = Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION
conns = [Gio.DBusConnection.new_for_address_sync(cfg["address"], flags, None, None)
         for _ in range(cfg["connections"])]
loop = GLib.MainLoop()
pending = [0]
outcomes, messages = {}, {}
def done(conn, res, data):
    try:
        conn.call_finish(res)
        o = "ok"
    except GLib.Error as e:
        o = Gio.DBusError.get_remote_error(e) or "local"
        Gio.DBusError.strip_remote_error(e)
        messages.setdefault(o, e.message)
    outcomes[o] = outcomes.get(o, 0) + 1
    pending[0] -= 1
    if pending[0] == 0:
        loop.quit()
for c in conns:
    for i in range(cfg["per_connection"]):
        pending[0] += 1
        c.call("org.blockstream1", cfg["path"], "org.blockstream1.BlockStream", "SetBandwidth",
               GLib.Variant("(t)", (cfg["bandwidth"],)), None, Gio.DBusCallFlags.NO_AUTO_START, 60000, None,
               done, None)
for c in conns:
    c.flush_sync(None)
print(json.dumps({"sent": pending[0]}), flush=True)
loop.run()
print(json.dumps({"outcomes": outcomes, "messages": messages}), flush=True)
'''


# ---------------------------------------------------------------------------------------------

# A caller that floods: it registers itself as its own polkit authentication agent (for its own
# process, as pkttyagent --process does) and never answers BeginAuthentication, so each of its
# calls that polkit challenges stays pending (in polkitd, and in the daemon's registry) until
# the caller goes. Then it sends `per_connection` calls with ALLOW_INTERACTIVE_AUTHORIZATION on
# each of `connections` connections, and a Peer.Ping to the daemon on each: the daemon handles
# a connection's messages in order, so once every Ping is answered every call has been either
# queued or refused. It prints what it got by then, and stays until it is killed.
_FLOODER = r"""
import json, os, sys
from gi.repository import Gio, GLib
cfg = json.loads(sys.argv[1])
flags = Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION
def connect():
    return Gio.DBusConnection.new_for_address_sync(cfg["address"], flags, None, None)
AGENT = ('<node><interface name="org.freedesktop.PolicyKit1.AuthenticationAgent">'
         '<method name="BeginAuthentication"><arg type="s" direction="in"/><arg type="s" direction="in"/>'
         '<arg type="s" direction="in"/><arg type="a{ss}" direction="in"/><arg type="s" direction="in"/>'
         '<arg type="a(sa{sv})" direction="in"/></method>'
         '<method name="CancelAuthentication"><arg type="s" direction="in"/></method></interface></node>')
held, asked = [], [0]
def agent_call(conn, sender, path, iface, method, params, invocation):
    if method == "BeginAuthentication":
        asked[0] += 1
        held.append(invocation)      # never answered
    else:
        invocation.return_value(None)
agent = connect()
agent.register_object("/bstest/agent", Gio.DBusNodeInfo.new_for_xml(AGENT).interfaces[0], agent_call, None, None)
with open("/proc/self/stat") as f:
    start_time = int(f.read().rsplit(")", 1)[1].split()[19])
subject = ("unix-process", {"pid": GLib.Variant("u", os.getpid()), "start-time": GLib.Variant("t", start_time)})
agent.call_sync("org.freedesktop.PolicyKit1", "/org/freedesktop/PolicyKit1/Authority",
                "org.freedesktop.PolicyKit1.Authority", "RegisterAuthenticationAgent",
                GLib.Variant("((sa{sv})ss)", (subject, "C", "/bstest/agent")), None, 0, -1, None)
conns = [connect() for _ in range(cfg["connections"])]
outcomes, messages = {}, {}
pings = [len(conns)]
def done(conn, res, data):
    try:
        conn.call_finish(res)
        o = "ok"
    except GLib.Error as e:
        o = Gio.DBusError.get_remote_error(e) or "local"
        Gio.DBusError.strip_remote_error(e)
        messages.setdefault(o, e.message)
    outcomes[o] = outcomes.get(o, 0) + 1
def pinged(conn, res, data):
    conn.call_finish(res)
    pings[0] -= 1
    if pings[0] == 0:
        # Let the agent's connection take in what polkitd sent it so far.
        ctx = GLib.MainContext.default()
        while ctx.pending():
            ctx.iteration(False)
        print(json.dumps({"outcomes": outcomes, "messages": messages, "asked": asked[0],
                          "unique_names": [c.get_unique_name() for c in conns]}), flush=True)
call_flags = Gio.DBusCallFlags.NO_AUTO_START | Gio.DBusCallFlags.ALLOW_INTERACTIVE_AUTHORIZATION
for c in conns:
    for i in range(cfg["per_connection"]):
        c.call("org.blockstream1", cfg["path"], "org.blockstream1.BlockStream", "SetBandwidth",
               GLib.Variant("(t)", (cfg["bandwidth"] + i,)), None, call_flags, 120000, None, done, None)
for c in conns:
    c.call("org.blockstream1", "/org/blockstream1", "org.freedesktop.DBus.Peer", "Ping", None, None,
           Gio.DBusCallFlags.NO_AUTO_START, 120000, None, pinged, None)
GLib.MainLoop().run()
"""


class FloodTest(PolkitTestCase):
    """The authorization registry is shared out per caller: one user whose calls polkit keeps
    pending (an authentication agent of its own that never answers) cannot take the places of
    the others, and gets LimitsExceeded beyond its share; arguments are bounded before a call
    may wait for polkit at all."""

    PER_CONNECTION = 64     # polkit.c: POLKIT_QUERIES_PER_CONNECTION_MAX
    PER_USER = 256          # polkit.c: POLKIT_QUERIES_PER_USER_MAX
    REGISTRY = 4096         # polkit.c: POLKIT_QUERIES_MAX

    def flood(self, d, connections, per_connection, user=STRANGER):
        req = json.dumps({'address': self.env.bus.address, 'path': d.path, 'connections': connections,
                          'per_connection': per_connection, 'bandwidth': 7 * h.MiB})
        p = h.spawn(h.setpriv_argv(user) + ['/usr/bin/python3', '-c', _FLOODER, req], stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, env={'PATH': '/usr/bin:/bin', 'HOME': '/', 'LANG': 'C.UTF-8'})
        self.addCleanup(lambda: (p.kill(), p.wait(10)))
        line = p.stdout.readline()      # bounded: every call and Ping has a 120 s timeout
        if not line:
            p.kill()
            self.fail('the flooder did not report: %s' % p.stderr.read().decode(errors='replace'))
        res = json.loads(line)
        h.log('flood of %d x %d calls as %s: outcomes %r, agent asked %d times'
              % (connections, per_connection, user, res['outcomes'], res['asked']))
        return p, res

    def assertFloodRefused(self, res, refused):
        self.assertEqual(res['outcomes'], {'org.freedesktop.DBus.Error.LimitsExceeded': refused},
                         "the calls beyond the caller's share must be refused at once, the others wait: %r"
                         % res['outcomes'])
        self.assertIn('waiting for authorization', res['messages']['org.freedesktop.DBus.Error.LimitsExceeded'])

    def test_one_connection_over_its_share(self):
        g = self.owned_guest(None)
        d = g.disk()
        p, res = self.flood(d, 1, self.PER_CONNECTION + 36)
        # Its calls really wait: polkit challenged them and asked the flooder's agent.
        self.client.wait_for(lambda: os.path.exists('/proc/%d' % p.pid), 1, 'the flooder')
        self.assertFloodRefused(res, 36)
        # Other users are served meanwhile.
        self.assertOk(self.session(MEMBER).call(d.path, h.IFACE_STREAM, 'SetBandwidth', 't', '(%d,)' % h.MiB),
                      'SetBandwidth as member during the flood')
        self.assertEqual(d.prop('Bandwidth'), h.MiB)
        self.assertDenied(self.session(OWNER).call(d.path, h.IFACE_STREAM, 'SetBandwidth', 't', '(1,)'), STREAM,
                          'SetBandwidth as a user without the right during the flood')

    def test_flood_leaves_room_for_others(self):
        """Two users, more pending calls than the whole registry holds, over as many connections
        as it takes (dbus-daemon lets a connection wait for 128 replies): a third user is
        served, each flooder gets its share and LimitsExceeded for the rest, and the daemon
        stays on the bus (dbus-daemon allows a connection 512 match rules: watching each
        waiting caller with a match rule of its own would get the daemon disconnected); once
        the flooders leave, their places are free again."""
        g = self.owned_guest(None)
        d = g.disk()
        conns, per_conn = 24, 96
        flooders = (STRANGER, OWNER)
        self.assertGreater(len(flooders) * conns * per_conn, self.REGISTRY)
        procs = []
        for user in flooders:
            p, res = self.flood(d, conns, per_conn, user)
            procs.append(p)
            self.assertFloodRefused(res, conns * per_conn - self.PER_USER)
        # Another user is served at once, by polkit's answer.
        r = self.session(MEMBER).call(d.path, h.IFACE_STREAM, 'SetBandwidth', 't', '(%d,)' % (2 * h.MiB))
        self.assertOk(r, 'SetBandwidth as member while %d calls of others are waiting'
                      % (len(flooders) * conns * per_conn))
        self.assertEqual(d.prop('Bandwidth'), 2 * h.MiB)
        self.assertDaemonAlive('the flood')
        # The flooders leave: their calls go, and the same users are asked again.
        for p in procs:
            p.kill()
            p.wait(10)
        for user in flooders:
            s = self.session(user)
            self.client.wait_for(lambda: s.call(d.path, h.IFACE_STREAM, 'SetBandwidth', 't', '(1,)')['error'] !=
                                 'org.freedesktop.DBus.Error.LimitsExceeded', 30, "the flooder's places to be freed")
            self.assertDenied(s.call(d.path, h.IFACE_STREAM, 'SetBandwidth', 't', '(1,)'), STREAM,
                              'SetBandwidth as %s after the flood' % user)
        self.assertEqual(d.prop('Bandwidth'), 2 * h.MiB)

    def test_arguments_bounded_before_polkit(self):
        """An unauthorized caller's oversized arguments are refused before polkit is asked (and
        before the call could wait, pinning them): strings of PATH_MAX bytes or more, an option
        given over and over."""
        g = self.owned_guest(None)
        d = g.disk()
        mon = PolkitMonitor(self.client)
        self.addCleanup(mon.close)
        self.client.pump(0.1)
        s = self.session(STRANGER)
        big = '/' + 'x' * 70000
        repeated = '{%s}' % ', '.join(["'bandwidth': <uint64 1>"] * 20000)
        cases = [
            ('Start base', d.path, h.IFACE_STREAM, 'Start', 'tta{sv}', "(0, 0, {'base': <%s>})" % gv(big)),
            ('Start repeated option', d.path, h.IFACE_STREAM, 'Start', 'tta{sv}', '(0, 0, %s)' % repeated),
            ('RegisterGuest socket', h.MANAGER_PATH, h.IFACE_MANAGER, 'RegisterGuest', 'ssa{sv}',
             '(%s, %s, {})' % (gv(self.unique_name()), gv(big))),
            ('RegisterGuest disks', h.MANAGER_PATH, h.IFACE_MANAGER, 'RegisterGuest', 'ssa{sv}',
             "(%s, '', {'disks': <{'vda': %s}>})" % (gv(self.unique_name()), gv(big))),
            ('ProvisionDisk template', h.MANAGER_PATH, h.IFACE_MANAGER, 'ProvisionDisk', 'ssa{sv}',
             '(%s, %s, {})' % (gv('http://example.invalid/' + 'x' * 70000),
                               gv(os.path.join(self.env.images, 'p.qcow2')))),
            ('ProvisionDisk target', h.MANAGER_PATH, h.IFACE_MANAGER, 'ProvisionDisk', 'ssa{sv}',
             '(%s, %s, {})' % (gv(g.chains['vda'].base), gv(self.env.images + big))),
        ]
        for label, path, iface, member, sig, args in cases:
            with self.subTest(label):
                n = len(mon.calls)
                r = self.denied_changes_nothing(lambda: s.call(path, iface, member, sig, args), None,
                                                '%s as stranger' % label, errors=(h.ERR_INVALID_ARGS,))
                self.assertTrue(r['message'])
                # A call that is checked is seen by the monitor by the time it is answered: this
                # one is, so the oversized one before it would have been seen too.
                s.call(d.path, h.IFACE_STREAM, 'SetBandwidth', 't', '(1,)')
                calls = mon.wait(n + 1)
                self.assertEqual([c['args'][1] for c in calls[n:]], [STREAM],
                                 '%s: polkit was asked about an oversized call' % label)


# ---------------------------------------------------------------------------------------------

_LEAVER = r'''
import json, os, sys, time, dbus, dbus.bus, dbus.lowlevel
req = json.loads(sys.argv[1])
conn = dbus.bus.BusConnection(req["address"])
msg = dbus.lowlevel.MethodCallMessage("org.blockstream1", "/org/blockstream1", "org.blockstream1.Manager",
                                      "RegisterGuest")
msg.append(req["name"], req["socket"], dbus.Dictionary({}, signature="sv"), signature="ssa{sv}")
if req["no_reply"]:
    msg.set_no_reply(True)
conn.send_message(msg)
conn.flush()
print(json.dumps({"unique_name": conn.get_unique_name(), "uid": os.getuid()}), flush=True)
time.sleep(req["linger"])
os._exit(0)
'''


class MapShareTest(PolkitTestCase):
    """Allocation maps are shared out per user as polkit's queries are: a guest's owner may read
    the maps of their own guest, and maps of a guest whose QEMU serves them slowly, or not at all,
    wait (each holds a helper and an export until MapTimeoutSec=). One user holds at most
    MAPS_PER_CALLER of the daemon's MAPS_MAX places; beyond that their maps are refused at once,
    and the places stay for the others."""

    MAPS_PER_CALLER = 4     # map.c: MAPS_PER_CALLER_MAX

    def answers(self, sessions, n, timeout):
        """The first n answers among the sessions' calls (one call each), as (session, answer)."""
        got, deadline = [], time.monotonic() + timeout
        waiting = {s.proc.stdout: s for s in sessions}
        while len(got) < n:
            left = deadline - time.monotonic()
            ready = select.select(list(waiting), [], [], max(left, 0))[0] if left > 0 else []
            if not ready:
                break
            for f in ready:
                s = waiting.pop(f)
                got.append((s, s.receive(1)))
        return got

    def test_one_user_holds_a_share_of_the_maps(self):
        g = self.owned_guest(OWNER)
        other = self.owned_guest(None)
        # The owner's QEMU answers nothing: the owner's maps wait in their setup.
        os.kill(g.qemu.proc.pid, signal.SIGSTOP)
        self.addCleanup(lambda: g.qemu.running() and os.kill(g.qemu.proc.pid, signal.SIGCONT))
        sessions = []
        for _ in range(self.MAPS_PER_CALLER + 2):
            s = h.UserSession(OWNER, self.env.bus.address)
            self.addCleanup(s.close)
            sessions.append(s)
        for s in sessions:
            s.send(g.disk().path, h.IFACE_STREAM, 'GetAllocationMap', 'tt', '(0, 0)', timeout=120)
        # While QEMU is stopped, an answer can only be a refusal.
        refused = self.answers(sessions, 2, 30)
        self.assertEqual([a['error'] for _, a in refused], [h.ERR_BUSY] * 2,
                         "the owner's maps beyond their share: %r" % refused)
        self.assertIn('at most %d at once per user' % self.MAPS_PER_CALLER, refused[0][1]['message'])
        waiting = [s for s in sessions if s not in [x for x, _ in refused]]
        self.assertEqual(self.answers(waiting, 1, 1), [], 'a map answered while its QEMU is stopped')
        # Another user is served meanwhile.
        self.assertOk(self.session(MEMBER).call(other.disk().path, h.IFACE_STREAM, 'GetAllocationMap', 'tt',
                                                '(0, 0)'), 'a map as member while the owner holds their share')
        # QEMU goes on: the owner's maps that were taken complete, and their places are free again.
        os.kill(g.qemu.proc.pid, signal.SIGCONT)
        done = self.answers(waiting, len(waiting), 60)
        self.assertEqual([a['ok'] for _, a in done], [True] * self.MAPS_PER_CALLER, done)
        self.assertOk(sessions[0].call(g.disk().path, h.IFACE_STREAM, 'GetAllocationMap', 'tt', '(0, 0)'),
                      "the owner's map after the others ended")


class RangeShareTest(PolkitTestCase):
    """Range jobs (ranges, prefetches) are shared out per user too: each runs a pull helper, an
    export and a filter node (and a storage helper for a guest that is not running), and one
    user's guests, or anyone polkit lets stream every guest, could run them on every disk at once.
    One user runs at most RANGES_PER_CALLER; root is not held to it."""

    RANGES_PER_CALLER = 16  # rangeop.h: RANGE_JOBS_PER_CALLER_MAX

    SLOW = "(0, 4194304, {'bandwidth': <uint64 4096>})"

    def share_taken(self, user):
        """A guest of the owner's with one disk more than the share, and user's session that has
        started a slow range on every disk but the last."""
        aliases = tuple('vd%s' % chr(ord('a') + i) for i in range(self.RANGES_PER_CALLER + 1))
        g = self.new_guest(aliases=aliases, size=16 * h.MiB, options=h.opts(owner=h.U(self.uid(OWNER))))
        s = self.session(user)
        for a in aliases[:-1]:
            self.assertOk(s.call(h.disk_path(g.name, a), h.IFACE_STREAM, 'Start', 'tta{sv}', self.SLOW),
                          'Start %s' % a)
        return g, aliases, s

    def test_one_user_runs_a_share_of_the_range_jobs(self):
        g, aliases, s = self.share_taken(OWNER)
        slow = self.SLOW
        last = h.disk_path(g.name, aliases[-1])
        r = s.call(last, h.IFACE_STREAM, 'Start', 'tta{sv}', slow)
        self.assertFalse(r['ok'], 'a range beyond the share of one user: %r' % r)
        self.assertEqual(r['error'], h.ERR_LIMITS_EXCEEDED, r)
        self.assertIn('at most %d at once per user' % self.RANGES_PER_CALLER, r['message'])
        self.assertEqual(self.client.get(last, h.IFACE_STREAM, 'State'), 'idle')
        # Root is not held to it; and one of the owner's ended frees a place.
        self.client.call(last, h.IFACE_STREAM, 'Start', 'tta{sv}', h.T(0), h.T(4 * h.MiB),
                         h.opts(bandwidth=h.T(4096)))
        self.client.call(last, h.IFACE_STREAM, 'Cancel')
        first = h.disk_path(g.name, aliases[0])
        self.assertOk(s.call(first, h.IFACE_STREAM, 'Cancel'), 'Cancel')
        self.client.wait_prop(first, h.IFACE_STREAM, 'State', 'cancelled')
        self.assertOk(s.call(last, h.IFACE_STREAM, 'Start', 'tta{sv}', slow), 'Start after one ended')
        for a in aliases[1:]:
            self.client.call(h.disk_path(g.name, a), h.IFACE_STREAM, 'Cancel')

    def test_a_restart_keeps_the_share(self):
        """A job carried on after a restart counts in the share of who started it: the resumed ones
        were no one's, and each restart let a user start RANGES_PER_CALLER more (review 30d). Who
        started them is kept, not guessed: here a member of the blockstream group, on a guest of
        another user (review 30e)."""
        g, aliases, s = self.share_taken(MEMBER)
        self.env.kill_daemon()
        self.env.start_daemon()
        for a in aliases[:-1]:
            self.client.wait_prop(h.disk_path(g.name, a), h.IFACE_STREAM, 'State', 'running', 60)
        last = h.disk_path(g.name, aliases[-1])
        r = s.call(last, h.IFACE_STREAM, 'Start', 'tta{sv}', self.SLOW)
        self.assertFalse(r['ok'], 'a range beyond the share of one user after a restart: %r' % r)
        self.assertEqual(r['error'], h.ERR_LIMITS_EXCEEDED, r)
        for a in aliases[:-1]:
            self.client.call(h.disk_path(g.name, a), h.IFACE_STREAM, 'Cancel')


class VanishingCallerTest(PolkitTestCase):

    def measure_reads(self, g, seconds):
        """Root's GetGuest and a property Get, and a stranger's Get, in a loop for `seconds`:
        their latencies."""
        lat = []
        stranger = self.session(STRANGER)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            self.client.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'GetGuest', 's', g.name)
            self.client.get(g.disk().path, h.IFACE_STREAM, 'State')
            lat.append(time.monotonic() - t0)
            r = stranger.call(g.disk().path, h.IFACE_PROPS, 'Get', 'ss',
                              '(%s, %s)' % (gv(h.IFACE_STREAM), gv('Bandwidth')))
            self.assertOk(r, "a stranger's Get")
            lat.append(r['elapsed'])
            time.sleep(0.05)
        return lat

    def test_caller_exits_before_polkit_answers(self):
        g = self.owned_guest(None)
        q = self.spare_qemu(user=MEMBER)    # the member's own QEMU, which it may register
        mon = PolkitMonitor(self.client)
        self.addCleanup(mon.close)
        self.client.pump(0.1)
        for label, linger, no_reply in (('leaves while polkit thinks', 0.5, False),
                                        ('leaves at once', 0.0, False),
                                        ('NO_REPLY_EXPECTED, leaves while polkit thinks', 0.5, True)):
            with self.subTest(label):
                name = SLOW_PREFIX + self.unique_name()
                before = self.snapshot(block_graph=True)
                log_start = os.path.getsize(self.env.daemon.log)
                n = len(mon.calls)
                req = json.dumps({'address': self.env.bus.address, 'name': name, 'socket': q.daemon_socket,
                                  'linger': linger, 'no_reply': no_reply})
                r = h.run_as(MEMBER, ['/usr/bin/python3', '-c', _LEAVER, req])
                self.assertEqual(r.returncode, 0, r.stderr)
                sent = json.loads(r.stdout.strip().splitlines()[-1])
                self.assertEqual(sent['uid'], self.uid(MEMBER))
                t_exit = time.monotonic()
                # While polkitd thinks (and after), everyone else is served at once.
                lat = self.measure_reads(g, 4.0 - (time.monotonic() - t_exit))
                self.assertLess(max(lat), 0.5, 'a read waited on a polkit check: %s' % lat)
                self.assertTrue(self.env.daemon.running(), 'blockstreamd died')
                self.assertDBusError(h.ERR_NO_SUCH_GUEST, self.client.call, h.MANAGER_PATH, h.IFACE_MANAGER,
                                     'GetGuest', 's', name)
                self.assertSnapshotEqual(before, self.snapshot(block_graph=True),
                                         'a RegisterGuest whose caller left (%s)' % label)
                with open(self.env.daemon.log, 'rb') as f:
                    f.seek(log_start)
                    text = f.read().decode(errors='replace')
                self.assertNotIn('Guest %s registered' % name, text)
                if linger > 0:
                    # The check was really under way when the caller left.
                    asked = [c for c in mon.calls[n:] if c['args'][0][1].get('name') == sent['unique_name']]
                    self.assertEqual(len(asked), 1, 'polkit was not asked about the vanishing caller: %r'
                                     % mon.calls[n:])
                    self.assertIn('left the bus; dropping its call', text)
        # A legitimate caller: the same slow check, answered; meanwhile others are served.
        name = SLOW_PREFIX + self.unique_name()
        s = self.session(MEMBER)
        t0 = time.monotonic()
        s.send(h.MANAGER_PATH, h.IFACE_MANAGER, 'RegisterGuest', 'ssa{sv}',
               '(%s, %s, {})' % (gv(name), gv(q.daemon_socket)))
        lat = self.measure_reads(g, SLOW_SECONDS - 0.5)
        r = s.receive(30)
        self.assertOk(r, 'RegisterGuest of %s as member' % name)
        self.addCleanup(self.unregister_quietly, name)
        self.assertGreaterEqual(time.monotonic() - t0, SLOW_SECONDS - 0.1, 'the slow rule did not run')
        self.assertLess(max(lat), 0.5, 'a read waited on a polkit check: %s' % lat)
        self.assertEqual(r['result'], [h.guest_path(name)])
        self.assertEqual(self.client.get(h.guest_path(name), h.IFACE_GUEST, 'Owner'), self.uid(MEMBER))
        self.assertIn(name + '.json', ' '.join(h.tree_snapshot(self.env.daemon.state_dir)))


# ---------------------------------------------------------------------------------------------

class BusPolicyTest(PolkitTestCase):

    def test_bus_policy(self):
        g = self.owned_guest(OWNER)
        d = g.disk()
        for caller in (STRANGER, MEMBER, OWNER):
            s = self.session(caller)
            with self.subTest(caller=caller, what='RequestName'):
                r = s.call('/org/freedesktop/DBus', 'org.freedesktop.DBus', 'RequestName', 'su',
                           "('org.blockstream1', 0)", dest='org.freedesktop.DBus')
                self.assertDenied(r, None, 'RequestName org.blockstream1 as %s' % caller, (h.ERR_ACCESS_DENIED,))
                self.assertIn('org.blockstream1', r['message'])
                self.assertTrue(self.client.name_has_owner())
            for path, iface, prop, value in ((h.MANAGER_PATH, h.IFACE_MANAGER, 'Version', "<'0'>"),
                                             (g.path, h.IFACE_GUEST, 'Owner', '<uint32 %d>' % self.uid(caller)),
                                             (d.path, h.IFACE_STREAM, 'Bandwidth', '<uint64 1>')):
                with self.subTest(caller=caller, what='Set ' + prop):
                    r = self.denied_changes_nothing(
                        lambda: s.call(path, h.IFACE_PROPS, 'Set', 'ssv', '(%s, %s, %s)' % (gv(iface), gv(prop), value)),
                        None, 'Properties.Set %s as %s' % (prop, caller), errors=(h.ERR_ACCESS_DENIED,))
                    # Refused by the bus, not by the daemon.
                    self.assertIn('Rejected send message', r['message'])
            for path, iface, member, sig, args, want in (
                    (g.path, h.IFACE_PROPS, 'Get', 'ss', '(%s, %s)' % (gv(h.IFACE_GUEST), gv('Name')), g.name),
                    (d.path, h.IFACE_PROPS, 'GetAll', 's', '(%s,)' % gv(h.IFACE_STREAM), 'BackingChain'),
                    (h.MANAGER_PATH, h.IFACE_PROPS, 'Get', 'ss', '(%s, %s)' % (gv(h.IFACE_MANAGER), gv('Version')), ''),
                    (h.MANAGER_PATH, 'org.freedesktop.DBus.Introspectable', 'Introspect', '', '()',
                     'org.blockstream1.Manager'),
                    (d.path, 'org.freedesktop.DBus.Introspectable', 'Introspect', '', '()', 'GetAllocationMap'),
                    (h.MANAGER_PATH, h.IFACE_OM, 'GetManagedObjects', '', '()', g.name),
                    (h.MANAGER_PATH, 'org.freedesktop.DBus.Peer', 'Ping', '', '()', '')):
                with self.subTest(caller=caller, what=member):
                    r = s.call(path, iface, member, sig, args)
                    self.assertOk(r, '%s.%s as %s' % (iface, member, caller))
                    self.assertIn(want, r['text'])
        # Root's Set reaches the daemon, which has no writable property.
        e = self.assertDBusError(ERR_PROPERTY_READ_ONLY, self.client.call, d.path, h.IFACE_PROPS, 'Set', 'ssv',
                                 h.IFACE_STREAM, 'Bandwidth', dbus.UInt64(1, variant_level=1))
        self.assertIn('Bandwidth', e.message)

    def test_dbus_daemon_loads_the_policy(self):
        """The private bus of every test runs with our bus policy; dbus-daemon refuses broken
        copies of it (so this check can fail)."""
        with open(self.env.bus.conf) as f:
            conf = f.read()
        self.assertIn('<include>%s</include>' % h.BUS_POLICY, conf)
        self.assertTrue(os.path.samefile(h.BUS_POLICY, os.path.join(h.SOURCE_ROOT, 'dbus', 'org.blockstream1.conf')))
        self.assertTrue(self.client.name_has_owner('org.freedesktop.DBus'))
        with open(h.BUS_POLICY) as f:
            good = f.read()
        tmp = tempfile.mkdtemp(prefix='bst-busconf-', dir=self.env.dir)
        broken = {
            'truncated': good.rsplit('</busconfig>', 1)[0],
            'unknown attribute': good.replace('<allow own="org.blockstream1"/>', '<allow owns="org.blockstream1"/>'),
            'unknown element': good.replace('<policy context="default">', '<policy context="default"><permit/>'),
        }
        for label, text in [('good copy', good)] + sorted(broken.items()):
            with self.subTest(label):
                self.assertNotEqual(text, good if label != 'good copy' else None)
                pol = os.path.join(tmp, re.sub(r'\W', '-', label) + '.conf')
                with open(pol, 'w') as f:
                    f.write(text)
                sock = os.path.join(tmp, re.sub(r'\W', '-', label) + '.sock')
                conf = os.path.join(tmp, re.sub(r'\W', '-', label) + '.bus.conf')
                with open(conf, 'w') as f:
                    f.write(h.BUS_CONF.format(socket=sock, policy=pol))
                p = h.spawn(['dbus-daemon', '--config-file=' + conf, '--nofork', '--print-address'],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                try:
                    out, err = p.communicate(timeout=3)
                    rc = p.returncode
                except subprocess.TimeoutExpired:
                    rc = None      # still running: it accepted the configuration
                    p.terminate()
                    out, err = p.communicate(timeout=5)
                if label == 'good copy':
                    self.assertIsNone(rc, 'dbus-daemon refused our bus policy: %s' % err.decode(errors='replace'))
                    self.assertTrue(out.decode().startswith('unix:'), out)
                else:
                    self.assertIsNotNone(rc, 'dbus-daemon accepted a %s bus policy' % label)
                    self.assertNotEqual(rc, 0)
                    self.assertIn('Failed to start message bus', err.decode(errors='replace'))


# ---------------------------------------------------------------------------------------------

class ShippedFilesTest(PolkitTestCase):
    needs_daemon = False

    def test_pkaction_shows_each_action(self):
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=self.env.bus.address)
        listing = h.run(['pkaction'], env=env).stdout.split()
        for action, (any_, inactive, active) in sorted(ACTION_DEFAULTS.items()):
            with self.subTest(action):
                self.assertIn(action, listing)
                out = h.run(['pkaction', '--verbose', '--action-id', action], env=env).stdout
                fields = dict((k.strip(), v.strip()) for k, v in
                              (line.split(':', 1) for line in out.splitlines()[1:] if ':' in line))
                self.assertEqual(out.splitlines()[0], action + ':')
                self.assertEqual((fields['implicit any'], fields['implicit inactive'], fields['implicit active']),
                                 (any_, inactive, active), out)
                self.assertTrue(fields['description'], out)
                self.assertTrue(fields['message'], out)
        # pkaction shows what it was given: an unknown action is refused.
        r = h.run(['pkaction', '--verbose', '--action-id', 'org.blockstream1.nosuchaction'], env=env, check=False)
        self.assertNotEqual(r.returncode, 0)

    def test_machine_polkit_config_untouched(self):
        """Our files are visible to our polkitd only (its own mount namespace)."""
        pid = self.env.polkit.proc.pid
        self.assertTrue(os.path.exists('/proc/%d/root%s' % (pid, HOST_POLICY)), 'polkitd does not see our policy')
        self.assertTrue(os.path.exists('/proc/%d/root%s/50-blockstream.rules' % (pid, h.Polkit.ETC_RULES)))
        self.assertEqual(os.path.exists(HOST_POLICY), HOST_CONFIG_BEFORE[h.Polkit.ACTIONS].get(
            os.path.basename(HOST_POLICY)) is not None)
        self.assertEqual(host_polkit_config(), HOST_CONFIG_BEFORE)
        # After a polkitd of ours stopped too.
        pk = self.env.polkit
        pk.stop()
        try:
            self.assertEqual(host_polkit_config(), HOST_CONFIG_BEFORE)
            if os.path.basename(HOST_POLICY) not in HOST_CONFIG_BEFORE[h.Polkit.ACTIONS]:
                self.assertFalse(os.path.exists(HOST_POLICY))
        finally:
            pk.start()

    def test_systemd_unit_verifies(self):
        unit = os.path.join(os.path.dirname(os.path.dirname(h.BLOCKSTREAMD)), 'systemd', 'blockstreamd.service')
        self.assertTrue(os.path.exists(unit), 'no generated unit next to the daemon binary: %s' % unit)
        with open(unit) as f:
            text = f.read()
        # ProtectHome=read-only, not yes: users' QEMUs keep their QMP sockets in /run/user/UID.
        for line in ('Type=dbus', 'BusName=org.blockstream1', 'ProtectSystem=strict', 'ProtectHome=read-only',
                     'PrivateTmp=yes', 'SystemCallArchitectures=native', 'LockPersonality=yes',
                     'RestrictRealtime=yes', 'OOMPolicy=continue'):
            self.assertIn('\n' + line + '\n', text)
        self.assertRegex(text, r'\nSystemCallFilter=\S')
        self.assertRegex(text, r'\nRestrictAddressFamilies=AF_UNIX\b')
        tmp = tempfile.mkdtemp(prefix='bst-unit-', dir=self.env.dir)
        for label, execstart, ok in (('as built', h.BLOCKSTREAMD, True),
                                     ('a missing binary (the check can fail)', '/nonexistent/blockstreamd', False)):
            with self.subTest(label):
                d = os.path.join(tmp, 'ok' if ok else 'broken')
                os.makedirs(d)
                copy = os.path.join(d, 'blockstreamd.service')
                with open(copy, 'w') as f:
                    f.write(re.sub(r'(?m)^ExecStart=\S+', 'ExecStart=' + execstart, text))
                r = h.run(['systemd-analyze', 'verify', copy], check=False, cwd=d)
                if ok:
                    self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
                    self.assertNotIn('blockstreamd.service:', r.stdout + r.stderr)
                else:
                    self.assertNotEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_activation_file(self):
        with open(os.path.join(h.SOURCE_ROOT, 'dbus', 'org.blockstream1.service')) as f:
            lines = [l.strip() for l in f if l.strip() and not l.startswith('#')]
        self.assertEqual(lines[0], '[D-BUS Service]')
        kv = dict(l.split('=', 1) for l in lines[1:])
        self.assertEqual(kv.get('Name'), 'org.blockstream1')
        self.assertEqual(kv.get('User'), 'root')
        self.assertEqual(kv.get('SystemdService'), 'blockstreamd.service')


def _has_account(uid):
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


if __name__ == '__main__':
    h.main()
