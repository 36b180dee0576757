/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <ctype.h>
#include <inttypes.h>
#include <pwd.h>
#include <systemd/sd-id128.h>

#include "args.h"
#include "blockstream-api.h"
#include "bus.h"
#include "objects.h"
#include "output.h"
#include "verbs-guest.h"

/* "alice (1000)" where the uid is known here, else "1000". */
static void format_owner(char *buf, size_t len, uint32_t uid, bool with_uid) {
        struct passwd pw, *result = NULL;
        char pwbuf[4096];

        if (!is_remote() && getpwuid_r((uid_t) uid, &pw, pwbuf, sizeof(pwbuf), &result) == 0 && result) {
                if (with_uid)
                        snprintf(buf, len, "%s (%" PRIu32 ")", result->pw_name, uid);
                else
                        snprintf(buf, len, "%s", result->pw_name);
        } else
                snprintf(buf, len, "%" PRIu32, uid);
}

/* "vda, vdb (running 42%)" */
static char *format_disk_list(const Registry *reg, const GuestInfo *g) {
        char *buf = NULL;
        size_t len = 0;
        FILE *f;

        f = open_memstream(&buf, &len);
        if (!f)
                return NULL;
        for (char **p = g->disks; p && *p; p++) {
                const DiskInfo *d = registry_find_disk(reg, *p);
                const char *slash = strrchr(*p, '/');

                fputs(p == g->disks ? "" : ", ", f);
                if (!d) {
                        fputs(slash ? slash + 1 : *p, f);
                        continue;
                }
                fputs(!isempty(d->device) ? d->device : strempty(d->path), f);
                if (state_is_active(d->state))
                        fprintf(f, " (%s %u%%)", d->state, percent(d->bytes_done, d->bytes_total));
        }
        if (fclose(f) != 0) {
                free(buf);
                return NULL;
        }
        return buf;
}

int verb_list(_unused_ char **args) {
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = NULL;
        _cleanup_(registry_done) Registry reg = {};
        int r;

        r = connect_bus(&bus);
        if (r < 0)
                return r;
        r = load_registry(bus, &reg);
        if (r < 0)
                return r;

        if (arg_json) {
                JsonWriter w = {.f = stdout};

                json_open(&w, '[');
                for (size_t i = 0; i < reg.n_guests; i++) {
                        const GuestInfo *g = reg.guests[i];
                        _cleanup_free_ DiskInfo **disks = NULL;
                        size_t n = 0;

                        disks = calloc(strv_length(g->disks) + 1, sizeof(DiskInfo *));
                        if (!disks)
                                return log_oom();
                        for (char **p = g->disks; p && *p; p++) {
                                DiskInfo *d = registry_find_disk(&reg, *p);
                                if (d)
                                        disks[n++] = d;
                        }
                        json_guest(&w, g, disks, n);
                }
                json_close(&w, ']');
                return 0;
        }

        if (reg.n_guests == 0) {
                if (!arg_quiet)
                        printf("No guests.\n");
                return 0;
        }

        {
                _cleanup_strv_free_ char **owners = NULL, **disks = NULL;
                size_t w_name = strlen("GUEST"), w_running = strlen("RUNNING"), w_owner = strlen("OWNER");

                for (size_t i = 0; i < reg.n_guests; i++) {
                        char owner[128];
                        char *dl;

                        format_owner(owner, sizeof(owner), reg.guests[i]->owner, false);
                        r = strv_push(&owners, strdup(owner));
                        if (r < 0)
                                return log_oom();
                        dl = format_disk_list(&reg, reg.guests[i]);
                        r = strv_push(&disks, dl);
                        if (r < 0)
                                return log_oom();
                        w_name = MAX(w_name, strlen(strempty(reg.guests[i]->name)));
                        w_owner = MAX(w_owner, strlen(owner));
                }

                printf("%-*s %-*s %-*s %s\n", (int) w_name, "GUEST", (int) w_running, "RUNNING", (int) w_owner, "OWNER",
                        "DISKS");
                for (size_t i = 0; i < reg.n_guests; i++)
                        printf("%-*s %-*s %-*s %s\n", (int) w_name, strempty(reg.guests[i]->name), (int) w_running,
                                yes_no(reg.guests[i]->running), (int) w_owner, owners[i], disks[i]);
                if (!arg_quiet && isatty(STDOUT_FILENO))
                        printf("\n%zu guest%s listed.\n", reg.n_guests, reg.n_guests == 1 ? "" : "s");
        }
        return 0;
}

