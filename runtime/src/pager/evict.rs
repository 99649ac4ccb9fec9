//! The evictor: keeps the resident set under the cache size by moving batches of pages out of
//! the region, writing back the dirty ones, and dropping the clean ones.
//!
//! One batch: choose victims (clock) and mark them `Evicting`; find which were written since
//! their last write-back (`PAGEMAP_SCAN`, which also re-protects them); move them atomically
//! into the staging area (`UFFDIO_MOVE`); checksum each; write the dirty ones to the store in
//! one batch; mark them `Evicted` (or `Absent` for all-zero pages) and wake any thread that
//! faulted on them meanwhile. If the write-back fails, the pages are copied back into the
//! region: the cache overflows, the program never loses data.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{fault, sleep_ms, Shared, STATS};
use crate::cache::{PageState, LOGDIRTY, REMOVED, STORED};
use crate::logging::RateLimit;
use crate::stats::Counter;
use crate::store::PageWrite;
use crate::PAGE_SIZE;

static EVICT_ERRORS: RateLimit = RateLimit::new(2);
/// How long the evictor backs off after a failed write-back before it tries again.
const STORE_RETRY_MS: u64 = 100;
/// How long the evictor sleeps when it wants to evict but finds nothing it can.
const NOTHING_TO_EVICT_MS: u64 = 5;

