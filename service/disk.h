/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* A guest's disk: its record kept in step with QEMU (or its image headers), and the life of its
 * job (disk.c). The BlockStream object around it (its methods and properties) is stream.h's. */

#include <stdbool.h>
#include <stdint.h>
#include <systemd/sd-bus.h>
#include <systemd/sd-event.h>

#include "job.h"
#include "qemu.h"
#include "qmp-socket.h"

typedef struct Guest Guest;
typedef struct ImageChain ImageChain;
typedef struct Disk Disk;
typedef struct Peer Peer;

/* What a disk needs of the guest it belongs to (guest.c's guest_disk_host): the disk calls up
 * into no guest code. */
typedef void (*disk_refreshed_t)(Guest *g, int error, const char *error_desc, void *userdata);
typedef struct DiskHost {
        const char *(*name)(Guest *g);
        bool (*published)(Guest *g);
        bool (*offline)(Guest *g);
        Peer *(*peer)(Guest *g);
        sd_bus *(*bus)(Guest *g);
        /* The loop the disk's own timers run on (NULL: none; a held-back progress signal then
         * waits for the next value). */
        sd_event *(*event)(Guest *g);
        bool (*qmp_ready)(Guest *g);
        /* The QEMU process of the QMP connection, last seen ({0}: not known), and which connection
         * that is (a count). */
        QemuInstance (*qemu)(Guest *g, uint64_t *ret_connection);
        int (*save)(Guest *g);
        void (*save_later)(Guest *g);
        /* Save, and go on in then once it is on disk (guest_save_then()). */
        int (*save_then)(Guest *g, void (*then)(void *userdata), void *userdata, void (*destroy)(void *userdata));
        void (*update_polling)(Guest *g);
        /* The budget all disks' progress signals share (progress-budget.h); NULL: none. */
        struct ProgressBudget *(*progress_budget)(Guest *g);
        void (*release_helper_if_idle)(Guest *g);
        Disk *(*find_disk)(Guest *g, const char *alias);
        /* Re-read the guest's disks; handler gets 0 or -errno (see guest_refresh()). */
        int (*refresh)(Guest *g, disk_refreshed_t handler, void *userdata, void (*destroy)(void *));
        /* Does path (beneath an image directory) still name the file (dev, ino), and does the
         * guest's QEMU have that file open under that name? */
        bool (*pivot_check)(Guest *g, const char *path, uint64_t dev, uint64_t ino);
} DiskHost;

