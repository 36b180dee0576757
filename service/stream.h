/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* The BlockStream object (one per disk): its methods and properties over the disk record and
 * its job (disk.h). */

#include <systemd/sd-bus.h>

#include "disk.h"

extern const sd_bus_vtable stream_vtable[];

/* An offline guest's full stream whose storage helper died with the daemon: start it again in
 * a new helper as the same job (what is local is skipped). < 0: it could not even be tried. */
int stream_resume_offline(Disk *d);

int disk_object_find(sd_bus *bus, const char *path, const char *interface, void *userdata, void **found,
        sd_bus_error *error);
