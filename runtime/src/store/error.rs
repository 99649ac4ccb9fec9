//! [`StoreError`]: the page stores' one error type, the same for every backend. Each error
//! names the backend (as its `describe` line begins: `file:/tmp/lego-123-abcdef`) and, where
//! there is one, the page; [`StoreError::kind`] tells the caller what it can do.

use thiserror::Error;

use crate::config::FaultOp;
use crate::PAGE_SIZE;

/// What a caller can do about a failed page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// It may work if tried again, or from another copy (a timeout, an interrupted or failed
    /// I/O, a full or unreachable server).
    Transient,
    /// No copy has the page any more (or none that matches its checksum and version): the
    /// content is gone. Report it; never guess.
    Lost,
    /// The request or the configuration is wrong (a page outside the store, a bad buffer, a
    /// backend that refuses the operation): trying again cannot help.
    Refused,
}

impl FailureKind {
    /// The kind of an I/O failure with this errno. Errors that say the request itself is
    /// wrong are refusals; everything else (`EIO`, `ENOSPC`, `EAGAIN`, timeouts, resets) may
    /// pass, so it is transient: the pager tries again a bounded number of times.
    pub fn of_errno(errno: Option<i32>) -> FailureKind {
        match errno {
            Some(
                libc::EINVAL
                | libc::EBADF
                | libc::EFAULT
                | libc::EPERM
                | libc::EACCES
                | libc::EROFS
                | libc::EOPNOTSUPP
                | libc::ENOSYS
                | libc::EFBIG
                | libc::EOVERFLOW,
            ) => FailureKind::Refused,
            _ => FailureKind::Transient,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Transient => "transient",
            FailureKind::Lost => "lost",
            FailureKind::Refused => "refused",
        }
    }
}

impl std::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The store operation an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOp {
    Fetch,
    Store,
    Discard,
}

impl StoreOp {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreOp::Fetch => "fetching",
            StoreOp::Store => "storing",
            StoreOp::Discard => "discarding",
        }
    }
}

impl std::fmt::Display for StoreOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The source of an error, whatever the backend's own error type.
pub type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors of the page stores.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The backend could not be set up (a directory, a file, a connection).
    #[error("{backend}: {what} failed")]
    Open {
        backend: String,
        what: String,
        #[source]
        source: Source,
    },
    /// The heap cannot be held by this backend.
    #[error("{backend}: a heap of {heap_bytes} bytes cannot be held: it must be positive and below 2^63 bytes")]
    HeapSize { backend: String, heap_bytes: u64 },
    /// A page index beyond the heap.
    #[error("{backend}: page {page} is outside the store, which holds {pages} pages")]
    PageOutOfRange {
        backend: String,
        page: u64,
        pages: u64,
    },
    /// A buffer of the wrong size or alignment.
    #[error("{backend}: the buffer for page {page} is {len} bytes at address {addr:#x}; it must be exactly {PAGE_SIZE} bytes and {PAGE_SIZE}-aligned")]
    BadBuffer {
        backend: String,
        page: u64,
        len: usize,
        addr: usize,
    },
    /// An operation on a page failed.
    #[error("{backend}: {op} page {page} failed ({kind})")]
    Io {
        backend: String,
        op: StoreOp,
        page: u64,
        kind: FailureKind,
        #[source]
        source: Source,
    },
    /// The copy read does not match what the page was stored with.
    #[error("{backend}: the copy of page {page} does not match what was stored (CRC32C {found:#010x}, expected {expected:#010x} for version {version})")]
    Mismatch {
        backend: String,
        page: u64,
        found: u32,
        expected: u32,
        version: u32,
    },
    /// Every page layer of a file store is frozen for a forked child or inherited from the
    /// parent, and no more can be made: nothing can be written until a child's generation
    /// ends (see `store/file/layers.rs`).
    #[error("{backend}: all {layers} page layers are frozen for forked children or inherited from the parent, so no page can be written until a child exits")]
    LayersFull { backend: String, layers: usize },
    /// The backend cannot serve a forked child the pages the parent had evicted at the fork.
    #[error("{backend}: this store cannot serve a forked child its pages, so the child must be paged in before the fork")]
    ForkUnsupported { backend: String },
    /// A failure injected by [`super::FaultyStore`] (`LEGO_FAULT_INJECT`).
    #[error("injected fault: {op} of page {page} failed (LEGO_FAULT_INJECT)", op = op_name(*op))]
    Injected {
        op: FaultOp,
        page: u64,
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    /// What the caller can do about it.
    pub fn kind(&self) -> FailureKind {
        match self {
            StoreError::Open { .. }
            | StoreError::HeapSize { .. }
            | StoreError::PageOutOfRange { .. }
            | StoreError::BadBuffer { .. }
            | StoreError::ForkUnsupported { .. } => FailureKind::Refused,
            StoreError::Io { kind, .. } => *kind,
            StoreError::LayersFull { .. } => FailureKind::Transient,
            StoreError::Mismatch { .. } => FailureKind::Lost,
            StoreError::Injected { source, .. } => FailureKind::of_errno(source.raw_os_error()),
        }
    }

    /// The page the error is about, if it is about one.
    pub fn page(&self) -> Option<u64> {
        match self {
            StoreError::PageOutOfRange { page, .. }
            | StoreError::BadBuffer { page, .. }
            | StoreError::Io { page, .. }
            | StoreError::Mismatch { page, .. }
            | StoreError::Injected { page, .. } => Some(*page),
            StoreError::Open { .. }
            | StoreError::HeapSize { .. }
            | StoreError::LayersFull { .. }
            | StoreError::ForkUnsupported { .. } => None,
        }
    }

    /// The errno behind the error, if there is one (what an injected fault carries, too).
    pub fn errno(&self) -> Option<i32> {
        match self {
            StoreError::Open { source, .. } | StoreError::Io { source, .. } => errno_of(&**source),
            StoreError::Injected { source, .. } => source.raw_os_error(),
            StoreError::HeapSize { .. }
            | StoreError::PageOutOfRange { .. }
            | StoreError::BadBuffer { .. }
            | StoreError::Mismatch { .. }
            | StoreError::LayersFull { .. }
            | StoreError::ForkUnsupported { .. } => None,
        }
    }
}

