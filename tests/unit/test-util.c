/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <locale.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>

#include "util.h"
#include "tap.h"

/* parse_size */

static void test_parse_size_valid(void) {
        static const struct {
                const char *s;
                uint64_t v;
        } t[] = {
                {"0", 0},
                {"1", 1},
                {"512", 512},
                {"1B", 1},
                {"1K", 1024},
                {"1Ki", 1024},
                {"1KiB", 1024},
                {"1KB", 1000},
                {"2M", 2ULL << 20},
                {"2Mi", 2ULL << 20},
                {"2MiB", 2ULL << 20},
                {"2MB", 2000000ULL},
                {"3G", 3ULL << 30},
                {"3GiB", 3ULL << 30},
                {"3GB", 3000000000ULL},
                {"1T", 1ULL << 40},
                {"1TB", 1000000000000ULL},
                {"1P", 1ULL << 50},
                {"1PiB", 1ULL << 50},
                {"1PB", 1000000000000000ULL},
                {"1E", 1ULL << 60},
                {"15E", 15ULL << 60},
                {"1EB", 1000000000000000000ULL},
                {"18EB", 18000000000000000000ULL},
                {"18446744073709551615", UINT64_MAX},
                {"18446744073709551615B", UINT64_MAX},
                {"1.5G", 1610612736ULL},
                {"1.5K", 1536},
                {"0.5M", 524288},
                {"1.25KB", 1250},
                {"0.1K", 102}, /* 102.4, truncated */
                {"00010", 10},
        };

        for (size_t i = 0; i < ELEMENTSOF(t); i++) {
                uint64_t v = 0xdeadbeef;
                int r = parse_size(t[i].s, &v);
                if (r != 0)
                        TAP_FAIL("parse_size(\"%s\") = %d (%s), expected success", t[i].s, r, strerror(-r));
                else if (v != t[i].v)
                        TAP_FAIL("parse_size(\"%s\") = %" PRIu64 ", expected %" PRIu64, t[i].s, v, t[i].v);
        }
}

static void test_parse_size_overflow(void) {
        static const char *const t[] = {
                "16E",
                "16EiB",
                "17E",
                "19EB",
                "18446744073709551616",
                "99999999999999999999",
                "999999999999999999999999999999",
                "18446744073709551615K",
                "16384P",
                "16.0E",
        };

        for (size_t i = 0; i < ELEMENTSOF(t); i++) {
                uint64_t v = 4242;
                int r = parse_size(t[i], &v);
                if (r != -ERANGE)
                        TAP_FAIL(
                                "parse_size(\"%s\") = %d (%s), expected -ERANGE", t[i], r, r < 0 ? strerror(-r) : "ok");
                if (v != 4242)
                        TAP_FAIL("parse_size(\"%s\") wrote its result on failure", t[i]);
        }
}

static void test_parse_size_garbage(void) {
        static const char *const t[] = {
                "",
                "-1",
                "-0",
                "+1",
                "1.5", /* a fraction of a byte count */
                "1.",  /* no digits after the point */
                ".5K", /* no digits before it */
                "1..5K",
                "1.5.5K",
                "1Q",
                "1k", /* suffixes are upper case */
                "1kb",
                "1KiBB",
                "1KK",
                "1iB",
                "K",
                "B",
                "0x10",
                "1e3",
                "1,5G",
                "1_000",
                "1\n",
                "1\t",
                "\t1",
                "1K\n",
                "one",
                "1\xc2\xa0K",
        };

        for (size_t i = 0; i < ELEMENTSOF(t); i++) {
                uint64_t v = 4242;
                int r = parse_size(t[i], &v);
                if (r != -EINVAL)
                        TAP_FAIL(
                                "parse_size(\"%s\") = %d (%s), expected -EINVAL", t[i], r, r < 0 ? strerror(-r) : "ok");
                if (v != 4242)
                        TAP_FAIL("parse_size(\"%s\") wrote its result on failure", t[i]);
        }
        ASSERT_ERRNO(parse_size(NULL, &(uint64_t){0}), -EINVAL);
}

/* The grammar is "decimal integer with an optional suffix": no whitespace anywhere. */
static void test_parse_size_whitespace(void) {
        static const char *const t[] = {" 1K", "1 K", "1K ", " 1", "1 "};

        for (size_t i = 0; i < ELEMENTSOF(t); i++) {
                uint64_t v = 4242;
                int r = parse_size(t[i], &v);
                if (r != -EINVAL)
                        TAP_FAIL("parse_size(\"%s\") = %d (value %" PRIu64 "), expected -EINVAL", t[i], r, v);
        }
}

/* format_bytes */

