/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <linux/capability.h>
#include <poll.h>
#include <sched.h>
#include <seccomp.h>
#include <selinux/selinux.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>

#include "sandbox.h"
#include "util.h"

/* How long sandbox_spawn() waits for the child's exec: it takes milliseconds. */
#define SANDBOX_SPAWN_TIMEOUT_USEC (10 * USEC_PER_SEC)

/* The child reports a failed step to the parent through a CLOEXEC pipe: exec closes it
 * (success), anything written is the step and errno. */
typedef struct SpawnFailure {
        int step;
        int error;
} SpawnFailure;

enum {
        STEP_SIGNALS,
        STEP_FDS,
        STEP_NAMESPACES,
        STEP_MOUNTS,
        STEP_RLIMITS,
        STEP_CAPABILITIES,
        STEP_IDS,
        STEP_NNP,
        STEP_PDEATHSIG,
        STEP_SELINUX,
        STEP_SECCOMP,
        STEP_EXEC,
        _STEP_MAX,
};

static const char *const step_names[_STEP_MAX] = {
        [STEP_SIGNALS] = "resetting signals",
        [STEP_FDS] = "arranging file descriptors",
        [STEP_NAMESPACES] = "creating namespaces",
        [STEP_MOUNTS] = "building the file system view",
        [STEP_RLIMITS] = "setting resource limits",
        [STEP_CAPABILITIES] = "dropping capabilities",
        [STEP_IDS] = "changing to the helper's uid/gid",
        [STEP_NNP] = "setting no_new_privs",
        [STEP_PDEATHSIG] = "setting the parent-death signal",
        [STEP_SELINUX] = "setting the SELinux exec label",
        [STEP_SECCOMP] = "installing the seccomp filter",
        [STEP_EXEC] = "executing the helper",
};

/* Tests only (sandbox_selinux_test_override()): SELinux as if enabled, with this as our context. */
static char *test_context;
static SandboxExecLabelApply test_apply;

bool sandbox_selinux_enabled(void) {
        return test_context || is_selinux_enabled() > 0;
}

void sandbox_selinux_test_override(const char *own_context, SandboxExecLabelApply apply) {
        test_context = mfree(test_context);
        test_apply = NULL;
        if (!own_context)
                return;
        test_context = strdup(own_context);
        test_apply = test_context ? apply : NULL;
}

/* The one place a helper's exec label is applied. */
static int apply_exec_label(const char *label) {
        if (test_context)
                return test_apply ? test_apply(label) : -EOPNOTSUPP;
        if (setexeccon_raw(label) < 0)
                return -errno;
        return 0;
}

/* Child side. Only async-signal-safe-ish work is not required here (we are single-threaded),
 * but nothing may return into the parent's code: every path ends in execve or _exit. */

static _Noreturn void child_fail(int errfd, int step, int error) {
        SpawnFailure f = { .step = step, .error = error > 0 ? error : EIO };

        (void) !write(errfd, &f, sizeof(f));
        _exit(127);
}

/* A bind mount with its flags on every mount below it as well: a remount with MS_BIND only changes
 * the top one, and a submount of /usr (or of the runtime dir) would stay writable, suid, with
 * devices. mount_setattr(AT_RECURSIVE) sets them on the whole tree at once (Linux 5.12). */
static int bind_mount(const char *src, const char *dst, unsigned long extra) {
        struct mount_attr attr = { .attr_set = MOUNT_ATTR_NOSUID };

        if (mount(src, dst, NULL, MS_BIND | MS_REC, NULL) < 0)
                return -errno;
        if (extra & MS_RDONLY)
                attr.attr_set |= MOUNT_ATTR_RDONLY;
        if (extra & MS_NODEV)
                attr.attr_set |= MOUNT_ATTR_NODEV;
        if (extra & MS_NOEXEC)
                attr.attr_set |= MOUNT_ATTR_NOEXEC;
        if (syscall(SYS_mount_setattr, AT_FDCWD, dst, AT_RECURSIVE, &attr, sizeof(attr)) < 0)
                return -errno;
        return 0;
}

static int touch(const char *path) {
        int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC | O_NOCTTY, 0644);
        if (fd < 0)
                return -errno;
        close(fd);
        return 0;
}

static int mkdir_under(const char *root, const char *path, mode_t mode, char *buf, size_t size) {
        int n = snprintf(buf, size, "%s%s", root, path);
        if (n < 0 || (size_t) n >= size)
                return -ENAMETOOLONG;
        return mkdir_p(buf, mode);
}

/* The host's file or directory src (absolute), read-only at the same path under root, if the host
 * has it. */
