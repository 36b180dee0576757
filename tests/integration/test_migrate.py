#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Post-copy block migration between two hosts, end to end (issue 14, item 1).

Two hosts on this machine (fleet.py): network namespaces bst-src (10.77.0.1) and bst-dst
(10.77.0.2) joined by a veth pair, each with its own private system bus, blockstreamd and QEMU.
The test is the orchestrator (what libvirt or a user's script would do), and nothing else:

  src: a guest on an overlay of a template; the guest writes to its disk;
       Export the disk over TCP on 10.77.0.1;
  dst: ProvisionDisk an overlay whose backing is that export's nbd:// URI;
       start QEMU with -incoming, the overlay's backing the NBD export with reconnect-delay;
  src: migrate (QEMU's own migration, memory only: the disk is shared through the export);
  dst: cont; register the guest; Start a full stream; the guest writes during the stream;
       on Finished: Export.Stop on src;
and then every byte of the destination's disk is checked against the expected data (template,
the source overlay, the source guest's writes, the destination guest's writes), with
`qemu-img check`, and the overlay has no backing any more.
"""

import json
import os
import signal
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fleet  # noqa: E402
import harness as h  # noqa: E402
import offline as o  # noqa: E402
from harness import MiB  # noqa: E402

SIZE = 64 * MiB
NBD_PORT = 10809
MIGRATION_PORT = 4444
RECONNECT_DELAY = 30    # seconds the destination's NBD client retries a lost connection
HELPER_RESTARTS = 5     # a handed-off export's storage helper is restarted this often in a row (export.c)


class Run:
    """One migration's pieces: the guest's name, QEMUs, images, reference, export."""


class MigrateTest(h.TestCase):
    env_per_test = True        # two hosts of each test's own instead of the harness's one environment

    @classmethod
    def setUpClass(cls):
        o.check_nbd_tools()
        h.check_prerequisites(daemon=True)

    def setUp(self):
        self.net = fleet.Network().setup()
        self.addCleanup(self.net.teardown)
        self.src = self.new_host('src')
        self.dst = self.new_host('dst', 'TemplateURLPrefixes=nbd://%s:%d\n' % (fleet.VETH['src'][2], NBD_PORT))

    def new_host(self, role, config_extra=''):
        host = fleet.Host(role, config_extra)
        self.hosts = getattr(self, 'hosts', []) + [host]
        # Cleanups run last-in first-out: the hosts go before the network.
        self.addCleanup(host.close)
        host.start()
        return host

    def run(self, result=None):
        # On failure, the logs of both hosts (the harness shows self.env's only).
        if result is None:
            return super().run(result)
        before = len(result.failures) + len(result.errors)
        r = super().run(result)
        if len(result.failures) + len(result.errors) > before:
            for host in getattr(self, 'hosts', []):
                sys.stderr.write('\n===== logs of host %s (%s) =====\n%s\n' % (host.role, host.dir, host.logs_text()))
        return r

    # -- the source

    def source_guest(self, name):
        """template.qcow2 <- overlay.qcow2 on src, the reference of their content, and the guest's
        QEMU registered with src's daemon."""
        d = os.path.join(self.src.images, name)
        os.makedirs(d)
        template = os.path.join(d, 'template.qcow2')
        overlay = os.path.join(d, 'overlay.qcow2')
        ref = os.path.join(d, 'ref.raw')
        h.qemu_img('create', '-q', '-f', 'qcow2', template, str(SIZE))
        h.run(['qemu-io', '-f', 'qcow2', '-c', 'write -P 0x11 0 %d' % (24 * MiB),
               '-c', 'write -P 0x12 %d %d' % (40 * MiB, 8 * MiB), template])
        h.qemu_img('create', '-q', '-f', 'qcow2', '-b', template, '-F', 'qcow2', overlay)
        h.qemu_io(overlay, 'write -P 0x21 %d %d' % (8 * MiB, 4 * MiB))
        h.qemu_img('convert', '-f', 'qcow2', '-O', 'raw', overlay, ref)
        q = self.src.new_qemu(name, [('vda', overlay)])
        self.addCleanup(q.kill)
        self.assertEqual(self.ctl(self.src, 'register', name, q.daemon_socket), {'guest': h.guest_path(name)})
        return q, overlay, ref

    def ctl(self, host, *args):
        """blockstreamctl --json on host's bus, as the orchestrator runs it; its JSON output."""
        r = h.run([h.BLOCKSTREAMCTL, '--no-ask-password', '--json'] + list(args),
                  env=dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=host.bus.address))
        return json.loads(r.stdout) if r.stdout.strip() else None

    def write(self, q, ref, pattern, offset, length):
        """A guest write, mirrored into the reference."""
        q.guest_write('vda', pattern, offset, length)
        h.qemu_io(ref, 'write -P 0x%02x %d %d' % (pattern, offset, length), fmt='raw')

    # -- the orchestration, in phases

    def migrate(self, name):
        """Everything up to a running destination guest, migrated, on the export: returns a Run."""
        r = Run()
        r.name = name
        src_addr, dst_addr = fleet.VETH['src'][2], fleet.VETH['dst'][2]

        # src: the running guest writes to its disk before the migration.
        r.src_q, r.src_overlay, r.ref = self.source_guest(name)
        self.write(r.src_q, r.ref, 0x31, 20 * MiB, 2 * MiB)        # over the template's data
        self.write(r.src_q, r.ref, 0x32, 60 * MiB, 1 * MiB)        # where the template has none

        # src: Export over TCP on the veth address.
        out = self.ctl(self.src, 'export', name, 'vda', '--listen=tcp:%s:%d' % (src_addr, NBD_PORT))
        r.export_path, r.uri = out['export'], out['uri']
        self.assertEqual(r.uri, 'nbd://%s:%d/vda' % (src_addr, NBD_PORT))

        # dst: an overlay over the export, provisioned by dst's daemon (which asks the export for
        # its size from dst's namespace: across the veth).
        dst_dir = os.path.join(self.dst.images, name)
        os.makedirs(dst_dir)
        r.dst_overlay = os.path.join(dst_dir, 'overlay.qcow2')
        self.assertEqual(self.ctl(self.dst, 'provision', r.uri, r.dst_overlay), {'size': SIZE})
        info = h.image_info(r.dst_overlay)
        self.assertEqual((info.get('backing-filename'), info.get('backing-filename-format')), (r.uri, 'raw'))

        # dst: QEMU waiting for the migration, its disk's backing the export, with reconnect-delay.
        blockdevs = [
            '-blockdev', 'driver=nbd,node-name=remote0,server.type=inet,server.host=%s,server.port=%d,export=vda,'
                         'reconnect-delay=%d,read-only=on' % (src_addr, NBD_PORT, RECONNECT_DELAY),
            '-blockdev', 'driver=file,filename=%s,node-name=file0' % r.dst_overlay,
            '-blockdev', 'driver=qcow2,file=file0,backing=remote0,node-name=disk0',
            '-device', 'virtio-blk-pci,drive=disk0,id=vda',
        ]
        r.dst_q = self.dst.new_qemu(name, [('vda', r.dst_overlay)],
                                    ['-incoming', 'tcp:%s:%d' % (dst_addr, MIGRATION_PORT)], blockdevs=blockdevs)
        self.addCleanup(r.dst_q.kill)
        self.assertEqual(r.dst_q.qmp.cmd('query-status')['status'], 'inmigrate')
        # Its NBD client is connected to src's export, across the veth.
        self.src.client.wait_prop(r.export_path, o.IFACE_EXPORT, 'Clients', lambda n: n >= 1, 30)

        # src → dst: QEMU's migration of the memory and device state; no block migration.
        r.src_q.qmp.cmd('migrate', uri='tcp:%s:%d' % (dst_addr, MIGRATION_PORT))
        h.wait_until(lambda: r.src_q.qmp.cmd('query-migrate').get('status') in ('completed', 'failed', 'cancelled'),
                     120, 'the migration to end')
        mig = r.src_q.qmp.cmd('query-migrate')
        self.assertEqual(mig.get('status'), 'completed', 'migration: %r' % mig)
        self.assertEqual(r.src_q.qmp.cmd('query-status')['status'], 'postmigrate')
        # The source never ran its CPUs (-S), so the destination takes over "prelaunch".
        r.dst_q.wait_status(('paused', 'prelaunch'))
        self.assertEqual(r.dst_q.qmp.cmd('query-migrate').get('status'), 'completed')
        r.dst_q.qmp.cmd('cont')
        r.dst_q.wait_status(('running',))

        # dst: the guest runs on the export, and writes.
        self.write(r.dst_q, r.ref, 0x41, 0, 1 * MiB)
        self.assertTrue(r.dst_q.guest_read('vda', 0x12, 40 * MiB, 8 * MiB), 'dst reads the template through the export')
        self.assertTrue(r.dst_q.guest_read('vda', 0x31, 20 * MiB, 2 * MiB), "dst reads src guest's write")
        return r

    def start_stream_and_pause(self, r):
        """dst: register the guest, Start a full stream, paused once it has copied 2 MiB."""
        self.ctl(self.dst, 'register', r.name, r.dst_q.daemon_socket)
        r.disk = h.Disk(self.dst.client, h.disk_path(r.name, 'vda'))
        r.disk.client.wait_prop(r.disk.path, h.IFACE_STREAM, 'BackingChain',
                                lambda v: v and v[0].startswith(r.uri), 30)
        # Throttled, so that the guest's writes below land on both sides of the stream's progress.
        self.ctl(self.dst, 'pull', r.name, 'vda', '--bandwidth=1M')
        r.disk.wait_bytes_done(2 * MiB, 120)
        self.ctl(self.dst, 'pause', r.name, 'vda')
        r.disk.wait_state('paused', 60)
        self.assertLess(r.disk.prop('BytesDone'), 62 * MiB, 'the stream went too far for this test before it paused')

    def finish_stream(self, r):
        """dst: guest writes in the paused stream, where it has copied already and where not yet;
        then the stream to its end; src: Export.Stop."""
        self.write(r.dst_q, r.ref, 0x43, 0, 512 * 1024)
        self.write(r.dst_q, r.ref, 0x42, 62 * MiB, 1 * MiB)
        self.ctl(self.dst, 'resume', r.name, 'vda')
        self.ctl(self.dst, 'set-bandwidth', r.name, 'vda', '0')
        fin = self.ctl(self.dst, 'wait', r.name, 'vda')
        self.assertEqual(fin, {'result': 'completed', 'bytes_done': SIZE, 'error': ''})
        self.assertEqual(r.disk.prop('BackingChain'), [])
        # src: the export is no longer needed.
        self.ctl(self.src, 'export-stop', r.export_path)
        self.assertNotIn(r.export_path, self.src.client.managed_objects())

    def check_destination(self, r):
        """Every byte of dst's disk, once its QEMU has flushed and closed it; and its NBD client
        never saw an I/O error."""
        self.assertTrue(r.dst_q.guest_read('vda', 0x12, 40 * MiB, 4 * MiB), 'dst reads without the export')
        r.dst_q.quit()
        with open(r.dst_q.log, errors='replace') as f:
            log = f.read()
        self.assertNotIn('error', log.lower(), "dst's QEMU logged an error")
        rc, out = h.image_check(r.dst_overlay)
        self.assertEqual(rc, 0, 'qemu-img check: %s' % out)
        self.assertIsNone(h.image_backing(r.dst_overlay), "dst's overlay still has a backing file")
        rc, out = h.image_compare(r.dst_overlay, r.ref)
        self.assertEqual(rc, 0, "dst's disk differs from the expected data: %s" % out)
        self.assertEqual(o.file_sha256(r.ref), o.chain_sha256(r.dst_overlay))

    # -- the tests

    def test_postcopy_block_migration(self):
        """The whole sequence, the source QEMU kept (paused) until the export is stopped."""
        r = self.migrate('vm-migrate')
        self.start_stream_and_pause(r)
        self.finish_stream(r)
        r.src_q.kill()
        self.check_destination(r)

    def quit_source(self, r, kill=False):
        """src: the source QEMU quits after the migration (or is killed), as libvirt ends it,
        mid-stream."""
        if kill:
            r.src_q.kill()
        else:
            r.src_q.quit()
        h.wait_until(lambda: not self.src.client.get(h.guest_path(r.name), h.IFACE_GUEST, 'Running'), 30,
                     'src guest to stop running')

    def test_source_qemu_quits_midstream(self):
        """Issue 14, item 5: when the source QEMU exits after the migration, the export keeps
        serving on the same address (handed to the guest's storage helper), so that the
        destination's client, reconnecting, never sees an error. (The daemon used to fail the
        export the moment it lost the QMP connection: the relay and the listener went.)"""
        r = self.migrate('vm-quits')
        self.start_stream_and_pause(r)
        relays = o.relays(self.src)
        self.assertEqual(len(relays), 1, relays)
        self.quit_source(r)
        h.wait_until(lambda: o.storage_helpers(self.src), 30, "the source guest's storage helper")
        self.assertEqual(self.src.client.get(r.export_path, o.IFACE_EXPORT, 'State'), 'serving')
        self.assertEqual([p.pid for p in o.relays(self.src)], [relays[0].pid],
                         'the relay (and so the listening socket) did not stay')
        self.finish_stream(r)
        self.check_destination(r)

    def test_source_qemu_killed_midstream(self):
        """The same with a source QEMU that is SIGKILLed (libvirt's last resort): it had let go
        of its images when the migration completed, so the helper can take them at once."""
        r = self.migrate('vm-killed')
        self.start_stream_and_pause(r)
        self.quit_source(r, kill=True)
        h.wait_until(lambda: o.storage_helpers(self.src), 30, "the source guest's storage helper")
        self.assertEqual(self.src.client.get(r.export_path, o.IFACE_EXPORT, 'State'), 'serving')
        self.finish_stream(r)
        self.check_destination(r)

    def test_handoff_ends_with_the_export(self):
        """After a handoff, Export.Stop lets the storage helper go, and the guest waits for its
        QEMU again: a QEMU started anew on its socket is taken up as before."""
        r = self.migrate('vm-again')
        self.start_stream_and_pause(r)
        self.quit_source(r)
        h.wait_until(lambda: o.storage_helpers(self.src), 30, "the source guest's storage helper")
        self.finish_stream(r)
        h.wait_until(lambda: not o.storage_helpers(self.src), 30, 'the storage helper to exit after Stop')
        guest = h.guest_path(r.name)
        self.assertFalse(self.src.client.get(guest, h.IFACE_GUEST, 'Running'))
        q = self.src.new_qemu(r.name, [('vda', r.src_overlay)])
        self.addCleanup(q.kill)
        self.src.client.wait_prop(guest, h.IFACE_GUEST, 'Running', True, 90)
        # Running is "QMP connected"; the disks are read from the new QEMU right after (NodeName
        # changes then, with its signal): read at once, it could still be the helper's bs-vda.
        self.src.client.wait_prop(h.disk_path(r.name, 'vda'), h.IFACE_STREAM, 'NodeName', 'disk0', 30)
        self.check_destination(r)

    def stream_on(self, r, more=1 * MiB):
        """dst: the paused stream runs again (throttled) until it has copied `more` bytes further."""
        done = r.disk.prop('BytesDone')
        self.ctl(self.dst, 'resume', r.name, 'vda')
        r.disk.wait_bytes_done(done + more, 120)

    def pause_stream(self, r):
        self.ctl(self.dst, 'pause', r.name, 'vda')
        r.disk.wait_state('paused', 120)
        self.assertLess(r.disk.prop('BytesDone'), 62 * MiB, 'the stream went too far for this test before it paused')

    def handed_off(self, r):
        """src: the source QEMU quits mid-stream; the export is served by the storage helper, by
        the same relay (and so on the same address). Returns the helper's pid."""
        relays = [p.pid for p in o.relays(self.src)]
        self.assertEqual(len(relays), 1, relays)
        self.quit_source(r)
        helpers = h.wait_until(lambda: o.storage_helpers(self.src), 30, "the source guest's storage helper")
        self.assertEqual(self.src.client.get(r.export_path, o.IFACE_EXPORT, 'State'), 'serving')
        self.assertEqual([p.pid for p in o.relays(self.src)], relays)
        return helpers[0].pid

    def test_source_helper_killed_midstream(self):
        """Issue 14: the storage helper serving the export after the source QEMU exited is
        SIGKILLed while the destination streams through it: the daemon starts a new one behind
        the same relay (the same address), the destination's NBD client reconnects to it
        (reconnect-delay) and never sees an error, and every byte of the destination's disk is
        right. (The daemon used to fail the export: the destination lost its backing.)"""
        r = self.migrate('vm-helper')
        self.start_stream_and_pause(r)
        relays = [p.pid for p in o.relays(self.src)]
        helper = self.handed_off(r)
        self.stream_on(r)                  # reading through the helper
        os.kill(helper, signal.SIGKILL)
        h.wait_until(lambda: [p for p in o.storage_helpers(self.src) if p.pid != helper], 60,
                     'a new storage helper for the export')
        done = r.disk.prop('BytesDone')
        r.disk.wait_bytes_done(done + 1 * MiB, 120)    # and the stream goes on through the new one
        self.assertEqual(self.src.client.get(r.export_path, o.IFACE_EXPORT, 'State'), 'serving')
        self.assertEqual([p.pid for p in o.relays(self.src)], relays, 'the relay (the address) did not stay')
        self.pause_stream(r)
        self.finish_stream(r)
        self.check_destination(r)

    def test_source_helper_dying_each_time_fails_the_export(self):
        """A handed-off export's storage helper that dies each time it is started is restarted a
        bounded number of times, with a back-off, then the export fails and says why (Error);
        nothing is left running."""
        name = 'vm-dies'
        q, _, _ = self.source_guest(name)
        out = self.ctl(self.src, 'export', name, 'vda', '--listen=tcp:%s:%d' % (fleet.VETH['src'][2], NBD_PORT))
        path = out['export']
        q.quit()
        killed = []

        def kill_helpers():
            for p in o.storage_helpers(self.src):
                if p.pid not in killed:
                    killed.append(p.pid)
                    os.kill(p.pid, signal.SIGKILL)
            return self.src.client.get(path, o.IFACE_EXPORT, 'State') != 'serving'
        h.wait_until(kill_helpers, 180, 'the export to give up on its storage helper')
        self.assertEqual(self.src.client.get(path, o.IFACE_EXPORT, 'State'), 'failed')
        self.assertEqual(len(killed), 1 + HELPER_RESTARTS, 'helpers started: the handoff\'s and the restarts')
        error = self.src.client.get(path, o.IFACE_EXPORT, 'Error')
        self.assertIn('storage helper died %d times' % (1 + HELPER_RESTARTS), error)
        h.wait_until(lambda: not o.storage_helpers(self.src) and not o.relays(self.src), 30,
                     'no helper and no relay left')
        # Stop removes the failed export; the guest waits for its QEMU again.
        self.ctl(self.src, 'export-stop', path)
        self.assertNotIn(path, self.src.client.managed_objects())

    @unittest.skipUnless(os.environ.get('BLOCKSTREAM_TEST_HOOKS') == '1',
                         'the daemon is built without its test hooks (meson -Dtest_hooks=true)')
    def test_source_helper_dying_under_its_server_start_is_restarted(self):
        """The handed-off export's storage helper dies while the daemon's nbd-server-start to it is
        on its way (test hook: the daemon stops itself right after sending it, the test kills the
        helper, the daemon goes on). The command's reply fails before the helper's exit is seen:
        that is the helper's death, restarted once like any other, not the export's failure (it
        failed with "Connection reset by peer")."""
        self.src.restart_daemon_with('BLOCKSTREAM_TEST_NBD_START', 'offline')
        daemon = self.src.daemon.proc.pid
        name = 'vm-start'
        q, _, _ = self.source_guest(name)
        out = self.ctl(self.src, 'export', name, 'vda', '--listen=tcp:%s:%d' % (fleet.VETH['src'][2], NBD_PORT))
        path = out['export']
        q.quit()

        def stopped():
            with open('/proc/%d/stat' % daemon) as f:
                return f.read().rsplit(')', 1)[1].split()[0] == 'T'
        h.wait_until(stopped, 60, 'the daemon to stop at its test hook')
        first = o.storage_helpers(self.src)
        self.assertEqual(len(first), 1, 'the handoff\'s storage helper')
        os.kill(first[0].pid, signal.SIGKILL)
        h.wait_until(lambda: not os.path.exists('/proc/%d/exe' % first[0].pid) or
                     open('/proc/%d/stat' % first[0].pid).read().rsplit(')', 1)[1].split()[0] == 'Z', 10,
                     'the helper to die')
        os.kill(daemon, signal.SIGCONT)

        c = self.src.client

        def since_hook():
            with open(self.src.daemon.log) as f:
                return f.read().split('(test hook)', 1)[-1]
        c.wait_for(lambda: c.get(path, o.IFACE_EXPORT, 'State') == 'failed' or
                   'served by the storage helper now' in since_hook(), 60, 'the export served again, or failed')
        self.assertEqual((c.get(path, o.IFACE_EXPORT, 'State'), c.get(path, o.IFACE_EXPORT, 'Error')), ('serving', ''))
        self.assertNotIn(first[0].pid, [p.pid for p in o.storage_helpers(self.src)])
        self.assertEqual(since_hook().count('starting its storage helper again'), 1, since_hook()[-3000:])

    def restart_source_daemon(self, sig):
        if sig == signal.SIGKILL:
            self.assertEqual(self.src.kill_daemon(), -signal.SIGKILL)
        else:
            self.assertEqual(self.src.stop_daemon(sig), 0, 'blockstreamd did not exit cleanly')
        self.src.start_daemon()

    def wait_export_back(self, r, timeout=90):
        """src: the export is on the bus again, serving on the address it had."""
        c = self.src.client
        c.wait_for(lambda: c.try_call(r.export_path, h.IFACE_PROPS, 'Get', 'ss', o.IFACE_EXPORT, 'State')[0] ==
                   'serving', timeout, 'the export back and serving')
        self.assertEqual(c.get(r.export_path, o.IFACE_EXPORT, 'URI'), r.uri)

    def test_source_daemon_restarted_midstream(self):
        """Issue 14: the source daemon SIGKILLed and started again while the destination streams
        and the export is still served by the (paused) source QEMU: the export comes back on the
        same address, the destination's client reconnects and never sees an error."""
        r = self.migrate('vm-restart')
        self.start_stream_and_pause(r)
        self.stream_on(r)
        self.restart_source_daemon(signal.SIGKILL)
        self.wait_export_back(r)
        done = r.disk.prop('BytesDone')
        r.disk.wait_bytes_done(done + 1 * MiB, 120)
        self.pause_stream(r)
        self.finish_stream(r)
        r.src_q.kill()
        self.check_destination(r)

    def _restart_after_handoff(self, name, sig):
        r = self.migrate(name)
        self.start_stream_and_pause(r)
        helper = self.handed_off(r)
        self.stream_on(r)
        self.restart_source_daemon(sig)
        o.wait_gone(helper, 30, 'the storage helper of the daemon before')
        self.wait_export_back(r)
        self.assertTrue(o.storage_helpers(self.src), 'the export is not served by a new storage helper')
        done = r.disk.prop('BytesDone')
        r.disk.wait_bytes_done(done + 1 * MiB, 120)     # reading through the new helper
        self.pause_stream(r)
        self.finish_stream(r)
        h.wait_until(lambda: not o.storage_helpers(self.src), 30, 'the storage helper to exit after Stop')
        self.check_destination(r)

    def test_source_daemon_sigterm_after_handoff(self):
        """Issue 14: the source daemon restarted (SIGTERM) after the source QEMU exited, while the
        storage helper serves the export mid-stream: the export is handed over again on the same
        address (the daemon used to drop it: "its guest's QEMU is not there after the restart")."""
        self._restart_after_handoff('vm-term', signal.SIGTERM)

    def test_source_daemon_sigkill_after_handoff(self):
        """The same with a SIGKILLed daemon (its relay and helper die with it)."""
        self._restart_after_handoff('vm-kill', signal.SIGKILL)

    def test_handoff_refuses_a_swapped_image(self):
        """The handoff opens the disk by the path QEMU reported, as root: only if that path still
        is the file QEMU had open when the export began (device and inode, from /proc/PID/fd).
        An image renamed over it meanwhile is not served; the export fails as it used to."""
        name = 'vm-swap'
        q, overlay, _ = self.source_guest(name)
        out = self.ctl(self.src, 'export', name, 'vda', '--listen=tcp:%s:%d' % (fleet.VETH['src'][2], NBD_PORT))
        other = os.path.join(os.path.dirname(overlay), 'other.qcow2')
        h.qemu_img('create', '-q', '-f', 'qcow2', other, str(SIZE))
        h.qemu_io(other, 'write -P 0x77 0 %d' % MiB)
        os.rename(other, overlay)         # QEMU goes on with the file it opened
        q.quit()
        self.src.client.wait_prop(out['export'], o.IFACE_EXPORT, 'State', 'failed', 30)
        self.assertEqual(o.storage_helpers(self.src), [])
        with open(self.src.daemon.log, errors='replace') as f:
            self.assertIn('is no longer the file its QEMU had open', f.read())

if __name__ == '__main__':
    h.main()
