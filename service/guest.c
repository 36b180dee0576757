/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <fcntl.h>
#include <inttypes.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <systemd/sd-id128.h>

#include "bus-error.h"
#include "export.h"
#include "range.h"
#include "guest.h"
#include "image.h"
#include "storage.h"
#include "manager.h"
#include "polkit.h"
#include "stream.h"
#include "util.h"

#define POLL_INTERVAL_USEC (250 * USEC_PER_MSEC) /* progress at most 4 times a second */
#define RECONNECT_MIN_USEC (1 * USEC_PER_SEC)
#define RECONNECT_MAX_USEC (30 * USEC_PER_SEC)
#define GUEST_SAVE_INTERVAL_USEC (100 * USEC_PER_MSEC)
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

struct GuestWaiter {
        GuestWaiter *next;
        guest_ready_handler_t handler;
        void *userdata;
        void (*destroy)(void *);
};

int guest_new(Guest **ret, Manager *m, const char *name, const char *qmp_socket, uid_t owner, const char *uuid) {
        Guest *g;

        g = calloc(1, sizeof(Guest));
        if (!g)
                return -ENOMEM;
        g->manager = m;
        g->owner = owner;
        g->qmp_uid = UID_INVALID;
        g->name = strdup(name);
        g->qmp_socket = strdup(qmp_socket);
        if (!g->name || !g->qmp_socket || sd_bus_path_encode(GUEST_PATH_PREFIX, name, &g->object_path) < 0)
                goto oom;
        if (uuid) {
                g->uuid = strdup(uuid);
        } else {
                sd_id128_t id;
                char buf[SD_ID128_UUID_STRING_MAX];
                if (sd_id128_randomize(&id) < 0)
                        goto oom;
                g->uuid = strdup(sd_id128_to_uuid_string(id, buf));
        }
        if (!g->uuid)
                goto oom;
        *ret = g;
        return 0;
oom:
        guest_free(g);
        return -ENOMEM;
}

static void refresh_waiters_free(struct RefreshWaiter *l);

Guest *guest_free(Guest *g) {
        if (!g)
                return NULL;
        /* Closing drops pending QMP callbacks before anything they point to goes away. */
        g->qmp = qmp_close_unref(g->qmp);
        refresh_waiters_free(TAKE_PTR(g->refresh_pending));
        storage_helper_kill(g);
        while (g->waiters) {
                GuestWaiter *w = g->waiters;
                g->waiters = w->next;
                if (w->destroy)
                        w->destroy(w->userdata);
                free(w);
        }
        g->reconnect_timer = sd_event_source_disable_unref(g->reconnect_timer);
        g->poll_timer = sd_event_source_disable_unref(g->poll_timer);
        g->release_check = sd_event_source_disable_unref(g->release_check);
        g->bus_drain_timer = sd_event_source_disable_unref(g->bus_drain_timer);
        if (g->save_pending) /* the daemon stops: what was deferred is written now */
                (void) guest_save(g);
        g->save_timer = sd_event_source_disable_unref(g->save_timer);
        if (g->register_call) {
                (void) sd_bus_reply_method_errorf(g->register_call, BS_ERROR_NOT_RUNNING,
                        "The daemon is shutting down; guest '%s' was not registered.", g->name);
                g->register_call = sd_bus_message_unref(g->register_call);
        }
        for (size_t i = 0; i < g->n_disks; i++)
                disk_free(g->disks[i]);
        free(g->disks);
        free(g->name);
        free(g->uuid);
        free(g->qmp_socket);
        free(g->connect_error);
        free(g->object_path);
        free(g->selinux_process_label);
        free(g->selinux_image_label);
        free(g->runtime_dir);
        free(g->nbd_socket);
        free(g);
        return NULL;
}

bool guest_qmp_ready(Guest *g) {
        return g->qmp && qmp_is_ready(g->qmp) && (!g->offline || storage_helper_attached(g));
}

int guest_spawn_helper(Guest *g, const char *binary, char *const *argv, int data_fd, const char *label,
        const char *log_prefix, pid_t *ret_pid, int *ret_control, HelperLog **ret_log) {
        Manager *m = g->manager;
        _cleanup_free_ char *path = strdup_printf("%s/%s", manager_helper_dir(m), binary);
        _cleanup_close_ int exec_fd = -1, log_r = -1, log_w = -1, ours = -1, theirs = -1;
        int pair[2], pipefd[2], r;

        if (!path)
                return -ENOMEM;
        exec_fd = open(path, O_PATH | O_CLOEXEC);
        if (exec_fd < 0)
                return log_error_errno(errno, "Cannot open %s: %m", path);
        if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) < 0)
                return -errno;
        ours = pair[0];
        theirs = pair[1];
        if (pipe2(pipefd, O_CLOEXEC) < 0)
                return -errno;
        log_r = pipefd[0];
        log_w = pipefd[1];
        r = guest_ensure_runtime_dir(g);
        if (r < 0)
                return r;
        r = sandbox_spawn(
                &(SandboxSpec) {
                        .name = g->name,
                        .uid = g->helper_uid,
                        .gid = g->helper_uid,
                        .runtime_dir = g->runtime_dir,
                        .selinux_label = label,
                        .fds = (int[]) { data_fd, theirs },
                        .n_fds = 2,
                        .stderr_fd = log_w,
                        .argv = argv,
                        .exec_fd = exec_fd,
                },
                ret_pid);
        if (r < 0)
                return r;
        if (helper_log_new(ret_log, m->event, TAKE_FD(log_r), log_prefix) < 0)
                log_warning("%s: cannot read its log.", log_prefix);
        *ret_control = TAKE_FD(ours);
        return 0;
}

