/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* Range jobs: Start(offset, length) streams a byte range through the guest's QMP peer (see
 * rangeop.h), and the range backend (backend.h) pauses, resumes, cancels and throttles it
 * through its helper. After a restart, a range job's leftovers in QEMU go and the job goes on
 * with a new helper. */

#include <inttypes.h>

#include "backend.h"
#include "bus-error.h"
#include "guest.h"
#include "helper.h"
#include "engine.h"
#include "qemu.h"
#include "range.h"
#include "rangeop.h"
#include "disk.h"
#include "util.h"

static int range_setup(RangeOp *op, Disk *d) {
        /* What an op of before left (a lost QMP connection's) goes first: its record is replaced. */
        range_drop_leftovers(d);
        /* Recorded before QEMU has them, so that a restart can always clean up. */
        free(d->range_node);
        free(d->range_export);
        free(d->range_bottom);
        d->range_node = op->node ? strdup(op->node) : NULL;
        d->range_export = strdup(op->export_id);
        d->range_bottom = op->bottom ? strdup(op->bottom) : NULL;
        (void) guest_save(op->guest);
        return 0;
}

/* The helper is up: the job begins (or goes on, after a restart). */
static int range_ready(RangeOp *op, Disk *d) {
        Guest *g = op->guest;

        if (op->bandwidth_changed && range_op_send(op, CONTROL_COMMAND_BANDWIDTH, op->bandwidth) < 0) {
                range_op_end(op, STREAM_FAILED, "cannot tell the pull helper its bandwidth");
                return 0;
        }
        if (op->resume) {
                /* The job goes on as it was: same StartTime, the progress so far (the helper
                 * counts what is local already as done). */
                d->starting = false;
                log_info("Guest %s disk %s: range stream of [%" PRIu64 ", +%" PRIu64 ") resumed after a restart.",
                        g->name, d->alias, op->offset, op->length);
                if (op->resume_paused && range_op_send(op, CONTROL_COMMAND_PAUSE, 0) < 0) {
                        range_op_end(op, STREAM_FAILED, "cannot pause the pull helper again");
                        return 0;
                }
                return 1;
        }
        if (job_begin(&d->job, "", STREAM_MODE_RANGE, op->asked_offset, op->asked_length, op->length,
                    op->bandwidth, now_usec(CLOCK_REALTIME)) < 0) {
                range_op_end(op, STREAM_FAILED, "out of memory");
                return 0;
        }
        d->job.id = mfree(d->job.id); /* no QEMU job behind a range stream */
        d->job.caller = op->caller;
        d->starting = false;
        d->bandwidth = op->bandwidth;
        log_info("Guest %s disk %s: range stream of [%" PRIu64 ", +%" PRIu64 ") started.", g->name, d->alias,
                op->offset, op->length);
        disk_apply_job_changes(d, JOB_CHANGED_STATE);
        (void) sd_bus_reply_method_return(op->call, NULL);
        op->call = sd_bus_message_unref(op->call);
        return 1;
}

/* The outcome goes to the disk's job (persisted, published, Finished). */
static void range_finish(RangeOp *op, Disk *d) {
        if (!d)
                return;
        if (!op->left_in_qemu) {
                d->range_node = mfree(d->range_node);
                d->range_export = mfree(d->range_export);
        }
        d->range_bottom = mfree(d->range_bottom);
        if (op->ready || op->resume) {
                unsigned changed = job_conclude(&d->job, op->outcome, op->error);
                disk_apply_job_changes(d, changed); /* persists, publishes, Finished */
        } else {
                d->starting = false;
                (void) guest_save(op->guest);
        }
}

/* "done" counts once the helper's own last report said all of the range was copied (an honest one
 * reports that just before): a helper taken over would call a range complete, its progress set to
 * the whole, that it never copied. */
static bool range_done(RangeOp *op) {
        if (op->copied_all)
                return false;
        range_op_end(op, STREAM_FAILED, "the pull helper said it was done before it had copied the whole range");
        return true;
}

static const RangeOpKind range_kind = {
        .fail_text = "Cannot stream a range of disk",
        .setup = range_setup,
        .ready = range_ready,
        .progress = range_op_job_progress,
        .done = range_done,
        .finish = range_finish,
};

