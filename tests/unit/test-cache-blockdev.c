/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* A template cache's blockdev arguments (service/cache-blockdev.c): the template's protocol node
 * from its URL, as QEMU's nbd and curl drivers read the URL, and nothing from a URL they would
 * read otherwise. */

#include <string.h>

#include "cache-internal.h"
#include "tap.h"

/* The node as JSON text, or "NULL". */
static char *node(const char *url) {
        json_object *o = cache_template_file_blockdev(url);
        char *s = strdup(o ? json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE)
                           : "NULL");

        json_object_put(o);
        return s;
}

#define EXPECT_NODE(url, want)                                       \
        do {                                                         \
                char *_got = node(url);                              \
                ASSERT_STREQ(_got, want);                            \
                ASSERT_EQ(cache_template_url_ok(url), strcmp(want, "NULL") != 0); \
                free(_got);                                          \
        } while (0)

static void test_nbd(void) {
        EXPECT_NODE("nbd://10.0.0.5:10810/debian",
                "{\"driver\":\"nbd\",\"server\":{\"type\":\"inet\",\"host\":\"10.0.0.5\",\"port\":\"10810\"},"
                "\"export\":\"debian\",\"node-name\":\"tf\",\"read-only\":true}");
        /* No port, an empty one, or 0: QEMU's default. (No port read past the host before.) */
        EXPECT_NODE("nbd://srv/x", "{\"driver\":\"nbd\",\"server\":{\"type\":\"inet\",\"host\":\"srv\",\"port\":"
                                   "\"10809\"},\"export\":\"x\",\"node-name\":\"tf\",\"read-only\":true}");
        EXPECT_NODE("nbd://srv:/x", "{\"driver\":\"nbd\",\"server\":{\"type\":\"inet\",\"host\":\"srv\",\"port\":"
                                    "\"10809\"},\"export\":\"x\",\"node-name\":\"tf\",\"read-only\":true}");
        EXPECT_NODE("nbd://srv:0", "{\"driver\":\"nbd\",\"server\":{\"type\":\"inet\",\"host\":\"srv\",\"port\":"
                                   "\"10809\"},\"export\":\"\",\"node-name\":\"tf\",\"read-only\":true}");
        EXPECT_NODE("nbd://[::1]/a%2Fb", "{\"driver\":\"nbd\",\"server\":{\"type\":\"inet\",\"host\":\"::1\",\"port\":"
                                         "\"10809\"},\"export\":\"a/b\",\"node-name\":\"tf\",\"read-only\":true}");
        EXPECT_NODE("nbd://[::1]:99/", "{\"driver\":\"nbd\",\"server\":{\"type\":\"inet\",\"host\":\"::1\",\"port\":"
                                       "\"99\"},\"export\":\"\",\"node-name\":\"tf\",\"read-only\":true}");
        /* What QEMU would read otherwise, or not at all. */
        EXPECT_NODE("nbd://user@srv/x", "NULL");
        EXPECT_NODE("nbd://ex%61mple/x", "NULL");
        EXPECT_NODE("nbd://srv:65536/x", "NULL");
        EXPECT_NODE("nbd://srv:1x/x", "NULL");
        EXPECT_NODE("nbd://srv/x?socket=/tmp/s", "NULL");
        EXPECT_NODE("nbd://srv/x#y", "NULL");
        EXPECT_NODE("nbd://srv/a%00b", "NULL");
        EXPECT_NODE("nbd://srv/a%4", "NULL");
        EXPECT_NODE("nbd://[::1/x", "NULL");
        EXPECT_NODE("nbd://[::1]x/x", "NULL");
        EXPECT_NODE("nbd:///x", "NULL");
        EXPECT_NODE("nbd+unix:///x?socket=/tmp/s", "NULL");
}

static void test_http(void) {
        EXPECT_NODE("https://h/t.raw", "{\"driver\":\"https\",\"url\":\"https://h/t.raw\",\"readahead\":0,\"node-name\":"
                                       "\"tf\",\"read-only\":true}");
        EXPECT_NODE("http://h:8080/t.raw", "{\"driver\":\"http\",\"url\":\"http://h:8080/t.raw\",\"readahead\":0,"
                                           "\"node-name\":\"tf\",\"read-only\":true}");
}

/* The template's format node never opens a backing of its own; raw has none to give. */
static void test_template_node(void) {
        json_object *o = cache_template_blockdev("qcow2"), *b;

        ASSERT_TRUE(o && json_object_object_get_ex(o, "backing", &b) && b == NULL);
        json_object_put(o);
        o = cache_template_blockdev("raw");
        ASSERT_TRUE(o && !json_object_object_get_ex(o, "backing", NULL));
        json_object_put(o);
}

int main(void) {
        TAP_RUN(test_nbd);
        TAP_RUN(test_http);
        TAP_RUN(test_template_node);
        return tap_finish();
}
