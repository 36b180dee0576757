/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The configuration parser (config_parse) on arbitrary text, and the template URL rule on the
 * parsed prefixes. */

#include <errno.h>
#include <pwd.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* The user database, in memory. QEMUUsers= resolves each name with getpwnam_r(), which went
 * through NSS (nss_systemd's varlink socket, then fopen("/etc/passwd")) for every word of every
 * input: a third of the time of a short run, most of a long one whose inputs list hundreds of
 * names. A fixed table keeps both of the parser's paths (a known name and its uid, an unknown one
 * skipped) and makes a finding independent of the machine's users. This definition takes the
 * place of libc's (ASan's interceptor is a weak alias). */
int getpwnam_r(const char *name, struct passwd *pwd, char *buf, size_t buflen, struct passwd **result) {
        static const struct {
                const char *name;
                uid_t uid;
        } users[] = {
                { "root", 0 },
                { "qemu", 107 },
                { "libvirt-qemu", 64055 },
                { "nobody", 65534 },
        };

        *result = NULL;
        for (size_t i = 0; i < ELEMENTSOF(users); i++) {
                size_t n = strlen(users[i].name) + 1;

                if (!streq(name, users[i].name))
                        continue;
                if (buflen < n + 1)
                        return ERANGE;
                memcpy(buf, users[i].name, n);
                buf[n] = 0; /* "": password, gecos, home, shell */
                *pwd = (struct passwd) { .pw_name = buf, .pw_passwd = buf + n, .pw_uid = users[i].uid,
                        .pw_gid = users[i].uid, .pw_gecos = buf + n, .pw_dir = buf + n, .pw_shell = buf + n };
                *result = pwd;
                return 0;
        }
        return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        _cleanup_free_ char *text = NULL;
        Config c;

        /* config_load reads at most CONFIG_FILE_MAX bytes, and a C string. */
        if (size > CONFIG_FILE_MAX)
                return 0;
        log_set_max_level(0);
        text = strndup((const char *) data, size);
        if (!text)
                abort();
        config_init(&c);
        if (config_parse(&c, text, "fuzz") >= 0) {
                (void) config_template_url_allowed(&c, "https://example.com/templates/a.qcow2");
                (void) config_qemu_user_allowed(&c, 107);
        }
        config_done(&c);
        return 0;
}
