/*
 * timed NAME PROGRAM [ARGS...]: runs PROGRAM (with this process's environment, so an
 * LD_PRELOAD in it applies to PROGRAM), and prints one line
 *
 *   bench=NAME seconds=WALL child_rss_kib=PEAK output_bytes=N output_fnv=HASH exit=STATUS
 *
 * where output_fnv is the 64-bit FNV-1a hash of everything PROGRAM wrote to its standard
 * output (so a run under lego can be checked against a native run without storing it).
 * Linked statically by scripts/bench.sh, so that an LD_PRELOAD meant for PROGRAM does not
 * load into the timer itself. Exits with PROGRAM's status (128 + signal if killed).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: timed NAME PROGRAM [ARGS...]\n");
        return 2;
    }
    int out[2];
    if (pipe(out) != 0) {
        perror("timed: pipe");
        return 2;
    }
    double start = now();
    pid_t pid = fork();
    if (pid < 0) {
        perror("timed: fork");
        return 2;
    }
    if (pid == 0) {
        dup2(out[1], 1);
        close(out[0]);
        close(out[1]);
        execvp(argv[2], argv + 2);
        fprintf(stderr, "timed: cannot run %s: %s\n", argv[2], strerror(errno));
        _exit(127);
    }
    close(out[1]);
    uint64_t hash = 0xcbf29ce484222325ull, bytes = 0;
    char buf[65536];
    for (;;) {
        ssize_t n = read(out[0], buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        for (ssize_t i = 0; i < n; i++) {
            hash ^= (unsigned char)buf[i];
            hash *= 0x100000001b3ull;
        }
        bytes += (uint64_t)n;
    }
    int status;
    struct rusage ru;
    while (wait4(pid, &status, 0, &ru) < 0) {
        if (errno != EINTR) {
            perror("timed: wait4");
            return 2;
        }
    }
    double seconds = now() - start;
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    printf("bench=%s seconds=%.6f child_rss_kib=%ld output_bytes=%llu output_fnv=%016llx exit=%d\n",
           argv[1], seconds, ru.ru_maxrss, (unsigned long long)bytes, (unsigned long long)hash,
           code);
    return code;
}
