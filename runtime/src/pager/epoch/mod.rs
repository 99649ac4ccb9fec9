//! Epochs of the durable heap: the flusher thread cuts the heap at one point in time and
//! appends the pages that changed since the last epoch to the log, as one epoch that ends with
//! a commit record. This file is the flusher (when to cut, one epoch from start to end, what
//! a failure leaves) and [`Durable`], the durable heap's state; the cut is `cut.rs`, the
//! snapshot and its copy-back `snapshot.rs`, appending `append.rs`, compaction `compact.rs`.
//!
//! What is in an epoch: every page that is log-dirty at the cut, that is, in the page table's
//! dirty set (`cache/dirty.rs`). A page is put there by whoever learns that it changed: the
//! cut's own `PAGEMAP_SCAN` (written bits), the evictor's scan (it consumes the written bits
//! of its victims), and discards (the page now reads as zeros: a `ZERO` record); the cut
//! takes it out when it takes the page, a failed epoch puts its pages back. A dirty page may be resident (its content is taken at the
//! cut), evicted since it changed (its copy is read back from the store), or absent (zeros).
//!
//! The cut (with the gate closed, so that no handler installs and the evictor is idle, and the
//! `events` lock held, so that no discard runs):
//! 1. scan the used part of the region for written pages (which also write-protects them
//!    again) and move every resident dirty page out into the snapshot area with
//!    `UFFDIO_MOVE`: from then on a thread that touches one waits (its fault is not served
//!    until the cut is over);
//! 2. scan again: pages written meanwhile (clean pages, which asynchronous write-protection
//!    never stops) are moved out too, until a scan finds none. Every write that is in the
//!    snapshot happened before the page was moved; every write after a move waits for the end
//!    of the cut; so the snapshot is a consistent cut of the program's history;
//! 3. mark the moved pages `SNAP`, open the gate: the cut is over. A thread that touches a
//!    moved page faults, and its handler copies the page back from its slot (write-protected:
//!    the log has it); the flusher copies back the rest, while the log writer thread streams
//!    the snapshot to the log.
//!
//! The program is stopped only where it touches a dirty page during steps 1-2. Evicted dirty
//! pages are held (`LOGHOLD`: not evicted again, their store copy not discarded) until the
//! epoch has read them. The design and its reasons are in `docs/DESIGN.md`, "Epochs".
//!
//! Rules: the flusher is the only thread that cuts, and it takes the user heap's locks
//! (`Quiesce`), then the gate, then `events`, then the cache lock, in that order. An epoch is
//! never committed without a page it should hold. Nothing here runs without a log.

mod append;
mod compact;
mod cut;
pub(super) mod snapshot;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use thiserror::Error;

use self::append::{AppendError, Appender};
use self::compact::{log_limit, maybe_compact};
use self::cut::{take_cut, Cut};
use self::snapshot::{copy_back, Snapshot};
use super::{Quiesce, Shared, STATS};
use crate::cache::{PageSet, PageState, LOGHOLD, STORED};
use crate::config::LogSettings;
use crate::log::{EpochOrigin, LogError, LogWriter, PageIndex};
use crate::logging::RateLimit;
use crate::stats::Counter;
use crate::store::FaultBudget;
use crate::PAGE_SIZE;

/// How often the flusher looks at the number of dirty pages, in milliseconds.
const DIRTY_CHECK_MS: u64 = 50;
/// How long the flusher waits after a failed epoch or compaction before it tries again.
const FAILURE_RETRY_MS: u64 = 1000;

static EPOCH_ERRORS: RateLimit = RateLimit::new(3);

/// Why `lego_checkpoint` could not give an epoch.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum EpochError {
    #[error("the heap has no log (set LEGO_LOG_DIR to make it durable)")]
    NoLog,
    #[error("writing the epoch to the log failed: {0}")]
    Failed(String),
    /// The flusher is gone: no epoch will ever be cut in this process.
    #[error("the heap is not being logged any more: {0}")]
    Stopped(String),
}

/// Requests of `lego_checkpoint` and what the flusher answered.
#[derive(Default)]
struct Requests {
    /// Tickets handed out to callers so far.
    asked: u64,
    /// Every ticket up to this one was served by a cut that started after it was asked.
    served: u64,
    /// What the last served cut gave.
    result: Option<Result<u64, EpochError>>,
    /// Set when the flusher stopped for good: every waiter, present and future, gets it.
    stopped: Option<EpochError>,
}

