/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* blockstream-pull's command line. */

#include <stdbool.h>
#include <stdint.h>

#define KIB ((uint64_t) 1024)
#define MIB (1024 * KIB)
#define GIB (1024 * MIB)

/* Small requests, many in flight. QEMU serves each CACHE (and each read through a copy-on-read
 * filter) with a bounce buffer of the request's size; in a guest's QEMU glibc hands out a 2 MiB
 * one with a fresh mmap and takes it back with munmap every time (strace: one pair per request),
 * so every copied page was faulted in anew: 2 MiB x 8 took 2.5-3.9x block-stream's time
 * (bench/range-bench), 128 KiB x 64 (the same 8 MiB in flight) 1.0-1.5x. */
#define CHUNK_DEFAULT (128 * KIB)
#define CHUNK_MIN (4 * KIB)
#define CHUNK_MAX (32 * MIB) /* what QEMU's NBD server takes in one read */
#define PARALLEL_DEFAULT 64
#define PARALLEL_MAX 64
#define MAX_EXTENTS_DEFAULT 65536
#define NBD_NAME_MAX 4096 /* the NBD protocol's limit on export names */

typedef enum Mode {
        MODE_NONE,
        MODE_PULL,
        MODE_MAP,
} Mode;

typedef struct Args {
        Mode mode;
        const char *export_name;
        uint64_t offset, length;
        bool have_offset, have_length;
        uint64_t bandwidth;
        uint64_t chunk;
        uint64_t parallel;
        uint64_t max_extents;
        bool no_cache;
} Args;

/* > 0: carry on; 0: exit successfully (--help, --version); < 0: error (told). */
int parse_argv(int argc, char *argv[], Args *args);
