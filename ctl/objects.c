/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <stddef.h>

#include "args.h"
#include "blockstream-api.h"
#include "bus.h"
#include "objects.h"
#include "util.h"

static const Property guest_properties[] = {
        {BS_GUEST_PROPERTY_NAME, "s", offsetof(GuestInfo, name)},
        {BS_GUEST_PROPERTY_UUID, "s", offsetof(GuestInfo, uuid)},
        {BS_GUEST_PROPERTY_OWNER, "u", offsetof(GuestInfo, owner)},
        {BS_GUEST_PROPERTY_RUNNING, "b", offsetof(GuestInfo, running)},
        {BS_GUEST_PROPERTY_QMP_SOCKET, "s", offsetof(GuestInfo, qmp_socket)},
        {BS_GUEST_PROPERTY_DISKS, "ao", offsetof(GuestInfo, disks)},
        {BS_GUEST_PROPERTY_SANDBOX_LABEL, "s", offsetof(GuestInfo, sandbox_label)},
};

static const Property disk_properties[] = {
        {BS_STREAM_PROPERTY_GUEST, "o", offsetof(DiskInfo, guest)},
        {BS_STREAM_PROPERTY_DEVICE, "s", offsetof(DiskInfo, device)},
        {BS_STREAM_PROPERTY_TARGET, "s", offsetof(DiskInfo, target)},
        {BS_STREAM_PROPERTY_NODE_NAME, "s", offsetof(DiskInfo, node_name)},
        {BS_STREAM_PROPERTY_PATH, "s", offsetof(DiskInfo, path)},
        {BS_STREAM_PROPERTY_BACKING_CHAIN, "as", offsetof(DiskInfo, backing_chain)},
        {BS_STREAM_PROPERTY_SIZE, "t", offsetof(DiskInfo, size)},
        {BS_STREAM_PROPERTY_STATE, "s", offsetof(DiskInfo, state)},
        {BS_STREAM_PROPERTY_MODE, "s", offsetof(DiskInfo, mode)},
        {BS_STREAM_PROPERTY_OFFSET, "t", offsetof(DiskInfo, offset)},
        {BS_STREAM_PROPERTY_LENGTH, "t", offsetof(DiskInfo, length)},
        {BS_STREAM_PROPERTY_BYTES_DONE, "t", offsetof(DiskInfo, bytes_done)},
        {BS_STREAM_PROPERTY_BYTES_TOTAL, "t", offsetof(DiskInfo, bytes_total)},
        {BS_STREAM_PROPERTY_BANDWIDTH, "t", offsetof(DiskInfo, bandwidth)},
        {BS_STREAM_PROPERTY_RATE, "t", offsetof(DiskInfo, rate)},
        {BS_STREAM_PROPERTY_START_TIME, "t", offsetof(DiskInfo, start_time)},
        {BS_STREAM_PROPERTY_EXPECTED_END_TIME, "t", offsetof(DiskInfo, expected_end_time)},
        {BS_STREAM_PROPERTY_ERROR, "s", offsetof(DiskInfo, error)},
        {BS_STREAM_PROPERTY_MAX_GUEST_LATENCY, "t", offsetof(DiskInfo, max_guest_latency)},
        {BS_STREAM_PROPERTY_GUEST_READ_P99, "t", offsetof(DiskInfo, guest_read_p99)},
        {BS_STREAM_PROPERTY_SPEED_LIMIT, "t", offsetof(DiskInfo, speed_limit)},
        {BS_STREAM_PROPERTY_THROTTLE_REASON, "s", offsetof(DiskInfo, throttle_reason)},
};

static void properties_free(const Property *props, size_t n, void *data) {
        for (size_t i = 0; i < n; i++) {
                void *p = (uint8_t *) data + props[i].offset;

                if (streq(props[i].signature, "s") || streq(props[i].signature, "o")) {
                        free(*(char **) p);
                        *(char **) p = NULL;
                } else if (props[i].signature[0] == 'a') {
                        *(char ***) p = strv_free(*(char ***) p);
                }
        }
}

