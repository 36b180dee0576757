/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* The manager's sandbox identities for its guests (declared in manager.h). */

#include <grp.h>
#include <pwd.h>
#include <sys/random.h>

#include "guest.h"
#include "manager.h"
#include "sandbox.h"
#include "util.h"

/* Sandbox identities: a uid (= gid) of the configured range that neither another guest nor a
 * real account uses, and an MCS category pair c1 < c2 that no other guest has. */

static bool uid_taken(Manager *m, Guest *self, uid_t uid) {
        struct passwd pw, *pwr = NULL;
        struct group gr, *grr = NULL;
        char buf[4096];

        if (uid == m->engine.config.helper_uid_max)
                return true; /* reserved for provisioning's sandbox */
        for (Guest *g = m->guests; g; g = g->next)
                if (g != self && g->helper_uid == uid)
                        return true;
        if (getpwuid_r(uid, &pw, buf, sizeof(buf), &pwr) == 0 && pwr)
                return true;
        if (getgrgid_r((gid_t) uid, &gr, buf, sizeof(buf), &grr) == 0 && grr)
                return true;
        return false;
}

static bool mcs_taken(Manager *m, Guest *self, unsigned c1, unsigned c2) {
        for (Guest *g = m->guests; g; g = g->next)
                if (g != self && g->helper_uid != 0 && g->mcs_c1 == c1 && g->mcs_c2 == c2)
                        return true;
        return false;
}

bool manager_identity_valid(Manager *m, Guest *g) {
        return g->helper_uid != 0 && g->mcs_c1 < g->mcs_c2 && g->mcs_c2 < SANDBOX_MCS_CATEGORIES &&
               !uid_taken(m, g, g->helper_uid) && !mcs_taken(m, g, g->mcs_c1, g->mcs_c2);
}

int manager_allocate_identity(Manager *m, Guest *g) {
        uint64_t span = (uint64_t) m->engine.config.helper_uid_max - m->engine.config.helper_uid_min + 1;
        bool found = false;

        for (uint64_t i = 0; i < span; i++) {
                uid_t uid = (uid_t) (m->engine.config.helper_uid_min + i);
                if (!uid_taken(m, g, uid)) {
                        g->helper_uid = uid;
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
                g->mcs_c1 = MIN(a, b);
                g->mcs_c2 = MAX(a, b);
                found = !mcs_taken(m, g, g->mcs_c1, g->mcs_c2);
        }
        for (unsigned a = 0; a < SANDBOX_MCS_CATEGORIES && !found; a++)
                for (unsigned b = a + 1; b < SANDBOX_MCS_CATEGORIES && !found; b++)
                        if (!mcs_taken(m, g, a, b)) {
                                g->mcs_c1 = a;
                                g->mcs_c2 = b;
                                found = true;
                        }
        if (!found)
                return -ENOSPC;
        return manager_identity_labels(m, g);
}

int manager_identity_labels(Manager *m, Guest *g) {
        g->selinux_process_label = mfree(g->selinux_process_label);
        g->selinux_image_label = mfree(g->selinux_image_label);
        return sandbox_selinux_labels(config_selinux_helper_type(&m->engine.config),
                config_selinux_image_type(&m->engine.config), g->mcs_c1, g->mcs_c2, &g->selinux_process_label,
                &g->selinux_image_label);
}
