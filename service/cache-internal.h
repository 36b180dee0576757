/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* What cache.c (caches, their helpers, state) and cache-object.c (their D-Bus objects) share. */

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

typedef struct Cache Cache;

typedef enum CacheState {
        CACHE_STARTING,
        CACHE_SERVING,
        CACHE_FAILED,
} CacheState;

typedef struct CacheWaiter {
        struct CacheWaiter *next;
        provision_cache_ready_t ready;
        void *provision;
} CacheWaiter;

struct Cache {
        Engine *engine;
        Cache *next;
        unsigned id;
        char *url;
        char *format; /* the template's: raw or qcow2 */
        uint64_t size;
        unsigned users; /* overlays provisioned over it */
        char *object_path;
        char *socket_path;
        char *image_name; /* in state_dir/caches */
        int image_fd;
        int listen_fd;
        CacheState state;
        bool fresh;           /* made for provisionings none of which has finished yet: no object */
        CacheWaiter *waiters; /* provisionings waiting for it to serve */
        unsigned in_flight;   /* provisionings told to go on, whose overlay is not yet made */
        bool stopping;        /* its helper is being stopped for good */
        bool warmed;          /* Warm() completed: the image holds all and names no backing */
        unsigned restarts;
        pid_t pid;
        sd_event_source *child;
        HelperLog *log;
        Qmp *qmp;
        unsigned pending; /* setup commands not yet answered */
        bool setup_failed;
        sd_event_source *leftover_timer;
        usec_t leftover_deadline;
        sd_bus_message *warm_call; /* Warm() waiting for its job */
};

/* "starting", "serving", "failed" */
const char *cache_state_name(const Cache *c);
/* Remove a cache for good: its helper, socket, image and object. */
void cache_destroy(Cache *c);