static int bind_host_path(const char *root, const char *src, char *buf, size_t size) {
        struct stat st;
        int n, r;

        if (stat(src, &st) < 0 || !(S_ISREG(st.st_mode) || S_ISDIR(st.st_mode)))
                return 0;
        n = snprintf(buf, size, "%s%s", root, src);
        if (n < 0 || (size_t) n >= size)
                return -ENAMETOOLONG;
        if (S_ISDIR(st.st_mode))
                r = mkdir_p(buf, 0755);
        else {
                char *slash = strrchr(buf, '/'); /* src is absolute: there is one */

                *slash = 0;
                r = mkdir_p(buf, 0755);
                *slash = '/';
                if (r >= 0)
                        r = touch(buf);
        }
        return r < 0 ? r : bind_mount(src, buf, MS_RDONLY | MS_NODEV);
}

static int setup_mounts(const SandboxSpec *s) {
        static const char *const links[] = { "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32" };
        static const char *const devices[] = { "/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom" };
        static const char *const net_files[] = { "/etc/resolv.conf", "/etc/hosts", "/etc/nsswitch.conf",
                "/etc/host.conf", "/etc/gai.conf", "/etc/ssl/certs" };
        const char *root = "/tmp"; /* any directory will do: the tmpfs lives in our namespace only */
        char path[PATH_MAX], target[PATH_MAX], source[64];
        _cleanup_close_ int runtime_fd = -1;
        struct stat st;
        int r;

        /* The view's directories get exactly the modes given here, whatever the daemon's umask. */
        umask(0);

        /* Held open before the tmpfs goes on: the runtime dir may itself lie below root. */
        if (s->runtime_dir) {
                runtime_fd = open(s->runtime_dir, O_PATH | O_DIRECTORY | O_CLOEXEC | O_NOFOLLOW);
                if (runtime_fd < 0)
                        return -errno;
        }
        if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
                return -errno;
        if (mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=4m") < 0)
                return -errno;

        /* /usr read-only; the top-level links or directories of a merged or split /usr. */
        if ((r = mkdir_under(root, "/usr", 0755, path, sizeof(path))) < 0 || (r = bind_mount("/usr", path, MS_RDONLY | MS_NODEV)) < 0)
                return r;
        for (size_t i = 0; i < ELEMENTSOF(links); i++) {
                ssize_t n;

                if (lstat(links[i], &st) < 0)
                        continue;
                snprintf(path, sizeof(path), "%s%s", root, links[i]);
                if (S_ISLNK(st.st_mode)) {
                        n = readlink(links[i], target, sizeof(target) - 1);
                        if (n < 0)
                                return -errno;
                        target[n] = 0;
                        if (symlink(target, path) < 0)
                                return -errno;
                } else if (S_ISDIR(st.st_mode)) {
                        if ((r = mkdir_p(path, 0755)) < 0 || (r = bind_mount(links[i], path, MS_RDONLY | MS_NODEV)) < 0)
                                return r;
                }
        }

        /* The dynamic linker's cache: the only file of /etc a helper needs. */
        if ((r = mkdir_under(root, "/etc", 0755, path, sizeof(path))) < 0 ||
                (r = bind_host_path(root, "/etc/ld.so.cache", path, sizeof(path))) < 0)
                return r;

        /* A helper in the host's network (a URL probe, a template cache) resolves names as the host
         * does and checks TLS servers against the host's authorities: those files of /etc,
         * read-only, where the host has them. */
        for (size_t i = 0; s->host_network && i < ELEMENTSOF(net_files); i++)
                if ((r = bind_host_path(root, net_files[i], path, sizeof(path))) < 0)
                        return r;

        /* A /dev with the harmless character devices only. */
        if ((r = mkdir_under(root, "/dev", 0755, path, sizeof(path))) < 0)
                return r;
        if (mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=64k") < 0)
                return -errno;
        for (size_t i = 0; i < ELEMENTSOF(devices); i++) {
                snprintf(path, sizeof(path), "%s%s", root, devices[i]);
                if ((r = touch(path)) < 0 || (r = bind_mount(devices[i], path, MS_NOEXEC)) < 0)
                        return r;
        }

        /* /proc showing its own processes only (other uids' are invisible, no /proc/sys). */
        if ((r = mkdir_under(root, "/proc", 0555, path, sizeof(path))) < 0)
                return r;
        if (mount("proc", path, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=invisible,subset=pid") < 0)
                return -errno;

        /* An empty, private /tmp, of 16 MiB and 1024 files at most: a file's inode is kernel memory
         * charged to the service's cgroup and to no process, so a helper taken over that made
         * millions of empty ones would not be the one the kernel kills for it (review 34b). */
        if ((r = mkdir_under(root, "/tmp", 01777, path, sizeof(path))) < 0)
                return r;
        if (mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=1777,size=16m,nr_inodes=1024") < 0)
                return -errno;

        if (s->runtime_dir) {
                snprintf(source, sizeof(source), "/proc/self/fd/%i", runtime_fd);
                if ((r = mkdir_under(root, s->runtime_dir, 0755, path, sizeof(path))) < 0 ||
                        (r = bind_mount(source, path, MS_NODEV | MS_NOEXEC)) < 0)
                        return r;
        }

        /* Move in, and let go of the old root entirely. */
        snprintf(path, sizeof(path), "%s/.oldroot", root);
        if (mkdir(path, 0700) < 0)
                return -errno;
        if (syscall(SYS_pivot_root, root, path) < 0)
                return -errno;
        if (chdir("/") < 0)
                return -errno;
        if (umount2("/.oldroot", MNT_DETACH) < 0)
                return -errno;
        if (rmdir("/.oldroot") < 0)
                return -errno;
        if (mount(NULL, "/", NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
                return -errno;
        return 0;
}

static int set_rlimits(const SandboxSpec *s) {
#ifdef BLOCKSTREAM_SANITIZER_BUILD
        /* ASan reserves terabytes of shadow memory: a sanitizer build (meson -Dsanitize=true,
         * never shipped) runs sanitized helpers without an address-space limit. */
        rlim_t as = RLIM_INFINITY;
#else
        rlim_t as = s->max_address_space == SANDBOX_LIMIT_NONE
                            ? RLIM_INFINITY
                            : (s->max_address_space ?: SANDBOX_ADDRESS_SPACE_DEFAULT);
#endif
        rlim_t fsize = s->max_file_size == SANDBOX_LIMIT_NONE ? RLIM_INFINITY : s->max_file_size;
        const struct {
                int resource;
                rlim_t value;
        } limits[] = {
                { RLIMIT_CORE, 0 },
                { RLIMIT_NOFILE, s->max_files ?: 1024 },
                { RLIMIT_NPROC, s->max_processes ?: 512 },
                { RLIMIT_AS, as },
                { RLIMIT_FSIZE, fsize },
        };

        /* Soft = hard: a helper cannot raise any of them again. */
        for (size_t i = 0; i < ELEMENTSOF(limits); i++)
                if (setrlimit(limits[i].resource, &(struct rlimit) { limits[i].value, limits[i].value }) < 0)
                        return -errno;
        return 0;
}

static int drop_capabilities(void) {
        struct __user_cap_header_struct h = { .version = _LINUX_CAPABILITY_VERSION_3 };
        struct __user_cap_data_struct d[2] = {};

        for (unsigned long cap = 0; cap <= 63; cap++)
                if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && errno != EINVAL)
                        return -errno;
        if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 && errno != EINVAL)
                return -errno;
        if (prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0) < 0)
                return -errno;
        /* The inheritable set too: with the bounding set empty nothing can be regained. */
        if (syscall(SYS_capget, &h, d) < 0)
                return -errno;
        d[0].inheritable = d[1].inheritable = 0;
        if (syscall(SYS_capset, &h, d) < 0)
                return -errno;
        return 0;
}

static int change_ids(uid_t uid, gid_t gid) {
        struct __user_cap_header_struct h = { .version = _LINUX_CAPABILITY_VERSION_3 };
        struct __user_cap_data_struct d[2] = {};
        uid_t ru, eu, su;
        gid_t rg, eg, sg;

        if (uid == 0 || gid == 0)
                return -EPERM; /* a helper never runs as root */
        if (setgroups(0, NULL) < 0)
                return -errno;
        if (setresgid(gid, gid, gid) < 0)
                return -errno;
        if (setresuid(uid, uid, uid) < 0)
                return -errno;
        /* Trust, but verify: every id changed, no supplementary group, no capability left. */
        if (getresuid(&ru, &eu, &su) < 0 || getresgid(&rg, &eg, &sg) < 0)
                return -errno;
        if (ru != uid || eu != uid || su != uid || rg != gid || eg != gid || sg != gid || getgroups(0, NULL) != 0)
                return -EPERM;
        if (syscall(SYS_capget, &h, d) < 0)
                return -errno;
        if (d[0].effective || d[1].effective || d[0].permitted || d[1].permitted || d[0].inheritable || d[1].inheritable)
                return -EPERM;
        return 0;
}

static int install_denylist(const SandboxSpec *s) {
        /* Kill on anything a storage or NBD helper never needs and an attacker would love. */
        static const char *const deny[] = {
                /* mounts and namespaces */
                "mount", "umount", "umount2", "pivot_root", "chroot", "setns", "unshare", "move_mount", "open_tree",
                "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
                /* modules, reboot, swap, kexec */
                "init_module", "finit_module", "delete_module", "reboot", "swapon", "swapoff", "kexec_load",
                "kexec_file_load",
                /* raw I/O */
                "iopl", "ioperm", "pciconfig_read", "pciconfig_write", "pciconfig_iobase",
                /* clock */
                "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "stime",
                /* debugging other processes */
                "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd", "perf_event_open",
                /* kernel attack surface */
                "bpf", "keyctl", "add_key", "request_key", "userfaultfd", "lookup_dcookie", "open_by_handle_at",
                "name_to_handle_at", "acct", "quotactl", "syslog", "vhangup", "mknod", "mknodat",
                /* identity */
                "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setgroups", "setfsuid",
                "setfsgid",
                /* obsolete */
                "uselib", "ustat", "sysfs", "_sysctl", "create_module", "get_kernel_syms", "query_module", "nfsservctl",
                "vm86", "vm86old", "afs_syscall", "break", "ftime", "getpmsg", "putpmsg", "gtty", "stty", "lock", "mpx",
                "prof", "profil", "security", "tuxcall", "vserver", "idle",
        };
        /* Denied as missing, not killed. io_uring: a large kernel attack surface, whose operations
         * seccomp cannot see (QEMU's event loop probes io_uring_setup and falls back to epoll).
         * Then memory no process's RSS shows, charged to the service's cgroup: the kernel would
         * kill another process for it (review 34b); no helper uses them. */
        static const char *const missing[] = { "io_uring_setup", "io_uring_enter", "io_uring_register", "shmget",
                "msgget", "semget", "mq_open", "memfd_create", "memfd_secret" };
        static const char *const listen_calls[] = { "listen", "accept", "accept4" };
        const uint64_t ns_flags = CLONE_NEWNS | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWUTS |
                                  CLONE_NEWIPC | CLONE_NEWCGROUP;
        scmp_filter_ctx ctx;
        int r;

        ctx = seccomp_init(SCMP_ACT_ALLOW);
        if (!ctx)
                return -ENOMEM;
        for (size_t i = 0; i < ELEMENTSOF(deny); i++) {
                int nr = seccomp_syscall_resolve_name(deny[i]);
                if (nr == __NR_SCMP_ERROR)
                        continue; /* not on this architecture */
#ifdef BLOCKSTREAM_SANITIZER_BUILD
                /* LeakSanitizer's check stops the helper's threads with PTRACE_ATTACH from a
                 * tracer it clone()s (StopTheWorld); killed, the tracer leaves the helper
                 * spinning forever in the check, before it ever says "ready". A sanitizer build
                 * (never shipped) only lets the other requests through to the kernel's own
                 * rules (same uid, no capability): a helper still cannot ask to be traced. */
                if (streq(deny[i], "ptrace")) {
                        r = seccomp_rule_add(ctx, SCMP_ACT_KILL_PROCESS, nr, 1, SCMP_A0(SCMP_CMP_EQ, PTRACE_TRACEME));
                        if (r < 0)
                                goto finish;
                        continue;
                }
#endif
                r = seccomp_rule_add(ctx, SCMP_ACT_KILL_PROCESS, nr, 0);
                if (r < 0 && r != -EDOM)
                        goto finish;
        }
        /* Threads are fine, new namespaces are not. clone3 hides its flags in memory: make the
         * C library fall back to clone. */
        /* Any namespace bit: one rule per flag. */
        for (uint64_t bit = 1; bit; bit <<= 1) {
                if (!(ns_flags & bit))
                        continue;
                r = seccomp_rule_add(ctx, SCMP_ACT_KILL_PROCESS, SCMP_SYS(clone), 1, SCMP_A0(SCMP_CMP_MASKED_EQ, bit, bit));
                if (r < 0 && r != -EEXIST)
                        goto finish;
        }
        r = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(ENOSYS), SCMP_SYS(clone3), 0);
        if (r < 0)
                goto finish;
        for (size_t i = 0; i < ELEMENTSOF(missing); i++) {
                int nr = seccomp_syscall_resolve_name(missing[i]);
                if (nr == __NR_SCMP_ERROR)
                        continue;
                r = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(ENOSYS), nr, 0);
                if (r < 0 && r != -EDOM)
                        goto finish;
        }
        /* Sockets of the families a helper uses only: unix and IP (in its own empty network
         * namespace unless it is in the host's). The rest fail as unsupported: vsock, which no
         * network namespace confines (the host's and every guest's vsock services), netlink (the
         * host's links, addresses and routes, for a helper in the host's network; the C library's
         * name lookup does without it, as it did under the unit's RestrictAddressFamilies= before
         * the daemon needed sock_diag), and the kernel's packet, crypto, bluetooth, ... code,
         * which no helper needs. */
        for (uint64_t family = 0; family < 64; family++) {
                if (family == AF_UNIX || family == AF_INET || family == AF_INET6)
                        continue;
                r = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EAFNOSUPPORT), SCMP_SYS(socket), 1,
                        SCMP_A0(SCMP_CMP_EQ, family));
                if (r < 0)
                        goto finish;
        }
        r = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EAFNOSUPPORT), SCMP_SYS(socket), 1, SCMP_A0(SCMP_CMP_GE, 64));
        if (r < 0)
                goto finish;
        /* In the host's network nothing binds: a template cache's QEMU is handed its listening
         * socket (and must listen and accept on it), and no probe or QEMU client binds before it
         * connects. Taken over, it could otherwise take a free port of the host, a template
         * server's that is down, and answer whoever comes there (review 34b). */
        if (s->host_network) {
                r = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EACCES), SCMP_SYS(bind), 0);
                if (r < 0)
                        goto finish;
        }
        /* A client in the host's network (the probes): it may connect, never serve. Else it could
         * take a free port of the host and answer whoever comes there, another caller's probe of
         * a server that is down included. */
        if (s->client_only)
                for (size_t i = 0; i < ELEMENTSOF(listen_calls); i++) {
                        int nr = seccomp_syscall_resolve_name(listen_calls[i]);
                        if (nr == __NR_SCMP_ERROR)
                                continue;
                        r = seccomp_rule_add(ctx, SCMP_ACT_KILL_PROCESS, nr, 0);
                        if (r < 0 && r != -EDOM)
                                goto finish;
                }
        r = seccomp_load(ctx);
