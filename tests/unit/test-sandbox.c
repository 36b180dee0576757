/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* Escape attempts from inside the real sandbox: sandbox_spawn() (service/sandbox.c, the one
 * function that spawns every helper) runs tests/helpers/sandbox-probe exactly as the daemon runs
 * blockstream-nbd-relay (an O_PATH fd of the binary, a helper uid, a runtime dir, one fd), and
 * the probe tries one way out per spawn. Each attempt must fail with the designed errno, or get
 * the probe killed (SIGSYS where the seccomp deny-list applies). Needs root (the spawn changes
 * uid and builds namespaces); without root the test reports a TAP skip.
 *
 * The probe's path comes from $SANDBOX_PROBE (meson sets it). */

#include <linux/openat2.h>
#include <sys/syscall.h>

#include "sandbox-tests.h"

/* -- the attempts */

static void test_other_guest_image_invisible(void) {
        struct stat st;
        Outcome o;

        /* It is there, outside, and only root could read it anyway... */
        ASSERT_TRUE(stat(other_image, &st) == 0 && S_ISREG(st.st_mode) && (st.st_mode & 07777) == 0600 && st.st_uid == 0);
        /* ...but inside it does not even exist, nor does its directory, next to the runtime dir. */
        RUN(&o, "open", other_image);
        expect_report(&o, fmt("open %s: ENOENT", other_image));
        RUN(&o, "list", images);
        expect_report(&o, fmt("list %s: ENOENT", images));
        /* Of the parent, only the runtime dir is there. */
        RUN(&o, "list", base);
        expect_report(&o, fmt("list %s: ok run", base));
        /* And a path outside the runtime dir's parent that surely exists outside. */
        RUN(&o, "open", probe);
        expect_report(&o, fmt("open %s: ENOENT", probe));
}

static void test_home_and_root_invisible(void) {
        Outcome o;

        RUN(&o, "list", "/home");
        expect_report(&o, "list /home: ENOENT");
        RUN(&o, "list", "/root");
        expect_report(&o, "list /root: ENOENT");
        RUN(&o, "list", "/var");
        expect_report(&o, fmt("list /var: ok tmp"));
        RUN(&o, "list", "/tmp");
        expect_report(&o, "list /tmp: ok"); /* empty */
}

static void test_etc_shadow_invisible(void) {
        Outcome o;

        ASSERT_TRUE(access("/etc/shadow", F_OK) == 0);
        RUN(&o, "open", "/etc/shadow");
        expect_report(&o, "open /etc/shadow: ENOENT");
        RUN(&o, "open", "/etc/passwd");
        expect_report(&o, "open /etc/passwd: ENOENT");
        /* The dynamic linker's cache is the only file of /etc. */
        RUN(&o, "list", "/etc");
        expect_report(&o, access("/etc/ld.so.cache", F_OK) == 0 ? "list /etc: ok ld.so.cache" : "list /etc: ok");
}

/* A helper in the host's network (URL probes, template caches) also sees what resolving names and
 * checking TLS servers take, read-only, and still no account. */
static void test_host_network_sees_name_service_files(void) {
        ProbeOptions host = { .host_network = true };
        Outcome o;

        ASSERT_TRUE(access("/etc/hosts", F_OK) == 0);
        RUN_WITH(&host, &o, "open", "/etc/hosts");
        expect_report(&o, "open /etc/hosts: ok");
        if (access("/etc/ssl/certs", F_OK) == 0) {
                RUN_WITH(&host, &o, "write", "/etc/ssl/certs/probe");
                expect_report(&o, "write /etc/ssl/certs/probe: EROFS");
        }
        RUN_WITH(&host, &o, "open", "/etc/shadow");
        expect_report(&o, "open /etc/shadow: ENOENT");
        RUN_WITH(&host, &o, "open", "/etc/passwd");
        expect_report(&o, "open /etc/passwd: ENOENT");
}

