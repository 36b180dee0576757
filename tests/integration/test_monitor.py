#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""blockstream-monitor as a person uses it: a real window on Xvfb, against the private bus, the
real daemon, polkitd and QEMU, driven and read through the accessibility tree (AT-SPI).

The desktop is built here, nothing of the host's is used: Xvfb on a display it picks itself, an
accessibility bus (a dbus-daemon of our own that every user may join, so the monitor runs as an
unprivileged user while this root test reads it) with at-spi2-registryd on it. The monitor runs
as bstest-owner, who owns one guest (the shipped polkit rules let it stream that one) and not the
other (polkit refuses: no agent answers). A screenshot of the screen is saved on failure; one of
the window mid-stream is saved as docs/monitor.png when BLOCKSTREAM_UPDATE_SCREENSHOT=1.

Every wait is for a state the window shows (or the daemon reports), with a bounded deadline.

Environment: BLOCKSTREAM_MONITOR, the monitor binary (default <root>/build/monitor/blockstream-monitor).
"""

import os
import select
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
from harness import MiB  # noqa: E402

MONITOR = os.environ.get('BLOCKSTREAM_MONITOR') or os.path.join(h.SOURCE_ROOT, 'build', 'monitor',
                                                                'blockstream-monitor')
REGISTRYD = '/usr/libexec/at-spi2-registryd'
SCREENSHOT = os.path.join(h.SOURCE_ROOT, 'docs', 'monitor.png')
WINDOW = '860x640+0+0'    # the window's default size, at the top left of the screen
BANDWIDTH = '1M'        # typed into the window: the ~100 MiB of backing data would take ~100 s, so the
                        # clicks below land while it runs even on a loaded machine

A11Y_BUS_CONF = '''<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>accessibility</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
  </policy>
</busconfig>
'''


def check_desktop_prerequisites():
    problems = []
    for tool in ('Xvfb', 'import'):
        if shutil.which(tool) is None:
            problems.append('%s not found (apt-get install xvfb imagemagick)' % tool)
    if not os.access(REGISTRYD, os.X_OK):
        problems.append('%s not found (apt-get install at-spi2-core)' % REGISTRYD)
    if not os.access(MONITOR, os.X_OK):
        problems.append('%s not found: build with GTK4 (apt-get install libgtk-4-dev; meson -Dmonitor=enabled) '
                        'or set BLOCKSTREAM_MONITOR' % MONITOR)
    try:
        import pyatspi  # noqa: F401
    except ImportError as e:
        problems.append('pyatspi: %s (apt-get install python3-pyatspi gir1.2-atspi-2.0)' % e)
    if problems:
        raise AssertionError('GUI test prerequisites missing:\n  ' + '\n  '.join(problems))


class Desktop:
    """Xvfb + an accessibility bus + at-spi2-registryd, and the monitor on them."""

    def __init__(self, env):
        self.env = env
        self.dir = os.path.join(env.dir, 'desktop')
        os.makedirs(self.dir)
        os.chmod(self.dir, 0o755)
        self.log = os.path.join(env.dir, 'desktop.log')
        self.monitor_log = os.path.join(env.dir, 'monitor.log')
        self.display = None
        self.a11y_address = None
        self.monitor = None
        self.procs = []         # stopped in reverse order, Xvfb last (so it removes its lock file)

    def _spawn(self, argv, log=None, **kw):
        with open(log or self.log, 'ab') as f:
            p = h.spawn(argv, stdout=f, stderr=f, **kw)
        self.procs.append(p)
        return p

    def stop(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        for p in (getattr(self, 'a11y_bus', None),) + tuple(getattr(self, 'session_buses', ())):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(10)

    def start(self):
        r, w = os.pipe()
        self.xvfb = self._spawn(['Xvfb', '-displayfd', str(w), '-screen', '0', '1100x1000x24', '-nolisten', 'tcp',
                                 '-ac'], pass_fds=(w,))
        os.close(w)
        # Xvfb writes the number, then a newline, in two writes: read up to the newline (a pipe
        # closed after the number would make the second write fail and Xvfb exit).
        data = b''
        deadline = time.monotonic() + 30
        while not data.endswith(b'\n') and time.monotonic() < deadline:
            ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(r, 64) if ready else b''
            if not chunk:
                break
            data += chunk
        os.close(r)
        number = data.decode().strip()
        if not number.isdigit():
            raise AssertionError('Xvfb did not start (printed %r); log:\n%s' % (number, h._tail(self.log)))
        self.display = ':' + number

        socket_path = os.path.join(self.dir, 'a11y-bus')
        conf = os.path.join(self.dir, 'a11y-bus.conf')
        with open(conf, 'w') as f:
            f.write(A11Y_BUS_CONF.format(socket=socket_path))
        with open(self.log, 'ab') as logf:
            self.a11y_bus = h.spawn(['dbus-daemon', '--config-file=' + conf, '--nofork', '--print-address'],
                                    stdout=subprocess.PIPE, stderr=logf)
        ready, _, _ = select.select([self.a11y_bus.stdout], [], [], 10)
        line = self.a11y_bus.stdout.readline().decode().strip() if ready else ''
        if not line.startswith('unix:'):
            raise AssertionError('the accessibility bus did not start (%r)' % line)
        os.chmod(socket_path, 0o777)
        self.a11y_address = line
        # pyatspi (libatspi) and GTK both take the accessibility bus from here.
        os.environ['AT_SPI_BUS_ADDRESS'] = self.a11y_address
        self.registryd = self._spawn([REGISTRYD], env=self.env_for(None))
        bus = h.dbus.bus.BusConnection(self.a11y_address)
        h.wait_until(lambda: bus.name_has_owner('org.a11y.atspi.Registry'), 20,
                     'at-spi2-registryd on the accessibility bus')
        bus.close()

    def env_for(self, user):
        e = {'PATH': '/usr/sbin:/usr/bin:/sbin:/bin', 'LANG': 'C.UTF-8', 'DISPLAY': self.display,
             'AT_SPI_BUS_ADDRESS': self.a11y_address,
             # until the user's own session bus runs: none
             'DBUS_SESSION_BUS_ADDRESS': 'unix:path=' + os.path.join(self.dir, 'no-session-bus')}
        home = os.path.join(self.dir, 'home-' + (user or 'root'))
        os.makedirs(home, mode=0o700, exist_ok=True)
        if user:
            uid, gid = h.ensure_user(user)
            os.chown(home, uid, gid)
        e.update(HOME=home, XDG_RUNTIME_DIR=home, XDG_CACHE_HOME=home, XDG_CONFIG_HOME=home)
        return e

    def start_session_bus(self, user):
        """The user's session bus, as a desktop session has (GTK's accessibility objects live
        under the application's path there)."""
        e = self.env_for(user)
        address = 'unix:path=' + os.path.join(e['HOME'], 'session-bus')
        with open(self.log, 'ab') as logf:
            bus = h.spawn(h.setpriv_argv(user) + ['dbus-daemon', '--session', '--nofork', '--print-address',
                                                  '--address=' + address], stdout=subprocess.PIPE, stderr=logf,
                          env=e)
        ready, _, _ = select.select([bus.stdout], [], [], 10)
        line = bus.stdout.readline().decode().strip() if ready else ''
        if not line.startswith('unix:'):
            raise AssertionError('the session bus of %s did not start (%r)' % (user, line))
        self.session_buses = getattr(self, 'session_buses', []) + [bus]
        return line

    def start_monitor(self, user):
        session = self.start_session_bus(user)
        e = self.env_for(user)
        e['DBUS_SESSION_BUS_ADDRESS'] = session
        e.update(GTK_A11Y='atspi', GDK_BACKEND='x11', GSK_RENDERER='cairo', GTK_THEME='Adwaita',
                 DBUS_SYSTEM_BUS_ADDRESS=self.env.bus.address)
        self.monitor = self._spawn(h.setpriv_argv(user) + [MONITOR], log=self.monitor_log, env=e)
        return self.monitor

    def screenshot(self, path, crop=None):
        if self.display is None:
            return None
        r = h.run(['import', '-display', self.display, '-window', 'root'] + (['-crop', crop, '+repage'] if crop else [])
                  + [path], check=False, timeout=60)
        return path if r.returncode == 0 else None


