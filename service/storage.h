/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* The storage helper of a guest that is not running: a sandboxed
 * `qemu-system-x86_64 -machine none` (no guest, QEMU's own -sandbox on) that takes QMP on a
 * socketpair and the images as fds (add-fd), so it needs no path to anything. It runs the same
 * block jobs and NBD exports as a guest's own QEMU, and goes away when nothing needs it.
 *
 * It belongs to the guest's QMP peer (peer.c), and knows nothing of the Guest object: the
 * guest's identity and disks come through a StorageSource, and what happens to the helper goes
 * back through the StorageHost's callbacks. */

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>
#include <systemd/sd-event.h>

#include "config.h"
#include "qmp.h"

typedef struct StorageHelper StorageHelper;

/* The sandbox the storage helper runs in: the uid (= gid) and SELinux labels (NULL where SELinux is
 * off) of an identity the guest's other helpers do not share (this QEMU holds its images
 * read-write), and its runtime dir (created by whoever fills it in). */
typedef struct StorageSandbox {
        uid_t uid;
        /* Another uid an earlier daemon's storage helper of this host may still run under, or 0:
         * a guest's helper uid, which daemons before the storage helper's own identity used. */
        uid_t earlier_uid;
        const char *process_label;
        const char *image_label;
        const char *runtime_dir;
} StorageSandbox;

/* One disk to attach: its alias, image path and format as registered. */
typedef struct StorageDisk {
        const char *alias;
        const char *path;
        const char *format;
        bool read_only; /* the top too (a handoff of a disk its QEMU only read) */
        uid_t owner;    /* whose rights its chain is opened with: the guest's owner's (0: root, anything) */
        uid_t qemu_uid; /* and in a handoff, the uid of the QEMU that had it open, too (UID_INVALID: not) */
        dev_t pin_dev;  /* ... and the top it had open */
        ino_t pin_ino;
} StorageDisk;

/* What the helper needs of the guest, asked when needed. */
typedef struct StorageSource {
        void *userdata;
        int (*sandbox)(void *userdata, StorageSandbox *ret);
        size_t (*n_disks)(void *userdata);
        void (*disk)(void *userdata, size_t i, StorageDisk *ret);
        /* Where an image may not live (other guests' writable disks), and what running guests
         * claim (strv, NULL on OOM). */
        char **(*forbidden_images)(void *userdata);
        char **(*claimed_images)(void *userdata);
} StorageSource;

typedef struct StorageHost {
        sd_event *event;
        const Config *config;
        const char *name; /* the guest's, for logs */
        /* The slots the helper and its QMP connection live in (the peer's). */
        StorageHelper **helper;
        Qmp **qmp;
        QmpHandlers qmp_handlers;
        const StorageSource *source;

        void *userdata;
        /* Its disks are attached: waiters can run. */
        void (*attached)(void *userdata);
        /* It failed or went away: jobs and waiters learn it, unless they did through QMP. */
        void (*failed)(void *userdata, const char *why);
        /* It is gone, and the images' locks with it. */
        void (*released)(void *userdata);
        /* Something asked for it again while it was quitting. */
        bool (*wanted)(void *userdata);
} StorageHost;

/* Spawn it; host->attached or host->failed tells once its disks are attached (or it failed). */
int storage_helper_start(const StorageHost *host);
/* QMP is up: attach the guest's disks. */
void storage_helper_attach(const StorageHost *host);
/* QMP went away: the helper is dead or dying. */
void storage_helper_lost(const StorageHost *host, int error);
/* Ask it to quit (QEMU flushes and unlocks the images on the way out). */
void storage_helper_stop(const StorageHost *host);
/* Kill it at once and forget it (guest going away). */
void storage_helper_kill(const StorageHost *host);
bool storage_helper_attached(const StorageHost *host);

/* The chain at path, opened as its guest's owner opens it themselves (image_chain_open_claimed(),
 * the top for writing if writable, with the owner's uid, gid and groups as this thread's file-system
 * identity; root: as we are). Whoever registers a guest that is not running names its images, and
 * the owner may write the top image's header, and with it name as its backing any file beneath an
 * image directory: opened as root, a stream or a map would copy into their image, or show them, a
 * file they may not read, or write another user's image, and root's errors would tell them what lies
 * where they may not look (whether a name exists, a header's backing name and format). One open,
 * the owner's, whose fds are the chain: root never reads a header the owner could rewrite between
 * two reads. In this thread: no child the owner could stop while we wait. 0 and *ret, or -errno
 * with *ret_error saying why (-EACCES: the owner may not). */
typedef struct ImageChain ImageChain;
int storage_chain_open_owned(char *const *dirs, uid_t owner, const char *path, const char *format, bool writable,
        char *const *forbidden, char *const *claimed, ImageChain *ret, char **ret_error);
/* The same for a disk handed over from its QEMU (a handoff; qemu_uid UID_INVALID: not): its top
 * must be the file that QEMU had open (pin_dev, pin_ino), at every open, and its header was that
 * QEMU's to write as much as the owner's, so the chain is what both may read: opened as the owner
 * (the chain returned), then read as qemu_uid, the uid that QEMU ran as, which must find the same
 * files (reviews 34d, 34e, 34f). qemu_uid 0 or the owner's: the owner's open alone. -EPERM: the top
 * is another file now. */
int storage_chain_open_handed_over(char *const *dirs, uid_t owner, uid_t qemu_uid, dev_t pin_dev, ino_t pin_ino,
        const char *path, const char *format, bool writable, char *const *forbidden, char *const *claimed,
        ImageChain *ret, char **ret_error);

/* SIGKILL the processes of uid that are not our children (helpers an earlier daemon left, still
 * exiting and holding their images' locks); how many still had a live thread, or -errno
 * (-EUSERS: a helper of another live daemon runs as uid, and is left alone). */
int storage_kill_leftovers(uid_t uid);
