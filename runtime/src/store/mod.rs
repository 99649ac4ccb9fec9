//! Page stores: where evicted pages live while they are not resident. [`PageStore`] is the one
//! interface the pager uses; [`open`] builds the backend named by the configuration.
//!
//! Backends: [`file::FileStore`] (the embedded default: a private O_DIRECT file written through
//! io_uring) and [`faulty::FaultyStore`] (wraps another store and fails on purpose, for tests).
//! A memcached pool will implement the same trait later, which is why the trait is small and
//! batch-oriented: one call moves up to a whole fault or eviction batch, and a backend is
//! expected to turn runs of consecutive pages into as few I/Os as it can.
//!
//! Rules: a store addresses pages by their index in the heap region, never by address; it
//! keeps no page content in memory of its own (that is the cache's job); it never calls C
//! allocation (it runs inside the process whose malloc is replaced); it is used from several
//! handler threads at once.

pub mod faulty;
pub mod file;

use std::path::PathBuf;

use thiserror::Error;

use crate::config::{BackendSpec, FaultOp, FaultPlan};
use crate::io::IoError;
use crate::PAGE_SIZE;

pub use faulty::{FaultBudget, FaultyStore};
pub use file::{FileOptions, FileStore};

/// [`PAGE_SIZE`] as a `u64`, for offset arithmetic.
pub(crate) const PAGE_BYTES: u64 = PAGE_SIZE as u64;

/// One page to read from the store. `page` is the page index within the heap region
/// (address = base + page * PAGE_SIZE); `buf` is `PAGE_SIZE` bytes, `PAGE_SIZE`-aligned.
pub struct PageRead<'a> {
    pub page: u64,
    pub buf: &'a mut [u8],
}

/// One page to write to the store; same rules as [`PageRead`].
pub struct PageWrite<'a> {
    pub page: u64,
    pub buf: &'a [u8],
}

/// A backend that holds evicted pages. Batches of any length are accepted (the pager sends up
/// to a fault batch or `config::EVICT_BATCH_PAGES_MAX` pages); they should be sorted by page
/// index, since runs of consecutive pages are what a backend merges into single I/Os.
pub trait PageStore: Send + Sync {
    /// Reads every page of the batch. All-or-error: on Err no buffer content may be trusted.
    fn fetch(&self, batch: &mut [PageRead<'_>]) -> Result<(), StoreError>;
    /// Writes every page of the batch durably enough to be fetched back by this process (no
    /// fsync needed). On Err, any page of the batch may or may not have been written.
    fn store(&self, batch: &[PageWrite<'_>]) -> Result<(), StoreError>;
    /// Forgets pages [first, first+count): their content is no longer needed (freed memory).
    /// Cheap, best effort, but must not corrupt other pages.
    fn discard(&self, first: u64, count: u64) -> Result<(), StoreError>;
    /// One line for logs and stats, e.g. "file:/tmp/lego-1234-abcd (O_DIRECT, io_uring)".
    fn describe(&self) -> String;
    /// Called once when the process exits normally: removes what only this process uses on
    /// disk (the store stays usable: late faults from other libraries' destructors may still
    /// fetch pages).
    fn at_exit(&self) {}
}

/// Opens the store the configuration names, sized for a heap of `heap_bytes`, wrapped in a
/// [`FaultyStore`] when a fault plan is given.
pub fn open(
    spec: &BackendSpec,
    heap_bytes: u64,
    faults: Option<&FaultPlan>,
) -> Result<Box<dyn PageStore>, StoreError> {
    let store: Box<dyn PageStore> = match spec {
        BackendSpec::File { dir } => Box::new(FileStore::open(dir, heap_bytes)?),
    };
    Ok(match faults {
        Some(plan) => Box::new(FaultyStore::new(store, *plan)),
        None => store,
    })
}

/// Errors of the page stores. Each names the file and the page involved.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The private directory could not be created.
    #[error("creating a private store directory in {dir} failed (LEGO_BACKEND=file:DIR must name a writable directory)")]
    CreateDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The page file could not be created, opened or sized.
    #[error("preparing the page file {path} ({what}) failed")]
    CreateFile {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The heap size is not a whole number of pages, or too large for a file.
    #[error("a heap of {heap_bytes} bytes cannot be backed by a page file: it it must be positive and below 2^63 bytes")]
    HeapSize { heap_bytes: u64 },
    /// io_uring exists but could not be set up (a refusal falls back to pread/pwrite instead).
    #[error("setting up io_uring for the page file {path} failed")]
    Ring {
        path: PathBuf,
        #[source]
        source: IoError,
    },
    /// A page index beyond the heap.
    #[error("page {page} is outside the page file {path}, which holds {pages} pages")]
    PageOutOfRange {
        path: PathBuf,
        page: u64,
        pages: u64,
    },
    /// A buffer of the wrong size or alignment.
    #[error("the buffer for page {page} is {len} bytes at address {addr:#x}; it must be exactly {PAGE_SIZE} bytes and {PAGE_SIZE}-aligned")]
    BadBuffer { page: u64, len: usize, addr: usize },
    /// Reading pages failed.
    #[error("fetching page {page} from {path} failed")]
    Fetch {
        path: PathBuf,
        page: u64,
        #[source]
        source: IoError,
    },
    /// Writing pages failed.
    #[error("storing page {page} to {path} failed")]
    Store {
        path: PathBuf,
        page: u64,
        #[source]
        source: IoError,
    },
    /// Punching the hole for discarded pages failed.
    #[error("discarding pages {first}..{end} of {path} failed", end = first.saturating_add(*count))]
    Discard {
        path: PathBuf,
        first: u64,
        count: u64,
        #[source]
        source: std::io::Error,
    },
    /// A failure injected by [`FaultyStore`].
    #[error("injected fault: {op} of page {page} failed (LEGO_FAULT_INJECT)", op = op_name(*op))]
    Injected {
        op: FaultOp,
        page: u64,
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    /// The errno behind the error, if there is one (what an injected fault carries, too).
    pub fn errno(&self) -> Option<i32> {
        match self {
            StoreError::CreateDir { source, .. }
            | StoreError::CreateFile { source, .. }
            | StoreError::Discard { source, .. }
            | StoreError::Injected { source, .. } => source.raw_os_error(),
            StoreError::Ring { source, .. }
            | StoreError::Fetch { source, .. }
            | StoreError::Store { source, .. } => source.errno(),
            StoreError::HeapSize { .. }
            | StoreError::PageOutOfRange { .. }
            | StoreError::BadBuffer { .. } => None,
        }
    }
}

/// The store operation's name as the error messages and `describe` show it.
pub(crate) fn op_name(op: FaultOp) -> &'static str {
    match op {
        FaultOp::Fetch => "fetch",
        FaultOp::Store => "store",
        FaultOp::ReadBack => "readback",
    }
}

/// Checks that a page buffer is one whole, page-aligned page (what O_DIRECT needs).
pub(crate) fn check_buffer(page: u64, buf: &[u8]) -> Result<(), StoreError> {
    let addr = buf.as_ptr() as usize;
    if buf.len() == PAGE_SIZE && addr.is_multiple_of(PAGE_SIZE) {
        Ok(())
    } else {
        Err(StoreError::BadBuffer {
            page,
            len: buf.len(),
            addr,
        })
    }
}
