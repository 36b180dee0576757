/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>

#include "fake-qemu.h"
#include "qmp-socket.h"

#ifndef UNIT_DATA_DIR
#error "UNIT_DATA_DIR must be defined"
#endif

static void on_state(Qmp *q, int error, void *userdata) {
        Fake *f = userdata;

        if (f->closed)
                f->n_state_after_close++;
        if (error == 0) {
                f->n_ready++;
                if (f->call_on_ready)
                        (void) fake_call(f, f->call_on_ready, "query-status", NULL, -1);
                if (f->close_on_ready)
                        fake_close(f);
                return;
        }
        f->n_failed++;
        f->fail_error = error;
        if (f->close_on_failure)
                fake_close(f);
}

static void on_event(Qmp *q, const char *event, json_object *data, void *userdata) {
        Fake *f = userdata;

        if (f->closed)
                f->n_events_after_close++;
        f->n_events++;
        if (f->keep_events) {
                free(f->last_event);
                free(f->last_data);
                f->last_event = strdup(event);
                f->last_data = data ? strdup(json_object_to_json_string_ext(data, JSON_C_TO_STRING_PLAIN)) : NULL;
        }
        if (f->pause_after_events && f->n_events == f->pause_after_events)
                qmp_set_reading(q, false);
        if (f->close_on_event)
                fake_close(f);
}

int fake_new(Fake *f) {
        QmpHandlers h = {.on_state = on_state, .on_event = on_event, .userdata = f};
        int pair[2], r;

        *f = (Fake){.peer = -1, .keep_events = true};
        for (size_t i = 0; i < FAKE_FDS_MAX; i++)
                f->fds[i] = -1;
        r = sd_event_new(&f->event);
        if (r < 0)
                return r;
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) < 0)
                return -errno;
        r = qmp_new_from_fd(&f->q, f->event, pair[0], &h);
        if (r < 0) {
                close(pair[0]);
                close(pair[1]);
                return r;
        }
        f->peer = pair[1];
        if (fcntl(f->peer, F_SETFL, fcntl(f->peer, F_GETFL) | O_NONBLOCK) < 0)
                return -errno;
        return 0;
}

int fake_new_connect(Fake *f, const char *path) {
        QmpHandlers h = {.on_state = on_state, .on_event = on_event, .userdata = f};
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        _cleanup_close_ int listener = -1, sock_fd = -1, fd = -1;
        struct ucred peer;
        int r;

        *f = (Fake){.peer = -1, .keep_events = true};
        for (size_t i = 0; i < FAKE_FDS_MAX; i++)
                f->fds[i] = -1;
        if (strlen(path) >= sizeof(sa.sun_path))
                return -ENAMETOOLONG;
        strcpy(sa.sun_path, path);
        r = sd_event_new(&f->event);
        if (r < 0)
                return r;
        listener = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (listener < 0)
                return -errno;
        (void) unlink(path);
        if (bind(listener, (struct sockaddr *) &sa, sizeof(sa)) < 0 || listen(listener, 1) < 0)
                return -errno;
        /* The daemon's way to a guest's QEMU (guest.c). */
        r = qmp_socket_open(path, NULL, NULL, NULL, &sock_fd);
        if (r >= 0)
                r = qmp_socket_connect(sock_fd, &fd, &peer);
        if (r >= 0)
                r = qmp_new_from_fd(&f->q, f->event, fd, &h);
        if (r < 0)
                return r;
        TAKE_FD(fd);
        f->peer = accept4(listener, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
        (void) unlink(path);
        if (f->peer < 0)
                return -errno;
        return 0;
}

void fake_close(Fake *f) {
        if (f->q) {
                f->closed = true;
                f->q = qmp_close_unref(f->q);
        }
}

void fake_free(Fake *f) {
        fake_close(f);
        closep(&f->peer);
        for (size_t i = 0; i < f->n_fds; i++)
                closep(&f->fds[i]);
        free(f->rx);
        free(f->last_event);
        free(f->last_data);
        sd_event_unref(f->event);
        *f = (Fake){.peer = -1};
}

/* Read whatever the client wrote, with any fds. */
static void fake_pump(Fake *f) {
        for (;;) {
                union {
                        struct cmsghdr hdr;
                        char buf[CMSG_SPACE(sizeof(int) * 8)];
                } control;
                char buf[65536];
                struct iovec iov = {.iov_base = buf, .iov_len = sizeof(buf)};
                struct msghdr mh = {
                        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = &control, .msg_controllen = sizeof(control)};
                ssize_t k;

                if (f->peer < 0 || f->peer_eof)
                        return;
                k = recvmsg(f->peer, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
                if (k < 0) {
                        if (errno == EINTR)
                                continue;
                        if (errno != EAGAIN)
                                f->peer_eof = true; /* ECONNRESET: as good as EOF */
                        return;
                }
                for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
                        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
                                continue;
                        for (size_t i = 0; i < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int); i++) {
                                int fd;
                                memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
                                if (f->n_fds < FAKE_FDS_MAX) {
                                        f->fd_offset[f->n_fds] = f->rx_len;
                                        f->fds[f->n_fds++] = fd;
                                } else
                                        close(fd);
                        }
                }
                if (k == 0) {
                        f->peer_eof = true;
                        return;
                }
                if (f->rx_len + (size_t) k + 1 > f->rx_cap) {
                        size_t cap = MAX(f->rx_cap * 2, f->rx_len + (size_t) k + 1);
                        char *n = realloc(f->rx, cap);
                        if (!n)
                                abort();
                        f->rx = n;
                        f->rx_cap = cap;
                }
                memcpy(f->rx + f->rx_len, buf, (size_t) k);
                f->rx_len += (size_t) k;
                f->rx[f->rx_len] = 0;
        }
}

