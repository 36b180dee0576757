/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* What a QEMU's message costs the daemon, told before json-c builds it (qmp.c feeds it): a
 * lexical pre-scan of each message (QMP_MESSAGE_COST_MAX and its weights, qmp.h), and the budget
 * of every connection's messages begun and not yet ended, whose trees json-c holds meanwhile
 * (QMP_UNFINISHED_COST_MAX). */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* What json-c's tree of one message may cost, estimated before json-c sees it (see qmp.c): the
 * bytes are not the limit, the values are. json-c 0.16 spends ~800 bytes on an object, ~150 on
 * an array, ~90 on a scalar: 1 MB of [{},{},...] became 270 MB. An object's members cost more
 * than an array's elements: its hash table doubles past two-thirds full (40 bytes a slot, the old
 * table freed only after the new one is filled), and each key is copied: an object of 173k short
 * keys took 46 MiB, 278 bytes a member just after a doubling (review 34a; the estimate had 137).
 * Now 233 a member: the most members let through (~107k) took 23.5 MiB. The
 * largest reply above is estimated at ~17 MiB (256 disks' 1536 nodes, tests/unit/data); 24 MiB
 * leaves 1.4 times that, and refuses [{},{},...] after its first 24k objects (~72 KiB of text).
 * A message begun must end within the connection's timeout (QMPTimeoutSec=): what json-c built
 * of it is held meanwhile. */
#define QMP_MESSAGE_COST_MAX (24U * 1024U * 1024U)
#define QMP_COST_OBJECT 1024U /* an object: its hash table (16 entries) and the object */
#define QMP_COST_ARRAY 192U   /* an array: its 32 slots and the object */
#define QMP_COST_VALUE 128U   /* any member or element: its json_object (and key, if any) */
#define QMP_COST_MEMBER 96U   /* and a member (a ':'): its share of the hash table, its key's copy */
/* And all messages begun and not ended yet, of every QEMU: a user may register 64 guests on QEMUs
 * of their own. One that would take more than its share of this (the budget over the number of
 * such messages) closes its connection; see qmp_may_hold(). */
#define QMP_UNFINISHED_COST_MAX (256U * 1024U * 1024U)

/* A lexical pass over the bytes of one message before json-c sees them: where the message ends
 * (a top-level container closes) and what json-c's tree of it will cost. Strings are skipped
 * (escapes included); their bytes count like any byte. */
typedef struct QmpScan {
        size_t depth;
        uint64_t cost;
        bool in_string, escape;
} QmpScan;

typedef enum QmpScanResult {
        QMP_SCAN_MORE, /* all bytes belong to the message, which goes on */
        QMP_SCAN_END,  /* the message ends at *ret_used bytes */
        QMP_SCAN_OVER, /* the message costs more than QMP_MESSAGE_COST_MAX */
} QmpScanResult;

QmpScanResult qmp_scan(QmpScan *s, const char *buf, size_t len, size_t *ret_used);

/* How long a holder may keep its memory before it gives way to others that need the budget: an
 * honest QEMU sends a message in milliseconds; one left unfinished, or a reply kept while QEMU
 * puts off the next, for seconds, is what fills it (review 34c). */
#define QMP_HOLD_GRACE_USEC (1ULL * 1000000ULL)

/* One holder of memory in the budget: a connection's unfinished message, or a reply kept. */
typedef struct QmpCharge QmpCharge;
struct QmpCharge {
        uint64_t cost;
        uint64_t since; /* CLOCK_MONOTONIC µs: since when it holds (cost > 0) */
        bool evicted;   /* it gave way: it may hold nothing more */
        /* Give way: drop what it holds, or let it go at once (the connection closes at the next
         * turn of the loop); the budget takes its charge back itself. */
        void (*evict)(QmpCharge *c);
        QmpCharge *prev, *next; /* the holders, longest first */
};

/* Its charge now (0: none). */
void qmp_cost_charge(QmpCharge *c, uint64_t cost);

/* Whether c may hold this much now: within the daemon-wide budget, after those that have held for
 * more than QMP_HOLD_GRACE_USEC gave way, the longest first; or within its share of it (the budget
 * over the number of holders), to twice the budget at most, a hard bound. A holder that gave way
 * may not. */
bool qmp_cost_may_hold(QmpCharge *c, uint64_t cost);

/* Tests only: how long a holder keeps its memory before it gives way (QMP_HOLD_GRACE_USEC). */
void qmp_cost_set_grace(uint64_t usec);
