//! The epoch snapshot: an area as large as the heap (on the staging userfaultfd) where a cut
//! moves the dirty resident pages (page `p` to slot `p`), and their way back: a fault on a
//! `SNAP` page copies its run back at once (`fault.rs` calls [`install_from_snapshot`]), and
//! the flusher copies back the rest after the cut ([`copy_back`]), through the same install
//! path, so a discard meanwhile wins. The log writer thread reads the slots meanwhile
//! ([`Snapshot::page`]).
//!
//! Rules: slots are only read between the cut and the end of the epoch, and dropped after it
//! ([`Snapshot::drop_slots`]) once no page is in the snapshot any more: a handler that claimed
//! a run of snapshot pages may copy it later than the flusher's copy-back and the log writer
//! finish, and a copy from an emptied slot faults on the staging userfaultfd, which nobody
//! serves (the handler, and every thread waiting for its pages, would wait for ever). A page
//! goes back write-protected (the log has its content, so it is clean) and without taking new
//! room in the cache (it is still counted resident).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::super::install::{finish_run, install_pages, Outcome, Source};
use super::super::{PagerError, Shared, STATS};
use crate::cache::{PageState, Table, SNAP};
use crate::region::Region;
use crate::stats::Counter;
use crate::uffd::Userfault;
use crate::PAGE_SIZE;

/// Snapshot pages the flusher copies back at once after a cut.
const COPY_BACK_PAGES: usize = 256;
/// How long the flusher waits at a time, before it empties the slots, for a handler that is
/// copying pages back from them, in milliseconds.
const COPY_BACK_WAIT_MS: u64 = 2;

/// The snapshot area.
pub(in super::super) struct Snapshot {
    area: Region,
}

impl Snapshot {
    /// Reserves a snapshot area for a heap of `len` bytes and registers it on `staging_uffd`.
    pub(in super::super) fn new(
        len: usize,
        staging_uffd: &Userfault,
    ) -> Result<Snapshot, PagerError> {
        let area = Region::reserve(len, None)?;
        staging_uffd.register(area.base, area.len, false)?;
        Ok(Snapshot { area })
    }

    pub(super) fn area(&self) -> Region {
        self.area
    }

    /// The content of slot `slot`, which holds a page moved there by the current cut.
    pub(super) fn page(&self, slot: usize) -> &[u8] {
        assert!((slot + 1) * PAGE_SIZE <= self.area.len);
        // SAFETY: the slot lies inside the snapshot mapping and holds a page moved there by
        // this cut (only moved slots are listed); only the flusher and the log writer touch
        // the snapshot area, and both only read it until the epoch is over.
        unsafe {
            std::slice::from_raw_parts((self.area.base + slot * PAGE_SIZE) as *const u8, PAGE_SIZE)
        }
    }

    /// At the end of an epoch: waits until every page the cut moved (`moved`, sorted) is back
    /// in the heap ([`wait_all_back`]), then empties their slots.
    pub(super) fn drop_slots(&self, sh: &Shared, moved: &[usize]) {
        wait_all_back(sh, moved);
        for (first, n) in page_runs(moved) {
            // SAFETY: the snapshot area is the flusher's; these slots' pages are back in the
            // heap and written to the log (or the epoch failed), so nobody reads them any more.
            unsafe { crate::region::drop_pages(self.area.base + first * PAGE_SIZE, n * PAGE_SIZE) };
        }
    }
}

/// How long a handler waits after it claimed snapshot pages, before it copies them back, in
/// milliseconds (`LEGO_FAULT_INJECT=stall:snapshot:MS`, a testing hook; 0: no wait).
static HANDLER_STALL_MS: AtomicU64 = AtomicU64::new(0);

/// From now on, a handler that claimed snapshot pages waits `ms` milliseconds before it copies
/// them back (testing hook: it widens the window in which the epoch ends meanwhile).
pub(in super::super) fn stall_copies_for(ms: u64) {
    HANDLER_STALL_MS.store(ms, Ordering::Relaxed);
}

