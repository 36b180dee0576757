#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""A guest managed by a real libvirtd (issue 15 §2): the shipped hook registers it, blockstreamd
streams its disk, `virsh blockpull` resyncs libvirt's view, and the domain survives
`virsh destroy` + `virsh start`; the data is checked on the images.

libvirtd and virtlogd run in a private mount namespace in which the test's own directories
are mounted over /run/libvirt, /etc/libvirt/hooks and /etc/blockstream, so nothing of the
machine's libvirt is touched and the hook is the one in contrib/ (a copy, as installed). virsh
reaches that libvirtd through `qemu:///system?socket=…`. The domain is TCG, without a NIC.
"""

import os
import re
import shutil
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
from harness import MiB  # noqa: E402

HOOK = os.path.join(h.SOURCE_ROOT, 'contrib', 'libvirt', 'qemu-hook')
LIBVIRTD = '/usr/sbin/libvirtd'
VIRTLOGD = '/usr/sbin/virtlogd'
VIRSH = '/usr/bin/virsh'
SIZE = 64 * MiB

DOMAIN_XML = """<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'{driver}/>
      <source file='{overlay}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-chardev'/>
    <qemu:arg value='socket,id=blockstream,path={socket},server=on,wait=off'/>
    <qemu:arg value='-mon'/>
    <qemu:arg value='chardev=blockstream,mode=control'/>
  </qemu:commandline>
</domain>
"""

BACKUP_XML = """<domainbackup mode='pull'>
  <server transport='unix' socket='{socket}'/>
  <disks>
    <disk name='vda' backup='yes' type='file'>
      <scratch file='{scratch}'/>
    </disk>
  </disks>
