/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* The guest's side of its QMP peer: connecting to its QEMU and reconnecting, QEMU's events and
 * job reports applied to the disks (paced), the job polling, and what the peer (peer.c) asks of
 * the guest. The Guest object itself and its D-Bus face are guest.c's. */

#include <inttypes.h>
#include <limits.h>
#include <sys/stat.h>

#include "backend.h"
#include "bus-error.h"
#include "disk.h"
#include "bus-util.h"
#include "guest.h"
#include "engine.h"
#include "image.h"
#include "qemu-stats.h"
#include "sandbox.h"
#include "util.h"
#define POLL_INTERVAL_USEC (250 * USEC_PER_MSEC) /* progress at most 4 times a second */
#define RECONNECT_MIN_USEC (1 * USEC_PER_SEC)
#define RECONNECT_MAX_USEC (30 * USEC_PER_SEC)
/* A connection that lasted this long was a working QEMU: if it breaks, reconnect at once. */
#define RECONNECT_STABLE_USEC (60 * USEC_PER_SEC)
/* Backpressure: QEMU's events turn into signals, state writes and work. A guest's QEMU gets
 * EVENT_RATE events a second (bursts of EVENT_BURST); beyond that, or while more than
 * BUS_BACKLOG_MAX messages wait for the bus, we stop reading it until the budget is back and
 * the queue down to a quarter (checked every 10 ms). Every event is still handled and every
 * state change still signalled, at our pace: a QEMU flapping a job as fast as it can no
 * longer floods the bus, and other clients' calls do not wait behind its signals. A real
 * QEMU sends a handful of events a second. */
#define EVENT_RATE 200.0
#define EVENT_BURST 400.0
#define BUS_BACKLOG_MAX 256U
#define BUS_DRAIN_CHECK_USEC (10 * USEC_PER_MSEC)

/* A connect refused on purpose (a swapped path, a socket that is not one), not a QEMU that is
 * not there yet: worth a warning on every attempt. */
static bool connect_refused(int r) {
        return r == -ELOOP || r == -EXDEV || r == -ENOTSOCK || r == -EPROTO;
}

/* Do the guest's own jobs need the storage helper (outcomes waiting for the images' release
 * aside)? Its exports and range jobs say so themselves (their peer listeners). */
static bool guest_helper_needed(void *userdata) {
        Guest *g = userdata;

        for (size_t i = 0; i < g->n_disks; i++) {
                Disk *d = g->disks[i];
                if ((job_is_active(&d->job) && !d->releasing) || d->starting || d->finalizing)
                        return true;
        }
        return false;
}

/* The helper is gone: tell the outcomes that waited for it. */
static void guest_publish_released(void *userdata) {
        Guest *g = userdata;

        /* Publishing may start or free things: walk by index with re-checks. */
        for (size_t i = 0; i < g->n_disks; i++)
                disk_publish_released(g->disks[i]);
        if (g->handoff && !peer_has_helper(&g->peer) && !peer_listeners_busy(&g->peer)) {
                /* The handed-over exports are done and the helper has let go of the images (a
                 * helper that died while one serves is started again: export.c). */
                g->handoff = false;
                log_info("Guest %s: the storage helper let go of the disks; waiting for QEMU again.", g->name);
                (void) guest_connect(g);
        }
}

static bool guest_has_releasing(void *userdata) {
        Guest *g = userdata;

        for (size_t i = 0; i < g->n_disks; i++)
                if (g->disks[i]->releasing)
                        return true;
        return false;
}

/* Jobs: events, polling, reconciliation. */

static void guest_poll_now(Guest *g);

static uint64_t bus_backlog(Guest *g) {
        uint64_t n = 0;

        if (!g->engine->bus || sd_bus_get_n_queued_write(g->engine->bus, &n) < 0)
                return 0;
        return n;
}

static void event_tokens_refill(Guest *g) {
        token_bucket_refill(&g->events, EVENT_RATE, EVENT_BURST, now_usec(CLOCK_MONOTONIC));
}

static bool guest_must_wait(Guest *g) {
        event_tokens_refill(g);
        return g->events.tokens < 1.0 || bus_backlog(g) > BUS_BACKLOG_MAX / 4;
}

static int bus_drain_handler(sd_event_source *s, uint64_t usec, void *userdata) {
        Guest *g = userdata;

        if (guest_must_wait(g)) {
                if (sd_event_source_set_time_relative(s, BUS_DRAIN_CHECK_USEC) >= 0 &&
                        sd_event_source_set_enabled(s, SD_EVENT_ONESHOT) >= 0)
                        return 0;
        }
        qmp_set_reading(g->peer.qmp, true);
        return 0;
}

