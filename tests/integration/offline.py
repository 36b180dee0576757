#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Offline guests, NBD exports and the sandboxed helpers, for the integration tests.

On top of harness.py: registering guests that are not running (RegisterGuest with an empty QMP
socket and the disks as an option), their state files, the daemon's helper processes as the
kernel sees them (/proc: parent, uids, gids, groups, capabilities, seccomp), Export objects,
and the NBD client tools (nbdinfo, nbdcopy from libnbd-bin; qemu-io/qemu-img).

Helpers are found as children of *our* daemon: other daemons (other test runs on the same
machine) allocate helper uids from the same default range."""

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import dbus

import harness as h
from harness import MiB

IFACE_EXPORT = 'org.blockstream1.Export'
EXPORT_PREFIX = '/org/blockstream1/export/'
ERR_LIMITS_EXCEEDED = 'org.freedesktop.DBus.Error.LimitsExceeded'
ERR_HELPER_FAILED = h.ERR_HELPER_FAILED
RELAY = 'blockstream-nbd-relay'


def check_nbd_tools():
    missing = [t for t in ('nbdinfo', 'nbdcopy', 'getfattr', 'qemu-io', 'qemu-img') if shutil.which(t) is None]
    if missing:
        raise AssertionError('%s not found (apt-get install libnbd-bin attr qemu-utils)' % ' '.join(missing))
    relay = os.path.join(h.HELPER_DIRECTORY, RELAY)
    if not os.access(relay, os.X_OK):
        raise AssertionError('%s not found or not executable (build the tree: ninja -C <build>)' % relay)


# ---------------------------------------------------------------------------------------------
# Offline guests

def disks_opt(disks):
    """{alias: path} as the a{ss} the daemon wants."""
    return dbus.Dictionary(dict(disks), signature='ss')


def offline_options(disks, formats=None, **extra):
    o = {'disks': disks_opt(disks)}
    if formats:
        o['formats'] = dbus.Dictionary(dict(formats), signature='ss')
    o.update(extra)
    return dbus.Dictionary(o, signature='sv')


def state_file(env, name):
    return os.path.join(env.daemon.state_dir, 'guests', name + '.json')


def read_state(env, name):
    with open(state_file(env, name)) as f:
        return json.load(f)


def identity(env, name):
    """(helper_uid, mcs_c1, mcs_c2) from the guest's state file."""
    s = read_state(env, name)
    return s['helper_uid'], s['mcs_c1'], s['mcs_c2']


def storage_identity(env, name):
    """(storage_uid, storage_mcs_c1, storage_mcs_c2) from the guest's state file: the identity of
    its storage helper (the QEMU that holds its images read-write), apart from its other helpers';
    (0, 0, 0) until a storage helper first ran for it."""
    s = read_state(env, name)
    return s.get('storage_uid', 0), s.get('storage_mcs_c1', 0), s.get('storage_mcs_c2', 0)


def helper_uid_range(env):
    """The uids the daemon may give out: HelperUIDRange= of its config (the last line wins), less
    its top uids (ProvisionDisk's probes')."""
    lo, hi = env.daemon.helper_uids()
    return range(lo, hi + 1 - h.PROBE_UIDS)


