/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "state-writer.h"

#include <pthread.h>
#include <signal.h>

#include "util.h"

typedef struct WriteOp {
        struct WriteOp *next;
        char *path;
        char *data; /* NULL: remove path */
        size_t len;
        mode_t mode;
} WriteOp;

struct StateWriter {
        pthread_t thread;
        pthread_mutex_t lock;
        pthread_cond_t wake; /* to the thread: work, or stop */
        pthread_cond_t idle; /* from the thread: an op done */
        WriteOp *head, *tail;
        char *busy_path; /* what the thread is writing now, NULL: nothing */
        bool stopping;
};

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
                pthread_mutex_unlock(&w->lock);

                op_run_logged(op);

                pthread_mutex_lock(&w->lock);
                w->busy_path = NULL;
                op_free(op);
                pthread_cond_broadcast(&w->idle);
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
        /* The thread left nothing queued. */
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

int state_writer_put(StateWriter *w, const char *path, char *data, size_t len, mode_t mode, bool wait) {
        _cleanup_free_ char *data_owned = data;
        WriteOp *op, *prev;
        int r;

        if (!w || wait) {
                WriteOp now = { .path = (char *) path, .data = data, .len = len, .mode = mode };

                if (w) {
                        /* Ours supersedes what is queued for path; what the thread is doing to
                         * it now must land first. */
                        pthread_mutex_lock(&w->lock);
                        op = find_queued(w, path, &prev);
                        if (op) {
                                if (prev)
                                        prev->next = op->next;
                                else
                                        w->head = op->next;
                                if (w->tail == op)
                                        w->tail = prev;
                                op_free(op);
                        }
                        while (w->busy_path && streq(w->busy_path, path))
                                pthread_cond_wait(&w->idle, &w->lock);
                        pthread_mutex_unlock(&w->lock);
                }
                /* Only this thread queues: nothing for path can be queued meanwhile. */
                r = op_run(&now);
                return r;
        }

        pthread_mutex_lock(&w->lock);
        op = find_queued(w, path, &prev);
        if (op) {
                /* Not started yet: the latest data is all it needs to write. */
                free(op->data);
                op->data = TAKE_PTR(data_owned);
                op->len = len;
                op->mode = mode;
                pthread_mutex_unlock(&w->lock);
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

        pthread_mutex_lock(&w->lock);
        if (w->tail)
                w->tail->next = op;
        else
                w->head = op;
        w->tail = op;
        pthread_cond_signal(&w->wake);
        pthread_mutex_unlock(&w->lock);
        return 0;
}

void state_writer_flush(StateWriter *w) {
        if (!w)
                return;
        pthread_mutex_lock(&w->lock);
        while (w->head || w->busy_path)
                pthread_cond_wait(&w->idle, &w->lock);
        pthread_mutex_unlock(&w->lock);
}
