/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* A template cache's users (cache-internal.h). A user is an overlay that ProvisionDisk made over
 * the cache, for as long as it still is one: the file made then (the same device and inode, at
 * the path it was made at) still names the cache's socket as its backing in its qcow2 header. An
 * overlay streamed to its end (its backing dropped), rebased, removed or replaced counts no more,
 * and Stop() works once none is left (and no client is connected). Looked at when the count is
 * read (the Users property, Stop), through fds only: opened beneath the image directories with
 * no symlink, the header read with bounded preads and compared byte for byte, never parsed as a
 * path. An error that says nothing about the file (out of memory, out of fds) keeps the user. */

#include <fcntl.h>
#include <limits.h>
#include <json-c/json.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/xattr.h>

#include "blockstream-api.h"
#include "cache-internal.h"
#include "image.h"
#include "util.h"

#define CACHE_USERS_MAX 4096
#define QCOW2_MAGIC UINT32_C(0x514649fb)
#define BACKING_NAME_MAX 1023
#define BACKING_OFFSET_MAX (UINT64_C(2) << 20) /* within the first cluster: at most 2 MiB */

static uint32_t be32(const uint8_t *p) {
        return (uint32_t) p[0] << 24 | (uint32_t) p[1] << 16 | (uint32_t) p[2] << 8 | p[3];
}

static uint64_t be64(const uint8_t *p) {
        return (uint64_t) be32(p) << 32 | be32(p + 4);
}

#define UNTRACKED_UIDS_MAX CACHE_USERS_MAX

void cache_users_free(Cache *c) {
        for (size_t i = 0; i < c->n_user_list; i++)
                free(c->user_list[i].path);
        c->user_list = mfree(c->user_list);
        c->n_user_list = 0;
        c->untracked_uids = mfree(c->untracked_uids);
        c->n_untracked_uids = 0;
}

static int uid_cmp(const void *a, const void *b) {
        uid_t x = *(const uid_t *) a, y = *(const uid_t *) b;
        return x < y ? -1 : x > y;
}

/* a[0..n) sorted, each uid once, root left out (its QEMU needs no ACL entry): the new count. */
static size_t uids_sorted_unique(uid_t *a, size_t n) {
        size_t k = 0;

        qsort(a, n, sizeof(uid_t), uid_cmp);
        for (size_t i = 0; i < n; i++)
                if (a[i] != 0 && (k == 0 || a[k - 1] != a[i]))
                        a[k++] = a[i];
        return k;
}

static size_t users_max(void) {
        return test_hook_bound("BLOCKSTREAM_TEST_CACHE_USERS_MAX", CACHE_USERS_MAX); /* a smaller list is full */
}

bool cache_users_full(const Cache *c) {
        return c->n_user_list + c->in_flight + c->n_waiters >= users_max();
}

static int user_push(Cache *c, const char *path, uint64_t dev, uint64_t ino, uid_t uid) {
        CacheUser *l;
        char *p;

        if (c->n_user_list >= users_max()) {
                /* Counted, never counted down: Stop() stays refused rather than break it. */
                c->users_untracked++;
                return 0;
        }
        p = strdup(path);
        if (!p)
                return -ENOMEM;
        l = reallocarray(c->user_list, c->n_user_list + 1, sizeof(CacheUser));
        if (!l) {
                free(p);
                return -ENOMEM;
        }
        c->user_list = l;
        c->user_list[c->n_user_list++] = (CacheUser){.path = p, .dev = dev, .ino = ino, .uid = uid};
        return 0;
}

int cache_user_add(Cache *c, const char *path, const struct stat *st) {
        int r;

        r = user_push(c, path, (uint64_t) st->st_dev, (uint64_t) st->st_ino, st->st_uid);
        if (r < 0)
                c->users_untracked++; /* as above: never counted down */
        c->users = (unsigned) (c->n_user_list + c->users_untracked);
        return r;
}

