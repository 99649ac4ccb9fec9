/* Anonymous mappings through every call lego serves with LEGO_MMAP=1: maps, fills and
 * hashes them, grows them with mremap (at the top of the heap, in place under lego, and
 * over a neighbour, which moves), unmaps parts, guards parts with PROT_NONE and makes parts
 * read-only (a fault on them is caught and reported), drops parts with MADV_DONTNEED and
 * MADV_FREE, maps with MAP_FIXED over its own mapping, moves with MREMAP_FIXED, asks for an
 * mremap the kernel refuses (two protections), and churns many mappings of random sizes.
 *
 * Usage: mmap_ops MIB   (the size of the largest mapping; the total is about 4.5x that)
 *
 * Its stdout depends only on MIB: a hash of every mapping's bytes after each step, faults and
 * errnos. Under lego, with a cache far below the total, the pages are evicted and fetched
 * between the steps, so every hash checks that they came back. Where an address lies (moved
 * or not) is never printed: lego and the kernel place mappings differently. */
#define _GNU_SOURCE
#include "common.h"
#include "segv_probe.h"

#include <errno.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096UL

static uint64_t hash_bytes(const void *p, size_t len) {
    const uint64_t *w = (const uint64_t *)p;
    uint64_t h = 0x6a09e667f3bcc908ULL;
    for (size_t i = 0; i < len / 8; i++) h = mix64(h ^ w[i]);
    return h;
}

static void show(const char *step, const char *what, const void *p, size_t len) {
    printf("%-10s %-14s %8zu KiB hash %016llx\n", step, what, len >> 10,
           (unsigned long long)hash_bytes(p, len));
}

static int all_zero(const void *p, size_t len) {
    const uint64_t *w = (const uint64_t *)p;
    for (size_t i = 0; i < len / 8; i++)
        if (w[i]) return 0;
    return 1;
}

static void *must_map(size_t len, int prot) {
    void *p = mmap(NULL, len, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        printf("mmap of %zu bytes failed: %s\n", len, strerror(errno));
        exit(1);
    }
    return p;
}

static void must(int ok, const char *what) {
    if (!ok) {
        printf("%s failed: %s\n", what, strerror(errno));
        exit(1);
    }
}

