/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* A guest's disk and the life of its job as QEMU (or a range helper) reports it: its record
 * kept in step with QEMU's view, the job's changes applied and signalled, and a concluded job
 * finalized (recorded, dismissed, the chain re-read) and published. The BlockStream object's
 * methods and properties are stream.c's. */

#include <inttypes.h>
#include <stdarg.h>

#include "image.h"
#include "peer.h"
#include "blockstream-api.h"
#include "disk.h"
#include "progress-budget.h"
#include "util.h"

#define SAVE_PROGRESS_INTERVAL_USEC (5 * USEC_PER_SEC)
/* Progress signals: per disk at most every PROGRESS_MIN_INTERVAL_USEC, and all disks together
 * within the budget their host keeps (progress-budget.h: ProgressSignalsPerSecond=). */
#define PROGRESS_MIN_INTERVAL_USEC (250 * USEC_PER_MSEC)
/* A held-back value's timer may fire this much after the disk's turn (never before it), so that
 * many disks' timers share the loop's wake-ups. */
#define PROGRESS_TIMER_ACCURACY_USEC (50 * USEC_PER_MSEC)

int disk_new(Disk **ret, Guest *g, const DiskHost *host, const char *alias) {
        Disk *d;

        d = calloc(1, sizeof(Disk));
        if (!d)
                return -ENOMEM;
        d->guest = g;
        d->host = host;
        d->alias = strdup(alias);
        d->node_name = strdup("");
        d->path = strdup("");
        d->format = strdup("");
        d->throttle_reason = "off";
        d->chain = calloc(1, sizeof(char *));
        d->chain_nodes = calloc(1, sizeof(char *));
        if (!d->alias || !d->node_name || !d->path || !d->format || !d->chain || !d->chain_nodes ||
                sd_bus_path_encode_many(&d->object_path, GUEST_PATH_PREFIX "/%/%", host->name(g), alias) < 0) {
                disk_free(d);
                return -ENOMEM;
        }
        *ret = d;
        return 0;
}

void disk_stop_latency_mode(Disk *d) {
        if (d->adaptive && d->adaptive_stopper)
                d->adaptive_stopper(d);
}

Disk *disk_free(Disk *d) {
        if (!d)
                return NULL;
        disk_stop_latency_mode(d);
        if (d->mirror_wait && d->mirror_wait_free)
                d->mirror_wait_free(d->mirror_wait);
        d->progress_timer = sd_event_source_disable_unref(d->progress_timer);
        d->mirror_finalize_timer = sd_event_source_disable_unref(d->mirror_finalize_timer);
        job_done(&d->job);
        free(d->range_node);
        free(d->range_export);
        free(d->range_bottom);
        free(d->job_base);
        free(d->map_export);
        free(d->map_export_node);
        free(d->histogram_left);
        free(d->alias);
        free(d->object_path);
        free(d->node_name);
        free(d->path);
        free(d->file_path);
        free(d->format);
        free(d->pivot_qemu_name);
        free(d->pivot_path);
        strv_free(d->chain);
        strv_free(d->chain_nodes);
        free(d);
        return NULL;
}

static int replace_string(char **s, const char *v, bool *changed) {
        char *c;

        if (streq_ptr(*s, v))
                return 0;
        c = strdup(v);
        if (!c)
                return -ENOMEM;
        free(*s);
        *s = c;
        *changed = true;
        return 0;
}

/* What a pivot's record makes of QEMU's name for an image: its real path, if QEMU names the
 * record's fd set and the file checks out (asked once per update: *checked, -1 unknown). */
static const char *pivot_name(Disk *d, const char *name, bool *seen, int *checked) {
        if (!d->pivot_qemu_name || !streq_ptr(name, d->pivot_qemu_name))
                return name;
        *seen = true;
        if (*checked < 0) {
                *checked = d->host->pivot_check &&
                           d->host->pivot_check(d->guest, d->pivot_path, d->pivot_dev, d->pivot_ino);
                if (!*checked)
                        log_warning("Guest %s disk %s: QEMU names the image %s, but %s is no longer the file it "
                                    "opened so; showing QEMU's name.",
                                d->host->name(d->guest), d->alias, name, d->pivot_path);
        }
        return *checked ? d->pivot_path : name;
}

