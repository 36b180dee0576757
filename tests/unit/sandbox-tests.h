/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* The sandbox tests' common part (test-sandbox.c, test-sandbox-label.c): spawning
 * tests/helpers/sandbox-probe through sandbox_spawn() as the daemon spawns its helpers, what it
 * reported, and the test's own scratch directories and uids. Static, like tap.h, whose counters
 * each test program keeps for itself. The probe's path comes from $SANDBOX_PROBE (meson sets it). */

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

static _unused_tap_ const char *probe;
static _unused_tap_ uid_t helper_uid = 2147400000;   /* "some unused uid" (checked in main) */
static _unused_tap_ uid_t other_uid;                 /* another guest's helper */
static _unused_tap_ char base[64];                   /* /var/tmp/bst-sandbox-XXXXXX */
static _unused_tap_ char images[128];                /* base/images: another guest's image lives here */
static _unused_tap_ char other_image[192];           /* base/images/other-guest.qcow2, root 0600 */
static _unused_tap_ char rundir[128];                /* base/run: the probe's runtime dir, owned by helper_uid */
static _unused_tap_ const char *usr_submount;        /* a tmpfs (mode 0777) mounted below /usr in our private mount namespace */

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

static _unused_tap_ int make_spec_argv(char **argv, size_t max, const char *const *args) {
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
static _unused_tap_ bool read_all(int fd, char *buf, size_t size, int timeout_ms) {
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
static _unused_tap_ int spawn_probe(const ProbeOptions *po, const char *const *args, Outcome *o) {
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

static _unused_tap_ void finish_probe(int rfd, Outcome *o) {
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

static _unused_tap_ void run_probe_with(const ProbeOptions *po, Outcome *o, const char *const *args) {
        finish_probe(spawn_probe(po, args, o), o);
}

#define RUN(o, ...) run_probe_with(NULL, (o), (const char *const[]) { __VA_ARGS__, NULL })
#define RUN_WITH(po, o, ...) run_probe_with((po), (o), (const char *const[]) { __VA_ARGS__, NULL })

static _unused_tap_ const char *describe(const Outcome *o) {
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
static _unused_tap_ void expect_report(const Outcome *o, const char *expect) {
        if (o->r < 0 || o->timed_out || !WIFEXITED(o->status) || WEXITSTATUS(o->status) != 0 ||
                strcmp(o->report, expect) != 0)
                TAP_FAIL("expected \"%s\" and exit 0, got: %s", expect, describe(o));
}

/* The probe was killed by `sig` without reporting anything (it did not survive the attempt). */
static _unused_tap_ void expect_killed(const Outcome *o, int sig, const char *expect_report_text) {
        if (o->r < 0 || o->timed_out || !WIFSIGNALED(o->status) || WTERMSIG(o->status) != sig ||
                strcmp(o->report, expect_report_text ?: "") != 0)
                TAP_FAIL("expected death by SIG%s (report \"%s\"), got: %s", sigabbrev_np(sig) ?: "?",
                        expect_report_text ?: "", describe(o));
}

static const char *fmt(const char *format, ...) _printf_(1, 2);
static _unused_tap_ const char *fmt(const char *format, ...) {
        static char ring[32][PATH_MAX + 256];
        static unsigned next;
        char *b = ring[next++ % ELEMENTSOF(ring)];
        va_list ap;

        va_start(ap, format);
        vsnprintf(b, sizeof(ring[0]), format, ap);
        va_end(ap);
        return b;
}

/* -- setup */

static _unused_tap_ bool uid_free(uid_t uid) {
        return !getpwuid(uid);
}

/* A private mount namespace for this test, with a writable tmpfs below /usr that nobody else sees. */
static _unused_tap_ int setup_usr_submount(void) {
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

static _unused_tap_ int setup(void) {
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

static _unused_tap_ void cleanup(void) {
        if (base[0]) {
                char cmd[PATH_MAX + 32];
                snprintf(cmd, sizeof(cmd), "rm -rf '%s'", base);
                (void) !system(cmd);
        }
}

/* meson's timeout (SIGTERM) or our own watchdog: leave nothing behind in /var/tmp. */
static _unused_tap_ void on_fatal_signal(int sig) {
        static const char msg[] = "Bail out! killed by a signal (timeout?)\n";
        (void) !write(STDOUT_FILENO, msg, sizeof(msg) - 1);
        cleanup();
        _exit(1);
}

/* main()'s first steps: TAP, root (a skip without), the subreaper for orphans, the daemon's umask,
 * a watchdog, setup(). Returns 1 to go on, 0 to stop with success (skipped), -1 to stop failed. */
static _unused_tap_ int sandbox_tests_begin(int argc, char **argv) {
        int r;

        tap_init(argc, argv);
        if (geteuid() != 0) {
                printf("1..0 # SKIP the sandbox needs root (uid changes, namespaces)\n");
                return 0;
        }
        /* Orphans of test_pdeathsig come to us. */
        if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) < 0) {
                printf("Bail out! PR_SET_CHILD_SUBREAPER: %s\n", strerror(errno));
                return -1;
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
                return -1;
        }
        return 1;
}
