/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* The stream job state machine, fed with what QEMU 7.2 really reports (see the sequences in
 * tests/unit/data/transcript-qemu.txt). */

#include <math.h>

#include "job.h"
#include "util.h"
#include "tap.h"

#define MiB ((uint64_t) 1024 * 1024)
#define SEC USEC_PER_SEC
#define MSEC USEC_PER_MSEC
#define DISK ((uint64_t) 256 * MiB)
#define T0 (1000 * SEC) /* CLOCK_MONOTONIC base */
#define RT0 ((usec_t) 1700000000 * SEC)

static void begin(Job *j) {
        *j = (Job){};
        ASSERT_OK(job_begin(j, "bsd-vda-1", STREAM_MODE_FULL, 0, DISK, DISK, 0, RT0));
}

static QemuBlockJob info(const char *id, QemuJobStatus status, uint64_t len, uint64_t offset, const char *error) {
        return (QemuBlockJob){
                .id = (char *) id,
                .type = (char *) "stream",
                .status = status,
                .len = len,
                .offset = offset,
                .error = (char *) error,
        };
}

static QemuJobEvent status_event(const char *id, QemuJobStatus s) {
        return (QemuJobEvent){.kind = QEMU_EVENT_JOB_STATUS_CHANGE, .id = id, .status = s};
}

static QemuJobEvent end_event(QemuEventKind kind, const char *id, uint64_t len, uint64_t offset, const char *error) {
        return (QemuJobEvent){
                .kind = kind, .id = id, .len = len, .offset = offset, .has_progress = true, .error = error};
}

static void test_strings(void) {
        for (int s = 0; s < _STREAM_STATE_MAX; s++)
                ASSERT_EQ(stream_state_from_string(stream_state_to_string((StreamState) s)), s);
        for (int m = 0; m < _STREAM_MODE_MAX; m++)
                ASSERT_EQ(stream_mode_from_string(stream_mode_to_string((StreamMode) m)), m);
        ASSERT_STREQ(stream_state_to_string(STREAM_RUNNING), "running");
        ASSERT_STREQ(stream_state_to_string(STREAM_CANCELLED), "cancelled");
        ASSERT_STREQ(stream_mode_to_string(STREAM_MODE_FULL), "full");
        ASSERT_STREQ(stream_mode_to_string(STREAM_MODE_RANGE), "range");
        ASSERT_NULL(stream_state_to_string(_STREAM_STATE_MAX));
        ASSERT_NULL(stream_state_to_string(_STREAM_STATE_INVALID));
        ASSERT_NULL(stream_mode_to_string(_STREAM_MODE_MAX));
        ASSERT_EQ(stream_state_from_string("Running"), _STREAM_STATE_INVALID);
        ASSERT_EQ(stream_state_from_string(NULL), _STREAM_STATE_INVALID);
        ASSERT_EQ(stream_mode_from_string("partial"), _STREAM_MODE_INVALID);
        ASSERT_EQ(stream_mode_from_string(NULL), _STREAM_MODE_INVALID);
}

/* A job id is at most 128 characters whatever the alias (QEMU's ids and our state take no more):
 * a 128-character alias made a longer one, which a restarted daemon refused with its guest. */
static void test_id_of_a_long_alias(void) {
        char a[129], b[129];
        _cleanup_free_ char *short_id = job_id_new("virtio-disk0", 3), *ida = NULL, *idb = NULL;

        ASSERT_STREQ(short_id, "bsd-virtio-disk0-3");
        memset(a, 'a', 128);
        a[128] = 0;
        memcpy(b, a, sizeof(b));
        b[127] = 'b';
        ida = job_id_new(a, UINT64_MAX);
        idb = job_id_new(b, UINT64_MAX);
        ASSERT_NOT_NULL(ida);
        ASSERT_NOT_NULL(idb);
        if (!ida || !idb)
                return;
        ASSERT_TRUE(strlen(ida) <= 128);
        ASSERT_TRUE(qemu_id_is_valid(ida));
        ASSERT_TRUE(!streq(ida, idb));
}

static void test_begin(void) {
        Job j;

        begin(&j);
        ASSERT_STREQ(j.id, "bsd-vda-1");
        ASSERT_EQ(j.state, STREAM_RUNNING);
        ASSERT_EQ(j.mode, STREAM_MODE_FULL);
        ASSERT_EQ_U64(j.total, DISK);
        ASSERT_EQ_U64(j.done, 0);
        ASSERT_EQ_U64(j.start_time, RT0);
        ASSERT_TRUE(job_is_active(&j));
        ASSERT_FALSE(j.concluded);
        ASSERT_FALSE(job_publish_outcome(&j)); /* nothing to publish yet */
        ASSERT_EQ_U64(job_rate(&j), 0);
        ASSERT_EQ_U64(job_expected_end(&j, RT0), 0);

        /* A job struct is reused for the next stream: the old strings go (ASan watches). */
        ASSERT_OK(job_begin(&j, "bsd-vda-2", STREAM_MODE_RANGE, 4096, 8192, 8192, 1000, RT0 + 1));
        ASSERT_STREQ(j.id, "bsd-vda-2");
        ASSERT_EQ(j.mode, STREAM_MODE_RANGE);
        ASSERT_EQ_U64(j.offset, 4096);
        ASSERT_EQ_U64(j.length, 8192);
        ASSERT_EQ_U64(j.bandwidth, 1000);
        job_done(&j);
        ASSERT_NULL(j.id);
        job_done(&j);
}

