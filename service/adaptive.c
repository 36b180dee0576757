/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* The guest-latency mode of a disk's job: the sampling loop around the controller (throttle.c).
 * See adaptive.h. */

#include <inttypes.h>

#include "adaptive.h"
#include "backend.h"
#include "peer.h"
#include "qemu-stats.h"
#include "throttle.h"
#include "util.h"

#define PSI_IO_PATH "/proc/pressure/io"
#define PSI_MAX_BYTES 4096
/* The additive step: this share of the job's full-speed rate per window (at least the
 * controller's default), so that a fast disk is probed back up in a few windows, not hundreds. */
#define STEP_SHARE_DIVISOR 16
#define STEP_MIN (UINT64_C(8) << 20)
/* The deepest cut of one window: 70 %, not the controller's default halving. A window's p99 is
 * the 2nd-largest of ~150 guest reads: one slow read of the guest's own crosses the target, and
 * halving on each such window kept the stream at a fifth of its rate in the bench. */
#define DECREASE_PERMILLE 700u
/* For the same reason, two windows over the target in a row before a cut. */
#define OVER_WINDOWS 2u

/* Reference-counted: a QMP call or a backend call in flight holds a reference, and finds it
 * detached (disk NULL) once the mode ended. The disk holds one while the mode is on. */
typedef struct Adaptive {
        unsigned n_ref;
        Disk *disk; /* NULL: the mode ended */
        sd_event_source *timer;
        Throttle throttle;
        ThrottleSampler sampler;
        bool begun;           /* the job ran under it (a Start may still fail before) */
        bool stats_in_flight; /* query-blockstats or the histogram's set sent, no answer yet */
        bool speed_in_flight; /* a set_speed sent, no answer yet */
        bool histogram_ours;  /* we set the device's histogram: removed when the mode ends */
        QemuInstance qemu;    /* the QEMU whose device it is on (histogram_ours), */
        uint64_t connection;  /* over which QMP connection it was set */
        bool warned;          /* a failure was logged once */
        bool adopt;           /* carried on after a restart: a histogram of our boundaries is ours (the daemon
                               * of before set it) */
        char qdev[QEMU_QDEV_PATH_MAX];
        uint64_t applied;   /* the speed the job has, bytes/s (0: unlimited) */
        uint64_t sending;   /* the speed on its way */
        uint64_t full_rate; /* the fastest rate the job was seen at unthrottled, bytes/s */
} Adaptive;

static Adaptive *adaptive_ref(Adaptive *a) {
        a->n_ref++;
        return a;
}

static void adaptive_unref(void *p) {
        Adaptive *a = p;

        if (!a || --a->n_ref > 0)
                return;
        sd_event_source_disable_unref(a->timer);
        free(a);
}

static void publish(Disk *d, uint64_t p99, uint64_t limit, const char *reason) {
        const char *names[4] = {};
        size_t n = 0;

        if (d->guest_read_p99 != p99)
                names[n++] = "GuestReadP99";
        if (d->speed_limit != limit)
                names[n++] = "SpeedLimit";
        if (!streq(d->throttle_reason, reason))
                names[n++] = "ThrottleReason";
        d->guest_read_p99 = p99;
        d->speed_limit = limit;
        d->throttle_reason = reason;
        if (n > 0)
                disk_emit_changed(d, names[0], names[1], names[2], NULL);
}

static void speed_reply(int error, const char *desc, void *userdata) {
        Adaptive *a = userdata;

        a->speed_in_flight = false;
        if (!a->disk)
                return;
        if (error < 0) {
                if (!a->warned)
                        log_warning("Guest %s disk %s: cannot set the job's speed to %" PRIu64 " bytes/s: %s",
                                a->disk->host->name(a->disk->guest), a->disk->alias, a->sending,
                                desc ?: strerror(-error));
                a->warned = true;
                return;
        }
        a->applied = a->sending;
}

