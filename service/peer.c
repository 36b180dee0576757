/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include "peer.h"
#include "qemu.h"
#include "util.h"

/* Connections QEMU's NBD server takes at once: the listener is ours alone (a root-only directory),
 * and each connection one the daemon made, for a map, a range's pull helper or a client of an
 * export's relay (64 each). Given, not left to QEMU: 100 where it has the fix for CVE-2024-7409
 * (Debian's 7.2), and the clients of two exports took every connection the guest's maps and
 * streams need. Not unlimited either: below 1024 open files (a storage helper's, and a common
 * limit of QEMU's), where QEMU would fail accept() over and over rather than stop accepting. */
#define PEER_NBD_CONNECTIONS_MAX 768U

#define NBD_FDNAME "bsd-nbd"

struct PeerWaiter {
        PeerWaiter *next;
        peer_ready_handler_t handler;
        void *userdata;
        void (*destroy)(void *);
};

struct PeerNbdWaiter {
        PeerNbdWaiter *next;
        peer_nbd_handler_t handler;
        void *userdata;
        void (*destroy)(void *);
};

/* A start or stop of the private server, and the server generation it was sent in. */
typedef struct ServerStart {
        Peer *peer;
        unsigned generation;
} ServerStart;

/* Every private server gets a new socket name (see peer_nbd_server_ensure()). */
static unsigned nbd_seq;

static void peer_run_waiters(Peer *p, int error, const char *error_text);
static void nbd_run_waiters(Peer *p, int error, const char *error_text);
static void nbd_free_waiters(PeerNbdWaiter *l);

static void storage_attached(void *userdata) {
        Peer *p = userdata;

        peer_run_waiters(p, 0, NULL);
}

static void storage_failed(void *userdata, const char *why) {
        Peer *p = userdata;

        p->lost_why = why;
        peer_lost(p);
        p->lost_why = NULL;
        p->owner->helper_failed(p->userdata, why);
        peer_run_waiters(p, -ECONNRESET, why);
}

static void storage_released(void *userdata) {
        peer_publish_released(userdata);
}

static bool storage_wanted(void *userdata) {
        Peer *p = userdata;

        return p->waiters;
}

static void peer_on_state(Qmp *q, int error, void *userdata) {
        Peer *p = userdata;

        if (peer_offline(p)) {
                if (error < 0)
                        storage_helper_lost(&p->storage, error);
                else
                        storage_helper_attach(&p->storage);
                return;
        }
        p->owner->connection(p->userdata, error);
}

static void peer_on_event(Qmp *q, const char *event, json_object *data, void *userdata) {
        Peer *p = userdata;

        p->owner->event(p->userdata, event, data);
}

void peer_init(Peer *p, sd_event *event, const Config *config, const char *name, const char *runtime_root,
        const PeerOwner *owner, const StorageSource *storage, void *userdata) {
        *p = (Peer){
                .event = event,
                .config = config,
                .name = name,
                .runtime_root = runtime_root,
                .owner = owner,
                .userdata = userdata,
                .storage_source = *storage,
        };
        p->storage_source.userdata = userdata;
        p->storage = (StorageHost){
                .event = event,
                .config = config,
                .name = name,
                .helper = &p->helper,
                .qmp = &p->qmp,
                .qmp_handlers = {.on_state = peer_on_state, .on_event = peer_on_event, .userdata = p},
                .source = &p->storage_source,
                .userdata = p,
                .attached = storage_attached,
                .failed = storage_failed,
                .released = storage_released,
                .wanted = storage_wanted,
        };
}

void peer_done(Peer *p) {
        /* Closing drops pending QMP callbacks before anything they point to goes away. */
        p->qmp = qmp_close_unref(p->qmp);
        storage_helper_kill(&p->storage);
        while (p->waiters) {
                PeerWaiter *w = p->waiters;
                p->waiters = w->next;
                if (w->destroy)
                        w->destroy(w->userdata);
                free(w);
        }
        p->release_check = sd_event_source_disable_unref(p->release_check);
        nbd_free_waiters(TAKE_PTR(p->nbd_waiters));
        p->nbd_socket = mfree(p->nbd_socket);
}

