/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <inttypes.h>

#include "args.h"
#include "blockstream-api.h"
#include "bus.h"
#include "objects.h"
#include "output.h"
#include "polkit-agent.h"
#include "verbs-map.h"

/* The server caps one GetAllocationMap reply at this many extents (BlockStream.xml). */
#define MAP_EXTENTS_MAX 65536

typedef enum Kind { KIND_LOCAL, KIND_ZERO, KIND_BACKING, KIND_ABSENT, KIND_OTHER, _KIND_MAX } Kind;

static const struct {
        const char *name;
        const char *color; /* background */
        const char *letter;
} kind_table[_KIND_MAX] = {
        [KIND_LOCAL] = {BS_EXTENT_LOCAL, "\x1b[42m", "L"},
        [KIND_ZERO] = {BS_EXTENT_ZERO, "\x1b[44m", "Z"},
        [KIND_BACKING] = {BS_EXTENT_BACKING, "\x1b[43m", "B"},
        [KIND_ABSENT] = {BS_EXTENT_ABSENT, "\x1b[100m", "."},
        [KIND_OTHER] = {"other", "\x1b[45m", "?"},
};

typedef struct Extent {
        uint64_t offset, length;
        uint32_t depth;
        Kind kind;
        char name[16]; /* the kind as sent, for JSON */
} Extent;

static Kind kind_from_string(const char *s) {
        for (Kind k = 0; k < KIND_OTHER; k++)
                if (streq(s, kind_table[k].name))
                        return k;
        return KIND_OTHER;
}

typedef struct ExtentList {
        Extent *items;
        size_t n, allocated;
} ExtentList;

static void extent_list_done(ExtentList *l) {
        free(l->items);
}

static int read_extents(sd_bus_message *reply, ExtentList *list, size_t *n_read) {
        const char *kind;
        uint64_t o, l;
        uint32_t depth;
        int r;

        *n_read = 0;
        r = sd_bus_message_enter_container(reply, 'a', "(ttus)");
        if (r < 0)
                return r;
        while ((r = sd_bus_message_read(reply, "(ttus)", &o, &l, &depth, &kind)) > 0) {
                Extent *e;
                size_t *n = &list->n;

                if (list->n >= list->allocated) {
                        size_t a = MAX((size_t) 1024, list->allocated * 2);

                        e = reallocarray(list->items, a, sizeof(Extent));
                        if (!e)
                                return -ENOMEM;
                        list->items = e;
                        list->allocated = a;
                }
                e = list->items;
                e[*n] = (Extent){.offset = o, .length = l, .depth = depth, .kind = kind_from_string(kind)};
                snprintf(e[*n].name, sizeof(e[*n].name), "%s", kind);
                (*n)++;
                (*n_read)++;
        }
        if (r < 0)
                return r;
        return sd_bus_message_exit_container(reply);
}

