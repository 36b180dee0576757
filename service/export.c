/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <arpa/inet.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>

#include "bus-error.h"
#include "control.h"
#include "disk.h"
#include "export.h"
#include "export-internal.h"
#include "guest.h"
#include "engine.h"
#include "helper.h"
#include "polkit.h"
#include "qemu.h"
#include "sandbox.h"
#include "state.h"
#include "util.h"

/* Each relay serves up to 64 clients, each a connection to the guest's QEMU, whose NBD server
 * takes 768 (peer.c): 8 exports leave 256 for the guest's own maps, streams and range pulls. */
#define EXPORTS_PER_GUEST_MAX 8U
/* A restored export's TCP address may still be held by the relay of the daemon before us, which
 * dies with it (PR_SET_PDEATHSIG) but maybe not yet: bind again this often and for this long. */
#define REBIND_RETRY_USEC (100 * USEC_PER_MSEC)
#define REBIND_DEADLINE_USEC (10 * USEC_PER_SEC)
/* From the relay's spawn to its "ready": it only sets up its sandbox and says so. A relay that
 * hangs there would keep Export()'s caller waiting for ever. */
#define RELAY_READY_TIMEOUT_USEC (10 * USEC_PER_SEC)
/* A failed export's relay has this long to exit after "stop" before it is killed. */
#define RELAY_STOP_USEC (2 * USEC_PER_SEC)

const char *const export_state_table[] = {
        [EXPORT_STARTING] = "starting",
        [EXPORT_SERVING] = BS_EXPORT_STATE_SERVING,
        [EXPORT_STOPPED] = BS_EXPORT_STATE_STOPPED,
        [EXPORT_FAILED] = BS_EXPORT_STATE_FAILED,
};


/* Export objects */

static void export_emit(Export *e, const char *property) {
        if (e->published)
                (void) sd_bus_emit_properties_changed(e->engine->bus, e->object_path, EXPORT_INTERFACE, property, NULL);
}

/* Clients goes out at most this often: a relay (taken over by a network client) that sends one
 * count after another would otherwise make the daemon flood the system bus with signals. The
 * latest count goes out when its turn comes. */
#define CLIENTS_EMIT_INTERVAL_USEC (USEC_PER_SEC / 4)

static int clients_timer_handler(sd_event_source *s, uint64_t usec, void *userdata) {
        Export *e = userdata;

        e->clients_timer = sd_event_source_disable_unref(e->clients_timer);
        e->clients_emitted = now_usec(CLOCK_MONOTONIC);
        export_emit(e, "Clients");
        return 0;
}

static void export_emit_clients(Export *e) {
        usec_t now = now_usec(CLOCK_MONOTONIC);

        if (e->clients_timer)
                return; /* the timer takes the latest */
        if (now - e->clients_emitted >= CLIENTS_EMIT_INTERVAL_USEC || e->clients_emitted == 0 ||
                sd_event_add_time(e->engine->event, &e->clients_timer, CLOCK_MONOTONIC,
                        e->clients_emitted + CLIENTS_EMIT_INTERVAL_USEC, 0, clients_timer_handler, e) < 0) {
                e->clients_emitted = now;
                export_emit(e, "Clients");
        }
}

static void export_unlink(Export *e) {
        peer_unlisten(&e->guest->peer, &e->listener);
        for (Export **p = &e->engine->exports; *p; p = &(*p)->next)
                if (*p == e) {
                        *p = e->next;
                        return;
                }
}

static Export *export_free(Export *e) {
        if (!e)
                return NULL;
        if (e->guest) {
                peer_unlisten(&e->guest->peer, &e->listener);
                peer_nbd_unwait(&e->guest->peer, e);
        }
        if (e->create_call) {
                (void) sd_bus_reply_method_errorf(e->create_call, BS_ERROR_HELPER_FAILED,
                        "The export of disk '%s' could not be set up.", e->alias);
                sd_bus_message_unref(e->create_call);
        }
        sd_event_source_disable_unref(e->control_source);
        helper_pace_done(&e->control_pace);
        sd_event_source_disable_unref(e->retry_source);
        sd_event_source_disable_unref(e->rebind_source);
        sd_event_source_disable_unref(e->ready_timer);
        sd_event_source_disable_unref(e->clients_timer);
        sd_event_source_disable_unref(e->restart_source);
        helper_release(e->relay_child); /* killed and reaped if still running */
        helper_log_free(e->log);
        closep(&e->control_fd);
        closep(&e->listen_fd);
        export_upstreams_reset(e);
        if (e->unix_path)
                (void) unlink(e->unix_path);
        free(e->unix_path);
        free(e->listen);
        free(e->object_path);
        free(e->alias);
        free(e->disk_path);
        free(e->qemu_id);
        free(e->name);
        free(e->uri);
        free(e->error);
        free(e);
        return NULL;
}

