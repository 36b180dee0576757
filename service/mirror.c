/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* Mirror, then pivot (mirror.h). The new image is the daemon's: created beside the overlay by an
 * fd of the overlay's directory (opened beneath an image directory, no symlink followed), its
 * owner, mode and SELinux label copied from the overlay so that a non-root QEMU can use it, and
 * handed to QEMU by fd (add-fd). drive-mirror formats it (a fresh qcow2 on /dev/fdset/N, mode
 * absolute-paths): QEMU then knows the new image reads as zeroes, so its mirror marks only the
 * chain's allocated extents and copies those, where blockdev-mirror sync=full writes zeroes over
 * the whole virtual size first (qcow2 L2 tables for all of it: 1 TiB cost 12.6 s for 1 GiB of
 * data). drive-mirror formats with QEMU's defaults only: an overlay with other format options
 * (cluster size, compat, lazy_refcounts, extended_l2, compression type, refcount bits) has the new
 * image formatted with them first (blockdev-create), and drive-mirror takes it as it exists (mode
 * existing), at the cost of that zeroing. After the pivot the daemon swaps the directory entries
 * (RENAME_EXCHANGE) and unlinks what it swapped out only if it is the file QEMU had open as the
 * overlay when the job began; anything else is swapped back and the job fails. */

#include <fcntl.h>
#include <inttypes.h>
#include <selinux/selinux.h>
#include <signal.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include "backend.h"
#include "bus-error.h"
#include "disk.h"
#include "engine.h"
#include "guest.h"
#include "image.h"
#include "mirror-files.h"
#include "mirror-format.h"
#include "mirror.h"
#include "qemu.h"
#include "util.h"

/* QEMU's mirror keeps at most this much (16 requests) in flight, one buffer (default 16 MiB).
 * Local: 8 MiB as fast as 32 or 64 (bench/stream-bench), 128 slower. Behind 5 ms (remote-bench,
 * 2 x 3 rounds): 8 MiB 1.22-1.37x nbdcopy, 16 1.30, 32 1.09, 64 1.05: the reads wait on the server,
 * not on QEMU (0.4 s of CPU in 1.2 s). Granularity: QEMU's (the target's clusters; 1 MiB no faster). */
#define MIRROR_BUF_SIZE_LOCAL (8ULL << 20)
#define MIRROR_BUF_SIZE_REMOTE (32ULL << 20)

/* Tests only: SIGSTOP right before a step, its record on disk, to be killed there. */
static void test_stop_before(Disk *d, const char *step) {
        (void) test_hook_stop("BLOCKSTREAM_TEST_MIRROR_STOP", step,
                "Guest %s disk %s: mirror stopped before step '%s' (test hook).", d->host->name(d->guest), d->alias,
                step);
}

/* A step's context: the Guest outlives QMP callbacks, the Disk may not. */
typedef struct MirrorCall {
        Guest *guest;
        char *alias;
        char *job_id;
        sd_bus_message *msg; /* Start, until answered */
        int dir_fd, image_fd, overlay_fd;
        uint64_t bandwidth;
        /* The overlay's format options: if they are not QEMU's defaults, the new image is
         * formatted with them (blockdev-create) before drive-mirror takes it as it exists, and
         * check_fd (the new image) tells whether QEMU wrote what was asked for. */
        QemuQcow2Options format;
        bool own_format;
        int check_fd;
        sd_event_source *timer; /* a Start waiting for blockdev-create: how long it may wait */
} MirrorCall;

static void mirror_call_free(void *p) {
        MirrorCall *c = p;

        if (!c)
                return;
        if (c->msg)
                (void) sd_bus_reply_method_errorf(c->msg, BS_ERROR_NOT_RUNNING,
                        "The connection to QEMU closed while the mirror was being prepared.");
        sd_bus_message_unref(c->msg);
        sd_event_source_disable_unref(c->timer);
        closep(&c->dir_fd);
        closep(&c->image_fd);
        closep(&c->overlay_fd);
        closep(&c->check_fd);
        free(c->alias);
        free(c->job_id);
        free(c);
}

static MirrorCall *mirror_call_new(Disk *d) {
        MirrorCall *c = calloc(1, sizeof(MirrorCall));

        if (!c)
                return NULL;
        *c = (MirrorCall){
                .guest = d->guest, .dir_fd = -EBADF, .image_fd = -EBADF, .overlay_fd = -EBADF, .check_fd = -EBADF};
        c->alias = strdup(d->alias);
        c->job_id = d->job.id ? strdup(d->job.id) : NULL;
        if (!c->alias || (d->job.id && !c->job_id)) {
                mirror_call_free(c);
                return NULL;
        }
        return c;
}

/* The disk the call is for, if its mirror is still this one. */
static Disk *mirror_call_disk(MirrorCall *c) {
        Disk *d = guest_find_disk(c->guest, c->alias);

        if (!d || d->job.engine != STREAM_ENGINE_MIRROR || !streq_ptr(d->job.id, c->job_id))
                return NULL;
        return d;
}

/* Removing what a mirror made */

/* All a mirror that did not pivot made, in QEMU's order: the create job, the mirror job (its
 * target's user), the nodes, the fd set; then the new image. Errors mean "was not there". */
