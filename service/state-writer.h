/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* Writing state files off the event loop. A durable write is two fsyncs (the file, then its
 * directory); on a disk that QEMUs are filling they take tens of milliseconds each, and with
 * many guests saving at the start or end of their jobs the loop stalled for seconds while every
 * D-Bus call waited. One writer thread does those writes in the order they were asked for.
 *
 * Only the event loop's thread calls in. A write asked for again before the thread got to it is
 * done once, with the latest data; a removal supersedes a queued write of the same path. A
 * caller that must know the file is on disk before it goes on (the order matters to a restart)
 * asks to wait: its write then happens in its own thread, after whatever the writer was doing
 * to that path, and replaces what was queued for it.
 *
 * A write that fails (a full or failing disk) is tried again, after 0.1 s doubling up to 10 s,
 * until it lands or a later put of its path lands; the writes after it wait, in order, and so
 * does every continuation (below) of it or of them. A caller who waited hears of the failure and
 * its write is still tried again. Only state_writer_free() gives up (one last try). */

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>
#include <systemd/sd-event.h>

typedef struct StateWriter StateWriter;

/* Starts the thread. */
int state_writer_new(StateWriter **ret);

/* Does what is queued (what fails, once more), then stops the thread. */
StateWriter *state_writer_free(StateWriter *w);

/* Write data (len bytes; taken, freed by the writer) to path atomically with mode, or remove path
 * (data NULL). wait: done before returning, and the result returned; otherwise queued and 0
 * returned. A failure is logged, and tried again (above). w NULL: done at once, as with wait. */
int state_writer_put(StateWriter *w, const char *path, char *data, size_t len, mode_t mode, bool wait);

/* Waits until everything queued so far is done (on disk). */
void state_writer_flush(StateWriter *w);

/* Continuations on the event loop: a caller whose next step must follow the write (a job
 * dismissed in QEMU only once its outcome is on disk, Finished only once it is recorded as sent)
 * queues the write and goes on in fn, called on e's loop once the write (or a later one of the
 * same path) is on disk; never before (a failed write is tried again). Then destroy, also
 * when fn is never called: state_writer_forget(owner), or state_writer_free(). */
typedef void (*state_writer_then_t)(void *userdata);
int state_writer_attach(StateWriter *w, sd_event *e);
/* Takes data. Without w or before attach: written and fn called before this returns. On error
 * (-ENOMEM) nothing was queued, fn is not called and userdata stays the caller's. */
int state_writer_put_then(StateWriter *w, const char *path, char *data, size_t len, mode_t mode, void *owner,
        state_writer_then_t fn, void *userdata, void (*destroy)(void *userdata));
/* Drops owner's continuations (destroy, not fn): owner goes away. */
void state_writer_forget(StateWriter *w, void *owner);
