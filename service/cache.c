/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* The host template cache (cache.h).
 *
 * Trust: the remote template's data is untrusted, and only QEMU in the sandbox parses it (the
 * image's backing is opened there). Each cache's helper has a sandbox identity of its own, from the
 * guests' allocator (manager-identity.c): a helper taken over by a hostile remote cannot signal,
 * trace or write into the memory of another cache's helper, a guest's or provisioning's (all of the
 * same uid could: /proc/PID/mem), so it cannot reach their images. Its image stays root's (0600, in
 * a directory of root's only): the helper gets it as an fd and needs no access by name.
 * The daemon creates the qcow2 image through fds beneath its own state directory and the listening
 * socket itself; the helper gets both as fds. Nothing it says is used as a path. */

#include <assert.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <json-c/json.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include "blockstream-api.h"
#include "bus-error.h"
#include "bus-util.h"
#include "cache-internal.h"
#include "cache.h"
#include "helper.h"
#include "image-format.h"
#include "polkit.h"
#include "provision.h"
#include "qemu.h"
#include "qmp.h"
#include "sandbox.h"
#include "storage.h"
#include "util.h"

#define CACHES_MAX 64
/* Cache numbers: 1 to this, in socket and image names. */
#define CACHE_ID_MAX 999999U
#define CACHES_FILE_MAX CACHES_RECORD_MAX
#define CACHE_RESTARTS_MAX 5
/* A helper that served this long before it died has its restarts counted from naught again. One
 * that dies as soon as it serves (a remote that kills it with its first reply) is restarted
 * CACHE_RESTARTS_MAX times, not forever: each restart holds the daemon's thread for two spawns. */
#define CACHE_SERVED_USEC (60 * USEC_PER_SEC)
#define LEFTOVER_POLL_USEC (20 * USEC_PER_MSEC)
#define LEFTOVER_WAIT_USEC (10 * USEC_PER_SEC)

static const char *const cache_state_table[] = {
        [CACHE_STARTING] = "starting",
        [CACHE_SERVING] = "serving",
        [CACHE_FAILED] = "failed",
};

const char *cache_state_name(const Cache *c) {
        return cache_state_table[c->state];
}

static int cache_spawn(Cache *c);

static char *caches_dir(Engine *e) {
        return strdup_printf("%s/caches", e->state_dir);
}

static int open_dir(const char *path, int *ret) {
        int r, fd;

        r = mkdir_p(path, 0700);
        if (r < 0)
                return r;
        fd = open(path, O_DIRECTORY | O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0)
                return -errno;
        *ret = fd;
        return 0;
}

static void emit_changed(Cache *c, const char *property) {
        if (c->engine->bus && c->object_path)
                (void) sd_bus_emit_properties_changed(c->engine->bus, c->object_path, CACHE_INTERFACE, property, NULL);
}

static void set_state(Cache *c, CacheState s) {
        if (c->state == s)
                return;
        c->state = s;
        emit_changed(c, BS_CACHE_PROPERTY_STATE);
}

/* Tell the waiting provisionings: go on over the socket, or why not. */
static void flush_waiters(Cache *c, int error, const char *why) {
        _cleanup_free_ char *backing = NULL;
        CacheWaiter *l = c->waiters;

        c->waiters = NULL;
        c->n_waiters = 0;
        if (error == 0 && !(backing = strdup_printf("nbd+unix:///%s?socket=%s", CACHE_EXPORT_NAME, c->socket_path)))
                error = -ENOMEM, why = "out of memory";
        while (l) {
                CacheWaiter *w = l;
                l = w->next;
                if (error == 0)
                        c->in_flight++;
                w->ready(w->provision, error, why, backing, c);
                free(w);
        }
}

/* A cache made for provisionings that all failed, with nobody waiting any more, goes away. */
static bool unwanted(Cache *c) {
        return c->fresh && c->users == 0 && c->in_flight == 0 && !c->waiters;
}

void cache_warm_reply(Cache *c, const char *error_name, const char *why) {
        if (!c->warm_call)
                return;
        if (error_name)
                (void) sd_bus_reply_method_errorf(c->warm_call, error_name, "Cannot warm cache %u: %s", c->id, why);
        else
                (void) sd_bus_reply_method_return(c->warm_call, NULL);
        c->warm_call = sd_bus_message_unref(c->warm_call);
}

/* The helper goes (killed and reaped at once); the cache stays unless the caller frees it. */
static void helper_gone(Cache *c) {
        cache_relay_stop(c);
        c->qmp = qmp_close_unref(c->qmp);
        c->child = helper_release(c->child);
        c->log = helper_log_free(c->log);
        c->leftover_timer = sd_event_source_disable_unref(c->leftover_timer);
        c->pid = 0;
        c->pending = 0;
        c->setup_failed = false;
}

