/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <inttypes.h>

#include "qemu.h"
#include "util.h"

/* Asynchronous typed calls */

typedef struct Request {
        unsigned n_ref;
        union {
                qemu_result_handler_t result;
                qemu_disks_handler_t disks;
                qemu_jobs_handler_t jobs;
                qemu_exports_handler_t exports;
                qemu_export_nodes_handler_t export_nodes;
        } handler;
        bool with_nodes;     /* query-block-exports: export_nodes, not exports */
        void *userdata;
        qemu_destroy_t destroy;
        json_object *blocks; /* query_disks: query-block's reply, kept for the node names */
        QmpCharge blocks_charge; /* and what it costs, charged to the daemon-wide budget (qmp-cost.h) */
        bool skip_nodes;     /* query_disks: asking for node names now would crash QEMU */
} Request;

/* The budget needs the room of the query-block reply kept for more than a second while QEMU put
 * off its node names (qmp-cost.h): dropped; the node names, when they come, end in an error. */
static void request_evict(QmpCharge *c) {
        Request *r = (Request *) (void *) ((char *) c - offsetof(Request, blocks_charge));

        json_object_put(r->blocks);
        r->blocks = NULL;
}

static Request *request_new(void *userdata, qemu_destroy_t destroy) {
        Request *r = calloc(1, sizeof(Request));

        if (!r)
                return NULL;
        r->blocks_charge.evict = request_evict;
        r->n_ref = 1;
        r->userdata = userdata;
        r->destroy = destroy;
        return r;
}

static void request_unref(void *p) {
        Request *r = p;

        if (!r || --r->n_ref > 0)
                return;
        if (r->destroy)
                r->destroy(r->userdata);
        if (r->blocks)
                json_object_put(r->blocks);
        qmp_cost_charge(&r->blocks_charge, 0);
        free(r);
}

/* Submit; on failure the request is freed without running the caller's destroy. */
static int request_submit(Qmp *q, const char *command, json_object *args, Request *req, qmp_reply_handler_t h) {
        int r = qmp_call(q, command, args, -1, h, req, request_unref);
        if (r < 0) {
                req->destroy = NULL;
                request_unref(req);
        }
        return r;
}

static void result_reply(Qmp *q, int error, json_object *result, const char *cls, const char *desc, void *userdata) {
        Request *req = userdata;

        if (req->handler.result)
                req->handler.result(q, error, desc, req->userdata);
}

/* Every typed command's arguments in one shape: a table of keys and typed values, ended by a
 * NULL key (ARGS(...)). An entry with .omit is left out; a number above INT64_MAX is -ERANGE
 * (QMP's integers are signed). */
typedef enum ArgType {
        ARG_STRING,
        ARG_STRING_OR_NULL, /* a NULL string is sent as JSON null */
        ARG_BOOL,
        ARG_U64,
        ARG_OBJECT, /* nested: .sub is another table */
} ArgType;

typedef struct Arg {
        const char *key;
        ArgType type;
        bool omit;
        const char *s;
        bool b;
        uint64_t u;
        const struct Arg *sub;
} Arg;

#define ARGS(...) ((const Arg[]) { __VA_ARGS__, {} })
#define A_STR(k, v) { .key = (k), .type = ARG_STRING, .s = (v) }
#define A_STR_OPT(k, v) { .key = (k), .type = ARG_STRING, .s = (v), .omit = !(v) }
#define A_BOOL(k, v) { .key = (k), .type = ARG_BOOL, .b = (v) }
#define A_U64(k, v) { .key = (k), .type = ARG_U64, .u = (v) }
#define A_OBJ(k, ...) { .key = (k), .type = ARG_OBJECT, .sub = ARGS(__VA_ARGS__) }

