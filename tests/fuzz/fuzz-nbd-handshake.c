/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The relay's NBD handshake (service/helpers/nbd-handshake.c) between a hostile client and a
 * hostile upstream server: neg_step() as blockstream-nbd-relay runs it, with arbitrary bytes from
 * both sides. Its two sockets are modelled here, in memory: the binary is linked with
 * -Wl,--wrap=recv,--wrap=send (tests/fuzz/build-and-run), so that neg_step()'s own recv() and
 * send() calls, unchanged, land in __wrap_recv()/__wrap_send() below for the two fds it is given.
 * A real socket pair costs ~15 system calls per input plus one per probe, which made this target
 * spend most of its time in the kernel; the model keeps what the relay can observe of a unix
 * stream socket: a read returns what is there (up to what was asked), 0 at the peer's EOF once
 * all is read, EAGAIN otherwise; a write takes what fits in the socket buffer, EAGAIN when it is
 * full (and both must be MSG_DONTWAIT: a blocking call would hang the relay).
 * test-nbd-handshake.c runs the same code over real socket pairs. The input:
 *   byte 0        bit 0: the pinned name is EXPORT_NAME_MAX characters long (else "bsx-1");
 *                 bit 1: the relay's send buffers are small (bits 2-7: 1 to ~4.6 KiB, the
 *                 kernel's smallest SO_SNDBUF), so that its writes stop part way (anywhere) and
 *                 go on in a later step
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
#include <limits.h>
#include <unistd.h>

#include "nbd-handshake.h"
#include "socket-model.h"
#include "util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* What the relay wrote, kept for the checks; an option is amplified at most ~20 times (LIST with
 * the long name), so 64 KiB of input stays well below this. */
#define SINK_MAX (4 * 1024 * 1024)
/* The relay's messages (NEG_OUT_MAX) always fit in SNDBUF_DEFAULT (socket-model.h). */
/* The two fds neg_step() is given: no real fd has these numbers. */
#define FD_CLIENT (INT_MAX - 1)
#define FD_UPSTREAM (INT_MAX - 2)

/* The relay's bytes to a peer: all of them kept, of which `queued` are still in the socket
 * buffer (cap bytes), not yet read by the peer. */
typedef struct Sink {
        size_t len, queued, cap;
        uint8_t buf[SINK_MAX];
} Sink;

static Source from_client, from_upstream;
static Sink to_client, to_upstream;
static char long_name[EXPORT_NAME_MAX + 1];

ssize_t __real_recv(int fd, void *buf, size_t len, int flags);
ssize_t __real_send(int fd, const void *buf, size_t len, int flags);
ssize_t __wrap_recv(int fd, void *buf, size_t len, int flags);
ssize_t __wrap_send(int fd, const void *buf, size_t len, int flags);

ssize_t __wrap_recv(int fd, void *buf, size_t len, int flags) {
        Source *s = fd == FD_CLIENT ? &from_client : fd == FD_UPSTREAM ? &from_upstream : NULL;

        if (!s)
                return __real_recv(fd, buf, len, flags);
        CHECK(flags & MSG_DONTWAIT);
        return source_recv(s, buf, len);
}

ssize_t __wrap_send(int fd, const void *buf, size_t len, int flags) {
        Sink *s = fd == FD_CLIENT ? &to_client : fd == FD_UPSTREAM ? &to_upstream : NULL;
        ssize_t r;
        size_t k;

        if (!s)
                return __real_send(fd, buf, len, flags);
        CHECK(flags & MSG_DONTWAIT);
        CHECK(len > 0);
        r = socket_room(s->queued, s->cap, len);
        if (r < 0)
                return r;
        k = (size_t) r;
        CHECK(k <= SINK_MAX - s->len); /* the sink is big enough for any input */
        memcpy(s->buf + s->len, buf, k);
        s->len += k;
        s->queued += k;
        return (ssize_t) k;
}

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

