/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <fcntl.h>
#include <limits.h>
#include <linux/fs.h>
#include <stdarg.h>
#include <sys/ioctl.h>
#include <sys/stat.h>

#include "image-format.h"
#include "util.h"

/* docs/interop/qcow2.txt; the limits are QEMU's own (block/qcow2.h), so that what QEMU opens we open. */
#define QCOW2_MAGIC 0x514649fbU /* "QFI\xfb" */
#define QCOW2_V2_HEADER_LENGTH 72U
#define QCOW2_V3_HEADER_LENGTH_MIN 104U
#define QCOW2_HEADER_READ 112U /* the v3 header with the compression type and its padding */
#define QCOW2_CLUSTER_BITS_MIN 9U
#define QCOW2_CLUSTER_BITS_MAX 21U
#define QCOW2_BACKING_NAME_MAX 1023U
#define QCOW2_BACKING_FORMAT_MAX 15U            /* QEMU keeps it in a char[16] */
#define QCOW2_MAX_L1_SIZE (32U * 1024U * 1024U) /* bytes */
#define QCOW2_MAX_REFTABLE_SIZE (8U * 1024U * 1024U)
#define QCOW2_MAX_SNAPSHOTS 65536U
#define QCOW2_SNAPSHOT_HEADER_SIZE 40U
#define QCOW2_REFCOUNT_ORDER_MAX 6U

#define QCOW2_EXT_END 0x00000000U
/* QEMU writes a handful (backing format, feature names, bitmaps); the first cluster of 2 MiB holds
 * 262,144 empty ones, walked per image of a chain of 32 at every open (review 34d). */
#define QCOW2_EXTENSIONS_MAX 1024U
#define QCOW2_EXT_BACKING_FORMAT 0xe2792acaU

#define QCOW2_INCOMPAT_DIRTY (UINT64_C(1) << 0)
#define QCOW2_INCOMPAT_CORRUPT (UINT64_C(1) << 1)
#define QCOW2_INCOMPAT_DATA_FILE (UINT64_C(1) << 2)
#define QCOW2_INCOMPAT_COMPRESSION (UINT64_C(1) << 3)
#define QCOW2_INCOMPAT_EXTL2 (UINT64_C(1) << 4)
#define QCOW2_INCOMPAT_KNOWN \
        (QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT | QCOW2_INCOMPAT_DATA_FILE | QCOW2_INCOMPAT_COMPRESSION | \
                QCOW2_INCOMPAT_EXTL2)

#define QCOW2_CRYPT_NONE 0U
#define QCOW2_CRYPT_AES 1U
#define QCOW2_CRYPT_LUKS 2U

#define QCOW2_COMPAT_LAZY_REFCOUNTS (UINT64_C(1) << 0)
#define QCOW2_COMPRESSION_ZLIB 0U
#define QCOW2_COMPRESSION_ZSTD 1U

int image_error(char **ret_error, int r, const char *format, ...) {
        va_list ap;
        char *m;
        int k;

        va_start(ap, format);
        k = vasprintf(&m, format, ap);
        va_end(ap);
        if (k < 0)
                return -ENOMEM;
        log_debug("%s", m);
        if (ret_error)
                *ret_error = m;
        else
                free(m);
        return r;
}

static uint32_t be32(const uint8_t *p) {
        return (uint32_t) p[0] << 24 | (uint32_t) p[1] << 16 | (uint32_t) p[2] << 8 | (uint32_t) p[3];
}

static uint64_t be64(const uint8_t *p) {
        return (uint64_t) be32(p) << 32 | be32(p + 4);
}

static bool has_control_chars(const char *s, size_t n) {
        for (size_t i = 0; i < n; i++)
                if ((unsigned char) s[i] < 0x20 || s[i] == 0x7f)
                        return true;
        return false;
}

