/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <inttypes.h>

#include "qemu-reply.h"
#include "qmp.h"
#include "util.h"

/* Values in `qemu-img info --output=json` of one image (qemu_parse_image_size()). */
#define IMAGE_INFO_VALUES_MAX 16384U

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

int json_get_uint64(json_object *o, const char *key, bool required, uint64_t *ret) {
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
                return -EBADMSG; /* saturated */
        return 1;
}

int json_get_u64(json_object *o, const char *key, bool required, uint64_t *ret) {
        uint64_t v = 0;
        int r;

        /* QMP's integers are int64 (sizes and offsets in QEMU too), and nothing QEMU sends is
         * beyond: refused, so that no sum or product of two of them wraps. */
        r = json_get_uint64(o, key, required, &v);
        if (r <= 0)
                return r;
        if (v > (uint64_t) INT64_MAX)
                return -EBADMSG;
        *ret = v;
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
                free(d->file);
                for (size_t j = 0; j < d->n_chain; j++)
                        qemu_image_done(&d->chain[j]);
                free(d->chain);
        }
        free(disks);
}

/* QEMU's own names for nodes nobody named ("#block123"); '#' is not valid in a name given by a user. */
static bool node_name_by_qemu(const char *name) {
        return name && name[0] == '#';
}

/* query-named-block-nodes, indexed once by (file, drv): a chain image finds its node by binary
 * search. Scanning every node for every image made a QEMU with many disks and deep chains cost
 * the daemon seconds of CPU per reply (256 disks x 128 images x 4096 nodes). */
typedef struct NodeRef {
        const char *file, *drv, *name; /* borrowed from the reply */
        size_t idx;                    /* position in the reply: the first one listed wins */
        bool file_by_qemu;             /* on a file's first entry: QEMU named all its nodes */
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
        /* Whether every node of a file has a name QEMU made, once per file, on the group's first
         * entry: asked for each image of each disk, a walk of the group each time would be
         * quadratic in what a QEMU lists. */
        for (size_t i = 0, j; i < ix->n; i = j) {
                bool by_qemu = true;

                for (j = i; j < ix->n && streq(ix->refs[j].file, ix->refs[i].file); j++)
                        by_qemu = by_qemu && node_name_by_qemu(ix->refs[j].name);
                ix->refs[i].file_by_qemu = by_qemu;
        }
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
        /* Ranges are widened to it: a power of two from 512 bytes to 1 GiB, or unknown (0: 64 KiB).
         * Not every format's is one (a Parallels image's is its tracks x 512), and a disk the
         * daemon does not stream may be of any: such a size is no reason to refuse the guest. */
        if (cluster && *cluster != 0 && (*cluster < 512 || *cluster > (1U << 30) || (*cluster & (*cluster - 1)) != 0))
                *cluster = 0;
        if (isempty(filename) || isempty(format))
                return -EBADMSG;
        if (strdup_checked(filename, &ret->filename) < 0 || strdup_checked(format, &ret->format) < 0)
                return -ENOMEM;
        return 0;
}

/* A format node whose options QEMU cannot express as a file name is named "json:" and its full
 * options: a qcow2 node opened with an explicit backing node other than the one its header names
 * (libvirt's -blockdev chains; a relative backing name is enough) is
 * json:{"backing": {…}, "driver": "qcow2", "file": {"driver": "file", "filename": "/…"}}.
 * Its image file is that "file" child, taken only when it is a plain "file" driver node (no other
 * option, an absolute path) and QEMU lists a "file" node of that path. *ret is NULL otherwise: a
 * name we cannot read is not an error, the disk is just not known by a path. */
