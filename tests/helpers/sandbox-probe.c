/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* sandbox-probe: a stand-in for a helper, spawned by sandbox_spawn() exactly like the real ones
 * (tests/unit/test-sandbox.c), that tries one way out of its sandbox and says what happened.
 *
 *   sandbox-probe ATTEMPT [ARG...]
 *
 * The result is one line on fd 3 (the only fd it is given), e.g. "open /home: ENOENT". An
 * attempt the sandbox answers by killing the process (seccomp) writes nothing: the spawner sees
 * the signal instead, and a line that does arrive says the attempt survived.
 *
 * Attempts:
 *   open PATH              open(PATH, O_RDONLY): "open PATH: ok" or "open PATH: ERRNO"
 *   list PATH              opendir(PATH): "list PATH: ok NAME NAME ..." (sorted) or "list PATH: ERRNO"
 *   write PATH             create PATH (O_EXCL) and write to it: "write PATH: ok" or "write PATH: ERRNO"
 *   connect ADDR PORT      socket(AF_INET) + connect: "connect ADDR:PORT: socket ok, connect ok|ERRNO"
 *   socket FAMILY [TYPE PROTOCOL]
 *                          socket(FAMILY, TYPE or SOCK_STREAM, PROTOCOL or 0): "socket FAMILY: ok|ERRNO"
 *   ptrace-traceme         ptrace(PTRACE_TRACEME)
 *   ptrace-parent          ptrace(PTRACE_ATTACH, getppid())
 *   mount                  mount tmpfs on /tmp
 *   unshare-user           unshare(CLONE_NEWUSER)
 *   setuid                 setuid(0)
 *   exec PROGRAM           execve PROGRAM (a control: the deny-list allows it); the line is
 *                          written first, "exec PROGRAM"
 *   exec-allowlist PROGRAM install a libseccomp allow-list without execve, like our own helpers
 *                          do once set up, then execve PROGRAM; the line is written first,
 *                          "allow-list installed, exec PROGRAM"
 *   core DIR               report RLIMIT_CORE (/proc/self/limits) and an attempt to raise it,
 *                          chdir DIR, raise SIGSEGV
 *   limits                 "AS=SOFT/HARD DATA=SOFT/HARD FSIZE=SOFT/HARD" from getrlimit(), "inf" for
 *                          RLIM_INFINITY
 *   io_uring               io_uring_setup(): "io_uring_setup: ok" or "io_uring_setup: ERRNO"
 *   unseen-memory          memfd_create, shmget, msgget, semget, mq_open: "memfd_create ERRNO, ..."
 *   mkdirs DIR N           N empty directories in DIR: "mkdirs DIR: MADE" or "mkdirs DIR: MADE then ERRNO"
 *   listen-unbound         listen() on a TCP socket never bound: "survived listen-unbound: ok|ERRNO"
 *   status                 "uid=R,E,S,F gid=R,E,S,F groups=[...] CapInh=... CapPrm=... CapEff=...
 *                          CapBnd=... CapAmb=... NoNewPrivs=N Seccomp=N" from /proc/self/status
 *   fds                    the open fds from /proc/self/fd, without the listing's own: "fds: 0 1 2 3"
 *   procs                  "procs: self=PID visible=PID PID ..." (numeric entries of /proc)
 *   sleep                  "sleeping PID", then wait forever
 *
 * It exits 0 after reporting (2 on a usage error, 3 if fd 3 is not there). */

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <sys/ipc.h>
#include <seccomp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>

#define REPORT_FD 3

/* Built with the project's sanitizer flags in the sanitizer build: there, LeakSanitizer's exit
 * check would ptrace (killed by the deny-list) and ASan's SEGV handler would turn the core-dump
 * attempt into an exit. Neither is what is being tested. */
const char *__asan_default_options(void);
const char *__asan_default_options(void) {
        return "detect_leaks=0:handle_segv=0:handle_abort=0:allow_user_segv_handler=1";
}

static char line[8192];
static size_t line_len;

static void add(const char *format, ...) __attribute__((format(printf, 1, 2)));
static void add(const char *format, ...) {
        va_list ap;
        int n;

        if (line_len >= sizeof(line) - 1)
                return;
        va_start(ap, format);
        n = vsnprintf(line + line_len, sizeof(line) - line_len, format, ap);
        va_end(ap);
        if (n > 0)
                line_len = line_len + (size_t) n < sizeof(line) - 1 ? line_len + (size_t) n : sizeof(line) - 1;
}

static void report(void) {
        size_t off = 0;

        line[line_len++] = '\n';
        while (off < line_len) {
                ssize_t n = write(REPORT_FD, line + off, line_len - off);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        _exit(3);
                }
                off += (size_t) n;
        }
        line_len = 0;
}

