/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>

#include "adaptive.h"
#include "backend.h"
#include "bus-error.h"
#include "bus-util.h"
#include "export.h"
#include "guest.h"
#include "image.h"
#include "engine.h"
#include "polkit.h"
#include "map.h"
#include "mirror.h"
#include "prefetch.h"
#include "range.h"
#include "stream.h"
#include "stream-internal.h"
#include "throttle.h"
#include "util.h"


/* Method plumbing */

int disk_authorize(Disk *d, sd_bus_message *msg, const char *action, sd_bus_error *error) {
        AuthDetails details = {
                .guest = d->guest->name,
                .disk = d->alias,
                .owner = d->guest->owner,
        };
        return bus_authorize(d->guest->engine->polkit, msg, action, &details, error);
}

void call_ctx_free(void *p) {
        CallCtx *c = p;

        if (!c)
                return;
        if (!c->replied)
                (void) sd_bus_reply_method_errorf(c->msg, BS_ERROR_NOT_RUNNING,
                        "The connection to QEMU closed before it answered; check the guest's Running property.");
        sd_bus_message_unref(c->msg);
        free(c->alias);
        free(c->job_id);
        free(c->base_node);
        free(c->backing_file);
        free(c);
}

CallCtx *call_ctx_new(Disk *d, sd_bus_message *msg) {
        CallCtx *c = calloc(1, sizeof(CallCtx));

        if (!c)
                return NULL;
        c->msg = sd_bus_message_ref(msg);
        c->guest = d->guest;
        c->alias = strdup(d->alias);
        if (!c->alias) {
                sd_bus_message_unref(c->msg);
                return mfree(c);
        }
        return c;
}

void call_reply(CallCtx *c, int error, const char *desc, const char *what) {
        c->replied = true;
        if (error == -EREMOTEIO)
                (void) sd_bus_reply_method_errorf(c->msg, BS_ERROR_QEMU_FAILED, "QEMU refused to %s: %s", what, desc);
        else if (error < 0)
                (void) sd_bus_reply_method_errorf(c->msg, BS_ERROR_QEMU_FAILED, "Failed to %s: QEMU did not answer (%s).",
                        what, strerror(-error));
        else
                (void) sd_bus_reply_method_return(c->msg, NULL);
}

static int require_running(Disk *d, sd_bus_error *error) {
        if (!guest_qmp_ready(d->guest) && !d->guest->offline)
                return sd_bus_error_setf(error, BS_ERROR_NOT_RUNNING,
                        "Guest '%s' is not running (no QMP connection to %s); start its QEMU, then call Refresh().",
                        d->guest->name, d->guest->qmp_socket);
        return 0;
}

/* Start */


int check_bandwidth(uint64_t bw, sd_bus_error *error) {
        if (bw > INT64_MAX)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                        "Bandwidth %" PRIu64 " bytes/s is out of range (at most %" PRIi64 "; 0 means unlimited).", bw,
                        INT64_MAX);
        return 0;
}

int check_max_guest_latency(uint64_t usec, sd_bus_error *error) {
        if (usec != 0 && (usec < THROTTLE_TARGET_MIN_US || usec > THROTTLE_TARGET_MAX_US))
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                        "max_guest_latency %" PRIu64 " µs is out of range (%llu to %llu µs; 0 turns the mode off).",
                        usec, THROTTLE_TARGET_MIN_US, THROTTLE_TARGET_MAX_US);
        return 0;
}

/* The mode follows the guest's own I/O latency: a guest that is not running has none. */
int refuse_offline_latency(Disk *d, sd_bus_error *error) {
        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                "Guest '%s' is not running: max_guest_latency follows the I/O latency of a running guest, and its disks "
                "are served by a storage helper with no guest. Leave the option out (or 0), or use a fixed bandwidth.",
                d->guest->name);
}

/* Start's option "engine": which engine runs a full stream ("auto": mirror_try_start() and
 * prefetch_wins() decide). */
