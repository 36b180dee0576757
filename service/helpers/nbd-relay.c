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
 * After the final reply of GO, or EXPORT_NAME's, the transmission phase starts: requests are
 * checked and let in within a budget of reads in flight, replies followed so that the budget
 * comes back as each ends, payloads spliced (nbd-transmission.c). The handshake is lock-step: one
 * option at a time, exactly the bytes it has, so that nothing is left in our buffers when the
 * transmission starts. The handshake is nbd-handshake.c; the control protocol, shared with the
 * daemon and blockstream-pull, is control.c.
 *
 * With --budget, what the requests in flight of all its clients together may cost QEMU is bounded
 * as well as each one's (a template cache's relay: hundreds of clients of one QEMU). A client that
 * holds part of that budget and reads its replies slower than STALL_BYTES in STALL_USEC, while
 * another's request waits for room in it, is closed: it could otherwise keep the budget from
 * everyone.
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

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>

#include "control.h"
#include "helper-common.h"
#include "nbd-handshake.h"
#include "nbd-transmission.h"
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
#define CLIENTS_DEFAULT RELAY_CLIENTS_MAX /* control.h: an export's relay */
#define CLIENTS_MAX 1024U                  /* --clients at most: four fds each */
/* A client that holds part of the shared budget and, owing replies all along, reads less than
 * STALL_BYTES of them in STALL_USEC (3.2 MiB/s: a reader that trickles holds the budget as surely
 * as one that stops; one slower than that held a read of 32 MiB for 10 s and more), while another
 * waits for the budget, is closed: the one stuck longest first, one at a time while any still
 * waits. A client that has read all it was owed is not stuck, whatever its pace; QEMU's NBD
 * client reads a reply as it comes. */
#define STALL_USEC (5 * USEC_PER_SEC)
#define STALL_BYTES (UINT64_C(16) << 20)
/* A client gone with requests in flight: their replies are drained this long at most. */
#define DRAIN_TIMEOUT_USEC (30 * USEC_PER_SEC)
#define UPSTREAM_TIMEOUT_USEC (10 * USEC_PER_SEC)
/* From the upstream's arrival to the transmission phase. */
#define NEGOTIATION_TIMEOUT_USEC (30 * USEC_PER_SEC)
#define ACCEPT_BATCH 16
#define ACCEPT_PAUSE_USEC (1 * USEC_PER_SEC)
#define REJECT_LOG_INTERVAL_USEC (1 * USEC_PER_SEC)
#define ACCEPT_FLAGS (SOCK_NONBLOCK | SOCK_CLOEXEC)

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

typedef struct Client {
        ClientState state;
        uint64_t id;
        int fd;
        int upstream_fd;
        usec_t deadline;     /* CLIENT_WAITING, CLIENT_NEGOTIATING: close it if not further by then */
        bool connect_queued; /* "connect <id>" not sent yet */
        Negotiation neg;
        Transmission tx; /* CLIENT_RELAYING */
        /* CLIENT_RELAYING: since when replies wait for it that it reads less than STALL_BYTES of
         * (0: none), and how much it had read by then */
        usec_t stuck_since;
        uint64_t stuck_total;
        uint32_t peer_uid; /* SO_PEERCRED's, for turns by user; UINT32_MAX: none (TCP) */
} Client;

typedef struct Relay {
        Client *clients;
        unsigned n_slots; /* --clients */
        unsigned n_clients;
        TxShared shared; /* --budget; max 0: none */
        uint32_t last_uid; /* whose request went in on the last turn */
        bool admit_again;  /* a look stopped at ADMIT_TURNS_MAX with room and requests waiting */
        unsigned n_clients_reported;
        uint64_t next_id;
        bool control_blocked; /* the daemon's queue was full: wait for POLLOUT */
        usec_t accept_paused_until;
        uint64_t n_rejected;
        usec_t rejected_logged;
        /* [0] the listening socket, [1] the daemon, then two per client slot */
        struct pollfd *pollfds;
} Relay;

static usec_t upstream_timeout_usec = UPSTREAM_TIMEOUT_USEC;
static usec_t negotiation_timeout_usec = NEGOTIATION_TIMEOUT_USEC;

