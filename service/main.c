/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <getopt.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "config.h"
#include "manager.h"
#include "sandbox.h"
#include "util.h"

#define STATE_DIR_DEFAULT "/var/lib/blockstream"
#define RUNTIME_DIR_DEFAULT "/run/blockstream"

static void help(void) {
        printf("Usage: blockstreamd [OPTIONS]\n"
               "\n"
               "The blockstream daemon: streams the backing data of QEMU guests' thin qcow2 overlays\n"
               "into the overlays while the guests run, until each disk stands alone. It owns\n"
               "org.blockstream1 on the system bus; clients (blockstreamctl, busctl, GUIs) drive it\n"
               "through that bus. Normally started by systemd (blockstreamd.service) or D-Bus activation.\n"
               "\n"
               "Options:\n"
               "  -h --help              Show this help and exit\n"
               "     --version           Show the version and exit\n"
               "     --config=FILE       Configuration file (default %s;\n"
               "                         a missing default file means defaults)\n"
               "     --state-dir=DIR     Where registered guests persist (default %s)\n"
               "     --runtime-dir=DIR   Sockets and per-guest runtime files (default %s)\n"
               "\n"
               "Configuration file (Key=Value lines, '#' comments):\n"
               "  ImageDirectories=DIR...  Directories images and new overlays may live in\n"
               "  QMPTimeoutSec=N          Seconds QEMU may take to answer a command (default 60)\n"
               "\n"
               "Environment:\n"
               "  DBUS_SYSTEM_BUS_ADDRESS  The bus to serve on (default: the system bus)\n"
               "  BLOCKSTREAM_LOG_LEVEL    debug, info (default), notice, warning or err\n"
               "\n"
               "Signals: SIGTERM and SIGINT stop the daemon cleanly. Jobs keep running inside QEMU and\n"
               "are picked up again at the next start.\n"
               "\n"
               "See blockstreamctl --help for the client.\n",
                CONFIG_FILE_DEFAULT, STATE_DIR_DEFAULT, RUNTIME_DIR_DEFAULT);
}

typedef struct Args {
        const char *config;
        bool config_explicit;
        const char *state_dir;
        const char *runtime_dir;
} Args;

static int parse_argv(int argc, char *argv[], Args *a) {
        enum { ARG_VERSION = 0x100, ARG_CONFIG, ARG_STATE_DIR, ARG_RUNTIME_DIR };
        static const struct option options[] = {
                { "help", no_argument, NULL, 'h' },
                { "version", no_argument, NULL, ARG_VERSION },
                { "config", required_argument, NULL, ARG_CONFIG },
                { "state-dir", required_argument, NULL, ARG_STATE_DIR },
                { "runtime-dir", required_argument, NULL, ARG_RUNTIME_DIR },
                {},
        };
        int c;

        while ((c = getopt_long(argc, argv, "h", options, NULL)) >= 0)
                switch (c) {
                case 'h':
                        help();
                        return 0;
                case ARG_VERSION:
                        printf("blockstreamd %s\n", VERSION);
                        return 0;
                case ARG_CONFIG:
                        a->config = optarg;
                        a->config_explicit = true;
                        break;
                case ARG_STATE_DIR:
                        a->state_dir = optarg;
                        break;
                case ARG_RUNTIME_DIR:
                        a->runtime_dir = optarg;
                        break;
                case '?':
                        return -EINVAL;
                default:
                        abort();
                }
        if (optind < argc)
                return log_error_errno(EINVAL, "This program takes no positional arguments; see --help.");
        if (!path_is_safe_absolute(a->state_dir, 4000) || !path_is_safe_absolute(a->runtime_dir, 4000))
                return log_error_errno(EINVAL, "--state-dir= and --runtime-dir= need normalized absolute paths.");
        if (a->config_explicit && isempty(a->config))
                return log_error_errno(EINVAL, "--config= needs a file.");
        return 1;
}

static int on_signal(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata) {
        log_info("Received %s, shutting down.", strsignal((int) si->ssi_signo));
        return sd_event_exit(sd_event_source_get_event(s), 0);
}

int main(int argc, char *argv[]) {
        Args a = {
                .config = CONFIG_FILE_DEFAULT,
                .state_dir = STATE_DIR_DEFAULT,
                .runtime_dir = RUNTIME_DIR_DEFAULT,
        };
        _cleanup_(sd_event_unrefp) sd_event *e = NULL;
        Manager *m = NULL;
        struct rlimit nofile;
        sigset_t mask;
        int r;

        log_setup("blockstreamd");
        r = parse_argv(argc, argv, &a);
        if (r <= 0)
                return r < 0 ? 2 : 0;

        /* Whatever starts us (the unit has UMask=0077, a shell may not): nothing the daemon creates
         * is for others unless it says so with an explicit mode. */
        umask(0077);
        /* Every guest's connection, drain, helper and export holds fds, and sd-event needs no
         * select(): the soft limit goes up to the hard one (systemd's default soft limit of 1024 is
         * for select()'s sake). Our helpers get limits of their own (sandbox.c). */
        if (getrlimit(RLIMIT_NOFILE, &nofile) >= 0 && nofile.rlim_cur < nofile.rlim_max) {
                nofile.rlim_cur = nofile.rlim_max;
                if (setrlimit(RLIMIT_NOFILE, &nofile) < 0)
                        log_warning_errno(errno, "Failed to raise the file descriptor limit: %m");
        }
        /* Root may load the filter without no_new_privs; anybody else could not make a set-id file
         * for anybody but themselves anyway. */
        r = sandbox_forbid_setid();
        if (r < 0 && geteuid() == 0)
                return log_error_errno(r, "Failed to forbid set-id files (seccomp): %m"), 1;
        r = locale_use_c();
        if (r < 0)
                log_warning_errno(r, "Failed to use the C locale object, JSON parsing will be slower: %m");
        /* sd-event wants the signals it watches blocked; SIGCHLD for the helpers we watch. */
        sigemptyset(&mask);
        sigaddset(&mask, SIGTERM);
        sigaddset(&mask, SIGINT);
        sigaddset(&mask, SIGCHLD);
        if (sigprocmask(SIG_BLOCK, &mask, NULL) < 0)
                return log_error_errno(errno, "Failed to block signals: %m"), 1;
        (void) signal(SIGPIPE, SIG_IGN);

        r = sd_event_default(&e);
        if (r < 0)
                return log_error_errno(r, "Failed to allocate the event loop: %m"), 1;
        if (sd_event_add_signal(e, NULL, SIGTERM, on_signal, NULL) < 0 ||
                sd_event_add_signal(e, NULL, SIGINT, on_signal, NULL) < 0)
                return log_error("Failed to watch signals."), 1;
        (void) sd_event_set_watchdog(e, true);

        r = manager_new(&m, e, a.config, a.config_explicit, a.state_dir, a.runtime_dir);
        if (r < 0)
                return 1;
        r = manager_load_state(m);
        if (r < 0)
                goto finish;
        r = manager_connect_bus(m);
        if (r < 0)
                goto finish;
        manager_start_guests(m);

        log_info("blockstreamd %s running (state %s, runtime %s).", VERSION, a.state_dir, a.runtime_dir);
        r = sd_event_loop(e);
        if (r < 0)
                log_error_errno(r, "Event loop failed: %m");
finish:
        manager_free(m);
        return r < 0 ? 1 : 0;
}
