/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <dirent.h>
#include <limits.h>
#include <systemd/sd-id128.h>

#include "qemu.h"
#include "state.h"
#include "util.h"

#define STATE_FORMAT_VERSION 1

static void closedirp_(DIR **d) {
        if (*d)
                closedir(*d);
}

static char *state_path(const char *dir, const char *name) {
        return strdup_printf("%s/%s.json", dir, name);
}

/* Saving */

static int add(json_object *o, const char *key, json_object *v) {
        if (!v)
                return -ENOMEM;
        if (json_object_object_add(o, key, v) < 0) {
                json_object_put(v);
                return -ENOMEM;
        }
        return 0;
}

static json_object *strv_to_json(char **l) {
        json_object *a = json_object_new_array();

        if (!a)
                return NULL;
        for (char **i = l; i && *i; i++)
                if (json_object_array_add(a, json_object_new_string(*i)) < 0) {
                        json_object_put(a);
                        return NULL;
                }
        return a;
}

/* alias, name, … as {"alias": "name", …} */
static json_object *pairs_to_json(char **l) {
        json_object *o = json_object_new_object();

        if (!o)
                return NULL;
        for (char **p = l; p && p[0] && p[1]; p += 2)
                if (add(o, p[0], json_object_new_string(p[1])) < 0) {
                        json_object_put(o);
                        return NULL;
                }
        return o;
}

static json_object *job_to_json(const Job *j) {
        json_object *o = json_object_new_object();

        if (!o)
                return NULL;
        if ((j->id && add(o, "id", json_object_new_string(j->id)) < 0) ||
                add(o, "state", json_object_new_string(stream_state_to_string(j->state))) < 0 ||
                add(o, "mode", json_object_new_string(stream_mode_to_string(j->mode))) < 0 ||
                add(o, "engine", json_object_new_string(stream_engine_to_string(j->engine))) < 0 ||
                add(o, "phase", json_object_new_uint64(j->phase)) < 0 ||
                (j->overlay && add(o, "overlay", json_object_new_string(j->overlay)) < 0) ||
                (j->engine == STREAM_ENGINE_MIRROR &&
                        (add(o, "overlay_dev", json_object_new_uint64(j->overlay_dev)) < 0 ||
                                add(o, "overlay_ino", json_object_new_uint64(j->overlay_ino)) < 0)) ||
                add(o, "offset", json_object_new_uint64(j->offset)) < 0 ||
                add(o, "length", json_object_new_uint64(j->length)) < 0 ||
                add(o, "done", json_object_new_uint64(j->done)) < 0 ||
                add(o, "total", json_object_new_uint64(j->total)) < 0 ||
                add(o, "bandwidth", json_object_new_uint64(j->bandwidth)) < 0 ||
                add(o, "start_time", json_object_new_uint64(j->start_time)) < 0 ||
                (j->caller != UID_INVALID && add(o, "caller", json_object_new_uint64(j->caller)) < 0) ||
                (j->error && add(o, "error", json_object_new_string(j->error)) < 0) ||
                add(o, "concluded", json_object_new_boolean(j->concluded)) < 0 ||
                add(o, "outcome",
                        json_object_new_string(stream_state_to_string(j->concluded ? j->outcome : STREAM_IDLE))) < 0 ||
                add(o, "finished", json_object_new_boolean(j->finished)) < 0 ||
                add(o, "cancel_requested", json_object_new_boolean(j->cancel_requested)) < 0) {
                json_object_put(o);
                return NULL;
        }
        return o;
}

static json_object *pivot_to_json(const StateDisk *d) {
        json_object *o = json_object_new_object();

        if (!o)
                return NULL;
        if (add(o, "qemu_name", json_object_new_string(d->pivot_qemu_name)) < 0 ||
                add(o, "path", json_object_new_string(d->pivot_path)) < 0 ||
                add(o, "dev", json_object_new_uint64(d->pivot_dev)) < 0 ||
                add(o, "ino", json_object_new_uint64(d->pivot_ino)) < 0) {
                json_object_put(o);
                return NULL;
        }
        return o;
}

static json_object *disk_to_json(const StateDisk *d) {
        json_object *o = json_object_new_object();

        if (!o)
                return NULL;
        if (add(o, "alias", json_object_new_string(d->alias)) < 0 ||
                add(o, "node_name", json_object_new_string(d->node_name)) < 0 ||
                add(o, "path", json_object_new_string(d->path)) < 0 ||
                add(o, "format", json_object_new_string(d->format)) < 0 || add(o, "chain", strv_to_json(d->chain)) < 0 ||
                add(o, "chain_nodes", strv_to_json(d->chain_nodes)) < 0 ||
                add(o, "size", json_object_new_uint64(d->size)) < 0 ||
                add(o, "cluster_size", json_object_new_uint64(d->cluster_size)) < 0 ||
                add(o, "bandwidth", json_object_new_uint64(d->bandwidth)) < 0 || add(o, "job", job_to_json(&d->job)) < 0 ||
                (d->range_node && add(o, "range_node", json_object_new_string(d->range_node)) < 0) ||
                (d->range_export && add(o, "range_export", json_object_new_string(d->range_export)) < 0) ||
                (d->range_bottom && add(o, "range_bottom", json_object_new_string(d->range_bottom)) < 0) ||
                (d->job_base && add(o, "job_base", json_object_new_string(d->job_base)) < 0) ||
                (d->max_guest_latency > 0 &&
                        add(o, "max_guest_latency", json_object_new_uint64(d->max_guest_latency)) < 0) ||
                (d->job_latency_mode >= 0 &&
                        add(o, "job_latency_mode", json_object_new_boolean(d->job_latency_mode > 0)) < 0) ||
                (d->pivot_qemu_name && d->pivot_path && add(o, "pivot", pivot_to_json(d)) < 0)) {
                json_object_put(o);
                return NULL;
        }
        return o;
}

