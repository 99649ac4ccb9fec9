/* Program 3: the corners of the malloc API.
 *
 * usage: alloc_api [dirty MiB=192]
 *
 * - calloc after freeing dirty memory of the same sizes (small and large) returns zeros;
 * - realloc keeps the common prefix while growing small -> large -> huge and shrinking;
 * - posix_memalign / aligned_alloc / memalign / valloc / pvalloc for alignments 16..1 MiB
 *   return aligned, writable memory with malloc_usable_size >= size;
 * - reallocarray and calloc overflow -> NULL with errno ENOMEM, malloc(SIZE_MAX) too;
 * - free() keeps errno.
 * Prints one line per check group; any failure prints "WRONG DATA" or "FAIL" and exits 1. */
#define _GNU_SOURCE
#include "common.h"
#include <errno.h>
#include <malloc.h>
#include <stdint.h>
#include <unistd.h>

static int failures;

#define CHECK(cond, ...)                                                                          \
    do {                                                                                          \
        if (!(cond)) {                                                                            \
            printf("FAIL line %d: ", __LINE__);                                                   \
            printf(__VA_ARGS__);                                                                  \
            printf("\n");                                                                         \
            fflush(stdout);                                                                       \
            failures++;                                                                           \
        }                                                                                         \
    } while (0)

static int all_zero(const unsigned char *p, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (p[i]) {
            printf("WRONG DATA: calloc memory has byte %zu = %#x, want 0\n", i, p[i]);
            return 0;
        }
    return 1;
}

/* Hides a constant from the compiler so it cannot fold or warn about the call it feeds. */
static size_t opaque(size_t x) {
    volatile size_t v = x;
    return v;
}

/* Fills dirty_mib of blocks of ten sizes, all live at once so that under a small cache many
 * are evicted dirty, frees them all, then callocs the same sizes: every byte must be zero
 * (reused memory must not bring back the stale contents, from RAM or from the store). */
static void calloc_after_dirty(size_t dirty_mib) {
    static const size_t sizes[] = {8, 24, 100, 1000, 4096, 5000, 65536, 300000, 4 << 20, 24 << 20};
    enum { NSIZES = sizeof sizes / sizeof sizes[0], COUNT_PER_SIZE_MAX = 100000 };
    size_t count[NSIZES], total = 0, checked = 0;
    for (size_t s = 0; s < NSIZES; s++) {
        count[s] = dirty_mib * MIB / NSIZES / sizes[s] + 1;
        if (count[s] > COUNT_PER_SIZE_MAX) count[s] = COUNT_PER_SIZE_MAX;
        total += count[s];
    }
    unsigned char **p = xmalloc(total * sizeof *p);
    for (int round = 0; round < 2; round++) {
        size_t k = 0;
        for (size_t s = 0; s < NSIZES; s++)
            for (size_t i = 0; i < count[s]; i++, k++) {
                p[k] = xmalloc(sizes[s]);
                memset(p[k], 0xa5 ^ (int)(k & 0xff), sizes[s]);
            }
        for (k = 0; k < total; k++) free(p[k]);
        k = 0;
        /* Same sizes in reverse order, so blocks land on other blocks' old memory too. */
        for (size_t s = NSIZES; s-- > 0;)
            for (size_t i = 0; i < count[s]; i++, k++) {
                p[k] = calloc(1, sizes[s]);
                CHECK(p[k] != NULL, "calloc(1, %zu) returned NULL", sizes[s]);
                if (!p[k]) exit(1);
                if (!all_zero(p[k], sizes[s])) failures++;
                checked++;
            }
        for (k = 0; k < total; k++) free(p[k]);
    }
    free(p);
    /* calloc with count * size: the multiplication, not just one factor, sets the size. */
    unsigned char *q = calloc(opaque(1 << 20), 3);
    CHECK(q && all_zero(q, 3 << 20), "calloc(1<<20, 3) is not 3 MiB of zeros");
    free(q);
    printf("calloc: %zu blocks zeroed after dirty frees\n", checked);
}

static void realloc_prefix(void) {
    static const size_t steps[] = {1, 17, 200, 4000, 70000, 1 << 20, 9 << 20, 64 << 20, 3 << 20, 5000, 100, 3, 40 << 20, 16};
    size_t len = 13;
    unsigned char *p = xmalloc(len);
    fill_pattern(p, len, 77);
    uint64_t sum = 0;
    for (size_t i = 0; i < sizeof steps / sizeof steps[0]; i++) {
        size_t n = steps[i];
        unsigned char *q = realloc(p, n);
        CHECK(q != NULL, "realloc(%zu) returned NULL", n);
        if (!q) return;
        size_t keep = n < len ? n : len;
        if (!check_pattern(q, keep, 77, "realloc prefix", &sum)) failures++;
        /* Only the kept prefix has a pattern; refill the whole block for the next step. */
        fill_pattern(q, n, 77);
        CHECK(malloc_usable_size(q) >= n, "malloc_usable_size %zu < %zu", malloc_usable_size(q), n);
        p = q;
        len = n;
    }
    free(p);
    /* realloc(NULL, n) is malloc(n). */
    p = realloc(NULL, 1000);
    CHECK(p != NULL, "realloc(NULL, 1000) returned NULL");
    free(p);
    printf("realloc: prefixes kept, checksum %016llx\n", (unsigned long long)sum);
}

