/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* query-block-jobs, job events and the typed field accessors (service/qemu-reply.c): replies
 * captured from QEMU 7.2 (tests/unit/data/) and hostile variations of them. */

#include "fake-qemu.h"
#include "qemu.h"
#include "qmp.h"
#include "util.h"
#include "tap.h"
#include "test-qemu-fixtures.h"

static void test_block_jobs_fixtures(void) {
        static const struct {
                const char *file;
                QemuJobStatus status;
                uint64_t len, offset, speed;
                const char *error;
        } t[] = {
                {"query-block-jobs-running.json", QEMU_JOB_RUNNING, 268435456, 524288, 1048576, NULL},
                {"query-block-jobs-paused.json", QEMU_JOB_PAUSED, 268435456, 524288, 1048576, NULL},
                {"query-block-jobs-cancelled.json", QEMU_JOB_CONCLUDED, 268435456, 1048576, 1048576,
                        "Operation canceled"},
                {"query-block-jobs-completed.json", QEMU_JOB_CONCLUDED, 268435456, 268435456, 0, NULL},
                {"query-block-jobs-completed-empty.json", QEMU_JOB_CONCLUDED, 0, 0, 0, NULL},
        };

        for (size_t i = 0; i < ELEMENTSOF(t); i++) {
                _cleanup_(json_object_putp) json_object *o = load(t[i].file);
                QemuBlockJob *j = NULL;
                size_t n = 0;

                ASSERT_OK(qemu_parse_block_jobs(o, &j, &n));
                ASSERT_EQ(n, 1);
                if (n != 1)
                        continue;
                ASSERT_TRUE(streq(j[0].id, "j1") || streq(j[0].id, "j2") || streq(j[0].id, "j3"));
                ASSERT_STREQ(j[0].type, "stream");
                ASSERT_EQ(j[0].status, t[i].status);
                ASSERT_EQ_U64(j[0].len, t[i].len);
                ASSERT_EQ_U64(j[0].offset, t[i].offset);
                ASSERT_EQ_U64(j[0].speed, t[i].speed);
                ASSERT_STREQ(j[0].error, t[i].error);
                qemu_block_jobs_free(j, n);
        }
}

/* io-status says why QEMU paused a job on an error (on-error=enospc); as QEMU 7.2 reports a
 * stream paused on a full disk. */
static void test_block_jobs_io_status(void) {
        static const struct {
                const char *value;
                QemuIoStatus expect;
        } t[] = {
                {"\"nospace\"", QEMU_IO_NOSPACE},
                {"\"failed\"", QEMU_IO_FAILED},
                {"\"ok\"", QEMU_IO_OK},
                {"\"exploded\"", QEMU_IO_OK},
                {NULL, QEMU_IO_OK},
        };

        for (size_t i = 0; i < ELEMENTSOF(t); i++) {
                char text[512];
                QemuBlockJob *j = NULL;
                size_t n = 0;

                snprintf(text, sizeof(text),
                        "[{\"auto-finalize\": true, %s%s%s\"device\": \"bsd-vda-1\", \"auto-dismiss\": false, "
                        "\"busy\": false, \"len\": 33554432, \"offset\": 2621440, \"status\": \"paused\", "
                        "\"paused\": true, \"speed\": 0, \"ready\": false, \"type\": \"stream\"}]",
                        t[i].value ? "\"io-status\": " : "", strempty(t[i].value), t[i].value ? ", " : "");
                _cleanup_(json_object_putp) json_object *o = parse(text);
                ASSERT_OK(qemu_parse_block_jobs(o, &j, &n));
                ASSERT_EQ(n, 1);
                if (n == 1) {
                        ASSERT_EQ(j[0].status, QEMU_JOB_PAUSED);
                        ASSERT_EQ(j[0].io_status, t[i].expect);
                }
                qemu_block_jobs_free(j, n);
        }
}