void range_widen(uint64_t offset, uint64_t end, uint64_t cs, uint64_t size, uint64_t *ret_start, uint64_t *ret_stop) {
        if (cs == 0)
                cs = 65536;
        *ret_start = offset / cs * cs;
        *ret_stop = end % cs ? MIN(size, (end / cs + 1) * cs) : end;
}

/* Only a range that keeps the images from `bottom` down needs the copy-on-read filter (its
 * `bottom` limits what is copied). Without one the export is on the top node itself:
 * NBD_CMD_CACHE there is QEMU's own copy-on-read of that node, one read and one write,
 * serialised against the guest's writes to the same clusters. Through the filter a CACHE would
 * copy twice (the filter's inner copy-on-read, then the outer one writing the same data again to
 * the top node, where a guest write in between would be overwritten with the old data), so the
 * helper reads instead (--no-cache). */
static int op_set_bottom(RangeOp *op, const char *bottom) {
        if (!bottom)
                return 0;
        if (!(op->bottom = strdup(bottom)) || !(op->node = strdup_printf("bscor-%u", op->id)))
                return -ENOMEM;
        return 0;
}

int range_start(Disk *d, sd_bus_message *msg, uint64_t offset, uint64_t length, uint64_t asked_offset,
        uint64_t asked_length, uint64_t bandwidth, const char *bottom, sd_bus_error *error) {
        RangeOp *op;
        uid_t caller;
        int r;

        r = range_op_caller_may_start(d->guest->engine, msg, &caller, error);
        if (r < 0)
                return r;
        r = range_op_new(d, &range_kind, msg, false, offset, length, &op);
        if (r < 0)
                return r;
        op->caller = caller;
        op->asked_offset = asked_offset;
        op->asked_length = asked_length;
        op->bandwidth = bandwidth;
        if (op_set_bottom(op, bottom) < 0) {
                op->call = sd_bus_message_unref(op->call);
                range_op_kill(op);
                return -ENOMEM;
        }
        d->starting = true;
        r = range_op_start(op);
        if (r < 0) {
                d->starting = false;
                op->call = sd_bus_message_unref(op->call);
                range_op_kill(op);
                return guest_ready_error(d->guest, r, error);
        }
        return 1;
}

static int range_pause(Disk *d, bool pause) {
        RangeOp *op = range_op_of_disk(d);
        int r;

        if (op && !op->ready && op->resume) {
                /* A job carried on after a restart, its new helper not yet up: it starts as asked. */
                op->resume_paused = pause;
                disk_apply_job_changes(d, job_set_paused(&d->job, pause));
                return 0;
        }
        if (!op || !op->ready)
                return -ENOTCONN;
        r = range_op_send(op, pause ? CONTROL_COMMAND_PAUSE : CONTROL_COMMAND_RESUME, 0);
        if (r < 0)
                return r;
        disk_apply_job_changes(d, job_set_paused(&d->job, pause));
        return 0;
}

/* A helper told to stop has this long to do so (it takes milliseconds), then it is killed: one taken
 * over, or not reading its socket, would keep the job running after Cancel answered. */
#define RANGE_STOP_TIMEOUT_USEC (5 * USEC_PER_SEC)

static int range_cancel(Disk *d) {
        RangeOp *op = range_op_of_disk(d);

        if (!op)
                return -ENOTCONN;
        op->stop_requested = true;
        if (!op->ready || range_op_send(op, CONTROL_COMMAND_STOP, 0) < 0) {
                /* Not up yet, or not listening (its socket full): it goes with the op. */
                range_op_end(op, STREAM_CANCELLED, NULL);
                return 0;
        }
        (void) helper_kill_after(op->child, RANGE_STOP_TIMEOUT_USEC);
        return 0;
}

static int range_set_bandwidth(Disk *d, uint64_t bandwidth) {
        RangeOp *op = range_op_of_disk(d);

        if (!op)
                return -ENOTCONN;
        op->bandwidth = bandwidth;
        if (!op->ready) {
                /* Its helper is not up yet (a job carried on after a restart): it is told once it is. */
                op->bandwidth_changed = true;
                return 0;
        }
        return range_op_send(op, CONTROL_COMMAND_BANDWIDTH, bandwidth);
}

/* The range backend: the helper is told at once over its control socket. */