int disk_set_pivot(Disk *d, const char *qemu_name, const char *path, uint64_t dev, uint64_t ino) {
        _cleanup_free_ char *n = strdup(qemu_name), *p = strdup(path);
        bool changed = false;
        int r;

        if (!n || !p)
                return -ENOMEM;
        free(d->pivot_qemu_name);
        free(d->pivot_path);
        d->pivot_qemu_name = TAKE_PTR(n);
        d->pivot_path = TAKE_PTR(p);
        d->pivot_dev = dev;
        d->pivot_ino = ino;
        /* QEMU may have been asked since the pivot: its name goes now, not at the next refresh. */
        if (streq_ptr(d->path, qemu_name)) {
                r = replace_string(&d->path, path, &changed);
                if (r < 0)
                        return r;
                if (changed)
                        disk_emit_changed(d, "Path", NULL);
        }
        return 0;
}

int disk_update_from_qemu(Disk *d, const QemuDisk *q, bool emit) {
        _cleanup_strv_free_ char **chain = NULL, **nodes = NULL;
        bool node_changed = false, path_changed = false, chain_changed = false, size_changed = false, dummy = false;
        bool pivot_seen = false;
        int pivot_checked = -1;
        const char *filename;
        int r;

        chain = calloc(q->n_chain + 1, sizeof(char *));
        nodes = calloc(q->n_chain + 1, sizeof(char *));
        if (!chain || !nodes)
                return -ENOMEM;
        for (size_t i = 0; i < q->n_chain; i++) {
                chain[i] = strdup(pivot_name(d, q->chain[i].filename, &pivot_seen, &pivot_checked));
                nodes[i] = strdup(strempty(q->chain[i].node_name));
                if (!chain[i] || !nodes[i])
                        return -ENOMEM;
        }

        filename = pivot_name(d, q->filename, &pivot_seen, &pivot_checked);
        if ((r = replace_string(&d->node_name, q->node_name, &node_changed)) < 0 ||
                (r = replace_string(&d->path, filename, &path_changed)) < 0 ||
                (r = replace_string(&d->format, q->format, &dummy)) < 0)
                return r;
        if (!strv_equal(chain, d->chain)) {
                strv_free(d->chain);
                d->chain = TAKE_PTR(chain);
                chain_changed = true;
        }
        strv_free(d->chain_nodes);
        d->chain_nodes = TAKE_PTR(nodes);
        free(d->file_path);
        d->file_path = NULL;
        if (q->file && !(d->file_path = strdup(q->file)))
                return -ENOMEM;
        if (d->size != q->virtual_size) {
                d->size = q->virtual_size;
                size_changed = true;
        }
        d->cluster_size = q->cluster_size;
        d->names_by_qemu = q->names_by_qemu;
        if (d->pivot_qemu_name && !pivot_seen) {
                /* QEMU opened the image anew (by its path): the record has served. */
                d->pivot_qemu_name = mfree(d->pivot_qemu_name);
                d->pivot_path = mfree(d->pivot_path);
        }

        if (emit) {
                if (node_changed)
                        disk_emit_changed(d, "NodeName", NULL);
                if (path_changed)
                        disk_emit_changed(d, "Path", NULL);
                if (chain_changed)
                        disk_emit_changed(d, "BackingChain", NULL);
                if (size_changed)
                        disk_emit_changed(d, "Size", NULL);
        }
        return node_changed || path_changed || chain_changed || size_changed;
}

size_t disk_chain_text(const char *alias, const ImageChain *c) {
        size_t n = 0;

        for (size_t k = 0; k < c->n; k++)
                n += strlen(c->images[k].path) + strlen(alias) + 16;
        return n;
}

int disk_update_from_chain(Disk *d, const ImageChain *c, bool emit) {
        _cleanup_free_ char *node = strdup_printf("bs-%s", d->alias);
        QemuDisk q = {
                .alias = d->alias,
                .node_name = node,
                .filename = c->images[0].path,
                .format = c->images[0].format,
                .virtual_size = c->images[0].virtual_size,
                .cluster_size = c->images[0].cluster_size,
        };
        QemuImage *chain = NULL;
        int r;

        if (!node)
                return -ENOMEM;
        if (c->n > 1) {
                chain = calloc(c->n - 1, sizeof(QemuImage));
                if (!chain)
                        return -ENOMEM;
                for (size_t k = 1; k < c->n; k++) {
                        chain[k - 1].filename = c->images[k].path;
                        chain[k - 1].format = c->images[k].format;
                        /* The storage helper names them so (storage.c). */
                        chain[k - 1].node_name = strdup_printf("bs-%s-%zu", d->alias, k);
                        if (!chain[k - 1].node_name) {
                                r = -ENOMEM;
                                goto finish;
                        }
                }
        }
        q.chain = chain;
        q.n_chain = c->n ? c->n - 1 : 0;
        r = disk_update_from_qemu(d, &q, emit);
finish:
        for (size_t k = 0; chain && k + 1 < c->n; k++)
                free(chain[k].node_name);
        free(chain);
        return r;
}

