# SPDX-License-Identifier: LGPL-2.1-or-later
"""Shared pieces of the benchmarks in bench/: a guest and a stream timed from Start to Finished,
the peer's fair flush, fresh overlays, the page cache dropped, files deleted only at the end,
percentiles and the closing table."""

import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), 'tests', 'integration'))
import harness as h  # noqa: E402

# The daemon under measurement logs as in production (info): the tests' debug log writes every
# QMP message, which the peers we compare with do not pay for.
os.environ.setdefault('BLOCKSTREAM_DAEMON_LOG_LEVEL', 'info')

MiB, GiB = h.MiB, h.GiB
TiB = 1 << 40


def pct(values, p):
    s = sorted(values)
    if not s:
        return float('nan')
    k = min(len(s) - 1, max(0, int(round(p / 100.0 * (len(s) - 1)))))
    return s[k]


def median(values):
    return statistics.median(values) if values else float('nan')


def drop_caches():
    subprocess.run(['sync'])
    try:
        with open('/proc/sys/vm/drop_caches', 'w') as f:
            f.write('3\n')
    except OSError:
        pass


def retire(path):
    """Delete path, but only at the end of the run (delete_retired()). On a file system mounted with
    `discard` (this VM's root is), the blocks a deletion frees are discarded at a later journal
    commit, in the middle of whatever runs then: a timed run must not pay for an earlier one's
    deletion. The file moves into a directory beside it (a rename frees nothing)."""
    trash = os.path.join(os.path.dirname(path), '.retired')
    os.makedirs(trash, exist_ok=True)
    os.rename(path, os.path.join(trash, '%d-%s' % (len(_RETIRED), os.path.basename(path))))
    _RETIRED.append(trash)


def delete_retired():
    for trash in set(_RETIRED):
        for name in os.listdir(trash):
            os.unlink(os.path.join(trash, name))
    _RETIRED.clear()


_RETIRED = []


def fresh_overlay(directory, base, name, fmt='qcow2', size=None, unsafe=False, options=None):
    top = os.path.join(directory, name)
    if os.path.exists(top):
        os.unlink(top)
    argv = ['create', '-q', '-f', 'qcow2'] + (['-u'] if unsafe else []) + (['-o', options] if options else [])
    argv += ['-b', base, '-F', fmt, top]
    if size is not None:
        argv.append(str(size))
    h.qemu_img(*argv)
    return top


def time_convert(directory, top):
    """The offline peer of a full stream: qemu-img convert of the chain under top into a new qcow2
    beside it, flushed (timed_peer())."""
    out = os.path.join(directory, 'flat.qcow2')
    return timed_peer(['qemu-img', 'convert', '-f', 'qcow2', '-O', 'qcow2', top, out], out, timeout=600)


def timed_peer(argv, out, timeout=1800):
    """The peer's wall time, its output flushed to disk (sync) inside the time, caches dropped before."""
    if os.path.exists(out):
        os.unlink(out)
    drop_caches()
    t0 = time.monotonic()
    h.run(argv, timeout=timeout)
    subprocess.run(['sync', out])
    dt = time.monotonic() - t0
    retire(out)
    return dt


class Run:
    """One guest (QEMU -S) registered with the daemon, one disk vda streamed from Start until
    Finished arrives on the bus. limit: seconds after which the stream is cancelled and the run
    reported as not finished (with the fraction it had done)."""

    def __init__(self, env, name, top=None, extra_args=()):
        self.env = env
        self.name = name
        disks = [('vda', top)] if top is not None else []
        self.q = env.new_qemu(name, disks, extra_args)
        c = env.client
        c.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'RegisterGuest', 'ssa{sv}', name, self.q.daemon_socket, h.no_opts())
        self.disk = h.Disk(c, h.disk_path(name, 'vda'))

    def stream(self, offset, length, limit=600, options=None):
        """(seconds, done): done False when cancelled at the limit (seconds is then the limit,
        and self.fraction what BytesDone/BytesTotal had reached)."""
        c = self.env.client
        drop_caches()
        since = time.monotonic()
        t0 = time.monotonic()
        self.wall = [time.time(), None]  # Start and Finished, on the clock of QEMU's event timestamps
        self.disk.start(offset, length, options)
        self.fraction = 1.0
        while not self.disk.finished(since):
            c.pump(0.005)
            if time.monotonic() - t0 > limit:
                p = self.disk.props()
                self.fraction = p['BytesDone'] / max(1, p['BytesTotal'])
                self.disk.cancel()
                self.disk.wait_finished(timeout=120, since=since)
                return time.monotonic() - t0, False
        dt = time.monotonic() - t0
        self.wall[1] = time.time()
        res = self.disk.finished(since)[-1]
        if res[0] != 'completed':
            raise RuntimeError('stream of %s ended %s: %s' % (self.name, res[0], res[2]))
        self.props = self.disk.props()
        return dt, True

    def steps(self):
        """Where the last stream's time went: [(step, seconds)] from Start to Finished, cut at each
        status change of a job QEMU ran for it (created, ready, concluded), from the events the
        bench's own monitor of that QEMU received."""
        self.q.qmp.cmd('query-status')  # collects the events queued on the bench's monitor
        marks = [(e['timestamp']['seconds'] + e['timestamp']['microseconds'] / 1e6,
                  '%s %s' % (e['data']['id'], e['data']['status']))
                 for e in self.q.qmp.events if e.get('event') == 'JOB_STATUS_CHANGE'
                 and e['data']['status'] in ('created', 'ready', 'concluded')]
        self.q.qmp.events = []
        marks = [(self.wall[0], 'Start')] + sorted(marks) + [(self.wall[1], 'Finished')]
        return [('%s -> %s' % (a[1], b[1]), b[0] - a[0]) for a, b in zip(marks, marks[1:])]

    def close(self):
        self.q.quit()
        self.env.client.call(h.MANAGER_PATH, h.IFACE_MANAGER, 'UnregisterGuest', 's', self.name)


def fmt_time(dt, done, fraction=1.0):
    if done:
        return '%.2f s' % dt
    return '>%.0f s (cancelled at %.1f%%)' % (dt, 100.0 * fraction)


def table(title, rows):
    """The script's closing lines: | measure | result |."""
    w = max(len(r[0]) for r in rows)
    print()
    print(title)
    print('| %s | result |' % 'measure'.ljust(w))
    print('|%s|---|' % ('-' * (w + 2)))
    for m, v in rows:
        print('| %s | %s |' % (m.ljust(w), v))
    sys.stdout.flush()
