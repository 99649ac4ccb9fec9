//! The fault handlers: one thread per CPU reads the userfaultfd (through `events.rs`) and
//! decides, for each missing-page fault, what the page needs: a run of zeros (fresh pages),
//! a fetch (evicted pages, `fetch.rs`), a copy back from the epoch snapshot
//! (`epoch/snapshot.rs`), poison (lost pages), nothing (in transit: its owner wakes the
//! thread), or later (the cache is full while the gate closes). It claims the run for
//! itself (a transit state), then hands it to the code that fills it.
//!
//! Rules: a run never claims more pages than the cache has room for (except for `fork`); with
//! no room the handler wakes the evictor and waits, unless the gate is closing (then it
//! defers the fault: waiting would deadlock the cut or the fork). Handlers work inside the
//! gate, a batch of faults at a time, and never serve a page in transit.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use userfaultfd::EventBuffer;

use super::buf::PageBuf;
use super::epoch::snapshot;
use super::events::pump_events;
use super::fetch::fetch_in_chunks;
use super::install::{finish_run, install_pages, poison, Outcome, Source};
use super::readahead::Readahead;
use super::{
    pin_to_cpu, publish_resident, Shared, EVENTS_PER_READ_MAX, FETCH_CHUNK_PAGES,
    FETCH_FIRST_CHUNK_PAGES, FETCH_RUN_PAGES_MAX, STATS, ZERO_RUN_PAGES_MAX,
};
use crate::cache::{PageState, Table, PINNED, SNAP};
use crate::region::Region;
use crate::stats::Counter;
use crate::PAGE_SIZE;

/// Smallest fetched run (a sequential stream's window) after which the handler prefetches the
/// stream's next window.
const PREFETCH_MIN_PAGES: usize = 64;
/// Most snapshot pages one fault copies back at once.
const SNAP_RUN_PAGES_MAX: usize = 64;
/// How long a handler waits for the evictor to make room before it checks again.
const ROOM_WAIT_MS: u64 = 20;
/// Longest wait for room while the evictor is starved of pages the log holds, in
/// milliseconds: past it the fault is served beyond the cache size.
const STARVED_WAIT_MS: u64 = 50;
/// How long an idle handler sleeps in `poll` before it polls again. The handlers never stop:
/// other libraries' destructors may touch the heap after lego's exit handler has run.
const IDLE_POLL_MS: i32 = 200;

/// What the handlers fill runs from.
pub(super) struct Fill {
    /// [`ZERO_RUN_PAGES_MAX`] pages of zeros that nothing writes.
    zeros: Region,
    /// Read-ahead streams (locked inside the cache lock, never the other way round).
    readahead: Mutex<Readahead>,
}

impl Fill {
    pub(super) fn new() -> Result<Fill, super::PagerError> {
        Ok(Fill {
            zeros: Region::reserve(ZERO_RUN_PAGES_MAX * PAGE_SIZE, None)?,
            readahead: Mutex::new(Readahead::new()),
        })
    }

    /// The address of a page of zeros nothing writes (a source for `UFFDIO_COPY`).
    pub(super) fn zeros_addr(&self) -> usize {
        self.zeros.base
    }
}

