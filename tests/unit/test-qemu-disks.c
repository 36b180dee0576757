/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* query-block and query-named-block-nodes parsed into disks and chains (service/qemu-reply.c):
 * replies captured from QEMU 7.2 (tests/unit/data/) and hostile variations of them. */

#include "fake-qemu.h"
#include "qemu.h"
#include "qmp.h"
#include "util.h"
#include "tap.h"
#include "test-qemu-fixtures.h"

#define SEC USEC_PER_SEC

/* The object at a path of keys ("inserted", "image", ...) inside blocks[0]. */
static json_object *block0(json_object *blocks, const char *const *path) {
        json_object *o = json_object_array_get_idx(blocks, 0);

        for (; o && *path; path++)
                if (!json_object_object_get_ex(o, *path, &o))
                        return NULL;
        return o;
}

/* Disks */

/* qemu_parse_disks() of a reply that holds one disk: that disk (free it with free_one()), or
 * NULL with the failure reported. */
static QemuDisk *parse_one(json_object *blocks, json_object *nodes) {
        QemuDisk *d = NULL;
        size_t n = 99;
        int r;

        r = qemu_parse_disks(blocks, nodes, &d, &n);
        ASSERT_OK(r);
        if (r < 0)
                return NULL;
        ASSERT_EQ(n, 1);
        ASSERT_NOT_NULL(d);
        if (n != 1 || !d) {
                if (d)
                        qemu_disks_free(d, n);
                return NULL;
        }
        return d;
}

static void free_one(QemuDisk *d) {
        if (d)
                qemu_disks_free(d, 1);
}

static void test_disks_chain3(void) {
        _cleanup_(json_object_putp) json_object *blocks = load("query-block-chain3.json"),
                                                *nodes = load("query-named-block-nodes-chain3.json");
        QemuDisk *d = parse_one(blocks, nodes);

        if (!d)
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
        /* What a guest keeps of it, counted: alias, node, file, format; the chain's files,
         * formats and nodes. */
        ASSERT_EQ_U64(qemu_disks_text(d, 1), strlen("vda") + strlen("top") + strlen("/tmp/exp/top.qcow2") +
                        strlen("qcow2") + strlen("/tmp/exp/mid.qcow2") + strlen("qcow2") + strlen("#block165") +
                        strlen("/tmp/exp/base.qcow2") + strlen("qcow2") + strlen("#block354"));
        free_one(d);
}

/* A filter another manager put over the disk (libvirt's backup: copy-before-write) is not the
 * disk: its node is the image under the filter, and the chain starts below that image. */
static void test_disks_filter_skipped(void) {
        _cleanup_(json_object_putp) json_object *blocks = load("query-block-filter.json"),
                                                *nodes = load("query-named-block-nodes-filter.json");
        QemuDisk *d = parse_one(blocks, nodes);

        if (!d)
                return;
        ASSERT_STREQ(d[0].alias, "vda");
        ASSERT_STREQ(d[0].node_name, "disk0");
        ASSERT_STREQ(d[0].filename, "/tmp/fx/top.qcow2");
        ASSERT_STREQ(d[0].format, "qcow2");
        ASSERT_EQ(d[0].n_chain, 1);
        if (d[0].n_chain == 1)
                ASSERT_STREQ(d[0].chain[0].filename, "/tmp/fx/base.qcow2");
        free_one(d);

        /* Without the node names (QEMU 7.2 cannot be asked while a job awaits dismissal) the
         * filter's node stays: never a name made up. */
        d = parse_one(blocks, NULL);
        if (d)
                ASSERT_STREQ(d[0].node_name, "foreign-cbw");
        free_one(d);
}

