/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <ctype.h>
#include <fcntl.h>
#include <stdarg.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>

#include "bus-error.h"
#include "control.h"
#include "export.h"
#include "guest.h"
#include "manager.h"
#include "qemu.h"
#include "range.h"
#include "sandbox.h"
#include "stream.h"
#include "util.h"

#define PULL_BINARY "blockstream-pull"
#define EXPORT_GONE_TIMEOUT_USEC (10 * USEC_PER_SEC)
#define MAPS_PER_GUEST_MAX 8 /* each runs a helper: a flood of GetAllocationMap gets Busy */
/* And in all, whatever the number of guests: each map runs a pull helper, and a map of a guest
 * that is not running starts a storage helper (a whole QEMU) too. */
#define MAPS_MAX 16

typedef struct Extent {
        uint64_t offset, length;
        uint32_t depth;
        uint8_t kind;
} Extent;

struct RangeOp {
        unsigned n_ref; /* pending QMP calls hold one each: their replies may outlive the op */
        bool dead;      /* finished: replies find nothing to do */
        Manager *manager;
        RangeOp *next;
        Guest *guest;
        char *alias;
        bool map;
        unsigned id;
        char *node;      /* copy-on-read filter (pull) */
        char *export_id; /* also the export's name */
        char *export_node;  /* the node it exports */
        bool shared_export; /* a map on the disk's map_export: not ours to remove */
        char *bottom;
        uint64_t offset, length, bandwidth;  /* what the helper works on */
        uint64_t asked_offset, asked_length; /* what the caller asked for (Offset/Length) */
        sd_bus_message *call; /* Start or GetAllocationMap, until answered */

        unsigned pending; /* QEMU commands of the setup still unanswered */
        char *setup_error;
        bool node_added, export_added;

        pid_t pid;
        sd_event_source *child;
        int control_fd;
        sd_event_source *control_source;
        HelperLog *log;
        bool ready, stop_requested, got_done;
        bool resume, resume_paused; /* a range job of before a daemon restart, carried on */
        bool bandwidth_changed;     /* SetBandwidth before the helper was ready: tell it then */

        Extent *extents;
        size_t n_extents;

        bool ending;
        StreamState outcome;
        char *error;
        sd_event_source *cleanup_timer;
        sd_event_source *deadline; /* a map: MapTimeoutSec= */
};

/* Let go of everything the op holds but its memory. */
static void op_release(RangeOp *op) {
        if (op->call) {
                (void) sd_bus_reply_method_errorf(op->call, BS_ERROR_HELPER_FAILED, "The operation on disk '%s' was dropped.",
                        op->alias);
                sd_bus_message_unref(op->call);
        }
        sd_event_source_disable_unref(op->child);
        if (op->pid > 0) {
                (void) kill(op->pid, SIGKILL);
                (void) waitpid(op->pid, NULL, 0);
        }
        sd_event_source_disable_unref(op->control_source);
        sd_event_source_disable_unref(op->cleanup_timer);
        sd_event_source_disable_unref(op->deadline);
        op->child = NULL;
        op->control_source = op->cleanup_timer = op->deadline = NULL;
        op->call = NULL;
        op->pid = 0;
        closep(&op->control_fd);
        op->control_fd = -1;
        op->log = helper_log_free(op->log);
}

static RangeOp *op_unref(RangeOp *op) {
        if (!op || --op->n_ref > 0)
                return NULL;
        op_release(op);
        free(op->alias);
        free(op->node);
        free(op->export_id);
        free(op->export_node);
        free(op->bottom);
        free(op->setup_error);
        free(op->extents);
        free(op->error);
        free(op);
        return NULL;
}

static void op_unref_void(void *p) {
        op_unref(p);
}

static RangeOp *op_ref(RangeOp *op) {
        op->n_ref++;
        return op;
}

/* Done with it: out of the list, resources released; memory goes with the last reference. */
static void op_kill(RangeOp *op);

static void op_unlink(RangeOp *op) {
        for (RangeOp **p = &op->manager->range_ops; *p; p = &(*p)->next)
                if (*p == op) {
                        *p = op->next;
                        return;
                }
}

