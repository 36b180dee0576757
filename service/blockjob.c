/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* The block-stream backend: the disk's job is QEMU's own block job (block-stream), told through
 * the guest's QMP peer. */

#include "backend.h"
#include "peer.h"
#include "qemu.h"
#include "disk.h"
#include "util.h"

/* A call waiting for QEMU. The Guest outlives every QMP callback (closing the QMP connection
 * drops them), the Disk may not: look it up again by alias. */
typedef struct BlockJobCall {
        Guest *guest;
        const DiskHost *host;
        char *alias;
        JobControl control;
        job_backend_reply_t reply;
        void *userdata;
        void (*destroy)(void *);
} BlockJobCall;

static void call_free(void *p) {
        BlockJobCall *c = p;

        if (!c)
                return;
        if (c->destroy)
                c->destroy(c->userdata);
        free(c->alias);
        free(c);
}

static BlockJobCall *call_new(
        Disk *d, JobControl control, job_backend_reply_t reply, void *userdata, void (*destroy)(void *)) {
        BlockJobCall *c = calloc(1, sizeof(BlockJobCall));

        if (!c)
                return NULL;
        *c = (BlockJobCall){
                .guest = d->guest,
                .host = d->host,
                .alias = strdup(d->alias),
                .control = control,
                .reply = reply,
                .userdata = userdata,
                .destroy = destroy,
        };
        if (!c->alias)
                return mfree(c);
        return c;
}

static bool blockjob_runs(Disk *d) {
        return d->job.id;
}

static bool blockjob_reachable(Disk *d) {
        return d->host->qmp_ready(d->guest);
}

static void control_reply(Qmp *q, int error, const char *desc, void *userdata) {
        BlockJobCall *c = userdata;

        if (error < 0 && c->control == JOB_CONTROL_CANCEL) {
                Disk *d = c->host->find_disk(c->guest, c->alias);
                if (d)
                        d->job.cancel_requested = false;
        }
        c->reply(error, desc, c->userdata);
}

static int blockjob_control(
        Disk *d, JobControl what, job_backend_reply_t reply, void *userdata, void (*destroy)(void *)) {
        int (*const ops[_JOB_CONTROL_MAX])(Qmp *, const char *, qemu_result_handler_t, void *, qemu_destroy_t) = {
                [JOB_CONTROL_CANCEL] = qemu_block_job_cancel,
                [JOB_CONTROL_PAUSE] = qemu_block_job_pause,
                [JOB_CONTROL_RESUME] = qemu_block_job_resume,
        };
        BlockJobCall *c;
        int r;

        c = call_new(d, what, reply, userdata, destroy);
        if (!c)
                return -ENOMEM;
        if (what == JOB_CONTROL_CANCEL)
                d->job.cancel_requested = true;
        r = ops[what](d->host->peer(d->guest)->qmp, d->job.id, control_reply, c, call_free);
        if (r < 0) {
                c->destroy = NULL; /* the caller keeps userdata */
                call_free(c);
                if (what == JOB_CONTROL_CANCEL)
                        d->job.cancel_requested = false;
                return r;
        }
        return 0;
}

static void speed_reply(Qmp *q, int error, const char *desc, void *userdata) {
        BlockJobCall *c = userdata;

        c->reply(error, desc, c->userdata);
}

static int blockjob_set_speed(
        Disk *d, uint64_t bandwidth, job_backend_reply_t reply, void *userdata, void (*destroy)(void *)) {
        BlockJobCall *c;
        int r;

        c = call_new(d, _JOB_CONTROL_MAX, reply, userdata, destroy);
        if (!c)
                return -ENOMEM;
        r = qemu_block_job_set_speed(d->host->peer(d->guest)->qmp, d->job.id, bandwidth, speed_reply, c, call_free);
        if (r < 0) {
                c->destroy = NULL; /* the caller keeps userdata */
                call_free(c);
                return r;
        }
        return 0;
}

/* Finalizing. QEMU 7.2's stream job rewrites the header without the backing file when it is
 * finalized, but the L2 entries of the clusters it copied may still sit in QEMU's qcow2 cache:
 * killed before the next flush, QEMU would leave an image that neither has the backing file nor
 * maps the copied clusters (zeros where the guest's data was). The job runs with auto-finalize
 * off; in "pending" the daemon flushes the top node, and only then finalizes. A job the daemon
 * never finalizes (it died and was not restarted) waits in "pending", the guest running on, until
 * a daemon connects again (the reconnect's query-block-jobs finds it pending). */

