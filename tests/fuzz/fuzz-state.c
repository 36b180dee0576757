/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The state-file loader's parse (state_guest_from_json) on arbitrary bytes, parsed by json-c the
 * way state_load() does. The file name is the guest's own name (when there is one) plus ".json",
 * so that the fuzzer gets past the name check into the disks and jobs. */

#include <stdlib.h>
#include <string.h>

#include "state.h"
#include "util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        _cleanup_(json_object_putp) json_object *o = NULL;
        _cleanup_free_ char *text = NULL, *file_name = NULL;
        json_object *name;
        StateGuest g = {};

        if (size > STATE_FILE_MAX)
                return 0;
        log_set_max_level(0);
        text = strndup((const char *) data, size);
        if (!text)
                abort();
        o = json_tokener_parse(text);
        if (!o)
                return 0;
        if (json_object_is_type(o, json_type_object) && json_object_object_get_ex(o, "name", &name) &&
                json_object_is_type(name, json_type_string))
                file_name = strdup_printf("%s.json", json_object_get_string(name));
        else
                file_name = strdup("vm1.json");
        if (!file_name)
                abort();
        if (state_guest_from_json(o, file_name, &g) >= 0)
                state_guest_done(&g);
        return 0;
}
