/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The helpers' control protocol as the daemon reads it (control.c): one datagram framed by
 * control_frame, then parsed as a line of blockstream-pull or blockstream-nbd-relay (first byte:
 * which), as a hostile helper could send any bytes. */

#include <stdlib.h>
#include <string.h>

#include "control.h"
#include "util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        char buf[CONTROL_MESSAGE_MAX + 1];
        bool relay;

        if (size == 0)
                return 0;
        relay = data[0] & 1;
        data++;
        size--;
        /* What one recv() into the daemon's buffer can hold. */
        size = MIN(size, sizeof(buf));
        memcpy(buf, data, size);
        if (control_frame(buf, size) < 0)
                return 0;
        if (relay) {
                ControlRelayMessage m;

                if (control_parse_relay(buf, &m) >= 0 && m.kind == CONTROL_RELAY_ERROR &&
                        (m.text < buf || m.text + m.text_len != buf + strlen(buf)))
                        abort();
        } else {
                ControlPullMessage m;

                if (control_parse_pull(buf, &m) >= 0) {
                        if (m.kind == CONTROL_PULL_ERROR && (m.text < buf || m.text + m.text_len != buf + strlen(buf)))
                                abort();
                        if (m.kind == CONTROL_PULL_EXTENT && !control_extent_kind_to_string(m.extent_kind))
                                abort();
                }
        }
        return 0;
}