/* 1: still a user; 0: not any more; < 0: cannot tell (kept). */
static int user_check(Cache *c, const CacheUser *u, const char *backing) {
        _cleanup_close_ int fd = -1;
        uint8_t h[20];
        char name[BACKING_NAME_MAX];
        size_t len = strlen(backing);
        uint64_t offset;
        uint32_t size;
        struct stat st;
        int r;

        r = image_open_beneath(c->engine->config.image_dirs, u->path, false, &fd, NULL);
        if (r == -ENOENT || r == -ENOTDIR || r == -ELOOP || r == -ESTALE || r == -EISDIR || r == -EINVAL)
                return 0; /* gone, or something else there now */
        if (r < 0)
                return r;
        if (fstat(fd, &st) < 0)
                return -errno;
        if (!S_ISREG(st.st_mode) || (uint64_t) st.st_dev != u->dev || (uint64_t) st.st_ino != u->ino)
                return 0; /* replaced: a file we did not make */
        if (pread(fd, h, sizeof(h), 0) != (ssize_t) sizeof(h) || be32(h) != QCOW2_MAGIC)
                return 0;
        offset = be64(h + 8);
        size = be32(h + 16);
        if (size != len || len > sizeof(name) || offset == 0 || offset > BACKING_OFFSET_MAX)
                return 0; /* no backing, or another one */
        if (pread(fd, name, len, (off_t) offset) != (ssize_t) len)
                return 0;
        return memcmp(name, backing, len) == 0;
}

/* Looking at the overlays again by path takes the daemon's one thread a time that follows the
 * paths (up to 4,000 bytes each, 4,096 overlays a cache, 64 caches), and anyone may ask for it:
 * Users, Stop(), a ProvisionDisk at its share. So those looks are paced daemon-wide, in units of
 * one open and 64 bytes of path: CHECK_RATE a second after a burst of CHECK_BURST. A refresh that
 * finds none left is skipped (the counts stand until a later one); one that starts goes on to
 * its end, into debt if it must, which the next ones wait out: a few per cent of the thread's
 * time on average. */
#define CHECK_RATE 20000.0
#define CHECK_BURST 300000.0
#define CHECK_PATH_BYTES 64U

/* A test hook makes both smaller: N a second after a burst of N. */
static double check_rate(void) {
        return (double) test_hook_bound("BLOCKSTREAM_TEST_CACHE_CHECKS", (unsigned) CHECK_RATE);
}

static double check_burst(void) {
        return (double) test_hook_bound("BLOCKSTREAM_TEST_CACHE_CHECKS", (unsigned) CHECK_BURST);
}

int cache_users_refresh(Cache *c) {
        _cleanup_free_ char *backing = strdup_printf("nbd+unix:///%s?socket=%s", CACHE_EXPORT_NAME, c->socket_path);
        TokenBucket *budget = &c->engine->cache_checks;
        unsigned before = c->users;
        size_t k = 0;

        if (!backing)
                return -ENOMEM;
        token_bucket_refill(budget, check_rate(), check_burst(), now_usec(CLOCK_MONOTONIC));
        if (budget->tokens <= 0) {
                log_debug("Template cache %u: its overlays are not looked at again now (the looks are paced).", c->id);
                return -EAGAIN;
        }
        for (size_t i = 0; i < c->n_user_list; i++) {
                CacheUser *u = &c->user_list[i];

                budget->tokens -= 1.0 + (double) (strlen(u->path) / CHECK_PATH_BYTES);
                if (user_check(c, u, backing) == 0) {
                        log_info("Template cache %u: %s no longer is an overlay over it.", c->id, u->path);
                        free(u->path);
                        continue;
                }
                c->user_list[k++] = *u;
        }
        c->n_user_list = k;
        c->users = (unsigned) (c->n_user_list + c->users_untracked);
        return c->users != before;
}

/* The uids of c's users into out (room for c->n_untracked_uids + c->n_user_list): the untracked
 * ones, and the overlays' owners if tracked. How many (repeats and root not taken out). */
static size_t cache_uids(const Cache *c, bool tracked, uid_t *out) {
        size_t n = 0;

        for (size_t i = 0; i < c->n_untracked_uids; i++)
                out[n++] = c->untracked_uids[i];
        for (size_t i = 0; tracked && i < c->n_user_list; i++)
                out[n++] = c->user_list[i].uid;
        return n;
}

