/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* The memory every QEMU's unfinished messages hold, shared (qmp-cost.h): within a budget of
 * 256 MiB, or a share of it; and those held longer than a second give way to others that need it,
 * the longest first (review 34c). The grace is set per test: what gives way is told by age, and a
 * test must not depend on the machine's speed. */

#include "fake-qemu.h"
#include "qmp.h"
#include "util.h"
#include "tap.h"
#include "test-qmp-util.h"

enum { N = 12, OBJECTS = 18000 }; /* each ~22 MiB estimated: 11 fit in 256 MiB, 12 do not */

/* {"event": "X", "data": {"a": [{},{},... OBJECTS of them, never ended; its length in *ret_len. */
static char *unfinished_message(size_t *ret_len) {
        static const char head[] = "{\"event\": \"X\", \"data\": {\"a\": [{}";
        char *msg = malloc(sizeof(head) + 3 * OBJECTS);
        size_t p;

        if (!msg)
                return NULL;
        p = strlen(strcpy(msg, head));
        for (unsigned i = 1; i < OBJECTS; i++, p += 3)
                memcpy(msg + p, ",{}", 3);
        *ret_len = p;
        return msg;
}

/* Messages begun and not ended are held by every connection at once: each under its own budget,
 * 64 guests' QEMUs of one user took 64 times that (review 34a). All together hold 256 MiB at most
 * (estimated); one that would go past that and its share is closed, and the others, and a new
 * QEMU's messages, go on. */
static void test_unfinished_messages_share_a_budget(void) {
        Fake f[N + 1];
        size_t p;
        _cleanup_free_ char *msg = unfinished_message(&p);
        unsigned one = 1;

        if (!msg)
                return;
        qmp_cost_set_grace(UINT64_MAX); /* none gives way: the shares alone */
        for (size_t i = 0; i < N; i++) {
                if (!setup(&f[i]))
                        return;
                ASSERT_OK(fake_send(&f[i], msg, p));
                fake_run(&f[i], 100 * MSEC);
        }
        for (size_t i = 0; i + 1 < N; i++)
                if (f[i].n_failed != 0)
                        TAP_FAIL("connection %zu closed, within the budget", i);
        if (!fake_wait_failed(&f[N - 1], 3 * SEC))
                TAP_FAIL("the 12th message begun (~264 MiB in all) did not close its connection");
        ASSERT_ERRNO(f[N - 1].fail_error, -E2BIG);
        /* A QEMU that comes now is heard. */
        if (setup(&f[N])) {
                ASSERT_OK(fake_send_str(&f[N], "{\"event\": \"Y\"}\r\n"));
                fake_run_until(&f[N], cond_events, &one, 3 * SEC);
                ASSERT_EQ(f[N].n_events, 1);
                ASSERT_EQ(f[N].n_failed, 0);
                fake_free(&f[N]);
        }
        for (size_t i = 0; i < N; i++)
                fake_free(&f[i]);
        qmp_cost_set_grace(QMP_HOLD_GRACE_USEC);
}

/* Those held past the grace give way, the longest first: with 11 QEMUs holding ~22 MiB each,
 * a 12th's message of as much is taken, and the first QEMU's connection (its message the longest
 * held) closes; the others hold on. With no grace, the shares alone refused the 12th (above): one
 * user's QEMUs holding the budget kept every other QEMU's larger replies out (review 34c). */
static void test_unfinished_messages_give_way_oldest_first(void) {
        Fake f[N];
        size_t p;
        _cleanup_free_ char *msg = unfinished_message(&p);

        if (!msg)
                return;
        qmp_cost_set_grace(0);
        for (size_t i = 0; i < N; i++) {
                if (!setup(&f[i]))
                        return;
                ASSERT_OK(fake_send(&f[i], msg, p));
                fake_run(&f[i], 100 * MSEC);
        }
        ASSERT_EQ(f[N - 1].n_failed, 0);
        if (!fake_wait_failed(&f[0], 3 * SEC))
                TAP_FAIL("the message held longest did not give way");
        ASSERT_ERRNO(f[0].fail_error, -E2BIG);
        for (size_t i = 1; i < N; i++) {
                fake_run(&f[i], 20 * MSEC);
                if (f[i].n_failed != 0)
                        TAP_FAIL("connection %zu closed, its message younger than the first's", i);
        }
        for (size_t i = 0; i < N; i++)
                fake_free(&f[i]);
        qmp_cost_set_grace(QMP_HOLD_GRACE_USEC);
}

