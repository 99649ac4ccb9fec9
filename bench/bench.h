/* Shared helpers for the benchmark programs that scripts/bench.sh compiles and runs.
 *
 * Every program prints exactly one result line on stdout, `key=value` pairs separated by
 * spaces (the script reads them by key), and exits 1 after printing a line starting
 * "WRONG DATA" when something it reads back differs from what it wrote. Usage errors exit 2.
 * Nothing here asserts on time: the programs measure, the script compares. */
#ifndef LEGO_BENCH_H
#define LEGO_BENCH_H

#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MIB ((size_t)1 << 20)

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline size_t page_size(void) {
    long p = sysconf(_SC_PAGESIZE);
    return p > 0 ? (size_t)p : 4096;
}

/* splitmix64: a stateless mixer for page stamps and a seeded generator. */
static inline uint64_t mix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

typedef struct {
    uint64_t s;
} rng_t;

static inline uint64_t rng_next(rng_t *r) {
    r->s += 0x9e3779b97f4a7c15ull;
    return mix64(r->s);
}

/* A uniform integer in [0, n) (n > 0); the modulo bias is irrelevant at these sizes. */
static inline uint64_t rng_below(rng_t *r, uint64_t n) { return rng_next(r) % n; }

/* A uniform integer in [lo, hi]. */
static inline size_t rng_range(rng_t *r, size_t lo, size_t hi) {
    return lo + (size_t)rng_below(r, (uint64_t)(hi - lo + 1));
}

static inline void die_usage(const char *usage) {
    fprintf(stderr, "usage: %s\n", usage);
    exit(2);
}

/* A positive decimal argument, or `def` when absent; anything else is a usage error. */
static inline double arg_num(int argc, char **argv, int i, double def, const char *usage) {
    if (i >= argc) return def;
    char *end = NULL;
    double v = strtod(argv[i], &end);
    if (end == argv[i] || *end != '\0' || !(v > 0)) die_usage(usage);
    return v;
}

static inline void *xmalloc(size_t n) {
    void *p = malloc(n);
    if (!p) {
        fprintf(stderr, "malloc(%zu) failed\n", n);
        exit(3);
    }
    return p;
}

/* Reports data that came back different from what was written, and stops. */
#define WRONG_DATA(...)                                                                       \
    do {                                                                                      \
        printf("WRONG DATA: " __VA_ARGS__);                                                   \
        printf("\n");                                                                         \
        fflush(stdout);                                                                       \
        exit(1);                                                                              \
    } while (0)

/* The first-touch loop shared by first_touch.c and uffd_floor.c: writes one byte per page of
 * `heap` in order (timed), checks them all, and prints the result line as `name`. */
static inline void first_touch_and_report(const char *name, unsigned char *heap, size_t pages,
                                          size_t ps, size_t mib) {
    uint64_t t0 = now_ns();
    for (size_t i = 0; i < pages; i++) heap[i * ps] = (unsigned char)(i * 7 + 1);
    uint64_t t1 = now_ns();
    for (size_t i = 0; i < pages; i++) {
        if (heap[i * ps] != (unsigned char)(i * 7 + 1))
            WRONG_DATA("page %zu holds %u, expected %u", i, heap[i * ps],
                       (unsigned)(unsigned char)(i * 7 + 1));
    }
    double ns = (double)(t1 - t0);
    printf("bench=%s mib=%zu pages=%zu seconds=%.6f ns_per_page=%.1f\n", name, mib, pages,
           ns / 1e9, ns / (double)pages);
}

#endif
