/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* A template cache's NBD relay (cache-internal.h). Its clients are the QEMUs of every overlay over
 * the cache, of several users: none of them talks to the cache's QEMU directly. QEMU's NBD server
 * gives each read of a connection a buffer of its length (up to 32 MiB, 16 at once), kept until the
 * client has read the reply: one connection that never reads made QEMU hold 512 MiB, four took the
 * service's MemoryMax=2G, and the cache's QEMU, killed, cut every guest over the template. Through
 * blockstream-nbd-relay each connection may cost QEMU 32 MiB, and all of them together
 * CACHE_RELAY_BUDGET; a client that keeps part of that budget with replies it does not read, while
 * others wait for it, is closed after a few seconds (nbd-relay.c).
 *
 * The relay accepts on the cache's socket (the path in the overlays, with its ACL) and asks for an
 * upstream per client ("connect N"): a connection to the cache's QEMU, which listens on a socket of
 * its own in a directory of root's only (upstream_path). QEMU serves CACHE_CLIENTS_MAX connections
 * and then stops accepting; beyond that connect() finds the backlog full and the client is
 * refused. Nothing the relay says is used as a path, and it holds no connection but those.
 *
 * The relay runs with the cache's sandbox identity, in a PID namespace of its own (it cannot see
 * the cache's QEMU; that QEMU, not PID 1 of its own, sees it and may signal it, but cannot write
 * into it: the relay is not dumpable), without network, with no file access (seccomp). It lives and dies with the cache's storage helper: one that exits makes
 * the helper go too, which cache.c restarts as it does a helper that died (CACHE_RESTARTS_MAX). */

#include <errno.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "cache-internal.h"
#include "config.h"
#include "control.h"
#include "sandbox.h"
#include "util.h"

/* What the reads in flight of all the cache's clients together may make its QEMU hold: two of the
 * largest reads, or 128 of a stream's 512 KiB. Per cache: a user who reaches n caches (as the
 * owner of an overlay over each) can make their QEMUs hold n times this, never more. */
#define CACHE_RELAY_BUDGET (UINT64_C(64) << 20)
/* Four fds a client (its socket, its upstream, a pipe) and a few of its own. */
#define CACHE_RELAY_FILES (4U * CACHE_CLIENTS_MAX + 64U)
/* An honest relay says "ready", then a "connect" and a "clients" count for each client: after a
 * restart every guest over the cache comes back at once. */
#define CONTROL_RATE 512.0
#define CONTROL_BURST 2048.0

/* A listening socket at path, in dir (made with mode if it is not there), in *fd: a stale one of an
 * earlier daemon replaced. */
static int listen_at(const char *dir, mode_t mode, const char *path, int backlog, int *fd) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        _cleanup_close_ int s = -1;
        int r;

        if (!dir || !path)
                return -ENOMEM;
        if (strlen(path) >= sizeof(sa.sun_path))
                return -ENAMETOOLONG;
        r = mkdir_p(dir, mode);
        if (r < 0)
                return r;
        strcpy(sa.sun_path, path);
        s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (s < 0)
                return -errno;
        if (unlink(path) < 0 && errno != ENOENT)
                return -errno;
        if (bind(s, (struct sockaddr *) &sa, sizeof(sa)) < 0 || listen(s, backlog) < 0)
                return -errno;
        closep(fd);
        *fd = TAKE_FD(s);
        return 0;
}

int cache_listen(Cache *c) {
        _cleanup_free_ char *dir = strdup_printf("%s/caches", c->engine->runtime_dir),
                            *up_dir = strdup_printf("%s/cache-upstreams", c->engine->runtime_dir);
        int r;

        /* The clients' (the overlays name it): at the same path after a restart. */
        r = listen_at(dir, 0755, c->socket_path, 64, &c->listen_fd);
        if (r < 0)
                return r;
        /* QEMU's, in a directory of root's only: nobody reaches QEMU past the relay. Room in its
         * backlog for an upstream of each of the relay's clients: they come back at once after a
         * restart, while QEMU, opening the template, accepts none yet; one past it is refused. */
        if (!up_dir)
                return -ENOMEM;
        r = listen_at(up_dir, 0700, c->upstream_path, (int) CACHE_CLIENTS_MAX, &c->upstream_fd);
        if (r < 0)
                return r;
        return chmod(up_dir, 0700) < 0 ? -errno : 0;
}

static int relay_send(Cache *c, const ControlCommand *cmd, int pass_fd) {
        return control_send_command(c->relay_control_fd, MSG_NOSIGNAL | MSG_DONTWAIT, cmd, pass_fd);
}

/* Its client gets a connection to QEMU, or is told no. */
static void upstream_connect(Cache *c, uint64_t n) {
        _cleanup_close_ int up = -1;
        int r;

        up = connect_unix_nonblock(c->upstream_path);
        if (up < 0) {
                /* A full backlog: QEMU serves as many as it may, or is not up. */
                (void) relay_send(c,
                        &(ControlCommand) { .kind = CONTROL_COMMAND_REFUSED,
                                .number = n,
                                .text = up == -EAGAIN ? "the cache serves as many connections as it can" : "" },
                        -1);
                return;
        }
        r = relay_send(c, &(ControlCommand) { .kind = CONTROL_COMMAND_UPSTREAM, .number = n }, up);
        if (r < 0) {
                log_debug_errno(r, "Template cache %u: cannot hand a connection to the relay: %m", c->id);
                (void) relay_send(c, &(ControlCommand) { .kind = CONTROL_COMMAND_REFUSED, .number = n, .text = "" }, -1);
        }
}