static int check_engine(const char *engine, bool range, sd_bus_error *error) {
        if (!streq(engine, BS_ENGINE_AUTO) && !streq(engine, BS_ENGINE_STREAM) && !streq(engine, BS_ENGINE_PREFETCH) &&
                !streq(engine, BS_ENGINE_MIRROR))
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                        "Unknown engine '%.64s'; use 'auto', 'stream', 'prefetch' or 'mirror'.", engine);
        if (range && !streq(engine, BS_ENGINE_AUTO))
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                        "Option 'engine' is for a full stream (Start(0, 0)); a range always runs through the pull helper.");
        return 0;
}

/* An offline guest's helper knows its images as /dev/fdset/N: the header must name the base by
 * its real path, or the image is unusable outside the helper. -ENOENT: not in the chain. */
static int offline_backing_file(Disk *d, const char *base_node, char **ret) {
        for (size_t i = 0; d->chain[i]; i++)
                if (streq(d->chain_nodes[i], base_node)) {
                        *ret = strdup(d->chain[i]);
                        return *ret ? 0 : -ENOMEM;
                }
        return -ENOENT;
}

static void resume_failed(Disk *d, const char *detail) {
        _cleanup_free_ char *why = strdup_printf(
                "The daemon restarted during the stream, and its storage helper with it; carrying the stream on in a "
                "new helper failed: %s. What was copied stays copied; Start it again.", detail);

        d->starting = false;
        disk_fail_job(d, why ?: "The daemon restarted during the stream and could not carry it on.");
        guest_release_helper_if_idle(d->guest);
}

/* QEMU's answer to the block-stream of a resumed job. */
static void resume_started(Disk *d, CallCtx *c, int error, const char *desc) {
        Guest *g = d->guest;
        char *id;

        if (error < 0) {
                _cleanup_free_ char *detail = strdup_printf("QEMU refused: %s", desc ?: strerror(-error));
                resume_failed(d, detail ?: "QEMU refused");
                return;
        }
        id = strdup(c->job_id);
        if (!id) {
                (void) qemu_block_job_cancel(g->peer.qmp, c->job_id, NULL, NULL, NULL);
                resume_failed(d, "out of memory");
                return;
        }
        free(d->job.id);
        d->job.id = id;
        log_info("Guest %s disk %s: stream carried on after a restart (job %s).", g->name, d->alias, d->job.id);
        if (c->resume_paused)
                (void) qemu_block_job_pause(g->peer.qmp, d->job.id, NULL, NULL, NULL);
        disk_save(d);
        guest_update_polling(g);
}

static void start_saved(void *userdata) {
        call_reply(userdata, 0, NULL, NULL);
}

static void start_reply(Qmp *q, int error, const char *desc, void *userdata) {
        CallCtx *c = userdata, *saved;
        Disk *d = guest_find_disk(c->guest, c->alias);
        int r;

        /* Tests only: SIGSTOP with QEMU's job begun and not yet recorded, to be killed there. */
        if (error >= 0)
                (void) test_hook_stop("BLOCKSTREAM_TEST_STREAM_STOP", "started",
                        "Stream job begun in QEMU, not yet recorded (test hook).");
        if (!d) {
                c->replied = true;
                (void) sd_bus_reply_method_errorf(c->msg, BS_ERROR_NO_SUCH_DISK, "Disk '%s' went away while starting.",
                        c->alias);
                return;
        }
        d->starting = false;
        if (c->resume) {
                resume_started(d, c, error, desc);
                return;
        }
        if (error < 0) {
                call_reply(c, error, desc, "start the stream");
                guest_release_helper_if_idle(c->guest);
                return;
        }

        free(d->job_base);
        d->job_base = NULL;
        if (c->base_node && !(d->job_base = strdup(c->base_node)))
                log_oom(); /* only a resume after a restart would miss it */
        r = job_begin(&d->job, c->job_id, STREAM_MODE_FULL, 0, d->size, d->size, c->bandwidth, now_usec(CLOCK_REALTIME));
        if (r < 0) {
                /* QEMU runs the job; we could not record it. Tell the caller the truth. */
                c->replied = true;
                (void) sd_bus_reply_method_errorf(c->msg, SD_BUS_ERROR_NO_MEMORY,
                        "Out of memory after QEMU started the job; it runs unobserved.");
                return;
        }
        d->bandwidth = c->bandwidth;
        adaptive_job_began(d);
        log_info("Guest %s disk %s: stream started (job %s).", c->guest->name, d->alias, d->job.id);
        disk_emit_job(d);
        guest_update_polling(c->guest);
        /* The caller hears of the job once it is on disk (a restart then carries it on), from
         * the state writer: the loop serves other calls meanwhile. */
        saved = call_ctx_new(d, c->msg);
        if (!saved) {
                disk_save(d);
                call_reply(c, 0, NULL, NULL);
                return;
        }
        c->replied = true; /* the reply is saved's now */
        d->last_saved = now_usec(CLOCK_MONOTONIC);
        (void) guest_save_then(c->guest, start_saved, saved, call_ctx_free);
}