static void test_disks_format_node_chosen(void) {
        _cleanup_(json_object_putp) json_object *blocks = load("query-block-chain3.json"),
                                                *nodes = load("query-named-block-nodes-chain3.json"),
                                                *reversed = json_object_new_array(),
                                                *protocol_only = json_object_new_array();
        QemuDisk *d;
        size_t k = json_object_array_length(nodes);

        /* Protocol nodes listed before their format nodes must not win. */
        for (size_t i = k; i > 0; i--)
                json_object_array_add(reversed, json_object_get(json_object_array_get_idx(nodes, i - 1)));
        d = parse_one(blocks, reversed);
        if (d && d[0].n_chain == 2) {
                ASSERT_STREQ(d[0].chain[0].node_name, "#block165");
                ASSERT_STREQ(d[0].chain[1].node_name, "#block354");
        } else
                TAP_FAIL("unexpected disks: %s", d ? "a chain not of 2" : "not one disk");
        free_one(d);

        /* Only protocol nodes: no node name rather than the wrong one. */
        for (size_t i = 0; i < k; i++) {
                json_object *o = json_object_array_get_idx(nodes, i), *drv;
                if (json_object_object_get_ex(o, "drv", &drv) && streq(json_object_get_string(drv), "file"))
                        json_object_array_add(protocol_only, json_object_get(o));
        }
        d = parse_one(blocks, protocol_only);
        if (d && d[0].n_chain == 2) {
                ASSERT_NULL(d[0].chain[0].node_name);
                ASSERT_NULL(d[0].chain[1].node_name);
        } else
                TAP_FAIL("unexpected disks: %s", d ? "a chain not of 2" : "not one disk");
        free_one(d);

        /* No node list at all. */
        d = parse_one(blocks, NULL);
        if (d && d[0].n_chain == 2)
                ASSERT_NULL(d[0].chain[0].node_name);
        free_one(d);
}

static void test_disks_empty_drive_skipped(void) {
        _cleanup_(json_object_putp) json_object *blocks = load("query-block-cdrom.json"),
                                                *nodes = load("query-named-block-nodes-cdrom.json"),
                                                *empty = json_object_new_array();
        QemuDisk *d;
        size_t n;

        /* An empty CD-ROM drive (no "inserted") and a read-only disk without backing. */
        d = parse_one(blocks, nodes);
        if (d) {
                ASSERT_STREQ(d[0].alias, "vdb");
                ASSERT_STREQ(d[0].node_name, "b0");
                ASSERT_STREQ(d[0].filename, "/tmp/exp/base.qcow2");
                ASSERT_TRUE(d[0].read_only);
                ASSERT_EQ(d[0].n_chain, 0);
        }
        free_one(d);

        /* No disks at all. */
        d = NULL;
        n = 99;
        ASSERT_OK(qemu_parse_disks(empty, empty, &d, &n));
        ASSERT_EQ(n, 0);
        qemu_disks_free(d, n);
}

static void test_disks_streamed(void) {
        _cleanup_(json_object_putp) json_object *blocks = load("query-block-streamed.json");
        QemuDisk *d = parse_one(blocks, NULL);

        if (d)
                ASSERT_EQ(d[0].n_chain, 0);
        free_one(d);
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
                d = parse_one(blocks, junk);
                if (d && d[0].n_chain == 2)
                        ASSERT_NULL(d[0].chain[0].node_name);
                free_one(d);
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
                QemuDisk *d = parse_one(blocks, nodes);

                if (d && d[0].n_chain == 2)
                        ASSERT_NULL(d[0].chain[0].node_name);
                free_one(d);
        }
}

/* A guest started the libvirt way (-blockdev, each qcow2 node's backing an explicit node; the
 * headers name their backings relatively): QEMU names the top and the mid json:{…}. The top's
 * file is its qcow2 node's "file" child; the chain still finds its nodes by QEMU's names. */
/* Which disks have only names QEMU made ('#block…', a -drive guest): the default EngineMirror=auto
 * mirrors only those, as the mirror replaces the disk's nodes and nobody tracks QEMU's names. */
