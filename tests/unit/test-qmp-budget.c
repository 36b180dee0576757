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

/* Messages begun and not ended are held by every connection at once: each under its own budget,
 * 64 guests' QEMUs of one user took 64 times that (review 34a). All together hold 256 MiB at most
 * (estimated); one that would go past that and its share is closed, and the others, and a new
 * QEMU's messages, go on. */
static void test_unfinished_messages_share_a_budget(void) {
        Fake f[N + 1];
        size_t p;
        _cleanup_free_ char *msg = fake_unfinished_message(OBJECTS, &p);
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
        _cleanup_free_ char *msg = fake_unfinished_message(OBJECTS, &p);

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

int main(int argc, char **argv) {
        tap_init(argc, argv);
        log_set_max_level(getenv("BSD_UNIT_DEBUG") ? LOG_LEVEL_DEBUG : -1);

        TAP_RUN(test_unfinished_messages_share_a_budget);
        TAP_RUN(test_unfinished_messages_give_way_oldest_first);
        TAP_RUN(test_unfinished_budget_bounded);
        return tap_finish();
}
