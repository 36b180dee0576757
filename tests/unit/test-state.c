/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* The export records of state.c: what a saved export reads back as, and that a record is
 * checked as untrusted input (it names a socket file and an NBD export) before anything uses
 * it; a bad file is removed, not retried at every start. */

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include "state.h"
#include "util.h"
#include "tap.h"

static char *make_tmpdir(void) {
        char *d = strdup("/tmp/bsd-unit-state-XXXXXX");

        if (!d || !mkdtemp(d)) {
                free(d);
                return NULL;
        }
        return d;
}

static void rm_rf_flat(const char *dir) {
        DIR *d = opendir(dir);
        struct dirent *de;

        if (!d)
                return;
        while ((de = readdir(d)))
                if (!streq(de->d_name, ".") && !streq(de->d_name, "..")) {
                        _cleanup_free_ char *p = strdup_printf("%s/%s", dir, de->d_name);
                        if (p)
                                (void) unlink(p);
                }
        closedir(d);
        (void) rmdir(dir);
}

typedef struct Loaded {
        StateExport e[4];
        size_t n;
} Loaded;

static int take(StateExport *e, void *userdata) {
        Loaded *l = userdata;

        if (l->n >= ELEMENTSOF(l->e))
                return -E2BIG;
        l->e[l->n++] = *e;
        *e = (StateExport) {};
        return 0;
}

static void loaded_done(Loaded *l) {
        for (size_t i = 0; i < l->n; i++)
                state_export_done(&l->e[i]);
}

static void test_roundtrip(void) {
        _cleanup_free_ char *top = make_tmpdir(), *dir = NULL, *file = NULL;
        StateExport in = { .id = 7, .guest = (char *) "vm1", .alias = (char *) "vda", .name = (char *) "vda-7",
                .listen = (char *) "tcp:[::1]:10809" };
        Loaded l = {};
        struct stat st;

        ASSERT_NOT_NULL(top);
        if (!top)
                return;
        /* The directory is made on the first save, root's only. */
        dir = strdup_printf("%s/exports", top);
        ASSERT_OK(state_export_save(dir, &in));
        ASSERT_OK(stat(dir, &st));
        ASSERT_EQ(st.st_mode & 07777, 0700);
        file = strdup_printf("%s/7.json", dir);
        ASSERT_OK(stat(file, &st));
        ASSERT_EQ(st.st_mode & 07777, 0600);

        ASSERT_OK(state_export_load(dir, take, &l));
        ASSERT_EQ(l.n, 1);
        if (l.n == 1) {
                ASSERT_EQ(l.e[0].id, 7);
                ASSERT_STREQ(l.e[0].guest, "vm1");
                ASSERT_STREQ(l.e[0].alias, "vda");
                ASSERT_STREQ(l.e[0].name, "vda-7");
                ASSERT_STREQ(l.e[0].listen, "tcp:[::1]:10809");
        }
        loaded_done(&l);

        ASSERT_OK(state_export_remove(dir, 7));
        ASSERT_OK(state_export_remove(dir, 7)); /* gone already: fine */
        l = (Loaded) {};
        ASSERT_OK(state_export_load(dir, take, &l));
        ASSERT_EQ(l.n, 0);
        rm_rf_flat(dir);
        rm_rf_flat(top);
}

static void test_missing_dir(void) {
        Loaded l = {};

        /* No export ever saved: nothing to load, no error. */
        ASSERT_OK(state_export_load("/nonexistent/bsd-unit-state/exports", take, &l));
        ASSERT_EQ(l.n, 0);
}

static int parse(const char *json, const char *file_name) {
        _cleanup_(json_object_putp) json_object *o = json_tokener_parse(json);
        StateExport e = {};
        int r;

        r = state_export_from_json(o, file_name, &e);
        state_export_done(&e);
        return r;
}

#define RECORD(id, guest, disk, name, listen) \
        "{\"version\":1,\"id\":" id ",\"guest\":\"" guest "\",\"disk\":\"" disk "\",\"name\":\"" name \
        "\",\"listen\":\"" listen "\"}"

