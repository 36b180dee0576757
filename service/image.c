/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <fcntl.h>
#include <limits.h>
#include <linux/openat2.h>
#include <sys/stat.h>
#include <sys/syscall.h>

#include "image.h"
#include "image-format.h"
#include "util.h"

#define IMAGE_CHAIN_MAX 32

static char *dirs_to_string(char *const *dirs) {
        size_t len = 1;
        char *s, *p;

        if (strv_length(dirs) == 0)
                return strdup("none configured");
        for (char *const *d = dirs; *d; d++)
                len += strlen(image_printable(*d)) + 2;
        s = malloc(len);
        if (!s)
                return NULL;
        p = s;
        for (char *const *d = dirs; *d; d++) {
                if (p != s)
                        p = stpcpy(p, ", ");
                p = stpcpy(p, image_printable(*d));
        }
        return s;
}

/* The most specific directory that path lies strictly below. */
static const char *find_dir(char *const *dirs, const char *path) {
        const char *best = NULL;

        for (char *const *d = dirs; d && *d; d++) {
                if (!path_is_safe_absolute(*d, PATH_MAX - 1))
                        continue;
                if (streq(*d, path) || !path_is_below(path, *d))
                        continue;
                if (!best || strlen(*d) > strlen(best))
                        best = *d;
        }
        return best;
}

static int openat2_beneath(int dfd, const char *rel, uint64_t flags) {
        struct open_how how = {
                .flags = flags,
                .resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV,
        };

        for (unsigned attempt = 0;; attempt++) {
                long fd = syscall(SYS_openat2, dfd, rel, &how, sizeof(how));
                if (fd >= 0)
                        return (int) fd;
                /* RESOLVE_BENEATH answers EAGAIN when a rename raced the lookup: try again, a few times. */
                if ((errno == EAGAIN && attempt < 16) || errno == EINTR)
                        continue;
                return -errno;
        }
}

int image_entry_open(int dir_fd, const char *name, int flags) {
        if (isempty(name) || strchr(name, '/'))
                return -EINVAL;
        return openat2_beneath(dir_fd, name, (uint64_t) (flags | O_NOFOLLOW | O_CLOEXEC));
}

int image_entry_stat(int dir_fd, const char *name, struct stat *ret) {
        _cleanup_close_ int fd = image_entry_open(dir_fd, name, O_PATH);

        if (fd < 0)
                return fd;
        return fstat(fd, ret) < 0 ? -errno : 0;
}

static int open_error(char **ret_error, int r, const char *path, const char *dir) {
        switch (r) {
        case -ELOOP:
                return image_error(ret_error, r,
                        "%s is a symbolic link or lies below one inside %s; refusing to follow it. Name images by their real path.",
                        path, dir);
        case -EXDEV:
                return image_error(ret_error, r,
                        "%s lies on another file system than the image directory %s (a mount point below it); refusing to open it.",
                        path, dir);
        case -ENOENT:
                return image_error(ret_error, r, "Image %s does not exist.", path);
        case -ENOTDIR:
                return image_error(ret_error, r, "A component of %s is not a directory.", path);
        case -ENOSYS:
                return image_error(ret_error, r,
                        "The kernel does not offer openat2() (Linux 5.6 or newer is needed); refusing to open %s without it.",
                        path);
        default:
                return image_error(ret_error, r, "Failed to open image %s: %s", path, strerror(-r));
        }
}

/* The identity of a file named by a path we did not check ourselves (a QEMU reports it): looked up
 * like an image, beneath an image directory without following anything, never stat()ed by name. */
