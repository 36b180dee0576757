/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <errno.h>

#include "helper-common.h"
#include "pull-status.h"
#include "util.h"

int nbd_fail(const char *what) {
        return helper_fail(nbd_get_errno() ?: EIO, "%s: %s", what, strempty(nbd_get_error()));
}

static void status_reset(Status *s) {
        for (size_t i = 0; i < _CTX_MAX; i++) {
                s->n_entries[i] = 0;
                s->seen[i] = false;
        }
        s->busy = s->complete = false;
        s->error = 0;
}

static int status_extent(void *userdata, const char *metacontext, uint64_t offset, uint32_t *entries,
        size_t n_entries, int *error) {
        Status *s = userdata;
        size_t c;

        if (streq(metacontext, CONTEXT_ALLOCATION))
                c = CTX_ALLOCATION;
        else if (streq(metacontext, CONTEXT_DEPTH))
                c = CTX_DEPTH;
        else
                return 0; /* not asked for */

        /* One answer per context, for what we asked. */
        if (s->seen[c] || offset != s->offset || n_entries % 2 != 0) {
                *error = EPROTO;
                return -1;
        }
        s->seen[c] = true;

        if (n_entries > s->allocated[c]) {
                uint32_t *e = reallocarray(s->entries[c], n_entries, sizeof(uint32_t));
                if (!e) {
                        *error = ENOMEM;
                        return -1;
                }
                s->entries[c] = e;
                s->allocated[c] = n_entries;
        }
        memcpy(s->entries[c], entries, n_entries * sizeof(uint32_t));
        s->n_entries[c] = n_entries;
        return 0;
}

static int status_complete(void *userdata, int *error) {
        Status *s = userdata;

        s->busy = false;
        s->complete = true;
        s->error = *error;
        return 1; /* retire the command */
}

int status_issue(Status *s, struct nbd_handle *nbd, uint64_t offset, uint64_t length) {
        int64_t cookie;

        status_reset(s);
        s->offset = offset;
        s->length = length;
        cookie = nbd_aio_block_status(nbd, s->length, s->offset,
                (nbd_extent_callback) { .callback = status_extent, .user_data = s },
                (nbd_completion_callback) { .callback = status_complete, .user_data = s }, 0);
        if (cookie < 0)
                return nbd_fail("Failed to ask for block status");
        s->busy = true;
        return 0;
}

void status_free(Status *s) {
        for (size_t i = 0; i < _CTX_MAX; i++)
                s->entries[i] = mfree(s->entries[i]);
}

/* Cut the answer at every boundary of either context and hand on the pieces in order. The two
 * contexts may end at different places: only what both describe is used, the rest is asked
 * again. */
int status_process(Status *s, StatusPieceFn piece, void *userdata, uint64_t *ret_pos) {
        const uint32_t *a = s->entries[CTX_ALLOCATION], *d = s->entries[CTX_DEPTH];
        size_t na = s->n_entries[CTX_ALLOCATION] / 2, nd = s->n_entries[CTX_DEPTH] / 2, ia = 0, id = 0;
        uint64_t pos = s->offset, end = s->offset + s->length, a_end, d_end;
        int r = 0;

        s->complete = false;
        if (s->error != 0)
                return helper_fail(s->error, "Block status of %" PRIu64 "+%" PRIu64 " failed: %m", s->offset,
                        s->length);
        if (na == 0 || nd == 0)
                return helper_fail(EPROTO, "The NBD server sent no %s for %" PRIu64 "+%" PRIu64 ".",
                        na == 0 ? CONTEXT_ALLOCATION : CONTEXT_DEPTH, s->offset, s->length);

        a_end = pos + a[0];
        d_end = pos + d[0];
        for (;;) {
                uint64_t piece_end;

                /* Zero-length extents are a server's bug; pass over them. */
                while (ia < na && a_end <= pos)
                        if (++ia < na)
                                a_end += a[2 * ia];
                while (id < nd && d_end <= pos)
                        if (++id < nd)
                                d_end += d[2 * id];
                if (ia >= na || id >= nd || pos >= end)
                        break;

                piece_end = MIN(MIN(a_end, d_end), end);
                r = piece(userdata, pos, piece_end - pos, d[2 * id + 1], a[2 * ia + 1]);
                if (r < 0)
                        return r == -ENOMEM ? helper_fail(r, "Out of memory.") : r;
                pos = piece_end;
                if (r > 0)
                        break;
        }

        if (pos == s->offset)
                return helper_fail(EPROTO, "The NBD server's block status for %" PRIu64 "+%" PRIu64 " is empty.",
                        s->offset, s->length);
        *ret_pos = pos;
        return 0;
}

ControlExtentKind classify(uint32_t depth, uint32_t flags) {
        if (depth == 0)
                return CONTROL_EXTENT_ABSENT;
        if (depth >= 2)
                return CONTROL_EXTENT_BACKING;
        return flags & LIBNBD_STATE_ZERO ? CONTROL_EXTENT_ZERO : CONTROL_EXTENT_LOCAL;
}

/* Adjacent pieces with the same depth and kind are one extent; one is handed on once the next
 * differs (here), or at the end (the caller: m->pending). */
int map_merge_add(MapMerge *m, uint64_t offset, uint64_t length, uint32_t depth, uint32_t flags, Extent *ret) {
        ControlExtentKind kind = classify(depth, flags);
        bool ended = m->have_pending;

        if (m->have_pending && m->pending.depth == depth && m->pending.kind == kind &&
                m->pending.offset + m->pending.length == offset) {
                m->pending.length += length;
                return 0;
        }
        if (ended)
                *ret = m->pending;
        m->pending = (Extent) { .offset = offset, .length = length, .depth = depth, .kind = kind };
        m->have_pending = true;
        return ended;
}