bool peer_offline(Peer *p) {
        return p->owner->offline(p->userdata);
}

bool peer_ready(Peer *p) {
        return p->qmp && qmp_is_ready(p->qmp) && (!peer_offline(p) || storage_helper_attached(&p->storage));
}

bool peer_has_helper(Peer *p) {
        return p->helper;
}

int peer_connect_fd(Peer *p, int fd) {
        int r;

        r = qmp_new_from_fd(&p->qmp, p->event, fd,
                &(QmpHandlers){.on_state = peer_on_state, .on_event = peer_on_event, .userdata = p});
        if (r < 0) {
                p->qmp = NULL;
                return r;
        }
        qmp_set_timeout(p->qmp, p->config->qmp_timeout_usec);
        return 0;
}

void peer_close(Peer *p) {
        p->qmp = qmp_close_unref(p->qmp);
}

void peer_lost(Peer *p) {
        p->owner->lost(p->userdata);
        p->nbd_server = p->nbd_confirmed = false;
        p->nbd_generation++;
        if (p->nbd_socket)
                (void) unlink(p->nbd_socket); /* its server died with the QMP peer */
        p->nbd_socket = mfree(p->nbd_socket);
        /* Whatever ran in it is gone. A listener may end (and unlisten) itself: the next one is
         * taken first. */
        for (PeerListener *l = p->listeners, *next; l; l = next) {
                next = l->next;
                if (l->lost)
                        l->lost(l->userdata);
        }
        /* The maps' shared exports went with QEMU too: nobody uses the server. */
        p->nbd_users = 0;
        /* Whoever still waits for its start (a listener that failed has unwaited). */
        nbd_run_waiters(p, -ENOTCONN, "the QMP connection to QEMU was lost");
}

const char *peer_lost_reason(const Peer *p) {
        return p->lost_why;
}

/* Waiters */

static void peer_run_waiters(Peer *p, int error, const char *error_text) {
        PeerWaiter *l = TAKE_PTR(p->waiters);

        while (l) {
                PeerWaiter *w = l;
                l = w->next;
                w->handler(p, error, error_text, w->userdata);
                if (w->destroy)
                        w->destroy(w->userdata);
                free(w);
        }
}

int peer_when_ready(Peer *p, peer_ready_handler_t handler, void *userdata, void (*destroy)(void *)) {
        PeerWaiter *w;
        int r;

        if (peer_ready(p) || !peer_offline(p)) {
                handler(p, peer_ready(p) ? 0 : -ENOTCONN, NULL, userdata);
                if (destroy)
                        destroy(userdata);
                return 0;
        }
        if (!p->helper) {
                r = storage_helper_start(&p->storage);
                if (r < 0)
                        return r;
        }
        w = calloc(1, sizeof(PeerWaiter));
        if (!w)
                return -ENOMEM;
        *w = (PeerWaiter){.next = p->waiters, .handler = handler, .userdata = userdata, .destroy = destroy};
        p->waiters = w;
        return 0;
}

bool peer_listeners_busy(Peer *p) {
        for (PeerListener *l = p->listeners; l; l = l->next)
                if (l->busy && l->busy(l->userdata))
                        return true;
        return false;
}

/* Does anything but outcomes waiting for the images' release need the storage helper? */
static bool peer_helper_needed(Peer *p) {
        if (p->waiters || peer_listeners_busy(p))
                return true;
        return p->owner->helper_needed(p->userdata);
}

void peer_publish_released(Peer *p) {
        p->release_check = sd_event_source_disable_unref(p->release_check);
        p->owner->released(p->userdata);
}

/* After the current event: whatever finished a job (a range helper, say) has let go of the
 * helper by then, or something else really keeps it. */
