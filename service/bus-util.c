/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <grp.h>
#include <limits.h>
#include <pwd.h>

#include "bus-util.h"
#include "util.h"

static int unknown_option(const char *method, const BusOption *options, const char *key, sd_bus_error *error) {
        char list[512] = "";
        size_t n = 0;

        for (const BusOption *o = options; o->name; o++) {
                int k = snprintf(list + n, sizeof(list) - n, "%s'%s' (%s)", n ? ", " : "", o->name, o->type);
                if (k < 0 || (size_t) k >= sizeof(list) - n)
                        break;
                n += (size_t) k;
        }
        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "Unknown option '%.64s'; %s takes %s.", key, method,
                n ? list : "no options");
}

static int read_dict(sd_bus_message *m, const BusOption *o, sd_bus_error *error) {
        _cleanup_strv_free_ char **l = NULL;
        const char *k, *v;
        int r;

        r = sd_bus_message_enter_container(m, 'a', "{ss}");
        if (r < 0)
                return r;
        while ((r = sd_bus_message_read(m, "{ss}", &k, &v)) > 0) {
                if (strv_length(l) >= 2 * (size_t) o->max)
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "Option '%s' has more than %u entries.",
                                o->name, o->max);
                if (strlen(k) >= PATH_MAX || strlen(v) >= PATH_MAX)
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                "Option '%s' has an entry of %zu bytes or more.", o->name, (size_t) PATH_MAX);
                /* D-Bus lets a dict repeat a key: two disks of one name would share an object path. */
                for (size_t i = 0; l && l[i]; i += 2)
                        if (streq(l[i], k))
                                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                        "Option '%s' names '%.64s' twice.", o->name, k);
                if (strv_push(&l, strdup(k)) < 0 || strv_push(&l, strdup(v)) < 0)
                        return -ENOMEM;
        }
        if (r < 0)
                return r;
        r = sd_bus_message_exit_container(m);
        if (r < 0)
                return r;
        if (!l && !(l = calloc(1, sizeof(char *))))
                return -ENOMEM;
        strv_free(*(char ***) o->ret);
        *(char ***) o->ret = TAKE_PTR(l);
        return 0;
}

int bus_read_options(sd_bus_message *m, const char *method, const BusOption *options, sd_bus_error *error) {
        uint64_t seen = 0; /* one bit per option: a key given twice is refused, so a{sv} stays small */
        int r;

        r = sd_bus_message_enter_container(m, 'a', "{sv}");
        if (r < 0)
                return r;
        while ((r = sd_bus_message_enter_container(m, 'e', "sv")) > 0) {
                const BusOption *o;
                const char *key;

                r = sd_bus_message_read(m, "s", &key);
                if (r < 0)
                        return r;
                for (o = options; o->name; o++)
                        if (streq(o->name, key))
                                break;
                if (!o->name)
                        return unknown_option(method, options, key, error);
                if (seen & (UINT64_C(1) << (o - options)))
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "Option '%s' is given more than once.",
                                o->name);
                seen |= UINT64_C(1) << (o - options);

                r = sd_bus_message_enter_container(m, 'v', o->type);
                if (r < 0)
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "Option '%s' must be of type %s.",
                                o->name, o->type);
                if (streq(o->type, "a{ss}"))
                        r = read_dict(m, o, error);
                else {
                        r = sd_bus_message_read_basic(m, o->type[0], o->ret);
                        if (r >= 0 && o->type[0] == 's' && strlen(*(const char **) o->ret) >= PATH_MAX)
                                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                        "Option '%s' is %zu bytes long or more.", o->name, (size_t) PATH_MAX);
                }
                if (r < 0)
                        return r;
                r = sd_bus_message_exit_container(m);
                if (r < 0)
                        return r;
                if (o->seen)
                        *o->seen = true;
                r = sd_bus_message_exit_container(m);
                if (r < 0)
                        return r;
        }
        if (r < 0)
                return r;
        return sd_bus_message_exit_container(m);
}

int user_groups(uid_t uid, size_t max, gid_t *ret_gid, gid_t **ret_gids, size_t *ret_n) {
        _cleanup_free_ gid_t *gids = NULL;
        struct passwd pw, *pwr = NULL;
        char buf[16384];
        size_t cap = 64;
        int r, n;

        if (max > INT_MAX)
                max = INT_MAX;
        r = getpwuid_r(uid, &pw, buf, sizeof(buf), &pwr);
        if (r != 0 || !pwr)
                return -ESRCH; /* no account: no groups we could vouch for */
        for (;;) {
                gid_t *g;

                cap = MIN(cap, max);
                n = (int) cap;
                g = reallocarray(gids, cap ?: 1, sizeof(gid_t));
                if (!g)
                        return -ENOMEM;
                gids = g;
                if (getgrouplist(pw.pw_name, pw.pw_gid, gids, &n) >= 0)
                        break;
                if ((size_t) n <= cap || cap >= max)
                        return -E2BIG;
                cap = (size_t) n;
        }
        log_debug(
                "User %u: gid %u and %d groups from the user database.", (unsigned) uid, (unsigned) pw.pw_gid, n);
        *ret_gid = pw.pw_gid;
        *ret_n = (size_t) n;
        *ret_gids = TAKE_PTR(gids);
        return 0;
}

int bus_sender_uid(sd_bus_message *msg, uid_t *ret) {
        _cleanup_(sd_bus_creds_unrefp) sd_bus_creds *creds = NULL;
        int r;

        r = sd_bus_query_sender_creds(msg, SD_BUS_CREDS_EUID, &creds);
        if (r < 0)
                return r;
        return sd_bus_creds_get_euid(creds, ret);
}