/* The options in a "json:" name, or NULL (not one, not valid JSON, or out of memory). */
static json_object *json_name_parse(const char *name) {
        json_object *o;
        json_tokener *tok;
        const char *text;

        if (strncmp(name, "json:", 5) != 0)
                return NULL;
        text = name + 5;
        /* The whole chain's options nest in the name: two levels per image, bounded by the length. */
        tok = json_tokener_new_ex(2 * QEMU_CHAIN_MAX + 8);
        if (!tok)
                return NULL;
        json_tokener_set_flags(tok, JSON_TOKENER_STRICT);
        o = json_tokener_parse_ex(tok, text, (int) strlen(text));
        if (o && (json_tokener_get_error(tok) != json_tokener_success ||
                         json_tokener_get_parse_end(tok) != strlen(text) || !json_object_is_type(o, json_type_object))) {
                json_object_put(o);
                o = NULL;
        }
        json_tokener_free(tok);
        return o;
}

static int json_name_file(const char *name, const char *format, const NodeIndex *nodes, char **ret) {
        _cleanup_(json_object_putp) json_object *o = NULL;
        const char *driver = NULL, *filename = NULL;
        json_object *file;

        *ret = NULL;
        if (!nodes || strncmp(name, "json:", 5) != 0)
                return 0;
        o = json_name_parse(name);
        if (!o || json_get_string(o, "driver", true, &driver) < 0 ||
                !streq(driver, format) || !json_object_object_get_ex(o, "file", &file) ||
                !json_object_is_type(file, json_type_object) || json_object_object_length(file) != 2 ||
                json_get_string(file, "driver", true, &driver) < 0 || !streq(driver, "file") ||
                json_get_string(file, "filename", true, &filename) < 0 || filename[0] != '/' ||
                !find_node(nodes, filename, "file"))
                return 0;
        return strdup_checked(filename, ret);
}

static bool driver_local(const char *driver) {
        return streq(driver, "file") || streq(driver, "host_device") || streq(driver, "host_cdrom");
}

bool qemu_image_name_remote(const char *name) {
        _cleanup_(json_object_putp) json_object *o = NULL;
        const char *driver = NULL;
        char proto[sizeof("host_device")]; /* the longest local driver's name */
        json_object *file;
        size_t n;

        if (!name || name[0] == '/')
                return false;
        if (strncmp(name, "json:", 5) == 0) {
                /* The innermost "file" child is the protocol node: a local file, or not. */
                o = json_name_parse(name);
                for (json_object *i = o; i; i = file) {
                        if (json_get_string(i, "driver", true, &driver) < 0)
                                return false;
                        if (!json_object_object_get_ex(i, "file", &file) || !json_object_is_type(file, json_type_object))
                                return !driver_local(driver);
                }
                return false; /* not readable: not known to be remote */
        }
        /* QEMU's own rule (path_has_protocol()): "proto:" before any '/' is a protocol. */
        n = strcspn(name, ":/");
        if (name[n] != ':')
                return false; /* a relative path */
        if (n >= sizeof(proto))
                return true; /* longer than any local driver's name */
        memcpy(proto, name, n);
        proto[n] = 0;
        return !driver_local(proto);
}

/* QEMU's filter drivers (is_filter in 7.2): a node of theirs over a disk is someone else's
 * (libvirt's backup puts a copy-before-write there), not the disk's image. query-block shows the
 * filtered node as the filter's "backing-image". */
static bool format_is_filter(const char *format) {
        static const char *const filters[] = {
                "blkdebug", "blklogwrites", "blkverify", "compress", "copy-before-write",
                "copy-on-read", "preallocate", "throttle", "replication",
        };

        for (size_t i = 0; i < ELEMENTSOF(filters); i++)
                if (streq(format, filters[i]))
                        return true;
        return false;
}

/* Every node QEMU lists over this file (its format node, the protocol node under it, and any
 * other node of the same file, another disk's over a shared template included) has a name QEMU
 * made: nobody named a node the mirror would replace or leave behind. No index: not known. */
static bool file_nodes_by_qemu(const NodeIndex *ix, const char *filename) {
        size_t lo = 0, hi;

        if (!ix || !filename)
                return false;
        hi = ix->n;
        while (lo < hi) {
                size_t mid = lo + (hi - lo) / 2;

                if (strcmp(ix->refs[mid].file, filename) < 0)
                        lo = mid + 1;
                else
                        hi = mid;
        }
        /* lo: the first of the file's group, which holds the answer (node_index_build()). */
        return lo >= ix->n || !streq(ix->refs[lo].file, filename) || ix->refs[lo].file_by_qemu;
}

