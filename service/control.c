/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

#include "blockstream-api.h"
#include "control.h"
#include "util.h"

static const char *const extent_kind_table[_CONTROL_EXTENT_MAX] = {
        [CONTROL_EXTENT_LOCAL] = BS_EXTENT_LOCAL,
        [CONTROL_EXTENT_ZERO] = BS_EXTENT_ZERO,
        [CONTROL_EXTENT_BACKING] = BS_EXTENT_BACKING,
        [CONTROL_EXTENT_ABSENT] = BS_EXTENT_ABSENT,
};

const char *control_extent_kind_to_string(ControlExtentKind k) {
        return k >= 0 && k < _CONTROL_EXTENT_MAX ? extent_kind_table[k] : NULL;
}

int control_frame(char *buf, size_t len) {
        if (len == 0 || len > CONTROL_MESSAGE_MAX || buf[len - 1] != '\n' || memchr(buf, 0, len))
                return -EBADMSG;
        buf[len - 1] = 0;
        return 0;
}

/* The number at the start of s up to the first space or the end; *end: where it stopped. */
static int parse_u64_prefix(const char *s, const char **end, uint64_t *ret) {
        uint64_t v = 0;
        const char *p;

        for (p = s; *p >= '0' && *p <= '9'; p++) {
                if (v > (UINT64_MAX - (uint64_t) (*p - '0')) / 10)
                        return -EBADMSG;
                v = v * 10 + (uint64_t) (*p - '0');
        }
        if (p == s)
                return -EBADMSG;
        *end = p;
        *ret = v;
        return 0;
}

int control_parse_u64(const char *s, uint64_t *ret) {
        const char *end;

        if (parse_u64_prefix(s, &end, ret) < 0 || *end)
                return -EBADMSG;
        return 0;
}

/* The one form of a number the daemon sends: no leading zero but for 0 itself. */
static int parse_u64_canonical(const char *s, uint64_t *ret) {
        if (s[0] == '0' && s[1] != 0)
                return -EBADMSG;
        return control_parse_u64(s, ret);
}

/* "A B ... " numbers separated by single spaces; *rest: after the last one (at its separator). */
static int parse_u64s(const char *s, uint64_t *const *v, size_t n, const char **rest) {
        for (size_t i = 0; i < n; i++) {
                if (i > 0) {
                        if (*s != ' ')
                                return -EBADMSG;
                        s++;
                }
                if (parse_u64_prefix(s, &s, v[i]) < 0)
                        return -EBADMSG;
        }
        *rest = s;
        return 0;
}

/* An extent's kind follows from its depth: 0 absent, 1 local or zero (in the top image), 2 and
 * more backing. */
static bool extent_kind_fits_depth(ControlExtentKind k, uint64_t depth) {
        if (k == CONTROL_EXTENT_LOCAL || k == CONTROL_EXTENT_ZERO)
                return depth == 1;
        if (k == CONTROL_EXTENT_BACKING)
                return depth >= 2;
        return depth == 0;
}

static const char *verb_args(const char *line, const char *verb) {
        size_t n = strlen(verb);

        return strncmp(line, verb, n) == 0 && line[n] == ' ' ? line + n + 1 : NULL;
}

int control_parse_pull(const char *line, ControlPullMessage *ret) {
        const char *a, *rest;

        *ret = (ControlPullMessage) {};
        if (streq(line, "ready")) {
                ret->kind = CONTROL_PULL_READY;
                return 0;
        }
        if (streq(line, "done")) {
                ret->kind = CONTROL_PULL_DONE;
                return 0;
        }
        if ((a = verb_args(line, "error"))) {
                ret->kind = CONTROL_PULL_ERROR;
                ret->text = a;
                ret->text_len = strlen(a);
                return 0;
        }
        if ((a = verb_args(line, "progress"))) {
                ret->kind = CONTROL_PULL_PROGRESS;
                if (parse_u64s(a, (uint64_t *const[]) { &ret->done, &ret->total }, 2, &rest) < 0 || *rest)
                        return -EBADMSG;
                return 0;
        }
        if ((a = verb_args(line, "extent"))) {
                ret->kind = CONTROL_PULL_EXTENT;
                if (parse_u64s(a, (uint64_t *const[]) { &ret->offset, &ret->length, &ret->depth }, 3, &rest) < 0 ||
                        *rest != ' ')
                        return -EBADMSG;
                for (ControlExtentKind k = 0; k < _CONTROL_EXTENT_MAX; k++)
                        if (streq(rest + 1, extent_kind_table[k])) {
                                ret->extent_kind = k;
                                return extent_kind_fits_depth(k, ret->depth) ? 0 : -EBADMSG;
                        }
                return -EBADMSG;
        }
        ret->kind = CONTROL_PULL_UNKNOWN;
        return 0;
}