static int args_build(const Arg *args, json_object **ret) {
        _cleanup_(json_object_putp) json_object *o = json_object_new_object();
        int r;

        if (!o)
                return -ENOMEM;
        for (const Arg *a = args; a->key; a++) {
                json_object *v = NULL;

                if (a->omit)
                        continue;
                switch (a->type) {
                case ARG_STRING:
                case ARG_STRING_OR_NULL:
                        if (!a->s && a->type == ARG_STRING)
                                return -EINVAL;
                        if (a->s && !(v = json_object_new_string(a->s)))
                                return -ENOMEM;
                        break;
                case ARG_BOOL:
                        if (!(v = json_object_new_boolean(a->b)))
                                return -ENOMEM;
                        break;
                case ARG_U64:
                        if (a->u > INT64_MAX)
                                return -ERANGE;
                        if (!(v = json_object_new_int64((int64_t) a->u)))
                                return -ENOMEM;
                        break;
                case ARG_OBJECT:
                        r = args_build(a->sub, &v);
                        if (r < 0)
                                return r;
                        break;
                }
                if (json_object_object_add(o, a->key, v) < 0) {
                        json_object_put(v);
                        return -ENOMEM;
                }
        }
        *ret = TAKE_PTR(o);
        return 0;
}

/* Send command with args (a table, or NULL for none) and fd (-1: none; always consumed); the
 * reply goes to handler. */
static int call(Qmp *q, const char *command, const Arg *args, int fd, qemu_result_handler_t handler, void *userdata,
        qemu_destroy_t destroy) {
        _cleanup_close_ int fd_ = fd;
        json_object *o = NULL;
        Request *req;
        int r;

        if (args) {
                r = args_build(args, &o);
                if (r < 0)
                        return r;
        }
        req = request_new(userdata, destroy);
        if (!req) {
                json_object_put(o);
                return -ENOMEM;
        }
        req->handler.result = handler;
        r = qmp_call(q, command, o, TAKE_FD(fd_), result_reply, req, request_unref);
        if (r < 0) {
                req->destroy = NULL;
                request_unref(req);
        }
        return r;
}

int qemu_block_stream(Qmp *q, const QemuStreamArgs *a, qemu_result_handler_t handler, void *userdata,
        qemu_destroy_t destroy) {
        return call(q, "block-stream",
                ARGS(A_STR("job-id", a->job_id),
                        A_STR("device", a->node_name),
                        A_STR_OPT("base-node", a->base_node),
                        A_STR_OPT("backing-file", a->backing_file),
                        { .key = "speed", .type = ARG_U64, .u = a->speed, .omit = a->speed == 0 },
                        /* QEMU 7.2 drops the backing file from the header at finalization while
                         * the copied clusters' L2 entries may still wait in its cache: the daemon
                         * flushes the node first, then finalizes (JOB_NEEDS_FINALIZE). */
                        A_BOOL("auto-finalize", false),
                        A_BOOL("auto-dismiss", false),
                        /* A full disk pauses the job (Resume retries once space is freed); any other
                         * error, a failing template above all, fails it with QEMU's reason. */
                        A_STR("on-error", "enospc")),
                -1, handler, userdata, destroy);
}

int qemu_block_job_pause(Qmp *q, const char *job_id, qemu_result_handler_t handler, void *userdata,
        qemu_destroy_t destroy) {
        return call(q, "block-job-pause", ARGS(A_STR("device", job_id)), -1, handler, userdata, destroy);
}

int qemu_block_job_resume(Qmp *q, const char *job_id, qemu_result_handler_t handler, void *userdata,
        qemu_destroy_t destroy) {
        return call(q, "block-job-resume", ARGS(A_STR("device", job_id)), -1, handler, userdata, destroy);
}

int qemu_block_job_cancel(Qmp *q, const char *job_id, qemu_result_handler_t handler, void *userdata,
        qemu_destroy_t destroy) {
        /* force: QEMU refuses to cancel a paused job otherwise. */
        return call(q, "block-job-cancel", ARGS(A_STR("device", job_id), A_BOOL("force", true)), -1, handler, userdata,
                destroy);
}

