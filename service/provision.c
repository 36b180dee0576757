/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* ProvisionDisk: a thin qcow2 overlay on a template, the "instant-on" step.
 *
 * Nothing untrusted is ever opened as root. A template that is a file is read by image.c (its
 * whole chain inside the image directories, no symlinks, no other guest's disk); a template
 * behind a URL is asked for its size by `qemu-img info` in a sandbox with the reserved
 * provisioning uid (a remote server's answers are untrusted); the overlay itself is written by
 * `qemu-img create -u` with an explicit size, which never opens the backing file. */

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "bus-error.h"
#include "guest.h"
#include "image.h"
#include "manager.h"
#include "provision.h"
#include "qemu.h"
#include "sandbox.h"
#include "util.h"

#define OUTPUT_MAX (256U * 1024U)
#define URL_MAX 1024

typedef struct Provision {
        Manager *manager;
        sd_bus_message *call;
        char *template;
        char *format;
        char *target;
        uid_t caller;
        uint64_t size;
        bool created; /* qemu-img create ran: the target is ours to remove on failure */
        pid_t pid;
        sd_event_source *child;
        int out_fd; /* the child's stdout (info) or stderr (create) */
        sd_event_source *out_source;
        char *out;
        size_t out_len;
} Provision;

static Provision *provision_free(Provision *p) {
        if (!p)
                return NULL;
        if (p->call) {
                (void) sd_bus_reply_method_errorf(p->call, SD_BUS_ERROR_FAILED, "Provisioning %s was interrupted.",
                        p->target);
                sd_bus_message_unref(p->call);
        }
        sd_event_source_disable_unref(p->child);
        sd_event_source_disable_unref(p->out_source);
        if (p->pid > 0) {
                (void) kill(p->pid, SIGKILL);
                (void) waitpid(p->pid, NULL, 0);
        }
        closep(&p->out_fd);
        free(p->template);
        free(p->format);
        free(p->target);
        free(p->out);
        free(p);
        return NULL;
}

static void provision_fail(Provision *p, const char *name, const char *what) {
        if (p->created)
                (void) unlink(p->target);
        (void) sd_bus_reply_method_errorf(p->call, name, "Cannot provision %s: %s", p->target, what);
        p->call = sd_bus_message_unref(p->call);
        provision_free(p);
}

static bool is_url(const char *s) {
        return strncmp(s, "nbd://", 6) == 0 || strncmp(s, "nbd+unix://", 11) == 0 || strncmp(s, "http://", 7) == 0 ||
               strncmp(s, "https://", 8) == 0;
}

static bool url_valid(const char *s) {
        if (strlen(s) > URL_MAX)
                return false;
        for (const char *c = s; *c; c++)
                if ((unsigned char) *c <= 0x20 || (unsigned char) *c >= 0x7f)
                        return false;
        return true;
}

static int out_handler(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        Provision *p = userdata;
        char buf[4096];
        ssize_t n = read(fd, buf, sizeof(buf));

        if (n < 0 && (errno == EAGAIN || errno == EINTR))
                return 0;
        if (n <= 0) {
                p->out_source = sd_event_source_disable_unref(p->out_source);
                return 0;
        }
        if (p->out_len + (size_t) n > OUTPUT_MAX)
                return 0; /* bounded: the rest is dropped */
        memcpy(p->out + p->out_len, buf, (size_t) n);
        p->out_len += (size_t) n;
        p->out[p->out_len] = 0;
        return 0;
}

/* Drain what is left in the pipe (the child is gone, so this cannot block for long). */
static void out_drain(Provision *p) {
        for (;;) {
                char buf[4096];
                ssize_t n = read(p->out_fd, buf, sizeof(buf));
                if (n <= 0)
                        break;
                if (p->out_len + (size_t) n <= OUTPUT_MAX) {
                        memcpy(p->out + p->out_len, buf, (size_t) n);
                        p->out_len += (size_t) n;
                        p->out[p->out_len] = 0;
                }
        }
}

static int watch_child(Provision *p, int out_fd, sd_event_child_handler_t handler) {
        int r;

        p->out_fd = out_fd;
        p->out_len = 0;
        if (!p->out && !(p->out = malloc(OUTPUT_MAX + 1)))
                return -ENOMEM;
        p->out[0] = 0;
        if (fcntl(out_fd, F_SETFL, O_NONBLOCK) < 0)
                return -errno;
        r = sd_event_add_io(p->manager->event, &p->out_source, out_fd, EPOLLIN, out_handler, p);
        if (r < 0)
                return r;
        return sd_event_add_child(p->manager->event, &p->child, p->pid, WEXITED, handler, p);
}

/* Step 2: qemu-img create -u, as root (it opens nothing but the new file). */

static int created(sd_event_source *s, const siginfo_t *si, void *userdata) {
        Provision *p = userdata;
        char msg[401], text[512];

        p->pid = 0;
        out_drain(p);
        if (si->si_code != CLD_EXITED || si->si_status != 0) {
                /* Its words reach the caller: valid UTF-8, cut at a character, no controls. */
                (void) text_sanitize_buf(msg, sizeof(msg), p->out, p->out_len);
                snprintf(text, sizeof(text), "qemu-img create failed: %s", p->out_len ? msg : "no message");
                provision_fail(p, BS_ERROR_QEMU_FAILED, text);
                return 0;
        }
        /* An unprivileged caller (authorized by polkit) gets the overlay its VM will use. */
        if ((p->caller != 0 && chown(p->target, p->caller, (gid_t) -1) < 0) || chmod(p->target, 0600) < 0) {
                provision_fail(p, SD_BUS_ERROR_FAILED, strerror(errno));
                return 0;
        }
        log_info("Provisioned %s on %s (%s, %" PRIu64 " bytes).", p->target, p->template, p->format, p->size);
        (void) sd_bus_reply_method_return(p->call, "t", p->size);
        p->call = sd_bus_message_unref(p->call);
        provision_free(p);
        return 0;
}

static int run_create(Provision *p) {
        char size[32];
        _cleanup_close_ int err_r = -1, err_w = -1;
        int pipefd[2];
        char *argv[] = { (char *) "/usr/bin/qemu-img", (char *) "create", (char *) "-q", (char *) "-f", (char *) "qcow2",
                (char *) "-u", (char *) "-b", p->template, (char *) "-F", p->format, p->target, size, NULL };
        char *env[] = { (char *) "PATH=/usr/bin:/bin", (char *) "LANG=C.UTF-8", NULL };

        snprintf(size, sizeof(size), "%" PRIu64, p->size);
        if (pipe2(pipefd, O_CLOEXEC) < 0)
                return -errno;
        err_r = pipefd[0];
        err_w = pipefd[1];
        p->created = true;
        p->pid = fork();
        if (p->pid < 0)
                return -errno;
        if (p->pid == 0) {
                sigset_t all;
                int devnull = open("/dev/null", O_RDWR | O_CLOEXEC);

                sigfillset(&all);
                (void) sigprocmask(SIG_UNBLOCK, &all, NULL);
                if (devnull < 0 || dup2(devnull, 0) < 0 || dup2(devnull, 1) < 0 || dup2(err_w, 2) < 0)
                        _exit(127);
                (void) prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
                execve(argv[0], argv, env);
                _exit(127);
        }
        closep(&err_w);
        err_w = -1;
        return watch_child(p, TAKE_FD(err_r), created);
}

/* Step 1 for URLs: the size, from a sandboxed qemu-img info. */

static int probed(sd_event_source *s, const siginfo_t *si, void *userdata) {
        Provision *p = userdata;
        int r;

        p->pid = 0;
        out_drain(p);
        if (si->si_code != CLD_EXITED || si->si_status != 0) {
                provision_fail(p, BS_ERROR_QEMU_FAILED,
                        "qemu-img could not read the template's size (is the server reachable? give option 'size' otherwise)");
                return 0;
        }
        r = qemu_parse_image_size(p->out, p->out_len, &p->size);
        if (r < 0 || p->size == 0) {
                provision_fail(p, BS_ERROR_QEMU_FAILED, "qemu-img info gave no usable virtual size for the template");
                return 0;
        }
        p->out_source = sd_event_source_disable_unref(p->out_source);
        p->child = sd_event_source_disable_unref(p->child);
        closep(&p->out_fd);
        r = run_create(p);
        if (r < 0)
                provision_fail(p, SD_BUS_ERROR_FAILED, strerror(-r));
        return 0;
}

static int run_probe(Provision *p) {
        Manager *m = p->manager;
        _cleanup_close_ int out_r = -1, out_w = -1;
        int pipefd[2], r;
        char *argv[] = { (char *) "/usr/bin/qemu-img", (char *) "info", (char *) "--output=json", (char *) "-f", p->format,
                p->template, NULL };

        if (pipe2(pipefd, O_CLOEXEC) < 0)
                return -errno;
        out_r = pipefd[0];
        out_w = pipefd[1];
        /* The server's answers are untrusted: parse them unprivileged, in a sandbox, with the
         * host network (it must reach the server) and nothing else. */
        r = sandbox_spawn(
                &(SandboxSpec) {
                        .name = "provisioning",
                        .uid = m->config.helper_uid_max,
                        .gid = m->config.helper_uid_max,
                        .host_network = true,
                        .stdout_fd = out_w,
                        .stderr_fd = -1,
                        .argv = argv,
                        .exec_fd = -1,
                        .env = (char *[]) { NULL },
                },
                &p->pid);
        if (r < 0)
                return r;
        return watch_child(p, TAKE_FD(out_r), probed);
}

int provision_disk(Manager *m, sd_bus_message *msg, const char *template, const char *target, const char *format,
        uint64_t size, uid_t caller, sd_bus_error *error) {
        _cleanup_strv_free_ char **forbidden = NULL;
        Provision *p;
        struct stat st;
        bool url = is_url(template), below = false;
        int r;

        if (strv_isempty(m->config.image_dirs))
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                        "No ImageDirectories= are configured; configure them in the daemon's configuration file.");
        if (!path_is_safe_absolute(target, 4000))
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                        "Target '%.200s' must be a normalized absolute path.", target);
        for (char **d = m->config.image_dirs; *d; d++)
                if (path_is_below(target, *d) && !streq(target, *d))
                        below = true;
        if (!below)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                        "Target %s lies outside the image directories; pick a path in one of them.", target);
        if (lstat(target, &st) == 0 || errno != ENOENT)
                return sd_bus_error_setf(error, SD_BUS_ERROR_FILE_EXISTS, "Target %s exists already; refusing to overwrite it.",
                        target);
        {
                _cleanup_free_ char *dir = strdup(target);
                if (!dir)
                        return -ENOMEM;
                *strrchr(dir, '/') = 0;
                if (lstat(dir, &st) < 0 || !S_ISDIR(st.st_mode))
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                "The directory of target %s does not exist (or is a symlink).", target);
        }
        if (format && !streq(format, "qcow2") && !streq(format, "raw"))
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                        "Template format '%.32s' is not supported; use qcow2 or raw.", format);
        if (!format)
                format = url ? "raw" : "qcow2";

        p = calloc(1, sizeof(Provision));
        if (!p)
                return -ENOMEM;
        p->manager = m;
        p->out_fd = -1;
        p->caller = caller;
        p->size = size;
        p->template = strdup(template);
        p->format = strdup(format);
        p->target = strdup(target);
        if (!p->template || !p->format || !p->target) {
                provision_free(p);
                return -ENOMEM;
        }

        if (url) {
                if (!url_valid(template)) {
                        provision_free(p);
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                "Template URL '%.200s' has spaces or non-ASCII characters, or is too long.", template);
                }
                if (p->size == 0 && strncmp(template, "nbd+unix://", 11) == 0) {
                        provision_free(p);
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                "A template on a local NBD socket needs option 'size' (t, bytes).");
                }
        } else {
                _cleanup_(image_chain_done) ImageChain chain = {};
                _cleanup_free_ char *why = NULL;

                if (!path_is_safe_absolute(template, 4000)) {
                        provision_free(p);
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                "Template '%.200s' is neither a normalized absolute path nor an nbd://, nbd+unix://, "
                                "http:// or https:// URL.",
                                template);
                }
                forbidden = manager_guest_images(m, NULL);
                r = forbidden ? image_chain_open(m->config.image_dirs, template, format, false, forbidden, &chain, &why) : -ENOMEM;
                if (r < 0) {
                        provision_free(p);
                        if (r == -ENOMEM)
                                return r;
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "Template %s: %s", template,
                                why ?: strerror(-r));
                }
                if (p->size == 0)
                        p->size = chain.images[0].virtual_size;
        }

        p->call = sd_bus_message_ref(msg);
        r = p->size > 0 ? run_create(p) : run_probe(p);
        if (r < 0) {
                p->created = p->created && p->pid > 0;
                p->call = sd_bus_message_unref(p->call);
                provision_free(p);
                return sd_bus_error_set_errnof(error, -r, "Cannot run qemu-img: %m");
        }
        return 1;
}