</domainbackup>
"""


def missing_libvirt():
    for p in (LIBVIRTD, VIRTLOGD, VIRSH, '/usr/bin/unshare'):
        if not os.access(p, os.X_OK):
            return ('%s not found: apt-get install libvirt-daemon-system libvirt-daemon-driver-qemu '
                    'libvirt-clients (scripts/install-deps)' % p)
    try:
        import pwd
        pwd.getpwnam('libvirt-qemu')
    except KeyError:
        return 'no user libvirt-qemu (libvirt-daemon-system makes it)'
    return None


class Libvirt:
    """libvirtd + virtlogd in their own mount namespace, over the test's directories."""

    def __init__(self, directory, bus_address, blockstreamctl):
        self.dir = directory
        self.run_dir = os.path.join(directory, 'run-libvirt')
        self.hooks_dir = os.path.join(directory, 'hooks')
        self.etc_dir = os.path.join(directory, 'etc-blockstream')
        self.log = os.path.join(directory, 'libvirtd.log')
        self.sock_root = os.path.join(directory, 'sockets')
        for d in (self.run_dir, self.hooks_dir, self.etc_dir):
            os.makedirs(d)
        shutil.copy(HOOK, os.path.join(self.hooks_dir, 'qemu'))
        os.chmod(os.path.join(self.hooks_dir, 'qemu'), 0o755)
        with open(os.path.join(self.etc_dir, 'libvirt-hook.conf'), 'w') as f:
            f.write('SocketDirectory=%s\nBus=%s\nBlockstreamCtl=%s\nQEMUUser=libvirt-qemu\n'
                    % (self.sock_root, bus_address, blockstreamctl))
        self.uri = 'qemu:///system?socket=%s' % os.path.join(self.run_dir, 'libvirt-sock')
        self.virtlogd_pid = os.path.join(self.run_dir, 'virtlogd.pid')   # not /run/virtlogd.pid: ours
        self.proc = None

    def start(self, virtlogd=True):
        # A restarted libvirtd (virtlogd=False) keeps the first virtlogd: its socket is in run_dir.
        script = ('set -e; mkdir -p /etc/blockstream /run/libvirt /etc/libvirt/hooks; '
                  'mount --bind "$1" /run/libvirt; mount --bind "$2" /etc/libvirt/hooks; '
                  'mount --bind "$3" /etc/blockstream; '
                  '%s exec %s --pid-file=%s'
                  % ('%s --pid-file=%s &' % (VIRTLOGD, self.virtlogd_pid) if virtlogd else '',
                     LIBVIRTD, os.path.join(self.run_dir, 'libvirtd.pid')))
        with open(self.log, 'ab') as log:
            self.proc = h.spawn(['unshare', '--mount', '--propagation', 'private', 'sh', '-c', script, 'sh',
                                 self.run_dir, self.hooks_dir, self.etc_dir],
                                stdout=log, stderr=log, env=dict(os.environ, LIBVIRT_LOG_OUTPUTS='3:stderr'))

        def up():
            if self.proc.poll() is not None:
                raise AssertionError('libvirtd exited with %d:\n%s' % (self.proc.returncode, self.logs()))
            return self.virsh('version', check=False).returncode == 0
        h.wait_until(up, 120, 'libvirtd to answer on %s' % self.uri, interval=0.2)

    def stop_libvirtd(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart_libvirtd(self):
        """SIGTERM leaves the domains running; the new libvirtd reconnects to them."""
        self.stop_libvirtd()
        self.start(virtlogd=False)

    def stop(self):
        self.stop_libvirtd()
        try:
            with open(self.virtlogd_pid) as f:
                pid = int(f.read().strip())
            os.kill(pid, 15)
        except (OSError, ValueError):
            pass

    def virsh(self, *args, check=True, timeout=180):
        r = h.run([VIRSH, '-q', '-c', self.uri] + list(args), check=False, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError('virsh %s: exit %d\nstdout: %s\nstderr: %s\nlibvirtd:\n%s'
                                 % (' '.join(args), r.returncode, r.stdout, r.stderr, self.logs()))
        return r

    def logs(self):
        try:
            with open(self.log, errors='replace') as f:
                return ''.join(f.readlines()[-60:])
        except OSError:
            return ''


class LibvirtTest(h.TestCase):
    needs_cli = True
    needs_daemon = False       # started below with QEMUUsers=libvirt-qemu

    @classmethod
    def setUpClass(cls):
        why = missing_libvirt()
        if why:
            raise unittest.SkipTest(why)
        super().setUpClass()
        env = cls.env
        # QEMU runs as libvirt-qemu: it must reach the images and the socket's directory.
        os.chmod(env.dir, 0o755)
        os.makedirs(env.images, exist_ok=True)
        os.chmod(env.images, 0o755)
        env.daemon = h.Daemon(env, config_extra='QEMUUsers=libvirt-qemu\n')
        env.daemon.start()
        cls.libvirt = Libvirt(os.path.join(env.dir, 'libvirt'), env.bus.address, h.BLOCKSTREAMCTL)
        os.chmod(cls.libvirt.dir, 0o755)
        try:
            cls.libvirt.start()
        except BaseException:
            cls.libvirt.stop()
            super().tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.libvirt.stop()
        super().tearDownClass()

    def ctl(self, *args, timeout=180):
        return h.run([h.BLOCKSTREAMCTL] + list(args), check=False, timeout=timeout,
                     env=dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=self.env.bus.address))

    def ok(self, *args, **kw):
        r = self.ctl(*args, **kw)
        self.assertEqual(r.returncode, 0, 'blockstreamctl %s: exit %d\nstdout: %s\nstderr: %s\ndaemon:\n%s'
                         % (' '.join(args), r.returncode, r.stdout, r.stderr, self.env.logs_text()))
        return r

    def define_domain(self, driver=''):
        """A template with known data, an overlay on it, a domain on the overlay."""
        name = self.unique_name('lv')
        d = os.path.join(self.env.images, name)
        os.makedirs(d)
        os.chmod(d, 0o755)
        template = os.path.join(d, 'template.qcow2')
        overlay = os.path.join(d, 'overlay.qcow2')
        h.qemu_img('create', '-q', '-f', 'qcow2', template, str(SIZE))
        h.qemu_io(template, 'write -P 0x5a 0 1M')
        h.qemu_io(template, 'write -P 0xa5 %d 2M' % (SIZE // 2))
        h.qemu_img('create', '-q', '-f', 'qcow2', '-b', template, '-F', 'qcow2', overlay)
        ref = os.path.join(self.env.dir, name + '-ref.raw')
        h.qemu_img('convert', '-O', 'raw', template, ref)
        sock = os.path.join(self.libvirt.sock_root, name, 'qmp.sock')
        xml = os.path.join(self.env.dir, name + '.xml')
        with open(xml, 'w') as f:
            f.write(DOMAIN_XML.format(name=name, overlay=overlay, socket=sock, driver=driver))
        self.libvirt.virsh('define', xml)
        self.addCleanup(self.libvirt.virsh, 'undefine', name, check=False)
        self.addCleanup(self.libvirt.virsh, 'destroy', name, check=False)
        return name, template, overlay, ref, sock

    def guest_running(self, name, expect=True, timeout=60):
        def check():
            v = self.client.try_call(h.guest_path(name), h.IFACE_PROPS, 'Get', 'ss', h.IFACE_GUEST, 'Running')
            return v[0] is expect if expect else v[0] is not True
        self.client.wait_for(check, timeout, 'guest %s Running=%s' % (name, expect))

    def guest_gone(self, name, timeout=60):
        self.client.wait_for(lambda: self.client.try_call(h.MANAGER_PATH, h.IFACE_MANAGER, 'GetGuest', 's',
                                                          name)[0] is None, timeout, 'guest %s unregistered' % name)

    def start_domain(self, name):
        self.libvirt.virsh('start', name)
        self.guest_running(name)

    def test_hook_register_stream_resync_restart(self):
        name, template, overlay, ref, sock = self.define_domain()
        self.start_domain(name)
        # The hook registered the domain with its UUID and noted libvirt's names for its disks.
        uuid = self.libvirt.virsh('domuuid', name).stdout.strip()
        r = self.ok('status', name)
        self.assertIn('virtio-disk0', r.stdout)
        with open(os.path.join(os.path.dirname(sock), 'disks')) as f:
            self.assertEqual(f.read().split(), ['vda', 'virtio-disk0', overlay])
        j = self.ok('--json', 'status', name).stdout
        self.assertIn(uuid, j)

        # Stream through blockstreamd, by the qdev id QEMU knows the disk by.
        self.ok('pull', name, 'virtio-disk0', '--wait')
        d = h.disk_path(name, 'virtio-disk0')
        self.assertEqual(self.client.get(d, h.IFACE_STREAM, 'State'), 'completed')
        self.assertEqual(h.image_backing(overlay), None)

        # libvirt does not know: its XML still names the template...
        xml = self.libvirt.virsh('dumpxml', name).stdout
        self.assertIn(template, xml, 'libvirt learnt of the stream by itself; docs/libvirt.md says otherwise')
        # ... until an (empty, instant) blockpull of its own resyncs it.
        self.libvirt.virsh('blockpull', name, 'vda', '--wait', timeout=300)
        xml = self.libvirt.virsh('dumpxml', name).stdout
        self.assertNotIn(template, xml)
        self.assertIn(overlay, xml)
        # QEMU no longer holds the template open: another writer may lock it.
        self.assertFalse(h.image_locked(template), 'the template is still open in QEMU after the resync')

        # destroy: the hook unregisters; start: it registers again, on the standalone overlay.
        self.libvirt.virsh('destroy', name)
        self.guest_gone(name)
        self.assertEqual(h.image_compare(overlay, ref)[0], 0, 'the overlay does not hold the template data')
        self.start_domain(name)
        r = self.ok('--json', 'status', name, 'virtio-disk0').stdout
        self.assertIn('"BackingChain":[]', r.replace(' ', ''))
        xml = self.libvirt.virsh('dumpxml', name).stdout
        self.assertNotIn(template, xml)
        self.libvirt.virsh('destroy', name)
        self.guest_gone(name)
        os.unlink(template)   # the overlay stands alone
        self.assertEqual(h.image_compare(overlay, ref)[0], 0)
        self.assertEqual(h.image_check(overlay)[0], 0)

    def test_libvirtd_restart_and_daemon_down(self):
        name, template, overlay, ref, sock = self.define_domain()
        self.start_domain(name)
        # reconnect/begin: the guest is registered already; the hook says so and the guest stays.
        self.libvirt.restart_libvirtd()
        self.assertEqual(self.libvirt.virsh('domstate', name).stdout.strip(), 'running')
        self.guest_running(name)
        self.libvirt.virsh('destroy', name)
        self.guest_gone(name)
        # blockstreamd down: the domain starts all the same (Required=no), unregistered.
        self.env.daemon.stop()
        try:
            self.libvirt.virsh('start', name)
            self.assertEqual(self.libvirt.virsh('domstate', name).stdout.strip(), 'running')
        finally:
            self.env.daemon.start()
        self.assertEqual(self.client.try_call(h.MANAGER_PATH, h.IFACE_MANAGER, 'GetGuest', 's', name)[0], None)
        # The documented way to catch up: a libvirtd restart runs reconnect/begin, which registers.
        self.libvirt.restart_libvirtd()
        self.guest_running(name)
        self.assertIn('virtio-disk0', self.ok('status', name).stdout)

    def test_libvirt_job_refused_while_streaming(self):
        # QEMU, not libvirt, keeps the two apart: libvirt's own job on the disk is refused while
        # ours exists (paused here, so that it exists for sure), and ours then completes.
        name, template, overlay, ref, sock = self.define_domain()
        self.start_domain(name)
        self.ok('pull', name, 'virtio-disk0', '--bandwidth=64K')
        self.ok('pause', name, 'virtio-disk0')
        r = self.libvirt.virsh('blockpull', name, 'vda', check=False)
        self.assertNotEqual(r.returncode, 0, 'libvirt started a second job on a streaming disk: %r' % r)
        self.assertIn('in use by block job', r.stderr)
        self.ok('set-bandwidth', name, 'virtio-disk0', '0')
        self.ok('resume', name, 'virtio-disk0')
        self.ok('wait', name, 'virtio-disk0')
        self.libvirt.virsh('blockpull', name, 'vda', '--wait', timeout=300)
        self.libvirt.virsh('destroy', name)
        self.guest_gone(name)
        self.assertIsNone(h.image_backing(overlay))
        self.assertEqual(h.image_compare(overlay, ref)[0], 0)

    def test_hook_ignores_and_refuses(self):
        # Run as libvirtd runs it, without libvirtd: a domain without our monitor is left alone,
        # a socket outside SocketDirectory= is refused before any directory is made.
        hook = os.path.join(self.libvirt.hooks_dir, 'qemu')
        conf = os.path.join(self.env.dir, 'hook-alone')
        os.makedirs(conf)

        def run_hook(xml, op, sub):
            return subprocess.run([hook, 'x', op, sub, '-'], input=xml, universal_newlines=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        plain = DOMAIN_XML.format(name='plain', overlay='/nonexistent', socket='/x/y.sock', driver='')
        plain = re.sub(r'<qemu:commandline>.*</qemu:commandline>', '', plain, flags=re.S)
        for op, sub in (('prepare', 'begin'), ('started', 'begin'), ('release', 'end')):
            r = run_hook(plain, op, sub)
            self.assertEqual((r.returncode, r.stderr), (0, ''), '%s/%s of a domain without our monitor' % (op, sub))
        for bad in ('/etc/evil/qmp.sock', os.path.join(self.libvirt.sock_root, '..', 'evil', 'qmp.sock'),
                    os.path.join(self.libvirt.sock_root, 'a', 'b', 'qmp.sock'), os.path.join(conf, 'qmp.sock')):
            xml = DOMAIN_XML.format(name='evil', overlay='/nonexistent', socket=bad, driver='')
            r = run_hook(xml, 'prepare', 'begin')
            self.assertEqual(r.returncode, 1, 'prepare with socket %s: %r' % (bad, r))
            self.assertIn('SocketDirectory', r.stderr)
        self.assertFalse(os.path.exists('/etc/evil'))
        self.assertFalse(os.path.exists(os.path.join(os.path.dirname(self.libvirt.sock_root), 'evil')))

    def test_hook_registers_when_names_refused(self):
        # Run as libvirtd runs it (started/begin, the live XML with <alias>), in a namespace that
        # shows it the test's configuration: a target blockstreamd refuses as a name (another
        # disk's qdev id) costs the names, not the registration.
        name = self.unique_name('lv')
        sock = os.path.join(self.libvirt.sock_root, name, 'qmp.sock')
        hook = os.path.join(self.libvirt.hooks_dir, 'qemu')
        xml = DOMAIN_XML.format(name=name, overlay='/nonexistent', socket=sock, driver='')
        disks = ("<disk type='file' device='disk'><source file='/a.qcow2'/><target dev='virtio-disk1' bus='virtio'/>"
                 "<alias name='virtio-disk0'/></disk>"
                 "<disk type='file' device='disk'><source file='/b.qcow2'/><target dev='vdb' bus='virtio'/>"
                 "<alias name='virtio-disk1'/></disk>")
        xml = re.sub(r"<disk type='file'.*?</disk>", disks, xml, flags=re.S)

        def run_hook(op, sub):
            return subprocess.run(['unshare', '--mount', '--propagation', 'private', 'sh', '-c',
                                   'mount --bind "$1" /etc/blockstream && shift && exec "$@"', 'sh',
                                   self.libvirt.etc_dir, hook, name, op, sub, '-'],
                                  input=xml, universal_newlines=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, timeout=120)
        r = run_hook('prepare', 'begin')
        self.assertEqual(r.returncode, 0, r.stderr)
        chains = self.make_chains(('virtio-disk0', 'virtio-disk1'), SIZE)
        self.start_qemu(chains, name=name, extra_args=['-qmp', 'unix:%s,server=on,wait=off' % sock])
        self.addCleanup(run_hook, 'release', 'end')
        r = run_hook('started', 'begin')
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn('names refused', r.stderr)
        self.guest_running(name)
        for alias in ('virtio-disk0', 'virtio-disk1'):
            self.assertEqual(self.client.get(h.disk_path(name, alias), h.IFACE_STREAM, 'Target'), '')

    def test_disk_by_image_path_virt_manager_driver(self):
        # virt-manager's disks: discard='unmap' detect_zeroes='unmap' on the driver.
        name, template, overlay, ref, sock = self.define_domain(" discard='unmap' detect_zeroes='unmap'")
        self.start_domain(name)
        self.ok('pull', name, overlay, '--wait')
        self.assertEqual(h.image_backing(overlay), None)

    def test_disk_by_libvirt_target_name(self):
        # Issue 15: a disk was known only by its qdev id (virtio-disk0); libvirt's users name it by
        # <target dev='vda'>, which QEMU does not know. The hook passes it as --disk-name.
        name, template, overlay, ref, sock = self.define_domain()
        self.start_domain(name)
        self.assertIn('virtio-disk0', self.ok('status', name).stdout)
        self.assertEqual(self.client.get(h.disk_path(name, 'virtio-disk0'), h.IFACE_STREAM, 'Target'), 'vda')
        r = self.ctl('pull', name, 'vda', '--wait')
        print('pull vda: exit %d: %s' % (r.returncode, r.stderr.strip()), file=sys.stderr)
        self.assertEqual(r.returncode, 0)
        self.assertEqual(h.image_backing(overlay), None)

    def test_disk_by_image_path(self):
        # Issue 15 saw this fail (image.filename is `json:{…}` while a backing image is
        # attached); today's daemon finds the disk by its overlay's path: keep it that way.
        name, template, overlay, ref, sock = self.define_domain()
        self.start_domain(name)
        self.assertIn('virtio-disk0', self.ok('status', name).stdout)
        self.ok('pull', name, overlay, '--wait')
        self.assertEqual(h.image_backing(overlay), None)

    def test_export_during_pull_mode_backup(self):
        """Issue 15: libvirt's pull-mode backup runs an NBD server in QEMU (and a filter over the
        disk); Export reported success while its export landed on libvirt's server. Now it fails
        with Busy, leaves nothing, and libvirt's backup serves on; once the backup ends, Export
        works and reads the disk."""
        import offline as o
        name, template, overlay, ref, sock = self.define_domain()
        self.start_domain(name)
        backup_sock = os.path.join(os.path.dirname(sock), 'backup.sock')   # libvirt-qemu's directory
        scratch = os.path.join(os.path.dirname(overlay), 'scratch.qcow2')
        xml = os.path.join(self.env.dir, name + '-backup.xml')
        with open(xml, 'w') as f:
            f.write(BACKUP_XML.format(socket=backup_sock, scratch=scratch))
        self.libvirt.virsh('backup-begin', name, xml)
        self.addCleanup(self.libvirt.virsh, 'domjobabort', name, check=False)
        backup_uri = 'nbd+unix:///vda?socket=' + backup_sock
        self.assertEqual(o.nbd_size(backup_uri), SIZE)

        disk = h.disk_path(name, 'virtio-disk0')
        _, err = self.client.try_call(disk, h.IFACE_STREAM, 'Export', 'a{sv}', h.no_opts())
        self.assertIsNotNone(err, 'Export succeeded while libvirt\'s backup runs the NBD server')
        self.assertEqual(err.name, h.ERR_BUSY, err)
        self.assertEqual(o.exports_on_bus(self.client), [])
        # libvirt's backup is untouched: its job runs and its server still serves the disk.
        self.assertIn('Backup', self.libvirt.virsh('domjobinfo', name).stdout)
        self.assertEqual(o.nbd_sha256(backup_uri), o.file_sha256(ref))

        self.libvirt.virsh('domjobabort', name)
        h.wait_until(lambda: 'None' in self.libvirt.virsh('domjobinfo', name).stdout, 60,
                     'libvirt\'s backup job to end')
        path, uri = o.export(h.Disk(self.client, disk))
        self.addCleanup(self.client.try_call, path, o.IFACE_EXPORT, 'Stop')
        self.assertEqual(o.nbd_sha256(uri), o.file_sha256(ref))
        self.client.call(path, o.IFACE_EXPORT, 'Stop')


if __name__ == '__main__':
    h.main()
