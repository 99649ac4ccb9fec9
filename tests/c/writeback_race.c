/* Program: a write-back that fails while the program gives memory back must not lose pages.
 *
 * usage: writeback_race [MiB=96] [rounds=12]
 *
 * One thread fills MiB of 64 KiB blocks with a pattern per round and checks every block;
 * another keeps handing pages back with madvise(MADV_DONTNEED) on a block of its own (each
 * call is a REMOVE event the runtime must read). Run with LEGO_FAULT_INJECT=store:eio:after=0
 * and a small cache, every write-back fails and the evictor puts its pages back while REMOVE
 * events wait: a page it fails to put back must never read as zeros ("WRONG DATA"). */
#include "common.h"

#include <pthread.h>
#include <stdatomic.h>
#include <sys/mman.h>
#include <unistd.h>

#define BLOCK (64 * 1024)

static atomic_int done;

static void *dropper(void *arg) {
    (void)arg;
    size_t len = 4 * MIB;
    unsigned char *p = xmalloc(len + 4096);
    unsigned char *a = (unsigned char *)(((uintptr_t)p + 4095) & ~(uintptr_t)4095);
    unsigned long calls = 0;
    while (!atomic_load(&done)) {
        for (size_t off = 0; off < len; off += 4096) a[off] = 1;
        for (size_t off = 0; off < len && !atomic_load(&done); off += 4096) {
            madvise(a + off, 4096, MADV_DONTNEED);
            calls++;
        }
    }
    free(p);
    return (void *)calls;
}

int main(int argc, char **argv) {
    size_t mib = arg_size(argc, argv, 1, 96);
    size_t rounds = arg_size(argc, argv, 2, 12);
    size_t n = mib * MIB / BLOCK;
    unsigned char **b = xmalloc(n * sizeof *b);
    for (size_t i = 0; i < n; i++) b[i] = xmalloc(BLOCK);
    pthread_t t;
    if (pthread_create(&t, NULL, dropper, NULL) != 0) {
        perror("pthread_create");
        return 2;
    }
    int bad = 0;
    for (size_t r = 0; r < rounds && !bad; r++) {
        for (size_t i = 0; i < n; i++) fill_pattern(b[i], BLOCK, r * n + i);
        uint64_t sum = 0;
        for (size_t i = 0; i < n && !bad; i++)
            if (!check_pattern(b[i], BLOCK, r * n + i, "block", &sum)) bad = 1;
    }
    atomic_store(&done, 1);
    void *calls;
    pthread_join(t, &calls);
    fprintf(stderr, "madvise calls: %lu\n", (unsigned long)calls);
    printf("%s\n", bad ? "FAILED" : "all checks passed");
    return bad;
}