/* g as the text of its file, and that file's path. */
static int format(const char *dir, const StateGuest *g, char **ret_text, char **ret_path) {
        _cleanup_(json_object_putp) json_object *o = NULL;
        _cleanup_free_ char *path = NULL;
        char *copy;
        json_object *disks;
        const char *text;

        o = json_object_new_object();
        disks = json_object_new_array();
        if (!o || add(o, "disks", disks) < 0)
                return -ENOMEM;
        if (add(o, "version", json_object_new_int(STATE_FORMAT_VERSION)) < 0 ||
                add(o, "name", json_object_new_string(g->name)) < 0 || add(o, "uuid", json_object_new_string(g->uuid)) < 0 ||
                add(o, "owner", json_object_new_uint64(g->owner)) < 0 ||
                add(o, "qmp_socket", json_object_new_string(g->qmp_socket)) < 0 ||
                add(o, "job_seq", json_object_new_uint64(g->job_seq)) < 0 ||
                add(o, "offline", json_object_new_boolean(g->offline)) < 0 ||
                add(o, "nbd_server_started", json_object_new_boolean(g->nbd_server_started)) < 0 ||
                add(o, "nbd_server_qemu_pid", json_object_new_uint64(g->nbd_server_qemu_pid)) < 0 ||
                add(o, "nbd_server_qemu_start", json_object_new_uint64(g->nbd_server_qemu_start)) < 0 ||
                add(o, "helper_uid", json_object_new_uint64(g->helper_uid)) < 0 ||
                add(o, "mcs_c1", json_object_new_uint64(g->mcs_c1)) < 0 ||
                add(o, "mcs_c2", json_object_new_uint64(g->mcs_c2)) < 0)
                return -ENOMEM;
        if (g->storage_uid != 0 && (add(o, "storage_uid", json_object_new_uint64(g->storage_uid)) < 0 ||
                                           add(o, "storage_mcs_c1", json_object_new_uint64(g->storage_mcs_c1)) < 0 ||
                                           add(o, "storage_mcs_c2", json_object_new_uint64(g->storage_mcs_c2)) < 0))
                return -ENOMEM;
        /* Who may answer on the QMP socket (qmp-socket.h): its directory and a pinned uid. */
        if (g->qmp_pin.set) {
                char boot[SD_ID128_STRING_MAX];
                if (add(o, "qmp_dir_dev", json_object_new_uint64(g->qmp_pin.dir_dev)) < 0 ||
                        add(o, "qmp_dir_ino", json_object_new_uint64(g->qmp_pin.dir_ino)) < 0 ||
                        add(o, "qmp_boot_id", json_object_new_string(sd_id128_to_string(g->qmp_pin.boot_id, boot))) < 0)
                        return -ENOMEM;
        }
        if (g->qmp_uid != UID_INVALID && add(o, "qmp_uid", json_object_new_uint64(g->qmp_uid)) < 0)
                return -ENOMEM;
        if (g->qmp_as_owner && add(o, "qmp_as_owner", json_object_new_boolean(true)) < 0)
                return -ENOMEM;
        if (!strv_isempty(g->disk_names) && add(o, "disk_names", pairs_to_json(g->disk_names)) < 0)
                return -ENOMEM;
        for (size_t i = 0; i < g->n_disks; i++) {
                json_object *d = disk_to_json(&g->disks[i]);
                if (!d || json_object_array_add(disks, d) < 0) {
                        json_object_put(d);
                        return -ENOMEM;
                }
        }
        text = json_object_to_json_string_ext(o, JSON_C_TO_STRING_PRETTY | JSON_C_TO_STRING_NOSLASHESCAPE);
        path = state_path(dir, g->name);
        if (!text || !path)
                return -ENOMEM;
        copy = strdup(text);
        if (!copy)
                return -ENOMEM;
        *ret_text = copy;
        *ret_path = TAKE_PTR(path);
        return 0;
}

int state_save(StateWriter *w, const char *dir, const StateGuest *g, bool wait) {
        _cleanup_free_ char *path = NULL;
        char *text;
        int r;

        r = format(dir, g, &text, &path);
        if (r < 0)
                return r;
        return state_writer_put(w, path, text, strlen(text), 0600, wait);
}

