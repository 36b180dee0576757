/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <ctype.h>
#include <limits.h>
#include <grp.h>
#include <pwd.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/un.h>

#include "bus-error.h"
#include "bus-util.h"
#include "cache.h"
#include "export.h"
#include "backend.h"
#include "mirror.h"
#include "prefetch.h"
#include "range.h"
#include "guest.h"
#include "image.h"
#include "sandbox.h"
#include "manager.h"
#include "polkit.h"
#include "provision.h"
#include "qmp-socket.h"
#include "state.h"
#include "storage.h"
#include "stream.h"
#include "util.h"

#define GUESTS_MAX 4096
/* A user other than root registers at most this many guests of their own: each holds a sandbox
 * identity of HelperUIDRange=, a state file, and what its QEMU reports (up to 256 disks of names)
 * in our memory; one user could otherwise take every identity, or the unit's memory. */
#define GUESTS_PER_USER_MAX 64
#define OFFLINE_DISKS_MAX 16

/* The registry as the objects below see it (engine.h). */

static Manager *manager_of(Engine *e) {
        return (Manager *) ((char *) e - offsetof(Manager, engine));
}

static Guest *registry_find_guest(Engine *e, const char *name) {
        return manager_find_guest(manager_of(e), name);
}

static char **registry_guest_images(Engine *e, Guest *except) {
        return manager_guest_images(manager_of(e), except);
}

static char **registry_guest_claims(Engine *e, Guest *except) {
        return manager_guest_claims(manager_of(e), except);
}

static void registry_unlink_guest(Engine *e, Guest *g) {
        manager_unlink_guest(manager_of(e), g);
}

static void registry_storage_helpers(Engine *e, uid_t owner, unsigned *ret_owner, unsigned *ret_users) {
        unsigned mine = 0, users = 0;

        /* A handoff (a running guest's disks served after its QEMU went, for root's export) is not
         * counted. */
        for (Guest *g = manager_of(e)->guests; g; g = g->next)
                if (g->offline && peer_has_helper(&g->peer)) {
                        mine += g->owner == owner;
                        users += g->owner != 0;
                }
        *ret_owner = mine;
        *ret_users = users;
}


static bool registry_range_runs(Disk *d) {
        return range_backend.runs(d);
}

/* What went on before a restart: range jobs and prefetch jobs in their phase 1 go on with a new
 * pull helper, then the exports come back (export.h). */
static void registry_resume_orphans(Guest *g) {
        range_resume_orphans(g);
        prefetch_resume_orphans(g);
        mirror_resume_orphans(g);
        export_resume(g);
}

static const EngineRegistry manager_registry = {
        .find_guest = registry_find_guest,
        .guest_images = registry_guest_images,
        .guest_claims = registry_guest_claims,
        .unlink_guest = registry_unlink_guest,
        .storage_helpers = registry_storage_helpers,
        .cleanup_leftovers = range_cleanup_leftovers,
        .resume_orphans = registry_resume_orphans,
        .unreachable = export_guest_unreachable,
        .resume_offline_stream = stream_resume_offline,
        .range_runs = registry_range_runs,
        .job_event = mirror_on_event,
        .job_info = mirror_on_info,
        .job_lost = mirror_on_lost,
        .start_lost = mirror_start_lost,
        .identity_allocate = manager_identity_allocate,
        .identity_free = manager_identity_free,
};