finish:
        seccomp_release(ctx);
        return r;
}

static int arrange_fds(const SandboxSpec *s, int *errfd, int *exec_fd) {
        int devnull, out = -1, err = -1, tmp[16];

        /* Optional fds count only above 2: a zeroed spec never means "the daemon's fd 0". */
        if (s->n_fds > ELEMENTSOF(tmp))
                return -E2BIG;
        if (s->stdout_fd > 2) {
                out = fcntl(s->stdout_fd, F_DUPFD_CLOEXEC, 64);
                if (out < 0)
                        return -errno;
        }
        if (s->stderr_fd > 2) {
                err = fcntl(s->stderr_fd, F_DUPFD_CLOEXEC, 64);
                if (err < 0)
                        return -errno;
        }
        /* First out of the way (no overlap with 0..3+n), then into place. */
        for (size_t i = 0; i < s->n_fds; i++) {
                tmp[i] = fcntl(s->fds[i], F_DUPFD_CLOEXEC, 64);
                if (tmp[i] < 0)
                        return -errno;
        }
        if (s->exec_fd > 2 && s->exec_fd < 64) {
                /* Out of the way of 0..3+n; CLOEXEC is fine for execveat of an ELF binary. */
                int e = fcntl(s->exec_fd, F_DUPFD_CLOEXEC, 64);
                if (e < 0)
                        return -errno;
                *exec_fd = e;
        }
        if (*errfd < 64) {
                int e = fcntl(*errfd, F_DUPFD_CLOEXEC, 64);
                if (e < 0)
                        return -errno;
                *errfd = e;
        }
        devnull = open("/dev/null", O_RDWR | O_CLOEXEC | O_NOCTTY);
        if (devnull < 0)
                return -errno;
        if (dup2(devnull, STDIN_FILENO) < 0 || dup2(out >= 0 ? out : devnull, STDOUT_FILENO) < 0 ||
                dup2(err >= 0 ? err : devnull, STDERR_FILENO) < 0)
                return -errno;
        for (size_t i = 0; i < s->n_fds; i++)
                if (dup2(tmp[i], 3 + (int) i) < 0) /* dup2 clears CLOEXEC on the copy */
                        return -errno;
        /* Everything else goes; the error pipe and the binary stay until exec (both CLOEXEC,
         * both >= 64 by now). */
        {
                int keep[2] = { *errfd, *exec_fd >= 0 ? *exec_fd : *errfd };
                unsigned first = 3 + (unsigned) s->n_fds;

                if (keep[0] > keep[1]) {
                        int t = keep[0];
                        keep[0] = keep[1];
                        keep[1] = t;
                }
                if (syscall(SYS_close_range, first, (unsigned) keep[0] - 1, 0) < 0 ||
                        (keep[1] > keep[0] + 1 && syscall(SYS_close_range, (unsigned) keep[0] + 1, (unsigned) keep[1] - 1, 0) < 0) ||
                        syscall(SYS_close_range, (unsigned) keep[1] + 1, ~0U, 0) < 0)
                        return -errno;
        }
        return 0;
}

