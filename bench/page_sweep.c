/* Paging workloads over a heap larger than the memory it may keep resident.
 *
 * usage: page_sweep MODE HEAP_MIB [ROUNDS=4] [THREADS=2]
 *   seq     ROUNDS sweeps in address order reading every page; every other sweep (the 2nd,
 *           4th, ...) also writes one word per page, so evicted pages are dirty again.
 *   seqread ROUNDS sweeps in address order reading every page and writing none, after one
 *           untimed sweep: when the clock starts every page has been evicted once and the
 *           resident ones are clean, so under a pager each timed sweep over a heap larger
 *           than its cache only fetches (nothing is written back): the fetch path alone.
 *   random  ROUNDS x pages uniform random page reads.
 *   zipf    ROUNDS x pages accesses drawn from a zipfian distribution (theta 0.99) over the
 *           pages, hot pages scattered over the heap; one access in four writes.
 *   mt      THREADS threads, each doing ROUNDS x pages / THREADS uniform random reads over its
 *           own contiguous slice of the heap.
 *   write   ROUNDS x pages uniform random page writes: each access checks the page and then
 *           writes its version word, so every page touched is dirty and every page evicted
 *           is written back.
 * ROUNDS may be fractional for the random modes (0.5 = half as many accesses as pages).
 * With PAGE_SWEEP_KEEP_HEAP=1 in the environment the heap is not freed before exit, so that
 * a pager's page store still holds its pages for the caller to measure (scripts/bench.sh's
 * scheme table reads the pool's memory after the run).
 *
 * The heap is one malloc'd block of HEAP_MIB. Before the timed part every page is filled
 * completely (its first word is a stamp derived from its index, its second a version, the rest
 * a pattern), so every page is dirty and none is all zeros. Every access checks the stamp and the
 * version; at the end every page is checked completely. Only the accesses are timed:
 * "seconds" and "accesses" give the cost per page access. */
#include <math.h>
#include <pthread.h>

#include "bench.h"

static const char *const USAGE =
    "page_sweep seq|seqread|random|zipf|mt|write HEAP_MIB [ROUNDS=4] [THREADS=2]";

enum { THREADS_MAX = 64 };
static const double ZIPF_THETA = 0.99;
static const uint32_t WRITE_FLAG = 1u << 31;

static size_t ps, words_per_page, pages;
static uint64_t *heap;
static uint32_t *versions; /* the version each page's second word must hold */

static uint64_t stamp(size_t page) { return mix64(page ^ 0x5eed5eedull) | 1; }

static uint64_t *page_at(size_t page) { return heap + page * words_per_page; }

static inline void check_page_head(size_t page) {
    const uint64_t *w = page_at(page);
    if (w[0] != stamp(page))
        WRONG_DATA("page %zu: stamp %016llx, expected %016llx", page, (unsigned long long)w[0],
                   (unsigned long long)stamp(page));
    if (w[1] != versions[page])
        WRONG_DATA("page %zu: version %llu, expected %u", page, (unsigned long long)w[1],
                   versions[page]);
}

static inline void write_page(size_t page) {
    versions[page]++;
    page_at(page)[1] = versions[page];
}

static void fill(void) {
    for (size_t p = 0; p < pages; p++) {
        uint64_t *w = page_at(p);
        uint64_t s = stamp(p);
        w[0] = s;
        w[1] = 0;
        for (size_t k = 2; k < words_per_page; k++) w[k] = s ^ (k * 0x9e3779b97f4a7c15ull);
        versions[p] = 0;
    }
}

static void check_all(void) {
    for (size_t p = 0; p < pages; p++) {
        check_page_head(p);
        const uint64_t *w = page_at(p);
        uint64_t s = stamp(p);
        for (size_t k = 2; k < words_per_page; k++)
            if (w[k] != (s ^ (k * 0x9e3779b97f4a7c15ull)))
                WRONG_DATA("page %zu word %zu: %016llx, expected %016llx", p, k,
                           (unsigned long long)w[k],
                           (unsigned long long)(s ^ (k * 0x9e3779b97f4a7c15ull)));
    }
}

static size_t run_seq(size_t rounds) {
    for (size_t r = 0; r < rounds; r++) {
        int writing = r % 2 == 1;
        for (size_t p = 0; p < pages; p++) {
            check_page_head(p);
            if (writing) write_page(p);
        }
    }
    return rounds * pages;
}

static void read_sweep(void) {
    for (size_t p = 0; p < pages; p++) check_page_head(p);
}

static size_t run_seqread(size_t rounds) {
    for (size_t r = 0; r < rounds; r++) read_sweep();
    return rounds * pages;
}

static size_t run_random(size_t accesses) {
    rng_t r = {42};
    for (size_t i = 0; i < accesses; i++) check_page_head((size_t)rng_below(&r, pages));
    return accesses;
}

static size_t run_write(size_t accesses) {
    rng_t r = {43};
    for (size_t i = 0; i < accesses; i++) {
        size_t page = (size_t)rng_below(&r, pages);
        check_page_head(page);
        write_page(page);
    }
    return accesses;
}

static size_t gcd(size_t a, size_t b) {
    while (b) {
        size_t t = a % b;
        a = b;
        b = t;
    }
    return a;
}