static void check_aligned(void *p, size_t align, size_t size, const char *fn) {
    CHECK(p != NULL, "%s(align %zu, size %zu) returned NULL", fn, align, size);
    if (!p) return;
    CHECK((uintptr_t)p % align == 0, "%s(align %zu) returned %p", fn, align, p);
    CHECK(malloc_usable_size(p) >= size, "%s: malloc_usable_size %zu < %zu", fn,
          malloc_usable_size(p), size);
    memset(p, 0xee, size);
    fill_pattern(p, size, align + size);
    if (!check_pattern(p, size, align + size, fn, NULL)) failures++;
    free(p);
}

static void aligned(void) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE), n = 0;
    for (size_t align = 16; align <= MIB; align *= 2) {
        size_t sizes[] = {1, align / 2 + 3, align, 3 * align + 5};
        for (int i = 0; i < 4; i++) {
            size_t size = sizes[i];
            void *p = NULL;
            int rc = posix_memalign(&p, align, size);
            CHECK(rc == 0, "posix_memalign(%zu, %zu) = %d", align, size, rc);
            check_aligned(p, align, size, "posix_memalign");
            /* aligned_alloc: C17 allows any size, glibc too. */
            check_aligned(aligned_alloc(align, size), align, size, "aligned_alloc");
            check_aligned(memalign(align, size), align, size, "memalign");
            n += 3;
        }
    }
    void *p = NULL;
    CHECK(posix_memalign(&p, 24, 100) == EINVAL, "posix_memalign with alignment 24 is not EINVAL");
    CHECK(posix_memalign(&p, 4, 100) == EINVAL, "posix_memalign with alignment 4 (< sizeof(void*)) is not EINVAL");
    for (size_t size = 1; size <= 3 * page; size += page / 2) {
        check_aligned(valloc(size), page, size, "valloc");
        /* pvalloc rounds the size up to whole pages. */
        void *q = pvalloc(size);
        CHECK(q && malloc_usable_size(q) >= (size + page - 1) / page * page,
              "pvalloc(%zu) usable size %zu", size, q ? malloc_usable_size(q) : 0);
        check_aligned(q, page, size, "pvalloc");
        n += 2;
    }
    printf("aligned: %zu allocations aligned and writable\n", n);
}

static void overflow_and_errno(void) {
    errno = 0;
    void *p = reallocarray(NULL, opaque(SIZE_MAX / 2), 4);
    CHECK(p == NULL && errno == ENOMEM, "reallocarray(NULL, SIZE_MAX/2, 4) = %p errno %d", p, errno);
    /* volatile: after a failed reallocarray the old block is still ours (GCC assumes not). */
    unsigned char *volatile q = xmalloc(64);
    memset(q, 7, 64);
    errno = 0;
    p = reallocarray(q, opaque((size_t)1 << 40), (size_t)1 << 40);
    CHECK(p == NULL && errno == ENOMEM, "reallocarray(p, 2^40, 2^40) = %p errno %d", p, errno);
    CHECK(q[63] == 7, "reallocarray failure changed the old block");
    p = reallocarray(q, 100, 3);
    CHECK(p != NULL && ((unsigned char *)p)[63] == 7, "reallocarray(p, 100, 3) lost the data");
    free(p);
    errno = 0;
    p = calloc(opaque(SIZE_MAX / 8), 16);
    CHECK(p == NULL && errno == ENOMEM, "calloc overflow = %p errno %d", p, errno);
    errno = 0;
    p = malloc(opaque(SIZE_MAX - 4096));
    CHECK(p == NULL && errno == ENOMEM, "malloc(opaque(SIZE_MAX - 4096)) = %p errno %d", p, errno);
    p = malloc(0);
    CHECK(p != NULL, "malloc(0) returned NULL");
    free(p);
    free(NULL);
    for (size_t size = 1; size <= 64 << 20; size *= 4) {
        p = xmalloc(size);
        memset(p, 1, size);
        errno = 1234;
        free(p);
        CHECK(errno == 1234, "free of a %zu-byte block changed errno to %d", size, errno);
    }
    printf("errors: overflow gives ENOMEM, free keeps errno\n");
}

int main(int argc, char **argv) {
    size_t dirty_mib = arg_size(argc, argv, 1, 192);
    calloc_after_dirty(dirty_mib);
    realloc_prefix();
    aligned();
    overflow_and_errno();
    printf("%s\n", failures ? "FAILED" : "all checks passed");
    return failures != 0;
}