static void test_hostile_records(void) {
        ASSERT_OK(parse(RECORD("3", "vm1", "vda", "vda", "unix"), "3.json"));
        /* The file name is the id. */
        ASSERT_ERRNO(parse(RECORD("3", "vm1", "vda", "vda", "unix"), "4.json"), -EBADMSG);
        ASSERT_ERRNO(parse(RECORD("3", "vm1", "vda", "vda", "unix"), "03.json"), -EBADMSG);
        ASSERT_ERRNO(parse(RECORD("0", "vm1", "vda", "vda", "unix"), "0.json"), -EBADMSG);
        ASSERT_ERRNO(parse(RECORD("4294967295", "vm1", "vda", "vda", "unix"), "4294967295.json"), -EBADMSG);
        ASSERT_ERRNO(parse(RECORD("-1", "vm1", "vda", "vda", "unix"), "-1.json"), -EBADMSG);
        /* The alias names a socket file in the guest's runtime directory: an identifier only. */
        ASSERT_ERRNO(parse(RECORD("3", "vm1", "../../../x", "vda", "unix"), "3.json"), -EBADMSG);
        ASSERT_ERRNO(parse(RECORD("3", "vm1", "a/b", "vda", "unix"), "3.json"), -EBADMSG);
        ASSERT_ERRNO(parse(RECORD("3", "vm1", "", "vda", "unix"), "3.json"), -EBADMSG);
        /* The guest names a directory too. */
        ASSERT_ERRNO(parse(RECORD("3", "..", "vda", "vda", "unix"), "3.json"), -EBADMSG);
        ASSERT_ERRNO(parse(RECORD("3", "a/b", "vda", "vda", "unix"), "3.json"), -EBADMSG);
        /* Printable, no space, bounded. */
        ASSERT_ERRNO(parse(RECORD("3", "vm1", "vda", "vda x", "unix"), "3.json"), -EBADMSG);
        ASSERT_ERRNO(parse(RECORD("3", "vm1", "vda", "vda\\n", "unix"), "3.json"), -EBADMSG);
        ASSERT_ERRNO(parse(RECORD("3", "vm1", "vda", "vda", "tcp:127.0.0.1:1 "), "3.json"), -EBADMSG);
        ASSERT_ERRNO(parse(RECORD("3", "vm1", "vda", "vda",
                                   "tcp:127.0.0.1:10809xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"),
                             "3.json"),
                -EBADMSG);
        /* Types and missing fields. */
        ASSERT_ERRNO(parse("{\"version\":1,\"id\":\"3\",\"guest\":\"vm1\",\"disk\":\"vda\",\"name\":\"vda\","
                           "\"listen\":\"unix\"}",
                             "3.json"),
                -EBADMSG);
        ASSERT_ERRNO(parse("{\"version\":1,\"id\":3,\"guest\":\"vm1\",\"disk\":\"vda\",\"name\":\"vda\"}", "3.json"),
                -EBADMSG);
        /* Another daemon's format (a downgrade): not judged. */
        ASSERT_ERRNO(parse("{\"version\":2,\"id\":3,\"guest\":\"vm1\",\"disk\":\"vda\",\"name\":\"vda\","
                           "\"listen\":\"unix\"}",
                             "3.json"),
                -EPROTONOSUPPORT);
        ASSERT_ERRNO(parse("[]", "3.json"), -EBADMSG);
}

/* A handed-over export's record keeps its pins: a restarted daemon's storage helper opens only
 * the files the guest's QEMU had open. */
