/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <sys/prctl.h>
#include <sys/socket.h>

#include "control.h"
#include "helper-common.h"

bool helper_control_ok;
bool helper_control_gone;

const char *helper_sanitize(char *buf, size_t size, const char *s, size_t len) {
        size_t i;

        for (i = 0; i < len && i + 1 < size; i++)
                buf[i] = s[i] >= 0x20 && s[i] < 0x7f ? s[i] : '?';
        buf[i] = 0;
        return buf;
}

int helper_fail(int error, const char *format, ...) {
        char text[CONTROL_MESSAGE_MAX - sizeof("error \n") + 1];
        va_list ap;

        error = abs(error) ?: EIO;
        errno = error;
        va_start(ap, format);
        vsnprintf(text, sizeof(text), format, ap);
        va_end(ap);
        helper_sanitize(text, sizeof(text), text, strlen(text));
        log_error("%s", text);

        if (helper_control_ok && !helper_control_gone)
                (void) control_send_error(CONTROL_FD, text);
        return -error;
}

int helper_check_socket(int fd, int want_type, bool want_listening, int *ret_domain) {
        int type, domain, listening = 0;
        socklen_t l;

        l = sizeof(type);
        if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &l) < 0)
                return -errno;
        l = sizeof(domain);
        if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &l) < 0)
                return -errno;
        if (want_listening) {
                l = sizeof(listening);
                if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &l) < 0)
                        return -errno;
        }
        if (type != want_type || (want_listening && !listening))
                return -EINVAL;
        *ret_domain = domain;
        return 0;
}

static int allow_syscall(scmp_filter_ctx ctx, const SyscallRule *rule) {
        int nr, r;

        nr = seccomp_syscall_resolve_name(rule->name);
        if (nr == __NR_SCMP_ERROR)
                return 0; /* not on this architecture */
        r = seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, nr, rule->n_args, rule->args);
        if (r == -EDOM)
                return 0; /* a pseudo-syscall this architecture does not have */
        return r;
}

int helper_install_allowlist(const SyscallRule *rules, size_t n_rules, bool valgrind) {
        /* valgrind knows prctl(PR_SET_SECCOMP) but not seccomp(2), without which libseccomp
         * cannot tell that KILL_PROCESS exists. One thread: killing it kills the process. */
        uint32_t deny = valgrind ? SCMP_ACT_KILL_THREAD : SCMP_ACT_KILL_PROCESS;
        scmp_filter_ctx ctx;
        int r;

        /* Not dumpable: a process of the same uid may signal it, but neither trace it nor open its
         * /proc/PID/mem. A template cache's QEMU runs as its relay's uid, in the PID namespace the
         * relay's is nested in, so it sees the relay (review 34b). */
        if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0)
                return -errno;
        ctx = seccomp_init(deny);
        if (!ctx)
                return -ENOMEM;

        for (size_t i = 0; i < n_rules; i++) {
                r = allow_syscall(ctx, &rules[i]);
                if (r < 0)
                        goto finish;
        }

        if (valgrind) {
                /* valgrind runs its machinery in our process: signal masks and its scheduler's
                 * pipe lock around each syscall, polling for signals, memory for translations. */
                static const char *const vg[] = {
                        "rt_sigprocmask", "rt_sigtimedwait", "gettid", "getpid", "read", "write", "futex", "mmap",
                        "munmap", "mprotect", "brk",
                };
                for (size_t i = 0; i < ELEMENTSOF(vg); i++) {
                        r = allow_syscall(ctx, &(SyscallRule) { vg[i] });
                        if (r < 0 && r != -EEXIST)
                                goto finish;
                }
        }

        r = seccomp_load(ctx);
finish:
        seccomp_release(ctx);
        return r;
}

bool helper_selftest_has(const char *env, const char *word) {
        const char *e = env ? getenv(env) : NULL;
        size_t l = strlen(word);

        for (const char *p = e; p && *p; p += strcspn(p, ","), p += !!*p)
                if (strncmp(p, word, l) == 0 && (p[l] == ',' || p[l] == 0))
                        return true;
        return false;
}

void helper_selftest_try_forbidden(const char *env) {
        if (helper_selftest_has(env, "open"))
                (void) openat(AT_FDCWD, "/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (helper_selftest_has(env, "socket"))
                (void) socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
}
