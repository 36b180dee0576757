/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* An asynchronous QMP client on sd-event: the protocol only, no D-Bus and no knowledge of
 * what the commands mean (that is qemu.c).
 *
 * The peer is untrusted: a compromised guest may own its QEMU. Every message is bounded
 * (QMP_MESSAGE_MAX bytes, QMP_DEPTH_MAX nesting, QMP_MESSAGE_COST_MAX estimated heap, checked
 * by a lexical pre-scan before json-c builds anything), parsed strictly, and anything that is
 * not a well-formed greeting, reply or event closes the connection. */

#include <errno.h>
#include <json-c/json.h>
#include <stdbool.h>
#include <stdint.h>
#include <systemd/sd-event.h>

#include "qmp-cost.h"
#include "qmp-types.h"


/* Take over an already connected socket: a guest's QEMU reached through qmp-socket.h, the
 * storage helper's end of a socketpair. The returned object holds one reference. */
int qmp_new_from_fd(Qmp **ret, sd_event *e, int fd, const QmpHandlers *h);

/* Stop (false) or resume reading what QEMU sends: the owner's backpressure, when what QEMU's
 * messages cause (signals on the bus) piles up faster than it drains. Writing goes on. */
void qmp_set_reading(Qmp *q, bool reading);

/* Drop all handlers and pending callbacks (their destroy functions run), close the socket and
 * drop the caller's reference. Safe from inside any callback of the same object. */
Qmp *qmp_close_unref(Qmp *q);
static inline void qmp_close_unrefp(Qmp **q) {
        if (*q)
                qmp_close_unref(*q);
}

/* Let the calls already queued reach QEMU and be answered, then close and drop the caller's
 * reference. QEMU drops the commands it has read but not yet dispatched when its client goes
 * away, so a command that must take effect (nbd-server-stop when a guest is unregistered) needs
 * its answer before the close. The owner's handlers and the calls' callbacks are dropped at
 * once (their destroy functions run now). done (may be NULL) runs exactly once, possibly from
 * within this call: with 0 once every call was answered, -ETIMEDOUT when QEMU did not answer
 * within timeout, or another negative errno when the connection failed first. */
void qmp_close_drained(Qmp *q, uint64_t timeout, qmp_drained_handler_t done, void *userdata);

bool qmp_is_ready(Qmp *q);
/* Write what is queued now, as far as the socket takes it without blocking: for commands that
 * must reach QEMU before the connection is closed. */
void qmp_flush(Qmp *q);
void qmp_set_timeout(Qmp *q, uint64_t usec);
/* QEMU's version from the greeting, 0 before. major*10000 + minor*100 + micro. */
/* What the message a handler is called for costs, as the pre-scan estimated it (qmp-cost.h): one
 * who keeps its tree charges it to qmp_cost_charge(). */
uint64_t qmp_message_cost(Qmp *q);
unsigned qmp_qemu_version(Qmp *q);

/* Send a command. args (may be NULL) and fd (may be -1; passed with SCM_RIGHTS, for add-fd and
 * getfd) are always consumed. handler may be NULL. On success destroy(userdata) runs after
 * the handler ran or the call was dropped; on failure the caller keeps userdata. */
int qmp_call(Qmp *q, const char *command, json_object *args, int fd, qmp_reply_handler_t handler, void *userdata,
        void (*destroy)(void *userdata));

/* Parse-only entry point for tests and fuzzing: feed raw bytes as if read from the socket. */
int qmp_feed(Qmp *q, const char *buf, size_t len);
