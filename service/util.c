/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <ctype.h>
#include <grp.h>
#include <inttypes.h>
#include <fcntl.h>
#include <limits.h>
#include <locale.h>
#include <math.h>
#include <pwd.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>

#include "util.h"

char **strv_free(char **l) {
        if (!l)
                return NULL;
        for (char **i = l; *i; i++)
                free(*i);
        free(l);
        return NULL;
}

size_t strv_length(char *const *l) {
        size_t n = 0;
        if (l)
                while (l[n])
                        n++;
        return n;
}

int strv_push(char ***l, char *value) {
        size_t n = strv_length(*l);
        char **c;

        if (!value)
                return -EINVAL;
        c = reallocarray(*l, n + 2, sizeof(char *));
        if (!c) {
                free(value);
                return -ENOMEM;
        }
        c[n] = value;
        c[n + 1] = NULL;
        *l = c;
        return 0;
}

char **strv_copy(char *const *l) {
        size_t n = strv_length(l);
        char **c = calloc(n + 1, sizeof(char *));

        if (!c)
                return NULL;
        for (size_t i = 0; i < n; i++) {
                c[i] = strdup(l[i]);
                if (!c[i])
                        return strv_free(c);
        }
        return c;
}

bool strv_equal(char *const *a, char *const *b) {
        size_t n = strv_length(a);

        if (n != strv_length(b))
                return false;
        for (size_t i = 0; i < n; i++)
                if (!streq(a[i], b[i]))
                        return false;
        return true;
}

bool strv_contains(char *const *l, const char *s) {
        if (l)
                for (char *const *i = l; *i; i++)
                        if (streq(*i, s))
                                return true;
        return false;
}

/* json-c 0.16's json_tokener_parse_ex() switches LC_NUMERIC to "C" around every call:
 * duplocale(uselocale(NULL)), newlocale(), uselocale(), freelocale(). On the global locale that is
 * a copy of it under glibc's global locale lock and three allocations per call, i.e. per QMP
 * message, or per byte of a QEMU that writes one byte at a time. On glibc's static "C" object all
 * four return at once. We never call setlocale(), so the global locale is "C" already and using
 * the "C" object for this thread changes nothing but that cost. */
int locale_use_c(void) {
        locale_t c;

        c = newlocale(LC_ALL_MASK, "C", (locale_t) 0);
        if (!c)
                return -errno;
        if (!uselocale(c)) {
                int r = -errno;

                freelocale(c);
                return r;
        }
        return 0;
}

/* Logging */

static const char *log_ident = "blockstream";
static int log_max_level = LOG_LEVEL_INFO;
static bool log_prefix_prio;

void log_setup(const char *ident) {
        const char *e;

        log_ident = ident;
        /* Under systemd stderr is the journal: prefix priorities instead of decorating. */
        log_prefix_prio = !!getenv("JOURNAL_STREAM");
        e = getenv("BLOCKSTREAM_LOG_LEVEL");
        if (e) {
                if (streq(e, "debug"))
                        log_max_level = LOG_LEVEL_DEBUG;
                else if (streq(e, "info"))
                        log_max_level = LOG_LEVEL_INFO;
                else if (streq(e, "notice"))
                        log_max_level = LOG_LEVEL_NOTICE;
                else if (streq(e, "warning"))
                        log_max_level = LOG_LEVEL_WARNING;
                else if (streq(e, "err"))
                        log_max_level = LOG_LEVEL_ERR;
        }
}

void log_set_max_level(int level) {
        log_max_level = level;
}

int log_get_max_level(void) {
        return log_max_level;
}

void token_bucket_refill(TokenBucket *b, double rate, double burst, usec_t now) {
        if (b->at == 0)
                b->tokens = burst;
        else
                b->tokens = MIN(burst, b->tokens + (double) (now - b->at) * rate / (double) USEC_PER_SEC);
        b->at = now;
}

bool log_limit_pass(LogLimit *l, double rate, double burst, usec_t now, uint64_t *ret_dropped) {
        token_bucket_refill(&l->bucket, rate, burst, now);
        if (l->bucket.tokens < 1.0) {
                l->dropped++;
                return false;
        }
        l->bucket.tokens -= 1.0;
        *ret_dropped = l->dropped;
        l->dropped = 0;
        return true;
}