static int release_check(sd_event_source *s, void *userdata) {
        Peer *p = userdata;

        if (p->helper && !peer_helper_needed(p)) {
                p->release_check = sd_event_source_disable_unref(p->release_check);
                storage_helper_stop(&p->storage); /* the outcomes are told once it is gone */
                return 0;
        }
        /* Another job, an export or a map of this guest keeps the helper (and the images): tell
         * the outcome now rather than when that ends. */
        peer_publish_released(p);
        return 0;
}

void peer_release_helper_if_idle(Peer *p) {
        if (!peer_offline(p))
                return;
        if (!p->helper) {
                peer_publish_released(p);
                return;
        }
        if (!peer_helper_needed(p)) {
                storage_helper_stop(&p->storage);
                return;
        }
        if (p->owner->releasing(p->userdata) && !p->release_check &&
                sd_event_add_defer(p->event, &p->release_check, release_check, p) < 0)
                peer_publish_released(p); /* cannot wait: tell now */
}

/* Listeners */

void peer_listen(Peer *p, PeerListener *l) {
        l->prev = NULL;
        l->next = p->listeners;
        if (p->listeners)
                p->listeners->prev = l;
        p->listeners = l;
}

void peer_unlisten(Peer *p, PeerListener *l) {
        if (l->prev)
                l->prev->next = l->next;
        else if (p->listeners == l)
                p->listeners = l->next;
        else
                return; /* not listening */
        if (l->next)
                l->next->prev = l->prev;
        l->next = l->prev = NULL;
}

void peer_remove_all(Peer *p) {
        for (PeerListener *l = p->listeners, *next; l; l = next) {
                next = l->next;
                if (l->removed)
                        l->removed(l->userdata);
        }
}

int peer_dispatch_event(Peer *p, const char *event, json_object *data) {
        const char *id = NULL;

        if (qemu_parse_export_deleted(event, data, &id) <= 0)
                return 0;
        for (PeerListener *l = p->listeners, *next; l; l = next) {
                next = l->next;
                if (l->export_deleted)
                        l->export_deleted(l->userdata, id);
        }
        return 1;
}

/* The private NBD server of a guest's QMP peer */

static void nbd_free_waiters(PeerNbdWaiter *l) {
        while (l) {
                PeerNbdWaiter *n = l->next;
                if (l->destroy)
                        l->destroy(l->userdata);
                free(l);
                l = n;
        }
}

static void nbd_run_waiters(Peer *p, int error, const char *error_text) {
        PeerNbdWaiter *l = TAKE_PTR(p->nbd_waiters);

        /* Taken first: a handler may wait again (a new server) or end other users. */
        for (PeerNbdWaiter *w = l; w; w = w->next)
                if (w->handler)
                        w->handler(p, error, error_text, w->userdata);
        nbd_free_waiters(l);
}

static void server_started(Qmp *q, int error, const char *desc, void *userdata) {
        ServerStart *s = userdata;
        Peer *p = s->peer;
        const char *why;

        if (s->generation != p->nbd_generation)
                return; /* a server stopped or lost since: its waiters heard */
        if (error >= 0) {
                unsigned generation = p->nbd_generation;

                /* Held while the waiters run: one that fails (an export whose disk went) must not
                 * stop the server under those after it, which were told it runs. */
                p->nbd_confirmed = true;
                peer_nbd_hold(p);
                nbd_run_waiters(p, 0, NULL);
                if (p->nbd_generation == generation) {
                        peer_nbd_drop(p);
                        peer_nbd_server_release_if_unused(p);
                }
                return;
        }
        /* QEMU runs one NBD server: an export added now would land on whoever's runs. */
        if (desc && strstr(desc, "already running")) {
                error = -EBUSY;
                why = "QEMU already runs an NBD server that blockstreamd did not start";
        } else
                why = desc ?: strerror(-error);
        log_warning("Guest %s: cannot start the NBD server: %s", p->name, desc ?: strerror(-error));
        p->nbd_server = p->nbd_confirmed = false;
        p->nbd_generation++;
        if (p->nbd_socket)
                (void) unlink(p->nbd_socket);
        p->nbd_socket = mfree(p->nbd_socket);
        /* QEMU refused it: whatever server runs is not ours, a cleanup after a restart must not
         * stop it. (No answer at all, a broken connection, says nothing about that.) */
        if (desc && !peer_offline(p) && p->owner->nbd_server_started(p->userdata))
                p->owner->set_nbd_server_started(p->userdata, false);
        nbd_run_waiters(p, error, why);
}