static const char *errname(int e) {
        const char *n = strerrorname_np(e);
        return n ? n : "E?";
}

/* "ok" or the errno's name, for a call that returned r. */
static const char *outcome(long r) {
        return r < 0 ? errname(errno) : "ok";
}

static int cmp_str(const void *a, const void *b) {
        return strcmp(*(char *const *) a, *(char *const *) b);
}

static int attempt_list(const char *path) {
        char *names[256];
        size_t n = 0;
        struct dirent *de;
        DIR *d;

        d = opendir(path);
        if (!d) {
                add("list %s: %s", path, errname(errno));
                return 0;
        }
        while ((de = readdir(d)) && n < 256)
                if (strcmp(de->d_name, ".") != 0 && strcmp(de->d_name, "..") != 0)
                        names[n++] = strdup(de->d_name);
        closedir(d);
        qsort(names, n, sizeof(char *), cmp_str);
        add("list %s: ok", path);
        for (size_t i = 0; i < n; i++)
                add(" %s", names[i] ? names[i] : "?");
        return 0;
}

static int attempt_write(const char *path) {
        int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);

        if (fd < 0) {
                add("write %s: %s", path, errname(errno));
                return 0;
        }
        if (write(fd, "probe\n", 6) != 6) {
                add("write %s: created, write %s", path, errname(errno));
                close(fd);
                return 0;
        }
        close(fd);
        add("write %s: ok", path);
        return 0;
}

static int attempt_connect(const char *addr, const char *port) {
        struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t) atoi(port)) };
        int fd;

        if (inet_pton(AF_INET, addr, &sa.sin_addr) != 1)
                return 2;
        fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0) {
                add("connect %s:%s: socket %s", addr, port, errname(errno));
                return 0;
        }
        add("connect %s:%s: socket ok, connect %s", addr, port,
                outcome(connect(fd, (struct sockaddr *) &sa, sizeof(sa))));
        close(fd);
        return 0;
}

/* Everything a helper that only writes to a pipe needs, like blockstream-nbd-relay's own list:
 * no execve. Default action: kill the process. */
static int install_allowlist(void) {
        static const char *const allow[] = {
                "write", "close", "exit", "exit_group", "rt_sigreturn", "restart_syscall", "clock_gettime",
                "brk", "mmap", "munmap",
        };
        scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_KILL_PROCESS);
        int r = 0;

        if (!ctx)
                return -ENOMEM;
        for (size_t i = 0; i < sizeof(allow) / sizeof(allow[0]) && r >= 0; i++) {
                int nr = seccomp_syscall_resolve_name(allow[i]);
                if (nr != __NR_SCMP_ERROR)
                        r = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, nr, 0);
        }
        if (r >= 0)
                r = seccomp_load(ctx);
        seccomp_release(ctx);
        return r;
}

/* "Max core file size  0  0  bytes" → "RLIMIT_CORE soft=0 hard=0". */
static void add_core_limit(void) {
        char buf[4096], *p;
        ssize_t n;
        int fd;

        fd = open("/proc/self/limits", O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
                add("/proc/self/limits: %s", errname(errno));
                return;
        }
        n = read(fd, buf, sizeof(buf) - 1);
        close(fd);
        buf[n > 0 ? n : 0] = 0;
        p = strstr(buf, "Max core file size");
        if (!p) {
                add("/proc/self/limits: no core line");
                return;
        }
        p += strlen("Max core file size");
        {
                char soft[32] = "", hard[32] = "";
                if (sscanf(p, " %31s %31s", soft, hard) != 2)
                        add("/proc/self/limits: unparsable core line");
                else
                        add("RLIMIT_CORE soft=%s hard=%s", soft, hard);
        }
}

static int attempt_core(const char *dir) {
        struct rlimit unlimited = { RLIM_INFINITY, RLIM_INFINITY };

        add_core_limit();
        add(", raise %s", outcome(setrlimit(RLIMIT_CORE, &unlimited)));
        add(", dumpable=%d", prctl(PR_GET_DUMPABLE, 0, 0, 0, 0));
        add(", chdir %s: %s", dir, outcome(chdir(dir)));
        report();
        /* The default action of SIGSEGV dumps core, if anything lets it. */
        signal(SIGSEGV, SIG_DFL);
        raise(SIGSEGV);
        add("survived SIGSEGV");
        return 0;
}

