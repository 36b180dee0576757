/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* The "mirror, then pivot" engine of a full stream (mirror.c), for a running guest and no base:
 * QEMU mirrors the running disk (sync=full) into a fresh image the daemon creates beside the
 * overlay, pivots onto it (job-complete), and the daemon renames the new image onto the
 * overlay's path (RENAME_EXCHANGE, checked, the old overlay unlinked). The job runs as QEMU's
 * job (blockjob_backend: Pause, Resume, Cancel, SetBandwidth); its steps are journaled in
 * job.phase, each saved before it runs, so a daemon killed at any step recovers on restart:
 *
 *   PREPARE  the new image, its fd set and nodes are being made; no mirror job yet. On restart:
 *            all of it removed; the Start that was never answered is not reported.
 *   COPY     QEMU's mirror job copies. On restart: it goes on (QEMU has it).
 *   PIVOT    it was ready: job-complete. QEMU copies what is left, then waits in "pending" with
 *            the disk's I/O held: both images hold the same data from then on.
 *   FINALIZE pending: the flush and job-finalize, by which QEMU pivots onto the new image.
 *   RENAME   QEMU runs on the new image: the rename onto the overlay's path. On restart: done
 *            (or finished, if the exchange happened).
 *   DONE     renamed: Finished("completed").
 *
 * A mirror that fails or is cancelled before FINALIZE, or whose QEMU says it failed before
 * RENAME, leaves the overlay as it was and removes the new image. From FINALIZE on, a job QEMU
 * lost (QEMU went away, or was restarted) may have pivoted and the guest written to the new image
 * since: that image is never removed; it takes the overlay's place unless a process (a new
 * QEMU) has the old overlay open (mirror_on_lost()). Numbered as before FINALIZE came: an older
 * journal's RENAME reads FINALIZE, its DONE RENAME; both finish the same way. */

#include <stdbool.h>
#include <systemd/sd-bus.h>

#include "mirror-files.h"
#include "qemu-reply.h"

typedef struct Disk Disk;
typedef struct Guest Guest;

/* Start's engine choice for a full stream: "mirror" forced, or "auto". Returns 1 when the mirror
 * took the call (answered once the job runs), 0 when "auto" picks another engine, < 0 with error
 * set when "mirror" cannot run here (and nothing was created). */
int mirror_try_start(
        Disk *d, sd_bus_message *msg, bool forced, const char *base_node, uint64_t bandwidth, sd_bus_error *error);

/* QEMU's news of the disk's jobs (guest-peer.c), after job_apply_event()/job_apply_info(): the
 * mirror's own steps (ready, the held completion). Returns the changes
 * left for the disk. */
unsigned mirror_on_event(Disk *d, const QemuJobEvent *ev, unsigned changed);
unsigned mirror_on_info(Disk *d, const QemuBlockJob *info, unsigned changed);

/* After a (re)connect, the jobs applied: the journal's leftovers of a mirror (see above). */
void mirror_resume_orphans(Guest *g);
/* QEMU is gone (its socket cannot be reached): a Start waiting for its new image to be formatted
 * fails, and what it made goes. */
void mirror_start_lost(Disk *d);
