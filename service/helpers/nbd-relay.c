/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* blockstream-nbd-relay: serves one export of a guest's private QEMU NBD server to the clients
 * of a user-facing NBD address, one upstream connection per client, which the daemon opens and
 * hands over. QEMU 7.2 runs one NBD server per process, carrying every export of that QEMU (the
 * guest's other disks, the daemon's private map and range exports), so the relay proxies the
 * fixed-newstyle handshake option by option and pins the export name given with --export:
 *   NBD_OPT_LIST                      answered here, listing the pinned name only
 *   EXPORT_NAME, INFO, GO,
 *   LIST_META_CONTEXT, SET_META_CONTEXT  forwarded if they name the pinned export ("" means it
 *                                     too, and is sent on as its name), else NBD_REP_ERR_UNKNOWN
 *                                     here (EXPORT_NAME: the connection is closed)
 *   STRUCTURED_REPLY                  forwarded
 *   ABORT                             acknowledged here, and the pair is closed
 *   STARTTLS, anything else           NBD_REP_ERR_POLICY / NBD_REP_ERR_UNSUP here
 * Options longer than NBD_OPT_DATA_MAX get NBD_REP_ERR_TOO_BIG and the connection is closed;
 * the server's replies are checked (magic, option, type, a bounded length) and the export's
 * transmission flags always carry NBD_FLAG_READ_ONLY (QEMU's export is read-only as well).
 * After the final reply of GO, or EXPORT_NAME's, the transmission phase is moved as raw bytes.
 * The handshake is lock-step: one option at a time, exactly the bytes it has, so that nothing
 * is left in our buffers when the splicing starts.
 *
 * fd 3: the listening socket (bound and listening, AF_UNIX/AF_INET/AF_INET6 stream)
 * fd 4: the daemon (AF_UNIX SOCK_SEQPACKET), one line of ASCII per message, at most 256 bytes:
 *   relay → daemon: "ready", "connect <n>", "clients <k>", "error <text>"
 *   daemon → relay: "upstream <n>" + one fd (SCM_RIGHTS), "refused <n> <text>", "stop"
 *
 * After checking its fds it confines itself with a seccomp allow-list: from then on it can
 * accept on fd 3, talk on fd 4, send and receive on its sockets, splice, make pipes, poll, close
 * and shut down, and nothing else. One poll loop, one thread, a fixed client table: no
 * allocation after setup. */

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <seccomp.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <endian.h>

#include "util.h"

#if defined(__SANITIZE_ADDRESS__)
#define HAVE_LSAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define HAVE_LSAN 1
#endif
#endif
#ifdef HAVE_LSAN
#include <sanitizer/lsan_interface.h>
#endif

#define LISTEN_FD 3
#define CONTROL_FD 4
#define CLIENTS_MAX 64
#define CONTROL_MSG_MAX 256
#define CONTROL_FDS_MAX 8 /* room to see (and close) fds beyond the one expected */
#define UPSTREAM_TIMEOUT_USEC (10 * USEC_PER_SEC)
/* From the upstream's arrival to the transmission phase. */
#define NEGOTIATION_TIMEOUT_USEC (30 * USEC_PER_SEC)
#define ACCEPT_BATCH 16
#define ACCEPT_PAUSE_USEC (1 * USEC_PER_SEC)
#define REJECT_LOG_INTERVAL_USEC (1 * USEC_PER_SEC)
#define ERROR_SEND_TIMEOUT_MSEC 1000
/* Asked of each splice into a pipe; the kernel moves no more than the pipe has room for, so
 * the pipe (64 KiB by default) bounds what is buffered per direction. */
#define SPLICE_MAX (1024 * 1024)
#define SPLICE_FLAGS (SPLICE_F_NONBLOCK | SPLICE_F_MOVE)
#define ACCEPT_FLAGS (SOCK_NONBLOCK | SOCK_CLOEXEC)
#define PIPE_FLAGS (O_NONBLOCK | O_CLOEXEC)

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

#define NBD_GREETING_SIZE 18     /* NBDMAGIC, IHAVEOPT, 16-bit handshake flags */
#define NBD_OPT_HEADER_SIZE 16   /* IHAVEOPT, option, length */
#define NBD_REP_HEADER_SIZE 20   /* magic, option, type, length */
#define NBD_EXPORT_REPLY_SIZE 10 /* EXPORT_NAME: size, flags (the zeroes after them pass as data) */
#define NBD_OPT_DATA_MAX 4096    /* a client's option: the protocol's longest name, and room */
#define NBD_REP_DATA_MAX 4160    /* the server's reply: a name or context of 4 KiB, and room */
#define EXPORT_NAME_MAX 256      /* the pinned name */
#define NEG_IN_MAX (NBD_REP_HEADER_SIZE + NBD_REP_DATA_MAX)
#define NEG_OUT_MAX (NBD_OPT_HEADER_SIZE + NBD_OPT_DATA_MAX + EXPORT_NAME_MAX + 256)

/* What the main loop does next, besides carrying on (0) or failing (-errno). */
enum {
        RELAY_EXIT = 1, /* "stop", or the daemon went away: exit 0 */
};

typedef enum ClientState {
        CLIENT_FREE,
        CLIENT_WAITING,     /* accepted, waiting for its upstream */
        CLIENT_NEGOTIATING, /* the handshake, option by option */
        CLIENT_RELAYING,
} ClientState;

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
        size_t in_len, in_want;
        size_t out_len, out_done;
        uint8_t in[NEG_IN_MAX];
        uint8_t out[NEG_OUT_MAX];
} Negotiation;

/* One direction of a pair: source → pipe → destination. */
typedef struct Flow {
        int pipe[2];
        size_t pending; /* bytes in the pipe */
        bool pipe_full; /* a splice into the pipe would block: wait until some is drained */
        bool eof;       /* the source said EOF ... */
        bool shut;      /* ... and the destination got shutdown(SHUT_WR) */
} Flow;

typedef struct Client {
        ClientState state;
        uint64_t id;
        int fd;
        int upstream_fd;
        usec_t deadline;     /* CLIENT_WAITING, CLIENT_NEGOTIATING: close it if not further by then */
        bool connect_queued; /* "connect <id>" not sent yet */
        Flow flows[2];       /* client → upstream, upstream → client */
        Negotiation neg;
} Client;

typedef struct Relay {
        Client clients[CLIENTS_MAX];
        unsigned n_clients;
        unsigned n_clients_reported;
        uint64_t next_id;
        bool control_blocked; /* the daemon's queue was full: wait for POLLOUT */
        usec_t accept_paused_until;
        uint64_t n_rejected;
        usec_t rejected_logged;
        /* [0] the listening socket, [1] the daemon, then two per client slot */
        struct pollfd pollfds[2 + 2 * CLIENTS_MAX];
} Relay;

static usec_t upstream_timeout_usec = UPSTREAM_TIMEOUT_USEC;
static usec_t negotiation_timeout_usec = NEGOTIATION_TIMEOUT_USEC;
static char export_name[EXPORT_NAME_MAX + 1];
static size_t export_name_len;

