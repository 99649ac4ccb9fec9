/* A small JIT: maps a page writable, writes x86-64 code into it (`mov eax, imm32; ret`),
 * makes it executable and calls it, then flips it back to writable, patches the constant and
 * calls it again, FLIPS times. Every EVICT_EVERY flips, while the page is writable, it sweeps
 * a buffer larger than the cache, so that under lego the code page is evicted and must come
 * back, with its code, on the next write or call. A second page is kept executable all the
 * time (pinned under lego: never evicted) and called after each sweep.
 *
 * Usage: jit FLIPS SWEEP_MIB
 *
 * Output: the sum of every call's result and the sweep's checksum; it depends only on the
 * arguments. */
#define _GNU_SOURCE
#include "common.h"

#include <errno.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096UL
#define EVICT_EVERY 1000

typedef int (*fn_t)(void);

/* `mov eax, imm32; ret` at p. */
static void emit(unsigned char *p, uint32_t imm) {
    p[0] = 0xb8;
    memcpy(p + 1, &imm, 4);
    p[5] = 0xc3;
}

static void must(int ok, const char *what) {
    if (!ok) {
        printf("%s failed: %s\n", what, strerror(errno));
        exit(1);
    }
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s FLIPS SWEEP_MIB\n", argv[0]);
        return 2;
    }
    long flips = atol(argv[1]);
    size_t sweep = (size_t)atol(argv[2]) * MIB;
    unsigned char *code = mmap(NULL, PAGE, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned char *fixed = mmap(NULL, PAGE, PROT_READ | PROT_WRITE,
                                MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    must(code != MAP_FAILED && fixed != MAP_FAILED, "mmap");
    emit(fixed, 4242);
    must(mprotect(fixed, PAGE, PROT_READ | PROT_EXEC) == 0, "mprotect fixed RX");
    unsigned char *buf = malloc(sweep);
    must(buf != NULL, "malloc sweep buffer");
    uint64_t sum = 0, swept = 0;
    emit(code, 42);
    must(mprotect(code, PAGE, PROT_READ | PROT_EXEC) == 0, "mprotect RX");
    printf("first call: %d\n", ((fn_t)code)());
    for (long i = 0; i < flips; i++) {
        must(mprotect(code, PAGE, PROT_READ | PROT_WRITE) == 0, "mprotect RW");
        if (i % EVICT_EVERY == 0) {
            /* The code page is writable now, so lego may evict it: push it out. */
            fill_pattern(buf, sweep, (uint64_t)i);
            for (size_t k = 0; k < sweep; k += PAGE) swept += buf[k];
            sum += (uint64_t)((fn_t)fixed)();
        }
        uint32_t imm = (uint32_t)mix64((uint64_t)i) & 0xffffff;
        /* Patch only the constant: the opcode bytes must have survived the eviction. */
        memcpy(code + 1, &imm, 4);
        __builtin___clear_cache((char *)code, (char *)code + 6);
        must(mprotect(code, PAGE, PROT_READ | PROT_EXEC) == 0, "mprotect RX");
        int got = ((fn_t)code)();
        if ((uint32_t)got != imm) {
            printf("WRONG DATA: flip %ld returned %d, want %u\n", i, got, imm);
            return 1;
        }
        sum += (uint64_t)got;
    }
    printf("flips %ld sum %llu swept %llu\n", flips, (unsigned long long)sum,
           (unsigned long long)swept);
    must(munmap(code, PAGE) == 0 && munmap(fixed, PAGE) == 0, "munmap");
    free(buf);
    printf("done\n");
    return 0;
}
