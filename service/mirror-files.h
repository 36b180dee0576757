/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* The mirror's steps on the file system (mirror-files.c): the new image beside the overlay
 * (job->overlay, as QEMU had it open: job->overlay_dev, job->overlay_ino), by the directory's fd. */

#include <sys/stat.h>

#include "job.h"

/* The bytes the images of path's chain (format: its top's) take on their file systems, summed:
 * at least the data a flattened copy holds, read from the headers we trust (not QEMU's word).
 * < 0 where that cannot be told: a chain we cannot open (a remote backing), or an image that is
 * not a regular file (a block device has no st_blocks). */
int mirror_chain_allocated(char *const *image_dirs, const char *path, const char *format, uint64_t *ret);
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