int state_save_then(StateWriter *w, const char *dir, const StateGuest *g, void *owner, state_writer_then_t fn,
        void *userdata, void (*destroy)(void *userdata)) {
        _cleanup_free_ char *path = NULL;
        char *text;
        int r;

        r = format(dir, g, &text, &path);
        if (r < 0)
                return r;
        return state_writer_put_then(w, path, text, strlen(text), 0600, owner, fn, userdata, destroy);
}

int state_remove(StateWriter *w, const char *dir, const char *name) {
        _cleanup_free_ char *path = state_path(dir, name);

        if (!path)
                return -ENOMEM;
        return state_writer_put(w, path, NULL, 0, 0, true);
}

/* Loading: every field checked as if a stranger wrote the file. */

static int get_strv(json_object *o, const char *key, size_t max, char ***ret) {
        _cleanup_strv_free_ char **l = NULL;
        json_object *a;
        size_t n;

        if (!json_object_object_get_ex(o, key, &a) || !json_object_is_type(a, json_type_array))
                return -EBADMSG;
        n = json_object_array_length(a);
        if (n > max)
                return -EBADMSG;
        l = calloc(n + 1, sizeof(char *));
        if (!l)
                return -ENOMEM;
        for (size_t i = 0; i < n; i++) {
                json_object *s = json_object_array_get_idx(a, i);
                if (!json_object_is_type(s, json_type_string) ||
                        (size_t) json_object_get_string_len(s) != strlen(json_object_get_string(s)) ||
                        strlen(json_object_get_string(s)) > QEMU_STRING_MAX ||
                        !utf8_is_valid(json_object_get_string(s)))
                        return -EBADMSG;
                l[i] = strdup(json_object_get_string(s));
                if (!l[i])
                        return -ENOMEM;
        }
        *ret = TAKE_PTR(l);
        return 0;
}

static int dup_field(json_object *o, const char *key, bool required, char **ret) {
        const char *s = NULL;
        int r;

        r = json_get_string(o, key, required, &s);
        if (r < 0)
                return -EBADMSG;
        if (!s)
                return 0;
        free(*ret);
        *ret = strdup(s);
        return *ret ? 0 : -ENOMEM;
}

/* A text that is only shown (a job's Error, first said by a helper or QEMU): a bad byte in it,
 * which an older daemon may have written, costs the byte, not the guest. */
static int text_field(json_object *o, const char *key, char **ret) {
        json_object *v;
        char *t;

        if (!json_object_object_get_ex(o, key, &v))
                return 0;
        if (!json_object_is_type(v, json_type_string))
                return -EBADMSG;
        t = text_sanitize(json_object_get_string(v), (size_t) json_object_get_string_len(v), TEXT_SANITIZE_MAX);
        if (!t)
                return -ENOMEM;
        free(*ret);
        *ret = t;
        return 0;
}

/* "disk_names" (optional: older files have none), checked as RegisterGuest checks it. */
static int disk_names_from_json(json_object *o, char ***ret) {
        _cleanup_strv_free_ char **l = NULL;
        json_object *names;
        size_t n = 0, bad;

        if (!json_object_object_get_ex(o, "disk_names", &names))
                return 0;
        if (!json_object_is_type(names, json_type_object) || json_object_object_length(names) > DISK_NAMES_MAX)
                return -EBADMSG;
        l = calloc(2 * (size_t) json_object_object_length(names) + 1, sizeof(char *));
        if (!l)
                return -ENOMEM;
        json_object_object_foreach(names, k, v) {
                if (!json_object_is_type(v, json_type_string) ||
                        (size_t) json_object_get_string_len(v) != strlen(json_object_get_string(v)))
                        return -EBADMSG;
                l[n] = strdup(k);
                if (!l[n++])
                        return -ENOMEM;
                l[n] = strdup(json_object_get_string(v));
                if (!l[n++])
                        return -ENOMEM;
        }
        if (disk_names_check(l, &bad) != DISK_NAMES_OK)
                return -EBADMSG;
        *ret = TAKE_PTR(l);
        return 0;
}

