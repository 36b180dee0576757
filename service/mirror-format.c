/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* The new image's format options (mirror-format.h): the overlay's, read and checked through our
 * own fds. */

#include <errno.h>
#include <stdlib.h>

#include "image-format.h"
#include "mirror-format.h"

static void image_fields_free(Image *img) {
        free(img->format);
        free(img->backing);
        free(img->backing_format);
}

int mirror_format_of_overlay(int overlay_fd, const char *path, uint64_t size, QemuQcow2Options *ret) {
        Image img = {};
        int r;

        r = image_read_format_options(overlay_fd, path, &img, NULL);
        if (r < 0)
                return r;
        *ret = (QemuQcow2Options){
                .size = size,
                .cluster_size = img.cluster_size,
                .version = img.qcow2_version,
                .refcount_bits = img.refcount_bits,
                .lazy_refcounts = img.lazy_refcounts,
                .extended_l2 = img.extended_l2,
                .zstd = img.compression_zstd,
        };
        image_fields_free(&img);
        return !(ret->cluster_size == 65536 && ret->version == 3 && ret->refcount_bits == 16 && !ret->lazy_refcounts &&
                 !ret->extended_l2 && !ret->zstd);
}

int mirror_format_check(int fd, const char *path, const QemuQcow2Options *want) {
        Image img = {};
        int r;

        r = image_read_header(fd, "qcow2", path, &img, NULL);
        if (r >= 0 && (img.virtual_size != want->size || img.cluster_size != want->cluster_size ||
                              img.qcow2_version != want->version || img.refcount_bits != want->refcount_bits ||
                              img.lazy_refcounts != want->lazy_refcounts || img.extended_l2 != want->extended_l2 ||
                              img.compression_zstd != want->zstd || img.backing))
                r = -EPROTO;
        image_fields_free(&img);
        return r;
}
