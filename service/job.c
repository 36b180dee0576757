/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include "blockstream-api.h"
#include "job.h"

static const char *const state_table[_STREAM_STATE_MAX] = {
        [STREAM_IDLE] = BS_STATE_IDLE,
        [STREAM_RUNNING] = BS_STATE_RUNNING,
        [STREAM_PAUSED] = BS_STATE_PAUSED,
        [STREAM_COMPLETED] = BS_STATE_COMPLETED,
        [STREAM_FAILED] = BS_STATE_FAILED,
        [STREAM_CANCELLED] = BS_STATE_CANCELLED,
};

static const char *const mode_table[_STREAM_MODE_MAX] = {
        [STREAM_MODE_NONE] = BS_MODE_NONE,
        [STREAM_MODE_FULL] = BS_MODE_FULL,
        [STREAM_MODE_RANGE] = BS_MODE_RANGE,
};

static const char *const engine_table[_STREAM_ENGINE_MAX] = {
        [STREAM_ENGINE_NONE] = BS_ENGINE_NONE,
        [STREAM_ENGINE_STREAM] = BS_ENGINE_STREAM,
        [STREAM_ENGINE_PREFETCH] = BS_ENGINE_PREFETCH,
        [STREAM_ENGINE_RANGE] = BS_ENGINE_RANGE,
        [STREAM_ENGINE_MIRROR] = BS_ENGINE_MIRROR,
};

const char *stream_engine_to_string(StreamEngine e) {
        return e >= 0 && e < _STREAM_ENGINE_MAX ? engine_table[e] : NULL;
}

StreamEngine stream_engine_from_string(const char *s) {
        for (int i = 0; s && i < _STREAM_ENGINE_MAX; i++)
                if (streq(s, engine_table[i]))
                        return (StreamEngine) i;
        return _STREAM_ENGINE_INVALID;
}

const char *stream_state_to_string(StreamState s) {
        return s >= 0 && s < _STREAM_STATE_MAX ? state_table[s] : NULL;
}

StreamState stream_state_from_string(const char *s) {
        for (int i = 0; s && i < _STREAM_STATE_MAX; i++)
                if (streq(s, state_table[i]))
                        return (StreamState) i;
        return _STREAM_STATE_INVALID;
}

const char *stream_mode_to_string(StreamMode m) {
        return m >= 0 && m < _STREAM_MODE_MAX ? mode_table[m] : NULL;
}

StreamMode stream_mode_from_string(const char *s) {
        for (int i = 0; s && i < _STREAM_MODE_MAX; i++)
                if (streq(s, mode_table[i]))
                        return (StreamMode) i;
        return _STREAM_MODE_INVALID;
}

void job_done(Job *j) {
        j->id = mfree(j->id);
        j->error = mfree(j->error);
        j->abort_reason = mfree(j->abort_reason);
        j->overlay = mfree(j->overlay);
}

int job_begin(Job *j, const char *id, StreamMode mode, uint64_t offset, uint64_t length, uint64_t total,
        uint64_t bandwidth, usec_t realtime) {
        char *copy = strdup(id);

        if (!copy)
                return -ENOMEM;
        job_done(j);
        *j = (Job) {
                .id = copy,
                .state = STREAM_RUNNING,
                .mode = mode,
                .engine = mode == STREAM_MODE_RANGE ? STREAM_ENGINE_RANGE : STREAM_ENGINE_STREAM,
                .offset = offset,
                .length = length,
                .total = total,
                .bandwidth = bandwidth,
                .start_time = realtime,
                .caller = UID_INVALID,
        };
        return 0;
}

bool job_is_active(const Job *j) {
        return j->state == STREAM_RUNNING || j->state == STREAM_PAUSED;
}

const char *job_error(const Job *j) {
        return j->state == STREAM_FAILED || j->state == STREAM_PAUSED ? strempty(j->error) : "";
}

static void job_sample(Job *j, usec_t mono) {
        j->samples[j->sample_next] = (JobSample) { .t = mono, .done = j->done };
        j->sample_next = (j->sample_next + 1) % JOB_SAMPLES;
        if (j->n_samples < JOB_SAMPLES)
                j->n_samples++;
}