int guest_ensure_runtime_dir(Guest *g) {
        int r;

        if (!g->runtime_dir) {
                g->runtime_dir = strdup_printf("%s/guests/%s", g->manager->runtime_dir, g->name);
                if (!g->runtime_dir)
                        return -ENOMEM;
        }
        r = mkdir_p(g->runtime_dir, 0700); /* root's: helpers get it bound in, they need nothing of it */
        if (r < 0)
                return log_error_errno(r, "Failed to create %s: %m", g->runtime_dir);
        return 0;
}

void guest_run_waiters(Guest *g, int error, const char *error_text) {
        GuestWaiter *l = TAKE_PTR(g->waiters);

        while (l) {
                GuestWaiter *w = l;
                l = w->next;
                w->handler(g, error, error_text, w->userdata);
                if (w->destroy)
                        w->destroy(w->userdata);
                free(w);
        }
}

int guest_when_ready(Guest *g, guest_ready_handler_t handler, void *userdata, void (*destroy)(void *)) {
        GuestWaiter *w;
        int r;

        if (guest_qmp_ready(g) || !g->offline) {
                handler(g, guest_qmp_ready(g) ? 0 : -ENOTCONN, NULL, userdata);
                if (destroy)
                        destroy(userdata);
                return 0;
        }
        if (!g->helper) {
                r = storage_helper_start(g);
                if (r < 0)
                        return r;
        }
        w = calloc(1, sizeof(GuestWaiter));
        if (!w)
                return -ENOMEM;
        *w = (GuestWaiter) { .next = g->waiters, .handler = handler, .userdata = userdata, .destroy = destroy };
        g->waiters = w;
        return 0;
}

/* Does anything but outcomes waiting for the images' release need the storage helper? */
static bool guest_helper_needed(Guest *g) {
        if (g->waiters || export_guest_has_exports(g) || range_guest_busy(g))
                return true;
        for (size_t i = 0; i < g->n_disks; i++) {
                Disk *d = g->disks[i];
                if ((job_is_active(&d->job) && !d->releasing) || d->starting || d->finalizing)
                        return true;
        }
        return false;
}

void guest_publish_released(Guest *g) {
        g->release_check = sd_event_source_disable_unref(g->release_check);
        /* Publishing may start or free things: walk by index with re-checks. */
        for (size_t i = 0; i < g->n_disks; i++)
                disk_publish_released(g->disks[i]);
}

static bool guest_has_releasing(Guest *g) {
        for (size_t i = 0; i < g->n_disks; i++)
                if (g->disks[i]->releasing)
                        return true;
        return false;
}

/* After the current event: whatever finished a job (a range helper, say) has let go of the
 * helper by then, or something else really keeps it. */
static int release_check(sd_event_source *s, void *userdata) {
        Guest *g = userdata;

        if (g->helper && !guest_helper_needed(g)) {
                g->release_check = sd_event_source_disable_unref(g->release_check);
                storage_helper_stop(g); /* the outcomes are told once it is gone */
                return 0;
        }
        /* Another job, an export or a map of this guest keeps the helper (and the images): tell
         * the outcome now rather than when that ends. */
        guest_publish_released(g);
        return 0;
}

void guest_release_helper_if_idle(Guest *g) {
        if (!g->offline)
                return;
        if (!g->helper) {
                guest_publish_released(g);
                return;
        }
        if (!guest_helper_needed(g)) {
                storage_helper_stop(g);
                return;
        }
        if (guest_has_releasing(g) && !g->release_check &&
                sd_event_add_defer(g->manager->event, &g->release_check, release_check, g) < 0)
                guest_publish_released(g); /* cannot wait: tell now */
}

char **guest_forbidden_images(Guest *g) {
        return manager_guest_images(g->manager, g);
}

Disk *guest_find_disk(Guest *g, const char *name) {
        if (!name)
                return NULL;
        for (size_t i = 0; i < g->n_disks; i++)
                if (streq(g->disks[i]->alias, name))
                        return g->disks[i];
        for (size_t i = 0; i < g->n_disks; i++)
                if (!isempty(g->disks[i]->path) && streq(g->disks[i]->path, name))
                        return g->disks[i];
        return NULL;
}

bool guest_has_active_job(Guest *g) {
        for (size_t i = 0; i < g->n_disks; i++) {
                Disk *d = g->disks[i];
                if (job_is_active(&d->job) || d->starting || d->finalizing)
                        return true;
        }
        return false;
}

int guest_save(Guest *g) {
        int r;

        /* Whatever was deferred is in this write too. */
        g->save_pending = false;
        if (g->save_timer)
                (void) sd_event_source_set_enabled(g->save_timer, SD_EVENT_OFF);
        if (!g->published)
                return 0;
        g->last_save = now_usec(CLOCK_MONOTONIC);
        r = guest_write_state(g, g->manager->guest_state_dir);
        if (r < 0)
                return log_error_errno(r, "Failed to save the state of guest %s: %m", g->name);
        return 0;
}

