/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* Pinning the disks a handoff or the mirror may open: the files a guest's QEMU has open, seen
 * through /proc/PID/fd, never a path QEMU reported alone (guest.h). */

#include <dirent.h>
#include <inttypes.h>
#include <stdio.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>

#include "engine.h"
#include "guest.h"
#include "disk.h"
#include "image.h"
#include "util.h"

#define PIN_FDS_MAX 65536 /* a QEMU's open files we look through, at most */
/* How long one look through a process's files (or, for host_holds_open(), every process's) may
 * hold the daemon: a fd's fdinfo is formatted whole at each read, and a process can make one long
 * (an epoll set watching many fds, many locks on a file). Past it: cannot tell (-EBUSY). */
#define PIN_SCAN_USEC (2 * USEC_PER_SEC)
/* A QEMU's fds of one disk's name that are looked at closer, at most: an honest one has one or two
 * (read-only, read-write); the name is QEMU's to choose, and so are the files it opens under it. */
#define PIN_LOOKS_PER_PATH 8

/* Whether g's QEMU is there to be looked at: running, connected (its pid from the socket), not
 * being handed over. */
static bool qemu_seen(Guest *g) {
        return !g->offline && !g->handoff && g->qmp_proc_fd >= 0 && guest_qmp_ready(g);
}

/* The type, device, inode and mount id of what dir_fd/name (flags: fstatat()'s) leads to, as the
 * kernel holds them already: a file QEMU has open may be on a FUSE or NFS mount whose server never
 * answers (FUSE lets root in with allow_other), and a stat that asks it would hold the daemon for
 * good. No mount id (before Linux 5.8): -EOPNOTSUPP. */
static int stat_cached(int dir_fd, const char *name, int flags, struct stat *ret, uint64_t *ret_mnt_id) {
        struct statx sx;

        if (statx(dir_fd, name, flags | AT_STATX_DONT_SYNC, STATX_TYPE | STATX_INO | STATX_MNT_ID, &sx) < 0)
                return -errno;
        if (!(sx.stx_mask & STATX_MNT_ID))
                return -EOPNOTSUPP;
        *ret = (struct stat) {
                .st_dev = makedev(sx.stx_dev_major, sx.stx_dev_minor),
                .st_ino = sx.stx_ino,
                .st_mode = sx.stx_mode,
        };
        *ret_mnt_id = sx.stx_mnt_id;
        return 0;
}

/* Whether a process has a file open (for writing), told fd by fd: /proc/PID/fdinfo/N, read once,
 * gives the open flags and inode number; only a fd whose inode number is the file's is looked
 * at closer: /proc/PID/fd/N statx()ed through its link gives its device too, as our fstat()
 * does (whatever the mount namespaces, chroots, btrfs subvolumes or overlays), and its mount id,
 * which must be fdinfo's (inode numbers repeat across file systems), and fdinfo is read again, to
 * be the same open file still (a QEMU may dup2() another file onto N meanwhile). No stat through
 * the link of any other fd (it may hang on a dead network file system), and no fd of QEMU's is
 * ever taken into the daemon (its close could wait on a FUSE server's flush for good). Left: two
 * btrfs subvolumes on one mount number their inodes alike (SECURITY.md). */
typedef struct FdInfo {
        unsigned long flags;
        uint64_t mnt_id, ino;
} FdInfo;

static int fdinfo_read(int dir_fd, const char *name, FdInfo *ret) {
        char buf[1024];
        const char *flags, *mnt, *ino;
        ssize_t n;

        n = read_small_at(dir_fd, name, buf, sizeof(buf));
        if (n < 0)
                return (int) n;
        /* "pos:" comes first: the three are each at the start of a line of their own. */
        flags = strstr(buf, "\nflags:");
        mnt = strstr(buf, "\nmnt_id:");
        ino = strstr(buf, "\nino:");
        if (!flags || !mnt || !ino || sscanf(flags, "\nflags: %lo", &ret->flags) != 1 ||
                sscanf(mnt, "\nmnt_id: %" SCNu64, &ret->mnt_id) != 1 || sscanf(ino, "\nino: %" SCNu64, &ret->ino) != 1)
                return -EBADMSG;
        return 0;
}

static bool fd_writable(const FdInfo *fi) {
        return (fi->flags & O_ACCMODE) == O_RDWR || (fi->flags & O_ACCMODE) == O_WRONLY;
}

/* Whether a fd may be open for writing, from its /proc/PID/fd/N link's own mode (procfs gives it
 * the fd's access mode: no fdinfo read, nothing followed). Only to pass fds over: fdinfo decides. */
