/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>

#include "export.h"
#include "range.h"
#include "guest.h"
#include "helper.h"
#include "image.h"
#include "manager.h"
#include "qemu.h"
#include "sandbox.h"
#include "storage.h"
#include "stream.h"
#include "util.h"


struct StorageHelper {
        Guest *guest;
        pid_t pid;
        sd_event_source *child_source;
        HelperLog *log;
        unsigned pending;  /* attach commands not yet answered */
        unsigned fdset_seq;
        bool attached;
        bool lost;         /* its QMP connection is gone */
        bool stopping;     /* we asked it to quit: its end is expected */
        sd_event_source *stop_timer;
        char *error;       /* why attaching failed */
        /* pid 0: waiting for an earlier daemon's helpers of this guest to be gone. */
        sd_event_source *leftover_timer;
        usec_t leftover_deadline;
};

#define LEFTOVER_POLL_USEC (20 * USEC_PER_MSEC)
#define LEFTOVER_WAIT_USEC (10 * USEC_PER_SEC)

static void helper_free(StorageHelper *h) {
        if (!h)
                return;
        sd_event_source_disable_unref(h->child_source);
        sd_event_source_disable_unref(h->stop_timer);
        sd_event_source_disable_unref(h->leftover_timer);
        helper_log_free(h->log);
        free(h->error);
        free(h);
}

bool storage_helper_attached(Guest *g) {
        /* One that was asked to quit takes nothing new: callers wait for a fresh one. */
        return g->helper && g->helper->attached && !g->helper->lost && !g->helper->stopping;
}

static void fail_waiters_and_jobs(Guest *g, const char *why) {
        export_guest_lost(g);
        range_guest_lost(g);
        for (size_t i = 0; i < g->n_disks; i++) {
                Disk *d = g->disks[i];
                if (job_is_active(&d->job) && !d->job.concluded)
                        disk_fail_job(d, why);
                else if (d->job.concluded)
                        disk_apply_job_changes(d, JOB_NOW_CONCLUDED);
        }
        guest_run_waiters(g, -ECONNRESET, why);
}

static int child_handler(sd_event_source *s, const siginfo_t *si, void *userdata) {
        StorageHelper *h = userdata;
        Guest *g = h->guest;
        _cleanup_free_ char *why = NULL;
        bool expected;

        if (si->si_code == CLD_EXITED)
                why = strdup_printf("The storage helper exited with status %i.", si->si_status);
        else
                why = strdup_printf("The storage helper was killed by signal %s.", sigabbrev_np(si->si_status) ?: "?");
        if ((si->si_code == CLD_EXITED && si->si_status == 0) || h->stopping)
                log_info("Guest %s: storage helper exited.", g->name);
        else
                log_warning("Guest %s: %s", g->name, why ?: "The storage helper died.");

        g->helper = NULL;
        if (!h->lost) {
                h->lost = true;
                g->qmp = qmp_close_unref(g->qmp);
        }
        expected = h->stopping;
        helper_free(h);
        /* Its threads are gone, and the images' locks with them (a child's exit is reported once
         * its last thread exited): outcomes that waited for that can be told. */
        guest_publish_released(g);
        /* Asked for again while it was quitting: a fresh one for them. */
        if (expected && g->waiters && storage_helper_start(g) >= 0)
                return 0;
        /* Jobs and waiters learn it, unless they already did through QMP. */
        fail_waiters_and_jobs(g, why ?: "The storage helper died.");
        guest_update_polling(g);
        return 0;
}

void storage_helper_lost(Guest *g, int error) {
        StorageHelper *h = g->helper;
        _cleanup_free_ char *why = NULL;

        g->qmp = qmp_close_unref(g->qmp);
        if (!h || h->lost)
                return;
        h->lost = true;
        if (h->stopping)
                return; /* it is on its way out, as asked; the child handler sees it go */
        /* Whatever it is doing without a monitor, it does not do it for us any more. */
        (void) helper_kill(h->child_source);
        why = strdup_printf("The storage helper went away (%s).", h->error ?: strerror(-error));
        fail_waiters_and_jobs(g, why ?: "The storage helper went away.");
        guest_update_polling(g);
}

