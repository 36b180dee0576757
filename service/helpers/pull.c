/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* blockstream-pull: reads a byte range of a disk through QEMU's NBD server, so that the
 * copy-on-read filter under the export copies what it reads into the top image (--pull), or
 * reports the disk's allocation map (--map). It never writes anything itself: QEMU does the
 * copying. Started by blockstreamd only, in the guest's sandbox.
 *
 * fd 3: a connected NBD socket (AF_UNIX stream), nothing sent on it yet
 * fd 4: the daemon (AF_UNIX SOCK_SEQPACKET), one line of ASCII per message, at most 256 bytes:
 *   pull → daemon: "ready", "progress DONE TOTAL", "extent OFFSET LENGTH DEPTH KIND", "done",
 *                  "error TEXT"
 *   daemon → pull: "bandwidth N", "pause", "resume", "stop"
 *
 * After the NBD handshake it confines itself with a seccomp allow-list: from then on it can talk
 * on its two sockets, write its log, poll and manage its memory, and nothing else. One poll loop,
 * one thread, libnbd's asynchronous API; all read buffers are allocated before the filter. */

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <libnbd.h>
#include <limits.h>
#include <poll.h>
#include <seccomp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>

#include "util.h"

#define NBD_FD 3
#define CONTROL_FD 4
#define CONTROL_MSG_MAX 256
#define CONTROL_FDS_MAX 8 /* room to see (and close) fds the daemon should not have sent */

#define KIB ((uint64_t) 1024)
#define MIB (1024 * KIB)
#define GIB (1024 * MIB)

#define CHUNK_DEFAULT (2 * MIB)
#define CHUNK_MIN (4 * KIB)
#define CHUNK_MAX (32 * MIB) /* what QEMU's NBD server takes in one read */
#define PARALLEL_DEFAULT 8
#define PARALLEL_MAX 64
#define MAX_EXTENTS_DEFAULT 65536
#define NBD_NAME_MAX 4096 /* the NBD protocol's limit on export names */

/* One block status request asks about at most this much: NBD lengths are 32 bits, and a server
 * may scan less than asked anyway (we continue from where its answer ends). */
#define STATUS_WINDOW (1 * GIB)
/* Reads are cut to multiples of this where the chunk allows: qcow2's default cluster size, the
 * unit in which QEMU's copy-on-read copies anyway. */
#define CLUSTER_HINT (64 * KIB)
#define PROGRESS_INTERVAL_USEC (250 * USEC_PER_MSEC)
#define ERROR_SEND_TIMEOUT_MSEC 1000

#define CONTEXT_ALLOCATION LIBNBD_CONTEXT_BASE_ALLOCATION
#define CONTEXT_DEPTH "qemu:allocation-depth"

/* What the loop does next, besides carrying on (0) or failing (-errno). */
enum {
        PULL_DONE = 1, /* all done: "done", exit 0 */
        PULL_STOP,     /* "stop", or the daemon went away: exit 0 at once, no "done" */
};

typedef enum Mode {
        MODE_NONE,
        MODE_PULL,
        MODE_MAP,
} Mode;

typedef enum Kind {
        KIND_LOCAL,
        KIND_ZERO,
        KIND_BACKING,
        KIND_ABSENT,
} Kind;

static const char *const kind_names[] = {
        [KIND_LOCAL] = "local",
        [KIND_ZERO] = "zero",
        [KIND_BACKING] = "backing",
        [KIND_ABSENT] = "absent",
};

enum {
        CTX_ALLOCATION,
        CTX_DEPTH,
        _CTX_MAX,
};

typedef struct Args {
        Mode mode;
        const char *export_name;
        uint64_t offset, length;
        bool have_offset, have_length;
        uint64_t bandwidth;
        uint64_t chunk;
        uint64_t parallel;
        uint64_t max_extents;
        bool no_cache;
} Args;

typedef struct Range {
        uint64_t offset, length;
} Range;

typedef struct Extent {
        uint64_t offset, length;
        uint32_t depth;
        Kind kind;
} Extent;

/* The answer to one block status request, both contexts as the server sent them. */
typedef struct Status {
        uint64_t offset, length;     /* what we asked about */
        uint32_t *entries[_CTX_MAX]; /* (length, flags) pairs */
        size_t n_entries[_CTX_MAX], allocated[_CTX_MAX];
        bool seen[_CTX_MAX];
        bool busy;     /* in flight */
        bool complete; /* answered, not looked at yet */
        int error;
} Status;

typedef struct Pull Pull;

/* One read in flight. Its buffer only receives data to throw away. */
typedef struct Slot {
        Pull *pull;
        void *buf;
        uint64_t offset, length;
        bool busy;
} Slot;

struct Pull {
        const Args *args;
        struct nbd_handle *nbd;
        uint64_t start, end; /* the range */
        uint64_t align;      /* the server's minimum block size: reads and the range are multiples */
        uint64_t chunk;      /* the largest read: --chunk within the server's limits */

        Status status;
        uint64_t status_pos; /* the next offset to ask block status about */

        /* --pull: what is still to read, in order (consumed from todo_head) */
        Range *todo;
        size_t n_todo, todo_head, todo_allocated;
        uint64_t todo_bytes;
        Slot *slots;
        size_t n_slots, n_busy;
        int read_error;
        uint64_t read_error_offset, read_error_length;
        uint64_t done, reported; /* bytes dealt with: read, or found already local */
        usec_t reported_at;
        bool paused;
        uint64_t rate;  /* bytes per second, 0: unlimited */
        double tokens;  /* the bucket, at most read_size() */
        usec_t refilled_at;

        /* --map */
        Extent pending; /* the extent being grown by its equal neighbours */
        bool have_pending;
        uint64_t n_extents;
        bool map_full;
        bool can_cache; /* the server takes NBD_CMD_CACHE: copy without transferring */
};

static bool control_ok;   /* fd 4 is the daemon's socket */
static bool control_gone; /* ... and the daemon closed it: exit at once, nobody to tell */