static Cache *cache_free(Cache *c) {
        if (!c)
                return NULL;
        c->in_flight++; /* nothing a waiter does can free it again */
        flush_waiters(c, -ECANCELED, "the cache went away");
        cache_warm_reply(c, BS_ERROR_HELPER_FAILED, "the cache went away");
        helper_gone(c);
        closep(&c->image_fd);
        closep(&c->listen_fd);
        closep(&c->upstream_fd);
        cache_users_free(c);
        free(c->url);
        free(c->format);
        free(c->object_path);
        free(c->socket_path);
        free(c->upstream_path);
        free(c->image_name);
        free(c->process_label);
        free(c->image_label);
        free(c);
        return NULL;
}

static void cache_unlink(Cache *c) {
        for (Cache **p = &c->engine->caches; *p; p = &(*p)->next)
                if (*p == c) {
                        *p = c->next;
                        break;
                }
}

/* At the daemon's exit: QEMU's clean shutdown on SIGTERM flushes the image's metadata, so what the
 * cache holds is still there for the next daemon (a SIGKILL would lose the clusters copied since the
 * last flush: correct, but fetched again). Waited for here, bounded: the loop is ending anyway. */
static void helper_quit_sync(Cache *c) {
        struct pollfd p = {.events = POLLIN};

        if (!c->child || sd_event_source_send_child_signal(c->child, SIGTERM, NULL, 0) < 0)
                return;
        p.fd = sd_event_source_get_child_pidfd(c->child);
        if (p.fd >= 0)
                (void) poll(&p, 1, 10 * 1000);
}

void cache_free_all(Engine *e) {
        while (e->caches) {
                Cache *c = e->caches;
                e->caches = c->next;
                helper_quit_sync(c);
                cache_free(c);
        }
}

/* Whether id is another cache's, recorded or not: an image or a socket of that number is there.
 * Overlays name a cache by its socket: an id given twice would give them another template's data
 * (after a caches.json that could not be read, say). */
static bool cache_id_left(Engine *e, int dir_fd, unsigned id) {
        _cleanup_free_ char *image = strdup_printf("%u.qcow2", id),
                            *sock = strdup_printf("%s/caches/%u.sock", e->runtime_dir, id);
        struct stat st;

        if (!image || !sock)
                return true;
        return fstatat(dir_fd, image, &st, AT_SYMLINK_NOFOLLOW) == 0 || errno != ENOENT ||
               lstat(sock, &st) == 0 || errno != ENOENT;
}

static Cache *cache_find_id(Engine *e, unsigned id) {
        for (Cache *c = e->caches; c; c = c->next)
                if (c->id == id)
                        return c;
        return NULL;
}

/* Persistence: state_dir/caches.json, {"caches": [{"id", "url", "format", "size", "users", "overlays",
 * "warmed", "creator", "helper_uid", "mcs_c1", "mcs_c2"}], "last_id"}. */

/* A URL as recorded: its scheme, length and characters. A recorded cache whose URL a newer daemon
 * cannot give QEMU is still restored (its record, number and socket kept; it fails to start, and
 * says so), not dropped with its overlays' socket. */
static bool url_recorded_ok(const char *s) {
        if (strncmp(s, "nbd://", 6) != 0 && strncmp(s, "http://", 7) != 0 && strncmp(s, "https://", 8) != 0)
                return false;
        if (strlen(s) > 1023)
                return false;
        for (const char *p = s; *p; p++)
                if ((unsigned char) *p <= 0x20 || (unsigned char) *p >= 0x7f)
                        return false;
        return true;
}

/* A URL a new cache may have: one QEMU gets as we read it (cache_template_url_ok()). */
static bool url_ok(const char *s) {
        return url_recorded_ok(s) && cache_template_url_ok(s);
}

static int cache_new(Engine *e, unsigned id, const char *url, const char *format, uint64_t size, Cache **ret) {
        Cache *c;

        c = calloc(1, sizeof(Cache));
        if (!c)
                return -ENOMEM;
        c->engine = e;
        c->id = id;
        c->size = size;
        c->image_fd = -1;
        c->listen_fd = -1;
        c->upstream_fd = -1;
        c->relay_control_fd = -1;
        c->url = strdup(url);
        c->format = strdup(format);
        c->object_path = strdup_printf("%s/%u", CACHE_PATH_PREFIX, id);
        c->socket_path = strdup_printf("%s/caches/%u.sock", e->runtime_dir, id);
        c->upstream_path = strdup_printf("%s/cache-upstreams/%u.sock", e->runtime_dir, id);
        c->image_name = strdup_printf("%u.qcow2", id);
        if (!c->url || !c->format || !c->object_path || !c->socket_path || !c->upstream_path || !c->image_name) {
                cache_free(c);
                return -ENOMEM;
        }
        *ret = c;
        return 0;
}

