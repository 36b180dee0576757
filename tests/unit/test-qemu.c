/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* The typed QEMU layer: parsers on replies captured from QEMU 7.2 (tests/unit/data/) and on
 * hostile variations of them, and the typed calls against a scripted QEMU. */

#include "fake-qemu.h"
#include "qemu.h"
#include "qmp.h"
#include "util.h"
#include "tap.h"

#define SEC USEC_PER_SEC
#define MSEC USEC_PER_MSEC

static json_object *parse(const char *text) {
        json_object *o = json_tokener_parse(text);
        if (!o && !streq(text, "null"))
                TAP_FAIL("fixture does not parse: %s", text);
        return o;
}

static json_object *load(const char *name) {
        json_object *o = fake_load_json(name);
        if (!o)
                TAP_FAIL("cannot load fixture %s", name);
        return o;
}

/* The object at a path of keys ("inserted", "image", ...) inside blocks[0]. */
static json_object *block0(json_object *blocks, const char *const *path) {
        json_object *o = json_object_array_get_idx(blocks, 0);

        for (; o && *path; path++)
                if (!json_object_object_get_ex(o, *path, &o))
                        return NULL;
        return o;
}

/* Disks */

static void test_disks_chain3(void) {
        _cleanup_(json_object_putp) json_object *blocks = load("query-block-chain3.json"),
                                                *nodes = load("query-named-block-nodes-chain3.json");
        QemuDisk *d = NULL;
        size_t n = 99;

        ASSERT_OK(qemu_parse_disks(blocks, nodes, &d, &n));
        ASSERT_EQ(n, 1);
        if (n != 1 || !d)
                return;
        ASSERT_STREQ(d[0].alias, "vda");
        ASSERT_STREQ(d[0].node_name, "top");
        ASSERT_STREQ(d[0].filename, "/tmp/exp/top.qcow2");
        ASSERT_STREQ(d[0].format, "qcow2");
        ASSERT_EQ_U64(d[0].virtual_size, 268435456);
        ASSERT_EQ_U64(d[0].cluster_size, 65536);
        ASSERT_FALSE(d[0].read_only);
        ASSERT_EQ(d[0].n_chain, 2);
        if (d[0].n_chain == 2) {
                /* Nearest first; the format node (qcow2), not the protocol node ("file") below it. */
                ASSERT_STREQ(d[0].chain[0].filename, "/tmp/exp/mid.qcow2");
                ASSERT_STREQ(d[0].chain[0].format, "qcow2");
                ASSERT_STREQ(d[0].chain[0].node_name, "#block165");
                ASSERT_STREQ(d[0].chain[1].filename, "/tmp/exp/base.qcow2");
                ASSERT_STREQ(d[0].chain[1].format, "qcow2");
                ASSERT_STREQ(d[0].chain[1].node_name, "#block354");
        }
        qemu_disks_free(d, n);
}

static void test_disks_format_node_chosen(void) {
        _cleanup_(json_object_putp) json_object *blocks = load("query-block-chain3.json"),
                                                *nodes = load("query-named-block-nodes-chain3.json"),
                                                *reversed = json_object_new_array(),
                                                *protocol_only = json_object_new_array();
        QemuDisk *d = NULL;
        size_t n = 0, k = json_object_array_length(nodes);

        /* Protocol nodes listed before their format nodes must not win. */
        for (size_t i = k; i > 0; i--)
                json_object_array_add(reversed, json_object_get(json_object_array_get_idx(nodes, i - 1)));
        ASSERT_OK(qemu_parse_disks(blocks, reversed, &d, &n));
        if (n == 1 && d[0].n_chain == 2) {
                ASSERT_STREQ(d[0].chain[0].node_name, "#block165");
                ASSERT_STREQ(d[0].chain[1].node_name, "#block354");
        } else
                TAP_FAIL("unexpected disks: n=%zu", n);
        qemu_disks_free(d, n);

        /* Only protocol nodes: no node name rather than the wrong one. */
        for (size_t i = 0; i < k; i++) {
                json_object *o = json_object_array_get_idx(nodes, i), *drv;
                if (json_object_object_get_ex(o, "drv", &drv) && streq(json_object_get_string(drv), "file"))
                        json_object_array_add(protocol_only, json_object_get(o));
        }
        d = NULL;
        n = 0;
        ASSERT_OK(qemu_parse_disks(blocks, protocol_only, &d, &n));
        if (n == 1 && d[0].n_chain == 2) {
                ASSERT_NULL(d[0].chain[0].node_name);
                ASSERT_NULL(d[0].chain[1].node_name);
        } else
                TAP_FAIL("unexpected disks: n=%zu", n);
        qemu_disks_free(d, n);

        /* No node list at all. */
        d = NULL;
        n = 0;
        ASSERT_OK(qemu_parse_disks(blocks, NULL, &d, &n));
        ASSERT_EQ(n, 1);
        if (n == 1 && d[0].n_chain == 2)
                ASSERT_NULL(d[0].chain[0].node_name);
        qemu_disks_free(d, n);
}

