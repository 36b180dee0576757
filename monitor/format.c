/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Parsing and formatting of sizes, rates and times for the monitor: no GTK, unit-tested. */

#include <string.h>

#include "format.h"

gboolean bs_parse_size(const char *s, gboolean allow_rate, guint64 *ret) {
        static const struct {
                const char *suffix;
                guint64 factor;
        } table[] = {
                {"B", 1ULL},
                {"K", 1ULL << 10},
                {"Ki", 1ULL << 10},
                {"KiB", 1ULL << 10},
                {"KB", 1000ULL},
                {"M", 1ULL << 20},
                {"Mi", 1ULL << 20},
                {"MiB", 1ULL << 20},
                {"MB", 1000000ULL},
                {"G", 1ULL << 30},
                {"Gi", 1ULL << 30},
                {"GiB", 1ULL << 30},
                {"GB", 1000000000ULL},
                {"T", 1ULL << 40},
                {"Ti", 1ULL << 40},
                {"TiB", 1ULL << 40},
                {"TB", 1000000000000ULL},
                {"P", 1ULL << 50},
                {"Pi", 1ULL << 50},
                {"PiB", 1ULL << 50},
                {"PB", 1000000000000000ULL},
                {"E", 1ULL << 60},
                {"Ei", 1ULL << 60},
                {"EiB", 1ULL << 60},
                {"EB", 1000000000000000000ULL},
        };
        g_autofree char *copy = NULL;
        guint64 whole = 0, factor = 1, frac_num = 0, frac_den = 1, result;
        gboolean have_frac = FALSE;
        char *p, *end;
        size_t n;

        if (!s)
                return FALSE;
        copy = g_strstrip(g_strdup(s));
        n = strlen(copy);
        if (allow_rate && n > 2 && g_str_has_suffix(copy, "/s"))
                copy[n - 2] = 0;
        p = copy;
        if (!g_ascii_isdigit(*p))
                return FALSE;
        for (; g_ascii_isdigit(*p); p++)
                if (__builtin_mul_overflow(whole, 10, &whole) ||
                        __builtin_add_overflow(whole, (guint64) (*p - '0'), &whole))
                        return FALSE;
        if (*p == '.') {
                for (p++; g_ascii_isdigit(*p); p++) {
                        have_frac = TRUE;
                        if (frac_den >= 1000000000000ULL)
                                continue; /* digits beyond 12 places do not matter */
                        frac_num = frac_num * 10 + (guint64) (*p - '0');
                        frac_den *= 10;
                }
                if (!have_frac)
                        return FALSE;
        }
        end = p;
        while (*end == ' ')
                end++;
        if (*end) {
                size_t i;

                for (i = 0; i < G_N_ELEMENTS(table); i++)
                        if (strcmp(end, table[i].suffix) == 0)
                                break;
                if (i >= G_N_ELEMENTS(table))
                        return FALSE;
                factor = table[i].factor;
        } else if (have_frac)
                return FALSE; /* a fraction of a byte */

        if (__builtin_mul_overflow(whole, factor, &result))
                return FALSE;
        if (frac_num > 0) {
                /* factor ≤ 2^60 and frac_den ≤ 10^12: exact enough in long double */
                long double f = (long double) frac_num / (long double) frac_den * (long double) factor;
                if (__builtin_add_overflow(result, (guint64) f, &result))
                        return FALSE;
        }
        *ret = result;
        return TRUE;
}

char *bs_format_size(guint64 bytes) {
        static const char *const units[] = {"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
        double v = (double) bytes;
        size_t i = 0;

        if (bytes < 1024)
                return g_strdup_printf("%" G_GUINT64_FORMAT " B", bytes);
        v /= 1024.0;
        while (v >= 1024.0 && i + 1 < G_N_ELEMENTS(units)) {
                v /= 1024.0;
                i++;
        }
        return g_strdup_printf("%.1f %s", v, units[i]);
}

char *bs_format_rate(guint64 bytes_per_second) {
        g_autofree char *size = NULL;

        if (bytes_per_second == 0)
                return g_strdup("unlimited");
        size = bs_format_size(bytes_per_second);
        return g_strdup_printf("%s/s", size);
}

char *bs_format_time(guint64 usec, gint64 now_usec) {
        g_autoptr(GDateTime) t = NULL, now = NULL;

        if (usec == 0 || usec > (guint64) G_MAXINT64)
                return g_strdup("");
        t = g_date_time_new_from_unix_local((gint64) (usec / G_USEC_PER_SEC));
        now = g_date_time_new_from_unix_local(now_usec / G_USEC_PER_SEC);
        if (!t || !now)
                return g_strdup("");
        if (g_date_time_get_year(t) == g_date_time_get_year(now) &&
                g_date_time_get_day_of_year(t) == g_date_time_get_day_of_year(now))
                return g_date_time_format(t, "%H:%M:%S");
        return g_date_time_format(t, "%Y-%m-%d %H:%M:%S");
}

char *bs_format_progress(guint64 done, guint64 total, guint64 rate, guint64 end_usec, gint64 now_usec) {
        g_autofree char *d = bs_format_size(done), *t = bs_format_size(total), *when = NULL;
        GString *s = g_string_new(NULL);

        g_string_append_printf(s, "%s of %s", d, t);
        if (rate > 0) {
                g_autofree char *r = bs_format_rate(rate);
                g_string_append_printf(s, " · %s", r);
        }
        when = bs_format_time(end_usec, now_usec);
        if (*when)
                g_string_append_printf(s, " · ends at %s", when);
        return g_string_free(s, FALSE);
}

/* The name an object path ends in, decoded from sd-bus' escaping (a guest's or a disk's). */
char *bs_path_name(const char *path) {
        const char *last = strrchr(path, '/');
        GString *s = g_string_new(NULL);

        last = last ? last + 1 : path;
        if (strcmp(last, "_") == 0) /* sd-bus' encoding of the empty string */
                return g_string_free(s, FALSE);
        for (const char *p = last; *p; p++) {
                if (*p == '_' && g_ascii_isxdigit(p[1]) && g_ascii_isxdigit(p[2])) {
                        char c = (char) (g_ascii_xdigit_value(p[1]) << 4 | g_ascii_xdigit_value(p[2]));
                        /* A name with a NUL or a control byte is shown escaped, not cut. */
                        if (g_ascii_iscntrl(c))
                                g_string_append_printf(s, "\\x%02x", (unsigned char) c);
                        else
                                g_string_append_c(s, c);
                        p += 2;
                } else
                        g_string_append_c(s, *p);
        }
        return g_string_free(s, FALSE);
}
