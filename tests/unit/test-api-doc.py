#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""The API written down three times agrees: for each interface, the members of docs/api.md
(methods with their argument types, properties with their types, signals with their argument
types), those of dbus/org.blockstream1.*.xml, and the BS_<INTERFACE>_{METHOD,PROPERTY,SIGNAL}_*
names of service/blockstream-api.h are the same sets. No daemon needed; what differs is named.
The XML against the live daemon: test_introspection_matches_xml (tests/integration)."""

import os
import re
import sys
import unittest
import xml.etree.ElementTree as ET

ROOT = os.path.abspath(os.environ.get('BLOCKSTREAM_SOURCE_ROOT') or
                       os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
API_MD = os.path.join(ROOT, 'docs', 'api.md')
API_H = os.path.join(ROOT, 'service', 'blockstream-api.h')
DBUS_DIR = os.path.join(ROOT, 'dbus')

# Interface → the word of its names in blockstream-api.h.
INTERFACES = {
    'org.blockstream1.Manager': 'MANAGER',
    'org.blockstream1.Guest': 'GUEST',
    'org.blockstream1.BlockStream': 'STREAM',
    'org.blockstream1.Export': 'EXPORT',
    'org.blockstream1.Cache': 'CACHE',
}
KINDS = {'Methods': 'method', 'Properties': 'property', 'Signals': 'signal'}


def xml_members(iface):
    """{(kind, name): signature}: a method's in and out types, a property's type, a signal's types."""
    root = ET.parse(os.path.join(DBUS_DIR, iface + '.xml')).getroot()
    out = {}
    for i in root.findall('interface'):
        if i.get('name') != iface:
            continue
        for m in i.findall('method'):
            args = m.findall('arg')
            out[('method', m.get('name'))] = (
                tuple(a.get('type') for a in args if a.get('direction', 'in') == 'in'),
                tuple(a.get('type') for a in args if a.get('direction') == 'out'))
        for p in i.findall('property'):
            out[('property', p.get('name'))] = p.get('type')
        for s in i.findall('signal'):
            out[('signal', s.get('name'))] = tuple(a.get('type') for a in s.findall('arg'))
    return out


def split_args(text):
    """'s name, a{sv} options' → ('s', 'a{sv}'): the types, at the top level of the commas."""
    out, depth, cur = [], 0, ''
    for c in text:
        if c in '({':
            depth += 1
        elif c in ')}':
            depth -= 1
        if c == ',' and depth == 0:
            out.append(cur)
            cur = ''
        else:
            cur += c
    if cur.strip():
        out.append(cur)
    return tuple(a.split()[0] for a in (x.strip() for x in out))


MEMBER_ROW = re.compile(r'^\|\s*`([A-Za-z]\w*)(?:\((.*?)\)(?:\s*→\s*\((.*)\))?)?`\s*\|(.*)$')


def doc_members(text):
    """{interface: {(kind, name): signature}} from the member tables of docs/api.md: under
    '## <interface>', '### Methods' / '### Properties' / '### Signals', a table whose first
    column is the member in backticks (a method or signal with its arguments, "→ (…)" for a
    method's results; a property's type in the second column)."""
    out, iface, kind = {}, None, None
    for line in text.splitlines():
        m = re.match(r'^## (org\.blockstream1\.\w+)', line)
        if m:
            iface, kind = m.group(1), None
            out.setdefault(iface, {})
            continue
        if line.startswith('## '):
            iface, kind = None, None
            continue
        m = re.match(r'^### (\w+)', line)
        if m:
            kind = KINDS.get(m.group(1))
            continue
        m = MEMBER_ROW.match(line)
        if not (iface and kind and m):
            continue
        name, args, results, rest = m.groups()
        if kind == 'property':
            sig = rest.split('|')[0].strip()
        elif kind == 'method':
            sig = (split_args(args or ''), split_args(results or ''))
        else:
            sig = split_args(args or '')
        if (kind, name) in out[iface]:
            raise AssertionError('docs/api.md lists %s.%s twice' % (iface, name))
        out[iface][(kind, name)] = sig
    return out


def header_members(text):
    """{interface word: {(kind, name)}} from the #defines of blockstream-api.h."""
    out = {}
    for word, kind, name in re.findall(r'^#define BS_([A-Z]+)_(METHOD|PROPERTY|SIGNAL)_\w+ "(\w+)"', text, re.M):
        out.setdefault(word, set()).add((kind.lower(), name))
    return out


def describe(diff):
    return ', '.join('%s %s' % k for k in sorted(diff))


class ApiDocTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        with open(API_MD) as f:
            cls.doc = doc_members(f.read())
        with open(API_H) as f:
            cls.header = header_members(f.read())

    def test_doc_has_every_interface(self):
        self.assertEqual(sorted(self.doc), sorted(INTERFACES), 'the interfaces of docs/api.md')

    def test_doc_matches_xml(self):
        for iface in INTERFACES:
            with self.subTest(interface=iface):
                xml, doc = xml_members(iface), self.doc.get(iface, {})
                self.assertTrue(xml, 'dbus/%s.xml has no members' % iface)
                self.assertEqual(describe(set(xml) - set(doc)), '',
                                 '%s: in dbus/%s.xml, not in docs/api.md' % (iface, iface))
                self.assertEqual(describe(set(doc) - set(xml)), '',
                                 '%s: in docs/api.md, not in dbus/%s.xml' % (iface, iface))
                differ = ['%s %s: api.md %r, XML %r' % (k[0], k[1], doc[k], xml[k])
                          for k in sorted(set(xml) & set(doc)) if doc[k] != xml[k]]
                self.assertEqual(differ, [], '%s: signatures differ' % iface)

    def test_header_matches_xml(self):
        for iface, word in INTERFACES.items():
            with self.subTest(interface=iface):
                xml, names = set(xml_members(iface)), self.header.get(word, set())
                self.assertEqual(describe(xml - names), '',
                                 '%s: in dbus/%s.xml, no BS_%s_* in blockstream-api.h' % (iface, iface, word))
                self.assertEqual(describe(names - xml), '',
                                 '%s: BS_%s_* in blockstream-api.h, not in dbus/%s.xml' % (iface, word, iface))
        self.assertEqual(sorted(set(self.header) - set(INTERFACES.values())), [],
                         'blockstream-api.h names members of an unknown interface')

    def test_parser_reads_signatures(self):
        """The parser itself: a table row of each kind, so that a parser reading nothing cannot pass."""
        doc = doc_members('## org.blockstream1.X\n### Methods\n| member | meaning |\n|---|---|\n'
                          '| `A(s a, a{sv} o) → (o x, s y)` | text |\n| `B()` | |\n'
                          '### Properties\n| `P` | a(ttus) | text |\n### Signals\n| `S(s r, t d)` | |\n')
        self.assertEqual(doc, {'org.blockstream1.X': {
            ('method', 'A'): (('s', 'a{sv}'), ('o', 's')), ('method', 'B'): ((), ()),
            ('property', 'P'): 'a(ttus)', ('signal', 'S'): ('s', 't')}})


if __name__ == '__main__':
    unittest.main(argv=sys.argv[:1] + sys.argv[1:], verbosity=2)