/* After each event: one token spent; out of them, or the bus behind, pause reading QEMU. */
static void guest_pace_events(Guest *g) {
        int r;

        event_tokens_refill(g);
        g->events.tokens -= 1.0;
        if (!g->peer.qmp || (g->events.tokens >= 0.0 && bus_backlog(g) <= BUS_BACKLOG_MAX))
                return;
        if (!g->bus_drain_timer)
                r = sd_event_add_time_relative(g->engine->event, &g->bus_drain_timer, CLOCK_MONOTONIC,
                        BUS_DRAIN_CHECK_USEC, 0, bus_drain_handler, g);
        else {
                r = sd_event_source_set_time_relative(g->bus_drain_timer, BUS_DRAIN_CHECK_USEC);
                if (r >= 0)
                        r = sd_event_source_set_enabled(g->bus_drain_timer, SD_EVENT_ONESHOT);
        }
        if (r < 0) {
                log_debug_errno(r, "Guest %s: cannot pace QEMU's events: %m", g->name);
                return; /* read on: better late signals than a stuck guest */
        }
        qmp_set_reading(g->peer.qmp, false);
}

/* The disk of g's that id, "bsd-<alias>-<n>" (dash: at "-<n>"), names as job_id_new() makes it. */
static Disk *guest_job_alias_ours(Guest *g, const char *id, const char *dash) {
        for (size_t i = 0; i < g->n_disks; i++) {
                char a[JOB_ID_ALIAS_MAX + 1];

                job_id_alias(g->disks[i]->alias, a);
                if ((size_t) (dash - (id + 4)) == strlen(a) && memcmp(id + 4, a, strlen(a)) == 0)
                        return g->disks[i];
        }
        return NULL;
}

/* Whether a disk of g has the job id (one of ours, "bsd-") as its job: running, being started or
 * finalized, or concluded and not yet published (an id left on an idle disk, of a Start that
 * failed, claims nothing). */
static bool guest_job_claimed(Guest *g, const char *id) {
        for (size_t i = 0; i < g->n_disks; i++) {
                Disk *d = g->disks[i];

                if (streq_ptr(d->job.id, id) &&
                        (job_is_active(&d->job) || d->job.concluded || d->starting || d->finalizing))
                        return true;
        }
        return false;
}

static void guest_on_event(void *userdata, const char *event, json_object *data) {
        Guest *g = userdata;
        usec_t mono = now_usec(CLOCK_MONOTONIC);
        QemuJobEvent ev;
        int r;

        guest_pace_events(g); /* every event counts; this one is handled all the same */

        if (peer_dispatch_event(&g->peer, event, data) > 0)
                return;
        r = qemu_parse_job_event(event, data, &ev);
        if (r < 0) {
                uint64_t dropped;

                /* The first, then at most one warning a minute with a count: a QEMU sending 200 a
                 * second would otherwise exceed journald's rate limit for the whole daemon, and
                 * the other guests' messages would be dropped with them. */
                if (log_limit_minutely(&g->malformed_log, mono, &dropped))
                        log_warning("Guest %s: ignoring malformed %s event from QEMU (%" PRIu64
                                    " more ignored since the last such message, which come at most once a minute).",
                                g->name, event, dropped);
                return;
        }
        if (r == 0)
                return;
        log_debug("Guest %s: %s %s %s", g->name, event, strempty(ev.id),
                ev.kind == QEMU_EVENT_JOB_STATUS_CHANGE ? qemu_job_status_to_string(ev.status) : "");
        /* A disk's callback may finalize (and even remove) disks: walk by index with re-checks. */
        for (size_t i = 0; i < g->n_disks; i++) {
                Disk *d = g->disks[i];
                unsigned changed = g->engine->registry->job_event(d, &ev, job_apply_event(&d->job, &ev, mono));

                if (changed & JOB_NEEDS_FINALIZE)
                        blockjob_finalize(d);
                if (changed & JOB_NEEDS_QUERY)
                        guest_poll_now(g);
                if (changed & ~JOB_NEEDS_QUERY)
                        disk_apply_qemu_job_changes(d, changed & ~JOB_NEEDS_QUERY);
        }
        /* A leftover of ours that no disk claims (cancelled at a reconnect, or its disk gone)
         * holds its nodes until dismissed. A Start's job is claimed before its events come: QEMU
         * answers block-stream before the job can end. */
        if (ev.kind == QEMU_EVENT_JOB_STATUS_CHANGE && ev.status == QEMU_JOB_CONCLUDED && ev.id &&
                strncmp(ev.id, "bsd-", 4) == 0 && guest_qmp_ready(g) && !guest_job_claimed(g, ev.id)) {
                log_info("Guest %s: dismissing leftover job %s.", g->name, ev.id);
                (void) qemu_job_dismiss(g->peer.qmp, ev.id, NULL, NULL, NULL);
        }
}

/* d's job went with QEMU: an engine may finish it without QEMU, else it failed. */
static void guest_job_lost(Guest *g, Disk *d, const char *why) {
        if (!g->engine->registry->job_lost(d))
                disk_fail_job(d, why);
}

