/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* The guest-latency controller (throttle.c) against fake guests whose read p99 follows the
 * stream's limit, its /proc/pressure/io parser, and the guest device's statistics (qemu-stats.c):
 * parsers on a reply captured from a running guest (tests/unit/data/) and hostile variations,
 * percentiles from histogram deltas, and the typed calls against a scripted QEMU. */

#include <limits.h>

#include "fake-qemu.h"
#include "qemu-stats.h"
#include "throttle.h"
#include "util.h"
#include "tap.h"

#define SEC USEC_PER_SEC
#define MiB (UINT64_C(1) << 20)

/* A fake guest: its read p99 grows linearly with the stream's speed (full speed: `full` bytes/s),
 * plus deterministic noise of up to ±noise_pct %. */
typedef struct FakeGuest {
        uint64_t idle_p99_us;
        uint64_t us_per_mib; /* added p99 per MiB/s of stream */
        uint64_t full;       /* the stream's rate without a limit */
        unsigned noise_pct;
        uint64_t seed;
} FakeGuest;

static uint64_t fake_rand(FakeGuest *g) {
        g->seed = g->seed * 6364136223846793005ULL + 1442695040888963407ULL;
        return g->seed >> 33;
}

static ThrottleSample fake_window(FakeGuest *g, uint64_t limit) {
        uint64_t rate = limit == 0 ? g->full : MIN(limit, g->full);
        uint64_t p99 = g->idle_p99_us + g->us_per_mib * rate / MiB;

        if (g->noise_pct > 0) {
                uint64_t span = p99 * g->noise_pct / 100;
                p99 = p99 - span + fake_rand(g) % (2 * span + 1);
        }
        return (ThrottleSample){.guest_active = true, .has_p99 = true, .p99_us = p99, .stream_rate = rate};
}

static void test_init_validation(void) {
        Throttle t;

        ASSERT_ERRNO(throttle_init(&t, &(ThrottleConfig){.target_p99_us = 0}), -EINVAL);
        ASSERT_ERRNO(throttle_init(&t, &(ThrottleConfig){.target_p99_us = THROTTLE_TARGET_MAX_US + 1}), -EINVAL);
        ASSERT_ERRNO(throttle_init(&t, &(ThrottleConfig){.target_p99_us = 1000, .ceiling = (uint64_t) INT64_MAX + 1}),
                -EINVAL);
        ASSERT_ERRNO(throttle_init(&t, &(ThrottleConfig){.target_p99_us = 1000, .step = UINT64_MAX}), -EINVAL);
        ASSERT_ERRNO(throttle_init(&t, &(ThrottleConfig){.target_p99_us = 1000, .decrease_permille = 1000}), -EINVAL);
        ASSERT_ERRNO(throttle_init(&t, &(ThrottleConfig){.target_p99_us = 1000, .steady_permille = 1001}), -EINVAL);

        ASSERT_OK(throttle_init(&t, &(ThrottleConfig){.target_p99_us = 1000}));
        ASSERT_EQ_U64(t.limit, 0);
        ASSERT_EQ(t.reason, THROTTLE_IDLE);
        ASSERT_EQ_U64(t.config.min_speed, 1 * MiB);
        ASSERT_EQ_U64(t.config.step, 8 * MiB);
        ASSERT_EQ(t.config.decrease_permille, 500);
        ASSERT_OK(throttle_init(&t, &(ThrottleConfig){.target_p99_us = 1000, .ceiling = 5 * MiB}));
        ASSERT_EQ_U64(t.limit, 5 * MiB);

        ASSERT_STREQ(throttle_reason_to_string(THROTTLE_IDLE), "idle");
        ASSERT_STREQ(throttle_reason_to_string(THROTTLE_YIELDING), "yielding");
        ASSERT_STREQ(throttle_reason_to_string(THROTTLE_PROBING), "probing");
        ASSERT_STREQ(throttle_reason_to_string(THROTTLE_STEADY), "steady");
        ASSERT_STREQ(throttle_reason_to_string(THROTTLE_CEILING), "ceiling");
        ASSERT_STREQ(throttle_reason_to_string((ThrottleReason) 77), "unknown");
}

static void test_idle_runs_full_speed(void) {
        ThrottleSample idle = {.guest_active = false, .has_p99 = false};
        Throttle t;

        ASSERT_OK(throttle_init(&t, &(ThrottleConfig){.target_p99_us = 2000}));
        for (int i = 0; i < 10; i++) {
                ASSERT_EQ_U64(throttle_update(&t, &idle), 0);
                ASSERT_EQ(t.reason, THROTTLE_IDLE);
        }
        /* Host pressure does not matter with nobody to yield to. */
        idle.has_pressure = true;
        idle.pressure_permille = 1000;
        ASSERT_EQ_U64(throttle_update(&t, &idle), 0);
        ASSERT_EQ(t.reason, THROTTLE_IDLE);
}

/* A guest that gets p99 1500 µs at 100 MiB/s (500 µs idle, +10 µs per MiB/s) against a target
 * of 1500: the limit climbs, then settles in the band under the target and stays there. */
static void test_converges_under_target(void) {
        FakeGuest g = {.idle_p99_us = 500, .us_per_mib = 10, .full = 400 * MiB};
        uint64_t first_steady = 0, limit;
        Throttle t;

        ASSERT_OK(throttle_init(&t, &(ThrottleConfig){.target_p99_us = 1500}));
        limit = t.limit;
        for (unsigned w = 1; w <= 200; w++) {
                ThrottleSample s = fake_window(&g, limit);

                if (w > 40)
                        ASSERT_LE_U64(s.p99_us, 1500); /* converged: the guest stays under its target */
                limit = throttle_update(&t, &s);
                ASSERT_TRUE(limit > 0);
                if (t.reason == THROTTLE_STEADY && first_steady == 0)
                        first_steady = w;
        }
        ASSERT_TRUE(first_steady > 0 && first_steady <= 40);
        ASSERT_EQ(t.reason, THROTTLE_STEADY);
        /* Settled in the band: 85-100 % of the target, i.e. 77.5-100 MiB/s. */
        ASSERT_GE_U64(limit, 77 * MiB);
        ASSERT_LE_U64(limit, 100 * MiB);
}

