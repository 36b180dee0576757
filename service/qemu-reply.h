/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* What QEMU's replies and events mean, typed: parsers (every field type-checked and bounded:
 * the peer is untrusted) of query-block-jobs, job events, query-block and
 * query-named-block-nodes, BLOCK_EXPORT_DELETED and `qemu-img info`. No connection, no D-Bus. */

#include <json-c/json.h>
#include <stdbool.h>
#include <stdint.h>

#include "util.h"

#define QEMU_DISKS_MAX 256
#define QEMU_CHAIN_MAX 128
#define QEMU_JOBS_MAX 1024
#define QEMU_NODES_MAX 4096
#define QEMU_STRING_MAX 4096
/* The text of all a guest's disks together (names, paths, chains), at most: what we keep of them
 * goes into the guest's state record, which a start reads up to 4 MiB of (JSON may escape a byte
 * as six). */
#define QEMU_DISKS_TEXT_MAX (512U * 1024U)

/* Does QEMU's name of an image say it is not on this machine: a URL (nbd://, http(s)://, …), a
 * "proto:" name other than a file's, or a json:{…} name whose protocol node (the innermost
 * "file") is not a local file or device? A path, absolute or relative, is local; a json: name that
 * cannot be read counts as local (not known to be remote). */
bool qemu_image_name_remote(const char *name);

typedef enum QemuJobStatus {
        QEMU_JOB_UNKNOWN,
        QEMU_JOB_CREATED,
        QEMU_JOB_RUNNING,
        QEMU_JOB_PAUSED,
        QEMU_JOB_READY,
        QEMU_JOB_STANDBY,
        QEMU_JOB_WAITING,
        QEMU_JOB_PENDING,
        QEMU_JOB_ABORTING,
        QEMU_JOB_CONCLUDED,
        QEMU_JOB_NULL,
} QemuJobStatus;

QemuJobStatus qemu_job_status_from_string(const char *s);
const char *qemu_job_status_to_string(QemuJobStatus s);

/* A job's io-status: why QEMU paused it on an error (block-stream's on-error). */
typedef enum QemuIoStatus {
        QEMU_IO_OK,      /* also when QEMU does not say */
        QEMU_IO_FAILED,  /* an I/O error */
        QEMU_IO_NOSPACE, /* ENOSPC */
} QemuIoStatus;

/* One entry of query-block-jobs. */
typedef struct QemuBlockJob {
        char *id;
        char *type;
        QemuJobStatus status;
        uint64_t len, offset, speed;
        char *error; /* NULL: none */
        QemuIoStatus io_status;
} QemuBlockJob;

void qemu_block_jobs_free(QemuBlockJob *jobs, size_t n);
int qemu_parse_block_jobs(json_object *ret, QemuBlockJob **jobs, size_t *n_jobs);

typedef enum QemuEventKind {
        QEMU_EVENT_OTHER,
        QEMU_EVENT_JOB_STATUS_CHANGE,
        QEMU_EVENT_BLOCK_JOB_COMPLETED,
        QEMU_EVENT_BLOCK_JOB_CANCELLED,
        QEMU_EVENT_BLOCK_JOB_ERROR,
        QEMU_EVENT_BLOCK_JOB_READY,
} QemuEventKind;

/* A job event; the strings are borrowed from the event's JSON, but for the error. Ids are valid
 * QEMU identifiers (else -EBADMSG). */
typedef struct QemuJobEvent {
        QemuEventKind kind;
        const char *id;
        QemuJobStatus status; /* JOB_STATUS_CHANGE */
        uint64_t len, offset, speed;
        bool has_progress;
        const char *error;  /* BLOCK_JOB_COMPLETED: set if the job failed (points to error_text) */
        const char *action; /* BLOCK_JOB_ERROR */
        char error_text[TEXT_SANITIZE_MAX + 1]; /* QEMU's error, sanitized (text_sanitize) */
} QemuJobEvent;

/* 0: not a job event (ret->kind == QEMU_EVENT_OTHER); 1: parsed; -EBADMSG: malformed. */
int qemu_parse_job_event(const char *name, json_object *data, QemuJobEvent *ret);

/* One image of a disk's chain. */
typedef struct QemuImage {
        char *filename;
        char *format;
        char *node_name; /* NULL if QEMU did not name it */
} QemuImage;

typedef struct QemuDisk {
        char *alias;     /* qdev id ("vda"), else the BlockBackend name, else the node name */
        char *node_name; /* top node */
        char *filename;
        char *format;
        /* Where QEMU names the top image json:{…} (a guest started with -blockdev and an explicit
         * backing node): the file of its format node's "file" child, if that is a plain "file"
         * driver node with an absolute path that QEMU lists; else NULL. QEMU's word only. */
        char *file;
        uint64_t virtual_size, cluster_size;
        bool read_only;
        /* Every node QEMU lists for the disk (filters on top, the top, its backing images) has a
         * name QEMU made itself ('#' + "block…": a -drive guest), none a name given by someone who
         * may track it (libvirt's -blockdev node-name=); false if a node's name is unknown. */
        bool names_by_qemu;
        QemuImage *chain; /* backing images, nearest first */
        size_t n_chain;
} QemuDisk;

void qemu_disks_free(QemuDisk *disks, size_t n);
/* The text of disks (names, paths, formats, chains), in bytes: at most QEMU_DISKS_TEXT_MAX is
 * kept of a guest (a chain's node may be named once per image, so the text grows far beyond the
 * reply's size). */
size_t qemu_disks_text(const QemuDisk *disks, size_t n_disks);
/* query-block's reply and query-named-block-nodes (flat)'s reply → disks with their chains. */
int qemu_parse_disks(json_object *blocks, json_object *nodes, QemuDisk **ret, size_t *n_ret);

/* BLOCK_EXPORT_DELETED: 1 and the export's id (borrowed), 0 for another event, <0 malformed. */
int qemu_parse_export_deleted(const char *name, json_object *data, const char **ret_id);

/* `qemu-img info --output=json`'s virtual size (text from an untrusted, sandboxed qemu-img). */
int qemu_parse_image_size(const char *text, size_t len, uint64_t *ret);

/* Field accessors with type checks, shared with the other typed layers. A missing optional
 * field leaves *ret untouched and returns 0; a present field of the wrong type or range is
 * -EBADMSG; a missing required one -ENODATA. Strings are bounded, NUL-free, borrowed. */
int json_get_string(json_object *o, const char *key, bool required, const char **ret);
/* A non-negative integer up to INT64_MAX, as QMP's are. */
int json_get_u64(json_object *o, const char *key, bool required, uint64_t *ret);
/* Up to UINT64_MAX - 1: the state file's device and inode numbers (an inode may be beyond 2^63). */
int json_get_uint64(json_object *o, const char *key, bool required, uint64_t *ret);
int json_get_bool(json_object *o, const char *key, bool required, bool *ret);
