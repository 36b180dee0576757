/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <inttypes.h>

#include "qemu.h"
#include "util.h"

static const char *const job_status_table[] = {
        [QEMU_JOB_UNKNOWN] = "unknown",
        [QEMU_JOB_CREATED] = "created",
        [QEMU_JOB_RUNNING] = "running",
        [QEMU_JOB_PAUSED] = "paused",
        [QEMU_JOB_READY] = "ready",
        [QEMU_JOB_STANDBY] = "standby",
        [QEMU_JOB_WAITING] = "waiting",
        [QEMU_JOB_PENDING] = "pending",
        [QEMU_JOB_ABORTING] = "aborting",
        [QEMU_JOB_CONCLUDED] = "concluded",
        [QEMU_JOB_NULL] = "null",
};

QemuJobStatus qemu_job_status_from_string(const char *s) {
        for (size_t i = QEMU_JOB_CREATED; i < ELEMENTSOF(job_status_table); i++)
                if (streq(s, job_status_table[i]))
                        return (QemuJobStatus) i;
        return QEMU_JOB_UNKNOWN;
}

const char *qemu_job_status_to_string(QemuJobStatus s) {
        if ((size_t) s >= ELEMENTSOF(job_status_table))
                return "unknown";
        return job_status_table[s];
}

/* Accessors */

int json_get_string(json_object *o, const char *key, bool required, const char **ret) {
        json_object *v;
        const char *s;

        if (!json_object_object_get_ex(o, key, &v))
                return required ? -ENODATA : 0;
        if (!json_object_is_type(v, json_type_string))
                return -EBADMSG;
        s = json_object_get_string(v);
        if ((size_t) json_object_get_string_len(v) != strlen(s) || strlen(s) > QEMU_STRING_MAX || !utf8_is_valid(s))
                return -EBADMSG;
        *ret = s;
        return 1;
}

int json_get_u64(json_object *o, const char *key, bool required, uint64_t *ret) {
        json_object *v;

        if (!json_object_object_get_ex(o, key, &v))
                return required ? -ENODATA : 0;
        if (!json_object_is_type(v, json_type_int))
                return -EBADMSG;
        /* json-c keeps values beyond INT64_MAX as uint64 and clamps beyond UINT64_MAX. */
        if (json_object_get_int64(v) < 0)
                return -EBADMSG;
        *ret = json_object_get_uint64(v);
        if (*ret == UINT64_MAX)
                return -EBADMSG; /* saturated: not a value QEMU would send */
        return 1;
}

int json_get_bool(json_object *o, const char *key, bool required, bool *ret) {
        json_object *v;

        if (!json_object_object_get_ex(o, key, &v))
                return required ? -ENODATA : 0;
        if (!json_object_is_type(v, json_type_boolean))
                return -EBADMSG;
        *ret = json_object_get_boolean(v);
        return 1;
}

static int strdup_checked(const char *s, char **ret) {
        if (!s) {
                *ret = NULL;
                return 0;
        }
        *ret = strdup(s);
        return *ret ? 0 : -ENOMEM;
}

/* Block jobs */

void qemu_block_jobs_free(QemuBlockJob *jobs, size_t n) {
        for (size_t i = 0; i < n; i++) {
                free(jobs[i].id);
                free(jobs[i].type);
                free(jobs[i].error);
        }
        free(jobs);
}

