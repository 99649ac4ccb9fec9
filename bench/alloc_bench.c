/* Allocator benchmarks in the spirit of the standard malloc suites (mimalloc-bench, larson,
 * xmalloc-test), for comparing liblego.so's allocator with glibc's with the heap all resident.
 *
 * usage: alloc_bench MODE [SCALE=1]
 *   small     alloc/free churn of 16-512 B objects over a table of live slots (one thread).
 *   smallmt   the same loop in 4 threads at once, each over its own table (no object crosses
 *             threads): how the allocator scales and what its per-thread fast path costs.
 *   prodcons  a producer thread mallocs 16-512 B objects and hands them through a ring to a
 *             consumer thread, which checks and frees them: every free is a cross-thread free,
 *             one at a time as they stream through the ring.
 *   xburst    bursts of cross-thread frees: in each round 4 threads each allocate a batch of
 *             16-512 B objects, then each frees the whole batch of its neighbour at once.
 *   realloc   vectors grown by doubling with realloc from 16 B up to 1-4 MiB, 16 at a time
 *             round-robin (so neighbours get in the way of growing in place).
 *   large     blocks of 64 KiB-4 MiB, 8 live at a time, each written once per page.
 *   bigblocks blocks of 5-25 MiB, 20 live at a time, each zero-filled whole with memset (as a
 *             program clearing a buffer does), checked and freed: whether freed blocks are
 *             reused without faulting their pages in again.
 *   frag      a long-lived fragmented heap: allocate many small objects, free every other one,
 *             allocate objects of in-between sizes into the holes; several rounds; then check.
 *   churnmt   short-lived threads (larson-like): 4 arrays of 16-800 B objects, each taken over
 *             in every round by a new thread that frees and replaces random objects of it (most
 *             allocated by threads that have exited) and exits; its peak RSS is the point.
 * SCALE multiplies the amount of work (0.3 for a quick run).
 *
 * Every object carries a key at its start and a check byte at its end, verified before it
 * is freed (and, for vectors, every byte at full size). Reports the seconds of the whole
 * workload; peak RSS is measured from outside (/usr/bin/time -f %M). */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>

#include "bench.h"

static const char *const USAGE =
    "alloc_bench small|smallmt|prodcons|xburst|realloc|large|bigblocks|frag|churnmt [SCALE=1]";

/* An object: its first word is its key, its last byte the key's low byte. */
static void stamp_obj(void *p, size_t size, uint64_t key) {
    memcpy(p, &key, sizeof key);
    ((unsigned char *)p)[size - 1] = (unsigned char)key;
}

static void check_obj(const void *p, size_t size, uint64_t key, const char *what) {
    uint64_t got;
    memcpy(&got, p, sizeof got);
    if (got != key || ((const unsigned char *)p)[size - 1] != (unsigned char)key)
        WRONG_DATA("%s object of %zu bytes: key %016llx, expected %016llx", what, size,
                   (unsigned long long)got, (unsigned long long)key);
}

/* N scaled by the command line's SCALE, at least 1. */
static size_t scaled(double n, double scale) {
    size_t v = (size_t)(n * scale);
    return v ? v : 1;
}

struct slot {
    void *p;
    size_t size;
    uint64_t key;
};

static void start_thread(pthread_t *t, void *(*fn)(void *), void *arg) {
    if (pthread_create(t, NULL, fn, arg) != 0) {
        fprintf(stderr, "alloc_bench: pthread_create failed\n");
        exit(3);
    }
}

