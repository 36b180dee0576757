/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* Spawning a helper inside its guest's sandbox. One function applies every layer in the child,
 * in a fixed order, and any failure kills the spawn: a helper never runs half-confined.
 *
 *  1. signals reset, new session, the passed fds moved to 3, 4, …, every other fd closed
 *  2. private mount, IPC and (unless it serves TCP itself) network namespaces; a PID namespace
 *     of its own if asked (own_pids)
 *  3. a new root on tmpfs: /usr (and the /lib*, /bin, /sbin links) read-only with every mount
 *     below them, /etc/ld.so.cache (with host_network also the name service files and
 *     /etc/ssl/certs),
 *     a minimal /dev, /proc showing only its own processes, an empty /tmp and its guest's
 *     runtime dir; nothing else (no images: they arrive as fds, no /home, no /root)
 *  4. rlimits: no core dumps, bounded open files, processes, address space and file size
 *  5. capabilities: bounding and ambient sets emptied; then the guest's own uid/gid with
 *     supplementary groups cleared (which empties the effective and permitted sets)
 *  6. no_new_privs; PR_SET_PDEATHSIG(SIGKILL) after the uid change (which clears it), then
 *     the parent's life re-checked
 *  7. SELinux exec label, only where SELinux is enabled
 *  8. a seccomp deny-list (KILL_PROCESS): mount, modules, reboot, swap, raw I/O, clock, ptrace
 *     and process_vm_*, kexec, bpf, keyrings, namespace changes, set*id, obsolete calls (and
 *     listen/accept for a client_only helper); sockets of families but unix, IP (and netlink
 *     with host_network) fail with EAFNOSUPPORT; bind fails with EACCES
 *     with host_network;
 *     io_uring fails with ENOSYS instead (QEMU probes it and falls back to epoll).
 *     Our own helpers install an allow-list on top once they have set up.
 *  9. execve with a minimal environment. */

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

/* What a helper's uid/gid and MCS categories are drawn from. */
#define SANDBOX_MCS_CATEGORIES 1024

/* RLIMIT_AS of our own helpers: under the integration tests blockstream-nbd-relay peaks at 3.1 MiB
 * of address space (VmPeak) and blockstream-pull (libnbd) at 62 MiB; four times that. */
#define SANDBOX_ADDRESS_SPACE_DEFAULT (UINT64_C(256) << 20)
/* RLIMIT_AS of QEMU's binaries (the storage helper, qemu-img): 1.5-2.3 GiB of VmPeak under the
 * integration tests, most of it TCG's reserved code buffer, and every thread of its block layer's
 * pool (up to 64) reserves an 8 MiB stack and a 64 MiB malloc arena: 2.3 GiB + 64 * 72 MiB = 7 GiB
 * at worst. A failed thread creation aborts QEMU, so the limit sits above that; it stops a runaway,
 * the unit's MemoryMax= bounds what is really used. */
#define SANDBOX_ADDRESS_SPACE_QEMU (UINT64_C(8) << 30)
/* The environment of QEMU helpers run with "-machine none" (the storage helper, the template
 * cache). QEMU's block jobs copy through bounce buffers of 512 KiB and more, freed after each
 * chunk. glibc serves them with mmap() and munmap() until a large free raises its thresholds,
 * which a guest's QEMU does while building its machine and "-machine none" never does: each chunk
 * then faults in fresh pages (with TLB shootdowns across QEMU's threads at munmap), and
 * block-stream ran 4-5x slower in the storage helper than in a guest's QEMU on the same chain.
 * Fixed thresholds keep the buffers in the heap. */
#define SANDBOX_QEMU_MALLOC_TUNABLES \
        "GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=67108864"
#define SANDBOX_LIMIT_NONE UINT64_MAX /* for max_address_space or max_file_size: no limit */