/* Full speed is too much from the start: the first busy window yields from the measured rate. */
static void test_yields_from_measured_rate(void) {
        FakeGuest g = {.idle_p99_us = 500, .us_per_mib = 10, .full = 400 * MiB};
        ThrottleSample s;
        Throttle t;

        ASSERT_OK(throttle_init(&t, &(ThrottleConfig){.target_p99_us = 1500}));
        s = fake_window(&g, 0); /* 4500 µs at 400 MiB/s */
        ASSERT_EQ_U64(throttle_update(&t, &s), 200 * MiB);
        ASSERT_EQ(t.reason, THROTTLE_YIELDING);
        s = fake_window(&g, t.limit); /* 2500 µs: cut by 1500/2500 */
        ASSERT_EQ_U64(throttle_update(&t, &s), 120 * MiB);
        /* A p99 just over the target costs a gentle cut (90 %), not a halving. */
        s = (ThrottleSample){.guest_active = true, .has_p99 = true, .p99_us = 1510};
        ASSERT_EQ_U64(throttle_update(&t, &s), 108 * MiB);
}

/* The disk, not the limit, held the job at 100 MiB/s under a 300 MiB/s limit: a p99 twice the
 * target halves what the job did, not the limit that restrained nothing. */
static void test_yields_from_actual_rate(void) {
        ThrottleSample s = {.guest_active = true, .has_p99 = true, .p99_us = 3000, .stream_rate = 100 * MiB};
        Throttle t;

        ASSERT_OK(throttle_init(&t, &(ThrottleConfig){.target_p99_us = 1500}));
        t.limit = t.busy_limit = 300 * MiB;
        t.reason = THROTTLE_PROBING;
        ASSERT_EQ_U64(throttle_update(&t, &s), 50 * MiB);
        ASSERT_EQ(t.reason, THROTTLE_YIELDING);
        /* Under the target, the limit goes on from where it is (the job may speed up again). */
        s = (ThrottleSample){.guest_active = true, .has_p99 = true, .p99_us = 500, .stream_rate = 50 * MiB};
        ASSERT_EQ_U64(throttle_update(&t, &s), 58 * MiB);
}

/* over_windows 2: one window over the target holds the limit, the second in a row yields, and a
 * window under the target in between starts the count again. */
static void test_over_windows(void) {
        ThrottleSample over = {.guest_active = true, .has_p99 = true, .p99_us = 3000, .stream_rate = 100 * MiB};
        ThrottleSample under = {.guest_active = true, .has_p99 = true, .p99_us = 500, .stream_rate = 100 * MiB};
        Throttle t;

        ASSERT_OK(throttle_init(&t, &(ThrottleConfig){.target_p99_us = 1500, .over_windows = 2}));
        t.limit = t.busy_limit = 100 * MiB;
        t.reason = THROTTLE_PROBING;
        ASSERT_EQ_U64(throttle_update(&t, &over), 100 * MiB);
        ASSERT_EQ(t.reason, THROTTLE_STEADY);
        ASSERT_EQ_U64(throttle_update(&t, &under), 108 * MiB);
        ASSERT_EQ_U64(throttle_update(&t, &over), 108 * MiB);
        ASSERT_EQ_U64(throttle_update(&t, &over), 50 * MiB);
        ASSERT_EQ(t.reason, THROTTLE_YIELDING);
        ASSERT_EQ_U64(throttle_update(&t, &over), 25 * MiB); /* still over: yields on */
}

/* Noisy p99 (±30 %): the limit saws but stays bounded, the guest mostly under target and the
 * stream keeps a fair share. */
static void test_noisy_no_blowup(void) {
        FakeGuest g = {.idle_p99_us = 500, .us_per_mib = 10, .full = 400 * MiB, .noise_pct = 30, .seed = 42};
        uint64_t limit, sum = 0, lo = UINT64_MAX, hi = 0;
        unsigned over = 0, n = 0;
        Throttle t;

        ASSERT_OK(throttle_init(&t, &(ThrottleConfig){.target_p99_us = 1500}));
        limit = t.limit;
        for (unsigned w = 1; w <= 2000; w++) {
                ThrottleSample s = fake_window(&g, limit);

                limit = throttle_update(&t, &s);
                if (w <= 50)
                        continue;
                n++;
                over += s.p99_us > 1500;
                sum += limit / MiB;
                lo = MIN(lo, limit);
                hi = MAX(hi, limit);
        }
        ASSERT_GE_U64(lo, 1 * MiB);
        ASSERT_LE_U64(hi, 160 * MiB);         /* never far past the 100 MiB/s the guest tolerates */
        ASSERT_LE_U64(over * 100, n * 35ULL); /* ±30 % noise crosses the target often; 30 % of windows here */
        ASSERT_GE_U64(sum / n, 30);           /* the stream keeps going at a fair share of 100 MiB/s */
}

/* The guest goes idle: full speed at once; busy again: back to where it was content, not to
 * full speed and not to the start speed. */
static void test_recovers_when_idle(void) {
        FakeGuest g = {.idle_p99_us = 500, .us_per_mib = 10, .full = 400 * MiB};
        ThrottleSample idle = {.guest_active = false};
        uint64_t settled, limit;
        Throttle t;

        ASSERT_OK(throttle_init(&t, &(ThrottleConfig){.target_p99_us = 1500}));
        limit = t.limit;
        for (int w = 0; w < 60; w++) {
                ThrottleSample s = fake_window(&g, limit);
                limit = throttle_update(&t, &s);
        }
        settled = limit;
        ASSERT_EQ(t.reason, THROTTLE_STEADY);
        for (int w = 0; w < 5; w++) {
                ASSERT_EQ_U64(throttle_update(&t, &idle), 0);
                ASSERT_EQ(t.reason, THROTTLE_IDLE);
        }
        {
                ThrottleSample s = fake_window(&g, settled);
                ASSERT_EQ_U64(throttle_update(&t, &s), settled);
                ASSERT_EQ(t.reason, THROTTLE_STEADY);
        }
        /* A busy guest whose histogram saw no read in the window (writes only): no p99, so
         * probe upwards, never jump to full speed. */
        {
                ThrottleSample s = {.guest_active = true};
                ASSERT_EQ_U64(throttle_update(&t, &s), settled + 8 * MiB);
                ASSERT_EQ(t.reason, THROTTLE_PROBING);
        }
}

