/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* GetAllocationMap: block status of a byte range of the disk, read by the pull helper in map
 * mode through an export of the disk (see rangeop.h); and the disk's shared map export kept
 * while QEMU streams the disk. */

#include <inttypes.h>

#include "bus-error.h"
#include "bus-util.h"
#include "guest.h"
#include "engine.h"
#include "helper.h"
#include "map.h"
#include "qemu.h"
#include "rangeop.h"
#include "disk.h"
#include "util.h"

#define MAPS_PER_GUEST_MAX 8 /* each runs a helper: a flood of GetAllocationMap gets Busy */
/* And in all, whatever the number of guests: each map runs a pull helper, and a map of a guest
 * that is not running starts a storage helper (a whole QEMU) too. */
#define MAPS_MAX 16
/* And per calling user (root aside): a guest's owner who reads maps of a guest that serves them
 * slowly, or not at all, holds at most this many of the MAPS_MAX places, and the others stay
 * for everyone else. */
#define MAPS_PER_CALLER_MAX 4

/* GetAllocationMap during a full stream. Adding or removing an export attaches a BlockBackend to
 * the top node or detaches it, which drains the node, and QEMU 7.2's stream job, woken from its
 * rate-limit sleep by the drain, copies its next chunk at once instead of sleeping on: a client
 * polling maps made a stream limited to 4 MiB/s copy at 80 MiB/s. So while QEMU streams the disk,
 * the first map's export stays (the disk's map_export) and later maps use it; it goes when the
 * job ends. Range jobs pace themselves in the helper and are not affected. */
static bool map_export_wanted(Disk *d) {
        return d->job.id && !d->job.concluded && !d->finalizing && job_is_active(&d->job);
}

/* A map's own export, at its end: keep it as the disk's map_export if that is wanted. */
static bool map_export_park(RangeOp *op) {
        Guest *g = op->guest;
        Disk *d = guest_find_disk(g, op->alias);
        char *id, *node;

        if (!d || d->map_export || !guest_qmp_ready(g) || !map_export_wanted(d) || !op->export_node ||
                !streq_ptr(op->export_node, d->node_name))
                return false;
        id = strdup(op->export_id);
        node = strdup(op->export_node);
        if (!id || !node) {
                free(id);
                free(node);
                return false;
        }
        d->map_export = id;
        d->map_export_node = node;
        d->map_export_users = 0;
        d->map_export_releaser = map_export_release;
        return true;
}

static const RangeOpKind map_kind;

void map_export_release(Disk *d) {
        RangeOp *op;

        if (!d->map_export || d->map_export_users > 0)
                return;
        if (!guest_qmp_ready(d->guest) || range_op_new(d, &map_kind, NULL, true, 0, 0, &op) < 0) {
                /* QEMU is gone (and the export with it), or no memory: the NBD server's stop
                 * takes the export with it. */
                d->map_export = mfree(d->map_export);
                d->map_export_node = mfree(d->map_export_node);
                peer_nbd_drop(&d->guest->peer);
                peer_nbd_server_release_if_unused(&d->guest->peer);
                return;
        }
        /* An op without a call whose only work is the removal. */
        free(op->export_id);
        op->export_id = TAKE_PTR(d->map_export);
        d->map_export_node = mfree(d->map_export_node);
        op->export_added = true;
        range_op_end(op, STREAM_COMPLETED, NULL);
}

/* While QEMU streams the disk, a map reads the disk's shared export if there is one. */
static int map_setup(RangeOp *op, Disk *d) {
        char *id;

        if (!d->map_export || !streq_ptr(d->map_export_node, d->node_name))
                return 0;
        id = strdup(d->map_export);
        if (!id) {
                range_op_end(op, STREAM_FAILED, "out of memory");
                return 1;
        }
        free(op->export_id);
        op->export_id = id;
        op->shared_export = true;
        d->map_export_users++;
        range_op_setup_done(op);
        return 1;
}