/* "overlay_uids": the untracked users' uids, and the overlays' owners if tracked. */
static int uids_to_json(json_object *k, const Cache *c, bool tracked) {
        _cleanup_free_ uid_t *all = malloc(MAX(c->n_untracked_uids + c->n_user_list, (size_t) 1) * sizeof(uid_t));
        json_object *a = json_object_new_array();
        size_t n;

        if (!all || !a || json_object_object_add(k, "overlay_uids", a) < 0) {
                json_object_put(a);
                return -ENOMEM;
        }
        n = MIN(uids_sorted_unique(all, cache_uids(c, tracked, all)), (size_t) UNTRACKED_UIDS_MAX);
        for (size_t i = 0; i < n; i++)
                if (json_object_array_add(a, json_object_new_uint64(all[i])) < 0)
                        return -ENOMEM;
        return 0;
}

/* "users": the count, as before; "overlays": [{"path", "dev", "ino"}]. A record without
 * "overlays" (an older daemon's) keeps its count, never counted down. */
int cache_users_to_json(Cache *c, json_object *k, bool overlays) {
        json_object *a;

        /* Without the overlays' paths, their owners at least: their QEMUs must still reach it. */
        if (!overlays)
                return uids_to_json(k, c, true);
        if (c->n_untracked_uids > 0 && uids_to_json(k, c, false) < 0)
                return -ENOMEM;
        a = json_object_new_array();
        if (!a || json_object_object_add(k, "overlays", a) < 0) {
                json_object_put(a);
                return -ENOMEM;
        }
        for (size_t i = 0; i < c->n_user_list; i++) {
                json_object *u = json_object_new_object();

                if (!u || json_object_array_add(a, u) < 0) {
                        json_object_put(u);
                        return -ENOMEM;
                }
                if (json_object_object_add(u, "path", json_object_new_string(c->user_list[i].path)) < 0 ||
                        json_object_object_add(u, "dev", json_object_new_uint64(c->user_list[i].dev)) < 0 ||
                        json_object_object_add(u, "ino", json_object_new_uint64(c->user_list[i].ino)) < 0 ||
                        json_object_object_add(u, "uid", json_object_new_uint64(c->user_list[i].uid)) < 0)
                        return -ENOMEM;
        }
        return 0;
}

int cache_users_from_json(Cache *c, json_object *k, unsigned count) {
        json_object *a;
        size_t n;
        int r;

        if (json_object_object_get_ex(k, "overlay_uids", &a) && json_object_is_type(a, json_type_array) &&
                (n = json_object_array_length(a)) > 0) {
                uid_t *l = reallocarray(NULL, n, sizeof(uid_t));
                size_t m = 0;

                if (!l)
                        return -ENOMEM;
                for (size_t i = 0; i < n; i++) {
                        json_object *u = json_object_array_get_idx(a, i);

                        if (json_object_is_type(u, json_type_int) && json_object_get_uint64(u) < UINT32_MAX)
                                l[m++] = (uid_t) json_object_get_uint64(u);
                }
                m = uids_sorted_unique(l, m);
                if (m > UNTRACKED_UIDS_MAX) {
                        log_warning("Template cache %u: more than %u users untracked; the QEMUs of the rest cannot "
                                    "reach it.",
                                c->id, (unsigned) UNTRACKED_UIDS_MAX);
                        m = UNTRACKED_UIDS_MAX;
                }
                free(c->untracked_uids);
                c->untracked_uids = l;
                c->n_untracked_uids = m;
        }
        if (!json_object_object_get_ex(k, "overlays", &a) || !json_object_is_type(a, json_type_array)) {
                c->users_untracked = count;
                c->users = count;
                return 0;
        }
        n = json_object_array_length(a);
        for (size_t i = 0; i < n && i < CACHE_USERS_MAX; i++) {
                json_object *u = json_object_array_get_idx(a, i), *p, *dev, *ino, *uid;
                uint64_t owner = 0;
                const char *path;

                if (!json_object_is_type(u, json_type_object) || !json_object_object_get_ex(u, "path", &p) ||
                        !json_object_is_type(p, json_type_string) || !json_object_object_get_ex(u, "dev", &dev) ||
                        !json_object_is_type(dev, json_type_int) || !json_object_object_get_ex(u, "ino", &ino) ||
                        !json_object_is_type(ino, json_type_int))
                        continue;
                path = json_object_get_string(p);
                /* Only ever opened beneath the image directories, with no symlink; a name that is
                 * not a normalized absolute path is no overlay of ours. */
                if (!path_is_safe_absolute(path, PATH_MAX - 1))
                        continue;
                if (json_object_object_get_ex(u, "uid", &uid) && json_object_is_type(uid, json_type_int))
                        owner = json_object_get_uint64(uid);
                if (owner >= UINT32_MAX)
                        owner = 0; /* no uid: root's, as an overlay made by root */
                r = user_push(c, path, json_object_get_uint64(dev), json_object_get_uint64(ino), (uid_t) owner);
                if (r < 0)
                        return r;
        }
        /* Users whose record was unfit are counted still, never counted down. */
        if (count > c->n_user_list + c->users_untracked)
                c->users_untracked = count - (unsigned) c->n_user_list;
        c->users = (unsigned) (c->n_user_list + c->users_untracked);
        return 0;
}

