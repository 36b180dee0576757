#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Bad input on the BlockStream and Manager interfaces: every call gets a clear error and
changes nothing (no property, no state file, no job in QEMU)."""

import json
import os
import socket
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
from harness import T, U, S, opts, MiB, U64_MAX  # noqa: E402

SIZE = 64 * MiB


class BadInputTest(h.TestCase):

    def setUp(self):
        super().setUp()
        self.g = self.new_guest(size=SIZE)
        self.d = self.g.disk()
        self.before = self.snapshot()

    def assertUnchanged(self, what):
        self.assertSnapshotEqual(self.before, self.snapshot(), what)
        self.assertEqual(self.d.prop('State'), 'idle')
        self.assertEqual(self.g.qemu.qmp.jobs(), [], '%s left a job in QEMU' % what)
        self.assertEqual(self.d.finished(), [], '%s emitted Finished' % what)

    def call_raw(self, path, iface, member, sig, *args):
        return self.client.call(path, iface, member, sig, *args)

    # -- unknown objects

    def test_unknown_guest(self):
        c = self.client
        for member in ('GetGuest', 'UnregisterGuest'):
            e = self.assertDBusError(h.ERR_NO_SUCH_GUEST, c.call, h.MANAGER_PATH, h.IFACE_MANAGER, member, 's',
                                     'nobody')
            self.assertIn('nobody', e.message)
        # Names that cannot exist: refused as invalid or simply not found.
        for name in ('', 'a/b', 'x' * 65, '..'):
            self.assertDBusError({h.ERR_NO_SUCH_GUEST, h.ERR_INVALID_ARGS}, c.call, h.MANAGER_PATH,
                                 h.IFACE_MANAGER, 'GetGuest', 's', name)
        # Objects of an unknown guest. By object path the D-Bus convention is UnknownObject; the
        # project's own errors are as good.
        gone = h.guest_path('nobody')
        self.assertDBusError({h.ERR_NO_SUCH_GUEST, h.ERR_UNKNOWN_OBJECT}, c.call, gone, h.IFACE_GUEST, 'Unregister')
        self.assertDBusError({h.ERR_NO_SUCH_GUEST, h.ERR_NO_SUCH_DISK, h.ERR_UNKNOWN_OBJECT}, c.call,
                             gone + '/vda', h.IFACE_STREAM, 'Start', 'tta{sv}', T(0), T(0), h.no_opts())
        self.assertUnchanged('calls on an unknown guest')

    def test_path_special_guest_names(self):
        """'.' and '..' would be path components of the state file and of the runtime directory
        that is bind-mounted into the guest's sandboxes: refused like any invalid name, by
        RegisterGuest (running and not running) and by every other method that takes a name."""
        c = self.client
        top = self.g.chains['vda'].top
        for name in ('.', '..'):
            for label, sock, options in (('running', self.g.qemu.daemon_socket, h.no_opts()),
                                         ('not running', '', opts(disks=h.dbus.Dictionary(
                                             {'vda': top}, signature='ss', variant_level=1)))):
                with self.subTest(name=name, guest=label):
                    e = self.assertDBusError(h.ERR_INVALID_ARGS, c.call, h.MANAGER_PATH, h.IFACE_MANAGER,
                                             'RegisterGuest', 'ssa{sv}', name, sock, options)
                    self.assertIn('Invalid guest name', e.message)
                    self.assertUnchanged('RegisterGuest(%r, %s)' % (name, label))
                    self.assertNotIn(h.guest_path(name), c.managed_objects())
            for member in ('GetGuest', 'UnregisterGuest'):
                with self.subTest(name=name, member=member):
                    self.assertDBusError(h.ERR_INVALID_ARGS, c.call, h.MANAGER_PATH, h.IFACE_MANAGER, member, 's',
                                         name)
        # Names of dots that are no path component of their own stay valid.
        name = '...'
        other = self.make_chains(('vda',), SIZE)['vda'].top
        self.assertEqual(c.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'RegisterGuest', 'ssa{sv}', name, '',
                                opts(disks=h.dbus.Dictionary({'vda': other}, signature='ss', variant_level=1))),
                         h.guest_path(name))
        c.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'UnregisterGuest', 's', name)

    def test_unknown_disk(self):
        c = self.client
        p = self.g.path + '/vdz'
        self.assertDBusError({h.ERR_NO_SUCH_DISK, h.ERR_UNKNOWN_OBJECT}, c.call, p, h.IFACE_STREAM, 'Start',
                             'tta{sv}', T(0), T(0), h.no_opts())
        self.assertDBusError({h.ERR_NO_SUCH_DISK, h.ERR_UNKNOWN_OBJECT}, c.call, p, h.IFACE_STREAM, 'Cancel')
        self.assertDBusError({h.ERR_NO_SUCH_DISK, h.ERR_UNKNOWN_OBJECT}, c.call, p, h.IFACE_STREAM, 'SetBandwidth',
                             't', T(1))
        self.assertDBusError({h.ERR_NO_SUCH_DISK, h.ERR_UNKNOWN_OBJECT, h.ERR_INVALID_ARGS}, c.call, p,
                             h.IFACE_PROPS, 'Get', 'ss', h.IFACE_STREAM, 'State')
        self.assertUnchanged('calls on an unknown disk')

    # -- numbers

    def test_huge_bandwidth(self):
        d = self.d
        for bw in (U64_MAX, 1 << 63):
            with self.subTest(bandwidth=bw):
                e = self.assertDBusError(h.ERR_INVALID_ARGS, d.start, 0, 0, opts(bandwidth=T(bw)))
                self.assertUnchanged('Start with bandwidth %d' % bw)
                self.assertDBusError(h.ERR_INVALID_ARGS, d.set_bandwidth, bw)
                self.assertUnchanged('SetBandwidth(%d)' % bw)
                self.assertEqual(d.prop('Bandwidth'), 0)
                self.assertTrue(e.message)

    def test_bad_ranges(self):
        d = self.d
        # Past the end or overflowing: InvalidArgs (api.md) or InvalidRange (the XML's error list);
        # NotSupported while range streaming is not there yet.
        refused = {h.ERR_INVALID_ARGS, h.ERR_INVALID_RANGE, h.ERR_NOT_SUPPORTED}
        for off, ln in ((U64_MAX, 2), (U64_MAX, 0), (SIZE, 0), (SIZE, 1), (0, SIZE + 1), (SIZE - 4096, 8192),
                        (1 << 63, 1 << 63), (4096, U64_MAX)):
            with self.subTest(offset=off, length=ln):
                self.assertDBusError(refused, d.start, off, ln, h.no_opts())
                self.assertUnchanged('Start(%d, %d)' % (off, ln))

    # -- types and options

    def test_wrong_signatures(self):
        c = self.client
        d = self.d
        cases = [(d.path, h.IFACE_STREAM, 'Start', 'ss', ('0', '0')),
                 (d.path, h.IFACE_STREAM, 'Start', 'tt', (T(0), T(0))),
                 (d.path, h.IFACE_STREAM, 'Start', 'tta{ss}', (T(0), T(0), h.dbus.Dictionary({}, signature='ss'))),
                 (d.path, h.IFACE_STREAM, 'Start', 'uua{sv}', (U(0), U(0), h.no_opts())),
                 (d.path, h.IFACE_STREAM, 'SetBandwidth', 's', ('4M',)),
                 (d.path, h.IFACE_STREAM, 'SetBandwidth', 'i', (h.dbus.Int32(-1),)),
                 (d.path, h.IFACE_STREAM, 'SetBandwidth', '', ()),
                 (d.path, h.IFACE_STREAM, 'Cancel', 's', ('now',)),
                 (h.MANAGER_PATH, h.IFACE_MANAGER, 'RegisterGuest', 'ss', ('x', self.g.qemu.daemon_socket)),
                 (h.MANAGER_PATH, h.IFACE_MANAGER, 'RegisterGuest', 'sss', ('x', self.g.qemu.daemon_socket, '')),
                 (h.MANAGER_PATH, h.IFACE_MANAGER, 'GetGuest', 'u', (U(1),)),
                 (h.MANAGER_PATH, h.IFACE_MANAGER, 'UnregisterGuest', '', ())]
        for path, iface, member, sig, args in cases:
            with self.subTest(member=member, signature=sig):
                self.assertDBusError(h.ERR_INVALID_ARGS, c.call, path, iface, member, sig, *args)
                self.assertUnchanged('%s(%s)' % (member, sig))

    def test_bad_start_options(self):
        d = self.d
        ch = self.g.chains['vda']
        cases = {'unknown key': opts(frobnicate=T(1)),
                 'unknown key next to a good one': opts(bandwidth=T(MiB), speed=T(MiB)),
                 'bandwidth as a string': opts(bandwidth=S('4M')),
                 'bandwidth as int32': opts(bandwidth=h.dbus.Int32(4)),
                 'base as a number': opts(base=T(1)),
                 'base not in the chain': opts(base=S('/nonexistent/base.qcow2')),
                 'base is an unrelated image': opts(base=S(os.path.join(self.env.images, 'other.qcow2'))),
                 'base is the top image': opts(base=S(ch.top)),
                 'base is the top node': opts(base=S('disk0')),
                 'base is an unknown node': opts(base=S('no-such-node')),
                 'base is empty': opts(base=S(''))}
        h.qemu_img('create', '-q', '-f', 'qcow2', os.path.join(self.env.images, 'other.qcow2'), '64M')
        # A node name could be handed to QEMU as it is: then QEMU's refusal (QemuFailed) is fine too.
        node_cases = {'base is the top node', 'base is an unknown node'}
        for what, o in cases.items():
            with self.subTest(what):
                errs = {h.ERR_INVALID_ARGS} | ({h.ERR_QEMU_FAILED} if what in node_cases else set())
                self.assertDBusError(errs, d.start, 0, 0, o)
                self.assertUnchanged('Start with %s' % what)

    def test_job_control_without_a_job(self):
        d = self.d
        for member in ('Cancel', 'Pause', 'Resume'):
            with self.subTest(member):
                self.assertDBusError(h.ERR_NOT_RUNNING, d.call, member)
                self.assertUnchanged('%s without a job' % member)

    def test_start_when_qemu_is_gone(self):
        q = self.g.qemu
        q.kill()
        self.client.wait_prop(self.g.path, h.IFACE_GUEST, 'Running', False, timeout=10)
        before = self.snapshot()
        self.assertDBusError(h.ERR_NOT_RUNNING, self.d.start)
        self.assertSnapshotEqual(before, self.snapshot(), 'Start on a guest whose QEMU is gone')
        self.assertEqual(self.d.prop('State'), 'idle')
        self.assertEqual(self.d.finished(), [])


class HostileQMPTest(h.TestCase):
    """A QMP peer that is no honest QEMU (a compromised guest may own its QEMU): RegisterGuest
    fails with QemuFailed in reasonable time, the daemon survives, nothing is registered."""

    env_per_test = True     # one daemon per case: a crash in one must not hide the others

    GREETING = b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, ' \
               b'"capabilities": []}}\r\n'

    def serve(self, path, after_caps):
        """Accept connections on path; greet, accept qmp_capabilities, then hand the connection
        and the next command to after_caps(conn, cmd)."""
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        srv.listen(4)
        srv.settimeout(0.2)
        done = threading.Event()
        conns = []

        def handle(conn):
            f = conn.makefile('rb')
            try:
                if after_caps is None:
                    conn.sendall(self.GREETING[:20])
                    conn.close()
                    return
                conn.sendall(self.GREETING)
                first = json.loads(f.readline())
                conn.sendall(json.dumps({'return': {}, 'id': first.get('id')}).encode() + b'\r\n')
                while not done.is_set():
                    line = f.readline()
                    if not line:
                        return
                    after_caps(conn, json.loads(line))
            except (OSError, ValueError):
                pass

        def loop():
            while not done.is_set():
                try:
                    conn, _ = srv.accept()
                except socket.timeout:
                    continue
                except OSError:
                    return
                conns.append(conn)
                threading.Thread(target=handle, args=(conn,), daemon=True).start()
        t = threading.Thread(target=loop, daemon=True)
        t.start()

        def stop():
            done.set()
            t.join(2)
            srv.close()
            for c in conns:
                try:
                    c.close()
                except OSError:
                    pass
        self.addCleanup(stop)

    def check_refused(self, mode, after_caps):
        path = os.path.join(self.env.dir, 'hostile-%s.sock' % mode)
        self.serve(path, after_caps)
        before = self.snapshot()
        name = self.unique_name(mode)
        t = h.time.monotonic()
        self.assertDBusError(h.ERR_QEMU_FAILED, self.client.call, h.MANAGER_PATH, h.IFACE_MANAGER, 'RegisterGuest',
                             'ssa{sv}', name, path, h.no_opts())
        self.assertLess(h.time.monotonic() - t, 30)
        self.client.pump(0.5)
        self.assertTrue(self.env.daemon.running(), 'blockstreamd died on a hostile QMP peer (%s): exit status %s'
                        % (mode, self.env.daemon.proc.returncode))
        self.assertTrue(self.client.get(h.MANAGER_PATH, h.IFACE_MANAGER, 'Version'))
        self.assertSnapshotEqual(before, self.snapshot(), 'a refused hostile peer (%s)' % mode)
        self.assertDBusError(h.ERR_NO_SUCH_GUEST, self.client.call, h.MANAGER_PATH, h.IFACE_MANAGER, 'GetGuest', 's',
                             name)

    def test_greeting_cut_short(self):
        self.check_refused('cut', None)

    def test_wrong_types_in_replies(self):
        def reply(conn, cmd):
            conn.sendall(json.dumps({'return': 42, 'id': cmd.get('id')}).encode() + b'\r\n')
        self.check_refused('types', reply)

    def test_wrong_types_inside_query_block(self):
        def reply(conn, cmd):
            r = [{'device': 7, 'qdev': ['x'], 'inserted': 'yes', 'locked': 'no'}]
            if cmd.get('execute') not in ('query-block', 'query-named-block-nodes'):
                r = {}
            conn.sendall(json.dumps({'return': r, 'id': cmd.get('id')}).encode() + b'\r\n')
        self.check_refused('fields', reply)

    def test_oversized_message(self):
        def reply(conn, cmd):
            conn.sendall(b'{"return": "' + b'A' * (11 * MiB))
        self.check_refused('huge', reply)

    def test_deep_nesting(self):
        def reply(conn, cmd):
            conn.sendall(b'{"return": ' + b'[' * 200000)
        self.check_refused('deep', reply)

    def test_garbage_after_greeting(self):
        def reply(conn, cmd):
            conn.sendall(b'\x00\xff}{][ garbage \r\n{"return": [1, 2, \r\n')
            conn.close()
        self.check_refused('garbage', reply)


class StateReloadNameTest(h.TestCase):
    """A state file naming a guest '.' or '..' (hand-edited, or written by a daemon that accepted
    the name) is rejected on load like any other invalid file; the valid ones beside it load."""

    env_per_test = True

    def test_state_file_with_path_special_name(self):
        c = self.client
        chains = self.make_chains(('vda',), SIZE)
        good = self.unique_name('good')
        c.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'RegisterGuest', 'ssa{sv}', good, '',
               opts(disks=h.dbus.Dictionary({'vda': chains['vda'].top}, signature='ss', variant_level=1)))
        guests = os.path.join(self.env.daemon.state_dir, 'guests')
        with open(os.path.join(guests, good + '.json')) as f:
            record = json.load(f)
        self.assertEqual(self.env.stop_daemon(), 0)
        for name in ('.', '..'):
            bad = dict(record, name=name, uuid='00000000-0000-4000-8000-00000000000%d' % len(name),
                       disks=[], helper_uid=0)
            with open(os.path.join(guests, name + '.json'), 'w') as f:
                json.dump(bad, f)
        self.env.start_daemon()
        objects = c.managed_objects()
        self.assertIn(h.guest_path(good), objects)
        for name in ('.', '..'):
            self.assertNotIn(h.guest_path(name), objects, 'a state file naming the guest %r was loaded' % name)
        with open(self.env.daemon.log, errors='replace') as f:
            log = f.read()
        for name in ('.', '..'):
            self.assertIn('State file %s/%s.json is invalid' % (guests, name), log)
            self.assertNotIn('Guest %s restored' % name, log)


if __name__ == '__main__':
    h.main()