def raw_image(path, size=1 * MiB):
    """A sparse raw image, made like an administrator would (truncate)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    h.run(['truncate', '-s', str(size), path])
    return path


def chain_sha256(path, fmt='qcow2'):
    """sha256 of what the chain at `path` reads as (qemu-img convert -O raw)."""
    out = path + '.sha-tmp.raw'
    try:
        h.qemu_img('convert', '-U', '-f', fmt, '-O', 'raw', path, out)
        return file_sha256(out)
    finally:
        if os.path.exists(out):
            os.unlink(out)


def file_sha256(path):
    d = hashlib.sha256()
    with open(path, 'rb') as f:
        for b in iter(lambda: f.read(1 << 20), b''):
            d.update(b)
    return d.hexdigest()


def getfattr_selinux(*dirs):
    """The lines of `getfattr -d -m - -R DIR...` that name security.selinux (and the whole output)."""
    r = h.run(['getfattr', '-d', '-m', '-', '-R', '--absolute-names'] + list(dirs), check=False)
    text = r.stdout + r.stderr
    return [l for l in text.splitlines() if 'security.selinux' in l], text


# ---------------------------------------------------------------------------------------------
# Processes, as the kernel sees them

class Proc:
    def __init__(self, pid):
        self.pid = pid
        with open('/proc/%d/stat' % pid) as f:
            stat = f.read()
        # comm may contain spaces and parentheses: the fields after the last ')'.
        self.ppid = int(stat[stat.rindex(')') + 2:].split()[1])
        with open('/proc/%d/cmdline' % pid, 'rb') as f:
            self.argv = [a.decode(errors='replace') for a in f.read().split(b'\0')[:-1]]
        self.status = {}
        with open('/proc/%d/status' % pid) as f:
            for line in f:
                k, _, v = line.partition(':')
                self.status[k] = v.strip()

    @property
    def uids(self):
        return [int(x) for x in self.status['Uid'].split()]

    @property
    def gids(self):
        return [int(x) for x in self.status['Gid'].split()]

    @property
    def groups(self):
        return [int(x) for x in self.status.get('Groups', '').split()]

    def __repr__(self):
        return 'Proc(pid=%d ppid=%d uids=%s argv=%r)' % (self.pid, self.ppid, self.status.get('Uid'), self.argv)


def limits(pid):
    """{'Max address space': ('268435456', '268435456'), ...} from /proc/PID/limits (soft, hard)."""
    out = {}
    with open('/proc/%d/limits' % pid) as f:
        for line in f.readlines()[1:]:
            name, soft, hard = line[:26].strip(), line[26:47].strip(), line[47:68].strip()
            out[name] = (soft, hard)
    return out


def _sanitizer_build():
    """A daemon built with meson -Dsanitize=true links libasan (scripts/sanitize-integration)."""
    try:
        with open(h.BLOCKSTREAMD, 'rb') as f:
            return b'libasan.so' in f.read()
    except OSError:
        return False


# The helpers' RLIMIT_AS and RLIMIT_FSIZE (service/sandbox.h): ours get 256 MiB and no file writes,
# QEMU's storage helper 8 GiB and its images. A sanitizer build has no RLIMIT_AS (ASan's shadow
# memory: service/sandbox.c).
SANITIZER_BUILD = _sanitizer_build()
OWN_HELPER_LIMITS = {'Max address space': ('unlimited',) * 2 if SANITIZER_BUILD else (str(256 * MiB),) * 2,
                     'Max file size': ('0', '0')}
STORAGE_HELPER_LIMITS = {'Max address space': ('unlimited',) * 2 if SANITIZER_BUILD else (str(8 << 30),) * 2,
                         'Max file size': ('unlimited', 'unlimited')}


def assert_limits(test, pid, expected, what):
    got = limits(pid)
    test.assertEqual({k: got.get(k) for k in expected}, expected, 'rlimits of %s' % what)


def processes():
    out = []
    for e in os.listdir('/proc'):
        if e.isdigit():
            try:
                out.append(Proc(int(e)))
            except (OSError, ValueError, IndexError):
                pass     # gone meanwhile, or a kernel thread without cmdline
    return out


def daemon_children(env):
    pid = env.daemon.proc.pid
    return [p for p in processes() if p.ppid == pid]


def is_storage_helper(p):
    return 'qemu-system' in (p.argv[0] if p.argv else '') and '-machine' in p.argv and \
        p.argv[p.argv.index('-machine') + 1] == 'none'


def storage_helpers(env, uid=None):
    """The daemon's `qemu-system-x86_64 -machine none` children (of uid `uid`: a guest's storage
    helper uid, see storage_identity())."""
    return [p for p in daemon_children(env) if is_storage_helper(p) and (uid is None or p.uids[0] == uid)]


def storage_helper_of(env, image):
    """The daemon's storage helpers that hold `image` open (found by their fds, not by uid)."""
    out = []
    for p in storage_helpers(env):
        try:
            if any(os.readlink('/proc/%d/fd/%s' % (p.pid, fd)) == image for fd in os.listdir('/proc/%d/fd' % p.pid)):
                out.append(p)
        except OSError:
            pass     # gone meanwhile
    return out


