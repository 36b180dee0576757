/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <stdarg.h>

#include "args.h"

bool arg_json = false;
const char *arg_host = NULL;
bool arg_ask_password = true;
bool arg_quiet = false;
unsigned arg_given = 0; /* OPT_* of the command-specific options seen */
const char *arg_owner = NULL;
const char *arg_uuid = NULL;
char **arg_disks = NULL; /* "ALIAS=PATH" */
char **arg_disk_names = NULL; /* "ALIAS=NAME" */
uint64_t arg_bandwidth = 0;
uint64_t arg_max_guest_latency = 0;
const char *arg_base = NULL;
const char *arg_engine = NULL;
uint64_t arg_offset = 0;
uint64_t arg_length = 0;
bool arg_wait = false;
const char *arg_listen = NULL;
const char *arg_template_format = NULL;
bool arg_cache = false;

/* Verbs return <0 (-errno, already logged) for exit status 1, or the exit status itself. */
_printf_(1, 2) int usage_error(const char *format, ...) {
        char buf[1024];
        va_list ap;

        va_start(ap, format);
        vsnprintf(buf, sizeof(buf), format, ap);
        va_end(ap);
        log_error("%s", buf);
        return EXIT_USAGE;
}

bool is_remote(void) {
        /* Local file names and user names mean nothing on another host. */
        return arg_host != NULL;
}

/* The daemon resolves paths in its own file system: turn a local relative name into an
 * absolute one, lexically ("a/../b" → "b"; symlinks are the daemon's business). */
int path_make_absolute(const char *p, char **ret) {
        _cleanup_free_ char *cwd = NULL, *joined = NULL, *out = NULL;
        size_t n = 0;

        if (p[0] == '/')
                joined = strdup(p);
        else {
                cwd = get_current_dir_name();
                if (!cwd)
                        return -errno;
                joined = strdup_printf("%s/%s", cwd, p);
        }
        if (!joined)
                return -ENOMEM;
        out = malloc(strlen(joined) + 2);
        if (!out)
                return -ENOMEM;

        for (char *s = joined, *e; *s; s = e) {
                size_t l;

                while (*s == '/')
                        s++;
                l = strcspn(s, "/");
                e = s + l;
                if (l == 0 || (l == 1 && s[0] == '.'))
                        continue;
                if (l == 2 && s[0] == '.' && s[1] == '.') {
                        while (n > 0 && out[n - 1] != '/')
                                n--;
                        if (n > 0)
                                n--; /* the slash */
                        continue;
                }
                out[n++] = '/';
                memcpy(out + n, s, l);
                n += l;
        }
        if (n == 0)
                out[n++] = '/';
        out[n] = 0;
        *ret = TAKE_PTR(out);
        return 0;
}

/* Paths given on the command line travel to the daemon as they are with --host. */
int local_path_arg(const char *p, char **ret) {
        char *c;
        int r;

        if (is_remote()) {
                c = strdup(p);
                if (!c)
                        return log_oom();
                *ret = c;
                return 0;
        }
        r = path_make_absolute(p, ret);
        if (r < 0)
                return log_error_errno(r, "Failed to make '%s' absolute: %m", p);
        return 0;
}

int check_guest_name(const char *name) {
        if (!guest_name_is_valid(name))
                return usage_error(
                        "Invalid guest name '%s': use 1 to %d characters of A-Z a-z 0-9 _ . -", name, GUEST_NAME_MAX);
        return 0;
}

/* Before connecting, so that wrong usage always exits 2. */
int check_disk_args(char **args) {
        int r;

        r = check_guest_name(args[0]);
        if (r != 0)
                return r;
        if (isempty(args[1]))
                return usage_error("The disk must not be empty: give its alias (vda) or image path.");
        return 0;
}

int parse_latency(const char *s, uint64_t *ret) {
        static const struct {
                const char *suffix;
                uint64_t usec;
        } units[] = {
                {"us", 1},
                {"ms", 1000},
                {"s", 1000000},
                {"", 1},
        };
        uint64_t whole = 0, frac = 0, frac_div = 1;
        const char *p = s;

        if (streq(s, "off")) {
                *ret = 0;
                return 0;
        }
        if (*p < '0' || *p > '9')
                return -EINVAL;
        for (; *p >= '0' && *p <= '9'; p++) {
                if (whole > (UINT64_MAX - 9) / 10)
                        return -ERANGE;
                whole = whole * 10 + (uint64_t) (*p - '0');
        }
        if (*p == '.') {
                p++;
                if (*p < '0' || *p > '9')
                        return -EINVAL;
                for (; *p >= '0' && *p <= '9'; p++)
                        if (frac_div < 1000000) { /* finer than 1 µs in seconds means nothing */
                                frac = frac * 10 + (uint64_t) (*p - '0');
                                frac_div *= 10;
                        }
        }
        for (size_t i = 0; i < ELEMENTSOF(units); i++)
                if (streq(p, units[i].suffix)) {
                        if (whole > UINT64_MAX / units[i].usec)
                                return -ERANGE;
                        *ret = whole * units[i].usec + frac * units[i].usec / frac_div;
                        return 0;
                }
        return -EINVAL;
}

int parse_bandwidth(const char *s, uint64_t *ret) {
        _cleanup_free_ char *c = NULL;
        size_t n = strlen(s);

        if (streq(s, "unlimited") || streq(s, "infinity")) {
                *ret = 0;
                return 0;
        }
        c = strdup(s);
        if (!c)
                return -ENOMEM;
        if (n >= 2 && streq(c + n - 2, "/s"))
                c[n - 2] = 0;
        return parse_size(c, ret);
}