class PolkitCalls:
    """Records the daemon's CheckAuthorization calls on the bus (root may BecomeMonitor), to see
    whether the window's calls allowed interactive authorization (the daemon passes it on as
    flags=1). Messages arrive while the harness client pumps the main loop (client.wait_for)."""

    def __init__(self, client):
        self.calls = []
        self.conn = h.dbus.bus.BusConnection(client.address, mainloop=h.DBusGMainLoop())
        self.conn.add_message_filter(self._filter)
        self.conn.call_blocking('org.freedesktop.DBus', '/org/freedesktop/DBus', 'org.freedesktop.DBus.Monitoring',
                                'BecomeMonitor', 'asu',
                                (["type='method_call',interface='org.freedesktop.PolicyKit1.Authority',"
                                  "member='CheckAuthorization'"], h.dbus.UInt32(0)))

    def _filter(self, conn, msg):
        if msg.get_member() == 'CheckAuthorization':
            self.calls.append(h.unwrap(msg.get_args_list()))

    def close(self):
        self.conn.close()


# ---- reading and driving the accessibility tree

def children(node):
    try:
        return [c for c in node if c is not None]
    except Exception:  # noqa: BLE001 - a node that went away has no children
        return []


def find_all(node, pred, depth=0):
    out = []
    if depth > 40:
        return out
    for c in children(node):
        try:
            if pred(c):
                out.append(c)
        except Exception:  # noqa: BLE001 - gone meanwhile
            continue
        out += find_all(c, pred, depth + 1)
    return out


