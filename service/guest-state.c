/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* A guest and its disks as a state record, and back: state.c reads and writes records only. */

#include <stdlib.h>

#include "guest.h"
#include "state.h"
#include "adaptive.h"
#include "disk.h"
#include "engine.h"
#include "throttle.h"
#include "util.h"

int guest_write_state(Guest *g, const char *dir, bool wait, state_writer_then_t then, void *userdata,
        void (*destroy)(void *userdata)) {
        _cleanup_free_ StateDisk *disks = NULL;
        StateGuest s;

        disks = calloc(g->n_disks ?: 1, sizeof(StateDisk));
        if (!disks)
                return -ENOMEM;
        /* Borrowed: the guest's strings, for the length of the write. */
        for (size_t i = 0; i < g->n_disks; i++) {
                const Disk *d = g->disks[i];
                disks[i] = (StateDisk) {
                        .alias = d->alias,
                        .node_name = d->node_name,
                        .path = d->path,
                        .format = d->format,
                        .chain = d->chain,
                        .chain_nodes = d->chain_nodes,
                        .size = d->size,
                        .cluster_size = d->cluster_size,
                        .bandwidth = d->bandwidth,
                        .max_guest_latency = d->max_guest_latency,
                        .job_latency_mode = job_is_active(&d->job) ? d->adaptive != NULL : -1,
                        .job = d->job,
                        .range_node = d->range_node,
                        .range_export = d->range_export,
                        .range_bottom = d->range_bottom,
                        .job_base = d->job_base,
                        .pivot_qemu_name = d->pivot_qemu_name,
                        .pivot_path = d->pivot_path,
                        .pivot_dev = d->pivot_dev,
                        .pivot_ino = d->pivot_ino,
                };
        }
        s = (StateGuest) {
                .name = g->name,
                .uuid = g->uuid,
                .qmp_socket = g->qmp_socket,
                .owner = g->owner,
                .job_seq = g->job_seq,
                .offline = g->offline,
                .nbd_server_started = g->nbd_server_started,
                .nbd_server_qemu_pid = (uint64_t) g->nbd_server_qemu.pid,
                .nbd_server_qemu_start = g->nbd_server_qemu.start,
                .helper_uid = g->helper_uid,
                .mcs_c1 = g->mcs_c1,
                .mcs_c2 = g->mcs_c2,
                .storage_uid = g->storage_uid,
                .storage_mcs_c1 = g->storage_mcs_c1,
                .storage_mcs_c2 = g->storage_mcs_c2,
                .qmp_pin = g->qmp_pin,
                .qmp_uid = g->qmp_uid,
                .qmp_as_owner = g->qmp_as_owner,
                .disk_names = g->disk_names,
                .disks = disks,
                .n_disks = g->n_disks,
        };
        if (then)
                return state_save_then(g->engine->state_writer, dir, &s, g, then, userdata, destroy);
        return state_save(g->engine->state_writer, dir, &s, wait);
}

int guest_remove_state(Guest *g, const char *dir) {
        return state_remove(g->engine->state_writer, dir, g->name);
}

static int disk_from_state(Guest *g, StateDisk *s, Disk **ret) {
        Disk *d;
        int r;

        r = disk_new(&d, g, &guest_disk_host, s->alias);
        if (r < 0)
                return r;
        free(d->node_name);
        free(d->path);
        free(d->format);
        strv_free(d->chain);
        strv_free(d->chain_nodes);
        d->node_name = TAKE_PTR(s->node_name);
        d->path = TAKE_PTR(s->path);
        d->format = TAKE_PTR(s->format);
        d->chain = TAKE_PTR(s->chain);
        d->chain_nodes = TAKE_PTR(s->chain_nodes);
        d->size = s->size;
        d->cluster_size = s->cluster_size;
        d->bandwidth = s->bandwidth;
        /* Out of range (a hand-edited file): off, not a refused guest. */
        d->max_guest_latency = s->max_guest_latency <= THROTTLE_TARGET_MAX_US ? s->max_guest_latency : 0;
        d->job = s->job;
        s->job = (Job) {};
        d->range_node = TAKE_PTR(s->range_node);
        d->range_export = TAKE_PTR(s->range_export);
        d->range_bottom = TAKE_PTR(s->range_bottom);
        d->job_base = TAKE_PTR(s->job_base);
        d->pivot_qemu_name = TAKE_PTR(s->pivot_qemu_name);
        d->pivot_path = TAKE_PTR(s->pivot_path);
        d->pivot_dev = s->pivot_dev;
        d->pivot_ino = s->pivot_ino;
        *ret = d;
        return 0;
}

int guest_from_state(Engine *m, StateGuest *s, Guest **ret) {
        Guest *g;
        int r;

        r = guest_new(&g, m, s->name, s->qmp_socket, s->owner, s->uuid);
        if (r < 0)
                return r;
        g->job_seq = s->job_seq;
        g->offline = s->offline;
        g->nbd_server_started = s->nbd_server_started;
        g->nbd_server_qemu = (QemuInstance) { .pid = (pid_t) s->nbd_server_qemu_pid, .start = s->nbd_server_qemu_start };
        g->helper_uid = s->helper_uid;
        g->mcs_c1 = s->mcs_c1;
        g->mcs_c2 = s->mcs_c2;
        g->storage_uid = s->storage_uid;
        g->storage_mcs_c1 = s->storage_mcs_c1;
        g->storage_mcs_c2 = s->storage_mcs_c2;
        g->qmp_pin = s->qmp_pin;
        g->qmp_uid = s->qmp_uid;
        g->qmp_uid_pin_next = s->qmp_uid_pin_next;
        g->qmp_as_owner = s->qmp_as_owner;
        g->disk_names = TAKE_PTR(s->disk_names);
        g->disks = calloc(s->n_disks ?: 1, sizeof(Disk *));
        if (!g->disks) {
                guest_free(g);
                return -ENOMEM;
        }
        for (size_t i = 0; i < s->n_disks; i++) {
                r = disk_from_state(g, &s->disks[i], &g->disks[g->n_disks]);
                if (r < 0) {
                        guest_free(g);
                        return r;
                }
                g->n_disks++;
        }
        for (size_t i = 0; i < g->n_disks; i++) {
                Disk *d = g->disks[i];
                /* A record from before says nothing: as the disk's default does. */
                int in_mode = s->disks[i].job_latency_mode;

                /* A job that ran in the guest-latency mode goes on in it (from its ceiling: the
                 * limit the controller last set is not known); one that ran without it, though the
                 * disk's default is on (Start's max_guest_latency 0), does not. */
                if (!g->offline && in_mode != 0 && d->max_guest_latency > 0 && job_is_active(&d->job) &&
                        !d->job.concluded &&
                        adaptive_resume(d, d->max_guest_latency, d->bandwidth) < 0)
                        log_warning("Guest %s disk %s: cannot carry on the guest-latency mode; the job runs at its "
                                    "last speed.",
                                g->name, d->alias);
        }
        *ret = g;
        return 0;
}