static void start_when_ready(Guest *g, int error, const char *error_text, void *userdata) {
        CallCtx *c = userdata;
        Disk *d = guest_find_disk(g, c->alias);
        CallCtx *send;
        int r;

        if (!d) {
                c->replied = true;
                (void) sd_bus_reply_method_errorf(c->msg, BS_ERROR_NO_SUCH_DISK, "Disk '%s' went away while starting.",
                        c->alias);
                return;
        }
        if (error < 0 && c->resume) {
                resume_failed(d, error_text ?: strerror(-error));
                return;
        }
        if (error < 0) {
                d->starting = false;
                c->replied = true;
                if (g->offline)
                        (void) sd_bus_reply_method_errorf(c->msg, BS_ERROR_HELPER_FAILED,
                                "The storage helper of guest '%s' could not take the disks: %s", g->name,
                                error_text ?: strerror(-error));
                else
                        (void) sd_bus_reply_method_errorf(c->msg, BS_ERROR_NOT_RUNNING,
                                "Guest '%s' is not running (no QMP connection).", g->name);
                guest_release_helper_if_idle(g);
                return;
        }
        /* The waiter's context is freed after this returns: the QMP call gets its own. */
        send = call_ctx_new(d, c->msg);
        if (!send || !(send->job_id = strdup(c->job_id)) || (c->base_node && !(send->base_node = strdup(c->base_node))) ||
                (c->backing_file && !(send->backing_file = strdup(c->backing_file)))) {
                d->starting = false;
                if (send)
                        send->replied = true;
                call_ctx_free(send);
                if (c->resume)
                        resume_failed(d, "out of memory");
                return; /* c's destroy answers the caller */
        }
        send->bandwidth = c->bandwidth;
        send->resume = c->resume;
        send->resume_paused = c->resume_paused;
        send->replied = c->resume; /* a resume answers nobody */
        c->replied = true; /* from here on, send answers */
        r = qemu_block_stream(g->peer.qmp,
                &(QemuStreamArgs) {
                        .job_id = send->job_id,
                        .node_name = d->node_name,
                        .base_node = send->base_node,
                        .backing_file = send->backing_file,
                        .speed = send->bandwidth,
                },
                start_reply, send, call_ctx_free);
        if (r < 0) {
                bool resume = send->resume;

                d->starting = false;
                send->replied = true;
                (void) sd_bus_reply_method_errorf(send->msg, BS_ERROR_QEMU_FAILED, "Failed to send block-stream: %s",
                        strerror(-r));
                call_ctx_free(send);
                if (resume)
                        resume_failed(d, "cannot send block-stream");
                else
                        guest_release_helper_if_idle(g);
        }
}

