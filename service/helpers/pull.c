/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* blockstream-pull: reads a byte range of a disk through QEMU's NBD server, so that the
 * copy-on-read filter under the export copies what it reads into the top image (--pull), or
 * reports the disk's allocation map (--map). It never writes anything itself: QEMU does the
 * copying. Started by blockstreamd only, in the guest's sandbox.
 *
 * fd 3: a connected NBD socket (AF_UNIX stream), nothing sent on it yet
 * fd 4: the daemon (AF_UNIX SOCK_SEQPACKET), one line of ASCII per message, at most 256 bytes
 *       (control.c, shared with the daemon and blockstream-nbd-relay):
 *   pull → daemon: "ready", "progress DONE TOTAL", "extent OFFSET LENGTH DEPTH KIND", "done",
 *                  "error TEXT"
 *   daemon → pull: "bandwidth N", "pause", "resume", "stop"
 *
 * After the NBD handshake it confines itself with a seccomp allow-list: from then on it can talk
 * on its two sockets, write its log, poll and manage its memory, and nothing else. One poll loop,
 * one thread, libnbd's asynchronous API; all read buffers are allocated before the filter. */

#include <errno.h>
#include <fcntl.h>
#include <libnbd.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>

#include "control.h"
#include "helper-common.h"
#include "pull-args.h"
#include "pull-status.h"
#include "util.h"

#define NBD_FD 3

/* Reads are cut to multiples of this where the chunk allows: qcow2's default cluster size, the
 * unit in which QEMU's copy-on-read copies anyway. */
#define CLUSTER_HINT (64 * KIB)
#define READ_BUFFERS_MAX (UINT64_C(32) * MIB)
/* glibc's default mmap threshold, and QEMU 7.2's largest copy-on-read bounce buffer
 * (MAX_BOUNCE_BUFFER): see first_cache_size(). */
#define GLIBC_MMAP_THRESHOLD_DEFAULT (128 * KIB)
#define QEMU_BOUNCE_BUFFER_MAX (UINT64_C(16) * MIB)
/* What glibc adds to an aligned block of QEMU's: the alignment and the chunk header, in pages. */
#define BOUNCE_OVERHEAD (8 * KIB)
#define PROGRESS_INTERVAL_USEC (250 * USEC_PER_MSEC)

/* What the loop does next, besides carrying on (0) or failing (-errno). */
enum {
        PULL_DONE = 1, /* all done: "done", exit 0 */
        PULL_STOP,     /* "stop", or the daemon went away: exit 0 at once, no "done" */
};

typedef struct Range {
        uint64_t offset, length;
} Range;

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
        MapMerge merge;
        uint64_t n_extents;
        bool map_full;
        bool can_cache; /* the server takes NBD_CMD_CACHE: copy without transferring */
        uint64_t first_cache; /* the size of the first CACHE, if not the chunk's; then 0 */
};

#ifdef PULL_SELFTEST
/* Test builds only: BLOCKSTREAM_PULL_SELFTEST=word,… with the words of helper-common.h. */
#define SELFTEST_ENV "BLOCKSTREAM_PULL_SELFTEST"
#else
#define SELFTEST_ENV NULL
#endif
#define selftest_has(word) helper_selftest_has(SELFTEST_ENV, word)