/* The helper */

/* Callers return at once: a cache nobody wants any more is gone after this. */
static void cache_failed(Cache *c, const char *why) {
        _cleanup_free_ char *text = strdup_printf("the template cache failed: %s", why);

        log_error("Template cache %u (%s): %s", c->id, c->url, why);
        cache_warm_reply(c, BS_ERROR_HELPER_FAILED, why);
        set_state(c, CACHE_FAILED);
        flush_waiters(c, -EIO, text ?: why);
        if (unwanted(c))
                cache_destroy(c);
}

static void setup_reply(Qmp *q, int error, const char *desc, void *userdata) {
        Cache *c = userdata;

        if (error < 0 && !c->setup_failed) {
                c->setup_failed = true;
                log_error("Template cache %u: QEMU refused the setup: %s", c->id, desc ?: strerror(-error));
        }
        if (c->pending == 0 || --c->pending > 0)
                return;
        if (c->setup_failed) {
                helper_gone(c);
                cache_failed(c, "its storage helper could not open the cache image or serve it");
                return;
        }
        c->serving_since = now_usec(CLOCK_MONOTONIC);
        log_info("Template cache %u: serving %s on %s.", c->id, c->url, c->socket_path);
        set_state(c, CACHE_SERVING);
        c->in_flight++; /* held while the waiters make their overlays */
        flush_waiters(c, 0, NULL);
        c->in_flight--;
        if (unwanted(c))
                cache_destroy(c);
}

static void raw_reply(Qmp *q, int error, json_object *result, const char *cls, const char *desc, void *userdata) {
        setup_reply(q, error, desc, userdata);
}

static int call_raw(Cache *c, const char *command, json_object *args) {
        int r;

        if (!args)
                return -ENOMEM;
        r = qmp_call(c->qmp, command, args, -1, raw_reply, c, NULL);
        if (r >= 0)
                c->pending++;
        return r;
}

/* QMP is up: the image (fd) with the remote template as its backing (opened by QEMU here, in the
 * sandbox: cache_image_blockdev()), a copy-on-read filter on it, and that served read-only on our
 * socket. */
static int cache_setup(Cache *c) {
        int fd, r;

        fd = fcntl(c->image_fd, F_DUPFD_CLOEXEC, 3);
        if (fd < 0)
                return -errno;
        r = qemu_add_fd(c->qmp, 1, fd, "cache", setup_reply, c, NULL);
        if (r < 0)
                return r;
        c->pending++;
        r = qemu_blockdev_add_file(c->qmp, "cf", 1, false, setup_reply, c, NULL);
        if (r < 0)
                return r;
        c->pending++;
        if (!c->warmed) {
                r = call_raw(c, "blockdev-add", cache_template_file_blockdev(c->url));
                if (r < 0)
                        return r;
                r = call_raw(c, "blockdev-add", cache_template_blockdev(c->format));
                if (r < 0)
                        return r;
        }
        r = call_raw(c, "blockdev-add", cache_image_blockdev(c->warmed));
        if (r < 0)
                return r;
        r = call_raw(c, "blockdev-add", cache_blockdev_node("copy-on-read", "cor", "cache"));
        if (r < 0)
                return r;
        /* Its own socket: its clients are the relay's upstreams (cache-relay.c). */
        fd = fcntl(c->upstream_fd, F_DUPFD_CLOEXEC, 3);
        if (fd < 0)
                return -errno;
        r = qemu_getfd(c->qmp, "nbd", fd, setup_reply, c, NULL);
        if (r < 0)
                return r;
        c->pending++;
        r = qemu_nbd_server_start_fd(c->qmp, "nbd", CACHE_CLIENTS_MAX, setup_reply, c, NULL);
        if (r < 0)
                return r;
        c->pending++;
        r = qemu_block_export_add_nbd(c->qmp, "cache", "cor", CACHE_EXPORT_NAME, setup_reply, c, NULL);
        if (r < 0)
                return r;
        c->pending++;
        return 0;
}

static void on_qmp_state(Qmp *q, int error, void *userdata) {
        Cache *c = userdata;
        int r;

        if (error == 0) {
                r = cache_setup(c);
                if (r < 0) {
                        helper_gone(c);
                        cache_failed(c, !c->warmed && !cache_template_url_ok(c->url)
                                                ? "its URL, recorded by an older daemon, is not one this daemon can "
                                                  "give QEMU"
                                                : "cannot talk to its storage helper");
                }
                return;
        }
        /* The connection is gone (or QEMU did not answer in time): whatever the helper does
         * without a monitor, it does not do it for us; its child handler tells the rest. */
        c->qmp = qmp_close_unref(c->qmp);
        if (c->child)
                (void) helper_kill(c->child);
}