/* Who may connect: POSIX ACLs ("system.posix_acl_access", the kernel's format: a version, then
 * entries sorted by tag and id). Unix sockets take write permission to connect. */

#define ACL_XATTR "system.posix_acl_access"
#define ACL_VERSION 2
#define ACL_USER_OBJ 0x01
#define ACL_USER 0x02
#define ACL_GROUP_OBJ 0x04
#define ACL_MASK 0x10
#define ACL_OTHER 0x20
#define ACL_NO_ID UINT32_MAX
#define ACL_UIDS_MAX (CACHE_USERS_MAX + 256)

static void acl_put(uint8_t *p, unsigned tag, unsigned perm, uint32_t id) {
        p[0] = tag & 0xff, p[1] = tag >> 8, p[2] = perm & 0xff, p[3] = perm >> 8;
        p[4] = id & 0xff, p[5] = (id >> 8) & 0xff, p[6] = (id >> 16) & 0xff, p[7] = id >> 24;
}

/* On the file fd names (an O_PATH fd is fine): the owner owner_perm, users[] perm, nobody else. */
static int fd_set_acl(int fd, unsigned owner_perm, const uid_t *uids, size_t n, unsigned perm) {
        char proc[64];
        _cleanup_free_ uint8_t *buf = NULL;
        size_t k = 4;

        snprintf(proc, sizeof(proc), "/proc/self/fd/%i", fd);
        if (n == 0) {
                if (removexattr(proc, ACL_XATTR) < 0 && errno != ENODATA)
                        return -errno;
                /* The group bits held the old mask: the owner's only again. */
                if (chmod(proc, (mode_t) owner_perm << 6) < 0)
                        return -errno;
                return 0;
        }
        buf = malloc(4 + 8 * (n + 4));
        if (!buf)
                return -ENOMEM;
        buf[0] = ACL_VERSION, buf[1] = buf[2] = buf[3] = 0;
        acl_put(buf + k, ACL_USER_OBJ, owner_perm, ACL_NO_ID), k += 8;
        for (size_t i = 0; i < n; i++)
                acl_put(buf + k, ACL_USER, perm, (uint32_t) uids[i]), k += 8;
        acl_put(buf + k, ACL_GROUP_OBJ, 0, ACL_NO_ID), k += 8;
        acl_put(buf + k, ACL_MASK, perm, ACL_NO_ID), k += 8;
        acl_put(buf + k, ACL_OTHER, 0, ACL_NO_ID), k += 8;
        if (setxattr(proc, ACL_XATTR, buf, k, 0) < 0)
                return -errno;
        return 0;
}

