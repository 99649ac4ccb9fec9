//! Pages the program gave back: [`Runtime::discard`] (the allocator's way of freeing runs,
//! instead of `madvise`) and [`forget_range`], which records in the table that a range now
//! reads as zeros (for a discard, and for the `REMOVE`, `UNMAP` and `REMAP` events).
//!
//! Rules: both run with the `events` lock held for writing, so no install is in flight and
//! every later one sees the pages as removed. A page in transit is only marked `REMOVED`
//! (its owner settles it); any other becomes `Absent` and its store copy is dropped, unless
//! an epoch being written still reads it (`LOGHOLD`). Both may run on a program thread that
//! holds the runtime's locks: they must never allocate, log or touch thread-locals (glibc
//! keeps the thread's TLS vector in the managed heap, and a fault there could never be
//! served), so everything they collect goes into fixed-size arrays.

use std::sync::{Mutex, MutexGuard};

use super::moving::{self, Stuck};
use super::{publish_resident, Runtime, Shared, STATS};
use crate::cache::{PageState, IMAGE, LOGHOLD, REMOVED, SNAP, STORED};
use crate::region::{self, Region};
use crate::uffd::Userfault;
use crate::PAGE_SIZE;

/// Store runs [`forget_range`] collects before it drops them.
const FORGET_RUNS_MAX: usize = 64;
/// Pages [`Runtime::discard`] remembers that would not move; more are given back as a range.
const DISCARD_STUCK_MAX: usize = 64;
/// Most pages [`Runtime::discard`] moves out at once (the size of its scratch area).
const DISCARD_CHUNK_PAGES: usize = 1024;

/// Where [`Runtime::discard`] moves the pages it takes out (on the staging userfaultfd),
/// behind its mutex.
pub(super) struct Scratch {
    area: Mutex<Region>,
}

