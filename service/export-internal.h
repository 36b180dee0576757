/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* An export as export.c and its D-Bus face (export-bus.c) share it; nobody else includes this. */

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <systemd/sd-event.h>

#include "control.h"
#include "engine.h"
#include "helper.h"
#include "peer.h"
#include "state.h"

typedef struct Export Export;

/* A relay's client waits while QEMU's NBD listener has a full backlog: at most this many. */
#define UPSTREAM_PENDING_MAX RELAY_CLIENTS_MAX
/* A handed-over export's storage helper that dies is started again this often in a row, after
 * a back-off doubling from EXPORT_HELPER_BACKOFF_MIN_USEC; then the export fails. */
#define EXPORT_HELPER_RESTARTS 5
#define EXPORT_HELPER_BACKOFF_MIN_USEC (500 * USEC_PER_MSEC)
#define EXPORT_HELPER_BACKOFF_MAX_USEC (8 * USEC_PER_SEC)
/* A helper that served this long was a working one: its death starts a new series. */
#define EXPORT_HELPER_STABLE_USEC (60 * USEC_PER_SEC)

typedef enum ExportState {
        EXPORT_STARTING,
        EXPORT_SERVING,
        EXPORT_STOPPED,
        EXPORT_FAILED,
} ExportState;

extern const char *const export_state_table[];

struct Export {
        Engine *engine;
        Export *next;
        unsigned id;
        char *object_path;
        Guest *guest;
        char *alias;
        char *disk_path; /* the disk's object path */
        char *qemu_id;   /* block export id in QEMU */
        char *name;      /* NBD export name */
        char *uri;
        char *unix_path; /* our listening socket, unlinked at the end */
        char *listen;    /* as Export() was given it */
        ExportState state;
        bool published;
        bool in_qemu;
        bool deleted_in_qemu; /* BLOCK_EXPORT_DELETED seen for it: QEMU asked if it runs */
        /* The guest's QEMU went away while we served: its storage helper takes over (once per
         * export), and clients wait for it in pending[] meanwhile. */
        bool handed_over;
        bool handing_over;
        /* The storage helper of a handed-over export died: started again after restart_source's
         * back-off, at most EXPORT_HELPER_RESTARTS times in a row (a helper that served for a
         * while is a new series). */
        unsigned helper_restarts;
        usec_t helper_serving_since;
        sd_event_source *restart_source;
        char *error; /* why it failed, for the Error property; NULL while it did not */
        uint32_t clients;
        usec_t clients_emitted;          /* when Clients was last announced */
        sd_event_source *clients_timer;  /* armed: a newer count waits for its turn */
        LogLimit relay_errors;          /* the relay's "error" messages in our log */
        LogLimit upstreams_refused;     /* and our warnings when it asks for too many connections */

        /* Restored from the state after a restart: waiting for the guest's peer (resuming set
         * once that was asked), and for its address while the old relay holds it. */
        bool restored;
        bool resuming;
        bool relay_wanted; /* in QEMU already: spawn the relay once the address is ours */
        bool restore_handoff; /* handed over before the restart (its record has the pins) */
        sd_event_source *rebind_source;
        usec_t rebind_deadline;

        int listen_fd;
        pid_t relay_pid;
        sd_event_source *relay_child;
        sd_event_source *ready_timer; /* the relay must say "ready" by then */
        int control_fd;
        sd_event_source *control_source;
        HelperPace control_pace;
        HelperLog *log;
        sd_bus_message *create_call; /* the Export() call, answered once the relay is ready */

        /* "connect" requests that met a full backlog, retried until their deadline */
        struct {
                unsigned long id;
                usec_t deadline;
        } pending[UPSTREAM_PENDING_MAX];
        size_t n_pending;
        sd_event_source *retry_source;
        /* the sockets handed to the relay, each registered here until its last reference goes
         * (export-upstreams.c); n_upstreams: how many, at the last count and since */
        int upstreams_epoll_fd, upstreams_sentinel_fd;
        unsigned n_upstreams;
        usec_t upstreams_full_since; /* counted full, with nothing on its way to the relay */
        LogLimit upstreams_errors;   /* our warnings when they cannot be counted */

        PeerListener listener; /* on the guest's peer, while listed */
};

/* Starting or serving: not ended (stopped or failed). */
static inline bool export_live(const Export *e) {
        return e->state == EXPORT_STARTING || e->state == EXPORT_SERVING;
}

/* A command to the relay (control.c builds it), with an fd to pass (upstream) or -1. */
int export_relay_send(Export *e, const ControlCommand *c, int pass_fd);
/* export-upstreams.c: a connection to the guest's NBD server for the relay's client n ("connect
 * n"), now or, while the server's backlog is full, from a timer until a deadline: never a
 * blocking connect() to a socket a guest's QEMU owns. Refused once the relay holds
 * RELAY_CLIENTS_MAX. */
void export_upstream_connect(Export *e, unsigned long n);
/* Forgets the connections handed to a relay: for a new relay, and at the end. */
void export_upstreams_reset(Export *e);

/* Fails it: the Export() call, if not answered yet, gets error_name (export_fail: HelperFailed). */
void export_fail_error(Export *e, const char *error_name, const char *why);
void export_fail(Export *e, const char *why);
/* block-export-add's reply (export.c): the relay starts next. */
void export_added(Qmp *q, int error, const char *desc, void *userdata);

/* export-qemu.c: add it to QEMU's NBD server (ours, confirmed), after reading the disks again
 * with fresh_disks; and BLOCK_EXPORT_DELETED for it. */
void export_qemu_add(Export *e, bool fresh_disks);
void export_qemu_export_deleted(void *userdata, const char *id);

/* Ends the export: final state, relay and socket gone, QEMU's export removed; the object too
 * with remove_object. */
void export_end(Export *e, ExportState final, bool remove_object);

/* export.c, for export-handoff.c */
void export_save(Export *e);
/* The guest's backend (QEMU, or its storage helper) is there for the export whose id the
 * userdata holds (EXPORT_REF()): by id, as such a wait cannot be cancelled, and the export may
 * have failed or gone (its address taken by another) meanwhile. */
#define EXPORT_REF(e) ((void *) (uintptr_t) (e)->id)
#define EXPORT_REF_ID(p) ((unsigned) (uintptr_t) (p))
void export_backend_ready(Guest *g, int error, const char *error_text, void *userdata);
Export *export_by_id(Engine *m, unsigned id);
/* The same for a QMP call's userdata, which has no engine to look in (freed with free()). */
typedef struct ExportRef {
        Engine *engine;
        unsigned id;
} ExportRef;
ExportRef *export_ref_new(const Export *e);
/* Its export, if it is still there and starting or serving. */
Export *export_ref_live(const ExportRef *ref);

/* export-handoff.c: a handed-over export's storage helper that died (restartable: it may be
 * started again), and the handoff across a daemon restart (the pins in its record). */
bool export_helper_restartable(Export *e);
void export_helper_died(Export *e, const char *why);
/* A command to the storage helper failed as its connection broke (-ECONNRESET, -ENOTCONN): for
 * a restartable export that is its helper's death, told to export_helper_died(); true then. */
bool export_helper_lost_in_call(Export *e, int error, const char *why);
int export_handoff_pins(Export *e, StateExportPin **ret, size_t *ret_n);
void export_handoff_restore_pins(Export *e, const StateExport *s);
/* A restored export that was handed over before the restart, its QEMU still gone: the storage
 * helper takes the disks again, as when that QEMU went away. */
int export_handoff_resume(Export *e);