static void test_block_jobs_invalid(void) {
        static const char *const bad[] = {
                "{}",
                "\"x\"",
                "[1]",
                "[null]",
                "[{\"type\": \"stream\", \"status\": \"running\", \"len\": 1, \"offset\": 0, \"speed\": 0}]",
                "[{\"device\": 1, \"type\": \"stream\", \"status\": \"running\", \"len\": 1, \"offset\": 0, \"speed\": 0}]",
                "[{\"device\": \"j\", \"status\": \"running\", \"len\": 1, \"offset\": 0, \"speed\": 0}]",
                "[{\"device\": \"j\", \"type\": \"stream\", \"len\": 1, \"offset\": 0, \"speed\": 0}]",
                "[{\"device\": \"j\", \"type\": \"stream\", \"status\": 3, \"len\": 1, \"offset\": 0, \"speed\": 0}]",
                "[{\"device\": \"j\", \"type\": \"stream\", \"status\": \"running\", \"len\": \"1\", \"offset\": 0, \"speed\": 0}]",
                "[{\"device\": \"j\", \"type\": \"stream\", \"status\": \"running\", \"len\": -1, \"offset\": 0, \"speed\": 0}]",
                "[{\"device\": \"j\", \"type\": \"stream\", \"status\": \"running\", \"len\": 1, \"offset\": 1.5, \"speed\": 0}]",
                "[{\"device\": \"j\", \"type\": \"stream\", \"status\": \"running\", \"len\": 1, \"offset\": 1e400, \"speed\": 0}]",
                "[{\"device\": \"j\", \"type\": \"stream\", \"status\": \"running\", \"len\": 18446744073709551616, \"offset\": 0, \"speed\": 0}]",
                "[{\"device\": \"j\", \"type\": \"stream\", \"status\": \"running\", \"len\": 1, \"offset\": 0}]",
                "[{\"device\": \"j\", \"type\": \"stream\", \"status\": \"running\", \"len\": 1, \"offset\": 0, \"speed\": 0, \"error\": 5}]",
                "[{\"device\": \"j\", \"type\": \"stream\", \"status\": \"paused\", \"len\": 1, \"offset\": 0, \"speed\": 0, \"io-status\": 5}]",
                "[{\"device\": \"j\\u0000k\", \"type\": \"stream\", \"status\": \"running\", \"len\": 1, \"offset\": 0, \"speed\": 0}]",
                /* A good one followed by a bad one: all or nothing. */
                "[{\"device\": \"j\", \"type\": \"stream\", \"status\": \"running\", \"len\": 1, \"offset\": 0, \"speed\": 0},"
                " {\"device\": \"k\"}]",
        };

        for (size_t i = 0; i < ELEMENTSOF(bad); i++) {
                _cleanup_(json_object_putp) json_object *o = parse(bad[i]);
                QemuBlockJob *j = NULL;
                size_t n = 0;
                int r = qemu_parse_block_jobs(o, &j, &n);
                if (r != -EBADMSG) {
                        TAP_FAIL("qemu_parse_block_jobs(%s) = %d, expected -EBADMSG", bad[i], r);
                        if (r >= 0)
                                qemu_block_jobs_free(j, n);
                }
        }

        /* Unknown status: accepted as unknown (QEMU may grow states). Empty list: fine. */
        {
                _cleanup_(json_object_putp) json_object *o = parse(
                        "[{\"device\": \"j\", \"type\": \"stream\", \"status\": \"exploded\", \"len\": 1, \"offset\": 0, \"speed\": 0}]");
                _cleanup_(json_object_putp) json_object *e = parse("[]");
                QemuBlockJob *j = NULL;
                size_t n = 0;
                ASSERT_OK(qemu_parse_block_jobs(o, &j, &n));
                if (n == 1)
                        ASSERT_EQ(j[0].status, QEMU_JOB_UNKNOWN);
                qemu_block_jobs_free(j, n);
                j = NULL;
                ASSERT_OK(qemu_parse_block_jobs(e, &j, &n));
                ASSERT_EQ(n, 0);
                qemu_block_jobs_free(j, n);
        }

        /* Too many. */
        {
                _cleanup_(json_object_putp) json_object *a = json_object_new_array();
                QemuBlockJob *j = NULL;
                size_t n = 0;
                for (size_t i = 0; i < QEMU_JOBS_MAX + 1; i++)
                        json_object_array_add(
                                a, parse("{\"device\": \"j\", \"type\": \"stream\", \"status\": \"running\", "
                                         "\"len\": 1, \"offset\": 0, \"speed\": 0}"));
                ASSERT_ERRNO(qemu_parse_block_jobs(a, &j, &n), -E2BIG);
        }
}

