/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* image.c against images made at test time: real ones from qemu-img (chains, formats, options) and
 * hand-crafted headers for everything hostile. Every refusal must leave no fd open. */

#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>

#include "image.h"
#include "util.h"
#include "tap.h"

static char tmp[512];              /* short enough for every path made below it */
static char img_dir[PATH_MAX];     /* listed */
static char other_dir[PATH_MAX];   /* listed in some tests */
static char outside_dir[PATH_MAX]; /* never listed */
static bool have_qemu_img;

/* Paths for the tests, from a ring of buffers: no freeing in every check. */
static const char *P(const char *format, ...) _printf_(1, 2);
static const char *P(const char *format, ...) {
        static char ring[64][PATH_MAX];
        static unsigned next;
        char *b = ring[next++ % ELEMENTSOF(ring)];
        va_list ap;

        va_start(ap, format);
        vsnprintf(b, PATH_MAX, format, ap);
        va_end(ap);
        return b;
}

static int run(const char *format, ...) _printf_(1, 2);
static int run(const char *format, ...) {
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

static int write_file(const char *path, const void *buf, size_t len) {
        _cleanup_close_ int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);

        if (fd < 0)
                return -errno;
        return loop_write(fd, buf, len);
}

static void put_be32(uint8_t *p, uint32_t v) {
        p[0] = (uint8_t) (v >> 24);
        p[1] = (uint8_t) (v >> 16);
        p[2] = (uint8_t) (v >> 8);
        p[3] = (uint8_t) v;
}

static void put_be64(uint8_t *p, uint64_t v) {
        put_be32(p, (uint32_t) (v >> 32));
        put_be32(p + 4, (uint32_t) v);
}

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

static Crafted cr; /* too large for the stack */