static void test_early_zero_progress(void) {
        Job j;
        QemuBlockJob i = info("bsd-vda-1", QEMU_JOB_RUNNING, 0, 0, NULL);

        begin(&j);
        /* Just started: len = offset = 0 means "not known yet". */
        ASSERT_EQ(job_apply_info(&j, &i, T0) & JOB_CHANGED_PROGRESS, 0);
        ASSERT_EQ_U64(j.total, DISK);
        ASSERT_EQ_U64(j.done, 0);
        ASSERT_EQ(j.state, STREAM_RUNNING);

        i = info("bsd-vda-1", QEMU_JOB_RUNNING, DISK, 524288, NULL);
        ASSERT_TRUE(job_apply_info(&j, &i, T0 + 250 * MSEC) & JOB_CHANGED_PROGRESS);
        ASSERT_EQ_U64(j.done, 524288);
        ASSERT_EQ_U64(j.total, DISK);
        job_done(&j);
}

static void test_progress_monotonic(void) {
        Job j;
        QemuBlockJob i;

        begin(&j);
        i = info("bsd-vda-1", QEMU_JOB_RUNNING, DISK, 100 * MiB, NULL);
        job_apply_info(&j, &i, T0);
        ASSERT_EQ_U64(j.done, 100 * MiB);

        /* A lower offset later does not take progress back. */
        i = info("bsd-vda-1", QEMU_JOB_RUNNING, DISK, 50 * MiB, NULL);
        ASSERT_EQ(job_apply_info(&j, &i, T0 + SEC) & JOB_CHANGED_PROGRESS, 0);
        ASSERT_EQ_U64(j.done, 100 * MiB);
        i = info("bsd-vda-1", QEMU_JOB_RUNNING, 0, 0, NULL);
        job_apply_info(&j, &i, T0 + 2 * SEC);
        ASSERT_EQ_U64(j.done, 100 * MiB);
        ASSERT_EQ_U64(j.total, DISK);

        /* An offset past the length is clamped: done never exceeds total. */
        i = info("bsd-vda-1", QEMU_JOB_RUNNING, DISK, DISK + 5, NULL);
        job_apply_info(&j, &i, T0 + 3 * SEC);
        ASSERT_LE_U64(j.done, j.total);
        i = info("bsd-vda-1", QEMU_JOB_RUNNING, UINT64_MAX - 1, UINT64_MAX - 1, NULL);
        job_apply_info(&j, &i, T0 + 4 * SEC);
        ASSERT_LE_U64(j.done, j.total);

        /* The range helper's progress obeys the same rules. */
        job_done(&j);
        begin(&j);
        ASSERT_TRUE(job_apply_progress(&j, 10, 100, T0) & JOB_CHANGED_PROGRESS);
        ASSERT_EQ_U64(j.done, 10);
        ASSERT_EQ_U64(j.total, 100);
        ASSERT_EQ(job_apply_progress(&j, 5, 100, T0 + SEC), 0);
        ASSERT_EQ_U64(j.done, 10);
        job_apply_progress(&j, 1000, 100, T0 + 2 * SEC);
        ASSERT_EQ_U64(j.done, 100);
        ASSERT_LE_U64(j.done, j.total);
        job_done(&j);
}

/* A prefetch job: the helper's pass is the first half of the total, QEMU's block-stream the
 * second; progress never runs backwards across the cut and ends at the total. */
