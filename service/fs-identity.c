/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <linux/capability.h>
#include <sys/syscall.h>

#include "fs-identity.h"
#include "util.h"

/* Where the old 16-bit calls keep the plain names (i386, arm), the 32-bit ones. */
#ifdef SYS_setfsuid32
#define SYS_SETFSUID SYS_setfsuid32
#define SYS_SETFSGID SYS_setfsgid32
#define SYS_SETGROUPS SYS_setgroups32
#define SYS_GETGROUPS SYS_getgroups32
#else
#define SYS_SETFSUID SYS_setfsuid
#define SYS_SETFSGID SYS_setfsgid
#define SYS_SETGROUPS SYS_setgroups
#define SYS_GETGROUPS SYS_getgroups
#endif

/* This thread's capability sets (raw system calls: per thread, as the ids). */
typedef struct Caps {
        struct __user_cap_data_struct d[_LINUX_CAPABILITY_U32S_3];
} Caps;

static int caps_get(Caps *ret) {
        struct __user_cap_header_struct h = { .version = _LINUX_CAPABILITY_VERSION_3 };

        return syscall(SYS_capget, &h, ret->d) < 0 ? -errno : 0;
}

static int caps_set(const Caps *c) {
        struct __user_cap_header_struct h = { .version = _LINUX_CAPABILITY_VERSION_3 };

        return syscall(SYS_capset, &h, c->d) < 0 ? -errno : 0;
}

static int identity_set(uid_t uid, gid_t gid, const gid_t *gids, size_t n_gids) {
        if (syscall(SYS_SETGROUPS, n_gids, gids) < 0)
                return -errno;
        (void) syscall(SYS_SETFSGID, gid);
        (void) syscall(SYS_SETFSUID, uid);
        /* An invalid id changes nothing and returns the current one. */
        if ((uid_t) syscall(SYS_SETFSUID, (uid_t) -1) != uid || (gid_t) syscall(SYS_SETFSGID, (gid_t) -1) != gid)
                return -EPERM;
        return 0;
}

int fs_identity_run(uid_t uid, gid_t gid, const gid_t *gids, size_t n_gids, int (*fn)(void *userdata),
        void *userdata) {
        _cleanup_free_ gid_t *ours = NULL;
        uid_t our_uid = (uid_t) syscall(SYS_SETFSUID, (uid_t) -1);
        gid_t our_gid = (gid_t) syscall(SYS_SETFSGID, (gid_t) -1);
        Caps our_caps, none;
        long n_ours;
        int r;

        if (!fn || (n_gids > 0 && !gids))
                return -EINVAL;
        if (uid == 0)
                return fn(userdata); /* root: as we are */
        n_ours = syscall(SYS_GETGROUPS, 0, NULL);
        if (n_ours < 0)
                return -errno;
        ours = malloc(sizeof(gid_t) * ((size_t) n_ours + 1));
        if (!ours)
                return -ENOMEM;
        n_ours = syscall(SYS_GETGROUPS, n_ours, ours);
        if (n_ours < 0)
                return -errno;
        r = caps_get(&our_caps);
        if (r < 0)
                return r;
        /* No capability in effect either: the kernel takes those over files away with the fsuid,
         * but CAP_SYS_PTRACE, say, would still let a path through /proc/PID/cwd of any process. */
        none = our_caps;
        for (size_t i = 0; i < ELEMENTSOF(none.d); i++)
                none.d[i].effective = 0;

        r = identity_set(uid, gid, gids, n_gids);
        if (r >= 0)
                r = caps_set(&none);
        if (r >= 0)
                r = fn(userdata);
        /* Capabilities first: setgroups() needs CAP_SETGID; and once more after, as an fsuid of 0
         * raises the file capabilities the permitted set has, in effect or not before. */
        if (caps_set(&our_caps) < 0 || identity_set(our_uid, our_gid, ours, (size_t) n_ours) < 0 ||
                caps_set(&our_caps) < 0) {
                log_error("Cannot take back our own file-system identity; aborting.");
                abort();
        }
        return r;
}
