/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <ctype.h>
#include <fcntl.h>
#include <inttypes.h>
#include <sys/socket.h>

#include "qmp-internal.h"
#include "qmp.h"
#include "util.h"

void qmp_call_free(QmpCall *c) {
        if (!c)
                return;
        if (c->destroy)
                c->destroy(c->userdata);
        free(c->command);
        free(c->data);
        closep(&c->fd);
        free(c);
}

static int qmp_update_io(Qmp *q);

/* The budget needs the room of this connection's message, begun more than a second ago
 * (qmp-cost.h): what json-c built of it goes now (another connection is being read: never this
 * one), the connection at the loop's next turn. */
static void qmp_evict(QmpCharge *c) {
        Qmp *q = (Qmp *) (void *) ((char *) c - offsetof(Qmp, charge));

        json_tokener_reset(q->tok);
        q->msg_deadline = 0;
        (void) qmp_update_timer(q);
}

Qmp *qmp_ref(Qmp *q) {
        if (q)
                q->n_ref++;
        return q;
}

static void qmp_disconnect(Qmp *q) {
        /* What json-c built of a message begun goes now, not when the owner lets go. */
        if (q->tok)
                json_tokener_reset(q->tok);
        qmp_cost_charge(&q->charge, 0);
        q->held = mfree(q->held);
        q->n_held = 0;
        q->resume = sd_event_source_disable_unref(q->resume);
        q->io = sd_event_source_disable_unref(q->io);
        q->timer = sd_event_source_disable_unref(q->timer);
        closep(&q->fd);
        q->fd = -1;
        q->state = QMP_CLOSED;
}

/* Unlink and return all calls; the caller disposes of them. */
static QmpCall *qmp_steal_calls(Qmp *q) {
        QmpCall *l = q->calls;

        q->calls = q->calls_tail = NULL;
        q->n_calls = 0;
        return l;
}

static void qmp_free(Qmp *q) {
        QmpCall *l;

        qmp_disconnect(q);
        l = qmp_steal_calls(q);
        while (l) {
                QmpCall *n = l->next;
                qmp_call_free(l);
                l = n;
        }
        if (q->tok)
                json_tokener_free(q->tok);
        sd_event_unref(q->event);
        free(q);
}

Qmp *qmp_unref(Qmp *q) {
        if (!q)
                return NULL;
        if (--q->n_ref == 0)
                qmp_free(q);
        return NULL;
}

Qmp *qmp_close_unref(Qmp *q) {
        QmpCall *l;

        if (!q)
                return NULL;
        q->h = (QmpHandlers) {};
        q->detached = true;
        q->draining = false;
        q->drained = NULL;
        qmp_disconnect(q);
        /* Dropped silently: the owner is going away and wants no callbacks. */
        l = qmp_steal_calls(q);
        while (l) {
                QmpCall *n = l->next;
                l->handler = NULL;
                qmp_call_free(l);
                l = n;
        }
        return qmp_unref(q);
}

static int qmp_write(Qmp *q);

void qmp_flush(Qmp *q) {
        if (q && q->fd >= 0 && q->state == QMP_READY)
                (void) qmp_write(q);
}

/* The end of a qmp_close_drained(): close, tell, and drop the reference it took over. */
void qmp_drain_finish(Qmp *q, int error) {
        qmp_drained_handler_t done = q->drained;
        void *userdata = q->drained_userdata;

        if (!q->draining)
                return;
        q->draining = false;
        q->drained = NULL;
        qmp_disconnect(q);
        if (done)
                done(error, userdata);
        qmp_unref(q);
}

void qmp_close_drained(Qmp *q, uint64_t timeout, qmp_drained_handler_t done, void *userdata) {
        usec_t now = now_usec(CLOCK_MONOTONIC);
        usec_t deadline = timeout > USEC_INFINITY - now ? USEC_INFINITY : now + timeout;
        int r;

        if (!q) {
                if (done)
                        done(0, userdata);
                return;
        }
        q->h = (QmpHandlers) {};
        q->detached = true;
        for (QmpCall *c = q->calls; c; c = c->next) {
                c->handler = NULL;
                if (c->destroy)
                        c->destroy(c->userdata);
                c->destroy = NULL;
                c->deadline = MIN(c->deadline, deadline);
        }
        q->draining = true;
        q->drained = done;
        q->drained_userdata = userdata;
        if (q->state != QMP_READY || !q->calls) {
                qmp_drain_finish(q, q->state == QMP_READY ? 0 : -ENOTCONN);
                return;
        }
        qmp_set_reading(q, true); /* nobody paces it any more: its answers, held ones first, at once */
        r = qmp_update_io(q);
        if (r >= 0)
                r = qmp_update_timer(q);
        if (r < 0)
                qmp_drain_finish(q, r);
}

