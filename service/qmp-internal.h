/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* What qmp.c (the connection: calls, writes, timers, closing) and qmp-read.c (what QEMU sends:
 * messages cut, checked and dispatched; reading paused and resumed) share. */

#include <json-c/json.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <systemd/sd-event.h>

#include "qmp-cost.h"
#include "qmp-types.h"
#include "util.h"

#define QMP_LOG_MESSAGE_MAX 4096U

enum QmpState {
        QMP_GREETING,
        QMP_NEGOTIATING,
        QMP_READY,
        QMP_CLOSED,
};

typedef struct QmpCall {
        struct QmpCall *next;
        uint64_t id;
        char *command;
        char *data; /* serialized message until fully sent, then NULL */
        size_t size, sent;
        int fd;
        usec_t deadline; /* CLOCK_MONOTONIC, from submission */
        qmp_reply_handler_t handler;
        void *userdata;
        void (*destroy)(void *userdata);
} QmpCall;

struct Qmp {
        unsigned n_ref;
        sd_event *event;
        sd_event_source *io, *timer;
        int fd;
        enum QmpState state;
        json_tokener *tok;
        size_t msg_bytes;
        usec_t msg_deadline;         /* a message begun: its end must come by then (USEC_INFINITY: none) */
        QmpCharge charge;            /* its cost so far, in qmp-cost.c's budget */
        uint64_t last_cost;          /* the last whole message's, as the pre-scan estimated it */
        QmpScan scan;                /* the message json-c is being fed, pre-scanned */
        Utf8State utf8;              /* across reads: a character may straddle two */
        QmpCall *calls, *calls_tail; /* in submission order: unsent ones follow sent ones */
        unsigned n_calls;
        uint64_t next_id;
        uint64_t n_expired; /* sent calls given up on (no reply in time): as many late replies taken */
        QmpHandlers h;
        bool detached; /* the owner called qmp_close_unref(): no callback of any kind any more */
        bool draining; /* qmp_close_drained(): waiting for the last answers */
        qmp_drained_handler_t drained;
        void *drained_userdata;
        bool paused;   /* qmp_set_reading(false) */
        bool gone;     /* QEMU hung up: what it sent last is taken at once, paused or not */
        char *held;    /* read, and left while paused: fed first once reading resumes */
        size_t n_held;
        sd_event_source *resume; /* feeds them when reading resumes */
        usec_t timeout;
        usec_t setup_deadline;
        unsigned version;
};

void qmp_call_free(QmpCall *c);
/* The call of that id, unlinked from the list; NULL if none. */
QmpCall *qmp_unlink(Qmp *q, uint64_t id);
/* Queue a command, with no look at the state (the greeting's qmp_capabilities goes so). */
int qmp_enqueue(Qmp *q, const char *command, json_object *args, int fd, qmp_reply_handler_t handler,
        void *userdata, void (*destroy)(void *));
void qmp_fail(Qmp *q, int error);
/* The end of a qmp_close_drained(): close, tell, and drop the reference it took over. */
void qmp_drain_finish(Qmp *q, int error);
int qmp_update_timer(Qmp *q);

/* qmp-read.c. Feed bytes from QEMU (qmp_feed()); read what it sent, at most 256 KiB a wakeup
 * (hangup: it hung up: read on while paused); the handler of the defer source that feeds what was
 * held while reading was paused, once it resumes. */
int qmp_feed_bytes(Qmp *q, const char *buf, size_t len);
int qmp_read(Qmp *q, bool hangup);
int qmp_resume_handler(sd_event_source *s, void *userdata);