static void finalize_reply(Qmp *q, int error, const char *desc, void *userdata) {
        BlockJobCall *c = userdata;
        Disk *d = c->host->find_disk(c->guest, c->alias);

        if (!d)
                return;
        if (error < 0) {
                /* The poll or the next connection finds it pending again, or concluded. */
                log_warning("Guest %s disk %s: job-finalize of %s failed: %s", c->host->name(c->guest), c->alias,
                        strempty(d->job.id), desc ?: strerror(-error));
                d->job.finalize_sent = false;
        }
}

static void flush_reply(Qmp *q, int error, const char *desc, void *userdata) {
        BlockJobCall *c = userdata;
        Disk *d = c->host->find_disk(c->guest, c->alias);
        BlockJobCall *next;
        int r;

        if (!d || !d->job.id || d->job.concluded)
                return;
        if (error == -ECONNRESET) {
                d->job.finalize_sent = false; /* the next connection's reconciliation does it */
                return;
        }
        if (error < 0) {
                /* Finalizing now would drop the backing file under clusters that may not be
                 * mapped on disk: cancel instead (the copied data stays, the chain too), and
                 * the job fails with why. */
                _cleanup_free_ char *why = strdup_printf("Cannot flush the image before dropping its backing file: %s. "
                                                         "The chain was kept; Start the stream again.",
                        desc ?: strerror(-error));
                log_error("Guest %s disk %s: cannot flush its image: %s; cancelling job %s.", c->host->name(c->guest), c->alias,
                        desc ?: strerror(-error), d->job.id);
                free(d->job.abort_reason);
                d->job.abort_reason =
                        why ? TAKE_PTR(why) : strdup("Cannot flush the image before dropping its backing file.");
                r = qemu_block_job_cancel(q, d->job.id, NULL, NULL, NULL);
                if (r < 0)
                        log_error_errno(
                                r, "Guest %s disk %s: cannot send block-job-cancel: %m", c->host->name(c->guest), c->alias);
                return;
        }
        next = call_new(d, _JOB_CONTROL_MAX, NULL, NULL, NULL);
        if (!next)
                r = -ENOMEM;
        else {
                r = qemu_job_finalize(q, d->job.id, finalize_reply, next, call_free);
                if (r < 0)
                        call_free(next);
        }
        if (r < 0) {
                log_error_errno(r, "Guest %s disk %s: cannot send job-finalize: %m", c->host->name(c->guest), c->alias);
                d->job.finalize_sent = false;
        }
}

void blockjob_finalize(Disk *d) {
        BlockJobCall *c;
        int r;

        if (!d->job.id || d->job.finalize_sent || d->job.concluded || !d->host->qmp_ready(d->guest))
                return;
        if (d->job.engine == STREAM_ENGINE_MIRROR) {
                /* The mirror flushed its target before it became ready, and its source is drained
                 * while it waits: a flush there would never return. Finalize (the pivot) now. */
                c = call_new(d, _JOB_CONTROL_MAX, NULL, NULL, NULL);
                if (!c)
                        return (void) log_oom();
                d->job.finalize_sent = true;
                flush_reply(d->host->peer(d->guest)->qmp, 0, NULL, c);
                call_free(c);
                return;
        }
        c = call_new(d, _JOB_CONTROL_MAX, NULL, NULL, NULL);
        if (!c)
                r = -ENOMEM;
        else {
                /* query-block always names the top node, even when the chain is read without
                 * node names; the name is also in the state file. */
                r = qemu_flush_node(d->host->peer(d->guest)->qmp, d->node_name, flush_reply, c, call_free);
                if (r < 0)
                        call_free(c);
        }
        if (r < 0) {
                log_error_errno(
                        r, "Guest %s disk %s: cannot flush the image before finalizing: %m", d->host->name(d->guest), d->alias);
                return; /* the next poll tries again */
        }
        d->job.finalize_sent = true;
}

const JobBackend blockjob_backend = {
        .name = "QEMU",
        .control_error = "Failed to send the command to QEMU",
        .speed_error = "Failed to send block-job-set-speed to QEMU",
        .runs = blockjob_runs,
        .reachable = blockjob_reachable,
        .control = blockjob_control,
        .set_speed = blockjob_set_speed,
};

const JobBackend *job_backend_of(Disk *d) {
        if (range_backend.runs(d))
                return &range_backend;
        return &blockjob_backend;
}
