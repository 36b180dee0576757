/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <ctype.h>
#include <limits.h>
#include <pwd.h>

#include "config.h"
#include "qmp.h"

void config_init(Config *c) {
        *c = (Config) {
                .qmp_timeout_usec = QMP_TIMEOUT_DEFAULT_USEC,
                .map_timeout_usec = MAP_TIMEOUT_DEFAULT_USEC,
                .helper_uid_min = HELPER_UID_MIN_DEFAULT,
                .helper_uid_max = HELPER_UID_MAX_DEFAULT,
                .engine_mirror = ENGINE_MIRROR_AUTO,
                .progress_signals = PROGRESS_SIGNALS_DEFAULT,
        };
}

void config_done(Config *c) {
        c->image_dirs = strv_free(c->image_dirs);
        c->qemu_binary = mfree(c->qemu_binary);
        c->selinux_helper_type = mfree(c->selinux_helper_type);
        c->selinux_image_type = mfree(c->selinux_image_type);
        c->selinux_content_type = mfree(c->selinux_content_type);
        c->selinux_relay_type = mfree(c->selinux_relay_type);
        c->helper_dir = mfree(c->helper_dir);
        c->template_url_prefixes = strv_free(c->template_url_prefixes);
        c->qemu_users = mfree(c->qemu_users);
        c->n_qemu_users = 0;
}

const char *config_qemu_binary(const Config *c) {
        return c->qemu_binary ?: "/usr/bin/qemu-system-x86_64";
}

const char *config_selinux_helper_type(const Config *c) {
        return c->selinux_helper_type ?: "blockstream_helper_t";
}

const char *config_selinux_image_type(const Config *c) {
        return c->selinux_image_type ?: "blockstream_image_t";
}

const char *config_selinux_content_type(const Config *c) {
        return c->selinux_content_type ?: "blockstream_content_t";
}

const char *config_selinux_relay_type(const Config *c) {
        return c->selinux_relay_type ?: "blockstream_relay_t";
}

static int parse_uid_range(const char *value, uint32_t *min, uint32_t *max) {
        unsigned long a, b;
        char *end;

        errno = 0;
        a = strtoul(value, &end, 10);
        if (errno != 0 || end == value || *end != '-' || value[0] == '-')
                return -EINVAL;
        b = strtoul(end + 1, &end, 10);
        if (errno != 0 || *end || a == 0 || b < a || b >= UINT32_MAX)
                return -EINVAL;
        *min = (uint32_t) a;
        *max = (uint32_t) b;
        return 0;
}

static int set_string(char **field, const char *value, bool (*valid)(const char *)) {
        char *c;

        if (!valid(value))
                return -EINVAL;
        c = strdup(value);
        if (!c)
                return -ENOMEM;
        free(*field);
        *field = c;
        return 0;
}

static bool executable_path_valid(const char *s) {
        return path_is_safe_absolute(s, 4000);
}

static bool selinux_type_valid(const char *s) {
        size_t n = strlen(s);
        if (n < 3 || n > 128 || strcmp(s + n - 2, "_t") != 0)
                return false;
        for (const char *p = s; *p; p++)
                if (!(isalnum((unsigned char) *p) || *p == '_'))
                        return false;
        return true;
}

static char *strip(char *s) {
        char *e;

        while (isspace((unsigned char) *s))
                s++;
        e = s + strlen(s);
        while (e > s && isspace((unsigned char) e[-1]))
                *--e = 0;
        return s;
}

static int parse_image_dirs(Config *c, char *value, const char *source, unsigned line) {
        _cleanup_strv_free_ char **dirs = NULL;
        char *save = NULL;
        int r;

        for (char *w = strtok_r(value, " \t", &save); w; w = strtok_r(NULL, " \t", &save)) {
                if (!path_is_safe_absolute(w, PATH_MAX - 1))
                        return log_error_errno(EINVAL, "%s:%u: ImageDirectories= needs normalized absolute paths, got '%s'.",
                                source, line, w);
                if (strv_contains(dirs, w))
                        continue;
                r = strv_push(&dirs, strdup(w));
                if (r < 0)
                        return log_oom();
        }
        /* Later assignments replace earlier ones, like systemd's list settings do on "". */
        strv_free(c->image_dirs);
        c->image_dirs = TAKE_PTR(dirs);
        return 0;
}

