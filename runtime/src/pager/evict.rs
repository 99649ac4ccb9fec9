//! The evictor: keeps the resident set under the cache size by moving batches of pages out of
//! the region, writing back the dirty ones, and dropping the clean ones.
//!
//! One batch: choose victims (clock) and mark them `Evicting`; find which were written since
//! their last write-back (`PAGEMAP_SCAN`, which also re-protects them); move them atomically
//! into the staging area (`UFFDIO_MOVE`); checksum each; write the dirty ones to the store in
//! one batch; mark them `Evicted` (or `Absent` for all-zero pages) and wake any thread that
//! faulted on them meanwhile. If the write-back fails, the pages are copied back into the
//! region: the cache overflows, the program never loses data.
//!
//! Rules: the evictor works inside the gate, one batch at a time; the staging area is its
//! alone. Its scan consumes the victims' written bits, so it turns them into log-dirty pages
//! in the table before it leaves the gate (the epoch cut would miss them otherwise). It
//! never picks a page an epoch holds (`LOGHOLD`) or has in its snapshot (`SNAP`). This is
//! where the pager writes to the store (`PageStore::store`, in [`write_back`]) and drops
//! copies of pages that became absent (`PageStore::discard`, in [`record`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::discard::Runs;
use super::install::{finish_run, install_pages, Outcome, Source};
use super::moving::{move_out, Stuck};
use super::{publish_resident, sleep_ms, Shared, EVICT_BATCH_PAGES_MAX, STATS};
use crate::cache::{PageState, MAPPED, REMOVED, STORED};
use crate::log::Located;
use crate::logging::RateLimit;
use crate::region::Region;
use crate::stats::Counter;
use crate::store::PageWrite;
use crate::uffd::Userfault;
use crate::PAGE_SIZE;

static EVICT_ERRORS: RateLimit = RateLimit::new(2);
/// How long the evictor backs off after a failed write-back before it tries again.
const STORE_RETRY_MS: u64 = 100;
/// How long the evictor sleeps when it wants to evict but finds nothing it can.
const NOTHING_TO_EVICT_MS: u64 = 5;
/// How long the evictor waits for an epoch being written, when only pages the log holds may
/// be evicted, in milliseconds.
const LOG_WAIT_MS: u64 = 2;
/// How long a starved evictor (no candidate the log holds) waits before it looks again, in
/// milliseconds.
const STARVED_RETRY_MS: u64 = 20;
/// How long the idle evictor sleeps before it looks at the resident count again.
const IDLE_WAIT_MS: u64 = 200;

/// The evictor's settings and the state it shares with the handlers.
pub(super) struct Eviction {
    /// Where a batch's victims are moved (on the staging userfaultfd), the evictor's alone.
    staging: Region,
    /// Resident pages above which the evictor runs.
    high_pages: usize,
    /// Resident pages it evicts down to.
    low_pages: usize,
    batch_pages: usize,
    /// Set while write-backs fail: handlers then stop waiting for room (the cache overflows
    /// rather than the program stalling forever).
    store_failing: AtomicBool,
    /// Set while only pages the log holds may be evicted and none can be now (an epoch is
    /// being written, or every candidate changed since the last one): handlers then stop
    /// waiting for room too, since a thread that waits inside the allocator would keep the
    /// next epoch's cut from taking the allocator's locks.
    starved: AtomicBool,
    /// The last batch found no victim at all (every resident page pinned or in transit).
    nothing_evictable: AtomicBool,
}

impl Eviction {
    /// Reserves the staging area for [`EVICT_BATCH_PAGES_MAX`] pages and registers it on
    /// `staging_uffd`.
    pub(super) fn new(
        staging_uffd: &Userfault,
        batch_pages: usize,
    ) -> Result<Eviction, super::PagerError> {
        let staging = Region::reserve(EVICT_BATCH_PAGES_MAX * PAGE_SIZE, None)?;
        staging_uffd.register(staging.base, staging.len, false)?;
        Ok(Eviction {
            staging,
            high_pages: 0,
            low_pages: 0,
            batch_pages,
            store_failing: AtomicBool::new(false),
            starved: AtomicBool::new(false),
            nothing_evictable: AtomicBool::new(false),
        })
    }

