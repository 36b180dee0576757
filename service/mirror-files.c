/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* The mirror's work on directory entries (mirror-files.h), by the fd of the overlay's directory,
 * opened beneath an image directory with no symlink followed. */

#include <fcntl.h>
#include <selinux/selinux.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/xattr.h>
#include <unistd.h>

#include "disk.h"
#include "engine.h"
#include "guest.h"
#include "image.h"
#include "mirror-files.h"
#include "storage.h"
#include "util.h"

#ifndef RENAME_EXCHANGE
#define RENAME_EXCHANGE (1 << 1)
#endif

int mirror_chain_allocated(char *const *image_dirs, uid_t owner, const char *path, const char *format, uint64_t *ret) {
        _cleanup_(image_chain_done) ImageChain chain = {};
        _cleanup_free_ char *error = NULL;
        uint64_t sum = 0;
        int r;

        /* As the owner opens it: what their header names (rewritten after QEMU opened it) is read
         * only if they could read it, else its size would tell them of a file they may not see. */
        r = storage_chain_open_owned(image_dirs, owner, path, format, false, NULL, NULL, &chain, &error);
        if (r < 0)
                return r;
        for (size_t i = 0; i < chain.n; i++) {
                struct stat st;

                if (fstat(chain.images[i].fd, &st) < 0)
                        return -errno;
                if (!S_ISREG(st.st_mode))
                        return -EMEDIUMTYPE;
                if (add_overflows_u64(sum, (uint64_t) st.st_blocks * 512U, &sum))
                        return -EOVERFLOW;
        }
        *ret = sum;
        return 0;
}

/* Our fd sets in the guest's QEMU: this plus a number of the disk's (QEMU's own start at 0). */
#define MIRROR_FDSET_BASE 1000000000ULL
#define MIRROR_TMP_SUFFIX ".bs-mirror"

void mirror_names_done(MirrorNames *n) {
        free(n->file_node), free(n->format_node), free(n->create_job), free(n->tmp);
        *n = (MirrorNames){};
}

int mirror_names(const char *disk_alias, const char *job_id, const char *overlay, MirrorNames *ret) {
        _cleanup_(mirror_names_done) MirrorNames n = {};
        _cleanup_free_ char *alias = strdup(disk_alias);
        const char *leaf;

        if (!alias)
                return -ENOMEM;
        if (!overlay || !(leaf = strrchr(overlay, '/')))
                return -EINVAL;
        leaf++;
        if (strlen(leaf) + strlen(MIRROR_TMP_SUFFIX) + 1 > 255)
                return -ENAMETOOLONG;
        /* A QEMU id whatever the alias, as job ids are made. */
        for (char *p = alias; *p; p++)
                *p = qemu_id_char(*p);
        n.fdset = (unsigned) (MIRROR_FDSET_BASE + fnv1a32(disk_alias) % 1000000000U);
        n.file_node = strdup_printf("bsmf-%s", alias);
        n.format_node = strdup_printf("bsmq-%s", alias);
        n.create_job = strdup_printf("bsmc-%s", job_id ?: alias);
        n.tmp = strdup_printf(".%s" MIRROR_TMP_SUFFIX, leaf);
        if (!n.file_node || !n.format_node || !n.create_job || !n.tmp)
                return -ENOMEM;
        *ret = n;
        n = (MirrorNames){};
        return 0;
}

/* The new image's metadata and what the guest writes meanwhile: beyond the data itself. */
#define MIRROR_SPACE_MARGIN (256ULL << 20)

/* Is there room beside the overlay for the copy? -ENOSPC if not, -EROFS if we may not write there
 * at all (a read-only mount: under the shipped unit, a directory outside ReadWritePaths=);
 * *ret_needed, *ret_free. */
