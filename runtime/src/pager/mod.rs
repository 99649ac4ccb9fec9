//! The pager: the threads that turn userfaultfd events into cache and store work, and the
//! [`Runtime`] handle that the preload library starts and stops.
//!
//! Threads: one fault handler per CPU (pinned to it, all reading the one userfaultfd), one
//! evictor that keeps the resident set between the watermarks, and, when the heap has a log,
//! the flusher and the log writer that cut and append its epochs (`epoch.rs`).
//!
//! The rules that make it correct (see `docs/DESIGN.md`):
//! - Installing a page (`UFFDIO_COPY`) happens with the `events` lock held for reading, and
//!   reading events happens with it held for writing, together with applying the non-fault
//!   events (`REMOVE`, `UNMAP`, `REMAP`) to the page table. So a program's `madvise` is never
//!   undone by a concurrent install: either the install comes first and the `madvise` zaps it,
//!   or the `REMOVE` is in the table first and the install skips the page.
//! - Eviction takes a page out with `UFFDIO_MOVE`, which is atomic for the program: a write
//!   either lands before the move (and is in the copy written back) or faults after it (and
//!   waits until the page is back). Dirty pages are found with `PAGEMAP_SCAN` over
//!   asynchronously write-protected pages, and checked against the stored checksum.
//! - A fault on a page in transit is not answered by the handler that reads it: the owner of the
//!   transit wakes the range when it is done, and the thread faults again if it must.
//! - A page whose content cannot be fetched is poisoned: the faulting thread gets `SIGBUS`.

mod epoch;
mod evict;
mod fault;
mod gate;
mod readahead;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use thiserror::Error;

use crate::cache::{Cache, CacheError, PageState, IMAGE, LOGDIRTY, LOGHOLD, REMOVED, SNAP, STORED};
use crate::config::{Config, LogSync};
use crate::log::image::{ImageError, ImageReader};
use crate::log::{LogError, LogWriter, RegionInfo, SyncMode, WriterOptions};
use crate::region::{self, Region, RegionError};
use crate::stats::Stats;
use crate::store::{self, DiscardQueue, PageStore, StoreError};
use crate::uffd::{self, Features, Kick, PagemapScanner, UffdError, Userfault};
use crate::PAGE_SIZE;

use gate::Gate;

pub use epoch::EpochError;

/// Counters of this process's runtime (one runtime per process).
pub static STATS: Stats = Stats::new();

/// Most pages filled with zeros by one fault: fresh heap is touched in order, and one
/// `UFFDIO_COPY` of a run of 256 pages costs about as much per page as the kernel's own
/// anonymous fault (see MACHINE.md).
pub const ZERO_RUN_PAGES_MAX: usize = 256;
/// Most evicted pages fetched by one fault (the read-ahead window of a sequential stream).
pub const FETCH_RUN_PAGES_MAX: usize = 512;
/// Pages of a fetched run read and installed before the faulting thread is woken.
pub const FETCH_FIRST_CHUNK_PAGES: usize = 16;
/// Pages of a fetched run read and installed at once after the first chunk.
pub const FETCH_CHUNK_PAGES: usize = 64;
/// Most events read from the userfaultfd at once.
pub const EVENTS_PER_READ_MAX: usize = 64;
/// Most pages one eviction batch moves out (the evictor's staging area holds that many).
pub const EVICT_BATCH_PAGES_MAX: usize = 1024;
/// Store runs [`Shared::forget_range`] collects before it drops them.
const FORGET_RUNS_MAX: usize = 64;
/// Pages [`Runtime::discard`] remembers that would not move; more are given back as a range.
const DISCARD_STUCK_MAX: usize = 64;
/// Most pages [`Runtime::discard`] moves out at once (the size of its scratch area).
const DISCARD_CHUNK_PAGES: usize = 1024;
/// How long a handler waits for the evictor to make room before it checks again.
const ROOM_WAIT_MS: u64 = 20;
/// How long an idle handler sleeps in `poll` before it polls again. The handlers never stop:
/// other libraries' destructors may touch the heap after lego's exit handler has run.
const IDLE_POLL_MS: i32 = 200;

