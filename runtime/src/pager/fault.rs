//! The fault handlers: read events, apply the non-fault ones, and resolve missing-page faults
//! by filling runs of fresh pages with zeros or fetching runs of evicted pages from the store.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use userfaultfd::{Event, EventBuffer, FaultKind};

use super::{
    pin_to_cpu, Shared, EVENTS_PER_READ_MAX, FETCH_CHUNK_PAGES, FETCH_FIRST_CHUNK_PAGES,
    FETCH_RUN_PAGES_MAX, IDLE_POLL_MS, ROOM_WAIT_MS, STATS, ZERO_RUN_PAGES_MAX,
};
use crate::cache::{PageState, IMAGE, REFERENCED, REMOVED, SNAP};
use crate::logging::RateLimit;
use crate::region::Region;
use crate::stats::Counter;
use crate::store::{FailureKind, Outcome as StoreOutcome, PageRead};
use crate::uffd::UffdError;
use crate::PAGE_SIZE;

/// Messages about poisoned pages: at most this many a second reach stderr.
static POISON_MESSAGES: RateLimit = RateLimit::new(8);
static FAULT_ERRORS: RateLimit = RateLimit::new(8);
/// Smallest fetched run (a sequential stream's window) after which the handler prefetches the
/// stream's next window.
const PREFETCH_MIN_PAGES: usize = 64;
/// Attempts at poisoning a page while events keep the address space changing.
const POISON_RETRIES_MAX: u32 = 1000;
/// Most snapshot pages one fault copies back at once.
const SNAP_RUN_PAGES_MAX: usize = 64;
/// Times a page of a fetch is read before a failure that may pass (a transient store error, a
/// copy that fails its checksum) counts as final.
pub(crate) const FETCH_ATTEMPTS_MAX: u32 = 3;
/// The wait before the next read of a failed page grows by this much each attempt, in ms.
const FETCH_RETRY_MS: u64 = 2;

/// A page-aligned buffer for fetched pages (O_DIRECT needs the alignment).
pub(crate) struct PageBuf {
    region: Region,
}

impl PageBuf {
    /// Maps a buffer of `pages` pages. Buffers are made when the thread that uses them is
    /// started (never on a fault, a fork or an epoch), so that running out of address space
    /// stops the start, not the program.
    pub(crate) fn new(pages: usize) -> std::io::Result<PageBuf> {
        let region = Region::reserve(pages * PAGE_SIZE, None)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(PageBuf { region })
    }

    pub(crate) fn addr(&self, i: usize) -> usize {
        self.region.base + i * PAGE_SIZE
    }

    /// Mutable page-sized slices for the first `n` pages.
    pub(crate) fn pages_mut(&mut self, n: usize) -> Vec<&mut [u8]> {
        assert!(n * PAGE_SIZE <= self.region.len);
        // SAFETY: the region is a private mapping owned by this buffer, `n` pages long at
        // least, and the slices returned are disjoint and borrow `self` mutably.
        let all =
            unsafe { std::slice::from_raw_parts_mut(self.region.base as *mut u8, n * PAGE_SIZE) };
        all.chunks_mut(PAGE_SIZE).collect()
    }

    pub(crate) fn page(&self, i: usize) -> &[u8] {
        assert!((i + 1) * PAGE_SIZE <= self.region.len);
        // SAFETY: page `i` lies inside this buffer's private mapping.
        unsafe { std::slice::from_raw_parts(self.addr(i) as *const u8, PAGE_SIZE) }
    }
}

/// A fault handler thread; `fetch` is its buffer for fetched pages ([`FETCH_CHUNK_PAGES`]).
pub(crate) fn handler_loop(sh: &Shared, cpu: Option<usize>, mut fetch: PageBuf) {
    if let Some(cpu) = cpu {
        pin_to_cpu(cpu);
    }
    let mut buf = EventBuffer::new(EVENTS_PER_READ_MAX);
    let mut faults: Vec<usize> = Vec::with_capacity(EVENTS_PER_READ_MAX);
    loop {
        if !sh.uffd.wait_readable(&sh.kick, IDLE_POLL_MS) {
            continue;
        }
        faults.clear();
        pump_events(sh, &mut buf, &mut faults);
        faults.extend(sh.take_deferred());
        let started = Instant::now();
        let _pass = sh.gate.enter();
        for &addr in &faults {
            handle_missing(sh, addr & !(PAGE_SIZE - 1), &mut fetch);
            STATS.record_fault_latency_ns(duration_ns(started.elapsed()));
        }
    }
}

