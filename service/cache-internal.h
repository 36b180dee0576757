/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* What cache.c (caches, their helpers, state) and cache-object.c (their D-Bus objects) share. */

#include <json-c/json.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <systemd/sd-bus.h>
#include <systemd/sd-event.h>

#include "engine.h"
#include "helper.h"
#include "provision.h"
#include "qmp.h"

#define CACHE_EXPORT_NAME "cache"
/* Connections the cache's QEMU serves at once, and its relay: one for each guest disk over it.
 * Given, not left to QEMU, whose default is 100 where it has the fix for CVE-2024-7409 (Debian's
 * 7.2): the 101st guest started over one template would wait for a free one. Below QEMU's
 * RLIMIT_NOFILE (1024), so that it stops accepting at the limit rather than failing accept() on
 * each. */
#define CACHE_CLIENTS_MAX 768U

typedef struct Cache Cache;

typedef enum CacheState {
        CACHE_STARTING,
        CACHE_SERVING,
        CACHE_FAILED,
} CacheState;

/* An overlay made over the cache (cache-users.c): where, and which file. */
typedef struct CacheUser {
        char *path;
        uint64_t dev;
        uint64_t ino;
        uid_t uid; /* its owner: whose QEMU may reach the cache's socket */
} CacheUser;

typedef struct CacheWaiter {
        struct CacheWaiter *next;
        provision_cache_ready_t ready;
        void *provision;
        uid_t caller; /* whose ProvisionDisk: counted in their share meanwhile */
} CacheWaiter;

struct Cache {
        Engine *engine;
        Cache *next;
        unsigned id;
        char *url;
        char *format; /* the template's: raw or qcow2 */
        uint64_t size;
        unsigned users; /* overlays over it (cache-users.c): n_user_list + users_untracked */
        CacheUser *user_list;
        size_t n_user_list;
        unsigned users_untracked; /* beyond the list, or from an older record: never counted down */
        /* The uids of those untracked users, as far as a record kept them: their QEMUs may still
         * reach the cache (its socket's ACL), never taken back. */
        uid_t *untracked_uids;
        size_t n_untracked_uids;
        char *object_path;
        char *socket_path;
        char *image_name; /* in state_dir/caches */
        uid_t uid;        /* its helper's sandbox identity (uid = gid), its own: no guest's, no other cache's */
        uid_t creator;    /* whose ProvisionDisk made it (0: root's, or a record from before) */
        unsigned mcs_c1, mcs_c2;
        char *process_label; /* SELinux, where enabled: its helper's, and its image's (same MCS pair) */
        char *image_label;
        int image_fd;
        int listen_fd;      /* socket_path's: the relay accepts on it */
        char *upstream_path; /* QEMU's own socket, root's only: the relay's upstreams */
        int upstream_fd;
        /* its NBD relay (cache-relay.c), started and stopped with the helper */
        pid_t relay_pid;
        sd_event_source *relay_child;
        int relay_control_fd;
        sd_event_source *relay_source;
        HelperPace relay_pace;
        HelperLog *relay_log;
        LogLimit relay_errors;
        CacheState state;
        bool fresh;           /* made for provisionings none of which has finished yet: no object */
        CacheWaiter *waiters; /* provisionings waiting for it to serve */
        unsigned n_waiters;
        unsigned in_flight;   /* provisionings told to go on, whose overlay is not yet made */
        bool stopping;        /* its helper is being stopped for good */
        bool warmed;          /* Warm() completed: the image holds all and names no backing */
        unsigned restarts;    /* of a helper that died serving, since one served CACHE_SERVED_USEC */
        usec_t serving_since; /* CLOCK_MONOTONIC */
        pid_t pid;
        sd_event_source *child;
        HelperLog *log;
        Qmp *qmp;
        unsigned pending; /* setup commands not yet answered */
        bool setup_failed;
        sd_event_source *leftover_timer;
        usec_t leftover_deadline;
        sd_bus_message *warm_call; /* Warm() waiting for its job */
        /* The properties anyone may read, Users and Clients, each looked at once a second at
         * most (image opens, a sock_diag dump of the unix sockets): CLOCK_MONOTONIC of the last look, and its count. */
        usec_t users_read_at, clients_read_at;
        unsigned clients;
};

