/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* The typed QEMU calls (service/qemu.c) against a scripted QEMU: every command to the letter,
 * replies and errors handed back, destroy once. The parsers are test-qemu-reply.c's. */

#include <fcntl.h>

#include "fake-qemu.h"
#include "qemu.h"
#include "qmp.h"
#include "util.h"
#include "tap.h"

#define SEC USEC_PER_SEC
#define MSEC USEC_PER_MSEC

typedef struct Result {
        unsigned n_handler, n_destroy;
        int error;
        char *desc;
        size_t n;
        char *alias;
        size_t n_chain;
        char *chain0_node;
        char *job_id;
} Result;

static void result_free(Result *r) {
        free(r->desc);
        free(r->alias);
        free(r->chain0_node);
        free(r->job_id);
        *r = (Result){};
}

static void on_result(Qmp *q, int error, const char *desc, void *userdata) {
        Result *r = userdata;
        r->n_handler++;
        r->error = error;
        free(r->desc);
        r->desc = desc ? strdup(desc) : NULL;
}

static void on_disks(Qmp *q, int error, const char *desc, QemuDisk *disks, size_t n, void *userdata) {
        Result *r = userdata;
        r->n_handler++;
        r->error = error;
        r->n = n;
        free(r->desc);
        r->desc = desc ? strdup(desc) : NULL;
        if (n > 0) {
                r->alias = strdup(disks[0].alias);
                r->n_chain = disks[0].n_chain;
                if (disks[0].n_chain > 0 && disks[0].chain[0].node_name)
                        r->chain0_node = strdup(disks[0].chain[0].node_name);
        }
}

static void on_jobs(Qmp *q, int error, const char *desc, QemuBlockJob *jobs, size_t n, void *userdata) {
        Result *r = userdata;
        r->n_handler++;
        r->error = error;
        r->n = n;
        free(r->desc);
        r->desc = desc ? strdup(desc) : NULL;
        if (n > 0)
                r->job_id = strdup(jobs[0].id);
}

static void on_destroy(void *userdata) {
        Result *r = userdata;
        r->n_destroy++;
}

static bool cond_result(Fake *f, void *arg) {
        return ((Result *) arg)->n_handler > 0;
}

static bool setup(Fake *f) {
        if (fake_new(f) < 0 || fake_handshake(f) < 0) {
                TAP_FAIL("fake QEMU setup failed");
                return false;
        }
        return true;
}

/* Plays QEMU for qemu_query_disks(), whatever order of query-block-jobs, query-block and
 * query-named-block-nodes it uses. A NULL answer: an error reply for that command. stop_after:
 * stop answering (return) once this command was received, without answering it. Records which
 * commands came. */
typedef struct DisksScript {
        const char *jobs, *blocks, *nodes;
        const char *stop_after;
        unsigned n_jobs, n_blocks, n_nodes, n_other;
} DisksScript;

static void serve_disks(Fake *f, Result *r, DisksScript *s) {
        for (usec_t end = now_usec(CLOCK_MONOTONIC) + 5 * SEC; r->n_handler == 0 && now_usec(CLOCK_MONOTONIC) < end;) {
                _cleanup_(json_object_putp) json_object *cmd = fake_next_command(f, 100 * MSEC);
                const char *name = fake_command_name(cmd), *answer;

                if (!cmd)
                        continue;
                if (streq_ptr(name, "query-block-jobs")) {
                        s->n_jobs++;
                        answer = s->jobs;
                } else if (streq_ptr(name, "query-block")) {
                        s->n_blocks++;
                        answer = s->blocks;
                } else if (streq_ptr(name, "query-named-block-nodes")) {
                        json_object *args, *flat;
                        s->n_nodes++;
                        if (!json_object_object_get_ex(cmd, "arguments", &args) ||
                                !json_object_object_get_ex(args, "flat", &flat) || !json_object_get_boolean(flat))
                                TAP_FAIL("query-named-block-nodes without flat: true");
                        answer = s->nodes;
                } else {
                        s->n_other++;
                        TAP_FAIL("unexpected command %s", strempty(name));
                        continue;
                }
                if (streq_ptr(name, s->stop_after))
                        return;
                if (answer)
                        (void) fake_reply(f, cmd, answer);
                else
                        (void) fake_sendf(f,
                                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"no\"}, \"id\": %" PRIi64 "}\r\n",
                                fake_command_id(cmd));
        }
        fake_run(f, 20 * MSEC);
}

