/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* The host template cache (issue 14 §2): one per remote template URL. A sandboxed storage helper
 * (`qemu-system-x86_64 -machine none`, in a sandbox identity of its own: uid and MCS pair from the
 * guests' allocator) opens a local qcow2 image whose backing is the remote template, puts a
 * copy-on-read filter on it and serves that read-only over NBD on a unix socket of ours; overlays
 * provisioned with option "cache" are made over that socket, so every block of the template crosses
 * the network once per host. Recorded in state_dir/caches.json, the image in
 * state_dir/caches/N.qcow2; the socket is runtime_dir/caches/N.sock. */

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <systemd/sd-bus.h>

#include "engine.h"
#include "provision.h"

typedef struct Cache Cache;

/* ProvisionDisk's hooks (provision.h's ProvisionCache): the cache of url, made and started if there
 * is none (or started again if it failed); ready() once it serves, with the URL an overlay's header
 * names to use it and the handle for cache_provisioned(). A caller other than root makes at most
 * CACHES_PER_USER_MAX caches (LimitsExceeded). */
#define CACHES_PER_USER_MAX 4
int cache_acquire(Engine *e, uid_t caller, const char *url, const char *format, uint64_t size,
        provision_cache_ready_t ready, void *provision, sd_bus_error *error);
/* The overlay over handle's cache was made (success) or not: a cache made for it alone goes away. */
struct stat;
void cache_provisioned(Engine *e, void *handle, bool success, const char *target, const struct stat *st);

/* Whether a cache other than self has this helper uid, or this MCS pair (the allocator's view). */
bool cache_uid_taken(Engine *e, const void *self, uid_t uid);
bool cache_mcs_taken(Engine *e, const void *self, unsigned c1, unsigned c2);

/* Load state_dir/caches.json and start each cache's helper (at start, before the bus). */
int cache_load_all(Engine *e);
void cache_free_all(Engine *e);

extern const sd_bus_vtable cache_vtable[];
int cache_object_find(
        sd_bus *bus, const char *path, const char *interface, void *userdata, void **found, sd_bus_error *error);
int cache_node_enumerator(sd_bus *bus, const char *path, void *userdata, char ***nodes, sd_bus_error *error);