static int job_from_json(json_object *o, Job *j) {
        const char *state = NULL, *mode = NULL, *outcome = NULL, *engine = NULL;
        uint64_t phase = 0, caller = UINT32_MAX;
        bool concluded = false, finished = false, cancel = false;

        if (!json_object_is_type(o, json_type_object))
                return -EBADMSG;
        if (json_get_string(o, "state", true, &state) < 0 || json_get_string(o, "mode", true, &mode) < 0 ||
                json_get_string(o, "outcome", false, &outcome) < 0 || json_get_u64(o, "offset", true, &j->offset) < 0 ||
                json_get_u64(o, "length", true, &j->length) < 0 || json_get_u64(o, "done", true, &j->done) < 0 ||
                json_get_u64(o, "total", true, &j->total) < 0 ||
                json_get_u64(o, "bandwidth", true, &j->bandwidth) < 0 ||
                json_get_u64(o, "start_time", true, &j->start_time) < 0 ||
                json_get_bool(o, "concluded", false, &concluded) < 0 ||
                json_get_bool(o, "finished", false, &finished) < 0 ||
                json_get_bool(o, "cancel_requested", false, &cancel) < 0 ||
                json_get_string(o, "engine", false, &engine) < 0 || json_get_u64(o, "phase", false, &phase) < 0 ||
                json_get_uint64(o, "overlay_dev", false, &j->overlay_dev) < 0 ||
                json_get_uint64(o, "overlay_ino", false, &j->overlay_ino) < 0 ||
                json_get_u64(o, "caller", false, &caller) < 0 || caller > UINT32_MAX)
                return -EBADMSG;
        j->caller = (uid_t) caller; /* absent: not known */
        j->state = stream_state_from_string(state);
        j->mode = stream_mode_from_string(mode);
        /* Files from before engines were recorded: the mode says which ran. */
        j->engine = engine                         ? stream_engine_from_string(engine)
                    : j->mode == STREAM_MODE_RANGE ? STREAM_ENGINE_RANGE
                    : j->mode == STREAM_MODE_FULL  ? STREAM_ENGINE_STREAM
                                                   : STREAM_ENGINE_NONE;
        if (j->engine < 0 || phase > (j->engine == STREAM_ENGINE_MIRROR ? 6 : 2) ||
                (phase > 0 && j->engine != STREAM_ENGINE_PREFETCH && j->engine != STREAM_ENGINE_MIRROR))
                return -EBADMSG;
        j->phase = (unsigned) phase;
        j->outcome = outcome ? stream_state_from_string(outcome) : STREAM_IDLE;
        if (j->state < 0 || j->mode < 0 || j->outcome < 0 || j->done > j->total)
                return -EBADMSG;
        j->concluded = concluded;
        j->finished = finished;
        j->cancel_requested = cancel;
        if (concluded && (j->outcome != STREAM_COMPLETED && j->outcome != STREAM_FAILED && j->outcome != STREAM_CANCELLED))
                return -EBADMSG;
        if (dup_field(o, "id", false, &j->id) < 0 || text_field(o, "error", &j->error) < 0)
                return -EBADMSG;
        if (j->id && !qemu_id_is_valid(j->id))
                return -EBADMSG;
        /* A mirror's overlay: an absolute path, checked again where it is used (mirror.c). */
        if (dup_field(o, "overlay", false, &j->overlay) < 0 || (j->overlay && !path_is_safe_absolute(j->overlay, 4096)))
                return -EBADMSG;
        return 0;
}

/* A mirror's pivot record (optional): "/dev/fdset/<digits>" and an absolute path, both checked
 * again against the file where they are used (disk.c). */
static int pivot_from_json(json_object *o, StateDisk *d) {
        const char *name = NULL, *path = NULL, *p;
        json_object *v;

        if (!json_object_object_get_ex(o, "pivot", &v))
                return 0;
        if (!json_object_is_type(v, json_type_object) || json_get_string(v, "qemu_name", true, &name) < 0 ||
                json_get_string(v, "path", true, &path) < 0 || json_get_uint64(v, "dev", true, &d->pivot_dev) < 0 ||
                json_get_uint64(v, "ino", true, &d->pivot_ino) < 0 || !path_is_safe_absolute(path, 4096) ||
                strlen(name) > 32 || strncmp(name, "/dev/fdset/", strlen("/dev/fdset/")) != 0)
                return -EBADMSG;
        p = name + strlen("/dev/fdset/");
        if (!*p || strspn(p, "0123456789") != strlen(p))
                return -EBADMSG;
        d->pivot_qemu_name = strdup(name);
        d->pivot_path = strdup(path);
        return d->pivot_qemu_name && d->pivot_path ? 0 : -ENOMEM;
}

/* An optional boolean as 1 or 0, -1 if absent. */
static int get_tristate(json_object *o, const char *key, int *ret) {
        bool b = false;
        int r;

        *ret = -1;
        if (!json_object_object_get_ex(o, key, NULL))
                return 0;
        r = json_get_bool(o, key, true, &b);
        if (r < 0)
                return r;
        *ret = b;
        return 0;
}

