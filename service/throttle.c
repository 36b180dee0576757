/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <errno.h>
#include <limits.h>
#include <string.h>

#include "throttle.h"
#include "util.h"

#define MiB (UINT64_C(1) << 20)

#define DEFAULT_MIN_SPEED (1 * MiB)
#define DEFAULT_START_SPEED (16 * MiB)
#define DEFAULT_STEP (8 * MiB)
#define DEFAULT_DECREASE_PERMILLE 500u
#define DEFAULT_PRESSURE_PERMILLE 600u
#define DEFAULT_STEADY_PERMILLE 850u
/* A p99 just over the target costs a gentle cut, one far over it the full decrease: the cut is
 * target/p99, bounded by decrease_permille below and this above. */
#define GENTLEST_DECREASE_PERMILLE 900u

static const char *const reason_table[_THROTTLE_REASON_MAX] = {
        [THROTTLE_IDLE] = "idle",
        [THROTTLE_YIELDING] = "yielding",
        [THROTTLE_PROBING] = "probing",
        [THROTTLE_STEADY] = "steady",
        [THROTTLE_CEILING] = "ceiling",
};

const char *throttle_reason_to_string(ThrottleReason r) {
        if ((unsigned) r >= _THROTTLE_REASON_MAX)
                return "unknown";
        return reason_table[r];
}

static uint64_t sat_add(uint64_t a, uint64_t b) {
        return a > THROTTLE_SPEED_MAX - MIN(b, THROTTLE_SPEED_MAX) ? THROTTLE_SPEED_MAX : a + b;
}

static uint64_t scale_permille(uint64_t v, unsigned permille) {
        unsigned __int128 x = (unsigned __int128) v * permille / 1000;

        return x > THROTTLE_SPEED_MAX ? THROTTLE_SPEED_MAX : (uint64_t) x;
}

int throttle_init(Throttle *t, const ThrottleConfig *config) {
        ThrottleConfig c = *config;

        if (c.target_p99_us < THROTTLE_TARGET_MIN_US || c.target_p99_us > THROTTLE_TARGET_MAX_US)
                return -EINVAL;
        if (c.ceiling > THROTTLE_SPEED_MAX || c.min_speed > THROTTLE_SPEED_MAX || c.start_speed > THROTTLE_SPEED_MAX ||
                c.step > THROTTLE_SPEED_MAX)
                return -EINVAL;
        if (c.decrease_permille >= 1000 || c.steady_permille > 1000)
                return -EINVAL;
        if (c.min_speed == 0)
                c.min_speed = DEFAULT_MIN_SPEED;
        if (c.start_speed == 0)
                c.start_speed = DEFAULT_START_SPEED;
        if (c.step == 0)
                c.step = DEFAULT_STEP;
        if (c.decrease_permille == 0)
                c.decrease_permille = DEFAULT_DECREASE_PERMILLE;
        if (c.pressure_permille == 0)
                c.pressure_permille = DEFAULT_PRESSURE_PERMILLE;
        if (c.steady_permille == 0)
                c.steady_permille = DEFAULT_STEADY_PERMILLE;
        if (c.over_windows == 0)
                c.over_windows = 1;

        *t = (Throttle){
                .config = c,
                .limit = c.ceiling,
                .reason = THROTTLE_IDLE,
        };
        return 0;
}

int throttle_set_ceiling(Throttle *t, uint64_t ceiling) {
        if (ceiling > THROTTLE_SPEED_MAX)
                return -EINVAL;
        t->config.ceiling = ceiling;
        if (ceiling > 0 && (t->limit == 0 || t->limit > ceiling)) {
                t->limit = ceiling;
                if (t->reason != THROTTLE_IDLE)
                        t->reason = THROTTLE_CEILING;
        } else if (ceiling == 0 && t->reason == THROTTLE_IDLE)
                t->limit = 0;
        if (t->busy_limit > 0 && ceiling > 0)
                t->busy_limit = MIN(t->busy_limit, ceiling);
        return 0;
}

static bool over_target(const Throttle *t, const ThrottleSample *s, unsigned *ret_cut) {
        unsigned cut = GENTLEST_DECREASE_PERMILLE;
        bool over = false;

        if (s->has_p99 && s->p99_us > t->config.target_p99_us) {
                /* target/p99 < 1 here; p99 is untrusted, so no multiplication of it. */
                uint64_t ratio = t->config.target_p99_us * 1000 / s->p99_us;

                cut = (unsigned) MIN(ratio, (uint64_t) GENTLEST_DECREASE_PERMILLE);
                over = true;
        }
        if (s->has_pressure && t->config.pressure_permille < 1000 &&
                MIN(s->pressure_permille, 1000u) > t->config.pressure_permille)
                over = true; /* pressure says "too much", not how much: the gentle cut unless p99 says more */
        *ret_cut = MAX(cut, t->config.decrease_permille);
        return over;
}