static void test_disks_empty_drive_skipped(void) {
        _cleanup_(json_object_putp) json_object *blocks = load("query-block-cdrom.json"),
                                                *nodes = load("query-named-block-nodes-cdrom.json"),
                                                *empty = json_object_new_array();
        QemuDisk *d = NULL;
        size_t n = 0;

        /* An empty CD-ROM drive (no "inserted") and a read-only disk without backing. */
        ASSERT_OK(qemu_parse_disks(blocks, nodes, &d, &n));
        ASSERT_EQ(n, 1);
        if (n == 1) {
                ASSERT_STREQ(d[0].alias, "vdb");
                ASSERT_STREQ(d[0].node_name, "b0");
                ASSERT_STREQ(d[0].filename, "/tmp/exp/base.qcow2");
                ASSERT_TRUE(d[0].read_only);
                ASSERT_EQ(d[0].n_chain, 0);
        }
        qemu_disks_free(d, n);

        /* No disks at all. */
        d = NULL;
        n = 99;
        ASSERT_OK(qemu_parse_disks(empty, empty, &d, &n));
        ASSERT_EQ(n, 0);
        qemu_disks_free(d, n);
}

static void test_disks_streamed(void) {
        _cleanup_(json_object_putp) json_object *blocks = load("query-block-streamed.json");
        QemuDisk *d = NULL;
        size_t n = 0;

        ASSERT_OK(qemu_parse_disks(blocks, NULL, &d, &n));
        ASSERT_EQ(n, 1);
        if (n == 1)
                ASSERT_EQ(d[0].n_chain, 0);
        qemu_disks_free(d, n);
}

/* Replace the value at path (under blocks[0]) with the JSON value text; NULL text: remove. */
static int parse_mutated(const char *const *path, const char *key, const char *value) {
        _cleanup_(json_object_putp) json_object *blocks = load("query-block-chain3.json"),
                                                *nodes = load("query-named-block-nodes-chain3.json");
        json_object *parent = block0(blocks, path);
        QemuDisk *d = NULL;
        size_t n = 0;
        int r;

        if (!parent) {
                TAP_FAIL("fixture path missing for key %s", key);
                return 0;
        }
        if (value)
                json_object_object_add(parent, key, parse(value));
        else
                json_object_object_del(parent, key);
        r = qemu_parse_disks(blocks, nodes, &d, &n);
        if (r >= 0)
                qemu_disks_free(d, n);
        return r;
}

