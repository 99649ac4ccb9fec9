//! The install protocol: copying the content of a claimed run into the heap
//! (`UFFDIO_COPY`), recording what became of each page in the table and waking its waiters,
//! and poisoning a page whose content cannot be served.
//!
//! Rules (`docs/DESIGN.md`, "Locking rules"): every copy into the heap happens with the
//! `events` lock held for reading, after re-checking `REMOVED` under it, so a program's
//! `madvise` is never undone; when the kernel refuses a copy with `EAGAIN` (an event waits),
//! the lock is dropped, the events are read ([`pump_for_install`]) and the copy retried. Only
//! the owner of a claimed run (the thread that put it in transit) installs it and settles it
//! with [`finish_run`]; a page that cannot go in is poisoned, never left to read as zeros.
//! The cache lock is never held across an ioctl.

use super::events::{pump_for_install, FAULT_ERRORS};
use super::{publish_resident, Shared, STATS};
use crate::cache::{PageState, IMAGE, REFERENCED, REMOVED, SNAP};
use crate::logging::RateLimit;
use crate::stats::Counter;
use crate::uffd::UffdError;
use crate::PAGE_SIZE;

/// Messages about poisoned pages: at most this many a second reach stderr.
static POISON_MESSAGES: RateLimit = RateLimit::new(8);
/// Attempts at poisoning a page while events keep the address space changing.
const POISON_RETRIES_MAX: u32 = 1000;

/// What became of one page of a claimed run.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    Pending,
    Installed,
    /// The program discarded it meanwhile: it reads as zeros from now on.
    Removed,
    /// The kernel refused it for good, or its content could not be had: it is poisoned.
    Failed,
    /// Not to be installed (a read-ahead page whose fetch failed in a way that may pass): it
    /// goes back where it came from.
    Skipped,
}

/// Where the content of a claimed run comes from, for [`finish_run`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    /// Zeros: fresh or discarded pages (`Filling`).
    Zeros,
    /// The store or the restore image (`Fetching`).
    Store,
    /// An epoch's snapshot slots (`Filling`, from `Resident` + `SNAP`).
    Snapshot,
    /// The evictor's staging slots, after a failed write-back (`Evicting`).
    WriteBack,
}

/// Installs the claimed pages `[first, first+n)` whose `out` entry is `Pending`, page `i` copied
/// from `src + i * PAGE_SIZE`, write-protected (clean) if `wp`, waking their waiters. Pages the
/// program removed meanwhile are skipped. The `events` lock is held for reading around each
/// `UFFDIO_COPY`; when the kernel answers `EAGAIN` (an event is waiting to be read) it is
/// released, the events are read, and the copy is retried.
///
/// # Safety
/// `src` must be readable for `out.len()` pages and page-aligned, and must not change while
/// this runs; pages `[first, first + out.len())` must lie in the region and be owned by the
/// caller (in a transit state it set, so that nothing else installs them).
pub(super) unsafe fn install_pages(
    sh: &Shared,
    first: usize,
    src: *const u8,
    wp: bool,
    out: &mut [Outcome],
) {
    let n = out.len();
    // After the kernel refused a run because it spans two VMAs (a served mapping's
    // `mprotect` split the region there), the rest goes in one page at a time.
    let mut one_at_a_time = false;
    'retry: loop {
        let guard = sh.kernel.installing();
        {
            let t = sh.cache.lock();
            for (i, o) in out.iter_mut().enumerate() {
                if *o == Outcome::Pending && t.has_flag(first + i, REMOVED) {
                    *o = Outcome::Removed;
                }
            }
        }
        let mut i = 0;
        while i < n {
            if out[i] != Outcome::Pending {
                i += 1;
                continue;
            }
            let mut end = (i..n).find(|&j| out[j] != Outcome::Pending).unwrap_or(n);
            if one_at_a_time {
                end = i + 1;
            }
            // SAFETY: the caller guarantees `src` is readable for `n` pages and page-aligned,
            // and that the destination pages lie in the registered region and are its own.
            let res = unsafe {
                sh.kernel.uffd.copy(
                    sh.addr_of(first + i),
                    src.add(i * PAGE_SIZE),
                    (end - i) * PAGE_SIZE,
                    wp,
                    true,
                )
            };
            match res {
                Ok(()) => {
                    out[i..end].iter_mut().for_each(|o| *o = Outcome::Installed);
                    i = end;
                }
                Err(partial) => {
                    let d = partial.done / PAGE_SIZE;
                    out[i..i + d]
                        .iter_mut()
                        .for_each(|o| *o = Outcome::Installed);
                    i += d;
                    if partial.errno == nix::errno::Errno::EAGAIN {
                        drop(guard);
                        pump_for_install(sh);
                        continue 'retry;
                    }
                    if partial.errno == nix::errno::Errno::EEXIST {
                        // Present already: it was never missing for long; wake its waiters.
                        let _ = sh.kernel.uffd.wake(sh.addr_of(first + i), PAGE_SIZE);
                        out[i] = Outcome::Installed;
                        i += 1;
                        continue;
                    }
                    if end - i > 1
                        && matches!(
                            partial.errno,
                            nix::errno::Errno::ENOENT | nix::errno::Errno::EINVAL
                        )
                    {
                        one_at_a_time = true;
                        continue;
                    }
                    if FAULT_ERRORS.allow() {
                        log::error!(
                            "installing the page at {:#x} failed ({})",
                            sh.addr_of(first + i),
                            partial.errno
                        );
                    }
                    out[i] = Outcome::Failed;
                    i += 1;
                }
            }
        }
        return;
    }
}