int qemu_block_job_set_speed(Qmp *q, const char *job_id, uint64_t speed, qemu_result_handler_t handler,
        void *userdata, qemu_destroy_t destroy) {
        return call(q, "block-job-set-speed", ARGS(A_STR("device", job_id), A_U64("speed", speed)), -1, handler,
                userdata, destroy);
}

int qemu_job_dismiss(Qmp *q, const char *job_id, qemu_result_handler_t handler, void *userdata,
        qemu_destroy_t destroy) {
        return call(q, "job-dismiss", ARGS(A_STR("id", job_id)), -1, handler, userdata, destroy);
}

int qemu_job_finalize(Qmp *q, const char *job_id, qemu_result_handler_t handler, void *userdata,
        qemu_destroy_t destroy) {
        return call(q, "job-finalize", ARGS(A_STR("id", job_id)), -1, handler, userdata, destroy);
}

/* HMP answers with text: nothing on success, the error otherwise (a QMP error only if HMP
 * itself failed). */
static void hmp_reply(Qmp *q, int error, json_object *result, const char *cls, const char *desc, void *userdata) {
        Request *req = userdata;
        _cleanup_free_ char *text = NULL;
        const char *s;

        if (!req->handler.result)
                return;
        if (error < 0) {
                req->handler.result(q, error, desc, req->userdata);
                return;
        }
        if (!json_object_is_type(result, json_type_string)) {
                req->handler.result(q, -EBADMSG, "QEMU's monitor did not answer with text", req->userdata);
                return;
        }
        s = json_object_get_string(result);
        if (strspn(s, " \t\r\n") == strlen(s)) {
                req->handler.result(q, 0, NULL, req->userdata);
                return;
        }
        text = text_sanitize(s, strlen(s), TEXT_SANITIZE_MAX);
        req->handler.result(q, -EIO, text ?: "QEMU's monitor reported an error", req->userdata);
}

int qemu_flush_node(Qmp *q, const char *node_name, qemu_result_handler_t handler, void *userdata,
        qemu_destroy_t destroy) {
        _cleanup_free_ char *line = NULL;
        json_object *o = NULL;
        Request *req;
        int r;

        /* QEMU 7.2 has no QMP command that flushes one node; HMP's qemu-io does, and takes a node
         * name. The name goes into a command line: only a valid one ([#]letter, then letters,
         * digits, "_.-": no blank, no quote) may. */
        if (!qemu_node_name_is_valid(node_name))
                return -EINVAL;
        line = strdup_printf("qemu-io %s flush", node_name);
        if (!line)
                return -ENOMEM;
        r = args_build(ARGS(A_STR("command-line", line)), &o);
        if (r < 0)
                return r;
        req = request_new(userdata, destroy);
        if (!req) {
                json_object_put(o);
                return -ENOMEM;
        }
        req->handler.result = handler;
        return request_submit(q, "human-monitor-command", o, req, hmp_reply);
}

int qemu_add_fd(Qmp *q, unsigned fdset_id, int fd, const char *opaque, qemu_result_handler_t handler, void *userdata,
        qemu_destroy_t destroy) {
        return call(q, "add-fd", ARGS(A_U64("fdset-id", fdset_id), A_STR_OPT("opaque", opaque)), fd, handler, userdata,
                destroy);
}

int qemu_blockdev_add_file(Qmp *q, const char *node_name, unsigned fdset_id, bool read_only,
        qemu_result_handler_t handler, void *userdata, qemu_destroy_t destroy) {
        char filename[32];

        snprintf(filename, sizeof(filename), "/dev/fdset/%u", fdset_id);
        return call(q, "blockdev-add",
                ARGS(A_STR("driver", "file"),
                        A_STR("node-name", node_name),
                        A_STR("filename", filename),
                        A_BOOL("read-only", read_only)),
                -1, handler, userdata, destroy);
}