static void test_disks_wrong_types(void) {
        static const char *const root[] = {NULL};
        static const char *const ins[] = {"inserted", NULL};
        static const char *const img[] = {"inserted", "image", NULL};
        static const char *const back[] = {"inserted", "image", "backing-image", NULL};
        static const char *const back2[] = {"inserted", "image", "backing-image", "backing-image", NULL};
        static const struct {
                const char *const *path;
                const char *key;
                const char *value;
        } t[] = {
                {img, "virtual-size", "\"268435456\""},
                {img, "virtual-size", "-1"},
                {img, "virtual-size", "-9223372036854775808"},
                {img, "virtual-size", "268435456.0"},
                {img, "virtual-size", "2.5e8"},
                {img, "virtual-size", "1e400"},
                {img, "virtual-size", "18446744073709551616"},
                {img, "virtual-size", "99999999999999999999999"},
                {img, "virtual-size", "null"},
                {img, "virtual-size", "true"},
                {img, "virtual-size", "{}"},
                {img, "virtual-size", NULL},
                {img, "cluster-size", "\"65536\""},
                {img, "cluster-size", "-65536"},
                {img, "cluster-size", "0.5"},
                {img, "filename", NULL},
                {img, "filename", "42"},
                {img, "filename", "\"\""},
                {img, "filename", "\"/a\\u0000b\""},
                {img, "format", NULL},
                {img, "format", "\"\""},
                {img, "format", "[]"},
                {img, "backing-image", "\"/tmp/exp/mid.qcow2\""},
                {img, "backing-image", "[]"},
                {back, "filename", NULL},
                {back, "filename", "1"},
                {back, "format", "{}"},
                {back2, "format", NULL},
                {back2, "filename", "\"x\\u0000\""},
                {ins, "image", NULL},
                {ins, "image", "\"top.qcow2\""},
                {ins, "node-name", NULL},
                {ins, "node-name", "7"},
                {ins, "ro", "\"false\""},
                {ins, "ro", "0"},
                {root, "inserted", "\"yes\""},
                {root, "inserted", "[]"},
                {root, "qdev", "42"},
                {root, "device", "[]"},
        };

        for (size_t i = 0; i < ELEMENTSOF(t); i++) {
                int r = parse_mutated(t[i].path, t[i].key, t[i].value);
                if (r != -EBADMSG)
                        TAP_FAIL("%s = %s: qemu_parse_disks() = %d, expected -EBADMSG", t[i].key,
                                t[i].value ?: "(removed)", r);
        }

        /* And these are fine. */
        ASSERT_OK(parse_mutated(img, "cluster-size", NULL));
        ASSERT_OK(parse_mutated(img, "virtual-size", "9223372036854775807"));
        ASSERT_OK(parse_mutated(ins, "ro", NULL));
        ASSERT_OK(parse_mutated(root, "qdev", NULL));
}

static void test_disks_bad_containers(void) {
        _cleanup_(json_object_putp) json_object *blocks = load("query-block-chain3.json"),
                                                *nodes = load("query-named-block-nodes-chain3.json"),
                                                *obj = json_object_new_object(), *arr = json_object_new_array();
        QemuDisk *d = NULL;
        size_t n = 0;

        ASSERT_ERRNO(qemu_parse_disks(obj, nodes, &d, &n), -EBADMSG);
        ASSERT_ERRNO(qemu_parse_disks(blocks, obj, &d, &n), -EBADMSG);
        ASSERT_ERRNO(qemu_parse_disks(NULL, nodes, &d, &n), -EBADMSG);
        json_object_array_add(arr, json_object_new_string("disk"));
        ASSERT_ERRNO(qemu_parse_disks(arr, nodes, &d, &n), -EBADMSG);

        /* Garbage entries in the node list are skipped, not trusted. */
        {
                _cleanup_(json_object_putp) json_object *junk = parse(
                        "[42, \"x\", null, {\"node-name\": 1, \"drv\": \"qcow2\", \"file\": \"/tmp/exp/mid.qcow2\"},"
                        " {\"node-name\": \"evil\", \"drv\": [], \"file\": \"/tmp/exp/mid.qcow2\"}]");
                ASSERT_OK(qemu_parse_disks(blocks, junk, &d, &n));
                if (n == 1 && d[0].n_chain == 2)
                        ASSERT_NULL(d[0].chain[0].node_name);
                qemu_disks_free(d, n);
        }
}

static void test_disks_duplicate_alias(void) {
        _cleanup_(json_object_putp) json_object *blocks = load("query-block-chain3.json"),
                                                *nodes = load("query-named-block-nodes-chain3.json");
        json_object *copy = NULL, *ins;
        QemuDisk *d = NULL;
        size_t n = 0;

        ASSERT_OK(json_object_deep_copy(json_object_array_get_idx(blocks, 0), &copy, NULL));
        /* Another node, same qdev id. */
        if (json_object_object_get_ex(copy, "inserted", &ins))
                json_object_object_add(ins, "node-name", json_object_new_string("other"));
        json_object_array_add(blocks, copy);
        ASSERT_ERRNO(qemu_parse_disks(blocks, nodes, &d, &n), -EBADMSG);
}