/* The access sequence for zipf, computed before the clock starts: a page index per access,
 * with WRITE_FLAG on one access in four. Rank k (0 = hottest) has weight 1/(k+1)^theta and
 * lives at page (k * stride) mod pages, which scatters the hot pages over the heap. */
static uint32_t *zipf_table(size_t accesses) {
    double *cdf = xmalloc(pages * sizeof *cdf);
    double sum = 0;
    for (size_t k = 0; k < pages; k++) {
        sum += 1.0 / pow((double)(k + 1), ZIPF_THETA);
        cdf[k] = sum;
    }
    size_t stride = 2654435761u % pages;
    while (stride == 0 || gcd(stride, pages) != 1) stride++;
    uint32_t *table = xmalloc(accesses * sizeof *table);
    rng_t r = {7};
    for (size_t i = 0; i < accesses; i++) {
        double u = (double)(rng_next(&r) >> 11) * (1.0 / 9007199254740992.0) * sum;
        size_t lo = 0, hi = pages - 1;
        while (lo < hi) {
            size_t mid = lo + (hi - lo) / 2;
            if (cdf[mid] < u)
                lo = mid + 1;
            else
                hi = mid;
        }
        uint32_t page = (uint32_t)((lo * stride) % pages);
        table[i] = page | (rng_below(&r, 4) == 0 ? WRITE_FLAG : 0);
    }
    free(cdf);
    return table;
}

static size_t run_zipf(const uint32_t *table, size_t accesses) {
    for (size_t i = 0; i < accesses; i++) {
        size_t page = table[i] & ~WRITE_FLAG;
        check_page_head(page);
        if (table[i] & WRITE_FLAG) write_page(page);
    }
    return accesses;
}

struct worker {
    pthread_t thread;
    size_t first, count, accesses;
    uint64_t seed;
};

static pthread_barrier_t start_line;

static void *mt_worker(void *arg) {
    struct worker *w = arg;
    rng_t r = {w->seed};
    pthread_barrier_wait(&start_line);
    for (size_t i = 0; i < w->accesses; i++) check_page_head(w->first + (size_t)rng_below(&r, w->count));
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 3) die_usage(USAGE);
    const char *mode = argv[1];
    double heap_mib = arg_num(argc, argv, 2, 0, USAGE);
    double rounds = arg_num(argc, argv, 3, 4, USAGE);
    size_t threads = (size_t)arg_num(argc, argv, 4, 2, USAGE);
    int seq = !strcmp(mode, "seq"), seqread = !strcmp(mode, "seqread"),
        rnd = !strcmp(mode, "random"), zipf = !strcmp(mode, "zipf"), mt = !strcmp(mode, "mt"),
        wr = !strcmp(mode, "write");
    if (!(seq || seqread || rnd || zipf || mt || wr) || threads < 1 || threads > THREADS_MAX)
        die_usage(USAGE);

    ps = page_size();
    words_per_page = ps / sizeof(uint64_t);
    pages = (size_t)(heap_mib * (double)MIB) / ps;
    if (pages < threads || pages >= WRITE_FLAG) die_usage(USAGE);
    size_t accesses = (size_t)(rounds * (double)pages);
    if (accesses < threads || ((seq || seqread) && rounds < 1)) die_usage(USAGE);
    versions = xmalloc(pages * sizeof *versions);
    heap = xmalloc(pages * ps);
    fill();
    if (seqread) read_sweep();
    uint32_t *table = zipf ? zipf_table(accesses) : NULL;

    struct worker workers[THREADS_MAX];
    if (mt) {
        pthread_barrier_init(&start_line, NULL, (unsigned)threads + 1);
        size_t slice = pages / threads;
        for (size_t t = 0; t < threads; t++) {
            workers[t].first = t * slice;
            workers[t].count = t + 1 == threads ? pages - t * slice : slice;
            workers[t].accesses = accesses / threads;
            workers[t].seed = 1000 + t;
            if (pthread_create(&workers[t].thread, NULL, mt_worker, &workers[t]) != 0) {
                fprintf(stderr, "page_sweep: pthread_create failed\n");
                return 3;
            }
        }
    }

    size_t done = 0;
    uint64_t t0 = now_ns();
    if (seq) {
        done = run_seq((size_t)rounds);
    } else if (seqread) {
        done = run_seqread((size_t)rounds);
    } else if (rnd) {
        done = run_random(accesses);
    } else if (wr) {
        done = run_write(accesses);
    } else if (zipf) {
        done = run_zipf(table, accesses);
    } else {
        pthread_barrier_wait(&start_line);
        for (size_t t = 0; t < threads; t++) {
            pthread_join(workers[t].thread, NULL);
            done += workers[t].accesses;
        }
    }
    uint64_t t1 = now_ns();

    check_all();
    double s = (double)(t1 - t0) / 1e9;
    printf("bench=page_sweep mode=%s heap_mib=%g pages=%zu threads=%zu accesses=%zu seconds=%.6f "
           "us_per_access=%.3f accesses_per_s=%.0f\n",
           mode, heap_mib, pages, mt ? threads : 1, done, s, s * 1e6 / (double)done,
           (double)done / s);
    free(table);
    const char *keep = getenv("PAGE_SWEEP_KEEP_HEAP");
    if (!(keep && strcmp(keep, "1") == 0)) {
        free(heap);
        free(versions);
    }
    return 0;
}