static void test_query_disks_call(void) {
        _cleanup_free_ char *blocks = fake_load_text("query-block-chain3.json"),
                            *nodes = fake_load_text("query-named-block-nodes-chain3.json");
        Result r = {};
        DisksScript s;
        Fake f;

        if (!setup(&f))
                return;

        /* The normal case. */
        s = (DisksScript){.jobs = "[]", .blocks = blocks, .nodes = nodes};
        ASSERT_OK(qemu_query_disks(f.q, on_disks, &r, on_destroy));
        serve_disks(&f, &r, &s);
        ASSERT_EQ(r.n_handler, 1);
        ASSERT_EQ(r.error, 0);
        ASSERT_EQ(r.n, 1);
        ASSERT_STREQ(r.alias, "vda");
        ASSERT_EQ(r.n_chain, 2);
        ASSERT_STREQ(r.chain0_node, "#block165");
        ASSERT_EQ(r.n_destroy, 1);
        ASSERT_EQ(s.n_blocks, 1);
        ASSERT_EQ(s.n_nodes, 1);
        result_free(&r);

        /* QEMU refuses query-block. */
        s = (DisksScript){.jobs = "[]", .blocks = NULL, .nodes = nodes};
        ASSERT_OK(qemu_query_disks(f.q, on_disks, &r, on_destroy));
        serve_disks(&f, &r, &s);
        ASSERT_EQ(r.n_handler, 1);
        ASSERT_ERRNO(r.error, -EREMOTEIO);
        ASSERT_STREQ(r.desc, "no");
        ASSERT_EQ(r.n_destroy, 1);
        ASSERT_EQ(s.n_nodes, 0); /* nothing more asked after a refusal */
        result_free(&r);

        /* A malformed query-block reply: an error for the caller, the connection stays. */
        s = (DisksScript){.jobs = "[]",
                .blocks = "[{\"inserted\": {\"node-name\": \"top\", \"image\": {\"filename\": \"/x\", \"format\": "
                          "\"qcow2\", \"virtual-size\": \"big\"}}}]",
                .nodes = "[]"};
        ASSERT_OK(qemu_query_disks(f.q, on_disks, &r, on_destroy));
        serve_disks(&f, &r, &s);
        ASSERT_EQ(r.n_handler, 1);
        ASSERT_NEG(r.error);
        ASSERT_EQ(r.n, 0);
        ASSERT_EQ(r.n_destroy, 1);
        ASSERT_EQ(f.n_failed, 0);
        result_free(&r);

        /* The connection dies while the node names are asked for. */
        s = (DisksScript){.jobs = "[]", .blocks = blocks, .nodes = nodes, .stop_after = "query-named-block-nodes"};
        ASSERT_OK(qemu_query_disks(f.q, on_disks, &r, on_destroy));
        serve_disks(&f, &r, &s);
        ASSERT_EQ(s.n_nodes, 1);
        closep(&f.peer);
        fake_wait_failed(&f, 3 * SEC);
        fake_run(&f, 20 * MSEC);
        ASSERT_EQ(r.n_handler, 1);
        ASSERT_NEG(r.error);
        ASSERT_EQ(r.n_destroy, 1);
        result_free(&r);
        fake_free(&f);

        /* Closed by the owner while the last command is pending: destroy once, no handler. */
        if (setup(&f)) {
                s = (DisksScript){
                        .jobs = "[]", .blocks = blocks, .nodes = nodes, .stop_after = "query-named-block-nodes"};
                ASSERT_OK(qemu_query_disks(f.q, on_disks, &r, on_destroy));
                serve_disks(&f, &r, &s);
                fake_close(&f);
                ASSERT_EQ(r.n_handler, 0);
                ASSERT_EQ(r.n_destroy, 1);
                result_free(&r);
                fake_free(&f);
        }
}

