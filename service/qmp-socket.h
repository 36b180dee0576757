/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* A running guest's QMP socket: found without trusting its path twice, and who listens on it.
 *
 * The socket's directory is resolved once, at registration, and pinned by identity (dev/ino,
 * within one boot: a directory on /run is new after a reboot). Every (re)connect opens the
 * directory again and refuses another one, opens the leaf with O_PATH|O_NOFOLLOW (a symlink is
 * refused, whenever it was planted) and connects through /proc/self/fd/<that fd>, so nothing
 * is resolved by path between the check and the connect. The leaf's own identity is not
 * pinned: QEMU re-creates its socket on every start. Who listens is then checked with
 * SO_PEERCRED by the caller (guest.c decides which uids may serve a guest). */

#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <systemd/sd-id128.h>

/* One QEMU process of this boot: its pid and its start time (clock ticks since boot, /proc/PID/stat);
 * {0}: not known. A pid given to another process later comes with another start time. */
typedef struct QemuInstance {
        pid_t pid;
        uint64_t start;
} QemuInstance;

/* The instance of the process behind proc_fd (a /proc/PID directory of pid). */
int qmp_socket_instance(int proc_fd, pid_t pid, QemuInstance *ret);

static inline bool qemu_instance_known(const QemuInstance *i) {
        return i->pid > 0 && i->start > 0;
}
/* Known to be one process: both known, and alike. */
static inline bool qemu_instance_same(const QemuInstance *a, const QemuInstance *b) {
        return qemu_instance_known(a) && qemu_instance_known(b) && a->pid == b->pid && a->start == b->start;
}

typedef struct QmpSocketPin {
        bool set;
        uint64_t dir_dev, dir_ino;
        sd_id128_t boot_id;
} QmpSocketPin;

/* Open path's directory and its leaf (O_PATH). With pin->set (and the same boot) the directory
 * must be the pinned one (-EXDEV otherwise). The leaf must be a socket: -ELOOP for a symlink,
 * -ENOTSOCK for anything else. *ret_seen gets the directory's identity, for the caller to pin
 * once it trusts what it found. ret_dir_fd may be NULL. */
int qmp_socket_open(const char *path, const QmpSocketPin *pin, QmpSocketPin *ret_seen, int *ret_dir_fd,
        int *ret_sock_fd);

/* Connect (non-blocking socket) to the socket inode behind sock_fd, an O_PATH fd from
 * qmp_socket_open(); *ret_peer: the listener's credentials. A full backlog is -EAGAIN. */
int qmp_socket_connect(int sock_fd, int *ret_fd, struct ucred *ret_peer);

/* The listener behind fd (connected by qmp_socket_connect(), peer: what it said) as a /proc/PID
 * directory, checked to be that very process: from Linux 6.5 through the socket's own pidfd of it
 * (SO_PEERPIDFD), before through a pidfd of the pid; the directory is taken only while that
 * pidfd's process lives (so every later look through it is at that process or fails, never at a
 * newcomer with the same pid), and the process must run as the peer's uid. -ESRCH if it cannot be
 * vouched for (gone, or another process than the listener). */
int qmp_socket_peer_proc(int fd, const struct ucred *peer, int *ret_proc_fd);

/* qmp_socket_open() done as uid/gid/gids (this thread's file-system identity, fs-identity.h),
 * and then whether they could connect to the socket themselves: search permission on its
 * directory and write permission on it (-EACCES if not). What fails tells only what that user
 * could see: -EACCES, -ENOENT, -ELOOP, -ENOTSOCK as qmp_socket_open(). */
int qmp_socket_open_as(const char *path, const QmpSocketPin *pin, uid_t uid, gid_t gid, const gid_t *gids,
        size_t n_gids, QmpSocketPin *ret_seen, int *ret_dir_fd, int *ret_sock_fd);

/* What a refusal of qmp_socket_open() or _connect() means, for logs and D-Bus errors. */
const char *qmp_socket_strerror(int error);