static void rename_node(json_object *blocks, json_object *nodes, const char *from, const char *to) {
        static const char *const inserted[] = {"inserted", NULL};
        json_object *o = block0(blocks, inserted), *name;

        if (o && json_object_object_get_ex(o, "node-name", &name) && streq(json_object_get_string(name), from))
                json_object_object_add(o, "node-name", json_object_new_string(to));
        for (size_t i = 0; nodes && i < json_object_array_length(nodes); i++) {
                o = json_object_array_get_idx(nodes, i);
                if (json_object_object_get_ex(o, "node-name", &name) && streq(json_object_get_string(name), from))
                        json_object_object_add(o, "node-name", json_object_new_string(to));
        }
}

static bool names_by_qemu(json_object *blocks, json_object *nodes) {
        QemuDisk *d = NULL;
        size_t n = 0;
        bool r = false;

        ASSERT_OK(qemu_parse_disks(blocks, nodes, &d, &n));
        ASSERT_EQ(n, 1);
        if (n == 1 && d)
                r = d[0].names_by_qemu;
        qemu_disks_free(d, n);
        return r;
}

static void test_disks_names_by_qemu(void) {
        _cleanup_(json_object_putp) json_object *blocks = load("query-block-chain3.json"),
                                                *nodes = load("query-named-block-nodes-chain3.json"),
                                                *fb = load("query-block-filter.json"),
                                                *fn = load("query-named-block-nodes-filter.json"),
                                                *bb = load("query-block-blockdev.json"),
                                                *bn = load("query-named-block-nodes-blockdev.json");

        /* -drive node-name=top: a name someone gave, over QEMU's #block165 and #block354. */
        ASSERT_FALSE(names_by_qemu(blocks, nodes));
        /* The format node QEMU's, but its protocol node named (-drive file=f0): the mirror would
         * leave f0 behind, so it is someone's too. */
        rename_node(blocks, nodes, "top", "#block042");
        ASSERT_FALSE(names_by_qemu(blocks, nodes));
        rename_node(blocks, nodes, "f0", "#block041");
        ASSERT_TRUE(names_by_qemu(blocks, nodes));
        /* A backing image's protocol node named (another disk's, over a shared template): left alone. */
        rename_node(blocks, nodes, "#block231", "shared-base");
        ASSERT_FALSE(names_by_qemu(blocks, nodes));
        rename_node(blocks, nodes, "shared-base", "#block231");
        ASSERT_TRUE(names_by_qemu(blocks, nodes));
        /* A backing node's name unknown (no node list) is no proof. */
        ASSERT_FALSE(names_by_qemu(blocks, NULL));
        /* One given name in the chain is enough to leave the disk alone. */
        rename_node(blocks, nodes, "#block354", "base-node");
        ASSERT_FALSE(names_by_qemu(blocks, nodes));
        /* libvirt's way: -blockdev nodes, all named. */
        ASSERT_FALSE(names_by_qemu(bb, bn));
        /* A filter someone named over QEMU-named images: its name is tracked too. */
        rename_node(fb, fn, "disk0", "#block001");
        ASSERT_FALSE(names_by_qemu(fb, fn));
}

static void test_disks_blockdev_file_child(void) {
        _cleanup_(json_object_putp) json_object *blocks = load("query-block-blockdev.json"),
                                                *nodes = load("query-named-block-nodes-blockdev.json");
        QemuDisk *d = parse_one(blocks, nodes);

        if (!d)
                return;
        ASSERT_STREQ(d[0].node_name, "disk0");
        ASSERT_TRUE(strncmp(d[0].filename, "json:{", 6) == 0);
        ASSERT_STREQ(d[0].file, "/tmp/bd/top.qcow2");
        ASSERT_EQ(d[0].n_chain, 2);
        if (d[0].n_chain == 2) {
                ASSERT_STREQ(d[0].chain[0].node_name, "b1");
                ASSERT_STREQ(d[0].chain[1].filename, "/tmp/bd/base.qcow2");
                ASSERT_STREQ(d[0].chain[1].node_name, "b2");
        }
        free_one(d);

        /* Without the named nodes, nothing vouches for a "file" node: no file. */
        d = parse_one(blocks, NULL);
        if (d)
                ASSERT_NULL(d[0].file);
        free_one(d);

        /* A plain name has no file child to look for. */
        {
                _cleanup_(json_object_putp) json_object *b3 = load("query-block-chain3.json"),
                                                        *n3 = load("query-named-block-nodes-chain3.json");

                d = parse_one(b3, n3);
                if (d)
                        ASSERT_NULL(d[0].file);
                free_one(d);
        }
}

