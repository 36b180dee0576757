/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* The helpers' control protocol, both ends of it: one text line per datagram (SOCK_SEQPACKET),
 * its framing, sending and receiving, the builders and the parsers of what a helper says to the
 * daemon and of what the daemon says to a helper. Linked by the daemon and by both helpers.
 *
 *   pull → daemon:   "ready", "progress DONE TOTAL", "extent OFFSET LENGTH DEPTH KIND", "done",
 *                    "error TEXT"
 *   relay → daemon:  "ready", "connect ID", "clients COUNT", "error TEXT"
 *   daemon → pull:   "bandwidth BYTES_PER_SECOND", "pause", "resume", "stop"
 *   daemon → relay:  "upstream ID" with one fd (SCM_RIGHTS), "refused ID [TEXT]", "stop"
 *
 * Neither end trusts the other's lines: a helper is untrusted after exec, and a helper trusts
 * nothing it did not check either. Every message is checked here for its form, and by the
 * caller for its sense (ranges, order, state). What the helpers call here (poll, send, recvmsg,
 * close) is on both helpers' seccomp allow-lists: keep it so. */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CONTROL_MESSAGE_MAX 256
/* blockstream-nbd-relay's clients at once, each with one connection ("connect N") that the daemon
 * hands over: the daemon gives a relay no more than this many (export-upstreams.c). */
#define RELAY_CLIENTS_MAX 64
/* Its binary, in the helper directory. */
#define RELAY_BINARY "blockstream-nbd-relay"
/* Room to see (and close) fds beyond those a message may carry. */
#define CONTROL_FDS_MAX 8
/* How long a helper waits for room in the daemon's queue to tell it why it fails. */
#define CONTROL_ERROR_SEND_TIMEOUT_MSEC 1000

/* A datagram of len bytes in buf (room for len + 1): at most CONTROL_MESSAGE_MAX bytes, one line
 * ending in '\n', no NUL. Makes it a C string in place (the '\n' dropped). 0 or -EBADMSG. */
int control_frame(char *buf, size_t len);

/* A decimal number alone: digits only (no sign, no space), no overflow. 0 or -EBADMSG. */
int control_parse_u64(const char *s, uint64_t *ret);

typedef enum ControlPullKind {
        CONTROL_PULL_UNKNOWN,
        CONTROL_PULL_READY,    /* "ready" */
        CONTROL_PULL_PROGRESS, /* "progress DONE TOTAL" */
        CONTROL_PULL_EXTENT,   /* "extent OFFSET LENGTH DEPTH KIND" */
        CONTROL_PULL_DONE,     /* "done" */
        CONTROL_PULL_ERROR,    /* "error TEXT" (raw: the caller sanitizes it) */
} ControlPullKind;

/* The kinds of an extent of the allocation map, as the helper names them. */
typedef enum ControlExtentKind {
        CONTROL_EXTENT_LOCAL,
        CONTROL_EXTENT_ZERO,
        CONTROL_EXTENT_BACKING,
        CONTROL_EXTENT_ABSENT,
        _CONTROL_EXTENT_MAX,
} ControlExtentKind;

const char *control_extent_kind_to_string(ControlExtentKind k);

typedef struct ControlPullMessage {
        ControlPullKind kind;
        uint64_t done, total;           /* progress */
        uint64_t offset, length, depth; /* extent */
        ControlExtentKind extent_kind;  /* extent */
        const char *text;               /* error: borrowed from the line */
        size_t text_len;
} ControlPullMessage;

/* A line of blockstream-pull (framed by control_frame). ret->kind is always set: to the verb
 * when the line starts with a known one, else CONTROL_PULL_UNKNOWN. 0, or -EBADMSG when a known
 * verb's arguments are malformed (an extent's kind that contradicts its depth included: depth 0
 * absent, 1 local or zero, 2 and more backing). */
int control_parse_pull(const char *line, ControlPullMessage *ret);

typedef enum ControlRelayKind {
        CONTROL_RELAY_UNKNOWN,
        CONTROL_RELAY_READY,   /* "ready" */
        CONTROL_RELAY_CONNECT, /* "connect ID" */
        CONTROL_RELAY_CLIENTS, /* "clients COUNT" */
        CONTROL_RELAY_ERROR,   /* "error TEXT" (raw: the caller sanitizes it) */
} ControlRelayKind;

typedef struct ControlRelayMessage {
        ControlRelayKind kind;
        uint64_t number;  /* connect: the connection's id; clients: the count */
        const char *text; /* error: borrowed from the line */
        size_t text_len;
} ControlRelayMessage;

