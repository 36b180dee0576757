/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* Small helpers shared by the daemon, its helpers, the CLI and the tests:
 * cleanup attributes, logging in systemd's style, name and size parsing. */

#include <errno.h>
#include <signal.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#define UID_FMT "%" PRIu32

/* A macro's value as a string literal: STRINGIFY(10) is "10". */
#define STRINGIFY_(x) #x
#define STRINGIFY(x) STRINGIFY_(x)

#define UID_INVALID ((uid_t) -1)

typedef uint64_t usec_t;
#define USEC_PER_SEC ((usec_t) 1000000ULL)
#define USEC_PER_MSEC ((usec_t) 1000ULL)
#define USEC_INFINITY ((usec_t) UINT64_MAX)

#define ELEMENTSOF(x) (sizeof(x) / sizeof((x)[0]))
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))

#define _cleanup_(f) __attribute__((cleanup(f)))
#define _unused_ __attribute__((unused))
#define _printf_(a, b) __attribute__((format(printf, a, b)))

static inline void *mfree(void *p) {
        free(p);
        return NULL;
}

static inline void freep(void *p) {
        free(*(void **) p);
}
#define _cleanup_free_ _cleanup_(freep)

static inline void closep(int *fd) {
        if (*fd >= 0) {
                int saved = errno;
                close(*fd);
                errno = saved;
        }
}
#define _cleanup_close_ _cleanup_(closep)

static inline void fclosep(FILE **f) {
        if (*f)
                fclose(*f);
}
#define _cleanup_fclose_ _cleanup_(fclosep)

/* Hand ownership out of a cleanup-managed variable. */
#define TAKE_PTR(p)                                \
        ({                                         \
                __typeof__(p) _tp = (p);           \
                (p) = NULL;                        \
                _tp;                               \
        })
#define TAKE_FD(fd)                                \
        ({                                         \
                int _tf = (fd);                    \
                (fd) = -1;                         \
                _tf;                               \
        })

static inline bool streq(const char *a, const char *b) {
        return strcmp(a, b) == 0;
}
static inline bool streq_ptr(const char *a, const char *b) {
        if (!a || !b)
                return a == b;
        return strcmp(a, b) == 0;
}
static inline bool isempty(const char *s) {
        return !s || !*s;
}
static inline const char *strempty(const char *s) {
        return s ?: "";
}
/* c as it may stand in a QEMU identifier we make of a name (job ids, node names): itself if one
 * of [A-Za-z0-9._-], else '_'. */
static inline char qemu_id_char(char c) {
        return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '.' ||
                               c == '_'
                       ? c
                       : '_';
}

/* The 32-bit FNV-1a hash of a string: what a name too long for a QEMU id or an fd set number is
 * told apart by (not for anything a client could collide on purpose to its gain). */
static inline uint32_t fnv1a32(const char *s) {
        uint32_t hash = 2166136261U;

        for (; *s; s++)
                hash = (hash ^ (uint8_t) *s) * 16777619U;
        return hash;
}

/* NULL-terminated string vectors. */
char **strv_free(char **l);
static inline void strv_freep(char ***l) {
        strv_free(*l);
}
#define _cleanup_strv_free_ _cleanup_(strv_freep)
size_t strv_length(char *const *l);
static inline bool strv_isempty(char *const *l) {
        return !l || !*l;
}
int strv_push(char ***l, char *value); /* takes value, also on failure */
char **strv_copy(char *const *l);
bool strv_equal(char *const *a, char *const *b);
bool strv_contains(char *const *l, const char *s);

/* The "C" locale for the calling thread (json-c's per-parse locale switch costs nothing then). */
int locale_use_c(void);

/* Logging: "<prio>" prefixes when stderr is the journal, plain text otherwise.
 * The _errno variants set errno for %m and return -abs(error). */
enum { LOG_LEVEL_ERR = 3, LOG_LEVEL_WARNING = 4, LOG_LEVEL_NOTICE = 5, LOG_LEVEL_INFO = 6, LOG_LEVEL_DEBUG = 7 };
void log_setup(const char *ident);
void log_set_max_level(int level);
int log_get_max_level(void);
int log_internal(int level, int error, const char *format, ...) _printf_(3, 4);

