/* Served mappings in the durable heap (LEGO_MMAP=1 with LEGO_LOG_DIR, then LEGO_RESTORE).
 *
 *   mmap_durable run MIB   maps MIB MiB read-write and one 1 MiB mapping whose first 256 KiB
 *                          are PROT_NONE and next 256 KiB PROT_READ (both filled before they
 *                          were protected), fills everything, hangs the pointers off
 *                          lego_root, checkpoints, rewrites the big mapping and exits (the
 *                          exit logs the final state).
 *   mmap_durable verify    after a restore: every byte is what the run left, the guard still
 *                          faults, the read-only part still refuses a write, and the mappings
 *                          can be unmapped, remapped and protected again.
 *
 * Prints what it checked; a wrong byte is a "WRONG DATA" line and exit 1. */
#define _GNU_SOURCE
#include "common.h"
#include "segv_probe.h"

#include <errno.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include "../../preload/include/lego.h"

#pragma weak lego_checkpoint
#pragma weak lego_root
#pragma weak lego_set_root

#define MAGIC 0x4d4d41504455524cULL
#define SMALL (1UL << 20)
#define QUARTER (SMALL / 4)

struct state {
    uint64_t magic;
    unsigned char *big;
    size_t big_len;
    unsigned char *small;
};

static void must(int ok, const char *what) {
    if (!ok) {
        printf("%s failed: %s\n", what, strerror(errno));
        exit(1);
    }
}

/* Checks [off, off+len) of a block filled with fill_pattern(block, ..., key). */
static void check(const unsigned char *block, size_t off, size_t len, uint64_t key,
                  const char *what) {
    for (size_t i = off / 8; i < (off + len) / 8; i++) {
        uint64_t w;
        memcpy(&w, block + i * 8, 8);
        if (w != pattern_word(key, i)) {
            printf("WRONG DATA in %s at byte %zu\n", what, i * 8);
            exit(1);
        }
    }
}

int main(int argc, char **argv) {
    if (argc < 2 || !lego_root || !lego_set_root || !lego_checkpoint) {
        fprintf(stderr, "usage: %s run MIB | verify (under liblego.so)\n", argv[0]);
        return 2;
    }
    segv_probe_install();
    if (strcmp(argv[1], "run") == 0 && argc == 3) {
        struct state *st = malloc(sizeof *st);
        st->magic = MAGIC;
        st->big_len = (size_t)atoi(argv[2]) * MIB;
        st->big = mmap(NULL, st->big_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                       -1, 0);
        st->small = mmap(NULL, SMALL, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        must(st->big != MAP_FAILED && st->small != MAP_FAILED, "mmap");
        fill_pattern(st->big, st->big_len, 1);
        fill_pattern(st->small, SMALL, 2);
        must(mprotect(st->small, QUARTER, PROT_NONE) == 0, "mprotect PROT_NONE");
        must(mprotect(st->small + QUARTER, QUARTER, PROT_READ) == 0, "mprotect PROT_READ");
        lego_set_root(st);
        long e = lego_checkpoint();
        must(e >= 0, "lego_checkpoint");
        /* Changed after the checkpoint: the exit's epoch must have this. */
        fill_pattern(st->big, st->big_len, 3);
        printf("run: %zu MiB mapped and a guarded 1 MiB mapping, checkpointed\n",
               st->big_len / MIB);
        return 0;
    }
    if (strcmp(argv[1], "verify") == 0) {
        struct state *st = lego_root();
        if (!st || st->magic != MAGIC) {
            printf("WRONG DATA: no state at the root\n");
            return 1;
        }
        check(st->big, 0, st->big_len, 3, "big mapping");
        printf("verify: big mapping holds the final bytes\n");
        printf("verify: guard faults on read %d, read-only faults on write %d\n",
               segv_probe(st->small, 0), segv_probe(st->small + QUARTER, 1));
        check(st->small, QUARTER, SMALL - QUARTER, 2, "read-only and read-write parts");
        must(mprotect(st->small, QUARTER, PROT_READ | PROT_WRITE) == 0, "mprotect back");
        /* Guarded when its epoch was cut: its bytes were read past the protection. */
        check(st->small, 0, QUARTER, 2, "guard");
        printf("verify: guard holds its bytes once readable\n");
        must(munmap(st->big + MIB, MIB) == 0, "munmap a part of the restored mapping");
        must(munmap(st->small, SMALL) == 0, "munmap the small mapping");
        unsigned char *n = mmap(NULL, SMALL, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                                -1, 0);
        must(n != MAP_FAILED, "mmap after restore");
        for (size_t i = 0; i < SMALL; i++)
            if (n[i]) {
                printf("WRONG DATA: a new mapping after restore is not zero\n");
                return 1;
            }
        printf("verify: unmapped and mapped again\n");
        return 0;
    }
    fprintf(stderr, "usage: %s run MIB | verify\n", argv[0]);
    return 2;
}
