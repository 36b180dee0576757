/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* The template caches' D-Bus objects: org.blockstream1.Cache at /org/blockstream1/cache/N. */

#include <json-c/json.h>
#include <stdio.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/sock_diag.h>
#include <linux/unix_diag.h>
#include <netinet/tcp.h>

#include "blockstream-api.h"
#include "bus-error.h"
#include "bus-util.h"
#include "cache-internal.h"
#include "cache.h"
#include "polkit.h"
#include "util.h"

/* D-Bus */

/* A property read may look again at most this often: anyone may call Get in a loop. */
#define PROPERTY_LOOK_USEC USEC_PER_SEC

static bool look_again(usec_t *at) {
        usec_t now = now_usec(CLOCK_MONOTONIC);

        if (*at != 0 && now - *at < PROPERTY_LOOK_USEC)
                return false;
        *at = now;
        return true;
}


/* Connections to the socket now: the accepted ends, which the kernel ties to the listener's
 * socket file, in our network namespace (NETLINK_SOCK_DIAG, the bound file's device and inode of
 * each connected unix socket). A path is not enough: /proc/net/unix shows any socket bound at that
 * path in any mount namespace of ours, and a user who mounts a tmpfs over /run in a user namespace
 * of their own binds one there, connects to it and holds Stop Busy for everyone. */
#define DIAG_BUFFER (64U * 1024U)
#define DIAG_BYTES_MAX (64U << 20) /* a host's sockets read at most: beyond, "cannot tell" */

static bool kernel_dev_is(uint32_t kdev, dev_t dev) {
        /* The kernel's own dev_t (the super block's s_dev, as sock_diag gives it): 12 bits of
         * major over 20 of minor. */
        return (kdev >> 20) == major(dev) && (kdev & 0xfffffU) == minor(dev);
}

static int count_clients(Cache *c, unsigned *ret) {
        struct {
                struct nlmsghdr nlh;
                struct unix_diag_req req;
        } request = {
                .nlh = { .nlmsg_len = sizeof(request), .nlmsg_type = SOCK_DIAG_BY_FAMILY,
                        .nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP },
                .req = { .sdiag_family = AF_UNIX, .udiag_states = 1U << TCP_ESTABLISHED, .udiag_show = UDIAG_SHOW_VFS },
        };
        _cleanup_free_ uint8_t *buf = malloc(DIAG_BUFFER);
        _cleanup_close_ int fd = -EBADF;
        size_t total = 0;
        unsigned n = 0;
        struct stat st;

        if (!buf)
                return -ENOMEM;
        if (lstat(c->socket_path, &st) < 0)
                return -errno;
        if (!S_ISSOCK(st.st_mode))
                return -ENOTSOCK;
        fd = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
        if (fd < 0)
                return -errno;
        if (send(fd, &request, sizeof(request), 0) < 0)
                return -errno;
        for (;;) {
                ssize_t k = recv(fd, buf, DIAG_BUFFER, MSG_TRUNC);
                int left;

                if (k < 0 && errno == EINTR)
                        continue;
                if (k < 0)
                        return -errno;
                if (k == 0 || (size_t) k > DIAG_BUFFER)
                        return -EIO;
                total += (size_t) k;
                if (total > DIAG_BYTES_MAX)
                        return -E2BIG;
                left = (int) k;
                for (struct nlmsghdr *h = (struct nlmsghdr *) buf; NLMSG_OK(h, left); h = NLMSG_NEXT(h, left)) {
                        const struct unix_diag_msg *m = NLMSG_DATA(h);
                        int len;

                        if (h->nlmsg_type == NLMSG_DONE) {
                                *ret = n;
                                return 0;
                        }
                        if (h->nlmsg_type == NLMSG_ERROR) {
                                const struct nlmsgerr *e = NLMSG_DATA(h);

                                return h->nlmsg_len >= NLMSG_LENGTH(sizeof(*e)) && e->error < 0 ? e->error : -EIO;
                        }
                        if (h->nlmsg_type != SOCK_DIAG_BY_FAMILY || h->nlmsg_len < NLMSG_LENGTH(sizeof(*m)))
                                continue;
                        len = (int) (h->nlmsg_len - NLMSG_LENGTH(sizeof(*m)));
                        for (const struct rtattr *a = (const struct rtattr *) (m + 1); RTA_OK(a, len);
                                a = RTA_NEXT(a, len)) {
                                struct unix_diag_vfs v;

                                if (a->rta_type != UNIX_DIAG_VFS || RTA_PAYLOAD(a) < sizeof(v))
                                        continue;
                                memcpy(&v, RTA_DATA(a), sizeof(v));
                                if (v.udiag_vfs_ino == st.st_ino && kernel_dev_is(v.udiag_vfs_dev, st.st_dev))
                                        n++;
                        }
                }
        }
}