int export_relay_send(Export *e, const ControlCommand *c, int pass_fd) {
        return control_send_command(e->control_fd, MSG_NOSIGNAL | MSG_DONTWAIT, c, pass_fd);
}

/* Persistence: an export that served is served again after a restart (export_restore_all()),
 * until it ends. */

static char *export_state_dir(Engine *m) {
        return strdup_printf("%s/exports", m->state_dir);
}

void export_save(Export *e) {
        _cleanup_free_ char *dir = export_state_dir(e->engine);
        _cleanup_free_ StateExportPin *pins = NULL;
        StateExport s = {
                .id = e->id, .guest = e->guest->name, .guest_uuid = e->guest->uuid, .guest_owner = e->guest->owner,
                .alias = e->alias, .name = e->name, .listen = e->listen
        };
        int r;

        r = export_handoff_pins(e, &pins, &s.n_pins);
        s.pins = pins;
        if (r >= 0)
                r = dir ? state_export_save(dir, &s) : -ENOMEM;
        if (r < 0)
                log_warning_errno(r, "Export %u: failed to save it, it will not survive a restart: %m", e->id);
}

static void export_forget(Export *e) {
        _cleanup_free_ char *dir = export_state_dir(e->engine);
        int r;

        r = dir ? state_export_remove(dir, e->id) : -ENOMEM;
        if (r < 0)
                log_warning_errno(r, "Export %u: failed to remove its state file: %m", e->id);
}

/* Take it out of QEMU, off the bus if asked, and free it. */
void export_end(Export *e, ExportState final, bool remove_object) {
        Guest *g = e->guest;

        export_forget(e);
        if (export_live(e)) {
                e->state = final;
                export_emit(e, "State");
        }
        if (e->control_fd >= 0)
                (void) export_relay_send(e, &(ControlCommand) { .kind = CONTROL_COMMAND_STOP }, -1);
        if (e->in_qemu && guest_qmp_ready(g))
                (void) qemu_block_export_del(g->peer.qmp, e->qemu_id, NULL, NULL, NULL);
        if (e->in_qemu) {
                e->in_qemu = false;
                peer_nbd_drop(&g->peer);
        }
        if (!remove_object) {
                /* A failed export stays visible until Stop(): clean up everything but the object. */
                peer_nbd_unwait(&g->peer, e);
                e->control_source = sd_event_source_disable_unref(e->control_source);
                helper_pace_done(&e->control_pace);
                e->retry_source = sd_event_source_disable_unref(e->retry_source);
                e->rebind_source = sd_event_source_disable_unref(e->rebind_source);
                e->ready_timer = sd_event_source_disable_unref(e->ready_timer);
                e->restart_source = sd_event_source_disable_unref(e->restart_source);
                e->n_pending = 0;
                closep(&e->control_fd);
                e->control_fd = -1;
                /* A TCP address stays ours until Stop(): were it let go when the relay goes, any
                 * local user could bind it and answer the export's clients (a migration's
                 * destination reconnecting) with data of their own. A unix socket's path goes. */
                if (e->unix_path) {
                        closep(&e->listen_fd);
                        e->listen_fd = -1;
                }
                export_upstreams_reset(e);
                /* Told to stop, and its control socket closed: a relay still there then is one
                 * taken over, holding its connections to QEMU. */
                if (e->relay_child)
                        (void) helper_kill_after(e->relay_child, RELAY_STOP_USEC);
                if (e->unix_path)
                        (void) unlink(e->unix_path);
                peer_nbd_server_release_if_unused(&g->peer);
                peer_release_helper_if_idle(&g->peer);
                return;
        }
        if (e->published)
                (void) sd_bus_emit_object_removed(e->engine->bus, e->object_path);
        export_unlink(e);
        export_free(e);
        peer_nbd_server_release_if_unused(&g->peer);
        peer_release_helper_if_idle(&g->peer);
}