/* A line of blockstream-nbd-relay, as control_parse_pull. */
int control_parse_relay(const char *line, ControlRelayMessage *ret);

/* The builders: one line, "\n" included, into buf of size bytes (NUL-terminated). An error's text
 * is cut to what fits and made printable ASCII ('?' for anything else). The length, or
 * -EMSGSIZE, or -EINVAL for an unknown kind. */
int control_format_pull(char *buf, size_t size, const ControlPullMessage *m);
int control_format_relay(char *buf, size_t size, const ControlRelayMessage *m);

/* What the daemon says to a helper. */
typedef enum ControlCommandKind {
        CONTROL_COMMAND_UNKNOWN,
        CONTROL_COMMAND_STOP,      /* "stop": both helpers */
        CONTROL_COMMAND_PAUSE,     /* "pause": pull */
        CONTROL_COMMAND_RESUME,    /* "resume": pull */
        CONTROL_COMMAND_BANDWIDTH, /* "bandwidth BYTES_PER_SECOND" (0: no limit): pull */
        CONTROL_COMMAND_UPSTREAM,  /* "upstream ID" with one fd: relay */
        CONTROL_COMMAND_REFUSED,   /* "refused ID [TEXT]": relay */
} ControlCommandKind;

typedef struct ControlCommand {
        ControlCommandKind kind;
        uint64_t number;  /* bandwidth: bytes per second; upstream, refused: the client's id */
        const char *text; /* refused: the reason, "" when none; borrowed from the line */
} ControlCommand;

/* A datagram of len bytes from the daemon in buf (room for len + 1): framed as control_frame()
 * does, and printable ASCII only (no control character, no byte above 0x7e: the daemon has no
 * business sending any); numbers in their one canonical decimal form (no sign, no leading zero,
 * no overflow). ret->kind is set as control_parse_pull() sets it. 0, or -EBADMSG when the datagram
 * is not a line or a known verb's arguments are malformed. A helper takes CONTROL_COMMAND_UNKNOWN
 * for an error too: it comes from the same build as its daemon. */
int control_parse_command(char *buf, size_t len, ControlCommand *ret);

/* How many fds a command comes with: one for "upstream", none for any other. */
size_t control_command_n_fds(ControlCommandKind k);

/* The builder of a command, as control_format_pull(). */
int control_format_command(char *buf, size_t size, const ControlCommand *m);

/* Sending, either end: one datagram of len bytes, and with pass_fd >= 0 that fd (SCM_RIGHTS,
 * with sendmsg(), which the helpers never pass). Retried on EINTR. 0 or -errno (-EAGAIN with
 * MSG_DONTWAIT on a full queue; -EPIPE, -ECONNRESET: the other end is gone). */
int control_send(int fd, int flags, const char *buf, size_t len);
int control_send_fd(int fd, int flags, const char *buf, size_t len, int pass_fd);

/* A builder's line, sent at once (control_send_fd()). 0 or -errno (the builder's too). */
int control_send_pull(int fd, int flags, const ControlPullMessage *m);
int control_send_relay(int fd, int flags, const ControlRelayMessage *m);
int control_send_command(int fd, int flags, const ControlCommand *m, int pass_fd);

/* A helper's last words, "error TEXT": without blocking, but waiting up to
 * CONTROL_ERROR_SEND_TIMEOUT_MSEC for room should the daemon's queue be full. 0 or -errno. */
int control_send_error(int fd, const char *text);

/* One datagram as a helper receives it. */
typedef struct ControlDatagram {
        char buf[CONTROL_MESSAGE_MAX + 2]; /* one byte more than allowed, and a NUL */
        size_t len;
        int fds[CONTROL_FDS_MAX]; /* received close-on-exec; the caller owns them */
        size_t n_fds;
} ControlDatagram;

/* Receives one datagram without blocking. 1: one in ret; 0: none waiting; -ECONNRESET: the
 * other end is gone (EOF, or the connection was reset); -EMSGSIZE: longer than
 * CONTROL_MESSAGE_MAX; -EBADMSG: ancillary data other than fds, or more fds than
 * CONTROL_FDS_MAX; other -errno from recvmsg(). On any error no fd is left open. */
int control_receive_datagram(int fd, ControlDatagram *ret);

/* Closes the fds of a datagram (those still >= 0). */
void control_datagram_close_fds(ControlDatagram *d);
