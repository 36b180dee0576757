/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* The Guest object: one QEMU, its QMP connection, its disks. */

#include <stdbool.h>
#include <sys/types.h>
#include <systemd/sd-bus.h>
#include <systemd/sd-event.h>

#include "qemu.h"
#include "qmp.h"

typedef struct Manager Manager;
typedef struct Disk Disk;

extern const sd_bus_vtable guest_vtable[];

typedef struct Guest {
        Manager *manager;
        struct Guest *prev, *next;

        char *name;
        char *uuid;
        char *qmp_socket; /* "" for an offline guest */
        char *object_path;
        uid_t owner;
        uint64_t job_seq; /* makes every job id unique, persisted */

        /* On the bus (and in the state dir). A guest being registered is not yet. */
        bool published;
        sd_bus_message *register_call; /* RegisterGuest waiting for the first connect */

        Qmp *qmp;
        bool running; /* QMP ready */
        bool had_connection;
        sd_event_source *reconnect_timer;
        unsigned reconnect_attempts;
        sd_event_source *poll_timer;
        bool poll_pending;

        Disk **disks;
        size_t n_disks;
} Guest;

int guest_new(Guest **ret, Manager *m, const char *name, const char *qmp_socket, uid_t owner, const char *uuid);
Guest *guest_free(Guest *g);

/* Connect (or reconnect) to QEMU; on success the disks are read and jobs reconciled. */
int guest_connect(Guest *g);
/* Put a registered guest on the bus and into the state dir. */
int guest_publish(Guest *g);
/* Take a guest off the bus, delete its state, free it. */
void guest_unregister(Guest *g);

Disk *guest_find_disk(Guest *g, const char *alias_or_path);
bool guest_has_active_job(Guest *g);
/* Write the guest's state file; logs on failure. */
int guest_save(Guest *g);
/* Poll QEMU's jobs at 4 Hz while one runs. */
void guest_update_polling(Guest *g);
/* Re-read disks from QEMU; handler gets 0 or -errno (error text if QEMU said why). */
typedef void (*guest_refresh_handler_t)(Guest *g, int error, const char *error_desc, void *userdata);
int guest_refresh(Guest *g, guest_refresh_handler_t handler, void *userdata, void (*destroy)(void *));

int guest_object_find(sd_bus *bus, const char *path, const char *interface, void *userdata, void **found,
        sd_bus_error *error);
int guest_node_enumerator(sd_bus *bus, const char *path, void *userdata, char ***nodes, sd_bus_error *error);