    /// Sets the watermarks for a cache of `capacity` pages: evicting starts a few batches
    /// before the cache is full, so that a fault rarely waits for room, and stops a few
    /// batches lower, so that the evictor works in large batches. Returns `(high, low)`.
    pub(super) fn set_watermarks(&mut self, capacity: usize) -> (usize, usize) {
        let batch = self.batch_pages;
        let headroom = (2 * batch).min(capacity / 4);
        self.high_pages = capacity - headroom;
        self.low_pages = self
            .high_pages
            .saturating_sub((2 * batch).min(capacity / 4));
        (self.high_pages, self.low_pages)
    }

    pub(super) fn high_pages(&self) -> usize {
        self.high_pages
    }

    /// True while write-backs fail (handlers then claim runs without waiting for room).
    pub(super) fn store_failing(&self) -> bool {
        self.store_failing.load(Ordering::Relaxed)
    }

    /// True while the evictor can evict nothing because the log does not hold the candidates
    /// yet (handlers then wait for room a bounded time only).
    pub(super) fn starved(&self) -> bool {
        self.starved.load(Ordering::Relaxed)
    }

    /// True while the evictor finds nothing it may evict (every resident page is pinned or
    /// in transit): handlers then serve faults without waiting for room, since none would
    /// come.
    pub(super) fn nothing_evictable(&self) -> bool {
        self.nothing_evictable.load(Ordering::Relaxed)
    }
}

pub(super) fn evictor_loop(sh: &Shared) {
    let mut victims: Vec<usize> = Vec::with_capacity(EVICT_BATCH_PAGES_MAX);
    loop {
        {
            let mut t = sh.cache.lock();
            while t.resident() <= sh.evict.high_pages {
                t = sh
                    .cache
                    .wait_eviction_wanted(t, Duration::from_millis(IDLE_WAIT_MS));
            }
        }
        // Evict down to the low watermark, one batch at a time, each inside the gate.
        loop {
            let _pass = sh.gate.enter();
            // The store says, batch by batch, whether the log is to stand in for a copy now
            // (an adaptive pool short of memory keeps one copy of what the log holds).
            let log_first = sh
                .durable
                .as_ref()
                .filter(|d| d.log_first() && sh.store.log_copy_now());
            if log_first.is_some_and(|d| d.in_flight.load(Ordering::SeqCst)) {
                // An epoch is being written: the pages its cut took may not be in the log
                // yet, and only pages the log holds may be evicted now.
                if !sh.evict.starved.swap(true, Ordering::Relaxed) {
                    sh.cache.room_freed();
                }
                drop(_pass);
                sleep_ms(LOG_WAIT_MS);
                continue;
            }
            victims.clear();
            {
                let mut t = sh.cache.lock();
                if t.resident() <= sh.evict.low_pages {
                    break;
                }
                t.pick_victims_where(sh.evict.batch_pages, &mut victims, log_first.is_some());
            }
            if victims.is_empty() {
                if let Some(d) = log_first {
                    // Every candidate changed since the last epoch: the cache overflows
                    // until the next one, which is asked for now (and waited for, rather than
                    // scanning the clock again and again).
                    if !sh.evict.starved.swap(true, Ordering::Relaxed) {
                        sh.cache.room_freed();
                    }
                    d.wanted.store(true, Ordering::Relaxed);
                    drop(_pass);
                    sleep_ms(STARVED_RETRY_MS);
                    break;
                }
                // Nothing can leave now: every resident page is pinned (a served mapping that
                // is not read-write) or in transit. Faults are then served without waiting for
                // room, and the cache overflows by what is pinned (README), until a batch
                // finds victims again.
                if !sh.evict.nothing_evictable.swap(true, Ordering::Relaxed) {
                    sh.cache.room_freed();
                }
                drop(_pass);
                sleep_ms(NOTHING_TO_EVICT_MS);
                break;
            }
            sh.evict.starved.store(false, Ordering::Relaxed);
            sh.evict.nothing_evictable.store(false, Ordering::Relaxed);
            let ok = evict_batch(sh, &victims, log_first);
            sh.cache.room_freed();
            if !ok {
                drop(_pass);
                sleep_ms(STORE_RETRY_MS);
                break;
            }
        }
    }
}

