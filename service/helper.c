/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#include "helper.h"

/* The child source's userdata: the owner's handler, and the SIGKILL deadline of a stop. */
typedef struct HelperWatch {
        sd_event_source *child; /* not a reference: the watch lives as long as the source */
        sd_event_child_handler_t on_exit;
        void *userdata;
        sd_event_source *deadline;
        char *name;
} HelperWatch;

static void watch_free(void *p) {
        HelperWatch *w = p;

        if (!w)
                return;
        sd_event_source_disable_unref(w->deadline);
        free(w->name);
        free(w);
}

static int watch_exited(sd_event_source *s, const siginfo_t *si, void *userdata) {
        HelperWatch *w = userdata;

        w->deadline = sd_event_source_disable_unref(w->deadline);
        /* sd-event reaps the zombie once this returns, also if the owner dropped s meanwhile. */
        return w->on_exit(s, si, w->userdata);
}

/* Watch pid (a child of ours, not yet reaped) with on_exit; on failure it is killed and reaped. */
static int watch(sd_event *e, pid_t pid, const char *name, sd_event_child_handler_t on_exit, void *userdata,
        sd_event_source **ret_child) {
        _cleanup_(sd_event_source_disable_unrefp) sd_event_source *s = NULL;
        HelperWatch *w;
        int r;

        w = calloc(1, sizeof(HelperWatch));
        if (!w || !(w->name = strdup(name ?: "helper"))) {
                watch_free(w);
                r = -ENOMEM;
                goto fail;
        }
        w->on_exit = on_exit;
        w->userdata = userdata;
        r = sd_event_add_child(e, &s, pid, WEXITED, watch_exited, w);
        if (r < 0) {
                watch_free(w);
                goto fail;
        }
        w->child = s;
        /* From here on the source owns both: dropping it kills and reaps the child, frees w. */
        r = sd_event_source_set_destroy_callback(s, watch_free);
        if (r < 0) {
                watch_free(w);
                (void) sd_event_source_set_userdata(s, NULL);
                goto fail;
        }
        r = sd_event_source_set_child_process_own(s, true);
        if (r < 0)
                goto fail; /* the source's end kills and reaps nothing: do it below */
        (void) sd_event_source_set_description(s, name);
        *ret_child = TAKE_PTR(s);
        return 0;
fail:
        s = sd_event_source_disable_unref(s);
        (void) kill(pid, SIGKILL);
        (void) waitpid(pid, NULL, 0);
        return log_error_errno(r, "%s: cannot watch the child (pid %i): %m", name, (int) pid);
}

int helper_open_binary(const char *dir, const char *binary) {
        _cleanup_free_ char *path = strdup_printf("%s/%s", dir, binary);
        int fd;

        if (!path)
                return -ENOMEM;
        fd = open(path, O_PATH | O_CLOEXEC);
        if (fd < 0)
                return log_error_errno(errno, "Cannot open %s: %m", path);
        return fd;
}

int helper_start(sd_event *e, const HelperSpec *spec, pid_t *ret_pid, sd_event_source **ret_child, int *ret_control,
        HelperLog **ret_log) {
        _cleanup_close_ int ours = -1, theirs = -1, log_r = -1, log_w = -1;
        _cleanup_(sd_event_source_disable_unrefp) sd_event_source *child = NULL;
        SandboxSpec sb = spec->sandbox;
        int fds[HELPER_FDS_MAX];
        pid_t pid;
        int r;

        /* A log pipe nobody reads would end the helper with SIGPIPE: ret_log goes with log_prefix. */
        if (!e || !spec->on_exit || !ret_child || (spec->control_type != 0 && !ret_control) ||
                (spec->log_prefix && !ret_log) ||
                sb.n_fds > (spec->control_type != 0 ? HELPER_FDS_MAX - 1 : HELPER_FDS_MAX) || (sb.n_fds > 0 && !sb.fds))
                return -EINVAL;
        for (size_t i = 0; i < sb.n_fds; i++)
                fds[i] = sb.fds[i];
        if (spec->control_type != 0) {
                int pair[2];
                if (socketpair(AF_UNIX, spec->control_type | SOCK_CLOEXEC, 0, pair) < 0)
                        return -errno;
                ours = pair[0];
                theirs = pair[1];
                fds[sb.n_fds++] = theirs;
        }
        sb.fds = fds;
        if (spec->log_prefix) {
                int pipefd[2];
                if (pipe2(pipefd, O_CLOEXEC) < 0)
                        return -errno;
                log_r = pipefd[0];
                log_w = pipefd[1];
                sb.stderr_fd = log_w;
        }

        r = sandbox_spawn(&sb, &pid);
        if (r < 0)
                return r;
        r = watch(e, pid, spec->log_prefix ?: sb.name, spec->on_exit, spec->userdata, &child);
        if (r < 0)
                return r;
        if (ret_log) {
                *ret_log = NULL;
                if (log_r >= 0 && helper_log_new(ret_log, e, TAKE_FD(log_r), spec->log_prefix) < 0)
                        log_warning("%s: cannot read its log.", spec->log_prefix);
        }
        if (ret_control)
                *ret_control = TAKE_FD(ours);
        if (ret_pid)
                *ret_pid = pid;
        *ret_child = TAKE_PTR(child);
        return 0;
}