/* query-block's reply is kept until QEMU answers query-named-block-nodes, which it may take its
 * time over: a QEMU per guest, 64 guests of one user, each holding a reply of up to 24 MiB went
 * past the daemon-wide budget of messages held (review 34a). It counts with them now: with 11
 * QEMUs holding ~22 MiB each of messages begun, a 12th's reply of ~22 MiB is refused. */
static void test_query_block_reply_held_counts(void) {
        enum { N = 11, OBJECTS = 18000 };
        size_t p;
        _cleanup_free_ char *msg = fake_unfinished_message(OBJECTS, &p), *big = malloc(3 * OBJECTS + 2);
        Result r = {};
        DisksScript s;
        Fake held[N], f;

        if (!msg || !big)
                return;
        memcpy(big, "[{}", 3);
        for (unsigned i = 1; i < OBJECTS; i++)
                memcpy(big + 3 * i, ",{}", 3);
        memcpy(big + 3 * OBJECTS, "]", 2);
        qmp_cost_set_grace(UINT64_MAX); /* none gives way: the shares alone */
        for (size_t i = 0; i < N; i++) {
                if (!setup(&held[i]))
                        return;
                ASSERT_OK(fake_send(&held[i], msg, p));
                fake_run(&held[i], 100 * MSEC);
                ASSERT_EQ(held[i].n_failed, 0);
        }
        if (setup(&f)) {
                s = (DisksScript){ .jobs = "[]", .blocks = big, .nodes = "[]", .stop_after = "query-named-block-nodes" };
                ASSERT_OK(qemu_query_disks(f.q, on_disks, &r, on_destroy));
                serve_disks(&f, &r, &s);
                ASSERT_EQ(r.n_handler, 1);
                ASSERT_ERRNO(r.error, -E2BIG);
                ASSERT_EQ(s.n_nodes, 0);
                ASSERT_EQ(r.n_destroy, 1);
                result_free(&r);
                fake_free(&f);
        }

        /* Those held past the grace give way, the longest first: the reply is kept and the node
         * names asked for, and the first QEMU's unfinished message closes its connection. */
        qmp_cost_set_grace(0);
        if (setup(&f)) {
                s = (DisksScript){ .jobs = "[]", .blocks = big, .nodes = "[]", .stop_after = "query-named-block-nodes" };
                ASSERT_OK(qemu_query_disks(f.q, on_disks, &r, on_destroy));
                serve_disks(&f, &r, &s);
                ASSERT_EQ(r.n_handler, 0);
                ASSERT_EQ(s.n_nodes, 1);
                ASSERT_TRUE(fake_wait_failed(&held[0], 3 * SEC));
                ASSERT_ERRNO(held[0].fail_error, -E2BIG);
                for (size_t i = 1; i < N; i++)
                        ASSERT_EQ(held[i].n_failed, 0);
                fake_free(&f);
                ASSERT_EQ(r.n_destroy, 1);
                result_free(&r);
        }
        for (size_t i = 0; i < N; i++)
                fake_free(&held[i]);
        qmp_cost_set_grace(QMP_HOLD_GRACE_USEC);
}

/* QEMU 7.2 crashes in query-named-block-nodes while a finished job awaits dismissal (commit
 * abf16a0): then the disks come without node names for the chain, and the command is not sent. */
static void test_query_disks_with_finished_job(void) {
        _cleanup_free_ char *blocks = fake_load_text("query-block-chain3.json"),
                            *nodes = fake_load_text("query-named-block-nodes-chain3.json"),
                            *concluded = fake_load_text("query-block-jobs-cancelled.json"),
                            *running = fake_load_text("query-block-jobs-running.json");
        Result r = {};
        DisksScript s;
        Fake f;

        if (!setup(&f))
                return;
        s = (DisksScript){.jobs = concluded, .blocks = blocks, .nodes = nodes};
        ASSERT_OK(qemu_query_disks(f.q, on_disks, &r, on_destroy));
        serve_disks(&f, &r, &s);
        ASSERT_EQ(r.n_handler, 1);
        ASSERT_EQ(r.error, 0);
        ASSERT_EQ(r.n, 1);
        ASSERT_EQ(r.n_chain, 2);
        ASSERT_NULL(r.chain0_node);
        ASSERT_EQ(s.n_nodes, 0);
        ASSERT_EQ(r.n_destroy, 1);
        result_free(&r);

        /* A running job is no reason to skip them. */
        s = (DisksScript){.jobs = running, .blocks = blocks, .nodes = nodes};
        ASSERT_OK(qemu_query_disks(f.q, on_disks, &r, on_destroy));
        serve_disks(&f, &r, &s);
        ASSERT_EQ(r.error, 0);
        ASSERT_EQ(s.n_nodes, 1);
        ASSERT_STREQ(r.chain0_node, "#block165");
        result_free(&r);
        fake_free(&f);
}