/* One line: the disk as cells, each coloured by the kind that covers most of its span. */
static void print_map_bar(const Extent *extents, size_t n) {
        uint64_t start = extents[0].offset, end = extents[n - 1].offset + extents[n - 1].length, span;
        uint64_t totals[_KIND_MAX] = {};
        unsigned cells = MIN(60u, terminal_columns(STDOUT_FILENO) > 2 ? terminal_columns(STDOUT_FILENO) - 2 : 1u);
        bool color = colors_enabled();
        size_t j = 0;

        if (end <= start)
                return;
        span = end - start;
        for (size_t i = 0; i < n; i++)
                totals[extents[i].kind] += extents[i].length;

        putchar('[');
        for (unsigned c = 0; c < cells; c++) {
                uint64_t cs = start + (uint64_t) ((long double) span * c / cells);
                uint64_t ce = start + (uint64_t) ((long double) span * (c + 1) / cells);
                uint64_t in[_KIND_MAX] = {};
                Kind best = KIND_ABSENT;

                if (ce <= cs)
                        ce = cs + 1;
                /* Extents are in order: skip the ones that end before this cell. */
                while (j < n && extents[j].offset + extents[j].length <= cs)
                        j++;
                for (size_t i = j; i < n && extents[i].offset < ce; i++) {
                        uint64_t a = MAX(cs, extents[i].offset), b = MIN(ce, extents[i].offset + extents[i].length);
                        if (b > a)
                                in[extents[i].kind] += b - a;
                }
                for (Kind k = 0; k < _KIND_MAX; k++)
                        if (in[k] > in[best])
                                best = k;
                if (color)
                        printf("%s \x1b[0m", kind_table[best].color);
                else
                        fputs(kind_table[best].letter, stdout);
        }
        puts("]");

        for (Kind k = 0; k < _KIND_MAX; k++) {
                if (k == KIND_OTHER && totals[k] == 0)
                        continue;
                if (color)
                        printf("%s%s \x1b[0m %s %.1Lf%%", k == 0 ? "" : "  ", kind_table[k].color, kind_table[k].name,
                                (long double) totals[k] * 100.0L / (long double) span);
                else
                        printf("%s%s=%s %.1Lf%%", k == 0 ? "" : "  ", kind_table[k].letter, kind_table[k].name,
                                (long double) totals[k] * 100.0L / (long double) span);
        }
        putchar('\n');
}