int manager_new(Manager **ret, sd_event *e, const char *config_path, bool config_explicit, const char *state_dir,
        const char *runtime_dir) {
        Manager *m;
        int r;

        m = calloc(1, sizeof(Manager));
        if (!m)
                return log_oom();
        m->engine.event = sd_event_ref(e);
        m->engine.registry = &manager_registry;
        /* The names of our filter nodes and exports in QEMU count from here: from a random start,
         * so that a restarted daemon's names never meet those a killed one left behind (they are
         * removed asynchronously while a range job resumes). */
        m->engine.range_seq = random_u32() >> 8;
        config_init(&m->engine.config);
        m->engine.state_dir = strdup(state_dir);
        m->engine.runtime_dir = strdup(runtime_dir);
        m->engine.guest_state_dir = strdup_printf("%s/guests", state_dir);
        if (!m->engine.state_dir || !m->engine.runtime_dir || !m->engine.guest_state_dir) {
                manager_free(m);
                return log_oom();
        }
        r = config_load(&m->engine.config, config_path, config_explicit);
        if (r < 0) {
                manager_free(m);
                return r;
        }
        m->engine.progress.per_second = m->engine.config.progress_signals;
        r = mkdir_p(m->engine.guest_state_dir, 0700);
        if (r < 0) {
                log_error_errno(r, "Failed to create state directory %s: %m", m->engine.guest_state_dir);
                manager_free(m);
                return r;
        }
        r = state_writer_new(&m->engine.state_writer);
        if (r >= 0)
                r = state_writer_attach(m->engine.state_writer, e);
        if (r < 0) {
                log_error_errno(r, "Failed to start the state writer thread: %m");
                manager_free(m);
                return r;
        }
        r = mkdir_p(m->engine.runtime_dir, 0700);
        if (r < 0) {
                log_error_errno(r, "Failed to create runtime directory %s: %m", m->engine.runtime_dir);
                manager_free(m);
                return r;
        }
        *ret = m;
        return 0;
}

Manager *manager_free(Manager *m) {
        if (!m)
                return NULL;
        export_free_all(&m->engine);
        cache_free_all(&m->engine);
        range_free_all(&m->engine);
        guest_unregister_drains_free(&m->engine);
        while (m->guests) {
                Guest *g = m->guests;
                manager_unlink_guest(m, g);
                guest_free(g);
        }
        m->engine.polkit = polkit_registry_free(m->engine.polkit);
        if (m->engine.bus) {
                sd_bus_flush(m->engine.bus);
                m->engine.bus = sd_bus_close_unref(m->engine.bus);
        }
        /* What guests saved on their way out is written before we go. */
        m->engine.state_writer = state_writer_free(m->engine.state_writer);
        config_done(&m->engine.config);
        free(m->engine.state_dir);
        free(m->engine.runtime_dir);
        free(m->engine.guest_state_dir);
        sd_event_unref(m->engine.event);
        free(m);
        return NULL;
}

const char *manager_helper_dir(Manager *m) {
        return engine_helper_dir(&m->engine);
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
        char **disks;   /* alias, path, alias, path, … */
        char **formats; /* alias, format, … */
        char **disk_names; /* alias, the name the guest's manager gives it, … */
} RegisterOptions;

static void register_options_done(RegisterOptions *o) {
        o->disks = strv_free(o->disks);
        o->formats = strv_free(o->formats);
        o->disk_names = strv_free(o->disk_names);
}

static int read_register_options(sd_bus_message *msg, RegisterOptions *o, sd_bus_error *error) {
        return bus_read_options(msg, "RegisterGuest",
                (const BusOption[]) {
                        { "owner", "u", &o->owner, &o->have_owner },
                        { "uuid", "s", &o->uuid },
                        { "disks", "a{ss}", &o->disks, &o->have_disks, OFFLINE_DISKS_MAX },
                        { "formats", "a{ss}", &o->formats, NULL, OFFLINE_DISKS_MAX },
                        { "disk_names", "a{ss}", &o->disk_names, NULL, DISK_NAMES_MAX },
                        {},
                },
                error);
}

static int check_qmp_socket_path(const char *path, sd_bus_error *error) {
        if (!path_is_safe_absolute(path, sizeof(((struct sockaddr_un *) NULL)->sun_path) - 1))
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                        "QMP socket '%.200s' must be a normalized absolute path of at most %zu bytes.", path,
                        sizeof(((struct sockaddr_un *) NULL)->sun_path) - 1);
        return 0;
}