static int save_handler(sd_event_source *s, uint64_t usec, void *userdata) {
        Guest *g = userdata;

        (void) guest_save(g); /* logs on failure */
        return 0;
}

void guest_save_later(Guest *g) {
        usec_t when;
        int r;

        if (!g->published || g->save_pending)
                return;
        when = MAX(now_usec(CLOCK_MONOTONIC), g->last_save + GUEST_SAVE_INTERVAL_USEC);
        if (!g->save_timer)
                r = sd_event_add_time(g->manager->event, &g->save_timer, CLOCK_MONOTONIC, when, 0, save_handler, g);
        else {
                r = sd_event_source_set_time(g->save_timer, when);
                if (r >= 0)
                        r = sd_event_source_set_enabled(g->save_timer, SD_EVENT_ONESHOT);
        }
        if (r < 0) {
                log_debug_errno(r, "Guest %s: cannot defer a state save, saving now: %m", g->name);
                (void) guest_save(g);
                return;
        }
        g->save_pending = true;
}

static void guest_emit_changed(Guest *g, const char *property) {
        int r;

        if (!g->published)
                return;
        r = sd_bus_emit_properties_changed(g->manager->bus, g->object_path, GUEST_INTERFACE, property, NULL);
        if (r < 0)
                log_debug_errno(r, "Failed to emit PropertiesChanged for %s: %m", g->object_path);
}

/* Disks */

static int guest_add_disk(Guest *g, Disk *d) {
        Disk **l = reallocarray(g->disks, g->n_disks + 1, sizeof(Disk *));

        if (!l)
                return -ENOMEM;
        g->disks = l;
        g->disks[g->n_disks++] = d;
        return 0;
}

static void guest_remove_disk(Guest *g, size_t i) {
        Disk *d = g->disks[i];

        if (g->published)
                (void) sd_bus_emit_object_removed(g->manager->bus, d->object_path);
        /* The maps' shared export goes too (maps still reading it fail: the disk is gone). */
        d->map_export_users = 0;
        range_map_export_release(d);
        memmove(g->disks + i, g->disks + i + 1, (g->n_disks - i - 1) * sizeof(Disk *));
        g->n_disks--;
        disk_free(d);
}

/* Make our disks what QEMU says they are: update, add, remove. */
static int guest_apply_disks(Guest *g, const QemuDisk *qd, size_t n) {
        bool list_changed = false;
        int r;

        for (size_t i = 0; i < n; i++) {
                Disk *d = NULL;

                for (size_t j = 0; j < g->n_disks; j++)
                        if (streq(g->disks[j]->alias, qd[i].alias))
                                d = g->disks[j];
                if (d) {
                        r = disk_update_from_qemu(d, &qd[i], true);
                        if (r < 0)
                                return r;
                        continue;
                }
                r = disk_new(&d, g, qd[i].alias);
                if (r < 0)
                        return r;
                r = disk_update_from_qemu(d, &qd[i], false);
                if (r >= 0)
                        r = guest_add_disk(g, d);
                if (r < 0) {
                        disk_free(d);
                        return r;
                }
                list_changed = true;
                if (g->published)
                        (void) sd_bus_emit_object_added(g->manager->bus, d->object_path);
        }

        for (size_t j = g->n_disks; j > 0; j--) {
                Disk *d = g->disks[j - 1];
                bool present = false;

                for (size_t i = 0; i < n && !present; i++)
                        present = streq(qd[i].alias, d->alias);
                if (present)
                        continue;
                log_info("Guest %s: disk %s is gone from QEMU.", g->name, d->alias);
                if (job_is_active(&d->job) || d->finalizing) {
                        /* Let clients hear how it ended before the object goes. */
                        disk_fail_job(d, "The disk was removed from the guest during the job.");
                }
                guest_remove_disk(g, j - 1);
                list_changed = true;
        }
        if (list_changed)
                guest_emit_changed(g, "Disks");
        return 0;
}

/* Refresh: re-read the disks. One query in flight per guest: each costs QEMU's whole
 * query-block reply held until query-named-block-nodes answers, so a caller calling Refresh
 * in a loop (or a QEMU slow to answer) must not multiply it. Who asks while one is out waits
 * for the next one, sent after the first returns: the answer they get is never older than
 * their request (finalize_dismissed relies on that). */

typedef struct RefreshWaiter {
        struct RefreshWaiter *next;
        guest_refresh_handler_t handler;
        void *userdata;
        void (*destroy)(void *);
} RefreshWaiter;

typedef struct RefreshCtx {
        Guest *guest;
        RefreshWaiter *waiters;
        bool answered; /* refresh_reply ran and detached it from the guest */
} RefreshCtx;

static void refresh_waiters_free(RefreshWaiter *l) {
        while (l) {
                RefreshWaiter *n = l->next;
                if (l->destroy)
                        l->destroy(l->userdata);
                free(l);
                l = n;
        }
}

