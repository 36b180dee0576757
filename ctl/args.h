/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* The command line as parsed (blockstreamctl.c fills it in), and the checks of its arguments
 * that every verb makes before it connects, so that wrong usage always exits 2. */

#include <stdbool.h>
#include <stdint.h>

#include "util.h"

#define EXIT_USAGE 2
/* 128 + SIGINT, as a shell reports a job stopped by Ctrl-C. */
#define EXIT_INTERRUPTED 130

enum {
        OPT_OWNER = 1 << 0,
        OPT_UUID = 1 << 1,
        OPT_DISK = 1 << 2,
        OPT_BANDWIDTH = 1 << 3,
        OPT_BASE = 1 << 4,
        OPT_OFFSET = 1 << 5,
        OPT_LENGTH = 1 << 6,
        OPT_WAIT = 1 << 7,
        OPT_LISTEN = 1 << 8,
        OPT_TEMPLATE_FORMAT = 1 << 9,
        OPT_DISK_NAME = 1 << 10,
        OPT_MAX_GUEST_LATENCY = 1 << 11,
        OPT_ENGINE = 1 << 12,
        OPT_CACHE = 1 << 13,
};

extern bool arg_json;
extern const char *arg_host;
extern bool arg_ask_password;
extern bool arg_quiet;
extern unsigned arg_given; /* OPT_* of the command-specific options seen */
extern const char *arg_owner;
extern const char *arg_uuid;
extern char **arg_disks; /* "ALIAS=PATH" */
extern char **arg_disk_names; /* "ALIAS=NAME" */
extern uint64_t arg_bandwidth;
extern uint64_t arg_max_guest_latency; /* µs */
extern const char *arg_base;
extern const char *arg_engine;
extern uint64_t arg_offset;
extern uint64_t arg_length;
extern bool arg_wait;
extern const char *arg_listen;
extern const char *arg_template_format;
extern bool arg_cache;

/* Verbs return <0 (-errno, already logged) for exit status 1, or the exit status itself. */
_printf_(1, 2) int usage_error(const char *format, ...);
/* With --host: local file names and user names mean nothing on another host. */
bool is_remote(void);
int path_make_absolute(const char *p, char **ret);
int local_path_arg(const char *p, char **ret);
int check_guest_name(const char *name);
int check_disk_args(char **args);
/* SIZE[/s], or "unlimited"/"infinity" for 0. */
int parse_bandwidth(const char *s, uint64_t *ret);
/* A duration in µs: a number (a fraction allowed) with "us", "ms" or "s" (none: µs), or "off" for
 * 0. -EINVAL when malformed, -ERANGE when it does not fit. */
int parse_latency(const char *s, uint64_t *ret);