static int parse_block_job(json_object *o, QemuBlockJob *j) {
        const char *id = NULL, *type = NULL, *status = NULL, *error = NULL, *io_status = NULL;
        int r;

        if (!json_object_is_type(o, json_type_object))
                return -EBADMSG;
        if ((r = json_get_string(o, "device", true, &id)) < 0 || (r = json_get_string(o, "type", true, &type)) < 0 ||
                (r = json_get_string(o, "status", true, &status)) < 0 ||
                (r = json_get_u64(o, "len", true, &j->len)) < 0 ||
                (r = json_get_u64(o, "offset", true, &j->offset)) < 0 ||
                (r = json_get_u64(o, "speed", true, &j->speed)) < 0 ||
                (r = json_get_string(o, "error", false, &error)) < 0 ||
                (r = json_get_string(o, "io-status", false, &io_status)) < 0)
                return -EBADMSG;
        if (!qemu_id_is_valid(id))
                return -EBADMSG;
        j->status = qemu_job_status_from_string(status);
        /* Anything else than these two (or none) is "ok": it only decides what Error says. */
        j->io_status = streq_ptr(io_status, "nospace")  ? QEMU_IO_NOSPACE
                       : streq_ptr(io_status, "failed") ? QEMU_IO_FAILED
                                                        : QEMU_IO_OK;
        if (strdup_checked(id, &j->id) < 0 || strdup_checked(type, &j->type) < 0)
                return -ENOMEM;
        if (error && !(j->error = text_sanitize_str(error)))
                return -ENOMEM;
        return 0;
}

int qemu_parse_block_jobs(json_object *ret, QemuBlockJob **jobs, size_t *n_jobs) {
        QemuBlockJob *l;
        size_t n;
        int r;

        if (!json_object_is_type(ret, json_type_array))
                return -EBADMSG;
        n = json_object_array_length(ret);
        if (n > QEMU_JOBS_MAX)
                return -E2BIG;
        l = calloc(n ?: 1, sizeof(QemuBlockJob));
        if (!l)
                return -ENOMEM;
        for (size_t i = 0; i < n; i++) {
                r = parse_block_job(json_object_array_get_idx(ret, i), &l[i]);
                if (r < 0) {
                        qemu_block_jobs_free(l, n);
                        return r;
                }
        }
        *jobs = l;
        *n_jobs = n;
        return 0;
}

/* Events */

int qemu_parse_job_event(const char *name, json_object *data, QemuJobEvent *ev) {
        const char *status = NULL;
        int r = 0;

        *ev = (QemuJobEvent) {};
        if (streq(name, "JOB_STATUS_CHANGE")) {
                ev->kind = QEMU_EVENT_JOB_STATUS_CHANGE;
                if (json_get_string(data, "id", true, &ev->id) < 0 ||
                        json_get_string(data, "status", true, &status) < 0 || !qemu_id_is_valid(ev->id))
                        return -EBADMSG;
                ev->status = qemu_job_status_from_string(status);
                return 1;
        }
        if (streq(name, "BLOCK_JOB_COMPLETED"))
                ev->kind = QEMU_EVENT_BLOCK_JOB_COMPLETED;
        else if (streq(name, "BLOCK_JOB_CANCELLED"))
                ev->kind = QEMU_EVENT_BLOCK_JOB_CANCELLED;
        else if (streq(name, "BLOCK_JOB_READY"))
                ev->kind = QEMU_EVENT_BLOCK_JOB_READY;
        else if (streq(name, "BLOCK_JOB_ERROR"))
                ev->kind = QEMU_EVENT_BLOCK_JOB_ERROR;
        else
                return 0;

        if (json_get_string(data, "device", true, &ev->id) < 0 || !qemu_id_is_valid(ev->id))
                return -EBADMSG;
        if (ev->kind == QEMU_EVENT_BLOCK_JOB_ERROR) {
                if (json_get_string(data, "action", true, &ev->action) < 0)
                        return -EBADMSG;
                return 1;
        }
        if ((r = json_get_u64(data, "len", true, &ev->len)) < 0 || (r = json_get_u64(data, "offset", true, &ev->offset)) < 0 ||
                (r = json_get_u64(data, "speed", false, &ev->speed)) < 0 ||
                (r = json_get_string(data, "error", false, &ev->error)) < 0)
                return -EBADMSG;
        if (ev->error) {
                /* It becomes the job's Error: QEMU's words, made fit to show. */
                (void) text_sanitize_buf(ev->error_text, sizeof(ev->error_text), ev->error, strlen(ev->error));
                ev->error = ev->error_text;
        }
        ev->has_progress = true;
        return 1;
}

/* Disks */

static void qemu_image_done(QemuImage *i) {
        free(i->filename);
        free(i->format);
        free(i->node_name);
}