static void test_format_bytes(void) {
        static const struct {
                uint64_t n;
                const char *s;
        } t[] = {
                {0, "0 B"},
                {1, "1 B"},
                {512, "512 B"},
                {1023, "1023 B"},
                {1024, "1.0 KiB"},
                {1536, "1.5 KiB"},
                {1ULL << 20, "1.0 MiB"},
                {3ULL << 29, "1.5 GiB"},
                {1ULL << 40, "1.0 TiB"},
                {1ULL << 50, "1.0 PiB"},
                {1ULL << 60, "1.0 EiB"},
                {UINT64_MAX, "16.0 EiB"},
        };
        char buf[FORMAT_BYTES_MAX];

        for (size_t i = 0; i < ELEMENTSOF(t); i++) {
                memset(buf, 'x', sizeof(buf));
                ASSERT_TRUE(format_bytes(buf, sizeof(buf), t[i].n) == buf);
                ASSERT_STREQ(buf, t[i].s);
        }

        /* A short buffer truncates, never overflows (ASan watches). */
        {
                char *small = malloc(4);
                ASSERT_NOT_NULL(small);
                if (small) {
                        format_bytes(small, 4, UINT64_MAX);
                        ASSERT_EQ(strlen(small), 3);
                        format_bytes(small, 4, 123456);
                        ASSERT_EQ(strlen(small), 3);
                        free(small);
                }
        }
}

/* Just below a unit boundary the value must not print as "1024.0" of the smaller unit. */
static void test_format_bytes_rounding(void) {
        static const uint64_t t[] = {
                (1ULL << 20) - 1,
                (1ULL << 30) - 1,
                (1ULL << 40) - 1,
                (1ULL << 20) - 20,
        };
        char buf[FORMAT_BYTES_MAX];

        for (size_t i = 0; i < ELEMENTSOF(t); i++) {
                format_bytes(buf, sizeof(buf), t[i]);
                if (strncmp(buf, "1024.0 ", 7) == 0)
                        TAP_FAIL("format_bytes(%" PRIu64 ") = \"%s\"", t[i], buf);
        }
}

/* Names */

static void test_guest_name(void) {
        char n64[65], n65[66];

        memset(n64, 'a', 64);
        n64[64] = 0;
        memset(n65, 'b', 65);
        n65[65] = 0;

        ASSERT_TRUE(guest_name_is_valid("a"));
        ASSERT_TRUE(guest_name_is_valid("vm-01_test.x"));
        ASSERT_TRUE(guest_name_is_valid("ABC.def-123_"));
        ASSERT_TRUE(guest_name_is_valid(n64));
        ASSERT_FALSE(guest_name_is_valid(n65));
        ASSERT_FALSE(guest_name_is_valid(""));
        ASSERT_FALSE(guest_name_is_valid(NULL));
        ASSERT_FALSE(guest_name_is_valid("a/b"));
        ASSERT_FALSE(guest_name_is_valid("/"));
        ASSERT_FALSE(guest_name_is_valid("a b"));
        ASSERT_FALSE(guest_name_is_valid("a\n"));
        ASSERT_FALSE(guest_name_is_valid("a\t"));
        ASSERT_FALSE(guest_name_is_valid("a:b"));
        ASSERT_FALSE(guest_name_is_valid("a\\b"));
        ASSERT_FALSE(guest_name_is_valid("a*"));
        ASSERT_FALSE(guest_name_is_valid("caf\xc3\xa9"));
        ASSERT_FALSE(guest_name_is_valid("\xff"));
        ASSERT_FALSE(guest_name_is_valid("a\x80"));
        ASSERT_FALSE(guest_name_is_valid("a\x7f"));
        /* A name is a path component (state file, runtime directory): the pattern's "." and ".."
         * would name a directory itself or its parent. Other names of dots are plain names. */
        ASSERT_FALSE(guest_name_is_valid("."));
        ASSERT_FALSE(guest_name_is_valid(".."));
        ASSERT_TRUE(guest_name_is_valid("..."));
        ASSERT_TRUE(guest_name_is_valid(".a"));
        ASSERT_TRUE(guest_name_is_valid("a.."));
        ASSERT_TRUE(guest_name_is_valid("-"));
}

