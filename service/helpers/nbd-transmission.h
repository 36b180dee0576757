/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* The relay's side of the NBD transmission phase, after the handshake (nbd-handshake.c).
 *
 * QEMU's NBD server reads up to 16 requests of a connection at once and gives each read a buffer
 * of its length (up to 32 MiB), each block status one of up to 1 MiB, which it keeps until the
 * whole reply is written: a client that sends reads and never reads the replies makes QEMU hold
 * 512 MiB per connection. So the relay lets a request through only while what the connection's
 * requests in flight (sent on, reply not yet fully read from the server) cost QEMU adds up to at
 * most TX_BUDGET, and at most TX_IN_FLIGHT_MAX requests; the rest wait in the client's socket.
 * To know when a reply ends it follows both directions:
 *   client → server  request headers (28 bytes, no payload: the export is read-only), read and
 *                    checked here: READ, CACHE and BLOCK_STATUS pass, DISC passes once every
 *                    reply came (as does the client's EOF) and ends the requests; WRITE, TRIM,
 *                    WRITE_ZEROES, FLUSH, the FUA flag (a flush of the guest's disk; not offered
 *                    either), unknown commands, a bad magic, a read
 *                    over NBD_READ_MAX or a handle already in flight close the pair
 *   server → client  reply headers (simple, 16 bytes; structured, 20) read and passed on here,
 *                    payloads spliced through a pipe without being looked at; a reply to no
 *                    request in flight, or to one not wholly sent yet, or a chunk over
 *                    TX_CHUNK_MAX, closes the pair
 * Once the server has said EOF nothing more can be answered: what waits is dropped, the client
 * gets what came and EOF, and the pair ends.
 * A client that goes (or is sent away) with requests in flight leaves them to be drained
 * (tx_client_gone()): QEMU keeps each request's buffer until it has read the data, whatever
 * happens to the connection, so the budget comes back reply by reply as the relay reads and drops
 * them, not when the client went; requests not wholly sent yet are dropped at once. Nothing more
 * goes to the server meanwhile, not even EOF.
 * A relay of many connections can also share one budget among them all (TxShared): a request
 * that the connection's own budget lets in still waits while the requests of every connection
 * together would cost more than the shared maximum, or others wait already (shared_wait set),
 * until it has its turn.
 * Extended headers cannot be negotiated through the relay (NBD_REP_ERR_UNSUP), so these are the
 * only two forms. tx_step() moves the bytes as far as the sockets let it; tx_events() says what
 * to poll for. */

#include <fcntl.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define NBD_REQUEST_MAGIC UINT32_C(0x25609513)
#define NBD_SIMPLE_REPLY_MAGIC UINT32_C(0x67446698)
#define NBD_STRUCTURED_REPLY_MAGIC UINT32_C(0x668e33ef)
#define NBD_REQUEST_SIZE 28           /* magic, flags, type, handle, offset, length */
#define NBD_SIMPLE_REPLY_SIZE 16      /* magic, error, handle */
#define NBD_STRUCTURED_REPLY_SIZE 20  /* magic, flags, type, handle, length */
#define NBD_CMD_READ 0
#define NBD_CMD_WRITE 1
#define NBD_CMD_DISC 2
#define NBD_CMD_FLUSH 3
#define NBD_CMD_TRIM 4
#define NBD_CMD_CACHE 5
#define NBD_CMD_WRITE_ZEROES 6
#define NBD_CMD_BLOCK_STATUS 7
#define NBD_CMD_FLAG_FUA (1 << 0)
#define NBD_CMD_FLAG_REQ_ONE (1 << 3)
#define NBD_REPLY_FLAG_DONE 1
/* The protocol's largest read unless a smaller one was agreed, and QEMU's (NBD_MAX_BUFFER_SIZE). */
#define NBD_READ_MAX (UINT32_C(32) << 20)

#define TX_IN_FLIGHT_MAX 16                    /* QEMU's MAX_NBD_REQUESTS */
#define TX_BUDGET ((uint64_t) NBD_READ_MAX)    /* what QEMU may hold for one connection */
#define TX_BLOCK_STATUS_COST (UINT32_C(1) << 20) /* QEMU's extent array, unless REQ_ONE */
#define TX_CHUNK_MAX (NBD_READ_MAX + UINT32_C(65536)) /* a structured chunk: data and its offset,
                                                       * or block status (QEMU: at most 1 MiB) */
#define TX_REQUEST_BUF ((TX_IN_FLIGHT_MAX + 1) * NBD_REQUEST_SIZE)
/* What tx_open() asks of pipe2() and tx_step() of splice(), and nothing else: the relay's seccomp
 * filter allows these only. */
#define TX_PIPE_FLAGS (O_NONBLOCK | O_CLOEXEC)
#define TX_SPLICE_FLAGS (SPLICE_F_NONBLOCK | SPLICE_F_MOVE)

/* What the connections of a relay may cost QEMU all together, what their requests in flight cost
 * now, and how many connections have a request waiting for room in it. While any waits, no
 * connection's new request goes in but on its turn (Transmission.turn: one request), which the
 * relay gives the waiting ones in rotation: room that a reply gives back cannot be taken again at
 * once by the connection whose reply it was, and busy connections cannot starve one. */
typedef struct TxShared {
        uint64_t used, max;
        unsigned n_waiting;
        uint64_t wait_seq; /* the last Transmission.wait_seq given */
} TxShared;

typedef struct TxRequest {
        uint64_t handle;
        uint64_t end; /* where its header ends in the stream of requests sent on */
        uint32_t length, cost;
        uint16_t type;
} TxRequest;

typedef enum TxReplyStep {
        TX_REPLY_HEADER,  /* server → us */
        TX_REPLY_PASS,    /* us → client, once the pipe has passed on every byte before it */
        TX_REPLY_PAYLOAD, /* server → pipe → client */
} TxReplyStep;

typedef struct Transmission {
        /* client → server: what was read, then the requests let in, to be sent */
        uint8_t req_in[TX_REQUEST_BUF];
        size_t req_in_len;
        uint8_t req_out[TX_REQUEST_BUF];
        size_t req_out_len, req_out_done;
        bool client_eof, server_shut, disconnected;
        uint64_t admitted_total, sent_total; /* bytes of requests let in, and sent */
        /* requests let in whose replies have not ended */
        TxRequest in_flight[TX_IN_FLIGHT_MAX];
        unsigned n_in_flight;
        uint64_t cost; /* theirs, all together */
        TxShared *shared; /* NULL: this connection's budget only */
        bool shared_wait; /* a request waits for the shared budget (tx_admit()) */
        bool turn;        /* the relay's: one request may go in though others wait */
        uint64_t wait_seq; /* while shared_wait: when it began to wait (TxShared.wait_seq) */
        /* server → client */
        TxReplyStep reply_step;
        uint8_t rep[NBD_STRUCTURED_REPLY_SIZE];
        size_t rep_len, rep_want, rep_sent;
        uint64_t payload_left;
        int reply_ends; /* in_flight[] index of the request this reply ends, or -1 */
        int pipe[2];
        size_t pipe_pending; /* bytes in the pipe */
        bool pipe_full, server_eof, client_shut;
        uint64_t to_client_total; /* bytes of replies the client took */
        bool client_gone;         /* draining: replies are read and dropped (tx_client_gone()) */
        bool server_broken;       /* the server's side failed: nothing to drain */
} Transmission;

/* Sets up t (its pipe: 0 or -errno), counting its requests in shared as well (NULL: none).
 * tx_close() may follow either way, and gives back to shared what is still in flight. */
int tx_open(Transmission *t, TxShared *shared);
void tx_close(Transmission *t);

/* The requests at the front of req_in that fit go to req_out. 0, or -errno (EPROTO, EROFS,
 * EFBIG, EEXIST) to close the pair. No I/O. */
int tx_admit(Transmission *t, uint64_t id);

/* rep has its rep_want bytes (or the first NBD_SIMPLE_REPLY_SIZE): check it. 0, or -EPROTO to
 * close the pair. No I/O. */
int tx_reply_header(Transmission *t, uint64_t id);

/* n bytes of the current reply's payload went into the pipe. No I/O. */
void tx_payload_passed(Transmission *t, size_t n);

/* Moves both directions on as far as the sockets let it. 1 once both are done (each EOF passed
 * on), 0 to wait, -errno to close the pair. */
int tx_step(Transmission *t, uint64_t id, int client_fd, int server_fd);

/* Replies wait for the client to read them. */
bool tx_owes_client(const Transmission *t);

/* The client went: true if requests sent to the server are still in flight, which tx_step()
 * (called with client_fd -1 from now on) drains before it says the pair is done; false if the
 * pair can end now. */
bool tx_client_gone(Transmission *t);

/* What to poll each fd for. An fd with nothing wanted gets 0. */
void tx_events(const Transmission *t, short *client_events, short *server_events);