/// The durable heap's state: `lego_checkpoint` requests and their answers, the settings,
/// the snapshot area, and what the cut and the read-back need from outside.
pub(crate) struct Durable {
    requests: Mutex<Requests>,
    /// Signalled when a request is added (for the flusher) and when one is served.
    changed: Condvar,
    settings: LogSettings,
    /// Where a cut moves dirty pages (slot `p` for page `p`).
    pub(super) snapshot: Snapshot,
    /// How the cut keeps the program's allocator still.
    quiesce: Option<Quiesce>,
    /// Failures injected into the epoch's read-back of evicted pages
    /// (`LEGO_FAULT_INJECT=readback:...`, a testing hook).
    readback_faults: Option<FaultBudget>,
    /// The pages the current cut took (the flusher's, reserved at start, empty between
    /// cuts).
    taken: Mutex<PageSet>,
    /// Where each page's newest log record is, when the log stands in for a second copy of
    /// evicted pages (a pool with one copy): see `log_copy`.
    pub(super) index: Option<Arc<PageIndex>>,
    /// Set from the start of a cut until its epoch is committed or failed: pages the cut took
    /// may not be in the log yet.
    pub(super) in_flight: AtomicBool,
    /// The evictor is starved of pages the log holds: the next epoch is wanted now.
    pub(super) wanted: AtomicBool,
    /// The newest committed epoch (0 before the first), when it committed (Unix time in
    /// milliseconds) and the bytes the log's segments hold then: for the statistics.
    last_epoch: AtomicU64,
    last_epoch_unix_ms: AtomicU64,
    log_bytes: AtomicU64,
}

impl Durable {
    pub(super) fn new(
        settings: LogSettings,
        snapshot: Snapshot,
        quiesce: Option<Quiesce>,
        readback_faults: Option<FaultBudget>,
        taken: PageSet,
        index: Option<Arc<PageIndex>>,
    ) -> Durable {
        Durable {
            requests: Mutex::new(Requests::default()),
            changed: Condvar::new(),
            settings,
            snapshot,
            quiesce,
            readback_faults,
            taken: Mutex::new(taken),
            index,
            in_flight: AtomicBool::new(false),
            wanted: AtomicBool::new(false),
            last_epoch: AtomicU64::new(0),
            last_epoch_unix_ms: AtomicU64::new(0),
            log_bytes: AtomicU64::new(0),
        }
    }

    /// The newest committed epoch, when it committed (Unix milliseconds) and the log's size
    /// in bytes then.
    pub(in crate::pager) fn progress(&self) -> (u64, u64, u64) {
        (
            self.last_epoch.load(Ordering::Relaxed),
            self.last_epoch_unix_ms.load(Ordering::Relaxed),
            self.log_bytes.load(Ordering::Relaxed),
        )
    }

    /// Whether the log stands in for a second copy of evicted pages: the evictor evicts only
    /// pages whose content is in the log, and a fetch the store cannot serve reads the log.
    pub(super) fn log_first(&self) -> bool {
        self.index.is_some()
    }

    /// Returns once every write made before the call is in a committed epoch (durable with
    /// `LEGO_SYNC=fdatasync`): that epoch's number.
    pub(super) fn checkpoint(&self) -> Result<u64, EpochError> {
        let mut r = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        r.asked += 1;
        let ticket = r.asked;
        self.changed.notify_all();
        while r.served < ticket {
            if let Some(e) = &r.stopped {
                return Err(e.clone());
            }
            r = self.changed.wait(r).unwrap_or_else(|e| e.into_inner());
        }
        r.result.clone().unwrap_or(Err(EpochError::NoLog))
    }

    /// The flusher cannot go on: answers every waiting and later `checkpoint` with `why`.
    fn stop(&self, why: EpochError) {
        let mut r = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        r.stopped = Some(why);
        self.changed.notify_all();
    }
}

