/* The fetch bandwidth one memcached server gives a client that does nothing else: the raw
 * baseline of lego's pool rows.
 *
 * usage: mc_raw HOST:PORT PAGES [BATCH=64] [ROUNDS=2]
 *   Stores PAGES values of 4104 bytes (lego's value: an 8-byte header and a 4 KiB page) under
 *   lego's keys (`lego:HEAPID:PAGE`, HEAPID 16 hex digits, a random one), with pipelined quiet
 *   `ms KEY 4104 q O<n>` ended by `mn`; then, timed, reads them all back ROUNDS times in key
 *   order with pipelined `mg KEY v q O<n>` ended by `mn`, BATCH requests per pipeline (lego's
 *   read-ahead reads a window in pipelines of 64 pages: FETCH_CHUNK_PAGES), one pipeline at a
 *   time on one connection. Each value is copied into a page buffer and its header and first
 *   word checked, as a client must before using it. Reports pages (values) read per second
 *   and MB/s of pages (10^6 bytes).
 *
 * A value that is missing, of the wrong size or of another page is WRONG DATA; a server that
 * refuses a value (`NS`, `SERVER_ERROR`) or closes the connection stops the program with
 * status 3. */
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include "bench.h"

static const char *const USAGE = "mc_raw HOST:PORT PAGES [BATCH=64] [ROUNDS=2]";

enum {
    PAGE_BYTES = 4096,
    HEADER_BYTES = 8,
    VALUE_BYTES = HEADER_BYTES + PAGE_BYTES,
    BATCH_MAX = 1024,
    KEY_BYTES_MAX = 64,
    LINE_BYTES_MAX = 1024,
    /* Room for the replies of one pipeline, and then some. */
    IN_BYTES = BATCH_MAX * (VALUE_BYTES + 64) + 4096,
};

static int sock = -1;
static uint64_t heap_id;
static char *in_buf;
static size_t in_len, in_at; /* bytes held, bytes parsed */

static _Noreturn void fail(const char *what) {
    fprintf(stderr, "mc_raw: %s: %s\n", what, errno ? strerror(errno) : "unexpected reply");
    exit(3);
}

static int connect_to(const char *host_port) {
    char host[256];
    const char *colon = strrchr(host_port, ':');
    if (!colon || (size_t)(colon - host_port) >= sizeof host) die_usage(USAGE);
    memcpy(host, host_port, (size_t)(colon - host_port));
    host[colon - host_port] = '\0';
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res;
    if (getaddrinfo(host, colon + 1, &hints, &res) != 0) {
        fprintf(stderr, "mc_raw: cannot resolve %s\n", host_port);
        exit(3);
    }
    int fd = socket(res->ai_family, res->ai_socktype, res->ai_protocol);
    if (fd < 0 || connect(fd, res->ai_addr, res->ai_addrlen) != 0) fail("connecting");
    freeaddrinfo(res);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

static void send_all(const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(sock, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) fail("sending");
        p += w;
        n -= (size_t)w;
    }
}

/* Makes at least `need` unparsed bytes available in in_buf (reading more from the socket). */
static void want(size_t need) {
    if (in_len - in_at >= need) return;
    if (in_at > 0) {
        memmove(in_buf, in_buf + in_at, in_len - in_at);
        in_len -= in_at;
        in_at = 0;
    }
    while (in_len < need) {
        if (in_len == IN_BYTES) {
            errno = 0;
            fail("reply larger than the buffer");
        }
        ssize_t r = read(sock, in_buf + in_len, IN_BYTES - in_len);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            if (r == 0) errno = 0;
            fail("reading");
        }
        in_len += (size_t)r;
    }
}

/* The next reply line (without \r\n), NUL-terminated in place. */
static char *next_line(void) {
    for (size_t scanned = 0;;) {
        char *start = in_buf + in_at;
        char *nl = memchr(start + scanned, '\n', in_len - in_at - scanned);
        if (nl) {
            size_t len = (size_t)(nl - start);
            if (len > 0 && start[len - 1] == '\r') start[len - 1] = '\0';
            *nl = '\0';
            in_at += len + 1;
            return start;
        }
        scanned = in_len - in_at;
        if (scanned > LINE_BYTES_MAX) {
            errno = 0;
            fail("reply line too long");
        }
        want(scanned + 1);
    }
}

static int key(char *out, size_t page) {
    return snprintf(out, KEY_BYTES_MAX, "lego:%016llx:%zx", (unsigned long long)heap_id, page);
}

static uint64_t stamp(size_t page) { return mix64(page ^ heap_id) | 1; }

/* A value: the page number and a stamp (the header), then a page whose words derive from the
 * stamp. */
