/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <fcntl.h>
#include <limits.h>
#include <linux/openat2.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>

#include "fs-identity.h"
#include "qmp-socket.h"
#include "util.h"

#define PROC_FD_PATH_MAX 40

static int split_path(const char *path, char **ret_dir, const char **ret_leaf) {
        const char *slash;

        if (!path_is_safe_absolute(path, sizeof(((struct sockaddr_un *) NULL)->sun_path) - 1) || streq(path, "/"))
                return -EINVAL;
        slash = strrchr(path, '/');
        *ret_dir = slash == path ? strdup("/") : strndup(path, (size_t) (slash - path));
        if (!*ret_dir)
                return -ENOMEM;
        *ret_leaf = slash + 1;
        return 0;
}

int qmp_socket_open(const char *path, const QmpSocketPin *pin, QmpSocketPin *ret_seen, int *ret_dir_fd,
        int *ret_sock_fd) {
        _cleanup_free_ char *dir = NULL;
        _cleanup_close_ int dir_fd = -1, sock_fd = -1;
        QmpSocketPin seen = { .set = true };
        const char *leaf;
        struct stat st;
        int r;

        r = split_path(path, &dir, &leaf);
        if (r < 0)
                return r;
        r = sd_id128_get_boot(&seen.boot_id);
        if (r < 0)
                return r;
        /* The directory part is resolved like any path (the registrant's symlinks included) and
         * then known by its identity only; never through /proc's magic links (/proc/self/fd/N is
         * one of the daemon's own directories, reached without a search of its parents). */
        dir_fd = (int) syscall(SYS_openat2, AT_FDCWD, dir,
                &(struct open_how) { .flags = O_PATH | O_DIRECTORY | O_CLOEXEC, .resolve = RESOLVE_NO_MAGICLINKS },
                sizeof(struct open_how));
        if (dir_fd < 0)
                return -errno;
        if (fstat(dir_fd, &st) < 0)
                return -errno;
        seen.dir_dev = (uint64_t) st.st_dev;
        seen.dir_ino = (uint64_t) st.st_ino;
        if (pin && pin->set && sd_id128_equal(pin->boot_id, seen.boot_id) &&
                (pin->dir_dev != seen.dir_dev || pin->dir_ino != seen.dir_ino))
                return -EXDEV;

        sock_fd = openat(dir_fd, leaf, O_PATH | O_NOFOLLOW | O_CLOEXEC);
        if (sock_fd < 0)
                return -errno;
        if (fstat(sock_fd, &st) < 0)
                return -errno;
        if (S_ISLNK(st.st_mode))
                return -ELOOP;
        if (!S_ISSOCK(st.st_mode))
                return -ENOTSOCK;

        if (ret_seen)
                *ret_seen = seen;
        if (ret_dir_fd)
                *ret_dir_fd = TAKE_FD(dir_fd);
        *ret_sock_fd = TAKE_FD(sock_fd);
        return 0;
}

int qmp_socket_connect(int sock_fd, int *ret_fd, struct ucred *ret_peer) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        _cleanup_close_ int fd = -1;
        socklen_t sl = sizeof(struct ucred);

        /* The magic link is the inode we checked, not a name to look up again. */
        (void) snprintf(sa.sun_path, sizeof(sa.sun_path), "/proc/self/fd/%d", sock_fd);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0)
                return -errno;
        if (connect(fd, (struct sockaddr *) &sa, sizeof(sa)) < 0)
                /* A unix stream connect completes at once or fails; never EINPROGRESS. */
                return errno == EINPROGRESS ? -EAGAIN : -errno;
        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, ret_peer, &sl) < 0)
                return -errno;
        if (sl != sizeof(struct ucred) || ret_peer->pid <= 0)
                return -EPROTO; /* no credentials: never trust an anonymous peer */
        *ret_fd = TAKE_FD(fd);
        return 0;
}

#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD 77
#endif

/* The effective uid in /proc/PID/status (proc_fd). */
static int proc_euid(int proc_fd, uid_t *ret) {
        char buf[4096];
        const char *line;
        unsigned long ruid, euid;
        ssize_t n;

        n = read_small_at(proc_fd, "status", buf, sizeof(buf));
        if (n < 0)
                return (int) n;
        line = strstr(buf, "\nUid:");
        if (!line || sscanf(line, "\nUid: %lu %lu", &ruid, &euid) != 2)
                return -EBADMSG;
        *ret = (uid_t) euid;
        return 0;
}

int qmp_socket_instance(int proc_fd, pid_t pid, QemuInstance *ret) {
        char buf[1024];
        const char *s;
        unsigned long long start;
        ssize_t n;

        n = read_small_at(proc_fd, "stat", buf, sizeof(buf));
        if (n < 0)
                return (int) n;
        /* "PID (COMM) STATE PPID …": COMM may hold anything but ends at the last ')'; the start
         * time is the 22nd field, the 20th after it. */
        s = strrchr(buf, ')');
        if (!s || sscanf(s + 1, " %*c" " %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %*u %*u %*d %*d %*d %*d %*d %*d %llu",
                          &start) != 1 || start == 0)
                return -EBADMSG;
        *ret = (QemuInstance) { .pid = pid, .start = start };
        return 0;
}