static void test_job_status_strings(void) {
        for (int s = QEMU_JOB_CREATED; s <= QEMU_JOB_NULL; s++)
                ASSERT_EQ(qemu_job_status_from_string(qemu_job_status_to_string((QemuJobStatus) s)), s);
        ASSERT_EQ(qemu_job_status_from_string("unknown"), QEMU_JOB_UNKNOWN);
        ASSERT_EQ(qemu_job_status_from_string(""), QEMU_JOB_UNKNOWN);
        ASSERT_EQ(qemu_job_status_from_string("RUNNING"), QEMU_JOB_UNKNOWN);
        ASSERT_STREQ(qemu_job_status_to_string((QemuJobStatus) 1000), "unknown");
        ASSERT_STREQ(qemu_job_status_to_string(QEMU_JOB_CONCLUDED), "concluded");
}

/* Job events */

static int parse_event(const char *name, const char *data, QemuJobEvent *ev) {
        _cleanup_(json_object_putp) json_object *o = parse(data);
        return qemu_parse_job_event(name, o, ev);
}

static void test_job_events_valid(void) {
        QemuJobEvent ev;
        json_object *o;

        /* Strings are borrowed: keep the data alive while looking. */
        o = parse("{\"status\": \"running\", \"id\": \"j1\"}");
        ASSERT_EQ(qemu_parse_job_event("JOB_STATUS_CHANGE", o, &ev), 1);
        ASSERT_EQ(ev.kind, QEMU_EVENT_JOB_STATUS_CHANGE);
        ASSERT_STREQ(ev.id, "j1");
        ASSERT_EQ(ev.status, QEMU_JOB_RUNNING);
        ASSERT_FALSE(ev.has_progress);
        json_object_put(o);

        o = parse(
                "{\"device\": \"j3\", \"len\": 268435456, \"offset\": 268435456, \"speed\": 0, \"type\": \"stream\"}");
        ASSERT_EQ(qemu_parse_job_event("BLOCK_JOB_COMPLETED", o, &ev), 1);
        ASSERT_EQ(ev.kind, QEMU_EVENT_BLOCK_JOB_COMPLETED);
        ASSERT_STREQ(ev.id, "j3");
        ASSERT_EQ_U64(ev.len, 268435456);
        ASSERT_EQ_U64(ev.offset, 268435456);
        ASSERT_TRUE(ev.has_progress);
        ASSERT_NULL(ev.error);
        json_object_put(o);

        o = parse("{\"device\": \"j2\", \"len\": 0, \"offset\": 0, \"speed\": 0, \"type\": \"stream\"}");
        ASSERT_EQ(qemu_parse_job_event("BLOCK_JOB_COMPLETED", o, &ev), 1);
        ASSERT_EQ_U64(ev.len, 0);
        ASSERT_TRUE(ev.has_progress);
        json_object_put(o);

        o = parse(
                "{\"device\": \"j4\", \"len\": 100, \"offset\": 50, \"speed\": 0, \"type\": \"stream\", \"error\": \"Input/output error\"}");
        ASSERT_EQ(qemu_parse_job_event("BLOCK_JOB_COMPLETED", o, &ev), 1);
        ASSERT_STREQ(ev.error, "Input/output error");
        json_object_put(o);

        o = parse(
                "{\"device\": \"j1\", \"len\": 268435456, \"offset\": 1048576, \"speed\": 1048576, \"type\": \"stream\"}");
        ASSERT_EQ(qemu_parse_job_event("BLOCK_JOB_CANCELLED", o, &ev), 1);
        ASSERT_EQ(ev.kind, QEMU_EVENT_BLOCK_JOB_CANCELLED);
        ASSERT_EQ_U64(ev.offset, 1048576);
        ASSERT_EQ_U64(ev.speed, 1048576);
        json_object_put(o);

        o = parse("{\"device\": \"j1\", \"operation\": \"read\", \"action\": \"report\"}");
        ASSERT_EQ(qemu_parse_job_event("BLOCK_JOB_ERROR", o, &ev), 1);
        ASSERT_EQ(ev.kind, QEMU_EVENT_BLOCK_JOB_ERROR);
        ASSERT_STREQ(ev.action, "report");
        json_object_put(o);

        o = parse("{\"device\": \"m1\", \"len\": 10, \"offset\": 10, \"speed\": 0, \"type\": \"mirror\"}");
        ASSERT_EQ(qemu_parse_job_event("BLOCK_JOB_READY", o, &ev), 1);
        ASSERT_EQ(ev.kind, QEMU_EVENT_BLOCK_JOB_READY);
        json_object_put(o);

        /* Not job events. */
        ASSERT_EQ(parse_event("STOP", "{}", &ev), 0);
        ASSERT_EQ(ev.kind, QEMU_EVENT_OTHER);
        ASSERT_EQ(parse_event("SHUTDOWN", "{\"guest\": false, \"reason\": \"host-qmp-quit\"}", &ev), 0);
        ASSERT_EQ(parse_event("job_status_change", "{\"status\": \"running\", \"id\": \"j1\"}", &ev), 0);

        /* Unknown status: parsed as unknown. */
        ASSERT_EQ(parse_event("JOB_STATUS_CHANGE", "{\"status\": \"exploded\", \"id\": \"j1\"}", &ev), 1);
        ASSERT_EQ(ev.status, QEMU_JOB_UNKNOWN);
}

