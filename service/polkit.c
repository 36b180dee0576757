/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* Authorization, in the manner of systemd's bus_verify_polkit_async(): root passes at once;
 * anyone else is checked by polkitd with CheckAuthorization on the caller's unique bus name,
 * asynchronously, and the method call is dispatched again when the answer is in. Every error,
 * timeout or missing polkitd is a refusal. */

#include <pwd.h>

#include "manager.h"
#include "polkit.h"
#include "util.h"

#define POLKIT_TIMEOUT_USEC (25 * USEC_PER_SEC)
#define POLKIT_QUERIES_MAX 4096
/* dbus-daemon lets one connection wait for at most max_replies_per_connection replies (128 by
 * default, on the system bus too); more checks than that at once would be refused by the bus.
 * Keep well below it and queue the rest. */
#define POLKIT_IN_FLIGHT_MAX 64
/* An answer nobody picked up (the object vanished before the re-dispatch) is dropped after this. */
#define POLKIT_ANSWER_TTL_USEC (60 * USEC_PER_SEC)

struct PolkitQuery {
        PolkitQuery *next;
        Manager *manager;
        sd_bus_message *request; /* the method call being authorized */
        sd_bus_message *check;   /* the CheckAuthorization call, until sent (queued) */
        sd_bus_slot *slot;       /* the CheckAuthorization call, while pending */
        sd_bus_track *track;     /* the caller: if it leaves the bus meanwhile, its call is dropped */
        char *action;
        bool answered;
        usec_t answered_at;
        int result;          /* 1 allowed, or a negative errno */
        sd_bus_error error;  /* why not */
};

static PolkitQuery *polkit_query_free(PolkitQuery *q) {
        if (!q)
                return NULL;
        sd_bus_slot_unref(q->slot);
        sd_bus_track_unref(q->track);
        sd_bus_message_unref(q->check);
        sd_bus_message_unref(q->request);
        sd_bus_error_free(&q->error);
        free(q->action);
        free(q);
        return NULL;
}

static void registry_remove(Manager *m, PolkitQuery *q) {
        for (PolkitQuery **p = &m->polkit_queries; *p; p = &(*p)->next)
                if (*p == q) {
                        *p = q->next;
                        return;
                }
}

void polkit_registry_free(Manager *m) {
        while (m->polkit_queries) {
                PolkitQuery *q = m->polkit_queries;
                m->polkit_queries = q->next;
                polkit_query_free(q);
        }
}

static void registry_expire(Manager *m) {
        usec_t now = now_usec(CLOCK_MONOTONIC);

        for (PolkitQuery **p = &m->polkit_queries; *p;) {
                PolkitQuery *q = *p;
                if (q->answered && now - q->answered_at > POLKIT_ANSWER_TTL_USEC) {
                        *p = q->next;
                        polkit_query_free(q);
                } else
                        p = &q->next;
        }
}

static int check_reply(sd_bus_message *reply, void *userdata, sd_bus_error *ret_error);

static unsigned in_flight(Manager *m) {
        unsigned n = 0;
        for (PolkitQuery *q = m->polkit_queries; q; q = q->next)
                if (q->slot)
                        n++;
        return n;
}

/* Send queued checks, oldest first, while there is room. */
static void registry_dispatch(Manager *m) {
        unsigned n = in_flight(m);
        PolkitQuery *order[POLKIT_IN_FLIGHT_MAX];
        size_t k = 0;

        if (n >= POLKIT_IN_FLIGHT_MAX)
                return;
        /* The list is newest first: collect the oldest queued ones. */
        for (PolkitQuery *q = m->polkit_queries; q; q = q->next)
                if (q->check && !q->slot) {
                        if (k < ELEMENTSOF(order))
                                order[k++] = q;
                        else {
                                memmove(order, order + 1, (ELEMENTSOF(order) - 1) * sizeof(order[0]));
                                order[ELEMENTSOF(order) - 1] = q;
                        }
                }
        for (size_t i = k; i > 0 && n < POLKIT_IN_FLIGHT_MAX; i--) {
                PolkitQuery *q = order[i - 1];
                int r = sd_bus_call_async(m->bus, &q->slot, q->check, check_reply, q, POLKIT_TIMEOUT_USEC);
                if (r < 0) {
                        log_warning_errno(r, "Failed to ask polkit: %m");
                        continue; /* stays queued; retried with the next answer */
                }
                q->check = sd_bus_message_unref(q->check);
                n++;
        }
}

static unsigned registry_size(Manager *m) {
        unsigned n = 0;
        for (PolkitQuery *q = m->polkit_queries; q; q = q->next)
                n++;
        return n;
}

/* The caller left before polkit answered: whatever the answer, nobody asked any more, and
 * acting on the call would leave a change behind for no one. */
static int caller_gone(sd_bus_track *t, void *userdata) {
        PolkitQuery *q = userdata;
        Manager *m = q->manager;

        log_debug("Caller of an authorization for %s left the bus; dropping its call.", q->action);
        registry_remove(m, q);
        polkit_query_free(q);
        registry_dispatch(m);
        return 0;
}