static void test_never_above_ceiling(void) {
        FakeGuest g = {.idle_p99_us = 500, .us_per_mib = 10, .full = 400 * MiB, .noise_pct = 10, .seed = 7};
        ThrottleSample idle = {.guest_active = false};
        uint64_t limit;
        Throttle t;

        /* The guest would take 100 MiB/s; the ceiling is 50. */
        ASSERT_OK(throttle_init(&t, &(ThrottleConfig){.target_p99_us = 1500, .ceiling = 50 * MiB}));
        limit = t.limit;
        ASSERT_EQ_U64(limit, 50 * MiB);
        for (int w = 0; w < 100; w++) {
                ThrottleSample s = fake_window(&g, limit);
                limit = throttle_update(&t, &s);
                ASSERT_TRUE(limit > 0);
                ASSERT_LE_U64(limit, 50 * MiB);
        }
        ASSERT_EQ(t.reason, THROTTLE_CEILING);
        ASSERT_EQ_U64(throttle_update(&t, &idle), 50 * MiB);
        ASSERT_EQ(t.reason, THROTTLE_IDLE);

        /* Lowered while running (SetBandwidth): at once, and it stays the ceiling. */
        ASSERT_OK(throttle_set_ceiling(&t, 20 * MiB));
        ASSERT_EQ_U64(t.limit, 20 * MiB);
        for (int w = 0; w < 20; w++) {
                ThrottleSample s = fake_window(&g, t.limit);
                ASSERT_LE_U64(throttle_update(&t, &s), 20 * MiB);
        }
        ASSERT_EQ(t.reason, THROTTLE_CEILING);
        /* A measured rate above the ceiling (it was raised by someone else) does not lift it. */
        {
                ThrottleSample s = {.guest_active = true, .has_p99 = true, .p99_us = 100, .stream_rate = UINT64_MAX};
                ASSERT_EQ_U64(throttle_update(&t, &idle), 20 * MiB);
                ASSERT_EQ_U64(throttle_update(&t, &s), 20 * MiB);
        }
        /* A ceiling below the minimum speed wins over it. */
        ASSERT_OK(throttle_set_ceiling(&t, 4096));
        for (int w = 0; w < 5; w++) {
                ThrottleSample s = {.guest_active = true, .has_p99 = true, .p99_us = 1000000};
                ASSERT_EQ_U64(throttle_update(&t, &s), 4096);
        }
        /* Removed: full speed when idle again. */
        ASSERT_OK(throttle_set_ceiling(&t, 0));
        ASSERT_EQ_U64(throttle_update(&t, &idle), 0);
        ASSERT_ERRNO(throttle_set_ceiling(&t, UINT64_MAX), -EINVAL);
}

static void test_min_speed_floor(void) {
        ThrottleSample bad = {.guest_active = true, .has_p99 = true, .p99_us = 1000000};
        Throttle t;

        ASSERT_OK(throttle_init(&t, &(ThrottleConfig){.target_p99_us = 1000, .min_speed = 2 * MiB}));
        for (int w = 0; w < 100; w++) {
                ASSERT_GE_U64(throttle_update(&t, &bad), 2 * MiB);
                ASSERT_EQ(t.reason, THROTTLE_YIELDING);
        }
        ASSERT_EQ_U64(t.limit, 2 * MiB);
}

static void test_pressure_yields(void) {
        ThrottleSample s = {.guest_active = true, .has_p99 = true, .p99_us = 100, .has_pressure = true};
        Throttle t;
        uint64_t before;

        ASSERT_OK(throttle_init(&t, &(ThrottleConfig){.target_p99_us = 1000}));
        s.pressure_permille = 100;
        ASSERT_EQ_U64(throttle_update(&t, &s), 16 * MiB + 8 * MiB); /* start speed + a step */
        ASSERT_EQ(t.reason, THROTTLE_PROBING);
        before = t.limit;
        s.pressure_permille = 900; /* the host stalls on I/O 90 % of the time */
        ASSERT_EQ_U64(throttle_update(&t, &s), before * 9 / 10);
        ASSERT_EQ(t.reason, THROTTLE_YIELDING);
        /* Pressure can be switched off. */
        ASSERT_OK(throttle_init(&t, &(ThrottleConfig){.target_p99_us = 1000, .pressure_permille = 1000}));
        ASSERT_EQ(throttle_update(&t, &s) > 16 * MiB, true);
        ASSERT_EQ(t.reason, THROTTLE_PROBING);
}

/* Samples from a hostile QEMU and extreme tuning: no overflow (UBSan in the sanitized build),
 * the limit stays within [min_speed, INT64_MAX]. */
static void test_hostile_samples(void) {
        ThrottleSample s;
        Throttle t;

        ASSERT_OK(throttle_init(&t, &(ThrottleConfig){.target_p99_us = THROTTLE_TARGET_MAX_US,
                                            .step = THROTTLE_SPEED_MAX,
                                            .start_speed = THROTTLE_SPEED_MAX,
                                            .min_speed = THROTTLE_SPEED_MAX}));
        s = (ThrottleSample){.guest_active = true, .has_p99 = true, .p99_us = 0, .stream_rate = UINT64_MAX};
        for (int w = 0; w < 10; w++) {
                ASSERT_EQ_U64(throttle_update(&t, &s), THROTTLE_SPEED_MAX);
        }
        s.p99_us = UINT64_MAX;
        s.has_pressure = true;
        s.pressure_permille = UINT_MAX;
        ASSERT_EQ_U64(throttle_update(&t, &s), THROTTLE_SPEED_MAX); /* floor = min_speed */

        ASSERT_OK(throttle_init(
                &t, &(ThrottleConfig){.target_p99_us = THROTTLE_TARGET_MIN_US, .decrease_permille = 999}));
        s = (ThrottleSample){.guest_active = true, .has_p99 = true, .p99_us = UINT64_MAX, .stream_rate = UINT64_MAX};
        ASSERT_EQ_U64(throttle_update(&t, &s), (uint64_t) ((unsigned __int128) THROTTLE_SPEED_MAX * 999 / 1000));
        for (int w = 0; w < 100000; w++)
                throttle_update(&t, &s);
        ASSERT_EQ_U64(t.limit, 1 * MiB);
        ASSERT_EQ(t.n_windows > 0, true);

        /* Fast increase to the top: saturates, no wrap to a small (or zero: unlimited) value. */
        ASSERT_OK(throttle_init(&t, &(ThrottleConfig){.target_p99_us = 1000, .step = THROTTLE_SPEED_MAX / 3}));
        s = (ThrottleSample){.guest_active = true, .has_p99 = true, .p99_us = 1};
        for (int w = 0; w < 10; w++) {
                uint64_t before = t.limit, l = throttle_update(&t, &s);
                ASSERT_TRUE(l >= before);
                ASSERT_LE_U64(l, THROTTLE_SPEED_MAX);
        }
        ASSERT_EQ_U64(t.limit, THROTTLE_SPEED_MAX);
}

