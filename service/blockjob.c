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
