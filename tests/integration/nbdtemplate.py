#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""A template behind nbdkit, for the integration tests of remote backings (test_mirror.py,
test_prefetch.py, test_range.py).

On top of harness.py: a small raw template with data in a few places, served by nbdkit over a
unix socket for as long as the test runs (stopped by the test's cleanup), and a running guest
whose disk is a qcow2 overlay over it."""

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


def _template_served(test, tdir, size):
    template = os.path.join(tdir, 'template.raw')
    write_template(template, size)
    sock = os.path.join(tdir, 'nbd.sock')
    return template, sock, serve(test, template, sock)


def template_behind_nbd(test, tdir, size=SIZE):
    """write_template() as tdir/template.raw, served on tdir/nbd.sock. Returns (template, sock);
    an overlay reaches it as nbd+unix:///?socket=SOCK."""
    template, sock, _ = _template_served(test, tdir, size)
    return template, sock


class OverlayGuest:
    """What guest_over_template() made: the guest's name, its QEMU, its disk vda (harness.Disk),
    the overlay, the template file and the nbdkit serving it."""

    def __init__(self, name, qemu, disk, top, template, server):
        self.name = name
        self.qemu = qemu
        self.disk = disk
        self.top = top
        self.template = template
        self.server = server


def guest_over_template(test, size=SIZE):
    """A running guest, registered (dropped at the end of the test), whose disk vda is a qcow2
    overlay with no data of its own over template_behind_nbd(), opened by QEMU as an NBD node:
    a template on a remote repository."""
    name = test.unique_name()
    tdir = os.path.join(test.env.images, test.unique_name('tmpl'))
    os.makedirs(tdir)
    template, sock, srv = _template_served(test, tdir, size)
    top = os.path.join(tdir, 'top.qcow2')
    h.qemu_img('create', '-q', '-f', 'qcow2', '-u', '-b', 'nbd+unix:///?socket=' + sock, '-F', 'raw', top,
               str(size))
    q, _ = test.qemu_guest(name, [
        '-blockdev', 'driver=nbd,node-name=tmpl,server.type=unix,server.path=%s,read-only=on' % sock,
        '-blockdev', 'driver=file,filename=%s,node-name=file0' % top,
        '-blockdev', 'driver=qcow2,file=file0,backing=tmpl,node-name=disk0',
        '-device', 'virtio-blk-pci,drive=disk0,id=vda'])
    return OverlayGuest(name, q, h.Disk(test.client, h.disk_path(name, 'vda')), top, template, srv)
