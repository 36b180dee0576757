/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* JSON fixtures for the tests of QEMU's replies: inline text, or a file of tests/unit/data/. A
 * fixture that does not parse is a failed check. Include after tap.h and fake-qemu.h. */

static inline json_object *parse(const char *text) {
        json_object *o = json_tokener_parse(text);
        if (!o && !streq(text, "null"))
                TAP_FAIL("fixture does not parse: %s", text);
        return o;
}

static inline json_object *load(const char *name) {
        json_object *o = fake_load_json(name);
        if (!o)
                TAP_FAIL("cannot load fixture %s", name);
        return o;
}