/* Job numbers taken from QEMU's job ids at most this: a QEMU naming one near 2^64 would wrap ours. */
#define JOB_SEQ_MAX UINT32_MAX


/* Apply query-block-jobs to our disks. reconcile: after a (re)connect, jobs QEMU no longer
 * lists are lost, and concluded jobs of ours that no disk claims are dismissed. */
static void guest_apply_jobs(Guest *g, const QemuBlockJob *jobs, size_t n, bool reconcile) {
        usec_t mono = now_usec(CLOCK_MONOTONIC);

        for (size_t i = 0; i < g->n_disks; i++) {
                Disk *d = g->disks[i];
                const QemuBlockJob *found = NULL;

                if (reconcile)
                        d->job.finalize_sent = false; /* a job left "pending" is finalized now */
                if (d->starting || !d->job.id)
                        continue;
                for (size_t k = 0; k < n; k++)
                        if (streq(jobs[k].id, d->job.id))
                                found = &jobs[k];

                if (d->job.concluded) {
                        /* Concluded before a restart, not yet published: finish it now. */
                        if (reconcile)
                                disk_apply_job_changes(d, JOB_NOW_CONCLUDED);
                        continue;
                }
                if (!job_is_active(&d->job) || d->finalizing)
                        continue;
                if (found) {
                        unsigned changed =
                                g->engine->registry->job_info(d, found, job_apply_info(&d->job, found, mono));
                        if (changed & JOB_NEEDS_FINALIZE)
                                blockjob_finalize(d);
                        if (changed)
                                disk_apply_qemu_job_changes(d, changed);
                } else
                        guest_job_lost(g, d,
                                "QEMU no longer knows the job: it was dismissed by another QMP client, or QEMU was "
                                "restarted.");
        }

        if (!reconcile || !guest_qmp_ready(g))
                return;
        for (size_t k = 0; k < n; k++) {
                const char *dash = strrchr(jobs[k].id, '-');
                Disk *owner;
                char *end;
                unsigned long long seq;

                if (strncmp(jobs[k].id, "bsd-", 4) != 0)
                        continue;
                /* Our ids go on past every one QEMU still has: a job begun in QEMU whose record a
                 * crash lost would otherwise hold the next Start's id. */
                errno = 0;
                seq = dash ? strtoull(dash + 1, &end, 10) : 0;
                if (!dash || errno != 0 || end == dash + 1 || *end != 0 || seq > JOB_SEQ_MAX)
                        continue; /* not one of our ids (QEMU's word: bounded, not to wrap ours) */
                g->job_seq = MAX(g->job_seq, (uint64_t) seq);
                if (guest_job_claimed(g, jobs[k].id))
                        continue;
                /* Cancelled: only jobs of this guest's disks, and none a Start waits for. */
                owner = guest_job_alias_ours(g, jobs[k].id, dash);
                if (jobs[k].status == QEMU_JOB_CONCLUDED) {
                        log_info("Guest %s: dismissing leftover job %s.", g->name, jobs[k].id);
                        (void) qemu_job_dismiss(g->peer.qmp, jobs[k].id, NULL, NULL, NULL);
                } else if (owner && !owner->starting) {
                        /* A Start whose job QEMU began but whose record the daemon never wrote
                         * (killed in between), or whose answer a lost connection swallowed (the
                         * caller heard it failed): never the caller's. Cancelled (what it copied
                         * stays valid), dismissed once concluded (guest_on_event). */
                        log_warning("Guest %s: cancelling job %s, which no record of ours claims.", g->name,
                                jobs[k].id);
                        (void) qemu_block_job_cancel(g->peer.qmp, jobs[k].id, NULL, NULL, NULL);
                }
        }
}

static void poll_reply(Qmp *q, int error, const char *desc, QemuBlockJob *jobs, size_t n, void *userdata) {
        Guest *g = userdata;

        g->poll_pending = false;
        if (error < 0) {
                log_debug("Guest %s: query-block-jobs failed: %s", g->name, desc ?: strerror(-error));
                return;
        }
        guest_apply_jobs(g, jobs, n, false);
}

static void guest_poll_now(Guest *g) {
        int r;

        if (!guest_qmp_ready(g) || g->poll_pending)
                return;
        r = qemu_query_block_jobs(g->peer.qmp, poll_reply, g, NULL);
        if (r < 0)
                log_debug_errno(r, "Guest %s: failed to send query-block-jobs: %m", g->name);
        else
                g->poll_pending = true;
}

static int poll_timer_handler(sd_event_source *s, uint64_t usec, void *userdata) {
        Guest *g = userdata;

        guest_poll_now(g);
        (void) sd_event_source_set_time_relative(s, POLL_INTERVAL_USEC);
        return 0;
}

