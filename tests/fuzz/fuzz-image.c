/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The daemon's own image header reader (image-format.c) on arbitrary bytes: an overlay's owner, and
 * the guest's QEMU, write every byte of it, and root reads it. The bytes become a file (a memfd:
 * the reader takes an fd, with pread and fstat), read as qcow2 and, for its options alone, as a
 * mirror would; then as raw. */

#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "image-format.h"
#include "util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void image_fields_free(Image *img) {
        free(img->format);
        free(img->backing);
        free(img->backing_format);
        *img = (Image) { .fd = -1 };
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        _cleanup_close_ int fd = -1;
        Image img = { .fd = -1 };
        char *error = NULL;

        if (size > 4U << 20)
                return 0;
        log_set_max_level(0);
        fd = memfd_create("image", MFD_CLOEXEC);
        if (fd < 0 || (size > 0 && write(fd, data, size) != (ssize_t) size))
                abort();

        if (image_read_header(fd, "qcow2", "/images/dir/top.qcow2", &img, &error) >= 0)
                image_fields_free(&img);
        error = mfree(error);
        if (image_read_format_options(fd, "/images/dir/top.qcow2", &img, &error) >= 0)
                image_fields_free(&img);
        error = mfree(error);
        if (image_read_header(fd, "raw", "/images/dir/top.raw", &img, &error) >= 0)
                image_fields_free(&img);
        free(error);
        return 0;
}