int mirror_check_space(int dir_fd, const Disk *d, uint64_t *ret_needed, uint64_t *ret_free) {
        uint64_t needed, avail, alloc, meta, cs;
        struct statvfs sv;
        int r;

        if (fstatvfs(dir_fd, &sv) < 0)
                return -errno;
        if (sv.f_flag & ST_RDONLY)
                return -EROFS;
        /* The copy holds the data of the whole chain: at most the virtual size, plus its metadata. */
        if (add_overflows_u64(d->size, MIRROR_SPACE_MARGIN + d->size / 64, &needed))
                needed = UINT64_MAX;
        /* At most what the chain's images take, too (a sparse 1 TiB disk holding 1 GiB needs about
         * 1 GiB): plus the new image's L1/L2 tables for the whole virtual size, its refcounts, and
         * the margin (what the guest writes meanwhile). */
        /* The headers' chain is what QEMU reads only when QEMU opened the overlay by its path; with
         * explicit backing nodes (json:{…}) it may be another: the virtual size then. */
        r = d->file_path ? -EMEDIUMTYPE
                         : mirror_chain_allocated(d->guest->engine->config.image_dirs, d->guest->owner, d->path,
                                   d->format, &alloc);
        if (r >= 0) {
                cs = d->cluster_size >= 512 && d->cluster_size <= (2U << 20) ? d->cluster_size : 65536;
                meta = d->size / cs * 8 + alloc / cs * 2 + 4 * cs;
                if (!add_overflows_u64(alloc, alloc / 64 + meta + MIRROR_SPACE_MARGIN, &alloc))
                        needed = MIN(needed, alloc);
        } else
                log_debug_errno(r, "Guest %s disk %s: the chain's allocation is unknown, counting the virtual size: %m",
                        d->guest->name, d->alias);
        avail = (uint64_t) sv.f_bavail * (uint64_t) sv.f_frsize;
        if (ret_needed)
                *ret_needed = needed;
        if (ret_free)
                *ret_free = avail;
        return avail >= needed ? 0 : -ENOSPC;
}

/* The new image's entry, unlinked by the directory's fd if it is a regular file, not the overlay. */
void mirror_unlink_tmp(char *const *image_dirs, const char *guest, const Job *j, const char *tmp) {
        _cleanup_free_ char *error = NULL;
        _cleanup_close_ int dir_fd = -EBADF;
        const char *leaf;
        struct stat st;
        int r;

        r = image_open_parent_beneath(image_dirs, j->overlay, &dir_fd, &leaf, &error);
        if (r < 0) {
                log_warning("Guest %s: cannot open the directory of %s to remove the mirror's image: %s", guest,
                        j->overlay, error ?: strerror(-r));
                return;
        }
        r = image_entry_stat(dir_fd, tmp, &st);
        if (r < 0) {
                if (r != -ENOENT)
                        log_warning_errno(r, "Guest %s: cannot look at %s: %m", guest, tmp);
                return;
        }
        if (!S_ISREG(st.st_mode) || (st.st_dev == j->overlay_dev && st.st_ino == j->overlay_ino)) {
                log_warning("Guest %s: %s beside %s is not the mirror's image; left alone.", guest, tmp, j->overlay);
                return;
        }
        if (unlinkat(dir_fd, tmp, 0) < 0)
                log_warning_errno(errno, "Guest %s: cannot remove %s: %m", guest, tmp);
}

/* The new image as a non-root QEMU may use it: the overlay's owner, mode and SELinux label. */
/* The overlay's access ACL onto the new image, or none: the new file inherited its directory's
 * default ACL when it was made, and the fchmod() after this would widen that ACL's mask: users
 * the directory names would read a disk its overlay never let them read. */
static int copy_access_acl(int overlay_fd, int fd) {
        static const char name[] = "system.posix_acl_access";
        _cleanup_free_ void *acl = NULL;
        ssize_t n;

        n = fgetxattr(overlay_fd, name, NULL, 0);
        if (n < 0 && errno != ENODATA && errno != EOPNOTSUPP)
                return -errno;
        if (n <= 0) {
                if (fremovexattr(fd, name) < 0 && errno != ENODATA && errno != EOPNOTSUPP)
                        return -errno;
                return 0;
        }
        if (n > 65536)
                return -E2BIG;
        acl = malloc(n);
        if (!acl)
                return -ENOMEM;
        n = fgetxattr(overlay_fd, name, acl, n);
        if (n < 0)
                return -errno; /* ERANGE: it grew meanwhile; the caller gives up */
        return fsetxattr(fd, name, acl, n, 0) < 0 ? -errno : 0;
}