/// The flusher thread: an epoch every `LEGO_FLUSH_MS`, when `LEGO_FLUSH_PAGES` pages are dirty,
/// or when a program thread asks (`lego_checkpoint`); a compaction when the log outgrows
/// `LEGO_LOG_MAX`.
pub(super) fn flusher_loop(shared: Arc<Shared>, writer: LogWriter) {
    let sh = &*shared;
    let durable = sh
        .durable
        .as_ref()
        .expect("the flusher runs only with a log");
    let settings = &durable.settings;
    // The writer is shared with the log writer thread, which appends an epoch while this
    // thread puts the cut's pages back; each takes the lock only while it uses the writer.
    let writer = Arc::new(Mutex::new(writer));
    let appender = match Appender::start(&shared, &writer) {
        Ok(a) => a,
        Err(e) => {
            let why = format!("the log writer thread could not start: {e}");
            crate::logging::write_stderr_line(&format!(
                "lego: {why}; the heap is not logged, and lego_checkpoint() fails with EIO"
            ));
            durable.stop(EpochError::Stopped(why));
            return;
        }
    };
    // `None`: LEGO_FLUSH_MS=manual, epochs only when a program thread asks.
    let interval = settings.flush_ms.map(Duration::from_millis);
    let mut last = Instant::now();
    let mut written_back_at_cut = STATS.get(Counter::PagesWrittenBack);
    loop {
        // Wait for a reason to cut.
        let ticket = {
            let mut r = durable.requests.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if r.asked > r.served {
                    break;
                }
                let Some(interval) = interval else {
                    r = durable.changed.wait(r).unwrap_or_else(|e| e.into_inner());
                    continue;
                };
                if last.elapsed() >= interval {
                    break;
                }
                let left = interval.saturating_sub(last.elapsed());
                let nap = left.min(Duration::from_millis(DIRTY_CHECK_MS));
                r = durable
                    .changed
                    .wait_timeout(r, nap)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                if r.asked == r.served
                    && (durable.wanted.swap(false, Ordering::Relaxed)
                        || dirty_pages(sh, written_back_at_cut) >= settings.flush_pages)
                {
                    break;
                }
            }
            (r.asked, r.asked > r.served)
        };
        let (ticket, requested) = ticket;
        last = Instant::now();
        written_back_at_cut = STATS.get(Counter::PagesWrittenBack);
        // A cut that serves a lego_checkpoint() request is the program's checkpoint: `lego
        // replay --checkpoint` recovers the newest of those.
        let origin = if requested {
            EpochOrigin::Program
        } else {
            EpochOrigin::Automatic
        };
        let result = run_epoch(sh, &writer, &appender, settings, origin);
        {
            let mut r = durable.requests.lock().unwrap_or_else(|e| e.into_inner());
            r.served = r.served.max(ticket);
            r.result = Some(result.clone());
            durable.changed.notify_all();
        }
        match result {
            Ok(epoch) => {
                let mut w = lock_writer(&writer);
                maybe_compact(sh, &mut w, settings);
                durable.last_epoch.store(epoch, Ordering::Relaxed);
                durable
                    .last_epoch_unix_ms
                    .store(crate::watch::now_ms(), Ordering::Relaxed);
                durable.log_bytes.store(w.total_bytes(), Ordering::Relaxed);
            }
            Err(_) => super::sleep_ms(FAILURE_RETRY_MS),
        }
    }
}

/// About how many pages are dirty now (without write-protecting anything): written according
/// to the page tables, or written back by the evictor since the last cut.
fn dirty_pages(sh: &Shared, written_back_at_cut: u64) -> usize {
    // Pages written back since the last cut stand for the dirty pages the evictor took out.
    let flagged = STATS
        .get(Counter::PagesWrittenBack)
        .saturating_sub(written_back_at_cut);
    let flagged = usize::try_from(flagged).unwrap_or(usize::MAX);
    let high = sh.cache.lock().high();
    let mut written = 0;
    let _ = sh
        .kernel
        .scanner
        .find_written(sh.kernel.region.base, sh.addr_of(high), |a, b| {
            written += (b - a) / PAGE_SIZE;
        });
    flagged + written
}

fn lock_writer(writer: &Mutex<LogWriter>) -> MutexGuard<'_, LogWriter> {
    writer.lock().unwrap_or_else(|e| e.into_inner())
}

