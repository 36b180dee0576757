/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* The QMP client's types (qmp.h): the object, its handlers, and the small helpers its users and
 * its own parts (qmp.c, qmp-read.c) share. */

#include <errno.h>
#include <json-c/json.h>
#include <stdbool.h>

/* The bytes of one message. The largest reply we ask for, query-named-block-nodes (flat) of
 * 256 disks with 3-image chains (1536 nodes of ~700 bytes), is about 1.1 MiB; 4 MiB leaves room. */
#define QMP_MESSAGE_MAX (4U * 1024U * 1024U)
#define QMP_DEPTH_MAX 256 /* backing chains nest two levels per image */
#define QMP_TIMEOUT_DEFAULT_USEC (60ULL * 1000000ULL)
#define QMP_PENDING_MAX 1024

typedef struct Qmp Qmp;

Qmp *qmp_ref(Qmp *q);
Qmp *qmp_unref(Qmp *q);

/* The errors with which the client closes a connection whose peer broke the protocol (bad JSON,
 * over a bound, not QMP), as opposed to one that went away. */
static inline bool qmp_error_is_protocol(int error) {
        return error == -EPROTO || error == -EBADMSG || error == -EMSGSIZE || error == -E2BIG;
}

static inline void json_object_putp(json_object **o) {
        if (*o)
                json_object_put(*o);
}

/* A reply. error == 0: "result" is the command's "return" value (borrowed, valid during the
 * call). error == -EREMOTEIO: QEMU refused; error_desc holds QEMU's "desc" text (bounded,
 * printable) and error_class its "class". Any other negative errno: the command never got an
 * answer (-ECONNRESET: connection lost, -ETIMEDOUT, -ECANCELED: client closed). */
typedef void (*qmp_reply_handler_t)(Qmp *q, int error, json_object *result, const char *error_class,
        const char *error_desc, void *userdata);

/* An event: name and its "data" object (borrowed; an empty object if QEMU sent none). */
typedef void (*qmp_event_handler_t)(Qmp *q, const char *event, json_object *data, void *userdata);

/* The connection's fate: error == 0 once the greeting and qmp_capabilities went through
 * (the client is ready), a negative errno once when it is gone; after that nothing else is
 * called. */
typedef void (*qmp_state_handler_t)(Qmp *q, int error, void *userdata);

typedef struct QmpHandlers {
        qmp_state_handler_t on_state;
        qmp_event_handler_t on_event;
        void *userdata;
} QmpHandlers;

/* qmp_close_drained()'s end: 0 once every call was answered, else why not. */
typedef void (*qmp_drained_handler_t)(int error, void *userdata);