void export_fail_error(Export *e, const char *error_name, const char *why) {
        log_warning("Export %u of guest %s disk %s failed: %s", e->id, e->guest->name, e->alias, why);
        if (!e->error) {
                e->error = strdup(why);
                export_emit(e, "Error");
        }
        if (e->create_call) {
                (void) sd_bus_reply_method_errorf(e->create_call, error_name,
                        "Cannot export disk '%s' of guest '%s': %s", e->alias, e->guest->name, why);
                e->create_call = sd_bus_message_unref(e->create_call);
        }
        /* Nobody saw it yet (its Export() call failed, or it could not be restored): drop it. */
        export_end(e, EXPORT_FAILED, !e->published);
}

void export_fail(Export *e, const char *why) {
        export_fail_error(e, BS_ERROR_HELPER_FAILED, why);
}

static int relay_exited(sd_event_source *s, const siginfo_t *si, void *userdata) {
        Export *e = userdata;

        e->relay_pid = 0;
        e->relay_child = sd_event_source_disable_unref(e->relay_child);
        if (export_live(e))
                export_fail(e, si->si_code == CLD_EXITED ? "the NBD relay helper exited" : "the NBD relay helper was killed");
        return 0;
}

/* A relay's messages are read at most this fast after a burst: an honest one says "ready", then a
 * "connect" and a "clients" count for each client that comes (64 at once) and a count for each
 * that goes; one taken over by an NBD client must not keep the daemon (and the bus, with Clients)
 * busy. */
#define CONTROL_RATE 128.0
#define CONTROL_BURST 256.0

/* The relay's control messages: "ready", "connect N", "clients K", "error TEXT". */
static int control_handler(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        Export *e = userdata;
        char buf[CONTROL_MESSAGE_MAX + 1];
        ControlRelayMessage msg;
        const char *why;
        int r, k;

        k = helper_relay_receive(fd, &e->control_pace, &e->control_source, CONTROL_RATE, CONTROL_BURST, buf, &msg,
                &r, &why);
        if (k == 0)
                return 0;
        if (k < 0) {
                if (k != -ECONNRESET || export_live(e))
                        export_fail(e, why);
                return 0;
        }

        if (msg.kind == CONTROL_RELAY_READY) {
                if (e->state != EXPORT_STARTING)
                        return 0;
                e->ready_timer = sd_event_source_disable_unref(e->ready_timer);
                e->state = EXPORT_SERVING;
                if (!e->published) {
                        e->published = true;
                        (void) sd_bus_emit_object_added(e->engine->bus, e->object_path);
                }
                log_info("Guest %s disk %s: %s as %s.", e->guest->name, e->alias,
                        e->restored ? "exported again" : "exported", e->uri);
                if (e->create_call) {
                        (void) sd_bus_reply_method_return(e->create_call, "os", e->object_path, e->uri);
                        e->create_call = sd_bus_message_unref(e->create_call);
                }
                /* The relay accepts on the listener now; ours stays bound until Stop() (below). */
                export_save(e);
        } else if (msg.kind == CONTROL_RELAY_CONNECT) {
                if (r < 0) {
                        export_fail(e, "the NBD relay helper sent a malformed request");
                        return 0;
                }
                export_upstream_connect(e, msg.number);
        } else if (msg.kind == CONTROL_RELAY_CLIENTS) {
                if (r < 0 || msg.number > 1000000) {
                        export_fail(e, "the NBD relay helper sent a malformed count");
                        return 0;
                }
                if (e->clients != (uint32_t) msg.number) {
                        e->clients = (uint32_t) msg.number;
                        export_emit_clients(e);
                }
        } else if (msg.kind == CONTROL_RELAY_ERROR) {
                char text[TEXT_SANITIZE_MAX + 1];
                uint64_t dropped;

                /* The first, then at most one a minute, with a count: a relay taken over could push
                 * the daemon past journald's rate limit, which drops all the daemon's messages. */
                if (!log_limit_minutely(&e->relay_errors, now_usec(CLOCK_MONOTONIC), &dropped))
                        return 0;
                (void) text_sanitize_buf(text, sizeof(text), msg.text, msg.text_len);
                log_warning("Export %u relay: %s (%" PRIu64 " more in the last minute, not logged)", e->id, text,
                        dropped);
        } else
                export_fail(e, "the NBD relay helper sent an unknown message");
        return 0;
}

/* A client whose host went away (no FIN, no RST) holds one of the relay's 64 places until TCP
 * notices: with keepalive on the listener (accepted sockets inherit it), after 60 s of silence and
 * 6 probes 10 s apart. A client that is there but idle keeps its place. */