static void test_query_jobs_call(void) {
        _cleanup_free_ char *jobs = fake_load_text("query-block-jobs-cancelled.json");
        Result r = {};
        json_object *cmd;
        Fake f;

        if (!setup(&f))
                return;
        ASSERT_OK(qemu_query_block_jobs(f.q, on_jobs, &r, on_destroy));
        cmd = fake_next_command(&f, 3 * SEC);
        ASSERT_STREQ(fake_command_name(cmd), "query-block-jobs");
        ASSERT_OK(fake_reply(&f, cmd, jobs));
        json_object_put(cmd);
        fake_run_until(&f, cond_result, &r, 3 * SEC);
        ASSERT_EQ(r.error, 0);
        ASSERT_EQ(r.n, 1);
        ASSERT_STREQ(r.job_id, "j1");
        ASSERT_EQ(r.n_destroy, 1);
        result_free(&r);

        ASSERT_OK(qemu_query_block_jobs(f.q, on_jobs, &r, on_destroy));
        cmd = fake_next_command(&f, 3 * SEC);
        ASSERT_OK(fake_reply(&f, cmd, "{\"not\": \"a list\"}"));
        json_object_put(cmd);
        fake_run_until(&f, cond_result, &r, 3 * SEC);
        ASSERT_NEG(r.error);
        ASSERT_EQ(r.n, 0);
        ASSERT_EQ(r.n_destroy, 1);
        ASSERT_EQ(f.n_failed, 0);
        result_free(&r);
        fake_free(&f);
}

static json_object *args_of(json_object *cmd) {
        json_object *a = NULL;
        json_object_object_get_ex(cmd, "arguments", &a);
        return a;
}

static const char *arg_str(json_object *cmd, const char *key) {
        json_object *v;
        if (!json_object_object_get_ex(args_of(cmd), key, &v) || !json_object_is_type(v, json_type_string))
                return NULL;
        return json_object_get_string(v);
}

static int64_t arg_int(json_object *cmd, const char *key) {
        json_object *v;
        if (!json_object_object_get_ex(args_of(cmd), key, &v) || !json_object_is_type(v, json_type_int))
                return -1;
        return json_object_get_int64(v);
}

static int arg_bool(json_object *cmd, const char *key) {
        json_object *v;
        if (!json_object_object_get_ex(args_of(cmd), key, &v) || !json_object_is_type(v, json_type_boolean))
                return -1;
        return json_object_get_boolean(v);
}

