/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* The guest-latency mode of a running job (issue 13), engine layer: every window it reads the
 * guest device's statistics (query-blockstats, with a read-latency histogram it sets on the device
 * if none is there) and /proc/pressure/io, asks the controller (throttle.h) for the job's next
 * limit, and tells the job's backend (backend.h set_speed). All asynchronous on the peer's event
 * loop; one QMP call of its own in flight at a time. What it measured and set is on the disk
 * (GuestReadP99, SpeedLimit, ThrottleReason), published by the BlockStream object. When the mode
 * ends (turned off, the job over, the disk gone) a histogram it set is removed again. */

#include <stdint.h>

#include "disk.h"

#define ADAPTIVE_WINDOW_USEC (500 * USEC_PER_SEC / 1000)

/* Turn the mode on for d's job (or retarget it): target_us in [THROTTLE_TARGET_MIN_US,
 * THROTTLE_TARGET_MAX_US], ceiling the job's fixed bandwidth (0: none). A job still starting is
 * waited for; if none runs by the next window, the mode goes. -EINVAL: target out of range;
 * -ENOMEM. The job keeps its speed until the first window says otherwise. */
int adaptive_start(Disk *d, uint64_t target_us, uint64_t ceiling);

/* adaptive_start() for a job carried on after a restart: a histogram with our boundaries on the
 * device is taken as the one the daemon of before set, and removed when the mode ends. */
int adaptive_resume(Disk *d, uint64_t target_us, uint64_t ceiling);

/* The job the mode waited for began: its target becomes MaxGuestLatency now (else the first
 * window does it). */
void adaptive_job_began(Disk *d);

/* Turn it off (no-op if off): the histogram it set is removed, the properties say "off". The job's
 * speed is the caller's to restore (SetMaxGuestLatency(0): the fixed Bandwidth). */
void adaptive_stop(Disk *d);

/* The speed to give d's job for a new fixed bandwidth (the ceiling): the ceiling itself when the
 * mode is off, else the controller's limit under it. */
uint64_t adaptive_speed_for_ceiling(Disk *d, uint64_t ceiling);

/* A new ceiling took effect on the job (SetBandwidth's answer): the controller holds to it. */
void adaptive_ceiling_applied(Disk *d, uint64_t ceiling, uint64_t speed);

/* The properties' reason when the mode is off. */
#define ADAPTIVE_REASON_OFF "off"
