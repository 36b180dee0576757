/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* A compromised blockstream-nbd-relay that asks the daemon for connections to the guest's NBD
 * server without end and keeps every one (tests/integration/test_untrusted.py puts it in a
 * HelperDirectory= of its own): a relay may hold as many as it has places for clients (64),
 * or the exports' clients, and then the guest's own maps and streams, find the server full. It
 * says what it got in "clients K" messages: K = the connections it holds after asking for 100;
 * then, on SIGUSR1, it closes 10 of them, asks for 20 more, and says 1000 + what it holds; on a
 * second SIGUSR1 it says something malformed (the export fails) and stays, holding them all. */

#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define CONTROL_FD 4
#define HELD_MAX 1024

static int held[HELD_MAX];
static int n_held;

/* "word n\n", or "word\n" for n < 0. */
static int say(const char *word, long n) {
        char buf[64];
        int k = n < 0 ? snprintf(buf, sizeof(buf), "%s\n", word) : snprintf(buf, sizeof(buf), "%s %ld\n", word, n);

        return send(CONTROL_FD, buf, (size_t) k, MSG_NOSIGNAL) == k ? 0 : -1;
}

/* Asks for clients [from, to), then reads an answer to each: an upstream (kept) or a refusal. */
static int ask(unsigned from, unsigned to) {
        for (unsigned id = from; id < to; id++)
                if (say("connect", id) < 0)
                        return -1;
        for (unsigned answers = 0; answers < to - from;) {
                char buf[257], control[CMSG_SPACE(sizeof(int))];
                struct iovec iov = { .iov_base = buf, .iov_len = sizeof(buf) - 1 };
                struct msghdr mh = {
                        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof(control)
                };
                struct cmsghdr *c;
                ssize_t k = recvmsg(CONTROL_FD, &mh, MSG_CMSG_CLOEXEC);

                if (k <= 0)
                        return -1;
                buf[k] = 0;
                c = CMSG_FIRSTHDR(&mh);
                if (strncmp(buf, "upstream ", 9) == 0 && c && c->cmsg_type == SCM_RIGHTS && n_held < HELD_MAX) {
                        memcpy(&held[n_held++], CMSG_DATA(c), sizeof(int));
                        answers++;
                } else if (strncmp(buf, "refused ", 8) == 0)
                        answers++;
        }
        return 0;
}

int main(void) {
        sigset_t usr1;
        int sig;

        sigemptyset(&usr1);
        sigaddset(&usr1, SIGUSR1);
        if (sigprocmask(SIG_BLOCK, &usr1, NULL) < 0)
                return 1;
        if (say("ready", -1) < 0 || ask(1, 101) < 0 || say("clients", n_held) < 0)
                return 1;
        if (sigwait(&usr1, &sig) != 0)
                return 1;
        for (int i = 0; i < 10 && n_held > 0; i++)
                close(held[--n_held]);
        if (ask(101, 121) < 0 || say("clients", 1000 + n_held) < 0)
                return 1;
        if (sigwait(&usr1, &sig) != 0 || say("hello", -1) < 0)
                return 1;
        for (;;)
                pause();
}
