/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <errno.h>
#include <string.h>

#include "qemu-stats.h"
#include "util.h"

#define QDEV_PREFIX "/machine/peripheral/"

const uint64_t qemu_latency_boundaries_default[] = {
        50000ULL,
        100000ULL,
        200000ULL,
        300000ULL,
        500000ULL,
        750000ULL,
        1000000ULL,
        1500000ULL,
        2000000ULL,
        3000000ULL,
        5000000ULL,
        7500000ULL,
        10000000ULL,
        15000000ULL,
        20000000ULL,
        30000000ULL,
        50000000ULL,
        75000000ULL,
        100000000ULL,
        200000000ULL,
        500000000ULL,
        1000000000ULL,
        2000000000ULL,
        5000000000ULL,
        10000000000ULL,
};
const size_t qemu_latency_boundaries_default_n = ELEMENTSOF(qemu_latency_boundaries_default);

/* A QOM path we pass back to QEMU: /machine/peripheral/..., printable, no "..", bounded. */
static bool qdev_path_is_valid(const char *s) {
        size_t n = strlen(s);

        if (n <= strlen(QDEV_PREFIX) || n >= QEMU_QDEV_PATH_MAX || strncmp(s, QDEV_PREFIX, strlen(QDEV_PREFIX)) != 0)
                return false;
        for (const char *p = s; *p; p++)
                if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
                            strchr("/-_.", *p)))
                        return false;
        return !strstr(s, "//") && !strstr(s, "/./") && !strstr(s, "/../") && s[n - 1] != '/';
}

/* The entry's qdev names the device alias itself or a child of it ("…/vda/virtio-backend"). */
static bool qdev_matches(const char *qdev, const char *alias) {
        size_t n = strlen(alias);
        const char *s;

        if (strncmp(qdev, QDEV_PREFIX, strlen(QDEV_PREFIX)) != 0)
                return false;
        s = qdev + strlen(QDEV_PREFIX);
        return n > 0 && strncmp(s, alias, n) == 0 && (s[n] == '\0' || s[n] == '/');
}

static int parse_u64_array(json_object *a, uint64_t *out, size_t max, size_t *ret_n) {
        size_t n;

        if (!json_object_is_type(a, json_type_array))
                return -EBADMSG;
        n = json_object_array_length(a);
        if (n > max)
                return -EBADMSG;
        for (size_t i = 0; i < n; i++) {
                json_object *v = json_object_array_get_idx(a, i);

                if (!json_object_is_type(v, json_type_int) || json_object_get_int64(v) < 0)
                        return -EBADMSG;
                out[i] = json_object_get_uint64(v);
                if (out[i] == UINT64_MAX)
                        return -EBADMSG; /* saturated by json-c */
        }
        *ret_n = n;
        return 0;
}

static int parse_histogram(json_object *o, QemuLatencyHistogram *h) {
        json_object *boundaries, *bins;
        size_t n_boundaries, n_bins;
        int r;

        if (!json_object_is_type(o, json_type_object))
                return -EBADMSG;
        if (!json_object_object_get_ex(o, "boundaries", &boundaries) || !json_object_object_get_ex(o, "bins", &bins))
                return -EBADMSG;
        r = parse_u64_array(boundaries, h->boundaries, ELEMENTSOF(h->boundaries), &n_boundaries);
        if (r < 0)
                return r;
        r = parse_u64_array(bins, h->bins, ELEMENTSOF(h->bins), &n_bins);
        if (r < 0)
                return r;
        if (n_boundaries == 0 || n_bins != n_boundaries + 1)
                return -EBADMSG;
        for (size_t i = 0; i < n_boundaries; i++)
                if (h->boundaries[i] == 0 || (i > 0 && h->boundaries[i] <= h->boundaries[i - 1]))
                        return -EBADMSG;
        h->n_bins = n_bins;
        return 0;
}

static int parse_stats(json_object *entry, QemuBlockStats *s) {
        json_object *stats, *histogram;
        int r;

        if (!json_object_object_get_ex(entry, "stats", &stats) || !json_object_is_type(stats, json_type_object))
                return -EBADMSG;
        if ((r = json_get_u64(stats, "rd_operations", true, &s->rd_operations)) < 0 ||
                (r = json_get_u64(stats, "wr_operations", true, &s->wr_operations)) < 0 ||
                (r = json_get_u64(stats, "flush_operations", true, &s->flush_operations)) < 0 ||
                (r = json_get_u64(stats, "rd_bytes", true, &s->rd_bytes)) < 0 ||
                (r = json_get_u64(stats, "wr_bytes", true, &s->wr_bytes)) < 0)
                return -EBADMSG;
        if (json_object_object_get_ex(stats, "rd_latency_histogram", &histogram)) {
                r = parse_histogram(histogram, &s->rd_histogram);
                if (r < 0)
                        return r;
        }
        return 0;
}