static void mirror_cleanup(Disk *d) {
        _cleanup_(mirror_names_done) MirrorNames n = {};
        Guest *g = d->guest;

        if (mirror_names(d->alias, d->job.id, d->job.overlay, &n) < 0) {
                log_warning(
                        "Guest %s disk %s: the mirror's journal names no image; nothing to remove.", g->name, d->alias);
                return;
        }
        if (guest_qmp_ready(g)) {
                Qmp *q = g->peer.qmp;
                (void) qemu_job_dismiss(q, n.create_job, NULL, NULL, NULL);
                if (d->job.id)
                        (void) qemu_job_dismiss(q, d->job.id, NULL, NULL, NULL);
                (void) qemu_blockdev_del(q, n.format_node, NULL, NULL, NULL);
                (void) qemu_blockdev_del(q, n.file_node, NULL, NULL, NULL);
                (void) qemu_remove_fd(q, n.fdset, NULL, NULL, NULL);
        }
        mirror_unlink_tmp(g->engine->config.image_dirs, g->name, &d->job, n.tmp);
        d->job.phase = 0; /* done: a restart has nothing left to remove */
        log_info("Guest %s disk %s: the mirror's image %s removed; %s left as it was.", g->name, d->alias, n.tmp,
                d->job.overlay);
}

/* What a preparation made goes, and the disk is no longer starting. */
static void prepare_undo(Disk *d) {
        mirror_cleanup(d);
        d->starting = d->mirror_busy = false;
        d->job.phase = 0;
        (void) guest_save(d->guest);
}

/* A Start that fails before the job began: nothing is reported but the caller's error. */
static void prepare_failed(MirrorCall *c, Disk *d, const char *what, int error, const char *desc) {
        bool gone = error == -ECONNRESET || error == -ENOTCONN;

        log_warning("Guest %s disk %s: the mirror could not %s: %s", c->guest->name, c->alias, what,
                desc ?: strerror(-error));
        if (d)
                prepare_undo(d); /* before the answer, which says that nothing was changed */
        if (c->msg)
                (void) sd_bus_reply_method_errorf(c->msg,
                        error == -EREMOTEIO ? BS_ERROR_QEMU_FAILED : gone ? BS_ERROR_NOT_RUNNING : SD_BUS_ERROR_FAILED,
                        "The mirror could not %s: %s. Nothing was changed.", what, desc ?: strerror(-error));
        c->msg = sd_bus_message_unref(c->msg);
}

/* Preparing: the image, its fd set, its nodes, then QEMU's mirror job. */

static void mirror_started(Qmp *q, int error, const char *desc, void *userdata) {
        MirrorCall *c = userdata;
        Disk *d = mirror_call_disk(c);

        if (!d) {
                /* Its job ended before QEMU answered for it (a QEMU out of order): the start is
                 * over all the same (no other start begins while this one is: Start is Busy). */
                d = guest_find_disk(c->guest, c->alias);
                if (d && d->starting && !streq_ptr(d->job.id, c->job_id))
                        d->starting = d->mirror_busy = false;
                return;
        }
        if (error < 0) {
                /* The job never ran: no Finished, the caller hears why. */
                d->job.state = STREAM_IDLE;
                prepare_failed(c, d, "start drive-mirror", error, desc);
                return;
        }
        d->starting = false;
        d->mirror_busy = false;
        log_info("Guest %s disk %s: stream started (mirror into a new image, then pivot; job %s).", c->guest->name,
                d->alias, d->job.id);
        disk_emit_job(d);
        guest_update_polling(c->guest);
        (void) sd_bus_reply_method_return(c->msg, NULL);
        c->msg = sd_bus_message_unref(c->msg);
}

/* Saved as COPY: the job exists for the state file before QEMU has it (a restart finds it, or
 * finds QEMU does not know it: failed, reported once). */
static void copy_saved(void *userdata) {
        MirrorCall *c = userdata, *next;
        _cleanup_(mirror_names_done) MirrorNames n = {};
        Disk *d = mirror_call_disk(c);
        int r;

        if (!d)
                return;
        r = mirror_names(d->alias, d->job.id, d->job.overlay, &n);
        if (r < 0 || !guest_qmp_ready(c->guest)) {
                d->job.state = STREAM_IDLE;
                prepare_failed(c, d, "start drive-mirror", r < 0 ? r : -ENOTCONN, NULL);
                return;
        }
        test_stop_before(d, "copy");
        next = mirror_call_new(d);
        if (!next) {
                d->job.state = STREAM_IDLE;
                prepare_failed(c, d, "start drive-mirror", -ENOMEM, NULL);
                return;
        }
        next->msg = TAKE_PTR(c->msg);
        r = qemu_drive_mirror_new(c->guest->peer.qmp, d->job.id, d->node_name, n.fdset, c->own_format, n.format_node,
                d->job.bandwidth, disk_backing_remote(d, NULL) ? MIRROR_BUF_SIZE_REMOTE : MIRROR_BUF_SIZE_LOCAL,
                mirror_started, next, mirror_call_free);
        if (r < 0) {
                c->msg = TAKE_PTR(next->msg);
                mirror_call_free(next);
                d->job.state = STREAM_IDLE;
                prepare_failed(c, d, "send drive-mirror", r, NULL);
        }
}

