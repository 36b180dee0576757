/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* The manager's sandbox identities for its guests (declared in manager.h). */

#include <sys/random.h>

#include "cache.h"
#include "guest.h"
#include "manager.h"
#include "sandbox.h"
#include "util.h"

/* Sandbox identities: a uid (= gid) of the configured range that neither another guest, nor a
 * template cache's helper, nor a real account uses, and an MCS category pair c1 < c2 that no other
 * guest or cache has. A guest holds two: its helpers' (self: the Guest) and its storage helper's
 * (self: &g->storage_uid, which never takes its helpers'). `self` is the identity asking (its own
 * does not count; nor, for a guest's helpers', its storage helper's: a restored record's clash
 * between the two drops the storage helper's, manager_storage_identity_restore()). */

static bool uid_taken(Manager *m, const void *self, uid_t uid) {
        if (uid > m->engine.config.helper_uid_max - HELPER_UIDS_PROBES)
                return true; /* reserved for provisioning's probes */
        for (Guest *g = m->guests; g; g = g->next)
                if (((const void *) g != self && g->helper_uid == uid) ||
                        (self != g && self != &g->storage_uid && g->storage_uid != 0 && g->storage_uid == uid))
                        return true;
        if (cache_uid_taken(&m->engine, self, uid))
                return true;
        return uid_is_account(uid);
}

static bool mcs_taken(Manager *m, const void *self, unsigned c1, unsigned c2) {
        for (Guest *g = m->guests; g; g = g->next)
                if (((const void *) g != self && g->helper_uid != 0 && g->mcs_c1 == c1 && g->mcs_c2 == c2) ||
                        (self != g && self != &g->storage_uid && g->storage_uid != 0 && g->storage_mcs_c1 == c1 &&
                                g->storage_mcs_c2 == c2))
                        return true;
        return cache_mcs_taken(&m->engine, self, c1, c2);
}

static bool identity_valid(Manager *m, const void *self, uid_t uid, unsigned c1, unsigned c2) {
        return uid != 0 && c1 < c2 && c2 < SANDBOX_MCS_CATEGORIES && !uid_taken(m, self, uid) &&
               !mcs_taken(m, self, c1, c2);
}

bool manager_identity_valid(Manager *m, Guest *g) {
        /* Within today's HelperUIDRange= too: a uid left from an older range may be another's now
         * (a container's), and a storage helper's start kills the leftovers of its guest's uid. */
        return g->helper_uid >= m->engine.config.helper_uid_min &&
               g->helper_uid <= m->engine.config.helper_uid_max - HELPER_UIDS_PROBES &&
               identity_valid(m, g, g->helper_uid, g->mcs_c1, g->mcs_c2);
}

static int identity_allocate(Manager *m, const void *self, uid_t *ret_uid, unsigned *ret_c1, unsigned *ret_c2) {
        uint64_t span = (uint64_t) m->engine.config.helper_uid_max - m->engine.config.helper_uid_min + 1;
        unsigned c1 = 0, c2 = 0;
        bool found = false;
        uid_t uid = 0;

        for (uint64_t i = 0; i < span; i++) {
                uid = (uid_t) (m->engine.config.helper_uid_min + i);
                if (!uid_taken(m, self, uid)) {
                        found = true;
                        break;
                }
        }
        if (!found)
                return -ENOSPC;

        /* Random pairs, like libvirt's, so labels do not tell the order of registration. */
        found = false;
        for (unsigned tries = 0; tries < 4096 && !found; tries++) {
                uint32_t v[2];
                unsigned a, b;

                if (getrandom(v, sizeof(v), 0) != sizeof(v))
                        return -EIO;
                a = v[0] % SANDBOX_MCS_CATEGORIES;
                b = v[1] % SANDBOX_MCS_CATEGORIES;
                if (a == b)
                        continue;
                c1 = MIN(a, b);
                c2 = MAX(a, b);
                found = !mcs_taken(m, self, c1, c2);
        }
        for (unsigned a = 0; a < SANDBOX_MCS_CATEGORIES && !found; a++)
                for (unsigned b = a + 1; b < SANDBOX_MCS_CATEGORIES && !found; b++)
                        if (!mcs_taken(m, self, a, b)) {
                                c1 = a;
                                c2 = b;
                                found = true;
                        }
        if (!found)
                return -ENOSPC;
        *ret_uid = uid;
        *ret_c1 = c1;
        *ret_c2 = c2;
        return 0;
}

int manager_allocate_identity(Manager *m, Guest *g) {
        int r;

        r = identity_allocate(m, g, &g->helper_uid, &g->mcs_c1, &g->mcs_c2);
        if (r < 0)
                return r;
        return manager_identity_labels(m, g);
}

/* The template caches' (engine.h's registry): the same allocator, so that no cache's helper ever
 * shares a uid or an MCS pair with a guest's or another cache's. */

static Manager *manager_of(Engine *e) {
        return (Manager *) ((char *) e - offsetof(Manager, engine));
}

int manager_identity_allocate(Engine *e, const void *self, uid_t *ret_uid, unsigned *ret_c1, unsigned *ret_c2) {
        return identity_allocate(manager_of(e), self, ret_uid, ret_c1, ret_c2);
}

bool manager_identity_free(Engine *e, const void *self, uid_t uid, unsigned c1, unsigned c2) {
        /* A restored record is untrusted: within HelperUIDRange= (less the probes' top uids) too. */
        return uid >= e->config.helper_uid_min && uid <= e->config.helper_uid_max - HELPER_UIDS_PROBES &&
               identity_valid(manager_of(e), self, uid, c1, c2);
}

/* The storage helper's identity restored from the guest's record (untrusted): kept if it is in
 * HelperUIDRange= (below the probes' top uids) and nobody else's, the guest's helpers' included;
 * otherwise dropped, and guest_storage_identity() allocates a fresh one when a storage helper
 * first runs. Returns 1 if it was dropped (the record wants rewriting). */
int manager_storage_identity_restore(Manager *m, Guest *g) {
        if (g->storage_uid == 0)
                return 0; /* none yet: a record from before it existed, or no storage helper ran */
        if (manager_identity_free(&m->engine, &g->storage_uid, g->storage_uid, g->storage_mcs_c1, g->storage_mcs_c2))
                return guest_storage_identity_labels(g);
        log_warning("Guest %s: storage helper's sandbox identity in its state file out of range or taken, "
                    "dropping it.",
                g->name);
        g->storage_uid = 0;
        g->storage_mcs_c1 = g->storage_mcs_c2 = 0;
        return 1;
}

int manager_identity_labels(Manager *m, Guest *g) {
        g->selinux_process_label = mfree(g->selinux_process_label);
        g->selinux_image_label = mfree(g->selinux_image_label);
        return sandbox_selinux_labels(config_selinux_helper_type(&m->engine.config),
                config_selinux_image_type(&m->engine.config), g->mcs_c1, g->mcs_c2, &g->selinux_process_label,
                &g->selinux_image_label);
}
