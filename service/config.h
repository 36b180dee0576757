/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* /etc/blockstream/blockstreamd.conf: "Key=Value" lines, '#' or ';' comments, an optional
 * "[Daemon]" section header. Unknown keys are warned about and ignored, bad values are errors. */

#include <stdbool.h>

#include "util.h"

#define CONFIG_FILE_DEFAULT "/etc/blockstream/blockstreamd.conf"
#define CONFIG_FILE_MAX (64U * 1024U)

typedef struct Config {
        char **image_dirs;       /* ImageDirectories=: where images and overlays may live */
        usec_t qmp_timeout_usec; /* QMPTimeoutSec=: how long a QEMU may take to answer */
} Config;

void config_init(Config *c);
void config_done(Config *c);
/* must_exist: fail with -ENOENT if path is missing (an explicit --config=). */
int config_load(Config *c, const char *path, bool must_exist);
/* Parse from memory (unit tests); source names the origin in messages. */
int config_parse(Config *c, const char *text, const char *source);