static int disk_from_json(json_object *o, StateDisk *d) {
        const char *alias = NULL;
        json_object *job;

        /* The alias names socket files and nodes: checked as where it came from (QEMU, or
         * RegisterGuest's disks), as is a node name. */
        if (!json_object_is_type(o, json_type_object) || json_get_string(o, "alias", true, &alias) < 0 ||
                !qemu_id_is_valid(alias))
                return -EBADMSG;
        d->alias = strdup(alias);
        if (!d->alias)
                return -ENOMEM;
        if (dup_field(o, "node_name", true, &d->node_name) < 0 || dup_field(o, "path", true, &d->path) < 0 ||
                dup_field(o, "format", true, &d->format) < 0 || get_strv(o, "chain", QEMU_CHAIN_MAX, &d->chain) < 0 ||
                get_strv(o, "chain_nodes", QEMU_CHAIN_MAX, &d->chain_nodes) < 0 ||
                strv_length(d->chain) != strv_length(d->chain_nodes) || json_get_u64(o, "size", true, &d->size) < 0 ||
                json_get_u64(o, "cluster_size", true, &d->cluster_size) < 0 ||
                json_get_u64(o, "bandwidth", true, &d->bandwidth) < 0 || d->bandwidth > INT64_MAX ||
                json_get_u64(o, "max_guest_latency", false, &d->max_guest_latency) < 0 ||
                get_tristate(o, "job_latency_mode", &d->job_latency_mode) < 0 ||
                !json_object_object_get_ex(o, "job", &job) || job_from_json(job, &d->job) < 0 ||
                dup_field(o, "range_node", false, &d->range_node) < 0 ||
                dup_field(o, "range_export", false, &d->range_export) < 0 ||
                dup_field(o, "range_bottom", false, &d->range_bottom) < 0 ||
                dup_field(o, "job_base", false, &d->job_base) < 0 ||
                /* node names of the chain: QEMU's own ("#block123") or ones given to it */
                (d->job_base && !qemu_node_name_is_valid(d->job_base)) ||
                (d->range_bottom && !qemu_node_name_is_valid(d->range_bottom)) ||
                (d->range_node && !qemu_id_is_valid(d->range_node)) || (d->range_export && !qemu_id_is_valid(d->range_export)) ||
                pivot_from_json(o, d) < 0 || (!isempty(d->node_name) && !qemu_node_name_is_valid(d->node_name)))
                return -EBADMSG;
        return 0;
}

static void state_disk_done(StateDisk *d) {
        free(d->alias);
        free(d->node_name);
        free(d->path);
        free(d->format);
        strv_free(d->chain);
        strv_free(d->chain_nodes);
        job_done(&d->job);
        free(d->range_node);
        free(d->range_export);
        free(d->range_bottom);
        free(d->job_base);
        free(d->pivot_qemu_name);
        free(d->pivot_path);
        *d = (StateDisk) {};
}

void state_guest_done(StateGuest *g) {
        free(g->name);
        free(g->uuid);
        free(g->qmp_socket);
        strv_free(g->disk_names);
        for (size_t i = 0; i < g->n_disks; i++)
                state_disk_done(&g->disks[i]);
        free(g->disks);
        *g = (StateGuest) {};
}