/// Reads every ready event with the `events` lock held for writing, applies the non-fault
/// events to the page table at once, and appends the addresses of missing-page faults in the
/// region to `faults`.
pub(crate) fn pump_events(sh: &Shared, buf: &mut EventBuffer, faults: &mut Vec<usize>) {
    let _w = sh.events.write().unwrap_or_else(|e| e.into_inner());
    pump_events_locked(sh, buf, faults);
}

/// [`pump_events`] for a caller that holds the `events` lock for writing already (the epoch
/// cut).
pub(crate) fn pump_events_locked(sh: &Shared, buf: &mut EventBuffer, faults: &mut Vec<usize>) {
    let mut events: Vec<Event> = Vec::with_capacity(EVENTS_PER_READ_MAX);
    loop {
        events.clear();
        if let Err(e) = sh.uffd.read_ready(buf, &mut events) {
            if FAULT_ERRORS.allow() {
                log::error!("reading userfaultfd events failed: {e}");
            }
            return;
        }
        if events.is_empty() {
            return;
        }
        for ev in &events {
            match ev {
                Event::Pagefault { kind, addr, .. } => {
                    let addr = *addr as usize;
                    if !sh.region.contains(addr) {
                        continue;
                    }
                    match kind {
                        FaultKind::Missing => faults.push(addr),
                        // Asynchronous write-protection resolves write faults in the kernel;
                        // such a message can only be stale. Waking is always safe.
                        _ => {
                            STATS.add(Counter::FaultsWriteProtect, 1);
                            let _ = sh.uffd.wake(addr & !(PAGE_SIZE - 1), PAGE_SIZE);
                        }
                    }
                }
                Event::Remove { start, end } => {
                    STATS.add(Counter::EventsRemove, 1);
                    sh.forget_range(*start as usize, *end as usize);
                }
                Event::Unmap { start, end } => {
                    STATS.add(Counter::EventsUnmap, 1);
                    log::warn!(
                        "the program unmapped {:#x}..{:#x} inside lego's heap region",
                        *start as usize,
                        *end as usize
                    );
                    sh.forget_range(*start as usize, *end as usize);
                }
                Event::Remap { from, len, .. } => {
                    STATS.add(Counter::EventsRemap, 1);
                    log::warn!(
                        "the program moved {len} bytes at {:#x} out of lego's heap region with mremap",
                        *from as usize
                    );
                    sh.forget_range(*from as usize, *from as usize + len);
                }
                Event::Fork { .. } => {}
            }
        }
    }
}