static int authorize(Cache *c, sd_bus_message *msg, sd_bus_error *error) {
        return bus_authorize(c->engine->polkit, msg, ACTION_MANAGE, NULL, error);
}

static int method_stop(sd_bus_message *msg, void *userdata, sd_bus_error *error) {
        Cache *c = userdata;
        uid_t caller = UID_INVALID;
        bool named, looked;
        unsigned n;
        int r;

        r = authorize(c, msg, error);
        if (r <= 0)
                return r < 0 ? r : 1;
        if (c->warm_call)
                return sd_bus_error_setf(error, BS_ERROR_BUSY, "Cache %u is being warmed.", c->id);
        looked = cache_users_update(c);
        /* The overlay is named to root only: it may be another user's, in a directory the caller
         * may not look into. */
        if (bus_sender_uid(msg, &caller) < 0)
                caller = UID_INVALID;
        named = c->n_user_list > 0 && caller == 0;
        if (c->users > 0)
                return sd_bus_error_setf(error, BS_ERROR_BUSY,
                        "Cache %u is the backing of %u overlay%s%s%s; stream %s to the end (or remove %s) first%s.",
                        c->id, c->users, c->users == 1 ? "" : "s", named ? ", " : "",
                        named ? c->user_list[0].path : "", c->users == 1 ? "it" : "them",
                        c->users == 1 ? "it" : "them",
                        looked ? "" : " (as last counted: overlays are looked at again only so often; try again in a "
                                      "few seconds)");
        /* Unknown is not none: a cache whose clients cannot be counted stays, but for root, who
         * may know better (a kernel without unix_diag, a policy that forbids loading it). */
        r = count_clients(c, &n);
        if (r < 0 && caller != 0)
                return sd_bus_error_set_errnof(error, -r,
                        "Cannot tell whether cache %u serves connections (sock_diag of unix sockets: %m); it was "
                        "not stopped. root may stop it regardless.",
                        c->id);
        if (r < 0) {
                log_warning_errno(r, "Template cache %u: its connections cannot be counted (sock_diag of unix "
                                     "sockets: %m); stopped as root asked.", c->id);
                n = 0;
        }
        if (n > 0)
                return sd_bus_error_setf(error, BS_ERROR_BUSY,
                        "Cache %u serves %u connection%s; stop the guests that use it first.", c->id, n,
                        n == 1 ? "" : "s");
        log_info("Template cache %u of %s stopped and removed.", c->id, c->url);
        cache_destroy(c);
        return sd_bus_reply_method_return(msg, NULL);
}

/* QEMU's answer to block-stream: a refusal (a permission conflict, the id in use) brings no job
 * event, so it is the Warm call's answer. */
static void warm_started(Qmp *q, int error, json_object *result, const char *cls, const char *desc, void *userdata) {
        Cache *c = userdata;

        if (error < 0)
                cache_warm_reply(c, BS_ERROR_QEMU_FAILED, desc ?: strerror(-error));
}

