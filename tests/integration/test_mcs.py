#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Sandbox identities at scale: 1000 offline guests registered through D-Bus each get their own
helper uid (from HelperUIDRange=) and their own MCS category pair (c1 < c2, never shared); a
daemon restart keeps every identity; unregistering frees them (state file gone, the uids can be
given out again) and leaves everybody else's alone. SELinux is off on the test machines: not a
single security.selinux xattr may appear (a root setfilecon would write one anyway)."""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import offline as o  # noqa: E402
from harness import MiB  # noqa: E402

N = 1000
DROP = 100
WINDOW = 64                        # calls in flight at a time
MCS_CATEGORIES = 1024


class McsTest(h.TestCase):

    needs_daemon = False           # started below, with HelperUIDRange= for exactly N guests

    @classmethod
    def setUpClass(cls):
        if h.shutil.which('getfattr') is None:
            raise AssertionError('getfattr not found (apt-get install attr)')
        super().setUpClass()
        env = cls.env
        with cls.class_setup():
            # Exactly N uids to give out: the top ones are the probes'.
            cls.uid_first = env.helper_uid_first(N + h.PROBE_UIDS)
            cls.uid_last = cls.uid_first + N      # the first probe uid: the guests' end
            env.daemon = h.Daemon(env, config_extra='HelperUIDRange=%d-%d\n' % (
                cls.uid_first, cls.uid_last + h.PROBE_UIDS - 1))
            env.daemon.start()

    # -- batched calls

    def batch(self, calls, timeout=120):
        """Run [(path, iface, member, sig, args)] with up to WINDOW in flight; return
        [(result, None) | (None, h.DBusError)] in order."""
        conn = self.client.conn
        results = [None] * len(calls)
        state = {'next': 0, 'pending': 0}

        def issue():
            while state['pending'] < WINDOW and state['next'] < len(calls):
                i = state['next']
                state['next'] += 1
                state['pending'] += 1
                path, iface, member, sig, args = calls[i]

                def ok(*r, i=i):
                    results[i] = (h.unwrap(r[0]) if r else None, None)
                    state['pending'] -= 1

                def err(e, i=i):
                    results[i] = (None, h.DBusError(e.get_dbus_name(), e.get_dbus_message()))
                    state['pending'] -= 1

                conn.call_async(h.BUS_NAME, path, iface, member, sig, args, ok, err, timeout=timeout)

        deadline = time.monotonic() + timeout
        issue()
        while state['pending'] > 0 or state['next'] < len(calls):
            self.client.ctx.iteration(True)
            issue()
            if time.monotonic() > deadline:
                raise AssertionError('%d of %d calls unanswered after %ds' % (state['pending'], len(calls), timeout))
        return results

    def register_many(self, names):
        paths = [os.path.join(self.env.images, 'mcs', n + '.raw') for n in names]
        os.makedirs(os.path.dirname(paths[0]), exist_ok=True)
        h.run(['truncate', '-s', str(1 * MiB)] + paths)
        calls = [(h.MANAGER_PATH, h.IFACE_MANAGER, 'RegisterGuest', 'ssa{sv}',
                  (n, '', o.offline_options({'vda': p}, {'vda': 'raw'}))) for n, p in zip(names, paths)]
        res = self.batch(calls)
        failed = [(n, e) for n, (r, e) in zip(names, res) if e is not None]
        self.assertEqual(failed, [], '%d registrations failed, the first: %r' % (len(failed), failed[:3]))
        for n, (r, e) in zip(names, res):
            self.assertEqual(r, h.guest_path(n))

    def unregister_many(self, names):
        res = self.batch([(h.MANAGER_PATH, h.IFACE_MANAGER, 'UnregisterGuest', 's', (n,)) for n in names])
        failed = [(n, e) for n, (r, e) in zip(names, res) if e is not None]
        self.assertEqual(failed, [], '%d unregistrations failed, the first: %r' % (len(failed), failed[:3]))

    def identities(self):
        """{guest name: (helper_uid, c1, c2)} from every state file."""
        d = os.path.join(self.env.daemon.state_dir, 'guests')
        out = {}
        for fn in os.listdir(d):
            if fn.endswith('.json'):
                s = o.read_state(self.env, fn[:-5])
                out[s['name']] = (s['helper_uid'], s['mcs_c1'], s['mcs_c2'])
        return out

    def assert_identities_valid(self, ids, what):
        uids = [u for u, _, _ in ids.values()]
        pairs = [(a, b) for _, a, b in ids.values()]
        self.assertEqual(len(set(uids)), len(uids), '%s: helper uids shared between guests' % what)
        self.assertEqual(len(set(pairs)), len(pairs), '%s: MCS pairs shared between guests' % what)
        for name, (uid, c1, c2) in ids.items():
            self.assertTrue(self.uid_first <= uid < self.uid_last, '%s: %s has helper uid %d outside %d-%d (the top '
                            'ones are the probes\')' % (what, name, uid, self.uid_first, self.uid_last))
            self.assertNotEqual(c1, c2, '%s: %s has c1 == c2 (%d)' % (what, name, c1))
            self.assertLess(c1, c2, '%s: %s has c1 > c2' % (what, name))
            self.assertLess(c2, MCS_CATEGORIES, '%s: %s has category %d' % (what, name, c2))

    def assert_no_selinux_xattrs(self):
        lines, text = o.getfattr_selinux(self.env.images, self.env.daemon.state_dir)
        self.assertEqual(lines, [], 'security.selinux written although SELinux is off:\n' + text[:4000])

    # -- the test

    def test_thousand_guests(self):
        t0 = time.monotonic()
        names = ['mcs-%04d' % i for i in range(N)]
        self.register_many(names)
        t_reg = time.monotonic() - t0
        ids = self.identities()
        self.assertEqual(sorted(ids), names, 'not one state file per guest')
        self.assert_identities_valid(ids, 'after registration')
        self.assertEqual(sorted(u for u, _, _ in ids.values()), list(range(self.uid_first, self.uid_last)),
                         'the %d guests do not use exactly the %d uids of the range' % (N, N))
        self.assertEqual(self.client.get(h.guest_path(names[0]), h.IFACE_GUEST, 'SandboxLabel'), '')
        self.assert_no_selinux_xattrs()

        # The range is full: the next guest is refused, and nothing of it is left.
        extra = os.path.join(self.env.images, 'mcs', 'extra.raw')
        o.raw_image(extra)
        before = h.tree_snapshot(self.env.daemon.state_dir)
        e = self.assertDBusError(o.ERR_LIMITS_EXCEEDED, self.client.call, h.MANAGER_PATH, h.IFACE_MANAGER,
                                 'RegisterGuest', 'ssa{sv}', 'mcs-extra', '',
                                 o.offline_options({'vda': extra}, {'vda': 'raw'}))
        self.assertIn('HelperUIDRange', e.message)
        self.assertEqual(h.tree_snapshot(self.env.daemon.state_dir), before)
        self.assertDBusError(h.ERR_NO_SUCH_GUEST, self.client.call, h.MANAGER_PATH, h.IFACE_MANAGER, 'GetGuest',
                             's', 'mcs-extra')

        # A restart keeps every identity.
        self.env.stop_daemon()
        t1 = time.monotonic()
        self.env.start_daemon()
        objs = self.client.managed_objects()
        t_restart = time.monotonic() - t1
        self.assertEqual(sum(1 for p in objs if p.count('/') == 4 and p.startswith(h.GUEST_PREFIX)), N,
                         'not every guest came back')
        self.assertEqual(self.identities(), ids, 'a restart changed sandbox identities')

        # Unregistering frees: state files gone, the others untouched.
        dropped = names[::N // DROP][:DROP]
        self.unregister_many(dropped)
        after = self.identities()
        for n in dropped:
            self.assertFalse(os.path.exists(o.state_file(self.env, n)), 'state file of unregistered %s left' % n)
        self.assertEqual(after, {n: v for n, v in ids.items() if n not in dropped},
                         'unregistering changed the identities of other guests')
        freed_uids = {ids[n][0] for n in dropped}

        # The freed uids can be given out again (the range has no other room), to new guests whose
        # pairs clash with nobody's.
        new = ['mcs-new-%03d' % i for i in range(DROP)]
        self.register_many(new)
        now = self.identities()
        self.assertEqual({n: now[n] for n in after}, after, 'new registrations changed old identities')
        self.assertEqual({now[n][0] for n in new}, freed_uids, 'the new guests did not get the freed uids')
        self.assert_identities_valid(now, 'after re-registration')

        # Once more across a restart, then no xattr anywhere.
        self.env.stop_daemon()
        self.env.start_daemon()
        self.assertEqual(self.identities(), now, 'the second restart changed identities')
        self.assert_no_selinux_xattrs()
        h.log('%d registrations in %.1fs, restart with %d guests in %.1fs, whole test %.1fs'
              % (N, t_reg, N, t_restart, time.monotonic() - t0))
        self.unregister_many(sorted(now))


if __name__ == '__main__':
    h.main()