static void test_no_network(void) {
        struct sockaddr_in sa = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
        socklen_t len = sizeof(sa);
        _cleanup_close_ int l = -1;
        ProbeOptions host = { .host_network = true };
        char port[16];
        Outcome o;

        /* Something listens on the host's loopback... */
        l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        ASSERT_TRUE(l >= 0);
        ASSERT_TRUE(bind(l, (struct sockaddr *) &sa, sizeof(sa)) == 0);
        ASSERT_TRUE(listen(l, 4) == 0);
        ASSERT_TRUE(getsockname(l, (struct sockaddr *) &sa, &len) == 0);
        snprintf(port, sizeof(port), "%u", ntohs(sa.sin_port));

        /* ...but the sandbox has its own, empty network namespace: socket() works, nothing is reachable. */
        RUN(&o, "connect", "127.0.0.1", port);
        expect_report(&o, fmt("connect 127.0.0.1:%s: socket ok, connect ENETUNREACH", port));
        RUN(&o, "connect", "1.1.1.1", "80");
        expect_report(&o, "connect 1.1.1.1:80: socket ok, connect ENETUNREACH");

        /* The control: a helper that serves TCP keeps the host's network, and the probe can tell. */
        RUN_WITH(&host, &o, "connect", "127.0.0.1", port);
        expect_report(&o, fmt("connect 127.0.0.1:%s: socket ok, connect ok", port));
}

/* Sockets of unix and IP only: vsock, which no network namespace confines, reached the host's and
 * every guest's vsock services before; netlink, in the host's network, its links and routes. */
static void test_socket_families(void) {
        ProbeOptions host = { .host_network = true };
        Outcome o;

        RUN(&o, "socket", "1"); /* AF_UNIX */
        expect_report(&o, "socket 1: ok");
        RUN(&o, "socket", "40"); /* AF_VSOCK */
        expect_report(&o, "socket 40: EAFNOSUPPORT");
        RUN(&o, "socket", "16"); /* AF_NETLINK */
        expect_report(&o, "socket 16: EAFNOSUPPORT");
        RUN(&o, "socket", "1000");
        expect_report(&o, "socket 1000: EAFNOSUPPORT");
        RUN_WITH(&host, &o, "socket", "40");
        expect_report(&o, "socket 40: EAFNOSUPPORT");
        RUN_WITH(&host, &o, "socket", "2"); /* AF_INET */
        expect_report(&o, "socket 2: ok");
        /* In the host's network no netlink either: not routing, not sock_diag (4). */
        RUN_WITH(&host, &o, "socket", "16", "3", "0"); /* AF_NETLINK, SOCK_RAW, NETLINK_ROUTE */
        expect_report(&o, "socket 16: EAFNOSUPPORT");
        RUN_WITH(&host, &o, "socket", "16", "3", "4");
        expect_report(&o, "socket 16: EAFNOSUPPORT");
}

/* A client-only helper in the host's network (the URL probes) connects but never serves. No
 * helper there binds a port of its choosing (review 34b): a template cache's QEMU, taken over,
 * could take a template server's port while it is down. It listens on the socket it is given. */
static void test_client_only_cannot_listen(void) {
        ProbeOptions host = { .host_network = true }, client = { .host_network = true, .client_only = true };
        Outcome o;

        RUN(&o, "listen");
        expect_report(&o, "survived listen: ok");
        RUN_WITH(&host, &o, "listen");
        expect_report(&o, "listen: socket or bind EACCES");
        RUN_WITH(&host, &o, "listen-unbound");
        expect_report(&o, "survived listen-unbound: ok");
        RUN_WITH(&client, &o, "listen");
        expect_report(&o, "listen: socket or bind EACCES");
        RUN_WITH(&client, &o, "listen-unbound");
        expect_killed(&o, SIGSYS, NULL);
}

/* Its /tmp holds 1024 files at most: each one's inode is memory charged to the service and to no
 * process (review 34b). */
static void test_tmp_files_bounded(void) {
        Outcome o;

        RUN(&o, "mkdirs", "/tmp", "4000");
        expect_report(&o, "mkdirs /tmp: 1023 then ENOSPC");
}

