/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* The helpers' control protocol: one text line per datagram (SOCK_SEQPACKET), framing and the
 * parsers of what a helper says to the daemon. A helper is untrusted after exec: every message
 * is checked here for its form, and by the caller for its sense (ranges, order, state). */

#include <stddef.h>
#include <stdint.h>

#define CONTROL_MESSAGE_MAX 256

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
 * verb's arguments are malformed. */
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