static void test_qemu_id(void) {
        char id128[129], id129[130];

        memset(id128, 'x', 128);
        id128[128] = 0;
        memset(id129, 'x', 129);
        id129[129] = 0;

        ASSERT_TRUE(qemu_id_is_valid("vda"));
        ASSERT_TRUE(qemu_id_is_valid("j1"));
        ASSERT_TRUE(qemu_id_is_valid("bsd-vda-1"));
        ASSERT_TRUE(qemu_id_is_valid("a.b_c-d"));
        ASSERT_TRUE(qemu_id_is_valid("Z"));
        ASSERT_TRUE(qemu_id_is_valid(id128));
        ASSERT_FALSE(qemu_id_is_valid(id129));
        ASSERT_FALSE(qemu_id_is_valid(NULL));
        ASSERT_FALSE(qemu_id_is_valid(""));
        ASSERT_FALSE(qemu_id_is_valid("1abc"));
        ASSERT_FALSE(qemu_id_is_valid("-abc"));
        ASSERT_FALSE(qemu_id_is_valid(".abc"));
        ASSERT_FALSE(qemu_id_is_valid("_abc"));
        ASSERT_FALSE(qemu_id_is_valid("#block123")); /* QEMU's generated node names */
        ASSERT_FALSE(qemu_id_is_valid("a b"));
        ASSERT_FALSE(qemu_id_is_valid("a/b"));
        ASSERT_FALSE(qemu_id_is_valid("a,b"));
        ASSERT_FALSE(qemu_id_is_valid("a\"b"));
        ASSERT_FALSE(qemu_id_is_valid("\xc3\xa9"));
        ASSERT_FALSE(qemu_id_is_valid("a\xc3\xa9"));

        /* Node names: the same, or QEMU's own "#block123". */
        ASSERT_TRUE(qemu_node_name_is_valid("disk0"));
        ASSERT_TRUE(qemu_node_name_is_valid("#block123"));
        ASSERT_FALSE(qemu_node_name_is_valid(NULL));
        ASSERT_FALSE(qemu_node_name_is_valid(""));
        ASSERT_FALSE(qemu_node_name_is_valid("#"));
        ASSERT_FALSE(qemu_node_name_is_valid("##block1"));
        ASSERT_FALSE(qemu_node_name_is_valid("#1"));
        ASSERT_FALSE(qemu_node_name_is_valid(".."));
        ASSERT_FALSE(qemu_node_name_is_valid("../../x"));
        ASSERT_FALSE(qemu_node_name_is_valid("a/b"));
        ASSERT_FALSE(qemu_node_name_is_valid("#a/b"));
}

/* Paths */

static void test_disk_names(void) {
        char *ok[] = {"virtio-disk0", "vda", "ua-data", "vdb", "scsi0-0-0-0", "sda", NULL};
        char *same[] = {"vda", "vda", NULL};
        char *bad_id[] = {"0disk", "vda", NULL};
        char *bad_name[] = {"virtio-disk0", "a/b", NULL};
        char *dot[] = {"virtio-disk0", "..", NULL};
        char *odd[] = {"virtio-disk0", NULL};
        char *dup_id[] = {"d0", "vda", "d0", "vdb", NULL};
        char *dup_name[] = {"d0", "vda", "d1", "vda", NULL};
        char *swap[] = {"d0", "d1", "d1", "d0", NULL};
        char **many = calloc(2 * DISK_NAMES_MAX + 3, sizeof(char *));
        size_t i = 99;

        ASSERT_EQ(disk_names_check(NULL, &i), DISK_NAMES_OK);
        ASSERT_EQ(disk_names_check(ok, &i), DISK_NAMES_OK);
        ASSERT_EQ(disk_names_check(same, &i), DISK_NAMES_OK);
        ASSERT_EQ(disk_names_check(bad_id, &i), DISK_NAMES_BAD_ID);
        ASSERT_EQ(disk_names_check(bad_name, &i), DISK_NAMES_BAD_NAME);
        ASSERT_EQ(disk_names_check(dot, &i), DISK_NAMES_BAD_NAME);
        ASSERT_EQ(disk_names_check(odd, &i), DISK_NAMES_BAD_NAME);
        ASSERT_EQ(disk_names_check(dup_id, &i), DISK_NAMES_DUPLICATE_ID);
        ASSERT_EQ(i, 1);
        ASSERT_EQ(disk_names_check(dup_name, &i), DISK_NAMES_DUPLICATE_NAME);
        ASSERT_EQ(i, 1);
        ASSERT_EQ(disk_names_check(swap, &i), DISK_NAMES_NAME_IS_ID);
        ASSERT_EQ(i, 0);
        ASSERT_STREQ(disk_names_name_of(ok, "ua-data"), "vdb");
        ASSERT_STREQ(disk_names_id_of(ok, "sda"), "scsi0-0-0-0");
        ASSERT_TRUE(disk_names_name_of(ok, "vda") == NULL);
        ASSERT_TRUE(disk_names_id_of(ok, "virtio-disk0") == NULL);
        ASSERT_TRUE(disk_names_id_of(NULL, "vda") == NULL);

        ASSERT_TRUE(many != NULL);
        for (size_t k = 0; many && k < DISK_NAMES_MAX + 1; k++) {
                many[2 * k] = strdup_printf("d%zu", k);
                many[2 * k + 1] = strdup_printf("n%zu", k);
        }
        ASSERT_EQ(disk_names_check(many, &i), DISK_NAMES_TOO_MANY);
        free(many[2 * DISK_NAMES_MAX]);
        free(many[2 * DISK_NAMES_MAX + 1]);
        many[2 * DISK_NAMES_MAX] = many[2 * DISK_NAMES_MAX + 1] = NULL;
        ASSERT_EQ(disk_names_check(many, &i), DISK_NAMES_OK);
        strv_free(many);
}