#ifdef RELAY_SELFTEST
/* Test builds only: BLOCKSTREAM_RELAY_SELFTEST=word,… with
 *   open, socket   try that syscall right after "ready" (the filter must kill us with SIGSYS)
 *   sendmsg, write the same on an fd the filter does not allow it on
 *   timeout        wait 1 s instead of 10 s for an upstream, and 1 s instead of 30 s for a handshake
 *   valgrind       also allow what valgrind's own machinery needs, so memcheck can run */
static bool selftest_has(const char *word) {
        const char *e = getenv("BLOCKSTREAM_RELAY_SELFTEST");
        size_t l = strlen(word);

        for (const char *p = e; p && *p; p += strcspn(p, ","), p += !!*p)
                if (strncmp(p, word, l) == 0 && (p[l] == ',' || p[l] == 0))
                        return true;
        return false;
}
#endif

/* Printable ASCII for a log line; anything else becomes '?'. */
static const char *sanitize(char *buf, size_t size, const char *s, size_t len) {
        size_t i;

        for (i = 0; i < len && i + 1 < size; i++)
                buf[i] = s[i] >= 0x20 && s[i] < 0x7f ? s[i] : '?';
        buf[i] = 0;
        return buf;
}

static int control_send(const char *line) {
        struct iovec iov = { .iov_base = (void *) line, .iov_len = strlen(line) };
        struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };

        for (;;) {
                if (sendmsg(CONTROL_FD, &mh, MSG_DONTWAIT | MSG_NOSIGNAL) >= 0)
                        return 0;
                if (errno != EINTR)
                        return -errno;
        }
}

/* A fatal error: log it, tell the daemon (waiting a little if its queue is full), and return
 * -error for main to exit with. */
_printf_(2, 3) static int relay_fail(int error, const char *format, ...) {
        char text[CONTROL_MSG_MAX - sizeof("error \n") + 1], line[CONTROL_MSG_MAX + 1];
        struct pollfd p = { .fd = CONTROL_FD, .events = POLLOUT };
        va_list ap;

        error = abs(error);
        errno = error;
        va_start(ap, format);
        vsnprintf(text, sizeof(text), format, ap);
        va_end(ap);
        log_error("%s", text);

        snprintf(line, sizeof(line), "error %s\n", text);
        if (control_send(line) == -EAGAIN && poll(&p, 1, ERROR_SEND_TIMEOUT_MSEC) > 0)
                (void) control_send(line);
        return -error;
}

static void flow_init(Flow *f) {
        *f = (Flow) { .pipe = { -1, -1 } };
}

static void flow_close(Flow *f) {
        for (size_t i = 0; i < 2; i++)
                if (f->pipe[i] >= 0)
                        close(f->pipe[i]);
        flow_init(f);
}

static void client_close(Relay *relay, Client *c, const char *why) {
        if (c->state == CLIENT_FREE)
                return;
        log_debug("Client %" PRIu64 ": %s, closing.", c->id, why);
        if (c->fd >= 0)
                close(c->fd);
        if (c->upstream_fd >= 0)
                close(c->upstream_fd);
        for (size_t i = 0; i < ELEMENTSOF(c->flows); i++)
                flow_close(&c->flows[i]);
        *c = (Client) { .state = CLIENT_FREE, .fd = -1, .upstream_fd = -1 };
        relay->n_clients--;
}

static Client *client_find(Relay *relay, uint64_t id) {
        for (size_t i = 0; i < CLIENTS_MAX; i++)
                if (relay->clients[i].state != CLIENT_FREE && relay->clients[i].id == id)
                        return &relay->clients[i];
        return NULL;
}

static void neg_expect(Negotiation *n, NegState state, size_t want) {
        n->state = state;
        n->in_len = 0;
        n->in_want = want;
}

/* Takes upstream_fd. The handshake starts with the server's greeting. */
static int client_start_negotiating(Client *c, int upstream_fd, usec_t now) {
        int flags;

        c->upstream_fd = upstream_fd;
        flags = fcntl(c->upstream_fd, F_GETFL);
        if (flags < 0 || fcntl(c->upstream_fd, F_SETFL, flags | O_NONBLOCK) < 0)
                return -errno;
        c->state = CLIENT_NEGOTIATING;
        c->deadline = now + negotiation_timeout_usec;
        neg_expect(&c->neg, NEG_GREETING, NBD_GREETING_SIZE);
        return 0;
}

static int client_start_relaying(Client *c) {
        for (size_t i = 0; i < ELEMENTSOF(c->flows); i++)
                if (pipe2(c->flows[i].pipe, PIPE_FLAGS) < 0)
                        return -errno;
        c->state = CLIENT_RELAYING;
        return 0;
}

static uint32_t get_be32(const uint8_t *p) {
        uint32_t v;
        memcpy(&v, p, sizeof(v));
        return be32toh(v);
}

static uint64_t get_be64(const uint8_t *p) {
        uint64_t v;
        memcpy(&v, p, sizeof(v));
        return be64toh(v);
}

static void put_be16(uint8_t *p, uint16_t v) {
        v = htobe16(v);
        memcpy(p, &v, sizeof(v));
}

static void put_be32(uint8_t *p, uint32_t v) {
        v = htobe32(v);
        memcpy(p, &v, sizeof(v));
}

static void put_be64(uint8_t *p, uint64_t v) {
        v = htobe64(v);
        memcpy(p, &v, sizeof(v));
}

/* An export's transmission flags, read-only whatever the server says: QEMU refuses writes to
 * our exports anyway, and a client told so does not try. */
static uint16_t read_only_flags(const uint8_t *p) {
        return (uint16_t) (((p[0] << 8) | p[1]) | NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY);
}

/* Appends to what goes out next; the callers' sizes are all bounded well below NEG_OUT_MAX. */
static void neg_put(Negotiation *n, const void *data, size_t len) {
        if (len == 0)
                return; /* data may be NULL then, which memcpy() must not see */
        assert(n->out_len + len <= sizeof(n->out));
        memcpy(n->out + n->out_len, data, len);
        n->out_len += len;
}

static void neg_put_reply(Negotiation *n, uint32_t option, uint32_t type, const void *data, size_t len) {
        uint8_t h[NBD_REP_HEADER_SIZE];

        put_be64(h, NBD_REP_MAGIC);
        put_be32(h + 8, option);
        put_be32(h + 12, type);
        put_be32(h + 16, (uint32_t) len);
        neg_put(n, h, sizeof(h));
        neg_put(n, data, len);
}

static void neg_put_error(Negotiation *n, uint32_t option, uint32_t type, const char *message) {
        neg_put_reply(n, option, type, message, strlen(message));
}

/* An option to the upstream, with the pinned name in place of the one the client gave. */
static void neg_put_option_pinned(Negotiation *n, uint32_t option, bool length_prefix, const uint8_t *rest,
        size_t rest_len) {
        uint8_t h[NBD_OPT_HEADER_SIZE], l[4];

        put_be64(h, NBD_OPTS_MAGIC);
        put_be32(h + 8, option);
        put_be32(h + 12, (uint32_t) ((length_prefix ? 4 : 0) + export_name_len + rest_len));
        neg_put(n, h, sizeof(h));
        if (length_prefix) {
                put_be32(l, (uint32_t) export_name_len);
                neg_put(n, l, sizeof(l));
        }
        neg_put(n, export_name, export_name_len);
        neg_put(n, rest, rest_len);
}

