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

static void test_progress_signals(void) {
        Config c;

        config_init(&c);
        ASSERT_EQ_U64(c.progress_signals, PROGRESS_SIGNALS_DEFAULT);
        config_done(&c);
        ASSERT_OK(parse(&c, "ProgressSignalsPerSecond=20\n"));
        ASSERT_EQ_U64(c.progress_signals, 20);
        config_done(&c);
        ASSERT_OK(parse(&c, "ProgressSignalsPerSecond=10000\n"));
        ASSERT_EQ_U64(c.progress_signals, 10000);
        config_done(&c);
        ASSERT_TRUE(parse(&c, "ProgressSignalsPerSecond=0\n") < 0);
        config_done(&c);
        ASSERT_TRUE(parse(&c, "ProgressSignalsPerSecond=10001\n") < 0);
        config_done(&c);
        ASSERT_TRUE(parse(&c, "ProgressSignalsPerSecond=-1\n") < 0);
        config_done(&c);
        ASSERT_TRUE(parse(&c, "ProgressSignalsPerSecond=5x\n") < 0);
        config_done(&c);
}

static void test_engine_mirror(void) {
        Config c;

        /* "auto" by default: disks whose nodes QEMU named itself; "all" and "never" when told. */
        config_init(&c);
        ASSERT_EQ_U64(c.engine_mirror, ENGINE_MIRROR_AUTO);
        config_done(&c);
        ASSERT_OK(parse(&c, "EngineMirror=never\n"));
        ASSERT_EQ_U64(c.engine_mirror, ENGINE_MIRROR_NEVER);
        config_done(&c);
        ASSERT_OK(parse(&c, "EngineMirror=all\n"));
        ASSERT_EQ_U64(c.engine_mirror, ENGINE_MIRROR_ALL);
        config_done(&c);
        ASSERT_OK(parse(&c, "EngineMirror=never\nEngineMirror=auto\n"));
        ASSERT_EQ_U64(c.engine_mirror, ENGINE_MIRROR_AUTO);
        config_done(&c);
        ASSERT_OK(parse(&c, "EngineMirror=auto\nEngineMirror=never\n"));
        ASSERT_EQ_U64(c.engine_mirror, ENGINE_MIRROR_NEVER);
        config_done(&c);
        ASSERT_NEG(parse(&c, "EngineMirror=always\n"));
        config_done(&c);
        ASSERT_NEG(parse(&c, "EngineMirror=\n"));
        config_done(&c);
        ASSERT_NEG(parse(&c, "EngineMirror=All\n"));
        config_done(&c);
}

