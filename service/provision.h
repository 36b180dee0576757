/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include <stdint.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <systemd/sd-bus.h>
#include <systemd/sd-event.h>

#include "config.h"

/* What a provisioning needs of the daemon: its event loop, its configuration (which outlives
 * every provisioning), and the images of registered guests, which no template may be (borrowed:
 * used before provision_disk() returns). */
/* Option "cache": the overlay is made over the host's cache of the remote template (cache.h), not
 * over the remote itself, once the cache serves. acquire() finds or makes the cache and calls
 * ready(provision, …) once it serves (perhaps before it returns): with the NBD URL to name as the
 * overlay's backing and a handle, or error < 0 and why. It returns < 0 (error set) if it could not
 * even begin; ready() is not called then. done() says whether the overlay was made (a cache made for
 * provisionings that all failed goes away). */
typedef void (*provision_cache_ready_t)(void *provision, int error, const char *why, const char *backing, void *handle);
typedef struct ProvisionCache {
        int (*acquire)(void *userdata, uid_t caller, const char *url, const char *format, uint64_t size,
                provision_cache_ready_t ready, void *provision, sd_bus_error *error);
        /* The overlay at target (st: its fstat) was made over the cache, or not (!success). */
        void (*done)(void *userdata, void *handle, bool success, const char *target, const struct stat *st);
        void *userdata; /* outlives every provisioning */
} ProvisionCache;

typedef struct ProvisionContext {
        sd_event *event;
        const Config *config;
        char **forbidden_images;
        const ProvisionCache *cache; /* NULL: no cache */
} ProvisionContext;

/* ProvisionDisk: validates, then answers msg with the overlay's virtual size once it exists.
 * format: the template's (NULL: qcow2 for a file, raw for a URL); size: 0 = the template's. */
int provision_disk(const ProvisionContext *ctx, sd_bus_message *msg, const char *template, const char *target, const char *format,
        uint64_t size, uid_t caller, sd_bus_error *error);
