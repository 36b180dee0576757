/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* blockstreamctl: the command-line client of blockstreamd. It speaks D-Bus only (api.md),
 * so anything it does can also be done with busctl or any other client. */

#include <ctype.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <langinfo.h>
#include <locale.h>
#include <poll.h>
#include <pwd.h>
#include <signal.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>

#include <systemd/sd-bus.h>
#include <systemd/sd-id128.h>

#include "blockstream-api.h"
#include "util.h"

#define PROPERTIES_IFACE "org.freedesktop.DBus.Properties"
#define OBJECT_MANAGER_IFACE "org.freedesktop.DBus.ObjectManager"

/* polkit's text agent (Debian: pkexec, polkitd). */
#ifndef POLKIT_AGENT_PATH
#define POLKIT_AGENT_PATH "/usr/bin/pkttyagent"
#endif
/* How long the agent may take to register with polkitd; the call goes ahead after that anyway. */
#define POLKIT_AGENT_START_TIMEOUT (10 * USEC_PER_SEC)
/* How long it may take to restore the terminal and exit once told to, before SIGKILL. */
#define POLKIT_AGENT_STOP_TIMEOUT (5 * USEC_PER_SEC)

/* RegisterGuest waits for QEMU to list its disks, Start for QEMU to accept the job, Export
 * and ProvisionDisk for a helper to come up: all can take longer than sd-bus' 25 s default. */
#define SLOW_CALL_TIMEOUT (120 * USEC_PER_SEC)

/* The server caps one GetAllocationMap reply at this many extents (BlockStream.xml). */
#define MAP_EXTENTS_MAX 65536

#define EXIT_USAGE 2
/* 128 + SIGINT, as a shell reports a job stopped by Ctrl-C. */
#define EXIT_INTERRUPTED 130

/* ---------------------------------------------------------------------------------------- */
/* Command line */

enum {
        OPT_OWNER = 1 << 0,
        OPT_UUID = 1 << 1,
        OPT_DISK = 1 << 2,
        OPT_BANDWIDTH = 1 << 3,
        OPT_BASE = 1 << 4,
        OPT_OFFSET = 1 << 5,
        OPT_LENGTH = 1 << 6,
        OPT_WAIT = 1 << 7,
        OPT_LISTEN = 1 << 8,
        OPT_TEMPLATE_FORMAT = 1 << 9,
};

static const struct {
        unsigned flag;
        const char *name;
} option_names[] = {
        {OPT_OWNER, "--owner="},
        {OPT_UUID, "--uuid="},
        {OPT_DISK, "--disk="},
        {OPT_BANDWIDTH, "--bandwidth="},
        {OPT_BASE, "--base="},
        {OPT_OFFSET, "--offset="},
        {OPT_LENGTH, "--length="},
        {OPT_WAIT, "--wait"},
        {OPT_LISTEN, "--listen="},
        {OPT_TEMPLATE_FORMAT, "--template-format="},
};

static bool arg_json = false;
static const char *arg_host = NULL;
static bool arg_ask_password = true;
static bool arg_quiet = false;
static unsigned arg_given = 0; /* OPT_* of the command-specific options seen */
static const char *arg_owner = NULL;
static const char *arg_uuid = NULL;
static char **arg_disks = NULL; /* "ALIAS=PATH" */
static uint64_t arg_bandwidth = 0;
static const char *arg_base = NULL;
static uint64_t arg_offset = 0;
static uint64_t arg_length = 0;
static bool arg_wait = false;
static const char *arg_listen = NULL;
static const char *arg_template_format = NULL;

/* Verbs return <0 (-errno, already logged) for exit status 1, or the exit status itself. */
_printf_(1, 2) static int usage_error(const char *format, ...) {
        char buf[1024];
        va_list ap;

        va_start(ap, format);
        vsnprintf(buf, sizeof(buf), format, ap);
        va_end(ap);
        log_error("%s", buf);
        return EXIT_USAGE;
}

/* ---------------------------------------------------------------------------------------- */
/* Small formatting helpers */

static bool is_remote(void) {
        /* Local file names and user names mean nothing on another host. */
        return arg_host != NULL;
}

static const char *yes_no(bool b) {
        return b ? "yes" : "no";
}

static char *format_timespan(char *buf, size_t len, usec_t t) {
        uint64_t s = (t + USEC_PER_SEC / 2) / USEC_PER_SEC;
        uint64_t d = s / 86400, h = s / 3600 % 24, m = s / 60 % 60;

        s %= 60;
        if (d > 0)
                snprintf(buf, len, "%" PRIu64 "d %" PRIu64 "h %" PRIu64 "min", d, h, m);
        else if (h > 0)
                snprintf(buf, len, "%" PRIu64 "h %" PRIu64 "min %" PRIu64 "s", h, m, s);
        else if (m > 0)
                snprintf(buf, len, "%" PRIu64 "min %" PRIu64 "s", m, s);
        else
                snprintf(buf, len, "%" PRIu64 "s", s);
        return buf;
}

static char *format_timestamp(char *buf, size_t len, usec_t t) {
        time_t sec = (time_t) (t / USEC_PER_SEC);
        struct tm tm;

        if (!localtime_r(&sec, &tm) || strftime(buf, len, "%a %Y-%m-%d %H:%M:%S %Z", &tm) == 0)
                snprintf(buf, len, "@%" PRIu64, (uint64_t) (t / USEC_PER_SEC));
        return buf;
}

/* "1.5 GiB/s" or "unlimited". */
static char *format_rate(char *buf, size_t len, uint64_t bytes_per_second, const char *zero) {
        char b[FORMAT_BYTES_MAX];

        if (bytes_per_second == 0 && zero)
                snprintf(buf, len, "%s", zero);
        else
                snprintf(buf, len, "%s/s", format_bytes(b, sizeof(b), bytes_per_second));
        return buf;
}

static unsigned percent(uint64_t done, uint64_t total) {
        if (total == 0)
                return 0;
        if (done >= total)
                return 100;
        return (unsigned) ((long double) done * 100.0L / (long double) total);
}

/* "alice (1000)" where the uid is known here, else "1000". */
static void format_owner(char *buf, size_t len, uint32_t uid, bool with_uid) {
        struct passwd pw, *result = NULL;
        char pwbuf[4096];

        if (!is_remote() && getpwuid_r((uid_t) uid, &pw, pwbuf, sizeof(pwbuf), &result) == 0 && result) {
                if (with_uid)
                        snprintf(buf, len, "%s (%" PRIu32 ")", result->pw_name, uid);
                else
                        snprintf(buf, len, "%s", result->pw_name);
        } else
                snprintf(buf, len, "%" PRIu32, uid);
}

static bool colors_enabled(void) {
        const char *term = getenv("TERM");

        return isatty(STDOUT_FILENO) && !getenv("NO_COLOR") && !streq_ptr(term, "dumb");
}

static bool utf8_enabled(void) {
        const char *cs = nl_langinfo(CODESET);

        return cs && streq(cs, "UTF-8");
}

static unsigned terminal_columns(int fd) {
        struct winsize ws = {};

        if (ioctl(fd, TIOCGWINSZ, &ws) < 0 || ws.ws_col == 0)
                return 80;
        return ws.ws_col;
}

/* The daemon resolves paths in its own file system: turn a local relative name into an
 * absolute one, lexically ("a/../b" → "b"; symlinks are the daemon's business). */
static int path_make_absolute(const char *p, char **ret) {
        _cleanup_free_ char *cwd = NULL, *joined = NULL, *out = NULL;
        size_t n = 0;

        if (p[0] == '/')
                joined = strdup(p);
        else {
                cwd = get_current_dir_name();
                if (!cwd)
                        return -errno;
                joined = strdup_printf("%s/%s", cwd, p);
        }
        if (!joined)
                return -ENOMEM;
        out = malloc(strlen(joined) + 2);
        if (!out)
                return -ENOMEM;

        for (char *s = joined, *e; *s; s = e) {
                size_t l;

                while (*s == '/')
                        s++;
                l = strcspn(s, "/");
                e = s + l;
                if (l == 0 || (l == 1 && s[0] == '.'))
                        continue;
                if (l == 2 && s[0] == '.' && s[1] == '.') {
                        while (n > 0 && out[n - 1] != '/')
                                n--;
                        if (n > 0)
                                n--; /* the slash */
                        continue;
                }
                out[n++] = '/';
                memcpy(out + n, s, l);
                n += l;
        }
        if (n == 0)
                out[n++] = '/';
        out[n] = 0;
        *ret = TAKE_PTR(out);
        return 0;
}