/* The peer reads everything that is there now; returns how much. */
static size_t drain(Sink *s) {
        size_t k = s->queued;

        s->queued = 0;
        return k;
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

/* EXPORT_NAME's answer as the client asked for it: size, flags, and the zeroes unless it set
 * NBD_FLAG_C_NO_ZEROES. */
static size_t export_reply_size(const uint8_t *client, size_t client_len) {
        return NBD_EXPORT_REPLY_SIZE +
               (client_len >= 4 && (be32(client) & NBD_FLAG_C_NO_ZEROES) ? 0 : NBD_EXPORT_REPLY_ZEROES);
}

/* What went to the client; export_reply: the size of EXPORT_NAME's answer at its end, or 0. */
static void check_client(const uint8_t *up, size_t up_len, size_t export_reply) {
        const uint8_t *b = to_client.buf;
        size_t len = to_client.len, end, p;

        if (len == 0)
                return;
        CHECK(len >= NBD_GREETING_SIZE && up_len >= NBD_GREETING_SIZE && memcmp(b, up, NBD_GREETING_SIZE) == 0);
        end = len;
        if (export_reply) {
                /* size, flags (then the zeroes, passed on as they came) */
                CHECK(len >= NBD_GREETING_SIZE + export_reply);
                end = len - export_reply;
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
        const uint8_t *client, size_t client_consumed, const uint8_t *up, size_t up_consumed, size_t export_reply) {
        size_t p, end;

        for (p = 4; p < client_consumed;) {
                CHECK(client_consumed - p >= NBD_OPT_HEADER_SIZE);
                p += NBD_OPT_HEADER_SIZE + be32(client + p + 12);
        }
        CHECK(p == client_consumed);

        CHECK(up_consumed >= NBD_GREETING_SIZE + export_reply);
        end = up_consumed - export_reply;
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
        size_t up_len, client_len, sent = 0, option_at = 0, option_len = 0, mark = 0, cap;
        const char *pinned;
        bool export_name, shut = false;
        int r;

        if (size < 3)
                return 0;
        log_set_max_level(0);
        if (!long_name[0])
                memset(long_name, 'x', EXPORT_NAME_MAX);
        pinned = data[0] & 1 ? long_name : "bsx-1";
        CHECK(neg_pin_export(pinned) == 0);
        /* 1 .. 4600 bytes: the kernel's smallest send buffer (SO_SNDBUF 1) takes ~2-4 KiB. */
        cap = data[0] & 2 ? 1 + (size_t) (data[0] >> 2) * 73 : SNDBUF_DEFAULT;
        up_len = MIN((size_t) ((data[1] << 8) | data[2]), size - 3);
        up = data + 3;
        client = up + up_len;
        client_len = size - 3 - up_len;

        /* The upstream's bytes are all there at once, then its EOF; the client's come one message
         * at a time, each once the relay waits for more, so that what it did with each option can
         * be told. */
        from_upstream = (Source){.data = up, .avail = up_len, .eof = true};
        from_client = (Source){.data = client};
        to_client.len = to_client.queued = to_upstream.len = to_upstream.queued = 0;
        to_client.cap = to_upstream.cap = cap;

        neg_start(&n);
        for (;;) {
                size_t next, before = from_client.pos + from_upstream.pos + to_client.len + to_upstream.len;

                r = neg_step(&n, 1, FD_CLIENT, FD_UPSTREAM);
                if (r != 0)
                        break;
                /* A full socket buffer, a turn's bound reached (poll() would call again at once),
                 * or it waits for the client: the upstream's bytes are all there, and its EOF. */
                if (drain(&to_client) + drain(&to_upstream) > 0 ||
                        from_client.pos + from_upstream.pos + to_client.len + to_upstream.len != before)
                        continue;
                CHECK(!shut && !neg_waits_upstream(&n));
                /* The last option is done with: what did it send on? */
                if (option_len > 0)
                        check_forwarded(
                                client + option_at, option_len, to_upstream.buf + mark, to_upstream.len - mark, pinned);
                if (sent == client_len) {
                        from_client.eof = true;
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
                sent += next;
                from_client.avail = sent;
        }

        export_name = check_upstream(client, client_len, pinned);
        check_client(up, up_len, r == 1 && export_name ? export_reply_size(client, client_len) : 0);
        if (r == 1) {
                CHECK(n.state == NEG_DONE);
                check_boundaries(client, from_client.pos, up, from_upstream.pos,
                        export_name ? export_reply_size(client, client_len) : 0);
        } else
                CHECK(r < 0);
        /* The option it ended on: GO or EXPORT_NAME sent on, or one that closed the pair. */
        if (option_len > 0)
                check_forwarded(client + option_at, option_len, to_upstream.buf + mark, to_upstream.len - mark, pinned);
        return 0;
}