int qemu_blockdev_add_format(Qmp *q, const char *driver, const char *node_name, const char *file_node,
        const char *backing, bool read_only, qemu_result_handler_t handler, void *userdata, qemu_destroy_t destroy) {
        return call(q, "blockdev-add",
                ARGS(A_STR("driver", driver),
                        A_STR("node-name", node_name),
                        A_STR("file", file_node),
                        A_BOOL("read-only", read_only),
                        /* Explicit, never from the header: null means no backing at all. */
                        { .key = "backing", .type = ARG_STRING_OR_NULL, .s = backing, .omit = streq(driver, "raw") }),
                -1, handler, userdata, destroy);
}

int qemu_getfd(Qmp *q, const char *fdname, int fd, qemu_result_handler_t handler, void *userdata,
        qemu_destroy_t destroy) {
        return call(q, "getfd", ARGS(A_STR("fdname", fdname)), fd, handler, userdata, destroy);
}

int qemu_nbd_server_start_fd(Qmp *q, const char *fdname, unsigned max_connections, qemu_result_handler_t handler,
        void *userdata, qemu_destroy_t destroy) {
        /* max-connections always given: QEMU's default is no limit in 7.2, but 100 in QEMUs with the
         * fix for CVE-2024-7409 (9.1, and Debian's 7.2), which would then decide for us. */
        return call(q, "nbd-server-start",
                ARGS(A_OBJ("addr", A_STR("type", "fd"), A_OBJ("data", A_STR("str", fdname))),
                        A_U64("max-connections", max_connections)),
                -1, handler, userdata, destroy);
}

int qemu_nbd_server_stop(Qmp *q, qemu_result_handler_t handler, void *userdata, qemu_destroy_t destroy) {
        return call(q, "nbd-server-stop", NULL, -1, handler, userdata, destroy);
}

int qemu_block_export_add_nbd(Qmp *q, const char *id, const char *node_name, const char *name,
        qemu_result_handler_t handler, void *userdata, qemu_destroy_t destroy) {
        return call(q, "block-export-add",
                ARGS(A_STR("type", "nbd"),
                        A_STR("id", id),
                        A_STR("node-name", node_name),
                        A_STR("name", name),
                        A_BOOL("writable", false),
                        A_BOOL("allocation-depth", true)),
                -1, handler, userdata, destroy);
}

int qemu_block_export_del(Qmp *q, const char *id, qemu_result_handler_t handler, void *userdata,
        qemu_destroy_t destroy) {
        /* hard: a connected client (a migration destination) must not keep it alive. */
        return call(q, "block-export-del", ARGS(A_STR("id", id), A_STR("mode", "hard")), -1, handler, userdata,
                destroy);
}

static void exports_tell(Qmp *q, Request *req, int error, const char *desc, char **ids, char **nodes) {
        if (req->with_nodes)
                req->handler.export_nodes(q, error, desc, ids, nodes, req->userdata);
        else
                req->handler.exports(q, error, desc, ids, req->userdata);
}

static void exports_reply(Qmp *q, int error, json_object *result, const char *cls, const char *desc, void *userdata) {
        Request *req = userdata;
        _cleanup_strv_free_ char **ids = NULL, **nodes = NULL;
        size_t n;

        if (error < 0) {
                exports_tell(q, req, error, desc, NULL, NULL);
                return;
        }
        if (!json_object_is_type(result, json_type_array) || (n = json_object_array_length(result)) > QEMU_JOBS_MAX)
                goto bad;
        ids = calloc(n + 1, sizeof(char *));
        nodes = calloc(n + 1, sizeof(char *));
        if (!ids || !nodes) {
                exports_tell(q, req, -ENOMEM, NULL, NULL, NULL);
                return;
        }
        for (size_t i = 0; i < n; i++) {
                json_object *e = json_object_array_get_idx(result, i);
                const char *id = NULL, *node = NULL;

                if (json_get_string(e, "id", true, &id) < 0 || !qemu_id_is_valid(id))
                        goto bad;
                if (req->with_nodes &&
                        (json_get_string(e, "node-name", true, &node) < 0 || !qemu_node_name_is_valid(node)))
                        goto bad;
                if (!(ids[i] = strdup(id)) || (node && !(nodes[i] = strdup(node)))) {
                        exports_tell(q, req, -ENOMEM, NULL, NULL, NULL);
                        return;
                }
        }
        exports_tell(q, req, 0, NULL, ids, nodes);
        return;
bad:
        exports_tell(q, req, -EBADMSG, "QEMU sent a malformed query-block-exports reply", NULL, NULL);
}