bool qmp_is_ready(Qmp *q) {
        return q && q->state == QMP_READY;
}

void qmp_set_timeout(Qmp *q, uint64_t usec) {
        usec_t now = now_usec(CLOCK_MONOTONIC);

        q->timeout = usec;
        if (q->state != QMP_READY && q->state != QMP_CLOSED)
                q->setup_deadline = now + usec;
        for (QmpCall *c = q->calls; c; c = c->next)
                c->deadline = MIN(c->deadline, now + usec);
        (void) qmp_update_timer(q);
}

uint64_t qmp_message_cost(Qmp *q) {
        return q->last_cost;
}

unsigned qmp_qemu_version(Qmp *q) {
        return q->version;
}

static void qmp_append(Qmp *q, QmpCall *c) {
        c->next = NULL;
        if (q->calls_tail)
                q->calls_tail->next = c;
        else
                q->calls = c;
        q->calls_tail = c;
        q->n_calls++;
}

QmpCall *qmp_unlink(Qmp *q, uint64_t id) {
        QmpCall *prev = NULL;

        for (QmpCall *c = q->calls; c; prev = c, c = c->next) {
                if (c->id != id || c->data) /* a reply to something not yet sent is bogus */
                        continue;
                if (prev)
                        prev->next = c->next;
                else
                        q->calls = c->next;
                if (q->calls_tail == c)
                        q->calls_tail = prev;
                q->n_calls--;
                c->next = NULL;
                return c;
        }
        return NULL;
}

int qmp_enqueue(Qmp *q, const char *command, json_object *args, int fd, qmp_reply_handler_t handler,
        void *userdata, void (*destroy)(void *)) {
        _cleanup_(json_object_putp) json_object *msg = NULL;
        _cleanup_close_ int fd_owned = fd;
        QmpCall *c;
        const char *s;
        int r;

        if (q->n_calls >= QMP_PENDING_MAX) {
                json_object_put(args);
                return -EBUSY;
        }
        msg = json_object_new_object();
        if (!msg) {
                json_object_put(args);
                return -ENOMEM;
        }
        if (json_object_object_add(msg, "execute", json_object_new_string(command)) < 0) {
                json_object_put(args);
                return -ENOMEM;
        }
        if (args && json_object_object_add(msg, "arguments", args) < 0) {
                json_object_put(args);
                return -ENOMEM;
        }
        if (json_object_object_add(msg, "id", json_object_new_int64((int64_t) q->next_id)) < 0)
                return -ENOMEM;

        s = json_object_to_json_string_ext(msg, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE);
        if (!s)
                return -ENOMEM;

        c = calloc(1, sizeof(*c));
        if (!c)
                return -ENOMEM;
        c->fd = -1;
        c->id = q->next_id++;
        c->command = strdup(command);
        c->data = strdup_printf("%s\r\n", s);
        if (!c->command || !c->data) {
                qmp_call_free(c);
                return -ENOMEM;
        }
        c->size = strlen(c->data);
        log_debug("QMP -> %.300s", s);
        c->fd = TAKE_FD(fd_owned);
        c->handler = handler;
        c->userdata = userdata;
        c->destroy = destroy;
        /* From submission, not from sending: a QEMU that stops reading must not hold calls forever. */
        c->deadline = now_usec(CLOCK_MONOTONIC) + q->timeout;
        qmp_append(q, c);
        (void) qmp_update_timer(q);

        r = qmp_update_io(q);
        if (r < 0) {
                /* Leave the call queued: the connection is broken and qmp_fail will run. */
                log_debug_errno(r, "QMP: failed to arm write: %m");
        }
        return 0;
}

int qmp_call(Qmp *q, const char *command, json_object *args, int fd, qmp_reply_handler_t handler, void *userdata,
        void (*destroy)(void *userdata)) {
        if (!q || !command) {
                json_object_put(args);
                closep(&fd);
                return -EINVAL;
        }
        if (q->state != QMP_READY) {
                json_object_put(args);
                closep(&fd);
                return -ENOTCONN;
        }
        return qmp_enqueue(q, command, args, fd, handler, userdata, destroy);
}

/* Writing */

static QmpCall *qmp_first_unsent(Qmp *q) {
        for (QmpCall *c = q->calls; c; c = c->next)
                if (c->data)
                        return c;
        return NULL;
}

