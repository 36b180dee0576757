/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#include "bus-util.h"
#include "fs-identity.h"
#include "helper.h"
#include "image.h"
#include "qemu.h"
#include "sandbox.h"
#include "storage.h"
#include "util.h"


/* A helper of another daemon found on one of our uids. */
typedef struct StorageShared {
        uid_t uid;
        pid_t pid, daemon;
} StorageShared;

struct StorageHelper {
        const StorageHost *host;
        uid_t uid; /* the guest's storage helper uid (none of its other helpers') */
        uid_t earlier_uid; /* StorageSandbox.earlier_uid */
        pid_t pid;
        sd_event_source *child_source;
        HelperLog *log;
        unsigned pending;  /* attach commands not yet answered */
        unsigned fdset_seq;
        bool attached;
        bool lost;         /* its QMP connection is gone */
        bool stopping;     /* we asked it to quit: its end is expected */
        char *error;       /* why attaching failed */
        /* pid 0: waiting for an earlier daemon's helpers of this guest to be gone. */
        sd_event_source *leftover_timer;
        usec_t leftover_deadline;
        StorageShared shared;
};

#define LEFTOVER_POLL_USEC (20 * USEC_PER_MSEC)
#define LEFTOVER_WAIT_USEC (10 * USEC_PER_SEC)

static void helper_free(StorageHelper *h) {
        if (!h)
                return;
        helper_release(h->child_source);
        sd_event_source_disable_unref(h->leftover_timer);
        helper_log_free(h->log);
        free(h->error);
        free(h);
}

bool storage_helper_attached(const StorageHost *host) {
        StorageHelper *h = *host->helper;

        /* One that was asked to quit takes nothing new: callers wait for a fresh one. */
        return h && h->attached && !h->lost && !h->stopping;
}

/* Exports, range jobs, the disks' jobs and the waiters learn it (the peer tells them all). */
static void fail_waiters_and_jobs(const StorageHost *host, const char *why) {
        host->failed(host->userdata, why);
}

static int child_handler(sd_event_source *s, const siginfo_t *si, void *userdata) {
        StorageHelper *h = userdata;
        const StorageHost *host = h->host;
        _cleanup_free_ char *why = NULL;
        bool expected;

        if (si->si_code == CLD_EXITED)
                why = strdup_printf("The storage helper exited with status %i.", si->si_status);
        else
                why = strdup_printf("The storage helper was killed by signal %s.", sigabbrev_np(si->si_status) ?: "?");
        if ((si->si_code == CLD_EXITED && si->si_status == 0) || h->stopping)
                log_info("Guest %s: storage helper exited.", host->name);
        else
                log_warning("Guest %s: %s", host->name, why ?: "The storage helper died.");

        *host->helper = NULL;
        if (!h->lost) {
                h->lost = true;
                *host->qmp = qmp_close_unref(*host->qmp);
        }
        expected = h->stopping;
        helper_free(h);
        /* Its threads are gone, and the images' locks with them (a child's exit is reported once
         * its last thread exited): outcomes that waited for that can be told. */
        host->released(host->userdata);
        /* Asked for again while it was quitting: a fresh one for them. */
        if (expected && host->wanted(host->userdata) && storage_helper_start(host) >= 0)
                return 0;
        /* Jobs and waiters learn it, unless they already did through QMP. */
        fail_waiters_and_jobs(host, why ?: "The storage helper died.");
        return 0;
}

void storage_helper_lost(const StorageHost *host, int error) {
        StorageHelper *h = *host->helper;
        _cleanup_free_ char *why = NULL;

        *host->qmp = qmp_close_unref(*host->qmp);
        if (!h || h->lost)
                return;
        h->lost = true;
        if (h->stopping)
                return; /* it is on its way out, as asked; the child handler sees it go */
        /* Whatever it is doing without a monitor, it does not do it for us any more. */
        (void) helper_kill(h->child_source);
        why = strdup_printf("The storage helper went away (%s).", h->error ?: strerror(-error));
        fail_waiters_and_jobs(host, why ?: "The storage helper went away.");
}

static void closedirp(DIR **d) {
        if (*d)
                closedir(*d);
}