static void neg_write(Negotiation *n, bool to_upstream, NegState after) {
        n->state = NEG_WRITE;
        n->to_upstream = to_upstream;
        n->out_done = 0;
        n->after_write = after;
}

/* The name a client gave is ours: the pinned one, or "" which means it. */
static bool name_is_pinned(const uint8_t *name, size_t len) {
        return len == 0 || (len == export_name_len && memcmp(name, export_name, len) == 0);
}

/* INFO and GO: name, then a 16-bit count of 16-bit info requests. Returns the offset of what
 * follows the name, or -EBADMSG. */
static ssize_t parse_info_request(const uint8_t *d, size_t len) {
        uint32_t name_len;
        size_t rest;

        if (len < 6)
                return -EBADMSG;
        name_len = get_be32(d);
        if (name_len > len - 6)
                return -EBADMSG;
        rest = 4 + name_len;
        if (len != rest + 2 + 2 * (size_t) ((d[rest] << 8) | d[rest + 1]))
                return -EBADMSG;
        return (ssize_t) rest;
}

/* LIST/SET_META_CONTEXT: name, then a 32-bit count of length-prefixed queries, exactly. */
static ssize_t parse_meta_request(const uint8_t *d, size_t len) {
        uint32_t name_len, n_queries;
        size_t rest, p;

        if (len < 8)
                return -EBADMSG;
        name_len = get_be32(d);
        if (name_len > len - 8)
                return -EBADMSG;
        rest = 4 + name_len;
        n_queries = get_be32(d + rest);
        p = rest + 4;
        for (uint32_t i = 0; i < n_queries; i++) {
                uint32_t q;

                if (len - p < 4)
                        return -EBADMSG;
                q = get_be32(d + p);
                p += 4;
                if (q > len - p)
                        return -EBADMSG;
                p += q;
        }
        if (p != len)
                return -EBADMSG;
        return (ssize_t) rest;
}

