/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* What the daemon's objects share, owned by the Manager (manager.c): the event loop, the bus, the
 * configuration, the directories, the lists of exports and range operations with their counters.
 * The objects below the Manager (guest.c, stream.c, export.c, range.c, rangeop.c, map.c) take this
 * instead of the Manager, and reach the registry of guests above them through its callbacks. */

#include <systemd/sd-bus.h>
#include <systemd/sd-event.h>

#include "config.h"
#include "progress-budget.h"

typedef struct Guest Guest;
typedef struct Disk Disk;
typedef struct PolkitRegistry PolkitRegistry;
typedef struct Engine Engine;
typedef struct QemuJobEvent QemuJobEvent;
typedef struct QemuBlockJob QemuBlockJob;

/* The registry of guests (manager.c), for the objects below it. */
typedef struct EngineRegistry {
        Guest *(*find_guest)(Engine *e, const char *name);
        /* The disks of guests that are not running, and those running guests' QEMUs report,
         * but except's (manager_guest_images(), manager_guest_claims()). */
        char **(*guest_images)(Engine *e, Guest *except);
        char **(*guest_claims)(Engine *e, Guest *except);
        void (*unlink_guest)(Engine *e, Guest *g);
        /* The guests that are not running whose storage helper runs now: of this owner, and of
         * every owner but root. */
        void (*storage_helpers)(Engine *e, uid_t owner, unsigned *ret_owner, unsigned *ret_users);
        /* What a guest's (re)connect asks of the job layers above it (range.c, stream.c), wired by
         * manager.c, which sits above them all: remove what range jobs of before left in QEMU;
         * carry on the range jobs of before; carry on an offline guest's full stream in a new
         * storage helper (< 0: it could not even be tried); and whether a range job runs d's job. */
        void (*cleanup_leftovers)(Guest *g);
        void (*resume_orphans)(Guest *g);
        /* A running guest's QEMU could not be reached: what waited for it since the restart
         * (exports) gives up. */
        void (*unreachable)(Guest *g);
        int (*resume_offline_stream)(Disk *d);
        bool (*range_runs)(Disk *d);
        /* QEMU's news of d's jobs, after job.c applied it: an engine's own steps (mirror.c);
         * returns the changes left for the disk. */
        unsigned (*job_event)(Disk *d, const QemuJobEvent *ev, unsigned changed);
        unsigned (*job_info)(Disk *d, const QemuBlockJob *info, unsigned changed);
        /* d's job is lost with QEMU (gone, or it no longer knows the job): true if an engine
         * finished it (mirror.c), false if it fails. */
        bool (*job_lost)(Disk *d);
        /* QEMU is gone, or no longer has d, while d's Start waits for an event of it (mirror.c):
         * it fails, and what it made is removed. */
        void (*start_lost)(Disk *d);
        /* A template cache's sandbox identity (manager-identity.c): a helper uid (= gid) of
         * HelperUIDRange= and an MCS pair c1 < c2 that no guest and no other cache has (self: the
         * cache asking); and whether a restored one still is such. */
        int (*identity_allocate)(Engine *e, const void *self, uid_t *ret_uid, unsigned *ret_c1, unsigned *ret_c2);
        bool (*identity_free)(Engine *e, const void *self, uid_t uid, unsigned c1, unsigned c2);
} EngineRegistry;

struct Engine {
        sd_event *event;
        sd_bus *bus;
        Config config;
        char *state_dir;
        char *runtime_dir;
        char *guest_state_dir; /* state_dir/guests */
        struct StateWriter *state_writer; /* writes the files there (state-writer.h) */

        PolkitRegistry *polkit;                    /* authorizations in flight (polkit.h) */
        struct UnregisterDrain *unregister_drains; /* unregistered guests' QMP, closing */

        struct Export *exports;
        unsigned export_seq;
        struct RangeOp *range_ops;
        unsigned range_seq;
        struct Cache *caches; /* the host template caches (cache.h) */
        unsigned cache_seq;
        TokenBucket cache_checks; /* looks at caches' overlays by path (cache-users.c) */
        bool caches_record_kept; /* caches.json could not be read at start: not overwritten */

        ProgressBudget progress; /* all disks' progress signals (ProgressSignalsPerSecond=) */

        const EngineRegistry *registry;
};

/* Where our own helper binaries are (HelperDirectory=, default the libexec dir). */
static inline const char *engine_helper_dir(Engine *e) {
        return e->config.helper_dir ?: LIBEXECDIR;
}

static inline Guest *engine_find_guest(Engine *e, const char *name) {
        return e->registry->find_guest(e, name);
}

static inline char **engine_guest_images(Engine *e, Guest *except) {
        return e->registry->guest_images(e, except);
}

static inline char **engine_guest_claims(Engine *e, Guest *except) {
        return e->registry->guest_claims(e, except);
}

static inline void engine_storage_helpers(Engine *e, uid_t owner, unsigned *ret_owner, unsigned *ret_users) {
        e->registry->storage_helpers(e, owner, ret_owner, ret_users);
}

static inline void engine_unlink_guest(Engine *e, Guest *g) {
        e->registry->unlink_guest(e, g);
}
