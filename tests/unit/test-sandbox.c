/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* Escape attempts from inside the real sandbox: sandbox_spawn() (service/sandbox.c, the one
 * function that spawns every helper) runs tests/helpers/sandbox-probe exactly as the daemon runs
 * blockstream-nbd-relay (an O_PATH fd of the binary, a helper uid, a runtime dir, one fd), and
 * the probe tries one way out per spawn. Each attempt must fail with the designed errno, or get
 * the probe killed (SIGSYS where the seccomp deny-list applies). Needs root (the spawn changes
 * uid and builds namespaces); without root the test reports a TAP skip.
 *
 * The probe's path comes from $SANDBOX_PROBE (meson sets it). */

#include <dirent.h>
#include <sys/mount.h>
#include <inttypes.h>
#include <sched.h>
#include <fcntl.h>
#include <poll.h>
#include <pwd.h>
#include <signal.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>

#include <systemd/sd-bus.h>

#include "config.h"
#include "guest.h"
#include "manager.h"
#include "sandbox.h"
#include "util.h"
#include "tap.h"

#define PROBE_TIMEOUT_MS 10000

static const char *probe;
static uid_t helper_uid = 2147400000;   /* "some unused uid" (checked in main) */
static uid_t other_uid;                 /* another guest's helper */
static char base[64];                   /* /var/tmp/bst-sandbox-XXXXXX */
static char images[128];                /* base/images: another guest's image lives here */
static char other_image[192];           /* base/images/other-guest.qcow2, root 0600 */
static char rundir[128];                /* base/run: the probe's runtime dir, owned by helper_uid */
static const char *usr_submount;        /* a tmpfs (mode 0777) mounted below /usr in our private mount namespace */

typedef struct Outcome {
        int r;            /* sandbox_spawn()'s result */
        pid_t pid;
        int status;       /* waitpid() status */
        bool timed_out;
        char report[8192]; /* what the probe wrote on fd 3, trailing newline removed */
} Outcome;

typedef struct ProbeOptions {
        uid_t uid;               /* 0: helper_uid */
        const char *runtime_dir; /* NULL: rundir; "" : none */
        bool host_network;
        bool client_only;
        bool own_pids;
        uint64_t max_address_space; /* as in SandboxSpec: 0 is the helpers' default */
        uint64_t max_file_size;     /* 0: no file writes (the default of our helpers) */
} ProbeOptions;

static int make_spec_argv(char **argv, size_t max, const char *const *args) {
        size_t n = 0;

        argv[n++] = (char *) "sandbox-probe";
        for (size_t i = 0; args[i]; i++) {
                if (n + 1 >= max)
                        return -E2BIG;
                argv[n++] = (char *) args[i];
        }
        argv[n] = NULL;
        return 0;
}

/* Read fd until EOF or the deadline; returns false on timeout. */
static bool read_all(int fd, char *buf, size_t size, int timeout_ms) {
        size_t len = 0;
        struct timespec t0;

        clock_gettime(CLOCK_MONOTONIC, &t0);
        buf[0] = 0;
        for (;;) {
                struct timespec t;
                struct pollfd p = { .fd = fd, .events = POLLIN };
                long elapsed;
                ssize_t n;

                clock_gettime(CLOCK_MONOTONIC, &t);
                elapsed = (t.tv_sec - t0.tv_sec) * 1000 + (t.tv_nsec - t0.tv_nsec) / 1000000;
                if (elapsed >= timeout_ms)
                        return false;
                if (poll(&p, 1, (int) (timeout_ms - elapsed)) <= 0)
                        continue;
                n = read(fd, buf + len, size - 1 - len);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n <= 0)
                        break;
                len += (size_t) n;
                buf[len] = 0;
                if (len >= size - 1)
                        break;
        }
        while (len > 0 && buf[len - 1] == '\n')
                buf[--len] = 0;
        return true;
}

/* Spawn the probe through sandbox_spawn() with the report pipe as its fd 3; return the read end
 * (the caller reads and reaps), or -1 with o->r set. */
static int spawn_probe(const ProbeOptions *po, const char *const *args, Outcome *o) {
        _cleanup_close_ int exec_fd = -1, w = -1;
        char *argv[16];
        int p[2], fds[1];

        memset(o, 0, sizeof(*o));
        o->pid = -1;
        if (make_spec_argv(argv, ELEMENTSOF(argv), args) < 0) {
                o->r = -E2BIG;
                return -1;
        }
        exec_fd = open(probe, O_PATH | O_CLOEXEC);
        if (exec_fd < 0 || pipe2(p, O_CLOEXEC) < 0) {
                o->r = -errno;
                return -1;
        }
        w = p[1];
        fds[0] = w;
        o->r = sandbox_spawn(
                &(SandboxSpec) {
                        .name = "probe",
                        .uid = po && po->uid ? po->uid : helper_uid,
                        .gid = po && po->uid ? po->uid : helper_uid,
                        .runtime_dir = po && po->runtime_dir ? (po->runtime_dir[0] ? po->runtime_dir : NULL) : rundir,
                        .host_network = po && po->host_network,
                        .client_only = po && po->client_only,
                        .own_pids = po && po->own_pids,
                        .max_address_space = po ? po->max_address_space : 0,
                        .max_file_size = po ? po->max_file_size : 0,
                        .fds = fds,
                        .n_fds = 1,
                        .argv = argv,
                        .exec_fd = exec_fd,
                },
                &o->pid);
        if (o->r < 0) {
                close(p[0]);
                return -1;
        }
        return p[0];
}