static bool range_runs(Disk *d) {
        return range_op_of_disk(d) != NULL;
}

static bool range_reachable(Disk *d) {
        return true;
}

/* The helper was told (r >= 0): that is the answer. */
static int answer_now(int r, job_backend_reply_t reply, void *userdata, void (*destroy)(void *)) {
        if (r < 0)
                return r;
        reply(0, NULL, userdata);
        if (destroy)
                destroy(userdata);
        return 0;
}

static int range_control(Disk *d, JobControl what, job_backend_reply_t reply, void *userdata,
        void (*destroy)(void *)) {
        return answer_now(what == JOB_CONTROL_CANCEL ? range_cancel(d) : range_pause(d, what == JOB_CONTROL_PAUSE),
                reply, userdata, destroy);
}

static int range_set_speed(Disk *d, uint64_t bandwidth, job_backend_reply_t reply, void *userdata,
        void (*destroy)(void *)) {
        return answer_now(range_set_bandwidth(d, bandwidth), reply, userdata, destroy);
}

const JobBackend range_backend = {
        .name = "range",
        .control_error = "Failed to tell the pull helper",
        .speed_error = "Failed to tell the pull helper",
        .runs = range_runs,
        .reachable = range_reachable,
        .control = range_control,
        .set_speed = range_set_speed,
};

void range_free_all(Engine *m) {
        while (m->range_ops) {
                range_op_kill(m->range_ops);
        }
}

/* Deleting a leftover filter: its export (closed with the server) may take a moment to let
 * go of it, so "in use" is retried a few times. */
typedef struct LeftoverNode {
        Engine *engine;
        char *guest; /* by name: a retry may come after the guest went away */
        char *node;
        unsigned tries;
        sd_event_source *timer;
} LeftoverNode;

static void leftover_free(void *p) {
        LeftoverNode *l = p;

        if (!l)
                return;
        sd_event_source_disable_unref(l->timer);
        free(l->guest);
        free(l->node);
        free(l);
}

static void leftover_del(LeftoverNode *l);

static int leftover_retry(sd_event_source *s, uint64_t usec, void *userdata) {
        LeftoverNode *l = userdata;

        l->timer = sd_event_source_disable_unref(l->timer);
        leftover_del(l);
        return 0;
}

static void leftover_deleted(Qmp *q, int error, const char *desc, void *userdata) {
        LeftoverNode *l = userdata;
        LeftoverNode *again;

        if (error == -EREMOTEIO && desc && strstr(desc, "in use") && l->tries < 20) {
                /* The reply's context is freed after this returns: carry on with a copy. */
                again = calloc(1, sizeof(LeftoverNode));
                if (!again || !(again->node = strdup(l->node)) || !(again->guest = strdup(l->guest))) {
                        leftover_free(again);
                        return;
                }
                again->engine = l->engine;
                again->tries = l->tries + 1;
                if (sd_event_add_time_relative(l->engine->event, &again->timer, CLOCK_MONOTONIC,
                            100 * USEC_PER_MSEC, 0, leftover_retry, again) < 0)
                        leftover_free(again);
                return;
        }
        if (error < 0 && error != -EREMOTEIO)
                log_debug("Guest %s: leftover filter %s: %s", l->guest, l->node, strerror(-error));
}

static void leftover_del(LeftoverNode *l) {
        Guest *g = engine_find_guest(l->engine, l->guest);

        if (!g || !guest_qmp_ready(g) || qemu_blockdev_del(g->peer.qmp, l->node, leftover_deleted, l, leftover_free) < 0)
                leftover_free(l);
}

static bool bottom_in_chain(Disk *d, const char *bottom) {
        size_t n = strv_length(d->chain_nodes);

        for (size_t i = 0; i + 1 < n; i++)
                if (streq(d->chain_nodes[i], bottom))
                        return true;
        return false;
}

/* A range job that was running (or paused) when the daemon went away: its helper died with the
 * daemon, its filter and export are being removed; a new helper carries on from where the image
 * is (what is local already is skipped). The job keeps its identity: one Finished at the end. */