/* A whole option from the client is in n->in: answer it here, or send it on. */
static int neg_handle_option(Client *c) {
        Negotiation *n = &c->neg;
        const uint8_t *d = n->in + NBD_OPT_HEADER_SIZE;
        size_t len = n->in_len - NBD_OPT_HEADER_SIZE;
        uint32_t option = n->option;
        ssize_t rest;

        n->out_len = 0;
        switch (option) {

        case NBD_OPT_EXPORT_NAME:
                if (!name_is_pinned(d, len)) {
                        /* No way to say no but to hang up. */
                        log_debug("Client %" PRIu64 ": EXPORT_NAME of another export.", c->id);
                        return -ENOENT;
                }
                neg_put_option_pinned(n, option, false, NULL, 0);
                neg_write(n, true, NEG_EXPORT_REPLY);
                return 0;

        case NBD_OPT_ABORT:
                neg_put_reply(n, option, NBD_REP_ACK, NULL, 0);
                neg_write(n, false, NEG_CLOSE);
                return 0;

        case NBD_OPT_LIST: {
                uint8_t l[4];

                if (len != 0) {
                        neg_put_error(n, option, NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data.");
                        break;
                }
                put_be32(l, (uint32_t) export_name_len);
                neg_put_reply(n, option, NBD_REP_SERVER, NULL, 0);
                /* The header said 0: write the length of what follows into it. */
                put_be32(n->out + 16, (uint32_t) (sizeof(l) + export_name_len));
                neg_put(n, l, sizeof(l));
                neg_put(n, export_name, export_name_len);
                neg_put_reply(n, option, NBD_REP_ACK, NULL, 0);
                break;
        }

        case NBD_OPT_INFO:
        case NBD_OPT_GO:
        case NBD_OPT_LIST_META_CONTEXT:
        case NBD_OPT_SET_META_CONTEXT:
                if (option == NBD_OPT_INFO || option == NBD_OPT_GO)
                        rest = parse_info_request(d, len);
                else
                        rest = parse_meta_request(d, len);
                if (rest < 0) {
                        neg_put_error(n, option, NBD_REP_ERR_INVALID, "Malformed option.");
                        break;
                }
                if (!name_is_pinned(d + 4, (size_t) rest - 4)) {
                        log_debug("Client %" PRIu64 ": option %" PRIu32 " for another export.", c->id, option);
                        neg_put_error(n, option, NBD_REP_ERR_UNKNOWN, "No such export here.");
                        break;
                }
                neg_put_option_pinned(n, option, true, d + rest, len - (size_t) rest);
                neg_write(n, true, NEG_REP_HEADER);
                return 0;

        case NBD_OPT_STRUCTURED_REPLY: {
                uint8_t h[NBD_OPT_HEADER_SIZE];

                put_be64(h, NBD_OPTS_MAGIC);
                put_be32(h + 8, option);
                put_be32(h + 12, (uint32_t) len);
                neg_put(n, h, sizeof(h));
                neg_put(n, d, len);
                neg_write(n, true, NEG_REP_HEADER);
                return 0;
        }

        case NBD_OPT_STARTTLS:
                neg_put_error(n, option, NBD_REP_ERR_POLICY, "TLS is not offered here.");
                break;

        default:
                neg_put_error(n, option, NBD_REP_ERR_UNSUP, "Unsupported option.");
                break;
        }

        /* Answered here: on to the next option. */
        neg_write(n, false, NEG_OPT_HEADER);
        return 0;
}

/* One of the server's replies to the option we sent on is in n->in: check it, pass it on. */
static int neg_handle_reply(Client *c) {
        Negotiation *n = &c->neg;
        uint32_t type = get_be32(n->in + 12), len = get_be32(n->in + 16);
        uint8_t *d = n->in + NBD_REP_HEADER_SIZE;
        NegState next;

        if (type == NBD_REP_ACK)
                next = n->option == NBD_OPT_GO ? NEG_DONE : NEG_OPT_HEADER;
        else if (type & NBD_REP_FLAG_ERROR)
                next = NEG_OPT_HEADER;
        else if (type == NBD_REP_INFO && (n->option == NBD_OPT_INFO || n->option == NBD_OPT_GO)) {
                next = NEG_REP_HEADER;
                if (len >= 2 && ((d[0] << 8) | d[1]) == NBD_INFO_EXPORT) {
                        if (len != 12)
                                return -EBADMSG;
                        put_be16(d + 10, read_only_flags(d + 10));
                }
        } else if (type == NBD_REP_META_CONTEXT &&
                (n->option == NBD_OPT_LIST_META_CONTEXT || n->option == NBD_OPT_SET_META_CONTEXT))
                next = NEG_REP_HEADER;
        else
                return -EBADMSG;

        n->out_len = 0;
        neg_put(n, n->in, n->in_len);
        neg_write(n, false, next);
        return 0;
}

/* n->in has what the current step waited for. */
static int neg_input_done(Client *c) {
        Negotiation *n = &c->neg;
        uint32_t len;

        switch (n->state) {

        case NEG_GREETING:
                if (get_be64(n->in) != NBD_MAGIC || get_be64(n->in + 8) != NBD_OPTS_MAGIC)
                        return -EBADMSG;
                n->out_len = 0;
                neg_put(n, n->in, n->in_len);
                neg_write(n, false, NEG_CLIENT_FLAGS);
                return 0;

        case NEG_CLIENT_FLAGS:
                n->out_len = 0;
                neg_put(n, n->in, n->in_len);
                neg_write(n, true, NEG_OPT_HEADER);
                return 0;

        case NEG_OPT_HEADER:
                if (get_be64(n->in) != NBD_OPTS_MAGIC) {
                        log_debug("Client %" PRIu64 ": not an option.", c->id);
                        return -EBADMSG;
                }
                n->option = get_be32(n->in + 8);
                len = get_be32(n->in + 12);
                if (len > NBD_OPT_DATA_MAX) {
                        log_debug("Client %" PRIu64 ": option %" PRIu32 " of %" PRIu32 " bytes.", c->id, n->option,
                                len);
                        n->out_len = 0;
                        neg_put_error(n, n->option, NBD_REP_ERR_TOO_BIG, "Option too long.");
                        neg_write(n, false, NEG_CLOSE);
                        return 0;
                }
                n->state = NEG_OPT_DATA;
                n->in_want = NBD_OPT_HEADER_SIZE + len;
                return n->in_len == n->in_want ? neg_handle_option(c) : 0;

        case NEG_OPT_DATA:
                return neg_handle_option(c);

        case NEG_REP_HEADER:
                len = get_be32(n->in + 16);
                if (get_be64(n->in) != NBD_REP_MAGIC || get_be32(n->in + 8) != n->option || len > NBD_REP_DATA_MAX) {
                        log_warning("Client %" PRIu64 ": the server sent a malformed reply, closing.", c->id);
                        return -EBADMSG;
                }
                n->state = NEG_REP_DATA;
                n->in_want = NBD_REP_HEADER_SIZE + len;
                return n->in_len == n->in_want ? neg_input_done(c) : 0;

        case NEG_REP_DATA:
                if (neg_handle_reply(c) < 0) {
                        log_warning("Client %" PRIu64 ": the server sent an unexpected reply, closing.", c->id);
                        return -EBADMSG;
                }
                return 0;

        case NEG_EXPORT_REPLY:
                /* size, flags: read-only whatever the server says */
                put_be16(n->in + 8, read_only_flags(n->in + 8));
                n->out_len = 0;
                neg_put(n, n->in, n->in_len);
                neg_write(n, false, NEG_DONE);
                return 0;

        default:
                return -EINVAL;
        }
}

static bool neg_reads_upstream(const Negotiation *n) {
        return n->state == NEG_GREETING || n->state == NEG_REP_HEADER || n->state == NEG_REP_DATA ||
                n->state == NEG_EXPORT_REPLY;
}

static bool neg_waits_upstream(const Negotiation *n) {
        return n->state == NEG_WRITE ? n->to_upstream : neg_reads_upstream(n);
}

/* Moves the handshake on as far as the sockets let it. Returns 1 once the transmission phase
 * starts, 0 to wait, -errno to close the pair. */
static int neg_step(Client *c) {
        Negotiation *n = &c->neg;
        ssize_t k;
        int r;

        for (;;) {
                switch (n->state) {

                case NEG_DONE:
                        return 1;

                case NEG_CLOSE:
                        return -ECONNRESET;

                case NEG_WRITE:
                        if (n->out_done < n->out_len) {
                                k = send(n->to_upstream ? c->upstream_fd : c->fd, n->out + n->out_done,
                                        n->out_len - n->out_done, MSG_DONTWAIT | MSG_NOSIGNAL);
                                if (k < 0) {
                                        if (errno == EAGAIN)
                                                return 0;
                                        if (errno == EINTR)
                                                continue;
                                        return -errno;
                                }
                                n->out_done += (size_t) k;
                                continue;
                        }
                        n->out_len = n->out_done = 0;
                        switch (n->after_write) {
                        case NEG_CLIENT_FLAGS:
                                neg_expect(n, NEG_CLIENT_FLAGS, 4);
                                break;
                        case NEG_OPT_HEADER:
                                neg_expect(n, NEG_OPT_HEADER, NBD_OPT_HEADER_SIZE);
                                break;
                        case NEG_REP_HEADER:
                                neg_expect(n, NEG_REP_HEADER, NBD_REP_HEADER_SIZE);
                                break;
                        case NEG_EXPORT_REPLY:
                                neg_expect(n, NEG_EXPORT_REPLY, NBD_EXPORT_REPLY_SIZE);
                                break;
                        default:
                                n->state = n->after_write;
                        }
                        continue;

                default:
                        /* Exactly what this step needs, never more: what follows stays in the
                         * socket for the next step, or for the splicing. */
                        if (n->in_len < n->in_want) {
                                k = recv(neg_reads_upstream(n) ? c->upstream_fd : c->fd, n->in + n->in_len,
                                        n->in_want - n->in_len, MSG_DONTWAIT);
                                if (k < 0) {
                                        if (errno == EAGAIN)
                                                return 0;
                                        if (errno == EINTR)
                                                continue;
                                        return -errno;
                                }
                                if (k == 0)
                                        return -ECONNRESET;
                                n->in_len += (size_t) k;
                                if (n->in_len < n->in_want)
                                        continue;
                        }
                        r = neg_input_done(c);
                        if (r < 0)
                                return r;
                }
        }
}

/* Source → pipe. */
static int flow_fill(Flow *f, int src) {
        ssize_t n;

        n = splice(src, NULL, f->pipe[1], NULL, SPLICE_MAX, SPLICE_FLAGS);
        if (n > 0)
                f->pending += (size_t) n;
        else if (n == 0)
                f->eof = true;
        else if (errno == EAGAIN)
                /* Either the source is dry or the pipe is full; only draining tells which. */
                f->pipe_full = f->pending > 0;
        else if (errno != EINTR)
                return -errno;
        return 0;
}

/* Pipe → destination, then pass on an EOF once everything before it went through. */
static int flow_drain(Flow *f, int dst) {
        ssize_t n;

        if (f->pending > 0) {
                n = splice(f->pipe[0], NULL, dst, NULL, f->pending, SPLICE_FLAGS);
                if (n > 0) {
                        f->pending -= (size_t) n;
                        f->pipe_full = false;
                } else if (n < 0 && errno != EAGAIN && errno != EINTR)
                        return -errno;
        }
        if (f->eof && f->pending == 0 && !f->shut) {
                if (shutdown(dst, SHUT_WR) < 0 && errno != ENOTCONN)
                        return -errno;
                f->shut = true;
        }
        return 0;
}

static bool flow_wants_fill(const Flow *f) {
        return !f->eof && !f->pipe_full;
}

static void client_process(Relay *relay, Client *c, short revents, short upstream_revents) {
        const short trouble = POLLHUP | POLLERR | POLLNVAL;
        const int fds[2] = { c->fd, c->upstream_fd };
        const short rev[2] = { revents, upstream_revents };
        int r;

        if (c->state == CLIENT_WAITING) {
                /* Polled for nothing but hangups and errors until its upstream arrives. */
                if (revents & (trouble | POLLRDHUP))
                        client_close(relay, c, "left before its upstream arrived");
                return;
        }
        if (c->state == CLIENT_NEGOTIATING) {
                if ((revents | upstream_revents) == 0)
                        return;
                r = neg_step(c);
                if (r == 0 && (revents & (trouble | POLLRDHUP)) && neg_waits_upstream(&c->neg))
                        r = -ECONNRESET; /* the client left */
                if (r == 0)
                        return;
                if (r < 0) {
                        if (r != -ECONNRESET)
                                log_debug_errno(r, "Client %" PRIu64 ": handshake failed: %m", c->id);
                        client_close(relay, c, "handshake ended");
                        return;
                }
                r = client_start_relaying(c);
                if (r < 0) {
                        log_warning_errno(r, "Client %" PRIu64 ": failed to set up relaying: %m", c->id);
                        client_close(relay, c, "setup failed");
                        return;
                }
                log_debug("Client %" PRIu64 ": handshake done, relaying.", c->id);
                return;
        }
        if (c->state != CLIENT_RELAYING || (revents | upstream_revents) == 0)
                return;

        /* Trouble on an fd is handled by trying what we wanted of it: the read or write says
         * what happened (EOF, EPIPE, ECONNRESET …). */
        for (size_t i = 0; i < ELEMENTSOF(c->flows); i++) {
                Flow *f = &c->flows[i];
                bool filled = false;

                if (flow_wants_fill(f) && (rev[i] & (POLLIN | trouble))) {
                        r = flow_fill(f, fds[i]);
                        if (r < 0) {
                                log_debug_errno(r, "Client %" PRIu64 ": reading from the %s failed: %m", c->id,
                                        i == 0 ? "client" : "upstream");
                                client_close(relay, c, "read error");
                                return;
                        }
                        filled = true;
                }
                /* Write right after reading, without waiting for POLLOUT: saves a poll round
                 * trip when the destination has room, costs an EAGAIN when not. */
                if (filled || (rev[!i] & (POLLOUT | trouble))) {
                        r = flow_drain(f, fds[!i]);
                        if (r < 0) {
                                log_debug_errno(r, "Client %" PRIu64 ": writing to the %s failed: %m", c->id,
                                        i == 0 ? "upstream" : "client");
                                client_close(relay, c, "write error");
                                return;
                        }
                }
        }
        if (c->flows[0].shut && c->flows[1].shut)
                client_close(relay, c, "both directions done");
}

static int relay_accept(Relay *relay, usec_t now) {
        for (unsigned i = 0; i < ACCEPT_BATCH; i++) {
                Client *c = NULL;
                int fd;

                fd = accept4(LISTEN_FD, NULL, NULL, ACCEPT_FLAGS);
                if (fd < 0)
                        switch (errno) {
                        case EAGAIN:
                                return 0;
                        case EMFILE:
                        case ENFILE:
                        case ENOBUFS:
                        case ENOMEM:
                                /* The connection waits in the backlog; retrying at once would spin. */
                                relay->accept_paused_until = now + ACCEPT_PAUSE_USEC;
                                log_warning_errno(errno, "Failed to accept a connection, pausing for a second: %m");
                                return 0;
                        case EINTR:
                        case ECONNABORTED:
                        case EPERM:
                        case EPROTO:
                        case ENOPROTOOPT:
                        case ENETDOWN:
                        case ENETUNREACH:
                        case ENONET:
                        case EHOSTDOWN:
                        case EHOSTUNREACH:
                        case EOPNOTSUPP:
                        case ETIMEDOUT:
                                continue; /* that connection's problem */
                        default:
                                return relay_fail(errno, "Failed to accept a connection: %m");
                        }

                for (size_t j = 0; j < CLIENTS_MAX; j++)
                        if (relay->clients[j].state == CLIENT_FREE) {
                                c = &relay->clients[j];
                                break;
                        }
                if (!c) {
                        close(fd);
                        relay->n_rejected++;
                        if (relay->rejected_logged == 0 || now - relay->rejected_logged >= REJECT_LOG_INTERVAL_USEC) {
                                log_warning("Too many clients (%u), closed a new connection (%" PRIu64 " so far).",
                                        CLIENTS_MAX, relay->n_rejected);
                                relay->rejected_logged = now;
                        }
                        continue;
                }

                *c = (Client) {
                        .state = CLIENT_WAITING,
                        .id = relay->next_id++,
                        .fd = fd,
                        .upstream_fd = -1,
                        .deadline = now + upstream_timeout_usec,
                        .connect_queued = true,
                };
                for (size_t j = 0; j < ELEMENTSOF(c->flows); j++)
                        flow_init(&c->flows[j]);
                relay->n_clients++;
                log_debug("Client %" PRIu64 " connected.", c->id);
        }
        return 0;
}

/* Strict decimal: digits only, no sign, no leading zero, no overflow. */
static int parse_id(const char *s, size_t len, uint64_t *ret) {
        uint64_t v = 0;

        if (len == 0 || (s[0] == '0' && len > 1))
                return -EINVAL;
        for (size_t i = 0; i < len; i++) {
                if (s[i] < '0' || s[i] > '9')
                        return -EINVAL;
                if (__builtin_mul_overflow(v, 10, &v) || __builtin_add_overflow(v, (uint64_t) (s[i] - '0'), &v))
                        return -ERANGE;
        }
        *ret = v;
        return 0;
}

/* Parses "<n>" or "<n> <text>" at s; *ret_text points at the text, or at "". */
static int parse_id_and_text(const char *s, uint64_t *ret, const char **ret_text) {
        size_t l = strcspn(s, " ");

        if (s[l] == ' ')
                *ret_text = s + l + 1;
        else
                *ret_text = s + l;
        return parse_id(s, l, ret);
}

static void close_fds(int *fds, size_t n) {
        for (size_t i = 0; i < n; i++)
                if (fds[i] >= 0) {
                        close(fds[i]);
                        fds[i] = -1;
                }
}

/* One message from the daemon; takes the fds. */
static int control_handle(Relay *relay, char *msg, size_t len, int *fds, size_t n_fds) {
        char safe[64];
        const char *text;
        uint64_t id;
        Client *c;
        int r;

        /* One line of printable ASCII ending in "\n". */
        if (len == 0 || msg[len - 1] != '\n')
                goto garbage;
        for (size_t i = 0; i + 1 < len; i++)
                if (msg[i] < 0x20 || msg[i] >= 0x7f)
                        goto garbage;
        msg[len - 1] = 0;

        if (streq(msg, "stop")) {
                if (n_fds != 0)
                        goto garbage;
                log_debug("Asked to stop.");
                return RELAY_EXIT;
        }

        if (strncmp(msg, "upstream ", 9) == 0) {
                if (n_fds != 1 || parse_id(msg + 9, len - 1 - 9, &id) < 0)
                        goto garbage;
                if (id >= relay->next_id)
                        goto garbage; /* never announced */
                c = client_find(relay, id);
                if (!c) {
                        /* It left (or timed out) while the daemon was connecting. */
                        log_debug("Upstream for client %" PRIu64 ", which is gone; dropping it.", id);
                        close_fds(fds, n_fds);
                        return 0;
                }
                if (c->state != CLIENT_WAITING || c->connect_queued)
                        goto garbage; /* a second upstream, or one nobody asked for yet */
                r = client_start_negotiating(c, fds[0], now_usec(CLOCK_MONOTONIC));
                fds[0] = -1;
                if (r < 0) {
                        log_warning_errno(r, "Client %" PRIu64 ": failed to set up relaying: %m", id);
                        client_close(relay, c, "setup failed");
                        return 0;
                }
                log_debug("Client %" PRIu64 ": upstream arrived, negotiating.", id);
                return 0;
        }

        if (strncmp(msg, "refused ", 8) == 0) {
                if (n_fds != 0 || parse_id_and_text(msg + 8, &id, &text) < 0)
                        goto garbage;
                if (id >= relay->next_id)
                        goto garbage;
                c = client_find(relay, id);
                if (c && c->state == CLIENT_RELAYING)
                        goto garbage; /* refused after it was given an upstream */
                log_info("Client %" PRIu64 " refused by the daemon: %s", id, isempty(text) ? "no reason given" : text);
                if (c)
                        client_close(relay, c, "refused");
                return 0;
        }

garbage:
        close_fds(fds, n_fds);
        log_error("Unexpected message from the daemon (%zu bytes, %zu fds): \"%s\"", len, n_fds,
                sanitize(safe, sizeof(safe), msg, MIN(len, sizeof(safe) - 1)));
        return relay_fail(EBADMSG, "Unexpected message from the daemon.");
}

static int control_receive(Relay *relay) {
        for (;;) {
                char buf[CONTROL_MSG_MAX];
                union {
                        struct cmsghdr h;
                        uint8_t buf[CMSG_SPACE(sizeof(int) * CONTROL_FDS_MAX)];
                } control;
                struct iovec iov = { .iov_base = buf, .iov_len = sizeof(buf) };
                struct msghdr mh = {
                        .msg_iov = &iov,
                        .msg_iovlen = 1,
                        .msg_control = &control,
                        .msg_controllen = sizeof(control),
                };
                int fds[CONTROL_FDS_MAX];
                size_t n_fds = 0;
                bool bad_cmsg = false;
                ssize_t n;
                int r;

                n = recvmsg(CONTROL_FD, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
                if (n < 0) {
                        if (errno == EAGAIN)
                                return 0;
                        if (errno == EINTR)
                                continue;
                        if (errno == ECONNRESET)
                                return RELAY_EXIT;
                        return relay_fail(errno, "Failed to receive from the daemon: %m");
                }

                for (struct cmsghdr *h = CMSG_FIRSTHDR(&mh); h; h = CMSG_NXTHDR(&mh, h)) {
                        if (h->cmsg_level == SOL_SOCKET && h->cmsg_type == SCM_RIGHTS) {
                                size_t m = (h->cmsg_len - CMSG_LEN(0)) / sizeof(int);
                                for (size_t i = 0; i < m; i++) {
                                        int fd;
                                        memcpy(&fd, CMSG_DATA(h) + i * sizeof(int), sizeof(int));
                                        if (n_fds < CONTROL_FDS_MAX)
                                                fds[n_fds++] = fd;
                                        else
                                                close(fd);
                                }
                        } else
                                bad_cmsg = true;
                }

                if (n == 0 && n_fds == 0 && !bad_cmsg) {
                        log_debug("The daemon went away.");
                        return RELAY_EXIT;
                }
                if (bad_cmsg || (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC))) {
                        close_fds(fds, n_fds);
                        return relay_fail(EBADMSG, "%s message from the daemon.",
                                bad_cmsg ? "Unexpected ancillary data in a" : "Oversized");
                }

                r = control_handle(relay, buf, (size_t) n, fds, n_fds);
                if (r != 0)
                        return r;
        }
}

/* Send what is queued for the daemon: "connect" requests oldest first, then the client count
 * (only its latest value: a count that went up and down between two sends is not repeated). */
static int control_flush(Relay *relay) {
        char line[CONTROL_MSG_MAX];
        int r;

        for (;;) {
                Client *next = NULL;

                for (size_t i = 0; i < CLIENTS_MAX; i++) {
                        Client *c = &relay->clients[i];
                        if (c->state != CLIENT_FREE && c->connect_queued && (!next || c->id < next->id))
                                next = c;
                }
                if (!next)
                        break;
                snprintf(line, sizeof(line), "connect %" PRIu64 "\n", next->id);
                r = control_send(line);
                if (r == -EAGAIN)
                        goto blocked;
                if (r < 0)
                        goto fail;
                next->connect_queued = false;
        }

        if (relay->n_clients != relay->n_clients_reported) {
                snprintf(line, sizeof(line), "clients %u\n", relay->n_clients);
                r = control_send(line);
                if (r == -EAGAIN)
                        goto blocked;
                if (r < 0)
                        goto fail;
                relay->n_clients_reported = relay->n_clients;
        }
        relay->control_blocked = false;
        return 0;

blocked:
        relay->control_blocked = true;
        return 0;
fail:
        if (r == -EPIPE || r == -ECONNRESET)
                return RELAY_EXIT; /* the daemon went away */
        return relay_fail(r, "Failed to send to the daemon: %m");
}

static void relay_expire(Relay *relay, usec_t now) {
        for (size_t i = 0; i < CLIENTS_MAX; i++) {
                Client *c = &relay->clients[i];
                if (c->state == CLIENT_WAITING && now >= c->deadline) {
                        log_info("Client %" PRIu64 ": no upstream within %" PRIu64 " s.", c->id,
                                upstream_timeout_usec / USEC_PER_SEC);
                        client_close(relay, c, "timed out");
                } else if (c->state == CLIENT_NEGOTIATING && now >= c->deadline) {
                        log_info("Client %" PRIu64 ": no export chosen within %" PRIu64 " s.", c->id,
                                negotiation_timeout_usec / USEC_PER_SEC);
                        client_close(relay, c, "handshake timed out");
                }
        }
}

/* Fill in the poll set; returns the timeout in ms. */
static int relay_prepare(Relay *relay, usec_t now) {
        usec_t next = USEC_INFINITY;

        relay->pollfds[0] = (struct pollfd) { .fd = now >= relay->accept_paused_until ? LISTEN_FD : -1, .events = POLLIN };
        if (now < relay->accept_paused_until)
                next = relay->accept_paused_until;
        relay->pollfds[1] = (struct pollfd) { .fd = CONTROL_FD, .events = POLLIN | (relay->control_blocked ? POLLOUT : 0) };

        for (size_t i = 0; i < CLIENTS_MAX; i++) {
                Client *c = &relay->clients[i];
                struct pollfd *p = &relay->pollfds[2 + 2 * i];

                p[0] = p[1] = (struct pollfd) { .fd = -1 };
                if (c->state == CLIENT_WAITING) {
                        /* No POLLIN: what it sends waits in its socket until the upstream is there. */
                        p[0] = (struct pollfd) { .fd = c->fd, .events = POLLRDHUP };
                        next = MIN(next, c->deadline);
                } else if (c->state == CLIENT_NEGOTIATING) {
                        /* Lock-step: one fd, one direction at a time. */
                        const Negotiation *n = &c->neg;
                        bool up = neg_waits_upstream(n);

                        p[up] = (struct pollfd) { .fd = up ? c->upstream_fd : c->fd,
                                .events = n->state == NEG_WRITE ? POLLOUT : POLLIN };
                        /* A client that leaves while the server is slow must free its slot now. */
                        if (up)
                                p[0] = (struct pollfd) { .fd = c->fd, .events = POLLRDHUP };
                        next = MIN(next, c->deadline);
                } else if (c->state == CLIENT_RELAYING) {
                        short ev[2];

                        ev[0] = (flow_wants_fill(&c->flows[0]) ? POLLIN : 0) |
                                (c->flows[1].pending > 0 ? POLLOUT : 0);
                        ev[1] = (flow_wants_fill(&c->flows[1]) ? POLLIN : 0) |
                                (c->flows[0].pending > 0 ? POLLOUT : 0);
                        /* An fd with nothing wanted is left out, so that a hangup we cannot act
                         * on yet does not wake us in a loop; its error surfaces at the next use. */
                        if (ev[0])
                                p[0] = (struct pollfd) { .fd = c->fd, .events = ev[0] };
                        if (ev[1])
                                p[1] = (struct pollfd) { .fd = c->upstream_fd, .events = ev[1] };
                }
        }

        if (next == USEC_INFINITY)
                return -1;
        if (next <= now)
                return 0;
        return (int) MIN((next - now + USEC_PER_MSEC - 1) / USEC_PER_MSEC, (usec_t) INT_MAX);
}

static int relay_run(Relay *relay) {
        int r;

        for (;;) {
                usec_t now = now_usec(CLOCK_MONOTONIC);
                int timeout = relay_prepare(relay, now);

                if (poll(relay->pollfds, ELEMENTSOF(relay->pollfds), timeout) < 0) {
                        if (errno == EINTR)
                                continue;
                        return relay_fail(errno, "poll() failed: %m");
                }
                now = now_usec(CLOCK_MONOTONIC);

                /* Clients first: the daemon's messages and new connections change the table the
                 * poll results refer to. */
                for (size_t i = 0; i < CLIENTS_MAX; i++)
                        client_process(relay, &relay->clients[i], relay->pollfds[2 + 2 * i].revents,
                                relay->pollfds[3 + 2 * i].revents);

                if (relay->pollfds[1].revents) {
                        r = control_receive(relay);
                        if (r != 0)
                                return r;
                }
                /* A listening socket hangs up only when shut down: nothing will come any more. */
                if (relay->pollfds[0].revents & (POLLERR | POLLHUP | POLLNVAL))
                        return relay_fail(EIO, "The listening socket failed or was shut down.");
                if (relay->pollfds[0].revents & POLLIN) {
                        r = relay_accept(relay, now);
                        if (r < 0)
                                return r;
                }
                relay_expire(relay, now);

                r = control_flush(relay);
                if (r != 0)
                        return r;
        }
}

static void relay_close_all(Relay *relay) {
        for (size_t i = 0; i < CLIENTS_MAX; i++)
                client_close(relay, &relay->clients[i], "shutting down");
}

static int check_socket(int fd, int want_type, bool want_listening, int *ret_domain) {
        int type, domain, listening = 0;
        socklen_t l;

        l = sizeof(type);
        if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &l) < 0)
                return -errno;
        l = sizeof(domain);
        if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &l) < 0)
                return -errno;
        if (want_listening) {
                l = sizeof(listening);
                if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &l) < 0)
                        return -errno;
        }
        if (type != want_type || (want_listening && !listening))
                return -EINVAL;
        *ret_domain = domain;
        return 0;
}

