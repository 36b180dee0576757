/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* The one way the daemon starts a child and lets it go (style.md):
 *  - helper_start(): an exec'd helper confined by sandbox_spawn(), its fds wired here once: the
 *    data fds first (3, 4, …), then the other end of a control socket of ours if asked for; its
 *    stderr into our log, line by line under a prefix (HelperLog);
 *  - it is watched by an sd-event child source, which is the handle its owner keeps: the
 *    owner's handler is called once the child exited, and the zombie is reaped after it returns;
 *  - stopped one way: helper_stop() sends SIGTERM and SIGKILL after a deadline, helper_kill()
 *    SIGKILL at once; the child source still reports the end. helper_release() SIGKILLs a child
 *    still running, without calling its owner back, and reaps it once it is gone: at once if it
 *    is gone within 1 s (as it is, in milliseconds), else by the loop later, which never waits
 *    longer (a QEMU stuck in the kernel on a hung file system dies only when that answers).
 *    sd_event_source_disable_unref() is for a source whose child has exited (in its handler).
 * Signals go through the source (a pidfd where the kernel has them): never to a recycled pid.
 * SIGCHLD must be blocked (sd-event's rule for child sources). */

#include <stdbool.h>
#include <sys/types.h>
#include <systemd/sd-event.h>

#include "control.h"
#include "sandbox.h"
#include "util.h"

/* A helper's stderr, read line by line into our log with a prefix (bounded, printable). */
typedef struct HelperLog HelperLog;
int helper_log_new(HelperLog **ret, sd_event *e, int fd, const char *prefix);
HelperLog *helper_log_free(HelperLog *l);

/* A helper's control socket read no faster than rate messages a second after burst, so that a
 * helper that floods finds its sends blocked rather than the daemon busy. Kept in the struct that
 * owns the socket's source; helper_pace_done() when that lets go of it. */
typedef struct HelperPace {
        TokenBucket tokens;
        sd_event_source **source; /* the owner's source of the socket (set by helper_pace()) */
        sd_event_source *resume;  /* armed while reading is paused */
} HelperPace;
/* Call for each message read from *source. A token is spent; none left, *source is turned off until
 * one is back (and on again then if the owner still has a source there). 0, or < 0 if it could
 * not be paced: the owner ends the helper's work. */
int helper_pace(HelperPace *p, sd_event_source **source, double rate, double burst);
void helper_pace_done(HelperPace *p);

/* One message of an NBD relay's control socket fd (blockstream-nbd-relay), framed (in buf, which
 * ret's text points into), parsed, and paced as helper_pace() does. 1: *ret has it, and
 * *ret_parse what control_parse_relay() said of its arguments; 0: nothing to read now; < 0: the
 * relay is lost, *ret_why says how (-ECONNRESET: it closed the socket). */
int helper_relay_receive(int fd, HelperPace *pace, sd_event_source **source, double rate, double burst,
        char buf[static CONTROL_MESSAGE_MAX + 1], ControlRelayMessage *ret, int *ret_parse, const char **ret_why);

#define HELPER_FDS_MAX 8

typedef struct HelperSpec {
        SandboxSpec sandbox;    /* what runs, confined how; its .fds become 3, 4, … (at most HELPER_FDS_MAX - 1) */
        int control_type;       /* SOCK_SEQPACKET or SOCK_STREAM: a socket pair, whose other end is the helper's
                                 * fd after sandbox.fds; 0: none */
        const char *log_prefix; /* its stderr into our log under this prefix (sandbox.stderr_fd is ignored then);
                                 * NULL: sandbox.stderr_fd as given */
        sd_event_child_handler_t on_exit; /* called with userdata once it exited */
        void *userdata;
} HelperSpec;

/* Start it. On success *ret_child watches it (see above); *ret_control is our end of the control
 * socket (if asked for), *ret_log its log (NULL if that could not be set up: a warning is logged,
 * the helper runs). ret_pid may be NULL, ret_control without a control socket, ret_log without a
 * log_prefix (-EINVAL otherwise). On failure -errno, and nothing is left running. */
/* The helper program binary in dir, opened O_PATH for HelperSpec's exec_fd: the fd, or -errno
 * (logged). */
int helper_open_binary(const char *dir, const char *binary);

int helper_start(sd_event *e, const HelperSpec *spec, pid_t *ret_pid, sd_event_source **ret_child, int *ret_control,
        HelperLog **ret_log);

/* SIGTERM now, SIGKILL once timeout has passed without its exit. */
int helper_stop(sd_event_source *child, usec_t timeout);
/* Only the SIGKILL at the deadline: for a child asked to quit some other way (QEMU's "quit"). */
int helper_kill_after(sd_event_source *child, usec_t timeout);
/* SIGKILL now. */
int helper_kill(sd_event_source *child);
/* SIGKILL if still running, reaped once gone (above), the owner not called back; NULL. */
sd_event_source *helper_release(sd_event_source *child);