#ifdef PULL_SELFTEST
/* Test builds only: BLOCKSTREAM_PULL_SELFTEST=word,… with
 *   open, socket   try that syscall right after "ready" (the filter must kill us with SIGSYS)
 *   valgrind       also allow what valgrind's own machinery needs, so memcheck can run */
static bool selftest_has(const char *word) {
        const char *e = getenv("BLOCKSTREAM_PULL_SELFTEST");
        size_t l = strlen(word);

        for (const char *p = e; p && *p; p += strcspn(p, ","), p += !!*p)
                if (strncmp(p, word, l) == 0 && (p[l] == ',' || p[l] == 0))
                        return true;
        return false;
}
#endif

/* Printable ASCII for a message or a log line; anything else becomes '?'. */
static char *sanitize(char *s) {
        for (char *p = s; *p; p++)
                if (*p < 0x20 || *p >= 0x7f)
                        *p = '?';
        return s;
}

static int control_send_line(const char *line) {
        size_t len = strlen(line);

        for (;;) {
                /* Blocking: the daemon reads what we send, and one that stops reading kills us. */
                if (send(CONTROL_FD, line, len, MSG_NOSIGNAL) >= 0)
                        return 0;
                if (errno == EPIPE || errno == ECONNRESET)
                        control_gone = true;
                if (errno != EINTR)
                        return -errno;
        }
}

_printf_(1, 2) static int control_send(const char *format, ...) {
        char line[CONTROL_MSG_MAX + 1];
        va_list ap;
        int n;

        va_start(ap, format);
        n = vsnprintf(line, sizeof(line), format, ap);
        va_end(ap);
        if (n < 0 || (size_t) n > CONTROL_MSG_MAX)
                return -EMSGSIZE;
        return control_send_line(line);
}

/* A fatal error: log it, tell the daemon, and return -error for main to exit with. */
_printf_(2, 3) static int pull_fail(int error, const char *format, ...) {
        char text[CONTROL_MSG_MAX - sizeof("error \n") + 1];
        va_list ap;

        error = abs(error) ?: EIO;
        errno = error;
        va_start(ap, format);
        vsnprintf(text, sizeof(text), format, ap);
        va_end(ap);
        sanitize(text);
        log_error("%s", text);

        if (control_ok && !control_gone) {
                struct pollfd p = { .fd = CONTROL_FD, .events = POLLOUT };

                /* Blocking send, but the daemon may be gone or stuck: don't wait for it forever. */
                if (poll(&p, 1, ERROR_SEND_TIMEOUT_MSEC) > 0 && (p.revents & POLLOUT))
                        (void) control_send("error %s\n", text);
        }
        return -error;
}

static int nbd_fail(const char *what) {
        return pull_fail(nbd_get_errno() ?: EIO, "%s: %s", what, strempty(nbd_get_error()));
}

/* Strictly decimal, as the protocol says: digits only, no sign, no spaces, no suffix. */
static int parse_decimal(const char *s, uint64_t *ret) {
        uint64_t v = 0;

        if (!*s || strlen(s) > 20)
                return -EINVAL;
        for (const char *p = s; *p; p++) {
                if (*p < '0' || *p > '9')
                        return -EINVAL;
                if (__builtin_mul_overflow(v, 10, &v) || __builtin_add_overflow(v, (uint64_t) (*p - '0'), &v))
                        return -ERANGE;
        }
        *ret = v;
        return 0;
}

static uint64_t align_down(uint64_t v, uint64_t a) {
        return v - v % a;
}

/* The size of the next read: the chunk, but no more than a quarter second's worth of bandwidth,
 * so that a low limit is met in several small steps rather than one burst a second. */
static uint64_t read_size(const Pull *p) {
        uint64_t n = p->chunk;

        if (p->rate > 0)
                n = MIN(n, p->rate / 4);
        /* Not below 4 KiB: copy-on-read copies whole clusters whatever the size of a read. */
        n = MAX(align_down(n, p->align), MAX(p->align, CHUNK_MIN));
        if (n >= CLUSTER_HINT)
                n = align_down(n, CLUSTER_HINT);
        return n;
}

/* The token bucket holds at most one read_size(): after an idle spell (pause, local extents) one
 * read may go at once, and then one per read_size()/rate seconds. So over any second no more
 * than the limit plus one read goes out, and one read is at most a quarter of the limit. */
static void bucket_refill(Pull *p, usec_t now) {
        if (p->rate == 0)
                return;
        if (now > p->refilled_at)
                p->tokens = MIN((double) read_size(p),
                        p->tokens + (double) (now - p->refilled_at) * (double) p->rate / (double) USEC_PER_SEC);
        p->refilled_at = now;
}

static void pull_set_rate(Pull *p, uint64_t rate, usec_t now) {
        if (p->rate > 0)
                bucket_refill(p, now);
        else
                p->tokens = 0; /* from unlimited: the new limit starts counting now */
        p->rate = rate;
        p->refilled_at = now;
        if (rate > 0)
                p->tokens = MIN(p->tokens, (double) read_size(p));
        log_debug("Bandwidth limit %" PRIu64 " B/s, reads of %" PRIu64 " bytes.", rate, read_size(p));
}

/* msg has room for a NUL after len bytes. */
static int control_handle(Pull *p, char *msg, size_t len) {
        uint64_t v;

        if (len == 0 || msg[len - 1] != '\n')
                goto malformed;
        msg[--len] = 0;
        for (size_t i = 0; i < len; i++)
                if (msg[i] < 0x20 || msg[i] >= 0x7f)
                        goto malformed;

        if (streq(msg, "stop"))
                return PULL_STOP;
        if (p->args->mode != MODE_PULL)
                goto malformed;
        if (streq(msg, "pause"))
                p->paused = true;
        else if (streq(msg, "resume"))
                p->paused = false;
        else if (strncmp(msg, "bandwidth ", 10) == 0 && parse_decimal(msg + 10, &v) >= 0)
                pull_set_rate(p, v, now_usec(CLOCK_MONOTONIC));
        else
                goto malformed;
        return 0;

malformed:
        msg[len] = 0;
        return pull_fail(EBADMSG, "Malformed message from the daemon: \"%s\"", sanitize(msg));
}

