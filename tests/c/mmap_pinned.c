/* A read-only mapping three times the cache: its pages are pinned under lego (never evicted),
 * so reading it all fills the cache with pages that cannot leave. The faults must still be
 * served (the cache overflows by what is pinned), and the malloc heap afterwards still pages.
 *
 * Usage: mmap_pinned MIB */
#define _GNU_SOURCE
#include "common.h"

#include <sys/mman.h>

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    size_t len = (size_t)atoi(argv[1]) * MIB;
    unsigned char *a = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (a == MAP_FAILED) return 1;
    fill_pattern(a, len, 1);
    if (mprotect(a, len, PROT_READ) != 0) return 1;
    uint64_t sum = 0;
    if (!check_pattern(a, len, 1, "read-only mapping", &sum)) return 1;
    unsigned char *b = malloc(len);
    fill_pattern(b, len, 2);
    if (!check_pattern(b, len, 2, "heap block", &sum)) return 1;
    if (!check_pattern(a, len, 1, "read-only mapping again", &sum)) return 1;
    printf("ok %016llx\n", (unsigned long long)sum);
    return 0;
}
