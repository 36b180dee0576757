/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* The QMP client against a scripted QEMU: greeting, calls, events, timeouts, fd passing. QEMU is
 * untrusted: whatever it sends, the client must either understand it or close the connection,
 * exactly once, failing every pending call exactly once, without crashing, leaking or buffering
 * without bound (what it must refuse is test-qmp-hostile.c's, closing the client from its own
 * callbacks test-qmp-close.c's). */

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include "fake-qemu.h"
#include "qmp-socket.h"
#include "qmp.h"
#include "util.h"
#include "tap.h"
#include "test-qmp-util.h"

/* Greeting and negotiation */

static void test_handshake(void) {
        Fake f;
        json_object *cmd;
        FakeCall c = {};
        int p[2];

        ASSERT_OK(fake_new(&f));
        ASSERT_FALSE(qmp_is_ready(f.q));
        ASSERT_EQ(qmp_qemu_version(f.q), 0);

        /* Before the greeting nothing may be sent, and a refused call still consumes its args and fd. */
        ASSERT_OK(pipe2(p, O_CLOEXEC));
        ASSERT_ERRNO(
                qmp_call(f.q, "query-status", json_object_new_object(), p[0], fake_call_handler, &c, fake_call_destroy),
                -ENOTCONN);
        ASSERT_FALSE(fd_is_open(p[0]));
        close(p[1]);
        ASSERT_EQ(c.n_handler + c.n_destroy, 0);

        ASSERT_OK(fake_send_str(&f, FAKE_GREETING));
        cmd = fake_next_command(&f, 5 * SEC);
        ASSERT_NOT_NULL(cmd);
        ASSERT_STREQ(fake_command_name(cmd), "qmp_capabilities");
        ASSERT_TRUE(fake_command_id(cmd) >= 0);
        ASSERT_EQ(qmp_qemu_version(f.q), 70222);
        ASSERT_FALSE(qmp_is_ready(f.q));
        ASSERT_EQ(f.n_ready, 0);
        ASSERT_ERRNO(qmp_call(f.q, "query-status", NULL, -1, NULL, NULL, NULL), -ENOTCONN);

        ASSERT_OK(fake_reply(&f, cmd, "{}"));
        json_object_put(cmd);
        fake_run(&f, 50 * MSEC);
        ASSERT_EQ(f.n_ready, 1);
        ASSERT_EQ(f.n_failed, 0);
        ASSERT_TRUE(qmp_is_ready(f.q));

        /* Nothing else is sent unasked. */
        ASSERT_EQ(f.rx_len, f.rx_consumed);
        fake_free(&f);
}

static void test_handshake_split_and_crlf(void) {
        static const char greeting[] = FAKE_GREETING;
        Fake f;
        json_object *cmd;

        /* The greeting in single bytes, after some blank lines. */
        ASSERT_OK(fake_new(&f));
        ASSERT_OK(fake_send_str(&f, "\r\n\n  \r\n"));
        for (size_t i = 0; i < sizeof(greeting) - 1; i++) {
                ASSERT_OK(fake_send(&f, greeting + i, 1));
                fake_run(&f, 100);
        }
        cmd = fake_next_command(&f, 5 * SEC);
        ASSERT_STREQ(fake_command_name(cmd), "qmp_capabilities");
        /* The reply with a bare \n, as a human typing would. */
        ASSERT_OK(fake_sendf(&f, "{\"return\": {}, \"id\": %" PRIi64 "}\n", fake_command_id(cmd)));
        json_object_put(cmd);
        fake_run(&f, 50 * MSEC);
        ASSERT_EQ(f.n_ready, 1);
        ASSERT_EQ(f.n_failed, 0);
        fake_free(&f);
}

static void test_connect_unix(void) {
        char dir[] = "/tmp/bsd-unit-qmp-XXXXXX";
        _cleanup_free_ char *path = NULL;
        Fake f;
        int fd = -1;

        ASSERT_NOT_NULL(mkdtemp(dir));
        path = strdup_printf("%s/qmp.sock", dir);
        ASSERT_OK(fake_new_connect(&f, path));
        ASSERT_OK(fake_handshake(&f));
        ASSERT_EQ(f.n_ready, 1);
        fake_free(&f);

        /* Nobody listens any more (the socket is gone): refused before any Qmp exists. */
        ASSERT_ERRNO(qmp_socket_open(path, NULL, NULL, NULL, &fd), -ENOENT);
        ASSERT_EQ(fd, -1);
        rmdir(dir);
}

static void test_capabilities_refused(void) {
        Fake f;
        json_object *cmd;

        ASSERT_OK(fake_new(&f));
        ASSERT_OK(fake_send_str(&f, FAKE_GREETING));
        cmd = fake_next_command(&f, 5 * SEC);
        ASSERT_OK(fake_sendf(&f,
                "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"nope\"}, \"id\": %" PRIi64 "}\r\n",
                fake_command_id(cmd)));
        json_object_put(cmd);
        ASSERT_TRUE(fake_wait_failed(&f, 3 * SEC));
        ASSERT_EQ(f.n_ready, 0);
        ASSERT_EQ(f.n_failed, 1);
        ASSERT_NEG(f.fail_error);
        ASSERT_TRUE(fake_wait_peer_eof(&f, 3 * SEC));
        fake_free(&f);
}

static void test_first_message_not_greeting(void) {
        static const char *const t[] = {
                "{\"return\": {}, \"id\": 1}\r\n",
                "{\"event\": \"SHUTDOWN\", \"data\": {}}\r\n",
                "{\"QMP\": 1}\r\n",
                "{\"QMP\": \"x\"}\r\n",
                "{\"qmp\": {}}\r\n",
                "[]\r\n",
        };

        for (size_t i = 0; i < ELEMENTSOF(t); i++) {
                Fake f;

                ASSERT_OK(fake_new(&f));
                ASSERT_OK(fake_send_str(&f, t[i]));
                if (!fake_wait_failed(&f, 3 * SEC))
                        TAP_FAIL("first message %s: connection not closed", t[i]);
                ASSERT_EQ(f.n_failed, 1);
                ASSERT_EQ(f.n_ready, 0);
                ASSERT_NEG(f.fail_error);
                ASSERT_TRUE(fake_wait_peer_eof(&f, 3 * SEC));
                /* Nothing was sent to a peer that did not greet. */
                ASSERT_EQ(f.rx_len, 0);
                fake_free(&f);
        }
}

/* Calls and replies */

static void test_call_wellformed(void) {
        Fake f;
        FakeCall c = {};
        json_object *args, *cmd, *a, *v;

        if (!setup(&f))
                return;
        args = json_object_new_object();
        json_object_object_add(args, "device", json_object_new_string("j\"1\\/"));
        json_object_object_add(args, "speed", json_object_new_int64(INT64_MAX));
        cmd = call_and_receive(&f, &c, "block-job-set-speed", args);
        ASSERT_STREQ(fake_command_name(cmd), "block-job-set-speed");
        ASSERT_TRUE(json_object_object_get_ex(cmd, "arguments", &a));
        ASSERT_TRUE(json_object_object_get_ex(a, "device", &v) && streq(json_object_get_string(v), "j\"1\\/"));
        ASSERT_TRUE(json_object_object_get_ex(a, "speed", &v) && json_object_get_int64(v) == INT64_MAX);
        ASSERT_TRUE(fake_command_id(cmd) > 0);
        /* One line per command, CRLF-terminated. */
        ASSERT_TRUE(
                f.rx_consumed == f.rx_len && f.rx_len >= 2 && f.rx[f.rx_len - 1] == '\n' && f.rx[f.rx_len - 2] == '\r');
        json_object_put(cmd);

        /* No arguments: no "arguments" key. */
        {
                FakeCall d = {};
                cmd = call_and_receive(&f, &d, "query-status", NULL);
                ASSERT_FALSE(json_object_object_get_ex(cmd, "arguments", NULL));
                json_object_put(cmd);
                fake_free(&f);
                ASSERT_EQ(d.n_destroy, 1);
                fake_call_done(&d);
        }
        ASSERT_EQ(c.n_destroy, 1);
        fake_call_done(&c);
}

static void test_replies_out_of_order(void) {
        Fake f;
        FakeCall c[3] = {};
        json_object *cmd[3] = {};

        if (!setup(&f))
                return;
        for (size_t i = 0; i < 3; i++)
                cmd[i] = call_and_receive(&f, &c[i], "query-status", NULL);
        ASSERT_TRUE(fake_command_id(cmd[0]) != fake_command_id(cmd[1]));
        ASSERT_TRUE(fake_command_id(cmd[1]) != fake_command_id(cmd[2]));
        ASSERT_TRUE(fake_command_id(cmd[0]) != fake_command_id(cmd[2]));

        /* QEMU answers third, first, second, in one write with an event in between. */
        ASSERT_OK(fake_sendf(&f,
                "{\"return\": {\"n\": 3}, \"id\": %" PRIi64 "}\r\n"
                "{\"event\": \"RESUME\", \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}\r\n"
                "{\"id\": %" PRIi64 ", \"return\": {\"n\": 1}}\r\n"
                "{\"return\": [1, \"two\"], \"id\": %" PRIi64 "}\r\n",
                fake_command_id(cmd[2]), fake_command_id(cmd[0]), fake_command_id(cmd[1])));
        fake_run_until(&f, cond_call_done, &c[1], 3 * SEC);

        for (size_t i = 0; i < 3; i++) {
                ASSERT_EQ(c[i].n_handler, 1);
                ASSERT_EQ(c[i].error, 0);
                ASSERT_EQ(c[i].n_destroy, 1);
        }
        ASSERT_STREQ(c[0].result, "{\"n\":1}");
        ASSERT_STREQ(c[1].result, "[1,\"two\"]");
        ASSERT_STREQ(c[2].result, "{\"n\":3}");
        ASSERT_TRUE(c[2].order < c[0].order && c[0].order < c[1].order);
        ASSERT_EQ(f.n_events, 1);
        ASSERT_STREQ(f.last_event, "RESUME");
        ASSERT_EQ(f.n_failed, 0);

        for (size_t i = 0; i < 3; i++) {
                json_object_put(cmd[i]);
                fake_call_done(&c[i]);
        }
        fake_free(&f);
}

static void test_error_reply(void) {
        Fake f;
        FakeCall c = {}, d = {}, e = {};
        json_object *cmd, *cmd2, *cmd3;
        _cleanup_free_ char *long_desc = NULL;

        if (!setup(&f))
                return;
        cmd = call_and_receive(&f, &c, "block-job-pause", NULL);
        /* Verbatim from QEMU 7.2. */
        ASSERT_OK(fake_sendf(&f,
                "{\"id\": %" PRIi64
                ", \"error\": {\"class\": \"DeviceNotActive\", \"desc\": \"Block job 'nope' not found\"}}\r\n",
                fake_command_id(cmd)));
        fake_run_until(&f, cond_call_done, &c, 3 * SEC);
        ASSERT_EQ(c.n_handler, 1);
        ASSERT_ERRNO(c.error, -EREMOTEIO);
        ASSERT_NULL(c.result);
        ASSERT_STREQ(c.error_class, "DeviceNotActive");
        ASSERT_STREQ(c.error_desc, "Block job 'nope' not found");
        ASSERT_EQ(c.n_destroy, 1);
        ASSERT_EQ(f.n_failed, 0);

        /* Control characters in QEMU's text do not reach logs and D-Bus errors raw. */
        cmd2 = call_and_receive(&f, &d, "block-job-pause", NULL);
        ASSERT_OK(fake_sendf(&f,
                "{\"id\": %" PRIi64
                ", \"error\": {\"class\": \"Generic\\u001bError\", \"desc\": \"line1\\nline2\\r\\t\\u001b[31mred\\u007f caf\xc3\xa9\"}}\r\n",
                fake_command_id(cmd2)));
        fake_run_until(&f, cond_call_done, &d, 3 * SEC);
        ASSERT_ERRNO(d.error, -EREMOTEIO);
        ASSERT_NOT_NULL(d.error_desc);
        if (d.error_desc && d.error_class) {
                for (const unsigned char *s = (const unsigned char *) d.error_desc; *s; s++)
                        if (*s < 0x20 || *s == 0x7f)
                                TAP_FAIL("control character 0x%02x in error_desc \"%s\"", *s, d.error_desc);
                for (const unsigned char *s = (const unsigned char *) d.error_class; *s; s++)
                        if (*s < 0x20 || *s == 0x7f)
                                TAP_FAIL("control character 0x%02x in error_class", *s);
                ASSERT_TRUE(strstr(d.error_desc, "line1") && strstr(d.error_desc, "line2") &&
                            strstr(d.error_desc, "caf\xc3\xa9"));
        }

        /* A very long text is bounded, and cut on a character boundary. */
        long_desc = malloc(3 * 4000 + 1);
        for (size_t i = 0; i < 4000; i++)
                memcpy(long_desc + 3 * i, "\xe2\x82\xac", 3); /* € */
        long_desc[3 * 4000] = 0;
        cmd3 = call_and_receive(&f, &e, "block-job-pause", NULL);
        ASSERT_OK(
                fake_sendf(&f, "{\"id\": %" PRIi64 ", \"error\": {\"class\": \"GenericError\", \"desc\": \"%s\"}}\r\n",
                        fake_command_id(cmd3), long_desc));
        fake_run_until(&f, cond_call_done, &e, 3 * SEC);
        ASSERT_ERRNO(e.error, -EREMOTEIO);
        ASSERT_NOT_NULL(e.error_desc);
        if (e.error_desc) {
                size_t n = strlen(e.error_desc);
                ASSERT_TRUE(n > 0 && n < 4096);
                ASSERT_EQ(n % 3, 0);
                ASSERT_TRUE(memcmp(e.error_desc, long_desc, n) == 0);
        }
        ASSERT_EQ(f.n_failed, 0);

        json_object_put(cmd);
        json_object_put(cmd2);
        json_object_put(cmd3);
        fake_free(&f);
        fake_call_done(&c);
        fake_call_done(&d);
        fake_call_done(&e);
}

/* A call, then raw (or, with raw NULL, the call's answer and then a second one): the connection
 * ends, and the call has heard exactly once, its answer or (with raw) that the connection went. */
static void check_reply_ends_connection(const char *raw) {
        Fake f;
        FakeCall c = {};
        json_object *cmd;

        if (!setup(&f))
                return;
        cmd = call_and_receive(&f, &c, "query-status", NULL);
        if (raw)
                ASSERT_OK(fake_send_str(&f, raw));
        else {
                ASSERT_OK(fake_reply(&f, cmd, "{\"running\": true}"));
                fake_run_until(&f, cond_call_done, &c, 3 * SEC);
                ASSERT_EQ(c.n_handler, 1);
                ASSERT_EQ(c.error, 0);
                ASSERT_EQ(f.n_failed, 0);
                ASSERT_OK(fake_reply(&f, cmd, "{}"));
        }
        ASSERT_TRUE(fake_wait_failed(&f, 3 * SEC));
        ASSERT_EQ(f.n_failed, 1);
        ASSERT_EQ(c.n_handler, 1);
        if (raw)
                ASSERT_NEG(c.error); /* the pending call hears that the connection went */
        json_object_put(cmd);
        fake_call_done(&c);
        fake_free(&f);
}

/* A reply QEMU was never asked for costs it nothing to send and the daemon a parse each: an
 * invented id, or a second reply to an answered call, ends the connection (a late reply to a
 * call that timed out is taken: test_call_timeout). */
static void test_unknown_id_ends_connection(void) {
        static const char *const replies[] = {
                "{\"return\": {}, \"id\": 999}\r\n",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"x\"}, \"id\": 1000}\r\n",
                "{\"return\": {}, \"id\": 0}\r\n",
        };

        for (size_t i = 0; i < ELEMENTSOF(replies); i++)
                check_reply_ends_connection(replies[i]);
        check_reply_ends_connection(NULL); /* a second reply to the same id */
}

static void test_null_handler(void) {
        Fake f;
        FakeCall c = {};
        json_object *cmd;

        if (!setup(&f))
                return;
        c.fake = &f;
        ASSERT_OK(qmp_call(f.q, "query-status", NULL, -1, NULL, &c, fake_call_destroy));
        cmd = fake_next_command(&f, 5 * SEC);
        ASSERT_NOT_NULL(cmd);
        ASSERT_OK(fake_reply(&f, cmd, "{}"));
        fake_run(&f, 50 * MSEC);
        ASSERT_EQ(c.n_handler, 0);
        ASSERT_EQ(c.n_destroy, 1);
        json_object_put(cmd);

        /* No destroy either. */
        ASSERT_OK(qmp_call(f.q, "query-status", NULL, -1, NULL, NULL, NULL));
        cmd = fake_next_command(&f, 5 * SEC);
        ASSERT_OK(fake_reply(&f, cmd, "{}"));
        fake_run(&f, 50 * MSEC);
        ASSERT_EQ(f.n_failed, 0);
        json_object_put(cmd);
        fake_free(&f);
}

/* Events */

static void test_events(void) {
        Fake f;
        unsigned want;

        if (!setup(&f))
                return;
        ASSERT_OK(fake_send_str(&f,
                "{\"timestamp\": {\"seconds\": 1795316517, \"microseconds\": 465667}, \"event\": \"BLOCK_JOB_CANCELLED\", "
                "\"data\": {\"device\": \"j1\", \"len\": 268435456, \"offset\": 1048576, \"speed\": 1048576, \"type\": \"stream\"}}\r\n"));
        want = 1;
        fake_run_until(&f, cond_events, &want, 3 * SEC);
        ASSERT_EQ(f.n_events, 1);
        ASSERT_STREQ(f.last_event, "BLOCK_JOB_CANCELLED");
        ASSERT_STREQ(f.last_data,
                "{\"device\":\"j1\",\"len\":268435456,\"offset\":1048576,\"speed\":1048576,\"type\":\"stream\"}");

        /* No "data": an empty object, never NULL. */
        ASSERT_OK(fake_send_str(&f, "{\"event\": \"STOP\", \"timestamp\": {\"seconds\": 1, \"microseconds\": 0}}\r\n"));
        want = 2;
        fake_run_until(&f, cond_events, &want, 3 * SEC);
        ASSERT_EQ(f.n_events, 2);
        ASSERT_STREQ(f.last_event, "STOP");
        ASSERT_STREQ(f.last_data, "{}");

        /* Non-ASCII, escapes and big numbers inside data are QEMU's business, not the parser's. */
        ASSERT_OK(fake_send_str(&f, "{\"event\": \"X\", \"data\": {\"s\": \"caf\\u00e9 \xe2\x82\xac \\ud83d\\ude00\", "
                                    "\"n\": 18446744073709551615, \"m\": -9223372036854775808, \"d\": 1e400}}\r\n"));
        want = 3;
        fake_run_until(&f, cond_events, &want, 3 * SEC);
        ASSERT_EQ(f.n_events, 3);
        ASSERT_STREQ(f.last_event, "X");
        ASSERT_EQ(f.n_failed, 0);
        fake_free(&f);
}

/* Timeouts */

static void test_call_timeout(void) {
        Fake f;
        FakeCall c = {}, d = {};
        json_object *cmd, *cmd2;
        usec_t t0, dt;

        if (!setup(&f))
                return;
        qmp_set_timeout(f.q, 200 * MSEC);
        t0 = now_usec(CLOCK_MONOTONIC);
        cmd = call_and_receive(&f, &c, "query-block-jobs", NULL);
        fake_run_until(&f, cond_call_done, &c, 5 * SEC);
        dt = now_usec(CLOCK_MONOTONIC) - t0;
        ASSERT_EQ(c.n_handler, 1);
        ASSERT_ERRNO(c.error, -ETIMEDOUT);
        ASSERT_EQ(c.n_destroy, 1);
        ASSERT_GE_U64(dt, 200 * MSEC);
        ASSERT_LE_U64(dt, 2 * SEC);
        /* A slow command does not kill the connection... */
        ASSERT_EQ(f.n_failed, 0);
        ASSERT_TRUE(qmp_is_ready(f.q));
        /* ...its late reply is ignored, and the next call works. */
        ASSERT_OK(fake_reply(&f, cmd, "[]"));
        fake_run(&f, 50 * MSEC);
        ASSERT_EQ(c.n_handler, 1);
        ASSERT_EQ(f.n_failed, 0);
        cmd2 = call_and_receive(&f, &d, "query-block-jobs", NULL);
        ASSERT_OK(fake_reply(&f, cmd2, "[]"));
        fake_run_until(&f, cond_call_done, &d, 3 * SEC);
        ASSERT_EQ(d.n_handler, 1);
        ASSERT_EQ(d.error, 0);
        ASSERT_EQ(d.n_destroy, 1);

        json_object_put(cmd);
        json_object_put(cmd2);
        fake_call_done(&c);
        fake_call_done(&d);
        fake_free(&f);
}

/* guest.c sets the configured QMPTimeoutSec right after qmp_new_from_fd(): a QEMU that never greets
 * (another client holds the monitor) must be given up on after that time, not the default 60 s. */
static void test_greeting_timeout(void) {
        Fake f;
        usec_t t0 = now_usec(CLOCK_MONOTONIC);

        ASSERT_OK(fake_new(&f));
        qmp_set_timeout(f.q, 200 * MSEC);
        fake_wait_failed(&f, 3 * SEC);
        ASSERT_EQ(f.n_failed, 1);
        ASSERT_ERRNO(f.fail_error, -ETIMEDOUT);
        ASSERT_EQ(f.n_ready, 0);
        if (f.n_failed)
                ASSERT_LE_U64(now_usec(CLOCK_MONOTONIC) - t0, 2 * SEC);
        fake_free(&f);
}

static void test_negotiation_timeout(void) {
        Fake f;
        json_object *cmd;

        ASSERT_OK(fake_new(&f));
        qmp_set_timeout(f.q, 200 * MSEC);
        ASSERT_OK(fake_send_str(&f, FAKE_GREETING));
        cmd = fake_next_command(&f, 3 * SEC);
        ASSERT_STREQ(fake_command_name(cmd), "qmp_capabilities");
        fake_wait_failed(&f, 3 * SEC);
        ASSERT_EQ(f.n_failed, 1);
        ASSERT_ERRNO(f.fail_error, -ETIMEDOUT);
        ASSERT_EQ(f.n_ready, 0);
        json_object_put(cmd);
        fake_free(&f);
}

/* A QEMU that stops reading its monitor (hung, stopped, or hostile) fills the socket: a call
 * that cannot even be sent must still end within the timeout, not hang forever. */
static void test_unsent_call_timeout(void) {
        Fake f;
        FakeCall c = {}, d = {};
        json_object *args;
        char *big;

        if (!setup(&f))
                return;
        qmp_set_timeout(f.q, 200 * MSEC);
        big = malloc(4U << 20);
        memset(big, 'x', (4U << 20) - 1);
        big[(4U << 20) - 1] = 0;
        args = json_object_new_object();
        json_object_object_add(args, "data", json_object_new_string(big));
        free(big);
        ASSERT_OK(fake_call(&f, &c, "guest-sync", args, -1));
        ASSERT_OK(fake_call(&f, &d, "query-status", NULL, -1));
        /* Run the loop without reading on QEMU's side. */
        for (usec_t end = now_usec(CLOCK_MONOTONIC) + 3 * SEC;
                now_usec(CLOCK_MONOTONIC) < end && (!c.n_handler || !d.n_handler);)
                (void) sd_event_run(f.event, 10 * MSEC);
        ASSERT_EQ(c.n_handler, 1);
        ASSERT_NEG(c.error);
        ASSERT_EQ(d.n_handler, 1);
        ASSERT_NEG(d.error);
        fake_call_done(&c);
        fake_call_done(&d);
        fake_free(&f);
        ASSERT_EQ(c.n_destroy, 1);
        ASSERT_EQ(d.n_destroy, 1);
}

/* SCM_RIGHTS */

static void test_fd_passing(void) {
        Fake f;
        FakeCall c = {}, d = {};
        json_object *cmd, *cmd2, *args;
        int p[2];
        char b = 0;
        size_t start;

        if (!setup(&f))
                return;
        start = f.rx_len;
        ASSERT_OK(pipe2(p, O_CLOEXEC));
        args = json_object_new_object();
        json_object_object_add(args, "fdset-id", json_object_new_int(1));
        ASSERT_OK(fake_call(&f, &c, "add-fd", args, p[0]));
        ASSERT_OK(fake_call(&f, &d, "query-status", NULL, -1));
        /* The client gives up its copy once sent. Look before QEMU's side receives it, or the
         * received fd could take the same number. */
        for (usec_t end = now_usec(CLOCK_MONOTONIC) + 3 * SEC; now_usec(CLOCK_MONOTONIC) < end;) {
                struct pollfd pfd = {.fd = f.peer, .events = POLLIN};
                if (poll(&pfd, 1, 0) == 1)
                        break;
                (void) sd_event_run(f.event, 10 * MSEC);
        }
        ASSERT_FALSE(fd_is_open(p[0]));
        cmd = fake_next_command(&f, 5 * SEC);
        cmd2 = fake_next_command(&f, 5 * SEC);
        ASSERT_STREQ(fake_command_name(cmd), "add-fd");
        ASSERT_STREQ(fake_command_name(cmd2), "query-status");
        /* ...QEMU got exactly one fd, with the add-fd message, and it is our pipe. */
        ASSERT_EQ(f.n_fds, 1);
        if (f.n_fds == 1) {
                ASSERT_EQ(f.fd_offset[0], start);
                ASSERT_TRUE(strncmp(f.rx + start, "{\"execute\":\"add-fd\"", 19) == 0);
                ASSERT_EQ(write(p[1], "z", 1), 1);
                ASSERT_EQ(read(f.fds[0], &b, 1), 1);
                ASSERT_EQ(b, 'z');
        }
        ASSERT_OK(fake_reply(&f, cmd, "{\"fdset-id\": 1, \"fd\": 42}"));
        fake_run_until(&f, cond_call_done, &c, 3 * SEC);
        ASSERT_EQ(c.error, 0);

        close(p[1]);
        json_object_put(cmd);
        json_object_put(cmd2);
        fake_call_done(&c);
        fake_call_done(&d);
        fake_free(&f);

        /* A refused call closes the fd too. */
        ASSERT_OK(pipe2(p, O_CLOEXEC));
        ASSERT_ERRNO(qmp_call(NULL, "add-fd", json_object_new_object(), p[0], NULL, NULL, NULL), -EINVAL);
        ASSERT_FALSE(fd_is_open(p[0]));
        close(p[1]);
}

int main(int argc, char **argv) {
        tap_init(argc, argv);
        log_set_max_level(getenv("BSD_UNIT_DEBUG") ? LOG_LEVEL_DEBUG : -1);

        TAP_RUN(test_handshake);
        TAP_RUN(test_handshake_split_and_crlf);
        TAP_RUN(test_connect_unix);
        TAP_RUN(test_capabilities_refused);
        TAP_RUN(test_first_message_not_greeting);
        TAP_RUN(test_call_wellformed);
        TAP_RUN(test_replies_out_of_order);
        TAP_RUN(test_error_reply);
        TAP_RUN(test_unknown_id_ends_connection);
        TAP_RUN(test_null_handler);
        TAP_RUN(test_events);
        TAP_RUN(test_call_timeout);
        TAP_RUN(test_greeting_timeout);
        TAP_RUN(test_negotiation_timeout);
        TAP_RUN(test_unsent_call_timeout);
        TAP_RUN(test_fd_passing);
        return tap_finish();
}