static void close_passed_fds(struct msghdr *mh) {
        for (struct cmsghdr *c = CMSG_FIRSTHDR(mh); c; c = CMSG_NXTHDR(mh, c))
                if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
                        for (size_t i = 0; i < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int); i++) {
                                int fd;

                                memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
                                close(fd);
                        }
}

/* Everything the daemon has sent. */
static int control_receive(Pull *p) {
        for (;;) {
                char buf[CONTROL_MSG_MAX + 2]; /* one byte more than allowed, and a NUL */
                union {
                        struct cmsghdr align;
                        char buf[CMSG_SPACE(sizeof(int) * CONTROL_FDS_MAX)];
                } control;
                struct iovec iov = { .iov_base = buf, .iov_len = CONTROL_MSG_MAX + 1 };
                struct msghdr mh = {
                        .msg_iov = &iov,
                        .msg_iovlen = 1,
                        .msg_control = &control,
                        .msg_controllen = sizeof(control),
                };
                ssize_t n;
                int r;

                n = recvmsg(CONTROL_FD, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        if (errno == EAGAIN)
                                return 0;
                        if (errno == ECONNRESET) {
                                control_gone = true;
                                return PULL_STOP;
                        }
                        return pull_fail(errno, "Failed to receive from the daemon: %m");
                }
                if (n == 0) {
                        log_debug("The daemon went away, exiting.");
                        control_gone = true;
                        return PULL_STOP;
                }
                if (mh.msg_controllen > 0) {
                        close_passed_fds(&mh);
                        return pull_fail(EBADMSG, "Malformed message from the daemon: unexpected ancillary data.");
                }
                if ((mh.msg_flags & MSG_TRUNC) || n > CONTROL_MSG_MAX)
                        return pull_fail(EBADMSG, "Malformed message from the daemon: longer than %d bytes.",
                                CONTROL_MSG_MAX);

                r = control_handle(p, buf, (size_t) n);
                if (r != 0)
                        return r;
        }
}

static void status_reset(Status *s) {
        for (size_t i = 0; i < _CTX_MAX; i++) {
                s->n_entries[i] = 0;
                s->seen[i] = false;
        }
        s->busy = s->complete = false;
        s->error = 0;
}

static int status_extent(void *userdata, const char *metacontext, uint64_t offset, uint32_t *entries,
        size_t n_entries, int *error) {
        Status *s = userdata;
        size_t c;

        if (streq(metacontext, CONTEXT_ALLOCATION))
                c = CTX_ALLOCATION;
        else if (streq(metacontext, CONTEXT_DEPTH))
                c = CTX_DEPTH;
        else
                return 0; /* not asked for */

        /* One answer per context, for what we asked. */
        if (s->seen[c] || offset != s->offset || n_entries % 2 != 0) {
                *error = EPROTO;
                return -1;
        }
        s->seen[c] = true;

        if (n_entries > s->allocated[c]) {
                uint32_t *e = reallocarray(s->entries[c], n_entries, sizeof(uint32_t));
                if (!e) {
                        *error = ENOMEM;
                        return -1;
                }
                s->entries[c] = e;
                s->allocated[c] = n_entries;
        }
        memcpy(s->entries[c], entries, n_entries * sizeof(uint32_t));
        s->n_entries[c] = n_entries;
        return 0;
}

static int status_complete(void *userdata, int *error) {
        Status *s = userdata;

        s->busy = false;
        s->complete = true;
        s->error = *error;
        return 1; /* retire the command */
}

static int status_issue(Pull *p) {
        Status *s = &p->status;
        int64_t cookie;

        status_reset(s);
        s->offset = p->status_pos;
        s->length = MIN(p->end - p->status_pos, STATUS_WINDOW);
        cookie = nbd_aio_block_status(p->nbd, s->length, s->offset,
                (nbd_extent_callback) { .callback = status_extent, .user_data = s },
                (nbd_completion_callback) { .callback = status_complete, .user_data = s }, 0);
        if (cookie < 0)
                return nbd_fail("Failed to ask for block status");
        s->busy = true;
        return 0;
}

static Kind classify(uint32_t depth, uint32_t flags) {
        if (depth == 0)
                return KIND_ABSENT;
        if (depth >= 2)
                return KIND_BACKING;
        return flags & LIBNBD_STATE_ZERO ? KIND_ZERO : KIND_LOCAL;
}

static int map_emit(Pull *p, const Extent *e) {
        int r;

        r = control_send("extent %" PRIu64 " %" PRIu64 " %" PRIu32 " %s\n", e->offset, e->length, e->depth,
                kind_names[e->kind]);
        if (r < 0)
                return r;
        p->n_extents++;
        if (p->n_extents >= p->args->max_extents)
                p->map_full = true;
        return 0;
}

/* Adjacent pieces with the same depth and kind are one extent; one is sent once the next
 * differs, or at the end. */
static int map_add(Pull *p, uint64_t offset, uint64_t length, uint32_t depth, uint32_t flags) {
        Kind kind = classify(depth, flags);
        int r;

        if (p->have_pending && p->pending.depth == depth && p->pending.kind == kind &&
                p->pending.offset + p->pending.length == offset) {
                p->pending.length += length;
                return 0;
        }
        if (p->have_pending) {
                r = map_emit(p, &p->pending);
                if (r < 0)
                        return r;
                if (p->map_full) {
                        p->have_pending = false;
                        return PULL_DONE;
                }
        }
        p->pending = (Extent) { .offset = offset, .length = length, .depth = depth, .kind = kind };
        p->have_pending = true;
        return 0;
}