/* Names a hostile (or another) QEMU may give the top: the file is taken only from a qcow2 node's
 * plain "file" child with an absolute path QEMU lists as a "file" node; anything else leaves the
 * disk without one, and the reply is still read. */
static void test_disks_blockdev_file_child_hostile(void) {
        static const char *const image[] = {"inserted", "image", NULL};
        static const struct {
                const char *name, *want;
        } t[] = {
                {"json:{\"driver\": \"qcow2\", \"file\": {\"driver\": \"file\", \"filename\": \"/tmp/bd/top.qcow2\"}}",
                        "/tmp/bd/top.qcow2"},
                {"json:{\"driver\": \"qcow2\", \"file\": {\"driver\": \"nbd\", \"filename\": \"/tmp/bd/top.qcow2\"}}",
                        NULL},
                {"json:{\"driver\": \"qcow2\", \"file\": {\"driver\": \"file\", \"filename\": \"tmp/bd/top.qcow2\"}}",
                        NULL},
                {"json:{\"driver\": \"qcow2\", \"file\": {\"driver\": \"file\", \"filename\": \"/tmp/bd/top.qcow2\", "
                 "\"locking\": \"off\"}}",
                        NULL},
                /* A path QEMU does not list as a "file" node. */
                {"json:{\"driver\": \"qcow2\", \"file\": {\"driver\": \"file\", \"filename\": \"/etc/shadow\"}}", NULL},
                {"json:{\"driver\": \"raw\", \"file\": {\"driver\": \"file\", \"filename\": \"/tmp/bd/top.qcow2\"}}",
                        NULL},
                {"json:{\"driver\": \"qcow2\", \"file\": \"f0\"}", NULL},
                {"json:{\"driver\": \"qcow2\", \"file\": {\"driver\": \"file\", \"filename\": 7}}", NULL},
                {"json:{\"driver\": \"qcow2\", \"file\": {\"driver\": \"file\", \"filename\": \"/tmp/bd/top.qcow2\"}",
                        NULL},
                {"json:{\"driver\": \"qcow2\", \"file\": {\"driver\": \"file\", \"filename\": \"/tmp/bd/top.qcow2\"}}x",
                        NULL},
                {"json:[\"/tmp/bd/top.qcow2\"]", NULL},
                {"json:", NULL},
        };

        for (size_t i = 0; i < ELEMENTSOF(t); i++) {
                _cleanup_(json_object_putp) json_object *blocks = load("query-block-blockdev.json"),
                                                        *nodes = load("query-named-block-nodes-blockdev.json");
                json_object *img = block0(blocks, image);
                QemuDisk *d = NULL;
                size_t n = 0;
                int r;

                if (!img)
                        continue;
                json_object_object_add(img, "filename", json_object_new_string(t[i].name));
                r = qemu_parse_disks(blocks, nodes, &d, &n);
                if (r < 0 || n != 1) {
                        TAP_FAIL("%s: qemu_parse_disks() = %d, n = %zu", t[i].name, r, n);
                        continue;
                }
                if (!streq_ptr(d[0].file, t[i].want))
                        TAP_FAIL("%s: file %s, expected %s", t[i].name, d[0].file ?: "(none)", t[i].want ?: "(none)");
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
        QemuDisk *d = parse_one(ok, NULL);
        size_t n = 0;

        if (d) {
                ASSERT_EQ(d[0].n_chain, QEMU_CHAIN_MAX);
                ASSERT_STREQ(d[0].chain[0].filename, "/img/1.qcow2");
                ASSERT_STREQ(d[0].chain[QEMU_CHAIN_MAX - 1].filename, "/img/128.qcow2");
        }
        free_one(d);
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

/* Disk i (qdev vd<i>, top node top) over a chain of n qcow2 images, files[0] the top's file name:
 * query-block's nesting, built from the bottom up. */
static void add_chain_disk(json_object *blocks, size_t i, const char *top, json_object *const *files, size_t n) {
        _cleanup_free_ char *qdev = strdup_printf("/machine/peripheral/vd%zu/virtio-backend", i);
        json_object *image = NULL, *block = json_object_new_object(), *inserted = json_object_new_object();

        for (size_t j = n; j > 0; j--) {
                json_object *o = json_object_new_object();

                json_object_object_add(o, "filename", json_object_get(files[j - 1]));
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
                _cleanup_free_ char *top = strdup_printf("top%zu", i);
                json_object *files[DEPTH + 1];

                /* One image in eight is a node QEMU lists. */
                for (size_t j = 0; j <= DEPTH; j++) {
                        size_t idx = i * (DEPTH + 1) + j;

                        files[j] = idx % 8 == 0 ? match[(idx / 8) % N_NODES] : miss[idx % N_NODES];
                }
                add_chain_disk(blocks, i, top, files, DEPTH + 1);
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

/* Whether QEMU named every node of an image's file is asked for every image of every disk: with
 * all 4096 nodes over one file (names QEMU's own, the file name near the string cap) and every
 * image that file, the answer is the file's, found once per file, not by a walk of its nodes per
 * image (32768 x 4096 comparisons of 4 KiB: this binary took 6.9 s instead of 0.9 s). And it is
 * the right answer both ways. */
static void test_disks_one_file_many_nodes_linear(void) {
        enum { N_DISKS = QEMU_DISKS_MAX, DEPTH = QEMU_CHAIN_MAX, N_NODES = QEMU_NODES_MAX };
        _cleanup_(json_object_putp) json_object *blocks = json_object_new_array(), *nodes = json_object_new_array();
        _cleanup_free_ char *pad = malloc(QEMU_STRING_MAX), *file = NULL;
        json_object *name_of_file;
        QemuDisk *d = NULL;
        size_t n = 0, by_qemu = 0;

        if (!blocks || !nodes || !pad) {
                TAP_FAIL("out of memory");
                return;
        }
        memset(pad, 'p', QEMU_STRING_MAX - 32);
        pad[QEMU_STRING_MAX - 32] = 0;
        file = strdup_printf("/images/%s/t.qcow2", pad);
        name_of_file = json_object_new_string(file);
        for (size_t k = 0; k < N_NODES; k++) {
                _cleanup_free_ char *name = strdup_printf("#block%zu", k);
                json_object *node = json_object_new_object();

                json_object_object_add(node, "file", json_object_get(name_of_file));
                json_object_object_add(node, "drv", json_object_new_string(k % 2 ? "file" : "qcow2"));
                json_object_object_add(node, "node-name", json_object_new_string(name));
                json_object_array_add(nodes, node);
        }
        for (size_t i = 0; i < N_DISKS; i++) {
                _cleanup_free_ char *top = strdup_printf("#top%zu", i);
                json_object *files[DEPTH + 1];

                for (size_t j = 0; j <= DEPTH; j++)
                        files[j] = name_of_file;
                add_chain_disk(blocks, i, top, files, DEPTH + 1);
        }
        json_object_put(name_of_file);

        ASSERT_OK(qemu_parse_disks(blocks, nodes, &d, &n));
        ASSERT_EQ(n, N_DISKS);
        for (size_t i = 0; d && i < n; i++)
                by_qemu += d[i].names_by_qemu;
        /* All names are QEMU's: every disk's nodes were QEMU's to name. */
        ASSERT_EQ(by_qemu, N_DISKS);
        qemu_disks_free(d, n);

        /* One node of the file named by someone: no disk over it is QEMU's alone. */
        json_object_object_add(json_object_array_get_idx(nodes, N_NODES / 2), "node-name",
                json_object_new_string("named"));
        ASSERT_OK(qemu_parse_disks(blocks, nodes, &d, &n));
        by_qemu = 0;
        for (size_t i = 0; d && i < n; i++)
                by_qemu += d[i].names_by_qemu;
        ASSERT_EQ(by_qemu, 0);
        qemu_disks_free(d, n);
}

/* Remote or local, by QEMU's name of an image: what decides prefetch and the pull helper's reads. */
static void test_image_name_remote(void) {
        static const char *const remote[] = {
                "nbd+unix:///?socket=/run/t.sock",
                "nbd://10.0.0.1:10809/vda",
                "https://templates.example/t.raw",
                "ssh://h/images/t.qcow2",
                "rbd:pool/image",
                "json:{\"driver\": \"nbd\", \"server\": {\"type\": \"unix\", \"path\": \"/run/t.sock\"}}",
                "json:{\"driver\": \"qcow2\", \"file\": {\"driver\": \"http\", \"url\": \"http://h/t\"}}",
                "json:{\"driver\": \"raw\", \"file\": {\"driver\": \"throttle\", \"file\": {\"driver\": \"nbd\"}}}",
        };
        static const char *const local[] = {
                "/var/lib/images/base.qcow2",
                "base.qcow2",
                "images/base.qcow2",
                "x/dir:base.qcow2", /* "/" before ":": a relative path, as QEMU reads it */
                "file:/var/lib/images/base.qcow2",
                "host_device:/dev/vg/base",
                /* libvirt's -blockdev chains: a local qcow2 QEMU must name by its options */
                "json:{\"backing\": {\"driver\": \"qcow2\"}, \"driver\": \"qcow2\", \"file\": {\"driver\": "
                "\"file\", \"filename\": \"/var/lib/images/top.qcow2\"}}",
                "json:{\"driver\": \"raw\", \"file\": {\"driver\": \"host_device\", \"filename\": \"/dev/sdb\"}}",
                "json:{not json",
                "json:[1, 2]",
                "json:{\"driver\": 7}",
                "",
                NULL,
        };

        for (size_t i = 0; i < ELEMENTSOF(remote); i++)
                ASSERT_TRUE(qemu_image_name_remote(remote[i]));
        for (size_t i = 0; i < ELEMENTSOF(local); i++)
                ASSERT_FALSE(qemu_image_name_remote(local[i]));
}

int main(int argc, char **argv) {
        tap_init(argc, argv);
        log_set_max_level(getenv("BSD_UNIT_DEBUG") ? LOG_LEVEL_DEBUG : -1);

        TAP_RUN(test_disks_chain3);
        TAP_RUN(test_disks_filter_skipped);
        TAP_RUN(test_disks_format_node_chosen);
        TAP_RUN(test_disks_many_nodes_linear);
        TAP_RUN(test_disks_one_file_many_nodes_linear);
        TAP_RUN(test_disks_empty_drive_skipped);
        TAP_RUN(test_disks_streamed);
        TAP_RUN(test_disks_wrong_types);
        TAP_RUN(test_disks_bad_containers);
        TAP_RUN(test_disks_duplicate_alias);
        TAP_RUN(test_disks_alias_fallbacks);
        TAP_RUN(test_disks_hostile_names);
        TAP_RUN(test_disks_blockdev_file_child);
        TAP_RUN(test_disks_names_by_qemu);
        TAP_RUN(test_disks_blockdev_file_child_hostile);
        TAP_RUN(test_disks_chain_max);
        TAP_RUN(test_chain_max_fits_qmp_depth);
        TAP_RUN(test_disks_limits);
        TAP_RUN(test_image_name_remote);
        return tap_finish();
}
