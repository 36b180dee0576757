/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* fs-identity.c: a check runs in this thread as the user (fsuid, fsgid, groups, no capability in
 * effect), and this thread is itself again afterwards; the other threads are never touched. */

#include <pthread.h>
#include <stdio.h>
#include <sys/syscall.h>

#include "fs-identity.h"
#include "util.h"
#include "tap.h"

#define USER ((uid_t) 4242421)
#define GROUP ((gid_t) 4242422)
#define EXTRA ((gid_t) 4242423)

typedef struct Seen {
        uid_t fsuid;
        gid_t fsgid;
        long n_groups;
        gid_t groups[4];
        unsigned long long cap_eff;
} Seen;

/* CapEff of this thread (/proc/thread-self/status). */
static unsigned long long cap_eff(void) {
        char line[256];
        unsigned long long v = ~0ULL;
        FILE *f = fopen("/proc/thread-self/status", "re");

        if (!f)
                return v;
        while (fgets(line, sizeof(line), f))
                if (sscanf(line, "CapEff: %llx", &v) == 1)
                        break;
        fclose(f);
        return v;
}

static Seen seen_now(void) {
        Seen s = {
                .fsuid = (uid_t) syscall(SYS_setfsuid, (uid_t) -1),
                .fsgid = (gid_t) syscall(SYS_setfsgid, (gid_t) -1),
                .cap_eff = cap_eff(),
        };
        s.n_groups = syscall(SYS_getgroups, ELEMENTSOF(s.groups), s.groups);
        return s;
}

static int look(void *userdata) {
        *(Seen *) userdata = seen_now();
        return 7;
}

static void test_run_as_user(void) {
        Seen before = seen_now(), inside = {}, after;
        const gid_t groups[] = { EXTRA };

        ASSERT_EQ(fs_identity_run(USER, GROUP, groups, 1, look, &inside), 7);
        ASSERT_EQ(inside.fsuid, USER);
        ASSERT_EQ(inside.fsgid, GROUP);
        ASSERT_EQ(inside.n_groups, 1);
        ASSERT_EQ(inside.groups[0], EXTRA);
        ASSERT_EQ(inside.cap_eff, 0);
        after = seen_now();
        ASSERT_EQ(after.fsuid, before.fsuid);
        ASSERT_EQ(after.fsgid, before.fsgid);
        ASSERT_EQ(after.n_groups, before.n_groups);
        ASSERT_EQ(after.cap_eff, before.cap_eff);
        ASSERT_TRUE(before.cap_eff != 0);
}

static void *check_in_thread(void *userdata) {
        Seen *s = userdata;
        (void) fs_identity_run(USER, GROUP, NULL, 0, look, s);
        return NULL;
}

static void test_main_thread_untouched(void) {
        Seen before = seen_now(), in_thread = {}, during;
        pthread_t t;

        ASSERT_EQ(pthread_create(&t, NULL, check_in_thread, &in_thread), 0);
        ASSERT_EQ(pthread_join(t, NULL), 0);
        during = seen_now();
        ASSERT_EQ(in_thread.fsuid, USER);
        ASSERT_EQ(during.fsuid, before.fsuid);
        ASSERT_EQ(during.cap_eff, before.cap_eff);
        ASSERT_EQ(during.n_groups, before.n_groups);
}

/* Root (a caller or owner that is root): as we are, capabilities and all. */
static void test_root_as_we_are(void) {
        Seen before = seen_now(), inside = {};

        ASSERT_EQ(fs_identity_run(0, 0, NULL, 0, look, &inside), 7);
        ASSERT_EQ(inside.fsuid, before.fsuid);
        ASSERT_EQ(inside.n_groups, before.n_groups);
        ASSERT_EQ(inside.cap_eff, before.cap_eff);
}

static void test_bad_arguments(void) {
        Seen s;

        ASSERT_ERRNO(fs_identity_run(USER, GROUP, NULL, 1, look, &s), -EINVAL);
        ASSERT_ERRNO(fs_identity_run(USER, GROUP, NULL, 0, NULL, &s), -EINVAL);
}

int main(int argc, char **argv) {
        tap_init(argc, argv);
        if (geteuid() != 0) {
                printf("1..0 # SKIP taking another file-system identity needs root\n");
                return 0;
        }
        TAP_RUN(test_run_as_user);
        TAP_RUN(test_main_thread_untouched);
        TAP_RUN(test_root_as_we_are);
        TAP_RUN(test_bad_arguments);
        return tap_finish();
}
