/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <fcntl.h>
#include <inttypes.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <systemd/sd-id128.h>

#include "bus-error.h"
#include "guest.h"
#include "image.h"
#include "engine.h"
#include "polkit.h"
#include "disk.h"
#include "util.h"

#define GUEST_SAVE_INTERVAL_USEC (100 * USEC_PER_MSEC)


int guest_new(Guest **ret, Engine *m, const char *name, const char *qmp_socket, uid_t owner, const char *uuid) {
        Guest *g;

        g = calloc(1, sizeof(Guest));
        if (!g)
                return -ENOMEM;
        g->engine = m;
        g->owner = owner;
        g->qmp_uid = UID_INVALID;
        g->qmp_peer_uid = UID_INVALID;
        g->qmp_proc_fd = -EBADF;
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
        peer_init(&g->peer, m->event, &m->config, g->name, m->runtime_dir, &guest_peer_owner, &guest_storage_source,
                g);
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
        if (g->peer.owner)
                peer_done(&g->peer);
        refresh_waiters_free(TAKE_PTR(g->refresh_pending));
        g->reconnect_timer = sd_event_source_disable_unref(g->reconnect_timer);
        g->poll_timer = sd_event_source_disable_unref(g->poll_timer);
        g->bus_drain_timer = sd_event_source_disable_unref(g->bus_drain_timer);
        if (g->save_pending) /* the daemon stops: what was deferred is written now */
                (void) guest_save(g);
        /* Steps that waited for a write of ours: they had this guest to go on with. */
        state_writer_forget(g->engine->state_writer, g);
        g->save_timer = sd_event_source_disable_unref(g->save_timer);
        if (g->register_call) {
                (void) sd_bus_reply_method_errorf(g->register_call, BS_ERROR_NOT_RUNNING,
                        "The daemon is shutting down; guest '%s' was not registered.", g->name);
                g->register_call = sd_bus_message_unref(g->register_call);
        }
        for (size_t i = 0; i < g->n_disks; i++)
                disk_free(g->disks[i]);
        closep(&g->qmp_proc_fd);
        free(g->disks);
        free(g->name);
        free(g->uuid);
        strv_free(g->disk_names);
        free(g->qmp_socket);
        free(g->connect_error);
        free(g->object_path);
        free(g->selinux_process_label);
        free(g->selinux_image_label);
        free(g->storage_process_label);
        free(g->storage_image_label);
        free(g->runtime_dir);
        free(g);
        return NULL;
}

bool guest_qmp_ready(Guest *g) {
        return peer_ready(&g->peer);
}

/* guest_when_ready(): the peer's waiter, with the guest's handler. */
typedef struct GuestReadyCtx {
        Guest *guest;
        guest_ready_handler_t handler;
        void *userdata;
        void (*destroy)(void *);
} GuestReadyCtx;

static void guest_ready_ctx_free(void *p) {
        GuestReadyCtx *c = p;

        if (c->destroy)
                c->destroy(c->userdata);
        free(c);
}

static void guest_ready(Peer *p, int error, const char *error_text, void *userdata) {
        GuestReadyCtx *c = userdata;

        c->handler(c->guest, error, error_text, c->userdata);
}

int guest_when_ready(Guest *g, guest_ready_handler_t handler, void *userdata, void (*destroy)(void *)) {
        GuestReadyCtx *c = calloc(1, sizeof(GuestReadyCtx));
        int r;

        if (!c)
                return -ENOMEM;
        *c = (GuestReadyCtx) { .guest = g, .handler = handler, .userdata = userdata, .destroy = destroy };
        r = peer_when_ready(&g->peer, guest_ready, c, guest_ready_ctx_free);
        if (r < 0)
                free(c); /* not queued: the caller keeps userdata */
        return r;
}

static void guest_ready_fresh(Guest *g, int error, const char *desc, void *userdata) {
        GuestReadyCtx *c = userdata;

        c->handler(g, error, error < 0 ? desc ?: "cannot read the guest's disks from QEMU" : NULL, c->userdata);
}