#ifdef RELAY_SELFTEST
/* Test builds only: BLOCKSTREAM_RELAY_SELFTEST=word,… with the words of helper-common.h, and
 *   sendmsg, write     the same on an fd the filter does not allow it on
 *   sendmsg-control    sendmsg on the daemon's socket, which no longer needs it (nothing can
 *                      pass an fd from here to anybody)
 *   timeout            wait 1 s instead of 10 s for an upstream, and 1 s instead of 30 s for a
 *                      handshake */
#define SELFTEST_ENV "BLOCKSTREAM_RELAY_SELFTEST"
#else
#define SELFTEST_ENV NULL
#endif
#define selftest_has(word) helper_selftest_has(SELFTEST_ENV, word)

static int control_send_message(const ControlRelayMessage *m) {
        return control_send_relay(CONTROL_FD, MSG_DONTWAIT | MSG_NOSIGNAL, m);
}

/* Its slot is free again, whatever it was doing. */
static void client_free(Relay *relay, Client *c, const char *why) {
        if (c->state == CLIENT_FREE)
                return;
        log_debug("Client %" PRIu64 ": %s, closing.", c->id, why);
        if (c->fd >= 0)
                close(c->fd);
        if (c->upstream_fd >= 0)
                close(c->upstream_fd);
        if (c->state == CLIENT_RELAYING)
                tx_close(&c->tx);
        *c = (Client) { .state = CLIENT_FREE, .fd = -1, .upstream_fd = -1 };
        relay->n_clients--;
}

/* The client goes. Reads it had sent on are drained first (tx_client_gone()): the server holds
 * their buffers until it has read the data, so they stay in the budget, and the slot taken, until
 * their replies are read and dropped (or DRAIN_TIMEOUT_USEC passes). */
static void client_close(Relay *relay, Client *c, const char *why) {
        if (c->state != CLIENT_RELAYING || c->tx.client_gone || !tx_client_gone(&c->tx)) {
                client_free(relay, c, why);
                return;
        }
        log_debug("Client %" PRIu64 ": %s, draining its %u requests in flight.", c->id, why, c->tx.n_in_flight);
        close(c->fd);
        c->fd = -1;
        c->deadline = now_usec(CLOCK_MONOTONIC) + DRAIN_TIMEOUT_USEC;
        c->stuck_since = 0;
}

static Client *client_find(Relay *relay, uint64_t id) {
        for (size_t i = 0; i < relay->n_slots; i++)
                if (relay->clients[i].state != CLIENT_FREE && relay->clients[i].id == id)
                        return &relay->clients[i];
        return NULL;
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
        neg_start(&c->neg);
        return 0;
}

static int client_start_relaying(Relay *relay, Client *c) {
        /* Relaying from here on, set up or not: client_close() undoes what tx_open() did. */
        c->state = CLIENT_RELAYING;
        return tx_open(&c->tx, relay->shared.max > 0 ? &relay->shared : NULL);
}

static void client_relay(Relay *relay, Client *c) {
        int r;

        /* Trouble on an fd is handled by trying what we wanted of it: the read or write says
         * what happened (EOF, EPIPE, ECONNRESET …). */
        r = tx_step(&c->tx, c->id, c->fd, c->upstream_fd);
        if (r < 0) {
                log_debug_errno(r, "Client %" PRIu64 ": relaying failed: %m", c->id);
                client_close(relay, c, "relaying ended");
        } else if (r > 0)
                client_close(relay, c, "both directions done");
}


static void client_process(Relay *relay, Client *c, short revents, short upstream_revents) {
        const short trouble = POLLHUP | POLLERR | POLLNVAL;
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
                r = neg_step(&c->neg, c->id, c->fd, c->upstream_fd);
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
                r = client_start_relaying(relay, c);
                if (r < 0) {
                        log_warning_errno(r, "Client %" PRIu64 ": failed to set up relaying: %m", c->id);
                        client_close(relay, c, "setup failed");
                        return;
                }
                log_debug("Client %" PRIu64 ": handshake done, relaying.", c->id);
                return;
        }
        if (c->state == CLIENT_RELAYING && (revents | upstream_revents) != 0)
                client_relay(relay, c);
}

/* Requests that waited for the shared budget: room may have come, from any client's reply. Turns
 * (one request each) go by user, in rotation: the next uid after the last served, and of its
 * clients the one waiting longest. So a user's many connections get no more turns than another
 * user's one, and a client that got a turn waits behind that user's others. One whose request
 * does not fit yet ends the look and is the next turn again: nobody passes it, so the room it
 * needs (a read of 32 MiB among many small ones) comes. A look cut short at ADMIT_TURNS_MAX turns
 * taken goes on at the loop's next turn, at once: the replies of those it let in may not come
 * (their clients need not read them). */