typedef struct SandboxSpec {
        const char *name; /* for messages */
        uid_t uid;
        gid_t gid;
        const char *runtime_dir; /* its guest's runtime dir, bound read-write at the same path; NULL: none */
        bool host_network;       /* keep the host's network namespace (the helper serves TCP itself) */
        bool own_pids;           /* PID 1 of a PID namespace of its own: it sees and signals no other
                                  * process, and what it leaves behind dies with it (for helpers that
                                  * share a uid: ProvisionDisk's probes; a guest's pull, map and relay
                                  * helpers, one of which, taken over, could otherwise signal or write
                                  * (/proc/PID/mem) the others, stop the next before its exec, or
                                  * leave a process holding its sockets). As PID 1 it ignores every
                                  * signal it has no handler for but SIGKILL and SIGSTOP (SIGTERM,
                                  * SIGPIPE, SIGXFSZ: a write then fails instead): stop it with
                                  * SIGKILL */
        bool client_only;        /* listen() and accept() kill it: with host_network, it may connect
                                  * but never take a port of the host (the probes) */
        const char *selinux_label; /* exec label; ignored unless SELinux is enabled */
        const int *fds;            /* become fds 3, 4, … in the helper */
        size_t n_fds;
        int stdout_fd;             /* > 2: the helper's stdout; otherwise /dev/null */
        int stderr_fd;             /* > 2: the helper's stderr, e.g. a log pipe; otherwise /dev/null */
        char *const *argv;         /* argv[0]: absolute path (as seen inside, if exec_fd is -1) */
        int exec_fd;               /* > 2: run this opened binary (execveat), so it needs no path inside */
        char *const *env;          /* added to PATH and LANG; may be NULL */
        unsigned max_files;        /* RLIMIT_NOFILE, 0: 1024 */
        unsigned max_processes;    /* RLIMIT_NPROC: processes and threads of its uid, all helpers of the
                                    * guest together (a storage helper's QEMU has many threads); 0: 512 */
        uint64_t max_address_space; /* RLIMIT_AS in bytes; 0: SANDBOX_ADDRESS_SPACE_DEFAULT */
        uint64_t max_file_size;     /* RLIMIT_FSIZE in bytes: how far it may write into any regular file,
                                     * fds it was given included; 0: no file at all (pipes and sockets are
                                     * not files; a write past the limit kills with SIGXFSZ) */
} SandboxSpec;

/* The daemon's own (and so every child's): chmod(), mkdir(), mknod() and open(O_CREAT) with a set-id
 * bit fail with EPERM. What the unit's RestrictSUIDSGID=yes would do, but for openat2(), which
 * systemd's filter makes fail whatever it asks (it cannot see the mode), and which is how every
 * image is opened. Before any thread starts: a filter is per thread. */
int sandbox_forbid_setid(void);

/* Fork, confine, exec. Returns once the helper exec'd (or failed to: then -errno, with what
 * failed logged, and nothing left running). */
int sandbox_spawn(const SandboxSpec *spec, pid_t *ret_pid);

/* The SELinux labels of a guest's sandbox for MCS categories c1 < c2: the process label and
 * the label of its writable images. NULL/0 where SELinux is off; no SELinux call is made then. */
int sandbox_selinux_labels(const char *process_type, const char *image_type, unsigned c1, unsigned c2,
        char **ret_process, char **ret_image);
/* A label of the given type and MLS level (e.g. "s0:c1,c2") with the user and role of `context`
 * (the daemon's own, "user:role:type:level"). Pure: no SELinux call. -EINVAL for anything that
 * is not a plain label part. */
int sandbox_selinux_label_from_context(const char *context, const char *type, const char *level, char **ret);

/* Tests only: treat SELinux as enabled, with `own_context` as the daemon's context, and have the
 * child call apply(label) (after its fds are in place) where it would call setexeccon(); no
 * SELinux call is made. NULL: back to the real thing. */
typedef int (*SandboxExecLabelApply)(const char *label);
void sandbox_selinux_test_override(const char *own_context, SandboxExecLabelApply apply);

/* A process label of the given type at plain s0 (for helpers that touch no image, like the
 * NBD relay: a unix client with a range must be able to talk to it). NULL where SELinux is off. */
int sandbox_selinux_plain_label(const char *process_type, char **ret);

/* Label a file descriptor's file (a writable image); a no-op where SELinux is off. */
int sandbox_selinux_label_fd(int fd, const char *label);
bool sandbox_selinux_enabled(void);