static void test_disks_alias_fallbacks(void) {
        static const struct {
                const char *qdev;   /* NULL: absent */
                const char *device; /* NULL: absent */
                const char *alias;  /* NULL: refused */
        } t[] = {
                {"/machine/peripheral/vda/virtio-backend", "", "vda"},
                {"/machine/peripheral/disk0", "", "disk0"},
                {NULL, "drive0", "drive0"},
                {"", "drive0", "drive0"},
                {"/machine/peripheral-anon/device[0]/virtio-backend", "", "top"},
                {"/machine/peripheral-anon/device[0]/virtio-backend", "ide0-hd0", "ide0-hd0"},
                {NULL, NULL, "top"},
                {"/machine/peripheral//virtio-backend", "", "top"},
                {"/machine/peripheral/v da/virtio-backend", "", NULL},
                {"/machine/peripheral/../virtio-backend", "", NULL},
        };

        for (size_t i = 0; i < ELEMENTSOF(t); i++) {
                _cleanup_(json_object_putp) json_object *blocks = load("query-block-chain3.json");
                json_object *b = json_object_array_get_idx(blocks, 0);
                QemuDisk *d = NULL;
                size_t n = 0;
                int r;

                json_object_object_del(b, "qdev");
                json_object_object_del(b, "device");
                if (t[i].qdev)
                        json_object_object_add(b, "qdev", json_object_new_string(t[i].qdev));
                if (t[i].device)
                        json_object_object_add(b, "device", json_object_new_string(t[i].device));
                r = qemu_parse_disks(blocks, NULL, &d, &n);
                if (!t[i].alias) {
                        if (r != -EBADMSG)
                                TAP_FAIL("qdev=%s: got %d, expected -EBADMSG", t[i].qdev, r);
                } else if (r < 0 || n != 1)
                        TAP_FAIL("qdev=%s device=%s: got %d", strempty(t[i].qdev), strempty(t[i].device), r);
                else if (!streq(d[0].alias, t[i].alias))
                        TAP_FAIL("qdev=%s device=%s: alias %s, expected %s", strempty(t[i].qdev), strempty(t[i].device),
                                d[0].alias, t[i].alias);
                if (r >= 0)
                        qemu_disks_free(d, n);
        }
}

/* Names QEMU reports become socket paths, object paths, URIs, polkit details and QEMU arguments:
 * one that is not a valid QEMU name is refused wherever it sits, also a node name that doubles as
 * the alias (issue 9, item 9). */
static void test_disks_hostile_names(void) {
        static const char *const ins[] = {"inserted", NULL};
        static const char *const bad_nodes[] = {"../../x", "..", ".", "a/b", "x y", "#", "#../x", "vda\n", "-x"};

        for (size_t i = 0; i < ELEMENTSOF(bad_nodes); i++) {
                _cleanup_free_ char *v = strdup_printf("\"%s\"", bad_nodes[i]);
                _cleanup_(json_object_putp) json_object *blocks = load("query-block-chain3.json"),
                                                        *nodes = load("query-named-block-nodes-chain3.json");
                json_object *b = json_object_array_get_idx(blocks, 0), *in = block0(blocks, ins);
                QemuDisk *d = NULL;
                size_t n = 0;
                int r;

                /* With a qdev id: the node name alone. */
                ASSERT_NOT_NULL(v);
                if (!v || !in)
                        continue;
                json_object_object_add(in, "node-name", json_object_new_string(bad_nodes[i]));
                r = qemu_parse_disks(blocks, nodes, &d, &n);
                if (r != -EBADMSG) {
                        TAP_FAIL("node-name %s with qdev vda: got %d, expected -EBADMSG", bad_nodes[i], r);
                        if (r >= 0)
                                qemu_disks_free(d, n);
                }
                /* Without one: the node name is the alias too. */
                json_object_object_del(b, "qdev");
                json_object_object_del(b, "device");
                r = qemu_parse_disks(blocks, nodes, &d, &n);
                if (r != -EBADMSG) {
                        TAP_FAIL("node-name %s as the alias: got %d, expected -EBADMSG", bad_nodes[i], r);
                        if (r >= 0)
                                qemu_disks_free(d, n);
                }
        }

        /* A BlockBackend name that is no valid id. */
        {
                _cleanup_(json_object_putp) json_object *blocks = load("query-block-chain3.json");
                json_object *b = json_object_array_get_idx(blocks, 0);
                QemuDisk *d = NULL;
                size_t n = 0;

                json_object_object_del(b, "qdev");
                json_object_object_add(b, "device", json_object_new_string("../../tmp/x"));
                ASSERT_ERRNO(qemu_parse_disks(blocks, NULL, &d, &n), -EBADMSG);
        }

        /* A chain node whose name is no valid node name is not taken for one of the chain. */
        {
                _cleanup_(json_object_putp) json_object *blocks = load("query-block-chain3.json"),
                                                        *nodes = parse(
                                                                "[{\"node-name\": \"../evil\", \"drv\": \"qcow2\", \"file\": \"/tmp/exp/mid.qcow2\"}]");
                QemuDisk *d = NULL;
                size_t n = 0;

                ASSERT_OK(qemu_parse_disks(blocks, nodes, &d, &n));
                ASSERT_EQ(n, 1);
                if (n == 1 && d[0].n_chain == 2)
                        ASSERT_NULL(d[0].chain[0].node_name);
                qemu_disks_free(d, n);
        }
}