impl Scratch {
    /// Reserves the scratch area and registers it on `staging_uffd`.
    pub(super) fn new(staging_uffd: &Userfault) -> Result<Scratch, super::PagerError> {
        let area = Region::reserve(DISCARD_CHUNK_PAGES * PAGE_SIZE, None)?;
        staging_uffd.register(area.base, area.len, false)?;
        Ok(Scratch {
            area: Mutex::new(area),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Region> {
        self.area.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Runtime {
    /// Gives the pages of `[addr, addr+len)` (page-aligned, in the region) back: afterwards
    /// they read as zeros, their store copies are dropped, and no install can bring old content
    /// back. The allocator calls this for freed runs instead of `madvise(MADV_DONTNEED)`,
    /// which would make the caller wait for a fault handler to read a `REMOVE` event: here the
    /// calling thread takes the pages out itself with `UFFDIO_MOVE` into a scratch area that
    /// it then drops.
    ///
    /// It runs on the program's thread with the runtime's locks held, so nothing in it may
    /// allocate, log or touch thread-locals (see the module doc).
    pub fn discard(&self, addr: usize, len: usize) {
        let sh = &self.shared;
        let region = &sh.kernel.region;
        let start = addr.max(region.base);
        let end = (addr + len).min(region.end());
        if start >= end {
            return;
        }
        let mut stuck = Stuck::<DISCARD_STUCK_MAX>::new();
        {
            // Under the write lock no install is in flight, and every later one sees the
            // pages as removed (or, for pages that turn `Absent`, finds them missing and
            // zero-fills them, which is what they read as from now on).
            let _w = sh.kernel.applying_events();
            forget_range(sh, start, end);
            let scratch = sh.discard.lock();
            let mut at = start;
            while at < end {
                let pages = ((end - at) / PAGE_SIZE).min(DISCARD_CHUNK_PAGES);
                // SAFETY: the program gave these pages back (the allocator freed them), the
                // write lock keeps every install out, and the scratch area is behind its
                // mutex, emptied after each chunk.
                unsafe {
                    moving::move_out(&sh.kernel, scratch.base, at, pages, &mut stuck);
                    region::drop_pages(scratch.base, pages * PAGE_SIZE);
                }
                at += pages * PAGE_SIZE;
            }
        }
        // Pages the kernel would not move (shared with a forked child): the classic way, now
        // that the write lock is released and a handler can read the `REMOVE` event.
        if stuck.overflowed {
            // SAFETY: the program gave the range back; it reads as zeros from now on.
            unsafe { region::drop_pages(start, end - start) };
        } else {
            for &page in stuck.pages() {
                // SAFETY: as above, for one page of the range.
                unsafe { region::drop_pages(page, PAGE_SIZE) };
            }
        }
    }
}

/// Applies a `REMOVE`/`UNMAP`/`REMAP`-away of `[start, end)`, or a discard: the program no
/// longer has those pages' content. Called with the `events` lock held for writing.
///
/// It may run on a program thread ([`Runtime::discard`]) holding the runtime's locks, so it
/// must not allocate, log or touch thread-locals (see the module doc). The table is therefore
/// updated a chunk at a time, with the store's copies of each chunk dropped in between from a
/// fixed-size list.
pub(super) fn forget_range(sh: &Shared, start: usize, end: usize) {
    let region = &sh.kernel.region;
    let start = start.max(region.base);
    let end = end.min(region.end());
    if start >= end {
        return;
    }
    let last = sh.page_of(end - 1);
    let mut p = sh.page_of(start);
    let mut count = 0;
    while p <= last {
        let mut runs = Runs::<FORGET_RUNS_MAX>::new();
        {
            let mut t = sh.cache.lock();
            while p <= last && !runs.is_full() {
                let state = t.state(p);
                if state != PageState::Absent {
                    // The log records the page as zeros in the next epoch.
                    t.set_log_dirty(p);
                }
                match state {
                    PageState::Filling | PageState::Fetching | PageState::Evicting => {
                        t.set_flag(p, REMOVED, true);
                    }
                    _ => {
                        // An epoch being written still reads a held page's store copy.
                        if t.has_flag(p, STORED) && !t.has_flag(p, LOGHOLD) {
                            runs.push(p as u64);
                        }
                        t.forget_stored(p);
                        t.set_flag(p, IMAGE | SNAP, false);
                        t.set_state(p, PageState::Absent);
                    }
                }
                p += 1;
            }
            publish_resident(t.resident());
        }
        for &(first, pages) in runs.as_slice() {
            count += pages;
            // To the store from the `lego-discard` thread (never from here: this may be the
            // program's thread, under the `events` write lock).
            sh.discards.push(first, pages);
        }
    }
    STATS.add(crate::stats::Counter::PagesDiscarded, count);
    sh.cache.room_freed();
}

/// `(first page, count)` runs of pages in a fixed array: filled where nothing may allocate
/// (see [`forget_range`]).
pub(super) struct Runs<const N: usize> {
    runs: [(u64, u64); N],
    len: usize,
}

impl<const N: usize> Runs<N> {
    pub(super) fn new() -> Self {
        Runs {
            runs: [(0, 0); N],
            len: 0,
        }
    }

    /// True when a page that does not extend the last run would not fit.
    pub(super) fn is_full(&self) -> bool {
        self.len == N
    }

    /// Appends `page`, extending the last run when adjacent. The caller checks
    /// [`Runs::is_full`] first.
    pub(super) fn push(&mut self, page: u64) {
        if let Some(last) = self.runs[..self.len].last_mut() {
            if last.0 + last.1 == page {
                last.1 += 1;
                return;
            }
        }
        assert!(self.len < N, "a run list of {N} runs overflowed");
        self.runs[self.len] = (page, 1);
        self.len += 1;
    }

    pub(super) fn as_slice(&self) -> &[(u64, u64)] {
        &self.runs[..self.len]
    }
}