static void speed_done(void *userdata) {
        Adaptive *a = userdata;

        a->speed_in_flight = false;
        adaptive_unref(a);
}

/* Give the job the controller's limit, if it has another. */
static void apply(Adaptive *a) {
        Disk *d = a->disk;
        const JobBackend *b;
        int r;

        if (!d || a->speed_in_flight || a->throttle.limit == a->applied)
                return;
        b = job_backend_of(d);
        if (!b->runs(d) || !b->reachable(d))
                return;
        a->speed_in_flight = true;
        a->sending = a->throttle.limit;
        r = b->set_speed(d, a->sending, speed_reply, adaptive_ref(a), speed_done);
        if (r < 0) {
                a->speed_in_flight = false;
                adaptive_unref(a);
                log_warning_errno(r, "Guest %s disk %s: %s: %m", d->host->name(d->guest), d->alias, b->speed_error);
        }
}

static void read_psi(Psi *ret, bool *ret_has) {
        _cleanup_free_ char *text = NULL;
        size_t len;

        /* Missing (no PSI in this kernel) or unreadable: no data, the guest's p99 alone steers. */
        *ret_has = read_file_bounded(PSI_IO_PATH, PSI_MAX_BYTES, &text, &len) >= 0 && psi_parse(text, len, ret) >= 0;
}

static void histogram_set_reply(Qmp *q, int error, const char *desc, void *userdata) {
        Adaptive *a = userdata;

        if (error < 0 && a->disk) {
                a->histogram_ours = false;
                if (!a->warned)
                        log_warning("Guest %s disk %s: QEMU refused a latency histogram on %s: %s; the guest-latency "
                                    "mode has no samples.",
                                a->disk->host->name(a->disk->guest), a->disk->alias, a->qdev, desc ?: strerror(-error));
                a->warned = true;
        }
}

static void stats_done(void *userdata) {
        Adaptive *a = userdata;

        a->stats_in_flight = false;
        adaptive_unref(a);
}

static void stats_reply(Qmp *q, int error, const char *desc, const QemuBlockStats *stats, void *userdata) {
        Adaptive *a = userdata;
        Disk *d = a->disk;
        ThrottleSample sample;
        bool has_psi;
        Psi psi;
        int r;

        a->stats_in_flight = false;
        if (!d)
                return;
        if (error < 0) {
                if (!a->warned)
                        log_warning("Guest %s disk %s: no I/O statistics of the guest's device: %s",
                                d->host->name(d->guest), d->alias, desc ?: strerror(-error));
                a->warned = true;
                return;
        }
        if (a->adopt && !a->histogram_ours && stats->rd_histogram.n_bins == qemu_latency_boundaries_default_n + 1 &&
                memcmp(stats->rd_histogram.boundaries, qemu_latency_boundaries_default,
                        sizeof(uint64_t) * qemu_latency_boundaries_default_n) == 0) {
                strcpy(a->qdev, stats->qdev); /* bounded and checked by qemu_parse_blockstats() */
                a->histogram_ours = true;
                a->qemu = d->host->qemu(d->guest, &a->connection);
        }
        a->adopt = false;
        if (stats->rd_histogram.n_bins == 0) {
                /* No histogram on the device: set ours (the next reply primes with it). */
                if (a->histogram_ours)
                        return;               /* sent, not yet in force (a refusal clears the flag: asked again) */
                strcpy(a->qdev, stats->qdev); /* bounded and checked by qemu_parse_blockstats() */
                a->histogram_ours = true;
                a->qemu = d->host->qemu(d->guest, &a->connection);
                r = qemu_block_latency_histogram_set(q, a->qdev, qemu_latency_boundaries_default,
                        qemu_latency_boundaries_default_n, histogram_set_reply, adaptive_ref(a), stats_done);
                if (r < 0) {
                        adaptive_unref(a);
                        a->histogram_ours = false;
                        log_warning_errno(r, "Guest %s disk %s: cannot send block-latency-histogram-set: %m",
                                d->host->name(d->guest), d->alias);
                        return;
                }
                a->stats_in_flight = true;
                return;
        }

        read_psi(&psi, &has_psi);
        r = throttle_sampler_feed(
                &a->sampler, stats, has_psi ? &psi : NULL, d->job.done, now_usec(CLOCK_MONOTONIC), &sample);
        if (r < 0)
                return; /* primed, or primed again */
        if (a->throttle.reason == THROTTLE_IDLE && sample.stream_rate > a->full_rate) {
                a->full_rate = sample.stream_rate;
                a->throttle.config.step = MAX(STEP_MIN, a->full_rate / STEP_SHARE_DIVISOR);
        }
        (void) throttle_update(&a->throttle, &sample);
        publish(d, sample.has_p99 ? sample.p99_us : 0, a->throttle.limit,
                throttle_reason_to_string(a->throttle.reason));
        apply(a);
}

