/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* Authorization, in the manner of systemd's bus_verify_polkit_async(): root passes at once;
 * anyone else is checked by polkitd with CheckAuthorization on the caller's unique bus name,
 * asynchronously, and the method call is dispatched again when the answer is in. Every error,
 * timeout or missing polkitd is a refusal. */

#include <limits.h>
#include <pwd.h>

#include "bus-util.h"
#include "polkit.h"
#include "util.h"

#define POLKIT_TIMEOUT_USEC (25 * USEC_PER_SEC)
/* Every waiting call pins its whole request message, and one that polkit keeps thinking about
 * (an authentication agent that never answers) holds its place for POLKIT_TIMEOUT_USEC. So the
 * places are shared out: per connection, per user (a user opens as many connections as the bus
 * lets them), and in all, each in calls and in bytes pinned. The per-user bound is well above
 * what a busy client needs (a GUI managing many guests: tests/integration/test_polkit.py sends
 * 160 calls at once from one user over 4 connections) and far below what would keep other users
 * out: it takes 16 users at their limit to fill the whole registry. */
#define POLKIT_QUERIES_MAX 4096
#define POLKIT_QUERIES_PER_CONNECTION_MAX 64
#define POLKIT_QUERIES_PER_USER_MAX 256
#define POLKIT_BYTES_MAX (64U * 1024 * 1024)
#define POLKIT_BYTES_PER_USER_MAX (4U * 1024 * 1024)
/* What one waiting call may pin: its arguments, walked before it is queued (PATH_MAX per
 * string, REQUEST_VALUES_MAX values, REQUEST_BYTES_MAX in all), plus the message's own upkeep. */
#define REQUEST_VALUES_MAX 1024
#define REQUEST_BYTES_MAX (128U * 1024)
#define REQUEST_OVERHEAD 1024
/* dbus-daemon lets one connection wait for at most max_replies_per_connection replies (128 by
 * default, on the system bus too); more checks than that at once would be refused by the bus.
 * Keep well below it and queue the rest. */
#define POLKIT_IN_FLIGHT_MAX 64
/* Every user may have this many checks in flight at once; more only while fewer than
 * POLKIT_IN_FLIGHT_SHARED_MAX are in flight in all, so that the rest of the places stay for
 * users below their share: a busy user gets its answers quickly, and one whose checks polkit
 * keeps pending (an agent that never answers) cannot hold the places others need. */
#define POLKIT_IN_FLIGHT_PER_USER_MAX 4
#define POLKIT_IN_FLIGHT_SHARED_MAX 32
/* An answer nobody picked up (the object vanished before the re-dispatch) is dropped after this. */
#define POLKIT_ANSWER_TTL_USEC (60 * USEC_PER_SEC)

typedef struct PolkitQuery PolkitQuery;

struct PolkitRegistry {
        sd_bus *bus;
        PolkitQuery *queries; /* outstanding CheckAuthorization calls, and answers not yet picked up */
        sd_bus_slot *match;   /* callers leaving the bus */
};

struct PolkitQuery {
        PolkitQuery *next;
        PolkitRegistry *registry;
        sd_bus_message *request; /* the method call being authorized */
        sd_bus_message *check;   /* the CheckAuthorization call, until sent (queued) */
        sd_bus_slot *slot;       /* the CheckAuthorization call, while pending */
        char *action;
        char *details;           /* what was asked about (details_key()): an answer is for it only */
        char *sender;            /* the caller's unique name: if it leaves the bus before the
                                  * answer, the call is dropped (name_owner_changed) */
        uid_t uid;               /* the caller's uid */
        size_t weight;           /* bytes the request pins, as counted by request_weight() */
        bool answered;
        usec_t answered_at;
        int result;          /* 1 allowed, or a negative errno */
        sd_bus_error error;  /* why not */
};

static PolkitQuery *polkit_query_free(PolkitQuery *q) {
        if (!q)
                return NULL;
        sd_bus_slot_unref(q->slot);
        sd_bus_message_unref(q->check);
        sd_bus_message_unref(q->request);
        sd_bus_error_free(&q->error);
        free(q->action);
        free(q->details);
        free(q->sender);
        free(q);
        return NULL;
}