bool log_limit_minutely(LogLimit *l, usec_t now, uint64_t *ret_dropped) {
        return log_limit_pass(l, 1.0 / 60, 1.0, now, ret_dropped);
}

void escape_controls(const char *in, char *out, size_t size) {
        size_t n = 0;

        for (const unsigned char *p = (const unsigned char *) in; *p; p++) {
                bool c1 = p[0] == 0xc2 && p[1] >= 0x80 && p[1] <= 0x9f;

                if (*p >= 0x20 && *p != 0x7f && !c1) {
                        if (n + 1 >= size)
                                break;
                        out[n++] = (char) *p;
                        continue;
                }
                if (n + 4 * (c1 ? 2 : 1) >= size)
                        break;
                n += (size_t) snprintf(out + n, size - n, "\\x%02x", *p);
                if (c1)
                        n += (size_t) snprintf(out + n, size - n, "\\x%02x", *++p);
        }
        out[n] = 0;
}

int log_internal(int level, int error, const char *format, ...) {
        char buf[2048], line[4 * sizeof(buf)];
        va_list ap;
        int saved = errno;

        error = abs(error);
        if (level > log_max_level)
                return -error;

        errno = error;
        va_start(ap, format);
        vsnprintf(buf, sizeof(buf), format, ap);
        va_end(ap);
        /* One message, one line: messages carry names from QEMU, helpers and clients, and a
         * newline would start a record of its own in the journal, with the priority a "<N>"
         * after it says; an escape sequence would act on the terminal of whoever reads the log. */
        escape_controls(buf, line, sizeof(line));

        if (log_prefix_prio)
                fprintf(stderr, "<%d>%s\n", level, line);
        else
                fprintf(stderr, "%s: %s\n", log_ident, line);

        errno = saved;
        return -error;
}

/* Names */

bool guest_name_is_valid(const char *s) {
        size_t n;

        if (!s)
                return false;
        n = strlen(s);
        if (n < 1 || n > GUEST_NAME_MAX)
                return false;
        /* The name is a path component (state file, runtime directory bind-mounted into the
         * guest's sandboxes): "." and ".." would name the parent or the directory itself. */
        if (streq(s, ".") || streq(s, ".."))
                return false;
        for (const char *p = s; *p; p++)
                if (!(isascii((unsigned char) *p) && (isalnum((unsigned char) *p) || strchr("_.-", *p))))
                        return false;
        return true;
}

DiskNamesProblem disk_names_check(char *const *l, size_t *ret_index) {
        size_t n = 0;

        for (char *const *p = l; p && p[0]; p += 2) {
                *ret_index = n;
                if (!p[1]) /* an odd list: the last id has no name */
                        return DISK_NAMES_BAD_NAME;
                if (++n > DISK_NAMES_MAX)
                        return DISK_NAMES_TOO_MANY;
        }
        for (size_t i = 0; i < n; i++) {
                const char *id = l[2 * i], *name = l[2 * i + 1];

                *ret_index = i;
                if (!qemu_id_is_valid(id))
                        return DISK_NAMES_BAD_ID;
                if (!guest_name_is_valid(name))
                        return DISK_NAMES_BAD_NAME;
                for (size_t j = 0; j < i; j++) {
                        if (streq(l[2 * j], id))
                                return DISK_NAMES_DUPLICATE_ID;
                        if (streq(l[2 * j + 1], name))
                                return DISK_NAMES_DUPLICATE_NAME;
                }
                for (size_t j = 0; j < n; j++)
                        if (j != i && streq(l[2 * j], name))
                                return DISK_NAMES_NAME_IS_ID;
        }
        return DISK_NAMES_OK;
}

const char *disk_names_problem_to_string(DiskNamesProblem p) {
        static const char *const table[] = {
                [DISK_NAMES_OK] = "valid.",
                [DISK_NAMES_TOO_MANY] = "too many disks are named.",
                [DISK_NAMES_BAD_ID] = "a disk alias is a letter, then at most 127 letters, digits, '-', '.', '_'.",
                [DISK_NAMES_BAD_NAME] = "a disk's name is 1 to 64 of A-Z a-z 0-9 _ . -, and not . or ..",
                [DISK_NAMES_DUPLICATE_ID] = "that disk is named twice.",
                [DISK_NAMES_DUPLICATE_NAME] = "that name is given to two disks.",
                [DISK_NAMES_NAME_IS_ID] = "that name is another disk's alias.",
        };
        return p >= 0 && (size_t) p < ELEMENTSOF(table) ? table[p] : "invalid.";
}