/* "starting", "serving", "failed" */
const char *cache_state_name(const Cache *c);
/* Remove a cache for good: its helper, socket, image and object. */
void cache_destroy(Cache *c);

/* cache-users.c: the overlays over a cache. add: one made (st: its fstat); refresh: drop those
 * that are no overlay over it any more, true if the count changed; to/from json: the record's
 * "overlays" (count: its "users"). */
struct stat;
int cache_user_add(Cache *c, const char *path, const struct stat *st);
int cache_users_refresh(Cache *c);
/* No room for one more overlay in c's list (those being made, and those waiting for the cache to
 * serve, counted): its owner would be left out of the socket's ACL. */
bool cache_users_full(const Cache *c);
/* overlays: with each overlay's path (else their owners' uids only, a record too large). */
int cache_users_to_json(Cache *c, json_object *k, bool overlays);
int cache_users_from_json(Cache *c, json_object *k, unsigned count);
void cache_users_free(Cache *c);
/* Refresh the users, and tell the bus if their count changed. false: not looked at now (paced,
 * see cache-users.c), the count is the last one. */
bool cache_users_update(Cache *c);
/* How many overlays over any cache uid made, or waits to make (each cache's users looked at again
 * first if update); at most cache_overlays_per_user_max() for a user other than root. */
#define CACHE_OVERLAYS_PER_USER_MAX 1024U
unsigned cache_overlays_per_user_max(void);
unsigned cache_user_overlays(Engine *e, uid_t uid, bool update);
/* Who may connect to the caches' sockets (cache-users.c): the owners of their overlays and the
 * QEMUUsers= uids, by POSIX ACLs on each socket (read-write) and on the directories above it
 * (search only); nobody else. Applied again whenever a socket is made or the users change. */
void cache_access_update(Engine *e);

/* cache-relay.c: the relay between the cache's clients and its QEMU. listen: the clients' socket
 * (listen_fd, at socket_path) and QEMU's own (upstream_fd, at upstream_path); relay_start: the
 * relay, accepting on listen_fd; relay_stop: it goes (killed and reaped), if it runs. */
int cache_listen(Cache *c);
int cache_relay_start(Cache *c);
void cache_relay_stop(Cache *c);

/* Answer the Warm call waiting (error_name NULL: done), if any. */
void cache_warm_reply(Cache *c, const char *error_name, const char *why);

/* caches.json's size at most, written and read: 64 caches of 4096 users each, with room. */
#define CACHES_RECORD_MAX (64U << 20)

/* cache-record.c: write caches.json (logged on failure). */
int caches_save(Engine *e);

/* cache-identity.c: its sandbox identity. allocate: a new one (-ENOSPC: none left); to_json: the
 * record's "helper_uid", "mcs_c1", "mcs_c2"; restore: from the record, or none (uid 0, returns 1)
 * if that is not free, for cache_spawn() to allocate. The SELinux labels follow. */
int cache_identity_allocate(Cache *c);
int cache_identity_to_json(Cache *c, json_object *k);
int cache_identity_restore(Cache *c, json_object *k);

/* cache-blockdev.c: blockdev-add arguments. A node of driver over file. */
json_object *cache_blockdev_node(const char *driver, const char *node, const char *file);
/* The template (unless the image is warmed: it stands alone): its protocol node at url, read-only
 * (NULL on OOM, or for a URL this cannot give QEMU), then its format node on that, read-only, with
 * no backing of its own; then the cache image's qcow2 node "cache" over its file node "cf", with
 * the template's node as its backing. */
#define CACHE_TEMPLATE_FILE_NODE "tf"
#define CACHE_TEMPLATE_NODE "tpl"
json_object *cache_template_file_blockdev(const char *url);
json_object *cache_template_blockdev(const char *format);
json_object *cache_image_blockdev(bool warmed);
/* Whether cache_template_file_blockdev() can give QEMU the template at url. */
bool cache_template_url_ok(const char *url);
