#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""A template behind nbdkit, for the integration tests of remote backings (test_mirror.py,
test_prefetch.py).

On top of harness.py: a small raw template with data in a few places, served by nbdkit over a
unix socket for as long as the test runs (stopped by the test's cleanup)."""

import os

import harness as h
from harness import MiB

SIZE = 64 * MiB


def write_template(path, size=SIZE):
    """A raw file of size bytes holding 16 MiB: 4 MiB of 0x60 + i at i * 16 MiB, for i < 4."""
    with open(path, 'wb') as f:
        f.truncate(size)
        for i in range(4):
            f.seek(i * 16 * MiB)
            f.write(bytes([0x60 + i]) * (4 * MiB))


def serve(test, template, sock):
    """nbdkit serving the raw file template on the unix socket sock, its log in the test's
    directory; returns once it listens (its pid file is written then)."""
    pidfile = sock + '.pid'
    with open(os.path.join(test.env.dir, test.unique_name('nbdkit') + '.log'), 'ab') as logf:
        srv = h.spawn(['nbdkit', '-f', '-U', sock, '-P', pidfile, 'file', template], stdout=logf, stderr=logf)
    test.addCleanup(lambda: srv.poll() is None and (srv.kill(), srv.wait(10)))
    h.wait_until(lambda: os.path.exists(pidfile) and os.path.getsize(pidfile) > 0 or srv.poll() is not None,
                 20, 'nbdkit to listen')
    test.assertIsNone(srv.poll(), 'nbdkit exited')
    return srv


def template_behind_nbd(test, tdir, size=SIZE):
    """write_template() as tdir/template.raw, served on tdir/nbd.sock. Returns (template, sock);
    an overlay reaches it as nbd+unix:///?socket=SOCK."""
    template = os.path.join(tdir, 'template.raw')
    write_template(template, size)
    sock = os.path.join(tdir, 'nbd.sock')
    serve(test, template, sock)
    return template, sock
