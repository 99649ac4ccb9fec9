/* Shared helpers for the lego integration-test programs.
 *
 * Every program is deterministic: its stdout depends only on its arguments, so the
 * test harness can compare a run under liblego.so byte for byte with a native run.
 * Data is filled from a seeded counter-mode hash (splitmix64) so any byte that comes
 * back different from what was written is detected, and reported on stdout with a
 * line starting "WRONG DATA" (the tests grep for it). */
#ifndef LEGO_TEST_COMMON_H
#define LEGO_TEST_COMMON_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MIB ((size_t)1 << 20)

static inline uint64_t mix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* The expected 64-bit word number `i` of the block identified by `key`. */
static inline uint64_t pattern_word(uint64_t key, uint64_t i) {
    return mix64(key * 0x100000001b3ULL ^ (i + 1) * 0x9e3779b97f4a7c15ULL);
}

/* Fills `len` bytes at `p` with the pattern of `key` (a partial last word gets its low bytes). */
static inline void fill_pattern(void *p, size_t len, uint64_t key) {
    unsigned char *b = (unsigned char *)p;
    size_t words = len / 8;
    for (size_t i = 0; i < words; i++) {
        uint64_t w = pattern_word(key, i);
        memcpy(b + i * 8, &w, 8);
    }
    if (len % 8) {
        uint64_t w = pattern_word(key, words);
        memcpy(b + words * 8, &w, len % 8);
    }
}

/* Checks the pattern of `key` over `len` bytes; on mismatch prints a WRONG DATA line and
 * returns 0. Also folds the contents into *sum so the caller can print a checksum. */
static inline int check_pattern(const void *p, size_t len, uint64_t key, const char *what,
                                uint64_t *sum) {
    const unsigned char *b = (const unsigned char *)p;
    size_t words = len / 8;
    uint64_t acc = 0;
    for (size_t i = 0; i < words; i++) {
        uint64_t w;
        memcpy(&w, b + i * 8, 8);
        if (w != pattern_word(key, i)) {
            printf("WRONG DATA in %s key=%llu at byte %zu: got %016llx want %016llx\n", what,
                   (unsigned long long)key, i * 8, (unsigned long long)w,
                   (unsigned long long)pattern_word(key, i));
            fflush(stdout);
            return 0;
        }
        acc = acc * 31 + w;
    }
    if (len % 8) {
        uint64_t w = 0, want = 0, e = pattern_word(key, words);
        memcpy(&w, b + words * 8, len % 8);
        memcpy(&want, &e, len % 8);
        if (w != want) {
            printf("WRONG DATA in %s key=%llu in the tail at byte %zu\n", what,
                   (unsigned long long)key, words * 8);
            fflush(stdout);
            return 0;
        }
        acc = acc * 31 + w;
    }
    if (sum) *sum = mix64(*sum ^ acc ^ len);
    return 1;
}

/* A tiny deterministic generator for sizes and orders. */
typedef struct { uint64_t s; } rng_t;
static inline uint64_t rng_next(rng_t *r) { r->s += 1; return mix64(r->s); }
static inline size_t rng_range(rng_t *r, size_t lo, size_t hi) { /* inclusive */
    return lo + (size_t)(rng_next(r) % (uint64_t)(hi - lo + 1));
}

static inline void *xmalloc(size_t n) {
    void *p = malloc(n);
    if (!p) {
        printf("malloc(%zu) failed\n", n);
        fflush(stdout);
        exit(1);
    }
    return p;
}

static inline size_t arg_size(int argc, char **argv, int i, size_t dflt) {
    return argc > i ? (size_t)strtoull(argv[i], NULL, 10) : dflt;
}

#endif