GuestInfo *guest_info_free(GuestInfo *g) {
        if (!g)
                return NULL;
        properties_free(guest_properties, ELEMENTSOF(guest_properties), g);
        free(g->object);
        free(g);
        return NULL;
}

void guest_info_freep(GuestInfo **g) {
        guest_info_free(*g);
}

DiskInfo *disk_info_free(DiskInfo *d) {
        if (!d)
                return NULL;
        properties_free(disk_properties, ELEMENTSOF(disk_properties), d);
        free(d->object);
        free(d);
        return NULL;
}

void disk_info_freep(DiskInfo **d) {
        disk_info_free(*d);
}

static int read_property_value(sd_bus_message *m, const Property *prop, void *data) {
        void *p = (uint8_t *) data + prop->offset;
        const char *sig = prop->signature;
        int r;

        if (streq(sig, "s") || streq(sig, "o")) {
                const char *s;
                char *c;

                r = sd_bus_message_read_basic(m, sig[0], &s);
                if (r < 0)
                        return r;
                c = strdup(s);
                if (!c)
                        return -ENOMEM;
                free(*(char **) p);
                *(char **) p = c;
        } else if (streq(sig, "t")) {
                r = sd_bus_message_read_basic(m, 't', p);
        } else if (streq(sig, "u")) {
                r = sd_bus_message_read_basic(m, 'u', p);
        } else if (streq(sig, "b")) {
                int b;

                r = sd_bus_message_read_basic(m, 'b', &b);
                if (r >= 0)
                        *(bool *) p = b;
        } else {
                char **l = NULL;

                r = sd_bus_message_read_strv(m, &l);
                if (r >= 0) {
                        strv_free(*(char ***) p);
                        *(char ***) p = l;
                }
        }
        return r < 0 ? r : 0;
}

int properties_map(sd_bus_message *m, const Property *props, size_t n, void *data, uint64_t *present) {
        int r;

        r = sd_bus_message_enter_container(m, 'a', "{sv}");
        if (r < 0)
                return r;
        while ((r = sd_bus_message_enter_container(m, 'e', "sv")) > 0) {
                const char *name, *contents;
                size_t i;

                r = sd_bus_message_read_basic(m, 's', &name);
                if (r < 0)
                        return r;
                for (i = 0; i < n; i++)
                        if (streq(props[i].name, name))
                                break;
                r = sd_bus_message_peek_type(m, NULL, &contents);
                if (r < 0)
                        return r;
                if (i >= n || !streq(contents, props[i].signature)) {
                        if (i < n)
                                log_debug("Property %s has type '%s', expected '%s'; ignoring.", name, contents,
                                        props[i].signature);
                        r = sd_bus_message_skip(m, "v");
                        if (r < 0)
                                return r;
                } else {
                        r = sd_bus_message_enter_container(m, 'v', contents);
                        if (r < 0)
                                return r;
                        r = read_property_value(m, &props[i], data);
                        if (r < 0)
                                return r;
                        r = sd_bus_message_exit_container(m);
                        if (r < 0)
                                return r;
                        *present |= UINT64_C(1) << i;
                }
                r = sd_bus_message_exit_container(m);
                if (r < 0)
                        return r;
        }
        if (r < 0)
                return r;
        return sd_bus_message_exit_container(m);
}

/* The properties exactly as the server sent them (numbers as numbers), keyed by their D-Bus names. */
static void json_properties(
        JsonWriter *w, const Property *props, size_t n, const void *data, uint64_t present, const char *skip) {
        for (size_t i = 0; i < n; i++) {
                const void *p = (const uint8_t *) data + props[i].offset;
                const char *sig = props[i].signature;

                if (!(present & (UINT64_C(1) << i)) || streq_ptr(props[i].name, skip))
                        continue;
                json_key(w, props[i].name);
                if (streq(sig, "s") || streq(sig, "o"))
                        json_string(w, *(char *const *) p);
                else if (streq(sig, "t"))
                        json_unsigned(w, *(const uint64_t *) p);
                else if (streq(sig, "u"))
                        json_unsigned(w, *(const uint32_t *) p);
                else if (streq(sig, "b"))
                        json_bool(w, *(const bool *) p);
                else
                        json_strv(w, *(char **const *) p);
        }
}

