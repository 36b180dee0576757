/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* The guest-latency controller (issue 13), library layer: no D-Bus, no I/O, no clock. Each
 * window the caller hands in what it sampled (the guest device's read-latency histogram delta,
 * reduced to a p99; whether the guest did any I/O; the host's I/O pressure) and gets the job's
 * next speed limit and why. Additive increase while the guest's p99 is under the target,
 * multiplicative decrease when it is over or the host is under I/O pressure, a steady limit in
 * a band just under the target (no sawtooth across it), full speed (up to the ceiling) while the
 * guest is idle. All arithmetic saturates: samples may come from a
 * hostile QEMU. */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "qemu-stats.h"

typedef enum ThrottleReason {
        THROTTLE_IDLE,     /* the guest did no I/O in the window: full speed (the ceiling, if any) */
        THROTTLE_YIELDING, /* the guest's p99 or the host's pressure is over its target: slowed down */
        THROTTLE_PROBING,  /* well under target: speeding up step by step */
        THROTTLE_STEADY,   /* just under target (the top ‰ band of steady_permille): holding the limit */
        THROTTLE_CEILING,  /* held at the fixed bandwidth, the hard ceiling of both modes */
        _THROTTLE_REASON_MAX,
} ThrottleReason;

const char *throttle_reason_to_string(ThrottleReason r);

#define THROTTLE_TARGET_MIN_US 1ULL               /* max_guest_latency's bounds */
#define THROTTLE_TARGET_MAX_US 60000000ULL        /* one minute */
#define THROTTLE_SPEED_MAX ((uint64_t) INT64_MAX) /* QEMU's speed is an int64 */

typedef struct ThrottleConfig {
        uint64_t target_p99_us; /* the p99 the guest's reads may reach, µs (required) */
        uint64_t ceiling;       /* bytes/s, 0: none */
        /* Tuning; 0 takes the default. */
        uint64_t min_speed;         /* never below (the job always moves): 1 MiB/s */
        uint64_t start_speed;       /* the first limit when the guest is busy and no rate is known: 16 MiB/s */
        uint64_t step;              /* additive increase per window: 8 MiB/s */
        unsigned decrease_permille; /* multiplicative decrease: the new limit is this ‰ of the old: 500 */
        unsigned pressure_permille; /* host "some" I/O stall share over which we yield: 600 (60 %); 1000+: never */
        unsigned steady_permille;   /* a p99 from this ‰ of the target up to it holds the limit: 850 */
        unsigned over_windows;      /* windows over the target in a row before yielding (the first ones
                                     * hold the limit: one noisy window is no trend): 1 */
} ThrottleConfig;

typedef struct ThrottleSample {
        bool guest_active; /* the guest did I/O in the window */
        bool has_p99;      /* p99_us is known (guest reads in the window, histogram on) */
        uint64_t p99_us;   /* the guest's read p99 over the window */
        bool has_pressure;
        unsigned pressure_permille; /* share of the window in which some task stalled on I/O, 0..1000 */
        uint64_t stream_rate;       /* the job's measured rate over the window, bytes/s; 0: unknown */
} ThrottleSample;

typedef struct Throttle {
        ThrottleConfig config; /* with the defaults filled in */
        uint64_t limit;        /* the limit in force, 0: none (full speed) */
        uint64_t busy_limit;   /* the last limit set while the guest was busy: resumed after idle */
        ThrottleReason reason;
        unsigned n_windows;
        unsigned n_over; /* busy windows over the target in a row */
} Throttle;

/* -EINVAL for a target out of [THROTTLE_TARGET_MIN_US, THROTTLE_TARGET_MAX_US], a ceiling above
 * THROTTLE_SPEED_MAX or a decrease_permille >= 1000. Starts at full speed (reason idle). */
int throttle_init(Throttle *t, const ThrottleConfig *config);

/* One window's decision: the new limit (0: none, i.e. full speed), also in t->limit; the reason
 * in t->reason. Never above the ceiling, never below min_speed (or the ceiling, if lower). */
uint64_t throttle_update(Throttle *t, const ThrottleSample *s);

/* A new ceiling for a running controller (SetBandwidth in the adaptive mode); 0: none. */
int throttle_set_ceiling(Throttle *t, uint64_t ceiling);

/* /proc/pressure/io: the "some" and "full" lines, avg10 in hundredths of a percent
 * (0..10000) and total in µs. -EBADMSG on anything malformed or out of range. */
typedef struct PsiLine {
        unsigned avg10, avg60, avg300; /* hundredths of a percent */
        uint64_t total_us;
} PsiLine;

typedef struct Psi {
        PsiLine some, full;
        bool has_full;
} Psi;

int psi_parse(const char *text, size_t len, Psi *ret);

/* The share (‰, 0..1000) of a window of window_us in which some task stalled on I/O, from two
 * readings' totals. -ESTALE if the total went backwards, -EINVAL for an empty window. */
int psi_some_permille(const Psi *prev, const Psi *cur, uint64_t window_us, unsigned *ret);

/* From successive readings to samples: the glue between what the daemon reads each window
 * (query-blockstats of the guest's device, /proc/pressure/io, the job's offset) and
 * throttle_update(). Pure: the caller reads and passes the time. */
typedef struct ThrottleSampler {
        bool primed;
        uint64_t t_usec;
        uint64_t rd_operations, wr_operations, flush_operations;
        QemuLatencyHistogram histogram;
        bool has_psi;
        Psi psi;
        bool has_offset;
        uint64_t offset;
} ThrottleSampler;

/* One reading taken at now_usec (monotonic). psi may be NULL (no PSI in this kernel), offset
 * UINT64_MAX when the job's offset is unknown. The first reading, and the first after a reset,
 * only primes: -EAGAIN. Counters that went back (QEMU restarted, the histogram was set anew):
 * re-primed with this reading, -ESTALE. A clock that did not advance: -EINVAL, nothing kept.
 * Else 0 and *ret: the guest was active if it issued any read, write or flush; p99 from the
 * histogram's delta if it saw reads (µs, rounded up); the stall share; the job's rate. */
int throttle_sampler_feed(ThrottleSampler *s, const QemuBlockStats *stats, const Psi *psi, uint64_t offset,
        uint64_t now_usec, ThrottleSample *ret);