/* The details of a check as one string: guest, disk and owner uid. */
static char *details_key(const AuthDetails *details) {
        if (!details)
                return strdup("");
        return strdup_printf("%s\x1f%s\x1f" UID_FMT, strempty(details->guest), strempty(details->disk),
                (uint32_t) details->owner);
}

static void registry_remove(PolkitRegistry *m, PolkitQuery *q) {
        for (PolkitQuery **p = &m->queries; *p; p = &(*p)->next)
                if (*p == q) {
                        *p = q->next;
                        return;
                }
}


int polkit_registry_new(PolkitRegistry **ret, sd_bus *bus) {
        PolkitRegistry *m = calloc(1, sizeof(PolkitRegistry));

        if (!m)
                return -ENOMEM;
        m->bus = sd_bus_ref(bus);
        *ret = m;
        return 0;
}

PolkitRegistry *polkit_registry_free(PolkitRegistry *m) {
        if (!m)
                return NULL;
        while (m->queries) {
                PolkitQuery *q = m->queries;
                m->queries = q->next;
                polkit_query_free(q);
        }
        sd_bus_slot_unref(m->match);
        sd_bus_unref(m->bus);
        free(m);
        return NULL;
}

static void registry_expire(PolkitRegistry *m) {
        usec_t now = now_usec(CLOCK_MONOTONIC);

        for (PolkitQuery **p = &m->queries; *p;) {
                PolkitQuery *q = *p;
                if (q->answered && now - q->answered_at > POLKIT_ANSWER_TTL_USEC) {
                        *p = q->next;
                        polkit_query_free(q);
                } else
                        p = &q->next;
        }
}

static int check_reply(sd_bus_message *reply, void *userdata, sd_bus_error *ret_error);

/* Send queued checks, oldest first, while there is room: in all (dbus-daemon's limit), and for
 * each user (see POLKIT_IN_FLIGHT_SHARED_MAX). */
static void registry_dispatch(PolkitRegistry *m) {
        struct {
                uid_t uid;
                unsigned n;
        } users[POLKIT_IN_FLIGHT_MAX];
        _cleanup_free_ PolkitQuery **order = NULL;
        size_t n_users = 0, queued = 0, k = 0;
        unsigned n = 0;

        for (PolkitQuery *q = m->queries; q; q = q->next)
                if (q->slot) {
                        size_t i;

                        n++;
                        for (i = 0; i < n_users && users[i].uid != q->uid; i++)
                                ;
                        if (i == n_users) {
                                if (n_users >= ELEMENTSOF(users))
                                        continue; /* cannot be: at most POLKIT_IN_FLIGHT_MAX in flight */
                                users[n_users].uid = q->uid;
                                users[n_users++].n = 0;
                        }
                        users[i].n++;
                } else if (q->check)
                        queued++;
        if (n >= POLKIT_IN_FLIGHT_MAX || queued == 0)
                return;
        order = calloc(queued, sizeof(PolkitQuery *));
        if (!order) {
                log_oom(); /* retried with the next answer or call */
                return;
        }
        /* The list is newest first. */
        for (PolkitQuery *q = m->queries; q; q = q->next)
                if (q->check && !q->slot)
                        order[k++] = q;
        for (size_t j = k; j > 0 && n < POLKIT_IN_FLIGHT_MAX; j--) {
                PolkitQuery *q = order[j - 1];
                size_t i;
                int r;

                for (i = 0; i < n_users && users[i].uid != q->uid; i++)
                        ;
                if (i < n_users && users[i].n >= POLKIT_IN_FLIGHT_PER_USER_MAX && n >= POLKIT_IN_FLIGHT_SHARED_MAX)
                        continue;
                r = sd_bus_call_async(m->bus, &q->slot, q->check, check_reply, q, POLKIT_TIMEOUT_USEC);
                if (r < 0) {
                        log_warning_errno(r, "Failed to ask polkit: %m");
                        continue; /* stays queued; retried with the next answer */
                }
                q->check = sd_bus_message_unref(q->check);
                n++;
                if (i == n_users) {
                        /* n < POLKIT_IN_FLIGHT_MAX, so there is room for one user more. */
                        users[n_users].uid = q->uid;
                        users[n_users++].n = 0;
                }
                users[i].n++;
        }
}

typedef struct RegistryUse {
        unsigned total, connection, user;
        size_t bytes, user_bytes;
} RegistryUse;

