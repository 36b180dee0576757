#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Two hosts on one machine, for the tests that span hosts (issue 14).

A Host is the harness's Env (its own private system bus, blockstreamd with its own config,
state and runtime directories, its own QEMUs) whose network-facing processes (the daemon, and
so its helpers, and the QEMUs) run in a network namespace of their own. Two namespaces are
joined by a veth pair: `bst-src` 10.77.0.1/24 and `bst-dst` 10.77.0.2/24. The buses, QMP
monitors and NBD unix sockets are path sockets, which every namespace reaches: the test
process itself stays in the machine's namespace and talks to both hosts.

Only one two-host test runs at a time on a machine: a lock (flock, released by the kernel
when its holder dies) guards the namespaces. Whoever holds it first removes what a killed
earlier run left behind (namespaces, veths, processes still inside them), and so does the
cleanup at the end, on success or failure.
"""

import fcntl
import shutil
import os
import signal
import time

import harness as h

NETNS_PREFIX = 'bst-'
LOCK_FILE = '/run/lock/blockstream-fleet-test.lock'
SUBNET = '10.77.0.'
VETH = {'src': ('bst-src', 'bst-veth-s', SUBNET + '1'), 'dst': ('bst-dst', 'bst-veth-d', SUBNET + '2')}


def _ip(*args, check=True):
    return h.run(['ip'] + list(args), check=check, timeout=30)


def _netns_pids(ns):
    r = _ip('netns', 'pids', ns, check=False)
    return [int(x) for x in r.stdout.split() if x.isdigit()]


def remove_network():
    """Remove our namespaces and veths, killing every process still inside a namespace (a
    killed earlier run's daemon, relay or QEMU would otherwise keep it alive)."""
    for ns, veth, _ in VETH.values():
        if os.path.exists('/run/netns/' + ns):
            for pid in _netns_pids(ns):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _ip('netns', 'delete', ns, check=False)
        # A veth goes with its namespace; one left in ours (a setup killed half-way) goes here.
        _ip('link', 'delete', veth, check=False)
    for ns, veth, _ in VETH.values():
        h.wait_until(lambda: not os.path.exists('/run/netns/' + ns), 10, 'namespace %s to go' % ns)
        h.wait_until(lambda: _ip('link', 'show', veth, check=False).returncode != 0, 10, 'veth %s to go' % veth)


class Network:
    """The two namespaces and the veth pair between them."""

    def __init__(self):
        self.lock_fd = None

    def setup(self, timeout=300):
        if shutil.which('ip') is None or shutil.which('nsenter') is None:
            raise AssertionError('ip and nsenter are needed (apt-get install iproute2 util-linux)')
        os.makedirs(os.path.dirname(LOCK_FILE), exist_ok=True)
        self.lock_fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AssertionError('another two-host test holds %s for more than %ds' % (LOCK_FILE, timeout))
                time.sleep(0.5)
        try:
            # We hold the lock, so whatever namespace of ours exists is a dead run's leftover.
            remove_network()
            (src_ns, src_veth, _), (dst_ns, dst_veth, _) = VETH['src'], VETH['dst']
            _ip('netns', 'add', src_ns)
            _ip('netns', 'add', dst_ns)
            _ip('link', 'add', src_veth, 'type', 'veth', 'peer', 'name', dst_veth)
            for ns, veth, addr in (VETH['src'], VETH['dst']):
                _ip('link', 'set', veth, 'netns', ns)
                _ip('-n', ns, 'addr', 'add', addr + '/24', 'dev', veth)
                _ip('-n', ns, 'link', 'set', veth, 'up')
                _ip('-n', ns, 'link', 'set', 'lo', 'up')
        except BaseException:
            self.teardown()
            raise
        return self

    def teardown(self):
        try:
            remove_network()
        finally:
            if self.lock_fd is not None:
                os.close(self.lock_fd)     # releases the lock
                self.lock_fd = None


def nsenter(ns):
    return ['nsenter', '--net=/run/netns/' + ns, '--']


class HostDaemon(h.Daemon):
    def __init__(self, env, config_extra=''):
        super().__init__(env, config_extra)
        self.netns = env.netns

    def argv(self):
        # nsenter execs the daemon in place: its pid is the daemon's, PR_SET_PDEATHSIG stays.
        return nsenter(self.netns) + super().argv()


class HostQemu(h.Qemu):
    """A guest's QEMU in its host's namespace. blockdevs: the -blockdev/-device arguments of its
    disks, if not the harness's (a qcow2 over a file per disk)."""

    def __init__(self, env, name, disks, extra_args=(), blockdevs=None):
        super().__init__(env, name, disks, extra_args)
        self.blockdevs = blockdevs

    def argv(self):
        a = super().argv()
        if self.blockdevs is not None:
            # Replace the harness's disks (everything from the first -blockdev to the monitors).
            first = a.index('-blockdev') if '-blockdev' in a else a.index('-qmp')
            a = a[:first] + list(self.blockdevs) + a[a.index('-qmp'):]
        return nsenter(self.env.netns) + a

    def wait_status(self, statuses, timeout=60):
        """Wait until QEMU's run state is one of `statuses`; return it."""
        box = {}

        def check():
            box['status'] = self.qmp.cmd('query-status')['status']
            return box['status'] in statuses
        try:
            h.wait_until(check, timeout, 'QEMU %s to be %s' % (self.name, ' or '.join(statuses)))
        except AssertionError as e:
            raise AssertionError('%s (it is %s)' % (e, box.get('status'))) from None
        return box['status']


class Host(h.Env):
    """One host: its namespace, bus, daemon (with config_extra) and QEMUs."""

    def __init__(self, role, config_extra=''):
        super().__init__('host' + role)
        self.role = role
        self.netns, _, self.address = VETH[role]
        self.config_extra = config_extra

    def start(self, daemon=True, polkit=False, polkit_rules=None):
        self.bus = h.Bus(self)
        self.bus.start()
        self.client = h.Client(self.bus.address)
        if polkit:
            self.polkit = h.Polkit(self, polkit_rules)
            self.polkit.start()
        self.daemon = HostDaemon(self, self.config_extra)
        if daemon:
            self.daemon.start()
        return self

    def new_qemu(self, name, disks, extra_args=(), blockdevs=None):
        q = HostQemu(self, name, disks, extra_args, blockdevs)
        self.qemus.append(q)
        return q.start()