#define TEMPLATE_URL_MAX 1024

static const char *url_scheme_end(const char *s) {
        static const char *const schemes[] = {"nbd://", "nbd+unix://", "http://", "https://"};

        for (size_t i = 0; i < sizeof(schemes) / sizeof(schemes[0]); i++)
                if (strncmp(s, schemes[i], strlen(schemes[i])) == 0)
                        return s + strlen(schemes[i]);
        return NULL;
}

static bool template_url_prefix_valid(const char *s) {
        const char *rest = url_scheme_end(s);

        if (!rest || !*rest || strlen(s) > TEMPLATE_URL_MAX)
                return false;
        for (const char *p = s; *p; p++)
                if ((unsigned char) *p <= 0x20 || (unsigned char) *p >= 0x7f || *p == '\\')
                        return false;
        return true;
}

static int parse_template_url_prefixes(Config *c, char *value, const char *source, unsigned line) {
        _cleanup_strv_free_ char **l = NULL;
        char *save = NULL;
        int r;

        for (char *w = strtok_r(value, " \t", &save); w; w = strtok_r(NULL, " \t", &save)) {
                if (!template_url_prefix_valid(w))
                        return log_error_errno(EINVAL,
                                "%s:%u: TemplateURLPrefixes= needs nbd://, nbd+unix://, http:// or https:// URL prefixes with "
                                "more than the scheme, got '%.200s'.",
                                source, line, w);
                if (strv_contains(l, w))
                        continue;
                r = strv_push(&l, strdup(w));
                if (r < 0)
                        return log_oom();
        }
        strv_free(c->template_url_prefixes);
        c->template_url_prefixes = TAKE_PTR(l);
        return 0;
}

/* What follows an allowed prefix must not climb out of it, on the server or in a socket path. */
static bool template_url_tail_safe(const char *tail) {
        const char *seg = tail;

        for (const char *p = tail;; p++) {
                if (*p == '\\')
                        return false;
                if (*p == '%' && p[1] == '2' && (p[2] == 'e' || p[2] == 'E' || p[2] == 'f' || p[2] == 'F'))
                        return false;
                if (!*p || *p == '/' || *p == '?' || *p == '&' || *p == '=' || *p == '#') {
                        size_t n = (size_t) (p - seg);
                        if ((n == 1 && seg[0] == '.') || (n == 2 && seg[0] == '.' && seg[1] == '.'))
                                return false;
                        if (!*p)
                                return true;
                        seg = p + 1;
                }
        }
}

bool config_template_url_allowed(const Config *c, const char *url) {
        if (!url || !url_scheme_end(url) || strlen(url) > TEMPLATE_URL_MAX)
                return false;
        for (char **p = c->template_url_prefixes; p && *p; p++) {
                size_t n = strlen(*p);
                const char *tail = url + n;

                if (strncmp(url, *p, n) != 0)
                        continue;
                if (strchr(*p, '?') && *tail)
                        continue;
                if ((*p)[n - 1] != '/' && *tail && *tail != '/' && *tail != '?')
                        continue;
                if (template_url_tail_safe(tail))
                        return true;
        }
        return false;
}

bool config_qemu_user_allowed(const Config *c, uid_t uid) {
        for (size_t i = 0; i < c->n_qemu_users; i++)
                if (c->qemu_users[i] == uid)
                        return true;
        return false;
}

static bool user_name_valid(const char *s) {
        size_t n = strlen(s);

        if (n < 1 || n > 32 || s[0] == '-')
                return false;
        for (const char *p = s; *p; p++)
                if (!(isalnum((unsigned char) *p) || *p == '_' || *p == '-' || *p == '.'))
                        return false;
        return true;
}

/* QEMUUsers=: user names or uids. A name unknown here is skipped with a warning (the user of a
 * virtualization stack that is not installed), a malformed one is an error. */
