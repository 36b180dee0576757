/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* A helper that starts and never says a word: no "ready", no exit (tests/integration put it in a
 * HelperDirectory= of its own as the relay). The daemon must not wait for it for ever. */

#include <unistd.h>

int main(void) {
        for (;;)
                pause();
}