static void craft(Crafted *out, const Craft *c) {
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

static void craft_file(const char *path, const Craft *c) {
        craft(&cr, c);
        ASSERT_OK(write_file(path, cr.buf, cr.len));
}

static char **dirs_img(void) {
        static char *d[2];
        d[0] = img_dir;
        return d;
}

static char **dirs_both(void) {
        static char *d[3];
        d[0] = img_dir;
        d[1] = other_dir;
        return d;
}

/* A refusal: the errno, a message containing needle, nothing returned, no fd left open. */
static void check_refused(int line, char *const *dirs, const char *path, const char *format, bool writable,
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
static size_t open_ok(int line, char *const *dirs, const char *path, const char *format, bool writable,
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

static void test_open_beneath(void) {
        _cleanup_free_ char *err = NULL;
        unsigned before = count_fds();
        int fd = -1, r;

        ASSERT_OK(write_file(P("%s/plain", img_dir), "x", 1));
        ASSERT_OK(image_open_beneath(dirs_img(), P("%s/plain", img_dir), false, &fd, &err));
        ASSERT_NULL(err);
        ASSERT_EQ(fcntl(fd, F_GETFL) & (O_ACCMODE | O_NONBLOCK), O_RDONLY);
        ASSERT_TRUE(fcntl(fd, F_GETFD) & FD_CLOEXEC);
        close(fd);
        ASSERT_OK(image_open_beneath(dirs_img(), P("%s/plain", img_dir), true, &fd, &err));
        ASSERT_EQ(fcntl(fd, F_GETFL) & (O_ACCMODE | O_NONBLOCK), O_RDWR);
        close(fd);

        /* The most specific directory is used, "/" works as a directory. */
        {
                char *dirs[] = {(char *) "/", tmp, img_dir, NULL};
                ASSERT_OK(image_open_beneath(dirs, P("%s/plain", img_dir), false, &fd, &err));
                close(fd);
        }

#define BENEATH_REFUSED(dirs, path, expected) \
        do { \
                fd = -1; \
                err = mfree(err); \
                r = image_open_beneath((dirs), (path), false, &fd, &err); \
                ASSERT_ERRNO(r, (expected)); \
                ASSERT_EQ(fd, -1); \
                ASSERT_NOT_NULL(err); \
                if (err) \
                        printf("# refused: %s\n", err); \
        } while (0)

        BENEATH_REFUSED(dirs_img(), "/etc/passwd", -EPERM);
        ASSERT_TRUE(err && strstr(err, "outside the image directories"));
        BENEATH_REFUSED(NULL, P("%s/plain", img_dir), -EPERM);
        BENEATH_REFUSED(dirs_img(), img_dir, -EPERM);
        BENEATH_REFUSED(dirs_img(), P("%s/../img/plain", img_dir), -EINVAL);
        BENEATH_REFUSED(dirs_img(), P("%s//plain", img_dir), -EINVAL);
        BENEATH_REFUSED(dirs_img(), "plain", -EINVAL);
        BENEATH_REFUSED(dirs_img(), NULL, -EINVAL);
        BENEATH_REFUSED(dirs_img(), P("%s/missing", img_dir), -ENOENT);
        /* A directory named like the image dir but not below it. */
        BENEATH_REFUSED(dirs_img(), P("%s-x/plain", img_dir), -EPERM);

        ASSERT_OK(symlink("plain", P("%s/plain-link", img_dir)));
        BENEATH_REFUSED(dirs_img(), P("%s/plain-link", img_dir), -ELOOP);
        ASSERT_OK(mkdir(P("%s/real", img_dir), 0755));
        ASSERT_OK(write_file(P("%s/real/f", img_dir), "x", 1));
        ASSERT_OK(symlink("real", P("%s/sub", img_dir)));
        BENEATH_REFUSED(dirs_img(), P("%s/sub/f", img_dir), -ELOOP);
        ASSERT_OK(image_open_beneath(dirs_img(), P("%s/real/f", img_dir), false, &fd, &err));
        close(fd);

        BENEATH_REFUSED(dirs_img(), P("%s/real", img_dir), -EISDIR);
        /* A FIFO is refused, not opened: opening it would block. */
        ASSERT_OK(mkfifo(P("%s/fifo", img_dir), 0600));
        BENEATH_REFUSED(dirs_img(), P("%s/fifo", img_dir), -EINVAL);
        if (mknod(P("%s/null", img_dir), S_IFCHR | 0600, makedev(1, 3)) == 0)
                BENEATH_REFUSED(dirs_img(), P("%s/null", img_dir), -EINVAL);
        else
                printf("# cannot mknod (%s), not testing a character device\n", strerror(errno));

        err = mfree(err);
        ASSERT_EQ(count_fds(), before);
}

/* A mount below the image directory is another file system: refused. In a child, in a mount namespace
 * of its own, if we may make one. */
static void test_open_beneath_xdev(void) {
        pid_t pid;
        int status;

        ASSERT_OK(mkdir(P("%s/mnt", img_dir), 0755));
        pid = fork();
        ASSERT_TRUE(pid >= 0);
        if (pid == 0) {
                _cleanup_free_ char *err = NULL;
                int fd = -1, r;

                if (unshare(CLONE_NEWNS) < 0 || mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0 ||
                        mount("tmpfs", P("%s/mnt", img_dir), "tmpfs", 0, "size=1M") < 0)
                        _exit(77);
                if (write_file(P("%s/mnt/f", img_dir), "x", 1) < 0)
                        _exit(2);
                r = image_open_beneath(dirs_img(), P("%s/mnt/f", img_dir), false, &fd, &err);
                if (r != -EXDEV || !err)
                        _exit(1);
                printf("# refused: %s\n", err);
                /* A listed directory on its own mount is fine: the mount is the directory's. */
                {
                        char *dirs[] = {img_dir, (char *) P("%s/mnt", img_dir), NULL};
                        r = image_open_beneath(dirs, P("%s/mnt/f", img_dir), false, &fd, &err);
                        if (r < 0)
                                _exit(3);
                }
                _exit(0);
        }
        ASSERT_EQ(waitpid(pid, &status, 0), pid);
        ASSERT_TRUE(WIFEXITED(status));
        if (WIFEXITED(status) && WEXITSTATUS(status) == 77)
                printf("# cannot mount here, not testing -EXDEV\n");
        else
                ASSERT_EQ(WEXITSTATUS(status), 0);
}

static void test_chain_qemu_img(void) {
        ImageChain c;
        unsigned before = count_fds();

        if (!have_qemu_img) {
                printf("# qemu-img not found, skipping\n");
                return;
        }
        ASSERT_OK(run("qemu-img create -q -f qcow2 -o cluster_size=65536 %s/base.qcow2 16M", img_dir));
        ASSERT_OK(run(
                "qemu-img create -q -f qcow2 -o cluster_size=131072 -b base.qcow2 -F qcow2 %s/mid.qcow2 16M", img_dir));
        ASSERT_OK(run("qemu-img create -q -f qcow2 -o cluster_size=4096 -b %s/mid.qcow2 -F qcow2 %s/top.qcow2 32M",
                img_dir, img_dir));
        ASSERT_OK(run("qemu-io -c 'write -P 0x5a 0 64k' %s/top.qcow2", img_dir));

        if (OPEN_OK(dirs_img(), P("%s/top.qcow2", img_dir), "qcow2", NULL, &c) == 3) {
                ASSERT_STREQ(c.images[0].path, P("%s/top.qcow2", img_dir));
                ASSERT_STREQ(c.images[0].format, "qcow2");
                ASSERT_EQ_U64(c.images[0].virtual_size, 32U << 20);
                ASSERT_EQ(c.images[0].cluster_size, 4096);
                ASSERT_STREQ(c.images[0].backing, P("%s/mid.qcow2", img_dir));
                ASSERT_STREQ(c.images[0].backing_format, "qcow2");
                ASSERT_STREQ(c.images[1].path, P("%s/mid.qcow2", img_dir));
                ASSERT_EQ(c.images[1].cluster_size, 131072);
                ASSERT_EQ_U64(c.images[1].virtual_size, 16U << 20);
                ASSERT_STREQ(c.images[1].backing, P("%s/base.qcow2", img_dir)); /* relative in the header */
                ASSERT_STREQ(c.images[2].path, P("%s/base.qcow2", img_dir));
                ASSERT_EQ(c.images[2].cluster_size, 65536);
                ASSERT_NULL(c.images[2].backing);
                ASSERT_NULL(c.images[2].backing_format);
        }
        image_chain_done(&c);
        ASSERT_EQ(c.n, 0);
        ASSERT_NULL(c.images);
        image_chain_done(&c); /* twice is harmless */
        image_chain_done(NULL);

        /* Read-only: the top too. */
        {
                _cleanup_free_ char *err = NULL;
                ASSERT_OK(image_chain_open(dirs_img(), P("%s/top.qcow2", img_dir), "qcow2", false, NULL, &c, &err));
                ASSERT_EQ(c.n, 3);
                if (c.n > 0)
                        ASSERT_EQ(fcntl(c.images[0].fd, F_GETFL) & O_ACCMODE, O_RDONLY);
                image_chain_done(&c);
        }

        /* The wrong format for the top is refused, not probed around. */
        REFUSED(dirs_img(), P("%s/top.qcow2", img_dir), "vmdk", NULL, -EOPNOTSUPP, "qcow2 or raw");
        REFUSED(dirs_img(), P("%s/top.qcow2", img_dir), NULL, NULL, -EOPNOTSUPP, NULL);

        /* A raw base, a raw top. */
        ASSERT_OK(run("qemu-img create -q -f raw %s/base.raw 8M", img_dir));
        ASSERT_OK(run("qemu-img create -q -f qcow2 -b base.raw -F raw %s/over-raw.qcow2", img_dir));
        if (OPEN_OK(dirs_img(), P("%s/over-raw.qcow2", img_dir), "qcow2", NULL, &c) == 2) {
                ASSERT_EQ_U64(c.images[0].virtual_size, 8U << 20);
                ASSERT_STREQ(c.images[0].backing_format, "raw");
                ASSERT_STREQ(c.images[1].format, "raw");
                ASSERT_EQ_U64(c.images[1].virtual_size, 8U << 20);
                ASSERT_EQ(c.images[1].cluster_size, 0);
                ASSERT_NULL(c.images[1].backing);
        }
        image_chain_done(&c);
        ASSERT_OK(write_file(P("%s/odd.raw", img_dir), "0123456789", 10));
        if (OPEN_OK(dirs_img(), P("%s/odd.raw", img_dir), "raw", NULL, &c) == 1)
                ASSERT_EQ_U64(c.images[0].virtual_size, 10);
        image_chain_done(&c);
        /* A raw file given as qcow2 is refused (and never the other way round: raw is not probed). */
        REFUSED(dirs_img(), P("%s/base.raw", img_dir), "qcow2", NULL, -EBADMSG, "not a qcow2 image");
        if (OPEN_OK(dirs_img(), P("%s/top.qcow2", img_dir), "raw", NULL, &c) == 1)
                ASSERT_NULL(c.images[0].backing);
        image_chain_done(&c);

        /* Version 2, zstd, extended L2: valid and accepted. */
        ASSERT_OK(run("qemu-img create -q -f qcow2 -o compat=0.10 -b base.qcow2 -F qcow2 %s/v2.qcow2", img_dir));
        if (OPEN_OK(dirs_img(), P("%s/v2.qcow2", img_dir), "qcow2", NULL, &c) == 2)
                ASSERT_STREQ(c.images[0].backing, P("%s/base.qcow2", img_dir));
        image_chain_done(&c);
        if (run("qemu-img create -q -f qcow2 -o compression_type=zstd %s/zstd.qcow2 1G", img_dir) == 0) {
                if (OPEN_OK(dirs_img(), P("%s/zstd.qcow2", img_dir), "qcow2", NULL, &c) == 1)
                        ASSERT_EQ_U64(c.images[0].virtual_size, 1U << 30);
                image_chain_done(&c);
        }
        ASSERT_OK(run("qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=2M %s/l2.qcow2 100G", img_dir));
        if (OPEN_OK(dirs_img(), P("%s/l2.qcow2", img_dir), "qcow2", NULL, &c) == 1)
                ASSERT_EQ(c.images[0].cluster_size, 2U << 20);
        image_chain_done(&c);
        ASSERT_OK(run("qemu-img create -q -f qcow2 -o cluster_size=512 %s/small.qcow2 3G", img_dir));
        if (OPEN_OK(dirs_img(), P("%s/small.qcow2", img_dir), "qcow2", NULL, &c) == 1)
                ASSERT_EQ(c.images[0].cluster_size, 512);
        image_chain_done(&c);

        /* An external data file is a second file named in the header: refused. */
        ASSERT_OK(run("qemu-img create -q -f qcow2 -o data_file=%s/data.raw %s/datafile.qcow2 1M", img_dir, img_dir));
        REFUSED(dirs_img(), P("%s/datafile.qcow2", img_dir), "qcow2", NULL, -EOPNOTSUPP, "external data file");

        /* Outside: absolute, and relative through "..". */
        ASSERT_OK(run("qemu-img create -q -f qcow2 %s/shadow.qcow2 1M", img_dir));
        ASSERT_OK(run("qemu-img rebase -u -b /etc/shadow -F raw %s/shadow.qcow2", img_dir));
        {
                _cleanup_free_ char *expected = strdup_printf(
                        "Backing file /etc/shadow of %s/shadow.qcow2 lies outside the image directories (%s); refusing to open it.",
                        img_dir, img_dir);
                REFUSED(dirs_img(), P("%s/shadow.qcow2", img_dir), "qcow2", NULL, -EPERM, expected);
        }
        ASSERT_OK(run("qemu-img rebase -u -b ../../../../../../../../../../../../etc/shadow -F raw %s/shadow.qcow2",
                img_dir));
        REFUSED(dirs_img(), P("%s/shadow.qcow2", img_dir), "qcow2", NULL, -EPERM, "Backing file /etc/shadow of");

        /* Another listed image directory is fine; an unlisted one is not. */
        ASSERT_OK(run("qemu-img create -q -f qcow2 %s/o.qcow2 4M", other_dir));
        ASSERT_OK(run("qemu-img create -q -f qcow2 -b ../other/o.qcow2 -F qcow2 %s/to-other.qcow2", img_dir));
        if (OPEN_OK(dirs_both(), P("%s/to-other.qcow2", img_dir), "qcow2", NULL, &c) == 2)
                ASSERT_STREQ(c.images[1].path, P("%s/o.qcow2", other_dir));
        image_chain_done(&c);
        REFUSED(dirs_img(), P("%s/to-other.qcow2", img_dir), "qcow2", NULL, -EPERM, "outside the image directories");
        ASSERT_OK(run("qemu-img create -q -f qcow2 %s/x.qcow2 4M", outside_dir));
        ASSERT_OK(run("qemu-img create -q -f qcow2 -b %s/x.qcow2 -F qcow2 %s/to-outside.qcow2", outside_dir, img_dir));
        REFUSED(dirs_both(), P("%s/to-outside.qcow2", img_dir), "qcow2", NULL, -EPERM, "outside the image directories");

        ASSERT_EQ(count_fds(), before);
}

static void test_symlinks(void) {
        ImageChain c;

        ASSERT_OK(mkdir(P("%s/sl", img_dir), 0755));
        ASSERT_OK(mkdir(P("%s/sl/real", img_dir), 0755));
        craft_file(P("%s/sl/base.qcow2", img_dir), &(Craft){});
        craft_file(P("%s/sl/real/base.qcow2", img_dir), &(Craft){});
        ASSERT_OK(symlink("base.qcow2", P("%s/sl/base-link.qcow2", img_dir)));
        ASSERT_OK(symlink("real", P("%s/sl/dirlink", img_dir)));
        ASSERT_OK(symlink("/etc/shadow", P("%s/sl/shadow-link", img_dir)));

        /* Symlinked top, symlinked directory component. */
        REFUSED(dirs_img(), P("%s/sl/base-link.qcow2", img_dir), "qcow2", NULL, -ELOOP, "symbolic link");
        REFUSED(dirs_img(), P("%s/sl/dirlink/base.qcow2", img_dir), "qcow2", NULL, -ELOOP, "symbolic link");
        if (OPEN_OK(dirs_img(), P("%s/sl/real/base.qcow2", img_dir), "qcow2", NULL, &c) != 1)
                TAP_FAIL("the real path does not open");
        image_chain_done(&c);

        /* The same as backings. */
        craft_file(P("%s/sl/a.qcow2", img_dir), &(Craft){.backing = "base-link.qcow2", .backing_fmt = "qcow2"});
        REFUSED(dirs_img(), P("%s/sl/a.qcow2", img_dir), "qcow2", NULL, -ELOOP, "Cannot open backing file");
        craft_file(P("%s/sl/b.qcow2", img_dir), &(Craft){.backing = "dirlink/base.qcow2", .backing_fmt = "qcow2"});
        REFUSED(dirs_img(), P("%s/sl/b.qcow2", img_dir), "qcow2", NULL, -ELOOP, "symbolic link");
        craft_file(P("%s/sl/c.qcow2", img_dir), &(Craft){.backing = "shadow-link", .backing_fmt = "raw"});
        REFUSED(dirs_img(), P("%s/sl/c.qcow2", img_dir), "qcow2", NULL, -ELOOP, "symbolic link");
        craft_file(P("%s/sl/d.qcow2", img_dir), &(Craft){.backing = "real/base.qcow2", .backing_fmt = "qcow2"});
        if (OPEN_OK(dirs_img(), P("%s/sl/d.qcow2", img_dir), "qcow2", NULL, &c) != 2)
                TAP_FAIL("the real backing path does not open");
        image_chain_done(&c);
}

static void test_backing_format(void) {
        ASSERT_OK(mkdir(P("%s/bf", img_dir), 0755));
        craft_file(P("%s/bf/base.qcow2", img_dir), &(Craft){});
        craft_file(P("%s/bf/nofmt.qcow2", img_dir), &(Craft){.backing = "base.qcow2"});
        REFUSED(dirs_img(), P("%s/bf/nofmt.qcow2", img_dir), "qcow2", NULL, -EINVAL, "-F");
        craft_file(P("%s/bf/vmdk.qcow2", img_dir), &(Craft){.backing = "base.qcow2", .backing_fmt = "vmdk"});
        REFUSED(dirs_img(), P("%s/bf/vmdk.qcow2", img_dir), "qcow2", NULL, -EOPNOTSUPP, "'vmdk'");
        /* The recorded format is the truth: a qcow2 base declared raw is opened as raw. */
        craft_file(P("%s/bf/asraw.qcow2", img_dir), &(Craft){.backing = "base.qcow2", .backing_fmt = "raw"});
        {
                ImageChain c;
                if (OPEN_OK(dirs_img(), P("%s/bf/asraw.qcow2", img_dir), "qcow2", NULL, &c) == 2)
                        ASSERT_STREQ(c.images[1].format, "raw");
                image_chain_done(&c);
        }
        if (have_qemu_img) {
                /* qemu-img itself refuses to write a backing without a format nowadays. */
                ASSERT_OK(run("qemu-img create -q -f qcow2 %s/bf/q.qcow2 1M", img_dir));
                _cleanup_free_ char *cmd =
                        strdup_printf("qemu-img rebase -u -b base.qcow2 %s/bf/q.qcow2 >/dev/null 2>&1", img_dir);
                ASSERT_TRUE(cmd && system(cmd) != 0);
        }
}

static void test_loops(void) {
        ASSERT_OK(mkdir(P("%s/loop", img_dir), 0755));
        craft_file(P("%s/loop/a.qcow2", img_dir), &(Craft){.backing = "b.qcow2", .backing_fmt = "qcow2"});
        craft_file(P("%s/loop/b.qcow2", img_dir), &(Craft){.backing = "a.qcow2", .backing_fmt = "qcow2"});
        REFUSED(dirs_img(), P("%s/loop/a.qcow2", img_dir), "qcow2", NULL, -ELOOP, "loops");
        craft_file(P("%s/loop/self.qcow2", img_dir), &(Craft){.backing = "self.qcow2", .backing_fmt = "qcow2"});
        REFUSED(dirs_img(), P("%s/loop/self.qcow2", img_dir), "qcow2", NULL, -ELOOP, "loops");
        craft_file(P("%s/loop/self2.qcow2", img_dir),
                &(Craft){.backing = "../loop/./self2.qcow2", .backing_fmt = "qcow2"});
        REFUSED(dirs_img(), P("%s/loop/self2.qcow2", img_dir), "qcow2", NULL, -ELOOP, "loops");
        /* The same file under another name: a hardlink. */
        craft_file(P("%s/loop/h.qcow2", img_dir), &(Craft){.backing = "h-link.qcow2", .backing_fmt = "qcow2"});
        ASSERT_OK(link(P("%s/loop/h.qcow2", img_dir), P("%s/loop/h-link.qcow2", img_dir)));
        REFUSED(dirs_img(), P("%s/loop/h.qcow2", img_dir), "qcow2", NULL, -ELOOP, "same file");
}

static void test_depth(void) {
        ImageChain c;

        ASSERT_OK(mkdir(P("%s/deep", img_dir), 0755));
        for (unsigned i = 0; i < 40; i++) {
                char name[32];
                snprintf(name, sizeof(name), "d%u.qcow2", i + 1);
                craft_file(P("%s/deep/d%u.qcow2", img_dir, i),
                        i < 39 ? &(Craft){.backing = name, .backing_fmt = "qcow2"} : &(Craft){});
        }
        REFUSED(dirs_img(), P("%s/deep/d0.qcow2", img_dir), "qcow2", NULL, -E2BIG, "longer than 32");
        REFUSED(dirs_img(), P("%s/deep/d7.qcow2", img_dir), "qcow2", NULL, -E2BIG, "longer than 32");
        if (OPEN_OK(dirs_img(), P("%s/deep/d8.qcow2", img_dir), "qcow2", NULL, &c) == 32)
                ASSERT_STREQ(c.images[31].path, P("%s/deep/d39.qcow2", img_dir));
        image_chain_done(&c);
}

static void test_forbidden(void) {
        ImageChain c;

        ASSERT_OK(mkdir(P("%s/fb", img_dir), 0755));
        craft_file(P("%s/fb/g2.qcow2", img_dir), &(Craft){});
        craft_file(P("%s/fb/mine.qcow2", img_dir), &(Craft){.backing = "g2.qcow2", .backing_fmt = "qcow2"});
        ASSERT_OK(link(P("%s/fb/g2.qcow2", img_dir), P("%s/fb/alias.qcow2", img_dir)));
        craft_file(P("%s/fb/sneaky.qcow2", img_dir), &(Craft){.backing = "alias.qcow2", .backing_fmt = "qcow2"});
        craft_file(P("%s/fb/free.qcow2", img_dir), &(Craft){});
        {
                char *forbidden[] = {(char *) P("%s/fb/g2.qcow2", img_dir), (char *) "/nonexistent/disk", NULL};

                REFUSED(dirs_img(), P("%s/fb/g2.qcow2", img_dir), "qcow2", forbidden, -EBUSY, "another guest");
                REFUSED(dirs_img(), P("%s/fb/alias.qcow2", img_dir), "qcow2", forbidden, -EBUSY, "another guest");
                REFUSED(dirs_img(), P("%s/fb/mine.qcow2", img_dir), "qcow2", forbidden, -EBUSY, "another guest");
                REFUSED(dirs_img(), P("%s/fb/sneaky.qcow2", img_dir), "qcow2", forbidden, -EBUSY, "another guest");
                if (OPEN_OK(dirs_img(), P("%s/fb/free.qcow2", img_dir), "qcow2", forbidden, &c) != 1)
                        TAP_FAIL("an unrelated image was refused");
                image_chain_done(&c);
        }
        {
                /* Named in forbidden by a symlink: still the same file. */
                char *forbidden[] = {(char *) P("%s/g2-elsewhere", outside_dir), NULL};

                ASSERT_OK(symlink(P("%s/fb/g2.qcow2", img_dir), forbidden[0]));
                REFUSED(dirs_img(), P("%s/fb/mine.qcow2", img_dir), "qcow2", forbidden, -EBUSY, "another guest");
        }
}

/* What another guest's QEMU says it has is its word: it keeps us from writing that image (the top),
 * never from reading it as a backing, and its paths are never followed out of the image
 * directories (issue 9, item 9). */
static void test_claimed(void) {
        ImageChain c = {};
        _cleanup_free_ char *err = NULL;
        int r;

        ASSERT_OK(mkdir(P("%s/cl", img_dir), 0755));
        craft_file(P("%s/cl/base.qcow2", img_dir), &(Craft){});
        craft_file(P("%s/cl/top.qcow2", img_dir), &(Craft){.backing = "base.qcow2", .backing_fmt = "qcow2"});
        {
                char *claimed[] = {(char *) P("%s/cl/top.qcow2", img_dir), NULL};

                r = image_chain_open_claimed(dirs_img(), P("%s/cl/top.qcow2", img_dir), "qcow2", true, NULL, claimed, &c, &err);
                ASSERT_EQ(r, -EBUSY);
                ASSERT_TRUE(err && strstr(err, "another guest"));
                ASSERT_EQ(c.n, 0);
                err = mfree(err);
        }
        {
                char *claimed[] = {(char *) P("%s/cl/base.qcow2", img_dir), NULL};

                r = image_chain_open_claimed(dirs_img(), P("%s/cl/top.qcow2", img_dir), "qcow2", true, NULL, claimed, &c, &err);
                ASSERT_OK(r);
                ASSERT_EQ(c.n, 2);
                image_chain_done(&c);
                err = mfree(err);
        }
        {
                /* Named through a symlink from outside: not followed, so not compared. */
                char *claimed[] = {(char *) P("%s/cl-top-elsewhere", outside_dir), NULL};

                ASSERT_OK(symlink(P("%s/cl/top.qcow2", img_dir), claimed[0]));
                r = image_chain_open_claimed(dirs_img(), P("%s/cl/top.qcow2", img_dir), "qcow2", true, NULL, claimed, &c, &err);
                ASSERT_OK(r);
                image_chain_done(&c);
                err = mfree(err);
        }
        {
                /* The same, forbidden (our own record): still the same file. */
                char *forbidden[] = {(char *) P("%s/cl/base.qcow2", img_dir), NULL};

                REFUSED(dirs_img(), P("%s/cl/top.qcow2", img_dir), "qcow2", forbidden, -EBUSY, "another guest");
        }
}

/* image_read_header() on a crafted file; returns r, fills *ret_err. */
static int read_crafted(const char *image_path, const char *format, Image *img, char **ret_err) {
        _cleanup_close_ int fd = -1;

        *img = (Image){.fd = -1};
        fd = open(P("%s/h.qcow2", img_dir), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (fd < 0)
                return -errno;
        if (loop_write(fd, cr.buf, cr.len) < 0)
                return -EIO;
        return image_read_header(fd, format, image_path, img, ret_err);
}

static void image_free(Image *img) {
        free(img->format);
        free(img->backing);
        free(img->backing_format);
        *img = (Image){.fd = -1};
}

static void check_header(int line, int expected, const char *needle) {
        _cleanup_free_ char *err = NULL;
        Image img;
        unsigned before = count_fds();
        int r;

        r = read_crafted("/srv/img/a.qcow2", "qcow2", &img, &err);
        if (r != expected)
                TAP_FAIL("line %d: got %d (%s), expected %d (%s); message: %s", line, r, strerror(-r), expected,
                        strerror(-expected), strempty(err));
        if (expected < 0) {
                if (!err)
                        TAP_FAIL("line %d: no message", line);
                else if (needle && !strstr(err, needle))
                        TAP_FAIL("line %d: message \"%s\" lacks \"%s\"", line, err, needle);
                if (img.format || img.backing || img.backing_format)
                        TAP_FAIL("line %d: refused header filled the image", line);
                if (err)
                        printf("# refused: %s\n", err);
        }
        if (count_fds() != before)
                TAP_FAIL("line %d: fd leak", line);
        image_free(&img);
}
#define HEADER(expected, needle) check_header(__LINE__, (expected), (needle))

static void test_header_hostile(void) {
        static const Craft good = {.backing = "b.qcow2", .backing_fmt = "qcow2"};
        _cleanup_free_ char *err = NULL;
        Image img;

        craft(&cr, &good);
        ASSERT_OK(read_crafted("/srv/img/a.qcow2", "qcow2", &img, &err));
        ASSERT_STREQ(img.format, "qcow2");
        ASSERT_EQ_U64(img.virtual_size, 1U << 20);
        ASSERT_EQ(img.cluster_size, 65536);
        ASSERT_STREQ(img.backing, "/srv/img/b.qcow2");
        ASSERT_STREQ(img.backing_format, "qcow2");
        ASSERT_EQ(img.fd, -1); /* left alone */
        image_free(&img);

        /* Truncated, empty, bad magic, versions. */
        craft(&cr, &good);
        cr.len = 50;
        HEADER(-EBADMSG, "truncated");
        cr.len = 90; /* v2-sized, but v3 */
        HEADER(-EBADMSG, "truncated");
        cr.len = 0;
        HEADER(-EBADMSG, "not a qcow2 image");
        craft(&cr, &good);
        cr.buf[0] = 'X';
        HEADER(-EBADMSG, "not a qcow2 image");
        craft(&cr, &good);
        put_be32(cr.buf + 4, 4);
        HEADER(-EOPNOTSUPP, "version");
        put_be32(cr.buf + 4, 1);
        HEADER(-EOPNOTSUPP, "version");

        /* Cluster bits. */
        craft(&cr, &good);
        put_be32(cr.buf + 20, 30);
        HEADER(-EBADMSG, "cluster size");
        put_be32(cr.buf + 20, 8);
        HEADER(-EBADMSG, "cluster size");
        put_be32(cr.buf + 20, UINT32_MAX);
        HEADER(-EBADMSG, "cluster size");

        /* Backing name size and offset. */
        craft(&cr, &good);
        put_be32(cr.buf + 16, 5000);
        HEADER(-EBADMSG, "1 to 1023");
        put_be32(cr.buf + 16, 1024);
        HEADER(-EBADMSG, "1 to 1023");
        put_be32(cr.buf + 16, 0);
        HEADER(-EBADMSG, "1 to 1023");
        craft(&cr, &good);
        put_be64(cr.buf + 8, UINT64_C(1) << 40);
        HEADER(-EBADMSG, "outside the header's first cluster");
        put_be64(cr.buf + 8, UINT64_MAX);
        HEADER(-EBADMSG, "outside the header's first cluster");
        put_be64(cr.buf + 8, 65536 - 3); /* name straddles the cluster end */
        HEADER(-EBADMSG, "outside the header's first cluster");
        put_be64(cr.buf + 8, 40); /* inside the fixed header */
        HEADER(-EBADMSG, "outside the header's first cluster");
        put_be64(cr.buf + 8, 8192);
        cr.len = 4096; /* beyond the end of the file */
        HEADER(-EBADMSG, "beyond the end of the file");
        craft(&cr, &(Craft){});
        put_be32(cr.buf + 16, 12); /* a size without an offset */
        HEADER(-EBADMSG, "no backing file name offset");

        /* Header extensions. */
        craft(&cr, &good);
        put_be32(cr.buf + cr.ext_off + 4, 0xfffffff0U);
        HEADER(-EBADMSG, "runs past");
        craft(&cr, &(Craft){.backing_fmt = "qcow2"}); /* no backing: the area is the whole cluster */
        put_be32(cr.buf + cr.ext_off + 4, 65536 - 112 - 8 + 1);
        HEADER(-EBADMSG, "runs past");
        put_be32(cr.buf + cr.ext_off, 0x12345678U);         /* unknown: skipped */
        put_be32(cr.buf + cr.ext_off + 4, 65536 - 112 - 8); /* fills the cluster, no end marker */
        HEADER(-EBADMSG, "not terminated");
        craft(&cr, &good);
        put_be32(cr.buf + cr.ext_off + 4, 17); /* runs into the backing name */
        HEADER(-EBADMSG, "runs past");
        craft(&cr, &good);
        put_be32(cr.buf + cr.ext_off + 4, 0);
        HEADER(-EBADMSG, "1 to 15");
        craft(&cr, &(Craft){.backing = "b.qcow2", .backing_fmt = "qcow2qcow2qcow2q"});
        HEADER(-EBADMSG, "1 to 15");
        craft(&cr, &(Craft){.backing = "b.qcow2", .backing_fmt = "qco\nw2"});
        HEADER(-EBADMSG, "not a format name");
        {
                /* Two backing format extensions. */
                craft(&cr, &(Craft){});
                for (unsigned i = 0; i < 2; i++) {
                        put_be32(cr.buf + 112 + 16 * i, 0xe2792acaU);
                        put_be32(cr.buf + 112 + 16 * i + 4, 3);
                        memcpy(cr.buf + 112 + 16 * i + 8, "raw", 3);
                }
                HEADER(-EBADMSG, "twice");
        }
        {
                /* Unknown extensions are skipped, with their padding. */
                craft(&cr, &(Craft){});
                put_be32(cr.buf + 112, 0x6803f857U); /* feature name table */
                put_be32(cr.buf + 116, 5);
                put_be32(cr.buf + 128, 0xe2792acaU);
                put_be32(cr.buf + 132, 3);
                memcpy(cr.buf + 136, "raw", 3);
                if (read_crafted("/srv/img/a.qcow2", "qcow2", &img, &err) >= 0)
                        ASSERT_STREQ(img.backing_format, "raw");
                else
                        TAP_FAIL("skipping an unknown extension failed: %s", strempty(err));
                image_free(&img);
                err = mfree(err);
        }
        {
                /* A truncated file cuts the extensions. */
                craft(&cr, &(Craft){});
                put_be32(cr.buf + 112, 0x6803f857U);
                put_be32(cr.buf + 116, 64);
                cr.len = 150;
                HEADER(-EBADMSG, "beyond the end of the file");
                cr.len = 116;
                HEADER(-EBADMSG, "beyond the end of the file");
        }

        /* Features. */
        craft(&cr, &good);
        put_be64(cr.buf + 72, UINT64_C(1) << 5);
        HEADER(-EOPNOTSUPP, "unknown to blockstreamd");
        put_be64(cr.buf + 72, UINT64_C(1) << 63);
        HEADER(-EOPNOTSUPP, "unknown to blockstreamd");
        put_be64(cr.buf + 72, UINT64_C(1) << 1);
        HEADER(-EUCLEAN, "corrupt");
        put_be64(cr.buf + 72, UINT64_C(1) << 2);
        HEADER(-EOPNOTSUPP, "external data file");
        put_be64(cr.buf + 72, UINT64_C(1) << 0); /* dirty: QEMU repairs it */
        HEADER(0, NULL);
        put_be64(cr.buf + 72, UINT64_C(1) << 3); /* compression bit without a compression type */
        HEADER(-EBADMSG, "compression");
        cr.buf[104] = 1;
        HEADER(0, NULL);
        cr.buf[104] = 2;
        HEADER(-EOPNOTSUPP, "compression type");
        put_be64(cr.buf + 72, 0);
        cr.buf[104] = 1; /* zstd without the bit */
        HEADER(-EBADMSG, "compression");
        craft(&cr, &(Craft){.cluster_bits = 12});
        put_be64(cr.buf + 72, UINT64_C(1) << 4); /* extended L2 with small clusters */
        HEADER(-EBADMSG, "extended L2");
        craft(&cr, &good);
        put_be64(cr.buf + 80, UINT64_MAX); /* compatible and autoclear bits are fine */
        put_be64(cr.buf + 88, UINT64_MAX);
        HEADER(0, NULL);

        /* Encryption, sizes, tables. */
        craft(&cr, &good);
        put_be32(cr.buf + 32, 2);
        HEADER(-EOPNOTSUPP, "encrypted");
        put_be32(cr.buf + 32, 1);
        HEADER(-EOPNOTSUPP, "encrypted");
        put_be32(cr.buf + 32, 3);
        HEADER(-EBADMSG, "encryption");
        craft(&cr, &good);
        put_be32(cr.buf + 100, 100);
        HEADER(-EBADMSG, "header length");
        put_be32(cr.buf + 100, 113);
        HEADER(-EBADMSG, "header length");
        put_be32(cr.buf + 100, 65544);
        HEADER(-EBADMSG, "header length");
        craft(&cr, &good);
        put_be32(cr.buf + 96, 7);
        HEADER(-EBADMSG, "refcount order");
        craft(&cr, &good);
        put_be64(cr.buf + 24, UINT64_C(1) << 63);
        HEADER(-EBADMSG, "virtual size");
        put_be64(cr.buf + 24, UINT64_C(1) << 40);
        HEADER(-EBADMSG, "too small");
        put_be32(cr.buf + 36, UINT32_MAX);
        HEADER(-EBADMSG, "too large");
        craft(&cr, &good);
        put_be64(cr.buf + 40, 12345);
        HEADER(-EBADMSG, "not cluster aligned");
        craft(&cr, &good);
        put_be32(cr.buf + 56, 0);
        HEADER(-EBADMSG, "refcount table");
        craft(&cr, &good);
        put_be64(cr.buf + 48, UINT64_C(0x7fffffffffff0000));
        put_be32(cr.buf + 56, 2);
        HEADER(-EBADMSG, "refcount table");
        craft(&cr, &good);
        put_be32(cr.buf + 60, 70000);
        HEADER(-EBADMSG, "snapshots");
        craft(&cr, &good);
        put_be32(cr.buf + 60, 3);
        put_be64(cr.buf + 64, 100);
        HEADER(-EBADMSG, "not cluster aligned");
        craft(&cr, &(Craft){.size = 1}); /* odd sizes are QEMU's business */
        HEADER(0, NULL);

        /* Backing names. */
        craft(&cr, &(Craft){.backing = "\xff\xfe.qcow2", .backing_fmt = "qcow2"});
        HEADER(-EBADMSG, "UTF-8");
        craft(&cr, &(Craft){.backing = "\xc0\xaf"
                                       "etc/shadow",
                           .backing_fmt = "qcow2"}); /* overlong '/' */
        HEADER(-EBADMSG, "UTF-8");
        craft(&cr, &(Craft){.backing = "b.qcow2\0x", .backing_len = 9, .backing_fmt = "qcow2"});
        HEADER(-EBADMSG, "NUL");
        craft(&cr, &(Craft){.backing = "b\n.qcow2", .backing_fmt = "qcow2"});
        HEADER(-EBADMSG, "control characters");
        craft(&cr, &(Craft){.backing = "json:{\"file\":{\"driver\":\"file\",\"filename\":\"/etc/shadow\"}}",
                           .backing_fmt = "raw"});
        HEADER(-EOPNOTSUPP, "protocol");
        craft(&cr, &(Craft){.backing = "nbd://evil.example:10809/disk", .backing_fmt = "raw"});
        HEADER(-EOPNOTSUPP, "protocol");
        craft(&cr, &(Craft){.backing = "http://example.com/a.qcow2", .backing_fmt = "qcow2"});
        HEADER(-EOPNOTSUPP, "protocol");
        craft(&cr, &(Craft){.backing = "file:/etc/shadow", .backing_fmt = "raw"});
        HEADER(-EOPNOTSUPP, "protocol");
        craft(&cr, &(Craft){.backing = "/", .backing_fmt = "raw"});
        HEADER(-EBADMSG, "valid file path");
        craft(&cr, &(Craft){.backing = "../../..", .backing_fmt = "raw"});
        HEADER(-EBADMSG, "valid file path");

        /* Resolution. */
        {
                static const struct {
                        const char *name, *resolved;
                } t[] = {
                        {"b.qcow2", "/srv/img/b.qcow2"},
                        {"./b.qcow2", "/srv/img/b.qcow2"},
                        {"x//y/./z.qcow2", "/srv/img/x/y/z.qcow2"},
                        {"../other/b.qcow2", "/srv/other/b.qcow2"},
                        {"../../../../../../etc/shadow", "/etc/shadow"},
                        {"/srv/img/../img/b.qcow2", "/srv/img/b.qcow2"},
                        {"/a/b/", "/a/b"},
                        {"./json:x", "/srv/img/json:x"}, /* a file with a colon in its name */
                        {"dir/nbd://x", "/srv/img/dir/nbd:/x"},
                };

                for (size_t i = 0; i < ELEMENTSOF(t); i++) {
                        craft(&cr, &(Craft){.backing = t[i].name, .backing_fmt = "qcow2"});
                        if (read_crafted("/srv/img/a.qcow2", "qcow2", &img, &err) < 0)
                                TAP_FAIL("%s: %s", t[i].name, strempty(err));
                        else
                                ASSERT_STREQ(img.backing, t[i].resolved);
                        image_free(&img);
                        err = mfree(err);
                }
                /* An image at the root. */
                craft(&cr, &(Craft){.backing = "b", .backing_fmt = "raw"});
                if (read_crafted("/a.qcow2", "qcow2", &img, &err) >= 0)
                        ASSERT_STREQ(img.backing, "/b");
                image_free(&img);
                err = mfree(err);
        }

        /* Version 2: extensions right after the 72-byte header. */
        craft(&cr, &(Craft){.version = 2, .backing = "v.qcow2", .backing_fmt = "qcow2"});
        if (read_crafted("/srv/img/a.qcow2", "qcow2", &img, &err) >= 0) {
                ASSERT_STREQ(img.backing, "/srv/img/v.qcow2");
                ASSERT_STREQ(img.backing_format, "qcow2");
        } else
                TAP_FAIL("v2: %s", strempty(err));
        image_free(&img);
        err = mfree(err);
        /* An old v2 image: the backing name right after the header, no extensions at all. */
        craft(&cr, &(Craft){.version = 2});
        put_be64(cr.buf + 8, 72);
        put_be32(cr.buf + 16, 5);
        memcpy(cr.buf + 72, "o.img", 5);
        if (read_crafted("/srv/img/a.qcow2", "qcow2", &img, &err) >= 0) {
                ASSERT_STREQ(img.backing, "/srv/img/o.img");
                ASSERT_NULL(img.backing_format);
        } else
                TAP_FAIL("old v2: %s", strempty(err));
        image_free(&img);
        err = mfree(err);

        /* Raw, and arguments. */
        craft(&cr, &good);
        cr.len = 12345;
        ASSERT_OK(read_crafted("/srv/img/a.raw", "raw", &img, &err));
        ASSERT_STREQ(img.format, "raw");
        ASSERT_EQ_U64(img.virtual_size, 12345);
        ASSERT_EQ(img.cluster_size, 0);
        ASSERT_NULL(img.backing);
        ASSERT_NULL(img.backing_format);
        image_free(&img);
        ASSERT_ERRNO(read_crafted("/srv/img/a.raw", "vmdk", &img, &err), -EOPNOTSUPP);
        err = mfree(err);
        ASSERT_ERRNO(read_crafted("/srv/img/a.raw", NULL, &img, &err), -EOPNOTSUPP);
        err = mfree(err);
        ASSERT_ERRNO(read_crafted("relative.raw", "raw", &img, &err), -EINVAL);
        err = mfree(err);
        ASSERT_ERRNO(read_crafted("/srv/img/../a.raw", "raw", &img, &err), -EINVAL);
        err = mfree(err);
        ASSERT_ERRNO(image_read_header(-1, "raw", "/srv/a.raw", &img, &err), -EBADF);
        err = mfree(err);
        /* ret_error may be NULL. */
        craft(&cr, &good);
        cr.buf[0] = 0;
        ASSERT_ERRNO(read_crafted("/srv/img/a.qcow2", "qcow2", &img, NULL), -EBADMSG);
}

/* Crafted headers through the whole chain: the header checks hold there too, with no fd left. */
static void test_chain_hostile(void) {
        ASSERT_OK(mkdir(P("%s/hc", img_dir), 0755));
        craft_file(P("%s/hc/base.qcow2", img_dir), &(Craft){});
        craft_file(P("%s/hc/json.qcow2", img_dir), &(Craft){.backing = "json:{}", .backing_fmt = "qcow2"});
        REFUSED(dirs_img(), P("%s/hc/json.qcow2", img_dir), "qcow2", NULL, -EOPNOTSUPP, "protocol");
        craft_file(P("%s/hc/bad-base.qcow2", img_dir), &(Craft){.version = 4});
        craft_file(P("%s/hc/to-bad.qcow2", img_dir), &(Craft){.backing = "bad-base.qcow2", .backing_fmt = "qcow2"});
        REFUSED(dirs_img(), P("%s/hc/to-bad.qcow2", img_dir), "qcow2", NULL, -EOPNOTSUPP, "bad-base.qcow2");
        craft_file(P("%s/hc/to-missing.qcow2", img_dir), &(Craft){.backing = "gone.qcow2", .backing_fmt = "qcow2"});
        REFUSED(dirs_img(), P("%s/hc/to-missing.qcow2", img_dir), "qcow2", NULL, -ENOENT, "does not exist");
        craft_file(P("%s/hc/to-dir.qcow2", img_dir), &(Craft){.backing = ".", .backing_fmt = "raw"});
        REFUSED(dirs_img(), P("%s/hc/to-dir.qcow2", img_dir), "qcow2", NULL, -EISDIR, "directory");
        craft_file(P("%s/hc/to-fifo.qcow2", img_dir), &(Craft){.backing = "fifo", .backing_fmt = "raw"});
        ASSERT_OK(mkfifo(P("%s/hc/fifo", img_dir), 0600));
        REFUSED(dirs_img(), P("%s/hc/to-fifo.qcow2", img_dir), "qcow2", NULL, -EINVAL, "neither");
        REFUSED(dirs_img(), P("%s/hc/../hc/base.qcow2", img_dir), "qcow2", NULL, -EINVAL, "normalized");
        REFUSED(dirs_img(), "/etc/passwd", "raw", NULL, -EPERM, "outside");
}

/* A loop device, if this machine lets us make one: a raw and a qcow2 chain on block devices. */
static void test_block_device(void) {
        char dev[2][64] = {};
        ImageChain c;
        struct stat st;
        FILE *f;

        if (geteuid() != 0 || !have_qemu_img || run("losetup --version") < 0) {
                printf("# no root, qemu-img or losetup; skipping\n");
                return;
        }
        ASSERT_OK(mkdir(P("%s/blk", img_dir), 0755));
        ASSERT_OK(run("qemu-img create -q -f qcow2 %s/blk/q.file 5M", img_dir));
        ASSERT_OK(run("truncate -s 3M %s/blk/r.file", img_dir));
        for (unsigned i = 0; i < 2; i++) {
                _cleanup_free_ char *cmd =
                        strdup_printf("losetup -f --show %s/blk/%s.file 2>/dev/null", img_dir, i == 0 ? "q" : "r");
                f = cmd ? popen(cmd, "re") : NULL;
                if (!f || !fgets(dev[i], sizeof(dev[i]), f)) {
                        if (f)
                                pclose(f);
                        printf("# losetup does not work here; skipping\n");
                        goto finish;
                }
                pclose(f);
                dev[i][strcspn(dev[i], "\n")] = 0;
                if (stat(dev[i], &st) < 0 || !S_ISBLK(st.st_mode) ||
                        mknod(P("%s/blk/%s", img_dir, i == 0 ? "q" : "r"), S_IFBLK | 0600, st.st_rdev) < 0) {
                        printf("# cannot make a block device node; skipping\n");
                        goto finish;
                }
        }
        if (OPEN_OK(dirs_img(), P("%s/blk/r", img_dir), "raw", NULL, &c) == 1)
                ASSERT_EQ_U64(c.images[0].virtual_size, 3U << 20);
        image_chain_done(&c);
        if (OPEN_OK(dirs_img(), P("%s/blk/q", img_dir), "qcow2", NULL, &c) == 1)
                ASSERT_EQ_U64(c.images[0].virtual_size, 5U << 20);
        image_chain_done(&c);
        /* A block device outside the directories stays outside. */
        REFUSED(dirs_img(), dev[1], "raw", NULL, -EPERM, "outside");
finish:
        for (unsigned i = 0; i < 2; i++)
                if (dev[i][0])
                        (void) run("losetup -d %s", dev[i]);
}

static uint64_t rng_state;
static uint64_t rng(void) {
        /* xorshift64*: deterministic, seeded below. */
        rng_state ^= rng_state >> 12;
        rng_state ^= rng_state << 25;
        rng_state ^= rng_state >> 27;
        return rng_state * UINT64_C(0x2545F4914F6CDD1D);
}

/* 20000 seeded mutations of a valid header: never a crash (ASan watches in the sanitize build), and
 * whatever is accepted is sane. */
static void test_fuzz(void) {
        static const size_t fields[] = {
                4, 8, 12, 16, 20, 24, 32, 36, 40, 48, 56, 60, 64, 72, 80, 88, 96, 100, 104, 112, 116, 128, 132, 136};
        static const uint64_t interesting[] = {0, 1, 2, 3, 7, 8, 9, 12, 16, 21, 22, 72, 104, 112, 120, 511, 512, 1023,
                1024, 4095, 4096, 4097, 8192, 65535, 65536, 0x7fffffff, 0x80000000, 0xfffffff8, 0xffffffff,
                UINT64_C(0x7fffffffffffffff), UINT64_MAX, 0xe2792aca};
        _cleanup_close_ int fd = -1;
        uint8_t base[3 * 4096];
        size_t base_len;
        unsigned accepted = 0, with_backing = 0;
        unsigned before;

        ASSERT_OK(mkdir(P("%s/fuzz", img_dir), 0755));
        craft(&cr, &(Craft){.cluster_bits = 12, .backing = "b.qcow2", .backing_fmt = "qcow2"});
        base_len = cr.len;
        ASSERT_EQ(base_len, sizeof(base));
        memcpy(base, cr.buf, sizeof(base));
        craft_file(P("%s/fuzz/b.qcow2", img_dir), &(Craft){.cluster_bits = 12});
        fd = open(P("%s/fuzz/a.qcow2", img_dir), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        ASSERT_TRUE(fd >= 0);
        if (fd < 0)
                return;

        rng_state = UINT64_C(0x9e3779b97f4a7c15);
        before = count_fds();
        for (unsigned iter = 0; iter < 20000; iter++) {
                uint8_t buf[sizeof(base)];
                size_t len = sizeof(buf);
                unsigned n = 1 + (unsigned) (rng() % 4);
                _cleanup_free_ char *err = NULL;
                Image img = {.fd = -1};
                int r;

                memcpy(buf, base, sizeof(buf));
                for (unsigned m = 0; m < n; m++) {
                        uint64_t v = rng();
                        size_t off;

                        switch (v % 6) {
                        case 0: /* a bit in the header and extensions */
                                off = (size_t) (rng() % 256);
                                buf[off] ^= (uint8_t) (1U << (rng() % 8));
                                break;
                        case 1: /* a byte anywhere in the first cluster */
                                buf[rng() % 4096] = (uint8_t) rng();
                                break;
                        case 2: /* an interesting 32-bit value in a field */
                                off = fields[rng() % ELEMENTSOF(fields)];
                                put_be32(buf + off, (uint32_t) interesting[rng() % ELEMENTSOF(interesting)]);
                                break;
                        case 3: /* an interesting 64-bit value in a field */
                                off = fields[rng() % ELEMENTSOF(fields)];
                                put_be64(buf + off, interesting[rng() % ELEMENTSOF(interesting)]);
                                break;
                        case 4: /* a shorter file */
                                len = (size_t) (rng() % (len + 1));
                                break;
                        default: /* a random small value: cluster bits, lengths, versions */
                                off = fields[rng() % ELEMENTSOF(fields)];
                                put_be32(buf + off, (uint32_t) (rng() % 64));
                                break;
                        }
                }
                if (pwrite(fd, buf, len, 0) != (ssize_t) len || ftruncate(fd, (off_t) len) < 0) {
                        TAP_FAIL("cannot write the fuzz image: %m");
                        break;
                }

                r = image_read_header(fd, "qcow2", P("%s/fuzz/a.qcow2", img_dir), &img, &err);
                if (r >= 0) {
                        accepted++;
                        if (!img.format || img.cluster_size < 512 || img.cluster_size > (2U << 20) ||
                                (img.cluster_size & (img.cluster_size - 1)) || img.virtual_size > INT64_MAX ||
                                (img.backing && !path_is_safe_absolute(img.backing, PATH_MAX - 1)) ||
                                (img.backing_format && strlen(img.backing_format) > 15))
                                TAP_FAIL("iteration %u: an insane header was accepted", iter);
                        if (img.backing)
                                with_backing++;
                        if (err)
                                TAP_FAIL("iteration %u: a message on success", iter);
                } else if (!err && r != -ENOMEM)
                        TAP_FAIL("iteration %u: refused (%d) without a message", iter, r);
                image_free(&img);

                /* Now and then through the whole chain as well. */
                if (iter % 50 == 0) {
                        ImageChain c = {};
                        err = mfree(err);
                        r = image_chain_open(dirs_img(), P("%s/fuzz/a.qcow2", img_dir), "qcow2", true, NULL, &c, &err);
                        if (r >= 0 && (c.n < 1 || c.n > 2))
                                TAP_FAIL("iteration %u: chain of %zu", iter, c.n);
                        image_chain_done(&c);
                }
                if (count_fds() != before) {
                        TAP_FAIL("iteration %u: fd leak", iter);
                        break;
                }
        }
        printf("# fuzz: %u of 20000 mutations accepted, %u of them with a backing file\n", accepted, with_backing);
        ASSERT_TRUE(accepted > 0);
}

/* The overlay ProvisionDisk writes: read back by our parser and by qemu-img check; refusals
 * before anything is written. */
static void test_write_overlay(void) {
        _cleanup_free_ char *err = NULL;
        Image img = {};
        struct stat st;
        int fd, r;

        fd = open(P("%s/overlay.qcow2", img_dir), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
        ASSERT_TRUE(fd >= 0);
        ASSERT_OK(image_write_qcow2_overlay(
                fd, (UINT64_C(5) << 30) + 1, "/srv/templates/base image.qcow2", "qcow2", &err));
        ASSERT_OK(image_read_header(fd, "qcow2", P("%s/overlay.qcow2", img_dir), &img, &err));
        ASSERT_STREQ(img.format, "qcow2");
        ASSERT_EQ_U64(img.virtual_size, (UINT64_C(5) << 30) + 512); /* rounded up to a sector */
        ASSERT_EQ(img.cluster_size, 65536);
        ASSERT_STREQ(img.backing, "/srv/templates/base image.qcow2");
        ASSERT_STREQ(img.backing_format, "qcow2");
        ASSERT_OK(fstat(fd, &st));
        ASSERT_EQ_U64(st.st_size, 3 * 65536 + 11 * 8); /* header, refcounts, L1 of 11 entries */
        free(img.format);
        free(img.backing);
        free(img.backing_format);
        img = (Image){};
        /* Written once only: the fd must be an empty file. */
        err = mfree(err);
        ASSERT_ERRNO(image_write_qcow2_overlay(fd, 1 << 20, "/a", "raw", &err), -EINVAL);
        close(fd);
        if (have_qemu_img) /* the backing does not exist: check the overlay alone */
                ASSERT_OK(run("qemu-img check -q 'json:{\"driver\":\"qcow2\",\"backing\":null,"
                              "\"file\":{\"driver\":\"file\",\"filename\":\"%s/overlay.qcow2\"}}'",
                        img_dir));

        /* The largest size QEMU opens (an L1 table of 32 MiB), a raw URL backing. */
        fd = open(P("%s/overlay-max.qcow2", img_dir), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
        ASSERT_TRUE(fd >= 0);
        err = mfree(err);
        ASSERT_OK(image_write_qcow2_overlay(fd, UINT64_C(1) << 51, "nbd+unix:///?socket=/run/t.sock", "raw", &err));
        close(fd);
        if (have_qemu_img)
                ASSERT_OK(run("qemu-img check -q 'json:{\"driver\":\"qcow2\",\"backing\":null,"
                              "\"file\":{\"driver\":\"file\",\"filename\":\"%s/overlay-max.qcow2\"}}' && "
                              "qemu-img info -U %s/overlay-max.qcow2 | grep -q 'backing file format: raw'",
                        img_dir, img_dir));

#define OVERLAY_REFUSED(size, backing, format, expected) \
        do { \
                err = mfree(err); \
                fd = open(P("%s/overlay-bad.qcow2", img_dir), O_CREAT | O_TRUNC | O_RDWR | O_CLOEXEC, 0600); \
                ASSERT_TRUE(fd >= 0); \
                r = image_write_qcow2_overlay(fd, (size), (backing), (format), &err); \
                ASSERT_ERRNO(r, (expected)); \
                ASSERT_NOT_NULL(err); \
                ASSERT_OK(fstat(fd, &st)); \
                ASSERT_EQ_U64(st.st_size, 0); \
                close(fd); \
        } while (0)

        OVERLAY_REFUSED((UINT64_C(1) << 51) + 1, "/a", "qcow2", -EFBIG);
        OVERLAY_REFUSED(0, "/a", "qcow2", -EINVAL);
        OVERLAY_REFUSED(1 << 20, "", "qcow2", -ENAMETOOLONG);
        OVERLAY_REFUSED(1 << 20, "/a\nb", "qcow2", -ENAMETOOLONG);
        OVERLAY_REFUSED(1 << 20, "/a\xff", "qcow2", -ENAMETOOLONG);
        OVERLAY_REFUSED(1 << 20, "/a", "vmdk", -EINVAL);
        OVERLAY_REFUSED(1 << 20, "/a", NULL, -EINVAL);
        {
                char longname[1100];
                memset(longname, 'a', sizeof(longname) - 1);
                longname[0] = '/';
                longname[sizeof(longname) - 1] = 0;
                OVERLAY_REFUSED(1 << 20, longname, "qcow2", -ENAMETOOLONG);
        }
        unlink(P("%s/overlay.qcow2", img_dir));
        unlink(P("%s/overlay-max.qcow2", img_dir));
        unlink(P("%s/overlay-bad.qcow2", img_dir));
}

/* The directory of a new file, beneath an image directory and through no symlink. */
static void test_open_parent_beneath(void) {
        _cleanup_free_ char *err = NULL;
        const char *leaf = NULL;
        unsigned before = count_fds();
        struct stat a, b;
        int fd = -1;

        ASSERT_OK(mkdir(P("%s/pdir", img_dir), 0755));
        ASSERT_OK(mkdir(P("%s/pdir/sub", img_dir), 0755));
        ASSERT_OK(symlink(outside_dir, P("%s/plink", img_dir)));
        ASSERT_OK(symlink(P("%s/pdir", img_dir), P("%s/pinner", img_dir)));

        ASSERT_OK(image_open_parent_beneath(dirs_img(), P("%s/pdir/sub/new", img_dir), &fd, &leaf, &err));
        ASSERT_STREQ(leaf, "new");
        ASSERT_OK(fstat(fd, &a));
        ASSERT_OK(stat(P("%s/pdir/sub", img_dir), &b));
        ASSERT_TRUE(a.st_ino == b.st_ino && a.st_dev == b.st_dev);
        close(fd);
        ASSERT_OK(image_open_parent_beneath(dirs_img(), P("%s/new", img_dir), &fd, &leaf, &err));
        ASSERT_STREQ(leaf, "new");
        close(fd);

#define PARENT_REFUSED(path, expected) \
        do { \
                fd = -1; \
                err = mfree(err); \
                ASSERT_ERRNO(image_open_parent_beneath(dirs_img(), (path), &fd, &leaf, &err), (expected)); \
                ASSERT_EQ(fd, -1); \
                ASSERT_NOT_NULL(err); \
        } while (0)

        PARENT_REFUSED(P("%s/plink/new", img_dir), -ELOOP);
        PARENT_REFUSED(P("%s/plink/sub/new", img_dir), -ELOOP);
        PARENT_REFUSED(P("%s/pinner/sub/new", img_dir), -ELOOP);
        PARENT_REFUSED(P("%s/nothing/new", img_dir), -ENOENT);
        PARENT_REFUSED(P("%s/x.qcow2", outside_dir), -EPERM);
        PARENT_REFUSED(img_dir, -EPERM);
        PARENT_REFUSED(P("%s/pdir/../new", img_dir), -EINVAL);
        ASSERT_EQ(count_fds(), before);
}

static int setup(void) {
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
        have_qemu_img = system("qemu-img --version >/dev/null 2>&1") == 0;
        return 0;
}

int main(int argc, char **argv) {
        int r;

        tap_init(argc, argv);
        r = setup();
        if (r < 0) {
                printf("Bail out! cannot make a temporary directory: %s\n", strerror(-r));
                return EXIT_FAILURE;
        }

        TAP_RUN(test_open_beneath);
        TAP_RUN(test_open_beneath_xdev);
        TAP_RUN(test_chain_qemu_img);
        TAP_RUN(test_symlinks);
        TAP_RUN(test_backing_format);
        TAP_RUN(test_loops);
        TAP_RUN(test_depth);
        TAP_RUN(test_forbidden);
        TAP_RUN(test_claimed);
        TAP_RUN(test_header_hostile);
        TAP_RUN(test_chain_hostile);
        TAP_RUN(test_block_device);
        TAP_RUN(test_fuzz);
        TAP_RUN(test_write_overlay);
        TAP_RUN(test_open_parent_beneath);

        if (!getenv("TEST_IMAGE_KEEP"))
                (void) run("rm -rf %s", tmp);
        return tap_finish();
}