static bool fd_link_writable(int fd_dir, const char *name) {
        struct stat st;

        return fstatat(fd_dir, name, &st, AT_SYMLINK_NOFOLLOW) < 0 || (st.st_mode & S_IWUSR);
}

/* The file a process's fd `name` (in fd_dir, its fdinfo in info_dir) leads to, told against fi,
 * that fd's fdinfo as read before: through the fd's link, the file QEMU has open, whatever its
 * name now, which must have fi's inode number on fi's mount (inode numbers repeat across file
 * systems: a memfd of the template's number swapped on the fd); then its fdinfo again, to be fi
 * still (a QEMU that dup2()s another file onto the fd meanwhile cannot pair one file's identity
 * with another's flags). 1 and the file's type, device and inode in ret; 0 if the fd is not that
 * file (closed or replaced meanwhile); -EBUSY if its link cannot be looked at. */
static int fd_file(int fd_dir, int info_dir, const char *name, const FdInfo *fi, struct stat *ret) {
        uint64_t mnt = 0;
        FdInfo again;
        int r;

        r = stat_cached(fd_dir, name, 0, ret, &mnt);
        if (r < 0)
                return r == -ENOENT ? 0 : -EBUSY;
        if ((uint64_t) ret->st_ino != fi->ino || mnt != fi->mnt_id)
                return 0;
        if (fdinfo_read(info_dir, name, &again) < 0 || again.flags != fi->flags || again.mnt_id != fi->mnt_id ||
                again.ino != fi->ino)
                return 0;
        return 1;
}

/* For each of paths[0..n), the (device, inode) of the regular file that process /proc/PID
 * (proc_fd) has open under that name, in ret[i] with found[i] set, and whether that fd is open for
 * writing (writable[i]; one that is, if any of them). One pass over its fds for all (a QEMU of 256
 * disks and 65536 fds is 65536 readlinks, not 256 times as many); each fd whose link names one is
 * told by fd_file(). How many were found, or -errno. */
