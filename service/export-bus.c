/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* An export's D-Bus object: its properties, Stop(), and the objects' lookup (declared in
 * export.h). */

#include "bus-error.h"
#include "engine.h"
#include "export.h"
#include "export-internal.h"
#include "guest.h"
#include "polkit.h"
#include "util.h"

/* D-Bus */

static int method_stop(sd_bus_message *msg, void *userdata, sd_bus_error *error) {
        Export *e = userdata;
        int r;

        r = bus_authorize(e->engine->polkit, msg, ACTION_EXPORT,
                &(AuthDetails) { .guest = e->guest->name, .disk = e->alias, .owner = e->guest->owner }, error);
        if (r < 0)
                return r;
        if (r == 0)
                return 1; /* polkit was asked; the call is dispatched again with its answer */
        log_info("Export %u of guest %s disk %s stopped.", e->id, e->guest->name, e->alias);
        export_end(e, EXPORT_STOPPED, true);
        return sd_bus_reply_method_return(msg, NULL);
}

static int property_get_state(sd_bus *bus, const char *path, const char *interface, const char *property,
        sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        Export *e = userdata;
        return sd_bus_message_append(reply, "s", export_state_table[e->state]);
}

static int property_get_string(sd_bus *bus, const char *path, const char *interface, const char *property,
        sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        char **s = userdata;
        return sd_bus_message_append(reply, "s", strempty(*s));
}

static int property_get_disk(sd_bus *bus, const char *path, const char *interface, const char *property,
        sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        Export *e = userdata;
        return sd_bus_message_append(reply, "o", e->disk_path);
}

const sd_bus_vtable export_vtable[] = {
        SD_BUS_VTABLE_START(0),
        SD_BUS_PROPERTY("URI", "s", property_get_string, offsetof(Export, uri), SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("Disk", "o", property_get_disk, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("Clients", "u", NULL, offsetof(Export, clients), SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("State", "s", property_get_state, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY(
                "Error", "s", property_get_string, offsetof(Export, error), SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_METHOD("Stop", NULL, NULL, method_stop, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_VTABLE_END,
};

int export_object_find(sd_bus *bus, const char *path, const char *interface, void *userdata, void **found,
        sd_bus_error *error) {
        Engine *m = userdata;

        for (Export *e = m->exports; e; e = e->next)
                if (e->published && streq(e->object_path, path)) {
                        *found = e;
                        return 1;
                }
        return 0;
}

int export_node_enumerator(sd_bus *bus, const char *path, void *userdata, char ***nodes, sd_bus_error *error) {
        Engine *m = userdata;
        _cleanup_strv_free_ char **l = NULL;

        for (Export *e = m->exports; e; e = e->next)
                if (e->published && strv_push(&l, strdup(e->object_path)) < 0)
                        return -ENOMEM;
        if (!l && !(l = calloc(1, sizeof(char *))))
                return -ENOMEM;
        *nodes = TAKE_PTR(l);
        return 1;
}
