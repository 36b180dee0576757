/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* The mirror's image takes the overlay's format options (mirror-format.c): cluster size, compat,
 * lazy_refcounts, extended_l2, compression type, refcount bits, read from the overlay's header by
 * our fd (not QEMU's word). drive-mirror formats with QEMU 7.2's defaults only; any other options
 * mean the image is formatted first (blockdev-create), then checked through our own fd. */

#include <stdint.h>

#include "qemu.h"

/* The overlay's (overlay_fd, named path in messages) options for a new image of size bytes, in
 * *ret. Returns 1 if they differ from drive-mirror's defaults (then blockdev-create formats the
 * image first, and drive-mirror zeroes all of it before it copies: an L2 entry per cluster of the
 * virtual size), 0 if not, -errno. */
int mirror_format_of_overlay(int overlay_fd, const char *path, uint64_t size, QemuQcow2Options *ret);
/* Does the image QEMU formatted (fd, named path in messages) have the size and options in want, and
 * no backing? 0 if so, -EPROTO if not, -errno if its header cannot be read. */
int mirror_format_check(int fd, const char *path, const QemuQcow2Options *want);