static int todo_push(Pull *p, uint64_t offset, uint64_t length) {
        Range *last = p->n_todo > p->todo_head ? &p->todo[p->n_todo - 1] : NULL;

        p->todo_bytes += length;
        if (last && last->offset + last->length == offset) {
                last->length += length;
                return 0;
        }
        if (p->todo_head == p->n_todo)
                p->todo_head = p->n_todo = 0;
        if (p->n_todo == p->todo_allocated) {
                size_t n = MAX(p->todo_allocated * 2, (size_t) 64);
                Range *t;

                if (p->todo_head > 0) {
                        /* Move the live part to the front before growing. */
                        memmove(p->todo, p->todo + p->todo_head, (p->n_todo - p->todo_head) * sizeof(Range));
                        p->n_todo -= p->todo_head;
                        p->todo_head = 0;
                }
                if (p->n_todo == p->todo_allocated) {
                        t = reallocarray(p->todo, n, sizeof(Range));
                        if (!t)
                                return -ENOMEM;
                        p->todo = t;
                        p->todo_allocated = n;
                }
        }
        p->todo[p->n_todo++] = (Range) { .offset = offset, .length = length };
        return 0;
}

static int pull_add(Pull *p, uint64_t offset, uint64_t length, uint32_t depth, uint32_t flags) {
        /* Only what is still in a backing image needs reading; the rest is done already. (Through
         * QEMU 7.2's copy-on-read filter the backing images' depths read one more than through
         * the top node itself, but the top is still 1.) */
        if (depth >= 2)
                return todo_push(p, offset, length);
        p->done += length;
        return 0;
}

/* Cut the answer at every boundary of either context and hand on the pieces in order. The two
 * contexts may end at different places: only what both describe is used, the rest is asked
 * again. */
static int status_process(Pull *p) {
        Status *s = &p->status;
        const uint32_t *a = s->entries[CTX_ALLOCATION], *d = s->entries[CTX_DEPTH];
        size_t na = s->n_entries[CTX_ALLOCATION] / 2, nd = s->n_entries[CTX_DEPTH] / 2, ia = 0, id = 0;
        uint64_t pos = s->offset, end = s->offset + s->length, a_end, d_end;
        int r;

        s->complete = false;
        if (s->error != 0)
                return pull_fail(s->error, "Block status of %" PRIu64 "+%" PRIu64 " failed: %m", s->offset,
                        s->length);
        if (na == 0 || nd == 0)
                return pull_fail(EPROTO, "The NBD server sent no %s for %" PRIu64 "+%" PRIu64 ".",
                        na == 0 ? CONTEXT_ALLOCATION : CONTEXT_DEPTH, s->offset, s->length);

        a_end = pos + a[0];
        d_end = pos + d[0];
        for (;;) {
                uint64_t piece_end;

                /* Zero-length extents are a server's bug; pass over them. */
                while (ia < na && a_end <= pos)
                        if (++ia < na)
                                a_end += a[2 * ia];
                while (id < nd && d_end <= pos)
                        if (++id < nd)
                                d_end += d[2 * id];
                if (ia >= na || id >= nd || pos >= end)
                        break;

                piece_end = MIN(MIN(a_end, d_end), end);
                if (p->args->mode == MODE_MAP)
                        r = map_add(p, pos, piece_end - pos, d[2 * id + 1], a[2 * ia + 1]);
                else
                        r = pull_add(p, pos, piece_end - pos, d[2 * id + 1], a[2 * ia + 1]);
                if (r < 0)
                        return r == -ENOMEM ? pull_fail(r, "Out of memory.") : r;
                pos = piece_end;
                if (r == PULL_DONE)
                        break;
        }

        if (pos == s->offset)
                return pull_fail(EPROTO, "The NBD server's block status for %" PRIu64 "+%" PRIu64 " is empty.",
                        s->offset, s->length);
        p->status_pos = pos;
        return 0;
}

static int read_chunk(void *userdata, const void *subbuf, size_t count, uint64_t offset, unsigned status,
        int *error) {
        return 0; /* the data is thrown away */
}

static int read_complete(void *userdata, int *error) {
        Slot *slot = userdata;
        Pull *p = slot->pull;

        slot->busy = false;
        p->n_busy--;
        if (*error != 0) {
                if (p->read_error == 0) {
                        p->read_error = *error;
                        p->read_error_offset = slot->offset;
                        p->read_error_length = slot->length;
                }
        } else
                p->done += slot->length;
        return 1; /* retire the command */
}

static Slot *slot_free(Pull *p) {
        for (size_t i = 0; i < p->n_slots; i++)
                if (!p->slots[i].busy)
                        return &p->slots[i];
        return NULL;
}

/* Send what may go now. *ret_wait: how long until the bucket lets the next read go, if that is
 * what holds it back. */
static int pull_issue(Pull *p, usec_t now, usec_t *ret_wait) {
        *ret_wait = USEC_INFINITY;
        if (p->paused)
                return 0;

        /* Keep the list of what to read a window ahead of the reads. */
        if (!p->status.busy && !p->status.complete && p->status_pos < p->end && p->todo_bytes < STATUS_WINDOW) {
                int r = status_issue(p);
                if (r < 0)
                        return r;
        }

        while (p->n_busy < p->n_slots && p->todo_head < p->n_todo) {
                Range *t = &p->todo[p->todo_head];
                uint64_t n = MIN(read_size(p), t->length);
                Slot *slot;
                int64_t cookie;

                if (p->rate > 0) {
                        bucket_refill(p, now);
                        if (p->tokens < (double) n) {
                                double missing = (double) n - p->tokens;
                                *ret_wait = (usec_t) (missing * (double) USEC_PER_SEC / (double) p->rate) + 1;
                                break;
                        }
                        p->tokens -= (double) n;
                }

                slot = slot_free(p);
                if (!slot)
                        break; /* cannot happen: n_busy counts them */
                slot->pull = p;
                slot->offset = t->offset;
                slot->length = n;
                slot->busy = true;
                p->n_busy++;
                if (p->can_cache)
                        /* NBD_CMD_CACHE: QEMU's server prefetches through the copy-on-read filter
                         * (BDRV_REQ_PREFETCH), which copies without sending us the data. */
                        cookie = nbd_aio_cache(p->nbd, n, t->offset,
                                (nbd_completion_callback) { .callback = read_complete, .user_data = slot }, 0);
                else
                        /* "Don't fragment": otherwise QEMU's server answers the parts it knows to be
                         * zero with holes, without reading them, and the filter never sees them. */
                        cookie = nbd_aio_pread_structured(p->nbd, slot->buf, n, t->offset,
                                (nbd_chunk_callback) { .callback = read_chunk },
                                (nbd_completion_callback) { .callback = read_complete, .user_data = slot },
                                LIBNBD_CMD_FLAG_DF);
                if (cookie < 0) {
                        slot->busy = false;
                        p->n_busy--;
                        return nbd_fail("Failed to send a read");
                }

                t->offset += n;
                t->length -= n;
                p->todo_bytes -= n;
                if (t->length == 0)
                        p->todo_head++;
        }
        return 0;
}