/* `ops` alloc/free steps over a table of `nslots` live slots, seeded by `seed`. */
static void small_loop(size_t nslots, size_t ops, uint64_t seed) {
    struct slot *slots = calloc(nslots, sizeof *slots);
    if (!slots) {
        fprintf(stderr, "alloc_bench: calloc of the slot table failed\n");
        exit(3);
    }
    rng_t r = {seed};
    for (size_t i = 0; i < ops; i++) {
        struct slot *s = &slots[rng_below(&r, nslots)];
        if (s->p) {
            check_obj(s->p, s->size, s->key, "small");
            free(s->p);
        }
        s->size = rng_range(&r, 16, 512);
        s->key = mix64(i ^ (seed << 40));
        s->p = xmalloc(s->size);
        stamp_obj(s->p, s->size, s->key);
    }
    for (size_t i = 0; i < nslots; i++) {
        if (!slots[i].p) continue;
        check_obj(slots[i].p, slots[i].size, slots[i].key, "small");
        free(slots[i].p);
    }
    free(slots);
}

static size_t bench_small(double scale) {
    size_t ops = scaled(8e6, scale);
    small_loop(1 << 16, ops, 1);
    return ops;
}

enum { MT_THREADS = 4 };
static size_t smallmt_ops;

static void *smallmt_thread(void *arg) {
    small_loop(1 << 14, smallmt_ops, (uint64_t)(uintptr_t)arg + 100);
    return NULL;
}

static size_t bench_smallmt(double scale) {
    smallmt_ops = scaled(3e6, scale);
    pthread_t t[MT_THREADS];
    for (uintptr_t i = 0; i < MT_THREADS; i++) start_thread(&t[i], smallmt_thread, (void *)i);
    for (int i = 0; i < MT_THREADS; i++) pthread_join(t[i], NULL);
    return smallmt_ops * MT_THREADS;
}

/* prodcons: a single-producer single-consumer ring of object pointers. */
enum { RING_SLOTS = 4096 };
static struct {
    void *item[RING_SLOTS];
    _Atomic size_t head; /* next slot the producer fills */
    _Atomic size_t tail; /* next slot the consumer empties */
} ring;
static size_t prodcons_objects;

static size_t obj_size(uint64_t key) { return 16 + (size_t)(key % 497); }

static void wait_a_little(unsigned *spins) {
    if (++*spins % 64 == 0) sched_yield();
}

static void *producer(void *arg) {
    (void)arg;
    for (size_t i = 0; i < prodcons_objects; i++) {
        uint64_t key = mix64(i);
        size_t size = obj_size(key);
        void *p = xmalloc(size);
        stamp_obj(p, size, key);
        size_t head = atomic_load_explicit(&ring.head, memory_order_relaxed);
        unsigned spins = 0;
        while (head - atomic_load_explicit(&ring.tail, memory_order_acquire) == RING_SLOTS)
            wait_a_little(&spins);
        ring.item[head % RING_SLOTS] = p;
        atomic_store_explicit(&ring.head, head + 1, memory_order_release);
    }
    return NULL;
}

static size_t bench_prodcons(double scale) {
    prodcons_objects = scaled(3e6, scale);
    pthread_t t;
    start_thread(&t, producer, NULL);
    for (size_t i = 0; i < prodcons_objects; i++) {
        size_t tail = atomic_load_explicit(&ring.tail, memory_order_relaxed);
        unsigned spins = 0;
        while (atomic_load_explicit(&ring.head, memory_order_acquire) == tail)
            wait_a_little(&spins);
        void *p = ring.item[tail % RING_SLOTS];
        atomic_store_explicit(&ring.tail, tail + 1, memory_order_release);
        uint64_t key = mix64(i);
        check_obj(p, obj_size(key), key, "prodcons");
        free(p);
    }
    pthread_join(t, NULL);
    return prodcons_objects;
}

/* xburst: per round, thread t fills batch t, then (after a barrier) frees batch t+1. */
enum { XBURST_BATCH = 20000 };
static struct slot *xburst_batch[MT_THREADS];
static size_t xburst_rounds;
static pthread_barrier_t xburst_line;

