/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* Checking a path as a user would reach it, without a process of theirs (fs-identity.c).
 *
 * The daemon opens what a caller or a guest's owner names as root, and then checks that the user
 * could have reached it too. That check once ran in a child that took the user's uid: the user may
 * signal such a child, and one stopped held the daemon while it waited. Here the calling thread
 * takes the user's file-system identity instead (fsuid, fsgid and supplementary groups, by raw
 * system calls, which change this thread only) and no capability in effect (capset, this thread
 * too: the kernel takes those over files away with the fsuid, but CAP_SYS_PTRACE would still open
 * /proc/PID/cwd of any process), runs the check, and takes its own back. Path lookups and opens
 * are checked as the user's. A user's FUSE mount without allow_other answers our euid 0 with
 * EACCES: it cannot hold the lookup either. */

#include <sys/types.h>

/* Run fn(userdata) with uid, gid and gids (n_gids of them) as this thread's file-system identity;
 * returns what fn returns, or -errno if the identity could not be taken (fn not run). Aborts if
 * ours cannot be taken back: the daemon never goes on as someone else. uid 0 (a caller or owner
 * that is root): fn runs as we are. */
int fs_identity_run(uid_t uid, gid_t gid, const gid_t *gids, size_t n_gids, int (*fn)(void *userdata),
        void *userdata);