/* The new image is in QEMU's hands (and formatted, if it is ours to format): the job begins. */
static void image_ready(MirrorCall *c, Disk *d) {
        MirrorCall *next;
        _cleanup_free_ char *overlay = NULL;
        uint64_t dev, ino, bandwidth;
        int r;

        test_stop_before(d, "prepare");
        /* The job begins: from here on it is reported (Finished), whatever happens. */
        overlay = TAKE_PTR(d->job.overlay);
        dev = d->job.overlay_dev;
        ino = d->job.overlay_ino;
        bandwidth = c->bandwidth;
        r = job_begin(&d->job, c->job_id, STREAM_MODE_FULL, 0, d->size, d->size, bandwidth, now_usec(CLOCK_REALTIME));
        if (r < 0) {
                d->job.overlay = TAKE_PTR(overlay);
                prepare_failed(c, d, "record the job", r, NULL);
                return;
        }
        d->job.engine = STREAM_ENGINE_MIRROR;
        d->job.phase = MIRROR_STEP_COPY;
        d->job.overlay = TAKE_PTR(overlay);
        d->job.overlay_dev = dev;
        d->job.overlay_ino = ino;
        d->bandwidth = bandwidth;
        next = mirror_call_new(d);
        if (!next) {
                d->job.state = STREAM_IDLE;
                prepare_failed(c, d, "record the job", -ENOMEM, NULL);
                return;
        }
        next->msg = TAKE_PTR(c->msg);
        next->own_format = c->own_format;
        d->last_saved = now_usec(CLOCK_MONOTONIC);
        (void) guest_save_then(c->guest, copy_saved, next, mirror_call_free);
}

/* The Start waiting for blockdev-create, if it still waits (wait_failed(): it fails). */
static MirrorCall *mirror_wait_take(Disk *d) {
        MirrorCall *c = d->mirror_wait;

        d->mirror_wait = NULL;
        d->mirror_wait_free = NULL;
        return c;
}

static void wait_failed(Disk *d, const char *what, int error, const char *desc) {
        MirrorCall *c = mirror_wait_take(d);

        if (c)
                prepare_failed(c, d, what, error, desc);
        mirror_call_free(c);
}

/* The blockdev-create job concluded (mirror_on_event()): a success shows in the image. */
static void create_concluded(Disk *d) {
        _cleanup_(mirror_names_done) MirrorNames n = {};
        MirrorCall *c = mirror_wait_take(d);
        int r;

        if (!c)
                return;
        if (mirror_names(d->alias, d->job.id, d->job.overlay, &n) >= 0 && guest_qmp_ready(c->guest))
                (void) qemu_job_dismiss(c->guest->peer.qmp, n.create_job, NULL, NULL, NULL);
        r = mirror_format_check(c->check_fd, d->job.overlay, &c->format);
        if (r < 0)
                prepare_failed(c, d, "format the new image with the overlay's options (blockdev-create)", r,
                        r == -EPROTO ? "QEMU did not write the image asked for" : NULL);
        else
                image_ready(c, d);
        mirror_call_free(c);
}

/* blockdev-create refused: the Start waiting for its job fails. */
static void create_sent(Qmp *q, int error, const char *desc, void *userdata) {
        MirrorCall *c = userdata;
        Disk *d = mirror_call_disk(c);

        if (!d)
                return;
        if (error >= 0) {
                test_stop_before(d, "format");
                return; /* the job runs; its end comes as an event */
        }
        wait_failed(d, "format the new image with the overlay's options (blockdev-create)", error, desc);
}

/* QEMU took blockdev-create but does not end its job: the Start fails after QMPTimeoutSec=, as
 * for a command never answered, instead of the disk "starting" for as long as QEMU stays. */
static int create_timeout(sd_event_source *s, uint64_t usec, void *userdata) {
        MirrorCall *c = userdata;
        Disk *d = mirror_call_disk(c);

        if (d && d->mirror_wait == c)
                wait_failed(d, "format the new image with the overlay's options (blockdev-create)", -ETIMEDOUT,
                        "QEMU did not end its job within QMPTimeoutSec=");
        return 0;
}

static void fd_added(Qmp *q, int error, const char *desc, void *userdata) {
        _cleanup_(mirror_names_done) MirrorNames n = {};
        MirrorCall *c = userdata, *sent, *wait;
        Disk *d = mirror_call_disk(c);
        int r;

        if (!d || d->job.phase != MIRROR_STEP_PREPARE)
                return; /* cut short meanwhile (prepare_cut_short()): its image is gone */
        if (error < 0) {
                prepare_failed(c, d, "hand the new image to QEMU (add-fd)", error, desc);
                return;
        }
        if (!c->own_format) {
                image_ready(c, d);
                return;
        }
        /* The Start waits on the disk for the job's end (mirror_on_event()). */
        r = mirror_names(d->alias, d->job.id, d->job.overlay, &n);
        sent = r >= 0 ? mirror_call_new(d) : NULL;
        wait = sent ? mirror_call_new(d) : NULL;
        if (!wait || d->mirror_wait) {
                mirror_call_free(sent);
                mirror_call_free(wait);
                prepare_failed(c, d, "format the new image", r < 0 ? r : !wait ? -ENOMEM : -EBUSY, NULL);
                return;
        }
        r = qemu_blockdev_create_qcow2(q, n.create_job, n.fdset, &c->format, create_sent, sent, mirror_call_free);
        if (r < 0) {
                mirror_call_free(sent); /* not taken on failure (qemu.c) */
                mirror_call_free(wait);
                prepare_failed(c, d, "send blockdev-create", r, NULL);
                return;
        }
        wait->msg = TAKE_PTR(c->msg);
        wait->bandwidth = c->bandwidth;
        wait->format = c->format;
        wait->own_format = true;
        wait->check_fd = TAKE_FD(c->check_fd);
        if (sd_event_add_time_relative(d->guest->engine->event, &wait->timer, CLOCK_MONOTONIC,
                    d->guest->engine->config.qmp_timeout_usec, 0, create_timeout, wait) < 0)
                log_warning("Guest %s disk %s: no time limit on formatting the image.", d->guest->name, d->alias);
        d->mirror_wait = wait;
        d->mirror_wait_free = mirror_call_free;
}

