/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* The state machine of one disk's stream job, free of I/O: QEMU's job reports and events go
 * in, what clients see comes out (State, BytesDone/BytesTotal, Rate, ExpectedEndTime, and
 * when Finished is due). stream.c feeds it and publishes it. */

#include <stdbool.h>
#include <stdint.h>

#include "qemu.h"
#include "util.h"

typedef enum StreamState {
        STREAM_IDLE,
        STREAM_RUNNING,
        STREAM_PAUSED,
        STREAM_COMPLETED,
        STREAM_FAILED,
        STREAM_CANCELLED,
        _STREAM_STATE_MAX,
        _STREAM_STATE_INVALID = -1,
} StreamState;

typedef enum StreamMode {
        STREAM_MODE_NONE,
        STREAM_MODE_FULL,
        STREAM_MODE_RANGE,
        _STREAM_MODE_MAX,
        _STREAM_MODE_INVALID = -1,
} StreamMode;

/* Which engine runs (or ran) a job: QEMU's block-stream, prefetch-then-cut (prefetch.c), a range. */
typedef enum StreamEngine {
        STREAM_ENGINE_NONE,
        STREAM_ENGINE_STREAM,
        STREAM_ENGINE_PREFETCH,
        STREAM_ENGINE_RANGE,
        STREAM_ENGINE_MIRROR,
        _STREAM_ENGINE_MAX,
        _STREAM_ENGINE_INVALID = -1,
} StreamEngine;

const char *stream_state_to_string(StreamState s);
StreamState stream_state_from_string(const char *s);
const char *stream_mode_to_string(StreamMode m);
StreamMode stream_mode_from_string(const char *s);
const char *stream_engine_to_string(StreamEngine e);
StreamEngine stream_engine_from_string(const char *s);

#define JOB_SAMPLES 32
#define JOB_RATE_WINDOW_USEC (5 * USEC_PER_SEC)

typedef struct JobSample {
        usec_t t; /* CLOCK_MONOTONIC */
        uint64_t done;
} JobSample;

typedef struct Job {
        char *id; /* QEMU's job id while QEMU may still know the job; NULL otherwise */
        StreamState state;
        StreamMode mode;
        StreamEngine engine;
        /* A prefetch job: 1 while the pull helper copies the backing chain's data, 2 once QEMU's
         * block-stream (id) cuts the backing link. A mirror job: its journal step (mirror.h). 0 for the
         * other engines. */
        unsigned phase;
        /* A mirror job: the overlay it replaces, as its QEMU had it open when the job began. */
        char *overlay; /* its path */
        uint64_t overlay_dev, overlay_ino;
        uint64_t offset, length;
        uint64_t done, total;
        uint64_t bandwidth;
        usec_t start_time; /* CLOCK_REALTIME */
        /* Who started a range or prefetch job, whose share of those it counts in (persisted: a
         * restart carries it on in the same share); UID_INVALID: not known, or another engine. */
        uid_t caller;
        char *error;       /* why it failed; while active, why QEMU paused it on an error (NULL: it did not) */

        /* QEMU concluded the job: the outcome is known, but not yet published. */
        bool concluded;
        StreamState outcome;
        /* Finished was emitted (persisted, so a restart does not emit it again). */
        bool finished;
        bool cancel_requested;
        /* "pending": the flush and block-job-finalize are on their way (per connection). */
        bool finalize_sent;
        /* Cancelled by the daemon because the image could not be made durable: it failed. */
        char *abort_reason;

        JobSample samples[JOB_SAMPLES];
        unsigned n_samples, sample_next;
} Job;

enum {
        JOB_CHANGED_STATE = 1 << 0,
        JOB_CHANGED_PROGRESS = 1 << 1,
        JOB_NOW_CONCLUDED = 1 << 2, /* outcome known: persist, dismiss, then job_publish_outcome() */
        JOB_NEEDS_QUERY = 1 << 3,   /* concluded without telling how, or paused on an error: ask query-block-jobs */
        JOB_CHANGED_ERROR = 1 << 4, /* the reason of a pause on an error came or went */
        JOB_NEEDS_FINALIZE = 1 << 5, /* QEMU waits in "pending" (auto-finalize off): flush, then finalize */
};

void job_done(Job *j);
/* A new job; total is the best estimate before QEMU reports one (the range or the disk size). */
int job_begin(Job *j, const char *id, StreamMode mode, uint64_t offset, uint64_t length, uint64_t total,
        uint64_t bandwidth, usec_t realtime);
bool job_is_active(const Job *j); /* running or paused, as clients see it */
/* What the Error property shows: why it failed, or why QEMU paused it; "" otherwise. */
const char *job_error(const Job *j);

unsigned job_apply_info(Job *j, const QemuBlockJob *info, usec_t mono);
unsigned job_apply_event(Job *j, const QemuJobEvent *ev, usec_t mono);
/* Progress reported by something else than QEMU's job (the range helper). */
unsigned job_apply_progress(Job *j, uint64_t done, uint64_t total, usec_t mono);
/* Paused or running as reported by something else than QEMU's job (the range helper). */
unsigned job_set_paused(Job *j, bool paused);
/* Set the outcome without QEMU (QEMU gone, job lost, helper failed). */
unsigned job_conclude(Job *j, StreamState outcome, const char *error);
/* Publish the concluded outcome: true if Finished must be emitted now (at most once per job). */
bool job_publish_outcome(Job *j);

uint64_t job_rate(const Job *j);
usec_t job_expected_end(const Job *j, usec_t realtime_now);

/* "bsd-<alias>-<n>": a job id of ours, recognisable as such, unique per guest (n: its job_seq),
 * and a valid QEMU id of at most 128 characters whatever the alias (job_id_alias()). */
char *job_id_new(const char *alias, uint64_t seq);
/* The alias as a job id names it: QEMU id characters, and an alias longer than
 * JOB_ID_ALIAS_MAX shortened (its start and a hash), so that "bsd-<alias>-<seq>" is at most 128. */
#define JOB_ID_ALIAS_MAX 100
void job_id_alias(const char *alias, char ret[static JOB_ID_ALIAS_MAX + 1]);