int mirror_copy_identity(int overlay_fd, int fd) {
        struct stat st;
        int r;

        if (fstat(overlay_fd, &st) < 0)
                return -errno;
        r = copy_access_acl(overlay_fd, fd);
        if (r < 0)
                return r;
        /* Permission bits only: a set-id or sticky bit on a disk image is a mistake to drop, and
         * the daemon's own filter refuses set-id bits (sandbox_forbid_setid(): EPERM). */
        if (fchown(fd, st.st_uid, st.st_gid) < 0 || fchmod(fd, st.st_mode & 0777) < 0)
                return -errno;
        if (is_selinux_enabled() > 0) {
                char *con = NULL;

                if (fgetfilecon(overlay_fd, &con) < 0)
                        return -errno;
                r = fsetfilecon(fd, con) < 0 ? -errno : 0;
                freecon(con);
                return r;
        }
        return 0;
}

static int fsync_dir_at(int dir_fd) {
        _cleanup_close_ int fd = openat(dir_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);

        return fd < 0 || fsync(fd) < 0 ? -errno : 0;
}

/* Swap the new image (tmp) onto the overlay's entry; unlink what came out if it is the overlay
 * QEMU had open, else swap back. Idempotent for a restart at any point: 0 when the overlay's
 * entry holds the new image and the old one is gone, -EBUSY (why in *ret_why) when the entry
 * was not the overlay (it is back in place, untouched). */
int mirror_rename_onto_overlay(
        char *const *image_dirs, const char *guest, const Job *j, const char *tmp, struct stat *ret_new, const char **ret_why) {
        _cleanup_free_ char *error = NULL;
        _cleanup_close_ int dir_fd = -EBADF;
        struct stat st;
        const char *leaf;
        int r;

        r = image_open_parent_beneath(image_dirs, j->overlay, &dir_fd, &leaf, &error);
        if (r < 0) {
                *ret_why = "the overlay's directory cannot be opened";
                return r;
        }
        r = image_entry_stat(dir_fd, tmp, &st);
        if (r < 0) {
                if (r != -ENOENT)
                        return r;
                /* Nothing under the temporary name: exchanged and unlinked before a restart. */
                r = image_entry_stat(dir_fd, leaf, ret_new);
                if (r < 0)
                        return r;
                return ret_new->st_dev == j->overlay_dev && ret_new->st_ino == j->overlay_ino ? -ENOENT : 0;
        }
        if (!(st.st_dev == j->overlay_dev && st.st_ino == j->overlay_ino)) {
                if (renameat2(dir_fd, tmp, dir_fd, leaf, RENAME_EXCHANGE) < 0) {
                        *ret_why = "the exchange of the directory entries failed";
                        return -errno;
                }
                r = image_entry_stat(dir_fd, tmp, &st);
                if (r < 0 || !S_ISREG(st.st_mode) || st.st_dev != j->overlay_dev || st.st_ino != j->overlay_ino) {
                        /* Someone put another file at the overlay's path: it goes back, untouched. */
                        if (renameat2(dir_fd, tmp, dir_fd, leaf, RENAME_EXCHANGE) < 0)
                                log_error_errno(errno, "Guest %s: cannot swap %s back: %m", guest, j->overlay);
                        *ret_why = "the overlay's path no longer names the file QEMU had open";
                        return -EBUSY;
                }
        }
        if (unlinkat(dir_fd, tmp, 0) < 0)
                return -errno;
        /* What QEMU runs on now, under the overlay's name. */
        r = image_entry_stat(dir_fd, leaf, ret_new);
        if (r < 0)
                return r;
        /* On disk before the journal says DONE: a power loss must not bring the old entry back
         * with the journal past the rename. dir_fd is an O_PATH fd: fsync needs one opened. The
         * exchange is done either way: a failure is only warned of. */
        r = fsync_dir_at(dir_fd);
        if (r < 0)
                log_warning_errno(r, "Guest %s: cannot sync the directory of %s after the rename: %m", guest,
                        j->overlay);
        return 0;
}

