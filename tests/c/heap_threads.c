/* Program 2: four threads, each with its own working set, plus cross-thread frees.
 *
 * usage: heap_threads [MiB per thread=110] [messages per thread=20000]
 *
 * Each thread allocates its working set (mixed 64 B - 2 MiB blocks) and verifies it in
 * several sweeps while acting as the producer for the next thread and the consumer for
 * the previous one: messages are malloc'd by the producer, filled, passed through a
 * mutex-protected FIFO and verified and freed by the consumer (frees of memory another
 * thread allocated). Per-thread checksums are printed in thread order after join, so the
 * output is deterministic whatever the scheduling. */
#include "common.h"
#include <pthread.h>
#include <sched.h>

enum { THREADS = 4, QUEUE_CAP = 256 };

struct msg {
    uint64_t key;
    size_t len;
    unsigned char data[];
};

struct queue {
    pthread_mutex_t mu;
    pthread_cond_t not_empty;
    struct msg *items[QUEUE_CAP];
    size_t head, count;
};

struct worker {
    int id;
    size_t bytes, messages;
    struct queue *out, *in;
    uint64_t set_sum, recv_sum;
    int bad;
};

static struct queue queues[THREADS];

static int try_push(struct queue *q, struct msg *m) {
    pthread_mutex_lock(&q->mu);
    int ok = q->count < QUEUE_CAP;
    if (ok) {
        q->items[(q->head + q->count) % QUEUE_CAP] = m;
        q->count++;
        pthread_cond_signal(&q->not_empty);
    }
    pthread_mutex_unlock(&q->mu);
    return ok;
}

static struct msg *try_pop(struct queue *q, int block) {
    pthread_mutex_lock(&q->mu);
    while (block && q->count == 0) pthread_cond_wait(&q->not_empty, &q->mu);
    struct msg *m = NULL;
    if (q->count) {
        m = q->items[q->head];
        q->head = (q->head + 1) % QUEUE_CAP;
        q->count--;
    }
    pthread_mutex_unlock(&q->mu);
    return m;
}

static void consume(struct worker *w, struct msg *m) {
    if (!check_pattern(m->data, m->len, m->key, "message", &w->recv_sum)) w->bad = 1;
    free(m);
}

/* Sends one message; while the next thread's queue is full, drains our own queue so the
 * ring of four producers can never deadlock with every queue full. */
static void send(struct worker *w, rng_t *r, size_t seq, size_t *received) {
    size_t ml = rng_range(r, 16, 8192);
    struct msg *m = xmalloc(sizeof *m + ml);
    m->key = ((uint64_t)(w->id + 1) << 56) + seq;
    m->len = ml;
    fill_pattern(m->data, ml, m->key);
    while (!try_push(w->out, m)) {
        struct msg *in = try_pop(w->in, 0);
        if (in) {
            consume(w, in);
            (*received)++;
        } else {
            sched_yield();
        }
    }
}

static void *run(void *arg) {
    struct worker *w = arg;
    rng_t r = {1000 + (uint64_t)w->id};
    size_t cap = w->bytes / 2048 + 16, n = 0, used = 0;
    unsigned char **ptr = xmalloc(cap * sizeof *ptr);
    size_t *len = xmalloc(cap * sizeof *len);
    uint64_t key_base = (uint64_t)w->id << 40;
    size_t sent = 0, received = 0;

    while (used < w->bytes && n < cap) {
        size_t l = rng_next(&r) % 8 == 0 ? rng_range(&r, 64 * 1024, 2 * MIB) : rng_range(&r, 64, 4096);
        ptr[n] = xmalloc(l);
        len[n] = l;
        fill_pattern(ptr[n], l, key_base + n);
        used += l;
        n++;
        /* Interleave message traffic with the build-up. */
        if (n % 8 == 0 && sent < w->messages) send(w, &r, sent++, &received);
        struct msg *m = try_pop(w->in, 0);
        if (m) {
            consume(w, m);
            received++;
        }
    }
    while (sent < w->messages) {
        send(w, &r, sent++, &received);
        struct msg *in = try_pop(w->in, 0);
        if (in) {
            consume(w, in);
            received++;
        }
    }
    /* Every producer sends the same count, so the consumer knows how many to expect. */
    while (received < w->messages) {
        consume(w, try_pop(w->in, 1));
        received++;
    }

    for (int sweep = 0; sweep < 3; sweep++) {
        uint64_t s = 0;
        for (size_t i = 0; i < n; i++) {
            size_t k = sweep == 1 ? n - 1 - i : sweep == 2 ? (i * 7919) % n : i;
            if (!check_pattern(ptr[k], len[k], key_base + k, "working set", &s)) w->bad = 1;
        }
        w->set_sum = mix64(w->set_sum ^ s);
    }
    for (size_t i = 0; i < n; i++) free(ptr[i]);
    free(ptr);
    free(len);
    return NULL;
}

int main(int argc, char **argv) {
    size_t mib = arg_size(argc, argv, 1, 110);
    size_t messages = arg_size(argc, argv, 2, 20000);
    struct worker w[THREADS];
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++) {
        pthread_mutex_init(&queues[i].mu, NULL);
        pthread_cond_init(&queues[i].not_empty, NULL);
    }
    for (int i = 0; i < THREADS; i++) {
        w[i] = (struct worker){.id = i, .bytes = mib * MIB, .messages = messages,
                               .out = &queues[(i + 1) % THREADS], .in = &queues[i]};
        if (pthread_create(&t[i], NULL, run, &w[i])) { printf("pthread_create failed\n"); return 1; }
    }
    int bad = 0;
    for (int i = 0; i < THREADS; i++) pthread_join(t[i], NULL);
    for (int i = 0; i < THREADS; i++) {
        printf("thread %d: working set %zu MiB sum %016llx, received %zu messages sum %016llx\n", i,
               mib, (unsigned long long)w[i].set_sum, messages, (unsigned long long)w[i].recv_sum);
        bad |= w[i].bad;
    }
    printf("%s\n", bad ? "FAILED" : "all checks passed");
    return bad;
}