/* The socket as the registration found it: its directory pinned, the leaf a socket (no symlink).
 * A caller other than root registers only a socket it could connect to itself, found as it would
 * find it: the path is resolved with its identity (fs-identity.h), and what fails tells only what
 * it could see; the daemon never reaches a monitor on its behalf that it could not. */
static int open_qmp_socket(const char *path, uid_t caller, QmpSocketPin *ret_pin, int *ret_dir_fd, int *ret_sock_fd,
        sd_bus_error *error) {
        _cleanup_free_ gid_t *gids = NULL;
        size_t n = 0;
        gid_t gid;
        int r;

        r = check_qmp_socket_path(path, error);
        if (r < 0)
                return r;
        if (caller != 0) {
                r = user_groups(caller, NGROUPS_MAX, &gid, &gids, &n);
                if (r == -ESRCH)
                        return sd_bus_error_setf(error, SD_BUS_ERROR_ACCESS_DENIED,
                                "Cannot tell whether uid " UID_FMT " may connect to QMP socket %s.", caller, path);
                if (r < 0)
                        return r;
                r = qmp_socket_open_as(path, NULL, caller, gid, gids, n, ret_pin, ret_dir_fd, ret_sock_fd);
                if (r == -EACCES)
                        return sd_bus_error_setf(error, SD_BUS_ERROR_ACCESS_DENIED,
                                "You (uid " UID_FMT ") cannot connect to QMP socket %s yourself (that needs search "
                                "permission on its directories and write permission on the socket), so blockstreamd "
                                "will not connect to it for you.",
                                caller, path);
        } else
                r = qmp_socket_open(path, NULL, ret_pin, ret_dir_fd, ret_sock_fd);
        if (r == -ENOMEM)
                return r;
        if (r < 0)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "QMP socket '%s' cannot be used: %s.", path,
                        qmp_socket_strerror(r));
        return 0;
}

static const char *lookup_pair(char **l, const char *key) {
        for (size_t i = 0; l && l[i] && l[i + 1]; i += 2)
                if (streq(l[i], key))
                        return l[i + 1];
        return NULL;
}

static int check_offline_disks(Manager *m, const RegisterOptions *o, sd_bus_error *error) {
        size_t n = strv_length(o->disks) / 2;

        if (n == 0)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                        "A guest that is not running needs its disks: option 'disks' (a{ss}, alias -> image path).");
        if (strv_isempty(m->engine.config.image_dirs))
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                        "No ImageDirectories= are configured, so no image may be used; configure them in the daemon's "
                        "configuration file.");
        for (size_t i = 0; i < n; i++) {
                const char *alias = o->disks[2 * i], *path = o->disks[2 * i + 1];
                if (!qemu_id_is_valid(alias) || strlen(alias) > GUEST_OFFLINE_ALIAS_MAX)
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                "Invalid disk alias '%.64s': a letter, then up to %d letters, digits, '-', '.', '_'.", alias,
                                GUEST_OFFLINE_ALIAS_MAX - 1);
                if (!path_is_safe_absolute(path, PATH_MAX - 1))
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                "Disk '%s': '%.200s' is not a normalized absolute path.", alias, path);
                for (size_t j = 0; j < i; j++)
                        if (streq(o->disks[2 * j + 1], path))
                                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                        "Image %s is given twice.", path);
        }
        for (size_t i = 0; o->formats && o->formats[i]; i += 2) {
                const char *f = o->formats[i + 1];
                if (!lookup_pair(o->disks, o->formats[i]))
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                "Option 'formats' names disk '%.64s', which is not in 'disks'.", o->formats[i]);
                if (!streq(f, "qcow2") && !streq(f, "raw"))
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                "Format '%.32s' of disk '%s' is not supported; use qcow2 or raw.", f, o->formats[i]);
        }
        return 0;
}

/* disk_names: alias -> the name the guest's manager gives the disk (libvirt's target). A name for an
 * alias the guest does not have (yet) is kept: the disk may appear on Refresh. */
