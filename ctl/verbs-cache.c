/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <inttypes.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "args.h"
#include "blockstream-api.h"
#include "bus.h"
#include "objects.h"
#include "output.h"
#include "util.h"
#include "verbs-cache.h"

typedef struct CacheInfo {
        char *path;
        char *url;
        char *socket;
        char *state;
        uint64_t size;
        uint64_t fetched;
        uint32_t users;
        uint32_t clients;
        uint64_t present; /* bit i: cache_properties[i] was sent */
} CacheInfo;

static const Property cache_properties[] = {
        { BS_CACHE_PROPERTY_URL, "s", offsetof(CacheInfo, url) },
        { BS_CACHE_PROPERTY_SOCKET, "s", offsetof(CacheInfo, socket) },
        { BS_CACHE_PROPERTY_STATE, "s", offsetof(CacheInfo, state) },
        { BS_CACHE_PROPERTY_SIZE, "t", offsetof(CacheInfo, size) },
        { BS_CACHE_PROPERTY_BYTES_FETCHED, "t", offsetof(CacheInfo, fetched) },
        { BS_CACHE_PROPERTY_USERS, "u", offsetof(CacheInfo, users) },
        { BS_CACHE_PROPERTY_CLIENTS, "u", offsetof(CacheInfo, clients) },
};

static void cache_info_done(CacheInfo *c) {
        free(c->path);
        free(c->url);
        free(c->socket);
        free(c->state);
}

typedef struct CacheRead {
        CacheInfo *cache;
        bool found;
} CacheRead;

static int read_cache_interface(sd_bus_message *m, const char *iface, void *userdata) {
        CacheRead *cr = userdata;

        if (!streq(iface, CACHE_INTERFACE))
                return sd_bus_message_skip(m, "a{sv}");
        cr->found = true;
        return properties_map(m, cache_properties, ELEMENTSOF(cache_properties), cr->cache, &cr->cache->present);
}

/* One object's a{sa{sv}}: the Cache interface's properties, if it has it (1), else 0. */
static int read_cache(sd_bus_message *m, CacheInfo *c) {
        CacheRead cr = { .cache = c };
        int r;

        r = object_interfaces_foreach(m, read_cache_interface, &cr);
        return r < 0 ? r : cr.found;
}

int verb_caches(char **args) {
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = NULL;
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
        JsonWriter w = {.f = stdout};
        unsigned n = 0;
        int r;

        r = connect_bus(&bus);
        if (r < 0)
                return r;
        r = call_simple(bus, MANAGER_PATH, OBJECT_MANAGER_IFACE, "GetManagedObjects", NULL, 0, "list template caches",
                &reply, NULL);
        if (r < 0)
                return r;
        r = sd_bus_message_enter_container(reply, 'a', "{oa{sa{sv}}}");
        if (r < 0)
                return log_parse_error(r);
        if (arg_json)
                json_open(&w, '[');
        else if (!arg_quiet)
                printf("%-4s %-8s %6s %10s %10s  %s\n", "ID", "STATE", "USERS", "SIZE", "FETCHED", "URL");
        while ((r = sd_bus_message_enter_container(reply, 'e', "oa{sa{sv}}")) > 0) {
                _cleanup_(cache_info_done) CacheInfo c = {};
                const char *path;
                char a[FORMAT_BYTES_MAX], b[FORMAT_BYTES_MAX];

                r = sd_bus_message_read(reply, "o", &path);
                if (r >= 0)
                        r = read_cache(reply, &c);
                if (r < 0)
                        return log_parse_error(r);
                if (sd_bus_message_exit_container(reply) < 0)
                        return log_parse_error(-EBADMSG);
                if (r == 0 || strncmp(path, CACHE_PATH_PREFIX "/", strlen(CACHE_PATH_PREFIX "/")) != 0)
                        continue;
                n++;
                if (arg_json) {
                        json_open(&w, '{');
                        json_key(&w, "id");
                        json_string(&w, path + strlen(CACHE_PATH_PREFIX "/"));
                        json_key(&w, "object");
                        json_string(&w, path);
                        json_key(&w, "url");
                        json_string(&w, strempty(c.url));
                        json_key(&w, "state");
                        json_string(&w, strempty(c.state));
                        json_key(&w, "size");
                        json_unsigned(&w, c.size);
                        json_key(&w, "bytes_fetched");
                        json_unsigned(&w, c.fetched);
                        json_key(&w, "users");
                        json_unsigned(&w, c.users);
                        json_key(&w, "clients");
                        json_unsigned(&w, c.clients);
                        json_key(&w, "socket");
                        json_string(&w, strempty(c.socket));
                        json_close(&w, '}');
                } else
                        printf("%-4s %-8s %6" PRIu32 " %10s %10s  %s\n", path + strlen(CACHE_PATH_PREFIX "/"),
                                strempty(c.state), c.users, format_bytes(a, sizeof(a), c.size),
                                format_bytes(b, sizeof(b), c.fetched), strempty(c.url));
        }
        if (r < 0)
                return log_parse_error(r);
        if (arg_json) {
                json_close(&w, ']');
                fputc('\n', stdout);
        } else if (!arg_quiet && n == 0)
                printf("No template caches.\n");
        return 0;
}

static int cache_path(const char *a, char **ret) {
        if (isempty(a) || strlen(a) > 9 || strspn(a, "0123456789") != strlen(a))
                return usage_error("Invalid cache id '%s': expected the number 'caches' shows.", a);
        *ret = strdup_printf(CACHE_PATH_PREFIX "/%s", a);
        return *ret ? 0 : log_oom();
}

static int cache_call(const char *id, const char *member, const char *what) {
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = NULL;
        _cleanup_free_ char *path = NULL, *verb = NULL;
        int r;

        r = cache_path(id, &path);
        if (r != 0)
                return r;
        verb = strdup_printf("%s template cache %s", what, id);
        if (!verb)
                return log_oom();
        r = connect_bus(&bus);
        if (r < 0)
                return r;
        return call_simple(bus, path, CACHE_INTERFACE, member, ACTION_MANAGE, SLOW_CALL_TIMEOUT * 10, verb, NULL, NULL);
}

int verb_cache_warm(char **args) {
        return cache_call(args[0], BS_CACHE_METHOD_WARM, "warm");
}

int verb_cache_stop(char **args) {
        return cache_call(args[0], BS_CACHE_METHOD_STOP, "stop");
}
