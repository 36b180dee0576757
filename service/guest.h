/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* The Guest object: one QEMU, its QMP connection, its disks. */

#include <stdbool.h>
#include <sys/types.h>
#include <systemd/sd-bus.h>
#include <systemd/sd-event.h>

#include "peer.h"
#include "qemu.h"
#include "qmp.h"
#include "qmp-socket.h"
#include "helper.h"
#include "sandbox.h"
#include "state-writer.h"

typedef struct Engine Engine;
typedef struct Disk Disk;
typedef struct Guest Guest;

/* Something waiting for the guest's QMP peer (an offline guest's storage helper) to be ready. */
typedef void (*guest_ready_handler_t)(Guest *g, int error, const char *error_text, void *userdata);

extern const sd_bus_vtable guest_vtable[];

typedef struct Guest {
        Engine *engine;
        struct Guest *prev, *next;

        char *name;
        char *uuid;
        char *qmp_socket; /* "" for an offline guest */
        char *object_path;
        uid_t owner;
        uint64_t job_seq; /* makes every job id unique, persisted */
        /* Names its manager gives its disks (util.h's disk_names_check()): qdev id, name, …;
         * set at registration, persisted, kept for ids QEMU does not show (yet). NULL: none. */
        char **disk_names;

        /* On the bus (and in the state dir). A guest being registered is not yet. */
        bool published;
        sd_bus_message *register_call; /* RegisterGuest waiting for the first connect */

        /* Who the daemon talks QMP to (qmp-socket.h): the socket's directory as pinned at
         * registration; the uid whose QEMU a registration by root found (UID_INVALID: none, so
         * only the owner's own QEMU and QEMUUsers= serve it); whether the next peer's uid is to
         * be pinned (a registration by root). connect_error: why the last connect failed. */
        QmpSocketPin qmp_pin;
        uid_t qmp_uid;
        bool qmp_uid_pin_next;
        uid_t qmp_peer_uid; /* the uid of the QEMU connected last (UID_INVALID: none yet) */
        bool qmp_as_owner; /* persisted: registered by its owner, whose view of the socket path counts */
        int qmp_proc_fd; /* the connected QEMU's /proc/PID, vouched for (qmp_socket_peer_proc()); -1: none */
        char *connect_error;

        /* Its QMP peer (peer.h): the QEMU, or an offline guest's storage helper; the private
         * NBD server on it. */
        Peer peer;
        bool running; /* QMP ready */
        bool had_connection;
        sd_event_source *reconnect_timer;
        unsigned reconnect_attempts;
        sd_event_source *poll_timer;
        bool poll_pending;
        sd_event_source *save_timer; /* guest_save_later(): one write for many changes */
        bool save_pending;
        uint64_t last_save;    /* CLOCK_MONOTONIC µs */
        uint64_t connected_at; /* CLOCK_MONOTONIC µs, when QMP got ready */
        sd_event_source *bus_drain_timer; /* QMP reading paused: events over budget, or the bus is behind */
        TokenBucket events;               /* QEMU's event budget (guest_on_event) */
        LogLimit malformed_log;           /* warnings about malformed events */
        /* One re-read of the disks in flight at a time; who asks meanwhile waits for the next. */
        struct RefreshCtx *refresh_inflight;
        struct RefreshWaiter *refresh_pending;

        Disk **disks;
        size_t n_disks;

        /* The guest's sandbox: its helpers' uid (= gid) and MCS categories, for life. */
        uid_t helper_uid;
        unsigned mcs_c1, mcs_c2;
        char *selinux_process_label; /* NULL where SELinux is off */
        char *selinux_image_label;
        /* Its storage helper's (the QEMU that holds its images read-write): a second identity from
         * the same allocator, so that a relay or pull helper taken over (they face NBD clients and
         * servers) can neither signal that QEMU nor write into its memory. 0 until a storage
         * helper first runs (guest_storage_identity()), then the guest's for life. */
        uid_t storage_uid;
        unsigned storage_mcs_c1, storage_mcs_c2;
        char *storage_process_label;
        char *storage_image_label;
        char *runtime_dir;           /* <runtime-dir>/guests/<name>: what its helpers see */

        /* A guest that is not running: its disks are served by a sandboxed storage helper (a
         * QEMU with no guest), started on demand; its peer then talks to it. */
        bool offline;
        /* A running guest whose QEMU went away while an export of its disk served: the storage
         * helper serves that export on (its address unchanged) until nothing needs it; then the
         * guest waits for its QEMU again. Not persisted. */
        bool handoff;

        bool nbd_server_started; /* persisted: a server of ours may run in this QEMU (peer.c) */
        QemuInstance nbd_server_qemu; /* persisted: the QEMU it was started in ({0}: not known) */
        QemuInstance qmp_qemu;        /* the QEMU of the QMP connection, last seen ({0}: not known) */
        uint64_t qmp_connection;      /* counts the QMP connections made: which one is up now */
} Guest;

