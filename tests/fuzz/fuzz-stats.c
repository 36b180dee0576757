/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* What a hostile QEMU or kernel text can feed the guest-latency controller: query-blockstats'
 * reply (qemu_parse_blockstats), the histogram arithmetic on what it parsed, and
 * /proc/pressure/io (psi_parse). The first byte picks the parser; the controller then takes the
 * results as a sample. */

#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>

#include "qemu-stats.h"
#include "throttle.h"
#include "util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void steer(uint64_t p99_us, unsigned pressure) {
        Throttle t;
        ThrottleSample s = {.guest_active = true, .has_p99 = true, .p99_us = p99_us, .has_pressure = true,
                .pressure_permille = pressure, .stream_rate = p99_us};

        if (throttle_init(&t, &(ThrottleConfig){.target_p99_us = 1000, .ceiling = p99_us & 0xffffffffu}) < 0)
                abort();
        for (int i = 0; i < 4; i++)
                if (throttle_update(&t, &s) > THROTTLE_SPEED_MAX)
                        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        log_set_max_level(0);
        if (size < 1)
                return 0;
        if (data[0] & 1) {
                Psi a, b = {};
                unsigned pm;

                if (psi_parse((const char *) data + 1, size - 1, &a) >= 0) {
                        (void) psi_some_permille(&b, &a, 1 + a.full.total_us % 10000000, &pm);
                        steer(a.some.total_us, a.some.avg10);
                }
                return 0;
        }

        _cleanup_free_ char *text = strndup((const char *) data + 1, size - 1);
        json_tokener *tok;
        json_object *o;
        QemuBlockStats s, zero = {};
        QemuLatencyHistogram d;
        uint64_t ns;

        if (!text)
                abort();
        tok = json_tokener_new_ex(64);
        if (!tok)
                abort();
        o = json_tokener_parse_ex(tok, text, (int) strlen(text));
        json_tokener_free(tok);
        if (!o)
                return 0;
        if (qemu_parse_blockstats(o, "vda", &s) >= 0) {
                (void) qemu_latency_histogram_delta(&zero.rd_histogram, &s.rd_histogram, &d);
                if (qemu_latency_histogram_delta(&s.rd_histogram, &s.rd_histogram, &d) >= 0 &&
                        qemu_latency_histogram_count(&d) != 0)
                        abort(); /* a histogram minus itself is empty */
                for (unsigned p = 1; p <= 1000; p += 333)
                        if (qemu_latency_histogram_percentile(&s.rd_histogram, p, &ns) >= 0)
                                steer(ns / 1000, (unsigned) s.rd_operations);
        }
        json_object_put(o);
        return 0;
}
