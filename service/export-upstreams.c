/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* The connections to the guest's NBD server that an export's relay holds: at most one per client
 * place it has (RELAY_CLIENTS_MAX). The relay asks for one per new client ("connect N") and gets
 * the socket; a relay taken over could ask without end and keep every one (up to its open
 * files), taking the server's connections from the guest's own maps and streams, and from the
 * other exports.
 *
 * Each socket handed over is first registered (for no events) in an epoll instance of the
 * export's, which nobody waits on: the kernel drops a registration only when the last reference
 * to its socket goes, wherever that is (in the relay's table, or in an SCM_RIGHTS message on its
 * way there), so the registrations left, listed in /proc/self/fdinfo/<epoll fd>, are exactly the
 * connections the relay still has. No look into the relay's process, no privilege.
 *
 * A socket on its way to the relay is counted, as it should be, also one for a client that left
 * meanwhile, which the relay closes as it arrives. So the count is taken as full only once it
 * has been full for UPSTREAM_RETRY_USEC and nothing we sent is still unread (SIOCOUTQ): a relay that
 * keeps to its client places, asking only for a new client when at most RELAY_CLIENTS_MAX - 1
 * others hold a connection, is then not refused; until then the request waits. Requests are
 * served in the order they came.
 *
 * An eventfd is registered first and for good: a count without it (an fdinfo that lists no
 * registrations) is an error, never an empty relay. */

#include <errno.h>
#include <linux/sockios.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>

#include "export-internal.h"
#include "guest.h"
#include "util.h"

/* /proc/self/fdinfo of an epoll fd: a few lines, and one of about 100 bytes a registration. */
#define FDINFO_MAX (64U * 1024U)
/* A relay's client waits while QEMU's NBD listener has a full backlog (a QEMU that stopped
 * accepting), retried this often and for this long; the relay itself gives up after 10 s. */
#define UPSTREAM_RETRY_USEC (100 * USEC_PER_MSEC)
#define UPSTREAM_DEADLINE_USEC (5 * USEC_PER_SEC)

/* How many sockets are registered in the export's epoll instance, besides the eventfd. */
static int upstreams_alive(Export *e, unsigned *ret) {
        _cleanup_free_ char *path = strdup_printf("/proc/self/fdinfo/%d", e->upstreams_epoll_fd), *text = NULL;
        unsigned n = 0;
        int r;

        if (!path)
                return -ENOMEM;
        r = read_file_bounded(path, FDINFO_MAX, &text, NULL);
        if (r < 0)
                return r;
        for (const char *p = text; p; p = strchr(p, '\n'), p = p ? p + 1 : NULL)
                n += strncmp(p, "tfd:", 4) == 0;
        if (n == 0)
                return -EIO; /* not even the eventfd: this kernel does not list them */
        *ret = n - 1;
        return 0;
}

/* 1 if the relay may have one more connection, 0 if not, -EAGAIN if that is to be asked again
 * shortly, other -errno if it cannot be told. */
static int upstreams_room(Export *e) {
        usec_t now = now_usec(CLOCK_MONOTONIC);
        unsigned n;
        int outq, r;

        if (e->upstreams_epoll_fd < 0 || e->n_upstreams < RELAY_CLIENTS_MAX)
                return 1;
        r = upstreams_alive(e, &n);
        if (r < 0)
                return r;
        e->n_upstreams = n;
        if (n < RELAY_CLIENTS_MAX) {
                e->upstreams_full_since = 0;
                return 1;
        }
        if (e->upstreams_full_since == 0)
                e->upstreams_full_since = now;
        if (ioctl(e->control_fd, SIOCOUTQ, &outq) < 0)
                return -errno;
        if (outq > 0 || now < e->upstreams_full_since + UPSTREAM_RETRY_USEC)
                return -EAGAIN; /* the relay has yet to read (and maybe close) some */
        return 0;
}

