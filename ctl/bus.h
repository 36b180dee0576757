/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* Bus access: the connection, method calls, and their errors as the user reads them. */

#include <stdint.h>
#include <systemd/sd-bus.h>

#define PROPERTIES_IFACE "org.freedesktop.DBus.Properties"
#define OBJECT_MANAGER_IFACE "org.freedesktop.DBus.ObjectManager"

/* RegisterGuest waits for QEMU to list its disks, Start for QEMU to accept the job, Export
 * and ProvisionDisk for a helper to come up: all can take longer than sd-bus' 25 s default. */
#define SLOW_CALL_TIMEOUT (120 * USEC_PER_SEC)

int connect_bus(sd_bus **ret);
int new_call(sd_bus *bus, const char *path, const char *iface, const char *member, sd_bus_message **ret);
/* action: the polkit action the server checks for this call (ACTION_*), or NULL for the calls
 * anyone may make (GetGuest, properties, GetManagedObjects): only the former start the agent. */
int call(
        sd_bus *bus, sd_bus_message *m, const char *action, uint64_t timeout, const char *verb, sd_bus_message **reply);
/* A call whose arguments are all of fixed types. */
int call_simple(sd_bus *bus, const char *path, const char *iface, const char *member, const char *action,
        uint64_t timeout, const char *verb, sd_bus_message **reply, const char *types, ...);
int log_parse_error(int r);
/* Opens a method's a{sv} options; the caller appends and closes. */
int append_options_begin(sd_bus_message *m);