/* Whether the daemon still lives, once the death signal is set. In a PID namespace of its own the
 * child's parent has no pid (getppid() is 0): there the error pipe tells, whose read end only the
 * parent holds (sandbox_spawn() reads it until exec; CLOEXEC, and no other thread of the daemon
 * forks meanwhile). Its write end polls POLLERR once no reader is left. */
static bool parent_alive(const SandboxSpec *s, int errfd, pid_t parent) {
        struct pollfd p = { .fd = errfd, .events = POLLOUT };

        if (!s->own_pids)
                return getppid() == parent;
        return poll(&p, 1, 0) == 1 && !(p.revents & (POLLERR | POLLHUP | POLLNVAL));
}

static _Noreturn void child(const SandboxSpec *s, int errfd, pid_t parent) {
        char *env[34];
        size_t n_env = 0;
        sigset_t all;
        int exec_fd, r;

        sigfillset(&all);
        if (sigprocmask(SIG_UNBLOCK, &all, NULL) < 0)
                child_fail(errfd, STEP_SIGNALS, errno);
        for (int sig = 1; sig < _NSIG; sig++)
                if (sig != SIGKILL && sig != SIGSTOP)
                        (void) signal(sig, SIG_DFL);
        if (setsid() < 0)
                child_fail(errfd, STEP_SIGNALS, errno);

        exec_fd = s->exec_fd > 2 ? s->exec_fd : -1;
        r = arrange_fds(s, &errfd, &exec_fd);
        if (r < 0)
                child_fail(errfd, STEP_FDS, -r);

        if (unshare(CLONE_NEWNS | CLONE_NEWIPC | (s->host_network ? 0 : CLONE_NEWNET)) < 0)
                child_fail(errfd, STEP_NAMESPACES, errno);
        r = setup_mounts(s);
        if (r < 0)
                child_fail(errfd, STEP_MOUNTS, -r);
        /* Whatever a helper creates (in its /tmp or runtime dir) is its own only. */
        umask(0077);

        r = set_rlimits(s);
        if (r < 0)
                child_fail(errfd, STEP_RLIMITS, -r);

        r = drop_capabilities();
        if (r < 0)
                child_fail(errfd, STEP_CAPABILITIES, -r);
        r = change_ids(s->uid, s->gid);
        if (r < 0)
                child_fail(errfd, STEP_IDS, -r);
        if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
                child_fail(errfd, STEP_NNP, errno);
        /* The uid change cleared any earlier death signal: set it now, then make sure the
         * parent did not die in between (we would be orphaned and never killed). */
        if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0)
                child_fail(errfd, STEP_PDEATHSIG, errno);
        if (!parent_alive(s, errfd, parent))
                child_fail(errfd, STEP_PDEATHSIG, ESRCH);
        if (s->selinux_label && sandbox_selinux_enabled()) {
                r = apply_exec_label(s->selinux_label);
                if (r < 0)
                        child_fail(errfd, STEP_SELINUX, -r);
        }
        r = install_denylist(s);
        if (r < 0)
                child_fail(errfd, STEP_SECCOMP, -r);

        env[n_env++] = (char *) "PATH=/usr/bin:/bin";
        env[n_env++] = (char *) "LANG=C.UTF-8";
        for (size_t i = 0; s->env && s->env[i] && n_env < ELEMENTSOF(env) - 1; i++)
                env[n_env++] = s->env[i];
        env[n_env] = NULL;
        if (exec_fd >= 0)
                syscall(SYS_execveat, exec_fd, "", s->argv, env, AT_EMPTY_PATH);
        else
                execve(s->argv[0], s->argv, env);
        child_fail(errfd, STEP_EXEC, errno);
}