int qemu_query_block_exports(Qmp *q, qemu_exports_handler_t handler, void *userdata, qemu_destroy_t destroy) {
        Request *req = request_new(userdata, destroy);

        if (!req)
                return -ENOMEM;
        req->handler.exports = handler;
        return request_submit(q, "query-block-exports", NULL, req, exports_reply);
}

int qemu_query_block_export_nodes(Qmp *q, qemu_export_nodes_handler_t handler, void *userdata, qemu_destroy_t destroy) {
        Request *req = request_new(userdata, destroy);

        if (!req)
                return -ENOMEM;
        req->handler.export_nodes = handler;
        req->with_nodes = true;
        return request_submit(q, "query-block-exports", NULL, req, exports_reply);
}

int qemu_blockdev_add_cor(Qmp *q, const char *node_name, const char *file, const char *bottom,
        qemu_result_handler_t handler, void *userdata, qemu_destroy_t destroy) {
        return call(q, "blockdev-add",
                ARGS(A_STR("driver", "copy-on-read"),
                        A_STR("node-name", node_name),
                        A_STR("file", file),
                        A_STR_OPT("bottom", bottom)),
                -1, handler, userdata, destroy);
}

int qemu_blockdev_del(Qmp *q, const char *node_name, qemu_result_handler_t handler, void *userdata,
        qemu_destroy_t destroy) {
        return call(q, "blockdev-del", ARGS(A_STR("node-name", node_name)), -1, handler, userdata, destroy);
}

int qemu_quit(Qmp *q, qemu_result_handler_t handler, void *userdata, qemu_destroy_t destroy) {
        return call(q, "quit", NULL, -1, handler, userdata, destroy);
}

static void jobs_reply(Qmp *q, int error, json_object *result, const char *cls, const char *desc, void *userdata) {
        Request *req = userdata;
        QemuBlockJob *jobs = NULL;
        size_t n = 0;
        int r;

        if (error < 0) {
                req->handler.jobs(q, error, desc, NULL, 0, req->userdata);
                return;
        }
        r = qemu_parse_block_jobs(result, &jobs, &n);
        if (r < 0) {
                req->handler.jobs(q, r, "QEMU sent a malformed query-block-jobs reply", NULL, 0, req->userdata);
                return;
        }
        req->handler.jobs(q, 0, NULL, jobs, n, req->userdata);
        qemu_block_jobs_free(jobs, n);
}

int qemu_query_block_jobs(Qmp *q, qemu_jobs_handler_t handler, void *userdata, qemu_destroy_t destroy) {
        Request *req = request_new(userdata, destroy);

        if (!req)
                return -ENOMEM;
        req->handler.jobs = handler;
        return request_submit(q, "query-block-jobs", NULL, req, jobs_reply);
}

static void nodes_reply(Qmp *q, int error, json_object *result, const char *cls, const char *desc, void *userdata) {
        Request *req = userdata;
        QemuDisk *disks = NULL;
        size_t n = 0;
        int r;

        if (error < 0) {
                req->handler.disks(q, error, desc, NULL, 0, req->userdata);
                return;
        }
        if (req->blocks_charge.evicted) {
                req->handler.disks(q, -E2BIG,
                        "QEMU's query-block reply, kept while it put off its node names, gave way to others in the "
                        "memory the daemon holds for QEMUs' messages",
                        NULL, 0, req->userdata);
                return;
        }
        r = qemu_parse_disks(req->blocks, result, &disks, &n);
        if (r < 0) {
                req->handler.disks(q, r, "QEMU sent a malformed query-block or query-named-block-nodes reply", NULL, 0,
                        req->userdata);
                return;
        }
        req->handler.disks(q, 0, NULL, disks, n, req->userdata);
        qemu_disks_free(disks, n);
}