static void finish_probe(int rfd, Outcome *o) {
        if (rfd < 0)
                return;
        if (!read_all(rfd, o->report, sizeof(o->report), PROBE_TIMEOUT_MS)) {
                o->timed_out = true;
                (void) kill(o->pid, SIGKILL);
        }
        close(rfd);
        while (waitpid(o->pid, &o->status, 0) < 0 && errno == EINTR)
                ;
}

static void run_probe_with(const ProbeOptions *po, Outcome *o, const char *const *args) {
        finish_probe(spawn_probe(po, args, o), o);
}

#define RUN(o, ...) run_probe_with(NULL, (o), (const char *const[]) { __VA_ARGS__, NULL })
#define RUN_WITH(po, o, ...) run_probe_with((po), (o), (const char *const[]) { __VA_ARGS__, NULL })

static const char *describe(const Outcome *o) {
        static char buf[9000];

        if (o->r < 0)
                snprintf(buf, sizeof(buf), "sandbox_spawn failed: %s", strerror(-o->r));
        else if (o->timed_out)
                snprintf(buf, sizeof(buf), "timed out (killed); report \"%s\"", o->report);
        else if (WIFEXITED(o->status))
                snprintf(buf, sizeof(buf), "exited %d; report \"%s\"", WEXITSTATUS(o->status), o->report);
        else if (WIFSIGNALED(o->status))
                snprintf(buf, sizeof(buf), "killed by SIG%s%s; report \"%s\"", sigabbrev_np(WTERMSIG(o->status)) ?: "?",
                        WCOREDUMP(o->status) ? " (core dumped)" : "", o->report);
        else
                snprintf(buf, sizeof(buf), "status 0x%x; report \"%s\"", o->status, o->report);
        return buf;
}

/* The probe ran, exited 0, and said exactly `expect`. */
static void expect_report(const Outcome *o, const char *expect) {
        if (o->r < 0 || o->timed_out || !WIFEXITED(o->status) || WEXITSTATUS(o->status) != 0 ||
                strcmp(o->report, expect) != 0)
                TAP_FAIL("expected \"%s\" and exit 0, got: %s", expect, describe(o));
}

/* The probe was killed by `sig` without reporting anything (it did not survive the attempt). */
static void expect_killed(const Outcome *o, int sig, const char *expect_report_text) {
        if (o->r < 0 || o->timed_out || !WIFSIGNALED(o->status) || WTERMSIG(o->status) != sig ||
                strcmp(o->report, expect_report_text ?: "") != 0)
                TAP_FAIL("expected death by SIG%s (report \"%s\"), got: %s", sigabbrev_np(sig) ?: "?",
                        expect_report_text ?: "", describe(o));
}

static const char *fmt(const char *format, ...) _printf_(1, 2);
static const char *fmt(const char *format, ...) {
        static char ring[32][PATH_MAX + 256];
        static unsigned next;
        char *b = ring[next++ % ELEMENTSOF(ring)];
        va_list ap;

        va_start(ap, format);
        vsnprintf(b, sizeof(ring[0]), format, ap);
        va_end(ap);
        return b;
}

/* -- the attempts */

static void test_other_guest_image_invisible(void) {
        struct stat st;
        Outcome o;

        /* It is there, outside, and only root could read it anyway... */
        ASSERT_TRUE(stat(other_image, &st) == 0 && S_ISREG(st.st_mode) && (st.st_mode & 07777) == 0600 && st.st_uid == 0);
        /* ...but inside it does not even exist, nor does its directory, next to the runtime dir. */
        RUN(&o, "open", other_image);
        expect_report(&o, fmt("open %s: ENOENT", other_image));
        RUN(&o, "list", images);
        expect_report(&o, fmt("list %s: ENOENT", images));
        /* Of the parent, only the runtime dir is there. */
        RUN(&o, "list", base);
        expect_report(&o, fmt("list %s: ok run", base));
        /* And a path outside the runtime dir's parent that surely exists outside. */
        RUN(&o, "open", probe);
        expect_report(&o, fmt("open %s: ENOENT", probe));
}

static void test_home_and_root_invisible(void) {
        Outcome o;

        RUN(&o, "list", "/home");
        expect_report(&o, "list /home: ENOENT");
        RUN(&o, "list", "/root");
        expect_report(&o, "list /root: ENOENT");
        RUN(&o, "list", "/var");
        expect_report(&o, fmt("list /var: ok tmp"));
        RUN(&o, "list", "/tmp");
        expect_report(&o, "list /tmp: ok"); /* empty */
}

static void test_etc_shadow_invisible(void) {
        Outcome o;

        ASSERT_TRUE(access("/etc/shadow", F_OK) == 0);
        RUN(&o, "open", "/etc/shadow");
        expect_report(&o, "open /etc/shadow: ENOENT");
        RUN(&o, "open", "/etc/passwd");
        expect_report(&o, "open /etc/passwd: ENOENT");
        /* The dynamic linker's cache is the only file of /etc. */
        RUN(&o, "list", "/etc");
        expect_report(&o, access("/etc/ld.so.cache", F_OK) == 0 ? "list /etc: ok ld.so.cache" : "list /etc: ok");
}

