/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include "args.h"
#include "blockstream-api.h"
#include "bus.h"
#include "objects.h"
#include "output.h"
#include "progress.h"
#include "verbs-stream.h"

int verb_pull(char **args) {
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = NULL;
        _cleanup_(disk_info_freep) DiskInfo *d = NULL;
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *m = NULL, *reply = NULL;
        _cleanup_(wait_state_done) WaitState ws = {.guest = args[0]};
        _cleanup_free_ char *base = NULL, *verb = NULL;
        uint64_t end;
        int r;

        r = check_disk_args(args);
        if (r != 0)
                return r;
        if (add_overflows_u64(arg_offset, arg_length, &end))
                return usage_error("--offset= plus --length= overflows.");
        if (arg_base) {
                /* A node name has no slash; a file name is made absolute like every other path. */
                if (strchr(arg_base, '/')) {
                        r = local_path_arg(arg_base, &base);
                        if (r < 0)
                                return r;
                } else {
                        base = strdup(arg_base);
                        if (!base)
                                return log_oom();
                }
        }

        r = connect_disk(args[0], args[1], &bus, &d);
        if (r != 0)
                return r;

        if (arg_wait) {
                r = wait_subscribe(&ws, bus, d);
                if (r < 0)
                        return r;
        }

        r = new_call(bus, d->object, STREAM_INTERFACE, BS_STREAM_METHOD_START, &m);
        if (r < 0)
                return r;
        r = sd_bus_message_append(m, "tt", arg_offset, arg_length);
        if (r >= 0)
                r = append_options_begin(m);
        if (r >= 0 && (arg_given & OPT_BANDWIDTH))
                r = sd_bus_message_append(m, "{sv}", BS_OPTION_BANDWIDTH, "t", arg_bandwidth);
        if (r >= 0 && base)
                r = sd_bus_message_append(m, "{sv}", BS_OPTION_BASE, "s", base);
        if (r >= 0 && (arg_given & OPT_MAX_GUEST_LATENCY))
                r = sd_bus_message_append(m, "{sv}", BS_OPTION_MAX_GUEST_LATENCY, "t", arg_max_guest_latency);
        if (r >= 0 && arg_engine)
                r = sd_bus_message_append(m, "{sv}", BS_OPTION_ENGINE, "s", arg_engine);
        if (r >= 0)
                r = sd_bus_message_close_container(m);
        if (r < 0)
                return log_error_errno(r, "Failed to append Start arguments: %m");

        verb = strdup_printf("start streaming %s of guest '%s'", strempty(d->device), args[0]);
        if (!verb)
                return log_oom();
        r = call(bus, m, ACTION_STREAM, SLOW_CALL_TIMEOUT, verb, &reply);
        if (r < 0)
                return r;

        if (!arg_wait) {
                if (!arg_quiet)
                        log_info("Streaming %s of guest %s in the background; 'blockstreamctl wait %s %s' follows it.",
                                strempty(d->device), args[0], args[0], strempty(d->device));
                return 0;
        }

        r = sd_bus_message_get_cookie(reply, &ws.min_cookie);
        if (r < 0)
                return log_parse_error(r);
        /* Progress of this job, for the bar; the end still comes as Finished. */
        r = disk_info_refresh(bus, d, NULL);
        if (r < 0)
                return r;
        return wait_loop(&ws, false);
}

int verb_wait(char **args) {
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = NULL;
        _cleanup_(disk_info_freep) DiskInfo *d = NULL;
        _cleanup_(wait_state_done) WaitState ws = {.guest = args[0]};
        int r;

        r = check_disk_args(args);
        if (r != 0)
                return r;
        r = connect_disk(args[0], args[1], &bus, &d);
        if (r != 0)
                return r;
        r = wait_subscribe(&ws, bus, d);
        if (r < 0)
                return r;
        /* Read the state only now that we are subscribed: a job ending in between shows here or
         * in a signal newer than this reply. */
        r = disk_info_refresh(bus, d, &ws.min_cookie);
        if (r < 0)
                return r;
        if (!state_is_active(d->state)) {
                r = set_finished(&ws, isempty(d->state) ? BS_STATE_IDLE : d->state, d->bytes_done, strempty(d->error));
                if (r < 0)
                        return log_oom();
                return report_result(&ws, false);
        }
        return wait_loop(&ws, false);
}

/* A method on one disk: Pause, Resume, Cancel (value NULL) or SetBandwidth (*value). With
 * follow (cancel --wait), waits for the job to end; a job ending as cancelled is a success. */
static int simple_disk_call(char **args, const char *member, const char *what, const uint64_t *value, bool follow) {
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = NULL;
        _cleanup_(disk_info_freep) DiskInfo *d = NULL;
        _cleanup_(wait_state_done) WaitState ws = {.guest = args[0]};
        _cleanup_free_ char *verb = NULL;
        int r;

        r = check_disk_args(args);
        if (r != 0)
                return r;
        r = connect_disk(args[0], args[1], &bus, &d);
        if (r != 0)
                return r;
        if (follow) {
                r = wait_subscribe(&ws, bus, d);
                if (r < 0)
                        return r;
        }
        verb = strdup_printf("%s %s of guest '%s'", what, strempty(d->device), args[0]);
        if (!verb)
                return log_oom();
        /* min_cookie stays 0: the Finished of the job we cancel may come before Cancel's reply. */
        if (value)
                r = call_simple(bus, d->object, STREAM_INTERFACE, member, ACTION_STREAM, 0, verb, NULL, "t", *value);
        else
                r = call_simple(bus, d->object, STREAM_INTERFACE, member, ACTION_STREAM, 0, verb, NULL, NULL);
        if (r < 0 || !follow)
                return r;
        return wait_loop(&ws, true);
}

int verb_pause(char **args) {
        return simple_disk_call(args, BS_STREAM_METHOD_PAUSE, "pause streaming", NULL, false);
}

int verb_resume(char **args) {
        return simple_disk_call(args, BS_STREAM_METHOD_RESUME, "resume streaming", NULL, false);
}

int verb_cancel(char **args) {
        return simple_disk_call(args, BS_STREAM_METHOD_CANCEL, "cancel streaming", NULL, arg_wait);
}

int verb_set_bandwidth(char **args) {
        uint64_t bw;
        int r;

        r = parse_bandwidth(args[2], &bw);
        if (r < 0)
                return usage_error("Invalid bandwidth '%s': expected SIZE[/s] such as 50M, 1.5GiB/s or 0 for "
                                   "unlimited.",
                        args[2]);
        return simple_disk_call(args, BS_STREAM_METHOD_SET_BANDWIDTH, "set the bandwidth of", &bw, false);
}

int verb_set_latency(char **args) {
        uint64_t usec;
        int r;

        r = parse_latency(args[2], &usec);
        if (r < 0)
                return usage_error("Invalid latency '%s': expected a duration such as 2ms, 500us, 0.5s, or 0 or 'off' "
                                   "to turn the guest-latency mode off.",
                        args[2]);
        return simple_disk_call(
                args, BS_STREAM_METHOD_SET_MAX_GUEST_LATENCY, "set the guest latency target of", &usec, false);
}
