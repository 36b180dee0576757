/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* Reading a method's a{sv} options from a table: unknown keys, keys given twice, wrongly typed
 * values and strings of PATH_MAX bytes or more are refused (InvalidArgs) with a message naming
 * what the method takes. A table has at most 64 options. */

#include <stdbool.h>
#include <sys/types.h>
#include <systemd/sd-bus.h>

typedef struct BusOption {
        const char *name;
        const char *type; /* "s", "t", "u", "b" (into an int), or "a{ss}" (a NULL-terminated key, value, … list) */
        void *ret;        /* const char **, uint64_t *, uint32_t *, char *** */
        bool *seen;       /* set when the option was given; may be NULL */
        unsigned max;     /* a{ss}: at most this many entries */
} BusOption;

int bus_read_options(sd_bus_message *m, const char *method, const BusOption *options, sd_bus_error *error);

/* The effective uid of the caller of msg, as the bus tells it. */
int bus_sender_uid(sd_bus_message *msg, uid_t *ret);

/* The primary gid and supplementary groups of uid (at most max) from the user database, as polkit's
 * isInGroup() reads them: what a check made as a caller or an owner uses. (The bus does not tell
 * a caller's groups on Debian 12's sd-bus, and a process's own, read from /proc, could be a
 * set-id program's it ran since.) -ESRCH: no account for uid; -E2BIG: more than max groups. */
int user_groups(uid_t uid, size_t max, gid_t *ret_gid, gid_t **ret_gids, size_t *ret_n);
