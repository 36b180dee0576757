/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* blockstream-monitor: the guests and disks of blockstreamd in one GTK4 window.
 *
 * Everything comes from the daemon's ObjectManager at /org/blockstream1 (GDBusObjectManagerClient):
 * objects and interfaces added and removed, properties through PropertiesChanged, the end of jobs
 * through Finished. Nothing is polled. When the daemon goes away the manager client drops every
 * object, and when it comes back it reads them all again: the window follows both. */

#include <string.h>

#include "monitor.h"

static char *parent_path(const char *path) {
        const char *slash = strrchr(path, '/');

        return slash && slash != path ? g_strndup(path, (gsize) (slash - path)) : g_strdup("/");
}

static void update_empty(Monitor *m) {
        gtk_widget_set_visible(GTK_WIDGET(m->empty), g_hash_table_size(m->guests) == 0);
}

/* ---- guests */

static void guest_update(GuestView *g) {
        g_autofree char *name = bs_path_name(g->path), *markup = NULL;
        g_autoptr(GVariant) running = NULL, owner = NULL;
        const char *state = "not known yet";

        if (g->proxy) {
                running = g_dbus_proxy_get_cached_property(g->proxy, "Running");
                owner = g_dbus_proxy_get_cached_property(g->proxy, "Owner");
        }
        if (running && g_variant_is_of_type(running, G_VARIANT_TYPE_BOOLEAN))
                state = g_variant_get_boolean(running) ? "running" : "not running";
        if (owner && g_variant_is_of_type(owner, G_VARIANT_TYPE_UINT32))
                markup = g_markup_printf_escaped(
                        "<b>%s</b>  (%s, owner uid %u)", name, state, g_variant_get_uint32(owner));
        else
                markup = g_markup_printf_escaped("<b>%s</b>  (%s)", name, state);
        gtk_label_set_markup(g->title, markup);
}

static void guest_props_changed(GDBusProxy *proxy, GVariant *changed, GStrv invalidated, gpointer user_data) {
        guest_update(user_data);
}

static GuestView *guest_get(Monitor *m, const char *path) {
        GuestView *g = g_hash_table_lookup(m->guests, path);
        g_autofree char *name = NULL;
        GtkWidget *box;

        if (g)
                return g;
        g = g_new0(GuestView, 1);
        g->monitor = m;
        g->path = g_strdup(path);
        name = bs_path_name(path);
        g->frame = gtk_frame_new(NULL);
        g->title = GTK_LABEL(gtk_label_new(NULL));
        gtk_frame_set_label_widget(GTK_FRAME(g->frame), GTK_WIDGET(g->title));
        box = g_object_new(GTK_TYPE_BOX, "orientation", GTK_ORIENTATION_VERTICAL, "spacing", 12, "accessible-role",
                GTK_ACCESSIBLE_ROLE_GROUP, NULL);
        gtk_accessible_update_property(GTK_ACCESSIBLE(box), GTK_ACCESSIBLE_PROPERTY_LABEL, name, -1);
        gtk_widget_set_margin_start(box, 8);
        gtk_widget_set_margin_end(box, 8);
        gtk_widget_set_margin_top(box, 4);
        gtk_widget_set_margin_bottom(box, 8);
        g->disks_box = GTK_BOX(box);
        gtk_frame_set_child(GTK_FRAME(g->frame), box);
        gtk_box_append(m->guests_box, g->frame);
        g_hash_table_insert(m->guests, g->path, g);
        guest_update(g);
        update_empty(m);
        return g;
}

static void guest_set_proxy(GuestView *g, GDBusProxy *proxy) {
        if (g->proxy) {
                g_signal_handler_disconnect(g->proxy, g->props_handler);
                g_clear_object(&g->proxy);
        }
        if (proxy) {
                g->proxy = g_object_ref(proxy);
                g->props_handler = g_signal_connect(proxy, "g-properties-changed", G_CALLBACK(guest_props_changed), g);
        }
        guest_update(g);
}

/* Drops the guest and the rows of its disks (their objects go too, or have gone). */
static void guest_remove(Monitor *m, const char *path) {
        GuestView *g = g_hash_table_lookup(m->guests, path);
        GHashTableIter it;
        gpointer key, value;

        if (!g)
                return;
        g_hash_table_iter_init(&it, m->disks);
        while (g_hash_table_iter_next(&it, &key, &value)) {
                g_autofree char *parent = parent_path(key);
                if (strcmp(parent, path) == 0)
                        g_hash_table_iter_remove(&it);
        }
        guest_set_proxy(g, NULL);
        gtk_box_remove(m->guests_box, g->frame);
        g_hash_table_remove(m->guests, path);
        update_empty(m);
}

static void guest_view_free(gpointer p) {
        GuestView *g = p;

        g_free(g->path);
        g_free(g);
}

/* ---- interfaces of objects */

static void exports_changed(Monitor *m) {
        GHashTableIter it;
        gpointer value;

        g_hash_table_iter_init(&it, m->disks);
        while (g_hash_table_iter_next(&it, NULL, &value))
                disk_view_exports_changed(value);
}

