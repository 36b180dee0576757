/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* The NBD transmission phase through the relay: requests let in within a budget, replies
 * followed to know when each ends (see nbd-transmission.h). */

#include <assert.h>
#include <errno.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "nbd-transmission.h"
#include "nbd-wire.h"
#include "util.h"

/* Asked of each splice into the pipe; the kernel moves no more than the pipe has room for, so
 * the pipe (64 KiB by default) bounds what is buffered. */
#define SPLICE_MAX (1024 * 1024)
/* A draining pair's replies are read into this and dropped (one thread). */
#define DRAIN_BUF (64 * 1024)
static uint8_t drain_buf[DRAIN_BUF];
/* Rounds of tx_step() for one wakeup: the other pairs get their turn after that many. */
#define TX_STEP_ROUNDS 16

static void reply_expect_header(Transmission *t) {
        t->reply_step = TX_REPLY_HEADER;
        t->rep_len = t->rep_sent = 0;
        t->rep_want = NBD_SIMPLE_REPLY_SIZE; /* the smaller form; a structured one asks for more */
        t->payload_left = 0;
        t->reply_ends = -1;
}

int tx_open(Transmission *t, TxShared *shared) {
        *t = (Transmission) { .pipe = { -1, -1 }, .shared = shared };
        reply_expect_header(t);
        if (pipe2(t->pipe, TX_PIPE_FLAGS) < 0)
                return -errno;
        return 0;
}

static void shared_wait_set(Transmission *t, bool wait) {
        if (t->shared_wait == wait)
                return;
        t->shared_wait = wait;
        if (t->shared) {
                assert(wait || t->shared->n_waiting > 0);
                t->shared->n_waiting += wait ? 1 : -1;
                if (wait)
                        t->wait_seq = ++t->shared->wait_seq;
        }
}

/* Requests that cost this left the flight: their budget back, the shared one's too. */
static void cost_drop(Transmission *t, uint64_t cost) {
        assert(t->cost >= cost && (!t->shared || t->shared->used >= cost));
        t->cost -= cost;
        if (t->shared)
                t->shared->used -= cost;
}

static void pipe_close(Transmission *t) {
        for (size_t i = 0; i < ELEMENTSOF(t->pipe); i++)
                if (t->pipe[i] >= 0)
                        close(t->pipe[i]);
        t->pipe[0] = t->pipe[1] = -1;
        t->pipe_pending = 0;
        t->pipe_full = false;
}

void tx_close(Transmission *t) {
        shared_wait_set(t, false);
        cost_drop(t, t->cost);
        t->shared = NULL;
        t->n_in_flight = 0;
        pipe_close(t);
}

/* The server's side failed (r < 0): nothing is to be drained from it. */
static int server_failed(Transmission *t, int r) {
        t->server_broken = true;
        return r;
}

static int in_flight_find(const Transmission *t, uint64_t handle) {
        for (unsigned i = 0; i < t->n_in_flight; i++)
                if (t->in_flight[i].handle == handle)
                        return (int) i;
        return -1;
}