static void test_ptrace_killed(void) {
        Outcome o;

        RUN(&o, "ptrace-traceme");
        expect_killed(&o, SIGSYS, NULL);
        RUN(&o, "ptrace-parent");
#ifdef BLOCKSTREAM_SANITIZER_BUILD
        /* LeakSanitizer needs PTRACE_ATTACH (sandbox.c): the kernel still refuses it on anybody
         * else's process. */
        if (o.r < 0 || o.timed_out || !WIFEXITED(o.status) || WEXITSTATUS(o.status) != 0 ||
                strncmp(o.report, "survived ptrace(PTRACE_ATTACH, ", 31) != 0 || strlen(o.report) < 8 ||
                !streq(o.report + strlen(o.report) - 8, "): EPERM"))
                TAP_FAIL("expected ptrace(PTRACE_ATTACH) refused with EPERM, got: %s", describe(&o));
#else
        expect_killed(&o, SIGSYS, NULL);
#endif
}

static void test_mount_killed(void) {
        Outcome o;

        RUN(&o, "mount");
        expect_killed(&o, SIGSYS, NULL);
}

static void test_unshare_killed(void) {
        Outcome o;

        RUN(&o, "unshare-user");
        expect_killed(&o, SIGSYS, NULL);
}

static void test_setuid_killed(void) {
        Outcome o;

        RUN(&o, "setuid");
        expect_killed(&o, SIGSYS, NULL);
}

static void test_writes_outside_refused(void) {
        const char *refused[] = { "/bst-probe", "/usr/bst-probe", "/etc/bst-probe", "/var/bst-probe", NULL };
        ProbeOptions writer = { .max_file_size = 4096 }; /* a helper that may write files at all */
        const char *mine;
        struct stat st;
        Outcome o;

        for (size_t i = 0; refused[i]; i++) {
                RUN(&o, "write", refused[i]);
                expect_report(&o, fmt("write %s: EROFS", refused[i]));
                ASSERT_TRUE(access(refused[i], F_OK) < 0);
        }
        /* Next to the runtime dir, in what leads to it. */
        RUN(&o, "write", fmt("%s/bst-probe", base));
        expect_report(&o, fmt("write %s/bst-probe: EROFS", base));
        /* /dev is a tmpfs of its own: read-only to the helper's uid (root's 0755). */
        RUN(&o, "write", "/dev/bst-probe");
        expect_report(&o, "write /dev/bst-probe: EACCES");

        /* Its private /tmp and its runtime dir are writable; the runtime dir is the real one. */
        RUN_WITH(&writer, &o, "write", "/tmp/bst-probe");
        expect_report(&o, "write /tmp/bst-probe: ok");
        mine = fmt("%s/bst-probe", rundir);
        RUN_WITH(&writer, &o, "write", mine);
        expect_report(&o, fmt("write %s: ok", mine));
        ASSERT_TRUE(stat(mine, &st) == 0 && st.st_uid == helper_uid && st.st_gid == helper_uid);
        (void) unlink(mine);
}

/* A mount below /usr is as read-only as /usr itself (a bind remount only changes the top mount). */
static void test_usr_submounts_read_only(void) {
        ProbeOptions writer = { .max_file_size = 4096 };
        const char *target = fmt("%s/bst-probe", usr_submount);
        Outcome o;

        /* The control: outside, the submount is writable to anybody. */
        ASSERT_TRUE(access(usr_submount, W_OK) == 0);
        RUN_WITH(&writer, &o, "write", target);
        expect_report(&o, fmt("write %s: EROFS", target));
        ASSERT_TRUE(access(target, F_OK) < 0);
        (void) unlink(target);
}