static void add_limit(const char *name, int resource) {
        struct rlimit rl;

        if (getrlimit(resource, &rl) < 0) {
                add("%s=%s", name, errname(errno));
                return;
        }
        add("%s=", name);
        if (rl.rlim_cur == RLIM_INFINITY)
                add("inf");
        else
                add("%llu", (unsigned long long) rl.rlim_cur);
        if (rl.rlim_max == RLIM_INFINITY)
                add("/inf");
        else
                add("/%llu", (unsigned long long) rl.rlim_max);
}

static int attempt_limits(void) {
        add_limit("AS", RLIMIT_AS);
        add(" ");
        add_limit("DATA", RLIMIT_DATA);
        add(" ");
        add_limit("FSIZE", RLIMIT_FSIZE);
        return 0;
}

static int attempt_io_uring(void) {
        char params[120] = {}; /* struct io_uring_params, zeroed */
        long fd = syscall(__NR_io_uring_setup, 4, params);

        add("io_uring_setup: %s", outcome(fd));
        if (fd >= 0)
                close((int) fd);
        return 0;
}

static int attempt_unseen_memory(void) {
        long fd = syscall(__NR_memfd_create, "probe", 0), shm = syscall(__NR_shmget, IPC_PRIVATE, 4096, 0600),
             msg = syscall(__NR_msgget, IPC_PRIVATE, 0600), sem = syscall(__NR_semget, IPC_PRIVATE, 32, 0600),
             mq = syscall(__NR_mq_open, "probe", O_RDWR | O_CREAT, 0600, NULL);

        add("memfd_create %s, shmget %s, msgget %s, semget %s, mq_open %s", outcome(fd), outcome(shm), outcome(msg),
                outcome(sem), outcome(mq));
        return 0;
}

static int attempt_status(void) {
        static const char *const keys[] = { "Uid:", "Gid:", "Groups:", "CapInh:", "CapPrm:", "CapEff:", "CapBnd:",
                                            "CapAmb:", "NoNewPrivs:", "Seccomp:" };
        char buf[8192];
        ssize_t n;
        int fd;

        fd = open("/proc/self/status", O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
                add("status: %s", errname(errno));
                return 0;
        }
        n = read(fd, buf, sizeof(buf) - 1);
        close(fd);
        buf[n > 0 ? n : 0] = 0;
        for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
                char *p = buf;
                /* At the start of a line only ("Seccomp:" vs "Seccomp_filters:"). */
                while ((p = strstr(p, keys[i])) && p != buf && p[-1] != '\n')
                        p++;
                if (!p) {
                        add("%s%s=?", i ? " " : "", keys[i]);
                        continue;
                }
                p += strlen(keys[i]);
                add("%s%.*s=", i ? " " : "", (int) strlen(keys[i]) - 1, keys[i]);
                /* The value, whitespace collapsed to commas. */
                {
                        bool first = true;
                        while (*p && *p != '\n') {
                                size_t w;
                                p += strspn(p, " \t");
                                w = strcspn(p, " \t\n");
                                if (w > 0) {
                                        add("%s%.*s", first ? "" : ",", (int) w, p);
                                        first = false;
                                }
                                p += w;
                        }
                }
        }
        return 0;
}

static int attempt_fds(void) {
        struct dirent *de;
        DIR *d = opendir("/proc/self/fd");
        int own, fds[1024];
        size_t n = 0;

        if (!d) {
                add("fds: %s", errname(errno));
                return 0;
        }
        own = dirfd(d);
        while ((de = readdir(d)) && n < 1024) {
                char *end;
                long v;
                if (de->d_name[0] == '.')
                        continue;
                v = strtol(de->d_name, &end, 10);
                if (*end || v == own)
                        continue;
                fds[n++] = (int) v;
        }
        closedir(d);
        /* In order. */
        for (size_t i = 1; i < n; i++)
                for (size_t j = i; j > 0 && fds[j - 1] > fds[j]; j--) {
                        int t = fds[j];
                        fds[j] = fds[j - 1];
                        fds[j - 1] = t;
                }
        add("fds:");
        for (size_t i = 0; i < n; i++)
                add(" %d", fds[i]);
        return 0;
}

static int attempt_procs(void) {
        struct dirent *de;
        DIR *d = opendir("/proc");

        if (!d) {
                add("procs: %s", errname(errno));
                return 0;
        }
        add("procs: self=%d visible=", (int) getpid());
        {
                bool first = true;
                while ((de = readdir(d))) {
                        if (de->d_name[0] < '0' || de->d_name[0] > '9')
                                continue;
                        add("%s%s", first ? "" : ",", de->d_name);
                        first = false;
                }
        }
        closedir(d);
        return 0;
}