int sandbox_forbid_setid(void) {
        static const struct {
                const char *name;
                unsigned mode_arg;
        } calls[] = { { "chmod", 1 }, { "fchmod", 1 }, { "fchmodat", 2 }, { "fchmodat2", 2 }, { "mkdir", 1 },
                { "mkdirat", 2 }, { "mknod", 1 }, { "mknodat", 2 }, { "creat", 1 } };
        const scmp_datum_t bits[] = { S_ISUID, S_ISGID };
        scmp_filter_ctx ctx;
        int r = 0;

        ctx = seccomp_init(SCMP_ACT_ALLOW);
        if (!ctx)
                return -ENOMEM;
        /* Root has the capability it needs to load a filter: no_new_privs stays the unit's say. */
        r = seccomp_attr_set(ctx, SCMP_FLTATR_CTL_NNP, 0);
        for (size_t b = 0; r >= 0 && b < ELEMENTSOF(bits); b++) {
                scmp_datum_t bit = bits[b];

                for (size_t i = 0; r >= 0 && i < ELEMENTSOF(calls); i++) {
                        int nr = seccomp_syscall_resolve_name(calls[i].name);
                        if (nr == __NR_SCMP_ERROR)
                                continue;
                        r = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), nr, 1,
                                (struct scmp_arg_cmp) { .arg = calls[i].mode_arg, .op = SCMP_CMP_MASKED_EQ, .datum_a = bit,
                                        .datum_b = bit });
                        if (r == -EDOM)
                                r = 0;
                }
                if (r >= 0)
                        r = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(open), 2,
                                SCMP_A1(SCMP_CMP_MASKED_EQ, O_CREAT, O_CREAT), SCMP_A2(SCMP_CMP_MASKED_EQ, bit, bit));
                if (r >= 0)
                        r = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(openat), 2,
                                SCMP_A2(SCMP_CMP_MASKED_EQ, O_CREAT, O_CREAT), SCMP_A3(SCMP_CMP_MASKED_EQ, bit, bit));
        }
        if (r >= 0)
                r = seccomp_load(ctx);
        seccomp_release(ctx);
        return r;
}