/* Names that come from callers or headers end up in messages: quote them only if they are harmless. */
const char *image_printable(const char *s) {
        if (!s)
                return "(null)";
        if (strlen(s) > PATH_MAX || has_control_chars(s, strlen(s)) || !utf8_is_valid(s))
                return "(unprintable name)";
        return s;
}

bool image_format_supported(const char *format) {
        return format && (streq(format, "qcow2") || streq(format, "raw"));
}

static int fd_size(int fd, const char *image_path, uint64_t *ret, char **ret_error) {
        struct stat st;

        if (fstat(fd, &st) < 0)
                return image_error(ret_error, -errno, "Failed to stat %s: %m", image_path);
        if (S_ISREG(st.st_mode)) {
                *ret = (uint64_t) st.st_size;
                return 0;
        }
        if (S_ISBLK(st.st_mode)) {
                uint64_t size;

                if (ioctl(fd, BLKGETSIZE64, &size) < 0)
                        return image_error(
                                ret_error, -errno, "Failed to get the size of block device %s: %m", image_path);
                *ret = size;
                return 0;
        }
        return image_error(ret_error, -EINVAL, "%s is neither a regular file nor a block device.", image_path);
}

/* Join a backing name to the directory of the image naming it and normalize the result lexically.
 * The kernel would resolve ".." after symlinks, but no symlink is ever followed (image_open_beneath),
 * so the lexical result is the file the kernel reaches; ".." at the root stays at the root, as there. */
static char *backing_resolve(const char *image_path, const char *name) {
        _cleanup_free_ char *full = NULL, *out = NULL;
        size_t n = 0;

        if (name[0] == '/')
                full = strdup(name);
        else {
                const char *slash = strrchr(image_path, '/');
                full = strdup_printf("%.*s/%s", (int) (slash - image_path), image_path, name);
        }
        if (!full)
                return NULL;
        out = malloc(strlen(full) + 2);
        if (!out)
                return NULL;

        for (const char *p = full; *p;) {
                size_t l;

                while (*p == '/')
                        p++;
                l = strcspn(p, "/");
                if (l == 0)
                        break;
                if (l == 2 && p[0] == '.' && p[1] == '.') {
                        while (n > 0 && out[n - 1] != '/')
                                n--;
                        if (n > 0)
                                n--;
                } else if (!(l == 1 && p[0] == '.')) {
                        out[n++] = '/';
                        memcpy(out + n, p, l);
                        n += l;
                }
                p += l;
        }
        if (n == 0)
                out[n++] = '/';
        out[n] = 0;
        return TAKE_PTR(out);
}

/* QEMU's path_has_protocol(): a colon before any slash makes "proto:rest" a protocol, not a file. */
static bool name_has_protocol(const char *name) {
        return name[strcspn(name, ":/")] == ':';
}

static int check_table(const char *image_path, const char *what, uint64_t offset, uint64_t entries, uint64_t entry_len,
        uint32_t cluster_size, char **ret_error) {
        if (entries > INT64_MAX / entry_len || (uint64_t) INT64_MAX - entries * entry_len < offset)
                return image_error(ret_error, -EBADMSG, "The %s of %s ends past the largest possible file offset.",
                        what, image_path);
        if (offset % cluster_size != 0)
                return image_error(ret_error, -EBADMSG, "The %s of %s at offset %" PRIu64 " is not cluster aligned.",
                        what, image_path, offset);
        return 0;
}

/* protocol_backing_ok: a "proto:" backing name is passed over (backing stays NULL) instead of
 * refused; for callers that want the image's format options only. */
