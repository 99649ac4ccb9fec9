//! Page stores: where evicted pages live while they are not resident. [`PageStore`] is the one
//! interface the pager uses; [`open`] builds the backend named by the configuration.
//!
//! Backends: [`file::FileStore`] (the embedded default: a private O_DIRECT file written through
//! io_uring), [`memcached::MemcachedStore`] (a pool of memcached servers, sharded) and
//! [`faulty::FaultyStore`] (wraps another store and fails on purpose, for tests).
//! Stores that are remote, replicated or coded implement the same trait, stacked over others.
//!
//! # The seam
//! - Batches: one call moves up to a whole fault or eviction batch, sorted by page index, and a
//!   backend turns runs of consecutive pages into as few I/Os (or requests) as it can.
//!   [`PageStore::fetch_all`] hands several batches at once, so a backend keeps them all in
//!   flight instead of one synchronous round per batch.
//! - Per-page outcomes: every page of a batch ends with its own [`Outcome`]. One bad page does
//!   not fail its neighbours, and each failure says what the caller can do
//!   ([`FailureKind`]): `Transient` (try again, or another copy), `Lost` (no copy has it:
//!   report it, never guess), `Refused` (the request or the configuration is wrong). A call
//!   returns `Ok` exactly when every page is [`Outcome::Done`]; otherwise its `Err` describes
//!   the first failed page and the outcomes say which pages failed. A store decides only the
//!   pages whose outcome is still [`Outcome::Pending`] and leaves the others as they are, so a
//!   layer above it (a fault injector, a set of replicas) can settle some pages itself and
//!   hand the rest down, or hand down again only the pages that failed.
//! - Checksums and versions: a write carries the page's CRC32C and version (a per-page
//!   counter kept by the pager, never 0 for a stored page); a read carries the ones the pager
//!   expects. A read is `Done` only if the bytes match that checksum; a copy that does not is
//!   not served (`Lost` when the store has no other). A store that can hold older copies (a
//!   replica that lagged) uses the version to choose; one that overwrites in place may ignore
//!   it. The pager checks the checksum again at the boundary.
//!
//! # Where a backend runs, and what it may do there
//! - `fetch` runs on the fault handler threads (the faulting program thread waits for it),
//!   `store` on the evictor, `fetch_all` on either, `discard` through
//!   [`discard::DiscardQueue`] only: on the `lego-discard` thread, or on the evictor when it
//!   drains the queue before a write-back; never on a program thread, never under the pager's
//!   `events` lock, never at the same time as a `store` of the same pages. Every method may be called from several threads at once.
//! - A backend may block (I/O, a network round trip) but must bound every wait (a timeout
//!   turns into `Transient`). It may allocate only through Rust's allocator, which the preload
//!   library points at its internal heap, never at the managed one; it never calls C
//!   allocation. It may log (rate-limited on the fault path).
//! - It addresses pages by their index in the heap region, never by address, and keeps no page
//!   content in memory of its own beyond what is in flight (that is the cache's job).

pub mod discard;
mod error;
pub mod faulty;
pub mod file;
pub mod memcached;
pub mod parity;
pub mod pool;

#[cfg(test)]
mod conformance;
#[cfg(test)]
pub(crate) mod memory;

use std::sync::Arc;

use crate::config::{BackendSpec, FaultPlan, PoolSettings};
use crate::seal::{SealKey, Sealer};
use crate::PAGE_SIZE;

pub use discard::DiscardQueue;
pub use error::{FailureKind, StoreError, StoreOp};
pub use faulty::{FaultBudget, FaultyStore};
pub use file::{FileOptions, FileStore};

/// [`PAGE_SIZE`] as a `u64`, for offset arithmetic.
pub(crate) const PAGE_BYTES: u64 = PAGE_SIZE as u64;

/// What became of one page of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Not handled yet (what a batch starts with; a call never leaves a page so).
    Pending,
    /// Read (and matching its checksum) or written.
    Done,
    /// Failed, and what the caller can do about it.
    Failed(FailureKind),
}