/* A helper in the host's network (URL probes, template caches) also sees what resolving names and
 * checking TLS servers take, read-only, and still no account. */
static void test_host_network_sees_name_service_files(void) {
        ProbeOptions host = { .host_network = true };
        Outcome o;

        ASSERT_TRUE(access("/etc/hosts", F_OK) == 0);
        RUN_WITH(&host, &o, "open", "/etc/hosts");
        expect_report(&o, "open /etc/hosts: ok");
        if (access("/etc/ssl/certs", F_OK) == 0) {
                RUN_WITH(&host, &o, "write", "/etc/ssl/certs/probe");
                expect_report(&o, "write /etc/ssl/certs/probe: EROFS");
        }
        RUN_WITH(&host, &o, "open", "/etc/shadow");
        expect_report(&o, "open /etc/shadow: ENOENT");
        RUN_WITH(&host, &o, "open", "/etc/passwd");
        expect_report(&o, "open /etc/passwd: ENOENT");
}

static void test_no_network(void) {
        struct sockaddr_in sa = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
        socklen_t len = sizeof(sa);
        _cleanup_close_ int l = -1;
        ProbeOptions host = { .host_network = true };
        char port[16];
        Outcome o;

        /* Something listens on the host's loopback... */
        l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        ASSERT_TRUE(l >= 0);
        ASSERT_TRUE(bind(l, (struct sockaddr *) &sa, sizeof(sa)) == 0);
        ASSERT_TRUE(listen(l, 4) == 0);
        ASSERT_TRUE(getsockname(l, (struct sockaddr *) &sa, &len) == 0);
        snprintf(port, sizeof(port), "%u", ntohs(sa.sin_port));

        /* ...but the sandbox has its own, empty network namespace: socket() works, nothing is reachable. */
        RUN(&o, "connect", "127.0.0.1", port);
        expect_report(&o, fmt("connect 127.0.0.1:%s: socket ok, connect ENETUNREACH", port));
        RUN(&o, "connect", "1.1.1.1", "80");
        expect_report(&o, "connect 1.1.1.1:80: socket ok, connect ENETUNREACH");

        /* The control: a helper that serves TCP keeps the host's network, and the probe can tell. */
        RUN_WITH(&host, &o, "connect", "127.0.0.1", port);
        expect_report(&o, fmt("connect 127.0.0.1:%s: socket ok, connect ok", port));
}

/* A client-only helper in the host's network (the URL probes) connects but never serves. */
static void test_client_only_cannot_listen(void) {
        ProbeOptions host = { .host_network = true }, client = { .host_network = true, .client_only = true };
        Outcome o;

        RUN_WITH(&host, &o, "listen");
        expect_report(&o, "survived listen: ok");
        RUN_WITH(&client, &o, "listen");
        expect_killed(&o, SIGSYS, NULL);
}

static void test_ptrace_killed(void) {
        Outcome o;

        RUN(&o, "ptrace-traceme");
        expect_killed(&o, SIGSYS, NULL);
        RUN(&o, "ptrace-parent");
#ifdef BLOCKSTREAM_SANITIZER_BUILD
        /* LeakSanitizer needs PTRACE_ATTACH (sandbox.c): the kernel still refuses it on anybody
         * else's process. */
        if (o.r < 0 || o.timed_out || !WIFEXITED(o.status) || WEXITSTATUS(o.status) != 0 ||
                strncmp(o.report, "survived ptrace(PTRACE_ATTACH, ", 31) != 0 || strlen(o.report) < 8 ||
                !streq(o.report + strlen(o.report) - 8, "): EPERM"))
                TAP_FAIL("expected ptrace(PTRACE_ATTACH) refused with EPERM, got: %s", describe(&o));
#else
        expect_killed(&o, SIGSYS, NULL);
#endif
}

static void test_mount_killed(void) {
        Outcome o;

        RUN(&o, "mount");
        expect_killed(&o, SIGSYS, NULL);
}

static void test_unshare_killed(void) {
        Outcome o;

        RUN(&o, "unshare-user");
        expect_killed(&o, SIGSYS, NULL);
}

static void test_setuid_killed(void) {
        Outcome o;

        RUN(&o, "setuid");
        expect_killed(&o, SIGSYS, NULL);
}

static void test_writes_outside_refused(void) {
        const char *refused[] = { "/bst-probe", "/usr/bst-probe", "/etc/bst-probe", "/var/bst-probe", NULL };
        ProbeOptions writer = { .max_file_size = 4096 }; /* a helper that may write files at all */
        const char *mine;
        struct stat st;
        Outcome o;

        for (size_t i = 0; refused[i]; i++) {
                RUN(&o, "write", refused[i]);
                expect_report(&o, fmt("write %s: EROFS", refused[i]));
                ASSERT_TRUE(access(refused[i], F_OK) < 0);
        }
        /* Next to the runtime dir, in what leads to it. */
        RUN(&o, "write", fmt("%s/bst-probe", base));
        expect_report(&o, fmt("write %s/bst-probe: EROFS", base));
        /* /dev is a tmpfs of its own: read-only to the helper's uid (root's 0755). */
        RUN(&o, "write", "/dev/bst-probe");
        expect_report(&o, "write /dev/bst-probe: EACCES");

        /* Its private /tmp and its runtime dir are writable; the runtime dir is the real one. */
        RUN_WITH(&writer, &o, "write", "/tmp/bst-probe");
        expect_report(&o, "write /tmp/bst-probe: ok");
        mine = fmt("%s/bst-probe", rundir);
        RUN_WITH(&writer, &o, "write", mine);
        expect_report(&o, fmt("write %s: ok", mine));
        ASSERT_TRUE(stat(mine, &st) == 0 && st.st_uid == helper_uid && st.st_gid == helper_uid);
        (void) unlink(mine);
}