static void blocks_reply(Qmp *q, int error, json_object *result, const char *cls, const char *desc, void *userdata) {
        Request *req = userdata;
        json_object *args;
        int r;

        if (error < 0) {
                req->handler.disks(q, error, desc, NULL, 0, req->userdata);
                return;
        }
        /* Kept until QEMU answers the next call, which it may take its time over: it counts with the
         * messages every QEMU has begun and not ended. */
        if (!qmp_cost_may_hold(&req->blocks_charge, qmp_message_cost(q))) {
                char why[128];

                (void) snprintf(why, sizeof(why),
                        "QEMU's query-block reply, with other QEMUs' messages held, would take more than %u MiB "
                        "of memory to keep",
                        QMP_UNFINISHED_COST_MAX >> 20);
                req->handler.disks(q, -E2BIG, why, NULL, 0, req->userdata);
                return;
        }
        qmp_cost_charge(&req->blocks_charge, qmp_message_cost(q));
        req->blocks = json_object_get(result);
        if (req->skip_nodes) {
                nodes_reply(q, 0, NULL, NULL, NULL, req); /* disks without node names for the chain */
                return;
        }
        args = json_object_new_object();
        if (!args || json_object_object_add(args, "flat", json_object_new_boolean(true)) < 0) {
                json_object_put(args);
                req->handler.disks(q, -ENOMEM, NULL, NULL, 0, req->userdata);
                return;
        }
        /* The second call takes its own reference; this call's reference drops after we return. */
        req->n_ref++;
        r = qmp_call(q, "query-named-block-nodes", args, -1, nodes_reply, req, request_unref);
        if (r < 0) {
                req->n_ref--;
                req->handler.disks(q, r, NULL, NULL, 0, req->userdata);
        }
}

/* QEMU 7.2 segfaults in query-named-block-nodes while a block job that has stopped running is
 * not yet dismissed (seen for completed and for cancelled streams; checked by hand and in
 * test_restart). So look at the jobs first and skip the node names while any job is past
 * running; callers dismiss their own finished jobs before they read disks. */
static bool job_status_unsafe_for_node_query(QemuJobStatus s) {
        return s == QEMU_JOB_WAITING || s == QEMU_JOB_PENDING || s == QEMU_JOB_ABORTING || s == QEMU_JOB_CONCLUDED ||
               s == QEMU_JOB_NULL || s == QEMU_JOB_UNKNOWN;
}

static void disks_jobs_reply(Qmp *q, int error, json_object *result, const char *cls, const char *desc,
        void *userdata) {
        Request *req = userdata;
        QemuBlockJob *jobs = NULL;
        size_t n = 0;
        int r;

        if (error < 0) {
                req->handler.disks(q, error, desc, NULL, 0, req->userdata);
                return;
        }
        r = qemu_parse_block_jobs(result, &jobs, &n);
        if (r < 0) {
                req->handler.disks(q, r, "QEMU sent a malformed query-block-jobs reply", NULL, 0, req->userdata);
                return;
        }
        for (size_t i = 0; i < n && !req->skip_nodes; i++)
                if (job_status_unsafe_for_node_query(jobs[i].status)) {
                        log_warning("QEMU has job '%s' in state %s awaiting dismissal; reading disks without node "
                                    "names (QEMU 7.2 crashes on query-named-block-nodes then).",
                                jobs[i].id, qemu_job_status_to_string(jobs[i].status));
                        req->skip_nodes = true;
                }
        qemu_block_jobs_free(jobs, n);

        req->n_ref++;
        r = qmp_call(q, "query-block", NULL, -1, blocks_reply, req, request_unref);
        if (r < 0) {
                req->n_ref--;
                req->handler.disks(q, r, NULL, NULL, 0, req->userdata);
        }
}