#define ADMIT_TURNS_MAX 64U

static Client *next_turn(Relay *relay) {
        Client *best = NULL;
        uint32_t best_key = 0;

        for (size_t i = 0; i < relay->n_slots; i++) {
                Client *c = &relay->clients[i];
                uint32_t key = c->peer_uid - relay->last_uid - 1; /* the next uid after it first */

                if (c->state != CLIENT_RELAYING || !c->tx.shared_wait)
                        continue;
                if (!best || key < best_key || (key == best_key && c->tx.wait_seq < best->tx.wait_seq)) {
                        best = c;
                        best_key = key;
                }
        }
        return best;
}

static void relay_admit_waiting(Relay *relay) {
        TxShared *s = &relay->shared;
        unsigned taken = 0;

        relay->admit_again = false;
        /* A turn whose client is closed in it (a refused request behind its read) puts nothing in
         * flight, and is not counted: each counted one is a reply that will wake the loop. Closed
         * ones are bounded by the slots. */
        for (unsigned k = 0; taken < ADMIT_TURNS_MAX && k <= relay->n_slots + ADMIT_TURNS_MAX && s->n_waiting > 0 &&
             s->used < s->max;
             k++) {
                Client *c = next_turn(relay);
                uint64_t before;
                uint32_t uid;

                if (!c)
                        break;
                before = c->tx.admitted_total;
                uid = c->peer_uid;
                c->tx.turn = true;
                client_relay(relay, c);
                if (c->state == CLIENT_RELAYING) {
                        c->tx.turn = false;
                        if (c->tx.admitted_total == before && c->tx.shared_wait)
                                return; /* it does not fit yet: the next turn is its own again */
                        taken += c->tx.admitted_total != before;
                }
                relay->last_uid = uid;
        }
        relay->admit_again = taken >= ADMIT_TURNS_MAX && s->n_waiting > 0 && s->used < s->max;
}

/* The uid of the process that connected (AF_UNIX), else UINT32_MAX: one user for turns. */
static uint32_t peer_uid(int fd) {
        struct ucred cred;
        socklen_t l = sizeof(cred);

        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &l) < 0 || l != sizeof(cred))
                return UINT32_MAX;
        return (uint32_t) cred.uid;
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
                                return helper_fail(errno, "Failed to accept a connection: %m");
                        }

                for (size_t j = 0; j < relay->n_slots; j++)
                        if (relay->clients[j].state == CLIENT_FREE) {
                                c = &relay->clients[j];
                                break;
                        }
                if (!c) {
                        close(fd);
                        relay->n_rejected++;
                        if (relay->rejected_logged == 0 || now - relay->rejected_logged >= REJECT_LOG_INTERVAL_USEC) {
                                log_warning("Too many clients (%u), closed a new connection (%" PRIu64 " so far).",
                                        relay->n_slots, relay->n_rejected);
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
                        .peer_uid = peer_uid(fd),
                };
                relay->n_clients++;
                log_debug("Client %" PRIu64 " connected.", c->id);
        }
        return 0;
}

