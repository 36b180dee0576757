/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* The connections to the guest's NBD server that an export's relay holds: at most as many as it
 * has places for clients. The relay asks for one per client ("connect N") and gets the socket;
 * a relay taken over could ask without end and keep every one (up to its open files), taking
 * the server's connections from the guest's own maps and streams, and from the other exports.
 * Each socket handed over is remembered by its inode; when they add up to the limit, the ones
 * the relay still has are read from /proc/PID/fd (the relay is our child: its pid is its own
 * until we reap it). An fd sent but not yet received is in no table, so that count is exact
 * only once the relay has read everything we sent: until then the caller waits and asks again. */

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/sockios.h>
#include <sys/ioctl.h>
#include <sys/stat.h>

#include "export-internal.h"
#include "guest.h"
#include "util.h"

#define RELAY_FDS_MAX 4096 /* a relay has 1024 at most: enough to look through */
/* A relay's client waits while QEMU's NBD listener has a full backlog (a QEMU that stopped
 * accepting), or while the count of what the relay holds cannot be told yet: retried this often
 * and for this long; the relay itself gives up after 10 s. */
#define UPSTREAM_RETRY_USEC (100 * USEC_PER_MSEC)
#define UPSTREAM_DEADLINE_USEC (5 * USEC_PER_SEC)

/* Marks in alive[] the upstreams the relay still has open. 0 or -errno. */
static int relay_holds(Export *e, bool *alive) {
        _cleanup_free_ char *path = strdup_printf("/proc/%d/fd", (int) e->relay_pid);
        unsigned n = 0;
        DIR *dir;
        int r = 0;

        if (!path)
                return -ENOMEM;
        dir = opendir(path);
        if (!dir)
                return -errno;
        for (;;) {
                struct dirent *de;
                struct stat st;

                errno = 0;
                de = readdir(dir);
                if (!de) {
                        r = -errno;
                        break;
                }
                if (++n > RELAY_FDS_MAX) {
                        r = -E2BIG;
                        break;
                }
                /* fstatat() follows the link to the socket itself; one closed meanwhile is gone. */
                if (de->d_name[0] == '.' || fstatat(dirfd(dir), de->d_name, &st, 0) < 0 || !S_ISSOCK(st.st_mode))
                        continue;
                for (size_t i = 0; i < e->n_upstreams; i++)
                        if (e->upstreams[i].ino == st.st_ino && e->upstreams[i].dev == st.st_dev)
                                alive[i] = true;
        }
        closedir(dir);
        return r;
}

int export_upstreams_room(Export *e) {
        bool alive[EXPORT_UPSTREAMS_MAX] = {};
        size_t k = 0;
        int outq, r;

        if (e->n_upstreams < EXPORT_UPSTREAMS_MAX)
                return 1;
        if (e->relay_pid <= 0 || e->control_fd < 0)
                return -ESRCH;
        if (ioctl(e->control_fd, SIOCOUTQ, &outq) < 0)
                return -errno;
        if (outq > 0)
                return -EAGAIN; /* fds on their way to it */
        r = relay_holds(e, alive);
        if (r < 0)
                return r;
        for (size_t i = 0; i < e->n_upstreams; i++)
                if (alive[i])
                        e->upstreams[k++] = e->upstreams[i];
        e->n_upstreams = k;
        return k < EXPORT_UPSTREAMS_MAX;
}

int export_upstreams_add(Export *e, int fd) {
        struct stat st;

        if (e->n_upstreams >= EXPORT_UPSTREAMS_MAX)
                return -ENOSPC;
        if (fstat(fd, &st) < 0)
                return -errno;
        e->upstreams[e->n_upstreams++] = (typeof(e->upstreams[0])) { .dev = st.st_dev, .ino = st.st_ino };
        return 0;
}

static void upstream_refuse(Export *e, unsigned long n, const char *why) {
        ControlCommand c = { .kind = CONTROL_COMMAND_REFUSED, .number = n, .text = why };

        /* control.c cuts the reason, never the line: the relay takes a cut line for garbage. A
         * reason it would not take (not printable ASCII) is left out. */
        if (export_relay_send(e, &c, -1) == -EINVAL)
                (void) export_relay_send(e, &(ControlCommand) { .kind = CONTROL_COMMAND_REFUSED, .number = n }, -1);
}

/* Hands a fresh connection to QEMU's NBD server to the relay for its client n, or refuses it if
 * the relay holds as many as it may. Returns -EAGAIN (and hands nothing) while the server's
 * backlog is full, or while what the relay holds cannot be told. */