static void test_prefetch_progress(void) {
        Job j = {};
        QemuBlockJob i;

        ASSERT_OK(job_begin(&j, "", STREAM_MODE_FULL, 0, DISK + 1, DISK + 1, 0, RT0));
        ASSERT_EQ(j.engine, STREAM_ENGINE_STREAM);
        j.engine = STREAM_ENGINE_PREFETCH;
        j.phase = 1;
        job_apply_progress(&j, DISK / 2, DISK + 1, T0);
        ASSERT_EQ_U64(j.done, DISK / 4);
        job_apply_progress(&j, DISK + 1, DISK + 1, T0 + SEC);
        ASSERT_EQ_U64(j.done, (DISK + 1) / 2);

        /* The cut: QEMU's job starts from offset 0, which is the middle. */
        free(j.id);
        j.id = strdup("bsd-vda-2");
        ASSERT_TRUE(j.id);
        j.phase = 2;
        i = info("bsd-vda-2", QEMU_JOB_RUNNING, DISK + 1, 0, NULL);
        job_apply_info(&j, &i, T0 + 2 * SEC);
        ASSERT_EQ_U64(j.done, (DISK + 1) / 2);
        i = info("bsd-vda-2", QEMU_JOB_RUNNING, DISK + 1, DISK / 2, NULL);
        job_apply_info(&j, &i, T0 + 3 * SEC);
        ASSERT_EQ_U64(j.done, (DISK + 1) / 2 + DISK / 4);
        i = info("bsd-vda-2", QEMU_JOB_RUNNING, DISK + 1, DISK + 1, NULL);
        job_apply_info(&j, &i, T0 + 4 * SEC);
        ASSERT_EQ_U64(j.done, DISK + 1);
        job_done(&j);
}

/* A job not begun (a mirror prepares its image with the job's id set, state idle) or ended is
 * not made active by what QEMU says of its id: a QEMU that sent "running", then "cancelled", for a
 * mirror still preparing left the disk starting for good (review 31f). */
static void test_status_of_a_job_not_running_is_ignored(void) {
        Job j = {.state = STREAM_IDLE};
        QemuJobEvent e;
        QemuBlockJob i;

        ASSERT_NOT_NULL(j.id = strdup("bsd-vda-1"));
        e = status_event("bsd-vda-1", QEMU_JOB_RUNNING);
        ASSERT_EQ(job_apply_event(&j, &e, T0), 0);
        i = info("bsd-vda-1", QEMU_JOB_PAUSED, DISK, MiB, NULL);
        ASSERT_EQ(job_apply_info(&j, &i, T0), 0);
        e = end_event(QEMU_EVENT_BLOCK_JOB_CANCELLED, "bsd-vda-1", DISK, MiB, NULL);
        ASSERT_EQ(job_apply_event(&j, &e, T0), 0);
        ASSERT_EQ(j.state, STREAM_IDLE);
        ASSERT_FALSE(j.concluded);
        job_done(&j);

        /* Ended and published, its id not yet let go: it stays ended. */
        begin(&j);
        e = end_event(QEMU_EVENT_BLOCK_JOB_COMPLETED, "bsd-vda-1", DISK, DISK, NULL);
        ASSERT_TRUE(job_apply_event(&j, &e, T0) & JOB_NOW_CONCLUDED);
        ASSERT_TRUE(job_publish_outcome(&j));
        e = status_event("bsd-vda-1", QEMU_JOB_RUNNING);
        ASSERT_EQ(job_apply_event(&j, &e, T0), 0);
        ASSERT_EQ(j.state, STREAM_COMPLETED);
        job_done(&j);
}