static void evict_nothing(QmpCharge *c) {
        TAP_FAIL("a holder gave way with no grace to pass");
}

/* The shared budget's accounting alone: messages that each ask for their share as they come (the
 * budget over how many are held) added up to the budget times the harmonic number of their count
 * (review 34c: ~700 MiB for 64); twice the budget is a hard bound now. */
static void test_unfinished_budget_bounded(void) {
        enum { HOLDERS = 200 };
        static QmpCharge charged[HOLDERS];
        uint64_t total = 0;
        size_t k;

        qmp_cost_set_grace(UINT64_MAX);
        for (k = 0; k < HOLDERS; k++) {
                uint64_t want = QMP_UNFINISHED_COST_MAX / (k + 1);

                charged[k].evict = evict_nothing;
                if (!qmp_cost_may_hold(&charged[k], want))
                        break;
                qmp_cost_charge(&charged[k], want);
                total += want;
        }
        ASSERT_TRUE(k < HOLDERS);
        if (total > 2 * (uint64_t) QMP_UNFINISHED_COST_MAX)
                TAP_FAIL("%zu messages each within their share hold %" PRIu64 " MiB", k, total >> 20);
        for (size_t i = 0; i < k; i++)
                qmp_cost_charge(&charged[i], 0);
        ASSERT_TRUE(qmp_cost_may_hold(&charged[0], QMP_UNFINISHED_COST_MAX)); /* all given back */
        qmp_cost_set_grace(QMP_HOLD_GRACE_USEC);
}

static uint64_t fake_now;

static uint64_t fake_clock(void) {
        return fake_now;
}

static unsigned n_evicted;

static void evict_count(QmpCharge *c) {
        n_evicted++;
}

/* A holder's age runs from its first message of a run: one that ends each message and begins the
 * next at once held the budget all along while each message was young, so nothing gave way to an
 * honest QEMU's larger reply (review 34e). A quiet pause of the grace begins a new run. The clock
 * is the test's. */
static void test_age_runs_across_messages(void) {
        QmpCharge a = { .evict = evict_count }, b = { .evict = evict_count }, c = { .evict = evict_count };
        const uint64_t big = QMP_UNFINISHED_COST_MAX - 1024, s = 1000000;

        qmp_cost_set_clock(fake_clock);
        qmp_cost_set_grace(s);
        fake_now = 10 * s;
        qmp_cost_charge(&a, big);             /* a message at 10 s */
        fake_now += s / 2;
        qmp_cost_charge(&a, 0);               /* ended at 10.5 s, and the next begun at once */
        qmp_cost_charge(&a, big);
        fake_now += s * 7 / 10;               /* 11.2 s: the second message is 0.7 s old, the run 1.2 s */
        n_evicted = 0;
        ASSERT_TRUE(qmp_cost_may_hold(&b, 4096));
        ASSERT_EQ(n_evicted, 1);
        ASSERT_TRUE(a.evicted);
        ASSERT_FALSE(qmp_cost_may_hold(&a, big)); /* gave way: holds nothing more */
        qmp_cost_charge(&b, 0);

        /* A pause of the grace: a new run, young again. */
        fake_now += s;
        qmp_cost_charge(&c, big);             /* 12.2 s */
        fake_now += s / 2;
        qmp_cost_charge(&c, 0);
        fake_now += s;                        /* 13.7 s: quiet for 1 s */
        qmp_cost_charge(&c, big);
        fake_now += s / 2;                    /* 14.2 s: the run is 0.5 s old */
        n_evicted = 0;
        ASSERT_FALSE(qmp_cost_may_hold(&b, QMP_UNFINISHED_COST_MAX / 2 + 1)); /* past its share */
        ASSERT_EQ(n_evicted, 0);
        qmp_cost_charge(&c, 0);
        qmp_cost_set_clock(NULL);
        qmp_cost_set_grace(QMP_HOLD_GRACE_USEC);
}

int main(int argc, char **argv) {
        tap_init(argc, argv);
        log_set_max_level(getenv("BSD_UNIT_DEBUG") ? LOG_LEVEL_DEBUG : -1);

        TAP_RUN(test_unfinished_messages_share_a_budget);
        TAP_RUN(test_unfinished_messages_give_way_oldest_first);
        TAP_RUN(test_unfinished_budget_bounded);
        TAP_RUN(test_age_runs_across_messages);
        return tap_finish();
}
