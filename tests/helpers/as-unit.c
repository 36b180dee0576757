/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* Run a program under the kernel-side restrictions of a systemd unit file, as systemd would start
 * it, on machines where systemd is not PID 1 (the test machines): the integration tests start
 * every daemon through this, with the shipped systemd/blockstreamd.service.in, so that what the
 * unit forbids fails in the tests too, not first on a user's host.
 *
 * Applied, in systemd's order (bounding set, no_new_privs, seccomp, exec):
 *   CapabilityBoundingSet=   every capability not listed is dropped from the bounding set, so
 *                            the program (root) starts with only those;
 *   NoNewPrivileges=yes      PR_SET_NO_NEW_PRIVS;
 *   RestrictNamespaces=      unshare(), clone() and setns() of a namespace type not listed fail
 *                            with EPERM, setns() with no type too, clone3() with ENOSYS (as
 *                            systemd's seccomp_restrict_namespaces());
 *   RestrictAddressFamilies= socket() of a family not listed fails with EAFNOSUPPORT;
 *   RestrictSUIDSGID=yes     chmod(), mkdir(), mknod(), open(O_CREAT)… with a set-id bit fail with
 *                            EPERM, and openat2() (whose mode seccomp cannot see) with ENOSYS, as
 *                            systemd's seccomp_restrict_sxid();
 *   LockPersonality=yes      personality() other than PER_LINUX fails with EPERM;
 *   RestrictRealtime=yes     RLIMIT_RTPRIO 0, sched_setscheduler() to a realtime policy EPERM;
 *   SystemCallFilter=        with --syscalls=A,B,…: the allowed system calls, its groups expanded
 *                            by the caller (systemd-analyze syscall-filter); every other call
 *                            fails with the unit's SystemCallErrorNumber= (EPERM).
 * As systemd, the inheritable and ambient capability sets are emptied too. Lists given more than
 * once are merged, as systemd does; a "~" (deny-list) form is refused. Any other hardening key
 * is refused unless it is one known not to be applied here: the file-system and namespace options
 * (ProtectSystem=, PrivateTmp=, …), whose system-call parts SystemCallFilter= covers for this
 * unit. So a unit line the tests do not honour fails them instead of passing unseen.
 *
 * Usage: as-unit [--syscalls=NAME,…] UNIT-FILE PROGRAM [ARG…] */

#include <errno.h>
#include <linux/capability.h>
#include <sched.h>
#include <seccomp.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/socket.h>
#include <unistd.h>

#ifndef CLONE_NEWTIME
#define CLONE_NEWTIME 0x00000080
#endif

static const struct {
        const char *name;
        unsigned long flag;
} namespaces[] = {
        { "cgroup", CLONE_NEWCGROUP }, { "ipc", CLONE_NEWIPC }, { "net", CLONE_NEWNET }, { "mnt", CLONE_NEWNS },
        { "pid", CLONE_NEWPID },       { "user", CLONE_NEWUSER }, { "uts", CLONE_NEWUTS }, { "time", CLONE_NEWTIME },
};

static const struct {
        const char *name;
        int family;
} families[] = {
        { "AF_UNIX", AF_UNIX }, { "AF_INET", AF_INET }, { "AF_INET6", AF_INET6 }, { "AF_NETLINK", AF_NETLINK },
        { "AF_PACKET", AF_PACKET }, { "AF_VSOCK", AF_VSOCK },
};

static _Noreturn void die(const char *what, const char *detail) {
        fprintf(stderr, "as-unit: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
        exit(127);
}

typedef struct Unit {
        bool have_namespaces, have_caps, have_families, nnp, sxid, personality, realtime;
        int syscall_errno;
        unsigned long namespaces;
        uint64_t caps;
        bool families[AF_MAX];
} Unit;

/* CAP_CHOWN … by the kernel's numbering (linux/capability.h). */
static int cap_from_name(const char *name) {
        static const char *const names[] = {
                "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
                "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
                "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER",
                "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT",
                "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME",
                "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL",
                "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM",
                "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
        };
        for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
                if (strcmp(name, names[i]) == 0)
                        return (int) i;
        return -1;
}

static void parse_list(Unit *u, const char *key, char *value) {
        for (char *save = NULL, *w = strtok_r(value, " \t", &save); w; w = strtok_r(NULL, " \t", &save)) {
                bool found = false;

                if (w[0] == '~')
                        die("deny-lists are not supported", key);
                if (strcmp(key, "RestrictNamespaces") == 0) {
                        for (size_t i = 0; i < sizeof(namespaces) / sizeof(namespaces[0]); i++)
                                if (strcmp(w, namespaces[i].name) == 0) {
                                        u->namespaces |= namespaces[i].flag;
                                        found = true;
                                }
                } else if (strcmp(key, "RestrictAddressFamilies") == 0) {
                        for (size_t i = 0; i < sizeof(families) / sizeof(families[0]); i++)
                                if (strcmp(w, families[i].name) == 0) {
                                        u->families[families[i].family] = true;
                                        found = true;
                                }
                } else {
                        int c = cap_from_name(w);
                        if (c < 0)
                                die("unknown capability", w);
                        u->caps |= UINT64_C(1) << c;
                        found = true;
                }
                if (!found)
                        die("unknown value", w);
        }
}

static bool yes(const char *v) {
        return strcmp(v, "yes") == 0 || strcmp(v, "true") == 0 || strcmp(v, "1") == 0 || strcmp(v, "on") == 0;
}

/* Keys of systemd.exec(5) that confine the service. */
static bool is_hardening(const char *key) {
        static const char *const prefixes[] = { "Restrict", "Protect", "Private", "Lock", "MemoryDeny", "SystemCall",
                "Capability", "AmbientCapabilities", "SecureBits", "NoNewPrivileges", "ReadWrite", "ReadOnly",
                "Inaccessible", "DynamicUser", "User", "Group" };
        for (size_t i = 0; i < sizeof(prefixes) / sizeof(prefixes[0]); i++)
                if (strncmp(key, prefixes[i], strlen(prefixes[i])) == 0)
                        return true;
        return false;
}

/* What the tests knowingly leave out: the file system's and namespaces' part of these (their
 * system calls are in SystemCallFilter='s list, which is applied), and "no" values. */
static bool known_not_applied(const char *key, const char *value) {
        static const char *const keys[] = { "ProtectSystem", "ProtectHome", "PrivateTmp", "ReadWritePaths",
                "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
                "ProtectClock", "ProtectHostname", "SystemCallArchitectures" };
        if (strcmp(value, "no") == 0 || strcmp(value, "false") == 0)
                return true;
        if (strcmp(key, "SystemCallFilter") == 0)
                return true; /* the caller expands it into --syscalls= */
        for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++)
                if (strcmp(key, keys[i]) == 0)
                        return true;
        return false;
}

static void parse_unit(const char *path, Unit *u) {
        char line[4096];
        FILE *f = fopen(path, "re");

        if (!f)
                die("cannot open the unit file", path);
        while (fgets(line, sizeof(line), f)) {
                char *eq, *end;

                line[strcspn(line, "\n")] = 0;
                if (line[0] == ' ' || line[0] == '\t')
                        die("a unit line that starts with white space (as-unit reads keys at the start)", line);
                if (line[0] == '#' || line[0] == ';' || !(eq = strchr(line, '=')))
                        continue;
                *eq = 0;
                for (end = eq - 1; end >= line && (*end == ' ' || *end == '\t'); end--)
                        *end = 0;
                if (strcmp(line, "RestrictNamespaces") == 0) {
                        u->have_namespaces = true;
                        parse_list(u, line, eq + 1);
                } else if (strcmp(line, "RestrictAddressFamilies") == 0) {
                        u->have_families = true;
                        parse_list(u, line, eq + 1);
                } else if (strcmp(line, "CapabilityBoundingSet") == 0) {
                        u->have_caps = true;
                        parse_list(u, line, eq + 1);
                } else if (strcmp(line, "NoNewPrivileges") == 0)
                        u->nnp = yes(eq + 1);
                else if (strcmp(line, "RestrictSUIDSGID") == 0)
                        u->sxid = yes(eq + 1);
                else if (strcmp(line, "LockPersonality") == 0)
                        u->personality = yes(eq + 1);
                else if (strcmp(line, "RestrictRealtime") == 0)
                        u->realtime = yes(eq + 1);
                else if (strcmp(line, "SystemCallErrorNumber") == 0) {
                        if (strcmp(eq + 1, "EPERM") != 0)
                                die("only SystemCallErrorNumber=EPERM is supported", eq + 1);
                        u->syscall_errno = EPERM;
                } else if (is_hardening(line) && !known_not_applied(line, eq + 1))
                        die("a hardening option as-unit does not apply (teach it, or list it as not applied)", line);
        }
        fclose(f);
}

static void rule(scmp_filter_ctx ctx, uint32_t action, int syscall, unsigned n, struct scmp_arg_cmp cmp) {
        int r = n == 0 ? seccomp_rule_add_exact(ctx, action, syscall, 0)
                       : seccomp_rule_add_exact(ctx, action, syscall, 1, cmp);
        if (r < 0)
                die("cannot add a seccomp rule", strerror(-r));
}

/* systemd's seccomp_restrict_sxid() (written apart from the daemon's own sandbox_forbid_setid() on
 * purpose: this one stands for systemd), for each of S_ISUID and S_ISGID: the mode argument of the
 * calls that set one, EPERM; open()/openat() only with O_CREAT; openat2(), whose mode lies in a
 * struct seccomp cannot read, ENOSYS whatever it asks. */
static void restrict_sxid(scmp_filter_ctx ctx) {
        static const struct {
                const char *name;
                unsigned mode_arg;
        } calls[] = { { "chmod", 1 }, { "fchmod", 1 }, { "fchmodat", 2 }, { "fchmodat2", 2 }, { "mkdir", 1 },
                { "mkdirat", 2 }, { "mknod", 1 }, { "mknodat", 2 }, { "creat", 1 } };
        const scmp_datum_t bits[] = { S_ISUID, S_ISGID };

        for (size_t b = 0; b < 2; b++) {
                for (size_t i = 0; i < sizeof(calls) / sizeof(calls[0]); i++) {
                        int nr = seccomp_syscall_resolve_name(calls[i].name);
                        struct scmp_arg_cmp cmp = { .arg = calls[i].mode_arg, .op = SCMP_CMP_MASKED_EQ,
                                .datum_a = bits[b], .datum_b = bits[b] };
                        if (nr == __NR_SCMP_ERROR)
                                continue;
                        rule(ctx, SCMP_ACT_ERRNO(EPERM), nr, 1, cmp);
                }
                if (seccomp_rule_add_exact(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(open), 2,
                            SCMP_A1(SCMP_CMP_MASKED_EQ, O_CREAT, O_CREAT), SCMP_A2(SCMP_CMP_MASKED_EQ, bits[b], bits[b])) < 0 ||
                        seccomp_rule_add_exact(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(openat), 2,
                                SCMP_A2(SCMP_CMP_MASKED_EQ, O_CREAT, O_CREAT),
                                SCMP_A3(SCMP_CMP_MASKED_EQ, bits[b], bits[b])) < 0)
                        die("cannot add a seccomp rule", "open(O_CREAT)");
        }
        rule(ctx, SCMP_ACT_ERRNO(ENOSYS), SCMP_SYS(openat2), 0, SCMP_A0(SCMP_CMP_EQ, 0) /* unused */);
}

int main(int argc, char **argv) {
        Unit u = {};
        scmp_filter_ctx ctx;
        char *syscalls = NULL;

        if (argc > 1 && strncmp(argv[1], "--syscalls=", 11) == 0) {
                syscalls = argv[1] + 11;
                argv++;
                argc--;
        }
        if (argc < 3)
                die("usage: as-unit [--syscalls=NAME,...] UNIT-FILE PROGRAM [ARG...]", NULL);
        parse_unit(argv[1], &u);

        if (u.have_caps)
                for (int c = 0; c <= CAP_LAST_CAP; c++)
                        if (!(u.caps & (UINT64_C(1) << c)) && prctl(PR_CAPBSET_DROP, c, 0, 0, 0) < 0 && errno != EINVAL)
                                die("cannot drop a capability from the bounding set", strerror(errno));
        if (u.have_caps) {
                /* systemd empties the inheritable and ambient sets too (capability_ambient_set_apply):
                 * else a test runner with inheritable capabilities would hand them back at exec. */
                struct __user_cap_header_struct hdr = { .version = _LINUX_CAPABILITY_VERSION_3 };
                struct __user_cap_data_struct data[2];

                if (syscall(SYS_capget, &hdr, data) < 0)
                        die("capget failed", strerror(errno));
                data[0].inheritable = data[1].inheritable = 0;
                if (syscall(SYS_capset, &hdr, data) < 0 ||
                        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0)
                        die("cannot empty the inheritable and ambient capabilities", strerror(errno));
        }
        if (u.realtime && setrlimit(RLIMIT_RTPRIO, &(struct rlimit) { 0, 0 }) < 0)
                die("cannot set RLIMIT_RTPRIO", strerror(errno));
        if (u.nnp && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
                die("cannot set no_new_privs", strerror(errno));

        ctx = seccomp_init(SCMP_ACT_ALLOW);
        if (!ctx)
                die("seccomp_init failed", NULL);
        /* no_new_privs only where the unit says (libseccomp would set it). */
        if (seccomp_attr_set(ctx, SCMP_FLTATR_CTL_NNP, 0) < 0)
                die("cannot keep libseccomp from setting no_new_privs", NULL);
        if (u.sxid)
                restrict_sxid(ctx);
        if (u.personality)
                rule(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(personality), 1, SCMP_A0(SCMP_CMP_NE, 0 /* PER_LINUX */));
        if (u.realtime) {
                static const scmp_datum_t realtime[] = { 1, 2, 6 }; /* SCHED_FIFO, SCHED_RR, SCHED_DEADLINE */

                for (size_t i = 0; i < sizeof(realtime) / sizeof(realtime[0]); i++)
                        rule(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(sched_setscheduler), 1,
                                SCMP_A1(SCMP_CMP_MASKED_EQ, ~(scmp_datum_t) 0x40000000 /* RESET_ON_FORK */, realtime[i]));
        }
        if (u.have_namespaces) {
                rule(ctx, SCMP_ACT_ERRNO(ENOSYS), SCMP_SYS(clone3), 0, SCMP_A0(SCMP_CMP_EQ, 0) /* unused */);
                rule(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(setns), 1, SCMP_A1(SCMP_CMP_EQ, 0));
                for (size_t i = 0; i < sizeof(namespaces) / sizeof(namespaces[0]); i++) {
                        unsigned long f = namespaces[i].flag;
                        if (u.namespaces & f)
                                continue;
                        rule(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(unshare), 1, SCMP_A0(SCMP_CMP_MASKED_EQ, f, f));
                        rule(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(clone), 1, SCMP_A0(SCMP_CMP_MASKED_EQ, f, f));
                        rule(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(setns), 1, SCMP_A1(SCMP_CMP_MASKED_EQ, f, f));
                }
        }
        if (u.have_families) {
                for (int af = 0; af < AF_MAX; af++)
                        if (!u.families[af])
                                rule(ctx, SCMP_ACT_ERRNO(EAFNOSUPPORT), SCMP_SYS(socket), 1,
                                        SCMP_A0(SCMP_CMP_EQ, (scmp_datum_t) af));
                rule(ctx, SCMP_ACT_ERRNO(EAFNOSUPPORT), SCMP_SYS(socket), 1, SCMP_A0(SCMP_CMP_GE, AF_MAX));
        }
        if (seccomp_load(ctx) < 0)
                die("cannot load the seccomp filter", NULL);
        seccomp_release(ctx);

        /* A second filter: the kernel runs both, the stricter answer wins. */
        if (syscalls) {
                unsigned n = 0;

                ctx = seccomp_init(SCMP_ACT_ERRNO(u.syscall_errno ?: EPERM));
                if (!ctx || seccomp_attr_set(ctx, SCMP_FLTATR_CTL_NNP, 0) < 0)
                        die("seccomp_init failed", NULL);
                for (char *save = NULL, *w = strtok_r(syscalls, ",", &save); w; w = strtok_r(NULL, ",", &save)) {
                        int nr = seccomp_syscall_resolve_name(w);
                        if (nr == __NR_SCMP_ERROR)
                                continue; /* not a call of this architecture */
                        if (seccomp_rule_add(ctx, SCMP_ACT_ALLOW, nr, 0) == 0)
                                n++;
                }
                if (n < 50)
                        die("implausibly few system calls allowed", syscalls);
                if (seccomp_load(ctx) < 0)
                        die("cannot load the system call filter", NULL);
                seccomp_release(ctx);
        }

        execv(argv[2], argv + 2);
        die("cannot run", argv[2]);
}