int control_parse_relay(const char *line, ControlRelayMessage *ret) {
        const char *a;

        *ret = (ControlRelayMessage) {};
        if (streq(line, "ready")) {
                ret->kind = CONTROL_RELAY_READY;
                return 0;
        }
        if ((a = verb_args(line, "error"))) {
                ret->kind = CONTROL_RELAY_ERROR;
                ret->text = a;
                ret->text_len = strlen(a);
                return 0;
        }
        if ((a = verb_args(line, "connect"))) {
                ret->kind = CONTROL_RELAY_CONNECT;
                return control_parse_u64(a, &ret->number);
        }
        if ((a = verb_args(line, "clients"))) {
                ret->kind = CONTROL_RELAY_CLIENTS;
                return control_parse_u64(a, &ret->number);
        }
        ret->kind = CONTROL_RELAY_UNKNOWN;
        return 0;
}

/* The builders */

static bool is_printable(char c) {
        return (unsigned char) c >= 0x20 && (unsigned char) c < 0x7f;
}

/* "error TEXT\n", the text cut to what fits and printable. */
static int format_error(char *buf, size_t size, const char *text, size_t text_len) {
        size_t n = sizeof("error ") - 1, i;

        if (size < n + 2 || !text)
                return -EMSGSIZE;
        memcpy(buf, "error ", n);
        for (i = 0; i < text_len && text[i] && n + 2 < size && n + 1 < CONTROL_MESSAGE_MAX; i++)
                buf[n++] = is_printable(text[i]) ? text[i] : '?';
        buf[n++] = '\n';
        buf[n] = 0;
        return (int) n;
}

/* snprintf() into buf, the line no longer than CONTROL_MESSAGE_MAX. */
_printf_(3, 4) static int format_line(char *buf, size_t size, const char *format, ...) {
        va_list ap;
        int n;

        va_start(ap, format);
        n = vsnprintf(buf, size, format, ap);
        va_end(ap);
        if (n < 0 || (size_t) n >= size || n > CONTROL_MESSAGE_MAX)
                return -EMSGSIZE;
        return n;
}

int control_format_pull(char *buf, size_t size, const ControlPullMessage *m) {
        switch (m->kind) {
        case CONTROL_PULL_READY:
                return format_line(buf, size, "ready\n");
        case CONTROL_PULL_DONE:
                return format_line(buf, size, "done\n");
        case CONTROL_PULL_PROGRESS:
                return format_line(buf, size, "progress %" PRIu64 " %" PRIu64 "\n", m->done, m->total);
        case CONTROL_PULL_EXTENT:
                if (!control_extent_kind_to_string(m->extent_kind))
                        return -EINVAL;
                return format_line(buf, size, "extent %" PRIu64 " %" PRIu64 " %" PRIu64 " %s\n", m->offset,
                        m->length, m->depth, control_extent_kind_to_string(m->extent_kind));
        case CONTROL_PULL_ERROR:
                return format_error(buf, size, m->text, m->text_len);
        default:
                return -EINVAL;
        }
}