static void test_path_is_safe_absolute(void) {
        char *long_path;

        ASSERT_TRUE(path_is_safe_absolute("/", 100));
        ASSERT_TRUE(path_is_safe_absolute("/a", 100));
        ASSERT_TRUE(path_is_safe_absolute("/srv/images/vm1.qcow2", 100));
        ASSERT_TRUE(path_is_safe_absolute("/a/.b/c..", 100));
        ASSERT_TRUE(path_is_safe_absolute("/...", 100));
        ASSERT_TRUE(path_is_safe_absolute("/a b/caf\xc3\xa9", 100));

        ASSERT_FALSE(path_is_safe_absolute(NULL, 100));
        ASSERT_FALSE(path_is_safe_absolute("", 100));
        ASSERT_FALSE(path_is_safe_absolute("a/b", 100));
        ASSERT_FALSE(path_is_safe_absolute("./a", 100));
        ASSERT_FALSE(path_is_safe_absolute("~/a", 100));
        ASSERT_FALSE(path_is_safe_absolute("/a/../b", 100));
        ASSERT_FALSE(path_is_safe_absolute("/a/./b", 100));
        ASSERT_FALSE(path_is_safe_absolute("/..", 100));
        ASSERT_FALSE(path_is_safe_absolute("/.", 100));
        ASSERT_FALSE(path_is_safe_absolute("/a/..", 100));
        ASSERT_FALSE(path_is_safe_absolute("/a/.", 100));
        ASSERT_FALSE(path_is_safe_absolute("/../a", 100));
        ASSERT_FALSE(path_is_safe_absolute("/a//b", 100));
        ASSERT_FALSE(path_is_safe_absolute("//a", 100));
        ASSERT_FALSE(path_is_safe_absolute("/a/", 100));
        ASSERT_FALSE(path_is_safe_absolute("/a\nb", 100));
        ASSERT_FALSE(path_is_safe_absolute("/a\tb", 100));
        ASSERT_FALSE(path_is_safe_absolute("/a\rb", 100));
        ASSERT_FALSE(path_is_safe_absolute("/a\x1b[0m", 100));
        ASSERT_FALSE(path_is_safe_absolute("/a\x7f", 100));

        /* Length: max_len inclusive, and never beyond PATH_MAX - 1 whatever max_len says. */
        ASSERT_TRUE(path_is_safe_absolute("/abcdefghi", 10));
        ASSERT_FALSE(path_is_safe_absolute("/abcdefghij", 10));
        long_path = malloc(PATH_MAX + 2);
        ASSERT_NOT_NULL(long_path);
        if (long_path) {
                long_path[0] = '/';
                memset(long_path + 1, 'a', PATH_MAX);
                long_path[PATH_MAX + 1] = 0;
                ASSERT_FALSE(path_is_safe_absolute(long_path, SIZE_MAX));
                long_path[PATH_MAX - 1] = 0; /* strlen PATH_MAX - 1 */
                ASSERT_TRUE(path_is_safe_absolute(long_path, SIZE_MAX));
                free(long_path);
        }
}

static void test_path_is_below(void) {
        ASSERT_TRUE(path_is_below("/srv/images/a.qcow2", "/srv/images"));
        ASSERT_TRUE(path_is_below("/srv/images/sub/a.qcow2", "/srv/images"));
        ASSERT_TRUE(path_is_below("/srv/images", "/srv/images"));
        ASSERT_FALSE(path_is_below("/srv/img", "/srv/images"));
        ASSERT_FALSE(path_is_below("/srv/images", "/srv/img"));
        ASSERT_FALSE(path_is_below("/srv/images2/a.qcow2", "/srv/images"));
        ASSERT_FALSE(path_is_below("/srv/images-old/a", "/srv/images"));
        ASSERT_FALSE(path_is_below("/srv", "/srv/images"));
        ASSERT_FALSE(path_is_below("/other/images/a", "/srv/images"));
        ASSERT_TRUE(path_is_below("/anything", "/"));
        ASSERT_TRUE(path_is_below("/", "/"));
}

/* String vectors */

static void test_strv(void) {
        _cleanup_strv_free_ char **l = NULL, **c = NULL;

        ASSERT_EQ(strv_length(NULL), 0);
        ASSERT_FALSE(strv_contains(NULL, "a"));
        ASSERT_TRUE(strv_equal(NULL, NULL));
        ASSERT_NULL(strv_free(NULL));

        ASSERT_ERRNO(strv_push(&l, NULL), -EINVAL);
        ASSERT_NULL(l);
        ASSERT_OK(strv_push(&l, strdup("a")));
        ASSERT_OK(strv_push(&l, strdup("b")));
        ASSERT_OK(strv_push(&l, strdup("c")));
        ASSERT_EQ(strv_length(l), 3);
        ASSERT_NULL(l[3]);
        ASSERT_STREQ(l[0], "a");
        ASSERT_STREQ(l[2], "c");
        ASSERT_TRUE(strv_contains(l, "b"));
        ASSERT_FALSE(strv_contains(l, "d"));
        ASSERT_FALSE(strv_contains(l, ""));

        c = strv_copy(l);
        ASSERT_NOT_NULL(c);
        ASSERT_TRUE(strv_equal(l, c));
        ASSERT_TRUE(c != l && c[0] != l[0]);
        free(c[2]);
        c[2] = strdup("x");
        ASSERT_FALSE(strv_equal(l, c));
        ASSERT_FALSE(strv_equal(l, NULL));

        {
                _cleanup_strv_free_ char **e = strv_copy(NULL);
                ASSERT_NOT_NULL(e);
                ASSERT_EQ(strv_length(e), 0);
                ASSERT_TRUE(strv_equal(e, NULL));
        }
}

