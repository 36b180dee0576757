/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "state-writer.h"

#include <pthread.h>
#include <signal.h>
#include <sys/eventfd.h>

#include "util.h"

typedef struct WriteOp {
        struct WriteOp *next;
        char *path;
        char *data; /* NULL: remove path */
        size_t len;
        mode_t mode;
        uint64_t ticket; /* the first put this op carries out (a later put of the path joins it) */
        unsigned failures; /* tries that failed: it is tried again, at retry_at (CLOCK_MONOTONIC) */
        usec_t retry_at;
} WriteOp;

/* On the loop's side only: what to call once a put is on disk. */
typedef struct Then {
        struct Then *next;
        uint64_t ticket;
        void *owner;
        state_writer_then_t fn;
        void *userdata;
        void (*destroy)(void *userdata);
} Then;

struct StateWriter {
        pthread_t thread;
        pthread_mutex_t lock;
        pthread_cond_t wake; /* to the thread: work, or stop */
        pthread_cond_t idle; /* from the thread: an op done */
        WriteOp *head, *tail;
        char *busy_path;      /* what the thread is writing now, NULL: nothing */
        uint64_t busy_ticket; /* and the ticket of that op */
        bool stopping;
        LogLimit retry_log; /* the warnings of writes that failed again */

        /* The loop's side. */
        uint64_t next_ticket;
        int notify_fd; /* eventfd: the thread finished an op */
        sd_event_source *notify_source;
        Then *thens, *thens_tail; /* in ticket order */
};

static void then_free(Then *t);

static WriteOp *op_free(WriteOp *op) {
        if (!op)
                return NULL;
        free(op->path);
        free(op->data);
        free(op);
        return NULL;
}

static int op_run(const WriteOp *op) {
        if (!op->data)
                return unlink_durable(op->path);
        return write_file_atomic(op->path, op->data, op->len, op->mode);
}

/* With the lock held: the queued op for path, and the one before it. */
static WriteOp *find_queued(StateWriter *w, const char *path, WriteOp **ret_prev) {
        WriteOp *prev = NULL;

        for (WriteOp *op = w->head; op; prev = op, op = op->next)
                if (streq(op->path, path)) {
                        *ret_prev = prev;
                        return op;
                }
        return NULL;
}

/* With the lock held: the queued op for path, taken out of the queue; NULL if none. */
static WriteOp *take_queued(StateWriter *w, const char *path) {
        WriteOp *prev, *op = find_queued(w, path, &prev);

        if (!op)
                return NULL;
        if (prev)
                prev->next = op->next;
        else
                w->head = op->next;
        if (w->tail == op)
                w->tail = prev;
        op->next = NULL;
        return op;
}

/* A write that failed (a full or failing disk) is not dropped: what follows it (the next step of a
 * job, recorded as done) must not act on a state the file does not hold. It goes back to the head
 * of the queue, to be tried again after 0.1 s, doubling up to 10 s; a later put of its path
 * replaces its data, and the puts after it wait, in order. Only a writer that stops gives up. */
#define RETRY_FIRST_USEC (100 * USEC_PER_MSEC)
#define RETRY_MAX_USEC (10 * USEC_PER_SEC)

/* With the lock held: op failed with r; it goes back to the head (stopping: dropped, returns
 * NULL). */
static WriteOp *op_failed(StateWriter *w, WriteOp *op, int r) {
        usec_t now = now_usec(CLOCK_MONOTONIC), delay = RETRY_FIRST_USEC;
        uint64_t dropped = 0;
        WriteOp *newer;

        for (unsigned i = 0; i < op->failures && delay < RETRY_MAX_USEC; i++)
                delay *= 2;
        delay = MIN(delay, RETRY_MAX_USEC);
        if (op->failures == 0)
                log_error_errno(r, "Failed to %s %s: %m%s", op->data ? "write" : "remove", op->path,
                        w->stopping ? "" : "; trying again, and what follows it waits");
        else if (w->stopping || log_limit_minutely(&w->retry_log, now, &dropped))
                log_error_errno(r, "Failed again to %s %s (%u times, %" PRIu64 " such warnings left out): %m",
                        op->data ? "write" : "remove", op->path, op->failures + 1, dropped);
        if (w->stopping)
                return op_free(op);
        /* A later put of the path, queued meanwhile, holds newer data: it takes this one's place
         * (and its ticket, for those who wait), never the other way round. */
        newer = take_queued(w, op->path);
        if (newer) {
                newer->ticket = MIN(newer->ticket, op->ticket);
                newer->failures = op->failures;
                op_free(op);
                op = newer;
        }
        op->failures++;
        op->retry_at = now + delay;
        op->next = w->head;
        w->head = op;
        if (!w->tail)
                w->tail = op;
        return op;
}