int control_format_relay(char *buf, size_t size, const ControlRelayMessage *m) {
        switch (m->kind) {
        case CONTROL_RELAY_READY:
                return format_line(buf, size, "ready\n");
        case CONTROL_RELAY_CONNECT:
                return format_line(buf, size, "connect %" PRIu64 "\n", m->number);
        case CONTROL_RELAY_CLIENTS:
                return format_line(buf, size, "clients %" PRIu64 "\n", m->number);
        case CONTROL_RELAY_ERROR:
                return format_error(buf, size, m->text, m->text_len);
        default:
                return -EINVAL;
        }
}

int control_format_command(char *buf, size_t size, const ControlCommand *m) {
        switch (m->kind) {
        case CONTROL_COMMAND_STOP:
                return format_line(buf, size, "stop\n");
        case CONTROL_COMMAND_PAUSE:
                return format_line(buf, size, "pause\n");
        case CONTROL_COMMAND_RESUME:
                return format_line(buf, size, "resume\n");
        case CONTROL_COMMAND_BANDWIDTH:
                return format_line(buf, size, "bandwidth %" PRIu64 "\n", m->number);
        case CONTROL_COMMAND_UPSTREAM:
                return format_line(buf, size, "upstream %" PRIu64 "\n", m->number);
        case CONTROL_COMMAND_REFUSED:
                /* The relay takes a cut line for garbage: the reason is cut, never the line. */
                for (const char *p = strempty(m->text); *p; p++)
                        if (!is_printable(*p))
                                return -EINVAL;
                return format_line(buf, size, "refused %" PRIu64 " %.200s\n", m->number, strempty(m->text));
        default:
                return -EINVAL;
        }
}

/* What the daemon says to a helper */

int control_parse_command(char *buf, size_t len, ControlCommand *ret) {
        const char *a, *end;
        int r;

        *ret = (ControlCommand) {};
        r = control_frame(buf, len);
        if (r < 0)
                return r;
        for (const char *p = buf; *p; p++)
                if (!is_printable(*p))
                        return -EBADMSG;

        if (streq(buf, "stop"))
                ret->kind = CONTROL_COMMAND_STOP;
        else if (streq(buf, "pause"))
                ret->kind = CONTROL_COMMAND_PAUSE;
        else if (streq(buf, "resume"))
                ret->kind = CONTROL_COMMAND_RESUME;
        else if ((a = verb_args(buf, "bandwidth"))) {
                ret->kind = CONTROL_COMMAND_BANDWIDTH;
                return parse_u64_canonical(a, &ret->number);
        } else if ((a = verb_args(buf, "upstream"))) {
                ret->kind = CONTROL_COMMAND_UPSTREAM;
                return parse_u64_canonical(a, &ret->number);
        } else if ((a = verb_args(buf, "refused"))) {
                ret->kind = CONTROL_COMMAND_REFUSED;
                /* "ID" or "ID TEXT": the id ends at the first space. */
                if (parse_u64_prefix(a, &end, &ret->number) < 0 || (a[0] == '0' && end > a + 1) ||
                        (*end != 0 && *end != ' '))
                        return -EBADMSG;
                ret->text = *end ? end + 1 : end;
        } else
                ret->kind = CONTROL_COMMAND_UNKNOWN;
        return 0;
}

size_t control_command_n_fds(ControlCommandKind k) {
        return k == CONTROL_COMMAND_UPSTREAM ? 1 : 0;
}

/* Sending and receiving */

int control_send(int fd, int flags, const char *buf, size_t len) {
        for (;;) {
                if (send(fd, buf, len, flags) >= 0)
                        return 0;
                if (errno != EINTR)
                        return -errno;
        }
}

int control_send_fd(int fd, int flags, const char *buf, size_t len, int pass_fd) {
        union {
                struct cmsghdr h;
                char b[CMSG_SPACE(sizeof(int))];
        } control = {};
        struct iovec iov = { .iov_base = (void *) buf, .iov_len = len };
        struct msghdr mh = {
                .msg_iov = &iov,
                .msg_iovlen = 1,
                .msg_control = &control,
                .msg_controllen = sizeof(control.b),
        };
        struct cmsghdr *c = CMSG_FIRSTHDR(&mh);

        if (pass_fd < 0)
                return control_send(fd, flags, buf, len);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &pass_fd, sizeof(int));
        for (;;) {
                if (sendmsg(fd, &mh, flags) >= 0)
                        return 0;
                if (errno != EINTR)
                        return -errno;
        }
}

