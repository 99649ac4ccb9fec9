//! The epoch cut: with the gate closed and `events` held for writing, finds every page that
//! changed since the last epoch and takes it: resident ones are moved into the snapshot area
//! (round after round, until a scan finds no new writes), evicted ones are held (`LOGHOLD`)
//! and listed with their CRC, absent ones become zero records. Steps 1-3 of the module doc of
//! `epoch/mod.rs`; the reasons are in `docs/DESIGN.md`, "Epochs".
//!
//! Rules: the gate is closed (no handler installs, the evictor is idle) and `events` is held
//! for writing (no discard runs) from the first scan until the snapshot is complete; events
//! pending at the start are applied first. Written bits the scans consume become log-dirty
//! pages in the table before the gate opens. A snapshot slot is never reused within a cut
//! (slot `p` is page `p`). The cut never waits for a handler.

use std::sync::Arc;

use userfaultfd::EventBuffer;

use super::super::events::pump_events_locked;
use super::super::gate::Pass;
use super::super::moving::{move_out, Stuck};
use super::super::{Shared, EVENTS_PER_READ_MAX, STATS};
use super::snapshot::page_runs;
use crate::cache::{PageSet, PageState, LOGHOLD, PINNED, SNAP};
use crate::log::EpochOrigin;
use crate::stats::Counter;
use crate::PAGE_SIZE;

/// Rounds of scan-and-move after which the cut stops chasing writers (each round moves every
/// page written during the previous one; a writer stops at its first moved page, so in
/// practice two or three rounds suffice).
const CUT_ROUNDS_MAX: usize = 64;

/// What one cut took: the pages of the epoch, by where their content is.
#[derive(Default)]
pub(super) struct Cut {
    /// Resident pages moved out into their snapshot slots (page `p` goes to slot `p`).
    pub(super) moved: Vec<usize>,
    /// Resident pages that would not move, copied while the program ran (shared with a forked
    /// child that would not unshare; rare).
    pub(super) copied: Vec<(usize, Box<[u8]>)>,
    /// Evicted pages to read back from the store: (page, CRC32C of the store's copy).
    pub(super) evicted: Vec<(usize, u32, u32)>,
    /// Pages that read as zeros now.
    pub(super) zeros: Vec<usize>,
    /// Pages changed since the last epoch whose content is lost (poisoned): an epoch without
    /// them would not be a heap that existed, so none is committed while there are any.
    pub(super) lost: Vec<usize>,
}

impl Cut {
    pub(super) fn pages(&self) -> usize {
        self.moved.len() + self.copied.len() + self.evicted.len() + self.zeros.len()
    }

    /// Whether the cut makes an epoch: it holds pages, or the program asked for a checkpoint
    /// (committed even when empty, so that `--checkpoint` never picks an older state).
    pub(super) fn wants_epoch(&self, origin: EpochOrigin) -> bool {
        self.pages() > 0 || origin.is_program()
    }

    /// Every page of the cut, whatever its source.
    pub(super) fn page_indexes(&self) -> impl Iterator<Item = usize> + '_ {
        self.moved
            .iter()
            .copied()
            .chain(self.copied.iter().map(|(p, _)| *p))
            .chain(self.evicted.iter().map(|(p, _, _)| *p))
            .chain(self.zeros.iter().copied())
    }
}