uint64_t throttle_update(Throttle *t, const ThrottleSample *s) {
        const ThrottleConfig *c = &t->config;
        uint64_t base, next, floor;
        unsigned cut;
        bool over;

        if (t->n_windows < UINT_MAX)
                t->n_windows++;

        if (!s->guest_active) {
                /* Nobody to yield to. */
                t->n_over = 0;
                t->limit = c->ceiling;
                t->reason = THROTTLE_IDLE;
                return t->limit;
        }

        if (t->reason == THROTTLE_IDLE || t->limit == 0)
                /* Back from full speed: resume where the busy guest was last content, else from
                 * the rate the job ran at, else from the start speed. */
                base = t->busy_limit > 0    ? t->busy_limit
                       : s->stream_rate > 0 ? MIN(s->stream_rate, THROTTLE_SPEED_MAX)
                                            : c->start_speed;
        else
                base = t->limit;

        over = over_target(t, s, &cut);
        t->n_over = over ? (t->n_over < UINT_MAX ? t->n_over + 1 : UINT_MAX) : 0;
        if (over && t->n_over < c->over_windows) {
                /* Over once: hold, and yield if the next window says so too. */
                next = base;
                t->reason = THROTTLE_STEADY;
                over = false;
        } else if (over) {
                /* A limit above what the job did restrains nothing: cut from what it did. */
                if (s->stream_rate > 0 && s->stream_rate < base)
                        base = s->stream_rate;
                next = scale_permille(base, cut);
                t->reason = THROTTLE_YIELDING;
        } else if (s->has_p99 && c->steady_permille < 1000 &&
                   s->p99_us >= c->target_p99_us * c->steady_permille / 1000) {
                /* Close enough under the target: another step would likely cross it. */
                next = base;
                t->reason = THROTTLE_STEADY;
        } else {
                next = sat_add(base, c->step);
                t->reason = THROTTLE_PROBING;
        }

        floor = c->min_speed;
        if (c->ceiling > 0) {
                floor = MIN(floor, c->ceiling);
                if (next >= c->ceiling) {
                        next = c->ceiling;
                        if (!over)
                                t->reason = THROTTLE_CEILING;
                }
        }
        next = MAX(next, floor);

        t->limit = next;
        t->busy_limit = next;
        return next;
}

/* /proc/pressure/io */

typedef struct Cursor {
        const char *p, *end;
} Cursor;

static bool cursor_literal(Cursor *c, const char *lit) {
        size_t n = strlen(lit);

        if ((size_t) (c->end - c->p) < n || memcmp(c->p, lit, n) != 0)
                return false;
        c->p += n;
        return true;
}

static bool is_digit(char ch) {
        return ch >= '0' && ch <= '9';
}

static int cursor_u64(Cursor *c, uint64_t *ret) {
        uint64_t v = 0;
        const char *start = c->p;

        while (c->p < c->end && is_digit(*c->p)) {
                unsigned d = (unsigned) (*c->p - '0');

                if (v > (UINT64_MAX - d) / 10)
                        return -EBADMSG;
                v = v * 10 + d;
                c->p++;
        }
        if (c->p == start || c->p - start > 20)
                return -EBADMSG;
        *ret = v;
        return 0;
}

/* "12.34" → 1234; at most 100.00. */
static int cursor_percent(Cursor *c, unsigned *ret) {
        uint64_t whole;
        unsigned frac = 0;
        int r;

        r = cursor_u64(c, &whole);
        if (r < 0)
                return r;
        if (!cursor_literal(c, "."))
                return -EBADMSG;
        for (int i = 0; i < 2; i++) {
                if (c->p >= c->end || !is_digit(*c->p))
                        return -EBADMSG;
                frac = frac * 10 + (unsigned) (*c->p++ - '0');
        }
        if (whole > 100 || whole * 100 + frac > 10000)
                return -EBADMSG;
        *ret = (unsigned) whole * 100 + frac;
        return 0;
}