static void print_guest(const GuestInfo *g) {
        char owner[128];

        format_owner(owner, sizeof(owner), g->owner, true);
        printf("%s\n", strempty(g->name));
        print_field("Object", "%s", g->object);
        print_field("UUID", "%s", isempty(g->uuid) ? "n/a" : g->uuid);
        print_field("Owner", "%s", owner);
        print_field("Running", "%s", yes_no(g->running));
        print_field("QMP socket", "%s", isempty(g->qmp_socket) ? "none (offline guest)" : g->qmp_socket);
        if (!isempty(g->sandbox_label))
                print_field("Sandbox label", "%s", g->sandbox_label);
        print_field("Disks", "%zu", strv_length(g->disks));
}

static void print_disk(const DiskInfo *d) {
        char a[FORMAT_BYTES_MAX], b[FORMAT_BYTES_MAX], t[128], s[64];
        usec_t now = now_usec(CLOCK_REALTIME);
        bool active = state_is_active(d->state);

        putchar('\n');
        print_escaped(!isempty(d->device) ? d->device : strempty(d->object));
        putchar('\n');
        if (!isempty(d->target))
                print_field("Target", "%s", d->target);
        print_field("Object", "%s", d->object);
        print_field("Path", "%s", strempty(d->path));
        if (!isempty(d->node_name))
                print_field("Node", "%s", d->node_name);
        if (strv_length(d->backing_chain) == 0)
                print_field("Backing", "none (independent)");
        else
                for (char **p = d->backing_chain; *p; p++)
                {
                        printf("%*s%c ", FIELD_WIDTH, p == d->backing_chain ? "Backing" : "",
                                p == d->backing_chain ? ':' : ' ');
                        print_escaped(*p);
                        putchar('\n');
                }
        print_field("Size", "%s (%" PRIu64 " bytes)", format_bytes(a, sizeof(a), d->size), d->size);

        if (streq_ptr(d->mode, BS_MODE_RANGE))
                print_field("State", "%s (range %s at offset %" PRIu64 ")", strempty(d->state),
                        format_bytes(a, sizeof(a), d->length), d->offset);
        else if (!isempty(d->mode))
                print_field("State", "%s (%s)", strempty(d->state), d->mode);
        else
                print_field("State", "%s", strempty(d->state));

        if (!streq_ptr(d->state, BS_STATE_IDLE) && !isempty(d->state))
                print_field("Progress", "%s of %s (%u%%)", format_bytes(a, sizeof(a), d->bytes_done),
                        format_bytes(b, sizeof(b), d->bytes_total), percent(d->bytes_done, d->bytes_total));
        print_field("Bandwidth", "%s", format_rate(t, sizeof(t), d->bandwidth, "unlimited"));
        if (active)
                print_field("Rate", "%s", format_rate(t, sizeof(t), d->rate, NULL));
        if (d->max_guest_latency > 0)
                print_field(
                        "Max latency", "%s (the guest's read p99)", format_latency(t, sizeof(t), d->max_guest_latency));
        if (active && !isempty(d->throttle_reason) && !streq(d->throttle_reason, BS_THROTTLE_OFF)) {
                if (d->guest_read_p99 > 0)
                        print_field("Guest p99", "%s", format_latency(t, sizeof(t), d->guest_read_p99));
                else
                        print_field("Guest p99", "no reads");
                print_field("Speed limit", "%s (%s)", format_rate(t, sizeof(t), d->speed_limit, "none"),
                        d->throttle_reason);
        }
        if (d->start_time > 0) {
                if (now >= d->start_time)
                        print_field("Started", "%s (%s ago)", format_timestamp(t, sizeof(t), d->start_time),
                                format_timespan(s, sizeof(s), now - d->start_time));
                else
                        print_field("Started", "%s", format_timestamp(t, sizeof(t), d->start_time));
        }
        if (active && d->expected_end_time > 0) {
                if (d->expected_end_time > now)
                        print_field("Expected end", "%s (in %s)", format_timestamp(t, sizeof(t), d->expected_end_time),
                                format_timespan(s, sizeof(s), d->expected_end_time - now));
                else
                        print_field("Expected end", "%s", format_timestamp(t, sizeof(t), d->expected_end_time));
        }
        if (!isempty(d->error))
                print_field_lines("Error", d->error);
}

