#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""What a compromised helper or a hostile QEMU says never turns the daemon (issue 9, items 8
and 9).

- A pull helper that sends bytes that are not UTF-8, and terminal escapes, in its error: the
  job's Error, the Finished signal and the method errors carry a sanitized text; GetManagedObjects
  keeps working for every client; the guest survives a daemon restart, also from a state file
  that already holds such bytes.
- A QEMU that names a disk or a node '../../x': nothing of that name reaches the file system, the
  bus or a URI.
- A QEMU that reports another guest's image as its own disk: the other guest still gets it."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import unicodedata

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import offline as o  # noqa: E402
import ranges as r  # noqa: E402
from fakeqemu import FakeQemu  # noqa: E402
from harness import T, S, MiB, opts  # noqa: E402

HOSTILE_PULL = os.environ.get('HOSTILE_PULL') or os.path.join(h.SOURCE_ROOT, 'build', 'tests', 'helpers',
                                                              'hostile-pull')
CHATTY_RELAY = os.environ.get('CHATTY_RELAY') or os.path.join(h.SOURCE_ROOT, 'build', 'tests', 'helpers',
                                                              'chatty-relay')
GREEDY_RELAY = os.environ.get('GREEDY_RELAY') or os.path.join(h.SOURCE_ROOT, 'build', 'tests', 'helpers',
                                                              'greedy-relay')
SILENT_HELPER = os.environ.get('SILENT_HELPER') or os.path.join(h.SOURCE_ROOT, 'build', 'tests', 'helpers',
                                                                'silent-helper')
ERR_HELPER_FAILED = h.ERR_HELPER_FAILED


def assert_clean_text(test, text, what):
    """Valid UTF-8 (a str from dbus-python at all), no control characters, bounded."""
    test.assertIsInstance(text, str, what)
    bad = [c for c in text if unicodedata.category(c) == 'Cc']
    test.assertEqual(bad, [], '%s carries control characters: %r' % (what, text))
    test.assertLessEqual(len(text.encode('utf-8')), 1024, '%s is not bounded: %d bytes' % (what, len(text)))