int state_guest_from_json(json_object *o, const char *file_name, StateGuest *ret) {
        _cleanup_(state_guest_done) StateGuest g = {};
        const char *name = NULL, *uuid = NULL, *sock = NULL, *boot = NULL;
        uint64_t owner = 0, version = 0, seq = 0, helper_uid = 0, c1 = 0, c2 = 0, suid = 0, sc1 = 0, sc2 = 0;
        uint64_t nbd_pid = 0, nbd_start = 0;
        uint64_t dir_dev = 0, dir_ino = 0, qmp_uid = UID_INVALID;
        sd_id128_t boot_id = {};
        bool offline = false, nbd_started = false;
        json_object *disks;
        size_t n;
        int r;

        if (!json_object_is_type(o, json_type_object) || json_get_u64(o, "version", true, &version) < 0 ||
                version != STATE_FORMAT_VERSION || json_get_string(o, "name", true, &name) < 0 ||
                json_get_string(o, "uuid", true, &uuid) < 0 || json_get_string(o, "qmp_socket", true, &sock) < 0 ||
                json_get_u64(o, "owner", true, &owner) < 0 || json_get_u64(o, "job_seq", true, &seq) < 0 ||
                !json_object_object_get_ex(o, "disks", &disks) || !json_object_is_type(disks, json_type_array) ||
                json_object_array_length(disks) > QEMU_DISKS_MAX || json_get_bool(o, "offline", false, &offline) < 0 ||
                json_get_u64(o, "helper_uid", false, &helper_uid) < 0 || json_get_u64(o, "mcs_c1", false, &c1) < 0 ||
                json_get_u64(o, "mcs_c2", false, &c2) < 0 || helper_uid >= UINT32_MAX || c1 > 4096 || c2 > 4096 ||
                json_get_bool(o, "nbd_server_started", false, &nbd_started) < 0 ||
                json_get_u64(o, "nbd_server_qemu_pid", false, &nbd_pid) < 0 || nbd_pid > INT32_MAX ||
                json_get_u64(o, "nbd_server_qemu_start", false, &nbd_start) < 0)
                return -EBADMSG;
        if (offline != isempty(sock))
                return -EBADMSG;
        if (json_get_string(o, "qmp_boot_id", false, &boot) < 0 ||
                json_get_uint64(o, "qmp_dir_dev", !!boot, &dir_dev) < 0 ||
                json_get_uint64(o, "qmp_dir_ino", !!boot, &dir_ino) < 0 ||
                (boot && sd_id128_from_string(boot, &boot_id) < 0) ||
                json_get_u64(o, "qmp_uid", false, &qmp_uid) < 0 || qmp_uid > UINT32_MAX)
                return -EBADMSG;
        /* The file name must match the guest inside it. */
        if (!guest_name_is_valid(name) || strncmp(file_name, name, strlen(name)) != 0 ||
                !streq(file_name + strlen(name), ".json") || owner >= UINT32_MAX)
                return -EBADMSG;
        if (!isempty(sock) && !path_is_safe_absolute(sock, 107))
                return -EBADMSG;

        g.name = strdup(name);
        g.uuid = strdup(uuid);
        g.qmp_socket = strdup(sock);
        if (!g.name || !g.uuid || !g.qmp_socket)
                return -ENOMEM;
        g.owner = (uid_t) owner;
        g.job_seq = seq;
        g.offline = offline;
        g.nbd_server_started = nbd_started;
        g.nbd_server_qemu_pid = nbd_pid;
        g.nbd_server_qemu_start = nbd_start;
        g.helper_uid = (uid_t) helper_uid;
        g.mcs_c1 = (unsigned) c1;
        g.mcs_c2 = (unsigned) c2;
        /* The storage helper's identity: a record from before it had one, or a malformed one,
         * is no reason to refuse the guest: none (a fresh one is allocated when needed); the
         * manager checks a well-formed one against the range and the other identities. */
        if (json_get_u64(o, "storage_uid", false, &suid) < 0 || json_get_u64(o, "storage_mcs_c1", false, &sc1) < 0 ||
                json_get_u64(o, "storage_mcs_c2", false, &sc2) < 0 || suid >= UINT32_MAX || sc1 > 4096 || sc2 > 4096)
                suid = sc1 = sc2 = 0;
        g.storage_uid = (uid_t) suid;
        g.storage_mcs_c1 = (unsigned) sc1;
        g.storage_mcs_c2 = (unsigned) sc2;
        if (boot)
                g.qmp_pin = (QmpSocketPin) { .set = true, .dir_dev = dir_dev, .dir_ino = dir_ino, .boot_id = boot_id };
        g.qmp_uid = (uid_t) qmp_uid;
        /* A state file from before peers were checked: a root-owned guest's QEMU is pinned at the
         * first connect; any other owner's must be the owner's own or allowed by QEMUUsers=. */
        g.qmp_uid_pin_next = !offline && !json_object_object_get_ex(o, "qmp_uid", NULL) && owner == 0;
        /* Absent (a file from before it was written): opened as root, as then. */
        if (json_get_bool(o, "qmp_as_owner", false, &g.qmp_as_owner) < 0)
                return -EBADMSG;
        r = disk_names_from_json(o, &g.disk_names);
        if (r < 0)
                return r;

        n = json_object_array_length(disks);
        g.disks = calloc(n, sizeof(StateDisk));
        if (n > 0 && !g.disks)
                return -ENOMEM;
        for (size_t i = 0; i < n; i++) {
                r = disk_from_json(json_object_array_get_idx(disks, i), &g.disks[g.n_disks++]);
                if (r < 0)
                        return r;
                /* One disk per alias (at most QEMU_DISKS_MAX of them). */
                for (size_t j = 0; j + 1 < g.n_disks; j++)
                        if (streq(g.disks[j].alias, g.disks[g.n_disks - 1].alias))
                                return -EBADMSG;
        }
        *ret = g;
        g = (StateGuest) {};
        return 0;
}

/* Calls fn for each NAME.json of dir_path, in directory order, with its path and its JSON; the JSON
 * is NULL and error < 0 when the file cannot be read (-errno) or is not JSON (-EBADMSG). Temp files
 * of write_file_atomic() end in .tmpXXXXXX and are passed over. fn returns < 0 to stop the walk
 * with that error. A missing directory is an error unless missing_ok. */
typedef int (*state_file_handler_t)(const char *path, const char *file_name, json_object *o, int error,
        void *userdata);

static int state_dir_foreach(const char *dir_path, bool missing_ok, state_file_handler_t fn, void *userdata) {
        _cleanup_(closedirp_) DIR *dir = NULL;
        struct dirent *de;

        dir = opendir(dir_path);
        if (!dir) {
                if (errno == ENOENT && missing_ok)
                        return 0;
                return log_error_errno(errno, "Failed to open state directory %s: %m", dir_path);
        }
        while ((de = readdir(dir))) {
                _cleanup_(json_object_putp) json_object *o = NULL;
                _cleanup_free_ char *path = NULL, *text = NULL;
                size_t len = strlen(de->d_name);
                int r;

                /* Guest names may start with a dot: only the ending tells. */
                if (len < 6 || !streq(de->d_name + len - 5, ".json"))
                        continue;
                path = strdup_printf("%s/%s", dir_path, de->d_name);
                if (!path)
                        return log_oom();
                r = read_file_bounded(path, STATE_FILE_MAX, &text, NULL);
                if (r >= 0) {
                        o = json_tokener_parse(text);
                        if (!o)
                                r = -EBADMSG;
                }
                r = fn(path, de->d_name, o, r < 0 ? r : 0, userdata);
                if (r < 0)
                        return r;
        }
        return 0;
}

