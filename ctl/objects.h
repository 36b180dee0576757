/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* The daemon's objects as the CLI sees them: a guest's and a disk's properties (one table per
 * interface drives parsing, JSON output and freeing), looked up by name or all at once. */

#include <stdbool.h>
#include <stdint.h>
#include <systemd/sd-bus.h>

#include "output.h"

typedef struct Property {
        const char *name;
        const char *signature; /* s, o, t, u, b, as, ao */
        size_t offset;
} Property;

/* Reads an a{sv} into data, each property at its offset; bit i of *present is set for props[i].
 * Unknown properties and ones of an unexpected type are skipped: a newer server may add some,
 * and a wrong type is the server's bug, not a reason to fail. */
int properties_map(sd_bus_message *m, const Property *props, size_t n, void *data, uint64_t *present);

/* Walks one object's a{sa{sv}} (its value in GetManagedObjects): fn gets each interface's name
 * with the message at that interface's a{sv}, which it must read or skip. */
typedef int (*interface_handler_t)(sd_bus_message *m, const char *iface, void *userdata);
int object_interfaces_foreach(sd_bus_message *m, interface_handler_t fn, void *userdata);

typedef struct GuestInfo {
        char *object;
        uint64_t present; /* bit i: properties[i] was sent by the server */
        char *name;
        char *uuid;
        uint32_t owner;
        bool running;
        char *qmp_socket;
        char **disks;
        char *sandbox_label;
} GuestInfo;

typedef struct DiskInfo {
        char *object;
        uint64_t present;
        char *guest;
        char *device;
        char *target; /* the name the guest's manager gives it, "" if none */
        char *node_name;
        char *path;
        char **backing_chain;
        uint64_t size;
        char *state;
        char *mode;
        uint64_t offset, length;
        uint64_t bytes_done, bytes_total;
        uint64_t bandwidth, rate;
        uint64_t start_time, expected_end_time;
        char *error;
        uint64_t max_guest_latency, guest_read_p99, speed_limit; /* µs, µs, bytes/s */
        char *throttle_reason;
} DiskInfo;

typedef struct Registry {
        GuestInfo **guests;
        size_t n_guests;
        DiskInfo **disks;
        size_t n_disks;
} Registry;

GuestInfo *guest_info_free(GuestInfo *g);
void guest_info_freep(GuestInfo **g);
DiskInfo *disk_info_free(DiskInfo *d);
void disk_info_freep(DiskInfo **d);

/* GetAll of the disk's properties into d; *ret_cookie (if not NULL) is the reply's serial, to
 * tell older signals from newer ones. */
int disk_info_refresh(sd_bus *bus, DiskInfo *d, uint64_t *ret_cookie);
/* Reads an a{sv} of the disk's properties (GetAll's reply, PropertiesChanged) into d. */
int disk_info_update(sd_bus_message *m, DiskInfo *d);

int get_guest(sd_bus *bus, const char *name, GuestInfo **ret);
int get_disk(sd_bus *bus, const char *path, DiskInfo **ret);
/* DISK on the command line is an alias ("virtio-disk0"), the name given to it at registration
 * (its Target, "vda"), or an image path, looked up in that order. */
int resolve_disk(sd_bus *bus, const char *guest, const char *disk, GuestInfo **ret_guest, DiskInfo **ret);
/* connect_bus() and resolve_disk(): how every command on one disk begins. *ret_bus is the
 * caller's to close as soon as it is connected, also on failure. */
int connect_disk(const char *guest, const char *disk, sd_bus **ret_bus, DiskInfo **ret);

void registry_done(Registry *reg);
/* All guests (sorted by name) and disks, from GetManagedObjects. */
int load_registry(sd_bus *bus, Registry *reg);
DiskInfo *registry_find_disk(const Registry *reg, const char *path);

bool state_is_active(const char *state);
bool state_is_terminal(const char *state);

/* One guest as list and status print it in JSON: its properties, with "Disks" expanded
 * from object paths to the disks' own properties (each with its "ObjectPath"). */
void json_guest(JsonWriter *w, const GuestInfo *g, DiskInfo *const *disks, size_t n_disks);
