#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Integration test harness for blockstreamd.

Everything runs for real: a private dbus-daemon (configured like the system bus, with the
project's bus policy), the blockstreamd binary, qemu-system-x86_64 -S with virtio-blk disks
on a three-image qcow2 chain, qemu-img/qemu-io to make and check the images.

Environment:
  BLOCKSTREAM_SOURCE_ROOT  source tree (default: two levels up from this file)
  BLOCKSTREAMD             daemon binary (default: <root>/build/service/blockstreamd)
  BLOCKSTREAMCTL           CLI binary (default: <root>/build/ctl/blockstreamctl)
  BLOCKSTREAM_TEST_KEEP=1  keep the temporary directories (their paths are printed)

Run with /usr/bin/python3 (Debian's python3-dbus and python3-gi are needed).
"""

import atexit
import contextlib
import ctypes
import fcntl
import functools
import grp
import hashlib
import json
import os
import pwd
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

try:
    import dbus
    import dbus.bus
    from dbus.mainloop.glib import DBusGMainLoop
    from gi.repository import GLib
except ImportError as e:  # pragma: no cover - reported as a clear failure
    sys.stderr.write('harness: cannot import python3-dbus/python3-gi (%s); run with /usr/bin/python3 '
                     'and install python3-dbus python3-gi\n' % e)
    raise

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE_ROOT = os.path.abspath(os.environ.get('BLOCKSTREAM_SOURCE_ROOT') or os.path.dirname(os.path.dirname(HERE)))
BLOCKSTREAMD = os.environ.get('BLOCKSTREAMD') or os.path.join(SOURCE_ROOT, 'build', 'service', 'blockstreamd')
BLOCKSTREAMCTL = os.environ.get('BLOCKSTREAMCTL') or os.path.join(SOURCE_ROOT, 'build', 'ctl', 'blockstreamctl')
HELPER_DIRECTORY = os.path.dirname(os.path.abspath(BLOCKSTREAMD))
# Every daemon runs under the shipped unit's kernel-side restrictions (capabilities, no_new_privs,
# namespace, address-family, set-id, personality and system-call filters: tests/helpers/as-unit.c),
# as systemd would start it: systemd is not PID 1 here.
AS_UNIT = os.environ.get('BLOCKSTREAM_AS_UNIT') or os.path.join(os.path.dirname(HELPER_DIRECTORY), 'tests', 'helpers',
                                                                  'as-unit')
UNIT_FILE = os.path.join(SOURCE_ROOT, 'systemd', 'blockstreamd.service.in')
HELPER_UID_FIRST = 0x7FFF0000     # the daemon's default HelperUIDRange=, 0x7FFF0000-0x7FFFFFFE
HELPER_UID_SPAN = 256
PROBE_UIDS = 8                    # the top of HelperUIDRange=: ProvisionDisk's probes', one each
HELPER_UID_SLOTS = (0x7FFFFFFE - HELPER_UID_FIRST + 1) // HELPER_UID_SPAN
HELPER_UID_LOCK_DIR = '/run/lock/blockstream-test-uids'
BUS_POLICY = os.path.join(SOURCE_ROOT, 'dbus', 'org.blockstream1.conf')
POLKIT_POLICY = os.path.join(SOURCE_ROOT, 'policy', 'org.blockstream1.policy')
POLKIT_RULES = os.path.join(SOURCE_ROOT, 'policy', '50-blockstream.rules')
POLKITD = '/usr/lib/polkit-1/polkitd'
KEEP = os.environ.get('BLOCKSTREAM_TEST_KEEP') == '1'

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
U64_MAX = (1 << 64) - 1

BUS_NAME = 'org.blockstream1'
MANAGER_PATH = '/org/blockstream1'
GUEST_PREFIX = '/org/blockstream1/guest/'
IFACE_MANAGER = 'org.blockstream1.Manager'
IFACE_GUEST = 'org.blockstream1.Guest'
IFACE_STREAM = 'org.blockstream1.BlockStream'
IFACE_PROPS = 'org.freedesktop.DBus.Properties'
IFACE_OM = 'org.freedesktop.DBus.ObjectManager'

ERR_NO_SUCH_GUEST = 'org.blockstream1.Error.NoSuchGuest'
ERR_NO_SUCH_DISK = 'org.blockstream1.Error.NoSuchDisk'
ERR_GUEST_EXISTS = 'org.blockstream1.Error.GuestExists'
ERR_BUSY = 'org.blockstream1.Error.Busy'
ERR_LIMITS_EXCEEDED = 'org.freedesktop.DBus.Error.LimitsExceeded'
ERR_NOT_RUNNING = 'org.blockstream1.Error.NotRunning'
ERR_INVALID_RANGE = 'org.blockstream1.Error.InvalidRange'
ERR_QEMU_FAILED = 'org.blockstream1.Error.QemuFailed'
ERR_HELPER_FAILED = 'org.blockstream1.Error.HelperFailed'
ERR_INVALID_ARGS = 'org.freedesktop.DBus.Error.InvalidArgs'
ERR_NOT_SUPPORTED = 'org.freedesktop.DBus.Error.NotSupported'
ERR_ACCESS_DENIED = 'org.freedesktop.DBus.Error.AccessDenied'
ERR_INTERACTIVE = 'org.freedesktop.DBus.Error.InteractiveAuthorizationRequired'
ERR_UNKNOWN_OBJECT = 'org.freedesktop.DBus.Error.UnknownObject'
ERR_UNKNOWN_METHOD = 'org.freedesktop.DBus.Error.UnknownMethod'

STRANGER = 'bstest-stranger'
OWNER = 'bstest-owner'          # owns guests that root registers for it (option owner)
MEMBER = 'bstest-member'        # member of BLOCKSTREAM_GROUP
BLOCKSTREAM_GROUP = 'blockstream'

DBusGMainLoop(set_as_default=True)


def log(msg):
    sys.stderr.write('[%s] %s\n' % (time.strftime('%H:%M:%S'), msg))
    sys.stderr.flush()


# ---------------------------------------------------------------------------------------------
# Child processes: every one is tracked and killed at the end, whatever happens.

_children = []
_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _die_with_parent():
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def spawn(argv, **kw):
    """Popen that dies with us (PR_SET_PDEATHSIG) and is killed at exit."""
    kw.setdefault('stdin', subprocess.DEVNULL)
    p = subprocess.Popen(argv, preexec_fn=_die_with_parent, **kw)
    _children.append(p)
    return p


def _kill_all_children():
    for p in _children:
        if p.poll() is None:
            try:
                p.kill()
                p.wait(5)
            except Exception:
                pass


atexit.register(_kill_all_children)


def _on_sigterm(signum, frame):
    # meson's timeout sends SIGTERM: turn it into an exit so cleanups and atexit run.
    raise SystemExit('terminated by signal %d' % signum)


signal.signal(signal.SIGTERM, _on_sigterm)


def run(argv, check=True, timeout=120, **kw):
    """Run a command; on failure with check=True raise with its output."""
    kw.setdefault('stdin', subprocess.DEVNULL)
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                       timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError('command failed (exit %d): %s\nstdout: %s\nstderr: %s'
                             % (r.returncode, ' '.join(argv), r.stdout, r.stderr))
    return r


def wait_until(pred, timeout, what, interval=0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError('timed out after %.1fs waiting for %s' % (timeout, what))
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------
# Prerequisites: missing ones are failures with a clear message, never silent skips.

def check_prerequisites(daemon=True, cli=False, polkit=False):
    problems = []
    if os.geteuid() != 0:
        problems.append('the integration tests must run as root (the daemon owns a system-bus name '
                        'and the tests switch to an unprivileged user)')
    for tool in ('qemu-system-x86_64', 'qemu-img', 'qemu-io', 'dbus-daemon', 'setpriv', 'useradd'):
        if shutil.which(tool) is None:
            problems.append('%s not found (apt-get install qemu-system-x86 qemu-utils dbus-daemon '
                            'util-linux passwd)' % tool)
    if not os.path.exists(BUS_POLICY):
        problems.append('bus policy %s not found (set BLOCKSTREAM_SOURCE_ROOT)' % BUS_POLICY)
    if daemon and not os.access(BLOCKSTREAMD, os.X_OK):
        problems.append('daemon binary %s not found or not executable (build it: meson setup build '
                        '&& ninja -C build, or set BLOCKSTREAMD)' % BLOCKSTREAMD)
    if polkit:
        if not os.access(POLKITD, os.X_OK):
            problems.append('%s not found (apt-get install polkitd)' % POLKITD)
        for tool in ('unshare', 'mount', 'groupadd', 'usermod'):
            if shutil.which(tool) is None:
                problems.append('%s not found (apt-get install util-linux mount passwd)' % tool)
        for f in (POLKIT_POLICY, POLKIT_RULES):
            if not os.path.exists(f):
                problems.append('%s not found (set BLOCKSTREAM_SOURCE_ROOT)' % f)
    if cli and not os.access(BLOCKSTREAMCTL, os.X_OK):
        problems.append('CLI binary %s not found or not executable (set BLOCKSTREAMCTL)' % BLOCKSTREAMCTL)
    if problems:
        raise AssertionError('integration test prerequisites missing:\n  ' + '\n  '.join(problems))


# ---------------------------------------------------------------------------------------------
# D-Bus values

def unwrap(v):
    """dbus-python values to plain Python ones."""
    if isinstance(v, dbus.Boolean):
        return bool(v)
    if isinstance(v, (dbus.String, dbus.ObjectPath, dbus.Signature)):
        return str(v)
    if isinstance(v, (dbus.Byte, dbus.Int16, dbus.UInt16, dbus.Int32, dbus.UInt32, dbus.Int64,
                      dbus.UInt64)):
        return int(v)
    if isinstance(v, dbus.Double):
        return float(v)
    if isinstance(v, dbus.Dictionary):
        return {unwrap(k): unwrap(x) for k, x in v.items()}
    if isinstance(v, dbus.Struct):
        return tuple(unwrap(x) for x in v)
    if isinstance(v, (dbus.Array, list)):
        return [unwrap(x) for x in v]
    if isinstance(v, tuple):
        return tuple(unwrap(x) for x in v)
    return v


def opts(**kw):
    """a{sv} from typed values: opts(bandwidth=T(4*MiB), base=S('/x'))."""
    return dbus.Dictionary(kw, signature='sv')


def T(x):
    return dbus.UInt64(x)


def U(x):
    return dbus.UInt32(x)


def S(x):
    return dbus.String(x)


def no_opts():
    return dbus.Dictionary({}, signature='sv')


def path_escape(s):
    """sd_bus_path_encode()'s label escaping."""
    if s == '':
        return '_'
    out = []
    for i, b in enumerate(s.encode()):
        c = chr(b)
        if (c.isascii() and c.isalpha()) or (i > 0 and c.isascii() and c.isdigit()):
            out.append(c)
        else:
            out.append('_%02x' % b)
    return ''.join(out)


def guest_path(name):
    return GUEST_PREFIX + path_escape(name)


def disk_path(guest, alias):
    return guest_path(guest) + '/' + path_escape(alias)


class DBusError(Exception):
    def __init__(self, name, message):
        super().__init__('%s: %s' % (name, message))
        self.name = name
        self.message = message


class Client:
    """A dbus-python connection to the private bus, recording every signal it sees."""

    def __init__(self, address):
        self.address = address
        self.conn = dbus.bus.BusConnection(address, mainloop=DBusGMainLoop())
        self.signals = []
        self.conn.add_signal_receiver(self._on_signal, path_keyword='path', interface_keyword='iface',
                                      member_keyword='member', sender_keyword='sender')
        self.ctx = GLib.MainContext.default()

    def close(self):
        try:
            self.conn.close()
        except Exception:
            pass

    def _on_signal(self, *args, path=None, iface=None, member=None, sender=None):
        self.signals.append({'t': time.monotonic(), 'path': str(path), 'iface': str(iface),
                             'member': str(member), 'sender': str(sender), 'args': unwrap(list(args))})

    # -- main loop
    def pump(self, seconds=0.0):
        """Dispatch pending messages, for at least `seconds`."""
        deadline = time.monotonic() + seconds
        while True:
            while self.ctx.pending():
                self.ctx.iteration(False)
            if time.monotonic() >= deadline:
                return
            time.sleep(min(0.01, max(0.0, deadline - time.monotonic())))

    def wait_for(self, pred, timeout, what, interval=0.05):
        deadline = time.monotonic() + timeout
        last = None
        while True:
            self.pump()
            last = pred()
            if last:
                return last
            if time.monotonic() > deadline:
                raise AssertionError('timed out after %.1fs waiting for %s' % (timeout, what))
            self.pump(interval)

    # -- calls
    def call(self, path, iface, member, sig='', *args, timeout=60, dest=BUS_NAME):
        try:
            r = self.conn.call_blocking(dest, path, iface, member, sig, args, timeout=timeout)
        except dbus.exceptions.DBusException as e:
            raise DBusError(e.get_dbus_name(), e.get_dbus_message()) from None
        finally:
            self.pump()
        return unwrap(r)

    def try_call(self, path, iface, member, sig='', *args, timeout=60):
        """(result, None) on success, (None, DBusError) on failure."""
        try:
            return self.call(path, iface, member, sig, *args, timeout=timeout), None
        except DBusError as e:
            return None, e

    def get(self, path, iface, prop):
        return self.call(path, IFACE_PROPS, 'Get', 'ss', iface, prop)

    def get_all(self, path, iface):
        return self.call(path, IFACE_PROPS, 'GetAll', 's', iface)

    def managed_objects(self):
        return self.call(MANAGER_PATH, IFACE_OM, 'GetManagedObjects')

    def name_has_owner(self, name=BUS_NAME):
        return bool(self.conn.name_has_owner(name))

    def name_owner(self, name=BUS_NAME):
        try:
            return str(self.conn.get_name_owner(name))
        except dbus.exceptions.DBusException:
            return None

    def wait_prop(self, path, iface, prop, expect, timeout=20):
        """Wait until the property equals `expect` (or satisfies it, if callable); return the value."""
        box = {}

        def check():
            try:
                box['v'] = self.get(path, iface, prop)
            except DBusError as e:
                box['v'] = e
                return False
            return expect(box['v']) if callable(expect) else box['v'] == expect
        try:
            self.wait_for(check, timeout, '%s.%s on %s to become %s' % (iface, prop, path, expect))
        except AssertionError as e:
            raise AssertionError('%s (last value: %r)' % (e, box.get('v'))) from None
        return box['v']

    # -- signals
    def signals_of(self, member, path=None, iface=None, since=0.0):
        return [s for s in self.signals if s['member'] == member and (path is None or s['path'] == path)
                and (iface is None or s['iface'] == iface) and s['t'] >= since]

    def finished(self, path, since=0.0):
        return [tuple(s['args']) for s in self.signals_of('Finished', path, IFACE_STREAM, since)]

    def wait_finished(self, path, timeout=60, since=0.0):
        self.wait_for(lambda: self.finished(path, since), timeout, 'Finished on %s' % path)
        return self.finished(path, since)[0]

    def props_changed(self, path, iface=None, since=0.0):
        """[(t, changed dict, invalidated list)] for PropertiesChanged on path."""
        out = []
        for s in self.signals_of('PropertiesChanged', path, IFACE_PROPS, since):
            if iface is None or s['args'][0] == iface:
                out.append((s['t'], s['args'][1], s['args'][2]))
        return out


# ---------------------------------------------------------------------------------------------
# The private bus

BUS_CONF = '''<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <auth>EXTERNAL</auth>
  <listen>unix:path={socket}</listen>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Containers1"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"
          send_member="UpdateActivationEnvironment"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Debug.Stats"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.systemd1.Activator"/>
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>
  <include>{policy}</include>
  <includedir>/usr/share/dbus-1/system.d</includedir>
</busconfig>
'''


class Bus:
    def __init__(self, env):
        self.env = env
        self.socket = os.path.join(env.dir, 'bus')
        self.conf = os.path.join(env.dir, 'bus.conf')
        self.log = os.path.join(env.dir, 'dbus-daemon.log')
        self.address = 'unix:path=' + self.socket
        self.proc = None

    def start(self):
        with open(self.conf, 'w') as f:
            f.write(BUS_CONF.format(socket=self.socket, policy=BUS_POLICY))
        logf = open(self.log, 'ab')
        self.proc = spawn(['dbus-daemon', '--config-file=' + self.conf, '--nofork', '--print-address'],
                          stdout=subprocess.PIPE, stderr=logf)
        logf.close()
        r, _, _ = select.select([self.proc.stdout], [], [], 10)
        line = self.proc.stdout.readline().decode().strip() if r else ''
        if not line.startswith('unix:'):
            self.proc.kill()
            raise AssertionError('dbus-daemon did not start (printed %r); log:\n%s' % (line, _tail(self.log)))
        # Let unprivileged test users connect too.
        os.chmod(self.socket, 0o777)
        return self.address

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# ---------------------------------------------------------------------------------------------
# The daemon

_SYSCALL_GROUPS = {}


def _syscall_group(name):
    """The system calls of one SystemCallFilter= item: a name, or a @group expanded (recursively)
    by systemd-analyze, as systemd itself expands it."""
    if not name.startswith('@'):
        return {name}
    if name not in _SYSCALL_GROUPS:
        out = subprocess.run(['systemd-analyze', 'syscall-filter', name], check=True, capture_output=True,
                             text=True).stdout
        calls = set()
        for line in out.splitlines()[1:]:
            item = line.strip()
            if item and not item.startswith('#'):
                calls |= _syscall_group(item)
        _SYSCALL_GROUPS[name] = calls
    return _SYSCALL_GROUPS[name]


@functools.lru_cache(maxsize=None)
def unit_syscalls(unit=None):
    """What the unit's SystemCallFilter= lines allow: the union of its allow-lists less its deny-lists
    (read once per unit file: every daemon start asks)."""
    allowed, denied = set(), set()
    with open(unit or UNIT_FILE) as f:
        for line in f:
            if not line.startswith('SystemCallFilter='):
                continue
            value = line.split('=', 1)[1].strip()
            # systemd reads the lines in order (the first sets allow or deny mode, an empty one
            # resets, "~name:ERRNO" keeps a call with its own errno): what this does not model
            # fails here rather than differ from systemd unseen.
            if not value or ':' in value or (not allowed and value.startswith('~')):
                raise AssertionError('unit_syscalls() does not model SystemCallFilter=%s' % value)
            target = denied if value.startswith('~') else allowed
            for item in value.lstrip('~').split():
                target |= _syscall_group(item)
    if not allowed:
        raise AssertionError('%s has no SystemCallFilter= allow-list' % (unit or UNIT_FILE))
    return tuple(sorted(allowed - denied))


class Daemon:
    def __init__(self, env, config_extra=''):
        self.env = env
        self.conf = os.path.join(env.dir, 'blockstreamd.conf')
        self.state_dir = os.path.join(env.dir, 'state')
        self.runtime_dir = os.path.join(env.dir, 'run')
        self.log = os.path.join(env.dir, 'blockstreamd.log')
        self.proc = None
        self.starts = 0
        with open(self.conf, 'w') as f:
            f.write('# written by the blockstreamd integration tests\n')
            f.write('ImageDirectories=%s\n' % env.images)
            # Its helpers (blockstream-pull, blockstream-nbd-relay) are built beside it.
            f.write('HelperDirectory=%s\n' % HELPER_DIRECTORY)
            # Helper uids of this daemon only (env.helper_uid_first()). A config_extra with
            # HelperUIDRange= (inside that slot) comes later and wins.
            first = env.helper_uid_first()
            f.write('HelperUIDRange=%d-%d\n' % (first, first + HELPER_UID_SPAN - 1))
            f.write(config_extra)

    def argv(self):
        if not os.access(AS_UNIT, os.X_OK):
            raise AssertionError('%s is missing: build the project first (ninja -C build)' % AS_UNIT)
        return [AS_UNIT, '--syscalls=' + ','.join(unit_syscalls()), UNIT_FILE, BLOCKSTREAMD,
                '--config=' + self.conf, '--state-dir=' + self.state_dir, '--runtime-dir=' + self.runtime_dir]

    def start(self, timeout=60):
        assert self.proc is None or self.proc.poll() is not None, 'daemon already running'
        self.starts += 1
        with open(self.log, 'ab') as logf:
            logf.write(('\n===== harness: start #%d at %s: %s\n' % (
                self.starts, time.strftime('%H:%M:%S'), ' '.join(self.argv()))).encode())
            logf.flush()
            # Tests read the debug log; benchmarks ask for a production daemon's (benchlib.py).
            env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=self.env.bus.address,
                       BLOCKSTREAM_LOG_LEVEL=os.environ.get('BLOCKSTREAM_DAEMON_LOG_LEVEL', 'debug'))
            self.proc = spawn(self.argv(), stdout=logf, stderr=logf, env=env)
        client = self.env.client
        deadline = time.monotonic() + timeout
        while not client.name_has_owner():
            if self.proc.poll() is not None:
                raise AssertionError('blockstreamd exited with status %s before owning %s; log:\n%s'
                                     % (self.proc.returncode, BUS_NAME, _tail(self.log)))
            if time.monotonic() > deadline:
                raise AssertionError('blockstreamd did not own %s within %ds; log:\n%s'
                                     % (BUS_NAME, timeout, _tail(self.log)))
            time.sleep(0.05)
        client.pump()
        return self.proc

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def helper_uids(self):
        """HelperUIDRange= of its config (the last line wins): (first, last)."""
        with open(self.conf) as f:
            line = [ln for ln in f if ln.startswith('HelperUIDRange=')][-1]
        lo, hi = [int(x) for x in line.split('=', 1)[1].split('-')]
        return lo, hi

    def stop(self, sig=signal.SIGTERM, timeout=10):
        """Send `sig`, wait for the exit and for the bus name to go; return the exit status."""
        if not self.running():
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError('blockstreamd did not exit within %ds of signal %d' % (timeout, sig))
        client = self.env.client
        if client is not None:
            wait_until(lambda: not client.name_has_owner(), 5, 'the bus name to be released')
            client.pump()
        return rc

    def kill(self):
        return self.stop(signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# QMP and QEMU

class QMPError(Exception):
    def __init__(self, cls, desc):
        super().__init__('%s: %s' % (cls, desc))
        self.cls = cls
        self.desc = desc


class QMP:
    """A small synchronous QMP client (the test's own monitor)."""

    def __init__(self, path, timeout=30):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b''
        self.events = []
        self.next_id = 0
        greeting = self._recv()
        if 'QMP' not in greeting:
            raise AssertionError('no QMP greeting on %s: %r' % (path, greeting))
        self.cmd('qmp_capabilities')

    def close(self):
        try:
            self.sock.close()
        except Exception:
            pass

    def _recv(self):
        while b'\n' not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError('QMP connection %s closed' % self.path)
            self.buf += data
        line, self.buf = self.buf.split(b'\n', 1)
        return json.loads(line)

    def cmd(self, name, args=None, **kw):
        a = dict(args or {})
        a.update(kw)
        self.next_id += 1
        msg = {'execute': name, 'id': 'test-%d' % self.next_id}
        if a:
            msg['arguments'] = a
        self.sock.sendall(json.dumps(msg).encode() + b'\n')
        while True:
            m = self._recv()
            if 'event' in m:
                self.events.append(m)
                continue
            if m.get('id') != msg['id']:
                continue
            if 'error' in m:
                raise QMPError(m['error'].get('class'), m['error'].get('desc'))
            return m.get('return')

    def poll_events(self, timeout=0.0):
        self.sock.settimeout(timeout if timeout > 0 else 0.001)
        try:
            while True:
                self.events.append(self._recv())
        except (socket.timeout, BlockingIOError):
            pass
        finally:
            self.sock.settimeout(30)

    def hmp(self, line):
        return self.cmd('human-monitor-command', {'command-line': line})

    def jobs(self):
        return self.cmd('query-block-jobs')

    def named_nodes(self):
        return self.cmd('query-named-block-nodes')

    def block_graph(self):
        """{node name: (driver, file, backing file, read-only)} of query-named-block-nodes, refusing
        to ask while a job is concluded but not dismissed (QEMU 7.2 crashes then, see below)."""
        concluded = [j for j in self.cmd('query-jobs') if j.get('status') == 'concluded']
        if concluded:
            raise AssertionError('not asking query-named-block-nodes while a job is concluded (QEMU 7.2 '
                                 'crashes): %r' % concluded)
        return {n.get('node-name'): (n.get('drv'), n.get('file'), n.get('backing_file'), n.get('ro'))
                for n in self.named_nodes()}

    def node_of_file(self, path):
        """Node name of the format node whose image file is `path`.

        Beware: QEMU 7.2 segfaults on query-named-block-nodes while a stream job is concluded
        but not yet dismissed (completed or cancelled, auto-dismiss false). Checked here:
        block-stream, wait for "concluded", query-named-block-nodes -> SIGSEGV."""
        for n in self.named_nodes():
            if n.get('file') == path and n.get('drv') not in ('file', 'host_device'):
                return n['node-name']
        raise AssertionError('no block node for %s in QEMU' % path)


class Qemu:
    """qemu-system-x86_64 -S with virtio-blk disks and two QMP monitors. With user: run as that
    user (setpriv), who then owns its directory (and so its sockets) and its top images."""

    def __init__(self, env, name, disks, extra_args=(), user=None):
        self.env = env
        self.name = name
        self.disks = list(disks)       # [(alias, image path)]
        self.dir = os.path.join(env.dir, 'qemu-' + name)
        self.user = user
        os.makedirs(self.dir, exist_ok=True)
        if user is not None:
            uid, gid = ensure_user(user)
            os.chown(self.dir, uid, gid)
            for _, path in self.disks:
                os.chown(path, uid, gid)
        self.daemon_socket = os.path.join(self.dir, 'qmp-daemon.sock')
        self.test_socket = os.path.join(self.dir, 'qmp-test.sock')
        self.log = os.path.join(self.dir, 'qemu.log')
        self.extra_args = list(extra_args)
        self.proc = None
        self.qmp = None

    def argv(self):
        a = ['qemu-system-x86_64', '-S', '-no-user-config', '-nodefaults', '-display', 'none',
             '-machine', 'q35,accel=kvm:tcg', '-m', '128']
        for i, (alias, path) in enumerate(self.disks):
            a += ['-blockdev', 'driver=file,filename=%s,node-name=file%d' % (path, i),
                  '-blockdev', 'driver=qcow2,file=file%d,node-name=disk%d' % (i, i),
                  '-device', 'virtio-blk-pci,drive=disk%d,id=%s' % (i, alias)]
        a += ['-qmp', 'unix:%s,server=on,wait=off' % self.daemon_socket,
              '-qmp', 'unix:%s,server=on,wait=off' % self.test_socket]
        return (setpriv_argv(self.user) if self.user is not None else []) + a + self.extra_args

    def start(self, timeout=30):
        with open(self.log, 'ab') as logf:
            self.proc = spawn(self.argv(), stdout=logf, stderr=logf)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError('QEMU exited with status %s; log:\n%s'
                                     % (self.proc.returncode, _tail(self.log)))
            if os.path.exists(self.test_socket) and os.path.exists(self.daemon_socket):
                try:
                    self.qmp = QMP(self.test_socket)
                    break
                except (ConnectionRefusedError, FileNotFoundError):
                    pass
            if time.monotonic() > deadline:
                raise AssertionError('QEMU QMP sockets did not appear; log:\n%s' % _tail(self.log))
            time.sleep(0.05)
        return self

    def _qemu_io(self, alias, cmd, expect):
        """HMP qemu-io on the device's backend, as the guest's own I/O would go. Its output goes
        to QEMU's stdout (our log file), not to the monitor: look for `expect` there."""
        start = os.path.getsize(self.log)
        out = self.qmp.hmp('qemu-io -d /machine/peripheral/%s/virtio-backend "%s"' % (alias, cmd))
        if out.strip():
            raise AssertionError('qemu-io %r on %s: %s' % (cmd, alias, out))
        deadline = time.monotonic() + 5
        while True:
            with open(self.log, 'rb') as f:
                f.seek(start)
                text = f.read().decode(errors='replace')
            if expect in text or 'failed' in text:
                return expect in text and 'failed' not in text, text
            if time.monotonic() > deadline:
                return False, text
            time.sleep(0.02)

    def guest_write(self, alias, pattern, offset, length):
        """A write as the guest would issue it."""
        cmd = 'write -P 0x%02x %d %d' % (pattern, offset, length)
        ok, text = self._qemu_io(alias, cmd, 'wrote %d/%d bytes at offset %d' % (length, length, offset))
        if not ok:
            raise AssertionError('guest write %r on %s failed: %s' % (cmd, alias, text))

    def guest_read(self, alias, pattern, offset, length):
        """True if the guest reads `pattern` over the range."""
        cmd = 'read -P 0x%02x %d %d' % (pattern, offset, length)
        ok, text = self._qemu_io(alias, cmd, 'read %d/%d bytes at offset %d' % (length, length, offset))
        return ok

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig=signal.SIGKILL):
        if self.running():
            self.proc.send_signal(sig)
            self.proc.wait(10)
        if self.qmp:
            self.qmp.close()
            self.qmp = None

    def quit(self, timeout=30):
        """Clean shutdown through QMP (flushes the images)."""
        if not self.running():
            return
        try:
            self.qmp.cmd('quit')
        except (EOFError, OSError):
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError('QEMU did not quit within %ds' % timeout)
        self.qmp.close()
        self.qmp = None


# ---------------------------------------------------------------------------------------------
# Images

def qemu_img(*args, check=True):
    return run(['qemu-img'] + list(args), check=check)


def qemu_io(path, cmd, fmt='qcow2', readonly=False, check=True):
    a = ['qemu-io', '-f', fmt]
    if readonly:
        a.append('-r')
    return run(a + ['-c', cmd, path], check=check)


def image_info(path, force_share=True):
    a = ['info', '--output=json']
    if force_share:
        a.append('-U')
    return json.loads(qemu_img(*(a + [path])).stdout)


def image_backing(path):
    """The backing file name recorded in the image's header, or None."""
    return image_info(path).get('backing-filename')


def image_check(path):
    """(exit status, output) of qemu-img check: 0 clean, 2 corrupt, 3 leaks only."""
    r = qemu_img('check', '-f', 'qcow2', path, check=False)
    return r.returncode, r.stdout + r.stderr


def image_locked(path):
    """Does any process hold a lock on the image? (QEMU takes OFD locks on bytes of its images
    while it has them open.) Asked in-process, so no spawn delays the answer."""
    import fcntl
    import struct
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        # struct flock on x86_64: l_type, l_whence, l_start, l_len (0: to the end), l_pid.
        req = struct.pack('@hhqqi4x', fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        typ = struct.unpack('@hhqqi4x', fcntl.fcntl(fd, fcntl.F_OFD_GETLK, req))[0]
        return typ != fcntl.F_UNLCK
    finally:
        os.close(fd)


def image_compare(path, ref):
    """(exit status, output) of qemu-img compare against a raw reference: 0 identical."""
    r = qemu_img('compare', '-f', 'qcow2', '-F', 'raw', path, ref, check=False)
    return r.returncode, r.stdout + r.stderr


def image_map(path):
    """qemu-img map of the chain at `path`: [{start, length, depth, data, zero, present}]."""
    return json.loads(qemu_img('map', '--output=json', '-U', '-f', 'qcow2', path).stdout)


def depths_in(path, offset, length):
    """The set of depths (0 = the top image) that hold [offset, offset+length) of the chain."""
    out = set()
    for e in image_map(path):
        if e['start'] < offset + length and e['start'] + e['length'] > offset:
            out.add(e['depth'] if e.get('present', True) else None)
    return out


def read_matches(path, pattern, offset, length, fmt='qcow2'):
    r = qemu_io(path, 'read -P 0x%02x %d %d' % (pattern, offset, length), fmt=fmt, readonly=True, check=False)
    return r.returncode == 0 and 'Pattern verification failed' not in r.stdout + r.stderr


class Chain:
    """base.qcow2 <- mid.qcow2 <- top.qcow2 with known patterns, plus a raw reference copy.

    With u = size/256 (1 MiB for 256 MiB images):
      base: 0x11 over [0, 64u), 0x12 over [176u, 192u)
      mid:  0x22 over [64u, 96u), 0x24 over [32u, 40u) (hides base), zeros over [48u, 52u)
      top:  0x33 over [128u, 144u), 0x35 over [36u, 38u) (hides mid), 0x36 over [80u, 82u)
    Data that a full stream must copy: [0, 96u) except the top's bits, and [176u, 192u).
    """

    def __init__(self, directory, size=256 * MiB, prefix=''):
        assert size % (256 * 64 * KiB) == 0, 'size must be a multiple of 16 MiB'
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        self.size = size
        self.u = u = size // 256
        self.base = os.path.join(directory, prefix + 'base.qcow2')
        self.mid = os.path.join(directory, prefix + 'mid.qcow2')
        self.top = os.path.join(directory, prefix + 'top.qcow2')
        self.ref = os.path.join(directory, prefix + 'ref.raw')
        self.layers = {
            self.base: [('P', 0x11, 0, 64 * u), ('P', 0x12, 176 * u, 16 * u)],
            self.mid: [('P', 0x22, 64 * u, 32 * u), ('P', 0x24, 32 * u, 8 * u), ('Z', 0, 48 * u, 4 * u)],
            self.top: [('P', 0x33, 128 * u, 16 * u), ('P', 0x35, 36 * u, 2 * u), ('P', 0x36, 80 * u, 2 * u)],
        }
        qemu_img('create', '-q', '-f', 'qcow2', self.base, str(size))
        qemu_img('create', '-q', '-f', 'qcow2', '-b', self.base, '-F', 'qcow2', self.mid)
        qemu_img('create', '-q', '-f', 'qcow2', '-b', self.mid, '-F', 'qcow2', self.top)
        for img in (self.base, self.mid, self.top):
            cmds = []
            for kind, pat, off, ln in self.layers[img]:
                cmds += ['-c', ('write -P 0x%02x %d %d' % (pat, off, ln)) if kind == 'P'
                         else ('write -z %d %d' % (off, ln))]
            run(['qemu-io', '-f', 'qcow2'] + cmds + [img])
        self.make_reference()

    def make_reference(self):
        if os.path.exists(self.ref):
            os.unlink(self.ref)
        qemu_img('convert', '-f', 'qcow2', '-O', 'raw', self.top, self.ref)

    def apply_to_reference(self, pattern, offset, length):
        """Mirror a guest write into the reference."""
        qemu_io(self.ref, 'write -P 0x%02x %d %d' % (pattern, offset, length), fmt='raw')

    @property
    def backing_files(self):
        return [self.mid, self.base]

    @property
    def copy_bytes(self):
        """How much a full stream copies from the backing chain."""
        return (96 - 4 + 16) * self.u

    def compare(self):
        return image_compare(self.top, self.ref)


# ---------------------------------------------------------------------------------------------
# Unprivileged callers

def ensure_user(name=STRANGER):
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        run(['useradd', '-M', '-s', '/usr/sbin/nologin', name])
        pw = pwd.getpwnam(name)
    return pw.pw_uid, pw.pw_gid


def run_as(user, argv, env=None, timeout=60):
    uid, gid = ensure_user(user)
    e = {'PATH': '/usr/sbin:/usr/bin:/sbin:/bin', 'HOME': '/', 'LANG': 'C.UTF-8'}
    e.update(env or {})
    return run(['setpriv', '--reuid=%d' % uid, '--regid=%d' % gid, '--init-groups'] + argv,
               check=False, env=e, timeout=timeout)


_CALL_AS_SNIPPET = r'''
import json, sys, dbus, dbus.bus
req = json.loads(sys.argv[1])
conn = dbus.bus.BusConnection(req["address"])
args = eval(req["args"], {"dbus": dbus})
try:
    r = conn.call_blocking(req["dest"], req["path"], req["iface"], req["member"], req["sig"], args, timeout=30)
    print(json.dumps({"ok": True, "uid": __import__("os").getuid(), "result": repr(r)}))
except dbus.exceptions.DBusException as e:
    print(json.dumps({"ok": False, "uid": __import__("os").getuid(), "error": e.get_dbus_name(),
                      "message": e.get_dbus_message()}))
'''


def call_as(user, address, path, iface, member, sig='', args_expr='()', dest=BUS_NAME):
    """Call a method as another user. args_expr is a Python expression (dbus module in scope).
    Returns {"ok", "uid", "result"|"error","message"}."""
    req = json.dumps({'address': address, 'dest': dest, 'path': path, 'iface': iface, 'member': member,
                      'sig': sig, 'args': args_expr})
    r = run_as(user, ['/usr/bin/python3', '-c', _CALL_AS_SNIPPET, req])
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise AssertionError('call as %s failed to run (exit %d): %s %s' % (user, r.returncode, r.stdout,
                                                                            r.stderr))


def ensure_group(name):
    """gid of group `name`, created (groupadd) when missing."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        run(['groupadd', name])
        return grp.getgrnam(name).gr_gid


def ensure_test_users():
    """The users of the authorization tests: {name: uid}. bstest-member is in group blockstream
    (polkit's subject.isInGroup() reads the group database, not the caller's groups)."""
    ensure_group(BLOCKSTREAM_GROUP)
    out = {}
    for name in (OWNER, MEMBER, STRANGER):
        out[name] = ensure_user(name)[0]
    if MEMBER not in grp.getgrnam(BLOCKSTREAM_GROUP).gr_mem:
        run(['usermod', '-a', '-G', BLOCKSTREAM_GROUP, MEMBER])
    for name in (OWNER, STRANGER):
        if name in grp.getgrnam(BLOCKSTREAM_GROUP).gr_mem:
            raise AssertionError('test user %s must not be in group %s (remove it: gpasswd -d %s %s)'
                                 % (name, BLOCKSTREAM_GROUP, name, BLOCKSTREAM_GROUP))
    return out


def setpriv_argv(user):
    uid, gid = ensure_user(user)
    return ['setpriv', '--reuid=%d' % uid, '--regid=%d' % gid, '--init-groups']


_USER_SESSION_WORKER = r"""
import json, os, sys, time
from gi.repository import Gio, GLib
conn = Gio.DBusConnection.new_for_address_sync(sys.argv[1],
    Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION, None, None)
def emit(d):
    sys.stdout.write(json.dumps(d, default=repr) + "\n")
    sys.stdout.flush()
emit({"ready": True, "uid": os.getuid(), "unique_name": conn.get_unique_name()})
for line in sys.stdin:
    req = json.loads(line)
    params = None
    if req["sig"]:
        params = GLib.Variant.parse(GLib.VariantType.new("(" + req["sig"] + ")"), req["args"], None, None)
    flags = Gio.DBusCallFlags.NO_AUTO_START
    if req.get("interactive"):
        flags |= Gio.DBusCallFlags.ALLOW_INTERACTIVE_AUTHORIZATION
    t0 = time.monotonic()
    try:
        r = conn.call_sync(req["dest"], req["path"], req["iface"], req["member"], params, None, flags,
                           int(req.get("timeout", 30) * 1000), None)
        res = {"ok": True, "result": r.unpack() if r is not None else None,
               "text": r.print_(True) if r is not None else ""}
    except GLib.Error as e:
        name = Gio.DBusError.get_remote_error(e)
        if name:
            Gio.DBusError.strip_remote_error(e)
        res = {"ok": False, "error": name or ("local:" + str(e.domain) + ":" + str(e.code)), "message": e.message}
    res["elapsed"] = time.monotonic() - t0
    res["uid"] = os.getuid()
    emit(res)
"""


class UserSession:
    """A long-lived D-Bus connection of another user (a GDBus client run through setpriv):
    calls are sent one at a time, each optionally with ALLOW_INTERACTIVE_AUTHORIZATION.
    Arguments are in GVariant text format, typed by `sig` ('(0, 0, {})' for 'tta{sv}')."""

    def __init__(self, user, address):
        self.user = user
        self.address = address
        self.proc = spawn(setpriv_argv(user) + ['/usr/bin/python3', '-c', _USER_SESSION_WORKER, address],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env={'PATH': '/usr/sbin:/usr/bin:/sbin:/bin', 'HOME': '/', 'LANG': 'C.UTF-8'})
        hello = self._read(30)
        self.uid = hello['uid']
        self.unique_name = hello['unique_name']

    def _read(self, timeout):
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline().decode() if r else ''
        if not line:
            err = ''
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors='replace')
            raise AssertionError('the D-Bus session of %s did not answer within %ss (exit %s): %s'
                                 % (self.user, timeout, self.proc.poll(), err))
        return json.loads(line)

    def send(self, path, iface, member, sig='', args='()', interactive=False, dest=BUS_NAME, timeout=30):
        """Start a call; receive() returns its answer."""
        req = {'dest': dest, 'path': path, 'iface': iface, 'member': member, 'sig': sig, 'args': args,
               'interactive': interactive, 'timeout': timeout}
        self.proc.stdin.write((json.dumps(req) + '\n').encode())
        self.proc.stdin.flush()

    def receive(self, timeout=40):
        return self._read(timeout)

    def call(self, path, iface, member, sig='', args='()', interactive=False, dest=BUS_NAME, timeout=30):
        """{"ok", "uid", "elapsed", "result"/"text" | "error", "message"}"""
        self.send(path, iface, member, sig, args, interactive, dest, timeout)
        return self._read(timeout + 10)

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(5)
            except Exception:
                self.proc.kill()
                self.proc.wait(5)


class Polkit:
    """polkitd (/usr/lib/polkit-1/polkitd) on the private bus. It runs in a mount namespace of
    its own (unshare -m --propagation private) where temporary directories are bind-mounted over
    /usr/share/polkit-1/actions (the machine's actions plus ours) and over /etc/polkit-1/rules.d
    (our 50-blockstream.rules and a test's own rules) and /usr/share/polkit-1/rules.d (the
    distribution's 50-default.rules only): only polkitd sees them, the machine's own polkit
    configuration is never touched. polkitd drops to the user polkitd by itself, so the
    directories are world-readable.

    extra_rules: {file name: JavaScript} added to the rules directory."""

    ACTIONS = '/usr/share/polkit-1/actions'
    ETC_RULES = '/etc/polkit-1/rules.d'
    USR_RULES = '/usr/share/polkit-1/rules.d'
    DEFAULT_RULES = '/usr/share/polkit-1/rules.d/50-default.rules'

    def __init__(self, env, extra_rules=None):
        self.env = env
        self.dir = os.path.join(env.dir, 'polkit')
        self.actions_dir = os.path.join(self.dir, 'actions')
        self.rules_dir = os.path.join(self.dir, 'etc-rules.d')
        self.usr_rules_dir = os.path.join(self.dir, 'usr-rules.d')
        self.log = os.path.join(env.dir, 'polkitd.log')
        self.extra_rules = dict(extra_rules or {})
        self.proc = None
        self.starts = 0

    def prepare(self):
        for d in (self.dir, self.actions_dir, self.rules_dir, self.usr_rules_dir):
            os.makedirs(d, exist_ok=True)
            os.chmod(d, 0o755)
        for fn in os.listdir(self.ACTIONS):
            if fn.endswith('.policy') and fn != os.path.basename(POLKIT_POLICY):
                shutil.copy(os.path.join(self.ACTIONS, fn), self.actions_dir)
        shutil.copy(POLKIT_POLICY, self.actions_dir)
        shutil.copy(POLKIT_RULES, self.rules_dir)
        # The distribution's rules directory is root:polkitd 0700; read it as root here.
        if os.path.exists(self.DEFAULT_RULES):
            shutil.copy(self.DEFAULT_RULES, self.usr_rules_dir)
        for fn, text in self.extra_rules.items():
            with open(os.path.join(self.rules_dir, fn), 'w') as f:
                f.write(text)
        for d in (self.actions_dir, self.rules_dir, self.usr_rules_dir):
            for fn in os.listdir(d):
                os.chmod(os.path.join(d, fn), 0o644)

    def argv(self):
        script = ('set -e; mount --bind "$1" %s; mount --bind "$2" %s; mount --bind "$3" %s; exec %s --no-debug'
                  % (self.ACTIONS, self.ETC_RULES, self.USR_RULES, POLKITD))
        return ['unshare', '-m', '--propagation', 'private', 'sh', '-c', script, 'polkit-ns',
                self.actions_dir, self.rules_dir, self.usr_rules_dir]

    def start(self, timeout=15):
        assert not self.running(), 'polkitd already running'
        if self.starts == 0:
            self.prepare()
        self.starts += 1
        client = self.env.client
        with open(self.log, 'ab') as logf:
            logf.write(('\n===== harness: polkitd start #%d at %s\n' % (self.starts, time.strftime('%H:%M:%S'))).encode())
            logf.flush()
            env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=self.env.bus.address)
            self.proc = spawn(self.argv(), stdout=logf, stderr=logf, env=env)
        deadline = time.monotonic() + timeout
        while not client.name_has_owner('org.freedesktop.PolicyKit1'):
            if self.proc.poll() is not None:
                raise AssertionError('polkitd exited with status %s before owning org.freedesktop.PolicyKit1; '
                                     'log:\n%s' % (self.proc.returncode, _tail(self.log)))
            if time.monotonic() > deadline:
                raise AssertionError('polkitd did not own org.freedesktop.PolicyKit1 within %ds; log:\n%s'
                                     % (timeout, _tail(self.log)))
            time.sleep(0.05)
        return self.proc

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout=10):
        """Stop polkitd (it runs as user polkitd and outlives PR_SET_PDEATHSIG: stop it by pid) and
        wait until org.freedesktop.PolicyKit1 has no owner."""
        if self.running():
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        client = self.env.client
        if client is not None:
            wait_until(lambda: not client.name_has_owner('org.freedesktop.PolicyKit1'), 5,
                       'org.freedesktop.PolicyKit1 to lose its owner')

    def kill(self):
        return self.stop(signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# The environment of a test class (or of a single test)

def _tail(path, lines=200):
    try:
        with open(path, 'rb') as f:
            data = f.read().decode(errors='replace').splitlines()
    except OSError:
        return '(no %s)' % path
    if len(data) > lines:
        data = ['... (%d lines before)' % (len(data) - lines)] + data[-lines:]
    return '\n'.join(data)


def tree_snapshot(directory):
    """{relative path: sha256 of content (or 'dir')} under directory."""
    out = {}
    if not os.path.isdir(directory):
        return out
    for root, dirs, files in os.walk(directory):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), directory)] = 'dir'
        for fn in files:
            p = os.path.join(root, fn)
            try:
                with open(p, 'rb') as f:
                    out[os.path.relpath(p, directory)] = hashlib.sha256(f.read()).hexdigest()
            except OSError:
                out[os.path.relpath(p, directory)] = 'unreadable'
    return out


class Env:
    def __init__(self, name):
        self.dir = tempfile.mkdtemp(prefix='bst-%s-' % re.sub(r'[^A-Za-z0-9]', '', name)[:20], dir='/tmp')
        os.chmod(self.dir, 0o755)     # unprivileged test users reach the bus socket
        self.images = os.path.join(self.dir, 'images')
        os.makedirs(self.images)
        self.bus = None
        self.client = None
        self.daemon = None
        self.polkit = None
        self.qemus = []
        self.saved_logs = None
        self.closed = False
        self.uid_slot_fds = []
        self.uid_first = None
        if KEEP:
            log('keeping %s' % self.dir)

    def start(self, daemon=True, polkit=False, polkit_rules=None, daemon_config=''):
        """polkit=True: run polkitd on the bus (see Polkit) before the daemon starts;
        daemon_config: lines for its configuration file."""
        self.bus = Bus(self)
        self.bus.start()
        self.client = Client(self.bus.address)
        if polkit:
            self.polkit = Polkit(self, polkit_rules)
            self.polkit.start()
        self.daemon = Daemon(self, daemon_config)
        if daemon:
            self.daemon.start()
        return self

    def helper_uid_first(self, n_uids=HELPER_UID_SPAN):
        """The first of n_uids helper uids that this env's daemon alone uses on this
        machine while the env is open. Each daemon treats its HelperUIDRange= as its own: one
        starting a storage helper SIGKILLs every process of that uid it did not start, which would
        be another test daemon's pull helper (the fleet tests run two daemons; meson runs suites
        side by side); and RLIMIT_NPROC counts a uid's processes machine-wide. A random slot,
        held with an flock (per open file, so also against this process's other envs) until
        close() or our exit (slots of HELPER_UID_SPAN uids, as many in a row as n_uids needs; the
        first call of an env decides)."""
        if self.uid_first is not None:
            return self.uid_first
        os.makedirs(HELPER_UID_LOCK_DIR, exist_ok=True)
        n = -(-n_uids // HELPER_UID_SPAN)
        start = random.randrange(HELPER_UID_SLOTS - n + 1)
        for i in range(HELPER_UID_SLOTS - n + 1):
            first_slot = (start + i) % (HELPER_UID_SLOTS - n + 1)
            fds, got = [], False
            try:
                for slot in range(first_slot, first_slot + n):
                    fds.append(os.open(os.path.join(HELPER_UID_LOCK_DIR, '%d.lock' % slot),
                                       os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
                    fcntl.flock(fds[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
                got = True
            except BlockingIOError:
                pass
            finally:
                if not got:
                    for fd in fds:
                        os.close(fd)
            if got:
                self.uid_slot_fds = fds
                self.uid_first = HELPER_UID_FIRST + first_slot * HELPER_UID_SPAN
                return self.uid_first
        raise AssertionError('no %d free helper uid slots in a row: other test envs hold them' % n)

    def start_daemon(self):
        return self.daemon.start()

    def restart_daemon_with(self, name, value):
        """The daemon stopped and started again with environment variable name=value (a test hook
        of a -Dtest_hooks=true build); this process's environment as it was."""
        self.stop_daemon()
        os.environ[name] = value
        try:
            return self.start_daemon()
        finally:
            del os.environ[name]

    def stop_daemon(self, sig=signal.SIGTERM):
        return self.daemon.stop(sig)

    def kill_daemon(self):
        return self.daemon.kill()

    def new_qemu(self, name, disks, extra_args=(), user=None):
        q = Qemu(self, name, disks, extra_args, user)
        self.qemus.append(q)
        return q.start()

    def log_files(self):
        files = [('blockstreamd', os.path.join(self.dir, 'blockstreamd.log'), 300),
                 ('dbus-daemon', os.path.join(self.dir, 'dbus-daemon.log'), 30)]
        if self.polkit is not None:
            files.append(('polkitd', self.polkit.log, 30))
        for q in self.qemus:
            files.append(('qemu ' + q.name, q.log, 30))
        return files

    def logs_text(self):
        if self.saved_logs is not None:
            return self.saved_logs
        parts = []
        for title, path, n in self.log_files():
            if os.path.exists(path) and os.path.getsize(path) > 0:
                parts.append('----- %s (%s) -----\n%s' % (title, path, _tail(path, n)))
        return '\n'.join(parts)

    def close(self):
        if self.closed:
            return
        self.closed = True
        for q in self.qemus:
            try:
                q.kill()
            except Exception:
                pass
        if self.daemon is not None and self.daemon.running():
            try:
                self.daemon.stop(signal.SIGTERM, timeout=5)
            except Exception:
                try:
                    self.daemon.proc.kill()
                except Exception:
                    pass
        if self.polkit is not None:
            try:
                self.polkit.stop(timeout=5)
            except Exception:
                pass
        if self.client is not None:
            self.client.close()
        if self.bus is not None:
            self.bus.stop()
        self.saved_logs = self.logs_text()
        if not KEEP:
            shutil.rmtree(self.dir, ignore_errors=True)
        for fd in self.uid_slot_fds:
            os.close(fd)                   # the daemon and its helpers are gone: the uids are free
        self.uid_slot_fds = []


# ---------------------------------------------------------------------------------------------
# Test objects

class Disk:
    """Convenience wrapper for a BlockStream object."""

    def __init__(self, client, path):
        self.client = client
        self.path = path

    def prop(self, name):
        return self.client.get(self.path, IFACE_STREAM, name)

    def props(self):
        return self.client.get_all(self.path, IFACE_STREAM)

    def call(self, member, sig='', *args):
        return self.client.call(self.path, IFACE_STREAM, member, sig, *args)

    def try_call(self, member, sig='', *args):
        return self.client.try_call(self.path, IFACE_STREAM, member, sig, *args)

    def start(self, offset=0, length=0, options=None):
        return self.call('Start', 'tta{sv}', T(offset), T(length), options if options is not None else no_opts())

    def cancel(self):
        return self.call('Cancel')

    def pause(self):
        return self.call('Pause')

    def resume(self):
        return self.call('Resume')

    def set_bandwidth(self, bw):
        return self.call('SetBandwidth', 't', T(bw))

    def wait_state(self, state, timeout=30):
        return self.client.wait_prop(self.path, IFACE_STREAM, 'State', state, timeout)

    def wait_bytes_done(self, at_least, timeout=30):
        return self.client.wait_prop(self.path, IFACE_STREAM, 'BytesDone', lambda v: v >= at_least, timeout)

    def finished(self, since=0.0):
        return self.client.finished(self.path, since)

    def wait_finished(self, timeout=60, since=0.0):
        return self.client.wait_finished(self.path, timeout, since)


class Guest:
    def __init__(self, test, name, qemu, chains, path):
        self.test = test
        self.name = name
        self.qemu = qemu
        self.chains = chains        # {alias: Chain}
        self.path = path

    def disk(self, alias='vda'):
        return Disk(self.test.env.client, disk_path(self.name, alias))

    def prop(self, name):
        return self.test.env.client.get(self.path, IFACE_GUEST, name)


_guest_counter = [0]


class TestCase(unittest.TestCase):
    """Base class: a bus + daemon per class (or per test with env_per_test = True)."""

    needs_daemon = True
    needs_cli = False
    needs_polkit = False       # polkitd on the private bus, with our actions and rules (see Polkit)
    polkit_rules = None        # {file name: JavaScript}: a test class's own extra polkit rules
    daemon_config = ''         # lines for the daemon's configuration file (Daemon's config_extra)
    env_per_test = False
    env = None

    @classmethod
    def setUpClass(cls):
        check_prerequisites(daemon=cls.needs_daemon, cli=cls.needs_cli, polkit=cls.needs_polkit)
        if not cls.env_per_test:
            env = Env(cls.__name__)
            try:
                env.start(daemon=cls.needs_daemon, polkit=cls.needs_polkit, polkit_rules=cls.polkit_rules,
                          daemon_config=cls.daemon_config)
            except BaseException:
                sys.stderr.write(env.logs_text() + '\n')
                env.close()
                raise
            cls.env = env

    @classmethod
    @contextlib.contextmanager
    def class_setup(cls):
        """The rest of a setUpClass, after super().setUpClass() (a daemon of its own config, servers
        it needs): a failure inside prints the logs and closes the class's env, which
        tearDownClass would not, as it does not run when setUpClass fails."""
        try:
            yield cls.env
        except BaseException:
            sys.stderr.write(cls.env.logs_text() + '\n')
            cls.env.close()
            cls.env = None
            raise

    @classmethod
    def tearDownClass(cls):
        if cls.env is not None and not cls.env_per_test:
            cls.env.close()

    def setUp(self):
        if self.env_per_test:
            self.env = Env(self._testMethodName)
            self.addCleanup(self.env.close)
            self.env.start(daemon=self.needs_daemon, polkit=self.needs_polkit, polkit_rules=self.polkit_rules,
                           daemon_config=self.daemon_config)

    def run(self, result=None):
        if result is None:
            return super().run(result)
        before = len(result.failures) + len(result.errors)
        r = super().run(result)
        if len(result.failures) + len(result.errors) > before:
            env = self.env
            if env is not None:
                sys.stderr.write('\n===== logs of failed test %s =====\n%s\n===== end of logs =====\n'
                                 % (self.id(), env.logs_text()))
                # A test that failed half-way through a daemon restart leaves the class's shared
                # daemon stopped: start it again, so that one failure does not fail every later
                # test of the class. (After a test that passed, a daemon that is gone is not
                # restarted: the next test fails, which is how an unnoticed crash shows.)
                if (not self.env_per_test and env.daemon is not None and not env.daemon.running()):
                    try:
                        env.daemon.start()
                    except Exception as e:  # noqa: BLE001 - reported, the next test fails anyway
                        sys.stderr.write('could not restart the daemon after the failure: %s\n' % e)
        return r

    # -- helpers
    @property
    def client(self):
        return self.env.client

    @classmethod
    def start_second_daemon(cls, daemon_config):
        """Another bus and daemon on this machine beside the class's (in its class_setup()), with
        daemon_config; closed after the class."""
        env = Env('other')
        cls.addClassCleanup(env.close)
        env.start(daemon_config=daemon_config)
        return env

    def start_daemon_with_helper(self, binary, name):
        """This test's daemon (needs_daemon = False, env_per_test = True), with `binary` (a test
        helper, tests/helpers) in place of its helper `name`: in a HelperDirectory= of its own,
        which wins over the harness's."""
        if not os.path.exists(binary):
            self.fail('%s is not built (ninja -C build)' % binary)
        helpers = os.path.join(self.env.dir, 'helpers-' + name)
        os.makedirs(helpers)
        os.chmod(helpers, 0o755)
        shutil.copy(binary, os.path.join(helpers, name))
        os.chmod(os.path.join(helpers, name), 0o755)
        self.env.daemon = Daemon(self.env, config_extra='HelperDirectory=%s\n' % helpers)
        self.env.daemon.start()

    def unique_name(self, hint=None):
        _guest_counter[0] += 1
        base = re.sub(r'[^A-Za-z0-9_.-]', '-', hint or self._testMethodName.replace('test_', ''))
        return ('%s-%d' % (base[:50], _guest_counter[0]))

    def make_chains(self, aliases=('vda',), size=256 * MiB, subdir=None):
        d = os.path.join(self.env.images, subdir or self.unique_name('img'))
        return {a: Chain(os.path.join(d, a), size) for a in aliases}

    def start_qemu(self, chains, name=None, extra_args=(), user=None):
        q = self.env.new_qemu(name or self.unique_name('q'), [(a, c.top) for a, c in chains.items()],
                              extra_args, user)
        self.addCleanup(q.kill)
        return q

    def register(self, name, socket_path, options=None):
        return self.client.call(MANAGER_PATH, IFACE_MANAGER, 'RegisterGuest', 'ssa{sv}', name, socket_path,
                                options if options is not None else no_opts())

    def try_register(self, name, socket_path, options=None):
        return self.client.try_call(MANAGER_PATH, IFACE_MANAGER, 'RegisterGuest', 'ssa{sv}', name,
                                    socket_path, options if options is not None else no_opts())

    def unregister_quietly(self, name):
        if self.env.daemon is not None and self.env.daemon.running():
            self.client.try_call(MANAGER_PATH, IFACE_MANAGER, 'UnregisterGuest', 's', name, timeout=10)

    def new_guest(self, aliases=('vda',), size=256 * MiB, name=None, options=None, register=True):
        """Chains + QEMU + RegisterGuest; cleaned up at the end of the test."""
        name = name or self.unique_name()
        chains = self.make_chains(aliases, size)
        q = self.start_qemu(chains, name=name)
        path = None
        if register:
            path = self.register(name, q.daemon_socket, options)
            # Cleanups run last-in first-out: this runs before QEMU is killed.
            self.addCleanup(self._drop_guest, name, q)
        return Guest(self, name, q, chains, path)

    def qemu_guest(self, name, qemu_args):
        """A running guest whose QEMU gets qemu_args (its own -blockdev/-drive and -device) in place
        of the harness's disks, registered; unregistered and killed at the end of the test.
        Returns (QEMU, the guest's object path)."""
        q = self.env.new_qemu(name, [], list(qemu_args))
        self.addCleanup(q.kill)
        path = self.register(name, q.daemon_socket)
        self.addCleanup(self._drop_guest, name, q)
        return q, path

    def _drop_guest(self, name, q):
        q.kill()
        if self.env.daemon is not None and self.env.daemon.running():
            try:
                self.client.wait_for(lambda: self.client.try_call(guest_path(name), IFACE_PROPS, 'Get', 'ss',
                                                                  IFACE_GUEST, 'Running')[0] is not True,
                                     3, 'guest to stop running')
            except AssertionError:
                pass
            self.unregister_quietly(name)

    def assertDBusError(self, expected, fn, *args, **kw):
        """fn(*args) must raise DBusError with a name in `expected` (str or collection)."""
        names = {expected} if isinstance(expected, str) else set(expected)
        try:
            r = fn(*args, **kw)
        except DBusError as e:
            self.assertIn(e.name, names, 'expected D-Bus error %s, got %s: %s' % (
                ' or '.join(sorted(names)), e.name, e.message))
            self.assertTrue(e.message and e.message.strip(), 'error %s carries no message' % e.name)
            return e
        self.fail('expected D-Bus error %s, but the call succeeded (returned %r)' % (' or '.join(sorted(names)),
                                                                                      r))

    def snapshot(self, block_graph=False):
        """Everything a client or the disk could see: objects + properties, state dir, QEMU jobs
        (and with block_graph=True QEMU's block nodes, see QMP.block_graph)."""
        self._wait_writer_idle()
        snap = {'objects': self.client.managed_objects(), 'state': tree_snapshot(self.env.daemon.state_dir)}
        jobs = {}
        graphs = {}
        for q in self.env.qemus:
            if q.running() and q.qmp is not None:
                jobs[q.name] = q.qmp.jobs()
                if block_graph:
                    graphs[q.name] = q.qmp.block_graph()
        snap['jobs'] = jobs
        if block_graph:
            snap['graph'] = graphs
        return snap

    def _writer_idle(self):
        """Every thread of the daemon but its main one waits on a futex: the state writer waits
        for work only with none queued (service/state-writer.c)."""
        proc = self.env.daemon.proc if self.env.daemon else None
        if proc is None or proc.poll() is not None:
            return True
        pid = proc.pid
        try:
            tids = [t for t in os.listdir('/proc/%d/task' % pid) if int(t) != pid]
            return all('futex' in open('/proc/%d/task/%s/wchan' % (pid, t)).read() for t in tids)
        except OSError:
            return False

    def _wait_writer_idle(self, timeout=10):
        """Until the state writer has done what it was asked (the calls answered so far queue
        their writes before replying): idle, and no write in progress (no .tmp file)."""
        deadline = time.monotonic() + timeout
        while not (self._writer_idle() and
                   not any('.tmp' in p for p in tree_snapshot(self.env.daemon.state_dir))):
            if time.monotonic() > deadline:
                self.fail('the daemon\'s state writer stayed busy for %d s' % timeout)
            time.sleep(0.01)

    def settled_snapshot(self, quiet=0.5, timeout=30):
        """snapshot() once the daemon's state files have settled: the daemon writes them from a
        thread of its own (service/state-writer.h), after the calls that asked for them have been
        answered. Settled: its writer idle, no write in progress (no .tmp file), and the same
        quiet seconds later."""
        deadline = time.monotonic() + timeout
        last = self.snapshot()
        while True:
            time.sleep(quiet)
            idle = self._writer_idle()
            snap = self.snapshot()
            if idle and snap['state'] == last['state'] and not any('.tmp' in p for p in snap['state']):
                return snap
            if time.monotonic() > deadline:
                self.fail('the state directory did not settle within %d s' % timeout)
            last = snap

    def assertSnapshotEqual(self, before, after, what):
        self.assertEqual(before['state'], after['state'], '%s changed the state directory' % what)
        self.assertEqual(before['jobs'], after['jobs'], '%s changed the block jobs in QEMU' % what)
        if 'graph' in before and 'graph' in after:
            self.assertEqual(before['graph'], after['graph'], "%s changed QEMU's block graph" % what)
        self.assertEqual(sorted(before['objects']), sorted(after['objects']),
                         '%s added or removed objects' % what)
        for p in before['objects']:
            self.assertEqual(before['objects'][p], after['objects'].get(p),
                             '%s changed the properties of %s' % (what, p))


def main():
    """unittest.main with a non-zero exit status on any failure or error."""
    unittest.main(verbosity=2, buffer=False)