/* The sampler: readings in, samples out. */

static QemuBlockStats reading(uint64_t rd, uint64_t wr, uint64_t fast, uint64_t slow) {
        QemuBlockStats st = {.rd_operations = rd, .wr_operations = wr};

        st.rd_histogram.n_bins = 3;
        st.rd_histogram.boundaries[0] = 1000000;  /* 1 ms */
        st.rd_histogram.boundaries[1] = 10000000; /* 10 ms */
        st.rd_histogram.bins[0] = fast;
        st.rd_histogram.bins[1] = slow;
        return st;
}

static void test_sampler(void) {
        ThrottleSampler sm = {};
        ThrottleSample out;
        QemuBlockStats st;
        Psi psi = {}, psi2;

        st = reading(10, 0, 10, 0);
        ASSERT_ERRNO(throttle_sampler_feed(&sm, &st, &psi, 0, 1000000, &out), -EAGAIN);

        /* 100 reads, 2 of them slow: p99 in the slow bin; 1 s, 64 MiB copied, 25 % stalled. */
        st = reading(110, 0, 108, 2);
        psi2 = psi;
        psi2.some.total_us = 250000;
        ASSERT_OK(throttle_sampler_feed(&sm, &st, &psi2, 64 * MiB, 2000000, &out));
        ASSERT_TRUE(out.guest_active);
        ASSERT_TRUE(out.has_p99);
        ASSERT_EQ_U64(out.p99_us, 1000 + 9000 * 1 / 2);
        ASSERT_TRUE(out.has_pressure);
        ASSERT_EQ(out.pressure_permille, 250);
        ASSERT_EQ_U64(out.stream_rate, 64 * MiB);

        /* Nothing happened: idle, no p99; the job's offset unknown: no rate. */
        ASSERT_OK(throttle_sampler_feed(&sm, &st, &psi2, UINT64_MAX, 2500000, &out));
        ASSERT_FALSE(out.guest_active);
        ASSERT_FALSE(out.has_p99);
        ASSERT_EQ_U64(out.stream_rate, 0);
        ASSERT_EQ(out.pressure_permille, 0);

        /* Writes only: active, but no read latency to judge by. */
        st.wr_operations += 5;
        ASSERT_OK(throttle_sampler_feed(&sm, &st, NULL, 0, 3000000, &out));
        ASSERT_TRUE(out.guest_active);
        ASSERT_FALSE(out.has_p99);
        ASSERT_FALSE(out.has_pressure);

        /* The clock did not advance: nothing kept. */
        ASSERT_ERRNO(throttle_sampler_feed(&sm, &st, NULL, 0, 3000000, &out), -EINVAL);

        /* QEMU restarted: counters back to small values; re-primed, then samples again. */
        st = reading(3, 0, 3, 0);
        ASSERT_ERRNO(throttle_sampler_feed(&sm, &st, NULL, 0, 4000000, &out), -ESTALE);
        st = reading(4, 0, 4, 0);
        ASSERT_OK(throttle_sampler_feed(&sm, &st, NULL, 0, 5000000, &out));
        ASSERT_TRUE(out.has_p99);
        ASSERT_EQ_U64(out.p99_us, 1000);

        /* The histogram set anew (other boundaries) while the counters go on. */
        st.rd_operations++;
        st.rd_histogram.boundaries[1] = 20000000;
        ASSERT_ERRNO(throttle_sampler_feed(&sm, &st, NULL, 0, 6000000, &out), -ESTALE);
        /* Switched off: active, no p99. */
        st.rd_operations++;
        st.rd_histogram.n_bins = 0;
        ASSERT_OK(throttle_sampler_feed(&sm, &st, NULL, 0, 7000000, &out));
        ASSERT_TRUE(out.guest_active);
        ASSERT_FALSE(out.has_p99);

        /* Hostile: counters near the top, a job offset leaping, a 1 µs window: saturated. */
        sm = (ThrottleSampler){};
        st = reading(0, 0, 0, 0);
        ASSERT_ERRNO(throttle_sampler_feed(&sm, &st, NULL, 0, 1, &out), -EAGAIN);
        st = reading(UINT64_MAX - 1, UINT64_MAX - 1, UINT64_MAX - 1, UINT64_MAX - 1);
        ASSERT_OK(throttle_sampler_feed(&sm, &st, NULL, UINT64_MAX - 1, 2, &out));
        ASSERT_EQ_U64(out.stream_rate, THROTTLE_SPEED_MAX);
        ASSERT_TRUE(out.has_p99);
        ASSERT_LE_U64(out.p99_us, 10000);
        /* An offset that went back (a new job): no rate. */
        ASSERT_OK(throttle_sampler_feed(&sm, &st, NULL, 5, 3, &out));
        ASSERT_EQ_U64(out.stream_rate, 0);
}

/* /proc/pressure/io */