static void test_rlimits(void) {
#ifdef BLOCKSTREAM_SANITIZER_BUILD
        const char *as_default = "inf/inf", *as_qemu = "inf/inf"; /* ASan's shadow memory: see sandbox.c */
#else
        const char *as_default = fmt("%" PRIu64 "/%" PRIu64, SANDBOX_ADDRESS_SPACE_DEFAULT, SANDBOX_ADDRESS_SPACE_DEFAULT);
        const char *as_qemu = fmt("%" PRIu64 "/%" PRIu64, SANDBOX_ADDRESS_SPACE_QEMU, SANDBOX_ADDRESS_SPACE_QEMU);
#endif
        ProbeOptions qemu = { .max_address_space = SANDBOX_ADDRESS_SPACE_QEMU, .max_file_size = SANDBOX_LIMIT_NONE };
        ProbeOptions writer = { .max_file_size = 4096 };
        Outcome o;

        /* Our own helpers: a bounded address space, no file to write. */
        RUN(&o, "limits");
        expect_report(&o, fmt("AS=%s DATA=inf/inf FSIZE=0/0", as_default));
        /* QEMU's: more room, and the storage helper writes its images. */
        RUN_WITH(&qemu, &o, "limits");
        expect_report(&o, fmt("AS=%s DATA=inf/inf FSIZE=inf/inf", as_qemu));
        RUN_WITH(&writer, &o, "limits");
        expect_report(&o, fmt("AS=%s DATA=inf/inf FSIZE=4096/4096", as_default));
        /* A helper without file writes dies on its first byte into a file, even in its own /tmp. */
        RUN(&o, "write", "/tmp/bst-probe");
        expect_killed(&o, SIGXFSZ, NULL);
}

static void test_io_uring_denied(void) {
        Outcome o;

        /* Not killed (QEMU probes it and falls back to epoll), but never there. */
        RUN(&o, "io_uring");
        expect_report(&o, "io_uring_setup: ENOSYS");
}

/* Memory no process's RSS shows, which the service's cgroup pays for: the kernel would kill
 * another process for it (review 34b). Missing to every helper. */
static void test_unseen_memory_denied(void) {
        Outcome o;

        RUN(&o, "unseen-memory");
        expect_report(&o, "memfd_create ENOSYS, shmget ENOSYS, msgget ENOSYS, semget ENOSYS, mq_open ENOSYS");
}

static void test_exec_under_allowlist_killed(void) {
        Outcome o;

        /* The control: the deny-list lets a helper exec (QEMU's own binaries need that). */
        RUN(&o, "exec", "/usr/bin/true");
        expect_report(&o, "exec /usr/bin/true");
        /* Our helpers' allow-list has no execve: the exec kills. */
        RUN(&o, "exec-allowlist", "/usr/bin/true");
        expect_killed(&o, SIGSYS, "allow-list installed, exec /usr/bin/true");
}

static void test_no_core_dump(void) {
        const char *dir = fmt("%s/core", rundir);
        ProbeOptions po = { .runtime_dir = dir };
        struct dirent *de;
        unsigned entries = 0;
        DIR *d;
        Outcome o;

        ASSERT_TRUE(mkdir(dir, 0755) == 0 || errno == EEXIST);
        ASSERT_TRUE(chown(dir, helper_uid, helper_uid) == 0);
        RUN_WITH(&po, &o, "core", dir);
        /* RLIMIT_CORE 0 and unraisable; the process is dumpable, so the limit is what stops a core. */
        expect_killed(&o, SIGSEGV, fmt("RLIMIT_CORE soft=0 hard=0, raise EPERM, dumpable=1, chdir %s: ok", dir));
        if (WIFSIGNALED(o.status))
                ASSERT_FALSE(WCOREDUMP(o.status));
        /* Its cwd (the runtime dir) has no core file, nor anything else. */
        d = opendir(dir);
        ASSERT_NOT_NULL(d);
        while (d && (de = readdir(d)))
                if (strcmp(de->d_name, ".") != 0 && strcmp(de->d_name, "..") != 0) {
                        TAP_FAIL("%s/%s appeared", dir, de->d_name);
                        entries++;
                }
        if (d)
                closedir(d);
        ASSERT_EQ(entries, 0);
        d = opendir(rundir);
        while (d && (de = readdir(d)))
                if (strncmp(de->d_name, "core", 4) == 0 && strcmp(de->d_name, "core") != 0)
                        TAP_FAIL("%s/%s appeared", rundir, de->d_name);
        if (d)
                closedir(d);
}