int guest_when_ready_fresh(Guest *g, guest_ready_handler_t handler, void *userdata, void (*destroy)(void *)) {
        GuestReadyCtx *c;
        int r;

        /* An offline guest's (or a handoff's) nodes are the storage helper's, named by us. */
        if (g->offline || g->handoff || !guest_qmp_ready(g))
                return guest_when_ready(g, handler, userdata, destroy);
        c = calloc(1, sizeof(GuestReadyCtx));
        if (!c)
                return -ENOMEM;
        *c = (GuestReadyCtx) { .guest = g, .handler = handler, .userdata = userdata, .destroy = destroy };
        r = guest_refresh(g, guest_ready_fresh, c, guest_ready_ctx_free);
        if (r < 0)
                free(c); /* not queued: the caller keeps userdata */
        return r;
}

void guest_release_helper_if_idle(Guest *g) {
        peer_release_helper_if_idle(&g->peer);
}

char **guest_forbidden_images(Guest *g) {
        return engine_guest_images(g->engine, g);
}

Disk *guest_find_disk(Guest *g, const char *name) {
        const char *id;

        if (!name)
                return NULL;
        for (size_t i = 0; i < g->n_disks; i++)
                if (streq(g->disks[i]->alias, name))
                        return g->disks[i];
        /* The name the guest's manager gives it (RegisterGuest's disk_names): never another
         * disk's alias, so the alias always wins. */
        id = disk_names_id_of(g->disk_names, name);
        for (size_t i = 0; id && i < g->n_disks; i++)
                if (streq(g->disks[i]->alias, id))
                        return g->disks[i];
        for (size_t i = 0; i < g->n_disks; i++)
                if (!isempty(g->disks[i]->path) && streq(g->disks[i]->path, name))
                        return g->disks[i];
        return NULL;
}

const char *guest_disk_target(Guest *g, const char *alias) {
        return strempty(disk_names_name_of(g->disk_names, alias));
}

const char *guest_disk_node_name(Guest *g, const char *name) {
        Disk *d = guest_find_disk(g, name);

        return d ? d->node_name : NULL;
}

bool guest_has_active_job(Guest *g) {
        for (size_t i = 0; i < g->n_disks; i++) {
                Disk *d = g->disks[i];
                if (job_is_active(&d->job) || d->starting || d->finalizing)
                        return true;
        }
        return false;
}

static int save(Guest *g, bool wait, state_writer_then_t then, void *userdata, void (*destroy)(void *)) {
        int r;

        /* Whatever was deferred is in this write too. */
        g->save_pending = false;
        if (g->save_timer)
                (void) sd_event_source_set_enabled(g->save_timer, SD_EVENT_OFF);
        if (!g->published)
                return 0;
        g->last_save = now_usec(CLOCK_MONOTONIC);
        r = guest_write_state(g, g->engine->guest_state_dir, wait, then, userdata, destroy);
        if (r < 0)
                return log_error_errno(r, "Failed to save the state of guest %s: %m", g->name);
        return 0;
}

int guest_save(Guest *g) {
        return save(g, true, NULL, NULL, NULL);
}

int guest_save_then(Guest *g, state_writer_then_t then, void *userdata, void (*destroy)(void *userdata)) {
        int r;

        if (!g->published) {
                /* Nothing to write: the next step follows at once. */
                then(userdata);
                if (destroy)
                        destroy(userdata);
                return 0;
        }
        r = save(g, false, then, userdata, destroy);
        if (r < 0) {
                /* Not queued (no memory): the old way, the write done before the next step. */
                (void) save(g, true, NULL, NULL, NULL);
                then(userdata);
                if (destroy)
                        destroy(userdata);
        }
        return 0;
}

static int save_handler(sd_event_source *s, uint64_t usec, void *userdata) {
        Guest *g = userdata;

        /* Nobody waits for a coalesced save: the writer thread does its fsyncs, not the loop. */
        (void) save(g, false, NULL, NULL, NULL); /* logs on failure */
        return 0;
}