static void test_job_events_invalid(void) {
        static const struct {
                const char *name, *data;
        } t[] = {
                {"JOB_STATUS_CHANGE", "{}"},
                {"JOB_STATUS_CHANGE", "{\"status\": \"running\"}"},
                {"JOB_STATUS_CHANGE", "{\"id\": \"j1\"}"},
                {"JOB_STATUS_CHANGE", "{\"status\": 1, \"id\": \"j1\"}"},
                {"JOB_STATUS_CHANGE", "{\"status\": \"running\", \"id\": 1}"},
                {"JOB_STATUS_CHANGE", "{\"status\": \"running\", \"id\": \"j\\u00001\"}"},
                {"BLOCK_JOB_COMPLETED", "{}"},
                {"BLOCK_JOB_COMPLETED", "{\"len\": 1, \"offset\": 1}"},
                {"BLOCK_JOB_COMPLETED", "{\"device\": \"j\", \"offset\": 1}"},
                {"BLOCK_JOB_COMPLETED", "{\"device\": \"j\", \"len\": 1}"},
                {"BLOCK_JOB_COMPLETED", "{\"device\": \"j\", \"len\": \"1\", \"offset\": 1}"},
                {"BLOCK_JOB_COMPLETED", "{\"device\": \"j\", \"len\": 1, \"offset\": -1}"},
                {"BLOCK_JOB_COMPLETED", "{\"device\": \"j\", \"len\": 1, \"offset\": 1e400}"},
                {"BLOCK_JOB_COMPLETED", "{\"device\": \"j\", \"len\": 1, \"offset\": 0.5}"},
                {"BLOCK_JOB_COMPLETED", "{\"device\": \"j\", \"len\": 99999999999999999999999, \"offset\": 1}"},
                {"BLOCK_JOB_COMPLETED", "{\"device\": \"j\", \"len\": 1, \"offset\": 1, \"speed\": \"fast\"}"},
                {"BLOCK_JOB_COMPLETED", "{\"device\": \"j\", \"len\": 1, \"offset\": 1, \"error\": 5}"},
                {"BLOCK_JOB_COMPLETED", "{\"device\": \"j\", \"len\": 1, \"offset\": 1, \"error\": \"a\\u0000b\"}"},
                {"BLOCK_JOB_CANCELLED", "{\"device\": [], \"len\": 1, \"offset\": 1}"},
                {"BLOCK_JOB_CANCELLED", "{\"device\": \"j\", \"len\": null, \"offset\": 1}"},
                {"BLOCK_JOB_ERROR", "{\"device\": \"j\"}"},
                {"BLOCK_JOB_ERROR", "{\"device\": \"j\", \"action\": 3}"},
        };
        QemuJobEvent ev;

        for (size_t i = 0; i < ELEMENTSOF(t); i++) {
                int r = parse_event(t[i].name, t[i].data, &ev);
                if (r != -EBADMSG)
                        TAP_FAIL("%s %s: got %d, expected -EBADMSG", t[i].name, t[i].data, r);
        }
}

