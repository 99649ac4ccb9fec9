//! The pager: the threads that turn userfaultfd events into cache and store work, and the
//! [`Runtime`] handle that the preload library starts and stops.
//!
//! Threads: one fault handler per CPU (pinned to it, all reading the one userfaultfd), one
//! evictor that keeps the resident set between the watermarks, and, when the heap has a log,
//! the flusher and the log writer that cut and append its epochs (`epoch/`).
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
//!
//! The parts, each using only those listed after it (imports go down):
//! - `start.rs`: [`Runtime::start`]: opens everything, builds [`Shared`], starts the threads;
//! - `fork.rs`: `fork` support: a served fork (the `lego-fork` thread reads the `FORK` event,
//!   serves the child until its own runtime runs and hands it its userfaultfd, `handover.rs`)
//!   or a paged-in one (every evicted page brought back, the gate held);
//! - `child.rs`: a served fork's child runtime, over the table it inherited;
//! - `fault.rs`: the fault handler threads: what to do about a fault (zero run, fetch, poison,
//!   snapshot copy-back, later), claiming the run, prefetch;
//! - `evict.rs`: the evictor thread;
//! - `epoch/`: the durable heap: the flusher (`mod.rs`), the cut (`cut.rs`), the snapshot and
//!   its copy-back (`snapshot.rs`), appending to the log (`append.rs`), compaction
//!   (`compact.rs`);
//! - `fetch.rs`: reading a claimed run of evicted pages from the store or the image, checking
//!   and installing it;
//! - `restore.rs`: the pager's side of `LEGO_RESTORE` (image pages marked at start, read on
//!   fault);
//! - `install.rs`: the install protocol (`UFFDIO_COPY` under the events lock, `EAGAIN`,
//!   outcomes into the table, poison);
//! - `events.rs`: the kernel side ([`events::Kernel`]): reading events and applying them,
//!   faults deferred to the handlers;
//! - `mapped.rs`: served mappings' protections ([`Runtime::protect`], `PINNED`) and marks;
//! - `discard.rs`: [`Runtime::discard`] and `forget_range` (pages the program gave back);
//! - `moving.rs`: `UFFDIO_MOVE` out of the heap, checked page by page;
//! - `buf.rs`, `gate.rs`, `readahead.rs`: a page buffer, the fork gate, the read-ahead streams.
//!
//! [`Shared`] is the threads' common state, grouped by the part that owns it: each group's
//! fields are private to its module where no other part needs them.

mod buf;
mod child;
mod discard;
mod epoch;
mod events;
mod evict;
mod fault;
mod fetch;
mod fork;
mod gate;
mod handover;
mod install;
mod mapped;
mod moving;
mod readahead;
mod restore;
mod start;

use std::sync::{Arc, Condvar, MutexGuard};
use std::time::Duration;

use thiserror::Error;

use crate::cache::{Cache, CacheError, Table, LOGHOLD, STORED};
use crate::log::image::ImageError;
use crate::log::LogError;
use crate::region::RegionError;
use crate::stats::Stats;
use crate::store::{DiscardQueue, PageStore, StoreError};
use crate::uffd::{Features, UffdError};

use gate::Gate;

pub use epoch::EpochError;
pub use fork::ForkedChild;
pub use restore::{open_restore, RestoreError, RestoreFrom};

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
    #[error(transparent)]
    PoolImage(#[from] crate::log::pool_image::PoolImageError),
    #[error(
        "this kernel offers userfaultfd features {offered:#x} but lego needs asynchronous \
         write-protection, PAGEMAP_SCAN and UFFDIO_MOVE (Linux 6.8 or newer)"
    )]
    KernelTooOld { offered: u64 },
}

/// How the epoch cut keeps the program's allocator still: `hold` takes every lock of the user
/// heap (it may fault, so it runs before the cut closes the gate) and `release` gives them
/// back (only if `hold` answered true). A cut then never catches the allocator halfway
/// through a locked operation.
#[derive(Clone, Copy)]
pub struct Quiesce {
    pub hold: fn() -> bool,
    pub release: fn(),
}

/// The state shared by the runtime's threads, by the part that owns it.
pub(crate) struct Shared {
    /// The heap's region and userfaultfds, the `events` lock, deferred faults (`events.rs`).
    kernel: events::Kernel,
    /// The page table and the waits that go with its lock.
    cache: Residency,
    /// Handlers and the evictor pass it to do work; `fork` and the epoch cut close it.
    gate: Gate,
    store: Box<dyn PageStore>,
    /// Discards on their way to the store, sent by the `lego-discard` thread (and drained by
    /// the evictor before each write-back).
    discards: DiscardQueue,
    /// What the handlers fill runs from: zeros and the read-ahead streams (`fault.rs`).
    fill: fault::Fill,
    /// The watermarks, the staging area and whether write-backs fail (`evict.rs`).
    evict: evict::Eviction,
    /// Where [`Runtime::discard`] moves pages out (`discard.rs`).
    discard: discard::Scratch,
    /// `fork`: the page-in buffer and what `lego-fork` shares with the forking thread
    /// (`fork.rs`).
    fork: fork::ForkState,
    /// The durable heap (requests, snapshot area, quiesce, read-back faults), when it has a
    /// log (`epoch/`).
    durable: Option<epoch::Durable>,
    /// The image being restored (`LEGO_RESTORE`, `restore.rs`).
    restore: Option<restore::Restore>,
}