static void *xburst_thread(void *arg) {
    size_t t = (size_t)(uintptr_t)arg;
    rng_t r = {200 + t};
    for (size_t round = 0; round < xburst_rounds; round++) {
        struct slot *mine = xburst_batch[t];
        for (size_t i = 0; i < XBURST_BATCH; i++) {
            mine[i].size = rng_range(&r, 16, 512);
            mine[i].key = mix64((round << 32) ^ (t << 24) ^ i);
            mine[i].p = xmalloc(mine[i].size);
            stamp_obj(mine[i].p, mine[i].size, mine[i].key);
        }
        pthread_barrier_wait(&xburst_line);
        struct slot *theirs = xburst_batch[(t + 1) % MT_THREADS];
        for (size_t i = 0; i < XBURST_BATCH; i++) {
            check_obj(theirs[i].p, theirs[i].size, theirs[i].key, "xburst");
            free(theirs[i].p);
        }
        pthread_barrier_wait(&xburst_line);
    }
    return NULL;
}

static size_t bench_xburst(double scale) {
    xburst_rounds = scaled(100, scale);
    pthread_barrier_init(&xburst_line, NULL, MT_THREADS);
    for (int i = 0; i < MT_THREADS; i++) {
        xburst_batch[i] = calloc(XBURST_BATCH, sizeof(struct slot));
        if (!xburst_batch[i]) {
            fprintf(stderr, "alloc_bench: calloc of a batch failed\n");
            exit(3);
        }
    }
    pthread_t t[MT_THREADS];
    for (uintptr_t i = 0; i < MT_THREADS; i++) start_thread(&t[i], xburst_thread, (void *)i);
    for (int i = 0; i < MT_THREADS; i++) pthread_join(t[i], NULL);
    for (int i = 0; i < MT_THREADS; i++) free(xburst_batch[i]);
    pthread_barrier_destroy(&xburst_line);
    return xburst_rounds * MT_THREADS * XBURST_BATCH;
}

/* realloc: word j of vector generation `key` is key * 2^32 + j. */
static uint64_t vec_word(uint64_t key, size_t j) { return (key << 32) + j; }

static size_t bench_realloc(double scale) {
    enum { VECS = 16 };
    size_t cycles = scaled(48, scale);
    rng_t r = {3};
    uint64_t *v[VECS] = {0};
    size_t words[VECS] = {0}, max_words[VECS];
    uint64_t key[VECS];
    size_t ops = 0, finished = 0, gen = 0;
    for (int i = 0; i < VECS; i++) {
        max_words[i] = ((size_t)1 << rng_range(&r, 20, 22)) / sizeof(uint64_t);
        key[i] = gen++;
    }
    while (finished < cycles * VECS) {
        for (int i = 0; i < VECS; i++) {
            size_t n = words[i] ? words[i] * 2 : 2;
            uint64_t *p = realloc(v[i], n * sizeof *p);
            if (!p) {
                fprintf(stderr, "realloc(%zu) failed\n", n * sizeof *p);
                exit(3);
            }
            ops++;
            /* Spot-check the carried-over prefix, then fill the new half. */
            for (size_t j = 0; j < words[i]; j += 509)
                if (p[j] != vec_word(key[i], j))
                    WRONG_DATA("realloc vector word %zu of %zu after growing", j, words[i]);
            for (size_t j = words[i]; j < n; j++) p[j] = vec_word(key[i], j);
            v[i] = p;
            words[i] = n;
            if (n >= max_words[i]) {
                for (size_t j = 0; j < n; j++)
                    if (p[j] != vec_word(key[i], j))
                        WRONG_DATA("realloc vector word %zu of %zu at full size", j, n);
                free(p);
                v[i] = NULL;
                words[i] = 0;
                max_words[i] = ((size_t)1 << rng_range(&r, 20, 22)) / sizeof(uint64_t);
                key[i] = gen++;
                finished++;
            }
        }
    }
    for (int i = 0; i < VECS; i++) free(v[i]);
    return ops;
}

