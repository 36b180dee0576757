/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* What QEMU sends (qmp-internal.h): read in bounded amounts, checked as UTF-8, cut into messages by
 * the pre-scan (qmp-cost.h) and json-c, and dispatched as the greeting, replies or events; what is
 * left of a read when an event's handler pauses reading is held until it resumes. */

#include <ctype.h>
#include <inttypes.h>
#include <sys/socket.h>

#include "qmp-internal.h"

static int qmp_protocol_error(Qmp *q, const char *what) {
        log_warning("QMP: protocol violation (%s), closing the connection.", what);
        return -EPROTO;
}

static int qmp_handle_greeting(Qmp *q, json_object *msg);

static void qmp_capabilities_reply(Qmp *q, int error, json_object *result, const char *error_class,
        const char *error_desc, void *userdata) {
        if (error < 0) {
                log_warning("QMP: qmp_capabilities failed: %s", error == -EREMOTEIO ? error_desc : strerror(-error));
                qmp_fail(q, error == -EREMOTEIO ? -EPROTO : error);
                return;
        }
        q->state = QMP_READY;
        q->setup_deadline = USEC_INFINITY;
        (void) qmp_update_timer(q);
        if (q->h.on_state)
                q->h.on_state(q, 0, q->h.userdata);
}

static int qmp_handle_greeting(Qmp *q, json_object *msg) {
        json_object *greeting, *version, *qemu, *v;
        int64_t parts[3] = {};
        const char *keys[3] = { "major", "minor", "micro" };

        if (!json_object_object_get_ex(msg, "QMP", &greeting) || !json_object_is_type(greeting, json_type_object))
                return qmp_protocol_error(q, "first message is not a QMP greeting");
        if (json_object_object_get_ex(greeting, "version", &version) &&
                json_object_is_type(version, json_type_object) &&
                json_object_object_get_ex(version, "qemu", &qemu) && json_object_is_type(qemu, json_type_object)) {
                for (size_t i = 0; i < 3; i++)
                        if (json_object_object_get_ex(qemu, keys[i], &v) && json_object_is_type(v, json_type_int)) {
                                parts[i] = json_object_get_int64(v);
                                if (parts[i] < 0 || parts[i] > 99)
                                        parts[i] = 0;
                        }
                q->version = (unsigned) (parts[0] * 10000 + parts[1] * 100 + parts[2]);
        }
        q->state = QMP_NEGOTIATING;
        return qmp_enqueue(q, "qmp_capabilities", NULL, -1, qmp_capabilities_reply, NULL, NULL);
}

static int qmp_handle_reply(Qmp *q, json_object *msg, json_object *ret, json_object *err) {
        json_object *id, *cls = NULL, *desc = NULL;
        char class_buf[64], desc_buf[512];
        QmpCall *c;
        int64_t n;

        if (!json_object_object_get_ex(msg, "id", &id) || !json_object_is_type(id, json_type_int))
                return qmp_protocol_error(q, "reply without a valid id");
        n = json_object_get_int64(id);
        if (n < 0)
                return qmp_protocol_error(q, "reply with a negative id");
        if (err) {
                if (!json_object_is_type(err, json_type_object) ||
                        !json_object_object_get_ex(err, "class", &cls) || !json_object_is_type(cls, json_type_string) ||
                        !json_object_object_get_ex(err, "desc", &desc) || !json_object_is_type(desc, json_type_string))
                        return qmp_protocol_error(q, "malformed error reply");
        }

        c = qmp_unlink(q, (uint64_t) n);
        if (!c) {
                /* A late reply to a call that timed out is taken (and dropped), once for each such
                 * call; any other costs a QEMU nothing to send and the daemon a parse each, as fast
                 * as it reads: invented ids and second replies end the connection. */
                if ((uint64_t) n >= q->next_id)
                        return qmp_protocol_error(q, "reply to a command never sent");
                if (q->n_expired == 0)
                        return qmp_protocol_error(q, "reply to a command already answered");
                q->n_expired--;
                log_debug("QMP: late reply to id %" PRIi64 " ignored.", n);
                return 0;
        }
        if (c->handler) {
                if (err) {
                        /* QEMU's text ends up in D-Bus error messages and logs. */
                        (void) text_sanitize_buf(class_buf, sizeof(class_buf), json_object_get_string(cls),
                                (size_t) json_object_get_string_len(cls));
                        (void) text_sanitize_buf(desc_buf, sizeof(desc_buf), json_object_get_string(desc),
                                (size_t) json_object_get_string_len(desc));
                        c->handler(q, -EREMOTEIO, NULL, class_buf, desc_buf, c->userdata);
                } else
                        c->handler(q, 0, ret, NULL, NULL, c->userdata);
        }
        qmp_call_free(c);
        if (q->draining && !q->calls)
                qmp_drain_finish(q, 0);
        return 0;
}