static void test_handoff_pins(void) {
        _cleanup_free_ char *dir = make_tmpdir();
        StateExportPin pins[] = { { .alias = (char *) "vda", .dev = 2049, .ino = 1234567, .writable = true, .uid = 107 },
                { .alias = (char *) "vdb", .dev = UINT64_C(1) << 40, .ino = 1 } };
        StateExport in = { .id = 9, .guest = (char *) "vm1", .guest_uuid = (char *) "5d1c7f0e-aaaa-4bbb-8ccc-0123456789ab",
                .guest_owner = 1001, .alias = (char *) "vda", .name = (char *) "vda", .listen = (char *) "unix",
                .pins = pins, .n_pins = ELEMENTSOF(pins) };
        Loaded l = {};

        ASSERT_NOT_NULL(dir);
        if (!dir)
                return;
        ASSERT_OK(state_export_save(dir, &in));
        ASSERT_OK(state_export_load(dir, take, &l));
        ASSERT_EQ(l.n, 1);
        if (l.n == 1) {
                /* Whose guest it was: a guest registered later under its name is not it. */
                ASSERT_STREQ(l.e[0].guest_uuid, "5d1c7f0e-aaaa-4bbb-8ccc-0123456789ab");
                ASSERT_EQ(l.e[0].guest_owner, 1001);
                ASSERT_EQ(l.e[0].n_pins, 2);
                if (l.e[0].n_pins == 2) {
                        ASSERT_STREQ(l.e[0].pins[0].alias, "vda");
                        ASSERT_EQ(l.e[0].pins[0].dev, 2049);
                        ASSERT_EQ(l.e[0].pins[0].ino, 1234567);
                        ASSERT_TRUE(l.e[0].pins[0].writable);
                        ASSERT_EQ(l.e[0].pins[0].uid, 107); /* the QEMU's, whose rights read the chain */
                        ASSERT_EQ(l.e[0].pins[1].uid, 0);
                        ASSERT_STREQ(l.e[0].pins[1].alias, "vdb");
                        ASSERT_EQ(l.e[0].pins[1].dev, UINT64_C(1) << 40);
                        ASSERT_FALSE(l.e[0].pins[1].writable);
                }
        }
        loaded_done(&l);
        rm_rf_flat(dir);

#define PINNED(pins) \
        "{\"version\":1,\"id\":3,\"guest\":\"vm1\",\"disk\":\"vda\",\"name\":\"vda\",\"listen\":\"unix\"," \
        "\"handoff_pins\":" pins "}"
        ASSERT_OK(parse(PINNED("[{\"disk\":\"vda\",\"dev\":1,\"ino\":2}]"), "3.json"));
        ASSERT_OK(parse(PINNED("[{\"disk\":\"vda\",\"dev\":1,\"ino\":2,\"uid\":4294967294}]"), "3.json"));
        ASSERT_ERRNO(parse(PINNED("[{\"disk\":\"vda\",\"dev\":1,\"ino\":2,\"uid\":4294967295}]"), "3.json"),
                -EBADMSG);
        ASSERT_ERRNO(parse(PINNED("[{\"disk\":\"vda\",\"dev\":1,\"ino\":2,\"uid\":-1}]"), "3.json"), -EBADMSG);
        ASSERT_ERRNO(parse("{\"version\":1,\"id\":3,\"guest\":\"vm1\",\"disk\":\"vda\",\"name\":\"vda\","
                           "\"listen\":\"unix\",\"guest_owner\":\"0\"}", "3.json"), -EBADMSG);
        ASSERT_OK(parse(PINNED("[{\"disk\":\"vda\",\"dev\":1,\"ino\":2,\"writable\":false}]"), "3.json"));
        ASSERT_ERRNO(parse(PINNED("[{\"disk\":\"vda\",\"dev\":1,\"ino\":2,\"writable\":1}]"), "3.json"), -EBADMSG);
        ASSERT_ERRNO(parse(PINNED("[]"), "3.json"), -EBADMSG);
        ASSERT_ERRNO(parse(PINNED("{}"), "3.json"), -EBADMSG);
        ASSERT_ERRNO(parse(PINNED("[1]"), "3.json"), -EBADMSG);
        ASSERT_ERRNO(parse(PINNED("[{\"disk\":\"../x\",\"dev\":1,\"ino\":2}]"), "3.json"), -EBADMSG);
        ASSERT_ERRNO(parse(PINNED("[{\"disk\":\"vda\",\"dev\":-1,\"ino\":2}]"), "3.json"), -EBADMSG);
        ASSERT_ERRNO(parse(PINNED("[{\"disk\":\"vda\",\"dev\":1}]"), "3.json"), -EBADMSG);
        ASSERT_ERRNO(parse(PINNED("[{\"disk\":\"vda\",\"dev\":1,\"ino\":\"2\"}]"), "3.json"), -EBADMSG);
        ASSERT_ERRNO(parse(PINNED("[{\"disk\":\"vda\",\"dev\":1,\"ino\":2},{\"disk\":\"vda\",\"dev\":1,\"ino\":3}]"),
                             "3.json"),
                -EBADMSG);
}