class HostileHelperTest(h.TestCase):
    """blockstream-pull replaced by tests/helpers/hostile-pull.c."""

    env_per_test = True
    needs_daemon = False

    def setUp(self):
        super().setUp()
        self.start_daemon_with_helper(HOSTILE_PULL, 'blockstream-pull')

    def state_file(self, name):
        return os.path.join(self.env.daemon.state_dir, 'guests', name + '.json')

    def check_disk_error(self, g, what):
        d = g.disk()
        err = d.prop('Error')
        assert_clean_text(self, err, what)
        self.assertIn('\ufffd', err, '%s: the invalid bytes are not marked: %r' % (what, err))
        self.assertIn('red', err, '%s: the helper\'s words are lost: %r' % (what, err))
        # Every client, not only this one, still gets the whole tree.
        other = h.Client(self.env.bus.address)
        try:
            objs = other.managed_objects()
        finally:
            other.close()
        self.assertIn(d.path, objs)
        self.assertEqual(objs[d.path][h.IFACE_STREAM]['Error'], err)
        return err

    def test_range_job_error_not_utf8(self):
        g = self.new_guest(size=64 * MiB)
        d = g.disk()
        d.start(0, MiB)
        self.client.wait_prop(d.path, h.IFACE_STREAM, 'State', 'failed')
        err = self.check_disk_error(g, 'Error after a hostile helper')
        result, _, ferr = d.wait_finished(timeout=20)
        self.assertEqual(result, 'failed')
        self.assertEqual(ferr, err)

        # The record survives a restart.
        self.env.stop_daemon()
        self.env.start_daemon()
        self.client.wait_prop(d.path, h.IFACE_STREAM, 'State', 'failed')
        self.assertEqual(self.check_disk_error(g, 'Error after a restart'), err)

        # And a state file that already holds such bytes (written by an older daemon) loses the
        # bytes, not the guest.
        self.env.stop_daemon()
        path = self.state_file(g.name)
        with open(path) as f:
            rec = json.load(f)
        rec['disks'][0]['job']['error'] = 'PLACEHOLDER'
        raw = json.dumps(rec).encode().replace(b'PLACEHOLDER', b'old \\u001b[31mred \xff\xfe\xc0\xaf')
        with open(path, 'wb') as f:
            f.write(raw)
        self.env.start_daemon()
        self.assertTrue(self.client.get(g.path, h.IFACE_GUEST, 'Name'), 'the guest vanished after a restart')
        self.client.wait_prop(d.path, h.IFACE_STREAM, 'State', 'failed')
        self.check_disk_error(g, 'Error loaded from an old state file')

    def test_a_message_flood_is_paced(self):
        """A helper taken over that sends well-formed progress reports as fast as it can
        (hostile-pull.c, --offset=327680: "progress K TOTAL" for K = 1, 2, ...) had each one
        received, parsed and applied, as fast as it sent them: the daemon's time went to it.
        Its messages other than a map's extents are read at most 50 a second after a burst of
        50 now (its sends block meanwhile): BytesDone, the last K applied, says how many were."""
        g = self.new_guest(size=64 * MiB)
        d = g.disk()
        t0 = time.monotonic()
        d.start(327680, 32 * MiB)
        h.wait_until(lambda: d.prop('BytesDone') > 0, 20, 'the first progress report')
        time.sleep(2)
        done, elapsed = d.prop('BytesDone'), time.monotonic() - t0
        self.assertEqual(d.prop('State'), 'running')
        self.assertLessEqual(done, 50 + 50 * elapsed + 1,
                             '%d progress reports applied in %.1f s' % (done, elapsed))
        self.client.call(d.path, h.IFACE_STREAM, 'Cancel')
        self.assertEqual(d.wait_finished(timeout=30)[0], 'cancelled')

    def test_map_error_not_utf8(self):
        g = self.new_guest(size=64 * MiB)
        e = self.assertDBusError(ERR_HELPER_FAILED, self.client.call, g.disk().path, h.IFACE_STREAM,
                                 'GetAllocationMap', 'tt', T(0), T(MiB), timeout=30)
        assert_clean_text(self, e.message, 'the error of GetAllocationMap')
        self.assertIn('\ufffd', e.message)
        objs = self.client.managed_objects()
        self.assertIn(g.disk().path, objs)

    def test_a_map_is_what_the_helper_read(self):
        """A map the helper calls done must cover the range (or stop at the most extents a reply
        holds), and the helper must then exit 0: neither a map cut short nor one from a helper that
        failed is anyone's answer."""
        g = self.new_guest(size=64 * MiB)
        d = g.disk()
        e = self.assertDBusError(ERR_HELPER_FAILED, self.client.call, d.path, h.IFACE_STREAM, 'GetAllocationMap', 'tt',
                                 T(8192), T(65536), timeout=30)
        self.assertIn('does not cover', e.message)
        e = self.assertDBusError(ERR_HELPER_FAILED, self.client.call, d.path, h.IFACE_STREAM, 'GetAllocationMap', 'tt',
                                 T(8192), T(4096), timeout=30)
        self.assertIn('status 3', e.message)

    def map_held(self, d, offset, length):
        """GetAllocationMap (busctl, in the background) with the daemon stopped from its helper's
        start (test hook BLOCKSTREAM_TEST_MAP_STOP=spawned) until that helper has said everything
        and exited: its exit and its messages then wait for the daemon together. The error's text."""
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=self.env.bus.address)
        p = subprocess.Popen(['busctl', '--system', 'call', h.BUS_NAME, d.path, h.IFACE_STREAM, 'GetAllocationMap',
                              'tt', str(offset), str(length)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, env=env)
        self.addCleanup(lambda: p.poll() is None and (p.kill(), p.wait(10)))
        daemon = self.env.daemon.proc.pid

        def states():
            """The daemon's state and its children's."""
            out = []
            for pid in filter(str.isdigit, os.listdir('/proc')):
                try:
                    with open('/proc/%s/stat' % pid) as f:
                        fields = f.read().rsplit(')', 1)[1].split()
                except OSError:
                    continue
                if int(pid) == daemon or int(fields[1]) == daemon:
                    out.append((int(pid), fields[0]))
            return out
        h.wait_until(lambda: (daemon, 'T') in states() and any(s == 'Z' for _, s in states()), 30,
                     'the daemon stopped at its hook, and its map helper gone')
        os.kill(daemon, signal.SIGCONT)
        _, err = p.communicate(timeout=30)
        self.assertNotEqual(p.returncode, 0, 'the map succeeded')
        self.assertIsNone(self.env.daemon.proc.poll(), 'the daemon died: %s' % err)
        return err

    def test_last_words_read_after_the_exit(self):
        """A helper's exit may reach the daemon before its last messages, which the daemon then reads
        first; one of no known kind fails the map there. A map that reads the disk's shared export
        (QEMU's own stream runs on the disk) has nothing of its own to remove and was freed at once,
        while the daemon went on reading through it (ASan: heap-use-after-free in helper_exited)."""
        self.env.restart_daemon_with('BLOCKSTREAM_TEST_MAP_STOP', 'spawned')
        g = self.new_guest(size=64 * MiB)
        d = g.disk()
        d.start(0, 0, opts(bandwidth=T(64 * 1024), engine=S('stream')))  # QEMU's job: no pull helper
        self.client.wait_prop(d.path, h.IFACE_STREAM, 'State', 'running')
        # The first map's export stays as the disk's for the next maps while QEMU streams (map.c).
        self.assertIn('red', self.map_held(d, 0, MiB))
        for _ in range(3):
            self.assertIn('chatter', self.map_held(d, 12288, 4096))
        self.assertEqual(self.client.get(g.path, h.IFACE_GUEST, 'Name'), g.name)
        self.assertEqual(d.prop('State'), 'running')
        d.cancel()

    def test_cancel_of_a_helper_that_does_not_stop(self):
        """Cancel tells a range's helper to stop; one that never does (taken over, or not reading)
        kept the job running for good after Cancel had answered. It is killed a few seconds
        after, and the job ends cancelled."""
        g = self.new_guest(size=64 * MiB)
        d = g.disk()
        since = time.monotonic()
        d.start(196608, 65536)
        self.client.wait_prop(d.path, h.IFACE_STREAM, 'State', 'running')
        d.cancel()
        res, _, _ = d.wait_finished(30, since)
        self.assertEqual(res, 'cancelled')
        self.assertEqual(d.prop('State'), 'cancelled')
        h.wait_until(lambda: r.pull_helpers(self.env) == [], 10, 'the helper to be killed')

    def test_a_range_is_what_the_helper_copied(self):
        """A range's helper that says "done" and exits 0 without having reported the whole range
        copied: the range completed before (BytesDone set to the whole), nothing copied."""
        g = self.new_guest(size=64 * MiB)
        d = g.disk()
        since = time.monotonic()
        d.start(262144, 65536)
        res, _, err = d.wait_finished(30, since)
        self.assertEqual(res, 'failed', 'a range nobody copied completed')
        self.assertIn('before it had copied the whole range', err)

    def survivors(self):
        """Processes running the hostile helper's binary."""
        binary = os.path.join(self.env.dir, 'helpers-blockstream-pull', 'blockstream-pull')
        out = []
        for pid in filter(str.isdigit, os.listdir('/proc')):
            try:
                if os.readlink('/proc/%s/exe' % pid) == binary:
                    out.append(int(pid))
            except OSError:
                pass
        return out

    def test_what_a_helper_forks_dies_with_it(self):
        """A helper taken over forks a process that outlives it (it fails the map at once). That
        process would keep the helper's sockets, and reach the guest's next helpers, which run as
        the same uid: it stops every process it may signal, and the daemon's next helper, stopped
        before its exec, held the daemon in its wait for that exec (every guest, every call)."""
        g = self.new_guest(size=64 * MiB)
        d = g.disk()
        self.assertDBusError(ERR_HELPER_FAILED, self.client.call, d.path, h.IFACE_STREAM, 'GetAllocationMap', 'tt',
                             T(4096), T(4096), timeout=30)
        h.wait_until(lambda: self.survivors() == [], 10, 'what the helper forked to end with it')
        # The guest's next helper runs, and the daemon answers.
        e = self.assertDBusError(ERR_HELPER_FAILED, self.client.call, d.path, h.IFACE_STREAM, 'GetAllocationMap',
                                 'tt', T(0), T(MiB), timeout=30)
        self.assertIn('red', e.message)
        self.assertEqual(self.client.get(g.path, h.IFACE_GUEST, 'Name'), g.name)


class SilentPullTest(h.TestCase):
    """blockstream-pull replaced by tests/helpers/silent-helper.c, which never says "ready": a
    helper stuck in QEMU's NBD handshake (a QEMU that stalls it), or taken over."""

    env_per_test = True
    needs_daemon = False

    def setUp(self):
        super().setUp()
        self.start_daemon_with_helper(SILENT_HELPER, 'blockstream-pull')

    def test_a_helper_that_never_gets_ready(self):
        """Start fails within the helper's 10 s to get ready, the helper is gone, and the disk takes
        the next Start: it stayed "starting" for good before (Start unanswered, then Busy; Cancel
        with nothing to cancel)."""
        g = self.new_guest(size=64 * MiB)
        d = g.disk()
        for _ in range(2):
            e = self.assertDBusError(ERR_HELPER_FAILED, d.call, 'Start', 'tta{sv}', T(0), T(MiB), h.no_opts())
            self.assertIn("did not get through QEMU's NBD handshake within 10 s", e.message)
            self.assertEqual(d.prop('State'), 'idle', 'a Start that failed left the disk in another state')
            h.wait_until(lambda: r.pull_helpers(self.env) == [], 10, 'the helper to be killed')


class ChattyRelayTest(h.TestCase):
    """blockstream-nbd-relay replaced by tests/helpers/chatty-relay.c: "ready", then 500 error
    messages. The daemon logs the first and then at most one a minute, with a count: a relay
    taken over would otherwise fill the journal past its rate limit, which drops every message
    of the daemon's. The old daemon logged all 500."""

    env_per_test = True
    needs_daemon = False

    def setUp(self):
        super().setUp()
        self.start_daemon_with_helper(CHATTY_RELAY, 'blockstream-nbd-relay')

    def test_relay_errors_do_not_flood_the_log(self):
        path = exported_guest(self)
        # "clients 1" follows the 500 on one socket, in order: once Clients shows 1, all were read.
        self.client.wait_prop(path, 'org.blockstream1.Export', 'Clients', 1, 30)
        lines = [line for line in log_text(self.env.daemon.log).splitlines() if 'relay: flood' in line]
        h.log('%d log lines for 500 relay errors' % len(lines))
        self.assertTrue(lines, 'no relay error logged')
        self.assertLessEqual(len(lines), 5, lines[:10])
        self.assertEqual(self.client.get(path, 'org.blockstream1.Export', 'State'), 'serving')

    def test_relay_counts_do_not_flood_the_bus(self):
        """500 client counts, 2 and 3 in turn, as fast as the relay can: Clients is announced a few
        times a second at most (each one a signal to every client of the system bus), and the last
        count is the one shown. The old daemon sent 500 signals. (The relay's messages are read
        at 128 a second after a burst: its flood takes seconds, so the bound is per second.)"""
        since = time.monotonic()
        path = exported_guest(self)
        self.client.wait_prop(path, 'org.blockstream1.Export', 'Clients', 1, 30)
        self.client.pump(0.6)   # a count held back goes out within 0.25 s
        signals = [(t, ch['Clients']) for t, ch, _ in self.client.props_changed(path, 'org.blockstream1.Export',
                                                                                   since) if 'Clients' in ch]
        counts = [c for _, c in signals]
        self.assertTrue(counts, 'Clients was never announced')
        span = signals[-1][0] - signals[0][0]
        h.log('%d Clients signals for 501 counts in %.2f s' % (len(counts), span))
        # One each 0.25 s at most, and one more for the receiving side's jitter.
        self.assertLessEqual(len(counts), span / 0.25 + 2, counts)
        self.assertEqual(counts[-1], 1)
        self.assertEqual(self.client.get(path, 'org.blockstream1.Export', 'Clients'), 1)

    def test_relay_messages_are_paced(self):
        """On SIGUSR2 the relay sends "clients K" for K = 2, 3, ... as fast as the daemon takes
        them. Each was received, parsed and applied as fast as it came; a relay's messages are
        read at most 128 a second after a burst of 256 now (its sends block meanwhile): Clients,
        the last K applied, says how many were."""
        path = exported_guest(self)
        self.client.wait_prop(path, 'org.blockstream1.Export', 'Clients', 1, 30)
        relays = o.relays(self.env)
        self.assertEqual(len(relays), 1)
        t0 = time.monotonic()
        os.kill(relays[0].pid, signal.SIGUSR2)
        h.wait_until(lambda: self.client.get(path, 'org.blockstream1.Export', 'Clients') > 1, 20,
                     'the first count after SIGUSR2')
        time.sleep(2)
        k, elapsed = self.client.get(path, 'org.blockstream1.Export', 'Clients'), time.monotonic() - t0
        self.assertLessEqual(k, 1 + 256 + 128 * elapsed + 1, '%d counts applied in %.1f s' % (k - 1, elapsed))
        self.assertEqual(self.client.get(path, 'org.blockstream1.Export', 'State'), 'serving')

    def test_relay_stderr_does_not_flood_the_log(self):
        """2000 lines on the relay's stderr at once, then one more 2 s later: the daemon logs a
        burst of them (100), then 10 a second, and says how many it left out; the old daemon
        logged all 2000."""
        exported_guest(self)
        h.wait_until(lambda: re.search(r': END$', log_text(self.env.daemon.log), re.M), 60,
                     'the relay\'s last line in the daemon\'s log')
        text = log_text(self.env.daemon.log)
        noise = [line for line in text.splitlines() if re.search(r': noise \d+$', line)]
        h.log('%d of 2000 stderr lines logged' % len(noise))
        self.assertTrue(noise, 'none of the relay\'s lines logged')
        self.assertLessEqual(len(noise), 500, 'the relay\'s stderr flooded the log')
        self.assertRegex(text, r'\(\d+ lines not logged: more than 10 a second\)')


class GreedyRelayTest(h.TestCase):
    """blockstream-nbd-relay replaced by tests/helpers/greedy-relay.c, which asks for connections
    to the guest's NBD server without end and keeps them: it gets 64, as many as a relay has
    places for clients, and more only as it closes some. The old daemon handed it all it asked
    for: a few such relays fill the server's 768 connections, and the guest's own maps and
    streams find it full."""

    env_per_test = True
    needs_daemon = False

    def setUp(self):
        super().setUp()
        self.start_daemon_with_helper(GREEDY_RELAY, 'blockstream-nbd-relay')

    def test_relay_holds_at_most_64_connections(self):
        path = exported_guest(self)

        def clients():
            return self.client.get(path, 'org.blockstream1.Export', 'Clients')
        # It asked for 100 and read every answer.
        h.wait_until(lambda: clients() != 0, 30, 'the greedy relay\'s count after asking for 100')
        self.assertEqual(clients(), 64)
        relays = o.relays(self.env)
        self.assertEqual(len(relays), 1)
        os.kill(relays[0].pid, signal.SIGUSR1)
        # It closed 10 and asked for 20 more: 10 of them.
        h.wait_until(lambda: clients() >= 1000, 30, 'the greedy relay\'s count after asking for 20 more')
        self.assertEqual(clients() - 1000, 64)
        self.assertIn('its NBD relay asks for more connections while it holds 64', log_text(self.env.daemon.log))
        self.assertEqual(self.client.get(path, 'org.blockstream1.Export', 'State'), 'serving')
        # Then it says something malformed: the export fails, and the relay, which stays (with
        # its 64 connections to QEMU, and not counted among the guest's 8 exports once failed),
        # is killed.
        os.kill(relays[0].pid, signal.SIGUSR1)
        self.client.wait_prop(path, 'org.blockstream1.Export', 'State', 'failed', 30)
        o.wait_gone(relays[0].pid, 10, 'the failed export\'s relay to be killed')


def block(node, filename, qdev=None, device='', size=16 * MiB, cluster=65536):
    b = {'device': device, 'locked': False, 'removable': False, 'type': 'unknown',
         'inserted': {'node-name': node, 'ro': False, 'drv': 'qcow2', 'file': filename, 'backing_file_depth': 0,
                      'image': {'filename': filename, 'format': 'qcow2', 'virtual-size': size,
                                'cluster-size': cluster}}}
    if qdev:
        b['qdev'] = '/machine/peripheral/%s/virtio-backend' % qdev
    return b


def exported_guest(test):
    """A new guest's disk exported (its relay is the test's helper); stopped at the end. Returns
    the Export object's path."""
    g = test.new_guest(size=16 * MiB)
    path, _ = test.client.call(g.disk().path, h.IFACE_STREAM, 'Export', 'a{sv}', h.no_opts(), timeout=60)
    test.addCleanup(lambda: test.client.try_call(path, 'org.blockstream1.Export', 'Stop', timeout=10))
    return path


def log_text(path):
    with open(path, errors='replace') as f:
        return f.read()


def offline_disks(disks):
    return h.dbus.Dictionary({'disks': h.dbus.Dictionary(dict(disks), signature='ss')}, signature='sv')


class HostileQemuTest(h.TestCase):
    """QEMUs that lie about their disks (issue 9, item 9)."""

    def fake(self, blocks):
        path = os.path.join(self.env.dir, self.unique_name('fake') + '.sock')
        fake = FakeQemu(path, blocks=blocks)
        self.addCleanup(fake.close)
        return fake

    def escaped(self):
        return sorted(f for f in os.listdir(self.env.dir) if f.startswith('escaped'))

    def test_disk_names_never_reach_the_file_system(self):
        # The guest's runtime directory is <dir>/run/guests/<name>: three levels up is <dir>.
        img = os.path.join(self.env.images, 'some.qcow2')
        h.qemu_img('create', '-q', '-f', 'qcow2', img, '16M')
        cases = {'node name as the alias': block('../../../escaped-node', img),
                 'node name behind a good qdev id': block('../../../escaped-qdev', img, qdev='vda'),
                 'BlockBackend name': block('top', img, device='../../../escaped-dev'),
                 'a dot': block('.', img)}
        for what, b in cases.items():
            with self.subTest(what):
                name = self.unique_name('evil')
                q = self.fake([b])
                _, err = self.client.try_call(h.MANAGER_PATH, h.IFACE_MANAGER, 'RegisterGuest', 'ssa{sv}', name,
                                              q.path, h.no_opts())
                if err is None:
                    self.addCleanup(self.unregister_quietly, name)
                    # Whatever got registered: export every disk it has, on a unix socket.
                    objs = self.client.managed_objects()
                    disks = [p for p in objs if p.startswith(h.guest_path(name) + '/')
                             and h.IFACE_STREAM in objs[p]]
                    for p in disks:
                        self.client.try_call(p, h.IFACE_STREAM, 'Export', 'a{sv}',
                                             h.dbus.Dictionary({'listen': S('unix')}, signature='sv'), timeout=30)
                    for p in disks:
                        alias = objs[p][h.IFACE_STREAM]['Device']
                        self.assertRegex(alias, r'^[A-Za-z][A-Za-z0-9._-]*$', 'a disk named %r got through' % alias)
                else:
                    self.assertEqual(err.name, h.ERR_QEMU_FAILED, err.message)
                self.assertEqual(self.escaped(), [], 'a socket was made outside the runtime directory')
                self.assertTrue(self.env.daemon.running())
                self.assertTrue(self.client.get(h.MANAGER_PATH, h.IFACE_MANAGER, 'Version'))

    def test_qemu_claims_another_guests_image(self):
        victim = self.unique_name('victim')
        chain = self.make_chains(size=16 * MiB)['vda']
        self.register(victim, '', offline_disks({'vda': chain.top}))
        self.addCleanup(self.unregister_quietly, victim)
        vda = h.disk_path(victim, 'vda')
        fresh = self.make_chains(size=16 * MiB)['vda']

        # A running guest whose QEMU says the victim's image, the victim's backing and a fresh
        # image are its disks.
        evil = self.unique_name('evil')
        q = self.fake([block('n1', chain.top, qdev='vda'), block('n2', chain.mid, qdev='vdb'),
                       block('n3', fresh.top, qdev='vdc')])
        self.register(evil, q.path)
        self.addCleanup(self.unregister_quietly, evil)
        self.assertEqual(self.client.get(h.disk_path(evil, 'vda'), h.IFACE_STREAM, 'Path'), chain.top)

        # The victim still gets its own disk: a map needs its storage helper, which opens it.
        extents = self.client.call(vda, h.IFACE_STREAM, 'GetAllocationMap', 'tt', T(0), T(16 * MiB))
        self.assertEqual(sum(e[1] for e in extents), 16 * MiB)
        self.assertEqual(self.client.get(vda, h.IFACE_STREAM, 'Path'), chain.top)

        # A new guest on the same backing: a claim keeps no one from reading an image.
        other = self.make_chains(size=16 * MiB)['vda']
        h.qemu_img('rebase', '-u', '-b', chain.mid, '-F', 'qcow2', other.top)
        newcomer = self.unique_name('newcomer')
        self.register(newcomer, '', offline_disks({'vda': other.top}))
        self.addCleanup(self.unregister_quietly, newcomer)
        self.assertEqual(self.client.get(h.disk_path(newcomer, 'vda'), h.IFACE_STREAM, 'BackingChain')[0],
                         chain.mid)

        # What a running guest says it writes, no one else registers to write (test_offline's rule).
        e = self.assertDBusError(h.ERR_INVALID_ARGS, self.register, self.unique_name('late'), '',
                                 offline_disks({'vda': fresh.top}))
        self.assertIn('another guest', e.message)

    def test_mirror_never_replaces_what_qemu_only_reads(self):
        """The mirror renames a new image, written by QEMU, onto the disk's path. A QEMU taken over
        names the template it reads (shared by every guest on the host) as its disk: the daemon,
        root, must not make and hand it an image beside that file to rename over it."""
        tdir = os.path.join(self.env.images, self.unique_name('templates'))
        os.mkdir(tdir)
        base = os.path.join(tdir, 'base.qcow2')
        template = os.path.join(tdir, 'template.qcow2')
        h.qemu_img('create', '-q', '-f', 'qcow2', base, '16M')
        h.qemu_img('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', template)
        b = block('n1', template, qdev='vda')
        b['inserted']['backing_file_depth'] = 1
        b['inserted']['image']['backing-filename'] = base
        b['inserted']['image']['backing-image'] = {'filename': base, 'format': 'qcow2', 'virtual-size': 16 * MiB}
        # What this QEMU has open, as a guest's QEMU has its backing images: read-only.
        held = os.open(template, os.O_RDONLY)
        self.addCleanup(os.close, held)
        evil = self.unique_name('evil')
        q = self.fake([b])
        self.register(evil, q.path)
        self.addCleanup(self.unregister_quietly, evil)
        d = h.Disk(self.client, h.disk_path(evil, 'vda'))
        self.assertEqual(d.prop('Path'), template)
        before = sorted(os.listdir(tdir))
        e = self.assertDBusError('org.freedesktop.DBus.Error.Failed', d.start, 0, 0,
                                 h.dbus.Dictionary({'engine': S('mirror')}, signature='sv'))
        self.assertIn('for writing', e.message)
        self.assertEqual(sorted(os.listdir(tdir)), before, 'an image was made beside the template')
        self.assertEqual([c for c in q.sequence if c in ('add-fd', 'drive-mirror', 'blockdev-mirror')], [],
                         'QEMU was given an image to write over the template')

    def test_a_handoff_reads_the_chain_with_the_rights_of_the_qemu_that_wrote_it(self):
        """A handoff serves the export from the image headers once the guest's QEMU is gone. The
        top image is the file that QEMU had open (pinned), but its header is QEMU's to write, and
        the chain was read with the guest owner's rights: root's, for a guest root registered. A
        QEMU of another uid that named a file only root may read as its backing, then went away,
        had the storage helper serve that file's data (review 34d). The chain is read with the
        QEMU's uid's rights now, and the owner's: read with the QEMU's alone, an owner's header
        naming what only the QEMU's shared uid (QEMUUsers=, libvirt's) may read was served in turn
        (review 34e). An honest one's is served."""
        h.ensure_user(h.STRANGER)
        owner = h.ensure_user(h.OWNER)[0]
        self.assertEqual(self.handoff_of_a_strangers_qemu(tamper=False)[0], ('serving', 1))
        self.assertEqual(self.handoff_of_a_strangers_qemu(tamper=True)[0], ('failed', 0),
                         'the handoff served a chain through a root-only file')
        with open(self.env.daemon.log, errors='replace') as f:
            self.assertIn('may not read its backing', f.read())
        self.assertEqual(self.handoff_of_a_strangers_qemu(tamper=False, owner=owner)[0], ('serving', 1))
        self.assertEqual(self.handoff_of_a_strangers_qemu(tamper=True, owner=owner, secret_of=h.STRANGER)[0],
                         ('failed', 0), "the handoff served a chain through a file the owner may not read")

    def test_a_handed_over_top_is_the_pinned_file_at_every_open(self):
        """The pin (the file the QEMU had open) was compared once, when the handoff began; the
        storage helper's attach, and each of its restarts, opened the top again by its path, as
        root for a guest root registered: a file renamed over it meanwhile (one the QEMU's uid may
        only read) was handed to the helper read-write (review 34f). Every open compares it now."""
        h.ensure_user(h.STRANGER)
        outcome, name, export, uri, top = self.handoff_of_a_strangers_qemu(tamper=False)
        self.assertEqual(outcome, ('serving', 1))
        o.nbd_sha256(uri)  # served: the helper has the disk (a helper that runs need not have it yet)
        other = os.path.join(os.path.dirname(top), 'other.qcow2')
        h.qemu_img('create', '-q', '-f', 'qcow2', other, '16M')
        os.chmod(other, 0o644)
        os.rename(other, top)
        helper = o.guest_storage_helpers(self.env, name)[0]
        os.kill(helper.pid, signal.SIGKILL)

        # Each restart of the helper finds another file at the top's path; after the last the
        # export fails. (It served on, from the renamed file, before.)
        h.wait_until(lambda: self.client.get(export, o.IFACE_EXPORT, 'State') == 'failed', 60,
                     'the export to fail rather than serve a file renamed over the pinned top')
        with open(self.env.daemon.log, errors='replace') as f:
            self.assertIn('is no longer the file its QEMU had open', f.read())

    def handoff_of_a_strangers_qemu(self, tamper, owner=None, secret_of=None):
        """A guest registered by root (for owner, if given) whose QEMU runs as the stranger,
        exported; its QEMU, having named (tamper) as its image's backing a file only secret_of (or
        root) may read, quits: ((export State, storage helpers) once the handoff was refused or
        served, the guest's name, the export and its URI, the top image)."""
        d = os.path.join(self.env.images, self.unique_name('handoff'))
        os.mkdir(d)
        os.chmod(d, 0o755)
        tmpl, scrt, top = (os.path.join(d, n) for n in ('tmpl.qcow2', 'scrt.qcow2', 'top.qcow2'))
        for image in (tmpl, scrt):
            h.qemu_img('create', '-q', '-f', 'qcow2', image, '16M')
        h.qemu_io(scrt, 'write -P 0x5e 0 %d' % MiB)
        os.chmod(tmpl, 0o644)
        os.chmod(scrt, 0o600)
        if secret_of:
            os.chown(scrt, *h.ensure_user(secret_of))
        h.qemu_img('create', '-q', '-f', 'qcow2', '-b', tmpl, '-F', 'qcow2', top)
        name = self.unique_name('handoff')
        q = self.env.new_qemu(name, [('vda', top)], user=h.STRANGER)
        self.addCleanup(q.kill)
        if owner is not None:     # the owner's file, which the QEMU's uid may write too
            os.chown(top, owner, owner)
            os.chmod(top, 0o666)
        self.register(name, q.daemon_socket, h.dbus.Dictionary({'owner': h.dbus.UInt32(owner)}, signature='sv')
                      if owner is not None else None)
        self.addCleanup(self.unregister_quietly, name)
        export, uri = self.client.call(h.disk_path(name, 'vda'), h.IFACE_STREAM, 'Export', 'a{sv}', h.no_opts(),
                                       timeout=60)
        self.addCleanup(lambda: self.client.try_call(export, o.IFACE_EXPORT, 'Stop', timeout=10))
        if tamper:    # what that QEMU, or the owner, may write: the image's header
            with open(top, 'r+b') as f:
                head = f.read(65536)
                f.seek(head.index(tmpl.encode()))
                f.write(scrt.encode())
        q.quit()

        def outcome():
            state = self.client.get(export, o.IFACE_EXPORT, 'State')
            helpers = o.guest_storage_helpers(self.env, name)
            return (state, len(helpers)) if state == 'failed' or helpers else None
        return h.wait_until(outcome, 60, 'the handoff to be refused or served'), name, export, uri, top

    def test_sizes_past_int64_are_refused(self):
        """QMP's integers are int64: a QEMU that reports a size beyond 2^63 has its reply refused
        (a range near the end of such a disk, widened to a cluster of 2^63, wrapped below its
        start). A cluster size that is no power of two, or a huge one, is taken as unknown: not
        every format's is one, and it is no reason to refuse the guest."""
        img = os.path.join(self.env.images, 'sizes.qcow2')
        h.qemu_img('create', '-q', '-f', 'qcow2', img, '16M')
        for what, b in {'cluster size 2^62 + 2^61': block('n1', img, qdev='vda', cluster=(1 << 62) + (1 << 61)),
                        'cluster size 3 MiB': block('n1', img, qdev='vda', cluster=3 * MiB)}.items():
            with self.subTest(what):
                name = self.unique_name('clusters')
                q = self.fake([b])
                self.register(name, q.path)
                self.addCleanup(self.unregister_quietly, name)
                self.assertEqual(self.client.get(h.disk_path(name, 'vda'), h.IFACE_STREAM, 'Size'), 16 * MiB)
        cases = {'cluster size 2^63': block('n1', img, qdev='vda', size=(1 << 63) - 1, cluster=1 << 63),
                 'virtual size 2^63': block('n1', img, qdev='vda', size=1 << 63),
                 'virtual size 2^64 - 2': block('n1', img, qdev='vda', size=(1 << 64) - 2)}
        for what, b in cases.items():
            with self.subTest(what):
                name = self.unique_name('sizes')
                q = self.fake([b])
                _, err = self.client.try_call(h.MANAGER_PATH, h.IFACE_MANAGER, 'RegisterGuest', 'ssa{sv}', name,
                                              q.path, h.no_opts())
                if err is None:
                    self.addCleanup(self.unregister_quietly, name)
                self.assertIsNotNone(err, 'a guest whose QEMU reports %s was registered' % what)
                self.assertEqual(err.name, h.ERR_QEMU_FAILED, err.message)
                self.assertTrue(self.env.daemon.running())

    def test_qemus_names_never_forge_a_log_line(self):
        """A file name with a newline, from a QEMU, is one log line of the daemon's, not two: the
        journal (JOURNAL_STREAM) would read "<N>..." after a newline as a record of priority N."""
        forged = 'FORGED-%d' % os.getpid()
        img = os.path.join(self.env.images, 'x\n<0>blockstreamd: %s \x1b[2J.qcow2' % forged)
        evil = self.unique_name('evil')
        q = self.fake([block('n1', img, qdev='vda')])
        self.register(evil, q.path)
        self.addCleanup(self.unregister_quietly, evil)
        vda = h.disk_path(evil, 'vda')
        self.assertEqual(self.client.get(vda, h.IFACE_STREAM, 'Path'), img)
        # An export, then its QEMU goes: the daemon hands the disk to the storage helper only if
        # it saw QEMU with the file open, and logs that it did not, naming the file.
        path, _ = self.client.call(vda, h.IFACE_STREAM, 'Export', 'a{sv}', h.no_opts(), timeout=30)
        self.addCleanup(lambda: self.client.try_call(path, 'org.blockstream1.Export', 'Stop', timeout=10))
        q.close()
        h.wait_until(lambda: 'was never seen with' in log_text(self.env.daemon.log), 30,
                     'the daemon to log that it did not see QEMU with the file open')
        with open(self.env.daemon.log, errors='replace') as f:
            lines = [line for line in f if forged in line]
        self.assertTrue(lines, 'the file name is not in the log')
        for line in lines:
            self.assertTrue(line.startswith('blockstreamd: '), 'a log line begun by a QEMU: %r' % line)
            self.assertNotIn('\x1b', line, 'a terminal escape from a QEMU in the log: %r' % line)
        self.assertTrue(self.env.daemon.running())


if __name__ == '__main__':
    h.main()