int qmp_socket_peer_proc(int fd, const struct ucred *peer, int *ret_proc_fd) {
        _cleanup_close_ int pidfd = -EBADF, proc_fd = -EBADF;
        socklen_t sl = sizeof(int);
        char path[32];
        uid_t euid;
        int r;

        if (!peer || peer->pid <= 0)
                return -EINVAL;
        /* The socket's own pidfd of the listener (Linux 6.5; from 6.16 also of one already gone);
         * before, a pidfd of the pid, which may have gone to another process before we connected. */
        if (getsockopt(fd, SOL_SOCKET, SO_PEERPIDFD, &pidfd, &sl) < 0) {
                if (errno != ENOPROTOOPT && errno != ENOTSUP)
                        return -ESRCH; /* the listener is gone */
                pidfd = (int) syscall(SYS_pidfd_open, peer->pid, 0);
                if (pidfd < 0)
                        return -ESRCH;
        }
        (void) snprintf(path, sizeof(path), "/proc/%d", (int) peer->pid);
        proc_fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        /* Alive after the open: the directory is the pidfd's process (a pid is not given again
         * while its process lives). */
        if (proc_fd < 0 || syscall(SYS_pidfd_send_signal, pidfd, 0, NULL, 0) < 0)
                return -ESRCH;
        /* And it runs as the socket said: not a set-id program it went on to exec, nor, without
         * the socket's pidfd, another user's process that got the pid. */
        r = proc_euid(proc_fd, &euid);
        if (r < 0 || euid != peer->uid)
                return -ESRCH;
        *ret_proc_fd = TAKE_FD(proc_fd);
        return 0;
}

/* faccessat2(AT_EACCESS) itself: the permission checked with this thread's fsuid, fsgid and
 * groups. Where the kernel has no faccessat2 (before 5.8), glibc's faccessat() would check with
 * the real uid, root's, and grant everything: never taken as a yes. */
static int access_as_fs_identity(const char *path, int mode) {
        if (syscall(SYS_faccessat2, AT_FDCWD, path, mode, AT_EACCESS) >= 0)
                return 0;
        if (errno == ENOSYS)
                return -EOPNOTSUPP;
        return -errno;
}

typedef struct OpenAs {
        const char *path;
        const QmpSocketPin *pin;
        QmpSocketPin seen;
        int dir_fd, sock_fd;
} OpenAs;

/* With the caller's file-system identity (fs-identity.h): the socket opened as qmp_socket_open()
 * opens it (search permission down to its directory, as that user resolves the path), then
 * search permission on the directory itself and write permission on the socket (the magic links
 * of our own fds: /proc lets our own thread group through whoever we are). */
static int open_as(void *userdata) {
        OpenAs *o = userdata;
        char p[PROC_FD_PATH_MAX];
        int r;

        r = qmp_socket_open(o->path, o->pin, &o->seen, &o->dir_fd, &o->sock_fd);
        if (r < 0)
                return r;
        (void) snprintf(p, sizeof(p), "/proc/self/fd/%d", o->dir_fd);
        r = access_as_fs_identity(p, X_OK);
        if (r < 0)
                return r;
        (void) snprintf(p, sizeof(p), "/proc/self/fd/%d", o->sock_fd);
        return access_as_fs_identity(p, W_OK);
}

/* In this thread, as the daemon's own opens are: no process of the caller's (who could stop it)
 * that we wait for. */
int qmp_socket_open_as(const char *path, const QmpSocketPin *pin, uid_t uid, gid_t gid, const gid_t *gids,
        size_t n_gids, QmpSocketPin *ret_seen, int *ret_dir_fd, int *ret_sock_fd) {
        OpenAs o = { .path = path, .pin = pin, .dir_fd = -EBADF, .sock_fd = -EBADF };
        int r;

        r = fs_identity_run(uid, gid, gids, n_gids, open_as, &o);
        if (r < 0) {
                closep(&o.dir_fd);
                closep(&o.sock_fd);
                return r;
        }
        if (ret_seen)
                *ret_seen = o.seen;
        if (ret_dir_fd)
                *ret_dir_fd = o.dir_fd;
        else
                closep(&o.dir_fd);
        *ret_sock_fd = o.sock_fd;
        return 0;
}

const char *qmp_socket_strerror(int error) {
        switch (error) {
        case -ELOOP:
                return "the socket path is a symbolic link, which is never followed (give the socket's own path)";
        case -EXDEV:
                return "the socket's directory is not the directory it had at registration (re-register the guest "
                       "if it moved)";
        case -ENOTSOCK:
                return "the path is not a socket";
        case -EPROTO:
                return "the listener's credentials are unknown";
        default:
                return strerror(-error);
        }
}