int qemu_query_disks(Qmp *q, qemu_disks_handler_t handler, void *userdata, qemu_destroy_t destroy) {
        Request *req = request_new(userdata, destroy);

        if (!req)
                return -ENOMEM;
        req->handler.disks = handler;
        return request_submit(q, "query-block-jobs", NULL, req, disks_jobs_reply);
}

int qemu_blockdev_create_qcow2(Qmp *q, const char *job_id, unsigned fdset, const QemuQcow2Options *o,
        qemu_result_handler_t handler, void *userdata, qemu_destroy_t destroy) {
        char file[64];
        bool v3 = o->version == 3;

        if (o->version != 2 && o->version != 3)
                return -EINVAL;
        (void) snprintf(file, sizeof(file), "/dev/fdset/%u", fdset);
        /* The v3 features are left out of a v2 image (QEMU refuses them there, even off). */
        return call(q, "blockdev-create",
                ARGS(A_STR("job-id", job_id),
                        A_OBJ("options",
                                A_STR("driver", "qcow2"),
                                A_OBJ("file", A_STR("driver", "file"), A_STR("filename", file)),
                                A_U64("size", o->size),
                                A_STR("version", v3 ? "v3" : "v2"),
                                A_U64("cluster-size", o->cluster_size),
                                A_U64("refcount-bits", o->refcount_bits),
                                { .key = "lazy-refcounts", .type = ARG_BOOL, .b = o->lazy_refcounts, .omit = !v3 },
                                { .key = "extended-l2", .type = ARG_BOOL, .b = o->extended_l2, .omit = !v3 },
                                { .key = "compression-type", .type = ARG_STRING, .s = o->zstd ? "zstd" : "zlib",
                                        .omit = !v3 })),
                -1, handler, userdata, destroy);
}

int qemu_drive_mirror_new(Qmp *q, const char *job_id, const char *device, unsigned fdset, bool existing,
        const char *node_name, uint64_t speed, uint64_t buf_size, qemu_result_handler_t handler, void *userdata,
        qemu_destroy_t destroy) {
        char target[160];

        /* An image formatted first is opened as it exists: its file node read-write from the start.
         * The target takes the source's open flags, and a -drive disk's have auto-read-only=on, with
         * which QEMU opens the fd set read-only first and fails to switch (its fds are other open
         * file descriptions: the read-only one's locks block the "write" lock). QEMU still names the
         * node /dev/fdset/N. */
        if (existing)
                (void) snprintf(target, sizeof(target),
                        "json:{\"driver\":\"qcow2\",\"file\":{\"driver\":\"file\",\"filename\":\"/dev/fdset/%u\","
                        "\"auto-read-only\":false}}",
                        fdset);
        else
                (void) snprintf(target, sizeof(target), "/dev/fdset/%u", fdset);
        return call(q, "drive-mirror",
                ARGS(A_STR("job-id", job_id),
                        A_STR("device", device),
                        A_STR("target", target),
                        A_STR("format", "qcow2"),
                        A_STR("mode", existing ? "existing" : "absolute-paths"),
                        A_STR("node-name", node_name),
                        A_STR("sync", "full"),
                        A_U64("speed", speed),
                        A_U64("buf-size", buf_size),
                        A_BOOL("auto-finalize", false),
                        A_BOOL("auto-dismiss", false)),
                -1, handler, userdata, destroy);
}

int qemu_job_complete(Qmp *q, const char *job_id, qemu_result_handler_t handler, void *userdata,
        qemu_destroy_t destroy) {
        return call(q, "job-complete", ARGS(A_STR("id", job_id)), -1, handler, userdata, destroy);
}

int qemu_remove_fd(Qmp *q, unsigned fdset_id, qemu_result_handler_t handler, void *userdata, qemu_destroy_t destroy) {
        return call(q, "remove-fd", ARGS(A_U64("fdset-id", fdset_id)), -1, handler, userdata, destroy);
}