void disk_emit_changed(Disk *d, const char *first, ...) {
        _cleanup_strv_free_ char **names = NULL;
        va_list ap;
        int r;

        if (!d->host->published(d->guest))
                return;
        va_start(ap, first);
        for (const char *n = first; n; n = va_arg(ap, const char *))
                if (strv_push(&names, strdup(n)) < 0) {
                        va_end(ap);
                        log_oom();
                        return;
                }
        va_end(ap);
        r = sd_bus_emit_properties_changed_strv(d->host->bus(d->guest), d->object_path, STREAM_INTERFACE, names);
        if (r < 0)
                log_debug_errno(r, "Failed to emit PropertiesChanged for %s: %m", d->object_path);
}

void disk_release_map_export(Disk *d) {
        if (d->map_export && d->map_export_releaser)
                d->map_export_releaser(d);
}

bool disk_backing_remote(const Disk *d, const char *bottom) {
        for (size_t i = 0; d->chain && d->chain[i]; i++) {
                if (qemu_image_name_remote(d->chain[i]))
                        return true;
                if (bottom && d->chain_nodes && d->chain_nodes[i] && streq(d->chain_nodes[i], bottom))
                        break;
        }
        return false;
}

/* The budget all disks share, kept by whoever hosts them (no host's budget: the per-disk limit). */
static usec_t progress_interval(Disk *d, usec_t now) {
        ProgressBudget *b = d->host->progress_budget ? d->host->progress_budget(d->guest) : NULL;

        return b ? progress_budget_interval(b, &d->progress_window, PROGRESS_MIN_INTERVAL_USEC, now)
                 : PROGRESS_MIN_INTERVAL_USEC;
}

static void disk_emit_progress(Disk *d);

static int progress_timer_handler(sd_event_source *s, uint64_t usec, void *userdata) {
        Disk *d = userdata;

        if (d->progress_pending)
                disk_emit_progress(d); /* armed again if the turn moved on (more disks report now) */
        return 0;
}

static void progress_timer_disarm(Disk *d) {
        if (d->progress_timer)
                (void) sd_event_source_set_enabled(d->progress_timer, SD_EVENT_OFF);
}

/* The held-back value goes out at `when` even if no newer one comes to carry it (a range's
 * source that stalls, a paused helper's last report). Without a timer (none to be had, or no
 * loop), as before: the next value, or a state change, carries it. */
static void progress_timer_arm(Disk *d, usec_t when) {
        sd_event *e;
        int enabled = SD_EVENT_OFF, r;

        if (d->progress_timer && sd_event_source_get_enabled(d->progress_timer, &enabled) >= 0 &&
                enabled != SD_EVENT_OFF)
                return; /* armed: the handler looks at the turn again when it fires */
        if (d->progress_timer) {
                r = sd_event_source_set_time(d->progress_timer, when);
                if (r >= 0)
                        r = sd_event_source_set_enabled(d->progress_timer, SD_EVENT_ONESHOT);
        } else {
                e = d->host->event ? d->host->event(d->guest) : NULL;
                if (!e)
                        return;
                r = sd_event_add_time(e, &d->progress_timer, CLOCK_MONOTONIC, when, PROGRESS_TIMER_ACCURACY_USEC,
                        progress_timer_handler, d);
                if (r >= 0)
                        (void) sd_event_source_set_description(d->progress_timer, "disk-progress");
        }
        if (r < 0)
                log_debug_errno(r, "Guest %s disk %s: no timer for held-back progress, the next value carries it: %m",
                        d->host->name(d->guest), d->alias);
}

/* BytesDone and the counters that move with it: held back until the disk's turn comes (a Get
 * reads the current value all the same; a state change or Finished sends all of them at once). */
static void disk_emit_progress(Disk *d) {
        usec_t now = now_usec(CLOCK_MONOTONIC), interval = progress_interval(d, now);

        if (now - d->progress_emitted < interval) {
                d->progress_pending = true;
                progress_timer_arm(d, d->progress_emitted + interval);
                return;
        }
        d->progress_pending = false;
        progress_timer_disarm(d);
        d->progress_emitted = now;
        disk_emit_changed(d, "BytesDone", "BytesTotal", "Rate", "ExpectedEndTime", NULL);
}

