/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* The storage helper of a guest that is not running: a sandboxed
 * `qemu-system-x86_64 -machine none` (no guest, QEMU's own -sandbox on) that takes QMP on a
 * socketpair and the images as fds (add-fd), so it needs no path to anything. It runs the same
 * block jobs and NBD exports as a guest's own QEMU, and goes away when nothing needs it. */

typedef struct Guest Guest;

/* Spawn it; the guest's waiters run once its disks are attached (or it failed). */
int storage_helper_start(Guest *g);
/* QMP is up: attach the guest's disks. */
void storage_helper_attach(Guest *g);
/* QMP went away: the helper is dead or dying. */
void storage_helper_lost(Guest *g, int error);
/* Ask it to quit (QEMU flushes and unlocks the images on the way out). */
void storage_helper_stop(Guest *g);
/* Kill it at once and forget it (guest going away). */
void storage_helper_kill(Guest *g);
bool storage_helper_attached(Guest *g);