static void test_bad_file_is_removed(void) {
        _cleanup_free_ char *dir = make_tmpdir(), *bad = NULL, *good = NULL, *newer = NULL;
        StateExport in = { .id = 2, .guest = (char *) "vm1", .alias = (char *) "vda", .name = (char *) "vda",
                .listen = (char *) "unix" };
        /* A valid record but for its alias. */
        const char *bad_text = "{\"version\":1,\"id\":5,\"guest\":\"vm1\",\"disk\":\"../x\",\"name\":\"x\","
                               "\"listen\":\"unix\"}";
        const char *newer_text = "{\"version\":2,\"id\":7,\"guest\":\"vm1\",\"disk\":\"vda\",\"name\":\"vda\","
                                 "\"listen\":\"unix\"}";
        Loaded l = {};

        ASSERT_NOT_NULL(dir);
        if (!dir)
                return;
        bad = strdup_printf("%s/5.json", dir);
        good = strdup_printf("%s/2.json", dir);
        newer = strdup_printf("%s/7.json", dir);
        ASSERT_OK(write_file_atomic(bad, bad_text, strlen(bad_text), 0600));
        ASSERT_OK(write_file_atomic(newer, newer_text, strlen(newer_text), 0600));
        ASSERT_OK(state_export_save(dir, &in));
        ASSERT_OK(state_export_load(dir, take, &l));
        ASSERT_EQ(l.n, 1);
        if (l.n == 1)
                ASSERT_EQ(l.e[0].id, 2);
        ASSERT_ERRNO(access(bad, F_OK) < 0 ? -errno : 0, -ENOENT);
        ASSERT_OK(access(good, F_OK));
        /* Of another format version: skipped, and kept for the daemon that wrote it. */
        ASSERT_OK(access(newer, F_OK));
        loaded_done(&l);
        rm_rf_flat(dir);
}

/* A mirror's pivot record in a guest's file ("QEMU calls it /dev/fdset/N, it is this path"):
 * read back as written, and refused unless it names an fd set and an absolute path. */
static int parse_guest_pivot(const char *pivot, StateGuest *ret) {
        _cleanup_free_ char *json = strdup_printf(
                "{\"version\":1,\"name\":\"vm1\",\"uuid\":\"\",\"qmp_socket\":\"/run/vm1/qmp.sock\",\"owner\":0,"
                "\"job_seq\":1,\"disks\":[{\"alias\":\"vda\",\"node_name\":\"n\",\"path\":\"/img/top.qcow2\","
                "\"format\":\"qcow2\",\"chain\":[],\"chain_nodes\":[],\"size\":1048576,\"cluster_size\":65536,"
                "\"bandwidth\":0,\"job\":{\"state\":\"idle\",\"mode\":\"\",\"offset\":0,\"length\":0,\"done\":0,"
                "\"total\":0,\"bandwidth\":0,\"start_time\":0}%s%s}]}",
                pivot ? ",\"pivot\":" : "", pivot ?: "");
        _cleanup_(json_object_putp) json_object *o = json ? json_tokener_parse(json) : NULL;

        if (!o)
                return -EINVAL;
        return state_guest_from_json(o, "vm1.json", ret);
}

