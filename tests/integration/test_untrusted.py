#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""What a compromised helper or a hostile QEMU says never turns the daemon (issue 9, items 8
and 9).

- A pull helper that sends bytes that are not UTF-8, and terminal escapes, in its error: the
  job's Error, the Finished signal and the method errors carry a sanitized text; GetManagedObjects
  keeps working for every client; the guest survives a daemon restart, also from a state file
  that already holds such bytes.
- A QEMU that names a disk or a node '../../x': nothing of that name reaches the file system, the
  bus or a URI.
- A QEMU that reports another guest's image as its own disk: the other guest still gets it."""

import json
import os
import shutil
import socket
import sys
import threading
import unicodedata

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
from harness import T, S, MiB  # noqa: E402

HOSTILE_PULL = os.environ.get('HOSTILE_PULL') or os.path.join(h.SOURCE_ROOT, 'build', 'tests', 'helpers',
                                                              'hostile-pull')
ERR_HELPER_FAILED = 'org.blockstream1.Error.HelperFailed'


def assert_clean_text(test, text, what):
    """Valid UTF-8 (a str from dbus-python at all), no control characters, bounded."""
    test.assertIsInstance(text, str, what)
    bad = [c for c in text if unicodedata.category(c) == 'Cc']
    test.assertEqual(bad, [], '%s carries control characters: %r' % (what, text))
    test.assertLessEqual(len(text.encode('utf-8')), 1024, '%s is not bounded: %d bytes' % (what, len(text)))


class HostileHelperTest(h.TestCase):
    """blockstream-pull replaced by tests/helpers/hostile-pull.c."""

    env_per_test = True
    needs_daemon = False

    def setUp(self):
        super().setUp()
        if not os.path.exists(HOSTILE_PULL):
            self.skipTest('%s is not built' % HOSTILE_PULL)
        helpers = os.path.join(self.env.dir, 'hostile-helpers')
        os.makedirs(helpers)
        os.chmod(helpers, 0o755)
        shutil.copy(HOSTILE_PULL, os.path.join(helpers, 'blockstream-pull'))
        os.chmod(os.path.join(helpers, 'blockstream-pull'), 0o755)
        # A later HelperDirectory= wins over the harness's own.
        self.env.daemon = h.Daemon(self.env, config_extra='HelperDirectory=%s\n' % helpers)
        self.env.daemon.start()

    def state_file(self, name):
        return os.path.join(self.env.daemon.state_dir, 'guests', name + '.json')

    def check_disk_error(self, g, what):
        d = g.disk()
        err = d.prop('Error')
        assert_clean_text(self, err, what)
        self.assertIn('\ufffd', err, '%s: the invalid bytes are not marked: %r' % (what, err))
        self.assertIn('red', err, '%s: the helper\'s words are lost: %r' % (what, err))
        # Every client, not only this one, still gets the whole tree.
        other = h.Client(self.env.bus.address)
        try:
            objs = other.managed_objects()
        finally:
            other.close()
        self.assertIn(d.path, objs)
        self.assertEqual(objs[d.path][h.IFACE_STREAM]['Error'], err)
        return err

    def test_range_job_error_not_utf8(self):
        g = self.new_guest(size=64 * MiB)
        d = g.disk()
        d.start(0, MiB)
        self.client.wait_prop(d.path, h.IFACE_STREAM, 'State', 'failed')
        err = self.check_disk_error(g, 'Error after a hostile helper')
        result, _, ferr = d.wait_finished(timeout=20)
        self.assertEqual(result, 'failed')
        self.assertEqual(ferr, err)

        # The record survives a restart.
        self.env.stop_daemon()
        self.env.start_daemon()
        self.client.wait_prop(d.path, h.IFACE_STREAM, 'State', 'failed')
        self.assertEqual(self.check_disk_error(g, 'Error after a restart'), err)

        # And a state file that already holds such bytes (written by an older daemon) loses the
        # bytes, not the guest.
        self.env.stop_daemon()
        path = self.state_file(g.name)
        with open(path) as f:
            rec = json.load(f)
        rec['disks'][0]['job']['error'] = 'PLACEHOLDER'
        raw = json.dumps(rec).encode().replace(b'PLACEHOLDER', b'old \\u001b[31mred \xff\xfe\xc0\xaf')
        with open(path, 'wb') as f:
            f.write(raw)
        self.env.start_daemon()
        self.assertTrue(self.client.get(g.path, h.IFACE_GUEST, 'Name'), 'the guest vanished after a restart')
        self.client.wait_prop(d.path, h.IFACE_STREAM, 'State', 'failed')
        self.check_disk_error(g, 'Error loaded from an old state file')

    def test_map_error_not_utf8(self):
        g = self.new_guest(size=64 * MiB)
        e = self.assertDBusError(ERR_HELPER_FAILED, self.client.call, g.disk().path, h.IFACE_STREAM,
                                 'GetAllocationMap', 'tt', T(0), T(MiB), timeout=30)
        assert_clean_text(self, e.message, 'the error of GetAllocationMap')
        self.assertIn('\ufffd', e.message)
        objs = self.client.managed_objects()
        self.assertIn(g.disk().path, objs)


if __name__ == '__main__':
    h.main()