/* QEMU's event names are upper case words ("BLOCK_JOB_COMPLETED"); they reach logs. */
static bool event_name_is_valid(const char *s) {
        if (!*s)
                return false;
        for (; *s; s++)
                if (!(isascii((unsigned char) *s) && (isalnum((unsigned char) *s) || *s == '_' || *s == '-')))
                        return false;
        return true;
}

static int qmp_dispatch(Qmp *q, json_object *msg) {
        json_object *ret = NULL, *err = NULL, *ev;

        if (!json_object_is_type(msg, json_type_object))
                return qmp_protocol_error(q, "message is not a JSON object");

        if (q->state == QMP_GREETING)
                return qmp_handle_greeting(q, msg);

        if (json_object_object_get_ex(msg, "event", &ev)) {
                json_object *data = NULL;
                const char *name;

                if (!json_object_is_type(ev, json_type_string))
                        return qmp_protocol_error(q, "event name is not a string");
                name = json_object_get_string(ev);
                if ((size_t) json_object_get_string_len(ev) != strlen(name) || strlen(name) > 128 ||
                        !event_name_is_valid(name))
                        return qmp_protocol_error(q, "bad event name");
                if (json_object_object_get_ex(msg, "data", &data) && !json_object_is_type(data, json_type_object))
                        return qmp_protocol_error(q, "event data is not an object");
                if (q->state != QMP_READY || !q->h.on_event)
                        return 0;
                if (!data) {
                        _cleanup_(json_object_putp) json_object *empty = json_object_new_object();
                        if (!empty)
                                return -ENOMEM;
                        q->h.on_event(q, name, empty, q->h.userdata);
                } else
                        q->h.on_event(q, name, data, q->h.userdata);
                return 0;
        }

        json_object_object_get_ex(msg, "return", &ret);
        json_object_object_get_ex(msg, "error", &err);
        if ((ret != NULL) == (err != NULL)) {
                /* "return": null would give ret == NULL with the key present: treat as protocol error too. */
                return qmp_protocol_error(q, "message is neither a reply nor an event");
        }
        return qmp_handle_reply(q, msg, ret, err);
}

/* The messages in these bytes, one after the other, as long as reading is not paused: the rest is
 * held until it resumes (an event's handler pauses it to pace a QEMU, and a read holds ~900). */