/* HelperUIDRange=: FIRST-LAST, with room for a guest beside the probes' top uids. */
static void test_helper_uid_range(void) {
        Config c;

        ASSERT_OK(parse(&c, "HelperUIDRange=1000-1008\n"));
        ASSERT_EQ(c.helper_uid_min, 1000U);
        ASSERT_EQ(c.helper_uid_max, 1008U);
        config_done(&c);
        /* Eight uids are the probes' alone: nothing left for a guest. */
        ASSERT_NEG(parse(&c, "HelperUIDRange=1000-1007\n"));
        ASSERT_NEG(parse(&c, "HelperUIDRange=1000-1000\n"));
        ASSERT_NEG(parse(&c, "HelperUIDRange=0-100\n"));
        ASSERT_NEG(parse(&c, "HelperUIDRange=100-99\n"));
        ASSERT_NEG(parse(&c, "HelperUIDRange=1000-4294967295\n"));
        ASSERT_NEG(parse(&c, "HelperUIDRange=1000\n"));
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

/* QEMUUsers=: names or uids, replaced by a later assignment, emptied by an empty one. */
static void test_qemu_users(void) {
        Config c;

        config_init(&c);
        ASSERT_EQ(c.n_qemu_users, 0);
        ASSERT_FALSE(config_qemu_user_allowed(&c, 0));
        config_done(&c);

        ASSERT_OK(parse(&c, "QEMUUsers=root 1234\t64055\n"));
        ASSERT_EQ(c.n_qemu_users, 3);
        ASSERT_TRUE(config_qemu_user_allowed(&c, 0));
        ASSERT_TRUE(config_qemu_user_allowed(&c, 1234));
        ASSERT_TRUE(config_qemu_user_allowed(&c, 64055));
        ASSERT_FALSE(config_qemu_user_allowed(&c, 1235));
        config_done(&c);

        /* A user that does not exist here is skipped, not an error. */
        ASSERT_OK(parse(&c, "QEMUUsers=bstest-no-such-user-here 7\n"));
        ASSERT_EQ(c.n_qemu_users, 1);
        ASSERT_TRUE(config_qemu_user_allowed(&c, 7));
        config_done(&c);

        ASSERT_OK(parse(&c, "QEMUUsers=1 2\nQEMUUsers=3\n"));
        ASSERT_EQ(c.n_qemu_users, 1);
        ASSERT_TRUE(config_qemu_user_allowed(&c, 3));
        ASSERT_FALSE(config_qemu_user_allowed(&c, 1));
        config_done(&c);

        ASSERT_OK(parse(&c, "QEMUUsers=1 2\nQEMUUsers=\n"));
        ASSERT_EQ(c.n_qemu_users, 0);
        config_done(&c);

        /* The invalid uid (-1), overflow, signs, junk and malformed names are errors. */
        static const char *const bad[] = { "4294967295", "99999999999999999999", "-1", "+5", "12abc", "a/b",
                "-root", "r$t", "x y/z", "0x10" };
        for (size_t i = 0; i < ELEMENTSOF(bad); i++) {
                _cleanup_free_ char *text = strdup_printf("QEMUUsers=%s\n", bad[i]);
                int r = parse(&c, text);
                if (r != -EINVAL)
                        TAP_FAIL("QEMUUsers=%s: config_parse() = %d, expected -EINVAL", bad[i], r);
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

static void test_template_url_prefixes(void) {
        Config c;

        /* None by default: every remote template is refused. */
        config_init(&c);
        ASSERT_NULL(c.template_url_prefixes);
        ASSERT_FALSE(config_template_url_allowed(&c, "http://repo/t.qcow2"));
        ASSERT_FALSE(config_template_url_allowed(&c, "nbd+unix:///t?socket=/run/t.sock"));
        config_done(&c);

        ASSERT_OK(parse(&c, "TemplateURLPrefixes=http://repo/templates/ nbd://10.0.0.1:10809 "
                            "nbd+unix:///base?socket=/run/t.sock https://mirror\n"));
        ASSERT_EQ(strv_length(c.template_url_prefixes), 4);
        ASSERT_TRUE(config_template_url_allowed(&c, "http://repo/templates/debian.qcow2"));
        ASSERT_TRUE(config_template_url_allowed(&c, "http://repo/templates/a/b.raw"));
        ASSERT_TRUE(config_template_url_allowed(&c, "nbd://10.0.0.1:10809/base"));
        ASSERT_TRUE(config_template_url_allowed(&c, "nbd://10.0.0.1:10809"));
        ASSERT_TRUE(config_template_url_allowed(&c, "nbd+unix:///base?socket=/run/t.sock"));
        ASSERT_TRUE(config_template_url_allowed(&c, "https://mirror/x.qcow2"));
        /* A prefix ends at a boundary: no other host, port or user info. */
        ASSERT_FALSE(config_template_url_allowed(&c, "https://mirror.evil/x.qcow2"));
        ASSERT_FALSE(config_template_url_allowed(&c, "https://mirror@evil/x.qcow2"));
        ASSERT_FALSE(config_template_url_allowed(&c, "https://mirror:8443/x.qcow2"));
        ASSERT_FALSE(config_template_url_allowed(&c, "nbd://10.0.0.1:108090/base"));
        ASSERT_FALSE(config_template_url_allowed(&c, "nbd://10.0.0.11:10809/base"));
        ASSERT_FALSE(config_template_url_allowed(&c, "http://repo/templatesX/a"));
        ASSERT_FALSE(config_template_url_allowed(&c, "http://repo/other/a"));
        ASSERT_FALSE(config_template_url_allowed(&c, "https://repo/templates/a")); /* another scheme */
        /* A prefix with a query matches only itself: no other socket. */
        ASSERT_FALSE(config_template_url_allowed(&c, "nbd+unix:///base?socket=/run/t.sock2"));
        ASSERT_FALSE(config_template_url_allowed(&c, "nbd+unix:///base?socket=/run/t.sock/../x"));
        ASSERT_FALSE(config_template_url_allowed(&c, "nbd+unix:///base?socket=/run/t.sock&socket=/x"));
        /* Nothing climbs out of a prefix. */
        ASSERT_FALSE(config_template_url_allowed(&c, "http://repo/templates/../secret"));
        ASSERT_FALSE(config_template_url_allowed(&c, "http://repo/templates/a/.."));
        ASSERT_FALSE(config_template_url_allowed(&c, "http://repo/templates/./a"));
        ASSERT_FALSE(config_template_url_allowed(&c, "http://repo/templates/%2e%2e/secret"));
        ASSERT_FALSE(config_template_url_allowed(&c, "http://repo/templates/%2F"));
        ASSERT_FALSE(config_template_url_allowed(&c, "http://repo/templates/..\\x"));
        ASSERT_FALSE(config_template_url_allowed(&c, "file:///etc/shadow"));
        ASSERT_FALSE(config_template_url_allowed(&c, NULL));
        config_done(&c);

        /* An empty assignment resets; invalid prefixes are errors. */
        ASSERT_OK(parse(&c, "TemplateURLPrefixes=http://a/\nTemplateURLPrefixes=\n"));
        ASSERT_NULL(c.template_url_prefixes);
        config_done(&c);
        ASSERT_NEG(parse(&c, "TemplateURLPrefixes=http://\n")); /* would allow every host */
        config_done(&c);
        ASSERT_NEG(parse(&c, "TemplateURLPrefixes=file:///srv\n"));
        config_done(&c);
        ASSERT_NEG(parse(&c, "TemplateURLPrefixes=/srv/templates\n"));
        config_done(&c);
        ASSERT_NEG(parse(&c, "TemplateURLPrefixes=http://a\\b/\n"));
        config_done(&c);
}

int main(int argc, char **argv) {
        tap_init(argc, argv);
        /* The invalid cases log errors by design: keep the output to the TAP lines. */
        log_set_max_level(getenv("BSD_UNIT_DEBUG") ? LOG_LEVEL_DEBUG : -1);
        TAP_RUN(test_defaults);
        TAP_RUN(test_valid);
        TAP_RUN(test_helper_uid_range);
        TAP_RUN(test_image_dirs_invalid);
        TAP_RUN(test_timeout_bounds);
        TAP_RUN(test_qemu_users);
        TAP_RUN(test_map_timeout);
        TAP_RUN(test_engine_mirror);
        TAP_RUN(test_progress_signals);
        TAP_RUN(test_unknown_keys_and_sections);
        TAP_RUN(test_load);
        TAP_RUN(test_template_url_prefixes);
        return tap_finish();
}
