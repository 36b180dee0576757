/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* The single authorization step every method goes through. */

#include <systemd/sd-bus.h>
#include <sys/types.h>

/* The authorizations in flight: one registry for the daemon, on its bus connection. Opaque. */
typedef struct PolkitRegistry PolkitRegistry;

#include "blockstream-api.h" /* ACTION_* */

typedef struct AuthDetails {
        const char *guest; /* NULL where no guest is concerned (ProvisionDisk) */
        const char *disk;
        uid_t owner; /* the guest's owner; (uid_t) -1 if none */
} AuthDetails;

/* 1: allowed, go on. 0: the answer is pending: return 1 from the method handler (0 would make
 * sd-bus answer UnknownMethod); the call is dispatched again once the answer is in.
 * <0: refused or failed; error is set. */
int bus_authorize(PolkitRegistry *registry, sd_bus_message *msg, const char *action, const AuthDetails *details,
        sd_bus_error *error);

int polkit_registry_new(PolkitRegistry **ret, sd_bus *bus);
PolkitRegistry *polkit_registry_free(PolkitRegistry *registry);
/* Watch callers leaving the bus (one match rule); before the bus name is requested. */
int polkit_registry_attach(PolkitRegistry *registry);