static void test_capabilities_and_ids(void) {
        const char *zero = "0000000000000000";
        Outcome o;

        RUN(&o, "status");
        expect_report(&o, fmt("Uid=%u,%u,%u,%u Gid=%u,%u,%u,%u Groups= CapInh=%s CapPrm=%s CapEff=%s CapBnd=%s CapAmb=%s "
                              "NoNewPrivs=1 Seccomp=2",
                helper_uid, helper_uid, helper_uid, helper_uid, helper_uid, helper_uid, helper_uid, helper_uid, zero, zero,
                zero, zero, zero));

        /* Another guest's identity is used as given, too. */
        RUN_WITH(&(ProbeOptions) { .uid = other_uid }, &o, "status");
        expect_report(&o, fmt("Uid=%u,%u,%u,%u Gid=%u,%u,%u,%u Groups= CapInh=%s CapPrm=%s CapEff=%s CapBnd=%s CapAmb=%s "
                              "NoNewPrivs=1 Seccomp=2",
                other_uid, other_uid, other_uid, other_uid, other_uid, other_uid, other_uid, other_uid, zero, zero, zero,
                zero, zero));
}

static void test_only_given_fds(void) {
        _cleanup_close_ int a = -1, b = -1, c = -1, d = -1;
        Outcome o;

        /* Stray fds of the spawner, inheritable ones included, low and high. */
        a = open("/etc/hostname", O_RDONLY); /* no O_CLOEXEC */
        ASSERT_TRUE(a >= 0);
        b = fcntl(a, F_DUPFD, 42);
        c = fcntl(a, F_DUPFD, 200);
        d = fcntl(a, F_DUPFD_CLOEXEC, 900);
        ASSERT_TRUE(b >= 42 && c >= 200 && d >= 900);
        RUN(&o, "fds");
        expect_report(&o, "fds: 0 1 2 3");
        /* Two fds given: 3 and 4, nothing else. */
        {
                _cleanup_close_ int exec_fd = open(probe, O_PATH | O_CLOEXEC);
                char *argv[] = { (char *) "sandbox-probe", (char *) "fds", NULL };
                int p[2], fds[2];
                pid_t pid;
                int r;

                ASSERT_TRUE(pipe2(p, O_CLOEXEC) == 0);
                fds[0] = p[1];
                fds[1] = c;
                r = sandbox_spawn(&(SandboxSpec) { .name = "probe", .uid = helper_uid, .gid = helper_uid, .runtime_dir = rundir,
                                          .fds = fds, .n_fds = 2, .argv = argv, .exec_fd = exec_fd },
                        &pid);
                ASSERT_OK(r);
                close(p[1]);
                memset(&o, 0, sizeof(o));
                o.pid = r < 0 ? -1 : pid;
                if (r < 0) {
                        close(p[0]);
                        o.r = r;
                } else
                        finish_probe(p[0], &o);
                expect_report(&o, "fds: 0 1 2 3 4");
        }
}

static void test_proc_shows_own_processes_only(void) {
        ProbeOptions other = { .uid = other_uid };
        Outcome o, sleeper;
        int rfd;
        char *visible;

        /* Another guest's helper runs meanwhile. */
        rfd = spawn_probe(&other, (const char *const[]) { "sleep", NULL }, &sleeper);
        ASSERT_TRUE(rfd >= 0);
        {
                char buf[128] = "";
                struct pollfd p = { .fd = rfd, .events = POLLIN };
                if (rfd >= 0 && poll(&p, 1, PROBE_TIMEOUT_MS) == 1)
                        (void) !read(rfd, buf, sizeof(buf) - 1);
                ASSERT_TRUE(strncmp(buf, "sleeping ", 9) == 0);
        }

        RUN(&o, "procs");
        visible = strstr(o.report, " visible=");
        if (!visible || o.r < 0)
                TAP_FAIL("no process list: %s", describe(&o));
        else {
                /* Exactly itself. */
                char expect[64];
                snprintf(expect, sizeof(expect), " visible=%d", (int) o.pid);
                if (strcmp(visible, expect) != 0)
                        TAP_FAIL("/proc lists more than the probe itself (pid %d): %s", (int) o.pid, describe(&o));
        }
        RUN(&o, "open", "/proc/1/status");
        expect_report(&o, "open /proc/1/status: ENOENT");
        RUN(&o, "open", fmt("/proc/%d/status", (int) getpid()));
        expect_report(&o, fmt("open /proc/%d/status: ENOENT", (int) getpid()));
        if (sleeper.pid > 0) {
                RUN(&o, "open", fmt("/proc/%d/status", (int) sleeper.pid));
                expect_report(&o, fmt("open /proc/%d/status: ENOENT", (int) sleeper.pid));
                /* No /proc/sys either. */
                RUN(&o, "list", "/proc/sys");
                expect_report(&o, "list /proc/sys: ENOENT");
                (void) kill(sleeper.pid, SIGKILL);
                (void) waitpid(sleeper.pid, NULL, 0);
        }
        if (rfd >= 0)
                close(rfd);
}