static int check_disk_names(const RegisterOptions *o, sd_bus_error *error) {
        DiskNamesProblem p;
        size_t i = 0;

        p = disk_names_check(o->disk_names, &i);
        if (p == DISK_NAMES_TOO_MANY)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                        "Option 'disk_names' has more than %d entries.", DISK_NAMES_MAX);
        if (p != DISK_NAMES_OK)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                        "Option 'disk_names', '%.64s' -> '%.80s': %s", o->disk_names[2 * i],
                        strempty(o->disk_names[2 * i + 1]), disk_names_problem_to_string(p));
        /* An offline guest's disks are known now. */
        for (size_t j = 0; o->disks && o->disks[j] && o->disks[j + 1]; j += 2) {
                const char *id = disk_names_id_of(o->disk_names, o->disks[j]);
                if (id && !streq(id, o->disks[j]))
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                "Option 'disk_names', '%s' -> '%s': %s", id, o->disks[j],
                                disk_names_problem_to_string(DISK_NAMES_NAME_IS_ID));
        }
        return 0;
}

/* Read every chain now, as untrusted headers, and refuse the registration if one is unsafe. */
static int add_offline_disks(Manager *m, Guest *g, const RegisterOptions *o, sd_bus_error *error) {
        _cleanup_strv_free_ char **forbidden = guest_forbidden_images(g), **claimed = manager_guest_claims(m, g);
        size_t n = strv_length(o->disks) / 2, text = 0;
        int r;

        if (!forbidden || !claimed)
                return -ENOMEM;
        for (size_t i = 0; i < n; i++) {
                _cleanup_(image_chain_done) ImageChain chain = {};
                _cleanup_free_ char *why = NULL;
                const char *alias = o->disks[2 * i], *path = o->disks[2 * i + 1];
                const char *format = lookup_pair(o->formats, alias) ?: "qcow2";
                Disk *d, **l;

                /* Opened as the owner: what root would find (whether a name exists where they may
                 * not look, a header's backing) is not theirs to learn, nor to use. */
                r = storage_chain_open_owned(m->engine.config.image_dirs, g->owner, path, format, g->owner != 0,
                        forbidden, claimed, &chain, &why);
                if (r == -ENOMEM)
                        return r;
                if (r < 0)
                        return sd_bus_error_setf(error,
                                r == -EACCES ? SD_BUS_ERROR_ACCESS_DENIED : SD_BUS_ERROR_INVALID_ARGS, "Disk '%s': %s",
                                alias, why ?: strerror(-r));
                text += disk_chain_text(alias, &chain);
                if (text > QEMU_DISKS_TEXT_MAX)
                        return sd_bus_error_setf(error, SD_BUS_ERROR_LIMITS_EXCEEDED,
                                "Disk '%s': the disks' backing chains hold more than %u bytes of paths, more than "
                                "is kept of a guest.", alias, QEMU_DISKS_TEXT_MAX);
                r = disk_new(&d, g, &guest_disk_host, alias);
                if (r < 0)
                        return r;
                r = disk_update_from_chain(d, &chain, false);
                l = r >= 0 ? reallocarray(g->disks, g->n_disks + 1, sizeof(Disk *)) : NULL;
                if (!l) {
                        disk_free(d);
                        return r < 0 ? r : -ENOMEM;
                }
                g->disks = l;
                g->disks[g->n_disks++] = d;
        }
        return 0;
}

static int register_offline_guest(Manager *m, Guest *g, const RegisterOptions *o, sd_bus_message *msg,
        sd_bus_error *error) {
        int r;

        g->offline = true;
        r = add_offline_disks(m, g, o, error);
        if (r < 0)
                return r;
        r = guest_publish(g);
        if (r < 0)
                return sd_bus_error_setf(error, SD_BUS_ERROR_FAILED, "Failed to save guest '%s' in %s: %s", g->name,
                        m->engine.guest_state_dir, strerror(-r));
        log_info("Guest %s registered, not running (%zu disk%s, owner uid " UID_FMT ", helper uid " UID_FMT ").",
                g->name, g->n_disks, g->n_disks == 1 ? "" : "s", g->owner, g->helper_uid);
        return sd_bus_reply_method_return(msg, "o", g->object_path);
}

