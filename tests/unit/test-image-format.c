/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* image-format.c: hand-crafted qcow2 headers for everything hostile, random ones, block devices,
 * and the overlay we write. Every refusal must leave no fd open. */

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
#include "test-image-util.h"

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
                /* Empty unknown extensions, then the end marker: 1024 are walked, not 1025 (review
                 * 34d: the 262,144 a 2 MiB cluster holds, per image of a chain). */
                for (unsigned n = 1024; n <= 1025; n++) {
                        craft(&cr, &(Craft){});
                        for (unsigned i = 0; i < n; i++)
                                put_be32(cr.buf + 112 + 8 * i, 0x12345678U);
                        put_be32(cr.buf + 112 + 8 * n, 0);
                        if (n == 1024) {
                                if (read_crafted("/srv/img/a.qcow2", "qcow2", &img, &err) < 0)
                                        TAP_FAIL("1024 extensions refused: %s", strempty(err));
                                image_free(&img);
                                err = mfree(err);
                        } else
                                HEADER(-EBADMSG, "more than 1024 header extensions");
                }
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

/* The format options a mirror's new image copies (mirror.c), as qemu-img wrote them. */
static void test_format_options(void) {
        static const struct {
                const char *options;
                uint32_t cluster_size, version, refcount_bits;
                bool lazy, extl2, zstd;
        } t[] = {
                {"cluster_size=65536", 65536, 3, 16, false, false, false},
                {"cluster_size=131072,lazy_refcounts=on,compression_type=zstd,refcount_bits=64", 131072, 3, 64, true,
                        false, true},
                {"cluster_size=1048576,extended_l2=on,refcount_bits=1", 1048576, 3, 1, false, true, false},
                {"compat=0.10,cluster_size=4096", 4096, 2, 16, false, false, false},
        };

        if (!have_qemu_img) {
                printf("# no qemu-img; skipping\n");
                return;
        }
        for (size_t i = 0; i < ELEMENTSOF(t); i++) {
                _cleanup_free_ char *err = NULL;
                _cleanup_close_ int fd = -1;
                Image img = {.fd = -1};

                ASSERT_OK(run("qemu-img create -q -f qcow2 -o %s %s/opt%zu.qcow2 64M", t[i].options, img_dir, i));
                fd = open(P("%s/opt%zu.qcow2", img_dir, i), O_RDONLY | O_CLOEXEC);
                ASSERT_TRUE(fd >= 0);
                ASSERT_OK(image_read_header(fd, "qcow2", P("%s/opt%zu.qcow2", img_dir, i), &img, &err));
                ASSERT_EQ(img.cluster_size, t[i].cluster_size);
                ASSERT_EQ(img.qcow2_version, t[i].version);
                ASSERT_EQ(img.refcount_bits, t[i].refcount_bits);
                ASSERT_EQ(img.lazy_refcounts, t[i].lazy);
                ASSERT_EQ(img.extended_l2, t[i].extl2);
                ASSERT_EQ(img.compression_zstd, t[i].zstd);
                image_free(&img);
        }

        /* An overlay of a remote template: its options are read, its protocol backing is passed over
         * (backing NULL), and only there: image_read_header() still refuses it. */
        {
                _cleanup_free_ char *err = NULL;
                _cleanup_close_ int fd = -1;
                Image img = {.fd = -1};

                ASSERT_OK(run("qemu-img create -q -f qcow2 -u -o cluster_size=131072 -b "
                              "'nbd+unix:///?socket=/nonexistent' -F raw %s/remote.qcow2 64M",
                        img_dir));
                fd = open(P("%s/remote.qcow2", img_dir), O_RDONLY | O_CLOEXEC);
                ASSERT_TRUE(fd >= 0);
                ASSERT_EQ(image_read_header(fd, "qcow2", P("%s/remote.qcow2", img_dir), &img, &err), -EOPNOTSUPP);
                ASSERT_TRUE(err && strstr(err, "a protocol and not a file"));
                ASSERT_OK(image_read_format_options(fd, P("%s/remote.qcow2", img_dir), &img, NULL));
                ASSERT_EQ(img.cluster_size, 131072u);
                ASSERT_TRUE(img.backing == NULL);
                ASSERT_STREQ(img.backing_format, "raw");
                image_free(&img);
        }
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

int main(int argc, char **argv) {
        tap_init(argc, argv);
        image_test_setup();

        TAP_RUN(test_header_hostile);
        TAP_RUN(test_block_device);
        TAP_RUN(test_fuzz);
        TAP_RUN(test_write_overlay);
        TAP_RUN(test_format_options);

        image_test_cleanup();
        return tap_finish();
}
