/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include <gtk/gtk.h>

/* The bus names, paths, interfaces and members of docs/api.md */
#include "blockstream-api.h"
#include "format.h"

/* A call may wait for a person typing a password into the polkit agent: no D-Bus timeout. */
#define BS_CALL_TIMEOUT_MSEC G_MAXINT

typedef struct Monitor Monitor;
typedef struct GuestView GuestView;
typedef struct DiskView DiskView;

struct Monitor {
        GtkApplication *app;
        GtkWindow *window;
        GtkLabel *status;
        GtkLabel *empty;
        GtkBox *guests_box;
        GDBusObjectManager *manager;
        GHashTable *guests;  /* object path → GuestView* (owned) */
        GHashTable *disks;   /* object path → DiskView* (owned) */
        GHashTable *exports; /* object path → GDBusProxy* of org.blockstream1.Export (owned) */
};

struct GuestView {
        Monitor *monitor;
        char *path;
        GDBusProxy *proxy; /* NULL until the guest's own object is known */
        GtkWidget *frame;
        GtkLabel *title;
        GtkBox *disks_box;
        gulong props_handler;
};

/* disk.c: one disk's row */
DiskView *disk_view_new(Monitor *m, GDBusProxy *proxy, const char *guest_name);
void disk_view_free(DiskView *d);
GtkWidget *disk_view_widget(DiskView *d);
void disk_view_set_guest_name(DiskView *d, const char *guest_name);
/* Exports changed: the row shows the URI of a serving export of its disk, if any. */
void disk_view_exports_changed(DiskView *d);

