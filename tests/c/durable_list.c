/* A durable structure hung off lego_root, for the crash-loop and restore tests.
 *
 *   durable_list run ITERS CKPT_EVERY   builds (or, after a restore, continues) a list of
 *                                       nodes of random sizes, keeping the newest KEEP, and a
 *                                       table of counters; every CKPT_EVERY generations it
 *                                       calls lego_checkpoint() and prints
 *                                       "checkpoint GEN EPOCH" once it returned (after a
 *                                       failure it says so and stops checkpointing).
 *   durable_list verify ITERS           checks the restored structure, prints "restored GEN",
 *                                       goes on for ITERS generations (allocating and freeing
 *                                       in the restored heap), checks again, prints
 *                                       "verified GEN".
 *
 * The structure is crash-consistent: a node is filled before it is linked (release stores),
 * so any point-in-time cut holds a whole list; the counter table is incremented before the
 * node of the same generation is linked, so its sum is the newest generation or one more.
 * Anything wrong is printed as a "WRONG DATA" line and the program exits 1. */
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

#define STATE_MAGIC 0x4c45474f4c495354ULL
#define KEEP 160
#define COUNTERS (512 * 1024) /* 4 MiB of counters */
#define NODE_BYTES_MAX (256 * 1024)

struct node {
    struct node *next;
    uint64_t gen;
    size_t len;
    unsigned char payload[];
};

struct state {
    uint64_t magic;
    uint64_t published;
    struct node *head;
    struct node *tail;
    uint64_t *counters;
};

/* One line on stdout with one write(2), so a kill never leaves half a line. */
static void say(const char *word, unsigned long long a, long long b, int two) {
    char line[160];
    int n = two ? snprintf(line, sizeof line, "%s %llu %lld\n", word, a, b)
                : snprintf(line, sizeof line, "%s %llu\n", word, a);
    if (write(1, line, (size_t)n) != n) exit(2);
}

static void wrong(const char *what, unsigned long long gen) {
    char word[128];
    snprintf(word, sizeof word, "WRONG DATA: %s at generation", what);
    say(word, gen, 0, 0);
    exit(1);
}

static size_t node_len(uint64_t gen) { return 64 + mix64(gen) % NODE_BYTES_MAX; }

/* Checks the whole structure; returns the newest generation in the list. */
static uint64_t check(struct state *st) {
    if (st->magic != STATE_MAGIC) wrong("state magic", 0);
    uint64_t last = 0, count = 0;
    struct node *prev = NULL;
    for (struct node *n = st->head; n; prev = n, n = n->next) {
        if (last && n->gen != last + 1) wrong("generations not consecutive", n->gen);
        if (n->len != node_len(n->gen)) wrong("node length", n->gen);
        uint64_t sum = 0;
        if (!check_pattern(n->payload, n->len, n->gen, "node", &sum)) wrong("node payload", n->gen);
        last = n->gen;
        count++;
    }
    /* A cut in the middle of a trim keeps a node or two more; a run restored from such a cut
     * adds its next node before trimming. So the bound is loose: it catches a lost trim. */
    if (count > KEEP + 64) wrong("too many nodes", last);
    if (st->tail != prev && (prev == NULL || st->tail->next != prev)) wrong("tail", last);
    if (st->published != last && st->published + 1 != last) wrong("published generation", last);
    uint64_t total = 0;
    for (size_t i = 0; i < COUNTERS; i++) total += st->counters[i];
    if (total != last && total != last + 1) wrong("counter sum", last);
    return last;
}

static void step(struct state *st, uint64_t gen) {
    size_t len = node_len(gen);
    struct node *n = malloc(sizeof *n + len);
    if (!n) wrong("malloc failed", gen);
    n->next = NULL;
    n->gen = gen;
    n->len = len;
    fill_pattern(n->payload, len, gen);
    st->counters[mix64(gen ^ 0x55) % COUNTERS] += 1;
    if (st->tail) __atomic_store_n(&st->tail->next, n, __ATOMIC_RELEASE);
    else __atomic_store_n(&st->head, n, __ATOMIC_RELEASE);
    __atomic_store_n(&st->tail, n, __ATOMIC_RELEASE);
    __atomic_store_n(&st->published, gen, __ATOMIC_RELEASE);
    uint64_t count = 0;
    for (struct node *m = st->head; m; m = m->next) count++;
    while (count > KEEP) {
        struct node *old = st->head;
        __atomic_store_n(&st->head, old->next, __ATOMIC_RELEASE);
        free(old);
        count--;
    }
}

int main(int argc, char **argv) {
    if (argc < 3 || !lego_root || !lego_set_root || !lego_checkpoint) {
        fprintf(stderr, "usage: durable_list run ITERS CKPT_EVERY | verify ITERS (under liblego.so)\n");
        return 2;
    }
    uint64_t iters = strtoull(argv[2], NULL, 10);
    struct state *st = lego_root();
    if (strcmp(argv[1], "verify") == 0) {
        if (!st) wrong("no root after a restore", 0);
        uint64_t g = check(st);
        say("restored", g, 0, 0);
        for (uint64_t i = 1; i <= iters; i++) step(st, g + i);
        say("verified", check(st), 0, 0);
        return 0;
    }
    uint64_t every = argc > 3 ? strtoull(argv[3], NULL, 10) : 8;
    uint64_t g = 0;
    if (st) {
        g = check(st);
    } else {
        struct state *fresh = calloc(1, sizeof *fresh);
        uint64_t *counters = calloc(COUNTERS, sizeof *counters);
        if (!fresh || !counters) wrong("calloc failed", 0);
        fresh->counters = counters;
        fresh->magic = STATE_MAGIC;
        lego_set_root(fresh);
        st = fresh;
    }
    say("start", g, 0, 0);
    for (uint64_t i = 1; i <= iters; i++) {
        step(st, g + i);
        if (every && i % every == 0) {
            long e = lego_checkpoint();
            if (e < 0) {
                /* The heap is intact; go on without asking for durability again. */
                say("checkpoint failed, errno", (unsigned long long)errno, 0, 0);
                every = 0;
                continue;
            }
            say("checkpoint", g + i, e, 1);
        }
    }
    say("done", check(st), 0, 0);
    return 0;
}