unsigned job_apply_progress(Job *j, uint64_t done, uint64_t total, usec_t mono) {
        uint64_t old_done = j->done, old_total = j->total;

        if (!job_is_active(j) || j->concluded)
                return 0;
        /* QEMU reports len = offset = 0 in a job's first moments: that is "unknown", not "nothing". */
        if (total > 0)
                j->total = total;
        /* A prefetch job makes two passes over the disk: its helper's (phase 1) counts as the first
         * half of the total, QEMU's block-stream (phase 2) as the second. */
        if (j->engine == STREAM_ENGINE_PREFETCH && j->phase == 1)
                done = MIN(done, j->total) / 2;
        else if (j->engine == STREAM_ENGINE_PREFETCH && j->phase == 2)
                done = j->total / 2 + MIN(done, j->total) / 2 + (done >= j->total ? j->total % 2 : 0);
        /* Progress never runs backwards, and never past the total. */
        if (done > j->done)
                j->done = done;
        if (j->done > j->total)
                j->done = j->total;
        /* The rate is of running time: a paused job's samples would dilute it after the resume. */
        if (mono > 0 && j->state == STREAM_RUNNING)
                job_sample(j, mono);
        return (j->done != old_done || j->total != old_total) ? JOB_CHANGED_PROGRESS : 0;
}

static int set_error(Job *j, const char *error) {
        char *e = NULL;

        if (error) {
                e = strdup(error);
                if (!e)
                        return -ENOMEM;
        }
        free(j->error);
        j->error = e;
        return 0;
}

static unsigned job_set_status(Job *j, QemuJobStatus status) {
        StreamState s = j->state;
        unsigned changed = 0;

        /* Only a job the daemon began (and has not ended) changes with what QEMU says of it: a
         * QEMU that speaks of a job whose id it guessed while the daemon still prepares it (a
         * mirror's image), or of one ended, would make it active, and its end would never come. */
        if (j->concluded || !job_is_active(j))
                return 0;
        switch (status) {
        case QEMU_JOB_PAUSED:
        case QEMU_JOB_STANDBY:
                s = STREAM_PAUSED;
                break;
        case QEMU_JOB_CREATED:
        case QEMU_JOB_RUNNING:
        case QEMU_JOB_READY:
        case QEMU_JOB_WAITING:
        case QEMU_JOB_ABORTING:
                s = STREAM_RUNNING;
                break;
        case QEMU_JOB_PENDING:
                /* Our jobs run with auto-finalize off: QEMU waits for the daemon to make the
                 * copied data durable before the backing file goes (see blockjob_finalize()). */
                changed = j->finalize_sent ? 0 : JOB_NEEDS_FINALIZE;
                s = STREAM_RUNNING;
                break;
        case QEMU_JOB_CONCLUDED:
        case QEMU_JOB_NULL:
                /* The outcome comes from BLOCK_JOB_COMPLETED/CANCELLED or query-block-jobs. */
                return JOB_NEEDS_QUERY;
        default:
                return 0;
        }
        if (s == j->state)
                return changed;
        /* QEMU clears the reason of a pause on an error when the job resumes (and pauses it
         * again, with a new BLOCK_JOB_ERROR, if the error is still there). */
        if (s == STREAM_RUNNING)
                (void) set_error(j, NULL);
        j->state = s;
        j->n_samples = 0; /* the rate restarts with every pause and resume */
        return changed | JOB_CHANGED_STATE;
}

unsigned job_set_paused(Job *j, bool paused) {
        return job_set_status(j, paused ? QEMU_JOB_PAUSED : QEMU_JOB_RUNNING);
}

/* A cancelled job failed if the daemon cancelled it for a reason (blockjob_finalize()). */
static unsigned job_conclude_cancelled(Job *j) {
        if (j->abort_reason)
                return job_conclude(j, STREAM_FAILED, j->abort_reason);
        return job_conclude(j, STREAM_CANCELLED, NULL);
}

unsigned job_conclude(Job *j, StreamState outcome, const char *error) {
        if (j->concluded || !job_is_active(j))
                return 0;
        j->concluded = true;
        j->outcome = outcome;
        if (set_error(j, outcome == STREAM_FAILED ? (error ?: "unknown error") : NULL) < 0)
                j->error = NULL; /* out of memory: lose the text, never the outcome */
        return JOB_NOW_CONCLUDED;
}

#define JOB_PAUSED_NOSPACE \
        "No space left on device: QEMU paused the job; free space on the file system of the disk's image, " \
        "then call Resume."
#define JOB_PAUSED_IO_ERROR "I/O error: QEMU paused the job; repair the storage, then call Resume."

/* QEMU's io-status of a job says why it paused the job on an error (on-error=enospc: a full disk). */
static unsigned job_set_pause_reason(Job *j, QemuIoStatus io) {
        const char *e = io == QEMU_IO_NOSPACE ? JOB_PAUSED_NOSPACE : io == QEMU_IO_FAILED ? JOB_PAUSED_IO_ERROR : NULL;

        if (j->concluded || streq_ptr(e, j->error))
                return 0;
        if (set_error(j, e) < 0)
                return 0; /* out of memory: the reason shows with the next poll */
        return JOB_CHANGED_ERROR;
}

