/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* Disk images of a guest that is not running: opened by us (root), handed to a sandboxed QEMU as fds.
 *
 * An image header is user data. Formats are never probed, and a backing file named in a header is
 * opened only if it lies inside a configured image directory, reached without any symlink and without
 * crossing a mount. What a header says is image-format.h's. No D-Bus, no QEMU: only files and headers. */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/stat.h>

#include "image-format.h"

typedef struct ImageChain {
        Image *images;
        size_t n;
} ImageChain; /* [0] = top, then backings */

/* Close every fd of the chain and free it; c->images = NULL, c->n = 0 afterwards. NULL and an
 * already emptied chain are fine. */
void image_chain_done(ImageChain *c);

/* Open path for reading (and writing if writable) beneath one of dirs without following any symlink
 * and without leaving the directory: openat2() with RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|
 * RESOLVE_NO_MAGICLINKS|RESOLVE_NO_XDEV relative to an O_PATH fd of the matching directory (the
 * longest one of dirs that path lies strictly below). The directories themselves are configuration
 * and trusted; everything below them is not.
 *
 * path must be a normalized absolute path. The file must be a regular file or a block device (it is
 * looked at through an O_PATH fd first, so a FIFO or a character device is never opened). O_CLOEXEC|O_NOCTTY
 * always, never O_CREAT; the fd is returned blocking.
 *
 * Returns 0 and *ret_fd, or -errno and a malloc'd message in *ret_error (if ret_error is not NULL;
 * untouched on success): -EPERM if path is not inside any dir, -ELOOP if path is or passes through a
 * symlink, -EXDEV if it crosses a mount, -EISDIR/-EINVAL for a directory/other file types, -ESTALE if
 * the file was replaced between the look and the open, -EINVAL if path is not normalized, -ENOSYS
 * without openat2(), other -errno from the kernel. */
int image_open_beneath(char *const *dirs, const char *path, bool writable, int *ret_fd, char **ret_error);

/* The whole chain, top first: opens every image with image_open_beneath() (the top read-write if
 * writable, backings read-only), reads each header, follows the backing files. At most 32 images.
 *
 * Refused with a message in *ret_error, and nothing left open: a backing outside dirs (-EPERM), a
 * symlink anywhere below a directory (-ELOOP), a backing without a recorded backing format (we never
 * probe: "rebase with -F"; -EINVAL), a format other than qcow2/raw (-EOPNOTSUPP), a loop: the same
 * path or the same st_dev/st_ino twice (-ELOOP), more than 32 images (-E2BIG), an image that is the
 * same file (st_dev/st_ino of the opened fd, not the name) as a path in forbidden, other guests'
 * writable disks (-EBUSY), and everything image_read_header() refuses. forbidden may be NULL; its
 * paths are trusted (our own state) and stat()ed, missing ones are skipped.
 *
 * On success *ret owns the images and their fds (free with image_chain_done()); on failure *ret is
 * untouched. */
int image_chain_open(char *const *dirs, const char *path, const char *format, bool writable, char *const *forbidden,
        ImageChain *ret, char **ret_error);

/* An entry of a directory opened by image_open_parent_beneath(), opened (flags: open()'s, with
 * O_NOFOLLOW implied) or stat()ed without following it or crossing a mount: a FUSE file system
 * mounted on the name would be asked, and might never answer. A mount point is -EXDEV; a symlink
 * is -ELOOP to open, and stat()s as the link itself. A fd or -errno; 0 or -errno. */
int image_entry_open(int dir_fd, const char *name, int flags);
int image_entry_stat(int dir_fd, const char *name, struct stat *ret);

/* The directory that is to hold a new file path, opened (O_PATH) beneath one of dirs exactly as
 * image_open_beneath() opens images: no symlink, no "..", no mount crossed below the directory.
 * *ret_leaf points into path: the last component, to be created with openat(*ret_dir_fd, leaf,
 * O_CREAT|O_EXCL|O_NOFOLLOW, …). Errors as image_open_beneath(), with a message in *ret_error. */
int image_open_parent_beneath(
        char *const *dirs, const char *path, int *ret_dir_fd, const char **ret_leaf, char **ret_error);

/* The same, with the disks other guests' QEMUs say they have: their word, which may be a lie, so
 * it only keeps the top (the image we would write) from being one of them, never a backing; and
 * the paths are never stat()ed by name: looked up like an image (beneath an image directory,
 * without following symlinks), and one not found so is skipped. */
int image_chain_open_claimed(char *const *dirs, const char *path, const char *format, bool writable,
        char *const *forbidden, char *const *claimed, ImageChain *ret, char **ret_error);