static int qcow2_read_header(int fd, const char *image_path, bool protocol_backing_ok, Image *ret, char **ret_error) {
        _cleanup_free_ uint8_t *cluster = NULL;
        _cleanup_free_ char *name = NULL, *backing = NULL, *backing_format = NULL;
        uint8_t h[QCOW2_HEADER_READ] = {};
        uint32_t version, cluster_bits, cluster_size, header_length, refcount_order, crypt_method, l1_size,
                backing_size, refcount_table_clusters, nb_snapshots, l2_bits;
        uint64_t backing_offset, size, incompat, l1_offset, refcount_table_offset, snapshots_offset, l1_needed,
                file_size, have, area_end;
        uint8_t compression_type = QCOW2_COMPRESSION_ZLIB;
        uint64_t compat = 0;
        ssize_t k;
        int r;

        r = fd_size(fd, image_path, &file_size, ret_error);
        if (r < 0)
                return r;

        k = loop_read(fd, h, sizeof(h), 0);
        if (k < 0)
                return image_error(
                        ret_error, (int) k, "Failed to read the header of %s: %s", image_path, strerror((int) -k));
        if (k < 4 || be32(h) != QCOW2_MAGIC)
                return image_error(ret_error, -EBADMSG,
                        "%s is not a qcow2 image (no qcow2 magic); check the format given for it.", image_path);
        if ((size_t) k < QCOW2_V2_HEADER_LENGTH)
                return image_error(
                        ret_error, -EBADMSG, "The qcow2 header of %s is truncated (%zd bytes).", image_path, k);

        version = be32(h + 4);
        if (version != 2 && version != 3)
                return image_error(ret_error, -EOPNOTSUPP,
                        "%s is qcow2 version %" PRIu32 "; only versions 2 and 3 are supported.", image_path, version);
        backing_offset = be64(h + 8);
        backing_size = be32(h + 16);
        cluster_bits = be32(h + 20);
        size = be64(h + 24);
        crypt_method = be32(h + 32);
        l1_size = be32(h + 36);
        l1_offset = be64(h + 40);
        refcount_table_offset = be64(h + 48);
        refcount_table_clusters = be32(h + 56);
        nb_snapshots = be32(h + 60);
        snapshots_offset = be64(h + 64);

        if (cluster_bits < QCOW2_CLUSTER_BITS_MIN || cluster_bits > QCOW2_CLUSTER_BITS_MAX)
                return image_error(ret_error, -EBADMSG,
                        "%s has a cluster size of 2^%" PRIu32 " bytes; qcow2 allows 2^9 to 2^21.", image_path,
                        cluster_bits);
        cluster_size = UINT32_C(1) << cluster_bits;

        if (version == 2) {
                header_length = QCOW2_V2_HEADER_LENGTH;
                incompat = 0;
                refcount_order = 4;
        } else {
                if ((size_t) k < QCOW2_V3_HEADER_LENGTH_MIN)
                        return image_error(ret_error, -EBADMSG, "The qcow2 v3 header of %s is truncated (%zd bytes).",
                                image_path, k);
                incompat = be64(h + 72);
                compat = be64(h + 80);
                refcount_order = be32(h + 96);
                header_length = be32(h + 100);
                if (header_length < QCOW2_V3_HEADER_LENGTH_MIN || header_length % 8 != 0 ||
                        header_length > cluster_size)
                        return image_error(ret_error, -EBADMSG,
                                "%s has an invalid qcow2 header length %" PRIu32
                                " (a multiple of 8, 104 up to the cluster size).",
                                image_path, header_length);
                if (refcount_order > QCOW2_REFCOUNT_ORDER_MAX)
                        return image_error(ret_error, -EBADMSG, "%s has an invalid refcount order %" PRIu32 ".",
                                image_path, refcount_order);
        }

        /* Everything else lies in the first cluster, which the file may not fill. */
        have = MIN((uint64_t) cluster_size, file_size);
        if (have < header_length)
                have = header_length; /* a stale size: the read below tells */
        cluster = malloc(have);
        if (!cluster)
                return -ENOMEM;
        k = loop_read(fd, cluster, have, 0);
        if (k < 0)
                return image_error(
                        ret_error, (int) k, "Failed to read the header of %s: %s", image_path, strerror((int) -k));
        have = (uint64_t) k;
        if (have < header_length)
                return image_error(ret_error, -EBADMSG, "The qcow2 header of %s is truncated (%" PRIu64 " bytes).",
                        image_path, have);

        if (header_length > QCOW2_V3_HEADER_LENGTH_MIN)
                compression_type = cluster[QCOW2_V3_HEADER_LENGTH_MIN];

        if (incompat & ~QCOW2_INCOMPAT_KNOWN)
                return image_error(ret_error, -EOPNOTSUPP,
                        "%s uses incompatible qcow2 features unknown to blockstreamd (0x%" PRIx64
                        "); refusing to open it.",
                        image_path, incompat & ~QCOW2_INCOMPAT_KNOWN);
        if (incompat & QCOW2_INCOMPAT_CORRUPT)
                return image_error(ret_error, -EUCLEAN,
                        "%s is marked corrupt; repair it with 'qemu-img check -r all' first.", image_path);
        if (incompat & QCOW2_INCOMPAT_DATA_FILE)
                return image_error(ret_error, -EOPNOTSUPP,
                        "%s keeps its data in an external data file, which blockstreamd does not support.", image_path);
        if (compression_type != QCOW2_COMPRESSION_ZLIB && compression_type != QCOW2_COMPRESSION_ZSTD)
                return image_error(ret_error, -EOPNOTSUPP, "%s uses an unknown compression type %u.", image_path,
                        compression_type);
        if (!!(incompat & QCOW2_INCOMPAT_COMPRESSION) != (compression_type != QCOW2_COMPRESSION_ZLIB))
                return image_error(ret_error, -EBADMSG,
                        "%s has a compression type that disagrees with its compression feature bit.", image_path);
        if ((incompat & QCOW2_INCOMPAT_EXTL2) && cluster_bits < 14)
                return image_error(ret_error, -EBADMSG,
                        "%s uses extended L2 entries with clusters smaller than 16 KiB.", image_path);

        if (crypt_method == QCOW2_CRYPT_AES || crypt_method == QCOW2_CRYPT_LUKS)
                return image_error(
                        ret_error, -EOPNOTSUPP, "%s is encrypted, which blockstreamd does not support.", image_path);
        if (crypt_method != QCOW2_CRYPT_NONE)
                return image_error(ret_error, -EBADMSG, "%s has an unknown encryption method %" PRIu32 ".", image_path,
                        crypt_method);

        if (size > INT64_MAX)
                return image_error(
                        ret_error, -EBADMSG, "%s has an impossible virtual size %" PRIu64 ".", image_path, size);
        l2_bits = cluster_bits - ((incompat & QCOW2_INCOMPAT_EXTL2) ? 4 : 3);
        l1_needed = (size >> (cluster_bits + l2_bits)) + !!(size & ((UINT64_C(1) << (cluster_bits + l2_bits)) - 1));
        if (l1_size > QCOW2_MAX_L1_SIZE / 8)
                return image_error(ret_error, -EBADMSG, "The L1 table of %s is too large (%" PRIu32 " entries).",
                        image_path, l1_size);
        if (l1_size < l1_needed)
                return image_error(ret_error, -EBADMSG,
                        "The L1 table of %s (%" PRIu32 " entries) is too small for the virtual size %" PRIu64 ".",
                        image_path, l1_size, size);
        r = check_table(image_path, "L1 table", l1_offset, l1_size, 8, cluster_size, ret_error);
        if (r < 0)
                return r;
        if (refcount_table_clusters == 0 || refcount_table_clusters > (QCOW2_MAX_REFTABLE_SIZE >> cluster_bits))
                return image_error(ret_error, -EBADMSG, "%s has an invalid refcount table size (%" PRIu32 " clusters).",
                        image_path, refcount_table_clusters);
        r = check_table(image_path, "refcount table", refcount_table_offset, refcount_table_clusters, cluster_size,
                cluster_size, ret_error);
        if (r < 0)
                return r;
        if (nb_snapshots > QCOW2_MAX_SNAPSHOTS)
                return image_error(ret_error, -EBADMSG, "%s claims %" PRIu32 " snapshots, more than qcow2 allows.",
                        image_path, nb_snapshots);
        r = check_table(image_path, "snapshot table", snapshots_offset, nb_snapshots, QCOW2_SNAPSHOT_HEADER_SIZE,
                cluster_size, ret_error);
        if (r < 0)
                return r;

        /* The backing file name: in the first cluster, after the header. */
        if (backing_offset == 0) {
                if (backing_size != 0)
                        return image_error(ret_error, -EBADMSG,
                                "%s has a backing file name size but no backing file name offset.", image_path);
        } else {
                if (backing_size == 0 || backing_size > QCOW2_BACKING_NAME_MAX)
                        return image_error(ret_error, -EBADMSG,
                                "%s has a backing file name of %" PRIu32 " bytes; 1 to 1023 are allowed.", image_path,
                                backing_size);
                if (backing_offset < header_length || backing_offset > cluster_size ||
                        backing_size > cluster_size - backing_offset)
                        return image_error(ret_error, -EBADMSG,
                                "The backing file name of %s (offset %" PRIu64
                                ") lies outside the header's first cluster.",
                                image_path, backing_offset);
                if (backing_offset + backing_size > have)
                        return image_error(ret_error, -EBADMSG,
                                "The backing file name of %s (offset %" PRIu64 ") lies beyond the end of the file.",
                                image_path, backing_offset);
                name = strndup((const char *) cluster + backing_offset, backing_size);
                if (!name)
                        return -ENOMEM;
                if (strlen(name) != backing_size)
                        return image_error(
                                ret_error, -EBADMSG, "The backing file name of %s contains a NUL byte.", image_path);
                if (!utf8_is_valid(name))
                        return image_error(
                                ret_error, -EBADMSG, "The backing file name of %s is not valid UTF-8.", image_path);
                if (has_control_chars(name, backing_size))
                        return image_error(ret_error, -EBADMSG,
                                "The backing file name of %s contains control characters.", image_path);
                if (name_has_protocol(name)) {
                        if (!protocol_backing_ok)
                                return image_error(ret_error, -EOPNOTSUPP,
                                        "The backing file of %s is '%s', a protocol and not a file; blockstreamd takes file backings only. Rebase the image onto a file with 'qemu-img rebase -u -b FILE -F FORMAT'.",
                                        image_path, name);
                } else {
                        backing = backing_resolve(image_path, name);
                        if (!backing)
                                return -ENOMEM;
                        if (!path_is_safe_absolute(backing, PATH_MAX - 1) || streq(backing, "/"))
                                return image_error(ret_error, -EBADMSG,
                                        "The backing file '%s' of %s does not resolve to a valid file path.", name,
                                        image_path);
                }
        }

        /* Header extensions: 8-byte aligned {type, length, data}, ended by type 0, never past the backing
         * file name or the first cluster. */
        area_end = backing_offset != 0 ? backing_offset : cluster_size;
        for (uint64_t off = header_length, n = 0; off < area_end;) {
                uint32_t type, len;

                if (area_end - off < 8)
                        return image_error(ret_error, -EBADMSG,
                                "A header extension of %s at offset %" PRIu64 " runs past the end of the header area.",
                                image_path, off);
                if (off + 8 > have)
                        return image_error(ret_error, -EBADMSG,
                                "The header extensions of %s run beyond the end of the file.", image_path);
                type = be32(cluster + off);
                len = be32(cluster + off + 4);
                off += 8;
                if (type == QCOW2_EXT_END)
                        break;
                if (++n > QCOW2_EXTENSIONS_MAX)
                        return image_error(ret_error, -EBADMSG, "%s has more than %u header extensions.", image_path,
                                QCOW2_EXTENSIONS_MAX);
                if (len > area_end - off)
                        return image_error(ret_error, -EBADMSG,
                                "The header extension 0x%08" PRIx32 " of %s at offset %" PRIu64 " (length %" PRIu32
                                ") runs past the end of the header area.",
                                type, image_path, off - 8, len);
                if (off + len > have)
                        return image_error(ret_error, -EBADMSG,
                                "The header extensions of %s run beyond the end of the file.", image_path);
                if (type == QCOW2_EXT_BACKING_FORMAT) {
                        if (backing_format)
                                return image_error(
                                        ret_error, -EBADMSG, "%s records its backing format twice.", image_path);
                        if (len == 0 || len > QCOW2_BACKING_FORMAT_MAX)
                                return image_error(ret_error, -EBADMSG,
                                        "%s records a backing format of %" PRIu32 " bytes; 1 to 15 are allowed.",
                                        image_path, len);
                        for (uint32_t i = 0; i < len; i++) {
                                uint8_t c = cluster[off + i];
                                if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                                            c == '_' || c == '-' || c == '.'))
                                        return image_error(ret_error, -EBADMSG,
                                                "%s records a backing format that is not a format name.", image_path);
                        }
                        backing_format = strndup((const char *) cluster + off, len);
                        if (!backing_format)
                                return -ENOMEM;
                }
                off += ((uint64_t) len + 7) & ~UINT64_C(7);
                if (off >= area_end)
                        return image_error(ret_error, -EBADMSG,
                                "The header extensions of %s are not terminated by an end marker.", image_path);
        }

        ret->format = strdup("qcow2");
        if (!ret->format)
                return -ENOMEM;
        ret->virtual_size = size;
        ret->cluster_size = cluster_size;
        ret->qcow2_version = version;
        ret->refcount_bits = UINT32_C(1) << refcount_order;
        ret->lazy_refcounts = compat & QCOW2_COMPAT_LAZY_REFCOUNTS;
        ret->extended_l2 = incompat & QCOW2_INCOMPAT_EXTL2;
        ret->compression_zstd = compression_type == QCOW2_COMPRESSION_ZSTD;
        ret->backing = TAKE_PTR(backing);
        ret->backing_format = TAKE_PTR(backing_format);
        return 0;
}