static void pdeathsig_case(bool own_pids) {
        int pid_pipe[2], go_pipe[2], report[2];
        pid_t middle, helper = -1;
        char buf[128] = "";
        int status = 0;
        bool died = false;

        /* We are the subreaper (main): the orphaned helper comes to us and can be reaped here. */
        ASSERT_TRUE(pipe2(pid_pipe, O_CLOEXEC) == 0 && pipe2(go_pipe, O_CLOEXEC) == 0 && pipe2(report, O_CLOEXEC) == 0);
        middle = fork();
        ASSERT_TRUE(middle >= 0);
        if (middle == 0) {
                _cleanup_close_ int exec_fd = open(probe, O_PATH | O_CLOEXEC);
                char *argv[] = { (char *) "sandbox-probe", (char *) "sleep", NULL };
                int fds[1] = { report[1] };
                pid_t pid = -1;
                char c;

                close(go_pipe[1]);
                close(pid_pipe[0]);
                close(report[0]);
                if (sandbox_spawn(&(SandboxSpec) { .name = "probe", .uid = helper_uid, .gid = helper_uid,
                                          .runtime_dir = rundir, .fds = fds, .n_fds = 1, .argv = argv, .exec_fd = exec_fd,
                                          .own_pids = own_pids },
                            &pid) < 0)
                        _exit(1);
                (void) !write(pid_pipe[1], &pid, sizeof(pid));
                (void) !read(go_pipe[0], &c, 1);
                _exit(0); /* the spawner dies, without killing anything itself */
        }
        close(pid_pipe[1]);
        close(go_pipe[0]);
        close(report[1]);
        if (read(pid_pipe[0], &helper, sizeof(helper)) != sizeof(helper))
                helper = -1;
        close(pid_pipe[0]);
        ASSERT_TRUE(helper > 0);
        {
                struct pollfd p = { .fd = report[0], .events = POLLIN };
                if (poll(&p, 1, PROBE_TIMEOUT_MS) == 1)
                        (void) !read(report[0], buf, sizeof(buf) - 1);
        }
        ASSERT_TRUE(strncmp(buf, "sleeping ", 9) == 0);
        close(go_pipe[1]); /* go */
        ASSERT_TRUE(waitpid(middle, &status, 0) == middle && WIFEXITED(status) && WEXITSTATUS(status) == 0);

        for (int i = 0; helper > 0 && i < 500 && !died; i++) {
                pid_t r = waitpid(helper, &status, WNOHANG);
                if (r == helper)
                        died = true;
                else
                        usleep(10000);
        }
        if (!died) {
                TAP_FAIL("the helper (pid %d) outlived its spawner by 5 s", (int) helper);
                if (helper > 0) {
                        (void) kill(helper, SIGKILL);
                        (void) waitpid(helper, NULL, 0);
                }
        } else if (!WIFSIGNALED(status) || WTERMSIG(status) != SIGKILL)
                TAP_FAIL("the helper ended with status 0x%x, expected SIGKILL", status);
        close(report[0]);
}

static void test_pdeathsig(void) {
        pdeathsig_case(false);
}

/* PID 1 of its own namespace (the URL probes): its parent has no pid there, and it still dies
 * with it. */
static void test_pdeathsig_own_pids(void) {
        pdeathsig_case(true);
}

