/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The relay's transmission phase (service/helpers/nbd-transmission.c) between a hostile client
 * and a hostile server: tx_step() as blockstream-nbd-relay runs it, with arbitrary bytes from both
 * sides. As in fuzz-nbd-handshake.c, the sockets and the pipe are modelled in memory: the binary
 * is linked with -Wl,--wrap= for recv, send, splice, shutdown and pipe2 (tests/fuzz/build-and-run),
 * so that tx_step()'s own calls land here for the fds it is given. The model keeps what the relay
 * can observe: a read returns what is there (up to what was asked), 0 at the peer's EOF, EAGAIN
 * otherwise; a write or a splice takes what fits (a socket's buffer, the pipe's 64 KiB), EAGAIN
 * when full. The input:
 *   byte 0        bits 0-3: the server's bytes are released 1 + 37 * N at a time, each time the
 *                 relay waits (so that replies can follow the requests they answer); bits 4-7:
 *                 the client's socket buffer takes 1 + 4099 * N bytes (0: the default)
 *   bytes 1-2     U, big-endian: how many of the bytes that follow come from the server
 *   U bytes       server → relay (replies), then its EOF
 *   the rest      client → relay (requests), all there at once, then its EOF
 * Besides the sanitizers, what nbd-transmission.h promises is checked at every step:
 *   - what went to the server is a prefix of what the client sent, of whole requests only, each
 *     a READ of at most 32 MiB, FLUSH, CACHE, BLOCK_STATUS or DISC, nothing after DISC;
 *   - at no time are more than 16 requests in flight, nor reads of more than 32 MiB (requests sent
 *     on, minus those whose reply the relay has read to its end);
 *   - what went to the client is a prefix of what the server sent: replies pass unchanged. */

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "nbd-transmission.h"
#include "nbd-wire.h"
#include "util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(x) \
        do { \
                if (!(x)) \
                        abort(); \
        } while (0)

#define FD_CLIENT (INT_MAX - 1)
#define FD_SERVER (INT_MAX - 2)
#define FD_PIPE_R (INT_MAX - 3)
#define FD_PIPE_W (INT_MAX - 4)
#define PIPE_CAP 65536
#define SNDBUF_DEFAULT 212992

typedef struct Source {
        const uint8_t *data;
        size_t avail, pos, total;
        bool eof;
} Source;

typedef struct Sink {
        const uint8_t *want; /* what it must be a prefix of */
        size_t want_len, len, queued, cap;
        bool shut;
} Sink;

static Source from_client, from_server;
static Sink to_client, to_server;
static size_t pipe_len;                     /* bytes in the pipe: from_server, not yet to_client */
static uint8_t pipe_buf[PIPE_CAP];

ssize_t __real_recv(int fd, void *buf, size_t len, int flags);
ssize_t __real_send(int fd, const void *buf, size_t len, int flags);
ssize_t __real_splice(int in, loff_t *off_in, int out, loff_t *off_out, size_t len, unsigned flags);
int __real_shutdown(int fd, int how);
int __real_pipe2(int fds[2], int flags);
ssize_t __wrap_recv(int fd, void *buf, size_t len, int flags);
ssize_t __wrap_send(int fd, const void *buf, size_t len, int flags);
ssize_t __wrap_splice(int in, loff_t *off_in, int out, loff_t *off_out, size_t len, unsigned flags);
int __wrap_shutdown(int fd, int how);
int __wrap_pipe2(int fds[2], int flags);

static Source *source_of(int fd) {
        return fd == FD_CLIENT ? &from_client : fd == FD_SERVER ? &from_server : NULL;
}

static Sink *sink_of(int fd) {
        return fd == FD_CLIENT ? &to_client : fd == FD_SERVER ? &to_server : NULL;
}

ssize_t __wrap_recv(int fd, void *buf, size_t len, int flags) {
        Source *s = source_of(fd);
        size_t k;

        if (!s)
                return __real_recv(fd, buf, len, flags);
        CHECK(flags & MSG_DONTWAIT);
        CHECK(len > 0);
        if (s->pos == s->avail) {
                if (s->eof)
                        return 0;
                errno = EAGAIN;
                return -1;
        }
        k = MIN(len, s->avail - s->pos);
        memcpy(buf, s->data + s->pos, k);
        s->pos += k;
        return (ssize_t) k;
}

/* k bytes at buf go to sink s: checked against what they must repeat. */
static void sink_take(Sink *s, const void *buf, size_t k) {
        CHECK(!s->shut);
        CHECK(k <= s->want_len - s->len && memcmp(s->want + s->len, buf, k) == 0);
        s->len += k;
        s->queued += k;
}

ssize_t __wrap_send(int fd, const void *buf, size_t len, int flags) {
        Sink *s = sink_of(fd);
        size_t k;

        if (!s)
                return __real_send(fd, buf, len, flags);
        CHECK(flags & MSG_DONTWAIT);
        CHECK(len > 0);
        if (s->queued >= s->cap) {
                errno = EAGAIN;
                return -1;
        }
        k = MIN(len, s->cap - s->queued);
        sink_take(s, buf, k);
        return (ssize_t) k;
}