int verb_status(char **args) {
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = NULL;
        _cleanup_(guest_info_freep) GuestInfo *g = NULL;
        _cleanup_free_ DiskInfo **disks = NULL;
        size_t n = 0;
        int r;

        r = args[1] ? check_disk_args(args) : check_guest_name(args[0]);
        if (r != 0)
                return r;
        r = connect_bus(&bus);
        if (r < 0)
                return r;

        if (args[1]) {
                DiskInfo *d = NULL;

                disks = calloc(1, sizeof(DiskInfo *));
                if (!disks)
                        return log_oom();
                r = resolve_disk(bus, args[0], args[1], &g, &d);
                if (r != 0)
                        return r;
                disks[n++] = d;
        } else {
                r = get_guest(bus, args[0], &g);
                if (r < 0)
                        return r;
                disks = calloc(strv_length(g->disks) + 1, sizeof(DiskInfo *));
                if (!disks)
                        return log_oom();
                for (char **p = g->disks; p && *p; p++) {
                        r = get_disk(bus, *p, &disks[n]);
                        if (r < 0)
                                goto finish;
                        n++;
                }
        }

        if (arg_json) {
                JsonWriter w = {.f = stdout};
                json_guest(&w, g, disks, n);
        } else {
                print_guest(g);
                for (size_t i = 0; i < n; i++)
                        print_disk(disks[i]);
        }
        r = 0;
finish:
        for (size_t i = 0; i < n; i++)
                disk_info_free(disks[i]);
        return r;
}

int verb_register(char **args) {
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = NULL;
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *m = NULL, *reply = NULL;
        _cleanup_free_ char *qmp = NULL, *verb = NULL;
        const char *name = args[0], *path;
        uint32_t owner = 0;
        int r;

        r = check_guest_name(name);
        if (r != 0)
                return r;
        if (args[1] && !streq(args[1], "-") && !isempty(args[1])) {
                r = local_path_arg(args[1], &qmp);
                if (r < 0)
                        return r;
        }
        if (qmp && arg_disks)
                return usage_error("--disk= describes the disks of a guest that is not running; with a QMP socket "
                                   "blockstreamd asks QEMU for them. Pass '-' as QMP_SOCKET for an offline guest.");

        if (arg_owner) {
                char *end;
                unsigned long long u;

                errno = 0;
                u = strtoull(arg_owner, &end, 10);
                if (isdigit((unsigned char) arg_owner[0]) && errno == 0 && *end == 0 && u < UINT32_MAX)
                        owner = (uint32_t) u;
                else {
                        struct passwd pw, *result = NULL;
                        char buf[4096];

                        /* A user name resolves on this machine only. */
                        if (is_remote())
                                return usage_error("--owner= must be a numeric uid with --host: '%s'.", arg_owner);
                        r = getpwnam_r(arg_owner, &pw, buf, sizeof(buf), &result);
                        if (r != 0 || !result)
                                return usage_error("Unknown user '%s' for --owner=.", arg_owner);
                        owner = (uint32_t) pw.pw_uid;
                }
        }
        if (arg_uuid) {
                sd_id128_t id;

                if (sd_id128_from_string(arg_uuid, &id) < 0)
                        return usage_error("Invalid UUID '%s'.", arg_uuid);
        }
        r = connect_bus(&bus);
        if (r < 0)
                return r;

        r = new_call(bus, MANAGER_PATH, MANAGER_INTERFACE, BS_MANAGER_METHOD_REGISTER_GUEST, &m);
        if (r < 0)
                return r;
        r = sd_bus_message_append(m, "ss", name, strempty(qmp));
        if (r >= 0)
                r = append_options_begin(m);
        if (r >= 0 && arg_owner)
                r = sd_bus_message_append(m, "{sv}", BS_OPTION_OWNER, "u", owner);
        if (r >= 0 && arg_uuid)
                r = sd_bus_message_append(m, "{sv}", BS_OPTION_UUID, "s", arg_uuid);
        if (r >= 0 && arg_disks) {
                r = sd_bus_message_open_container(m, 'e', "sv");
                if (r >= 0)
                        r = sd_bus_message_append(m, "s", BS_OPTION_DISKS);
                if (r >= 0)
                        r = sd_bus_message_open_container(m, 'v', "a{ss}");
                if (r >= 0)
                        r = sd_bus_message_open_container(m, 'a', "{ss}");
                for (char **d = arg_disks; r >= 0 && *d; d++) {
                        _cleanup_free_ char *alias = NULL, *p = NULL;
                        const char *eq = strchr(*d, '=');

                        alias = strndup(*d, (size_t) (eq - *d)); /* '=' checked in parse_argv */
                        if (!alias)
                                return log_oom();
                        r = local_path_arg(eq + 1, &p);
                        if (r < 0)
                                return r;
                        r = sd_bus_message_append(m, "{ss}", alias, p);
                }
                if (r >= 0)
                        r = sd_bus_message_close_container(m);
                if (r >= 0)
                        r = sd_bus_message_close_container(m);
                if (r >= 0)
                        r = sd_bus_message_close_container(m);
        }
        if (r >= 0 && arg_disk_names) {
                r = sd_bus_message_open_container(m, 'e', "sv");
                if (r >= 0)
                        r = sd_bus_message_append(m, "s", BS_OPTION_DISK_NAMES);
                if (r >= 0)
                        r = sd_bus_message_open_container(m, 'v', "a{ss}");
                if (r >= 0)
                        r = sd_bus_message_open_container(m, 'a', "{ss}");
                for (char **d = arg_disk_names; r >= 0 && *d; d++) {
                        _cleanup_free_ char *alias = NULL;
                        const char *eq = strchr(*d, '=');

                        alias = strndup(*d, (size_t) (eq - *d)); /* '=' checked in parse_argv */
                        if (!alias)
                                return log_oom();
                        r = sd_bus_message_append(m, "{ss}", alias, eq + 1);
                }
                if (r >= 0)
                        r = sd_bus_message_close_container(m);
                if (r >= 0)
                        r = sd_bus_message_close_container(m);
                if (r >= 0)
                        r = sd_bus_message_close_container(m);
        }
        if (r >= 0)
                r = sd_bus_message_close_container(m);
        if (r < 0)
                return log_error_errno(r, "Failed to append RegisterGuest arguments: %m");

        verb = strdup_printf("register guest '%s'", name);
        if (!verb)
                return log_oom();
        r = call(bus, m, ACTION_MANAGE, SLOW_CALL_TIMEOUT, verb, &reply);
        if (r < 0)
                return r;
        r = sd_bus_message_read(reply, "o", &path);
        if (r < 0)
                return log_parse_error(r);

        if (arg_json) {
                JsonWriter w = {.f = stdout};

                json_open(&w, '{');
                json_key(&w, "guest");
                json_string(&w, path);
                json_close(&w, '}');
        } else if (!arg_quiet)
                printf("%s\n", path);
        return 0;
}

