/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The helpers' control protocol as the daemon reads it (service/control.c): framing and the
 * parsers of blockstream-pull's and blockstream-nbd-relay's lines. */

#include <string.h>

#include "control.h"
#include "util.h"
#include "tap.h"

/* A datagram as recv() returns it: len bytes in a buffer with room for one more. */
static int frame(char *buf, size_t size, const char *datagram, size_t len) {
        ASSERT_TRUE(len < size);
        memcpy(buf, datagram, len);
        return control_frame(buf, len);
}

static void test_frame(void) {
        char buf[CONTROL_MESSAGE_MAX + 2], big[CONTROL_MESSAGE_MAX + 1];

        ASSERT_OK(frame(buf, sizeof(buf), "ready\n", 6));
        ASSERT_STREQ(buf, "ready");
        ASSERT_ERRNO(frame(buf, sizeof(buf), "ready", 5), -EBADMSG);
        ASSERT_ERRNO(frame(buf, sizeof(buf), "", 0), -EBADMSG);
        ASSERT_ERRNO(frame(buf, sizeof(buf), "re\0dy\n", 6), -EBADMSG);
        memset(big, 'x', sizeof(big));
        big[sizeof(big) - 1] = '\n';
        ASSERT_ERRNO(frame(buf, sizeof(buf), big, sizeof(big)), -EBADMSG);
        ASSERT_OK(frame(buf, sizeof(buf), big + 1, sizeof(big) - 1));
}

static void test_u64(void) {
        uint64_t v;

        ASSERT_OK(control_parse_u64("0", &v));
        ASSERT_EQ_U64(v, 0);
        ASSERT_OK(control_parse_u64("18446744073709551615", &v));
        ASSERT_EQ_U64(v, UINT64_MAX);
        ASSERT_ERRNO(control_parse_u64("18446744073709551616", &v), -EBADMSG);
        ASSERT_ERRNO(control_parse_u64("", &v), -EBADMSG);
        ASSERT_ERRNO(control_parse_u64("-1", &v), -EBADMSG);
        ASSERT_ERRNO(control_parse_u64("+1", &v), -EBADMSG);
        ASSERT_ERRNO(control_parse_u64(" 1", &v), -EBADMSG);
        ASSERT_ERRNO(control_parse_u64("1 ", &v), -EBADMSG);
        ASSERT_ERRNO(control_parse_u64("0x10", &v), -EBADMSG);
}

static void test_pull(void) {
        ControlPullMessage m;

        ASSERT_OK(control_parse_pull("ready", &m));
        ASSERT_EQ(m.kind, CONTROL_PULL_READY);
        ASSERT_OK(control_parse_pull("done", &m));
        ASSERT_EQ(m.kind, CONTROL_PULL_DONE);
        ASSERT_OK(control_parse_pull("progress 5 10", &m));
        ASSERT_EQ(m.kind, CONTROL_PULL_PROGRESS);
        ASSERT_EQ_U64(m.done, 5);
        ASSERT_EQ_U64(m.total, 10);
        ASSERT_OK(control_parse_pull("extent 65536 131072 2 backing", &m));
        ASSERT_EQ(m.kind, CONTROL_PULL_EXTENT);
        ASSERT_EQ_U64(m.offset, 65536);
        ASSERT_EQ_U64(m.length, 131072);
        ASSERT_EQ_U64(m.depth, 2);
        ASSERT_EQ(m.extent_kind, CONTROL_EXTENT_BACKING);
        ASSERT_STREQ(control_extent_kind_to_string(m.extent_kind), "backing");
        ASSERT_OK(control_parse_pull("error it broke: EIO", &m));
        ASSERT_EQ(m.kind, CONTROL_PULL_ERROR);
        ASSERT_STREQ(m.text, "it broke: EIO");
        ASSERT_EQ_U64(m.text_len, 13);

        /* A known verb with bad arguments: the verb, and -EBADMSG. */
        const char *bad[] = { "progress 5", "progress 5 10 ", "progress  5 10", "progress 5 -10", "progress",
                "progress 99999999999999999999 1", "extent 0 1 1", "extent 0 1 1 ", "extent 0 1 1 local ",
                "extent 0 1 1 Local", "extent 0 1 x local", "extent -0 1 1 local" };
        for (size_t i = 0; i < ELEMENTSOF(bad); i++) {
                int r = control_parse_pull(bad[i], &m);
                if (strncmp(bad[i], "progress ", 9) == 0 || strncmp(bad[i], "extent ", 7) == 0) {
                        ASSERT_ERRNO(r, -EBADMSG);
                } else {
                        ASSERT_OK(r);
                        ASSERT_EQ(m.kind, CONTROL_PULL_UNKNOWN);
                }
        }
        const char *unknown[] = { "", "ready ", "Ready", "done now", "error", "errors x", "stop", "extent" };
        for (size_t i = 0; i < ELEMENTSOF(unknown); i++) {
                ASSERT_OK(control_parse_pull(unknown[i], &m));
                ASSERT_EQ(m.kind, CONTROL_PULL_UNKNOWN);
        }
}

static void test_relay(void) {
        ControlRelayMessage m;

        ASSERT_OK(control_parse_relay("ready", &m));
        ASSERT_EQ(m.kind, CONTROL_RELAY_READY);
        ASSERT_OK(control_parse_relay("connect 7", &m));
        ASSERT_EQ(m.kind, CONTROL_RELAY_CONNECT);
        ASSERT_EQ_U64(m.number, 7);
        ASSERT_OK(control_parse_relay("clients 0", &m));
        ASSERT_EQ(m.kind, CONTROL_RELAY_CLIENTS);
        ASSERT_EQ_U64(m.number, 0);
        ASSERT_OK(control_parse_relay("error accept: EMFILE", &m));
        ASSERT_EQ(m.kind, CONTROL_RELAY_ERROR);
        ASSERT_STREQ(m.text, "accept: EMFILE");
        ASSERT_EQ_U64(m.text_len, 14);
        /* What strtoul() let through before: an empty count, a sign, a leading space. */
        ASSERT_ERRNO(control_parse_relay("clients ", &m), -EBADMSG);
        ASSERT_EQ(m.kind, CONTROL_RELAY_CLIENTS);
        ASSERT_ERRNO(control_parse_relay("connect -1", &m), -EBADMSG);
        ASSERT_ERRNO(control_parse_relay("connect  1", &m), -EBADMSG);
        ASSERT_ERRNO(control_parse_relay("clients +3", &m), -EBADMSG);
        ASSERT_OK(control_parse_relay("upstream 1", &m));
        ASSERT_EQ(m.kind, CONTROL_RELAY_UNKNOWN);
        ASSERT_OK(control_parse_relay("connect", &m));
        ASSERT_EQ(m.kind, CONTROL_RELAY_UNKNOWN);
}

int main(int argc, char **argv) {
        tap_init(argc, argv);
        TAP_RUN(test_frame);
        TAP_RUN(test_u64);
        TAP_RUN(test_pull);
        TAP_RUN(test_relay);
        return tap_finish();
}