static int qmp_write(Qmp *q) {
        QmpCall *c;

        while ((c = qmp_first_unsent(q))) {
                struct iovec iov = { .iov_base = c->data + c->sent, .iov_len = c->size - c->sent };
                union {
                        struct cmsghdr hdr;
                        char buf[CMSG_SPACE(sizeof(int))];
                } control = {};
                struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
                ssize_t k;

                if (c->fd >= 0 && c->sent == 0) {
                        struct cmsghdr *cmsg;
                        mh.msg_control = &control;
                        mh.msg_controllen = sizeof(control.buf);
                        cmsg = CMSG_FIRSTHDR(&mh);
                        cmsg->cmsg_level = SOL_SOCKET;
                        cmsg->cmsg_type = SCM_RIGHTS;
                        cmsg->cmsg_len = CMSG_LEN(sizeof(int));
                        memcpy(CMSG_DATA(cmsg), &c->fd, sizeof(int));
                }
                k = sendmsg(q->fd, &mh, MSG_DONTWAIT | MSG_NOSIGNAL);
                if (k < 0) {
                        if (errno == EAGAIN || errno == EINTR)
                                return 0;
                        return -errno;
                }
                if (c->fd >= 0) {
                        /* The kernel holds its own reference now. */
                        closep(&c->fd);
                        c->fd = -1;
                }
                c->sent += (size_t) k;
                if (c->sent >= c->size)
                        c->data = mfree(c->data);
        }
        return 0;
}

/* Reading and dispatching */

int qmp_feed(Qmp *q, const char *buf, size_t len) {
        return qmp_feed_bytes(q, buf, len);
}

static int qmp_io_handler(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        Qmp *q = userdata;
        int r = 0;

        qmp_ref(q);
        if (revents & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                /* A hangup is read to its end even while paused: it would wake us in a loop. */
                r = qmp_read(q, revents & (EPOLLHUP | EPOLLERR));
                if (r < 0)
                        goto finish;
        }
        if (q->state != QMP_CLOSED) {
                r = qmp_write(q);
                if (r < 0)
                        goto finish;
        }
        if (q->state != QMP_CLOSED) {
                r = qmp_update_io(q);
                if (r >= 0)
                        r = qmp_update_timer(q);
        }
finish:
        if (r < 0 && q->state != QMP_CLOSED)
                qmp_fail(q, r);
        qmp_unref(q);
        return 0;
}

void qmp_set_reading(Qmp *q, bool reading) {
        if (!q || q->paused == !reading)
                return;
        q->paused = !reading;
        if (q->state == QMP_CLOSED)
                return;
        (void) qmp_update_io(q);
        /* What was held goes first, also if QEMU sends nothing more (else the next read feeds it). */
        if (reading && q->held && (q->resume || sd_event_add_defer(q->event, &q->resume, qmp_resume_handler, q) >= 0))
                (void) sd_event_source_set_enabled(q->resume, SD_EVENT_ONESHOT);
}

static int qmp_update_io(Qmp *q) {
        uint32_t events = q->paused ? 0 : EPOLLIN;

        if (!q->io)
                return -ENOTCONN;
        if (qmp_first_unsent(q))
                events |= EPOLLOUT;
        return sd_event_source_set_io_events(q->io, events);
}

static int qmp_timer_handler(sd_event_source *s, uint64_t usec, void *userdata) {
        Qmp *q = userdata;
        usec_t now = now_usec(CLOCK_MONOTONIC);

        qmp_ref(q);
        if (q->setup_deadline != USEC_INFINITY && now >= q->setup_deadline) {
                log_warning("QMP: no greeting from QEMU within %" PRIu64 " s (is another client connected to this monitor?).",
                        q->timeout / USEC_PER_SEC);
                qmp_fail(q, -ETIMEDOUT);
                goto finish;
        }
        if (now >= q->msg_deadline) {
                if (q->charge.evicted)
                        log_warning("QMP: QEMU began a message (%zu bytes so far) and held it unfinished while the "
                                    "daemon needed its memory; closing the connection.",
                                q->msg_bytes);
                else
                        log_warning("QMP: QEMU began a message (%zu bytes so far) and did not end it within %" PRIu64
                                    " s; closing the connection.",
                                q->msg_bytes, q->timeout / USEC_PER_SEC);
                qmp_fail(q, q->charge.evicted ? -E2BIG : -ETIMEDOUT);
                goto finish;
        }
        /* A call QEMU did not even read in time: it no longer reads its monitor, and half a
         * command may be on the wire. Nothing more can be said on this connection. */
        for (QmpCall *i = q->calls; i; i = i->next)
                if (i->data && i->deadline <= now) {
                        log_warning("QMP: QEMU did not read command '%s' within %" PRIu64 " s; closing the connection.",
                                i->command, q->timeout / USEC_PER_SEC);
                        qmp_fail(q, -ETIMEDOUT);
                        goto finish;
                }
        /* Expire calls that were sent and have waited too long. */
        for (;;) {
                QmpCall *c = NULL;
                for (QmpCall *i = q->calls; i; i = i->next)
                        if (!i->data && i->deadline <= now) {
                                c = qmp_unlink(q, i->id);
                                break;
                        }
                if (!c)
                        break;
                q->n_expired++;
                log_warning("QMP: command '%s' got no reply in time.", c->command);
                if (c->handler)
                        c->handler(q, -ETIMEDOUT, NULL, NULL, NULL, c->userdata);
                qmp_call_free(c);
                if (q->state == QMP_CLOSED)
                        goto finish;
                if (q->draining && !q->calls) {
                        qmp_drain_finish(q, -ETIMEDOUT);
                        goto finish;
                }
        }
        (void) qmp_update_timer(q);
finish:
        qmp_unref(q);
        return 0;
}