/* One message from the daemon (control.c has the form, this the sense); takes the fds. */
static int control_handle(Relay *relay, ControlDatagram *d) {
        char safe[64];
        ControlCommand cmd;
        Client *c;
        int r;

        /* Its log line: the datagram as it came, before the parser cuts its newline. */
        helper_sanitize(safe, sizeof(safe), d->buf, MIN(d->len, sizeof(safe) - 1));
        if (control_parse_command(d->buf, d->len, &cmd) < 0 || d->n_fds != control_command_n_fds(cmd.kind))
                goto garbage;

        switch (cmd.kind) {

        case CONTROL_COMMAND_STOP:
                log_debug("Asked to stop.");
                return RELAY_EXIT;

        case CONTROL_COMMAND_UPSTREAM:
                if (cmd.number >= relay->next_id)
                        goto garbage; /* never announced */
                c = client_find(relay, cmd.number);
                if (!c) {
                        /* It left (or timed out) while the daemon was connecting. */
                        log_debug("Upstream for client %" PRIu64 ", which is gone; dropping it.", cmd.number);
                        control_datagram_close_fds(d);
                        return 0;
                }
                if (c->state != CLIENT_WAITING || c->connect_queued)
                        goto garbage; /* a second upstream, or one nobody asked for yet */
                r = client_start_negotiating(c, d->fds[0], now_usec(CLOCK_MONOTONIC));
                d->fds[0] = -1;
                if (r < 0) {
                        log_warning_errno(r, "Client %" PRIu64 ": failed to set up relaying: %m", cmd.number);
                        client_close(relay, c, "setup failed");
                        return 0;
                }
                log_debug("Client %" PRIu64 ": upstream arrived, negotiating.", cmd.number);
                return 0;

        case CONTROL_COMMAND_REFUSED:
                if (cmd.number >= relay->next_id)
                        goto garbage;
                c = client_find(relay, cmd.number);
                if (c && c->state == CLIENT_RELAYING)
                        goto garbage; /* refused after it was given an upstream */
                log_info("Client %" PRIu64 " refused by the daemon: %s", cmd.number,
                        isempty(cmd.text) ? "no reason given" : cmd.text);
                if (c)
                        client_close(relay, c, "refused");
                return 0;

        default:
                /* pause, resume, bandwidth: blockstream-pull's; or unknown */
                break;
        }

garbage:
        control_datagram_close_fds(d);
        log_error("Unexpected message from the daemon (%zu bytes, %zu fds): \"%s\"", d->len, d->n_fds, safe);
        return helper_fail(EBADMSG, "Unexpected message from the daemon.");
}

static int control_receive(Relay *relay) {
        for (;;) {
                ControlDatagram d;
                int r;

                r = control_receive_datagram(CONTROL_FD, &d);
                if (r == 0)
                        return 0;
                if (r == -ECONNRESET) {
                        log_debug("The daemon went away.");
                        return RELAY_EXIT;
                }
                if (r == -EBADMSG || r == -EMSGSIZE)
                        return helper_fail(EBADMSG, "%s message from the daemon.",
                                r == -EBADMSG ? "Unexpected ancillary data in a" : "Oversized");
                if (r < 0)
                        return helper_fail(r, "Failed to receive from the daemon: %m");

                r = control_handle(relay, &d);
                if (r != 0)
                        return r;
        }
}

/* Send what is queued for the daemon: "connect" requests oldest first, then the client count
 * (only its latest value: a count that went up and down between two sends is not repeated). */
