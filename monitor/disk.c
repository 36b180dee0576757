/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* One disk's row: state, progress, bandwidth, mode, the allocation map, and the actions.
 *
 * The row shows the proxy's cached properties, which GDBus keeps current from PropertiesChanged;
 * the end of a job comes as Finished. Every method call allows interactive authorization (the
 * desktop's polkit agent may ask for a password), has no timeout for that reason, and is
 * cancelled when the row goes; a refusal or any other error is shown in the row. */

#include <errno.h>
#include <string.h>

#include "format.h"
#include "monitor.h"

/* GetAllocationMap answers at most this many extents; we continue after the last one. */
#define MAP_REPLY_MAX 65536
/* A map of more extents than this is drawn from what was read so far. */
#define MAP_EXTENTS_MAX (16 * MAP_REPLY_MAX)

enum { KIND_LOCAL, KIND_ZERO, KIND_BACKING, KIND_ABSENT, KIND_N };
static const char *const kind_names[KIND_N] = {"local", "zero", "backing", "absent"};
static const double kind_colors[KIND_N][3] = {
        {0.18, 0.55, 0.34}, /* local: green */
        {0.56, 0.80, 0.60}, /* zero: pale green */
        {0.90, 0.55, 0.10}, /* backing: orange */
        {0.75, 0.75, 0.75}, /* absent: grey */
};
static const char *const kind_hex[KIND_N] = {"#2e8c57", "#8fcc99", "#e68c1a", "#bfbfbf"};

typedef struct {
        guint64 offset, length;
        int kind;
} Extent;

struct DiskView {
        Monitor *monitor;
        GDBusProxy *proxy;
        char *path;
        char *guest_name;
        GCancellable *cancellable;
        gulong props_handler, signal_handler;

        GtkWidget *root;
        GtkLabel *title, *chain, *state, *detail, *adaptive, *message;
        GtkProgressBar *progress;
        GtkWidget *map_area;
        GtkLabel *map_legend;
        GArray *extents; /* Extent, the map drawn */
        GArray *pending; /* Extent, a map being read */
        guint64 map_size;
        guint64 pending_size;
        gboolean pending_interactive;

        GtkEntry *offset, *length, *bandwidth, *latency;
        GtkDropDown *base;
        GtkStringList *base_model;
        char **base_chain;
        GtkWidget *pull, *pause, *resume, *cancel, *set_bw, *set_latency, *map_refresh, *export_btn, *stop_export, *copy;
        GtkEntry *uri;
        char *export_path;
};

typedef void (*ReplyHandler)(DiskView *d, GVariant *reply);

typedef struct {
        DiskView *d;
        char *what;
        ReplyHandler handler;
        gboolean quiet;  /* not asked for by the person: its error goes to the map's legend */
        gboolean silent; /* a map read: no "…" and no "done" over the message of a job's end */
} Call;

/* ---- properties */

static guint64 prop_u64(DiskView *d, const char *name) {
        g_autoptr(GVariant) v = g_dbus_proxy_get_cached_property(d->proxy, name);

        return v && g_variant_is_of_type(v, G_VARIANT_TYPE_UINT64) ? g_variant_get_uint64(v) : 0;
}

static char *prop_str(DiskView *d, const char *name) {
        g_autoptr(GVariant) v = g_dbus_proxy_get_cached_property(d->proxy, name);

        return g_strdup(v && g_variant_is_of_type(v, G_VARIANT_TYPE_STRING) ? g_variant_get_string(v, NULL) : "");
}

static char **prop_strv(DiskView *d, const char *name) {
        g_autoptr(GVariant) v = g_dbus_proxy_get_cached_property(d->proxy, name);

        return v && g_variant_is_of_type(v, G_VARIANT_TYPE_STRING_ARRAY) ? g_variant_dup_strv(v, NULL)
                                                                         : g_new0(char *, 1);
}

static void set_message(DiskView *d, gboolean error, const char *text) {
        g_autofree char *markup = NULL;

        if (error)
                markup = g_markup_printf_escaped("<span foreground=\"#c01c28\">%s</span>", text);
        else
                markup = g_markup_escape_text(text, -1);
        gtk_label_set_markup(d->message, markup);
        gtk_accessible_update_property(GTK_ACCESSIBLE(d->message), GTK_ACCESSIBLE_PROPERTY_LABEL, text, -1);
}

static void update_base_choices(DiskView *d) {
        g_auto(GStrv) chain = prop_strv(d, "BackingChain");
        guint n;

        if (d->base_chain && g_strv_equal((const char *const *) d->base_chain, (const char *const *) chain))
                return;
        n = g_list_model_get_n_items(G_LIST_MODEL(d->base_model));
        gtk_string_list_splice(d->base_model, 0, n, NULL);
        gtk_string_list_append(d->base_model, "none: the whole chain");
        for (char **p = chain; *p; p++)
                gtk_string_list_append(d->base_model, *p);
        gtk_drop_down_set_selected(d->base, 0);
        g_strfreev(d->base_chain);
        d->base_chain = g_steal_pointer(&chain);
}

/* A latency in µs as a person reads it; 0 is "off" for a target, "none yet" for a measurement. */
static char *format_latency(guint64 usec, const char *zero) {
        if (usec == 0)
                return g_strdup(zero);
        if (usec < 1000)
                return g_strdup_printf("%" G_GUINT64_FORMAT " µs", usec);
        return g_strdup_printf("%.1f ms", (double) usec / 1000.0);
}

/* The job's engine and the adaptive throttle's view, live from PropertiesChanged. */
static void adaptive_update(DiskView *d) {
        g_autofree char *engine = prop_str(d, "Engine"), *reason = prop_str(d, "ThrottleReason"),
                        *target = format_latency(prop_u64(d, "MaxGuestLatency"), "off"),
                        *p99 = format_latency(prop_u64(d, "GuestReadP99"), "not measured"),
                        *limit_bytes = prop_u64(d, "SpeedLimit") ? bs_format_rate(prop_u64(d, "SpeedLimit"))
                                                                  : g_strdup("none"),
                        *text = NULL;

        text = g_strdup_printf("Engine: %s · Latency target: %s · Guest read p99: %s · Speed limit: %s · Throttle: %s",
                *engine ? engine : "none", target, p99, limit_bytes, *reason ? reason : "off");
        gtk_label_set_text(d->adaptive, text);
}

static void disk_view_update(DiskView *d) {
        g_autofree char *device = prop_str(d, "Device"), *path = prop_str(d, "Path"), *state = prop_str(d, "State"),
                        *target = prop_str(d, "Target"), *mode = prop_str(d, "Mode"), *error = prop_str(d, "Error"),
                        *title = NULL, *state_text = NULL, *chain_text = NULL, *progress = NULL, *bw = NULL,
                        *size = NULL, *detail = NULL;
        g_auto(GStrv) chain = prop_strv(d, "BackingChain");
        guint64 done = prop_u64(d, "BytesDone"), total = prop_u64(d, "BytesTotal");
        gboolean active = strcmp(state, "running") == 0 || strcmp(state, "paused") == 0;

        /* The name the guest's manager gives it (libvirt's vda) beside QEMU's (virtio-disk0). */
        if (*target)
                title = g_markup_printf_escaped("<b>%s</b> (%s)  %s", device, target, path);
        else
                title = g_markup_printf_escaped("<b>%s</b>  %s", device, path);
        gtk_label_set_markup(d->title, title);
        if (chain[0]) {
                g_autofree char *joined = g_strjoinv(" ← ", chain);
                chain_text = g_strdup_printf("Backing chain: %s", joined);
        } else
                chain_text = g_strdup("Backing chain: none (the disk stands alone)");
        gtk_label_set_text(d->chain, chain_text);

        state_text = *error ? g_strdup_printf("State: %s — %s", state, error) : g_strdup_printf("State: %s", state);
        gtk_label_set_text(d->state, state_text);

        bw = bs_format_rate(prop_u64(d, "Bandwidth"));
        size = bs_format_size(prop_u64(d, "Size"));
        if (strcmp(mode, "range") == 0) {
                g_autofree char *off = bs_format_size(prop_u64(d, "Offset")),
                                *len = bs_format_size(prop_u64(d, "Length"));
                detail = g_strdup_printf("Size: %s · Mode: range (%s from %s) · Bandwidth: %s", size, len, off, bw);
        } else
                detail = g_strdup_printf("Size: %s · Mode: %s · Bandwidth: %s", size, *mode ? mode : "none", bw);
        gtk_label_set_text(d->detail, detail);
        adaptive_update(d);

        gtk_progress_bar_set_fraction(d->progress, total > 0 ? MIN(1.0, (double) done / (double) total) : 0.0);
        progress = bs_format_progress(done, total, active ? prop_u64(d, "Rate") : 0,
                active ? prop_u64(d, "ExpectedEndTime") : 0, g_get_real_time());
        gtk_progress_bar_set_text(d->progress, progress);

        gtk_widget_set_sensitive(d->pull, !active);
        gtk_widget_set_sensitive(d->pause, strcmp(state, "running") == 0);
        gtk_widget_set_sensitive(d->resume, strcmp(state, "paused") == 0);
        gtk_widget_set_sensitive(d->cancel, active);
        update_base_choices(d);
}

/* ---- calls */

static void map_reply(DiskView *d, GVariant *reply);

static void call_done(GObject *source, GAsyncResult *res, gpointer user_data) {
        g_autoptr(GError) error = NULL;
        g_autoptr(GVariant) reply = g_dbus_connection_call_finish(G_DBUS_CONNECTION(source), res, &error);
        Call *c = user_data;

        /* Cancelled: the row is gone, c->d with it. */
        if (!g_error_matches(error, G_IO_ERROR, G_IO_ERROR_CANCELLED)) {
                if (reply) {
                        g_autofree char *text = g_strdup_printf("%s: done.", c->what);
                        if (!c->quiet && !c->silent)
                                set_message(c->d, FALSE, text);
                        if (c->handler)
                                c->handler(c->d, reply);
                } else {
                        g_autofree char *remote = g_dbus_error_get_remote_error(error), *text = NULL;

                        g_dbus_error_strip_remote_error(error);
                        text = remote ? g_strdup_printf("%s failed: %s (%s)", c->what, error->message, remote)
                                      : g_strdup_printf("%s failed: %s", c->what, error->message);
                        if (c->quiet) {
                                g_autofree char *legend = g_strdup_printf("Allocation: not read (%s); Refresh map "
                                                                          "asks again",
                                        remote ? remote : error->message);
                                gtk_label_set_text(c->d->map_legend, legend);
                        } else
                                set_message(c->d, TRUE, text);
                        if (c->handler == map_reply) {
                                /* the map drawn stays; another read may be asked for */
                                g_array_set_size(c->d->pending, 0);
                                gtk_widget_set_sensitive(c->d->map_refresh, TRUE);
                        }
                }
        }
        g_free(c->what);
        g_free(c);
}

static void call_full(DiskView *d, const char *what, const char *path, const char *iface, const char *method,
        GVariant *params, const char *reply_type, ReplyHandler handler, gboolean interactive) {
        Call *c = g_new0(Call, 1);
        g_autofree char *text = g_strdup_printf("%s…", what);

        c->d = d;
        c->what = g_strdup(what);
        c->handler = handler;
        c->quiet = !interactive;
        c->silent = handler == map_reply;
        if (!c->quiet && !c->silent)
                set_message(d, FALSE, text);
        g_dbus_connection_call(g_dbus_proxy_get_connection(d->proxy), BUS_NAME, path, iface, method, params,
                reply_type ? G_VARIANT_TYPE(reply_type) : NULL,
                G_DBUS_CALL_FLAGS_NO_AUTO_START | (interactive ? G_DBUS_CALL_FLAGS_ALLOW_INTERACTIVE_AUTHORIZATION : 0),
                BS_CALL_TIMEOUT_MSEC, d->cancellable, call_done, c);
}

static void call(DiskView *d, const char *what, const char *method, GVariant *params, const char *reply_type,
        ReplyHandler handler) {
        call_full(d, what, d->path, STREAM_INTERFACE, method, params, reply_type, handler, TRUE);
}

/* An entry's size (*given FALSE if it is empty). FALSE, with the reason shown, if it is no size. */
static gboolean entry_size(
        DiskView *d, GtkEntry *entry, const char *what, gboolean rate, gboolean *given, guint64 *ret) {
        const char *text = gtk_editable_get_text(GTK_EDITABLE(entry));
        g_autofree char *stripped = g_strstrip(g_strdup(text));

        *given = *stripped != 0;
        *ret = 0;
        if (!*given)
                return TRUE;
        if (rate && g_ascii_strcasecmp(stripped, "unlimited") == 0)
                return TRUE;
        if (!bs_parse_size(stripped, rate, ret)) {
                g_autofree char *msg = g_strdup_printf("%s: '%s' is not a size (a number of bytes, with K, M, G, "
                                                       "KiB, MB … as suffix%s)",
                        what, stripped, rate ? ", or 'unlimited'" : "");
                set_message(d, TRUE, msg);
                return FALSE;
        }
        return TRUE;
}

static void on_started(DiskView *d, GVariant *reply) {
        set_message(d, FALSE, "Pull: started (QEMU accepted the job).");
}

static void on_pull(GtkButton *b, DiskView *d) {
        guint64 offset, length, bandwidth;
        gboolean has_offset, has_length, has_bandwidth;
        GVariantBuilder opts;
        guint base;

        if (!entry_size(d, d->offset, "Offset", FALSE, &has_offset, &offset) ||
                !entry_size(d, d->length, "Length", FALSE, &has_length, &length) ||
                !entry_size(d, d->bandwidth, "Bandwidth", TRUE, &has_bandwidth, &bandwidth))
                return;
        g_variant_builder_init(&opts, G_VARIANT_TYPE("a{sv}"));
        if (has_bandwidth)
                g_variant_builder_add(&opts, "{sv}", "bandwidth", g_variant_new_uint64(bandwidth));
        base = gtk_drop_down_get_selected(d->base);
        if (base != GTK_INVALID_LIST_POSITION && base > 0 && d->base_chain && base <= g_strv_length(d->base_chain))
                g_variant_builder_add(&opts, "{sv}", "base", g_variant_new_string(d->base_chain[base - 1]));
        call(d, offset || length ? "Pull (range)" : "Pull", "Start", g_variant_new("(tta{sv})", offset, length, &opts),
                NULL, on_started);
}

static void on_pause(GtkButton *b, DiskView *d) {
        call(d, "Pause", "Pause", NULL, NULL, NULL);
}

static void on_resume(GtkButton *b, DiskView *d) {
        call(d, "Resume", "Resume", NULL, NULL, NULL);
}

static void on_cancel(GtkButton *b, DiskView *d) {
        call(d, "Cancel", "Cancel", NULL, NULL, NULL);
}

static void on_set_bandwidth(GtkButton *b, DiskView *d) {
        guint64 bandwidth;
        gboolean given;

        if (!entry_size(d, d->bandwidth, "Bandwidth", TRUE, &given, &bandwidth))
                return;
        if (!given) {
                set_message(d, TRUE, "Set bandwidth: type a bandwidth first (e.g. 100M, or 0 for unlimited)");
                return;
        }
        call(d, "Set bandwidth", "SetBandwidth", g_variant_new("(t)", bandwidth), NULL, NULL);
}

/* "20ms", "500us", "1s", "20" (ms), "0" or "off" (no target) → µs */
static gboolean parse_latency(const char *s, guint64 *ret) {
        g_autofree char *t = g_strstrip(g_strdup(s));
        guint64 v, mult = 1000;
        char *end = NULL;

        if (g_ascii_strcasecmp(t, "off") == 0) {
                *ret = 0;
                return TRUE;
        }
        if (!g_ascii_isdigit(*t))
                return FALSE;
        errno = 0;
        v = g_ascii_strtoull(t, &end, 10);
        if (errno != 0)
                return FALSE;
        while (*end == ' ')
                end++;
        if (*end == 0 || g_ascii_strcasecmp(end, "ms") == 0)
                mult = 1000;
        else if (g_ascii_strcasecmp(end, "us") == 0 || strcmp(end, "µs") == 0)
                mult = 1;
        else if (g_ascii_strcasecmp(end, "s") == 0)
                mult = 1000000;
        else
                return FALSE;
        if (v > G_MAXUINT64 / mult)
                return FALSE;
        *ret = v * mult;
        return TRUE;
}

static void on_set_latency(GtkButton *b, DiskView *d) {
        const char *text = gtk_editable_get_text(GTK_EDITABLE(d->latency));
        guint64 usec;

        if (!parse_latency(text, &usec)) {
                g_autofree char *msg = g_strdup_printf("Latency target: '%s' is not a latency (e.g. 20ms, 500us, "
                                                       "1s; 0 or off: none)",
                        text);
                set_message(d, TRUE, msg);
                return;
        }
        call(d, "Set latency target", "SetMaxGuestLatency", g_variant_new("(t)", usec), NULL, NULL);
}

/* ---- the allocation map */

static void map_draw(GtkDrawingArea *area, cairo_t *cr, int width, int height, gpointer user_data) {
        DiskView *d = user_data;

        cairo_set_source_rgb(cr, 0.92, 0.92, 0.92);
        cairo_rectangle(cr, 0, 0, width, height);
        cairo_fill(cr);
        if (d->map_size == 0)
                return;
        for (guint i = 0; i < d->extents->len; i++) {
                const Extent *e = &g_array_index(d->extents, Extent, i);
                double x0 = (double) e->offset / (double) d->map_size * width;
                double x1 = (double) (e->offset + e->length) / (double) d->map_size * width;

                cairo_set_source_rgb(cr, kind_colors[e->kind][0], kind_colors[e->kind][1], kind_colors[e->kind][2]);
                /* At least a pixel wide: a small extent of data is still seen. */
                cairo_rectangle(cr, x0, 0, MAX(x1 - x0, 1.0), height);
                cairo_fill(cr);
        }
        cairo_set_source_rgb(cr, 0.4, 0.4, 0.4);
        cairo_set_line_width(cr, 1);
        cairo_rectangle(cr, 0.5, 0.5, width - 1, height - 1);
        cairo_stroke(cr);
}

static void map_legend_update(DiskView *d) {
        guint64 bytes[KIND_N] = {}, covered = 0;
        GString *s = g_string_new("Allocation:");
        GString *plain = g_string_new("Allocation:");

        for (guint i = 0; i < d->extents->len; i++) {
                const Extent *e = &g_array_index(d->extents, Extent, i);
                bytes[e->kind] += e->length;
                covered += e->length;
        }
        for (int k = 0; k < KIND_N; k++) {
                double share = covered ? 100.0 * (double) bytes[k] / (double) covered : 0.0;
                g_autofree char *size = bs_format_size(bytes[k]);

                g_string_append_printf(s, "  <span foreground=\"%s\">■</span> %s %.1f %% (%s)", kind_hex[k],
                        kind_names[k], share, size);
                g_string_append_printf(plain, " %s %.1f %%", kind_names[k], share);
        }
        if (d->extents->len == 0) {
                g_string_assign(s, "Allocation: not read yet (Refresh map)");
                g_string_assign(plain, s->str);
        }
        gtk_label_set_markup(d->map_legend, s->str);
        gtk_accessible_update_property(GTK_ACCESSIBLE(d->map_legend), GTK_ACCESSIBLE_PROPERTY_LABEL, plain->str, -1);
        g_string_free(s, TRUE);
        g_string_free(plain, TRUE);
}

static void map_request(DiskView *d, guint64 offset);

static void map_reply(DiskView *d, GVariant *reply) {
        g_autoptr(GVariantIter) it = NULL;
        guint64 offset, length, next = 0, start;
        guint32 depth;
        const char *kind;
        gsize n;

        if (d->pending->len > 0) {
                const Extent *last = &g_array_index(d->pending, Extent, d->pending->len - 1);
                next = last->offset + last->length;
        }
        start = next;
        g_variant_get(reply, "(a(ttus))", &it);
        n = g_variant_iter_n_children(it);
        while (g_variant_iter_next(it, "(ttu&s)", &offset, &length, &depth, &kind)) {
                Extent e = {offset, length, -1};

                for (int k = 0; k < KIND_N; k++)
                        if (strcmp(kind, kind_names[k]) == 0)
                                e.kind = k;
                /* In order, within the disk, and known: anything else is not drawn. */
                if (e.kind < 0 || length == 0 || offset < next || offset > d->pending_size ||
                        length > d->pending_size - offset)
                        continue;
                g_array_append_val(d->pending, e);
                next = offset + length;
        }
        if (n >= MAP_REPLY_MAX && next > start && next < d->pending_size && d->pending->len < MAP_EXTENTS_MAX) {
                map_request(d, next);
                return;
        }
        g_array_set_size(d->extents, 0);
        g_array_append_vals(d->extents, d->pending->data, d->pending->len);
        g_array_set_size(d->pending, 0);
        d->map_size = d->pending_size;
        map_legend_update(d);
        gtk_widget_queue_draw(d->map_area);
        gtk_widget_set_sensitive(d->map_refresh, TRUE);
}

static void map_request(DiskView *d, guint64 offset) {
        call_full(d, "Read the allocation map", d->path, STREAM_INTERFACE, "GetAllocationMap",
                g_variant_new("(tt)", offset, (guint64) 0), "(a(ttus))", map_reply, d->pending_interactive);
}

/* interactive: the person asked for it (or a job they watch ended); the map read when a row
 * appears does not make a polkit agent ask for passwords for every disk at start. */
static void map_load(DiskView *d, gboolean interactive) {
        if (!gtk_widget_get_sensitive(d->map_refresh))
                return; /* one read at a time */
        gtk_widget_set_sensitive(d->map_refresh, FALSE);
        g_array_set_size(d->pending, 0);
        d->pending_size = prop_u64(d, "Size");
        d->pending_interactive = interactive;
        map_request(d, 0);
}

static void on_map_refresh(GtkButton *b, DiskView *d) {
        map_load(d, TRUE);
}

/* ---- exports */

static void on_exported(DiskView *d, GVariant *reply) {
        const char *path, *uri;
        g_autofree char *text = NULL;

        g_variant_get(reply, "(&o&s)", &path, &uri);
        g_free(d->export_path);
        d->export_path = g_strdup(path);
        gtk_editable_set_text(GTK_EDITABLE(d->uri), uri);
        gtk_widget_set_sensitive(d->stop_export, TRUE);
        gtk_widget_set_sensitive(d->copy, TRUE);
        text = g_strdup_printf("Export: serving at %s", uri);
        set_message(d, FALSE, text);
}

static void on_export(GtkButton *b, DiskView *d) {
        GVariantBuilder opts;

        g_variant_builder_init(&opts, G_VARIANT_TYPE("a{sv}"));
        call(d, "Export", "Export", g_variant_new("(a{sv})", &opts), "(os)", on_exported);
}

static void on_stop_export(GtkButton *b, DiskView *d) {
        if (!d->export_path)
                return;
        call_full(d, "Stop export", d->export_path, EXPORT_INTERFACE, "Stop", NULL, NULL, NULL, TRUE);
}

static void on_copy(GtkButton *b, DiskView *d) {
        const char *uri = gtk_editable_get_text(GTK_EDITABLE(d->uri));

        if (!*uri)
                return;
        gdk_clipboard_set_text(gtk_widget_get_clipboard(GTK_WIDGET(b)), uri);
        set_message(d, FALSE, "The URI is on the clipboard.");
}

void disk_view_exports_changed(DiskView *d) {
        GHashTableIter it;
        gpointer key, value;
        const char *found_path = NULL;
        g_autofree char *found_uri = NULL;

        g_hash_table_iter_init(&it, d->monitor->exports);
        while (g_hash_table_iter_next(&it, &key, &value)) {
                g_autoptr(GVariant) disk = g_dbus_proxy_get_cached_property(value, "Disk");
                g_autoptr(GVariant) state = g_dbus_proxy_get_cached_property(value, "State");
                g_autoptr(GVariant) uri = g_dbus_proxy_get_cached_property(value, "URI");

                if (!disk || !g_variant_is_of_type(disk, G_VARIANT_TYPE_OBJECT_PATH) ||
                        strcmp(g_variant_get_string(disk, NULL), d->path) != 0)
                        continue;
                if (!state || !g_variant_is_of_type(state, G_VARIANT_TYPE_STRING) ||
                        strcmp(g_variant_get_string(state, NULL), "serving") != 0)
                        continue;
                found_path = key;
                g_free(found_uri);
                found_uri = uri && g_variant_is_of_type(uri, G_VARIANT_TYPE_STRING) ? g_variant_dup_string(uri, NULL)
                                                                                    : g_strdup("");
        }
        g_free(d->export_path);
        d->export_path = g_strdup(found_path);
        gtk_editable_set_text(GTK_EDITABLE(d->uri), found_uri ? found_uri : "");
        gtk_widget_set_sensitive(d->stop_export, found_path != NULL);
        gtk_widget_set_sensitive(d->copy, found_uri && *found_uri);
}

/* ---- signals */

static void on_props_changed(GDBusProxy *proxy, GVariant *changed, GStrv invalidated, gpointer user_data) {
        disk_view_update(user_data);
}

static void on_signal(GDBusProxy *proxy, const char *sender, const char *signal, GVariant *params, gpointer user_data) {
        DiskView *d = user_data;
        const char *result, *error;
        guint64 done;
        g_autofree char *size = NULL, *text = NULL;

        if (strcmp(signal, "Finished") != 0 || !g_variant_is_of_type(params, G_VARIANT_TYPE("(sts)")))
                return;
        g_variant_get(params, "(&st&s)", &result, &done, &error);
        size = bs_format_size(done);
        text = *error ? g_strdup_printf("The job ended: %s after %s: %s", result, size, error)
                      : g_strdup_printf("The job ended: %s after %s.", result, size);
        set_message(d, strcmp(result, "completed") != 0, text);
        map_load(d, TRUE);
}

/* ---- the row */

static GtkWidget *button(GtkWidget *box, const char *label, const char *tooltip, GCallback cb, DiskView *d) {
        GtkWidget *b = gtk_button_new_with_label(label);

        gtk_widget_set_tooltip_text(b, tooltip);
        g_signal_connect(b, "clicked", cb, d);
        gtk_box_append(GTK_BOX(box), b);
        return b;
}

static GtkEntry *option_entry(GtkGrid *grid, int row, const char *label, const char *placeholder) {
        GtkWidget *l = gtk_label_new(label), *e = gtk_entry_new();

        gtk_label_set_xalign(GTK_LABEL(l), 0);
        gtk_entry_set_placeholder_text(GTK_ENTRY(e), placeholder);
        gtk_accessible_update_relation(GTK_ACCESSIBLE(e), GTK_ACCESSIBLE_RELATION_LABELLED_BY, l, NULL, -1);
        gtk_grid_attach(grid, l, 0, row, 1, 1);
        gtk_grid_attach(grid, e, 1, row, 1, 1);
        gtk_widget_set_hexpand(e, TRUE);
        return GTK_ENTRY(e);
}

static GtkLabel *row_label(GtkWidget *box) {
        GtkWidget *l = gtk_label_new(NULL);

        gtk_label_set_xalign(GTK_LABEL(l), 0);
        gtk_label_set_wrap(GTK_LABEL(l), TRUE);
        gtk_label_set_selectable(GTK_LABEL(l), FALSE);
        gtk_box_append(GTK_BOX(box), l);
        return GTK_LABEL(l);
}

DiskView *disk_view_new(Monitor *m, GDBusProxy *proxy, const char *guest_name) {
        DiskView *d = g_new0(DiskView, 1);
        GtkWidget *actions, *export_box, *expander, *grid, *base_label;

        d->monitor = m;
        d->proxy = g_object_ref(proxy);
        d->path = g_strdup(g_dbus_proxy_get_object_path(proxy));
        d->cancellable = g_cancellable_new();
        d->extents = g_array_new(FALSE, FALSE, sizeof(Extent));
        d->pending = g_array_new(FALSE, FALSE, sizeof(Extent));

        d->root = g_object_new(GTK_TYPE_BOX, "orientation", GTK_ORIENTATION_VERTICAL, "spacing", 4, "accessible-role",
                GTK_ACCESSIBLE_ROLE_GROUP, NULL);
        g_object_ref_sink(d->root);
        d->title = row_label(d->root);
        d->chain = row_label(d->root);
        d->state = row_label(d->root);
        d->progress = GTK_PROGRESS_BAR(gtk_progress_bar_new());
        gtk_progress_bar_set_show_text(d->progress, TRUE);
        gtk_accessible_update_property(GTK_ACCESSIBLE(d->progress), GTK_ACCESSIBLE_PROPERTY_LABEL, "Progress", -1);
        gtk_box_append(GTK_BOX(d->root), GTK_WIDGET(d->progress));
        d->detail = row_label(d->root);
        d->adaptive = row_label(d->root);

        d->map_area = gtk_drawing_area_new();
        gtk_drawing_area_set_content_height(GTK_DRAWING_AREA(d->map_area), 18);
        gtk_drawing_area_set_draw_func(GTK_DRAWING_AREA(d->map_area), map_draw, d, NULL);
        gtk_accessible_update_property(
                GTK_ACCESSIBLE(d->map_area), GTK_ACCESSIBLE_PROPERTY_LABEL, "Allocation map", -1);
        gtk_box_append(GTK_BOX(d->root), d->map_area);
        d->map_legend = row_label(d->root);

        actions = gtk_box_new(GTK_ORIENTATION_HORIZONTAL, 6);
        d->pull = button(actions, "Pull", "Stream the backing data into the top image (the options below apply)",
                G_CALLBACK(on_pull), d);
        d->pause = button(actions, "Pause", "Pause the job", G_CALLBACK(on_pause), d);
        d->resume = button(actions, "Resume", "Resume the paused job", G_CALLBACK(on_resume), d);
        d->cancel = button(actions, "Cancel", "Stop the job; what was copied stays", G_CALLBACK(on_cancel), d);
        d->set_bw = button(actions, "Set bandwidth", "Apply the bandwidth below, also to a running job",
                G_CALLBACK(on_set_bandwidth), d);
        d->set_latency = button(actions, "Set latency target",
                "Apply the latency target below: the job slows down while the guest's reads wait longer",
                G_CALLBACK(on_set_latency), d);
        d->map_refresh = button(actions, "Refresh map", "Read the allocation map again", G_CALLBACK(on_map_refresh), d);
        gtk_box_append(GTK_BOX(d->root), actions);

        expander = gtk_expander_new("Pull options");
        gtk_accessible_update_property(GTK_ACCESSIBLE(expander), GTK_ACCESSIBLE_PROPERTY_LABEL, "Pull options", -1);
        grid = gtk_grid_new();
        gtk_grid_set_row_spacing(GTK_GRID(grid), 4);
        gtk_grid_set_column_spacing(GTK_GRID(grid), 8);
        d->offset = option_entry(GTK_GRID(grid), 0, "Offset", "0 (e.g. 1G)");
        d->length = option_entry(GTK_GRID(grid), 1, "Length", "empty or 0: the whole disk, or to its end");
        d->bandwidth = option_entry(GTK_GRID(grid), 2, "Bandwidth", "e.g. 100M/s; empty: the disk's; 0: unlimited");
        d->latency = option_entry(GTK_GRID(grid), 4, "Latency target", "the guest's read p99, e.g. 20ms; 0: off");
        base_label = gtk_label_new("Base");
        gtk_label_set_xalign(GTK_LABEL(base_label), 0);
        d->base_model = gtk_string_list_new(NULL);
        d->base = GTK_DROP_DOWN(gtk_drop_down_new(G_LIST_MODEL(g_object_ref(d->base_model)), NULL));
        gtk_accessible_update_property(GTK_ACCESSIBLE(d->base), GTK_ACCESSIBLE_PROPERTY_LABEL, "Base", -1);
        gtk_grid_attach(GTK_GRID(grid), base_label, 0, 3, 1, 1);
        gtk_grid_attach(GTK_GRID(grid), GTK_WIDGET(d->base), 1, 3, 1, 1);
        gtk_expander_set_child(GTK_EXPANDER(expander), grid);
        gtk_box_append(GTK_BOX(d->root), expander);

        export_box = gtk_box_new(GTK_ORIENTATION_HORIZONTAL, 6);
        d->export_btn = button(export_box, "Export", "Serve this disk read-only over NBD", G_CALLBACK(on_export), d);
        d->stop_export = button(export_box, "Stop export", "Stop serving this disk", G_CALLBACK(on_stop_export), d);
        d->uri = GTK_ENTRY(gtk_entry_new());
        gtk_editable_set_editable(GTK_EDITABLE(d->uri), FALSE);
        gtk_entry_set_placeholder_text(d->uri, "not exported");
        gtk_accessible_update_property(GTK_ACCESSIBLE(d->uri), GTK_ACCESSIBLE_PROPERTY_LABEL, "Export URI", -1);
        gtk_widget_set_hexpand(GTK_WIDGET(d->uri), TRUE);
        gtk_box_append(GTK_BOX(export_box), GTK_WIDGET(d->uri));
        d->copy = button(export_box, "Copy URI", "Copy the export's URI to the clipboard", G_CALLBACK(on_copy), d);
        gtk_widget_set_sensitive(d->stop_export, FALSE);
        gtk_widget_set_sensitive(d->copy, FALSE);
        gtk_box_append(GTK_BOX(d->root), export_box);

        d->message = row_label(d->root);
        gtk_label_set_selectable(d->message, TRUE);
        gtk_box_append(GTK_BOX(d->root), gtk_separator_new(GTK_ORIENTATION_HORIZONTAL));

        disk_view_set_guest_name(d, guest_name);
        d->props_handler = g_signal_connect(proxy, "g-properties-changed", G_CALLBACK(on_props_changed), d);
        d->signal_handler = g_signal_connect(proxy, "g-signal", G_CALLBACK(on_signal), d);
        disk_view_update(d);
        map_legend_update(d);
        map_load(d, FALSE);
        return d;
}

void disk_view_set_guest_name(DiskView *d, const char *guest_name) {
        g_autofree char *device = bs_path_name(d->path), *label = NULL;

        g_free(d->guest_name);
        d->guest_name = g_strdup(guest_name);
        /* "guest/disk": how a screen reader, and the GUI test, find this row */
        label = g_strdup_printf("%s/%s", guest_name, device);
        gtk_accessible_update_property(GTK_ACCESSIBLE(d->root), GTK_ACCESSIBLE_PROPERTY_LABEL, label, -1);
}

GtkWidget *disk_view_widget(DiskView *d) {
        return d->root;
}

void disk_view_free(DiskView *d) {
        GtkWidget *parent;

        if (!d)
                return;
        /* Calls in flight end with G_IO_ERROR_CANCELLED and do not touch d. */
        g_cancellable_cancel(d->cancellable);
        g_signal_handler_disconnect(d->proxy, d->props_handler);
        g_signal_handler_disconnect(d->proxy, d->signal_handler);
        parent = gtk_widget_get_parent(d->root);
        if (parent)
                gtk_box_remove(GTK_BOX(parent), d->root);
        g_object_unref(d->root);
        g_object_unref(d->base_model);
        g_strfreev(d->base_chain);
        g_array_unref(d->extents);
        g_array_unref(d->pending);
        g_object_unref(d->cancellable);
        g_object_unref(d->proxy);
        g_free(d->export_path);
        g_free(d->guest_name);
        g_free(d->path);
        g_free(d);
}
