/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <fcntl.h>
#include <sys/stat.h>

#include "config.h"
#include "qmp.h"
#include "util.h"
#include "tap.h"

static int parse(Config *c, const char *text) {
        config_init(c);
        return config_parse(c, text, "test.conf");
}

static void test_defaults(void) {
        Config c;

        config_init(&c);
        ASSERT_NULL(c.image_dirs);
        ASSERT_EQ_U64(c.qmp_timeout_usec, QMP_TIMEOUT_DEFAULT_USEC);
        ASSERT_OK(config_parse(&c, "", "empty"));
        ASSERT_NULL(c.image_dirs);
        ASSERT_EQ_U64(c.qmp_timeout_usec, QMP_TIMEOUT_DEFAULT_USEC);
        ASSERT_EQ_U64(c.map_timeout_usec, 60 * USEC_PER_SEC);
        config_done(&c);
        config_done(&c); /* twice is harmless */
}

static void test_map_timeout(void) {
        Config c;

        ASSERT_OK(parse(&c, "MapTimeoutSec=7\n"));
        ASSERT_EQ_U64(c.map_timeout_usec, 7 * USEC_PER_SEC);
        config_done(&c);
        ASSERT_TRUE(parse(&c, "MapTimeoutSec=0\n") < 0);
        config_done(&c);
        ASSERT_TRUE(parse(&c, "MapTimeoutSec=3601\n") < 0);
        config_done(&c);
        ASSERT_TRUE(parse(&c, "MapTimeoutSec=-1\n") < 0);
        config_done(&c);
}

static void test_valid(void) {
        Config c;

        ASSERT_OK(parse(&c, "# blockstreamd configuration\n"
                            "; another comment style\n"
                            "\n"
                            "[Daemon]\n"
                            "ImageDirectories=/srv/images /var/lib/blockstream/images\n"
                            "QMPTimeoutSec=30\n"));
        ASSERT_EQ(strv_length(c.image_dirs), 2);
        if (strv_length(c.image_dirs) == 2) {
                ASSERT_STREQ(c.image_dirs[0], "/srv/images");
                ASSERT_STREQ(c.image_dirs[1], "/var/lib/blockstream/images");
        }
        ASSERT_EQ_U64(c.qmp_timeout_usec, 30 * USEC_PER_SEC);
        config_done(&c);

        /* Whitespace around keys and values, tabs between directories, CRLF, no final newline,
         * indented comments, no section header at all. */
        ASSERT_OK(parse(&c, "  ImageDirectories =\t/a\t/b  /c  \r\n"
                            "   # indented comment\r\n"
                            "\tQMPTimeoutSec = 5 \r\n"
                            "ImageDirectories=/d /e"));
        ASSERT_EQ(strv_length(c.image_dirs), 2); /* a later assignment replaces the earlier one */
        if (strv_length(c.image_dirs) == 2) {
                ASSERT_STREQ(c.image_dirs[0], "/d");
                ASSERT_STREQ(c.image_dirs[1], "/e");
        }
        ASSERT_EQ_U64(c.qmp_timeout_usec, 5 * USEC_PER_SEC);
        config_done(&c);

        /* Duplicates collapse; an empty assignment resets the list. */
        ASSERT_OK(parse(&c, "ImageDirectories=/a /a /b /a\n"));
        ASSERT_EQ(strv_length(c.image_dirs), 2);
        config_done(&c);
        ASSERT_OK(parse(&c, "ImageDirectories=/a\nImageDirectories=\n"));
        ASSERT_EQ(strv_length(c.image_dirs), 0);
        config_done(&c);

        /* "/" is a normalized absolute path. */
        ASSERT_OK(parse(&c, "ImageDirectories=/\n"));
        ASSERT_EQ(strv_length(c.image_dirs), 1);
        config_done(&c);
}

static void test_image_dirs_invalid(void) {
        static const char *const bad[] = {
                "ImageDirectories=images\n",
                "ImageDirectories=/srv/images relative\n",
                "ImageDirectories=./images\n",
                "ImageDirectories=/srv/../etc\n",
                "ImageDirectories=/srv/./images\n",
                "ImageDirectories=/srv//images\n",
                "ImageDirectories=/srv/images/\n",
                "ImageDirectories=~/images\n",
                "ImageDirectories=/srv/\x01images\n",
        };

        for (size_t i = 0; i < ELEMENTSOF(bad); i++) {
                Config c;
                int r = parse(&c, bad[i]);
                if (r != -EINVAL)
                        TAP_FAIL("config_parse(\"%s\") = %d, expected -EINVAL", bad[i], r);
                config_done(&c);
        }
}

