/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* The guest's QMP peer without a guest or a bus: its listeners (lost, export deleted, busy,
 * removed), the counted users of its private NBD server, and its waiters when nothing is
 * connected. An owner of its own records what the peer tells it. */

#include <json-c/json.h>

#include "peer.h"
#include "tap.h"
#include "util.h"

typedef struct Owner {
        bool offline;
        bool server_started;
        unsigned lost, helper_failed, released, saves;
        bool needed;
} Owner;

static bool owner_offline(void *userdata) {
        Owner *o = userdata;
        return o->offline;
}

static void owner_connection(void *userdata, int error) {
}

static void owner_event(void *userdata, const char *event, json_object *data) {
}

static void owner_lost(void *userdata) {
        Owner *o = userdata;
        o->lost++;
}

static void owner_helper_failed(void *userdata, const char *why) {
        Owner *o = userdata;
        o->helper_failed++;
}

static bool owner_helper_needed(void *userdata) {
        Owner *o = userdata;
        return o->needed;
}

static bool owner_releasing(void *userdata) {
        return false;
}

static void owner_released(void *userdata) {
        Owner *o = userdata;
        o->released++;
}

static bool owner_server_started(void *userdata) {
        Owner *o = userdata;
        return o->server_started;
}

static void owner_set_server_started(void *userdata, bool started) {
        Owner *o = userdata;
        o->server_started = started;
        o->saves++;
}

static const PeerOwner owner_ops = {
        .offline = owner_offline,
        .connection = owner_connection,
        .event = owner_event,
        .lost = owner_lost,
        .helper_failed = owner_helper_failed,
        .helper_needed = owner_helper_needed,
        .releasing = owner_releasing,
        .released = owner_released,
        .nbd_server_started = owner_server_started,
        .set_nbd_server_started = owner_set_server_started,
};

static const StorageSource no_storage = {};

/* A listener that counts, and can leave the peer (as an export or a range op ending does) from
 * inside its own callback. */
typedef struct Counter {
        PeerListener listener;
        Peer *peer;
        unsigned lost, deleted, removed;
        char last_id[32];
        bool busy;
        bool leave_on_lost;
        bool holds_nbd;
} Counter;

static void counter_lost(void *userdata) {
        Counter *c = userdata;

        c->lost++;
        if (c->holds_nbd) {
                c->holds_nbd = false;
                peer_nbd_drop(c->peer);
        }
        if (c->leave_on_lost)
                peer_unlisten(c->peer, &c->listener);
}

static void counter_deleted(void *userdata, const char *id) {
        Counter *c = userdata;

        c->deleted++;
        snprintf(c->last_id, sizeof(c->last_id), "%s", id);
}

static bool counter_busy(void *userdata) {
        Counter *c = userdata;
        return c->busy;
}

static void counter_removed(void *userdata) {
        Counter *c = userdata;

        c->removed++;
        peer_unlisten(c->peer, &c->listener);
}

static void counter_listen(Counter *c, Peer *p) {
        c->peer = p;
        c->listener = (PeerListener) {
                .userdata = c,
                .lost = counter_lost,
                .export_deleted = counter_deleted,
                .busy = counter_busy,
                .removed = counter_removed,
        };
        peer_listen(p, &c->listener);
}

static void peer_setup(Peer *p, Owner *o, Config *config) {
        config_init(config);
        peer_init(p, NULL, config, "g1", "/nonexistent", &owner_ops, &no_storage, o);
}

static void test_lost_reaches_every_listener(void) {
        Config config;
        Owner o = {};
        Counter a = {}, b = {}, c = {};
        Peer p;

        peer_setup(&p, &o, &config);
        counter_listen(&a, &p);
        counter_listen(&b, &p);
        counter_listen(&c, &p);
        b.leave_on_lost = true; /* one leaves in the middle of the walk */

        peer_lost(&p);
        ASSERT_EQ(o.lost, 1u);
        ASSERT_EQ(a.lost, 1u);
        ASSERT_EQ(b.lost, 1u);
        ASSERT_EQ(c.lost, 1u);

        /* The one that left hears nothing more; the others do. */
        peer_lost(&p);
        ASSERT_EQ(a.lost, 2u);
        ASSERT_EQ(b.lost, 1u);
        ASSERT_EQ(c.lost, 2u);

        peer_unlisten(&p, &a.listener);
        peer_unlisten(&p, &a.listener); /* twice: harmless */
        peer_unlisten(&p, &c.listener);
        ASSERT_NULL(p.listeners);
        peer_done(&p);
        config_done(&config);
}