/// The errno of a source error: an `std::io::Error`'s, or an [`crate::io::IoError`]'s.
fn errno_of(source: &(dyn std::error::Error + 'static)) -> Option<i32> {
    if let Some(e) = source.downcast_ref::<std::io::Error>() {
        return e.raw_os_error();
    }
    if let Some(e) = source.downcast_ref::<crate::io::IoError>() {
        return e.errno();
    }
    source.source().and_then(errno_of)
}

/// The store operation's name as the error messages and `describe` show it.
pub(crate) fn op_name(op: FaultOp) -> &'static str {
    match op {
        FaultOp::Fetch => "fetch",
        FaultOp::Store => "store",
        FaultOp::ReadBack => "readback",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_follow_the_errno() {
        assert_eq!(
            FailureKind::of_errno(Some(libc::EIO)),
            FailureKind::Transient
        );
        assert_eq!(
            FailureKind::of_errno(Some(libc::ENOSPC)),
            FailureKind::Transient
        );
        assert_eq!(
            FailureKind::of_errno(Some(libc::ETIMEDOUT)),
            FailureKind::Transient
        );
        assert_eq!(
            FailureKind::of_errno(Some(libc::EINVAL)),
            FailureKind::Refused
        );
        assert_eq!(FailureKind::of_errno(None), FailureKind::Transient);
    }

    #[test]
    fn messages_name_the_backend_and_the_page() {
        let e = StoreError::Io {
            backend: "file:/tmp/lego-1-abcdef".into(),
            op: StoreOp::Fetch,
            page: 42,
            kind: FailureKind::Transient,
            source: Box::new(std::io::Error::from_raw_os_error(libc::EIO)),
        };
        assert_eq!(
            e.to_string(),
            "file:/tmp/lego-1-abcdef: fetching page 42 failed (transient)"
        );
        assert_eq!(e.errno(), Some(libc::EIO));
        assert_eq!(e.page(), Some(42));
        assert_eq!(e.kind(), FailureKind::Transient);
        let m = StoreError::Mismatch {
            backend: "memory".into(),
            page: 7,
            found: 1,
            expected: 2,
            version: 3,
        };
        assert_eq!(m.kind(), FailureKind::Lost);
        assert!(m.to_string().starts_with("memory: the copy of page 7"));
    }
}
