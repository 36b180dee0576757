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
 *                 the client's socket takes 1 + 4099 * N bytes a step (0: a default buffer)
 *   byte 1        bits 0-6: the server's socket takes 1 + 29 * N bytes; bit 7: the server reads
 *                 it only when the relay waits (else before each step): sends stop part way,
 *                 and requests are let in but not yet sent (a server may answer those: it must
 *                 not be believed)
 *   bytes 2-3     U, big-endian: how many of the bytes that follow come from the server
 *   U bytes       server → relay (replies), then its EOF
 *   the rest      client → relay (requests), all there at once, then its EOF
 * Besides the sanitizers, what nbd-transmission.h promises is checked:
 *   - what went to the server is a prefix of what the client sent, of whole requests only, each
 *     a READ of at most 32 MiB, BLOCK_STATUS or DISC, without FUA, nothing after DISC (never a
 *     CACHE: QEMU's copy-on-read writes the guest's image);
 *   - a model of QEMU's side, kept here from the bytes as they move (requests sent, replies read
 *     to their end): never more than 16 requests in flight, nor more than 32 MiB of cost (reads,
 *     1 MiB a block status without REQ_ONE); a reply the model cannot place (no such request
 *     sent, a bad magic, an oversized chunk) must close the pair in that very step;
 *   - what went to the client is a prefix of what the server sent: replies pass unchanged;
 *   - when the relay waits, it waits for something that has not come (the server's next bytes):
 *     a wish that is already granted would wake its poll() over and over;
 *   - once both peers have ended and everything is read, the pair ends (never held for good). */

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "nbd-transmission.h"
#include "nbd-wire.h"
#include "socket-model.h"
#include "util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FD_CLIENT (INT_MAX - 1)
#define FD_SERVER (INT_MAX - 2)
#define FD_PIPE_R (INT_MAX - 3)
#define FD_PIPE_W (INT_MAX - 4)
#define PIPE_CAP 65536

typedef struct Sink {
        const uint8_t *want; /* what it must be a prefix of */
        size_t want_len, len, queued, cap;
        bool shut;
} Sink;

static Source from_client, from_server;
static Sink to_client, to_server;
static void model_requests(void);
static void model_replies(void);
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
        ssize_t k;

        if (!s)
                return __real_recv(fd, buf, len, flags);
        CHECK(flags & MSG_DONTWAIT);
        CHECK(len > 0);
        k = source_recv(s, buf, len);
        if (k > 0 && s == &from_server)
                model_replies();
        return k;
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
        ssize_t k;

        if (!s)
                return __real_send(fd, buf, len, flags);
        CHECK(flags & MSG_DONTWAIT);
        CHECK(len > 0);
        k = socket_room(s->queued, s->cap, len);
        if (k < 0)
                return k;
        sink_take(s, buf, (size_t) k);
        if (s == &to_server)
                model_requests();
        return k;
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
                model_replies();
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

/* QEMU's side, as the bytes move: the requests it has, and where it is in its replies. */
typedef struct ModelRequest {
        uint64_t handle, cost;
        uint32_t length;
        uint16_t type;
} ModelRequest;

static struct {
        ModelRequest req[TX_IN_FLIGHT_MAX + 1];
        unsigned n;
        uint64_t cost;
        size_t requests_at, replies_at; /* how far to_server and from_server were read */
        bool disc, broken;
        uint8_t header[NBD_STRUCTURED_REPLY_SIZE];
        size_t header_len;
        uint64_t payload_left;
        int ends; /* req[] index, or -1 */
} model;

static void model_reset(void) {
        memset(&model, 0, sizeof(model));
        model.ends = -1;
}

/* Every whole request sent: allowed, and within what QEMU may hold. */
static void model_requests(void) {
        while (to_server.len - model.requests_at >= NBD_REQUEST_SIZE) {
                const uint8_t *p = to_server.want + model.requests_at;
                uint16_t flags = get_be16(p + 4), type = get_be16(p + 6);
                uint32_t length = get_be32(p + 24);
                uint64_t cost = 0;

                model.requests_at += NBD_REQUEST_SIZE;
                CHECK(!model.disc);
                CHECK(get_be32(p) == NBD_REQUEST_MAGIC);
                CHECK(!(flags & NBD_CMD_FLAG_FUA));
                switch (type) {
                case NBD_CMD_READ:
                        CHECK(length <= NBD_READ_MAX);
                        cost = length;
                        break;
                case NBD_CMD_BLOCK_STATUS:
                        cost = flags & NBD_CMD_FLAG_REQ_ONE ? 0 : 1U << 20;
                        break;
                case NBD_CMD_DISC:
                        model.disc = true;
                        continue;
                default:
                        abort();
                }
                for (unsigned i = 0; i < model.n; i++)
                        CHECK(model.req[i].handle != get_be64(p + 8));
                CHECK(model.n < TX_IN_FLIGHT_MAX && model.cost + cost <= TX_BUDGET);
                model.req[model.n++] = (ModelRequest) {
                        .handle = get_be64(p + 8), .cost = cost, .length = length, .type = type };
                model.cost += cost;
        }
}

static void model_reply_end(void) {
        if (model.ends >= 0) {
                model.cost -= model.req[model.ends].cost;
                model.req[model.ends] = model.req[--model.n];
        }
        model.ends = -1;
        model.header_len = 0;
}

/* Every byte of the server's the relay has read: replies, each placed and followed to its end. */
static void model_replies(void) {
        while (!model.broken && model.replies_at < from_server.pos) {
                size_t want, k;
                uint32_t magic;
                int i = -1;

                if (model.header_len == 0 && model.payload_left > 0) {
                        k = MIN(model.payload_left, from_server.pos - model.replies_at);
                        model.replies_at += k;
                        model.payload_left -= k;
                        if (model.payload_left == 0)
                                model_reply_end();
                        continue;
                }
                want = model.header_len < 4 ? 4 :
                        get_be32(model.header) == NBD_STRUCTURED_REPLY_MAGIC ? NBD_STRUCTURED_REPLY_SIZE :
                                                                               NBD_SIMPLE_REPLY_SIZE;
                k = MIN(want - model.header_len, from_server.pos - model.replies_at);
                memcpy(model.header + model.header_len, from_server.data + model.replies_at, k);
                model.header_len += k;
                model.replies_at += k;
                if (model.header_len < want || want == 4)
                        continue;
                magic = get_be32(model.header);
                for (unsigned j = 0; j < model.n; j++)
                        if (model.req[j].handle == get_be64(model.header + 8))
                                i = (int) j;
                if (i < 0 || (magic != NBD_SIMPLE_REPLY_MAGIC && magic != NBD_STRUCTURED_REPLY_MAGIC)) {
                        model.broken = true;
                        break;
                }
                if (magic == NBD_SIMPLE_REPLY_MAGIC) {
                        model.payload_left = get_be32(model.header + 4) == 0 && model.req[i].type == NBD_CMD_READ ?
                                model.req[i].length : 0;
                        model.ends = i;
                } else {
                        if (get_be32(model.header + 16) > TX_CHUNK_MAX) {
                                model.broken = true;
                                break;
                        }
                        model.payload_left = get_be32(model.header + 16);
                        model.ends = get_be16(model.header + 4) & NBD_REPLY_FLAG_DONE ? i : -1;
                }
                model.header_len = 0;
                if (model.payload_left == 0)
                        model_reply_end();
        }
}

/* The relay's own count agrees with its table, and is bounded. */
static void check_in_flight(const Transmission *t) {
        uint64_t sum = 0;

        CHECK(t->n_in_flight <= TX_IN_FLIGHT_MAX);
        for (unsigned i = 0; i < t->n_in_flight; i++)
                sum += t->in_flight[i].cost;
        CHECK(sum == t->cost && sum <= TX_BUDGET);
}

static size_t moved(void) {
        return from_client.pos + from_server.pos + to_client.len + to_server.len + pipe_len + from_server.avail +
                to_client.shut + to_server.shut + from_server.eof;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        static Transmission t;
        /* Shared by this one connection only, with room for it: its count follows t's cost. */
        static TxShared shared;
        size_t server_len, client_len, release;
        bool lazy_server;
        int r;

        if (size < 4)
                return 0;
        log_set_max_level(0);
        release = 1 + (size_t) (data[0] & 15) * 37;
        server_len = MIN((size_t) ((data[2] << 8) | data[3]), size - 4);
        client_len = size - 4 - server_len;
        from_server = (Source) { .data = data + 4, .total = server_len };
        from_client = (Source) { .data = data + 4 + server_len, .avail = client_len, .total = client_len, .eof = true };
        to_server = (Sink) { .want = from_client.data, .want_len = client_len, .cap = 1 + (size_t) (data[1] & 127) * 29 };
        lazy_server = data[1] & 128;
        to_client = (Sink) { .want = from_server.data,
                .want_len = server_len,
                .cap = data[0] >> 4 ? 1 + (size_t) (data[0] >> 4) * 4099 : SNDBUF_DEFAULT };
        pipe_len = 0;
        model_reset();

        shared = (TxShared) { .max = UINT64_MAX / 2 };
        CHECK(tx_open(&t, &shared) == 0);
        for (unsigned steps = 0;; steps++) {
                size_t before = moved();
                short ce, se;

                CHECK(steps < 1000000);
                /* The peers read what was written before each step (a lazy server: see below). */
                to_client.queued = 0;
                if (!lazy_server)
                        to_server.queued = 0;
                r = tx_step(&t, 1, FD_CLIENT, FD_SERVER);
                check_in_flight(&t);
                CHECK(shared.used == t.cost && !t.shared_wait && shared.n_waiting == 0);
                if (model.broken)
                        CHECK(r < 0);
                if (r != 0)
                        break;
                if (moved() != before)
                        continue;
                /* It waits: only for the server's next bytes, or room in the server's socket
                 * (everything else it could have now). */
                tx_events(&t, &ce, &se);
                CHECK(ce == 0 && (se & ~(POLLIN | POLLOUT)) == 0);
                CHECK(!(se & POLLIN) || (from_server.pos == from_server.avail && !from_server.eof));
                CHECK(!(se & POLLOUT) || to_server.queued >= to_server.cap);
                if (lazy_server && to_server.queued > 0) {
                        to_server.queued = 0;
                        if (from_server.avail < from_server.total) /* and answers what it guesses */
                                from_server.avail = MIN(from_server.total, from_server.avail + release);
                } else if (from_server.avail < from_server.total)
                        from_server.avail = MIN(from_server.total, from_server.avail + release);
                else if (!from_server.eof)
                        from_server.eof = true;
                else
                        break; /* nothing more will come: it must have ended */
        }
        /* Both peers ended and everything was read: the pair ended, or failed. */
        CHECK(r != 0);
        if (r == 1)
                CHECK(to_client.shut);
        tx_close(&t);
        CHECK(shared.used == 0 && shared.n_waiting == 0);
        return 0;
}
