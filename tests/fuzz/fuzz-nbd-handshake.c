/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The relay's NBD handshake (service/helpers/nbd-handshake.c) between a hostile client and a
 * hostile upstream server: neg_step() over two real socket pairs, as blockstream-nbd-relay runs
 * it, with arbitrary bytes from both sides. The input:
 *   byte 0        bit 0: the pinned name is EXPORT_NAME_MAX characters long (else "bsx-1");
 *                 bit 1: the relay's send buffers are as small as the kernel allows, so that its
 *                 writes stop half way and go on in a later step
 *   bytes 1-2     U, big-endian: how many of the bytes that follow come from the upstream
 *   U bytes       upstream → relay (greeting, replies)
 *   the rest      client → relay (flags, options)
 * The upstream's stream is whole before the first step and ends in EOF; the client's is sent one
 * message at a time, the next once the relay waits for it (the handshake is lock-step), and the
 * end of the input is its EOF. Besides the sanitizers, what the relay promises
 * (nbd-relay.c's table) is checked on what it wrote:
 *   - to the upstream: the client's flags, then only options it forwards (EXPORT_NAME, INFO,
 *     GO, LIST/SET_META_CONTEXT, STRUCTURED_REPLY), whole, each naming the pinned export, and
 *     each one a client's option that named the pinned export or "" (the rest as it came);
 *   - to the client: the server's greeting, then whole replies (magic, bounded length) and an
 *     export's transmission flags that always carry NBD_FLAG_READ_ONLY (NBD_INFO_EXPORT, or
 *     EXPORT_NAME's answer);
 *   - once the transmission phase starts, nothing was read ahead: what the relay consumed of
 *     each side ends exactly on a message boundary. */

#include <endian.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "nbd-handshake.h"
#include "util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(x) \
        do { \
                if (!(x)) \
                        abort(); \
        } while (0)

/* What the relay wrote, kept for the checks; an option is amplified at most ~20 times (LIST with
 * the long name), so 64 KiB of input stays well below this. */
#define SINK_MAX (4 * 1024 * 1024)

typedef struct Sink {
        size_t len;
        uint8_t buf[SINK_MAX];
} Sink;

static Sink to_client, to_upstream;
static char long_name[EXPORT_NAME_MAX + 1];

static uint32_t be32(const uint8_t *p) {
        uint32_t v;
        memcpy(&v, p, sizeof(v));
        return be32toh(v);
}

static uint64_t be64(const uint8_t *p) {
        uint64_t v;
        memcpy(&v, p, sizeof(v));
        return be64toh(v);
}

static void send_all(int fd, const uint8_t *p, size_t len) {
        while (len > 0) {
                ssize_t k = send(fd, p, len, MSG_NOSIGNAL);
                CHECK(k > 0);
                p += k;
                len -= (size_t) k;
        }
}

/* Everything that is there now; returns how much. */
static size_t drain(int fd, Sink *s) {
        size_t total = 0;

        for (;;) {
                uint8_t scratch[16384];
                uint8_t *p = s && s->len < SINK_MAX ? s->buf + s->len : scratch;
                size_t room = s && s->len < SINK_MAX ? MIN(SINK_MAX - s->len, sizeof(scratch)) : sizeof(scratch);
                ssize_t k = recv(fd, p, room, MSG_DONTWAIT);

                if (k < 0) {
                        CHECK(errno == EAGAIN);
                        return total;
                }
                if (k == 0)
                        return total;
                CHECK(!s || p != scratch); /* the sink is big enough for any input */
                if (s)
                        s->len += (size_t) k;
                total += (size_t) k;
        }
}

static bool is_pinned(const uint8_t *name, size_t len, const char *pinned) {
        return len == strlen(pinned) && memcmp(name, pinned, len) == 0;
}

