#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""blockstreamctl -H against a real sshd on 127.0.0.1 (issue 15 §3).

sd-bus runs `ssh -xT -p PORT -- USER@HOST systemd-stdio-bridge` for -H USER@HOST:PORT. The
test starts Debian's sshd on a private port with its own host key and a key for root that
it made, so the remote path runs for real: ssh, sshd, systemd-stdio-bridge, the bus.

Two things stand in for what a remote host's administrator would have configured:
- the client's ssh options (key, known_hosts): an `ssh` first in PATH that adds `-F` with the
  test's own ssh_config (sd-bus execs `ssh` through PATH), as a user's ~/.ssh/config would;
- the bus the bridge reaches: Debian 12's systemd-stdio-bridge (systemd 252) connects to
  /run/dbus/system_bus_socket and ignores DBUS_SYSTEM_BUS_ADDRESS, so the authorized key's
  `command=` runs the real bridge with --bus-path= the test's private bus, after checking
  that the command the client asked for is exactly `systemd-stdio-bridge`.
"""

import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
from harness import MiB  # noqa: E402

SSHD = '/usr/sbin/sshd'
BRIDGE = '/usr/bin/systemd-stdio-bridge'
SIZE = 64 * MiB


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _write(path, text, mode=0o600):
    with open(path, 'w') as f:
        f.write(text)
    os.chmod(path, mode)


class Sshd:
    """sshd -D on 127.0.0.1:PORT, its own host key, one key authorized for root."""

    def __init__(self, directory, bus_address):
        self.dir = directory
        self.port = _free_port()
        self.proc = None
        self.log = os.path.join(directory, 'sshd.log')
        self.bridge_log = os.path.join(directory, 'bridge.log')
        self.bin = os.path.join(directory, 'bin')
        os.makedirs(self.bin)
        d = directory
        h.run(['ssh-keygen', '-q', '-t', 'ed25519', '-N', '', '-f', os.path.join(d, 'host_key')])
        h.run(['ssh-keygen', '-q', '-t', 'ed25519', '-N', '', '-f', os.path.join(d, 'id')])
        with open(os.path.join(d, 'host_key.pub')) as f:
            host_pub = f.read().split()
        with open(os.path.join(d, 'id.pub')) as f:
            client_pub = f.read().strip()
        wrapper = os.path.join(d, 'bridge-command')
        _write(wrapper, '#!/bin/sh\n'
               'printf "%%s\\n" "$SSH_ORIGINAL_COMMAND" >> %s\n'
               'if [ "$SSH_ORIGINAL_COMMAND" != "systemd-stdio-bridge" ]; then\n'
               '    echo "unexpected remote command: $SSH_ORIGINAL_COMMAND" >&2; exit 97\n'
               'fi\n'
               'exec %s --bus-path=%s\n' % (self.bridge_log, BRIDGE, bus_address), 0o755)
        _write(os.path.join(d, 'authorized_keys'),
               'command="%s",no-port-forwarding,no-agent-forwarding,no-X11-forwarding,no-pty %s\n'
               % (wrapper, client_pub))
        self.config = os.path.join(d, 'sshd_config')
        _write(self.config, '\n'.join([
            'Port %d' % self.port,
            'ListenAddress 127.0.0.1',
            'HostKey %s' % os.path.join(d, 'host_key'),
            'PidFile none',
            'AuthorizedKeysFile %s' % os.path.join(d, 'authorized_keys'),
            'PermitRootLogin prohibit-password',
            'PubkeyAuthentication yes',
            'PasswordAuthentication no',
            'KbdInteractiveAuthentication no',
            'UsePAM no',
            'StrictModes no',
            'PrintMotd no',
            'LogLevel VERBOSE',
            '']))
        _write(os.path.join(d, 'known_hosts'), '[127.0.0.1]:%d %s %s\n' % (self.port, host_pub[0], host_pub[1]))
        self.ssh_config = os.path.join(d, 'ssh_config')
        _write(self.ssh_config, '\n'.join([
            'Host *',
            '    IdentityFile %s' % os.path.join(d, 'id'),
            '    IdentitiesOnly yes',
            '    UserKnownHostsFile %s' % os.path.join(d, 'known_hosts'),
            '    GlobalKnownHostsFile /dev/null',
            '    StrictHostKeyChecking yes',
            '    BatchMode yes',
            '    ConnectTimeout 30',
            '']))
        _write(os.path.join(self.bin, 'ssh'), '#!/bin/sh\nexec /usr/bin/ssh -F %s "$@"\n' % self.ssh_config, 0o755)

    def start(self):
        # sshd's privilege separation directory (Debian's unit makes it with RuntimeDirectory=).
        os.makedirs('/run/sshd', mode=0o755, exist_ok=True)
        h.run([SSHD, '-t', '-f', self.config])
        with open(self.log, 'ab') as log:
            self.proc = h.spawn([SSHD, '-D', '-e', '-f', self.config], stdout=subprocess.DEVNULL, stderr=log)

        def listening():
            if self.proc.poll() is not None:
                raise AssertionError('sshd exited with %d:\n%s' % (self.proc.returncode, self.logs()))
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                return s.connect_ex(('127.0.0.1', self.port)) == 0
        h.wait_until(listening, 30, 'sshd to listen on 127.0.0.1:%d' % self.port)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def logs(self):
        try:
            with open(self.log, errors='replace') as f:
                return f.read()
        except OSError:
            return ''

    def bridge_commands(self):
        try:
            with open(self.bridge_log) as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []


class RemoteCliTest(h.TestCase):
    needs_cli = True

    @classmethod
    def setUpClass(cls):
        missing = [p for p in (SSHD, BRIDGE, '/usr/bin/ssh', '/usr/bin/ssh-keygen') if not os.access(p, os.X_OK)]
        if missing:
            raise AssertionError('blockstreamctl -H needs %s (apt-get install openssh-server openssh-client systemd)'
                                 % ', '.join(missing))
        super().setUpClass()
        # Under the class's temporary directory: removed with it (kept with BLOCKSTREAM_TEST_KEEP=1).
        cls.sshdir = os.path.join(cls.env.dir, 'sshd')
        os.makedirs(cls.sshdir)
        cls.sshd = Sshd(cls.sshdir, cls.env.bus.address)
        try:
            cls.sshd.start()
        except BaseException:
            cls.sshd.stop()
            super().tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.sshd.stop()
        super().tearDownClass()

    @property
    def host(self):
        return 'root@127.0.0.1:%d' % self.sshd.port

    def remote(self, *args, timeout=180):
        # A local bus that does not exist: nothing may reach the daemon except through ssh.
        env = dict(os.environ, PATH=self.sshd.bin + ':' + os.environ.get('PATH', '/usr/bin:/bin'),
                   DBUS_SYSTEM_BUS_ADDRESS='unix:path=/nonexistent/blockstream-no-local-bus')
        return h.run([h.BLOCKSTREAMCTL, '-H', self.host] + list(args), check=False, timeout=timeout, env=env)

    def ok(self, *args, **kw):
        r = self.remote(*args, **kw)
        self.assertEqual(r.returncode, 0, 'blockstreamctl -H %s %s: exit %d\nstdout: %s\nstderr: %s\nsshd:\n%s'
                         % (self.host, ' '.join(args), r.returncode, r.stdout, r.stderr, self.sshd.logs()))
        return r

    def test_list_status_pull_wait(self):
        g = self.new_guest(size=SIZE)
        ch = g.chains['vda']
        before = len(self.sshd.bridge_commands())
        r = self.ok('list')
        self.assertIn(g.name, r.stdout)
        r = self.ok('status', g.name)
        self.assertIn('vda', r.stdout)
        self.assertIn(ch.top, r.stdout)
        since = time.monotonic()
        self.ok('pull', g.name, 'vda', '--wait')
        # Every call went through sshd and the bridge it ran, and the client asked for the bridge.
        cmds = self.sshd.bridge_commands()[before:]
        self.assertEqual(cmds, ['systemd-stdio-bridge'] * 3, 'remote commands run by sshd: %r' % cmds)
        d = g.disk()
        self.assertEqual(d.prop('State'), 'completed')
        self.assertEqual(d.prop('BackingChain'), [])
        self.assertEqual(len(d.finished(since)), 1)
        r = self.ok('status', g.name, 'vda')
        self.assertIn('completed', r.stdout)
        g.qemu.quit()
        self.assertIsNone(h.image_backing(ch.top))
        self.assertEqual(ch.compare()[0], 0)

    def test_unknown_host_key_is_refused(self):
        # A host whose key is not the known one: ssh refuses, the CLI fails with a message and
        # the daemon is not reached (no bridge ran).
        other = os.path.join(self.sshdir, 'other_known_hosts')
        h.run(['ssh-keygen', '-q', '-t', 'ed25519', '-N', '', '-f', os.path.join(self.sshdir, 'impostor')])
        with open(os.path.join(self.sshdir, 'impostor.pub')) as f:
            k = f.read().split()
        _write(other, '[127.0.0.1]:%d %s %s\n' % (self.sshd.port, k[0], k[1]))
        bad_bin = os.path.join(self.sshdir, 'bad-bin')
        os.makedirs(bad_bin, exist_ok=True)
        _write(os.path.join(bad_bin, 'ssh'), '#!/bin/sh\nexec /usr/bin/ssh -F %s -o UserKnownHostsFile=%s "$@"\n'
               % (self.sshd.ssh_config, other), 0o755)
        before = len(self.sshd.bridge_commands())
        env = dict(os.environ, PATH=bad_bin + ':' + os.environ.get('PATH', '/usr/bin:/bin'),
                   DBUS_SYSTEM_BUS_ADDRESS='unix:path=/nonexistent/blockstream-no-local-bus')
        r = h.run([h.BLOCKSTREAMCTL, '-H', self.host, 'list'], check=False, timeout=120, env=env)
        self.assertEqual(r.returncode, 1, 'exit %d\nstdout: %s\nstderr: %s' % (r.returncode, r.stdout, r.stderr))
        self.assertIn('127.0.0.1', r.stderr)
        self.assertEqual(self.sshd.bridge_commands()[before:], [])


if __name__ == '__main__':
    h.main()