/// Records the outcome of a claimed run in the page table and wakes every waiter of the run
/// (those of skipped pages fault again and find the page's new state).
pub(super) fn finish_run(
    sh: &Shared,
    first: usize,
    out: &[Outcome],
    from: Source,
    why_failed: &str,
) -> u64 {
    let mut installed = 0;
    let mut failed: Vec<usize> = Vec::new();
    {
        let mut t = sh.cache.lock();
        for (i, o) in out.iter().enumerate() {
            let p = first + i;
            let removed = t.has_flag(p, REMOVED);
            t.set_flag(p, REMOVED | SNAP, false);
            if removed || matches!(o, Outcome::Removed | Outcome::Installed) {
                // Installed: the region has the content now (and the store gets it when the
                // page is evicted); removed: nobody needs the image's copy any more.
                t.set_flag(p, IMAGE, false);
            }
            match o {
                _ if removed => {
                    sh.drop_store_copy(&mut t, p);
                    t.set_state(p, PageState::Absent);
                }
                Outcome::Removed => {
                    sh.drop_store_copy(&mut t, p);
                    t.set_state(p, PageState::Absent);
                }
                Outcome::Installed => {
                    if from == Source::Zeros {
                        t.forget_stored(p);
                    }
                    t.set_state(p, PageState::Resident);
                    t.set_flag(p, REFERENCED, true);
                    installed += 1;
                }
                Outcome::Failed => {
                    t.set_state(p, PageState::Poisoned);
                    failed.push(p);
                }
                // Not installed: back where it came from.
                Outcome::Pending | Outcome::Skipped => match from {
                    Source::Store => t.set_state(p, PageState::Evicted),
                    Source::Zeros => t.set_state(p, PageState::Absent),
                    Source::Snapshot => {
                        t.set_state(p, PageState::Resident);
                        t.set_flag(p, SNAP, true);
                    }
                    // The install path settles every page it is given; one it did not is not
                    // in the region, and its content must not read as zeros.
                    Source::WriteBack => {
                        t.set_state(p, PageState::Poisoned);
                        failed.push(p);
                    }
                },
            }
        }
        publish_resident(t.resident());
    }
    sh.cache.room_freed();
    let _ = sh
        .kernel
        .uffd
        .wake(sh.addr_of(first), out.len() * PAGE_SIZE);
    for p in failed {
        poison(sh, p, why_failed);
    }
    installed
}

/// Poisons `page` so that the faulting thread gets `SIGBUS`, and says so on stderr.
pub(super) fn poison(sh: &Shared, page: usize, why: &str) {
    let addr = sh.addr_of(page);
    STATS.add(Counter::PagesPoisoned, 1);
    if POISON_MESSAGES.allow() {
        crate::logging::write_stderr_line(&format!(
            "lego: SIGBUS: the heap page at {addr:#x} cannot be served because {why}"
        ));
    }
    let mut unprotected = false;
    for _ in 0..POISON_RETRIES_MAX {
        match sh.kernel.uffd.poison(addr, PAGE_SIZE) {
            Ok(()) => return,
            Err(UffdError::Ioctl {
                errno: nix::errno::Errno::EAGAIN,
                ..
            }) => pump_for_install(sh),
            Err(UffdError::Ioctl {
                errno: nix::errno::Errno::EEXIST,
                ..
            }) if !unprotected && !crate::region::page_present(addr) => {
                // Not present, yet not empty either: an epoch's PAGEMAP_SCAN left a
                // write-protect marker on the missing page, which POISON will not replace
                // (it would answer EEXIST forever and the thread would fault again and
                // again). Unprotecting the page removes the marker.
                unprotected = true;
                if let Err(e) = sh.kernel.uffd.write_protect(addr, PAGE_SIZE, false) {
                    log::debug!("removing the write-protect marker at {addr:#x}: {e}");
                }
            }
            Err(e) => {
                // EEXIST: already poisoned (or present); the waiters must still be woken.
                log::debug!("poisoning {addr:#x}: {e}");
                break;
            }
        }
    }
    let _ = sh.kernel.uffd.wake(addr, PAGE_SIZE);
}
