/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* blockstream-pull's reading of block status (service/helpers/pull-status.c) on its own: the
 * answers of both contexts cut into the pieces both describe, and pieces grown into the map's
 * extents. test-pull.py runs the same against qemu-nbd. */

#include <string.h>

#include "pull-status.h"
#include "util.h"
#include "tap.h"

typedef struct Piece {
        uint64_t offset, length;
        uint32_t depth, flags;
} Piece;

typedef struct Pieces {
        Piece p[16];
        size_t n;
        size_t stop_after; /* 0: never */
} Pieces;

static int collect(void *userdata, uint64_t offset, uint64_t length, uint32_t depth, uint32_t flags) {
        Pieces *ps = userdata;

        ASSERT_TRUE(ps->n < ELEMENTSOF(ps->p));
        if (ps->n >= ELEMENTSOF(ps->p))
                return -E2BIG;
        ps->p[ps->n++] = (Piece) { offset, length, depth, flags };
        return ps->stop_after > 0 && ps->n == ps->stop_after ? 1 : 0;
}

/* A Status answered with these (length, flags) pairs for [offset, +length). */
static void answer(Status *s, uint64_t offset, uint64_t length, const uint32_t *alloc, size_t n_alloc,
        const uint32_t *depth, size_t n_depth) {
        *s = (Status) { .offset = offset, .length = length, .complete = true };
        s->entries[CTX_ALLOCATION] = (uint32_t *) alloc;
        s->n_entries[CTX_ALLOCATION] = n_alloc;
        s->entries[CTX_DEPTH] = (uint32_t *) depth;
        s->n_entries[CTX_DEPTH] = n_depth;
}

/* Walks an answer; it must succeed, end at want_pos and hand on want_n pieces. */
static void walk(Status *s, Pieces *ps, uint64_t want_pos, size_t want_n) {
        uint64_t pos = 0;

        ps->n = 0;
        ASSERT_OK(status_process(s, collect, ps, &pos));
        ASSERT_FALSE(s->complete);
        ASSERT_EQ_U64(pos, want_pos);
        ASSERT_EQ(ps->n, want_n);
}

static void expect_piece(const Pieces *ps, size_t i, uint64_t offset, uint64_t length, uint32_t depth, uint32_t flags) {
        ASSERT_TRUE(i < ps->n);
        if (i >= ps->n)
                return;
        ASSERT_EQ_U64(ps->p[i].offset, offset);
        ASSERT_EQ_U64(ps->p[i].length, length);
        ASSERT_EQ(ps->p[i].depth, depth);
        ASSERT_EQ(ps->p[i].flags, flags);
}

static void test_cut_at_both_boundaries(void) {
        const uint32_t alloc[] = { 100, 0, 50, LIBNBD_STATE_ZERO };
        const uint32_t depth[] = { 60, 1, 90, 2 };
        Pieces ps = {};
        Status s;

        answer(&s, 1000, 150, alloc, 4, depth, 4);
        walk(&s, &ps, 1150, 3);
        expect_piece(&ps, 0, 1000, 60, 1, 0);
        expect_piece(&ps, 1, 1060, 40, 2, 0);
        expect_piece(&ps, 2, 1100, 50, 2, LIBNBD_STATE_ZERO);
}

/* Only what both contexts describe is used; the rest is asked again from pos. Beyond what was
 * asked, nothing is used. */
static void test_partial_answers(void) {
        const uint32_t alloc[] = { 100, 0 };
        const uint32_t depth[] = { 40, 1 };
        const uint32_t alloc_long[] = { 4096, 0 };
        Pieces ps = {};
        Status s;

        answer(&s, 0, 100, alloc, 2, depth, 2);
        walk(&s, &ps, 40, 1);
        expect_piece(&ps, 0, 0, 40, 1, 0);

        answer(&s, 0, 30, alloc_long, 2, depth, 2);
        walk(&s, &ps, 30, 1);
        expect_piece(&ps, 0, 0, 30, 1, 0);
}

/* A server's zero-length extents are passed over; a callback's "stop" ends the walk there. */
static void test_zero_lengths_and_stop(void) {
        const uint32_t alloc[] = { 0, 0, 50, 0, 0, LIBNBD_STATE_ZERO, 50, LIBNBD_STATE_ZERO };
        const uint32_t depth[] = { 100, 1 };
        Pieces ps = { .stop_after = 1 };
        Status s;

        answer(&s, 0, 100, alloc, 8, depth, 2);
        walk(&s, &ps, 50, 1);
        expect_piece(&ps, 0, 0, 50, 1, 0);

        ps.stop_after = 0;
        answer(&s, 0, 100, alloc, 8, depth, 2);
        walk(&s, &ps, 100, 2);
        expect_piece(&ps, 1, 50, 50, 1, LIBNBD_STATE_ZERO);
}