/* A synthetic disk with a chain of depth images below the top. */
static json_object *make_chain(size_t depth) {
        json_object *image = NULL, *blocks, *block, *inserted;

        for (size_t i = depth + 1; i > 0; i--) {
                json_object *o = json_object_new_object();
                char name[64];

                snprintf(name, sizeof(name), "/img/%zu.qcow2", i - 1);
                json_object_object_add(o, "filename", json_object_new_string(name));
                json_object_object_add(o, "format", json_object_new_string("qcow2"));
                json_object_object_add(o, "virtual-size", json_object_new_int64(1 << 30));
                if (image)
                        json_object_object_add(o, "backing-image", image);
                image = o;
        }
        inserted = json_object_new_object();
        json_object_object_add(inserted, "node-name", json_object_new_string("top"));
        json_object_object_add(inserted, "image", image);
        block = json_object_new_object();
        json_object_object_add(block, "device", json_object_new_string(""));
        json_object_object_add(block, "qdev", json_object_new_string("/machine/peripheral/vda/virtio-backend"));
        json_object_object_add(block, "inserted", inserted);
        blocks = json_object_new_array();
        json_object_array_add(blocks, block);
        return blocks;
}

static void test_disks_chain_max(void) {
        _cleanup_(json_object_putp) json_object *ok = make_chain(QEMU_CHAIN_MAX),
                                                *deep = make_chain(QEMU_CHAIN_MAX + 1), *deeper = make_chain(5000);
        QemuDisk *d = NULL;
        size_t n = 0;

        ASSERT_OK(qemu_parse_disks(ok, NULL, &d, &n));
        ASSERT_EQ(n, 1);
        if (n == 1) {
                ASSERT_EQ(d[0].n_chain, QEMU_CHAIN_MAX);
                ASSERT_STREQ(d[0].chain[0].filename, "/img/1.qcow2");
                ASSERT_STREQ(d[0].chain[QEMU_CHAIN_MAX - 1].filename, "/img/128.qcow2");
        }
        qemu_disks_free(d, n);
        ASSERT_ERRNO(qemu_parse_disks(deep, NULL, &d, &n), -E2BIG);
        ASSERT_ERRNO(qemu_parse_disks(deeper, NULL, &d, &n), -E2BIG);
}

/* The deepest chain the parser accepts must also get through the QMP layer's nesting limit,
 * with the nesting a real query-block reply has (format-specific data inside each image). */