static void export_props_changed(GDBusProxy *proxy, GVariant *changed, GStrv invalidated, gpointer user_data) {
        exports_changed(user_data);
}

static void interface_added(Monitor *m, GDBusObject *object, GDBusInterface *iface) {
        const char *path = g_dbus_object_get_object_path(object);
        GDBusProxy *proxy;
        const char *name;

        if (!G_IS_DBUS_PROXY(iface))
                return;
        proxy = G_DBUS_PROXY(iface);
        name = g_dbus_proxy_get_interface_name(proxy);
        if (strcmp(name, GUEST_INTERFACE) == 0) {
                guest_set_proxy(guest_get(m, path), proxy);
        } else if (strcmp(name, STREAM_INTERFACE) == 0) {
                g_autofree char *parent = parent_path(path), *guest_name = bs_path_name(parent);
                GuestView *g = guest_get(m, parent);
                DiskView *d;

                if (g_hash_table_contains(m->disks, path))
                        return;
                d = disk_view_new(m, proxy, guest_name);
                gtk_box_append(g->disks_box, disk_view_widget(d));
                g_hash_table_insert(m->disks, g_strdup(path), d);
                disk_view_exports_changed(d);
        } else if (strcmp(name, EXPORT_INTERFACE) == 0) {
                if (!g_hash_table_contains(m->exports, path))
                        g_signal_connect(proxy, "g-properties-changed", G_CALLBACK(export_props_changed), m);
                g_hash_table_replace(m->exports, g_strdup(path), g_object_ref(proxy));
                exports_changed(m);
        }
}

static void interface_removed(Monitor *m, GDBusObject *object, GDBusInterface *iface) {
        const char *path = g_dbus_object_get_object_path(object);
        const char *name;

        if (!G_IS_DBUS_PROXY(iface))
                return;
        name = g_dbus_proxy_get_interface_name(G_DBUS_PROXY(iface));
        if (strcmp(name, GUEST_INTERFACE) == 0)
                guest_remove(m, path);
        else if (strcmp(name, STREAM_INTERFACE) == 0)
                g_hash_table_remove(m->disks, path); /* the row goes with its DiskView */
        else if (strcmp(name, EXPORT_INTERFACE) == 0) {
                g_signal_handlers_disconnect_by_func(iface, export_props_changed, m);
                g_hash_table_remove(m->exports, path);
                exports_changed(m);
        }
}

static void on_interface_added(GDBusObjectManager *om, GDBusObject *object, GDBusInterface *iface, gpointer user_data) {
        interface_added(user_data, object, iface);
}

static void on_interface_removed(
        GDBusObjectManager *om, GDBusObject *object, GDBusInterface *iface, gpointer user_data) {
        interface_removed(user_data, object, iface);
}

static void on_object_added(GDBusObjectManager *om, GDBusObject *object, gpointer user_data) {
        GList *ifaces = g_dbus_object_get_interfaces(object);

        /* Guests before their disks, so that a disk finds its guest's frame. */
        for (GList *l = ifaces; l; l = l->next)
                if (G_IS_DBUS_PROXY(l->data) && strcmp(g_dbus_proxy_get_interface_name(l->data), GUEST_INTERFACE) == 0)
                        interface_added(user_data, object, l->data);
        for (GList *l = ifaces; l; l = l->next)
                if (!G_IS_DBUS_PROXY(l->data) || strcmp(g_dbus_proxy_get_interface_name(l->data), GUEST_INTERFACE) != 0)
                        interface_added(user_data, object, l->data);
        g_list_free_full(ifaces, g_object_unref);
}

static void on_object_removed(GDBusObjectManager *om, GDBusObject *object, gpointer user_data) {
        GList *ifaces = g_dbus_object_get_interfaces(object);

        for (GList *l = ifaces; l; l = l->next)
                interface_removed(user_data, object, l->data);
        g_list_free_full(ifaces, g_object_unref);
}

/* ---- the daemon coming and going */

static void on_version(GObject *source, GAsyncResult *res, gpointer user_data) {
        g_autoptr(GError) error = NULL;
        g_autoptr(GVariant) reply = g_dbus_connection_call_finish(G_DBUS_CONNECTION(source), res, &error);
        g_autoptr(GVariant) v = NULL;
        g_autofree char *text = NULL;
        Monitor *m;

        if (g_error_matches(error, G_IO_ERROR, G_IO_ERROR_CANCELLED))
                return;
        m = user_data;
        if (reply)
                g_variant_get(reply, "(v)", &v);
        if (v && g_variant_is_of_type(v, G_VARIANT_TYPE_STRING))
                text = g_strdup_printf("Connected to blockstreamd %s", g_variant_get_string(v, NULL));
        else
                text = g_strdup("Connected to blockstreamd");
        gtk_label_set_text(m->status, text);
}

