/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The QMP reader and dispatcher on arbitrary bytes, as a hostile QEMU would send them: the
 * greeting, qmp_capabilities' reply, then typed calls (query-block + query-named-block-nodes,
 * query-block-jobs, a raw call) whose replies go through the typed parsers, and events. The first
 * byte picks how the rest is cut into reads, so a message split anywhere is exercised too; a read
 * also ends at a newline, and the event loop runs after each line: what the client queued (its
 * commands) is written before the next line comes, as with a QEMU that answers what it was sent. */

#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "qemu.h"
#include "qmp.h"
#include "util.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void on_disks(Qmp *q, int error, const char *desc, QemuDisk *disks, size_t n, void *userdata) {
}

static void on_jobs(Qmp *q, int error, const char *desc, QemuBlockJob *jobs, size_t n, void *userdata) {
}

static void on_raw(Qmp *q, int error, json_object *result, const char *error_class, const char *error_desc,
        void *userdata) {
}

static void on_exports(Qmp *q, int error, const char *desc, char **ids, void *userdata) {
}

static void on_state(Qmp *q, int error, void *userdata) {
        if (error < 0)
                return;
        /* ids 2, 3 (two calls: query-block, query-named-block-nodes) ... as qmp.c numbers them */
        (void) qemu_query_disks(q, on_disks, NULL, NULL);
        (void) qemu_query_block_jobs(q, on_jobs, NULL, NULL);
        (void) qmp_call(q, "query-status", NULL, -1, on_raw, NULL, NULL);
        (void) qemu_query_block_exports(q, on_exports, NULL, NULL);
}

static void on_event(Qmp *q, const char *event, json_object *d, void *userdata) {
        QemuJobEvent ev;
        const char *id;

        (void) qemu_parse_job_event(event, d, &ev);
        (void) qemu_parse_export_deleted(event, d, &id);
}

static sd_event *e = NULL;

/* Once per process, as the daemon's main() does: the C locale object (see locale_use_c()). */
int LLVMFuzzerInitialize(int *argc, char ***argv) {
        log_set_max_level(0);
        if (locale_use_c() < 0 || sd_event_new(&e) < 0)
                abort();
        return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        QmpHandlers h = { .on_state = on_state, .on_event = on_event };
        Qmp *q = NULL;
        size_t step;
        int fds[2];

        if (size == 0)
                return 0;
        step = data[0] == 0 ? SIZE_MAX : data[0];
        data++;
        size--;

        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) < 0)
                abort();
        if (qmp_new_from_fd(&q, e, fds[0], &h) < 0)
                abort();
        while (size > 0) {
                const uint8_t *nl;
                size_t n = MIN(step, size);

                nl = memchr(data, '\n', n);
                if (nl)
                        n = (size_t) (nl - data) + 1;
                if (qmp_feed(q, (const char *) data, n) < 0)
                        break;
                data += n;
                size -= n;
                /* At the end of a line, write what was queued; nothing is ever readable (we write
                 * nothing to fds[1]) and no timer is due, so this returns at once. */
                if (nl)
                        for (unsigned i = 0; i < 8 && sd_event_run(e, 0) > 0; i++)
                                ;
        }
        qmp_close_unref(q);
        close(fds[1]);
        return 0;
}