static void on_qmp_event(Qmp *q, const char *event, json_object *data, void *userdata) {
        Cache *c = userdata;
        json_object *o;

        if (!streq(event, "BLOCK_JOB_COMPLETED") && !streq(event, "BLOCK_JOB_CANCELLED"))
                return;
        if (!json_object_object_get_ex(data, "device", &o) || !json_object_is_type(o, json_type_string) ||
                !streq(json_object_get_string(o), "warm"))
                return;
        if (streq(event, "BLOCK_JOB_CANCELLED"))
                return cache_warm_reply(c, BS_ERROR_QEMU_FAILED, "the job was cancelled");
        if (json_object_object_get_ex(data, "error", &o)) {
                _cleanup_free_ char *why = text_sanitize(json_object_get_string(o), 1024, 200);
                return cache_warm_reply(c, BS_ERROR_QEMU_FAILED, why ?: "the job failed");
        }
        log_info("Template cache %u: warm, %s is no longer needed.", c->id, c->url);
        c->warmed = true;
        (void) caches_save(c->engine);
        cache_warm_reply(c, NULL, NULL);
}

static int child_handler(sd_event_source *s, const siginfo_t *si, void *userdata) {
        Cache *c = userdata;
        bool was_serving = c->state == CACHE_SERVING;

        c->child = sd_event_source_disable_unref(c->child);
        helper_gone(c);
        if (c->stopping)
                return 0;
        log_warning("Template cache %u: storage helper %s %i.", c->id,
                si->si_code == CLD_EXITED ? "exited with status" : "was killed by signal", si->si_status);
        cache_warm_reply(c, BS_ERROR_HELPER_FAILED, "its storage helper went away");
        /* One that served is brought back on the same socket; one that never did is not retried. */
        if (was_serving && now_usec(CLOCK_MONOTONIC) - c->serving_since >= CACHE_SERVED_USEC)
                c->restarts = 0;
        if (was_serving && c->restarts++ < CACHE_RESTARTS_MAX) {
                set_state(c, CACHE_STARTING);
                if (cache_spawn(c) >= 0)
                        return 0;
        }
        cache_failed(c, "its storage helper went away");
        return 0;
}

static uint64_t file_limit(uint64_t size) {
        return size + size / 64 + (UINT64_C(64) << 20);
}

static int helper_spawn_now(Cache *c) {
        const Config *cfg = &c->engine->config;
        _cleanup_free_ char *prefix = strdup_printf("Template cache %u helper", c->id);
        _cleanup_free_ char *name = strdup_printf("cache-%u", c->id);
        _cleanup_close_ int qmp_ours = -1;
        char *argv[] = {
                (char *) config_qemu_binary(cfg),
                (char *) "-machine",
                (char *) "none",
                (char *) "-nodefaults",
                (char *) "-no-user-config",
                (char *) "-display",
                (char *) "none",
                (char *) "-sandbox",
                (char *) "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
                (char *) "-chardev",
                (char *) "socket,id=m0,fd=3",
                (char *) "-mon",
                (char *) "chardev=m0,mode=control",
                NULL,
        };
        char *env[] = {(char *) SANDBOX_QEMU_MALLOC_TUNABLES, NULL}; /* its copy-on-read buffers */
        int r;

        if (!prefix || !name)
                return -ENOMEM;
        /* Its image labelled for its MCS pair on every start: a restored or new identity matches. */
        r = sandbox_selinux_label_fd(c->image_fd, c->image_label);
        if (r < 0)
                return log_error_errno(r, "Template cache %u: cannot label its image for the sandbox: %m", c->id);
        /* Its own identity, with the host network: it reaches the template's server, as the size
         * probe does. */
        r = helper_start(c->engine->event,
                &(HelperSpec){
                        .sandbox =
                                {
                                        .name = name,
                                        .uid = c->uid,
                                        .gid = (gid_t) c->uid,
                                        .host_network = true,
                                        .selinux_label = c->process_label,
                                        .argv = argv,
                                        .env = env,
                                        .exec_fd = -1,
                                        .max_address_space = SANDBOX_ADDRESS_SPACE_QEMU,
                                        /* It writes the cache image through its fd, its only writable
                                         * file: the template's size plus qcow2's metadata (with 64 KiB
                                         * clusters well under 1/64 of it) and headroom; a remote that
                                         * makes it write more is cut off (SIGXFSZ). */
                                        .max_file_size = file_limit(c->size),
                                },
                        .control_type = SOCK_STREAM,
                        .log_prefix = prefix,
                        .on_exit = child_handler,
                        .userdata = c,
                },
                &c->pid, &c->child, &qmp_ours, &c->log);
        if (r < 0)
                return r;
        r = qmp_new_from_fd(&c->qmp, c->engine->event, qmp_ours,
                &(QmpHandlers){.on_state = on_qmp_state, .on_event = on_qmp_event, .userdata = c});
        if (r < 0) {
                c->qmp = NULL;
                helper_gone(c);
                return r;
        }
        TAKE_FD(qmp_ours);
        qmp_set_timeout(c->qmp, cfg->qmp_timeout_usec);
        /* Its clients reach it through the relay only (cache-relay.c). */
        r = cache_relay_start(c);
        if (r < 0) {
                helper_gone(c);
                return r;
        }
        log_info("Template cache %u: storage helper started (pid %i), its relay (pid %i).", c->id, c->pid,
                c->relay_pid);
        return 0;
}

