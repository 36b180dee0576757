/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <ctype.h>
#include <sys/stat.h>
#include <sys/un.h>

#include "bus-error.h"
#include "guest.h"
#include "manager.h"
#include "polkit.h"
#include "state.h"
#include "stream.h"
#include "util.h"

#define MANAGER_INTERFACE "org.blockstream1.Manager"
#define GUESTS_MAX 4096

int manager_new(Manager **ret, sd_event *e, const char *config_path, bool config_explicit, const char *state_dir,
        const char *runtime_dir) {
        Manager *m;
        int r;

        m = calloc(1, sizeof(Manager));
        if (!m)
                return log_oom();
        m->event = sd_event_ref(e);
        config_init(&m->config);
        m->state_dir = strdup(state_dir);
        m->runtime_dir = strdup(runtime_dir);
        m->guest_state_dir = strdup_printf("%s/guests", state_dir);
        if (!m->state_dir || !m->runtime_dir || !m->guest_state_dir) {
                manager_free(m);
                return log_oom();
        }
        r = config_load(&m->config, config_path, config_explicit);
        if (r < 0) {
                manager_free(m);
                return r;
        }
        r = mkdir_p(m->guest_state_dir, 0700);
        if (r < 0) {
                log_error_errno(r, "Failed to create state directory %s: %m", m->guest_state_dir);
                manager_free(m);
                return r;
        }
        r = mkdir_p(m->runtime_dir, 0755);
        if (r < 0) {
                log_error_errno(r, "Failed to create runtime directory %s: %m", m->runtime_dir);
                manager_free(m);
                return r;
        }
        *ret = m;
        return 0;
}

Manager *manager_free(Manager *m) {
        if (!m)
                return NULL;
        while (m->guests) {
                Guest *g = m->guests;
                manager_unlink_guest(m, g);
                guest_free(g);
        }
        polkit_registry_free(m);
        if (m->bus) {
                sd_bus_flush(m->bus);
                m->bus = sd_bus_close_unref(m->bus);
        }
        config_done(&m->config);
        free(m->state_dir);
        free(m->runtime_dir);
        free(m->guest_state_dir);
        sd_event_unref(m->event);
        free(m);
        return NULL;
}

Guest *manager_find_guest(Manager *m, const char *name) {
        for (Guest *g = m->guests; g; g = g->next)
                if (streq(g->name, name))
                        return g;
        return NULL;
}

void manager_link_guest(Manager *m, Guest *g) {
        Guest *tail = m->guests;

        g->next = NULL;
        if (!tail) {
                g->prev = NULL;
                m->guests = g;
        } else {
                while (tail->next)
                        tail = tail->next;
                tail->next = g;
                g->prev = tail;
        }
        m->n_guests++;
}

void manager_unlink_guest(Manager *m, Guest *g) {
        if (g->prev)
                g->prev->next = g->next;
        else if (m->guests == g)
                m->guests = g->next;
        else
                return; /* not linked */
        if (g->next)
                g->next->prev = g->prev;
        g->prev = g->next = NULL;
        m->n_guests--;
}

static Guest *find_published_guest(Manager *m, const char *name) {
        Guest *g = manager_find_guest(m, name);
        return g && g->published ? g : NULL;
}

static int check_guest_name(const char *name, sd_bus_error *error) {
        if (!guest_name_is_valid(name))
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                        "Invalid guest name '%.80s': use 1 to %d characters of A-Z a-z 0-9 _ . -", name, GUEST_NAME_MAX);
        return 0;
}

/* A UUID in its 8-4-4-4-12 form; normalized to lower case. */
static int normalize_uuid(const char *s, char **ret) {
        char *c;

        if (strlen(s) != 36)
                return -EINVAL;
        for (size_t i = 0; i < 36; i++) {
                bool dash = i == 8 || i == 13 || i == 18 || i == 23;
                if (dash ? s[i] != '-' : !isxdigit((unsigned char) s[i]))
                        return -EINVAL;
        }
        c = strdup(s);
        if (!c)
                return -ENOMEM;
        for (char *p = c; *p; p++)
                *p = (char) tolower((unsigned char) *p);
        *ret = c;
        return 0;
}

typedef struct RegisterOptions {
        uint32_t owner;
        bool have_owner;
        const char *uuid;
        bool have_disks;
} RegisterOptions;