static void test_timeout_bounds(void) {
        static const struct {
                const char *value;
                int r;
                usec_t usec;
        } t[] = {
                {"1", 0, 1 * USEC_PER_SEC},
                {"60", 0, 60 * USEC_PER_SEC},
                {"3600", 0, 3600 * USEC_PER_SEC},
                {"0", -EINVAL, 0},
                {"3601", -EINVAL, 0},
                {"-1", -EINVAL, 0},
                {"-0", -EINVAL, 0},
                {"", -EINVAL, 0},
                {"abc", -EINVAL, 0},
                {"5s", -EINVAL, 0},
                {"1.5", -EINVAL, 0},
                {"0x10", -EINVAL, 0},
                {"99999999999999999999", -EINVAL, 0},
                {"18446744073709551617", -EINVAL, 0},
                {"4294967297", -EINVAL, 0},
        };

        for (size_t i = 0; i < ELEMENTSOF(t); i++) {
                _cleanup_free_ char *text = strdup_printf("[Daemon]\nQMPTimeoutSec=%s\n", t[i].value);
                Config c;
                int r = parse(&c, text);

                if (r != t[i].r)
                        TAP_FAIL("QMPTimeoutSec=%s: config_parse() = %d, expected %d", t[i].value, r, t[i].r);
                else if (r == 0 && c.qmp_timeout_usec != t[i].usec)
                        TAP_FAIL("QMPTimeoutSec=%s: got %" PRIu64 " usec", t[i].value, c.qmp_timeout_usec);
                config_done(&c);
        }
}

static void test_unknown_keys_and_sections(void) {
        Config c;

        /* Unknown keys and sections are warned about, not fatal. */
        ASSERT_OK(parse(&c, "[Daemon]\n"
                            "FutureOption=yes\n"
                            "imagedirectories=/lowercase/is/another/key\n"
                            "[Unknown]\n"
                            "QMPTimeoutSec=7\n"));
        ASSERT_NULL(c.image_dirs);
        ASSERT_EQ_U64(c.qmp_timeout_usec, 7 * USEC_PER_SEC);
        config_done(&c);

        /* A line that is not Key=Value is an error. */
        ASSERT_ERRNO(parse(&c, "[Daemon]\nImageDirectories /srv\n"), -EINVAL);
        config_done(&c);
        ASSERT_ERRNO(parse(&c, "just words\n"), -EINVAL);
        config_done(&c);
}

static void test_load(void) {
        char path[] = "/tmp/bsd-unit-config-XXXXXX";
        _cleanup_close_ int fd = mkstemp(path);
        Config c;
        char *big;

        ASSERT_TRUE(fd >= 0);
        if (fd < 0)
                return;
        ASSERT_OK(loop_write(fd, "QMPTimeoutSec=9\nImageDirectories=/x\n", 36));

        config_init(&c);
        ASSERT_OK(config_load(&c, path, true));
        ASSERT_EQ_U64(c.qmp_timeout_usec, 9 * USEC_PER_SEC);
        ASSERT_EQ(strv_length(c.image_dirs), 1);
        config_done(&c);

        /* Missing file: defaults, unless it was asked for explicitly. */
        config_init(&c);
        ASSERT_OK(config_load(&c, "/nonexistent/blockstreamd.conf", false));
        ASSERT_EQ_U64(c.qmp_timeout_usec, QMP_TIMEOUT_DEFAULT_USEC);
        ASSERT_ERRNO(config_load(&c, "/nonexistent/blockstreamd.conf", true), -ENOENT);
        config_done(&c);

        /* Larger than CONFIG_FILE_MAX: refused. */
        big = malloc(CONFIG_FILE_MAX + 2);
        ASSERT_NOT_NULL(big);
        if (big) {
                memset(big, '#', CONFIG_FILE_MAX + 1);
                ASSERT_OK(ftruncate(fd, 0));
                ASSERT_OK(pwrite(fd, big, CONFIG_FILE_MAX + 1, 0) == (ssize_t) CONFIG_FILE_MAX + 1 ? 0 : -1);
                config_init(&c);
                ASSERT_ERRNO(config_load(&c, path, true), -EFBIG);
                config_done(&c);
                free(big);
        }
        unlink(path);
}

int main(int argc, char **argv) {
        tap_init(argc, argv);
        /* The invalid cases log errors by design: keep the output to the TAP lines. */
        log_set_max_level(getenv("BSD_UNIT_DEBUG") ? LOG_LEVEL_DEBUG : -1);
        TAP_RUN(test_defaults);
        TAP_RUN(test_valid);
        TAP_RUN(test_image_dirs_invalid);
        TAP_RUN(test_timeout_bounds);
        TAP_RUN(test_map_timeout);
        TAP_RUN(test_unknown_keys_and_sections);
        TAP_RUN(test_load);
        return tap_finish();
}