static int map_issue(Pull *p) {
        if (p->status.busy || p->status.complete || p->map_full || p->status_pos >= p->end)
                return 0;
        return status_issue(p);
}

static bool pull_finished(const Pull *p) {
        if (p->status.busy || p->status.complete)
                return false;
        if (p->args->mode == MODE_MAP)
                return p->map_full || p->status_pos >= p->end;
        return p->status_pos >= p->end && p->todo_head == p->n_todo && p->n_busy == 0;
}

static int progress_send(Pull *p, usec_t now) {
        int r;

        r = control_send("progress %" PRIu64 " %" PRIu64 "\n", p->done, p->end - p->start);
        if (r < 0)
                return r;
        p->reported = p->done;
        p->reported_at = now;
        return 0;
}

static int pull_finish(Pull *p) {
        int r;

        if (p->args->mode == MODE_MAP) {
                if (p->have_pending && !p->map_full) {
                        r = map_emit(p, &p->pending);
                        if (r < 0)
                                return r;
                        p->have_pending = false;
                }
        } else {
                r = progress_send(p, now_usec(CLOCK_MONOTONIC));
                if (r < 0)
                        return r;
        }

        /* A clean NBD_CMD_DISC rather than a dropped connection in QEMU's log, without waiting
         * for the server to close its end. */
        if (nbd_aio_disconnect(p->nbd, 0) < 0)
                log_debug("NBD disconnect failed: %s", strempty(nbd_get_error()));
        return control_send("done\n");
}

static int pull_run(Pull *p) {
        int r;

        for (;;) {
                struct pollfd pfd[2];
                usec_t now, wait = USEC_INFINITY;
                unsigned dir;
                int timeout;

                if (p->status.complete) {
                        r = status_process(p);
                        if (r < 0)
                                return r;
                }
                /* A pull's read is QEMU's copy-on-read: a read of the backing chain and a write
                 * into the image (a full disk fails the write), not just a read. */
                if (p->read_error != 0 && p->args->mode == MODE_PULL)
                        return pull_fail(p->read_error,
                                "Failed to copy [%" PRIu64 ", +%" PRIu64 ") from the backing chain into the image: %m",
                                p->read_error_offset, p->read_error_length);
                if (p->read_error != 0)
                        return pull_fail(p->read_error, "Failed to read %" PRIu64 "+%" PRIu64 ": %m",
                                p->read_error_offset, p->read_error_length);
                if (pull_finished(p))
                        return PULL_DONE;

                now = now_usec(CLOCK_MONOTONIC);
                if (p->args->mode == MODE_MAP)
                        r = map_issue(p);
                else
                        r = pull_issue(p, now, &wait);
                if (r < 0)
                        return r;

                if (p->args->mode == MODE_PULL && p->done != p->reported) {
                        if (now >= p->reported_at + PROGRESS_INTERVAL_USEC) {
                                r = progress_send(p, now);
                                if (r < 0)
                                        return r;
                        } else
                                wait = MIN(wait, p->reported_at + PROGRESS_INTERVAL_USEC - now);
                }

                if (nbd_aio_is_dead(p->nbd) > 0 || nbd_aio_is_closed(p->nbd) > 0)
                        return pull_fail(ECONNRESET, "The NBD server closed the connection.");

                dir = nbd_aio_get_direction(p->nbd);
                pfd[0] = (struct pollfd) {
                        .fd = NBD_FD,
                        .events = (dir & LIBNBD_AIO_DIRECTION_READ ? POLLIN : 0) |
                                (dir & LIBNBD_AIO_DIRECTION_WRITE ? POLLOUT : 0),
                };
                pfd[1] = (struct pollfd) { .fd = CONTROL_FD, .events = POLLIN };
                timeout = wait == USEC_INFINITY ? -1 :
                        (int) MIN((wait + USEC_PER_MSEC - 1) / USEC_PER_MSEC, (usec_t) INT_MAX);

                if (poll(pfd, ELEMENTSOF(pfd), timeout) < 0) {
                        if (errno == EINTR)
                                continue;
                        return pull_fail(errno, "poll() failed: %m");
                }

                /* The daemon first: a "stop" or its going away ends us at once. */
                if (pfd[1].revents != 0) {
                        r = control_receive(p);
                        if (r != 0)
                                return r;
                }

                /* Both ways ready: reading first, as libnbd recommends. */
                if (pfd[0].revents & (POLLIN | POLLHUP | POLLERR)) {
                        if (nbd_aio_notify_read(p->nbd) < 0)
                                return nbd_fail("Failed to read from the NBD server");
                } else if (pfd[0].revents & POLLOUT) {
                        if (nbd_aio_notify_write(p->nbd) < 0)
                                return nbd_fail("Failed to write to the NBD server");
                }
        }
}

