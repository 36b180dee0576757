/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* A guest's helpers (guest.h): where they run, the guest's runtime directory, how each is
 * started, in the guest's sandbox identity, and the share of storage helpers a user's guests take. */


#include "bus-error.h"
#include "engine.h"
#include "guest.h"
#include "helper.h"
#include "util.h"

int guest_spawn_helper(Guest *g, const char *binary, char *const *argv, int data_fd, const char *label,
        const char *log_prefix, sd_event_child_handler_t on_exit, void *userdata, pid_t *ret_pid,
        sd_event_source **ret_child, int *ret_control, HelperLog **ret_log) {
        Engine *m = g->engine;
        _cleanup_close_ int exec_fd = -1;
        int r;

        exec_fd = helper_open_binary(engine_helper_dir(m), binary);
        if (exec_fd < 0)
                return exec_fd;
        r = guest_ensure_runtime_dir(g);
        if (r < 0)
                return r;
        return helper_start(m->event,
                &(HelperSpec) {
                        .sandbox = {
                                .name = g->name,
                                .uid = g->helper_uid,
                                .gid = g->helper_uid,
                                .runtime_dir = g->runtime_dir,
                                .selinux_label = label,
                                .fds = &data_fd,
                                .n_fds = 1,
                                .argv = argv,
                                .exec_fd = exec_fd,
                                /* Its helpers share its uid: each sees and signals no other
                                 * process, and what it forks dies with it (sandbox.h). */
                                .own_pids = true,
                        },
                        .control_type = SOCK_SEQPACKET,
                        .log_prefix = log_prefix,
                        .on_exit = on_exit,
                        .userdata = userdata,
                },
                ret_pid, ret_child, ret_control, ret_log);
}

int guest_ensure_runtime_dir(Guest *g) {
        int r;

        if (!g->runtime_dir) {
                g->runtime_dir = strdup_printf("%s/guests/%s", g->engine->runtime_dir, g->name);
                if (!g->runtime_dir)
                        return -ENOMEM;
        }
        r = mkdir_p(g->runtime_dir, 0700); /* root's: helpers get it bound in, they need nothing of it */
        if (r < 0)
                return log_error_errno(r, "Failed to create %s: %m", g->runtime_dir);
        return 0;
}

int guest_helper_share(Guest *g, sd_bus_error *error) {
        unsigned mine, users;

        if (!g->offline || g->owner == 0 || peer_has_helper(&g->peer))
                return 0;
        engine_storage_helpers(g->engine, g->owner, &mine, &users);
        if (mine >= GUEST_STORAGE_HELPERS_PER_OWNER_MAX)
                return sd_bus_error_setf(error, SD_BUS_ERROR_LIMITS_EXCEEDED,
                        "The guests of uid " UID_FMT " that are not running have %u storage helpers already (at "
                        "most %u at once per user, each a QEMU of its own); wait for a job or map of one to end.",
                        g->owner, mine, GUEST_STORAGE_HELPERS_PER_OWNER_MAX);
        if (users >= GUEST_STORAGE_HELPERS_USERS_MAX)
                return sd_bus_error_setf(error, SD_BUS_ERROR_LIMITS_EXCEEDED,
                        "Guests of users other than root have %u storage helpers running (at most %u at once, "
                        "each a QEMU of its own); wait for a job or map to end.",
                        users, GUEST_STORAGE_HELPERS_USERS_MAX);
        return 0;
}

int guest_ready_error(Guest *g, int r, sd_bus_error *error) {
        return sd_bus_error_set_errnof(error, -r, "Cannot start the storage helper of guest '%s': %m", g->name);
}
