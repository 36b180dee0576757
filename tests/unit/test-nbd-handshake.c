/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The relay's NBD handshake (service/helpers/nbd-handshake.c), the part of blockstream-nbd-relay
 * that faces NBD clients, on its own: neg_step() between two real socket pairs, the test playing
 * both the client and QEMU's NBD server. What the relay answers itself, what it passes on (with
 * the pinned name), and what closes the pair. test-nbd-relay.py runs the same through the whole
 * relay with real clients. */

#include <endian.h>
#include <string.h>
#include <sys/socket.h>

#include "nbd-handshake.h"
#include "util.h"
#include "tap.h"

#define PINNED "disk"

/* The test's ends (client, up) and the relay's (relay_client, relay_up). */
typedef struct Pair {
        int client, relay_client, up, relay_up;
        Negotiation n;
} Pair;

static void pair_open(Pair *p) {
        int a[2], b[2];

        ASSERT_OK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, a));
        ASSERT_OK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, b));
        *p = (Pair) { .client = a[0], .relay_client = a[1], .up = b[0], .relay_up = b[1] };
        neg_start(&p->n);
}

static void pair_close(Pair *p) {
        close(p->client);
        close(p->relay_client);
        close(p->up);
        close(p->relay_up);
}

static int step(Pair *p) {
        return neg_step(&p->n, 1, p->relay_client, p->relay_up);
}

/* Big-endian building blocks. */
static size_t put32(uint8_t *b, uint32_t v) {
        v = htobe32(v);
        memcpy(b, &v, 4);
        return 4;
}

static size_t put64(uint8_t *b, uint64_t v) {
        v = htobe64(v);
        memcpy(b, &v, 8);
        return 8;
}

static uint32_t get32(const uint8_t *b) {
        uint32_t v;
        memcpy(&v, b, 4);
        return be32toh(v);
}

static void send_all(int fd, const void *b, size_t len) {
        ASSERT_EQ(send(fd, b, len, MSG_NOSIGNAL), (ssize_t) len);
}

/* What has arrived at fd, without waiting: neg_step() wrote it before it returned. */
static ssize_t take(int fd, uint8_t *b, size_t size) {
        ssize_t k = recv(fd, b, size, MSG_DONTWAIT);
        return k < 0 ? -errno : k;
}

static void send_option(int fd, uint32_t option, const void *data, size_t len) {
        uint8_t h[16];

        put64(h, NBD_OPTS_MAGIC);
        put32(h + 8, option);
        put32(h + 12, (uint32_t) len);
        send_all(fd, h, sizeof(h));
        if (len > 0)
                send_all(fd, data, len);
}

static void send_reply(int fd, uint32_t option, uint32_t type, const void *data, size_t len) {
        uint8_t h[20];

        put64(h, NBD_REP_MAGIC);
        put32(h + 8, option);
        put32(h + 12, type);
        put32(h + 16, (uint32_t) len);
        send_all(fd, h, sizeof(h));
        if (len > 0)
                send_all(fd, data, len);
}

/* A reply the relay wrote to the client: its option, type and data length. */
static void expect_reply(int fd, uint32_t option, uint32_t type, uint32_t *ret_len) {
        uint8_t h[20];

        ASSERT_EQ(take(fd, h, sizeof(h)), 20);
        ASSERT_TRUE(memcmp(h, "\0\x03\xe8\x89\x04\x55\x65\xa9", 8) == 0);
        ASSERT_EQ(get32(h + 8), option);
        ASSERT_EQ(get32(h + 12), type);
        if (ret_len)
                *ret_len = get32(h + 16);
}

/* INFO/GO data: name, then no info requests. */
static size_t info_data(uint8_t *b, const char *name) {
        size_t l = strlen(name);

        put32(b, (uint32_t) l);
        memcpy(b + 4, name, l);
        b[4 + l] = b[5 + l] = 0;
        return 6 + l;
}