/* A mount below /usr is as read-only as /usr itself (a bind remount only changes the top mount). */
static void test_usr_submounts_read_only(void) {
        ProbeOptions writer = { .max_file_size = 4096 };
        const char *target = fmt("%s/bst-probe", usr_submount);
        Outcome o;

        /* The control: outside, the submount is writable to anybody. */
        ASSERT_TRUE(access(usr_submount, W_OK) == 0);
        RUN_WITH(&writer, &o, "write", target);
        expect_report(&o, fmt("write %s: EROFS", target));
        ASSERT_TRUE(access(target, F_OK) < 0);
        (void) unlink(target);
}

static void test_rlimits(void) {
#ifdef BLOCKSTREAM_SANITIZER_BUILD
        const char *as_default = "inf/inf", *as_qemu = "inf/inf"; /* ASan's shadow memory: see sandbox.c */
#else
        const char *as_default = fmt("%" PRIu64 "/%" PRIu64, SANDBOX_ADDRESS_SPACE_DEFAULT, SANDBOX_ADDRESS_SPACE_DEFAULT);
        const char *as_qemu = fmt("%" PRIu64 "/%" PRIu64, SANDBOX_ADDRESS_SPACE_QEMU, SANDBOX_ADDRESS_SPACE_QEMU);
#endif
        ProbeOptions qemu = { .max_address_space = SANDBOX_ADDRESS_SPACE_QEMU, .max_file_size = SANDBOX_LIMIT_NONE };
        ProbeOptions writer = { .max_file_size = 4096 };
        Outcome o;

        /* Our own helpers: a bounded address space, no file to write. */
        RUN(&o, "limits");
        expect_report(&o, fmt("AS=%s DATA=inf/inf FSIZE=0/0", as_default));
        /* QEMU's: more room, and the storage helper writes its images. */
        RUN_WITH(&qemu, &o, "limits");
        expect_report(&o, fmt("AS=%s DATA=inf/inf FSIZE=inf/inf", as_qemu));
        RUN_WITH(&writer, &o, "limits");
        expect_report(&o, fmt("AS=%s DATA=inf/inf FSIZE=4096/4096", as_default));
        /* A helper without file writes dies on its first byte into a file, even in its own /tmp. */
        RUN(&o, "write", "/tmp/bst-probe");
        expect_killed(&o, SIGXFSZ, NULL);
}

static void test_io_uring_denied(void) {
        Outcome o;

        /* Not killed (QEMU probes it and falls back to epoll), but never there. */
        RUN(&o, "io_uring");
        expect_report(&o, "io_uring_setup: ENOSYS");
}

static void test_exec_under_allowlist_killed(void) {
        Outcome o;

        /* The control: the deny-list lets a helper exec (QEMU's own binaries need that). */
        RUN(&o, "exec", "/usr/bin/true");
        expect_report(&o, "exec /usr/bin/true");
        /* Our helpers' allow-list has no execve: the exec kills. */
        RUN(&o, "exec-allowlist", "/usr/bin/true");
        expect_killed(&o, SIGSYS, "allow-list installed, exec /usr/bin/true");
}

static void test_no_core_dump(void) {
        const char *dir = fmt("%s/core", rundir);
        ProbeOptions po = { .runtime_dir = dir };
        struct dirent *de;
        unsigned entries = 0;
        DIR *d;
        Outcome o;

        ASSERT_TRUE(mkdir(dir, 0755) == 0 || errno == EEXIST);
        ASSERT_TRUE(chown(dir, helper_uid, helper_uid) == 0);
        RUN_WITH(&po, &o, "core", dir);
        /* RLIMIT_CORE 0 and unraisable; the process is dumpable, so the limit is what stops a core. */
        expect_killed(&o, SIGSEGV, fmt("RLIMIT_CORE soft=0 hard=0, raise EPERM, dumpable=1, chdir %s: ok", dir));
        if (WIFSIGNALED(o.status))
                ASSERT_FALSE(WCOREDUMP(o.status));
        /* Its cwd (the runtime dir) has no core file, nor anything else. */
        d = opendir(dir);
        ASSERT_NOT_NULL(d);
        while (d && (de = readdir(d)))
                if (strcmp(de->d_name, ".") != 0 && strcmp(de->d_name, "..") != 0) {
                        TAP_FAIL("%s/%s appeared", dir, de->d_name);
                        entries++;
                }
        if (d)
                closedir(d);
        ASSERT_EQ(entries, 0);
        d = opendir(rundir);
        while (d && (de = readdir(d)))
                if (strncmp(de->d_name, "core", 4) == 0 && strcmp(de->d_name, "core") != 0)
                        TAP_FAIL("%s/%s appeared", rundir, de->d_name);
        if (d)
                closedir(d);
}