static void test_psi_parse(void) {
        static const char real[] = "some avg10=1.52 avg60=0.87 avg300=0.25 total=123456789\n"
                                   "full avg10=0.00 avg60=100.00 avg300=0.03 total=42\n";
        Psi p, q;
        unsigned pm;

        ASSERT_OK(psi_parse(real, strlen(real), &p));
        ASSERT_EQ(p.some.avg10, 152);
        ASSERT_EQ(p.some.avg60, 87);
        ASSERT_EQ(p.some.avg300, 25);
        ASSERT_EQ_U64(p.some.total_us, 123456789);
        ASSERT_TRUE(p.has_full);
        ASSERT_EQ(p.full.avg60, 10000);
        ASSERT_EQ_U64(p.full.total_us, 42);
        /* Older kernels: no "full" line; no trailing newline. */
        ASSERT_OK(psi_parse("some avg10=0.00 avg60=0.00 avg300=0.00 total=0", 46, &q));
        ASSERT_FALSE(q.has_full);

        static const char *const bad[] = {
                "",
                "\n",
                "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
                "some avg10=100.01 avg60=0.00 avg300=0.00 total=0\n",
                "some avg10=101.00 avg60=0.00 avg300=0.00 total=0\n",
                "some avg10=0.0 avg60=0.00 avg300=0.00 total=0\n",
                "some avg10=.00 avg60=0.00 avg300=0.00 total=0\n",
                "some avg10=-1.00 avg60=0.00 avg300=0.00 total=0\n",
                "some avg10=0.00 avg60=0.00 total=0\n",
                "some avg10=0.00 avg60=0.00 avg300=0.00 total=18446744073709551616\n",
                "some avg10=0.00 avg60=0.00 avg300=0.00 total=000000000000000000000001\n",
                "some avg10=0.00 avg60=0.00 avg300=0.00 total=\n",
                "some avg10=0.00 avg60=0.00 avg300=0.00 total=1x\n",
                "some avg10=0.00 avg60=0.00 avg300=0.00 total=1\nfull\n",
                "some avg10=0.00 avg60=0.00 avg300=0.00 total=1\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=1\nx",
                "some avg10=99999999999999999999999.00 avg60=0.00 avg300=0.00 total=0\n",
        };
        for (size_t i = 0; i < ELEMENTSOF(bad); i++)
                if (psi_parse(bad[i], strlen(bad[i]), &q) != -EBADMSG)
                        TAP_FAIL("accepted: %s", bad[i]);
        /* Length-bounded: a NUL inside, or text past len, is not read as more input. */
        ASSERT_ERRNO(psi_parse("some avg10=0.00 avg60=0.00 avg300=0.00 total=1\0garbage", 55, &q), -EBADMSG);
        ASSERT_OK(psi_parse("some avg10=0.00 avg60=0.00 avg300=0.00 total=1\ngarbage", 47, &q));
        ASSERT_ERRNO(psi_parse(NULL, 0, &q), -EBADMSG);
        {
                char big[5000];
                memset(big, ' ', sizeof(big));
                ASSERT_ERRNO(psi_parse(big, sizeof(big), &q), -EBADMSG);
        }

        /* This machine's own, where the kernel has PSI. */
        {
                _cleanup_fclose_ FILE *f = fopen("/proc/pressure/io", "re");
                char text[4096];
                size_t n;

                if (f) {
                        n = fread(text, 1, sizeof(text), f);
                        ASSERT_OK(psi_parse(text, n, &q));
                }
        }

        /* The stall share of a window. */
        q = p;
        q.some.total_us += 250000;
        ASSERT_OK(psi_some_permille(&p, &q, 1000000, &pm));
        ASSERT_EQ(pm, 250);
        q.some.total_us = UINT64_MAX;
        ASSERT_OK(psi_some_permille(&p, &q, 1, &pm));
        ASSERT_EQ(pm, 1000);
        ASSERT_ERRNO(psi_some_permille(&q, &p, 1000000, &pm), -ESTALE);
        ASSERT_ERRNO(psi_some_permille(&p, &q, 0, &pm), -EINVAL);
}

/* query-blockstats and histograms */

static json_object *load(const char *name) {
        json_object *o = fake_load_json(name);
        if (!o)
                TAP_FAIL("cannot load fixture %s", name);
        return o;
}

static json_object *parse(const char *text) {
        json_object *o = json_tokener_parse(text);
        if (!o)
                TAP_FAIL("does not parse: %s", text);
        return o;
}

static void test_blockstats_fixture(void) {
        _cleanup_(json_object_putp) json_object *reply = load("query-blockstats-histogram.json");
        QemuBlockStats s;
        uint64_t ns;

        if (!reply)
                return;
        ASSERT_OK(qemu_parse_blockstats(reply, "vda", &s));
        ASSERT_STREQ(s.qdev, "/machine/peripheral/vda/virtio-backend");
        ASSERT_EQ_U64(s.rd_operations, 204);
        ASSERT_EQ_U64(s.rd_bytes, 832000);
        ASSERT_EQ_U64(s.wr_operations, 0);
        ASSERT_EQ(s.rd_histogram.n_bins, 10);
        ASSERT_EQ_U64(s.rd_histogram.boundaries[0], 100000);
        ASSERT_EQ_U64(s.rd_histogram.boundaries[8], 50000000);
        ASSERT_EQ_U64(s.rd_histogram.bins[0], 141);
        ASSERT_EQ_U64(qemu_latency_histogram_count(&s.rd_histogram), 204);
        /* 141 under 100 µs, 48 in [100, 200), 7 in [200, 500), 5 in [500 µs, 1 ms), then
         * one each in [2, 5), [5, 10), [10, 20) ms: the 202nd of 204 (p99) is the one in [2, 5) ms,
         * at the top of its bin. */
        ASSERT_OK(qemu_latency_histogram_percentile(&s.rd_histogram, 990, &ns));
        ASSERT_EQ_U64(ns, 5000000);
        ASSERT_OK(qemu_latency_histogram_percentile(&s.rd_histogram, 500, &ns));
        ASSERT_EQ_U64(ns, 100000 * 102 / 141);

        ASSERT_ERRNO(qemu_parse_blockstats(reply, "vdb", &s), -ENOENT);
        ASSERT_ERRNO(qemu_parse_blockstats(reply, "vd", &s), -ENOENT);
        ASSERT_ERRNO(qemu_parse_blockstats(reply, "vda/virtio-backend", &s), -EINVAL);
        ASSERT_ERRNO(qemu_parse_blockstats(reply, "", &s), -EINVAL);
}

#define STATS_OK \
        "\"rd_operations\": 3, \"wr_operations\": 1, \"flush_operations\": 0, \"rd_bytes\": 12288, \"wr_bytes\": 4096"