static void test_pause_resume(void) {
        Job j;
        QemuJobEvent e;
        QemuBlockJob i;

        begin(&j);
        e = status_event("bsd-vda-1", QEMU_JOB_CREATED);
        ASSERT_EQ(job_apply_event(&j, &e, T0) & JOB_CHANGED_STATE, 0);
        e = status_event("bsd-vda-1", QEMU_JOB_RUNNING);
        ASSERT_EQ(job_apply_event(&j, &e, T0), 0);

        e = status_event("bsd-vda-1", QEMU_JOB_PAUSED);
        ASSERT_TRUE(job_apply_event(&j, &e, T0) & JOB_CHANGED_STATE);
        ASSERT_EQ(j.state, STREAM_PAUSED);
        ASSERT_TRUE(job_is_active(&j));
        ASSERT_EQ(job_apply_event(&j, &e, T0), 0); /* no change twice */

        e = status_event("bsd-vda-1", QEMU_JOB_RUNNING);
        ASSERT_TRUE(job_apply_event(&j, &e, T0) & JOB_CHANGED_STATE);
        ASSERT_EQ(j.state, STREAM_RUNNING);

        /* standby is QEMU's "paused while draining". */
        e = status_event("bsd-vda-1", QEMU_JOB_STANDBY);
        job_apply_event(&j, &e, T0);
        ASSERT_EQ(j.state, STREAM_PAUSED);

        /* The same through query-block-jobs. */
        i = info("bsd-vda-1", QEMU_JOB_RUNNING, DISK, MiB, NULL);
        ASSERT_TRUE(job_apply_info(&j, &i, T0 + SEC) & JOB_CHANGED_STATE);
        ASSERT_EQ(j.state, STREAM_RUNNING);
        i = info("bsd-vda-1", QEMU_JOB_PAUSED, DISK, MiB, NULL);
        ASSERT_TRUE(job_apply_info(&j, &i, T0 + 2 * SEC) & JOB_CHANGED_STATE);
        ASSERT_EQ(j.state, STREAM_PAUSED);

        /* waiting, pending, aborting: still running as clients see it. */
        e = status_event("bsd-vda-1", QEMU_JOB_RUNNING);
        job_apply_event(&j, &e, T0);
        e = status_event("bsd-vda-1", QEMU_JOB_WAITING);
        ASSERT_EQ(job_apply_event(&j, &e, T0), 0);
        /* pending (auto-finalize off): the daemon is to flush and finalize, once per connection. */
        e = status_event("bsd-vda-1", QEMU_JOB_PENDING);
        ASSERT_EQ(job_apply_event(&j, &e, T0), JOB_NEEDS_FINALIZE);
        ASSERT_EQ(j.state, STREAM_RUNNING);
        i = info("bsd-vda-1", QEMU_JOB_PENDING, DISK, DISK, NULL);
        ASSERT_TRUE(job_apply_info(&j, &i, T0) & JOB_NEEDS_FINALIZE);
        j.finalize_sent = true;
        ASSERT_EQ(job_apply_event(&j, &e, T0), 0);
        ASSERT_EQ(job_apply_info(&j, &i, T0) & JOB_NEEDS_FINALIZE, 0);
        j.finalize_sent = false;

        /* concluded/null: ask QEMU how it ended, change nothing yet. */
        e = status_event("bsd-vda-1", QEMU_JOB_CONCLUDED);
        ASSERT_EQ(job_apply_event(&j, &e, T0), JOB_NEEDS_QUERY);
        ASSERT_EQ(j.state, STREAM_RUNNING);
        ASSERT_FALSE(j.concluded);
        /* ...but query-block-jobs results never ask for another query. */
        i = info("bsd-vda-1", QEMU_JOB_NULL, DISK, MiB, NULL);
        ASSERT_EQ(job_apply_info(&j, &i, T0) & JOB_NEEDS_QUERY, 0);
        job_done(&j);
}

static void test_completed_event(void) {
        Job j;
        QemuJobEvent e;

        begin(&j);
        e = end_event(QEMU_EVENT_BLOCK_JOB_COMPLETED, "bsd-vda-1", DISK, DISK, NULL);
        ASSERT_TRUE(job_apply_event(&j, &e, T0) & JOB_NOW_CONCLUDED);
        ASSERT_TRUE(j.concluded);
        ASSERT_EQ(j.outcome, STREAM_COMPLETED);
        ASSERT_TRUE(job_publish_outcome(&j));
        ASSERT_EQ(j.state, STREAM_COMPLETED);
        ASSERT_EQ_U64(j.done, j.total);
        ASSERT_EQ_U64(j.done, DISK);
        ASSERT_NULL(j.error);
        ASSERT_FALSE(job_is_active(&j));
        ASSERT_FALSE(job_publish_outcome(&j)); /* Finished once */
        ASSERT_TRUE(j.finished);

        /* Later reports of the same job change nothing. */
        e = end_event(QEMU_EVENT_BLOCK_JOB_COMPLETED, "bsd-vda-1", DISK, DISK, "late");
        ASSERT_EQ(job_apply_event(&j, &e, T0) & JOB_NOW_CONCLUDED, 0);
        ASSERT_EQ(job_conclude(&j, STREAM_FAILED, "late"), 0);
        ASSERT_FALSE(job_publish_outcome(&j));
        ASSERT_EQ(j.state, STREAM_COMPLETED);
        ASSERT_NULL(j.error);
        job_done(&j);
}

/* block-stream whose base is the direct backing: nothing to copy, QEMU says len=0 offset=0. */
static void test_completed_empty(void) {
        Job j;
        QemuJobEvent e;

        begin(&j);
        e = end_event(QEMU_EVENT_BLOCK_JOB_COMPLETED, "bsd-vda-1", 0, 0, NULL);
        ASSERT_TRUE(job_apply_event(&j, &e, T0) & JOB_NOW_CONCLUDED);
        ASSERT_TRUE(job_publish_outcome(&j));
        ASSERT_EQ(j.state, STREAM_COMPLETED);
        ASSERT_EQ_U64(j.total, DISK);
        ASSERT_EQ_U64(j.done, DISK);
        job_done(&j);
}