static int leftover_check(sd_event_source *s, uint64_t usec, void *userdata) {
        Cache *c = userdata;
        int r;

        r = storage_kill_leftovers(c->uid);
        if (r > 0 && now_usec(CLOCK_MONOTONIC) < c->leftover_deadline) {
                (void) sd_event_source_set_time_relative(s, LEFTOVER_POLL_USEC);
                (void) sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
                return 0;
        }
        c->leftover_timer = sd_event_source_disable_unref(c->leftover_timer);
        if (r == 0)
                r = helper_spawn_now(c);
        if (r != 0)
                cache_failed(c, "cannot start its storage helper");
        return 0;
}

/* A daemon restarted at once may find its predecessor's helper still exiting, with the image's
 * lock: wait for it to be gone, as the guests' storage helpers do. */
static int cache_spawn(Cache *c) {
        int r;

        if (c->uid == 0) {
                /* Restored without a usable one: a new identity before anything runs under it. */
                r = cache_identity_allocate(c);
                if (r < 0) {
                        c->uid = 0;
                        return log_error_errno(r, "Template cache %u: no sandbox identity: %m", c->id);
                }
                (void) caches_save(c->engine); /* logs */
        }
        r = storage_kill_leftovers(c->uid);
        if (r < 0)
                return r;
        if (r == 0)
                return helper_spawn_now(c);
        c->leftover_deadline = now_usec(CLOCK_MONOTONIC) + LEFTOVER_WAIT_USEC;
        return sd_event_add_time_relative(
                c->engine->event, &c->leftover_timer, CLOCK_MONOTONIC, LEFTOVER_POLL_USEC, 0, leftover_check, c);
}

void cache_destroy(Cache *c) {
        _cleanup_free_ char *dir = caches_dir(c->engine);
        _cleanup_close_ int dir_fd = -1;
        bool published = !c->fresh;

        c->stopping = true;
        helper_gone(c);
        (void) unlink(c->socket_path);
        (void) unlink(c->upstream_path);
        if (dir && open_dir(dir, &dir_fd) >= 0 && unlinkat(dir_fd, c->image_name, 0) < 0 && errno != ENOENT)
                log_warning_errno(errno, "Failed to remove template cache image %s/%s: %m", dir, c->image_name);
        cache_unlink(c);
        if (published && c->engine->bus)
                (void) sd_bus_emit_object_removed(c->engine->bus, c->object_path);
        (void) caches_save(c->engine);
        cache_free(c);
}

/* ProvisionDisk's hooks */

static int wait_for(Cache *c, uid_t caller, provision_cache_ready_t ready, void *provision) {
        CacheWaiter *w;

        w = calloc(1, sizeof(CacheWaiter));
        if (!w)
                return -ENOMEM;
        w->ready = ready;
        w->provision = provision;
        w->caller = caller;
        w->next = c->waiters;
        c->waiters = w;
        c->n_waiters++;
        return 0;
}

