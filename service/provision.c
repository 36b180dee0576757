/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* ProvisionDisk: a thin qcow2 overlay on a template, the "instant-on" step.
 *
 * Nothing untrusted is ever opened as root by path, and no root process is given a path:
 *  - the target is created through file descriptors from its image directory down: the parent
 *    directory opened with openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_XDEV), the file
 *    with openat(O_CREAT|O_EXCL|O_NOFOLLOW), owner and mode set on that fd, the qcow2 header
 *    written into it by image.c; a failure removes it, as the caller, only if the name still is
 *    that file;
 *  - a template that is a file is read by image.c (its whole chain inside the image directories,
 *    no symlinks, no other guest's disk), and only if the caller could read every image of the
 *    chain itself (the chain is opened in our thread with the caller's uid and groups as its
 *    file-system identity, fs-identity.h, as are the target's directory and the target);
 *  - a template behind a URL must match the administrator's TemplateURLPrefixes=, and is asked
 *    for its size by `qemu-img info` in a sandbox with a provisioning uid of its own (a remote
 *    server's answers are untrusted). */

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "bus-error.h"
#include "bus-util.h"
#include "fs-identity.h"
#include "helper.h"
#include "image.h"
#include "provision.h"
#include "qemu.h"
#include "sandbox.h"
#include "storage.h"
#include "util.h"

#define OUTPUT_MAX (256U * 1024U)
/* How long a probe may take: `qemu-img info` of a reachable server answers within a second; one
 * that connects and never answers would otherwise hold the call, the process and its uid, one of
 * the PROBES_MAX, for ever. */
#define PROBE_TIMEOUT_SEC 60U
/* And each lives in the daemon's cgroup: a bounded address space (`qemu-img info` of an NBD, HTTP
 * or HTTPS template runs in 64 MiB; the rest is room for a large qcow2's tables), and a bounded
 * number at once, so that hostile servers cannot make the probes take the memory the guests'
 * storage helpers need. */
#define PROBE_ADDRESS_SPACE (UINT64_C(256) << 20)
#define PROBES_MAX HELPER_UIDS_PROBES /* one uid each */
#define BACKING_NAME_MAX 1023 /* qcow2's limit for the backing file name */
#define CALLER_GROUPS_MAX 1024

/* The probes running, all Provisions' (the daemon has one event loop): bit i runs as
 * HelperUIDRange='s top uid less i, its own until it has exited; for probe_callers[i]. */
static unsigned probe_slots;
static uid_t probe_callers[PROBES_MAX];
/* A caller other than root has this many at once: one (a loop of calls at a server that never
 * answers) may not keep everyone else's URL provisioning Busy. */
#define PROBES_PER_CALLER_MAX 2U

typedef struct Provision {
        const Config *config;
        sd_event *event;
        sd_bus_message *call;
        char *template;
        char *format;
        char *target;
        uid_t caller;
        uint64_t size;
        bool use_cache;
        ProvisionCache cache;
        uint64_t requested; /* with a cache: option 'size' (0: none), the overlay's; p->size is the template's */
        gid_t gid;     /* a caller other than root: its gid and groups, for what is done as it */
        gid_t *gids;
        size_t n_gids;
        int dir_fd; /* the target's directory, opened beneath its image directory */
        char *leaf; /* the target's name in it */
        pid_t pid;
        sd_event_source *child;
        sd_event_source *deadline; /* the probe's */
        bool probing; /* holds probe_slots' bit `slot` */
        unsigned slot;
        bool timed_out;
        int out_fd; /* the probe's stdout */
        sd_event_source *out_source;
        char *out;
        size_t out_len;
} Provision;

static void probe_ended(Provision *p) {
        if (!p->probing)
                return;
        p->probing = false;
        probe_slots &= ~(1U << p->slot);
}

static unsigned probes_running(void) {
        return (unsigned) __builtin_popcount(probe_slots);
}

static unsigned probes_of(uid_t caller) {
        unsigned n = 0;

        for (unsigned slot = 0; slot < PROBES_MAX; slot++)
                n += (probe_slots & (1U << slot)) && probe_callers[slot] == caller;
        return n;
}

static Provision *provision_free(Provision *p) {
        if (!p)
                return NULL;
        if (p->call) {
                (void) sd_bus_reply_method_errorf(p->call, SD_BUS_ERROR_FAILED, "Provisioning %s was interrupted.",
                        p->target);
                sd_bus_message_unref(p->call);
        }
        helper_release(p->child); /* killed and reaped if still running */
        probe_ended(p); /* its uid is free once it is gone */
        sd_event_source_disable_unref(p->deadline);
        sd_event_source_disable_unref(p->out_source);
        closep(&p->out_fd);
        closep(&p->dir_fd);
        free(p->gids);
        free(p->leaf);
        free(p->template);
        free(p->format);
        free(p->target);
        free(p->out);
        free(p);
        return NULL;
}

static void provision_fail(Provision *p, const char *name, const char *what) {
        (void) sd_bus_reply_method_errorf(p->call, name, "Cannot provision %s: %s", p->target, what);
        p->call = sd_bus_message_unref(p->call);
        provision_free(p);
}

static bool is_url(const char *s) {
        return strncmp(s, "nbd://", 6) == 0 || strncmp(s, "nbd+unix://", 11) == 0 || strncmp(s, "http://", 7) == 0 ||
               strncmp(s, "https://", 8) == 0;
}

static bool url_valid(const char *s) {
        if (strlen(s) > BACKING_NAME_MAX)
                return false;
        for (const char *c = s; *c; c++)
                if ((unsigned char) *c <= 0x20 || (unsigned char) *c >= 0x7f)
                        return false;
        return true;
}

static int out_handler(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        Provision *p = userdata;
        char buf[4096];
        ssize_t n = read(fd, buf, sizeof(buf));

        if (n < 0 && (errno == EAGAIN || errno == EINTR))
                return 0;
        if (n <= 0) {
                p->out_source = sd_event_source_disable_unref(p->out_source);
                return 0;
        }
        if (p->out_len + (size_t) n > OUTPUT_MAX)
                return 0; /* bounded: the rest is dropped */
        memcpy(p->out + p->out_len, buf, (size_t) n);
        p->out_len += (size_t) n;
        p->out[p->out_len] = 0;
        return 0;
}

/* Drain what is left in the pipe (the child is gone, so this cannot block for long). */
static void out_drain(Provision *p) {
        for (;;) {
                char buf[4096];
                ssize_t n = read(p->out_fd, buf, sizeof(buf));
                if (n <= 0)
                        break;
                if (p->out_len + (size_t) n <= OUTPUT_MAX) {
                        memcpy(p->out + p->out_len, buf, (size_t) n);
                        p->out_len += (size_t) n;
                        p->out[p->out_len] = 0;
                }
        }
}

/* Collect the child's stdout from out_fd (taken) into p->out. */
static int watch_output(Provision *p, int out_fd) {
        p->out_fd = out_fd;
        p->out_len = 0;
        if (!p->out && !(p->out = malloc(OUTPUT_MAX + 1)))
                return -ENOMEM;
        p->out[0] = 0;
        if (fcntl(out_fd, F_SETFL, O_NONBLOCK) < 0)
                return -errno;
        return sd_event_add_io(p->event, &p->out_source, out_fd, EPOLLIN, out_handler, p);
}

/* Step 2: the overlay, created and written through file descriptors only. */

typedef struct Remove {
        int dir_fd;
        const char *leaf;
        const struct stat *created;
} Remove;

static int remove_target(void *userdata) {
        Remove *rm = userdata;
        struct stat st;

        if (fstatat(rm->dir_fd, rm->leaf, &st, AT_SYMLINK_NOFOLLOW) < 0)
                return -errno;
        if (st.st_dev != rm->created->st_dev || st.st_ino != rm->created->st_ino)
                return -ESTALE;
        return unlinkat(rm->dir_fd, rm->leaf, 0) < 0 ? -errno : 0;
}

/* Remove what we created, if the name still is that file (someone may have renamed it away and
 * put something else there: that is not ours to remove), and as the caller, as it was created: a
 * name the caller swaps in between our look and the unlink is then one they could remove
 * themselves. */
static void remove_created(Provision *p, const struct stat *created) {
        Remove rm = { .dir_fd = p->dir_fd, .leaf = p->leaf, .created = created };
        int r;

        r = fs_identity_run(p->caller, p->gid, p->gids, p->n_gids, remove_target, &rm);
        if (r == -ESTALE)
                log_warning("%s was replaced after we created it; leaving it alone.", p->target);
        else if (r < 0 && r != -ENOENT)
                log_warning_errno(r, "Failed to remove %s after a failed provisioning: %m", p->target);
}

static int create_overlay_on(
        Provision *p, const char *backing, const char *backing_format, struct stat *ret_st, sd_bus_error *error);

static int create_overlay(Provision *p, sd_bus_error *error) {
        return create_overlay_on(p, p->template, p->format, NULL, error);
}

typedef struct Create {
        int dir_fd;
        const char *leaf;
        int fd;
} Create;

static int create_target(void *userdata) {
        Create *c = userdata;

        c->fd = openat(c->dir_fd, c->leaf, O_CREAT | O_EXCL | O_NOFOLLOW | O_RDWR | O_CLOEXEC | O_NOCTTY, 0600);
        return c->fd < 0 ? -errno : 0;
}

static int create_overlay_on(
        Provision *p, const char *backing, const char *backing_format, struct stat *ret_st, sd_bus_error *error) {
        _cleanup_free_ char *why = NULL;
        Create c = { .dir_fd = p->dir_fd, .leaf = p->leaf, .fd = -1 };
        _cleanup_close_ int fd = -1;
        struct stat st;
        int r;

        /* An unprivileged caller (authorized by polkit) gets the overlay its VM will use, made as
         * that caller: only where it may create a file itself (write and search permission on the
         * directory, its sticky bit), and owned by it and its group from the start. */
        r = fs_identity_run(p->caller, p->gid, p->gids, p->n_gids, create_target, &c);
        fd = c.fd;
        if (r == -EEXIST)
                return sd_bus_error_setf(error, SD_BUS_ERROR_FILE_EXISTS,
                        "Target %s exists already (or is a symbolic link); refusing to overwrite it.", p->target);
        if (r == -EACCES || r == -EPERM)
                return sd_bus_error_setf(error, SD_BUS_ERROR_ACCESS_DENIED,
                        "You (uid " UID_FMT ") may not create %s yourself (that needs write and search permission on "
                        "its directory), so it is not created for you.",
                        p->caller, p->target);
        if (r < 0)
                return sd_bus_error_set_errnof(error, -r, "Cannot create target %s: %m", p->target);
        if (fstat(fd, &st) < 0)
                return sd_bus_error_set_errnof(error, errno, "Cannot stat the new target %s: %m", p->target);

        r = image_write_qcow2_overlay(fd, p->size, backing, backing_format, &why);
        if (r >= 0 && fchmod(fd, 0600) < 0)
                r = -errno;
        if (r < 0) {
                remove_created(p, &st);
                if (r == -ENOMEM)
                        return r;
                return sd_bus_error_setf(error, r == -EFBIG ? SD_BUS_ERROR_INVALID_ARGS : SD_BUS_ERROR_FAILED,
                        "Cannot provision %s: %s", p->target, why ?: strerror(-r));
        }
        log_info("Provisioned %s on %s (%s, %" PRIu64 " bytes).", p->target, backing, backing_format, p->size);
        /* Owned by the caller now: the cache lets that user's QEMU reach it. */
        if (ret_st && fstat(fd, ret_st) < 0)
                *ret_st = st;
        return 0;
}

/* With option "cache": the overlay over the host's cache of the template, once the cache serves; a
 * cache made for it alone goes away if the overlay could not be made. */
static void cache_ready(void *userdata, int error, const char *why, const char *backing, void *handle) {
        _cleanup_(sd_bus_error_free) sd_bus_error e = SD_BUS_ERROR_NULL;
        Provision *p = userdata;
        struct stat st = {};
        int r;

        if (error < 0) {
                provision_fail(p, BS_ERROR_HELPER_FAILED, why ?: "the template cache failed");
                return;
        }
        if (p->requested > 0)
                p->size = p->requested;
        r = create_overlay_on(p, backing, "raw", &st, &e);
        p->cache.done(p->cache.userdata, handle, r >= 0, p->target, &st);
        if (r < 0 && !sd_bus_error_is_set(&e))
                (void) sd_bus_error_set_errnof(&e, -r, "Cannot provision %s: %m", p->target);
        if (r < 0)
                (void) sd_bus_reply_method_error(p->call, &e);
        else
                (void) sd_bus_reply_method_return(p->call, "t", p->size);
        p->call = sd_bus_message_unref(p->call);
        provision_free(p);
}

static void provision_finish(Provision *p) {
        _cleanup_(sd_bus_error_free) sd_bus_error error = SD_BUS_ERROR_NULL;
        int r;

        if (p->use_cache) {
                r = p->cache.acquire(p->cache.userdata, p->caller, p->template, p->format, p->size, cache_ready, p, &error);
                if (r < 0) {
                        if (!sd_bus_error_is_set(&error))
                                (void) sd_bus_error_set_errnof(&error, -r, "Cannot provision %s: %m", p->target);
                        (void) sd_bus_reply_method_error(p->call, &error);
                        p->call = sd_bus_message_unref(p->call);
                        provision_free(p);
                }
                return; /* cache_ready() answers */
        }
        r = create_overlay(p, &error);
        if (r < 0 && !sd_bus_error_is_set(&error))
                (void) sd_bus_error_set_errnof(&error, -r, "Cannot provision %s: %m", p->target);
        if (r < 0)
                (void) sd_bus_reply_method_error(p->call, &error);
        else
                (void) sd_bus_reply_method_return(p->call, "t", p->size);
        p->call = sd_bus_message_unref(p->call);
        provision_free(p);
}

/* Step 1 for URLs: the size, from a sandboxed qemu-img info. */

static unsigned probe_timeout_sec(void) {
        return test_hook_bound("BLOCKSTREAM_TEST_PROBE_TIMEOUT_SEC", PROBE_TIMEOUT_SEC); /* a shorter deadline */
}

/* The probe's time is up: SIGKILL (PID 1 of its namespace ignores SIGTERM), and its end says why. */
static int probe_deadline(sd_event_source *s, uint64_t usec, void *userdata) {
        Provision *p = userdata;

        p->deadline = sd_event_source_disable_unref(p->deadline);
        p->timed_out = true;
        log_info("Provisioning %s: the probe of %s did not finish in %u s, killing it.", p->target, p->template,
                probe_timeout_sec());
        if (helper_kill(p->child) < 0)
                provision_fail(p, BS_ERROR_QEMU_FAILED, "the probe of the template could not be stopped");
        return 0;
}

static int probed(sd_event_source *s, const siginfo_t *si, void *userdata) {
        Provision *p = userdata;
        int r;

        p->pid = 0;
        probe_ended(p);
        out_drain(p);
        p->deadline = sd_event_source_disable_unref(p->deadline);
        if (p->timed_out) {
                char text[160];
                snprintf(text, sizeof(text),
                        "the server did not tell the template's size within %u s (give option 'size' otherwise)",
                        probe_timeout_sec());
                provision_fail(p, BS_ERROR_QEMU_FAILED, text);
                return 0;
        }
        if (si->si_code != CLD_EXITED || si->si_status != 0) {
                provision_fail(p, BS_ERROR_QEMU_FAILED,
                        "qemu-img could not read the template's size (is the server reachable? give option 'size' otherwise)");
                return 0;
        }
        r = qemu_parse_image_size(p->out, p->out_len, &p->size);
        if (r < 0 || p->size == 0) {
                provision_fail(p, BS_ERROR_QEMU_FAILED, "qemu-img info gave no usable virtual size for the template");
                return 0;
        }
        if (p->size > UINT64_MAX - 511) {
                provision_fail(p, BS_ERROR_QEMU_FAILED, "qemu-img info gave no usable virtual size for the template");
                return 0;
        }
        p->size = (p->size + 511) & ~UINT64_C(511);
        p->out_source = sd_event_source_disable_unref(p->out_source);
        p->child = sd_event_source_disable_unref(p->child);
        closep(&p->out_fd);
        provision_finish(p);
        return 0;
}

static int run_probe(Provision *p) {
        const Config *c = p->config;
        _cleanup_close_ int out_r = -1, out_w = -1;
        int pipefd[2], r;
        unsigned slot = 0;
        uid_t uid;
        char *argv[] = { (char *) "/usr/bin/qemu-img", (char *) "info", (char *) "--output=json", (char *) "-f", p->format,
                p->template, NULL };

        while (slot < PROBES_MAX && (probe_slots & (1U << slot)))
                slot++;
        if (slot >= PROBES_MAX)
                return -EBUSY; /* the caller checked: cannot happen */
        /* A uid of its own: a probe taken over shares no process limit, signal or /proc with
         * another (the PID namespace is for what it starts: it all dies with it). */
        uid = (uid_t) (c->helper_uid_max - slot);
        if (uid_is_account(uid)) {
                log_error("Uid " UID_FMT " of HelperUIDRange= (one of its top %u, the probes') is an account's or a "
                          "group's: no probe runs as it. Give the daemon a range of its own.",
                        uid, PROBES_MAX);
                return -EADDRINUSE;
        }
        /* Nor another live daemon's (a HelperUIDRange= given twice): that one's probe of this uid
         * would share our probe's process limit. What an earlier daemon left is killed. */
        r = storage_kill_leftovers(uid);
        if (r < 0)
                return r;
        if (pipe2(pipefd, O_CLOEXEC) < 0)
                return -errno;
        out_r = pipefd[0];
        out_w = pipefd[1];
        /* The server's answers are untrusted: parse them unprivileged, in a sandbox, with the
         * host network (it must reach the server) and nothing else. */
        r = helper_start(p->event,
                &(HelperSpec) {
                        .sandbox = {
                                .name = "provisioning",
                                .uid = uid,
                                .gid = uid,
                                .host_network = true,
                                .own_pids = true, /* nothing it starts outlives it */
                                .client_only = true,
                                .stdout_fd = out_w,
                                .stderr_fd = -1,
                                .argv = argv,
                                .exec_fd = -1,
                                .env = (char *[]) { NULL },
                                .max_address_space = PROBE_ADDRESS_SPACE, /* no file writes: the default */
                        },
                        .on_exit = probed,
                        .userdata = p,
                },
                &p->pid, &p->child, NULL, NULL);
        if (r < 0)
                return r;
        p->probing = true;
        p->slot = slot;
        probe_slots |= 1U << slot;
        probe_callers[slot] = p->caller;
        r = sd_event_add_time_relative(p->event, &p->deadline, CLOCK_MONOTONIC,
                probe_timeout_sec() * USEC_PER_SEC, 0, probe_deadline, p);
        if (r < 0)
                return r;
        return watch_output(p, TAKE_FD(out_r));
}

/* A template file's chain, opened as image.c opens it: as the caller (a caller other than root),
 * so that root reads for them only what they could read themselves, and what is refused or
 * told of a template (its header, its backing's name) is only what they could read. */
typedef struct ChainOpen {
        char *const *dirs;
        const char *path, *format;
        char **forbidden;
        ImageChain *chain;
        char *why;
} ChainOpen;

static int chain_open(void *userdata) {
        ChainOpen *c = userdata;

        return image_chain_open(c->dirs, c->path, c->format, false, c->forbidden, c->chain, &c->why);
}

/* The target's directory, opened beneath its image directory, and whether the name is free in it:
 * done as the caller (a caller other than root), so that neither the walk nor the answer reaches
 * past what they may search themselves. */
typedef struct TargetLookup {
        char *const *dirs;
        const char *target;
        int dir_fd;
        const char *leaf;
        char *why;
        bool exists;
} TargetLookup;

static int target_lookup(void *userdata) {
        TargetLookup *t = userdata;
        struct stat st;
        int r;

        /* From the image directory down through fds: no symlink, no "..", no other mount. */
        r = image_open_parent_beneath(t->dirs, t->target, &t->dir_fd, &t->leaf, &t->why);
        if (r < 0)
                return r;
        if (fstatat(t->dir_fd, t->leaf, &st, AT_SYMLINK_NOFOLLOW) == 0)
                t->exists = true;
        else if (errno != ENOENT)
                return -errno; /* EACCES: the caller may not search the directory itself */
        return 0;
}

int provision_disk(const ProvisionContext *ctx, sd_bus_message *msg, const char *template, const char *target, const char *format,
        uint64_t size, uid_t caller, sd_bus_error *error) {
        _cleanup_free_ gid_t *gids = NULL;
        _cleanup_free_ char *why = NULL;
        _cleanup_close_ int dir_fd = -1;
        const char *leaf;
        Provision *p;
        const Config *c = ctx->config;
        TargetLookup t = { .dirs = c->image_dirs, .target = target, .dir_fd = -EBADF };
        bool url = is_url(template);
        size_t n_gids = 0;
        gid_t gid = 0;
        int r;

        if (strv_isempty(c->image_dirs))
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                        "No ImageDirectories= are configured; configure them in the daemon's configuration file.");
        if (!path_is_safe_absolute(target, 4000))
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                        "Target '%.200s' must be a normalized absolute path.", target);
        /* What is done as the caller is done with its groups as the user database tells them now. */
        if (caller != 0) {
                r = user_groups(caller, CALLER_GROUPS_MAX, &gid, &gids, &n_gids);
                if (r == -ENOMEM)
                        return r;
                if (r < 0)
                        return sd_bus_error_setf(error, SD_BUS_ERROR_ACCESS_DENIED,
                                "Cannot tell the groups of uid " UID_FMT " (%s), so nothing is made for it.", caller,
                                strerror(-r));
        }
        r = fs_identity_run(caller, gid, gids, n_gids, target_lookup, &t);
        dir_fd = t.dir_fd;
        leaf = t.leaf;
        why = t.why;
        if (r == -ENOMEM)
                return r;
        if (r == -EPERM)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                        "Target %s lies outside the image directories; pick a path in one of them.", target);
        if (r == -EACCES)
                return sd_bus_error_setf(error, SD_BUS_ERROR_ACCESS_DENIED,
                        "You (uid " UID_FMT ") may not reach the directory of %s yourself, so nothing is made there "
                        "for you.",
                        caller, target);
        if (r < 0)
                return sd_bus_error_setf(
                        error, SD_BUS_ERROR_INVALID_ARGS, "Target %s: %s", target, why ?: strerror(-r));
        if (t.exists)
                return sd_bus_error_setf(error, SD_BUS_ERROR_FILE_EXISTS,
                        "Target %s exists already (or is a symbolic link); refusing to overwrite it.", target);
        if (format && !streq(format, "qcow2") && !streq(format, "raw"))
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                        "Template format '%.32s' is not supported; use qcow2 or raw.", format);
        if (!format)
                format = url ? "raw" : "qcow2";

        p = calloc(1, sizeof(Provision));
        if (!p)
                return -ENOMEM;
        p->config = c;
        p->event = ctx->event;
        p->out_fd = -1;
        p->dir_fd = TAKE_FD(dir_fd);
        p->caller = caller;
        p->gid = gid;
        p->gids = TAKE_PTR(gids);
        p->n_gids = n_gids;
        p->size = size;
        if (ctx->cache) {
                /* The cache is everyone's: its size is the template's, asked of the server, never
                 * a caller's option (a smaller one would cut the template short for all). */
                p->use_cache = true;
                p->cache = *ctx->cache;
                p->requested = p->size;
                p->size = 0;
        }
        p->template = strdup(template);
        p->format = strdup(format);
        p->target = strdup(target);
        p->leaf = strdup(leaf);
        if (!p->template || !p->format || !p->target || !p->leaf) {
                provision_free(p);
                return -ENOMEM;
        }
        if (url) {
                /* A cache is for what crosses the network; a local socket is local already. */
                if (p->use_cache && strncmp(template, "nbd+unix://", 11) == 0) {
                        provision_free(p);
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                "Option 'cache' is for remote templates (nbd://, http://, https://) only.");
                }
                if (!url_valid(template)) {
                        provision_free(p);
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                "Template URL '%.200s' has spaces or non-ASCII characters, or is longer than %d bytes.",
                                template, BACKING_NAME_MAX);
                }
                if (!config_template_url_allowed(c, template)) {
                        provision_free(p);
                        return sd_bus_error_setf(error, SD_BUS_ERROR_ACCESS_DENIED,
                                "Template URL %s is not allowed: no prefix in TemplateURLPrefixes= of the daemon's "
                                "configuration matches it (remote templates are refused unless an administrator lists them there).",
                                template);
                }
                if (p->size == 0 && strncmp(template, "nbd+unix://", 11) == 0) {
                        provision_free(p);
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                "A template on a local NBD socket needs option 'size' (t, bytes).");
                }
        } else {
                _cleanup_(image_chain_done) ImageChain chain = {};

                if (p->use_cache) {
                        provision_free(p);
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                "Option 'cache' is for remote templates (nbd://, http://, https://) only; a local "
                                "template is read from its file system.");
                }
                if (!path_is_safe_absolute(template, BACKING_NAME_MAX)) {
                        provision_free(p);
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                "Template '%.200s' is neither a normalized absolute path of at most %d bytes nor an nbd://, "
                                "nbd+unix://, http:// or https:// URL.",
                                template, BACKING_NAME_MAX);
                }
                ChainOpen co = {
                        .dirs = c->image_dirs,
                        .path = template,
                        .format = format,
                        .forbidden = ctx->forbidden_images,
                        .chain = &chain,
                };

                r = fs_identity_run(caller, p->gid, p->gids, p->n_gids, chain_open, &co);
                free(why);
                why = co.why;
                if (r < 0) {
                        provision_free(p);
                        if (r == -ENOMEM)
                                return r;
                        if (r == -EACCES)
                                return sd_bus_error_setf(error, SD_BUS_ERROR_ACCESS_DENIED,
                                        "Template %s: %s (you may not read it yourself, so no overlay on it is made "
                                        "for you).",
                                        template, why ?: strerror(-r));
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "Template %s: %s", template,
                                why ?: strerror(-r));
                }
                if (p->size == 0)
                        p->size = chain.images[0].virtual_size;
                if (p->size == 0) {
                        /* Never the URL's probe, which would open the path in its sandbox. */
                        provision_free(p);
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                "Template %s is empty (a virtual size of 0); give option 'size' for the overlay.",
                                template);
                }
                if (p->size > UINT64_MAX - 511) {
                        provision_free(p);
                        return sd_bus_error_setf(
                                error, SD_BUS_ERROR_INVALID_ARGS, "The template's size is not usable.");
                }
                p->size = (p->size + 511) & ~UINT64_C(511);
        }

        /* Option 'size' is a multiple of 512 already; a template's size was rounded up above. */
        if (p->size > 0) {
                uint64_t done = p->size;

                r = create_overlay(p, error);
                provision_free(p);
                if (r < 0)
                        return r;
                return sd_bus_reply_method_return(msg, "t", done);
        }

        if (p->caller != 0 && probes_of(p->caller) >= PROBES_PER_CALLER_MAX) {
                unsigned mine = probes_of(p->caller);

                provision_free(p);
                return sd_bus_error_setf(error, BS_ERROR_BUSY,
                        "You have %u templates being asked for their size already (at most %u at once per user); "
                        "try again shortly, or give option 'size'.",
                        mine, PROBES_PER_CALLER_MAX);
        }
        if (probes_running() >= PROBES_MAX) {
                provision_free(p);
                return sd_bus_error_setf(error, BS_ERROR_BUSY,
                        "%u templates are being asked for their size already (at most %u at once); try again "
                        "shortly, or give option 'size'.",
                        probes_running(), PROBES_MAX);
        }
        p->call = sd_bus_message_ref(msg);
        r = run_probe(p);
        if (r < 0) {
                p->call = sd_bus_message_unref(p->call);
                provision_free(p);
                /* Not the caller's fault: no errno mapping (EPERM would read as AccessDenied). */
                return sd_bus_error_setf(error, BS_ERROR_HELPER_FAILED,
                        "Cannot provision %s: the sandboxed qemu-img that asks the server for the template's size "
                        "could not be started (%s); give option 'size' to do without it.",
                        target,
                        r == -EADDRINUSE ? "its uid in HelperUIDRange= is an account's, see the daemon's log"
                        : r == -EUSERS   ? "its uid in HelperUIDRange= is another blockstreamd's helper's: each daemon "
                                           "needs a range of its own"
                                         : strerror(-r));
        }
        return 1;
}
