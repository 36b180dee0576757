/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* What an image file says about itself, and the one image we write: the qcow2 and raw headers read
 * through an fd (every field bounded: a header is user data) and a qcow2 overlay written into one.
 * Where images may be and how they are opened is image.h's; this reads and writes only fds. */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "util.h"

typedef struct Image {
        char *path;   /* normalized absolute path as named (not resolved through symlinks) */
        char *format; /* "qcow2" or "raw" */
        int fd;       /* opened by image_chain_open(), -1 otherwise */
        uint64_t virtual_size;
        uint32_t cluster_size; /* qcow2: from the header; raw: 0 */
        char *backing;         /* absolute normalized path of the backing file, NULL if none */
        char *backing_format;  /* from the qcow2 header extension; NULL if none */
        /* qcow2: the format options a new image of the same kind takes (a mirror's copy). */
        uint32_t qcow2_version; /* 2 or 3 */
        uint32_t refcount_bits; /* 1..64 */
        bool lazy_refcounts;    /* compatible feature bit 0 */
        bool extended_l2;       /* incompatible feature bit 4 */
        bool compression_zstd;  /* compression type 1 (else zlib) */
} Image;

/* Parse the header of an open image of the given format, "qcow2" or "raw" (no probing: the caller says
 * which). Reads are bounded (at most the first cluster, with pread) and every field is validated:
 * qcow2 magic, version 2 or 3, cluster_bits 9..21, header_length, size against the L1 table, table
 * offsets, refcount order, compression type; the backing file name (offset/size inside the first
 * cluster, size 1..1023, no NUL, valid UTF-8, no control characters); header extensions walked with
 * bounds (length, 8-byte alignment, end marker, never past the backing file name or the first
 * cluster); unknown incompatible features, encrypted images, external data files and images marked
 * corrupt are refused. raw: the size of the regular file, or BLKGETSIZE64 of a block device.
 *
 * A relative backing name is resolved against the directory of image_path (a normalized absolute
 * path), then normalized lexically: ".." is allowed in the header, the result must be a normalized
 * absolute path. Since image_open_beneath() refuses every symlink, the lexical result is the file
 * the kernel would reach. A "proto:" name (a colon with no slash before it: "json:{…}", "nbd://…",
 * "file:…") is refused: offline guests take file backings only.
 *
 * Fills format, virtual_size, cluster_size, backing, backing_format and the qcow2 options of *ret
 * (overwritten, not freed); path and fd are left as they are. On failure *ret is untouched and -errno is returned with
 * a message in *ret_error: -EBADMSG for a malformed header, -EOPNOTSUPP for something valid we do not
 * take (version, features, encryption, protocol backings, an unknown format), -EUCLEAN for an image
 * marked corrupt, -EINVAL for a bad image_path or an fd that is neither a regular file nor a block
 * device, other -errno from the kernel. */
int image_read_header(int fd, const char *format, const char *image_path, Image *ret, char **ret_error);

/* The same for a qcow2 image whose options alone are wanted (a new image made like it): a "proto:"
 * backing (an overlay of a remote template) is passed over, *ret's backing left NULL; everything
 * else is checked as image_read_header() does. */
int image_read_format_options(int fd, const char *image_path, Image *ret, char **ret_error);

/* Write a qcow2 v3 overlay of the given virtual size (rounded up to 512) on backing (a path or a
 * URL, stored as given, at most 1023 bytes) of backing_format ("qcow2" or "raw") into fd, an empty
 * regular file opened for writing: the same layout as `qemu-img create -f qcow2 -u -b … -F …` with
 * 64 KiB clusters, nothing allocated. No process, no path: only fd is written. -EFBIG for a size
 * whose L1 table QEMU would not open, -EINVAL/-ENAMETOOLONG for bad arguments, -errno from writes. */
int image_write_qcow2_overlay(int fd, uint64_t size, const char *backing, const char *backing_format, char **ret_error);

/* For image.c's messages as for ours: a message (printf format) logged at debug level and handed
 * to *ret_error (if not NULL); returns r. */
int image_error(char **ret_error, int r, const char *format, ...) _printf_(3, 4);
/* A name from a caller or a header, or "(unprintable name)" if it is not harmless in a message. */
const char *image_printable(const char *s);
/* "qcow2" or "raw": the formats we open. */
bool image_format_supported(const char *format);
