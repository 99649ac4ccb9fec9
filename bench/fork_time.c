/* fork() of a process whose heap is mostly evicted (issue 14's bench row).
 *
 * usage: fork_time HEAP_MIB FORKS
 *
 * Fills HEAP_MIB of 1 MiB blocks (under a cache of a tenth of it, 90% is then evicted, or
 * swapped out under a cgroup cap), reads back the last tenth (so that is what is resident),
 * then forks FORKS times; each child checks one word of every block (it reads the whole heap
 * as of the fork, as a BGSAVE child does, a page per block) and exits; the parent times each
 * fork() call until it returns, then waits for the child. Prints one bench= line: the median
 * and the largest fork() time in milliseconds and the children's peak RSS (RUSAGE_CHILDREN). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define BLOCK (1u << 20)
#define FORKS_MAX 64

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: fork_time HEAP_MIB FORKS\n");
        return 2;
    }
    size_t n = (size_t)atol(argv[1]);
    int forks = atoi(argv[2]);
    if (n == 0 || forks < 1 || forks > FORKS_MAX) return 2;
    uint64_t **b = malloc(n * sizeof *b);
    for (size_t i = 0; i < n; i++) {
        b[i] = malloc(BLOCK);
        if (!b[i]) return 1;
        for (size_t w = 0; w < BLOCK / 8; w++) b[i][w] = i * 1000003u + w;
    }
    uint64_t sum = 0;
    for (size_t i = n - n / 10; i < n; i++)
        for (size_t w = 0; w < BLOCK / 8; w += 512) sum += b[i][w];
    double ms[FORKS_MAX];
    for (int f = 0; f < forks; f++) {
        double t0 = now_ms();
        pid_t pid = fork();
        double t1 = now_ms();
        if (pid < 0) return 1;
        if (pid == 0) {
            for (size_t i = 0; i < n; i++)
                if (b[i][i % (BLOCK / 8)] != i * 1000003u + i % (BLOCK / 8)) {
                    printf("WRONG DATA in block %zu\n", i);
                    _exit(1);
                }
            _exit(0);
        }
        ms[f] = t1 - t0;
        int status;
        if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status)) return 1;
    }
    qsort(ms, (size_t)forks, sizeof ms[0], cmp);
    struct rusage ru;
    getrusage(RUSAGE_CHILDREN, &ru);
    printf("bench=fork_time heap_mib=%zu forks=%d fork_ms=%.3f fork_ms_max=%.3f child_rss_kib=%ld check=%llu\n",
           n, forks, ms[forks / 2], ms[forks - 1], ru.ru_maxrss, (unsigned long long)(sum & 0xff));
    return 0;
}
