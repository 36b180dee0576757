/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <errno.h>
#include <string.h>

#include "blockstream-api.h"
#include "control.h"
#include "util.h"

static const char *const extent_kind_table[_CONTROL_EXTENT_MAX] = {
        [CONTROL_EXTENT_LOCAL] = BS_EXTENT_LOCAL,
        [CONTROL_EXTENT_ZERO] = BS_EXTENT_ZERO,
        [CONTROL_EXTENT_BACKING] = BS_EXTENT_BACKING,
        [CONTROL_EXTENT_ABSENT] = BS_EXTENT_ABSENT,
};

const char *control_extent_kind_to_string(ControlExtentKind k) {
        return k >= 0 && k < _CONTROL_EXTENT_MAX ? extent_kind_table[k] : NULL;
}

int control_frame(char *buf, size_t len) {
        if (len == 0 || len > CONTROL_MESSAGE_MAX || buf[len - 1] != '\n' || memchr(buf, 0, len))
                return -EBADMSG;
        buf[len - 1] = 0;
        return 0;
}

/* The number at the start of s up to the first space or the end; *end: where it stopped. */
static int parse_u64_prefix(const char *s, const char **end, uint64_t *ret) {
        uint64_t v = 0;
        const char *p;

        for (p = s; *p >= '0' && *p <= '9'; p++) {
                if (v > (UINT64_MAX - (uint64_t) (*p - '0')) / 10)
                        return -EBADMSG;
                v = v * 10 + (uint64_t) (*p - '0');
        }
        if (p == s)
                return -EBADMSG;
        *end = p;
        *ret = v;
        return 0;
}

int control_parse_u64(const char *s, uint64_t *ret) {
        const char *end;

        if (parse_u64_prefix(s, &end, ret) < 0 || *end)
                return -EBADMSG;
        return 0;
}

/* "A B ... " numbers separated by single spaces; *rest: after the last one (at its separator). */
static int parse_u64s(const char *s, uint64_t *const *v, size_t n, const char **rest) {
        for (size_t i = 0; i < n; i++) {
                if (i > 0) {
                        if (*s != ' ')
                                return -EBADMSG;
                        s++;
                }
                if (parse_u64_prefix(s, &s, v[i]) < 0)
                        return -EBADMSG;
        }
        *rest = s;
        return 0;
}

static const char *verb_args(const char *line, const char *verb) {
        size_t n = strlen(verb);

        return strncmp(line, verb, n) == 0 && line[n] == ' ' ? line + n + 1 : NULL;
}

int control_parse_pull(const char *line, ControlPullMessage *ret) {
        const char *a, *rest;

        *ret = (ControlPullMessage) {};
        if (streq(line, "ready")) {
                ret->kind = CONTROL_PULL_READY;
                return 0;
        }
        if (streq(line, "done")) {
                ret->kind = CONTROL_PULL_DONE;
                return 0;
        }
        if ((a = verb_args(line, "error"))) {
                ret->kind = CONTROL_PULL_ERROR;
                ret->text = a;
                ret->text_len = strlen(a);
                return 0;
        }
        if ((a = verb_args(line, "progress"))) {
                ret->kind = CONTROL_PULL_PROGRESS;
                if (parse_u64s(a, (uint64_t *const[]) { &ret->done, &ret->total }, 2, &rest) < 0 || *rest)
                        return -EBADMSG;
                return 0;
        }
        if ((a = verb_args(line, "extent"))) {
                ret->kind = CONTROL_PULL_EXTENT;
                if (parse_u64s(a, (uint64_t *const[]) { &ret->offset, &ret->length, &ret->depth }, 3, &rest) < 0 ||
                        *rest != ' ')
                        return -EBADMSG;
                for (ControlExtentKind k = 0; k < _CONTROL_EXTENT_MAX; k++)
                        if (streq(rest + 1, extent_kind_table[k])) {
                                ret->extent_kind = k;
                                return 0;
                        }
                return -EBADMSG;
        }
        ret->kind = CONTROL_PULL_UNKNOWN;
        return 0;
}

int control_parse_relay(const char *line, ControlRelayMessage *ret) {
        const char *a;

        *ret = (ControlRelayMessage) {};
        if (streq(line, "ready")) {
                ret->kind = CONTROL_RELAY_READY;
                return 0;
        }
        if ((a = verb_args(line, "error"))) {
                ret->kind = CONTROL_RELAY_ERROR;
                ret->text = a;
                ret->text_len = strlen(a);
                return 0;
        }
        if ((a = verb_args(line, "connect"))) {
                ret->kind = CONTROL_RELAY_CONNECT;
                return control_parse_u64(a, &ret->number);
        }
        if ((a = verb_args(line, "clients"))) {
                ret->kind = CONTROL_RELAY_CLIENTS;
                return control_parse_u64(a, &ret->number);
        }
        ret->kind = CONTROL_RELAY_UNKNOWN;
        return 0;
}
