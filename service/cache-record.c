/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* The template caches' record, caches.json in the state directory (read back by
 * cache_load_all()): each cache that an overlay uses, its template, identity and users. */

#include <json-c/json.h>

#include "cache-internal.h"
#include "util.h"

/* The record's text (with every cache's overlays, or without: their counts only), in *ret_text
 * owned by *ret_o. */
static int caches_format(Engine *e, bool overlays, json_object **ret_o, const char **ret_text) {
        _cleanup_(json_object_putp) json_object *o = json_object_new_object(), *a = json_object_new_array();

        if (!o || !a)
                return -ENOMEM;
        for (Cache *c = e->caches; c; c = c->next) {
                json_object *k;

                if (c->fresh)
                        continue; /* not yet used by any overlay: not worth keeping */
                k = json_object_new_object();
                if (!k || json_object_array_add(a, k) < 0) {
                        json_object_put(k);
                        return -ENOMEM;
                }
                if (json_object_object_add(k, "id", json_object_new_uint64(c->id)) < 0 ||
                        json_object_object_add(k, "url", json_object_new_string(c->url)) < 0 ||
                        json_object_object_add(k, "format", json_object_new_string(c->format)) < 0 ||
                        json_object_object_add(k, "size", json_object_new_uint64(c->size)) < 0 ||
                        json_object_object_add(k, "users", json_object_new_uint64(c->users)) < 0 ||
                        json_object_object_add(k, "warmed", json_object_new_boolean(c->warmed)) < 0 ||
                        (c->creator != 0 &&
                                json_object_object_add(k, "creator", json_object_new_uint64(c->creator)) < 0) ||
                        cache_identity_to_json(c, k) < 0 || cache_users_to_json(c, k, overlays) < 0)
                        return -ENOMEM;
        }
        if (json_object_object_add(o, "caches", TAKE_PTR(a)) < 0 ||
                (e->cache_seq > 0 && json_object_object_add(o, "last_id", json_object_new_uint64(e->cache_seq)) < 0))
                return -ENOMEM;
        /* Compact, and '/' as it is: the overlays' paths are most of it, and the more of them fit
         * under CACHES_RECORD_MAX the better. */
        *ret_text = json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE);
        if (!*ret_text)
                return -ENOMEM;
        *ret_o = TAKE_PTR(o);
        return 0;
}

/* Tests only: a smaller record is "too large". */
static size_t record_max(void) {
        return test_hook_bound("BLOCKSTREAM_TEST_CACHES_RECORD_MAX", CACHES_RECORD_MAX);
}

int caches_save(Engine *e) {
        _cleanup_(json_object_putp) json_object *o = NULL;
        _cleanup_free_ char *path = strdup_printf("%s/caches.json", e->state_dir);
        const char *text;
        int r;

        if (!path)
                return log_oom();
        if (e->caches_record_kept)
                return log_error_errno(-EBUSY, "Not saving the template caches: %s could not be read at start, and is "
                                               "kept for the next one.",
                        path);
        r = caches_format(e, true, &o, &text);
        if (r < 0)
                return log_oom();
        /* No more than the next start reads back (cache_load_all()). Beyond, the caches are kept
         * without their overlays' paths (a cache counts its users then, never down, as one from
         * before the paths were kept): losing the record would lose every cache, and every
         * overlay's backing with it. */
        if (strlen(text) > record_max()) {
                log_error("The template caches' record would take %zu bytes, more than the %zu read back; saved "
                          "without the overlays' paths: after a restart the caches count their overlays and never "
                          "count them down (Stop refuses them).",
                        strlen(text), record_max());
                json_object_put(TAKE_PTR(o));
                r = caches_format(e, false, &o, &text);
                if (r < 0)
                        return log_oom();
        }
        r = write_file_atomic(path, text, strlen(text), 0600);
        if (r < 0)
                return log_error_errno(r, "Failed to save the template caches to %s: %m", path);
        return 0;
}
