/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The helpers' control protocol (service/control.c), both ends: framing, the parsers and
 * builders of blockstream-pull's and blockstream-nbd-relay's lines (as the daemon reads them)
 * and of the daemon's commands (as the helpers read them), and the send and receive of one
 * datagram with its fds over a real SOCK_SEQPACKET pair. */

#include <fcntl.h>
#include <string.h>
#include <sys/socket.h>

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
        /* An extent's kind follows from its depth. */
        const char *contradictions[] = { "extent 0 1 0 local", "extent 0 1 2 zero", "extent 0 1 1 backing",
                "extent 0 1 0 backing", "extent 0 1 1 absent", "extent 0 1 7 absent" };
        for (size_t i = 0; i < ELEMENTSOF(contradictions); i++) {
                ASSERT_ERRNO(control_parse_pull(contradictions[i], &m), -EBADMSG);
                ASSERT_EQ(m.kind, CONTROL_PULL_EXTENT);
        }
        const char *fits[] = { "extent 0 1 0 absent", "extent 0 1 1 local", "extent 0 1 1 zero", "extent 0 1 2 backing",
                "extent 0 1 4096 backing" };
        for (size_t i = 0; i < ELEMENTSOF(fits); i++)
                ASSERT_OK(control_parse_pull(fits[i], &m));
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


/* Helper lines the daemon reads: bytes its framing and parsers take as they come. */
static void test_helper_lines_hostile(void) {
        char buf[CONTROL_MESSAGE_MAX + 2];
        ControlPullMessage pm;
        ControlRelayMessage rm;

        /* A NUL anywhere in the datagram: not a line. */
        ASSERT_ERRNO(frame(buf, sizeof(buf), "error a\0b\n", 10), -EBADMSG);
        ASSERT_ERRNO(frame(buf, sizeof(buf), "\0\n", 2), -EBADMSG);
        /* Two lines in one datagram: the first '\n' is inside, and no verb takes it. */
        ASSERT_OK(frame(buf, sizeof(buf), "ready\ndone\n", 11));
        ASSERT_OK(control_parse_pull(buf, &pm));
        ASSERT_EQ(pm.kind, CONTROL_PULL_UNKNOWN);
        ASSERT_OK(control_parse_relay(buf, &rm));
        ASSERT_EQ(rm.kind, CONTROL_RELAY_UNKNOWN);
        /* Not UTF-8, control characters: an error's text is passed on raw, whole, for the caller
         * to sanitize; anywhere else they make the line malformed. */
        ASSERT_OK(frame(buf, sizeof(buf), "error \xff\xfe\x1b[2J\n", 13));
        ASSERT_OK(control_parse_pull(buf, &pm));
        ASSERT_EQ(pm.kind, CONTROL_PULL_ERROR);
        ASSERT_EQ_U64(pm.text_len, 6);
        ASSERT_TRUE(memcmp(pm.text, "\xff\xfe\x1b[2J", 6) == 0);
        ASSERT_OK(control_parse_relay(buf, &rm));
        ASSERT_EQ(rm.kind, CONTROL_RELAY_ERROR);
        ASSERT_EQ_U64(rm.text_len, 6);
        ASSERT_ERRNO(control_parse_pull("extent 0 1 1 loc\xc3\xa1l", &pm), -EBADMSG);
        ASSERT_ERRNO(control_parse_pull("progress 1\t2", &pm), -EBADMSG);
        ASSERT_ERRNO(control_parse_pull("progress \xd9\xa1 2", &pm), -EBADMSG); /* Arabic-Indic one */
        ASSERT_ERRNO(control_parse_relay("connect 1\x7f", &rm), -EBADMSG);
        ASSERT_ERRNO(control_parse_relay("clients \xef\xbc\x91", &rm), -EBADMSG); /* fullwidth one */
        /* The longest line there may be: whole, and its text whole. */
        memset(buf, 'x', CONTROL_MESSAGE_MAX);
        memcpy(buf, "error ", 6);
        buf[CONTROL_MESSAGE_MAX - 1] = '\n';
        ASSERT_OK(control_frame(buf, CONTROL_MESSAGE_MAX));
        ASSERT_OK(control_parse_relay(buf, &rm));
        ASSERT_EQ(rm.kind, CONTROL_RELAY_ERROR);
        ASSERT_EQ_U64(rm.text_len, CONTROL_MESSAGE_MAX - 7);
        /* Numbers at and past the edge, in each place one stands. */
        ASSERT_OK(control_parse_pull("extent 18446744073709551615 18446744073709551615 18446744073709551615 backing", &pm));
        ASSERT_EQ_U64(pm.offset, UINT64_MAX);
        ASSERT_EQ_U64(pm.depth, UINT64_MAX);
        ASSERT_EQ(pm.extent_kind, CONTROL_EXTENT_BACKING);
        ASSERT_ERRNO(control_parse_pull("extent 18446744073709551616 1 1 local", &pm), -EBADMSG);
        ASSERT_ERRNO(control_parse_pull("extent 0 18446744073709551616 1 local", &pm), -EBADMSG);
        ASSERT_ERRNO(control_parse_pull("extent 0 1 18446744073709551616 local", &pm), -EBADMSG);
        ASSERT_ERRNO(control_parse_pull("progress 1 18446744073709551616", &pm), -EBADMSG);
        ASSERT_ERRNO(control_parse_relay("connect 18446744073709551616", &rm), -EBADMSG);
        ASSERT_ERRNO(control_parse_relay("clients 18446744073709551616", &rm), -EBADMSG);
}