static int qmp_parse(Qmp *q, const char *buf, size_t len, int r) {
        qmp_ref(q);
        if (q->charge.evicted && r >= 0)
                r = -E2BIG; /* its message gave way to others (qmp_evict()): nothing more of it */
        while (len > 0 && q->state != QMP_CLOSED && r >= 0) {
                _cleanup_(json_object_putp) json_object *msg = NULL;
                enum json_tokener_error jerr;
                size_t chunk, used, size;

                if (q->msg_bytes == 0) {
                        /* Whitespace between messages does not count towards a message. */
                        while (len > 0 && (*buf == ' ' || *buf == '\r' || *buf == '\n' || *buf == '\t')) {
                                buf++;
                                len--;
                        }
                        if (len == 0)
                                break;
                }

                /* Never hand the tokener more than one byte beyond the cap, nor a byte of a
                 * message whose tree would cost more than the budget. */
                chunk = MIN(len, (size_t) QMP_MESSAGE_MAX + 1 - q->msg_bytes);
                if (qmp_scan(&q->scan, buf, chunk, &chunk) == QMP_SCAN_OVER) {
                        log_warning("QMP: message from QEMU would take more than %u MiB of memory to parse; "
                                    "closing the connection.",
                                QMP_MESSAGE_COST_MAX >> 20);
                        r = -E2BIG;
                        break;
                }
                msg = json_tokener_parse_ex(q->tok, buf, (int) chunk);
                jerr = json_tokener_get_error(q->tok);
                if (!msg) {
                        if (jerr != json_tokener_continue) {
                                log_warning("QMP: malformed JSON from QEMU: %s", json_tokener_error_desc(jerr));
                                r = -EBADMSG;
                                break;
                        }
                        q->msg_bytes += chunk;
                        buf += chunk;
                        len -= chunk;
                        if (!qmp_cost_may_hold(&q->charge, q->scan.cost)) {
                                log_warning("QMP: QEMU's message begun, and those of other QEMUs, would take more than "
                                            "%u MiB of memory to hold; closing the connection.",
                                        QMP_UNFINISHED_COST_MAX >> 20);
                                r = -E2BIG;
                                break;
                        }
                        qmp_cost_charge(&q->charge, q->scan.cost);
                        /* json-c holds what it built of it meanwhile: the rest comes in time. */
                        if (q->msg_deadline == USEC_INFINITY) {
                                usec_t now = now_usec(CLOCK_MONOTONIC);
                                q->msg_deadline = q->timeout > USEC_INFINITY - now ? USEC_INFINITY : now + q->timeout;
                        }
                        if (q->msg_bytes > QMP_MESSAGE_MAX) {
                                log_warning("QMP: message from QEMU exceeds %u bytes.", QMP_MESSAGE_MAX);
                                r = -EMSGSIZE;
                                break;
                        }
                        continue;
                }

                used = (size_t) json_tokener_get_parse_end(q->tok);
                if (used == 0 || used > chunk) {
                        r = -EBADMSG;
                        break;
                }
                buf += used;
                len -= used;
                size = q->msg_bytes + used;
                q->msg_bytes = 0;
                q->msg_deadline = USEC_INFINITY;
                qmp_cost_charge(&q->charge, 0);
                q->last_cost = q->scan.cost;
                q->scan = (QmpScan) {};
                json_tokener_reset(q->tok);

                /* Serializing a big reply again to log its first bytes cost more than parsing it. */
                if (log_get_max_level() >= LOG_LEVEL_DEBUG) {
                        if (size <= QMP_LOG_MESSAGE_MAX)
                                log_debug("QMP <- %.300s", json_object_to_json_string_ext(msg, JSON_C_TO_STRING_PLAIN));
                        else
                                log_debug("QMP <- (a message of %zu bytes)", size);
                }
                r = qmp_dispatch(q, msg);
                if (r < 0)
                        break;
                if (q->paused && !q->gone && len > 0 && q->state != QMP_CLOSED) {
                        q->held = malloc(len);
                        if (!q->held) {
                                r = -ENOMEM;
                                break;
                        }
                        memcpy(q->held, buf, len);
                        q->n_held = len;
                        break;
                }
        }
        if (r < 0 && q->state != QMP_CLOSED)
                qmp_fail(q, r);
        qmp_unref(q);
        return r;
}

int qmp_feed_bytes(Qmp *q, const char *buf, size_t len) {
        int r = 0;

        if (!utf8_feed(&q->utf8, buf, len)) {
                log_warning("QMP: QEMU sent bytes that are not UTF-8.");
                r = -EBADMSG;
        }
        return qmp_parse(q, buf, len, r);
}

/* What was held while reading was paused, before anything read since. */
static int qmp_feed_held(Qmp *q) {
        _cleanup_free_ char *held = TAKE_PTR(q->held);
        size_t n = q->n_held;

        q->n_held = 0;
        return held ? qmp_parse(q, held, n, 0) : 0;
}

int qmp_resume_handler(sd_event_source *s, void *userdata) {
        Qmp *q = userdata;

        qmp_ref(q);
        if (!q->paused && q->state != QMP_CLOSED && qmp_feed_held(q) >= 0 && q->state != QMP_CLOSED)
                (void) qmp_update_timer(q);
        qmp_unref(q);
        return 0;
}

int qmp_read(Qmp *q, bool hangup) {
        char buf[65536];

        q->gone |= hangup;
        if (q->held && (!q->paused || hangup) && qmp_feed_held(q) < 0)
                return 0; /* qmp_parse() already failed the connection */
        if (q->held)
                return 0; /* still paused: what comes next waits behind them */
        /* Bounded work per wakeup so that an event flood cannot starve other clients. */
        for (unsigned i = 0; i < 4 && q->state != QMP_CLOSED && (!q->paused || hangup); i++) {
                ssize_t k = recv(q->fd, buf, sizeof(buf), MSG_DONTWAIT);
                if (k < 0) {
                        if (errno == EAGAIN || errno == EINTR)
                                return 0;
                        return -errno;
                }
                if (k == 0) {
                        log_debug("QMP: QEMU closed the connection.");
                        return -ECONNRESET;
                }
                if (qmp_feed_bytes(q, buf, (size_t) k) < 0)
                        return 0; /* qmp_parse() already failed the connection */
        }
        return 0;
}