static void op_kill(RangeOp *op) {
        op->dead = true;
        op_unlink(op);
        op_release(op);
        op_unref(op);
}

/* For waiters that hold no reference: is it still on the list? */
static bool op_listed(Manager *m, RangeOp *op) {
        for (RangeOp *i = m->range_ops; i; i = i->next)
                if (i == op)
                        return true;
        return false;
}

static RangeOp *disk_pull_op(Disk *d) {
        for (RangeOp *op = d->guest->manager->range_ops; op; op = op->next)
                if (!op->map && op->guest == d->guest && streq(op->alias, d->alias) && !op->ending)
                        return op;
        return NULL;
}

bool range_running(Disk *d) {
        return disk_pull_op(d) != NULL;
}

bool range_guest_busy(Guest *g) {
        for (RangeOp *op = g->manager->range_ops; op; op = op->next)
                if (op->guest == g)
                        return true;
        return false;
}

/* A command to the pull helper (control.c builds it); number: the bandwidth's. */
static int op_send(RangeOp *op, ControlCommandKind kind, uint64_t number) {
        if (op->control_fd < 0)
                return -ENOTCONN;
        return control_send_command(op->control_fd, MSG_NOSIGNAL | MSG_DONTWAIT,
                &(ControlCommand) { .kind = kind, .number = number }, -1);
}

/* The end: helper gone, export and filter out of QEMU, then the outcome is told. */

static void op_finish(RangeOp *op) {
        Manager *m = op->manager;
        Guest *g = op->guest;
        Disk *d = guest_find_disk(g, op->alias);

        if (d && !op->map) {
                d->range_node = mfree(d->range_node);
                d->range_export = mfree(d->range_export);
                d->range_bottom = mfree(d->range_bottom);
                if (op->ready || op->resume) {
                        unsigned changed = job_conclude(&d->job, op->outcome, op->error);
                        disk_apply_job_changes(d, changed); /* persists, publishes, Finished */
                } else {
                        d->starting = false;
                        (void) guest_save(g);
                }
        }
        if (op->call) {
                if (op->map && op->outcome == STREAM_COMPLETED) {
                        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
                        int r = sd_bus_message_new_method_return(op->call, &reply);
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
                } else
                        (void) sd_bus_reply_method_errorf(op->call,
                                op->outcome == STREAM_CANCELLED ? BS_ERROR_NOT_RUNNING : BS_ERROR_HELPER_FAILED, "%s %s: %s",
                                op->map ? "Cannot read the allocation map of disk" : "Cannot stream a range of disk",
                                op->alias, op->error ?: "the pull helper failed");
                op->call = sd_bus_message_unref(op->call);
        }
        op_kill(op);
        export_server_release_if_unused(g);
        guest_release_helper_if_idle(g);
        (void) m;
}

static void node_deleted(Qmp *q, int error, const char *desc, void *userdata) {
        RangeOp *op = userdata;

        if (op->dead)
                return;
        if (error < 0)
                log_warning("Guest %s: cannot remove filter node %s: %s", op->guest->name, op->node,
                        desc ?: strerror(-error));
        op_finish(op);
}

/* The export is gone from QEMU (BLOCK_EXPORT_DELETED, or it never was): the filter can go. */
static void op_export_gone(RangeOp *op) {
        Guest *g = op->guest;

        op->cleanup_timer = sd_event_source_disable_unref(op->cleanup_timer);
        if (op->export_added) {
                op->export_added = false;
                g->nbd_users--;
        }
        if (op->node_added && guest_qmp_ready(g)) {
                op->node_added = false;
                if (qemu_blockdev_del(g->qmp, op->node, node_deleted, op_ref(op), op_unref_void) >= 0)
                        return;
                op_unref(op);
        }
        op_finish(op);
}

static int cleanup_timeout(sd_event_source *s, uint64_t usec, void *userdata) {
        RangeOp *op = userdata;

        log_warning("Guest %s: export %s did not go away in time; removing the filter anyway.", op->guest->name,
                op->export_id);
        op_export_gone(op);
        return 0;
}