int sandbox_spawn(const SandboxSpec *s, pid_t *ret_pid) {
        _cleanup_close_ int rfd = -1, wfd = -1, own_ns = -1;
        SpawnFailure f;
        int k = 0;
        int pipefd[2];
        pid_t parent = getpid(), pid;
        ssize_t n;

        if (!s->argv || !s->argv[0] || (s->exec_fd <= 2 && s->argv[0][0] != '/'))
                return -EINVAL;
        if (s->uid == 0 || s->gid == 0)
                return -EPERM;
        if (pipe2(pipefd, O_CLOEXEC) < 0)
                return -errno;
        rfd = pipefd[0];
        wfd = pipefd[1];

        if (s->own_pids) {
                /* The next child of this thread is PID 1 of a new namespace; setns() below makes
                 * later children ours again (a second unshare() would fail otherwise). Back through
                 * a pidfd of ours rather than /proc/…/ns/pid: no nsfs file to be allowed to open.
                 * Only this thread forks, and it waits below until the child exec'd. */
                own_ns = (int) syscall(SYS_pidfd_open, getpid(), 0);
                if (own_ns < 0 || unshare(CLONE_NEWPID) < 0)
                        return log_error_errno(errno, "Sandbox for %s: cannot make a PID namespace: %m", s->name);
        }
        pid = fork();
        if (pid == 0)
                child(s, wfd, parent);
        if (pid < 0)
                k = -errno;
        if (own_ns >= 0 && setns(own_ns, CLONE_NEWPID) < 0) {
                /* Every later fork would land in that namespace, dead once its PID 1 exits. */
                log_error_errno(errno, "Sandbox for %s: cannot return to our PID namespace: %m", s->name);
                abort();
        }
        if (pid < 0)
                return k;

        closep(&wfd);
        wfd = -1;
        /* Until its exec (or failure). Bounded: a child that never gets there (stopped, or stuck in
         * a mount) must not hold the daemon's only thread; it is killed instead. */
        for (usec_t until = now_usec(CLOCK_MONOTONIC) + SANDBOX_SPAWN_TIMEOUT_USEC;;) {
                usec_t now = now_usec(CLOCK_MONOTONIC);
                struct pollfd p = { .fd = rfd, .events = POLLIN };
                int ready;

                ready = now < until ? poll(&p, 1, (int) ((until - now + 999) / 1000)) : 0;
                if (ready < 0 && errno == EINTR)
                        continue;
                if (ready <= 0) {
                        ready = ready < 0 ? -errno : -ETIMEDOUT;
                        (void) kill(pid, SIGKILL);
                        (void) waitpid(pid, NULL, 0);
                        return log_error_errno(ready, "Sandbox for %s: the child did not reach its exec: %m", s->name);
                }
                break;
        }
        do
                n = read(rfd, &f, sizeof(f));
        while (n < 0 && errno == EINTR);
        if (n == 0) {
                *ret_pid = pid;
                return 0;
        }
        /* It failed before exec: collect it and tell why. */
        (void) waitpid(pid, NULL, 0);
        if (n != sizeof(f) || f.step < 0 || f.step >= _STEP_MAX)
                return log_error_errno(EIO, "Sandbox for %s: the child failed without saying why.", s->name);
        return log_error_errno(f.error, "Sandbox for %s: failed while %s: %m", s->name, step_names[f.step]);
}