/* Files */

static char *make_tmpdir(void) {
        char *d = strdup("/tmp/bsd-unit-util-XXXXXX");

        if (!d || !mkdtemp(d)) {
                free(d);
                return NULL;
        }
        return d;
}

static void rm_rf_flat(const char *dir) {
        DIR *d = opendir(dir);
        struct dirent *de;

        if (d) {
                while ((de = readdir(d))) {
                        _cleanup_free_ char *p = NULL;
                        if (streq(de->d_name, ".") || streq(de->d_name, ".."))
                                continue;
                        p = strdup_printf("%s/%s", dir, de->d_name);
                        if (p && unlink(p) < 0)
                                rmdir(p);
                }
                closedir(d);
        }
        rmdir(dir);
}

static unsigned count_entries(const char *dir) {
        DIR *d = opendir(dir);
        struct dirent *de;
        unsigned n = 0;

        if (!d)
                return 0;
        while ((de = readdir(d)))
                if (!streq(de->d_name, ".") && !streq(de->d_name, ".."))
                        n++;
        closedir(d);
        return n;
}

static void test_write_read_file(void) {
        _cleanup_free_ char *dir = make_tmpdir(), *p = NULL, *q = NULL, *text = NULL;
        struct stat st;
        size_t len = 99;

        ASSERT_NOT_NULL(dir);
        if (!dir)
                return;
        p = strdup_printf("%s/state.json", dir);

        ASSERT_OK(write_file_atomic(p, "hello", 5, 0600));
        ASSERT_OK(stat(p, &st));
        ASSERT_EQ(st.st_mode & 07777, 0600);
        ASSERT_EQ(st.st_size, 5);
        ASSERT_OK(read_file_bounded(p, 5, &text, &len));
        ASSERT_STREQ(text, "hello");
        ASSERT_EQ(len, 5);
        text = mfree(text);

        /* Exactly the limit is fine, one byte over is not. */
        ASSERT_ERRNO(read_file_bounded(p, 4, &text, &len), -EFBIG);
        ASSERT_NULL(text);

        /* Replacing keeps no temp file behind and changes the mode as asked. */
        ASSERT_OK(write_file_atomic(p, "second version", 14, 0644));
        ASSERT_OK(stat(p, &st));
        ASSERT_EQ(st.st_mode & 07777, 0644);
        ASSERT_OK(read_file_bounded(p, 100, &text, NULL));
        ASSERT_STREQ(text, "second version");
        text = mfree(text);
        ASSERT_EQ(count_entries(dir), 1);

        /* Empty file: empty NUL-terminated string. */
        ASSERT_OK(write_file_atomic(p, "", 0, 0600));
        ASSERT_OK(read_file_bounded(p, 0, &text, &len));
        ASSERT_NOT_NULL(text);
        ASSERT_STREQ(text, "");
        ASSERT_EQ(len, 0);
        text = mfree(text);

        /* Binary content with NULs survives with its length. */
        ASSERT_OK(write_file_atomic(p, "a\0b", 3, 0600));
        ASSERT_OK(read_file_bounded(p, 3, &text, &len));
        ASSERT_EQ(len, 3);
        ASSERT_TRUE(text && memcmp(text, "a\0b", 4) == 0);
        text = mfree(text);

        /* A symlink is refused (O_NOFOLLOW), not followed. */
        q = strdup_printf("%s/link", dir);
        ASSERT_OK(symlink(p, q));
        ASSERT_ERRNO(read_file_bounded(q, 100, &text, &len), -ELOOP);
        ASSERT_NULL(text);

        /* Writing through a symlink replaces the link, it does not write to its target. */
        ASSERT_OK(write_file_atomic(q, "via link", 8, 0600));
        ASSERT_OK(lstat(q, &st));
        ASSERT_TRUE(S_ISREG(st.st_mode));
        ASSERT_OK(read_file_bounded(p, 100, &text, NULL));
        ASSERT_TRUE(text && memcmp(text, "a\0b", 4) == 0);
        text = mfree(text);

        /* Not a regular file. */
        ASSERT_ERRNO(read_file_bounded(dir, 100, &text, &len), -EBADF);
        ASSERT_ERRNO(read_file_bounded("/dev/null", 100, &text, &len), -EBADF);
        ASSERT_NULL(text);

        /* Missing. */
        {
                _cleanup_free_ char *m = strdup_printf("%s/missing", dir);
                ASSERT_ERRNO(read_file_bounded(m, 100, &text, &len), -ENOENT);
        }

        /* A file whose size stat() does not know (procfs) is still bounded by what is read. */
        ASSERT_ERRNO(read_file_bounded("/proc/self/status", 16, &text, &len), -EFBIG);
        ASSERT_NULL(text);
        ASSERT_OK(read_file_bounded("/proc/self/status", 1 << 20, &text, &len));
        ASSERT_TRUE(len > 16 && text && strlen(text) == len);
        text = mfree(text);

        /* Bad targets for writing. */
        ASSERT_ERRNO(write_file_atomic("relative-no-slash", "x", 1, 0600), -EINVAL);
        {
                _cleanup_free_ char *m = strdup_printf("%s/nodir/file", dir);
                ASSERT_ERRNO(write_file_atomic(m, "x", 1, 0600), -ENOENT);
        }
        ASSERT_EQ(count_entries(dir), 2); /* state.json and link: no temp file left */

        rm_rf_flat(dir);
}

