/* A Redis server loaded and then driven by its own clients: the Redis row of the real
 * programs in scripts/bench.sh.
 *
 * usage: redis_drive KEYS VALUE_BYTES READS
 *   Starts `redis-server` on a free loopback port (no persistence, DEBUG allowed from
 *   loopback) with this process's environment, so an LD_PRELOAD in it applies to the server
 *   only: the clients are started without it and, when REDIS_DRIVE_CLIENT_CGROUP names a
 *   cgroup's `cgroup.procs`, are moved there (out of the memory cgroup that caps the
 *   server). Then: KEYS keys `key:%012d` set to values of VALUE_BYTES bytes through
 *   `redis-cli --pipe`; READS random GETs by `redis-benchmark` (4 clients); every 7th key
 *   overwritten and every 11th deleted; READS random GETs again. Prints the dataset's size
 *   and `DEBUG DIGEST` (the same with and without lego, which `timed` checks by its output
 *   hash; the clients' own reports go to stderr), then shuts the server down.
 *   Exits 3 if a client or the server fails. Linked statically, like `timed`, so that the
 *   preload does not load into the driver itself. */
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>

#include "bench.h"

static const char *const USAGE = "redis_drive KEYS VALUE_BYTES READS";

enum {
    VALUE_BYTES_MAX = 65536,
    /* How long the server may take to accept connections, in ms. */
    READY_WAIT_MS = 60000,
};

static char port_arg[16];
static pid_t server = -1;

static _Noreturn void fail(const char *what) {
    fprintf(stderr, "redis_drive: %s%s%s\n", what, errno ? ": " : "", errno ? strerror(errno) : "");
    if (server > 0) kill(server, SIGKILL);
    exit(3);
}

/* A loopback port nobody listens on now. */
static int free_port(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) != 0 ||
        getsockname(fd, (struct sockaddr *)&a, &len) != 0)
        fail("finding a free port");
    close(fd);
    return ntohs(a.sin_port);
}

static int accepts(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    int ok = fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof a) == 0;
    if (fd >= 0) close(fd);
    return ok;
}

/* Runs a client (argv[0] on PATH) to completion, its stdin fed by `feed` (if not NULL) and its
 * stdout to ours or to stderr. */
static void client(char *const argv[], void (*feed)(FILE *), int to_stdout) {
    int in[2];
    if (feed && pipe(in) != 0) fail("pipe");
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) fail("fork");
    if (pid == 0) {
        const char *procs = getenv("REDIS_DRIVE_CLIENT_CGROUP");
        if (procs && *procs) {
            FILE *f = fopen(procs, "w");
            if (!f || fprintf(f, "%d\n", (int)getpid()) < 0 || fclose(f) != 0) {
                fprintf(stderr, "redis_drive: cannot move a client to %s\n", procs);
                _exit(3);
            }
        }
        if (feed) {
            dup2(in[0], 0);
            close(in[0]);
            close(in[1]);
        }
        if (!to_stdout) dup2(2, 1);
        execvp(argv[0], argv);
        fprintf(stderr, "redis_drive: cannot run %s: %s\n", argv[0], strerror(errno));
        _exit(3);
    }
    if (feed) {
        close(in[0]);
        FILE *f = fdopen(in[1], "w");
        if (!f) fail("fdopen");
        feed(f);
        if (fclose(f) != 0) fail("feeding a client");
    }
    int status;
    if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        errno = 0;
        fprintf(stderr, "redis_drive: %s failed\n", argv[0]);
        fail("a client failed");
    }
}

static long keys, value_bytes, reads;

static void value_of(long i, int round, char *out) {
    int n = snprintf(out, (size_t)value_bytes + 1, "%012ld-%d-", i, round);
    rng_t r = {.s = (uint64_t)i * 2654435761u + (uint64_t)round};
    for (; n < value_bytes; n++) out[n] = (char)('a' + rng_below(&r, 26));
    out[value_bytes] = '\0';
}

static void set_cmd(FILE *f, long i, int round) {
    static char v[VALUE_BYTES_MAX + 1];
    value_of(i, round, v);
    fprintf(f, "*3\r\n$3\r\nSET\r\n$16\r\nkey:%012ld\r\n$%ld\r\n%s\r\n", i, value_bytes, v);
}

static void feed_load(FILE *f) {
    for (long i = 0; i < keys; i++) set_cmd(f, i, 0);
}

static void feed_changes(FILE *f) {
    for (long i = 0; i < keys; i++) {
        if (i % 11 == 0)
            fprintf(f, "*2\r\n$3\r\nDEL\r\n$16\r\nkey:%012ld\r\n", i);
        else if (i % 7 == 0)
            set_cmd(f, i, 1);
    }
}

int main(int argc, char **argv) {
    if (argc != 4) die_usage(USAGE);
    keys = atol(argv[1]);
    value_bytes = atol(argv[2]);
    reads = atol(argv[3]);
    if (keys <= 0 || value_bytes < 20 || value_bytes > VALUE_BYTES_MAX || reads <= 0)
        die_usage(USAGE);
    snprintf(port_arg, sizeof port_arg, "%d", free_port());
    server = fork();
    if (server < 0) fail("fork");
    if (server == 0) {
        dup2(2, 1);
        execlp("redis-server", "redis-server", "--port", port_arg, "--bind", "127.0.0.1",
               "--save", "", "--appendonly", "no", "--enable-debug-command", "local",
               "--logfile", "", (char *)NULL);
        fprintf(stderr, "redis_drive: cannot run redis-server: %s\n", strerror(errno));
        _exit(3);
    }
    /* The clients are not paged. */
    unsetenv("LD_PRELOAD");
    int waited = 0;
    while (!accepts(atoi(port_arg))) {
        if (waitpid(server, NULL, WNOHANG) == server) {
            server = -1;
            errno = 0;
            fail("redis-server exited before accepting connections");
        }
        if ((waited += 20) > READY_WAIT_MS) fail("redis-server did not accept connections");
        usleep(20000);
    }
    char keys_arg[32], reads_arg[32];
    snprintf(keys_arg, sizeof keys_arg, "%ld", keys);
    snprintf(reads_arg, sizeof reads_arg, "%ld", reads);
    char *pipe_cmd[] = {"redis-cli", "-p", port_arg, "--pipe", NULL};
    char *bench_cmd[] = {"redis-benchmark", "-p", port_arg, "-q", "-c", "4", "-n", reads_arg,
                         "-r", keys_arg, "GET", "key:__rand_int__", NULL};
    client(pipe_cmd, feed_load, 0);
    client(bench_cmd, NULL, 0);
    client(pipe_cmd, feed_changes, 0);
    client(bench_cmd, NULL, 0);
    char *size_cmd[] = {"redis-cli", "-p", port_arg, "DBSIZE", NULL};
    char *digest_cmd[] = {"redis-cli", "-p", port_arg, "DEBUG", "DIGEST", NULL};
    char *stop_cmd[] = {"redis-cli", "-p", port_arg, "SHUTDOWN", "NOSAVE", NULL};
    client(size_cmd, NULL, 1);
    client(digest_cmd, NULL, 1);
    client(stop_cmd, NULL, 0);
    int status;
    if (waitpid(server, &status, 0) != server || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        server = -1;
        errno = 0;
        fail("redis-server did not exit cleanly");
    }
    return 0;
}