static void start_test_hook(Peer *p) {
        static bool fired;

        /* Tests only: SIGSTOP once, with a storage helper's nbd-server-start on its way, for the test
         * to kill the helper there: the command then fails before the helper's exit is seen. */
        if (!fired && peer_offline(p))
                fired = test_hook_stop("BLOCKSTREAM_TEST_NBD_START", "offline",
                        "Guest %s: NBD server start sent to the storage helper (test hook).", p->name);
}

int peer_nbd_server_ensure(Peer *p) {
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        _cleanup_free_ char *dir = NULL, *path = NULL;
        _cleanup_close_ int fd = -1;
        int r;

        if (p->nbd_server)
                return 0;
        if (!peer_ready(p))
                return -ENOTCONN;
        dir = strdup_printf("%s/nbd", p->runtime_root);
        if (!dir)
                return -ENOMEM;
        /* A new name for every server: QEMU unlinks a closing listener's path (as it reads it
         * back from the socket), which could otherwise be the one we just bound anew; and never
         * a name still there (an earlier daemon's server, which a restart may still be stopping):
         * short names (socket paths have 107 bytes), counted, those taken skipped. */
        for (unsigned tries = 0;; tries++) {
                struct stat st;

                free(path);
                path = strdup_printf("%s/nbd/%s.%u.sock", p->runtime_root, p->name, ++nbd_seq);
                if (!path)
                        return -ENOMEM;
                if (lstat(path, &st) < 0 && errno == ENOENT)
                        break;
                if (tries >= 1000)
                        return -EADDRINUSE;
        }
        if (strlen(path) >= sizeof(sa.sun_path))
                return -ENAMETOOLONG;
        r = mkdir_p(dir, 0700); /* only root reaches the private servers */
        if (r < 0)
                return r;
        (void) chmod(dir, 0700);
        strcpy(sa.sun_path, path);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return -errno;
        if (bind(fd, (struct sockaddr *) &sa, sizeof(sa)) < 0 || listen(fd, 64) < 0)
                return -errno;
        /* Commands run in order: the exports added after this find the server running. */
        r = qemu_getfd(p->qmp, NBD_FDNAME, TAKE_FD(fd), NULL, NULL, NULL);
        if (r >= 0) {
                ServerStart *s = calloc(1, sizeof(ServerStart));

                if (!s)
                        r = -ENOMEM;
                else {
                        *s = (ServerStart) { .peer = p, .generation = ++p->nbd_generation };
                        r = qemu_nbd_server_start_fd(p->qmp, NBD_FDNAME, PEER_NBD_CONNECTIONS_MAX,
                                server_started, s, free);
                        if (r < 0)
                                free(s); /* not sent: ours */
                }
        }
        if (r < 0) {
                (void) unlink(path);
                return r;
        }
        free(p->nbd_socket);
        p->nbd_socket = TAKE_PTR(path);
        p->nbd_server = true;
        p->nbd_confirmed = false;
        if (!peer_offline(p) && !p->owner->nbd_server_started(p->userdata))
                p->owner->set_nbd_server_started(p->userdata, true);
        start_test_hook(p);
        return 0;
}

int peer_nbd_server_when_started(Peer *p, peer_nbd_handler_t handler, void *userdata, void (*destroy)(void *)) {
        PeerNbdWaiter *w, **tail;
        int r;

        if (p->nbd_server && p->nbd_confirmed) {
                handler(p, 0, NULL, userdata);
                if (destroy)
                        destroy(userdata);
                return 0;
        }
        w = calloc(1, sizeof(PeerNbdWaiter));
        if (!w)
                return -ENOMEM;
        r = peer_nbd_server_ensure(p);
        if (r < 0) {
                free(w);
                return r;
        }
        *w = (PeerNbdWaiter) { .handler = handler, .userdata = userdata, .destroy = destroy };
        for (tail = &p->nbd_waiters; *tail; tail = &(*tail)->next)
                ;
        *tail = w;
        return 0;
}

