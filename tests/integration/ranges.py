#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Byte-range streaming and the allocation map, for the integration tests and bench/range-bench.

On top of harness.py:
  - GetAllocationMap's extents (offset, length, depth, kind) and the same view computed from
    `qemu-img map --output=json` (qemu-img's depth 0 is the top image, api.md's depth 1; an
    entry that is not "present" is depth 0, kind "absent");
  - per-cluster views of a map, and what a map must look like after a range [a, b) was streamed;
  - what QEMU must not keep after a range job or a map (filter nodes "bscor-N", NBD exports);
  - the daemon's blockstream-pull children as the kernel sees them;
  - three-image chains with random allocated, zero and absent clusters in each layer."""

import json
import os
import random
import time

import harness as h
from harness import KiB, MiB, T

PULL = 'blockstream-pull'
FILTER_PREFIX = 'bscor-'
KINDS = ('local', 'zero', 'backing', 'absent')
MAP_EXTENTS_MAX = 65536
CLUSTER = 64 * KiB


# ---------------------------------------------------------------------------------------------
# Maps

def merge(extents):
    """Adjacent extents of equal depth and kind as one: [(offset, length, depth, kind)]."""
    out = []
    for off, ln, depth, kind in extents:
        if ln == 0:
            continue
        if out and out[-1][2] == depth and out[-1][3] == kind and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + ln, depth, kind)
        else:
            out.append((off, ln, depth, kind))
    return out


def clip(extents, offset, length):
    end = offset + length
    out = []
    for off, ln, depth, kind in extents:
        s, e = max(off, offset), min(off + ln, end)
        if s < e:
            out.append((s, e - s, depth, kind))
    return out


def kind_of(depth, zero):
    """api.md's kinds from a depth (api.md's numbering) and whether it reads as zeros."""
    if depth == 0:
        return 'absent'
    if depth == 1:
        return 'zero' if zero else 'local'
    return 'backing'


def qemu_img_map(path, fmt='qcow2', force_share=True):
    """The raw entries of `qemu-img map --output=json` of the chain at `path`."""
    a = ['map', '--output=json', '-f', fmt]
    if force_share:
        a.append('-U')
    return json.loads(h.qemu_img(*(a + [path])).stdout)


def api_from_qemu_img(entries, offset=0, length=None):
    """qemu-img map entries as GetAllocationMap must give them for [offset, offset+length)."""
    ext = []
    for e in entries:
        depth = e['depth'] + 1 if e.get('present', True) else 0
        ext.append((e['start'], e['length'], depth, kind_of(depth, e.get('zero', False))))
    if length is None:
        length = (ext[-1][0] + ext[-1][1] - offset) if ext else 0
    return merge(clip(ext, offset, length))


def expected_map(path, offset=0, length=None, fmt='qcow2'):
    return api_from_qemu_img(qemu_img_map(path, fmt), offset, length)


def map_problems(extents, offset, length):
    """What is wrong with a reply of GetAllocationMap(offset, length) that is not a whole page
    (fewer than MAP_EXTENTS_MAX extents): a list of texts, empty when it is well formed."""
    bad = []
    pos = offset
    prev = None
    for i, e in enumerate(extents):
        if len(e) != 4:
            bad.append('extent %d is not (offset, length, depth, kind): %r' % (i, e))
            continue
        off, ln, depth, kind = e
        if off != pos:
            bad.append('extent %d starts at %d, expected %d (ordered and contiguous)' % (i, off, pos))
        if ln <= 0:
            bad.append('extent %d has length %d' % (i, ln))
        if kind not in KINDS:
            bad.append('extent %d has unknown kind %r' % (i, kind))
        elif kind != kind_of(depth, kind == 'zero') or (kind == 'zero' and depth != 1):
            bad.append('extent %d: kind %s does not go with depth %d' % (i, kind, depth))
        if prev is not None and prev[2] == depth and prev[3] == kind:
            bad.append('extents %d and %d are adjacent with equal depth and kind: not merged' % (i - 1, i))
        prev = e
        pos = off + ln
    if pos != offset + length and len(extents) < MAP_EXTENTS_MAX:
        bad.append('the extents end at %d, the range at %d' % (pos, offset + length))
    return bad


def per_cluster(extents, start, end, cs=CLUSTER):
    """{cluster offset: (depth, kind)} over [start, end); an extent must not split a cluster."""
    out = {}
    for off, ln, depth, kind in extents:
        s, e = max(off, start), min(off + ln, end)
        if s >= e:
            continue
        if s % cs or (e % cs and e != end):
            raise AssertionError('extent (%d, %d, %d, %s) splits a %d-byte cluster' % (off, ln, depth, kind, cs))
        for c in range(s, e, cs):
            out[c] = (depth, kind)
    return out


def widen(offset, length, size, cs=CLUSTER):
    """The range the daemon streams for Start(offset, length): whole clusters, length 0 = to the end."""
    end = size if length == 0 else offset + length
    a = offset // cs * cs
    b = min(size, -(-end // cs) * cs)
    return a, b


def zero_clusters(raw_path, start, end, cs=CLUSTER):
    """The clusters of [start, end) of a raw file (the chain's reference) that hold only zeros."""
    out = set()
    zero = bytes(cs)
    with open(raw_path, 'rb') as f:
        f.seek(start)
        for c in range(start, end, cs):
            buf = f.read(min(cs, end - c))
            if buf == zero[:len(buf)]:
                out.add(c)
    return out


def after_range(before, a, b, zeros, size, cs=CLUSTER):
    """What each cluster may be after [a, b) (cluster-aligned) was streamed: {cluster: set of
    (depth, kind)}. Outside the range nothing changes; inside, what was in a backing image is
    local now (or "zero", where the chain reads zeros there: QEMU's copy-on-read writes zeros as
    zeros); local, zero and absent clusters stay what they were."""
    cl = per_cluster(before, 0, size, cs)
    out = {}
    for c, v in cl.items():
        if a <= c < b and v[1] == 'backing':
            out[c] = {(1, 'local'), (1, 'zero')} if c in zeros else {(1, 'local')}
        else:
            out[c] = {v}
    return out


def mismatches(expected, actual_extents, size, cs=CLUSTER, limit=8):
    """Clusters whose (depth, kind) is not among the expected ones, merged into runs for reading."""
    act = per_cluster(actual_extents, 0, size, cs)
    bad = []
    for c in sorted(expected):
        v = act.get(c)
        if v not in expected[c]:
            if bad and bad[-1][1] == c and bad[-1][2] == v and bad[-1][3] == expected[c]:
                bad[-1][1] = c + cs
            else:
                bad.append([c, c + cs, v, expected[c]])
    return ['[%d, %d): %r, expected one of %r' % (s, e, v, sorted(x)) for s, e, v, x in bad[:limit]] + (
        ['... %d more runs' % (len(bad) - limit)] if len(bad) > limit else [])


def local_bytes(extents, start, end):
    return sum(ln for off, ln, depth, kind in clip(extents, start, end - start) if kind in ('local', 'zero'))


def pattern_runs(raw_path, start, end, cs=CLUSTER):
    """[(offset, length, byte)] of [start, end) of a raw file, where each cluster holds one byte
    value throughout (as harness.Chain's images do); None for a cluster that is mixed."""
    runs = []
    with open(raw_path, 'rb') as f:
        f.seek(start)
        for c in range(start, end, cs):
            buf = f.read(min(cs, end - c))
            v = buf[0] if buf.count(buf[0]) == len(buf) else None
            if runs and runs[-1][2] == v and runs[-1][0] + runs[-1][1] == c:
                runs[-1][1] += len(buf)
            else:
                runs.append([c, len(buf), v])
    return [tuple(r) for r in runs]


# ---------------------------------------------------------------------------------------------
# QEMU

def leftovers(qmp):
    """(filter nodes of ours, NBD exports) that QEMU still has."""
    nodes = sorted(n for n in qmp.block_graph() if n and n.startswith(FILTER_PREFIX))
    exports = qmp.cmd('query-block-exports')
    return nodes, exports


def hmp_qemu_io(qemu, alias, cmd):
    out = qemu.qmp.hmp('qemu-io -d /machine/peripheral/%s/virtio-backend "%s"' % (alias, cmd))
    if out.strip():
        raise AssertionError('qemu-io %r on %s: %s' % (cmd, alias, out))


def flush(qemu, alias='vda'):
    """Write QEMU's cached qcow2 metadata out, so that qemu-img -U sees what the guest sees."""
    hmp_qemu_io(qemu, alias, 'flush')


def image_check_shared(path):
    """(exit status, output) of qemu-img check -U: 0 clean."""
    r = h.run(['qemu-img', 'check', '-U', '-f', 'qcow2', path], check=False)
    return r.returncode, r.stdout + r.stderr


def image_compare_shared(path, ref):
    r = h.run(['qemu-img', 'compare', '-U', '-f', 'qcow2', '-F', 'raw', path, ref], check=False, timeout=300)
    return r.returncode, r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------
# The daemon's children

def _ppid_and_argv(pid):
    try:
        with open('/proc/%d/stat' % pid) as f:
            stat = f.read()
        with open('/proc/%d/cmdline' % pid, 'rb') as f:
            argv = [a.decode(errors='replace') for a in f.read().split(b'\0')[:-1]]
    except OSError:
        return None, None
    return int(stat[stat.rindex(')') + 2:].split()[1]), argv


def daemon_children(env):
    """[(pid, argv)] of the processes whose parent is our daemon."""
    if not env.daemon.running():
        return []
    me = env.daemon.proc.pid
    out = []
    for d in os.listdir('/proc'):
        if d.isdigit():
            ppid, argv = _ppid_and_argv(int(d))
            if ppid == me:
                out.append((int(d), argv))
    return out


def pull_helpers(env):
    return [(pid, argv) for pid, argv in daemon_children(env) if argv and os.path.basename(argv[0]) == PULL]


def storage_helpers(env):
    return [(pid, argv) for pid, argv in daemon_children(env)
            if argv and 'qemu-system' in os.path.basename(argv[0]) and 'none' in argv]


# ---------------------------------------------------------------------------------------------
# Random chains

class RandomChain:
    """base <- mid <- top, each layer with random runs of clusters that are allocated (data of a
    random pattern), written as zeros (qemu-io write -z) or left alone, some of them unaligned.
    Also a raw reference of what the chain reads."""

    def __init__(self, directory, seed, size=32 * MiB, cluster_size=CLUSTER, prefix=''):
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        self.size = size
        self.seed = seed
        self.cluster_size = cluster_size
        rng = random.Random(seed)
        names = ('base', 'mid', 'top')
        self.paths = [os.path.join(directory, '%s%s-%d.qcow2' % (prefix, n, seed)) for n in names]
        self.base, self.mid, self.top = self.paths
        self.ref = os.path.join(directory, '%sref-%d.raw' % (prefix, seed))
        backing = None
        for p in self.paths:
            a = ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=%d' % cluster_size]
            if backing:
                a += ['-b', backing, '-F', 'qcow2']
            h.qemu_img(*(a + [p, str(size)]))
            backing = p
        self.commands = {}
        for p in self.paths:
            cmds = []
            pos = 0
            while pos < size:
                # Runs of 1-8 clusters, now and then shifted by a few sectors.
                ln = rng.randint(1, 8) * cluster_size
                if rng.random() < 0.2:
                    ln += rng.choice((-1, 1)) * rng.randint(1, 7) * 512
                ln = max(512, min(ln, size - pos))
                what = rng.random()
                if what < 0.35:
                    cmds.append('write -P 0x%02x %d %d' % (rng.randint(1, 255), pos, ln))
                elif what < 0.55:
                    cmds.append('write -z %d %d' % (pos, ln))
                pos += ln
            self.commands[p] = cmds
            h.run(['qemu-io', '-f', 'qcow2'] + sum((['-c', c] for c in cmds), []) + [p], timeout=300)
        h.qemu_img('convert', '-f', 'qcow2', '-O', 'raw', self.top, self.ref)


def script_qemu_io(path, commands, fmt='qcow2', timeout=600):
    """Many qemu-io commands in one process, through its standard input."""
    import subprocess
    r = subprocess.run(['qemu-io', '-f', fmt, path], input='\n'.join(commands) + '\nquit\n',
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, universal_newlines=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError('qemu-io script on %s failed (exit %d): %s' % (path, r.returncode, r.stderr))


# ---------------------------------------------------------------------------------------------
# D-Bus

def get_map(disk, offset=0, length=0):
    return [tuple(e) for e in disk.call('GetAllocationMap', 'tt', T(offset), T(length))]


def get_whole_map(disk, offset=0, length=0, size=None):
    """GetAllocationMap page after page: a full page (MAP_EXTENTS_MAX extents) goes on from the
    end of its last extent. Returns (extents, pages)."""
    size = size if size is not None else disk.prop('Size')
    end = size if length == 0 else offset + length
    out, pages, cur = [], [], offset
    while True:
        page = get_map(disk, cur, 0 if length == 0 else end - cur)
        pages.append(page)
        out.extend(page)
        if len(page) < MAP_EXTENTS_MAX:
            return out, pages
        cur = page[-1][0] + page[-1][1]
        if cur >= end:
            return out, pages


def wait_for_value(fn, pred, timeout, what, interval=0.05):
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = fn()
        if pred(last):
            return last
        if time.monotonic() > deadline:
            raise AssertionError('timed out after %.1fs waiting for %s (last: %r)' % (timeout, what, last))
        time.sleep(interval)


SIZE = 256 * MiB


def alive(pid):
    """Running (a zombie is not)."""
    try:
        with open('/proc/%d/stat' % pid) as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(')') + 2] != 'Z'


def children(pid):
    """The pids of a process's children (/proc/PID/task/PID/children: one read, fast enough to
    catch a helper that lives for milliseconds)."""
    try:
        with open('/proc/%d/task/%d/children' % (pid, pid)) as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


class RangeTestCase(h.TestCase):
    """Guests of SIZE bytes whose every test ends with no filter node, no export, no pull helper
    and no NBD server socket left (the range and prefetch engines share that machinery)."""

    def guest(self, **kw):
        g = self.new_guest(size=SIZE, **kw)
        # Cleanups run last-in first-out: this one before the guest is dropped.
        self.addCleanup(self.assert_no_leftovers, g)
        return g

    def assert_no_leftovers(self, g, what='the test'):
        if g.qemu.running() and g.qemu.qmp is not None:
            nodes, exports = leftovers(g.qemu.qmp)
            self.assertEqual(nodes, [], 'filter nodes left in QEMU after %s' % what)
            self.assertEqual(exports, [], 'NBD exports left in QEMU after %s' % what)
        helpers = pull_helpers(self.env)
        self.assertEqual(helpers, [], 'blockstream-pull processes left after %s' % what)
        socks = self.server_sockets(g)
        self.assertEqual(socks, [], 'NBD server sockets left in the runtime directory after %s' % what)

    def server_sockets(self, g):
        """The daemon's listening sockets for QEMU's NBD server of guest g (<runtime>/nbd/<name>.sock)."""
        nbd_dir = os.path.join(self.env.daemon.runtime_dir, 'nbd')
        if not os.path.isdir(nbd_dir):
            return []
        return [os.path.join(nbd_dir, f) for f in os.listdir(nbd_dir) if f.startswith(g.name + '.')]

    def assert_one_finished(self, d, since, settle=1.0):
        self.client.pump(settle)
        f = d.finished(since)
        self.assertEqual(len(f), 1, 'Finished emitted %d times: %r' % (len(f), f))
        return f[0]
