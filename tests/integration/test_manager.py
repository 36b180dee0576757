#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""org.blockstream1.Manager, the ObjectManager and org.blockstream1.Guest, through D-Bus
against the real daemon and real QEMU."""

import os
import re
import signal
import socket
import sys
import threading
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import offline as o  # noqa: E402
from harness import U, S, opts  # noqa: E402

UUID_RE = re.compile(r'^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32})$')

# Every interface with its introspection file: dbus/*.xml is the list of members (api.md is
# checked against the same files by tests/unit/test-api-doc.py).
INTERFACES = {
    h.IFACE_MANAGER: 'org.blockstream1.Manager.xml',
    h.IFACE_GUEST: 'org.blockstream1.Guest.xml',
    h.IFACE_STREAM: 'org.blockstream1.BlockStream.xml',
    o.IFACE_EXPORT: 'org.blockstream1.Export.xml',
}


def members(xml_text, iface):
    """{member name: description} of one interface in introspection XML."""
    root = ET.fromstring(xml_text)
    out = {}
    for i in root.findall('interface'):
        if i.get('name') != iface:
            continue
        for m in i.findall('method'):
            out[m.get('name')] = ('method', tuple((a.get('type'), a.get('direction', 'in'))
                                                  for a in m.findall('arg')))
        for s in i.findall('signal'):
            out[s.get('name')] = ('signal', tuple(a.get('type') for a in s.findall('arg')))
        for p in i.findall('property'):
            out[p.get('name')] = ('property', p.get('type'), p.get('access'))
        return out
    return None


class ManagerTest(h.TestCase):

    def register_one(self, name=None, options=None, aliases=('vda',)):
        return self.new_guest(aliases=aliases, size=64 * h.MiB, name=name, options=options)

    # -- the daemon itself

    def test_version_property(self):
        v = self.client.get(h.MANAGER_PATH, h.IFACE_MANAGER, 'Version')
        self.assertIsInstance(v, str)
        self.assertTrue(v.strip(), 'Version is empty')
        r = h.run([h.BLOCKSTREAMD, '--version'], check=False)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn(v, r.stdout, '--version does not print the Version property')

    def test_command_line(self):
        r = h.run([h.BLOCKSTREAMD, '--help'], check=False)
        self.assertEqual(r.returncode, 0, r.stderr)
        for opt in ('--config', '--state-dir', '--runtime-dir', '--help', '--version'):
            self.assertIn(opt, r.stdout, '--help does not mention %s' % opt)
        r = h.run([h.BLOCKSTREAMD, '--no-such-option'], check=False, timeout=10)
        self.assertNotEqual(r.returncode, 0, 'an unknown option was accepted')

    def test_introspection_matches_xml(self):
        """Both directions, all four interfaces: every member of dbus/*.xml (a method with its
        arguments, a property with its type and access, a signal with its arguments) is on the
        live object, and every member the object exposes on that interface is in the XML."""
        g = self.register_one()
        export, _ = o.export(g.disk())
        self.addCleanup(self.client.try_call, export, o.IFACE_EXPORT, 'Stop', timeout=10)
        objects = {h.IFACE_MANAGER: h.MANAGER_PATH, h.IFACE_GUEST: g.path, h.IFACE_STREAM: g.disk().path,
                   o.IFACE_EXPORT: export}
        self.assertEqual(set(objects), set(INTERFACES))
        for iface, path in objects.items():
            with self.subTest(interface=iface):
                xml_file = INTERFACES[iface]
                with open(os.path.join(h.SOURCE_ROOT, 'dbus', xml_file)) as f:
                    want = members(f.read(), iface)
                self.assertTrue(want, 'dbus/%s has no members of %s' % (xml_file, iface))
                got = members(self.client.call(path, 'org.freedesktop.DBus.Introspectable', 'Introspect'), iface)
                self.assertIsNotNone(got, '%s does not implement %s' % (path, iface))
                missing = sorted(set(want) - set(got))
                extra = sorted(set(got) - set(want))
                differ = ['%s: XML %r, live %r' % (m, want[m], got[m]) for m in sorted(set(want) & set(got))
                          if want[m] != got[m]]
                self.assertEqual(missing, [], '%s on %s lacks these members of dbus/%s' % (iface, path, xml_file))
                self.assertEqual(extra, [], '%s on %s exposes members that dbus/%s lacks' % (iface, path, xml_file))
                self.assertEqual(differ, [], '%s on %s differs from dbus/%s' % (iface, path, xml_file))
        om = self.client.call(h.MANAGER_PATH, 'org.freedesktop.DBus.Introspectable', 'Introspect')
        self.assertIsNotNone(members(om, h.IFACE_OM), '/org/blockstream1 has no ObjectManager')

    # -- RegisterGuest and what it publishes

    def test_register_guest(self):
        c = self.client
        name = self.unique_name()
        chains = self.make_chains(('vda',), 64 * h.MiB)
        q = self.start_qemu(chains, name=name)
        state_before = h.tree_snapshot(self.env.daemon.state_dir)
        given = str(uuidlib.uuid4())
        t0 = time.monotonic()
        path = self.register(name, q.daemon_socket, opts(uuid=S(given)))
        self.addCleanup(self._drop_guest, name, q)
        self.assertEqual(path, h.guest_path(name))
        dpath = h.disk_path(name, 'vda')

        p = c.get_all(path, h.IFACE_GUEST)
        self.assertEqual(p['Name'], name)
        self.assertEqual(p['UUID'], given)
        self.assertEqual(p['Owner'], 0)
        self.assertIs(p['Running'], True)
        self.assertEqual(p['QMPSocket'], q.daemon_socket)
        self.assertEqual(p['Disks'], [dpath])
        if 'SandboxLabel' in p:
            self.assertEqual(p['SandboxLabel'], '', 'SELinux is off here: SandboxLabel must be ""')

        self.assertEqual(c.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'GetGuest', 's', name), path)

        d = c.get_all(dpath, h.IFACE_STREAM)
        self.assertEqual(d['Guest'], path)
        self.assertEqual(d['Device'], 'vda')
        self.assertEqual(d['Path'], chains['vda'].top)

        # ObjectManager: InterfacesAdded for the guest and its disk, from the manager object.
        c.wait_for(lambda: {s['args'][0] for s in c.signals_of('InterfacesAdded', since=t0)} >= {path, dpath},
                   5, 'InterfacesAdded for %s and %s' % (path, dpath))
        added = {s['args'][0]: s for s in c.signals_of('InterfacesAdded', since=t0)}
        for p_, iface in ((path, h.IFACE_GUEST), (dpath, h.IFACE_STREAM)):
            s = added[p_]
            self.assertEqual(s['path'], h.MANAGER_PATH)
            self.assertEqual(s['iface'], h.IFACE_OM)
            self.assertIn(iface, s['args'][1])
        self.assertEqual(added[path]['args'][1][h.IFACE_GUEST].get('Name'), name)
        self.assertEqual(added[dpath]['args'][1][h.IFACE_STREAM].get('Device'), 'vda')

        objs = c.managed_objects()
        self.assertIn(path, objs)
        self.assertIn(dpath, objs)
        self.assertEqual(objs[path][h.IFACE_GUEST]['Name'], name)
        self.assertEqual(objs[path][h.IFACE_GUEST]['UUID'], given)
        self.assertEqual(objs[dpath][h.IFACE_STREAM]['Path'], chains['vda'].top)

        # Persisted: something new in the state directory, and all of it inside.
        state_after = h.tree_snapshot(self.env.daemon.state_dir)
        self.assertNotEqual(state_before, state_after, 'RegisterGuest wrote no state file')

    def test_generated_uuid_and_owner(self):
        g1 = self.register_one()
        g2 = self.register_one(options=opts(owner=U(4242)))
        u1, u2 = g1.prop('UUID'), g2.prop('UUID')
        self.assertRegex(u1, UUID_RE)
        self.assertRegex(u2, UUID_RE)
        self.assertNotEqual(u1, u2, 'generated UUIDs are not unique')
        self.assertEqual(g1.prop('Owner'), 0, 'Owner is not the caller (root)')
        self.assertEqual(g2.prop('Owner'), 4242)

    def test_two_disks(self):
        g = self.register_one(aliases=('vda', 'vdb'))
        disks = g.prop('Disks')
        self.assertEqual(sorted(disks), sorted([h.disk_path(g.name, 'vda'), h.disk_path(g.name, 'vdb')]))
        for i, alias in enumerate(('vda', 'vdb')):
            p = g.disk(alias).props()
            self.assertEqual(p['Device'], alias)
            self.assertEqual(p['NodeName'], 'disk%d' % i)
            self.assertEqual(p['Path'], g.chains[alias].top)
            self.assertEqual(p['BackingChain'], g.chains[alias].backing_files)
            self.assertEqual(p['Size'], 64 * h.MiB)

    def test_valid_unusual_names(self):
        """Names that match [A-Za-z0-9_.-]{1,64}, including '..x', '...' and 64 characters:
        accepted, escaped in the object path, and their state kept inside the state directory.
        ('.' and '..' are path components of their own and refused: test_badinput.py.)"""
        chains = self.make_chains(('vda',), 64 * h.MiB)
        q = self.start_qemu(chains)
        outside_before = self._outside_state()
        for name in ('..x', '...', '-', '_', 'x' * 64, '0', 'A.b-C_9'):
            path = self.register(name, q.daemon_socket)
            self.addCleanup(self.unregister_quietly, name)
            self.assertEqual(path, h.guest_path(name))
            self.assertEqual(self.client.get(path, h.IFACE_GUEST, 'Name'), name)
            self.assertEqual(self.client.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'GetGuest', 's', name), path)
            self.assertEqual(self._outside_state(), outside_before,
                             'registering %r wrote outside the state and runtime directories' % name)
            # One QMP monitor serves one client: free it for the next name.
            self.client.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'UnregisterGuest', 's', name)
            self.assertDBusError(h.ERR_NO_SUCH_GUEST, self.client.call, h.MANAGER_PATH, h.IFACE_MANAGER,
                                 'GetGuest', 's', name)

    def _outside_state(self):
        snap = h.tree_snapshot(self.env.dir)
        return {k: v for k, v in snap.items()
                if not k.startswith(('state', 'run', 'images', 'qemu-')) and not k.endswith('.log')}

    # -- unregistering

    def test_unregister_guest(self):
        c = self.client
        name = self.unique_name()
        chains = self.make_chains(('vda', 'vdb'), 64 * h.MiB)
        q = self.start_qemu(chains, name=name)
        self.addCleanup(self.unregister_quietly, name)
        state0 = h.tree_snapshot(self.env.daemon.state_dir)
        path = self.register(name, q.daemon_socket)
        dpaths = {h.disk_path(name, 'vda'), h.disk_path(name, 'vdb')}
        t0 = time.monotonic()
        self.assertIsNone(c.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'UnregisterGuest', 's', name))
        c.wait_for(lambda: {s['args'][0] for s in c.signals_of('InterfacesRemoved', since=t0)} >= {path} | dpaths,
                   5, 'InterfacesRemoved for the guest and both disks')
        for s in c.signals_of('InterfacesRemoved', since=t0):
            self.assertEqual(s['path'], h.MANAGER_PATH)
            if s['args'][0] == path:
                self.assertIn(h.IFACE_GUEST, s['args'][1])
            elif s['args'][0] in dpaths:
                self.assertIn(h.IFACE_STREAM, s['args'][1])
        self.assertDBusError(h.ERR_NO_SUCH_GUEST, c.call, h.MANAGER_PATH, h.IFACE_MANAGER, 'GetGuest', 's', name)
        objs = c.managed_objects()
        self.assertNotIn(path, objs)
        for p in dpaths:
            self.assertNotIn(p, objs)
        _, err = c.try_call(path, h.IFACE_PROPS, 'Get', 'ss', h.IFACE_GUEST, 'Name')
        self.assertIsNotNone(err, 'the guest object is still there after UnregisterGuest')
        self.assertEqual(h.tree_snapshot(self.env.daemon.state_dir), state0,
                         'the state directory still holds the unregistered guest')
        # QEMU lives on and its monitor is free again: the same guest registers anew.
        self.assertTrue(q.running())
        path2 = self.register(name, q.daemon_socket)
        self.assertEqual(path2, path)
        self.assertIs(c.get(path, h.IFACE_GUEST, 'Running'), True)

        # Guest.Unregister() does the same.
        t1 = time.monotonic()
        self.assertIsNone(c.call(path, h.IFACE_GUEST, 'Unregister'))
        c.wait_for(lambda: {s['args'][0] for s in c.signals_of('InterfacesRemoved', since=t1)} >= {path} | dpaths,
                   5, 'InterfacesRemoved after Guest.Unregister')
        self.assertDBusError(h.ERR_NO_SUCH_GUEST, c.call, h.MANAGER_PATH, h.IFACE_MANAGER, 'GetGuest', 's', name)
        self.assertEqual(h.tree_snapshot(self.env.daemon.state_dir), state0)

    def test_unknown_guest(self):
        c = self.client
        before = self.snapshot()
        for member in ('GetGuest', 'UnregisterGuest'):
            e = self.assertDBusError(h.ERR_NO_SUCH_GUEST, c.call, h.MANAGER_PATH, h.IFACE_MANAGER, member, 's',
                                     'no-such-guest')
            self.assertIn('no-such-guest', e.message, 'the error does not say which guest')
        self.assertSnapshotEqual(before, self.snapshot(), 'asking for an unknown guest')

    # -- refused registrations change nothing

    def test_duplicate_name(self):
        g = self.register_one()
        chains = self.make_chains(('vda',), 64 * h.MiB)
        q2 = self.start_qemu(chains)
        before = self.snapshot()
        e = self.assertDBusError(h.ERR_GUEST_EXISTS, self.try_register_raise, g.name, q2.daemon_socket)
        self.assertIn(g.name, e.message)
        self.assertSnapshotEqual(before, self.snapshot(), 'a duplicate RegisterGuest')
        self.assertEqual(g.prop('QMPSocket'), g.qemu.daemon_socket)
        self.assertIs(g.prop('Running'), True)
        # The second QEMU's monitor was not taken: another name registers on it.
        other = self.unique_name()
        self.register(other, q2.daemon_socket)
        self.addCleanup(self.unregister_quietly, other)

    def try_register_raise(self, name, sock, options=None):
        return self.register(name, sock, options)

    def test_bad_names(self):
        chains = self.make_chains(('vda',), 64 * h.MiB)
        q = self.start_qemu(chains)
        before = self.snapshot()
        for name in ('', 'x' * 65, 'a/b', '../x', 'a b', 'a\tb', 'é', 'gäst', 'a:b', 'a*', 'a\nb', '/'):
            with self.subTest(name=name):
                self.assertDBusError(h.ERR_INVALID_ARGS, self.try_register_raise, name, q.daemon_socket)
                self.assertSnapshotEqual(before, self.snapshot(), 'RegisterGuest(%r)' % name)
        # The monitor is still free (nothing was left connected).
        name = self.unique_name()
        self.register(name, q.daemon_socket)
        self.addCleanup(self.unregister_quietly, name)

    def test_bad_sockets(self):
        d = os.path.join(self.env.dir, 'sockets')
        os.makedirs(d)
        regular = os.path.join(d, 'regular-file')
        with open(regular, 'w') as f:
            f.write('not a socket\n')
        dead = os.path.join(d, 'dead.sock')
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(dead)
        s.close()      # bound, never listened: connection refused
        garbage = os.path.join(d, 'garbage.sock')
        stop = self._serve_garbage(garbage)
        self.addCleanup(stop)
        before = self.snapshot()
        cases = [('relative.sock', {h.ERR_INVALID_ARGS}),
                 ('./qmp.sock', {h.ERR_INVALID_ARGS}),
                 ('/nonexistent-dir/qmp.sock', {h.ERR_QEMU_FAILED, h.ERR_INVALID_ARGS}),
                 (d, {h.ERR_QEMU_FAILED, h.ERR_INVALID_ARGS}),
                 (regular, {h.ERR_QEMU_FAILED, h.ERR_INVALID_ARGS}),
                 (dead, {h.ERR_QEMU_FAILED}),
                 (garbage, {h.ERR_QEMU_FAILED})]
        for sock, errs in cases:
            with self.subTest(socket=sock):
                name = self.unique_name()
                self.assertDBusError(errs, self.try_register_raise, name, sock)
                self.assertSnapshotEqual(before, self.snapshot(), 'RegisterGuest with socket %r' % sock)
                self.assertDBusError(h.ERR_NO_SUCH_GUEST, self.client.call, h.MANAGER_PATH, h.IFACE_MANAGER,
                                     'GetGuest', 's', name)

    def _serve_garbage(self, path):
        """A unix socket that answers every connection with non-QMP junk and hangs up."""
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        srv.listen(8)
        srv.settimeout(0.2)
        done = threading.Event()

        def loop():
            while not done.is_set():
                try:
                    conn, _ = srv.accept()
                except socket.timeout:
                    continue
                except OSError:
                    return
                try:
                    conn.sendall(b'{"QMP": 12345, "garbage": [[[[\n}}}\xff\xfe not json\n')
                except OSError:
                    pass
                conn.close()
        t = threading.Thread(target=loop, daemon=True)
        t.start()

        def stop():
            done.set()
            t.join(2)
            srv.close()
        return stop

    def test_bad_options(self):
        chains = self.make_chains(('vda',), 64 * h.MiB)
        q = self.start_qemu(chains)
        before = self.snapshot()
        cases = {'owner as a string': opts(owner=S('0')),
                 'owner as a signed int': opts(owner=h.dbus.Int32(0)),
                 'uuid as a number': opts(uuid=U(5)),
                 'uuid that is no UUID': opts(uuid=S('not-a-uuid')),
                 'unknown key': opts(frobnicate=S('x')),
                 'unknown key next to a good one': opts(uuid=S(str(uuidlib.uuid4())), colour=S('blue'))}
        for what, o in cases.items():
            with self.subTest(what):
                name = self.unique_name()
                self.assertDBusError(h.ERR_INVALID_ARGS, self.try_register_raise, name, q.daemon_socket, o)
                self.assertSnapshotEqual(before, self.snapshot(), 'RegisterGuest with %s' % what)

    # -- disk_names: the names a guest's manager (libvirt) gives its disks

    def test_disk_names(self):
        c = self.client
        chains = self.make_chains(('virtio-disk0', 'virtio-disk1'), 64 * h.MiB)
        q = self.start_qemu(chains)

        def names(d):
            return opts(disk_names=h.dbus.Dictionary(d, signature='ss', variant_level=1))
        before = self.snapshot()
        cases = {'a path as a name': names({'virtio-disk0': '/dev/vda'}),
                 '.. as a name': names({'virtio-disk0': '..'}),
                 'an empty name': names({'virtio-disk0': ''}),
                 'a name of 65 characters': names({'virtio-disk0': 'v' * 65}),
                 'a control character': names({'virtio-disk0': 'vd\na'}),
                 'an alias that is no qdev id': names({'0disk': 'vda'}),
                 'one name for two disks': names({'virtio-disk0': 'vda', 'virtio-disk1': 'vda'}),
                 "a name that is another disk's alias": names({'virtio-disk0': 'virtio-disk1', 'virtio-disk1': 'vdb'}),
                 # only QEMU knows virtio-disk1: refused once it said so, before anything is published
                 "a name that is the alias of a disk QEMU has": names({'virtio-disk0': 'virtio-disk1'}),
                 'too many': names({'d%d' % i: 'n%d' % i for i in range(257)}),
                 'of the wrong type': opts(disk_names=S('virtio-disk0=vda'))}
        for what, o_ in cases.items():
            with self.subTest(what):
                name = self.unique_name()
                e = self.assertDBusError(h.ERR_INVALID_ARGS, self.try_register_raise, name, q.daemon_socket, o_)
                self.assertIn('disk_names', e.message)
                self.assertSnapshotEqual(before, self.snapshot(), 'RegisterGuest with %s' % what)

        # A good set, one of them for a disk QEMU does not have (yet): kept.
        name = self.unique_name()
        path = self.register(name, q.daemon_socket, names({'virtio-disk0': 'vda', 'virtio-disk1': 'vdb',
                                                           'virtio-disk7': 'vdh'}))
        self.addCleanup(self._drop_guest, name, q)
        d0, d1 = h.disk_path(name, 'virtio-disk0'), h.disk_path(name, 'virtio-disk1')
        self.assertEqual(c.get(d0, h.IFACE_STREAM, 'Target'), 'vda')
        self.assertEqual(c.get(d1, h.IFACE_STREAM, 'Target'), 'vdb')
        self.assertEqual(c.get(d0, h.IFACE_STREAM, 'Device'), 'virtio-disk0')
        objs = c.managed_objects()
        self.assertEqual(objs[d1][h.IFACE_STREAM]['Target'], 'vdb')
        # Without disk_names: "".
        g2 = self.register_one()
        self.assertEqual(g2.disk('vda').prop('Target'), '')

        # Persisted: a restart brings the names back.
        self.assertEqual(self.env.stop_daemon(signal.SIGTERM), 0)
        self.env.start_daemon()
        c.wait_for(lambda: c.try_call(h.MANAGER_PATH, h.IFACE_MANAGER, 'GetGuest', 's', name)[0] == path,
                   30, 'guest %s to be republished' % name)
        c.wait_prop(path, h.IFACE_GUEST, 'Running', True, timeout=30)
        self.assertEqual(c.get(d0, h.IFACE_STREAM, 'Target'), 'vda')
        self.assertEqual(c.get(d1, h.IFACE_STREAM, 'Target'), 'vdb')
        self.assertEqual(g2.disk('vda').prop('Target'), '')

    def test_disk_names_offline(self):
        # A guest that is not running: its disks are known at registration, checked then.
        c = self.client
        chains = self.make_chains(('vda', 'vdb'), 64 * h.MiB)
        disks = {a: ch.top for a, ch in chains.items()}

        def names(d):
            return h.dbus.Dictionary(d, signature='ss', variant_level=1)
        before = self.snapshot()
        bad = self.unique_name()
        e = self.assertDBusError(h.ERR_INVALID_ARGS, self.try_register_raise, bad, '',
                                 o.offline_options(disks, disk_names=names({'vda': 'vdb'})))
        self.assertIn('disk_names', e.message)
        self.assertSnapshotEqual(before, self.snapshot(), 'RegisterGuest naming vda after vdb')
        name = self.unique_name()
        self.register(name, '', o.offline_options(disks, disk_names=names({'vdb': 'data'})))
        self.addCleanup(self.unregister_quietly, name)
        self.assertEqual(c.get(h.disk_path(name, 'vdb'), h.IFACE_STREAM, 'Target'), 'data')
        self.assertEqual(c.get(h.disk_path(name, 'vda'), h.IFACE_STREAM, 'Target'), '')
        self.assertEqual(o.read_state(self.env, name).get('disk_names'), {'vdb': 'data'})

    # -- access control

    def test_stranger_is_refused(self):
        c = self.client
        addr = self.env.bus.address
        g = self.register_one()
        chains = self.make_chains(('vda',), 64 * h.MiB)
        q2 = self.start_qemu(chains)
        before = self.snapshot()
        refused = {h.ERR_ACCESS_DENIED, h.ERR_INTERACTIVE}
        calls = [
            (h.MANAGER_PATH, h.IFACE_MANAGER, 'RegisterGuest', 'ssa{sv}',
             '("stranger-guest", %r, dbus.Dictionary({}, signature="sv"))' % q2.daemon_socket),
            (h.MANAGER_PATH, h.IFACE_MANAGER, 'UnregisterGuest', 's', '(%r,)' % g.name),
            (g.path, h.IFACE_GUEST, 'Unregister', '', '()'),
            (g.disk().path, h.IFACE_STREAM, 'Start', 'tta{sv}',
             '(dbus.UInt64(0), dbus.UInt64(0), dbus.Dictionary({}, signature="sv"))'),
            (g.disk().path, h.IFACE_STREAM, 'SetBandwidth', 't', '(dbus.UInt64(1048576),)'),
            (h.MANAGER_PATH, h.IFACE_PROPS, 'Set', 'ssv',
             '("org.blockstream1.Manager", "Version", dbus.String("x", variant_level=1))'),
        ]
        for path, iface, member, sig, args in calls:
            with self.subTest(member=member):
                r = h.call_as(h.STRANGER, addr, path, iface, member, sig, args)
                self.assertNotEqual(r['uid'], 0)
                self.assertFalse(r['ok'], '%s.%s succeeded for an unprivileged caller' % (iface, member))
                self.assertIn(r['error'], refused, r)
                self.assertSnapshotEqual(before, self.snapshot(), 'a refused %s' % member)
        self.assertEqual(g.disk().prop('State'), 'idle')
        self.assertEqual(g.qemu.qmp.jobs(), [])
        # Properties, introspection and the ObjectManager are readable by everyone.
        for path, iface, member, sig, args in [
                (g.path, h.IFACE_PROPS, 'GetAll', 's', '("org.blockstream1.Guest",)'),
                (g.disk().path, h.IFACE_PROPS, 'Get', 'ss', '("org.blockstream1.BlockStream", "State")'),
                (h.MANAGER_PATH, h.IFACE_OM, 'GetManagedObjects', '', '()'),
                (h.MANAGER_PATH, 'org.freedesktop.DBus.Introspectable', 'Introspect', '', '()')]:
            with self.subTest(read=member):
                r = h.call_as(h.STRANGER, addr, path, iface, member, sig, args)
                self.assertTrue(r['ok'], 'an unprivileged %s.%s was refused: %s' % (iface, member, r))
                want = {'Get': 'idle', 'Introspect': 'org.blockstream1.Manager'}.get(member, g.name)
                self.assertIn(want, r['result'])
        self.assertIs(c.get(g.path, h.IFACE_GUEST, 'Running'), True)

    # -- Refresh

    def test_refresh_rereads_backing_chain(self):
        g = self.register_one()
        d = g.disk()
        c = g.chains['vda']
        self.assertEqual(d.prop('BackingChain'), c.backing_files)
        # Someone else (the VM's manager) changes the chain behind the daemon's back.
        g.qemu.qmp.cmd('block-stream', {'job-id': 'outside', 'device': 'disk0',
                                         'base-node': g.qemu.qmp.node_of_file(c.base)})
        h.wait_until(lambda: g.qemu.qmp.jobs() == [], 30, 'the outside job to end')
        self.assertEqual(h.image_backing(c.top), c.base)
        self.assertIsNone(self.client.call(g.path, h.IFACE_GUEST, 'Refresh'))
        self.client.wait_prop(d.path, h.IFACE_STREAM, 'BackingChain', [c.base], timeout=5)
        self.assertEqual(d.prop('Path'), c.top)


if __name__ == '__main__':
    h.main()