static void test_completed_with_error(void) {
        Job j;
        QemuJobEvent e;
        QemuBlockJob i = info("bsd-vda-1", QEMU_JOB_RUNNING, DISK, 64 * MiB, NULL);

        begin(&j);
        job_apply_info(&j, &i, T0);
        e = end_event(QEMU_EVENT_BLOCK_JOB_COMPLETED, "bsd-vda-1", DISK, 100 * MiB, "Input/output error");
        ASSERT_TRUE(job_apply_event(&j, &e, T0 + SEC) & JOB_NOW_CONCLUDED);
        ASSERT_TRUE(job_publish_outcome(&j));
        ASSERT_EQ(j.state, STREAM_FAILED);
        ASSERT_STREQ(j.error, "Input/output error");
        ASSERT_EQ_U64(j.done, 100 * MiB);
        ASSERT_FALSE(job_publish_outcome(&j));
        job_done(&j);
        ASSERT_NULL(j.error);
}

static void test_cancelled_event(void) {
        Job j;
        QemuJobEvent e;
        QemuBlockJob i = info("bsd-vda-1", QEMU_JOB_RUNNING, DISK, 524288, NULL);

        begin(&j);
        job_apply_info(&j, &i, T0);
        /* Verbatim sequence: aborting, BLOCK_JOB_CANCELLED, concluded. */
        e = status_event("bsd-vda-1", QEMU_JOB_ABORTING);
        job_apply_event(&j, &e, T0 + SEC);
        e = end_event(QEMU_EVENT_BLOCK_JOB_CANCELLED, "bsd-vda-1", DISK, MiB, NULL);
        ASSERT_TRUE(job_apply_event(&j, &e, T0 + SEC) & JOB_NOW_CONCLUDED);
        e = status_event("bsd-vda-1", QEMU_JOB_CONCLUDED);
        ASSERT_EQ(job_apply_event(&j, &e, T0 + SEC) & JOB_NEEDS_QUERY, 0); /* already known */
        ASSERT_TRUE(job_publish_outcome(&j));
        ASSERT_EQ(j.state, STREAM_CANCELLED);
        ASSERT_EQ_U64(j.done, MiB); /* partial progress kept */
        ASSERT_EQ_U64(j.total, DISK);
        ASSERT_NULL(j.error);
        job_done(&j);
}

/* Cancelled by the daemon because the image could not be flushed before finalizing: failed, with why. */
static void test_cancelled_for_a_reason(void) {
        Job j;
        QemuJobEvent e;
        QemuBlockJob i = info("bsd-vda-1", QEMU_JOB_CONCLUDED, DISK, DISK, "Operation canceled");

        begin(&j);
        j.abort_reason = strdup("Cannot flush the image");
        ASSERT_NOT_NULL(j.abort_reason);
        e = end_event(QEMU_EVENT_BLOCK_JOB_CANCELLED, "bsd-vda-1", DISK, DISK, NULL);
        ASSERT_TRUE(job_apply_event(&j, &e, T0) & JOB_NOW_CONCLUDED);
        ASSERT_TRUE(job_publish_outcome(&j));
        ASSERT_EQ(j.state, STREAM_FAILED);
        ASSERT_STREQ(j.error, "Cannot flush the image");
        job_done(&j);

        /* The same found by query-block-jobs (after a reconnect). */
        begin(&j);
        j.abort_reason = strdup("Cannot flush the image");
        ASSERT_TRUE(job_apply_info(&j, &i, T0) & JOB_NOW_CONCLUDED);
        ASSERT_TRUE(job_publish_outcome(&j));
        ASSERT_EQ(j.state, STREAM_FAILED);
        ASSERT_STREQ(j.error, "Cannot flush the image");
        job_done(&j);
}

static void test_concluded_in_query(void) {
        static const struct {
                const char *error;
                bool cancel_requested;
                StreamState outcome;
        } t[] = {
                {NULL, false, STREAM_COMPLETED},
                {"Operation canceled", false, STREAM_CANCELLED},
                {"Input/output error", false, STREAM_FAILED},
                {"No space left on device", false, STREAM_FAILED},
        };

        for (size_t k = 0; k < ELEMENTSOF(t); k++) {
                Job j;
                QemuBlockJob i = info("bsd-vda-1", QEMU_JOB_RUNNING, DISK, 10 * MiB, NULL);

                begin(&j);
                j.cancel_requested = t[k].cancel_requested;
                job_apply_info(&j, &i, T0);
                i = info("bsd-vda-1", QEMU_JOB_CONCLUDED, DISK, t[k].outcome == STREAM_COMPLETED ? DISK : 20 * MiB,
                        t[k].error);
                ASSERT_TRUE(job_apply_info(&j, &i, T0 + SEC) & JOB_NOW_CONCLUDED);
                ASSERT_TRUE(job_publish_outcome(&j));
                if (j.state != t[k].outcome)
                        TAP_FAIL("error \"%s\": state %s, expected %s", strempty(t[k].error),
                                stream_state_to_string(j.state), stream_state_to_string(t[k].outcome));
                if (t[k].outcome == STREAM_FAILED)
                        ASSERT_STREQ(j.error, t[k].error);
                else
                        ASSERT_NULL(j.error);
                if (t[k].outcome == STREAM_COMPLETED)
                        ASSERT_EQ_U64(j.done, DISK);
                else
                        ASSERT_EQ_U64(j.done, 20 * MiB);
                job_done(&j);
        }

        /* Concluded with len = offset = 0 (nothing to copy), found by a query after a restart. */
        {
                Job j;
                QemuBlockJob i = info("bsd-vda-1", QEMU_JOB_CONCLUDED, 0, 0, NULL);
                begin(&j);
                ASSERT_TRUE(job_apply_info(&j, &i, T0) & JOB_NOW_CONCLUDED);
                ASSERT_TRUE(job_publish_outcome(&j));
                ASSERT_EQ(j.state, STREAM_COMPLETED);
                ASSERT_EQ_U64(j.done, DISK);
                job_done(&j);
        }
}