const char *disk_names_name_of(char *const *l, const char *id) {
        for (char *const *p = l; id && p && p[0] && p[1]; p += 2)
                if (streq(p[0], id))
                        return p[1];
        return NULL;
}

const char *disk_names_id_of(char *const *l, const char *name) {
        for (char *const *p = l; name && p && p[0] && p[1]; p += 2)
                if (streq(p[1], name))
                        return p[0];
        return NULL;
}

bool qemu_id_is_valid(const char *s) {
        if (!s || !isascii((unsigned char) s[0]) || !isalpha((unsigned char) s[0]))
                return false;
        if (strlen(s) > 128)
                return false;
        for (const char *p = s; *p; p++)
                if (!(isascii((unsigned char) *p) && (isalnum((unsigned char) *p) || strchr("_.-", *p))))
                        return false;
        return true;
}

bool qemu_node_name_is_valid(const char *s) {
        return qemu_id_is_valid(s && s[0] == '#' ? s + 1 : s);
}

bool uid_is_account(uid_t uid) {
        struct passwd pw, *pwr = NULL;
        struct group gr, *grr = NULL;
        char buf[4096];

        return (getpwuid_r(uid, &pw, buf, sizeof(buf), &pwr) == 0 && pwr) ||
               (getgrgid_r((gid_t) uid, &gr, buf, sizeof(buf), &grr) == 0 && grr);
}

bool path_is_safe_absolute(const char *p, size_t max_len) {
        size_t n;

        if (!p || p[0] != '/')
                return false;
        n = strlen(p);
        if (n > max_len || n > PATH_MAX - 1)
                return false;
        for (const char *c = p; *c; c++)
                if ((unsigned char) *c < 0x20 || *c == 0x7f)
                        return false;
        if (strstr(p, "//"))
                return false;
        if (n > 1 && p[n - 1] == '/')
                return false;
        /* No "." or ".." components. */
        for (const char *c = p; c; c = strchr(c + 1, '/')) {
                const char *comp = c + 1;
                size_t l = strcspn(comp, "/");
                if ((l == 1 && comp[0] == '.') || (l == 2 && comp[0] == '.' && comp[1] == '.'))
                        return false;
        }
        return true;
}

bool path_is_below(const char *path, const char *dir) {
        size_t n = strlen(dir);

        if (streq(dir, "/"))
                return path[0] == '/';
        if (strncmp(path, dir, n) != 0)
                return false;
        return path[n] == '/' || path[n] == 0;
}

/* UTF-8 */

/* What sd-bus refuses in a string besides broken UTF-8: the noncharacters U+FDD0..U+FDEF and
 * U+xxFFFE, U+xxFFFF (systemd's unichar_is_valid()). One string it refuses fails the whole
 * GetManagedObjects, for every client. */
static bool unichar_is_noncharacter(uint32_t cp) {
        return (cp >= 0xFDD0 && cp <= 0xFDEF) || (cp & 0xFFFE) == 0xFFFE;
}

bool utf8_feed(Utf8State *s, const void *buf, size_t len) {
        const uint8_t *p = buf;

        for (size_t i = 0; i < len; i++) {
                uint8_t c = p[i];

                if (s->need > 0) {
                        if (c < s->lo || c > s->hi)
                                return false;
                        s->cp = s->cp << 6 | (c & 0x3F);
                        s->need--;
                        s->lo = 0x80;
                        s->hi = 0xBF;
                        if (s->need == 0 && unichar_is_noncharacter(s->cp))
                                return false;
                        continue;
                }
                if (c < 0x80)
                        continue;
                s->lo = 0x80;
                s->hi = 0xBF;
                s->cp = c & (c >= 0xF0 ? 0x07 : c >= 0xE0 ? 0x0F : 0x1F);
                if (c >= 0xC2 && c <= 0xDF)
                        s->need = 1;
                else if (c == 0xE0) {
                        s->need = 2;
                        s->lo = 0xA0; /* no overlong forms */
                } else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF)
                        s->need = 2;
                else if (c == 0xED) {
                        s->need = 2;
                        s->hi = 0x9F; /* no UTF-16 surrogates */
                } else if (c == 0xF0) {
                        s->need = 3;
                        s->lo = 0x90;
                } else if (c >= 0xF1 && c <= 0xF3)
                        s->need = 3;
                else if (c == 0xF4) {
                        s->need = 3;
                        s->hi = 0x8F; /* nothing past U+10FFFF */
                } else
                        return false;
        }
        return true;
}