void disk_emit_job(Disk *d) {
        /* Carries the progress too: whatever was held back is out now. */
        d->progress_pending = false;
        progress_timer_disarm(d);
        d->progress_emitted = now_usec(CLOCK_MONOTONIC);
        disk_emit_changed(d, "State", "Mode", "Offset", "Length", "BytesDone", "BytesTotal", "Bandwidth", "Rate",
                "StartTime", "ExpectedEndTime", "Error", "Engine", NULL);
}

void disk_save(Disk *d) {
        d->last_saved = now_usec(CLOCK_MONOTONIC);
        (void) d->host->save(d->guest);
}

void disk_save_later(Disk *d) {
        d->last_saved = now_usec(CLOCK_MONOTONIC);
        d->host->save_later(d->guest);
}

/* Finishing a job: persist the outcome, dismiss the job in QEMU, re-read the chain if it
 * changed, and only then publish, so that a client woken by Finished sees the new chain. */

typedef struct FinalizeCtx {
        Guest *guest;
        const DiskHost *host;
        char *alias;
} FinalizeCtx;

static void finalize_ctx_free(void *p) {
        FinalizeCtx *c = p;

        if (!c)
                return;
        free(c->alias);
        free(c);
}

static FinalizeCtx *finalize_ctx_new(Disk *d) {
        FinalizeCtx *c = calloc(1, sizeof(FinalizeCtx));

        if (!c)
                return NULL;
        c->guest = d->guest;
        c->host = d->host;
        c->alias = strdup(d->alias);
        if (!c->alias)
                return mfree(c);
        return c;
}

/* The outcome, recorded as published, is on disk: now Finished goes out (a crash before this
 * point publishes it after the restart instead; never both). */
static void publish_saved(void *userdata) {
        FinalizeCtx *c = userdata;
        Disk *d = c->host->find_disk(c->guest, c->alias);
        int r;

        if (!d || !d->publishing)
                return;
        d->publishing = false;
        d->finalizing = false;
        disk_emit_job(d);
        if (d->host->published(d->guest)) {
                r = sd_bus_emit_signal(d->host->bus(d->guest), d->object_path, STREAM_INTERFACE, "Finished", "sts",
                        stream_state_to_string(d->job.state), d->job.done, strempty(d->job.error));
                if (r < 0)
                        log_warning_errno(r, "Failed to emit Finished for %s: %m", d->object_path);
        }
        d->host->update_polling(d->guest);
        d->host->release_helper_if_idle(d->guest);
}

static void disk_publish_now(Disk *d) {
        FinalizeCtx *c;

        if (d->publishing)
                return; /* on its way */
        d->releasing = false;
        if (!job_publish_outcome(&d->job)) {
                d->finalizing = false;
                return;
        }
        log_info("Guest %s disk %s: stream %s (%" PRIu64 " of %" PRIu64 " bytes)%s%s", d->host->name(d->guest),
                d->alias, stream_state_to_string(d->job.state), d->job.done, d->job.total, d->job.error ? ": " : "",
                strempty(d->job.error));
        /* Still finalizing until Finished is out: no next job may begin before it, so the
         * outcome Finished tells is this one's. */
        d->finalizing = true;
        d->publishing = true;
        d->last_saved = now_usec(CLOCK_MONOTONIC);
        c = finalize_ctx_new(d);
        if (c) {
                (void) d->host->save_then(d->guest, publish_saved, c, finalize_ctx_free);
                return;
        }
        disk_save(d);
        {
                FinalizeCtx now = { .guest = d->guest, .host = d->host, .alias = d->alias };
                publish_saved(&now);
        }
}

static void disk_publish_outcome(Disk *d) {
        Guest *g = d->guest;

        d->finalizing = false;
        /* A guest that is not running: its storage helper holds the images' locks until it quits.
         * Whoever starts the VM at Finished (pull --wait, then boot) must find them free, so the
         * outcome waits for the helper to go when nothing else needs it. */
        if (d->host->offline(g) && peer_has_helper(d->host->peer(g)) && d->job.concluded) {
                d->releasing = true;
                d->host->release_helper_if_idle(g);
                return;
        }
        disk_publish_now(d);
}

void disk_publish_released(Disk *d) {
        if (d->releasing)
                disk_publish_now(d);
}

static void finalize_refreshed(Guest *g, int error, const char *desc, void *userdata) {
        FinalizeCtx *c = userdata;
        Disk *d = c->host->find_disk(c->guest, c->alias);

        if (error < 0)
                log_warning_errno(error, "Guest %s: could not re-read disks after a stream: %s", c->host->name(g),
                        desc ?: strerror(-error));
        if (d)
                disk_publish_outcome(d);
}

