/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <fcntl.h>
#include <stdarg.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>

#include "bus-error.h"
#include "bus-util.h"
#include "control.h"
#include "guest.h"
#include "engine.h"
#include "helper.h"
#include "qemu.h"
#include "rangeop.h"
#include "sandbox.h"
#include "disk.h"
#include "util.h"

#define PULL_BINARY "blockstream-pull"
/* Reads from a remote backing: each CACHE (or read) becomes one read of the backing by QEMU's
 * NBD client, which keeps at most 16 in flight, so the size of a read bounds the throughput at
 * 16 x size / latency. bench/remote-bench, whole-disk range and prefetch against nbdcopy of the
 * same template: behind 20 ms, 128 KiB reads took 11.3-11.7 s, 512 KiB 3.3-3.9 s, 2 MiB
 * 1.9-2.0 s, 4-8 MiB 1.7-2.3 s (nbdcopy 1.4 s); behind 5 ms, 128 KiB 3.3-4.5 s, 2 MiB 1.2-2.1 s.
 * Local images keep the helper's 128 KiB (a guest's QEMU maps and unmaps a bounce buffer of
 * 2 MiB for each request: README, Performance; with the helper's large first CACHE, pull.c,
 * 1 MiB local reads measured the same as 128 KiB). Reads (--no-cache) land in the helper's own
 * buffers, which it keeps within 32 MiB. */
#define PULL_CHUNK_REMOTE (UINT64_C(2) << 20)
#define EXPORT_GONE_TIMEOUT_USEC (10 * USEC_PER_SEC)

static void op_peer_lost(void *userdata);
static void op_peer_removed(void *userdata);
static bool op_peer_busy(void *userdata);