/* The uids for c (NULL: all caches), sorted, once each, root left out (it needs no entry), at
 * most ACL_UIDS_MAX of them into uids: told apart before any is left out, so that one user's many
 * overlays cannot push the others out (QEMUUsers= first among those kept). */
static size_t access_uids(Engine *e, Cache *only, uid_t *uids) {
        _cleanup_free_ uid_t *all = NULL;
        size_t total = 0, n = 0, q, k;

        for (Cache *c = e->caches; c; c = c->next)
                if (!only || c == only)
                        total += c->n_user_list + c->n_untracked_uids;
        all = malloc(MAX(total, (size_t) 1) * sizeof(uid_t));
        if (!all) {
                log_oom();
                return 0;
        }
        for (Cache *c = e->caches; c; c = c->next)
                if (!only || c == only)
                        n += cache_uids(c, true, all + n);
        n = uids_sorted_unique(all, n);
        for (q = 0; q < e->config.n_qemu_users && q < ACL_UIDS_MAX; q++)
                uids[q] = e->config.qemu_users[q];
        q = uids_sorted_unique(uids, q);
        k = q;
        for (size_t i = 0; i < n; i++) {
                if (bsearch(&all[i], uids, q, sizeof(uid_t), uid_cmp))
                        continue;
                if (k >= ACL_UIDS_MAX) {
                        log_warning("Template caches: more than %u users' QEMUs would reach them; the rest cannot.",
                                (unsigned) ACL_UIDS_MAX);
                        break;
                }
                uids[k++] = all[i];
        }
        qsort(uids, k, sizeof(uid_t), uid_cmp);
        return k;
}

static int path_set_acl(
        const char *path, mode_t type, unsigned owner_perm, const uid_t *uids, size_t n, unsigned perm) {
        _cleanup_close_ int fd = open(path, O_PATH | O_NOFOLLOW | O_CLOEXEC);
        struct stat st;

        if (fd < 0)
                return -errno;
        /* Ours: made by us in directories only root could write to. */
        if (fstat(fd, &st) < 0)
                return -errno;
        if ((st.st_mode & S_IFMT) != type || st.st_uid != 0)
                return -EPERM;
        return fd_set_acl(fd, owner_perm, uids, n, perm);
}

void cache_access_update(Engine *e) {
        _cleanup_free_ uid_t *uids = calloc(ACL_UIDS_MAX, sizeof(uid_t));
        _cleanup_free_ char *dir = strdup_printf("%s/caches", e->runtime_dir);
        size_t n;
        int r;

        if (!uids || !dir) {
                log_oom();
                return;
        }
        /* The directories: search only, for the users of any cache; no listing, no writing. */
        n = access_uids(e, NULL, uids);
        r = path_set_acl(e->runtime_dir, S_IFDIR, 7, uids, n, 1);
        if (r >= 0)
                r = path_set_acl(dir, S_IFDIR, 7, uids, n, 1);
        if (r < 0)
                log_warning_errno(r, "Template caches: cannot let their users' QEMUs reach %s: %m", dir);
        for (Cache *c = e->caches; c; c = c->next) {
                if (c->listen_fd < 0)
                        continue;
                n = access_uids(e, c, uids);
                r = path_set_acl(c->socket_path, S_IFSOCK, 7, uids, n, 6);
                if (r < 0)
                        log_warning_errno(r, "Template cache %u: cannot let its users' QEMUs reach %s: %m", c->id,
                                c->socket_path);
        }
}

unsigned cache_overlays_per_user_max(void) {
        return test_hook_bound("BLOCKSTREAM_TEST_CACHE_OVERLAYS_PER_USER_MAX", CACHE_OVERLAYS_PER_USER_MAX);
}

unsigned cache_user_overlays(Engine *e, uid_t uid, bool update) {
        unsigned n = 0;

        for (Cache *c = e->caches; c; c = c->next) {
                if (update)
                        cache_users_update(c);
                for (size_t i = 0; i < c->n_user_list; i++)
                        n += c->user_list[i].uid == uid;
                for (CacheWaiter *w = c->waiters; w; w = w->next)
                        n += w->caller == uid;
        }
        return n;
}