static int send_signal(sd_event_source *child, int sig) {
        int r;

        r = sd_event_source_send_child_signal(child, sig, NULL, 0);
        if (r == -ESRCH)
                return 0; /* exited already: its end is on the way to the handler */
        return r;
}

static int deadline_reached(sd_event_source *s, uint64_t usec, void *userdata) {
        HelperWatch *w = userdata;

        w->deadline = sd_event_source_disable_unref(w->deadline);
        log_warning("%s: did not exit in time, killing it.", w->name);
        (void) send_signal(w->child, SIGKILL);
        return 0;
}

int helper_kill_after(sd_event_source *child, usec_t timeout) {
        HelperWatch *w;

        if (!child)
                return 0;
        w = sd_event_source_get_userdata(child);
        if (!w)
                return -EINVAL;
        if (w->deadline)
                return 0; /* an earlier deadline stands */
        return sd_event_add_time_relative(
                sd_event_source_get_event(child), &w->deadline, CLOCK_MONOTONIC, timeout, 0, deadline_reached, w);
}

int helper_stop(sd_event_source *child, usec_t timeout) {
        int r;

        if (!child)
                return 0;
        r = send_signal(child, SIGTERM);
        if (r < 0)
                return r;
        return helper_kill_after(child, timeout);
}

int helper_kill(sd_event_source *child) {
        if (!child)
                return 0;
        return send_signal(child, SIGKILL);
}

static int released_exited(sd_event_source *s, const siginfo_t *si, void *userdata) {
        /* The loop's reference, taken back (for ours) and dropped: the child has exited, so no kill
         * and no wait (sd-event reaps the zombie once this returns). */
        sd_event_source_ref(s);
        (void) sd_event_source_set_floating(s, false);
        sd_event_source_disable_unref(s);
        return 0;
}

/* How long helper_release() waits for a killed helper to be gone: it takes milliseconds, and
 * whoever comes next (the guest's own QEMU, the next storage helper) then finds the images'
 * locks free; one stuck in the kernel is left to the loop after that. */
#define RELEASE_WAIT_MSEC 1000

sd_event_source *helper_release(sd_event_source *child) {
        struct pollfd p = { .events = POLLIN };
        HelperWatch *w;

        if (!child)
                return NULL;
        w = sd_event_source_get_userdata(child);
        /* Exited already (ESRCH: its end is reported, or being reported now), or gone within the
         * wait: dropping the source reaps the zombie at once. */
        if (!w || sd_event_source_send_child_signal(child, SIGKILL, NULL, 0) < 0 ||
                (p.fd = sd_event_source_get_child_pidfd(child)) < 0 || poll(&p, 1, RELEASE_WAIT_MSEC) != 0)
                return sd_event_source_disable_unref(child);
        /* Still there: left to the loop, which reaps it once it is gone. Should that fail,
         * dropping the source waits for it, as it always did. */
        if (sd_event_source_set_floating(child, true) < 0)
                return sd_event_source_disable_unref(child);
        w->deadline = sd_event_source_disable_unref(w->deadline);
        w->on_exit = released_exited;
        w->userdata = NULL;
        return sd_event_source_unref(child);
}

/* Helper logs */

/* A helper's stderr lines reach our log at most this fast (after a burst): a helper taken over
 * could otherwise push the daemon past journald's rate limit, which drops all its messages. */
#define HELPER_LOG_LINES_PER_SEC 10.0
#define HELPER_LOG_BURST 100.0

struct HelperLog {
        sd_event_source *source;
        int fd;
        char *prefix;
        char line[512];
        size_t len;
        LogLimit limit;
};

HelperLog *helper_log_free(HelperLog *l) {
        if (!l)
                return NULL;
        sd_event_source_disable_unref(l->source);
        closep(&l->fd);
        free(l->prefix);
        free(l);
        return NULL;
}

