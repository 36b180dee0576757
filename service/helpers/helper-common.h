/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* What both helpers (blockstream-pull, blockstream-nbd-relay) do the same way: the fd of the
 * daemon, failing loudly (the log, and "error TEXT" to the daemon), checking the sockets they
 * were given, their seccomp allow-list, and the test builds' hooks. */

#include <seccomp.h>
#include <stdbool.h>
#include <stddef.h>

#include "util.h"

/* The daemon's end (AF_UNIX SOCK_SEQPACKET): fd 4 in both helpers. */
#define CONTROL_FD 4

/* CONTROL_FD is the daemon's socket (checked), and the daemon has not gone away: helper_fail()
 * tells it. */
extern bool helper_control_ok;
extern bool helper_control_gone;

/* A fatal error: log it, tell the daemon (waiting a little if its queue is full), and return
 * -error (EIO for 0) for main to exit with. */
_printf_(2, 3) int helper_fail(int error, const char *format, ...);

/* Printable ASCII for a log line: len bytes of s into buf of size bytes, anything else as '?'. */
const char *helper_sanitize(char *buf, size_t size, const char *s, size_t len);

/* fd is a socket of want_type (listening too, if asked); *ret_domain: its domain. */
int helper_check_socket(int fd, int want_type, bool want_listening, int *ret_domain);

typedef struct SyscallRule {
        const char *name;
        unsigned n_args;
        struct scmp_arg_cmp args[3];
} SyscallRule;

/* Loads an allow-list of rules, anything else kills the process. A rule for a syscall the
 * architecture lacks is left out. With valgrind (test builds only) also what valgrind's own
 * machinery needs, and a kill of the thread rather than the process. */
int helper_install_allowlist(const SyscallRule *rules, size_t n_rules, bool valgrind);

/* Test builds only: whether the comma-separated list in the environment variable env names
 * word; false for env NULL (what a helper passes outside its test build). Words both helpers
 * know:
 *   open, socket   try that syscall right after "ready" (the filter must kill us with SIGSYS)
 *   valgrind       also allow what valgrind's own machinery needs, so memcheck can run */
bool helper_selftest_has(const char *env, const char *word);

/* Test builds only, right after confinement: with "open" or "socket" in env, tries that
 * syscall, which the allow-list must answer with SIGSYS. */
void helper_selftest_try_forbidden(const char *env);