static void make_value(char *v, size_t page) {
    uint64_t s = stamp(page);
    uint32_t hdr[2] = {(uint32_t)page, (uint32_t)(s >> 32)};
    memcpy(v, hdr, sizeof hdr);
    uint64_t *w = (uint64_t *)(void *)(v + HEADER_BYTES);
    for (size_t k = 0; k < PAGE_BYTES / 8; k++) w[k] = s ^ (k * 0x9e3779b97f4a7c15ull);
}

static void store_all(size_t pages, size_t batch) {
    size_t cap = batch * (VALUE_BYTES + 2 * KEY_BYTES_MAX) + 16, len;
    char *out = xmalloc(cap);
    for (size_t first = 0; first < pages; first += batch) {
        size_t n = pages - first < batch ? pages - first : batch;
        len = 0;
        for (size_t k = 0; k < n; k++) {
            char kbuf[KEY_BYTES_MAX];
            key(kbuf, first + k);
            len += (size_t)sprintf(out + len, "ms %s %d q O%zu\r\n", kbuf, VALUE_BYTES, k);
            make_value(out + len, first + k);
            len += VALUE_BYTES;
            memcpy(out + len, "\r\n", 2);
            len += 2;
        }
        memcpy(out + len, "mn\r\n", 4);
        len += 4;
        send_all(out, len);
        for (;;) {
            char *line = next_line();
            if (!strcmp(line, "MN")) break;
            errno = 0;
            fprintf(stderr, "mc_raw: storing page %zu: %s\n", first, line);
            exit(3);
        }
    }
    free(out);
}

/* One timed pass: every page read back in key order, `batch` per pipeline. */
static void read_all(size_t pages, size_t batch, char *page_buf) {
    size_t cap = batch * (2 * KEY_BYTES_MAX) + 16;
    char *out = xmalloc(cap);
    for (size_t first = 0; first < pages; first += batch) {
        size_t n = pages - first < batch ? pages - first : batch, len = 0;
        for (size_t k = 0; k < n; k++) {
            char kbuf[KEY_BYTES_MAX];
            key(kbuf, first + k);
            len += (size_t)sprintf(out + len, "mg %s v q O%zu\r\n", kbuf, k);
        }
        memcpy(out + len, "mn\r\n", 4);
        len += 4;
        send_all(out, len);
        size_t got = 0;
        for (;;) {
            char *line = next_line();
            if (!strcmp(line, "MN")) break;
            unsigned size;
            size_t opaque;
            if (sscanf(line, "VA %u O%zu", &size, &opaque) != 2) {
                errno = 0;
                fprintf(stderr, "mc_raw: reading page %zu: %s\n", first, line);
                exit(3);
            }
            if (size != VALUE_BYTES || opaque != got)
                WRONG_DATA("page %zu: value of %u bytes with opaque %zu, expected %d bytes, %zu",
                           first + got, size, opaque, VALUE_BYTES, got);
            want(VALUE_BYTES + 2);
            const char *v = in_buf + in_at;
            size_t page = first + got;
            uint32_t hdr[2];
            memcpy(hdr, v, sizeof hdr);
            memcpy(page_buf, v + HEADER_BYTES, PAGE_BYTES);
            in_at += VALUE_BYTES + 2;
            uint64_t w0;
            memcpy(&w0, page_buf, sizeof w0);
            if (hdr[0] != (uint32_t)page || hdr[1] != (uint32_t)(stamp(page) >> 32) ||
                w0 != stamp(page))
                WRONG_DATA("page %zu: the value holds another page", page);
            got++;
        }
        if (got != n)
            WRONG_DATA("pages %zu..%zu: %zu of %zu values came back", first, first + n - 1, got, n);
    }
    free(out);
}

int main(int argc, char **argv) {
    if (argc < 3) die_usage(USAGE);
    size_t pages = (size_t)arg_num(argc, argv, 2, 0, USAGE);
    size_t batch = (size_t)arg_num(argc, argv, 3, 64, USAGE);
    size_t rounds = (size_t)arg_num(argc, argv, 4, 2, USAGE);
    if (pages < 1 || batch < 1 || batch > BATCH_MAX || rounds < 1) die_usage(USAGE);
    heap_id = mix64((uint64_t)getpid() ^ now_ns());
    in_buf = xmalloc(IN_BYTES);
    char *page_buf = xmalloc(PAGE_BYTES);
    sock = connect_to(argv[1]);

    store_all(pages, batch);
    uint64_t t0 = now_ns();
    for (size_t r = 0; r < rounds; r++) read_all(pages, batch, page_buf);
    uint64_t t1 = now_ns();

    double s = (double)(t1 - t0) / 1e9, done = (double)(pages * rounds);
    printf("bench=mc_raw pages=%zu batch=%zu rounds=%zu fetched=%.0f seconds=%.6f "
           "pages_per_s=%.0f mb_per_s=%.1f\n",
           pages, batch, rounds, done, s, done / s, done * PAGE_BYTES / s / 1e6);
    close(sock);
    free(page_buf);
    free(in_buf);
    return 0;
}
