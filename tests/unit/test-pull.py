#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""blockstream-pull against real NBD servers, without the daemon: qemu-nbd for the allocation map
and the control protocol, QEMU itself (copy-on-read filter + NBD export) for what a pull copies.
Prints TAP. Environment (from meson): PULL = the helper, PULL_SELFTEST = the same built with
-DPULL_SELFTEST, PULL_SANITIZE = "true" in an ASan+UBSan build."""

import array
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

from unixsock import listening

PULL = os.environ.get('PULL', '')
PULL_SELFTEST = os.environ.get('PULL_SELFTEST', '')
SANITIZE = os.environ.get('PULL_SANITIZE') == 'true'

KIB = 1024
MIB = 1024 * KIB
CLUSTER = 64 * KIB
DISK = 64 * MIB

tmp = None
results = []


class Fail(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Fail(what)


def run(*cmd, **kw):
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    if r.returncode != 0:
        raise Fail('%s failed (%d): %s' % (' '.join(cmd), r.returncode, r.stderr.strip()))
    return r.stdout


def helper_env(extra=None):
    env = dict(os.environ)
    # LeakSanitizer's exit-time check needs clone/ptrace, which the helper's own filter (rightly)
    # forbids; the valgrind test covers leaks.
    if SANITIZE:
        env['ASAN_OPTIONS'] = env.get('ASAN_OPTIONS', '') + ':detect_leaks=0'
    env.pop('BLOCKSTREAM_PULL_SELFTEST', None)
    env.update(extra or {})
    return env


class Helper:
    """The helper with fd 3 connected to an NBD server and fd 4 our SEQPACKET control socket."""

    def __init__(self, args, sock, binary=None, env=None, wrapper=(), extra_fd=None):
        self.ctl, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        nbd = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        nbd.connect(sock)

        def preexec():
            # Out of the way first: the sockets may themselves be 3, 4 or 5.
            n = fcntl.fcntl(nbd.fileno(), fcntl.F_DUPFD_CLOEXEC, 100)
            c = fcntl.fcntl(child.fileno(), fcntl.F_DUPFD_CLOEXEC, 100)
            x = fcntl.fcntl(extra_fd, fcntl.F_DUPFD_CLOEXEC, 100) if extra_fd is not None else None
            os.dup2(n, 3)
            os.dup2(c, 4)
            if x is not None:
                os.dup2(x, 5)

        self.start = time.monotonic()
        self.proc = subprocess.Popen(list(wrapper) + [binary or PULL] + list(args), preexec_fn=preexec,
                                     close_fds=False, env=helper_env(env),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        child.close()
        nbd.close()
        self.msgs = []  # (seconds since start, line)
        self.eof = False

    def recv(self, timeout):
        """The next message, None at EOF; Fail on timeout."""
        self.ctl.settimeout(timeout)
        try:
            m = self.ctl.recv(1024)
        except socket.timeout:
            raise Fail('no message from the helper within %.1f s (so far: %s)' % (timeout, self.msgs[-5:]))
        if not m:
            self.eof = True
            return None
        check(m.endswith(b'\n') and len(m) <= 256, 'malformed message %r' % m)
        line = m.decode('ascii').rstrip('\n')
        self.msgs.append((time.monotonic() - self.start, line))
        return line

    def expect(self, prefix, timeout=10):
        while True:
            line = self.recv(timeout)
            check(line is not None, 'EOF while waiting for %r (got %s)' % (prefix, self.msgs[-5:]))
            if line.startswith(prefix):
                return line

    def send(self, line):
        self.ctl.send(line.encode() + b'\n')

    def finish(self, timeout=20):
        """Read everything until EOF; return the exit status."""
        deadline = time.monotonic() + timeout
        while not self.eof:
            self.recv(max(0.1, deadline - time.monotonic()))
        try:
            rc = self.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise Fail('helper did not exit')
        self.stderr = self.proc.stderr.read()
        self.ctl.close()
        return rc

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.ctl.close()

    def lines(self, prefix):
        return [l for _, l in self.msgs if l.startswith(prefix)]


def run_helper(args, sock, **kw):
    h = Helper(args, sock, **kw)
    rc = h.finish()
    return h, rc


# ---------------------------------------------------------------------------------------------
# Images

def make_chain(d):
    """base ← mid ← top, 64 MiB, 64 KiB clusters: every kind somewhere."""
    for name, backing in (('base', None), ('mid', 'base'), ('top', 'mid')):
        cmd = ['qemu-img', 'create', '-q', '-f', 'qcow2', '-o', 'cluster_size=%d' % CLUSTER]
        if backing:
            cmd += ['-b', backing + '.qcow2', '-F', 'qcow2']
        run(*cmd, os.path.join(d, name + '.qcow2'), str(DISK))
    io = {
        'base': ['write -P 0x11 0 20M', 'write -P 0x14 28M 2M', 'write -P 0x15 32M 32M'],
        'mid': ['write -P 0x22 2M 2M', 'write -z 6M 1M'],
        'top': ['write -P 0x33 1M 512K', 'write -z 8M 64K', 'write -P 0x34 10M 64K'],
    }
    for name, cmds in io.items():
        args = ['qemu-io', '-f', 'qcow2']
        for c in cmds:
            args += ['-c', c]
        run(*args, os.path.join(d, name + '.qcow2'))


def qemu_img_map(path):
    """qemu-img's map as (start, length, depth, kind) in our terms: depth 1 = top, 0 = nowhere."""
    out = []
    for e in json.loads(run('qemu-img', 'map', '-U', '--output=json', path)):
        if not e['present']:
            depth, kind = 0, 'absent'
        elif e['depth'] == 0:
            depth, kind = 1, 'zero' if e['zero'] else 'local'
        else:
            depth, kind = e['depth'] + 1, 'backing'
        out.append((e['start'], e['length'], depth, kind))
    return out