int tx_admit(Transmission *t, uint64_t id) {
        bool was_waiting = t->shared_wait, admitted = false;
        uint64_t since = t->wait_seq;
        size_t off = 0;

        shared_wait_set(t, false); /* n_waiting counts the others now */
        /* Only what is unsent stays in req_out: each of it in flight, or the one DISC. */
        if (t->req_out_done > 0) {
                memmove(t->req_out, t->req_out + t->req_out_done, t->req_out_len - t->req_out_done);
                t->req_out_len -= t->req_out_done;
                t->req_out_done = 0;
        }

        while (t->req_in_len - off >= NBD_REQUEST_SIZE) {
                const uint8_t *p = t->req_in + off;
                uint16_t flags = get_be16(p + 4);
                TxRequest req = {
                        .type = get_be16(p + 6),
                        .handle = get_be64(p + 8),
                        .length = get_be32(p + 24),
                };

                if (get_be32(p) != NBD_REQUEST_MAGIC) {
                        log_debug("Client %" PRIu64 ": not an NBD request (magic 0x%08" PRIx32 ").", id, get_be32(p));
                        return -EPROTO;
                }
                if (t->disconnected) {
                        log_debug("Client %" PRIu64 ": a request after NBD_CMD_DISC.", id);
                        return -EPROTO;
                }
                switch (req.type) {
                case NBD_CMD_READ:
                        if (req.length > NBD_READ_MAX) {
                                log_debug("Client %" PRIu64 ": a read of %" PRIu32 " bytes, over the %" PRIu32
                                          " the protocol allows.",
                                        id, req.length, NBD_READ_MAX);
                                return -EFBIG;
                        }
                        req.cost = req.length;
                        break;
                case NBD_CMD_BLOCK_STATUS:
                        req.cost = flags & NBD_CMD_FLAG_REQ_ONE ? 0 : TX_BLOCK_STATUS_COST;
                        break;
                case NBD_CMD_DISC:
                        break;
                case NBD_CMD_WRITE:
                case NBD_CMD_TRIM:
                case NBD_CMD_WRITE_ZEROES:
                case NBD_CMD_FLUSH:
                case NBD_CMD_CACHE: /* QEMU's copy-on-read: a write into the guest's top image */
                        log_debug("Client %" PRIu64 ": command %u on a read-only export.", id, req.type);
                        return -EROFS;
                default:
                        log_debug("Client %" PRIu64 ": unknown command %u.", id, req.type);
                        return -EPROTO;
                }
                if (flags & NBD_CMD_FLAG_FUA) {
                        log_debug("Client %" PRIu64 ": FUA on a read-only export.", id);
                        return -EROFS;
                }
                /* Never more than fits: with each unsent request in flight (replies come only to
                 * requests sent), there is always room; this is the bound should that not hold. */
                if (t->req_out_len + NBD_REQUEST_SIZE > sizeof(t->req_out))
                        break;

                if (req.type == NBD_CMD_DISC) {
                        /* Once every reply came: QEMU closes at a DISC and keeps the buffers of
                         * the reads it has until it has read their data, out of the budget. */
                        if (t->n_in_flight > 0)
                                break;
                        t->disconnected = true; /* no reply, nothing after it */
                } else {
                        if (in_flight_find(t, req.handle) >= 0) {
                                log_debug("Client %" PRIu64 ": handle 0x%" PRIx64 " is in flight already.", id,
                                        req.handle);
                                return -EEXIST;
                        }
                        if (t->n_in_flight >= TX_IN_FLIGHT_MAX || t->cost + req.cost > TX_BUDGET)
                                break; /* waits for replies to end */
                        /* for replies to end, of any connection; and while others wait, for its turn */
                        if (t->shared && (t->shared->used + req.cost > t->shared->max ||
                                                 (t->shared->n_waiting > 0 && !t->turn))) {
                                shared_wait_set(t, true);
                                if (was_waiting && !admitted)
                                        t->wait_seq = since; /* still waiting: its place kept */
                                break;
                        }
                        if (t->shared && t->shared->n_waiting > 0)
                                t->turn = false; /* used */
                        admitted = true;
                        req.end = t->admitted_total + NBD_REQUEST_SIZE;
                        t->in_flight[t->n_in_flight++] = req;
                        t->cost += req.cost;
                        if (t->shared)
                                t->shared->used += req.cost;
                }
                memcpy(t->req_out + t->req_out_len, p, NBD_REQUEST_SIZE);
                t->req_out_len += NBD_REQUEST_SIZE;
                t->admitted_total += NBD_REQUEST_SIZE;
                off += NBD_REQUEST_SIZE;
        }
        if (off > 0) {
                memmove(t->req_in, t->req_in + off, t->req_in_len - off);
                t->req_in_len -= off;
        }
        return 0;
}

/* The current reply has ended: its request leaves the flight. */
static void reply_end(Transmission *t) {
        if (t->reply_ends >= 0) {
                TxRequest *r = &t->in_flight[t->reply_ends];

                cost_drop(t, r->cost);
                *r = t->in_flight[--t->n_in_flight];
        }
        reply_expect_header(t);
}

/* A draining pair's reply header, read whole, goes to nobody at once: PASS would wait on the
 * client, which is gone, and no fd event would come to end it. */