/// What became of one victim.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Still in the region (could not be moved): goes back to `Resident`.
    Stayed,
    /// Moved out, and it was not there (the program dropped it): becomes `Absent`.
    Hole,
    /// Moved out; content all zero: becomes `Absent`, no write-back.
    Zero,
    /// Moved out; equal to its stored copy: becomes `Evicted` without a write-back.
    Clean,
    /// Moved out; must be written back.
    Dirty,
}

/// Evicts the sorted `victims` (all `Evicting`). Returns false if the write-back failed.
/// With `log_first` (the log is the second copy), only pages the log holds leave.
fn evict_batch(sh: &Shared, victims: &[usize], log_first: Option<&super::epoch::Durable>) -> bool {
    assert!(victims.len() <= EVICT_BATCH_PAGES_MAX);
    let runs = runs_of(victims);
    let written = scan_written(sh, victims, &runs);
    if log_first.is_some() && written.iter().any(|&w| w) {
        // Written since the log took them: they stay (log-dirty) until an epoch has them.
        let (mut kept, mut rest) = (Vec::new(), Vec::new());
        {
            let mut t = sh.cache.lock();
            for (i, &p) in victims.iter().enumerate() {
                if written[i] && !t.has_flag(p, REMOVED) {
                    t.set_log_dirty(p);
                    t.set_state(p, PageState::Resident);
                    kept.push(p);
                } else {
                    rest.push(p);
                }
            }
        }
        STATS.add(Counter::EvictionsHeldForLog, kept.len() as u64);
        if rest.is_empty() {
            return true;
        }
        let runs = runs_of(&rest);
        let written = vec![false; rest.len()];
        return evict_moved(sh, &rest, &runs, &written, log_first);
    }
    evict_moved(sh, victims, &runs, &written, log_first)
}

/// Steps 2-6 of a batch whose written bits are known.
fn evict_moved(
    sh: &Shared,
    victims: &[usize],
    runs: &[(usize, usize)],
    written: &[bool],
    log_first: Option<&super::epoch::Durable>,
) -> bool {
    // Move them out, victim i to staging slot i.
    for &(i, len) in runs {
        move_run(sh, victims, i, len);
    }
    let (present, mut fate) = locate(sh, victims);
    let copies = classify(sh, victims, written, &present, &mut fate);
    if let Some(durable) = log_first {
        if !log_holds(durable, victims, &fate, &copies) {
            // A page written between the scan and its move: back, all of them, as after a
            // failed write-back (rare; the next batch goes on once an epoch has it).
            put_back(sh, victims, runs, &fate);
            forget_failed_batch(sh, victims, written, &fate, &copies);
            STATS.add(Counter::EvictionsHeldForLog, victims.len() as u64);
            return true;
        }
    }
    // With log_first every page written back was just checked to be in the log, outside an
    // epoch in flight: the store may keep fewer copies of it.
    let Some(dirty) = write_back(sh, victims, runs, &fate, &copies, log_first.is_some()) else {
        forget_failed_batch(sh, victims, written, &fate, &copies);
        return false;
    };
    record(
        sh,
        victims,
        runs,
        written,
        &fate,
        &copies,
        log_first.is_some(),
    );
    STATS.add(Counter::PagesWrittenBack, dirty);
    STATS.add(Counter::BytesWrittenBack, dirty * PAGE_SIZE as u64);
    true
}

/// Whether the log holds the exact content of every moved page that keeps a store copy (the
/// log is their second copy).
fn log_holds(
    durable: &super::epoch::Durable,
    victims: &[usize],
    fate: &[Fate],
    copies: &[StoreCopy],
) -> bool {
    let index = durable.index.as_ref().expect("log-first has an index");
    victims.iter().enumerate().all(|(i, &p)| {
        !matches!(fate[i], Fate::Dirty | Fate::Clean)
            || matches!(index.locate(p as u64), Located::At { crc, .. } if crc == copies[i].crc)
    })
}

