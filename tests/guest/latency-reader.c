/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The test guest's workload: random 4 KiB reads of a block device with O_DIRECT (no guest page
 * cache, so every read reaches the virtual disk), each read's latency printed on stdout (the
 * serial console), with a periodic summary. Runs until "stop" arrives on stdin or the guest is
 * powered off; "pause" on stdin makes the guest idle (no I/O at all) until "go". Built with gcc -static by tests/guest/build-guest; runs as the guest's init's child.
 *
 *   latency-reader [--rate=N] [--summary-ms=N] [--offset=B] [--span=B] [--count=N] [--quiet] DEVICE
 *
 * --rate=N      reads per second at a steady pace (absolute deadlines); 0: flat out (default 100)
 * --summary-ms  summary period in guest milliseconds (default 1000; 0: none)
 * --offset/--span  the byte range read (default: the whole device)
 * --count=N     stop after N reads (default 0: never)
 * --quiet       no per-read lines, summaries only
 *
 * Output lines (one per line, nothing else starts with these words):
 *   READER start size=<device bytes> offset=<B> span=<B> rate=<N>
 *   LAT <seq> <usec>
 *   SUM n=<reads> p50=<usec> p99=<usec> max=<usec> errors=<N>      (over the last period)
 *   READER paused / READER resumed
 *   READER stop reads=<N> errors=<N>
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/fs.h>
#include <poll.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096
#define WINDOW_MAX 65536 /* latencies kept per summary period */

static uint64_t now_ns(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000000000ULL + (uint64_t) ts.tv_nsec;
}

static uint64_t xorshift64(uint64_t *s) {
        uint64_t x = *s;

        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        return *s = x;
}

static int cmp_u32(const void *a, const void *b) {
        uint32_t x = *(const uint32_t *) a, y = *(const uint32_t *) b;

        return x < y ? -1 : x > y;
}

static bool parse_u64(const char *arg, const char *name, uint64_t *ret) {
        size_t l = strlen(name);
        char *end;

        if (strncmp(arg, name, l) != 0 || arg[l] != '=')
                return false;
        errno = 0;
        *ret = strtoull(arg + l + 1, &end, 0);
        if (errno != 0 || *end != '\0' || end == arg + l + 1) {
                fprintf(stderr, "latency-reader: bad value in %s\n", arg);
                exit(2);
        }
        return true;
}

typedef enum Command {
        CMD_NONE,
        CMD_STOP,
        CMD_PAUSE,
        CMD_GO,
} Command;

/* One command line on stdin ("stop", "pause", "go"), waiting up to timeout_ms (-1: forever);
 * anything else is ignored. */
static Command next_command(int timeout_ms) {
        static char buf[64];
        static size_t len;
        struct pollfd p = {.fd = STDIN_FILENO, .events = POLLIN};
        Command c = CMD_NONE;
        char *nl;
        ssize_t n;

        /* A line already buffered (two arrived at once) comes first. */
        if (!strpbrk(buf, "\r\n")) {
                if (poll(&p, 1, timeout_ms) <= 0 || !(p.revents & POLLIN))
                        return CMD_NONE;
                n = read(STDIN_FILENO, buf + len, sizeof(buf) - 1 - len);
                if (n <= 0)
                        return CMD_NONE;
                len += (size_t) n;
                buf[len] = '\0';
        }
        nl = strpbrk(buf, "\r\n");
        if (!nl) {
                if (len == sizeof(buf) - 1)
                        len = 0; /* an overlong line: dropped */
                return CMD_NONE;
        }
        *nl = '\0';
        if (strstr(buf, "stop"))
                c = CMD_STOP;
        else if (strstr(buf, "pause"))
                c = CMD_PAUSE;
        else if (strstr(buf, "go"))
                c = CMD_GO;
        len -= (size_t) (nl + 1 - buf);
        memmove(buf, nl + 1, len);
        buf[len] = '\0';
        return c;
}

/* Handles a command; true: stop the run. While paused, nothing but waiting for "go" or "stop". */
static bool handle_command(Command c, uint64_t *next) {
        if (c == CMD_STOP)
                return true;
        if (c != CMD_PAUSE)
                return false;
        printf("READER paused\n");
        for (;;) {
                c = next_command(-1);
                if (c == CMD_STOP)
                        return true;
                if (c == CMD_GO)
                        break;
        }
        printf("READER resumed\n");
        *next = now_ns();
        return false;
}

static void summary(uint32_t *lat, size_t n, uint64_t errors) {
        size_t i50, i99;

        if (n == 0) {
                printf("SUM n=0 p50=0 p99=0 max=0 errors=%" PRIu64 "\n", errors);
                return;
        }
        qsort(lat, n, sizeof(*lat), cmp_u32);
        i50 = (n - 1) * 50 / 100;
        i99 = (n - 1) * 99 / 100;
        printf("SUM n=%zu p50=%" PRIu32 " p99=%" PRIu32 " max=%" PRIu32 " errors=%" PRIu64 "\n", n, lat[i50], lat[i99],
                lat[n - 1], errors);
}