def reach_as(test, uid, gid, pid):
    """What a process of uid/gid (no groups) can do to process pid: signal it, open its memory
    for writing (that is: run code in it, with its fds). The identity tests of caches, storage
    helpers, relays and pull helpers all ask this."""
    script = ('import os, sys\n'
              'pid = int(sys.argv[1])\n'
              'done = []\n'
              'try:\n'
              '    os.kill(pid, 0)\n'
              '    done.append("signal")\n'
              'except PermissionError:\n'
              '    pass\n'
              'try:\n'
              '    os.close(os.open("/proc/%d/mem" % pid, os.O_RDWR))\n'
              '    done.append("write memory")\n'
              'except PermissionError:\n'
              '    pass\n'
              'print(",".join(done))\n')
    r = subprocess.run(['setpriv', '--reuid=%d' % uid, '--regid=%d' % gid, '--clear-groups',
                        sys.executable, '-c', script, str(pid)],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    out = r.stdout.decode(errors='replace').strip()
    test.assertEqual(r.returncode, 0, out)
    return [x for x in out.split(',') if x]


def guest_storage_helpers(env, name):
    """The storage helpers of guest `name` (by its storage helper uid; none before it has one)."""
    uid = storage_identity(env, name)[0]
    return storage_helpers(env, uid) if uid else []


def relays(env, uid=None):
    return [p for p in daemon_children(env) if p.argv and os.path.basename(p.argv[0]) == RELAY and
            (uid is None or p.uids[0] == uid)]


def wait_gone(pid, timeout, what):
    """Wait until process `pid` has exited with all its threads (its files, and so its image locks,
    are released then): reaped, or a zombie leader whose other threads are gone too. A killed
    multi-threaded QEMU shows its leader as a zombie while the other threads still exit and still
    hold the process's files."""
    def gone():
        try:
            with open('/proc/%d/stat' % pid) as f:
                if not f.read().split(') ')[-1].startswith('Z'):
                    return False
            return os.listdir('/proc/%d/task' % pid) == [str(pid)]
        except OSError:
            return True
    h.wait_until(gone, timeout, what)


# ---------------------------------------------------------------------------------------------
# Exports and NBD clients

def export(disk, listen=None):
    """Disk.Export → (object path, uri)."""
    o = dbus.Dictionary({'listen': dbus.String(listen)} if listen is not None else {}, signature='sv')
    return tuple(disk.call('Export', 'a{sv}', o))


def export_props(client, path):
    return client.get_all(path, IFACE_EXPORT)


def exports_on_bus(client):
    return sorted(p for p in client.managed_objects() if p.startswith(EXPORT_PREFIX))


def unix_socket_of(uri):
    assert uri.startswith('nbd+unix://') and '?socket=' in uri, uri
    return uri.split('?socket=', 1)[1]


NBD_OPTS_MAGIC = 0x49484156454F5054   # "IHAVEOPT"
NBD_REP_MAGIC = 0x3E889045565A9
NBD_OPT_GO, NBD_REP_ACK = 7, 1


def recv_exact(c, n, what='the connection'):
    """n bytes from socket c; AssertionError if the server closes what before."""
    b = bytearray()
    while len(b) < n:
        more = c.recv(min(n - len(b), 1 << 20))
        if not more:
            raise AssertionError('the server closed %s (%d of %d bytes)' % (what, len(b), n))
        b += more
    return bytes(b)


def nbd_hold(path, name=b'', timeout=30):
    """A client of the NBD server at path (a unix socket, or a (host, port) pair for TCP) that
    negotiates export name (NBD_OPT_GO, fixed newstyle; "" is an export relay's own) and then
    holds its connection, as an idle NBD client does: the socket, in the transmission phase."""
    c = socket.create_connection(path, timeout) if isinstance(path, tuple) \
        else socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(timeout)
    if not isinstance(path, tuple):
        c.connect(path)
    return nbd_go(c, name)


def nbd_go(c, name=b''):
    """The handshake of nbd_hold() on connected socket c, which is returned."""
    def take(n):
        return recv_exact(c, n, 'a client in its handshake')

    greeting = take(18)
    if struct.unpack('>8sQH', greeting)[1] != NBD_OPTS_MAGIC:
        raise AssertionError('not a newstyle NBD greeting: %r' % greeting)
    c.sendall(struct.pack('>I', 3))  # NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES
    c.sendall(struct.pack('>QII', NBD_OPTS_MAGIC, NBD_OPT_GO, 6 + len(name)) + struct.pack('>I', len(name)) + name
              + struct.pack('>H', 0))
    while True:
        magic, opt, rep, length = struct.unpack('>QIII', take(20))
        if magic != NBD_REP_MAGIC or opt != NBD_OPT_GO:
            raise AssertionError('a bad option reply: %x %d' % (magic, opt))
        take(length)
        if rep == NBD_REP_ACK:
            return c
        if rep & 0x80000000:
            raise AssertionError('NBD_OPT_GO refused (reply type 0x%x)' % rep)


def rss_kib(pid):
    with open('/proc/%d/status' % pid) as f:
        return int(re.search(r'^VmRSS:\s+(\d+) kB', f.read(), re.M).group(1))


def settled_rss_kib(pid, timeout=20):
    """pid's resident set once it has stopped growing for a second (or after timeout)."""
    deadline = time.monotonic() + timeout
    last, still_since = rss_kib(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = rss_kib(pid)
        if now > last + 1024:
            last, still_since = now, time.monotonic()
        elif time.monotonic() - still_since >= 1:
            break
    return last


NBD_REQUEST_MAGIC, NBD_SIMPLE_REPLY_MAGIC = 0x25609513, 0x67446698
NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_DISC = 0, 1, 2


def nbd_request(cmd, handle, offset, length, flags=0):
    """One request of the transmission phase (compact headers)."""
    return struct.pack('>IHHQQI', NBD_REQUEST_MAGIC, flags, cmd, handle, offset, length)


def nbd_simple_read_reply(c, length):
    """(handle, data) of the next reply on c, a read of length bytes (no structured replies)."""
    magic, error, handle = struct.unpack('>IIQ', recv_exact(c, 16))
    if magic != NBD_SIMPLE_REPLY_MAGIC or error:
        raise AssertionError('a bad reply: magic 0x%x, error %d' % (magic, error))
    return handle, recv_exact(c, length)


def nbd(argv, check=True, timeout=120):
    return h.run(argv, check=check, timeout=timeout)


def nbd_size(uri):
    return int(nbd(['nbdinfo', '--size', uri]).stdout.strip())


def nbd_info(uri):
    return json.loads(nbd(['nbdinfo', '--json', uri]).stdout)


def nbd_sha256(uri, connections=None):
    """sha256 of everything `nbdcopy URI -` reads."""
    argv = ['nbdcopy']
    if connections:
        argv.append('--connections=%d' % connections)
    d = hashlib.sha256()
    with subprocess.Popen(argv + [uri, '-'], stdout=subprocess.PIPE, stderr=subprocess.PIPE) as p:
        for b in iter(lambda: p.stdout.read(1 << 20), b''):
            d.update(b)
        err = p.stderr.read().decode(errors='replace')
        rc = p.wait(120)
    if rc != 0:
        raise AssertionError('nbdcopy %s - failed (exit %d): %s' % (uri, rc, err))
    return d.hexdigest()


def free_tcp_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
    s.close()
    return port


class SlowReader:
    """`nbdcopy --connections=1 URI -` into a pipe we do not read until release(): nbdcopy blocks
    on the full pipe with its one connection open."""

    def __init__(self, uri):
        self.proc = h.spawn(['nbdcopy', '--connections=1', '--requests=1', uri, '-'],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def release(self, timeout=120):
        d = hashlib.sha256()
        for b in iter(lambda: self.proc.stdout.read(1 << 20), b''):
            d.update(b)
        err = self.proc.stderr.read().decode(errors='replace')
        rc = self.proc.wait(timeout)
        self.proc.stdout.close()
        self.proc.stderr.close()
        return rc, d.hexdigest(), err

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def kill_and_reap_check(pid, sig=signal.SIGKILL):
    os.kill(pid, sig)
    wait_gone(pid, 10, 'process %d to die' % pid)


def now():
    return time.monotonic()