static int upstream_try(Export *e, unsigned long n) {
        _cleanup_close_ int up = -1;
        int r;

        if (e->handing_over)
                return -EAGAIN;
        r = export_upstreams_room(e);
        if (r == -EAGAIN)
                return r;
        if (r == 0) {
                uint64_t dropped;

                /* A relay keeps to its 64 clients: this one does not. The first, then one a minute. */
                if (log_limit_pass(&e->upstreams_refused, 1.0 / 60, 1.0, now_usec(CLOCK_MONOTONIC), &dropped))
                        log_warning("Guest %s export %u: its NBD relay asks for more connections while it holds %u; "
                                    "refused (%" PRIu64 " more in the last minute, not logged).",
                                e->guest->name, e->id, EXPORT_UPSTREAMS_MAX, dropped);
                upstream_refuse(e, n, "too many connections");
                return 0;
        }
        if (r < 0) {
                uint64_t dropped;

                /* Serving goes on; the limit does not hold meanwhile. */
                if (log_limit_pass(&e->upstreams_refused, 1.0 / 60, 1.0, now_usec(CLOCK_MONOTONIC), &dropped))
                        log_warning_errno(r, "Guest %s export %u: cannot tell which connections its NBD relay holds "
                                             "(/proc/%d/fd), not counting them: %m",
                                e->guest->name, e->id, (int) e->relay_pid);
        }
        up = peer_nbd_server_connect(&e->guest->peer);
        if (up == -EAGAIN)
                return up;
        if (up < 0) {
                upstream_refuse(e, n, strerror(-up));
                return 0;
        }
        if (r > 0 && export_upstreams_add(e, up) < 0) {
                upstream_refuse(e, n, "");
                return 0;
        }
        r = export_relay_send(e, &(ControlCommand) { .kind = CONTROL_COMMAND_UPSTREAM, .number = n }, up);
        if (r < 0) {
                /* Tell it, or its client waits out the relay's timeout for nothing. */
                log_debug_errno(r, "Export %u: cannot hand a connection to the relay: %m", e->id);
                upstream_refuse(e, n, "");
        }
        return 0;
}

static int upstream_retry(sd_event_source *s, uint64_t usec, void *userdata) {
        Export *e = userdata;
        usec_t now = now_usec(CLOCK_MONOTONIC);
        size_t k = 0;
        int r;

        for (size_t i = 0; i < e->n_pending; i++) {
                if (upstream_try(e, e->pending[i].id) != -EAGAIN)
                        continue;
                if (now >= e->pending[i].deadline) {
                        log_warning("Guest %s: QEMU's NBD server accepts no connection for a client of export %u "
                                    "within %u s (its backlog is full, or the relay reads nothing we send); "
                                    "refused it.",
                                e->guest->name, e->id, (unsigned) (UPSTREAM_DEADLINE_USEC / USEC_PER_SEC));
                        upstream_refuse(e, e->pending[i].id, "QEMU's NBD server does not accept connections");
                        continue;
                }
                e->pending[k++] = e->pending[i];
        }
        e->n_pending = k;
        if (k == 0)
                return sd_event_source_set_enabled(s, SD_EVENT_OFF);
        r = sd_event_source_set_time(s, now + UPSTREAM_RETRY_USEC);
        if (r >= 0)
                r = sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
        return r;
}

/* A connection for the relay's client n, now or, while QEMU's backlog is full, from a timer
 * until the deadline: never a blocking connect() to a socket a guest's QEMU owns. */
void export_upstream_connect(Export *e, unsigned long n) {
        usec_t deadline = now_usec(CLOCK_MONOTONIC) + UPSTREAM_DEADLINE_USEC;
        int r;

        if (upstream_try(e, n) != -EAGAIN)
                return;
        if (e->n_pending >= UPSTREAM_PENDING_MAX) {
                upstream_refuse(e, n, "QEMU's NBD server does not accept connections");
                return;
        }
        e->pending[e->n_pending++] = (typeof(e->pending[0])) { .id = n, .deadline = deadline };
        if (!e->retry_source)
                r = sd_event_add_time_relative(e->engine->event, &e->retry_source, CLOCK_MONOTONIC,
                        UPSTREAM_RETRY_USEC, 0, upstream_retry, e);
        else if (sd_event_source_get_enabled(e->retry_source, NULL) > 0)
                r = 0;
        else {
                r = sd_event_source_set_time_relative(e->retry_source, UPSTREAM_RETRY_USEC);
                if (r >= 0)
                        r = sd_event_source_set_enabled(e->retry_source, SD_EVENT_ONESHOT);
        }
        if (r < 0) {
                e->n_pending--;
                upstream_refuse(e, n, strerror(-r));
        }
}