/// Claims `[first, first+n)`, pages in the epoch snapshot, for copying back.
pub(in super::super) fn claim_snapshot(t: &mut Table, first: usize, n: usize) {
    for p in first..first + n {
        debug_assert_eq!(snapshot_run_len(t, p, 1), 1);
        t.set_state(p, PageState::Filling);
    }
}

/// A fault handler's copy of the claimed run `[first, first+n)` back from the epoch snapshot:
/// [`install_from_snapshot`], after the stall a test asked for.
pub(in super::super) fn handler_copy_back(sh: &Shared, first: usize, n: usize) {
    let stall = HANDLER_STALL_MS.load(Ordering::Relaxed);
    if stall > 0 {
        std::thread::sleep(Duration::from_millis(stall));
    }
    install_from_snapshot(sh, first, n);
}

/// Copies the claimed run `[first, first+n)` back from the epoch snapshot (page `p` is in slot
/// `p`), write-protected: the log has its content, so it is clean. Wakes its waiters.
pub(in super::super) fn install_from_snapshot(sh: &Shared, first: usize, n: usize) {
    let snapshot = sh
        .durable
        .as_ref()
        .expect("pages are in a snapshot only when the heap has a log")
        .snapshot
        .area;
    let mut out = vec![Outcome::Pending; n];
    assert!((first + n) * PAGE_SIZE <= snapshot.len);
    // SAFETY: slots `[first, first + n)` of the snapshot area hold the pages the cut moved
    // there (page `p` in slot `p`; the snapshot is only read until the epoch is over); the
    // run was claimed for this thread by `claim_snapshot`.
    unsafe {
        install_pages(
            sh,
            first,
            (snapshot.base + first * PAGE_SIZE) as *const u8,
            true,
            &mut out,
        );
    }
    finish_run(
        sh,
        first,
        &out,
        Source::Snapshot,
        "putting it back after an epoch cut failed",
    );
}

/// Length of the run of pages from `first` (at most `max`) that are in the epoch snapshot.
pub(in super::super) fn snapshot_run_len(t: &Table, first: usize, max: usize) -> usize {
    (first..(first + max).min(t.pages()))
        .take_while(|&p| t.state(p) == PageState::Resident && t.has_flag(p, SNAP))
        .count()
}

/// Step 4: every moved page that no fault has put back yet goes back now, a run at a time
/// (`install_from_snapshot`: write-protected, skipping pages discarded meanwhile).
pub(in super::super) fn copy_back(sh: &Shared, moved: &[usize]) {
    for (first, n) in page_runs(moved) {
        let mut p = first;
        while p < first + n {
            let run = {
                let mut t = sh.cache.lock();
                let end = (p + COPY_BACK_PAGES).min(first + n);
                let start = (p..end)
                    .find(|&q| snapshot_run_len(&t, q, 1) == 1)
                    .unwrap_or(end);
                let len = snapshot_run_len(&t, start, end - start);
                claim_snapshot(&mut t, start, len);
                p = start + len;
                (start, len)
            };
            if run.1 > 0 {
                install_from_snapshot(sh, run.0, run.1);
            }
        }
    }
}

/// Until no page of `moved` is in the snapshot: copies back those still there (`Resident`,
/// `SNAP`) and waits for the handlers copying back the others (`Filling`, still `SNAP` until
/// their `finish_run`), [`COPY_BACK_WAIT_MS`] at a time.
fn wait_all_back(sh: &Shared, moved: &[usize]) {
    loop {
        copy_back(sh, moved);
        let t = sh.cache.lock();
        if !moved.iter().any(|&p| t.has_flag(p, SNAP)) {
            return;
        }
        STATS.add(Counter::EpochSnapshotWaits, 1);
        drop(
            sh.cache
                .wait_for_room(t, Duration::from_millis(COPY_BACK_WAIT_MS)),
        );
    }
}

/// Runs of consecutive pages in a sorted list: `(first, count)`.
pub(super) fn page_runs(pages: &[usize]) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let first = *pages.get(i)?;
        let n = pages[i..]
            .iter()
            .enumerate()
            .take_while(|&(k, &p)| p == first + k)
            .count();
        i += n;
        Some((first, n))
    })
}
