/* Program: pages holding a marker a test can look for on the pool's servers.
 *
 * usage: seal_marker [MiB=48]
 *
 * Fills MiB of 1 MiB blocks, every 4 KiB page with the 32-byte marker MARKER repeated, but
 * for its first 8 bytes (the page's number, so no two pages are equal), then reads every
 * page back twice and prints a checksum. Run under a small cache on a pool, most pages are
 * evicted to the servers: with LEGO_KEY_FILE no value there may contain the marker; without
 * a key the values hold it in the clear (the test's control). Reading back a value that
 * differs from what was written prints a "WRONG DATA" line. */
#include "common.h"

#define MARKER "lego-seal-test:plaintext-marker!"
#define PAGE 4096

static void fill_page(unsigned char *p, uint64_t n) {
    for (size_t at = 0; at < PAGE; at += 32) memcpy(p + at, MARKER, 32);
    memcpy(p, &n, 8);
}

int main(int argc, char **argv) {
    size_t n = arg_size(argc, argv, 1, 48);
    size_t pages = MIB / PAGE;
    unsigned char **b = xmalloc(n * sizeof *b);
    for (size_t i = 0; i < n; i++) {
        b[i] = xmalloc(MIB);
        for (size_t k = 0; k < pages; k++) fill_page(b[i] + k * PAGE, i * pages + k);
    }
    printf("filled %zu MiB\n", n);
    fflush(stdout);
    int bad = 0;
    unsigned char want[PAGE];
    for (int pass = 0; pass < 2; pass++) {
        uint64_t sum = 0;
        for (size_t i = 0; i < n; i++) {
            for (size_t k = 0; k < pages; k++) {
                fill_page(want, i * pages + k);
                unsigned char *p = b[i] + k * PAGE;
                if (memcmp(p, want, PAGE) != 0) {
                    printf("WRONG DATA in page %zu\n", i * pages + k);
                    fflush(stdout);
                    bad = 1;
                }
                for (size_t w = 0; w < PAGE; w += 8) {
                    uint64_t v;
                    memcpy(&v, p + w, 8);
                    sum = mix64(sum ^ v);
                }
            }
        }
        printf("pass %d checksum %016llx\n", pass, (unsigned long long)sum);
        fflush(stdout);
    }
    printf("%s\n", bad ? "FAILED" : "all checks passed");
    return bad;
}