static void test_job_commands(void) {
        QemuStreamArgs a = {.job_id = "bsd-vda-1", .node_name = "top", .base_node = "#block354", .speed = 1 << 20};
        Result r = {};
        json_object *cmd;
        Fake f;

        if (!setup(&f))
                return;
        ASSERT_OK(qemu_block_stream(f.q, &a, on_result, &r, on_destroy));
        cmd = fake_next_command(&f, 3 * SEC);
        ASSERT_STREQ(fake_command_name(cmd), "block-stream");
        ASSERT_STREQ(arg_str(cmd, "job-id"), "bsd-vda-1");
        ASSERT_STREQ(arg_str(cmd, "device"), "top");
        ASSERT_STREQ(arg_str(cmd, "base-node"), "#block354");
        ASSERT_EQ(arg_int(cmd, "speed"), 1 << 20);
        ASSERT_EQ(arg_bool(cmd, "auto-dismiss"), 0); /* the outcome survives a daemon restart */
        ASSERT_EQ(arg_bool(cmd, "auto-finalize"), 0); /* the daemon flushes, then finalizes */
        ASSERT_OK(fake_reply(&f, cmd, "{}"));
        json_object_put(cmd);
        fake_run_until(&f, cond_result, &r, 3 * SEC);
        ASSERT_EQ(r.error, 0);
        ASSERT_EQ(r.n_destroy, 1);
        result_free(&r);

        /* Whole chain, unlimited: no base-node, no speed. */
        a.base_node = NULL;
        a.speed = 0;
        ASSERT_OK(qemu_block_stream(f.q, &a, on_result, &r, on_destroy));
        cmd = fake_next_command(&f, 3 * SEC);
        ASSERT_NULL(arg_str(cmd, "base-node"));
        ASSERT_EQ(arg_int(cmd, "speed"), -1);
        ASSERT_OK(fake_sendf(&f,
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Job ID 'bsd-vda-1' already in use\"}, \"id\": %" PRIi64
                "}\r\n",
                fake_command_id(cmd)));
        json_object_put(cmd);
        fake_run_until(&f, cond_result, &r, 3 * SEC);
        ASSERT_ERRNO(r.error, -EREMOTEIO);
        ASSERT_STREQ(r.desc, "Job ID 'bsd-vda-1' already in use");
        ASSERT_EQ(r.n_destroy, 1);
        result_free(&r);

        /* Out of QEMU's range: refused before sending, the caller keeps userdata. */
        a.speed = (uint64_t) INT64_MAX + 1;
        ASSERT_ERRNO(qemu_block_stream(f.q, &a, on_result, &r, on_destroy), -ERANGE);
        ASSERT_ERRNO(qemu_block_job_set_speed(f.q, "j", UINT64_MAX, on_result, &r, on_destroy), -ERANGE);
        ASSERT_EQ(r.n_destroy + r.n_handler, 0);

        ASSERT_OK(qemu_block_job_cancel(f.q, "bsd-vda-1", on_result, &r, on_destroy));
        cmd = fake_next_command(&f, 3 * SEC);
        ASSERT_STREQ(fake_command_name(cmd), "block-job-cancel");
        ASSERT_STREQ(arg_str(cmd, "device"), "bsd-vda-1");
        ASSERT_EQ(arg_bool(cmd, "force"), 1);
        json_object_put(cmd);

        ASSERT_OK(qemu_block_job_pause(f.q, "bsd-vda-1", NULL, NULL, NULL));
        cmd = fake_next_command(&f, 3 * SEC);
        ASSERT_STREQ(fake_command_name(cmd), "block-job-pause");
        ASSERT_STREQ(arg_str(cmd, "device"), "bsd-vda-1");
        json_object_put(cmd);

        ASSERT_OK(qemu_block_job_resume(f.q, "bsd-vda-1", NULL, NULL, NULL));
        cmd = fake_next_command(&f, 3 * SEC);
        ASSERT_STREQ(fake_command_name(cmd), "block-job-resume");
        json_object_put(cmd);

        ASSERT_OK(qemu_block_job_set_speed(f.q, "bsd-vda-1", 4096, NULL, NULL, NULL));
        cmd = fake_next_command(&f, 3 * SEC);
        ASSERT_STREQ(fake_command_name(cmd), "block-job-set-speed");
        ASSERT_EQ(arg_int(cmd, "speed"), 4096);
        json_object_put(cmd);

        ASSERT_OK(qemu_job_dismiss(f.q, "bsd-vda-1", NULL, NULL, NULL));
        cmd = fake_next_command(&f, 3 * SEC);
        ASSERT_STREQ(fake_command_name(cmd), "job-dismiss");
        ASSERT_STREQ(arg_str(cmd, "id"), "bsd-vda-1");
        json_object_put(cmd);

        /* The pending cancel is dropped with the client: destroy once, no handler. */
        fake_free(&f);
        ASSERT_EQ(r.n_handler, 0);
        ASSERT_EQ(r.n_destroy, 1);
        result_free(&r);

        /* Not connected: refused, nothing called. */
        {
                Fake g;
                ASSERT_OK(fake_new(&g));
                ASSERT_NEG(qemu_job_dismiss(g.q, "j", on_result, &r, on_destroy));
                ASSERT_NEG(qemu_query_disks(g.q, on_disks, &r, on_destroy));
                ASSERT_NEG(qemu_query_block_jobs(g.q, on_jobs, &r, on_destroy));
                ASSERT_EQ(r.n_destroy + r.n_handler, 0);
                fake_free(&g);
        }
}