/* Saved as PREPARE: a restart removes whatever of the image exists. Now create it. */
static void prepare_saved(void *userdata) {
        _cleanup_(mirror_names_done) MirrorNames n = {};
        MirrorCall *c = userdata, *next;
        Disk *d = mirror_call_disk(c);
        int r;

        if (!d || d->job.phase != MIRROR_STEP_PREPARE)
                return; /* removed meanwhile (mirror_resume_orphans()) */
        r = mirror_names(d->alias, d->job.id, d->job.overlay, &n);
        if (r < 0) {
                prepare_failed(c, d, "name the new image", r, NULL);
                return;
        }
        c->image_fd = openat(c->dir_fd, n.tmp, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY, 0600);
        if (c->image_fd < 0) {
                r = -errno;
                /* EEXIST: not ours (ours would have gone with its job): left alone. */
                prepare_failed(c, NULL, "create the new image beside the overlay", r, NULL);
                d->starting = false;
                d->mirror_busy = false;
                d->job.phase = 0;
                (void) guest_save(c->guest);
                return;
        }
        r = mirror_copy_identity(c->overlay_fd, c->image_fd);
        if (r < 0) {
                prepare_failed(c, d, "give the new image the overlay's owner, mode and label", r, NULL);
                return;
        }
        if (c->own_format) {
                c->check_fd = fcntl(c->image_fd, F_DUPFD_CLOEXEC, 3);
                if (c->check_fd < 0) {
                        prepare_failed(c, d, "keep an fd of the new image", -errno, NULL);
                        return;
                }
        }
        next = mirror_call_new(d);
        if (!next || !guest_qmp_ready(c->guest)) {
                mirror_call_free(next);
                prepare_failed(c, d, "hand the new image to QEMU", next ? -ENOTCONN : -ENOMEM, NULL);
                return;
        }
        next->msg = TAKE_PTR(c->msg);
        next->bandwidth = c->bandwidth;
        next->format = c->format;
        next->own_format = c->own_format;
        next->check_fd = TAKE_FD(c->check_fd);
        /* The fd goes to QEMU (qemu_add_fd() takes it, sent or not). */
        r = qemu_add_fd(c->guest->peer.qmp, n.fdset, TAKE_FD(c->image_fd), "blockstream-mirror", fd_added, next,
                mirror_call_free);
        if (r < 0) {
                c->msg = TAKE_PTR(next->msg);
                mirror_call_free(next);
                prepare_failed(c, d, "send add-fd", r, NULL);
        }
}

/* The overlay's file: QEMU's name for the top image, or where QEMU names it json:{…} (a guest
 * started the libvirt way, -blockdev with an explicit backing node) the file of its qcow2 node's
 * "file" child (qemu-reply.c). QEMU's word either way: used only once opened beneath an image
 * directory and found to be the file QEMU has open under that name. */
static const char *overlay_path(const Disk *d) {
        if (!path_is_safe_absolute(d->path, 4096) && d->file_path)
                return d->file_path;
        return d->path;
}