/// Step 1: which victims were written since last protected (and protects them again).
fn scan_written(sh: &Shared, victims: &[usize], runs: &[(usize, usize)]) -> Vec<bool> {
    let mut written = vec![false; victims.len()];
    for &(i, len) in runs {
        let start = sh.addr_of(victims[i]);
        let end = start + len * PAGE_SIZE;
        let res = sh.kernel.scanner.take_written(start, end, |a, b| {
            let (a, b) = (a.max(start), b.min(end));
            for addr in (a..b).step_by(PAGE_SIZE) {
                written[i + (addr - start) / PAGE_SIZE] = true;
            }
        });
        if let Err(e) = res {
            // Without the scan every page counts as written; the checksum still spares clean
            // pages their write-back.
            log::debug!("PAGEMAP_SCAN failed: {e}");
            written[i..i + len].iter_mut().for_each(|w| *w = true);
        }
    }
    written
}

/// Step 3, after the moves: where each page is now, read back from the page tables rather
/// than taken from the kernel's account of the moves (Linux 6.18 was seen answering EEXIST,
/// with nothing moved, for pages it had moved). In its staging slot: moved (`present`, fate
/// still to decide). Still in the region: stays resident. In neither: a hole (the program
/// dropped the page).
fn locate(sh: &Shared, victims: &[usize]) -> (Vec<bool>, Vec<Fate>) {
    let n = victims.len();
    let mut present = vec![false; n];
    crate::region::for_each_present_page(sh.evict.staging.base, n * PAGE_SIZE, |slot| {
        present[slot] = true;
    });
    let mut fate = vec![Fate::Dirty; n];
    for i in 0..n {
        if !present[i] {
            fate[i] = if crate::region::page_present(sh.addr_of(victims[i])) {
                Fate::Stayed
            } else {
                Fate::Hole
            };
        }
    }
    (present, fate)
}

/// A moved page's CRC32C and, if it is dirty, the version its store copy gets.
#[derive(Clone, Copy, Default)]
struct StoreCopy {
    crc: u32,
    version: u32,
}

/// Step 4: classifies the moved pages by content; returns each one's checksum and version.
fn classify(
    sh: &Shared,
    victims: &[usize],
    written: &[bool],
    present: &[bool],
    fate: &mut [Fate],
) -> Vec<StoreCopy> {
    let n = victims.len();
    let mut copies = vec![StoreCopy::default(); n];
    // The staged bytes are the evictor's alone: they are read before the cache's lock is
    // taken, so that faults do not wait for a batch's checksums. Every moved page is summed,
    // also one the scan found unwritten and that still had its fetched bytes then: a write
    // between the scan and the move leaves no trace but the bytes (the move makes a fresh
    // entry, without the write-protect bit), and only the checksum tells it from its copy.
    // (Skipping the sum for such pages lost writes in `cpp_containers_multi_threaded`.)
    let mut zero = vec![false; n];
    for i in 0..n {
        if present[i] {
            let page = staging_page(sh, i);
            zero[i] = page.iter().all(|&b| b == 0);
            if !zero[i] {
                copies[i].crc = crc32c::crc32c(page);
            }
        }
    }
    let t = sh.cache.lock();
    for i in 0..n {
        if !present[i] {
            continue;
        }
        if zero[i] {
            fate[i] = Fate::Zero;
            continue;
        }
        let crc = copies[i].crc;
        let p = victims[i];
        fate[i] = if !written[i] && t.has_flag(p, STORED) && t.crc(p) == crc {
            Fate::Clean
        } else {
            copies[i].version = t.next_version(p);
            Fate::Dirty
        };
    }
    copies
}

