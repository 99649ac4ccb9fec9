/* The durable heap's log: how fast an epoch is appended, and what logging costs a program.
 *
 * usage: log_write checkpoint HEAP_MIB [ROUNDS=3]
 *        log_write update HEAP_MIB [MILLION_WRITES=100]
 *   checkpoint  fills every page of a HEAP_MIB block, calls lego_checkpoint() (the first,
 *               untimed epoch), then ROUNDS times writes one word in every page and calls
 *               lego_checkpoint(), timing that call alone: each timed epoch appends every
 *               page of the block. Reports the median call and the bandwidth it gives
 *               (bytes of the block / seconds, MB = 10^6 bytes). Needs liblego.so with
 *               LEGO_LOG_DIR, and epochs that only lego_checkpoint() starts (a large
 *               LEGO_FLUSH_MS and LEGO_FLUSH_PAGES), or the timed epochs hold fewer pages.
 *   update      MILLION_WRITES x 10^6 increments of uniformly random words of a HEAP_MIB
 *               block, so that every page is written again between two epochs (the most
 *               pages an epoch can hold for this heap); runs with or without a log (or
 *               without liblego.so). Reports the seconds of the increments.
 *
 * Every page is filled (non-zero, distinct per page) before the clock starts and checked at
 * the end: checkpoint checks every word of every page, update checks the sum of all words
 * against the increments made. A lego_checkpoint() that fails (or is missing) stops the
 * program with exit status 3. */
#include <errno.h>

#include "bench.h"
#include "../preload/include/lego.h"

#pragma weak lego_checkpoint

static const char *const USAGE =
    "log_write checkpoint HEAP_MIB [ROUNDS=3] | log_write update HEAP_MIB [MILLION_WRITES=100]";

enum { ROUNDS_MAX = 64 };

static size_t ps, words_per_page, pages;
static uint64_t *heap;

static uint64_t stamp(size_t page) { return mix64(page ^ 0x10960960ull) | 1; }

static uint64_t *page_at(size_t page) { return heap + page * words_per_page; }

/* Word 0 is the page's stamp, word 1 its version, the rest a pattern of the stamp. */
static void fill(void) {
    for (size_t p = 0; p < pages; p++) {
        uint64_t *w = page_at(p);
        uint64_t s = stamp(p);
        w[0] = s;
        w[1] = 0;
        for (size_t k = 2; k < words_per_page; k++) w[k] = s ^ (k * 0x9e3779b97f4a7c15ull);
    }
}

static void check_all(uint64_t version) {
    for (size_t p = 0; p < pages; p++) {
        const uint64_t *w = page_at(p);
        uint64_t s = stamp(p);
        if (w[0] != s || w[1] != version)
            WRONG_DATA("page %zu: stamp %016llx version %llu, expected %016llx version %llu", p,
                       (unsigned long long)w[0], (unsigned long long)w[1],
                       (unsigned long long)s, (unsigned long long)version);
        for (size_t k = 2; k < words_per_page; k++)
            if (w[k] != (s ^ (k * 0x9e3779b97f4a7c15ull)))
                WRONG_DATA("page %zu word %zu: %016llx, expected %016llx", p, k,
                           (unsigned long long)w[k],
                           (unsigned long long)(s ^ (k * 0x9e3779b97f4a7c15ull)));
    }
}

static uint64_t sum_all(void) {
    uint64_t sum = 0;
    for (size_t i = 0; i < pages * words_per_page; i++) sum += heap[i];
    return sum;
}

/* One lego_checkpoint() call, in nanoseconds; stops the program if it fails. */
static uint64_t timed_checkpoint(void) {
    if (!lego_checkpoint) {
        fprintf(stderr, "log_write: lego_checkpoint is missing: run under liblego.so\n");
        exit(3);
    }
    uint64_t t0 = now_ns();
    long epoch = lego_checkpoint();
    uint64_t t1 = now_ns();
    if (epoch < 0) {
        fprintf(stderr, "log_write: lego_checkpoint failed: %s (is LEGO_LOG_DIR set?)\n",
                strerror(errno));
        exit(3);
    }
    return t1 - t0;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static void run_checkpoint(double heap_mib, size_t rounds) {
    uint64_t ns[ROUNDS_MAX];
    fill();
    uint64_t first_ns = timed_checkpoint();
    for (size_t r = 0; r < rounds; r++) {
        for (size_t p = 0; p < pages; p++) page_at(p)[1] = r + 1;
        ns[r] = timed_checkpoint();
    }
    check_all(rounds);
    qsort(ns, rounds, sizeof ns[0], cmp_u64);
    double median_ns = rounds % 2 ? (double)ns[rounds / 2]
                                  : ((double)ns[rounds / 2 - 1] + (double)ns[rounds / 2]) / 2;
    double bytes = (double)(pages * ps);
    printf("bench=log_write mode=checkpoint heap_mib=%g pages=%zu rounds=%zu bytes=%.0f "
           "seconds=%.6f mb_per_s=%.1f min_seconds=%.6f max_seconds=%.6f first_seconds=%.6f\n",
           heap_mib, pages, rounds, bytes, median_ns / 1e9, bytes / median_ns * 1e3,
           (double)ns[0] / 1e9, (double)ns[rounds - 1] / 1e9, (double)first_ns / 1e9);
}

static void run_update(double heap_mib, double million_writes) {
    size_t writes = (size_t)(million_writes * 1e6);
    size_t words = pages * words_per_page;
    fill();
    uint64_t before = sum_all();
    rng_t r = {99};
    uint64_t t0 = now_ns();
    for (size_t i = 0; i < writes; i++) heap[rng_below(&r, words)]++;
    uint64_t t1 = now_ns();
    uint64_t after = sum_all();
    if (after - before != writes)
        WRONG_DATA("the heap's words grew by %llu in all, expected %zu increments",
                   (unsigned long long)(after - before), writes);
    double s = (double)(t1 - t0) / 1e9;
    printf("bench=log_write mode=update heap_mib=%g pages=%zu writes=%zu seconds=%.6f "
           "ns_per_write=%.2f\n",
           heap_mib, pages, writes, s, s * 1e9 / (double)writes);
}

int main(int argc, char **argv) {
    if (argc < 3) die_usage(USAGE);
    const char *mode = argv[1];
    double heap_mib = arg_num(argc, argv, 2, 0, USAGE);
    ps = page_size();
    words_per_page = ps / sizeof(uint64_t);
    pages = (size_t)(heap_mib * (double)MIB) / ps;
    if (pages < 1) die_usage(USAGE);
    heap = xmalloc(pages * ps);

    if (!strcmp(mode, "checkpoint")) {
        double rounds = arg_num(argc, argv, 3, 3, USAGE);
        if (rounds < 1 || rounds > ROUNDS_MAX) die_usage(USAGE);
        run_checkpoint(heap_mib, (size_t)rounds);
    } else if (!strcmp(mode, "update")) {
        run_update(heap_mib, arg_num(argc, argv, 3, 100, USAGE));
    } else {
        die_usage(USAGE);
    }
    /* The block is not freed: the epoch written at exit keeps it live, so a replay of the
     * log rebuilds a heap of HEAP_MIB (scripts/bench.sh times that replay). */
    return 0;
}
