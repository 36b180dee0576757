/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* NBD exports (org.blockstream1.Export).
 *
 * QEMU 7.2 runs one NBD server per process. Every guest's QMP peer (its QEMU, or the storage
 * helper of an offline guest) gets that one server on a unix socket only root can reach: the
 * daemon binds it and hands QEMU the listening fd (getfd + nbd-server-start type fd; peer.c). All
 * exports, private ones for range streaming and the users' ones, live on it under their own
 * names. A user's export listens where the user asked (a unix socket in the guest's runtime dir,
 * or TCP), on a socket the daemon binds; a sandboxed relay helper accepts clients there and, for
 * each, receives a fresh connection to the private server from the daemon, and moves bytes. */

#include <stdbool.h>
#include <systemd/sd-bus.h>

typedef struct Guest Guest;
typedef struct Engine Engine;
typedef struct Export Export;

#include "blockstream-api.h" /* EXPORT_PATH_PREFIX */

extern const sd_bus_vtable export_vtable[];

/* Export(options) of g's disk alias (its BlockStream object at disk_path): listen is "unix"
 * (default) or "tcp:ADDR:PORT"; the method call is answered once the export serves (or failed).
 * Authorization is the caller's. */
int export_create(Guest *g, const char *alias, const char *disk_path, sd_bus_message *msg, const char *listen,
        sd_bus_error *error);
/* Check a listen option without doing anything. */
int export_listen_valid(const char *listen, sd_bus_error *error);

void export_free_all(Engine *m);

/* After a restart: the exports of the state (their guests loaded already) listen again at once;
 * export_resume() sets them up in QEMU once g's peer is there again (its (re)connect), and
 * export_guest_unreachable() drops them if g's QEMU is not. An export that cannot be served
 * again is dropped with its socket and record. */
int export_restore_all(Engine *m);
void export_resume(Guest *g);
void export_guest_unreachable(Guest *g);

int export_object_find(sd_bus *bus, const char *path, const char *interface, void *userdata, void **found,
        sd_bus_error *error);
int export_node_enumerator(sd_bus *bus, const char *path, void *userdata, char ***nodes, sd_bus_error *error);