typedef struct GuestLoad {
        state_load_handler_t handler;
        void *userdata;
} GuestLoad;

static int guest_file(const char *path, const char *file_name, json_object *o, int error, void *userdata) {
        _cleanup_(state_guest_done) StateGuest g = {};
        GuestLoad *l = userdata;
        int r;

        if (error == -EBADMSG) {
                log_error("State file %s is not valid JSON, skipping this guest.", path);
                return 0;
        }
        if (error < 0) {
                log_error_errno(error, "Failed to read %s, skipping this guest: %m", path);
                return 0;
        }
        r = state_guest_from_json(o, file_name, &g);
        if (r == -ENOMEM)
                return log_oom();
        if (r < 0) {
                log_error_errno(r, "State file %s is invalid, skipping this guest: %m", path);
                return 0;
        }
        return l->handler(&g, path, l->userdata);
}

int state_load(const char *dir_path, state_load_handler_t handler, void *userdata) {
        return state_dir_foreach(dir_path, false, guest_file, &(GuestLoad) { handler, userdata });
}

/* Exports */

#define EXPORT_LISTEN_MAX 64

static char *state_export_path(const char *dir, unsigned id) {
        return strdup_printf("%s/%u.json", dir, id);
}

void state_export_done(StateExport *e) {
        free(e->guest);
        free(e->guest_uuid);
        free(e->alias);
        free(e->name);
        free(e->listen);
        for (size_t i = 0; i < e->n_pins; i++)
                free(e->pins[i].alias);
        free(e->pins);
        *e = (StateExport) {};
}

int state_export_save(const char *dir, const StateExport *e) {
        _cleanup_(json_object_putp) json_object *o = NULL;
        _cleanup_free_ char *path = NULL;
        const char *text;
        int r;

        o = json_object_new_object();
        if (!o)
                return -ENOMEM;
        if (add(o, "version", json_object_new_int(STATE_FORMAT_VERSION)) < 0 ||
                add(o, "id", json_object_new_uint64(e->id)) < 0 || add(o, "guest", json_object_new_string(e->guest)) < 0 ||
                add(o, "disk", json_object_new_string(e->alias)) < 0 || add(o, "name", json_object_new_string(e->name)) < 0 ||
                add(o, "listen", json_object_new_string(e->listen)) < 0 ||
                (e->guest_uuid && add(o, "guest_uuid", json_object_new_string(e->guest_uuid)) < 0) ||
                (e->guest_owner != UID_INVALID && add(o, "guest_owner", json_object_new_uint64(e->guest_owner)) < 0))
                return -ENOMEM;
        if (e->n_pins > 0) {
                json_object *pins = json_object_new_array();

                if (add(o, "handoff_pins", pins) < 0)
                        return -ENOMEM;
                for (size_t i = 0; i < e->n_pins; i++) {
                        json_object *p = json_object_new_object();

                        if (!p || json_object_array_add(pins, p) < 0) {
                                json_object_put(p);
                                return -ENOMEM;
                        }
                        if (add(p, "disk", json_object_new_string(e->pins[i].alias)) < 0 ||
                                add(p, "dev", json_object_new_uint64(e->pins[i].dev)) < 0 ||
                                add(p, "ino", json_object_new_uint64(e->pins[i].ino)) < 0 ||
                                add(p, "uid", json_object_new_uint64(e->pins[i].uid)) < 0 ||
                                (e->pins[i].writable && add(p, "writable", json_object_new_boolean(true)) < 0))
                                return -ENOMEM;
                }
        }
        text = json_object_to_json_string_ext(o, JSON_C_TO_STRING_PRETTY | JSON_C_TO_STRING_NOSLASHESCAPE);
        path = state_export_path(dir, e->id);
        if (!text || !path)
                return -ENOMEM;
        r = mkdir_p(dir, 0700);
        if (r < 0)
                return r;
        return write_file_atomic(path, text, strlen(text), 0600);
}

int state_export_remove(const char *dir, unsigned id) {
        _cleanup_free_ char *path = state_export_path(dir, id);

        if (!path)
                return -ENOMEM;
        return unlink_durable(path);
}

static int printable_field(json_object *o, const char *key, size_t max, char **ret) {
        const char *s = NULL;

        if (json_get_string(o, key, true, &s) < 0 || !s || isempty(s) || strlen(s) > max)
                return -EBADMSG;
        for (const char *p = s; *p; p++)
                if (*p <= ' ' || *p >= 127)
                        return -EBADMSG;
        *ret = strdup(s);
        return *ret ? 0 : -ENOMEM;
}

/* "handoff_pins": [{"disk": ALIAS, "dev": N, "ino": N, "writable": true, "uid": N}, …], optional, bounded,
 * each alias once; "writable" and "uid" optional. */
