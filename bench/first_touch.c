/* First touch: the cost per page of the first write to fresh heap pages.
 *
 * usage: first_touch [MiB=256]
 *
 * mallocs one block of MiB, writes one byte per page in address order, and reports the
 * nanoseconds per page of that loop alone. Without a shim this is the kernel's anonymous
 * page fault (glibc serves a block this large with its own mmap); under liblego.so it is the
 * runtime's zero-fill path. The written bytes are read back afterwards. */
#include "bench.h"

static const char *const USAGE = "first_touch [MiB=256]";

int main(int argc, char **argv) {
    size_t mib = (size_t)arg_num(argc, argv, 1, 256, USAGE);
    size_t ps = page_size();
    size_t pages = mib * MIB / ps;
    unsigned char *heap = xmalloc(pages * ps);

    uint64_t t0 = now_ns();
    for (size_t i = 0; i < pages; i++) heap[i * ps] = (unsigned char)(i * 7 + 1);
    uint64_t t1 = now_ns();

    for (size_t i = 0; i < pages; i++) {
        if (heap[i * ps] != (unsigned char)(i * 7 + 1))
            WRONG_DATA("page %zu holds %u, expected %u", i, heap[i * ps],
                       (unsigned)(unsigned char)(i * 7 + 1));
    }
    double ns = (double)(t1 - t0);
    printf("bench=first_touch mib=%zu pages=%zu seconds=%.6f ns_per_page=%.1f\n", mib, pages,
           ns / 1e9, ns / (double)pages);
    free(heap);
    return 0;
}
