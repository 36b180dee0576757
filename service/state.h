/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* Persistence of registered guests: one JSON file per guest in <state-dir>/guests, written
 * atomically. A file is our own output, but read back as untrusted input all the same. */

#include <json-c/json.h>

typedef struct Guest Guest;
typedef struct Manager Manager;

#define STATE_FILE_MAX (4U * 1024U * 1024U)

int state_save_guest(Guest *g);
int state_remove_guest(Manager *m, const char *name);
/* Create a guest object for every valid state file (unpublished, not connected). */
int state_load_guests(Manager *m);
/* One state file's JSON (file_name: its name, which must match the guest inside) to a guest of m,
 * neither linked nor published: the loader's parse alone (tests/fuzz/fuzz-state.c). */
int state_guest_from_json(Manager *m, json_object *o, const char *file_name, Guest **ret);