/* loop_read(): at an offset or from the position, every byte up to len, fewer only at the end,
 * across a pipe's separate writes. */
static void test_loop_read(void) {
        char buf[32];
        int p[2];

        ASSERT_OK(pipe(p));
        ASSERT_EQ(write(p[1], "abc", 3), 3);
        ASSERT_EQ(write(p[1], "defg", 4), 4);
        close(p[1]);
        ASSERT_EQ(loop_read(p[0], buf, 5, -1), 5);
        ASSERT_TRUE(memcmp(buf, "abcde", 5) == 0);
        ASSERT_EQ(loop_read(p[0], buf, sizeof(buf), -1), 2); /* the end */
        ASSERT_EQ(loop_read(p[0], buf, sizeof(buf), -1), 0);
        close(p[0]);

        p[0] = open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
        ASSERT_EQ(loop_read(p[0], buf, 4, 1), 4);
        ASSERT_TRUE(memcmp(buf, "ELF\x02", 4) == 0);
        ASSERT_EQ(loop_read(p[0], buf, 4, INT64_C(1) << 40), 0); /* past the end */
        close(p[0]);
        ASSERT_ERRNO(loop_read(-1, buf, 4, -1), -EBADF);
}

static void test_mkdir_p(void) {
        _cleanup_free_ char *dir = make_tmpdir(), *p = NULL;
        struct stat st;

        ASSERT_NOT_NULL(dir);
        if (!dir)
                return;
        p = strdup_printf("%s/a/b/c", dir);
        ASSERT_OK(mkdir_p(p, 0700));
        ASSERT_OK(stat(p, &st));
        ASSERT_TRUE(S_ISDIR(st.st_mode));
        ASSERT_OK(mkdir_p(p, 0700)); /* exists: fine */
        {
                _cleanup_free_ char *a = strdup_printf("%s/a/b/c", dir), *b = strdup_printf("%s/a/b", dir),
                                    *c = strdup_printf("%s/a", dir);
                rmdir(a);
                rmdir(b);
                rmdir(c);
        }
        rmdir(dir);
}

/* A listener that accepts nothing: the connection queues at once or it is -EAGAIN, never a
 * wait (a blocking connect() would hang this test). */
static void test_connect_unix_nonblock(void) {
        _cleanup_free_ char *dir = make_tmpdir(), *path = NULL, *long_path = NULL;
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        _cleanup_close_ int l = -1;
        int fds[16], n = 0, r = 0;

        ASSERT_NOT_NULL(dir);
        if (!dir)
                return;
        path = strdup_printf("%s/l.sock", dir);
        ASSERT_EQ(connect_unix_nonblock(path), -ENOENT);
        strcpy(sa.sun_path, path);
        l = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        ASSERT_OK(bind(l, (struct sockaddr *) &sa, sizeof(sa)));
        ASSERT_OK(listen(l, 0));
        while (n < (int) ELEMENTSOF(fds)) {
                r = connect_unix_nonblock(path);
                if (r < 0)
                        break;
                ASSERT_EQ(fcntl(r, F_GETFL) & O_NONBLOCK, 0);
                ASSERT_TRUE(fcntl(r, F_GETFD) & FD_CLOEXEC);
                fds[n++] = r;
        }
        ASSERT_EQ(r, -EAGAIN);
        ASSERT_TRUE(n >= 1 && n < (int) ELEMENTSOF(fds));
        /* Room again once one is accepted. */
        {
                _cleanup_close_ int a = accept4(l, NULL, NULL, SOCK_CLOEXEC);
                ASSERT_TRUE(a >= 0);
                r = connect_unix_nonblock(path);
                ASSERT_TRUE(r >= 0);
                if (r >= 0)
                        close(r);
        }
        for (int i = 0; i < n; i++)
                close(fds[i]);
        long_path = calloc(1, sizeof(sa.sun_path) + 2);
        if (long_path)
                memset(long_path, 'x', sizeof(sa.sun_path) + 1);
        ASSERT_EQ(connect_unix_nonblock(long_path), -ENAMETOOLONG);
        unlink(path);
        rmdir(dir);
}

