/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* Byte-range streaming and allocation maps, through QEMU's own pieces: a copy-on-read filter
 * node over the disk's top node, exported read-only on the guest's private NBD server; the
 * sandboxed pull helper (blockstream-pull, libnbd) reads the range through it, and every read
 * makes QEMU copy the data into the top image. A map is block status on a plain export of
 * the disk, read by the same helper. Whatever ends a range job, the filter and the export go. */

#include <stdbool.h>
#include <stdint.h>
#include <systemd/sd-bus.h>

typedef struct Disk Disk;
typedef struct Guest Guest;
typedef struct Manager Manager;
typedef struct RangeOp RangeOp;

#define RANGE_EXTENTS_MAX 65536

/* Start streaming [offset, offset+length) (already validated and widened to whole clusters);
 * asked_offset/asked_length: the range as the caller gave it, which Offset/Length show; bottom:
 * the lowest node to copy from (NULL: all). Answers msg once the helper runs. */
/* [offset, end) widened to whole clusters of size cs, the end capped at the disk's size. */
void range_widen(uint64_t offset, uint64_t end, uint64_t cs, uint64_t size, uint64_t *ret_start, uint64_t *ret_stop);

int range_start(Disk *d, sd_bus_message *msg, uint64_t offset, uint64_t length, uint64_t asked_offset,
        uint64_t asked_length, uint64_t bandwidth, const char *bottom, sd_bus_error *error);
/* The running range job of d: "pause", "resume", "stop", or a bandwidth. */
int range_pause(Disk *d, bool pause);
int range_cancel(Disk *d);
int range_set_bandwidth(Disk *d, uint64_t bandwidth);
bool range_running(Disk *d);

/* GetAllocationMap: answers msg with a(ttus). */
int range_map(Disk *d, sd_bus_message *msg, uint64_t offset, uint64_t length, sd_bus_error *error);

/* The guest's QMP peer is gone: helpers stop, range jobs fail. */
void range_guest_lost(Guest *g);
/* The guest goes away. */
void range_guest_removed(Guest *g);
bool range_guest_busy(Guest *g);
void range_free_all(Manager *m);

/* BLOCK_EXPORT_DELETED from the guest's QMP peer. */
void range_on_export_deleted(Guest *g, const char *id);
/* The disk's QEMU stream job is over: remove the export its maps shared, once unused. */
void range_map_export_release(Disk *d);

/* After a (re)connect: remove what a range job of ours left in QEMU before a restart. */
void range_cleanup_leftovers(Guest *g);
/* Then, with the disks re-read: range jobs that were running when the daemon went away go on
 * with new helpers (or fail, saying why). */
void range_resume_orphans(Guest *g);