static int parse_qemu_users(Config *c, char *value, const char *source, unsigned line) {
        _cleanup_free_ uid_t *l = NULL;
        size_t n = 0;
        char *save = NULL;

        for (char *w = strtok_r(value, " \t", &save); w; w = strtok_r(NULL, " \t", &save)) {
                unsigned long v;
                uid_t *nl;
                char *end;

                if (isdigit((unsigned char) w[0])) {
                        errno = 0;
                        v = strtoul(w, &end, 10);
                        if (errno != 0 || *end || v >= UINT32_MAX)
                                return log_error_errno(EINVAL, "%s:%u: QEMUUsers= needs user names or uids, got '%s'.",
                                        source, line, w);
                } else {
                        struct passwd pw, *pwr = NULL;
                        char buf[4096];

                        if (!user_name_valid(w))
                                return log_error_errno(EINVAL, "%s:%u: QEMUUsers= needs user names or uids, got '%s'.",
                                        source, line, w);
                        if (getpwnam_r(w, &pw, buf, sizeof(buf), &pwr) != 0 || !pwr) {
                                log_warning("%s:%u: QEMUUsers=: no user '%s' here, ignoring it.", source, line, w);
                                continue;
                        }
                        v = pwr->pw_uid;
                }
                if (n >= 256)
                        return log_error_errno(EINVAL, "%s:%u: QEMUUsers= lists more than 256 users.", source, line);
                nl = reallocarray(l, n + 1, sizeof(uid_t));
                if (!nl)
                        return log_oom();
                l = nl;
                l[n++] = (uid_t) v;
        }
        /* Later assignments replace earlier ones; an empty one clears the list. */
        free(c->qemu_users);
        c->qemu_users = TAKE_PTR(l);
        c->n_qemu_users = n;
        return 0;
}

static int parse_seconds(const char *value, usec_t *ret) {
        char *end;
        unsigned long v;

        errno = 0;
        v = strtoul(value, &end, 10);
        if (errno != 0 || end == value || *end || value[0] == '-' || v < 1 || v > 3600)
                return -EINVAL;
        *ret = (usec_t) v * USEC_PER_SEC;
        return 0;
}

static int parse_progress_signals(const char *value, unsigned *ret) {
        char *end;
        unsigned long v;

        errno = 0;
        v = strtoul(value, &end, 10);
        if (errno != 0 || end == value || *end || value[0] == '-' || v < 1 || v > PROGRESS_SIGNALS_MAX)
                return -EINVAL;
        *ret = (unsigned) v;
        return 0;
}