static void pass_to_nobody(Transmission *t) {
        if (t->reply_step != TX_REPLY_PASS)
                return;
        t->rep_sent = t->rep_len;
        if (t->payload_left == 0)
                reply_end(t);
        else
                t->reply_step = TX_REPLY_PAYLOAD;
}

int tx_reply_header(Transmission *t, uint64_t id) {
        uint32_t magic = get_be32(t->rep);
        uint64_t handle = get_be64(t->rep + 8);
        int i;

        if (magic == NBD_STRUCTURED_REPLY_MAGIC && t->rep_want < NBD_STRUCTURED_REPLY_SIZE) {
                t->rep_want = NBD_STRUCTURED_REPLY_SIZE;
                return 0;
        }
        if (magic != NBD_SIMPLE_REPLY_MAGIC && magic != NBD_STRUCTURED_REPLY_MAGIC) {
                log_debug("Client %" PRIu64 ": the server sent no NBD reply (magic 0x%08" PRIx32 ").", id, magic);
                return -EPROTO;
        }
        i = in_flight_find(t, handle);
        if (i < 0 || t->in_flight[i].end > t->sent_total) {
                log_debug("Client %" PRIu64 ": the server replied to handle 0x%" PRIx64 ", %s.", id, handle,
                        i < 0 ? "not in flight" : "not sent to it yet");
                return -EPROTO;
        }
        if (magic == NBD_SIMPLE_REPLY_MAGIC) {
                /* A read's data follows unless it failed; nothing follows anything else. */
                if (get_be32(t->rep + 4) == 0 && t->in_flight[i].type == NBD_CMD_READ)
                        t->payload_left = t->in_flight[i].length;
                t->reply_ends = i;
        } else {
                uint32_t length = get_be32(t->rep + 16);

                if (length > TX_CHUNK_MAX) {
                        log_debug("Client %" PRIu64 ": the server sent a chunk of %" PRIu32 " bytes.", id, length);
                        return -EPROTO;
                }
                t->payload_left = length;
                t->reply_ends = (get_be16(t->rep + 4) & NBD_REPLY_FLAG_DONE) ? i : -1;
        }
        t->reply_step = TX_REPLY_PASS;
        return 0;
}

void tx_payload_passed(Transmission *t, size_t n) {
        assert(t->reply_step == TX_REPLY_PAYLOAD && n <= t->payload_left);
        t->payload_left -= n;
        if (t->payload_left == 0)
                reply_end(t);
}

/* n > 0 bytes moved, 0 EOF, -EAGAIN nothing to move now, other -errno failures. */
static ssize_t io_result(ssize_t n) {
        if (n >= 0)
                return n;
        return errno == EINTR ? -EAGAIN : -errno;
}

/* The client's EOF goes on once every whole request before it has (a partial one cannot be
 * answered: it goes nowhere), and every reply came (QEMU closes at EOF, and keeps the buffers of
 * the reads it has until it has read their data). */
static int pass_eof(Transmission *t, int server_fd, bool *progress) {
        if (t->client_eof && !t->client_gone && !t->server_eof && !t->server_shut &&
            t->req_out_done == t->req_out_len && t->req_in_len < NBD_REQUEST_SIZE && t->n_in_flight == 0) {
                if (shutdown(server_fd, SHUT_WR) < 0 && errno != ENOTCONN)
                        return -errno;
                t->server_shut = true;
                *progress = true;
        }
        return 0;
}