/* A datagram as recvmsg() returns it, parsed as a helper parses it. */
static int command(const char *datagram, size_t len, ControlCommand *ret, char *buf) {
        ASSERT_TRUE(len <= CONTROL_MESSAGE_MAX + 1);
        memcpy(buf, datagram, len);
        buf[len] = 0;
        return control_parse_command(buf, len, ret);
}
#define COMMAND(s, ret) command((s), sizeof(s) - 1, (ret), buf)

static void test_command(void) {
        char buf[CONTROL_MESSAGE_MAX + 2];
        ControlCommand c;

        const struct {
                const char *line;
                ControlCommandKind kind;
                uint64_t number;
                const char *text;
        } valid[] = {
                { "stop\n", CONTROL_COMMAND_STOP },
                { "pause\n", CONTROL_COMMAND_PAUSE },
                { "resume\n", CONTROL_COMMAND_RESUME },
                { "bandwidth 0\n", CONTROL_COMMAND_BANDWIDTH, 0 },
                { "bandwidth 18446744073709551615\n", CONTROL_COMMAND_BANDWIDTH, UINT64_MAX },
                { "upstream 1\n", CONTROL_COMMAND_UPSTREAM, 1 },
                { "refused 3\n", CONTROL_COMMAND_REFUSED, 3, "" },
                { "refused 3 no exports today\n", CONTROL_COMMAND_REFUSED, 3, "no exports today" },
                { "refused 3 \n", CONTROL_COMMAND_REFUSED, 3, "" },
        };
        for (size_t i = 0; i < ELEMENTSOF(valid); i++) {
                ASSERT_OK(command(valid[i].line, strlen(valid[i].line), &c, buf));
                ASSERT_EQ(c.kind, valid[i].kind);
                ASSERT_EQ_U64(c.number, valid[i].number);
                if (valid[i].text)
                        ASSERT_STREQ(c.text, valid[i].text);
        }

        /* Only upstream brings an fd. */
        ASSERT_EQ(control_command_n_fds(CONTROL_COMMAND_UPSTREAM), 1);
        for (ControlCommandKind k = CONTROL_COMMAND_UNKNOWN; k <= CONTROL_COMMAND_REFUSED; k++)
                if (k != CONTROL_COMMAND_UPSTREAM)
                        ASSERT_EQ(control_command_n_fds(k), 0);

        /* Verbs nobody knows, the helpers' own, a verb without its argument: unknown, which
         * both helpers take for an error. */
        const char *unknown[] = { "hello\n", "Stop\n", "stop \n", " stop\n", "ready\n", "done\n", "upstream\n",
                "bandwidth\n", "refused\n", "\n", "pause now\n" };
        for (size_t i = 0; i < ELEMENTSOF(unknown); i++) {
                ASSERT_OK(command(unknown[i], strlen(unknown[i]), &c, buf));
                ASSERT_EQ(c.kind, CONTROL_COMMAND_UNKNOWN);
        }

        /* A known verb with bad arguments: the verb, and -EBADMSG. Numbers have one form only:
         * the daemon writes them with %PRIu64. */
        const char *bad[] = { "bandwidth x\n", "bandwidth -1\n", "bandwidth +1\n", "bandwidth 1 2\n",
                "bandwidth 99999999999999999999999\n", "bandwidth 18446744073709551616\n", "bandwidth 1M\n",
                "bandwidth 01\n", "bandwidth \n", "bandwidth  1\n", "bandwidth 0x10\n", "upstream 01\n", "upstream -1\n",
                "upstream +1\n", "upstream 1 \n", "upstream 1 x\n", "upstream \n", "upstream 99999999999999999999999\n",
                "refused x\n", "refused 01 x\n", "refused  x\n", "refused -1 x\n", "refused 1x\n", "refused \n" };
        for (size_t i = 0; i < ELEMENTSOF(bad); i++) {
                ASSERT_ERRNO(command(bad[i], strlen(bad[i]), &c, buf), -EBADMSG);
                ASSERT_TRUE(c.kind != CONTROL_COMMAND_UNKNOWN);
        }

        /* Not a line: no newline, an empty datagram, a NUL, a newline inside. */
        ASSERT_ERRNO(COMMAND("pause", &c), -EBADMSG);
        ASSERT_ERRNO(command("", 0, &c, buf), -EBADMSG);
        ASSERT_ERRNO(COMMAND("pa\0use\n", &c), -EBADMSG);
        ASSERT_ERRNO(COMMAND("stop\0\n", &c), -EBADMSG);
        ASSERT_ERRNO(COMMAND("pause\n\n", &c), -EBADMSG);
        ASSERT_ERRNO(COMMAND("stop\nstop\n", &c), -EBADMSG);
        /* Printable ASCII only, the text of refused too: no control character, no DEL, no byte
         * above 0x7e, be it UTF-8 or not. */
        ASSERT_ERRNO(COMMAND("refused 1 a\tb\n", &c), -EBADMSG);
        ASSERT_ERRNO(COMMAND("refused 1 a\rb\n", &c), -EBADMSG);
        ASSERT_ERRNO(COMMAND("refused 1 a\x7f\n", &c), -EBADMSG);
        ASSERT_ERRNO(COMMAND("refused 1 caf\xc3\xa9\n", &c), -EBADMSG);
        ASSERT_ERRNO(COMMAND("refused 1 \xff\xfe\n", &c), -EBADMSG);
        ASSERT_ERRNO(COMMAND("refused 1 \x1b[2J\n", &c), -EBADMSG);
        ASSERT_ERRNO(COMMAND("bandwidth \xd9\xa1\n", &c), -EBADMSG);

        /* Length: CONTROL_MESSAGE_MAX bytes are a line, one more is not. */
        char big[CONTROL_MESSAGE_MAX + 1];
        memset(big, 'x', sizeof(big));
        memcpy(big, "refused 1 ", 10);
        big[CONTROL_MESSAGE_MAX - 1] = '\n';
        ASSERT_OK(command(big, CONTROL_MESSAGE_MAX, &c, buf));
        ASSERT_EQ(c.kind, CONTROL_COMMAND_REFUSED);
        ASSERT_EQ_U64(strlen(c.text), CONTROL_MESSAGE_MAX - 11);
        big[CONTROL_MESSAGE_MAX - 1] = 'x';
        big[CONTROL_MESSAGE_MAX] = '\n';
        ASSERT_ERRNO(command(big, CONTROL_MESSAGE_MAX + 1, &c, buf), -EBADMSG);
}