int config_parse(Config *c, const char *text, const char *source) {
        _cleanup_free_ char *copy = strdup(text);
        unsigned line = 0;
        int r;

        if (!copy)
                return log_oom();
        for (char *p = copy, *next; p; p = next) {
                char *l, *eq, *key, *value;

                next = strchr(p, '\n');
                if (next)
                        *next++ = 0;
                line++;
                l = strip(p);
                if (!*l || *l == '#' || *l == ';')
                        continue;
                if (*l == '[') {
                        if (!streq(l, "[Daemon]"))
                                log_warning("%s:%u: unknown section %s, reading on.", source, line, l);
                        continue;
                }
                eq = strchr(l, '=');
                if (!eq)
                        return log_error_errno(EINVAL, "%s:%u: expected Key=Value, got '%s'.", source, line, l);
                *eq = 0;
                key = strip(l);
                value = strip(eq + 1);
                if (streq(key, "ImageDirectories")) {
                        r = parse_image_dirs(c, value, source, line);
                        if (r < 0)
                                return r;
                } else if (streq(key, "TemplateURLPrefixes")) {
                        r = parse_template_url_prefixes(c, value, source, line);
                        if (r < 0)
                                return r;
                } else if (streq(key, "QMPTimeoutSec")) {
                        if (parse_seconds(value, &c->qmp_timeout_usec) < 0)
                                return log_error_errno(EINVAL, "%s:%u: QMPTimeoutSec= must be 1…3600 seconds, got '%s'.",
                                        source, line, value);
                } else if (streq(key, "EngineMirror")) {
                        if (streq(value, "never"))
                                c->engine_mirror = ENGINE_MIRROR_NEVER;
                        else if (streq(value, "auto"))
                                c->engine_mirror = ENGINE_MIRROR_AUTO;
                        else if (streq(value, "all"))
                                c->engine_mirror = ENGINE_MIRROR_ALL;
                        else
                                return log_error_errno(EINVAL,
                                        "%s:%u: EngineMirror= must be 'auto', 'all' or 'never', got '%s'.", source,
                                        line, value);
                } else if (streq(key, "ProgressSignalsPerSecond")) {
                        if (parse_progress_signals(value, &c->progress_signals) < 0)
                                return log_error_errno(EINVAL,
                                        "%s:%u: ProgressSignalsPerSecond= must be 1…%u, got '%s'.", source, line,
                                        PROGRESS_SIGNALS_MAX, value);
                } else if (streq(key, "MapTimeoutSec")) {
                        if (parse_seconds(value, &c->map_timeout_usec) < 0)
                                return log_error_errno(EINVAL, "%s:%u: MapTimeoutSec= must be 1…3600 seconds, got '%s'.",
                                        source, line, value);
                } else if (streq(key, "HelperUIDRange")) {
                        uint32_t lo, hi;

                        if (parse_uid_range(value, &lo, &hi) < 0)
                                return log_error_errno(EINVAL, "%s:%u: HelperUIDRange= must be FIRST-LAST with 0 < FIRST <= LAST < 4294967295, got '%s'.",
                                        source, line, value);
                        if (hi - lo < HELPER_UIDS_PROBES)
                                return log_error_errno(EINVAL, "%s:%u: HelperUIDRange= must hold more than %u uids (its top %u are "
                                        "ProvisionDisk's probes'), got '%s'.",
                                        source, line, HELPER_UIDS_PROBES, HELPER_UIDS_PROBES, value);
                        c->helper_uid_min = lo;
                        c->helper_uid_max = hi;
                } else if (streq(key, "QEMUUsers")) {
                        r = parse_qemu_users(c, value, source, line);
                        if (r < 0)
                                return r;
                } else if (streq(key, "HelperDirectory")) {
                        if (set_string(&c->helper_dir, value, executable_path_valid) < 0)
                                return log_error_errno(EINVAL, "%s:%u: HelperDirectory= needs an absolute path, got '%s'.",
                                        source, line, value);
                } else if (streq(key, "QEMUBinary")) {
                        if (set_string(&c->qemu_binary, value, executable_path_valid) < 0)
                                return log_error_errno(EINVAL, "%s:%u: QEMUBinary= needs an absolute path, got '%s'.", source,
                                        line, value);
                } else if (streq(key, "SELinuxHelperType") || streq(key, "SELinuxImageType") ||
                           streq(key, "SELinuxContentType") || streq(key, "SELinuxRelayType")) {
                        char **field = streq(key, "SELinuxHelperType")    ? &c->selinux_helper_type
                                       : streq(key, "SELinuxImageType")   ? &c->selinux_image_type
                                       : streq(key, "SELinuxContentType") ? &c->selinux_content_type
                                                                          : &c->selinux_relay_type;
                        if (set_string(field, value, selinux_type_valid) < 0)
                                return log_error_errno(EINVAL, "%s:%u: %s= needs an SELinux type name like foo_t, got '%s'.",
                                        source, line, key, value);
                } else
                        log_warning("%s:%u: unknown key '%s', ignoring.", source, line, key);
        }
        return 0;
}

int config_load(Config *c, const char *path, bool must_exist) {
        _cleanup_free_ char *text = NULL;
        int r;

        r = read_file_bounded(path, CONFIG_FILE_MAX, &text, NULL);
        if (r == -ENOENT && !must_exist) {
                log_debug("No configuration file %s, using defaults.", path);
                return 0;
        }
        if (r < 0)
                return log_error_errno(r, "Failed to read configuration file %s: %m", path);
        return config_parse(c, text, path);
}