static void test_misc(void) {
        _cleanup_free_ char *s = strdup_printf("%s-%d", "x", 42);
        usec_t a, b;

        ASSERT_STREQ(s, "x-42");
        ASSERT_TRUE(streq_ptr(NULL, NULL));
        ASSERT_FALSE(streq_ptr("a", NULL));
        ASSERT_TRUE(isempty(NULL) && isempty(""));
        ASSERT_STREQ(strempty(NULL), "");
        a = now_usec(CLOCK_MONOTONIC);
        b = now_usec(CLOCK_MONOTONIC);
        ASSERT_TRUE(b >= a);
        {
                uint64_t sum;
                ASSERT_TRUE(add_overflows_u64(UINT64_MAX, 1, &sum));
                ASSERT_FALSE(add_overflows_u64(UINT64_MAX - 1, 1, &sum));
                ASSERT_EQ_U64(sum, UINT64_MAX);
        }
        /* The _errno log helpers return -abs(error). */
        log_set_max_level(LOG_LEVEL_ERR);
        ASSERT_EQ(log_debug_errno(EIO, "ignored"), -EIO);
        ASSERT_EQ(log_debug_errno(-EIO, "ignored"), -EIO);
        log_set_max_level(LOG_LEVEL_INFO);
}

/* text_sanitize: whatever bytes come in, what comes out is valid UTF-8 without control
 * characters, bounded, and cut at a character boundary. */
static void test_text_sanitize(void) {
        static const struct {
                const char *in;
                size_t len;
                const char *out;
        } t[] = {
                {"plain text", 10, "plain text"},
                {"", 0, ""},
                {"caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80", 14, "caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80"},
                {"a\xFF" "b", 3, "a\xEF\xBF\xBD" "b"},
                {"\xFF\xFE", 2, "\xEF\xBF\xBD\xEF\xBF\xBD"},
                {"\xC0\xAF", 2, "\xEF\xBF\xBD\xEF\xBF\xBD"},           /* overlong '/' */
                {"\xED\xA0\x80", 3, "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"}, /* a surrogate */
                {"\xF4\x90\x80\x80", 4, "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"}, /* past U+10FFFF */
                {"x\xE2\x82", 3, "x\xEF\xBF\xBD\xEF\xBF\xBD"},         /* cut short */
                {"line\nnext\r\tend", 15, "line next  end"},
                {"\x1B[31mred\x7F", 9, " [31mred "},
                {"\xC2\x9B" "1m", 4, " 1m"},                              /* C1 CSI */
                {"\xC2\xA0nbsp", 6, "\xC2\xA0nbsp"},
                {"ab\0cd", 5, "ab"},                                       /* NUL ends it */
                /* Noncharacters, which sd-bus refuses in a string (one fails GetManagedObjects). */
                {"\xEF\xBF\xBF", 3, "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"},             /* U+FFFF */
                {"\xEF\xBF\xBE", 3, "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"},             /* U+FFFE */
                {"\xEF\xB7\x90", 3, "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"},             /* U+FDD0 */
                {"\xEF\xB7\xAF", 3, "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"},             /* U+FDEF */
                {"\xF0\x9F\xBF\xBE", 4, "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"}, /* U+1FFFE */
                {"\xF4\x8F\xBF\xBF", 4, "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"}, /* U+10FFFF */
                {"\xEF\xB7\x8F\xEF\xB7\xB0\xEF\xBF\xBD", 9, "\xEF\xB7\x8F\xEF\xB7\xB0\xEF\xBF\xBD"}, /* U+FDCF, U+FDF0, U+FFFD */
        };
        char buf[8];

        for (size_t i = 0; i < ELEMENTSOF(t); i++) {
                _cleanup_free_ char *s = text_sanitize(t[i].in, t[i].len, TEXT_SANITIZE_MAX);
                ASSERT_NOT_NULL(s);
                if (!s)
                        continue;
                ASSERT_STREQ(s, t[i].out);
                ASSERT_TRUE(utf8_is_valid(s));
        }

        /* Bounded: the cut never splits a character. */
        ASSERT_EQ(text_sanitize_buf(buf, sizeof(buf), "abcdefghij", 10), 7);
        ASSERT_STREQ(buf, "abcdefg");
        ASSERT_EQ(text_sanitize_buf(buf, sizeof(buf), "abcde\xE2\x82\xAC", 8), 5);
        ASSERT_STREQ(buf, "abcde");
        ASSERT_EQ(text_sanitize_buf(buf, sizeof(buf), "abcde\xFF", 6), 5);
        ASSERT_STREQ(buf, "abcde");
        ASSERT_EQ(text_sanitize_buf(buf, 1, "abc", 3), 0);
        ASSERT_STREQ(buf, "");
        ASSERT_EQ(text_sanitize_buf(buf, sizeof(buf), NULL, 5), 0);
        {
                _cleanup_free_ char *big = malloc(4096), *s = NULL;
                ASSERT_NOT_NULL(big);
                if (big) {
                        for (size_t i = 0; i < 4096; i++)
                                big[i] = (char) (0x80 + i % 0x80); /* continuation bytes and worse */
                        s = text_sanitize(big, 4096, TEXT_SANITIZE_MAX);
                        ASSERT_NOT_NULL(s);
                        if (s) {
                                ASSERT_TRUE(strlen(s) <= TEXT_SANITIZE_MAX);
                                ASSERT_TRUE(utf8_is_valid(s));
                        }
                }
        }
        {
                _cleanup_free_ char *s = text_sanitize_str(NULL);
                ASSERT_STREQ(s, "");
        }
}