/* Each builder's line parses back to what was built. */
static void test_roundtrip(void) {
        char line[CONTROL_MESSAGE_MAX + 2];
        int n;

        const ControlPullMessage pulls[] = {
                { .kind = CONTROL_PULL_READY },
                { .kind = CONTROL_PULL_DONE },
                { .kind = CONTROL_PULL_PROGRESS, .done = 0, .total = UINT64_MAX },
                { .kind = CONTROL_PULL_EXTENT, .offset = 0, .length = 65536, .depth = 1, .extent_kind = CONTROL_EXTENT_LOCAL },
                { .kind = CONTROL_PULL_EXTENT, .offset = 1, .length = 2, .depth = 1, .extent_kind = CONTROL_EXTENT_ZERO },
                { .kind = CONTROL_PULL_EXTENT, .offset = UINT64_MAX, .length = 2, .depth = 7, .extent_kind = CONTROL_EXTENT_BACKING },
                { .kind = CONTROL_PULL_EXTENT, .offset = 4, .length = 5, .depth = 0, .extent_kind = CONTROL_EXTENT_ABSENT },
                { .kind = CONTROL_PULL_ERROR, .text = "NBD handshake failed", .text_len = 20 },
        };
        for (size_t i = 0; i < ELEMENTSOF(pulls); i++) {
                ControlPullMessage m;

                n = control_format_pull(line, sizeof(line), &pulls[i]);
                ASSERT_OK(n);
                ASSERT_EQ(n, strlen(line));
                ASSERT_OK(control_frame(line, (size_t) n));
                ASSERT_OK(control_parse_pull(line, &m));
                ASSERT_EQ(m.kind, pulls[i].kind);
                ASSERT_EQ_U64(m.done, pulls[i].done);
                ASSERT_EQ_U64(m.total, pulls[i].total);
                ASSERT_EQ_U64(m.offset, pulls[i].offset);
                ASSERT_EQ_U64(m.length, pulls[i].length);
                ASSERT_EQ_U64(m.depth, pulls[i].depth);
                ASSERT_EQ(m.extent_kind, pulls[i].extent_kind);
                ASSERT_EQ_U64(m.text_len, pulls[i].text_len);
                if (pulls[i].text)
                        ASSERT_TRUE(memcmp(m.text, pulls[i].text, m.text_len) == 0);
        }

        const ControlRelayMessage relays[] = {
                { .kind = CONTROL_RELAY_READY },
                { .kind = CONTROL_RELAY_CONNECT, .number = 1 },
                { .kind = CONTROL_RELAY_CONNECT, .number = UINT64_MAX },
                { .kind = CONTROL_RELAY_CLIENTS, .number = 0 },
                { .kind = CONTROL_RELAY_ERROR, .text = "accept: EMFILE", .text_len = 14 },
        };
        for (size_t i = 0; i < ELEMENTSOF(relays); i++) {
                ControlRelayMessage m;

                n = control_format_relay(line, sizeof(line), &relays[i]);
                ASSERT_OK(n);
                ASSERT_OK(control_frame(line, (size_t) n));
                ASSERT_OK(control_parse_relay(line, &m));
                ASSERT_EQ(m.kind, relays[i].kind);
                ASSERT_EQ_U64(m.number, relays[i].number);
                ASSERT_EQ_U64(m.text_len, relays[i].text_len);
        }

        const ControlCommand commands[] = {
                { .kind = CONTROL_COMMAND_STOP },
                { .kind = CONTROL_COMMAND_PAUSE },
                { .kind = CONTROL_COMMAND_RESUME },
                { .kind = CONTROL_COMMAND_BANDWIDTH, .number = 0 },
                { .kind = CONTROL_COMMAND_BANDWIDTH, .number = UINT64_MAX },
                { .kind = CONTROL_COMMAND_UPSTREAM, .number = 42 },
                { .kind = CONTROL_COMMAND_REFUSED, .number = 7, .text = "Connection refused" },
                { .kind = CONTROL_COMMAND_REFUSED, .number = 8, .text = "" },
        };
        for (size_t i = 0; i < ELEMENTSOF(commands); i++) {
                ControlCommand m;

                n = control_format_command(line, sizeof(line), &commands[i]);
                ASSERT_OK(n);
                ASSERT_OK(control_parse_command(line, (size_t) n, &m));
                ASSERT_EQ(m.kind, commands[i].kind);
                ASSERT_EQ_U64(m.number, commands[i].number);
                if (commands[i].text)
                        ASSERT_STREQ(m.text, commands[i].text);
        }
}