static int tcp_keepalive(int fd) {
        const int one = 1, idle = 60, interval = 10, count = 6;

        if (setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one)) < 0 ||
                setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle)) < 0 ||
                setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval, sizeof(interval)) < 0 ||
                setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &count, sizeof(count)) < 0)
                return -errno;
        return 0;
}

/* The user's listening socket: unix in the guest's runtime dir, or TCP (numeric, no DNS). */
static int listen_socket(Export *e, const char *spec_listen, char **ret_uri, sd_bus_error *error) {
        Guest *g = e->guest;
        _cleanup_close_ int fd = -1;
        int r;

        if (streq(spec_listen, "unix")) {
                struct sockaddr_un sa = { .sun_family = AF_UNIX };
                _cleanup_free_ char *path = NULL;

                r = guest_ensure_runtime_dir(g);
                if (r < 0)
                        return sd_bus_error_set_errnof(error, -r, "Cannot create the guest's runtime directory: %m");
                path = strdup_printf("%s/%s-%u.nbd", g->runtime_dir, e->alias, e->id);
                if (!path)
                        return -ENOMEM;
                if (strlen(path) >= sizeof(sa.sun_path))
                        return sd_bus_error_setf(error, SD_BUS_ERROR_LIMITS_EXCEEDED, "Socket path %s is too long.", path);
                strcpy(sa.sun_path, path);
                fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
                if (fd < 0)
                        return -errno;
                (void) unlink(path);
                if (bind(fd, (struct sockaddr *) &sa, sizeof(sa)) < 0 || listen(fd, 16) < 0)
                        return sd_bus_error_set_errnof(error, errno, "Cannot listen on %s: %m", path);
                *ret_uri = strdup_printf("nbd+unix:///%s?socket=%s", e->name, path);
                e->unix_path = TAKE_PTR(path);
        } else {
                /* "tcp:ADDR:PORT": ADDR an IPv4 address or [IPv6]. */
                _cleanup_free_ char *host = NULL;
                const char *spec = spec_listen + 4, *colon, *port;
                struct addrinfo hints = { .ai_flags = AI_NUMERICHOST | AI_NUMERICSERV | AI_PASSIVE, .ai_socktype = SOCK_STREAM }, *ai = NULL;
                int one = 1;

                if (spec[0] == '[') {
                        const char *close_br = strchr(spec, ']');
                        if (!close_br || close_br[1] != ':')
                                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "Bad listen address '%s'.", spec_listen);
                        host = strndup(spec + 1, (size_t) (close_br - spec - 1));
                        port = close_br + 2;
                } else {
                        colon = strrchr(spec, ':');
                        if (!colon)
                                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "Bad listen address '%s'.", spec_listen);
                        host = strndup(spec, (size_t) (colon - spec));
                        port = colon + 1;
                }
                if (!host)
                        return -ENOMEM;
                r = getaddrinfo(host, port, &hints, &ai);
                if (r != 0 || !ai)
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "Bad listen address '%s': %s", spec_listen,
                                gai_strerror(r));
                fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
                if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 || tcp_keepalive(fd) < 0 ||
                        bind(fd, ai->ai_addr, ai->ai_addrlen) < 0 || listen(fd, 16) < 0) {
                        r = errno;
                        freeaddrinfo(ai);
                        return sd_bus_error_set_errnof(error, r, "Cannot listen on %s: %m", spec_listen + 4);
                }
                *ret_uri = ai->ai_family == AF_INET6 ? strdup_printf("nbd://[%s]:%s/%s", host, port, e->name)
                                                     : strdup_printf("nbd://%s:%s/%s", host, port, e->name);
                freeaddrinfo(ai);
        }
        if (!*ret_uri)
                return -ENOMEM;
        e->listen_fd = TAKE_FD(fd);
        return 0;
}

int export_listen_valid(const char *listen, sd_bus_error *error) {
        const char *p;

        if (streq(listen, "unix"))
                return 0;
        if (strncmp(listen, "tcp:", 4) != 0 || strlen(listen) > 64)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                        "Option 'listen' must be \"unix\" or \"tcp:ADDR:PORT\", got '%.64s'.", listen);
        p = strrchr(listen, ':');
        if (!p || p == listen + 3 || !p[1] || strspn(p + 1, "0123456789") != strlen(p + 1) || atoi(p + 1) < 1 ||
                atoi(p + 1) > 65535)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                        "Option 'listen' needs a port 1-65535: \"tcp:ADDR:PORT\", got '%.64s'.", listen);
        return 0;
}

