/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* A unix stream socket as a relay's fuzz harness models it in memory (fuzz-nbd-handshake.c,
 * fuzz-nbd-transmission.c): what a non-blocking recv() and send() observe of it. */

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

#include "util.h"

/* A harness's own checks: abort() is what libFuzzer reports. */
#define CHECK(x) \
        do { \
                if (!(x)) \
                        abort(); \
        } while (0)

/* A unix stream socket's default send buffer (net.core.wmem_default). */
#define SNDBUF_DEFAULT 212992

/* A peer's bytes on their way to the relay: data[0, avail) were sent, data[0, pos) read, and
 * total will have been sent in the end. */
typedef struct Source {
        const uint8_t *data;
        size_t avail, pos, total;
        bool eof; /* the peer shut down its side after avail bytes */
} Source;

/* recv(): what is there, up to len; 0 at the peer's EOF once all is read; EAGAIN otherwise. */
static inline ssize_t source_recv(Source *s, void *buf, size_t len) {
        size_t k;

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

/* send() of len bytes into a socket whose peer has queued of cap bytes still to read: how many
 * it takes, or -1 with EAGAIN when it is full. */
static inline ssize_t socket_room(size_t queued, size_t cap, size_t len) {
        if (queued >= cap) {
                errno = EAGAIN;
                return -1;
        }
        return (ssize_t) MIN(len, cap - queued);
}
