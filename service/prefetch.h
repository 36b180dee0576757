/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* The "prefetch, then cut" engine of a full stream (prefetch.c). Phase 1: the pull helper copies
 * the backing chain's data (above the base) into the top image through QEMU's copy-on-read, many
 * requests in flight, over the allocated extents only (what is local already, or absent from the
 * chain, is skipped); phase 2: QEMU's block-stream, which finds everything local and only drops
 * the backing link (flushed and finalized as blockjob.c does). To the user it is one full-stream
 * job: one Progress, one Bandwidth, Pause, Resume, Cancel in either phase, one Finished. While
 * phase 1 runs, range_backend controls it (its op is the disk's range op); in phase 2,
 * blockjob_backend. */

#include <stdbool.h>
#include <systemd/sd-bus.h>

typedef struct Disk Disk;
typedef struct Guest Guest;

/* Start a prefetch job on d (a running guest); base_node: keep it and what lies below (NULL: the
 * whole chain). Answers msg once the helper runs (or the cut, when nothing lies above the base). */
int prefetch_start(Disk *d, sd_bus_message *msg, uint64_t bandwidth, const char *base_node, sd_bus_error *error);

/* Does "auto" pick prefetch for a full stream of d? */
bool prefetch_wins(Disk *d);

/* After a (re)connect, with the disks re-read: a prefetch job whose phase 1 ran when the daemon
 * went away goes on with a new helper (what is local is skipped); phase 2 is QEMU's job and is
 * picked up as any block-stream. */
void prefetch_resume_orphans(Guest *g);
