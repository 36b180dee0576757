/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* The state writer thread (service/state-writer.c): what lands on disk, in which order, whoever
 * asked last. */

#include <fcntl.h>
#include <sys/stat.h>

#include <systemd/sd-event.h>

#include "state-writer.h"
#include "util.h"
#include "tap.h"

static char dir[] = "/tmp/test-state-writer-XXXXXX";

static char *path_of(const char *name) {
        return strdup_printf("%s/%s", dir, name);
}

/* The file's contents, or NULL if there is none. */
static char *contents(const char *name) {
        _cleanup_free_ char *p = path_of(name);
        char buf[256];
        ssize_t n;
        int fd;

        fd = open(p, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
                return NULL;
        n = read(fd, buf, sizeof(buf) - 1);
        close(fd);
        if (n < 0)
                return NULL;
        buf[n] = 0;
        return strdup(buf);
}

static int put(StateWriter *w, const char *name, const char *text, bool wait) {
        _cleanup_free_ char *p = path_of(name);
        char *data = text ? strdup(text) : NULL;

        if (!p || (text && !data)) {
                free(data);
                return -ENOMEM;
        }
        return state_writer_put(w, p, data, text ? strlen(text) : 0, 0600, wait);
}

/* Many writes for other files first, so that what follows is still queued when the caller goes
 * on (the thread fsyncs each). */
static void fill_queue(StateWriter *w, const char *prefix, unsigned n) {
        for (unsigned i = 0; i < n; i++) {
                char name[64], text[64];
                snprintf(name, sizeof(name), "%s-%u", prefix, i);
                snprintf(text, sizeof(text), "%s %u", prefix, i);
                ASSERT_OK(put(w, name, text, false));
        }
}

static void test_latest_wins(void) {
        StateWriter *w = NULL;
        _cleanup_free_ char *c = NULL;

        ASSERT_OK(state_writer_new(&w));
        fill_queue(w, "a", 50);
        ASSERT_OK(put(w, "g", "one", false));
        ASSERT_OK(put(w, "g", "two", false));
        ASSERT_OK(put(w, "g", "three", false));
        state_writer_flush(w);
        c = contents("g");
        ASSERT_STREQ(c, "three");
        for (unsigned i = 0; i < 50; i++) {
                char name[64], text[64];
                _cleanup_free_ char *got = NULL;
                snprintf(name, sizeof(name), "a-%u", i);
                snprintf(text, sizeof(text), "a %u", i);
                got = contents(name);
                ASSERT_STREQ(got, text);
        }
        state_writer_free(w);
}

static void test_waited_write_is_not_overtaken(void) {
        StateWriter *w = NULL;
        _cleanup_free_ char *now = NULL, *later = NULL;

        ASSERT_OK(state_writer_new(&w));
        fill_queue(w, "b", 200);
        ASSERT_OK(put(w, "h", "old", false)); /* queued behind the 200 */
        ASSERT_OK(put(w, "h", "new", true));
        now = contents("h");
        ASSERT_STREQ(now, "new"); /* on disk when the call returned */
        state_writer_flush(w);
        later = contents("h");
        ASSERT_STREQ(later, "new"); /* and the queued "old" never landed over it */
        state_writer_free(w);
}

static void test_remove_supersedes(void) {
        StateWriter *w = NULL;
        _cleanup_free_ char *c = NULL, *p = NULL;

        ASSERT_OK(state_writer_new(&w));
        ASSERT_OK(put(w, "r", "there", true));
        fill_queue(w, "c", 200);
        ASSERT_OK(put(w, "r", "again", false));
        ASSERT_OK(put(w, "r", NULL, true)); /* as state_remove() asks: done on return */
        c = contents("r");
        ASSERT_TRUE(c == NULL);
        state_writer_flush(w);
        p = contents("r");
        ASSERT_TRUE(p == NULL); /* the queued write did not bring it back */
        state_writer_free(w);
}

static void test_free_writes_what_is_queued(void) {
        StateWriter *w = NULL;
        _cleanup_free_ char *c = NULL;

        ASSERT_OK(state_writer_new(&w));
        fill_queue(w, "d", 100);
        ASSERT_OK(put(w, "last", "yes", false));
        state_writer_free(w);
        c = contents("last");
        ASSERT_STREQ(c, "yes");
}

static void test_errors(void) {
        StateWriter *w = NULL;

        ASSERT_OK(state_writer_new(&w));
        /* Queued: logged by the thread, nothing to return. Waited: returned. */
        ASSERT_OK(put(w, "no-such-dir/x", "x", false));
        ASSERT_ERRNO(put(w, "no-such-dir/y", "y", true), -ENOENT);
        /* A removal of what is not there is not an error. */
        ASSERT_OK(put(w, "never-written", NULL, true));
        /* Both are tried again until they land; a writer that stops gives up. */
        state_writer_free(w);
        /* Without a writer: done in the caller. */
        ASSERT_OK(put(NULL, "direct", "d", false));
        {
                _cleanup_free_ char *c = contents("direct");
                ASSERT_STREQ(c, "d");
        }
}

/* Continuations on an event loop. */

typedef struct Seen {
        const char *name;
        const char *expect; /* what the file must hold when the continuation runs */
        unsigned *order;
        unsigned at;
        bool called, destroyed;
} Seen;

static void seen_then(void *userdata) {
        Seen *s = userdata;
        _cleanup_free_ char *c = contents(s->name);

        s->called = true;
        s->at = ++*s->order;
        ASSERT_STREQ(c, s->expect);
}

static void seen_destroy(void *userdata) {
        ((Seen *) userdata)->destroyed = true;
}

static int put_then(StateWriter *w, Seen *s, const char *text, void *owner) {
        _cleanup_free_ char *p = path_of(s->name);
        char *data = strdup(text);

        if (!p || !data) {
                free(data);
                return -ENOMEM;
        }
        return state_writer_put_then(w, p, data, strlen(text), 0600, owner, seen_then, s, seen_destroy);
}

static void run_until(sd_event *e, bool *done) {
        for (unsigned i = 0; i < 10000 && !*done; i++)
                ASSERT_OK(sd_event_run(e, 100 * USEC_PER_MSEC));
        ASSERT_TRUE(*done);
}

static void test_then_after_the_write(void) {
        _cleanup_(sd_event_unrefp) sd_event *e = NULL;
        StateWriter *w = NULL;
        unsigned order = 0;
        int owner_a, owner_b;
        Seen first = { .name = "t1", .expect = "one", .order = &order };
        Seen second = { .name = "t2", .expect = "two", .order = &order };
        Seen joined = { .name = "t1", .expect = "one", .order = &order }; /* the same write */
        Seen forgotten = { .name = "t3", .expect = "three", .order = &order };

        ASSERT_OK(sd_event_new(&e));
        ASSERT_OK(state_writer_new(&w));
        ASSERT_OK(state_writer_attach(w, e));
        fill_queue(w, "e", 100);
        ASSERT_OK(put_then(w, &first, "zero", &owner_a));
        ASSERT_OK(put_then(w, &joined, "one", &owner_a)); /* joins first's queued write */
        first.expect = "one";
        ASSERT_OK(put_then(w, &second, "two", &owner_a));
        ASSERT_OK(put_then(w, &forgotten, "three", &owner_b));
        ASSERT_FALSE(first.called); /* never before the write, never inside the call */
        state_writer_forget(w, &owner_b);
        ASSERT_TRUE(forgotten.destroyed && !forgotten.called);
        run_until(e, &second.called);
        ASSERT_TRUE(first.called && joined.called && first.destroyed && second.destroyed);
        ASSERT_EQ(first.at, 1u); /* in the order asked */
        ASSERT_EQ(joined.at, 2u);
        ASSERT_EQ(second.at, 3u);
        ASSERT_FALSE(forgotten.called);
        state_writer_free(w);
}

static void test_then_dropped_by_free(void) {
        _cleanup_(sd_event_unrefp) sd_event *e = NULL;
        StateWriter *w = NULL;
        unsigned order = 0;
        int owner;
        Seen s = { .name = "f1", .expect = "x", .order = &order };

        ASSERT_OK(sd_event_new(&e));
        ASSERT_OK(state_writer_new(&w));
        ASSERT_OK(state_writer_attach(w, e));
        ASSERT_OK(put_then(w, &s, "x", &owner));
        state_writer_free(w); /* the write lands; nobody runs the loop: dropped, not called */
        ASSERT_TRUE(s.destroyed && !s.called);
        {
                _cleanup_free_ char *c = contents("f1");
                ASSERT_STREQ(c, "x");
        }
        /* Unattached: written and called at once. */
        {
                Seen now = { .name = "f2", .expect = "y", .order = &order };
                ASSERT_OK(put_then(NULL, &now, "y", &owner));
                ASSERT_TRUE(now.called && now.destroyed);
        }
}

/* A write that failed is tried again, and what follows it waits: nothing goes on as if the state
 * were on disk. */
static void test_failed_write_is_tried_again(void) {
        _cleanup_(sd_event_unrefp) sd_event *e = NULL;
        _cleanup_free_ char *later = path_of("later");
        StateWriter *w = NULL;
        unsigned order = 0;
        int owner;
        Seen failing = { .name = "later/a", .expect = "a2", .order = &order };
        Seen after = { .name = "after", .expect = "b", .order = &order };

        ASSERT_NOT_NULL(later);
        ASSERT_OK(sd_event_new(&e));
        ASSERT_OK(state_writer_new(&w));
        ASSERT_OK(state_writer_attach(w, e));
        ASSERT_OK(put_then(w, &failing, "a1", &owner)); /* no such directory yet */
        ASSERT_OK(put_then(w, &after, "b", &owner));
        for (unsigned i = 0; i < 5; i++)
                ASSERT_OK(sd_event_run(e, 100 * USEC_PER_MSEC));
        ASSERT_FALSE(failing.called || after.called);
        {
                _cleanup_free_ char *c = contents("after");
                ASSERT_NULL(c); /* in order: not before the one that failed */
        }
        /* A waited write of the path fails too, is returned, and takes the queued one's place. */
        ASSERT_ERRNO(put(w, "later/a", "a2", true), -ENOENT);
        ASSERT_OK(put(w, "later/c", "c", false));
        ASSERT_OK(mkdir(later, 0700));
        run_until(e, &after.called);
        ASSERT_TRUE(failing.called && failing.at == 1 && after.at == 2);
        state_writer_flush(w);
        {
                _cleanup_free_ char *c = contents("later/c");
                ASSERT_STREQ(c, "c");
        }
        state_writer_free(w);
}

/* A write that fails while later ones of its path wait: the latest data lands, not the oldest.
 * The path is a directory at first (the rename fails with EISDIR, after a write long enough for
 * the next puts to come while it runs). */
static void test_failed_write_never_lands_last(void) {
        _cleanup_free_ char *path = path_of("order"), *big = NULL;
        const size_t big_len = 64 << 20;
        StateWriter *w = NULL;

        ASSERT_NOT_NULL(path);
        ASSERT_OK(mkdir(path, 0700));
        big = malloc(big_len);
        ASSERT_NOT_NULL(big);
        if (!path || !big)
                return;
        memset(big, 'o', big_len);
        big[big_len - 1] = 0;
        ASSERT_OK(state_writer_new(&w));
        ASSERT_OK(state_writer_put(w, path, TAKE_PTR(big), big_len - 1, 0600, false));
        ASSERT_OK(put(w, "order", "two", false));   /* while the first is written, or joins it */
        for (unsigned i = 0; i < 200; i++)          /* until the first failed and was queued again */
                usleep(10000);
        ASSERT_OK(put(w, "order", "three", false)); /* joins what is queued for the path */
        ASSERT_OK(rmdir(path));
        state_writer_flush(w);
        {
                _cleanup_free_ char *c = contents("order");
                ASSERT_STREQ(c, "three");
        }
        /* A waited write while a queued one of its path failed: ours is the last word. */
        ASSERT_OK(unlink(path));
        ASSERT_OK(mkdir(path, 0700));
        big = malloc(big_len);
        ASSERT_NOT_NULL(big);
        if (big) {
                memset(big, 'o', big_len);
                ASSERT_OK(state_writer_put(w, path, TAKE_PTR(big), big_len - 1, 0600, false));
        }
        usleep(50000);
        ASSERT_ERRNO(put(w, "order", "four", true), -EISDIR); /* waits for the first, which failed */
        ASSERT_OK(rmdir(path));
        state_writer_flush(w);
        {
                _cleanup_free_ char *c = contents("order");
                ASSERT_STREQ(c, "four");
        }
        state_writer_free(w);
}

/* A continuation that puts again and asks to go on after that write: not before it is on disk. */
typedef struct Chain {
        StateWriter *w;
        Seen *next;
        bool first_called;
} Chain;

static void chain_then(void *userdata) {
        Chain *c = userdata;

        c->first_called = true;
        fill_queue(c->w, "chain", 50);
        ASSERT_OK(put_then(c->w, c->next, "second", c));
        ASSERT_FALSE(c->next->called);
}

static void test_then_from_a_then(void) {
        _cleanup_(sd_event_unrefp) sd_event *e = NULL;
        _cleanup_free_ char *p = path_of("chain-first");
        StateWriter *w = NULL;
        unsigned order = 0;
        Seen next = { .name = "chain-second", .expect = "second", .order = &order };
        Chain c = { .next = &next };

        ASSERT_OK(sd_event_new(&e));
        ASSERT_OK(state_writer_new(&w));
        ASSERT_OK(state_writer_attach(w, e));
        c.w = w;
        ASSERT_NOT_NULL(p);
        ASSERT_OK(state_writer_put_then(w, p, strdup_printf("first"), 5, 0600, &c, chain_then, &c, NULL));
        run_until(e, &next.called); /* seen_then checks the file holds "second" */
        ASSERT_TRUE(c.first_called);
        state_writer_free(w);
}

int main(int argc, char **argv) {
        int r;

        tap_init(argc, argv);
        if (!mkdtemp(dir)) {
                perror("mkdtemp");
                return 1;
        }
        TAP_RUN(test_latest_wins);
        TAP_RUN(test_waited_write_is_not_overtaken);
        TAP_RUN(test_remove_supersedes);
        TAP_RUN(test_free_writes_what_is_queued);
        TAP_RUN(test_errors);
        TAP_RUN(test_then_after_the_write);
        TAP_RUN(test_then_dropped_by_free);
        TAP_RUN(test_failed_write_is_tried_again);
        TAP_RUN(test_then_from_a_then);
        TAP_RUN(test_failed_write_never_lands_last);
        r = tap_finish();
        {
                _cleanup_free_ char *cmd = strdup_printf("rm -rf '%s'", dir);
                if (cmd)
                        (void) !system(cmd);
        }
        return r;
}
