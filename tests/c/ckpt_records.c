/* Records that agree with their root only at the program's own checkpoints, for the recovery
 * tests of the two kinds (the newest epoch, and the newest lego_checkpoint()).
 *
 *   ckpt_records run N     makes N records of RECORD_BYTES (or, after a restore, continues
 *                          them), then forever: version V+1 is written into every record in
 *                          order, word by word, then the root says V+1, then
 *                          lego_checkpoint(); prints "checkpoint V EPOCH" once it returned.
 *   ckpt_records check KIND  after LEGO_RESTORE: prints "restored V" (the root's version) and
 *                          checks the records. KIND "checkpoint": every word of every record
 *                          is at version V (what a program checkpoint guarantees). KIND
 *                          "cut": the words, in the order they were written, are a prefix at
 *                          V+1 followed by the rest at V (a point-in-time cut of the update
 *                          loop: some records updated, at most one partly, the rest not).
 *                          Prints "records ok" or a WRONG DATA line (exit 1), or "no root"
 *                          (exit 3) for a heap cut before the root was set. */
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

#define ROOT_MAGIC 0x4c45474f434b5231ULL
#define RECORD_BYTES (16 * 1024)
#define WORDS (RECORD_BYTES / 8)

struct root {
    uint64_t magic;
    volatile uint64_t version;
    uint64_t count;
    uint64_t **records;
};

static uint64_t word(uint64_t version, uint64_t rec, uint64_t k) {
    return pattern_word(version * 1000003 + rec, k);
}

static void say(const char *text) {
    size_t n = strlen(text);
    if (write(1, text, n) != (ssize_t)n) exit(2);
}

static int check(struct root *r, const char *kind) {
    char line[200];
    uint64_t v = r->version;
    snprintf(line, sizeof line, "restored %llu\n", (unsigned long long)v);
    say(line);
    int cut = strcmp(kind, "cut") == 0;
    int newer = 1; /* still in the prefix of words at v+1 */
    for (uint64_t i = 0; i < r->count; i++) {
        uint64_t *rec = r->records[i];
        for (uint64_t k = 0; k < WORDS; k++) {
            uint64_t w = rec[k];
            if (cut && newer && w == word(v + 1, i, k)) continue;
            newer = 0;
            if (w != word(v, i, k)) {
                snprintf(line, sizeof line,
                         "WRONG DATA (%s): record %llu word %llu is at neither version %llu%s\n",
                         kind, (unsigned long long)i, (unsigned long long)k,
                         (unsigned long long)v, cut ? " nor the next one in order" : "");
                say(line);
                return 1;
            }
        }
    }
    say("records ok\n");
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: ckpt_records run N | check checkpoint|cut\n");
        return 2;
    }
    struct root *r = lego_root();
    if (strcmp(argv[1], "check") == 0) {
        if (!r) {
            /* A cut taken before lego_set_root: the records are not published yet. */
            say("no root\n");
            return 3;
        }
        if (r->magic != ROOT_MAGIC) {
            say("WRONG DATA: the root is not a ckpt_records root\n");
            return 1;
        }
        return check(r, argv[2]);
    }
    if (!r) {
        uint64_t n = strtoull(argv[2], NULL, 10);
        r = xmalloc(sizeof *r);
        r->magic = ROOT_MAGIC;
        r->version = 0;
        r->count = n;
        r->records = xmalloc(n * sizeof *r->records);
        for (uint64_t i = 0; i < n; i++) {
            r->records[i] = xmalloc(RECORD_BYTES);
            for (uint64_t k = 0; k < WORDS; k++) r->records[i][k] = word(0, i, k);
        }
        lego_set_root(r);
    } else if (check(r, "checkpoint") != 0) {
        return 1;
    }
    say("start\n");
    for (;;) {
        uint64_t v = r->version + 1;
        for (uint64_t i = 0; i < r->count; i++) {
            volatile uint64_t *rec = r->records[i];
            for (uint64_t k = 0; k < WORDS; k++) rec[k] = word(v, i, k);
        }
        r->version = v;
        long e = lego_checkpoint();
        char line[96];
        if (e < 0)
            snprintf(line, sizeof line, "checkpoint failed errno %d\n", errno);
        else
            snprintf(line, sizeof line, "checkpoint %llu %ld\n", (unsigned long long)v, e);
        say(line);
        if (e < 0) return 1;
    }
}