int guest_new(Guest **ret, Engine *m, const char *name, const char *qmp_socket, uid_t owner, const char *uuid);
Guest *guest_free(Guest *g);

/* Connect (or reconnect) to QEMU; on success the disks are read and jobs reconciled. */
int guest_connect(Guest *g);
/* The same with the socket as RegisterGuest opened and checked it (an O_PATH fd, kept by the
 * caller; its directory's identity in *seen). */
int guest_connect_opened(Guest *g, int sock_fd, const QmpSocketPin *seen);
/* Put a registered guest on the bus and into the state dir. */
int guest_publish(Guest *g);
/* Take a guest off the bus, delete its state, free it. reply_to (may be NULL) gets its empty
 * reply once QEMU answered the removal of what we added to it (bounded by QMPTimeoutSec=, at most
 * 10 s; a QEMU that never answers is logged). */
void guest_unregister(Guest *g, sd_bus_message *reply_to);
/* At exit: drop the connections of unregistered guests still waiting for QEMU's answers. */
void guest_unregister_drains_free(Engine *m);

/* A disk by its alias (qdev id), the name its manager gives it (disk_names), or its image path,
 * in that order. */
Disk *guest_find_disk(Guest *g, const char *alias_or_path);
/* The name the guest's manager gives the disk with this alias, "" if none. */
const char *guest_disk_target(Guest *g, const char *alias);
/* The QEMU node name of the disk (NULL: no such disk). */
const char *guest_disk_node_name(Guest *g, const char *alias_or_path);
/* The QMP peer (QEMU, or an offline guest's storage helper) can take commands now. */
bool guest_qmp_ready(Guest *g);
/* Run handler once the QMP peer is ready: at once for a running guest (or -ENOTCONN), after
 * starting the storage helper for an offline one. destroy(userdata) runs after the handler. */
int guest_when_ready(Guest *g, guest_ready_handler_t handler, void *userdata, void (*destroy)(void *));
/* The same, after the disks of a running guest were read from QEMU again: an operation that
 * names a node uses the one QEMU has now (another manager of the QEMU may have put a filter over
 * the disk, or pivoted it to a copy), never one remembered. */
int guest_when_ready_fresh(Guest *g, guest_ready_handler_t handler, void *userdata, void (*destroy)(void *));
/* The guests that are not running of a user other than root have at most this many storage helpers
 * at once (each a QEMU of 50-100 MiB in the daemon's own cgroup), those of all such users at most
 * USERS_MAX: whether a caller's job or map of g, which starts g's helper if it has none, may
 * begin (< 0 and LimitsExceeded if not). Root's guests, a handoff for root's export, and work
 * carried on after a restart are not held to it. */
#define GUEST_STORAGE_HELPERS_PER_OWNER_MAX 8
#define GUEST_STORAGE_HELPERS_USERS_MAX 16
int guest_helper_share(Guest *g, sd_bus_error *error);
/* The method error for r, guest_when_ready()'s failure. */
int guest_ready_error(Guest *g, int r, sd_bus_error *error);
/* The disk aliases the storage helper takes: its node names, made from them ("bsf-<alias>-<k>",
 * k below 100), must fit QEMU's 31 characters. An offline guest's are held to 16 at registration;
 * a handoff takes what fits. */
#define GUEST_OFFLINE_ALIAS_MAX 16
#define GUEST_HANDOFF_ALIAS_MAX 24
/* The guest's QEMU is gone and an export must go on: serve its disks from the storage helper,
 * read from the image headers as for an offline guest (idempotent). */
int guest_begin_handoff(Guest *g);
/* Record which files (device, inode) the running QEMU has open at its disks' paths: a handoff
 * opens a path QEMU reported only if it still is the file QEMU had open. */
void guest_pin_disks(Guest *g);
/* 1 and the (device, inode) of the regular file the guest's running QEMU has open under the name
 * path, and whether open for writing (that file then: what QEMU could change itself), 0 if it has
 * none (or is not running), <0 on error. */
