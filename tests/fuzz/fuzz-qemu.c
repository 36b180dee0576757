/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The typed parsers of QEMU's replies and events (qemu.c) on arbitrary JSON, parsed by json-c as
 * the QMP reader would. The first byte picks the parser:
 *   0: query-block-jobs' return value
 *   1: [query-block's return, query-named-block-nodes' return] (the disks and their chains)
 *   2: an event {"event": NAME, "data": {...}} (job events and BLOCK_EXPORT_DELETED)
 *   3: qemu-img info's JSON text (the image size; raw bytes, not parsed first) */

#include <stdlib.h>

#include "qemu.h"
#include "util.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* One tokener for the process, reset before each input, as qmp.c keeps one per connection and
 * resets it after each message: its stack (QMP_DEPTH_MAX levels) is not allocated per input. */
static json_tokener *tok;

/* Once per process, as the daemon's main() does: the C locale object (see locale_use_c()). */
int LLVMFuzzerInitialize(int *argc, char ***argv) {
        log_set_max_level(0);
        if (locale_use_c() < 0)
                abort();
        tok = json_tokener_new_ex(QMP_DEPTH_MAX);
        if (!tok)
                abort();
        return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        _cleanup_(json_object_putp) json_object *o = NULL;
        unsigned kind;

        if (size == 0)
                return 0;
        kind = data[0] % 4;
        data++;
        size--;

        if (kind == 3) {
                uint64_t v;

                (void) qemu_parse_image_size((const char *) data, size, &v);
                return 0;
        }

        json_tokener_reset(tok);
        o = json_tokener_parse_ex(tok, (const char *) data, (int) MIN(size, (size_t) INT32_MAX));
        /* Whatever json-c holds of an unfinished text (a partial tree, the string buffer) goes
         * now, not with the next input: a leak of this input is this input's. */
        json_tokener_reset(tok);
        if (!o)
                return 0;

        switch (kind) {
        case 0: {
                QemuBlockJob *jobs = NULL;
                size_t n = 0;

                if (qemu_parse_block_jobs(o, &jobs, &n) >= 0)
                        qemu_block_jobs_free(jobs, n);
                break;
        }
        case 1: {
                QemuDisk *disks = NULL;
                size_t n = 0;

                if (!json_object_is_type(o, json_type_array) || json_object_array_length(o) != 2)
                        break;
                if (qemu_parse_disks(json_object_array_get_idx(o, 0), json_object_array_get_idx(o, 1), &disks, &n) >= 0)
                        qemu_disks_free(disks, n);
                break;
        }
        case 2: {
                json_object *name, *d = NULL;
                QemuJobEvent ev;
                const char *id;

                if (!json_object_object_get_ex(o, "event", &name) || !json_object_is_type(name, json_type_string))
                        break;
                /* qmp.c hands the parsers an object only (an empty one if QEMU sent none). */
                if (!json_object_object_get_ex(o, "data", &d) || !json_object_is_type(d, json_type_object))
                        break;
                (void) qemu_parse_job_event(json_object_get_string(name), d, &ev);
                (void) qemu_parse_export_deleted(json_object_get_string(name), d, &id);
                break;
        }
        }
        return 0;
}
