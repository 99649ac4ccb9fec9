//! Epochs of the durable heap: the flusher thread cuts the heap at one point in time and
//! appends the pages that changed since the last epoch to the log, as one epoch that ends with
//! a commit record.
//!
//! What is in an epoch: every page whose `LOGDIRTY` flag is set at the cut. The flag is set by
//! whoever learns that a page changed: the cut's own `PAGEMAP_SCAN` (written bits), the
//! evictor's scan (it consumes the written bits of its victims), and discards (the page now
//! reads as zeros: a `ZERO` record). A dirty page may be resident (its content is taken at the
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

use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use thiserror::Error;

use super::{fault, Shared, STATS};
use crate::cache::{PageState, LOGDIRTY, LOGHOLD, SNAP};
use crate::config::LogSettings;
use crate::log::{EpochOrigin, EpochPage, LogError, LogWriter};
use crate::logging::RateLimit;
use crate::stats::Counter;
use crate::store::{FailureKind, Outcome, PageRead};
use crate::PAGE_SIZE;

/// How often the flusher looks at the number of dirty pages, in milliseconds.
const DIRTY_CHECK_MS: u64 = 50;
/// How long the flusher waits after a failed epoch or compaction before it tries again.
const FAILURE_RETRY_MS: u64 = 1000;
/// Pages read back from the store and appended at once (evicted dirty pages).
const STORE_READ_PAGES: usize = 64;
/// Reads of one chunk of evicted pages tried before the epoch fails (a store that fails
/// briefly does not cost an epoch).
const STORE_READ_ATTEMPTS_MAX: u32 = 3;
/// Pause between two reads of the same chunk, in milliseconds.
const STORE_READ_RETRY_MS: u64 = 20;
/// Snapshot pages the flusher copies back at once after a cut.
const COPY_BACK_PAGES: usize = 256;
/// Resident pages appended to the log at once.
const APPEND_PAGES: usize = 1024;
/// Rounds of scan-and-move after which the cut stops chasing writers (each round moves every
/// page written during the previous one; a writer stops at its first moved page, so in
/// practice two or three rounds suffice).
const CUT_ROUNDS_MAX: usize = 64;
/// Smallest log size that triggers a compaction when `LEGO_LOG_MAX` is unset, in bytes.
const LOG_MAX_BYTES_FLOOR: u64 = 64 << 20;
/// Multiple of the heap's live size the log may reach when `LEGO_LOG_MAX` is unset.
const LOG_MAX_LIVE_MULTIPLE: u64 = 4;

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

/// The flusher's shared state: `lego_checkpoint` requests and their answers.
pub(crate) struct Durable {
    requests: Mutex<Requests>,
    /// Signalled when a request is added (for the flusher) and when one is served.
    changed: Condvar,
    settings: LogSettings,
}

impl Durable {
    pub(crate) fn new(settings: LogSettings) -> Durable {
        Durable {
            requests: Mutex::new(Requests::default()),
            changed: Condvar::new(),
            settings,
        }
    }