static void begin(Adaptive *a) {
        Disk *d = a->disk;

        a->begun = true;
        /* Unknown (after a restart: whatever the controller of before set): the first limit is
         * always sent. */
        a->applied = UINT64_MAX;
        if (d->max_guest_latency != a->throttle.config.target_p99_us) {
                d->max_guest_latency = a->throttle.config.target_p99_us;
                disk_emit_changed(d, "MaxGuestLatency", NULL);
                disk_save_later(d);
        }
        publish(d, 0, a->throttle.limit, throttle_reason_to_string(a->throttle.reason));
        /* The first reading at once: it only primes the window, and the job may be short. */
        if (sd_event_source_set_time_relative(a->timer, 0) < 0)
                log_debug("Guest %s disk %s: the first guest-latency window waits its turn.", d->host->name(d->guest),
                        d->alias);
}

static int on_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        Adaptive *a = userdata;
        Disk *d = a->disk;
        Peer *p;
        int r;

        if (!d)
                return 0;
        r = sd_event_source_set_time_relative(s, ADAPTIVE_WINDOW_USEC);
        if (r >= 0)
                r = sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
        if (r < 0)
                log_error_errno(r, "Guest %s disk %s: cannot re-arm the guest-latency window: %m",
                        d->host->name(d->guest), d->alias);

        if (!job_is_active(&d->job) || d->finalizing) {
                /* A Start that never ran, or a job that is over: the mode goes with it. */
                if (!d->starting)
                        adaptive_stop(d);
                return 0;
        }
        if (!a->begun)
                begin(a);
        if (d->job.state == STREAM_PAUSED || !d->host->qmp_ready(d->guest)) {
                a->sampler.primed = false; /* a window across a pause or a reconnect says nothing */
                return 0;
        }
        apply(a); /* a speed that did not take: again */
        if (a->stats_in_flight)
                return 0;
        p = d->host->peer(d->guest);
        r = qemu_query_blockstats(p->qmp, d->alias, stats_reply, adaptive_ref(a), stats_done);
        if (r < 0) {
                adaptive_unref(a);
                log_debug_errno(
                        r, "Guest %s disk %s: cannot send query-blockstats: %m", d->host->name(d->guest), d->alias);
                return 0;
        }
        a->stats_in_flight = true;
        return 0;
}

void adaptive_job_began(Disk *d) {
        if (d->adaptive && !d->adaptive->begun && job_is_active(&d->job))
                begin(d->adaptive);
}

static void stopper(Disk *d) {
        adaptive_stop(d);
}

