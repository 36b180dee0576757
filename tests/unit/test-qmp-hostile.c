/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* The QMP client against a hostile QEMU: malformed, oversized, costly, nested or cut messages,
 * event floods. Each must either be understood or close the connection, exactly once, failing
 * every pending call exactly once, without crashing, leaking or buffering without bound. */

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
                /* Noncharacters, which sd-bus refuses too (review 34a). */
                {"noncharacter U+FFFF (ef bf bf)", "{\"event\": \"X\", \"data\": {\"s\": \"\xef\xbf\xbf\"}}\r\n"},
                {"noncharacter U+FDD0 (ef b7 90)", "{\"event\": \"X\", \"data\": {\"s\": \"\xef\xb7\x90\"}}\r\n"},
                {"noncharacter U+10FFFE (f4 8f bf be)",
                        "{\"event\": \"X\", \"data\": {\"s\": \"\xf4\x8f\xbf\xbe\"}}\r\n"},
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

        /* Each on a connection of its own: a reply to an id never issued ends the connection
         * (test-qmp.c), and the ids after the first would not be read on the same one. */
        for (size_t i = 0; i < ELEMENTSOF(ids); i++) {
                c = (FakeCall) {};
                if (!setup(&f))
                        return;
                cmd = call_and_receive(&f, &c, "query-status", NULL);
                ASSERT_EQ(fake_command_id(cmd), 2);
                ASSERT_OK(fake_sendf(&f, "{\"return\": {\"bogus\": %zu}, \"id\": %s}\r\n", i, ids[i]));
                fake_run(&f, 20 * MSEC);
                if (c.n_handler > 0 && c.error == 0)
                        TAP_FAIL("reply with id %s was taken for the call with id 2", ids[i]);
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
        }

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

/* An object's members cost json-c more than an array's elements (its hash table doubles, each
 * key is copied): an event of 150,000 members {"k0":1,"k1":1,...}, 1.6 MB of text, was estimated
 * at 20 MiB, under the budget, and took 24 MiB (json-c's parse alone; 173k took 46 MiB: review
 * 34a). It is refused now. */
static void test_object_members_cost(void) {
        enum { N = 150000 };
        _cleanup_free_ char *msg = malloc((size_t) N * 12 + 64);
        size_t p = 0;

        if (!msg)
                return;
        p += (size_t) sprintf(msg, "{\"event\": \"X\", \"data\": {");
        for (unsigned i = 0; i < N; i++)
                p += (size_t) sprintf(msg + p, "%s\"k%x\":1", i ? "," : "", i);
        p += (size_t) sprintf(msg + p, "}}\r\n");
        ASSERT_TRUE(p < QMP_MESSAGE_MAX);
        check_refused("150,000 members", msg, p, false);
}

/* A message begun and never ended: json-c holds what it built of it (up to the budget), and the
 * connection stayed for as long as QEMU liked (review 34a). It must end within the timeout; one
 * that ends in time is taken. */
static void test_message_left_unfinished(void) {
        static const char head[] = "{\"event\": \"X\", \"data\": {\"a\": [1, 2, ", tail[] = "3]}}\r\n";
        Fake f;

        if (!setup(&f))
                return;
        qmp_set_timeout(f.q, 400 * MSEC);
        ASSERT_OK(fake_send(&f, head, strlen(head)));
        fake_run(&f, 100 * MSEC);
        ASSERT_OK(fake_send(&f, tail, strlen(tail)));
        fake_run(&f, 600 * MSEC);
        ASSERT_EQ(f.n_events, 1);
        ASSERT_EQ(f.n_failed, 0);
        ASSERT_TRUE(qmp_is_ready(f.q));

        ASSERT_OK(fake_send(&f, head, strlen(head)));
        if (!fake_wait_failed(&f, 3 * SEC))
                TAP_FAIL("a message begun and not ended in 3 s (timeout 400 ms): the connection stays");
        ASSERT_ERRNO(f.fail_error, -ETIMEDOUT);
        ASSERT_EQ(f.n_events, 1);
        fake_free(&f);
}

/* Reading paused by an event's handler (the daemon paces each guest's events) stopped at the next
 * read only: the ~900 events of one 64 KiB read all went out (review 34a). The rest of a read
 * waits now, in order, until reading resumes, also if QEMU sends nothing more. */
static void test_pause_stops_within_a_read(void) {
        enum { N = 900 };
        static const char ev[] = "{\"event\": \"JOB_STATUS_CHANGE\", \"data\": {\"id\": \"j\"}}\r\n";
        _cleanup_free_ char *burst = malloc(N * (sizeof(ev) - 1));
        unsigned want = N;
        Fake f;

        if (!burst || !setup(&f))
                return;
        for (size_t i = 0; i < N; i++)
                memcpy(burst + i * (sizeof(ev) - 1), ev, sizeof(ev) - 1);
        f.pause_after_events = 10;
        ASSERT_OK(fake_send(&f, burst, N * (sizeof(ev) - 1)));
        fake_run(&f, 300 * MSEC);
        ASSERT_EQ(f.n_events, 10);
        f.pause_after_events = 500;
        qmp_set_reading(f.q, true);
        fake_run(&f, 300 * MSEC);
        ASSERT_EQ(f.n_events, 500);
        qmp_set_reading(f.q, true);
        fake_run_until(&f, cond_events, &want, 3 * SEC);
        ASSERT_EQ(f.n_events, N);
        ASSERT_EQ(f.n_failed, 0);
        ASSERT_TRUE(qmp_is_ready(f.q));
        fake_free(&f);

        /* A QEMU gone (its socket closed) has what it sent last taken at once, paused or not. */
        if (!setup(&f))
                return;
        f.pause_after_events = 10;
        ASSERT_OK(fake_send(&f, burst, N * (sizeof(ev) - 1)));
        fake_run(&f, 300 * MSEC);
        ASSERT_EQ(f.n_events, 10);
        closep(&f.peer);
        fake_wait_failed(&f, 3 * SEC);
        ASSERT_EQ(f.n_events, N);
        ASSERT_EQ(f.n_failed, 1);
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

int main(int argc, char **argv) {
        tap_init(argc, argv);
        log_set_max_level(getenv("BSD_UNIT_DEBUG") ? LOG_LEVEL_DEBUG : -1);

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
        TAP_RUN(test_object_members_cost);
        TAP_RUN(test_message_left_unfinished);
        TAP_RUN(test_pause_stops_within_a_read);
        TAP_RUN(test_pending_max);
        TAP_RUN(test_event_flood);
        TAP_RUN(test_disconnect_every_offset);
        TAP_RUN(test_split_every_offset);
        TAP_RUN(test_utf8_split_feed);
        TAP_RUN(test_utf8_across_read_boundary);
        return tap_finish();
}
