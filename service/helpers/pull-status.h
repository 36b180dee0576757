/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* blockstream-pull's view of a disk: NBD block status of both contexts (base:allocation and
 * qemu:allocation-depth), cut into pieces both describe, and the allocation map's extents grown
 * from those pieces. No copying here (pull.c), and no message to the daemon: the pieces and
 * extents go to the caller. */

#include <libnbd.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "control.h"

/* One block status request asks about at most this much: NBD lengths are 32 bits, so the largest
 * multiple of 2 MiB (any cluster size) below 4 GiB. Each request costs a round trip and QEMU's
 * per-request setup: 1 GiB windows made a 1 TiB map 1.3x slower than `qemu-img map`. A server
 * may scan less than asked anyway (we continue from where its answer ends). */
#define STATUS_WINDOW ((UINT64_C(1) << 32) - (UINT64_C(1) << 21))

#define CONTEXT_ALLOCATION LIBNBD_CONTEXT_BASE_ALLOCATION
#define CONTEXT_DEPTH "qemu:allocation-depth"

enum {
        CTX_ALLOCATION,
        CTX_DEPTH,
        _CTX_MAX,
};

/* The answer to one block status request, both contexts as the server sent them. */
typedef struct Status {
        uint64_t offset, length;     /* what we asked about */
        uint32_t *entries[_CTX_MAX]; /* (length, flags) pairs */
        size_t n_entries[_CTX_MAX], allocated[_CTX_MAX];
        bool seen[_CTX_MAX];
        bool busy;     /* in flight */
        bool complete; /* answered, not looked at yet */
        int error;
} Status;

typedef struct Extent {
        uint64_t offset, length;
        uint32_t depth;
        ControlExtentKind kind;
} Extent;

/* The extent being grown by its equal neighbours. */
typedef struct MapMerge {
        Extent pending;
        bool have_pending;
} MapMerge;

/* A failure of libnbd: logged, told to the daemon, -errno returned (helper_fail()). */
int nbd_fail(const char *what);

/* Asks about [offset, offset + length) (length at most STATUS_WINDOW); the answer is in s once
 * s->complete. 0 or -errno (told). */
int status_issue(Status *s, struct nbd_handle *nbd, uint64_t offset, uint64_t length);

/* One piece of the answer that both contexts describe: its depth (qemu:allocation-depth) and
 * flags (base:allocation). Returns < 0 to fail, 0 to go on, > 0 to stop after this piece. */
typedef int (*StatusPieceFn)(void *userdata, uint64_t offset, uint64_t length, uint32_t depth, uint32_t flags);

/* Hands the complete answer in s on, piece by piece, in order. *ret_pos: where the pieces ended,
 * the next offset to ask about. 0 or -errno (told). */
int status_process(Status *s, StatusPieceFn piece, void *userdata, uint64_t *ret_pos);

void status_free(Status *s);

ControlExtentKind classify(uint32_t depth, uint32_t flags);

/* Adds a piece to the extent being grown. 1 when that extent ended: it is in *ret, and the piece
 * starts the next one; 0 when the piece only grew it (or started the first). */
int map_merge_add(MapMerge *m, uint64_t offset, uint64_t length, uint32_t depth, uint32_t flags, Extent *ret);
