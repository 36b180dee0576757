/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* A handed-over export (export.c's export_peer_lost(): its guest's QEMU went away while it
 * served, and the guest's storage helper serves it behind the same relay, on the same address):
 * the helper started again when it dies, bounded; and the handoff across a daemon restart, with
 * the (device, inode) pins that keep the helper to the files the QEMU had open. */

#include <inttypes.h>

#include "disk.h"
#include "export-internal.h"
#include "guest.h"
#include "util.h"

bool export_helper_restartable(Export *e) {
        return e->state == EXPORT_SERVING && e->handed_over && e->guest->handoff && e->relay_pid > 0;
}

bool export_helper_lost_in_call(Export *e, int error, const char *why) {
        if ((error != -ECONNRESET && error != -ENOTCONN) || !export_helper_restartable(e))
                return false;
        export_helper_died(e, why);
        return true;
}

static int export_restart_handler(sd_event_source *s, uint64_t usec, void *userdata) {
        Export *e = userdata;
        int r;

        e->restart_source = sd_event_source_disable_unref(e->restart_source);
        log_info("Export %u of guest %s disk %s: starting its storage helper again.", e->id, e->guest->name, e->alias);
        r = guest_when_ready(e->guest, export_backend_ready, EXPORT_REF(e), NULL);
        if (r < 0) {
                _cleanup_free_ char *why = strdup_printf("cannot start the storage helper: %s", strerror(-r));
                export_helper_died(e, why ?: "cannot start the storage helper");
        }
        return 0;
}

/* Its relay keeps the address and holds new clients (handing_over) while a new helper starts
 * after a back-off; a helper that dies each time makes no spin: after EXPORT_HELPER_RESTARTS in
 * a row the export fails, and says why. */
void export_helper_died(Export *e, const char *why) {
        usec_t now = now_usec(CLOCK_MONOTONIC), delay;
        int r;

        /* One death reaches us up to three times (QMP, the waiters, the child's exit): the
         * restart already due covers them all. */
        if (e->restart_source)
                return;
        e->handing_over = true;
        if (e->helper_serving_since > 0 && now - e->helper_serving_since >= EXPORT_HELPER_STABLE_USEC)
                e->helper_restarts = 0;
        e->helper_serving_since = 0;
        if (e->helper_restarts >= EXPORT_HELPER_RESTARTS) {
                _cleanup_free_ char *text =
                        strdup_printf("the storage helper died %u times in a row (last: %s); not starting it again",
                                e->helper_restarts + 1, why);
                export_fail(e, text ?: "the storage helper died too often");
                return;
        }
        delay = MIN(EXPORT_HELPER_BACKOFF_MIN_USEC << e->helper_restarts, EXPORT_HELPER_BACKOFF_MAX_USEC);
        e->helper_restarts++;
        r = sd_event_add_time_relative(
                e->engine->event, &e->restart_source, CLOCK_MONOTONIC, delay, 0, export_restart_handler, e);
        if (r < 0) {
                e->restart_source = NULL;
                export_fail(e, "the storage helper went away, and cannot be started again");
                return;
        }
        log_warning("Export %u of guest %s disk %s: %s; starting it again in %" PRIu64 " ms (%u of %u), on %s.", e->id,
                e->guest->name, e->alias, why, (uint64_t) (delay / USEC_PER_MSEC), e->helper_restarts,
                (unsigned) EXPORT_HELPER_RESTARTS, e->uri);
}

/* Across a daemon restart */

int export_handoff_pins(Export *e, StateExportPin **ret, size_t *ret_n) {
        Guest *g = e->guest;
        StateExportPin *pins;
        size_t n = 0;

        *ret = NULL;
        *ret_n = 0;
        if (!e->handed_over)
                return 0;
        if (g->n_disks == 0 || g->n_disks > STATE_EXPORT_PINS_MAX)
                return -E2BIG;
        pins = calloc(g->n_disks, sizeof(StateExportPin));
        if (!pins)
                return -ENOMEM;
        /* The aliases are the guest's: they live as long as the caller's use of them. */
        for (size_t i = 0; i < g->n_disks; i++)
                if (g->disks[i]->pinned)
                        pins[n++] = (StateExportPin) { .alias = g->disks[i]->alias,
                                .dev = (uint64_t) g->disks[i]->pin_dev,
                                .ino = (uint64_t) g->disks[i]->pin_ino,
                                .uid = (uint32_t) g->disks[i]->pin_uid,
                                .writable = g->disks[i]->pin_writable };
        *ret = pins;
        *ret_n = n;
        return 0;
}

void export_handoff_restore_pins(Export *e, const StateExport *s) {
        Guest *g = e->guest;

        if (s->n_pins == 0)
                return;
        /* If its QEMU is still gone, the storage helper takes the disks again
         * (export_handoff_resume()), but only the files that QEMU had open. A QEMU that is back
         * pins its own when the export is set up in it. */
        e->restore_handoff = true;
        for (size_t i = 0; i < s->n_pins; i++)
                for (size_t j = 0; j < g->n_disks; j++)
                        if (streq(g->disks[j]->alias, s->pins[i].alias)) {
                                g->disks[j]->pinned = true;
                                g->disks[j]->pin_dev = (dev_t) s->pins[i].dev;
                                g->disks[j]->pin_ino = (ino_t) s->pins[i].ino;
                                g->disks[j]->pin_uid = (uid_t) s->pins[i].uid;
                                g->disks[j]->pin_writable = s->pins[i].writable;
                        }
}

int export_handoff_resume(Export *e) {
        Guest *g = e->guest;
        int r;

        r = guest_begin_handoff(g); /* checks the pins */
        if (r < 0)
                return r;
        e->handed_over = true;
        e->resuming = true;
        return guest_when_ready(g, export_backend_ready, EXPORT_REF(e), NULL);
}
