/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* A guest's QMP peer: its own QEMU, or the storage helper of a guest that is not running.
 *
 * The peer owns the QMP connection and says whether it takes commands; it starts the storage
 * helper on demand and stops it once nothing needs it; it runs the guest's private NBD server
 * (one per QEMU, on a unix socket only root reaches: see export.h) and counts who uses it.
 * Who needs to know what happens to the peer registers a PeerListener (an export, a range job)
 * rather than being called by name. What the peer needs of its guest comes through PeerOwner
 * callbacks: it knows nothing of D-Bus, of the Guest object or of the disks' jobs. */

#include <stdbool.h>
#include <json-c/json.h>
#include <systemd/sd-event.h>

#include "config.h"
#include "qmp.h"
#include "storage.h"

typedef struct Peer Peer;
typedef struct PeerWaiter PeerWaiter;
typedef struct PeerListener PeerListener;

/* Something waiting for the peer (an offline guest's storage helper) to be ready. */
typedef void (*peer_ready_handler_t)(Peer *p, int error, const char *error_text, void *userdata);
/* Something waiting for QEMU's answer to our nbd-server-start: 0 once it runs, -EBUSY if QEMU
 * runs an NBD server that is not ours (libvirt's pull-mode backup starts one), < 0 otherwise. */
typedef void (*peer_nbd_handler_t)(Peer *p, int error, const char *error_text, void *userdata);
typedef struct PeerNbdWaiter PeerNbdWaiter;

/* What the guest tells its peer. All take the owner's userdata. */
typedef struct PeerOwner {
        /* The guest is not running: its peer is the storage helper. */
        bool (*offline)(void *userdata);
        /* A running guest's QEMU connected (0) or its connection broke (< 0). The listeners
         * heard of a break first. */
        void (*connection)(void *userdata, int error);
        /* An event from QEMU (a BLOCK_EXPORT_DELETED is the listeners', see peer_dispatch_event). */
        void (*event)(void *userdata, const char *event, json_object *data);
        /* The peer is gone: first of all (the listeners hear it next). */
        void (*lost)(void *userdata);
        /* The storage helper failed or went away: the guest's own jobs learn it (the listeners
         * heard it first, the waiters hear it next). */
        void (*helper_failed)(void *userdata, const char *why);
        /* Does the guest itself (its jobs) keep the storage helper? And are outcomes waiting
         * for it to let go of the images, and can they be told now? */
        bool (*helper_needed)(void *userdata);
        bool (*releasing)(void *userdata);
        void (*released)(void *userdata);
        /* The persisted flag "a server of ours may run in this QEMU", and saving it. */
        bool (*nbd_server_started)(void *userdata);
        void (*set_nbd_server_started)(void *userdata, bool started);
} PeerOwner;

/* News of the peer, for what runs in it. Registered with peer_listen(), embedded in its owner. */
struct PeerListener {
        PeerListener *next, *prev;
        void *userdata;
        /* The peer is gone, and with it whatever it ran for us (exports, nodes, the NBD server). */
        void (*lost)(void *userdata);
        /* BLOCK_EXPORT_DELETED */
        void (*export_deleted)(void *userdata, const char *id);
        /* Does it keep an offline guest's storage helper? */
        bool (*busy)(void *userdata);
        /* The guest goes away: stop and forget. */
        void (*removed)(void *userdata);
};

struct Peer {
        sd_event *event;
        const Config *config;
        const char *name;         /* the guest's, for logs */
        const char *runtime_root; /* the daemon's runtime dir: the private servers' sockets go in nbd/ */
        const PeerOwner *owner;
        void *userdata;

        Qmp *qmp;

        /* A guest that is not running: its disks are served by a sandboxed storage helper (a
         * QEMU with no guest), started on demand; qmp then talks to it. */
        StorageHelper *helper;
        StorageSource storage_source;
        StorageHost storage;
        PeerWaiter *waiters;
        sd_event_source *release_check; /* outcomes waiting for the helper: is it idle now? */

        /* The private NBD server of the peer. */
        bool nbd_server;
        bool nbd_confirmed;   /* QEMU answered our nbd-server-start with success */
        unsigned nbd_generation; /* a reply for a server since stopped or lost is not this one's */
        PeerNbdWaiter *nbd_waiters;
        char *nbd_socket;
        unsigned nbd_users; /* exports in QEMU using it */

        PeerListener *listeners;
        const char *lost_why; /* while the listeners hear of a storage helper's failure: why */
};

/* storage: what the storage helper needs of the guest (its identity and disks). */
void peer_init(Peer *p, sd_event *event, const Config *config, const char *name, const char *runtime_root,
        const PeerOwner *owner, const StorageSource *storage, void *userdata);
/* Close the connection, kill the helper, drop the waiters. The listeners must be gone. */
void peer_done(Peer *p);

bool peer_offline(Peer *p);
/* The peer (QEMU, or an offline guest's storage helper) can take commands now. */
bool peer_ready(Peer *p);
/* Take over a connected QMP socket to the guest's QEMU. */
int peer_connect_fd(Peer *p, int fd);
/* Close the connection to QEMU (the QMP object is released; no state handler runs). */
void peer_close(Peer *p);
/* The connection broke: the private server and all that ran in QEMU for us is gone; listeners
 * hear it. */
void peer_lost(Peer *p);
/* For a listener told the peer is lost: why, when it is known (the storage helper could not start,
 * or died), else NULL. */
const char *peer_lost_reason(const Peer *p);

/* Run handler once the peer is ready: at once for a running guest (or -ENOTCONN), after
 * starting the storage helper for an offline one. destroy(userdata) runs after the handler. */
int peer_when_ready(Peer *p, peer_ready_handler_t handler, void *userdata, void (*destroy)(void *));
/* An offline guest's helper goes away once nothing needs it; outcomes of its jobs are told
 * once it is gone (the images' locks with it), or at once if other work keeps it. */
void peer_release_helper_if_idle(Peer *p);
/* Outcomes waiting for the helper: tell them now (the owner's released()). */
void peer_publish_released(Peer *p);
bool peer_has_helper(Peer *p);
/* Does a listener (an export, a range job) still need the peer's work? */
bool peer_listeners_busy(Peer *p);

void peer_listen(Peer *p, PeerListener *l);
void peer_unlisten(Peer *p, PeerListener *l);
/* The guest goes away: every listener's removed(). */
void peer_remove_all(Peer *p);
/* BLOCK_EXPORT_DELETED goes to the listeners: > 0 if event was one. */
int peer_dispatch_event(Peer *p, const char *event, json_object *data);

/* The private NBD server (started on demand), its users, and a connection to it. */
int peer_nbd_server_ensure(Peer *p);
/* Ensure it and run handler once QEMU said whether it runs (at once if it was confirmed before):
 * what QEMU adds to "the" NBD server must not be sent before, or it lands on a foreign server.
 * destroy(userdata) runs after the handler, or when the wait is dropped. */
int peer_nbd_server_when_started(Peer *p, peer_nbd_handler_t handler, void *userdata, void (*destroy)(void *));
/* Drop the waits of userdata (it goes away): their handlers do not run. */
void peer_nbd_unwait(Peer *p, void *userdata);
int peer_nbd_server_connect(Peer *p);
void peer_nbd_hold(Peer *p);
/* One user less; the server stops once it has none. */
void peer_nbd_drop(Peer *p);
void peer_nbd_server_release_if_unused(Peer *p);
/* Right after a (re)connect: stop a server of ours (and its exports) left by a restart or a
 * broken connection. */
void peer_nbd_cleanup_leftovers(Peer *p);
bool peer_nbd_server_running(Peer *p);