/* Greeting and client flags, through: options come next. */
static void greet(Pair *p) {
        uint8_t g[18], b[32];

        put64(g, NBD_MAGIC);
        put64(g + 8, NBD_OPTS_MAGIC);
        g[16] = 0, g[17] = 3;
        send_all(p->up, g, sizeof(g));
        ASSERT_EQ(step(p), 0);
        ASSERT_EQ(take(p->client, b, sizeof(b)), 18);
        ASSERT_TRUE(memcmp(b, g, 18) == 0);
        send_all(p->client, "\0\0\0\3", 4);
        ASSERT_EQ(step(p), 0);
        ASSERT_EQ(take(p->up, b, sizeof(b)), 4);
}

static void test_pin(void) {
        char long_name[EXPORT_NAME_MAX + 2];

        ASSERT_ERRNO(neg_pin_export(""), -EINVAL);
        ASSERT_ERRNO(neg_pin_export("a b"), -EINVAL);
        ASSERT_ERRNO(neg_pin_export("a\x7f"), -EINVAL);
        ASSERT_ERRNO(neg_pin_export("caf\xc3\xa9"), -EINVAL);
        memset(long_name, 'x', sizeof(long_name) - 1);
        long_name[sizeof(long_name) - 1] = 0;
        ASSERT_ERRNO(neg_pin_export(long_name), -EINVAL);
        long_name[EXPORT_NAME_MAX] = 0;
        ASSERT_OK(neg_pin_export(long_name));
        ASSERT_OK(neg_pin_export(PINNED));
}

/* "" is the pinned export, sent on under its name; the export is read-only whatever the server
 * says; after GO's ACK the pair is in the transmission phase. */
static void test_go_default_name(void) {
        uint8_t b[128], d[16];
        uint32_t len;
        Pair p;

        pair_open(&p);
        greet(&p);
        send_option(p.client, NBD_OPT_GO, b, info_data(b, ""));
        ASSERT_EQ(step(&p), 0);
        ASSERT_TRUE(neg_waits_upstream(&p.n));
        ASSERT_EQ(take(p.up, b, sizeof(b)), 16 + 4 + 4 + 2);
        ASSERT_EQ(get32(b + 8), NBD_OPT_GO);
        ASSERT_EQ(get32(b + 12), 10);
        ASSERT_EQ(get32(b + 16), 4);
        ASSERT_TRUE(memcmp(b + 20, PINNED, 4) == 0);

        d[0] = d[1] = 0; /* NBD_INFO_EXPORT */
        put64(d + 2, 1 << 20);
        d[10] = 0, d[11] = NBD_FLAG_HAS_FLAGS;
        send_reply(p.up, NBD_OPT_GO, NBD_REP_INFO, d, 12);
        ASSERT_EQ(step(&p), 0);
        expect_reply(p.client, NBD_OPT_GO, NBD_REP_INFO, &len);
        ASSERT_EQ(len, 12);
        ASSERT_EQ(take(p.client, d, sizeof(d)), 12);
        ASSERT_EQ(d[11], NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY);
        send_reply(p.up, NBD_OPT_GO, NBD_REP_ACK, NULL, 0);
        ASSERT_EQ(step(&p), 1);
        expect_reply(p.client, NBD_OPT_GO, NBD_REP_ACK, NULL);
        /* Nothing of the transmission phase was read ahead. */
        send_all(p.client, "x", 1);
        ASSERT_EQ(step(&p), 1);
        ASSERT_EQ(take(p.relay_client, b, sizeof(b)), 1);
        pair_close(&p);
}