/* SELinux: every call guarded, so where SELinux is off nothing is ever asked or written. */

/* The daemon's own context. */
static int own_context(char **ret) {
        char *c = NULL;

        if (test_context) {
                *ret = strdup(test_context);
                return *ret ? 0 : -ENOMEM;
        }
        if (getcon_raw(&c) < 0)
                return -errno;
        *ret = strdup(c);
        freecon(c);
        return *ret ? 0 : -ENOMEM;
}

static bool label_part_ok(const char *s, const char *extra) {
        if (isempty(s) || strlen(s) > 255)
                return false;
        for (const char *p = s; *p; p++)
                if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
                            *p == '_' || strchr(extra, *p)))
                        return false;
        return true;
}

int sandbox_selinux_label_from_context(const char *context, const char *type, const char *level, char **ret) {
        _cleanup_free_ char *user = NULL, *role = NULL;
        const char *colon1, *colon2;

        *ret = NULL;
        if (!context || !(colon1 = strchr(context, ':')) || !(colon2 = strchr(colon1 + 1, ':')))
                return -EINVAL;
        user = strndup(context, (size_t) (colon1 - context));
        role = strndup(colon1 + 1, (size_t) (colon2 - colon1 - 1));
        if (!user || !role)
                return -ENOMEM;
        if (!label_part_ok(user, ".") || !label_part_ok(role, ".") || !label_part_ok(type, ".") ||
                !label_part_ok(level, ":,.-"))
                return -EINVAL;
        *ret = strdup_printf("%s:%s:%s:%s", user, role, type, level);
        return *ret ? 0 : -ENOMEM;
}