static void export_del_reply(Qmp *q, int error, const char *desc, void *userdata) {
        RangeOp *op = userdata;

        if (op->dead)
                return;
        /* Refused (already gone): no event will come. */
        if (error < 0 && op->export_added)
                op_export_gone(op);
}

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
        return true;
}

static int op_new(Disk *d, sd_bus_message *msg, bool map, uint64_t offset, uint64_t length, RangeOp **ret);
static void op_end(RangeOp *op, StreamState outcome, const char *error);

void range_map_export_release(Disk *d) {
        RangeOp *op;

        if (!d->map_export || d->map_export_users > 0)
                return;
        if (!guest_qmp_ready(d->guest) || op_new(d, NULL, true, 0, 0, &op) < 0) {
                /* QEMU is gone (and the export with it), or no memory: the NBD server's stop
                 * takes the export with it. */
                d->map_export = mfree(d->map_export);
                d->map_export_node = mfree(d->map_export_node);
                if (d->guest->nbd_users > 0)
                        d->guest->nbd_users--;
                export_server_release_if_unused(d->guest);
                return;
        }
        /* An op without a call whose only work is the removal. */
        free(op->export_id);
        op->export_id = TAKE_PTR(d->map_export);
        d->map_export_node = mfree(d->map_export_node);
        op->export_added = true;
        op_end(op, STREAM_COMPLETED, NULL);
}

static void op_end(RangeOp *op, StreamState outcome, const char *error) {
        Guest *g = op->guest;

        if (op->ending)
                return;
        op->ending = true;
        op->outcome = outcome;
        if (error && !op->error)
                op->error = strdup(error);
        if (op->pid > 0)
                (void) op_send(op, CONTROL_COMMAND_STOP, 0);
        op->control_source = sd_event_source_disable_unref(op->control_source);
        closep(&op->control_fd);
        op->control_fd = -1;

        if (op->shared_export) {
                Disk *d = guest_find_disk(g, op->alias);

                op->shared_export = false;
                if (d && d->map_export && streq(d->map_export, op->export_id) && d->map_export_users > 0) {
                        d->map_export_users--;
                        if (!map_export_wanted(d))
                                range_map_export_release(d);
                }
        } else if (op->export_added && op->map && map_export_park(op))
                op->export_added = false; /* the disk holds it now, and its share of nbd_users */

        if (op->export_added && guest_qmp_ready(g)) {
                if (qemu_block_export_del(g->qmp, op->export_id, export_del_reply, op_ref(op), op_unref_void) >= 0) {
                        (void) sd_event_add_time_relative(op->manager->event, &op->cleanup_timer, CLOCK_MONOTONIC,
                                EXPORT_GONE_TIMEOUT_USEC, 0, cleanup_timeout, op);
                        return;
                }
                op_unref(op);
        }
        op_export_gone(op);
}

void range_on_export_deleted(Guest *g, const char *id) {
        for (RangeOp *op = g->manager->range_ops; op; op = op->next)
                if (op->guest == g && op->ending && op->export_added && streq(op->export_id, id)) {
                        op_export_gone(op);
                        return;
                }
}

/* The helper */

static int control_handler(sd_event_source *s, int fd, uint32_t revents, void *userdata);

static int helper_exited(sd_event_source *s, const siginfo_t *si, void *userdata) {
        RangeOp *op = userdata;

        /* Its last words ("done", "error …") may still sit in the socket: the exit can be
         * dispatched before them. Read them first. */
        while (op->control_source && !op->ending &&
                control_handler(op->control_source, op->control_fd, EPOLLIN, op) > 0)
                ; /* all of them: a map's extents come one message each (finite: the writer is gone) */
        op->pid = 0;
        op->child = sd_event_source_disable_unref(op->child);
        if (op->ending)
                return 0;
        if (op->got_done)
                op_end(op, STREAM_COMPLETED, NULL);
        else if (op->stop_requested && si->si_code == CLD_EXITED && si->si_status == 0)
                op_end(op, STREAM_CANCELLED, NULL);
        else {
                _cleanup_free_ char *why = si->si_code == CLD_EXITED
                                                   ? strdup_printf("the pull helper exited with status %i", si->si_status)
                                                   : strdup_printf("the pull helper was killed by signal %s",
                                                             sigabbrev_np(si->si_status) ?: "?");
                op_end(op, STREAM_FAILED, op->error ?: why);
        }
        return 0;
}