/* GetAll into data; *ret_cookie is the reply's serial, to tell older signals from newer ones. */
static int get_all_properties(sd_bus *bus, const char *path, const char *iface, const Property *props, size_t n,
        void *data, uint64_t *present, uint64_t *ret_cookie) {
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
        _cleanup_free_ char *verb = NULL;
        int r;

        verb = strdup_printf("get properties of %s", path);
        if (!verb)
                return log_oom();
        r = call_simple(bus, path, PROPERTIES_IFACE, "GetAll", NULL, 0, verb, &reply, "s", iface);
        if (r < 0)
                return r;
        r = properties_map(reply, props, n, data, present);
        if (r < 0)
                return log_parse_error(r);
        if (ret_cookie) {
                r = sd_bus_message_get_cookie(reply, ret_cookie);
                if (r < 0)
                        return log_parse_error(r);
        }
        return 0;
}

int disk_info_refresh(sd_bus *bus, DiskInfo *d, uint64_t *ret_cookie) {
        return get_all_properties(bus, d->object, STREAM_INTERFACE, disk_properties, ELEMENTSOF(disk_properties), d,
                &d->present, ret_cookie);
}

int disk_info_update(sd_bus_message *m, DiskInfo *d) {
        return properties_map(m, disk_properties, ELEMENTSOF(disk_properties), d, &d->present);
}

int get_guest(sd_bus *bus, const char *name, GuestInfo **ret) {
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
        _cleanup_(guest_info_freep) GuestInfo *g = NULL;
        _cleanup_free_ char *verb = NULL;
        const char *path;
        int r;

        verb = strdup_printf("look up guest '%s'", name);
        if (!verb)
                return log_oom();
        r = call_simple(
                bus, MANAGER_PATH, MANAGER_INTERFACE, BS_MANAGER_METHOD_GET_GUEST, NULL, 0, verb, &reply, "s", name);
        if (r < 0)
                return r;
        r = sd_bus_message_read(reply, "o", &path);
        if (r < 0)
                return log_parse_error(r);
        g = calloc(1, sizeof(*g));
        if (!g)
                return log_oom();
        g->object = strdup(path);
        if (!g->object)
                return log_oom();
        r = get_all_properties(
                bus, path, GUEST_INTERFACE, guest_properties, ELEMENTSOF(guest_properties), g, &g->present, NULL);
        if (r < 0)
                return r;
        *ret = TAKE_PTR(g);
        return 0;
}

int get_disk(sd_bus *bus, const char *path, DiskInfo **ret) {
        _cleanup_(disk_info_freep) DiskInfo *d = NULL;
        int r;

        d = calloc(1, sizeof(*d));
        if (!d)
                return log_oom();
        d->object = strdup(path);
        if (!d->object)
                return log_oom();
        r = disk_info_refresh(bus, d, NULL);
        if (r < 0)
                return r;
        *ret = TAKE_PTR(d);
        return 0;
}

/* How well d answers to name: 3 by its alias, 2 by its Target, 1 by its image path, 0 not. The
 * daemon never lets a Target be another disk's alias; the order keeps a name unambiguous all
 * the same. */
static int disk_match(const DiskInfo *d, const char *name, const char *abs) {
        if (streq_ptr(d->device, name))
                return 3;
        if (!isempty(d->target) && streq(d->target, name))
                return 2;
        if (streq_ptr(d->path, name) || (abs && streq_ptr(d->path, abs)))
                return 1;
        return 0;
}