ssize_t __wrap_splice(int in, loff_t *off_in, int out, loff_t *off_out, size_t len, unsigned flags) {
        size_t k;

        if (in == FD_SERVER && out == FD_PIPE_W) {
                CHECK(!off_in && !off_out && (flags & SPLICE_F_NONBLOCK) && len > 0);
                if (from_server.pos == from_server.avail) {
                        if (from_server.eof)
                                return 0;
                        errno = EAGAIN;
                        return -1;
                }
                if (pipe_len == PIPE_CAP) {
                        errno = EAGAIN;
                        return -1;
                }
                k = MIN(MIN(len, from_server.avail - from_server.pos), PIPE_CAP - pipe_len);
                memcpy(pipe_buf + pipe_len, from_server.data + from_server.pos, k);
                from_server.pos += k;
                pipe_len += k;
                return (ssize_t) k;
        }
        if (in == FD_PIPE_R && out == FD_CLIENT) {
                CHECK(!off_in && !off_out && (flags & SPLICE_F_NONBLOCK) && len > 0);
                if (pipe_len == 0 || to_client.queued >= to_client.cap) {
                        errno = EAGAIN;
                        return -1;
                }
                k = MIN(MIN(len, pipe_len), to_client.cap - to_client.queued);
                sink_take(&to_client, pipe_buf, k);
                memmove(pipe_buf, pipe_buf + k, pipe_len - k);
                pipe_len -= k;
                return (ssize_t) k;
        }
        CHECK(in != FD_CLIENT && in != FD_SERVER && out != FD_CLIENT && out != FD_SERVER);
        return __real_splice(in, off_in, out, off_out, len, flags);
}

int __wrap_shutdown(int fd, int how) {
        Sink *s = sink_of(fd);

        if (!s)
                return __real_shutdown(fd, how);
        CHECK(how == SHUT_WR && !s->shut);
        s->shut = true;
        return 0;
}

int __wrap_pipe2(int fds[2], int flags) {
        CHECK(flags & O_NONBLOCK);
        fds[0] = FD_PIPE_R;
        fds[1] = FD_PIPE_W;
        return 0;
}

static uint64_t cost(uint16_t type, uint32_t length) {
        return type == NBD_CMD_READ ? length : 0;
}

/* What went to the server: whole, allowed requests (the last may be still partly sent). */
static void check_requests(size_t *checked, bool *disc) {
        while (to_server.len - *checked >= NBD_REQUEST_SIZE) {
                const uint8_t *p = to_server.want + *checked;
                uint16_t type = get_be16(p + 6);

                CHECK(!*disc);
                CHECK(get_be32(p) == NBD_REQUEST_MAGIC);
                CHECK(type == NBD_CMD_READ || type == NBD_CMD_FLUSH || type == NBD_CMD_CACHE ||
                        type == NBD_CMD_BLOCK_STATUS || type == NBD_CMD_DISC);
                CHECK(type != NBD_CMD_READ || get_be32(p + 24) <= NBD_READ_MAX);
                *disc = type == NBD_CMD_DISC;
                *checked += NBD_REQUEST_SIZE;
        }
}

/* The relay's own count of what is in flight: bounded, and what its table holds. */
static void check_in_flight(const Transmission *t) {
        uint64_t sum = 0;

        CHECK(t->n_in_flight <= TX_IN_FLIGHT_MAX);
        for (unsigned i = 0; i < t->n_in_flight; i++)
                sum += cost(t->in_flight[i].type, t->in_flight[i].length);
        CHECK(sum == t->read_bytes && sum <= TX_READ_BYTES_MAX);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        static Transmission t;
        size_t server_len, client_len, release, checked = 0;
        bool disc = false;
        int r;

        if (size < 3)
                return 0;
        log_set_max_level(0);
        release = 1 + (size_t) (data[0] & 15) * 37;
        server_len = MIN((size_t) ((data[1] << 8) | data[2]), size - 3);
        client_len = size - 3 - server_len;
        from_server = (Source) { .data = data + 3, .total = server_len };
        from_client = (Source) { .data = data + 3 + server_len, .avail = client_len, .total = client_len, .eof = true };
        to_server = (Sink) { .want = from_client.data, .want_len = client_len, .cap = SNDBUF_DEFAULT };
        to_client = (Sink) { .want = from_server.data,
                .want_len = server_len,
                .cap = data[0] >> 4 ? 1 + (size_t) (data[0] >> 4) * 4099 : SNDBUF_DEFAULT };
        pipe_len = 0;

        CHECK(tx_open(&t) == 0);
        for (unsigned steps = 0;; steps++) {
                size_t queued;

                CHECK(steps < 1000000);
                r = tx_step(&t, 1, FD_CLIENT, FD_SERVER);
                check_requests(&checked, &disc);
                check_in_flight(&t);
                if (r != 0)
                        break;
                /* The peers read what was written; the server says more, or ends. */
                queued = to_client.queued + to_server.queued;
                to_client.queued = to_server.queued = 0;
                if (queued > 0)
                        continue;
                if (from_server.avail < from_server.total) {
                        from_server.avail = MIN(from_server.total, from_server.avail + release);
                        continue;
                }
                if (!from_server.eof) {
                        from_server.eof = true;
                        continue;
                }
                /* Both sides ended and everything was read: the relay must be done, or waiting
                 * for nothing (a request that waits for a reply the server never sent). */
                break;
        }
        CHECK(r == 1 || r == 0 || r < 0);
        if (r == 1)
                CHECK(to_server.shut && to_client.shut);
        tx_close(&t);
        return 0;
}
