/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>

#include "args.h"
#include "polkit-agent.h"

/* How long the agent may take to register with polkitd; the call goes ahead after that anyway. */
#define POLKIT_AGENT_START_TIMEOUT (10 * USEC_PER_SEC)
/* How long it may take to restore the terminal and exit once told to, before SIGKILL. */
#define POLKIT_AGENT_STOP_TIMEOUT (5 * USEC_PER_SEC)

static pid_t agent_pid = 0;
static bool agent_started = false; /* at most once per process */
static unsigned agent_users = 0;

/* In the child, between fork() and exec(). Never returns. */
static _Noreturn void agent_exec(int notify_fd, const char *notify_arg, pid_t parent) {
        struct sigaction sa = {.sa_handler = SIG_DFL};
        sigset_t none;

        /* Signals as a new program expects them: whoever started us may have ignored SIGTERM. */
        for (int sig = 1; sig < NSIG; sig++)
                if (sig != SIGKILL && sig != SIGSTOP)
                        (void) sigaction(sig, &sa, NULL);
        sigemptyset(&none);
        (void) sigprocmask(SIG_SETMASK, &none, NULL);
        /* It dies with us, whatever kills us. */
        if (prctl(PR_SET_PDEATHSIG, SIGTERM) < 0 || getppid() != parent)
                _exit(EXIT_FAILURE);

        /* Of our descriptors it gets only the notification pipe (old kernels: all are CLOEXEC). */
        (void) close_range(3, ~0U, CLOSE_RANGE_CLOEXEC);
        if (fcntl(notify_fd, F_SETFD, 0) < 0)
                _exit(EXIT_FAILURE);

        /* It talks to the terminal only: a pipe on our stdout or stderr must not stay open in it. */
        if (!isatty(STDOUT_FILENO) || !isatty(STDERR_FILENO)) {
                int tty = open("/dev/tty", O_WRONLY | O_NOCTTY | O_CLOEXEC);

                if (tty >= 0) {
                        if (!isatty(STDOUT_FILENO))
                                (void) dup2(tty, STDOUT_FILENO);
                        if (!isatty(STDERR_FILENO))
                                (void) dup2(tty, STDERR_FILENO);
                }
        }

        execl(POLKIT_AGENT_PATH, POLKIT_AGENT_PATH, "--notify-fd", notify_arg, "--fallback", (char *) NULL);
        _exit(EXIT_FAILURE);
}

/* Starts pkttyagent and waits (bounded) until it is registered. Everything that goes wrong
 * here only means no password can be asked for: the call goes ahead and polkit decides. */
static void polkit_agent_open(void) {
        char notify_arg[16];
        int pipefd[2], status;
        pid_t parent = getpid(), pid;
        usec_t deadline;

        if (agent_started)
                return;
        agent_started = true;
        /* Not without a terminal to ask on or when told not to ask; not for a remote host, whose
         * polkitd cannot reach an agent here; not for root, whom blockstreamd never asks. */
        if (!arg_ask_password || is_remote() || !isatty(STDIN_FILENO) || geteuid() == 0)
                return;
        if (access(POLKIT_AGENT_PATH, X_OK) < 0) {
                log_debug_errno(errno, "Not starting a polkit agent, %s: %m", POLKIT_AGENT_PATH);
                return;
        }
        if (pipe2(pipefd, O_CLOEXEC) < 0) {
                log_debug_errno(errno, "Failed to create the polkit agent's pipe: %m");
                return;
        }
        snprintf(notify_arg, sizeof(notify_arg), "%d", pipefd[1]);

        pid = fork();
        if (pid < 0) {
                log_debug_errno(errno, "Failed to start the polkit agent: %m");
                close(pipefd[0]);
                close(pipefd[1]);
                return;
        }
        if (pid == 0)
                agent_exec(pipefd[1], notify_arg, parent);
        close(pipefd[1]);
        agent_pid = pid;
        log_debug("Started %s as process %d.", POLKIT_AGENT_PATH, (int) pid);

        /* pkttyagent closes its end once registered, or exits if it cannot register (no polkitd,
         * no controlling terminal): either way our end reports a hangup. */
        deadline = now_usec(CLOCK_MONOTONIC) + POLKIT_AGENT_START_TIMEOUT;
        for (;;) {
                struct pollfd p = {.fd = pipefd[0], .events = POLLIN};
                usec_t now = now_usec(CLOCK_MONOTONIC);
                int n;

                if (now >= deadline) {
                        log_debug("The polkit agent did not register in time; going on.");
                        break;
                }
                n = poll(&p, 1, (int) ((deadline - now + USEC_PER_MSEC - 1) / USEC_PER_MSEC));
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0)
                        log_debug_errno(errno, "Failed to wait for the polkit agent: %m");
                if (n != 0)
                        break;
        }
        close(pipefd[0]);

        if (waitpid(pid, &status, WNOHANG) == pid) {
                agent_pid = 0;
                log_debug("The polkit agent exited with status %d; going on without it.",
                        WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
        }
}

void polkit_agent_close(void) {
        struct timespec delay = {.tv_nsec = 1000 * 1000};
        pid_t pid = agent_pid;
        usec_t deadline;

        if (pid <= 0)
                return;
        agent_pid = 0;
        /* SIGTERM lets it restore the terminal; SIGCONT in case it stopped (SIGTTOU). */
        (void) kill(pid, SIGTERM);
        (void) kill(pid, SIGCONT);
        deadline = now_usec(CLOCK_MONOTONIC) + POLKIT_AGENT_STOP_TIMEOUT;
        for (;;) {
                pid_t r = waitpid(pid, NULL, WNOHANG);

                if (r == pid || (r < 0 && errno != EINTR))
                        break;
                if (r == 0 && now_usec(CLOCK_MONOTONIC) >= deadline) {
                        log_debug("The polkit agent did not exit; killing it.");
                        (void) kill(pid, SIGKILL);
                        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
                                ;
                        break;
                }
                (void) nanosleep(&delay, NULL);
                delay.tv_nsec = MIN(delay.tv_nsec * 2, 50L * 1000 * 1000);
        }
        log_debug("Stopped the polkit agent (process %d).", (int) pid);
}

/* Every call that may need authorization holds the agent while it runs; a verb that makes
 * several such calls holds it across all of them. */
void polkit_agent_acquire(void) {
        if (agent_users++ == 0)
                polkit_agent_open();
}

void polkit_agent_release(void) {
        if (agent_users > 0 && --agent_users == 0)
                polkit_agent_close();
}

void polkit_agent_releasep(bool *held) {
        if (*held)
                polkit_agent_release();
}