static int method_register_guest(sd_bus_message *msg, void *userdata, sd_bus_error *error) {
        _cleanup_(register_options_done) RegisterOptions o = {};
        _cleanup_free_ char *uuid = NULL;
        _cleanup_close_ int dir_fd = -1, sock_fd = -1;
        QmpSocketPin pin = {};
        Manager *m = userdata;
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
        if (!isempty(socket_path) && (o.have_disks || o.formats))
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                        "Options 'disks' and 'formats' are for guests that are not running (empty QMP socket); a running "
                        "guest's disks come from its QEMU.");
        r = check_disk_names(&o, error);
        if (r < 0)
                return r;
        if (isempty(socket_path))
                r = check_offline_disks(m, &o, error);
        else
                r = check_qmp_socket_path(socket_path, error); /* bounded before it may wait for polkit */
        if (r < 0)
                return r;

        r = bus_sender_uid(msg, &caller);
        if (r < 0)
                return r;
        if (o.have_owner && o.owner != caller && caller != 0)
                return sd_bus_error_setf(error, SD_BUS_ERROR_ACCESS_DENIED,
                        "Only root may register a guest for another user (uid %" PRIu32 ").", o.owner);

        r = bus_authorize(m->engine.polkit, msg, ACTION_MANAGE,
                &(AuthDetails) { .guest = name, .owner = o.have_owner ? (uid_t) o.owner : caller }, error);
        if (r < 0)
                return r;
        if (r == 0)
                return 1; /* polkit was asked; the call is dispatched again with its answer */

        /* Checked after the (possibly slow) authorization: the world may have changed meanwhile. */
        if (manager_find_guest(m, name))
                return sd_bus_error_setf(error, BS_ERROR_GUEST_EXISTS,
                        "A guest named '%s' is already registered; unregister it first or pick another name.", name);
        if (caller != 0) {
                unsigned mine = 0;

                for (Guest *i = m->guests; i; i = i->next)
                        mine += i->owner == caller;
                if (mine >= GUESTS_PER_USER_MAX)
                        return sd_bus_error_setf(error, SD_BUS_ERROR_LIMITS_EXCEEDED,
                                "You (uid " UID_FMT ") have %u guests registered (at most %u per user); unregister "
                                "one first.",
                                caller, mine, GUESTS_PER_USER_MAX);
        }
        if (m->n_guests >= GUESTS_MAX)
                return sd_bus_error_setf(error, SD_BUS_ERROR_LIMITS_EXCEEDED, "Too many guests (at most %d).",
                        GUESTS_MAX);
        if (!isempty(socket_path)) {
                r = open_qmp_socket(socket_path, caller, &pin, &dir_fd, &sock_fd, error);
                if (r < 0)
                        return r;
        }

        r = guest_new(&g, &m->engine, name, socket_path, o.have_owner ? (uid_t) o.owner : caller, uuid);
        if (r < 0)
                return r;
        g->disk_names = TAKE_PTR(o.disk_names);
        manager_link_guest(m, g);
        r = manager_allocate_identity(m, g);
        if (r < 0) {
                manager_unlink_guest(m, g);
                guest_free(g);
                if (r == -ENOSPC)
                        return sd_bus_error_setf(error, SD_BUS_ERROR_LIMITS_EXCEEDED,
                                "No sandbox identity left: HelperUIDRange= or the MCS categories are exhausted.");
                return sd_bus_error_set_errnof(error, -r, "Failed to set up the guest's sandbox identity: %m");
        }
        if (isempty(socket_path)) {
                r = register_offline_guest(m, g, &o, msg, error);
                if (r < 0 || sd_bus_error_is_set(error)) {
                        manager_unlink_guest(m, g);
                        guest_free(g);
                }
                return r;
        }
        g->register_call = sd_bus_message_ref(msg);
        /* A registration by root vouches for the QEMU it finds: its uid is pinned. */
        g->qmp_uid_pin_next = caller == 0;
        g->qmp_as_owner = caller != 0;
        r = guest_connect_opened(g, sock_fd, &pin);
        if (r < 0) {
                r = sd_bus_error_setf(error, r == -EPERM ? SD_BUS_ERROR_ACCESS_DENIED : BS_ERROR_QEMU_FAILED,
                        "Guest '%s' not registered: %s.", name, g->connect_error ?: strerror(-r));
                g->register_call = sd_bus_message_unref(g->register_call);
                manager_unlink_guest(m, g);
                guest_free(g);
                return r;
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
        r = bus_authorize(m->engine.polkit, msg, ACTION_MANAGE, &(AuthDetails) { .guest = g->name, .owner = g->owner }, error);
        if (r < 0)
                return r;
        if (r == 0)
                return 1; /* polkit was asked; the call is dispatched again with its answer */
        if (guest_has_active_job(g))
                return sd_bus_error_setf(error, BS_ERROR_BUSY,
                        "A stream of guest '%s' is running; Cancel it first, then unregister.", name);
        guest_unregister(g, msg);
        return 1; /* answered once QEMU confirmed */
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

static bool guest_has_image(Guest *g, const char *path) {
        for (size_t i = 0; g && i < g->n_disks; i++)
                if (streq(g->disks[i]->path, path) || strv_contains(g->disks[i]->chain, path))
                        return true;
        return false;
}

/* offline: the disks we registered (paths we checked ourselves); else what running guests' QEMUs
 * report, which may be a lie: never an image we registered for except. */
static char **guest_images(Manager *m, Guest *except, bool offline) {
        _cleanup_strv_free_ char **l = NULL;

        for (Guest *g = m->guests; g; g = g->next)
                for (size_t i = 0; g != except && g->offline == offline && i < g->n_disks; i++) {
                        const char *p = g->disks[i]->path;

                        if (isempty(p) || (!offline && guest_has_image(except, p)))
                                continue;
                        if (strv_push(&l, strdup(p)) < 0)
                                return NULL;
                }
        if (!l)
                l = calloc(1, sizeof(char *));
        return TAKE_PTR(l);
}

char **manager_guest_images(Manager *m, Guest *except) {
        return guest_images(m, except, true);
}

char **manager_guest_claims(Manager *m, Guest *except) {
        return guest_images(m, except, false);
}

static int cache_acquire_hook(void *userdata, uid_t caller, const char *url, const char *format, uint64_t size,
        provision_cache_ready_t ready, void *provision, sd_bus_error *error) {
        return cache_acquire(userdata, caller, url, format, size, ready, provision, error);
}

static void cache_done_hook(void *userdata, void *handle, bool success, const char *target, const struct stat *st) {
        cache_provisioned(userdata, handle, success, target, st);
}

static int method_provision_disk(sd_bus_message *msg, void *userdata, sd_bus_error *error) {
        _cleanup_strv_free_ char **forbidden = NULL;
        Manager *m = userdata;
        const char *template, *target, *format = NULL;
        uint64_t size = 0;
        bool have_size = false;
        int cache = 0;
        uid_t caller;
        int r;

        r = sd_bus_message_read(msg, "ss", &template, &target);
        if (r < 0)
                return r;
        r = bus_read_options(msg, "ProvisionDisk",
                (const BusOption[]) {
                        { "template_format", "s", &format },
                        { "size", "t", &size, &have_size },
                        { "cache", "b", &cache },
                        {},
                },
                error);
        if (r < 0)
                return r;
        if (have_size && (size == 0 || size > (UINT64_C(1) << 60) || size % 512))
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                        "Option 'size' must be a positive multiple of 512 bytes, at most 1 EiB.");
        if (strlen(template) >= PATH_MAX || strlen(target) >= PATH_MAX)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                        "The template and the target must each be shorter than %d bytes.", PATH_MAX);

        r = bus_authorize(m->engine.polkit, msg, ACTION_MANAGE, NULL, error);
        if (r < 0)
                return r;
        if (r == 0)
                return 1; /* polkit was asked; the call is dispatched again with its answer */
        r = bus_sender_uid(msg, &caller);
        if (r < 0)
                return r;
        forbidden = manager_guest_images(m, NULL);
        if (!forbidden)
                return -ENOMEM;
        return provision_disk(&(ProvisionContext) { .event = m->engine.event,
                                      .config = &m->engine.config,
                                      .forbidden_images = forbidden,
                                      .cache = cache ? &(ProvisionCache) { .acquire = cache_acquire_hook,
                                                               .done = cache_done_hook,
                                                               .userdata = &m->engine }
                                                     : NULL },
                msg, template, target, format, size, caller, error);
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