static int relay_ready_timeout(sd_event_source *s, uint64_t usec, void *userdata) {
        Export *e = userdata;

        e->ready_timer = sd_event_source_disable_unref(e->ready_timer);
        if (e->state == EXPORT_STARTING)
                export_fail(e, "the NBD relay helper did not start within 10 s");
        return 0;
}

static int spawn_relay(Export *e) {
        Engine *m = e->engine;
        Guest *g = e->guest;
        _cleanup_free_ char *label = NULL, *prefix = strdup_printf("Guest %s export %u relay", g->name, e->id),
                            *a_export = strdup_printf("--export=%s", e->name);
        /* The relay pins the export: QEMU's one server also carries the guest's other disks and
         * our private map and range exports. */
        char *argv[] = { (char *) RELAY_BINARY, a_export, NULL };
        int r;

        if (!prefix || !a_export)
                return -ENOMEM;
        /* The relay touches no image: a plain s0 type, so that clients with a range can talk to it. */
        r = sandbox_selinux_plain_label(config_selinux_relay_type(&m->config), &label);
        if (r < 0)
                return r;
        export_upstreams_reset(e); /* a new relay holds none */
        r = guest_spawn_helper(g, RELAY_BINARY, argv, e->listen_fd, label, prefix, relay_exited, e, &e->relay_pid,
                &e->relay_child, &e->control_fd, &e->log);
        if (r < 0)
                return r;
        r = sd_event_add_time_relative(m->event, &e->ready_timer, CLOCK_MONOTONIC, RELAY_READY_TIMEOUT_USEC, 0,
                relay_ready_timeout, e);
        if (r < 0)
                return r;
        return sd_event_add_io(m->event, &e->control_source, e->control_fd, EPOLLIN, control_handler, e);
}

static void export_start_relay(Export *e) {
        int r;

        if (e->listen_fd < 0) {
                /* A restored export whose address is not ours again yet (rebind_handler). */
                e->relay_wanted = true;
                return;
        }
        e->relay_wanted = false;
        r = spawn_relay(e);
        if (r < 0) {
                _cleanup_free_ char *why = strdup_printf("cannot start the NBD relay helper: %s", strerror(-r));
                export_fail(e, why ?: "cannot start the NBD relay helper");
        }
}

void export_added(Qmp *q, int error, const char *desc, void *userdata) {
        Export *e = export_ref_live(userdata);

        /* Failed (its hold on the server dropped, block-export-del sent), or gone, meanwhile: no
         * relay for it, nor another drop. */
        if (!e || !e->in_qemu)
                return;
        if (error < 0) {
                _cleanup_free_ char *why = strdup_printf("QEMU refused the export: %s", desc ?: strerror(-error));
                peer_nbd_drop(&e->guest->peer);
                e->in_qemu = false;
                if (export_helper_lost_in_call(e, error, desc ?: "the storage helper went away"))
                        return; /* it died under the command: a restart covers it */
                export_fail(e, why ?: "QEMU refused the export");
                return;
        }
        if (e->relay_pid > 0) {
                /* Handed over: the relay kept the address and its clients; they reach the
                 * storage helper's server from now on. */
                e->handing_over = false;
                e->helper_serving_since = now_usec(CLOCK_MONOTONIC);
                log_info("Export %u of guest %s disk %s: served by the storage helper now, still at %s.", e->id,
                        e->guest->name, e->alias, e->uri);
                return;
        }
        if (e->handed_over)
                e->helper_serving_since = now_usec(CLOCK_MONOTONIC); /* handed over again after a restart */
        export_start_relay(e);
        /* Answered when the relay says "ready" (control_handler) or dies. */
}

Export *export_by_id(Engine *m, unsigned id) {
        for (Export *i = m->exports; i; i = i->next)
                if (i->id == id)
                        return i;
        return NULL;
}

ExportRef *export_ref_new(const Export *e) {
        ExportRef *ref = malloc(sizeof(ExportRef));

        if (ref)
                *ref = (ExportRef) { .engine = e->engine, .id = e->id };
        return ref;
}

Export *export_ref_live(const ExportRef *ref) {
        Export *e = export_by_id(ref->engine, ref->id);

        return e && export_live(e) ? e : NULL;
}

