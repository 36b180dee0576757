/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* blockstream-pull's command line. */

#include <stdbool.h>
#include <stdint.h>

#define KIB ((uint64_t) 1024)
#define MIB (1024 * KIB)
#define GIB (1024 * MIB)

#define CHUNK_DEFAULT (2 * MIB)
#define CHUNK_MIN (4 * KIB)
#define CHUNK_MAX (32 * MIB) /* what QEMU's NBD server takes in one read */
#define PARALLEL_DEFAULT 8
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