static RegistryUse registry_use(PolkitRegistry *m, const char *sender, uid_t uid) {
        RegistryUse u = {};

        for (PolkitQuery *q = m->queries; q; q = q->next) {
                u.total++;
                u.bytes += q->weight;
                if (streq(q->sender, sender))
                        u.connection++;
                if (q->uid == uid) {
                        u.user++;
                        u.user_bytes += q->weight;
                }
        }
        return u;
}

/* Walk every argument of a request that is about to wait for polkit: the caller is not
 * authorized yet, so what it sent is bounded here, whatever the method reads of it. Leaves
 * the message rewound. */
static int request_weight(sd_bus_message *msg, size_t *ret) {
        size_t bytes = 0, values = 0;
        unsigned depth = 0;
        int r;

        r = sd_bus_message_rewind(msg, true);
        if (r < 0)
                return r;
        for (;;) {
                const char *contents;
                char type;

                r = sd_bus_message_peek_type(msg, &type, &contents);
                if (r < 0)
                        return r;
                if (r == 0) {
                        if (depth == 0)
                                break;
                        r = sd_bus_message_exit_container(msg);
                        if (r < 0)
                                return r;
                        depth--;
                        continue;
                }
                if (++values > REQUEST_VALUES_MAX)
                        return -E2BIG;
                if (strchr("avre", type)) { /* array, variant, struct, dict entry */
                        r = sd_bus_message_enter_container(msg, type, contents);
                        if (r < 0)
                                return r;
                        depth++;
                        bytes += 8; /* length or signature */
                } else if (strchr("sog", type)) { /* string, object path, signature */
                        const char *v;
                        size_t n;

                        r = sd_bus_message_read_basic(msg, type, &v);
                        if (r < 0)
                                return r;
                        n = strlen(v);
                        if (n >= PATH_MAX)
                                return -E2BIG;
                        bytes += n + 1 + 4;
                } else {
                        uint64_t v; /* the widest basic type; a unix fd is read as an index */

                        r = sd_bus_message_read_basic(msg, type, &v);
                        if (r < 0)
                                return r;
                        bytes += 8;
                }
                if (bytes > REQUEST_BYTES_MAX)
                        return -E2BIG;
        }
        r = sd_bus_message_rewind(msg, true);
        if (r < 0)
                return r;
        *ret = bytes + REQUEST_OVERHEAD;
        return 0;
}

/* A caller left the bus: its calls that polkit has not answered yet go (whatever the answer,
 * nobody asked any more, and acting on the call would leave a change behind for no one), and
 * their places with them. One match for every caller: dbus-daemon allows a connection 512 match
 * rules, and a rule per waiting caller (sd_bus_track) let waiting callers get the daemon
 * disconnected from the bus. The bus sends a caller's calls before the signal of its leaving. */
static int name_owner_changed(sd_bus_message *msg, void *userdata, sd_bus_error *ret_error) {
        PolkitRegistry *m = userdata;
        const char *name, *old_owner, *new_owner;
        bool dropped = false;

        if (sd_bus_message_read(msg, "sss", &name, &old_owner, &new_owner) < 0)
                return 0;
        if (name[0] != ':' || !isempty(new_owner))
                return 0; /* only unique names leaving */
        for (PolkitQuery **p = &m->queries; *p;) {
                PolkitQuery *q = *p;

                if (!q->answered && streq(q->sender, name)) {
                        log_debug("Caller of an authorization for %s left the bus; dropping its call.", q->action);
                        *p = q->next;
                        polkit_query_free(q);
                        dropped = true;
                } else
                        p = &q->next;
        }
        if (dropped)
                registry_dispatch(m);
        return 0;
}

int polkit_registry_attach(PolkitRegistry *m) {
        return sd_bus_match_signal_async(m->bus, &m->match, "org.freedesktop.DBus", "/org/freedesktop/DBus",
                "org.freedesktop.DBus", "NameOwnerChanged", name_owner_changed, NULL, m);
}