int cache_acquire(Engine *e, uid_t caller, const char *url, const char *format, uint64_t size,
        provision_cache_ready_t ready, void *provision, sd_bus_error *error) {
        _cleanup_free_ char *dir = NULL;
        _cleanup_free_ char *why = NULL;
        _cleanup_close_ int dir_fd = -1;
        unsigned n = 0, mine = 0, have, id;
        Cache *c = NULL;
        int r;

        if (!url_ok(url))
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                        "Option 'cache' is for remote templates only: nbd://HOST[:PORT][/EXPORT] (no query), "
                        "http:// or https://.");
        if (size == 0 || size > (UINT64_C(1) << 60))
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                        "A template of %" PRIu64 " bytes cannot be cached (at most 1 EiB).", size);
        for (Cache *k = e->caches; k; k = k->next, n++) {
                if (!c && streq(k->url, url) && streq(k->format, format))
                        c = k;
                mine += caller != 0 && k->creator == caller;
        }
        if (c && c->size != size)
                return sd_bus_error_setf(error, BS_ERROR_BUSY,
                        "The template %s has %" PRIu64 " bytes now, its cache %u was made for %" PRIu64
                        " bytes: templates must not change; stop the cache first.",
                        url, size, c->id, c->size);
        /* The overlays over caches are kept by path in the caches' record, which a start reads up to
         * 64 MiB of: one user's may not fill it (nor a cache's list, and its socket's ACL). Their
         * provisionings waiting for a cache to serve count. Looked at again only when the share
         * seems used up. */
        if (caller != 0 && cache_user_overlays(e, caller, false) >= cache_overlays_per_user_max() &&
                (have = cache_user_overlays(e, caller, true)) >= cache_overlays_per_user_max())
                return sd_bus_error_setf(error, SD_BUS_ERROR_LIMITS_EXCEEDED,
                        "You (uid " UID_FMT ") have %u overlays over template caches already, or being made "
                        "(at most %u per user); remove or stream one to the end first.",
                        caller, have, cache_overlays_per_user_max());
        /* An overlay the list has no room for would have its owner left out of the socket's ACL
         * (its QEMU could not read the template) and could never be let go of. Those gone since are
         * looked for first. */
        if (c && cache_users_full(c) && (cache_users_update(c), cache_users_full(c)))
                return sd_bus_error_setf(error, SD_BUS_ERROR_LIMITS_EXCEEDED,
                        "Template cache %u keeps track of as many overlays as it can (%u, and %u being made); "
                        "provision without 'cache', or remove or stream to the end an overlay over it first.",
                        c->id, (unsigned) c->n_user_list, c->in_flight + c->n_waiters);
        if (c && c->state == CACHE_FAILED && !c->child && !c->leftover_timer) {
                /* Asked for again: another try, on the same socket. */
                log_info("Template cache %u: starting its storage helper again.", c->id);
                c->restarts = 0;
                set_state(c, CACHE_STARTING);
                r = cache_spawn(c);
                if (r < 0) {
                        set_state(c, CACHE_FAILED);
                        return sd_bus_error_set_errnof(error, -r, "Cannot start the cache of %s: %m", url);
                }
        }
        if (!c) {
                _cleanup_close_ int fd = -1;

                bool created = false;
                unsigned tries = 0;

                if (n >= CACHES_MAX)
                        return sd_bus_error_setf(error, SD_BUS_ERROR_LIMITS_EXCEEDED,
                                "There are %u template caches already; stop one first.", n);
                /* Each is a QEMU of its own in the daemon's cgroup, for as long as an overlay uses it:
                 * one user may not take them all (URLs that differ only in an export name or a
                 * query are different templates). */
                if (caller != 0 && mine >= CACHES_PER_USER_MAX)
                        return sd_bus_error_setf(error, SD_BUS_ERROR_LIMITS_EXCEEDED,
                                "You (uid " UID_FMT ") made %u template caches already (at most %u per user); "
                                "provision over one of them, or without 'cache'.",
                                caller, mine, CACHES_PER_USER_MAX);
                dir = caches_dir(e);
                if (!dir)
                        return -ENOMEM;
                r = open_dir(dir, &dir_fd);
                if (r < 0)
                        return sd_bus_error_set_errnof(error, -r, "Cannot open %s for a cache of %s: %m", dir, url);
                id = e->cache_seq;
                do {
                        if (++tries > CACHE_ID_MAX)
                                return sd_bus_error_setf(error, SD_BUS_ERROR_LIMITS_EXCEEDED,
                                        "Every cache number is taken by an image or a socket in %s or %s/caches.", dir,
                                        e->runtime_dir);
                        id = id >= CACHE_ID_MAX ? 1 : id + 1;
                } while (cache_find_id(e, id) || cache_id_left(e, dir_fd, id));
                e->cache_seq = id;
                r = cache_new(e, id, url, format, size, &c);
                if (r < 0)
                        return r;
                c->fresh = true;
                c->creator = caller;
                r = cache_identity_allocate(c);
                if (r < 0) {
                        cache_free(c);
                        if (r == -ENOSPC)
                                return sd_bus_error_setf(error, SD_BUS_ERROR_LIMITS_EXCEEDED,
                                        "No sandbox identity left for a cache of %s: HelperUIDRange= or the MCS "
                                        "categories are exhausted.",
                                        url);
                        return sd_bus_error_set_errnof(
                                error, -r, "Failed to set up the sandbox identity of a cache of %s: %m", url);
                }
                fd = openat(dir_fd, c->image_name, O_CREAT | O_EXCL | O_NOFOLLOW | O_RDWR | O_CLOEXEC | O_NOCTTY, 0600);
                created = fd >= 0;
                r = fd < 0 ? -errno : image_write_qcow2_overlay(fd, size, url, format, &why);
                if (r >= 0) {
                        c->image_fd = TAKE_FD(fd);
                        r = cache_listen(c);
                }
                if (r >= 0)
                        r = cache_spawn(c);
                if (r < 0) {
                        if (created)
                                (void) unlinkat(dir_fd, c->image_name, 0);
                        (void) unlink(c->socket_path);
                        cache_free(c);
                        if (r == -ENOMEM)
                                return r;
                        return sd_bus_error_setf(
                                error, SD_BUS_ERROR_FAILED, "Cannot make a cache of %s: %s", url, why ?: strerror(-r));
                }
                c->next = e->caches;
                e->caches = c;
                cache_access_update(e);
                log_info("Template cache %u of %s made (%" PRIu64 " bytes).", c->id, url, size);
        }
        if (c->state == CACHE_SERVING) {
                _cleanup_free_ char *backing =
                        strdup_printf("nbd+unix:///%s?socket=%s", CACHE_EXPORT_NAME, c->socket_path);

                if (!backing)
                        return -ENOMEM;
                c->in_flight++;
                ready(provision, 0, NULL, backing, c);
                return 0;
        }
        r = wait_for(c, caller, ready, provision);
        if (r < 0 && unwanted(c))
                cache_destroy(c);
        return r;
}