int mirror_try_start(
        Disk *d, sd_bus_message *msg, bool forced, const char *base_node, uint64_t bandwidth, sd_bus_error *error) {
        _cleanup_free_ char *err = NULL, *overlay = NULL, *id = NULL;
        _cleanup_close_ int dir_fd = -EBADF, overlay_fd = -EBADF;
        _cleanup_(mirror_names_done) MirrorNames names = {};
        Guest *g = d->guest;
        uint64_t needed = 0, avail = 0;
        QemuQcow2Options format;
        const char *leaf, *path = overlay_path(d);
        bool own_format, pinned, pin_writable = false;
        dev_t pin_dev = 0;
        ino_t pin_ino = 0;
        struct stat st, st_tmp;
        MirrorCall *c;
        int r;

        /* auto: also from a remote template (bench/remote-bench: behind 5 ms, the mirror's parallel
         * reads take a quarter of prefetch's time); prefetch where there is no room. The mirror
         * replaces the disk's nodes (and the overlay's inode): by default only where QEMU named
         * them itself, so that no management layer tracks the names it drops. */
        if (!forced && (g->engine->config.engine_mirror == ENGINE_MIRROR_NEVER ||
                               (g->engine->config.engine_mirror == ENGINE_MIRROR_AUTO && !d->names_by_qemu) ||
                               base_node || g->offline || strv_isempty(d->chain)))
                return 0;
        if (base_node)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                        "Engine 'mirror' copies the whole chain into one new image; it cannot keep base '%s'. Use "
                        "engine 'stream' or 'prefetch' with a base.",
                        base_node);
        if (g->offline)
                return sd_bus_error_setf(error, SD_BUS_ERROR_NOT_SUPPORTED,
                        "Engine 'mirror' needs a running guest; guest '%s' is not running. Use engine 'stream' or 'auto'.",
                        g->name);
        if (!path_is_safe_absolute(path, 4096) || !streq_ptr(d->format, "qcow2"))
                return forced ? sd_bus_error_setf(error, SD_BUS_ERROR_NOT_SUPPORTED,
                                        "Engine 'mirror' needs a qcow2 overlay named by an absolute path; disk '%s' is %s '%s'.",
                                        d->alias, strempty(d->format), strempty(d->path))
                              : 0;
        /* The file QEMU has open, by its /proc fd: what the rename may replace, and nothing else. */
        guest_pin_disks(g);
        if (path == d->path) {
                pinned = d->pinned;
                pin_writable = d->pin_writable;
                pin_dev = d->pin_dev;
                pin_ino = d->pin_ino;
        } else
                pinned = guest_qemu_has_open(g, path, &pin_dev, &pin_ino, &pin_writable) > 0;
        if (!pinned)
                return forced ? sd_bus_error_setf(error, SD_BUS_ERROR_FAILED,
                                        "Engine 'mirror': QEMU of guest '%s' is not seen with %s open.", g->name, path)
                              : 0;
        r = image_open_beneath(g->engine->config.image_dirs, path, false, &overlay_fd, &err);
        if (r >= 0 && fstat(overlay_fd, &st) < 0)
                r = -errno;
        if (r >= 0 && (st.st_dev != pin_dev || st.st_ino != pin_ino))
                r = -ESTALE;
        if (r >= 0)
                /* The overlay's directory, opened beneath an image directory, and its leaf there. */
                r = image_open_parent_beneath(g->engine->config.image_dirs, path, &dir_fd, &leaf, err ? NULL : &err);
        /* The directory opened is the one that holds the overlay (not one renamed into its place
         * in between): the new image goes beside it, and the rename happens in it. */
        if (r >= 0 && (image_entry_stat(dir_fd, leaf, &st) < 0 || st.st_dev != pin_dev || st.st_ino != pin_ino))
                r = -ESTALE;
        if (r < 0)
                return forced ? sd_bus_error_setf(error, SD_BUS_ERROR_FAILED, "Engine 'mirror' cannot use %s: %s", path,
                                        r == -ESTALE ? "it is no longer the file QEMU has open" : err ?: strerror(-r))
                              : 0;
        /* The rename replaces that file with one QEMU wrote: only where QEMU could write it anyway
         * (the pin says, of the very file opened above). A QEMU taken over names what it reads (a
         * template shared by every guest) as its disk. */
        if (!pin_writable)
                return forced ? sd_bus_error_setf(error, SD_BUS_ERROR_FAILED,
                                        "Engine 'mirror': QEMU of guest '%s' does not have %s open for writing; "
                                        "nothing was created.",
                                        g->name, path)
                              : 0;
        /* auto leaves an overlay of other options than QEMU's defaults to the stream engines,
         * which keep it (and its options): the mirror would zero its whole virtual size first. */
        r = mirror_format_of_overlay(overlay_fd, path, d->size, &format);
        if (r != 0 && !forced)
                return 0;
        if (r < 0)
                return sd_bus_error_set_errnof(error, -r, "Engine 'mirror' cannot read the format of %s: %m", path);
        /* A -drive disk (QEMU named its nodes) has auto-read-only=on, which drive-mirror's new image
         * would inherit: QEMU cannot open that one read-write from an fd set, so the image is
         * formatted first and opened as it exists (qemu_drive_mirror_new()). */
        own_format = r > 0 || d->names_by_qemu;
        r = mirror_check_space(dir_fd, d, &needed, &avail);
        if (r < 0) {
                char a[32], b[32];

                if (!forced)
                        return 0; /* auto: no room is a stream */
                if (r == -EROFS)
                        return sd_bus_error_setf(error, SD_BUS_ERROR_FAILED,
                                "Engine 'mirror' cannot create its new image beside %s: that file system is read-only "
                                "to the daemon (under the shipped unit, give the image directory in ReadWritePaths=). "
                                "Nothing was created; use engine 'stream' or 'prefetch'.",
                                path);
                if (r != -ENOSPC)
                        return sd_bus_error_set_errnof(
                                error, -r, "Engine 'mirror' cannot see the free space beside %s: %m", path);
                return sd_bus_error_setf(error, BS_ERROR_NO_SPACE,
                        "Engine 'mirror' needs %s free beside %s for the new image, and %s is free. Nothing was created; "
                        "free space there, or use engine 'stream' or 'prefetch'.",
                        format_bytes(a, sizeof(a), needed), path, format_bytes(b, sizeof(b), avail));
        }

        g->job_seq++;
        id = job_id_new(d->alias, g->job_seq);
        overlay = strdup(path);
        if (!id || !overlay)
                return -ENOMEM;
        r = mirror_names(d->alias, id, path, &names);
        if (r < 0)
                return sd_bus_error_set_errnof(
                        error, -r, "Engine 'mirror' cannot name the new image beside %s: %m", path);
        /* A new image of an earlier mirror kept there (QEMU was lost while it pivoted: it may hold
         * the guest's only copy of some writes) is never replaced, nor removed by this one's
         * clean-up. */
        if (image_entry_stat(dir_fd, names.tmp, &st_tmp) != -ENOENT)
                return forced ? sd_bus_error_setf(error, BS_ERROR_BUSY,
                                        "Engine 'mirror': %s is there beside %s, kept from an earlier mirror; see the "
                                        "disk's last Error, then remove it. Nothing was created.",
                                        names.tmp, path)
                              : 0;
        /* The journal's first record: the job is not begun (no Finished before it is), but its
         * names are, so that a restart removes what exists of the image. */
        job_done(&d->job);
        d->job.state = STREAM_IDLE;
        d->job.finished = false;
        d->job.concluded = false;
        d->job.id = TAKE_PTR(id);
        d->job.engine = STREAM_ENGINE_MIRROR;
        d->job.phase = MIRROR_STEP_PREPARE;
        d->job.overlay = TAKE_PTR(overlay);
        d->job.overlay_dev = st.st_dev;
        d->job.overlay_ino = st.st_ino;
        c = mirror_call_new(d);
        if (!c)
                return -ENOMEM;
        c->msg = sd_bus_message_ref(msg);
        c->bandwidth = bandwidth;
        c->dir_fd = TAKE_FD(dir_fd);
        c->overlay_fd = TAKE_FD(overlay_fd);
        c->format = format;
        c->own_format = own_format;
        d->starting = true;
        d->mirror_busy = true;
        d->last_saved = now_usec(CLOCK_MONOTONIC);
        (void) guest_save_then(g, prepare_saved, c, mirror_call_free);
        return 1;
}