impl Shared {
    /// Forgets the store's copy of `page`, which the program dropped, and queues its discard
    /// (unless an epoch still reads it: `release_holds` discards it then).
    fn drop_store_copy(&self, t: &mut Table, page: usize) {
        if t.has_flag(page, STORED) && !t.has_flag(page, LOGHOLD) {
            self.discards.push(page as u64, 1);
        }
        t.forget_stored(page);
    }

    fn page_of(&self, addr: usize) -> usize {
        self.kernel.page_of(addr)
    }

    fn addr_of(&self, page: usize) -> usize {
        self.kernel.addr_of(page)
    }
}

/// The page table behind its lock, with the two conditions waited for on that lock: room in
/// the cache (handlers wait) and a reason to evict (the evictor waits).
struct Residency {
    cache: Cache,
    /// Signalled (with the cache lock) when resident pages were freed.
    room: Condvar,
    /// Signalled (with the cache lock) when the evictor should run.
    evict_wanted: Condvar,
}

impl Residency {
    fn new(cache: Cache) -> Residency {
        Residency {
            cache,
            room: Condvar::new(),
            evict_wanted: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.cache.lock()
    }

    fn capacity_pages(&self) -> usize {
        self.cache.capacity_pages()
    }

    /// Resident pages were freed: wakes the handlers waiting for room.
    fn room_freed(&self) {
        self.room.notify_all();
    }

    /// Waits (with the cache lock, `t`) until room may have been freed, or `timeout`.
    fn wait_for_room<'a>(
        &self,
        t: MutexGuard<'a, Table>,
        timeout: Duration,
    ) -> MutexGuard<'a, Table> {
        self.room
            .wait_timeout(t, timeout)
            .unwrap_or_else(|e| e.into_inner())
            .0
    }

    /// Wakes the evictor.
    fn want_eviction(&self) {
        self.evict_wanted.notify_one();
    }

    /// Wakes the evictor wherever it waits (after a fork, when it may have missed a call).
    fn want_eviction_all(&self) {
        self.evict_wanted.notify_all();
    }

    /// The evictor's wait (with the cache lock, `t`) for a reason to evict, or `timeout`.
    fn wait_eviction_wanted<'a>(
        &self,
        t: MutexGuard<'a, Table>,
        timeout: Duration,
    ) -> MutexGuard<'a, Table> {
        self.evict_wanted
            .wait_timeout(t, timeout)
            .unwrap_or_else(|e| e.into_inner())
            .0
    }
}

/// Publishes the resident count (read with the cache lock) in the stats.
fn publish_resident(resident: usize) {
    STATS.set_resident_pages(resident as u64);
}

/// A running pager over one region.
pub struct Runtime {
    shared: Arc<Shared>,
    features: Features,
    handlers: usize,
    /// A heap restored from a pool image: what gives it back to the pool if the caller
    /// cannot open it after the start ([`Runtime::give_back_restored_heap`]).
    restored: std::sync::Mutex<Option<crate::store::RestoredPool>>,
}

impl Runtime {
    /// The start restored a heap from a pool image, but the caller cannot use it (the heap
    /// cannot be opened, before any of the program ran): gives it back to the pool (its seeded
    /// lease again), so that the pool image can be restored once the cause is fixed. Does
    /// nothing for another start, or a second time. Call only before the process ends.
    pub fn give_back_restored_heap(&self) {
        let taken = self
            .restored
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(mut restored) = taken else {
            return;
        };
        match restored.give_back() {
            Ok(n) => log::warn!(
                "the heap restored from the pool is seeded again on {n} servers and can be \
                 restored from its pool image once the cause is fixed"
            ),
            Err(e) => log::error!(
                "giving the heap restored from the pool back failed ({e}): its lease lapses \
                 and the heap is collected; replay the log again"
            ),
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
        let mut pairs = vec![
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
        ];
        if let Some(d) = &self.shared.durable {
            let (epoch, at_ms, bytes) = d.progress();
            pairs.push(("log_last_epoch".into(), epoch.to_string()));
            pairs.push(("log_last_epoch_unix_ms".into(), at_ms.to_string()));
            pairs.push(("log_bytes".into(), bytes.to_string()));
        }
        pairs.extend(self.shared.store.report());
        pairs
    }
}

/// Pins the calling thread to `cpu`; failure (a restricted cpuset) only costs speed.
fn pin_to_cpu(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}