bool cache_users_update(Cache *c) {
        int r = cache_users_refresh(c);

        if (r <= 0)
                return r != -EAGAIN;
        emit_changed(c, BS_CACHE_PROPERTY_USERS);
        (void) caches_save(c->engine);
        cache_access_update(c->engine);
        return true;
}

void cache_provisioned(Engine *e, void *handle, bool success, const char *target, const struct stat *st) {
        Cache *c = handle;

        assert(c->in_flight > 0);
        c->in_flight--;
        if (!success) {
                if (unwanted(c))
                        cache_destroy(c);
                return;
        }
        if (cache_user_add(c, target, st) < 0)
                log_oom(); /* counted still, never counted down */
        cache_access_update(e); /* its owner's QEMU may connect */
        if (c->fresh) {
                c->fresh = false;
                if (e->bus)
                        (void) sd_bus_emit_object_added(e->bus, c->object_path);
        } else
                emit_changed(c, BS_CACHE_PROPERTY_USERS);
        (void) caches_save(e);
}

/* Loading */

/* In the list, not started yet. */
static int load_one(Engine *e, int dir_fd, json_object *k) {
        json_object *o;
        const char *url, *format;
        uint64_t id, size, users = 0;
        struct stat st;
        Cache *c;
        int r;

        if (!json_object_is_type(k, json_type_object) || !json_object_object_get_ex(k, "id", &o) ||
                !json_object_is_type(o, json_type_int) || (id = json_object_get_uint64(o)) == 0 || id > CACHE_ID_MAX ||
                !json_object_object_get_ex(k, "url", &o) || !json_object_is_type(o, json_type_string) ||
                !url_recorded_ok(url = json_object_get_string(o)) || !json_object_object_get_ex(k, "format", &o) ||
                !json_object_is_type(o, json_type_string) ||
                (!streq(format = json_object_get_string(o), "raw") && !streq(format, "qcow2")) ||
                !json_object_object_get_ex(k, "size", &o) || !json_object_is_type(o, json_type_int) ||
                (size = json_object_get_uint64(o)) == 0 || size % 512 || size > (UINT64_C(1) << 60))
                return log_error_errno(-EINVAL, "A template cache in caches.json is malformed, skipping it.");
        if (json_object_object_get_ex(k, "users", &o) && json_object_is_type(o, json_type_int))
                users = MIN(json_object_get_uint64(o), (uint64_t) UINT32_MAX);
        if (cache_find_id(e, (unsigned) id))
                return log_error_errno(-EEXIST, "Template cache %" PRIu64 " is recorded twice, skipping it.", id);
        if (!config_template_url_allowed(&e->config, url))
                log_warning("Template cache %" PRIu64 ": %s is no longer in TemplateURLPrefixes=; overlays on it "
                            "keep working, new ones are not made over it.",
                        id, url);
        r = cache_new(e, (unsigned) id, url, format, size, &c);
        if (r < 0)
                return log_oom();
        r = cache_users_from_json(c, k, (unsigned) users);
        if (r < 0) {
                cache_free(c);
                return log_oom();
        }
        c->warmed = json_object_object_get_ex(k, "warmed", &o) && json_object_is_type(o, json_type_boolean) &&
                    json_object_get_boolean(o);
        if (json_object_object_get_ex(k, "creator", &o) && json_object_is_type(o, json_type_int) &&
                json_object_get_uint64(o) < UID_INVALID)
                c->creator = (uid_t) json_object_get_uint64(o);
        c->image_fd = openat(dir_fd, c->image_name, O_RDWR | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY);
        if (c->image_fd < 0 || fstat(c->image_fd, &st) < 0 || !S_ISREG(st.st_mode)) {
                log_error(
                        "Template cache %u: its image %s is missing or not a file, skipping it.", c->id, c->image_name);
                cache_free(c);
                return 0;
        }
        r = cache_identity_restore(c, k);
        if (r < 0) {
                cache_free(c);
                return log_oom();
        }
        c->next = e->caches;
        e->caches = c;
        e->cache_seq = MAX(e->cache_seq, c->id);
        log_info("Template cache %u of %s restored.", c->id, url);
        return 0;
}

