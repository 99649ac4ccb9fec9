/* An epoch that holds evicted pages must read them back from the page store, and a failed or
 * corrupt read must never give a committed epoch without them.
 *
 *   epoch_readback run MiB [touch]  sets a small root (stage 1) and calls lego_checkpoint(); then
 *                            writes MiB of pattern once (write only: with a small cache most
 *                            of it is evicted dirty and never read back by the program), sets
 *                            stage 2 and calls lego_checkpoint() again. Prints
 *                            "checkpoint STAGE EPOCH" or "checkpoint STAGE failed errno E",
 *                            then exits without touching the block again (with a third
 *                            argument "touch": after reading the whole block back).
 *   epoch_readback show      after LEGO_RESTORE: prints "stage S" and, for stage 2, checks
 *                            every byte of the block ("block ok", or a WRONG DATA line). */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common.h"
#include "../../preload/include/lego.h"

#pragma weak lego_checkpoint
#pragma weak lego_root
#pragma weak lego_set_root

#define ROOT_MAGIC 0x4c45474f52424b31ULL

struct root {
    uint64_t magic;
    uint64_t stage;
    unsigned char *block;
    size_t len;
};

/* One line with one write(2) from the stack: stdio's buffer lives in the heap, and after a
 * failed store a page of it may be one that cannot be served. */
static void checkpoint(uint64_t stage) {
    char line[96];
    long e = lego_checkpoint();
    int n = e < 0 ? snprintf(line, sizeof line, "checkpoint %llu failed errno %d\n",
                             (unsigned long long)stage, errno)
                  : snprintf(line, sizeof line, "checkpoint %llu %ld\n",
                             (unsigned long long)stage, e);
    if (write(1, line, (size_t)n) != n) exit(2);
}

int main(int argc, char **argv) {
    if (argc >= 2 && strcmp(argv[1], "show") == 0) {
        struct root *r = lego_root();
        if (!r || r->magic != ROOT_MAGIC) {
            printf("WRONG DATA: no root in the restored heap\n");
            return 1;
        }
        printf("stage %llu\n", (unsigned long long)r->stage);
        if (r->stage == 2) {
            uint64_t sum = 0;
            if (!check_pattern(r->block, r->len, 7, "block", &sum)) return 1;
            printf("block ok\n");
        }
        return 0;
    }
    size_t mib = arg_size(argc, argv, 2, 64);
    struct root *r = xmalloc(sizeof *r);
    memset(r, 0, sizeof *r);
    r->magic = ROOT_MAGIC;
    r->stage = 1;
    lego_set_root(r);
    checkpoint(1);
    r->len = mib * MIB;
    r->block = xmalloc(r->len);
    fill_pattern(r->block, r->len, 7);
    r->stage = 2;
    checkpoint(2);
    if (argc >= 4 && strcmp(argv[3], "touch") == 0) {
        /* Read the block back: pages whose store copy cannot be had must give SIGBUS. */
        uint64_t sum = 0;
        if (!check_pattern(r->block, r->len, 7, "block", &sum)) _exit(1);
        if (write(1, "block ok\n", 9) != 9) _exit(2);
    }
    /* _exit: the exit's epoch and stdio's flush are not what this program tests (the test
     * runs a normal exit separately). */
    _exit(0);
}
