/* Probing memory protections from a test program: segv_probe_install() catches SIGSEGV, and
 * segv_probe(p, write) reads (or writes, if `write`) one byte at p and says whether that
 * raised SIGSEGV instead of aborting the program. Exits 1 with a message if the handler
 * cannot be installed. */
#ifndef LEGO_TEST_SEGV_PROBE_H
#define LEGO_TEST_SEGV_PROBE_H

#include <errno.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static sigjmp_buf segv_probe_trap;

static void segv_probe_caught(int sig) {
    (void)sig;
    siglongjmp(segv_probe_trap, 1);
}

static inline void segv_probe_install(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = segv_probe_caught;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGSEGV, &sa, NULL) != 0) {
        printf("sigaction failed: %s\n", strerror(errno));
        exit(1);
    }
}

/* 1 if the access raised SIGSEGV, 0 if it completed. */
static inline int segv_probe(volatile unsigned char *p, int write) {
    if (sigsetjmp(segv_probe_trap, 1) == 0) {
        if (write)
            *p = 1;
        else
            (void)*p;
        return 0;
    }
    return 1;
}

#endif