static int handle_extent(RangeOp *op, const ControlPullMessage *msg) {
        uint64_t off = msg->offset, len = msg->length, depth = msg->depth;
        ControlExtentKind k = msg->extent_kind;
        Extent *e, *l;

        /* In order, contiguous, inside the range, sane: the helper is untrusted too. */
        if (len == 0 || depth > 4096 || op->n_extents >= RANGE_EXTENTS_MAX)
                return -EBADMSG;
        if (off != (op->n_extents > 0 ? op->extents[op->n_extents - 1].offset + op->extents[op->n_extents - 1].length
                                      : op->offset) ||
                len > op->offset + op->length - off)
                return -EBADMSG;
        e = op->n_extents > 0 ? &op->extents[op->n_extents - 1] : NULL;
        if (e && e->depth == depth && e->kind == k) {
                e->length += len; /* merged, should the helper not have */
                return 0;
        }
        if ((op->n_extents & 255) == 0) {
                l = reallocarray(op->extents, op->n_extents + 256, sizeof(Extent));
                if (!l)
                        return -ENOMEM;
                op->extents = l;
        }
        op->extents[op->n_extents++] = (Extent) { .offset = off, .length = len, .depth = (uint32_t) depth, .kind = (uint8_t) k };
        return 0;
}

static int control_handler(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        RangeOp *op = userdata;
        Guest *g = op->guest;
        char buf[CONTROL_MESSAGE_MAX + 1];
        ControlPullMessage msg;
        ssize_t k;
        Disk *d;
        int r;

        k = recv(fd, buf, sizeof(buf), MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
        if (k < 0 && (errno == EAGAIN || errno == EINTR))
                return 0;
        if (k <= 0) {
                /* Its exit status tells the rest. */
                op->control_source = sd_event_source_disable_unref(op->control_source);
                return 0;
        }
        /* 1 below: a message was handled (helper_exited drains with it). */
        if (control_frame(buf, (size_t) k) < 0) {
                op_end(op, STREAM_FAILED, "the pull helper sent a malformed message");
                return 0;
        }
        r = control_parse_pull(buf, &msg);
        d = guest_find_disk(g, op->alias);
        if (!d) {
                op_end(op, STREAM_FAILED, "the disk went away");
                return 0;
        }

        if (msg.kind == CONTROL_PULL_READY) {
                if (op->ready)
                        return 1;
                op->ready = true;
                if (op->map)
                        return 1;
                if (op->bandwidth_changed && op_send(op, CONTROL_COMMAND_BANDWIDTH, op->bandwidth) < 0) {
                        op_end(op, STREAM_FAILED, "cannot tell the pull helper its bandwidth");
                        return 0;
                }
                if (op->resume) {
                        /* The job goes on as it was: same StartTime, the progress so far (the helper
                         * counts what is local already as done). */
                        d->starting = false;
                        log_info("Guest %s disk %s: range stream of [%" PRIu64 ", +%" PRIu64 ") resumed after a restart.",
                                g->name, d->alias, op->offset, op->length);
                        if (op->resume_paused && op_send(op, CONTROL_COMMAND_PAUSE, 0) < 0) {
                                op_end(op, STREAM_FAILED, "cannot pause the pull helper again");
                                return 0;
                        }
                        return 1;
                }
                if (job_begin(&d->job, "", STREAM_MODE_RANGE, op->asked_offset, op->asked_length, op->length,
                            op->bandwidth, now_usec(CLOCK_REALTIME)) < 0) {
                        op_end(op, STREAM_FAILED, "out of memory");
                        return 0;
                }
                d->job.id = mfree(d->job.id); /* no QEMU job behind a range stream */
                d->starting = false;
                d->bandwidth = op->bandwidth;
                log_info("Guest %s disk %s: range stream of [%" PRIu64 ", +%" PRIu64 ") started.", g->name, d->alias,
                        op->offset, op->length);
                disk_apply_job_changes(d, JOB_CHANGED_STATE);
                (void) sd_bus_reply_method_return(op->call, NULL);
                op->call = sd_bus_message_unref(op->call);
        } else if (msg.kind == CONTROL_PULL_PROGRESS && !op->map && op->ready) {
                if (r < 0 || msg.total != op->length || msg.done > msg.total) {
                        op_end(op, STREAM_FAILED, "the pull helper sent a malformed progress report");
                        return 0;
                }
                disk_apply_job_changes(d, job_apply_progress(&d->job, msg.done, msg.total, now_usec(CLOCK_MONOTONIC)));
        } else if (msg.kind == CONTROL_PULL_EXTENT && op->map) {
                if (r < 0 || handle_extent(op, &msg) < 0)
                        op_end(op, STREAM_FAILED, "the pull helper sent a malformed extent");
        } else if (msg.kind == CONTROL_PULL_DONE) {
                op->got_done = true;
        } else if (msg.kind == CONTROL_PULL_ERROR) {
                /* Its words become the job's Error, a method error and a log line. */
                free(op->error);
                op->error = text_sanitize(msg.text, msg.text_len, TEXT_SANITIZE_MAX);
        } else
                op_end(op, STREAM_FAILED, "the pull helper sent an unknown message");
        return 1;
}

static int spawn_helper(RangeOp *op) {
        Manager *m = op->manager;
        Guest *g = op->guest;
        _cleanup_free_ char *prefix = strdup_printf("Guest %s %s helper", g->name, op->map ? "map" : "pull"),
                            *a_export = strdup_printf("--export=%s", op->export_id),
                            *a_offset = strdup_printf("--offset=%" PRIu64, op->offset),
                            *a_length = strdup_printf("--length=%" PRIu64, op->length),
                            *a_bw = strdup_printf("--bandwidth=%" PRIu64, op->bandwidth);
        _cleanup_close_ int nbd = -1;
        int r;

        if (!prefix || !a_export || !a_offset || !a_length || !a_bw)
                return -ENOMEM;
        char *argv[] = { (char *) PULL_BINARY, (char *) (op->map ? "--map" : "--pull"), a_export, a_offset, a_length, a_bw,
                op->node ? (char *) "--no-cache" : NULL, NULL };

        nbd = export_server_connect(g);
        if (nbd < 0)
                return nbd;
        r = guest_spawn_helper(g, PULL_BINARY, argv, nbd, g->selinux_process_label, prefix, &op->pid, &op->control_fd,
                &op->log);
        if (r < 0)
                return r;
        r = sd_event_add_child(m->event, &op->child, op->pid, WEXITED, helper_exited, op);
        if (r < 0)
                return r;
        return sd_event_add_io(m->event, &op->control_source, op->control_fd, EPOLLIN, control_handler, op);
}

static void setup_done(RangeOp *op);

static void setup_reply(Qmp *q, int error, const char *desc, void *userdata) {
        RangeOp *op = userdata;

        if (op->dead || op->ending)
                return;
        if (error < 0 && !op->setup_error)
                op->setup_error = strdup_printf("QEMU refused: %s", desc ?: strerror(-error));
        if (--op->pending > 0)
                return;
        setup_done(op);
}

static void setup_done(RangeOp *op) {
        int r;

        if (op->setup_error) {
                op_end(op, STREAM_FAILED, op->setup_error);
                return;
        }
        r = spawn_helper(op);
        if (r < 0) {
                _cleanup_free_ char *why = strdup_printf("cannot start the pull helper: %s", strerror(-r));
                op_end(op, STREAM_FAILED, why ?: "cannot start the pull helper");
        }
}

/* QEMU answered the node; the export is sent right after it, in order. */
static void node_added_reply(Qmp *q, int error, const char *desc, void *userdata) {
        RangeOp *op = userdata;

        if (!op->dead && error < 0)
                op->node_added = false;
        setup_reply(q, error, desc, userdata);
}

static void export_added_reply(Qmp *q, int error, const char *desc, void *userdata) {
        RangeOp *op = userdata;

        if (!op->dead && error < 0 && op->export_added) {
                op->export_added = false;
                op->guest->nbd_users--;
        }
        setup_reply(q, error, desc, userdata);
}

static void backend_ready(Guest *g, int error, const char *error_text, void *userdata) {
        RangeOp *op = userdata;
        Disk *d;
        int r;

        if (!op_listed(g->manager, op))
                return;
        d = guest_find_disk(g, op->alias);
        if (error < 0 || !d) {
                op_end(op, STREAM_FAILED, !d ? "the disk went away" : error_text ?: "the guest's QMP peer is not available");
                return;
        }
        r = export_server_ensure(g);
        if (r < 0) {
                op_end(op, STREAM_FAILED, "cannot start QEMU's NBD server");
                return;
        }
        if (op->map && d->map_export && streq_ptr(d->map_export_node, d->node_name)) {
                char *id = strdup(d->map_export);

                if (!id) {
                        op_end(op, STREAM_FAILED, "out of memory");
                        return;
                }
                free(op->export_id);
                op->export_id = id;
                op->shared_export = true;
                d->map_export_users++;
                setup_done(op);
                return;
        }
        op->export_node = strdup(op->node ?: d->node_name);
        if (!op->export_node) {
                op_end(op, STREAM_FAILED, "out of memory");
                return;
        }
        if (!op->map) {
                /* Recorded before QEMU has them, so that a restart can always clean up. */
                free(d->range_node);
                free(d->range_export);
                free(d->range_bottom);
                d->range_node = op->node ? strdup(op->node) : NULL;
                d->range_export = strdup(op->export_id);
                d->range_bottom = op->bottom ? strdup(op->bottom) : NULL;
                (void) guest_save(g);
        }
        if (op->node) {
                r = qemu_blockdev_add_cor(g->qmp, op->node, d->node_name, op->bottom, node_added_reply, op_ref(op),
                        op_unref_void);
                if (r < 0) {
                        op_unref(op);
                        op_end(op, STREAM_FAILED, "cannot send blockdev-add");
                        return;
                }
                op->node_added = true;
                op->pending++;
        }
        r = qemu_block_export_add_nbd(g->qmp, op->export_id, op->node ?: d->node_name, op->export_id,
                export_added_reply, op_ref(op), op_unref_void);
        if (r < 0) {
                op_unref(op);
                op_end(op, STREAM_FAILED, "cannot send block-export-add");
                return;
        }
        op->export_added = true;
        g->nbd_users++;
        op->pending++;
}

static int op_new(Disk *d, sd_bus_message *msg, bool map, uint64_t offset, uint64_t length, RangeOp **ret) {
        Manager *m = d->guest->manager;
        RangeOp *op = calloc(1, sizeof(RangeOp));

        if (!op)
                return -ENOMEM;
        op->n_ref = 1;
        op->manager = m;
        op->guest = d->guest;
        op->map = map;
        op->id = ++m->range_seq;
        op->offset = offset;
        op->length = length;
        op->control_fd = -1;
        op->alias = strdup(d->alias);
        op->export_id = strdup_printf("%s-%u", map ? "bsm" : "bsr", op->id);
        if (!op->alias || !op->export_id) {
                op_unref(op);
                return -ENOMEM;
        }
        op->call = sd_bus_message_ref(msg);
        op->next = m->range_ops;
        m->range_ops = op;
        *ret = op;
        return 0;
}

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
        int r;

        r = op_new(d, msg, false, offset, length, &op);
        if (r < 0)
                return r;
        op->asked_offset = asked_offset;
        op->asked_length = asked_length;
        op->bandwidth = bandwidth;
        if (op_set_bottom(op, bottom) < 0) {
                op->call = sd_bus_message_unref(op->call);
                op_kill(op);
                return -ENOMEM;
        }
        d->starting = true;
        r = guest_when_ready(d->guest, backend_ready, op, NULL);
        if (r < 0) {
                d->starting = false;
                op->call = sd_bus_message_unref(op->call);
                op_kill(op);
                return sd_bus_error_set_errnof(error, -r, "Cannot start the storage helper: %m");
        }
        return 1;
}