static void refresh_ctx_free(void *p) {
        RefreshCtx *c = p;

        if (!c)
                return;
        /* Never answered: the connection was closed by the guest's own code (the guest lives). */
        if (!c->answered && c->guest->refresh_inflight == c)
                c->guest->refresh_inflight = NULL;
        refresh_waiters_free(c->waiters);
        free(c);
}

static void refresh_reply(Qmp *q, int error, const char *desc, QemuDisk *disks, size_t n, void *userdata);

/* On success the query owns the waiters; on failure the caller keeps them. */
static int refresh_send(Guest *g, RefreshWaiter *waiters) {
        RefreshCtx *c = calloc(1, sizeof(RefreshCtx));
        int r;

        if (!c)
                return -ENOMEM;
        *c = (RefreshCtx) { .guest = g, .waiters = waiters };
        r = qemu_query_disks(g->qmp, refresh_reply, c, refresh_ctx_free);
        if (r < 0) {
                free(c); /* request_submit dropped it without calling refresh_ctx_free */
                return r;
        }
        g->refresh_inflight = c;
        return 0;
}

static void refresh_notify(Guest *g, RefreshWaiter *l, int error, const char *desc) {
        for (RefreshWaiter *w = l; w; w = w->next)
                if (w->handler)
                        w->handler(g, error, desc, w->userdata);
        refresh_waiters_free(l);
}

static void refresh_reply(Qmp *q, int error, const char *desc, QemuDisk *disks, size_t n, void *userdata) {
        RefreshCtx *c = userdata;
        Guest *g = c->guest;
        RefreshWaiter *waiters = TAKE_PTR(c->waiters), *pending = TAKE_PTR(g->refresh_pending);
        int r = error;

        c->answered = true;
        g->refresh_inflight = NULL;
        if (r >= 0) {
                r = guest_apply_disks(g, disks, n);
                if (r < 0)
                        log_error_errno(r, "Guest %s: failed to apply QEMU's disks: %m", g->name);
                else
                        guest_save_later(g); /* QEMU tells them again on every connect */
        } else
                log_warning("Guest %s: failed to read disks: %s", g->name, desc ?: strerror(-r));

        /* Before any handler runs (one may end the guest): the next query for those who waited. */
        if (pending) {
                int k = r < 0 ? r : !g->running ? -ENOTCONN : refresh_send(g, pending);
                if (k < 0)
                        refresh_notify(g, pending, k, r < 0 ? desc : NULL);
        }
        refresh_notify(g, waiters, r, desc);
}

/* An offline guest's disks come from the image headers, read by us. */
static int guest_refresh_offline(Guest *g) {
        _cleanup_strv_free_ char **forbidden = guest_forbidden_images(g),
                                 **claimed = manager_guest_claims(g->manager, g);
        int r;

        if (!forbidden || !claimed)
                return -ENOMEM;
        for (size_t i = 0; i < g->n_disks; i++) {
                _cleanup_(image_chain_done) ImageChain chain = {};
                _cleanup_free_ char *error = NULL;
                Disk *d = g->disks[i];

                r = image_chain_open_claimed(
                        g->manager->config.image_dirs, d->path, d->format, false, forbidden, claimed, &chain, &error);
                if (r < 0) {
                        log_warning("Guest %s disk %s: cannot read the image chain: %s", g->name, d->alias,
                                error ?: strerror(-r));
                        continue;
                }
                r = disk_update_from_chain(d, &chain, true);
                if (r < 0)
                        return r;
        }
        (void) guest_save(g);
        return 0;
}

int guest_refresh(Guest *g, guest_refresh_handler_t handler, void *userdata, void (*destroy)(void *)) {
        RefreshWaiter *w;
        int r;

        if (g->offline) {
                r = guest_refresh_offline(g);
                if (handler)
                        handler(g, r, NULL, userdata);
                if (destroy)
                        destroy(userdata);
                return 0;
        }
        if (!g->running)
                return -ENOTCONN;
        w = calloc(1, sizeof(RefreshWaiter));
        if (!w)
                return -ENOMEM;
        *w = (RefreshWaiter) { .handler = handler, .userdata = userdata, .destroy = destroy };
        if (g->refresh_inflight) {
                RefreshWaiter **tail = &g->refresh_pending;
                while (*tail)
                        tail = &(*tail)->next;
                *tail = w;
                return 0;
        }
        r = refresh_send(g, w);
        if (r < 0) {
                free(w); /* not the caller's destroy: on failure the caller keeps userdata */
                return r;
        }
        return 0;
}

/* Jobs: events, polling, reconciliation. */

static void guest_poll_now(Guest *g);

static uint64_t bus_backlog(Guest *g) {
        uint64_t n = 0;

        if (!g->manager->bus || sd_bus_get_n_queued_write(g->manager->bus, &n) < 0)
                return 0;
        return n;
}

static void event_tokens_refill(Guest *g) {
        usec_t now = now_usec(CLOCK_MONOTONIC);

        if (g->event_tokens_at == 0)
                g->event_tokens = EVENT_BURST;
        else
                g->event_tokens = MIN(EVENT_BURST,
                        g->event_tokens + (double) (now - g->event_tokens_at) * EVENT_RATE / USEC_PER_SEC);
        g->event_tokens_at = now;
}