void export_backend_ready(Guest *g, int error, const char *error_text, void *userdata) {
        Export *e = export_by_id(g->engine, EXPORT_REF_ID(userdata));

        /* The export may have been dropped while the storage helper started; or it failed (its
         * relay died), and the helper started for it must not be kept (nor the handoff). */
        if (!e || e->guest != g || !export_live(e)) {
                peer_release_helper_if_idle(&g->peer);
                return;
        }
        if (error < 0) {
                if (export_helper_restartable(e)) {
                        export_helper_died(e, error_text ?: "the storage helper could not take the disks");
                        return;
                }
                export_fail(e, error_text
                                       ?: (g->offline || g->handoff ? "the storage helper could not take the disks"
                                                                    : "the guest is not running"));
                return;
        }
        /* What a handoff may open later, while QEMU shows it (it names the paths). */
        if (!g->offline && !g->handoff)
                guest_pin_disks(g);
        /* The storage helper's nodes are ours, named by us; a running guest's QEMU may be
         * managed by others too: its disks are read again first. */
        export_qemu_add(e, !g->offline && !g->handoff);
}

static bool export_name_taken(Guest *g, const char *name) {
        for (Export *e = g->engine->exports; e; e = e->next)
                if (e->guest == g && streq(e->name, name))
                        return true;
        return false;
}

/* The guest's QMP peer went away: the export in it is gone. */
static void export_peer_lost(void *userdata) {
        Export *e = userdata;
        Guest *g = e->guest;
        int r;

        e->in_qemu = false;
        if (export_helper_restartable(e)) {
                export_helper_died(e, peer_lost_reason(&g->peer) ?: "the storage helper went away");
                return;
        }
        /* A running guest's QEMU went away (the source after a migration, say): its clients
         * (a destination reading its disk) must not notice. Once only: a helper that dies fails
         * the export. */
        if (e->state == EXPORT_SERVING && !g->offline && !e->handed_over) {
                e->handed_over = e->handing_over = true;
                r = guest_begin_handoff(g);
                if (r >= 0) {
                        export_save(e); /* a restarted daemon hands it over again */
                        r = guest_when_ready(g, export_backend_ready, EXPORT_REF(e), NULL);
                }
                if (r >= 0)
                        return;
                e->handing_over = false;
                log_warning_errno(
                        r, "Export %u of guest %s: cannot hand it over to the storage helper: %m", e->id, g->name);
        }
        if (export_live(e))
                export_fail(e, peer_lost_reason(&g->peer)
                                       ?: (g->offline || e->handed_over ? "the storage helper went away"
                                                                        : "the QMP connection to QEMU was lost"));
}

/* The guest goes away: stop and forget the export. */
static void export_peer_removed(void *userdata) {
        export_end(userdata, EXPORT_STOPPED, true);
}

/* An export keeps an offline guest's storage helper while it serves. */
static bool export_peer_busy(void *userdata) {
        Export *e = userdata;
        return export_live(e);
}

static int export_new(Guest *g, unsigned id, const char *alias, const char *disk_path, const char *name,
        const char *listen, Export **ret) {
        Export *e;

        e = calloc(1, sizeof(Export));
        if (!e)
                return -ENOMEM;
        e->engine = g->engine;
        e->guest = g;
        e->listen_fd = e->control_fd = e->upstreams_epoll_fd = e->upstreams_sentinel_fd = -1;
        e->id = id;
        e->alias = strdup(alias);
        e->disk_path = strdup(disk_path);
        e->qemu_id = strdup_printf("bsx-%u", e->id);
        if (name)
                e->name = strdup(name);
        else
                e->name = export_name_taken(g, alias) ? strdup_printf("%s-%u", alias, e->id) : strdup(alias);
        e->object_path = strdup_printf(EXPORT_PATH_PREFIX "/%u", e->id);
        e->listen = strdup(listen);
        if (!e->alias || !e->disk_path || !e->qemu_id || !e->name || !e->object_path || !e->listen) {
                export_free(e);
                return -ENOMEM;
        }
        e->listener = (PeerListener) {
                .userdata = e,
                .lost = export_peer_lost,
                .export_deleted = export_qemu_export_deleted,
                .busy = export_peer_busy,
                .removed = export_peer_removed,
        };
        *ret = e;
        return 0;
}

static void export_link(Export *e) {
        e->next = e->engine->exports;
        e->engine->exports = e;
        peer_listen(&e->guest->peer, &e->listener);
}

