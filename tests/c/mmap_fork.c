/* Served mappings across fork (served: nothing is paged in; without fork events, paged in): the child
 * reads the parent's mapping as it was at the fork, unmaps part of it, maps and protects new
 * memory; the parent rewrites its copy meanwhile; each sees only its own bytes.
 *
 * Usage: mmap_fork MIB */
#define _GNU_SOURCE
#include "common.h"

#include <errno.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

static void must(int ok, const char *what) {
    if (!ok) {
        printf("%s failed: %s\n", what, strerror(errno));
        exit(1);
    }
}

static int zeros(const unsigned char *p, size_t len) {
    for (size_t i = 0; i < len; i++)
        if (p[i]) return 0;
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    size_t len = (size_t)atoi(argv[1]) * MIB;
    uint64_t sum = 0;
    unsigned char *a = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    must(a != MAP_FAILED, "mmap");
    fill_pattern(a, len, 1);
    fflush(stdout);
    pid_t pid = fork();
    must(pid >= 0, "fork");
    if (pid == 0) {
        if (!check_pattern(a, len, 1, "child's copy", &sum)) _exit(1);
        must(munmap(a + len / 2, len / 2) == 0, "child munmap");
        unsigned char *b = mmap(NULL, len / 4, PROT_READ | PROT_WRITE,
                                MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        must(b != MAP_FAILED, "child mmap");
        if (!zeros(b, len / 4)) {
            printf("WRONG DATA: the child's new mapping is not zero\n");
            _exit(1);
        }
        fill_pattern(b, len / 4, 2);
        must(mprotect(b, len / 4, PROT_READ) == 0, "child mprotect");
        if (!check_pattern(b, len / 4, 2, "child's new mapping", &sum)) _exit(1);
        if (!check_pattern(a, len / 2, 1, "child's half", &sum)) _exit(1);
        printf("child ok %016llx\n", (unsigned long long)sum);
        fflush(stdout);
        _exit(0);
    }
    fill_pattern(a, len, 3);
    int status = 0;
    must(waitpid(pid, &status, 0) == pid, "waitpid");
    if (!check_pattern(a, len, 3, "parent's copy", &sum)) return 1;
    printf("parent ok %016llx, child exited %d\n", (unsigned long long)sum,
           WIFEXITED(status) ? WEXITSTATUS(status) : -1);
    must(munmap(a, len) == 0, "munmap");
    return 0;
}