/* A failed request, a context missing, an answer that covers nothing: errors, nothing handed on. */
static void test_bad_answers(void) {
        const uint32_t some[] = { 100, 0 };
        const uint32_t empty[] = { 0, 0 };
        Pieces ps = {};
        uint64_t pos = 7;
        Status s;

        answer(&s, 0, 100, some, 2, some, 2);
        s.error = EIO;
        ASSERT_ERRNO(status_process(&s, collect, &ps, &pos), -EIO);
        answer(&s, 0, 100, some, 0, some, 2);
        ASSERT_ERRNO(status_process(&s, collect, &ps, &pos), -EPROTO);
        answer(&s, 0, 100, some, 2, some, 0);
        ASSERT_ERRNO(status_process(&s, collect, &ps, &pos), -EPROTO);
        answer(&s, 0, 100, empty, 2, some, 2);
        ASSERT_ERRNO(status_process(&s, collect, &ps, &pos), -EPROTO);
        ASSERT_EQ(ps.n, 0);
        ASSERT_EQ_U64(pos, 7);
}

static void test_classify(void) {
        ASSERT_EQ(classify(0, 0), CONTROL_EXTENT_ABSENT);
        ASSERT_EQ(classify(0, LIBNBD_STATE_ZERO), CONTROL_EXTENT_ABSENT);
        ASSERT_EQ(classify(1, 0), CONTROL_EXTENT_LOCAL);
        ASSERT_EQ(classify(1, LIBNBD_STATE_HOLE), CONTROL_EXTENT_LOCAL);
        ASSERT_EQ(classify(1, LIBNBD_STATE_ZERO), CONTROL_EXTENT_ZERO);
        ASSERT_EQ(classify(2, LIBNBD_STATE_ZERO), CONTROL_EXTENT_BACKING);
        ASSERT_EQ(classify(UINT32_MAX, 0), CONTROL_EXTENT_BACKING);
}

/* Equal neighbours grow one extent; a different kind or depth, or a gap, ends it. */
static void test_merge(void) {
        MapMerge m = {};
        Extent e = {};

        ASSERT_EQ(map_merge_add(&m, 0, 10, 1, 0, &e), 0);
        ASSERT_EQ(map_merge_add(&m, 10, 10, 1, LIBNBD_STATE_HOLE, &e), 0); /* still local */
        ASSERT_EQ_U64(m.pending.length, 20);
        ASSERT_EQ(map_merge_add(&m, 20, 5, 1, LIBNBD_STATE_ZERO, &e), 1);
        ASSERT_EQ_U64(e.offset, 0);
        ASSERT_EQ_U64(e.length, 20);
        ASSERT_EQ(e.kind, CONTROL_EXTENT_LOCAL);
        ASSERT_EQ(map_merge_add(&m, 25, 5, 2, 0, &e), 1);
        ASSERT_EQ(e.kind, CONTROL_EXTENT_ZERO);
        ASSERT_EQ(map_merge_add(&m, 30, 5, 3, 0, &e), 1); /* backing, but another depth */
        ASSERT_EQ(e.depth, 2);
        ASSERT_EQ(map_merge_add(&m, 40, 5, 3, 0, &e), 1); /* a gap */
        ASSERT_EQ_U64(e.offset, 30);
        ASSERT_EQ_U64(e.length, 5);
        ASSERT_TRUE(m.have_pending);
        ASSERT_EQ_U64(m.pending.offset, 40);
        ASSERT_EQ(m.pending.kind, CONTROL_EXTENT_BACKING);
}

int main(int argc, char **argv) {
        log_set_max_level(LOG_LEVEL_ERR - 1); /* the failures the tests cause are expected */
        tap_init(argc, argv);
        TAP_RUN(test_cut_at_both_boundaries);
        TAP_RUN(test_partial_answers);
        TAP_RUN(test_zero_lengths_and_stop);
        TAP_RUN(test_bad_answers);
        TAP_RUN(test_classify);
        TAP_RUN(test_merge);
        return tap_finish();
}