#define log_full_errno(level, error, ...) log_internal((level), (error), __VA_ARGS__)
#define log_debug(...) log_internal(LOG_LEVEL_DEBUG, 0, __VA_ARGS__)
#define log_info(...) log_internal(LOG_LEVEL_INFO, 0, __VA_ARGS__)
#define log_notice(...) log_internal(LOG_LEVEL_NOTICE, 0, __VA_ARGS__)
#define log_warning(...) log_internal(LOG_LEVEL_WARNING, 0, __VA_ARGS__)
#define log_error(...) log_internal(LOG_LEVEL_ERR, 0, __VA_ARGS__)
#define log_debug_errno(e, ...) log_internal(LOG_LEVEL_DEBUG, (e), __VA_ARGS__)
#define log_info_errno(e, ...) log_internal(LOG_LEVEL_INFO, (e), __VA_ARGS__)
#define log_warning_errno(e, ...) log_internal(LOG_LEVEL_WARNING, (e), __VA_ARGS__)
#define log_error_errno(e, ...) log_internal(LOG_LEVEL_ERR, (e), __VA_ARGS__)
#define log_oom() log_internal(LOG_LEVEL_ERR, ENOMEM, "Out of memory.")

/* Tests only (a daemon built with -Dtest_hooks=true): when the environment variable var is value,
 * say so in the log and stop (SIGSTOP) right here, for a test to kill the daemon at this step.
 * True if it stopped (and was continued since). In other builds it is false, compiled out. */
#ifdef BLOCKSTREAM_TEST_HOOKS
#define TEST_HOOKS 1
#else
#define TEST_HOOKS 0
#endif
#define test_hook_stop(var, value, ...) \
        (TEST_HOOKS && streq_ptr(getenv(var), (value)) && (log_info(__VA_ARGS__), (void) raise(SIGSTOP), true))
/* Tests only, likewise: the environment variable var's value if it is a number in 1…bound (a
 * smaller limit, a shorter deadline), else bound. Inline, as the hooks are the caller's build's. */
static inline unsigned test_hook_bound(const char *var, unsigned bound) {
        const char *t = TEST_HOOKS ? getenv(var) : NULL;
        unsigned v;

        if (t && sscanf(t, "%u", &v) == 1 && v > 0 && v <= bound)
                return v;
        return bound;
}

/* Names. A guest name is [A-Za-z0-9_.-]{1,64} (api.md), but neither "." nor "..": it is a path
 * component. */
#define GUEST_NAME_MAX 64
bool guest_name_is_valid(const char *s);
/* The names a guest's manager gives its disks (RegisterGuest's disk_names, e.g. libvirt's
 * <target dev='vda'/> for qdev id virtio-disk0): a NULL-terminated list of qdev id, name pairs.
 * An id is a QEMU identifier, a name is what a guest name may be; at most DISK_NAMES_MAX pairs,
 * no id or name twice, and no name that is another pair's id (a disk is found by id first). */
#define DISK_NAMES_MAX 256
typedef enum DiskNamesProblem {
        DISK_NAMES_OK,
        DISK_NAMES_TOO_MANY,
        DISK_NAMES_BAD_ID,
        DISK_NAMES_BAD_NAME,
        DISK_NAMES_DUPLICATE_ID,
        DISK_NAMES_DUPLICATE_NAME,
        DISK_NAMES_NAME_IS_ID,
} DiskNamesProblem;
/* *ret_index: the pair at fault (its id at l[2 * index]). */
DiskNamesProblem disk_names_check(char *const *l, size_t *ret_index);
/* Why, as a sentence. */
const char *disk_names_problem_to_string(DiskNamesProblem p);
/* The name given to qdev id (NULL: none); the qdev id named name (NULL: none). */
const char *disk_names_name_of(char *const *l, const char *id);
const char *disk_names_id_of(char *const *l, const char *name);
/* A QEMU identifier (job id, qdev id, export id, a node name given to it): a letter, then
 * [A-Za-z0-9._-], at most 128 characters. */
bool qemu_id_is_valid(const char *s);
/* A node name as QEMU reports it: an identifier, or one QEMU made up itself ("#block123"). */
bool qemu_node_name_is_valid(const char *s);
/* A token bucket: rate tokens a second, at most burst; full when first refilled. */
typedef struct TokenBucket {
        double tokens;
        usec_t at; /* CLOCK_MONOTONIC of the last refill, 0: never */
} TokenBucket;
void token_bucket_refill(TokenBucket *b, double rate, double burst, usec_t now);

/* Log lines let through at rate a second after a burst, the others counted: a source of them
 * (a QEMU, a helper) cannot push the daemon past journald's rate limit, which would drop all its
 * messages. true: log this one, and *ret_dropped how many were not since the last that was. */
typedef struct LogLimit {
        TokenBucket bucket;
        uint64_t dropped;
} LogLimit;
bool log_limit_pass(LogLimit *l, double rate, double burst, usec_t now, uint64_t *ret_dropped);
/* The first, then at most one a minute: log_limit_pass() at 1/60 a second, a burst of one. */
bool log_limit_minutely(LogLimit *l, usec_t now, uint64_t *ret_dropped);