/* What went upstream; returns whether the last option was EXPORT_NAME. */
static bool check_upstream(const uint8_t *client, size_t client_len, const char *pinned) {
        const uint8_t *b = to_upstream.buf;
        size_t len = to_upstream.len, p;
        bool export_name = false;

        if (len == 0)
                return false;
        /* The client's flags, as they came. */
        CHECK(len >= 4 && client_len >= 4 && memcmp(b, client, 4) == 0);
        for (p = 4; p < len;) {
                uint32_t option, l;
                const uint8_t *d;

                CHECK(len - p >= NBD_OPT_HEADER_SIZE);
                CHECK(be64(b + p) == NBD_OPTS_MAGIC);
                option = be32(b + p + 8);
                l = be32(b + p + 12);
                CHECK(l <= NEG_OUT_MAX - NBD_OPT_HEADER_SIZE && l <= len - p - NBD_OPT_HEADER_SIZE);
                d = b + p + NBD_OPT_HEADER_SIZE;
                CHECK(!export_name); /* nothing after EXPORT_NAME */
                switch (option) {
                case NBD_OPT_EXPORT_NAME:
                        CHECK(is_pinned(d, l, pinned));
                        export_name = true;
                        break;
                case NBD_OPT_INFO:
                case NBD_OPT_GO:
                case NBD_OPT_LIST_META_CONTEXT:
                case NBD_OPT_SET_META_CONTEXT:
                        CHECK(l >= 4 && be32(d) <= l - 4 && is_pinned(d + 4, be32(d), pinned));
                        break;
                case NBD_OPT_STRUCTURED_REPLY:
                        break;
                default:
                        abort(); /* answered here, never forwarded */
                }
                p += NBD_OPT_HEADER_SIZE + l;
        }
        return export_name;
}

/* What went to the client. */
static void check_client(const uint8_t *up, size_t up_len, bool export_reply) {
        const uint8_t *b = to_client.buf;
        size_t len = to_client.len, end, p;

        if (len == 0)
                return;
        CHECK(len >= NBD_GREETING_SIZE && up_len >= NBD_GREETING_SIZE && memcmp(b, up, NBD_GREETING_SIZE) == 0);
        end = len;
        if (export_reply) {
                /* size, flags */
                CHECK(len >= NBD_GREETING_SIZE + NBD_EXPORT_REPLY_SIZE);
                end = len - NBD_EXPORT_REPLY_SIZE;
                CHECK((b[end + 9] & (NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY)) ==
                        (NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY));
        }
        for (p = NBD_GREETING_SIZE; p < end;) {
                uint32_t type, l;
                const uint8_t *d;

                CHECK(end - p >= NBD_REP_HEADER_SIZE);
                CHECK(be64(b + p) == NBD_REP_MAGIC);
                type = be32(b + p + 12);
                l = be32(b + p + 16);
                CHECK(l <= NBD_REP_DATA_MAX && l <= end - p - NBD_REP_HEADER_SIZE);
                d = b + p + NBD_REP_HEADER_SIZE;
                if (type == NBD_REP_INFO && l >= 2 && ((d[0] << 8) | d[1]) == NBD_INFO_EXPORT)
                        CHECK(l == 12 && (d[11] & (NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY)) ==
                                                 (NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY));
                p += NBD_REP_HEADER_SIZE + l;
        }
}

/* The transmission phase started: the relay read exactly whole messages of each side. */
static void check_boundaries(
        const uint8_t *client, size_t client_consumed, const uint8_t *up, size_t up_consumed, bool export_reply) {
        size_t p, end;

        for (p = 4; p < client_consumed;) {
                CHECK(client_consumed - p >= NBD_OPT_HEADER_SIZE);
                p += NBD_OPT_HEADER_SIZE + be32(client + p + 12);
        }
        CHECK(p == client_consumed);

        CHECK(up_consumed >= NBD_GREETING_SIZE + (export_reply ? NBD_EXPORT_REPLY_SIZE : 0));
        end = up_consumed - (export_reply ? NBD_EXPORT_REPLY_SIZE : 0);
        for (p = NBD_GREETING_SIZE; p < end;) {
                CHECK(end - p >= NBD_REP_HEADER_SIZE);
                p += NBD_REP_HEADER_SIZE + be32(up + p + 16);
        }
        CHECK(p == end);
}

/* The client's option at c (cl bytes, maybe cut short by the end of the input) was handled, and
 * u (ul bytes) is what went upstream meanwhile: nothing (answered here, or refused), or that
 * option, whole, sent on under the pinned name only if the client named the pinned export or "". */