typedef struct SyscallRule {
        const char *name;
        unsigned n_args;
        struct scmp_arg_cmp args[3];
} SyscallRule;

static int allow_syscall(scmp_filter_ctx ctx, const SyscallRule *rule) {
        int nr, r;

        nr = seccomp_syscall_resolve_name(rule->name);
        if (nr == __NR_SCMP_ERROR)
                return 0; /* not on this architecture */
        r = seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, nr, rule->n_args, rule->args);
        if (r == -EDOM)
                return 0; /* a pseudo-syscall this architecture does not have */
        return r;
}

/* Everything the loop needs and nothing else. No open, no socket, no connect, no exec: even
 * with the loop compromised, this process can only move bytes between fds it already has. */
static int install_allowlist(void) {
        const SyscallRule rules[] = {
                /* the loop; ppoll where the architecture has no poll */
                { "poll" },
                { "ppoll" },
                /* new clients: on the listening socket only, always non-blocking, close-on-exec */
                { "accept4", 2, { SCMP_A0(SCMP_CMP_EQ, LISTEN_FD), SCMP_A3(SCMP_CMP_EQ, ACCEPT_FLAGS) } },
                /* the daemon's messages and fds, and ours to it: on the control socket only, so
                 * that no fd can be passed on to anybody else */
                { "recvmsg", 1, { SCMP_A0(SCMP_CMP_EQ, CONTROL_FD) } },
                { "sendmsg", 1, { SCMP_A0(SCMP_CMP_EQ, CONTROL_FD) } },
                /* the handshake: plain reads and writes on the sockets, never blocking, no address */
                { "recvfrom", 3,
                        { SCMP_A3(SCMP_CMP_EQ, MSG_DONTWAIT), SCMP_A4(SCMP_CMP_EQ, 0), SCMP_A5(SCMP_CMP_EQ, 0) } },
                { "sendto", 3,
                        { SCMP_A3(SCMP_CMP_EQ, MSG_DONTWAIT | MSG_NOSIGNAL), SCMP_A4(SCMP_CMP_EQ, 0),
                                SCMP_A5(SCMP_CMP_EQ, 0) } },
                /* the relaying itself: no file offsets, never blocking */
                { "splice", 3,
                        { SCMP_A1(SCMP_CMP_EQ, 0), SCMP_A3(SCMP_CMP_EQ, 0), SCMP_A5(SCMP_CMP_EQ, SPLICE_FLAGS) } },
                /* the two pipes of a new pair */
                { "pipe2", 1, { SCMP_A1(SCMP_CMP_EQ, PIPE_FLAGS) } },
                /* O_NONBLOCK on a received upstream socket */
                { "fcntl", 1, { SCMP_A1(SCMP_CMP_EQ, F_GETFL) } },
                { "fcntl", 1, { SCMP_A1(SCMP_CMP_EQ, F_SETFL) } },
                { "fcntl64", 1, { SCMP_A1(SCMP_CMP_EQ, F_GETFL) } },
                { "fcntl64", 1, { SCMP_A1(SCMP_CMP_EQ, F_SETFL) } },
                /* passing on a half-close */
                { "shutdown", 1, { SCMP_A1(SCMP_CMP_EQ, SHUT_WR) } },
                /* ending a pair */
                { "close" },
                /* log lines */
                { "write", 1, { SCMP_A0(SCMP_CMP_EQ, STDERR_FILENO) } },
                /* deadlines: normally the vDSO, a syscall where there is none */
                { "clock_gettime" },
                { "clock_gettime64" },
                /* leaving, and signal and syscall-restart plumbing */
                { "exit" },
                { "exit_group" },
                { "rt_sigreturn" },
                { "restart_syscall" },
        };
        uint32_t deny = SCMP_ACT_KILL_PROCESS;
        scmp_filter_ctx ctx;
        int r;

#ifdef RELAY_SELFTEST
        /* valgrind knows prctl(PR_SET_SECCOMP) but not seccomp(2), without which libseccomp
         * cannot tell that KILL_PROCESS exists. One thread: killing it kills the process. */
        if (selftest_has("valgrind"))
                deny = SCMP_ACT_KILL_THREAD;
#endif
        ctx = seccomp_init(deny);
        if (!ctx)
                return -ENOMEM;

        for (size_t i = 0; i < ELEMENTSOF(rules); i++) {
                r = allow_syscall(ctx, &rules[i]);
                if (r < 0)
                        goto finish;
        }

#ifdef RELAY_SELFTEST
        if (selftest_has("valgrind")) {
                /* valgrind runs its machinery in our process: signal masks and its scheduler's
                 * pipe lock around each syscall, polling for signals, memory for translations. */
                static const char *const vg[] = {
                        "rt_sigprocmask", "rt_sigtimedwait", "gettid", "getpid", "read", "write", "futex", "mmap",
                        "munmap", "mprotect", "brk",
                };
                for (size_t i = 0; i < ELEMENTSOF(vg); i++) {
                        r = allow_syscall(ctx, &(SyscallRule) { vg[i] });
                        if (r < 0 && r != -EEXIST)
                                goto finish;
                }
        }
#endif

        r = seccomp_load(ctx);
finish:
        seccomp_release(ctx);
        return r;
}