int guest_qemu_has_open(Guest *g, const char *path, dev_t *ret_dev, ino_t *ret_ino, bool *ret_writable);
/* 1 if a process but the daemon has the file fd (ours, not O_PATH) is open on open: one that
 * holds QEMU's image locks on it (on any host that shares them), or one of this host's with an
 * fd on it that the daemon may look at (its pid in *ret_pid); 0 if none; < 0 on errors. */
int host_holds_open(int fd, pid_t *ret_pid);
/* 0 if every disk's top image, opened as the storage helper will open it, is the file pinned. */
int guest_check_pins(Guest *g);
/* A mirror's pivot record (disk.h): path, opened beneath an image directory, is the file (dev,
 * ino), and the guest's running QEMU has that file open under that name. */
bool guest_pivot_check(Guest *g, const char *path, uint64_t dev, uint64_t ino);
/* An offline guest's helper goes away once nothing needs it; outcomes of its jobs are told
 * once it is gone (the images' locks with it), or at once if other work keeps it. */
void guest_release_helper_if_idle(Guest *g);
/* Where an image given by a client or found in a header may live, and which files are
 * another guest's writable disks. */
char **guest_forbidden_images(Guest *g);
bool guest_has_active_job(Guest *g);
/* The guest as a record of state.h, written to <dir>/<name>.json (on disk when this returns
 * with wait; else queued to the engine's state writer, then, if given, called on the loop once
 * it is on disk: state_writer_put_then(), the guest its owner); its file removed; a guest
 * (unpublished, unlinked) made of a loaded record, whose contents it takes (guest-state.c). */
typedef struct StateGuest StateGuest;
int guest_write_state(Guest *g, const char *dir, bool wait, state_writer_then_t then, void *userdata,
        void (*destroy)(void *userdata));
int guest_remove_state(Guest *g, const char *dir);
int guest_from_state(Engine *m, StateGuest *s, Guest **ret);
/* The SELinux labels of the storage helper's identity (guest-peer.c); none where SELinux is off. */
int guest_storage_identity_labels(Guest *g);
/* Write the guest's state file; logs on failure. */
int guest_save(Guest *g);
/* The same, coalesced: at most one write per GUEST_SAVE_INTERVAL_USEC, whatever QEMU sends (a
 * job flapping between paused and running must not cost an fsync per event). For changes whose
 * loss in a crash costs nothing that the next connect does not recover from. */
void guest_save_later(Guest *g);
/* Written without waiting, for a next step that must follow the write: then(userdata) is called
 * on the loop once the file is on disk (at once if the guest is not published), destroy(userdata)
 * after it, or alone if the guest goes first. Always 0: a write that cannot be queued is done
 * before then is called. */
int guest_save_then(Guest *g, state_writer_then_t then, void *userdata, void (*destroy)(void *userdata));
/* Poll QEMU's jobs at 4 Hz while one runs. */
void guest_update_polling(Guest *g);
/* Re-read disks from QEMU; handler gets 0 or -errno (error text if QEMU said why). */
typedef void (*guest_refresh_handler_t)(Guest *g, int error, const char *error_desc, void *userdata);
int guest_refresh(Guest *g, guest_refresh_handler_t handler, void *userdata, void (*destroy)(void *));
/* What a disk needs of its guest (disk.h), for disk_new(). */
typedef struct DiskHost DiskHost;
extern const DiskHost guest_disk_host;

/* An offline guest at daemon start: its storage helper (and every job in it) died with the old
 * daemon. Jobs are reported failed, finished ones published. */
void guest_fail_orphaned_jobs(Guest *g);
int guest_ensure_runtime_dir(Guest *g);
/* Spawn one of our own helpers (a binary in HelperDirectory=) in the guest's sandbox through
 * helper_start(): data_fd becomes its fd 3, a SOCK_SEQPACKET control socket its fd 4 (our end in
 * *ret_control), its stderr goes to our log under log_prefix, *ret_child watches it and calls
 * on_exit(userdata). label: its SELinux exec label (NULL: none). */
int guest_spawn_helper(Guest *g, const char *binary, char *const *argv, int data_fd, const char *label,
        const char *log_prefix, sd_event_child_handler_t on_exit, void *userdata, pid_t *ret_pid,
        sd_event_source **ret_child, int *ret_control, HelperLog **ret_log);

/* guest-peer.c: the guest's side of its QMP peer. */
extern const PeerOwner guest_peer_owner;
extern const StorageSource guest_storage_source;
/* guest.c, for guest-peer.c */
void guest_emit_changed(Guest *g, const char *property);