static int check_reply(sd_bus_message *reply, void *userdata, sd_bus_error *ret_error) {
        PolkitQuery *q = userdata;
        Manager *m = q->manager;
        const sd_bus_error *e;
        int authorized, challenge, r;

        q->slot = sd_bus_slot_unref(q->slot);
        q->track = sd_bus_track_unref(q->track);
        q->answered = true;
        q->answered_at = now_usec(CLOCK_MONOTONIC);
        registry_dispatch(m);

        e = sd_bus_message_get_error(reply);
        if (e) {
                log_debug("polkit check for %s failed: %s: %s", q->action, e->name, strempty(e->message));
                q->result = sd_bus_error_setf(&q->error, SD_BUS_ERROR_ACCESS_DENIED,
                        "Access denied: could not check authorization for %s with polkit (%s).", q->action,
                        strempty(e->message));
        } else {
                r = sd_bus_message_enter_container(reply, 'r', "bba{ss}");
                if (r >= 0)
                        r = sd_bus_message_read(reply, "bb", &authorized, &challenge);
                if (r < 0)
                        q->result = sd_bus_error_setf(&q->error, SD_BUS_ERROR_ACCESS_DENIED,
                                "Access denied: polkit sent a malformed answer for %s.", q->action);
                else if (authorized)
                        q->result = 1;
                else if (challenge)
                        q->result = sd_bus_error_setf(&q->error, SD_BUS_ERROR_INTERACTIVE_AUTHORIZATION_REQUIRED,
                                "Interactive authentication is required for %s; allow interactive authorization "
                                "(blockstreamctl asks on a terminal) or ask an administrator.",
                                q->action);
                else
                        q->result = sd_bus_error_setf(&q->error, SD_BUS_ERROR_ACCESS_DENIED,
                                "Access denied: polkit does not allow %s for you.", q->action);
        }

        /* Dispatch the original call again: its handler finds this answer. */
        r = sd_bus_message_rewind(q->request, true);
        if (r >= 0)
                r = sd_bus_enqueue_for_read(sd_bus_message_get_bus(q->request), q->request);
        if (r < 0) {
                log_error_errno(r, "Failed to re-dispatch an authorized call: %m");
                (void) sd_bus_reply_method_errorf(q->request, SD_BUS_ERROR_FAILED, "Internal error after authorization.");
                registry_remove(m, q);
                polkit_query_free(q);
        }
        return 0;
}

static int owner_name(uid_t uid, char *buf, size_t size) {
        struct passwd pw, *result = NULL;
        char tmp[4096];

        if (uid == (uid_t) -1)
                return snprintf(buf, size, "%s", ""), 0;
        if (getpwuid_r(uid, &pw, tmp, sizeof(tmp), &result) == 0 && result)
                snprintf(buf, size, "%s", result->pw_name);
        else
                snprintf(buf, size, UID_FMT, (uint32_t) uid);
        return 0;
}

int bus_authorize(Manager *m, sd_bus_message *msg, const char *action, const AuthDetails *details,
        sd_bus_error *error) {
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *call = NULL;
        PolkitQuery *q;
        char owner[256];
        const char *sender;
        unsigned flags = 0;
        int r;

        /* The answer to an earlier question about this very message? */
        for (q = m->polkit_queries; q; q = q->next)
                if (q->request == msg && streq(q->action, action))
                        break;
        if (q) {
                if (!q->answered)
                        return 0; /* still thinking: should not be dispatched yet */
                registry_remove(m, q);
                r = q->result;
                if (r < 0)
                        sd_bus_error_move(error, &q->error);
                polkit_query_free(q);
                return r;
        }

        /* Root passes without asking. */
        r = sd_bus_query_sender_privilege(msg, -1);
        if (r < 0)
                return r;
        if (r > 0)
                return 1;

        registry_expire(m);
        if (registry_size(m) >= POLKIT_QUERIES_MAX)
                return sd_bus_error_setf(error, SD_BUS_ERROR_ACCESS_DENIED,
                        "Access denied: too many authorizations pending, try again later.");

        sender = sd_bus_message_get_sender(msg);
        if (!sender)
                return sd_bus_error_setf(error, SD_BUS_ERROR_ACCESS_DENIED, "Access denied: caller has no bus name.");
        if (sd_bus_message_get_allow_interactive_authorization(msg) > 0)
                flags |= 1; /* AllowUserInteraction */
        owner_name(details ? details->owner : (uid_t) -1, owner, sizeof(owner));

        r = sd_bus_message_new_method_call(m->bus, &call, "org.freedesktop.PolicyKit1", "/org/freedesktop/PolicyKit1/Authority",
                "org.freedesktop.PolicyKit1.Authority", "CheckAuthorization");
        if (r < 0)
                return r;
        r = sd_bus_message_append(call, "(sa{sv})s", "system-bus-name", 1, "name", "s", sender, action);
        if (r < 0)
                return r;
        r = sd_bus_message_open_container(call, 'a', "{ss}");
        if (r < 0)
                return r;
        if (details && details->guest) {
                r = sd_bus_message_append(call, "{ss}", "guest", details->guest);
                if (r >= 0 && details->disk)
                        r = sd_bus_message_append(call, "{ss}", "disk", details->disk);
                if (r >= 0 && !isempty(owner))
                        r = sd_bus_message_append(call, "{ss}", "owner", owner);
                if (r < 0)
                        return r;
        }
        r = sd_bus_message_close_container(call);
        if (r < 0)
                return r;
        r = sd_bus_message_append(call, "us", flags, "");
        if (r < 0)
                return r;

        q = calloc(1, sizeof(PolkitQuery));
        if (!q)
                return -ENOMEM;
        q->manager = m;
        q->request = sd_bus_message_ref(msg);
        q->action = strdup(action);
        if (!q->action) {
                polkit_query_free(q);
                return -ENOMEM;
        }
        r = sd_bus_track_new(m->bus, &q->track, caller_gone, q);
        if (r >= 0)
                r = sd_bus_track_add_name(q->track, sender);
        if (r < 0) {
                polkit_query_free(q);
                return r;
        }
        q->check = TAKE_PTR(call);
        q->next = m->polkit_queries;
        m->polkit_queries = q;
        registry_dispatch(m);
        return 0;
}