static int read_register_options(sd_bus_message *msg, RegisterOptions *o, sd_bus_error *error) {
        int r;

        r = sd_bus_message_enter_container(msg, 'a', "{sv}");
        if (r < 0)
                return r;
        while ((r = sd_bus_message_enter_container(msg, 'e', "sv")) > 0) {
                const char *key;

                r = sd_bus_message_read(msg, "s", &key);
                if (r < 0)
                        return r;
                if (streq(key, "owner")) {
                        r = sd_bus_message_read(msg, "v", "u", &o->owner);
                        if (r < 0)
                                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                        "Option 'owner' must be of type u (a uid).");
                        o->have_owner = true;
                } else if (streq(key, "uuid")) {
                        r = sd_bus_message_read(msg, "v", "s", &o->uuid);
                        if (r < 0)
                                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                        "Option 'uuid' must be of type s.");
                } else if (streq(key, "disks")) {
                        r = sd_bus_message_skip(msg, "v");
                        if (r < 0)
                                return r;
                        o->have_disks = true;
                } else
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                "Unknown option '%.64s'; RegisterGuest takes 'owner' (u), 'uuid' (s) and 'disks' (a{ss}).",
                                key);
                r = sd_bus_message_exit_container(msg);
                if (r < 0)
                        return r;
        }
        if (r < 0)
                return r;
        return sd_bus_message_exit_container(msg);
}

static int check_qmp_socket(const char *path, sd_bus_error *error) {
        struct stat st;

        if (!path_is_safe_absolute(path, sizeof(((struct sockaddr_un *) NULL)->sun_path) - 1))
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                        "QMP socket '%.200s' must be a normalized absolute path of at most %zu bytes.", path,
                        sizeof(((struct sockaddr_un *) NULL)->sun_path) - 1);
        if (stat(path, &st) < 0)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "QMP socket '%s' cannot be used: %s.", path,
                        strerror(errno));
        if (!S_ISSOCK(st.st_mode))
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "'%s' is not a socket.", path);
        return 0;
}

static int method_register_guest(sd_bus_message *msg, void *userdata, sd_bus_error *error) {
        _cleanup_(sd_bus_creds_unrefp) sd_bus_creds *creds = NULL;
        _cleanup_free_ char *uuid = NULL;
        Manager *m = userdata;
        RegisterOptions o = {};
        const char *name, *socket_path;
        uid_t caller;
        Guest *g;
        int r;

        r = sd_bus_message_read(msg, "ss", &name, &socket_path);
        if (r < 0)
                return r;
        r = read_register_options(msg, &o, error);
        if (r < 0)
                return r;
        r = check_guest_name(name, error);
        if (r < 0)
                return r;
        if (o.uuid && normalize_uuid(o.uuid, &uuid) < 0)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                        "Option 'uuid' must be a UUID like 123e4567-e89b-12d3-a456-426614174000, got '%.64s'.", o.uuid);
        if (o.have_owner && o.owner == (uint32_t) -1)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "Option 'owner' is not a valid uid.");

        r = sd_bus_query_sender_creds(msg, SD_BUS_CREDS_EUID, &creds);
        if (r < 0)
                return r;
        r = sd_bus_creds_get_euid(creds, &caller);
        if (r < 0)
                return r;
        if (o.have_owner && o.owner != caller && caller != 0)
                return sd_bus_error_setf(error, SD_BUS_ERROR_ACCESS_DENIED,
                        "Only root may register a guest for another user (uid %" PRIu32 ").", o.owner);

        r = bus_authorize(m, msg, ACTION_MANAGE,
                &(AuthDetails) { .guest = name, .owner = o.have_owner ? (uid_t) o.owner : caller }, error);
        if (r < 0)
                return r;
        if (r == 0)
                return 1; /* polkit was asked; the call is dispatched again with its answer */

        if (isempty(socket_path) || o.have_disks)
                return sd_bus_error_setf(error, SD_BUS_ERROR_NOT_SUPPORTED,
                        "Offline guests (empty QMP socket, 'disks' option) are not supported yet.");
        /* Checked after the (possibly slow) authorization: the world may have changed meanwhile. */
        if (manager_find_guest(m, name))
                return sd_bus_error_setf(error, BS_ERROR_GUEST_EXISTS,
                        "A guest named '%s' is already registered; unregister it first or pick another name.", name);
        if (m->n_guests >= GUESTS_MAX)
                return sd_bus_error_setf(error, SD_BUS_ERROR_LIMITS_EXCEEDED, "Too many guests (at most %d).",
                        GUESTS_MAX);
        r = check_qmp_socket(socket_path, error);
        if (r < 0)
                return r;

        r = guest_new(&g, m, name, socket_path, o.have_owner ? (uid_t) o.owner : caller, uuid);
        if (r < 0)
                return r;
        manager_link_guest(m, g);
        g->register_call = sd_bus_message_ref(msg);
        r = guest_connect(g);
        if (r < 0) {
                g->register_call = sd_bus_message_unref(g->register_call);
                manager_unlink_guest(m, g);
                guest_free(g);
                return sd_bus_error_setf(error, BS_ERROR_QEMU_FAILED, "Cannot connect to QMP socket %s: %s.",
                        socket_path, strerror(-r));
        }
        return 1; /* answered once QEMU told us its disks */
}

