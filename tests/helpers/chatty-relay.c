/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* A compromised blockstream-nbd-relay that says "ready", then "error …" as fast as it can, then
 * "clients 2" and "clients 3" in turn as fast as it can, then "clients 1", and writes line after
 * line to its stderr (tests/integration/test_untrusted.py puts it in a HelperDirectory= of its
 * own): the daemon's log must not become its megaphone. On SIGUSR2 it sends counts as fast as it
 * can: the daemon must not spend its time on them. */

#include <signal.h>
#include <stdio.h>
#include <sys/socket.h>
#include <unistd.h>

#define CONTROL_FD 4
#define N_ERRORS 500
#define N_LINES 2000
#define N_COUNTS 500

int main(void) {
        sigset_t usr2;
        char buf[64];

        /* Held until it is waited for below: the test may send it before. */
        sigemptyset(&usr2);
        sigaddset(&usr2, SIGUSR2);
        if (sigprocmask(SIG_BLOCK, &usr2, NULL) < 0)
                return 1;

        if (send(CONTROL_FD, "ready\n", 6, MSG_NOSIGNAL) < 0)
                return 1;
        for (int i = 0; i < N_ERRORS; i++) {
                int n = snprintf(buf, sizeof(buf), "error flood %d\n", i);

                if (send(CONTROL_FD, buf, (size_t) n, MSG_NOSIGNAL) < 0)
                        return 1;
        }
        for (int i = 0; i < N_COUNTS; i++)
                if (send(CONTROL_FD, i % 2 ? "clients 3\n" : "clients 2\n", 10, MSG_NOSIGNAL) < 0)
                        return 1;
        /* Then Clients 1: once the daemon shows it, it has read every message before it. */
        if (send(CONTROL_FD, "clients 1\n", 10, MSG_NOSIGNAL) < 0)
                return 1;
        /* And its stderr, which the daemon logs: 2000 lines at once, then one more 2 s later. */
        for (int i = 0; i < N_LINES; i++)
                fprintf(stderr, "noise %d\n", i);
        fflush(stderr);
        sleep(2);
        fprintf(stderr, "END\n");
        fflush(stderr);
        /* On SIGUSR2: "clients K" for K = 2, 3, ... as fast as the daemon takes them (blocking
         * sends), each one well-formed and a change the daemon would apply. */
        for (;;) {
                int sig;

                if (sigwait(&usr2, &sig) != 0)
                        return 1;
                for (int k = 2; k < 1000000; k++) {
                        int n = snprintf(buf, sizeof(buf), "clients %d\n", k);

                        if (send(CONTROL_FD, buf, (size_t) n, MSG_NOSIGNAL) < 0)
                                return 1;
                }
        }
}