/* n: the builder's answer for line, a length or -errno. */
static int send_built(int fd, int flags, const char *line, int n, int pass_fd) {
        if (n < 0)
                return n;
        return control_send_fd(fd, flags, line, (size_t) n, pass_fd);
}

int control_send_pull(int fd, int flags, const ControlPullMessage *m) {
        char line[CONTROL_MESSAGE_MAX + 1];

        return send_built(fd, flags, line, control_format_pull(line, sizeof(line), m), -1);
}

int control_send_relay(int fd, int flags, const ControlRelayMessage *m) {
        char line[CONTROL_MESSAGE_MAX + 1];

        return send_built(fd, flags, line, control_format_relay(line, sizeof(line), m), -1);
}

int control_send_command(int fd, int flags, const ControlCommand *m, int pass_fd) {
        char line[CONTROL_MESSAGE_MAX + 1];

        return send_built(fd, flags, line, control_format_command(line, sizeof(line), m), pass_fd);
}

int control_send_error(int fd, const char *text) {
        const int flags = MSG_DONTWAIT | MSG_NOSIGNAL;
        char line[CONTROL_MESSAGE_MAX + 1];
        struct pollfd p = { .fd = fd, .events = POLLOUT };
        int n, r;

        n = format_error(line, sizeof(line), text, strlen(text));
        if (n < 0)
                return n;
        /* The daemon may be gone or stuck: don't wait for it forever. */
        r = control_send(fd, flags, line, (size_t) n);
        if (r == -EAGAIN && poll(&p, 1, CONTROL_ERROR_SEND_TIMEOUT_MSEC) > 0 && (p.revents & POLLOUT))
                r = control_send(fd, flags, line, (size_t) n);
        return r;
}

void control_datagram_close_fds(ControlDatagram *d) {
        for (size_t i = 0; i < d->n_fds; i++)
                if (d->fds[i] >= 0) {
                        close(d->fds[i]);
                        d->fds[i] = -1;
                }
}

int control_receive_datagram(int fd, ControlDatagram *ret) {
        union {
                struct cmsghdr align;
                char buf[CMSG_SPACE(sizeof(int) * CONTROL_FDS_MAX)];
        } control;
        struct iovec iov = { .iov_base = ret->buf, .iov_len = CONTROL_MESSAGE_MAX + 1 };
        struct msghdr mh = {
                .msg_iov = &iov,
                .msg_iovlen = 1,
                .msg_control = &control,
                .msg_controllen = sizeof(control),
        };
        bool bad_cmsg = false;
        ssize_t n;

        ret->len = ret->n_fds = 0;
        for (;;) {
                n = recvmsg(fd, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
                if (n >= 0)
                        break;
                if (errno == EAGAIN)
                        return 0;
                if (errno == ECONNRESET)
                        return -ECONNRESET;
                if (errno != EINTR)
                        return -errno;
        }

        for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
                if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) {
                        bad_cmsg = true;
                        continue;
                }
                for (size_t i = 0; i < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int); i++) {
                        int passed;

                        memcpy(&passed, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
                        if (ret->n_fds < CONTROL_FDS_MAX)
                                ret->fds[ret->n_fds++] = passed;
                        else
                                close(passed);
                }
        }

        if (n == 0 && ret->n_fds == 0 && !bad_cmsg)
                return -ECONNRESET;
        if (bad_cmsg || (mh.msg_flags & MSG_CTRUNC)) {
                control_datagram_close_fds(ret);
                return -EBADMSG;
        }
        if ((mh.msg_flags & MSG_TRUNC) || n > CONTROL_MESSAGE_MAX) {
                control_datagram_close_fds(ret);
                return -EMSGSIZE;
        }
        ret->len = (size_t) n;
        ret->buf[n] = 0;
        return 1;
}
