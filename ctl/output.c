/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <inttypes.h>
#include <langinfo.h>
#include <stdarg.h>
#include <sys/ioctl.h>
#include <time.h>

#include "output.h"

const char *yes_no(bool b) {
        return b ? "yes" : "no";
}

char *format_timespan(char *buf, size_t len, usec_t t) {
        uint64_t s = (t + USEC_PER_SEC / 2) / USEC_PER_SEC;
        uint64_t d = s / 86400, h = s / 3600 % 24, m = s / 60 % 60;

        s %= 60;
        if (d > 0)
                snprintf(buf, len, "%" PRIu64 "d %" PRIu64 "h %" PRIu64 "min", d, h, m);
        else if (h > 0)
                snprintf(buf, len, "%" PRIu64 "h %" PRIu64 "min %" PRIu64 "s", h, m, s);
        else if (m > 0)
                snprintf(buf, len, "%" PRIu64 "min %" PRIu64 "s", m, s);
        else
                snprintf(buf, len, "%" PRIu64 "s", s);
        return buf;
}

char *format_latency(char *buf, size_t len, uint64_t usec) {
        if (usec < 1000)
                snprintf(buf, len, "%" PRIu64 "us", usec);
        else if (usec < USEC_PER_SEC)
                snprintf(buf, len, "%" PRIu64 ".%" PRIu64 "ms", usec / 1000, usec % 1000 / 100);
        else
                snprintf(buf, len, "%" PRIu64 ".%" PRIu64 "s", usec / USEC_PER_SEC, usec % USEC_PER_SEC / 100000);
        return buf;
}

char *format_timestamp(char *buf, size_t len, usec_t t) {
        time_t sec = (time_t) (t / USEC_PER_SEC);
        struct tm tm;

        if (!localtime_r(&sec, &tm) || strftime(buf, len, "%a %Y-%m-%d %H:%M:%S %Z", &tm) == 0)
                snprintf(buf, len, "@%" PRIu64, (uint64_t) (t / USEC_PER_SEC));
        return buf;
}

/* "1.5 GiB/s" or "unlimited". */
char *format_rate(char *buf, size_t len, uint64_t bytes_per_second, const char *zero) {
        char b[FORMAT_BYTES_MAX];

        if (bytes_per_second == 0 && zero)
                snprintf(buf, len, "%s", zero);
        else
                snprintf(buf, len, "%s/s", format_bytes(b, sizeof(b), bytes_per_second));
        return buf;
}

unsigned percent(uint64_t done, uint64_t total) {
        if (total == 0)
                return 0;
        if (done >= total)
                return 100;
        return (unsigned) ((long double) done * 100.0L / (long double) total);
}

bool colors_enabled(void) {
        const char *term = getenv("TERM");

        return isatty(STDOUT_FILENO) && !getenv("NO_COLOR") && !streq_ptr(term, "dumb");
}

bool utf8_enabled(void) {
        const char *cs = nl_langinfo(CODESET);

        return cs && streq(cs, "UTF-8");
}

unsigned terminal_columns(int fd) {
        struct winsize ws = {};

        if (ioctl(fd, TIOCGWINSZ, &ws) < 0 || ws.ws_col == 0)
                return 80;
        return ws.ws_col;
}

static void json_escaped(FILE *f, const char *s) {
        fputc('"', f);
        for (const unsigned char *p = (const unsigned char *) s; *p; p++)
                switch (*p) {
                case '"':
                        fputs("\\\"", f);
                        break;
                case '\\':
                        fputs("\\\\", f);
                        break;
                case '\b':
                        fputs("\\b", f);
                        break;
                case '\f':
                        fputs("\\f", f);
                        break;
                case '\n':
                        fputs("\\n", f);
                        break;
                case '\r':
                        fputs("\\r", f);
                        break;
                case '\t':
                        fputs("\\t", f);
                        break;
                default:
                        /* D-Bus strings are valid UTF-8: only control characters need escaping. */
                        if (*p < 0x20 || *p == 0x7f)
                                fprintf(f, "\\u%04x", *p);
                        else
                                fputc(*p, f);
                }
        fputc('"', f);
}

static void json_prefix(JsonWriter *w) {
        if (w->after_key) {
                w->after_key = false;
                return;
        }
        if (w->need_comma)
                fputc(',', w->f);
        if (w->depth > 0) {
                fputc('\n', w->f);
                for (unsigned i = 0; i < w->depth; i++)
                        fputs("  ", w->f);
        }
        w->need_comma = true;
}

void json_open(JsonWriter *w, char c) {
        json_prefix(w);
        fputc(c, w->f);
        w->depth++;
        w->need_comma = false;
}

void json_close(JsonWriter *w, char c) {
        w->depth--;
        if (w->need_comma) {
                fputc('\n', w->f);
                for (unsigned i = 0; i < w->depth; i++)
                        fputs("  ", w->f);
        }
        fputc(c, w->f);
        w->need_comma = true;
        if (w->depth == 0)
                fputc('\n', w->f);
}

void json_key(JsonWriter *w, const char *key) {
        json_prefix(w);
        json_escaped(w->f, key);
        fputs(": ", w->f);
        w->after_key = true;
}

void json_string(JsonWriter *w, const char *s) {
        json_prefix(w);
        json_escaped(w->f, strempty(s));
}

void json_unsigned(JsonWriter *w, uint64_t u) {
        json_prefix(w);
        fprintf(w->f, "%" PRIu64, u);
}

void json_bool(JsonWriter *w, bool b) {
        json_prefix(w);
        fputs(b ? "true" : "false", w->f);
}

void json_strv(JsonWriter *w, char *const *l) {
        json_open(w, '[');
        for (char *const *i = l; i && *i; i++)
                json_string(w, *i);
        json_close(w, ']');
}

/* Text for a terminal: what the daemon relays (paths and names from QEMU, which a guest may
 * own) keeps its control characters from the terminal (escape_controls()). */
static void fputs_escaped(const char *s, FILE *f) {
        size_t size = 4 * strlen(s) + 1;
        _cleanup_free_ char *out = malloc(size);

        if (!out) {
                fputs("(out of memory)", f);
                return;
        }
        escape_controls(s, out, size);
        fputs(out, f);
}

void print_escaped(const char *s) {
        fputs_escaped(s, stdout);
}

_printf_(2, 3) void print_field(const char *label, const char *format, ...) {
        _cleanup_free_ char *value = NULL;
        va_list ap;
        int r;

        printf("%*s: ", FIELD_WIDTH, label);
        va_start(ap, format);
        r = vasprintf(&value, format, ap);
        va_end(ap);
        if (r < 0)
                value = NULL;
        fputs_escaped(value ?: "(out of memory)", stdout);
        putchar('\n');
}

/* QEMU's messages may span lines: keep the continuation lines in the value column. */
void print_field_lines(const char *label, const char *text) {
        printf("%*s: ", FIELD_WIDTH, label);
        for (const char *p = text; *p;) {
                size_t n = strcspn(p, "\n");
                _cleanup_free_ char *line = strndup(p, n);

                fputs_escaped(line ?: "(out of memory)", stdout);
                p += n;
                if (*p == '\n' && *++p) {
                        putchar('\n');
                        printf("%*s  ", FIELD_WIDTH, "");
                }
        }
        putchar('\n');
}
