/* Program 1: single-threaded mixed-size heap.
 *
 * usage: heap_mixed [MiB=512] [seed=1]
 *
 * Builds about MiB of live heap: small 32-512 B nodes in linked lists (pointer chasing
 * through evicted pages), medium 4-64 KiB blocks and large 1-8 MiB blocks, all filled with
 * a seeded pattern. Then verifies in sequential and random order, frees half, reallocs and
 * reallocates, and verifies again in both orders. Prints checksums; any mismatch prints "WRONG DATA" and
 * the exit status is 1. */
#include "common.h"

enum { LISTS = 256, NODES_PER_RUN = 64 };

struct node {
    struct node *next;
    uint64_t key;
    uint32_t len; /* bytes of data[] */
    uint32_t pad;
    unsigned char data[];
};

struct block {
    unsigned char *p;
    size_t len;
    uint64_t key;
};

static struct node *lists[LISTS];
static struct block *blocks;
static size_t nblocks, cap_blocks;
static uint64_t next_key = 1;
static int bad;

static size_t add_node(rng_t *r, size_t list) {
    size_t size = rng_range(r, 32, 512);
    struct node *n = xmalloc(size);
    n->len = (uint32_t)(size - sizeof(struct node));
    n->key = next_key++;
    fill_pattern(n->data, n->len, n->key);
    n->next = lists[list];
    lists[list] = n;
    return size;
}

static void add_block(size_t len) {
    if (nblocks == cap_blocks) {
        cap_blocks = cap_blocks ? cap_blocks * 2 : 1024;
        blocks = realloc(blocks, cap_blocks * sizeof *blocks);
        if (!blocks) { printf("realloc of the block table failed\n"); exit(1); }
    }
    struct block *b = &blocks[nblocks++];
    b->p = xmalloc(len);
    b->len = len;
    b->key = next_key++;
    fill_pattern(b->p, len, b->key);
}

static uint64_t verify_lists(int reverse) {
    uint64_t sum = 0;
    for (size_t k = 0; k < LISTS; k++) {
        size_t l = reverse ? LISTS - 1 - k : k;
        for (struct node *n = lists[l]; n; n = n->next)
            if (!check_pattern(n->data, n->len, n->key, "small node", &sum)) bad = 1;
    }
    return sum;
}

static uint64_t verify_blocks(rng_t *order) {
    uint64_t sum = 0;
    size_t *idx = xmalloc(nblocks * sizeof *idx);
    for (size_t i = 0; i < nblocks; i++) idx[i] = i;
    if (order)
        for (size_t i = nblocks; i > 1; i--) {
            size_t j = (size_t)(rng_next(order) % i), t = idx[i - 1];
            idx[i - 1] = idx[j];
            idx[j] = t;
        }
    for (size_t i = 0; i < nblocks; i++) {
        struct block *b = &blocks[idx[i]];
        if (b->p && !check_pattern(b->p, b->len, b->key, "block", &sum)) bad = 1;
    }
    free(idx);
    return sum;
}

static void sweep(const char *name, rng_t *r) {
    uint64_t s1 = verify_blocks(NULL);
    uint64_t s2 = verify_lists(0);
    uint64_t s3 = verify_blocks(r);
    uint64_t s4 = verify_lists(1);
    printf("%s: blocks seq %016llx lists fwd %016llx blocks rnd %016llx lists rev %016llx\n", name,
           (unsigned long long)s1, (unsigned long long)s2, (unsigned long long)s3,
           (unsigned long long)s4);
}

int main(int argc, char **argv) {
    size_t mib = arg_size(argc, argv, 1, 512);
    rng_t r = {arg_size(argc, argv, 2, 1)};
    size_t small_budget = mib * MIB / 5, medium_budget = mib * MIB * 3 / 10,
           large_budget = mib * MIB - small_budget - medium_budget;
    size_t small_used = 0, medium_used = 0, large_used = 0, nodes = 0;

    /* Interleave the three kinds so the heap mixes them. */
    while (small_used < small_budget || medium_used < medium_budget || large_used < large_budget) {
        uint64_t pick = rng_next(&r) % 100;
        if (pick < 90 && small_used < small_budget) {
            for (int i = 0; i < 16; i++) {
                /* Runs of nodes share a list: locality a real program's lists have, while
                 * the 256 lists still interleave through the small-object area. */
                small_used += add_node(&r, (nodes / NODES_PER_RUN) % LISTS);
                nodes++;
            }
        } else if (pick < 99 && medium_used < medium_budget) {
            size_t len = rng_range(&r, 4096, 65536);
            add_block(len);
            medium_used += len;
        } else if (large_used < large_budget) {
            size_t len = rng_range(&r, MIB, 8 * MIB);
            add_block(len);
            large_used += len;
        }
    }
    printf("allocated %zu MiB: %zu small nodes, %zu blocks\n", mib, nodes, nblocks);
    sweep("sweep 1", &r);

    /* Free half: every odd block and every second node of each list. */
    size_t freed = 0;
    for (size_t i = 1; i < nblocks; i += 2) {
        free(blocks[i].p);
        blocks[i].p = NULL;
        freed++;
    }
    for (size_t l = 0; l < LISTS; l++)
        for (struct node *n = lists[l]; n && n->next; n = n->next) {
            struct node *dead = n->next;
            n->next = dead->next;
            free(dead);
            freed++;
        }
    printf("freed %zu objects\n", freed);

    /* Resize a third of the surviving blocks; the common prefix must survive realloc. */
    uint64_t rsum = 0;
    for (size_t i = 0; i < nblocks; i += 6) {
        struct block *b = &blocks[i];
        size_t len = b->len >= MIB ? rng_range(&r, MIB / 2, 9 * MIB) : rng_range(&r, 1024, 96 * 1024);
        unsigned char *p = realloc(b->p, len);
        if (!p) { printf("realloc(%zu) failed\n", len); return 1; }
        size_t keep = len < b->len ? len : b->len;
        /* check_pattern on a prefix that is a multiple of 8 bytes reads whole words only. */
        if (!check_pattern(p, keep & ~(size_t)7, b->key, "realloc prefix", &rsum)) bad = 1;
        b->p = p;
        b->len = len;
        b->key = next_key++;
        fill_pattern(p, len, b->key);
    }
    printf("realloc prefixes %016llx\n", (unsigned long long)rsum);

    /* Reallocate the freed slots with new sizes, and new nodes in the lists. */
    for (size_t i = 1; i < nblocks; i += 2) {
        struct block *b = &blocks[i];
        b->len = rng_range(&r, 4096, i % 40 == 1 ? 6 * MIB : 65536);
        b->p = xmalloc(b->len);
        b->key = next_key++;
        fill_pattern(b->p, b->len, b->key);
    }
    for (size_t i = 0; i < nodes / 2; i++) add_node(&r, (i / NODES_PER_RUN * 7) % LISTS);
    sweep("sweep 2", &r);

    for (size_t i = 0; i < nblocks; i++) free(blocks[i].p);
    for (size_t l = 0; l < LISTS; l++)
        for (struct node *n = lists[l], *next; n; n = next) {
            next = n->next;
            free(n);
        }
    free(blocks);
    printf("%s\n", bad ? "FAILED" : "all checks passed");
    return bad;
}