#define QDEV "\"qdev\": \"/machine/peripheral/vda/virtio-backend\""

static void test_blockstats_hostile(void) {
        static const char *const bad[] = {
                "{}",
                "[1]",
                "[{" QDEV ", \"stats\": 5}]",
                "[{" QDEV "}]",
                "[{\"qdev\": 7, \"stats\": {" STATS_OK "}}]",
                "[{" QDEV ", \"device\": [], \"stats\": {" STATS_OK "}}]",
                "[{" QDEV ", \"stats\": {\"rd_operations\": -1, \"wr_operations\": 1, \"flush_operations\": 0, "
                "\"rd_bytes\": 1, \"wr_bytes\": 1}}]",
                "[{" QDEV ", \"stats\": {\"rd_operations\": \"3\", \"wr_operations\": 1, \"flush_operations\": 0, "
                "\"rd_bytes\": 1, \"wr_bytes\": 1}}]",
                "[{" QDEV
                ", \"stats\": {\"wr_operations\": 1, \"flush_operations\": 0, \"rd_bytes\": 1, \"wr_bytes\": 1}}]",
                "[{" QDEV ", \"stats\": {\"rd_operations\": 18446744073709551615, \"wr_operations\": 1, "
                "\"flush_operations\": 0, \"rd_bytes\": 1, \"wr_bytes\": 1}}]",
                /* two devices claim vda */
                "[{" QDEV ", \"stats\": {" STATS_OK "}}, {\"qdev\": \"/machine/peripheral/vda\", \"stats\": {" STATS_OK
                "}}]",
                /* a path we would hand back to QEMU */
                "[{\"qdev\": \"/machine/peripheral/vda/../../unattached\", \"stats\": {" STATS_OK "}}]",
                "[{\"qdev\": \"/machine/peripheral/vda/x y\", \"stats\": {" STATS_OK "}}]",
                "[{\"qdev\": \"/machine/peripheral/vda//x\", \"stats\": {" STATS_OK "}}]",
                /* histograms */
                "[{" QDEV ", \"stats\": {" STATS_OK ", \"rd_latency_histogram\": []}}]",
                "[{" QDEV ", \"stats\": {" STATS_OK ", \"rd_latency_histogram\": {\"bins\": [1, 2]}}}]",
                "[{" QDEV ", \"stats\": {" STATS_OK
                ", \"rd_latency_histogram\": {\"boundaries\": [10], \"bins\": [1]}}}]",
                "[{" QDEV ", \"stats\": {" STATS_OK
                ", \"rd_latency_histogram\": {\"boundaries\": [10], \"bins\": [1, 2, 3]}}}]",
                "[{" QDEV ", \"stats\": {" STATS_OK
                ", \"rd_latency_histogram\": {\"boundaries\": [], \"bins\": [1]}}}]",
                "[{" QDEV ", \"stats\": {" STATS_OK
                ", \"rd_latency_histogram\": {\"boundaries\": [10, 10], \"bins\": [1, 2, 3]}}}]",
                "[{" QDEV ", \"stats\": {" STATS_OK
                ", \"rd_latency_histogram\": {\"boundaries\": [20, 10], \"bins\": [1, 2, 3]}}}]",
                "[{" QDEV ", \"stats\": {" STATS_OK
                ", \"rd_latency_histogram\": {\"boundaries\": [0], \"bins\": [1, 2]}}}]",
                "[{" QDEV ", \"stats\": {" STATS_OK
                ", \"rd_latency_histogram\": {\"boundaries\": [10], \"bins\": [1, -2]}}}]",
                "[{" QDEV ", \"stats\": {" STATS_OK
                ", \"rd_latency_histogram\": {\"boundaries\": [10], \"bins\": [1, 2.5]}}}]",
                "[{" QDEV ", \"stats\": {" STATS_OK
                ", \"rd_latency_histogram\": {\"boundaries\": [\"10\"], \"bins\": [1, 2]}}}]",
                "[{" QDEV ", \"stats\": {" STATS_OK
                ", \"rd_latency_histogram\": {\"boundaries\": [10], \"bins\": [1, 99999999999999999999999]}}}]",
        };
        QemuBlockStats s;

        for (size_t i = 0; i < ELEMENTSOF(bad); i++) {
                _cleanup_(json_object_putp) json_object *o = parse(bad[i]);
                int r = qemu_parse_blockstats(o, "vda", &s);
                if (r != -EBADMSG)
                        TAP_FAIL("case %zu: got %d, expected -EBADMSG: %s", i, r, bad[i]);
        }

        /* Too many bins (64 boundaries: 65 bins) and too many devices. */
        {
                _cleanup_free_ char *text = NULL;
                char *p;
                size_t size = 4096;

                text = p = malloc(size);
                ASSERT_NOT_NULL(text);
                if (!text)
                        return;
                p += sprintf(p, "[{" QDEV ", \"stats\": {" STATS_OK ", \"rd_latency_histogram\": {\"boundaries\": [");
                for (int i = 1; i <= QEMU_HISTOGRAM_BINS_MAX; i++)
                        p += sprintf(p, "%s%d", i > 1 ? ", " : "", i * 10);
                p += sprintf(p, "], \"bins\": [");
                for (int i = 0; i <= QEMU_HISTOGRAM_BINS_MAX; i++)
                        p += sprintf(p, "%s1", i > 0 ? ", " : "");
                sprintf(p, "]}}}]");
                _cleanup_(json_object_putp) json_object *o = parse(text);
                ASSERT_ERRNO(qemu_parse_blockstats(o, "vda", &s), -EBADMSG);
        }
        {
                _cleanup_(json_object_putp) json_object *a = json_object_new_array();
                for (int i = 0; i <= QEMU_DISKS_MAX; i++)
                        json_object_array_add(a, json_object_new_object());
                ASSERT_ERRNO(qemu_parse_blockstats(a, "vda", &s), -EBADMSG);
        }

        /* What is fine: another device beside it, a device without histogram, the maximum of bins. */
        {
                _cleanup_(json_object_putp) json_object *o =
                        parse("[{\"qdev\": \"/machine/peripheral/vdab/virtio-backend\", \"stats\": {}}, "
                              "{\"device\": \"\", \"stats\": {}}, {" QDEV ", \"stats\": {" STATS_OK "}}]");
                ASSERT_OK(qemu_parse_blockstats(o, "vda", &s));
                ASSERT_EQ_U64(s.rd_operations, 3);
                ASSERT_EQ(s.rd_histogram.n_bins, 0);
        }
}