/* Skip the filters on top of a disk: its image is the first node under them that is not one.
 * Returns that node's image object and sets *node to its name (found among the named nodes);
 * without the named nodes (or a name for it), the top stays as QEMU gave it. */
static json_object *skip_filters(json_object *image, const NodeIndex *nodes, const char **node, bool *names_by_qemu) {
        json_object *cur = image;

        for (unsigned depth = 0; depth < QEMU_CHAIN_MAX; depth++) {
                json_object *below;
                const char *format = NULL, *filename = NULL, *nn;

                if (!json_object_is_type(cur, json_type_object) || json_get_string(cur, "format", true, &format) < 0 ||
                        !format_is_filter(format) || !json_object_object_get_ex(cur, "backing-image", &below))
                        break;
                if (!json_object_is_type(below, json_type_object) ||
                        json_get_string(below, "filename", true, &filename) < 0 ||
                        json_get_string(below, "format", true, &format) < 0)
                        break;
                nn = nodes ? find_node(nodes, filename, format) : NULL;
                if (!nn)
                        break;
                *node = nn;
                *names_by_qemu = *names_by_qemu && node_name_by_qemu(nn);
                cur = below;
        }
        return cur;
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
        d->names_by_qemu = node_name_by_qemu(node);
        image = skip_filters(image, nodes, &node, &d->names_by_qemu);

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
        d->names_by_qemu = d->names_by_qemu && file_nodes_by_qemu(nodes, d->filename);
        r = json_name_file(d->filename, d->format, nodes, &d->file);
        if (r < 0)
                return r;

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
                d->names_by_qemu = d->names_by_qemu && node_name_by_qemu(nn) && file_nodes_by_qemu(nodes, c->filename);
        }
        return 1;
}

static size_t len0(const char *s) {
        return s ? strlen(s) : 0;
}

size_t qemu_disks_text(const QemuDisk *disks, size_t n_disks) {
        size_t n = 0;

        for (size_t k = 0; k < n_disks; k++) {
                const QemuDisk *d = &disks[k];

                n += len0(d->alias) + len0(d->node_name) + len0(d->filename) + len0(d->format) + len0(d->file);
                for (size_t i = 0; i < d->n_chain; i++)
                        n += len0(d->chain[i].filename) + len0(d->chain[i].format) + len0(d->chain[i].node_name);
        }
        return n;
}

int qemu_parse_disks(json_object *blocks, json_object *nodes, QemuDisk **ret, size_t *n_ret) {
        _cleanup_(node_index_done) NodeIndex ix = {};
        size_t n, k = 0;
        QemuDisk *l;
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

int qemu_parse_export_deleted(const char *name, json_object *data, const char **ret_id) {
        if (!streq(name, "BLOCK_EXPORT_DELETED"))
                return 0;
        if (json_get_string(data, "id", true, ret_id) < 0 || !qemu_id_is_valid(*ret_id))
                return -EBADMSG;
        return 1;
}

/* The values a JSON text holds, at most: its commas and openers outside strings, plus one. */
static size_t json_values_max(const char *text, size_t len) {
        size_t n = 1;
        bool in_string = false;

        for (size_t i = 0; i < len; i++) {
                char c = text[i];

                if (in_string) {
                        if (c == '\\')
                                i++;
                        else if (c == '"')
                                in_string = false;
                } else if (c == '"')
                        in_string = true;
                else if (c == ',' || c == '[' || c == '{')
                        n++;
        }
        return n;
}

int qemu_parse_image_size(const char *text, size_t len, uint64_t *ret) {
        _cleanup_(json_object_putp) json_object *o = NULL;
        json_tokener *tok;
        uint64_t size = 0;

        /* Bounded before json-c builds anything: 256 KiB of "[{},{},…]" from a qemu-img taken
         * over would be some 70 MB of json-c's objects in the daemon. An image's info, bitmaps
         * and all, is far below. */
        if (len > 1024 * 1024 || json_values_max(text, len) > IMAGE_INFO_VALUES_MAX)
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