static int step_requests(Transmission *t, uint64_t id, int client_fd, int server_fd, bool *progress) {
        ssize_t n;
        int r;

        if (t->server_eof || t->client_gone)
                return 0; /* nothing more can be answered (server_gone()), or asked (tx_client_gone()) */
        if (!t->client_eof && t->req_in_len < sizeof(t->req_in)) {
                n = io_result(recv(client_fd, t->req_in + t->req_in_len, sizeof(t->req_in) - t->req_in_len,
                        MSG_DONTWAIT));
                if (n > 0)
                        t->req_in_len += (size_t) n;
                else if (n == 0) {
                        t->client_eof = true;
                        log_debug("Client %" PRIu64 ": EOF, passed on once %u requests in flight are answered.", id,
                                t->n_in_flight);
                } else if (n != -EAGAIN)
                        return (int) n;
                *progress |= n >= 0;
        }
        r = tx_admit(t, id);
        if (r < 0)
                return r;
        if (t->req_out_done < t->req_out_len) {
                n = io_result(send(server_fd, t->req_out + t->req_out_done, t->req_out_len - t->req_out_done,
                        MSG_DONTWAIT | MSG_NOSIGNAL));
                if (n > 0) {
                        t->req_out_done += (size_t) n;
                        t->sent_total += (size_t) n;
                        *progress = true;
                } else if (n != -EAGAIN)
                        return server_failed(t, n == 0 ? -EPIPE : (int) n);
        }
        return pass_eof(t, server_fd, progress);
}

static int drain_pipe(Transmission *t, int client_fd, bool *progress) {
        ssize_t n;

        if (t->pipe_pending == 0 || t->client_gone)
                return 0;
        n = io_result(splice(t->pipe[0], NULL, client_fd, NULL, t->pipe_pending, TX_SPLICE_FLAGS));
        if (n > 0) {
                t->pipe_pending -= (size_t) n;
                t->to_client_total += (size_t) n;
                t->pipe_full = false;
                *progress = true;
        } else if (n != -EAGAIN)
                return n == 0 ? -EPIPE : (int) n;
        return 0;
}

/* The server said EOF: what waits can never be answered. */
static void server_gone(Transmission *t) {
        shared_wait_set(t, false); /* no request goes in any more */
        t->server_eof = true;
        t->req_in_len = t->req_out_len = t->req_out_done = 0;
}

static int step_replies(Transmission *t, uint64_t id, int client_fd, int server_fd, bool *progress) {
        ssize_t n;
        int r;

        r = drain_pipe(t, client_fd, progress);
        if (r < 0)
                return r;

        switch (t->reply_step) {

        case TX_REPLY_HEADER:
                if (t->server_eof)
                        break;
                n = io_result(recv(server_fd, t->rep + t->rep_len, t->rep_want - t->rep_len, MSG_DONTWAIT));
                if (n == -EAGAIN)
                        break;
                if (n < 0)
                        return server_failed(t, (int) n);
                *progress = true;
                if (n == 0) {
                        server_gone(t); /* a partial header goes nowhere */
                        break;
                }
                t->rep_len += (size_t) n;
                if (t->rep_len == t->rep_want) {
                        r = tx_reply_header(t, id);
                        if (r < 0)
                                return server_failed(t, r);
                        if (t->client_gone)
                                pass_to_nobody(t);
                }
                break;

        case TX_REPLY_PASS: /* never with the client gone: pass_to_nobody() */
                /* After every byte of the payload before it. */
                if (t->pipe_pending > 0)
                        break;
                n = io_result(send(client_fd, t->rep + t->rep_sent, t->rep_len - t->rep_sent,
                        MSG_DONTWAIT | MSG_NOSIGNAL));
                if (n == -EAGAIN)
                        break;
                if (n <= 0)
                        return n == 0 ? -EPIPE : (int) n;
                *progress = true;
                t->rep_sent += (size_t) n;
                t->to_client_total += (size_t) n;
                if (t->rep_sent < t->rep_len)
                        break;
                if (t->payload_left == 0)
                        reply_end(t);
                else
                        t->reply_step = TX_REPLY_PAYLOAD;
                break;

        case TX_REPLY_PAYLOAD:
                if (t->client_gone && !t->server_eof) {
                        n = io_result(recv(server_fd, drain_buf, (size_t) MIN(t->payload_left, DRAIN_BUF), MSG_DONTWAIT));
                        if (n == -EAGAIN)
                                break;
                        if (n < 0)
                                return server_failed(t, (int) n);
                        *progress = true;
                        if (n == 0)
                                server_gone(t);
                        else
                                tx_payload_passed(t, (size_t) n);
                        break;
                }
                if (t->server_eof || t->pipe_full)
                        break;
                n = io_result(splice(server_fd, NULL, t->pipe[1], NULL, (size_t) MIN(t->payload_left, SPLICE_MAX),
                        TX_SPLICE_FLAGS));
                if (n == -EAGAIN) {
                        /* Either the server is dry or the pipe is full; only draining tells which. */
                        t->pipe_full = t->pipe_pending > 0;
                        break;
                }
                if (n < 0)
                        return server_failed(t, (int) n);
                *progress = true;
                if (n == 0) {
                        server_gone(t); /* the client gets what came, then EOF */
                        break;
                }
                t->pipe_pending += (size_t) n;
                tx_payload_passed(t, (size_t) n);
                break;
        }

        r = drain_pipe(t, client_fd, progress);
        if (r < 0)
                return r;
        if (t->server_eof && !t->client_shut && t->pipe_pending == 0 && !t->client_gone) {
                if (shutdown(client_fd, SHUT_WR) < 0 && errno != ENOTCONN)
                        return -errno;
                t->client_shut = true;
                *progress = true;
        }
        return 0;
}