static void test_other_jobs_ignored(void) {
        Job j;
        QemuJobEvent e;
        QemuBlockJob i;

        begin(&j);
        e = end_event(QEMU_EVENT_BLOCK_JOB_COMPLETED, "bsd-vdb-1", DISK, DISK, NULL);
        ASSERT_EQ(job_apply_event(&j, &e, T0), 0);
        e = status_event("bsd-vda-10", QEMU_JOB_PAUSED);
        ASSERT_EQ(job_apply_event(&j, &e, T0), 0);
        e = status_event("bsd-vda-", QEMU_JOB_PAUSED);
        ASSERT_EQ(job_apply_event(&j, &e, T0), 0);
        e = status_event(NULL, QEMU_JOB_PAUSED);
        ASSERT_EQ(job_apply_event(&j, &e, T0), 0);
        i = info("other", QEMU_JOB_CONCLUDED, DISK, DISK, "Input/output error");
        ASSERT_EQ(job_apply_info(&j, &i, T0), 0);
        ASSERT_EQ(j.state, STREAM_RUNNING);
        ASSERT_EQ_U64(j.done, 0);
        ASSERT_FALSE(j.concluded);

        /* A job without an id (QEMU no longer knows it) takes nothing. */
        j.id = mfree(j.id);
        e = end_event(QEMU_EVENT_BLOCK_JOB_COMPLETED, "bsd-vda-1", DISK, DISK, NULL);
        ASSERT_EQ(job_apply_event(&j, &e, T0), 0);
        i = info("bsd-vda-1", QEMU_JOB_RUNNING, DISK, MiB, NULL);
        ASSERT_EQ(job_apply_info(&j, &i, T0), 0);
        job_done(&j);
}

static void test_conclude_without_qemu(void) {
        Job j;

        begin(&j);
        job_apply_progress(&j, 3 * MiB, DISK, T0);
        ASSERT_EQ(job_conclude(&j, STREAM_FAILED, "QEMU exited"), JOB_NOW_CONCLUDED);
        ASSERT_EQ(job_conclude(&j, STREAM_COMPLETED, NULL), 0); /* the first outcome stands */
        /* Progress after the outcome is known does not move. */
        ASSERT_EQ(job_apply_progress(&j, 10 * MiB, DISK, T0 + SEC), 0);
        ASSERT_TRUE(job_publish_outcome(&j));
        ASSERT_EQ(j.state, STREAM_FAILED);
        ASSERT_STREQ(j.error, "QEMU exited");
        ASSERT_EQ_U64(j.done, 3 * MiB);
        job_done(&j);

        /* A failure always carries a text. */
        begin(&j);
        job_conclude(&j, STREAM_FAILED, NULL);
        job_publish_outcome(&j);
        ASSERT_EQ(j.state, STREAM_FAILED);
        ASSERT_TRUE(j.error && *j.error);
        job_done(&j);

        /* An idle job has nothing to conclude. */
        j = (Job){};
        ASSERT_EQ(job_conclude(&j, STREAM_FAILED, "x"), 0);
        ASSERT_FALSE(job_publish_outcome(&j));
}

/* Rate and expected end */

static void feed_rate(Job *j, usec_t from, usec_t to, usec_t step, uint64_t bytes_per_step) {
        for (usec_t t = from; t <= to; t += step) {
                QemuBlockJob i = info(j->id, QEMU_JOB_RUNNING, DISK, MIN(j->done + bytes_per_step, DISK), NULL);
                job_apply_info(j, &i, t);
        }
}

static bool near(uint64_t got, uint64_t want, double tolerance) {
        return fabs((double) got - (double) want) <= (double) want * tolerance;
}