static void check_forwarded(const uint8_t *c, size_t cl, const uint8_t *u, size_t ul, const char *pinned) {
        uint32_t option, name_len;
        const uint8_t *cd = c + NBD_OPT_HEADER_SIZE, *ud = u + NBD_OPT_HEADER_SIZE;
        size_t cdl, udl;

        if (ul == 0)
                return;
        CHECK(cl >= NBD_OPT_HEADER_SIZE && ul >= NBD_OPT_HEADER_SIZE);
        option = be32(c + 8);
        CHECK(be32(u + 8) == option);
        cdl = cl - NBD_OPT_HEADER_SIZE;
        udl = ul - NBD_OPT_HEADER_SIZE;
        CHECK(be32(c + 12) == cdl && be32(u + 12) == udl); /* whole, both */
        switch (option) {
        case NBD_OPT_EXPORT_NAME:
                CHECK(cdl == 0 || is_pinned(cd, cdl, pinned));
                break;
        case NBD_OPT_INFO:
        case NBD_OPT_GO:
        case NBD_OPT_LIST_META_CONTEXT:
        case NBD_OPT_SET_META_CONTEXT:
                CHECK(cdl >= 4);
                name_len = be32(cd);
                CHECK(name_len <= cdl - 4 && (name_len == 0 || is_pinned(cd + 4, name_len, pinned)));
                /* What follows the name, as the client sent it. */
                CHECK(udl - 4 - strlen(pinned) == cdl - 4 - name_len &&
                        memcmp(ud + 4 + strlen(pinned), cd + 4 + name_len, cdl - 4 - name_len) == 0);
                break;
        case NBD_OPT_STRUCTURED_REPLY:
                CHECK(udl == cdl && memcmp(ud, cd, cdl) == 0);
                break;
        default:
                abort();
        }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        static Negotiation n;
        const uint8_t *up, *client;
        size_t up_len, client_len, sent = 0, option_at = 0, option_len = 0, mark = 0;
        const char *pinned;
        int a[2], b[2], r;
        bool export_name, shut = false;

        if (size < 3)
                return 0;
        log_set_max_level(0);
        if (!long_name[0])
                memset(long_name, 'x', EXPORT_NAME_MAX);
        pinned = data[0] & 1 ? long_name : "bsx-1";
        CHECK(neg_pin_export(pinned) == 0);
        up_len = MIN((size_t) ((data[1] << 8) | data[2]), size - 3);
        up = data + 3;
        client = up + up_len;
        client_len = size - 3 - up_len;

        /* a: the client's end [0], the relay's [1]; b: the upstream's [0], the relay's [1]. The
         * upstream's bytes are all there at once; the client's come one message at a time, each
         * once the relay waits for more, so that what it did with each option can be told. */
        CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, a) == 0);
        CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, b) == 0);
        if (data[0] & 2) {
                int one = 1;

                CHECK(setsockopt(a[1], SOL_SOCKET, SO_SNDBUF, &one, sizeof(one)) == 0);
                CHECK(setsockopt(b[1], SOL_SOCKET, SO_SNDBUF, &one, sizeof(one)) == 0);
        }
        send_all(b[0], up, up_len);
        CHECK(shutdown(b[0], SHUT_WR) == 0);

        to_client.len = to_upstream.len = 0;
        neg_start(&n);
        for (;;) {
                size_t next;

                r = neg_step(&n, 1, a[1], b[1]);
                if (r != 0)
                        break;
                /* A full socket buffer, or it waits for the client: the upstream's bytes are all
                 * there, and its EOF. */
                if (drain(a[0], &to_client) + drain(b[0], &to_upstream) > 0)
                        continue;
                CHECK(!shut && !neg_waits_upstream(&n));
                /* The last option is done with: what did it send on? */
                if (option_len > 0)
                        check_forwarded(
                                client + option_at, option_len, to_upstream.buf + mark, to_upstream.len - mark, pinned);
                if (sent == client_len) {
                        CHECK(shutdown(a[0], SHUT_WR) == 0);
                        shut = true;
                        continue;
                }
                /* The next message: the flags, or an option (header and data). */
                if (sent < 4)
                        next = MIN((size_t) 4, client_len) - sent;
                else if (client_len - sent < NBD_OPT_HEADER_SIZE)
                        next = client_len - sent;
                else
                        next = MIN(NBD_OPT_HEADER_SIZE + (size_t) be32(client + sent + 12), client_len - sent);
                option_at = sent;
                option_len = sent < 4 ? 0 : next;
                mark = to_upstream.len;
                send_all(a[0], client + sent, next);
                sent += next;
        }
        drain(a[0], &to_client);
        drain(b[0], &to_upstream);

        export_name = check_upstream(client, client_len, pinned);
        check_client(up, up_len, r == 1 && export_name);
        if (r == 1) {
                size_t client_left = drain(a[1], NULL), up_left = drain(b[1], NULL);

                CHECK(n.state == NEG_DONE);
                check_boundaries(client, sent - client_left, up, up_len - up_left, export_name);
        } else
                CHECK(r < 0);
        /* The option it ended on: GO or EXPORT_NAME sent on, or one that closed the pair. */
        if (option_len > 0)
                check_forwarded(client + option_at, option_len, to_upstream.buf + mark, to_upstream.len - mark, pinned);

        close(a[0]);
        close(a[1]);
        close(b[0]);
        close(b[1]);
        return 0;
}
