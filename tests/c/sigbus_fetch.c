/* Program 6: a page that cannot be fetched must kill the program, never feed it wrong data.
 *
 * usage: sigbus_fetch [MiB=128]
 *
 * Fills MiB of 1 MiB blocks with a pattern, then reads everything back twice. Run with a
 * small cache and LEGO_FAULT_INJECT=fetch:eio:after=0 the first fetch of an evicted page
 * fails, and the runtime must deliver SIGBUS. Reading back a value that differs from what
 * was written prints a "WRONG DATA" line (flushed at once, so it survives the signal). */
#include "common.h"

int main(int argc, char **argv) {
    size_t n = arg_size(argc, argv, 1, 128);
    unsigned char **b = xmalloc(n * sizeof *b);
    for (size_t i = 0; i < n; i++) {
        b[i] = xmalloc(MIB);
        fill_pattern(b[i], MIB, i);
    }
    printf("filled %zu MiB\n", n);
    fflush(stdout);
    int bad = 0;
    for (int pass = 0; pass < 2; pass++) {
        uint64_t sum = 0;
        for (size_t i = 0; i < n; i++)
            if (!check_pattern(b[i], MIB, i, "block", &sum)) bad = 1;
        printf("pass %d checksum %016llx\n", pass, (unsigned long long)sum);
        fflush(stdout);
    }
    printf("%s\n", bad ? "FAILED" : "all checks passed");
    return bad;
}