void guest_update_polling(Guest *g) {
        bool want = false;
        int r;

        for (size_t i = 0; i < g->n_disks && !want; i++)
                want = job_is_active(&g->disks[i]->job) && !g->disks[i]->finalizing && g->disks[i]->job.id;
        want = want && guest_qmp_ready(g);

        if (!want) {
                if (g->poll_timer)
                        (void) sd_event_source_set_enabled(g->poll_timer, SD_EVENT_OFF);
                return;
        }
        if (!g->poll_timer) {
                r = sd_event_add_time_relative(g->engine->event, &g->poll_timer, CLOCK_MONOTONIC, POLL_INTERVAL_USEC,
                        10 * USEC_PER_MSEC, poll_timer_handler, g);
                if (r < 0) {
                        log_error_errno(r, "Guest %s: failed to set up progress polling: %m", g->name);
                        return;
                }
        } else if (sd_event_source_get_enabled(g->poll_timer, NULL) == 0) {
                (void) sd_event_source_set_time_relative(g->poll_timer, POLL_INTERVAL_USEC);
        }
        (void) sd_event_source_set_enabled(g->poll_timer, SD_EVENT_ON);
}

/* Connection */

static void guest_fail_jobs(Guest *g, const char *why) {
        for (size_t i = 0; i < g->n_disks; i++) {
                Disk *d = g->disks[i];
                if (d->starting) {
                        /* A Start on its way: one that waits for QEMU's answer gets it (the
                         * connection's end); one that waits for an event of QEMU fails now. */
                        g->engine->registry->start_lost(d);
                        continue;
                }
                if (g->engine->registry->range_runs(d))
                        continue; /* a job carried on after the restart */
                if (job_is_active(&d->job) && !d->job.concluded)
                        guest_job_lost(g, d, why);
                else if (d->job.concluded)
                        disk_apply_job_changes(d, JOB_NOW_CONCLUDED);
        }
}

static void guest_schedule_reconnect(Guest *g);

void guest_fail_orphaned_jobs(Guest *g) {
        g->engine->registry->cleanup_leftovers(g);
        g->engine->registry->resume_orphans(g);
        /* Full streams ran in the storage helper that died with the old daemon: a new helper
         * carries them on (what is local is skipped). */
        for (size_t i = 0; i < g->n_disks; i++) {
                Disk *d = g->disks[i];
                int r;

                if (d->job.mode != STREAM_MODE_FULL || !job_is_active(&d->job) || d->job.concluded)
                        continue;
                r = g->engine->registry->resume_offline_stream(d);
                if (r < 0)
                        log_warning_errno(r, "Guest %s disk %s: cannot carry the stream on: %m", g->name, d->alias);
        }
        guest_fail_jobs(g, "The daemon stopped while the job ran, and the storage helper with it; what was copied "
                           "stays copied. Start the job again.");
}

static int reconnect_handler(sd_event_source *s, uint64_t usec, void *userdata) {
        Guest *g = userdata;

        (void) guest_connect(g);
        return 0;
}

static void guest_schedule_reconnect(Guest *g) {
        usec_t delay = RECONNECT_MIN_USEC;
        int r;

        for (unsigned i = 0; i < g->reconnect_attempts && delay < RECONNECT_MAX_USEC; i++)
                delay *= 2;
        delay = MIN(delay, RECONNECT_MAX_USEC);
        g->reconnect_attempts++;

        if (!g->reconnect_timer)
                r = sd_event_add_time_relative(g->engine->event, &g->reconnect_timer, CLOCK_MONOTONIC, delay,
                        100 * USEC_PER_MSEC, reconnect_handler, g);
        else {
                r = sd_event_source_set_time_relative(g->reconnect_timer, delay);
                if (r >= 0)
                        r = sd_event_source_set_enabled(g->reconnect_timer, SD_EVENT_ONESHOT);
        }
        if (r < 0)
                log_error_errno(r, "Guest %s: failed to schedule a reconnect: %m", g->name);
}

/* A RegisterGuest call waiting on the first connection: answer it and drop the guest. */
static void guest_register_failed(Guest *g, const char *what, const char *detail) {
        Engine *m = g->engine;
        sd_bus_message *call = TAKE_PTR(g->register_call);

        (void) sd_bus_reply_method_errorf(call, BS_ERROR_QEMU_FAILED, "Guest '%s' not registered: %s %s: %s", g->name,
                what, g->qmp_socket, detail);
        sd_bus_message_unref(call);
        engine_unlink_guest(m, g);
        guest_free(g);
}