/// One epoch: recovers a broken log first (by compaction), cuts, appends, commits. Returns the
/// committed epoch (the last one when nothing changed).
fn run_epoch(
    sh: &Shared,
    writer: &Mutex<LogWriter>,
    appender: &Appender,
    settings: &LogSettings,
    origin: EpochOrigin,
) -> Result<u64, EpochError> {
    let durable = sh.durable.as_ref().expect("epochs run only with a log");
    let last_committed = {
        let mut w = lock_writer(writer);
        if w.is_broken() {
            w.compact_within(log_limit(sh, settings)).map_err(|e| {
                report(
                    "compacting the log after a failure",
                    &crate::logging::error_chain(&e),
                )
            })?;
        }
        w.last_committed()
    };
    let held = durable.quiesce.is_some_and(|q| (q.hold)());
    let started = Instant::now();
    durable.in_flight.store(true, Ordering::SeqCst);
    let mut sent = false;
    // The writer thread starts appending as soon as the pages are out, while this thread
    // puts them back.
    let (cut, pass) = take_cut(sh, |cut| {
        // An epoch that would leave out a lost page is not written at all.
        if cut.wants_epoch(origin) && cut.lost.is_empty() {
            sent = appender.jobs.send((cut, origin)).is_ok();
        }
    });
    let cut_us = started.elapsed().as_micros() as u64;
    if let Some(q) = durable.quiesce.filter(|_| held) {
        (q.release)();
    }
    STATS.add(Counter::EpochCutMicros, cut_us);
    copy_back(sh, &cut.moved);
    drop(pass);
    let result = if sent {
        appender
            .done
            .recv()
            .unwrap_or(Err(AppendError::Log(LogError::NeedsCheckpoint {
                epoch: last_committed,
            })))
    } else if !cut.lost.is_empty() {
        Err(AppendError::Lost(cut.lost.clone()))
    } else if cut.wants_epoch(origin) {
        Err(AppendError::Log(LogError::NeedsCheckpoint {
            epoch: last_committed,
        }))
    } else {
        Ok(last_committed)
    };
    release_holds(sh, &cut);
    durable.snapshot.drop_slots(sh, &cut.moved);
    let outcome = match result {
        Ok(epoch) => {
            if cut.pages() > 0 {
                STATS.add(Counter::EpochsCommitted, 1);
                STATS.add(Counter::PagesLogged, cut.pages() as u64);
            }
            log::debug!(
                "epoch {epoch}: {} pages ({} resident, {} evicted, {} zero); cut took {cut_us} us",
                cut.pages(),
                cut.moved.len() + cut.copied.len(),
                cut.evicted.len(),
                cut.zeros.len()
            );
            Ok(epoch)
        }
        Err(e) => Err(epoch_failed(sh, &cut, e)),
    };
    // Committed (the log holds the cut's pages) or failed (they are log-dirty again).
    durable.in_flight.store(false, Ordering::SeqCst);
    outcome
}

/// After a failed epoch: its pages go into the next one (with whatever they hold then: newer
/// content supersedes theirs), pages whose store copy is lost are poisoned, and the failure is
/// reported.
fn epoch_failed(sh: &Shared, cut: &Cut, e: AppendError) -> EpochError {
    let mut t = sh.cache.lock();
    for p in cut.page_indexes() {
        t.set_log_dirty(p);
    }
    let (what, text) = match e {
        AppendError::Log(e) => ("writing an epoch", crate::logging::error_chain(&e)),
        AppendError::StoreRead(e) => (
            "an epoch",
            format!(
                "reading evicted pages back from the page store failed; the epoch is \
                 retried with its pages later: {e}"
            ),
        ),
        AppendError::Lost(pages) => {
            // Their content is gone: a fault on one gives SIGBUS, and until the program
            // frees them no epoch can be committed (it would hold a heap that never existed).
            for &p in &pages {
                if t.state(p) == PageState::Evicted {
                    t.set_state(p, PageState::Poisoned);
                }
            }
            let text = format!(
                "{} changed heap pages lost their content (the first at {:#x}: its copy in \
                 the page store failed its CRC32C check); no epoch is committed until the \
                 program frees them",
                pages.len(),
                sh.addr_of(pages[0])
            );
            ("an epoch", text)
        }
    };
    drop(t);
    report(what, &text)
}

/// Clears the holds the cut put on evicted pages.
fn release_holds(sh: &Shared, cut: &Cut) {
    if cut.evicted.is_empty() {
        return;
    }
    let mut t = sh.cache.lock();
    for &(p, _, _) in &cut.evicted {
        t.set_flag(p, LOGHOLD, false);
        // Freed while held: the copy the epoch read can go now (a held page is never stored
        // again, so it is the copy the discard skipped).
        if !t.has_flag(p, STORED) {
            sh.discards.push(p as u64, 1);
        }
    }
}

fn report(what: &str, text: &str) -> EpochError {
    STATS.add(Counter::LogErrors, 1);
    // On stderr whatever the log level: the operator must learn that durability stopped.
    if EPOCH_ERRORS.allow() {
        crate::logging::write_stderr_line(&format!(
            "lego: {what} failed; the heap in memory is intact and the log keeps its last committed epoch: {text}"
        ));
    }
    EpochError::Failed(text.to_owned())
}