static size_t bench_large(double scale) {
    enum { LIVE = 8 };
    size_t ops = scaled(3000, scale);
    size_t ps = page_size();
    struct slot live[LIVE] = {{0}};
    rng_t r = {4};
    for (size_t i = 0; i < ops; i++) {
        struct slot *s = &live[rng_below(&r, LIVE)];
        if (s->p) {
            for (size_t off = 0; off + sizeof(uint64_t) <= s->size; off += ps)
                if (*(uint64_t *)((char *)s->p + off) != s->key + off)
                    WRONG_DATA("large block of %zu bytes at offset %zu", s->size, off);
            free(s->p);
        }
        s->size = rng_range(&r, 64 << 10, 4 << 20) & ~(size_t)7;
        s->key = mix64(i);
        s->p = xmalloc(s->size);
        for (size_t off = 0; off + sizeof(uint64_t) <= s->size; off += ps)
            *(uint64_t *)((char *)s->p + off) = s->key + off;
    }
    for (int i = 0; i < LIVE; i++) free(live[i].p);
    return ops;
}

/* bigblocks: each block is zeroed whole, then stamped once per page; checked before it goes. */
static size_t bench_bigblocks(double scale) {
    enum { LIVE = 20 };
    size_t ops = scaled(600, scale);
    size_t ps = page_size();
    struct slot live[LIVE] = {{0}};
    rng_t r = {6};
    for (size_t i = 0; i < ops; i++) {
        struct slot *s = &live[rng_below(&r, LIVE)];
        if (s->p) {
            for (size_t off = 0; off + sizeof(uint64_t) <= s->size; off += ps) {
                const unsigned char *at = (const unsigned char *)s->p + off;
                if (*(const uint64_t *)at != s->key + off)
                    WRONG_DATA("big block of %zu bytes at offset %zu", s->size, off);
                if (off + sizeof(uint64_t) < s->size && at[sizeof(uint64_t)] != 0)
                    WRONG_DATA("big block of %zu bytes: byte %zu not zeroed", s->size,
                               off + sizeof(uint64_t));
            }
            free(s->p);
        }
        s->size = rng_range(&r, 5 * MIB, 25 * MIB) & ~(size_t)7;
        s->key = mix64(i);
        s->p = xmalloc(s->size);
        memset(s->p, 0, s->size);
        for (size_t off = 0; off + sizeof(uint64_t) <= s->size; off += ps)
            *(uint64_t *)((char *)s->p + off) = s->key + off;
    }
    for (int i = 0; i < LIVE; i++) free(live[i].p);
    return ops;
}

static size_t bench_frag(double scale) {
    enum { ROUNDS = 6 };
    size_t n = scaled(1e6, scale);
    struct slot *objs = calloc(n, sizeof *objs);
    rng_t r = {5};
    size_t ops = 0;
    uint64_t gen = 0;
    /* Round 0: power-of-two sizes 16-256 B. */
    for (size_t i = 0; i < n; i++) {
        objs[i].size = (size_t)16 << rng_below(&r, 5);
        objs[i].key = mix64(gen++);
        objs[i].p = xmalloc(objs[i].size);
        stamp_obj(objs[i].p, objs[i].size, objs[i].key);
        ops++;
    }
    /* Each round frees every other object and allocates objects of the sizes in between
     * (1.5x of the power of two) into the freed slots, alternating which half goes. */
    for (int round = 1; round < ROUNDS; round++) {
        for (size_t i = (size_t)round % 2; i < n; i += 2) {
            check_obj(objs[i].p, objs[i].size, objs[i].key, "frag");
            free(objs[i].p);
            ops++;
        }
        for (size_t i = (size_t)round % 2; i < n; i += 2) {
            size_t base = (size_t)16 << rng_below(&r, 5);
            objs[i].size = round % 2 ? base + base / 2 : base;
            objs[i].key = mix64(gen++);
            objs[i].p = xmalloc(objs[i].size);
            stamp_obj(objs[i].p, objs[i].size, objs[i].key);
            ops++;
        }
    }
    for (size_t i = 0; i < n; i++) {
        check_obj(objs[i].p, objs[i].size, objs[i].key, "frag");
        free(objs[i].p);
        ops++;
    }
    free(objs);
    return ops;
}