static void guest_connection_failed(Guest *g, int error) {
        _cleanup_free_ char *why = NULL;
        bool was_running = g->running;

        g->running = false;
        g->poll_pending = false;
        peer_close(&g->peer);
        peer_lost(&g->peer); /* exports and range jobs on it fail, or an export is handed over */
        guest_update_polling(g);

        if (g->handoff) {
                /* The storage helper has the disks now: no QEMU to wait for until it lets go. */
                if (was_running) {
                        log_warning("Guest %s: lost the QMP connection (%s).", g->name, strerror(-error));
                        guest_emit_changed(g, "Running");
                }
                guest_fail_jobs(g, "QEMU went away.");
                return;
        }

        if (g->register_call) {
                guest_register_failed(g, "could not talk QMP (is QEMU running with this monitor, and no other client connected to it?) on",
                        strerror(-error));
                return;
        }
        if (was_running) {
                log_warning("Guest %s: lost the QMP connection (%s).", g->name, strerror(-error));
                guest_emit_changed(g, "Running");
                /* A QEMU that breaks the protocol, or drops every connection soon after the
                 * greeting, would have us reconnect and re-read all its disks in a loop: it waits
                 * out the backoff, and its jobs stay as they were until a connection tells. */
                if (qmp_error_is_protocol(error) ||
                        now_usec(CLOCK_MONOTONIC) - g->connected_at < RECONNECT_STABLE_USEC) {
                        guest_schedule_reconnect(g);
                        return;
                }
                /* Maybe only the connection broke and QEMU lives on: try at once before failing its jobs. */
                g->reconnect_attempts = 0;
                /* A synchronous failure has failed the jobs and scheduled a retry already. */
                (void) guest_connect(g);
                return;
        }
        if (g->reconnect_attempts == 0)
                log_warning("Guest %s: cannot connect to QMP socket %s: %s; retrying.", g->name, g->qmp_socket,
                        strerror(-error));
        why = strdup_printf("QEMU went away: the QMP connection to %s is gone (%s).", g->qmp_socket, strerror(-error));
        guest_fail_jobs(g, why ?: "QEMU went away.");
        g->engine->registry->unreachable(g);
        guest_schedule_reconnect(g);
}

/* After a (re)connect: first the jobs (a finished job of ours is recorded and dismissed before
 * anything else: QEMU 7.2 must not be asked for node names while it lingers), then the disks. */

static void connect_disks_reply(Guest *g, int error, const char *desc, void *userdata) {
        Engine *m = g->engine;
        sd_bus_message *call;
        int r;

        /* With the disks as QEMU has them now (a new QEMU may name its nodes differently). */
        g->engine->registry->resume_orphans(g);
        if (error < 0) {
                if (g->register_call)
                        guest_register_failed(g, "could not list the disks of QEMU at", desc ?: strerror(-error));
                return;
        }
        if (g->register_call) {
                /* A name from disk_names that is the alias of another disk QEMU has: which disk
                 * would the caller mean? Refused before anything is published. */
                for (size_t i = 0; i < g->n_disks; i++) {
                        const char *id = disk_names_id_of(g->disk_names, g->disks[i]->alias);
                        if (!id || streq(id, g->disks[i]->alias))
                                continue;
                        call = TAKE_PTR(g->register_call);
                        (void) sd_bus_reply_method_errorf(call, SD_BUS_ERROR_INVALID_ARGS,
                                "Guest '%s' not registered: option 'disk_names', '%s' -> '%s': %s", g->name, id,
                                g->disks[i]->alias, disk_names_problem_to_string(DISK_NAMES_NAME_IS_ID));
                        sd_bus_message_unref(call);
                        engine_unlink_guest(m, g);
                        guest_free(g);
                        return;
                }
                call = TAKE_PTR(g->register_call);
                r = guest_publish(g);
                if (r < 0) {
                        (void) sd_bus_reply_method_errorf(call, SD_BUS_ERROR_FAILED,
                                "Failed to save guest '%s' in %s: %s", g->name, m->guest_state_dir, strerror(-r));
                        sd_bus_message_unref(call);
                        engine_unlink_guest(m, g);
                        guest_free(g);
                        return;
                }
                log_info("Guest %s registered (QMP %s, %zu disk%s, owner uid " UID_FMT ").", g->name, g->qmp_socket,
                        g->n_disks, g->n_disks == 1 ? "" : "s", g->owner);
                (void) sd_bus_reply_method_return(call, "o", g->object_path);
                sd_bus_message_unref(call);
        }
        guest_update_polling(g);
}

static void connect_jobs_reply(Qmp *q, int error, const char *desc, QemuBlockJob *jobs, size_t n, void *userdata) {
        Guest *g = userdata;
        int r;

        if (error < 0) {
                if (g->register_call)
                        guest_register_failed(g, "could not list the block jobs of QEMU at", desc ?: strerror(-error));
                else
                        log_warning("Guest %s: query-block-jobs failed: %s", g->name, desc ?: strerror(-error));
                return;
        }
        guest_apply_jobs(g, jobs, n, true);
        g->engine->registry->cleanup_leftovers(g);
        r = guest_refresh(g, connect_disks_reply, NULL, NULL);
        if (r < 0) {
                if (g->register_call)
                        guest_register_failed(g, "could not ask for the disks of QEMU at", strerror(-r));
                else {
                        log_error_errno(r, "Guest %s: failed to query disks: %m", g->name);
                        g->engine->registry->resume_orphans(g);
                }
        }
}