pub(crate) fn evictor_loop(sh: &Shared) {
    let mut victims: Vec<usize> = Vec::with_capacity(super::EVICT_BATCH_PAGES_MAX);
    loop {
        {
            let mut t = sh.cache.lock();
            while t.resident() <= sh.high_pages {
                let (guard, _) = sh
                    .evict_wanted
                    .wait_timeout(t, Duration::from_millis(200))
                    .unwrap_or_else(|e| e.into_inner());
                t = guard;
            }
        }
        // Evict down to the low watermark, one batch at a time, each inside the gate.
        loop {
            let _pass = sh.gate.enter();
            victims.clear();
            {
                let mut t = sh.cache.lock();
                if t.resident() <= sh.low_pages {
                    break;
                }
                t.pick_victims(sh.evict_batch_pages, &mut victims);
            }
            if victims.is_empty() {
                drop(_pass);
                sleep_ms(NOTHING_TO_EVICT_MS);
                break;
            }
            let ok = evict_batch(sh, &victims);
            sh.room.notify_all();
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
fn evict_batch(sh: &Shared, victims: &[usize]) -> bool {
    let n = victims.len();
    assert!(n <= super::EVICT_BATCH_PAGES_MAX);
    let runs = runs_of(victims);

    // 1. Which victims were written since last protected (and protect them again).
    let mut written = vec![false; n];
    for &(i, len) in &runs {
        let start = sh.addr_of(victims[i]);
        let end = start + len * PAGE_SIZE;
        let res = sh.scanner.take_written(start, end, |a, b| {
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

    // 2. Move them out, victim i to staging slot i.
    for &(i, len) in &runs {
        move_run(sh, victims, i, len);
    }

    // 3. Where each page is now, read back from the page tables rather than taken from the
    //    kernel's account of the moves (Linux 6.18 was seen answering EEXIST, with nothing
    //    moved, for pages it had moved). In its staging slot: moved. Still in the region:
    //    stays resident. In neither: a hole (the program dropped the page).
    let mut present = vec![false; n];
    crate::region::for_each_present_page(sh.staging.base, n * PAGE_SIZE, |slot| {
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

    // 4. Classify by content, and give each dirty page its next version.
    let mut crcs = vec![0u32; n];
    let mut versions = vec![0u32; n];
    {
        let t = sh.cache.lock();
        for i in 0..n {
            if !present[i] {
                continue;
            }
            let page = staging_page(sh, i);
            if page.iter().all(|&b| b == 0) {
                fate[i] = Fate::Zero;
                continue;
            }
            crcs[i] = crc32c::crc32c(page);
            let p = victims[i];
            fate[i] = if !written[i] && t.has_flag(p, STORED) && t.crc(p) == crcs[i] {
                Fate::Clean
            } else {
                versions[i] = t.next_version(p);
                Fate::Dirty
            };
        }
    }

    // 5. Write back the dirty ones in one batch, after the discards queued before it (a page
    //    freed and written again must keep its new copy).
    let mut writes: Vec<PageWrite<'_>> = (0..n)
        .filter(|&i| fate[i] == Fate::Dirty)
        .map(|i| PageWrite::with_crc(victims[i] as u64, staging_page(sh, i), crcs[i], versions[i]))
        .collect();
    let dirty = writes.len() as u64;
    if !writes.is_empty() {
        sh.discards.drain(&*sh.store);
        let result = sh.store.store(&mut writes);
        assert!(
            result.is_err() || writes.iter().all(|w| w.outcome.is_done()),
            "a store call that succeeds has written every page"
        );
        // All or nothing here: a batch with any failed page is put back whole (the pages
        // written meanwhile are written again later; a read names version and checksum).
        if let Err(e) = result {
            drop(writes);
            STATS.add(Counter::StoreErrors, 1);
            if EVICT_ERRORS.allow() {
                log::error!(
                    "writing back {dirty} evicted pages failed, keeping them in memory (the cache will grow past its size until the store recovers): {e}"
                );
            }
            put_back(sh, victims, &runs, &fate);
            sh.store_failing.store(true, Ordering::Relaxed);
            return false;
        }
        sh.store_failing.store(false, Ordering::Relaxed);
    } else {
        drop(writes);
    }

    // 6. Record the outcome, wake whoever faulted meanwhile, empty the staging area.
    let mut discard = super::Runs::<{ super::EVICT_BATCH_PAGES_MAX }>::new();
    let (mut evicted, mut clean) = (0u64, 0u64);
    {
        let mut t = sh.cache.lock();
        for i in 0..n {
            let p = victims[i];
            let removed = t.has_flag(p, REMOVED);
            t.set_flag(p, REMOVED, false);
            // The scan above consumed the page's written bit: the log learns of the change
            // from the table (and a page that turns `Absent` gets a `ZERO` record).
            if written[i] || matches!(fate[i], Fate::Dirty | Fate::Zero | Fate::Hole) {
                t.set_flag(p, LOGDIRTY, true);
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
                    t.set_stored(p, crcs[i], versions[i]);
                    t.set_state(p, PageState::Evicted);
                    evicted += 1;
                }
            }
        }
        sh.publish_resident(t.resident());
    }
    for &(i, len) in &runs {
        let _ = sh.uffd.wake(sh.addr_of(victims[i]), len * PAGE_SIZE);
    }
    // SAFETY: the staging area is the evictor's alone, and this batch is done with it.
    unsafe { crate::region::drop_pages(sh.staging.base, n * PAGE_SIZE) };
    for &(first, count) in discard.as_slice() {
        sh.discards.push(first, count);
    }
    STATS.add(Counter::PagesEvicted, evicted);
    STATS.add(Counter::PagesDroppedClean, clean);
    STATS.add(Counter::PagesWrittenBack, dirty);
    STATS.add(Counter::BytesWrittenBack, dirty * PAGE_SIZE as u64);
    true
}

/// Times a shared page needed its copy-on-write broken before it could be moved.
static SHARED_PAGES_UNSHARED: AtomicU64 = AtomicU64::new(0);
/// Moves tried for one page before it is left resident.
const MOVE_ATTEMPTS_MAX: u32 = 3;

/// Moves victims `[i, i+len)` (consecutive pages) to staging slots `[i, i+len)`. A page that
/// cannot move stays resident (the caller finds it still in the region).
fn move_run(sh: &Shared, victims: &[usize], i: usize, len: usize) {
    let mut stuck = Stuck::<0>::new();
    assert!((i + len) * PAGE_SIZE <= sh.staging.len);
    // SAFETY: the victims are `Evicting`, owned by the evictor (a fault on one waits for it);
    // staging slots `[i, i + len)` are empty (dropped after every batch) and only the evictor
    // uses the staging area.
    unsafe {
        move_out(
            sh,
            sh.staging.base + i * PAGE_SIZE,
            sh.addr_of(victims[i]),
            len,
            &mut stuck,
        );
    }
}

/// Pages that would not move, remembered without allocating (up to `N`).
pub(crate) struct Stuck<const N: usize> {
    pages: [usize; N],
    count: usize,
    /// More than `N` pages were stuck.
    pub(crate) overflowed: bool,
}

impl<const N: usize> Stuck<N> {
    pub(crate) fn new() -> Self {
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

    pub(crate) fn pages(&self) -> &[usize] {
        &self.pages[..self.count]
    }
}

/// Moves the present pages of `[src, src + pages * PAGE_SIZE)` to `[dst, ...)` (an empty area
/// on the staging userfaultfd), checking where each page went with `mincore` rather than
/// trusting the kernel's account (Linux 6.18 was seen answering `EEXIST`, with nothing moved,
/// for pages it had moved): after an error it goes on from the first page that is neither in
/// its slot nor a hole. Pages that would not move are added to `stuck`. It neither allocates
/// nor logs (it runs on program threads; see `Runtime::discard`).
///
/// # Safety
/// As for [`crate::uffd::Userfault::move_pages`]: the pages of `src` are the caller's to take
/// (in transit, or given back by the program), and `[dst, dst + pages * PAGE_SIZE)` is an
/// empty range on the staging userfaultfd that only the caller uses.
pub(crate) unsafe fn move_out<const N: usize>(
    sh: &Shared,
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
        let Err(partial) = (unsafe { sh.staging_uffd.move_pages(d, s, (pages - k) * PAGE_SIZE) })
        else {
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

/// After a failed write-back: copies every moved page back into the region (unprotected, so it
/// counts as written) and marks the victims resident again, through the install path that
/// every fault uses: a copy the kernel refuses with `EAGAIN` (a `REMOVE` or `UNMAP` waits to
/// be read) is retried after the events are read, a page the program dropped meanwhile stays
/// dropped, and a page that cannot be put back is poisoned, never left to read as zeros.
fn put_back(sh: &Shared, victims: &[usize], runs: &[(usize, usize)], fate: &[Fate]) {
    for &(i, len) in runs {
        let mut out: Vec<fault::Outcome> = fate[i..i + len]
            .iter()
            .map(|f| match f {
                // Never left the region.
                Fate::Stayed => fault::Outcome::Installed,
                // The program dropped it before the move.
                Fate::Hole => fault::Outcome::Removed,
                // In its staging slot.
                _ => fault::Outcome::Pending,
            })
            .collect();
        // SAFETY: staging slots `[i, i + len)` hold the pages of victims `[i, i + len)` (one
        // run of consecutive pages), moved there by this batch and only read here; the
        // destinations are missing pages of the region owned by this thread (`Evicting`).
        unsafe {
            fault::install_pages(
                sh,
                victims[i],
                (sh.staging.base + i * PAGE_SIZE) as *const u8,
                false,
                &mut out,
            );
        }
        fault::finish_run(
            sh,
            victims[i],
            &out,
            fault::Source::WriteBack,
            "putting it back after its write-back to the store failed did not work",
        );
    }
    // SAFETY: every page is back in the region (or poisoned); staging is the evictor's alone.
    unsafe { crate::region::drop_pages(sh.staging.base, victims.len() * PAGE_SIZE) };
}

fn staging_page(sh: &Shared, slot: usize) -> &[u8] {
    assert!((slot + 1) * PAGE_SIZE <= sh.staging.len);
    // SAFETY: the slot lies inside the staging mapping and holds a page moved there by this
    // batch (callers check `present`); only the evictor thread touches the staging area.
    unsafe {
        std::slice::from_raw_parts((sh.staging.base + slot * PAGE_SIZE) as *const u8, PAGE_SIZE)
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