/* The relay went, or is sent away: with it the helper, whose restart brings both back. */
static void relay_lost(Cache *c, const char *why) {
        log_warning("Template cache %u: %s.", c->id, why);
        cache_relay_stop(c);
        if (c->child)
                (void) helper_kill(c->child);
}

static int relay_exited(sd_event_source *s, const siginfo_t *si, void *userdata) {
        Cache *c = userdata;

        c->relay_pid = 0;
        c->relay_child = sd_event_source_disable_unref(c->relay_child);
        relay_lost(c, si->si_code == CLD_EXITED ? "its NBD relay exited" : "its NBD relay was killed");
        return 0;
}

static int control_handler(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        Cache *c = userdata;
        char buf[CONTROL_MESSAGE_MAX + 1];
        ControlRelayMessage msg;
        const char *why;
        int r, k;

        k = helper_relay_receive(fd, &c->relay_pace, &c->relay_source, CONTROL_RATE, CONTROL_BURST, buf, &msg, &r,
                &why);
        if (k == 0)
                return 0;
        if (k < 0) {
                relay_lost(c, why);
                return 0;
        }
        switch (msg.kind) {
        case CONTROL_RELAY_READY:
                log_debug("Template cache %u: its NBD relay is ready.", c->id);
                break;
        case CONTROL_RELAY_CONNECT:
                if (r < 0) {
                        relay_lost(c, "its NBD relay sent a malformed request");
                        return 0;
                }
                upstream_connect(c, msg.number);
                break;
        case CONTROL_RELAY_CLIENTS:
                if (r < 0) {
                        relay_lost(c, "its NBD relay sent a malformed count");
                        return 0;
                }
                break; /* Clients counts the socket's connections itself (cache-object.c) */
        case CONTROL_RELAY_ERROR: {
                char text[TEXT_SANITIZE_MAX + 1];
                uint64_t dropped;

                if (!log_limit_minutely(&c->relay_errors, now_usec(CLOCK_MONOTONIC), &dropped))
                        break;
                (void) text_sanitize_buf(text, sizeof(text), msg.text, msg.text_len);
                log_warning("Template cache %u relay: %s (%" PRIu64 " more in the last minute, not logged)", c->id,
                        text, dropped);
                break;
        }
        default:
                relay_lost(c, "its NBD relay sent an unknown message");
        }
        return 0;
}

int cache_relay_start(Cache *c) {
        Engine *e = c->engine;
        _cleanup_free_ char *prefix = strdup_printf("Template cache %u relay", c->id),
                            *name = strdup_printf("cache-%u-relay", c->id), *label = NULL,
                            *a_clients = strdup_printf("--clients=%u", CACHE_CLIENTS_MAX),
                            *a_budget = strdup_printf("--budget=%" PRIu64, CACHE_RELAY_BUDGET);
        char *argv[] = { (char *) RELAY_BINARY, (char *) "--export=" CACHE_EXPORT_NAME, a_clients, a_budget, NULL };
        _cleanup_close_ int exec_fd = -1;
        int r;

        if (!prefix || !name || !a_clients || !a_budget)
                return -ENOMEM;
        exec_fd = helper_open_binary(engine_helper_dir(e), RELAY_BINARY);
        if (exec_fd < 0)
                return exec_fd;
        /* It touches no image: a plain s0 type, as an export's relay. */
        r = sandbox_selinux_plain_label(config_selinux_relay_type(&e->config), &label);
        if (r < 0)
                return r;
        r = helper_start(e->event,
                &(HelperSpec) {
                        .sandbox = {
                                .name = name,
                                .uid = c->uid,
                                .gid = (gid_t) c->uid,
                                .own_pids = true,
                                .selinux_label = label,
                                .fds = &c->listen_fd,
                                .n_fds = 1,
                                .argv = argv,
                                .exec_fd = exec_fd,
                                .max_files = CACHE_RELAY_FILES,
                        },
                        .control_type = SOCK_SEQPACKET,
                        .log_prefix = prefix,
                        .on_exit = relay_exited,
                        .userdata = c,
                },
                &c->relay_pid, &c->relay_child, &c->relay_control_fd, &c->relay_log);
        if (r < 0)
                return log_error_errno(r, "Template cache %u: cannot start its NBD relay: %m", c->id);
        r = sd_event_add_io(e->event, &c->relay_source, c->relay_control_fd, EPOLLIN, control_handler, c);
        if (r < 0) {
                cache_relay_stop(c);
                return r;
        }
        return 0;
}

void cache_relay_stop(Cache *c) {
        helper_pace_done(&c->relay_pace);
        c->relay_source = sd_event_source_disable_unref(c->relay_source);
        closep(&c->relay_control_fd);
        c->relay_child = helper_release(c->relay_child);
        c->relay_log = helper_log_free(c->relay_log);
        c->relay_pid = 0;
}