/* A map that takes too long (a QEMU that serves its NBD export slowly, or not at all, a helper
 * that hangs) holds a helper, an export and a place among MAPS_MAX: it is failed, its helper
 * killed at once, and the export removed as for any other end. */
static int map_deadline(sd_event_source *s, uint64_t usec, void *userdata) {
        RangeOp *op = userdata;
        Manager *m = op->manager;

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
        if (op->pid > 0)
                (void) kill(op->pid, SIGKILL); /* reaped by helper_exited() */
        op_end(op, STREAM_FAILED, "the allocation map took too long");
        return 0;
}

int range_map(Disk *d, sd_bus_message *msg, uint64_t offset, uint64_t length, sd_bus_error *error) {
        Manager *m = d->guest->manager;
        unsigned maps = 0, all = 0;
        RangeOp *op;
        int r;

        for (RangeOp *i = m->range_ops; i; i = i->next)
                if (i->map) {
                        all++;
                        if (i->guest == d->guest)
                                maps++;
                }
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
        r = op_new(d, msg, true, offset, length, &op);
        if (r < 0)
                return r;
        r = sd_event_add_time_relative(m->event, &op->deadline, CLOCK_MONOTONIC, m->config.map_timeout_usec, 0,
                map_deadline, op);
        if (r < 0) {
                op->call = sd_bus_message_unref(op->call);
                op_kill(op);
                return r;
        }
        r = guest_when_ready(d->guest, backend_ready, op, NULL);
        if (r < 0) {
                op->call = sd_bus_message_unref(op->call);
                op_kill(op);
                return sd_bus_error_set_errnof(error, -r, "Cannot start the storage helper: %m");
        }
        return 1;
}

