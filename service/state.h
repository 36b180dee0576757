/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* Persistence of registered guests: one JSON file per guest in <state-dir>/guests, and of the
 * users' NBD exports: one per export in <state-dir>/exports, written atomically. A file is our own output, but read back as untrusted input all the same.
 *
 * This layer knows plain records only, not the objects made of them: a guest saves itself as a
 * StateGuest (guest-state.c), and the manager makes guests of the records state_load() reads. */

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <json-c/json.h>

#include "job.h"
#include "qmp-socket.h"
#include "state-writer.h"

#define STATE_FILE_MAX (4U * 1024U * 1024U)

typedef struct StateDisk {
        char *alias;
        char *node_name;
        char *path;
        char *format;
        char **chain;       /* backing image files, nearest first */
        char **chain_nodes; /* their node names */
        uint64_t size;
        uint64_t cluster_size;
        uint64_t bandwidth;
        uint64_t max_guest_latency; /* µs, 0: off (absent in files of before) */
        /* Whether the running job runs in the guest-latency mode (at max_guest_latency): 1 or 0;
         * -1: not recorded (no job, or a file from before: as max_guest_latency says). */
        int job_latency_mode;
        Job job;
        char *range_node; /* NULL: none (as the job_base and range_* fields below) */
        char *range_export;
        char *range_bottom;
        char *job_base;
        char *pivot_qemu_name; /* a mirror's pivot (disk.h); NULL: none */
        char *pivot_path;
        uint64_t pivot_dev, pivot_ino;
} StateDisk;

typedef struct StateGuest {
        char *name;
        char *uuid;
        char *qmp_socket; /* "" for an offline guest */
        uid_t owner;
        uint64_t job_seq;
        bool offline;
        bool nbd_server_started;
        uint64_t nbd_server_qemu_pid, nbd_server_qemu_start; /* 0: not known */
        uid_t helper_uid;
        unsigned mcs_c1, mcs_c2;
        uid_t storage_uid; /* the storage helper's identity; 0: none yet (or unusable in the file) */
        unsigned storage_mcs_c1, storage_mcs_c2;
        QmpSocketPin qmp_pin;
        uid_t qmp_uid;          /* UID_INVALID: none pinned */
        bool qmp_uid_pin_next;  /* loaded only: a file from before peers were checked */
        bool qmp_as_owner;      /* registered by its owner: its socket is opened as the owner */
        char **disk_names;      /* alias, name, … (util.h's disk_names_check()); NULL: none */
        StateDisk *disks;
        size_t n_disks;
} StateGuest;

/* Frees what a loaded record owns. A record filled for state_save() may borrow every string
 * from its guest instead, and is then not given to this. */
void state_guest_done(StateGuest *g);

/* Write g to <dir>/<name>.json, atomically, through w (state-writer.h): done before returning
 * with wait, else queued. A removal is always done before returning. */
int state_save(StateWriter *w, const char *dir, const StateGuest *g, bool wait);
/* The same, going on in fn once it is on disk (state_writer_put_then()). */
int state_save_then(StateWriter *w, const char *dir, const StateGuest *g, void *owner, state_writer_then_t fn,
        void *userdata, void (*destroy)(void *userdata));
int state_remove(StateWriter *w, const char *dir, const char *name);

/* One state file's JSON (file_name: its name, which must match the guest inside) to a record,
 * every field checked: the loader's parse alone (tests/fuzz/fuzz-state.c). -EBADMSG if invalid. */
int state_guest_from_json(json_object *o, const char *file_name, StateGuest *ret);

/* Read every valid state file of dir into a record and hand it to handler, which may take its
 * contents (leaving the fields it took NULL). Invalid files are logged and skipped; a handler's
 * error < 0 ends the load with it. */
typedef int (*state_load_handler_t)(StateGuest *g, const char *path, void *userdata);
int state_load(const char *dir, state_load_handler_t handler, void *userdata);

/* A user's export, as much as serving it again after a restart takes: its socket path, URI,
 * object path and QEMU's export id follow from these (export.c). */
#define STATE_EXPORT_PINS_MAX 256

typedef struct StateExportPin {
        char *alias;
        uint64_t dev;
        uint64_t ino;
        bool writable; /* that QEMU had it open for writing: handed over read-write (else read-only) */
        uint32_t uid;  /* that QEMU's uid, whose rights the handoff reads the chain with */
} StateExportPin;
/* A pin's uid in a record from before it was kept: nobody's rights, the safe side. */
#define STATE_PIN_UID_UNKNOWN UINT32_C(65534)

typedef struct StateExport {
        unsigned id;
        char *guest;
        /* The guest's uuid and owner: a record is of that guest only, not of another registered
         * later under its name (NULL, UID_INVALID: a record from before). */
        char *guest_uuid;
        uid_t guest_owner;
        char *alias;  /* the disk */
        char *name;   /* the NBD export name */
        char *listen; /* "unix" or "tcp:ADDR:PORT", as the Export() call gave it */
        /* Handed over to the guest's storage helper (its QEMU exited while it served): the
         * (device, inode) of each disk's top image as that QEMU had it open, so that the helper
         * of a restarted daemon opens nothing else. n_pins == 0: not handed over. */
        StateExportPin *pins;
        size_t n_pins;
} StateExport;

void state_export_done(StateExport *e);
/* Write e to <dir>/<id>.json, atomically; remove it. */
int state_export_save(const char *dir, const StateExport *e);
int state_export_remove(const char *dir, unsigned id);
/* One export's JSON (file_name: its name, "<id>.json") to a record, every field checked. */
int state_export_from_json(json_object *o, const char *file_name, StateExport *ret);
/* Every valid export file of dir to handler (which may take the strings). Invalid files are
 * logged and removed: nothing could serve them again. */
typedef int (*state_export_handler_t)(StateExport *e, void *userdata);
int state_export_load(const char *dir, state_export_handler_t handler, void *userdata);