int export_create(Guest *g, const char *alias, const char *disk_path, sd_bus_message *msg, const char *listen,
        sd_bus_error *error) {
        Engine *m = g->engine;
        _cleanup_free_ char *uri = NULL;
        unsigned n = 0;
        Export *e;
        int r;

        if (!guest_qmp_ready(g) && !g->offline)
                return sd_bus_error_setf(error, BS_ERROR_NOT_RUNNING,
                        "Guest '%s' is not running (no QMP connection); its disks cannot be exported now.", g->name);

        /* A failed one counts while its relay is there, or its TCP address is held (until Stop()). */
        for (Export *x = m->exports; x; x = x->next)
                n += x->guest == g && (export_live(x) || x->relay_pid > 0 || x->listen_fd >= 0);
        if (n >= EXPORTS_PER_GUEST_MAX)
                return sd_bus_error_setf(error, BS_ERROR_BUSY,
                        "Guest '%s' has %u exports, the most it may have (their clients share the connections of "
                        "QEMU's NBD server with the guest's own streams and maps; a failed one counts until its "
                        "relay is gone, or until Stop() if it holds a TCP address); stop one first.",
                        g->name, n);
        /* An offline guest's export starts its storage helper, and keeps it while it serves:
         * within its owner's share, as a job's or a map's. */
        r = guest_helper_share(g, error);
        if (r < 0)
                return r;

        r = export_new(g, ++m->export_seq, alias, disk_path, NULL, listen, &e);
        if (r < 0)
                return r;
        r = listen_socket(e, listen, &uri, error);
        if (r < 0) {
                export_free(e);
                return r;
        }
        e->uri = TAKE_PTR(uri);
        e->create_call = sd_bus_message_ref(msg);
        export_link(e);

        r = guest_when_ready(g, export_backend_ready, EXPORT_REF(e), NULL);
        if (r < 0) {
                e->create_call = sd_bus_message_unref(e->create_call);
                export_unlink(e);
                export_free(e);
                return guest_ready_error(g, r, error);
        }
        return 1;
}

/* Restoring after a restart: the exports come back on their addresses at once (a client's
 * connection waits in the backlog), are set up in QEMU once their guest's peer is there again
 * (export_resume()), and are published with the relay's "ready", as a new one is. */

/* Bind the address again; -EADDRINUSE while the relay of the daemon before us still holds it. */
static int export_rebind(Export *e) {
        _cleanup_free_ char *uri = NULL;
        int r;

        e->unix_path = mfree(e->unix_path);
        r = listen_socket(e, e->listen, &uri, NULL);
        if (r < 0)
                return r;
        free(e->uri);
        e->uri = TAKE_PTR(uri); /* the same options make the URI it had */
        return 0;
}

static int rebind_handler(sd_event_source *s, uint64_t usec, void *userdata) {
        Export *e = userdata;
        int r;

        r = export_rebind(e);
        if (r == -EADDRINUSE && now_usec(CLOCK_MONOTONIC) < e->rebind_deadline) {
                r = sd_event_source_set_time_relative(s, REBIND_RETRY_USEC);
                if (r >= 0)
                        r = sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
                if (r >= 0)
                        return 0;
        }
        e->rebind_source = sd_event_source_disable_unref(e->rebind_source);
        if (r < 0) {
                _cleanup_free_ char *why = strdup_printf("cannot listen on %s again: %s", e->listen, strerror(-r));
                export_fail(e, why ?: "cannot listen on its address again");
                return 0;
        }
        if (e->relay_wanted)
                export_start_relay(e);
        return 0;
}

/* A record's guest gone, or the record not fit to serve: drop it, with its socket. */
static void export_drop_record(Engine *m, Guest *g, const StateExport *s, const char *why) {
        _cleanup_free_ char *dir = export_state_dir(m);

        log_warning("Export %u of guest %s disk %s is not restored: %s", s->id, s->guest, s->alias, why);
        if (dir)
                (void) state_export_remove(dir, s->id);
        if (g && streq(s->listen, "unix")) {
                _cleanup_free_ char *path = NULL;

                /* Where listen_socket() put it (the alias is an identifier: state.c checked). */
                path = strdup_printf("%s/guests/%s/%s-%u.nbd", m->runtime_dir, g->name, s->alias, s->id);
                if (path)
                        (void) unlink(path);
        }
}

