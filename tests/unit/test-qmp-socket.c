/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* qmp-socket.c: a guest's QMP socket is found through its pinned directory, never through a
 * symlink, and the listener's credentials come with the connection. */

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>

#include "qmp-socket.h"
#include "util.h"
#include "tap.h"

static char base[] = "/tmp/test-qmp-socket.XXXXXX";

static int listen_at(const char *path) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

        if (fd < 0)
                return -errno;
        snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
        if (bind(fd, (struct sockaddr *) &sa, sizeof(sa)) < 0 || listen(fd, 4) < 0) {
                close(fd);
                return -errno;
        }
        return fd;
}

static int close_fd(int fd) {
        if (fd >= 0)
                close(fd);
        return -1;
}

static char *at(const char *rel) {
        return strdup_printf("%s/%s", base, rel);
}

static void test_open_and_connect(void) {
        _cleanup_free_ char *dir = at("a"), *sock = at("a/qmp.sock"), *link = at("a/link.sock"),
                                *file = at("a/file");
        _cleanup_close_ int srv = -1, dir_fd = -1, sock_fd = -1, fd = -1, f = -1;
        QmpSocketPin pin = {};
        struct ucred peer = {};

        ASSERT_OK(mkdir(dir, 0755));
        srv = listen_at(sock);
        ASSERT_TRUE(srv >= 0);
        ASSERT_OK(qmp_socket_open(sock, NULL, &pin, &dir_fd, &sock_fd));
        ASSERT_TRUE(pin.set);
        ASSERT_OK(qmp_socket_connect(sock_fd, &fd, &peer));
        ASSERT_EQ(peer.uid, getuid());
        ASSERT_EQ(peer.pid, getpid());
        ASSERT_TRUE(fd >= 0 && (fcntl(fd, F_GETFL) & O_NONBLOCK));

        /* A symlink at the socket's name, to the very same socket: refused. */
        ASSERT_OK(symlink(sock, link));
        ASSERT_ERRNO(qmp_socket_open(link, &pin, NULL, NULL, &sock_fd), -ELOOP);
        f = open(file, O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
        ASSERT_TRUE(f >= 0);
        ASSERT_ERRNO(qmp_socket_open(file, &pin, NULL, NULL, &sock_fd), -ENOTSOCK);
        ASSERT_ERRNO(qmp_socket_open(dir, NULL, NULL, NULL, &sock_fd), -ENOTSOCK);
        ASSERT_ERRNO(qmp_socket_connect(-1, &fd, &peer), -ENOENT);

        /* Through /proc's magic links (one of our own directories by its fd): refused. */
        {
                _cleanup_free_ char *magic = NULL;
                _cleanup_close_ int dfd = open(dir, O_PATH | O_DIRECTORY | O_CLOEXEC);

                ASSERT_TRUE(dfd >= 0);
                magic = strdup_printf("/proc/self/fd/%d/qmp.sock", dfd);
                ASSERT_ERRNO(qmp_socket_open(magic, NULL, NULL, NULL, &sock_fd), -ELOOP);
        }

        /* Not normalized, relative, "/": refused before anything is opened. */
        ASSERT_ERRNO(qmp_socket_open("relative.sock", NULL, NULL, NULL, &sock_fd), -EINVAL);
        ASSERT_ERRNO(qmp_socket_open("/", NULL, NULL, NULL, &sock_fd), -EINVAL);
        ASSERT_ERRNO(qmp_socket_open("/tmp/../x.sock", NULL, NULL, NULL, &sock_fd), -EINVAL);
}

static void test_directory_pinned(void) {
        _cleanup_free_ char *dir = at("b"), *old = at("b.old"), *other = at("c"), *sock = at("b/qmp.sock"),
                                *other_sock = at("c/qmp.sock");
        _cleanup_close_ int s1 = -1, s2 = -1, s3 = -1, sock_fd = -1;
        QmpSocketPin pin = {}, seen = {};

        ASSERT_OK(mkdir(dir, 0755));
        ASSERT_OK(mkdir(other, 0755));
        s1 = listen_at(sock);
        s2 = listen_at(other_sock);
        ASSERT_TRUE(s1 >= 0 && s2 >= 0);
        ASSERT_OK(qmp_socket_open(sock, NULL, &pin, NULL, &sock_fd));
        sock_fd = close_fd(sock_fd);

        /* The socket re-created in the same directory (QEMU restarted): fine. */
        s1 = close_fd(s1);
        ASSERT_OK(unlink(sock));
        s1 = listen_at(sock);
        ASSERT_OK(qmp_socket_open(sock, &pin, &seen, NULL, &sock_fd));
        sock_fd = close_fd(sock_fd);
        ASSERT_TRUE(seen.dir_dev == pin.dir_dev && seen.dir_ino == pin.dir_ino);

        /* The directory replaced by a symlink to another one with a socket of the same name. */
        ASSERT_OK(rename(dir, old));
        ASSERT_OK(symlink(other, dir));
        ASSERT_ERRNO(qmp_socket_open(sock, &pin, NULL, NULL, &sock_fd), -EXDEV);
        ASSERT_OK(unlink(dir));
        /* ... or by a new directory. */
        ASSERT_OK(mkdir(dir, 0755));
        s3 = listen_at(sock);
        ASSERT_ERRNO(qmp_socket_open(sock, &pin, NULL, NULL, &sock_fd), -EXDEV);
        /* After a reboot (another boot id) the pin is taken afresh by the caller. */
        pin.boot_id.bytes[0] ^= 0xff;
        ASSERT_OK(qmp_socket_open(sock, &pin, &seen, NULL, &sock_fd));
        ASSERT_FALSE(seen.dir_ino == pin.dir_ino && seen.dir_dev == pin.dir_dev);
}

/* Opened as another user: only a socket they could connect to themselves, and what fails tells
 * them only what they could see. */
static int open_as(const char *sock, uid_t uid, gid_t gid, const gid_t *gids, size_t n) {
        int dir_fd = -1, sock_fd = -1, r;

        r = qmp_socket_open_as(sock, NULL, uid, gid, gids, n, NULL, &dir_fd, &sock_fd);
        if (r >= 0) {
                close(dir_fd);
                close(sock_fd);
        }
        return r;
}

static void test_caller_access(void) {
        _cleanup_free_ char *dir = at("d"), *sock = at("d/qmp.sock"), *missing = at("d/missing.sock"),
                                *hidden = at("h"), *hidden_sock = at("h/x/qmp.sock"), *hidden_missing = at("h/x/none.sock"),
                                *hidden_dir = at("h/x");
        _cleanup_close_ int srv = -1, srv2 = -1;
        const uid_t nobody = 65534;
        const gid_t group = 65534;

        if (geteuid() != 0) {
                printf("# not root: the access check needs to take another uid, skipped\n");
                return;
        }
        ASSERT_OK(chmod(base, 0755));
        ASSERT_OK(mkdir(dir, 0700));
        srv = listen_at(sock);
        ASSERT_TRUE(srv >= 0);
        ASSERT_OK(chmod(sock, 0600));
        ASSERT_OK(open_as(sock, 0, 0, NULL, 0));
        ASSERT_ERRNO(open_as(sock, nobody, group, NULL, 0), -EACCES);
        ASSERT_OK(chmod(dir, 0755));
        ASSERT_ERRNO(open_as(sock, nobody, group, NULL, 0), -EACCES);
        ASSERT_OK(chmod(sock, 0666));
        ASSERT_OK(open_as(sock, nobody, group, NULL, 0));
        ASSERT_ERRNO(open_as(missing, nobody, group, NULL, 0), -ENOENT);
        /* Through a group: the socket writable by group 4242 only, which nobody gets as a
         * supplementary group. */
        ASSERT_OK(chown(sock, 0, 4242));
        ASSERT_OK(chmod(sock, 0660));
        ASSERT_ERRNO(open_as(sock, nobody, group, NULL, 0), -EACCES);
        ASSERT_OK(open_as(sock, nobody, group, (const gid_t[]) { 4242 }, 1));
        /* Search permission on a parent directory counts too. */
        ASSERT_OK(chmod(base, 0700));
        ASSERT_ERRNO(open_as(sock, nobody, group, (const gid_t[]) { 4242 }, 1), -EACCES);
        ASSERT_OK(chmod(base, 0755));
        /* Below a directory they may not search, a socket and a name that does not exist answer
         * alike: what is there is not told. */
        ASSERT_OK(mkdir(hidden, 0700));
        ASSERT_OK(mkdir(hidden_dir, 0755));
        srv2 = listen_at(hidden_sock);
        ASSERT_TRUE(srv2 >= 0);
        ASSERT_OK(chmod(hidden_sock, 0666));
        ASSERT_ERRNO(open_as(hidden_sock, nobody, group, NULL, 0), -EACCES);
        ASSERT_ERRNO(open_as(hidden_missing, nobody, group, NULL, 0), -EACCES);
}

/* The listener a connection reached, as a /proc/PID directory: this process while it listens; none
 * once the process that called listen() is gone, even with its pid given to another process. */
static pid_t fork_listen(int srv) {
        pid_t pid = fork();

        if (pid == 0)
                _exit(listen(srv, 4) < 0 ? 1 : 0);
        return pid;
}

static void test_peer_proc(void) {
        _cleanup_free_ char *dir = at("e"), *sock = at("e/qmp.sock"), *sock2 = at("e/gone.sock");
        _cleanup_close_ int srv = -1, sock_fd = -1, fd = -1, proc_fd = -1, self_fd = -1;
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        struct ucred peer = {};
        struct stat a, b;
        int status = 0;
        pid_t listener, newcomer;

        ASSERT_OK(mkdir(dir, 0755));
        srv = listen_at(sock);
        ASSERT_TRUE(srv >= 0);
        ASSERT_OK(qmp_socket_open(sock, NULL, NULL, NULL, &sock_fd));
        ASSERT_OK(qmp_socket_connect(sock_fd, &fd, &peer));
        ASSERT_OK(qmp_socket_peer_proc(fd, &peer, &proc_fd));
        self_fd = open("/proc/self", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        ASSERT_TRUE(self_fd >= 0 && fstat(proc_fd, &a) == 0 && fstat(self_fd, &b) == 0);
        ASSERT_TRUE(a.st_dev == b.st_dev && a.st_ino == b.st_ino);
        fd = close_fd(fd), sock_fd = close_fd(sock_fd), srv = close_fd(srv), proc_fd = close_fd(proc_fd);

        /* Bound here, listen() called in a child that is gone before anyone connects: the socket's
         * credentials name a dead process. */
        srv = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", sock2);
        ASSERT_TRUE(srv >= 0 && bind(srv, (struct sockaddr *) &sa, sizeof(sa)) == 0);
        listener = fork_listen(srv);
        ASSERT_TRUE(listener > 0 && waitpid(listener, &status, 0) == listener && status == 0);
        ASSERT_OK(qmp_socket_open(sock2, NULL, NULL, NULL, &sock_fd));
        ASSERT_OK(qmp_socket_connect(sock_fd, &fd, &peer));
        ASSERT_EQ(peer.pid, listener);
        ASSERT_ERRNO(qmp_socket_peer_proc(fd, &peer, &proc_fd), -ESRCH);
        fd = close_fd(fd);

        /* Its pid given to a new process (root: the kernel's next pid set by hand), of another uid
         * (before Linux 6.5, without the socket's own pidfd, one of the listener's uid would pass:
         * SECURITY.md): not the listener. */
        if (geteuid() == 0) {
                FILE *f = fopen("/proc/sys/kernel/ns_last_pid", "we");
                int hold[2], ready[2];
                char c;

                ASSERT_TRUE(f != NULL && pipe2(hold, O_CLOEXEC) == 0 && pipe2(ready, O_CLOEXEC) == 0);
                if (f) {
                        fprintf(f, "%d", (int) listener - 1);
                        fclose(f);
                }
                newcomer = fork();
                if (newcomer == 0) {
                        close(hold[1]);
                        close(ready[0]);
                        if (setresgid(65534, 65534, 65534) < 0 || setresuid(65534, 65534, 65534) < 0)
                                _exit(1);
                        (void) write(ready[1], "x", 1);
                        (void) read(hold[0], &c, 1); /* until the test is done with its pid */
                        _exit(0);
                }
                close(hold[0]);
                close(ready[1]);
                ASSERT_EQ(read(ready[0], &c, 1), 1);
                if (newcomer != listener)
                        printf("# pid %d went to another process first; the reuse is not tried\n", (int) listener);
                else {
                        ASSERT_OK(qmp_socket_connect(sock_fd, &fd, &peer));
                        ASSERT_EQ(peer.pid, listener);
                        ASSERT_ERRNO(qmp_socket_peer_proc(fd, &peer, &proc_fd), -ESRCH);
                        fd = close_fd(fd);
                }
                close(hold[1]);
                close(ready[0]);
                (void) waitpid(newcomer, NULL, 0);
        }
}

int main(int argc, char **argv) {
        _cleanup_free_ char *cmd = NULL;

        tap_init(argc, argv);
        log_set_max_level(getenv("BSD_UNIT_DEBUG") ? LOG_LEVEL_DEBUG : -1);
        if (!mkdtemp(base)) {
                perror("mkdtemp");
                return 1;
        }
        TAP_RUN(test_open_and_connect);
        TAP_RUN(test_directory_pinned);
        TAP_RUN(test_caller_access);
        TAP_RUN(test_peer_proc);
        cmd = strdup_printf("rm -rf '%s'", base);
        if (cmd)
                (void) system(cmd);
        return tap_finish();
}