impl Outcome {
    pub fn is_done(self) -> bool {
        self == Outcome::Done
    }
}

/// One page to read from the store. `page` is the page index within the heap region
/// (address = base + page * PAGE_SIZE); `buf` is `PAGE_SIZE` bytes, `PAGE_SIZE`-aligned;
/// `crc` and `version` are what the page was last stored with.
pub struct PageRead<'a> {
    pub page: u64,
    pub buf: &'a mut [u8],
    pub crc: u32,
    pub version: u32,
    /// Set by the store.
    pub outcome: Outcome,
}

impl<'a> PageRead<'a> {
    pub fn new(page: u64, buf: &'a mut [u8], crc: u32, version: u32) -> PageRead<'a> {
        PageRead {
            page,
            buf,
            crc,
            version,
            outcome: Outcome::Pending,
        }
    }
}

/// A page a read-ahead names ([`PageStore::read_ahead`]): what a later [`PageRead`] of it
/// will ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageWant {
    pub page: u64,
    pub crc: u32,
    pub version: u32,
}

/// One page to write to the store; same rules as [`PageRead`], with the CRC32C of `buf` and
/// the version this write gives the page.
pub struct PageWrite<'a> {
    pub page: u64,
    pub buf: &'a [u8],
    pub crc: u32,
    pub version: u32,
    /// The writer checked that the log holds exactly this content, committed (see
    /// [`PageStore::log_copy_now`]): a store may keep fewer copies of it. False by default.
    pub log_held: bool,
    /// Set by the store.
    pub outcome: Outcome,
}

