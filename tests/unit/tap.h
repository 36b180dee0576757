/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* A tiny TAP producer for the unit tests: one "ok"/"not ok" line per test function on stdout,
 * one diagnostic line per failed check on stderr (file:line and the values), exit status 1 if
 * anything failed. A failed check does not stop the test: the rest of it still runs, so one
 * run shows every broken expectation. */

#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define _unused_tap_ __attribute__((unused))

static unsigned tap_n_tests _unused_tap_;

static unsigned tap_failed_checks _unused_tap_;
static unsigned tap_failed_tests _unused_tap_;
static const char *tap_test_name _unused_tap_ = "";
static const char *tap_only _unused_tap_;

#define TAP_FAIL(...) \
        do { \
                tap_failed_checks++; \
                fprintf(stderr, "# %s:%d: [%s] ", __FILE__, __LINE__, tap_test_name); \
                fprintf(stderr, __VA_ARGS__); \
                fputc('\n', stderr); \
        } while (0)

#define ASSERT_TRUE(expr) \
        do { \
                if (!(expr)) \
                        TAP_FAIL("expected true: %s", #expr); \
        } while (0)

#define ASSERT_FALSE(expr) \
        do { \
                if (expr) \
                        TAP_FAIL("expected false: %s", #expr); \
        } while (0)

#define ASSERT_EQ(a, b) \
        do { \
                long long _a = (long long) (a), _b = (long long) (b); \
                if (_a != _b) \
                        TAP_FAIL("%s == %s: got %lld, expected %lld", #a, #b, _a, _b); \
        } while (0)

#define ASSERT_EQ_U64(a, b) \
        do { \
                uint64_t _a = (uint64_t) (a), _b = (uint64_t) (b); \
                if (_a != _b) \
                        TAP_FAIL("%s == %s: got %" PRIu64 ", expected %" PRIu64, #a, #b, _a, _b); \
        } while (0)

#define ASSERT_LE_U64(a, b) \
        do { \
                uint64_t _a = (uint64_t) (a), _b = (uint64_t) (b); \
                if (!(_a <= _b)) \
                        TAP_FAIL("%s <= %s: got %" PRIu64 " > %" PRIu64, #a, #b, _a, _b); \
        } while (0)

#define ASSERT_GE_U64(a, b) \
        do { \
                uint64_t _a = (uint64_t) (a), _b = (uint64_t) (b); \
                if (!(_a >= _b)) \
                        TAP_FAIL("%s >= %s: got %" PRIu64 " < %" PRIu64, #a, #b, _a, _b); \
        } while (0)

/* A negative errno return: print both symbolically. */
#define ASSERT_ERRNO(r, expected) \
        do { \
                long long _r = (long long) (r), _e = (long long) (expected); \
                if (_r != _e) \
                        TAP_FAIL("%s: got %lld (%s), expected %lld (%s)", #r, _r, \
                                _r < 0 ? strerror((int) -_r) : "success", _e, \
                                _e < 0 ? strerror((int) -_e) : "success"); \
        } while (0)

#define ASSERT_OK(r) \
        do { \
                long long _r = (long long) (r); \
                if (_r < 0) \
                        TAP_FAIL("%s: failed with %lld (%s)", #r, _r, strerror((int) -_r)); \
        } while (0)

#define ASSERT_NEG(r) \
        do { \
                long long _r = (long long) (r); \
                if (_r >= 0) \
                        TAP_FAIL("%s: expected a negative errno, got %lld", #r, _r); \
        } while (0)

#define ASSERT_STREQ(a, b) \
        do { \
                const char *_a = (a), *_b = (b); \
                if (!_a || !_b ? _a != _b : strcmp(_a, _b) != 0) \
                        TAP_FAIL("%s == %s: got \"%s\", expected \"%s\"", #a, #b, _a ? _a : "(null)", \
                                _b ? _b : "(null)"); \
        } while (0)

#define ASSERT_NULL(p) \
        do { \
                if ((p) != NULL) \
                        TAP_FAIL("expected NULL: %s", #p); \
        } while (0)

#define ASSERT_NOT_NULL(p) \
        do { \
                if ((p) == NULL) \
                        TAP_FAIL("expected non-NULL: %s", #p); \
        } while (0)

/* Run one test function and report it. A test can be selected by name: ./test-x NAME. */
#define TAP_RUN(fn) \
        do { \
                unsigned _before = tap_failed_checks; \
                if (tap_only && strcmp(tap_only, #fn) != 0) \
                        break; \
                tap_test_name = #fn; \
                fflush(stderr); \
                fn(); \
                fflush(stderr); \
                tap_n_tests++; \
                if (tap_failed_checks != _before) { \
                        tap_failed_tests++; \
                        printf("not ok %u - %s\n", tap_n_tests, #fn); \
                } else \
                        printf("ok %u - %s\n", tap_n_tests, #fn); \
                fflush(stdout); \
        } while (0)

/* The fds this process has open, for a leak check: the same count before and after. */
static inline unsigned count_fds(void) {
        DIR *d = opendir("/proc/self/fd");
        unsigned n = 0;

        if (!d)
                return 0;
        while (readdir(d))
                n++;
        closedir(d);
        return n;
}

static inline void tap_init(int argc, char **argv) {
        setvbuf(stdout, NULL, _IOLBF, 0);
        if (argc > 1)
                tap_only = argv[1];
}

static inline int tap_finish(void) {
        printf("1..%u\n", tap_n_tests);
        if (tap_failed_tests > 0)
                fprintf(stderr, "# %u of %u tests failed (%u failed checks)\n", tap_failed_tests, tap_n_tests,
                        tap_failed_checks);
        return tap_failed_tests > 0 ? EXIT_FAILURE : EXIT_SUCCESS;
}