static int control_flush(Relay *relay) {
        int r;

        for (;;) {
                Client *next = NULL;

                for (size_t i = 0; i < relay->n_slots; i++) {
                        Client *c = &relay->clients[i];
                        if (c->state != CLIENT_FREE && c->connect_queued && (!next || c->id < next->id))
                                next = c;
                }
                if (!next)
                        break;
                r = control_send_message(&(ControlRelayMessage) { .kind = CONTROL_RELAY_CONNECT, .number = next->id });
                if (r == -EAGAIN)
                        goto blocked;
                if (r < 0)
                        goto fail;
                next->connect_queued = false;
        }

        if (relay->n_clients != relay->n_clients_reported) {
                r = control_send_message(
                        &(ControlRelayMessage) { .kind = CONTROL_RELAY_CLIENTS, .number = relay->n_clients });
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
        return helper_fail(r, "Failed to send to the daemon: %m");
}

/* A relaying client with replies waiting that it reads less than STALL_BYTES of: since when. */
static void client_follow_stuck(Client *c, usec_t now) {
        if (!tx_owes_client(&c->tx))
                c->stuck_since = 0;
        else if (c->stuck_since == 0 || c->tx.to_client_total - c->stuck_total >= STALL_BYTES) {
                c->stuck_since = now;
                c->stuck_total = c->tx.to_client_total;
        }
}

static bool client_stuck(const Client *c, usec_t now) {
        return c->state == CLIENT_RELAYING && c->tx.cost > 0 && c->stuck_since > 0 && now - c->stuck_since >= STALL_USEC;
}

static void relay_expire(Relay *relay, usec_t now) {
        Client *stuck = NULL;

        for (size_t i = 0; i < relay->n_slots; i++)
                if (relay->clients[i].state == CLIENT_RELAYING)
                        client_follow_stuck(&relay->clients[i], now);
        /* One at a time: relay_admit_waiting() comes next, and the next is closed only if a
         * request still waits then. */
        if (relay->shared.n_waiting > 0)
                for (size_t i = 0; i < relay->n_slots; i++)
                        if (client_stuck(&relay->clients[i], now) &&
                            (!stuck || relay->clients[i].stuck_since < stuck->stuck_since))
                                stuck = &relay->clients[i];
        if (stuck) {
                log_info("Client %" PRIu64 ": holds %" PRIu64 " bytes of the budget others wait for, and read "
                         "less than %" PRIu64 " bytes of its replies in %" PRIu64 " s.",
                        stuck->id, stuck->tx.cost, STALL_BYTES, STALL_USEC / USEC_PER_SEC);
                client_close(relay, stuck, "stuck");
        }
        for (size_t i = 0; i < relay->n_slots; i++) {
                Client *c = &relay->clients[i];
                if (c->state == CLIENT_RELAYING && c->tx.client_gone && now >= c->deadline) {
                        log_info("Client %" PRIu64 ": its %u requests in flight not answered within %" PRIu64 " s "
                                 "of its leaving.", c->id, c->tx.n_in_flight, DRAIN_TIMEOUT_USEC / USEC_PER_SEC);
                        client_free(relay, c, "drain timed out");
                } else if (c->state == CLIENT_WAITING && now >= c->deadline) {
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

        bool waiting = relay->shared.n_waiting > 0;

        for (size_t i = 0; i < relay->n_slots; i++) {
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

                        tx_events(&c->tx, &ev[0], &ev[1]);
                        /* An fd with nothing wanted is left out, so that a hangup we cannot act
                         * on yet does not wake us in a loop; its error surfaces at the next use. */
                        if (ev[0])
                                p[0] = (struct pollfd) { .fd = c->fd, .events = ev[0] };
                        if (ev[1])
                                p[1] = (struct pollfd) { .fd = c->upstream_fd, .events = ev[1] };
                        /* relay_expire() has a look once it has been stuck long enough */
                        if (waiting && c->tx.cost > 0 && c->stuck_since > 0)
                                next = MIN(next, c->stuck_since + STALL_USEC);
                        if (c->tx.client_gone)
                                next = MIN(next, c->deadline);
                }
        }

        if (relay->admit_again)
                next = now; /* the rest of a look cut short */
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

                if (poll(relay->pollfds, 2 + 2 * (nfds_t) relay->n_slots, timeout) < 0) {
                        if (errno == EINTR)
                                continue;
                        return helper_fail(errno, "poll() failed: %m");
                }
                now = now_usec(CLOCK_MONOTONIC);

                /* Clients first: the daemon's messages and new connections change the table the
                 * poll results refer to. */
                for (size_t i = 0; i < relay->n_slots; i++)
                        client_process(relay, &relay->clients[i], relay->pollfds[2 + 2 * i].revents,
                                relay->pollfds[3 + 2 * i].revents);

                if (relay->pollfds[1].revents) {
                        r = control_receive(relay);
                        if (r != 0)
                                return r;
                }
                /* A listening socket hangs up only when shut down: nothing will come any more. */
                if (relay->pollfds[0].revents & (POLLERR | POLLHUP | POLLNVAL))
                        return helper_fail(EIO, "The listening socket failed or was shut down.");
                if (relay->pollfds[0].revents & POLLIN) {
                        r = relay_accept(relay, now);
                        if (r < 0)
                                return r;
                }
                relay_expire(relay, now);
                /* After everything that may have given room back: replies that ended, clients
                 * closed. */
                relay_admit_waiting(relay);

                r = control_flush(relay);
                if (r != 0)
                        return r;
        }
}

static void relay_close_all(Relay *relay) {
        for (size_t i = 0; i < relay->n_slots; i++)
                client_free(relay, &relay->clients[i], "shutting down");
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
                /* the daemon's messages and fds: on the control socket only; no sendmsg at all, so
                 * that no fd can be passed on to anybody (ours to the daemon go by send) */
                { "recvmsg", 1, { SCMP_A0(SCMP_CMP_EQ, CONTROL_FD) } },
                /* the handshake, and our messages to the daemon: plain reads and writes on the
                 * sockets, never blocking, no address */
                { "recvfrom", 3,
                        { SCMP_A3(SCMP_CMP_EQ, MSG_DONTWAIT), SCMP_A4(SCMP_CMP_EQ, 0), SCMP_A5(SCMP_CMP_EQ, 0) } },
                { "sendto", 3,
                        { SCMP_A3(SCMP_CMP_EQ, MSG_DONTWAIT | MSG_NOSIGNAL), SCMP_A4(SCMP_CMP_EQ, 0),
                                SCMP_A5(SCMP_CMP_EQ, 0) } },
                /* the relaying itself: no file offsets, never blocking */
                { "splice", 3,
                        { SCMP_A1(SCMP_CMP_EQ, 0), SCMP_A3(SCMP_CMP_EQ, 0),
                                SCMP_A5(SCMP_CMP_EQ, TX_SPLICE_FLAGS) } },
                /* the two pipes of a new pair */
                { "pipe2", 1, { SCMP_A1(SCMP_CMP_EQ, TX_PIPE_FLAGS) } },
                /* O_NONBLOCK on a received upstream socket */
                { "fcntl", 1, { SCMP_A1(SCMP_CMP_EQ, F_GETFL) } },
                { "fcntl", 1, { SCMP_A1(SCMP_CMP_EQ, F_SETFL) } },
                { "fcntl64", 1, { SCMP_A1(SCMP_CMP_EQ, F_GETFL) } },
                { "fcntl64", 1, { SCMP_A1(SCMP_CMP_EQ, F_SETFL) } },
                /* a client's uid, for turns by user */
                { "getsockopt", 2, { SCMP_A1(SCMP_CMP_EQ, SOL_SOCKET), SCMP_A2(SCMP_CMP_EQ, SO_PEERCRED) } },
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
        return helper_install_allowlist(rules, ELEMENTSOF(rules), selftest_has("valgrind"));
}

/* Returns 0 to run, RELAY_EXIT if the daemon is already gone, -errno on failure. */
static int relay_setup(void) {
        int domain, r;

        /* Nothing but our two sockets and stdio. */
        if (close_range(CONTROL_FD + 1, ~0U, 0) < 0)
                return log_error_errno(errno, "Failed to close stray file descriptors: %m");

        /* Without the daemon there is nobody to tell: only the log. */
        r = helper_check_socket(CONTROL_FD, SOCK_SEQPACKET, false, &domain);
        if (r < 0 || domain != AF_UNIX)
                return log_error_errno(r < 0 ? r : -EINVAL, "fd %d is not an AF_UNIX SOCK_SEQPACKET socket.",
                        CONTROL_FD);
        helper_control_ok = true;

        r = helper_check_socket(LISTEN_FD, SOCK_STREAM, true, &domain);
        if (r < 0 || !(domain == AF_UNIX || domain == AF_INET || domain == AF_INET6))
                return helper_fail(r < 0 ? r : EAFNOSUPPORT,
                        "fd %d is not a listening AF_UNIX, AF_INET or AF_INET6 stream socket.", LISTEN_FD);
        r = fcntl(LISTEN_FD, F_GETFL);
        if (r < 0 || fcntl(LISTEN_FD, F_SETFL, r | O_NONBLOCK) < 0)
                return helper_fail(errno, "Failed to make the listening socket non-blocking: %m");

        /* A peer that goes away mid-splice must cost an EPIPE, not our life. */
        if (signal(SIGPIPE, SIG_IGN) == SIG_ERR)
                return helper_fail(errno, "Failed to ignore SIGPIPE: %m");

#ifdef HAVE_LSAN
        /* LeakSanitizer's check at exit needs threads, ptrace and /proc, which the filter
         * forbids. Setup is the last thing that allocates: check now, and not again. */
        __lsan_do_leak_check();
#endif
        if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
                return helper_fail(errno, "Failed to set no_new_privs: %m");
        r = install_allowlist();
        if (r < 0)
                return helper_fail(r, "Failed to install the seccomp filter: %m");

        r = control_send_message(&(ControlRelayMessage) { .kind = CONTROL_RELAY_READY });
        if (r == -EPIPE || r == -ECONNRESET) {
                log_debug("The daemon went away.");
                return RELAY_EXIT;
        }
        if (r < 0)
                return log_error_errno(r, "Failed to tell the daemon we are ready: %m");

#ifdef RELAY_SELFTEST
        helper_selftest_try_forbidden(SELFTEST_ENV);
        if (selftest_has("sendmsg")) /* allowed on no fd */
                (void) sendmsg(LISTEN_FD, &(struct msghdr) {}, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (selftest_has("sendmsg-control"))
                (void) sendmsg(CONTROL_FD, &(struct msghdr) {}, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (selftest_has("write")) /* allowed on fd 2 only */
                (void) write(STDOUT_FILENO, "", 0);
#endif
        return 0;
}


static void help(void) {
        printf("%s\n\n"
               "Relays the clients of a listening socket (fd 3) to upstream NBD connections handed\n"
               "over by blockstreamd on a control socket (fd 4), for one export only. Started by\n"
               "blockstreamd only.\n\n"
               "     --export=NAME   The only export its clients may list, open and read\n"
               "     --clients=N     Clients at once, 1-%u (default %u); each takes four fds\n"
               "     --budget=BYTES  What the reads in flight of all clients together may make\n"
               "                     the server hold: %u (32 MiB, one read) to 2^40 (default:\n"
               "                     no bound but each client's 32 MiB)\n"
               "  -h --help          Show this help\n"
               "     --version       Show the version\n",
                program_invocation_short_name, CLIENTS_MAX, CLIENTS_DEFAULT, NBD_READ_MAX);
}

/* --name=VALUE: its value, else NULL. */
static const char *arg_value(const char *arg, const char *name) {
        size_t n = strlen(name);

        return strncmp(arg, name, n) == 0 && arg[n] == '=' ? arg + n + 1 : NULL;
}

static int parse_args(int argc, char *argv[], unsigned *ret_clients, uint64_t *ret_budget) {
        const char *export = NULL, *v;
        uint64_t n;

        *ret_clients = CLIENTS_DEFAULT;
        *ret_budget = 0;
        for (int i = 1; i < argc; i++) {
                if ((v = arg_value(argv[i], "--export")) && !export)
                        export = v;
                else if ((v = arg_value(argv[i], "--clients")) && control_parse_u64(v, &n) == 0 && n >= 1 &&
                         n <= CLIENTS_MAX)
                        *ret_clients = (unsigned) n;
                else if ((v = arg_value(argv[i], "--budget")) && control_parse_u64(v, &n) == 0 &&
                         n >= NBD_READ_MAX && n <= (UINT64_C(1) << 40))
                        *ret_budget = n;
                else {
                        log_error("Invalid argument: %s (see --help).", argv[i]);
                        return -EINVAL;
                }
        }
        if (!export) {
                log_error("This program needs --export=NAME (see --help).");
                return -EINVAL;
        }
        if (neg_pin_export(export) < 0) {
                log_error("Invalid export name: 1-%u printable ASCII characters, no space.", EXPORT_NAME_MAX);
                return -EINVAL;
        }
        return 0;
}

int main(int argc, char *argv[]) {
        /* On the heap, allocated before the filter: a global this large would make
         * AddressSanitizer's destructors mmap() its shadow at exit, which the filter kills. */
        static Relay *relay;
        unsigned n_slots;
        uint64_t budget;
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
        if (parse_args(argc, argv, &n_slots, &budget) < 0)
                return EXIT_FAILURE;

#ifdef RELAY_SELFTEST
        if (selftest_has("timeout"))
                upstream_timeout_usec = negotiation_timeout_usec = 1 * USEC_PER_SEC;
#endif

        relay = calloc(1, sizeof(Relay));
        if (relay) {
                relay->clients = calloc(n_slots, sizeof(Client));
                relay->pollfds = calloc(2 + 2 * (size_t) n_slots, sizeof(struct pollfd));
        }
        if (!relay || !relay->clients || !relay->pollfds) {
                log_error("Out of memory.");
                return EXIT_FAILURE;
        }
        relay->n_slots = n_slots;
        relay->shared.max = budget;
        relay->last_uid = UINT32_MAX;
        relay->next_id = 1;
        for (size_t i = 0; i < n_slots; i++)
                relay->clients[i].fd = relay->clients[i].upstream_fd = -1;

        r = relay_setup();
        if (r < 0)
                return EXIT_FAILURE;
        if (r == 0)
                r = relay_run(relay);
        relay_close_all(relay);
        /* Not freed: free() could give memory back to the kernel, which the filter forbids. */
        return r < 0 ? EXIT_FAILURE : EXIT_SUCCESS;
}
