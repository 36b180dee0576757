/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* Waiting for a job: pull --wait, cancel --wait, wait. The job's signals, the progress bar,
 * and the result as the exit status. */

#include <stdbool.h>
#include <stdint.h>
#include <systemd/sd-bus.h>

#include "objects.h"

typedef struct WaitState {
        sd_bus *bus;
        DiskInfo *disk;
        sd_bus_slot *slots[3]; /* Finished, PropertiesChanged, NameOwnerChanged */
        const char *guest;
        /* Signals sent before this serial describe an earlier job (or are already in the
         * properties we read): the daemon's serials only grow. */
        uint64_t min_cookie;
        bool finished;
        char *result;
        uint64_t bytes_done;
        char *error;
        usec_t terminal_seen; /* State went terminal but Finished did not come (yet) */
        bool daemon_gone;
        bool draw;
        bool drawn;
        int r; /* an error inside a callback */
} WaitState;

int set_finished(WaitState *ws, const char *result, uint64_t bytes_done, const char *error);
/* Follows disk d on bus: installed before the method that starts or stops the job, so that no
 * signal is missed. wait_state_done() removes the matches: declare ws after the bus and the disk. */
int wait_subscribe(WaitState *ws, sd_bus *bus, DiskInfo *d);
/* The exit status: after_cancel, the job we stopped ending as cancelled is a success. */
int report_result(WaitState *ws, bool after_cancel);
int wait_loop(WaitState *ws, bool after_cancel);
void wait_state_done(WaitState *ws);
