/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <signal.h>

#include "args.h"
#include "blockstream-api.h"
#include "bus.h"
#include "output.h"
#include "progress.h"

static volatile sig_atomic_t interrupted = 0;

static void on_sigint(int sig) {
        interrupted = sig;
}

static bool signal_is_stale(const WaitState *ws, sd_bus_message *m) {
        uint64_t cookie;

        if (ws->min_cookie == 0 || sd_bus_message_get_cookie(m, &cookie) < 0)
                return false;
        return cookie < ws->min_cookie;
}

int set_finished(WaitState *ws, const char *result, uint64_t bytes_done, const char *error) {
        ws->result = strdup(result);
        ws->error = strdup(error);
        if (!ws->result || !ws->error)
                return -ENOMEM;
        ws->bytes_done = bytes_done;
        ws->finished = true;
        return 0;
}

static int on_finished(sd_bus_message *m, void *userdata, _unused_ sd_bus_error *ret_error) {
        WaitState *ws = userdata;
        const char *result, *error;
        uint64_t bytes_done;
        int r;

        if (ws->finished || signal_is_stale(ws, m))
                return 0;
        r = sd_bus_message_read(m, "sts", &result, &bytes_done, &error);
        if (r < 0) {
                ws->r = log_parse_error(r);
                return 0;
        }
        r = set_finished(ws, result, bytes_done, error);
        if (r < 0)
                ws->r = log_oom();
        return 0;
}

static int on_properties_changed(sd_bus_message *m, void *userdata, _unused_ sd_bus_error *ret_error) {
        WaitState *ws = userdata;
        DiskInfo *d = ws->disk;
        const char *iface;
        int r;

        if (ws->finished || signal_is_stale(ws, m))
                return 0;
        r = sd_bus_message_read(m, "s", &iface);
        if (r < 0 || !streq(iface, STREAM_INTERFACE))
                return 0;
        r = disk_info_update(m, d);
        if (r >= 0) {
                r = sd_bus_message_enter_container(m, 'a', "s");
                if (r >= 0)
                        r = sd_bus_message_at_end(m, false);
                /* Invalidated properties come without values: fetch them all again. */
                if (r == 0)
                        r = disk_info_refresh(ws->bus, d, NULL);
        }
        if (r < 0) {
                ws->r = log_parse_error(r);
                return 0;
        }
        if (state_is_terminal(d->state)) {
                if (ws->terminal_seen == 0)
                        ws->terminal_seen = now_usec(CLOCK_MONOTONIC);
        } else
                ws->terminal_seen = 0;
        return 0;
}

static int on_name_owner_changed(sd_bus_message *m, void *userdata, _unused_ sd_bus_error *ret_error) {
        WaitState *ws = userdata;
        const char *name, *old_owner, *new_owner;

        if (sd_bus_message_read(m, "sss", &name, &old_owner, &new_owner) >= 0 && streq(name, BUS_NAME) &&
                isempty(new_owner))
                ws->daemon_gone = true;
        return 0;
}

int wait_subscribe(WaitState *ws, sd_bus *bus, DiskInfo *d) {
        int r;

        ws->bus = bus;
        ws->disk = d;
        r = sd_bus_match_signal(ws->bus, &ws->slots[0], BUS_NAME, ws->disk->object, STREAM_INTERFACE,
                BS_STREAM_SIGNAL_FINISHED, on_finished, ws);
        if (r < 0)
                return log_error_errno(r, "Failed to subscribe to Finished: %m");
        r = sd_bus_match_signal(ws->bus, &ws->slots[1], BUS_NAME, ws->disk->object, PROPERTIES_IFACE,
                "PropertiesChanged", on_properties_changed, ws);
        if (r < 0)
                return log_error_errno(r, "Failed to subscribe to PropertiesChanged: %m");
        r = sd_bus_add_match(ws->bus, &ws->slots[2],
                "type='signal',sender='org.freedesktop.DBus',path='/org/freedesktop/DBus',"
                "interface='org.freedesktop.DBus',member='NameOwnerChanged',arg0='" BUS_NAME "'",
                on_name_owner_changed, ws);
        if (r < 0)
                return log_error_errno(r, "Failed to subscribe to NameOwnerChanged: %m");
        return 0;
}