/* Ready: the pivot */

static void complete_reply(Qmp *q, int error, const char *desc, void *userdata) {
        MirrorCall *c = userdata;
        Disk *d = mirror_call_disk(c);

        if (!d)
                return;
        d->mirror_busy = false;
        if (error < 0) {
                /* Still ready: the mirror goes on; the next poll or event tries again. */
                log_warning("Guest %s disk %s: job-complete of %s failed: %s", c->guest->name, d->alias, d->job.id,
                        desc ?: strerror(-error));
                return;
        }
        log_info("Guest %s disk %s: mirror in step, pivoting onto the new image (job %s).", c->guest->name, d->alias,
                d->job.id);
}

/* Saved as PIVOT: a restart completes the job again if QEMU still has it ready. */
static void pivot_saved(void *userdata) {
        MirrorCall *c = userdata, *next;
        Disk *d = mirror_call_disk(c);
        int r = -ENOMEM;

        if (!d)
                return;
        if (!guest_qmp_ready(c->guest)) {
                d->mirror_busy = false;
                return; /* the next connection finds it ready */
        }
        test_stop_before(d, "pivot");
        next = mirror_call_new(d);
        if (next) {
                r = qemu_job_complete(c->guest->peer.qmp, d->job.id, complete_reply, next, mirror_call_free);
                if (r < 0)
                        mirror_call_free(next);
        }
        if (r < 0) {
                d->mirror_busy = false;
                log_warning_errno(r, "Guest %s disk %s: cannot send job-complete: %m", c->guest->name, d->alias);
        }
}

static void mirror_ready(Disk *d) {
        MirrorCall *c;

        if (d->mirror_busy || d->job.cancel_requested || d->job.concluded || !job_is_active(&d->job) ||
                (d->job.phase != MIRROR_STEP_COPY && d->job.phase != MIRROR_STEP_PIVOT))
                return;
        c = mirror_call_new(d);
        if (!c) {
                log_oom();
                return;
        }
        d->job.phase = MIRROR_STEP_PIVOT;
        d->mirror_busy = true;
        d->last_saved = now_usec(CLOCK_MONOTONIC);
        (void) guest_save_then(d->guest, pivot_saved, c, mirror_call_free);
}

/* Pivoted: the rename */

static void done_saved(void *userdata) {
        MirrorCall *c = userdata;
        Disk *d = mirror_call_disk(c);

        if (!d)
                return;
        test_stop_before(d, "done");
        d->mirror_busy = false;
        log_info("Guest %s disk %s: %s now holds the new image, standing alone.", c->guest->name, d->alias,
                d->job.overlay);
        disk_apply_job_changes(d, job_conclude(&d->job, STREAM_COMPLETED, NULL));
}