/* A map on the disk's shared export lets go of it; a map's own export may become the disk's. */
static void map_end(RangeOp *op) {
        Guest *g = op->guest;

        if (op->shared_export) {
                Disk *d = guest_find_disk(g, op->alias);

                op->shared_export = false;
                if (d && d->map_export && streq(d->map_export, op->export_id) && d->map_export_users > 0) {
                        d->map_export_users--;
                        if (!map_export_wanted(d))
                                map_export_release(d);
                }
        } else if (op->export_added && op->map && map_export_park(op))
                op->export_added = false; /* the disk holds it now, and its share of nbd_users */
}

/* The map's extents go to the caller. */
static void map_finish(RangeOp *op, Disk *d) {
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
        int r;

        if (!op->call || op->outcome != STREAM_COMPLETED)
                return;
        {
                r = sd_bus_message_new_method_return(op->call, &reply);
                if (r >= 0)
                        r = sd_bus_message_open_container(reply, 'a', "(ttus)");
                for (size_t i = 0; r >= 0 && i < op->n_extents; i++)
                        r = sd_bus_message_append(reply, "(ttus)", op->extents[i].offset, op->extents[i].length,
                                op->extents[i].depth, control_extent_kind_to_string(op->extents[i].kind));
                if (r >= 0)
                        r = sd_bus_message_close_container(reply);
                if (r >= 0)
                        r = sd_bus_send(NULL, reply, NULL);
                if (r < 0)
                        (void) sd_bus_reply_method_errorf(op->call, SD_BUS_ERROR_FAILED,
                                "Failed to send the allocation map: %s", strerror(-r));
        }
        op->call = sd_bus_message_unref(op->call);
}

/* The export a map read must still read the disk's node: a filter put over the node (a foreign
 * backup's, say) takes the node's exports with it, and through the filter QEMU counts every
 * allocation depth one deeper; a node replaced (a pivot) changes the map under the reads. No
 * event tells either, so the map asks QEMU where its export is once the helper is done. */
static void map_checked(Qmp *q, int error, const char *desc, char **ids, char **nodes, void *userdata) {
        RangeOp *op = userdata;
        Disk *d;
        const char *want, *now = NULL;

        if (op->dead || op->ending)
                return;
        if (error < 0) {
                _cleanup_free_ char *why =
                        strdup_printf("cannot check the export it was read through: %s", desc ?: strerror(-error));
                range_op_end(op, STREAM_FAILED, why ?: "cannot check the export it was read through");
                return;
        }
        d = guest_find_disk(op->guest, op->alias);
        want = op->shared_export ? (d ? d->map_export_node : NULL) : op->export_node;
        for (size_t i = 0; ids && ids[i]; i++)
                if (streq(ids[i], op->export_id)) {
                        now = nodes[i];
                        break;
                }
        if (!want || !streq_ptr(now, want)) {
                log_warning("Guest %s disk %s: the map's export %s reads node %s now, not %s; the map is refused.",
                        op->guest->name, op->alias, op->export_id, now ?: "(none)", want ?: "(none)");
                if (op->shared_export && d)
                        d->map_export_node = mfree(d->map_export_node); /* not for the next maps either */
                range_op_end(op, STREAM_FAILED,
                        "the disk's node changed while its map was read (a filter was put over it, or it was "
                        "replaced); read the map again");
                return;
        }
        range_op_end(op, STREAM_COMPLETED, NULL);
}

static bool map_done(RangeOp *op) {
        Guest *g = op->guest;
        int r;

        /* The helper is untrusted: its map covers the range, or stops at the most extents a reply
         * holds (the caller goes on from the last). */
        if (op->n_extents < RANGE_EXTENTS_MAX &&
                (op->n_extents == 0 || op->extents[op->n_extents - 1].offset + op->extents[op->n_extents - 1].length !=
                                               op->offset + op->length)) {
                range_op_end(op, STREAM_FAILED, "the pull helper's map does not cover the range");
                return true;
        }
        if (!guest_qmp_ready(g))
                return false; /* QEMU went away: its end says so */
        r = qemu_query_block_export_nodes(g->peer.qmp, map_checked, range_op_ref(op), range_op_unref_void);
        if (r < 0) {
                range_op_unref(op);
                range_op_end(op, STREAM_FAILED, "cannot check the export it was read through");
        }
        return true;
}