static void clear_progress(WaitState *ws) {
        if (ws->drawn) {
                fputs("\r\x1b[K", stderr);
                fflush(stderr);
                ws->drawn = false;
        }
}

static void draw_progress(WaitState *ws) {
        const DiskInfo *d = ws->disk;
        char a[FORMAT_BYTES_MAX], b[FORMAT_BYTES_MAX], rate[64], eta[64], guest[128], text[320];
        unsigned p = percent(d->bytes_done, d->bytes_total), columns, cells = 0;
        bool utf8 = utf8_enabled();
        size_t text_len;

        if (!ws->draw)
                return;
        eta[0] = 0;
        if (streq_ptr(d->state, BS_STATE_PAUSED))
                snprintf(rate, sizeof(rate), "paused");
        else {
                usec_t now = now_usec(CLOCK_REALTIME);

                format_rate(rate, sizeof(rate), d->rate, NULL);
                if (d->expected_end_time > now) {
                        char s[64];
                        snprintf(eta, sizeof(eta), "  ETA %s",
                                format_timespan(s, sizeof(s), d->expected_end_time - now));
                } else if (d->rate > 0 && d->bytes_total > d->bytes_done) {
                        char s[64];
                        snprintf(eta, sizeof(eta), "  ETA %s",
                                format_timespan(
                                        s, sizeof(s), (d->bytes_total - d->bytes_done) / d->rate * USEC_PER_SEC));
                }
        }
        guest[0] = 0;
        if (!isempty(d->throttle_reason) && !streq(d->throttle_reason, BS_THROTTLE_OFF)) {
                /* The guest-latency mode: the guest's p99, the limit it set, and why. */
                char l[32], s[64];

                snprintf(guest, sizeof(guest), "  p99 %s  limit %s (%s)",
                        d->guest_read_p99 > 0 ? format_latency(l, sizeof(l), d->guest_read_p99) : "-",
                        format_rate(s, sizeof(s), d->speed_limit, "none"), d->throttle_reason);
        }
        snprintf(text, sizeof(text), " %3u%%  %s/%s  %s%s%s", p, format_bytes(a, sizeof(a), d->bytes_done),
                format_bytes(b, sizeof(b), d->bytes_total), rate, eta, guest);

        text_len = strlen(text) + strlen(strempty(d->device)) + 3;
        columns = terminal_columns(STDERR_FILENO);
        if (columns > text_len + 10)
                cells = (unsigned) MIN((size_t) 40, columns - text_len - 1);

        fprintf(stderr, "\r%s [", strempty(d->device));
        for (unsigned i = 0; i < cells; i++) {
                bool full = (uint64_t) i * 100 < (uint64_t) p * cells;
                fputs(full ? (utf8 ? "\u2588" : "#") : (utf8 ? "\u2591" : "-"), stderr);
        }
        fprintf(stderr, "]%s\x1b[K", text);
        fflush(stderr);
        ws->drawn = true;
}

