/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* The blockdev-add arguments of a template cache's nodes (cache.c). */

#include <stdlib.h>
#include <string.h>

#include "cache-internal.h"
#include "util.h"

json_object *cache_blockdev_node(const char *driver, const char *node, const char *file) {
        json_object *o = json_object_new_object();

        if (!o)
                return NULL;
        if (json_object_object_add(o, "driver", json_object_new_string(driver)) < 0 ||
                json_object_object_add(o, "node-name", json_object_new_string(node)) < 0 ||
                json_object_object_add(o, "file", json_object_new_string(file)) < 0) {
                json_object_put(o);
                return NULL;
        }
        return o;
}

static int hex_digit(char c) {
        if (c >= '0' && c <= '9')
                return c - '0';
        if (c >= 'a' && c <= 'f')
                return c - 'a' + 10;
        if (c >= 'A' && c <= 'F')
                return c - 'A' + 10;
        return -1;
}

/* "nbd://HOST[:PORT][/EXPORT]" as QEMU's nbd driver reads it (port 10809 by default, the export
 * percent-decoded, no query), as that driver's blockdev options; NULL if it is not such a URL (or
 * on OOM). */
static json_object *nbd_file(const char *url) {
        _cleanup_(json_object_putp) json_object *file = NULL, *server = NULL;
        _cleanup_free_ char *host = NULL, *export = NULL;
        const char *rest, *end, *colon;
        char port[6] = "10809";
        size_t auth, n = 0;

        if (strncmp(url, "nbd://", 6) != 0)
                return NULL;
        rest = url + 6;
        auth = strcspn(rest, "/?#");
        end = rest + auth;
        if (strchr(end, '?') || strchr(end, '#'))
                return NULL;
        if (rest[0] == '[') {
                const char *close = memchr(rest, ']', auth);
                if (!close)
                        return NULL;
                host = strndup(rest + 1, (size_t) (close - rest - 1));
                colon = close + 1 < end ? close + 1 : NULL;
                if (colon && *colon != ':')
                        return NULL;
        } else {
                colon = memchr(rest, ':', auth);
                host = strndup(rest, colon ? (size_t) (colon - rest) : auth);
        }
        if (!host)
                return NULL;
        /* No user part; and a host as written (QEMU would percent-decode it: refused instead). */
        if (isempty(host) || strchr(host, '@') || strchr(host, '%'))
                return NULL;
        if (colon) {
                unsigned v = 0;

                if (end - (colon + 1) > 5)
                        return NULL;
                for (const char *p = colon + 1; p < end; p++) {
                        if (*p < '0' || *p > '9')
                                return NULL;
                        v = v * 10 + (unsigned) (*p - '0');
                }
                if (v > 65535)
                        return NULL;
                if (v > 0) /* as QEMU: an empty port, or 0, is the default */
                        (void) snprintf(port, sizeof(port), "%u", v);
        }
        /* The export: what follows the first '/', percent-decoded. */
        export = malloc(strlen(end) + 1);
        if (!export)
                return NULL;
        for (const char *p = *end == '/' ? end + 1 : end; *p; p++) {
                if (*p == '%') {
                        int hi = hex_digit(p[1]), lo = hi >= 0 ? hex_digit(p[2]) : -1;
                        if (lo < 0 || (hi == 0 && lo == 0))
                                return NULL;
                        export[n++] = (char) (hi * 16 + lo);
                        p += 2;
                } else
                        export[n++] = *p;
        }
        export[n] = 0;

        server = json_object_new_object();
        file = json_object_new_object();
        if (!server || !file || json_object_object_add(server, "type", json_object_new_string("inet")) < 0 ||
                json_object_object_add(server, "host", json_object_new_string(host)) < 0 ||
                json_object_object_add(server, "port", json_object_new_string(port)) < 0 ||
                json_object_object_add(file, "driver", json_object_new_string("nbd")) < 0 ||
                json_object_object_add(file, "server", TAKE_PTR(server)) < 0 ||
                json_object_object_add(file, "export", json_object_new_string(export)) < 0)
                return NULL;
        return TAKE_PTR(file);
}

/* The template's protocol node: over HTTP with the curl driver's readahead off (each copy-on-read
 * fetches what it copies, and nothing is fetched twice). */
static json_object *template_file(const char *url) {
        _cleanup_(json_object_putp) json_object *file = NULL;
        bool https = strncmp(url, "https://", 8) == 0;

        if (!https && strncmp(url, "http://", 7) != 0)
                return nbd_file(url);
        file = json_object_new_object();
        if (!file || json_object_object_add(file, "driver", json_object_new_string(https ? "https" : "http")) < 0 ||
                json_object_object_add(file, "url", json_object_new_string(url)) < 0 ||
                json_object_object_add(file, "readahead", json_object_new_int(0)) < 0)
                return NULL;
        return TAKE_PTR(file);
}

bool cache_template_url_ok(const char *url) {
        json_object *f = template_file(url);
        bool ok = f != NULL;

        json_object_put(f);
        return ok;
}

json_object *cache_template_file_blockdev(const char *url) {
        _cleanup_(json_object_putp) json_object *o = template_file(url);

        if (!o || json_object_object_add(o, "node-name", json_object_new_string(CACHE_TEMPLATE_FILE_NODE)) < 0 ||
                json_object_object_add(o, "read-only", json_object_new_boolean(true)) < 0)
                return NULL;
        return TAKE_PTR(o);
}

json_object *cache_template_blockdev(const char *format) {
        _cleanup_(json_object_putp) json_object *o =
                cache_blockdev_node(format, CACHE_TEMPLATE_NODE, CACHE_TEMPLATE_FILE_NODE);

        /* The template's own backing, which a qcow2 template's header (the remote server's answer)
         * names, is never opened: it could name any protocol, address or file QEMU reaches, past
         * TemplateURLPrefixes=, and what it read would be served to every guest of the cache. */
        if (!o || json_object_object_add(o, "read-only", json_object_new_boolean(true)) < 0 ||
                (!streq(format, "raw") && json_object_object_add(o, "backing", NULL) < 0))
                return NULL;
        return TAKE_PTR(o);
}

json_object *cache_image_blockdev(bool warmed) {
        _cleanup_(json_object_putp) json_object *o = cache_blockdev_node("qcow2", "cache", "cf");

        /* Its backing is the template's node, never what the image's header names (once warmed,
         * the image stands alone: the header names nothing). A reference: given as options, QEMU
         * would open them with the header's name as their file name. */
        if (!o || warmed)
                return TAKE_PTR(o);
        if (json_object_object_add(o, "backing", json_object_new_string(CACHE_TEMPLATE_NODE)) < 0)
                return NULL;
        return TAKE_PTR(o);
}