/* Registers the socket fd, about to be handed to the relay. 0 or -errno. */
static int upstreams_add(Export *e, int fd) {
        if (e->upstreams_epoll_fd < 0) {
                _cleanup_close_ int epfd = epoll_create1(EPOLL_CLOEXEC), sentinel = eventfd(0, EFD_CLOEXEC);

                if (epfd < 0 || sentinel < 0)
                        return -errno;
                /* The eventfd stays open as long as the instance (export_upstreams_reset()), so
                 * its registration is always listed. */
                if (epoll_ctl(epfd, EPOLL_CTL_ADD, sentinel, &(struct epoll_event) { .events = 0 }) < 0)
                        return -errno;
                e->upstreams_epoll_fd = TAKE_FD(epfd);
                e->upstreams_sentinel_fd = TAKE_FD(sentinel);
        }
        if (epoll_ctl(e->upstreams_epoll_fd, EPOLL_CTL_ADD, fd, &(struct epoll_event) { .events = 0 }) < 0)
                return -errno;
        e->n_upstreams++;
        return 0;
}

void export_upstreams_reset(Export *e) {
        closep(&e->upstreams_epoll_fd);
        closep(&e->upstreams_sentinel_fd);
        e->upstreams_epoll_fd = e->upstreams_sentinel_fd = -1;
        e->n_upstreams = 0;
        e->upstreams_full_since = 0;
}

static void upstream_refuse(Export *e, unsigned long n, const char *why) {
        ControlCommand c = { .kind = CONTROL_COMMAND_REFUSED, .number = n, .text = why };

        /* control.c cuts the reason, never the line: the relay takes a cut line for garbage. A
         * reason it would not take (not printable ASCII) is left out. */
        if (export_relay_send(e, &c, -1) == -EINVAL)
                (void) export_relay_send(e, &(ControlCommand) { .kind = CONTROL_COMMAND_REFUSED, .number = n }, -1);
}

/* The relay's connections cannot be counted (r): no reason to let it have more either, so its
 * client n is refused. */
static void refuse_uncounted(Export *e, unsigned long n, int r) {
        uint64_t dropped;

        if (log_limit_minutely(&e->upstreams_errors, now_usec(CLOCK_MONOTONIC), &dropped))
                log_warning_errno(r, "Guest %s export %u: cannot count the connections its NBD relay holds "
                                     "(%" PRIu64 " more in the last minute, not logged): %m",
                        e->guest->name, e->id, dropped);
        upstream_refuse(e, n, strerror(-r));
}

/* Hands a fresh connection to QEMU's NBD server to the relay for its client n, or refuses it if
 * the relay holds as many as it may. Returns -EAGAIN (and hands nothing) while the server's
 * backlog is full. */
static int upstream_try(Export *e, unsigned long n) {
        _cleanup_close_ int up = -1;
        uint64_t dropped;
        int r;

        if (e->handing_over)
                return -EAGAIN;
        r = upstreams_room(e);
        if (r == -EAGAIN)
                return r;
        if (r < 0) {
                refuse_uncounted(e, n, r);
                return 0;
        }
        if (r == 0) {
                /* A relay keeps to its 64 clients: this one does not. The first, then one a minute. */
                if (log_limit_minutely(&e->upstreams_refused, now_usec(CLOCK_MONOTONIC), &dropped))
                        log_warning("Guest %s export %u: its NBD relay asks for more connections while it holds %u; "
                                    "refused (%" PRIu64 " more in the last minute, not logged).",
                                e->guest->name, e->id, RELAY_CLIENTS_MAX, dropped);
                upstream_refuse(e, n, "too many connections");
                return 0;
        }
        up = peer_nbd_server_connect(&e->guest->peer);
        if (up == -EAGAIN)
                return up;
        if (up < 0) {
                upstream_refuse(e, n, strerror(-up));
                return 0;
        }
        r = upstreams_add(e, up);
        if (r < 0) {
                refuse_uncounted(e, n, r);
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
                /* In order: once one waits, the ones after it are not tried (their deadlines hold). */
                if (k == 0 && upstream_try(e, e->pending[i].id) != -EAGAIN)
                        continue;
                if (now >= e->pending[i].deadline) {
                        log_warning("Guest %s: QEMU's NBD server accepts no connection (its backlog is full); "
                                    "refused a client of export %u.",
                                e->guest->name, e->id);
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

        /* Behind any that wait: in order. */
        if (e->n_pending == 0 && upstream_try(e, n) != -EAGAIN)
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
