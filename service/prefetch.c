/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* Prefetch, then cut (prefetch.h). Phase 1 is a range op of the whole disk (rangeop.h) whose
 * progress and end go to a full-stream job; phase 2 is QEMU's block-stream, started when phase 1
 * completes, with the same job. QEMU's stream job copies one 512 KiB chunk at a time and reads
 * what the backing holds as holes too; the pull helper keeps many CACHE requests in flight over
 * the backing's data only, which is what wins on a remote or slow template. */

#include <inttypes.h>

#include "backend.h"
#include "bus-error.h"
#include "guest.h"
#include "engine.h"
#include "qemu.h"
#include "prefetch.h"
#include "range.h"
#include "rangeop.h"
#include "disk.h"
#include "util.h"

/* Reads in flight in phase 1: QEMU's NBD client to a remote template keeps up to 16 requests in
 * flight, and each CACHE here (the pull helper's 128 KiB) becomes one or more of them. 64 in
 * flight measured the same (bench/remote-bench, 3 rounds each: 2.96 x nbdcopy both). */
#define PREFETCH_PARALLEL 16

/* The lowest node phase 1 copies from (through a copy-on-read filter): the image just above the
 * base; NULL with no base (the whole chain, CACHE on the top node). -ENOENT: the base is not in
 * the chain; -EINVAL: it is the top's direct backing (nothing above it). */
static int bottom_of(Disk *d, const char *base_node, const char **ret) {
        if (!base_node) {
                *ret = NULL;
                return 0;
        }
        for (size_t i = 0; d->chain_nodes[i]; i++)
                if (streq(d->chain_nodes[i], base_node)) {
                        if (i == 0)
                                return -EINVAL;
                        *ret = d->chain_nodes[i - 1];
                        return 0;
                }
        return -ENOENT;
}

/* Phase 2: QEMU's block-stream. */

typedef struct CutCall {
        Guest *guest;
        char *alias;
        char *job_id;
} CutCall;

static void cut_call_free(void *p) {
        CutCall *c = p;

        if (!c)
                return;
        free(c->alias);
        free(c->job_id);
        free(c);
}

static void cut_reply(Qmp *q, int error, const char *desc, void *userdata) {
        CutCall *c = userdata;
        Disk *d = guest_find_disk(c->guest, c->alias);

        if (!d)
                return;
        /* The cut's start is over, also if its job ended before QEMU answered for it (a QEMU out of
         * order): no other start begins while this one is (Start is Busy). */
        d->starting = false;
        if (!streq_ptr(d->job.id, c->job_id))
                return;
        if (error < 0) {
                _cleanup_free_ char *why = strdup_printf(
                        "The backing chain's data was copied, but QEMU refused to drop the backing link (block-stream: "
                        "%s). The chain was kept; Start the stream again.",
                        desc ?: strerror(-error));
                log_warning("Guest %s disk %s: block-stream after the prefetch failed: %s", c->guest->name, d->alias,
                        desc ?: strerror(-error));
                disk_fail_job(d, why ?: "QEMU refused to drop the backing link.");
                return;
        }
        log_info("Guest %s disk %s: prefetch done, QEMU drops the backing link (job %s).", c->guest->name, d->alias,
                d->job.id);
        guest_update_polling(c->guest);
}

/* The id is recorded before QEMU has the job: a restart in between finds it (or finds QEMU does
 * not know it, and the job fails, reported once). Commands on one QMP connection run in order,
 * so a Pause or Cancel sent for this id from now on reaches the job. */
static int cut_start(Disk *d) {
        Guest *g = d->guest;
        CutCall *c;
        int r;

        if (!guest_qmp_ready(g))
                return -ENOTCONN;
        c = calloc(1, sizeof(CutCall));
        if (!c)
                return -ENOMEM;
        g->job_seq++;
        c->guest = g;
        c->alias = strdup(d->alias);
        c->job_id = job_id_new(d->alias, g->job_seq);
        if (!c->alias || !c->job_id) {
                cut_call_free(c);
                return -ENOMEM;
        }
        free(d->job.id);
        d->job.id = strdup(c->job_id);
        if (!d->job.id) {
                cut_call_free(c);
                return -ENOMEM;
        }
        d->job.phase = 2;
        d->starting = true;
        disk_save(d);
        r = qemu_block_stream(g->peer.qmp,
                &(QemuStreamArgs){
                        .job_id = c->job_id,
                        .node_name = d->node_name,
                        .base_node = d->job_base,
                        .speed = d->job.bandwidth,
                },
                cut_reply, c, cut_call_free);
        if (r < 0) {
                cut_call_free(c);
                d->starting = false;
                d->job.id = mfree(d->job.id);
                return r;
        }
        /* Paused as phase 1 ended (the helper had sent its last words): the job starts paused. */
        if (d->job.state == STREAM_PAUSED)
                (void) qemu_block_job_pause(g->peer.qmp, d->job.id, NULL, NULL, NULL);
        return 0;
}