static int guest_object_find(sd_bus *bus, const char *path, const char *interface, void *userdata, void **found,
        sd_bus_error *error) {
        Manager *m = userdata;
        _cleanup_free_ char *name = NULL;
        Guest *g;
        int r;

        r = sd_bus_path_decode(path, GUEST_PATH_PREFIX, &name);
        if (r <= 0)
                return 0;
        g = manager_find_guest(m, name);
        if (!g || !g->published)
                return 0;
        *found = g;
        return 1;
}

static int guest_node_enumerator(sd_bus *bus, const char *path, void *userdata, char ***nodes, sd_bus_error *error) {
        Manager *m = userdata;
        _cleanup_strv_free_ char **l = NULL;
        int r;

        for (Guest *g = m->guests; g; g = g->next) {
                if (!g->published)
                        continue;
                r = strv_push(&l, strdup(g->object_path));
                if (r < 0)
                        return r;
                for (size_t i = 0; i < g->n_disks; i++) {
                        r = strv_push(&l, strdup(g->disks[i]->object_path));
                        if (r < 0)
                                return r;
                }
        }
        if (!l && !(l = calloc(1, sizeof(char *))))
                return -ENOMEM;
        *nodes = TAKE_PTR(l);
        return 1;
}

int manager_connect_bus(Manager *m) {
        int r;

        r = sd_bus_open_system_with_description(&m->engine.bus, "blockstreamd");
        if (r < 0)
                return log_error_errno(r, "Failed to connect to the system bus: %m");
        r = sd_bus_add_object_vtable(m->engine.bus, NULL, MANAGER_PATH, MANAGER_INTERFACE, manager_vtable, m);
        if (r < 0)
                return log_error_errno(r, "Failed to add the manager object: %m");
        r = sd_bus_add_fallback_vtable(m->engine.bus, NULL, GUEST_PATH_PREFIX, GUEST_INTERFACE, guest_vtable,
                guest_object_find, m);
        if (r < 0)
                return log_error_errno(r, "Failed to add the guest objects: %m");
        r = sd_bus_add_fallback_vtable(m->engine.bus, NULL, GUEST_PATH_PREFIX, STREAM_INTERFACE, stream_vtable,
                disk_object_find, &m->engine);
        if (r < 0)
                return log_error_errno(r, "Failed to add the disk objects: %m");
        r = sd_bus_add_node_enumerator(m->engine.bus, NULL, GUEST_PATH_PREFIX, guest_node_enumerator, m);
        if (r < 0)
                return log_error_errno(r, "Failed to add the node enumerator: %m");
        r = sd_bus_add_fallback_vtable(m->engine.bus, NULL, EXPORT_PATH_PREFIX, EXPORT_INTERFACE, export_vtable,
                export_object_find, &m->engine);
        if (r < 0)
                return log_error_errno(r, "Failed to add the export objects: %m");
        r = sd_bus_add_node_enumerator(m->engine.bus, NULL, EXPORT_PATH_PREFIX, export_node_enumerator, &m->engine);
        if (r < 0)
                return log_error_errno(r, "Failed to add the export enumerator: %m");
        r = sd_bus_add_fallback_vtable(m->engine.bus, NULL, CACHE_PATH_PREFIX, CACHE_INTERFACE, cache_vtable,
                cache_object_find, &m->engine);
        if (r < 0)
                return log_error_errno(r, "Failed to add the cache objects: %m");
        r = sd_bus_add_node_enumerator(m->engine.bus, NULL, CACHE_PATH_PREFIX, cache_node_enumerator, &m->engine);
        if (r < 0)
                return log_error_errno(r, "Failed to add the cache enumerator: %m");
        r = sd_bus_add_object_manager(m->engine.bus, NULL, MANAGER_PATH);
        if (r < 0)
                return log_error_errno(r, "Failed to add the object manager: %m");
        r = polkit_registry_new(&m->engine.polkit, m->engine.bus);
        if (r < 0)
                return log_oom();
        r = polkit_registry_attach(m->engine.polkit);
        if (r < 0)
                return log_error_errno(r, "Failed to watch callers leaving the bus: %m");
        r = sd_bus_attach_event(m->engine.bus, m->engine.event, SD_EVENT_PRIORITY_NORMAL);
        if (r < 0)
                return log_error_errno(r, "Failed to attach the bus to the event loop: %m");
        r = sd_bus_request_name(m->engine.bus, BUS_NAME, 0);
        if (r < 0)
                return log_error_errno(r, "Failed to acquire the bus name %s: %m", BUS_NAME);
        return 0;
}