void guest_save_later(Guest *g) {
        usec_t when;
        int r;

        if (!g->published || g->save_pending)
                return;
        when = MAX(now_usec(CLOCK_MONOTONIC), g->last_save + GUEST_SAVE_INTERVAL_USEC);
        if (!g->save_timer)
                r = sd_event_add_time(g->engine->event, &g->save_timer, CLOCK_MONOTONIC, when, 0, save_handler, g);
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

void guest_emit_changed(Guest *g, const char *property) {
        int r;

        if (!g->published)
                return;
        r = sd_bus_emit_properties_changed(g->engine->bus, g->object_path, GUEST_INTERFACE, property, NULL);
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
                (void) sd_bus_emit_object_removed(g->engine->bus, d->object_path);
        /* The maps' shared export goes too (maps still reading it fail: the disk is gone). */
        d->map_export_users = 0;
        disk_release_map_export(d);
        memmove(g->disks + i, g->disks + i + 1, (g->n_disks - i - 1) * sizeof(Disk *));
        g->n_disks--;
        disk_free(d);
}

/* Make our disks what QEMU says they are: update, add, remove. */
static int guest_apply_disks(Guest *g, const QemuDisk *qd, size_t n) {
        bool list_changed = false;
        int r;

        for (size_t i = 0; i < n; i++) {
                const char *named;
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
                r = disk_new(&d, g, &guest_disk_host, qd[i].alias);
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
                named = disk_names_id_of(g->disk_names, d->alias);
                if (named && !streq(named, d->alias))
                        log_warning("Guest %s: new disk %s has the name given to disk %s; that name means %s now.",
                                g->name, d->alias, named, d->alias);
                if (g->published)
                        (void) sd_bus_emit_object_added(g->engine->bus, d->object_path);
        }

        for (size_t j = g->n_disks; j > 0; j--) {
                Disk *d = g->disks[j - 1];
                bool present = false;

                for (size_t i = 0; i < n && !present; i++)
                        present = streq(qd[i].alias, d->alias);
                if (present)
                        continue;
                log_info("Guest %s: disk %s is gone from QEMU.", g->name, d->alias);
                if (d->starting)
                        g->engine->registry->start_lost(d);
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
        r = qemu_query_disks(g->peer.qmp, refresh_reply, c, refresh_ctx_free);
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
        /* No more than the guest's record can keep and a start read back: else the guest would be
         * dropped at the next start. */
        if (r >= 0 && qemu_disks_text(disks, n) > QEMU_DISKS_TEXT_MAX) {
                r = -E2BIG;
                desc = "QEMU reports more text of its disks (names, paths, backing chains) than is kept of a guest";
        }
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
                                 **claimed = engine_guest_claims(g->engine, g);
        size_t text = 0;
        int r;

        if (!forbidden || !claimed)
                return -ENOMEM;
        for (size_t i = 0; i < g->n_disks; i++) {
                _cleanup_(image_chain_done) ImageChain chain = {};
                _cleanup_free_ char *error = NULL;
                Disk *d = g->disks[i];

                /* As its owner (in a handoff, and its last QEMU) opens it: they may have named what only root reads. */
                r = storage_chain_open_handed_over(g->engine->config.image_dirs, g->owner,
                        g->handoff ? d->pin_uid : UID_INVALID, d->pin_dev, d->pin_ino, d->path, d->format, false,
                        forbidden, claimed, &chain, &error);
                if (r < 0) {
                        log_warning("Guest %s disk %s: cannot read the image chain: %s", g->name, d->alias,
                                error ?: strerror(-r));
                        continue;
                }
                text += disk_chain_text(d->alias, &chain);
                if (text > QEMU_DISKS_TEXT_MAX) {
                        log_warning("Guest %s: its disks' backing chains hold more text than is kept of a guest "
                                    "(%u bytes); not read again from disk %s on.",
                                g->name, QEMU_DISKS_TEXT_MAX, d->alias);
                        return -E2BIG;
                }
                r = disk_update_from_chain(d, &chain, true);
                if (r < 0)
                        return r;
        }
        (void) guest_save(g);
        return 0;
}

int guest_begin_handoff(Guest *g) {
        int r;

        if (g->offline)
                return -EINVAL;
        if (g->handoff)
                return 0;
        /* The storage helper names its nodes after the aliases, within QEMU's 31 characters. */
        for (size_t i = 0; i < g->n_disks; i++)
                if (strlen(g->disks[i]->alias) > GUEST_HANDOFF_ALIAS_MAX) {
                        log_warning("Guest %s disk %s: an alias longer than %d characters cannot be handed over.",
                                g->name, g->disks[i]->alias, GUEST_HANDOFF_ALIAS_MAX);
                        return -ENAMETOOLONG;
                }
        r = guest_check_pins(g);
        if (r < 0)
                return r;
        g->handoff = true;
        /* The disks as the helper will have them: chains from the headers, its node names. */
        r = guest_refresh_offline(g);
        if (r < 0) {
                g->handoff = false;
                return r;
        }
        log_info("Guest %s: QEMU went away while an export served; its storage helper takes the disks over.", g->name);
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

/* What a disk needs of its guest (disk.h). */

static const char *disk_host_name(Guest *g) {
        return g->name;
}

static bool disk_host_published(Guest *g) {
        return g->published;
}

static bool disk_host_offline(Guest *g) {
        return g->offline;
}

static Peer *disk_host_peer(Guest *g) {
        return &g->peer;
}

static sd_bus *disk_host_bus(Guest *g) {
        return g->engine->bus;
}

static sd_event *disk_host_event(Guest *g) {
        return g->engine->event;
}

static QemuInstance disk_host_qemu(Guest *g, uint64_t *ret_connection) {
        *ret_connection = g->qmp_connection;
        return g->qmp_qemu;
}

static ProgressBudget *disk_host_progress_budget(Guest *g) {
        return &g->engine->progress;
}

const DiskHost guest_disk_host = {
        .name = disk_host_name,
        .published = disk_host_published,
        .offline = disk_host_offline,
        .peer = disk_host_peer,
        .bus = disk_host_bus,
        .event = disk_host_event,
        .qmp_ready = guest_qmp_ready,
        .qemu = disk_host_qemu,
        .save = guest_save,
        .save_later = guest_save_later,
        .save_then = guest_save_then,
        .update_polling = guest_update_polling,
        .progress_budget = disk_host_progress_budget,
        .release_helper_if_idle = guest_release_helper_if_idle,
        .find_disk = guest_find_disk,
        .refresh = guest_refresh,
        .pivot_check = guest_pivot_check,
};

int guest_publish(Guest *g) {
        Engine *m = g->engine;
        int r;

        g->published = true;
        r = guest_write_state(g, g->engine->guest_state_dir, true, NULL, NULL, NULL);
        if (r < 0) {
                /* The caller hears the guest was not registered: the write the state writer would
                 * try again (or the file, renamed in but not synced) must not bring it back at the
                 * next start. A removal supersedes it. */
                (void) guest_remove_state(g, g->engine->guest_state_dir);
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
        Engine *engine;
        Qmp *qmp;
        sd_bus_message *reply_to;
        char *name;
        uid_t owner;
} UnregisterDrain;

#define UNREGISTER_DRAIN_MAX_USEC (10ULL * USEC_PER_SEC)
/* Each holds a QEMU's socket and the call's reply for up to UNREGISTER_DRAIN_MAX_USEC: a user who
 * registers guests on a QEMU of their own that never answers, and unregisters them in a loop,
 * would otherwise run the daemon out of fds. Beyond these, the connection is closed at once. */
#define UNREGISTER_DRAINS_MAX 256
#define UNREGISTER_DRAINS_PER_OWNER_MAX 16

/* Whether one more drain of owner's fits. */
static bool unregister_drain_fits(Engine *m, uid_t owner) {
        unsigned all = 0, mine = 0;

        for (UnregisterDrain *d = m->unregister_drains; d; d = d->next) {
                all++;
                mine += d->owner == owner;
        }
        return all < UNREGISTER_DRAINS_MAX && (owner == 0 || mine < UNREGISTER_DRAINS_PER_OWNER_MAX);
}

static void unregister_drain_free(UnregisterDrain *d) {
        UnregisterDrain **p;

        for (p = &d->engine->unregister_drains; *p; p = &(*p)->next)
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

void guest_unregister_drains_free(Engine *m) {
        while (m->unregister_drains) {
                UnregisterDrain *d = m->unregister_drains;
                d->qmp = qmp_close_unref(d->qmp);
                unregister_drain_free(d);
        }
}

void guest_unregister(Guest *g, sd_bus_message *reply_to) {
        Engine *m = g->engine;
        bool had_server = peer_nbd_server_running(&g->peer);
        UnregisterDrain *d = NULL;
        int r;

        log_info("Guest %s unregistered.", g->name);
        if (g->published) {
                for (size_t i = 0; i < g->n_disks; i++)
                        (void) sd_bus_emit_object_removed(m->bus, g->disks[i]->object_path);
                (void) sd_bus_emit_object_removed(m->bus, g->object_path);
        }
        peer_remove_all(&g->peer); /* its exports and range jobs stop */
        /* QEMU runs on without us: our NBD server goes, and with it every export on it (of the
         * Export objects, and of maps still being read). */
        if (had_server && guest_qmp_ready(g))
                (void) qemu_nbd_server_stop(g->peer.qmp, NULL, NULL, NULL);
        /* QEMU drops commands it has not yet dispatched when its client disconnects: keep the
         * connection (bounded) until it answered them. An offline guest's storage helper is
         * killed below, and everything it served with it. */
        if (g->peer.qmp && !g->offline && guest_qmp_ready(g)) {
                d = unregister_drain_fits(m, g->owner) ? calloc(1, sizeof(*d)) : NULL;
                if (d) {
                        d->name = strdup(g->name);
                        if (!d->name)
                                d = mfree(d);
                }
                if (d) {
                        d->engine = m;
                        d->owner = g->owner;
                        d->reply_to = sd_bus_message_ref(reply_to);
                        d->qmp = TAKE_PTR(g->peer.qmp);
                        d->next = m->unregister_drains;
                        m->unregister_drains = d;
                } else
                        qmp_flush(g->peer.qmp);
        }
        /* A deferred save must not bring the state file back. */
        g->save_pending = false;
        g->save_timer = sd_event_source_disable_unref(g->save_timer);
        r = guest_remove_state(g, m->guest_state_dir);
        if (r < 0)
                log_warning_errno(r, "Failed to remove the state file of guest %s: %m", g->name);
        if (g->runtime_dir)
                (void) rmdir(g->runtime_dir);
        engine_unlink_guest(m, g);
        /* The drain drops the calls' callbacks at once, and their destroy functions point into the
         * guest (a Refresh waiting for QEMU): before it goes. */
        if (d)
                qmp_close_drained(d->qmp, MIN(m->config.qmp_timeout_usec, UNREGISTER_DRAIN_MAX_USEC),
                        unregister_drained, d);
        else if (reply_to)
                (void) sd_bus_reply_method_return(reply_to, NULL);
        guest_free(g);
}

/* D-Bus */

static int method_unregister(sd_bus_message *msg, void *userdata, sd_bus_error *error) {
        Guest *g = userdata;
        int r;

        r = bus_authorize(g->engine->polkit, msg, ACTION_MANAGE,
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

        r = bus_authorize(g->engine->polkit, msg, ACTION_INSPECT, &(AuthDetails) { .guest = g->name, .owner = g->owner },
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