/* QEMU's job error text becomes the job's Error: sanitized on the way in; job ids are names. */
static void test_jobs_hostile_text_and_ids(void) {
        QemuJobEvent ev;
        json_object *o;

        o = parse("{\"device\": \"j3\", \"len\": 1, \"offset\": 0, \"speed\": 0, \"type\": \"stream\", "
                  "\"error\": \"bad \\u001b[31mred\\u001b[0m\\nline \\u009b2J end\"}");
        ASSERT_EQ(qemu_parse_job_event("BLOCK_JOB_COMPLETED", o, &ev), 1);
        ASSERT_STREQ(ev.error, "bad  [31mred [0m line  2J end");
        json_object_put(o);

        ASSERT_EQ(parse_event("JOB_STATUS_CHANGE", "{\"status\": \"running\", \"id\": \"../x\"}", &ev), -EBADMSG);
        ASSERT_EQ(parse_event("BLOCK_JOB_COMPLETED", "{\"device\": \"a b\", \"len\": 1, \"offset\": 1}", &ev), -EBADMSG);
        ASSERT_EQ(parse_event("BLOCK_JOB_ERROR", "{\"device\": \"\", \"action\": \"stop\"}", &ev), -EBADMSG);

        {
                _cleanup_(json_object_putp) json_object *jobs = parse(
                        "[{\"device\": \"j\", \"type\": \"stream\", \"status\": \"concluded\", \"len\": 1, \"offset\": 0, "
                        "\"speed\": 0, \"error\": \"\\u001b]0;owned\\u0007x\"}]");
                QemuBlockJob *j = NULL;
                size_t n = 0;

                ASSERT_OK(qemu_parse_block_jobs(jobs, &j, &n));
                if (n == 1)
                        ASSERT_STREQ(j[0].error, " ]0;owned x");
                qemu_block_jobs_free(j, n);
        }
        {
                _cleanup_(json_object_putp) json_object *jobs = parse(
                        "[{\"device\": \"../../x\", \"type\": \"stream\", \"status\": \"running\", \"len\": 1, "
                        "\"offset\": 0, \"speed\": 0}]");
                QemuBlockJob *j = NULL;
                size_t n = 0;

                ASSERT_ERRNO(qemu_parse_block_jobs(jobs, &j, &n), -EBADMSG);
        }
        {
                const char *id = NULL;
                _cleanup_(json_object_putp) json_object *data = parse("{\"id\": \"../x\"}");

                ASSERT_EQ(qemu_parse_export_deleted("BLOCK_EXPORT_DELETED", data, &id), -EBADMSG);
        }
}

/* Accessors */

static void test_accessors(void) {
        _cleanup_(json_object_putp) json_object *o = parse(
                "{\"s\": \"str\", \"n\": 42, \"max\": 9223372036854775807, \"over\": 9223372036854775808, "
                "\"big\": 18446744073709551614, \"neg\": -1, \"d\": 1.5, \"b\": true, "
                "\"nul\": \"a\\u0000b\", \"null\": null, \"sat\": 18446744073709551615}");
        _cleanup_free_ char *long_str = NULL, *text = NULL;
        const char *s = "untouched";
        uint64_t u = 7;
        bool b = false;

        ASSERT_EQ(json_get_string(o, "s", true, &s), 1);
        ASSERT_STREQ(s, "str");
        s = "untouched";
        ASSERT_EQ(json_get_string(o, "missing", false, &s), 0);
        ASSERT_STREQ(s, "untouched");
        ASSERT_ERRNO(json_get_string(o, "missing", true, &s), -ENODATA);
        ASSERT_ERRNO(json_get_string(o, "n", false, &s), -EBADMSG);
        ASSERT_ERRNO(json_get_string(o, "nul", false, &s), -EBADMSG);
        ASSERT_ERRNO(json_get_string(o, "null", false, &s), -EBADMSG);

        ASSERT_EQ(json_get_u64(o, "n", true, &u), 1);
        ASSERT_EQ_U64(u, 42);
        /* QMP's integers are int64: beyond INT64_MAX is no value QEMU sends (and sums would wrap). */
        ASSERT_EQ(json_get_u64(o, "max", true, &u), 1);
        ASSERT_EQ_U64(u, 9223372036854775807ULL);
        ASSERT_ERRNO(json_get_u64(o, "over", true, &u), -EBADMSG);
        ASSERT_ERRNO(json_get_u64(o, "big", true, &u), -EBADMSG);
        /* The state file's inode numbers may be beyond 2^63: json_get_uint64() takes them. */
        ASSERT_EQ(json_get_uint64(o, "big", true, &u), 1);
        ASSERT_EQ_U64(u, 18446744073709551614ULL);
        ASSERT_ERRNO(json_get_uint64(o, "sat", true, &u), -EBADMSG);
        ASSERT_ERRNO(json_get_uint64(o, "neg", true, &u), -EBADMSG);
        u = 7;
        ASSERT_EQ(json_get_u64(o, "missing", false, &u), 0);
        ASSERT_EQ_U64(u, 7);
        ASSERT_ERRNO(json_get_u64(o, "missing", true, &u), -ENODATA);
        ASSERT_ERRNO(json_get_u64(o, "neg", true, &u), -EBADMSG);
        ASSERT_ERRNO(json_get_u64(o, "d", true, &u), -EBADMSG);
        ASSERT_ERRNO(json_get_u64(o, "s", true, &u), -EBADMSG);
        ASSERT_ERRNO(json_get_u64(o, "b", true, &u), -EBADMSG);
        ASSERT_ERRNO(json_get_u64(o, "sat", true, &u), -EBADMSG);

        ASSERT_EQ(json_get_bool(o, "b", true, &b), 1);
        ASSERT_TRUE(b);
        ASSERT_ERRNO(json_get_bool(o, "n", true, &b), -EBADMSG);
        ASSERT_ERRNO(json_get_bool(o, "missing", true, &b), -ENODATA);
        ASSERT_EQ(json_get_bool(o, "missing", false, &b), 0);

        /* QEMU_STRING_MAX: inclusive. */
        long_str = malloc(QEMU_STRING_MAX + 2);
        memset(long_str, 'x', QEMU_STRING_MAX + 1);
        long_str[QEMU_STRING_MAX + 1] = 0;
        json_object_object_add(o, "long", json_object_new_string(long_str));
        ASSERT_ERRNO(json_get_string(o, "long", true, &s), -EBADMSG);
        long_str[QEMU_STRING_MAX] = 0;
        json_object_object_add(o, "long", json_object_new_string(long_str));
        ASSERT_EQ(json_get_string(o, "long", true, &s), 1);

        /* Not an object at all. */
        {
                _cleanup_(json_object_putp) json_object *a = parse("[1]");
                ASSERT_ERRNO(json_get_string(a, "s", true, &s), -ENODATA);
        }
}