/* json-c 0.16 does duplocale(uselocale(NULL)) + newlocale(LC_NUMERIC_MASK, "C", ...) +
 * freelocale() around every json_tokener_parse_ex(): after locale_use_c() these must hand back
 * the thread's own static object (no copy, nothing allocated), and numbers still read with '.'. */
static void test_locale_use_c(void) {
        locale_t cur, d, n;

        ASSERT_TRUE(uselocale((locale_t) 0) == LC_GLOBAL_LOCALE);
        ASSERT_OK(locale_use_c());
        cur = uselocale((locale_t) 0);
        ASSERT_TRUE(cur != LC_GLOBAL_LOCALE);
        d = duplocale(cur);
        ASSERT_TRUE(d == cur);
        n = newlocale(LC_NUMERIC_MASK, "C", d);
        ASSERT_TRUE(n == cur);
        freelocale(n);
        ASSERT_TRUE(uselocale((locale_t) 0) == cur);
        ASSERT_TRUE(strtod("1.5", NULL) == 1.5);
        ASSERT_TRUE(uselocale(LC_GLOBAL_LOCALE) == cur);
}

/* The log's and the CLI's one escaping: control characters as \xNN, nothing else touched, and a
 * cut never inside an escape. */
static void test_escape_controls(void) {
        char out[64];

        escape_controls("a\n<0>b\x1b[2J\x7f\xc2\x9b\xc3\xa9/", out, sizeof(out));
        ASSERT_STREQ(out, "a\\x0a<0>b\\x1b[2J\\x7f\\xc2\\x9b\xc3\xa9/");
        escape_controls("ab\ncd", out, 6);
        ASSERT_STREQ(out, "ab");
        escape_controls("\n\n", out, 9);
        ASSERT_STREQ(out, "\\x0a\\x0a");
}

/* The rate limit of QEMU's events and of what helpers and QEMUs put in the log: full at first,
 * then rate a second; what it holds back is counted and told with the next line let through. */
static void test_log_limit(void) {
        LogLimit l = {};
        TokenBucket b = {};
        uint64_t dropped = 99;
        usec_t t = 5 * USEC_PER_SEC;

        /* One a minute: the first passes, the next within the minute do not, then one passes
         * with their count. */
        ASSERT_TRUE(log_limit_minutely(&l, t, &dropped));
        ASSERT_EQ_U64(dropped, 0);
        for (int i = 0; i < 3; i++)
                ASSERT_FALSE(log_limit_minutely(&l, t + (usec_t) i * USEC_PER_SEC, &dropped));
        ASSERT_FALSE(log_limit_minutely(&l, t + 59 * USEC_PER_SEC, &dropped));
        ASSERT_TRUE(log_limit_minutely(&l, t + 60 * USEC_PER_SEC, &dropped));
        ASSERT_EQ_U64(dropped, 4);

        /* A burst of 3 at 10 a second: 3 at once, then one per 100 ms; a long pause refills to 3
         * only. */
        l = (LogLimit) {};
        for (int i = 0; i < 3; i++)
                ASSERT_TRUE(log_limit_pass(&l, 10, 3, t, &dropped));
        ASSERT_FALSE(log_limit_pass(&l, 10, 3, t, &dropped));
        ASSERT_TRUE(log_limit_pass(&l, 10, 3, t + USEC_PER_SEC / 10, &dropped));
        ASSERT_EQ_U64(dropped, 1);
        for (int i = 0; i < 3; i++)
                ASSERT_TRUE(log_limit_pass(&l, 10, 3, t + 3600 * USEC_PER_SEC, &dropped));
        ASSERT_FALSE(log_limit_pass(&l, 10, 3, t + 3600 * USEC_PER_SEC, &dropped));

        /* The bucket alone starts full. */
        token_bucket_refill(&b, 200, 400, t);
        ASSERT_TRUE(b.tokens == 400.0);
}

int main(int argc, char **argv) {
        tap_init(argc, argv);
        TAP_RUN(test_parse_size_valid);
        TAP_RUN(test_parse_size_overflow);
        TAP_RUN(test_parse_size_garbage);
        TAP_RUN(test_parse_size_whitespace);
        TAP_RUN(test_format_bytes);
        TAP_RUN(test_format_bytes_rounding);
        TAP_RUN(test_guest_name);
        TAP_RUN(test_qemu_id);
        TAP_RUN(test_disk_names);
        TAP_RUN(test_path_is_safe_absolute);
        TAP_RUN(test_path_is_below);
        TAP_RUN(test_strv);
        TAP_RUN(test_write_read_file);
        TAP_RUN(test_loop_read);
        TAP_RUN(test_mkdir_p);
        TAP_RUN(test_connect_unix_nonblock);
        TAP_RUN(test_misc);
        TAP_RUN(test_text_sanitize);
        TAP_RUN(test_locale_use_c);
        TAP_RUN(test_escape_controls);
        TAP_RUN(test_log_limit);
        return tap_finish();
}