static int load_guest(StateGuest *s, const char *path, void *userdata) {
        Manager *m = userdata;
        bool reallocated;
        Guest *g;
        int r;

        if (manager_find_guest(m, s->name)) {
                log_error("State file %s names guest %s a second time, skipping it.", path, s->name);
                return 0;
        }
        r = guest_from_state(&m->engine, s, &g);
        if (r < 0)
                return log_oom();
        /* Its sandbox identity is its own for life; a missing or clashing one (hand-edited
         * files) is replaced before anything runs under it. */
        manager_link_guest(m, g);
        reallocated = !manager_identity_valid(m, g);
        if (reallocated) {
                log_warning("Guest %s: sandbox identity in %s missing or taken, allocating a new one.", g->name, path);
                r = manager_allocate_identity(m, g);
        } else
                r = manager_identity_labels(m, g);
        if (r >= 0) {
                r = manager_storage_identity_restore(m, g);
                if (r > 0)
                        reallocated = true;
        }
        if (r < 0) {
                log_error_errno(r, "Guest %s: no sandbox identity, skipping this guest: %m", g->name);
                manager_unlink_guest(m, g);
                guest_free(g);
                return 0;
        }
        g->published = true;
        /* Only a new identity needs writing: a save is two fsyncs, and a thousand guests' worth
         * of them kept a restarted daemon off the bus for many seconds. */
        if (reallocated)
                (void) guest_save(g); /* logs on failure */
        log_info("Guest %s restored from %s.", g->name, path);
        return 0;
}

int manager_load_state(Manager *m) {
        int r;

        r = state_load(m->engine.guest_state_dir, load_guest, m);
        if (r < 0)
                return r;
        /* After the guests: a cache's recorded identity must not be any guest's (guests keep theirs). */
        (void) cache_load_all(&m->engine); /* logs; a cache that cannot come back does not stop the guests */
        return export_restore_all(&m->engine); /* of the guests just loaded */
}

void manager_start_guests(Manager *m) {
        /* Safe against guests going away: a failed connect never frees a published guest. */
        for (Guest *g = m->guests; g; g = g->next)
                if (g->offline)
                        guest_fail_orphaned_jobs(g); /* its helper died with the old daemon */
                else
                        (void) guest_connect(g);
}