def dump(node, depth=0):
    lines = []
    for c in children(node):
        try:
            lines.append('%s%s %r' % ('  ' * depth, role(c), c.name))
        except Exception:  # noqa: BLE001
            continue
        if depth < 30:
            lines.append(dump(c, depth + 1))
    return '\n'.join(x for x in lines if x)


def role(node):
    return node.getRoleName()


def text_of(node):
    try:
        t = node.queryText()
        return t.getText(0, t.characterCount)
    except NotImplementedError:
        return node.name or ''


# Exports are for administrators by default; this desktop's user may export its own guests.
EXPORT_RULES = '''
polkit.addRule(function(action, subject) {
        if (action.id == "org.blockstream1.export" && subject.user == "%s" && action.lookup("owner") == subject.user)
                return polkit.Result.YES;
        return polkit.Result.NOT_HANDLED;
});
''' % h.OWNER


class MonitorTest(h.TestCase):
    needs_polkit = True
    polkit_rules = {'60-bstest-monitor-export.rules': EXPORT_RULES}

    @classmethod
    def setUpClass(cls):
        check_desktop_prerequisites()
        h.ensure_test_users()
        super().setUpClass()
        cls.desktop = Desktop(cls.env)
        try:
            cls.desktop.start()
        except BaseException:
            sys.stderr.write(h._tail(cls.desktop.log) + '\n')
            cls.desktop.stop()
            cls.env.close()
            raise
        import pyatspi
        cls.pyatspi = pyatspi

    @classmethod
    def tearDownClass(cls):
        cls.desktop.stop()
        super().tearDownClass()

    def failed(self):
        """On a failure, before the test's cleanups change the window: a screenshot, the
        monitor's log and its accessibility tree."""
        shot = self.desktop.screenshot(os.path.join(os.path.dirname(os.path.abspath(h.BLOCKSTREAMD)), '..',
                                                    'test-monitor-failure-%s.png' % self._testMethodName))
        try:
            tree = dump(self.app(timeout=1))
        except Exception as e:  # noqa: BLE001 - the report goes on without it
            tree = '(no tree: %s)' % e
        sys.stderr.write('screenshot of the failure: %s\n----- monitor log -----\n%s\n----- tree -----\n%s\n'
                         % (shot and os.path.normpath(shot), h._tail(self.desktop.monitor_log, 60), tree))

    # -- helpers
    def app(self, timeout=60):
        def find():
            desktop = self.pyatspi.Registry.getDesktop(0)
            for a in children(desktop):
                if a.name == 'blockstream-monitor':
                    return a
            return None
        return h.wait_until(find, timeout, 'blockstream-monitor on the accessibility bus', interval=0.2)

    def row(self, guest, alias='vda', timeout=60):
        label = '%s/%s' % (guest, alias)
        return h.wait_until(lambda: (find_all(self.app(), lambda n: n.name == label) or [None])[0], timeout,
                            'the row of %s in the window' % label, interval=0.2)

    def widget(self, row, role_name, name=None):
        found = find_all(row, lambda n: role(n) == role_name and (name is None or n.name == name))
        self.assertTrue(found, 'no %s %r in the row' % (role_name, name))
        return found[0]

    def labels(self, row):
        return [text_of(n) for n in find_all(row, lambda n: role(n) == 'label')]

    def label_starting(self, row, prefix):
        for t in self.labels(row):
            if t.startswith(prefix):
                return t
        return None

    def wait_label(self, row, prefix, timeout=30):
        return h.wait_until(lambda: self.label_starting(row, prefix), timeout,
                            'a label "%s…" in the row (labels: %r)' % (prefix, self.labels(row)), interval=0.1)

    def click(self, row, name):
        b = self.widget(row, 'push button', name)
        self.assertIn(self.pyatspi.STATE_SENSITIVE, b.getState().getStates(), 'button %s is not sensitive' % name)
        b.queryAction().doAction(0)

    def open_options(self, row):
        found = find_all(row, lambda n: n.name == 'Pull options' and role(n) == 'push button')
        self.assertTrue(found, 'no "Pull options" expander in the row')
        found[0].queryAction().doAction(0)
        h.wait_until(lambda: find_all(row, lambda n: n.name == 'Bandwidth' and role(n) in ('entry', 'text')), 10,
                     'the pull options to open', interval=0.1)

    def type_into(self, row, name, text):
        found = find_all(row, lambda n: n.name == name and role(n) in ('entry', 'text'))
        self.assertTrue(found, 'no entry %r in the row' % name)
        e = found[0]
        e.queryEditableText().setTextContents(text)
        h.wait_until(lambda: text_of(e) == text, 10, 'the entry %s to hold %r' % (name, text), interval=0.1)

    def wait_status(self, prefix, timeout=30):
        """The window's status line (the first label of the window) starts with prefix."""
        def status():
            for n in find_all(self.app(), lambda n: role(n) == 'label'):
                t = text_of(n)
                if t.startswith(prefix):
                    return t
            return None
        return h.wait_until(status, timeout, 'the status line "%s…"' % prefix, interval=0.2)

    def progress(self, row):
        return self.widget(row, 'progress bar').queryValue().currentValue

    # -- the test
    def test_monitor(self):
        try:
            self.monitor_session()
        except BaseException:
            self.failed()
            raise

    def monitor_session(self):
        users = h.ensure_test_users()
        mine = self.new_guest(size=256 * MiB, options=h.opts(owner=h.U(users[h.OWNER])))
        d = mine.disk()

        self.desktop.start_monitor(h.OWNER)
        row = self.row(mine.name)
        self.wait_label(row, 'State: idle')
        # The allocation map, read when the row appears: the chain's data is still in the backing.
        legend = h.wait_until(lambda: (lambda t: t if t and 'backing' in t else None)(
            self.label_starting(row, 'Allocation:')), 30, 'the allocation map', interval=0.1)
        self.assertNotIn('backing 0.0 %', legend)
        self.assertNotIn('not read', legend)

        # Pull, throttled through the window's own Bandwidth entry.
        self.open_options(row)
        self.type_into(row, 'Bandwidth', BANDWIDTH)
        self.click(row, 'Pull')
        self.wait_label(row, 'State: running')
        d.wait_state('running', timeout=10)
        first = h.wait_until(lambda: self.progress(row) or None, 30, 'the progress bar to move', interval=0.1)
        h.wait_until(lambda: self.progress(row) > first, 30, 'the progress bar to rise past %.3f' % first,
                     interval=0.1)
        self.assertEqual(d.prop('Bandwidth'), 1 * MiB, 'the bandwidth typed in the window was not used')
        if os.environ.get('BLOCKSTREAM_UPDATE_SCREENSHOT') == '1':
            h.wait_until(lambda: self.progress(row) >= 0.1, 120, 'a tenth of the stream', interval=0.2)
            os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
            self.assertTrue(self.desktop.screenshot(SCREENSHOT, crop=WINDOW), 'no screenshot')
            h.log('screenshot mid-stream: %s' % SCREENSHOT)

        # Pause: the window shows it, as does the daemon; Resume; a new bandwidth; then Cancel.
        self.click(row, 'Pause')
        self.wait_label(row, 'State: paused')
        self.assertEqual(d.prop('State'), 'paused')
        self.click(row, 'Resume')
        self.wait_label(row, 'State: running')
        self.type_into(row, 'Bandwidth', '2M')
        self.click(row, 'Set bandwidth')
        self.wait_label(row, 'Set bandwidth: done')
        self.assertEqual(d.prop('Bandwidth'), 2 * MiB)
        h.wait_until(lambda: any('Bandwidth: 2.0 MiB/s' in t for t in self.labels(row)), 10,
                     'the new bandwidth in the row', interval=0.1)
        # The job's engine and the adaptive throttle's view, live; the latency target set from the
        # window beside the bandwidth, and shown once the daemon says it (PropertiesChanged).
        engine = d.prop('Engine')
        self.assertTrue(engine, 'the daemon names no engine for a running job')
        adaptive = self.wait_label(row, 'Engine: %s · ' % engine)
        for part in ('Latency target: ', 'Guest read p99: ', 'Speed limit: ', 'Throttle: '):
            self.assertIn(part, adaptive)
        self.assertNotIn('Latency target: 50.0 ms', adaptive)
        self.type_into(row, 'Latency target', '50ms')
        self.click(row, 'Set latency target')
        self.wait_label(row, 'Set latency target: done')
        self.assertEqual(d.prop('MaxGuestLatency'), 50000)
        h.wait_until(lambda: any('Latency target: 50.0 ms' in t for t in self.labels(row)), 10,
                     'the latency target in the row', interval=0.1)
        # The throttle's reason as the daemon says it now (it moves: wait for the two to agree).
        h.wait_until(lambda: any(t.startswith('Engine: ') and t.endswith('Throttle: %s' % (d.prop('ThrottleReason')
                                                                                          or 'off'))
                                 for t in self.labels(row)), 10, 'the throttle reason in the row', interval=0.1)
        self.click(row, 'Pause')
        self.wait_label(row, 'State: paused')
        paused_at = self.progress(row)
        self.click(row, 'Cancel')
        self.wait_label(row, 'State: cancelled')
        self.wait_label(row, 'The job ended: cancelled')
        self.assertGreaterEqual(self.progress(row), paused_at)
        # The map was read again at the job's end: more of the disk is local now.
        h.wait_until(lambda: (lambda t: t and t != legend and 'not read' not in t)(
            self.label_starting(row, 'Allocation:')), 30, 'the map read again after the job', interval=0.1)

        # Export: the URI is shown (and copyable); Stop export clears it.
        self.click(row, 'Export')
        uri_entry = self.widget(row, 'text', 'Export URI')
        uri = h.wait_until(lambda: (lambda t: t if t.startswith('nbd') else None)(text_of(uri_entry)), 30,
                           'the export URI in the row', interval=0.1)
        exports = [p for p, ifaces in self.client.managed_objects().items() if 'org.blockstream1.Export' in ifaces]
        self.assertEqual([self.client.get(p, 'org.blockstream1.Export', 'URI') for p in exports], [uri])
        self.click(row, 'Copy URI')
        self.wait_label(row, 'The URI is on the clipboard')
        self.click(row, 'Stop export')
        h.wait_until(lambda: text_of(uri_entry) == '', 30, 'the URI to go', interval=0.1)

        # A range: Offset and Length typed, unlimited bandwidth; it completes and the chain stays.
        self.type_into(row, 'Bandwidth', '0')
        self.type_into(row, 'Offset', '1M')
        self.type_into(row, 'Length', '16M')
        self.click(row, 'Pull')
        self.wait_label(row, 'The job ended: completed', timeout=60)
        self.assertEqual((d.prop('Mode'), d.prop('Offset'), d.prop('Length')), ('range', 1 * MiB, 16 * MiB))
        self.assertTrue(d.prop('BackingChain'), 'a range stream dropped the backing chain')
        h.wait_until(lambda: any('Mode: range (16.0 MiB from 1.0 MiB)' in t for t in self.labels(row)), 10,
                     'the range in the row', interval=0.1)

        # A guest that appears while the window is open (root's: the owner may not stream it).
        # Its disk has a name from its manager (disk_names): shown beside the alias.
        theirs = self.new_guest(size=64 * MiB, options=h.opts(disk_names=h.dbus.Dictionary(
            {'vda': 'root'}, signature='ss', variant_level=1)))
        other = self.row(theirs.name)
        self.wait_label(other, 'vda (root)')
        # A polkit refusal: polkit's reason is shown in the row, and nothing started.
        calls = PolkitCalls(self.client)
        self.addCleanup(calls.close)
        self.click(other, 'Pull')
        asked = self.client.wait_for(lambda: [c for c in calls.calls if c[1] == 'org.blockstream1.stream'], 30,
                                     'the daemon to ask polkit about the Pull')
        self.assertEqual(asked[0][3], 1, 'the Pull did not allow interactive authorization: %r' % (asked[0],))
        refusal = self.wait_label(other, 'Pull failed: ')
        self.assertTrue(h.ERR_INTERACTIVE in refusal or h.ERR_ACCESS_DENIED in refusal,
                        'the refusal does not name the D-Bus error: %r' % refusal)
        self.assertEqual(theirs.disk().prop('State'), 'idle')
        self.wait_label(other, 'State: idle')
        # ... and leaves.
        self.client.call(theirs.path, h.IFACE_GUEST, 'Unregister')
        h.wait_until(lambda: not find_all(self.app(), lambda n: n.name == '%s/vda' % theirs.name), 30,
                     'the row of the unregistered guest to go', interval=0.2)

        # The daemon goes away and comes back: shown live, the rows come back.
        self.env.stop_daemon()
        self.wait_status('blockstreamd is not running')
        h.wait_until(lambda: not find_all(self.app(), lambda n: n.name == '%s/vda' % mine.name), 30,
                     'the rows to go with the daemon', interval=0.2)
        self.env.start_daemon()
        self.wait_status('Connected to blockstreamd')
        row = self.row(mine.name)
        state = d.prop('State')
        self.wait_label(row, 'State: %s' % state)
        self.assertIsNone(self.desktop.monitor.poll(), 'the monitor exited')


if __name__ == '__main__':
    h.main()