static void test_export_deleted_goes_to_listeners(void) {
        Config config;
        Owner o = {};
        Counter a = {}, b = {};
        json_object *data = json_object_new_object();
        Peer p;

        peer_setup(&p, &o, &config);
        counter_listen(&a, &p);
        counter_listen(&b, &p);

        json_object_object_add(data, "id", json_object_new_string("bsr-7"));
        ASSERT_EQ(peer_dispatch_event(&p, "BLOCK_EXPORT_DELETED", data), 1);
        ASSERT_EQ(a.deleted, 1u);
        ASSERT_EQ(b.deleted, 1u);
        ASSERT_STREQ(a.last_id, "bsr-7");

        /* Anything else is the owner's. */
        ASSERT_EQ(peer_dispatch_event(&p, "JOB_STATUS_CHANGE", data), 0);
        ASSERT_EQ(a.deleted, 1u);

        json_object_put(data);
        peer_remove_all(&p);
        ASSERT_EQ(a.removed, 1u);
        ASSERT_EQ(b.removed, 1u);
        ASSERT_NULL(p.listeners);
        peer_done(&p);
        config_done(&config);
}

/* After a loss the server's users start from nothing: drops that come late (an export whose
 * end is told after the loss) must not wrap the count and keep the next server forever. */
static void test_nbd_users_after_loss(void) {
        Config config;
        Owner o = { .server_started = true };
        Counter a = {}, b = {};
        Peer p;

        peer_setup(&p, &o, &config);
        counter_listen(&a, &p);
        counter_listen(&b, &p);
        peer_nbd_hold(&p);
        a.holds_nbd = true;
        peer_nbd_hold(&p);
        peer_nbd_hold(&p); /* a map's shared export: nobody drops it on a loss */
        ASSERT_EQ(p.nbd_users, 3u);

        peer_lost(&p);
        ASSERT_EQ(p.nbd_users, 0u);
        ASSERT_FALSE(p.nbd_server);

        peer_nbd_drop(&p); /* late */
        ASSERT_EQ(p.nbd_users, 0u);

        /* Whatever else: the started flag is the owner's, and only a cleanup after a connect
         * (with a ready peer) clears it. */
        ASSERT_TRUE(peer_nbd_server_running(&p));
        peer_remove_all(&p);
        peer_done(&p);
        config_done(&config);
}

static void ready_handler(Peer *p, int error, const char *error_text, void *userdata) {
        int *got = userdata;
        *got = error;
}

static void test_when_ready_not_connected(void) {
        Config config;
        Owner o = {};
        int got = 1;
        Peer p;

        peer_setup(&p, &o, &config);
        ASSERT_FALSE(peer_ready(&p));
        /* A running guest with no connection: told at once. */
        ASSERT_OK(peer_when_ready(&p, ready_handler, &got, NULL));
        ASSERT_EQ(got, -ENOTCONN);
        ASSERT_NULL(p.waiters);
        peer_done(&p);
        config_done(&config);
}

static void test_release_without_helper(void) {
        Config config;
        Owner o = { .offline = true };
        Counter a = {};
        Peer p;

        peer_setup(&p, &o, &config);
        counter_listen(&a, &p);
        /* No helper at all: the outcomes waiting for it are told at once. */
        peer_release_helper_if_idle(&p);
        ASSERT_EQ(o.released, 1u);

        /* A running guest's peer has no helper to release. */
        o.offline = false;
        peer_release_helper_if_idle(&p);
        ASSERT_EQ(o.released, 1u);

        peer_remove_all(&p);
        peer_done(&p);
        config_done(&config);
}

int main(int argc, char **argv) {
        tap_init(argc, argv);
        TAP_RUN(test_lost_reaches_every_listener);
        TAP_RUN(test_export_deleted_goes_to_listeners);
        TAP_RUN(test_nbd_users_after_loss);
        TAP_RUN(test_when_ready_not_connected);
        TAP_RUN(test_release_without_helper);
        return tap_finish();
}