static void test_capabilities_and_ids(void) {
        const char *zero = "0000000000000000";
        Outcome o;

        RUN(&o, "status");
        expect_report(&o, fmt("Uid=%u,%u,%u,%u Gid=%u,%u,%u,%u Groups= CapInh=%s CapPrm=%s CapEff=%s CapBnd=%s CapAmb=%s "
                              "NoNewPrivs=1 Seccomp=2",
                helper_uid, helper_uid, helper_uid, helper_uid, helper_uid, helper_uid, helper_uid, helper_uid, zero, zero,
                zero, zero, zero));

        /* Another guest's identity is used as given, too. */
        RUN_WITH(&(ProbeOptions) { .uid = other_uid }, &o, "status");
        expect_report(&o, fmt("Uid=%u,%u,%u,%u Gid=%u,%u,%u,%u Groups= CapInh=%s CapPrm=%s CapEff=%s CapBnd=%s CapAmb=%s "
                              "NoNewPrivs=1 Seccomp=2",
                other_uid, other_uid, other_uid, other_uid, other_uid, other_uid, other_uid, other_uid, zero, zero, zero,
                zero, zero));
}

static void test_only_given_fds(void) {
        _cleanup_close_ int a = -1, b = -1, c = -1, d = -1;
        Outcome o;

        /* Stray fds of the spawner, inheritable ones included, low and high. */
        a = open("/etc/hostname", O_RDONLY); /* no O_CLOEXEC */
        ASSERT_TRUE(a >= 0);
        b = fcntl(a, F_DUPFD, 42);
        c = fcntl(a, F_DUPFD, 200);
        d = fcntl(a, F_DUPFD_CLOEXEC, 900);
        ASSERT_TRUE(b >= 42 && c >= 200 && d >= 900);
        RUN(&o, "fds");
        expect_report(&o, "fds: 0 1 2 3");
        /* Two fds given: 3 and 4, nothing else. */
        {
                _cleanup_close_ int exec_fd = open(probe, O_PATH | O_CLOEXEC);
                char *argv[] = { (char *) "sandbox-probe", (char *) "fds", NULL };
                int p[2], fds[2];
                pid_t pid;
                int r;

                ASSERT_TRUE(pipe2(p, O_CLOEXEC) == 0);
                fds[0] = p[1];
                fds[1] = c;
                r = sandbox_spawn(&(SandboxSpec) { .name = "probe", .uid = helper_uid, .gid = helper_uid, .runtime_dir = rundir,
                                          .fds = fds, .n_fds = 2, .argv = argv, .exec_fd = exec_fd },
                        &pid);
                ASSERT_OK(r);
                close(p[1]);
                memset(&o, 0, sizeof(o));
                o.pid = r < 0 ? -1 : pid;
                if (r < 0) {
                        close(p[0]);
                        o.r = r;
                } else
                        finish_probe(p[0], &o);
                expect_report(&o, "fds: 0 1 2 3 4");
        }
}

static void test_proc_shows_own_processes_only(void) {
        ProbeOptions other = { .uid = other_uid };
        Outcome o, sleeper;
        int rfd;
        char *visible;

        /* Another guest's helper runs meanwhile. */
        rfd = spawn_probe(&other, (const char *const[]) { "sleep", NULL }, &sleeper);
        ASSERT_TRUE(rfd >= 0);
        {
                char buf[128] = "";
                struct pollfd p = { .fd = rfd, .events = POLLIN };
                if (rfd >= 0 && poll(&p, 1, PROBE_TIMEOUT_MS) == 1)
                        (void) !read(rfd, buf, sizeof(buf) - 1);
                ASSERT_TRUE(strncmp(buf, "sleeping ", 9) == 0);
        }

        RUN(&o, "procs");
        visible = strstr(o.report, " visible=");
        if (!visible || o.r < 0)
                TAP_FAIL("no process list: %s", describe(&o));
        else {
                /* Exactly itself. */
                char expect[64];
                snprintf(expect, sizeof(expect), " visible=%d", (int) o.pid);
                if (strcmp(visible, expect) != 0)
                        TAP_FAIL("/proc lists more than the probe itself (pid %d): %s", (int) o.pid, describe(&o));
        }
        RUN(&o, "open", "/proc/1/status");
        expect_report(&o, "open /proc/1/status: ENOENT");
        RUN(&o, "open", fmt("/proc/%d/status", (int) getpid()));
        expect_report(&o, fmt("open /proc/%d/status: ENOENT", (int) getpid()));
        if (sleeper.pid > 0) {
                RUN(&o, "open", fmt("/proc/%d/status", (int) sleeper.pid));
                expect_report(&o, fmt("open /proc/%d/status: ENOENT", (int) sleeper.pid));
                /* No /proc/sys either. */
                RUN(&o, "list", "/proc/sys");
                expect_report(&o, "list /proc/sys: ENOENT");
                (void) kill(sleeper.pid, SIGKILL);
                (void) waitpid(sleeper.pid, NULL, 0);
        }
        if (rfd >= 0)
                close(rfd);
}