static int open_file_ids(int proc_fd, const char *const *paths, size_t n_paths, struct stat *ret, bool *found,
        bool *writable) {
        _cleanup_close_ int info_dir = openat(proc_fd, "fdinfo", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        int fd_dir = openat(proc_fd, "fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        size_t left = n_paths, n_found = 0; /* left: not found open for writing yet */
        usec_t deadline = now_usec(CLOCK_MONOTONIC) + PIN_SCAN_USEC;
        _cleanup_free_ unsigned *looks = NULL; /* fds of each name looked at closer */
        DIR *dir;
        unsigned n = 0;
        int r = 0;

        if (fd_dir < 0 || info_dir < 0) {
                r = -errno;
                closep(&fd_dir);
                return r;
        }
        dir = fdopendir(fd_dir);
        if (!dir) {
                r = -errno;
                close(fd_dir);
                return r;
        }
        looks = calloc(n_paths, sizeof(unsigned));
        if (!looks) {
                closedir(dir);
                return -ENOMEM;
        }
        for (size_t i = 0; i < n_paths; i++)
                found[i] = writable[i] = false;
        /* By the link's text first (a readlink formats a path, nothing more): fdinfo is read only
         * of a fd that names a disk, a few of them, and none more of a name whose file is not a
         * regular one. */
        for (struct dirent *de; left > 0 && n < PIN_FDS_MAX && (de = readdir(dir)); n++) {
                char target[4097];
                bool have_fi = false;
                ssize_t k;
                FdInfo fi;

                if (de->d_name[0] == '.')
                        continue;
                if (now_usec(CLOCK_MONOTONIC) > deadline) {
                        r = -EBUSY;
                        break;
                }
                k = readlinkat(dirfd(dir), de->d_name, target, sizeof(target) - 1);
                if (k <= 0 || (size_t) k >= sizeof(target) - 1 || target[0] != '/')
                        continue;
                target[k] = 0;
                for (size_t i = 0; i < n_paths; i++) {
                        struct stat st;

                        if (!paths[i] || !streq(target, paths[i]) || (found[i] && writable[i]) ||
                                looks[i] >= PIN_LOOKS_PER_PATH || (found[i] && !fd_link_writable(dirfd(dir), de->d_name)))
                                continue;
                        looks[i]++;
                        if (!have_fi && fdinfo_read(info_dir, de->d_name, &fi) < 0)
                                break;
                        have_fi = true;
                        if ((found[i] && !fd_writable(&fi)) || fd_file(dirfd(dir), info_dir, de->d_name, &fi, &st) <= 0)
                                continue;
                        if (!S_ISREG(st.st_mode)) {
                                looks[i] = PIN_LOOKS_PER_PATH; /* no disk of ours */
                                continue;
                        }
                        if (!found[i])
                                n_found++;
                        found[i] = true;
                        ret[i] = st;
                        if (fd_writable(&fi)) {
                                writable[i] = true;
                                left--;
                        }
                }
        }
        closedir(dir);
        return r < 0 ? r : (int) n_found;
}

static int open_file_id(int proc_fd, const char *path, struct stat *ret, bool *ret_writable) {
        bool found;

        return open_file_ids(proc_fd, &path, 1, ret, &found, ret_writable);
}

int guest_qemu_has_open(Guest *g, const char *path, dev_t *ret_dev, ino_t *ret_ino, bool *ret_writable) {
        struct stat st;
        int r;

        if (!qemu_seen(g) || isempty(path))
                return 0;
        r = open_file_id(g->qmp_proc_fd, path, &st, ret_writable);
        if (r <= 0)
                return r;
        *ret_dev = st.st_dev;
        *ret_ino = st.st_ino;
        return 1;
}

/* Whether process /proc/PID (proc_fd) has the file (want: fstat of ours) open. 0 if not, or if
 * the process is gone; < 0 if it cannot be told, not "no": -EACCES, a process that may not be
 * looked at; -EBUSY, a fd of the file that cannot be, or the look took past deadline. A fd is
 * passed over by its link's text (not a path: an epoll set, a socket, a pipe), which asks nothing
 * of the file system it leads to; then by its fdinfo's inode number. (The file's name is no
 * filter: the process may have it open under another, in another mount namespace or through a
 * hard link.) */
static int pid_holds(int proc_fd, const struct stat *want, usec_t deadline) {
        _cleanup_close_ int info_dir = -EBADF;
        DIR *dir;
        unsigned n = 0;
        int fd_dir, r = 0;

        fd_dir = openat(proc_fd, "fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd_dir < 0)
                return errno == ENOENT || errno == ESRCH || errno == EINVAL ? 0 : -errno;
        dir = fdopendir(fd_dir);
        if (!dir) {
                r = -errno;
                close(fd_dir);
                return r;
        }
        for (struct dirent *de; r == 0 && n < PIN_FDS_MAX && (de = readdir(dir)); n++) {
                struct stat st;
                char target[2];
                FdInfo fi;
                int k;

                if (de->d_name[0] == '.')
                        continue;
                if (now_usec(CLOCK_MONOTONIC) > deadline) {
                        r = -EBUSY;
                        break;
                }
                k = (int) readlinkat(dirfd(dir), de->d_name, target, sizeof(target));
                if ((k < 0 && errno == ENOENT) || (k > 0 && target[0] != '/'))
                        continue; /* closed meanwhile, or no file of a path (a path too long to tell:
                                   * looked at) */
                if (info_dir < 0) {
                        info_dir = openat(proc_fd, "fdinfo", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
                        if (info_dir < 0) {
                                r = errno == ENOENT || errno == ESRCH ? 0 : -errno;
                                break;
                        }
                }
                if (fdinfo_read(info_dir, de->d_name, &fi) < 0 || fi.ino != (uint64_t) want->st_ino)
                        continue; /* closed or replaced meanwhile */
                /* A fd of the file that cannot be looked at: not "no" (-EBUSY). */
                k = fd_file(dirfd(dir), info_dir, de->d_name, &fi, &st);
                if (k < 0)
                        r = k;
                else if (k > 0 && st.st_dev == want->st_dev && st.st_ino == want->st_ino)
                        r = 1;
        }
        closedir(dir);
        return r;
}

/* QEMU's image locks (file-posix: bytes 100 + permission, 200 + shared permission; libvirt's
 * virtlockd takes byte 0), seen by any process that holds them, on this host or, over NFSv4,
 * another: 1 if a lock is held there. */
#define QEMU_LOCK_BYTES_START 0
#define QEMU_LOCK_BYTES_LEN 300

static int image_locked(int fd) {
        struct flock fl = {
                .l_type = F_WRLCK,
                .l_whence = SEEK_SET,
                .l_start = QEMU_LOCK_BYTES_START,
                .l_len = QEMU_LOCK_BYTES_LEN,
        };

        if (fcntl(fd, F_OFD_GETLK, &fl) < 0)
                return -errno;
        return fl.l_type != F_UNLCK;
}

int host_holds_open(int fd, pid_t *ret_pid) {
        usec_t deadline = now_usec(CLOCK_MONOTONIC) + PIN_SCAN_USEC;
        unsigned unseen = 0;
        struct stat want;
        DIR *proc;
        int r;

        *ret_pid = 0;
        r = image_locked(fd);
        if (r != 0)
                return r;
        if (fstat(fd, &want) < 0)
                return -errno;
        proc = opendir("/proc");
        if (!proc)
                return -errno;
        for (struct dirent *de; r == 0 && (de = readdir(proc));) {
                _cleanup_close_ int proc_fd = -EBADF;
                char *end;
                long pid;

                errno = 0;
                pid = strtol(de->d_name, &end, 10);
                if (errno != 0 || *end || end == de->d_name || pid <= 0 || pid > INT_MAX || pid == getpid())
                        continue;
                proc_fd = openat(dirfd(proc), de->d_name, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
                if (proc_fd < 0)
                        continue; /* gone */
                r = pid_holds(proc_fd, &want, deadline);
                if (r > 0)
                        *ret_pid = (pid_t) pid;
                else if (r == -EACCES) {
                        /* Another SELinux domain, say: its QEMU would hold the locks above. */
                        unseen++;
                        r = 0;
                }
        }
        closedir(proc);
        if (r == 0 && unseen > 0)
                log_info("%u processes could not be looked at for an open file; QEMU's image locks on it are free.",
                        unseen);
        return r;
}

void guest_pin_disks(Guest *g) {
        _cleanup_free_ const char **paths = NULL;
        _cleanup_free_ struct stat *st = NULL;
        _cleanup_free_ bool *found = NULL, *writable = NULL;

        if (!qemu_seen(g) || g->n_disks == 0)
                return;
        paths = calloc(g->n_disks, sizeof(char *));
        st = calloc(g->n_disks, sizeof(struct stat));
        found = calloc(g->n_disks, sizeof(bool));
        writable = calloc(g->n_disks, sizeof(bool));
        if (!paths || !st || !found || !writable)
                return (void) log_oom();
        for (size_t i = 0; i < g->n_disks; i++)
                paths[i] = isempty(g->disks[i]->path) ? NULL : g->disks[i]->path;
        if (open_file_ids(g->qmp_proc_fd, paths, g->n_disks, st, found, writable) < 0)
                memset(found, 0, sizeof(bool) * g->n_disks); /* not seen: nothing pinned */
        for (size_t i = 0; i < g->n_disks; i++) {
                Disk *d = g->disks[i];

                d->pinned = found[i];
                /* A file QEMU only reads (a CD-ROM image, a disk given read-only, or a template a
                 * hostile QEMU names as its disk) is handed over read-only. */
                d->pin_writable = found[i] && writable[i];
                if (found[i]) {
                        d->pin_dev = st[i].st_dev;
                        d->pin_ino = st[i].st_ino;
                        d->pin_uid = g->qmp_peer_uid;
                }
        }
}

bool guest_pivot_check(Guest *g, const char *path, uint64_t dev, uint64_t ino) {
        _cleanup_free_ char *error = NULL;
        _cleanup_close_ int fd = -EBADF;
        struct stat st;
        bool writable;

        if (g->offline || g->qmp_proc_fd < 0 || !path)
                return false;
        if (image_open_beneath(g->engine->config.image_dirs, path, false, &fd, &error) < 0 || fstat(fd, &st) < 0 ||
                (uint64_t) st.st_dev != dev || (uint64_t) st.st_ino != ino)
                return false;
        return open_file_id(g->qmp_proc_fd, path, &st, &writable) > 0 && (uint64_t) st.st_dev == dev &&
               (uint64_t) st.st_ino == ino;
}

/* Every disk's top image, opened as the storage helper will open it, is the file its QEMU had
 * open when pinned: a path QEMU reported is never trusted alone. */
int guest_check_pins(Guest *g) {
        _cleanup_strv_free_ char **forbidden = guest_forbidden_images(g), **claimed = engine_guest_claims(g->engine, g);

        if (!forbidden || !claimed)
                return -ENOMEM;
        for (size_t i = 0; i < g->n_disks; i++) {
                _cleanup_(image_chain_done) ImageChain chain = {};
                _cleanup_free_ char *error = NULL;
                Disk *d = g->disks[i];
                int r;

                if (!d->pinned) {
                        log_warning("Guest %s disk %s: its QEMU was never seen with %s open; not handing it over.",
                                g->name, d->alias, d->path);
                        return -EPERM;
                }
                /* The top is compared with the pin there, as at every later open of the handoff. */
                r = storage_chain_open_handed_over(g->engine->config.image_dirs, g->owner, d->pin_uid, d->pin_dev,
                        d->pin_ino, d->path, d->format, false, forbidden, claimed, &chain, &error);
                if (r < 0) {
                        log_warning("Guest %s disk %s: cannot hand over %s: %s; not handing it over.", g->name,
                                d->alias, d->path, error ?: strerror(-r));
                        return r;
                }
        }
        return 0;
}