void qemu_disks_free(QemuDisk *disks, size_t n) {
        for (size_t i = 0; i < n; i++) {
                QemuDisk *d = &disks[i];
                free(d->alias);
                free(d->node_name);
                free(d->filename);
                free(d->format);
                for (size_t j = 0; j < d->n_chain; j++)
                        qemu_image_done(&d->chain[j]);
                free(d->chain);
        }
        free(disks);
}

/* query-named-block-nodes, indexed once by (file, drv): a chain image finds its node by binary
 * search. Scanning every node for every image made a QEMU with many disks and deep chains cost
 * the daemon seconds of CPU per reply (256 disks x 128 images x 4096 nodes). */
typedef struct NodeRef {
        const char *file, *drv, *name; /* borrowed from the reply */
        size_t idx;                    /* position in the reply: the first one listed wins */
} NodeRef;

typedef struct NodeIndex {
        NodeRef *refs;
        size_t n;
} NodeIndex;

static int node_ref_cmp(const void *a, const void *b) {
        const NodeRef *x = a, *y = b;
        int c = strcmp(x->file, y->file);

        if (c == 0)
                c = strcmp(x->drv, y->drv);
        if (c == 0)
                c = x->idx < y->idx ? -1 : x->idx > y->idx;
        return c;
}

static void node_index_done(NodeIndex *ix) {
        ix->refs = mfree(ix->refs);
        ix->n = 0;
}

/* Every node's fields are read and checked once here; malformed nodes are left out, as before. */
static int node_index_build(NodeIndex *ix, json_object *nodes) {
        size_t n;

        *ix = (NodeIndex) {};
        if (!nodes)
                return 0;
        n = json_object_array_length(nodes);
        ix->refs = calloc(n ?: 1, sizeof(NodeRef));
        if (!ix->refs)
                return -ENOMEM;
        for (size_t i = 0; i < n; i++) {
                json_object *o = json_object_array_get_idx(nodes, i);
                const char *file = NULL, *drv = NULL, *name = NULL;

                if (!json_object_is_type(o, json_type_object))
                        continue;
                if (json_get_string(o, "file", true, &file) < 0 || json_get_string(o, "drv", true, &drv) < 0 ||
                        json_get_string(o, "node-name", true, &name) < 0 || !qemu_node_name_is_valid(name))
                        continue;
                ix->refs[ix->n++] = (NodeRef) { .file = file, .drv = drv, .name = name, .idx = i };
        }
        qsort(ix->refs, ix->n, sizeof(NodeRef), node_ref_cmp);
        return 0;
}

/* The node that holds filename in format fmt: a format node, not the protocol node below it
 * (both report the same file). */
static const char *find_node(const NodeIndex *ix, const char *filename, const char *fmt) {
        size_t lo = 0, hi = ix->n;

        /* The first entry not below (filename, fmt, 0): the earliest listed match, if any. */
        while (lo < hi) {
                size_t mid = lo + (hi - lo) / 2;
                const NodeRef *r = &ix->refs[mid];
                int c = strcmp(r->file, filename);

                if (c == 0)
                        c = strcmp(r->drv, fmt);
                if (c < 0)
                        lo = mid + 1;
                else
                        hi = mid;
        }
        if (lo < ix->n && streq(ix->refs[lo].file, filename) && streq(ix->refs[lo].drv, fmt))
                return ix->refs[lo].name;
        return NULL;
}

static char *alias_from_qdev(const char *qdev) {
        static const char prefix[] = "/machine/peripheral/";
        const char *s;
        size_t n;

        if (!qdev || strncmp(qdev, prefix, sizeof(prefix) - 1) != 0)
                return NULL;
        s = qdev + sizeof(prefix) - 1;
        n = strcspn(s, "/");
        if (n == 0)
                return NULL;
        return strndup(s, n);
}