static void fake_iterate(Fake *f, usec_t max_wait) {
        (void) sd_event_run(f->event, max_wait);
        fake_pump(f);
}

void fake_run(Fake *f, usec_t usec) {
        usec_t end = now_usec(CLOCK_MONOTONIC) + usec;

        for (;;) {
                usec_t now = now_usec(CLOCK_MONOTONIC);
                if (now >= end)
                        break;
                fake_iterate(f, MIN(end - now, 10 * USEC_PER_MSEC));
        }
        fake_pump(f);
}

bool fake_run_until(Fake *f, bool (*cond)(Fake *f, void *arg), void *arg, usec_t timeout) {
        usec_t end = now_usec(CLOCK_MONOTONIC) + timeout;

        for (;;) {
                fake_pump(f);
                if (cond(f, arg))
                        return true;
                if (now_usec(CLOCK_MONOTONIC) >= end)
                        return false;
                fake_iterate(f, 10 * USEC_PER_MSEC);
        }
}

static bool cond_failed(Fake *f, void *arg) {
        return f->n_failed > 0;
}

bool fake_wait_failed(Fake *f, usec_t timeout) {
        return fake_run_until(f, cond_failed, NULL, timeout);
}

static bool cond_peer_eof(Fake *f, void *arg) {
        return f->peer_eof;
}

bool fake_wait_peer_eof(Fake *f, usec_t timeout) {
        return fake_run_until(f, cond_peer_eof, NULL, timeout);
}

int fake_send(Fake *f, const void *data, size_t len) {
        const char *p = data;
        usec_t end = now_usec(CLOCK_MONOTONIC) + 30 * USEC_PER_SEC;

        while (len > 0) {
                ssize_t k = send(f->peer, p, len, MSG_NOSIGNAL | MSG_DONTWAIT);
                if (k < 0) {
                        if (errno == EINTR)
                                continue;
                        if (errno != EAGAIN)
                                return -errno;
                        if (now_usec(CLOCK_MONOTONIC) >= end)
                                return -ETIMEDOUT;
                        fake_iterate(f, 10 * USEC_PER_MSEC);
                        continue;
                }
                p += k;
                len -= (size_t) k;
        }
        return 0;
}

int fake_send_str(Fake *f, const char *s) {
        return fake_send(f, s, strlen(s));
}

int fake_sendf(Fake *f, const char *format, ...) {
        va_list ap;
        char *s;
        int r;

        va_start(ap, format);
        r = vasprintf(&s, format, ap);
        va_end(ap);
        if (r < 0)
                return -ENOMEM;
        r = fake_send_str(f, s);
        free(s);
        return r;
}

void fake_hangup(Fake *f) {
        if (f->peer >= 0)
                (void) shutdown(f->peer, SHUT_WR);
}

static bool cond_command(Fake *f, void *arg) {
        return f->rx && strstr(f->rx + f->rx_consumed, "\r\n");
}

json_object *fake_next_command(Fake *f, usec_t timeout) {
        char *end;
        json_object *o;

        if (!fake_run_until(f, cond_command, NULL, timeout))
                return NULL;
        end = strstr(f->rx + f->rx_consumed, "\r\n");
        *end = 0;
        o = json_tokener_parse(f->rx + f->rx_consumed);
        *end = '\r';
        f->rx_consumed = (size_t) (end - f->rx) + 2;
        return o;
}

int64_t fake_command_id(json_object *cmd) {
        json_object *id;

        if (!cmd || !json_object_object_get_ex(cmd, "id", &id) || !json_object_is_type(id, json_type_int))
                return -1;
        return json_object_get_int64(id);
}

