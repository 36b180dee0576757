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
                return unlink(op->path) < 0 && errno != ENOENT ? -errno : 0;
        return write_file_atomic(op->path, op->data, op->len, op->mode);
}

static void op_run_logged(const WriteOp *op) {
        int r = op_run(op);
        if (r < 0)
                log_error_errno(r, "Failed to %s %s: %m", op->data ? "write" : "remove", op->path);
}

static void *writer_main(void *userdata) {
        StateWriter *w = userdata;

        pthread_mutex_lock(&w->lock);
        for (;;) {
                WriteOp *op;

                while (!w->head && !w->stopping)
                        pthread_cond_wait(&w->wake, &w->lock);
                op = w->head;
                if (!op)
                        break; /* stopping, and nothing left */
                w->head = op->next;
                if (!w->head)
                        w->tail = NULL;
                w->busy_path = op->path;
                w->busy_ticket = op->ticket;
                pthread_mutex_unlock(&w->lock);

                op_run_logged(op);

                pthread_mutex_lock(&w->lock);
                w->busy_path = NULL;
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
        pthread_cond_init(&w->wake, NULL);
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
        uint64_t low;

        pthread_mutex_lock(&w->lock);
        low = done_below(w);
        pthread_mutex_unlock(&w->lock);
        /* One at a time from the head: what a callback adds or forgets is seen. */
        while (w->thens && w->thens->ticket < low) {
                Then *t = w->thens;

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
        uint64_t ticket;
        int r;

        if (!w || wait) {
                WriteOp now = { .path = (char *) path, .data = data, .len = len, .mode = mode };
                bool superseded = false;

                if (w) {
                        /* Ours supersedes what is queued for path; what the thread is doing to
                         * it now must land first. */
                        pthread_mutex_lock(&w->lock);
                        ticket = ++w->next_ticket;
                        op = find_queued(w, path, &prev);
                        if (op) {
                                if (prev)
                                        prev->next = op->next;
                                else
                                        w->head = op->next;
                                if (w->tail == op)
                                        w->tail = prev;
                                op_free(op);
                                superseded = true;
                        }
                        while (w->busy_path && streq(w->busy_path, path))
                                pthread_cond_wait(&w->idle, &w->lock);
                        pthread_mutex_unlock(&w->lock);
                        if (ret_ticket)
                                *ret_ticket = ticket;
                }
                /* Only this thread queues: nothing for path can be queued meanwhile. */
                r = op_run(&now);
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
