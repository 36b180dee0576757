/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* QEMU's block commands, typed: one builder shape for every command's arguments, the replies
 * handed over parsed (qemu-reply.h: every field type-checked and bounded, the peer is
 * untrusted). No D-Bus. */

#include <stdbool.h>
#include <stdint.h>

#include "qemu-reply.h"
#include "qmp.h"
#include "util.h"

/* Typed asynchronous commands. handler gets 0 or a negative errno; for -EREMOTEIO error_desc
 * is QEMU's message. destroy(userdata) runs exactly once, after the handler or when dropped.
 * On failure to submit, nothing is called and the caller keeps userdata. */
typedef void (*qemu_result_handler_t)(Qmp *q, int error, const char *error_desc, void *userdata);
typedef void (*qemu_disks_handler_t)(Qmp *q, int error, const char *error_desc, QemuDisk *disks, size_t n,
        void *userdata);
typedef void (*qemu_jobs_handler_t)(Qmp *q, int error, const char *error_desc, QemuBlockJob *jobs, size_t n,
        void *userdata);

typedef void (*qemu_destroy_t)(void *userdata);

int qemu_query_disks(Qmp *q, qemu_disks_handler_t handler, void *userdata, qemu_destroy_t destroy);
int qemu_query_block_jobs(Qmp *q, qemu_jobs_handler_t handler, void *userdata, qemu_destroy_t destroy);

typedef struct QemuStreamArgs {
        const char *job_id;
        const char *node_name;
        const char *base_node; /* NULL: the whole chain */
        const char *backing_file; /* what the top's header names as its new backing; NULL: QEMU's
                                   * idea (the base node's filename, /dev/fdset/N for fd-fed images) */
        uint64_t speed;        /* 0: unlimited */
} QemuStreamArgs;

int qemu_block_stream(Qmp *q, const QemuStreamArgs *a, qemu_result_handler_t handler, void *userdata,
        qemu_destroy_t destroy);
int qemu_block_job_pause(Qmp *q, const char *job_id, qemu_result_handler_t handler, void *userdata,
        qemu_destroy_t destroy);
int qemu_block_job_resume(Qmp *q, const char *job_id, qemu_result_handler_t handler, void *userdata,
        qemu_destroy_t destroy);
int qemu_block_job_cancel(Qmp *q, const char *job_id, qemu_result_handler_t handler, void *userdata,
        qemu_destroy_t destroy);
int qemu_block_job_set_speed(Qmp *q, const char *job_id, uint64_t speed, qemu_result_handler_t handler,
        void *userdata, qemu_destroy_t destroy);
/* job-finalize of a job started with auto-finalize off, once it is "pending". */
int qemu_job_finalize(Qmp *q, const char *job_id, qemu_result_handler_t handler, void *userdata,
        qemu_destroy_t destroy);
/* Flush one node (its format's metadata caches and its file) through HMP's qemu-io; an error
 * printed by QEMU comes as -EIO with its text. */
int qemu_flush_node(Qmp *q, const char *node_name, qemu_result_handler_t handler, void *userdata,
        qemu_destroy_t destroy);
int qemu_job_dismiss(Qmp *q, const char *job_id, qemu_result_handler_t handler, void *userdata,
        qemu_destroy_t destroy);

/* An offline guest's images, attached to the storage helper as fds: add-fd (fd passed with
 * SCM_RIGHTS into fd set fdset_id), then a "file" node on /dev/fdset/N and a format node on it.
 * backing: the backing format node's name; NULL: none (no "backing" key for raw). */
int qemu_add_fd(Qmp *q, unsigned fdset_id, int fd, const char *opaque, qemu_result_handler_t handler, void *userdata,
        qemu_destroy_t destroy);
int qemu_blockdev_add_file(Qmp *q, const char *node_name, unsigned fdset_id, bool read_only,
        qemu_result_handler_t handler, void *userdata, qemu_destroy_t destroy);