static int read_header(int fd, const char *format, const char *image_path, bool protocol_backing_ok, Image *ret,
        char **ret_error) {
        Image tmp = {};
        uint64_t size;
        int r;

        if (!image_path || !path_is_safe_absolute(image_path, PATH_MAX - 1))
                return image_error(ret_error, -EINVAL, "Image path '%s' is not a normalized absolute path.",
                        image_printable(image_path));
        if (!image_format_supported(format))
                return image_error(ret_error, -EOPNOTSUPP,
                        "The format '%s' of %s is not supported; images must be qcow2 or raw.", image_printable(format),
                        image_path);

        if (streq(format, "raw")) {
                r = fd_size(fd, image_path, &size, ret_error);
                if (r < 0)
                        return r;
                tmp.format = strdup("raw");
                if (!tmp.format)
                        return -ENOMEM;
                tmp.virtual_size = size;
        } else {
                r = qcow2_read_header(fd, image_path, protocol_backing_ok, &tmp, ret_error);
                if (r < 0)
                        return r;
        }

        ret->format = tmp.format;
        ret->virtual_size = tmp.virtual_size;
        ret->cluster_size = tmp.cluster_size;
        ret->qcow2_version = tmp.qcow2_version;
        ret->refcount_bits = tmp.refcount_bits;
        ret->lazy_refcounts = tmp.lazy_refcounts;
        ret->extended_l2 = tmp.extended_l2;
        ret->compression_zstd = tmp.compression_zstd;
        ret->backing = tmp.backing;
        ret->backing_format = tmp.backing_format;
        return 0;
}