static void help(void) {
        printf("%s --pull|--map --export=NAME --offset=BYTES --length=BYTES [OPTIONS]\n\n"
               "Makes QEMU's NBD server copy the parts of a range that are still in a backing image\n"
               "into the top image (--pull): NBD_CMD_CACHE on an export of the top node, which QEMU\n"
               "serves with its copy-on-read, or reads through a copy-on-read filter (--no-cache).\n"
               "Or reports the range's allocation map (--map). Talks NBD on fd 3 and to blockstreamd\n"
               "on fd 4. Started by blockstreamd only.\n\n"
               "  -h --help               Show this help\n"
               "     --version            Show the version\n"
               "     --pull               Read the parts of the range still in a backing image\n"
               "     --map                Report extents: offset, length, depth, kind\n"
               "     --export=NAME        NBD export name\n"
               "     --offset=BYTES       Start of the range\n"
               "     --length=BYTES       Length of the range\n"
               "     --bandwidth=BYTES    Bytes per second, 0 for no limit (--pull; default 0)\n"
               "     --chunk=BYTES        Largest read, 4 KiB to 32 MiB (--pull; default 2 MiB)\n"
               "     --parallel=N         Reads in flight, 1 to 64 (--pull; default 8)\n"
               "     --no-cache           Read the data instead of NBD_CMD_CACHE (--pull; for an\n"
               "                          export of a copy-on-read filter, where a CACHE copies twice)\n"
               "     --max-extents=N      Stop after N extents (--map; default 65536)\n",
                program_invocation_short_name);
}

/* > 0: carry on; 0: exit successfully (--help); < 0: error. */
static int parse_argv(int argc, char *argv[], Args *args) {
        enum {
                ARG_VERSION = 0x100,
                ARG_PULL,
                ARG_MAP,
                ARG_EXPORT,
                ARG_OFFSET,
                ARG_LENGTH,
                ARG_BANDWIDTH,
                ARG_CHUNK,
                ARG_PARALLEL,
                ARG_MAX_EXTENTS,
                ARG_NO_CACHE,
        };
        static const struct option options[] = {
                { "help", no_argument, NULL, 'h' },
                { "version", no_argument, NULL, ARG_VERSION },
                { "pull", no_argument, NULL, ARG_PULL },
                { "map", no_argument, NULL, ARG_MAP },
                { "export", required_argument, NULL, ARG_EXPORT },
                { "offset", required_argument, NULL, ARG_OFFSET },
                { "length", required_argument, NULL, ARG_LENGTH },
                { "bandwidth", required_argument, NULL, ARG_BANDWIDTH },
                { "chunk", required_argument, NULL, ARG_CHUNK },
                { "parallel", required_argument, NULL, ARG_PARALLEL },
                { "max-extents", required_argument, NULL, ARG_MAX_EXTENTS },
                { "no-cache", no_argument, NULL, ARG_NO_CACHE },
                {},
        };
        uint64_t end;
        int c, r;

        *args = (Args) {
                .chunk = CHUNK_DEFAULT,
                .parallel = PARALLEL_DEFAULT,
                .max_extents = MAX_EXTENTS_DEFAULT,
        };

        opterr = 0;
        while ((c = getopt_long(argc, argv, "h", options, NULL)) >= 0) {
                uint64_t *v = NULL;
                const char *name = NULL;

                switch (c) {
                case 'h':
                        help();
                        return 0;
                case ARG_VERSION:
                        printf("blockstream-pull %s\n", VERSION);
                        return 0;
                case ARG_PULL:
                case ARG_MAP:
                        if (args->mode != MODE_NONE)
                                return pull_fail(EINVAL, "Only one of --pull and --map may be given.");
                        args->mode = c == ARG_PULL ? MODE_PULL : MODE_MAP;
                        break;
                case ARG_EXPORT:
                        args->export_name = optarg;
                        break;
                case ARG_OFFSET:
                        v = &args->offset, name = "--offset";
                        args->have_offset = true;
                        break;
                case ARG_LENGTH:
                        v = &args->length, name = "--length";
                        args->have_length = true;
                        break;
                case ARG_BANDWIDTH:
                        v = &args->bandwidth, name = "--bandwidth";
                        break;
                case ARG_CHUNK:
                        v = &args->chunk, name = "--chunk";
                        break;
                case ARG_PARALLEL:
                        v = &args->parallel, name = "--parallel";
                        break;
                case ARG_MAX_EXTENTS:
                        v = &args->max_extents, name = "--max-extents";
                        break;
                case ARG_NO_CACHE:
                        args->no_cache = true;
                        break;
                case '?':
                        if (optopt != 0)
                                return pull_fail(EINVAL, "Option %s needs an argument or takes none.",
                                        argv[optind - 1]);
                        return pull_fail(EINVAL, "Unknown option %s.", argv[optind - 1]);
                default:
                        return pull_fail(EINVAL, "Unknown option.");
                }
                if (v) {
                        r = parse_size(optarg, v);
                        if (r < 0)
                                return pull_fail(r, "Invalid value for %s: %s", name, optarg);
                }
        }
        if (optind < argc)
                return pull_fail(EINVAL, "This program takes no positional arguments (see --help).");

        if (args->mode == MODE_NONE)
                return pull_fail(EINVAL, "One of --pull and --map is needed.");
        /* "" is allowed: NBD's default export. */
        if (!args->export_name || strlen(args->export_name) > NBD_NAME_MAX)
                return pull_fail(EINVAL, "--export needs a name of at most %d bytes.", NBD_NAME_MAX);
        if (!args->have_offset || !args->have_length)
                return pull_fail(EINVAL, "--offset and --length are needed.");
        if (add_overflows_u64(args->offset, args->length, &end) || end > INT64_MAX)
                return pull_fail(ERANGE, "--offset plus --length is too large.");
        if (args->chunk < CHUNK_MIN || args->chunk > CHUNK_MAX)
                return pull_fail(ERANGE, "--chunk must be between %" PRIu64 " and %" PRIu64 " bytes.", CHUNK_MIN,
                        CHUNK_MAX);
        if (args->parallel < 1 || args->parallel > PARALLEL_MAX)
                return pull_fail(ERANGE, "--parallel must be between 1 and %d.", PARALLEL_MAX);
        if (args->max_extents < 1)
                return pull_fail(ERANGE, "--max-extents must be at least 1.");
        return 1;
}