static void pdeathsig_case(bool own_pids) {
        int pid_pipe[2], go_pipe[2], report[2];
        pid_t middle, helper = -1;
        char buf[128] = "";
        int status = 0;
        bool died = false;

        /* We are the subreaper (main): the orphaned helper comes to us and can be reaped here. */
        ASSERT_TRUE(pipe2(pid_pipe, O_CLOEXEC) == 0 && pipe2(go_pipe, O_CLOEXEC) == 0 && pipe2(report, O_CLOEXEC) == 0);
        middle = fork();
        ASSERT_TRUE(middle >= 0);
        if (middle == 0) {
                _cleanup_close_ int exec_fd = open(probe, O_PATH | O_CLOEXEC);
                char *argv[] = { (char *) "sandbox-probe", (char *) "sleep", NULL };
                int fds[1] = { report[1] };
                pid_t pid = -1;
                char c;

                close(go_pipe[1]);
                close(pid_pipe[0]);
                close(report[0]);
                if (sandbox_spawn(&(SandboxSpec) { .name = "probe", .uid = helper_uid, .gid = helper_uid,
                                          .runtime_dir = rundir, .fds = fds, .n_fds = 1, .argv = argv, .exec_fd = exec_fd,
                                          .own_pids = own_pids },
                            &pid) < 0)
                        _exit(1);
                (void) !write(pid_pipe[1], &pid, sizeof(pid));
                (void) !read(go_pipe[0], &c, 1);
                _exit(0); /* the spawner dies, without killing anything itself */
        }
        close(pid_pipe[1]);
        close(go_pipe[0]);
        close(report[1]);
        if (read(pid_pipe[0], &helper, sizeof(helper)) != sizeof(helper))
                helper = -1;
        close(pid_pipe[0]);
        ASSERT_TRUE(helper > 0);
        {
                struct pollfd p = { .fd = report[0], .events = POLLIN };
                if (poll(&p, 1, PROBE_TIMEOUT_MS) == 1)
                        (void) !read(report[0], buf, sizeof(buf) - 1);
        }
        ASSERT_TRUE(strncmp(buf, "sleeping ", 9) == 0);
        close(go_pipe[1]); /* go */
        ASSERT_TRUE(waitpid(middle, &status, 0) == middle && WIFEXITED(status) && WEXITSTATUS(status) == 0);

        for (int i = 0; helper > 0 && i < 500 && !died; i++) {
                pid_t r = waitpid(helper, &status, WNOHANG);
                if (r == helper)
                        died = true;
                else
                        usleep(10000);
        }
        if (!died) {
                TAP_FAIL("the helper (pid %d) outlived its spawner by 5 s", (int) helper);
                if (helper > 0) {
                        (void) kill(helper, SIGKILL);
                        (void) waitpid(helper, NULL, 0);
                }
        } else if (!WIFSIGNALED(status) || WTERMSIG(status) != SIGKILL)
                TAP_FAIL("the helper ended with status 0x%x, expected SIGKILL", status);
        close(report[0]);
}

static void test_pdeathsig(void) {
        pdeathsig_case(false);
}

/* PID 1 of its own namespace (the URL probes): its parent has no pid there, and it still dies
 * with it. */
static void test_pdeathsig_own_pids(void) {
        pdeathsig_case(true);
}

/* -- SELinux labels, computed and applied as where SELinux is on (it is off on the test machines) */

#define FAKE_CONTEXT "system_u:system_r:blockstreamd_t:s0-s0:c0.c1023"
#define LABEL_FD 4 /* in the child: the second fd given, where record_label() writes */

/* Stands in for setexeccon() in the child, fds in place: the label goes to the test. */
static int record_label(const char *label) {
        size_t n = strlen(label);
        return write(LABEL_FD, label, n) == (ssize_t) n ? 0 : -EIO;
}

static void test_selinux_label_from_context(void) {
        _cleanup_free_ char *l = NULL;

        ASSERT_OK(sandbox_selinux_label_from_context(FAKE_CONTEXT, "blockstream_helper_t", "s0:c3,c700", &l));
        ASSERT_STREQ(l, "system_u:system_r:blockstream_helper_t:s0:c3,c700");
        l = mfree(l);
        ASSERT_OK(sandbox_selinux_label_from_context("unconfined_u:unconfined_r:unconfined_t:s0", "t_t", "s0", &l));
        ASSERT_STREQ(l, "unconfined_u:unconfined_r:t_t:s0");
        l = mfree(l);
        /* Not a context, or parts that would make another label. */
        ASSERT_ERRNO(sandbox_selinux_label_from_context("system_u", "t_t", "s0", &l), -EINVAL);
        ASSERT_ERRNO(sandbox_selinux_label_from_context("::t:s0", "t_t", "s0", &l), -EINVAL);
        ASSERT_ERRNO(sandbox_selinux_label_from_context(FAKE_CONTEXT, "t_t:s0", "s0", &l), -EINVAL);
        ASSERT_ERRNO(sandbox_selinux_label_from_context(FAKE_CONTEXT, "t_t", "s0 c1", &l), -EINVAL);
        ASSERT_ERRNO(sandbox_selinux_label_from_context(FAKE_CONTEXT, "", "s0", &l), -EINVAL);
        ASSERT_NULL(l);
}

/* Serve the guest's Guest interface on one end of a socketpair (in a child) and read its
 * SandboxLabel property through sd-bus from the other, as any client does. */