/* What the relay answers itself: the server never hears of it, and the next option may come. */
static void test_answered_here(void) {
        uint8_t b[NBD_OPT_DATA_MAX + 64];
        uint32_t len;
        Pair p;

        pair_open(&p);
        greet(&p);

        send_option(p.client, NBD_OPT_LIST, NULL, 0);
        ASSERT_EQ(step(&p), 0);
        expect_reply(p.client, NBD_OPT_LIST, NBD_REP_SERVER, &len);
        ASSERT_EQ(len, 4 + strlen(PINNED));
        ASSERT_EQ(take(p.client, b, MIN(len, sizeof(b))), (ssize_t) len);
        ASSERT_EQ(get32(b), strlen(PINNED));
        ASSERT_TRUE(memcmp(b + 4, PINNED, strlen(PINNED)) == 0);
        expect_reply(p.client, NBD_OPT_LIST, NBD_REP_ACK, NULL);

        const struct {
                uint32_t option;
                const char *data;
                size_t len;
                uint32_t answer;
        } cases[] = {
                { NBD_OPT_LIST, "x", 1, NBD_REP_ERR_INVALID },
                { NBD_OPT_STARTTLS, "", 0, NBD_REP_ERR_POLICY },
                { 99, "junk", 4, NBD_REP_ERR_UNSUP },
                { NBD_OPT_GO, "\0\0\0\5other\0\0", 11, NBD_REP_ERR_UNKNOWN },
                { NBD_OPT_INFO, "\0\0\0\4Disk\0\0", 10, NBD_REP_ERR_UNKNOWN },
                { NBD_OPT_GO, "\0\0\0\5disk \0\0", 11, NBD_REP_ERR_UNKNOWN },
                { NBD_OPT_INFO, "\0\0\0\x64" "disk\0\0", 10, NBD_REP_ERR_INVALID },    /* name longer than the data */
                { NBD_OPT_GO, "\0\0\0\4disk\0\1", 10, NBD_REP_ERR_INVALID },        /* one request, none sent */
                { NBD_OPT_GO, "\0\0\0\4disk", 8, NBD_REP_ERR_INVALID },             /* no request count */
                { NBD_OPT_SET_META_CONTEXT, "\0\0\0\5other\0\0\0\0", 13, NBD_REP_ERR_UNKNOWN },
                { NBD_OPT_LIST_META_CONTEXT, "\0\0\0\4disk\0\0\0\1\0\0\0\5a", 17, NBD_REP_ERR_INVALID }, /* cut query */
                { NBD_OPT_LIST_META_CONTEXT, "\0\0\0\4disk\0\0\0\0!", 13, NBD_REP_ERR_INVALID },         /* trailing byte */
        };
        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                send_option(p.client, cases[i].option, cases[i].data, cases[i].len);
                ASSERT_EQ(step(&p), 0);
                expect_reply(p.client, cases[i].option, cases[i].answer, &len);
                ASSERT_LE_U64(len, sizeof(b));
                ASSERT_EQ(take(p.client, b, MIN(len, sizeof(b))), (ssize_t) len);
        }
        ASSERT_EQ(take(p.up, b, sizeof(b)), -EAGAIN);
        ASSERT_FALSE(neg_waits_upstream(&p.n));
        pair_close(&p);
}

/* What ends the pair: EXPORT_NAME of another export, an option too long (after telling so),
 * ABORT (after its ACK), garbage instead of an option, a client that leaves. */
static void test_closing(void) {
        uint8_t b[64];
        Pair p;

        pair_open(&p);
        greet(&p);
        send_option(p.client, NBD_OPT_EXPORT_NAME, "other", 5);
        ASSERT_ERRNO(step(&p), -ENOENT);
        pair_close(&p);

        pair_open(&p);
        greet(&p);
        put64(b, NBD_OPTS_MAGIC);
        put32(b + 8, NBD_OPT_GO);
        put32(b + 12, NBD_OPT_DATA_MAX + 1);
        send_all(p.client, b, 16);
        ASSERT_ERRNO(step(&p), -ECONNRESET);
        expect_reply(p.client, NBD_OPT_GO, NBD_REP_ERR_TOO_BIG, NULL);
        pair_close(&p);

        pair_open(&p);
        greet(&p);
        send_option(p.client, NBD_OPT_ABORT, NULL, 0);
        ASSERT_ERRNO(step(&p), -ECONNRESET);
        expect_reply(p.client, NBD_OPT_ABORT, NBD_REP_ACK, NULL);
        pair_close(&p);

        pair_open(&p);
        greet(&p);
        send_all(p.client, "GET / HTTP/1.0\r\n\r\n", 18);
        ASSERT_ERRNO(step(&p), -EBADMSG);
        pair_close(&p);

        pair_open(&p);
        greet(&p);
        send_all(p.client, "\0\0", 2);
        shutdown(p.client, SHUT_WR);
        ASSERT_ERRNO(step(&p), -ECONNRESET);
        ASSERT_EQ(take(p.up, b, sizeof(b)), -EAGAIN);
        pair_close(&p);
}