int verb_map(char **args) {
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = NULL;
        _cleanup_(disk_info_freep) DiskInfo *d = NULL;
        _cleanup_(extent_list_done) ExtentList list = {};
        _cleanup_(polkit_agent_releasep) bool agent_held = false;
        _cleanup_free_ char *verb = NULL;
        uint64_t cur = arg_offset, end = 0;
        const Extent *extents;
        size_t n;
        int r;

        if ((arg_given & OPT_LENGTH) && add_overflows_u64(arg_offset, arg_length, &end))
                return usage_error("--offset= plus --length= overflows.");
        r = check_disk_args(args);
        if (r != 0)
                return r;
        r = connect_disk(args[0], args[1], &bus, &d);
        if (r != 0)
                return r;
        verb = strdup_printf("get the allocation map of %s of guest '%s'", strempty(d->device), args[0]);
        if (!verb)
                return log_oom();

        /* Each page is authorized on its own: one agent for all of them. */
        polkit_agent_acquire();
        agent_held = true;
        for (;;) {
                _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
                uint64_t length = arg_length > 0 ? end - cur : 0, last_end;
                size_t n_read;

                r = call_simple(bus, d->object, STREAM_INTERFACE, BS_STREAM_METHOD_GET_ALLOCATION_MAP, ACTION_INSPECT,
                        0, verb, &reply, "tt", cur, length);
                if (r < 0)
                        return r;
                r = read_extents(reply, &list, &n_read);
                if (r < 0)
                        return log_parse_error(r);
                extents = list.items;
                n = list.n;
                /* A full reply means the server stopped at its cap: go on from where it ended. */
                if (n_read < MAP_EXTENTS_MAX)
                        break;
                if (add_overflows_u64(extents[n - 1].offset, extents[n - 1].length, &last_end) || last_end <= cur)
                        break;
                if ((arg_length > 0 && last_end >= end) || (arg_length == 0 && last_end >= d->size))
                        break;
                cur = last_end;
        }
        polkit_agent_release();
        agent_held = false;

        if (arg_json) {
                JsonWriter w = {.f = stdout};

                json_open(&w, '[');
                for (size_t i = 0; i < n; i++) {
                        json_open(&w, '{');
                        json_key(&w, "offset");
                        json_unsigned(&w, extents[i].offset);
                        json_key(&w, "length");
                        json_unsigned(&w, extents[i].length);
                        json_key(&w, "depth");
                        json_unsigned(&w, extents[i].depth);
                        json_key(&w, "kind");
                        json_string(&w, extents[i].name);
                        json_close(&w, '}');
                }
                json_close(&w, ']');
                return 0;
        }

        if (n == 0) {
                if (!arg_quiet)
                        printf("No extents.\n");
                return 0;
        }
        printf("%20s %20s %10s %5s %s\n", "OFFSET", "LENGTH", "SIZE", "DEPTH", "KIND");
        for (size_t i = 0; i < n; i++) {
                char a[FORMAT_BYTES_MAX];

                printf("%20" PRIu64 " %20" PRIu64 " %10s %5" PRIu32 " %s\n", extents[i].offset, extents[i].length,
                        format_bytes(a, sizeof(a), extents[i].length), extents[i].depth, extents[i].name);
        }
        if (isatty(STDOUT_FILENO) && !arg_quiet) {
                putchar('\n');
                print_map_bar(extents, n);
        }
        return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* export, export-stop */

int verb_export(char **args) {
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = NULL;
        _cleanup_(disk_info_freep) DiskInfo *d = NULL;
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *m = NULL, *reply = NULL;
        _cleanup_free_ char *verb = NULL;
        const char *path, *uri, *id;
        int r;

        if (arg_listen && !streq(arg_listen, "unix") &&
                !(strncmp(arg_listen, "tcp:", 4) == 0 && strrchr(arg_listen + 4, ':')))
                return usage_error("Invalid --listen='%s': expected 'unix' or 'tcp:ADDR:PORT'.", arg_listen);
        r = check_disk_args(args);
        if (r != 0)
                return r;
        r = connect_disk(args[0], args[1], &bus, &d);
        if (r != 0)
                return r;

        r = new_call(bus, d->object, STREAM_INTERFACE, BS_STREAM_METHOD_EXPORT, &m);
        if (r < 0)
                return r;
        r = append_options_begin(m);
        if (r >= 0 && arg_listen)
                r = sd_bus_message_append(m, "{sv}", BS_OPTION_LISTEN, "s", arg_listen);
        if (r >= 0)
                r = sd_bus_message_close_container(m);
        if (r < 0)
                return log_error_errno(r, "Failed to append Export arguments: %m");
        verb = strdup_printf("export %s of guest '%s'", strempty(d->device), args[0]);
        if (!verb)
                return log_oom();
        r = call(bus, m, ACTION_EXPORT, SLOW_CALL_TIMEOUT, verb, &reply);
        if (r < 0)
                return r;
        r = sd_bus_message_read(reply, "os", &path, &uri);
        if (r < 0)
                return log_parse_error(r);

        if (arg_json) {
                JsonWriter w = {.f = stdout};

                json_open(&w, '{');
                json_key(&w, "export");
                json_string(&w, path);
                json_key(&w, "uri");
                json_string(&w, uri);
                json_close(&w, '}');
                return 0;
        }
        printf("%s\n", uri);
        id = strrchr(path, '/');
        if (!arg_quiet && id)
                log_info("Exported as %s; 'blockstreamctl export-stop %s' ends it.", path, id + 1);
        return 0;
}

int verb_export_stop(char **args) {
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = NULL;
        _cleanup_free_ char *path = NULL, *verb = NULL;
        const char *a = args[0];
        int r;

        if (a[0] == '/') {
                if (!sd_bus_object_path_is_valid(a) ||
                        strncmp(a, EXPORT_PATH_PREFIX "/", strlen(EXPORT_PATH_PREFIX "/")) != 0)
                        return usage_error("'%s' is not an export object path (" EXPORT_PATH_PREFIX "/ID).", a);
                path = strdup(a);
        } else {
                /* Export ids go into the path unescaped (api.md), so they are object path characters. */
                if (isempty(a) ||
                        strspn(a, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_") != strlen(a))
                        return usage_error("Invalid export id '%s': expected the ID or path that 'export' printed.", a);
                path = strdup_printf(EXPORT_PATH_PREFIX "/%s", a);
        }
        if (!path)
                return log_oom();
        verb = strdup_printf("stop export %s", path);
        if (!verb)
                return log_oom();
        r = connect_bus(&bus);
        if (r < 0)
                return r;
        return call_simple(bus, path, EXPORT_INTERFACE, BS_EXPORT_METHOD_STOP, ACTION_EXPORT, 0, verb, NULL, NULL);
}
