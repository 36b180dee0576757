/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include <stdint.h>
#include <sys/types.h>
#include <systemd/sd-bus.h>

typedef struct Manager Manager;

/* ProvisionDisk: validates, then answers msg with the overlay's virtual size once it exists.
 * format: the template's (NULL: qcow2 for a file, raw for a URL); size: 0 = the template's. */
int provision_disk(Manager *m, sd_bus_message *msg, const char *template, const char *target, const char *format,
        uint64_t size, uid_t caller, sd_bus_error *error);