int main(int argc, char **argv) {
        uint64_t rate = 100, summary_ms = 1000, offset = 0, span = 0, count = 0, size = 0, seed;
        uint64_t seq = 0, errors = 0, window_errors = 0, next, period_end, blocks;
        static uint32_t window[WINDOW_MAX];
        const char *device = NULL;
        bool quiet = false;
        size_t n_window = 0;
        void *buf;
        int fd;

        for (int i = 1; i < argc; i++) {
                if (parse_u64(argv[i], "--rate", &rate) || parse_u64(argv[i], "--summary-ms", &summary_ms) ||
                        parse_u64(argv[i], "--offset", &offset) || parse_u64(argv[i], "--span", &span) ||
                        parse_u64(argv[i], "--count", &count))
                        continue;
                if (strcmp(argv[i], "--quiet") == 0)
                        quiet = true;
                else if (argv[i][0] != '-' && !device)
                        device = argv[i];
                else {
                        fprintf(stderr, "latency-reader: unknown argument %s\n", argv[i]);
                        return 2;
                }
        }
        if (!device || rate > 1000000) {
                fprintf(stderr, "latency-reader: usage: latency-reader [--rate=N] ... DEVICE\n");
                return 2;
        }
        setvbuf(stdout, NULL, _IOLBF, 0);

        fd = open(device, O_RDONLY | O_DIRECT | O_CLOEXEC);
        if (fd < 0) {
                printf("READER error open %s: %s\n", device, strerror(errno));
                return 1;
        }
        if (ioctl(fd, BLKGETSIZE64, &size) < 0) {
                printf("READER error BLKGETSIZE64: %s\n", strerror(errno));
                return 1;
        }
        if (span == 0 && offset < size)
                span = size - offset;
        if (offset % BLOCK || span < BLOCK || offset > size || span > size - offset) {
                printf("READER error range offset=%" PRIu64 " span=%" PRIu64 " size=%" PRIu64 "\n", offset, span,
                        size);
                return 1;
        }
        blocks = span / BLOCK;
        if (posix_memalign(&buf, BLOCK, BLOCK) != 0) {
                printf("READER error no memory\n");
                return 1;
        }
        seed = now_ns() | 1;

        printf("READER start size=%" PRIu64 " offset=%" PRIu64 " span=%" PRIu64 " rate=%" PRIu64 "\n", size, offset,
                span, rate);
        next = now_ns();
        period_end = next + summary_ms * 1000000ULL;
        for (;;) {
                uint64_t t0, t1, off = offset + (xorshift64(&seed) % blocks) * BLOCK;
                ssize_t n;
                int wait_ms = 0;

                if (rate > 0) {
                        uint64_t t = now_ns();

                        next += 1000000000ULL / rate;
                        /* A steady pace, not a catch-up burst after a stall of the (virtual) CPU. */
                        if (next + 1000000000ULL < t)
                                next = t;
                        if (next > t)
                                wait_ms = (int) ((next - t + 999999) / 1000000);
                }
                if (handle_command(next_command(wait_ms), &next))
                        break;
                if (rate > 0) {
                        struct timespec ts = {.tv_sec = (time_t) (next / 1000000000ULL),
                                .tv_nsec = (long) (next % 1000000000ULL)};
                        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
                                ;
                }

                t0 = now_ns();
                n = pread(fd, buf, BLOCK, (off_t) off);
                t1 = now_ns();
                seq++;
                if (n != BLOCK) {
                        errors++;
                        window_errors++;
                        printf("READER read error at %" PRIu64 ": %s\n", off, n < 0 ? strerror(errno) : "short read");
                } else {
                        uint64_t us = (t1 - t0) / 1000;
                        uint32_t v = us > UINT32_MAX ? UINT32_MAX : (uint32_t) us;

                        if (!quiet)
                                printf("LAT %" PRIu64 " %" PRIu32 "\n", seq, v);
                        if (n_window < WINDOW_MAX)
                                window[n_window++] = v;
                }
                if (summary_ms > 0 && t1 >= period_end) {
                        summary(window, n_window, window_errors);
                        n_window = 0;
                        window_errors = 0;
                        period_end = t1 + summary_ms * 1000000ULL;
                }
                if (count > 0 && seq >= count)
                        break;
        }
        printf("READER stop reads=%" PRIu64 " errors=%" PRIu64 "\n", seq, errors);
        free(buf);
        close(fd);
        return errors > 0;
}