/* Typed calls against the fake QEMU */

/* ProvisionDisk's size probe: `qemu-img info --output=json` from a sandboxed qemu-img, bounded
 * before json-c builds anything. */
static void test_image_size(void) {
        static const char info[] = "{\"virtual-size\": 1073741824, \"filename\": \"nbd://h:1/a,b[{c\\\"\", "
                                   "\"format\": \"raw\", \"children\": [{\"name\": \"file\"}]}";
        _cleanup_free_ char *many = NULL, *nested = NULL;
        uint64_t size = 0;
        size_t n = 0;

        ASSERT_OK(qemu_parse_image_size(info, strlen(info), &size));
        ASSERT_EQ_U64(size, 1073741824ULL);
        ASSERT_ERRNO(qemu_parse_image_size("[]", 2, &size), -EBADMSG);
        ASSERT_ERRNO(qemu_parse_image_size("{\"virtual-size\": -1}", 19, &size), -EBADMSG);
        ASSERT_ERRNO(qemu_parse_image_size("{\"virtual-size\": 9223372036854775808}", 38, &size), -EBADMSG);

        /* 256 KiB of [{},{},...] (what the probe reads at most): some 87000 values, refused unparsed. */
        many = malloc(256 * 1024 + 1);
        if (!many) {
                TAP_FAIL("out of memory");
                return;
        }
        many[n++] = '[';
        while (n + 4 < 256 * 1024) {
                memcpy(many + n, "{},", 3);
                n += 3;
        }
        memcpy(many + n, "{}]", 3);
        n += 3;
        many[n] = 0;
        ASSERT_ERRNO(qemu_parse_image_size(many, n, &size), -E2BIG);

        /* Commas and brackets inside strings are no values: a long file name full of them parses. */
        nested = malloc(64 * 1024);
        if (!nested) {
                TAP_FAIL("out of memory");
                return;
        }
        n = (size_t) snprintf(nested, 64 * 1024, "{\"virtual-size\": 5, \"filename\": \"");
        for (; n < 60 * 1024; n++)
                nested[n] = n % 2 ? ',' : '[';
        n += (size_t) snprintf(nested + n, 64 * 1024 - n, "\"}");
        ASSERT_OK(qemu_parse_image_size(nested, n, &size));
        ASSERT_EQ_U64(size, 5);
}

int main(int argc, char **argv) {
        tap_init(argc, argv);
        log_set_max_level(getenv("BSD_UNIT_DEBUG") ? LOG_LEVEL_DEBUG : -1);

        TAP_RUN(test_jobs_hostile_text_and_ids);
        TAP_RUN(test_block_jobs_fixtures);
        TAP_RUN(test_block_jobs_invalid);
        TAP_RUN(test_block_jobs_io_status);
        TAP_RUN(test_job_status_strings);
        TAP_RUN(test_job_events_valid);
        TAP_RUN(test_job_events_invalid);
        TAP_RUN(test_accessors);
        TAP_RUN(test_image_size);
        return tap_finish();
}