/* With the lock held: wait for the head to be due, or for stopping. */
static void wait_for_work(StateWriter *w) {
        while (!w->stopping) {
                usec_t mono, at;
                struct timespec ts;

                if (!w->head) {
                        pthread_cond_wait(&w->wake, &w->lock);
                        continue;
                }
                mono = now_usec(CLOCK_MONOTONIC);
                if (w->head->retry_at <= mono)
                        return;
                /* wake waits on CLOCK_MONOTONIC (state_writer_new()): a clock step moves nothing. */
                at = w->head->retry_at;
                ts = (struct timespec) { .tv_sec = at / USEC_PER_SEC, .tv_nsec = (at % USEC_PER_SEC) * 1000 };
                (void) pthread_cond_timedwait(&w->wake, &w->lock, &ts);
        }
}

static void *writer_main(void *userdata) {
        StateWriter *w = userdata;

        pthread_mutex_lock(&w->lock);
        for (;;) {
                WriteOp *op;
                int r;

                wait_for_work(w);
                op = w->head;
                if (!op)
                        break; /* stopping, and nothing left */
                w->head = op->next;
                if (!w->head)
                        w->tail = NULL;
                w->busy_path = op->path;
                w->busy_ticket = op->ticket;
                pthread_mutex_unlock(&w->lock);

                r = op_run(op);

                pthread_mutex_lock(&w->lock);
                w->busy_path = NULL;
                if (r < 0)
                        (void) op_failed(w, op, r);
                else
                        op_free(op);
                pthread_cond_broadcast(&w->idle);
                if (w->notify_fd >= 0)
                        (void) eventfd_write(w->notify_fd, 1);
        }
        pthread_mutex_unlock(&w->lock);
        return NULL;
}

int state_writer_new(StateWriter **ret) {
        StateWriter *w;
        sigset_t all, saved;
        int r;

        w = calloc(1, sizeof(StateWriter));
        if (!w)
                return -ENOMEM;
        w->notify_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (w->notify_fd < 0) {
                r = -errno;
                free(w);
                return r;
        }
        pthread_mutex_init(&w->lock, NULL);
        {
                pthread_condattr_t attr;

                pthread_condattr_init(&attr);
                (void) pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
                pthread_cond_init(&w->wake, &attr);
                pthread_condattr_destroy(&attr);
        }
        pthread_cond_init(&w->idle, NULL);
        /* The thread takes no signals: the event loop handles them (signalfd). */
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &saved);
        r = -pthread_create(&w->thread, NULL, writer_main, w);
        pthread_sigmask(SIG_SETMASK, &saved, NULL);
        if (r < 0) {
                pthread_cond_destroy(&w->idle);
                pthread_cond_destroy(&w->wake);
                pthread_mutex_destroy(&w->lock);
                close(w->notify_fd);
                free(w);
                return r;
        }
        *ret = w;
        return 0;
}

StateWriter *state_writer_free(StateWriter *w) {
        if (!w)
                return NULL;
        pthread_mutex_lock(&w->lock);
        w->stopping = true;
        pthread_cond_signal(&w->wake);
        pthread_mutex_unlock(&w->lock);
        (void) pthread_join(w->thread, NULL);
        /* The thread left nothing queued. Whoever still waits goes away with us: dropped. */
        while (w->thens) {
                Then *t = w->thens;
                w->thens = t->next;
                then_free(t);
        }
        w->notify_source = sd_event_source_disable_unref(w->notify_source);
        close(w->notify_fd);
        pthread_cond_destroy(&w->idle);
        pthread_cond_destroy(&w->wake);
        pthread_mutex_destroy(&w->lock);
        free(w);
        return NULL;
}


/* With the lock held: every put with a ticket below this is on disk. */
static uint64_t done_below(StateWriter *w) {
        uint64_t low = w->busy_path ? w->busy_ticket : UINT64_MAX;

        for (WriteOp *op = w->head; op; op = op->next)
                low = MIN(low, op->ticket);
        return low;
}

static void then_free(Then *t) {
        if (t->destroy)
                t->destroy(t->userdata);
        free(t);
}

static void run_thens(StateWriter *w) {
        /* One at a time from the head: what a callback adds or forgets is seen, and so is what
         * it puts (a then added by a then waits for its own write). */
        for (;;) {
                Then *t = w->thens;
                uint64_t low;

                if (!t)
                        return;
                pthread_mutex_lock(&w->lock);
                low = done_below(w);
                pthread_mutex_unlock(&w->lock);
                if (t->ticket >= low)
                        return;
                w->thens = t->next;
                if (!w->thens)
                        w->thens_tail = NULL;
                t->fn(t->userdata);
                then_free(t);
        }
}

static int on_notify(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        StateWriter *w = userdata;
        eventfd_t v;

        (void) eventfd_read(fd, &v);
        run_thens(w);
        return 0;
}

int state_writer_attach(StateWriter *w, sd_event *e) {
        if (!w || !e || w->notify_source)
                return -EINVAL;
        return sd_event_add_io(e, &w->notify_source, w->notify_fd, EPOLLIN, on_notify, w);
}