bool tx_client_gone(Transmission *t) {
        unsigned k = 0;

        t->client_gone = t->client_eof = true;
        t->req_in_len = 0;
        /* What QEMU has not wholly received it holds nothing for: out of the flight at once. */
        for (unsigned i = 0; i < t->n_in_flight; i++) {
                TxRequest *r = &t->in_flight[i];

                if (r->end <= t->sent_total)
                        t->in_flight[k++] = *r;
                else
                        cost_drop(t, r->cost);
        }
        t->n_in_flight = k;
        /* reply_ends indexes in_flight: the same request, at its new place (a reply comes only to
         * a request sent, which stays) */
        if (t->reply_ends >= 0)
                t->reply_ends = in_flight_find(t, get_be64(t->rep + 8));
        /* A reply header that waited for the client goes to nobody: the drain reads on from the
         * server (nothing would call tx_step() for a pair that waits on no fd). */
        pass_to_nobody(t);
        t->req_out_len = t->req_out_done;
        shared_wait_set(t, false);
        pipe_close(t); /* what waits in it was the client's: dropped with it */
        return !t->server_eof && !t->server_broken && (t->n_in_flight > 0 || t->reply_step != TX_REPLY_HEADER);
}

int tx_step(Transmission *t, uint64_t id, int client_fd, int server_fd) {
        int r;

        for (unsigned round = 0; round < TX_STEP_ROUNDS; round++) {
                bool progress = false;

                r = step_requests(t, id, client_fd, server_fd, &progress);
                if (r < 0)
                        return r;
                r = step_replies(t, id, client_fd, server_fd, &progress);
                if (r < 0)
                        return r;
                if (!progress)
                        break;
        }
        /* A reply that ended in the last round may have let the client's EOF go on. */
        r = pass_eof(t, server_fd, &(bool) { false });
        if (r < 0)
                return r;
        if (t->client_gone)
                /* Drained: every reply read (the last one whole), or QEMU's side ended. */
                return t->server_eof || (t->n_in_flight == 0 && t->reply_step == TX_REPLY_HEADER && t->rep_len == 0);
        /* A reply that ended in the last round may have made room for a request that waits:
         * let it in now, so that tx_events() asks to send it. */
        if (!t->server_eof) {
                r = tx_admit(t, id);
                if (r < 0)
                        return r;
        }
        return (t->server_shut || t->server_eof) && t->client_shut;
}

bool tx_owes_client(const Transmission *t) {
        return !t->client_gone && (t->pipe_pending > 0 || t->reply_step == TX_REPLY_PASS);
}

void tx_events(const Transmission *t, short *client_events, short *server_events) {
        short c = 0, s = 0;

        if (!t->client_eof && !t->server_eof && t->req_in_len < sizeof(t->req_in))
                c |= POLLIN;
        if (tx_owes_client(t))
                c |= POLLOUT;
        if (t->req_out_done < t->req_out_len)
                s |= POLLOUT;
        if (!t->server_eof &&
            (t->reply_step == TX_REPLY_HEADER || (t->reply_step == TX_REPLY_PAYLOAD && !t->pipe_full)))
                s |= POLLIN;
        *client_events = c;
        *server_events = s;
}