const _: () = assert!(
    FETCH_FIRST_CHUNK_PAGES <= FETCH_CHUNK_PAGES && FETCH_CHUNK_PAGES <= FETCH_RUN_PAGES_MAX
);

/// Errors of starting the runtime.
#[derive(Debug, Error)]
pub enum PagerError {
    #[error(transparent)]
    Uffd(#[from] UffdError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Region(#[from] RegionError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("cannot start the runtime thread {name}: {source}")]
    Thread {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot map the {what} (a few pages of address space)")]
    Buffer {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(
        "this kernel offers userfaultfd features {offered:#x} but lego needs asynchronous \
         write-protection, PAGEMAP_SCAN and UFFDIO_MOVE (Linux 6.8 or newer)"
    )]
    KernelTooOld { offered: u64 },
}

/// Features lego asks for on the heap's userfaultfd.
const HEAP_FEATURES: u64 = uffd::sys::UFFD_FEATURE_PAGEFAULT_FLAG_WP
    | uffd::sys::UFFD_FEATURE_WP_ASYNC
    | uffd::sys::UFFD_FEATURE_WP_UNPOPULATED
    | uffd::sys::UFFD_FEATURE_EVENT_REMOVE
    | uffd::sys::UFFD_FEATURE_EVENT_UNMAP
    | uffd::sys::UFFD_FEATURE_EVENT_REMAP
    | uffd::sys::UFFD_FEATURE_THREAD_ID
    | uffd::sys::UFFD_FEATURE_POISON
    | uffd::sys::UFFD_FEATURE_MOVE;

/// How the epoch cut keeps the program's allocator still: `hold` takes every lock of the user
/// heap (it may fault, so it runs before the cut closes the gate) and `release` gives them
/// back (only if `hold` answered true). A cut then never catches the allocator halfway
/// through a locked operation.
#[derive(Clone, Copy)]
pub struct Quiesce {
    pub hold: fn() -> bool,
    pub release: fn(),
}

/// The state shared by the runtime's threads.
pub(crate) struct Shared {
    pub(crate) region: Region,
    pub(crate) uffd: Userfault,
    /// A second userfaultfd, with no events, for the evictor's staging area: pages moved there
    /// are dropped with `MADV_DONTNEED`, which on the heap's userfaultfd would send a `REMOVE`.
    pub(crate) staging_uffd: Userfault,
    pub(crate) staging: Region,
    /// Where [`Runtime::discard`] moves the pages it takes out (on `staging_uffd` too).
    pub(crate) scratch: Mutex<Region>,
    pub(crate) scanner: PagemapScanner,
    pub(crate) cache: Cache,
    /// Readers: installs. Writer: reading events and applying the non-fault ones.
    pub(crate) events: RwLock<()>,
    /// Signalled (with the cache lock) when resident pages were freed.
    pub(crate) room: Condvar,
    /// Signalled (with the cache lock) when the evictor should run.
    pub(crate) evict_wanted: Condvar,
    /// Handlers and the evictor pass it to do work; `fork` closes it meanwhile.
    pub(crate) gate: Gate,
    pub(crate) store: Box<dyn PageStore>,
    /// Discards on their way to the store, sent by the `lego-discard` thread.
    pub(crate) discards: DiscardQueue,
    pub(crate) zeros: Region,
    pub(crate) high_pages: usize,
    pub(crate) low_pages: usize,
    pub(crate) evict_batch_pages: usize,
    /// Set while write-backs fail: handlers then stop waiting for room (the cache overflows
    /// rather than the program stalling forever).
    pub(crate) store_failing: AtomicBool,
    /// Read-ahead streams (locked inside the cache lock, never the other way round).
    pub(crate) readahead: Mutex<readahead::Readahead>,
    /// Faults read by a thread that was not going to handle them (see `pump_for_install`).
    pub(crate) deferred: Mutex<Vec<usize>>,
    /// Wakes the handlers when `deferred` gets work.
    pub(crate) kick: Kick,
    /// The restore image pages marked `IMAGE` are read from (`LEGO_RESTORE`).
    pub(crate) image: Option<ImageReader>,
    /// The durable heap's requests and progress, when it has a log.
    pub(crate) durable: Option<epoch::Durable>,
    /// Where an epoch cut moves dirty pages (on `staging_uffd`, as large as the heap), when
    /// the heap has a log.
    pub(crate) snapshot: Option<Region>,
    pub(crate) quiesce: Option<Quiesce>,
    /// Failures injected into the epoch's read-back of evicted pages
    /// (`LEGO_FAULT_INJECT=readback:...`, a testing hook).
    pub(crate) readback_faults: Option<store::FaultBudget>,
    /// The buffer `fork` pages evicted pages in through (mapped at start).
    pub(crate) fork_buf: Mutex<fault::PageBuf>,
}

impl Shared {
    pub(crate) fn page_of(&self, addr: usize) -> usize {
        (addr - self.region.base) / PAGE_SIZE
    }

    pub(crate) fn addr_of(&self, page: usize) -> usize {
        self.region.base + page * PAGE_SIZE
    }

    pub(crate) fn defer(&self, faults: Vec<usize>) {
        self.deferred
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(faults);
    }

    pub(crate) fn take_deferred(&self) -> Vec<usize> {
        std::mem::take(&mut *self.deferred.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub(crate) fn publish_resident(&self, resident: usize) {
        STATS.set_resident_pages(resident as u64);
    }

    /// Applies a `REMOVE`/`UNMAP`/`REMAP`-away of `[start, end)`, or a discard: the program no
    /// longer has those pages' content. Called with the `events` lock held for writing.
    ///
    /// It may run on a program thread ([`Runtime::discard`]) holding the runtime's locks, so it
    /// must not allocate, log or touch thread-locals: any of those may touch the thread's TLS
    /// vector, which glibc keeps in the managed heap, and a fault there could never be served.
    /// The table is therefore updated a chunk at a time, with the store's copies of each chunk
    /// dropped in between from a fixed-size list.
    pub(crate) fn forget_range(&self, start: usize, end: usize) {
        let start = start.max(self.region.base);
        let end = end.min(self.region.end());
        if start >= end {
            return;
        }
        let last = self.page_of(end - 1);
        let mut p = self.page_of(start);
        let mut count = 0;
        while p <= last {
            let mut runs = Runs::<FORGET_RUNS_MAX>::new();
            {
                let mut t = self.cache.lock();
                while p <= last && !runs.is_full() {
                    let state = t.state(p);
                    if state != PageState::Absent {
                        // The log records the page as zeros in the next epoch.
                        t.set_flag(p, LOGDIRTY, true);
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
                self.publish_resident(t.resident());
            }
            for &(first, pages) in runs.as_slice() {
                count += pages;
                self.discards.push(first, pages);
            }
        }
        STATS.add(crate::stats::Counter::PagesDiscarded, count);
        self.room.notify_all();
    }
}

/// `(first page, count)` runs of pages in a fixed array: filled where nothing may allocate
/// (see [`Shared::forget_range`]).
pub(crate) struct Runs<const N: usize> {
    runs: [(u64, u64); N],
    len: usize,
}

impl<const N: usize> Runs<N> {
    pub(crate) fn new() -> Self {
        Runs {
            runs: [(0, 0); N],
            len: 0,
        }
    }

    /// True when a page that does not extend the last run would not fit.
    pub(crate) fn is_full(&self) -> bool {
        self.len == N
    }

    /// Appends `page`, extending the last run when adjacent. The caller checks
    /// [`Runs::is_full`] first.
    pub(crate) fn push(&mut self, page: u64) {
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

    pub(crate) fn as_slice(&self) -> &[(u64, u64)] {
        &self.runs[..self.len]
    }
}

/// A running pager over one region.
pub struct Runtime {
    shared: Arc<Shared>,
    features: Features,
    handlers: usize,
}

impl Runtime {
    /// Registers `region` with a new userfaultfd, marks the pages already present as resident
    /// (the allocator may have run before the runtime started), opens the store and starts the
    /// threads.
    pub fn start(
        config: &Config,
        region: Region,
        image: Option<ImageReader>,
        quiesce: Option<Quiesce>,
    ) -> Result<Runtime, PagerError> {
        if let Some(thread) = config.spawn_failure {
            crate::threads::fail_spawns_of(thread);
        }
        let offered = Userfault::probe()?;
        let needed = uffd::sys::UFFD_FEATURE_WP_ASYNC
            | uffd::sys::UFFD_FEATURE_MOVE
            | uffd::sys::UFFD_FEATURE_PAGEFAULT_FLAG_WP;
        if !offered.has(needed) {
            return Err(PagerError::KernelTooOld { offered: offered.0 });
        }
        let uffd = Userfault::open(HEAP_FEATURES & offered.0)?;
        let staging_uffd = Userfault::open(0)?;
        let batch = config.evict_batch_pages.clamp(1, EVICT_BATCH_PAGES_MAX);
        let staging = Region::reserve(EVICT_BATCH_PAGES_MAX * PAGE_SIZE, None)?;
        staging_uffd.register(staging.base, staging.len, false)?;
        let scratch = Region::reserve(DISCARD_CHUNK_PAGES * PAGE_SIZE, None)?;
        staging_uffd.register(scratch.base, scratch.len, false)?;
        let zeros = Region::reserve(ZERO_RUN_PAGES_MAX * PAGE_SIZE, None)?;
        let store = store::open(
            &config.backend,
            config.heap_bytes,
            config.fault_injection.as_ref(),
        )?;
        let scanner = PagemapScanner::open()?;
        let region_info = RegionInfo {
            base: region.base as u64,
            len: region.len as u64,
        };
        let writer = match &config.log {
            Some(log) => {
                let options = WriterOptions {
                    sync: match log.sync {
                        LogSync::Fdatasync => SyncMode::Data,
                        LogSync::None => SyncMode::None,
                    },
                    ..WriterOptions::default()
                };
                Some(match &image {
                    Some(img) => LogWriter::resume(&log.dir, region_info, options, img.path())?,
                    None => LogWriter::create(&log.dir, region_info, options)?,
                })
            }
            None => None,
        };
        let snapshot = match &writer {
            Some(_) => {
                let snap = Region::reserve(region.len, None)?;
                staging_uffd.register(snap.base, snap.len, false)?;
                Some(snap)
            }
            None => None,
        };

        let capacity = usize::try_from(config.cache_pages())
            .unwrap_or(usize::MAX)
            .max(1);
        // Start evicting a few batches before the cache is full, so that a fault rarely waits
        // for room; stop a few batches lower, so that the evictor works in large batches.
        let headroom = (2 * batch).min(capacity / 4);
        let high = capacity - headroom;
        let low = high.saturating_sub((2 * batch).min(capacity / 4));

        uffd.register(region.base, region.len, true)?;
        let cache = Cache::new(region.pages(), capacity)?;
        {
            let mut t = cache.lock();
            for part in written_parts(&region) {
                region::for_each_present_page(region.base + part.start, part.len(), |p| {
                    t.set_state(part.start / PAGE_SIZE + p, PageState::Resident);
                });
            }
            // A restored heap: the image's pages are evicted, and read from the image when
            // touched. The log already has them (a resumed log starts with the image).
            if let Some(img) = &image {
                let mut count = 0u64;
                img.for_each_data_run(|first, n| {
                    for p in first..first + n {
                        let p = p as usize;
                        if t.state(p) == PageState::Absent {
                            t.set_state(p, PageState::Evicted);
                            t.set_flag(p, IMAGE, true);
                            t.note_used(p);
                            count += 1;
                        }
                    }
                });
                log::info!(
                    "restoring {count} pages of epoch {} from {}",
                    img.header().epoch,
                    img.path().display()
                );
            }
            STATS.set_resident_pages(t.resident() as u64);
        }

        let shared = Arc::new(Shared {
            region,
            uffd,
            staging_uffd,
            staging,
            scratch: Mutex::new(scratch),
            scanner,
            cache,
            events: RwLock::new(()),
            room: Condvar::new(),
            evict_wanted: Condvar::new(),
            gate: Gate::new(),
            store,
            discards: DiscardQueue::new(),
            zeros,
            high_pages: high,
            low_pages: low,
            evict_batch_pages: batch,
            store_failing: AtomicBool::new(false),
            readahead: Mutex::new(readahead::Readahead::new()),
            deferred: Mutex::new(Vec::new()),
            kick: Kick::new().map_err(|source| PagerError::Thread {
                name: "eventfd".into(),
                source,
            })?,
            image,
            durable: config.log.clone().map(epoch::Durable::new),
            snapshot,
            quiesce,
            readback_faults: config
                .fault_injection
                .filter(|p| p.op == crate::config::FaultOp::ReadBack)
                .map(store::FaultBudget::new),
            fork_buf: Mutex::new(fault::PageBuf::new(FETCH_CHUNK_PAGES).map_err(|source| {
                PagerError::Buffer {
                    what: "buffer fork pages evicted pages in through".into(),
                    source,
                }
            })?),
        });

        let cpus = online_cpus();
        let handlers = config.handler_threads.max(1);
        for i in 0..handlers {
            let sh = Arc::clone(&shared);
            let fetch =
                fault::PageBuf::new(FETCH_CHUNK_PAGES).map_err(|source| PagerError::Buffer {
                    what: format!("fetch buffer of the fault handler lego-fault-{i}"),
                    source,
                })?;
            let cpu = if handlers <= cpus {
                Some(i % cpus)
            } else {
                None
            };
            crate::threads::spawn(&format!("lego-fault-{i}"), move || {
                fault::handler_loop(&sh, cpu, fetch)
            })
            .map_err(|source| PagerError::Thread {
                name: format!("lego-fault-{i}"),
                source,
            })?;
        }
        let sh = Arc::clone(&shared);
        crate::threads::spawn("lego-discard", move || {
            sh.discards.run(&*sh.store);
        })
        .map_err(|source| PagerError::Thread {
            name: "lego-discard".into(),
            source,
        })?;
        let sh = Arc::clone(&shared);
        crate::threads::spawn("lego-evict", move || evict::evictor_loop(&sh)).map_err(
            |source| PagerError::Thread {
                name: "lego-evict".into(),
                source,
            },
        )?;
        if let Some(writer) = writer {
            let sh = Arc::clone(&shared);
            crate::threads::spawn("lego-flush", move || epoch::flusher_loop(sh, writer)).map_err(
                |source| PagerError::Thread {
                    name: "lego-flush".into(),
                    source,
                },
            )?;
        }
        let features = shared.uffd.features();
        log::info!(
            "userfaultfd features {:#x}; dirty tracking: asynchronous write-protect + PAGEMAP_SCAN; eviction: UFFDIO_MOVE; {} handler threads; cache {} pages (evict above {}, down to {}); store {}",
            features.0,
            handlers,
            capacity,
            high,
            low,
            shared.store.describe()
        );
        Ok(Runtime {
            shared,
            features,
            handlers,
        })
    }

    /// Gives the pages of `[addr, addr+len)` (page-aligned, in the region) back: afterwards
    /// they read as zeros, their store copies are dropped, and no install can bring old content
    /// back. The allocator calls this for freed runs instead of `madvise(MADV_DONTNEED)`,
    /// which would make the caller wait for a fault handler to read a `REMOVE` event: here the
    /// calling thread takes the pages out itself with `UFFDIO_MOVE` into a scratch area that
    /// it then drops.
    ///
    /// It runs on the program's thread with the runtime's locks held, so nothing in it may
    /// allocate, log or touch thread-locals (see [`Shared::forget_range`]).
    pub fn discard(&self, addr: usize, len: usize) {
        let sh = &self.shared;
        let start = addr.max(sh.region.base);
        let end = (addr + len).min(sh.region.end());
        if start >= end {
            return;
        }
        let mut stuck = evict::Stuck::<DISCARD_STUCK_MAX>::new();
        {
            // Under the write lock no install is in flight, and every later one sees the
            // pages as removed (or, for pages that turn `Absent`, finds them missing and
            // zero-fills them, which is what they read as from now on).
            let _w = sh.events.write().unwrap_or_else(|e| e.into_inner());
            sh.forget_range(start, end);
            let scratch = sh.scratch.lock().unwrap_or_else(|e| e.into_inner());
            let mut at = start;
            while at < end {
                let pages = ((end - at) / PAGE_SIZE).min(DISCARD_CHUNK_PAGES);
                // SAFETY: the program gave these pages back (the allocator freed them), the
                // write lock keeps every install out, and the scratch area is behind its
                // mutex, emptied after each chunk.
                unsafe {
                    evict::move_out(sh, scratch.base, at, pages, &mut stuck);
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

    /// `lego_checkpoint`: returns once every write made before the call is in a committed
    /// epoch of the log, with that epoch's number.
    pub fn checkpoint(&self) -> Result<u64, EpochError> {
        match &self.shared.durable {
            Some(d) => d.checkpoint(),
            None => Err(EpochError::NoLog),
        }
    }

    /// At a normal exit: removes the store's private directory (its file is already
    /// unlinked; the store keeps working for late faults).
    pub fn at_exit(&self) {
        self.shared.store.at_exit();
    }

    /// What the runtime runs with, for the stats report.
    pub fn describe(&self) -> Vec<(String, String)> {
        vec![
            ("uffd_features".into(), format!("{:#x}", self.features.0)),
            ("dirty_tracking".into(), "wp_async+pagemap_scan".to_string()),
            ("handler_threads".into(), self.handlers.to_string()),
            (
                "cache_pages".into(),
                self.shared.cache.capacity_pages().to_string(),
            ),
            ("backend".into(), self.shared.store.describe()),
            (
                "discard_ranges_dropped".into(),
                self.shared.discards.dropped().to_string(),
            ),
        ]
    }

    /// Before `fork`: stops eviction and fault handling, and brings every evicted page back, so
    /// that the child (whose copy of the region is ordinary memory, no longer served by lego)
    /// sees exactly the parent's heap. The cache may exceed its size until the fork is over.
    pub fn prepare_fork(&self) {
        self.shared.gate.close();
        let mut buf = self
            .shared
            .fork_buf
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        fault::page_in_everything(&self.shared, &mut buf);
    }

    /// In the parent after `fork`: resumes fault handling and eviction.
    pub fn after_fork_parent(&self) {
        self.shared.gate.open();
        let _t = self.shared.cache.lock();
        self.shared.evict_wanted.notify_all();
    }
}

/// The parts of `region` (byte ranges from its start) that may hold pages already: those the
/// allocator may have written when the region holds a heap, none when even its first page was
/// never touched (a region reserved for a restore), the whole region otherwise. Scanning only
/// those keeps the start of a 4 TiB heap as quick as a small one's. Call after the region is
/// registered: pages touched from then on fault, so none can appear unseen above the top read
/// here.
fn written_parts(region: &Region) -> [std::ops::Range<usize>; 2] {
    if !region::page_present(region.base) {
        return [0..0, 0..0];
    }
    // SAFETY: the region's first page is mapped and present, so reading it cannot fault.
    match unsafe { crate::heap::Heap::written_ranges(region.base as *const u8) } {
        Some(parts) => parts.map(|r| r.start.min(region.len)..r.end.min(region.len)),
        None => [0..region.len, 0..0],
    }
}

fn online_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Pins the calling thread to `cpu`; failure (a restricted cpuset) only costs speed.
pub(crate) fn pin_to_cpu(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

pub(crate) fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}
