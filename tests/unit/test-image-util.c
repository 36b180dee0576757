/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* What test-image.c and test-image-format.c share: the temporary image directories, crafted qcow2
 * headers, and the checks of a chain opened or refused. */

#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <sys/stat.h>

#include "image.h"
#include "util.h"
#include "tap.h"
#include "test-image-util.h"

char tmp[512];              /* short enough for every path made below it */
char img_dir[PATH_MAX];     /* listed */
char other_dir[PATH_MAX];   /* listed in some tests */
char outside_dir[PATH_MAX]; /* never listed */
bool have_qemu_img;

/* Paths for the tests, from a ring of buffers: no freeing in every check. */
const char *P(const char *format, ...) {
        static char ring[64][PATH_MAX];
        static unsigned next;
        char *b = ring[next++ % ELEMENTSOF(ring)];
        va_list ap;

        va_start(ap, format);
        vsnprintf(b, PATH_MAX, format, ap);
        va_end(ap);
        return b;
}

int run(const char *format, ...) {
        _cleanup_free_ char *cmd = NULL, *full = NULL;
        va_list ap;
        int r;

        va_start(ap, format);
        r = vasprintf(&cmd, format, ap);
        va_end(ap);
        if (r < 0)
                return -ENOMEM;
        full = strdup_printf("%s >/dev/null", cmd); /* stdout is TAP */
        if (!full)
                return -ENOMEM;
        r = system(full);
        if (r != 0)
                fprintf(stderr, "# command failed (%d): %s\n", r, cmd);
        return r == 0 ? 0 : -EIO;
}

int write_file(const char *path, const void *buf, size_t len) {
        _cleanup_close_ int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);

        if (fd < 0)
                return -errno;
        return loop_write(fd, buf, len);
}

void put_be32(uint8_t *p, uint32_t v) {
        p[0] = (uint8_t) (v >> 24);
        p[1] = (uint8_t) (v >> 16);
        p[2] = (uint8_t) (v >> 8);
        p[3] = (uint8_t) v;
}

void put_be64(uint8_t *p, uint64_t v) {
        put_be32(p, (uint32_t) (v >> 32));
        put_be32(p + 4, (uint32_t) v);
}

Crafted cr;

void craft(Crafted *out, const Craft *c) {
        uint32_t version = c->version ?: 3, bits = c->cluster_bits ?: 16;
        uint64_t cs = UINT64_C(1) << bits, size = c->size ?: UINT64_C(1) << 20;
        uint64_t span = cs * (cs / 8);
        size_t hlen = version == 2 ? 72 : 112, off;

        memset(out, 0, sizeof(*out));
        out->len = (size_t) MIN(3 * cs, (uint64_t) CRAFT_MAX);
        put_be32(out->buf, 0x514649fbU);
        put_be32(out->buf + 4, version);
        put_be32(out->buf + 20, bits);
        put_be64(out->buf + 24, size);
        put_be32(out->buf + 36, (uint32_t) ((size + span - 1) / span));
        put_be64(out->buf + 40, 2 * cs);
        put_be64(out->buf + 48, cs);
        put_be32(out->buf + 56, 1);
        if (version != 2) {
                put_be32(out->buf + 96, 4);
                put_be32(out->buf + 100, (uint32_t) hlen);
        }
        off = out->ext_off = hlen;
        if (c->backing_fmt) {
                size_t l = strlen(c->backing_fmt);
                put_be32(out->buf + off, 0xe2792acaU);
                put_be32(out->buf + off + 4, (uint32_t) l);
                memcpy(out->buf + off + 8, c->backing_fmt, l);
                off += 8 + ((l + 7) & ~(size_t) 7);
        }
        off += 8; /* end marker */
        if (c->backing) {
                size_t l = c->backing_len ?: strlen(c->backing);
                put_be64(out->buf + 8, off);
                put_be32(out->buf + 16, (uint32_t) l);
                memcpy(out->buf + off, c->backing, l);
                out->backing_off = off;
        }
}

char **dirs_img(void) {
        static char *d[2];
        d[0] = img_dir;
        return d;
}

char **dirs_both(void) {
        static char *d[3];
        d[0] = img_dir;
        d[1] = other_dir;
        return d;
}

static int make_dirs(void) {
        const char *t = getenv("TMPDIR");

        snprintf(tmp, sizeof(tmp), "%s/test-image-XXXXXX", isempty(t) ? "/tmp" : t);
        if (!mkdtemp(tmp))
                return -errno;
        snprintf(img_dir, sizeof(img_dir), "%s/img", tmp);
        snprintf(other_dir, sizeof(other_dir), "%s/other", tmp);
        snprintf(outside_dir, sizeof(outside_dir), "%s/outside", tmp);
        if (mkdir(img_dir, 0755) < 0 || mkdir(other_dir, 0755) < 0 || mkdir(outside_dir, 0755) < 0)
                return -errno;
        if (!path_is_safe_absolute(img_dir, PATH_MAX - 1))
                return -EINVAL; /* TMPDIR not normalized */
        return 0;
}

void image_test_setup(void) {
        int r = make_dirs();

        if (r < 0) {
                printf("Bail out! cannot make a temporary directory: %s\n", strerror(-r));
                exit(EXIT_FAILURE);
        }
        have_qemu_img = system("qemu-img --version >/dev/null 2>&1") == 0;
}

void image_test_cleanup(void) {
        if (!getenv("TEST_IMAGE_KEEP"))
                (void) run("rm -rf %s", tmp);
}
