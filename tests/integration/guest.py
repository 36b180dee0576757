#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""A real Linux guest for tests and benchmarks (issue 13): tests/guest/build-guest's kernel and
initramfs, booted under TCG on the harness's disks and QMP sockets (exactly as harness.Qemu
starts QEMU, without -S), running tests/guest/latency-reader on /dev/vda. Its serial console is
QEMU's stdio: a thread collects the reader's lines; "stop" is written to it to end the reader.

    g = guest.boot(env, 'vm1', [('vda', overlay)], rate=100)
    g.wait_started(timeout=180)
    g.lat_since(mark)                -> read latencies in µs since a mark (g.mark())
"""

import os
import subprocess
import threading
import time

import harness as h

BUILD_GUEST = os.path.join(h.SOURCE_ROOT, 'tests', 'guest', 'build-guest')


class GuestUnavailable(Exception):
    """The guest cannot be built here (a package is missing): the reason."""


def build(outdir=None):
    """Build (or find cached) the guest; its directory. GuestUnavailable when a package is missing."""
    argv = [BUILD_GUEST] + ([outdir] if outdir else [])
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                       stdin=subprocess.DEVNULL, timeout=600)
    if r.returncode == 77:
        raise GuestUnavailable(r.stderr.strip())
    if r.returncode != 0:
        raise AssertionError('build-guest failed (exit %d): %s' % (r.returncode, r.stderr))
    return r.stdout.strip().splitlines()[-1]


class Guest(h.Qemu):
    """harness.Qemu, but running: -accel tcg, -kernel/-initrd, the serial console on stdio."""

    def __init__(self, env, name, disks, guest_dir, reader_args=(), memory=256, extra_args=()):
        super().__init__(env, name, disks, extra_args=extra_args)
        self.guest_dir = guest_dir
        self.reader_args = list(reader_args)
        self.memory = memory
        self.serial_log = os.path.join(self.dir, 'serial.log')
        self.lines = []            # (host monotonic time, line) of the console, in order
        self.cond = threading.Condition()
        self.thread = None

    def argv(self):
        a = super().argv()
        a.remove('-S')
        # The harness asks for kvm:tcg; a running guest hangs under KVM here (facts.md): TCG only.
        i = a.index('-machine')
        a[i + 1] = 'q35'
        m = a.index('-m')
        a[m + 1] = str(self.memory)
        for arg in self.reader_args:
            if ',' in arg or ' ' in arg:
                raise ValueError('reader argument %r has a comma or a space' % arg)
        cmdline = 'console=ttyS0 quiet panic=-1'
        if self.reader_args:
            cmdline += ' reader_args=' + ','.join(self.reader_args)
        return a + ['-accel', 'tcg', '-no-reboot',
                    '-kernel', os.path.join(self.guest_dir, 'vmlinuz'),
                    '-initrd', os.path.join(self.guest_dir, 'initramfs.cpio.gz'),
                    '-append', cmdline, '-serial', 'stdio']

    def start(self, timeout=30):
        # As harness.Qemu.start, but stdout is the console (a pipe read by a thread, copied to
        # serial.log) and stdin is the console's input.
        with open(self.log, 'ab') as logf:
            self.proc = h.spawn(self.argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logf)
        self.thread = threading.Thread(target=self._read_console, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError('QEMU exited with status %s; log:\n%s\nconsole:\n%s'
                                     % (self.proc.returncode, h._tail(self.log), self.console_tail()))
            if os.path.exists(self.test_socket) and os.path.exists(self.daemon_socket):
                try:
                    self.qmp = h.QMP(self.test_socket)
                    break
                except (ConnectionRefusedError, FileNotFoundError):
                    pass
            if time.monotonic() > deadline:
                raise AssertionError('QEMU QMP sockets did not appear; log:\n%s' % h._tail(self.log))
            time.sleep(0.05)
        return self

    def _read_console(self):
        with open(self.serial_log, 'w') as out:
            for raw in self.proc.stdout:
                line = raw.decode(errors='replace').rstrip('\r\n')
                out.write(line + '\n')
                out.flush()
                with self.cond:
                    self.lines.append((time.monotonic(), line))
                    self.cond.notify_all()
        with self.cond:
            self.lines.append((time.monotonic(), None))     # EOF: QEMU is gone
            self.cond.notify_all()

    def console_tail(self, n=40):
        with self.cond:
            return '\n'.join(l for _, l in self.lines[-n:] if l is not None)

    def wait_line(self, pred, timeout, what, start=0):
        """The index of the first console line from `start` on for which pred(line) is true;
        AssertionError after timeout s or when the console ends first."""
        deadline = time.monotonic() + timeout
        i = start
        with self.cond:
            while True:
                while i < len(self.lines):
                    line = self.lines[i][1]
                    if line is None:
                        raise AssertionError('guest console ended while waiting for %s:\n%s'
                                             % (what, self.console_tail()))
                    if pred(line):
                        return i
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError('timed out after %.0fs waiting for %s; console:\n%s'
                                         % (timeout, what, self.console_tail()))
                self.cond.wait(left)

    def wait_started(self, timeout=300):
        """Wait for the reader's start line (a boot under TCG on a busy 2-core machine is slow)."""
        i = self.wait_line(lambda l: l.startswith('READER start') or 'GUEST error' in l or
                           l.startswith('READER error'), timeout, 'the latency reader to start')
        if not self.lines[i][1].startswith('READER start'):
            raise AssertionError('the guest failed: %s\nconsole:\n%s' % (self.lines[i][1], self.console_tail()))
        return i

    def mark(self):
        """A position in the console, for lat_since."""
        with self.cond:
            return len(self.lines)

    def lat_since(self, mark, until=None):
        """Per-read latencies (µs) printed between mark and until (default: now)."""
        with self.cond:
            lines = self.lines[mark:until]
        out = []
        for _, line in lines:
            if line and line.startswith('LAT '):
                parts = line.split()
                if len(parts) == 3 and parts[2].isdigit():
                    out.append(int(parts[2]))
        return out

    def wait_reads(self, n, timeout, start=None):
        """Wait until n reads were printed since start (a mark); the latencies."""
        start = self.mark() if start is None else start
        count = [0]

        def pred(line):
            if line.startswith('LAT '):
                count[0] += 1
            return count[0] >= n
        self.wait_line(pred, timeout, '%d guest reads' % n, start)
        return self.lat_since(start)

    def _command(self, word, expect, timeout):
        start = self.mark()
        self.proc.stdin.write(word.encode() + b'\n')
        self.proc.stdin.flush()
        return self.wait_line(lambda l: l.startswith(expect), timeout, '"%s"' % expect, start)

    def pause(self, timeout=60):
        """The guest goes idle (no I/O at all) until resume()."""
        return self._command('pause', 'READER paused', timeout)

    def resume(self, timeout=60):
        return self._command('go', 'READER resumed', timeout)

    def stop_reader(self, timeout=60):
        """Tell the reader to stop; the guest then powers off and QEMU exits (-no-reboot)."""
        start = self.mark()
        try:
            self.proc.stdin.write(b'stop\n')
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return
        self.wait_line(lambda l: l.startswith('READER stop'), timeout, 'the reader to stop', start)


def boot(env, name, disks, reader_args=('--rate=100',), guest_dir=None, memory=256):
    """Build (cached) and boot a guest in the harness's Env; returns the started Guest."""
    g = Guest(env, name, disks, guest_dir or build(), reader_args, memory)
    env.qemus.append(g)
    return g.start()


def percentile(values, p):
    s = sorted(values)
    if not s:
        return float('nan')
    k = min(len(s) - 1, max(0, int(round(p / 100.0 * (len(s) - 1)))))
    return s[k]