/* A server that breaks the rules costs its client the pair. */
static void test_hostile_server(void) {
        uint8_t b[64], d[16] = {};
        Pair p;

        /* Not a greeting. */
        pair_open(&p);
        send_all(p.up, "NBDMAGICIHAVEOPX\0\3", 18);
        ASSERT_ERRNO(step(&p), -EBADMSG);
        ASSERT_EQ(take(p.client, b, sizeof(b)), -EAGAIN);
        pair_close(&p);

        const struct {
                uint32_t option, type, len;
        } replies[] = {
                { NBD_OPT_LIST, NBD_REP_ACK, 0 },               /* a reply to another option */
                { NBD_OPT_GO, NBD_REP_SERVER, 4 },              /* a type that does not belong to GO */
                { NBD_OPT_GO, NBD_REP_INFO, 11 },               /* an export's info of the wrong size */
                { NBD_OPT_GO, NBD_REP_INFO, NBD_REP_DATA_MAX + 1 }, /* longer than any reply */
        };
        for (size_t i = 0; i < ELEMENTSOF(replies); i++) {
                pair_open(&p);
                greet(&p);
                send_option(p.client, NBD_OPT_GO, b, info_data(b, PINNED));
                ASSERT_EQ(step(&p), 0);
                ASSERT_EQ(take(p.up, b, sizeof(b)), 26);
                send_reply(p.up, replies[i].option, replies[i].type, d, MIN(replies[i].len, sizeof(d)));
                ASSERT_ERRNO(step(&p), -EBADMSG);
                ASSERT_EQ(take(p.client, b, sizeof(b)), -EAGAIN);
                pair_close(&p);
        }
}

/* Replies the relay wrote to the client so far, each read whole. */
static unsigned take_replies(int fd, uint32_t option, uint32_t type) {
        uint8_t b[NBD_OPT_DATA_MAX + 64];
        unsigned n = 0;
        uint32_t len;

        for (;;) {
                uint8_t peek[20];

                if (recv(fd, peek, sizeof(peek), MSG_DONTWAIT | MSG_PEEK) <= 0)
                        return n;
                expect_reply(fd, option, type, &len);
                ASSERT_LE_U64(len, sizeof(b));
                ASSERT_EQ(take(fd, b, MIN(len, sizeof(b))), (ssize_t) len);
                n++;
        }
}

/* A client that sends options as fast as they are answered gets a bounded turn (review 31b: it
 * held the relay's one thread, every other client and deadline waiting), and no more than
 * NEG_OPTIONS_MAX options a handshake. */
static void test_bounded(void) {
        uint8_t b[64];
        unsigned answered;
        int r;
        Pair p;

        pair_open(&p);
        greet(&p);
        for (unsigned i = 0; i < NEG_OPTIONS_MAX; i++)
                send_option(p.client, 99, "junk", 4);
        ASSERT_EQ(step(&p), 0);
        answered = take_replies(p.client, 99, NBD_REP_ERR_UNSUP);
        ASSERT_TRUE(answered > 0);
        ASSERT_TRUE(answered < NEG_OPTIONS_MAX);
        for (unsigned turn = 0; turn < NEG_OPTIONS_MAX && answered < NEG_OPTIONS_MAX; turn++) {
                ASSERT_EQ(step(&p), 0);
                answered += take_replies(p.client, 99, NBD_REP_ERR_UNSUP);
        }
        ASSERT_EQ(answered, NEG_OPTIONS_MAX);

        /* One more is too many: the pair closes, unanswered. */
        send_option(p.client, 99, "junk", 4);
        r = step(&p);
        ASSERT_ERRNO(r, -EPROTO);
        ASSERT_EQ(take(p.client, b, sizeof(b)), -EAGAIN);
        ASSERT_EQ(take(p.up, b, sizeof(b)), -EAGAIN);
        pair_close(&p);
}

int main(int argc, char **argv) {
        log_set_max_level(LOG_LEVEL_ERR);
        tap_init(argc, argv);
        TAP_RUN(test_pin);
        TAP_RUN(test_go_default_name);
        TAP_RUN(test_answered_here);
        TAP_RUN(test_closing);
        TAP_RUN(test_hostile_server);
        TAP_RUN(test_bounded);
        return tap_finish();
}