int qemu_blockdev_add_format(Qmp *q, const char *driver, const char *node_name, const char *file_node,
        const char *backing, bool read_only, qemu_result_handler_t handler, void *userdata, qemu_destroy_t destroy);
int qemu_quit(Qmp *q, qemu_result_handler_t handler, void *userdata, qemu_destroy_t destroy);

/* The NBD server on a listening socket we made (getfd, then nbd-server-start with type fd),
 * and read-only exports on it. */
int qemu_getfd(Qmp *q, const char *fdname, int fd, qemu_result_handler_t handler, void *userdata,
        qemu_destroy_t destroy);
int qemu_nbd_server_start_fd(Qmp *q, const char *fdname, unsigned max_connections, qemu_result_handler_t handler,
        void *userdata, qemu_destroy_t destroy);
int qemu_nbd_server_stop(Qmp *q, qemu_result_handler_t handler, void *userdata, qemu_destroy_t destroy);
int qemu_block_export_add_nbd(Qmp *q, const char *id, const char *node_name, const char *name,
        qemu_result_handler_t handler, void *userdata, qemu_destroy_t destroy);
int qemu_block_export_del(Qmp *q, const char *id, qemu_result_handler_t handler, void *userdata,
        qemu_destroy_t destroy);
/* query-block-exports: the export ids (a NULL-terminated list). */
typedef void (*qemu_exports_handler_t)(Qmp *q, int error, const char *error_desc, char **ids, void *userdata);
int qemu_query_block_exports(Qmp *q, qemu_exports_handler_t handler, void *userdata, qemu_destroy_t destroy);
/* The same, with the node each export reads now (nodes[i] for ids[i]): a filter put over a node
 * takes its exports along. */
typedef void (*qemu_export_nodes_handler_t)(
        Qmp *q, int error, const char *error_desc, char **ids, char **nodes, void *userdata);
int qemu_query_block_export_nodes(Qmp *q, qemu_export_nodes_handler_t handler, void *userdata, qemu_destroy_t destroy);

/* The copy-on-read filter of range streaming: over file (the disk's top node), copying from the
 * images down to bottom (inclusive; NULL: all). */
int qemu_blockdev_add_cor(Qmp *q, const char *node_name, const char *file, const char *bottom,
        qemu_result_handler_t handler, void *userdata, qemu_destroy_t destroy);
/* The mirror engine (mirror.c): mirror device (sync=full, auto-finalize and auto-dismiss off)
 * onto a qcow2 image in fd set fdset, node node_name (drive-mirror): a new one QEMU formats with
 * its defaults (mode absolute-paths), or, existing, the one formatted before by
 * qemu_blockdev_create_qcow2() (a job: blockdev-create, ended by its JOB_STATUS_CHANGE
 * "concluded"); complete a job that is ready, and drop an fd set. */
typedef struct QemuQcow2Options {
        uint64_t size, cluster_size;
        uint32_t version; /* 2 or 3 */
        uint32_t refcount_bits;
        bool lazy_refcounts, extended_l2, zstd; /* v3 only */
} QemuQcow2Options;
int qemu_blockdev_create_qcow2(Qmp *q, const char *job_id, unsigned fdset, const QemuQcow2Options *o,
        qemu_result_handler_t handler, void *userdata, qemu_destroy_t destroy);
int qemu_drive_mirror_new(Qmp *q, const char *job_id, const char *device, unsigned fdset, bool existing,
        const char *node_name, uint64_t speed, uint64_t buf_size, qemu_result_handler_t handler, void *userdata,
        qemu_destroy_t destroy);
int qemu_job_complete(
        Qmp *q, const char *job_id, qemu_result_handler_t handler, void *userdata, qemu_destroy_t destroy);
int qemu_remove_fd(Qmp *q, unsigned fdset_id, qemu_result_handler_t handler, void *userdata, qemu_destroy_t destroy);
int qemu_blockdev_del(Qmp *q, const char *node_name, qemu_result_handler_t handler, void *userdata,
        qemu_destroy_t destroy);
