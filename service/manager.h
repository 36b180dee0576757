/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* The Manager object and the registry of guests. */

#include <systemd/sd-bus.h>
#include <systemd/sd-event.h>

#include "config.h"
#include "engine.h"

typedef struct Guest Guest;

#include "blockstream-api.h" /* BUS_NAME, MANAGER_PATH, GUEST_PATH_PREFIX */

typedef struct Manager {
        Engine engine; /* what the objects below share (engine.h) */

        Guest *guests; /* doubly linked, registration order */
        unsigned n_guests;
} Manager;

/* Where our own helper binaries are (HelperDirectory=, default the libexec dir). */
const char *manager_helper_dir(Manager *m);

int manager_new(Manager **ret, sd_event *e, const char *config_path, bool config_explicit, const char *state_dir,
        const char *runtime_dir);
Manager *manager_free(Manager *m);
int manager_connect_bus(Manager *m);
/* Load persisted guests (before the bus), then connect them to QEMU (after). */
int manager_load_state(Manager *m);
void manager_start_guests(Manager *m);

Guest *manager_find_guest(Manager *m, const char *name);
/* A guest's sandbox identity (helper uid, MCS pair, SELinux labels where enabled). */
int manager_allocate_identity(Manager *m, Guest *g);
bool manager_identity_valid(Manager *m, Guest *g);
int manager_identity_labels(Manager *m, Guest *g);
/* The storage helper's identity of a restored guest, checked (after its helpers' identity): 0 kept
 * or none, 1 dropped (to be saved), or -errno. */
int manager_storage_identity_restore(Manager *m, Guest *g);
/* The same for a template cache (engine.h's identity_allocate, identity_free): self is the cache. */
int manager_identity_allocate(Engine *e, const void *self, uid_t *ret_uid, unsigned *ret_c1, unsigned *ret_c2);
bool manager_identity_free(Engine *e, const void *self, uid_t uid, unsigned c1, unsigned c2);
/* The disks of guests that are not running (registered and checked by us), and those that
 * running guests' QEMUs report (their word: see image_chain_open_claimed()); but except's. */
char **manager_guest_images(Manager *m, Guest *except);
char **manager_guest_claims(Manager *m, Guest *except);
void manager_link_guest(Manager *m, Guest *g);
void manager_unlink_guest(Manager *m, Guest *g);