static int export_restore_one(StateExport *s, void *userdata) {
        Engine *m = userdata;
        _cleanup_free_ char *name_with_id = NULL;
        Guest *g;
        Disk *d = NULL;
        Export *e;
        int r;

        g = engine_find_guest(m, s->guest);
        if (!g) {
                export_drop_record(m, NULL, s, "its guest is not registered");
                return 0;
        }
        /* Of that guest, not of another registered later under its name (a record from before
         * these were kept: by the name). */
        if ((s->guest_uuid && !streq(s->guest_uuid, g->uuid)) ||
                (s->guest_owner != UID_INVALID && s->guest_owner != g->owner)) {
                export_drop_record(m, NULL, s, "its guest was unregistered and another registered under its name");
                return 0;
        }
        for (size_t i = 0; i < g->n_disks; i++)
                if (streq(g->disks[i]->alias, s->alias))
                        d = g->disks[i];
        name_with_id = strdup_printf("%s-%u", s->alias, s->id);
        if (!name_with_id)
                return -ENOMEM;
        if (!d || !d->object_path) {
                export_drop_record(m, g, s, "the guest has no such disk");
                return 0;
        }
        if ((!streq(s->name, s->alias) && !streq(s->name, name_with_id)) || export_listen_valid(s->listen, NULL) < 0) {
                export_drop_record(m, g, s, "its record is invalid");
                return 0;
        }
        for (Export *i = m->exports; i; i = i->next)
                if (i->id == s->id || (i->guest == g && streq(i->name, s->name))) {
                        export_drop_record(m, g, s, "its record is a duplicate");
                        return 0;
                }

        r = export_new(g, s->id, s->alias, d->object_path, s->name, s->listen, &e);
        if (r < 0)
                return r;
        e->restored = true;
        /* Handed over before the restart: its QEMU is gone. If it is still gone, the storage
         * helper takes the disks again (export_guest_unreachable()), but only the files that
         * QEMU had open: the pins come back with the record. */
        export_handoff_restore_pins(e, s);
        m->export_seq = MAX(m->export_seq, e->id);
        r = export_rebind(e);
        if (r == -EADDRINUSE) {
                log_info("Guest %s disk %s: the address of export %u (%s) is in use, waiting up to %u s for it.",
                        g->name, e->alias, e->id, e->listen, (unsigned) (REBIND_DEADLINE_USEC / USEC_PER_SEC));
                e->rebind_deadline = now_usec(CLOCK_MONOTONIC) + REBIND_DEADLINE_USEC;
                r = sd_event_add_time_relative(m->event, &e->rebind_source, CLOCK_MONOTONIC, REBIND_RETRY_USEC, 0,
                        rebind_handler, e);
        }
        if (r < 0) {
                log_warning_errno(r, "Export %u of guest %s disk %s is not restored: cannot listen on %s: %m", e->id,
                        g->name, e->alias, e->listen);
                export_forget(e);
                export_free(e);
                return 0;
        }
        export_link(e);
        log_info("Guest %s disk %s: restoring export %u on %s.", g->name, e->alias, e->id, e->uri ?: e->listen);
        return 0;
}

int export_restore_all(Engine *m) {
        _cleanup_free_ char *dir = export_state_dir(m);

        if (!dir)
                return log_oom();
        return state_export_load(dir, export_restore_one, m);
}

/* The next restored export of g still waiting for its peer; NULL if none. Each call of the two
 * below starts again from the head: failing one may free others (their peer's helper going). */
static Export *export_next_waiting(Guest *g) {
        for (Export *e = g->engine->exports; e; e = e->next)
                if (e->guest == g && e->restored && !e->resuming && e->state == EXPORT_STARTING)
                        return e;
        return NULL;
}

void export_resume(Guest *g) {
        Export *e;

        while ((e = export_next_waiting(g))) {
                int r;

                e->resuming = true;
                r = guest_when_ready(g, export_backend_ready, EXPORT_REF(e), NULL);
                if (r < 0) {
                        _cleanup_free_ char *why = strdup_printf("cannot start the storage helper: %s", strerror(-r));
                        export_fail(e, why ?: "cannot start the storage helper");
                }
        }
}

void export_guest_unreachable(Guest *g) {
        Export *e;

        while ((e = export_next_waiting(g))) {
                int r;

                if (!e->restore_handoff) {
                        export_fail(e, "its guest's QEMU is not there after the restart"); /* unpublished: freed */
                        continue;
                }
                r = export_handoff_resume(e);
                if (r < 0) {
                        _cleanup_free_ char *why =
                                strdup_printf("its guest's QEMU is gone, and its storage helper cannot take the "
                                              "disks again: %s",
                                        strerror(-r));
                        e->resuming = true; /* not asked again */
                        export_fail(e, why ?: "its guest's QEMU is gone");
                }
        }
}

void export_free_all(Engine *m) {
        while (m->exports) {
                Export *e = m->exports;
                m->exports = e->next;
                export_free(e);
        }
}