static void test_chain_max_fits_qmp_depth(void) {
        _cleanup_(json_object_putp) json_object *blocks = make_chain(QEMU_CHAIN_MAX);
        json_object *img = block0(blocks, (const char *const[]){"inserted", "image", NULL});
        _cleanup_free_ char *msg = NULL;
        Fake f;

        while (img) {
                json_object *fs = json_object_new_object(), *data = json_object_new_object(),
                            *bitmaps = json_object_new_array(), *bm = json_object_new_object(),
                            *flags = json_object_new_array();
                json_object_array_add(flags, json_object_new_string("auto"));
                json_object_object_add(bm, "flags", flags);
                json_object_array_add(bitmaps, bm);
                json_object_object_add(data, "bitmaps", bitmaps);
                json_object_object_add(fs, "type", json_object_new_string("qcow2"));
                json_object_object_add(fs, "data", data);
                json_object_object_add(img, "format-specific", fs);
                if (!json_object_object_get_ex(img, "backing-image", &img))
                        break;
        }
        msg = strdup_printf("{\"event\": \"X\", \"data\": {\"reply\": %s}}\r\n",
                json_object_to_json_string_ext(blocks, JSON_C_TO_STRING_PLAIN));
        ASSERT_OK(fake_new(&f));
        ASSERT_OK(fake_handshake(&f));
        ASSERT_OK(qmp_feed(f.q, msg, strlen(msg)));
        ASSERT_EQ(f.n_failed, 0);
        ASSERT_EQ(f.n_events, 1);
        fake_free(&f);
}

static void test_disks_limits(void) {
        _cleanup_(json_object_putp) json_object *blocks = json_object_new_array(), *nodes = json_object_new_array(),
                                                *one = load("query-block-chain3.json");
        QemuDisk *d = NULL;
        size_t n = 0;

        for (size_t i = 0; i < QEMU_DISKS_MAX + 1; i++)
                json_object_array_add(blocks, json_object_new_object());
        ASSERT_ERRNO(qemu_parse_disks(blocks, NULL, &d, &n), -E2BIG);
        for (size_t i = 0; i < QEMU_NODES_MAX + 1; i++)
                json_object_array_add(nodes, json_object_new_object());
        ASSERT_NEG(qemu_parse_disks(one, nodes, &d, &n));
        /* An object in place of a block entry that has no "inserted" is an error, not a skip. */
        {
                _cleanup_(json_object_putp) json_object *a = parse("[null]");
                ASSERT_ERRNO(qemu_parse_disks(a, NULL, &d, &n), -EBADMSG);
        }
}

/* Block jobs */

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
                "{\"s\": \"str\", \"n\": 42, \"big\": 18446744073709551614, \"neg\": -1, \"d\": 1.5, \"b\": true, "
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
        ASSERT_EQ(json_get_u64(o, "big", true, &u), 1);
        ASSERT_EQ_U64(u, 18446744073709551614ULL);
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

/* Chain images find their nodes through an index built once: the most a QEMU may send (256 disks,
 * 128 images each, 4096 nodes, names near the string cap) costs one pass over the nodes. Matching
 * by a scan of every node for every image took 32768 x 4096 string checks of 4 KiB: minutes, far
 * beyond this test's timeout (the bound is structural: the work, not a clock). */