static int get_sandbox_label(Guest *g, char **ret) {
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *client = NULL;
        sd_bus_error error = SD_BUS_ERROR_NULL;
        sd_id128_t id;
        int pair[2], status, r;
        pid_t pid;

        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) < 0)
                return -errno;
        pid = fork();
        if (pid < 0)
                return -errno;
        if (pid == 0) {
                sd_bus *server = NULL;

                close(pair[0]);
                if (sd_id128_randomize(&id) < 0 || sd_bus_new(&server) < 0 || sd_bus_set_fd(server, pair[1], pair[1]) < 0 ||
                        sd_bus_set_server(server, 1, id) < 0 ||
                        sd_bus_add_object_vtable(server, NULL, "/org/blockstream1/guest/label", "org.blockstream1.Guest",
                                guest_vtable, g) < 0 ||
                        sd_bus_start(server) < 0)
                        _exit(1);
                for (;;) {
                        r = sd_bus_process(server, NULL);
                        if (r < 0)
                                _exit(0); /* the client went */
                        if (r == 0 && sd_bus_wait(server, 10 * USEC_PER_SEC) <= 0)
                                _exit(2);
                }
        }
        close(pair[1]);
        r = sd_bus_new(&client);
        if (r >= 0)
                r = sd_bus_set_fd(client, pair[0], pair[0]);
        else
                close(pair[0]);
        if (r >= 0)
                r = sd_bus_start(client);
        if (r >= 0)
                r = sd_bus_get_property_string(client, NULL, "/org/blockstream1/guest/label", "org.blockstream1.Guest",
                        "SandboxLabel", &error, ret);
        if (r < 0)
                fprintf(stderr, "# Get SandboxLabel: %s\n", error.message ?: strerror(-r));
        sd_bus_error_free(&error);
        client = sd_bus_flush_close_unref(client);
        (void) waitpid(pid, &status, 0);
        return r;
}

/* Where SELinux is on, the guest's SandboxLabel is exactly the label its helpers are given and the
 * spawn applies: the guest's own MCS pair, with the helper type. */
static void test_sandbox_label_is_the_applied_label(void) {
        _cleanup_close_ int exec_fd = open(probe, O_PATH | O_CLOEXEC);
        _cleanup_free_ char *property = NULL, *expect = NULL;
        char *argv[] = { (char *) "sandbox-probe", (char *) "status", NULL };
        char applied[512] = "";
        Manager m = {};
        Guest g = {
                .engine = &m.engine, .name = (char *) "label", .helper_uid = helper_uid, .mcs_c1 = 17, .mcs_c2 = 900
        };
        int report[2], labels[2];
        Outcome o = {};
        pid_t pid = -1;

        config_init(&m.engine.config);
        sandbox_selinux_test_override(FAKE_CONTEXT, record_label);
        ASSERT_TRUE(sandbox_selinux_enabled());
        ASSERT_EQ(manager_identity_labels(&m, &g), 1);
        expect = strdup_printf("system_u:system_r:%s:s0:c17,c900", config_selinux_helper_type(&m.engine.config));
        ASSERT_STREQ(g.selinux_process_label, expect);

        /* What a client reads... */
        ASSERT_OK(get_sandbox_label(&g, &property));
        ASSERT_STREQ(property, expect);

        /* ...is what the spawn applies, given the guest's label as the storage helper and the pull
         * helper get it. */
        ASSERT_TRUE(pipe2(report, O_CLOEXEC) == 0 && pipe2(labels, O_CLOEXEC) == 0);
        ASSERT_OK(sandbox_spawn(&(SandboxSpec) { .name = "probe", .uid = helper_uid, .gid = helper_uid, .runtime_dir = rundir,
                                        .selinux_label = g.selinux_process_label, .fds = (int[]) { report[1], labels[1] },
                                        .n_fds = 2, .argv = argv, .exec_fd = exec_fd },
                &pid));
        close(report[1]);
        close(labels[1]);
        o.pid = pid;
        if (pid > 0)
                finish_probe(report[0], &o);
        else
                close(report[0]);
        ASSERT_TRUE(read_all(labels[0], applied, sizeof(applied), PROBE_TIMEOUT_MS));
        close(labels[0]);
        ASSERT_STREQ(applied, property);
        ASSERT_TRUE(o.r == 0 && !o.timed_out && WIFEXITED(o.status) && WEXITSTATUS(o.status) == 0);

        /* SELinux off: no label, and the property says so. */
        sandbox_selinux_test_override(NULL, NULL);
        if (!sandbox_selinux_enabled()) {
                property = mfree(property);
                ASSERT_EQ(manager_identity_labels(&m, &g), 0);
                ASSERT_NULL(g.selinux_process_label);
                ASSERT_OK(get_sandbox_label(&g, &property));
                ASSERT_STREQ(property, "");
        }
        free(g.selinux_process_label);
        free(g.selinux_image_label);
        config_done(&m.engine.config);
}

static void test_never_as_root(void) {
        char *argv[] = { (char *) "sandbox-probe", (char *) "status", NULL };
        _cleanup_close_ int exec_fd = open(probe, O_PATH | O_CLOEXEC);
        pid_t pid = -1;

        ASSERT_ERRNO(sandbox_spawn(&(SandboxSpec) { .name = "root", .uid = 0, .gid = 0, .argv = argv, .exec_fd = exec_fd }, &pid),
                -EPERM);
        ASSERT_ERRNO(sandbox_spawn(&(SandboxSpec) { .name = "root", .uid = helper_uid, .gid = 0, .argv = argv, .exec_fd = exec_fd },
                             &pid),
                -EPERM);
        ASSERT_EQ(pid, -1);
}