/* What a builder must not write: a line too long, an unknown kind, bytes that are no text. */
static void test_format_limits(void) {
        char line[CONTROL_MESSAGE_MAX + 2], text[600], small[8];
        ControlPullMessage m;
        int n;

        /* An error's text is cut to fit one line, and made printable. */
        memset(text, 'e', sizeof(text));
        text[3] = '\n';
        text[4] = 0x1b;
        text[5] = (char) 0xff;
        n = control_format_pull(line, sizeof(line), &(ControlPullMessage) { .kind = CONTROL_PULL_ERROR, .text = text, .text_len = sizeof(text) });
        ASSERT_EQ(n, CONTROL_MESSAGE_MAX);
        ASSERT_OK(control_frame(line, (size_t) n));
        ASSERT_OK(control_parse_pull(line, &m));
        ASSERT_EQ(m.kind, CONTROL_PULL_ERROR);
        ASSERT_TRUE(strncmp(m.text, "eee???eee", 9) == 0);
        /* ... and a NUL ends it. */
        n = control_format_relay(line, sizeof(line), &(ControlRelayMessage) { .kind = CONTROL_RELAY_ERROR, .text = "ab\0cd", .text_len = 5 });
        ASSERT_OK(n);
        ASSERT_STREQ(line, "error ab\n");
        /* Also into a buffer smaller than a line. */
        n = control_format_relay(small, sizeof(small) + 0, &(ControlRelayMessage) { .kind = CONTROL_RELAY_ERROR, .text = "abcdefgh", .text_len = 8 });
        ASSERT_OK(n);
        ASSERT_EQ(n, strlen(small));
        ASSERT_TRUE(small[n - 1] == '\n');

        ASSERT_ERRNO(control_format_pull(small, sizeof(small), &(ControlPullMessage) { .kind = CONTROL_PULL_PROGRESS, .done = 1, .total = 2 }), -EMSGSIZE);
        ASSERT_ERRNO(control_format_pull(line, sizeof(line), &(ControlPullMessage) { .kind = CONTROL_PULL_UNKNOWN }), -EINVAL);
        ASSERT_ERRNO(control_format_pull(line, sizeof(line), &(ControlPullMessage) { .kind = CONTROL_PULL_EXTENT, .length = 1, .extent_kind = _CONTROL_EXTENT_MAX }), -EINVAL);
        ASSERT_ERRNO(control_format_relay(line, sizeof(line), &(ControlRelayMessage) { .kind = CONTROL_RELAY_UNKNOWN }), -EINVAL);
        ASSERT_ERRNO(control_format_command(line, sizeof(line), &(ControlCommand) { .kind = CONTROL_COMMAND_UNKNOWN }), -EINVAL);
        ASSERT_ERRNO(control_format_command(small, sizeof(small), &(ControlCommand) { .kind = CONTROL_COMMAND_BANDWIDTH, .number = 1000000 }), -EMSGSIZE);
        /* A reason the relay would refuse as garbage is not sent; a long one is cut, the line whole. */
        ASSERT_ERRNO(control_format_command(line, sizeof(line), &(ControlCommand) { .kind = CONTROL_COMMAND_REFUSED, .number = 1, .text = "a\nb" }), -EINVAL);
        ASSERT_ERRNO(control_format_command(line, sizeof(line), &(ControlCommand) { .kind = CONTROL_COMMAND_REFUSED, .number = 1, .text = "caf\xc3\xa9" }), -EINVAL);
        text[0] = 0;
        memset(text, 'r', 400);
        text[400] = 0;
        n = control_format_command(line, sizeof(line), &(ControlCommand) { .kind = CONTROL_COMMAND_REFUSED, .number = 1, .text = text });
        ASSERT_OK(n);
        ASSERT_LE_U64(n, CONTROL_MESSAGE_MAX);
        ASSERT_TRUE(line[n - 1] == '\n');
}