int stream_resume_offline(Disk *d) {
        Guest *g = d->guest;
        CallCtx *c;
        int r;

        if (!g->offline || d->job.mode != STREAM_MODE_FULL || !job_is_active(&d->job) || d->job.concluded)
                return -EINVAL;
        c = call_ctx_new(d, NULL);
        if (!c)
                return -ENOMEM;
        c->replied = true;
        c->resume = true;
        c->resume_paused = d->job.state == STREAM_PAUSED;
        c->bandwidth = d->job.bandwidth;
        g->job_seq++;
        c->job_id = job_id_new(d->alias, g->job_seq);
        if (!c->job_id || (d->job_base && !(c->base_node = strdup(d->job_base)))) {
                call_ctx_free(c);
                return -ENOMEM;
        }
        r = d->job_base ? offline_backing_file(d, d->job_base, &c->backing_file) : 0;
        if (r < 0) {
                call_ctx_free(c);
                return r; /* -ENOENT: the base is no longer in the chain */
        }
        /* The old job died with the old helper's QEMU. */
        d->job.id = mfree(d->job.id);
        d->starting = true;
        r = guest_when_ready(g, start_when_ready, c, call_ctx_free);
        if (r < 0) {
                d->starting = false;
                call_ctx_free(c);
                return r;
        }
        return 0;
}

/* After an engine's start (r: what it answered the call with): the guest-latency mode, if asked. */
static int start_latency_mode(Disk *d, int r, uint64_t max_latency, uint64_t bandwidth) {
        if (r >= 0 && max_latency > 0 && adaptive_start(d, max_latency, bandwidth) < 0)
                log_warning("Guest %s disk %s: out of memory: the job runs without its max_guest_latency.",
                        d->guest->name, d->alias);
        return r;
}