/// Steps 1-3 of the module doc. Returns the cut, and a pass through the gate that the caller
/// holds until every moved page is back. `on_frozen` gets the cut as soon as its snapshot is
/// complete, before the gate opens.
pub(super) fn take_cut<'a>(
    sh: &'a Shared,
    on_frozen: impl FnOnce(Arc<Cut>),
) -> (Arc<Cut>, Pass<'a>) {
    let durable = sh.durable.as_ref().expect("a cut runs only with a log");
    sh.gate.close();
    let mut cut = Cut::default();
    let frozen;
    {
        let _w = sh.kernel.applying_events();
        let mut buf = EventBuffer::new(EVENTS_PER_READ_MAX);
        let mut faults = Vec::new();
        // Discards the program made before the cut are applied first.
        pump_events_locked(sh, &mut buf, &mut faults);
        let high = sh.cache.lock().high();
        let mut taken = durable.taken.lock().unwrap_or_else(|e| e.into_inner());
        chase_writers(sh, high, &mut cut, &mut taken, &mut buf, &mut faults);
        take_the_rest(sh, high, &mut cut, &taken);
        taken.clear();
        // The snapshot is complete: it can be written while the pages go back.
        frozen = Arc::new(std::mem::take(&mut cut));
        on_frozen(Arc::clone(&frozen));
        if !faults.is_empty() {
            sh.kernel.defer(faults);
        }
    }
    // Faults are served again (a thread that touches a moved page gets it back at once); the
    // flusher stays inside the gate until every moved page is back, so that a fork never
    // copies a heap with pages missing.
    let pass = sh.gate.open_and_enter();
    (frozen, pass)
}

/// Steps 1-2: round after round, scans the used part of the region (`high` pages) for written
/// pages, marks them dirty, and moves every resident dirty page not taken yet into its
/// snapshot slot, until a round finds none (or [`CUT_ROUNDS_MAX`] rounds: the rest is
/// copied). `taken` holds the pages this cut took (so far).
fn chase_writers(
    sh: &Shared,
    high: usize,
    cut: &mut Cut,
    taken: &mut PageSet,
    buf: &mut EventBuffer,
    faults: &mut Vec<usize>,
) {
    let k = &sh.kernel;
    for round in 0.. {
        // Written pages become dirty in the table (and are protected again).
        let mut written: Vec<(usize, usize)> = Vec::new();
        if let Err(e) = k
            .scanner
            .take_written(k.region.base, sh.addr_of(high), |a, b| written.push((a, b)))
        {
            log::warn!("PAGEMAP_SCAN failed during an epoch cut, logging every resident page: {e}");
            written.push((k.region.base, sh.addr_of(high)));
        }
        let mut todo: Vec<usize> = Vec::new();
        {
            let mut t = sh.cache.lock();
            for &(a, b) in &written {
                for p in sh.page_of(a)..sh.page_of(b).min(high) {
                    // Only a page in the region can have been written: the scan also reports
                    // pages that are not there (evicted, or never touched) as not protected.
                    if t.state(p) == PageState::Resident {
                        t.set_log_dirty(p);
                    }
                }
            }
            // The dirty set, not the whole used table: the cut costs what changed.
            todo.extend(
                t.log_dirty_pages()
                    .take_while(|&p| p < high)
                    .filter(|&p| !taken.contains(p) && t.state(p) == PageState::Resident),
            );
        }
        if todo.is_empty() {
            return;
        }
        if round >= CUT_ROUNDS_MAX {
            log::warn!(
                "an epoch cut gave up chasing writers after {CUT_ROUNDS_MAX} rounds; {} pages are copied while they may change",
                todo.len()
            );
            for p in todo {
                cut.copied.push((p, copy_page(sh, p)));
                taken.insert(p);
            }
            return;
        }
        for &p in &todo {
            taken.insert(p);
        }
        move_pages(sh, &todo, cut, buf, faults);
    }
}

/// Step 3's bookkeeping: marks the moved pages `SNAP`, takes the moved and copied pages out
/// of the dirty set, and classifies the other dirty pages (below `high`, not `taken`):
/// evicted ones are held and listed with their CRC, absent ones become zero records,
/// poisoned ones are lost. (A page taken that turned out to be gone from the region is a zero
/// record of this epoch and stays dirty, as it always did.)
fn take_the_rest(sh: &Shared, high: usize, cut: &mut Cut, taken: &PageSet) {
    let mut t = sh.cache.lock();
    // Moved pages are out of the region until put back (by a fault or by the flusher after
    // the cut).
    for &p in &cut.moved {
        t.clear_log_dirty(p);
        t.set_flag(p, SNAP, true);
    }
    for (p, _) in &cut.copied {
        t.clear_log_dirty(*p);
    }
    let rest: Vec<usize> = t
        .log_dirty_pages()
        .take_while(|&p| p < high)
        .filter(|&p| !taken.contains(p))
        .collect();
    for p in rest {
        match t.state(p) {
            PageState::Evicted => {
                t.set_flag(p, LOGHOLD, true);
                cut.evicted.push((p, t.crc(p), t.version(p)));
            }
            PageState::Absent => cut.zeros.push(p),
            // Changed, then lost: no epoch can hold it; the flag stays until the program
            // frees the page (it then becomes a zero record).
            PageState::Poisoned => {
                cut.lost.push(p);
                continue;
            }
            // Nothing is in transit while the gate is closed; a page that is, keeps its flag
            // for the next epoch.
            _ => continue,
        }
        t.clear_log_dirty(p);
    }
}

