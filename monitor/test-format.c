/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The monitor's size parser and formatters (no display needed). */

#include "format.h"

static void test_parse(void) {
        guint64 v = 0;

        g_assert_true(bs_parse_size("0", FALSE, &v) && v == 0);
        g_assert_true(bs_parse_size("512", FALSE, &v) && v == 512);
        g_assert_true(bs_parse_size(" 64M ", FALSE, &v) && v == 64ULL << 20);
        g_assert_true(bs_parse_size("1.5G", FALSE, &v) && v == 3ULL << 29);
        g_assert_true(bs_parse_size("10 MB", FALSE, &v) && v == 10000000ULL);
        g_assert_true(bs_parse_size("100MiB/s", TRUE, &v) && v == 100ULL << 20);
        g_assert_true(bs_parse_size("16E", FALSE, &v) == FALSE); /* 2^64: overflow */
        g_assert_true(bs_parse_size("18446744073709551616", FALSE, &v) == FALSE);
        g_assert_true(bs_parse_size("100MiB/s", FALSE, &v) == FALSE); /* a rate where a size is due */
        g_assert_true(bs_parse_size("1.5", FALSE, &v) == FALSE);
        g_assert_true(bs_parse_size("-1", FALSE, &v) == FALSE);
        g_assert_true(bs_parse_size("", FALSE, &v) == FALSE);
        g_assert_true(bs_parse_size("1X", FALSE, &v) == FALSE);
        g_assert_true(bs_parse_size("1.", FALSE, &v) == FALSE);
        g_assert_true(bs_parse_size(NULL, FALSE, &v) == FALSE);
}

static void test_format(void) {
        g_autofree char *a = bs_format_size(0), *b = bs_format_size(1536), *c = bs_format_size(1ULL << 30),
                        *d = bs_format_rate(0), *e = bs_format_rate(100ULL << 20), *f = bs_format_time(0, 0),
                        *g = bs_format_progress(1ULL << 20, 2ULL << 20, 0, 0, 0), *h = bs_format_size(G_MAXUINT64);

        g_assert_cmpstr(a, ==, "0 B");
        g_assert_cmpstr(b, ==, "1.5 KiB");
        g_assert_cmpstr(c, ==, "1.0 GiB");
        g_assert_cmpstr(d, ==, "unlimited");
        g_assert_cmpstr(e, ==, "100.0 MiB/s");
        g_assert_cmpstr(f, ==, "");
        g_assert_cmpstr(g, ==, "1.0 MiB of 2.0 MiB");
        g_assert_cmpstr(h, ==, "16.0 EiB");
}

int main(int argc, char *argv[]) {
        g_test_init(&argc, &argv, NULL);
        g_test_add_func("/monitor/parse-size", test_parse);
        g_test_add_func("/monitor/format", test_format);
        return g_test_run();
}