/* Sends a datagram with n copies of fd (and SCM_CREDENTIALS too, if asked). */
static int send_with_fds(int sock, const char *data, size_t len, int fd, size_t n, bool creds) {
        union {
                struct cmsghdr h;
                char b[CMSG_SPACE(sizeof(int) * 16) + CMSG_SPACE(sizeof(struct ucred))];
        } control = {};
        struct iovec iov = { .iov_base = (void *) data, .iov_len = len };
        struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = &control };
        struct cmsghdr *c;
        size_t clen = 0;

        ASSERT_TRUE(n <= 16);
        mh.msg_controllen = sizeof(control.b);
        c = CMSG_FIRSTHDR(&mh);
        if (n > 0) {
                c->cmsg_level = SOL_SOCKET;
                c->cmsg_type = SCM_RIGHTS;
                c->cmsg_len = CMSG_LEN(sizeof(int) * n);
                for (size_t i = 0; i < n; i++)
                        memcpy(CMSG_DATA(c) + i * sizeof(int), &fd, sizeof(int));
                clen += CMSG_SPACE(sizeof(int) * n);
                c = CMSG_NXTHDR(&mh, c);
        }
        if (creds) {
                struct ucred u = { .pid = getpid(), .uid = getuid(), .gid = getgid() };
                c->cmsg_level = SOL_SOCKET;
                c->cmsg_type = SCM_CREDENTIALS;
                c->cmsg_len = CMSG_LEN(sizeof(u));
                memcpy(CMSG_DATA(c), &u, sizeof(u));
                clen += CMSG_SPACE(sizeof(u));
        }
        mh.msg_controllen = clen;
        if (clen == 0)
                mh.msg_control = NULL;
        return sendmsg(sock, &mh, MSG_NOSIGNAL) < 0 ? -errno : 0;
}