/* Phase 1: the range op. */

static int prefetch_setup(RangeOp *op, Disk *d) {
        /* Recorded before QEMU has them, so that a restart can always clean up (range.c's
         * range_cleanup_leftovers() removes them); what an op of before left goes first. */
        range_drop_leftovers(d);
        free(d->range_node);
        free(d->range_export);
        d->range_node = op->node ? strdup(op->node) : NULL;
        d->range_export = strdup(op->export_id);
        (void) guest_save(op->guest);
        return 0;
}

static int prefetch_ready(RangeOp *op, Disk *d) {
        Guest *g = op->guest;

        if (op->bandwidth_changed && range_op_send(op, CONTROL_COMMAND_BANDWIDTH, op->bandwidth) < 0) {
                range_op_end(op, STREAM_FAILED, "cannot tell the pull helper its bandwidth");
                return 0;
        }
        if (op->resume) {
                d->starting = false;
                log_info("Guest %s disk %s: prefetch resumed after a restart.", g->name, d->alias);
                if (op->resume_paused && range_op_send(op, CONTROL_COMMAND_PAUSE, 0) < 0) {
                        range_op_end(op, STREAM_FAILED, "cannot pause the pull helper again");
                        return 0;
                }
                return 1;
        }
        if (job_begin(&d->job, "", STREAM_MODE_FULL, 0, d->size, op->length, op->bandwidth, now_usec(CLOCK_REALTIME)) <
                0) {
                range_op_end(op, STREAM_FAILED, "out of memory");
                return 0;
        }
        d->job.id = mfree(d->job.id); /* no QEMU job in phase 1 */
        d->job.caller = op->caller;
        d->job.engine = STREAM_ENGINE_PREFETCH;
        d->job.phase = 1;
        d->starting = false;
        d->bandwidth = op->bandwidth;
        log_info("Guest %s disk %s: stream started (prefetch, then cut).", g->name, d->alias);
        disk_apply_job_changes(d, JOB_CHANGED_STATE);
        (void) sd_bus_reply_method_return(op->call, NULL);
        op->call = sd_bus_message_unref(op->call);
        return 1;
}

static void prefetch_finish(RangeOp *op, Disk *d) {
        int r;

        if (!d)
                return;
        if (!op->left_in_qemu) { /* else kept for the reconnect's cleanup (range.c) */
                d->range_node = mfree(d->range_node);
                d->range_export = mfree(d->range_export);
        }
        if (!op->ready && !op->resume) {
                /* It never began: Start gets the failure (rangeop.c answers op->call). */
                d->starting = false;
                (void) guest_save(op->guest);
                return;
        }
        if (op->outcome == STREAM_COMPLETED && job_is_active(&d->job) && !d->job.concluded && d->job.phase == 1) {
                r = cut_start(d);
                if (r >= 0)
                        return;
                log_warning_errno(r, "Guest %s disk %s: cannot start block-stream after the prefetch: %m",
                        op->guest->name, d->alias);
                disk_fail_job(d, "The backing chain's data was copied, but the backing link could not be dropped "
                                 "(QEMU is not reachable). Start the stream again.");
                return;
        }
        disk_apply_job_changes(d, job_conclude(&d->job, op->outcome, op->error));
}

static const RangeOpKind prefetch_kind = {
        .fail_text = "Cannot stream disk",
        .setup = prefetch_setup,
        .ready = prefetch_ready,
        .progress = range_op_job_progress,
        .finish = prefetch_finish,
};