static void test_rate(void) {
        Job j;
        uint64_t r;

        /* 4 MiB/s in steps of 250 ms. */
        begin(&j);
        ASSERT_EQ_U64(job_rate(&j), 0);
        job_apply_progress(&j, 0, DISK, T0);
        ASSERT_EQ_U64(job_rate(&j), 0); /* one sample is no rate */
        feed_rate(&j, T0 + 250 * MSEC, T0 + 3 * SEC, 250 * MSEC, MiB);
        r = job_rate(&j);
        if (!near(r, 4 * MiB, 0.01))
                TAP_FAIL("rate %" PRIu64 ", expected ~%" PRIu64, r, 4 * MiB);

        /* Paused: no rate. */
        {
                QemuJobEvent e = status_event("bsd-vda-1", QEMU_JOB_PAUSED);
                job_apply_event(&j, &e, T0 + 3 * SEC);
                ASSERT_EQ_U64(job_rate(&j), 0);
                ASSERT_EQ_U64(job_expected_end(&j, RT0), 0);
        }
        job_done(&j);

        /* Only the recent window counts: 1 MiB/s for a long time, then 8 MiB/s for 6 s. */
        begin(&j);
        feed_rate(&j, T0, T0 + 10 * SEC, 500 * MSEC, 512 * 1024);
        feed_rate(&j, T0 + 10 * SEC + 250 * MSEC, T0 + 16 * SEC, 250 * MSEC, 2 * MiB);
        r = job_rate(&j);
        if (!near(r, 8 * MiB, 0.02))
                TAP_FAIL("rate %" PRIu64 " after a speed-up, expected ~%" PRIu64, r, 8 * MiB);
        job_done(&j);

        /* No progress: rate 0, no expected end. */
        begin(&j);
        feed_rate(&j, T0, T0 + 2 * SEC, 250 * MSEC, 0);
        ASSERT_EQ_U64(job_rate(&j), 0);
        ASSERT_EQ_U64(job_expected_end(&j, RT0), 0);
        job_done(&j);

        /* A QEMU's figures are each below 2^63, yet a jump that large in 200 ms is a rate past
         * uint64: saturated, never converted out of range (undefined behaviour, UBSan). */
        begin(&j);
        job_apply_progress(&j, 0, INT64_MAX, T0);
        job_apply_progress(&j, INT64_MAX, INT64_MAX, T0 + 200 * MSEC);
        ASSERT_EQ_U64(job_rate(&j), UINT64_MAX);
        job_done(&j);
}

/* The rate restarts from a resume: the time spent paused is not "slow progress". */
static void test_rate_after_resume(void) {
        Job j;
        QemuJobEvent e;
        uint64_t r;

        begin(&j);
        feed_rate(&j, T0, T0 + 2 * SEC, 250 * MSEC, MiB);
        e = status_event("bsd-vda-1", QEMU_JOB_PAUSED);
        job_apply_event(&j, &e, T0 + 2 * SEC);
        /* guest.c keeps polling query-block-jobs while paused: QEMU reports the same offset. */
        for (usec_t t = T0 + 2 * SEC + 500 * MSEC; t <= T0 + 5 * SEC; t += 500 * MSEC) {
                QemuBlockJob i = info("bsd-vda-1", QEMU_JOB_PAUSED, DISK, j.done, NULL);
                job_apply_info(&j, &i, t);
        }
        ASSERT_EQ_U64(job_rate(&j), 0);
        e = status_event("bsd-vda-1", QEMU_JOB_RUNNING);
        job_apply_event(&j, &e, T0 + 5 * SEC);
        feed_rate(&j, T0 + 5 * SEC + 250 * MSEC, T0 + 6 * SEC, 250 * MSEC, MiB);
        r = job_rate(&j);
        if (!near(r, 4 * MiB, 0.05))
                TAP_FAIL("rate %" PRIu64 " one second after a 3 s pause, expected ~%" PRIu64 " (4 MiB/s)", r, 4 * MiB);
        job_done(&j);
}

static void test_expected_end(void) {
        Job j;
        usec_t end, want;

        begin(&j);
        job_apply_progress(&j, 0, DISK, T0);
        feed_rate(&j, T0 + 250 * MSEC, T0 + 4 * SEC, 250 * MSEC, MiB); /* 16 MiB done at 4 MiB/s */
        ASSERT_EQ_U64(j.done, 16 * MiB);
        end = job_expected_end(&j, RT0);
        want = RT0 + (usec_t) ((DISK - 16 * MiB) / (4 * MiB)) * SEC; /* 60 s */
        if (!near(end - RT0, want - RT0, 0.01))
                TAP_FAIL("expected end now + %" PRIu64 " us, wanted now + %" PRIu64 " us", end - RT0, want - RT0);

        /* Far in the future rather than wrapped around. */
        ASSERT_EQ_U64(job_expected_end(&j, UINT64_MAX - SEC), 0);

        /* Done: no expected end. */
        job_apply_progress(&j, DISK, DISK, T0 + 5 * SEC);
        ASSERT_EQ_U64(job_expected_end(&j, RT0), 0);
        job_done(&j);
}

