/* SPDX-License-Identifier: LGPL-2.1-or-later */

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

/* What the messages begun and not yet ended cost, on every connection, and on how many. The
 * daemon has one thread. */
static uint64_t unfinished_cost;
static unsigned unfinished_n;

void qmp_cost_charge(uint64_t *charged, uint64_t cost) {
        unfinished_cost = unfinished_cost - *charged + cost;
        unfinished_n = unfinished_n - (*charged > 0) + (cost > 0);
        *charged = cost;
}

bool qmp_cost_may_hold(uint64_t charged, uint64_t cost) {
        unsigned n = unfinished_n + (charged == 0);
        uint64_t total = unfinished_cost - charged + cost;

        /* Twice the budget is a hard bound: shares given one after another add up past it (review
         * 34c). */
        return total <= QMP_UNFINISHED_COST_MAX ||
               (cost <= QMP_UNFINISHED_COST_MAX / n && total <= 2 * (uint64_t) QMP_UNFINISHED_COST_MAX);
}