/* Both ends over a real socket pair: what a line and its fds look like on arrival, and what is
 * refused with nothing left open. */
static void test_send_receive(void) {
        ControlDatagram d;
        ControlCommand c;
        int s[2], fds_before, one = 1;
        char line[CONTROL_MESSAGE_MAX + 2];

        ASSERT_OK(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, s));
        fds_before = (int) count_fds();

        /* Nothing waiting. */
        ASSERT_EQ(control_receive_datagram(s[1], &d), 0);

        /* A line, as the daemon sends it and a helper reads it. */
        ASSERT_OK(control_send_command(s[0], MSG_DONTWAIT | MSG_NOSIGNAL,
                &(ControlCommand) { .kind = CONTROL_COMMAND_BANDWIDTH, .number = 1048576 }, -1));
        ASSERT_EQ(control_receive_datagram(s[1], &d), 1);
        ASSERT_EQ_U64(d.len, strlen("bandwidth 1048576\n"));
        ASSERT_EQ_U64(d.n_fds, 0);
        ASSERT_OK(control_parse_command(d.buf, d.len, &c));
        ASSERT_EQ(c.kind, CONTROL_COMMAND_BANDWIDTH);
        ASSERT_EQ_U64(c.number, 1048576);

        /* With an fd: it arrives, close-on-exec. */
        ASSERT_OK(control_send_command(s[0], MSG_DONTWAIT | MSG_NOSIGNAL,
                &(ControlCommand) { .kind = CONTROL_COMMAND_UPSTREAM, .number = 3 }, s[0]));
        ASSERT_EQ(control_receive_datagram(s[1], &d), 1);
        ASSERT_EQ_U64(d.n_fds, 1);
        ASSERT_TRUE(d.n_fds == 1 && d.fds[0] >= 0 && (fcntl(d.fds[0], F_GETFD) & FD_CLOEXEC));
        ASSERT_OK(control_parse_command(d.buf, d.len, &c));
        ASSERT_EQ(c.kind, CONTROL_COMMAND_UPSTREAM);
        ASSERT_EQ_U64(d.n_fds, control_command_n_fds(c.kind));
        control_datagram_close_fds(&d);
        ASSERT_EQ(d.fds[0], -1);
        ASSERT_EQ(count_fds(), fds_before);

        /* An fd with an empty datagram is no EOF: a datagram the parser refuses. */
        ASSERT_OK(send_with_fds(s[0], "", 0, s[0], 1, false));
        ASSERT_EQ(control_receive_datagram(s[1], &d), 1);
        ASSERT_EQ_U64(d.len, 0);
        ASSERT_EQ_U64(d.n_fds, 1);
        ASSERT_ERRNO(control_parse_command(d.buf, d.len, &c), -EBADMSG);
        control_datagram_close_fds(&d);

        /* Longer than a line: refused, its fds closed. */
        memset(line, 'x', sizeof(line));
        line[CONTROL_MESSAGE_MAX] = '\n';
        ASSERT_OK(send_with_fds(s[0], line, CONTROL_MESSAGE_MAX + 1, s[0], 2, false));
        ASSERT_ERRNO(control_receive_datagram(s[1], &d), -EMSGSIZE);
        ASSERT_EQ(count_fds(), fds_before);
        static char page[4096];
        memset(page, 'p', sizeof(page));
        ASSERT_OK(control_send(s[0], MSG_DONTWAIT | MSG_NOSIGNAL, page, sizeof(page)));
        ASSERT_ERRNO(control_receive_datagram(s[1], &d), -EMSGSIZE);

        /* More fds than anybody sends: refused, none left open. */
        ASSERT_OK(send_with_fds(s[0], "upstream 1\n", 11, s[0], CONTROL_FDS_MAX + 4, false));
        ASSERT_ERRNO(control_receive_datagram(s[1], &d), -EBADMSG);
        ASSERT_EQ(count_fds(), fds_before);

        /* Ancillary data other than fds (credentials, once the receiver asks for them). */
        ASSERT_OK(setsockopt(s[1], SOL_SOCKET, SO_PASSCRED, &one, sizeof(one)));
        ASSERT_OK(send_with_fds(s[0], "stop\n", 5, s[0], 1, true));
        ASSERT_ERRNO(control_receive_datagram(s[1], &d), -EBADMSG);
        ASSERT_EQ(count_fds(), fds_before);
        one = 0;
        ASSERT_OK(setsockopt(s[1], SOL_SOCKET, SO_PASSCRED, &one, sizeof(one)));

        /* Each helper's lines, as it sends them. */
        ASSERT_OK(control_send_pull(s[1], MSG_DONTWAIT | MSG_NOSIGNAL,
                &(ControlPullMessage) { .kind = CONTROL_PULL_PROGRESS, .done = 1, .total = 2 }));
        ASSERT_EQ(recv(s[0], line, sizeof(line), MSG_DONTWAIT), 13);
        ASSERT_OK(control_send_relay(s[1], MSG_DONTWAIT | MSG_NOSIGNAL,
                &(ControlRelayMessage) { .kind = CONTROL_RELAY_CLIENTS, .number = 64 }));
        ASSERT_EQ(recv(s[0], line, sizeof(line), MSG_DONTWAIT), 11);
        ASSERT_ERRNO(control_send_relay(s[1], MSG_DONTWAIT | MSG_NOSIGNAL,
                &(ControlRelayMessage) { .kind = CONTROL_RELAY_UNKNOWN }), -EINVAL);
        ASSERT_EQ(recv(s[0], line, sizeof(line), MSG_DONTWAIT), -1);

        /* A helper's last words: printable, one line. */
        ASSERT_OK(control_send_error(s[1], "broken \x1b[0m pipe"));
        ASSERT_EQ(recv(s[0], line, sizeof(line), MSG_DONTWAIT), 23);
        line[23] = 0;
        ASSERT_STREQ(line, "error broken ?[0m pipe\n");

        /* The other end goes away: EOF is told apart from "nothing yet", and sending fails. */
        close(s[0]);
        ASSERT_ERRNO(control_receive_datagram(s[1], &d), -ECONNRESET);
        ASSERT_ERRNO(control_send(s[1], MSG_DONTWAIT | MSG_NOSIGNAL, "ready\n", 6), -EPIPE);
        ASSERT_ERRNO(control_send_error(s[1], "gone"), -EPIPE);
        close(s[1]);
}

/* The daemon's queue is full and nobody reads it: the last words give up, boundedly. */
static void test_send_error_full(void) {
        int s[2], r;

        ASSERT_OK(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, s));
        do
                r = control_send(s[1], MSG_DONTWAIT | MSG_NOSIGNAL, "progress 1 2\n", 13);
        while (r == 0);
        ASSERT_ERRNO(r, -EAGAIN);
        ASSERT_ERRNO(control_send_error(s[1], "stuck"), -EAGAIN);
        close(s[0]);
        close(s[1]);
}

int main(int argc, char **argv) {
        tap_init(argc, argv);
        TAP_RUN(test_frame);
        TAP_RUN(test_u64);
        TAP_RUN(test_pull);
        TAP_RUN(test_relay);
        TAP_RUN(test_helper_lines_hostile);
        TAP_RUN(test_command);
        TAP_RUN(test_roundtrip);
        TAP_RUN(test_format_limits);
        TAP_RUN(test_send_receive);
        TAP_RUN(test_send_error_full);
        return tap_finish();
}