static void test_pivot_record(void) {
        StateGuest g = {};

        ASSERT_OK(parse_guest_pivot(NULL, &g));
        ASSERT_NULL(g.n_disks == 1 ? g.disks[0].pivot_qemu_name : "no disk");
        state_guest_done(&g);
        ASSERT_OK(parse_guest_pivot(
                "{\"qemu_name\":\"/dev/fdset/1503132418\",\"path\":\"/img/top.qcow2\",\"dev\":2049,\"ino\":77}", &g));
        if (g.n_disks == 1) {
                ASSERT_STREQ(g.disks[0].pivot_qemu_name, "/dev/fdset/1503132418");
                ASSERT_STREQ(g.disks[0].pivot_path, "/img/top.qcow2");
                ASSERT_EQ(g.disks[0].pivot_dev, 2049);
                ASSERT_EQ(g.disks[0].pivot_ino, 77);
        }
        state_guest_done(&g);
        /* Not an fd set, not absolute, a path that climbs, missing or mistyped fields. */
        ASSERT_ERRNO(parse_guest_pivot("{\"qemu_name\":\"/etc/shadow\",\"path\":\"/img/a\",\"dev\":1,\"ino\":1}", &g),
                -EBADMSG);
        state_guest_done(&g);
        ASSERT_ERRNO(parse_guest_pivot("{\"qemu_name\":\"/dev/fdset/\",\"path\":\"/img/a\",\"dev\":1,\"ino\":1}", &g),
                -EBADMSG);
        state_guest_done(&g);
        ASSERT_ERRNO(parse_guest_pivot("{\"qemu_name\":\"/dev/fdset/1/x\",\"path\":\"/img/a\",\"dev\":1,\"ino\":1}", &g),
                -EBADMSG);
        state_guest_done(&g);
        ASSERT_ERRNO(parse_guest_pivot("{\"qemu_name\":\"/dev/fdset/1\",\"path\":\"img/a\",\"dev\":1,\"ino\":1}", &g),
                -EBADMSG);
        state_guest_done(&g);
        ASSERT_ERRNO(parse_guest_pivot("{\"qemu_name\":\"/dev/fdset/1\",\"path\":\"/img/../a\",\"dev\":1,\"ino\":1}", &g),
                -EBADMSG);
        state_guest_done(&g);
        ASSERT_ERRNO(parse_guest_pivot("{\"qemu_name\":\"/dev/fdset/1\",\"path\":\"/img/a\",\"dev\":1}", &g), -EBADMSG);
        state_guest_done(&g);
        ASSERT_ERRNO(parse_guest_pivot("\"/dev/fdset/1\"", &g), -EBADMSG);
        state_guest_done(&g);
}

/* A guest record of one disk, alias over node, with job (a job object's JSON) and the disk's other
 * fields extra (",\"key\":value..."), loaded into *ret. */
static int parse_record(const char *alias, const char *node, const char *job, const char *extra, StateGuest *ret) {
        _cleanup_free_ char *json = strdup_printf(
                "{\"version\":1,\"name\":\"vm1\",\"uuid\":\"\",\"qmp_socket\":\"/run/vm1/qmp.sock\",\"owner\":0,"
                "\"job_seq\":1,\"disks\":[{\"alias\":\"%s\",\"node_name\":\"%s\",\"path\":\"/img/top.qcow2\","
                "\"format\":\"qcow2\",\"chain\":[],\"chain_nodes\":[],\"size\":1048576,\"cluster_size\":65536,"
                "\"bandwidth\":0,\"job\":%s%s}]}",
                alias, node, job, extra);
        _cleanup_(json_object_putp) json_object *o = json ? json_tokener_parse(json) : NULL;

        if (!o)
                return -EINVAL;
        return state_guest_from_json(o, "vm1.json", ret);
}

/* A disk's backing chain in a guest's record is checked as QEMU's reply was: a name with a byte
 * sd-bus refuses (an older daemon took U+FFFF from QEMU) made BackingChain, and GetManagedObjects
 * for everyone, fail from the restart on (review 34c). */
static int parse_guest_chain(const char *chain) {
        _cleanup_free_ char *json = strdup_printf(
                "{\"version\":1,\"name\":\"vm1\",\"uuid\":\"\",\"qmp_socket\":\"/run/vm1/qmp.sock\",\"owner\":0,"
                "\"job_seq\":1,\"disks\":[{\"alias\":\"vda\",\"node_name\":\"n\",\"path\":\"/img/top.qcow2\","
                "\"format\":\"qcow2\",\"chain\":[\"%s\"],\"chain_nodes\":[\"n1\"],\"size\":1048576,"
                "\"cluster_size\":65536,\"bandwidth\":0,\"job\":{\"state\":\"idle\",\"mode\":\"\",\"offset\":0,"
                "\"length\":0,\"done\":0,\"total\":0,\"bandwidth\":0,\"start_time\":0}}]}",
                chain);
        _cleanup_(json_object_putp) json_object *o = json ? json_tokener_parse(json) : NULL;
        StateGuest g = {};
        int r;

        if (!o)
                return -EINVAL;
        r = state_guest_from_json(o, "vm1.json", &g);
        state_guest_done(&g);
        return r;
}

static void test_chain_record(void) {
        ASSERT_OK(parse_guest_chain("/img/base.qcow2"));
        ASSERT_OK(parse_guest_chain("/img/caf\\u00e9 \\ufffd.qcow2"));
        ASSERT_ERRNO(parse_guest_chain("/img/a\\uffff.qcow2"), -EBADMSG);
        ASSERT_ERRNO(parse_guest_chain("/img/a\\ufdd0.qcow2"), -EBADMSG);
        ASSERT_ERRNO(parse_guest_chain("/img/a\\u0000b.qcow2"), -EBADMSG);
}