unsigned job_apply_info(Job *j, const QemuBlockJob *info, usec_t mono) {
        unsigned changed = 0;

        if (!j->id || !streq(info->id, j->id))
                return 0;
        if (info->status == QEMU_JOB_CONCLUDED) {
                if (info->len > 0 || info->offset > 0)
                        changed |= job_apply_progress(j, info->offset, info->len, 0);
                if (!info->error)
                        return changed | job_conclude(j, STREAM_COMPLETED, NULL);
                /* QEMU says "Operation canceled" (strerror(ECANCELED)) for a cancelled job. */
                if (j->cancel_requested || streq(info->error, "Operation canceled"))
                        return changed | job_conclude_cancelled(j);
                return changed | job_conclude(j, STREAM_FAILED, info->error);
        }
        /* Status first: a sample belongs to the state the job is in now. */
        changed |= job_set_status(j, info->status) & ~JOB_NEEDS_QUERY;
        changed |= job_set_pause_reason(j, info->io_status);
        return changed | job_apply_progress(j, info->offset, info->len, mono);
}

unsigned job_apply_event(Job *j, const QemuJobEvent *ev, usec_t mono) {
        unsigned changed = 0;

        if (!j->id || !ev->id || !streq(ev->id, j->id))
                return 0;
        switch (ev->kind) {
        case QEMU_EVENT_JOB_STATUS_CHANGE:
                return job_set_status(j, ev->status);
        case QEMU_EVENT_BLOCK_JOB_COMPLETED:
                changed |= job_apply_progress(j, ev->offset, ev->len, mono);
                return changed | job_conclude(j, ev->error ? STREAM_FAILED : STREAM_COMPLETED, ev->error);
        case QEMU_EVENT_BLOCK_JOB_CANCELLED:
                changed |= job_apply_progress(j, ev->offset, ev->len, mono);
                return changed | job_conclude_cancelled(j);
        case QEMU_EVENT_BLOCK_JOB_ERROR:
                /* "stop": QEMU pauses the job; the event does not say why, its io-status does. */
                return streq_ptr(ev->action, "stop") && !j->concluded ? JOB_NEEDS_QUERY : 0;
        default:
                return 0;
        }
}

bool job_publish_outcome(Job *j) {
        if (!j->concluded || j->finished)
                return false;
        j->state = j->outcome;
        if (j->state == STREAM_COMPLETED)
                j->done = j->total;
        j->n_samples = 0;
        j->finished = true;
        j->concluded = false;
        return true;
}

uint64_t job_rate(const Job *j) {
        const JobSample *last, *first = NULL;
        long double rate;

        if (j->state != STREAM_RUNNING || j->n_samples < 2)
                return 0;
        last = &j->samples[(j->sample_next + JOB_SAMPLES - 1) % JOB_SAMPLES];
        /* The oldest sample inside the window. */
        for (unsigned i = j->n_samples; i >= 2; i--) {
                const JobSample *s = &j->samples[(j->sample_next + JOB_SAMPLES - i) % JOB_SAMPLES];
                if (last->t - s->t <= JOB_RATE_WINDOW_USEC) {
                        first = s;
                        break;
                }
        }
        if (!first || last->t <= first->t || last->t - first->t < 200 * USEC_PER_MSEC || last->done < first->done)
                return 0;
        rate = (long double) (last->done - first->done) * USEC_PER_SEC / (long double) (last->t - first->t);
        /* QEMU's figures, bounded to int64 each: a jump of one across 200 ms still overflows uint64. */
        return rate >= (long double) UINT64_MAX ? UINT64_MAX : (uint64_t) rate;
}

usec_t job_expected_end(const Job *j, usec_t realtime_now) {
        uint64_t rate = job_rate(j);
        long double left;

        if (rate == 0 || j->total <= j->done)
                return 0;
        left = (long double) (j->total - j->done) / (long double) rate * USEC_PER_SEC;
        if (left > (long double) (UINT64_MAX - realtime_now))
                return 0;
        return realtime_now + (usec_t) left;
}

void job_id_alias(const char *alias, char ret[static JOB_ID_ALIAS_MAX + 1]) {
        size_t len = strlen(alias);

        if (len <= JOB_ID_ALIAS_MAX) {
                for (size_t i = 0; i <= len; i++)
                        ret[i] = alias[i] ? qemu_id_char(alias[i]) : 0;
                return;
        }
        /* A long alias: its start and a hash of the whole, so that the id stays one QEMU and our
         * state take (at most 128 characters). */
        for (size_t i = 0; i < JOB_ID_ALIAS_MAX - 9; i++)
                ret[i] = qemu_id_char(alias[i]);
        (void) snprintf(ret + JOB_ID_ALIAS_MAX - 9, 10, ".%08" PRIx32, fnv1a32(alias));
}

char *job_id_new(const char *alias, uint64_t seq) {
        char a[JOB_ID_ALIAS_MAX + 1];

        job_id_alias(alias, a);
        return strdup_printf("bsd-%s-%" PRIu64, a, seq);
}
