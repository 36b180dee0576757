/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The helpers' control protocol (control.c), both ends: one datagram framed by control_frame,
 * then parsed as a line of blockstream-pull or blockstream-nbd-relay, as a hostile helper could
 * send any bytes; or parsed as a helper parses the daemon's commands (first byte: which). */

#include <stdlib.h>
#include <string.h>

#include "control.h"
#include "util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        char buf[CONTROL_MESSAGE_MAX + 2];
        bool relay, command;

        if (size == 0)
                return 0;
        relay = data[0] & 1;
        command = data[0] & 2;
        data++;
        size--;
        if (command) {
                ControlCommand c;

                /* What one recvmsg() into a helper's buffer can hold. */
                size = MIN(size, CONTROL_MESSAGE_MAX + 1);
                memcpy(buf, data, size);
                buf[size] = 0;
                if (control_parse_command(buf, size, &c) >= 0 && c.kind == CONTROL_COMMAND_REFUSED &&
                        (c.text < buf || c.text > buf + strlen(buf)))
                        abort();
                return 0;
        }
        /* What one recv() into the daemon's buffer can hold. */
        size = MIN(size, CONTROL_MESSAGE_MAX + 1);
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