static int check_socket(int fd, int want_type, int want_domain) {
        int type, domain;
        socklen_t l;

        l = sizeof(type);
        if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &l) < 0)
                return -errno;
        l = sizeof(domain);
        if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &l) < 0)
                return -errno;
        if (type != want_type || domain != want_domain)
                return -EINVAL;
        return 0;
}

static int nbd_open(Pull *p) {
        const Args *args = p->args;
        int64_t size, minimum, maximum;
        int r;

        /* Everything that might open a file or read the environment happens here, before the
         * filter: creating the handle and the handshake. */
        p->nbd = nbd_create();
        if (!p->nbd)
                return nbd_fail("Failed to create an NBD handle");
        if (nbd_set_handle_name(p->nbd, "pull") < 0 || nbd_set_export_name(p->nbd, args->export_name) < 0 ||
                nbd_add_meta_context(p->nbd, CONTEXT_ALLOCATION) < 0 ||
                nbd_add_meta_context(p->nbd, CONTEXT_DEPTH) < 0 ||
                /* The data is thrown away: no need to zero each buffer before every read. */
                nbd_set_pread_initialize(p->nbd, false) < 0)
                return nbd_fail("Failed to set up the NBD handle");

        if (nbd_connect_socket(p->nbd, NBD_FD) < 0)
                return nbd_fail("NBD handshake failed");
        /* The seccomp filter lets libnbd talk on fd 3 only. */
        if (nbd_aio_get_fd(p->nbd) != NBD_FD)
                return pull_fail(EBADF, "libnbd does not use fd %d as it was given.", NBD_FD);

        for (size_t i = 0; i < 2; i++) {
                const char *ctx = i == 0 ? CONTEXT_ALLOCATION : CONTEXT_DEPTH;

                r = nbd_can_meta_context(p->nbd, ctx);
                if (r < 0)
                        return nbd_fail("Failed to query the NBD meta contexts");
                if (r == 0)
                        return pull_fail(EPROTONOSUPPORT,
                                "NBD export \"%s\" does not offer the %s context%s.", args->export_name, ctx,
                                i == 0 ? "" : " (export it with allocation-depth)");
        }

        if (args->mode == MODE_PULL) {
                r = args->no_cache ? 0 : nbd_can_cache(p->nbd);
                if (r < 0)
                        return nbd_fail("Failed to query the NBD server's flags");
                /* Offered is not enough: a server may still refuse a prefetch (one whose export
                 * cannot write, say). Try it once, on the range's own first bytes (copying them is
                 * the job anyway); reads are the fallback. */
                p->can_cache = r > 0 && args->length > 0 && nbd_cache(p->nbd, MIN(args->length, 4096), args->offset, 0) == 0;
                r = nbd_can_df(p->nbd);
                if (r < 0)
                        return nbd_fail("Failed to query the NBD server's flags");
                if (r == 0)
                        return pull_fail(EPROTONOSUPPORT,
                                "NBD export \"%s\" does not take unfragmented reads: zeros in the backing would not be copied.",
                                args->export_name);
        }

        size = nbd_get_size(p->nbd);
        if (size < 0)
                return nbd_fail("Failed to get the export's size");
        if ((uint64_t) size < p->end)
                return pull_fail(ERANGE, "Range %" PRIu64 "+%" PRIu64 " is beyond the export's end (%" PRId64 ").",
                        args->offset, args->length, size);

        minimum = nbd_get_block_size(p->nbd, LIBNBD_SIZE_MINIMUM);
        maximum = nbd_get_block_size(p->nbd, LIBNBD_SIZE_MAXIMUM);
        if (minimum < 0 || maximum < 0)
                return nbd_fail("Failed to get the export's block sizes");
        /* QEMU always advertises one; without, libnbd checks nothing either. */
        p->align = minimum > 0 ? (uint64_t) minimum : 1;
        if (p->start % p->align != 0 || p->end % p->align != 0)
                return pull_fail(EINVAL, "Range %" PRIu64 "+%" PRIu64 " is not aligned to %" PRIu64 " bytes.",
                        args->offset, args->length, p->align);
        p->chunk = args->chunk;
        if (maximum > 0)
                p->chunk = MIN(p->chunk, (uint64_t) maximum);
        p->chunk = MAX(align_down(p->chunk, p->align), MAX(p->align, CHUNK_MIN));
        return 0;
}

/* Everything the loop and libnbd need once connected, and nothing else. No open, no socket, no
 * connect, no exec, no clone: even with the loop compromised, this process can only talk on the
 * two sockets it was given. */
static int install_allowlist(void) {
        static const char *const plain[] = {
                "poll",            /* the loop */
                "ppoll",           /* poll() where the architecture has no poll syscall */
                "clock_gettime",   /* the bucket and progress timing; normally the vDSO */
                "clock_gettime64", /* the same on 32-bit architectures */
                "brk",             /* malloc: libnbd allocates per command, we grow the read list */
                "munmap",
                "mremap",
                "madvise",         /* free() handing memory back */
                "futex",           /* libnbd's handle lock, should it ever be contended */
                "close",           /* nbd_close() at the end; fds the daemon should not have sent */
                "exit",
                "exit_group",
                "rt_sigreturn",
                "restart_syscall",
        };
        uint32_t deny = SCMP_ACT_KILL_PROCESS;
        scmp_filter_ctx ctx;
        int k;

#ifdef PULL_SELFTEST
        /* valgrind knows prctl(PR_SET_SECCOMP) but not seccomp(2), without which libseccomp
         * cannot tell that KILL_PROCESS exists. One thread: killing it kills the process. */
        if (selftest_has("valgrind"))
                deny = SCMP_ACT_KILL_THREAD;
#endif
        ctx = seccomp_init(deny);
        if (!ctx)
                return -ENOMEM;

        for (size_t i = 0; i < ELEMENTSOF(plain); i++) {
                int nr = seccomp_syscall_resolve_name(plain[i]);
                if (nr == __NR_SCMP_ERROR)
                        continue; /* not on this architecture */
                k = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, nr, 0);
                if (k < 0 && k != -EDOM)
                        goto finish;
        }