int qemu_parse_blockstats(json_object *reply, const char *alias, QemuBlockStats *ret) {
        json_object *found = NULL;
        const char *found_qdev = NULL;
        QemuBlockStats *s;
        size_t n;
        int r;

        if (!alias || !*alias || strchr(alias, '/'))
                return -EINVAL;
        if (!json_object_is_type(reply, json_type_array))
                return -EBADMSG;
        n = json_object_array_length(reply);
        if (n > QEMU_DISKS_MAX)
                return -EBADMSG;
        for (size_t i = 0; i < n; i++) {
                json_object *e = json_object_array_get_idx(reply, i);
                const char *qdev = NULL, *device = NULL;

                if (!json_object_is_type(e, json_type_object))
                        return -EBADMSG;
                if (json_get_string(e, "qdev", false, &qdev) < 0 || json_get_string(e, "device", false, &device) < 0)
                        return -EBADMSG;
                if (!qdev || !qdev_matches(qdev, alias))
                        continue;
                if (found)
                        return -EBADMSG; /* two devices claim the alias: believe neither */
                found = e;
                found_qdev = qdev;
        }
        if (!found)
                return -ENOENT;
        if (!qdev_path_is_valid(found_qdev))
                return -EBADMSG;

        s = calloc(1, sizeof(*s));
        if (!s)
                return -ENOMEM;
        r = parse_stats(found, s);
        if (r < 0) {
                free(s);
                return r;
        }
        strcpy(s->qdev, found_qdev); /* length checked by qdev_path_is_valid */
        *ret = *s;
        free(s);
        return 0;
}

int qemu_latency_histogram_delta(
        const QemuLatencyHistogram *prev, const QemuLatencyHistogram *cur, QemuLatencyHistogram *ret) {
        QemuLatencyHistogram d = {};

        if (prev->n_bins == 0 || cur->n_bins == 0)
                return -ENODATA;
        if (prev->n_bins != cur->n_bins || prev->n_bins > QEMU_HISTOGRAM_BINS_MAX ||
                memcmp(prev->boundaries, cur->boundaries, (cur->n_bins - 1) * sizeof(uint64_t)) != 0)
                return -ESTALE;
        for (size_t i = 0; i < cur->n_bins; i++) {
                if (cur->bins[i] < prev->bins[i])
                        return -ESTALE;
                d.bins[i] = cur->bins[i] - prev->bins[i];
        }
        memcpy(d.boundaries, cur->boundaries, (cur->n_bins - 1) * sizeof(uint64_t));
        d.n_bins = cur->n_bins;
        *ret = d;
        return 0;
}

uint64_t qemu_latency_histogram_count(const QemuLatencyHistogram *h) {
        uint64_t total = 0;

        for (size_t i = 0; i < MIN(h->n_bins, (size_t) QEMU_HISTOGRAM_BINS_MAX); i++)
                total = h->bins[i] > UINT64_MAX - total ? UINT64_MAX : total + h->bins[i];
        return total;
}

int qemu_latency_histogram_percentile(const QemuLatencyHistogram *h, unsigned permille, uint64_t *ret_ns) {
        unsigned __int128 rank, cum = 0;
        uint64_t total;
        size_t n;

        if (permille == 0 || permille > 1000)
                return -EINVAL;
        n = MIN(h->n_bins, (size_t) QEMU_HISTOGRAM_BINS_MAX);
        total = qemu_latency_histogram_count(h);
        if (n == 0 || total == 0)
                return -ENODATA;
        /* The sample of this rank (1-based, rounded up) is the percentile. */
        rank = ((unsigned __int128) total * permille + 999) / 1000;
        for (size_t i = 0; i < n; i++) {
                uint64_t lower = i == 0 ? 0 : h->boundaries[i - 1];

                if (h->bins[i] == 0 || cum + h->bins[i] < rank) {
                        cum += h->bins[i];
                        continue;
                }
                if (i == n - 1) {
                        *ret_ns = lower; /* open bin: at least its lower boundary */
                        return 0;
                }
                /* Linearly inside [lower, upper): the rank-th of bins[i] evenly spread samples. */
                *ret_ns =
                        lower + (uint64_t) ((unsigned __int128) (h->boundaries[i] - lower) * (rank - cum) / h->bins[i]);
                return 0;
        }
        return -ENODATA; /* not reached: rank <= total */
}