int resolve_disk(sd_bus *bus, const char *guest, const char *disk, GuestInfo **ret_guest, DiskInfo **ret) {
        _cleanup_(guest_info_freep) GuestInfo *g = NULL;
        _cleanup_(disk_info_freep) DiskInfo *found = NULL;
        _cleanup_free_ char *abs = NULL, *names = NULL;
        size_t names_len = 0;
        int best = 0, r;

        if (strchr(disk, '/') && !is_remote() && path_make_absolute(disk, &abs) < 0)
                abs = NULL; /* matching against the name as given still works */

        r = get_guest(bus, guest, &g);
        if (r < 0)
                return r;
        for (char **p = g->disks; p && *p; p++) {
                _cleanup_(disk_info_freep) DiskInfo *d = NULL;
                const char *label;
                char *n;
                int m;

                r = get_disk(bus, *p, &d);
                if (r < 0)
                        return r;
                m = disk_match(d, disk, abs);
                if (m > best) {
                        best = m;
                        disk_info_free(found);
                        found = TAKE_PTR(d);
                        if (best == 3)
                                break;
                        continue;
                }
                label = !isempty(d->device) ? d->device : strempty(d->path);
                n = realloc(names, names_len + strlen(label) + strlen(strempty(d->target)) + 6);
                if (!n)
                        return log_oom();
                names = n;
                names_len += (size_t) sprintf(names + names_len, "%s%s", names_len > 0 ? ", " : "", label);
                if (!isempty(d->target))
                        names_len += (size_t) sprintf(names + names_len, " (%s)", d->target);
        }
        if (!found) {
                log_error("No disk '%s' in guest '%s' (disks: %s).", disk, guest, names ? names : "none");
                return -ENXIO;
        }
        if (ret_guest)
                *ret_guest = TAKE_PTR(g);
        *ret = TAKE_PTR(found);
        return 0;
}

int connect_disk(const char *guest, const char *disk, sd_bus **ret_bus, DiskInfo **ret) {
        int r;

        r = connect_bus(ret_bus);
        if (r < 0)
                return r;
        return resolve_disk(*ret_bus, guest, disk, NULL, ret);
}

void registry_done(Registry *reg) {
        for (size_t i = 0; i < reg->n_guests; i++)
                guest_info_free(reg->guests[i]);
        for (size_t i = 0; i < reg->n_disks; i++)
                disk_info_free(reg->disks[i]);
        free(reg->guests);
        free(reg->disks);
        *reg = (Registry){};
}

static int registry_add(void ***array, size_t *n, void *item) {
        void **a = reallocarray(*array, *n + 1, sizeof(void *));

        if (!a)
                return -ENOMEM;
        a[(*n)++] = item;
        *array = a;
        return 0;
}

int object_interfaces_foreach(sd_bus_message *m, interface_handler_t fn, void *userdata) {
        int r;

        r = sd_bus_message_enter_container(m, 'a', "{sa{sv}}");
        if (r < 0)
                return r;
        while ((r = sd_bus_message_enter_container(m, 'e', "sa{sv}")) > 0) {
                const char *iface;

                r = sd_bus_message_read_basic(m, 's', &iface);
                if (r < 0)
                        return r;
                r = fn(m, iface, userdata);
                if (r < 0)
                        return r;
                r = sd_bus_message_exit_container(m);
                if (r < 0)
                        return r;
        }
        if (r < 0)
                return r;
        return sd_bus_message_exit_container(m);
}

typedef struct ManagedObject {
        Registry *reg;
        const char *path;
} ManagedObject;