/* The command and its arguments exactly as sent (json-c keeps the order keys were added in). */
static void expect_command(Fake *f, const char *name, const char *args) {
        json_object *cmd = fake_next_command(f, 3 * SEC), *a = NULL;

        ASSERT_STREQ(fake_command_name(cmd), name);
        if (args) {
                ASSERT_TRUE(json_object_object_get_ex(cmd, "arguments", &a));
                ASSERT_STREQ(json_object_to_json_string_ext(a, JSON_C_TO_STRING_PLAIN), args);
        } else
                ASSERT_FALSE(json_object_object_get_ex(cmd, "arguments", &a));
        json_object_put(cmd);
}

/* Finalizing a pending job: the node is flushed through HMP's qemu-io (QEMU 7.2 has no QMP
 * command for one node), whose answer is text: empty on success, QEMU's error otherwise. The node
 * name goes into a command line, so nothing but a valid name is sent. */
static void test_flush_node_and_finalize(void) {
        static const char *const bad[] = { NULL, "", "top flush; quit", "top\"", "1top", "top\nquit", "#", "a b" };
        Result r = {};
        json_object *cmd;
        Fake f;

        if (!setup(&f))
                return;
        for (size_t i = 0; i < ELEMENTSOF(bad); i++)
                ASSERT_ERRNO(qemu_flush_node(f.q, bad[i], on_result, &r, on_destroy), -EINVAL);
        ASSERT_EQ(r.n_destroy + r.n_handler, 0);

        ASSERT_OK(qemu_flush_node(f.q, "#block354", on_result, &r, on_destroy));
        cmd = fake_next_command(&f, 3 * SEC);
        ASSERT_STREQ(fake_command_name(cmd), "human-monitor-command");
        ASSERT_STREQ(arg_str(cmd, "command-line"), "qemu-io #block354 flush");
        ASSERT_OK(fake_reply(&f, cmd, "\"\""));
        json_object_put(cmd);
        fake_run_until(&f, cond_result, &r, 3 * SEC);
        ASSERT_EQ(r.error, 0);
        ASSERT_EQ(r.n_destroy, 1);
        result_free(&r);

        /* What qemu-io prints on failure is the error, made printable. */
        ASSERT_OK(qemu_flush_node(f.q, "top", on_result, &r, on_destroy));
        cmd = fake_next_command(&f, 3 * SEC);
        ASSERT_OK(fake_reply(&f, cmd, "\"Error: Cannot find device='' nor node-name='top'\\r\\n\""));
        json_object_put(cmd);
        fake_run_until(&f, cond_result, &r, 3 * SEC);
        ASSERT_ERRNO(r.error, -EIO);
        ASSERT_NOT_NULL(r.desc);
        if (r.desc)
                ASSERT_TRUE(strstr(r.desc, "Cannot find device") && !strchr(r.desc, '\r') && !strchr(r.desc, '\n'));
        result_free(&r);

        /* Anything else than text is no success either. */
        ASSERT_OK(qemu_flush_node(f.q, "top", on_result, &r, on_destroy));
        cmd = fake_next_command(&f, 3 * SEC);
        ASSERT_OK(fake_reply(&f, cmd, "{}"));
        json_object_put(cmd);
        fake_run_until(&f, cond_result, &r, 3 * SEC);
        ASSERT_NEG(r.error);
        result_free(&r);

        ASSERT_OK(qemu_job_finalize(f.q, "bsd-vda-1", NULL, NULL, NULL));
        cmd = fake_next_command(&f, 3 * SEC);
        ASSERT_STREQ(fake_command_name(cmd), "job-finalize");
        ASSERT_STREQ(arg_str(cmd, "id"), "bsd-vda-1");
        json_object_put(cmd);
        fake_free(&f);
}