static int put(StateWriter *w, const char *path, char *data, size_t len, mode_t mode, bool wait, uint64_t *ret_ticket) {
        _cleanup_free_ char *data_owned = data;
        WriteOp *op, *prev;
        uint64_t ticket = 0;
        int r;

        if (!w || wait) {
                WriteOp now = { .path = (char *) path, .data = data, .len = len, .mode = mode };
                bool superseded = false;
                unsigned failures = 0;

                if (w) {
                        /* What the thread is doing to path now must land (or fail, and be queued
                         * again) first; then ours supersedes what is queued for path. */
                        pthread_mutex_lock(&w->lock);
                        ticket = ++w->next_ticket;
                        while (w->busy_path && streq(w->busy_path, path))
                                pthread_cond_wait(&w->idle, &w->lock);
                        op = take_queued(w, path);
                        if (op) {
                                /* Should ours fail, it is tried again for those who waited for
                                 * that one. */
                                ticket = op->ticket;
                                failures = op->failures;
                                op_free(op);
                                superseded = true;
                        }
                        pthread_mutex_unlock(&w->lock);
                        if (ret_ticket)
                                *ret_ticket = ticket;
                }
                /* Only this thread queues: nothing for path can be queued meanwhile. */
                r = op_run(&now);
                if (r < 0 && w) {
                        /* The caller hears of it; the data is still written when it can be. */
                        op = calloc(1, sizeof(WriteOp));
                        if (op)
                                op->path = strdup(path);
                        if (!op || !op->path) {
                                op_free(op);
                                return log_error_errno(r, "Failed to %s %s: %m", data ? "write" : "remove", path);
                        }
                        *op = (WriteOp) { .path = op->path, .data = TAKE_PTR(data_owned), .len = len, .mode = mode,
                                          .ticket = ticket, .failures = failures };
                        pthread_mutex_lock(&w->lock);
                        (void) op_failed(w, op, r);
                        pthread_cond_signal(&w->wake);
                        pthread_mutex_unlock(&w->lock);
                        return r;
                }
                /* Who waited for the op ours replaced hears it from the loop, not from in here. */
                if (superseded)
                        (void) eventfd_write(w->notify_fd, 1);
                return r;
        }

        pthread_mutex_lock(&w->lock);
        ticket = ++w->next_ticket;
        op = find_queued(w, path, &prev);
        if (op) {
                /* Not started yet: the latest data is all it needs to write. */
                free(op->data);
                op->data = TAKE_PTR(data_owned);
                op->len = len;
                op->mode = mode;
                pthread_mutex_unlock(&w->lock);
                if (ret_ticket)
                        *ret_ticket = ticket;
                return 0;
        }
        pthread_mutex_unlock(&w->lock);

        op = calloc(1, sizeof(WriteOp));
        if (!op)
                return -ENOMEM;
        op->path = strdup(path);
        if (!op->path) {
                op_free(op);
                return -ENOMEM;
        }
        op->data = TAKE_PTR(data_owned);
        op->len = len;
        op->mode = mode;
        op->ticket = ticket;

        pthread_mutex_lock(&w->lock);
        if (w->tail)
                w->tail->next = op;
        else
                w->head = op;
        w->tail = op;
        pthread_cond_signal(&w->wake);
        pthread_mutex_unlock(&w->lock);
        if (ret_ticket)
                *ret_ticket = ticket;
        return 0;
}

int state_writer_put(StateWriter *w, const char *path, char *data, size_t len, mode_t mode, bool wait) {
        return put(w, path, data, len, mode, wait, NULL);
}

int state_writer_put_then(StateWriter *w, const char *path, char *data, size_t len, mode_t mode, void *owner,
        state_writer_then_t fn, void *userdata, void (*destroy)(void *userdata)) {
        Then *t;
        int r;

        if (!fn)
                return -EINVAL;
        t = calloc(1, sizeof(Then));
        if (!t) {
                free(data);
                return -ENOMEM;
        }
        *t = (Then) { .owner = owner, .fn = fn, .userdata = userdata, .destroy = destroy };
        if (!w || !w->notify_source) {
                /* Nobody to tell later: done here, and told at once. */
                r = put(w, path, data, len, mode, true, NULL);
                if (r < 0)
                        log_error_errno(r, "Failed to %s %s: %m", data ? "write" : "remove", path);
                t->fn(t->userdata);
                then_free(t);
                return 0;
        }
        r = put(w, path, data, len, mode, false, &t->ticket);
        if (r < 0) {
                free(t); /* the caller still owns userdata */
                return r;
        }
        if (w->thens_tail)
                w->thens_tail->next = t;
        else
                w->thens = t;
        w->thens_tail = t;
        return 0;
}

void state_writer_forget(StateWriter *w, void *owner) {
        Then **p, *prev = NULL;

        if (!w)
                return;
        for (p = &w->thens; *p;) {
                Then *t = *p;
                if (t->owner != owner) {
                        prev = t;
                        p = &t->next;
                        continue;
                }
                *p = t->next;
                if (w->thens_tail == t)
                        w->thens_tail = prev;
                then_free(t);
        }
}

void state_writer_flush(StateWriter *w) {
        if (!w)
                return;
        pthread_mutex_lock(&w->lock);
        while (w->head || w->busy_path)
                pthread_cond_wait(&w->idle, &w->lock);
        pthread_mutex_unlock(&w->lock);
}