int range_pause(Disk *d, bool pause) {
        RangeOp *op = disk_pull_op(d);
        int r;

        if (op && !op->ready && op->resume) {
                /* A job carried on after a restart, its new helper not yet up: it starts as asked. */
                op->resume_paused = pause;
                disk_apply_job_changes(d, job_set_paused(&d->job, pause));
                return 0;
        }
        if (!op || !op->ready)
                return -ENOTCONN;
        r = op_send(op, pause ? CONTROL_COMMAND_PAUSE : CONTROL_COMMAND_RESUME, 0);
        if (r < 0)
                return r;
        disk_apply_job_changes(d, job_set_paused(&d->job, pause));
        return 0;
}

int range_cancel(Disk *d) {
        RangeOp *op = disk_pull_op(d);

        if (!op)
                return -ENOTCONN;
        op->stop_requested = true;
        if (!op->ready) {
                op_end(op, STREAM_CANCELLED, NULL);
                return 0;
        }
        return op_send(op, CONTROL_COMMAND_STOP, 0);
}

int range_set_bandwidth(Disk *d, uint64_t bandwidth) {
        RangeOp *op = disk_pull_op(d);

        if (!op)
                return -ENOTCONN;
        op->bandwidth = bandwidth;
        if (!op->ready) {
                /* Its helper is not up yet (a job carried on after a restart): it is told once it is. */
                op->bandwidth_changed = true;
                return 0;
        }
        return op_send(op, CONTROL_COMMAND_BANDWIDTH, bandwidth);
}

