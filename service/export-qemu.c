/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* An export in the guest's QEMU, which other managers may use too (libvirt's pull-mode backup
 * starts an NBD server and puts a filter over the disk): the disk's node looked up afresh, our
 * NBD server confirmed by QEMU before anything is added to it, and our export watched through
 * BLOCK_EXPORT_DELETED. */

#include "bus-error.h"
#include "export-internal.h"
#include "guest.h"
#include "qemu.h"
#include "util.h"

/* QEMU runs our NBD server (confirmed): add the export to it, on the disk's node as QEMU names
 * it now (a filter another manager put on top, then took away, is not remembered). */
static void export_server_started(Peer *p, int error, const char *error_text, void *userdata) {
        Export *e = userdata;
        Guest *g = e->guest;
        ExportRef *ref;
        const char *node;
        int r;

        if (!export_live(e))
                return; /* ended meanwhile (export_end() takes the wait back too) */

        if (error < 0) {
                /* The helper died under the start: the QMP reply fails before the peer's
                 * listeners hear of it, and the export must not fail for what a restart covers. */
                if (export_helper_lost_in_call(e, error, error_text ?: "the storage helper went away"))
                        return;
                export_fail_error(e, error == -EBUSY ? BS_ERROR_BUSY : BS_ERROR_HELPER_FAILED,
                        error_text ?: "cannot start QEMU's NBD server");
                return;
        }
        node = guest_disk_node_name(g, e->alias);
        if (isempty(node)) {
                export_fail(e, "the disk went away");
                return;
        }
        /* By id: the export may fail and go before QEMU answers (which it may do out of order). */
        ref = export_ref_new(e);
        r = ref ? qemu_block_export_add_nbd(g->peer.qmp, e->qemu_id, node, e->name, export_added, ref, free) : -ENOMEM;
        if (r < 0) {
                free(ref); /* not taken on failure (qemu.c) */
                export_fail(e, "cannot send block-export-add");
                return;
        }
        e->in_qemu = true;
        peer_nbd_hold(&g->peer);
}

static void export_to_server(Export *e) {
        int r;

        r = peer_nbd_server_when_started(&e->guest->peer, export_server_started, e, NULL);
        if (r < 0)
                export_fail(e, "cannot start QEMU's NBD server");
}

static void export_disks_read(Guest *g, int error, const char *desc, void *userdata) {
        Export *e = export_by_id(g->engine, EXPORT_REF_ID(userdata));

        if (!e || e->guest != g || e->state != EXPORT_STARTING)
                return; /* dropped meanwhile */
        if (error < 0) {
                _cleanup_free_ char *why = strdup_printf("cannot read the guest's disks: %s", desc ?: strerror(-error));
                export_fail(e, why ?: "cannot read the guest's disks");
                return;
        }
        export_to_server(e);
}

static void export_gone_checked(Qmp *q, int error, const char *desc, char **ids, void *userdata) {
        ExportRef *ref = userdata;
        Export *e = export_by_id(ref->engine, ref->id);

        if (!e || !e->deleted_in_qemu)
                return;
        e->deleted_in_qemu = false;
        /* No answer (QEMU quitting: the handoff is export_peer_lost's) or ours is still there. */
        if (error < 0 || strv_contains(ids, e->qemu_id))
                return;
        if (!e->in_qemu || !export_live(e))
                return;
        e->in_qemu = false;
        peer_nbd_drop(&e->guest->peer);
        export_fail(e, "QEMU removed the export (another client of QEMU deleted it or stopped the NBD server)");
}

/* BLOCK_EXPORT_DELETED: ours, deleted behind our back (block-export-del or nbd-server-stop by
 * another manager of this QEMU)? A QEMU that quits deletes its exports too, right before it goes
 * away, and that is a handoff, not a failure: ask QEMU, which answers only if it still runs. */
void export_qemu_export_deleted(void *userdata, const char *id) {
        Export *e = userdata;
        ExportRef *ref;
        int r;

        if (!e->in_qemu || !streq(id, e->qemu_id) || e->deleted_in_qemu || !guest_qmp_ready(e->guest))
                return;
        ref = export_ref_new(e);
        if (!ref) {
                log_oom();
                return;
        }
        r = qemu_query_block_exports(e->guest->peer.qmp, export_gone_checked, ref, free);
        if (r < 0) {
                log_warning_errno(r, "Export %u: cannot ask QEMU whether it still serves it: %m", e->id);
                return;
        }
        e->deleted_in_qemu = true;
}

void export_qemu_add(Export *e, bool fresh_disks) {
        int r;

        if (!fresh_disks) {
                export_to_server(e);
                return;
        }
        r = guest_refresh(e->guest, export_disks_read, EXPORT_REF(e), NULL);
        if (r < 0)
                export_fail(e, "cannot read the guest's disks");
}
