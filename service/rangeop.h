/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* What a range job (range.c) and an allocation map (map.c) share: an export of the disk (for a
 * range with a base, of a copy-on-read filter node over it) on the guest's private NBD server,
 * the sandboxed pull helper (blockstream-pull, libnbd) reading it, and, whatever ends the op,
 * the export and the filter removed again. What differs between the two comes through the op's
 * RangeOpKind. */

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <systemd/sd-bus.h>
#include <systemd/sd-event.h>

#include "control.h"
#include "job.h"
#include "peer.h"
#include "helper.h"
#include "util.h"

typedef struct Disk Disk;
typedef struct Guest Guest;
typedef struct Engine Engine;
typedef struct RangeOp RangeOp;

#define RANGE_EXTENTS_MAX 65536

/* What a kind of op does at each step; any may be NULL. */
typedef struct RangeOpKind {
        /* How its failure starts: "Cannot stream a range of disk" (then the alias and why). */
        const char *fail_text;
        /* The peer is ready, the export not yet added: > 0 if the op needs none of its own (it
         * went on with range_op_setup_done(), or ended). */
        int (*setup)(RangeOp *op, Disk *d);
        /* The helper is up. Returns 0 if the op ended, 1 otherwise. */
        int (*ready)(RangeOp *op, Disk *d);
        /* A progress report (parse_error: control_parse_pull()'s result). Returns as ready(). Without
         * it, progress reports are a protocol error. */
        int (*progress)(RangeOp *op, Disk *d, const ControlPullMessage *msg, int parse_error);
        /* The helper said it is done: true if the kind ends the op itself (after a check of its
         * own), false to have it completed now. */
        bool (*done)(RangeOp *op);
        /* The op ends, before its export is removed. */
        void (*end)(RangeOp *op);
        /* The export is gone: tell the outcome (d may be NULL: the disk went away). An op->call
         * left unanswered gets the failure. */
        void (*finish)(RangeOp *op, Disk *d);
} RangeOpKind;

typedef struct Extent {
        uint64_t offset, length;
        uint32_t depth;
        uint8_t kind;
} Extent;

struct RangeOp {
        const RangeOpKind *kind;
        unsigned n_ref; /* pending QMP calls hold one each: their replies may outlive the op */
        bool dead;      /* finished: replies find nothing to do */
        Engine *engine;
        RangeOp *next;
        Guest *guest;
        char *alias;
        bool map;
        uid_t caller;       /* who asked (a share per user: map.c, range_op_caller_may_start()); an op
                             * carried on after a restart: UID_INVALID */
        unsigned id;
        char *node;         /* copy-on-read filter (pull) */
        char *export_id;    /* also the export's name */
        char *export_node;  /* the node it exports */
        bool shared_export; /* a map on the disk's map_export: not ours to remove */
        char *bottom;
        uint64_t offset, length, bandwidth;  /* what the helper works on */
        unsigned parallel;                   /* its reads in flight (0: its default) */
        uint64_t asked_offset, asked_length; /* what the caller asked for (Offset/Length) */
        sd_bus_message *call;                /* Start or GetAllocationMap, until answered */

        unsigned pending; /* QEMU commands of the setup still unanswered */
        char *setup_error;
        bool node_added, export_added;

        pid_t pid;
        sd_event_source *child;
        int control_fd;
        sd_event_source *control_source;
        HelperPace control_pace; /* its messages but a map's extents */
        size_t n_extent_messages;
        HelperLog *log;
        bool ready, stop_requested, got_done;
        bool copied_all; /* its last progress report said all of the range was done */
        bool left_in_qemu; /* the QMP connection went with its filter or export in QEMU, which may
                            * live on: the disk's record of them stays for the reconnect's cleanup */
        bool resume, resume_paused; /* a range job of before a daemon restart, carried on */
        bool bandwidth_changed;     /* SetBandwidth before the helper was ready: tell it then */

        Extent *extents;
        size_t n_extents;

        bool ending;
        StreamState outcome;
        char *error;
        sd_event_source *cleanup_timer;
        sd_event_source *deadline; /* a map: MapTimeoutSec=; a range: until its helper is ready */

        PeerListener listener; /* on the guest's peer, while listed */
};

/* A user other than root runs at most this many range jobs (ranges and prefetches) at once: each
 * runs a pull helper, an export, a filter node, and for a guest that is not running its storage
 * helper (the guests of one owner, or anyone whom polkit lets stream every guest, could otherwise
 * use up the unit's tasks and memory). The caller of msg may start one more: 0 with its uid, or
 * LimitsExceeded. */
#define RANGE_JOBS_PER_CALLER_MAX 16
int range_op_caller_may_start(Engine *m, sd_bus_message *msg, uid_t *ret_caller, sd_bus_error *error);

RangeOp *range_op_ref(RangeOp *op);
RangeOp *range_op_unref(RangeOp *op);
void range_op_unref_void(void *p);
/* Done with it: out of the list, resources released; memory goes with the last reference. */
void range_op_kill(RangeOp *op);
/* The disk's running range op (not a map), if any. */
RangeOp *range_op_of_disk(Disk *d);
/* Whether d's range job (or prefetch's phase 1) has ended, its export and filter still going. */
bool range_op_ending_on(Disk *d);
/* A command to the pull helper (control.c builds it); number: the bandwidth's. */
int range_op_send(RangeOp *op, ControlCommandKind kind, uint64_t number);
/* The end: helper stopped, export and filter out of QEMU, then the outcome is told. */
void range_op_end(RangeOp *op, StreamState outcome, const char *error);
/* A new op on the list (map: the helper reads block status rather than the data); msg is
 * answered when it ends, or by the kind. */
int range_op_new(Disk *d, const RangeOpKind *kind, sd_bus_message *msg, bool map, uint64_t offset, uint64_t length,
        RangeOp **ret);
/* Set it up once the guest's peer is ready: export (and filter), then the helper. */
int range_op_start(RangeOp *op);
/* The export is in place: start the helper. */
void range_op_setup_done(RangeOp *op);
/* A RangeOpKind's progress for an op that runs the disk's job (a range, prefetch's phase 1): the
 * helper's report, checked against the op's length, goes to the job. */
int range_op_job_progress(RangeOp *op, Disk *d, const ControlPullMessage *msg, int parse_error);