bool utf8_is_valid(const char *str) {
        Utf8State s = {};

        return utf8_feed(&s, str, strlen(str)) && s.need == 0;
}

/* The length of the valid UTF-8 sequence at p (at most n bytes available), 0 if none starts there. */
static size_t utf8_sequence_length(const uint8_t *p, size_t n) {
        Utf8State s = {};

        if (n == 0 || !utf8_feed(&s, p, 1))
                return 0;
        for (size_t i = 1; s.need > 0; i++) {
                if (i >= n || !utf8_feed(&s, p + i, 1))
                        return 0;
                if (s.need == 0)
                        return i + 1;
        }
        return 1;
}

size_t text_sanitize_buf(char *dst, size_t size, const char *src, size_t len) {
        static const char replacement[] = "\xEF\xBF\xBD"; /* U+FFFD */
        const uint8_t *p = (const uint8_t *) src;
        size_t n = 0;

        if (size == 0)
                return 0;
        if (!src)
                len = 0;
        for (size_t i = 0; i < len && p[i] != 0;) {
                size_t k = utf8_sequence_length(p + i, len - i);
                const char *out = (const char *) p + i;
                size_t out_len = k;

                if (k == 0) {
                        out = replacement;
                        out_len = sizeof(replacement) - 1;
                        k = 1;
                } else if (k == 1 && (p[i] < 0x20 || p[i] == 0x7F)) {
                        out = " ";
                } else if (k == 2 && p[i] == 0xC2 && p[i + 1] < 0xA0) {
                        /* C1 controls, U+0080..U+009F: CSI and friends for some terminals. */
                        out = " ";
                        out_len = 1;
                }
                if (n + out_len > size - 1)
                        break;
                memcpy(dst + n, out, out_len);
                n += out_len;
                i += k;
        }
        dst[n] = 0;
        return n;
}

char *text_sanitize(const char *src, size_t len, size_t max) {
        _cleanup_free_ char *buf = NULL;

        if (max >= SIZE_MAX)
                return NULL;
        buf = malloc(max + 1);
        if (!buf)
                return NULL;
        (void) text_sanitize_buf(buf, max + 1, src, len);
        return TAKE_PTR(buf);
}

/* Sizes */

int parse_size(const char *s, uint64_t *ret) {
        static const struct {
                const char *suffix;
                uint64_t factor;
        } table[] = {
                { "B", 1ULL },
                { "K", 1ULL << 10 }, { "Ki", 1ULL << 10 }, { "KiB", 1ULL << 10 }, { "KB", 1000ULL },
                { "M", 1ULL << 20 }, { "Mi", 1ULL << 20 }, { "MiB", 1ULL << 20 }, { "MB", 1000000ULL },
                { "G", 1ULL << 30 }, { "Gi", 1ULL << 30 }, { "GiB", 1ULL << 30 }, { "GB", 1000000000ULL },
                { "T", 1ULL << 40 }, { "Ti", 1ULL << 40 }, { "TiB", 1ULL << 40 }, { "TB", 1000000000000ULL },
                { "P", 1ULL << 50 }, { "Pi", 1ULL << 50 }, { "PiB", 1ULL << 50 }, { "PB", 1000000000000000ULL },
                { "E", 1ULL << 60 }, { "Ei", 1ULL << 60 }, { "EiB", 1ULL << 60 }, { "EB", 1000000000000000000ULL },
        };
        uint64_t whole = 0, factor = 1, frac_num = 0, frac_den = 1, result;
        const char *p = s;
        bool have_digits = false, have_frac = false;

        if (!s)
                return -EINVAL;
        if (!isdigit((unsigned char) *p))
                return -EINVAL; /* no sign, no empty string */
        for (; isdigit((unsigned char) *p); p++) {
                have_digits = true;
                if (__builtin_mul_overflow(whole, 10, &whole) || __builtin_add_overflow(whole, (uint64_t) (*p - '0'), &whole))
                        return -ERANGE;
        }
        if (*p == '.') {
                p++;
                for (; isdigit((unsigned char) *p); p++) {
                        have_frac = true;
                        if (frac_den >= 1000000000000ULL)
                                continue; /* ignore digits beyond 12 places */
                        frac_num = frac_num * 10 + (uint64_t) (*p - '0');
                        frac_den *= 10;
                }
                if (!have_frac)
                        return -EINVAL;
        }
        if (!have_digits)
                return -EINVAL;
        if (*p) {
                size_t i;
                for (i = 0; i < ELEMENTSOF(table); i++)
                        if (streq(p, table[i].suffix))
                                break;
                if (i >= ELEMENTSOF(table))
                        return -EINVAL;
                factor = table[i].factor;
        } else if (have_frac)
                return -EINVAL; /* "1.5" bytes makes no sense */

        if (__builtin_mul_overflow(whole, factor, &result))
                return -ERANGE;
        if (frac_num > 0) {
                /* frac_num/frac_den * factor, without overflowing: factor ≤ 2^60, frac_den ≤ 10^12. */
                long double f = (long double) frac_num / (long double) frac_den * (long double) factor;
                if (__builtin_add_overflow(result, (uint64_t) f, &result))
                        return -ERANGE;
        }
        *ret = result;
        return 0;
}