static int method_start(sd_bus_message *msg, void *userdata, sd_bus_error *error) {
        Disk *d = userdata;
        Guest *g = d->guest;
        uint64_t offset, length, bandwidth = d->bandwidth, end, max_latency = 0;
        const char *base = NULL, *base_node = NULL, *engine = BS_ENGINE_AUTO;
        _cleanup_free_ char *job_id = NULL;
        bool has_max_latency = false;
        CallCtx *c;
        int r;

        r = sd_bus_message_read(msg, "tt", &offset, &length);
        if (r < 0)
                return r;
        r = bus_read_options(msg, "Start",
                (const BusOption[]) {
                        { "bandwidth", "t", &bandwidth },
                        { "base", "s", &base },
                        { "max_guest_latency", "t", &max_latency, &has_max_latency },
                        { "engine", "s", &engine },
                        {},
                },
                error);
        if (r < 0)
                return r;
        r = check_bandwidth(bandwidth, error);
        if (r < 0)
                return r;
        r = check_max_guest_latency(max_latency, error);
        if (r < 0)
                return r;
        if (base && isempty(base))
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                        "Option 'base' is empty; give an image path or node name from BackingChain.");
        if (offset > d->size || add_overflows_u64(offset, length, &end) || end > d->size)
                return sd_bus_error_setf(error, BS_ERROR_INVALID_RANGE,
                        "Range [%" PRIu64 ", +%" PRIu64 ") lies outside disk '%s' of %" PRIu64 " bytes.", offset, length,
                        d->alias, d->size);
        r = check_engine(engine, offset != 0 || length != 0, error);
        if (r < 0)
                return r;

        if ((offset != 0 || length != 0) && offset >= d->size)
                return sd_bus_error_setf(error, BS_ERROR_INVALID_RANGE,
                        "Range starts at %" PRIu64 ", at or past the end of disk '%s' (%" PRIu64 " bytes).", offset,
                        d->alias, d->size);

        r = disk_authorize(d, msg, ACTION_STREAM, error);
        if (r < 0)
                return r;
        if (r == 0)
                return 1; /* polkit was asked; the call is dispatched again with its answer */

        r = require_running(d, error);
        if (r < 0)
                return r;
        if (!has_max_latency)
                /* The default of the disk; an offline guest has no guest to follow. */
                max_latency = g->offline ? 0 : d->max_guest_latency;
        else if (max_latency > 0 && g->offline)
                return refuse_offline_latency(d, error);
        if (job_is_active(&d->job) || d->starting || d->finalizing || d->releasing)
                return sd_bus_error_setf(error, BS_ERROR_BUSY,
                        "A job is already running on disk '%s' of guest '%s'; Cancel it or wait for Finished.", d->alias,
                        g->name);
        if (base) {
                size_t n = strv_length(d->chain);
                for (size_t i = 0; i < n; i++)
                        if (streq(d->chain[i], base) || (!isempty(d->chain_nodes[i]) && streq(d->chain_nodes[i], base))) {
                                base_node = d->chain_nodes[i];
                                break;
                        }
                if (!base_node)
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                "'%s' is not in the backing chain of disk '%s' (see its BackingChain property).", base,
                                d->alias);
                if (isempty(base_node))
                        return sd_bus_error_setf(error, BS_ERROR_QEMU_FAILED,
                                "QEMU reports no block node for '%s'; cannot use it as base.", base);
        }

        /* An offline guest's job starts its storage helper: within its owner's share. */
        r = guest_helper_share(g, error);
        if (r < 0)
                return r;
        /* No job runs: a mode left by a Start that failed before its job began is not this job's
         * (its target, its ceiling). */
        adaptive_stop(d);

        /* A full stream: QEMU's block-stream, mirror and pivot where there is room (mirror.c), or
         * prefetch then cut where that wins (prefetch.c). Each in the guest-latency mode if asked:
         * it waits for the job, and follows it across the engine's steps (backend.h). */
        if (offset == 0 && length == 0 && (streq(engine, BS_ENGINE_MIRROR) || streq(engine, BS_ENGINE_AUTO)) &&
                (r = mirror_try_start(d, msg, streq(engine, BS_ENGINE_MIRROR), base_node, bandwidth, error)) != 0)
                return start_latency_mode(d, r, max_latency, bandwidth);
        if (offset == 0 && length == 0 &&
                (streq(engine, BS_ENGINE_PREFETCH) ||
                        (streq(engine, BS_ENGINE_AUTO) && prefetch_wins(d) &&
                                (!base_node || !streq_ptr(d->chain_nodes[0], base_node)))))
                return start_latency_mode(d, prefetch_start(d, msg, bandwidth, base_node, error), max_latency, bandwidth);

        if (offset != 0 || length != 0) {
                /* A range: widened to whole clusters; the filter copies from the images above base. */
                uint64_t start, stop;
                const char *bottom = NULL;

                range_widen(offset, length == 0 ? d->size : end, d->cluster_size, d->size, &start, &stop);
                if (base) {
                        size_t n = strv_length(d->chain);
                        for (size_t i = 0; i < n; i++)
                                if (streq(d->chain_nodes[i], base_node))
                                        bottom = i == 0 ? NULL : d->chain_nodes[i - 1];
                        if (!bottom)
                                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                        "'%s' is the direct backing image of disk '%s': nothing lies above it to stream.",
                                        base, d->alias);
                }
                /* Offset/Length show the range asked for ("to the end" spelled out); the work
                 * covers whole clusters. */
                r = range_start(d, msg, start, stop - start, offset, (length == 0 ? d->size : end) - offset, bandwidth,
                        bottom, error);
                return start_latency_mode(d, r, max_latency, bandwidth);
        }

        g->job_seq++;
        job_id = job_id_new(d->alias, g->job_seq);
        c = call_ctx_new(d, msg);
        if (!job_id || !c) {
                if (c)
                        c->replied = true;
                call_ctx_free(c);
                return -ENOMEM;
        }
        c->bandwidth = bandwidth;
        c->job_id = TAKE_PTR(job_id);
        if (base_node && !(c->base_node = strdup(base_node))) {
                c->replied = true;
                call_ctx_free(c);
                return -ENOMEM;
        }
        if (base_node && g->offline && offline_backing_file(d, base_node, &c->backing_file) == -ENOMEM) {
                c->replied = true;
                call_ctx_free(c);
                return -ENOMEM;
        }
        /* The mode waits for the job: it samples nothing before the job runs, and goes if it never
         * does. */
        if (max_latency > 0) {
                r = adaptive_start(d, max_latency, bandwidth);
                if (r < 0) {
                        c->replied = true;
                        call_ctx_free(c);
                        return r;
                }
        }
        d->starting = true;
        /* A running guest: once its disks are read again. An offline one: once its helper is up. */
        r = guest_when_ready_fresh(g, start_when_ready, c, call_ctx_free);
        if (r < 0) {
                d->starting = false;
                adaptive_stop(d);
                c->replied = true;
                call_ctx_free(c);
                return guest_ready_error(g, r, error);
        }
        return 1;
}

