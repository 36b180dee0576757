/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* The NBD handshake (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md), as the
 * relay proxies it option by option (nbd-handshake.h). */

#include <assert.h>
#include <errno.h>
#include <sys/socket.h>

#include "nbd-handshake.h"
#include "nbd-wire.h"
#include "util.h"

#define NEG_STEP_ROUNDS 64 /* steps (a read or a write) in one turn */

static char export_name[EXPORT_NAME_MAX + 1];
static size_t export_name_len;

/* The pinned name comes from the daemon; still, only what fits and prints. */
int neg_pin_export(const char *name) {
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

static void neg_expect(Negotiation *n, NegState state, size_t want) {
        n->state = state;
        n->in_len = 0;
        n->in_want = want;
}

void neg_start(Negotiation *n) {
        neg_expect(n, NEG_GREETING, NBD_GREETING_SIZE);
}

/* An export's transmission flags, read-only whatever the server says: QEMU refuses writes to
 * our exports anyway, and a client told so does not try. */
static uint16_t read_only_flags(const uint8_t *p) {
        /* Nor a flush: it would write back the guest's own disk (QEMU offers it on read-only
         * exports too); nor a cache request: QEMU serves it with its copy-on-read, a write of the
         * backing chain's data into the guest's top image, read-only export or not. The relay
         * refuses both (nbd-transmission.c). */
        return (uint16_t) ((((p[0] << 8) | p[1]) | NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY) &
                ~(NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_CACHE));
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
static int neg_handle_option(Negotiation *n, uint64_t id) {
        const uint8_t *d = n->in + NBD_OPT_HEADER_SIZE;
        size_t len = n->in_len - NBD_OPT_HEADER_SIZE;
        uint32_t option = n->option;
        ssize_t rest;

        n->out_len = 0;
        switch (option) {

        case NBD_OPT_EXPORT_NAME:
                if (!name_is_pinned(d, len)) {
                        /* No way to say no but to hang up. */
                        log_debug("Client %" PRIu64 ": EXPORT_NAME of another export.", id);
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
                        log_debug("Client %" PRIu64 ": option %" PRIu32 " for another export.", id, option);
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
static int neg_handle_reply(Negotiation *n) {
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

int neg_input_done(Negotiation *n, uint64_t id) {
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
                n->no_zeroes = get_be32(n->in) & NBD_FLAG_C_NO_ZEROES;
                n->out_len = 0;
                neg_put(n, n->in, n->in_len);
                neg_write(n, true, NEG_OPT_HEADER);
                return 0;

        case NEG_OPT_HEADER:
                if (get_be64(n->in) != NBD_OPTS_MAGIC) {
                        log_debug("Client %" PRIu64 ": not an option.", id);
                        return -EBADMSG;
                }
                n->option = get_be32(n->in + 8);
                len = get_be32(n->in + 12);
                if (++n->options > NEG_OPTIONS_MAX) {
                        log_debug("Client %" PRIu64 ": more than %d options.", id, NEG_OPTIONS_MAX);
                        return -EPROTO;
                }
                if (len > NBD_OPT_DATA_MAX) {
                        log_debug("Client %" PRIu64 ": option %" PRIu32 " of %" PRIu32 " bytes.", id, n->option,
                                len);
                        n->out_len = 0;
                        neg_put_error(n, n->option, NBD_REP_ERR_TOO_BIG, "Option too long.");
                        neg_write(n, false, NEG_CLOSE);
                        return 0;
                }
                n->state = NEG_OPT_DATA;
                n->in_want = NBD_OPT_HEADER_SIZE + len;
                return n->in_len == n->in_want ? neg_handle_option(n, id) : 0;

        case NEG_OPT_DATA:
                return neg_handle_option(n, id);

        case NEG_REP_HEADER:
                len = get_be32(n->in + 16);
                if (get_be64(n->in) != NBD_REP_MAGIC || get_be32(n->in + 8) != n->option || len > NBD_REP_DATA_MAX) {
                        log_warning("Client %" PRIu64 ": the server sent a malformed reply, closing.", id);
                        return -EBADMSG;
                }
                n->state = NEG_REP_DATA;
                n->in_want = NBD_REP_HEADER_SIZE + len;
                return n->in_len == n->in_want ? neg_input_done(n, id) : 0;

        case NEG_REP_DATA:
                if (neg_handle_reply(n) < 0) {
                        log_warning("Client %" PRIu64 ": the server sent an unexpected reply, closing.", id);
                        return -EBADMSG;
                }
                return 0;

        case NEG_EXPORT_REPLY:
                /* size, flags (read-only whatever the server says), and the zeroes if asked for */
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

bool neg_waits_upstream(const Negotiation *n) {
        return n->state == NEG_WRITE ? n->to_upstream : neg_reads_upstream(n);
}

int neg_step(Negotiation *n, uint64_t id, int client_fd, int upstream_fd) {
        ssize_t k;
        int r;

        /* A bounded turn: a client that keeps the sockets busy (options sent as fast as the relay
         * answers them) must not hold up the relay's other clients, its deadlines and its daemon;
         * poll() is level-triggered, so the rest is done on the next turn. */
        for (unsigned round = 0; round < NEG_STEP_ROUNDS; round++) {
                switch (n->state) {

                case NEG_DONE:
                        return 1;

                case NEG_CLOSE:
                        return -ECONNRESET;

                case NEG_WRITE:
                        if (n->out_done < n->out_len) {
                                k = send(n->to_upstream ? upstream_fd : client_fd, n->out + n->out_done,
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
                                neg_expect(n, NEG_EXPORT_REPLY,
                                        NBD_EXPORT_REPLY_SIZE + (n->no_zeroes ? 0 : NBD_EXPORT_REPLY_ZEROES));
                                break;
                        default:
                                n->state = n->after_write;
                        }
                        continue;

                default:
                        /* Exactly what this step needs, never more: what follows stays in the
                         * socket for the next step, or for the splicing. */
                        if (n->in_len < n->in_want) {
                                k = recv(neg_reads_upstream(n) ? upstream_fd : client_fd, n->in + n->in_len,
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
                        r = neg_input_done(n, id);
                        if (r < 0)
                                return r;
                }
        }
        return 0;
}
