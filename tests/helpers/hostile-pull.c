/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* hostile-pull: a compromised blockstream-pull. The tests put it in a HelperDirectory= of its
 * own under the real helper's name; the daemon spawns it like the real one (fd 3: the NBD
 * socket, fd 4: the control socket) and it says, in the control protocol's words, things no
 * honest helper says: an error text that is not UTF-8 and carries terminal escapes.
 *
 *   --pull ...  "ready", then "error TEXT", then exit 1: a range job that fails with TEXT
 *   --map ...   "error TEXT", then exit 1: a GetAllocationMap that fails with TEXT
 *   --pull ... --bandwidth=1234567
 *               "error The NBD server closed the connection.", then "ready", then waits until
 *               the daemon closes the control socket: the honest helper's last words when its
 *               NBD server (QEMU) dies, held in the window before its exit, so that the
 *               daemon has read them by the time Start returns (bench/kill-loop's race, made
 *               deterministic)
 *   --map ... --offset=4096
 *               forks a process that outlives it, then fails as --map does. What it forked stops
 *               (SIGSTOP) every process it may signal, ten times a second for 30 s: the guest's
 *               next helpers, which run as the same uid, the next one before its exec
 *   --map ... --offset=8192 --length=65536
 *               the first 4096 bytes of the range as one extent, then "done", then exit 0: a map
 *               that stops short, called complete
 *   --map ... --offset=8192 --length=4096
 *               the whole range as one extent, then "done", then exit 3
 *   --pull ... --offset=196608
 *               "ready", then nothing: it never reads its control socket (a STOP goes unheard) and
 *               never exits
 *   --pull ... --offset=262144
 *               "ready", then "done" and exit 0: a range called complete with nothing copied
 *   --pull ... --offset=327680 --length=N
 *               "ready", then "progress K N" for K = 1, 2, ... as fast as the daemon takes them
 *               (blocking sends): a flood of well-formed messages, each of which the daemon
 *               would apply
 *   --map ... --offset=12288
 *               "ready", 100 "error chatter" messages, a message of no known kind, then exit 0 at
 *               once (test_untrusted.py stops the daemon until it has: its exit and its messages
 *               wait together)
 */

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CONTROL_FD 4

/* Not UTF-8 (a lone 0xFF, an overlong '/', a cut sequence), an ANSI escape, a C1 CSI, a tab. */
static const char hostile[] = "error \xff\xfe bad \xc0\xaf bytes \x1b[31mred\x1b[0m \xc2\x9b"
                              "2J\ttab \xe2\x82\n";

static void say(const char *line, size_t len) {
        (void) send(CONTROL_FD, line, len, MSG_NOSIGNAL);
}

int main(int argc, char **argv) {
        int map = argc > 1 && strcmp(argv[1], "--map") == 0;
        static const char lost[] = "error The NBD server closed the connection.\n";
        char buf[256];

        for (int i = 1; i < argc && !map; i++)
                if (strcmp(argv[i], "--bandwidth=1234567") == 0) {
                        say(lost, sizeof(lost) - 1);
                        say("ready\n", 6);
                        while (recv(CONTROL_FD, buf, sizeof(buf), 0) > 0)
                                ;
                        return 1;
                }

        for (int i = 1; i < argc && map; i++)
                if (strcmp(argv[i], "--offset=4096") == 0 && fork() == 0) {
                        const struct timespec tenth = { .tv_nsec = 100000000 };
                        for (int k = 0; k < 100; k++) {
                                (void) kill(-1, SIGSTOP);
                                (void) nanosleep(&tenth, NULL);
                        }
                        _exit(0);
                }

        for (int i = 1; i < argc && !map; i++)
                if (strcmp(argv[i], "--offset=262144") == 0) {
                        say("ready\n", 6);
                        say("done\n", 5);
                        return 0;
                }

        for (int i = 1; i < argc && !map; i++)
                if (strcmp(argv[i], "--offset=327680") == 0) {
                        unsigned long long total = 0;
                        char line[64];

                        for (int k = 1; k < argc; k++)
                                if (strncmp(argv[k], "--length=", 9) == 0)
                                        total = strtoull(argv[k] + 9, NULL, 10);
                        say("ready\n", 6);
                        for (unsigned long long k = 1; k < total; k++) {
                                int n = snprintf(line, sizeof(line), "progress %llu %llu\n", k, total);
                                if (send(CONTROL_FD, line, (size_t) n, MSG_NOSIGNAL) < 0)
                                        return 1;
                        }
                        return 1;
                }

        for (int i = 1; i < argc && !map; i++)
                if (strcmp(argv[i], "--offset=196608") == 0) {
                        say("ready\n", 6);
                        for (;;)
                                pause();
                }

        for (int i = 1; i < argc && map; i++)
                if (strcmp(argv[i], "--offset=12288") == 0) {
                        static const char chatter[] = "error chatter\n";
                        say("ready\n", 6);
                        for (int k = 0; k < 100; k++)
                                say(chatter, sizeof(chatter) - 1);
                        say("junk\n", 5);
                        return 0;
                }

        for (int i = 1; i < argc && map; i++)
                if (strcmp(argv[i], "--offset=8192") == 0) {
                        static const char extent[] = "extent 8192 4096 1 local\n";
                        int whole = 0;

                        for (int k = 1; k < argc; k++)
                                whole |= strcmp(argv[k], "--length=4096") == 0;
                        say(extent, sizeof(extent) - 1);
                        say("done\n", 5);
                        return whole ? 3 : 0;
                }

        if (!map)
                say("ready\n", 6);
        say(hostile, sizeof(hostile) - 1);
        return 1;
}
