/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* The test plays QEMU: a Qmp client on one end of a socketpair, driven by the test's own
 * sd-event loop, and the "QEMU" end in the test's hands (raw bytes in and out, SCM_RIGHTS
 * collected). Every callback of the client is recorded in the Fake or in a FakeCall. */

#include <json-c/json.h>
#include <stdbool.h>
#include <systemd/sd-event.h>

#include "qmp.h"
#include "util.h"

#define FAKE_GREETING \
        "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 22, \"minor\": 2, \"major\": 7}, \"package\": \"\"}, " \
        "\"capabilities\": [\"oob\"]}}\r\n"

#define FAKE_FDS_MAX 64

typedef struct Fake Fake;

/* One qmp_call's fate. */
typedef struct FakeCall {
        Fake *fake;
        unsigned n_handler, n_destroy;
        unsigned order; /* the Fake's sequence number when the handler ran */
        int error;
        char *result; /* "return" value as JSON text */
        char *error_class, *error_desc;
        bool close_in_handler;    /* qmp_close_unref() from inside the handler */
        bool handler_after_close; /* the handler ran although the owner had closed the client */
} FakeCall;

struct Fake {
        sd_event *event;
        Qmp *q;
        int peer;

        /* What the client sent, and the fds that came with it. */
        char *rx;
        size_t rx_len, rx_cap, rx_consumed;
        int fds[FAKE_FDS_MAX];
        size_t fd_offset[FAKE_FDS_MAX]; /* rx offset of the first byte that carried it */
        size_t n_fds;
        bool peer_eof;

        /* on_state */
        unsigned n_ready, n_failed, n_state_after_close;
        int fail_error;
        bool close_on_ready, close_on_failure;
        FakeCall *call_on_ready; /* issue this call from inside on_state(0) */

        /* on_event */
        unsigned n_events, n_events_after_close;
        char *last_event;
        char *last_data;
        bool keep_events; /* record name and data of every event (off for floods) */
        bool close_on_event;
        unsigned pause_after_events; /* qmp_set_reading(false) from the handler of the event of that count */

        bool closed; /* the test (or a callback) called qmp_close_unref */
        unsigned seq;
};

int fake_new(Fake *f);
/* Same, but to a listening unix socket at path, reached the way the daemon reaches a guest's
 * QEMU: qmp_socket_open(), qmp_socket_connect(), qmp_new_from_fd(). */
int fake_new_connect(Fake *f, const char *path);
void fake_free(Fake *f);

/* Send raw bytes as QEMU, running the loop whenever the socket is full. -EPIPE/-ECONNRESET
 * once the client has hung up. */
int fake_send(Fake *f, const void *data, size_t len);
/* {"event": "X", "data": {"a": [{},{},... n objects, never ended (malloc'd; NULL on OOM); its
 * length in *ret_len. What a QEMU sends to hold the daemon's parser memory (qmp-cost.h). */
char *fake_unfinished_message(unsigned n, size_t *ret_len);
int fake_send_str(Fake *f, const char *s);
int fake_sendf(Fake *f, const char *format, ...) _printf_(2, 3);
void fake_hangup(Fake *f);

/* Run the loop (and collect what the client sends) for this long, or until cond is true. */
void fake_run(Fake *f, usec_t usec);
bool fake_run_until(Fake *f, bool (*cond)(Fake *f, void *arg), void *arg, usec_t timeout);
bool fake_wait_failed(Fake *f, usec_t timeout);
/* Wait until the client closed its end (the peer reads EOF). */
bool fake_wait_peer_eof(Fake *f, usec_t timeout);

/* The next complete command the client sent (NULL on timeout); the caller owns it. */
json_object *fake_next_command(Fake *f, usec_t timeout);
/* The id of a command, -1 if none. */
int64_t fake_command_id(json_object *cmd);
const char *fake_command_name(json_object *cmd);

/* Greeting, qmp_capabilities, and the client is ready. */
int fake_handshake(Fake *f);
/* {"return": <ret_json>, "id": <id of cmd>} */
int fake_reply(Fake *f, json_object *cmd, const char *ret_json);

/* qmp_call recording into c. */
int fake_call(Fake *f, FakeCall *c, const char *command, json_object *args, int fd);
void fake_call_done(FakeCall *c);
void fake_call_handler(
        Qmp *q, int error, json_object *result, const char *error_class, const char *error_desc, void *userdata);
void fake_call_destroy(void *userdata);

/* qmp_close_unref and remember it. */
void fake_close(Fake *f);

/* Resident set size of this process in bytes (0 if unknown). */
uint64_t fake_rss(void);
/* The peak of it since the last fake_peak_rss_reset() (VmHWM; 0 if unknown). */
int fake_peak_rss_reset(void);
uint64_t fake_peak_rss(void);

/* A fixture file under tests/unit/data, parsed. */
json_object *fake_load_json(const char *name);
char *fake_load_text(const char *name);