/* A disk's alias and node name in a guest's record: checked as where they came from (QEMU,
 * RegisterGuest): the alias names socket files ("%s/%s-%u.nbd") and nodes. An idle job. */
static int parse_guest_disk_with(const char *alias, const char *node, const char *extra) {
        StateGuest g = {};
        int r;

        r = parse_record(alias, node,
                "{\"state\":\"idle\",\"mode\":\"\",\"offset\":0,\"length\":0,\"done\":0,\"total\":0,"
                "\"bandwidth\":0,\"start_time\":0}",
                extra, &g);
        state_guest_done(&g);
        return r;
}

static int parse_guest_disk(const char *alias, const char *node) {
        return parse_guest_disk_with(alias, node, "");
}

static void test_disk_names_record(void) {
        ASSERT_OK(parse_guest_disk("vda", "n"));
        ASSERT_OK(parse_guest_disk("virtio-disk0", "#block123"));
        ASSERT_OK(parse_guest_disk("vda", "")); /* not known yet */
        ASSERT_ERRNO(parse_guest_disk("../../x", "n"), -EBADMSG);
        ASSERT_ERRNO(parse_guest_disk("a/b", "n"), -EBADMSG);
        ASSERT_ERRNO(parse_guest_disk("", "n"), -EBADMSG);
        ASSERT_ERRNO(parse_guest_disk("vda", "a b"), -EBADMSG);
        ASSERT_ERRNO(parse_guest_disk("vda", "../n"), -EBADMSG);
}

/* A job's base and a range's bottom are node names of the chain, QEMU's own ("#block354" on a
 * -drive guest) as well as given ones: a guest whose stream kept such a base was dropped at the
 * next start ("State file … is invalid"). */
static void test_job_base_record(void) {
        ASSERT_OK(parse_guest_disk_with("vda", "n", ",\"job_base\":\"#block354\""));
        ASSERT_OK(parse_guest_disk_with("vda", "n", ",\"job_base\":\"base-node\""));
        ASSERT_OK(parse_guest_disk_with("vda", "n", ",\"range_bottom\":\"#block12\""));
        ASSERT_ERRNO(parse_guest_disk_with("vda", "n", ",\"job_base\":\"#\""), -EBADMSG);
        ASSERT_ERRNO(parse_guest_disk_with("vda", "n", ",\"job_base\":\"../n\""), -EBADMSG);
        ASSERT_ERRNO(parse_guest_disk_with("vda", "n", ",\"job_base\":\"##block1\""), -EBADMSG);
        ASSERT_ERRNO(parse_guest_disk_with("vda", "n", ",\"range_bottom\":\"a b\""), -EBADMSG);
}

/* Who started a range or prefetch job (their share), and whether it ran in the guest-latency mode:
 * read back; absent (a record from before) as "not known"; anything else refused. */
/* A running range job with job_extra among its fields. */
static int parse_job_fields(const char *job_extra, const char *disk_extra, StateGuest *ret) {
        _cleanup_free_ char *job = strdup_printf(
                "{\"state\":\"running\",\"mode\":\"range\",\"offset\":0,\"length\":65536,\"done\":0,"
                "\"total\":65536,\"bandwidth\":0,\"start_time\":1%s}",
                job_extra);

        return job ? parse_record("vda", "n", job, disk_extra, ret) : -ENOMEM;
}