/* Every page of [p, p+len) either reads as key's pattern or as zeros (MADV_FREE's choice). */
static int pattern_or_zero(const unsigned char *p, size_t len, uint64_t key, size_t offset) {
    for (size_t at = 0; at < len; at += PAGE) {
        if (all_zero(p + at, PAGE)) continue;
        for (size_t i = 0; i < PAGE / 8; i++) {
            uint64_t w;
            memcpy(&w, p + at + i * 8, 8);
            if (w != pattern_word(key, (offset + at) / 8 + i)) return 0;
        }
    }
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s MIB\n", argv[0]);
        return 2;
    }
    size_t big = (size_t)atoi(argv[1]) * MIB;
    size_t half = big / 2, quarter = big / 4, eighth = big / 8;
    segv_probe_install();

    /* 1. Three mappings, filled. */
    unsigned char *a = must_map(big, PROT_READ | PROT_WRITE);
    unsigned char *b = must_map(big, PROT_READ | PROT_WRITE);
    unsigned char *c = must_map(big, PROT_READ | PROT_WRITE);
    must(all_zero(a, big) && all_zero(b, big) && all_zero(c, big), "fresh mappings read zeros");
    fill_pattern(a, big, 1);
    fill_pattern(b, big, 2);
    fill_pattern(c, big, 3);
    show("map", "a", a, big);
    show("map", "b", b, big);
    show("map", "c", c, big);

    /* 2. Growth: d is the newest mapping (lego grows it in place at the heap's top); a has b
     * after it under lego, so it moves. Both keep their bytes, the tails read zeros. */
    unsigned char *d = must_map(quarter, PROT_READ | PROT_WRITE);
    fill_pattern(d, quarter, 4);
    unsigned char *d2 = mremap(d, quarter, half, MREMAP_MAYMOVE);
    must(d2 != MAP_FAILED, "mremap grow d");
    fprintf(stderr, "d %s\n", d2 == d ? "grew in place" : "moved");
    d = d2;
    must(all_zero(d + quarter, half - quarter), "d's new tail reads zeros");
    fill_pattern(d + quarter, half - quarter, 5);
    show("grow", "d", d, half);
    unsigned char *a2 = mremap(a, big, big + half, MREMAP_MAYMOVE);
    must(a2 != MAP_FAILED, "mremap grow a");
    fprintf(stderr, "a %s\n", a2 == a ? "grew in place" : "moved");
    a = a2;
    must(all_zero(a + big, half), "a's new tail reads zeros");
    fill_pattern(a + big, half, 6);
    show("grow", "a", a, big + half);
    size_t a_len = big + half;

    /* 3. Partial munmap: the middle quarter of b goes; a new mapping reads zeros (under lego
     * it may take b's hole). */
    must(munmap(b + quarter, quarter) == 0, "munmap the middle of b");
    show("unmap", "b head", b, quarter);
    show("unmap", "b tail", b + half, half);
    unsigned char *e = must_map(quarter, PROT_READ | PROT_WRITE);
    must(all_zero(e, quarter), "a new mapping after munmap reads zeros");
    fill_pattern(e, quarter, 7);
    show("unmap", "e", e, quarter);

    /* 4. Guards: c's first eighth and its last page PROT_NONE, the next eighth read-only. */
    must(mprotect(c, eighth, PROT_NONE) == 0, "mprotect c head PROT_NONE");
    must(mprotect(c + big - PAGE, PAGE, PROT_NONE) == 0, "mprotect c's last page PROT_NONE");
    must(mprotect(c + eighth, eighth, PROT_READ) == 0, "mprotect c PROT_READ");
    int f1 = segv_probe(c, 0) + segv_probe(c + eighth - 1, 1) + segv_probe(c + big - 1, 0);
    int f2 = segv_probe(c + eighth, 1);
    int f3 = segv_probe(c + eighth + PAGE, 0);
    printf("guard      faults on PROT_NONE %d, on a write to PROT_READ %d, on a read of it %d\n",
           f1, f2, f3);
    show("guard", "c read-only", c + eighth, eighth);
    show("guard", "c middle", c + 2 * eighth, big - 2 * eighth - PAGE);
    /* A mapping whose pieces differ: the kernel refuses to grow it as one (EFAULT). */
    void *r = mremap(c, big, big + PAGE, MREMAP_MAYMOVE);
    printf("guard      mremap over two protections: %s\n",
           r == MAP_FAILED ? strerror(errno) : "accepted");
    must(mprotect(c, 2 * eighth, PROT_READ | PROT_WRITE) == 0, "mprotect c back");
    must(mprotect(c + big - PAGE, PAGE, PROT_READ | PROT_WRITE) == 0, "mprotect c's end back");
    show("guard", "c after", c, big);

    /* 5. Dropping: MADV_DONTNEED reads zeros after; MADV_FREE reads the old bytes or zeros
     * page by page (the kernel's choice), and what is written after it stays. */
    must(madvise(a + eighth, eighth, MADV_DONTNEED) == 0, "MADV_DONTNEED");
    printf("drop       dontneed range reads zeros: %d\n", all_zero(a + eighth, eighth));
    show("drop", "a", a, a_len);
    must(madvise(b + half, eighth, MADV_FREE) == 0, "MADV_FREE");
    printf("drop       free range reads pattern or zeros: %d\n",
           pattern_or_zero(b + half, eighth, 2, half));
    fill_pattern(b + half, eighth, 8);
    show("drop", "b tail", b + half, half);

    /* 6. MAP_FIXED over part of c: new zero pages. */
    unsigned char *cf = mmap(c + quarter, eighth, PROT_READ | PROT_WRITE,
                             MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    must(cf == c + quarter, "mmap MAP_FIXED over c");
    printf("fixed      reads zeros: %d\n", all_zero(cf, eighth));
    fill_pattern(cf, eighth, 9);
    show("fixed", "c", c, big);

    /* 7. Shrink a; move the last quarter of d over e with MREMAP_FIXED. */
    unsigned char *a3 = mremap(a, a_len, half, 0);
    must(a3 == a, "mremap shrink a");
    a_len = half;
    show("shrink", "a", a, a_len);
    unsigned char *moved = mremap(d + quarter, quarter, quarter, MREMAP_MAYMOVE | MREMAP_FIXED, e);
    must(moved == e, "mremap MREMAP_FIXED onto e");
    show("move", "e", e, quarter);
    show("move", "d head", d, quarter);

    /* 8. Churn: mappings of 256 KiB to 2 MiB, up to 32 live, each checked before unmap. */
    enum { LIVE = 32, ROUNDS = 600 };
    unsigned char *live[LIVE] = {0};
    size_t lens[LIVE] = {0};
    uint64_t keys[LIVE] = {0};
    uint64_t rng = 12345, sum = 0;
    for (int i = 0; i < ROUNDS; i++) {
        rng = mix64(rng);
        int s = (int)(rng % LIVE);
        if (live[s]) {
            if (!check_pattern(live[s], lens[s], keys[s], "churn", &sum)) return 1;
            must(munmap(live[s], lens[s]) == 0, "churn munmap");
            live[s] = NULL;
        } else {
            lens[s] = (64 + (rng >> 20) % 448) * PAGE;
            keys[s] = 100 + (uint64_t)i;
            live[s] = must_map(lens[s], PROT_READ | PROT_WRITE);
            if (!all_zero(live[s], lens[s])) {
                printf("WRONG DATA: a churn mapping did not read zeros\n");
                return 1;
            }
            fill_pattern(live[s], lens[s], keys[s]);
        }
    }
    for (int s = 0; s < LIVE; s++)
        if (live[s]) {
            if (!check_pattern(live[s], lens[s], keys[s], "churn", &sum)) return 1;
            must(munmap(live[s], lens[s]) == 0, "churn munmap");
        }
    printf("churn      %d rounds checksum %016llx\n", ROUNDS, (unsigned long long)sum);

    /* 9. Everything once more, then gone. */
    show("end", "a", a, a_len);
    show("end", "b head", b, quarter);
    show("end", "b tail", b + half, half);
    show("end", "c", c, big);
    show("end", "d head", d, quarter);
    show("end", "e", e, quarter);
    must(munmap(a, a_len) == 0 && munmap(b, quarter) == 0 && munmap(b + half, half) == 0 &&
             munmap(c, big) == 0 && munmap(d, quarter) == 0 && munmap(e, quarter) == 0,
         "final munmaps");
    printf("done\n");
    return 0;
}