typedef struct Disk {
        Guest *guest;
        const DiskHost *host;
        char *alias;
        char *object_path;
        char *node_name;
        char *path;
        char *file_path; /* where QEMU names the top json:{…}: its file child (QemuDisk.file), else NULL */
        /* QemuDisk.names_by_qemu, as QEMU last listed the disk (false until it did) */
        bool names_by_qemu;
        char *format;
        char **chain;       /* backing image files, nearest first */
        char **chain_nodes; /* their node names ("" when QEMU has none) */
        uint64_t size;
        uint64_t cluster_size;
        uint64_t bandwidth; /* Bandwidth: of the running job, else the default for the next */

        Job job;
        bool publishing; /* the outcome is being written; Finished follows (disk.c) */
        char *range_node;   /* a range job's filter and export, recorded before QEMU has them */
        char *range_export;
        char *range_bottom; /* its filter's bottom (a range with base): to resume it after a restart */
        char *job_base;     /* a full stream's base node, to carry it on in a new storage helper */
        /* While QEMU streams the whole disk: one export of the top node kept for every
         * GetAllocationMap (see map.c), with the maps using it now. */
        char *map_export;
        char *map_export_node;
        unsigned map_export_users;
        /* The read-latency histogram the guest-latency mode set on the device histogram_left (a
         * qdev path) of QEMU histogram_left_qemu, left as the mode ended without a QMP connection:
         * removed at the next connection if it is to that QEMU, else forgotten (guest-peer.c). */
        char *histogram_left;
        QemuInstance histogram_left_qemu;
        /* Removes map_export once unused: set by map.c along with it (the disk calls down into
         * no map code). */
        void (*map_export_releaser)(struct Disk *d);
        /* The guest-latency mode (adaptive.c): its target (µs) of the running job, else the default
         * for the next (0: off); what it measured over the last window (µs, 0: no reads), the limit
         * it set (bytes/s, 0: none) and why (throttle_reason_to_string(), or "off"). adaptive_stopper
         * is set by adaptive.c along with adaptive (the disk calls down into no adaptive code). */
        uint64_t max_guest_latency;
        uint64_t guest_read_p99;
        uint64_t speed_limit;
        const char *throttle_reason;
        struct Adaptive *adaptive;
        void (*adaptive_stopper)(struct Disk *d);
        bool starting;   /* Start sent to QEMU, no answer yet */
        bool finalizing; /* the job concluded: dismissing and re-reading before Finished */
        bool releasing;  /* offline: the outcome waits for the storage helper to let go of the images */
        bool mirror_busy; /* mirror.c: a step of its journal is under way */
        /* mirror.c: FINALIZE is being recorded; no job-finalize until it is on disk (kept across
         * a reconnect, unlike mirror_busy: the state writer's continuation is not QMP's). */
        bool mirror_finalize_saving;
        /* mirror.c: gives that record up after a while (the guest's I/O is held meanwhile). */
        sd_event_source *mirror_finalize_timer;
        /* mirror.c: its Start waiting for QEMU to format the new image (blockdev-create), freed
         * with mirror_wait_free (the disk calls down into no mirror code). */
        void *mirror_wait;
        void (*mirror_wait_free)(void *p);
        /* After a mirror's pivot QEMU names the image by the fd set it opened it through
         * ("/dev/fdset/N"); the file is the one at pivot_path, (pivot_dev, pivot_ino). Path and the
         * chain show pivot_path only while QEMU names that fd set and the file is still that one
         * (DiskHost.pivot_check); the record goes once QEMU no longer names it. */
        char *pivot_qemu_name;
        char *pivot_path;
        uint64_t pivot_dev, pivot_ino;
        bool pinned;     /* its top image as its running QEMU had it open, when an export began */
        bool pin_writable; /* ... and QEMU had it open for writing (else it is handed over read-only) */
        dev_t pin_dev;
        ino_t pin_ino;
        /* ... and the uid that QEMU ran as: a handoff reads the chain below the top with that
         * uid's rights as well as the owner's (root's, for a guest root registered): the header is
         * the QEMU's to write as much as the owner's (reviews 34d, 34e). */
        uid_t pin_uid;
        usec_t last_saved;
        /* Progress signals (disk.c): when the last went out, whether a newer value waits for the
         * disk's turn (progress_timer, armed then, sends it in that turn), and the budget window in
         * which the disk last counted as reporting. */
        usec_t progress_emitted;
        bool progress_pending;
        sd_event_source *progress_timer;
        uint64_t progress_window;
} Disk;

int disk_new(Disk **ret, Guest *g, const DiskHost *host, const char *alias);
Disk *disk_free(Disk *d);
/* End the guest-latency mode, if on: the histogram it set is removed while QEMU is still ours. */
void disk_stop_latency_mode(Disk *d);
/* Take QEMU's view of the disk; returns true if a published property changed. */
int disk_update_from_qemu(Disk *d, const QemuDisk *q, bool emit);
/* Record that QEMU names the file (dev, ino) at path qemu_name (a mirror's fd set), and show path
 * for it from now on. */
int disk_set_pivot(Disk *d, const char *qemu_name, const char *path, uint64_t dev, uint64_t ino);
/* Take an offline disk's chain as read from the image headers. */
int disk_update_from_chain(Disk *d, const ImageChain *c, bool emit);
/* What the guest's record keeps of disk alias over chain c, in bytes of text (the paths, and a node
 * name and a format for each), as qemu_disks_text() counts a QEMU's report: an offline guest's disks
 * are held to the same QEMU_DISKS_TEXT_MAX, or a start would not read the record back. */
size_t disk_chain_text(const char *alias, const ImageChain *c);

/* Job plumbing, called by guest.c as QEMU reports. */
void disk_apply_job_changes(Disk *d, unsigned changed);
/* The same for changes QEMU reported (events, polls): the state write is coalesced. */
void disk_apply_qemu_job_changes(Disk *d, unsigned changed);
void disk_fail_job(Disk *d, const char *error);
/* The storage helper let go of the images (or something else keeps it): publish an outcome that
 * waited for that. */
void disk_publish_released(Disk *d);
void disk_emit_changed(Disk *d, const char *first, ...);
/* The export the disk's maps share is no longer wanted (the job is over, or the disk goes):
 * removed once its maps are done with it. */
void disk_release_map_export(Disk *d);
/* Is an image of its backing chain remote (qemu_image_name_remote())? Only those down to the
 * one whose node is bottom, if bottom is not NULL (what a range that keeps a base copies from). */
bool disk_backing_remote(const Disk *d, const char *bottom);

/* For stream.c: the job's properties changed; the guest's state written now, or coalesced. */
void disk_emit_job(Disk *d);
void disk_save(Disk *d);
void disk_save_later(Disk *d);