static void test_disks_many_nodes_linear(void) {
        enum { N_DISKS = QEMU_DISKS_MAX, DEPTH = QEMU_CHAIN_MAX, N_NODES = QEMU_NODES_MAX };
        _cleanup_(json_object_putp) json_object *blocks = json_object_new_array(), *nodes = json_object_new_array();
        json_object *match[N_NODES], *miss[N_NODES];
        _cleanup_free_ char *pad = malloc(QEMU_STRING_MAX);
        size_t n = 0, wrong = 0, found = 0, expected = 0;
        QemuDisk *d = NULL;

        if (!blocks || !nodes || !pad) {
                TAP_FAIL("out of memory");
                return;
        }
        /* Long names that differ only at their end: every comparison reads all of them. */
        memset(pad, 'p', QEMU_STRING_MAX - 32);
        pad[QEMU_STRING_MAX - 32] = 0;
        for (size_t k = 0; k < N_NODES; k++) {
                _cleanup_free_ char *f = strdup_printf("/images/%s/%zu.qcow2", pad, k);
                _cleanup_free_ char *g = strdup_printf("/images/%s/%zu.gone", pad, k);
                _cleanup_free_ char *name = strdup_printf("n%zu", k);
                json_object *node = json_object_new_object();

                match[k] = json_object_new_string(f);
                miss[k] = json_object_new_string(g);
                json_object_object_add(node, "file", json_object_get(match[k]));
                json_object_object_add(node, "drv", json_object_new_string("qcow2"));
                json_object_object_add(node, "node-name", json_object_new_string(name));
                json_object_array_add(nodes, node);
        }
        for (size_t i = 0; i < N_DISKS; i++) {
                _cleanup_free_ char *qdev = strdup_printf("/machine/peripheral/vd%zu/virtio-backend", i);
                _cleanup_free_ char *top = strdup_printf("top%zu", i);
                json_object *image = NULL, *block = json_object_new_object(), *inserted = json_object_new_object();

                /* Built from the bottom up; one image in eight is a node QEMU lists. */
                for (size_t j = DEPTH + 1; j > 0; j--) {
                        size_t idx = i * (DEPTH + 1) + j - 1;
                        json_object *o = json_object_new_object();

                        json_object_object_add(o, "filename",
                                json_object_get(idx % 8 == 0 ? match[(idx / 8) % N_NODES] : miss[idx % N_NODES]));
                        json_object_object_add(o, "format", json_object_new_string("qcow2"));
                        json_object_object_add(o, "virtual-size", json_object_new_int64(1 << 30));
                        if (image)
                                json_object_object_add(o, "backing-image", image);
                        image = o;
                }
                json_object_object_add(inserted, "node-name", json_object_new_string(top));
                json_object_object_add(inserted, "image", image);
                json_object_object_add(block, "qdev", json_object_new_string(qdev));
                json_object_object_add(block, "inserted", inserted);
                json_object_array_add(blocks, block);
        }
        for (size_t k = 0; k < N_NODES; k++) {
                json_object_put(match[k]);
                json_object_put(miss[k]);
        }

        ASSERT_OK(qemu_parse_disks(blocks, nodes, &d, &n));
        ASSERT_EQ(n, N_DISKS);
        for (size_t i = 0; d && i < n; i++) {
                if (d[i].n_chain != DEPTH) {
                        wrong++;
                        continue;
                }
                for (size_t j = 0; j < d[i].n_chain; j++) {
                        size_t idx = i * (DEPTH + 1) + j + 1;
                        _cleanup_free_ char *want = idx % 8 == 0 ? strdup_printf("n%zu", (idx / 8) % N_NODES) : NULL;

                        expected += want != NULL;
                        if (!streq_ptr(d[i].chain[j].node_name, want))
                                wrong++;
                        else if (want)
                                found++;
                }
        }
        ASSERT_EQ(wrong, 0);
        ASSERT_EQ(found, expected);
        ASSERT_TRUE(expected > 0);
        qemu_disks_free(d, n);
}

int main(int argc, char **argv) {
        tap_init(argc, argv);
        log_set_max_level(getenv("BSD_UNIT_DEBUG") ? LOG_LEVEL_DEBUG : -1);

        TAP_RUN(test_disks_chain3);
        TAP_RUN(test_disks_format_node_chosen);
        TAP_RUN(test_disks_many_nodes_linear);
        TAP_RUN(test_disks_empty_drive_skipped);
        TAP_RUN(test_disks_streamed);
        TAP_RUN(test_disks_wrong_types);
        TAP_RUN(test_disks_bad_containers);
        TAP_RUN(test_disks_duplicate_alias);
        TAP_RUN(test_disks_alias_fallbacks);
        TAP_RUN(test_disks_hostile_names);
        TAP_RUN(test_jobs_hostile_text_and_ids);
        TAP_RUN(test_disks_chain_max);
        TAP_RUN(test_chain_max_fits_qmp_depth);
        TAP_RUN(test_disks_limits);
        TAP_RUN(test_block_jobs_fixtures);
        TAP_RUN(test_block_jobs_invalid);
        TAP_RUN(test_block_jobs_io_status);
        TAP_RUN(test_job_status_strings);
        TAP_RUN(test_job_events_valid);
        TAP_RUN(test_job_events_invalid);
        TAP_RUN(test_accessors);
        TAP_RUN(test_query_disks_call);
        TAP_RUN(test_query_disks_with_finished_job);
        TAP_RUN(test_query_jobs_call);
        TAP_RUN(test_job_commands);
        TAP_RUN(test_flush_node_and_finalize);
        return tap_finish();
}