/* Returns 0 to run, RELAY_EXIT if the daemon is already gone, -errno on failure. */
static int relay_setup(void) {
        int domain, r;

        /* Nothing but our two sockets and stdio. */
        if (close_range(CONTROL_FD + 1, ~0U, 0) < 0)
                return log_error_errno(errno, "Failed to close stray file descriptors: %m");

        /* Without the daemon there is nobody to tell: only the log. */
        r = check_socket(CONTROL_FD, SOCK_SEQPACKET, false, &domain);
        if (r < 0 || domain != AF_UNIX)
                return log_error_errno(r < 0 ? r : -EINVAL, "fd %d is not an AF_UNIX SOCK_SEQPACKET socket.",
                        CONTROL_FD);

        r = check_socket(LISTEN_FD, SOCK_STREAM, true, &domain);
        if (r < 0 || !(domain == AF_UNIX || domain == AF_INET || domain == AF_INET6))
                return relay_fail(r < 0 ? r : EAFNOSUPPORT,
                        "fd %d is not a listening AF_UNIX, AF_INET or AF_INET6 stream socket.", LISTEN_FD);
        r = fcntl(LISTEN_FD, F_GETFL);
        if (r < 0 || fcntl(LISTEN_FD, F_SETFL, r | O_NONBLOCK) < 0)
                return relay_fail(errno, "Failed to make the listening socket non-blocking: %m");

        /* A peer that goes away mid-splice must cost an EPIPE, not our life. */
        if (signal(SIGPIPE, SIG_IGN) == SIG_ERR)
                return relay_fail(errno, "Failed to ignore SIGPIPE: %m");

#ifdef HAVE_LSAN
        /* LeakSanitizer's check at exit needs threads, ptrace and /proc, which the filter
         * forbids. Setup is the last thing that allocates: check now, and not again. */
        __lsan_do_leak_check();
#endif
        if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
                return relay_fail(errno, "Failed to set no_new_privs: %m");
        r = install_allowlist();
        if (r < 0)
                return relay_fail(r, "Failed to install the seccomp filter: %m");

        r = control_send("ready\n");
        if (r == -EPIPE || r == -ECONNRESET) {
                log_debug("The daemon went away.");
                return RELAY_EXIT;
        }
        if (r < 0)
                return log_error_errno(r, "Failed to tell the daemon we are ready: %m");

#ifdef RELAY_SELFTEST
        if (selftest_has("open"))
                (void) openat(AT_FDCWD, "/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (selftest_has("socket"))
                (void) socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (selftest_has("sendmsg")) /* allowed on fd 4 only */
                (void) sendmsg(LISTEN_FD, &(struct msghdr) {}, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (selftest_has("write")) /* allowed on fd 2 only */
                (void) write(STDOUT_FILENO, "", 0);
#endif
        return 0;
}

/* The pinned name comes from the daemon; still, only what fits and prints. */
static int parse_export_name(const char *name) {
        size_t l = strlen(name);

        if (l == 0 || l > EXPORT_NAME_MAX)
                return -EINVAL;
        for (size_t i = 0; i < l; i++)
                if (name[i] <= 0x20 || name[i] >= 0x7f)
                        return -EINVAL;
        memcpy(export_name, name, l + 1);
        export_name_len = l;
        return 0;
}

static void help(void) {
        printf("%s\n\n"
               "Relays the clients of a listening socket (fd 3) to upstream NBD connections handed\n"
               "over by blockstreamd on a control socket (fd 4), for one export only. Started by\n"
               "blockstreamd only.\n\n"
               "     --export=NAME  The only export its clients may list, open and read\n"
               "  -h --help     Show this help\n"
               "     --version  Show the version\n",
                program_invocation_short_name);
}

int main(int argc, char *argv[]) {
        /* On the heap, allocated before the filter: a global this large would make
         * AddressSanitizer's destructors mmap() its shadow at exit, which the filter kills. */
        static Relay *relay;
        int r;

        log_setup("blockstream-nbd-relay");
        if (argc == 2 && (streq(argv[1], "--help") || streq(argv[1], "-h"))) {
                help();
                return EXIT_SUCCESS;
        }
        if (argc == 2 && streq(argv[1], "--version")) {
                printf("blockstream-nbd-relay %s\n", VERSION);
                return EXIT_SUCCESS;
        }
        if (argc != 2 || strncmp(argv[1], "--export=", 9) != 0) {
                log_error("This program takes one argument, --export=NAME (see --help).");
                return EXIT_FAILURE;
        }
        r = parse_export_name(argv[1] + 9);
        if (r < 0) {
                log_error_errno(r, "Invalid export name: 1-%u printable ASCII characters, no space.", EXPORT_NAME_MAX);
                return EXIT_FAILURE;
        }

#ifdef RELAY_SELFTEST
        if (selftest_has("timeout"))
                upstream_timeout_usec = negotiation_timeout_usec = 1 * USEC_PER_SEC;
#endif

        relay = calloc(1, sizeof(Relay));
        if (!relay) {
                log_error("Out of memory.");
                return EXIT_FAILURE;
        }
        relay->next_id = 1;
        for (size_t i = 0; i < CLIENTS_MAX; i++) {
                relay->clients[i].fd = relay->clients[i].upstream_fd = -1;
                for (size_t j = 0; j < ELEMENTSOF(relay->clients[i].flows); j++)
                        flow_init(&relay->clients[i].flows[j]);
        }

        r = relay_setup();
        if (r < 0)
                return EXIT_FAILURE;
        if (r == 0)
                r = relay_run(relay);
        relay_close_all(relay);
        /* Not freed: free() could give memory back to the kernel, which the filter forbids. */
        return r < 0 ? EXIT_FAILURE : EXIT_SUCCESS;
}