/* Let go of everything the op holds but its memory. */
static void op_release(RangeOp *op) {
        if (op->call) {
                (void) sd_bus_reply_method_errorf(op->call, BS_ERROR_HELPER_FAILED, "The operation on disk '%s' was dropped.",
                        op->alias);
                sd_bus_message_unref(op->call);
        }
        helper_release(op->child); /* killed and reaped if still running */
        sd_event_source_disable_unref(op->control_source);
        helper_pace_done(&op->control_pace);
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

RangeOp *range_op_unref(RangeOp *op) {
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

void range_op_unref_void(void *p) {
        range_op_unref(p);
}

RangeOp *range_op_ref(RangeOp *op) {
        op->n_ref++;
        return op;
}


static void op_unlink(RangeOp *op) {
        peer_unlisten(&op->guest->peer, &op->listener);
        for (RangeOp **p = &op->engine->range_ops; *p; p = &(*p)->next)
                if (*p == op) {
                        *p = op->next;
                        return;
                }
}

void range_op_kill(RangeOp *op) {
        op->dead = true;
        op_unlink(op);
        op_release(op);
        range_op_unref(op);
}

/* For waiters that hold no reference: is it still on the list? */
static bool op_listed(Engine *m, RangeOp *op) {
        for (RangeOp *i = m->range_ops; i; i = i->next)
                if (i == op)
                        return true;
        return false;
}

static RangeOp *range_op_find(Disk *d, bool ending) {
        for (RangeOp *op = d->guest->engine->range_ops; op; op = op->next)
                if (!op->map && op->guest == d->guest && streq(op->alias, d->alias) && op->ending == ending)
                        return op;
        return NULL;
}

RangeOp *range_op_of_disk(Disk *d) {
        return range_op_find(d, false);
}

bool range_op_ending_on(Disk *d) {
        return range_op_find(d, true);
}

int range_op_send(RangeOp *op, ControlCommandKind kind, uint64_t number) {
        if (op->control_fd < 0)
                return -ENOTCONN;
        return control_send_command(op->control_fd, MSG_NOSIGNAL | MSG_DONTWAIT,
                &(ControlCommand) { .kind = kind, .number = number }, -1);
}

/* The end: helper gone, export and filter out of QEMU, then the outcome is told. */

static void op_finish(RangeOp *op) {
        Engine *m = op->engine;
        Guest *g = op->guest;
        Disk *d = guest_find_disk(g, op->alias);

        if (op->kind->finish)
                op->kind->finish(op, d);
        if (op->call) {
                (void) sd_bus_reply_method_errorf(op->call,
                        op->outcome == STREAM_CANCELLED ? BS_ERROR_NOT_RUNNING : BS_ERROR_HELPER_FAILED, "%s %s: %s",
                        op->kind->fail_text, op->alias, op->error ?: "the pull helper failed");
                op->call = sd_bus_message_unref(op->call);
        }
        range_op_kill(op);
        peer_nbd_server_release_if_unused(&g->peer);
        peer_release_helper_if_idle(&g->peer);
        (void) m;
}

/* The guest's QMP peer (its QEMU, or an offline guest's storage helper) is gone. That is why a
 * failing op failed, whatever the pull helper, which lost its NBD connection with it, said
 * first, and whichever of its exit, its last words and the QMP hang-up came first. */
static void op_blame_peer(RangeOp *op) {
        char *why;

        if (op->ending && op->outcome != STREAM_FAILED)
                return; /* it completed, or was cancelled, before */
        why = strdup(peer_lost_reason(&op->guest->peer) ?: op->guest->offline ? "the storage helper went away"
                                                                               : "QEMU went away");
        if (!why)
                return; /* the helper's words then */
        free(op->error);
        op->error = why;
}

static void node_deleted(Qmp *q, int error, const char *desc, void *userdata) {
        RangeOp *op = userdata;

        if (op->dead)
                return;
        /* Not removed (the connection went, or QEMU refused): it may be there still. */
        if (error < 0)
                op->left_in_qemu = true;
        if (error == -ECONNRESET)
                op_blame_peer(op);
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
                peer_nbd_drop(&g->peer);
        }
        if (op->node_added && guest_qmp_ready(g)) {
                op->node_added = false;
                if (qemu_blockdev_del(g->peer.qmp, op->node, node_deleted, range_op_ref(op), range_op_unref_void) >= 0)
                        return;
                range_op_unref(op);
                op->left_in_qemu = true;
        } else if (op->node_added)
                op->left_in_qemu = true; /* no connection to remove it over: QEMU may have it still */
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
        /* The connection broke under the op's end (qmp_fail() tells pending calls before the
         * peer's listeners): a QEMU that lives on may have the export still. */
        if (error == -ECONNRESET)
                op_blame_peer(op);
        if (error < 0 && error != -EREMOTEIO)
                op->left_in_qemu = true;
        /* Refused (already gone): no event will come. */
        if (error < 0 && op->export_added)
                op_export_gone(op);
}

void range_op_end(RangeOp *op, StreamState outcome, const char *error) {
        Guest *g = op->guest;

        if (op->ending)
                return;
        op->ending = true;
        op->outcome = outcome;
        if (error && !op->error)
                op->error = strdup(error);
        if (op->pid > 0)
                (void) range_op_send(op, CONTROL_COMMAND_STOP, 0);
        op->control_source = sd_event_source_disable_unref(op->control_source);
        closep(&op->control_fd);
        op->control_fd = -1;

        if (op->kind->end)
                op->kind->end(op); /* a map: its export may stay for the next ones */

        if (op->export_added && guest_qmp_ready(g)) {
                if (qemu_block_export_del(g->peer.qmp, op->export_id, export_del_reply, range_op_ref(op), range_op_unref_void) >= 0) {
                        (void) sd_event_add_time_relative(op->engine->event, &op->cleanup_timer, CLOCK_MONOTONIC,
                                EXPORT_GONE_TIMEOUT_USEC, 0, cleanup_timeout, op);
                        return;
                }
                range_op_unref(op);
        }
        op_export_gone(op);
}

/* BLOCK_EXPORT_DELETED from the guest's QMP peer. */
static void op_peer_export_deleted(void *userdata, const char *id) {
        RangeOp *op = userdata;

        if (op->ending && op->export_added && streq(op->export_id, id))
                op_export_gone(op);
}

/* The helper */

static int control_handler(sd_event_source *s, int fd, uint32_t revents, void *userdata);

/* How the op ends, by how its helper did. */
static void helper_outcome(RangeOp *op, const siginfo_t *si) {
        /* Asked to stop: cancelled, however it went (killed after not stopping in time, or done
         * meanwhile: a prefetch would otherwise go on to its cut after Cancel was answered). */
        if (op->stop_requested)
                range_op_end(op, STREAM_CANCELLED, NULL);
        else if (op->got_done && si->si_code == CLD_EXITED && si->si_status == 0) {
                if (!op->kind->done || !op->kind->done(op))
                        range_op_end(op, STREAM_COMPLETED, NULL);
        } else {
                _cleanup_free_ char *why = si->si_code == CLD_EXITED
                                                   ? strdup_printf("the pull helper exited with status %i", si->si_status)
                                                   : strdup_printf("the pull helper was killed by signal %s",
                                                             sigabbrev_np(si->si_status) ?: "?");
                range_op_end(op, STREAM_FAILED, op->error ?: why);
        }
}

static int helper_exited(sd_event_source *s, const siginfo_t *si, void *userdata) {
        /* Held until we return: a last word may end the op, and an op with nothing of its own to
         * remove in QEMU (a map on the disk's shared export) is freed at its end. */
        RangeOp *op = range_op_ref(userdata);

        /* Its last words ("done", "error …") may still sit in the socket: the exit can be
         * dispatched before them. Read them first. */
        while (op->control_source && !op->ending &&
                control_handler(op->control_source, op->control_fd, EPOLLIN, op) > 0)
                ; /* all of them: a map's extents come one message each (finite: the writer is gone) */
        op->pid = 0;
        op->child = sd_event_source_disable_unref(op->child);
        if (!op->ending)
                helper_outcome(op, si);
        range_op_unref(op);
        return 0;
}

static int handle_extent(RangeOp *op, const ControlPullMessage *msg) {
        uint64_t off = msg->offset, len = msg->length, depth = msg->depth;
        ControlExtentKind k = msg->extent_kind;
        Extent *e, *l;

        /* In order, contiguous, inside the range, sane: the helper is untrusted too. An honest one
         * sends no more extents than that (its --max-extents), merged: so many messages at most. */
        if (len == 0 || depth > 4096 || op->n_extents >= RANGE_EXTENTS_MAX ||
                ++op->n_extent_messages > RANGE_EXTENTS_MAX)
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

/* A helper's messages other than a map's extents (bounded in number: handle_extent()) are read
 * at most this fast after a burst. An honest helper says "ready", a progress report 4 times a
 * second, then "done" or "error"; one taken over that floods them finds its socket read no faster
 * (its sends then block), rather than the daemon spending its time on them. */
#define CONTROL_RATE 50.0
#define CONTROL_BURST 50.0

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
                range_op_end(op, STREAM_FAILED, "the pull helper sent a malformed message");
                return 0;
        }
        r = control_parse_pull(buf, &msg);
        if (msg.kind != CONTROL_PULL_EXTENT &&
                helper_pace(&op->control_pace, &op->control_source, CONTROL_RATE, CONTROL_BURST) < 0) {
                range_op_end(op, STREAM_FAILED, "the pull helper's messages could not be paced");
                return 0;
        }
        d = guest_find_disk(g, op->alias);
        if (!d) {
                range_op_end(op, STREAM_FAILED, "the disk went away");
                return 0;
        }

        if (msg.kind == CONTROL_PULL_READY) {
                if (op->ready)
                        return 1;
                op->ready = true;
                if (!op->map)
                        op->deadline = sd_event_source_disable_unref(op->deadline);
                if (op->kind->ready)
                        return op->kind->ready(op, d);
        } else if (msg.kind == CONTROL_PULL_PROGRESS && op->kind->progress && op->ready) {
                return op->kind->progress(op, d, &msg, r);
        } else if (msg.kind == CONTROL_PULL_EXTENT && op->map) {
                if (r < 0 || handle_extent(op, &msg) < 0)
                        range_op_end(op, STREAM_FAILED, "the pull helper sent a malformed extent");
        } else if (msg.kind == CONTROL_PULL_DONE) {
                op->got_done = true;
        } else if (msg.kind == CONTROL_PULL_ERROR) {
                /* Its words become the job's Error, a method error and a log line. */
                free(op->error);
                op->error = text_sanitize(msg.text, msg.text_len, TEXT_SANITIZE_MAX);
        } else
                range_op_end(op, STREAM_FAILED, "the pull helper sent an unknown message");
        return 1;
}

