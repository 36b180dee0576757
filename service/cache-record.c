/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* The template caches' record, caches.json in the state directory (read back by
 * cache_load_all()): each cache that an overlay uses, its template, identity and users. */

#include <json-c/json.h>

#include "cache-internal.h"
#include "util.h"

int caches_save(Engine *e) {
        _cleanup_(json_object_putp) json_object *o = json_object_new_object(), *a = json_object_new_array();
        _cleanup_free_ char *path = strdup_printf("%s/caches.json", e->state_dir);
        const char *text;
        int r;

        if (!o || !a || !path)
                return log_oom();
        if (e->caches_record_kept)
                return log_error_errno(-EBUSY, "Not saving the template caches: %s could not be read at start, and is "
                                               "kept for the next one.",
                        path);
        for (Cache *c = e->caches; c; c = c->next) {
                json_object *k;

                if (c->fresh)
                        continue; /* not yet used by any overlay: not worth keeping */
                k = json_object_new_object();
                if (!k || json_object_array_add(a, k) < 0) {
                        json_object_put(k);
                        return log_oom();
                }
                if (json_object_object_add(k, "id", json_object_new_uint64(c->id)) < 0 ||
                        json_object_object_add(k, "url", json_object_new_string(c->url)) < 0 ||
                        json_object_object_add(k, "format", json_object_new_string(c->format)) < 0 ||
                        json_object_object_add(k, "size", json_object_new_uint64(c->size)) < 0 ||
                        json_object_object_add(k, "users", json_object_new_uint64(c->users)) < 0 ||
                        json_object_object_add(k, "warmed", json_object_new_boolean(c->warmed)) < 0 ||
                        (c->creator != 0 &&
                                json_object_object_add(k, "creator", json_object_new_uint64(c->creator)) < 0) ||
                        cache_identity_to_json(c, k) < 0 || cache_users_to_json(c, k) < 0)
                        return log_oom();
        }
        if (json_object_object_add(o, "caches", TAKE_PTR(a)) < 0 ||
                (e->cache_seq > 0 && json_object_object_add(o, "last_id", json_object_new_uint64(e->cache_seq)) < 0))
                return log_oom();
        /* Compact, and '/' as it is: the overlays' paths are most of it, and the more of them fit
         * under CACHES_RECORD_MAX the better. */
        text = json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE);
        if (!text)
                return log_oom();
        /* No more than the next start reads back (cache_load_all()). The record there is older
         * (caches and users since are missing from it): moved aside, so that the next start
         * restores no cache rather than trust it. */
        if (strlen(text) > CACHES_RECORD_MAX) {
                _cleanup_free_ char *aside = strdup_printf("%s.stale-%" PRIu64, path,
                        (uint64_t) (now_usec(CLOCK_REALTIME) / USEC_PER_SEC));

                if (!aside || (rename(path, aside) < 0 && errno != ENOENT))
                        log_error_errno(aside ? -errno : -ENOMEM, "Failed to move %s aside: %m", path);
                return log_error_errno(-EFBIG, "The template caches' record would take %zu bytes, more than the %u "
                                               "read back; not saved, and the older one was moved aside.",
                        strlen(text), (unsigned) CACHES_RECORD_MAX);
        }
        r = write_file_atomic(path, text, strlen(text), 0600);
        if (r < 0)
                return log_error_errno(r, "Failed to save the template caches to %s: %m", path);
        return 0;
}