/// Step 5: writes back the dirty pages in one store batch, after the discards queued before
/// it (a page freed and written again must keep its new copy). Returns how many, or `None` if
/// the write failed (the pages are then back in the region, see [`put_back`]). All or nothing:
/// a batch with any failed page is put back whole (the pages written meanwhile are written
/// again later; a read names the version and checksum it expects).
fn write_back(
    sh: &Shared,
    victims: &[usize],
    runs: &[(usize, usize)],
    fate: &[Fate],
    copies: &[StoreCopy],
    log_held: bool,
) -> Option<u64> {
    let mut writes: Vec<PageWrite<'_>> = (0..victims.len())
        .filter(|&i| fate[i] == Fate::Dirty)
        .map(|i| {
            let c = copies[i];
            let mut w =
                PageWrite::with_crc(victims[i] as u64, staging_page(sh, i), c.crc, c.version);
            w.log_held = log_held;
            w
        })
        .collect();
    let dirty = writes.len() as u64;
    if writes.is_empty() {
        return Some(0);
    }
    sh.discards.drain(&*sh.store);
    let result = sh.store.store(&mut writes);
    assert!(
        result.is_err() || writes.iter().all(|w| w.outcome.is_done()),
        "a store call that succeeds has written every page"
    );
    if let Err(e) = result {
        drop(writes);
        STATS.add(Counter::StoreErrors, 1);
        if EVICT_ERRORS.allow() {
            log::error!(
                "writing back {dirty} evicted pages failed, keeping them in memory (the cache will grow past its size until the store recovers): {e}"
            );
        }
        put_back(sh, victims, runs, fate);
        sh.evict.store_failing.store(true, Ordering::Relaxed);
        return None;
    }
    sh.evict.store_failing.store(false, Ordering::Relaxed);
    Some(dirty)
}

/// After a failed write-back (the pages are back in the region): the scan consumed the
/// victims' written bits, so the log learns of their changes from the table (a page that
/// stayed is protected again and would not show up in the next scan); and the store may hold
/// the new content of any dirty page or no longer hold its old one (a batch may fail partly),
/// so its stored copy is forgotten (it is written again when next evicted, never dropped as
/// clean) and the version it was given is used up (never given to other content).
fn forget_failed_batch(
    sh: &Shared,
    victims: &[usize],
    written: &[bool],
    fate: &[Fate],
    copies: &[StoreCopy],
) {
    let mut t = sh.cache.lock();
    for (i, &p) in victims.iter().enumerate() {
        if written[i] || fate[i] == Fate::Dirty {
            t.set_log_dirty(p);
        }
        if fate[i] == Fate::Dirty {
            t.forget_stored(p);
            t.use_version(p, copies[i].version);
        }
    }
}

/// Step 6: records the outcome, wakes whoever faulted meanwhile, empties the staging area and
/// drops the store's copies of pages that became absent.
fn record(
    sh: &Shared,
    victims: &[usize],
    runs: &[(usize, usize)],
    written: &[bool],
    fate: &[Fate],
    copies: &[StoreCopy],
    log_first: bool,
) {
    let n = victims.len();
    let mut discard = Runs::<{ EVICT_BATCH_PAGES_MAX }>::new();
    let (mut evicted, mut clean, mut mapped) = (0u64, 0u64, 0u64);
    {
        let mut t = sh.cache.lock();
        for i in 0..n {
            let p = victims[i];
            if fate[i] != Fate::Stayed && t.has_flag(p, MAPPED) {
                mapped += 1;
            }
            let removed = t.has_flag(p, REMOVED);
            t.set_flag(p, REMOVED, false);
            // The scan above consumed the page's written bit: the log learns of the change
            // from the table (and a page that turns `Absent` gets a `ZERO` record).
            // (With `log_first` a dirty victim differs from its store copy only: `log_holds`
            // found its content in the log.)
            let store_dirty = fate[i] == Fate::Dirty && !log_first;
            if written[i] || store_dirty || matches!(fate[i], Fate::Zero | Fate::Hole) {
                t.set_log_dirty(p);
            }
            match fate[i] {
                Fate::Stayed => t.set_state(p, PageState::Resident),
                _ if removed || matches!(fate[i], Fate::Hole | Fate::Zero) => {
                    if t.has_flag(p, STORED) {
                        discard.push(p as u64);
                        t.forget_stored(p);
                    }
                    t.set_state(p, PageState::Absent);
                    evicted += 1;
                }
                Fate::Clean => {
                    t.set_state(p, PageState::Evicted);
                    clean += 1;
                    evicted += 1;
                }
                _ => {
                    t.set_stored(p, copies[i].crc, copies[i].version);
                    t.set_state(p, PageState::Evicted);
                    evicted += 1;
                }
            }
        }
        publish_resident(t.resident());
    }
    for &(i, len) in runs {
        let _ = sh.kernel.uffd.wake(sh.addr_of(victims[i]), len * PAGE_SIZE);
    }
    // SAFETY: the staging area is the evictor's alone, and this batch is done with it.
    unsafe { crate::region::drop_pages(sh.evict.staging.base, n * PAGE_SIZE) };
    for &(first, count) in discard.as_slice() {
        sh.discards.push(first, count);
    }
    STATS.add(Counter::PagesEvicted, evicted);
    STATS.add(Counter::PagesDroppedClean, clean);
    STATS.add(Counter::MappedPagesEvicted, mapped);
}