/* Finishing a pivot without QEMU (mirror.h) */

/* The old overlay, opened by the directory's fd under its name or under tmp (exchanged, not yet
 * unlinked); -1 in *ret_fd if it is under neither (gone). */
static int old_overlay_open(char *const *image_dirs, const Job *j, const char *tmp, int *ret_fd) {
        _cleanup_free_ char *error = NULL;
        _cleanup_close_ int dir_fd = -EBADF;
        const char *leaf, *names[2];
        int r;

        *ret_fd = -1;
        r = image_open_parent_beneath(image_dirs, j->overlay, &dir_fd, &leaf, &error);
        if (r < 0)
                return r;
        names[0] = leaf;
        names[1] = tmp;
        for (size_t i = 0; i < 2; i++) {
                _cleanup_close_ int fd = image_entry_open(dir_fd, names[i], O_RDONLY | O_NONBLOCK | O_NOCTTY);
                struct stat st;

                if (fd < 0) {
                        if (fd == -ENOENT)
                                continue;
                        return fd;
                }
                if (fstat(fd, &st) < 0)
                        return -errno;
                if (S_ISREG(st.st_mode) && st.st_dev == j->overlay_dev && st.st_ino == j->overlay_ino) {
                        *ret_fd = TAKE_FD(fd);
                        return 0;
                }
        }
        return 0;
}

bool mirror_on_lost(Disk *d) {
        _cleanup_(mirror_names_done) MirrorNames n = {};
        _cleanup_free_ char *text = NULL;
        Guest *g = d->guest;
        _cleanup_close_ int old_fd = -EBADF;
        const char *why = NULL;
        struct stat st;
        pid_t holder = 0;
        int r;

        /* DONE too: renamed, its record on its way; the rename is found done again. */
        if (d->job.engine != STREAM_ENGINE_MIRROR || d->job.phase < MIRROR_STEP_FINALIZE ||
                d->job.phase > MIRROR_STEP_DONE || d->job.concluded)
                return false;
        d->mirror_busy = false;
        d->mirror_finalize_saving = false;
        d->job.id = mfree(d->job.id); /* QEMU has it no more */
        r = mirror_names(d->alias, d->job.id, d->job.overlay, &n);
        /* QEMU may have pivoted, and the guest written to the new image since: it takes the
         * overlay's place, unless a process (a QEMU started again on the overlay) reads the old. */
        if (r >= 0)
                r = old_overlay_open(g->engine->config.image_dirs, &d->job, n.tmp, &old_fd);
        if (r >= 0 && old_fd >= 0) {
                r = host_holds_open(old_fd, &holder);
                if (r > 0) {
                        why = "a process has the old overlay open";
                        r = -EBUSY;
                } else if (r < 0)
                        why = "the processes that may have the old overlay open cannot all be looked at";
        }
        if (r >= 0)
                r = mirror_rename_onto_overlay(g->engine->config.image_dirs, g->name, &d->job, n.tmp, &st, &why);
        if (r < 0) {
                text = strdup_printf(
                        "QEMU was lost while the mirror pivoted. The new image %s beside %s holds the disk as of the "
                        "pivot, and the guest's writes since if QEMU had pivoted; it could not take the overlay's place: "
                        "%s (%s%s%.0d). It was kept. %s holds the writes of any QEMU started on it since: see which "
                        "holds the guest's latest data before renaming the new image onto it or removing it.",
                        n.tmp ?: "", d->job.overlay, why ?: "the rename failed", strerror(-r), holder > 0 ? ", pid " : "",
                        (int) holder, d->job.overlay);
                log_error("Guest %s disk %s: %s", g->name, d->alias, text ?: "the rename failed");
                disk_apply_job_changes(d, job_conclude(&d->job, STREAM_FAILED, text ?: "the rename failed"));
                return true;
        }
        log_info("Guest %s disk %s: QEMU was lost after the pivot; %s now holds the new image, standing alone.", g->name,
                d->alias, d->job.overlay);
        d->job.phase = MIRROR_STEP_DONE;
        disk_apply_job_changes(d, job_conclude(&d->job, STREAM_COMPLETED, NULL));
        return true;
}
