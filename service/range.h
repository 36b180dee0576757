/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* Byte-range streaming, through QEMU's own pieces: a copy-on-read filter node over the disk's
 * top node, exported read-only on the guest's private NBD server; the sandboxed pull helper
 * (blockstream-pull, libnbd) reads the range through it, and every read makes QEMU copy the
 * data into the top image (rangeop.h). Whatever ends a range job, the filter and the export
 * go. The running job is paused, resumed, cancelled and throttled through range_backend
 * (backend.h). */

#include <stdbool.h>
#include <stdint.h>
#include <systemd/sd-bus.h>

typedef struct Disk Disk;
typedef struct Guest Guest;
typedef struct Engine Engine;

/* [offset, end) widened to whole clusters of size cs, the end capped at the disk's size. */
void range_widen(uint64_t offset, uint64_t end, uint64_t cs, uint64_t size, uint64_t *ret_start, uint64_t *ret_stop);

/* Start streaming [offset, offset+length) (already validated and widened to whole clusters);
 * asked_offset/asked_length: the range as the caller gave it, which Offset/Length show; bottom:
 * the lowest node to copy from (NULL: all). Answers msg once the helper runs. */
int range_start(Disk *d, sd_bus_message *msg, uint64_t offset, uint64_t length, uint64_t asked_offset,
        uint64_t asked_length, uint64_t bandwidth, const char *bottom, sd_bus_error *error);

/* Every range job and map, at exit. */
void range_free_all(Engine *m);

/* After a (re)connect: remove what a range job of ours left in QEMU before a restart. */
void range_cleanup_leftovers(Guest *g);
/* The same for one disk, before a new range or prefetch records its own. */
void range_drop_leftovers(Disk *d);
/* Then, with the disks re-read: range jobs that were running when the daemon went away go on
 * with new helpers (or fail, saying why). */
void range_resume_orphans(Guest *g);