/* Saved as RENAME: now swap the entries. */
static void rename_saved(void *userdata) {
        _cleanup_(mirror_names_done) MirrorNames n = {};
        MirrorCall *c = userdata, *next;
        Disk *d = mirror_call_disk(c);
        _cleanup_free_ char *qemu_name = NULL;
        const char *why = NULL;
        struct stat st;
        int r;

        if (!d)
                return;
        test_stop_before(d, "rename");
        r = mirror_names(d->alias, d->job.id, d->job.overlay, &n);
        if (r >= 0)
                r = mirror_rename_onto_overlay(
                        c->guest->engine->config.image_dirs, c->guest->name, &d->job, n.tmp, &st, &why);
        if (r < 0) {
                _cleanup_free_ char *text = strdup_printf(
                        "QEMU runs on the new image %s beside the overlay, but it could not take the overlay's place: %s "
                        "(%s). The file at %s was left as it is.",
                        n.tmp ?: "", why ?: "the rename failed", strerror(-r), d->job.overlay);
                log_error("Guest %s disk %s: %s", c->guest->name, d->alias, text ?: "the rename failed");
                d->mirror_busy = false;
                disk_apply_job_changes(d, job_conclude(&d->job, STREAM_FAILED, text ?: "the rename failed"));
                return;
        }
        /* QEMU goes on calling the image by its fd set: Path, the export's pins and the handoff
         * must see the overlay's path, as long as QEMU's node is this file (disk_set_pivot()). */
        qemu_name = strdup_printf("/dev/fdset/%u", n.fdset);
        r = qemu_name ? disk_set_pivot(d, qemu_name, d->job.overlay, (uint64_t) st.st_dev, (uint64_t) st.st_ino)
                      : -ENOMEM;
        if (r < 0)
                log_warning_errno(r, "Guest %s disk %s: cannot record the new image's path; Path shows QEMU's name: %m",
                        c->guest->name, d->alias);
        if (guest_qmp_ready(c->guest))
                (void) qemu_remove_fd(c->guest->peer.qmp, n.fdset, NULL, NULL, NULL);
        next = mirror_call_new(d);
        d->job.phase = MIRROR_STEP_DONE;
        if (!next) {
                disk_save(d);
                d->mirror_busy = false;
                disk_apply_job_changes(d, job_conclude(&d->job, STREAM_COMPLETED, NULL));
                return;
        }
        d->last_saved = now_usec(CLOCK_MONOTONIC);
        (void) guest_save_then(c->guest, done_saved, next, mirror_call_free);
}

/* Pending: both images hold the same data, the guest's I/O held. Saved as FINALIZE before QEMU
 * may pivot: a job lost from here on is finished without QEMU (mirror_on_lost()). */

static void finalize_saved(void *userdata) {
        MirrorCall *c = userdata;
        Disk *d = mirror_call_disk(c);

        if (!d || !d->mirror_finalize_saving)
                return; /* given up meanwhile (finalize_timeout()) */
        d->mirror_finalize_timer = sd_event_source_disable_unref(d->mirror_finalize_timer);
        d->mirror_busy = false;
        d->mirror_finalize_saving = false;
        test_stop_before(d, "finalize");
        blockjob_finalize(d);
}

/* FINALIZE could not be recorded in time (the state's file system full or failing): the guest's
 * I/O on the disk is held while the job waits, so the mirror is given up (no pivot). PIVOT is
 * queued again: it replaces the FINALIZE still waiting to be written, so the file never says a
 * pivot may have happened. */
#define MIRROR_FINALIZE_RECORD_USEC (10 * USEC_PER_SEC)

static int finalize_timeout(sd_event_source *s, uint64_t usec, void *userdata) {
        Disk *d = userdata;
        Guest *g = d->guest;

        d->mirror_finalize_timer = sd_event_source_disable_unref(d->mirror_finalize_timer);
        if (!d->mirror_finalize_saving || d->job.phase != MIRROR_STEP_FINALIZE)
                return 0;
        log_error("Guest %s disk %s: the mirror's FINALIZE step could not be recorded in %u s; giving the mirror up "
                  "(the guest's I/O on the disk waits meanwhile).",
                g->name, d->alias, (unsigned) (MIRROR_FINALIZE_RECORD_USEC / USEC_PER_SEC));
        d->mirror_finalize_saving = false;
        d->mirror_busy = false;
        d->job.phase = MIRROR_STEP_PIVOT;
        d->job.cancel_requested = true;
        /* Queued, not waited for (a hung disk would hold the loop): it replaces the FINALIZE
         * still queued. Should that one be landing now, the cancel (no pivot) is what counts:
         * the concluded job's clean-up removes the new image, which then cannot be renamed. */
        guest_save_later(g);
        if (guest_qmp_ready(g) && d->job.id)
                (void) qemu_block_job_cancel(g->peer.qmp, d->job.id, NULL, NULL, NULL);
        return 0;
}

static unsigned mirror_pending(Disk *d, unsigned changed) {
        MirrorCall *c;

        if (!(changed & JOB_NEEDS_FINALIZE) || d->job.phase > MIRROR_STEP_FINALIZE)
                return changed;
        /* Not before its record is on disk; a restart's reconciliation finalizes a FINALIZE. */
        if (d->job.phase == MIRROR_STEP_FINALIZE)
                return d->mirror_finalize_saving ? changed & ~JOB_NEEDS_FINALIZE : changed;
        if (d->job.phase != MIRROR_STEP_PIVOT)
                return changed; /* no pivot asked for: QEMU's finalize only ends the job */
        if (d->job.cancel_requested) {
                /* Given up (finalize_timeout(), or a Cancel that crossed job-complete): never
                 * finalized; the cancel again, in case the connection lost it. */
                if (guest_qmp_ready(d->guest) && d->job.id)
                        (void) qemu_block_job_cancel(d->guest->peer.qmp, d->job.id, NULL, NULL, NULL);
                return changed & ~JOB_NEEDS_FINALIZE;
        }
        c = mirror_call_new(d);
        if (!c) {
                log_oom();
                return changed & ~JOB_NEEDS_FINALIZE; /* the next poll asks again */
        }
        test_stop_before(d, "pending");
        d->job.phase = MIRROR_STEP_FINALIZE;
        d->mirror_busy = true;
        d->mirror_finalize_saving = true;
        d->last_saved = now_usec(CLOCK_MONOTONIC);
        d->mirror_finalize_timer = sd_event_source_disable_unref(d->mirror_finalize_timer);
        if (sd_event_add_time_relative(d->guest->engine->event, &d->mirror_finalize_timer, CLOCK_MONOTONIC,
                    MIRROR_FINALIZE_RECORD_USEC, 0, finalize_timeout, d) < 0)
                log_warning("Guest %s disk %s: no time limit on recording the mirror's FINALIZE step.",
                        d->guest->name, d->alias);
        (void) guest_save_then(d->guest, finalize_saved, c, mirror_call_free);
        return changed & ~JOB_NEEDS_FINALIZE;
}