static int file_id_beneath(char *const *dirs, const char *path, struct stat *ret) {
        _cleanup_close_ int dfd = -1, fd = -1;
        const char *dir, *rel;

        if (!path || !path_is_safe_absolute(path, PATH_MAX - 1))
                return -EINVAL;
        dir = find_dir(dirs, path);
        if (!dir)
                return -EPERM;
        rel = streq(dir, "/") ? path + 1 : path + strlen(dir) + 1;
        dfd = open(dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (dfd < 0)
                return -errno;
        fd = openat2_beneath(dfd, rel, O_PATH | O_CLOEXEC);
        if (fd < 0)
                return fd;
        if (fstat(fd, ret) < 0)
                return -errno;
        return 0;
}

/* The image directory that holds path, opened (O_PATH), and path relative to it. what names the
 * path in messages ("Image", "Target"). The directory is configuration, trusted: it may itself
 * be reached through a symlink; everything below it is not. */
static int open_image_dir(char *const *dirs, const char *path, const char *what, int *ret_dfd, const char **ret_dir,
        const char **ret_rel, char **ret_error) {
        _cleanup_free_ char *list = NULL;
        const char *dir;
        int dfd;

        if (!path || !path_is_safe_absolute(path, PATH_MAX - 1))
                return image_error(ret_error, -EINVAL,
                        "%s path '%s' is not a normalized absolute path (no '.', '..', '//', trailing '/' or control characters).",
                        what, image_printable(path));
        dir = find_dir(dirs, path);
        if (!dir) {
                list = dirs_to_string(dirs);
                if (!list)
                        return -ENOMEM;
                return image_error(ret_error, -EPERM, "%s %s lies outside the image directories (%s); refusing to open it.",
                        what, path, list);
        }
        dfd = open(dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (dfd < 0)
                return image_error(ret_error, -errno, "Failed to open image directory %s: %m", dir);
        *ret_dfd = dfd;
        *ret_dir = dir;
        *ret_rel = streq(dir, "/") ? path + 1 : path + strlen(dir) + 1;
        return 0;
}

int image_open_beneath(char *const *dirs, const char *path, bool writable, int *ret_fd, char **ret_error) {
        _cleanup_close_ int dfd = -1, pfd = -1, fd = -1;
        struct stat pst, st;
        const char *dir, *rel;
        int fl, r;

        r = open_image_dir(dirs, path, "Image", &dfd, &dir, &rel, ret_error);
        if (r < 0)
                return r;

        /* Look before opening: opening a FIFO would block, opening a device may have side effects. */
        pfd = openat2_beneath(dfd, rel, O_PATH | O_CLOEXEC);
        if (pfd < 0)
                return open_error(ret_error, pfd, path, dir);
        if (fstat(pfd, &pst) < 0)
                return image_error(ret_error, -errno, "Failed to stat %s: %m", path);
        if (S_ISDIR(pst.st_mode))
                return image_error(ret_error, -EISDIR, "%s is a directory, not an image.", path);
        if (!S_ISREG(pst.st_mode) && !S_ISBLK(pst.st_mode))
                return image_error(ret_error, -EINVAL,
                        "%s is neither a regular file nor a block device; refusing to open it.", path);

        fd = openat2_beneath(dfd, rel, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
        if (fd < 0)
                return open_error(ret_error, fd, path, dir);
        if (fstat(fd, &st) < 0)
                return image_error(ret_error, -errno, "Failed to stat %s: %m", path);
        if (st.st_dev != pst.st_dev || st.st_ino != pst.st_ino || (st.st_mode & S_IFMT) != (pst.st_mode & S_IFMT))
                return image_error(ret_error, -ESTALE, "%s was replaced while it was being opened; try again.", path);

        fl = fcntl(fd, F_GETFL);
        if (fl < 0 || fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) < 0)
                return image_error(ret_error, -errno, "Failed to make %s blocking: %m", path);

        *ret_fd = TAKE_FD(fd);
        return 0;
}

void image_chain_done(ImageChain *c) {
        if (!c)
                return;
        for (size_t i = 0; i < c->n; i++) {
                Image *img = &c->images[i];

                if (img->fd >= 0)
                        close(img->fd);
                free(img->path);
                free(img->format);
                free(img->backing);
                free(img->backing_format);
        }
        c->images = mfree(c->images);
        c->n = 0;
}

typedef struct FileId {
        dev_t dev;
        ino_t ino;
        const char *path;
        bool top_only;
} FileId;

/* Other guests' disks, by identity: a hardlink or another name of the same file is the same disk.
 * forbidden holds paths we checked at registration, claimed what QEMUs report; both are looked up
 * like an image, beneath an image directory and through fds only (an owner may have made their
 * disk a symlink to a template since: review 34d): a path outside them cannot be the same file as
 * an image inside but for a hard link across, which only who may write there can make. */
static void add_file_ids(char *const *dirs, char *const *paths, bool claimed, FileId *ids, size_t *n) {
        for (char *const *f = paths; f && *f; f++) {
                struct stat st;
                int r;

                r = file_id_beneath(dirs, *f, &st);
                if (r < 0) {
                        log_debug_errno(r, "Cannot look up %s, not comparing against it: %m", image_printable(*f));
                        continue;
                }
                ids[(*n)++] = (FileId){.dev = st.st_dev, .ino = st.st_ino, .path = *f, .top_only = claimed};
        }
}

int image_chain_open(char *const *dirs, const char *path, const char *format, bool writable, char *const *forbidden,
        ImageChain *ret, char **ret_error) {
        return image_chain_open_claimed(dirs, path, format, writable, forbidden, NULL, ret, ret_error);
}

int image_chain_open_claimed(char *const *dirs, const char *path, const char *format, bool writable,
        char *const *forbidden, char *const *claimed, ImageChain *ret, char **ret_error) {
        _cleanup_(image_chain_done) ImageChain c = {};
        _cleanup_free_ FileId *bad = NULL;
        FileId ids[IMAGE_CHAIN_MAX];
        size_t n_bad = 0;
        int r;

        if (!path || !path_is_safe_absolute(path, PATH_MAX - 1))
                return image_error(
                        ret_error, -EINVAL, "Image path '%s' is not a normalized absolute path.", image_printable(path));
        if (!image_format_supported(format))
                return image_error(ret_error, -EOPNOTSUPP,
                        "The format '%s' of %s is not supported; images must be qcow2 or raw.", image_printable(format),
                        path);

        if (strv_length(forbidden) + strv_length(claimed) > 0) {
                bad = calloc(strv_length(forbidden) + strv_length(claimed), sizeof(FileId));
                if (!bad)
                        return -ENOMEM;
                add_file_ids(dirs, forbidden, false, bad, &n_bad);
                add_file_ids(dirs, claimed, true, bad, &n_bad);
        }

        c.images = calloc(IMAGE_CHAIN_MAX, sizeof(Image));
        if (!c.images)
                return -ENOMEM;

        for (;;) {
                const Image *parent = c.n > 0 ? &c.images[c.n - 1] : NULL;
                const char *p = parent ? parent->backing : path;
                const char *f = parent ? parent->backing_format : format;
                _cleanup_free_ char *err = NULL, *list = NULL;
                _cleanup_close_ int fd = -1;
                struct stat st;
                Image *img;

                if (c.n >= IMAGE_CHAIN_MAX)
                        return image_error(ret_error, -E2BIG,
                                "The backing chain of %s is longer than %d images; refusing to open it.", path,
                                IMAGE_CHAIN_MAX);
                if (parent && !f)
                        return image_error(ret_error, -EINVAL,
                                "%s does not record the format of its backing file %s, and formats are never probed; rebase it with 'qemu-img rebase -u -b %s -F FORMAT %s'.",
                                parent->path, p, p, parent->path);
                if (parent && !image_format_supported(f))
                        return image_error(ret_error, -EOPNOTSUPP,
                                "The backing file %s of %s has format '%s'; only qcow2 and raw are supported.", p,
                                parent->path, f);
                for (size_t i = 0; i < c.n; i++)
                        if (streq(c.images[i].path, p))
                                return image_error(ret_error, -ELOOP,
                                        "The backing chain of %s loops: %s is backed by %s, which is already in the chain.",
                                        path, parent ? parent->path : p, p);
                if (parent && !find_dir(dirs, p)) {
                        list = dirs_to_string(dirs);
                        if (!list)
                                return -ENOMEM;
                        return image_error(ret_error, -EPERM,
                                "Backing file %s of %s lies outside the image directories (%s); refusing to open it.",
                                p, parent->path, list);
                }

                r = image_open_beneath(dirs, p, writable && !parent, &fd, &err);
                if (r < 0) {
                        if (r == -ENOMEM || !err)
                                return r;
                        if (!parent)
                                return image_error(ret_error, r, "%s", err);
                        return image_error(ret_error, r, "Cannot open backing file %s of %s: %s", p, parent->path, err);
                }
                if (fstat(fd, &st) < 0)
                        return image_error(ret_error, -errno, "Failed to stat %s: %m", p);
                for (size_t i = 0; i < c.n; i++)
                        if (ids[i].dev == st.st_dev && ids[i].ino == st.st_ino)
                                return image_error(ret_error, -ELOOP,
                                        "The backing chain of %s loops: %s is the same file as %s, already in the chain.",
                                        path, p, ids[i].path);
                for (size_t i = 0; i < n_bad; i++) {
                        if (bad[i].dev != st.st_dev || bad[i].ino != st.st_ino || (bad[i].top_only && parent))
                                continue;
                        if (streq(bad[i].path, p))
                                return image_error(ret_error, -EBUSY,
                                        "%s is a writable disk of another guest; refusing to open it.", p);
                        return image_error(ret_error, -EBUSY,
                                "%s is the same file as %s, a writable disk of another guest; refusing to open it.", p,
                                image_printable(bad[i].path));
                }

                img = &c.images[c.n];
                *img = (Image){.fd = TAKE_FD(fd)};
                c.n++;
                img->path = strdup(p);
                if (!img->path)
                        return -ENOMEM;
                ids[c.n - 1] = (FileId){.dev = st.st_dev, .ino = st.st_ino, .path = img->path};

                r = image_read_header(img->fd, f, img->path, img, ret_error);
                if (r < 0)
                        return r;
                if (!img->backing)
                        break;
        }

        *ret = c;
        c = (ImageChain){};
        return 0;
}

int image_open_parent_beneath(
        char *const *dirs, const char *path, int *ret_dir_fd, const char **ret_leaf, char **ret_error) {
        _cleanup_close_ int dfd = -1, pfd = -1;
        _cleanup_free_ char *rel_dir = NULL;
        const char *dir, *rel, *slash;
        int r;

        r = open_image_dir(dirs, path, "Target", &dfd, &dir, &rel, ret_error);
        if (r < 0)
                return r;

        slash = strrchr(rel, '/');
        if (!slash) {
                *ret_dir_fd = TAKE_FD(dfd);
                *ret_leaf = rel;
                return 0;
        }
        rel_dir = strndup(rel, (size_t) (slash - rel));
        if (!rel_dir)
                return -ENOMEM;
        pfd = openat2_beneath(dfd, rel_dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (pfd == -ENOTDIR)
                return image_error(ret_error, pfd, "A component of the directory of %s is not a directory.", path);
        if (pfd == -ENOENT)
                return image_error(ret_error, pfd, "The directory of %s does not exist.", path);
        if (pfd < 0)
                return open_error(ret_error, pfd, path, dir);
        *ret_dir_fd = TAKE_FD(pfd);
        *ret_leaf = slash + 1;
        return 0;
}