static void test_job_caller_and_latency_mode(void) {
        StateGuest g = {};

        ASSERT_OK(parse_job_fields(",\"caller\":1002", ",\"job_latency_mode\":true", &g));
        if (g.n_disks == 1) {
                ASSERT_EQ(g.disks[0].job.caller, 1002);
                ASSERT_EQ(g.disks[0].job_latency_mode, 1);
        }
        state_guest_done(&g);
        g = (StateGuest) {};
        ASSERT_OK(parse_job_fields("", ",\"job_latency_mode\":false", &g));
        if (g.n_disks == 1) {
                ASSERT_EQ(g.disks[0].job.caller, UID_INVALID);
                ASSERT_EQ(g.disks[0].job_latency_mode, 0);
        }
        state_guest_done(&g);
        g = (StateGuest) {};
        ASSERT_OK(parse_job_fields("", "", &g));
        if (g.n_disks == 1)
                ASSERT_EQ(g.disks[0].job_latency_mode, -1);
        state_guest_done(&g);
        g = (StateGuest) {};
        ASSERT_ERRNO(parse_job_fields(",\"caller\":4294967296", "", &g), -EBADMSG);
        state_guest_done(&g);
        g = (StateGuest) {};
        ASSERT_ERRNO(parse_job_fields(",\"caller\":\"0\"", "", &g), -EBADMSG);
        state_guest_done(&g);
        g = (StateGuest) {};
        ASSERT_ERRNO(parse_job_fields("", ",\"job_latency_mode\":1", &g), -EBADMSG);
        state_guest_done(&g);
}

/* The storage helper's identity in a guest's record (extra: its fields, or ""): read back as
 * written; a malformed one is dropped (0: a fresh one is allocated when needed), never a reason
 * to lose the guest. */
static int parse_guest_storage(const char *extra, StateGuest *ret) {
        _cleanup_free_ char *json = strdup_printf(
                "{\"version\":1,\"name\":\"vm1\",\"uuid\":\"\",\"qmp_socket\":\"\",\"offline\":true,\"owner\":0,"
                "\"job_seq\":1,\"helper_uid\":2147418112,\"mcs_c1\":3,\"mcs_c2\":9,\"disks\":[]%s}",
                extra);
        _cleanup_(json_object_putp) json_object *o = json ? json_tokener_parse(json) : NULL;

        if (!o)
                return -EINVAL;
        return state_guest_from_json(o, "vm1.json", ret);
}

static void test_storage_identity_record(void) {
        static const char *const bad[] = {
                ",\"storage_uid\":-1,\"storage_mcs_c1\":4,\"storage_mcs_c2\":7",
                ",\"storage_uid\":\"2147418113\",\"storage_mcs_c1\":4,\"storage_mcs_c2\":7",
                ",\"storage_uid\":4294967295,\"storage_mcs_c1\":4,\"storage_mcs_c2\":7",
                ",\"storage_uid\":18446744073709551616,\"storage_mcs_c1\":4,\"storage_mcs_c2\":7",
                ",\"storage_uid\":2147418113,\"storage_mcs_c1\":4,\"storage_mcs_c2\":5000",
                ",\"storage_uid\":2147418113,\"storage_mcs_c1\":null,\"storage_mcs_c2\":7",
                "",
        };
        StateGuest g = {};

        ASSERT_OK(parse_guest_storage(",\"storage_uid\":2147418113,\"storage_mcs_c1\":4,\"storage_mcs_c2\":7", &g));
        ASSERT_EQ(g.storage_uid, 2147418113u);
        ASSERT_EQ(g.storage_mcs_c1, 4u);
        ASSERT_EQ(g.storage_mcs_c2, 7u);
        ASSERT_EQ(g.helper_uid, 2147418112u);
        state_guest_done(&g);
        for (size_t i = 0; i < ELEMENTSOF(bad); i++) {
                ASSERT_OK(parse_guest_storage(bad[i], &g));
                ASSERT_EQ(g.storage_uid, 0u);
                ASSERT_EQ(g.storage_mcs_c1, 0u);
                ASSERT_EQ(g.storage_mcs_c2, 0u);
                /* The guest's helpers keep theirs. */
                ASSERT_EQ(g.helper_uid, 2147418112u);
                ASSERT_EQ(g.mcs_c1, 3u);
                state_guest_done(&g);
        }
}

int main(int argc, char **argv) {
        tap_init(argc, argv);
        TAP_RUN(test_roundtrip);
        TAP_RUN(test_missing_dir);
        TAP_RUN(test_hostile_records);
        TAP_RUN(test_handoff_pins);
        TAP_RUN(test_bad_file_is_removed);
        TAP_RUN(test_pivot_record);
        TAP_RUN(test_disk_names_record);
        TAP_RUN(test_chain_record);
        TAP_RUN(test_job_base_record);
        TAP_RUN(test_job_caller_and_latency_mode);
        TAP_RUN(test_storage_identity_record);
        return tap_finish();
}