    /// Returns once every write made before the call is in a committed epoch (durable with
    /// `LEGO_SYNC=fdatasync`): that epoch's number.
    pub(crate) fn checkpoint(&self) -> Result<u64, EpochError> {
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

/// What one cut took: the pages of the epoch, by where their content is.
#[derive(Default)]
struct Cut {
    /// Resident pages moved out into their snapshot slots (page `p` goes to slot `p`).
    moved: Vec<usize>,
    /// Resident pages that would not move, copied while the program ran (shared with a forked
    /// child that would not unshare; rare).
    copied: Vec<(usize, Box<[u8]>)>,
    /// Evicted pages to read back from the store: (page, CRC32C of the store's copy).
    evicted: Vec<(usize, u32, u32)>,
    /// Pages that read as zeros now.
    zeros: Vec<usize>,
    /// Pages changed since the last epoch whose content is lost (poisoned): an epoch without
    /// them would not be a heap that existed, so none is committed while there are any.
    lost: Vec<usize>,
}

impl Cut {
    fn pages(&self) -> usize {
        self.moved.len() + self.copied.len() + self.evicted.len() + self.zeros.len()
    }

    /// Whether the cut makes an epoch: it holds pages, or the program asked for a checkpoint
    /// (committed even when empty, so that `--checkpoint` never picks an older state).
    fn wants_epoch(&self, origin: EpochOrigin) -> bool {
        self.pages() > 0 || origin.is_program()
    }

    /// Every page of the cut, whatever its source.
    fn page_indexes(&self) -> impl Iterator<Item = usize> + '_ {
        self.moved
            .iter()
            .copied()
            .chain(self.copied.iter().map(|(p, _)| *p))
            .chain(self.evicted.iter().map(|(p, _, _)| *p))
            .chain(self.zeros.iter().copied())
    }
}

/// The flusher thread: an epoch every `LEGO_FLUSH_MS`, when `LEGO_FLUSH_PAGES` pages are dirty,
/// or when a program thread asks (`lego_checkpoint`); a compaction when the log outgrows
/// `LEGO_LOG_MAX`.
pub(crate) fn flusher_loop(shared: Arc<Shared>, writer: LogWriter) {
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
                    && dirty_pages(sh, written_back_at_cut) >= settings.flush_pages
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
            Ok(_) => maybe_compact(sh, &mut lock_writer(&writer), settings),
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
        .scanner
        .find_written(sh.region.base, sh.addr_of(high), |a, b| {
            written += (b - a) / PAGE_SIZE;
        });
    flagged + written
}

fn lock_writer(writer: &Mutex<LogWriter>) -> MutexGuard<'_, LogWriter> {
    writer.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why appending a cut failed.
enum AppendError {
    /// Writing the log failed.
    Log(LogError),
    /// Reading evicted pages back from the store failed, again and again: the epoch is
    /// retried later with everything it held.
    StoreRead(String),
    /// These evicted pages' store copies failed their CRC32C check: their content is lost.
    Lost(Vec<usize>),
}

/// The log writer thread's two ends: a cut to append, and what appending it gave.
struct Appender {
    jobs: mpsc::Sender<(Arc<Cut>, EpochOrigin)>,
    done: mpsc::Receiver<Result<u64, AppendError>>,
}

impl Appender {
    fn start(shared: &Arc<Shared>, writer: &Arc<Mutex<LogWriter>>) -> std::io::Result<Appender> {
        let (jobs, job_rx) = mpsc::channel::<(Arc<Cut>, EpochOrigin)>();
        let (done_tx, done) = mpsc::channel();
        let (sh, writer) = (Arc::clone(shared), Arc::clone(writer));
        // Allocated once here, so that no epoch can fail for want of a buffer.
        let mut buf = fault::PageBuf::new(STORE_READ_PAGES)?;
        crate::threads::spawn("lego-logwrite", move || {
            for (cut, origin) in job_rx {
                let result = append_cut(&sh, &mut lock_writer(&writer), &cut, origin, &mut buf);
                if done_tx.send(result).is_err() {
                    return;
                }
            }
        })?;
        Ok(Appender { jobs, done })
    }
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
    let held = sh.quiesce.is_some_and(|q| (q.hold)());
    let started = Instant::now();
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
    if let Some(q) = sh.quiesce.filter(|_| held) {
        (q.release)();
    }
    STATS.add(Counter::EpochCutMicros, cut_us);
    copy_back(sh, &cut);
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
    for (first, n) in page_runs(&cut.moved) {
        // SAFETY: the snapshot area is the flusher's; these slots' pages are back in the heap
        // and written to the log (or the epoch failed), so nobody reads them any more.
        unsafe { crate::region::drop_pages(snapshot(sh).base + first * PAGE_SIZE, n * PAGE_SIZE) };
    }
    match result {
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
        Err(e) => {
            // The pages of the failed epoch go into the next one (with whatever they hold
            // then: newer content supersedes theirs).
            let mut t = sh.cache.lock();
            for p in cut.page_indexes() {
                t.set_flag(p, LOGDIRTY, true);
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
                    // Their content is gone: a fault on one gives SIGBUS, and until the
                    // program frees them no epoch can be committed (it would hold a heap that
                    // never existed).
                    for &p in &pages {
                        if t.state(p) == PageState::Evicted {
                            t.set_state(p, PageState::Poisoned);
                        }
                    }
                    let text = format!(
                        "{} changed heap pages lost their content (the first at {:#x}: its \
                         copy in the page store failed its CRC32C check); no epoch is \
                         committed until the program frees them",
                        pages.len(),
                        sh.addr_of(pages[0])
                    );
                    ("an epoch", text)
                }
            };
            drop(t);
            Err(report(what, &text))
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

/// Clears the holds the cut put on evicted pages.
fn release_holds(sh: &Shared, cut: &Cut) {
    if cut.evicted.is_empty() {
        return;
    }
    let mut t = sh.cache.lock();
    for &(p, _, _) in &cut.evicted {
        t.set_flag(p, LOGHOLD, false);
    }
}

/// Steps 1-3 of the module doc. Returns the cut, and a pass through the gate that the caller
/// holds until every moved page is back.
fn take_cut<'a>(
    sh: &'a Shared,
    on_frozen: impl FnOnce(Arc<Cut>),
) -> (Arc<Cut>, super::gate::Pass<'a>) {
    sh.gate.close();
    let mut cut = Cut::default();
    let frozen;
    {
        let _w = sh.events.write().unwrap_or_else(|e| e.into_inner());
        let mut buf = userfaultfd::EventBuffer::new(super::EVENTS_PER_READ_MAX);
        let mut faults = Vec::new();
        // Discards the program made before the cut are applied first.
        fault::pump_events_locked(sh, &mut buf, &mut faults);
        let high = sh.cache.lock().high();
        let mut moved = vec![false; high];
        for round in 0.. {
            // Written pages become dirty in the table (and are protected again).
            let mut written: Vec<(usize, usize)> = Vec::new();
            if let Err(e) = sh
                .scanner
                .take_written(sh.region.base, sh.addr_of(high), |a, b| {
                    written.push((a, b))
                })
            {
                log::warn!(
                    "PAGEMAP_SCAN failed during an epoch cut, logging every resident page: {e}"
                );
                written.push((sh.region.base, sh.addr_of(high)));
            }
            let mut todo: Vec<usize> = Vec::new();
            {
                let mut t = sh.cache.lock();
                for &(a, b) in &written {
                    for p in sh.page_of(a)..sh.page_of(b).min(high) {
                        t.set_flag(p, LOGDIRTY, true);
                    }
                }
                for (p, &done) in moved.iter().enumerate() {
                    if !done && t.state(p) == PageState::Resident && t.has_flag(p, LOGDIRTY) {
                        todo.push(p);
                    }
                }
            }
            if todo.is_empty() {
                break;
            }
            if round >= CUT_ROUNDS_MAX {
                log::warn!(
                    "an epoch cut gave up chasing writers after {CUT_ROUNDS_MAX} rounds; {} pages are copied while they may change",
                    todo.len()
                );
                for p in todo {
                    cut.copied.push((p, copy_page(sh, p)));
                    moved[p] = true;
                }
                break;
            }
            for p in &todo {
                moved[*p] = true;
            }
            move_pages(sh, &todo, &mut cut, &mut buf, &mut faults);
        }
        // Classify the rest of the dirty pages and clear their flags.
        {
            let mut t = sh.cache.lock();
            // Moved pages are out of the region until put back (by a fault or by the
            // flusher after the cut).
            for &p in &cut.moved {
                t.set_flag(p, LOGDIRTY, false);
                t.set_flag(p, SNAP, true);
            }
            for (p, _) in &cut.copied {
                t.set_flag(*p, LOGDIRTY, false);
            }
            for (p, &done) in moved.iter().enumerate() {
                if done || !t.has_flag(p, LOGDIRTY) {
                    continue;
                }
                match t.state(p) {
                    PageState::Evicted => {
                        t.set_flag(p, LOGHOLD, true);
                        cut.evicted.push((p, t.crc(p), t.version(p)));
                    }
                    PageState::Absent => cut.zeros.push(p),
                    // Changed, then lost: no epoch can hold it; the flag stays until the
                    // program frees the page (it then becomes a zero record).
                    PageState::Poisoned => {
                        cut.lost.push(p);
                        continue;
                    }
                    // Nothing is in transit while the gate is closed; a page that is, keeps
                    // its flag for the next epoch.
                    _ => continue,
                }
                t.set_flag(p, LOGDIRTY, false);
            }
        }
        // The snapshot is complete: it can be written while the pages go back.
        frozen = Arc::new(std::mem::take(&mut cut));
        on_frozen(Arc::clone(&frozen));
        if !faults.is_empty() {
            sh.defer(faults);
            sh.kick.signal();
        }
    }
    // Faults are served again (a thread that touches a moved page gets it back at once); the
    // flusher stays inside the gate until every moved page is back, so that a fork never
    // copies a heap with pages missing.
    let pass = sh.gate.open_and_enter();
    (frozen, pass)
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
    for (first, n) in page_runs(todo) {
        let dst = snapshot(sh).base + first * PAGE_SIZE;
        assert!(
            dst + n * PAGE_SIZE <= snapshot(sh).end(),
            "the snapshot area covers the heap"
        );
        let mut stuck = super::evict::Stuck::<0>::new();
        // SAFETY: the gate is closed and `events` held for writing, so no handler installs and
        // no discard runs; a thread that touches a moved page waits for the cut. Snapshot
        // slots are never reused within a cut (slot = page) and were emptied after the last.
        unsafe { super::evict::move_out(sh, dst, sh.addr_of(first), n, &mut stuck) };
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
                fault::pump_events_locked(sh, buf, faults);
                let mut one = super::evict::Stuck::<0>::new();
                // SAFETY: as for the run above; this page's slot is still empty.
                unsafe { super::evict::move_out(sh, d, src, 1, &mut one) };
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
    // SAFETY: the page is present in the region (a resident page of the heap), which stays
    // mapped; reading it races only with the program's own writes, which is the documented
    // weakness of this fallback.
    unsafe {
        std::ptr::copy_nonoverlapping(sh.addr_of(page) as *const u8, b.as_mut_ptr(), PAGE_SIZE)
    };
    b
}

/// Step 4: every moved page that no fault has put back yet goes back now, a run at a time
/// (`fault::install_from_snapshot`: write-protected, skipping pages discarded meanwhile).
fn copy_back(sh: &Shared, cut: &Cut) {
    for (first, n) in page_runs(&cut.moved) {
        let mut p = first;
        while p < first + n {
            let run = {
                let mut t = sh.cache.lock();
                let end = (p + COPY_BACK_PAGES).min(first + n);
                let start = (p..end)
                    .find(|&q| fault::snapshot_run_len(&t, q, 1) == 1)
                    .unwrap_or(end);
                let len = fault::snapshot_run_len(&t, start, end - start);
                fault::claim_snapshot(&mut t, start, len);
                p = start + len;
                (start, len)
            };
            if run.1 > 0 {
                fault::install_from_snapshot(sh, run.0, run.1);
            }
        }
    }
}

/// Runs of consecutive pages in a sorted list: `(first, count)`.
fn page_runs(pages: &[usize]) -> impl Iterator<Item = (usize, usize)> + '_ {
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

/// Appends the cut as one epoch. The evicted pages are read back from the store first, so that
/// a store that fails leaves nothing of the epoch in the log when their first chunk fails.
fn append_cut(
    sh: &Shared,
    writer: &mut LogWriter,
    cut: &Cut,
    origin: EpochOrigin,
    buf: &mut fault::PageBuf,
) -> Result<u64, AppendError> {
    let mut epoch = writer.begin_epoch_as(origin).map_err(AppendError::Log)?;
    // Evicted pages, read back from the store and checked against their checksums.
    for chunk in cut.evicted.chunks(STORE_READ_PAGES) {
        read_back(sh, chunk, buf)?;
        let pages: Vec<EpochPage<'_>> = chunk
            .iter()
            .enumerate()
            .map(|(i, &(p, _, _))| EpochPage {
                page: p as u64,
                data: Some(buf.page(i)),
            })
            .collect();
        epoch.add(&pages).map_err(AppendError::Log)?;
    }
    // Resident pages, from the snapshot area.
    for chunk in cut.moved.chunks(APPEND_PAGES) {
        let pages: Vec<EpochPage<'_>> = chunk
            .iter()
            .map(|&p| EpochPage {
                page: p as u64,
                data: Some(snapshot_page(sh, p)),
            })
            .collect();
        epoch.add(&pages).map_err(AppendError::Log)?;
    }
    let copied: Vec<EpochPage<'_>> = cut
        .copied
        .iter()
        .map(|(p, b)| EpochPage {
            page: *p as u64,
            data: Some(b),
        })
        .collect();
    epoch.add(&copied).map_err(AppendError::Log)?;
    let zeros: Vec<EpochPage<'_>> = cut
        .zeros
        .iter()
        .map(|&p| EpochPage {
            page: p as u64,
            data: None,
        })
        .collect();
    epoch.add(&zeros).map_err(AppendError::Log)?;
    epoch.commit().map_err(AppendError::Log)
}

/// Reads the held evicted pages `chunk` (page, CRC32C and version of the store's copy) into
/// `buf` and checks each. A read that fails is tried again a few times; a copy that fails its
/// check, or that the store reports lost, is lost (reading it again would give the same bytes).
fn read_back(
    sh: &Shared,
    chunk: &[(usize, u32, u32)],
    buf: &mut fault::PageBuf,
) -> Result<(), AppendError> {
    let mut attempt = 1;
    let mut lost: Vec<usize> = Vec::new();
    loop {
        lost.clear();
        let failure: Option<String> = {
            let mut slices = buf.pages_mut(chunk.len());
            let mut batch: Vec<PageRead<'_>> = slices
                .iter_mut()
                .zip(chunk)
                .map(|(b, &(p, crc, version))| PageRead::new(p as u64, b, crc, version))
                .collect();
            let fetched = sh.store.fetch(&mut batch);
            let injected = match &sh.readback_faults {
                Some(faults) => faults.after_read(&mut batch),
                None => Ok(()),
            };
            let mut unread = false;
            for r in &batch {
                match r.outcome {
                    Outcome::Done => {}
                    Outcome::Failed(FailureKind::Lost) => lost.push(r.page as usize),
                    Outcome::Failed(_) | Outcome::Pending => unread = true,
                }
            }
            unread.then(|| match injected.and(fetched) {
                Err(e) => e.to_string(),
                Ok(()) => "the store left a page unread".to_string(),
            })
        };
        let Some(e) = failure else {
            // Every page was read, or is lost.
            break;
        };
        STATS.add(Counter::FetchErrors, 1);
        if attempt >= STORE_READ_ATTEMPTS_MAX {
            return Err(AppendError::StoreRead(format!(
                "{} pages from the page at {:#x}, {attempt} attempts: {e}",
                chunk.len(),
                sh.addr_of(chunk[0].0)
            )));
        }
        log::warn!(
            "reading {} evicted pages back from the store for the log failed (attempt {attempt} of {STORE_READ_ATTEMPTS_MAX}): {e}",
            chunk.len()
        );
        attempt += 1;
        super::sleep_ms(STORE_READ_RETRY_MS);
    }
    lost.extend(
        chunk
            .iter()
            .enumerate()
            .filter(|&(i, &(p, crc, _))| !lost.contains(&p) && crc32c::crc32c(buf.page(i)) != crc)
            .map(|(_, &(p, _, _))| p)
            .collect::<Vec<usize>>(),
    );
    if lost.is_empty() {
        Ok(())
    } else {
        lost.sort_unstable();
        Err(AppendError::Lost(lost))
    }
}

fn snapshot_page(sh: &Shared, slot: usize) -> &[u8] {
    assert!((slot + 1) * PAGE_SIZE <= snapshot(sh).len);
    // SAFETY: the slot lies inside the snapshot mapping and holds a page moved there by this
    // cut (only moved slots are listed); only the flusher thread touches the snapshot area.
    unsafe {
        std::slice::from_raw_parts(
            (snapshot(sh).base + slot * PAGE_SIZE) as *const u8,
            PAGE_SIZE,
        )
    }
}

/// After an epoch: compacts the log once it is larger than `LEGO_LOG_MAX` (by default a
/// multiple of the heap's live size).
fn maybe_compact(sh: &Shared, writer: &mut LogWriter, settings: &LogSettings) {
    let limit = log_limit(sh, settings);
    if writer.log_bytes() <= limit {
        return;
    }
    match writer.compact_within(limit) {
        Ok(epoch) => {
            STATS.add(Counter::LogCompactions, 1);
            log::info!(
                "the log outgrew {limit} bytes: compacted into a checkpoint at epoch {epoch}, now {} bytes",
                writer.log_bytes()
            );
        }
        Err(e) => {
            report("compacting the log", &crate::logging::error_chain(&e));
        }
    }
}

/// The size of the log's current generation above which it is compacted: `LEGO_LOG_MAX`, or a
/// multiple of the heap's live size (the previous generation, kept for recovery, is not
/// counted: the directory holds up to about twice this).
fn log_limit(sh: &Shared, settings: &LogSettings) -> u64 {
    settings.log_max_bytes.unwrap_or_else(|| {
        let live = {
            let t = sh.cache.lock();
            (0..t.high())
                .filter(|&p| t.state(p) != PageState::Absent)
                .count() as u64
        };
        (live * PAGE_SIZE as u64 * LOG_MAX_LIVE_MULTIPLE).max(LOG_MAX_BYTES_FLOOR)
    })
}

fn snapshot(sh: &Shared) -> crate::region::Region {
    sh.snapshot
        .expect("the snapshot area exists when the heap has a log")
}