static int export_pins_from_json(json_object *o, StateExport *e) {
        json_object *pins;
        uint64_t uid;
        size_t n;
        int r;

        if (!json_object_object_get_ex(o, "handoff_pins", &pins))
                return 0;
        if (!json_object_is_type(pins, json_type_array))
                return -EBADMSG;
        n = json_object_array_length(pins);
        if (n == 0 || n > STATE_EXPORT_PINS_MAX)
                return -EBADMSG;
        e->pins = calloc(n, sizeof(StateExportPin));
        if (!e->pins)
                return -ENOMEM;
        for (size_t i = 0; i < n; i++) {
                json_object *p = json_object_array_get_idx(pins, i);
                StateExportPin *pin = &e->pins[i];

                if (!json_object_is_type(p, json_type_object))
                        return -EBADMSG;
                r = printable_field(p, "disk", QEMU_STRING_MAX, &pin->alias);
                e->n_pins = i + 1; /* freed with e from here on */
                if (r < 0)
                        return r;
                /* "writable" and "uid" absent (a record from before they were kept): read-only, and
                 * nobody's rights, the safe side. */
                uid = STATE_PIN_UID_UNKNOWN;
                if (!qemu_id_is_valid(pin->alias) || json_get_uint64(p, "dev", true, &pin->dev) < 0 ||
                        json_get_uint64(p, "ino", true, &pin->ino) < 0 ||
                        json_get_bool(p, "writable", false, &pin->writable) < 0 ||
                        json_get_uint64(p, "uid", false, &uid) < 0 || uid >= UINT32_MAX)
                        return -EBADMSG;
                pin->uid = (uint32_t) uid;
                for (size_t j = 0; j < i; j++)
                        if (streq(e->pins[j].alias, pin->alias))
                                return -EBADMSG;
        }
        return 0;
}

int state_export_from_json(json_object *o, const char *file_name, StateExport *ret) {
        _cleanup_(state_export_done) StateExport e = {};
        _cleanup_free_ char *expected = NULL;
        uint64_t version = 0, id = 0, owner = UINT32_MAX;
        int r;

        if (!json_object_is_type(o, json_type_object) || json_get_u64(o, "version", true, &version) < 0)
                return -EBADMSG;
        if (version != STATE_FORMAT_VERSION)
                return -EPROTONOSUPPORT; /* another daemon's format: not ours to judge */
        if (json_get_u64(o, "id", true, &id) < 0 || id == 0 || id >= UINT_MAX)
                return -EBADMSG;
        e.id = (unsigned) id;
        expected = strdup_printf("%u.json", e.id);
        if (!expected)
                return -ENOMEM;
        if (!streq(file_name, expected))
                return -EBADMSG;
        if ((r = printable_field(o, "guest", GUEST_NAME_MAX, &e.guest)) < 0 ||
                (r = printable_field(o, "disk", QEMU_STRING_MAX, &e.alias)) < 0 ||
                (r = printable_field(o, "name", QEMU_STRING_MAX, &e.name)) < 0 ||
                (r = printable_field(o, "listen", EXPORT_LISTEN_MAX, &e.listen)) < 0)
                return r;
        /* The disk's alias names a socket file: an identifier as QEMU's are, nothing else. */
        if (!guest_name_is_valid(e.guest) || !qemu_id_is_valid(e.alias))
                return -EBADMSG;
        e.guest_owner = UID_INVALID;
        if (json_object_object_get_ex(o, "guest_uuid", NULL) &&
                (r = printable_field(o, "guest_uuid", QEMU_STRING_MAX, &e.guest_uuid)) < 0)
                return r;
        if (json_get_u64(o, "guest_owner", false, &owner) < 0 || owner > UINT32_MAX)
                return -EBADMSG;
        e.guest_owner = (uid_t) owner;
        r = export_pins_from_json(o, &e);
        if (r < 0)
                return r;
        *ret = e;
        e = (StateExport) {};
        return 0;
}

typedef struct ExportLoad {
        state_export_handler_t handler;
        void *userdata;
} ExportLoad;

static int export_file(const char *path, const char *file_name, json_object *o, int error, void *userdata) {
        _cleanup_(state_export_done) StateExport e = {};
        ExportLoad *l = userdata;
        int r = error;

        if (r >= 0)
                r = state_export_from_json(o, file_name, &e);
        if (r == -ENOMEM)
                return log_oom();
        /* Only a record that is ours and wrong goes: one that could not be read now (EIO, EMFILE)
         * or is of another format version (a downgrade) stays for a later start to serve. */
        if (r == -EBADMSG) {
                log_error_errno(r, "Export state file %s is invalid, dropping it: %m", path);
                (void) unlink(path);
                return 0;
        }
        if (r < 0) {
                log_error_errno(r, "Export state file %s cannot be used now, keeping it: %m", path);
                return 0;
        }
        return l->handler(&e, l->userdata);
}

int state_export_load(const char *dir_path, state_export_handler_t handler, void *userdata) {
        return state_dir_foreach(dir_path, true, export_file, &(ExportLoad) { handler, userdata });
}