/* churnmt: lane l's array survives its threads; each round starts a new thread per lane. */
enum { CHURN_SLOTS = 8192 };
struct lane {
    struct slot *slots;
    rng_t r;
    size_t round;
};
static size_t churn_ops_per_thread;

static void *churn_thread(void *arg) {
    struct lane *l = arg;
    for (size_t i = 0; i < churn_ops_per_thread; i++) {
        struct slot *s = &l->slots[rng_below(&l->r, CHURN_SLOTS)];
        if (s->p) {
            check_obj(s->p, s->size, s->key, "churnmt");
            free(s->p);
        }
        s->size = rng_range(&l->r, 16, 800);
        s->key = mix64((l->round << 32) ^ i ^ (uint64_t)(uintptr_t)l);
        s->p = xmalloc(s->size);
        stamp_obj(s->p, s->size, s->key);
    }
    return NULL;
}

static size_t bench_churnmt(double scale) {
    size_t rounds = scaled(200, scale);
    churn_ops_per_thread = CHURN_SLOTS * 2;
    struct lane lanes[MT_THREADS];
    for (int i = 0; i < MT_THREADS; i++) {
        lanes[i].slots = calloc(CHURN_SLOTS, sizeof(struct slot));
        if (!lanes[i].slots) {
            fprintf(stderr, "alloc_bench: calloc of a lane failed\n");
            exit(3);
        }
        lanes[i].r.s = 300 + (uint64_t)i;
        lanes[i].round = 0;
    }
    for (size_t round = 0; round < rounds; round++) {
        pthread_t t[MT_THREADS];
        for (int i = 0; i < MT_THREADS; i++) {
            lanes[i].round = round;
            start_thread(&t[i], churn_thread, &lanes[i]);
        }
        for (int i = 0; i < MT_THREADS; i++) pthread_join(t[i], NULL);
    }
    for (int i = 0; i < MT_THREADS; i++) {
        for (size_t j = 0; j < CHURN_SLOTS; j++) {
            struct slot *s = &lanes[i].slots[j];
            if (!s->p) continue;
            check_obj(s->p, s->size, s->key, "churnmt");
            free(s->p);
        }
        free(lanes[i].slots);
    }
    return rounds * MT_THREADS * churn_ops_per_thread;
}

int main(int argc, char **argv) {
    if (argc < 2) die_usage(USAGE);
    const char *mode = argv[1];
    double scale = arg_num(argc, argv, 2, 1, USAGE);
    size_t (*bench)(double) = NULL;
    if (!strcmp(mode, "small")) bench = bench_small;
    if (!strcmp(mode, "prodcons")) bench = bench_prodcons;
    if (!strcmp(mode, "realloc")) bench = bench_realloc;
    if (!strcmp(mode, "large")) bench = bench_large;
    if (!strcmp(mode, "frag")) bench = bench_frag;
    if (!strcmp(mode, "smallmt")) bench = bench_smallmt;
    if (!strcmp(mode, "xburst")) bench = bench_xburst;
    if (!strcmp(mode, "bigblocks")) bench = bench_bigblocks;
    if (!strcmp(mode, "churnmt")) bench = bench_churnmt;
    if (!bench) die_usage(USAGE);

    uint64_t t0 = now_ns();
    size_t ops = bench(scale);
    uint64_t t1 = now_ns();
    double s = (double)(t1 - t0) / 1e9;
    printf("bench=alloc mode=%s scale=%g ops=%zu seconds=%.6f ns_per_op=%.1f\n", mode, scale, ops, s,
           s * 1e9 / (double)ops);
    return 0;
}