/* in as it is, but for its control characters (C0, DEL, and C1 as UTF-8), written as \xNN: text
 * from QEMU, a helper or a client, safe on a terminal and on one line. Cut to fit size (at least
 * 1); 4 x strlen(in) + 1 holds all of it. */
void escape_controls(const char *in, char *out, size_t size);
/* A user or a group has uid (as a gid): not ours to give a sandbox. */
bool uid_is_account(uid_t uid);
/* An absolute, normalized path without "..", "//", control characters, of bounded length. */
bool path_is_safe_absolute(const char *p, size_t max_len);
/* Is path inside (or equal to) directory dir? Both must be normalized absolute paths. */
bool path_is_below(const char *path, const char *dir);

/* Strict UTF-8 (RFC 3629: no overlong forms, no surrogates, nothing past U+10FFFF), fed in
 * pieces: a character may be split across calls. */
typedef struct Utf8State {
        uint8_t need;   /* continuation bytes still expected */
        uint8_t lo, hi; /* allowed range of the next one */
        uint32_t cp;    /* the code point so far */
} Utf8State;
bool utf8_feed(Utf8State *s, const void *buf, size_t len);
bool utf8_is_valid(const char *s);

/* Text from a peer we do not trust (a helper, QEMU, a state file) made fit for D-Bus, logs and
 * terminals, where it enters the daemon: valid UTF-8 (each byte that does not start a valid
 * sequence becomes U+FFFD), no control character (C0, DEL, C1: each becomes a space), no NUL (len
 * bytes are read, a NUL among them ends the text), and at most max bytes, cut at a character
 * boundary. text_sanitize_buf() writes into dst of size bytes (max = size - 1) and returns the
 * length; text_sanitize() returns a new string (NULL on OOM). */
#define TEXT_SANITIZE_MAX 512
size_t text_sanitize_buf(char *dst, size_t size, const char *src, size_t len);
char *text_sanitize(const char *src, size_t len, size_t max);
static inline char *text_sanitize_str(const char *src) {
        return text_sanitize(strempty(src), strlen(strempty(src)), TEXT_SANITIZE_MAX);
}

/* Sizes: decimal integer with an optional suffix, no spaces. K M G T P E and Ki Mi … and
 * KiB MiB … are powers of 1024; KB MB GB TB PB EB powers of 1000; B or none is bytes. A
 * fractional part ("1.5G") is allowed with a suffix. -ERANGE on overflow, -EINVAL otherwise. */
int parse_size(const char *s, uint64_t *ret);
/* "1.5 GiB", "512 B". */
char *format_bytes(char *buf, size_t len, uint64_t n);
#define FORMAT_BYTES_MAX 32

/* Checked arithmetic. */
static inline bool add_overflows_u64(uint64_t a, uint64_t b, uint64_t *sum) {
        return __builtin_add_overflow(a, b, sum);
}

usec_t now_usec(int clock_id);
/* Not for secrets: getrandom() without blocking, the clock where that fails. */
uint32_t random_u32(void);

/* printf into a fresh string; NULL on OOM. */
char *strdup_printf(const char *format, ...) _printf_(1, 2);

/* Write all, retrying on EINTR; -errno on failure. */
int loop_write(int fd, const void *buf, size_t len);

/* Connect to a unix stream socket without ever waiting: a listener whose owner stops accepting
 * fills its backlog, and a blocking connect() would then wait for it forever. Returns the
 * connected fd (blocking, close-on-exec), -EAGAIN while the backlog is full, or -errno. */
int connect_unix_nonblock(const char *path);

/* Write a file atomically: temp file in the same directory, fsync, rename, fsync dir. */
int write_file_atomic(const char *path, const void *data, size_t len, mode_t mode);
/* unlink(path), and its directory synced: gone for good once it returns 0 (also if it was not there). */
int unlink_durable(const char *path);

/* Read up to len bytes (at offset off with pread(), or from the file position if off < 0), retrying
 * on EINTR; fewer only at the end of the file. The count, or -errno. */
ssize_t loop_read(int fd, void *buf, size_t len, int64_t off);

/* Read a whole regular file of at most max bytes; NUL-terminated. */
int read_file_bounded(const char *path, size_t max, char **ret, size_t *ret_len);

/* Create a directory and its parents (mode for the ones created). */
int mkdir_p(const char *path, mode_t mode);
/* A small file of /proc (status, fdinfo/N) below dir_fd, read with one read() into buf (size bytes
 * with the NUL that ends it; what does not fit is left out): its length, or -errno. */
ssize_t read_small_at(int dir_fd, const char *name, char *buf, size_t size);
