/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* Allocation maps: block status on a plain export of the disk, read by the pull helper in map
 * mode (rangeop.h). */

#include <stdint.h>
#include <systemd/sd-bus.h>

typedef struct Disk Disk;

/* GetAllocationMap: answers msg with a(ttus). */
int map_get(Disk *d, sd_bus_message *msg, uint64_t offset, uint64_t length, sd_bus_error *error);
/* The disk's QEMU stream job is over: remove the export its maps shared, once unused (the
 * disk calls it through d->map_export_releaser). */
void map_export_release(Disk *d);
