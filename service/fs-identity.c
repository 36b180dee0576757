/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <sys/syscall.h>

#include "fs-identity.h"
#include "util.h"

static int identity_set(uid_t uid, gid_t gid, const gid_t *gids, size_t n_gids) {
        if (syscall(SYS_setgroups, n_gids, gids) < 0)
                return -errno;
        (void) syscall(SYS_setfsgid, gid);
        (void) syscall(SYS_setfsuid, uid);
        /* An invalid id changes nothing and returns the current one. */
        if ((uid_t) syscall(SYS_setfsuid, (uid_t) -1) != uid || (gid_t) syscall(SYS_setfsgid, (gid_t) -1) != gid)
                return -EPERM;
        return 0;
}

int fs_identity_run(uid_t uid, gid_t gid, const gid_t *gids, size_t n_gids, int (*fn)(void *userdata),
        void *userdata) {
        _cleanup_free_ gid_t *ours = NULL;
        uid_t our_uid = (uid_t) syscall(SYS_setfsuid, (uid_t) -1);
        gid_t our_gid = (gid_t) syscall(SYS_setfsgid, (gid_t) -1);
        long n_ours;
        int r;

        if (!fn || (n_gids > 0 && !gids))
                return -EINVAL;
        n_ours = syscall(SYS_getgroups, 0, NULL);
        if (n_ours < 0)
                return -errno;
        ours = malloc(sizeof(gid_t) * ((size_t) n_ours + 1));
        if (!ours)
                return -ENOMEM;
        n_ours = syscall(SYS_getgroups, n_ours, ours);
        if (n_ours < 0)
                return -errno;

        r = identity_set(uid, gid, gids, n_gids);
        if (r >= 0)
                r = fn(userdata);
        if (identity_set(our_uid, our_gid, ours, (size_t) n_ours) < 0) {
                log_error("Cannot take back our own file-system identity; aborting.");
                abort();
        }
        return r;
}
