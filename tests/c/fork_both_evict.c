/* Many forks with most of the heap evicted, both sides writing, freeing and evicting.
 *
 * usage: fork_both_evict [MiB=96] [forks=12] [mode=wait|exec|kill|mixed]
 *
 * The parent fills MiB of 256 KiB blocks, each with the pattern of its key, and then forks
 * `forks` times. Each child first checks every block against the keys of the moment of its
 * fork, then rewrites a third of them with keys of its own, frees and reallocates others,
 * checks its whole heap again against its own keys, and exits 0 only if every check passed.
 * While a child runs, its parent rewrites another third with new keys and reallocates some,
 * and after the child is reaped checks its whole heap against its own keys. Nobody may see
 * the other's writes. In mode `exec` each child execs /bin/true after its first check, in
 * mode `kill` the parent kills each child with SIGKILL while it works, `mixed` cycles through
 * wait, exec and kill. Prints one line per fork and, at the end, the children's peak RSS
 * (getrusage RUSAGE_CHILDREN) in KiB. The output depends only on the arguments. */
#include "common.h"
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#define BLOCK (256 * 1024)

static size_t n;
static unsigned char **blocks;
static uint64_t *keys;

static int verify_all(const char *who) {
    for (size_t i = 0; i < n; i++) {
        if (!check_pattern(blocks[i], BLOCK, keys[i], who, NULL)) return 0;
    }
    return 1;
}

/* Rewrites blocks i with i % 3 == part under keys derived from `tag`; every seventh of them
 * is freed and allocated again first. */
static void rewrite(int part, uint64_t tag) {
    for (size_t i = (size_t)part; i < n; i += 3) {
        if (i % 7 == 0) {
            free(blocks[i]);
            blocks[i] = xmalloc(BLOCK);
        }
        keys[i] = tag * 1000003ULL + i;
        fill_pattern(blocks[i], BLOCK, keys[i]);
    }
}

static int child_work(int fork_no, int exec_after_check) {
    if (!verify_all("child (the heap at its fork)")) return 1;
    if (exec_after_check) {
        execl("/bin/true", "true", (char *)NULL);
        printf("WRONG DATA: exec failed\n");
        return 1;
    }
    rewrite(1, 500000 + (uint64_t)fork_no);
    /* Its own allocations, checked and freed. */
    for (int r = 0; r < 3; r++) {
        size_t len = (size_t)(r + 1) * 2 * MIB + 77;
        unsigned char *p = xmalloc(len);
        fill_pattern(p, len, 900000 + (uint64_t)r);
        if (!check_pattern(p, len, 900000 + (uint64_t)r, "child allocation", NULL)) return 1;
        free(p);
    }
    if (!verify_all("child (its own writes)")) return 1;
    return 0;
}

int main(int argc, char **argv) {
    n = arg_size(argc, argv, 1, 96) * MIB / BLOCK;
    int forks = (int)arg_size(argc, argv, 2, 12);
    const char *mode = argc > 3 ? argv[3] : "wait";
    blocks = xmalloc(n * sizeof *blocks);
    keys = xmalloc(n * sizeof *keys);
    for (size_t i = 0; i < n; i++) {
        blocks[i] = xmalloc(BLOCK);
        keys[i] = i;
        fill_pattern(blocks[i], BLOCK, keys[i]);
    }
    printf("parent: %zu blocks of %d KiB\n", n, BLOCK / 1024);
    int bad = 0;
    for (int f = 0; f < forks; f++) {
        const char *m = mode;
        if (strcmp(mode, "mixed") == 0) m = f % 3 == 0 ? "wait" : f % 3 == 1 ? "exec" : "kill";
        fflush(stdout);
        pid_t pid = fork();
        if (pid < 0) {
            printf("fork failed\n");
            return 1;
        }
        if (pid == 0) {
            int r = child_work(f, strcmp(m, "exec") == 0);
            fflush(stdout);
            _exit(r);
        }
        /* Race the child: rewrite another third (and reallocate some) while it reads. */
        rewrite(2, 100 + (uint64_t)f);
        if (strcmp(m, "kill") == 0) kill(pid, SIGKILL);
        int status = 0;
        if (waitpid(pid, &status, 0) != pid) {
            printf("waitpid failed\n");
            return 1;
        }
        int ok = strcmp(m, "kill") == 0 ? (WIFSIGNALED(status) || (WIFEXITED(status) && WEXITSTATUS(status) == 0))
                                         : (WIFEXITED(status) && WEXITSTATUS(status) == 0);
        if (!ok) bad = 1;
        if (!verify_all("parent (its own writes)")) bad = 1;
        printf("fork %d (%s): child %s, parent %s\n", f, m, ok ? "ok" : "FAILED", bad ? "FAILED" : "ok");
    }
    struct rusage ru;
    getrusage(RUSAGE_CHILDREN, &ru);
    fprintf(stderr, "children_maxrss_kib=%ld\n", ru.ru_maxrss);
    for (size_t i = 0; i < n; i++) free(blocks[i]);
    free(blocks);
    free(keys);
    printf("%s\n", bad ? "FAILED" : "all forks ok");
    return bad;
}