/// Moves victims `[i, i+len)` (consecutive pages) to staging slots `[i, i+len)`. A page that
/// cannot move stays resident (the caller finds it still in the region).
fn move_run(sh: &Shared, victims: &[usize], i: usize, len: usize) {
    let mut stuck = Stuck::<0>::new();
    assert!((i + len) * PAGE_SIZE <= sh.evict.staging.len);
    // SAFETY: the victims are `Evicting`, owned by the evictor (a fault on one waits for it);
    // staging slots `[i, i + len)` are empty (dropped after every batch) and only the evictor
    // uses the staging area.
    unsafe {
        move_out(
            &sh.kernel,
            sh.evict.staging.base + i * PAGE_SIZE,
            sh.addr_of(victims[i]),
            len,
            &mut stuck,
        );
    }
}

/// After a failed write-back: copies every moved page back into the region (unprotected, so it
/// counts as written) and marks the victims resident again, through the install path that
/// every fault uses: a copy the kernel refuses with `EAGAIN` (a `REMOVE` or `UNMAP` waits to
/// be read) is retried after the events are read, a page the program dropped meanwhile stays
/// dropped, and a page that cannot be put back is poisoned, never left to read as zeros.
fn put_back(sh: &Shared, victims: &[usize], runs: &[(usize, usize)], fate: &[Fate]) {
    for &(i, len) in runs {
        let mut out: Vec<Outcome> = fate[i..i + len]
            .iter()
            .map(|f| match f {
                // Never left the region.
                Fate::Stayed => Outcome::Installed,
                // The program dropped it before the move.
                Fate::Hole => Outcome::Removed,
                // In its staging slot.
                _ => Outcome::Pending,
            })
            .collect();
        // SAFETY: staging slots `[i, i + len)` hold the pages of victims `[i, i + len)` (one
        // run of consecutive pages), moved there by this batch and only read here; the
        // destinations are missing pages of the region owned by this thread (`Evicting`).
        unsafe {
            install_pages(
                sh,
                victims[i],
                (sh.evict.staging.base + i * PAGE_SIZE) as *const u8,
                false,
                &mut out,
            );
        }
        finish_run(
            sh,
            victims[i],
            &out,
            Source::WriteBack,
            "putting it back after its write-back to the store failed did not work",
        );
    }
    // SAFETY: every page is back in the region (or poisoned); staging is the evictor's alone.
    unsafe { crate::region::drop_pages(sh.evict.staging.base, victims.len() * PAGE_SIZE) };
}

fn staging_page(sh: &Shared, slot: usize) -> &[u8] {
    assert!((slot + 1) * PAGE_SIZE <= sh.evict.staging.len);
    // SAFETY: the slot lies inside the staging mapping and holds a page moved there by this
    // batch (callers check `present`); only the evictor thread touches the staging area.
    unsafe {
        std::slice::from_raw_parts(
            (sh.evict.staging.base + slot * PAGE_SIZE) as *const u8,
            PAGE_SIZE,
        )
    }
}

/// Splits sorted page indexes into runs of consecutive pages: `(index of first, length)`.
fn runs_of(pages: &[usize]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, &p) in pages.iter().enumerate() {
        match runs.last_mut() {
            Some(r) if pages[r.0] + r.1 == p => r.1 += 1,
            _ => runs.push((i, 1)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::runs_of;

    #[test]
    fn runs_split_at_gaps() {
        assert_eq!(runs_of(&[1, 2, 3, 7, 8, 10]), vec![(0, 3), (3, 2), (5, 1)]);
        assert!(runs_of(&[]).is_empty());
    }
}
