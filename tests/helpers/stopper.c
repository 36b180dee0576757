/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* What a caller can do to a process that runs with its uid: stop it. Run as that caller, this
 * sends SIGSTOP, over and over, to every process created after it started (the kernel's last
 * pid, /proc/loadavg, tells which: no scan of /proc), the moment it becomes one the caller may
 * signal; one that is not a child of PARENT (a thread of the caller's own client) is continued
 * at once. The daemon must never wait for a process of a caller's (test_qmpsock.py,
 * test_provision.py). On SIGTERM it continues what it stopped, prints "stopped N" (with each pid
 * on a line "pid P" before), and exits 0.
 *
 * Usage: stopper PARENT (as the caller; its stdout says "ready" once it watches) */

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define WATCHED 64 /* the newest pids watched at once */
#define STOPPED_MAX 4096

static volatile sig_atomic_t done;

static void on_term(int sig) {
        (void) sig;
        done = 1;
}

static long parent_of(pid_t pid) {
        char path[64], buf[512];
        FILE *f;
        long ppid = -1;
        char *s;

        snprintf(path, sizeof(path), "/proc/%d/stat", (int) pid);
        f = fopen(path, "re");
        if (!f)
                return -1;
        /* "PID (COMM) STATE PPID ...": COMM may hold anything but ends at the last ')'. */
        if (fgets(buf, sizeof(buf), f) && (s = strrchr(buf, ')')))
                (void) sscanf(s + 1, " %*c %ld", &ppid);
        fclose(f);
        return ppid;
}

static long last_pid(void) {
        char buf[256];
        FILE *f = fopen("/proc/loadavg", "re");
        long pid = -1;

        if (!f)
                return -1;
        /* "0.00 0.01 0.05 1/123 4567": the last field is the pid allocated last. */
        if (fgets(buf, sizeof(buf), f)) {
                char *s = strrchr(buf, ' ');
                if (s)
                        pid = strtol(s + 1, NULL, 10);
        }
        fclose(f);
        return pid;
}

int main(int argc, char **argv) {
        static pid_t stopped[STOPPED_MAX];
        struct sigaction sa = { .sa_handler = on_term };
        size_t n_stopped = 0;
        long first, newest, parent;

        if (argc != 2 || (parent = strtol(argv[1], NULL, 10)) <= 0) {
                fprintf(stderr, "Usage: stopper PARENT\n");
                return 2;
        }
        if (sigaction(SIGTERM, &sa, NULL) < 0 || sigaction(SIGINT, &sa, NULL) < 0)
                return 2;
        first = last_pid();
        if (first < 0)
                return 2;
        printf("ready\n");
        fflush(stdout);
        newest = first;
        while (!done) {
                long now = last_pid();

                if (now > newest)
                        newest = now;
                for (long pid = newest; pid > first && pid > newest - WATCHED; pid--) {
                        if ((pid_t) pid == getpid())
                                continue;
                        if (kill((pid_t) pid, SIGSTOP) < 0)
                                continue;
                        /* Ours now, stopped first and looked at after: the daemon's child stays so. */
                        if (parent_of((pid_t) pid) != parent) {
                                (void) kill((pid_t) pid, SIGCONT);
                                continue;
                        }
                        size_t i;
                        for (i = 0; i < n_stopped && stopped[i] != (pid_t) pid; i++)
                                ;
                        if (i == n_stopped && n_stopped < STOPPED_MAX) {
                                stopped[n_stopped++] = (pid_t) pid;
                                printf("pid %ld\n", pid);
                                fflush(stdout);
                        }
                }
        }
        for (size_t i = 0; i < n_stopped; i++)
                (void) kill(stopped[i], SIGCONT);
        printf("stopped %zu\n", n_stopped);
        return 0;
}
