/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* One budget for all disks' progress signals (ProgressSignalsPerSecond=): the engine keeps it,
 * each disk counts itself in once a window when it has progress to report, and waits
 * max(min_interval, N / per_second) between two of its signals, N the disks counted in the current
 * or the previous window (so a job that ends or dies leaves no count behind). */

#include <stdint.h>

#include "util.h"

typedef struct ProgressBudget {
        unsigned per_second; /* 0: as 1 */
        uint64_t window;     /* the current window's number (now / window + 1; 0: none yet) */
        unsigned reporters_now;
        unsigned reporters_before;
} ProgressBudget;

#define PROGRESS_BUDGET_WINDOW_USEC USEC_PER_SEC

/* *reporter_window: the last window the reporter was counted in (0 at first). */
static inline usec_t progress_budget_interval(
        ProgressBudget *b, uint64_t *reporter_window, usec_t min_interval, usec_t now) {
        uint64_t window = now / PROGRESS_BUDGET_WINDOW_USEC + 1;
        unsigned n;

        if (window != b->window) {
                b->reporters_before = window == b->window + 1 ? b->reporters_now : 0;
                b->reporters_now = 0;
                b->window = window;
        }
        if (*reporter_window != window) {
                *reporter_window = window;
                b->reporters_now++;
        }
        n = b->reporters_now > b->reporters_before ? b->reporters_now : b->reporters_before;
        usec_t shared = (usec_t) n * USEC_PER_SEC / (b->per_second > 0 ? b->per_second : 1);
        return shared > min_interval ? shared : min_interval;
}