/* -- setup */

static bool uid_free(uid_t uid) {
        return !getpwuid(uid);
}

/* A private mount namespace for this test, with a writable tmpfs below /usr that nobody else sees. */
static int setup_usr_submount(void) {
        static const char *const candidates[] = { "/usr/src", "/usr/games", "/usr/local/src", "/usr/local" };

        if (unshare(CLONE_NEWNS) < 0 || mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
                return -errno;
        for (size_t i = 0; i < ELEMENTSOF(candidates); i++) {
                struct stat st;

                if (stat(candidates[i], &st) < 0 || !S_ISDIR(st.st_mode))
                        continue;
                if (mount("tmpfs", candidates[i], "tmpfs", MS_NOSUID | MS_NODEV, "mode=0777,size=1m") < 0)
                        return -errno;
                usr_submount = candidates[i];
                return 0;
        }
        return -ENOENT;
}

static int setup(void) {
        int fd;
        int r;

        r = setup_usr_submount();
        if (r < 0)
                return r;

        probe = getenv("SANDBOX_PROBE");
        if (!probe || access(probe, X_OK) < 0) {
                fprintf(stderr, "# $SANDBOX_PROBE (%s) is not an executable sandbox-probe\n", probe ?: "unset");
                return -ENOENT;
        }
        while (!uid_free(helper_uid))
                helper_uid++;
        other_uid = helper_uid + 1;
        while (!uid_free(other_uid))
                other_uid++;

        strcpy(base, "/var/tmp/bst-sandbox-XXXXXX");
        if (!mkdtemp(base))
                return -errno;
        (void) chmod(base, 0755);
        snprintf(images, sizeof(images), "%s/images", base);
        snprintf(other_image, sizeof(other_image), "%s/other-guest.qcow2", images);
        snprintf(rundir, sizeof(rundir), "%s/run", base);
        if (mkdir(images, 0755) < 0 || mkdir(rundir, 0755) < 0 || chown(rundir, helper_uid, helper_uid) < 0)
                return -errno;
        fd = open(other_image, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (fd < 0)
                return -errno;
        (void) !write(fd, "QFI\xfb another guest's disk\n", 26);
        close(fd);
        return 0;
}

static void cleanup(void) {
        if (base[0]) {
                char cmd[PATH_MAX + 32];
                snprintf(cmd, sizeof(cmd), "rm -rf '%s'", base);
                (void) !system(cmd);
        }
}

/* meson's timeout (SIGTERM) or our own watchdog: leave nothing behind in /var/tmp. */
static void on_fatal_signal(int sig) {
        static const char msg[] = "Bail out! killed by a signal (timeout?)\n";
        (void) !write(STDOUT_FILENO, msg, sizeof(msg) - 1);
        cleanup();
        _exit(1);
}

int main(int argc, char **argv) {
        int r;

        tap_init(argc, argv);
        if (geteuid() != 0) {
                printf("1..0 # SKIP the sandbox needs root (uid changes, namespaces)\n");
                return 0;
        }
        /* Orphans of test_pdeathsig come to us. */
        if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) < 0) {
                printf("Bail out! PR_SET_CHILD_SUBREAPER: %s\n", strerror(errno));
                return 1;
        }
        /* The daemon's umask (blockstreamd.service's UMask=, and main.c): the sandbox's view must
         * not depend on a permissive one. */
        umask(0077);
        signal(SIGTERM, on_fatal_signal);
        signal(SIGINT, on_fatal_signal);
        signal(SIGALRM, on_fatal_signal);
        alarm(100); /* meson's timeout is 120 s */
        r = setup();
        if (r < 0) {
                printf("Bail out! setup failed: %s\n", strerror(-r));
                cleanup();
                return 1;
        }

        TAP_RUN(test_other_guest_image_invisible);
        TAP_RUN(test_home_and_root_invisible);
        TAP_RUN(test_etc_shadow_invisible);
        TAP_RUN(test_host_network_sees_name_service_files);
        TAP_RUN(test_no_network);
        TAP_RUN(test_client_only_cannot_listen);
        TAP_RUN(test_ptrace_killed);
        TAP_RUN(test_mount_killed);
        TAP_RUN(test_unshare_killed);
        TAP_RUN(test_setuid_killed);
        TAP_RUN(test_writes_outside_refused);
        TAP_RUN(test_usr_submounts_read_only);
        TAP_RUN(test_rlimits);
        TAP_RUN(test_io_uring_denied);
        TAP_RUN(test_exec_under_allowlist_killed);
        TAP_RUN(test_no_core_dump);
        TAP_RUN(test_capabilities_and_ids);
        TAP_RUN(test_only_given_fds);
        TAP_RUN(test_proc_shows_own_processes_only);
        TAP_RUN(test_pdeathsig);
        TAP_RUN(test_pdeathsig_own_pids);
        TAP_RUN(test_never_as_root);
        TAP_RUN(test_selinux_label_from_context);
        TAP_RUN(test_sandbox_label_is_the_applied_label);

        cleanup();
        return tap_finish();
}