/* A phase-1 op of the whole disk; bottom as bottom_of() found it. */
static int phase1_new(Disk *d, sd_bus_message *msg, uint64_t bandwidth, const char *bottom, RangeOp **ret) {
        uint64_t a, b;
        RangeOp *op;
        int r;

        range_widen(0, d->size, d->cluster_size, d->size, &a, &b);
        r = range_op_new(d, &prefetch_kind, msg, false, a, b - a, &op);
        if (r < 0)
                return r;
        op->asked_offset = 0;
        op->asked_length = d->size;
        op->bandwidth = bandwidth;
        op->parallel = PREFETCH_PARALLEL;
        /* With a base, reads through a copy-on-read filter whose bottom keeps it (see range.c). */
        if (bottom && (!(op->bottom = strdup(bottom)) || !(op->node = strdup_printf("bscor-%u", op->id)))) {
                op->call = sd_bus_message_unref(op->call);
                range_op_kill(op);
                return -ENOMEM;
        }
        *ret = op;
        return 0;
}

int prefetch_start(Disk *d, sd_bus_message *msg, uint64_t bandwidth, const char *base_node, sd_bus_error *error) {
        const char *bottom;
        char *base = NULL;
        RangeOp *op;
        uid_t caller;
        int r;

        if (d->guest->offline)
                return sd_bus_error_setf(error, SD_BUS_ERROR_NOT_SUPPORTED,
                        "Engine 'prefetch' needs a running guest; guest '%s' is not running, and its storage helper "
                        "streams disk '%s' with engine 'stream' (or 'auto').",
                        d->guest->name, d->alias);
        r = bottom_of(d, base_node, &bottom);
        if (r == -EINVAL)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                        "'%s' is the direct backing image of disk '%s': nothing lies above it to prefetch; use engine "
                        "'stream' or 'auto'.",
                        base_node, d->alias);
        if (r < 0)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                        "'%s' is not in the backing chain of disk '%s'.", base_node, d->alias);
        r = range_op_caller_may_start(d->guest->engine, msg, &caller, error);
        if (r < 0)
                return r;
        if (base_node && !(base = strdup(base_node)))
                return -ENOMEM;
        /* The base phase 2 keeps, and a restart of phase 1 finds its bottom by. */
        free(d->job_base);
        d->job_base = base;
        r = phase1_new(d, msg, bandwidth, bottom, &op);
        if (r < 0)
                return r;
        op->caller = caller;
        d->starting = true;
        r = range_op_start(op);
        if (r < 0) {
                d->starting = false;
                op->call = sd_bus_message_unref(op->call);
                range_op_kill(op);
                return sd_bus_error_set_errnof(error, -r, "Cannot start the pull helper: %m");
        }
        return 1;
}

bool prefetch_wins(Disk *d) {
        /* A guest that is not running keeps its storage helper's block-stream (nobody else writes
         * the disk); a disk with nothing below it has nothing to prefetch. */
        if (d->guest->offline || strv_isempty(d->chain))
                return false;
        /* Measured (README, Performance): from a remote template prefetch takes a fraction of
         * block-stream's time; from local images block-stream is faster, and keeps its pause on a
         * full disk. */
        return disk_backing_remote(d, NULL);
}

static int prefetch_resume(Disk *d) {
        const char *bottom;
        RangeOp *op;
        int r;

        r = bottom_of(d, d->job_base, &bottom);
        if (r < 0)
                return r;
        r = phase1_new(d, NULL, d->job.bandwidth, bottom, &op);
        if (r < 0)
                return r;
        /* In the share of who started it (a record from before says not: its owner's). */
        op->caller = d->job.caller != UID_INVALID ? d->job.caller : d->guest->owner;
        op->resume = true;
        op->resume_paused = d->job.state == STREAM_PAUSED;
        r = range_op_start(op);
        if (r < 0) {
                range_op_kill(op);
                return r;
        }
        return 0;
}

void prefetch_resume_orphans(Guest *g) {
        for (size_t i = 0; i < g->n_disks; i++) {
                Disk *d = g->disks[i];
                int r;

                if (d->job.engine != STREAM_ENGINE_PREFETCH || d->job.phase != 1 || !job_is_active(&d->job) ||
                        d->job.concluded || d->starting || range_op_of_disk(d))
                        continue;
                r = prefetch_resume(d);
                if (r < 0) {
                        log_warning_errno(r, "Guest %s disk %s: cannot resume the prefetch: %m", g->name, d->alias);
                        disk_fail_job(d, "The daemon restarted during the stream and could not carry it on; what was "
                                         "copied stays copied. Start it again to copy the rest.");
                }
        }
}
