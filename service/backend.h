/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* One interface for whatever runs a disk's job. Today two backends: QEMU's block-stream job
 * (blockjob.c: the whole disk, or down to a base) and the range backend (range.c: a pull
 * helper reading a byte range through a copy-on-read export). The prefetch engine (prefetch.c)
 * runs on both: its phase 1 is a range op, its phase 2 QEMU's job. The BlockStream object asks
 * job_backend_of() which one runs the disk's job and calls it; it never branches on the kind.
 * A new engine is one new file with one JobBackend.
 *
 * Each call answers through reply: at once (a helper told over its control socket), or once
 * QEMU answered. error is 0, -EREMOTEIO with QEMU's words in desc, or another -errno. The reply
 * runs at most once; destroy(userdata) always runs after it (or at once if the call failed to
 * send: then the caller reports the returned error and no reply runs). */

#include <stdbool.h>
#include <stdint.h>

typedef struct Disk Disk;

typedef void (*job_backend_reply_t)(int error, const char *desc, void *userdata);

typedef enum JobControl {
        JOB_CONTROL_CANCEL,
        JOB_CONTROL_PAUSE,
        JOB_CONTROL_RESUME,
        _JOB_CONTROL_MAX,
} JobControl;

typedef struct JobBackend {
        const char *name;
        /* How a call that could not be sent is reported ("…: %m"). */
        const char *control_error;
        const char *speed_error;
        /* Does this backend run d's job now? */
        bool (*runs)(Disk *d);
        /* Can the job be told anything now (its QEMU reachable, or its helper ours)? */
        bool (*reachable)(Disk *d);
        /* Pause, resume or cancel the job. */
        int (*control)(Disk *d, JobControl what, job_backend_reply_t reply, void *userdata, void (*destroy)(void *));
        /* The job's new bandwidth (bytes/s, 0: unlimited). */
        int (*set_speed)(
                Disk *d, uint64_t bandwidth, job_backend_reply_t reply, void *userdata, void (*destroy)(void *));
} JobBackend;

extern const JobBackend blockjob_backend;
extern const JobBackend range_backend;

/* The backend that runs d's job: the range backend while a range job of d runs, else QEMU's job. */
const JobBackend *job_backend_of(Disk *d);

/* QEMU's job of d waits in "pending" (JOB_NEEDS_FINALIZE): make the copied data durable (flush
 * the top node), then finalize, which drops the backing file. */
void blockjob_finalize(Disk *d);
