/* Program 4: fork while most of the heap is evicted.
 *
 * usage: fork_evicted [MiB=256]
 *
 * The parent fills MiB of 1 MiB blocks with a pattern and forks. Right after the fork the
 * parent overwrites the first quarter of its blocks with a new pattern; the child must
 * still see the pre-fork contents everywhere (copy-on-write), then allocates, fills,
 * verifies and frees some memory of its own and frees some inherited blocks, and exits 0
 * only if every check passed. The parent waits for the child and then verifies its own
 * heap (new pattern in the first quarter, old elsewhere). Both print checksums. */
#include "common.h"
#include <sys/wait.h>
#include <unistd.h>

#define BLOCK MIB

static uint64_t verify(unsigned char **b, size_t n, size_t rewritten, const char *who, int *bad) {
    uint64_t sum = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t key = i < rewritten ? 1000000 + i : i;
        if (!check_pattern(b[i], BLOCK, key, who, &sum)) *bad = 1;
    }
    return sum;
}

int main(int argc, char **argv) {
    size_t n = arg_size(argc, argv, 1, 256) * MIB / BLOCK;
    unsigned char **b = xmalloc(n * sizeof *b);
    for (size_t i = 0; i < n; i++) {
        b[i] = xmalloc(BLOCK);
        fill_pattern(b[i], BLOCK, i);
    }
    int bad = 0;
    uint64_t before = verify(b, n, 0, "parent before fork", &bad);
    printf("parent: %zu blocks filled, checksum %016llx\n", n, (unsigned long long)before);
    fflush(stdout);

    pid_t pid = fork();
    if (pid < 0) {
        printf("fork failed\n");
        return 1;
    }
    if (pid == 0) {
        uint64_t seen = verify(b, n, 0, "child", &bad);
        /* The child's own allocations, and frees of inherited blocks. */
        uint64_t own = 0;
        for (int round = 0; round < 4; round++) {
            size_t len = (size_t)(round + 1) * 3 * MIB + 123;
            unsigned char *p = xmalloc(len);
            fill_pattern(p, len, 5000 + round);
            if (!check_pattern(p, len, 5000 + round, "child allocation", &own)) bad = 1;
            free(p);
        }
        for (size_t i = n / 2; i < n; i += 3) {
            free(b[i]);
            b[i] = xmalloc(BLOCK);
            fill_pattern(b[i], BLOCK, i);
        }
        uint64_t after = verify(b, n, 0, "child after reallocation", &bad);
        printf("child: checksum %016llx (%s), own allocations %016llx, after frees %016llx\n",
               (unsigned long long)seen, seen == before ? "same as before fork" : "DIFFERENT",
               (unsigned long long)own, (unsigned long long)after);
        if (seen != before || after != before) bad = 1;
        exit(bad);
    }

    /* Race the child: rewrite while it reads; it must still see the old pattern. */
    size_t rewritten = n / 4;
    for (size_t i = 0; i < rewritten; i++) fill_pattern(b[i], BLOCK, 1000000 + i);
    int status = 0;
    if (waitpid(pid, &status, 0) != pid) {
        printf("waitpid failed\n");
        return 1;
    }
    uint64_t mine = verify(b, n, rewritten, "parent after fork", &bad);
    printf("parent: child %s, heap checksum %016llx\n",
           WIFEXITED(status) && WEXITSTATUS(status) == 0 ? "exited 0" : "FAILED", (unsigned long long)mine);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) bad = 1;
    for (size_t i = 0; i < n; i++) free(b[i]);
    free(b);
    printf("%s\n", bad ? "FAILED" : "all checks passed");
    return bad;
}