/* A range's helper that has not said "ready" (connected, through QEMU's NBD handshake) by then is
 * killed and the range fails: otherwise the disk would stay "starting", Start Busy and Cancel
 * with nothing to cancel, for as long as a QEMU that stalls its handshake wants. A map has its
 * own deadline for the whole (MapTimeoutSec=). */
#define PULL_READY_TIMEOUT_SEC 10
#define PULL_READY_TIMEOUT_USEC (PULL_READY_TIMEOUT_SEC * USEC_PER_SEC)

static int ready_deadline(sd_event_source *s, uint64_t usec, void *userdata) {
        RangeOp *op = userdata;

        op->deadline = sd_event_source_disable_unref(op->deadline);
        if (op->ending || op->ready)
                return 0;
#define NOT_READY "the pull helper did not get through QEMU's NBD handshake within " STRINGIFY(PULL_READY_TIMEOUT_SEC) " s"
        log_warning("Guest %s disk %s: " NOT_READY "; stopping it.", op->guest->name, op->alias);
        (void) helper_kill(op->child); /* its end comes through helper_exited() */
        range_op_end(op, STREAM_FAILED, NOT_READY);
#undef NOT_READY
        return 0;
}

static int spawn_helper(RangeOp *op) {
        Engine *m = op->engine;
        Guest *g = op->guest;
        Disk *d = guest_find_disk(g, op->alias);
        /* Only the images the op copies from count: with a base kept, those above it. */
        uint64_t chunk = !op->map && d && disk_backing_remote(d, op->bottom) ? PULL_CHUNK_REMOTE : 0;
        _cleanup_free_ char *prefix = strdup_printf("Guest %s %s helper", g->name, op->map ? "map" : "pull"),
                            *a_export = strdup_printf("--export=%s", op->export_id),
                            *a_offset = strdup_printf("--offset=%" PRIu64, op->offset),
                            *a_length = strdup_printf("--length=%" PRIu64, op->length),
                            *a_bw = strdup_printf("--bandwidth=%" PRIu64, op->bandwidth),
                            *a_parallel = op->parallel > 0 ? strdup_printf("--parallel=%u", op->parallel) : NULL,
                            *a_chunk = chunk > 0 ? strdup_printf("--chunk=%" PRIu64, chunk) : NULL;
        _cleanup_close_ int nbd = -1;
        char *argv[6 + 3 + 1];
        size_t n = 0;
        int r;

        if (!prefix || !a_export || !a_offset || !a_length || !a_bw || (op->parallel > 0 && !a_parallel) ||
                (chunk > 0 && !a_chunk))
                return -ENOMEM;
        argv[n++] = (char *) PULL_BINARY;
        argv[n++] = (char *) (op->map ? "--map" : "--pull");
        argv[n++] = a_export;
        argv[n++] = a_offset;
        argv[n++] = a_length;
        argv[n++] = a_bw;
        if (op->node)
                argv[n++] = (char *) "--no-cache";
        if (a_parallel)
                argv[n++] = a_parallel;
        if (a_chunk)
                argv[n++] = a_chunk;
        argv[n] = NULL; /* at most 9 above */

        nbd = peer_nbd_server_connect(&g->peer);
        if (nbd < 0)
                return nbd;
        r = guest_spawn_helper(g, PULL_BINARY, argv, nbd, g->selinux_process_label, prefix, helper_exited, op, &op->pid,
                &op->child, &op->control_fd, &op->log);
        if (r < 0)
                return r;
        if (!op->map) {
                r = sd_event_add_time_relative(m->event, &op->deadline, CLOCK_MONOTONIC, PULL_READY_TIMEOUT_USEC, 0,
                        ready_deadline, op);
                if (r < 0)
                        return r;
        }
        return sd_event_add_io(m->event, &op->control_source, op->control_fd, EPOLLIN, control_handler, op);
}

