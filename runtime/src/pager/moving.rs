//! Taking pages out of the heap with `UFFDIO_MOVE` into an empty area on the staging
//! userfaultfd (the evictor's staging, discard's scratch, the epoch snapshot), page by page
//! checked: where each page went is read back with `mincore` rather than taken from the
//! kernel's account, and a page shared with a forked child is unshared first.
//!
//! Rules: the caller owns the pages it moves (in transit, or given back by the program) and
//! the destination slots. [`move_out`] never allocates or logs: it runs on program threads
//! ([`super::Runtime::discard`]), where a fault on the managed heap could never be served.

use std::sync::atomic::{AtomicU64, Ordering};

use super::events::Kernel;
use crate::PAGE_SIZE;

/// Times a shared page needed its copy-on-write broken before it could be moved.
static SHARED_PAGES_UNSHARED: AtomicU64 = AtomicU64::new(0);
/// Moves tried for one page before it is left resident.
const MOVE_ATTEMPTS_MAX: u32 = 3;

/// Pages that would not move, remembered without allocating (up to `N`).
pub(super) struct Stuck<const N: usize> {
    pages: [usize; N],
    count: usize,
    /// More than `N` pages were stuck.
    pub(super) overflowed: bool,
}

impl<const N: usize> Stuck<N> {
    pub(super) fn new() -> Self {
        Stuck {
            pages: [0; N],
            count: 0,
            overflowed: false,
        }
    }

    fn push(&mut self, page: usize) {
        if self.count < N {
            self.pages[self.count] = page;
            self.count += 1;
        } else {
            self.overflowed = true;
        }
    }

    pub(super) fn pages(&self) -> &[usize] {
        &self.pages[..self.count]
    }
}

/// Moves the present pages of `[src, src + pages * PAGE_SIZE)` to `[dst, ...)` (an empty area
/// on the staging userfaultfd), checking where each page went with `mincore` rather than
/// trusting the kernel's account (Linux 6.18 was seen answering `EEXIST`, with nothing moved,
/// for pages it had moved): after an error it goes on from the first page that is neither in
/// its slot nor a hole. Pages that would not move are added to `stuck`. It neither allocates
/// nor logs (it runs on program threads; see `super::Runtime::discard`).
///
/// # Safety
/// As for [`crate::uffd::Userfault::move_pages`]: the pages of `src` are the caller's to take
/// (in transit, or given back by the program), and `[dst, dst + pages * PAGE_SIZE)` is an
/// empty range on the staging userfaultfd that only the caller uses.
pub(super) unsafe fn move_out<const N: usize>(
    kernel: &Kernel,
    dst: usize,
    src: usize,
    pages: usize,
    stuck: &mut Stuck<N>,
) {
    let at = |k: usize| (dst + k * PAGE_SIZE, src + k * PAGE_SIZE);
    let mut k = 0;
    let mut attempts = 0;
    let mut unshared_at = usize::MAX;
    while k < pages {
        let (d, s) = at(k);
        // SAFETY: the caller's contract covers the whole range, and this is a part of it.
        let Err(partial) = (unsafe {
            kernel
                .staging_uffd
                .move_pages(d, s, (pages - k) * PAGE_SIZE)
        }) else {
            return;
        };
        let errno = partial.errno;
        let from = k;
        while k < pages && {
            let (d, s) = at(k);
            crate::region::page_present(d) || !crate::region::page_present(s)
        } {
            k += 1;
        }
        if k >= pages {
            return;
        }
        attempts = if k == from { attempts + 1 } else { 1 };
        if errno == nix::errno::Errno::EBUSY && unshared_at != k {
            // Shared with a forked child: make it private first. A compare-exchange of a word
            // with itself changes no byte the program could observe, but it is a locked write
            // cycle, so it takes the kernel's copy-on-write path. (An atomic add of zero would
            // not do: LLVM turns an idempotent read-modify-write into a fenced load.)
            unshared_at = k;
            SHARED_PAGES_UNSHARED.fetch_add(1, Ordering::Relaxed);
            // SAFETY: the page is present in the region (just checked) and 8-byte aligned; it
            // is in transit (being evicted or discarded) and owned by this thread, and the
            // exchange leaves its content as it is.
            let word = unsafe { &*(at(k).1 as *const AtomicU64) };
            let v = word.load(Ordering::Relaxed);
            let _ = word.compare_exchange(v, v, Ordering::SeqCst, Ordering::Relaxed);
            continue;
        }
        if attempts >= MOVE_ATTEMPTS_MAX {
            stuck.push(at(k).1);
            k += 1;
            attempts = 0;
        }
    }
}