/* on-error=enospc: QEMU pauses the job on a full disk and says why only in query-block-jobs'
 * io-status; the Error shows it while paused, and goes when the job runs again. */
static void test_paused_on_error(void) {
        Job j;
        QemuJobEvent e;
        QemuBlockJob i;

        begin(&j);
        e = (QemuJobEvent){.kind = QEMU_EVENT_BLOCK_JOB_ERROR, .id = "bsd-vda-1", .action = "stop"};
        ASSERT_EQ(job_apply_event(&j, &e, T0), JOB_NEEDS_QUERY);
        e.action = "report"; /* the job fails; BLOCK_JOB_COMPLETED says how */
        ASSERT_EQ(job_apply_event(&j, &e, T0), 0);
        e.id = "bsd-vdb-1";
        e.action = "stop";
        ASSERT_EQ(job_apply_event(&j, &e, T0), 0);

        /* The query may still see the job running: the reason is kept, shown once paused. */
        i = info("bsd-vda-1", QEMU_JOB_RUNNING, DISK, MiB, NULL);
        i.io_status = QEMU_IO_NOSPACE;
        ASSERT_TRUE(job_apply_info(&j, &i, T0 + SEC) & JOB_CHANGED_ERROR);
        ASSERT_STREQ(job_error(&j), "");
        e = status_event("bsd-vda-1", QEMU_JOB_PAUSED);
        ASSERT_TRUE(job_apply_event(&j, &e, T0) & JOB_CHANGED_STATE);
        ASSERT_TRUE(strstr(job_error(&j), "No space left on device"));
        ASSERT_TRUE(strstr(job_error(&j), "Resume"));
        i.status = QEMU_JOB_PAUSED;
        ASSERT_EQ(job_apply_info(&j, &i, T0 + 2 * SEC) & JOB_CHANGED_ERROR, 0); /* no change twice */

        /* Resumed: QEMU clears its io-status, and so do we. */
        e = status_event("bsd-vda-1", QEMU_JOB_RUNNING);
        ASSERT_TRUE(job_apply_event(&j, &e, T0) & JOB_CHANGED_STATE);
        ASSERT_NULL(j.error);
        ASSERT_STREQ(job_error(&j), "");

        /* Another kind of I/O error, and then none (a Resume seen only by a poll). */
        i = info("bsd-vda-1", QEMU_JOB_PAUSED, DISK, MiB, NULL);
        i.io_status = QEMU_IO_FAILED;
        ASSERT_TRUE(job_apply_info(&j, &i, T0 + 3 * SEC) & JOB_CHANGED_ERROR);
        ASSERT_TRUE(strstr(job_error(&j), "I/O error"));
        i.io_status = QEMU_IO_OK;
        ASSERT_TRUE(job_apply_info(&j, &i, T0 + 4 * SEC) & JOB_CHANGED_ERROR);
        ASSERT_STREQ(job_error(&j), "");

        /* A user's pause has no reason to show. */
        ASSERT_EQ(j.state, STREAM_PAUSED);
        ASSERT_NULL(j.error);

        /* A failure's own error wins over any pause reason. */
        e = end_event(QEMU_EVENT_BLOCK_JOB_COMPLETED, "bsd-vda-1", DISK, MiB, "Input/output error");
        ASSERT_TRUE(job_apply_event(&j, &e, T0) & JOB_NOW_CONCLUDED);
        i.io_status = QEMU_IO_NOSPACE;
        ASSERT_EQ(job_apply_info(&j, &i, T0 + 5 * SEC), 0);
        ASSERT_TRUE(job_publish_outcome(&j));
        ASSERT_STREQ(job_error(&j), "Input/output error");
        job_done(&j);
}

int main(int argc, char **argv) {
        tap_init(argc, argv);
        TAP_RUN(test_strings);
        TAP_RUN(test_id_of_a_long_alias);
        TAP_RUN(test_begin);
        TAP_RUN(test_early_zero_progress);
        TAP_RUN(test_progress_monotonic);
        TAP_RUN(test_prefetch_progress);
        TAP_RUN(test_status_of_a_job_not_running_is_ignored);
        TAP_RUN(test_pause_resume);
        TAP_RUN(test_paused_on_error);
        TAP_RUN(test_completed_event);
        TAP_RUN(test_completed_empty);
        TAP_RUN(test_completed_with_error);
        TAP_RUN(test_cancelled_event);
        TAP_RUN(test_cancelled_for_a_reason);
        TAP_RUN(test_concluded_in_query);
        TAP_RUN(test_other_jobs_ignored);
        TAP_RUN(test_conclude_without_qemu);
        TAP_RUN(test_rate);
        TAP_RUN(test_rate_after_resume);
        TAP_RUN(test_expected_end);
        return tap_finish();
}
