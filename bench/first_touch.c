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

    first_touch_and_report("first_touch", heap, pages, ps, mib);
    free(heap);
    return 0;
}