static bool guest_must_wait(Guest *g) {
        event_tokens_refill(g);
        return g->event_tokens < 1.0 || bus_backlog(g) > BUS_BACKLOG_MAX / 4;
}

static int bus_drain_handler(sd_event_source *s, uint64_t usec, void *userdata) {
        Guest *g = userdata;

        if (guest_must_wait(g)) {
                if (sd_event_source_set_time_relative(s, BUS_DRAIN_CHECK_USEC) >= 0 &&
                        sd_event_source_set_enabled(s, SD_EVENT_ONESHOT) >= 0)
                        return 0;
        }
        qmp_set_reading(g->qmp, true);
        return 0;
}

/* After each event: one token spent; out of them, or the bus behind, pause reading QEMU. */
static void guest_pace_events(Guest *g) {
        int r;

        event_tokens_refill(g);
        g->event_tokens -= 1.0;
        if (!g->qmp || (g->event_tokens >= 0.0 && bus_backlog(g) <= BUS_BACKLOG_MAX))
                return;
        if (!g->bus_drain_timer)
                r = sd_event_add_time_relative(g->manager->event, &g->bus_drain_timer, CLOCK_MONOTONIC,
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
        qmp_set_reading(g->qmp, false);
}

void guest_on_event(Qmp *q, const char *event, json_object *data, void *userdata) {
        Guest *g = userdata;
        usec_t mono = now_usec(CLOCK_MONOTONIC);
        QemuJobEvent ev;
        int r;

        guest_pace_events(g); /* every event counts; this one is handled all the same */

        {
                const char *id = NULL;
                if (qemu_parse_export_deleted(event, data, &id) > 0) {
                        range_on_export_deleted(g, id);
                        return;
                }
        }
        r = qemu_parse_job_event(event, data, &ev);
        if (r < 0) {
                log_warning("Guest %s: ignoring malformed %s event from QEMU.", g->name, event);
                return;
        }
        if (r == 0)
                return;
        log_debug("Guest %s: %s %s %s", g->name, event, strempty(ev.id),
                ev.kind == QEMU_EVENT_JOB_STATUS_CHANGE ? qemu_job_status_to_string(ev.status) : "");
        /* A disk's callback may finalize (and even remove) disks: walk by index with re-checks. */
        for (size_t i = 0; i < g->n_disks; i++) {
                Disk *d = g->disks[i];
                unsigned changed = job_apply_event(&d->job, &ev, mono);

                if (changed & JOB_NEEDS_QUERY)
                        guest_poll_now(g);
                if (changed & ~JOB_NEEDS_QUERY)
                        disk_apply_qemu_job_changes(d, changed & ~JOB_NEEDS_QUERY);
        }
}

/* Apply query-block-jobs to our disks. reconcile: after a (re)connect, jobs QEMU no longer
 * lists are lost, and concluded jobs of ours that no disk claims are dismissed. */
static void guest_apply_jobs(Guest *g, const QemuBlockJob *jobs, size_t n, bool reconcile) {
        usec_t mono = now_usec(CLOCK_MONOTONIC);

        for (size_t i = 0; i < g->n_disks; i++) {
                Disk *d = g->disks[i];
                const QemuBlockJob *found = NULL;

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
                        unsigned changed = job_apply_info(&d->job, found, mono);
                        if (changed)
                                disk_apply_qemu_job_changes(d, changed);
                } else
                        disk_fail_job(d, "QEMU no longer knows the job: it was dismissed by another QMP client, or QEMU "
                                         "was restarted.");
        }

        if (!reconcile || !guest_qmp_ready(g))
                return;
        for (size_t k = 0; k < n; k++) {
                bool claimed = false;

                if (jobs[k].status != QEMU_JOB_CONCLUDED || strncmp(jobs[k].id, "bsd-", 4) != 0)
                        continue;
                for (size_t i = 0; i < g->n_disks && !claimed; i++)
                        claimed = streq_ptr(g->disks[i]->job.id, jobs[k].id);
                if (!claimed) {
                        log_info("Guest %s: dismissing leftover job %s.", g->name, jobs[k].id);
                        (void) qemu_job_dismiss(g->qmp, jobs[k].id, NULL, NULL, NULL);
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
        r = qemu_query_block_jobs(g->qmp, poll_reply, g, NULL);
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
                r = sd_event_add_time_relative(g->manager->event, &g->poll_timer, CLOCK_MONOTONIC, POLL_INTERVAL_USEC,
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
                if (range_running(d) || d->starting)
                        continue; /* a job carried on after the restart, or a Start on its way */
                if (job_is_active(&d->job) && !d->job.concluded)
                        disk_fail_job(d, why);
                else if (d->job.concluded)
                        disk_apply_job_changes(d, JOB_NOW_CONCLUDED);
        }
}

static void guest_schedule_reconnect(Guest *g);

void guest_fail_orphaned_jobs(Guest *g) {
        range_cleanup_leftovers(g);
        range_resume_orphans(g);
        /* Full streams ran in the storage helper that died with the old daemon: a new helper
         * carries them on (what is local is skipped). */
        for (size_t i = 0; i < g->n_disks; i++) {
                Disk *d = g->disks[i];
                int r;

                if (d->job.mode != STREAM_MODE_FULL || !job_is_active(&d->job) || d->job.concluded)
                        continue;
                r = stream_resume_offline(d);
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
                r = sd_event_add_time_relative(g->manager->event, &g->reconnect_timer, CLOCK_MONOTONIC, delay,
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
        Manager *m = g->manager;
        sd_bus_message *call = TAKE_PTR(g->register_call);

        (void) sd_bus_reply_method_errorf(call, BS_ERROR_QEMU_FAILED, "Guest '%s' not registered: %s %s: %s", g->name,
                what, g->qmp_socket, detail);
        sd_bus_message_unref(call);
        manager_unlink_guest(m, g);
        guest_free(g);
}

static void guest_connection_failed(Guest *g, int error) {
        _cleanup_free_ char *why = NULL;
        bool was_running = g->running;

        g->running = false;
        g->poll_pending = false;
        g->qmp = qmp_close_unref(g->qmp);
        export_guest_lost(g);
        range_guest_lost(g);
        guest_update_polling(g);

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
        guest_schedule_reconnect(g);
}

/* After a (re)connect: first the jobs (a finished job of ours is recorded and dismissed before
 * anything else: QEMU 7.2 must not be asked for node names while it lingers), then the disks. */

static void connect_disks_reply(Guest *g, int error, const char *desc, void *userdata) {
        Manager *m = g->manager;
        sd_bus_message *call;
        int r;

        /* With the disks as QEMU has them now (a new QEMU may name its nodes differently). */
        range_resume_orphans(g);
        if (error < 0) {
                if (g->register_call)
                        guest_register_failed(g, "could not list the disks of QEMU at", desc ?: strerror(-error));
                return;
        }
        if (g->register_call) {
                call = TAKE_PTR(g->register_call);
                r = guest_publish(g);
                if (r < 0) {
                        (void) sd_bus_reply_method_errorf(call, SD_BUS_ERROR_FAILED,
                                "Failed to save guest '%s' in %s: %s", g->name, m->guest_state_dir, strerror(-r));
                        sd_bus_message_unref(call);
                        manager_unlink_guest(m, g);
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
        range_cleanup_leftovers(g);
        r = guest_refresh(g, connect_disks_reply, NULL, NULL);
        if (r < 0) {
                if (g->register_call)
                        guest_register_failed(g, "could not ask for the disks of QEMU at", strerror(-r));
                else {
                        log_error_errno(r, "Guest %s: failed to query disks: %m", g->name);
                        range_resume_orphans(g);
                }
        }
}

void guest_on_state(Qmp *q, int error, void *userdata) {
        Guest *g = userdata;
        int r;

        if (g->offline) {
                if (error < 0)
                        storage_helper_lost(g, error);
                else
                        storage_helper_attach(g);
                return;
        }
        if (error < 0) {
                guest_connection_failed(g, error);
                return;
        }
        log_info("Guest %s: connected to QEMU %u.%u.%u.", g->name, qmp_qemu_version(q) / 10000,
                qmp_qemu_version(q) / 100 % 100, qmp_qemu_version(q) % 100);
        g->running = true;
        g->had_connection = true;
        g->connected_at = now_usec(CLOCK_MONOTONIC);
        /* reconnect_attempts is reset only once this connection proved stable (above). */
        guest_emit_changed(g, "Running");
        export_cleanup_leftovers(g); /* first: commands run in order */
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
        return uid == g->owner || config_qemu_user_allowed(&g->manager->config, uid) ||
               (g->qmp_uid != UID_INVALID && uid == g->qmp_uid) || g->qmp_uid_pin_next;
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
        if (g->qmp) /* connected or connecting already */
                return 0;
        if (isempty(g->qmp_socket))
                return -EOPNOTSUPP;

        r = guest_open_qmp(g, sock_fd, seen, &fd);
        if (r >= 0) {
                r = qmp_new_from_fd(&g->qmp, g->manager->event, fd,
                        &(QmpHandlers) { .on_state = guest_on_state, .on_event = guest_on_event, .userdata = g });
                if (r >= 0) {
                        TAKE_FD(fd);
                        qmp_set_timeout(g->qmp, g->manager->config.qmp_timeout_usec);
                        return 0;
                }
        }
        g->qmp = NULL;
        if (!g->connect_error)
                g->connect_error = strdup_printf("cannot connect to its QMP socket %s: %s", g->qmp_socket,
                        strerror(-r));
        if (g->register_call)
                return r; /* the caller reports it */
        if (g->reconnect_attempts == 0)
                log_warning_errno(r, "Guest %s: cannot connect to QMP socket %s: %m; retrying.", g->name, g->qmp_socket);
        why = strdup_printf("QEMU went away: %s.", g->connect_error ?: strerror(-r));
        guest_fail_jobs(g, why ?: "QEMU went away.");
        guest_schedule_reconnect(g);
        return r;
}

int guest_publish(Guest *g) {
        Manager *m = g->manager;
        int r;

        g->published = true;
        r = guest_write_state(g, g->manager->guest_state_dir);
        if (r < 0) {
                g->published = false;
                return r;
        }
        (void) sd_bus_emit_object_added(m->bus, g->object_path);
        for (size_t i = 0; i < g->n_disks; i++)
                (void) sd_bus_emit_object_added(m->bus, g->disks[i]->object_path);
        return 0;
}

/* An unregistered guest's QMP connection, kept until QEMU answered what we last asked of it. */
typedef struct UnregisterDrain {
        struct UnregisterDrain *next;
        Manager *manager;
        Qmp *qmp;
        sd_bus_message *reply_to;
        char *name;
} UnregisterDrain;

#define UNREGISTER_DRAIN_MAX_USEC (10ULL * USEC_PER_SEC)

static void unregister_drain_free(UnregisterDrain *d) {
        UnregisterDrain **p;

        for (p = &d->manager->unregister_drains; *p; p = &(*p)->next)
                if (*p == d) {
                        *p = d->next;
                        break;
                }
        if (d->reply_to)
                (void) sd_bus_reply_method_return(d->reply_to, NULL);
        sd_bus_message_unref(d->reply_to);
        free(d->name);
        free(d);
}

static void unregister_drained(int error, void *userdata) {
        UnregisterDrain *d = userdata;

        d->qmp = NULL; /* closed and released by qmp.c */
        if (error < 0)
                log_warning("Guest %s: QEMU did not confirm the removal of our NBD server and exports (%s); "
                            "check its query-block-exports.", d->name, strerror(-error));
        else
                log_debug("Guest %s: QEMU confirmed our last commands.", d->name);
        unregister_drain_free(d);
}

void guest_unregister_drains_free(Manager *m) {
        while (m->unregister_drains) {
                UnregisterDrain *d = m->unregister_drains;
                d->qmp = qmp_close_unref(d->qmp);
                unregister_drain_free(d);
        }
}

void guest_unregister(Guest *g, sd_bus_message *reply_to) {
        Manager *m = g->manager;
        bool had_server = g->nbd_server || g->nbd_server_started;
        UnregisterDrain *d = NULL;
        int r;

        log_info("Guest %s unregistered.", g->name);
        if (g->published) {
                for (size_t i = 0; i < g->n_disks; i++)
                        (void) sd_bus_emit_object_removed(m->bus, g->disks[i]->object_path);
                (void) sd_bus_emit_object_removed(m->bus, g->object_path);
        }
        export_guest_removed(g);
        range_guest_removed(g);
        /* QEMU runs on without us: our NBD server goes, and with it every export on it (of the
         * Export objects, and of maps still being read). */
        if (had_server && guest_qmp_ready(g))
                (void) qemu_nbd_server_stop(g->qmp, NULL, NULL, NULL);
        /* QEMU drops commands it has not yet dispatched when its client disconnects: keep the
         * connection (bounded) until it answered them. An offline guest's storage helper is
         * killed below, and everything it served with it. */
        if (g->qmp && !g->offline && guest_qmp_ready(g)) {
                d = calloc(1, sizeof(*d));
                if (d) {
                        d->name = strdup(g->name);
                        if (!d->name)
                                d = mfree(d);
                }
                if (d) {
                        d->manager = m;
                        d->reply_to = sd_bus_message_ref(reply_to);
                        d->qmp = TAKE_PTR(g->qmp);
                        d->next = m->unregister_drains;
                        m->unregister_drains = d;
                } else
                        qmp_flush(g->qmp);
        }
        /* A deferred save must not bring the state file back. */
        g->save_pending = false;
        g->save_timer = sd_event_source_disable_unref(g->save_timer);
        r = guest_remove_state(g, m->guest_state_dir);
        if (r < 0)
                log_warning_errno(r, "Failed to remove the state file of guest %s: %m", g->name);
        if (g->runtime_dir)
                (void) rmdir(g->runtime_dir);
        manager_unlink_guest(m, g);
        guest_free(g);
        if (d)
                qmp_close_drained(d->qmp, MIN(m->config.qmp_timeout_usec, UNREGISTER_DRAIN_MAX_USEC),
                        unregister_drained, d);
        else if (reply_to)
                (void) sd_bus_reply_method_return(reply_to, NULL);
}

/* D-Bus */

static int method_unregister(sd_bus_message *msg, void *userdata, sd_bus_error *error) {
        Guest *g = userdata;
        int r;

        r = bus_authorize(g->manager->polkit, msg, ACTION_MANAGE,
                &(AuthDetails) { .guest = g->name, .owner = g->owner }, error);
        if (r < 0)
                return r;
        if (r == 0)
                return 1; /* polkit was asked; the call is dispatched again with its answer */
        if (guest_has_active_job(g))
                return sd_bus_error_setf(error, BS_ERROR_BUSY,
                        "A stream of guest '%s' is running; Cancel it first, then unregister.", g->name);
        guest_unregister(g, msg);
        return 1; /* answered once QEMU confirmed */
}

typedef struct RefreshCall {
        sd_bus_message *msg;
        bool replied;
} RefreshCall;

static void refresh_call_free(void *p) {
        RefreshCall *c = p;

        if (!c)
                return;
        if (!c->replied)
                (void) sd_bus_reply_method_errorf(c->msg, BS_ERROR_NOT_RUNNING,
                        "The connection to QEMU closed before it answered.");
        sd_bus_message_unref(c->msg);
        free(c);
}

static void refresh_call_done(Guest *g, int error, const char *desc, void *userdata) {
        RefreshCall *c = userdata;

        c->replied = true;
        if (error < 0)
                (void) sd_bus_reply_method_errorf(c->msg, BS_ERROR_QEMU_FAILED, "QEMU could not list its disks: %s",
                        desc ?: strerror(-error));
        else
                (void) sd_bus_reply_method_return(c->msg, NULL);
}

static int method_refresh(sd_bus_message *msg, void *userdata, sd_bus_error *error) {
        Guest *g = userdata;
        RefreshCall *c;
        int r;

        r = bus_authorize(g->manager->polkit, msg, ACTION_INSPECT, &(AuthDetails) { .guest = g->name, .owner = g->owner },
                error);
        if (r < 0)
                return r;
        if (r == 0)
                return 1; /* polkit was asked; the call is dispatched again with its answer */
        if (!g->running) {
                g->reconnect_attempts = 0;
                r = guest_connect(g);
                if (r == -EOPNOTSUPP)
                        return sd_bus_reply_method_return(msg, NULL); /* offline: nothing to re-read */
                if (r < 0)
                        return sd_bus_error_setf(error, BS_ERROR_NOT_RUNNING, "Guest '%s' is not running: %s.",
                                g->name, g->connect_error ?: strerror(-r));
                return sd_bus_error_setf(error, BS_ERROR_NOT_RUNNING,
                        "Guest '%s' was not connected; reconnecting to %s now, watch the Running property.", g->name,
                        g->qmp_socket);
        }
        c = calloc(1, sizeof(RefreshCall));
        if (!c)
                return -ENOMEM;
        c->msg = sd_bus_message_ref(msg);
        r = guest_refresh(g, refresh_call_done, c, refresh_call_free);
        if (r < 0) {
                c->replied = true;
                refresh_call_free(c);
                return sd_bus_error_set_errnof(error, -r, "Failed to ask QEMU for its disks: %m");
        }
        return 1;
}

static int property_get_disks(sd_bus *bus, const char *path, const char *interface, const char *property,
        sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        Guest *g = userdata;
        int r;

        r = sd_bus_message_open_container(reply, 'a', "o");
        if (r < 0)
                return r;
        for (size_t i = 0; i < g->n_disks; i++) {
                r = sd_bus_message_append(reply, "o", g->disks[i]->object_path);
                if (r < 0)
                        return r;
        }
        return sd_bus_message_close_container(reply);
}

/* The very string its helpers get as their exec label (storage.c, range.c): "" where SELinux is off. */
static int property_get_sandbox_label(sd_bus *bus, const char *path, const char *interface, const char *property,
        sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        Guest *g = userdata;
        return sd_bus_message_append(reply, "s", strempty(g->selinux_process_label));
}

static int property_get_owner(sd_bus *bus, const char *path, const char *interface, const char *property,
        sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        Guest *g = userdata;
        return sd_bus_message_append(reply, "u", (uint32_t) g->owner);
}

/* Not by offset: sd-bus reads "b" as a 4-byte int, our field is a bool. */
static int property_get_running(sd_bus *bus, const char *path, const char *interface, const char *property,
        sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        Guest *g = userdata;
        return sd_bus_message_append(reply, "b", (int) g->running);
}

static int property_get_str(sd_bus *bus, const char *path, const char *interface, const char *property,
        sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        char **s = userdata;
        return sd_bus_message_append(reply, "s", strempty(*s));
}

const sd_bus_vtable guest_vtable[] = {
        SD_BUS_VTABLE_START(0),
        SD_BUS_PROPERTY("Name", "s", property_get_str, offsetof(Guest, name), SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("UUID", "s", property_get_str, offsetof(Guest, uuid), SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("Owner", "u", property_get_owner, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("Running", "b", property_get_running, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("QMPSocket", "s", property_get_str, offsetof(Guest, qmp_socket), SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("Disks", "ao", property_get_disks, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("SandboxLabel", "s", property_get_sandbox_label, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_METHOD("Unregister", NULL, NULL, method_unregister, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD("Refresh", NULL, NULL, method_refresh, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_VTABLE_END,
};

int guest_object_find(sd_bus *bus, const char *path, const char *interface, void *userdata, void **found,
        sd_bus_error *error) {
        Manager *m = userdata;
        _cleanup_free_ char *name = NULL;
        Guest *g;
        int r;

        r = sd_bus_path_decode(path, GUEST_PATH_PREFIX, &name);
        if (r <= 0)
                return 0;
        g = manager_find_guest(m, name);
        if (!g || !g->published)
                return 0;
        *found = g;
        return 1;
}

int guest_node_enumerator(sd_bus *bus, const char *path, void *userdata, char ***nodes, sd_bus_error *error) {
        Manager *m = userdata;
        _cleanup_strv_free_ char **l = NULL;
        int r;

        for (Guest *g = m->guests; g; g = g->next) {
                if (!g->published)
                        continue;
                r = strv_push(&l, strdup(g->object_path));
                if (r < 0)
                        return r;
                for (size_t i = 0; i < g->n_disks; i++) {
                        r = strv_push(&l, strdup(g->disks[i]->object_path));
                        if (r < 0)
                                return r;
                }
        }
        if (!l && !(l = calloc(1, sizeof(char *))))
                return -ENOMEM;
        *nodes = TAKE_PTR(l);
        return 1;
}