static void setup_reply(Qmp *q, int error, const char *desc, void *userdata) {
        RangeOp *op = userdata;

        if (op->dead || op->ending)
                return;
        if (error < 0 && !op->setup_error)
                op->setup_error = strdup_printf("QEMU refused: %s", desc ?: strerror(-error));
        if (--op->pending > 0)
                return;
        range_op_setup_done(op);
}

void range_op_setup_done(RangeOp *op) {
        int r;

        if (op->setup_error) {
                range_op_end(op, STREAM_FAILED, op->setup_error);
                return;
        }
        /* Tests only: SIGSTOP once a map's export is there, before its helper reads it. */
        if (op->map)
                (void) test_hook_stop("BLOCKSTREAM_TEST_MAP_STOP", "export",
                        "Guest %s disk %s: map stopped with its export %s added (test hook).", op->guest->name,
                        op->alias, op->export_id);
        r = spawn_helper(op);
        if (r < 0) {
                _cleanup_free_ char *why = strdup_printf("cannot start the pull helper: %s", strerror(-r));
                range_op_end(op, STREAM_FAILED, why ?: "cannot start the pull helper");
                return;
        }
        /* Tests only: SIGSTOP once a map's helper runs, so that it may say everything and exit
         * before the daemon reads a word. */
        if (op->map)
                (void) test_hook_stop("BLOCKSTREAM_TEST_MAP_STOP", "spawned",
                        "Guest %s disk %s: map stopped with its helper started (test hook).", op->guest->name,
                        op->alias);
}