static int method_warm(sd_bus_message *msg, void *userdata, sd_bus_error *error) {
        Cache *c = userdata;
        json_object *args;
        int r;

        r = authorize(c, msg, error);
        if (r <= 0)
                return r < 0 ? r : 1;
        if (c->warm_call)
                return sd_bus_error_setf(error, BS_ERROR_BUSY, "Cache %u is being warmed already.", c->id);
        if (c->state != CACHE_SERVING || !c->qmp)
                return sd_bus_error_setf(error, BS_ERROR_NOT_RUNNING, "Cache %u is not serving.", c->id);
        if (c->warmed)
                return sd_bus_reply_method_return(msg, NULL); /* the image names no backing already */
        /* A block-stream job in the helper: every block of the template into the image, and then
         * the backing dropped from its header, so neither the helper nor a restarted one needs the
         * remote any more. QEMU's defaults finalize and dismiss it; the end comes as an event. */
        args = json_object_new_object();
        if (!args || json_object_object_add(args, "job-id", json_object_new_string("warm")) < 0 ||
                json_object_object_add(args, "device", json_object_new_string("cache")) < 0) {
                json_object_put(args);
                return -ENOMEM;
        }
        r = qmp_call(c->qmp, "block-stream", args, -1, warm_started, c, NULL);
        if (r < 0)
                return sd_bus_error_set_errnof(error, -r, "Cannot start warming cache %u: %m", c->id);
        c->warm_call = sd_bus_message_ref(msg);
        log_info("Template cache %u: warming.", c->id);
        return 1;
}

static int property_get_string(sd_bus *bus, const char *path, const char *interface, const char *property,
        sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        char **s = userdata;
        return sd_bus_message_append(reply, "s", strempty(*s));
}

static int property_get_state(sd_bus *bus, const char *path, const char *interface, const char *property,
        sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        Cache *c = userdata;
        return sd_bus_message_append(reply, "s", cache_state_name(c));
}

static int property_get_fetched(sd_bus *bus, const char *path, const char *interface, const char *property,
        sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        Cache *c = userdata;
        struct stat st;

        /* What was copied into the image: its allocated size (metadata included). */
        if (c->image_fd < 0 || fstat(c->image_fd, &st) < 0)
                return sd_bus_message_append(reply, "t", UINT64_C(0));
        return sd_bus_message_append(reply, "t", (uint64_t) st.st_blocks * 512);
}

static int property_get_users(sd_bus *bus, const char *path, const char *interface, const char *property,
        sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        Cache *c = userdata;

        if (look_again(&c->users_read_at))
                cache_users_update(c);
        return sd_bus_message_append(reply, "u", c->users);
}

static int property_get_clients(sd_bus *bus, const char *path, const char *interface, const char *property,
        sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        Cache *c = userdata;
        unsigned n = 0;

        /* 0 where unknown, rather than failing every GetAll. */
        if (look_again(&c->clients_read_at))
                c->clients = count_clients(c, &n) >= 0 ? n : 0;
        return sd_bus_message_append(reply, "u", c->clients);
}

const sd_bus_vtable cache_vtable[] = {
        SD_BUS_VTABLE_START(0),
        SD_BUS_PROPERTY("URL", "s", property_get_string, offsetof(Cache, url), SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("Size", "t", NULL, offsetof(Cache, size), SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("Socket", "s", property_get_string, offsetof(Cache, socket_path), SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("Users", "u", property_get_users, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("State", "s", property_get_state, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("BytesFetched", "t", property_get_fetched, 0, 0),
        SD_BUS_PROPERTY("Clients", "u", property_get_clients, 0, 0),
        SD_BUS_METHOD("Stop", NULL, NULL, method_stop, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD("Warm", NULL, NULL, method_warm, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_VTABLE_END,
};

int cache_object_find(
        sd_bus *bus, const char *path, const char *interface, void *userdata, void **found, sd_bus_error *error) {
        Engine *e = userdata;

        for (Cache *c = e->caches; c; c = c->next)
                if (!c->fresh && streq(c->object_path, path)) {
                        *found = c;
                        return 1;
                }
        return 0;
}

int cache_node_enumerator(sd_bus *bus, const char *path, void *userdata, char ***nodes, sd_bus_error *error) {
        Engine *e = userdata;
        _cleanup_strv_free_ char **l = NULL;

        for (Cache *c = e->caches; c; c = c->next)
                if (!c->fresh && strv_push(&l, strdup(c->object_path)) < 0)
                        return -ENOMEM;
        if (!l && !(l = calloc(1, sizeof(char *))))
                return -ENOMEM;
        *nodes = TAKE_PTR(l);
        return 1;
}
