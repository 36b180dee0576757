/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* Reading a method's a{sv} options from a table: unknown keys, keys given twice, wrongly typed
 * values and strings of PATH_MAX bytes or more are refused (InvalidArgs) with a message naming
 * what the method takes. A table has at most 64 options. */

#include <stdbool.h>
#include <systemd/sd-bus.h>

typedef struct BusOption {
        const char *name;
        const char *type; /* "s", "t", "u", or "a{ss}" (a NULL-terminated key, value, … list) */
        void *ret;        /* const char **, uint64_t *, uint32_t *, char *** */
        bool *seen;       /* set when the option was given; may be NULL */
        unsigned max;     /* a{ss}: at most this many entries */
} BusOption;

int bus_read_options(sd_bus_message *m, const char *method, const BusOption *options, sd_bus_error *error);