/* QEMU answered the node; the export is sent right after it, in order. */
static void node_added_reply(Qmp *q, int error, const char *desc, void *userdata) {
        RangeOp *op = userdata;

        if (!op->dead && error < 0) {
                op->node_added = false;
                /* Only QEMU's own refusal says it is not there: a broken or timed-out call may
                 * have been carried out. */
                if (error != -EREMOTEIO)
                        op->left_in_qemu = true;
        }
        setup_reply(q, error, desc, userdata);
}

static void export_added_reply(Qmp *q, int error, const char *desc, void *userdata) {
        RangeOp *op = userdata;

        if (!op->dead && error < 0 && op->export_added) {
                op->export_added = false;
                peer_nbd_drop(&op->guest->peer);
                if (error != -EREMOTEIO)
                        op->left_in_qemu = true; /* as node_added_reply() */
        }
        setup_reply(q, error, desc, userdata);
}

static void op_server_started(Peer *p, int error, const char *error_text, void *userdata);

static void op_peer_ready(Guest *g, int error, const char *error_text, void *userdata) {
        RangeOp *op = userdata; /* a reference of the waiter's */
        Disk *d;
        int r;

        if (op->dead || op->ending)
                return;
        d = guest_find_disk(g, op->alias);
        if (error < 0 || !d) {
                range_op_end(op, STREAM_FAILED, !d ? "the disk went away" : error_text ?: "the guest's QMP peer is not available");
                return;
        }
        /* Nothing goes to "the" NBD server before QEMU said it is ours: a foreign one (libvirt's
         * pull-mode backup) would get our export. */
        r = peer_nbd_server_when_started(&g->peer, op_server_started, range_op_ref(op), range_op_unref_void);
        if (r < 0) {
                range_op_unref(op);
                range_op_end(op, STREAM_FAILED, "cannot start QEMU's NBD server");
        }
}

static void op_server_started(Peer *p, int error, const char *error_text, void *userdata) {
        RangeOp *op = userdata;
        Guest *g = op->guest;
        Disk *d;
        int r;

        if (op->dead || !op_listed(op->engine, op))
                return;
        d = guest_find_disk(g, op->alias);
        if (error < 0 || !d) {
                range_op_end(op, STREAM_FAILED, !d ? "the disk went away" : error_text ?: "cannot start QEMU's NBD server");
                return;
        }
        if (op->kind->setup && op->kind->setup(op, d) > 0)
                return; /* a map on the disk's shared export: nothing to add */
        op->export_node = strdup(op->node ?: d->node_name);
        if (!op->export_node) {
                range_op_end(op, STREAM_FAILED, "out of memory");
                return;
        }
        if (op->node) {
                r = qemu_blockdev_add_cor(g->peer.qmp, op->node, d->node_name, op->bottom, node_added_reply, range_op_ref(op),
                        range_op_unref_void);
                if (r < 0) {
                        range_op_unref(op);
                        range_op_end(op, STREAM_FAILED, "cannot send blockdev-add");
                        return;
                }
                op->node_added = true;
                op->pending++;
        }
        r = qemu_block_export_add_nbd(g->peer.qmp, op->export_id, op->node ?: d->node_name, op->export_id,
                export_added_reply, range_op_ref(op), range_op_unref_void);
        if (r < 0) {
                range_op_unref(op);
                range_op_end(op, STREAM_FAILED, "cannot send block-export-add");
                return;
        }
        op->export_added = true;
        peer_nbd_hold(&g->peer);
        op->pending++;
}

