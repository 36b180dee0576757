#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""The bash completion of blockstreamctl against the real daemon: guest names and disk aliases
come from the bus through the real busctl (completion/test-completion.sh covers the rest with a
stand-in busctl)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

COMPLETION = os.path.join(h.SOURCE_ROOT, 'completion', 'blockstreamctl')

# Runs the completion function for the words given (the last one is completed) and prints the
# candidates, one a line.
SNIPPET = r'''
. "$1"; shift
COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
_blockstreamctl blockstreamctl "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
printf '%s\n' "${COMPREPLY[@]}"
'''


class CompletionTest(h.TestCase):

    def complete(self, *words):
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=self.env.bus.address)
        r = h.run(['bash', '-c', SNIPPET, 'completion-test', COMPLETION, 'blockstreamctl'] + list(words), env=env)
        return sorted(x for x in r.stdout.splitlines() if x)

    def test_guests_and_disks_from_the_bus(self):
        # A name sd-bus escapes in the object path ('-' and '.'), and two disks.
        g = self.new_guest(aliases=('vda', 'vdb'), size=64 * h.MiB, name='desk-vm.%d' % os.getpid())
        other = self.new_guest(size=64 * h.MiB)
        self.assertEqual(self.complete('pull', 'desk-'), [g.name])
        self.assertEqual(self.complete('pull', ''), sorted([g.name, other.name]))
        self.assertEqual(self.complete('status', g.name, ''), ['vda', 'vdb'])
        self.assertEqual(self.complete('pause', g.name, 'vdb'), ['vdb'])
        self.assertEqual(self.complete('pull', other.name, ''), ['vda'])
        self.assertEqual(self.complete('unregister', 'desk'), [g.name])
        self.assertEqual(self.complete('pull', 'no-such-guest', ''), [])
        # export-stop: the IDs of the exports
        export, _uri = g.disk('vda').call('Export', 'a{sv}', h.no_opts())
        self.addCleanup(self.client.try_call, export, 'org.blockstream1.Export', 'Stop')
        self.assertEqual(self.complete('export-stop', ''), [h.unwrap(export).rsplit('/', 1)[1]])

    def test_target_names_from_the_bus(self):
        # Disks named at registration (libvirt's vda for virtio-disk0) complete by both names.
        names = h.dbus.Dictionary({'virtio-disk0': 'vda'}, signature='ss', variant_level=1)
        g = self.new_guest(aliases=('virtio-disk0', 'virtio-disk1'), size=64 * h.MiB,
                           options=h.opts(disk_names=names))
        self.assertEqual(self.complete('status', g.name, ''), ['vda', 'virtio-disk0', 'virtio-disk1'])
        self.assertEqual(self.complete('pull', g.name, 'vd'), ['vda'])


if __name__ == '__main__':
    h.main()