impl<'a> PageWrite<'a> {
    /// A write of `buf` as `version` of `page` (the checksum is computed here).
    pub fn new(page: u64, buf: &'a [u8], version: u32) -> PageWrite<'a> {
        PageWrite {
            page,
            buf,
            crc: crc32c::crc32c(buf),
            version,
            log_held: false,
            outcome: Outcome::Pending,
        }
    }

    /// A write whose checksum the caller computed already (asserted in debug builds).
    pub fn with_crc(page: u64, buf: &'a [u8], crc: u32, version: u32) -> PageWrite<'a> {
        debug_assert_eq!(crc, crc32c::crc32c(buf), "the checksum of page {page}");
        PageWrite {
            page,
            buf,
            crc,
            version,
            log_held: false,
            outcome: Outcome::Pending,
        }
    }
}

/// A backend that holds evicted pages (see the module documentation for the rules).
pub trait PageStore: Send + Sync {
    /// Reads every page of the batch and sets each one's outcome.
    fn fetch(&self, batch: &mut [PageRead<'_>]) -> Result<(), StoreError>;

    /// Reads several batches, all in flight together where the backend can; the result is
    /// the first failure of any. The default reads them one after another.
    fn fetch_all(&self, batches: &mut [&mut [PageRead<'_>]]) -> Result<(), StoreError> {
        let mut first_error = None;
        for batch in batches.iter_mut() {
            if let Err(e) = self.fetch(batch) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// A hint: the caller's next fetch will ask for exactly `pages`, in this order, while it
    /// works on something else first. A remote store may send the requests now, so that the
    /// fetch only reads the replies. A fetch that asks for anything else is read as usual, and
    /// what a fetch gets this way is checked like any other read. The default does nothing.
    fn read_ahead(&self, _pages: &[PageWant]) {}

    /// Writes every page of the batch durably enough to be fetched back by this process (no
    /// fsync needed) and sets each one's outcome. A page that failed may or may not hold the
    /// new content; its previous version may be gone.
    fn store(&self, batch: &mut [PageWrite<'_>]) -> Result<(), StoreError>;

    /// Forgets pages [first, first+count): their content is no longer needed (freed memory).
    /// Best effort, but must not touch other pages. Called only through the discard queue (on
    /// `lego-discard`, or the evictor), never concurrently with a `store` of the same pages.
    fn discard(&self, first: u64, count: u64) -> Result<(), StoreError>;

    /// One line for logs and stats, e.g. "file:/tmp/lego-1234-abcd (O_DIRECT, io_uring)".
    fn describe(&self) -> String;

    /// Called once when the process exits normally: removes what only this process uses on
    /// disk (the store stays usable: late faults from other libraries' destructors may still
    /// fetch pages).
    fn at_exit(&self) {}

    /// Whether the store may keep a single copy of a page somewhere that can fail on its own
    /// (a pool with one copy, or an adaptive pool short of memory): with a log, the pager
    /// then keeps an index of the log's pages, hands it to [`PageStore::log_stands_in`],
    /// and reads a page the store cannot give from the log. False by default.
    fn wants_log_copy(&self) -> bool {
        false
    }

    /// Whether, now, the pager should evict only pages whose content the log holds (the log
    /// is their second copy). Asked before each eviction batch; the pages of such a batch are
    /// written with [`PageWrite::log_held`], and the store relies on that flag only (the
    /// answer may change between the question and the write-back). By default, what
    /// [`PageStore::wants_log_copy`] says.
    fn log_copy_now(&self) -> bool {
        self.wants_log_copy()
    }

    /// With [`PageStore::wants_log_copy`] and a log: which pages the log holds, for the
    /// store to keep fewer copies of them. Called once, before the first write-back. The
    /// default ignores it.
    fn log_stands_in(&self, _log: Arc<dyn LogCopies>) {}

    /// Whether every read this store marks `Done` was checked against the checksum asked
    /// for (the pager then trusts it instead of checking each page a second time). False by
    /// default.
    fn verifies_reads(&self) -> bool {
        false
    }

    /// Statistics of the store itself, as (name, value) pairs for the report at exit (a pool's
    /// failovers and servers); none by default.
    fn report(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    /// Before a `fork` whose child will read its evicted pages from this store (through
    /// [`PageStore::fork_child`]): keeps every copy the store holds now as it is, for as long
    /// as the generation this starts lives, while later writes and discards go elsewhere.
    /// Called while no fetch or store is in flight (a discard may be); every call that
    /// returns true is followed by one [`PageStore::fork_parent`]. False (nothing changed)
    /// when the store cannot keep the copies: the pager then pages the child in. False by
    /// default.
    fn fork_freeze(&self) -> bool {
        false
    }

    /// In the parent after the `fork` that [`PageStore::fork_freeze`] prepared: `hup` is the
    /// read end of a pipe whose write ends only the child and its descendants hold, and the
    /// generation lives until it reports `POLLHUP` (the child exited, was killed or
    /// `exec`'d); `None` (the fork failed) ends the generation now. The default does nothing.
    fn fork_parent(&self, _hup: Option<std::os::fd::OwnedFd>) {}

    /// In the child after the `fork` (one thread, its memory a copy of the parent's at the
    /// fork, this object included): a new store that reads every page with the content the
    /// store held at the fork and writes the child's own pages somewhere of its own. The
    /// inherited object is never used or dropped again in the child. By default the backend
    /// cannot serve a child ([`StoreError::ForkUnsupported`]).
    fn fork_child(&self) -> Result<Box<dyn PageStore>, StoreError> {
        Err(StoreError::ForkUnsupported {
            backend: self.describe(),
        })
    }
}

/// What the log holds, as a store sees it: whether its newest record of `page` has exactly
/// the content whose CRC32C is `crc` (then the page can be read back from the log while the
/// process lives, whatever happens to the store's copies).
pub trait LogCopies: Send + Sync {
    fn holds(&self, page: u64, crc: u32) -> bool;
}

// Boxed stores (what `store::open` returns) can be wrapped too.
impl PageStore for Box<dyn PageStore> {
    fn fetch(&self, batch: &mut [PageRead<'_>]) -> Result<(), StoreError> {
        (**self).fetch(batch)
    }

    fn fetch_all(&self, batches: &mut [&mut [PageRead<'_>]]) -> Result<(), StoreError> {
        (**self).fetch_all(batches)
    }

    fn read_ahead(&self, pages: &[PageWant]) {
        (**self).read_ahead(pages)
    }

    fn store(&self, batch: &mut [PageWrite<'_>]) -> Result<(), StoreError> {
        (**self).store(batch)
    }

    fn discard(&self, first: u64, count: u64) -> Result<(), StoreError> {
        (**self).discard(first, count)
    }

    fn at_exit(&self) {
        (**self).at_exit();
    }

    fn report(&self) -> Vec<(String, String)> {
        (**self).report()
    }

    fn wants_log_copy(&self) -> bool {
        (**self).wants_log_copy()
    }

    fn log_copy_now(&self) -> bool {
        (**self).log_copy_now()
    }

    fn log_stands_in(&self, log: Arc<dyn LogCopies>) {
        (**self).log_stands_in(log)
    }

    fn verifies_reads(&self) -> bool {
        (**self).verifies_reads()
    }

    fn describe(&self) -> String {
        (**self).describe()
    }

    fn fork_freeze(&self) -> bool {
        (**self).fork_freeze()
    }

    fn fork_parent(&self, hup: Option<std::os::fd::OwnedFd>) {
        (**self).fork_parent(hup)
    }

    fn fork_child(&self) -> Result<Box<dyn PageStore>, StoreError> {
        (**self).fork_child()
    }
}

/// Opens the store the configuration names, sized for a heap of `heap_bytes`, wrapped in a
/// [`FaultyStore`] when a fault plan is given.
///
/// `key` seals the values of a pool (`LEGO_KEY_FILE`); the configuration gives one only with a
/// memcached backend.
pub fn open(
    spec: &BackendSpec,
    pool: &PoolSettings,
    heap_bytes: u64,
    faults: Option<&FaultPlan>,
    key: Option<&SealKey>,
) -> Result<Box<dyn PageStore>, StoreError> {
    let store: Box<dyn PageStore> = match spec {
        BackendSpec::File { dir } => {
            assert!(
                key.is_none(),
                "the configuration seals only a pool's values"
            );
            Box::new(FileStore::open(dir, heap_bytes)?)
        }
        BackendSpec::Memcached { servers } => {
            Box::new(open_memcached_pool(servers, pool, heap_bytes, key)?)
        }
    };
    Ok(match faults {
        Some(plan) => Box::new(FaultyStore::new(store, *plan)),
        None => store,
    })
}

/// A pool over the memcached servers `servers`, every one of them answering and refusing to
/// evict, for a new heap (a random heap id); its values sealed under `key` if one is given.
pub fn open_memcached_pool(
    servers: &[String],
    settings: &PoolSettings,
    heap_bytes: u64,
    key: Option<&SealKey>,
) -> Result<pool::PoolStore, StoreError> {
    open_memcached_pool_as(
        servers,
        settings,
        heap_bytes,
        memcached::random_heap_id(),
        key,
    )
}

/// [`open_memcached_pool`] for the heap `heap_id` (keys `lego:HEAPID:PAGE`).
pub fn open_memcached_pool_as(
    servers: &[String],
    settings: &PoolSettings,
    heap_bytes: u64,
    heap_id: u64,
    key: Option<&SealKey>,
) -> Result<pool::PoolStore, StoreError> {
    // One sealer for every server: its nonces are unique across all of them.
    let sealer = key.map(|k| Arc::new(Sealer::new(k, heap_id)));
    let mut members: Vec<Box<dyn pool::member::Member>> = Vec::with_capacity(servers.len());
    for server in servers {
        let member =
            memcached::MemcachedServer::open(server, heap_id, heap_bytes, settings.timeout_ms)?;
        members.push(Box::new(match &sealer {
            Some(s) => member.sealed(std::sync::Arc::clone(s)),
            None => member,
        }));
    }
    pool::PoolStore::new(
        format!("memcached://{}", servers.join(",")),
        members,
        heap_bytes,
        *settings,
    )
}

/// The pool of a heap seeded from a log (`lego replay --to`), for its restore, in this
/// order: every server must answer and refuse to evict (opened without touching the lease);
/// the heap's lease must be a seeded one wherever it is there (a heap another process runs,
/// ran or is restoring is refused: its pages may have changed) and at least one server must
/// hold it; then the seeded leases are claimed by compare and swap
/// ([`memcached::claim::RestoreClaim`]), so that of two restores of one pool image exactly one
/// gets here. Nothing has changed on any server when an earlier step refuses; from the claim
/// on, the returned [`RestoredPool`] (or the claim, if the pool cannot be made) gives the heap
/// back when dropped before [`RestoredPool::take_over`]. The pool's thread renews no lease
/// until then. The caller adopts the pool image's copies ([`pool::PoolStore::adopt`]).
pub fn open_restored_pool(
    servers: &[String],
    settings: &PoolSettings,
    heap_bytes: u64,
    heap_id: u64,
    key: Option<&SealKey>,
) -> Result<RestoredPool, StoreError> {
    let name = format!("memcached://{}", servers.join(","));
    // One sealer for every server: its nonces are unique across all of them.
    let sealer = key.map(|k| Arc::new(Sealer::new(k, heap_id)));
    let mut members: Vec<Box<dyn pool::member::Member>> = Vec::with_capacity(servers.len());
    for server in servers {
        let member = memcached::MemcachedServer::open_unleased(
            server,
            heap_id,
            heap_bytes,
            settings.timeout_ms,
        )?;
        members.push(Box::new(match &sealer {
            Some(s) => member.sealed(std::sync::Arc::clone(s)),
            None => member,
        }));
    }
    let claim = memcached::claim::RestoreClaim::take(servers, settings.timeout_ms, heap_id)
        .map_err(|e| StoreError::Open {
            backend: name.clone(),
            what: format!("restoring the seeded heap {heap_id:016x}"),
            source: Box::new(e),
        })?;
    let pool = pool::PoolStore::new_restoring(name, members, heap_bytes, *settings)?;
    Ok(RestoredPool {
        pool: std::sync::Arc::new(pool),
        claim,
    })
}

/// A seeded heap's pool being restored ([`open_restored_pool`]): the pool, and the claim that
/// gives the heap back (its seeded lease again) if the restore does not go through.
pub struct RestoredPool {
    pool: std::sync::Arc<pool::PoolStore>,
    claim: memcached::claim::RestoreClaim,
}

impl RestoredPool {
    /// The pool (shared, so that the pager's store and this guard both hold it).
    pub fn pool(&self) -> &std::sync::Arc<pool::PoolStore> {
        &self.pool
    }

    /// The restore's start is through: the lease becomes this process's, with a time to
    /// live, on every server, and the pool's thread renews it. On an error the guard is still
    /// armed: dropping it gives the heap back.
    pub fn take_over(&mut self) -> Result<(), StoreError> {
        // Whichever servers the take-over reaches, a give-back seals them all again.
        self.claim.touch_all();
        self.pool.take_over_leases()
    }

    /// Dropping the guard no longer gives the heap back; [`RestoredPool::give_back`] still
    /// does (a start that fails after the runtime's threads run: the heap cannot be opened).
    pub fn disarm(&mut self) {
        self.claim.disarm();
    }

    /// Gives the heap back now: the pool's thread stops, and every lease this process changed
    /// is the seeded one again. Returns how many servers were sealed again, or which failed.
    pub fn give_back(&mut self) -> Result<usize, String> {
        self.pool.stop_renewals();
        self.claim.give_back()
    }
}

impl Drop for RestoredPool {
    fn drop(&mut self) {
        // Before the claim's own drop gives the heap back: no renewal after it.
        if self.claim.is_armed() {
            self.pool.stop_renewals();
        }
    }
}

/// Marks every page of a write batch that is not yet decided with `outcome`.
pub(crate) fn settle_writes(batch: &mut [PageWrite<'_>], outcome: Outcome) {
    for w in batch.iter_mut().filter(|w| w.outcome == Outcome::Pending) {
        w.outcome = outcome;
    }
}

/// Marks `r` lost (its copy holds content whose checksum is `found`) and returns the error
/// that says so.
pub(crate) fn lost_read(backend: &str, r: &mut PageRead<'_>, found: u32) -> StoreError {
    r.outcome = Outcome::Failed(FailureKind::Lost);
    StoreError::Mismatch {
        backend: backend.to_string(),
        page: r.page,
        found,
        expected: r.crc,
        version: r.version,
    }
}

/// Checks every read that came back against its checksum: a matching one is `Done`, the others
/// `Lost` (this store has no other copy). Returns the first mismatch, if any.
pub(crate) fn verify_reads(backend: &str, batch: &mut [PageRead<'_>]) -> Result<(), StoreError> {
    let mut first_error = None;
    for r in batch.iter_mut().filter(|r| r.outcome == Outcome::Pending) {
        let found = crc32c::crc32c(r.buf);
        if found == r.crc {
            r.outcome = Outcome::Done;
        } else {
            let e = lost_read(backend, r, found);
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Checks that `page` lies in a store of `pages` pages and that its buffer is one whole,
/// page-aligned page (what O_DIRECT needs).
pub(crate) fn check_page(
    backend: &str,
    page: u64,
    pages: u64,
    buf: &[u8],
) -> Result<(), StoreError> {
    if page >= pages {
        return Err(StoreError::PageOutOfRange {
            backend: backend.to_string(),
            page,
            pages,
        });
    }
    let addr = buf.as_ptr() as usize;
    if buf.len() == PAGE_SIZE && addr.is_multiple_of(PAGE_SIZE) {
        Ok(())
    } else {
        Err(StoreError::BadBuffer {
            backend: backend.to_string(),
            page,
            len: buf.len(),
            addr,
        })
    }
}

/// Refuses every pending read that [`check_page`] refuses (its outcome becomes
/// `Failed(Refused)`); returns the first such error.
pub(crate) fn refuse_bad_reads<'b, 'a: 'b>(
    backend: &str,
    pages: u64,
    reads: impl Iterator<Item = &'b mut PageRead<'a>>,
) -> Option<StoreError> {
    let mut first_error = None;
    for r in reads.filter(|r| r.outcome == Outcome::Pending) {
        if let Err(e) = check_page(backend, r.page, pages, r.buf) {
            r.outcome = Outcome::Failed(FailureKind::Refused);
            first_error.get_or_insert(e);
        }
    }
    first_error
}

/// [`refuse_bad_reads`] for writes.
pub(crate) fn refuse_bad_writes(
    backend: &str,
    pages: u64,
    batch: &mut [PageWrite<'_>],
) -> Option<StoreError> {
    let mut first_error = None;
    for w in batch.iter_mut().filter(|w| w.outcome == Outcome::Pending) {
        if let Err(e) = check_page(backend, w.page, pages, w.buf) {
            w.outcome = Outcome::Failed(FailureKind::Refused);
            first_error.get_or_insert(e);
        }
    }
    first_error
}

/// The pages a discard of `[first, first+count)` covers in a store of `pages` pages: `None`
/// for an empty one, clipped at the end (pages past it were never stored), refused when it
/// starts past the end.
pub(crate) fn discard_range(
    backend: &str,
    first: u64,
    count: u64,
    pages: u64,
) -> Result<Option<std::ops::Range<u64>>, StoreError> {
    if count == 0 {
        return Ok(None);
    }
    if first >= pages {
        return Err(StoreError::PageOutOfRange {
            backend: backend.to_string(),
            page: first,
            pages,
        });
    }
    Ok(Some(first..first.saturating_add(count).min(pages)))
}