void peer_nbd_unwait(Peer *p, void *userdata) {
        for (PeerNbdWaiter **w = &p->nbd_waiters; *w;) {
                PeerNbdWaiter *x = *w;

                if (x->userdata != userdata) {
                        w = &x->next;
                        continue;
                }
                *w = x->next;
                if (x->destroy)
                        x->destroy(x->userdata);
                free(x);
        }
}

/* Never waits: QEMU owns the listener, and a QEMU that stops accepting would otherwise hold the
 * whole daemon in connect(). -EAGAIN while its backlog is full. */
int peer_nbd_server_connect(Peer *p) {
        if (!p->nbd_server || !p->nbd_socket)
                return -ENOTCONN;
        return connect_unix_nonblock(p->nbd_socket);
}

void peer_nbd_hold(Peer *p) {
        p->nbd_users++;
}

void peer_nbd_drop(Peer *p) {
        /* After a loss the count restarted at 0: what was in QEMU went with it. */
        if (p->nbd_users > 0)
                p->nbd_users--;
}

/* QEMU answered a stop of our server: the record that one of ours may run goes, unless a server of
 * ours was started since (a new generation: its start came after this stop, commands run in
 * order, and its own stop may not be dispatched yet). No answer (the connection lost, the daemon
 * stopped) keeps it: QEMU drops commands it has not dispatched when its client goes, so the
 * server may still run, and the next connect's cleanup stops it. */
static void server_stopped(Qmp *q, int error, const char *desc, void *userdata) {
        ServerStart *s = userdata;
        Peer *p = s->peer;

        if (error < 0 && !desc)
                return;
        if (s->generation == p->nbd_generation && !p->nbd_server && p->owner->nbd_server_started(p->userdata))
                p->owner->set_nbd_server_started(p->userdata, false);
}

static int server_stop(Peer *p) {
        ServerStart *s = calloc(1, sizeof(ServerStart));
        int r;

        if (!s)
                return -ENOMEM;
        *s = (ServerStart) { .peer = p, .generation = p->nbd_generation };
        r = qemu_nbd_server_stop(p->qmp, server_stopped, s, free);
        if (r < 0)
                free(s); /* not sent: ours */
        return r;
}

static void stop_test_hook(Peer *p) {
        /* Tests only: SIGSTOP with the stop queued, not yet written, to be killed there. */
        (void) test_hook_stop("BLOCKSTREAM_TEST_NBD_STOP", "queued", "Guest %s: NBD server stop queued (test hook).",
                p->name);
}

void peer_nbd_server_release_if_unused(Peer *p) {
        bool sent = false;

        if (!p->nbd_server || p->nbd_users > 0 || p->nbd_waiters)
                return;
        if (p->nbd_socket)
                (void) unlink(p->nbd_socket);
        p->nbd_socket = mfree(p->nbd_socket);
        p->nbd_server = p->nbd_confirmed = false;
        p->nbd_generation++;
        if (peer_ready(p))
                sent = server_stop(p) >= 0;
        if (sent)
                stop_test_hook(p);
}

/* Called first after a (re)connect, before anything can start a server: a server of ours that
 * survived a restart or a broken connection goes, and with it every NBD export on it (all ours:
 * QEMU runs one server, and we could only start ours where none ran). */
void peer_nbd_cleanup_leftovers(Peer *p) {
        if (!p->owner->nbd_server_started(p->userdata) || !peer_ready(p))
                return;
        log_info("Guest %s: stopping the NBD server left from before.", p->name);
        (void) server_stop(p);
}

bool peer_nbd_server_running(Peer *p) {
        return p->nbd_server || p->owner->nbd_server_started(p->userdata);
}
