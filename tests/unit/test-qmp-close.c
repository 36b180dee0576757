/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* The QMP client closed from inside its own callbacks, destroy run exactly once on every path,
 * and draining on close. */

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

        /* Reading paused by an event's handler (the guest's pacing) with the answer read behind the
         * event: held, it came only once reading resumed, which nothing did, so the drain waited
         * for its deadline (review 34c). It is read at once now. */
        memset(c, 0, sizeof(c));
        d = (Drained) {};
        if (setup(&f)) {
                cmd = call_and_receive(&f, &c[0], "nbd-server-stop", NULL);
                f.pause_after_events = 1;
                ASSERT_OK(fake_sendf(&f, "{\"event\": \"X\"}\r\n{\"return\": {}, \"id\": %" PRIi64 "}\r\n",
                        fake_command_id(cmd)));
                fake_run(&f, 200 * MSEC);
                ASSERT_EQ(f.n_events, 1);
                ASSERT_EQ(c[0].n_handler, 0);
                qmp_close_drained(TAKE_PTR(f.q), 5 * SEC, drained_handler, &d);
                f.closed = true;
                fake_run_until(&f, cond_drained, &d, SEC);
                ASSERT_EQ(d.n, 1);
                ASSERT_EQ(d.error, 0);
                ASSERT_TRUE(fake_wait_peer_eof(&f, 3 * SEC));
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

        TAP_RUN(test_close_in_reply_handler);
        TAP_RUN(test_close_in_event_handler);
        TAP_RUN(test_close_in_state_handler);
        TAP_RUN(test_close_in_handler_on_connection_loss);
        TAP_RUN(test_close_in_handler_on_timeout);
        TAP_RUN(test_destroy_paths);
        TAP_RUN(test_close_drained);
        return tap_finish();
}