#define ALLOW(call, n, ...)                                                                     \
        do {                                                                                    \
                k = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(call), n, __VA_ARGS__);      \
                if (k < 0)                                                                      \
                        goto finish;                                                            \
        } while (0)

        /* NBD: libnbd's send() and recv() on its socket only. */
        ALLOW(sendto, 1, SCMP_A0(SCMP_CMP_EQ, NBD_FD));
        ALLOW(recvfrom, 1, SCMP_A0(SCMP_CMP_EQ, NBD_FD));
        /* nbd_aio_disconnect(): NBD_CMD_DISC, then a half-close of its socket. */
        ALLOW(shutdown, 2, SCMP_A0(SCMP_CMP_EQ, NBD_FD), SCMP_A1(SCMP_CMP_EQ, SHUT_WR));
        /* The daemon: our send(), its messages by recvmsg() (to see fds it should not send). */
        ALLOW(sendto, 1, SCMP_A0(SCMP_CMP_EQ, CONTROL_FD));
        ALLOW(recvmsg, 1, SCMP_A0(SCMP_CMP_EQ, CONTROL_FD));
        /* Log lines. */
        ALLOW(write, 1, SCMP_A0(SCMP_CMP_EQ, STDERR_FILENO));
        /* malloc's large blocks, never executable. */
        ALLOW(mmap, 1, SCMP_A2(SCMP_CMP_MASKED_EQ, PROT_EXEC, 0));
#undef ALLOW

#ifdef PULL_SELFTEST
        if (selftest_has("valgrind")) {
                /* valgrind runs its machinery in our process: signal masks and its scheduler's
                 * pipe lock around each syscall, polling for signals, memory for translations. */
                static const char *const vg[] = {
                        "rt_sigprocmask", "rt_sigtimedwait", "gettid", "getpid", "read", "write", "futex", "mmap",
                        "munmap", "mprotect", "brk",
                };
                for (size_t i = 0; i < ELEMENTSOF(vg); i++) {
                        k = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, seccomp_syscall_resolve_name(vg[i]), 0);
                        if (k < 0 && k != -EEXIST)
                                goto finish;
                }
        }
#endif

        k = seccomp_load(ctx);
finish:
        seccomp_release(ctx);
        return k;
}

static int pull_setup(Pull *p, const Args *args) {
        int r;

        *p = (Pull) {
                .args = args,
                .start = args->offset,
                .end = args->offset + args->length,
                .status_pos = args->offset,
        };

        r = check_socket(NBD_FD, SOCK_STREAM, AF_UNIX);
        if (r < 0)
                return pull_fail(r, "fd %d is not a connected AF_UNIX stream socket.", NBD_FD);

        /* A peer that goes away must cost an EPIPE, not our life. */
        if (signal(SIGPIPE, SIG_IGN) == SIG_ERR)
                return pull_fail(errno, "Failed to ignore SIGPIPE: %m");

        r = nbd_open(p);
        if (r < 0)
                return r;

        if (args->mode == MODE_PULL) {
                p->n_slots = args->parallel;
                p->slots = calloc(p->n_slots, sizeof(Slot));
                if (!p->slots)
                        return pull_fail(ENOMEM, "Out of memory.");
                for (size_t i = 0; i < p->n_slots; i++) {
                        p->slots[i].buf = malloc(p->chunk);
                        if (!p->slots[i].buf)
                                return pull_fail(ENOMEM, "Out of memory.");
                }
                p->rate = args->bandwidth;
                p->refilled_at = now_usec(CLOCK_MONOTONIC);
                p->tokens = p->rate > 0 ? (double) read_size(p) : 0;
        }

        if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
                return pull_fail(errno, "Failed to set no_new_privs: %m");
        r = install_allowlist();
        if (r < 0)
                return pull_fail(r, "Failed to install the seccomp filter: %m");

        r = control_send("ready\n");
        if (r < 0)
                return log_error_errno(r, "Failed to tell the daemon we are ready: %m");

#ifdef PULL_SELFTEST
        if (selftest_has("open"))
                (void) openat(AT_FDCWD, "/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (selftest_has("socket"))
                (void) socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
#endif
        return 0;
}

static void pull_free(Pull *p) {
        /* The handle first: closing it may still call the completion callbacks. */
        if (p->nbd)
                nbd_close(p->nbd);
        if (p->slots)
                for (size_t i = 0; i < p->n_slots; i++)
                        free(p->slots[i].buf);
        free(p->slots);
        free(p->todo);
        for (size_t i = 0; i < _CTX_MAX; i++)
                free(p->status.entries[i]);
        *p = (Pull) {};
}

int main(int argc, char *argv[]) {
        static Pull pull;
        Args args;
        int r;

        log_setup("blockstream-pull");

        /* Nothing but the NBD socket, the daemon and stdio. */
        if (close_range(CONTROL_FD + 1, ~0U, 0) < 0) {
                log_error_errno(errno, "Failed to close stray file descriptors: %m");
                return EXIT_FAILURE;
        }
        control_ok = check_socket(CONTROL_FD, SOCK_SEQPACKET, AF_UNIX) >= 0;

        r = parse_argv(argc, argv, &args);
        if (r <= 0)
                return r < 0 ? EXIT_FAILURE : EXIT_SUCCESS;

        /* Without the daemon there is nobody to tell: only the log. */
        if (!control_ok) {
                log_error("fd %d is not an AF_UNIX SOCK_SEQPACKET socket.", CONTROL_FD);
                return EXIT_FAILURE;
        }

        r = pull_setup(&pull, &args);
        if (r >= 0)
                r = pull_run(&pull);
        if (r == PULL_DONE)
                r = pull_finish(&pull);
        if (r == PULL_STOP || control_gone)
                r = 0;
        pull_free(&pull);
        return r < 0 ? EXIT_FAILURE : EXIT_SUCCESS;
}