static void owner_changed(Monitor *m) {
        g_autofree char *owner = g_dbus_object_manager_client_get_name_owner(G_DBUS_OBJECT_MANAGER_CLIENT(m->manager));

        if (!owner) {
                gtk_label_set_text(m->status, "blockstreamd is not running: waiting for it to start");
                return;
        }
        gtk_label_set_text(m->status, "Connected to blockstreamd");
        g_dbus_connection_call(g_dbus_object_manager_client_get_connection(G_DBUS_OBJECT_MANAGER_CLIENT(m->manager)),
                owner, MANAGER_PATH, "org.freedesktop.DBus.Properties", "Get",
                g_variant_new("(ss)", MANAGER_INTERFACE, "Version"), G_VARIANT_TYPE("(v)"),
                G_DBUS_CALL_FLAGS_NO_AUTO_START, -1, NULL, on_version, m);
}

static void on_name_owner(GObject *object, GParamSpec *pspec, gpointer user_data) {
        owner_changed(user_data);
}

static void on_manager(GObject *source, GAsyncResult *res, gpointer user_data) {
        g_autoptr(GError) error = NULL;
        Monitor *m = user_data;
        GList *objects;

        m->manager = g_dbus_object_manager_client_new_for_bus_finish(res, &error);
        if (!m->manager) {
                g_autofree char *text = g_strdup_printf("Cannot reach the system bus: %s", error->message);
                gtk_label_set_text(m->status, text);
                return;
        }
        g_signal_connect(m->manager, "object-added", G_CALLBACK(on_object_added), m);
        g_signal_connect(m->manager, "object-removed", G_CALLBACK(on_object_removed), m);
        g_signal_connect(m->manager, "interface-added", G_CALLBACK(on_interface_added), m);
        g_signal_connect(m->manager, "interface-removed", G_CALLBACK(on_interface_removed), m);
        g_signal_connect(m->manager, "notify::name-owner", G_CALLBACK(on_name_owner), m);
        objects = g_dbus_object_manager_get_objects(m->manager);
        for (GList *l = objects; l; l = l->next)
                on_object_added(m->manager, l->data, m);
        g_list_free_full(objects, g_object_unref);
        owner_changed(m);
}

static void activate(GtkApplication *app, gpointer user_data) {
        Monitor *m = user_data;
        GtkWidget *outer, *scroll, *box;

        if (m->window) {
                gtk_window_present(m->window);
                return;
        }
        m->window = GTK_WINDOW(gtk_application_window_new(app));
        gtk_window_set_title(m->window, "Block streams");
        gtk_window_set_icon_name(m->window, "org.blockstream1.Monitor");
        gtk_window_set_default_size(m->window, 860, 640);

        outer = gtk_box_new(GTK_ORIENTATION_VERTICAL, 6);
        gtk_widget_set_margin_start(outer, 12);
        gtk_widget_set_margin_end(outer, 12);
        gtk_widget_set_margin_top(outer, 8);
        gtk_widget_set_margin_bottom(outer, 8);
        m->status = GTK_LABEL(gtk_label_new("Connecting to the system bus"));
        gtk_label_set_xalign(m->status, 0);
        gtk_box_append(GTK_BOX(outer), GTK_WIDGET(m->status));
        m->empty = GTK_LABEL(gtk_label_new("No guests are registered with blockstreamd."));
        gtk_label_set_xalign(m->empty, 0);
        gtk_box_append(GTK_BOX(outer), GTK_WIDGET(m->empty));

        box = gtk_box_new(GTK_ORIENTATION_VERTICAL, 12);
        m->guests_box = GTK_BOX(box);
        scroll = gtk_scrolled_window_new();
        gtk_widget_set_vexpand(scroll, TRUE);
        gtk_scrolled_window_set_child(GTK_SCROLLED_WINDOW(scroll), box);
        gtk_box_append(GTK_BOX(outer), scroll);
        gtk_window_set_child(m->window, outer);
        gtk_window_present(m->window);

        /* DBUS_SYSTEM_BUS_ADDRESS, when set, names the bus (GDBus reads it), as for the daemon. */
        g_dbus_object_manager_client_new_for_bus(G_BUS_TYPE_SYSTEM,
                G_DBUS_OBJECT_MANAGER_CLIENT_FLAGS_DO_NOT_AUTO_START, BUS_NAME, MANAGER_PATH, NULL, NULL, NULL,
                NULL, on_manager, m);
}

int main(int argc, char *argv[]) {
        g_autoptr(GtkApplication) app = NULL;
        Monitor m = {};
        int r;

        m.guests = g_hash_table_new_full(g_str_hash, g_str_equal, NULL, guest_view_free);
        m.disks = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, (GDestroyNotify) disk_view_free);
        m.exports = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, g_object_unref);
        /* Non-unique: no session bus is needed, and two windows on two buses may run side by side. */
        app = gtk_application_new("org.blockstream1.Monitor", G_APPLICATION_NON_UNIQUE);
        m.app = app;
        g_signal_connect(app, "activate", G_CALLBACK(activate), &m);
        r = g_application_run(G_APPLICATION(app), argc, argv);

        g_hash_table_destroy(m.disks);
        g_hash_table_destroy(m.exports);
        g_hash_table_destroy(m.guests);
        g_clear_object(&m.manager);
        return r;
}