static int read_managed_interface(sd_bus_message *reply, const char *iface, void *userdata) {
        ManagedObject *mo = userdata;
        Registry *reg = mo->reg;

        if (streq(iface, GUEST_INTERFACE)) {
                GuestInfo *g = calloc(1, sizeof(*g));

                if (!g || registry_add((void ***) &reg->guests, &reg->n_guests, g) < 0) {
                        free(g);
                        return -ENOMEM;
                }
                g->object = strdup(mo->path);
                if (!g->object)
                        return -ENOMEM;
                return properties_map(reply, guest_properties, ELEMENTSOF(guest_properties), g, &g->present);
        }
        if (streq(iface, STREAM_INTERFACE)) {
                DiskInfo *d = calloc(1, sizeof(*d));

                if (!d || registry_add((void ***) &reg->disks, &reg->n_disks, d) < 0) {
                        free(d);
                        return -ENOMEM;
                }
                d->object = strdup(mo->path);
                if (!d->object)
                        return -ENOMEM;
                return properties_map(reply, disk_properties, ELEMENTSOF(disk_properties), d, &d->present);
        }
        return sd_bus_message_skip(reply, "a{sv}");
}

static int read_managed_object(sd_bus_message *reply, Registry *reg) {
        const char *path;
        int r;

        r = sd_bus_message_read_basic(reply, 'o', &path);
        if (r < 0)
                return r;
        return object_interfaces_foreach(reply, read_managed_interface, &(ManagedObject) { reg, path });
}

static int guest_compare(const void *a, const void *b) {
        const GuestInfo *x = *(GuestInfo *const *) a, *y = *(GuestInfo *const *) b;

        return strcmp(strempty(x->name), strempty(y->name));
}

int load_registry(sd_bus *bus, Registry *reg) {
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
        int r;

        r = call_simple(
                bus, MANAGER_PATH, OBJECT_MANAGER_IFACE, "GetManagedObjects", NULL, 0, "list guests", &reply, NULL);
        if (r < 0)
                return r;
        r = sd_bus_message_enter_container(reply, 'a', "{oa{sa{sv}}}");
        if (r < 0)
                return log_parse_error(r);
        while ((r = sd_bus_message_enter_container(reply, 'e', "oa{sa{sv}}")) > 0) {
                r = read_managed_object(reply, reg);
                if (r < 0)
                        return log_parse_error(r);
                r = sd_bus_message_exit_container(reply);
                if (r < 0)
                        return log_parse_error(r);
        }
        if (r < 0)
                return log_parse_error(r);
        r = sd_bus_message_exit_container(reply);
        if (r < 0)
                return log_parse_error(r);
        if (reg->n_guests > 1)
                qsort(reg->guests, reg->n_guests, sizeof(GuestInfo *), guest_compare);
        return 0;
}

DiskInfo *registry_find_disk(const Registry *reg, const char *path) {
        for (size_t i = 0; i < reg->n_disks; i++)
                if (streq(reg->disks[i]->object, path))
                        return reg->disks[i];
        return NULL;
}

bool state_is_active(const char *state) {
        return streq_ptr(state, BS_STATE_RUNNING) || streq_ptr(state, BS_STATE_PAUSED);
}

bool state_is_terminal(const char *state) {
        return streq_ptr(state, BS_STATE_COMPLETED) || streq_ptr(state, BS_STATE_FAILED) ||
               streq_ptr(state, BS_STATE_CANCELLED);
}

/* One guest as list and status print it in JSON: its properties, with "Disks" expanded
 * from object paths to the disks' own properties (each with its "ObjectPath"). */
void json_guest(JsonWriter *w, const GuestInfo *g, DiskInfo *const *disks, size_t n_disks) {
        json_open(w, '{');
        json_key(w, "ObjectPath");
        json_string(w, g->object);
        json_properties(w, guest_properties, ELEMENTSOF(guest_properties), g, g->present, BS_GUEST_PROPERTY_DISKS);
        json_key(w, BS_GUEST_PROPERTY_DISKS);
        json_open(w, '[');
        for (size_t i = 0; i < n_disks; i++) {
                json_open(w, '{');
                json_key(w, "ObjectPath");
                json_string(w, disks[i]->object);
                json_properties(w, disk_properties, ELEMENTSOF(disk_properties), disks[i], disks[i]->present, NULL);
                json_close(w, '}');
        }
        json_close(w, ']');
        json_close(w, '}');
}