/* Every typed command, to the letter, and the fd of those that pass one. */
static void test_command_builders(void) {
        QemuStreamArgs a = {.job_id = "j1", .node_name = "top", .backing_file = "/b.qcow2", .speed = 7};
        size_t fds;
        Fake f;

        if (!setup(&f))
                return;
        ASSERT_OK(qemu_block_stream(f.q, &a, NULL, NULL, NULL));
        expect_command(&f, "block-stream",
                "{\"job-id\":\"j1\",\"device\":\"top\",\"backing-file\":\"\\/b.qcow2\",\"speed\":7,"
                "\"auto-finalize\":false,\"auto-dismiss\":false,\"on-error\":\"enospc\"}");
        ASSERT_OK(qemu_block_job_cancel(f.q, "j1", NULL, NULL, NULL));
        expect_command(&f, "block-job-cancel", "{\"device\":\"j1\",\"force\":true}");
        ASSERT_OK(qemu_block_job_set_speed(f.q, "j1", 0, NULL, NULL, NULL));
        expect_command(&f, "block-job-set-speed", "{\"device\":\"j1\",\"speed\":0}");

        fds = f.n_fds;
        ASSERT_OK(qemu_add_fd(f.q, 3, open("/dev/null", O_RDONLY | O_CLOEXEC), "vda", NULL, NULL, NULL));
        expect_command(&f, "add-fd", "{\"fdset-id\":3,\"opaque\":\"vda\"}");
        ASSERT_OK(qemu_add_fd(f.q, 4, open("/dev/null", O_RDONLY | O_CLOEXEC), NULL, NULL, NULL, NULL));
        expect_command(&f, "add-fd", "{\"fdset-id\":4}");
        ASSERT_OK(qemu_getfd(f.q, "nbd0", open("/dev/null", O_RDONLY | O_CLOEXEC), NULL, NULL, NULL));
        expect_command(&f, "getfd", "{\"fdname\":\"nbd0\"}");
        ASSERT_EQ(f.n_fds, fds + 3);

        ASSERT_OK(qemu_blockdev_add_file(f.q, "f0", 3, true, NULL, NULL, NULL));
        expect_command(&f, "blockdev-add",
                "{\"driver\":\"file\",\"node-name\":\"f0\",\"filename\":\"\\/dev\\/fdset\\/3\",\"read-only\":true}");
        ASSERT_OK(qemu_blockdev_add_format(f.q, "qcow2", "q0", "f0", "q1", false, NULL, NULL, NULL));
        expect_command(&f, "blockdev-add",
                "{\"driver\":\"qcow2\",\"node-name\":\"q0\",\"file\":\"f0\",\"read-only\":false,\"backing\":\"q1\"}");
        ASSERT_OK(qemu_blockdev_add_format(f.q, "qcow2", "q1", "f1", NULL, true, NULL, NULL, NULL));
        expect_command(&f, "blockdev-add",
                "{\"driver\":\"qcow2\",\"node-name\":\"q1\",\"file\":\"f1\",\"read-only\":true,\"backing\":null}");
        ASSERT_OK(qemu_blockdev_add_format(f.q, "raw", "r0", "f2", NULL, true, NULL, NULL, NULL));
        expect_command(&f, "blockdev-add", "{\"driver\":\"raw\",\"node-name\":\"r0\",\"file\":\"f2\",\"read-only\":true}");
        ASSERT_OK(qemu_blockdev_add_cor(f.q, "cor0", "q0", "q1", NULL, NULL, NULL));
        expect_command(&f, "blockdev-add",
                "{\"driver\":\"copy-on-read\",\"node-name\":\"cor0\",\"file\":\"q0\",\"bottom\":\"q1\"}");
        ASSERT_OK(qemu_blockdev_add_cor(f.q, "cor1", "q0", NULL, NULL, NULL, NULL));
        expect_command(&f, "blockdev-add", "{\"driver\":\"copy-on-read\",\"node-name\":\"cor1\",\"file\":\"q0\"}");
        ASSERT_OK(qemu_blockdev_del(f.q, "cor0", NULL, NULL, NULL));
        expect_command(&f, "blockdev-del", "{\"node-name\":\"cor0\"}");

        /* The mirror: a new qcow2 in an fd set, QEMU's granularity (none sent), our buffer. */
        ASSERT_OK(qemu_drive_mirror_new(f.q, "m1", "top", 1000000001, false, "mq", 5, 8 << 20, NULL, NULL, NULL));
        expect_command(&f, "drive-mirror",
                "{\"job-id\":\"m1\",\"device\":\"top\",\"target\":\"\\/dev\\/fdset\\/1000000001\",\"format\":\"qcow2\","
                "\"mode\":\"absolute-paths\",\"node-name\":\"mq\",\"sync\":\"full\",\"speed\":5,\"buf-size\":8388608,"
                "\"auto-finalize\":false,\"auto-dismiss\":false}");
        /* Into an image the daemon formatted first (the overlay's options). */
        ASSERT_OK(qemu_drive_mirror_new(f.q, "m2", "top", 1000000002, true, "mq", 5, 8 << 20, NULL, NULL, NULL));
        expect_command(&f, "drive-mirror",
                "{\"job-id\":\"m2\",\"device\":\"top\",\"target\":\"json:{\\\"driver\\\":\\\"qcow2\\\",\\\"file\\\":{"
                "\\\"driver\\\":\\\"file\\\",\\\"filename\\\":\\\"\\/dev\\/fdset\\/1000000002\\\","
                "\\\"auto-read-only\\\":false}}\",\"format\":\"qcow2\","
                "\"mode\":\"existing\",\"node-name\":\"mq\",\"sync\":\"full\",\"speed\":5,\"buf-size\":8388608,"
                "\"auto-finalize\":false,\"auto-dismiss\":false}");

        /* max-connections always sent, 0 (no limit) too: QEMU's default differs between builds. */
        ASSERT_OK(qemu_nbd_server_start_fd(f.q, "nbd0", 0, NULL, NULL, NULL));
        expect_command(&f, "nbd-server-start",
                "{\"addr\":{\"type\":\"fd\",\"data\":{\"str\":\"nbd0\"}},\"max-connections\":0}");
        ASSERT_OK(qemu_nbd_server_start_fd(f.q, "nbd1", 768, NULL, NULL, NULL));
        expect_command(&f, "nbd-server-start",
                "{\"addr\":{\"type\":\"fd\",\"data\":{\"str\":\"nbd1\"}},\"max-connections\":768}");
        ASSERT_OK(qemu_block_export_add_nbd(f.q, "e0", "q0", "disk", NULL, NULL, NULL));
        expect_command(&f, "block-export-add",
                "{\"type\":\"nbd\",\"id\":\"e0\",\"node-name\":\"q0\",\"name\":\"disk\",\"writable\":false,"
                "\"allocation-depth\":true}");
        ASSERT_OK(qemu_block_export_del(f.q, "e0", NULL, NULL, NULL));
        expect_command(&f, "block-export-del", "{\"id\":\"e0\",\"mode\":\"hard\"}");
        ASSERT_OK(qemu_nbd_server_stop(f.q, NULL, NULL, NULL));
        expect_command(&f, "nbd-server-stop", NULL);
        ASSERT_OK(qemu_quit(f.q, NULL, NULL, NULL));
        expect_command(&f, "quit", NULL);
        fake_free(&f);
}

int main(int argc, char **argv) {
        tap_init(argc, argv);
        log_set_max_level(getenv("BSD_UNIT_DEBUG") ? LOG_LEVEL_DEBUG : -1);

        TAP_RUN(test_query_disks_call);
        TAP_RUN(test_query_disks_with_finished_job);
        TAP_RUN(test_query_block_reply_held_counts);
        TAP_RUN(test_query_jobs_call);
        TAP_RUN(test_job_commands);
        TAP_RUN(test_flush_node_and_finalize);
        TAP_RUN(test_command_builders);
        return tap_finish();
}