/* Paths given on the command line travel to the daemon as they are with --host. */
static int local_path_arg(const char *p, char **ret) {
        char *c;
        int r;

        if (is_remote()) {
                c = strdup(p);
                if (!c)
                        return log_oom();
                *ret = c;
                return 0;
        }
        r = path_make_absolute(p, ret);
        if (r < 0)
                return log_error_errno(r, "Failed to make '%s' absolute: %m", p);
        return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* JSON output, written by hand: the CLI needs only to emit it. */

typedef struct JsonWriter {
        FILE *f;
        unsigned depth;
        bool need_comma;
        bool after_key;
} JsonWriter;

static void json_escaped(FILE *f, const char *s) {
        fputc('"', f);
        for (const unsigned char *p = (const unsigned char *) s; *p; p++)
                switch (*p) {
                case '"':
                        fputs("\\\"", f);
                        break;
                case '\\':
                        fputs("\\\\", f);
                        break;
                case '\b':
                        fputs("\\b", f);
                        break;
                case '\f':
                        fputs("\\f", f);
                        break;
                case '\n':
                        fputs("\\n", f);
                        break;
                case '\r':
                        fputs("\\r", f);
                        break;
                case '\t':
                        fputs("\\t", f);
                        break;
                default:
                        /* D-Bus strings are valid UTF-8: only control characters need escaping. */
                        if (*p < 0x20 || *p == 0x7f)
                                fprintf(f, "\\u%04x", *p);
                        else
                                fputc(*p, f);
                }
        fputc('"', f);
}

static void json_prefix(JsonWriter *w) {
        if (w->after_key) {
                w->after_key = false;
                return;
        }
        if (w->need_comma)
                fputc(',', w->f);
        if (w->depth > 0) {
                fputc('\n', w->f);
                for (unsigned i = 0; i < w->depth; i++)
                        fputs("  ", w->f);
        }
        w->need_comma = true;
}

static void json_open(JsonWriter *w, char c) {
        json_prefix(w);
        fputc(c, w->f);
        w->depth++;
        w->need_comma = false;
}

static void json_close(JsonWriter *w, char c) {
        w->depth--;
        if (w->need_comma) {
                fputc('\n', w->f);
                for (unsigned i = 0; i < w->depth; i++)
                        fputs("  ", w->f);
        }
        fputc(c, w->f);
        w->need_comma = true;
        if (w->depth == 0)
                fputc('\n', w->f);
}

static void json_key(JsonWriter *w, const char *key) {
        json_prefix(w);
        json_escaped(w->f, key);
        fputs(": ", w->f);
        w->after_key = true;
}

static void json_string(JsonWriter *w, const char *s) {
        json_prefix(w);
        json_escaped(w->f, strempty(s));
}

static void json_unsigned(JsonWriter *w, uint64_t u) {
        json_prefix(w);
        fprintf(w->f, "%" PRIu64, u);
}

static void json_bool(JsonWriter *w, bool b) {
        json_prefix(w);
        fputs(b ? "true" : "false", w->f);
}

static void json_strv(JsonWriter *w, char *const *l) {
        json_open(w, '[');
        for (char *const *i = l; i && *i; i++)
                json_string(w, *i);
        json_close(w, ']');
}

/* ---------------------------------------------------------------------------------------- */
/* Properties: one table per interface drives parsing, JSON output and freeing. */

typedef struct Property {
        const char *name;
        const char *signature; /* s, o, t, u, b, as, ao */
        size_t offset;
} Property;

typedef struct GuestInfo {
        char *object;
        uint64_t present; /* bit i: properties[i] was sent by the server */
        char *name;
        char *uuid;
        uint32_t owner;
        bool running;
        char *qmp_socket;
        char **disks;
        char *sandbox_label;
} GuestInfo;

static const Property guest_properties[] = {
        {BS_GUEST_PROPERTY_NAME, "s", offsetof(GuestInfo, name)},
        {BS_GUEST_PROPERTY_UUID, "s", offsetof(GuestInfo, uuid)},
        {BS_GUEST_PROPERTY_OWNER, "u", offsetof(GuestInfo, owner)},
        {BS_GUEST_PROPERTY_RUNNING, "b", offsetof(GuestInfo, running)},
        {BS_GUEST_PROPERTY_QMP_SOCKET, "s", offsetof(GuestInfo, qmp_socket)},
        {BS_GUEST_PROPERTY_DISKS, "ao", offsetof(GuestInfo, disks)},
        {BS_GUEST_PROPERTY_SANDBOX_LABEL, "s", offsetof(GuestInfo, sandbox_label)},
};

typedef struct DiskInfo {
        char *object;
        uint64_t present;
        char *guest;
        char *device;
        char *node_name;
        char *path;
        char **backing_chain;
        uint64_t size;
        char *state;
        char *mode;
        uint64_t offset, length;
        uint64_t bytes_done, bytes_total;
        uint64_t bandwidth, rate;
        uint64_t start_time, expected_end_time;
        char *error;
} DiskInfo;

static const Property disk_properties[] = {
        {BS_STREAM_PROPERTY_GUEST, "o", offsetof(DiskInfo, guest)},
        {BS_STREAM_PROPERTY_DEVICE, "s", offsetof(DiskInfo, device)},
        {BS_STREAM_PROPERTY_NODE_NAME, "s", offsetof(DiskInfo, node_name)},
        {BS_STREAM_PROPERTY_PATH, "s", offsetof(DiskInfo, path)},
        {BS_STREAM_PROPERTY_BACKING_CHAIN, "as", offsetof(DiskInfo, backing_chain)},
        {BS_STREAM_PROPERTY_SIZE, "t", offsetof(DiskInfo, size)},
        {BS_STREAM_PROPERTY_STATE, "s", offsetof(DiskInfo, state)},
        {BS_STREAM_PROPERTY_MODE, "s", offsetof(DiskInfo, mode)},
        {BS_STREAM_PROPERTY_OFFSET, "t", offsetof(DiskInfo, offset)},
        {BS_STREAM_PROPERTY_LENGTH, "t", offsetof(DiskInfo, length)},
        {BS_STREAM_PROPERTY_BYTES_DONE, "t", offsetof(DiskInfo, bytes_done)},
        {BS_STREAM_PROPERTY_BYTES_TOTAL, "t", offsetof(DiskInfo, bytes_total)},
        {BS_STREAM_PROPERTY_BANDWIDTH, "t", offsetof(DiskInfo, bandwidth)},
        {BS_STREAM_PROPERTY_RATE, "t", offsetof(DiskInfo, rate)},
        {BS_STREAM_PROPERTY_START_TIME, "t", offsetof(DiskInfo, start_time)},
        {BS_STREAM_PROPERTY_EXPECTED_END_TIME, "t", offsetof(DiskInfo, expected_end_time)},
        {BS_STREAM_PROPERTY_ERROR, "s", offsetof(DiskInfo, error)},
};

static void properties_free(const Property *props, size_t n, void *data) {
        for (size_t i = 0; i < n; i++) {
                void *p = (uint8_t *) data + props[i].offset;

                if (streq(props[i].signature, "s") || streq(props[i].signature, "o")) {
                        free(*(char **) p);
                        *(char **) p = NULL;
                } else if (props[i].signature[0] == 'a') {
                        *(char ***) p = strv_free(*(char ***) p);
                }
        }
}

static GuestInfo *guest_info_free(GuestInfo *g) {
        if (!g)
                return NULL;
        properties_free(guest_properties, ELEMENTSOF(guest_properties), g);
        free(g->object);
        free(g);
        return NULL;
}

static void guest_info_freep(GuestInfo **g) {
        guest_info_free(*g);
}

static DiskInfo *disk_info_free(DiskInfo *d) {
        if (!d)
                return NULL;
        properties_free(disk_properties, ELEMENTSOF(disk_properties), d);
        free(d->object);
        free(d);
        return NULL;
}

static void disk_info_freep(DiskInfo **d) {
        disk_info_free(*d);
}

static int read_property_value(sd_bus_message *m, const Property *prop, void *data) {
        void *p = (uint8_t *) data + prop->offset;
        const char *sig = prop->signature;
        int r;

        if (streq(sig, "s") || streq(sig, "o")) {
                const char *s;
                char *c;

                r = sd_bus_message_read_basic(m, sig[0], &s);
                if (r < 0)
                        return r;
                c = strdup(s);
                if (!c)
                        return -ENOMEM;
                free(*(char **) p);
                *(char **) p = c;
        } else if (streq(sig, "t")) {
                r = sd_bus_message_read_basic(m, 't', p);
        } else if (streq(sig, "u")) {
                r = sd_bus_message_read_basic(m, 'u', p);
        } else if (streq(sig, "b")) {
                int b;

                r = sd_bus_message_read_basic(m, 'b', &b);
                if (r >= 0)
                        *(bool *) p = b;
        } else {
                char **l = NULL;

                r = sd_bus_message_read_strv(m, &l);
                if (r >= 0) {
                        strv_free(*(char ***) p);
                        *(char ***) p = l;
                }
        }
        return r < 0 ? r : 0;
}

/* Reads an a{sv} into data. Unknown properties and ones of an unexpected type are skipped:
 * a newer server may add some, and a wrong type is the server's bug, not a reason to fail. */
static int map_properties(sd_bus_message *m, const Property *props, size_t n, void *data, uint64_t *present) {
        int r;

        r = sd_bus_message_enter_container(m, 'a', "{sv}");
        if (r < 0)
                return r;
        while ((r = sd_bus_message_enter_container(m, 'e', "sv")) > 0) {
                const char *name, *contents;
                size_t i;

                r = sd_bus_message_read_basic(m, 's', &name);
                if (r < 0)
                        return r;
                for (i = 0; i < n; i++)
                        if (streq(props[i].name, name))
                                break;
                r = sd_bus_message_peek_type(m, NULL, &contents);
                if (r < 0)
                        return r;
                if (i >= n || !streq(contents, props[i].signature)) {
                        if (i < n)
                                log_debug("Property %s has type '%s', expected '%s'; ignoring.", name, contents,
                                        props[i].signature);
                        r = sd_bus_message_skip(m, "v");
                        if (r < 0)
                                return r;
                } else {
                        r = sd_bus_message_enter_container(m, 'v', contents);
                        if (r < 0)
                                return r;
                        r = read_property_value(m, &props[i], data);
                        if (r < 0)
                                return r;
                        r = sd_bus_message_exit_container(m);
                        if (r < 0)
                                return r;
                        *present |= UINT64_C(1) << i;
                }
                r = sd_bus_message_exit_container(m);
                if (r < 0)
                        return r;
        }
        if (r < 0)
                return r;
        return sd_bus_message_exit_container(m);
}

/* The properties exactly as the server sent them (numbers as numbers), keyed by their D-Bus names. */
static void json_properties(
        JsonWriter *w, const Property *props, size_t n, const void *data, uint64_t present, const char *skip) {
        for (size_t i = 0; i < n; i++) {
                const void *p = (const uint8_t *) data + props[i].offset;
                const char *sig = props[i].signature;

                if (!(present & (UINT64_C(1) << i)) || streq_ptr(props[i].name, skip))
                        continue;
                json_key(w, props[i].name);
                if (streq(sig, "s") || streq(sig, "o"))
                        json_string(w, *(char *const *) p);
                else if (streq(sig, "t"))
                        json_unsigned(w, *(const uint64_t *) p);
                else if (streq(sig, "u"))
                        json_unsigned(w, *(const uint32_t *) p);
                else if (streq(sig, "b"))
                        json_bool(w, *(const bool *) p);
                else
                        json_strv(w, *(char **const *) p);
        }
}

/* ---------------------------------------------------------------------------------------- */
/* The polkit agent: on a terminal, polkit may ask for a password during a call. The server
 * asks polkitd, which asks the agent registered for our process; pkttyagent registers for
 * its parent, so it is our own child, and lives only while a call that needs it runs. */

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

static void polkit_agent_close(void) {
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
static void polkit_agent_acquire(void) {
        if (agent_users++ == 0)
                polkit_agent_open();
}

static void polkit_agent_release(void) {
        if (agent_users > 0 && --agent_users == 0)
                polkit_agent_close();
}

static void polkit_agent_releasep(bool *held) {
        if (*held)
                polkit_agent_release();
}

/* ---------------------------------------------------------------------------------------- */
/* Bus calls */

/* action: the polkit action the server checked, for the hint when it wanted to ask for a password. */
static int log_bus_error(const sd_bus_error *error, int r, const char *verb, const char *action) {
        if (sd_bus_error_has_name(error, SD_BUS_ERROR_INTERACTIVE_AUTHORIZATION_REQUIRED)) {
                log_error("Failed to %s: %s", verb, error->message ?: error->name);
                return log_error_errno(r,
                        "Authentication is required; run as root, or on a terminal without --no-ask-password, or "
                        "ask an administrator to grant you %s (see blockstreamctl --help).",
                        action ?: "the " BUS_NAME " action");
        }
        if (sd_bus_error_has_names(error, SD_BUS_ERROR_SERVICE_UNKNOWN, SD_BUS_ERROR_NAME_HAS_NO_OWNER))
                return log_error_errno(
                        r, "Failed to %s: blockstreamd is not running (" BUS_NAME " not on the bus).", verb);
        if (r == -ENOTCONN || r == -ECONNRESET) {
                if (arg_host)
                        return log_error_errno(
                                r, "Failed to %s: the connection to the system bus on %s failed: %m", verb, arg_host);
                return log_error_errno(r, "Failed to %s: the connection to the system bus failed: %m", verb);
        }
        if (sd_bus_error_is_set(error))
                /* The server's messages are written for people: print them as they are. */
                return log_error_errno(r, "Failed to %s: %s", verb, error->message ?: error->name);
        return log_error_errno(r, "Failed to %s: %m", verb);
}

static int connect_bus(sd_bus **ret) {
        sd_bus *bus = NULL;
        int r;

        if (arg_host)
                r = sd_bus_open_system_remote(&bus, arg_host);
        else
                r = sd_bus_open_system(&bus);
        if (r < 0) {
                const char *addr = getenv("DBUS_SYSTEM_BUS_ADDRESS");

                if (arg_host)
                        return log_error_errno(r, "Failed to connect to the system bus on %s: %m", arg_host);
                if (addr)
                        return log_error_errno(r, "Failed to connect to the system bus at %s: %m", addr);
                return log_error_errno(r, "Failed to connect to the system bus: %m");
        }
        /* Lets polkit ask for a password, on this terminal through the agent that call() starts
         * (with --host, through an agent on that host if there is one). */
        if (arg_ask_password && isatty(STDIN_FILENO)) {
                r = sd_bus_set_allow_interactive_authorization(bus, true);
                if (r < 0) {
                        sd_bus_flush_close_unref(bus);
                        return log_error_errno(r, "Failed to allow interactive authorization: %m");
                }
        }
        *ret = bus;
        return 0;
}

static int new_call(sd_bus *bus, const char *path, const char *iface, const char *member, sd_bus_message **ret) {
        int r;

        r = sd_bus_message_new_method_call(bus, ret, BUS_NAME, path, iface, member);
        if (r < 0)
                return log_error_errno(r, "Failed to create %s call: %m", member);
        return 0;
}

/* action: the polkit action the server checks for this call (ACTION_*), or NULL for the calls
 * anyone may make (GetGuest, properties, GetManagedObjects): only the former start the agent. */
static int call(sd_bus *bus, sd_bus_message *m, const char *action, uint64_t timeout, const char *verb,
        sd_bus_message **reply) {
        _cleanup_(sd_bus_error_free) sd_bus_error error = SD_BUS_ERROR_NULL;
        int r;

        if (action)
                polkit_agent_acquire();
        r = sd_bus_call(bus, m, timeout, &error, reply);
        if (action)
                polkit_agent_release();
        if (r < 0)
                return log_bus_error(&error, r, verb, action);
        return 0;
}

/* A call whose arguments are all of fixed types. */
static int call_simple(sd_bus *bus, const char *path, const char *iface, const char *member, const char *action,
        uint64_t timeout, const char *verb, sd_bus_message **reply, const char *types, ...) {
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *m = NULL;
        va_list ap;
        int r;

        r = new_call(bus, path, iface, member, &m);
        if (r < 0)
                return r;
        if (types) {
                va_start(ap, types);
                r = sd_bus_message_appendv(m, types, ap);
                va_end(ap);
                if (r < 0)
                        return log_error_errno(r, "Failed to append %s arguments: %m", member);
        }
        return call(bus, m, action, timeout, verb, reply);
}

static int log_parse_error(int r) {
        return log_error_errno(r, "Failed to parse reply from blockstreamd: %m");
}

/* GetAll into data; *ret_cookie is the reply's serial, to tell older signals from newer ones. */
static int get_all_properties(sd_bus *bus, const char *path, const char *iface, const Property *props, size_t n,
        void *data, uint64_t *present, uint64_t *ret_cookie) {
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
        _cleanup_free_ char *verb = NULL;
        int r;

        verb = strdup_printf("get properties of %s", path);
        if (!verb)
                return log_oom();
        r = call_simple(bus, path, PROPERTIES_IFACE, "GetAll", NULL, 0, verb, &reply, "s", iface);
        if (r < 0)
                return r;
        r = map_properties(reply, props, n, data, present);
        if (r < 0)
                return log_parse_error(r);
        if (ret_cookie) {
                r = sd_bus_message_get_cookie(reply, ret_cookie);
                if (r < 0)
                        return log_parse_error(r);
        }
        return 0;
}

static int check_guest_name(const char *name) {
        if (!guest_name_is_valid(name))
                return usage_error(
                        "Invalid guest name '%s': use 1 to %d characters of A-Z a-z 0-9 _ . -", name, GUEST_NAME_MAX);
        return 0;
}

static int get_guest(sd_bus *bus, const char *name, GuestInfo **ret) {
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
        _cleanup_(guest_info_freep) GuestInfo *g = NULL;
        _cleanup_free_ char *verb = NULL;
        const char *path;
        int r;

        verb = strdup_printf("look up guest '%s'", name);
        if (!verb)
                return log_oom();
        r = call_simple(
                bus, MANAGER_PATH, MANAGER_INTERFACE, BS_MANAGER_METHOD_GET_GUEST, NULL, 0, verb, &reply, "s", name);
        if (r < 0)
                return r;
        r = sd_bus_message_read(reply, "o", &path);
        if (r < 0)
                return log_parse_error(r);
        g = calloc(1, sizeof(*g));
        if (!g)
                return log_oom();
        g->object = strdup(path);
        if (!g->object)
                return log_oom();
        r = get_all_properties(
                bus, path, GUEST_INTERFACE, guest_properties, ELEMENTSOF(guest_properties), g, &g->present, NULL);
        if (r < 0)
                return r;
        *ret = TAKE_PTR(g);
        return 0;
}

static int get_disk(sd_bus *bus, const char *path, DiskInfo **ret) {
        _cleanup_(disk_info_freep) DiskInfo *d = NULL;
        int r;

        d = calloc(1, sizeof(*d));
        if (!d)
                return log_oom();
        d->object = strdup(path);
        if (!d->object)
                return log_oom();
        r = get_all_properties(
                bus, path, STREAM_INTERFACE, disk_properties, ELEMENTSOF(disk_properties), d, &d->present, NULL);
        if (r < 0)
                return r;
        *ret = TAKE_PTR(d);
        return 0;
}

static bool disk_matches(const DiskInfo *d, const char *name, const char *abs) {
        return streq_ptr(d->device, name) || streq_ptr(d->path, name) || (abs && streq_ptr(d->path, abs));
}

/* Before connecting, so that wrong usage always exits 2. */
static int check_disk_args(char **args) {
        int r;

        r = check_guest_name(args[0]);
        if (r != 0)
                return r;
        if (isempty(args[1]))
                return usage_error("The disk must not be empty: give its alias (vda) or image path.");
        return 0;
}

/* DISK on the command line is an alias ("vda") or an image path, like the server accepts. */
static int resolve_disk(sd_bus *bus, const char *guest, const char *disk, GuestInfo **ret_guest, DiskInfo **ret) {
        _cleanup_(guest_info_freep) GuestInfo *g = NULL;
        _cleanup_(disk_info_freep) DiskInfo *found = NULL;
        _cleanup_free_ char *abs = NULL, *names = NULL;
        size_t names_len = 0;
        int r;

        if (strchr(disk, '/') && !is_remote() && path_make_absolute(disk, &abs) < 0)
                abs = NULL; /* matching against the name as given still works */

        r = get_guest(bus, guest, &g);
        if (r < 0)
                return r;
        for (char **p = g->disks; p && *p; p++) {
                _cleanup_(disk_info_freep) DiskInfo *d = NULL;
                const char *label;
                char *n;

                r = get_disk(bus, *p, &d);
                if (r < 0)
                        return r;
                if (disk_matches(d, disk, abs)) {
                        found = TAKE_PTR(d);
                        break;
                }
                label = !isempty(d->device) ? d->device : strempty(d->path);
                n = realloc(names, names_len + strlen(label) + 3);
                if (!n)
                        return log_oom();
                names = n;
                names_len += (size_t) sprintf(names + names_len, "%s%s", names_len > 0 ? ", " : "", label);
        }
        if (!found) {
                log_error("No disk '%s' in guest '%s' (disks: %s).", disk, guest, names ? names : "none");
                return -ENXIO;
        }
        if (ret_guest)
                *ret_guest = TAKE_PTR(g);
        *ret = TAKE_PTR(found);
        return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* list, status */

typedef struct Registry {
        GuestInfo **guests;
        size_t n_guests;
        DiskInfo **disks;
        size_t n_disks;
} Registry;

static void registry_done(Registry *reg) {
        for (size_t i = 0; i < reg->n_guests; i++)
                guest_info_free(reg->guests[i]);
        for (size_t i = 0; i < reg->n_disks; i++)
                disk_info_free(reg->disks[i]);
        free(reg->guests);
        free(reg->disks);
        *reg = (Registry){};
}

static int registry_add(void ***array, size_t *n, void *item) {
        void **a = reallocarray(*array, *n + 1, sizeof(void *));

        if (!a)
                return -ENOMEM;
        a[(*n)++] = item;
        *array = a;
        return 0;
}

static int read_managed_object(sd_bus_message *reply, Registry *reg) {
        const char *path;
        int r;

        r = sd_bus_message_read_basic(reply, 'o', &path);
        if (r < 0)
                return r;
        r = sd_bus_message_enter_container(reply, 'a', "{sa{sv}}");
        if (r < 0)
                return r;
        while ((r = sd_bus_message_enter_container(reply, 'e', "sa{sv}")) > 0) {
                const char *iface;

                r = sd_bus_message_read_basic(reply, 's', &iface);
                if (r < 0)
                        return r;
                if (streq(iface, GUEST_INTERFACE)) {
                        GuestInfo *g = calloc(1, sizeof(*g));

                        if (!g || registry_add((void ***) &reg->guests, &reg->n_guests, g) < 0) {
                                free(g);
                                return -ENOMEM;
                        }
                        g->object = strdup(path);
                        if (!g->object)
                                return -ENOMEM;
                        r = map_properties(reply, guest_properties, ELEMENTSOF(guest_properties), g, &g->present);
                } else if (streq(iface, STREAM_INTERFACE)) {
                        DiskInfo *d = calloc(1, sizeof(*d));

                        if (!d || registry_add((void ***) &reg->disks, &reg->n_disks, d) < 0) {
                                free(d);
                                return -ENOMEM;
                        }
                        d->object = strdup(path);
                        if (!d->object)
                                return -ENOMEM;
                        r = map_properties(reply, disk_properties, ELEMENTSOF(disk_properties), d, &d->present);
                } else
                        r = sd_bus_message_skip(reply, "a{sv}");
                if (r < 0)
                        return r;
                r = sd_bus_message_exit_container(reply);
                if (r < 0)
                        return r;
        }
        if (r < 0)
                return r;
        return sd_bus_message_exit_container(reply);
}

static int guest_compare(const void *a, const void *b) {
        const GuestInfo *x = *(GuestInfo *const *) a, *y = *(GuestInfo *const *) b;

        return strcmp(strempty(x->name), strempty(y->name));
}

static int load_registry(sd_bus *bus, Registry *reg) {
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
        int r;

        r = call_simple(
                bus, MANAGER_PATH, OBJECT_MANAGER_IFACE, "GetManagedObjects", NULL, 0, "list guests", &reply, NULL);
        if (r < 0)
                return r;
        r = sd_bus_message_enter_container(reply, 'a', "{oa{sa{sv}}}");
        if (r < 0)
                return log_parse_error(r);
        while ((r = sd_bus_message_enter_container(reply, 'e', "oa{sa{sv}}")) > 0) {
                r = read_managed_object(reply, reg);
                if (r < 0)
                        return log_parse_error(r);
                r = sd_bus_message_exit_container(reply);
                if (r < 0)
                        return log_parse_error(r);
        }
        if (r < 0)
                return log_parse_error(r);
        r = sd_bus_message_exit_container(reply);
        if (r < 0)
                return log_parse_error(r);
        if (reg->n_guests > 1)
                qsort(reg->guests, reg->n_guests, sizeof(GuestInfo *), guest_compare);
        return 0;
}

static DiskInfo *registry_find_disk(const Registry *reg, const char *path) {
        for (size_t i = 0; i < reg->n_disks; i++)
                if (streq(reg->disks[i]->object, path))
                        return reg->disks[i];
        return NULL;
}

static bool state_is_active(const char *state) {
        return streq_ptr(state, BS_STATE_RUNNING) || streq_ptr(state, BS_STATE_PAUSED);
}

/* One guest as list and status print it in JSON: its properties, with "Disks" expanded
 * from object paths to the disks' own properties (each with its "ObjectPath"). */
static void json_guest(JsonWriter *w, const GuestInfo *g, DiskInfo *const *disks, size_t n_disks) {
        json_open(w, '{');
        json_key(w, "ObjectPath");
        json_string(w, g->object);
        json_properties(w, guest_properties, ELEMENTSOF(guest_properties), g, g->present, BS_GUEST_PROPERTY_DISKS);
        json_key(w, BS_GUEST_PROPERTY_DISKS);
        json_open(w, '[');
        for (size_t i = 0; i < n_disks; i++) {
                json_open(w, '{');
                json_key(w, "ObjectPath");
                json_string(w, disks[i]->object);
                json_properties(w, disk_properties, ELEMENTSOF(disk_properties), disks[i], disks[i]->present, NULL);
                json_close(w, '}');
        }
        json_close(w, ']');
        json_close(w, '}');
}

/* "vda, vdb (running 42%)" */
static char *format_disk_list(const Registry *reg, const GuestInfo *g) {
        char *buf = NULL;
        size_t len = 0;
        FILE *f;

        f = open_memstream(&buf, &len);
        if (!f)
                return NULL;
        for (char **p = g->disks; p && *p; p++) {
                const DiskInfo *d = registry_find_disk(reg, *p);
                const char *slash = strrchr(*p, '/');

                fputs(p == g->disks ? "" : ", ", f);
                if (!d) {
                        fputs(slash ? slash + 1 : *p, f);
                        continue;
                }
                fputs(!isempty(d->device) ? d->device : strempty(d->path), f);
                if (state_is_active(d->state))
                        fprintf(f, " (%s %u%%)", d->state, percent(d->bytes_done, d->bytes_total));
        }
        if (fclose(f) != 0) {
                free(buf);
                return NULL;
        }
        return buf;
}

static int verb_list(_unused_ char **args) {
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = NULL;
        _cleanup_(registry_done) Registry reg = {};
        int r;

        r = connect_bus(&bus);
        if (r < 0)
                return r;
        r = load_registry(bus, &reg);
        if (r < 0)
                return r;

        if (arg_json) {
                JsonWriter w = {.f = stdout};

                json_open(&w, '[');
                for (size_t i = 0; i < reg.n_guests; i++) {
                        const GuestInfo *g = reg.guests[i];
                        _cleanup_free_ DiskInfo **disks = NULL;
                        size_t n = 0;

                        disks = calloc(strv_length(g->disks) + 1, sizeof(DiskInfo *));
                        if (!disks)
                                return log_oom();
                        for (char **p = g->disks; p && *p; p++) {
                                DiskInfo *d = registry_find_disk(&reg, *p);
                                if (d)
                                        disks[n++] = d;
                        }
                        json_guest(&w, g, disks, n);
                }
                json_close(&w, ']');
                return 0;
        }

        if (reg.n_guests == 0) {
                if (!arg_quiet)
                        printf("No guests.\n");
                return 0;
        }

        {
                _cleanup_strv_free_ char **owners = NULL, **disks = NULL;
                size_t w_name = strlen("GUEST"), w_running = strlen("RUNNING"), w_owner = strlen("OWNER");

                for (size_t i = 0; i < reg.n_guests; i++) {
                        char owner[128];
                        char *dl;

                        format_owner(owner, sizeof(owner), reg.guests[i]->owner, false);
                        r = strv_push(&owners, strdup(owner));
                        if (r < 0)
                                return log_oom();
                        dl = format_disk_list(&reg, reg.guests[i]);
                        r = strv_push(&disks, dl);
                        if (r < 0)
                                return log_oom();
                        w_name = MAX(w_name, strlen(strempty(reg.guests[i]->name)));
                        w_owner = MAX(w_owner, strlen(owner));
                }

                printf("%-*s %-*s %-*s %s\n", (int) w_name, "GUEST", (int) w_running, "RUNNING", (int) w_owner, "OWNER",
                        "DISKS");
                for (size_t i = 0; i < reg.n_guests; i++)
                        printf("%-*s %-*s %-*s %s\n", (int) w_name, strempty(reg.guests[i]->name), (int) w_running,
                                yes_no(reg.guests[i]->running), (int) w_owner, owners[i], disks[i]);
                if (!arg_quiet && isatty(STDOUT_FILENO))
                        printf("\n%zu guest%s listed.\n", reg.n_guests, reg.n_guests == 1 ? "" : "s");
        }
        return 0;
}

#define FIELD_WIDTH 14

_printf_(2, 3) static void print_field(const char *label, const char *format, ...) {
        va_list ap;

        printf("%*s: ", FIELD_WIDTH, label);
        va_start(ap, format);
        vprintf(format, ap);
        va_end(ap);
        putchar('\n');
}

/* QEMU's messages may span lines: keep the continuation lines in the value column. */
static void print_field_lines(const char *label, const char *text) {
        printf("%*s: ", FIELD_WIDTH, label);
        for (const char *p = text; *p; p++) {
                putchar(*p);
                if (*p == '\n' && p[1])
                        printf("%*s  ", FIELD_WIDTH, "");
        }
        putchar('\n');
}

static void print_guest(const GuestInfo *g) {
        char owner[128];

        format_owner(owner, sizeof(owner), g->owner, true);
        printf("%s\n", strempty(g->name));
        print_field("Object", "%s", g->object);
        print_field("UUID", "%s", isempty(g->uuid) ? "n/a" : g->uuid);
        print_field("Owner", "%s", owner);
        print_field("Running", "%s", yes_no(g->running));
        print_field("QMP socket", "%s", isempty(g->qmp_socket) ? "none (offline guest)" : g->qmp_socket);
        if (!isempty(g->sandbox_label))
                print_field("Sandbox label", "%s", g->sandbox_label);
        print_field("Disks", "%zu", strv_length(g->disks));
}

static void print_disk(const DiskInfo *d) {
        char a[FORMAT_BYTES_MAX], b[FORMAT_BYTES_MAX], t[128], s[64];
        usec_t now = now_usec(CLOCK_REALTIME);
        bool active = state_is_active(d->state);

        printf("\n%s\n", !isempty(d->device) ? d->device : strempty(d->object));
        print_field("Object", "%s", d->object);
        print_field("Path", "%s", strempty(d->path));
        if (!isempty(d->node_name))
                print_field("Node", "%s", d->node_name);
        if (strv_length(d->backing_chain) == 0)
                print_field("Backing", "none (independent)");
        else
                for (char **p = d->backing_chain; *p; p++)
                        printf("%*s%c %s\n", FIELD_WIDTH, p == d->backing_chain ? "Backing" : "",
                                p == d->backing_chain ? ':' : ' ', *p);
        print_field("Size", "%s (%" PRIu64 " bytes)", format_bytes(a, sizeof(a), d->size), d->size);

        if (streq_ptr(d->mode, BS_MODE_RANGE))
                print_field("State", "%s (range %s at offset %" PRIu64 ")", strempty(d->state),
                        format_bytes(a, sizeof(a), d->length), d->offset);
        else if (!isempty(d->mode))
                print_field("State", "%s (%s)", strempty(d->state), d->mode);
        else
                print_field("State", "%s", strempty(d->state));

        if (!streq_ptr(d->state, BS_STATE_IDLE) && !isempty(d->state))
                print_field("Progress", "%s of %s (%u%%)", format_bytes(a, sizeof(a), d->bytes_done),
                        format_bytes(b, sizeof(b), d->bytes_total), percent(d->bytes_done, d->bytes_total));
        print_field("Bandwidth", "%s", format_rate(t, sizeof(t), d->bandwidth, "unlimited"));
        if (active)
                print_field("Rate", "%s", format_rate(t, sizeof(t), d->rate, NULL));
        if (d->start_time > 0) {
                if (now >= d->start_time)
                        print_field("Started", "%s (%s ago)", format_timestamp(t, sizeof(t), d->start_time),
                                format_timespan(s, sizeof(s), now - d->start_time));
                else
                        print_field("Started", "%s", format_timestamp(t, sizeof(t), d->start_time));
        }
        if (active && d->expected_end_time > 0) {
                if (d->expected_end_time > now)
                        print_field("Expected end", "%s (in %s)", format_timestamp(t, sizeof(t), d->expected_end_time),
                                format_timespan(s, sizeof(s), d->expected_end_time - now));
                else
                        print_field("Expected end", "%s", format_timestamp(t, sizeof(t), d->expected_end_time));
        }
        if (!isempty(d->error))
                print_field_lines("Error", d->error);
}

static int verb_status(char **args) {
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = NULL;
        _cleanup_(guest_info_freep) GuestInfo *g = NULL;
        _cleanup_free_ DiskInfo **disks = NULL;
        size_t n = 0;
        int r;

        r = args[1] ? check_disk_args(args) : check_guest_name(args[0]);
        if (r != 0)
                return r;
        r = connect_bus(&bus);
        if (r < 0)
                return r;

        if (args[1]) {
                DiskInfo *d = NULL;

                disks = calloc(1, sizeof(DiskInfo *));
                if (!disks)
                        return log_oom();
                r = resolve_disk(bus, args[0], args[1], &g, &d);
                if (r != 0)
                        return r;
                disks[n++] = d;
        } else {
                r = get_guest(bus, args[0], &g);
                if (r < 0)
                        return r;
                disks = calloc(strv_length(g->disks) + 1, sizeof(DiskInfo *));
                if (!disks)
                        return log_oom();
                for (char **p = g->disks; p && *p; p++) {
                        r = get_disk(bus, *p, &disks[n]);
                        if (r < 0)
                                goto finish;
                        n++;
                }
        }

        if (arg_json) {
                JsonWriter w = {.f = stdout};
                json_guest(&w, g, disks, n);
        } else {
                print_guest(g);
                for (size_t i = 0; i < n; i++)
                        print_disk(disks[i]);
        }
        r = 0;
finish:
        for (size_t i = 0; i < n; i++)
                disk_info_free(disks[i]);
        return r;
}

/* ---------------------------------------------------------------------------------------- */
/* register, unregister, provision */

static int append_options_begin(sd_bus_message *m) {
        return sd_bus_message_open_container(m, 'a', "{sv}");
}

static int verb_register(char **args) {
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = NULL;
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *m = NULL, *reply = NULL;
        _cleanup_free_ char *qmp = NULL, *verb = NULL;
        const char *name = args[0], *path;
        uint32_t owner = 0;
        int r;

        r = check_guest_name(name);
        if (r != 0)
                return r;
        if (args[1] && !streq(args[1], "-") && !isempty(args[1])) {
                r = local_path_arg(args[1], &qmp);
                if (r < 0)
                        return r;
        }
        if (qmp && arg_disks)
                return usage_error("--disk= describes the disks of a guest that is not running; with a QMP socket "
                                   "blockstreamd asks QEMU for them. Pass '-' as QMP_SOCKET for an offline guest.");

        if (arg_owner) {
                char *end;
                unsigned long long u;

                errno = 0;
                u = strtoull(arg_owner, &end, 10);
                if (isdigit((unsigned char) arg_owner[0]) && errno == 0 && *end == 0 && u < UINT32_MAX)
                        owner = (uint32_t) u;
                else {
                        struct passwd pw, *result = NULL;
                        char buf[4096];

                        /* A user name resolves on this machine only. */
                        if (is_remote())
                                return usage_error("--owner= must be a numeric uid with --host: '%s'.", arg_owner);
                        r = getpwnam_r(arg_owner, &pw, buf, sizeof(buf), &result);
                        if (r != 0 || !result)
                                return usage_error("Unknown user '%s' for --owner=.", arg_owner);
                        owner = (uint32_t) pw.pw_uid;
                }
        }
        if (arg_uuid) {
                sd_id128_t id;

                if (sd_id128_from_string(arg_uuid, &id) < 0)
                        return usage_error("Invalid UUID '%s'.", arg_uuid);
        }
        r = connect_bus(&bus);
        if (r < 0)
                return r;

        r = new_call(bus, MANAGER_PATH, MANAGER_INTERFACE, BS_MANAGER_METHOD_REGISTER_GUEST, &m);
        if (r < 0)
                return r;
        r = sd_bus_message_append(m, "ss", name, strempty(qmp));
        if (r >= 0)
                r = append_options_begin(m);
        if (r >= 0 && arg_owner)
                r = sd_bus_message_append(m, "{sv}", BS_OPTION_OWNER, "u", owner);
        if (r >= 0 && arg_uuid)
                r = sd_bus_message_append(m, "{sv}", BS_OPTION_UUID, "s", arg_uuid);
        if (r >= 0 && arg_disks) {
                r = sd_bus_message_open_container(m, 'e', "sv");
                if (r >= 0)
                        r = sd_bus_message_append(m, "s", BS_OPTION_DISKS);
                if (r >= 0)
                        r = sd_bus_message_open_container(m, 'v', "a{ss}");
                if (r >= 0)
                        r = sd_bus_message_open_container(m, 'a', "{ss}");
                for (char **d = arg_disks; r >= 0 && *d; d++) {
                        _cleanup_free_ char *alias = NULL, *p = NULL;
                        const char *eq = strchr(*d, '=');

                        alias = strndup(*d, (size_t) (eq - *d)); /* '=' checked in parse_argv */
                        if (!alias)
                                return log_oom();
                        r = local_path_arg(eq + 1, &p);
                        if (r < 0)
                                return r;
                        r = sd_bus_message_append(m, "{ss}", alias, p);
                }
                if (r >= 0)
                        r = sd_bus_message_close_container(m);
                if (r >= 0)
                        r = sd_bus_message_close_container(m);
                if (r >= 0)
                        r = sd_bus_message_close_container(m);
        }
        if (r >= 0)
                r = sd_bus_message_close_container(m);
        if (r < 0)
                return log_error_errno(r, "Failed to append RegisterGuest arguments: %m");

        verb = strdup_printf("register guest '%s'", name);
        if (!verb)
                return log_oom();
        r = call(bus, m, ACTION_MANAGE, SLOW_CALL_TIMEOUT, verb, &reply);
        if (r < 0)
                return r;
        r = sd_bus_message_read(reply, "o", &path);
        if (r < 0)
                return log_parse_error(r);

        if (arg_json) {
                JsonWriter w = {.f = stdout};

                json_open(&w, '{');
                json_key(&w, "guest");
                json_string(&w, path);
                json_close(&w, '}');
        } else if (!arg_quiet)
                printf("%s\n", path);
        return 0;
}

static int verb_unregister(char **args) {
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = NULL;
        _cleanup_free_ char *verb = NULL;
        int r;

        r = check_guest_name(args[0]);
        if (r != 0)
                return r;
        r = connect_bus(&bus);
        if (r < 0)
                return r;
        verb = strdup_printf("unregister guest '%s'", args[0]);
        if (!verb)
                return log_oom();
        return call_simple(bus, MANAGER_PATH, MANAGER_INTERFACE, BS_MANAGER_METHOD_UNREGISTER_GUEST, ACTION_MANAGE, 0,
                verb, NULL, "s", args[0]);
}

static int verb_provision(char **args) {
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = NULL;
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *m = NULL, *reply = NULL;
        _cleanup_free_ char *template = NULL, *target = NULL;
        char a[FORMAT_BYTES_MAX];
        uint64_t size;
        int r;

        if (isempty(args[0]) || isempty(args[1]))
                return usage_error("TEMPLATE and TARGET must not be empty.");
        /* URLs go as they are; only local file names are made absolute. */
        if (strstr(args[0], "://")) {
                template = strdup(args[0]);
                if (!template)
                        return log_oom();
        } else {
                r = local_path_arg(args[0], &template);
                if (r < 0)
                        return r;
        }
        r = local_path_arg(args[1], &target);
        if (r < 0)
                return r;
        r = connect_bus(&bus);
        if (r < 0)
                return r;

        r = new_call(bus, MANAGER_PATH, MANAGER_INTERFACE, BS_MANAGER_METHOD_PROVISION_DISK, &m);
        if (r < 0)
                return r;
        r = sd_bus_message_append(m, "ss", template, target);
        if (r >= 0)
                r = append_options_begin(m);
        if (r >= 0 && arg_template_format)
                r = sd_bus_message_append(m, "{sv}", BS_OPTION_TEMPLATE_FORMAT, "s", arg_template_format);
        if (r >= 0)
                r = sd_bus_message_close_container(m);
        if (r < 0)
                return log_error_errno(r, "Failed to append ProvisionDisk arguments: %m");

        r = call(bus, m, ACTION_MANAGE, SLOW_CALL_TIMEOUT, "provision disk", &reply);
        if (r < 0)
                return r;
        r = sd_bus_message_read(reply, "t", &size);
        if (r < 0)
                return log_parse_error(r);

        if (arg_json) {
                JsonWriter w = {.f = stdout};

                json_open(&w, '{');
                json_key(&w, "size");
                json_unsigned(&w, size);
                json_close(&w, '}');
        } else if (!arg_quiet)
                printf("%s: %s (%" PRIu64 " bytes), backed by %s\n", target, format_bytes(a, sizeof(a), size), size,
                        template);
        return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* Waiting for a job: pull --wait, cancel --wait, wait */

typedef struct WaitState {
        sd_bus *bus;
        DiskInfo *disk;
        const char *guest;
        /* Signals sent before this serial describe an earlier job (or are already in the
         * properties we read): the daemon's serials only grow. */
        uint64_t min_cookie;
        bool finished;
        char *result;
        uint64_t bytes_done;
        char *error;
        usec_t terminal_seen; /* State went terminal but Finished did not come (yet) */
        bool daemon_gone;
        bool draw;
        bool drawn;
        int r; /* an error inside a callback */
} WaitState;

static volatile sig_atomic_t interrupted = 0;

static void on_sigint(int sig) {
        interrupted = sig;
}

static bool signal_is_stale(const WaitState *ws, sd_bus_message *m) {
        uint64_t cookie;

        if (ws->min_cookie == 0 || sd_bus_message_get_cookie(m, &cookie) < 0)
                return false;
        return cookie < ws->min_cookie;
}

static bool state_is_terminal(const char *state) {
        return streq_ptr(state, BS_STATE_COMPLETED) || streq_ptr(state, BS_STATE_FAILED) ||
               streq_ptr(state, BS_STATE_CANCELLED);
}

static int set_finished(WaitState *ws, const char *result, uint64_t bytes_done, const char *error) {
        ws->result = strdup(result);
        ws->error = strdup(error);
        if (!ws->result || !ws->error)
                return -ENOMEM;
        ws->bytes_done = bytes_done;
        ws->finished = true;
        return 0;
}

static int on_finished(sd_bus_message *m, void *userdata, _unused_ sd_bus_error *ret_error) {
        WaitState *ws = userdata;
        const char *result, *error;
        uint64_t bytes_done;
        int r;

        if (ws->finished || signal_is_stale(ws, m))
                return 0;
        r = sd_bus_message_read(m, "sts", &result, &bytes_done, &error);
        if (r < 0) {
                ws->r = log_parse_error(r);
                return 0;
        }
        r = set_finished(ws, result, bytes_done, error);
        if (r < 0)
                ws->r = log_oom();
        return 0;
}

static int on_properties_changed(sd_bus_message *m, void *userdata, _unused_ sd_bus_error *ret_error) {
        WaitState *ws = userdata;
        DiskInfo *d = ws->disk;
        const char *iface;
        int r;

        if (ws->finished || signal_is_stale(ws, m))
                return 0;
        r = sd_bus_message_read(m, "s", &iface);
        if (r < 0 || !streq(iface, STREAM_INTERFACE))
                return 0;
        r = map_properties(m, disk_properties, ELEMENTSOF(disk_properties), d, &d->present);
        if (r >= 0) {
                r = sd_bus_message_enter_container(m, 'a', "s");
                if (r >= 0)
                        r = sd_bus_message_at_end(m, false);
                /* Invalidated properties come without values: fetch them all again. */
                if (r == 0)
                        r = get_all_properties(ws->bus, d->object, STREAM_INTERFACE, disk_properties,
                                ELEMENTSOF(disk_properties), d, &d->present, NULL);
        }
        if (r < 0) {
                ws->r = log_parse_error(r);
                return 0;
        }
        if (state_is_terminal(d->state)) {
                if (ws->terminal_seen == 0)
                        ws->terminal_seen = now_usec(CLOCK_MONOTONIC);
        } else
                ws->terminal_seen = 0;
        return 0;
}

static int on_name_owner_changed(sd_bus_message *m, void *userdata, _unused_ sd_bus_error *ret_error) {
        WaitState *ws = userdata;
        const char *name, *old_owner, *new_owner;

        if (sd_bus_message_read(m, "sss", &name, &old_owner, &new_owner) >= 0 && streq(name, BUS_NAME) &&
                isempty(new_owner))
                ws->daemon_gone = true;
        return 0;
}

/* Installed before the method that starts or stops the job, so that no signal is missed. */
static int wait_subscribe(
        WaitState *ws, sd_bus_slot **ret_finished, sd_bus_slot **ret_changed, sd_bus_slot **ret_owner) {
        int r;

        r = sd_bus_match_signal(ws->bus, ret_finished, BUS_NAME, ws->disk->object, STREAM_INTERFACE,
                BS_STREAM_SIGNAL_FINISHED, on_finished, ws);
        if (r < 0)
                return log_error_errno(r, "Failed to subscribe to Finished: %m");
        r = sd_bus_match_signal(ws->bus, ret_changed, BUS_NAME, ws->disk->object, PROPERTIES_IFACE, "PropertiesChanged",
                on_properties_changed, ws);
        if (r < 0)
                return log_error_errno(r, "Failed to subscribe to PropertiesChanged: %m");
        r = sd_bus_add_match(ws->bus, ret_owner,
                "type='signal',sender='org.freedesktop.DBus',path='/org/freedesktop/DBus',"
                "interface='org.freedesktop.DBus',member='NameOwnerChanged',arg0='" BUS_NAME "'",
                on_name_owner_changed, ws);
        if (r < 0)
                return log_error_errno(r, "Failed to subscribe to NameOwnerChanged: %m");
        return 0;
}

static void clear_progress(WaitState *ws) {
        if (ws->drawn) {
                fputs("\r\x1b[K", stderr);
                fflush(stderr);
                ws->drawn = false;
        }
}

static void draw_progress(WaitState *ws) {
        const DiskInfo *d = ws->disk;
        char a[FORMAT_BYTES_MAX], b[FORMAT_BYTES_MAX], rate[64], eta[64], text[256];
        unsigned p = percent(d->bytes_done, d->bytes_total), columns, cells = 0;
        bool utf8 = utf8_enabled();
        size_t text_len;

        if (!ws->draw)
                return;
        eta[0] = 0;
        if (streq_ptr(d->state, BS_STATE_PAUSED))
                snprintf(rate, sizeof(rate), "paused");
        else {
                usec_t now = now_usec(CLOCK_REALTIME);

                format_rate(rate, sizeof(rate), d->rate, NULL);
                if (d->expected_end_time > now) {
                        char s[64];
                        snprintf(eta, sizeof(eta), "  ETA %s",
                                format_timespan(s, sizeof(s), d->expected_end_time - now));
                } else if (d->rate > 0 && d->bytes_total > d->bytes_done) {
                        char s[64];
                        snprintf(eta, sizeof(eta), "  ETA %s",
                                format_timespan(
                                        s, sizeof(s), (d->bytes_total - d->bytes_done) / d->rate * USEC_PER_SEC));
                }
        }
        snprintf(text, sizeof(text), " %3u%%  %s/%s  %s%s", p, format_bytes(a, sizeof(a), d->bytes_done),
                format_bytes(b, sizeof(b), d->bytes_total), rate, eta);

        text_len = strlen(text) + strlen(strempty(d->device)) + 3;
        columns = terminal_columns(STDERR_FILENO);
        if (columns > text_len + 10)
                cells = (unsigned) MIN((size_t) 40, columns - text_len - 1);

        fprintf(stderr, "\r%s [", strempty(d->device));
        for (unsigned i = 0; i < cells; i++) {
                bool full = (uint64_t) i * 100 < (uint64_t) p * cells;
                fputs(full ? (utf8 ? "\u2588" : "#") : (utf8 ? "\u2591" : "-"), stderr);
        }
        fprintf(stderr, "]%s\x1b[K", text);
        fflush(stderr);
        ws->drawn = true;
}

/* The exit status: after_cancel, the job we stopped ending as cancelled is a success. */
static int report_result(WaitState *ws, bool after_cancel) {
        const DiskInfo *d = ws->disk;
        char a[FORMAT_BYTES_MAX], b[FORMAT_BYTES_MAX];
        const char *device = !isempty(d->device) ? d->device : d->object;
        int ret;

        clear_progress(ws);

        if (streq(ws->result, BS_STATE_COMPLETED) || (after_cancel && streq(ws->result, BS_STATE_CANCELLED)))
                ret = 0;
        else
                ret = 1;

        if (arg_json) {
                JsonWriter w = {.f = stdout};

                json_open(&w, '{');
                json_key(&w, "result");
                json_string(&w, ws->result);
                json_key(&w, "bytes_done");
                json_unsigned(&w, ws->bytes_done);
                json_key(&w, "error");
                json_string(&w, ws->error);
                json_close(&w, '}');
        }

        if (streq(ws->result, BS_STATE_COMPLETED)) {
                if (!arg_json && !arg_quiet)
                        printf("Stream of %s (guest %s) completed: %s copied.\n", device, ws->guest,
                                format_bytes(a, sizeof(a), ws->bytes_done));
        } else if (streq(ws->result, BS_STATE_CANCELLED)) {
                if (ret != 0)
                        log_error("Stream of %s (guest %s) was cancelled after %s of %s.", device, ws->guest,
                                format_bytes(a, sizeof(a), ws->bytes_done), format_bytes(b, sizeof(b), d->bytes_total));
                else if (!arg_json && !arg_quiet)
                        printf("Stream of %s (guest %s) cancelled after %s; what was copied stays.\n", device,
                                ws->guest, format_bytes(a, sizeof(a), ws->bytes_done));
        } else if (streq(ws->result, BS_STATE_IDLE)) {
                if (!arg_quiet)
                        log_info("No stream job has run on %s (guest %s).", device, ws->guest);
        } else
                log_error("Stream of %s (guest %s) %s after %s of %s: %s", device, ws->guest, ws->result,
                        format_bytes(a, sizeof(a), ws->bytes_done), format_bytes(b, sizeof(b), d->bytes_total),
                        isempty(ws->error) ? "no reason given" : ws->error);
        return ret;
}

static int wait_loop(WaitState *ws, bool after_cancel) {
        struct sigaction sa = {.sa_handler = on_sigint}, old_int, old_term;
        int r = 0;

        /* No SA_RESTART: the signal must interrupt sd_bus_wait(). */
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGINT, &sa, &old_int) < 0 || sigaction(SIGTERM, &sa, &old_term) < 0)
                return log_error_errno(errno, "Failed to install signal handler: %m");

        ws->draw = isatty(STDERR_FILENO) && !arg_quiet;
        for (;;) {
                if (ws->r < 0) {
                        r = ws->r;
                        break;
                }
                if (ws->finished) {
                        r = 0;
                        break;
                }
                if (interrupted) {
                        clear_progress(ws);
                        log_error("Stopped waiting; the stream job of %s goes on.", strempty(ws->disk->device));
                        log_info("'blockstreamctl status %s %s' shows it, 'blockstreamctl cancel %s %s' stops it.",
                                ws->guest, strempty(ws->disk->device), ws->guest, strempty(ws->disk->device));
                        r = EXIT_INTERRUPTED;
                        break;
                }
                if (ws->daemon_gone) {
                        clear_progress(ws);
                        r = log_error_errno(ECONNRESET,
                                "blockstreamd went away while waiting; the job may still "
                                "run in QEMU. Check with 'blockstreamctl status %s'.",
                                ws->guest);
                        break;
                }
                /* The contract promises Finished; do not hang if a server forgets it. */
                if (ws->terminal_seen > 0 && now_usec(CLOCK_MONOTONIC) - ws->terminal_seen > 2 * USEC_PER_SEC) {
                        r = set_finished(ws, ws->disk->state, ws->disk->bytes_done, strempty(ws->disk->error));
                        if (r < 0) {
                                r = log_oom();
                                break;
                        }
                        continue;
                }

                r = sd_bus_process(ws->bus, NULL);
                if (r < 0) {
                        clear_progress(ws);
                        r = log_error_errno(r, "Failed to process bus messages while waiting: %m");
                        break;
                }
                if (r > 0)
                        continue;

                draw_progress(ws);
                /* Wake up twice a second for the ETA countdown and for a Ctrl-C that came just
                 * before the wait began. */
                r = sd_bus_wait(ws->bus, USEC_PER_SEC / 2);
                if (r < 0 && r != -EINTR) {
                        clear_progress(ws);
                        r = log_error_errno(r, "Failed to wait for bus messages: %m");
                        break;
                }
                r = 0;
        }
        (void) sigaction(SIGINT, &old_int, NULL);
        (void) sigaction(SIGTERM, &old_term, NULL);

        if (r != 0)
                return r;
        return report_result(ws, after_cancel);
}

static void wait_state_done(WaitState *ws) {
        free(ws->result);
        free(ws->error);
}

/* ---------------------------------------------------------------------------------------- */
/* pull, wait, pause, resume, cancel, set-bandwidth */

static int parse_bandwidth(const char *s, uint64_t *ret) {
        _cleanup_free_ char *c = NULL;
        size_t n = strlen(s);

        if (streq(s, "unlimited") || streq(s, "infinity")) {
                *ret = 0;
                return 0;
        }
        c = strdup(s);
        if (!c)
                return -ENOMEM;
        if (n >= 2 && streq(c + n - 2, "/s"))
                c[n - 2] = 0;
        return parse_size(c, ret);
}

static int verb_pull(char **args) {
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = NULL;
        _cleanup_(guest_info_freep) GuestInfo *g = NULL;
        _cleanup_(disk_info_freep) DiskInfo *d = NULL;
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *m = NULL, *reply = NULL;
        _cleanup_(sd_bus_slot_unrefp) sd_bus_slot *s1 = NULL, *s2 = NULL, *s3 = NULL;
        _cleanup_(wait_state_done) WaitState ws = {.guest = args[0]};
        _cleanup_free_ char *base = NULL, *verb = NULL;
        uint64_t end;
        int r;

        r = check_disk_args(args);
        if (r != 0)
                return r;
        if (add_overflows_u64(arg_offset, arg_length, &end))
                return usage_error("--offset= plus --length= overflows.");
        if (arg_base) {
                /* A node name has no slash; a file name is made absolute like every other path. */
                if (strchr(arg_base, '/')) {
                        r = local_path_arg(arg_base, &base);
                        if (r < 0)
                                return r;
                } else {
                        base = strdup(arg_base);
                        if (!base)
                                return log_oom();
                }
        }

        r = connect_bus(&bus);
        if (r < 0)
                return r;
        r = resolve_disk(bus, args[0], args[1], &g, &d);
        if (r != 0)
                return r;
        ws.bus = bus;
        ws.disk = d;

        if (arg_wait) {
                r = wait_subscribe(&ws, &s1, &s2, &s3);
                if (r < 0)
                        return r;
        }

        r = new_call(bus, d->object, STREAM_INTERFACE, BS_STREAM_METHOD_START, &m);
        if (r < 0)
                return r;
        r = sd_bus_message_append(m, "tt", arg_offset, arg_length);
        if (r >= 0)
                r = append_options_begin(m);
        if (r >= 0 && (arg_given & OPT_BANDWIDTH))
                r = sd_bus_message_append(m, "{sv}", BS_OPTION_BANDWIDTH, "t", arg_bandwidth);
        if (r >= 0 && base)
                r = sd_bus_message_append(m, "{sv}", BS_OPTION_BASE, "s", base);
        if (r >= 0)
                r = sd_bus_message_close_container(m);
        if (r < 0)
                return log_error_errno(r, "Failed to append Start arguments: %m");

        verb = strdup_printf("start streaming %s of guest '%s'", strempty(d->device), args[0]);
        if (!verb)
                return log_oom();
        r = call(bus, m, ACTION_STREAM, SLOW_CALL_TIMEOUT, verb, &reply);
        if (r < 0)
                return r;

        if (!arg_wait) {
                if (!arg_quiet)
                        log_info("Streaming %s of guest %s in the background; 'blockstreamctl wait %s %s' follows it.",
                                strempty(d->device), args[0], args[0], strempty(d->device));
                return 0;
        }

        r = sd_bus_message_get_cookie(reply, &ws.min_cookie);
        if (r < 0)
                return log_parse_error(r);
        /* Progress of this job, for the bar; the end still comes as Finished. */
        r = get_all_properties(
                bus, d->object, STREAM_INTERFACE, disk_properties, ELEMENTSOF(disk_properties), d, &d->present, NULL);
        if (r < 0)
                return r;
        return wait_loop(&ws, false);
}

static int verb_wait(char **args) {
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = NULL;
        _cleanup_(guest_info_freep) GuestInfo *g = NULL;
        _cleanup_(disk_info_freep) DiskInfo *d = NULL;
        _cleanup_(sd_bus_slot_unrefp) sd_bus_slot *s1 = NULL, *s2 = NULL, *s3 = NULL;
        _cleanup_(wait_state_done) WaitState ws = {.guest = args[0]};
        int r;

        r = check_disk_args(args);
        if (r != 0)
                return r;
        r = connect_bus(&bus);
        if (r < 0)
                return r;
        r = resolve_disk(bus, args[0], args[1], &g, &d);
        if (r != 0)
                return r;
        ws.bus = bus;
        ws.disk = d;
        r = wait_subscribe(&ws, &s1, &s2, &s3);
        if (r < 0)
                return r;
        /* Read the state only now that we are subscribed: a job ending in between shows here or
         * in a signal newer than this reply. */
        r = get_all_properties(bus, d->object, STREAM_INTERFACE, disk_properties, ELEMENTSOF(disk_properties), d,
                &d->present, &ws.min_cookie);
        if (r < 0)
                return r;
        if (!state_is_active(d->state)) {
                r = set_finished(&ws, isempty(d->state) ? BS_STATE_IDLE : d->state, d->bytes_done, strempty(d->error));
                if (r < 0)
                        return log_oom();
                return report_result(&ws, false);
        }
        return wait_loop(&ws, false);
}

static int simple_disk_call(char **args, const char *member, const char *what) {
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = NULL;
        _cleanup_(guest_info_freep) GuestInfo *g = NULL;
        _cleanup_(disk_info_freep) DiskInfo *d = NULL;
        _cleanup_free_ char *verb = NULL;
        int r;

        r = check_disk_args(args);
        if (r != 0)
                return r;
        r = connect_bus(&bus);
        if (r < 0)
                return r;
        r = resolve_disk(bus, args[0], args[1], &g, &d);
        if (r != 0)
                return r;
        verb = strdup_printf("%s %s of guest '%s'", what, strempty(d->device), args[0]);
        if (!verb)
                return log_oom();
        return call_simple(bus, d->object, STREAM_INTERFACE, member, ACTION_STREAM, 0, verb, NULL, NULL);
}

static int verb_pause(char **args) {
        return simple_disk_call(args, BS_STREAM_METHOD_PAUSE, "pause streaming");
}

static int verb_resume(char **args) {
        return simple_disk_call(args, BS_STREAM_METHOD_RESUME, "resume streaming");
}

static int verb_cancel(char **args) {
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = NULL;
        _cleanup_(guest_info_freep) GuestInfo *g = NULL;
        _cleanup_(disk_info_freep) DiskInfo *d = NULL;
        _cleanup_(sd_bus_slot_unrefp) sd_bus_slot *s1 = NULL, *s2 = NULL, *s3 = NULL;
        _cleanup_(wait_state_done) WaitState ws = {.guest = args[0]};
        _cleanup_free_ char *verb = NULL;
        int r;

        if (!arg_wait)
                return simple_disk_call(args, BS_STREAM_METHOD_CANCEL, "cancel streaming");

        r = check_disk_args(args);
        if (r != 0)
                return r;
        r = connect_bus(&bus);
        if (r < 0)
                return r;
        r = resolve_disk(bus, args[0], args[1], &g, &d);
        if (r != 0)
                return r;
        ws.bus = bus;
        ws.disk = d;
        r = wait_subscribe(&ws, &s1, &s2, &s3);
        if (r < 0)
                return r;
        verb = strdup_printf("cancel streaming %s of guest '%s'", strempty(d->device), args[0]);
        if (!verb)
                return log_oom();
        /* min_cookie stays 0: the Finished of the job we cancel may come before Cancel's reply. */
        r = call_simple(bus, d->object, STREAM_INTERFACE, BS_STREAM_METHOD_CANCEL, ACTION_STREAM, 0, verb, NULL, NULL);
        if (r < 0)
                return r;
        return wait_loop(&ws, true);
}

static int verb_set_bandwidth(char **args) {
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = NULL;
        _cleanup_(guest_info_freep) GuestInfo *g = NULL;
        _cleanup_(disk_info_freep) DiskInfo *d = NULL;
        _cleanup_free_ char *verb = NULL;
        uint64_t bw;
        int r;

        r = parse_bandwidth(args[2], &bw);
        if (r < 0)
                return usage_error("Invalid bandwidth '%s': expected SIZE[/s] such as 50M, 1.5GiB/s or 0 for "
                                   "unlimited.",
                        args[2]);
        r = check_disk_args(args);
        if (r != 0)
                return r;
        r = connect_bus(&bus);
        if (r < 0)
                return r;
        r = resolve_disk(bus, args[0], args[1], &g, &d);
        if (r != 0)
                return r;
        verb = strdup_printf("set the bandwidth of %s of guest '%s'", strempty(d->device), args[0]);
        if (!verb)
                return log_oom();
        return call_simple(bus, d->object, STREAM_INTERFACE, BS_STREAM_METHOD_SET_BANDWIDTH, ACTION_STREAM, 0, verb,
                NULL, "t", bw);
}

/* ---------------------------------------------------------------------------------------- */
/* map */

typedef enum Kind { KIND_LOCAL, KIND_ZERO, KIND_BACKING, KIND_ABSENT, KIND_OTHER, _KIND_MAX } Kind;

static const struct {
        const char *name;
        const char *color; /* background */
        const char *letter;
} kind_table[_KIND_MAX] = {
        [KIND_LOCAL] = {BS_EXTENT_LOCAL, "\x1b[42m", "L"},
        [KIND_ZERO] = {BS_EXTENT_ZERO, "\x1b[44m", "Z"},
        [KIND_BACKING] = {BS_EXTENT_BACKING, "\x1b[43m", "B"},
        [KIND_ABSENT] = {BS_EXTENT_ABSENT, "\x1b[100m", "."},
        [KIND_OTHER] = {"other", "\x1b[45m", "?"},
};

typedef struct Extent {
        uint64_t offset, length;
        uint32_t depth;
        Kind kind;
        char name[16]; /* the kind as sent, for JSON */
} Extent;

static Kind kind_from_string(const char *s) {
        for (Kind k = 0; k < KIND_OTHER; k++)
                if (streq(s, kind_table[k].name))
                        return k;
        return KIND_OTHER;
}

typedef struct ExtentList {
        Extent *items;
        size_t n, allocated;
} ExtentList;

static void extent_list_done(ExtentList *l) {
        free(l->items);
}

static int read_extents(sd_bus_message *reply, ExtentList *list, size_t *n_read) {
        const char *kind;
        uint64_t o, l;
        uint32_t depth;
        int r;

        *n_read = 0;
        r = sd_bus_message_enter_container(reply, 'a', "(ttus)");
        if (r < 0)
                return r;
        while ((r = sd_bus_message_read(reply, "(ttus)", &o, &l, &depth, &kind)) > 0) {
                Extent *e;
                size_t *n = &list->n;

                if (list->n >= list->allocated) {
                        size_t a = MAX((size_t) 1024, list->allocated * 2);

                        e = reallocarray(list->items, a, sizeof(Extent));
                        if (!e)
                                return -ENOMEM;
                        list->items = e;
                        list->allocated = a;
                }
                e = list->items;
                e[*n] = (Extent){.offset = o, .length = l, .depth = depth, .kind = kind_from_string(kind)};
                snprintf(e[*n].name, sizeof(e[*n].name), "%s", kind);
                (*n)++;
                (*n_read)++;
        }
        if (r < 0)
                return r;
        return sd_bus_message_exit_container(reply);
}

/* One line: the disk as cells, each coloured by the kind that covers most of its span. */
static void print_map_bar(const Extent *extents, size_t n) {
        uint64_t start = extents[0].offset, end = extents[n - 1].offset + extents[n - 1].length, span;
        uint64_t totals[_KIND_MAX] = {};
        unsigned cells = MIN(60u, terminal_columns(STDOUT_FILENO) > 2 ? terminal_columns(STDOUT_FILENO) - 2 : 1u);
        bool color = colors_enabled();
        size_t j = 0;

        if (end <= start)
                return;
        span = end - start;
        for (size_t i = 0; i < n; i++)
                totals[extents[i].kind] += extents[i].length;

        putchar('[');
        for (unsigned c = 0; c < cells; c++) {
                uint64_t cs = start + (uint64_t) ((long double) span * c / cells);
                uint64_t ce = start + (uint64_t) ((long double) span * (c + 1) / cells);
                uint64_t in[_KIND_MAX] = {};
                Kind best = KIND_ABSENT;

                if (ce <= cs)
                        ce = cs + 1;
                /* Extents are in order: skip the ones that end before this cell. */
                while (j < n && extents[j].offset + extents[j].length <= cs)
                        j++;
                for (size_t i = j; i < n && extents[i].offset < ce; i++) {
                        uint64_t a = MAX(cs, extents[i].offset), b = MIN(ce, extents[i].offset + extents[i].length);
                        if (b > a)
                                in[extents[i].kind] += b - a;
                }
                for (Kind k = 0; k < _KIND_MAX; k++)
                        if (in[k] > in[best])
                                best = k;
                if (color)
                        printf("%s \x1b[0m", kind_table[best].color);
                else
                        fputs(kind_table[best].letter, stdout);
        }
        puts("]");

        for (Kind k = 0; k < _KIND_MAX; k++) {
                if (k == KIND_OTHER && totals[k] == 0)
                        continue;
                if (color)
                        printf("%s%s \x1b[0m %s %.1Lf%%", k == 0 ? "" : "  ", kind_table[k].color, kind_table[k].name,
                                (long double) totals[k] * 100.0L / (long double) span);
                else
                        printf("%s%s=%s %.1Lf%%", k == 0 ? "" : "  ", kind_table[k].letter, kind_table[k].name,
                                (long double) totals[k] * 100.0L / (long double) span);
        }
        putchar('\n');
}

static int verb_map(char **args) {
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = NULL;
        _cleanup_(guest_info_freep) GuestInfo *g = NULL;
        _cleanup_(disk_info_freep) DiskInfo *d = NULL;
        _cleanup_(extent_list_done) ExtentList list = {};
        _cleanup_(polkit_agent_releasep) bool agent_held = false;
        _cleanup_free_ char *verb = NULL;
        uint64_t cur = arg_offset, end = 0;
        const Extent *extents;
        size_t n;
        int r;

        if ((arg_given & OPT_LENGTH) && add_overflows_u64(arg_offset, arg_length, &end))
                return usage_error("--offset= plus --length= overflows.");
        r = check_disk_args(args);
        if (r != 0)
                return r;
        r = connect_bus(&bus);
        if (r < 0)
                return r;
        r = resolve_disk(bus, args[0], args[1], &g, &d);
        if (r != 0)
                return r;
        verb = strdup_printf("get the allocation map of %s of guest '%s'", strempty(d->device), args[0]);
        if (!verb)
                return log_oom();

        /* Each page is authorized on its own: one agent for all of them. */
        polkit_agent_acquire();
        agent_held = true;
        for (;;) {
                _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
                uint64_t length = arg_length > 0 ? end - cur : 0, last_end;
                size_t n_read;

                r = call_simple(bus, d->object, STREAM_INTERFACE, BS_STREAM_METHOD_GET_ALLOCATION_MAP, ACTION_INSPECT,
                        0, verb, &reply, "tt", cur, length);
                if (r < 0)
                        return r;
                r = read_extents(reply, &list, &n_read);
                if (r < 0)
                        return log_parse_error(r);
                extents = list.items;
                n = list.n;
                /* A full reply means the server stopped at its cap: go on from where it ended. */
                if (n_read < MAP_EXTENTS_MAX)
                        break;
                if (add_overflows_u64(extents[n - 1].offset, extents[n - 1].length, &last_end) || last_end <= cur)
                        break;
                if ((arg_length > 0 && last_end >= end) || (arg_length == 0 && last_end >= d->size))
                        break;
                cur = last_end;
        }
        polkit_agent_release();
        agent_held = false;

        if (arg_json) {
                JsonWriter w = {.f = stdout};

                json_open(&w, '[');
                for (size_t i = 0; i < n; i++) {
                        json_open(&w, '{');
                        json_key(&w, "offset");
                        json_unsigned(&w, extents[i].offset);
                        json_key(&w, "length");
                        json_unsigned(&w, extents[i].length);
                        json_key(&w, "depth");
                        json_unsigned(&w, extents[i].depth);
                        json_key(&w, "kind");
                        json_string(&w, extents[i].name);
                        json_close(&w, '}');
                }
                json_close(&w, ']');
                return 0;
        }

        if (n == 0) {
                if (!arg_quiet)
                        printf("No extents.\n");
                return 0;
        }
        printf("%20s %20s %10s %5s %s\n", "OFFSET", "LENGTH", "SIZE", "DEPTH", "KIND");
        for (size_t i = 0; i < n; i++) {
                char a[FORMAT_BYTES_MAX];

                printf("%20" PRIu64 " %20" PRIu64 " %10s %5" PRIu32 " %s\n", extents[i].offset, extents[i].length,
                        format_bytes(a, sizeof(a), extents[i].length), extents[i].depth, extents[i].name);
        }
        if (isatty(STDOUT_FILENO) && !arg_quiet) {
                putchar('\n');
                print_map_bar(extents, n);
        }
        return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* export, export-stop */

static int verb_export(char **args) {
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = NULL;
        _cleanup_(guest_info_freep) GuestInfo *g = NULL;
        _cleanup_(disk_info_freep) DiskInfo *d = NULL;
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *m = NULL, *reply = NULL;
        _cleanup_free_ char *verb = NULL;
        const char *path, *uri, *id;
        int r;

        if (arg_listen && !streq(arg_listen, "unix") &&
                !(strncmp(arg_listen, "tcp:", 4) == 0 && strrchr(arg_listen + 4, ':')))
                return usage_error("Invalid --listen='%s': expected 'unix' or 'tcp:ADDR:PORT'.", arg_listen);
        r = check_disk_args(args);
        if (r != 0)
                return r;
        r = connect_bus(&bus);
        if (r < 0)
                return r;
        r = resolve_disk(bus, args[0], args[1], &g, &d);
        if (r != 0)
                return r;

        r = new_call(bus, d->object, STREAM_INTERFACE, BS_STREAM_METHOD_EXPORT, &m);
        if (r < 0)
                return r;
        r = append_options_begin(m);
        if (r >= 0 && arg_listen)
                r = sd_bus_message_append(m, "{sv}", BS_OPTION_LISTEN, "s", arg_listen);
        if (r >= 0)
                r = sd_bus_message_close_container(m);
        if (r < 0)
                return log_error_errno(r, "Failed to append Export arguments: %m");
        verb = strdup_printf("export %s of guest '%s'", strempty(d->device), args[0]);
        if (!verb)
                return log_oom();
        r = call(bus, m, ACTION_EXPORT, SLOW_CALL_TIMEOUT, verb, &reply);
        if (r < 0)
                return r;
        r = sd_bus_message_read(reply, "os", &path, &uri);
        if (r < 0)
                return log_parse_error(r);

        if (arg_json) {
                JsonWriter w = {.f = stdout};

                json_open(&w, '{');
                json_key(&w, "export");
                json_string(&w, path);
                json_key(&w, "uri");
                json_string(&w, uri);
                json_close(&w, '}');
                return 0;
        }
        printf("%s\n", uri);
        id = strrchr(path, '/');
        if (!arg_quiet && id)
                log_info("Exported as %s; 'blockstreamctl export-stop %s' ends it.", path, id + 1);
        return 0;
}

static int verb_export_stop(char **args) {
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = NULL;
        _cleanup_free_ char *path = NULL, *verb = NULL;
        const char *a = args[0];
        int r;

        if (a[0] == '/') {
                if (!sd_bus_object_path_is_valid(a) ||
                        strncmp(a, EXPORT_PATH_PREFIX "/", strlen(EXPORT_PATH_PREFIX "/")) != 0)
                        return usage_error("'%s' is not an export object path (" EXPORT_PATH_PREFIX "/ID).", a);
                path = strdup(a);
        } else {
                /* Export ids go into the path unescaped (api.md), so they are object path characters. */
                if (isempty(a) ||
                        strspn(a, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_") != strlen(a))
                        return usage_error("Invalid export id '%s': expected the ID or path that 'export' printed.", a);
                path = strdup_printf(EXPORT_PATH_PREFIX "/%s", a);
        }
        if (!path)
                return log_oom();
        verb = strdup_printf("stop export %s", path);
        if (!verb)
                return log_oom();
        r = connect_bus(&bus);
        if (r < 0)
                return r;
        return call_simple(bus, path, EXPORT_INTERFACE, BS_EXPORT_METHOD_STOP, ACTION_EXPORT, 0, verb, NULL, NULL);
}

/* ---------------------------------------------------------------------------------------- */
/* Help, option parsing, dispatch */

static int help(void) {
        const char *p = program_invocation_short_name;

        printf("%1$s [OPTIONS...] COMMAND [ARGUMENTS...]\n"
               "\n"
               "Control blockstreamd, which streams virtual disks: while a QEMU guest runs, it\n"
               "copies into a thin qcow2 overlay the data the overlay still reads from its\n"
               "backing chain, until the overlay is a standalone disk (like 'virsh blockpull').\n"
               "Every command is a D-Bus call to org.blockstream1 on the system bus.\n"
               "\n"
               "Guest commands:\n"
               "  list                      List the guests and their disks (the default)\n"
               "  status GUEST [DISK]       Show a guest and the state of its disks, or of one\n"
               "                            disk: path, backing chain, size, job state and mode,\n"
               "                            progress, bandwidth, rate, start time, ETA, error\n"
               "  register NAME [QMP_SOCKET]\n"
               "                            Attach a running QEMU by the path of a QMP socket\n"
               "                            reserved for blockstreamd, or a guest that is not\n"
               "                            running (QMP_SOCKET '-' or omitted) with its disks;\n"
               "                            prints the guest's object path\n"
               "        --owner=UID|USER    Owner of the guest (default: you; only root may\n"
               "                            name another user)\n"
               "        --uuid=UUID         The guest's UUID (default: generated)\n"
               "        --disk=ALIAS=PATH   A disk of a guest that is not running, e.g.\n"
               "                            --disk=vda=/var/lib/images/a.qcow2; repeatable\n"
               "  unregister NAME           Detach a guest (refused while a stream runs)\n"
               "\n"
               "Stream commands:\n"
               "  pull GUEST DISK           Start streaming DISK's backing data into its top\n"
               "                            image; it runs in the background\n"
               "        --bandwidth=SIZE[/s]  Limit to SIZE bytes per second (0: unlimited)\n"
               "        --base=IMAGE        Stream only the images above IMAGE (a path in the\n"
               "                            backing chain or a node name); keep it and below\n"
               "        --offset=SIZE       Stream only from this byte offset ...\n"
               "        --length=SIZE       ... for this many bytes (0 or none: to the end);\n"
               "                            a range is widened to whole clusters, and the disk\n"
               "                            keeps its backing chain\n"
               "        --wait              Wait for the end: a progress bar on a terminal,\n"
               "                            then the result. Ctrl-C stops waiting, not the job\n"
               "  wait GUEST DISK           Wait for the running job to end, like pull --wait;\n"
               "                            if none runs, show how the last one ended\n"
               "  pause GUEST DISK          Pause the job\n"
               "  resume GUEST DISK         Resume a paused job\n"
               "  cancel GUEST DISK         Stop the job; what was copied stays copied\n"
               "        --wait              Wait until it has stopped\n"
               "  set-bandwidth GUEST DISK SIZE[/s]\n"
               "                            Change the limit, also of a running job (0 or\n"
               "                            'unlimited': no limit)\n"
               "  map GUEST DISK            Show where DISK's data lies: each extent's offset,\n"
               "                            length, depth (1 = top image, N = Nth image down\n"
               "                            the chain, 0 = none) and kind: local (in the top\n"
               "                            image), zero (zeros in the top image), backing (in\n"
               "                            a backing image), absent (nowhere: reads as zeros).\n"
               "                            On a terminal also a bar of the range, coloured by\n"
               "                            kind, and the share of each kind\n"
               "        --offset=SIZE       Start at this byte offset (default: 0)\n"
               "        --length=SIZE       Cover this many bytes (default: to the end)\n"
               "\n"
               "Disk commands:\n"
               "  export GUEST DISK         Serve DISK read-only over NBD; prints the URI\n"
               "        --listen=unix|tcp:ADDR:PORT\n"
               "                            Where to listen (default: unix)\n"
               "  export-stop EXPORT        Stop an export, by the ID or the object path that\n"
               "                            'export' reported\n"
               "  provision TEMPLATE TARGET\n"
               "                            Create the qcow2 overlay TARGET (in an image\n"
               "                            directory of blockstreamd) backed by TEMPLATE (a\n"
               "                            path, nbd://, nbd+unix://, http(s)://); prints its\n"
               "                            virtual size\n"
               "        --template-format=FMT\n"
               "                            Format of TEMPLATE (default: qcow2 for a path, raw\n"
               "                            for a URL; never probed)\n"
               "  help                      Show this help\n"
               "\n"
               "Options:\n"
               "  -h --help                 Show this help\n"
               "     --version              Show the version\n"
               "     --json                 Print one JSON document on stdout (see below)\n"
               "  -H --host=[USER@]HOST     Operate on a remote host, over ssh\n"
               "     --no-ask-password      Never ask for a password to authorize an action: no\n"
               "                            polkit agent; an action that needs one fails\n"
               "  -q --quiet                Print only results and errors\n"
               "\n"
               "Options go anywhere on the line; '--' ends them.\n"
               "\n"
               "Authorization:\n"
               "  root may do everything. For anyone else blockstreamd asks polkit, per action:\n"
               "    org.blockstream1.manage   register, unregister, provision\n"
               "    org.blockstream1.stream   pull, pause, resume, cancel, set-bandwidth\n"
               "    org.blockstream1.inspect  map\n"
               "    org.blockstream1.export   export, export-stop\n"
               "  list, status and wait only read, which everyone may.\n"
               "  On a terminal (standard input), a command that needs an action lets polkit\n"
               "  ask for a password: its call allows interactive authorization, and polkit's\n"
               "  text agent " POLKIT_AGENT_PATH " runs while the call lasts (not with --host:\n"
               "  an agent here cannot answer for another host; not as root; not if it is not\n"
               "  installed). --no-ask-password, or no terminal, turns both off: an action\n"
               "  that needs a password then fails with \"Authentication is required\". An\n"
               "  administrator can grant actions with polkit rules (the shipped\n"
               "  50-blockstream.rules lets group \"blockstream\" and a guest's owner stream\n"
               "  and inspect).\n"
               "\n"
               "GUEST is a guest's name: 1 to 64 characters of A-Z a-z 0-9 _ . -\n"
               "DISK is a disk's device alias (vda: QEMU's qdev id) or its top image's path.\n"
               "Relative paths are made absolute here, except with --host.\n"
               "\n"
               "SIZE is a number of bytes with an optional suffix: K, M, G, T, P, E, their\n"
               "forms Ki, Mi, ... and KiB, MiB, ... are powers of 1024; KB, MB, GB, TB, PB, EB\n"
               "are powers of 1000; B or none means bytes. A suffix allows a fraction: 1.5G.\n"
               "A bandwidth may end in \"/s\": 100MiB/s.\n"
               "\n"
               "JSON output uses the D-Bus names: properties under theirs (numbers as numbers,\n"
               "sizes in bytes, rates in bytes/s, times in microseconds since the epoch, 0 for\n"
               "unknown), method results under their argument names.\n"
               "  list                      [guest, ...]: each guest's properties and\n"
               "                            \"ObjectPath\", its \"Disks\" expanded to the disks'\n"
               "                            properties, each with its \"ObjectPath\"\n"
               "  status                    one such guest (with DISK: with that disk only)\n"
               "  map                       [{\"offset\", \"length\", \"depth\", \"kind\"}, ...]\n"
               "  register, export, provision  {\"guest\"}, {\"export\", \"uri\"}, {\"size\"}\n"
               "  pull --wait, wait, cancel --wait  {\"result\", \"bytes_done\", \"error\"}\n"
               "\n"
               "Exit status:\n"
               "  0    Success. pull --wait, wait: the job completed (wait: or none ever ran);\n"
               "       cancel --wait: the job stopped (or completed before it could be stopped)\n"
               "  1    The operation failed, or the job failed or was cancelled; the reason is\n"
               "       printed on stderr\n"
               "  2    Wrong usage: unknown command or option, wrong number of arguments, bad\n"
               "       guest name, size or other argument\n"
               "  130  Interrupted while waiting (Ctrl-C); the job goes on\n"
               "\n"
               "Environment:\n"
               "  DBUS_SYSTEM_BUS_ADDRESS   The system bus to use (default: the standard one)\n"
               "  NO_COLOR                  Draw the map bar with letters instead of colours\n"
               "\n"
               "Examples:\n"
               "  %1$s register web1 /run/qemu/web1.qmp\n"
               "  %1$s register golden - --disk=vda=/var/lib/images/golden.qcow2\n"
               "  %1$s pull web1 vda --bandwidth=200M/s --wait\n"
               "  %1$s pull web1 /var/lib/images/web1.qcow2 --offset=1G --length=512M\n"
               "  %1$s set-bandwidth web1 vda 0\n"
               "  %1$s status web1 vda --json\n"
               "  %1$s map web1 vda --length=10G\n"
               "  %1$s export web1 vda --listen=tcp:127.0.0.1:10809\n"
               "  %1$s provision /var/lib/images/base.qcow2 /var/lib/images/web2.qcow2\n"
               "\n"
               "See the org.blockstream1 D-Bus interfaces (org.blockstream1.*.xml) for details.\n",
                p);
        return 0;
}

typedef struct Verb {
        const char *name;
        unsigned min_args, max_args;
        unsigned options; /* OPT_* that apply */
        int (*run)(char **args);
} Verb;

static const Verb verbs[] = {
        {"list", 0, 0, 0, verb_list},
        {"status", 1, 2, 0, verb_status},
        {"register", 1, 2, OPT_OWNER | OPT_UUID | OPT_DISK, verb_register},
        {"unregister", 1, 1, 0, verb_unregister},
        {"pull", 2, 2, OPT_BANDWIDTH | OPT_BASE | OPT_OFFSET | OPT_LENGTH | OPT_WAIT, verb_pull},
        {"wait", 2, 2, 0, verb_wait},
        {"pause", 2, 2, 0, verb_pause},
        {"resume", 2, 2, 0, verb_resume},
        {"cancel", 2, 2, OPT_WAIT, verb_cancel},
        {"set-bandwidth", 3, 3, 0, verb_set_bandwidth},
        {"map", 2, 2, OPT_OFFSET | OPT_LENGTH, verb_map},
        {"export", 2, 2, OPT_LISTEN, verb_export},
        {"export-stop", 1, 1, 0, verb_export_stop},
        {"provision", 2, 2, OPT_TEMPLATE_FORMAT, verb_provision},
};

static int parse_size_arg(const char *option, const char *s, uint64_t *ret) {
        int r = parse_size(s, ret);

        if (r == -ERANGE)
                return log_error_errno(EINVAL, "Size too large for %s: '%s'.", option, s);
        if (r < 0)
                return log_error_errno(
                        EINVAL, "Invalid size for %s: '%s' (expected e.g. 4096, 512K, 1.5G, 10GB).", option, s);
        return 0;
}

/* Returns 1 to go on, 0 to exit successfully, -EINVAL for a usage error (logged). */
static int parse_argv(int argc, char *argv[]) {
        enum {
                ARG_VERSION = 0x100,
                ARG_JSON,
                ARG_NO_ASK_PASSWORD,
                ARG_OWNER,
                ARG_UUID,
                ARG_DISK,
                ARG_BANDWIDTH,
                ARG_BASE,
                ARG_OFFSET,
                ARG_LENGTH,
                ARG_WAIT,
                ARG_LISTEN,
                ARG_TEMPLATE_FORMAT,
        };
        static const struct option options[] = {{"help", no_argument, NULL, 'h'},
                {"version", no_argument, NULL, ARG_VERSION}, {"json", no_argument, NULL, ARG_JSON},
                {"host", required_argument, NULL, 'H'}, {"no-ask-password", no_argument, NULL, ARG_NO_ASK_PASSWORD},
                {"quiet", no_argument, NULL, 'q'}, {"owner", required_argument, NULL, ARG_OWNER},
                {"uuid", required_argument, NULL, ARG_UUID}, {"disk", required_argument, NULL, ARG_DISK},
                {"bandwidth", required_argument, NULL, ARG_BANDWIDTH}, {"base", required_argument, NULL, ARG_BASE},
                {"offset", required_argument, NULL, ARG_OFFSET}, {"length", required_argument, NULL, ARG_LENGTH},
                {"wait", no_argument, NULL, ARG_WAIT}, {"listen", required_argument, NULL, ARG_LISTEN},
                {"template-format", required_argument, NULL, ARG_TEMPLATE_FORMAT}, {}};
        int c, r;

        /* Our own messages, not getopt's, so that they all look alike. */
        opterr = 0;
        while ((c = getopt_long(argc, argv, ":hH:q", options, NULL)) >= 0)
                switch (c) {
                case 'h':
                        return help();
                case ARG_VERSION:
                        printf("blockstreamctl %s\n", VERSION);
                        return 0;
                case ARG_JSON:
                        arg_json = true;
                        break;
                case 'H':
                        if (isempty(optarg))
                                return log_error_errno(EINVAL, "--host= needs a host name.");
                        arg_host = optarg;
                        break;
                case ARG_NO_ASK_PASSWORD:
                        arg_ask_password = false;
                        break;
                case 'q':
                        arg_quiet = true;
                        break;
                case ARG_OWNER:
                        if (isempty(optarg))
                                return log_error_errno(EINVAL, "--owner= needs a uid or user name.");
                        arg_owner = optarg;
                        arg_given |= OPT_OWNER;
                        break;
                case ARG_UUID:
                        arg_uuid = optarg;
                        arg_given |= OPT_UUID;
                        break;
                case ARG_DISK: {
                        const char *eq = strchr(optarg, '=');
                        size_t l = eq ? (size_t) (eq - optarg) : 0;

                        if (!eq || l == 0 || isempty(eq + 1))
                                return log_error_errno(EINVAL, "Invalid --disk='%s': expected ALIAS=PATH.", optarg);
                        for (char **d = arg_disks; d && *d; d++)
                                if (strncmp(*d, optarg, l + 1) == 0)
                                        return log_error_errno(EINVAL, "Disk '%.*s' given twice.", (int) l, optarg);
                        r = strv_push(&arg_disks, strdup(optarg));
                        if (r < 0)
                                return log_oom();
                        arg_given |= OPT_DISK;
                        break;
                }
                case ARG_BANDWIDTH:
                        if (parse_bandwidth(optarg, &arg_bandwidth) < 0)
                                return log_error_errno(EINVAL,
                                        "Invalid size for --bandwidth=: '%s' (expected e.g. "
                                        "100M, 1.5GiB/s, 0 for unlimited).",
                                        optarg);
                        arg_given |= OPT_BANDWIDTH;
                        break;
                case ARG_BASE:
                        if (isempty(optarg))
                                return log_error_errno(EINVAL, "--base= needs an image path or node name.");
                        arg_base = optarg;
                        arg_given |= OPT_BASE;
                        break;
                case ARG_OFFSET:
                        if (parse_size_arg("--offset=", optarg, &arg_offset) < 0)
                                return -EINVAL;
                        arg_given |= OPT_OFFSET;
                        break;
                case ARG_LENGTH:
                        if (parse_size_arg("--length=", optarg, &arg_length) < 0)
                                return -EINVAL;
                        arg_given |= OPT_LENGTH;
                        break;
                case ARG_WAIT:
                        arg_wait = true;
                        arg_given |= OPT_WAIT;
                        break;
                case ARG_LISTEN:
                        arg_listen = optarg;
                        arg_given |= OPT_LISTEN;
                        break;
                case ARG_TEMPLATE_FORMAT:
                        if (isempty(optarg))
                                return log_error_errno(EINVAL, "--template-format= needs a format name.");
                        arg_template_format = optarg;
                        arg_given |= OPT_TEMPLATE_FORMAT;
                        break;
                case ':':
                        return log_error_errno(EINVAL, "Option '%s' needs an argument.", argv[optind - 1]);
                case '?':
                        if (optopt > 0 && optopt < 0x100)
                                return log_error_errno(EINVAL, "Unknown option '-%c'. See --help.", optopt);
                        return log_error_errno(EINVAL, "Unknown option '%s'. See --help.", argv[optind - 1]);
                default:
                        return log_error_errno(EINVAL, "Unhandled option %d.", c);
                }
        return 1;
}

static int dispatch_verb(int argc, char **argv) {
        const char *name = argc > 0 ? argv[0] : "list";
        const Verb *v = NULL;
        unsigned n_args = argc > 0 ? (unsigned) argc - 1 : 0;

        if (streq(name, "help"))
                return help();
        for (size_t i = 0; i < ELEMENTSOF(verbs); i++)
                if (streq(verbs[i].name, name)) {
                        v = &verbs[i];
                        break;
                }
        if (!v)
                return usage_error("Unknown command '%s'. See --help.", name);
        if (n_args < v->min_args)
                return usage_error("Too few arguments for '%s'. See --help.", name);
        if (n_args > v->max_args)
                return usage_error("Too many arguments for '%s'. See --help.", name);
        for (size_t i = 0; i < ELEMENTSOF(option_names); i++)
                if ((arg_given & option_names[i].flag) && !(v->options & option_names[i].flag))
                        return usage_error("Option %s does not apply to '%s'. See --help.", option_names[i].name, name);

        return v->run(argc > 0 ? argv + 1 : argv + argc);
}

int main(int argc, char *argv[]) {
        int r;

        log_setup("blockstreamctl");
        /* Only the character set, for the progress bar's blocks; numbers stay in the C locale
         * so that "1.5 GiB" reads the same everywhere. */
        (void) setlocale(LC_CTYPE, "");

        r = parse_argv(argc, argv);
        if (r > 0)
                r = dispatch_verb(argc - optind, argv + optind);
        else if (r < 0)
                r = EXIT_USAGE;
        arg_disks = strv_free(arg_disks);
        polkit_agent_close(); /* in case a verb returned while holding it */

        if (fflush(stdout) != 0 || ferror(stdout)) {
                log_error_errno(errno ?: EIO, "Failed to write to standard output: %m");
                return EXIT_FAILURE;
        }
        return r < 0 ? EXIT_FAILURE : r;
}