/* Histograms the guest-latency mode left as it ended without a connection: removed from the QEMU
 * they were set on, if this is it; forgotten otherwise (a QEMU since started at the socket may
 * have one of someone else's on a device of that name). */
static void guest_histograms_cleanup(Guest *g) {
        for (size_t i = 0; i < g->n_disks; i++) {
                Disk *d = g->disks[i];

                if (!d->histogram_left)
                        continue;
                if (qemu_instance_same(&d->histogram_left_qemu, &g->qmp_qemu) &&
                        qemu_block_latency_histogram_clear(g->peer.qmp, d->histogram_left, NULL, NULL, NULL) < 0)
                        log_warning("Guest %s disk %s: cannot remove the latency histogram of %s.", g->name, d->alias,
                                d->histogram_left);
                d->histogram_left = mfree(d->histogram_left);
        }
}

/* A running guest's QEMU connected, or its connection broke (an offline guest's storage helper is
 * the peer's). */
static void guest_on_state(void *userdata, int error) {
        Guest *g = userdata;
        Qmp *q = g->peer.qmp;
        int r;

        if (error < 0) {
                guest_connection_failed(g, error);
                return;
        }
        log_info("Guest %s: connected to QEMU %u.%u.%u.", g->name, qmp_qemu_version(q) / 10000,
                qmp_qemu_version(q) / 100 % 100, qmp_qemu_version(q) % 100);
        g->running = true;
        g->had_connection = true;
        g->connected_at = now_usec(CLOCK_MONOTONIC);
        g->qmp_connection++;
        /* reconnect_attempts is reset only once this connection proved stable (above). */
        guest_emit_changed(g, "Running");
        peer_nbd_cleanup_leftovers(&g->peer); /* first: commands run in order */
        guest_histograms_cleanup(g);
        r = qemu_query_block_jobs(q, connect_jobs_reply, g, NULL);
        if (r < 0) {
                if (g->register_call)
                        guest_register_failed(g, "could not ask for the block jobs of QEMU at", strerror(-r));
                else
                        log_error_errno(r, "Guest %s: failed to query jobs: %m", g->name);
        }
}

/* Which QEMU may serve the guest: the owner's own, one of a uid the administrator allowed
 * (QEMUUsers=), or the one a registration by root found (its uid pinned then). */
static bool guest_peer_allowed(Guest *g, uid_t uid) {
        return uid == g->owner || config_qemu_user_allowed(&g->engine->config, uid) ||
               (g->qmp_uid != UID_INVALID && uid == g->qmp_uid) || g->qmp_uid_pin_next;
}

static int open_as_owner(Guest *g, QmpSocketPin *ret_seen, int *ret_sock_fd) {
        _cleanup_free_ gid_t *gids = NULL;
        size_t n = 0;
        gid_t gid;
        int r;

        r = user_groups(g->owner, NGROUPS_MAX, &gid, &gids, &n);
        if (r < 0)
                return r == -ESRCH ? -EACCES : r; /* no account: nothing of theirs is reached */
        return qmp_socket_open_as(g->qmp_socket, &g->qmp_pin, g->owner, gid, gids, n, ret_seen, NULL, ret_sock_fd);
}

/* Connect to the guest's QMP socket as pinned at registration, and check who listens. On
 * failure g->connect_error says why. */
