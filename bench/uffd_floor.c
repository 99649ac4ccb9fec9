/* The naive userfaultfd floor: what one handler thread answering every missing-page fault
 * with UFFDIO_ZEROPAGE costs per page, with no runtime around it.
 *
 * usage: uffd_floor [MiB=256]
 *
 * mmaps MiB of anonymous memory, registers it (MISSING mode) with a userfaultfd, starts one
 * thread that reads fault messages and answers each with UFFDIO_ZEROPAGE of that one page,
 * and has the main thread write one byte per page in order. Reports the nanoseconds per page
 * of the touching loop. The write after UFFDIO_ZEROPAGE takes one more (kernel-only)
 * copy-on-write fault, which is part of the naive design being measured.
 *
 * Needs kernel-mode userfaultfd privilege (root or CAP_SYS_PTRACE); without it the program
 * retries with UFFD_USER_MODE_ONLY, which is enough here since only user code faults. */
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>

#include "bench.h"

#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif

static const char *const USAGE = "uffd_floor [MiB=256]";

static int uffd;
static size_t ps;

static void *handler(void *arg) {
    (void)arg;
    for (;;) {
        struct uffd_msg msg;
        ssize_t n = read(uffd, &msg, sizeof msg);
        if (n < 0 && errno == EINTR) continue;
        if (n != (ssize_t)sizeof msg) {
            perror("uffd_floor: read(userfaultfd)");
            exit(3);
        }
        if (msg.event != UFFD_EVENT_PAGEFAULT) continue;
        struct uffdio_zeropage z = {
            .range = {.start = msg.arg.pagefault.address & ~(uint64_t)(ps - 1), .len = ps},
            .mode = 0,
        };
        if (ioctl(uffd, UFFDIO_ZEROPAGE, &z) < 0 && errno != EEXIST) {
            perror("uffd_floor: UFFDIO_ZEROPAGE");
            exit(3);
        }
    }
    return NULL;
}

int main(int argc, char **argv) {
    size_t mib = (size_t)arg_num(argc, argv, 1, 256, USAGE);
    ps = page_size();
    size_t pages = mib * MIB / ps;
    size_t len = pages * ps;

    uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC);
    if (uffd < 0 && errno == EPERM) uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | UFFD_USER_MODE_ONLY);
    if (uffd < 0) {
        perror("uffd_floor: userfaultfd (needs root, CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1)");
        return 3;
    }
    struct uffdio_api api = {.api = UFFD_API, .features = 0};
    if (ioctl(uffd, UFFDIO_API, &api) < 0) {
        perror("uffd_floor: UFFDIO_API");
        return 3;
    }
    unsigned char *heap = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (heap == MAP_FAILED) {
        perror("uffd_floor: mmap");
        return 3;
    }
    struct uffdio_register reg = {
        .range = {.start = (uint64_t)(uintptr_t)heap, .len = len},
        .mode = UFFDIO_REGISTER_MODE_MISSING,
    };
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0) {
        perror("uffd_floor: UFFDIO_REGISTER");
        return 3;
    }
    pthread_t t;
    if (pthread_create(&t, NULL, handler, NULL) != 0) {
        fprintf(stderr, "uffd_floor: pthread_create failed\n");
        return 3;
    }

    first_touch_and_report("uffd_floor", heap, pages, ps, mib);
    /* The handler thread is still blocked in read(); exiting the process ends it. */
    fflush(stdout);
    _exit(0);
}