static int check_reply(sd_bus_message *reply, void *userdata, sd_bus_error *ret_error) {
        PolkitQuery *q = userdata;
        PolkitRegistry *m = q->registry;
        const sd_bus_error *e;
        int authorized, challenge, r;

        q->slot = sd_bus_slot_unref(q->slot);
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

        if (uid == UID_INVALID)
                return snprintf(buf, size, "%s", ""), 0;
        /* No account, no detail: in digits it would match a login so named (LDAP, --badname) in
         * a rule's owner == subject.user. */
        if (getpwuid_r(uid, &pw, tmp, sizeof(tmp), &result) == 0 && result)
                snprintf(buf, size, "%s", result->pw_name);
        else
                snprintf(buf, size, "%s", "");
        return 0;
}

int bus_authorize(PolkitRegistry *m, sd_bus_message *msg, const char *action, const AuthDetails *details,
        sd_bus_error *error) {
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *call = NULL;
        _cleanup_free_ char *key = NULL;
        PolkitQuery *q;
        RegistryUse use;
        char owner[256];
        const char *sender;
        unsigned flags = 0;
        size_t weight;
        uid_t uid;
        int r;

        key = details_key(details);
        if (!key)
                return -ENOMEM;
        /* The answer to an earlier question about this very message? */
        for (q = m->queries; q; q = q->next)
                if (q->request == msg && streq(q->action, action))
                        break;
        if (q) {
                if (!q->answered)
                        return 0; /* still thinking: should not be dispatched yet */
                registry_remove(m, q);
                /* Only about what it was asked: the guest may have been registered again meanwhile,
                 * for another owner, at the same object path. Then polkit is asked again. */
                if (!streq(q->details, key)) {
                        log_info("Authorization of %s for %s answered about a guest or owner that changed "
                                 "meanwhile; asking again.",
                                action, strempty(q->sender));
                        polkit_query_free(q);
                        q = NULL;
                } else {
                        r = q->result;
                        if (r < 0)
                                sd_bus_error_move(error, &q->error);
                        polkit_query_free(q);
                        return r;
                }
        }

        /* Root passes without asking. */
        r = sd_bus_query_sender_privilege(msg, -1);
        if (r < 0)
                return r;
        if (r > 0)
                return 1;

        sender = sd_bus_message_get_sender(msg);
        if (!sender)
                return sd_bus_error_setf(error, SD_BUS_ERROR_ACCESS_DENIED, "Access denied: caller has no bus name.");
        r = bus_sender_uid(msg, &uid);
        if (r < 0)
                return sd_bus_error_setf(error, SD_BUS_ERROR_ACCESS_DENIED,
                        "Access denied: the caller's user cannot be told (%s).", strerror(-r));

        /* Nothing waits before its size is known. */
        r = request_weight(msg, &weight);
        if (r == -E2BIG)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                        "The arguments are too large: at most %u values, %u bytes in all, each string shorter "
                        "than %u bytes.",
                        REQUEST_VALUES_MAX, REQUEST_BYTES_MAX, (unsigned) PATH_MAX);
        if (r < 0)
                return r;

        registry_expire(m);
        use = registry_use(m, sender, uid);
        if (use.connection >= POLKIT_QUERIES_PER_CONNECTION_MAX || use.user >= POLKIT_QUERIES_PER_USER_MAX ||
                use.user_bytes + weight > POLKIT_BYTES_PER_USER_MAX)
                return sd_bus_error_setf(error, SD_BUS_ERROR_LIMITS_EXCEEDED,
                        "Too many of your calls are waiting for authorization (%u of this connection, %u of user "
                        UID_FMT "; at most %u and %u); wait for their answers, then try again.",
                        use.connection, use.user, (uint32_t) uid, POLKIT_QUERIES_PER_CONNECTION_MAX,
                        POLKIT_QUERIES_PER_USER_MAX);
        if (use.total >= POLKIT_QUERIES_MAX || use.bytes + weight > POLKIT_BYTES_MAX)
                return sd_bus_error_setf(error, SD_BUS_ERROR_LIMITS_EXCEEDED,
                        "Too many calls are waiting for authorization (%u); try again later.", use.total);
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
        q->registry = m;
        q->request = sd_bus_message_ref(msg);
        q->uid = uid;
        q->weight = weight;
        q->action = strdup(action);
        q->details = TAKE_PTR(key);
        q->sender = strdup(sender);
        if (!q->action || !q->sender) {
                polkit_query_free(q);
                return -ENOMEM;
        }
        q->check = TAKE_PTR(call);
        q->next = m->queries;
        m->queries = q;
        registry_dispatch(m);
        return 0;
}