static int guest_open_qmp(Guest *g, int opened_fd, const QmpSocketPin *opened_seen, int *ret_fd) {
        _cleanup_close_ int sock_fd = -1, fd = -1;
        QmpSocketPin seen = {};
        struct ucred peer = {};
        bool changed = false;
        int r = 0;

        g->connect_error = mfree(g->connect_error);
        if (opened_fd >= 0)
                seen = *opened_seen;
        else if (g->qmp_as_owner && g->owner != 0)
                /* Registered by its owner: found as they would find it, every time (the directory's
                 * pin holds for one boot only, and after a reboot the path is followed anew). */
                r = open_as_owner(g, &seen, &sock_fd);
        else
                r = qmp_socket_open(g->qmp_socket, &g->qmp_pin, &seen, NULL, &sock_fd);
        if (r >= 0)
                r = qmp_socket_connect(opened_fd >= 0 ? opened_fd : sock_fd, &fd, &peer);
        if (r < 0) {
                g->connect_error = strdup_printf("cannot connect to its QMP socket %s: %s", g->qmp_socket,
                        qmp_socket_strerror(r));
                if (connect_refused(r))
                        log_warning("Guest %s: not connecting to %s: %s.", g->name, g->qmp_socket,
                                qmp_socket_strerror(r));
                return r;
        }
        if (!guest_peer_allowed(g, peer.uid)) {
                g->connect_error = strdup_printf("the QEMU listening on %s (pid %d) runs as uid " UID_FMT
                                                 ", which may not serve a guest of uid " UID_FMT
                                                 "; it must run as that user, or as a uid that QEMUUsers= in the "
                                                 "daemon's configuration allows",
                        g->qmp_socket, (int) peer.pid, (uint32_t) peer.uid, (uint32_t) g->owner);
                log_warning("Guest %s: refusing the QEMU on %s (pid %d, uid " UID_FMT
                            "): the guest's owner is uid " UID_FMT " and QEMUUsers= does not allow uid " UID_FMT ".",
                        g->name, g->qmp_socket, (int) peer.pid, (uint32_t) peer.uid, (uint32_t) g->owner,
                        (uint32_t) peer.uid);
                return -EPERM;
        }
        log_debug("Guest %s: QMP peer on %s is pid %d, uid " UID_FMT ".", g->name, g->qmp_socket, (int) peer.pid,
                (uint32_t) peer.uid);
        g->qmp_peer_uid = peer.uid;
        /* The process whose open files pin the disks (guest-pins.c): the listener itself, or none. */
        closep(&g->qmp_proc_fd);
        g->qmp_qemu = (QemuInstance) {};
        if (qmp_socket_peer_proc(fd, &peer, &g->qmp_proc_fd) >= 0)
                (void) qmp_socket_instance(g->qmp_proc_fd, peer.pid, &g->qmp_qemu);
        else
                log_warning("Guest %s: the process that listens on %s (pid %d) is gone or cannot be vouched for; "
                            "its disks cannot be pinned (no mirror, no handoff) until it connects again.",
                        g->name, g->qmp_socket, (int) peer.pid);
        /* Pinned only now that what was found is trusted. */
        if (!g->qmp_pin.set || !sd_id128_equal(g->qmp_pin.boot_id, seen.boot_id)) {
                g->qmp_pin = seen;
                changed = true;
        }
        if (g->qmp_uid_pin_next) {
                g->qmp_uid = peer.uid;
                g->qmp_uid_pin_next = false;
                changed = true;
        }
        if (changed)
                (void) guest_save(g);
        *ret_fd = TAKE_FD(fd);
        return 0;
}

int guest_connect(Guest *g) {
        return guest_connect_opened(g, -1, NULL);
}

int guest_connect_opened(Guest *g, int sock_fd, const QmpSocketPin *seen) {
        _cleanup_free_ char *why = NULL;
        _cleanup_close_ int fd = -1;
        int r;

        if (g->reconnect_timer)
                (void) sd_event_source_set_enabled(g->reconnect_timer, SD_EVENT_OFF);
        if (g->peer.qmp || g->handoff) /* connected or connecting already, or the storage helper has the disks */
                return 0;
        if (isempty(g->qmp_socket))
                return -EOPNOTSUPP;

        r = guest_open_qmp(g, sock_fd, seen, &fd);
        if (r >= 0) {
                r = peer_connect_fd(&g->peer, fd);
                if (r >= 0) {
                        TAKE_FD(fd);
                        return 0;
                }
        }
        if (!g->connect_error)
                g->connect_error = strdup_printf("cannot connect to its QMP socket %s: %s", g->qmp_socket,
                        strerror(-r));
        if (g->register_call)
                return r; /* the caller reports it */
        if (g->reconnect_attempts == 0)
                log_warning_errno(r, "Guest %s: cannot connect to QMP socket %s: %m; retrying.", g->name, g->qmp_socket);
        why = strdup_printf("QEMU went away: %s.", g->connect_error ?: strerror(-r));
        guest_fail_jobs(g, why ?: "QEMU went away.");
        g->engine->registry->unreachable(g);
        guest_schedule_reconnect(g);
        return r;
}

/* What the peer asks of its guest */

static bool guest_peer_offline(void *userdata) {
        Guest *g = userdata;
        return g->offline || g->handoff;
}

/* The peer is gone: QEMU took the maps' shared exports with it. */
static void guest_peer_lost(void *userdata) {
        Guest *g = userdata;

        closep(&g->qmp_proc_fd);
        for (size_t i = 0; i < g->n_disks; i++) {
                g->disks[i]->map_export = mfree(g->disks[i]->map_export);
                g->disks[i]->map_export_node = mfree(g->disks[i]->map_export_node);
                g->disks[i]->map_export_users = 0;
        }
}

static void guest_helper_failed(void *userdata, const char *why) {
        Guest *g = userdata;

        for (size_t i = 0; i < g->n_disks; i++) {
                Disk *d = g->disks[i];
                if (job_is_active(&d->job) && !d->job.concluded)
                        disk_fail_job(d, why);
                else if (d->job.concluded)
                        disk_apply_job_changes(d, JOB_NOW_CONCLUDED);
        }
        guest_update_polling(g);
}

/* Whether a server of ours may run in QEMU: never in another QEMU than the one it was started in
 * (QEMU restarted at the same socket, libvirt's pull-mode backup server running there now). */
