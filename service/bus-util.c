/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <limits.h>

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
