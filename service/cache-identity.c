/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* A template cache's sandbox identity (cache-internal.h): a helper uid (= gid) and an MCS category
 * pair of its own, from the guests' allocator (manager-identity.c, through the engine's registry),
 * so that a cache's helper taken over by a hostile remote cannot reach another cache's helper, a
 * guest's or provisioning's (nor their images). The caches in the list hold theirs; a cache gives
 * its identity back by leaving the list (Stop). */

#include <json-c/json.h>

#include "cache.h" /* first: this file is part of the cache module */
#include "cache-internal.h"
#include "sandbox.h"
#include "util.h"

bool cache_uid_taken(Engine *e, const void *self, uid_t uid) {
        for (Cache *c = e->caches; c; c = c->next)
                if ((const void *) c != self && c->uid == uid)
                        return true;
        return false;
}

bool cache_mcs_taken(Engine *e, const void *self, unsigned c1, unsigned c2) {
        for (Cache *c = e->caches; c; c = c->next)
                if ((const void *) c != self && c->uid != 0 && c->mcs_c1 == c1 && c->mcs_c2 == c2)
                        return true;
        return false;
}

static int identity_labels(Cache *c) {
        const Config *cfg = &c->engine->config;

        c->process_label = mfree(c->process_label);
        c->image_label = mfree(c->image_label);
        return sandbox_selinux_labels(config_selinux_helper_type(cfg), config_selinux_image_type(cfg), c->mcs_c1,
                c->mcs_c2, &c->process_label, &c->image_label);
}

int cache_identity_allocate(Cache *c) {
        int r;

        r = c->engine->registry->identity_allocate(c->engine, c, &c->uid, &c->mcs_c1, &c->mcs_c2);
        if (r < 0)
                return r;
        return identity_labels(c);
}

int cache_identity_to_json(Cache *c, json_object *k) {
        if (json_object_object_add(k, "helper_uid", json_object_new_uint64(c->uid)) < 0 ||
                json_object_object_add(k, "mcs_c1", json_object_new_uint64(c->mcs_c1)) < 0 ||
                json_object_object_add(k, "mcs_c2", json_object_new_uint64(c->mcs_c2)) < 0)
                return -ENOMEM;
        return 0;
}

/* A number of the record (untrusted), at most max; 0 where missing, malformed or larger. */
static uint64_t record_u64(json_object *k, const char *key, uint64_t max) {
        json_object *o;
        uint64_t v;

        if (!json_object_object_get_ex(k, key, &o) || !json_object_is_type(o, json_type_int))
                return 0;
        v = json_object_get_uint64(o);
        return v <= max ? v : 0;
}

/* Kept across restarts: the leftover of the earlier daemon's helper is found by its uid, and the
 * image's label matches. One that is missing, outside HelperUIDRange= (or among the probes' top
 * uids), or a guest's or another cache's (guests are loaded first and keep theirs) is dropped: uid 0, and
 * cache_spawn() allocates a new one once all caches are loaded. The image is root's either way
 * (the helper gets it as an fd): nothing to re-chown. */
int cache_identity_restore(Cache *c, json_object *k) {
        Engine *e = c->engine;

        c->uid = (uid_t) record_u64(k, "helper_uid", UINT32_MAX - 1);
        c->mcs_c1 = (unsigned) record_u64(k, "mcs_c1", SANDBOX_MCS_CATEGORIES);
        c->mcs_c2 = (unsigned) record_u64(k, "mcs_c2", SANDBOX_MCS_CATEGORIES);
        if (e->registry->identity_free(e, c, c->uid, c->mcs_c1, c->mcs_c2))
                return identity_labels(c);
        log_warning("Template cache %u: sandbox identity in caches.json missing or taken, it gets a new one.", c->id);
        c->uid = 0;
        c->mcs_c1 = c->mcs_c2 = 0;
        return 1;
}
