/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* What the QMP client's tests share (test-qmp.c, test-qmp-hostile.c, test-qmp-close.c). Inline:
 * tap.h counts failed checks per file. Include after tap.h and fake-qemu.h. */

#include <fcntl.h>

#if defined(__SANITIZE_ADDRESS__)
#define UNDER_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define UNDER_ASAN 1
#endif
#endif
#ifndef UNDER_ASAN
#define UNDER_ASAN 0
#endif

#define SEC USEC_PER_SEC
#define MSEC USEC_PER_MSEC

/* ASan's quarantine and valgrind's freed-block queue keep freed memory resident: RSS figures
 * mean nothing there. */
static inline bool rss_checks_enabled(void) {
        const char *preload = getenv("LD_PRELOAD");

        if (UNDER_ASAN || getenv("BSD_UNIT_NO_RSS"))
                return false;
        return !(preload && strstr(preload, "vgpreload"));
}

static inline bool fd_is_open(int fd) {
        return fcntl(fd, F_GETFD) >= 0;
}

static inline bool cond_call_done(Fake *f, void *arg) {
        FakeCall *c = arg;
        return c->n_handler > 0;
}

static inline bool cond_events(Fake *f, void *arg) {
        return f->n_events >= *(unsigned *) arg || f->n_failed > 0;
}

/* Handshake and nothing else. */
static inline bool setup(Fake *f) {
        int r = fake_new(f);

        if (r < 0) {
                TAP_FAIL("fake_new: %s", strerror(-r));
                return false;
        }
        r = fake_handshake(f);
        if (r < 0) {
                TAP_FAIL("handshake: %s", strerror(-r));
                return false;
        }
        return true;
}

/* Issue a call and wait until QEMU has received it; returns the command (caller frees). */
static inline json_object *call_and_receive(Fake *f, FakeCall *c, const char *command, json_object *args) {
        json_object *cmd;
        int r = fake_call(f, c, command, args, -1);

        if (r < 0) {
                TAP_FAIL("qmp_call(%s): %s", command, strerror(-r));
                return NULL;
        }
        cmd = fake_next_command(f, 5 * SEC);
        if (!cmd)
                TAP_FAIL("QEMU never received %s", command);
        return cmd;
}
