/* Program 8: threads writing different words of the same pages while they are evicted.
 *
 * usage: pager_stress [MiB=128] [threads=4] [iterations per thread=60000] [hold]
 *
 * One large block of MiB; every page has a slot of 64 bytes per thread. Each thread picks
 * pages (a third in order, the rest at random), checks that its slot still holds the version
 * it wrote last (kept in a per-thread version table, itself on the heap), and writes the next
 * version. So several threads write one page at the moment the evictor moves it out: a lost
 * write, a stale page or a zero-filled page shows as "WRONG DATA". Prints a digest of the
 * final versions, which does not depend on scheduling.
 *
 * With `hold`, once the threads are done it prints "holding" and, until its stdin is readable
 * or closed (at once with /dev/null, as in a native run), keeps checking every page and
 * writing its final versions back unchanged, so pages keep being fetched and written back
 * while a test waits for the store to heal; then the digest as usual. */
#include <poll.h>
#include <pthread.h>

#include "common.h"

enum { PAGE = 4096, SLOT_WORDS = 8, THREADS_MAX = 8 };

static size_t npages;
static unsigned char *heap;
static uint32_t *versions; /* [thread][page] */
static int nthreads;
static long iterations;
static volatile int bad;

static uint64_t *slot_of(size_t page, long t) {
    return (uint64_t *)(heap + page * PAGE) + t * SLOT_WORDS;
}

static void *worker(void *arg) {
    long t = (long)arg;
    rng_t r = {0x1234 + (uint64_t)t};
    uint32_t *mine = versions + (size_t)t * npages;
    for (long i = 0; i < iterations && !bad; i++) {
        size_t p = (i % 3 == 0) ? (size_t)(i / 3) % npages : rng_next(&r) % npages;
        uint64_t *w = slot_of(p, t);
        uint64_t want = ((uint64_t)p << 32) | mine[p];
        for (int k = 0; k < SLOT_WORDS; k++) {
            if (w[k] != want) {
                printf("WRONG DATA: thread %ld page %zu word %d holds %016llx, expected %016llx\n",
                       t, p, k, (unsigned long long)w[k], (unsigned long long)want);
                bad = 1;
                return NULL;
            }
        }
        mine[p]++;
        want = ((uint64_t)p << 32) | mine[p];
        for (int k = 0; k < SLOT_WORDS; k++) w[k] = want;
    }
    return NULL;
}

/* True once stdin has data, has been closed, or is not a pipe that could get some later. */
static int told_to_stop(void) {
    struct pollfd p = {.fd = 0, .events = POLLIN};
    return poll(&p, 1, 0) != 0;
}

/* Checks every slot holds its final version and writes it back unchanged. */
static void hold_sweep(void) {
    for (size_t p = 0; p < npages && !bad; p++) {
        for (long t = 0; t < nthreads; t++) {
            uint64_t want = ((uint64_t)p << 32) | versions[(size_t)t * npages + p];
            uint64_t *w = slot_of(p, t);
            for (int k = 0; k < SLOT_WORDS; k++) {
                if (w[k] != want) {
                    printf("WRONG DATA: hold: page %zu thread %ld word %d holds %016llx, "
                           "expected %016llx\n", p, t, k, (unsigned long long)w[k],
                           (unsigned long long)want);
                    bad = 1;
                    return;
                }
                w[k] = want;
            }
        }
    }
}

int main(int argc, char **argv) {
    size_t mib = arg_size(argc, argv, 1, 128);
    nthreads = (int)arg_size(argc, argv, 2, 4);
    iterations = (long)arg_size(argc, argv, 3, 60000);
    if (nthreads < 1 || nthreads > THREADS_MAX) {
        printf("threads must be 1..%d\n", THREADS_MAX);
        return 2;
    }
    npages = mib * MIB / PAGE;
    heap = xmalloc(npages * PAGE);
    versions = calloc(npages * (size_t)nthreads, sizeof *versions);
    if (!versions) { printf("calloc failed\n"); return 1; }
    for (size_t p = 0; p < npages; p++)
        for (long t = 0; t < nthreads; t++)
            for (int k = 0; k < SLOT_WORDS; k++) slot_of(p, t)[k] = (uint64_t)p << 32;
    pthread_t th[THREADS_MAX];
    for (long t = 0; t < nthreads; t++) pthread_create(&th[t], NULL, worker, (void *)t);
    for (int t = 0; t < nthreads; t++) pthread_join(th[t], NULL);
    if (bad) return 1;
    if (argc > 4 && strcmp(argv[4], "hold") == 0) {
        printf("holding\n");
        fflush(stdout);
        while (!bad && !told_to_stop()) hold_sweep();
        if (bad) return 1;
    }
    uint64_t digest = 0;
    for (size_t i = 0; i < npages * (size_t)nthreads; i++) digest = mix64(digest ^ versions[i]);
    printf("%d threads, %zu pages, digest %016llx\nall checks passed\n", nthreads, npages,
           (unsigned long long)digest);
    return 0;
}