int image_read_header(int fd, const char *format, const char *image_path, Image *ret, char **ret_error) {
        return read_header(fd, format, image_path, false, ret, ret_error);
}

int image_read_format_options(int fd, const char *image_path, Image *ret, char **ret_error) {
        return read_header(fd, "qcow2", image_path, true, ret, ret_error);
}

static void put_be32(uint8_t *p, uint32_t v) {
        p[0] = (uint8_t) (v >> 24);
        p[1] = (uint8_t) (v >> 16);
        p[2] = (uint8_t) (v >> 8);
        p[3] = (uint8_t) v;
}

static void put_be64(uint8_t *p, uint64_t v) {
        put_be32(p, (uint32_t) (v >> 32));
        put_be32(p + 4, (uint32_t) v);
}

static int pwrite_full(int fd, const void *buf, size_t len, uint64_t off) {
        size_t done = 0;

        while (done < len) {
                ssize_t n = pwrite(fd, (const uint8_t *) buf + done, len - done, (off_t) (off + done));
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0)
                        return -errno;
                if (n == 0)
                        return -EIO;
                done += (size_t) n;
        }
        return 0;
}

/* The layout of `qemu-img create -f qcow2 -u -b BACKING -F FORMAT` (QEMU 7.2, compat 1.1): cluster 0
 * the header, its extensions and the backing file name; cluster 1 the refcount table; cluster 2 its
 * one refcount block; from cluster 3 the L1 table (all zero: nothing allocated, every read goes to
 * the backing file). */
