/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <time.h>

#include "qmp-cost.h"

QmpScanResult qmp_scan(QmpScan *s, const char *buf, size_t len, size_t *ret_used) {
        for (size_t i = 0; i < len; i++) {
                char c = buf[i];

                s->cost++;
                if (s->in_string) {
                        if (s->escape)
                                s->escape = false;
                        else if (c == '\\')
                                s->escape = true;
                        else if (c == '"')
                                s->in_string = false;
                        continue;
                }
                switch (c) {
                case '"':
                        s->in_string = true;
                        break;
                case '{':
                        s->cost += QMP_COST_OBJECT + QMP_COST_VALUE;
                        s->depth++;
                        break;
                case '[':
                        s->cost += QMP_COST_ARRAY + QMP_COST_VALUE;
                        s->depth++;
                        break;
                case ',':
                        s->cost += QMP_COST_VALUE;
                        break;
                case ':':
                        s->cost += QMP_COST_MEMBER;
                        break;
                case '}':
                case ']':
                        /* A stray closer at the top is json-c's to refuse: end the scan there. */
                        if (s->depth <= 1) {
                                s->depth = 0;
                                *ret_used = i + 1;
                                return s->cost > QMP_MESSAGE_COST_MAX ? QMP_SCAN_OVER : QMP_SCAN_END;
                        }
                        s->depth--;
                        break;
                }
                if (s->cost > QMP_MESSAGE_COST_MAX)
                        return QMP_SCAN_OVER;
        }
        *ret_used = len;
        return QMP_SCAN_MORE;
}

/* What every holder holds, how many there are, and the holders, the longest held first (each new
 * one goes last). The daemon has one thread. */
static uint64_t unfinished_cost;
static unsigned unfinished_n;
static QmpCharge *holders_first, *holders_last;
static uint64_t grace = QMP_HOLD_GRACE_USEC;

void qmp_cost_set_grace(uint64_t usec) {
        grace = usec;
}

void qmp_cost_charge(QmpCharge *c, uint64_t cost) {
        if (c->cost == 0 && cost > 0) {
                struct timespec ts;

                (void) clock_gettime(CLOCK_MONOTONIC, &ts);
                c->since = (uint64_t) ts.tv_sec * 1000000U + (uint64_t) ts.tv_nsec / 1000U;
                c->prev = holders_last;
                c->next = NULL;
                *(holders_last ? &holders_last->next : &holders_first) = c;
                holders_last = c;
        } else if (c->cost > 0 && cost == 0) {
                *(c->prev ? &c->prev->next : &holders_first) = c->next;
                *(c->next ? &c->next->prev : &holders_last) = c->prev;
                c->prev = c->next = NULL;
        }
        unfinished_cost = unfinished_cost - c->cost + cost;
        unfinished_n = unfinished_n - (c->cost > 0) + (cost > 0);
        c->cost = cost;
}

bool qmp_cost_may_hold(QmpCharge *c, uint64_t cost) {
        struct timespec ts;
        uint64_t now;

        if (c->evicted)
                return false;
        (void) clock_gettime(CLOCK_MONOTONIC, &ts);
        now = (uint64_t) ts.tv_sec * 1000000U + (uint64_t) ts.tv_nsec / 1000U;
        while (unfinished_cost - c->cost + cost > QMP_UNFINISHED_COST_MAX) {
                QmpCharge *oldest = holders_first == c ? c->next : holders_first;

                if (!oldest || now - oldest->since < grace)
                        break;
                oldest->evicted = true;
                qmp_cost_charge(oldest, 0);
                oldest->evict(oldest);
        }
        if (unfinished_cost - c->cost + cost <= QMP_UNFINISHED_COST_MAX)
                return true;
        /* Twice the budget is a hard bound: shares given one after another add up past it (review
         * 34c). */
        return cost <= QMP_UNFINISHED_COST_MAX / (unfinished_n + (c->cost == 0)) &&
               unfinished_cost - c->cost + cost <= 2 * (uint64_t) QMP_UNFINISHED_COST_MAX;
}