int main(int argc, char **argv) {
        const char *what = argc > 1 ? argv[1] : "";
        long r;

        if (fcntl(REPORT_FD, F_GETFD) < 0)
                return 3;

        if (!strcmp(what, "open") && argc == 3) {
                int fd = open(argv[2], O_RDONLY | O_CLOEXEC);
                add("open %s: %s", argv[2], outcome(fd));
        } else if (!strcmp(what, "list") && argc == 3)
                attempt_list(argv[2]);
        else if (!strcmp(what, "write") && argc == 3)
                attempt_write(argv[2]);
        else if (!strcmp(what, "socket") && (argc == 3 || argc == 5)) {
                int fd = socket(atoi(argv[2]), (argc == 5 ? atoi(argv[3]) : SOCK_STREAM) | SOCK_CLOEXEC,
                        argc == 5 ? atoi(argv[4]) : 0);
                add("socket %s: %s", argv[2], outcome(fd));
        } else if (!strcmp(what, "connect") && argc == 4) {
                if (attempt_connect(argv[2], argv[3]) == 2)
                        return 2;
        } else if (!strcmp(what, "listen")) {
                int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
                struct sockaddr_in sa = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
                if (fd < 0 || bind(fd, (struct sockaddr *) &sa, sizeof(sa)) < 0)
                        add("listen: socket or bind %s", errname(errno));
                else
                        add("survived listen: %s", outcome(listen(fd, 4)));
        } else if (!strcmp(what, "listen-unbound")) {
                /* No bind: the kernel gives it a port of its own choosing. */
                int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
                if (fd < 0)
                        add("listen-unbound: socket %s", errname(errno));
                else
                        add("survived listen-unbound: %s", outcome(listen(fd, 4)));
        } else if (!strcmp(what, "mkdirs") && argc == 4) {
                /* n empty directories below a directory: how many were made, and why not more. */
                long n = atol(argv[3]), made = 0;
                char name[PATH_MAX];
                int err = 0;
                for (; made < n; made++) {
                        snprintf(name, sizeof(name), "%s/d%ld", argv[2], made);
                        if (mkdir(name, 0700) < 0) {
                                err = errno;
                                break;
                        }
                }
                add("mkdirs %s: %ld%s%s", argv[2], made, err ? " then " : "", err ? errname(err) : "");
        } else if (!strcmp(what, "ptrace-traceme")) {
                r = ptrace(PTRACE_TRACEME, 0, NULL, NULL);
                add("survived ptrace(PTRACE_TRACEME): %s", outcome(r));
        } else if (!strcmp(what, "ptrace-parent")) {
                pid_t parent = getppid();
                r = ptrace(PTRACE_ATTACH, parent, NULL, NULL);
                add("survived ptrace(PTRACE_ATTACH, %d): %s", (int) parent, outcome(r));
        } else if (!strcmp(what, "mount")) {
                r = mount("tmpfs", "/tmp", "tmpfs", 0, NULL);
                add("survived mount: %s", outcome(r));
        } else if (!strcmp(what, "unshare-user")) {
                r = unshare(CLONE_NEWUSER);
                add("survived unshare(CLONE_NEWUSER): %s", outcome(r));
        } else if (!strcmp(what, "setuid")) {
                r = syscall(SYS_setuid, 0);
                add("survived setuid(0): %s", outcome(r));
        } else if (!strcmp(what, "exec") && argc == 3) {
                char *args[] = { argv[2], NULL }, *env[] = { NULL };
                add("exec %s", argv[2]);
                report();
                execve(argv[2], args, env);
                add("exec %s: %s", argv[2], errname(errno));
        } else if (!strcmp(what, "exec-allowlist") && argc == 3) {
                char *args[] = { argv[2], NULL }, *env[] = { NULL };
                int k = install_allowlist();
                if (k < 0) {
                        add("allow-list: %s", errname(-k));
                } else {
                        add("allow-list installed, exec %s", argv[2]);
                        report();
                        execve(argv[2], args, env);
                        add("survived execve: %s", errname(errno));
                }
        } else if (!strcmp(what, "core") && argc == 3)
                attempt_core(argv[2]);
        else if (!strcmp(what, "status"))
                attempt_status();
        else if (!strcmp(what, "limits"))
                attempt_limits();
        else if (!strcmp(what, "io_uring"))
                attempt_io_uring();
        else if (!strcmp(what, "unseen-memory"))
                attempt_unseen_memory();
        else if (!strcmp(what, "fds"))
                attempt_fds();
        else if (!strcmp(what, "procs"))
                attempt_procs();
        else if (!strcmp(what, "sleep")) {
                add("sleeping %d", (int) getpid());
                report();
                for (;;)
                        pause();
        } else {
                fprintf(stderr, "sandbox-probe: unknown attempt '%s' or wrong arguments\n", what);
                return 2;
        }
        report();
        return 0;
}