static int method_unregister_guest(sd_bus_message *msg, void *userdata, sd_bus_error *error) {
        Manager *m = userdata;
        const char *name;
        Guest *g;
        int r;

        r = sd_bus_message_read(msg, "s", &name);
        if (r < 0)
                return r;
        r = check_guest_name(name, error);
        if (r < 0)
                return r;
        g = find_published_guest(m, name);
        if (!g)
                return sd_bus_error_setf(error, BS_ERROR_NO_SUCH_GUEST, "No guest named '%s' is registered.", name);
        r = bus_authorize(m, msg, ACTION_MANAGE, &(AuthDetails) { .guest = g->name, .owner = g->owner }, error);
        if (r < 0)
                return r;
        if (r == 0)
                return 1; /* polkit was asked; the call is dispatched again with its answer */
        if (guest_has_active_job(g))
                return sd_bus_error_setf(error, BS_ERROR_BUSY,
                        "A stream of guest '%s' is running; Cancel it first, then unregister.", name);
        guest_unregister(g);
        return sd_bus_reply_method_return(msg, NULL);
}

static int method_get_guest(sd_bus_message *msg, void *userdata, sd_bus_error *error) {
        Manager *m = userdata;
        const char *name;
        Guest *g;
        int r;

        r = sd_bus_message_read(msg, "s", &name);
        if (r < 0)
                return r;
        r = check_guest_name(name, error);
        if (r < 0)
                return r;
        g = find_published_guest(m, name);
        if (!g)
                return sd_bus_error_setf(error, BS_ERROR_NO_SUCH_GUEST, "No guest named '%s' is registered.", name);
        return sd_bus_reply_method_return(msg, "o", g->object_path);
}

static int method_provision_disk(sd_bus_message *msg, void *userdata, sd_bus_error *error) {
        int r;

        r = bus_authorize(userdata, msg, ACTION_MANAGE, NULL, error);
        if (r < 0)
                return r;
        if (r == 0)
                return 1; /* polkit was asked; the call is dispatched again with its answer */
        return sd_bus_error_setf(error, SD_BUS_ERROR_NOT_SUPPORTED, "ProvisionDisk is not supported yet.");
}

static int property_get_version(sd_bus *bus, const char *path, const char *interface, const char *property,
        sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        return sd_bus_message_append(reply, "s", VERSION);
}

static const sd_bus_vtable manager_vtable[] = {
        SD_BUS_VTABLE_START(0),
        SD_BUS_PROPERTY("Version", "s", property_get_version, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_METHOD_WITH_ARGS("RegisterGuest", SD_BUS_ARGS("s", name, "s", qmp_socket, "a{sv}", options),
                SD_BUS_RESULT("o", guest), method_register_guest, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("UnregisterGuest", SD_BUS_ARGS("s", name), SD_BUS_NO_RESULT, method_unregister_guest,
                SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("GetGuest", SD_BUS_ARGS("s", name), SD_BUS_RESULT("o", guest), method_get_guest,
                SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("ProvisionDisk", SD_BUS_ARGS("s", template, "s", target, "a{sv}", options),
                SD_BUS_RESULT("t", size), method_provision_disk, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_VTABLE_END,
};

int manager_connect_bus(Manager *m) {
        int r;

        r = sd_bus_open_system_with_description(&m->bus, "blockstreamd");
        if (r < 0)
                return log_error_errno(r, "Failed to connect to the system bus: %m");
        r = sd_bus_add_object_vtable(m->bus, NULL, MANAGER_PATH, MANAGER_INTERFACE, manager_vtable, m);
        if (r < 0)
                return log_error_errno(r, "Failed to add the manager object: %m");
        r = sd_bus_add_fallback_vtable(m->bus, NULL, GUEST_PATH_PREFIX, "org.blockstream1.Guest", guest_vtable,
                guest_object_find, m);
        if (r < 0)
                return log_error_errno(r, "Failed to add the guest objects: %m");
        r = sd_bus_add_fallback_vtable(m->bus, NULL, GUEST_PATH_PREFIX, "org.blockstream1.BlockStream", stream_vtable,
                disk_object_find, m);
        if (r < 0)
                return log_error_errno(r, "Failed to add the disk objects: %m");
        r = sd_bus_add_node_enumerator(m->bus, NULL, GUEST_PATH_PREFIX, guest_node_enumerator, m);
        if (r < 0)
                return log_error_errno(r, "Failed to add the node enumerator: %m");
        r = sd_bus_add_object_manager(m->bus, NULL, MANAGER_PATH);
        if (r < 0)
                return log_error_errno(r, "Failed to add the object manager: %m");
        r = sd_bus_attach_event(m->bus, m->event, SD_EVENT_PRIORITY_NORMAL);
        if (r < 0)
                return log_error_errno(r, "Failed to attach the bus to the event loop: %m");
        r = sd_bus_request_name(m->bus, BUS_NAME, 0);
        if (r < 0)
                return log_error_errno(r, "Failed to acquire the bus name %s: %m", BUS_NAME);
        return 0;
}

int manager_load_state(Manager *m) {
        return state_load_guests(m);
}

void manager_start_guests(Manager *m) {
        /* Safe against guests going away: a failed connect never frees a published guest. */
        for (Guest *g = m->guests; g; g = g->next)
                (void) guest_connect(g);
}