const char *fake_command_name(json_object *cmd) {
        json_object *e;

        if (!cmd || !json_object_object_get_ex(cmd, "execute", &e) || !json_object_is_type(e, json_type_string))
                return NULL;
        return json_object_get_string(e);
}

static bool cond_ready(Fake *f, void *arg) {
        return f->n_ready > 0 || f->n_failed > 0;
}

int fake_handshake(Fake *f) {
        json_object *cmd;
        int r;

        r = fake_send_str(f, FAKE_GREETING);
        if (r < 0)
                return r;
        cmd = fake_next_command(f, 5 * USEC_PER_SEC);
        if (!cmd)
                return -ETIMEDOUT;
        if (!streq_ptr(fake_command_name(cmd), "qmp_capabilities")) {
                json_object_put(cmd);
                return -EPROTO;
        }
        r = fake_reply(f, cmd, "{}");
        json_object_put(cmd);
        if (r < 0)
                return r;
        if (!fake_run_until(f, cond_ready, NULL, 5 * USEC_PER_SEC))
                return -ETIMEDOUT;
        return f->n_ready == 1 && f->n_failed == 0 && qmp_is_ready(f->q) ? 0 : -EPROTO;
}

int fake_reply(Fake *f, json_object *cmd, const char *ret_json) {
        return fake_sendf(f, "{\"return\": %s, \"id\": %" PRIi64 "}\r\n", ret_json, fake_command_id(cmd));
}

void fake_call_handler(
        Qmp *q, int error, json_object *result, const char *error_class, const char *error_desc, void *userdata) {
        FakeCall *c = userdata;

        if (c->fake && c->fake->closed)
                c->handler_after_close = true;
        c->n_handler++;
        c->order = c->fake ? ++c->fake->seq : 0;
        c->error = error;
        free(c->result);
        free(c->error_class);
        free(c->error_desc);
        c->result = result ? strdup(json_object_to_json_string_ext(result, JSON_C_TO_STRING_PLAIN)) : NULL;
        c->error_class = error_class ? strdup(error_class) : NULL;
        c->error_desc = error_desc ? strdup(error_desc) : NULL;
        if (c->close_in_handler && c->fake)
                fake_close(c->fake);
}

void fake_call_destroy(void *userdata) {
        FakeCall *c = userdata;

        c->n_destroy++;
}

int fake_call(Fake *f, FakeCall *c, const char *command, json_object *args, int fd) {
        c->fake = f;
        return qmp_call(f->q, command, args, fd, fake_call_handler, c, fake_call_destroy);
}

void fake_call_done(FakeCall *c) {
        c->result = mfree(c->result);
        c->error_class = mfree(c->error_class);
        c->error_desc = mfree(c->error_desc);
}

uint64_t fake_rss(void) {
        _cleanup_fclose_ FILE *f = fopen("/proc/self/statm", "re");
        unsigned long long size, resident;

        if (!f || fscanf(f, "%llu %llu", &size, &resident) != 2)
                return 0;
        return (uint64_t) resident * (uint64_t) sysconf(_SC_PAGESIZE);
}

int fake_peak_rss_reset(void) {
        _cleanup_close_ int fd = open("/proc/self/clear_refs", O_WRONLY | O_CLOEXEC);

        if (fd < 0)
                return -errno;
        return write(fd, "5", 1) == 1 ? 0 : -errno;
}

uint64_t fake_peak_rss(void) {
        _cleanup_fclose_ FILE *f = fopen("/proc/self/status", "re");
        char line[256];
        unsigned long long kib;

        while (f && fgets(line, sizeof(line), f))
                if (sscanf(line, "VmHWM: %llu kB", &kib) == 1)
                        return (uint64_t) kib * 1024U;
        return 0;
}

char *fake_load_text(const char *name) {
        _cleanup_free_ char *path = strdup_printf("%s/%s", UNIT_DATA_DIR, name);
        char *text = NULL;

        if (!path || read_file_bounded(path, 16U << 20, &text, NULL) < 0)
                return NULL;
        return text;
}

json_object *fake_load_json(const char *name) {
        _cleanup_free_ char *text = fake_load_text(name);

        return text ? json_tokener_parse(text) : NULL;
}

char *fake_unfinished_message(unsigned n, size_t *ret_len) {
        static const char head[] = "{\"event\": \"X\", \"data\": {\"a\": [{}";
        char *msg = malloc(sizeof(head) + 3 * (size_t) n);
        size_t p;

        if (!msg)
                return NULL;
        p = strlen(strcpy(msg, head));
        for (unsigned i = 1; i < n; i++, p += 3)
                memcpy(msg + p, ",{}", 3);
        *ret_len = p;
        return msg;
}