void range_guest_lost(Guest *g) {
        Manager *m = g->manager;

        /* QEMU took the maps' export with it (export_guest_lost zeroes nbd_users). */
        for (size_t i = 0; i < g->n_disks; i++) {
                g->disks[i]->map_export = mfree(g->disks[i]->map_export);
                g->disks[i]->map_export_node = mfree(g->disks[i]->map_export_node);
                g->disks[i]->map_export_users = 0;
        }

        for (RangeOp *op = m->range_ops, *next; op; op = next) {
                next = op->next;
                if (op->guest != g)
                        continue;
                /* QEMU took the filter and the export with it. */
                op->node_added = false;
                if (op->export_added) {
                        op->export_added = false;
                        g->nbd_users--;
                }
                op_end(op, STREAM_FAILED, g->offline ? "the storage helper went away" : "QEMU went away");
        }
}

void range_guest_removed(Guest *g) {
        Manager *m = g->manager;

        for (RangeOp *op = m->range_ops, *next; op; op = next) {
                next = op->next;
                if (op->guest != g)
                        continue;
                op_kill(op);
        }
}

void range_free_all(Manager *m) {
        while (m->range_ops) {
                op_kill(m->range_ops);
        }
}

/* Deleting a leftover filter: its export (closed with the server) may take a moment to let
 * go of it, so "in use" is retried a few times. */