/* QEMU concluded the job: hold a completion back until the rename is done; anything else ends
 * the mirror, which leaves the overlay as it was. */
static unsigned mirror_concluded(Disk *d, unsigned changed) {
        MirrorCall *c;

        if (d->job.outcome != STREAM_COMPLETED || d->job.phase < MIRROR_STEP_PIVOT) {
                /* Cancelled after ready is "completed" by QEMU, without the pivot. */
                if (d->job.outcome == STREAM_COMPLETED) {
                        d->job.outcome = STREAM_CANCELLED;
                        d->job.error = mfree(d->job.error);
                }
                if (d->job.phase < MIRROR_STEP_RENAME)
                        mirror_cleanup(d);
                return changed;
        }
        if (d->job.phase == MIRROR_STEP_DONE)
                return changed;
        d->job.concluded = false; /* not yet: after the rename */
        changed &= ~JOB_NOW_CONCLUDED;
        if (d->mirror_busy)
                return changed;
        c = mirror_call_new(d);
        if (!c) {
                log_oom();
                return changed; /* the next poll tries again */
        }
        d->job.phase = MIRROR_STEP_RENAME;
        d->mirror_busy = true;
        d->last_saved = now_usec(CLOCK_MONOTONIC);
        (void) guest_save_then(d->guest, rename_saved, c, mirror_call_free);
        return changed;
}

unsigned mirror_on_event(Disk *d, const QemuJobEvent *ev, unsigned changed) {
        if (d->job.engine != STREAM_ENGINE_MIRROR || !ev->id)
                return changed;
        if (ev->kind == QEMU_EVENT_JOB_STATUS_CHANGE && ev->status == QEMU_JOB_CONCLUDED && d->job.overlay) {
                _cleanup_(mirror_names_done) MirrorNames n = {};

                if (mirror_names(d->alias, d->job.id, d->job.overlay, &n) >= 0 && streq(ev->id, n.create_job)) {
                        if (d->mirror_wait)
                                create_concluded(d);
                        else if (guest_qmp_ready(d->guest)) /* given up (create_timeout()) */
                                (void) qemu_job_dismiss(d->guest->peer.qmp, ev->id, NULL, NULL, NULL);
                        return changed;
                }
        }
        if (!streq_ptr(ev->id, d->job.id))
                return changed;
        if (ev->kind == QEMU_EVENT_JOB_STATUS_CHANGE && ev->status == QEMU_JOB_READY)
                mirror_ready(d);
        changed = mirror_pending(d, changed);
        if (changed & JOB_NOW_CONCLUDED)
                changed = mirror_concluded(d, changed);
        return changed;
}

unsigned mirror_on_info(Disk *d, const QemuBlockJob *info, unsigned changed) {
        if (d->job.engine != STREAM_ENGINE_MIRROR || !streq_ptr(info->id, d->job.id))
                return changed;
        if (info->status == QEMU_JOB_READY)
                mirror_ready(d);
        changed = mirror_pending(d, changed);
        if (changed & JOB_NOW_CONCLUDED)
                changed = mirror_concluded(d, changed);
        return changed;
}

/* A preparation cut short (connection, QEMU's disk or daemon lost): what exists of it goes. */
static bool prepare_cut_short(Disk *d, const char *wait_why) {
        if (d->job.engine != STREAM_ENGINE_MIRROR || d->job.phase != MIRROR_STEP_PREPARE || job_is_active(&d->job))
                return false;
        if (d->mirror_wait) { /* waiting for blockdev-create: the Start fails now */
                wait_failed(d, wait_why, -ECONNRESET, NULL);
                return true;
        }
        log_info("Guest %s disk %s: preparing a mirror was cut short; removing it.", d->guest->name, d->alias);
        prepare_undo(d);
        return true;
}

void mirror_start_lost(Disk *d) {
        (void) prepare_cut_short(d, "format the new image before QEMU went away or dropped the disk");
}

void mirror_resume_orphans(Guest *g) {
        for (size_t i = 0; i < g->n_disks; i++) {
                Disk *d = g->disks[i];

                if (d->job.engine != STREAM_ENGINE_MIRROR)
                        continue;
                /* The old connection's calls are gone: a step waiting for one goes again. */
                d->mirror_busy = false;
                if (prepare_cut_short(d, "format the new image before the connection to QEMU closed"))
                        continue;
                /* A job that ended (lost by QEMU, failed) before QEMU could pivot: what it made
                 * goes. From FINALIZE on, mirror_on_lost() decided, and the new image stays. */
                if (d->job.phase > 0 && d->job.phase < MIRROR_STEP_FINALIZE && (d->job.concluded || d->job.finished))
                        mirror_cleanup(d);
        }
}
