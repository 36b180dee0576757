/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* The mirror's steps on the file system (mirror-files.c): the new image beside the overlay
 * (job->overlay, as QEMU had it open: job->overlay_dev, job->overlay_ino), by the directory's fd. */

#include <sys/stat.h>

#include "job.h"

typedef struct Disk Disk;

/* The steps of the mirror's journal, in job.phase (mirror.h says what each means). */
enum {
        MIRROR_STEP_PREPARE = 1,
        MIRROR_STEP_COPY,
        MIRROR_STEP_PIVOT,
        MIRROR_STEP_FINALIZE,
        MIRROR_STEP_RENAME,
        MIRROR_STEP_DONE,
};

/* What a step needs; named by the disk (one mirror at a time per disk), not by the job: a job
 * QEMU lost has no id left, and what its preparation made must still be found, also after a
 * restart. But the formatting job by the Start's job id (job_id; the disk's if NULL): one QEMU
 * still runs after its Start gave up must neither block the next Start's nor pass for it. */
typedef struct MirrorNames {
        char *file_node, *format_node, *create_job, *tmp;
        unsigned fdset;
} MirrorNames;
int mirror_names(const char *alias, const char *job_id, const char *overlay, MirrorNames *ret);
void mirror_names_done(MirrorNames *n);

/* The bytes the images of path's chain (format: its top's) take on their file systems, summed:
 * at least the data a flattened copy holds, read from the headers we trust (not QEMU's word),
 * opened as owner would (storage_chain_open_owned()). < 0 where that cannot be told: a chain we
 * cannot open (a remote backing, one the owner may not read), or an image that is not a regular
 * file (a block device has no st_blocks). */
int mirror_chain_allocated(char *const *image_dirs, uid_t owner, const char *path, const char *format, uint64_t *ret);
/* Is there room beside d's overlay (dir_fd) for the copy? -ENOSPC if not, -EROFS if we may not
 * write there at all (a read-only mount: under the shipped unit, a directory outside
 * ReadWritePaths=); *ret_needed, *ret_free. */
int mirror_check_space(int dir_fd, const Disk *d, uint64_t *ret_needed, uint64_t *ret_free);
/* The new image's entry tmp, unlinked if it is a regular file and not the overlay. */
void mirror_unlink_tmp(char *const *image_dirs, const char *guest, const Job *j, const char *tmp);
/* The new image (fd) as a non-root QEMU may use it: the overlay's owner, mode and SELinux label. */
int mirror_copy_identity(int overlay_fd, int fd);
/* Swap tmp onto the overlay's entry; unlink what came out if it is the overlay QEMU had open,
 * else swap back. Idempotent for a restart at any point: 0 when the overlay's entry holds the new
 * image (*ret_new: its stat) and the old one is gone, -EBUSY (why in *ret_why) when the entry was
 * not the overlay (it is back in place, untouched). */
int mirror_rename_onto_overlay(
        char *const *image_dirs, const char *guest, const Job *j, const char *tmp, struct stat *ret_new, const char **ret_why);

/* d's job is lost: QEMU went away, or no longer knows it (guest-peer.c). From FINALIZE on the
 * mirror finishes here, without QEMU (mirror.h), and returns true (the job concluded); false:
 * the caller fails the job. */
bool mirror_on_lost(Disk *d);