int verb_unregister(char **args) {
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = NULL;
        _cleanup_free_ char *verb = NULL;
        int r;

        r = check_guest_name(args[0]);
        if (r != 0)
                return r;
        r = connect_bus(&bus);
        if (r < 0)
                return r;
        verb = strdup_printf("unregister guest '%s'", args[0]);
        if (!verb)
                return log_oom();
        return call_simple(bus, MANAGER_PATH, MANAGER_INTERFACE, BS_MANAGER_METHOD_UNREGISTER_GUEST, ACTION_MANAGE, 0,
                verb, NULL, "s", args[0]);
}

int verb_provision(char **args) {
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = NULL;
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *m = NULL, *reply = NULL;
        _cleanup_free_ char *template = NULL, *target = NULL;
        char a[FORMAT_BYTES_MAX];
        uint64_t size;
        int r;

        if (isempty(args[0]) || isempty(args[1]))
                return usage_error("TEMPLATE and TARGET must not be empty.");
        /* URLs go as they are; only local file names are made absolute. */
        if (strstr(args[0], "://")) {
                template = strdup(args[0]);
                if (!template)
                        return log_oom();
        } else {
                r = local_path_arg(args[0], &template);
                if (r < 0)
                        return r;
        }
        r = local_path_arg(args[1], &target);
        if (r < 0)
                return r;
        r = connect_bus(&bus);
        if (r < 0)
                return r;

        r = new_call(bus, MANAGER_PATH, MANAGER_INTERFACE, BS_MANAGER_METHOD_PROVISION_DISK, &m);
        if (r < 0)
                return r;
        r = sd_bus_message_append(m, "ss", template, target);
        if (r >= 0)
                r = append_options_begin(m);
        if (r >= 0 && arg_template_format)
                r = sd_bus_message_append(m, "{sv}", BS_OPTION_TEMPLATE_FORMAT, "s", arg_template_format);
        if (r >= 0 && arg_cache)
                r = sd_bus_message_append(m, "{sv}", BS_OPTION_CACHE, "b", 1);
        if (r >= 0)
                r = sd_bus_message_close_container(m);
        if (r < 0)
                return log_error_errno(r, "Failed to append ProvisionDisk arguments: %m");

        r = call(bus, m, ACTION_MANAGE, SLOW_CALL_TIMEOUT, "provision disk", &reply);
        if (r < 0)
                return r;
        r = sd_bus_message_read(reply, "t", &size);
        if (r < 0)
                return log_parse_error(r);

        if (arg_json) {
                JsonWriter w = {.f = stdout};

                json_open(&w, '{');
                json_key(&w, "size");
                json_unsigned(&w, size);
                json_close(&w, '}');
        } else if (!arg_quiet)
                printf("%s: %s (%" PRIu64 " bytes), backed by %s\n", target, format_bytes(a, sizeof(a), size), size,
                        template);
        return 0;
}