int range_op_caller_may_start(Engine *m, sd_bus_message *msg, uid_t *ret_caller, sd_bus_error *error) {
        unsigned mine = 0;
        uid_t caller;
        int r;

        r = bus_sender_uid(msg, &caller);
        if (r < 0)
                return sd_bus_error_set_errnof(error, -r, "Cannot tell the caller's user: %m");
        /* An op ending still counts while its helper lives (until QEMU let its export go). */
        for (RangeOp *i = m->range_ops; caller != 0 && i; i = i->next)
                if (!i->map && (!i->ending || i->child) && i->caller == caller)
                        mine++;
        if (caller != 0 && mine >= RANGE_JOBS_PER_CALLER_MAX)
                return sd_bus_error_setf(error, SD_BUS_ERROR_LIMITS_EXCEEDED,
                        "%u range and prefetch jobs of yours are running (at most %u at once per user, each with a "
                        "helper of its own); wait for one to finish.",
                        mine, RANGE_JOBS_PER_CALLER_MAX);
        *ret_caller = caller;
        return 0;
}

int range_op_new(Disk *d, const RangeOpKind *kind, sd_bus_message *msg, bool map, uint64_t offset, uint64_t length,
        RangeOp **ret) {
        Engine *m = d->guest->engine;
        RangeOp *op = calloc(1, sizeof(RangeOp));

        if (!op)
                return -ENOMEM;
        op->kind = kind;
        op->n_ref = 1;
        op->engine = m;
        op->guest = d->guest;
        op->map = map;
        op->id = ++m->range_seq;
        op->offset = offset;
        op->length = length;
        op->control_fd = -1;
        op->caller = UID_INVALID;
        op->alias = strdup(d->alias);
        op->export_id = strdup_printf("%s-%u", map ? "bsm" : "bsr", op->id);
        if (!op->alias || !op->export_id) {
                range_op_unref(op);
                return -ENOMEM;
        }
        op->call = sd_bus_message_ref(msg);
        op->next = m->range_ops;
        m->range_ops = op;
        op->listener = (PeerListener) {
                .userdata = op,
                .lost = op_peer_lost,
                .export_deleted = op_peer_export_deleted,
                .busy = op_peer_busy,
                .removed = op_peer_removed,
        };
        peer_listen(&op->guest->peer, &op->listener);
        *ret = op;
        return 0;
}

/* The guest's QMP peer is gone: QEMU took the filter and the export with it; the op fails. */
static void op_peer_lost(void *userdata) {
        RangeOp *op = userdata;
        Guest *g = op->guest;

        op->left_in_qemu = op->node_added || op->export_added;
        op->node_added = false;
        if (op->export_added) {
                op->export_added = false;
                peer_nbd_drop(&g->peer);
        }
        op_blame_peer(op);
        if (op->ending) {
                /* Its end waited for the export to go: it went with the peer. */
                if (op->cleanup_timer)
                        op_export_gone(op);
                return;
        }
        range_op_end(op, STREAM_FAILED, g->offline ? "the storage helper went away" : "QEMU went away");
}

/* The guest goes away. */
static void op_peer_removed(void *userdata) {
        range_op_kill(userdata);
}

/* Every op keeps an offline guest's storage helper until it is off the list. */
static bool op_peer_busy(void *userdata) {
        return true;
}

int range_op_start(RangeOp *op) {
        int r;

        /* The waiter holds a reference: an op that ended meanwhile (its map's deadline) is still
         * this op when the guest is ready, never another one at the same address. */
        r = guest_when_ready_fresh(op->guest, op_peer_ready, range_op_ref(op), range_op_unref_void);
        if (r < 0)
                range_op_unref(op);
        return r;
}

int range_op_job_progress(RangeOp *op, Disk *d, const ControlPullMessage *msg, int parse_error) {
        if (parse_error < 0 || msg->total != op->length || msg->done > msg->total) {
                range_op_end(op, STREAM_FAILED, "the pull helper sent a malformed progress report");
                return 0;
        }
        op->copied_all = msg->done == msg->total;
        disk_apply_job_changes(d, job_apply_progress(&d->job, msg->done, msg->total, now_usec(CLOCK_MONOTONIC)));
        return 1;
}