/// Called when the kernel refused an install with `EAGAIN` because a non-fault event (a
/// program's `madvise` or `munmap`) waits to be read: reads and applies it, keeps the faults
/// read along the way for the handlers, and wakes them.
pub(crate) fn pump_for_install(sh: &Shared) {
    let mut buf = EventBuffer::new(EVENTS_PER_READ_MAX);
    let mut faults = Vec::new();
    pump_events(sh, &mut buf, &mut faults);
    if !faults.is_empty() {
        sh.defer(faults);
        sh.kick.signal();
    }
    std::thread::yield_now();
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// What a handler decided to do about a fault, with the pages claimed for it.
enum Plan {
    /// Nothing to do now (the page is in transit; its owner will wake the thread).
    Nothing,
    Zero {
        first: usize,
        n: usize,
    },
    Fetch {
        first: usize,
        n: usize,
    },
    Poison {
        page: usize,
    },
    /// Pages an epoch cut moved into the snapshot and has not put back yet: copied back from
    /// their slots.
    Snap {
        first: usize,
        n: usize,
    },
    /// The cache is full and the gate is closing (an epoch cut or a fork): the evictor cannot
    /// make room until it opens, so the fault is handed back to be served after.
    Later,
}

/// Resolves a missing-page fault at page-aligned `addr`.
pub(crate) fn handle_missing(sh: &Shared, addr: usize, fetch: &mut PageBuf) {
    let page = sh.page_of(addr);
    let plan = plan_fault(sh, page, false);
    match plan {
        Plan::Nothing => {}
        Plan::Zero { first, n } => {
            STATS.add(Counter::FaultsZeroFill, 1);
            install_zeros(sh, first, n);
        }
        Plan::Fetch { first, n } => {
            STATS.add(Counter::FaultsFetch, 1);
            fetch_in_chunks(sh, first, n, Some(page), fetch);
            if n >= PREFETCH_MIN_PAGES {
                prefetch(sh, first + n, fetch);
            }
        }
        Plan::Poison { page } => poison(sh, page, "its content was lost earlier"),
        Plan::Snap { first, n } => install_from_snapshot(sh, first, n),
        Plan::Later => {
            sh.defer(vec![addr]);
            sh.kick.signal();
        }
    }
}

/// Looks at the page and claims a run for the work it needs, waiting for room in the cache
/// unless `ignore_room` (`fork` pages everything in regardless of the cache size).
///
/// A fresh page gets a run of up to [`ZERO_RUN_PAGES_MAX`] zero pages (fresh heap is touched
/// in order); an evicted one a run of evicted pages as long as its read-ahead stream's window.
/// Runs never take more pages than the cache has room for, and stop at the first page in
/// another state.
fn plan_fault(sh: &Shared, page: usize, ignore_room: bool) -> Plan {
    let mut t = sh.cache.lock();
    loop {
        let state = t.state(page);
        let fetch = match state {
            PageState::Filling | PageState::Fetching | PageState::Evicting => {
                STATS.add(Counter::FaultsSpurious, 1);
                return Plan::Nothing;
            }
            PageState::Poisoned => return Plan::Poison { page },
            // Its content is in the epoch snapshot: it goes back without taking new room.
            PageState::Resident if t.has_flag(page, SNAP) => {
                let n = snapshot_run_len(&t, page, SNAP_RUN_PAGES_MAX);
                claim_snapshot(&mut t, page, n);
                return Plan::Snap { first: page, n };
            }
            // A resident page that faults was dropped by the kernel behind lego's back (the
            // program's MADV_FREE): it reads as zeros, like the kernel would give.
            PageState::Absent | PageState::Resident => false,
            PageState::Evicted => true,
        };
        let failing = sh.store_failing.load(Ordering::Relaxed);
        let room = sh.cache.capacity_pages().saturating_sub(t.resident());
        if room == 0 && !failing && !ignore_room {
            if sh.gate.is_closing() {
                // Waiting here would keep the gate from closing and the evictor out: a
                // deadlock. Leave; the fault is served once the gate opens.
                return Plan::Later;
            }
            sh.evict_wanted.notify_one();
            let (guard, _) = sh
                .room
                .wait_timeout(t, Duration::from_millis(ROOM_WAIT_MS))
                .unwrap_or_else(|e| e.into_inner());
            t = guard;
            continue;
        }
        let limit = |want: usize| {
            if failing || ignore_room {
                want
            } else {
                want.min(room).max(1)
            }
        };
        let (first, n) = if !fetch {
            let limit = limit(ZERO_RUN_PAGES_MAX);
            let accept = |s| s == PageState::Absent;
            let mut n = 1 + t.run_len(page + 1, limit - 1, accept);
            // Fresh memory written downwards (a backward memmove into a new block): the run
            // grows below the fault instead.
            let below = t.run_len_before(page, limit - n, accept);
            n += below;
            (page - below, n)
        } else if ignore_room {
            let n = 1 + t.run_len(page + 1, FETCH_RUN_PAGES_MAX - 1, |s| {
                s == PageState::Evicted
            });
            (page, n)
        } else {
            (page, claim_window(sh, &t, page, limit))
        };
        claim(
            sh,
            &mut t,
            first,
            n,
            if fetch {
                PageState::Fetching
            } else {
                PageState::Filling
            },
        );
        return if fetch {
            Plan::Fetch { first, n }
        } else {
            Plan::Zero { first, n }
        };
    }
}

/// After a fetch for a sequential stream (a run of at least [`PREFETCH_MIN_PAGES`]), the
/// handler goes on to fetch the stream's next window at `page` while the program works
/// through the pages it just got, so that a sweep finds them resident instead of faulting.
/// It never waits for room and never poisons: a page it cannot bring in stays evicted, and a
/// thread that needs it will fault and fetch it itself.
fn prefetch(sh: &Shared, page: usize, buf: &mut PageBuf) {
    let n = {
        let mut t = sh.cache.lock();
        if page >= t.pages() || t.state(page) != PageState::Evicted {
            return;
        }
        let room = sh.cache.capacity_pages().saturating_sub(t.resident());
        if room < PREFETCH_MIN_PAGES {
            return;
        }
        let n = claim_window(sh, &t, page, |window| window.min(room));
        claim(sh, &mut t, page, n, PageState::Fetching);
        n
    };
    STATS.add(Counter::Prefetches, 1);
    fetch_in_chunks(sh, page, n, None, buf);
}

/// The length of the run of evicted pages from `page` that its read-ahead stream's window
/// (cut by `limit`) asks for, recorded as fetched by the stream. The cache lock is held (`t`).
fn claim_window(
    sh: &Shared,
    t: &crate::cache::Table,
    page: usize,
    limit: impl Fn(usize) -> usize,
) -> usize {
    let mut ra = sh.readahead.lock().unwrap_or_else(|e| e.into_inner());
    let (window, stream) = ra.window(page);
    let limit = limit(window).max(1);
    let n = 1 + t.run_len(page + 1, limit - 1, |s| s == PageState::Evicted);
    ra.fetched(stream, page, n);
    n
}

/// Puts `[first, first+n)` in `transit` for the calling thread, and wakes the evictor if that
/// took the resident set over the high watermark. The cache lock is held (`t`).
fn claim(sh: &Shared, t: &mut crate::cache::Table, first: usize, n: usize, transit: PageState) {
    for p in first..first + n {
        t.set_state(p, transit);
    }
    let resident = t.resident();
    sh.publish_resident(resident);
    if resident > sh.high_pages {
        sh.evict_wanted.notify_one();
    }
}

/// What became of one page of a claimed run.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
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
pub(crate) enum Source {
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
pub(crate) unsafe fn install_pages(
    sh: &Shared,
    first: usize,
    src: *const u8,
    wp: bool,
    out: &mut [Outcome],
) {
    let n = out.len();
    'retry: loop {
        let guard = sh.events.read().unwrap_or_else(|e| e.into_inner());
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
            let end = (i..n).find(|&j| out[j] != Outcome::Pending).unwrap_or(n);
            // SAFETY: the caller guarantees `src` is readable for `n` pages and page-aligned,
            // and that the destination pages lie in the registered region and are its own.
            let res = unsafe {
                sh.uffd.copy(
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
                        let _ = sh.uffd.wake(sh.addr_of(first + i), PAGE_SIZE);
                        out[i] = Outcome::Installed;
                        i += 1;
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
pub(crate) fn finish_run(
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
                    t.forget_stored(p);
                    t.set_state(p, PageState::Absent);
                }
                Outcome::Removed => {
                    t.forget_stored(p);
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
        sh.publish_resident(t.resident());
    }
    sh.room.notify_all();
    let _ = sh.uffd.wake(sh.addr_of(first), out.len() * PAGE_SIZE);
    for p in failed {
        poison(sh, p, why_failed);
    }
    installed
}

/// Claims `[first, first+n)`, pages in the epoch snapshot, for copying back.
pub(crate) fn claim_snapshot(t: &mut crate::cache::Table, first: usize, n: usize) {
    for p in first..first + n {
        debug_assert_eq!(snapshot_run_len(t, p, 1), 1);
        t.set_state(p, PageState::Filling);
    }
}

/// Copies the claimed run `[first, first+n)` back from the epoch snapshot (page `p` is in slot
/// `p`), write-protected: the log has its content, so it is clean. Wakes its waiters.
pub(crate) fn install_from_snapshot(sh: &Shared, first: usize, n: usize) {
    let snapshot = sh
        .snapshot
        .expect("pages are in a snapshot only when the heap has a log");
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
pub(crate) fn snapshot_run_len(t: &crate::cache::Table, first: usize, max: usize) -> usize {
    (first..(first + max).min(t.pages()))
        .take_while(|&p| t.state(p) == PageState::Resident && t.has_flag(p, SNAP))
        .count()
}

/// Fills the claimed run `[first, first+n)` with zeros.
fn install_zeros(sh: &Shared, first: usize, n: usize) {
    let mut out = vec![Outcome::Pending; n];
    assert!(n <= ZERO_RUN_PAGES_MAX);
    // SAFETY: the zero region holds `ZERO_RUN_PAGES_MAX` pages of zeros that nothing writes;
    // the run was claimed (`Filling`) by this thread.
    unsafe { install_pages(sh, first, sh.zeros.base as *const u8, false, &mut out) };
    let installed = finish_run(
        sh,
        first,
        &out,
        Source::Zeros,
        "the kernel refused to install it",
    );
    STATS.add(Counter::PagesZeroFilled, installed);
}

/// Fetches the claimed run `[first, first+n)` from the store in chunks. When a thread faulted
/// on `first` (`faulting`), the first chunk is small so that it runs again soon, and the
/// larger ones follow while it works on the first pages (a sequential reader that catches up
/// waits only for the chunk it needs). If a read fails, the rest of the run is given back
/// unread.
pub(crate) fn fetch_in_chunks(
    sh: &Shared,
    first: usize,
    n: usize,
    faulting: Option<usize>,
    buf: &mut PageBuf,
) {
    debug_assert!(faulting.is_none() || faulting == Some(first));
    let mut at = first;
    while at < first + n {
        let chunk = if at == first && faulting.is_some() {
            FETCH_FIRST_CHUNK_PAGES
        } else {
            FETCH_CHUNK_PAGES
        };
        let len = chunk.min(first + n - at);
        if !fetch_chunk(sh, at, len, faulting, buf) {
            release_claim(sh, at + len, first + n - (at + len));
            return;
        }
        at += len;
    }
}

/// Gives back claimed `Fetching` pages without reading them: evicted again (or absent if the
/// program discarded them meanwhile), waking any thread that waits on them.
fn release_claim(sh: &Shared, first: usize, n: usize) {
    if n == 0 {
        return;
    }
    {
        let mut t = sh.cache.lock();
        for p in first..first + n {
            let removed = t.has_flag(p, REMOVED);
            t.set_flag(p, REMOVED, false);
            if removed {
                t.forget_stored(p);
            }
            t.set_state(
                p,
                if removed {
                    PageState::Absent
                } else {
                    PageState::Evicted
                },
            );
        }
        sh.publish_resident(t.resident());
    }
    sh.room.notify_all();
    let _ = sh.uffd.wake(sh.addr_of(first), n * PAGE_SIZE);
}

/// Fetches the claimed pages `[first, first+n)` (at most [`FETCH_CHUNK_PAGES`]), checks every
/// page against its checksum, and installs the good ones write-protected (clean). A page that
/// fails for a reason that may pass (a transient store error, a copy that failed its check) is
/// read again, up to [`FETCH_ATTEMPTS_MAX`] times in all; its neighbours are installed
/// meanwhile. What still fails then: the faulting page is poisoned, and so is a read-ahead page
/// whose copy is lost or corrupt; a read-ahead page that only hit transient errors is put back
/// as evicted. False if any page failed.
fn fetch_chunk(
    sh: &Shared,
    first: usize,
    n: usize,
    faulting: Option<usize>,
    buf: &mut PageBuf,
) -> bool {
    let faulting = faulting.filter(|f| (first..first + n).contains(f));
    // Pages still in the restore image have no checksum in the table (replay checked the
    // log's when it wrote the image).
    let expect: Vec<Expect> = {
        let t = sh.cache.lock();
        (first..first + n)
            .map(|p| {
                if t.has_flag(p, IMAGE) {
                    Expect::Image
                } else {
                    Expect::Store {
                        crc: t.crc(p),
                        version: t.version(p),
                    }
                }
            })
            .collect()
    };
    let mut status = vec![PageFetch::Unread; n];
    let mut last_error = String::new();
    for attempt in 1..=FETCH_ATTEMPTS_MAX {
        if let Err(e) = read_pages(sh, first, &expect, buf, &mut status) {
            last_error = e;
        }
        // Verify every page before anything is installed: a corrupt copy is never served.
        for (i, st) in status.iter_mut().enumerate() {
            if *st == PageFetch::Read {
                let good = match expect[i] {
                    Expect::Store { crc, .. } => crc32c::crc32c(buf.page(i)) == crc,
                    Expect::Image => true,
                };
                *st = if good {
                    PageFetch::Good
                } else {
                    PageFetch::Corrupt
                };
            }
        }
        let retry = status
            .iter()
            .any(|st| matches!(st, PageFetch::Transient | PageFetch::Corrupt));
        if !retry {
            break;
        }
        STATS.add(Counter::FetchErrors, 1);
        if attempt < FETCH_ATTEMPTS_MAX {
            for st in status.iter_mut() {
                if matches!(st, PageFetch::Transient | PageFetch::Corrupt) {
                    *st = PageFetch::Unread;
                }
            }
            super::sleep_ms(FETCH_RETRY_MS * u64::from(attempt));
        }
    }
    let mut out: Vec<Outcome> = status
        .iter()
        .enumerate()
        .map(|(i, st)| match st {
            PageFetch::Good => Outcome::Pending,
            // Only failed the ways that pass: a read-ahead page stays evicted.
            PageFetch::Transient if Some(first + i) != faulting => Outcome::Skipped,
            _ => Outcome::Failed,
        })
        .collect();
    let all_good = status.iter().all(|st| *st == PageFetch::Good);
    let corrupt_faulting = faulting.filter(|&f| status[f - first] == PageFetch::Corrupt);
    // SAFETY: `buf` holds the `n` pages just read (at most its size, checked by `pages_mut`)
    // and is not touched until this returns; the run was claimed (`Fetching`) by this thread.
    unsafe { install_pages(sh, first, buf.addr(0) as *const u8, true, &mut out) };
    let why = if corrupt_faulting.is_some() || last_error.is_empty() {
        "its copy in the store failed its CRC32C check or could not be installed".to_string()
    } else {
        format!("fetching it from the store failed: {last_error}")
    };
    let installed = finish_run(sh, first, &out, Source::Store, &why);
    STATS.add(Counter::PagesFetched, installed);
    STATS.add(Counter::BytesFetched, installed * PAGE_SIZE as u64);
    if installed > 1 {
        STATS.add(Counter::PagesReadAhead, installed - 1);
    }
    if let Some(page) = corrupt_faulting {
        log::error!(
            "the copy of the page at {:#x} in the store failed its CRC32C check",
            sh.addr_of(page)
        );
    }
    all_good
}

/// Where a fetched page's content comes from, and what it must match.
#[derive(Clone, Copy)]
enum Expect {
    /// The restore image (checked by replay when it wrote the image).
    Image,
    /// The store, which holds this version with this checksum.
    Store { crc: u32, version: u32 },
}

/// How far one page of a fetched chunk has got.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PageFetch {
    /// Not read yet (or to be read again).
    Unread,
    /// Read, not yet checked.
    Read,
    /// Read and matching its checksum.
    Good,
    /// Read, but its bytes do not match the checksum.
    Corrupt,
    /// The read failed in a way that may pass.
    Transient,
    /// The read failed for good (the copy is gone, or the store refuses).
    Lost,
}

/// Reads the `Unread` pages of `first..first + expect.len()` into `buf`: from the restore
/// image the pages that are still there, from the store the others, and marks each one
/// `Read` or failed. Returns a description of the first failure.
fn read_pages(
    sh: &Shared,
    first: usize,
    expect: &[Expect],
    buf: &mut PageBuf,
    status: &mut [PageFetch],
) -> Result<(), String> {
    let mut slices = buf.pages_mut(expect.len());
    let mut from_store: Vec<PageRead<'_>> = Vec::with_capacity(expect.len());
    let mut store_slot: Vec<usize> = Vec::with_capacity(expect.len());
    let mut first_error: Option<String> = None;
    let mut i = 0;
    let mut rest = slices.as_mut_slice();
    while i < expect.len() {
        // A run of pages from the same source, all to be read or all not.
        let image = matches!(expect[i], Expect::Image);
        let unread = status[i] == PageFetch::Unread;
        let n = (i..expect.len())
            .take_while(|&j| {
                matches!(expect[j], Expect::Image) == image
                    && (status[j] == PageFetch::Unread) == unread
            })
            .count();
        let (run, tail) = std::mem::take(&mut rest).split_at_mut(n);
        rest = tail;
        if !unread {
            // Read already (or failed for good): left as it is.
        } else if image {
            let result = match &sh.image {
                Some(img) => {
                    let mut bufs: Vec<&mut [u8]> = run.iter_mut().map(|b| &mut **b).collect();
                    img.read_pages((first + i) as u64, &mut bufs)
                        .map_err(|e| crate::logging::error_chain(&e))
                }
                None => Err("the page is marked as in the restore image, but none is open".into()),
            };
            let st = if result.is_ok() {
                PageFetch::Read
            } else {
                PageFetch::Transient
            };
            status[i..i + n].iter_mut().for_each(|s| *s = st);
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        } else {
            for (k, b) in run.iter_mut().enumerate() {
                let Expect::Store { crc, version } = expect[i + k] else {
                    unreachable!("the run holds store pages only");
                };
                from_store.push(PageRead::new((first + i + k) as u64, b, crc, version));
                store_slot.push(i + k);
            }
        }
        i += n;
    }
    if !from_store.is_empty() {
        if let Err(e) = sh.store.fetch(&mut from_store) {
            first_error.get_or_insert(e.to_string());
        }
        for (r, &slot) in from_store.iter().zip(&store_slot) {
            status[slot] = match r.outcome {
                StoreOutcome::Done => PageFetch::Read,
                StoreOutcome::Failed(FailureKind::Transient) | StoreOutcome::Pending => {
                    PageFetch::Transient
                }
                StoreOutcome::Failed(FailureKind::Lost | FailureKind::Refused) => PageFetch::Lost,
            };
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Poisons `page` so that the faulting thread gets `SIGBUS`, and says so on stderr.
fn poison(sh: &Shared, page: usize, why: &str) {
    let addr = sh.addr_of(page);
    STATS.add(Counter::PagesPoisoned, 1);
    if POISON_MESSAGES.allow() {
        crate::logging::write_stderr_line(&format!(
            "lego: SIGBUS: the heap page at {addr:#x} cannot be served because {why}"
        ));
    }
    let mut unprotected = false;
    for _ in 0..POISON_RETRIES_MAX {
        match sh.uffd.poison(addr, PAGE_SIZE) {
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
                if let Err(e) = sh.uffd.write_protect(addr, PAGE_SIZE, false) {
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
    let _ = sh.uffd.wake(addr, PAGE_SIZE);
}

/// Brings every evicted page back into memory (for `fork`), ignoring the cache size, and waits
/// until no page is in transit. Called with the gate closed, so no handler or evictor runs;
/// `buf` ([`FETCH_CHUNK_PAGES`] pages) was mapped at start.
pub(crate) fn page_in_everything(sh: &Shared, buf: &mut PageBuf) {
    let pages = sh.cache.lock().high();
    let mut page = 0;
    let mut brought = 0u64;
    while page < pages {
        let state = sh.cache.lock().state(page);
        if state == PageState::Evicted {
            if let Plan::Fetch { first, n } = plan_fault(sh, page, true) {
                fetch_in_chunks(sh, first, n, Some(first), buf);
                brought += n as u64;
                page = first + n;
                continue;
            }
        }
        page += 1;
    }
    STATS.add(Counter::ForkPageIns, brought);
}

#[cfg(test)]
mod tests {
    use super::PageBuf;

    /// A buffer that cannot be mapped is an error for the thread being started, not a panic
    /// (which used to happen on the program's own thread inside `fork()` and at every epoch).
    #[test]
    fn a_buffer_that_cannot_be_mapped_is_an_error() {
        let pages = usize::MAX / crate::PAGE_SIZE;
        let err = PageBuf::new(pages)
            .err()
            .expect("no address space is that large");
        assert!(!err.to_string().is_empty());
        let mut buf = PageBuf::new(4).expect("four pages map");
        assert_eq!(buf.pages_mut(4).len(), 4);
        assert!(buf.page(3).iter().all(|&b| b == 0));
    }
}