static QemuLatencyHistogram histogram(const uint64_t *boundaries, const uint64_t *bins, size_t n_bins) {
        QemuLatencyHistogram h = {.n_bins = n_bins};

        memcpy(h.boundaries, boundaries, (n_bins - 1) * sizeof(uint64_t));
        memcpy(h.bins, bins, n_bins * sizeof(uint64_t));
        return h;
}

static void test_histogram_delta_and_percentile(void) {
        static const uint64_t b[] = {100000, 1000000, 10000000};
        QemuLatencyHistogram prev, cur, d, other;
        uint64_t ns;

        prev = histogram(b, (const uint64_t[]){10, 5, 1, 0}, 4);
        cur = histogram(b, (const uint64_t[]){110, 5, 1, 0}, 4);
        ASSERT_OK(qemu_latency_histogram_delta(&prev, &cur, &d));
        ASSERT_EQ_U64(qemu_latency_histogram_count(&d), 100);
        /* 100 samples spread over [0, 100 µs): p50 at 50 µs, p99 at 99 µs. */
        ASSERT_OK(qemu_latency_histogram_percentile(&d, 500, &ns));
        ASSERT_EQ_U64(ns, 50000);
        ASSERT_OK(qemu_latency_histogram_percentile(&d, 990, &ns));
        ASSERT_EQ_U64(ns, 99000);
        ASSERT_OK(qemu_latency_histogram_percentile(&d, 1000, &ns));
        ASSERT_EQ_U64(ns, 100000);

        /* The slow tail in the open bin: "at least" its lower boundary. */
        cur = histogram(b, (const uint64_t[]){10, 5, 1, 100}, 4);
        ASSERT_OK(qemu_latency_histogram_percentile(&cur, 990, &ns));
        ASSERT_EQ_U64(ns, 10000000);
        /* p99 in the middle bin: 10 fast, 90 in [100 µs, 1 ms) → the 99th is the 89th of 90. */
        cur = histogram(b, (const uint64_t[]){10, 90, 0, 0}, 4);
        ASSERT_OK(qemu_latency_histogram_percentile(&cur, 990, &ns));
        ASSERT_EQ_U64(ns, 100000 + 900000 * 89 / 90);

        /* Nothing happened: no data. */
        ASSERT_OK(qemu_latency_histogram_delta(&prev, &prev, &d));
        ASSERT_ERRNO(qemu_latency_histogram_percentile(&d, 990, &ns), -ENODATA);
        ASSERT_ERRNO(qemu_latency_histogram_percentile(&prev, 0, &ns), -EINVAL);
        ASSERT_ERRNO(qemu_latency_histogram_percentile(&prev, 1001, &ns), -EINVAL);

        /* Not comparable: counters went back (reset), other boundaries, no histogram. */
        cur = histogram(b, (const uint64_t[]){9, 5, 1, 0}, 4);
        ASSERT_ERRNO(qemu_latency_histogram_delta(&prev, &cur, &d), -ESTALE);
        other = histogram((const uint64_t[]){100000, 2000000, 10000000}, (const uint64_t[]){10, 5, 1, 0}, 4);
        ASSERT_ERRNO(qemu_latency_histogram_delta(&prev, &other, &d), -ESTALE);
        other = histogram(b, (const uint64_t[]){10, 5, 1}, 3);
        ASSERT_ERRNO(qemu_latency_histogram_delta(&prev, &other, &d), -ESTALE);
        other.n_bins = 0;
        ASSERT_ERRNO(qemu_latency_histogram_delta(&prev, &other, &d), -ENODATA);

        /* Hostile counts: sums beyond 64 bits, huge boundaries; no overflow (UBSan), sane answers. */
        {
                static const uint64_t hb[] = {1, UINT64_MAX - 1};
                QemuLatencyHistogram h =
                        histogram(hb, (const uint64_t[]){UINT64_MAX - 1, UINT64_MAX - 1, UINT64_MAX - 1}, 3);

                ASSERT_EQ_U64(qemu_latency_histogram_count(&h), UINT64_MAX);
                ASSERT_OK(qemu_latency_histogram_percentile(&h, 990, &ns));
                ASSERT_LE_U64(ns, UINT64_MAX - 1);
                ASSERT_OK(qemu_latency_histogram_percentile(&h, 1, &ns));
                ASSERT_LE_U64(ns, 1);
                h.n_bins = 1000; /* corrupted struct: bounded all the same */
                ASSERT_EQ_U64(qemu_latency_histogram_count(&h) > 0, 1);
        }
}

static void test_histogram_set_args(void) {
        _cleanup_(json_object_putp) json_object *o = NULL;
        static const uint64_t b[] = {100000, 1000000};

        ASSERT_OK(qemu_latency_histogram_set_args("/machine/peripheral/vda/virtio-backend", b, 2, &o));
        ASSERT_STREQ(json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE),
                "{\"id\":\"/machine/peripheral/vda/virtio-backend\",\"boundaries-read\":[100000,1000000]}");

        ASSERT_ERRNO(qemu_latency_histogram_set_args("vda", b, 2, &o), -EINVAL);
        ASSERT_ERRNO(qemu_latency_histogram_set_args("/machine/peripheral/", b, 2, &o), -EINVAL);
        ASSERT_ERRNO(qemu_latency_histogram_set_args("/machine/peripheral/vda/../x", b, 2, &o), -EINVAL);
        ASSERT_ERRNO(qemu_latency_histogram_set_args("/machine/peripheral/vda\"", b, 2, &o), -EINVAL);
        ASSERT_ERRNO(qemu_latency_histogram_set_args("/machine/peripheral/vda", b, 0, &o), -EINVAL);
        ASSERT_ERRNO(
                qemu_latency_histogram_set_args("/machine/peripheral/vda", (const uint64_t[]){5, 5}, 2, &o), -EINVAL);
        ASSERT_ERRNO(qemu_latency_histogram_set_args("/machine/peripheral/vda", (const uint64_t[]){0}, 1, &o), -EINVAL);
        ASSERT_ERRNO(qemu_latency_histogram_set_args("/machine/peripheral/vda", (const uint64_t[]){UINT64_MAX}, 1, &o),
                -EINVAL);
        ASSERT_ERRNO(qemu_latency_histogram_set_args(
                             "/machine/peripheral/vda", qemu_latency_boundaries_default, QEMU_HISTOGRAM_BINS_MAX, &o),
                -EINVAL);
        /* The default boundaries are valid and fit. */
        {
                _cleanup_(json_object_putp) json_object *d = NULL;
                ASSERT_OK(qemu_latency_histogram_set_args("/machine/peripheral/vda", qemu_latency_boundaries_default,
                        qemu_latency_boundaries_default_n, &d));
        }
}