/// A fault handler thread; `fetch` is its buffer for fetched pages ([`FETCH_CHUNK_PAGES`]).
pub(super) fn handler_loop(sh: &Shared, cpu: Option<usize>, mut fetch: PageBuf) {
    if let Some(cpu) = cpu {
        pin_to_cpu(cpu);
    }
    let mut buf = EventBuffer::new(EVENTS_PER_READ_MAX);
    let mut faults: Vec<usize> = Vec::with_capacity(EVENTS_PER_READ_MAX);
    loop {
        if !sh.kernel.wait_readable(IDLE_POLL_MS) {
            continue;
        }
        faults.clear();
        pump_events(sh, &mut buf, &mut faults);
        faults.extend(sh.kernel.take_deferred());
        let started = Instant::now();
        let _pass = sh.gate.enter();
        for &addr in &faults {
            handle_missing(sh, addr & !(PAGE_SIZE - 1), &mut fetch);
            STATS.record_fault_latency_ns(duration_ns(started.elapsed()));
        }
    }
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// What a handler decided to do about a fault, with the pages claimed for it.
pub(super) enum Plan {
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
pub(super) fn handle_missing(sh: &Shared, addr: usize, fetch: &mut PageBuf) {
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
            // A sequential stream's run is followed by the prefetch of its next window, whose
            // first chunk the store may start reading now.
            let prefetching = n >= PREFETCH_MIN_PAGES;
            let then = if prefetching { FETCH_CHUNK_PAGES } else { 0 };
            fetch_in_chunks(sh, first, n, Some(page), fetch, then);
            if prefetching {
                prefetch(sh, first + n, fetch);
            }
        }
        Plan::Poison { page } => poison(sh, page, "its content was lost earlier"),
        Plan::Snap { first, n } => snapshot::handler_copy_back(sh, first, n),
        Plan::Later => {
            sh.kernel.defer(vec![addr]);
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
pub(super) fn plan_fault(sh: &Shared, page: usize, ignore_room: bool) -> Plan {
    let mut t = sh.cache.lock();
    let mut waiting_since: Option<Instant> = None;
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
                let n = snapshot::snapshot_run_len(&t, page, SNAP_RUN_PAGES_MAX);
                snapshot::claim_snapshot(&mut t, page, n);
                return Plan::Snap { first: page, n };
            }
            // A resident page that faults was dropped by the kernel behind lego's back (the
            // program's MADV_FREE): it reads as zeros, like the kernel would give.
            PageState::Absent | PageState::Resident => false,
            PageState::Evicted => true,
        };
        // A starved evictor (the log does not hold the candidates yet) gets a bounded wait:
        // this thread may hold the allocator's lock, which the next epoch's cut needs. An
        // evictor with nothing it may evict (all pinned) gets none: no room would come.
        let starved_long = sh.evict.starved()
            && waiting_since.is_some_and(|w| w.elapsed() >= Duration::from_millis(STARVED_WAIT_MS));
        let failing = sh.evict.store_failing() || starved_long || sh.evict.nothing_evictable();
        let room = sh.cache.capacity_pages().saturating_sub(t.resident());
        if room == 0 && !failing && !ignore_room {
            if sh.gate.is_closing() {
                // Waiting here would keep the gate from closing and the evictor out: a
                // deadlock. Leave; the fault is served once the gate opens.
                return Plan::Later;
            }
            sh.cache.want_eviction();
            waiting_since.get_or_insert_with(Instant::now);
            t = sh
                .cache
                .wait_for_room(t, Duration::from_millis(ROOM_WAIT_MS));
            continue;
        }
        let limit = |want: usize| {
            if failing || ignore_room {
                want
            } else {
                want.min(room).max(1)
            }
        };
        let (first, n) = if t.has_flag(page, PINNED) {
            // Not read-write: its VMA may be this one page (see `PINNED`).
            (page, 1)
        } else if !fetch {
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
        if page >= t.pages() || t.state(page) != PageState::Evicted || t.has_flag(page, PINNED) {
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
    // The sweep's next fault is expected right after this window.
    fetch_in_chunks(sh, page, n, None, buf, FETCH_FIRST_CHUNK_PAGES);
}

/// The length of the run of evicted pages from `page` that its read-ahead stream's window
/// (cut by `limit`) asks for, recorded as fetched by the stream. The cache lock is held (`t`).
fn claim_window(sh: &Shared, t: &Table, page: usize, limit: impl Fn(usize) -> usize) -> usize {
    let mut ra = sh.fill.readahead.lock().unwrap_or_else(|e| e.into_inner());
    let (window, stream) = ra.window(page);
    let limit = limit(window).max(1);
    let n = 1 + t.run_len(page + 1, limit - 1, |s| s == PageState::Evicted);
    ra.fetched(stream, page, n);
    n
}

/// Puts `[first, first+n)` in `transit` for the calling thread, and wakes the evictor if that
/// took the resident set over the high watermark. The cache lock is held (`t`).
fn claim(sh: &Shared, t: &mut Table, first: usize, n: usize, transit: PageState) {
    for p in first..first + n {
        t.set_state(p, transit);
    }
    let resident = t.resident();
    publish_resident(resident);
    if resident > sh.evict.high_pages() {
        sh.cache.want_eviction();
    }
}

/// Fills the claimed run `[first, first+n)` with zeros.
fn install_zeros(sh: &Shared, first: usize, n: usize) {
    let mut out = vec![Outcome::Pending; n];
    assert!(n <= ZERO_RUN_PAGES_MAX);
    // SAFETY: the zero region holds `ZERO_RUN_PAGES_MAX` pages of zeros that nothing writes;
    // the run was claimed (`Filling`) by this thread.
    unsafe { install_pages(sh, first, sh.fill.zeros.base as *const u8, false, &mut out) };
    let installed = finish_run(
        sh,
        first,
        &out,
        Source::Zeros,
        "the kernel refused to install it",
    );
    STATS.add(Counter::PagesZeroFilled, installed);
}
