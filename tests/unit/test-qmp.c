/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* The QMP client against a scripted QEMU. QEMU is untrusted: whatever it sends, the client
 * must either understand it or close the connection, exactly once, failing every pending call
 * exactly once, without crashing, leaking or buffering without bound. */

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include "fake-qemu.h"
#include "qmp-socket.h"
#include "qmp.h"
#include "util.h"
#include "tap.h"

#if defined(__SANITIZE_ADDRESS__)
#define UNDER_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define UNDER_ASAN 1
#endif
#endif
#ifndef UNDER_ASAN
#define UNDER_ASAN 0
#endif

#define SEC USEC_PER_SEC
#define MSEC USEC_PER_MSEC

/* ASan's quarantine and valgrind's freed-block queue keep freed memory resident: RSS figures
 * mean nothing there. */
static bool rss_checks_enabled(void) {
        const char *preload = getenv("LD_PRELOAD");

        if (UNDER_ASAN || getenv("BSD_UNIT_NO_RSS"))
                return false;
        return !(preload && strstr(preload, "vgpreload"));
}

static bool fd_is_open(int fd) {
        return fcntl(fd, F_GETFD) >= 0;
}

static bool cond_call_done(Fake *f, void *arg) {
        FakeCall *c = arg;
        return c->n_handler > 0;
}

static bool cond_events(Fake *f, void *arg) {
        return f->n_events >= *(unsigned *) arg || f->n_failed > 0;
}

/* Handshake and nothing else. */
static bool setup(Fake *f) {
        int r = fake_new(f);

        if (r < 0) {
                TAP_FAIL("fake_new: %s", strerror(-r));
                return false;
        }
        r = fake_handshake(f);
        if (r < 0) {
                TAP_FAIL("handshake: %s", strerror(-r));
                return false;
        }
        return true;
}

/* Issue a call and wait until QEMU has received it; returns the command (caller frees). */
static json_object *call_and_receive(Fake *f, FakeCall *c, const char *command, json_object *args) {
        json_object *cmd;
        int r = fake_call(f, c, command, args, -1);

        if (r < 0) {
                TAP_FAIL("qmp_call(%s): %s", command, strerror(-r));
                return NULL;
        }
        cmd = fake_next_command(f, 5 * SEC);
        if (!cmd)
                TAP_FAIL("QEMU never received %s", command);
        return cmd;
}

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