/* Processes of the guest's helper uid that are not our children: helpers of an earlier daemon
 * (killed by PDEATHSIG with it, but perhaps not yet gone: the images stay locked until their last
 * thread exited). The uid is this guest's alone (HelperUIDRange= is ours), so each is SIGKILLed.
 * Returns how many still have a live thread, or -errno. */
static void closedirp(DIR **d) {
        if (*d)
                closedir(*d);
}

static int kill_leftovers(uid_t uid) {
        _cleanup_(closedirp) DIR *proc = NULL;
        pid_t self = getpid();
        struct dirent *de;
        int n = 0;

        proc = opendir("/proc");
        if (!proc)
                return -errno;
        while ((de = readdir(proc))) {
                _cleanup_close_ int fd = -1;
                char buf[4096], path[64], *p, *end;
                unsigned long ruid = ULONG_MAX, threads = 0;
                long ppid = -1, pid;
                char state = 0;
                ssize_t k;

                if (de->d_name[0] < '1' || de->d_name[0] > '9')
                        continue;
                errno = 0;
                pid = strtol(de->d_name, &end, 10);
                if (errno != 0 || *end || pid <= 0 || pid > INT_MAX)
                        continue;
                snprintf(path, sizeof(path), "%ld/status", pid);
                fd = openat(dirfd(proc), path, O_RDONLY | O_CLOEXEC);
                if (fd < 0)
                        continue; /* gone meanwhile */
                k = read(fd, buf, sizeof(buf) - 1);
                if (k <= 0)
                        continue;
                buf[k] = 0;
                if ((p = strstr(buf, "\nState:\t")))
                        state = p[8];
                if ((p = strstr(buf, "\nPPid:\t")))
                        ppid = strtol(p + 7, NULL, 10);
                if ((p = strstr(buf, "\nUid:\t")))
                        ruid = strtoul(p + 6, NULL, 10);
                if ((p = strstr(buf, "\nThreads:\t")))
                        threads = strtoul(p + 10, NULL, 10);
                if (ruid != (unsigned long) uid || ppid == (long) self)
                        continue;
                if ((state == 'Z' || state == 'X') && threads <= 1)
                        continue; /* exited: holds nothing, only waits to be reaped by its parent */
                log_info("Killing pid %ld of uid " UID_FMT ", a helper left by an earlier daemon.", pid, uid);
                (void) kill((pid_t) pid, SIGKILL);
                n++;
        }
        return n;
}

static int helper_spawn(StorageHelper *h);

static int leftover_check(sd_event_source *s, uint64_t usec, void *userdata) {
        StorageHelper *h = userdata;
        Guest *g = h->guest;
        int r;

        r = kill_leftovers(g->helper_uid);
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
                _cleanup_free_ char *why = r > 0 ? strdup_printf("Processes of the guest's helper uid " UID_FMT
                                                                 " left by an earlier daemon did not exit.", g->helper_uid)
                                                 : strdup_printf("Cannot start the storage helper: %s", strerror(-r));
                log_error("Guest %s: %s", g->name, why ?: "out of memory");
                g->helper = NULL;
                helper_free(h);
                fail_waiters_and_jobs(g, why ?: "Cannot start the storage helper.");
                guest_update_polling(g);
        }
        return 0;
}

