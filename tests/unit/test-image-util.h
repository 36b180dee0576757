/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* What test-image.c and test-image-format.c share (test-image-util.c). The checks are inline here:
 * tap.h counts failed checks per file, so a check must be compiled into the test that runs it.
 * Include after tap.h. */

#include <limits.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "image.h"
#include "util.h"
#include <fcntl.h>

extern char tmp[512];              /* short enough for every path made below it */
extern char img_dir[PATH_MAX];     /* listed */
extern char other_dir[PATH_MAX];   /* listed in some tests */
extern char outside_dir[PATH_MAX]; /* never listed */
extern bool have_qemu_img;

/* The directories below $TMPDIR (or /tmp); a TAP bail-out if they cannot be made. Removed by
 * image_test_cleanup() unless $TEST_IMAGE_KEEP is set. */
void image_test_setup(void);
void image_test_cleanup(void);

/* Paths for the tests, from a ring of buffers: no freeing in every check. */
const char *P(const char *format, ...) _printf_(1, 2);
/* A shell command, its stdout discarded (stdout is TAP); 0 or -EIO. */
int run(const char *format, ...) _printf_(1, 2);
int write_file(const char *path, const void *buf, size_t len);
void put_be32(uint8_t *p, uint32_t v);
void put_be64(uint8_t *p, uint64_t v);

/* A hand-made qcow2 header: the header, a backing format extension, the end marker, the backing
 * name; three clusters in all (refcount table in the second, L1 table in the third, both empty: only
 * the header is ever read). */
typedef struct Craft {
        uint32_t version;      /* 0: 3 */
        uint32_t cluster_bits; /* 0: 16 */
        uint64_t size;         /* 0: 1 MiB */
        const char *backing;
        size_t backing_len; /* 0: strlen(backing) */
        const char *backing_fmt;
} Craft;

#define CRAFT_MAX (3U << 16)
typedef struct Crafted {
        uint8_t buf[CRAFT_MAX];
        size_t len;
        size_t ext_off;     /* the first extension (or the end marker) */
        size_t backing_off; /* the backing name, 0 if none */
} Crafted;

extern Crafted cr; /* too large for the stack */
void craft(Crafted *out, const Craft *c);
static inline void craft_file(const char *path, const Craft *c) {
        craft(&cr, c);
        ASSERT_OK(write_file(path, cr.buf, cr.len));
}

char **dirs_img(void);
char **dirs_both(void);

/* A refusal: the errno, a message containing needle, nothing returned, no fd left open. */
static inline void check_refused(int line, char *const *dirs, const char *path, const char *format, bool writable,
        char *const *forbidden, int expected, const char *needle) {
        ImageChain c = {};
        _cleanup_free_ char *err = NULL;
        unsigned before = count_fds();
        int r;

        r = image_chain_open(dirs, path, format, writable, forbidden, &c, &err);
        if (r != expected)
                TAP_FAIL("line %d: %s: got %d (%s), expected %d (%s); message: %s", line, path, r, strerror(-r),
                        expected, strerror(-expected), strempty(err));
        if (c.n != 0 || c.images)
                TAP_FAIL("line %d: a refused chain was returned", line);
        if (!err)
                TAP_FAIL("line %d: no message", line);
        else if (needle && !strstr(err, needle))
                TAP_FAIL("line %d: message \"%s\" lacks \"%s\"", line, err, needle);
        if (count_fds() != before)
                TAP_FAIL("line %d: %u fds open before, %u after", line, before, count_fds());
        if (err)
                printf("# refused: %s\n", err);
        image_chain_done(&c);
}

#define REFUSED(dirs, path, format, forbidden, expected, needle) \
        check_refused(__LINE__, (dirs), (path), (format), true, (forbidden), (expected), (needle))

/* Open a chain that must succeed; returns its length (0 on failure). */
static inline size_t open_ok(int line, char *const *dirs, const char *path, const char *format, bool writable,
        char *const *forbidden, ImageChain *c) {
        _cleanup_free_ char *err = NULL;
        int r;

        *c = (ImageChain){};
        r = image_chain_open(dirs, path, format, writable, forbidden, c, &err);
        if (r < 0) {
                TAP_FAIL("line %d: %s: %s (%s)", line, path, strerror(-r), strempty(err));
                return 0;
        }
        for (size_t i = 0; i < c->n; i++) {
                int fl = fcntl(c->images[i].fd, F_GETFL), fdfl = fcntl(c->images[i].fd, F_GETFD);
                if (fl < 0 || fdfl < 0) {
                        TAP_FAIL("line %d: image %zu has no open fd", line, i);
                        continue;
                }
                if ((fl & O_ACCMODE) != (writable && i == 0 ? O_RDWR : O_RDONLY))
                        TAP_FAIL("line %d: image %zu opened with access mode %d", line, i, fl & O_ACCMODE);
                if (fl & O_NONBLOCK)
                        TAP_FAIL("line %d: image %zu left non-blocking", line, i);
                if (!(fdfl & FD_CLOEXEC))
                        TAP_FAIL("line %d: image %zu without FD_CLOEXEC", line, i);
        }
        return c->n;
}

#define OPEN_OK(dirs, path, format, forbidden, c) open_ok(__LINE__, (dirs), (path), (format), true, (forbidden), (c))