static void helper_log_flush(HelperLog *l) {
        char text[sizeof(l->line) * 3]; /* room for a U+FFFD per byte */
        usec_t now = now_usec(CLOCK_MONOTONIC);
        uint64_t dropped;

        if (l->len > 0 && log_limit_pass(&l->limit, HELPER_LOG_LINES_PER_SEC, HELPER_LOG_BURST, now, &dropped)) {
                if (dropped > 0)
                        log_info("%s: (%" PRIu64 " lines not logged: more than %.0f a second)", l->prefix, dropped,
                                HELPER_LOG_LINES_PER_SEC);
                (void) text_sanitize_buf(text, sizeof(text), l->line, l->len);
                log_info("%s: %s", l->prefix, text);
        }
        l->len = 0;
}

static int helper_log_handler(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        HelperLog *l = userdata;
        char buf[4096];
        ssize_t n;

        n = read(fd, buf, sizeof(buf));
        if (n <= 0) {
                if (n < 0 && (errno == EAGAIN || errno == EINTR))
                        return 0;
                helper_log_flush(l);
                (void) sd_event_source_set_enabled(s, SD_EVENT_OFF);
                return 0;
        }
        for (ssize_t i = 0; i < n; i++) {
                unsigned char c = (unsigned char) buf[i];
                if (c == '\n') {
                        helper_log_flush(l);
                        continue;
                }
                if (l->len >= sizeof(l->line) - 1)
                        helper_log_flush(l);
                l->line[l->len++] = (c < 0x20 || c == 0x7f) ? ' ' : (char) c;
        }
        return 0;
}

int helper_log_new(HelperLog **ret, sd_event *e, int fd, const char *prefix) {
        HelperLog *l = calloc(1, sizeof(HelperLog));
        int r;

        if (!l) {
                closep(&fd);
                return -ENOMEM;
        }
        l->fd = fd;
        l->prefix = strdup(prefix);
        if (!l->prefix || fcntl(fd, F_SETFL, O_NONBLOCK) < 0) {
                helper_log_free(l);
                return -ENOMEM;
        }
        r = sd_event_add_io(e, &l->source, fd, EPOLLIN, helper_log_handler, l);
        if (r < 0) {
                helper_log_free(l);
                return r;
        }
        *ret = l;
        return 0;
}

static int pace_resume(sd_event_source *s, uint64_t usec, void *userdata) {
        HelperPace *p = userdata;

        if (*p->source)
                (void) sd_event_source_set_enabled(*p->source, SD_EVENT_ON);
        return 0;
}

int helper_pace(HelperPace *p, sd_event_source **source, double rate, double burst) {
        usec_t wait;
        int r;

        p->source = source;
        token_bucket_refill(&p->tokens, rate, burst, now_usec(CLOCK_MONOTONIC));
        p->tokens.tokens -= 1.0;
        if (p->tokens.tokens >= 1.0 || !*source)
                return 0;
        wait = (usec_t) ((1.0 - p->tokens.tokens) * (double) USEC_PER_SEC / rate) + 1;
        if (!p->resume)
                r = sd_event_add_time_relative(sd_event_source_get_event(*source), &p->resume, CLOCK_MONOTONIC, wait, 0,
                        pace_resume, p);
        else {
                r = sd_event_source_set_time_relative(p->resume, wait);
                if (r >= 0)
                        r = sd_event_source_set_enabled(p->resume, SD_EVENT_ONESHOT);
        }
        return r < 0 ? r : sd_event_source_set_enabled(*source, SD_EVENT_OFF);
}

void helper_pace_done(HelperPace *p) {
        p->resume = sd_event_source_disable_unref(p->resume);
}

int helper_relay_receive(int fd, HelperPace *pace, sd_event_source **source, double rate, double burst,
        char buf[static CONTROL_MESSAGE_MAX + 1], ControlRelayMessage *ret, int *ret_parse, const char **ret_why) {
        ssize_t k;

        k = recv(fd, buf, CONTROL_MESSAGE_MAX + 1, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
        if (k < 0 && (errno == EAGAIN || errno == EINTR))
                return 0;
        if (k < 0) {
                *ret_why = "the control connection to the NBD relay broke";
                return -errno;
        }
        if (k == 0) {
                *ret_why = "the NBD relay helper went away";
                return -ECONNRESET;
        }
        if (control_frame(buf, (size_t) k) < 0) {
                *ret_why = "the NBD relay helper sent a malformed message";
                return -EBADMSG;
        }
        *ret_parse = control_parse_relay(buf, ret);
        if (helper_pace(pace, source, rate, burst) < 0) {
                *ret_why = "the NBD relay helper's messages could not be paced";
                return -ENOMEM;
        }
        return 1;
}
