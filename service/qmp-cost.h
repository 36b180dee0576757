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

/* A connection's unfinished message now costs this (0: none), where it cost *charged. */
void qmp_cost_charge(uint64_t *charged, uint64_t cost);

/* Whether a connection whose unfinished message is charged at charged may hold one of this cost:
 * within the daemon-wide budget, or within its share of it. Those under their share may go on
 * past it (to twice the budget, a hard bound), so that a QEMU that sends its reply while others
 * hold the budget is not refused for them (up to its share: review 34c). */
bool qmp_cost_may_hold(uint64_t charged, uint64_t cost);