/// Moves the resident pages `todo` (sorted) out into their snapshot slots. Pages that would
/// not move are copied instead; pages that turn out to be gone read as zeros.
fn move_pages(
    sh: &Shared,
    todo: &[usize],
    cut: &mut Cut,
    buf: &mut userfaultfd::EventBuffer,
    faults: &mut Vec<usize>,
) {
    let snapshot = sh
        .durable
        .as_ref()
        .expect("a cut runs only with a log")
        .snapshot
        .area();
    for (first, n) in page_runs(todo) {
        let dst = snapshot.base + first * PAGE_SIZE;
        assert!(
            dst + n * PAGE_SIZE <= snapshot.end(),
            "the snapshot area covers the heap"
        );
        let mut stuck = Stuck::<0>::new();
        // SAFETY: the gate is closed and `events` held for writing, so no handler installs and
        // no discard runs; a thread that touches a moved page waits for the cut. Snapshot
        // slots are never reused within a cut (slot = page) and were emptied after the last.
        unsafe { move_out(&sh.kernel, dst, sh.addr_of(first), n, &mut stuck) };
        // Where the pages went, read back for the whole run at once.
        let mut in_slot = vec![false; n];
        crate::region::for_each_present_page(dst, n * PAGE_SIZE, |k| in_slot[k] = true);
        for (k, p) in (first..first + n).enumerate() {
            if in_slot[k] {
                cut.moved.push(p);
                continue;
            }
            let d = dst + k * PAGE_SIZE;
            let src = sh.addr_of(p);
            if crate::region::page_present(src) {
                // An event may be waiting to be read (a discard in flight): read it, try again.
                pump_events_locked(sh, buf, faults);
                let mut one = Stuck::<0>::new();
                // SAFETY: as for the run above; this page's slot is still empty.
                unsafe { move_out(&sh.kernel, d, src, 1, &mut one) };
            }
            if crate::region::page_present(d) {
                cut.moved.push(p);
            } else if crate::region::page_present(src) {
                // It would not move (shared with a forked child that would not unshare).
                cut.copied.push((p, copy_page(sh, p)));
                STATS.add(Counter::EpochPagesCopied, 1);
            } else {
                // Gone from the region (the kernel reclaimed a MADV_FREE page): zeros.
                cut.zeros.push(p);
            }
        }
    }
}

fn copy_page(sh: &Shared, page: usize) -> Box<[u8]> {
    let mut b = vec![0u8; PAGE_SIZE].into_boxed_slice();
    if sh.cache.lock().has_flag(page, PINNED) {
        // Maybe `PROT_NONE` (a served mapping's guard): read past the protection. The page
        // is present (the caller checked), so this never faults into the handlers.
        match crate::region::read_own_memory(sh.addr_of(page), &mut b) {
            Ok(()) => return b,
            Err(e) => log::warn!(
                "an epoch cut could not read the protected page at {:#x} through /proc/self/mem \
                 ({e}); reading it directly",
                sh.addr_of(page)
            ),
        }
    }
    // SAFETY: the page is present in the region (a resident page of the heap), which stays
    // mapped; reading it races only with the program's own writes, which is the documented
    // weakness of this fallback.
    unsafe {
        std::ptr::copy_nonoverlapping(sh.addr_of(page) as *const u8, b.as_mut_ptr(), PAGE_SIZE)
    };
    b
}
