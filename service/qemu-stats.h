/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* The guest device's I/O statistics, typed (issue 13): query-blockstats' reply for one device,
 * its read-latency histogram (block-latency-histogram-set), deltas between two readings and a
 * percentile estimate from a delta. Every field type-checked and bounded: the peer is
 * untrusted. No D-Bus. */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "qemu.h"

#define QEMU_HISTOGRAM_BINS_MAX 64
#define QEMU_QDEV_PATH_MAX 256

typedef struct QemuLatencyHistogram {
        size_t n_bins;                                    /* 0: none; else the boundaries + 1 */
        uint64_t boundaries[QEMU_HISTOGRAM_BINS_MAX - 1]; /* ns, strictly increasing, > 0 */
        uint64_t bins[QEMU_HISTOGRAM_BINS_MAX];           /* bins[i]: [boundaries[i-1], boundaries[i]) */
} QemuLatencyHistogram;

typedef struct QemuBlockStats {
        char qdev[QEMU_QDEV_PATH_MAX]; /* the device's QOM path ("/machine/peripheral/vda/virtio-backend") */
        uint64_t rd_operations, wr_operations, flush_operations;
        uint64_t rd_bytes, wr_bytes;
        QemuLatencyHistogram rd_histogram; /* n_bins 0: no histogram set on the device */
} QemuBlockStats;

/* query-blockstats' reply → the stats of the guest device with qdev id `alias` (the entry whose
 * "qdev" is /machine/peripheral/ALIAS or below it). -ENOENT: no such device (a disk known only by
 * its BlockBackend name has no guest device, and block-latency-histogram-set takes devices
 * only); -EBADMSG: a malformed reply, or two entries claiming the device. */
int qemu_parse_blockstats(json_object *reply, const char *alias, QemuBlockStats *ret);

/* cur - prev, bin by bin. -ESTALE when they cannot be compared (other boundaries, a counter that
 * went back: the histogram was reset or QEMU restarted): start a new window. -ENODATA when
 * either has no histogram. */
int qemu_latency_histogram_delta(
        const QemuLatencyHistogram *prev, const QemuLatencyHistogram *cur, QemuLatencyHistogram *ret);

/* The number of samples (saturating). */
uint64_t qemu_latency_histogram_count(const QemuLatencyHistogram *h);

/* The permille-th percentile (990: p99) in ns: interpolated linearly inside its bin; in the last,
 * open bin its lower boundary (the estimate is then "at least"). -ENODATA: no samples;
 * -EINVAL: permille out of 1..1000. */
int qemu_latency_histogram_percentile(const QemuLatencyHistogram *h, unsigned permille, uint64_t *ret_ns);

/* Boundaries (ns) for read latencies from 50 µs to 10 s, about 1-2-5 per decade. */
extern const uint64_t qemu_latency_boundaries_default[];
extern const size_t qemu_latency_boundaries_default_n;

/* block-latency-histogram-set's arguments: the read boundaries on the device at QOM path qdev
 * (from QemuBlockStats.qdev). -EINVAL: bad path or boundaries. */
int qemu_latency_histogram_set_args(const char *qdev, const uint64_t *boundaries_ns, size_t n, json_object **ret);

int qemu_block_latency_histogram_set(Qmp *q, const char *qdev, const uint64_t *boundaries_ns, size_t n,
        qemu_result_handler_t handler, void *userdata, qemu_destroy_t destroy);

/* query-blockstats, parsed for the device `alias`. stats is NULL on error and valid only during
 * the call. */
typedef void (*qemu_blockstats_handler_t)(
        Qmp *q, int error, const char *error_desc, const QemuBlockStats *stats, void *userdata);
int qemu_query_blockstats(
        Qmp *q, const char *alias, qemu_blockstats_handler_t handler, void *userdata, qemu_destroy_t destroy);

/* block-latency-histogram-set with no boundaries: the device's read histogram removed again. */
int qemu_block_latency_histogram_clear(
        Qmp *q, const char *qdev, qemu_result_handler_t handler, void *userdata, qemu_destroy_t destroy);