static void finalize_dismissed(Qmp *q, int error, const char *desc, void *userdata) {
        FinalizeCtx *c = userdata;
        Disk *d = c->host->find_disk(c->guest, c->alias);
        FinalizeCtx *c2;

        if (!d)
                return;
        if (error < 0 && error != -EREMOTEIO)
                log_debug_errno(error, "Guest %s disk %s: job-dismiss got no answer: %m", c->host->name(c->guest),
                        d->alias);
        d->job.id = mfree(d->job.id);
        if (d->job.outcome == STREAM_COMPLETED && (c->host->qmp_ready(c->guest) || c->host->offline(c->guest))) {
                c2 = finalize_ctx_new(d);
                if (c2 && c->host->refresh(c->guest, finalize_refreshed, c2, finalize_ctx_free) >= 0)
                        return;
                finalize_ctx_free(c2);
        }
        disk_publish_outcome(d);
}

/* The outcome is on disk: a crash from here on finds it. Now QEMU may forget the job. */
static void finalize_saved(void *userdata) {
        FinalizeCtx *s = userdata;
        Disk *d = s->host->find_disk(s->guest, s->alias);
        Guest *g;
        FinalizeCtx *c;

        if (!d || !d->finalizing)
                return;
        g = d->guest;
        if (d->job.id && d->host->qmp_ready(g)) {
                c = finalize_ctx_new(d);
                if (c &&
                        qemu_job_dismiss(d->host->peer(g)->qmp, d->job.id, finalize_dismissed, c, finalize_ctx_free) >= 0)
                        return;
                finalize_ctx_free(c);
        }
        d->job.id = mfree(d->job.id);
        disk_publish_outcome(d);
}

static void disk_finalize(Disk *d) {
        FinalizeCtx *c;

        if (d->finalizing)
                return;
        d->finalizing = true;
        disk_release_map_export(d); /* the job no longer runs: maps may drain the node again */
        disk_stop_latency_mode(d); /* the guest-latency mode ends with the job */
        d->host->update_polling(d->guest);
        /* The outcome is written before the job is dismissed in QEMU, by the state writer: the
         * loop serves other calls meanwhile (Start gets Busy while finalizing). */
        d->last_saved = now_usec(CLOCK_MONOTONIC);
        c = finalize_ctx_new(d);
        if (c) {
                (void) d->host->save_then(d->guest, finalize_saved, c, finalize_ctx_free);
                return;
        }
        disk_save(d);
        {
                FinalizeCtx now = { .guest = d->guest, .host = d->host, .alias = d->alias };
                finalize_saved(&now);
        }
}

static void apply_job_changes(Disk *d, unsigned changed, bool lazy) {
        if (changed & JOB_NOW_CONCLUDED) {
                disk_finalize(d);
                return;
        }
        if (changed & JOB_CHANGED_STATE) {
                disk_emit_job(d);
                if (lazy)
                        disk_save_later(d);
                else
                        disk_save(d);
        } else if (changed & JOB_CHANGED_PROGRESS) {
                disk_emit_progress(d);
                if (now_usec(CLOCK_MONOTONIC) - d->last_saved >= SAVE_PROGRESS_INTERVAL_USEC)
                        disk_save_later(d);
        }
        if ((changed & JOB_CHANGED_ERROR) && !(changed & JOB_CHANGED_STATE)) {
                disk_emit_changed(d, "Error", NULL);
                disk_save_later(d);
        }
}

void disk_apply_job_changes(Disk *d, unsigned changed) {
        apply_job_changes(d, changed, false);
}

/* QEMU decides how often these come: the signal goes per change, the write is coalesced (a
 * crash within GUEST_SAVE_INTERVAL_USEC loses a pause or resume that the next connect reads
 * from QEMU again). Our own changes (a job begun, Pause of a range) are written at once. */
void disk_apply_qemu_job_changes(Disk *d, unsigned changed) {
        apply_job_changes(d, changed, true);
}

void disk_fail_job(Disk *d, const char *error) {
        unsigned changed = job_conclude(&d->job, STREAM_FAILED, error);

        if (changed & JOB_NOW_CONCLUDED) {
                /* Nothing left to dismiss: QEMU no longer has the job. */
                d->job.id = mfree(d->job.id);
                disk_apply_job_changes(d, changed);
        }
}