/* The daemon's own filter (main.c): no set-id file, yet openat2() (how images are opened) works. */
static void test_daemon_forbids_setid(void) {
        char dir[sizeof(base) + 16], file[sizeof(base) + 32];
        pid_t pid;
        int status = 0;

        snprintf(dir, sizeof(dir), "%s/setid", base);
        snprintf(file, sizeof(file), "%s/setid/f", base);
        pid = fork();
        ASSERT_TRUE(pid >= 0);
        if (pid == 0) {
                struct open_how how = { .flags = O_RDONLY | O_CLOEXEC, .resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS };
                int fd;

                if (sandbox_forbid_setid() < 0)
                        _exit(10);
                if (mkdir(dir, 02755) == 0 || errno != EPERM || mkdir(dir, 0755) < 0)
                        _exit(11);
                fd = open(file, O_WRONLY | O_CREAT | O_CLOEXEC, 04755);
                if (fd >= 0 || errno != EPERM)
                        _exit(12);
                fd = open(file, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
                if (fd < 0 || fchmod(fd, 04755) == 0 || errno != EPERM || fchmod(fd, 02755) == 0 || errno != EPERM ||
                        fchmod(fd, 0755) < 0 || chmod(file, 06755) == 0 || errno != EPERM)
                        _exit(13);
                close(fd);
                fd = open(base, O_PATH | O_DIRECTORY | O_CLOEXEC);
                if (fd < 0 || syscall(SYS_openat2, fd, "setid/f", &how, sizeof(how)) < 0)
                        _exit(14);
                _exit(0);
        }
        ASSERT_TRUE(waitpid(pid, &status, 0) == pid);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
                TAP_FAIL("the filtered child ended with status 0x%x (10: no filter, 11 mkdir, 12 open, 13 chmod, 14 openat2)",
                        status);
}

static void test_never_as_root(void) {
        char *argv[] = { (char *) "sandbox-probe", (char *) "status", NULL };
        _cleanup_close_ int exec_fd = open(probe, O_PATH | O_CLOEXEC);
        pid_t pid = -1;

        ASSERT_ERRNO(sandbox_spawn(&(SandboxSpec) { .name = "root", .uid = 0, .gid = 0, .argv = argv, .exec_fd = exec_fd }, &pid),
                -EPERM);
        ASSERT_ERRNO(sandbox_spawn(&(SandboxSpec) { .name = "root", .uid = helper_uid, .gid = 0, .argv = argv, .exec_fd = exec_fd },
                             &pid),
                -EPERM);
        ASSERT_EQ(pid, -1);
}

int main(int argc, char **argv) {
        int r = sandbox_tests_begin(argc, argv);

        if (r <= 0)
                return r < 0;

        TAP_RUN(test_other_guest_image_invisible);
        TAP_RUN(test_home_and_root_invisible);
        TAP_RUN(test_etc_shadow_invisible);
        TAP_RUN(test_host_network_sees_name_service_files);
        TAP_RUN(test_no_network);
        TAP_RUN(test_socket_families);
        TAP_RUN(test_client_only_cannot_listen);
        TAP_RUN(test_tmp_files_bounded);
        TAP_RUN(test_ptrace_killed);
        TAP_RUN(test_mount_killed);
        TAP_RUN(test_unshare_killed);
        TAP_RUN(test_setuid_killed);
        TAP_RUN(test_writes_outside_refused);
        TAP_RUN(test_usr_submounts_read_only);
        TAP_RUN(test_rlimits);
        TAP_RUN(test_io_uring_denied);
        TAP_RUN(test_unseen_memory_denied);
        TAP_RUN(test_exec_under_allowlist_killed);
        TAP_RUN(test_no_core_dump);
        TAP_RUN(test_capabilities_and_ids);
        TAP_RUN(test_only_given_fds);
        TAP_RUN(test_proc_shows_own_processes_only);
        TAP_RUN(test_pdeathsig);
        TAP_RUN(test_pdeathsig_own_pids);
        TAP_RUN(test_daemon_forbids_setid);
        TAP_RUN(test_never_as_root);

        cleanup();
        return tap_finish();
}