static void test_unknown_id_ignored(void) {
        Fake f;
        FakeCall c = {};
        json_object *cmd;

        if (!setup(&f))
                return;
        cmd = call_and_receive(&f, &c, "query-status", NULL);
        ASSERT_OK(fake_send_str(&f, "{\"return\": {}, \"id\": 999}\r\n"
                                    "{\"error\": {\"class\": \"GenericError\", \"desc\": \"x\"}, \"id\": 1000}\r\n"
                                    "{\"return\": {}, \"id\": 0}\r\n"));
        fake_run(&f, 100 * MSEC);
        ASSERT_EQ(c.n_handler, 0);
        ASSERT_EQ(c.n_destroy, 0);
        ASSERT_EQ(f.n_failed, 0);
        ASSERT_TRUE(qmp_is_ready(f.q));

        ASSERT_OK(fake_reply(&f, cmd, "{\"running\": true}"));
        fake_run_until(&f, cond_call_done, &c, 3 * SEC);
        ASSERT_EQ(c.n_handler, 1);
        ASSERT_EQ(c.error, 0);
        ASSERT_STREQ(c.result, "{\"running\":true}");
        ASSERT_EQ(c.n_destroy, 1);

        /* A second reply to the same id is a reply to an unknown id now. */
        ASSERT_OK(fake_reply(&f, cmd, "{}"));
        fake_run(&f, 50 * MSEC);
        ASSERT_EQ(c.n_handler, 1);
        ASSERT_EQ(f.n_failed, 0);

        json_object_put(cmd);
        fake_call_done(&c);
        fake_free(&f);
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

/* Hostile input: each of these must close the connection. */

typedef struct Hostile {
        const char *name;
        const char *data;
        size_t len; /* 0: strlen */
        bool hangup;
} Hostile;

static char *nested(unsigned depth) {
        /* {"event": "X", "data": {"a": [[...]]}}: depth 2 + arrays. */
        size_t arrays = depth - 2, n = 0;
        char *s = malloc(64 + 2 * arrays);

        n += (size_t) sprintf(s, "{\"event\": \"X\", \"data\": {\"a\": ");
        memset(s + n, '[', arrays);
        n += arrays;
        memset(s + n, ']', arrays);
        n += arrays;
        strcpy(s + n, "}}\r\n");
        return s;
}

static void check_refused(const char *name, const char *data, size_t len, bool hangup) {
        Fake f;
        FakeCall c[2] = {};
        json_object *cmd[2] = {};

        if (!setup(&f))
                return;
        /* Pending calls with ids 2 and 3; the hostile replies use id 2. */
        for (size_t i = 0; i < 2; i++)
                cmd[i] = call_and_receive(&f, &c[i], "query-status", NULL);
        if (fake_command_id(cmd[0]) != 2)
                TAP_FAIL("%s: expected the first call to have id 2, got %" PRIi64, name, fake_command_id(cmd[0]));

        (void) fake_send(&f, data, len);
        if (hangup)
                fake_hangup(&f);
        if (!fake_wait_failed(&f, 2 * SEC)) {
                TAP_FAIL("%s: connection not closed (ready=%u events=%u call0=%u/%d call1=%u/%d)", name, f.n_ready,
                        f.n_events, c[0].n_handler, c[0].error, c[1].n_handler, c[1].error);
                goto finish;
        }
        fake_run(&f, 20 * MSEC);
        if (f.n_failed != 1 || f.fail_error >= 0)
                TAP_FAIL("%s: on_state(error) called %u times, last error %d", name, f.n_failed, f.fail_error);
        for (size_t i = 0; i < 2; i++) {
                if (c[i].n_handler != 1 || c[i].error >= 0 || c[i].error == -EREMOTEIO)
                        TAP_FAIL("%s: pending call %zu: handler called %u times, error %d", name, i, c[i].n_handler,
                                c[i].error);
                if (c[i].n_destroy != 1)
                        TAP_FAIL("%s: pending call %zu: destroy called %u times", name, i, c[i].n_destroy);
        }
        if (f.n_events != 0)
                TAP_FAIL("%s: %u events delivered", name, f.n_events);
        if (f.q && qmp_is_ready(f.q))
                TAP_FAIL("%s: still ready", name);
        if (f.q && qmp_call(f.q, "query-status", NULL, -1, NULL, NULL, NULL) >= 0)
                TAP_FAIL("%s: qmp_call succeeded on a closed connection", name);
        if (!fake_wait_peer_eof(&f, 3 * SEC))
                TAP_FAIL("%s: the client did not close its socket", name);

finish:
        for (size_t i = 0; i < 2; i++) {
                json_object_put(cmd[i]);
                fake_call_done(&c[i]);
        }
        fake_free(&f);
}

static void run_hostile(const Hostile *t, size_t n) {
        for (size_t i = 0; i < n; i++)
                check_refused(t[i].name, t[i].data, t[i].len ?: strlen(t[i].data), t[i].hangup);
}

static void test_hostile_syntax(void) {
        static const Hostile t[] = {
                {"garbage", "hello world\r\n"},
                {"binary garbage", "\x01\x02\x03\x04\r\n"},
                {"array", "[]\r\n"},
                {"number", "42\r\n"},
                {"string", "\"x\"\r\n"},
                {"true", "true\r\n"},
                {"null", "null\r\n"},
                {"single quotes", "{'event': 'X'}\r\n"},
                {"trailing comma", "{\"event\": \"X\",}\r\n"},
                {"comment", "/* hi */ {\"event\": \"X\"}\r\n"},
                {"unquoted key", "{event: \"X\"}\r\n"},
                {"raw NUL byte", "{\"event\": \"X\"\0}\r\n", 17},
                {"closing brace only", "}\r\n"},
                {"truncated then EOF", "{\"return\": {\"a\": [1, 2", 0, true},
                {"unterminated string then EOF", "{\"event\": \"BLOCK_JOB_COMPLETED", 0, true},
                {"good message then truncated then EOF", "{\"event\": \"STOP\"}\r\n{\"event\"", 0, true},
        };

        /* "good message then truncated" delivers STOP first: count it separately below. */
        run_hostile(t, ELEMENTSOF(t) - 1);
        {
                Fake f;
                if (setup(&f)) {
                        ASSERT_OK(fake_send_str(&f, t[ELEMENTSOF(t) - 1].data));
                        fake_hangup(&f);
                        ASSERT_TRUE(fake_wait_failed(&f, 3 * SEC));
                        ASSERT_EQ(f.n_events, 1);
                        ASSERT_EQ(f.n_failed, 1);
                        ASSERT_NEG(f.fail_error);
                        fake_free(&f);
                }
        }
}

static void test_hostile_structure(void) {
        static const Hostile t[] = {
                {"reply without id", "{\"return\": {}}\r\n"},
                {"error reply without id", "{\"error\": {\"class\": \"GenericError\", \"desc\": \"x\"}}\r\n"},
                {"id is a string", "{\"return\": {}, \"id\": \"2\"}\r\n"},
                {"id is a double", "{\"return\": {}, \"id\": 2.0}\r\n"},
                {"id is 1e400", "{\"return\": {}, \"id\": 1e400}\r\n"},
                {"id is -1e400", "{\"return\": {}, \"id\": -1e400}\r\n"},
                {"id is negative", "{\"return\": {}, \"id\": -2}\r\n"},
                {"id is hugely negative", "{\"return\": {}, \"id\": -99999999999999999999999}\r\n"},
                {"id is null", "{\"return\": {}, \"id\": null}\r\n"},
                {"id is a bool", "{\"return\": {}, \"id\": true}\r\n"},
                {"id is an object", "{\"return\": {}, \"id\": {\"n\": 2}}\r\n"},
                {"error without desc", "{\"error\": {\"class\": \"GenericError\"}, \"id\": 2}\r\n"},
                {"error without class", "{\"error\": {\"desc\": \"x\"}, \"id\": 2}\r\n"},
                {"error desc not a string", "{\"error\": {\"class\": \"GenericError\", \"desc\": 42}, \"id\": 2}\r\n"},
                {"error is a string", "{\"error\": \"boom\", \"id\": 2}\r\n"},
                {"error is null", "{\"error\": null, \"id\": 2}\r\n"},
                {"both return and error",
                        "{\"return\": {}, \"error\": {\"class\": \"GenericError\", \"desc\": \"x\"}, \"id\": 2}\r\n"},
                {"neither return nor error nor event", "{\"id\": 2}\r\n"},
                {"empty object", "{}\r\n"},
                {"return null", "{\"return\": null, \"id\": 2}\r\n"},
                {"event name not a string", "{\"event\": 42}\r\n"},
                {"event name null", "{\"event\": null, \"data\": {}}\r\n"},
                {"event name an object", "{\"event\": {}, \"data\": {}}\r\n"},
                {"event name with NUL", "{\"event\": \"BLOCK_JOB_COMPLETED\\u0000X\", \"data\": {}}\r\n"},
                {"event name only NUL", "{\"event\": \"\\u0000\"}\r\n"},
                {"event data not an object", "{\"event\": \"STOP\", \"data\": [1]}\r\n"},
                {"event data a string", "{\"event\": \"STOP\", \"data\": \"x\"}\r\n"},
                {"second greeting", FAKE_GREETING},
        };

        run_hostile(t, ELEMENTSOF(t));
}

/* Event names reach logs: QEMU's are words, anything else is a violation. */
static void test_hostile_event_names(void) {
        static const Hostile t[] = {
                {"event name with an escape", "{\"event\": \"STOP\\u001b[2J\", \"data\": {}}\r\n"},
                {"event name with a newline", "{\"event\": \"STOP\\nGuest vm1: fake log line\"}\r\n"},
                {"event name with a space", "{\"event\": \"BLOCK JOB\"}\r\n"},
                {"event name with a slash", "{\"event\": \"../x\"}\r\n"},
                {"empty event name", "{\"event\": \"\"}\r\n"},
                {"event name not ASCII", "{\"event\": \"STOP\xc3\xa9\"}\r\n"},
        };

        run_hostile(t, ELEMENTSOF(t));
}

static void test_hostile_utf8(void) {
        static const Hostile t[] = {
                {"invalid UTF-8: 0xff", "{\"event\": \"X\", \"data\": {\"s\": \"a\xff"
                                        "b\"}}\r\n"},
                {"invalid UTF-8: lone continuation byte", "{\"event\": \"X\", \"data\": {\"s\": \"a\x80"
                                                          "b\"}}\r\n"},
                {"invalid UTF-8: truncated sequence", "{\"event\": \"X\", \"data\": {\"s\": \"a\xc3\"}}\r\n"},
                {"invalid UTF-8 in an event name", "{\"event\": \"X\xfe\"}\r\n"},
                {"invalid UTF-8 in a key", "{\"event\": \"X\", \"data\": {\"\xff\": 1}}\r\n"},
                {"invalid UTF-8 in an error desc",
                        "{\"error\": {\"class\": \"GenericError\", \"desc\": \"\xff\"}, \"id\": 2}\r\n"},
        };

        run_hostile(t, ELEMENTSOF(t));
}

/* RFC 3629: overlong forms, UTF-16 surrogates and code points past U+10FFFF are not UTF-8
 * either; sd-bus refuses such strings, so they must not get past the QMP layer. */
static void test_hostile_utf8_nonshortest(void) {
        static const Hostile t[] = {
                {"overlong UTF-8 '/' (c0 af)", "{\"error\": {\"class\": \"GenericError\", \"desc\": \"a\xc0\xaf"
                                               "b\"}, \"id\": 2}\r\n"},
                {"overlong UTF-8 (e0 80 af)", "{\"event\": \"X\", \"data\": {\"s\": \"\xe0\x80\xaf\"}}\r\n"},
                {"UTF-8 encoded surrogate (ed a0 80)", "{\"event\": \"X\", \"data\": {\"s\": \"\xed\xa0\x80\"}}\r\n"},
                {"code point above U+10FFFF (f4 90 80 80)",
                        "{\"event\": \"X\", \"data\": {\"s\": \"\xf4\x90\x80\x80\"}}\r\n"},
                {"lead byte f5", "{\"event\": \"X\", \"data\": {\"s\": \"\xf5\x80\x80\x80\"}}\r\n"},
        };

        run_hostile(t, ELEMENTSOF(t));
}

static void test_nesting(void) {
        _cleanup_free_ char *ok = nested(QMP_DEPTH_MAX), *deep = nested(QMP_DEPTH_MAX + 1), *deeper = nested(100000);
        Fake f;
        unsigned want = 1;

        /* Exactly QMP_DEPTH_MAX levels: fine. */
        if (setup(&f)) {
                ASSERT_OK(fake_send_str(&f, ok));
                fake_run_until(&f, cond_events, &want, 3 * SEC);
                ASSERT_EQ(f.n_events, 1);
                ASSERT_EQ(f.n_failed, 0);
                fake_free(&f);
        }
        check_refused("nesting QMP_DEPTH_MAX + 1", deep, strlen(deep), false);
        check_refused("nesting 100000", deeper, strlen(deeper), false);
}

/* Numbers beyond every integer type: no UB (UBSan watches), no confusion with real ids. */
static void test_huge_numbers(void) {
        static const char *const ids[] = {
                "99999999999999999999999", "18446744073709551615",
                "18446744073709551617", /* 2^64 + 1: must not wrap to 1 or 2 */
                "18446744073709551618", "9223372036854775807", "9223372036854775808",
                "36893488147419103234", /* 2^65 + 2 */
        };
        Fake f;
        FakeCall c = {};
        json_object *cmd;

        if (!setup(&f))
                return;
        cmd = call_and_receive(&f, &c, "query-status", NULL);
        ASSERT_EQ(fake_command_id(cmd), 2);
        for (size_t i = 0; i < ELEMENTSOF(ids) && f.n_failed == 0; i++) {
                ASSERT_OK(fake_sendf(&f, "{\"return\": {\"bogus\": %zu}, \"id\": %s}\r\n", i, ids[i]));
                fake_run(&f, 20 * MSEC);
                if (c.n_handler > 0 && c.error == 0)
                        TAP_FAIL("reply with id %s was taken for the call with id 2", ids[i]);
        }
        if (f.n_failed == 0) {
                /* Still connected: the real reply still works. */
                ASSERT_OK(fake_reply(&f, cmd, "{\"real\": true}"));
                fake_run_until(&f, cond_call_done, &c, 3 * SEC);
                ASSERT_EQ(c.n_handler, 1);
                ASSERT_EQ(c.error, 0);
                ASSERT_STREQ(c.result, "{\"real\":true}");
        } else {
                ASSERT_EQ(c.n_handler, 1);
                ASSERT_NEG(c.error);
        }
        ASSERT_EQ(c.n_destroy, 1);
        json_object_put(cmd);
        fake_call_done(&c);
        fake_free(&f);

        /* The greeting's version numbers are QEMU's too. */
        ASSERT_OK(fake_new(&f));
        ASSERT_OK(fake_send_str(&f,
                "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 1e400, \"minor\": 99999999999999999999999, "
                "\"major\": -9223372036854775808}, \"package\": 5}, \"capabilities\": {}}}\r\n"));
        cmd = fake_next_command(&f, 3 * SEC);
        if (cmd) {
                ASSERT_TRUE(qmp_qemu_version(f.q) < 1000000);
                json_object_put(cmd);
        }
        fake_free(&f);
}

/* Size limits */

static char *big_event_prefix(size_t total, char fill, size_t *ret_len) {
        static const char head[] = "{\"event\": \"X\", \"data\": {\"s\": \"";
        char *s = malloc(total + 1);

        memcpy(s, head, sizeof(head) - 1);
        memset(s + sizeof(head) - 1, fill, total - (sizeof(head) - 1));
        s[total] = 0;
        *ret_len = total;
        return s;
}

static void test_message_max_feed(void) {
        Fake f;
        size_t len;
        char *buf;
        uint64_t before, after;
        int r;

        if (!setup(&f))
                return;
        /* 11 MiB of one string, never terminated, handed over in one piece. */
        buf = big_event_prefix(QMP_MESSAGE_MAX + (1U << 20), 'A', &len);
        before = fake_rss();
        r = qmp_feed(f.q, buf, len);
        after = fake_rss();
        ASSERT_ERRNO(r, -EMSGSIZE);
        ASSERT_EQ(f.n_failed, 1);
        ASSERT_NEG(f.fail_error);
        ASSERT_FALSE(qmp_is_ready(f.q));
        if (rss_checks_enabled() && after > before + (48U << 20))
                TAP_FAIL("RSS grew by %" PRIu64 " MiB while refusing an 11 MiB message", (after - before) >> 20);
        fprintf(stderr, "# refusing an 11 MiB message fed at once: RSS %+.1f MiB\n",
                ((double) after - (double) before) / 1048576.0);
        /* Feeding more after the failure is ignored. */
        ASSERT_OK(qmp_feed(f.q, "{\"event\": \"X\"}\r\n", 16));
        ASSERT_EQ(f.n_events, 0);
        ASSERT_EQ(f.n_failed, 1);
        free(buf);
        fake_free(&f);

        /* Just under the limit (in many pieces): accepted. */
        if (setup(&f)) {
                size_t total = QMP_MESSAGE_MAX - 64, off = 0;
                buf = big_event_prefix(total, 'B', &len);
                memcpy(buf + total - 5, "\"}}\r\n", 5);
                while (off < len) {
                        size_t k = MIN((size_t) 65536, len - off);
                        r = qmp_feed(f.q, buf + off, k);
                        if (r < 0) {
                                TAP_FAIL("a %zu byte message was refused at offset %zu: %s", len, off, strerror(-r));
                                break;
                        }
                        off += k;
                }
                ASSERT_EQ(f.n_events, 1);
                ASSERT_EQ(f.n_failed, 0);
                free(buf);
                fake_free(&f);
        }
}

static void test_message_max_socket(void) {
        static const char head[] = "{\"event\": \"X\", \"data\": {\"s\": \"";
        Fake f;
        char chunk[65536];
        uint64_t before, peak = 0, sent = 0;
        int r = 0;

        if (!setup(&f))
                return;
        f.keep_events = false;
        memset(chunk, 'A', sizeof(chunk));
        before = fake_rss();
        ASSERT_OK(fake_send_str(&f, head));
        /* Up to 64 MiB: the client must hang up long before. */
        while (sent < (64ULL << 20) && f.n_failed == 0) {
                r = fake_send(&f, chunk, sizeof(chunk));
                if (r < 0)
                        break;
                sent += sizeof(chunk);
                peak = MAX(peak, fake_rss());
        }
        fake_wait_failed(&f, 3 * SEC);
        ASSERT_EQ(f.n_failed, 1);
        ASSERT_NEG(f.fail_error);
        /* Socket buffers hold a few hundred KiB at most. */
        if (sent > QMP_MESSAGE_MAX + (4U << 20))
                TAP_FAIL("the client accepted %" PRIu64 " bytes of one message before refusing it", sent);
        if (rss_checks_enabled() && peak > before + (48U << 20))
                TAP_FAIL("RSS grew by %" PRIu64 " MiB while refusing an endless message", (peak - before) >> 20);
        fprintf(stderr, "# endless message refused after %.1f MiB sent, peak RSS %+.1f MiB\n",
                (double) sent / 1048576.0, ((double) peak - (double) before) / 1048576.0);
        ASSERT_TRUE(fake_wait_peer_eof(&f, 3 * SEC));
        fake_free(&f);
}

/* Feed a reply to cmd as QEMU would write it: in pieces, through the socket. */
static void send_reply_text(Fake *f, json_object *cmd, const char *ret_json) {
        _cleanup_free_ char *msg =
                strdup_printf("{\"return\": %s, \"id\": %" PRIi64 "}\r\n", ret_json, fake_command_id(cmd));
        size_t len = msg ? strlen(msg) : 0;

        for (size_t off = 0; off < len;) {
                size_t k = MIN((size_t) 65536, len - off);
                if (fake_send(f, msg + off, k) < 0)
                        break;
                off += k;
        }
}

/* Bytes are not what costs: json-c turns 1 MB of [{},{},...] (333k empty objects, well under
 * the byte cap) into ~270 MB of heap. The pre-scan refuses such a message before json-c builds
 * it, and the connection goes as for any protocol violation. */
static void test_message_cost(void) {
        enum { N = 333333 };
        Fake f;
        FakeCall c = {};
        json_object *cmd;
        _cleanup_free_ char *arr = malloc((size_t) N * 3 + 2);
        uint64_t before, peak;
        bool hwm;
        size_t p = 0;

        if (!arr || !setup(&f))
                return;
        arr[p++] = '[';
        for (unsigned i = 0; i < N; i++) {
                memcpy(arr + p, i ? ",{}" : "{}", i ? 3 : 2);
                p += i ? 3 : 2;
        }
        arr[p++] = ']';
        arr[p] = 0;
        ASSERT_TRUE(p < QMP_MESSAGE_MAX);

        cmd = call_and_receive(&f, &c, "query-named-block-nodes", NULL);
        hwm = rss_checks_enabled() && fake_peak_rss_reset() >= 0;
        before = fake_rss();
        send_reply_text(&f, cmd, arr);
        fake_run_until(&f, cond_call_done, &c, 60 * SEC);
        peak = fake_peak_rss();
        ASSERT_EQ(c.n_handler, 1);
        ASSERT_NEG(c.error);
        ASSERT_NULL(c.result);
        ASSERT_EQ(f.n_failed, 1);
        ASSERT_ERRNO(f.fail_error, -E2BIG);
        ASSERT_FALSE(qmp_is_ready(f.q));
        if (hwm && peak > before + (32U << 20))
                TAP_FAIL("peak RSS grew by %" PRIu64 " MiB for a %zu KiB message", (peak - before) >> 20, p >> 10);
        if (hwm)
                fprintf(stderr, "# %zu KiB of [{},...] refused, peak RSS %+.1f MiB\n", p >> 10,
                        ((double) peak - (double) before) / 1048576.0);
        ASSERT_TRUE(fake_wait_peer_eof(&f, 3 * SEC));
        json_object_put(cmd);
        fake_call_done(&c);
        fake_free(&f);
}

/* The budget is well above what a real QEMU sends: query-named-block-nodes of 256 disks with
 * 3-image chains (QEMU 7.2's 6 nodes of such a disk, 256 times: 1536 nodes) is accepted. */
static void test_message_cost_legitimate(void) {
        _cleanup_free_ char *fixture = fake_load_text("query-named-block-nodes-chain3.json");
        _cleanup_free_ char *big = NULL;
        size_t flen, p = 0, n = 256;
        Fake f;
        FakeCall c = {};
        json_object *cmd, *result;
        char *open_bracket, *close_bracket;

        if (!fixture) {
                TAP_FAIL("cannot load the fixture");
                return;
        }
        /* The fixture is one array: repeat its elements. */
        open_bracket = strchr(fixture, '[');
        close_bracket = strrchr(fixture, ']');
        if (!open_bracket || !close_bracket || close_bracket < open_bracket) {
                TAP_FAIL("fixture is not an array");
                return;
        }
        flen = (size_t) (close_bracket - open_bracket - 1);
        big = malloc(n * (flen + 1) + 3);
        big[p++] = '[';
        for (size_t i = 0; i < n; i++) {
                if (i)
                        big[p++] = ',';
                memcpy(big + p, open_bracket + 1, flen);
                p += flen;
        }
        big[p++] = ']';
        big[p] = 0;

        if (!setup(&f))
                return;
        cmd = call_and_receive(&f, &c, "query-named-block-nodes", NULL);
        send_reply_text(&f, cmd, big);
        fake_run_until(&f, cond_call_done, &c, 60 * SEC);
        ASSERT_EQ(c.n_handler, 1);
        ASSERT_EQ(c.error, 0);
        ASSERT_EQ(f.n_failed, 0);
        result = c.result ? json_tokener_parse(c.result) : NULL;
        ASSERT_TRUE(result && json_object_array_length(result) == 6 * n);
        fprintf(stderr, "# %zu nodes in %zu KiB accepted\n", result ? json_object_array_length(result) : 0, p >> 10);
        json_object_put(result);
        json_object_put(cmd);
        fake_call_done(&c);
        fake_free(&f);
}

static void test_pending_max(void) {
        Fake f;
        FakeCall *c;
        unsigned destroyed = 0, handled = 0;
        int p[2];

        if (!setup(&f))
                return;
        c = calloc(QMP_PENDING_MAX + 1, sizeof(FakeCall));
        for (unsigned i = 0; i < QMP_PENDING_MAX; i++)
                if (fake_call(&f, &c[i], "query-status", NULL, -1) < 0) {
                        TAP_FAIL("call %u of %u refused", i, QMP_PENDING_MAX);
                        break;
                }
        ASSERT_OK(pipe2(p, O_CLOEXEC));
        ASSERT_ERRNO(fake_call(&f, &c[QMP_PENDING_MAX], "query-status", json_object_new_object(), p[0]), -EBUSY);
        ASSERT_FALSE(fd_is_open(p[0])); /* consumed on failure too */
        close(p[1]);
        ASSERT_EQ(c[QMP_PENDING_MAX].n_destroy, 0); /* on failure the caller keeps userdata */

        fake_run(&f, 20 * MSEC);
        fake_close(&f);
        for (unsigned i = 0; i <= QMP_PENDING_MAX; i++) {
                destroyed += c[i].n_destroy;
                handled += c[i].n_handler;
        }
        ASSERT_EQ(destroyed, QMP_PENDING_MAX);
        ASSERT_EQ(handled, 0);
        ASSERT_EQ(f.n_failed, 0);
        free(c);
        fake_free(&f);
}

static void test_event_flood(void) {
        enum { N = 100000 };
        Fake f;
        FakeCall c = {};
        json_object *cmd;
        char *buf;
        size_t len = 0, cap = (size_t) N * 160;
        uint64_t before, peak = 0;
        unsigned want = N;
        usec_t t0;

        if (!setup(&f))
                return;
        f.keep_events = false;
        cmd = call_and_receive(&f, &c, "query-block-jobs", NULL);
        buf = malloc(cap);
        for (unsigned i = 0; i < N; i++)
                len += (size_t) snprintf(buf + len, cap - len,
                        "{\"timestamp\": {\"seconds\": %u, \"microseconds\": 1}, \"event\": \"JOB_STATUS_CHANGE\", "
                        "\"data\": {\"status\": \"running\", \"id\": \"j%u\"}}\r\n",
                        i, i);
        len += (size_t) snprintf(
                buf + len, cap - len, "{\"return\": [], \"id\": %" PRIi64 "}\r\n", fake_command_id(cmd));

        before = fake_rss();
        t0 = now_usec(CLOCK_MONOTONIC);
        for (size_t off = 0; off < len;) {
                size_t k = MIN((size_t) 1 << 20, len - off);
                if (fake_send(&f, buf + off, k) < 0)
                        break;
                off += k;
                peak = MAX(peak, fake_rss());
        }
        fake_run_until(&f, cond_events, &want, 120 * SEC);
        fake_run_until(&f, cond_call_done, &c, 10 * SEC);
        peak = MAX(peak, fake_rss());
        ASSERT_EQ(f.n_events, N);
        ASSERT_EQ(f.n_failed, 0);
        ASSERT_EQ(c.n_handler, 1);
        ASSERT_EQ(c.error, 0);
        if (rss_checks_enabled() && peak > before + (32U << 20))
                TAP_FAIL("RSS grew by %" PRIu64 " MiB during an event flood", (peak - before) >> 20);
        fprintf(stderr, "# %u events in %.2f s, RSS %+.1f MiB\n", (unsigned) N,
                (double) (now_usec(CLOCK_MONOTONIC) - t0) / 1e6, ((double) peak - (double) before) / 1048576.0);

        free(buf);
        json_object_put(cmd);
        fake_call_done(&c);
        fake_free(&f);
}

/* A transcript cut at every byte */

static const char transcript[] = FAKE_GREETING
        "{\"return\": {}, \"id\": 1}\r\n"
        "{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"JOB_STATUS_CHANGE\", \"data\": {\"status\": \"running\", \"id\": \"j1\"}}\r\n"
        "{\"return\": {\"status\": \"running\", \"running\": true}, \"id\": 2}\r\n"
        "{\"event\": \"STOP\"}\r\n"
        "{\"return\": [], \"id\": 3}\r\n";

static void test_disconnect_every_offset(void) {
        size_t len = sizeof(transcript) - 1;
        unsigned bad = 0;

        for (size_t cut = 0; cut <= len && bad < 10; cut++) {
                Fake f;
                FakeCall c = {};
                unsigned before = tap_failed_checks;

                if (fake_new(&f) < 0) {
                        TAP_FAIL("fake_new");
                        return;
                }
                f.call_on_ready = &c;
                if (cut > 0)
                        (void) fake_send(&f, transcript, cut);
                closep(&f.peer); /* QEMU dies */
                if (!fake_wait_failed(&f, 3 * SEC))
                        TAP_FAIL("cut at %zu: connection loss not reported", cut);
                fake_run(&f, 2 * MSEC);
                if (f.n_failed != 1 || f.fail_error >= 0)
                        TAP_FAIL("cut at %zu: on_state(error) %u times, error %d", cut, f.n_failed, f.fail_error);
                if (f.n_ready > 1)
                        TAP_FAIL("cut at %zu: ready %u times", cut, f.n_ready);
                if (f.n_ready == 1 && (c.n_handler != 1 || c.n_destroy != 1))
                        TAP_FAIL("cut at %zu: call issued on ready: handler %u, destroy %u", cut, c.n_handler,
                                c.n_destroy);
                if (f.n_ready == 0 && (c.n_handler || c.n_destroy))
                        TAP_FAIL("cut at %zu: a call that was never made completed", cut);
                fake_call_done(&c);
                fake_free(&f);
                if (tap_failed_checks != before)
                        bad++;
        }
}

/* After the handshake, QEMU's output in two pieces cut at every byte: the same outcome. QEMU
 * answers a command only after it got it, so the call is made and received first. */
static const char after_ready[] =
        "{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"JOB_STATUS_CHANGE\", \"data\": {\"status\": \"running\", \"id\": \"j1\"}}\r\n"
        "{\"return\": {\"status\": \"running\", \"running\": true}, \"id\": 2}\r\n"
        "{\"event\": \"STOP\"}\r\n";

static void test_split_every_offset(void) {
        size_t len = sizeof(after_ready) - 1;
        unsigned bad = 0, want = 2;

        for (size_t cut = 1; cut < len && bad < 10; cut++) {
                Fake f;
                FakeCall c = {};
                json_object *cmd;
                unsigned before = tap_failed_checks;

                if (!setup(&f))
                        return;
                cmd = call_and_receive(&f, &c, "query-status", NULL);
                (void) fake_send(&f, after_ready, cut);
                fake_run(&f, 1 * MSEC); /* the client takes the first piece alone */
                (void) fake_send(&f, after_ready + cut, len - cut);
                fake_run_until(&f, cond_events, &want, 3 * SEC);
                if (f.n_failed != 0 || f.n_events != 2)
                        TAP_FAIL("cut at %zu: failed %u (%d), events %u", cut, f.n_failed, f.fail_error, f.n_events);
                else
                        ASSERT_STREQ(f.last_event, "STOP");
                if (c.n_handler != 1 || c.error != 0 || c.n_destroy != 1)
                        TAP_FAIL("cut at %zu: call handler %u error %d destroy %u", cut, c.n_handler, c.error,
                                c.n_destroy);
                json_object_put(cmd);
                fake_call_done(&c);
                fake_free(&f);
                if (tap_failed_checks != before)
                        bad++;
        }
}

/* qmp_feed is "as if read from the socket": how the bytes are cut must not matter, also inside
 * a multi-byte UTF-8 character. A 64 KiB read boundary falls anywhere in QEMU's output. */
static void test_utf8_split_feed(void) {
        static const char msg[] =
                "{\"event\": \"X\", \"data\": {\"file\": \"/srv/images/caf\xc3\xa9-\xe2\x82\xac-\xf0\x9f\x98\x80.qcow2\"}}\r\n";
        size_t len = sizeof(msg) - 1;

        for (size_t cut = 1; cut < len; cut++) {
                Fake f;
                int r1, r2;

                if (!setup(&f))
                        return;
                r1 = qmp_feed(f.q, msg, cut);
                r2 = qmp_feed(f.q, msg + cut, len - cut);
                if (r1 < 0 || r2 < 0 || f.n_events != 1 || f.n_failed != 0)
                        TAP_FAIL("cut at %zu (byte 0x%02x | 0x%02x): feed %d/%d, events %u, closed %u (%s)", cut,
                                (unsigned char) msg[cut - 1], (unsigned char) msg[cut], r1, r2, f.n_events, f.n_failed,
                                f.n_failed ? strerror(-f.fail_error) : "-");
                else if (!strstr(f.last_data, "caf\xc3\xa9-\xe2\x82\xac-\xf0\x9f\x98\x80"))
                        TAP_FAIL("cut at %zu: data mangled: %s", cut, f.last_data);
                fake_free(&f);
        }
}

static void test_utf8_across_read_boundary(void) {
        Fake f;
        char *msg;
        size_t len = 70000, off = 0;
        unsigned want = 1;

        if (!setup(&f))
                return;
        /* The client reads 64 KiB at a time: put "é" across bytes 65535/65536 of a message that
         * arrives in one piece. */
        msg = malloc(len + 1);
        off = (size_t) sprintf(msg, "{\"event\": \"X\", \"data\": {\"s\": \"");
        memset(msg + off, 'a', len - off);
        msg[65535] = (char) 0xc3;
        msg[65536] = (char) 0xa9;
        memcpy(msg + len - 5, "\"}}\r\n", 5);
        msg[len] = 0;
        ASSERT_OK(fake_send(&f, msg, len));
        fake_run_until(&f, cond_events, &want, 3 * SEC);
        ASSERT_EQ(f.n_failed, 0);
        ASSERT_EQ(f.n_events, 1);
        free(msg);
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

/* Closing from inside callbacks */

/* The client was closed from one of its callbacks: pending call b was dropped (destroyed, never
 * answered), nothing failed, no state change came after the close, and QEMU sees the end. */
static void check_closed_from_callback(Fake *f, FakeCall *b) {
        ASSERT_TRUE(f->closed);
        ASSERT_EQ(b->n_handler, 0);
        ASSERT_EQ(b->n_destroy, 1);
        ASSERT_EQ(f->n_failed, 0);
        ASSERT_EQ(f->n_state_after_close, 0);
        ASSERT_TRUE(fake_wait_peer_eof(f, 3 * SEC));
}

static void test_close_in_reply_handler(void) {
        Fake f;
        FakeCall a = {.close_in_handler = true}, b = {};
        json_object *ca, *cb;

        if (!setup(&f))
                return;
        ca = call_and_receive(&f, &a, "query-status", NULL);
        cb = call_and_receive(&f, &b, "query-status", NULL);
        /* The rest of the same read must not be dispatched once closed. */
        ASSERT_OK(fake_sendf(&f,
                "{\"return\": {}, \"id\": %" PRIi64 "}\r\n{\"event\": \"STOP\"}\r\n{\"return\": {}, \"id\": %" PRIi64
                "}\r\n",
                fake_command_id(ca), fake_command_id(cb)));
        fake_run_until(&f, cond_call_done, &a, 3 * SEC);
        fake_run(&f, 50 * MSEC);
        ASSERT_EQ(a.n_handler, 1);
        ASSERT_EQ(a.error, 0);
        ASSERT_EQ(a.n_destroy, 1);
        ASSERT_EQ(f.n_events, 0);
        check_closed_from_callback(&f, &b);
        json_object_put(ca);
        json_object_put(cb);
        fake_call_done(&a);
        fake_call_done(&b);
        fake_free(&f);
}

static void test_close_in_event_handler(void) {
        Fake f;
        FakeCall b = {};
        json_object *cb;

        if (!setup(&f))
                return;
        f.close_on_event = true;
        cb = call_and_receive(&f, &b, "query-status", NULL);
        ASSERT_OK(fake_sendf(&f,
                "{\"event\": \"STOP\"}\r\n{\"event\": \"RESUME\"}\r\n{\"return\": {}, \"id\": %" PRIi64 "}\r\n",
                fake_command_id(cb)));
        fake_run(&f, 100 * MSEC);
        ASSERT_EQ(f.n_events, 1);
        ASSERT_EQ(f.n_events_after_close, 0);
        check_closed_from_callback(&f, &b);
        json_object_put(cb);
        fake_call_done(&b);
        fake_free(&f);
}

static void test_close_in_state_handler(void) {
        Fake f;
        FakeCall c = {};
        json_object *cmd;

        /* From on_state(0), with a call issued just before. */
        ASSERT_OK(fake_new(&f));
        f.call_on_ready = &c;
        f.close_on_ready = true;
        ASSERT_OK(fake_send_str(&f, FAKE_GREETING));
        cmd = fake_next_command(&f, 3 * SEC);
        ASSERT_OK(fake_sendf(
                &f, "{\"return\": {}, \"id\": %" PRIi64 "}\r\n{\"event\": \"STOP\"}\r\n", fake_command_id(cmd)));
        fake_run(&f, 100 * MSEC);
        ASSERT_EQ(f.n_ready, 1);
        ASSERT_TRUE(f.closed);
        ASSERT_EQ(f.n_events, 0);
        ASSERT_EQ(f.n_failed, 0);
        ASSERT_EQ(c.n_handler, 0);
        ASSERT_EQ(c.n_destroy, 1);
        json_object_put(cmd);
        fake_call_done(&c);
        fake_free(&f);

        /* From on_state(error). */
        c = (FakeCall){};
        if (setup(&f)) {
                json_object *cc;
                f.close_on_failure = true;
                cc = call_and_receive(&f, &c, "query-status", NULL);
                ASSERT_OK(fake_send_str(&f, "garbage\r\n"));
                fake_wait_failed(&f, 3 * SEC);
                fake_run(&f, 20 * MSEC);
                ASSERT_EQ(f.n_failed, 1);
                ASSERT_TRUE(f.closed);
                ASSERT_EQ(c.n_handler, 1);
                ASSERT_NEG(c.error);
                ASSERT_EQ(c.n_destroy, 1);
                json_object_put(cc);
                fake_call_done(&c);
                fake_free(&f);
        }
}

/* Two calls pending; the owner closes the client from the first call's handler (it tears the
 * guest down) when QEMU dies, or when the call times out. From then on nothing may be called:
 * not the second call's handler, not on_state (its userdata may be gone). */
static void close_in_handler(bool by_timeout) {
        Fake f;
        FakeCall a = {.close_in_handler = true}, b = {};
        json_object *ca, *cb;

        if (!setup(&f))
                return;
        if (by_timeout)
                qmp_set_timeout(f.q, 100 * MSEC);
        ca = call_and_receive(&f, &a, "query-status", NULL);
        cb = call_and_receive(&f, &b, "query-status", NULL);
        if (!by_timeout)
                closep(&f.peer);
        fake_run_until(&f, cond_call_done, &a, 3 * SEC);
        fake_run(&f, by_timeout ? 300 * MSEC : 50 * MSEC);
        ASSERT_EQ(a.n_handler, 1);
        if (by_timeout)
                ASSERT_ERRNO(a.error, -ETIMEDOUT);
        else
                ASSERT_NEG(a.error);
        ASSERT_EQ(a.n_destroy, 1);
        ASSERT_TRUE(f.closed);
        ASSERT_FALSE(b.handler_after_close);
        ASSERT_EQ(b.n_destroy, 1);
        ASSERT_EQ(f.n_state_after_close, 0);
        json_object_put(ca);
        json_object_put(cb);
        fake_call_done(&a);
        fake_call_done(&b);
        fake_free(&f);
}

static void test_close_in_handler_on_connection_loss(void) {
        close_in_handler(false);
}

static void test_close_in_handler_on_timeout(void) {
        close_in_handler(true);
}

/* destroy runs exactly once on every path. */
static void test_destroy_paths(void) {
        Fake f;
        FakeCall c[4] = {};
        json_object *cmd;

        /* Reply: covered elsewhere. Connection lost: */
        if (setup(&f)) {
                cmd = call_and_receive(&f, &c[0], "query-status", NULL);
                ASSERT_OK(fake_call(&f, &c[1], "query-status", NULL, -1)); /* maybe unsent */
                closep(&f.peer);
                fake_wait_failed(&f, 3 * SEC);
                fake_run(&f, 20 * MSEC);
                for (size_t i = 0; i < 2; i++) {
                        ASSERT_EQ(c[i].n_handler, 1);
                        ASSERT_ERRNO(c[i].error, -ECONNRESET);
                        ASSERT_EQ(c[i].n_destroy, 1);
                }
                json_object_put(cmd);
                fake_free(&f);
                for (size_t i = 0; i < 2; i++) {
                        ASSERT_EQ(c[i].n_destroy, 1);
                        fake_call_done(&c[i]);
                }
        }

        /* close_unref: destroy without handler. */
        memset(c, 0, sizeof(c));
        if (setup(&f)) {
                cmd = call_and_receive(&f, &c[0], "query-status", NULL);
                ASSERT_OK(fake_call(&f, &c[1], "query-status", NULL, -1));
                fake_close(&f);
                for (size_t i = 0; i < 2; i++) {
                        ASSERT_EQ(c[i].n_handler, 0);
                        ASSERT_EQ(c[i].n_destroy, 1);
                }
                json_object_put(cmd);
                fake_free(&f);
        }

        /* Dropping the last reference without closing: destroy once, no handler. */
        memset(c, 0, sizeof(c));
        if (setup(&f)) {
                cmd = call_and_receive(&f, &c[0], "query-status", NULL);
                f.q = qmp_unref(f.q);
                ASSERT_EQ(c[0].n_handler, 0);
                ASSERT_EQ(c[0].n_destroy, 1);
                ASSERT_TRUE(fake_wait_peer_eof(&f, 3 * SEC));
                json_object_put(cmd);
                fake_free(&f);
        }

        /* An extra reference keeps the object, close_unref still drops the calls. */
        memset(c, 0, sizeof(c));
        if (setup(&f)) {
                Qmp *extra = qmp_ref(f.q);
                cmd = call_and_receive(&f, &c[0], "query-status", NULL);
                fake_close(&f);
                ASSERT_EQ(c[0].n_destroy, 1);
                ASSERT_FALSE(qmp_is_ready(extra));
                ASSERT_ERRNO(qmp_call(extra, "query-status", NULL, -1, NULL, NULL, NULL), -ENOTCONN);
                qmp_unref(extra);
                json_object_put(cmd);
                fake_free(&f);
        }
        ASSERT_NULL(qmp_unref(NULL));
        ASSERT_NULL(qmp_close_unref(NULL));
        ASSERT_NULL(qmp_ref(NULL));
}

/* qmp_close_drained(): what was queued reaches QEMU and is answered before the close (QEMU drops
 * undispatched commands of a client that went), the owner hears nothing more, done runs once. */
typedef struct Drained {
        unsigned n;
        int error;
} Drained;

static void drained_handler(int error, void *userdata) {
        Drained *d = userdata;
        d->n++;
        d->error = error;
}

static bool cond_drained(Fake *f, void *arg) {
        return ((Drained *) arg)->n > 0;
}

static void test_close_drained(void) {
        Fake f;
        FakeCall c[2] = {};
        Drained d = {};
        json_object *cmd, *cmd2;

        /* Answered: done(0) only after the last answer, and then the socket closes. */
        if (setup(&f)) {
                cmd = call_and_receive(&f, &c[0], "block-export-del", NULL);
                ASSERT_OK(fake_call(&f, &c[1], "nbd-server-stop", NULL, -1));
                qmp_close_drained(TAKE_PTR(f.q), 5 * SEC, drained_handler, &d);
                f.closed = true;
                for (size_t i = 0; i < 2; i++) {
                        ASSERT_EQ(c[i].n_destroy, 1);
                        ASSERT_EQ(c[i].n_handler, 0);
                }
                cmd2 = fake_next_command(&f, 5 * SEC);
                ASSERT_NOT_NULL(cmd2);
                ASSERT_STREQ(fake_command_name(cmd2), "nbd-server-stop");
                ASSERT_OK(fake_reply(&f, cmd, "{}"));
                fake_run(&f, 50 * MSEC);
                ASSERT_EQ(d.n, 0); /* one answer is still missing */
                ASSERT_FALSE(f.peer_eof);
                ASSERT_OK(fake_reply(&f, cmd2, "{}"));
                ASSERT_TRUE(fake_run_until(&f, cond_drained, &d, 5 * SEC));
                ASSERT_EQ(d.n, 1);
                ASSERT_EQ(d.error, 0);
                ASSERT_TRUE(fake_wait_peer_eof(&f, 3 * SEC));
                ASSERT_EQ(f.n_failed, 0);
                for (size_t i = 0; i < 2; i++)
                        ASSERT_EQ(c[i].n_handler, 0);
                json_object_put(cmd);
                json_object_put(cmd2);
                fake_free(&f);
                for (size_t i = 0; i < 2; i++)
                        fake_call_done(&c[i]);
        }

        /* Never answered: done(-ETIMEDOUT) after the deadline, and the socket closes. */
        memset(c, 0, sizeof(c));
        d = (Drained) {};
        if (setup(&f)) {
                cmd = call_and_receive(&f, &c[0], "nbd-server-stop", NULL);
                qmp_close_drained(TAKE_PTR(f.q), 100 * MSEC, drained_handler, &d);
                f.closed = true;
                ASSERT_TRUE(fake_run_until(&f, cond_drained, &d, 5 * SEC));
                ASSERT_EQ(d.n, 1);
                ASSERT_ERRNO(d.error, -ETIMEDOUT);
                ASSERT_TRUE(fake_wait_peer_eof(&f, 3 * SEC));
                ASSERT_EQ(c[0].n_handler, 0);
                ASSERT_EQ(c[0].n_destroy, 1);
                json_object_put(cmd);
                fake_free(&f);
                fake_call_done(&c[0]);
        }

        /* QEMU hangs up first: done with that error, once. */
        memset(c, 0, sizeof(c));
        d = (Drained) {};
        if (setup(&f)) {
                cmd = call_and_receive(&f, &c[0], "nbd-server-stop", NULL);
                qmp_close_drained(TAKE_PTR(f.q), 5 * SEC, drained_handler, &d);
                f.closed = true;
                closep(&f.peer);
                ASSERT_TRUE(fake_run_until(&f, cond_drained, &d, 5 * SEC));
                fake_run(&f, 20 * MSEC);
                ASSERT_EQ(d.n, 1);
                ASSERT_TRUE(d.error < 0);
                ASSERT_EQ(f.n_failed, 0);
                json_object_put(cmd);
                fake_free(&f);
                fake_call_done(&c[0]);
        }

        /* Nothing pending: done(0) at once. */
        d = (Drained) {};
        if (setup(&f)) {
                qmp_close_drained(TAKE_PTR(f.q), 5 * SEC, drained_handler, &d);
                f.closed = true;
                ASSERT_EQ(d.n, 1);
                ASSERT_EQ(d.error, 0);
                ASSERT_TRUE(fake_wait_peer_eof(&f, 3 * SEC));
                fake_free(&f);
        }
        d = (Drained) {};
        qmp_close_drained(NULL, 0, drained_handler, &d);
        ASSERT_EQ(d.n, 1);
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
        TAP_RUN(test_unknown_id_ignored);
        TAP_RUN(test_null_handler);
        TAP_RUN(test_events);
        TAP_RUN(test_hostile_syntax);
        TAP_RUN(test_hostile_structure);
        TAP_RUN(test_hostile_utf8);
        TAP_RUN(test_hostile_event_names);
        TAP_RUN(test_hostile_utf8_nonshortest);
        TAP_RUN(test_nesting);
        TAP_RUN(test_huge_numbers);
        TAP_RUN(test_message_max_feed);
        TAP_RUN(test_message_max_socket);
        TAP_RUN(test_message_cost);
        TAP_RUN(test_message_cost_legitimate);
        TAP_RUN(test_pending_max);
        TAP_RUN(test_event_flood);
        TAP_RUN(test_disconnect_every_offset);
        TAP_RUN(test_split_every_offset);
        TAP_RUN(test_utf8_split_feed);
        TAP_RUN(test_utf8_across_read_boundary);
        TAP_RUN(test_call_timeout);
        TAP_RUN(test_greeting_timeout);
        TAP_RUN(test_negotiation_timeout);
        TAP_RUN(test_unsent_call_timeout);
        TAP_RUN(test_fd_passing);
        TAP_RUN(test_close_in_reply_handler);
        TAP_RUN(test_close_in_event_handler);
        TAP_RUN(test_close_in_state_handler);
        TAP_RUN(test_close_in_handler_on_connection_loss);
        TAP_RUN(test_close_in_handler_on_timeout);
        TAP_RUN(test_destroy_paths);
        TAP_RUN(test_close_drained);
        return tap_finish();
}
