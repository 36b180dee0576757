/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <stdarg.h>

#include "args.h"
#include "blockstream-api.h"
#include "bus.h"
#include "polkit-agent.h"
#include "util.h"

/* action: the polkit action the server checked, for the hint when it wanted to ask for a password. */
static int log_bus_error(const sd_bus_error *error, int r, const char *verb, const char *action) {
        if (sd_bus_error_has_name(error, SD_BUS_ERROR_INTERACTIVE_AUTHORIZATION_REQUIRED)) {
                log_error("Failed to %s: %s", verb, error->message ?: error->name);
                return log_error_errno(r,
                        "Authentication is required; run as root, or on a terminal without --no-ask-password, or "
                        "ask an administrator to grant you %s (see blockstreamctl --help).",
                        action ?: "the " BUS_NAME " action");
        }
        if (sd_bus_error_has_names(error, SD_BUS_ERROR_SERVICE_UNKNOWN, SD_BUS_ERROR_NAME_HAS_NO_OWNER))
                return log_error_errno(
                        r, "Failed to %s: blockstreamd is not running (" BUS_NAME " not on the bus).", verb);
        if (r == -ENOTCONN || r == -ECONNRESET) {
                if (arg_host)
                        return log_error_errno(
                                r, "Failed to %s: the connection to the system bus on %s failed: %m", verb, arg_host);
                return log_error_errno(r, "Failed to %s: the connection to the system bus failed: %m", verb);
        }
        if (sd_bus_error_is_set(error))
                /* The server's messages are written for people: print them as they are. */
                return log_error_errno(r, "Failed to %s: %s", verb, error->message ?: error->name);
        return log_error_errno(r, "Failed to %s: %m", verb);
}

int connect_bus(sd_bus **ret) {
        sd_bus *bus = NULL;
        int r;

        if (arg_host)
                r = sd_bus_open_system_remote(&bus, arg_host);
        else
                r = sd_bus_open_system(&bus);
        if (r < 0) {
                const char *addr = getenv("DBUS_SYSTEM_BUS_ADDRESS");

                if (arg_host)
                        return log_error_errno(r, "Failed to connect to the system bus on %s: %m", arg_host);
                if (addr)
                        return log_error_errno(r, "Failed to connect to the system bus at %s: %m", addr);
                return log_error_errno(r, "Failed to connect to the system bus: %m");
        }
        /* Lets polkit ask for a password, on this terminal through the agent that call() starts
         * (with --host, through an agent on that host if there is one). */
        if (arg_ask_password && isatty(STDIN_FILENO)) {
                r = sd_bus_set_allow_interactive_authorization(bus, true);
                if (r < 0) {
                        sd_bus_flush_close_unref(bus);
                        return log_error_errno(r, "Failed to allow interactive authorization: %m");
                }
        }
        *ret = bus;
        return 0;
}

int new_call(sd_bus *bus, const char *path, const char *iface, const char *member, sd_bus_message **ret) {
        int r;

        r = sd_bus_message_new_method_call(bus, ret, BUS_NAME, path, iface, member);
        if (r < 0)
                return log_error_errno(r, "Failed to create %s call: %m", member);
        return 0;
}

int call(sd_bus *bus, sd_bus_message *m, const char *action, uint64_t timeout, const char *verb,
        sd_bus_message **reply) {
        _cleanup_(sd_bus_error_free) sd_bus_error error = SD_BUS_ERROR_NULL;
        int r;

        if (action)
                polkit_agent_acquire();
        r = sd_bus_call(bus, m, timeout, &error, reply);
        if (action)
                polkit_agent_release();
        if (r < 0)
                return log_bus_error(&error, r, verb, action);
        return 0;
}

int call_simple(sd_bus *bus, const char *path, const char *iface, const char *member, const char *action,
        uint64_t timeout, const char *verb, sd_bus_message **reply, const char *types, ...) {
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *m = NULL;
        va_list ap;
        int r;

        r = new_call(bus, path, iface, member, &m);
        if (r < 0)
                return r;
        if (types) {
                va_start(ap, types);
                r = sd_bus_message_appendv(m, types, ap);
                va_end(ap);
                if (r < 0)
                        return log_error_errno(r, "Failed to append %s arguments: %m", member);
        }
        return call(bus, m, action, timeout, verb, reply);
}

int log_parse_error(int r) {
        return log_error_errno(r, "Failed to parse reply from blockstreamd: %m");
}

int append_options_begin(sd_bus_message *m) {
        return sd_bus_message_open_container(m, 'a', "{sv}");
}