static int parse_image(json_object *image, QemuImage *ret, uint64_t *size, uint64_t *cluster) {
        const char *filename = NULL, *format = NULL;

        if (!json_object_is_type(image, json_type_object))
                return -EBADMSG;
        if (json_get_string(image, "filename", true, &filename) < 0 || json_get_string(image, "format", true, &format) < 0)
                return -EBADMSG;
        if (size && json_get_u64(image, "virtual-size", true, size) < 0)
                return -EBADMSG;
        if (cluster && json_get_u64(image, "cluster-size", false, cluster) < 0)
                return -EBADMSG;
        if (isempty(filename) || isempty(format))
                return -EBADMSG;
        if (strdup_checked(filename, &ret->filename) < 0 || strdup_checked(format, &ret->format) < 0)
                return -ENOMEM;
        return 0;
}

static int parse_disk(json_object *block, const NodeIndex *nodes, QemuDisk *d) {
        json_object *inserted, *image, *backing;
        const char *qdev = NULL, *device = NULL, *node = NULL;
        QemuImage top = {};
        int r;

        if (!json_object_is_type(block, json_type_object))
                return -EBADMSG;
        if (!json_object_object_get_ex(block, "inserted", &inserted))
                return 0; /* an empty drive: nothing to stream */
        if (!json_object_is_type(inserted, json_type_object))
                return -EBADMSG;
        if (json_get_string(block, "qdev", false, &qdev) < 0 || json_get_string(block, "device", false, &device) < 0 ||
                json_get_string(inserted, "node-name", true, &node) < 0 ||
                json_get_bool(inserted, "ro", false, &d->read_only) < 0)
                return -EBADMSG;
        if (!json_object_object_get_ex(inserted, "image", &image))
                return -EBADMSG;

        /* Every name QEMU gives is checked here, so that nothing downstream sees one that is not
         * valid: an alias names sockets, object paths, URIs and polkit's details; a node name goes
         * back to QEMU and into the state file. An honest QEMU only makes valid ones. */
        if (!qemu_node_name_is_valid(node))
                return -EBADMSG;
        d->alias = alias_from_qdev(qdev);
        if (!d->alias)
                d->alias = strdup(!isempty(device) ? device : node);
        if (!d->alias)
                return -ENOMEM;
        if (!qemu_id_is_valid(d->alias))
                return -EBADMSG;
        if (!(d->node_name = strdup(node)))
                return -ENOMEM;

        r = parse_image(image, &top, &d->virtual_size, &d->cluster_size);
        if (r < 0)
                return r;
        d->filename = TAKE_PTR(top.filename);
        d->format = TAKE_PTR(top.format);

        /* Walk the nested backing images iteratively: the depth is QEMU's to choose, ours to bound. */
        for (json_object *cur = image; json_object_object_get_ex(cur, "backing-image", &backing); cur = backing) {
                QemuImage *c;
                const char *nn;

                if (d->n_chain >= QEMU_CHAIN_MAX)
                        return -E2BIG;
                c = reallocarray(d->chain, d->n_chain + 1, sizeof(QemuImage));
                if (!c)
                        return -ENOMEM;
                d->chain = c;
                c = &d->chain[d->n_chain];
                *c = (QemuImage) {};
                r = parse_image(backing, c, NULL, NULL);
                if (r < 0) {
                        qemu_image_done(c);
                        return r;
                }
                d->n_chain++;
                nn = nodes ? find_node(nodes, c->filename, c->format) : NULL;
                if (nn && !(c->node_name = strdup(nn)))
                        return -ENOMEM;
        }
        return 1;
}

int qemu_parse_disks(json_object *blocks, json_object *nodes, QemuDisk **ret, size_t *n_ret) {
        _cleanup_(node_index_done) NodeIndex ix = {};
        QemuDisk *l;
        size_t n, k = 0;
        int r;

        if (!json_object_is_type(blocks, json_type_array))
                return -EBADMSG;
        if (nodes && (!json_object_is_type(nodes, json_type_array) || json_object_array_length(nodes) > QEMU_NODES_MAX))
                return -EBADMSG;
        n = json_object_array_length(blocks);
        if (n > QEMU_DISKS_MAX)
                return -E2BIG;
        r = node_index_build(&ix, nodes);
        if (r < 0)
                return r;
        l = calloc(n ?: 1, sizeof(QemuDisk));
        if (!l)
                return -ENOMEM;
        for (size_t i = 0; i < n; i++) {
                r = parse_disk(json_object_array_get_idx(blocks, i), nodes ? &ix : NULL, &l[k]);
                if (r < 0) {
                        qemu_disks_free(l, k + 1);
                        return r;
                }
                if (r == 0)
                        continue;
                /* Two disks with one alias would make addressing ambiguous. */
                for (size_t j = 0; j < k; j++)
                        if (streq(l[j].alias, l[k].alias)) {
                                qemu_disks_free(l, k + 1);
                                return -EBADMSG;
                        }
                k++;
        }
        *ret = l;
        *n_ret = k;
        return 0;
}