static int range_resume(Disk *d) {
        uint64_t a, b, end;
        RangeOp *op;
        int r;

        if (d->job.length == 0 || add_overflows_u64(d->job.offset, d->job.length, &end) || end > d->size)
                return -EINVAL;
        /* The recorded bottom must still be an image of this disk's backing chain with one below it,
         * the base (QEMU may have been started anew meanwhile, its "#block" names given out again):
         * chain_nodes[] lists the backing images, nearest first, and the bottom is the one just
         * above the base. */
        if (d->range_bottom && !bottom_in_chain(d, d->range_bottom))
                return -ESTALE;
        range_widen(d->job.offset, end, d->cluster_size, d->size, &a, &b);
        r = range_op_new(d, &range_kind, NULL, false, a, b - a, &op);
        if (r < 0)
                return r;
        op->asked_offset = d->job.offset;
        op->asked_length = d->job.length;
        op->bandwidth = d->job.bandwidth;
        /* In the share of who started it (a record from before says not: its owner's). */
        op->caller = d->job.caller != UID_INVALID ? d->job.caller : d->guest->owner;
        op->resume = true;
        op->resume_paused = d->job.state == STREAM_PAUSED;
        if (op_set_bottom(op, d->range_bottom) < 0) {
                range_op_kill(op);
                return -ENOMEM;
        }
        r = range_op_start(op);
        if (r < 0) {
                range_op_kill(op);
                return r;
        }
        return 0;
}

/* Is the disk's record that of an op alive now? The loss of a connection ends every op on it
 * (op_peer_lost()), so a live op was started on the current connection, and what it recorded
 * (range_setup()) is in use, not left over, even if it was recorded before the reconnect's
 * cleanup came: Start is served as soon as QMP is up, before query-block-jobs has answered. */
static bool range_record_in_use(Disk *d) {
        for (RangeOp *op = d->guest->engine->range_ops; op; op = op->next)
                if (!op->map && op->guest == d->guest && streq(op->alias, d->alias) && d->range_export &&
                        streq(op->export_id, d->range_export))
                        return true;
        return false;
}

/* After a restart or a reconnect: the filter and export a range job of ours left behind
 * (recorded before QEMU got them). The job itself, which died with its helper, is resumed by
 * range_resume_orphans() once the disks are known again. */
/* What an op of before left recorded on d (its filter, its export), not a live op's: removed from
 * QEMU, which may still have them, and the record dropped. 1 if there was one. */
static bool drop_leftovers(Disk *d) {
        Guest *g = d->guest;

        if (range_record_in_use(d) || (!d->range_node && !d->range_export))
                return false;
        if (d->range_export && guest_qmp_ready(g))
                (void) qemu_block_export_del(g->peer.qmp, d->range_export, NULL, NULL, NULL);
        if (d->range_node && guest_qmp_ready(g)) {
                LeftoverNode *l = calloc(1, sizeof(LeftoverNode));
                if (l && (l->node = strdup(d->range_node)) && (l->guest = strdup(g->name))) {
                        l->engine = g->engine;
                        leftover_del(l);
                } else
                        leftover_free(l);
        }
        d->range_node = mfree(d->range_node);
        d->range_export = mfree(d->range_export);
        return true;
}

void range_drop_leftovers(Disk *d) {
        if (drop_leftovers(d))
                (void) guest_save(d->guest);
}

void range_cleanup_leftovers(Guest *g) {
        bool changed = false;

        for (size_t i = 0; i < g->n_disks; i++)
                changed |= drop_leftovers(g->disks[i]);
        if (changed)
                (void) guest_save(g);
}

void range_resume_orphans(Guest *g) {
        bool changed = false;

        for (size_t i = 0; i < g->n_disks; i++) {
                Disk *d = g->disks[i];

                if (d->job.mode == STREAM_MODE_RANGE && job_is_active(&d->job) && !d->job.concluded && !range_op_of_disk(d)) {
                        int r = range_resume(d);
                        if (r < 0) {
                                log_warning_errno(r, "Guest %s disk %s: cannot resume the range stream: %m", g->name,
                                        d->alias);
                                disk_fail_job(d, "The daemon restarted during the range stream and could not carry it "
                                                 "on; what was copied stays copied. Start it again to copy the rest.");
                        }
                }
                if (d->range_bottom && !range_op_of_disk(d)) {
                        d->range_bottom = mfree(d->range_bottom);
                        changed = true;
                }
        }
        if (changed)
                (void) guest_save(g);
}