/* The typed calls against a scripted QEMU. */

typedef struct Got {
        unsigned n_handler, n_destroy;
        int error;
        uint64_t rd_operations;
        char qdev[QEMU_QDEV_PATH_MAX];
} Got;

static void on_stats(Qmp *q, int error, const char *desc, const QemuBlockStats *s, void *userdata) {
        Got *g = userdata;

        g->n_handler++;
        g->error = error;
        if (s) {
                g->rd_operations = s->rd_operations;
                snprintf(g->qdev, sizeof(g->qdev), "%s", s->qdev);
        } else if (error == 0)
                TAP_FAIL("success without stats");
}

static void on_result(Qmp *q, int error, const char *desc, void *userdata) {
        Got *g = userdata;

        g->n_handler++;
        g->error = error;
}

static void on_destroy(void *userdata) {
        ((Got *) userdata)->n_destroy++;
}

static bool cond_got(Fake *f, void *arg) {
        return ((Got *) arg)->n_destroy > 0;
}

static void test_calls(void) {
        _cleanup_free_ char *fixture = fake_load_text("query-blockstats-histogram.json");
        json_object *cmd, *args;
        Got g = {};
        Fake f;

        if (!fixture)
                return;
        if (fake_new(&f) < 0 || fake_handshake(&f) < 0) {
                TAP_FAIL("fake QEMU setup failed");
                return;
        }
        ASSERT_OK(qemu_query_blockstats(f.q, "vda", on_stats, &g, on_destroy));
        cmd = fake_next_command(&f, 3 * SEC);
        ASSERT_STREQ(fake_command_name(cmd), "query-blockstats");
        ASSERT_OK(fake_reply(&f, cmd, fixture));
        json_object_put(cmd);
        fake_run_until(&f, cond_got, &g, 3 * SEC);
        ASSERT_EQ(g.n_handler, 1);
        ASSERT_EQ(g.n_destroy, 1);
        ASSERT_EQ(g.error, 0);
        ASSERT_EQ_U64(g.rd_operations, 204);
        ASSERT_STREQ(g.qdev, "/machine/peripheral/vda/virtio-backend");

        /* A malformed reply: an error, the connection stays. */
        g = (Got){};
        ASSERT_OK(qemu_query_blockstats(f.q, "vda", on_stats, &g, on_destroy));
        cmd = fake_next_command(&f, 3 * SEC);
        ASSERT_OK(fake_reply(&f, cmd, "[{\"qdev\": \"/machine/peripheral/vda\", \"stats\": {\"rd_operations\": {}}}]"));
        json_object_put(cmd);
        fake_run_until(&f, cond_got, &g, 3 * SEC);
        ASSERT_EQ(g.n_handler, 1);
        ASSERT_ERRNO(g.error, -EBADMSG);
        ASSERT_EQ(f.n_failed, 0);
        ASSERT_ERRNO(qemu_query_blockstats(f.q, "a/b", on_stats, &g, on_destroy), -EINVAL);

        g = (Got){};
        ASSERT_OK(qemu_block_latency_histogram_set(f.q, "/machine/peripheral/vda/virtio-backend",
                qemu_latency_boundaries_default, qemu_latency_boundaries_default_n, on_result, &g, on_destroy));
        cmd = fake_next_command(&f, 3 * SEC);
        ASSERT_STREQ(fake_command_name(cmd), "block-latency-histogram-set");
        ASSERT_TRUE(json_object_object_get_ex(cmd, "arguments", &args));
        ASSERT_EQ(json_object_array_length(json_object_object_get(args, "boundaries-read")),
                qemu_latency_boundaries_default_n);
        ASSERT_OK(fake_reply(&f, cmd, "{}"));
        json_object_put(cmd);
        fake_run_until(&f, cond_got, &g, 3 * SEC);
        ASSERT_EQ(g.n_handler, 1);
        ASSERT_EQ(g.error, 0);
        ASSERT_EQ(g.n_destroy, 1);
        /* Refused before anything is sent: the caller keeps its userdata. */
        g = (Got){};
        ASSERT_ERRNO(qemu_block_latency_histogram_set(f.q, "vda", qemu_latency_boundaries_default,
                             qemu_latency_boundaries_default_n, on_result, &g, on_destroy),
                -EINVAL);
        ASSERT_EQ(g.n_destroy, 0);
        fake_free(&f);
}

int main(int argc, char **argv) {
        tap_init(argc, argv);
        log_set_max_level(getenv("BSD_UNIT_DEBUG") ? LOG_LEVEL_DEBUG : -1);

        TAP_RUN(test_init_validation);
        TAP_RUN(test_idle_runs_full_speed);
        TAP_RUN(test_converges_under_target);
        TAP_RUN(test_yields_from_measured_rate);
        TAP_RUN(test_yields_from_actual_rate);
        TAP_RUN(test_over_windows);
        TAP_RUN(test_noisy_no_blowup);
        TAP_RUN(test_recovers_when_idle);
        TAP_RUN(test_never_above_ceiling);
        TAP_RUN(test_min_speed_floor);
        TAP_RUN(test_pressure_yields);
        TAP_RUN(test_hostile_samples);
        TAP_RUN(test_sampler);
        TAP_RUN(test_psi_parse);
        TAP_RUN(test_blockstats_fixture);
        TAP_RUN(test_blockstats_hostile);
        TAP_RUN(test_histogram_delta_and_percentile);
        TAP_RUN(test_histogram_set_args);
        TAP_RUN(test_calls);
        return tap_finish();
}