char *format_bytes(char *buf, size_t len, uint64_t n) {
        static const char *units[] = { "B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB" };
        size_t i = 0;
        long double v = (long double) n;

        /* 1023.96 KiB would print as "1024.0 KiB": move up a unit before rounding does. */
        while (v >= 1023.95L && i < ELEMENTSOF(units) - 1) {
                v /= 1024.0L;
                i++;
        }
        if (i == 0)
                snprintf(buf, len, "%" PRIu64 " B", n);
        else
                snprintf(buf, len, "%.1Lf %s", v, units[i]);
        return buf;
}

usec_t now_usec(int clock_id) {
        struct timespec ts;

        if (clock_gettime(clock_id, &ts) < 0)
                abort(); /* cannot happen for the clocks we use */
        return (usec_t) ts.tv_sec * USEC_PER_SEC + (usec_t) ts.tv_nsec / 1000;
}

char *strdup_printf(const char *format, ...) {
        va_list ap;
        char *s;
        int r;

        va_start(ap, format);
        r = vasprintf(&s, format, ap);
        va_end(ap);
        return r < 0 ? NULL : s;
}

int loop_write(int fd, const void *buf, size_t len) {
        const uint8_t *p = buf;

        while (len > 0) {
                ssize_t k = write(fd, p, len);
                if (k < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                if (k == 0)
                        return -EIO;
                p += k;
                len -= (size_t) k;
        }
        return 0;
}

int connect_unix_nonblock(const char *path) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        _cleanup_close_ int fd = -1;
        int flags;

        if (!path || strlen(path) >= sizeof(sa.sun_path))
                return -ENAMETOOLONG;
        strcpy(sa.sun_path, path);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0)
                return -errno;
        if (connect(fd, (struct sockaddr *) &sa, sizeof(sa)) < 0)
                /* AF_UNIX either queues the connection at once or says EAGAIN (the backlog is
                 * full); EINPROGRESS would be a wait all the same. */
                return errno == EINPROGRESS ? -EAGAIN : -errno;
        /* Handed over as a plain blocking socket, as before. */
        flags = fcntl(fd, F_GETFL);
        if (flags < 0 || fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) < 0)
                return -errno;
        return TAKE_FD(fd);
}

/* path's directory, in a new string. */
static int dir_of(const char *path, char **ret) {
        char *dir = strdup(path), *slash;

        if (!dir)
                return -ENOMEM;
        slash = strrchr(dir, '/');
        if (!slash) {
                free(dir);
                return -EINVAL;
        }
        if (slash == dir)
                slash[1] = 0;
        else
                *slash = 0;
        *ret = dir;
        return 0;
}

static int fsync_dir(const char *dir) {
        _cleanup_close_ int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);

        if (dfd < 0 || fsync(dfd) < 0)
                return -errno;
        return 0;
}