static bool guest_nbd_server_started(void *userdata) {
        Guest *g = userdata;

        if (g->nbd_server_started && qemu_instance_known(&g->nbd_server_qemu) && qemu_instance_known(&g->qmp_qemu) &&
                (g->nbd_server_qemu.pid != g->qmp_qemu.pid || g->nbd_server_qemu.start != g->qmp_qemu.start)) {
                log_info("Guest %s: our NBD server ran in an earlier QEMU (pid %d); this one (pid %d) has none of ours.",
                        g->name, (int) g->nbd_server_qemu.pid, (int) g->qmp_qemu.pid);
                g->nbd_server_started = false;
                g->nbd_server_qemu = (QemuInstance) {};
                (void) guest_save(g);
        }
        return g->nbd_server_started;
}

static void guest_set_nbd_server_started(void *userdata, bool started) {
        Guest *g = userdata;

        g->nbd_server_started = started;
        g->nbd_server_qemu = started ? g->qmp_qemu : (QemuInstance) {};
        (void) guest_save(g);
}

const PeerOwner guest_peer_owner = {
        .offline = guest_peer_offline,
        .connection = guest_on_state,
        .event = guest_on_event,
        .lost = guest_peer_lost,
        .helper_failed = guest_helper_failed,
        .helper_needed = guest_helper_needed,
        .releasing = guest_has_releasing,
        .released = guest_publish_released,
        .nbd_server_started = guest_nbd_server_started,
        .set_nbd_server_started = guest_set_nbd_server_started,
};

int guest_storage_identity_labels(Guest *g) {
        const Config *cfg = &g->engine->config;

        g->storage_process_label = mfree(g->storage_process_label);
        g->storage_image_label = mfree(g->storage_image_label);
        return sandbox_selinux_labels(config_selinux_helper_type(cfg), config_selinux_image_type(cfg),
                g->storage_mcs_c1, g->storage_mcs_c2, &g->storage_process_label, &g->storage_image_label);
}

/* The storage helper's identity, allocated when one first runs for the guest (most guests never
 * need one) and saved before anything runs under it: a restarted daemon finds the leftovers of its
 * predecessor's storage helper by that uid (storage.c). */
static int guest_storage_identity(Guest *g) {
        Engine *e = g->engine;
        unsigned c1, c2;
        uid_t uid;
        int r;

        if (g->storage_uid != 0)
                return 0;
        r = e->registry->identity_allocate(e, &g->storage_uid, &uid, &c1, &c2);
        if (r < 0)
                return log_error_errno(r, "Guest %s: no sandbox identity left for its storage helper%s: %m", g->name,
                        r == -ENOSPC ? " (HelperUIDRange= or the MCS categories are exhausted)" : "");
        g->storage_uid = uid;
        g->storage_mcs_c1 = c1;
        g->storage_mcs_c2 = c2;
        r = guest_storage_identity_labels(g);
        if (r >= 0)
                r = guest_save(g);
        if (r < 0) {
                g->storage_uid = 0;
                g->storage_mcs_c1 = g->storage_mcs_c2 = 0;
                return r;
        }
        log_info("Guest %s: storage helper identity uid " UID_FMT ".", g->name, uid);
        return 0;
}

static int guest_storage_sandbox(void *userdata, StorageSandbox *ret) {
        Guest *g = userdata;
        int r;

        r = guest_storage_identity(g);
        if (r < 0)
                return r;
        r = guest_ensure_runtime_dir(g);
        if (r < 0)
                return r;
        *ret = (StorageSandbox) {
                .uid = g->storage_uid,
                /* Processes of it that are not this daemon's children are not this daemon's
                 * relays or pull helpers (storage.c kills only those). */
                .earlier_uid = g->helper_uid,
                .process_label = g->storage_process_label,
                .image_label = g->storage_image_label,
                .runtime_dir = g->runtime_dir,
        };
        return 0;
}

static size_t guest_storage_n_disks(void *userdata) {
        Guest *g = userdata;
        return g->n_disks;
}

static void guest_storage_disk(void *userdata, size_t i, StorageDisk *ret) {
        Guest *g = userdata;
        Disk *d = g->disks[i];

        *ret = (StorageDisk) {
                .alias = d->alias,
                .path = d->path,
                .format = d->format,
                .read_only = g->handoff && !d->pin_writable,
                .owner = g->owner,
                .qemu_uid = g->handoff ? d->pin_uid : UID_INVALID,
                .pin_dev = d->pin_dev,
                .pin_ino = d->pin_ino,
        };
}

static char **guest_storage_forbidden(void *userdata) {
        return guest_forbidden_images(userdata);
}

static char **guest_storage_claimed(void *userdata) {
        Guest *g = userdata;
        return engine_guest_claims(g->engine, g);
}

const StorageSource guest_storage_source = {
        .sandbox = guest_storage_sandbox,
        .n_disks = guest_storage_n_disks,
        .disk = guest_storage_disk,
        .forbidden_images = guest_storage_forbidden,
        .claimed_images = guest_storage_claimed,
};
