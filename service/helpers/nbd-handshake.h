/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* The relay's side of the NBD fixed-newstyle handshake: the part of blockstream-nbd-relay that
 * faces NBD clients. It pins one export name, answers NBD_OPT_LIST itself, forwards the options
 * that name the pinned export (or ""), refuses the rest, and checks the server's replies; see
 * nbd-relay.c for the whole table. The handshake is lock-step: one option at a time, exactly the
 * bytes it has, so that nothing is left in our buffers when the splicing starts. neg_input_done()
 * is the parser of what was read (no I/O), neg_step() moves the bytes. */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* The NBD handshake (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md) */
#define NBD_MAGIC UINT64_C(0x4e42444d41474943)      /* "NBDMAGIC" */
#define NBD_OPTS_MAGIC UINT64_C(0x49484156454f5054) /* "IHAVEOPT" */
#define NBD_REP_MAGIC UINT64_C(0x0003e889045565a9)
#define NBD_OPT_EXPORT_NAME 1
#define NBD_OPT_ABORT 2
#define NBD_OPT_LIST 3
#define NBD_OPT_STARTTLS 5
#define NBD_OPT_INFO 6
#define NBD_OPT_GO 7
#define NBD_OPT_STRUCTURED_REPLY 8
#define NBD_OPT_LIST_META_CONTEXT 9
#define NBD_OPT_SET_META_CONTEXT 10
#define NBD_REP_ACK 1
#define NBD_REP_SERVER 2
#define NBD_REP_INFO 3
#define NBD_REP_META_CONTEXT 4
#define NBD_REP_FLAG_ERROR (UINT32_C(1) << 31)
#define NBD_REP_ERR_UNSUP (NBD_REP_FLAG_ERROR | 1)
#define NBD_REP_ERR_POLICY (NBD_REP_FLAG_ERROR | 2)
#define NBD_REP_ERR_INVALID (NBD_REP_FLAG_ERROR | 3)
#define NBD_REP_ERR_UNKNOWN (NBD_REP_FLAG_ERROR | 6)
#define NBD_REP_ERR_TOO_BIG (NBD_REP_FLAG_ERROR | 9)
#define NBD_INFO_EXPORT 0
#define NBD_FLAG_HAS_FLAGS (1 << 0)
#define NBD_FLAG_READ_ONLY (1 << 1)
#define NBD_FLAG_SEND_FLUSH (1 << 2)
#define NBD_FLAG_SEND_FUA (1 << 3)
#define NBD_FLAG_SEND_CACHE (1 << 10)
#define NBD_FLAG_C_NO_ZEROES (1 << 1) /* a client's flag: no 124 zeroes after EXPORT_NAME's answer */

#define NBD_GREETING_SIZE 18     /* NBDMAGIC, IHAVEOPT, 16-bit handshake flags */
#define NBD_OPT_HEADER_SIZE 16   /* IHAVEOPT, option, length */
#define NBD_REP_HEADER_SIZE 20   /* magic, option, type, length */
#define NBD_EXPORT_REPLY_SIZE 10 /* EXPORT_NAME: size, flags, */
#define NBD_EXPORT_REPLY_ZEROES 124 /* then these zeroes, unless the client set NBD_FLAG_C_NO_ZEROES */
#define NBD_OPT_DATA_MAX 4096    /* a client's option: the protocol's longest name, and room */
#define NBD_REP_DATA_MAX 4160    /* the server's reply: a name or context of 4 KiB, and room */
#define EXPORT_NAME_MAX 256      /* the pinned name */
#define NEG_IN_MAX (NBD_REP_HEADER_SIZE + NBD_REP_DATA_MAX)
/* Options a client may send in one handshake: an honest one sends a handful (structured replies,
 * meta contexts, a list, info, go); each one more the relay answers itself costs it a round trip
 * that holds up its other clients. */
#define NEG_OPTIONS_MAX 64
#define NEG_OUT_MAX (NBD_OPT_HEADER_SIZE + NBD_OPT_DATA_MAX + EXPORT_NAME_MAX + 256)

/* The handshake step: what is read (and from whom) or written next. */
typedef enum NegState {
        NEG_GREETING,     /* upstream → us, then on to the client */
        NEG_CLIENT_FLAGS, /* client → us, then on to the upstream */
        NEG_OPT_HEADER,   /* client → us */
        NEG_OPT_DATA,     /* client → us */
        NEG_REP_HEADER,   /* upstream → us */
        NEG_REP_DATA,     /* upstream → us */
        NEG_EXPORT_REPLY, /* upstream → us: EXPORT_NAME's answer */
        NEG_WRITE,        /* us → out_fd_upstream ? upstream : client, then after_write */
        NEG_DONE,         /* transmission: splice */
        NEG_CLOSE,        /* nothing more: close the pair */
} NegState;

typedef struct Negotiation {
        NegState state, after_write;
        bool to_upstream;
        uint32_t option; /* the option being answered */
        unsigned options; /* the client's so far */
        bool no_zeroes;   /* the client set NBD_FLAG_C_NO_ZEROES */
        size_t in_len, in_want;
        size_t out_len, out_done;
        uint8_t in[NEG_IN_MAX];
        uint8_t out[NEG_OUT_MAX];
} Negotiation;

/* The export every client is pinned to: 1 to EXPORT_NAME_MAX printable ASCII characters, no
 * space. Set once, before any handshake. 0 or -EINVAL. */
int neg_pin_export(const char *name);

/* A handshake starts with the server's greeting. */
void neg_start(Negotiation *n);

/* n->in has what the current step waited for: check it, answer it or pass it on. id: the
 * client's, for the log. 0, or -errno to close the pair. */
int neg_input_done(Negotiation *n, uint64_t id);

/* Moves the handshake on as far as the sockets let it. Returns 1 once the transmission phase
 * starts, 0 to wait, -errno to close the pair. */
int neg_step(Negotiation *n, uint64_t id, int client_fd, int upstream_fd);

/* The handshake waits for the upstream (to read from it, or write to it), not for the client. */
bool neg_waits_upstream(const Negotiation *n);
