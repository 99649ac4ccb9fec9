/* Program 5: read(2)/write(2) on heap buffers whose pages are evicted.
 *
 * usage: syscall_buffers DIR [MiB=256]
 *
 * The kernel, not the program, touches the buffer here: copy_to_user/copy_from_user hit
 * the missing pages and the fault must be resolved exactly like a user fault.
 *  1. a 64 MiB file of known data is written in DIR (from a small buffer);
 *  2. buffer A (64 MiB) is dirtied with garbage, then the rest of the heap is touched so A
 *     is evicted; read(fd, A, 64 MiB) must return the full count with the file's bytes;
 *  3. buffer C (64 MiB) is filled with a pattern and evicted the same way, then written with
 *     one write(2) to a file (read back and compared) and with one write(2) to a pipe
 *     drained by a thread (checksummed).
 * Prints the results; wrong bytes print "WRONG DATA", and the exit status is 1. */
#define _GNU_SOURCE
#include "common.h"
#include <fcntl.h>
#include <pthread.h>
#include <unistd.h>

#define BUF (64 * MIB)
#define CHUNK MIB

static unsigned char **filler;
static size_t nfiller;

/* Touches every page of the filler so that, under a small cache, earlier buffers are evicted. */
static uint64_t touch_filler(uint64_t round) {
    uint64_t s = 0;
    for (size_t i = 0; i < nfiller; i++)
        for (size_t off = 0; off < CHUNK; off += 4096) {
            filler[i][off] += (unsigned char)round;
            s += filler[i][off];
        }
    return s;
}

struct drain {
    int fd;
    size_t total, off;
    int bad;
};

static void *drain_pipe(void *arg) {
    struct drain *d = arg;
    unsigned char *tmp = xmalloc(CHUNK);
    /* The pattern of key 33 over BUF, compared word by word as it streams in. */
    unsigned char *want = xmalloc(BUF);
    fill_pattern(want, BUF, 33);
    while (d->off < d->total) {
        ssize_t r = read(d->fd, tmp, CHUNK);
        if (r <= 0) break;
        if (memcmp(tmp, want + d->off, (size_t)r) != 0) {
            printf("WRONG DATA from the pipe near byte %zu\n", d->off);
            d->bad = 1;
        }
        d->off += (size_t)r;
    }
    free(want);
    free(tmp);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        printf("usage: syscall_buffers DIR [MiB]\n");
        return 2;
    }
    size_t mib = arg_size(argc, argv, 2, 256);
    char path[4096];
    snprintf(path, sizeof path, "%s/syscall_buffers.%d.in", argv[1], (int)getpid());
    int bad = 0;

    unsigned char *a = xmalloc(BUF), *c = xmalloc(BUF);
    nfiller = (mib * MIB - 2 * BUF) / CHUNK;
    filler = xmalloc(nfiller * sizeof *filler);
    for (size_t i = 0; i < nfiller; i++) {
        filler[i] = xmalloc(CHUNK);
        memset(filler[i], (int)i, CHUNK);
    }

    /* 1. The input file, written through a small buffer. */
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) {
        printf("cannot create %s\n", path);
        return 1;
    }
    unsigned char *small = xmalloc(CHUNK);
    for (size_t off = 0; off < BUF; off += CHUNK) {
        fill_pattern(small, CHUNK, 100 + off / CHUNK);
        if (write(fd, small, CHUNK) != (ssize_t)CHUNK) {
            printf("short write while creating the input file\n");
            return 1;
        }
    }

    /* 2. read(2) into an evicted buffer. */
    memset(a, 0xcc, BUF);
    touch_filler(1);
    lseek(fd, 0, SEEK_SET);
    ssize_t got = read(fd, a, BUF);
    printf("read into evicted buffer: %zd of %zu bytes\n", got, (size_t)BUF);
    if (got != (ssize_t)BUF) bad = 1;
    uint64_t sum = 0;
    for (size_t off = 0; off < BUF; off += CHUNK)
        if (!check_pattern(a + off, CHUNK, 100 + off / CHUNK, "read buffer", &sum)) bad = 1;
    printf("read data checksum %016llx\n", (unsigned long long)sum);
    close(fd);
    unlink(path);

    /* 3a. write(2) from an evicted buffer to a file. */
    fill_pattern(c, BUF, 33);
    touch_filler(2);
    snprintf(path, sizeof path, "%s/syscall_buffers.%d.out", argv[1], (int)getpid());
    fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    ssize_t put = write(fd, c, BUF);
    printf("write from evicted buffer to a file: %zd of %zu bytes\n", put, (size_t)BUF);
    if (put != (ssize_t)BUF) bad = 1;
    sum = 0;
    unsigned char *want = xmalloc(CHUNK);
    for (size_t off = 0; off < BUF; off += CHUNK) {
        if (pread(fd, small, CHUNK, (off_t)off) != (ssize_t)CHUNK) {
            printf("short read back at %zu\n", off);
            bad = 1;
            break;
        }
        memcpy(want, c + off, CHUNK); /* c itself must still hold the pattern too */
        if (memcmp(small, want, CHUNK) != 0) {
            printf("WRONG DATA in the written file near byte %zu\n", off);
            bad = 1;
            break;
        }
    }
    if (!check_pattern(c, BUF, 33, "write buffer", &sum)) bad = 1;
    printf("written file matches, checksum %016llx\n", (unsigned long long)sum);
    close(fd);
    unlink(path);

    /* 3b. write(2) from an evicted buffer to a pipe. */
    touch_filler(3);
    int pfd[2];
    if (pipe(pfd) != 0) {
        printf("pipe failed\n");
        return 1;
    }
    struct drain d = {.fd = pfd[0], .total = BUF};
    pthread_t t;
    pthread_create(&t, NULL, drain_pipe, &d);
    size_t done = 0;
    while (done < BUF) {
        ssize_t w = write(pfd[1], c + done, BUF - done);
        if (w <= 0) break;
        done += (size_t)w;
    }
    close(pfd[1]);
    pthread_join(t, NULL);
    close(pfd[0]);
    printf("pipe: wrote %zu, reader got %zu bytes%s\n", done, d.off, d.bad ? " (WRONG DATA)" : "");
    if (done != BUF || d.off != BUF || d.bad) bad = 1;

    printf("filler checksum %016llx\n", (unsigned long long)touch_filler(0));
    printf("%s\n", bad ? "FAILED" : "all checks passed");
    return bad;
}