int storage_helper_start(Guest *g) {
        StorageHelper *h;
        int r;

        if (g->helper)
                return 0;
        r = guest_ensure_runtime_dir(g);
        if (r < 0)
                return r;
        h = calloc(1, sizeof(StorageHelper));
        if (!h)
                return -ENOMEM;
        h->guest = g;
        /* A daemon restarted at once (SIGKILL, then systemd) may find its predecessor's helper
         * still exiting, with the images' locks: wait for it rather than fail on those locks. */
        r = kill_leftovers(g->helper_uid);
        if (r > 0) {
                h->leftover_deadline = now_usec(CLOCK_MONOTONIC) + LEFTOVER_WAIT_USEC;
                r = sd_event_add_time_relative(g->manager->event, &h->leftover_timer, CLOCK_MONOTONIC, LEFTOVER_POLL_USEC,
                        0, leftover_check, h);
                if (r >= 0) {
                        g->helper = h;
                        return 0;
                }
        }
        if (r < 0) {
                helper_free(h);
                return r;
        }
        r = helper_spawn(h);
        if (r < 0 && !h->child_source)
                helper_free(h); /* else it runs, as g->helper, and its child handler cleans up */
        return r;
}

/* Spawn it for h (not yet g->helper, or g->helper waiting for leftovers); on success it is g->helper. */
static int helper_spawn(StorageHelper *h) {
        Guest *g = h->guest;
        Manager *m = g->manager;
        _cleanup_free_ char *prefix = strdup_printf("Guest %s storage helper", g->name);
        _cleanup_close_ int qmp_ours = -1;
        char *argv[] = {
                (char *) config_qemu_binary(&m->config),
                (char *) "-machine", (char *) "none",
                (char *) "-nodefaults",
                (char *) "-no-user-config",
                (char *) "-display", (char *) "none",
                (char *) "-sandbox", (char *) "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
                (char *) "-chardev", (char *) "socket,id=m0,fd=3",
                (char *) "-mon", (char *) "chardev=m0,mode=control",
                NULL,
        };
        pid_t pid;
        int r;

        if (!prefix)
                return -ENOMEM;
        /* Its QMP socket is its fd 3. */
        r = helper_start(m->event,
                &(HelperSpec) {
                        .sandbox = {
                                .name = g->name,
                                .uid = g->helper_uid,
                                .gid = g->helper_uid,
                                .runtime_dir = g->runtime_dir,
                                .selinux_label = g->selinux_process_label,
                                .argv = argv,
                                .exec_fd = -1,
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
        g->helper = h;

        r = qmp_new_from_fd(&g->qmp, m->event, qmp_ours, &(QmpHandlers) { .on_state = guest_on_state, .on_event = guest_on_event, .userdata = g });
        if (r < 0) {
                g->qmp = NULL;
                (void) helper_kill(h->child_source); /* the child handler cleans up */
                return r;
        }
        TAKE_FD(qmp_ours);
        qmp_set_timeout(g->qmp, m->config.qmp_timeout_usec);
        log_info("Guest %s: storage helper started (pid %i, uid " UID_FMT ").", g->name, pid, g->helper_uid);
        return 0;
}

/* Attaching the disks */

static void attach_reply(Qmp *q, int error, const char *desc, void *userdata) {
        Guest *g = userdata;
        StorageHelper *h = g->helper;

        if (!h || h->lost)
                return;
        if (error < 0 && !h->error)
                h->error = strdup_printf("QEMU refused to attach the images: %s", desc ?: strerror(-error));
        if (--h->pending > 0)
                return;
        if (h->error) {
                log_error("Guest %s: %s", g->name, h->error);
                storage_helper_lost(g, -EIO);
                return;
        }
        h->attached = true;
        log_info("Guest %s: storage helper has the disks.", g->name);
        guest_run_waiters(g, 0, NULL);
}

static char *node_name(const Disk *d, size_t k, bool file) {
        /* QEMU node names are at most 31 characters; aliases of offline disks are short. */
        if (k == 0)
                return strdup_printf(file ? "bsf-%s" : "bs-%s", d->alias);
        return strdup_printf(file ? "bsf-%s-%zu" : "bs-%s-%zu", d->alias, k);
}

static int attach_disk(Guest *g, Disk *d, char **forbidden, char **claimed, char **ret_error) {
        Manager *m = g->manager;
        StorageHelper *h = g->helper;
        _cleanup_(image_chain_done) ImageChain chain = {};
        _cleanup_free_ char *content_label = NULL;
        int r;

        if (sandbox_selinux_enabled() &&
                !(content_label = strdup_printf("system_u:object_r:%s:s0", config_selinux_content_type(&m->config))))
                return -ENOMEM;
        r = image_chain_open_claimed(
                m->config.image_dirs, d->path, d->format, true, forbidden, claimed, &chain, ret_error);
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
                r = sandbox_selinux_label_fd(im->fd, k == 0 ? g->selinux_image_label : content_label);
                if (r < 0) {
                        *ret_error = strdup_printf("Cannot label %s for the sandbox: %s", im->path, strerror(-r));
                        return r;
                }
                fd = fcntl(im->fd, F_DUPFD_CLOEXEC, 3);
                if (fd < 0)
                        return -errno;
                r = qemu_add_fd(g->qmp, fdset, fd, d->alias, attach_reply, g, NULL);
                if (r < 0)
                        return r;
                h->pending++;
                r = qemu_blockdev_add_file(g->qmp, file, fdset, k > 0, attach_reply, g, NULL);
                if (r < 0)
                        return r;
                h->pending++;
                r = qemu_blockdev_add_format(g->qmp, im->format, fmt, file, backing, k > 0, attach_reply, g, NULL);
                if (r < 0)
                        return r;
                h->pending++;
        }
        return 0;
}

void storage_helper_attach(Guest *g) {
        StorageHelper *h = g->helper;
        _cleanup_strv_free_ char **forbidden = NULL, **claimed = NULL;
        int r = 0;

        if (!h)
                return;
        forbidden = guest_forbidden_images(g);
        claimed = manager_guest_claims(g->manager, g);
        for (size_t i = 0; i < g->n_disks && r >= 0; i++) {
                _cleanup_free_ char *error = NULL;
                r = attach_disk(g, g->disks[i], forbidden, claimed, &error);
                if (r < 0) {
                        free(h->error);
                        h->error = strdup_printf("Cannot attach disk %s (%s): %s", g->disks[i]->alias, g->disks[i]->path,
                                error ?: strerror(-r));
                }
        }
        if (r < 0) {
                log_error("Guest %s: %s", g->name, h->error ?: "cannot attach disks");
                storage_helper_lost(g, r);
                return;
        }
        if (h->pending == 0) {
                h->attached = true;
                guest_run_waiters(g, 0, NULL);
        }
}

static void quit_reply(Qmp *q, int error, const char *desc, void *userdata) {
        /* Its exit comes through the child handler. */
}

void storage_helper_stop(Guest *g) {
        StorageHelper *h = g->helper;

        if (!h || h->lost || h->stopping)
                return;
        if (h->pid == 0) {
                /* Still waiting for an earlier daemon's helpers: nothing of ours to stop. */
                g->helper = NULL;
                helper_free(h);
                guest_publish_released(g);
                return;
        }
        log_info("Guest %s: nothing left for the storage helper to do, stopping it.", g->name);
        h->stopping = true;
        /* SIGTERM is a clean QEMU shutdown too; SIGKILL if it did not quit in 10 s. */
        if (!g->qmp || qemu_quit(g->qmp, quit_reply, NULL, NULL) < 0)
                (void) helper_stop(h->child_source, 10 * USEC_PER_SEC);
        else
                (void) helper_kill_after(h->child_source, 10 * USEC_PER_SEC);
}

void storage_helper_kill(Guest *g) {
        StorageHelper *h = g->helper;

        if (!h)
                return;
        g->qmp = qmp_close_unref(g->qmp);
        /* Killed and reaped now: the guest (and so the child source's userdata) is going away. */
        h->child_source = helper_release(h->child_source);
        g->helper = NULL;
        helper_free(h);
}