#define OVERLAY_CLUSTER_BITS 16U
#define OVERLAY_CLUSTER_SIZE (UINT32_C(1) << OVERLAY_CLUSTER_BITS)

int image_write_qcow2_overlay(
        int fd, uint64_t size, const char *backing, const char *backing_format, char **ret_error) {
        _cleanup_free_ uint8_t *cluster = NULL;
        uint64_t l1_entries, l1_bytes, l1_clusters, n_clusters, l2_coverage, off;
        size_t backing_len, format_len, ext_len, backing_off;
        struct stat st;
        int r;

        if (fstat(fd, &st) < 0)
                return image_error(ret_error, -errno, "Failed to stat the new image: %m");
        if (!S_ISREG(st.st_mode) || st.st_size != 0)
                return image_error(ret_error, -EINVAL, "The new image is not an empty regular file.");
        if (size == 0 || size > UINT64_MAX - 511)
                return image_error(ret_error, -EINVAL, "Virtual size %" PRIu64 " is not valid.", size);
        size = (size + 511) & ~UINT64_C(511);
        if (!backing || !backing_format)
                return image_error(ret_error, -EINVAL, "An overlay needs a backing file and its format.");
        backing_len = strlen(backing);
        format_len = strlen(backing_format);
        if (backing_len == 0 || backing_len > QCOW2_BACKING_NAME_MAX || has_control_chars(backing, backing_len) ||
                !utf8_is_valid(backing))
                return image_error(ret_error, -ENAMETOOLONG,
                        "The backing file name must be 1 to %u printable bytes (qcow2's limit).",
                        QCOW2_BACKING_NAME_MAX);
        if (format_len == 0 || format_len > QCOW2_BACKING_FORMAT_MAX || !image_format_supported(backing_format))
                return image_error(
                        ret_error, -EINVAL, "Backing format '%s' is not supported.", image_printable(backing_format));

        /* One L2 table (a cluster of 8-byte entries) maps cluster_size/8 clusters. */
        l2_coverage = (uint64_t) OVERLAY_CLUSTER_SIZE * (OVERLAY_CLUSTER_SIZE / 8);
        l1_entries = size / l2_coverage + (size % l2_coverage != 0);
        l1_bytes = l1_entries * 8;
        if (l1_bytes > QCOW2_MAX_L1_SIZE)
                return image_error(ret_error, -EFBIG,
                        "A virtual size of %" PRIu64
                        " bytes needs a larger L1 table than QEMU opens (%u MiB); at most %" PRIu64
                        " bytes are possible.",
                        size, QCOW2_MAX_L1_SIZE >> 20, (uint64_t) QCOW2_MAX_L1_SIZE / 8 * l2_coverage);
        l1_clusters = (l1_bytes + OVERLAY_CLUSTER_SIZE - 1) / OVERLAY_CLUSTER_SIZE;
        n_clusters = 3 + l1_clusters; /* ≤ 515: one refcount block (32768 16-bit entries) holds them */

        cluster = calloc(1, OVERLAY_CLUSTER_SIZE);
        if (!cluster)
                return -ENOMEM;

        /* Cluster 0: header (v3, 112 bytes), backing format extension, end extension, backing name. */
        put_be32(cluster + 0, QCOW2_MAGIC);
        put_be32(cluster + 4, 3);
        ext_len = (format_len + 7) & ~(size_t) 7;
        backing_off = QCOW2_HEADER_READ + 8 + ext_len + 8;
        put_be64(cluster + 8, backing_off);
        put_be32(cluster + 16, (uint32_t) backing_len);
        put_be32(cluster + 20, OVERLAY_CLUSTER_BITS);
        put_be64(cluster + 24, size);
        put_be32(cluster + 32, QCOW2_CRYPT_NONE);
        put_be32(cluster + 36, (uint32_t) l1_entries);
        put_be64(cluster + 40, 3 * (uint64_t) OVERLAY_CLUSTER_SIZE); /* L1 table */
        put_be64(cluster + 48, 1 * (uint64_t) OVERLAY_CLUSTER_SIZE); /* refcount table */
        put_be32(cluster + 56, 1);                                   /* its clusters */
        /* 60: no snapshots; 72, 80, 88: no incompatible, compatible or autoclear features */
        put_be32(cluster + 96, 4);                  /* refcount order: 16-bit refcounts */
        put_be32(cluster + 100, QCOW2_HEADER_READ); /* header length; 104: zlib, then padding */
        off = QCOW2_HEADER_READ;
        put_be32(cluster + off, QCOW2_EXT_BACKING_FORMAT);
        put_be32(cluster + off + 4, (uint32_t) format_len);
        memcpy(cluster + off + 8, backing_format, format_len);
        off += 8 + ext_len;
        put_be32(cluster + off, QCOW2_EXT_END); /* and a length of 0 */
        memcpy(cluster + backing_off, backing, backing_len);
        r = pwrite_full(fd, cluster, backing_off + backing_len, 0);
        if (r < 0)
                return image_error(ret_error, r, "Failed to write the qcow2 header: %s", strerror(-r));

        /* Cluster 1: the refcount table, one entry: the block in cluster 2. */
        memset(cluster, 0, OVERLAY_CLUSTER_SIZE);
        put_be64(cluster, 2 * (uint64_t) OVERLAY_CLUSTER_SIZE);
        r = pwrite_full(fd, cluster, 8, 1 * (uint64_t) OVERLAY_CLUSTER_SIZE);
        if (r < 0)
                return image_error(ret_error, r, "Failed to write the refcount table: %s", strerror(-r));

        /* Cluster 2: every cluster of the file is used once. */
        memset(cluster, 0, OVERLAY_CLUSTER_SIZE);
        for (uint64_t i = 0; i < n_clusters; i++) {
                cluster[2 * i] = 0;
                cluster[2 * i + 1] = 1;
        }
        r = pwrite_full(fd, cluster, 2 * n_clusters, 2 * (uint64_t) OVERLAY_CLUSTER_SIZE);
        if (r < 0)
                return image_error(ret_error, r, "Failed to write the refcount block: %s", strerror(-r));

        /* The L1 table: zeros, so the file only needs to reach its end. */
        if (ftruncate(fd, (off_t) (3 * (uint64_t) OVERLAY_CLUSTER_SIZE + l1_bytes)) < 0)
                return image_error(ret_error, -errno, "Failed to extend the new image over its L1 table: %m");
        return 0;
}