typedef struct LeftoverNode {
        Manager *manager;
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
                again->manager = l->manager;
                again->tries = l->tries + 1;
                if (sd_event_add_time_relative(l->manager->event, &again->timer, CLOCK_MONOTONIC,
                            100 * USEC_PER_MSEC, 0, leftover_retry, again) < 0)
                        leftover_free(again);
                return;
        }
        if (error < 0 && error != -EREMOTEIO)
                log_debug("Guest %s: leftover filter %s: %s", l->guest, l->node, strerror(-error));
}

static void leftover_del(LeftoverNode *l) {
        Guest *g = manager_find_guest(l->manager, l->guest);

        if (!g || !guest_qmp_ready(g) || qemu_blockdev_del(g->qmp, l->node, leftover_deleted, l, leftover_free) < 0)
                leftover_free(l);
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
        range_widen(d->job.offset, end, d->cluster_size, d->size, &a, &b);
        r = op_new(d, NULL, false, a, b - a, &op);
        if (r < 0)
                return r;
        op->asked_offset = d->job.offset;
        op->asked_length = d->job.length;
        op->bandwidth = d->job.bandwidth;
        op->resume = true;
        op->resume_paused = d->job.state == STREAM_PAUSED;
        if (op_set_bottom(op, d->range_bottom) < 0) {
                op_kill(op);
                return -ENOMEM;
        }
        r = guest_when_ready(d->guest, backend_ready, op, NULL);
        if (r < 0) {
                op_kill(op);
                return r;
        }
        return 0;
}

/* After a restart: the filter and export a range job of ours left behind (recorded before
 * QEMU got them). The job itself, which died with its helper, is resumed by
 * range_resume_orphans() once the disks are known again. */
void range_cleanup_leftovers(Guest *g) {
        bool changed = false;

        for (size_t i = 0; i < g->n_disks; i++) {
                Disk *d = g->disks[i];

                if (d->range_export && guest_qmp_ready(g))
                        (void) qemu_block_export_del(g->qmp, d->range_export, NULL, NULL, NULL);
                if (d->range_node && guest_qmp_ready(g)) {
                        LeftoverNode *l = calloc(1, sizeof(LeftoverNode));
                        if (l && (l->node = strdup(d->range_node)) && (l->guest = strdup(g->name))) {
                                l->manager = g->manager;
                                leftover_del(l);
                        } else
                                leftover_free(l);
                }
                if (d->range_node || d->range_export) {
                        d->range_node = mfree(d->range_node);
                        d->range_export = mfree(d->range_export);
                        changed = true;
                }
        }
        if (changed)
                (void) guest_save(g);
}

void range_resume_orphans(Guest *g) {
        bool changed = false;

        for (size_t i = 0; i < g->n_disks; i++) {
                Disk *d = g->disks[i];

                if (d->job.mode == STREAM_MODE_RANGE && job_is_active(&d->job) && !d->job.concluded && !disk_pull_op(d)) {
                        int r = range_resume(d);
                        if (r < 0) {
                                log_warning_errno(r, "Guest %s disk %s: cannot resume the range stream: %m", g->name,
                                        d->alias);
                                disk_fail_job(d, "The daemon restarted during the range stream and could not carry it "
                                                 "on; what was copied stays copied. Start it again to copy the rest.");
                        }
                }
                if (d->range_bottom && !disk_pull_op(d)) {
                        d->range_bottom = mfree(d->range_bottom);
                        changed = true;
                }
        }
        if (changed)
                (void) guest_save(g);
}