static const RangeOpKind map_kind = {
        .fail_text = "Cannot read the allocation map of disk",
        .setup = map_setup,
        .done = map_done,
        .end = map_end,
        .finish = map_finish,
};

/* A map that takes too long (a QEMU that serves its NBD export slowly, or not at all, a helper
 * that hangs) holds a helper, an export and a place among MAPS_MAX: it is failed, its helper
 * killed at once, and the export removed as for any other end. */
static int map_deadline(sd_event_source *s, uint64_t usec, void *userdata) {
        RangeOp *op = userdata;
        Engine *m = op->engine;

        op->deadline = sd_event_source_disable_unref(op->deadline);
        if (op->ending)
                return 0;
        log_warning("Guest %s disk %s: the allocation map took longer than %" PRIu64 " s; stopping it.",
                op->guest->name, op->alias, m->config.map_timeout_usec / USEC_PER_SEC);
        if (op->call) {
                (void) sd_bus_reply_method_errorf(op->call, SD_BUS_ERROR_TIMEOUT,
                        "Reading the allocation map of disk '%s' took longer than %" PRIu64
                        " s (MapTimeoutSec=) and was stopped; ask for a smaller range, or try again later.",
                        op->alias, m->config.map_timeout_usec / USEC_PER_SEC);
                op->call = sd_bus_message_unref(op->call);
        }
        (void) helper_kill(op->child); /* its end comes through helper_exited() */
        range_op_end(op, STREAM_FAILED, "the allocation map took too long");
        return 0;
}

int map_get(Disk *d, sd_bus_message *msg, uint64_t offset, uint64_t length, sd_bus_error *error) {
        Engine *m = d->guest->engine;
        unsigned maps = 0, all = 0, mine = 0;
        uid_t caller;
        RangeOp *op;
        int r;

        r = bus_sender_uid(msg, &caller);
        if (r < 0)
                return sd_bus_error_set_errnof(error, -r, "Cannot tell the caller's user: %m");
        for (RangeOp *i = m->range_ops; i; i = i->next)
                if (i->map) {
                        all++;
                        if (i->guest == d->guest)
                                maps++;
                        if (i->caller == caller)
                                mine++;
                }
        if (caller != 0 && mine >= MAPS_PER_CALLER_MAX)
                return sd_bus_error_setf(error, BS_ERROR_BUSY,
                        "%u allocation maps of yours are being read already (at most %u at once per user); try "
                        "again shortly.",
                        mine, MAPS_PER_CALLER_MAX);
        if (maps >= MAPS_PER_GUEST_MAX)
                return sd_bus_error_setf(error, BS_ERROR_BUSY,
                        "%u allocation maps of guest '%s' are being read already; try again shortly.", maps,
                        d->guest->name);
        if (all >= MAPS_MAX)
                return sd_bus_error_setf(error, BS_ERROR_BUSY,
                        "%u allocation maps are being read already (at most %u at once); try again shortly.", all,
                        MAPS_MAX);

        if (!guest_qmp_ready(d->guest) && !d->guest->offline)
                return sd_bus_error_setf(error, BS_ERROR_NOT_RUNNING,
                        "Guest '%s' is not running (no QMP connection); its allocation map cannot be read now.",
                        d->guest->name);
        r = guest_helper_share(d->guest, error);
        if (r < 0)
                return r;
        r = range_op_new(d, &map_kind, msg, true, offset, length, &op);
        if (r < 0)
                return r;
        op->caller = caller;
        r = sd_event_add_time_relative(m->event, &op->deadline, CLOCK_MONOTONIC, m->config.map_timeout_usec, 0,
                map_deadline, op);
        if (r < 0) {
                op->call = sd_bus_message_unref(op->call);
                range_op_kill(op);
                return r;
        }
        r = range_op_start(op);
        if (r < 0) {
                op->call = sd_bus_message_unref(op->call);
                range_op_kill(op);
                return guest_ready_error(d->guest, r, error);
        }
        return 1;
}
