/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The configuration parser (config_parse) on arbitrary text, and the template URL rule on the
 * parsed prefixes. */

#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

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
