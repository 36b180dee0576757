/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* /etc/blockstream/blockstreamd.conf: "Key=Value" lines, '#' or ';' comments, an optional
 * "[Daemon]" section header. Unknown keys are warned about and ignored, bad values are errors. */

#include <stdbool.h>

#include "util.h"

#define CONFIG_FILE_DEFAULT "/etc/blockstream/blockstreamd.conf"
#define CONFIG_FILE_MAX (64U * 1024U)

#define MAP_TIMEOUT_DEFAULT_USEC (60 * USEC_PER_SEC)
#define HELPER_UID_MIN_DEFAULT 2147418112U /* 0x7FFF0000: far from users and container ranges */
#define HELPER_UID_MAX_DEFAULT 2147483646U
/* The top uids of HelperUIDRange= are ProvisionDisk's probes', one each (provision.c): a probe
 * that a hostile server took over shares no uid, and so no RLIMIT_NPROC, with another. */
#define HELPER_UIDS_PROBES 8U

typedef struct Config {
        char **image_dirs;       /* ImageDirectories=: where images and overlays may live */
        usec_t qmp_timeout_usec; /* QMPTimeoutSec=: how long a QEMU may take to answer */
        usec_t map_timeout_usec; /* MapTimeoutSec=: how long one GetAllocationMap may take */
        uint32_t helper_uid_min, helper_uid_max; /* HelperUIDRange=: one uid (= gid) per guest; the top
                                                  * HELPER_UIDS_PROBES are the probes' */
        char *qemu_binary;       /* QEMUBinary=: the storage helper */
        char *selinux_helper_type; /* SELinuxHelperType=: helpers' process type (MCS-confined) */
        char *selinux_image_type;  /* SELinuxImageType=: writable images' type */
        char *selinux_content_type; /* SELinuxContentType=: read-only backing images' type (at s0) */
        char *selinux_relay_type;  /* SELinuxRelayType=: the NBD relay's type (at s0, no image access) */
        char *helper_dir;          /* HelperDirectory=: our helper binaries (tests: the build dir) */
        uid_t *qemu_users;         /* QEMUUsers=: uids whose QEMU may serve any user's guest */
        size_t n_qemu_users;
        char **template_url_prefixes; /* TemplateURLPrefixes=: remote templates allowed (none by default) */
        int engine_mirror;            /* EngineMirror=: where Start's engine "auto" may mirror (below) */
        unsigned progress_signals;    /* ProgressSignalsPerSecond=: all disks' progress signals together */
} Config;

#define PROGRESS_SIGNALS_DEFAULT 100U
#define PROGRESS_SIGNALS_MAX 10000U

/* EngineMirror=: never; auto (the default): disks whose nodes QEMU named itself ("#block…", a
 * -drive guest: no management layer tracks them); all: also disks with given node names. */
enum {
        ENGINE_MIRROR_NEVER,
        ENGINE_MIRROR_AUTO,
        ENGINE_MIRROR_ALL,
};

void config_init(Config *c);
void config_done(Config *c);
/* must_exist: fail with -ENOENT if path is missing (an explicit --config=). */
int config_load(Config *c, const char *path, bool must_exist);
const char *config_qemu_binary(const Config *c);
const char *config_selinux_helper_type(const Config *c);
const char *config_selinux_image_type(const Config *c);
const char *config_selinux_content_type(const Config *c);
const char *config_selinux_relay_type(const Config *c);
/* May a QEMU running as uid serve a guest of another owner (QEMUUsers=)? */
bool config_qemu_user_allowed(const Config *c, uid_t uid);

/* Whether ProvisionDisk may use the remote template url: one of TemplateURLPrefixes= is a prefix
 * of it that ends at a boundary (the prefix ends with '/', or url goes on with '/' or '?' or ends
 * there; a prefix with a query matches only itself), and the rest of url holds no "." or ".."
 * segment, no backslash and no percent-encoded '.' or '/'. */
bool config_template_url_allowed(const Config *c, const char *url);

/* Parse from memory (unit tests); source names the origin in messages. */
int config_parse(Config *c, const char *text, const char *source);