/* Asynchronous typed calls */

typedef struct Request {
        unsigned n_ref;
        union {
                qemu_result_handler_t result;
                qemu_disks_handler_t disks;
                qemu_jobs_handler_t jobs;
                qemu_exports_handler_t exports;
        } handler;
        void *userdata;
        qemu_destroy_t destroy;
        json_object *blocks; /* query_disks: query-block's reply, kept for the node names */
        bool skip_nodes;     /* query_disks: asking for node names now would crash QEMU */
} Request;

static Request *request_new(void *userdata, qemu_destroy_t destroy) {
        Request *r = calloc(1, sizeof(Request));

        if (!r)
                return NULL;
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

static int simple_call(Qmp *q, const char *command, json_object *args, qemu_result_handler_t handler, void *userdata,
        qemu_destroy_t destroy) {
        Request *req;

        if (!args)
                return -ENOMEM; /* every typed call has arguments: a NULL here is a failed allocation */
        req = request_new(userdata, destroy);
        if (!req) {
                json_object_put(args);
                return -ENOMEM;
        }
        req->handler.result = handler;
        return request_submit(q, command, args, req, result_reply);
}

static json_object *args_with_string(const char *key, const char *value) {
        json_object *o = json_object_new_object();

        if (o && json_object_object_add(o, key, json_object_new_string(value)) < 0) {
                json_object_put(o);
                return NULL;
        }
        return o;
}

int qemu_block_stream(Qmp *q, const QemuStreamArgs *a, qemu_result_handler_t handler, void *userdata,
        qemu_destroy_t destroy) {
        json_object *o;

        if (a->speed > INT64_MAX)
                return -ERANGE;
        o = json_object_new_object();
        if (!o || json_object_object_add(o, "job-id", json_object_new_string(a->job_id)) < 0 ||
                json_object_object_add(o, "device", json_object_new_string(a->node_name)) < 0 ||
                (a->base_node && json_object_object_add(o, "base-node", json_object_new_string(a->base_node)) < 0) ||
                (a->backing_file &&
                        json_object_object_add(o, "backing-file", json_object_new_string(a->backing_file)) < 0) ||
                (a->speed > 0 && json_object_object_add(o, "speed", json_object_new_int64((int64_t) a->speed)) < 0) ||
                /* QEMU 7.2 drops the backing file from the header at finalization while the
                 * copied clusters' L2 entries may still wait in its cache: the daemon flushes the
                 * node first, then finalizes (JOB_NEEDS_FINALIZE). */
                json_object_object_add(o, "auto-finalize", json_object_new_boolean(false)) < 0 ||
                json_object_object_add(o, "auto-dismiss", json_object_new_boolean(false)) < 0 ||
                /* A full disk pauses the job (Resume retries once space is freed); any other
                 * error, a failing template above all, fails it with QEMU's reason. */
                json_object_object_add(o, "on-error", json_object_new_string("enospc")) < 0) {
                json_object_put(o);
                return -ENOMEM;
        }
        return simple_call(q, "block-stream", o, handler, userdata, destroy);
}

int qemu_block_job_pause(Qmp *q, const char *job_id, qemu_result_handler_t handler, void *userdata,
        qemu_destroy_t destroy) {
        return simple_call(q, "block-job-pause", args_with_string("device", job_id), handler, userdata, destroy);
}

int qemu_block_job_resume(Qmp *q, const char *job_id, qemu_result_handler_t handler, void *userdata,
        qemu_destroy_t destroy) {
        return simple_call(q, "block-job-resume", args_with_string("device", job_id), handler, userdata, destroy);
}

int qemu_block_job_cancel(Qmp *q, const char *job_id, qemu_result_handler_t handler, void *userdata,
        qemu_destroy_t destroy) {
        json_object *o = args_with_string("device", job_id);

        /* force: QEMU refuses to cancel a paused job otherwise. */
        if (o && json_object_object_add(o, "force", json_object_new_boolean(true)) < 0) {
                json_object_put(o);
                o = NULL;
        }
        return simple_call(q, "block-job-cancel", o, handler, userdata, destroy);
}

int qemu_block_job_set_speed(Qmp *q, const char *job_id, uint64_t speed, qemu_result_handler_t handler,
        void *userdata, qemu_destroy_t destroy) {
        json_object *o;

        if (speed > INT64_MAX)
                return -ERANGE;
        o = args_with_string("device", job_id);
        if (o && json_object_object_add(o, "speed", json_object_new_int64((int64_t) speed)) < 0) {
                json_object_put(o);
                o = NULL;
        }
        return simple_call(q, "block-job-set-speed", o, handler, userdata, destroy);
}

int qemu_job_dismiss(Qmp *q, const char *job_id, qemu_result_handler_t handler, void *userdata,
        qemu_destroy_t destroy) {
        return simple_call(q, "job-dismiss", args_with_string("id", job_id), handler, userdata, destroy);
}

int qemu_job_finalize(Qmp *q, const char *job_id, qemu_result_handler_t handler, void *userdata,
        qemu_destroy_t destroy) {
        return simple_call(q, "job-finalize", args_with_string("id", job_id), handler, userdata, destroy);
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
        json_object *o;
        Request *req;

        /* QEMU 7.2 has no QMP command that flushes one node; HMP's qemu-io does, and takes a node
         * name. The name goes into a command line: only a valid one ([#]letter, then letters,
         * digits, "_.-": no blank, no quote) may. */
        if (!qemu_node_name_is_valid(node_name))
                return -EINVAL;
        line = strdup_printf("qemu-io %s flush", node_name);
        if (!line)
                return -ENOMEM;
        o = args_with_string("command-line", line);
        if (!o)
                return -ENOMEM;
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
        json_object *o = json_object_new_object();
        Request *req;
        int r;

        if (!o || json_object_object_add(o, "fdset-id", json_object_new_int64(fdset_id)) < 0 ||
                (opaque && json_object_object_add(o, "opaque", json_object_new_string(opaque)) < 0)) {
                json_object_put(o);
                closep(&fd);
                return -ENOMEM;
        }
        req = request_new(userdata, destroy);
        if (!req) {
                json_object_put(o);
                closep(&fd);
                return -ENOMEM;
        }
        req->handler.result = handler;
        r = qmp_call(q, "add-fd", o, fd, result_reply, req, request_unref);
        if (r < 0) {
                req->destroy = NULL;
                request_unref(req);
        }
        return r;
}

int qemu_blockdev_add_file(Qmp *q, const char *node_name, unsigned fdset_id, bool read_only,
        qemu_result_handler_t handler, void *userdata, qemu_destroy_t destroy) {
        _cleanup_free_ char *filename = strdup_printf("/dev/fdset/%u", fdset_id);
        json_object *o = json_object_new_object();

        if (!filename || !o || json_object_object_add(o, "driver", json_object_new_string("file")) < 0 ||
                json_object_object_add(o, "node-name", json_object_new_string(node_name)) < 0 ||
                json_object_object_add(o, "filename", json_object_new_string(filename)) < 0 ||
                json_object_object_add(o, "read-only", json_object_new_boolean(read_only)) < 0) {
                json_object_put(o);
                return -ENOMEM;
        }
        return simple_call(q, "blockdev-add", o, handler, userdata, destroy);
}

int qemu_blockdev_add_format(Qmp *q, const char *driver, const char *node_name, const char *file_node,
        const char *backing, bool read_only, qemu_result_handler_t handler, void *userdata, qemu_destroy_t destroy) {
        json_object *o = json_object_new_object();
        bool has_backing = !streq(driver, "raw");

        if (!o || json_object_object_add(o, "driver", json_object_new_string(driver)) < 0 ||
                json_object_object_add(o, "node-name", json_object_new_string(node_name)) < 0 ||
                json_object_object_add(o, "file", json_object_new_string(file_node)) < 0 ||
                json_object_object_add(o, "read-only", json_object_new_boolean(read_only)) < 0 ||
                /* Explicit, never from the header: null means no backing at all. */
                (has_backing && json_object_object_add(o, "backing", backing ? json_object_new_string(backing) : NULL) < 0)) {
                json_object_put(o);
                return -ENOMEM;
        }
        return simple_call(q, "blockdev-add", o, handler, userdata, destroy);
}

int qemu_getfd(Qmp *q, const char *fdname, int fd, qemu_result_handler_t handler, void *userdata,
        qemu_destroy_t destroy) {
        json_object *o = args_with_string("fdname", fdname);
        Request *req;
        int r;

        req = o ? request_new(userdata, destroy) : NULL;
        if (!req) {
                json_object_put(o);
                closep(&fd);
                return -ENOMEM;
        }
        req->handler.result = handler;
        r = qmp_call(q, "getfd", o, fd, result_reply, req, request_unref);
        if (r < 0) {
                req->destroy = NULL;
                request_unref(req);
        }
        return r;
}

int qemu_nbd_server_start_fd(Qmp *q, const char *fdname, qemu_result_handler_t handler, void *userdata,
        qemu_destroy_t destroy) {
        json_object *o = json_object_new_object(), *addr = json_object_new_object(), *data = args_with_string("str", fdname);

        if (!o || !addr || !data || json_object_object_add(addr, "type", json_object_new_string("fd")) < 0 ||
                json_object_object_add(addr, "data", data) < 0) {
                json_object_put(o);
                json_object_put(addr);
                json_object_put(data);
                return -ENOMEM;
        }
        if (json_object_object_add(o, "addr", addr) < 0) {
                json_object_put(o);
                json_object_put(addr);
                return -ENOMEM;
        }
        return simple_call(q, "nbd-server-start", o, handler, userdata, destroy);
}

int qemu_nbd_server_stop(Qmp *q, qemu_result_handler_t handler, void *userdata, qemu_destroy_t destroy) {
        Request *req = request_new(userdata, destroy);

        if (!req)
                return -ENOMEM;
        req->handler.result = handler;
        return request_submit(q, "nbd-server-stop", NULL, req, result_reply);
}

int qemu_block_export_add_nbd(Qmp *q, const char *id, const char *node_name, const char *name,
        qemu_result_handler_t handler, void *userdata, qemu_destroy_t destroy) {
        json_object *o = json_object_new_object();

        if (!o || json_object_object_add(o, "type", json_object_new_string("nbd")) < 0 ||
                json_object_object_add(o, "id", json_object_new_string(id)) < 0 ||
                json_object_object_add(o, "node-name", json_object_new_string(node_name)) < 0 ||
                json_object_object_add(o, "name", json_object_new_string(name)) < 0 ||
                json_object_object_add(o, "writable", json_object_new_boolean(false)) < 0 ||
                json_object_object_add(o, "allocation-depth", json_object_new_boolean(true)) < 0) {
                json_object_put(o);
                return -ENOMEM;
        }
        return simple_call(q, "block-export-add", o, handler, userdata, destroy);
}

int qemu_block_export_del(Qmp *q, const char *id, qemu_result_handler_t handler, void *userdata,
        qemu_destroy_t destroy) {
        json_object *o = args_with_string("id", id);

        /* hard: a connected client (a migration destination) must not keep it alive. */
        if (o && json_object_object_add(o, "mode", json_object_new_string("hard")) < 0) {
                json_object_put(o);
                o = NULL;
        }
        return simple_call(q, "block-export-del", o, handler, userdata, destroy);
}

static void exports_reply(Qmp *q, int error, json_object *result, const char *cls, const char *desc, void *userdata) {
        Request *req = userdata;
        _cleanup_strv_free_ char **ids = NULL;
        size_t n;

        if (error < 0) {
                req->handler.exports(q, error, desc, NULL, req->userdata);
                return;
        }
        if (!json_object_is_type(result, json_type_array) || (n = json_object_array_length(result)) > QEMU_JOBS_MAX)
                goto bad;
        ids = calloc(n + 1, sizeof(char *));
        if (!ids) {
                req->handler.exports(q, -ENOMEM, NULL, NULL, req->userdata);
                return;
        }
        for (size_t i = 0; i < n; i++) {
                const char *id = NULL;
                if (json_get_string(json_object_array_get_idx(result, i), "id", true, &id) < 0 || !qemu_id_is_valid(id))
                        goto bad;
                if (!(ids[i] = strdup(id))) {
                        req->handler.exports(q, -ENOMEM, NULL, NULL, req->userdata);
                        return;
                }
        }
        req->handler.exports(q, 0, NULL, ids, req->userdata);
        return;
bad:
        req->handler.exports(q, -EBADMSG, "QEMU sent a malformed query-block-exports reply", NULL, req->userdata);
}

int qemu_query_block_exports(Qmp *q, qemu_exports_handler_t handler, void *userdata, qemu_destroy_t destroy) {
        Request *req = request_new(userdata, destroy);

        if (!req)
                return -ENOMEM;
        req->handler.exports = handler;
        return request_submit(q, "query-block-exports", NULL, req, exports_reply);
}

int qemu_blockdev_add_cor(Qmp *q, const char *node_name, const char *file, const char *bottom,
        qemu_result_handler_t handler, void *userdata, qemu_destroy_t destroy) {
        json_object *o = json_object_new_object();

        if (!o || json_object_object_add(o, "driver", json_object_new_string("copy-on-read")) < 0 ||
                json_object_object_add(o, "node-name", json_object_new_string(node_name)) < 0 ||
                json_object_object_add(o, "file", json_object_new_string(file)) < 0 ||
                (bottom && json_object_object_add(o, "bottom", json_object_new_string(bottom)) < 0)) {
                json_object_put(o);
                return -ENOMEM;
        }
        return simple_call(q, "blockdev-add", o, handler, userdata, destroy);
}

int qemu_blockdev_del(Qmp *q, const char *node_name, qemu_result_handler_t handler, void *userdata,
        qemu_destroy_t destroy) {
        return simple_call(q, "blockdev-del", args_with_string("node-name", node_name), handler, userdata, destroy);
}

int qemu_parse_export_deleted(const char *name, json_object *data, const char **ret_id) {
        if (!streq(name, "BLOCK_EXPORT_DELETED"))
                return 0;
        if (json_get_string(data, "id", true, ret_id) < 0 || !qemu_id_is_valid(*ret_id))
                return -EBADMSG;
        return 1;
}

int qemu_parse_image_size(const char *text, size_t len, uint64_t *ret) {
        _cleanup_(json_object_putp) json_object *o = NULL;
        json_tokener *tok;
        uint64_t size = 0;

        if (len > 1024 * 1024)
                return -E2BIG;
        tok = json_tokener_new_ex(64);
        if (!tok)
                return -ENOMEM;
        json_tokener_set_flags(tok, JSON_TOKENER_STRICT);
        o = json_tokener_parse_ex(tok, text, (int) len);
        json_tokener_free(tok);
        if (!o || !json_object_is_type(o, json_type_object) || json_get_u64(o, "virtual-size", true, &size) < 0)
                return -EBADMSG;
        *ret = size;
        return 0;
}

int qemu_quit(Qmp *q, qemu_result_handler_t handler, void *userdata, qemu_destroy_t destroy) {
        Request *req = request_new(userdata, destroy);

        if (!req)
                return -ENOMEM;
        req->handler.result = handler;
        return request_submit(q, "quit", NULL, req, result_reply);
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
