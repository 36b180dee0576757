/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* service/helper.c, the one way the daemon starts and stops a child: real children through the
 * real sandbox (this very binary, exec'd by fd in a child mode), their fds, their log, their exit
 * reported through the child source, SIGTERM then SIGKILL, and nothing left behind (no zombie, no
 * fd). Needs root (the sandbox changes uid): a TAP skip without. No check depends on timing: each
 * waits for the real event, bounded by a deadline that only turns a hang into a failure. */

#include <dirent.h>
#include <fcntl.h>
#include <pwd.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "helper.h"
#include "tap.h"

#define WAIT_LIMIT_USEC (30 * USEC_PER_SEC) /* a hang, not a timing check */

static uid_t helper_uid = 2147300000; /* "some unused uid" (checked in main) */
static int self_fd = -1;              /* this binary, exec'd by the children */

/* Child modes (argv[1]); fd 3 is the data fd (a pipe to the test), fd 4 the control socket. */

static void say(const char *s) {
        (void) !write(3, s, strlen(s));
}

static bool exit_on_term;

static void on_term(int sig) {
        say("term\n");
        if (exit_on_term)
                _exit(0);
}

static int child_main(const char *mode) {
        char buf[64];

        if (streq(mode, "--child=exit7")) {
                /* Its control socket works both ways, its stderr reaches our log. */
                ssize_t n = read(4, buf, sizeof(buf) - 1);
                if (n <= 0)
                        return 1;
                buf[n] = 0;
                if (send(4, buf, (size_t) n, 0) != n)
                        return 1;
                fprintf(stderr, "hello from the child's stderr\nsecond line\n");
                say("data\n");
                return 7;
        }
        if (streq(mode, "--child=fds")) {
                /* Which fds it has: exactly 0-4 and the one opendir() uses. */
                DIR *d = opendir("/proc/self/fd");
                struct dirent *de;
                char list[256] = "";
                if (!d)
                        return 1;
                while ((de = readdir(d)))
                        if (de->d_name[0] != '.' && atoi(de->d_name) != dirfd(d) &&
                                strlen(list) + strlen(de->d_name) + 2 < sizeof(list)) {
                                strcat(list, de->d_name);
                                strcat(list, " ");
                        }
                closedir(d);
                strcat(list, "\n");
                say(list);
                return 0;
        }
        if (streq(mode, "--child=term-noted") || streq(mode, "--child=term-ignored")) {
                /* Says "term" on SIGTERM; "noted" then exits, "ignored" goes on (and needs SIGKILL). */
                struct sigaction sa = {.sa_handler = on_term};
                exit_on_term = streq(mode, "--child=term-noted");
                if (sigaction(SIGTERM, &sa, NULL) < 0)
                        return 1;
                say("ready\n");
                for (;;)
                        if (read(4, buf, sizeof(buf)) == 0)
                                pause();
        }
        if (streq(mode, "--child=block")) {
                say("ready\n");
                for (;;)
                        if (read(4, buf, sizeof(buf)) == 0)
                                pause();
        }
        return 2;
}

/* What the owner's exit handler saw. */
typedef struct Exit {
        unsigned calls;
        int code;
        int status;
} Exit;

static int on_exit_cb(sd_event_source *s, const siginfo_t *si, void *userdata) {
        Exit *x = userdata;

        x->calls++;
        x->code = si->si_code;
        x->status = si->si_status;
        return 0;
}

/* Run the loop until *calls is non-zero (bounded). */
static void wait_for(sd_event *e, const unsigned *calls) {
        usec_t end = now_usec(CLOCK_MONOTONIC) + WAIT_LIMIT_USEC;

        while (*calls == 0 && now_usec(CLOCK_MONOTONIC) < end)
                (void) sd_event_run(e, 100 * USEC_PER_MSEC);
        ASSERT_TRUE(*calls > 0);
}

/* Read one line the child wrote to the data pipe (blocking, bounded by the child's own end). */
static void read_line(int fd, char *buf, size_t size) {
        size_t n = 0;

        while (n + 1 < size) {
                ssize_t k = read(fd, buf + n, 1);
                if (k <= 0 || buf[n] == '\n')
                        break;
                n++;
        }
        buf[n] = 0;
}

static bool reaped(pid_t pid) {
        return waitpid(pid, NULL, WNOHANG) < 0 && errno == ECHILD;
}

/* One child of this binary, started through helper_start(), and what it is wired to. */
typedef struct Child {
        sd_event *e;
        sd_event_source *child;
        HelperLog *log;
        int control; /* our end of its control socket (its fd 4) */
        int data;    /* the read end of a pipe that is its fd 3 */
        pid_t pid;
        Exit x;
} Child;

static int child_start(Child *c, const char *mode, const char *log_prefix) {
        char *argv[] = {(char *) "test-helper", (char *) mode, NULL};
        int p[2], r;

        *c = (Child){.control = -1, .data = -1};
        r = sd_event_new(&c->e);
        if (r < 0)
                return r;
        if (pipe2(p, O_CLOEXEC) < 0)
                return -errno;
        r = helper_start(c->e,
                &(HelperSpec){
                        .sandbox =
                                {
                                        .name = "test",
                                        .uid = helper_uid,
                                        .gid = helper_uid,
                                        .fds = &p[1],
                                        .n_fds = 1,
                                        .argv = argv,
                                        .exec_fd = self_fd,
                                        /* In the sanitizer build the child is sanitized too: LeakSanitizer's
                                         * exit check would ptrace, which the sandbox denies. */
                                        .env = (char *[]){(char *) "ASAN_OPTIONS=detect_leaks=0", NULL},
                                },
                        .control_type = SOCK_SEQPACKET,
                        .log_prefix = log_prefix,
                        .on_exit = on_exit_cb,
                        .userdata = &c->x,
                },
                &c->pid, &c->child, &c->control, &c->log);
        close(p[1]);
        if (r < 0) {
                close(p[0]);
                return r;
        }
        c->data = p[0];
        return 0;
}

/* It said "ready" on its data pipe: its signal handlers are in place. */
static void child_wait_ready(Child *c) {
        char buf[64];

        read_line(c->data, buf, sizeof(buf));
        ASSERT_STREQ(buf, "ready");
}

/* Its exit came through the callback, once, as code/status, and sd-event reaped it. */
static void child_check_end(Child *c, int code, int status) {
        wait_for(c->e, &c->x.calls);
        ASSERT_EQ(c->x.calls, 1);
        ASSERT_EQ(c->x.code, code);
        ASSERT_EQ(c->x.status, status);
        (void) sd_event_run(c->e, 0);
        ASSERT_TRUE(reaped(c->pid));
}

static void child_free(Child *c) {
        c->child = helper_release(c->child);
        c->log = helper_log_free(c->log);
        closep(&c->control);
        closep(&c->data);
        c->e = sd_event_unref(c->e);
}

static void test_start_fds_log_exit(void) {
        int memfd, saved_stderr;
        unsigned fds_before = count_fds();
        char buf[4096];
        ssize_t n;
        Child c;

        /* Our log goes to stderr: catch it to see the child's lines arrive under the prefix. */
        memfd = memfd_create("log", MFD_CLOEXEC);
        saved_stderr = dup(STDERR_FILENO);
        ASSERT_TRUE(memfd >= 0 && saved_stderr >= 0);
        fflush(stderr);
        (void) dup2(memfd, STDERR_FILENO);

        ASSERT_OK(child_start(&c, "--child=exit7", "Test child"));
        ASSERT_TRUE(c.pid > 0);
        ASSERT_NOT_NULL(c.child);
        ASSERT_NOT_NULL(c.log);
        ASSERT_EQ(send(c.control, "ping", 4, 0), 4);
        n = recv(c.control, buf, sizeof(buf), 0);
        ASSERT_EQ(n, 4);
        read_line(c.data, buf, sizeof(buf));
        ASSERT_STREQ(buf, "data");
        child_check_end(&c, CLD_EXITED, 7);
        /* The log pipe's end comes after the exit: run until the log source saw EOF. */
        for (int i = 0; i < 100 && sd_event_run(c.e, 0) > 0; i++)
                ;

        fflush(stderr);
        (void) dup2(saved_stderr, STDERR_FILENO);
        close(saved_stderr);
        n = pread(memfd, buf, sizeof(buf) - 1, 0);
        buf[n > 0 ? n : 0] = 0;
        close(memfd);
        ASSERT_NOT_NULL(strstr(buf, "Test child: hello from the child's stderr"));
        ASSERT_NOT_NULL(strstr(buf, "Test child: second line"));

        child_free(&c);
        ASSERT_EQ(c.x.calls, 1);
        ASSERT_EQ(count_fds(), fds_before);
}

static void test_child_gets_only_its_fds(void) {
        char buf[256];
        int stray;
        Child c;

        stray = open("/dev/null", O_RDONLY); /* not close-on-exec: must not reach it all the same */
        ASSERT_OK(child_start(&c, "--child=fds", "Test fds"));
        read_line(c.data, buf, sizeof(buf));
        ASSERT_STREQ(buf, "0 1 2 3 4 ");
        child_check_end(&c, CLD_EXITED, 0);
        close(stray);
        child_free(&c);
}

/* stop: SIGTERM first; one that exits on it ends with SIGTERM, one that goes on gets SIGKILL at the
 * deadline. Both said "term", so both got the SIGTERM before anything else. */
static void stop_one(const char *mode, int expected_signal) {
        char buf[64];
        Child c;

        ASSERT_OK(child_start(&c, mode, "Test stop"));
        child_wait_ready(&c);
        /* One that exits on SIGTERM gets all the time it needs (a deadline past our own wait limit); one
         * that ignores it is killed at the deadline, however short. */
        ASSERT_OK(helper_stop(c.child, expected_signal == 0 ? 2 * WAIT_LIMIT_USEC : 50 * USEC_PER_MSEC));
        read_line(c.data, buf, sizeof(buf));
        ASSERT_STREQ(buf, "term");
        if (expected_signal == 0)
                child_check_end(&c, CLD_EXITED, 0);
        else
                child_check_end(&c, CLD_KILLED, expected_signal);
        child_free(&c);
}

static void test_stop_term_then_kill(void) {
        stop_one("--child=term-noted", 0);
        stop_one("--child=term-ignored", SIGKILL);
}

static void test_kill(void) {
        Child c;

        ASSERT_OK(child_start(&c, "--child=block", "Test kill"));
        child_wait_ready(&c);
        ASSERT_OK(helper_kill(c.child));
        child_check_end(&c, CLD_KILLED, SIGKILL);
        /* Signals after the end are no error, and reach nobody. */
        ASSERT_OK(helper_kill(c.child));
        child_free(&c);
}

/* Whether pid was reaped, without reaping it (sd-event's to do). */
static bool gone(pid_t pid) {
        siginfo_t si = {};

        return waitid(P_PID, (id_t) pid, &si, WEXITED | WNOHANG | WNOWAIT) < 0 && errno == ECHILD;
}

/* Whether pid has exited (a zombie, or reaped). */
static bool exited(pid_t pid) {
        siginfo_t si = {};

        return gone(pid) || (waitid(P_PID, (id_t) pid, &si, WEXITED | WNOHANG | WNOWAIT) == 0 && si.si_pid == pid);
}

/* The owner goes away while its child runs: killed and reaped (within the release's wait: death
 * takes milliseconds), no call back. (One stuck in the kernel is left to the loop after 1 s; no
 * test makes a child that SIGKILL cannot end at once.) */
static void test_release_running(void) {
        unsigned fds_before = count_fds();
        char buf[64];
        Child c;

        ASSERT_OK(child_start(&c, "--child=block", "Test release"));
        child_wait_ready(&c);
        ASSERT_NULL(c.child = helper_release(c.child));
        ASSERT_TRUE(gone(c.pid));
        ASSERT_EQ(read(c.data, buf, sizeof(buf)), 0); /* its end of the pipe is gone */
        (void) sd_event_run(c.e, 0);
        ASSERT_EQ(c.x.calls, 0);
        child_free(&c);
        ASSERT_EQ(count_fds(), fds_before);
}

/* Released after its exit, before the loop saw it: reaped, its source and pidfd gone (they were
 * left floating, never dispatched again, one fd each time). */
static void test_release_exited(void) {
        unsigned fds_before = count_fds();
        Child c;

        ASSERT_OK(child_start(&c, "--child=exit7", "Test release exited"));
        ASSERT_EQ(send(c.control, "x", 1, 0), 1); /* it echoes that, then exits */
        for (unsigned i = 0; i < 500 && !exited(c.pid); i++)
                (void) usleep(10000);
        ASSERT_TRUE(exited(c.pid));
        ASSERT_NULL(c.child = helper_release(c.child));
        ASSERT_TRUE(gone(c.pid));
        (void) sd_event_run(c.e, 0);
        ASSERT_EQ(c.x.calls, 0);
        child_free(&c);
        ASSERT_EQ(count_fds(), fds_before);
}

/* A binary that is not there: an error, and no child, no fd left. */
static void test_start_failure_leaves_nothing(void) {
        sd_event *e = NULL;
        sd_event_source *child = NULL;
        char *argv[] = {(char *) "/nonexistent/helper", NULL};
        unsigned fds_before = count_fds();
        int control = -1;
        Exit x = {};

        ASSERT_OK(sd_event_new(&e));
        ASSERT_NEG(helper_start(e,
                &(HelperSpec){
                        .sandbox = {.name = "test", .uid = helper_uid, .gid = helper_uid, .argv = argv, .exec_fd = -1},
                        .control_type = SOCK_SEQPACKET,
                        .log_prefix = "Test missing",
                        .on_exit = on_exit_cb,
                        .userdata = &x,
                },
                NULL, &child, &control, NULL));
        ASSERT_NULL(child);
        ASSERT_EQ(control, -1);
        ASSERT_TRUE(waitpid(-1, NULL, WNOHANG) < 0 && errno == ECHILD);
        ASSERT_ERRNO(helper_start(e, &(HelperSpec){.sandbox = {.argv = argv}}, NULL, &child, NULL, NULL), -EINVAL);
        /* A log nobody would read (its helper would die of SIGPIPE): refused before anything runs. */
        ASSERT_ERRNO(
                helper_start(e,
                        &(HelperSpec){.sandbox = {.name = "test", .uid = helper_uid, .gid = helper_uid, .argv = argv},
                                .log_prefix = "Test unread",
                                .on_exit = on_exit_cb},
                        NULL, &child, NULL, NULL),
                -EINVAL);
        sd_event_unref(e);
        ASSERT_EQ(count_fds(), fds_before);
}

static int pace_io(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        return 0;
}

/* helper_pace(): after the burst the source is turned off, and on again once a token is back; a
 * source its owner dropped meanwhile is not touched (the owner's pointer is NULL then). */
static void test_pace(void) {
        sd_event *e = NULL;
        sd_event_source *source = NULL;
        HelperPace p = {};
        int pair[2], enabled = -1;
        usec_t deadline;

        ASSERT_OK(sd_event_new(&e));
        ASSERT_OK(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair));
        ASSERT_OK(sd_event_add_io(e, &source, pair[0], EPOLLIN, pace_io, NULL));
        for (int i = 0; i < 3; i++)
                ASSERT_OK(helper_pace(&p, &source, 1000.0, 4.0));
        ASSERT_OK(sd_event_source_get_enabled(source, &enabled));
        ASSERT_EQ(enabled, SD_EVENT_ON);
        ASSERT_OK(helper_pace(&p, &source, 1000.0, 4.0)); /* the burst spent */
        ASSERT_OK(sd_event_source_get_enabled(source, &enabled));
        ASSERT_EQ(enabled, SD_EVENT_OFF);
        ASSERT_NOT_NULL(p.resume);
        deadline = now_usec(CLOCK_MONOTONIC) + WAIT_LIMIT_USEC;
        while (enabled == SD_EVENT_OFF && now_usec(CLOCK_MONOTONIC) < deadline) {
                ASSERT_OK(sd_event_run(e, 100 * USEC_PER_MSEC));
                ASSERT_OK(sd_event_source_get_enabled(source, &enabled));
        }
        ASSERT_EQ(enabled, SD_EVENT_ON);

        /* Paused again, then the owner drops its source: the resume finds nothing to turn on. */
        while (sd_event_source_get_enabled(source, &enabled) >= 0 && enabled == SD_EVENT_ON)
                ASSERT_OK(helper_pace(&p, &source, 1000.0, 4.0));
        source = sd_event_source_disable_unref(source);
        deadline = now_usec(CLOCK_MONOTONIC) + 50 * USEC_PER_MSEC;
        while (now_usec(CLOCK_MONOTONIC) < deadline)
                ASSERT_OK(sd_event_run(e, 10 * USEC_PER_MSEC));
        helper_pace_done(&p);
        ASSERT_NULL(p.resume);
        close(pair[0]);
        close(pair[1]);
        sd_event_unref(e);
}

int main(int argc, char **argv) {
        sigset_t mask;

        if (argc > 1 && strncmp(argv[1], "--child=", 8) == 0)
                return child_main(argv[1]);
        tap_init(argc, argv);
        if (geteuid() != 0) {
                printf("1..0 # SKIP the sandbox needs root (uid changes, namespaces)\n");
                return 0;
        }
        while (getpwuid(helper_uid))
                helper_uid++;
        self_fd = open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
        if (self_fd < 0) {
                printf("Bail out! cannot open /proc/self/exe: %s\n", strerror(errno));
                return 1;
        }
        /* sd-event's rule for child sources, as in main.c. */
        sigemptyset(&mask);
        sigaddset(&mask, SIGCHLD);
        sigprocmask(SIG_BLOCK, &mask, NULL);

        TAP_RUN(test_start_fds_log_exit);
        TAP_RUN(test_child_gets_only_its_fds);
        TAP_RUN(test_stop_term_then_kill);
        TAP_RUN(test_kill);
        TAP_RUN(test_release_running);
        TAP_RUN(test_release_exited);
        TAP_RUN(test_start_failure_leaves_nothing);
        TAP_RUN(test_pace);
        return tap_finish();
}