/* /proc/PID/status into buf (NUL-terminated), or false. */
static bool read_status(int proc_fd, long pid, char *buf, size_t size) {
        _cleanup_close_ int fd = -1;
        char path[64];
        ssize_t k;

        snprintf(path, sizeof(path), "%ld/status", pid);
        fd = openat(proc_fd, path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
                return false;
        k = read(fd, buf, size - 1);
        if (k <= 0)
                return false;
        buf[k] = 0;
        return true;
}

/* Is ppid a live daemon of ours: our binary, running as root (a helper that execs our binary
 * cannot be root again: no_new_privs), and not one of our own forks? */
static bool another_daemon(int proc_fd, long ppid, pid_t self) {
        char path[64], buf[4096], *p;
        struct stat ours, theirs;

        if (ppid <= 1 || ppid == (long) self)
                return false;
        snprintf(path, sizeof(path), "%ld/exe", ppid);
        if (fstatat(proc_fd, "self/exe", &ours, 0) < 0 || fstatat(proc_fd, path, &theirs, 0) < 0 ||
                ours.st_dev != theirs.st_dev || ours.st_ino != theirs.st_ino)
                return false;
        if (!read_status(proc_fd, ppid, buf, sizeof(buf)))
                return false; /* gone meanwhile: its children are leftovers now */
        if (!strstr(buf, "\nUid:\t0\t0\t0\t0\n"))
                return false;
        p = strstr(buf, "\nPPid:\t");
        return p && strtol(p + 7, NULL, 10) != (long) self;
}

/* Processes of the uids that are not our children: helpers an earlier daemon left (killed by
 * PDEATHSIG with it, but perhaps not yet gone: a storage helper's images stay locked until its
 * last thread exited). Each uid is one identity's alone (a guest's storage helper, now and before
 * a restart; a cache's helper; a probe: HelperUIDRange= is ours), so each is SIGKILLed; but not a
 * helper of another live daemon of ours (same binary) given the same HelperUIDRange=: such a
 * daemon's helpers are no leftovers (an earlier daemon's lost their parent), and its guests would
 * lose them. That is -EUSERS: the range is shared. One look at /proc for all the uids. Returns how
 * many still have a live thread, or -errno. */
static int kill_leftovers(const uid_t *uids, size_t n_uids, StorageShared *ret_shared) {
        _cleanup_(closedirp) DIR *proc = NULL;
        pid_t self = getpid();
        struct dirent *de;
        bool shared = false;
        int n = 0;

        proc = opendir("/proc");
        if (!proc)
                return -errno;
        while ((de = readdir(proc))) {
                _cleanup_close_ int pidfd = -1;
                char buf[4096], *p, *end;
                unsigned long ruid = ULONG_MAX, threads = 0;
                long ppid = -1, pid;
                char state = 0;

                if (de->d_name[0] < '1' || de->d_name[0] > '9')
                        continue;
                errno = 0;
                pid = strtol(de->d_name, &end, 10);
                if (errno != 0 || *end || pid <= 0 || pid > INT_MAX)
                        continue;
                /* The process first, then what it is: a pid reused after our look is never killed. */
                pidfd = (int) syscall(SYS_pidfd_open, (pid_t) pid, 0);
                if (pidfd < 0 && errno != ENOSYS)
                        continue; /* gone meanwhile */
                if (!read_status(dirfd(proc), pid, buf, sizeof(buf)))
                        continue; /* gone meanwhile */
                if ((p = strstr(buf, "\nState:\t")))
                        state = p[8];
                if ((p = strstr(buf, "\nPPid:\t")))
                        ppid = strtol(p + 7, NULL, 10);
                if ((p = strstr(buf, "\nUid:\t")))
                        ruid = strtoul(p + 6, NULL, 10);
                if ((p = strstr(buf, "\nThreads:\t")))
                        threads = strtoul(p + 10, NULL, 10);
                uid_t uid = UID_INVALID;

                for (size_t i = 0; i < n_uids; i++)
                        if (ruid == (unsigned long) uids[i])
                                uid = uids[i];
                if (uid == UID_INVALID || ppid == (long) self)
                        continue;
                if ((state == 'Z' || state == 'X') && threads <= 1)
                        continue; /* exited: holds nothing, only waits to be reaped by its parent */
                if (another_daemon(dirfd(proc), ppid, self)) {
                        /* Told once, by whoever gets -EUSERS. */
                        log_debug("Pid %ld of uid " UID_FMT " is a helper of another blockstreamd (pid %ld).", pid,
                                uid, ppid);
                        *ret_shared = (StorageShared) { .uid = uid, .pid = (pid_t) pid, .daemon = (pid_t) ppid };
                        shared = true;
                        continue;
                }
                log_info("Killing pid %ld of uid " UID_FMT ", a helper left by an earlier daemon.", pid, uid);
                if (pidfd >= 0)
                        (void) syscall(SYS_pidfd_send_signal, pidfd, SIGKILL, NULL, 0);
                else
                        (void) kill((pid_t) pid, SIGKILL); /* no pidfds: the old way */
                n++;
        }
        return shared ? -EUSERS : n;
}

/* Why a helper (what) cannot start on uids another daemon's helper runs as. */
static char *shared_why(const StorageShared *s, const char *what) {
        return strdup_printf("Cannot start %s: its uid " UID_FMT " is used by pid %i, a helper of another blockstreamd "
                             "(pid %i) on this machine. Each daemon needs a HelperUIDRange= of its own.",
                what, s->uid, (int) s->pid, (int) s->daemon);
}

static int helper_spawn(StorageHelper *h);

/* The leftovers of both of h's identities: how many still live, or -errno (-EUSERS: h->shared). */
static int kill_helper_leftovers(StorageHelper *h) {
        uid_t uids[2] = { h->uid, h->earlier_uid };

        return kill_leftovers(uids, h->earlier_uid != 0 && h->earlier_uid != h->uid ? 2 : 1, &h->shared);
}

static int leftover_check(sd_event_source *s, uint64_t usec, void *userdata) {
        StorageHelper *h = userdata;
        const StorageHost *host = h->host;
        int r;

        r = kill_helper_leftovers(h);
        if (r > 0 && now_usec(CLOCK_MONOTONIC) < h->leftover_deadline) {
                (void) sd_event_source_set_time_relative(s, LEFTOVER_POLL_USEC);
                (void) sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
                return 0;
        }
        h->leftover_timer = sd_event_source_disable_unref(h->leftover_timer);
        if (r == 0) {
                r = helper_spawn(h);
                if (r < 0 && h->child_source)
                        return 0; /* it runs: its child handler tells everyone */
        }
        if (r != 0) {
                _cleanup_free_ char *why =
                        r > 0 ? strdup_printf("Processes of the guest's storage helper uid " UID_FMT
                                              " left by an earlier daemon did not exit.",
                                        h->uid)
                        : r == -EUSERS ? shared_why(&h->shared, "the storage helper")
                                       : strdup_printf("Cannot start the storage helper: %s", strerror(-r));
                log_error("Guest %s: %s", host->name, why ?: "out of memory");
                *host->helper = NULL;
                helper_free(h);
                fail_waiters_and_jobs(host, why ?: "Cannot start the storage helper.");
        }
        return 0;
}

int storage_helper_start(const StorageHost *host) {
        StorageSandbox sb = {};
        StorageHelper *h;
        int r;

        if (*host->helper)
                return 0;
        r = host->source->sandbox(host->source->userdata, &sb); /* creates the runtime dir */
        if (r < 0)
                return r;
        h = calloc(1, sizeof(StorageHelper));
        if (!h)
                return -ENOMEM;
        h->host = host;
        h->uid = sb.uid;
        h->earlier_uid = sb.earlier_uid;
        /* A daemon restarted at once (SIGKILL, then systemd) may find its predecessor's helper
         * still exiting, with the images' locks: wait for it rather than fail on those locks. The
         * predecessor may be older than the storage helper's own identity (earlier_uid). */
        r = kill_helper_leftovers(h);
        if (r > 0 || r == -EUSERS) {
                /* -EUSERS: leftover_check() finds it again at once and tells the waiters why. */
                h->leftover_deadline = now_usec(CLOCK_MONOTONIC) + LEFTOVER_WAIT_USEC;
                r = sd_event_add_time_relative(host->event, &h->leftover_timer, CLOCK_MONOTONIC,
                        r > 0 ? LEFTOVER_POLL_USEC : 0, 1, leftover_check, h);
                if (r >= 0) {
                        *host->helper = h;
                        return 0;
                }
        }
        if (r < 0) {
                helper_free(h);
                return r;
        }
        r = helper_spawn(h);
        if (r < 0 && !h->child_source)
                helper_free(h); /* else it runs, as *host->helper, and its child handler cleans up */
        return r;
}

/* Spawn it for h (not yet *host->helper, or *host->helper waiting for leftovers); on success it is
 * *host->helper. */
static int helper_spawn(StorageHelper *h) {
        const StorageHost *host = h->host;
        StorageSandbox sb = {};
        _cleanup_free_ char *prefix = strdup_printf("Guest %s storage helper", host->name);
        _cleanup_close_ int qmp_ours = -1;
        char *argv[] = {
                (char *) config_qemu_binary(host->config),
                (char *) "-machine", (char *) "none",
                (char *) "-nodefaults",
                (char *) "-no-user-config",
                (char *) "-display", (char *) "none",
                (char *) "-sandbox", (char *) "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
                (char *) "-chardev", (char *) "socket,id=m0,fd=3",
                (char *) "-mon", (char *) "chardev=m0,mode=control",
                NULL,
        };
        char *env[] = {(char *) SANDBOX_QEMU_MALLOC_TUNABLES, NULL};
        pid_t pid;
        int r;

        if (!prefix)
                return -ENOMEM;
        r = host->source->sandbox(host->source->userdata, &sb);
        if (r < 0)
                return r;
        /* Its QMP socket is its fd 3. */
        r = helper_start(host->event,
                &(HelperSpec) {
                        .sandbox = {
                                .name = host->name,
                                .uid = sb.uid,
                                .gid = sb.uid,
                                .runtime_dir = sb.runtime_dir,
                                .selinux_label = sb.process_label,
                                .argv = argv,
                                .exec_fd = -1,
                                .env = env,
                                .max_address_space = SANDBOX_ADDRESS_SPACE_QEMU,
                                /* It writes the images through their fds: a top image grows by up to
                                 * its virtual size plus metadata, and may already be larger than that
                                 * (internal snapshots). Its only writable files are those images. */
                                .max_file_size = SANDBOX_LIMIT_NONE,
                        },
                        .control_type = SOCK_STREAM,
                        .log_prefix = prefix,
                        .on_exit = child_handler,
                        .userdata = h,
                },
                &pid, &h->child_source, &qmp_ours, &h->log);
        if (r < 0)
                return r;
        h->pid = pid;
        *host->helper = h;

        r = qmp_new_from_fd(host->qmp, host->event, qmp_ours, &host->qmp_handlers);
        if (r < 0) {
                *host->qmp = NULL;
                (void) helper_kill(h->child_source); /* the child handler cleans up */
                return r;
        }
        TAKE_FD(qmp_ours);
        qmp_set_timeout(*host->qmp, host->config->qmp_timeout_usec);
        log_info("Guest %s: storage helper started (pid %i, uid " UID_FMT ").", host->name, pid, sb.uid);
        return 0;
}

/* Attaching the disks */

static void attach_reply(Qmp *q, int error, const char *desc, void *userdata) {
        const StorageHost *host = userdata;
        StorageHelper *h = *host->helper;

        if (!h || h->lost)
                return;
        if (error < 0 && !h->error)
                h->error = strdup_printf("QEMU refused to attach the images: %s", desc ?: strerror(-error));
        if (--h->pending > 0)
                return;
        if (h->error) {
                log_error("Guest %s: %s", host->name, h->error);
                storage_helper_lost(host, -EIO);
                return;
        }
        h->attached = true;
        log_info("Guest %s: storage helper has the disks.", host->name);
        host->attached(host->userdata);
}

static char *node_name(const StorageDisk *d, size_t k, bool file) {
        /* QEMU node names are at most 31 characters; aliases of offline disks are short. */
        if (k == 0)
                return strdup_printf(file ? "bsf-%s" : "bs-%s", d->alias);
        return strdup_printf(file ? "bsf-%s-%zu" : "bs-%s-%zu", d->alias, k);
}

#define OWNER_GROUPS_MAX 1024
#define GID_NOGROUP ((gid_t) 65534)

typedef struct OwnerOpen {
        char *const *dirs;
        const char *path, *format;
        bool writable;
        char *const *forbidden, *const *claimed;
        ImageChain *chain;
        bool top_denied; /* the top itself, not a backing image */
        char *why;
} OwnerOpen;

static int owner_opens(void *userdata) {
        _cleanup_close_ int fd = -EBADF;
        OwnerOpen *o = userdata;
        int r;

        /* The top alone first, only to tell which the owner may not open. */
        r = image_open_beneath(o->dirs, o->path, o->writable, &fd, &o->why);
        o->top_denied = r == -EACCES;
        if (r < 0)
                return r;
        return image_chain_open_claimed(
                o->dirs, o->path, o->format, o->writable, o->forbidden, o->claimed, o->chain, &o->why);
}

int storage_chain_open_owned(char *const *dirs, uid_t owner, const char *path, const char *format, bool writable,
        char *const *forbidden, char *const *claimed, ImageChain *ret, char **ret_error) {
        OwnerOpen o = { .dirs = dirs, .path = path, .format = format, .writable = writable, .forbidden = forbidden,
                .claimed = claimed, .chain = ret };
        _cleanup_free_ gid_t *gids = NULL;
        size_t n_gids = 0;
        gid_t gid;
        int r;

        if (owner == 0)
                return image_chain_open_claimed(dirs, path, format, writable, forbidden, claimed, ret, ret_error);
        /* An owner without an account: no group but nogroup. */
        r = user_groups(owner, OWNER_GROUPS_MAX, &gid, &gids, &n_gids);
        if (r == -ESRCH) {
                gid = GID_NOGROUP;
                n_gids = 0;
        } else if (r < 0)
                return r;
        r = fs_identity_run(owner, gid, gids, n_gids, owner_opens, &o);
        if (r == -EACCES) {
                if (o.top_denied)
                        *ret_error = strdup_printf("The guest's owner (uid " UID_FMT ") may not %s %s themselves, so "
                                                   "it is not %s for them",
                                owner, writable ? "write" : "read", path, writable ? "used" : "read");
                else
                        *ret_error = strdup_printf("The guest's owner (uid " UID_FMT ") may not read its backing "
                                                   "chain themselves, so it is not read for them: %s",
                                owner, o.why ?: strerror(-r));
                free(o.why);
        } else if (r < 0)
                *ret_error = o.why ?: strdup(strerror(-r));
        else
                free(o.why);
        return r;
}

int storage_chain_open_handed_over(char *const *dirs, uid_t owner, uid_t qemu_uid, dev_t pin_dev, ino_t pin_ino,
        const char *path, const char *format, bool writable, char *const *forbidden, char *const *claimed,
        ImageChain *ret, char **ret_error) {
        _cleanup_(image_chain_done) ImageChain as_qemu = {};
        _cleanup_free_ char *why = NULL;
        struct stat st;
        int r;

        r = storage_chain_open_owned(dirs, owner, path, format, writable, forbidden, claimed, ret, ret_error);
        if (r < 0 || qemu_uid == UID_INVALID)
                return r;
        if (fstat(ret->images[0].fd, &st) < 0 || st.st_dev != pin_dev || st.st_ino != pin_ino) {
                image_chain_done(ret);
                *ret_error = strdup_printf("%s is no longer the file its QEMU had open", path);
                return -EPERM;
        }
        if (qemu_uid == 0 || qemu_uid == owner)
                return r;
        r = storage_chain_open_owned(dirs, qemu_uid, path, format, false, forbidden, claimed, &as_qemu, &why);
        for (size_t i = 0; r >= 0 && i < MAX(ret->n, as_qemu.n); i++) {
                struct stat a, b;

                if (i >= ret->n || i >= as_qemu.n || fstat(ret->images[i].fd, &a) < 0 ||
                        fstat(as_qemu.images[i].fd, &b) < 0 || a.st_dev != b.st_dev || a.st_ino != b.st_ino)
                        r = -ESTALE;
        }
        if (r >= 0)
                return 0;
        image_chain_done(ret);
        *ret_error = r == -ESTALE ? strdup_printf("The backing chain of %s changed while it was read", path)
                                  : strdup_printf("The uid its QEMU ran as (" UID_FMT ") may not read its backing chain, "
                                                  "so it is not read for it: %s",
                                            qemu_uid, why ?: strerror(-r));
        return r;
}

static int attach_disk(const StorageHost *host, const StorageSandbox *sb, const StorageDisk *d, char **forbidden,
        char **claimed, char **ret_error) {
        StorageHelper *h = *host->helper;
        _cleanup_(image_chain_done) ImageChain chain = {};
        _cleanup_free_ char *content_label = NULL;
        int r;

        if (sandbox_selinux_enabled() &&
                !(content_label = strdup_printf("system_u:object_r:%s:s0", config_selinux_content_type(host->config))))
                return -ENOMEM;
        r = storage_chain_open_handed_over(host->config->image_dirs, d->owner, d->qemu_uid, d->pin_dev, d->pin_ino,
                d->path, d->format, !d->read_only, forbidden, claimed, &chain, ret_error);
        if (r < 0)
                return r;
        for (size_t k = chain.n; k-- > 0;) {
                _cleanup_free_ char *file = node_name(d, k, true), *fmt = node_name(d, k, false),
                                    *backing = k + 1 < chain.n ? node_name(d, k + 1, false) : NULL;
                Image *im = &chain.images[k];
                unsigned fdset = ++h->fdset_seq;
                int fd;

                if (!file || !fmt || (k + 1 < chain.n && !backing))
                        return -ENOMEM;
                /* The guest's own categories only on a top it writes: one it only reads (a shared
                 * CD-ROM image or template) keeps a label every guest may read. */
                r = sandbox_selinux_label_fd(im->fd, k == 0 && !d->read_only ? sb->image_label : content_label);
                if (r < 0) {
                        *ret_error = strdup_printf("Cannot label %s for the sandbox: %s", im->path, strerror(-r));
                        return r;
                }
                fd = fcntl(im->fd, F_DUPFD_CLOEXEC, 3);
                if (fd < 0)
                        return -errno;
                r = qemu_add_fd(*host->qmp, fdset, fd, d->alias, attach_reply, (void *) host, NULL);
                if (r < 0)
                        return r;
                h->pending++;
                r = qemu_blockdev_add_file(*host->qmp, file, fdset, k > 0 || d->read_only, attach_reply, (void *) host,
                        NULL);
                if (r < 0)
                        return r;
                h->pending++;
                r = qemu_blockdev_add_format(*host->qmp, im->format, fmt, file, backing, k > 0 || d->read_only, attach_reply,
                        (void *) host, NULL);
                if (r < 0)
                        return r;
                h->pending++;
        }
        return 0;
}

void storage_helper_attach(const StorageHost *host) {
        const StorageSource *src = host->source;
        StorageHelper *h = *host->helper;
        _cleanup_strv_free_ char **forbidden = NULL, **claimed = NULL;
        StorageSandbox sb = {};
        size_t n;
        int r;

        if (!h)
                return;
        forbidden = src->forbidden_images(src->userdata);
        claimed = src->claimed_images(src->userdata);
        r = src->sandbox(src->userdata, &sb);
        n = src->n_disks(src->userdata);
        for (size_t i = 0; i < n && r >= 0; i++) {
                _cleanup_free_ char *error = NULL;
                StorageDisk d = {};

                src->disk(src->userdata, i, &d);
                r = attach_disk(host, &sb, &d, forbidden, claimed, &error);
                if (r < 0) {
                        free(h->error);
                        h->error = strdup_printf("Cannot attach disk %s (%s): %s", d.alias, d.path, error ?: strerror(-r));
                }
        }
        if (r < 0) {
                log_error("Guest %s: %s", host->name, h->error ?: "cannot attach disks");
                storage_helper_lost(host, r);
                return;
        }
        if (h->pending == 0) {
                h->attached = true;
                host->attached(host->userdata);
        }
}

static void quit_reply(Qmp *q, int error, const char *desc, void *userdata) {
        /* Its exit comes through the child handler. */
}

void storage_helper_stop(const StorageHost *host) {
        StorageHelper *h = *host->helper;

        if (!h || h->lost || h->stopping)
                return;
        if (h->pid == 0) {
                /* Still waiting for an earlier daemon's helpers: nothing of ours to stop. */
                *host->helper = NULL;
                helper_free(h);
                host->released(host->userdata);
                return;
        }
        log_info("Guest %s: nothing left for the storage helper to do, stopping it.", host->name);
        h->stopping = true;
        /* SIGTERM is a clean QEMU shutdown too; SIGKILL if it did not quit in 10 s. */
        if (!*host->qmp || qemu_quit(*host->qmp, quit_reply, NULL, NULL) < 0)
                (void) helper_stop(h->child_source, 10 * USEC_PER_SEC);
        else
                (void) helper_kill_after(h->child_source, 10 * USEC_PER_SEC);
}

void storage_helper_kill(const StorageHost *host) {
        StorageHelper *h = *host->helper;

        if (!h)
                return;
        *host->qmp = qmp_close_unref(*host->qmp);
        /* Killed and reaped now: the guest (and so the child source's userdata) is going away. */
        h->child_source = helper_release(h->child_source);
        *host->helper = NULL;
        helper_free(h);
}

int storage_kill_leftovers(uid_t uid) {
        StorageShared shared = {};
        int r;

        r = kill_leftovers(&uid, 1, &shared);
        if (r == -EUSERS) {
                _cleanup_free_ char *why = shared_why(&shared, "a helper");
                log_error("%s", why ?: "Cannot start a helper: its uid is another daemon's helper's.");
        }
        return r;
}