int report_result(WaitState *ws, bool after_cancel) {
        const DiskInfo *d = ws->disk;
        char a[FORMAT_BYTES_MAX], b[FORMAT_BYTES_MAX];
        const char *device = !isempty(d->device) ? d->device : d->object;
        int ret;

        clear_progress(ws);

        if (streq(ws->result, BS_STATE_COMPLETED) || (after_cancel && streq(ws->result, BS_STATE_CANCELLED)))
                ret = 0;
        else
                ret = 1;

        if (arg_json) {
                JsonWriter w = {.f = stdout};

                json_open(&w, '{');
                json_key(&w, "result");
                json_string(&w, ws->result);
                json_key(&w, "bytes_done");
                json_unsigned(&w, ws->bytes_done);
                json_key(&w, "error");
                json_string(&w, ws->error);
                json_close(&w, '}');
        }

        if (streq(ws->result, BS_STATE_COMPLETED)) {
                if (!arg_json && !arg_quiet)
                        printf("Stream of %s (guest %s) completed: %s copied.\n", device, ws->guest,
                                format_bytes(a, sizeof(a), ws->bytes_done));
        } else if (streq(ws->result, BS_STATE_CANCELLED)) {
                if (ret != 0)
                        log_error("Stream of %s (guest %s) was cancelled after %s of %s.", device, ws->guest,
                                format_bytes(a, sizeof(a), ws->bytes_done), format_bytes(b, sizeof(b), d->bytes_total));
                else if (!arg_json && !arg_quiet)
                        printf("Stream of %s (guest %s) cancelled after %s; what was copied stays.\n", device,
                                ws->guest, format_bytes(a, sizeof(a), ws->bytes_done));
        } else if (streq(ws->result, BS_STATE_IDLE)) {
                if (!arg_quiet)
                        log_info("No stream job has run on %s (guest %s).", device, ws->guest);
        } else
                log_error("Stream of %s (guest %s) %s after %s of %s: %s", device, ws->guest, ws->result,
                        format_bytes(a, sizeof(a), ws->bytes_done), format_bytes(b, sizeof(b), d->bytes_total),
                        isempty(ws->error) ? "no reason given" : ws->error);
        return ret;
}

int wait_loop(WaitState *ws, bool after_cancel) {
        struct sigaction sa = {.sa_handler = on_sigint}, old_int, old_term;
        int r = 0;

        /* No SA_RESTART: the signal must interrupt sd_bus_wait(). */
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGINT, &sa, &old_int) < 0 || sigaction(SIGTERM, &sa, &old_term) < 0)
                return log_error_errno(errno, "Failed to install signal handler: %m");

        ws->draw = isatty(STDERR_FILENO) && !arg_quiet;
        for (;;) {
                if (ws->r < 0) {
                        r = ws->r;
                        break;
                }
                if (ws->finished) {
                        r = 0;
                        break;
                }
                if (interrupted) {
                        clear_progress(ws);
                        log_error("Stopped waiting; the stream job of %s goes on.", strempty(ws->disk->device));
                        log_info("'blockstreamctl status %s %s' shows it, 'blockstreamctl cancel %s %s' stops it.",
                                ws->guest, strempty(ws->disk->device), ws->guest, strempty(ws->disk->device));
                        r = EXIT_INTERRUPTED;
                        break;
                }
                if (ws->daemon_gone) {
                        clear_progress(ws);
                        r = log_error_errno(ECONNRESET,
                                "blockstreamd went away while waiting; the job may still "
                                "run in QEMU. Check with 'blockstreamctl status %s'.",
                                ws->guest);
                        break;
                }
                /* The contract promises Finished; do not hang if a server forgets it. */
                if (ws->terminal_seen > 0 && now_usec(CLOCK_MONOTONIC) - ws->terminal_seen > 2 * USEC_PER_SEC) {
                        r = set_finished(ws, ws->disk->state, ws->disk->bytes_done, strempty(ws->disk->error));
                        if (r < 0) {
                                r = log_oom();
                                break;
                        }
                        continue;
                }

                r = sd_bus_process(ws->bus, NULL);
                if (r < 0) {
                        clear_progress(ws);
                        r = log_error_errno(r, "Failed to process bus messages while waiting: %m");
                        break;
                }
                if (r > 0)
                        continue;

                draw_progress(ws);
                /* Wake up twice a second for the ETA countdown and for a Ctrl-C that came just
                 * before the wait began. */
                r = sd_bus_wait(ws->bus, USEC_PER_SEC / 2);
                if (r < 0 && r != -EINTR) {
                        clear_progress(ws);
                        r = log_error_errno(r, "Failed to wait for bus messages: %m");
                        break;
                }
                r = 0;
        }
        (void) sigaction(SIGINT, &old_int, NULL);
        (void) sigaction(SIGTERM, &old_term, NULL);

        if (r != 0)
                return r;
        return report_result(ws, after_cancel);
}

void wait_state_done(WaitState *ws) {
        for (size_t i = 0; i < ELEMENTSOF(ws->slots); i++)
                ws->slots[i] = sd_bus_slot_unref(ws->slots[i]);
        free(ws->result);
        free(ws->error);
}