int unlink_durable(const char *path) {
        _cleanup_free_ char *dir = NULL;
        int r;

        r = dir_of(path, &dir);
        if (r < 0)
                return r;
        /* Gone already is synced too: an earlier try may have unlinked it and failed to sync. */
        if (unlink(path) < 0 && errno != ENOENT)
                return -errno;
        /* The removal is on disk only with the directory: a record that comes back after a crash
         * would bring back what the caller was told is gone. No directory: nothing was there. */
        r = fsync_dir(dir);
        return r == -ENOENT ? 0 : r;
}

int write_file_atomic(const char *path, const void *data, size_t len, mode_t mode) {
        _cleanup_free_ char *tmp = NULL, *dir = NULL;
        _cleanup_close_ int fd = -1;
        int r;

        tmp = strdup_printf("%s.tmpXXXXXX", path);
        if (!tmp)
                return -ENOMEM;
        r = dir_of(path, &dir);
        if (r < 0)
                return r;

        fd = mkostemp(tmp, O_CLOEXEC);
        if (fd < 0)
                return -errno;
        if (fchmod(fd, mode) < 0) {
                r = -errno;
                goto fail;
        }
        r = loop_write(fd, data, len);
        if (r < 0)
                goto fail;
        if (fsync(fd) < 0) {
                r = -errno;
                goto fail;
        }
        if (rename(tmp, path) < 0) {
                r = -errno;
                goto fail;
        }
        /* The rename is on disk only with the directory: a caller told otherwise may write again. */
        return fsync_dir(dir);

fail:
        (void) unlink(tmp);
        return r;
}

ssize_t loop_read(int fd, void *buf, size_t len, int64_t off) {
        size_t done = 0;

        while (done < len) {
                ssize_t k = off < 0 ? read(fd, (uint8_t *) buf + done, len - done)
                                    : pread(fd, (uint8_t *) buf + done, len - done, (off_t) ((uint64_t) off + done));
                if (k < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                if (k == 0)
                        break;
                done += (size_t) k;
        }
        return (ssize_t) done;
}

int read_file_bounded(const char *path, size_t max, char **ret, size_t *ret_len) {
        _cleanup_close_ int fd = -1;
        _cleanup_free_ char *buf = NULL;
        struct stat st;
        ssize_t k;
        size_t n;

        fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY);
        if (fd < 0)
                return -errno;
        if (fstat(fd, &st) < 0)
                return -errno;
        if (!S_ISREG(st.st_mode))
                return -EBADF;
        if ((uint64_t) st.st_size > max)
                return -EFBIG;
        buf = malloc(max + 1);
        if (!buf)
                return -ENOMEM;
        k = loop_read(fd, buf, max + 1, -1);
        if (k < 0)
                return (int) k;
        n = (size_t) k;
        if (n > max)
                return -EFBIG;
        buf[n] = 0;
        *ret = TAKE_PTR(buf);
        if (ret_len)
                *ret_len = n;
        return 0;
}

int mkdir_p(const char *path, mode_t mode) {
        _cleanup_free_ char *p = strdup(path);

        if (!p)
                return -ENOMEM;
        for (char *s = p + 1; *s; s++) {
                if (*s != '/')
                        continue;
                *s = 0;
                if (mkdir(p, mode) < 0 && errno != EEXIST)
                        return -errno;
                *s = '/';
        }
        if (mkdir(p, mode) < 0 && errno != EEXIST)
                return -errno;
        return 0;
}

uint32_t random_u32(void) {
        uint32_t v;

        if (getrandom(&v, sizeof(v), GRND_NONBLOCK) == (ssize_t) sizeof(v))
                return v;
        return (uint32_t) now_usec(CLOCK_MONOTONIC) ^ (uint32_t) now_usec(CLOCK_REALTIME);
}

ssize_t read_small_at(int dir_fd, const char *name, char *buf, size_t size) {
        _cleanup_close_ int fd = -EBADF;
        ssize_t n;

        if (size == 0)
                return -EINVAL;
        fd = openat(dir_fd, name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        if (fd < 0)
                return -errno;
        n = read(fd, buf, size - 1);
        if (n < 0)
                return -errno;
        buf[n] = 0;
        return n;
}