int adaptive_start(Disk *d, uint64_t target_us, uint64_t ceiling) {
        Adaptive *a = d->adaptive;
        Peer *p = d->host->peer(d->guest);
        int r;

        if (target_us < THROTTLE_TARGET_MIN_US || target_us > THROTTLE_TARGET_MAX_US)
                return -EINVAL;
        if (a) {
                /* Retarget: the limit in force stays, the next window judges it by the new target. */
                a->throttle.config.target_p99_us = target_us;
                if (a->begun && d->max_guest_latency != target_us) {
                        d->max_guest_latency = target_us;
                        disk_emit_changed(d, "MaxGuestLatency", NULL);
                        disk_save_later(d);
                }
                return 0;
        }

        a = calloc(1, sizeof(*a));
        if (!a)
                return -ENOMEM;
        a->n_ref = 1;
        r = throttle_init(&a->throttle, &(ThrottleConfig){
                                                .target_p99_us = target_us,
                                                .ceiling = ceiling,
                                                .decrease_permille = DECREASE_PERMILLE,
                                                .over_windows = OVER_WINDOWS,
                                        });
        if (r < 0) {
                free(a);
                return r;
        }
        r = sd_event_add_time_relative(p->event, &a->timer, CLOCK_MONOTONIC, ADAPTIVE_WINDOW_USEC, 0, on_timer, a);
        if (r < 0) {
                free(a);
                return r;
        }
        (void) sd_event_source_set_description(a->timer, "adaptive-window");
        a->disk = d;
        d->adaptive = a;
        d->adaptive_stopper = stopper;
        if (job_is_active(&d->job) && !d->finalizing && !d->starting)
                begin(a);
        return 0;
}

int adaptive_resume(Disk *d, uint64_t target_us, uint64_t ceiling) {
        int r;

        r = adaptive_start(d, target_us, ceiling);
        if (r < 0)
                return r;
        d->adaptive->adopt = true;
        return 0;
}

static void cleared_reply(Qmp *q, int error, const char *desc, void *userdata) {
        if (error < 0)
                log_debug("Removing a latency histogram failed: %s", desc ?: strerror(-error));
}

void adaptive_stop(Disk *d) {
        Adaptive *a = d->adaptive;
        int r;

        if (!a)
                return;
        d->adaptive = NULL;
        a->disk = NULL;
        (void) sd_event_source_set_enabled(a->timer, SD_EVENT_OFF);
        if (a->histogram_ours && !d->host->qmp_ready(d->guest)) {
                /* Removed at the next connection, if to this QEMU (guest-peer.c). */
                free(d->histogram_left);
                d->histogram_left = strdup(a->qdev);
                d->histogram_left_qemu = a->qemu;
        } else if (a->histogram_ours) {
                uint64_t connection;
                QemuInstance now = d->host->qemu(d->guest, &connection);

                /* Leave the guest as found: over the connection it was set on, or one to the same
                 * process (a QEMU started since at the same socket may have a histogram of someone
                 * else's on a device of that name). */
                r = connection == a->connection || qemu_instance_same(&a->qemu, &now)
                            ? qemu_block_latency_histogram_clear(
                                      d->host->peer(d->guest)->qmp, a->qdev, cleared_reply, NULL, NULL)
                            : 0;
                if (r < 0)
                        log_warning_errno(r, "Guest %s disk %s: cannot remove the latency histogram of %s: %m",
                                d->host->name(d->guest), d->alias, a->qdev);
        }
        if (a->begun)
                publish(d, 0, 0, ADAPTIVE_REASON_OFF);
        adaptive_unref(a);
}

uint64_t adaptive_speed_for_ceiling(Disk *d, uint64_t ceiling) {
        Throttle t;

        if (!d->adaptive)
                return ceiling;
        t = d->adaptive->throttle;
        if (throttle_set_ceiling(&t, ceiling) < 0)
                return ceiling;
        return t.limit;
}

void adaptive_ceiling_applied(Disk *d, uint64_t ceiling, uint64_t speed) {
        Adaptive *a = d->adaptive;

        if (!a || throttle_set_ceiling(&a->throttle, ceiling) < 0)
                return;
        a->applied = speed;
        if (a->begun)
                publish(d, d->guest_read_p99, a->throttle.limit, throttle_reason_to_string(a->throttle.reason));
}