static int method_get_allocation_map(sd_bus_message *msg, void *userdata, sd_bus_error *error) {
        Disk *d = userdata;
        uint64_t offset, length, end;
        int r;

        r = sd_bus_message_read(msg, "tt", &offset, &length);
        if (r < 0)
                return r;
        if (offset > d->size || add_overflows_u64(offset, length, &end) || end > d->size)
                return sd_bus_error_setf(error, BS_ERROR_INVALID_RANGE,
                        "Range [%" PRIu64 ", +%" PRIu64 ") lies outside disk '%s' of %" PRIu64 " bytes.", offset, length,
                        d->alias, d->size);
        r = disk_authorize(d, msg, ACTION_INSPECT, error);
        if (r < 0)
                return r;
        if (r == 0)
                return 1; /* polkit was asked; the call is dispatched again with its answer */
        if (length == 0)
                length = d->size - offset;
        if (length == 0)
                return sd_bus_reply_method_return(msg, "a(ttus)", 0);
        return map_get(d, msg, offset, length, error);
}

static int method_export(sd_bus_message *msg, void *userdata, sd_bus_error *error) {
        Disk *d = userdata;
        const char *listen = "unix";
        int r;

        r = bus_read_options(msg, "Export", (const BusOption[]) { { "listen", "s", &listen }, {} }, error);
        if (r < 0)
                return r;
        r = export_listen_valid(listen, error);
        if (r < 0)
                return r;

        r = disk_authorize(d, msg, ACTION_EXPORT, error);
        if (r < 0)
                return r;
        if (r == 0)
                return 1; /* polkit was asked; the call is dispatched again with its answer */
        return export_create(d->guest, d->alias, d->object_path, msg, listen, error);
}

/* Properties */

static int property_get_guest(sd_bus *bus, const char *path, const char *interface, const char *property,
        sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        Disk *d = userdata;
        return sd_bus_message_append(reply, "o", d->guest->object_path);
}

static int property_get_state(sd_bus *bus, const char *path, const char *interface, const char *property,
        sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        Disk *d = userdata;
        return sd_bus_message_append(reply, "s", stream_state_to_string(d->job.state));
}

static int property_get_mode(sd_bus *bus, const char *path, const char *interface, const char *property,
        sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        Disk *d = userdata;
        return sd_bus_message_append(reply, "s", stream_mode_to_string(d->job.mode));
}

static int property_get_engine(sd_bus *bus, const char *path, const char *interface, const char *property,
        sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        Disk *d = userdata;
        return sd_bus_message_append(reply, "s", stream_engine_to_string(d->job.engine));
}

static int property_get_error(sd_bus *bus, const char *path, const char *interface, const char *property,
        sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        Disk *d = userdata;
        return sd_bus_message_append(reply, "s", job_error(&d->job));
}

static int property_get_rate(sd_bus *bus, const char *path, const char *interface, const char *property,
        sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        Disk *d = userdata;
        return sd_bus_message_append(reply, "t", job_rate(&d->job));
}

static int property_get_expected_end(sd_bus *bus, const char *path, const char *interface, const char *property,
        sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        Disk *d = userdata;
        return sd_bus_message_append(reply, "t",
                job_is_active(&d->job) ? job_expected_end(&d->job, now_usec(CLOCK_REALTIME)) : (usec_t) 0);
}

static int property_get_target(sd_bus *bus, const char *path, const char *interface, const char *property,
        sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        Disk *d = userdata;
        return sd_bus_message_append(reply, "s", guest_disk_target(d->guest, d->alias));
}

static int property_get_throttle_reason(sd_bus *bus, const char *path, const char *interface, const char *property,
        sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        Disk *d = userdata;
        return sd_bus_message_append(reply, "s", d->throttle_reason ?: ADAPTIVE_REASON_OFF);
}