int qemu_latency_histogram_set_args(const char *qdev, const uint64_t *boundaries_ns, size_t n, json_object **ret) {
        json_object *o, *a;

        if (!qdev || !qdev_path_is_valid(qdev) || n == 0 || n > QEMU_HISTOGRAM_BINS_MAX - 1)
                return -EINVAL;
        for (size_t i = 0; i < n; i++)
                if (boundaries_ns[i] == 0 || boundaries_ns[i] > INT64_MAX ||
                        (i > 0 && boundaries_ns[i] <= boundaries_ns[i - 1]))
                        return -EINVAL;
        o = json_object_new_object();
        a = json_object_new_array();
        if (!o || !a) {
                json_object_put(o);
                json_object_put(a);
                return -ENOMEM;
        }
        for (size_t i = 0; i < n; i++)
                if (json_object_array_add(a, json_object_new_int64((int64_t) boundaries_ns[i])) < 0) {
                        json_object_put(o);
                        json_object_put(a);
                        return -ENOMEM;
                }
        if (json_object_object_add(o, "id", json_object_new_string(qdev)) < 0) {
                json_object_put(o);
                json_object_put(a);
                return -ENOMEM;
        }
        if (json_object_object_add(o, "boundaries-read", a) < 0) {
                json_object_put(o);
                json_object_put(a);
                return -ENOMEM;
        }
        *ret = o;
        return 0;
}

/* Asynchronous calls */

typedef struct StatsRequest {
        qemu_result_handler_t result_handler;
        qemu_blockstats_handler_t stats_handler;
        char *alias;
        void *userdata;
        qemu_destroy_t destroy;
} StatsRequest;

static void stats_request_free(void *p) {
        StatsRequest *req = p;

        if (!req)
                return;
        if (req->destroy)
                req->destroy(req->userdata);
        free(req->alias);
        free(req);
}

static int stats_submit(Qmp *q, const char *command, json_object *args, StatsRequest *req, qmp_reply_handler_t h) {
        int r = qmp_call(q, command, args, -1, h, req, stats_request_free);

        if (r < 0) {
                /* The caller keeps its userdata. */
                req->destroy = NULL;
                stats_request_free(req);
        }
        return r;
}

static void result_reply(Qmp *q, int error, json_object *result, const char *cls, const char *desc, void *userdata) {
        StatsRequest *req = userdata;

        if (req->result_handler)
                req->result_handler(q, error, desc, req->userdata);
}

int qemu_block_latency_histogram_set(Qmp *q, const char *qdev, const uint64_t *boundaries_ns, size_t n,
        qemu_result_handler_t handler, void *userdata, qemu_destroy_t destroy) {
        StatsRequest *req;
        json_object *args;
        int r;

        r = qemu_latency_histogram_set_args(qdev, boundaries_ns, n, &args);
        if (r < 0)
                return r;
        req = calloc(1, sizeof(*req));
        if (!req) {
                json_object_put(args);
                return -ENOMEM;
        }
        *req = (StatsRequest){.result_handler = handler, .userdata = userdata, .destroy = destroy};
        return stats_submit(q, "block-latency-histogram-set", args, req, result_reply);
}

int qemu_block_latency_histogram_clear(
        Qmp *q, const char *qdev, qemu_result_handler_t handler, void *userdata, qemu_destroy_t destroy) {
        StatsRequest *req;
        json_object *args, *id;

        if (!qdev || !qdev_path_is_valid(qdev))
                return -EINVAL;
        args = json_object_new_object();
        id = json_object_new_string(qdev);
        if (!args || !id || json_object_object_add(args, "id", id) < 0) {
                json_object_put(args);
                json_object_put(id);
                return -ENOMEM;
        }
        req = calloc(1, sizeof(*req));
        if (!req) {
                json_object_put(args);
                return -ENOMEM;
        }
        *req = (StatsRequest){.result_handler = handler, .userdata = userdata, .destroy = destroy};
        return stats_submit(q, "block-latency-histogram-set", args, req, result_reply);
}

static void blockstats_reply(
        Qmp *q, int error, json_object *result, const char *cls, const char *desc, void *userdata) {
        StatsRequest *req = userdata;
        QemuBlockStats *s;
        int r;

        if (error < 0) {
                req->stats_handler(q, error, desc, NULL, req->userdata);
                return;
        }
        s = calloc(1, sizeof(*s));
        if (!s) {
                req->stats_handler(q, -ENOMEM, NULL, NULL, req->userdata);
                return;
        }
        r = qemu_parse_blockstats(result, req->alias, s);
        if (r < 0)
                req->stats_handler(q, r,
                        r == -ENOENT ? "QEMU reports no statistics for the device"
                                     : "QEMU sent a malformed query-blockstats reply",
                        NULL, req->userdata);
        else
                req->stats_handler(q, 0, NULL, s, req->userdata);
        free(s);
}

int qemu_query_blockstats(
        Qmp *q, const char *alias, qemu_blockstats_handler_t handler, void *userdata, qemu_destroy_t destroy) {
        StatsRequest *req;

        if (!alias || !*alias || strchr(alias, '/') || strlen(alias) > QEMU_STRING_MAX || !handler)
                return -EINVAL;
        req = calloc(1, sizeof(*req));
        if (!req)
                return -ENOMEM;
        req->alias = strdup(alias);
        if (!req->alias) {
                free(req);
                return -ENOMEM;
        }
        req->stats_handler = handler;
        req->userdata = userdata;
        req->destroy = destroy;
        return stats_submit(q, "query-blockstats", NULL, req, blockstats_reply);
}