static int parse_psi_line(Cursor *c, const char *kind, PsiLine *ret) {
        PsiLine l = {};
        int r;

        if (!cursor_literal(c, kind) || !cursor_literal(c, " avg10="))
                return -EBADMSG;
        r = cursor_percent(c, &l.avg10);
        if (r < 0)
                return r;
        if (!cursor_literal(c, " avg60="))
                return -EBADMSG;
        r = cursor_percent(c, &l.avg60);
        if (r < 0)
                return r;
        if (!cursor_literal(c, " avg300="))
                return -EBADMSG;
        r = cursor_percent(c, &l.avg300);
        if (r < 0)
                return r;
        if (!cursor_literal(c, " total="))
                return -EBADMSG;
        r = cursor_u64(c, &l.total_us);
        if (r < 0)
                return r;
        if (!cursor_literal(c, "\n") && c->p != c->end)
                return -EBADMSG;
        *ret = l;
        return 0;
}

int psi_parse(const char *text, size_t len, Psi *ret) {
        Cursor c = {.p = text, .end = text + len};
        Psi psi = {};
        int r;

        if (!text || len > 4096)
                return -EBADMSG;
        r = parse_psi_line(&c, "some", &psi.some);
        if (r < 0)
                return r;
        if (c.p < c.end) {
                r = parse_psi_line(&c, "full", &psi.full);
                if (r < 0)
                        return r;
                psi.has_full = true;
        }
        if (c.p != c.end)
                return -EBADMSG;
        *ret = psi;
        return 0;
}

int psi_some_permille(const Psi *prev, const Psi *cur, uint64_t window_us, unsigned *ret) {
        unsigned __int128 x;
        uint64_t delta;

        if (window_us == 0)
                return -EINVAL;
        if (cur->some.total_us < prev->some.total_us)
                return -ESTALE;
        delta = cur->some.total_us - prev->some.total_us;
        x = (unsigned __int128) delta * 1000 / window_us;
        *ret = x > 1000 ? 1000 : (unsigned) x;
        return 0;
}

/* Sampler */

static void sampler_keep(
        ThrottleSampler *s, const QemuBlockStats *stats, const Psi *psi, uint64_t offset, uint64_t now_usec) {
        s->primed = true;
        s->t_usec = now_usec;
        s->rd_operations = stats->rd_operations;
        s->wr_operations = stats->wr_operations;
        s->flush_operations = stats->flush_operations;
        s->histogram = stats->rd_histogram;
        s->has_psi = psi != NULL;
        if (psi)
                s->psi = *psi;
        s->has_offset = offset != UINT64_MAX;
        s->offset = offset;
}

int throttle_sampler_feed(ThrottleSampler *s, const QemuBlockStats *stats, const Psi *psi, uint64_t offset,
        uint64_t now_usec, ThrottleSample *ret) {
        ThrottleSample out = {};
        QemuLatencyHistogram delta;
        uint64_t window, ns;
        unsigned pm;
        int r;

        if (!s->primed) {
                sampler_keep(s, stats, psi, offset, now_usec);
                return -EAGAIN;
        }
        if (now_usec <= s->t_usec)
                return -EINVAL;
        if (stats->rd_operations < s->rd_operations || stats->wr_operations < s->wr_operations ||
                stats->flush_operations < s->flush_operations) {
                sampler_keep(s, stats, psi, offset, now_usec);
                return -ESTALE;
        }
        window = now_usec - s->t_usec;

        out.guest_active = stats->rd_operations > s->rd_operations || stats->wr_operations > s->wr_operations ||
                           stats->flush_operations > s->flush_operations;

        r = qemu_latency_histogram_delta(&s->histogram, &stats->rd_histogram, &delta);
        if (r == -ESTALE && s->histogram.n_bins > 0 && stats->rd_histogram.n_bins > 0) {
                /* The operation counters went on but the histogram went back: set anew. */
                sampler_keep(s, stats, psi, offset, now_usec);
                return -ESTALE;
        }
        if (r >= 0 && qemu_latency_histogram_percentile(&delta, 990, &ns) >= 0) {
                out.has_p99 = true;
                out.p99_us = ns / 1000 + (ns % 1000 != 0);
        }

        if (psi && s->has_psi && psi_some_permille(&s->psi, psi, window, &pm) >= 0) {
                out.has_pressure = true;
                out.pressure_permille = pm;
        }

        if (offset != UINT64_MAX && s->has_offset && offset >= s->offset) {
                unsigned __int128 rate = (unsigned __int128) (offset - s->offset) * 1000000 / window;

                out.stream_rate = rate > THROTTLE_SPEED_MAX ? THROTTLE_SPEED_MAX : (uint64_t) rate;
        }

        sampler_keep(s, stats, psi, offset, now_usec);
        *ret = out;
        return 0;
}