static int property_get_string_ptr(sd_bus *bus, const char *path, const char *interface, const char *property,
        sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        char **s = userdata;
        return sd_bus_message_append(reply, "s", strempty(*s));
}

static int property_get_strv_ptr(sd_bus *bus, const char *path, const char *interface, const char *property,
        sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        char ***l = userdata;
        return sd_bus_message_append_strv(reply, *l);
}

const sd_bus_vtable stream_vtable[] = {
        SD_BUS_VTABLE_START(0),
        SD_BUS_PROPERTY("Guest", "o", property_get_guest, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("Device", "s", property_get_string_ptr, offsetof(Disk, alias), SD_BUS_VTABLE_PROPERTY_CONST),
        /* Set at registration, for the object's whole life. */
        SD_BUS_PROPERTY("Target", "s", property_get_target, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("NodeName", "s", property_get_string_ptr, offsetof(Disk, node_name),
                SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("Path", "s", property_get_string_ptr, offsetof(Disk, path), SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("BackingChain", "as", property_get_strv_ptr, offsetof(Disk, chain),
                SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("Size", "t", NULL, offsetof(Disk, size), SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("State", "s", property_get_state, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("Mode", "s", property_get_mode, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("Offset", "t", NULL, offsetof(Disk, job.offset), SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("Length", "t", NULL, offsetof(Disk, job.length), SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("BytesDone", "t", NULL, offsetof(Disk, job.done), SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("BytesTotal", "t", NULL, offsetof(Disk, job.total), SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("Bandwidth", "t", NULL, offsetof(Disk, bandwidth), SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("Rate", "t", property_get_rate, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("StartTime", "t", NULL, offsetof(Disk, job.start_time), SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("ExpectedEndTime", "t", property_get_expected_end, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("Error", "s", property_get_error, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY(
                "MaxGuestLatency", "t", NULL, offsetof(Disk, max_guest_latency), SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("GuestReadP99", "t", NULL, offsetof(Disk, guest_read_p99), SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("SpeedLimit", "t", NULL, offsetof(Disk, speed_limit), SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("ThrottleReason", "s", property_get_throttle_reason, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("Engine", "s", property_get_engine, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),

        SD_BUS_METHOD_WITH_ARGS("Start", SD_BUS_ARGS("t", offset, "t", length, "a{sv}", options), SD_BUS_NO_RESULT,
                method_start, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD("Cancel", NULL, NULL, method_cancel, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD("Pause", NULL, NULL, method_pause, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD("Resume", NULL, NULL, method_resume, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("SetBandwidth", SD_BUS_ARGS("t", bytes_per_second), SD_BUS_NO_RESULT,
                method_set_bandwidth, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("SetMaxGuestLatency", SD_BUS_ARGS("t", usec), SD_BUS_NO_RESULT,
                method_set_max_guest_latency, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("GetAllocationMap", SD_BUS_ARGS("t", offset, "t", length),
                SD_BUS_RESULT("a(ttus)", extents), method_get_allocation_map, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("Export", SD_BUS_ARGS("a{sv}", options), SD_BUS_RESULT("o", export, "s", uri),
                method_export, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_SIGNAL_WITH_ARGS("Finished", SD_BUS_ARGS("s", result, "t", bytes_done, "s", error), 0),
        SD_BUS_VTABLE_END,
};

int disk_object_find(sd_bus *bus, const char *path, const char *interface, void *userdata, void **found,
        sd_bus_error *error) {
        Engine *m = userdata;
        _cleanup_free_ char *name = NULL, *alias = NULL;
        Guest *g;
        Disk *d;
        int r;

        r = sd_bus_path_decode_many(path, GUEST_PATH_PREFIX "/%/%", &name, &alias);
        if (r <= 0)
                return 0;
        g = engine_find_guest(m, name);
        if (!g || !g->published)
                return 0;
        for (size_t i = 0; i < g->n_disks; i++) {
                d = g->disks[i];
                if (streq(d->alias, alias)) {
                        *found = d;
                        return 1;
                }
        }
        return 0;
}