int qmp_update_timer(Qmp *q) {
        usec_t next = MIN(q->setup_deadline, q->msg_deadline);

        for (QmpCall *c = q->calls; c; c = c->next)
                next = MIN(next, c->deadline);
        if (next == USEC_INFINITY)
                return q->timer ? sd_event_source_set_enabled(q->timer, SD_EVENT_OFF) : 0;
        if (!q->timer)
                return sd_event_add_time(q->event, &q->timer, CLOCK_MONOTONIC, next, 0, qmp_timer_handler, q);
        if (sd_event_source_set_time(q->timer, next) < 0)
                return -EIO;
        return sd_event_source_set_enabled(q->timer, SD_EVENT_ONESHOT);
}

void qmp_fail(Qmp *q, int error) {
        qmp_state_handler_t on_state;
        QmpCall *l;

        if (q->state == QMP_CLOSED)
                return;
        qmp_ref(q);
        qmp_disconnect(q);
        /* Pending calls learn first. A handler may free the owner; an owner that goes away
         * calls qmp_close_unref(), which detaches, so on_state below is never a dangling call. */
        l = qmp_steal_calls(q);
        while (l) {
                QmpCall *n = l->next;
                if (l->handler && !q->detached)
                        l->handler(q, -ECONNRESET, NULL, NULL, NULL, l->userdata);
                else
                        l->handler = NULL;
                qmp_call_free(l);
                l = n;
        }
        on_state = q->detached ? NULL : q->h.on_state;
        if (on_state) {
                void *userdata = q->h.userdata;
                q->h = (QmpHandlers) {};
                on_state(q, error < 0 ? error : -ECONNRESET, userdata);
        }
        if (q->draining)
                qmp_drain_finish(q, error < 0 ? error : -ECONNRESET);
        qmp_unref(q);
}

static int qmp_new(Qmp **ret, sd_event *e, int fd, const QmpHandlers *h) {
        Qmp *q;
        int r;

        q = calloc(1, sizeof(*q));
        if (!q)
                return -ENOMEM;
        q->n_ref = 1;
        q->fd = fd;
        q->event = sd_event_ref(e);
        q->next_id = 1;
        q->timeout = QMP_TIMEOUT_DEFAULT_USEC;
        q->state = QMP_GREETING;
        if (h)
                q->h = *h;
        q->tok = json_tokener_new_ex(QMP_DEPTH_MAX);
        if (!q->tok) {
                q->fd = -1;
                qmp_free(q);
                return -ENOMEM;
        }
        /* Trailing bytes are the next messages: we feed a stream, one value at a time. UTF-8 is
         * checked on the raw stream by us: json-c's check misses characters split across reads. */
        json_tokener_set_flags(q->tok, JSON_TOKENER_STRICT | JSON_TOKENER_ALLOW_TRAILING_CHARS);
        q->setup_deadline = now_usec(CLOCK_MONOTONIC) + q->timeout;
        q->msg_deadline = USEC_INFINITY;
        q->charge.evict = qmp_evict;
        if (fd >= 0) {
                r = sd_event_add_io(e, &q->io, fd, EPOLLIN, qmp_io_handler, q);
                if (r < 0) {
                        q->fd = -1;
                        qmp_free(q);
                        return r;
                }
        }
        *ret = q;
        return 0;
}

int qmp_new_from_fd(Qmp **ret, sd_event *e, int fd, const QmpHandlers *h) {
        Qmp *q;
        int r;

        if (fd < 0)
                return -EBADF;
        if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) < 0)
                return -errno;
        r = qmp_new(&q, e, fd, h);
        if (r < 0)
                return r;
        r = qmp_update_timer(q);
        if (r < 0) {
                q->fd = -1;
                qmp_free(q);
                return r;
        }
        *ret = q;
        return 0;
}
