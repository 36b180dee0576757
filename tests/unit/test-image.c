/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* image.c against images made at test time: real ones from qemu-img (chains, formats, options),
 * symlinks, mounts, loops, other guests' disks and hostile backings. Every refusal must leave no
 * fd open. The headers themselves are test-image-format.c's. */

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
                /* Named in forbidden by a symlink: not followed. A forbidden path is a disk checked
                 * at registration, looked up again as an image (beneath an image directory, no
                 * symlink): an owner who has since made their disk a symlink to a template must not
                 * make that template everyone else's forbidden backing (review 34d). */
                char *forbidden[] = {(char *) P("%s/g2-elsewhere", outside_dir), (char *) P("%s/fb/g2-link", img_dir),
                        NULL};

                ASSERT_OK(symlink(P("%s/fb/g2.qcow2", img_dir), forbidden[0]));
                ASSERT_OK(symlink(P("%s/fb/g2.qcow2", img_dir), forbidden[1]));
                if (OPEN_OK(dirs_img(), P("%s/fb/mine.qcow2", img_dir), "qcow2", forbidden, &c) != 2)
                        TAP_FAIL("a forbidden path that is a symlink was followed");
                image_chain_done(&c);
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

int main(int argc, char **argv) {
        tap_init(argc, argv);
        image_test_setup();

        TAP_RUN(test_open_beneath);
        TAP_RUN(test_open_beneath_xdev);
        TAP_RUN(test_chain_qemu_img);
        TAP_RUN(test_symlinks);
        TAP_RUN(test_backing_format);
        TAP_RUN(test_loops);
        TAP_RUN(test_depth);
        TAP_RUN(test_forbidden);
        TAP_RUN(test_claimed);
        TAP_RUN(test_chain_hostile);
        TAP_RUN(test_open_parent_beneath);

        image_test_cleanup();
        return tap_finish();
}
