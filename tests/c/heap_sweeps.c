/* Program: a heap swept and rewritten again and again, for tests that break the page store
 * while the program runs (a server cut off, killed, restarted).
 *
 * usage: heap_sweeps [MiB=64] [passes=6]
 *
 * Fills MiB of 1 MiB blocks with the pattern of generation 0. Then `passes` sweeps: sweep g
 * checks that every block holds generation g, rewrites it with generation g+1, and prints
 * "pass g checksum X". Then it prints "holding" and holds until its stdin is readable or
 * closed (at once with /dev/null, as in a native run): it keeps sweeping, checking every block
 * and writing the same generation back, so every page keeps being fetched and written back
 * while a test breaks and mends the store; these sweeps print nothing on stdout (their count
 * goes to stderr), so stdout is the same however long the hold lasts. Last, a final check
 * prints "final checksum X" and "all checks passed". Any mismatch prints a "WRONG DATA" line
 * and the exit status is 1. */
#include <poll.h>

#include "common.h"

static size_t nblocks;
static unsigned char **blocks;
static int bad;

static uint64_t key_of(size_t block, uint64_t gen) { return (gen << 32) | block; }

/* Checks every block holds generation `gen` and, if `rewrite`, writes generation `next`
 * into it. Returns the checksum of what was read. */
static uint64_t sweep(uint64_t gen, int rewrite, uint64_t next) {
    uint64_t sum = 0;
    for (size_t i = 0; i < nblocks; i++) {
        if (!check_pattern(blocks[i], MIB, key_of(i, gen), "block", &sum)) bad = 1;
        if (rewrite) fill_pattern(blocks[i], MIB, key_of(i, next));
    }
    return sum;
}

/* True once stdin has data, has been closed, or is not a pipe that could get some later. */
static int told_to_stop(void) {
    struct pollfd p = {.fd = 0, .events = POLLIN};
    return poll(&p, 1, 0) != 0;
}

int main(int argc, char **argv) {
    nblocks = arg_size(argc, argv, 1, 64);
    uint64_t passes = arg_size(argc, argv, 2, 6);
    blocks = xmalloc(nblocks * sizeof *blocks);
    for (size_t i = 0; i < nblocks; i++) {
        blocks[i] = xmalloc(MIB);
        fill_pattern(blocks[i], MIB, key_of(i, 0));
    }
    printf("filled %zu MiB\n", nblocks);
    fflush(stdout);
    for (uint64_t g = 0; g < passes && !bad; g++) {
        uint64_t sum = sweep(g, 1, g + 1);
        printf("pass %llu checksum %016llx\n", (unsigned long long)g, (unsigned long long)sum);
        fflush(stdout);
    }
    printf("holding\n");
    fflush(stdout);
    unsigned long holds = 0;
    while (!bad && !told_to_stop()) {
        sweep(passes, 1, passes);
        holds++;
    }
    fprintf(stderr, "heap_sweeps: %lu hold sweeps\n", holds);
    if (!bad) {
        uint64_t sum = sweep(passes, 0, 0);
        printf("final checksum %016llx\n", (unsigned long long)sum);
    }
    printf("%s\n", bad ? "FAILED" : "all checks passed");
    return bad;
}