def clip_merge(extents, start, end):
    out = []
    for s, l, d, k in extents:
        a, b = max(s, start), min(s + l, end)
        if a >= b:
            continue
        if out and out[-1][2] == d and out[-1][3] == k and out[-1][0] + out[-1][1] == a:
            out[-1] = (out[-1][0], out[-1][1] + b - a, d, k)
        else:
            out.append((a, b - a, d, k))
    return out


def parse_extents(h):
    out = []
    for l in h.lines('extent '):
        _, o, n, d, k = l.split()
        out.append((int(o), int(n), int(d), k))
    return out


class QemuNbd:
    def __init__(self, image, name='disk', allocation_depth=True):
        self.sock = os.path.join(tmp, 'qnbd-%s-%d.sock' % (name, allocation_depth))
        cmd = ['qemu-nbd', '--read-only', '--persistent', '-x', name, '-k', self.sock, '-f', 'qcow2']
        if allocation_depth:
            cmd.append('--allocation-depth')
        self.proc = subprocess.Popen(cmd + [image], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # Listening, not only bound: the socket file exists between bind() and listen(), when a
        # connect is refused.
        deadline = time.monotonic() + 10
        while not listening(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise Fail('qemu-nbd did not start: %s' % self.proc.stderr.read())
            time.sleep(0.02)

    def stop(self):
        # SIGKILL: qemu-nbd 7.2 does not always exit on SIGTERM that comes right after a client's
        # connection (3 of 30 in a loop here; the unbounded wait that followed hung unit-pull for
        # its 300 s). It serves read-only, so nothing is lost.
        self.proc.kill()
        self.proc.wait()


class Qemu:
    """qemu-system-x86_64 with no machine, spoken to over QMP."""

    def __init__(self, d, extra=()):
        self.qmp_path = os.path.join(d, 'qmp.sock')
        self.proc = subprocess.Popen(['qemu-system-x86_64', '-S', '-machine', 'none', '-nodefaults',
                                      '-display', 'none', '-qmp', 'unix:%s,server=on,wait=off' % self.qmp_path]
                                     + list(extra),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.qmp = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.qmp.connect(self.qmp_path)
                break
            except OSError:
                self.qmp.close()
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise Fail('QEMU did not start: %s' % self.proc.stderr.read())
                time.sleep(0.05)
        self.f = self.qmp.makefile('rw')
        json.loads(self.f.readline())  # greeting
        self.cmd('qmp_capabilities')

    def cmd(self, command, **args):
        self.f.write(json.dumps({'execute': command, 'arguments': args}) + '\n')
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if 'event' in r:
                continue
            if 'error' in r:
                raise Fail('QMP %s: %s' % (command, r['error']))
            return r['return']

    def quit(self):
        try:
            self.cmd('quit')
        except (Fail, OSError, ValueError):
            pass
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------------------------------------
# Tests

def rate_from_progress(h, t_from=0.0, t_to=1e9):
    """Bytes per second between the first and the last progress message in [t_from, t_to]."""
    pts = [(t, int(l.split()[1])) for t, l in h.msgs if l.startswith('progress ') and t_from <= t <= t_to]
    check(len(pts) >= 3, 'too few progress messages: %s' % pts)
    (t0, d0), (t1, d1) = pts[0], pts[-1]
    return (d1 - d0) / (t1 - t0), pts


def max_rate_over_a_second(pts):
    """The highest rate between two progress messages at least a second apart."""
    best = 0
    for i in range(len(pts)):
        for j in range(i + 1, len(pts)):
            if pts[j][0] - pts[i][0] >= 0.99:
                best = max(best, (pts[j][1] - pts[i][1]) / (pts[j][0] - pts[i][0]))
    return best


def test_args():
    r = subprocess.run([PULL, '--help'], stdout=subprocess.PIPE, text=True, env=helper_env())
    check(r.returncode == 0 and '--pull' in r.stdout, '--help')
    r = subprocess.run([PULL, '--version'], stdout=subprocess.PIPE, text=True, env=helper_env())
    check(r.returncode == 0 and r.stdout.startswith('blockstream-pull '), '--version')
    bad = [
        [],
        ['--pull', '--map', '--export=disk', '--offset=0', '--length=65536'],
        ['--pull', '--offset=0', '--length=65536'],
        ['--pull', '--export=disk', '--length=65536'],
        ['--pull', '--export=disk', '--offset=0', '--length=65536', '--chunk=1024'],
        ['--pull', '--export=disk', '--offset=0', '--length=65536', '--chunk=67108864'],
        ['--pull', '--export=disk', '--offset=0', '--length=65536', '--parallel=0'],
        ['--pull', '--export=disk', '--offset=0', '--length=65536', '--parallel=65'],
        ['--map', '--export=disk', '--offset=0', '--length=65536', '--max-extents=0'],
        ['--map', '--export=disk', '--offset=18446744073709551615', '--length=65536'],
        ['--map', '--export=disk', '--offset=x', '--length=65536'],
        ['--map', '--export=disk', '--offset=0', '--length=65536', 'extra'],
        ['--map', '--bogus'],
    ]
    for args in bad:
        h, rc = run_helper(args, nbd_plain.sock)
        check(rc == 1, '%s: exit %d' % (args, rc))
        check(len(h.msgs) == 1 and h.msgs[0][1].startswith('error '), '%s: %s' % (args, h.msgs))
    # Beyond the export's end: only the server knows.
    h, rc = run_helper(['--map', '--export=disk', '--offset=%d' % (DISK - CLUSTER), '--length=%d' % (2 * CLUSTER)],
                       nbd_plain.sock)
    check(rc == 1 and h.msgs[-1][1].startswith('error ') and 'beyond' in h.msgs[-1][1], str(h.msgs))
    # Unknown export.
    h, rc = run_helper(['--map', '--export=nope', '--offset=0', '--length=65536'], nbd_plain.sock)
    check(rc == 1 and h.msgs[-1][1].startswith('error '), str(h.msgs))


def test_no_allocation_depth():
    srv = QemuNbd(top, name='nodepth', allocation_depth=False)
    try:
        h, rc = run_helper(['--map', '--export=nodepth', '--offset=0', '--length=%d' % DISK], srv.sock)
    finally:
        srv.stop()
    check(rc == 1, 'exit %d' % rc)
    check(len(h.msgs) == 1 and h.msgs[0][1].startswith('error ') and 'qemu:allocation-depth' in h.msgs[0][1],
          str(h.msgs))


def test_map_whole():
    h, rc = run_helper(['--map', '--export=disk', '--offset=0', '--length=%d' % DISK], nbd_plain.sock)
    check(rc == 0, 'exit %d: %s' % (rc, h.stderr))
    check([l for _, l in h.msgs][0] == 'ready' and h.msgs[-1][1] == 'done', str(h.msgs))
    got = parse_extents(h)
    want = clip_merge(reference_map, 0, DISK)
    check(got == want, 'map differs:\n got %s\nwant %s' % (got, want))
    check({k for *_, k in got} == {'local', 'zero', 'backing', 'absent'}, 'kinds: %s' % got)
    check(len(h.msgs) == len(got) + 2, 'extra messages: %s' % h.msgs)


def test_map_ranges():
    for start, end in [(CLUSTER, 9 * MIB), (8 * MIB, 8 * MIB + CLUSTER), (20 * MIB + 4096, 30 * MIB - 4096),
                       (DISK - CLUSTER, DISK), (MIB + 4096, MIB + 8192), (0, 0)]:
        h, rc = run_helper(['--map', '--export=disk', '--offset=%d' % start, '--length=%d' % (end - start)],
                           nbd_plain.sock)
        check(rc == 0, 'exit %d' % rc)
        got = parse_extents(h)
        want = clip_merge(reference_map, start, end)
        check(got == want, '[%d, %d): got %s want %s' % (start, end, got, want))
        check(h.msgs[-1][1] == 'done', str(h.msgs))


def test_map_max_extents():
    h, rc = run_helper(['--map', '--export=disk', '--offset=0', '--length=%d' % DISK, '--max-extents=3'],
                       nbd_plain.sock)
    check(rc == 0, 'exit %d' % rc)
    got = parse_extents(h)
    check(got == clip_merge(reference_map, 0, DISK)[:3], 'got %s' % got)
    check(h.msgs[-1][1] == 'done', str(h.msgs))
    # The daemon goes on from the end of the last one.
    start = got[-1][0] + got[-1][1]
    h, rc = run_helper(['--map', '--export=disk', '--offset=%d' % start, '--length=%d' % (DISK - start),
                        '--max-extents=3'], nbd_plain.sock)
    check(parse_extents(h) == clip_merge(reference_map, start, DISK)[:3], 'continued: %s' % h.msgs)


def test_small_clusters():
    """512-byte clusters: the daemon widens a range only that far, and the helper must take it."""
    base, img = os.path.join(tmp, 'small-base.qcow2'), os.path.join(tmp, 'small.qcow2')
    run('qemu-img', 'create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', base, '1M')
    run('qemu-img', 'create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', '-b', base, '-F', 'qcow2', img, '1M')
    run('qemu-io', '-f', 'qcow2', '-c', 'write -P 1 0 64K', base)
    run('qemu-io', '-f', 'qcow2', '-c', 'write -P 2 1024 512', '-c', 'write -z 2560 512', img)
    srv = QemuNbd(img, name='small')
    try:
        start, end = 512, 3584
        h, rc = run_helper(['--map', '--export=small', '--offset=%d' % start, '--length=%d' % (end - start)], srv.sock)
        check(rc == 0, 'map exit %d: %s' % (rc, h.msgs))
        want = clip_merge(qemu_img_map(img), start, end)
        check(parse_extents(h) == want, 'got %s want %s' % (parse_extents(h), want))
        h, rc = run_helper(['--pull', '--export=small', '--offset=%d' % start, '--length=%d' % (end - start)],
                           srv.sock)
        check(rc == 0 and h.msgs[-2][1] == 'progress 3072 3072', 'pull exit %d: %s' % (rc, h.msgs))
    finally:
        srv.stop()


def test_pull_progress_plain():
    """Over a read-only export nothing is copied, but the helper reads exactly the backing parts:
    progress ends at the range length, counting local extents as done."""
    h, rc = run_helper(['--pull', '--export=disk', '--offset=0', '--length=%d' % DISK], nbd_plain.sock)
    check(rc == 0, 'exit %d: %s' % (rc, h.stderr))
    check(h.msgs[0][1] == 'ready' and h.msgs[-1][1] == 'done', str(h.msgs))
    check(h.msgs[-2][1] == 'progress %d %d' % (DISK, DISK), str(h.msgs[-2:]))
    done = [int(l.split()[1]) for l in h.lines('progress ')]
    check(done == sorted(done), 'progress goes backwards: %s' % done)


def test_bandwidth():
    rate = 4 * MIB
    h, rc = run_helper(['--pull', '--export=disk', '--offset=%d' % (32 * MIB), '--length=%d' % (9 * MIB),
                        '--bandwidth=%d' % rate], nbd_plain.sock)
    check(rc == 0, 'exit %d' % rc)
    measured, pts = rate_from_progress(h)
    worst = max_rate_over_a_second(pts)
    print('# bandwidth 4 MiB/s: measured %.3f MiB/s (%+.1f%%) over %.2f s; '
          'fastest window of >= 1 s: %.3f MiB/s (%+.1f%%)'
          % (measured / MIB, 100 * (measured - rate) / rate, pts[-1][0] - pts[0][0], worst / MIB,
             100 * (worst - rate) / rate))
    check(abs(measured - rate) <= 0.25 * rate, 'measured %.0f B/s for %d' % (measured, rate))
    check(worst <= 1.25 * rate, 'a second at %.0f B/s' % worst)
    check(len(pts) <= 4 * (pts[-1][0] - pts[0][0]) + 3, 'too many progress messages: %d' % len(pts))


def test_bandwidth_change():
    h = Helper(['--pull', '--export=disk', '--offset=%d' % (32 * MIB), '--length=%d' % (32 * MIB),
                '--bandwidth=%d' % (2 * MIB)], nbd_plain.sock)
    try:
        h.expect('ready')
        t_change = None
        while True:
            h.recv(5)
            if h.msgs[-1][0] >= 1.2 and t_change is None:
                h.send('bandwidth %d' % (16 * MIB))
                t_change = time.monotonic() - h.start
            if t_change is not None and h.msgs[-1][0] >= t_change + 1.3:
                break
        h.send('stop')
        rc = h.finish()
    finally:
        h.kill()
    check(rc == 0, 'exit %d' % rc)
    before, _ = rate_from_progress(h, 0, t_change)
    after, _ = rate_from_progress(h, t_change + 0.3, t_change + 1.3)
    print('# bandwidth 2 MiB/s then 16 MiB/s live: measured %.2f MiB/s, then %.2f MiB/s' % (before / MIB, after / MIB))
    check(abs(before - 2 * MIB) <= 0.25 * 2 * MIB, 'before: %.0f' % before)
    check(abs(after - 16 * MIB) <= 0.25 * 16 * MIB, 'after: %.0f' % after)
    check('done' not in [l for _, l in h.msgs], 'done after stop')


def test_pause_resume_stop():
    h = Helper(['--pull', '--export=disk', '--offset=%d' % (32 * MIB), '--length=%d' % (32 * MIB),
                '--bandwidth=%d' % (4 * MIB)], nbd_plain.sock)
    try:
        h.expect('ready')
        h.expect('progress ')
        h.send('pause')
        t_pause = time.monotonic() - h.start
        time.sleep(1.5)  # in-flight reads finish, nothing new starts
        h.send('resume')
        t_resume = time.monotonic() - h.start
        h.expect('progress ', timeout=5)
        h.expect('progress ', timeout=5)
        h.send('stop')
        t_stop = time.monotonic()
        rc = h.finish(timeout=5)
        stop_took = time.monotonic() - t_stop
    finally:
        h.kill()
    check(rc == 0, 'exit %d' % rc)
    check(stop_took < 1.0, 'stop took %.2f s' % stop_took)
    paused = [int(l.split()[1]) for t, l in h.msgs if l.startswith('progress ') and t_pause + 0.5 <= t <= t_resume]
    at_pause = [int(l.split()[1]) for t, l in h.msgs if l.startswith('progress ') and t <= t_pause + 0.5]
    check(not paused or paused[0] == paused[-1] == at_pause[-1], 'progress while paused: %s' % h.msgs)
    after = [int(l.split()[1]) for t, l in h.msgs if l.startswith('progress ') and t > t_resume]
    check(after and after[-1] > at_pause[-1], 'no progress after resume: %s' % h.msgs)
    check(not h.lines('done'), 'done after stop')


def test_control_eof():
    h = Helper(['--pull', '--export=disk', '--offset=%d' % (32 * MIB), '--length=%d' % (32 * MIB),
                '--bandwidth=%d' % MIB], nbd_plain.sock)
    try:
        h.expect('ready')
        h.ctl.shutdown(socket.SHUT_RDWR)
        t = time.monotonic()
        rc = h.proc.wait(5)
        took = time.monotonic() - t
    finally:
        h.kill()
    check(rc == 0, 'exit %d' % rc)
    check(took < 1.0, 'exit took %.2f s' % took)


def test_control_malformed():
    for bad in [b'bogus\n', b'bandwidth\n', b'bandwidth x\n', b'bandwidth -1\n', b'bandwidth 1 2\n',
                b'bandwidth 99999999999999999999999\n', b'bandwidth 1M\n', b'pause', b'pause\n\n', b'pa\x00use\n',
                b'Pause\n', b'x' * 300 + b'\n', b'bandwidth ' + b'0' * 246 + b'\n', b'x' * 257, b'\n']:
        h = Helper(['--pull', '--export=disk', '--offset=%d' % (32 * MIB), '--length=%d' % (32 * MIB),
                    '--bandwidth=%d' % MIB], nbd_plain.sock)
        try:
            h.expect('ready')
            h.ctl.send(bad)
            line = h.expect('error ', timeout=5)
            rc = h.finish(timeout=5)
        finally:
            h.kill()
        check(rc == 1, '%r: exit %d' % (bad, rc))
        check('Malformed' in line, '%r: %s' % (bad, line))
    # File descriptors have no business on the control socket.
    with open('/dev/null') as f:
        h = Helper(['--pull', '--export=disk', '--offset=%d' % (32 * MIB), '--length=%d' % (32 * MIB),
                    '--bandwidth=%d' % MIB], nbd_plain.sock)
        try:
            h.expect('ready')
            h.ctl.sendmsg([b'pause\n'], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array('i', [f.fileno()]))])
            line = h.expect('error ', timeout=5)
            rc = h.finish(timeout=5)
        finally:
            h.kill()
    check(rc == 1 and 'ancillary' in line, 'fd passed: exit %d, %s' % (rc, line))


def test_server_gone():
    srv = QemuNbd(top, name='gone')
    h = Helper(['--pull', '--export=gone', '--offset=%d' % (32 * MIB), '--length=%d' % (32 * MIB),
                '--bandwidth=%d' % MIB], srv.sock)
    try:
        h.expect('ready')
        h.expect('progress ')
        srv.proc.kill()
        srv.proc.wait()
        line = h.expect('error ', timeout=5)
        rc = h.finish(timeout=5)
    finally:
        h.kill()
        srv.stop()
    check(rc == 1, 'exit %d: %s' % (rc, line))


def test_fds_closed():
    with open('/dev/null') as extra:
        h = Helper(['--pull', '--export=disk', '--offset=%d' % (32 * MIB), '--length=%d' % (32 * MIB),
                    '--bandwidth=%d' % MIB], nbd_plain.sock, extra_fd=extra.fileno())
    try:
        h.expect('ready')
        fds = sorted(int(f) for f in os.listdir('/proc/%d/fd' % h.proc.pid))
        h.send('stop')
        rc = h.finish()
    finally:
        h.kill()
    check(fds == [0, 1, 2, 3, 4], 'open fds: %s' % fds)
    check(rc == 0, 'exit %d' % rc)


def test_seccomp_kills():
    for word in ('open', 'socket'):
        h = Helper(['--pull', '--export=disk', '--offset=%d' % (32 * MIB), '--length=%d' % MIB,
                    '--bandwidth=%d' % MIB], nbd_plain.sock, binary=PULL_SELFTEST,
                   env={'BLOCKSTREAM_PULL_SELFTEST': word})
        try:
            rc = h.finish()
        finally:
            h.kill()
        check(h.msgs and h.msgs[0][1] == 'ready', '%s: %s' % (word, h.msgs))
        check(rc == -signal.SIGSYS, '%s: exit %d, expected SIGSYS' % (word, rc))
    # The same binary without the hook runs normally.
    h, rc = run_helper(['--map', '--export=disk', '--offset=0', '--length=%d' % DISK], nbd_plain.sock,
                       binary=PULL_SELFTEST)
    check(rc == 0, 'exit %d' % rc)


def test_valgrind():
    if SANITIZE or not shutil.which('valgrind'):
        return 'skip valgrind: not in this build'
    # --vgdb=no: valgrind's gdb server would unlink its fifo at exit, which the filter forbids.
    vg = ['valgrind', '-q', '--vgdb=no', '--error-exitcode=99', '--leak-check=full',
          '--errors-for-leak-kinds=definite,indirect', '--show-leak-kinds=definite,indirect']
    env = {'BLOCKSTREAM_PULL_SELFTEST': 'valgrind'}
    for args in (['--map', '--export=disk', '--offset=0', '--length=%d' % DISK],
                 ['--map', '--export=disk', '--offset=0', '--length=%d' % DISK, '--max-extents=2'],
                 ['--pull', '--export=disk', '--offset=0', '--length=%d' % DISK, '--parallel=4']):
        h, rc = run_helper(args, nbd_plain.sock, binary=PULL_SELFTEST, env=env, wrapper=vg)
        check(rc == 0, '%s under valgrind: exit %d\n%s' % (args, rc, h.stderr))
        check(h.msgs[-1][1] == 'done', str(h.msgs[-3:]))
    # Stopped with reads in flight.
    h = Helper(['--pull', '--export=disk', '--offset=0', '--length=%d' % DISK, '--bandwidth=%d' % (8 * MIB)],
               nbd_plain.sock, binary=PULL_SELFTEST, env=env, wrapper=vg)
    try:
        h.expect('ready', timeout=30)
        h.expect('progress ', timeout=30)
        h.send('stop')
        rc = h.finish(timeout=30)
    finally:
        h.kill()
    check(rc == 0, 'stop under valgrind: exit %d\n%s' % (rc, h.stderr))


def wchar(pid):
    with open('/proc/%d/io' % pid) as f:
        for line in f:
            if line.startswith('wchar:'):
                return int(line.split()[1])
    raise Fail('no wchar in /proc/%d/io' % pid)


def test_pull_cache_top():
    """The real thing, as the daemon runs a range without base: QEMU exports the top node with
    allocation depth; the helper pulls [a, b) with NBD_CMD_CACHE, which QEMU serves with the top
    node's copy-on-read: afterwards exactly the backing clusters in [a, b) are local, and QEMU
    wrote each copied byte once."""
    pull_copy_on_read('cache-top', filter_node=False, extra=[])


def test_pull_filter_no_cache():
    """As the daemon runs a range with base: a copy-on-read filter over the top node, read with
    --no-cache (a CACHE there would copy twice)."""
    pull_copy_on_read('filter-read', filter_node=True, extra=['--no-cache'])


NBD_CMD_CACHE = 5
TRACED = ('nbd_co_receive_request_decode_type', 'nbd_receive_request', 'nbd_co_send_simple_reply',
          'nbd_co_send_structured_done')


def traced_caches(log):
    """From QEMU's trace of its NBD server: the CACHE requests as (offset, length), and the most
    CACHEs it had in hand at once (decoded, not yet answered)."""
    caches, open_handles, most = [], set(), 0
    with open(log) as f:
        for line in f:
            if 'nbd_receive_request ' in line and '.type = 0x%x,' % NBD_CMD_CACHE in line:
                caches.append((int(line.split('from = ')[1].split(',')[0]), int(line.split('len = ')[1].split()[0])))
            elif 'nbd_co_receive_request_decode_type ' in line and 'type = %d ' % NBD_CMD_CACHE in line:
                open_handles.add(line.split('handle = ')[1].split(',')[0])
                most = max(most, len(open_handles))
            elif 'nbd_co_send_simple_reply ' in line or 'nbd_co_send_structured_done ' in line:
                open_handles.discard(line.split('handle = ')[1].split(',')[0].split()[0])
    return caches, most


def test_pull_first_cache_large():
    """With a chunk above glibc's mmap threshold (2 MiB, as from a remote backing), one CACHE is 16 MiB
    (QEMU's largest bounce buffer: glibc in QEMU then keeps a heap for the rest), on the first piece
    that long, and fewer requests are in flight than that heap holds; with a bandwidth limit or a
    small chunk, none is larger than the chunk. Seen from QEMU's side (its NBD server's trace)."""
    for what, args, big in (('remote', ['--chunk=%d' % (2 * MIB)], True),
                            ('limited', ['--chunk=%d' % (2 * MIB), '--bandwidth=%d' % (512 * MIB)], False),
                            ('local', [], False)):
        d = os.path.join(tmp, 'first-cache-' + what)
        os.mkdir(d)
        make_chain(d)
        img, log, sock = os.path.join(d, 'top.qcow2'), os.path.join(d, 'trace.log'), os.path.join(d, 'nbd.sock')
        todo = sum(ln for off, ln, dep, k in qemu_img_map(img) if k == 'backing')
        qemu = Qemu(d, [a for t in TRACED for a in ('-trace', 'enable=' + t)] + ['-D', log])
        try:
            # The chain as nodes, base's reads slowed (a throttle under its qcow2: the depths stay),
            # so that the CACHEs pile up in QEMU as far as the helper lets them.
            qemu.cmd('object-add', **{'qom-type': 'throttle-group', 'id': 'slow', 'limits': {'bps-read': 32 * MIB}})
            qemu.cmd('blockdev-add', driver='file', **{'node-name': 'base-file'}, filename=os.path.join(d, 'base.qcow2'))
            qemu.cmd('blockdev-add', driver='throttle', **{'node-name': 'base-slow', 'throttle-group': 'slow'},
                     file='base-file')
            qemu.cmd('blockdev-add', driver='qcow2', **{'node-name': 'base'}, file='base-slow')
            qemu.cmd('blockdev-add', driver='qcow2', **{'node-name': 'mid'}, backing='base',
                     file={'driver': 'file', 'filename': os.path.join(d, 'mid.qcow2')})
            qemu.cmd('blockdev-add', driver='qcow2', **{'node-name': 'top'}, backing='mid',
                     file={'driver': 'file', 'filename': img})
            qemu.cmd('nbd-server-start', addr={'type': 'unix', 'data': {'path': sock}})
            qemu.cmd('block-export-add', type='nbd', id='exp0', **{'node-name': 'top', 'allocation-depth': True},
                     name='top', writable=False)
            h, rc = run_helper(['--pull', '--export=top', '--offset=0', '--length=%d' % DISK] + args, sock)
            check(rc == 0, '%s: exit %d: %s' % (what, rc, h.stderr))
        finally:
            qemu.quit()
        caches, most = traced_caches(log)
        # The helper's first CACHE (4 KiB, whether the server takes them) is part of the copy.
        check(caches and caches[0] == (0, 4096), '%s: the first CACHE is %r' % (what, caches[:1]))
        check(sum(ln for off, ln in caches[1:]) + CLUSTER == todo,
              '%s: the CACHEs cover %d bytes, the backing clusters %d' % (what, sum(ln for _, ln in caches), todo))
        large = [(off, ln) for off, ln in caches if ln > 2 * MIB]
        if big:
            # The pieces before [32M, 64M) are shorter (make_chain: base's data ends at 20M, 30M).
            check(large == [(32 * MIB, 16 * MIB)], '%s: CACHEs above 2 MiB: %r' % (what, large))
            check(most <= 14, '%s: %d CACHEs in QEMU\'s hands at once' % (what, most))
        else:
            check(not large, '%s: CACHEs above the chunk: %r' % (what, large))
            limit = 2 * MIB if what == 'limited' else 128 * KIB
            check(max(ln for _, ln in caches) <= limit, '%s: a CACHE above %d bytes' % (what, limit))
        print('# %s: %d CACHEs, %d bytes, at most %d in flight' % (what, len(caches), todo, most))


def pull_copy_on_read(name, filter_node, extra):
    d = os.path.join(tmp, name)
    os.mkdir(d)
    make_chain(d)
    img = os.path.join(d, 'top.qcow2')
    before_map = qemu_img_map(img)
    before_raw = os.path.join(d, 'before.raw')
    run('qemu-img', 'convert', '-O', 'raw', img, before_raw)

    a, b = 15 * CLUSTER, 21 * MIB + 3 * CLUSTER  # local, backing, zero in mid and top, absent inside
    sock = os.path.join(d, 'nbd.sock')
    qemu = Qemu(d)
    try:
        qemu.cmd('blockdev-add', driver='qcow2', **{'node-name': 'top'},
                 file={'driver': 'file', 'filename': img})
        node = 'top'
        if filter_node:
            qemu.cmd('blockdev-add', driver='copy-on-read', **{'node-name': 'cor0'}, file='top')
            node = 'cor0'
        qemu.cmd('nbd-server-start', addr={'type': 'unix', 'data': {'path': sock}})
        qemu.cmd('block-export-add', type='nbd', id='exp0', **{'node-name': node, 'allocation-depth': True},
                 name='cor0', writable=False)
        w0 = wchar(qemu.proc.pid)
        h, rc = run_helper(['--pull', '--export=cor0', '--offset=%d' % a, '--length=%d' % (b - a),
                            '--chunk=%d' % (512 * KIB), '--parallel=4'] + extra, sock)
        written = wchar(qemu.proc.pid) - w0
        check(rc == 0, 'exit %d: %s' % (rc, h.stderr))
        check(h.msgs[-2][1] == 'progress %d %d' % (b - a, b - a) and h.msgs[-1][1] == 'done', str(h.msgs[-3:]))
        # While QEMU still runs: the map through the export says the range is local now.
        h, rc = run_helper(['--map', '--export=cor0', '--offset=%d' % a, '--length=%d' % (b - a)], sock)
        check(rc == 0, 'map exit %d' % rc)
        check(not [e for e in parse_extents(h) if e[3] == 'backing'], 'still backing: %s' % parse_extents(h))
    finally:
        qemu.quit()

    after_map = qemu_img_map(img)

    def per_cluster(m):
        out = {}
        for s, l, dep, k in m:
            for c in range(s, s + l, CLUSTER):
                out[c] = (dep, k)
        return out
    pb, pa = per_cluster(before_map), per_cluster(after_map)
    changed, wrong = [], []
    for c in range(0, DISK, CLUSTER):
        inside = a <= c < b
        if inside and pb[c][1] == 'backing':
            if pa[c][0] != 1:
                wrong.append((c, pb[c], pa[c]))
        elif pa[c] != pb[c]:
            changed.append((c, pb[c], pa[c]))
    check(not wrong, 'not copied: %s' % wrong[:5])
    check(not changed, 'changed outside what was to copy: %s' % changed[:5])
    copied = sum(CLUSTER for c in range(a, b, CLUSTER) if pb[c][1] == 'backing')
    print('# copy-on-read pull of [%d, %d): %d clusters copied, nothing else changed; QEMU wrote %d bytes'
          % (a, b, copied // CLUSTER, written))
    # wchar counts write(2)/pwrite(2) and their vector forms, not sendmsg(2): the image's writes.
    # A CACHE through the filter shows twice the copy here.
    check(written <= copied * 11 // 10 + 64 * KIB,
          'QEMU wrote %d bytes for %d copied: not a single copy-on-read per byte' % (written, copied))

    after_raw = os.path.join(d, 'after.raw')
    run('qemu-img', 'convert', '-O', 'raw', img, after_raw)
    run('cmp', before_raw, after_raw)
    # And by pattern, through the image alone.
    for pattern, off, length in [('0x11', 15 * CLUSTER, MIB - 15 * CLUSTER), ('0x33', MIB, 512 * KIB),
                                 ('0x22', 2 * MIB, 2 * MIB), ('0x11', 4 * MIB, 2 * MIB), ('0', 6 * MIB, MIB),
                                 ('0', 8 * MIB, CLUSTER), ('0x34', 10 * MIB, CLUSTER), ('0x11', 11 * MIB, 9 * MIB),
                                 ('0', 20 * MIB, MIB + 3 * CLUSTER)]:
        run('qemu-io', '-r', '-f', 'qcow2', '-c', 'read -q -P %s %d %d' % (pattern, off, length), img)
    run('qemu-img', 'check', '-q', img)


TESTS = [test_args, test_no_allocation_depth, test_map_whole, test_map_ranges, test_map_max_extents,
         test_small_clusters, test_pull_progress_plain, test_bandwidth, test_bandwidth_change, test_pause_resume_stop,
         test_control_eof, test_control_malformed, test_server_gone, test_fds_closed, test_seccomp_kills,
         test_valgrind, test_pull_cache_top, test_pull_filter_no_cache, test_pull_first_cache_large]


def main():
    global tmp, top, nbd_plain, reference_map
    only = sys.argv[1:]
    print('1..%d' % len(TESTS))
    needed = ['qemu-img', 'qemu-io', 'qemu-nbd', 'qemu-system-x86_64']
    missing = [p for p in needed if not shutil.which(p)]
    if missing or not PULL or not PULL_SELFTEST:
        for i, t in enumerate(TESTS, 1):
            print('ok %d - %s # SKIP %s' % (i, t.__name__, 'missing ' + ' '.join(missing) if missing else 'PULL unset'))
        return 0

    tmp = tempfile.mkdtemp(prefix='test-pull.')
    failed = 0
    nbd_plain = None
    try:
        make_chain(tmp)
        top = os.path.join(tmp, 'top.qcow2')
        reference_map = qemu_img_map(top)
        nbd_plain = QemuNbd(top)
        for i, t in enumerate(TESTS, 1):
            if only and t.__name__ not in only:
                print('ok %d - %s # SKIP not selected' % (i, t.__name__))
                continue
            t0 = time.monotonic()
            try:
                r = t()
                if isinstance(r, str) and r.startswith('skip '):
                    print('ok %d - %s # SKIP %s' % (i, t.__name__, r[5:]))
                else:
                    print('ok %d - %s (%.1f s)' % (i, t.__name__, time.monotonic() - t0))
            except Exception as e:
                failed += 1
                print('not ok %d - %s' % (i, t.__name__))
                for line in (str(e) if isinstance(e, Fail) else traceback.format_exc()).splitlines():
                    print('# ' + line)
            sys.stdout.flush()
    finally:
        if nbd_plain:
            nbd_plain.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
