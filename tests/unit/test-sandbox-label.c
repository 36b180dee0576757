/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* The helpers' SELinux labels, computed and applied as where SELinux is on (it is off on the test
 * machines: the context is simulated): the label a guest's SandboxLabel property shows is the one
 * sandbox_spawn() applies. Needs root, like test-sandbox.c (a TAP skip without). */

#include "sandbox-tests.h"

#define FAKE_CONTEXT "system_u:system_r:blockstreamd_t:s0-s0:c0.c1023"
#define LABEL_FD 4 /* in the child: the second fd given, where record_label() writes */

/* Stands in for setexeccon() in the child, fds in place: the label goes to the test. */
static int record_label(const char *label) {
        size_t n = strlen(label);
        return write(LABEL_FD, label, n) == (ssize_t) n ? 0 : -EIO;
}

static void test_selinux_label_from_context(void) {
        _cleanup_free_ char *l = NULL;

        ASSERT_OK(sandbox_selinux_label_from_context(FAKE_CONTEXT, "blockstream_helper_t", "s0:c3,c700", &l));
        ASSERT_STREQ(l, "system_u:system_r:blockstream_helper_t:s0:c3,c700");
        l = mfree(l);
        ASSERT_OK(sandbox_selinux_label_from_context("unconfined_u:unconfined_r:unconfined_t:s0", "t_t", "s0", &l));
        ASSERT_STREQ(l, "unconfined_u:unconfined_r:t_t:s0");
        l = mfree(l);
        /* Not a context, or parts that would make another label. */
        ASSERT_ERRNO(sandbox_selinux_label_from_context("system_u", "t_t", "s0", &l), -EINVAL);
        ASSERT_ERRNO(sandbox_selinux_label_from_context("::t:s0", "t_t", "s0", &l), -EINVAL);
        ASSERT_ERRNO(sandbox_selinux_label_from_context(FAKE_CONTEXT, "t_t:s0", "s0", &l), -EINVAL);
        ASSERT_ERRNO(sandbox_selinux_label_from_context(FAKE_CONTEXT, "t_t", "s0 c1", &l), -EINVAL);
        ASSERT_ERRNO(sandbox_selinux_label_from_context(FAKE_CONTEXT, "", "s0", &l), -EINVAL);
        ASSERT_NULL(l);
}

/* Serve the guest's Guest interface on one end of a socketpair (in a child) and read its
 * SandboxLabel property through sd-bus from the other, as any client does. */
static int get_sandbox_label(Guest *g, char **ret) {
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *client = NULL;
        sd_bus_error error = SD_BUS_ERROR_NULL;
        sd_id128_t id;
        int pair[2], status, r;
        pid_t pid;

        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) < 0)
                return -errno;
        pid = fork();
        if (pid < 0)
                return -errno;
        if (pid == 0) {
                sd_bus *server = NULL;

                close(pair[0]);
                if (sd_id128_randomize(&id) < 0 || sd_bus_new(&server) < 0 || sd_bus_set_fd(server, pair[1], pair[1]) < 0 ||
                        sd_bus_set_server(server, 1, id) < 0 ||
                        sd_bus_add_object_vtable(server, NULL, "/org/blockstream1/guest/label", "org.blockstream1.Guest",
                                guest_vtable, g) < 0 ||
                        sd_bus_start(server) < 0)
                        _exit(1);
                for (;;) {
                        r = sd_bus_process(server, NULL);
                        if (r < 0)
                                _exit(0); /* the client went */
                        if (r == 0 && sd_bus_wait(server, 10 * USEC_PER_SEC) <= 0)
                                _exit(2);
                }
        }
        close(pair[1]);
        r = sd_bus_new(&client);
        if (r >= 0)
                r = sd_bus_set_fd(client, pair[0], pair[0]);
        else
                close(pair[0]);
        if (r >= 0)
                r = sd_bus_start(client);
        if (r >= 0)
                r = sd_bus_get_property_string(client, NULL, "/org/blockstream1/guest/label", "org.blockstream1.Guest",
                        "SandboxLabel", &error, ret);
        if (r < 0)
                fprintf(stderr, "# Get SandboxLabel: %s\n", error.message ?: strerror(-r));
        sd_bus_error_free(&error);
        client = sd_bus_flush_close_unref(client);
        (void) waitpid(pid, &status, 0);
        return r;
}

/* Where SELinux is on, the guest's SandboxLabel is exactly the label its helpers are given and the
 * spawn applies: the guest's own MCS pair, with the helper type. */
static void test_sandbox_label_is_the_applied_label(void) {
        _cleanup_close_ int exec_fd = open(probe, O_PATH | O_CLOEXEC);
        _cleanup_free_ char *property = NULL, *expect = NULL;
        char *argv[] = { (char *) "sandbox-probe", (char *) "status", NULL };
        char applied[512] = "";
        Manager m = {};
        Guest g = {
                .engine = &m.engine, .name = (char *) "label", .helper_uid = helper_uid, .mcs_c1 = 17, .mcs_c2 = 900
        };
        int report[2], labels[2];
        Outcome o = {};
        pid_t pid = -1;

        config_init(&m.engine.config);
        sandbox_selinux_test_override(FAKE_CONTEXT, record_label);
        ASSERT_TRUE(sandbox_selinux_enabled());
        ASSERT_EQ(manager_identity_labels(&m, &g), 1);
        expect = strdup_printf("system_u:system_r:%s:s0:c17,c900", config_selinux_helper_type(&m.engine.config));
        ASSERT_STREQ(g.selinux_process_label, expect);

        /* What a client reads... */
        ASSERT_OK(get_sandbox_label(&g, &property));
        ASSERT_STREQ(property, expect);

        /* ...is what the spawn applies, given the guest's label as the storage helper and the pull
         * helper get it. */
        ASSERT_TRUE(pipe2(report, O_CLOEXEC) == 0 && pipe2(labels, O_CLOEXEC) == 0);
        ASSERT_OK(sandbox_spawn(&(SandboxSpec) { .name = "probe", .uid = helper_uid, .gid = helper_uid, .runtime_dir = rundir,
                                        .selinux_label = g.selinux_process_label, .fds = (int[]) { report[1], labels[1] },
                                        .n_fds = 2, .argv = argv, .exec_fd = exec_fd },
                &pid));
        close(report[1]);
        close(labels[1]);
        o.pid = pid;
        if (pid > 0)
                finish_probe(report[0], &o);
        else
                close(report[0]);
        ASSERT_TRUE(read_all(labels[0], applied, sizeof(applied), PROBE_TIMEOUT_MS));
        close(labels[0]);
        ASSERT_STREQ(applied, property);
        ASSERT_TRUE(o.r == 0 && !o.timed_out && WIFEXITED(o.status) && WEXITSTATUS(o.status) == 0);

        /* SELinux off: no label, and the property says so. */
        sandbox_selinux_test_override(NULL, NULL);
        if (!sandbox_selinux_enabled()) {
                property = mfree(property);
                ASSERT_EQ(manager_identity_labels(&m, &g), 0);
                ASSERT_NULL(g.selinux_process_label);
                ASSERT_OK(get_sandbox_label(&g, &property));
                ASSERT_STREQ(property, "");
        }
        free(g.selinux_process_label);
        free(g.selinux_image_label);
        config_done(&m.engine.config);
}

int main(int argc, char **argv) {
        int r = sandbox_tests_begin(argc, argv);

        if (r <= 0)
                return r < 0;

        TAP_RUN(test_selinux_label_from_context);
        TAP_RUN(test_sandbox_label_is_the_applied_label);

        cleanup();
        return tap_finish();
}