int sandbox_selinux_labels(const char *process_type, const char *image_type, unsigned c1, unsigned c2,
        char **ret_process, char **ret_image) {
        _cleanup_free_ char *context = NULL, *level = NULL, *p = NULL, *i = NULL;
        int r;

        *ret_process = *ret_image = NULL;
        if (!sandbox_selinux_enabled())
                return 0;
        if (c1 >= c2 || c2 >= SANDBOX_MCS_CATEGORIES)
                return -EINVAL;
        r = own_context(&context);
        if (r < 0)
                return r;
        level = strdup_printf("s0:c%u,c%u", c1, c2);
        if (!level)
                return -ENOMEM;
        /* The process keeps our user and role; the images get the object role. */
        r = sandbox_selinux_label_from_context(context, process_type, level, &p);
        if (r < 0)
                return r;
        r = sandbox_selinux_label_from_context("system_u:object_r:", image_type, level, &i);
        if (r < 0)
                return r;
        *ret_process = TAKE_PTR(p);
        *ret_image = TAKE_PTR(i);
        return 1;
}

int sandbox_selinux_plain_label(const char *process_type, char **ret) {
        _cleanup_free_ char *context = NULL;
        int r;

        *ret = NULL;
        if (!sandbox_selinux_enabled())
                return 0;
        r = own_context(&context);
        if (r < 0)
                return r;
        r = sandbox_selinux_label_from_context(context, process_type, "s0", ret);
        return r < 0 ? r : 1;
}

int sandbox_selinux_label_fd(int fd, const char *label) {
        char *now = NULL;
        bool same;

        /* Under the test override no SELinux call is made: only the labels are computed. */
        if (!label || !sandbox_selinux_enabled() || test_context)
                return 0;
        /* A file that has the label already is left alone: a shared template on a file system
         * read-only to the daemon (outside the unit's ReadWritePaths=) labelled once by its
         * administrator is fine as it is, and a relabel there fails with EROFS. */
        same = fgetfilecon_raw(fd, &now) >= 0 && streq_ptr(now, label);
        freecon(now);
        if (same)
                return 0;
        if (fsetfilecon_raw(fd, label) < 0)
                return -errno;
        return 0;
}