/* Once all are loaded: one whose recorded identity was unusable gets a new one only now, so that
 * it never takes the identity another cache's record holds. */
static void start_restored(Cache *c) {
        int r;

        r = cache_listen(c);
        if (r >= 0) {
                cache_access_update(c->engine);
                r = cache_spawn(c);
        }
        if (r < 0)
                cache_failed(c, "cannot listen on its socket or start its storage helper");
}

int cache_load_all(Engine *e) {
        _cleanup_free_ char *path = strdup_printf("%s/caches.json", e->state_dir), *dir = caches_dir(e), *text = NULL;
        _cleanup_(json_object_putp) json_object *o = NULL;
        _cleanup_close_ int dir_fd = -1;
        json_object *a, *k;
        size_t len;
        int r;

        if (!path || !dir)
                return log_oom();
        r = read_file_bounded(path, CACHES_FILE_MAX, &text, &len);
        if (r == -ENOENT)
                return 0;
        if (r >= 0) {
                o = json_tokener_parse(text);
                if (!o || !json_object_object_get_ex(o, "caches", &a) || !json_object_is_type(a, json_type_array))
                        r = -EBADMSG;
        }
        if (r == -EBADMSG || r == -EFBIG || r == -EBADF || r == -ELOOP) {
                /* Kept for the admin, not overwritten by the next save; new caches take numbers
                 * no image or socket has (cache_id_left()), so no overlay gets another's data. */
                _cleanup_free_ char *aside = strdup_printf("%s.unreadable-%" PRIu64, path,
                        (uint64_t) (now_usec(CLOCK_REALTIME) / USEC_PER_SEC));

                if (!aside || rename(path, aside) < 0)
                        log_error_errno(aside ? -errno : -ENOMEM, "Failed to move %s aside: %m", path);
                return log_error_errno(r, "Cannot read %s (%m): no template cache restored; it was moved to %s.", path,
                        aside ?: "(nowhere)");
        }
        if (r < 0) {
                /* Unreadable now (EIO, EMFILE, ENOMEM): left as it is for the next start, and not
                 * overwritten by this daemon's saves (caches_save()). */
                e->caches_record_kept = true;
                return log_error_errno(r, "Cannot read %s now (%m): no template cache restored; the file is left for "
                                          "the next start, and new caches are not recorded in it.",
                        path);
        }
        /* The last number handed out: new caches go on from there, never back to one a cache that
         * was stopped had (its image and socket gone, an overlay nobody told us of may still name
         * its socket, and would read another template's blocks). */
        if (json_object_object_get_ex(o, "last_id", &k) && json_object_is_type(k, json_type_int) &&
                json_object_get_int64(k) >= 1 && json_object_get_int64(k) <= CACHE_ID_MAX)
                e->cache_seq = MAX(e->cache_seq, (unsigned) json_object_get_int64(k));
        r = open_dir(dir, &dir_fd);
        if (r < 0)
                return log_error_errno(r, "Failed to open %s: %m", dir);
        for (size_t i = 0; i < json_object_array_length(a) && i < CACHES_MAX; i++)
                (void) load_one(e, dir_fd, json_object_array_get_idx(a, i));
        for (Cache *c = e->caches, *next; c; c = next) {
                next = c->next; /* a restored cache is never freed by a failure (it is not fresh) */
                start_restored(c);
        }
        return 0;
}