static int control_send_message(const ControlPullMessage *m) {
        int r;

        /* Blocking: the daemon reads what we send, and one that stops reading kills us. */
        r = control_send_pull(CONTROL_FD, MSG_NOSIGNAL, m);
        if (r == -EPIPE || r == -ECONNRESET)
                helper_control_gone = true;
        return r;
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

/* QEMU copies each CACHE through a bounce buffer of the request's size. Above glibc's mmap
 * threshold those come from mmap, or from a heap glibc trims each time a batch of them is freed
 * (QEMU serves 16 requests at once), so every page of every copy is faulted in anew. glibc raises
 * its thresholds when it frees an mmapped block: to that block's size, trimming only beyond twice
 * it. So where the chunk is above the default threshold, one CACHE is as large as QEMU's largest
 * bounce buffer (the first that finds that much to copy in one piece, with no rate set: the
 * bucket holds one chunk's worth), and no more chunks go in flight than that heap holds
 * (pull_setup()): the heap then grows once and stays. Paired runs of a prefetch behind 5 ms
 * (README, Performance): 1.23 s against 1.79 s (medians of 6), page faults 2.9 % of QEMU's
 * profile instead of 12.7 %. */
static uint64_t first_cache_size(const Pull *p, uint64_t maximum) {
        uint64_t n = QEMU_BOUNCE_BUFFER_MAX;

        if (!p->can_cache || p->chunk <= GLIBC_MMAP_THRESHOLD_DEFAULT)
                return 0;
        if (maximum > 0)
                n = MIN(n, maximum);
        n = align_down(n, MAX(p->align, CLUSTER_HINT));
        return n > p->chunk ? n : 0;
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

/* One message from the daemon (control.c has the form, this the sense). */
static int control_handle(Pull *p, ControlDatagram *d) {
        char safe[CONTROL_MESSAGE_MAX + 1];
        ControlCommand cmd;

        helper_sanitize(safe, sizeof(safe), d->buf, d->len > 0 && d->buf[d->len - 1] == '\n' ? d->len - 1 : d->len);
        if (control_parse_command(d->buf, d->len, &cmd) < 0)
                goto malformed;

        if (cmd.kind == CONTROL_COMMAND_STOP)
                return PULL_STOP;
        if (p->args->mode != MODE_PULL)
                goto malformed;
        if (cmd.kind == CONTROL_COMMAND_PAUSE)
                p->paused = true;
        else if (cmd.kind == CONTROL_COMMAND_RESUME)
                p->paused = false;
        else if (cmd.kind == CONTROL_COMMAND_BANDWIDTH)
                pull_set_rate(p, cmd.number, now_usec(CLOCK_MONOTONIC));
        else
                goto malformed;
        return 0;

malformed:
        return helper_fail(EBADMSG, "Malformed message from the daemon: \"%s\"", safe);
}

/* Everything the daemon has sent. */
static int control_receive(Pull *p) {
        for (;;) {
                ControlDatagram d;
                int r;

                r = control_receive_datagram(CONTROL_FD, &d);
                if (r == 0)
                        return 0;
                if (r == -ECONNRESET) {
                        log_debug("The daemon went away, exiting.");
                        helper_control_gone = true;
                        return PULL_STOP;
                }
                if (r == -EMSGSIZE)
                        return helper_fail(EBADMSG, "Malformed message from the daemon: longer than %d bytes.",
                                CONTROL_MESSAGE_MAX);
                if (r == -EBADMSG || (r > 0 && d.n_fds > 0)) {
                        if (r > 0)
                                control_datagram_close_fds(&d);
                        return helper_fail(EBADMSG, "Malformed message from the daemon: unexpected ancillary data.");
                }
                if (r < 0)
                        return helper_fail(r, "Failed to receive from the daemon: %m");

                r = control_handle(p, &d);
                if (r != 0)
                        return r;
        }
}

static int map_emit(Pull *p, const Extent *e) {
        int r;

        r = control_send_message(&(ControlPullMessage) {
                .kind = CONTROL_PULL_EXTENT,
                .offset = e->offset,
                .length = e->length,
                .depth = e->depth,
                .extent_kind = e->kind,
        });
        if (r < 0)
                return r;
        p->n_extents++;
        if (p->n_extents >= p->args->max_extents)
                p->map_full = true;
        return 0;
}

/* Block status of the next window of the range. */
static int status_issue_next(Pull *p) {
        return status_issue(&p->status, p->nbd, p->status_pos, MIN(p->end - p->status_pos, STATUS_WINDOW));
}

/* A piece of the map: an extent is sent once the next differs, or at the end. */
static int map_piece(void *userdata, uint64_t offset, uint64_t length, uint32_t depth, uint32_t flags) {
        Pull *p = userdata;
        Extent e;
        int r;

        if (map_merge_add(&p->merge, offset, length, depth, flags, &e) == 0)
                return 0;
        r = map_emit(p, &e);
        if (r < 0)
                return r;
        if (p->map_full) {
                p->merge.have_pending = false;
                return PULL_DONE;
        }
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

static int pull_add(void *userdata, uint64_t offset, uint64_t length, uint32_t depth, uint32_t flags) {
        Pull *p = userdata;

        /* Only what is still in a backing image needs reading; the rest is done already. (Through
         * QEMU 7.2's copy-on-read filter the backing images' depths read one more than through
         * the top node itself, but the top is still 1.) */
        if (depth >= 2)
                return todo_push(p, offset, length);
        p->done += length;
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
                int r = status_issue_next(p);
                if (r < 0)
                        return r;
        }

        while (p->n_busy < p->n_slots && p->todo_head < p->n_todo) {
                Range *t = &p->todo[p->todo_head];
                uint64_t n = MIN(read_size(p), t->length);
                Slot *slot;
                int64_t cookie;

                /* On the first piece long enough for it, while no rate holds the reads back. */
                if (p->first_cache > 0 && p->rate == 0 && t->length >= p->first_cache) {
                        n = p->first_cache;
                        p->first_cache = 0;
                }

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
        return status_issue_next(p);
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

        r = control_send_message(
                &(ControlPullMessage) { .kind = CONTROL_PULL_PROGRESS, .done = p->done, .total = p->end - p->start });
        if (r < 0)
                return r;
        p->reported = p->done;
        p->reported_at = now;
        return 0;
}

static int pull_finish(Pull *p) {
        int r;

        if (p->args->mode == MODE_MAP) {
                if (p->merge.have_pending && !p->map_full) {
                        r = map_emit(p, &p->merge.pending);
                        if (r < 0)
                                return r;
                        p->merge.have_pending = false;
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
        return control_send_message(&(ControlPullMessage) { .kind = CONTROL_PULL_DONE });
}

static int pull_run(Pull *p) {
        int r;

        for (;;) {
                struct pollfd pfd[2];
                usec_t now, wait = USEC_INFINITY;
                unsigned dir;
                int timeout;

                if (p->status.complete) {
                        r = status_process(&p->status, p->args->mode == MODE_MAP ? map_piece : pull_add, p,
                                &p->status_pos);
                        if (r < 0)
                                return r;
                }
                /* A pull's read is QEMU's copy-on-read: a read of the backing chain and a write
                 * into the image (a full disk fails the write), not just a read. */
                if (p->read_error != 0 && p->args->mode == MODE_PULL)
                        return helper_fail(p->read_error,
                                "Failed to copy [%" PRIu64 ", +%" PRIu64 ") from the backing chain into the image: %m",
                                p->read_error_offset, p->read_error_length);
                if (p->read_error != 0)
                        return helper_fail(p->read_error, "Failed to read %" PRIu64 "+%" PRIu64 ": %m",
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
                        return helper_fail(ECONNRESET, "The NBD server closed the connection.");

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
                        return helper_fail(errno, "poll() failed: %m");
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

static int check_socket(int fd, int want_type, int want_domain) {
        int domain, r;

        r = helper_check_socket(fd, want_type, false, &domain);
        if (r < 0)
                return r;
        return domain == want_domain ? 0 : -EINVAL;
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
                return helper_fail(EBADF, "libnbd does not use fd %d as it was given.", NBD_FD);

        for (size_t i = 0; i < 2; i++) {
                const char *ctx = i == 0 ? CONTEXT_ALLOCATION : CONTEXT_DEPTH;

                r = nbd_can_meta_context(p->nbd, ctx);
                if (r < 0)
                        return nbd_fail("Failed to query the NBD meta contexts");
                if (r == 0)
                        return helper_fail(EPROTONOSUPPORT,
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
                        return helper_fail(EPROTONOSUPPORT,
                                "NBD export \"%s\" does not take unfragmented reads: zeros in the backing would not be copied.",
                                args->export_name);
        }

        size = nbd_get_size(p->nbd);
        if (size < 0)
                return nbd_fail("Failed to get the export's size");
        if ((uint64_t) size < p->end)
                return helper_fail(ERANGE, "Range %" PRIu64 "+%" PRIu64 " is beyond the export's end (%" PRId64 ").",
                        args->offset, args->length, size);

        minimum = nbd_get_block_size(p->nbd, LIBNBD_SIZE_MINIMUM);
        maximum = nbd_get_block_size(p->nbd, LIBNBD_SIZE_MAXIMUM);
        if (minimum < 0 || maximum < 0)
                return nbd_fail("Failed to get the export's block sizes");
        /* QEMU always advertises one; without, libnbd checks nothing either. */
        p->align = minimum > 0 ? (uint64_t) minimum : 1;
        if (p->start % p->align != 0 || p->end % p->align != 0)
                return helper_fail(EINVAL, "Range %" PRIu64 "+%" PRIu64 " is not aligned to %" PRIu64 " bytes.",
                        args->offset, args->length, p->align);
        p->chunk = args->chunk;
        if (maximum > 0)
                p->chunk = MIN(p->chunk, (uint64_t) maximum);
        p->chunk = MAX(align_down(p->chunk, p->align), MAX(p->align, CHUNK_MIN));
        p->first_cache = first_cache_size(p, maximum > 0 ? (uint64_t) maximum : 0);
        return 0;
}

/* Everything the loop and libnbd need once connected, and nothing else. No open, no socket, no
 * connect, no exec, no clone: even with the loop compromised, this process can only talk on the
 * two sockets it was given. */
static int install_allowlist(void) {
        const SyscallRule rules[] = {
                { "poll" },            /* the loop */
                { "ppoll" },           /* poll() where the architecture has no poll syscall */
                { "clock_gettime" },   /* the bucket and progress timing; normally the vDSO */
                { "clock_gettime64" }, /* the same on 32-bit architectures */
                { "brk" },             /* malloc: libnbd allocates per command, we grow the read list */
                { "munmap" },
                { "mremap" },
                { "madvise" },         /* free() handing memory back */
                { "futex" },           /* libnbd's handle lock, should it ever be contended */
                { "close" },           /* nbd_close() at the end; fds the daemon should not have sent */
                { "exit" },
                { "exit_group" },
                { "rt_sigreturn" },
                { "restart_syscall" },
                /* NBD: libnbd's send() and recv() on its socket only. */
                { "sendto", 1, { SCMP_A0(SCMP_CMP_EQ, NBD_FD) } },
                { "recvfrom", 1, { SCMP_A0(SCMP_CMP_EQ, NBD_FD) } },
                /* nbd_aio_disconnect(): NBD_CMD_DISC, then a half-close of its socket. */
                { "shutdown", 2, { SCMP_A0(SCMP_CMP_EQ, NBD_FD), SCMP_A1(SCMP_CMP_EQ, SHUT_WR) } },
                /* The daemon: our send(), its messages by recvmsg() (to see fds it should not send). */
                { "sendto", 1, { SCMP_A0(SCMP_CMP_EQ, CONTROL_FD) } },
                { "recvmsg", 1, { SCMP_A0(SCMP_CMP_EQ, CONTROL_FD) } },
                /* Log lines. */
                { "write", 1, { SCMP_A0(SCMP_CMP_EQ, STDERR_FILENO) } },
                /* malloc's large blocks, never executable. */
                { "mmap", 1, { SCMP_A2(SCMP_CMP_MASKED_EQ, PROT_EXEC, 0) } },
        };
        return helper_install_allowlist(rules, ELEMENTSOF(rules), selftest_has("valgrind"));
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
                return helper_fail(r, "fd %d is not a connected AF_UNIX stream socket.", NBD_FD);

        /* A peer that goes away must cost an EPIPE, not our life. */
        if (signal(SIGPIPE, SIG_IGN) == SIG_ERR)
                return helper_fail(errno, "Failed to ignore SIGPIPE: %m");

        r = nbd_open(p);
        if (r < 0)
                return r;

        if (args->mode == MODE_PULL) {
                /* Reads land in our buffers: no more than READ_BUFFERS_MAX of them in flight. */
                p->n_slots = p->can_cache ? args->parallel
                                          : (size_t) MIN((uint64_t) args->parallel, MAX(READ_BUFFERS_MAX / p->chunk, UINT64_C(1)));
                /* QEMU's bounce buffers for the chunks in flight, with room for one more, within the
                 * heap glibc keeps after the first CACHE (twice its size): see first_cache_size(). */
                if (p->first_cache > 0)
                        p->n_slots = (size_t) MIN((uint64_t) p->n_slots,
                                MAX(2 * p->first_cache / (p->chunk + BOUNCE_OVERHEAD), UINT64_C(2)) - 1);
                p->slots = calloc(p->n_slots, sizeof(Slot));
                if (!p->slots)
                        return helper_fail(ENOMEM, "Out of memory.");
                /* A CACHE moves no data through us: buffers only for reads. */
                for (size_t i = 0; i < p->n_slots && !p->can_cache; i++) {
                        p->slots[i].buf = malloc(p->chunk);
                        if (!p->slots[i].buf)
                                return helper_fail(ENOMEM, "Out of memory.");
                }
                p->rate = args->bandwidth;
                p->refilled_at = now_usec(CLOCK_MONOTONIC);
                p->tokens = p->rate > 0 ? (double) read_size(p) : 0;
        }

        if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
                return helper_fail(errno, "Failed to set no_new_privs: %m");
        r = install_allowlist();
        if (r < 0)
                return helper_fail(r, "Failed to install the seccomp filter: %m");

        r = control_send_message(&(ControlPullMessage) { .kind = CONTROL_PULL_READY });
        if (r < 0)
                return log_error_errno(r, "Failed to tell the daemon we are ready: %m");

#ifdef PULL_SELFTEST
        helper_selftest_try_forbidden(SELFTEST_ENV);
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
        status_free(&p->status);
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
        helper_control_ok = check_socket(CONTROL_FD, SOCK_SEQPACKET, AF_UNIX) >= 0;

        r = parse_argv(argc, argv, &args);
        if (r <= 0)
                return r < 0 ? EXIT_FAILURE : EXIT_SUCCESS;

        /* Without the daemon there is nobody to tell: only the log. */
        if (!helper_control_ok) {
                log_error("fd %d is not an AF_UNIX SOCK_SEQPACKET socket.", CONTROL_FD);
                return EXIT_FAILURE;
        }

        r = pull_setup(&pull, &args);
        if (r >= 0)
                r = pull_run(&pull);
        if (r == PULL_DONE)
                r = pull_finish(&pull);
        if (r == PULL_STOP || helper_control_gone)
                r = 0;
        pull_free(&pull);
        return r < 0 ? EXIT_FAILURE : EXIT_SUCCESS;
}
