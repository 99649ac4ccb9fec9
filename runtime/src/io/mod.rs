//! File I/O for the page stores and the log writer: one io_uring core and the engines on it,
//! plus a plain `preadv`/`pwritev` path ([`sync`]) for kernels or sandboxes that refuse
//! io_uring or lack an operation an engine needs.
//!
//! - [`Ring`] (the page stores): a caller describes a batch as [`ReadOp`]s or [`WriteOp`]s:
//!   each is one file range, filled from or into one or more memory segments (adjacent
//!   segments are merged, so a run of contiguous page buffers becomes a single plain read or
//!   write, anything else a vectored one). Both it and [`sync`] complete the whole batch
//!   before returning: short transfers are resubmitted from where they stopped,
//!   `EINTR`/`EAGAIN` are retried a bounded number of times ([`RETRIES_MAX`]), and the first
//!   hard failure is returned after every I/O already handed to the kernel has completed.
//! - [`SegmentRing`] (the log writer, [`staged`]): writes one file at a time from registered
//!   staging buffers, with writes in flight between calls and linked fdatasyncs.
//!
//! Both engines are built on the same core in `ring.rs`: ring setup, the start-up probe of the
//! operations each engine submits, and `io_uring_enter` with one bound on transient failures
//! ([`ENTER_RETRIES_MAX`]). A ring that cannot be had ([`IoError::Refused`],
//! [`IoError::Unsupported`], [`IoError::Probe`], [`IoError::Setup`]) is reported to the caller,
//! which falls back to [`sync`] with one message saying why. One error type, [`IoError`],
//! covers every engine.
//!
//! Rules: this module knows nothing of pages, stores or the log format; [`Ring`] never keeps
//! a buffer past the call that was given it (the borrows in the ops are the whole safety
//! story of the ring, see [`Ring`]), and [`SegmentRing`] copies what it is given into buffers
//! it owns; nothing here allocates through C (runtime code runs inside the process whose
//! malloc is replaced). The `unsafe` of the stores' and the log's data path lives here.

mod ring;
pub mod staged;
pub mod sync;

pub use ring::Ring;
pub use staged::SegmentRing;

use std::fmt;
use std::marker::PhantomData;
use std::path::PathBuf;

use thiserror::Error;

/// Submission-queue entries of one ring (the completion queue is twice as large, so a full
/// submission queue can never overflow it).
pub const RING_ENTRIES: u32 = 256;

/// Most I/Os one ring keeps in flight at once; a larger batch is fed through in waves.
pub const BATCH_IOS_MAX: usize = 256;

const _: () = assert!(BATCH_IOS_MAX <= RING_ENTRIES as usize);

/// Most memory segments passed to one vectored I/O (Linux `UIO_MAXIOV`); an op with more is
/// transferred in several steps, like a short transfer.
pub const SEGMENTS_PER_IO_MAX: usize = 1024;

/// Most bytes one read or write moves (Linux `MAX_RW_COUNT`, `INT_MAX` rounded down to a page);
/// the kernel would cut a larger transfer short anyway.
pub const TRANSFER_BYTES_MAX: usize = 0x7fff_f000;

/// Consecutive `EINTR`/`EAGAIN` results tolerated for one I/O before it is reported as failed.
pub const RETRIES_MAX: u32 = 64;

/// Consecutive failures of `io_uring_enter` with a transient errno (`EINTR`, `EAGAIN`,
/// `EBUSY`, `ENOMEM`) tolerated before a ring is given up, for every engine.
pub const ENTER_RETRIES_MAX: u32 = 10_000;

/// Errors of the I/O layer, for every engine. Offsets are byte offsets in the file.
#[derive(Debug, Error)]
pub enum IoError {
    /// io_uring is not available to this process (`ENOSYS`, `EPERM`, `EACCES` from
    /// `io_uring_setup`, e.g. `kernel.io_uring_disabled=2` or a seccomp filter); use [`sync`].
    #[error(
        "io_uring is refused by this kernel or its settings (io_uring_setup failed); \
         check the sysctl kernel.io_uring_disabled and any seccomp policy"
    )]
    Refused {
        #[source]
        source: std::io::Error,
    },
    /// io_uring exists but a ring could not be created (for example out of memory or files).
    #[error("creating an io_uring with {entries} entries failed")]
    Setup {
        entries: u32,
        #[source]
        source: std::io::Error,
    },
    /// The kernel's io_uring cannot say which operations it offers (`IORING_REGISTER_PROBE`
    /// arrived in Linux 5.6, with the plain reads and writes the engines use); use [`sync`].
    #[error(
        "io_uring cannot list its operations (IORING_REGISTER_PROBE failed), so this kernel \
         is older than Linux 5.6 or restricts io_uring"
    )]
    Probe {
        #[source]
        source: std::io::Error,
    },
    /// The kernel's io_uring lacks an operation the engine submits; use [`sync`].
    #[error("this kernel's io_uring lacks the operation {opcode} (added in Linux {since})")]
    Unsupported {
        opcode: &'static str,
        since: &'static str,
    },
    /// `io_uring_enter` failed in a way that is not a transient condition, or kept failing
    /// transiently more than [`ENTER_RETRIES_MAX`] times in a row.
    #[error("submitting I/O to or waiting on the io_uring failed")]
    Submit {
        #[source]
        source: std::io::Error,
    },
    /// One I/O of the batch failed with an errno.
    #[error("{dir} of {len} bytes at file offset {offset} failed at offset {at}")]
    Transfer {
        dir: Direction,
        offset: u64,
        len: usize,
        at: u64,
        #[source]
        source: std::io::Error,
    },
    /// One I/O of the batch made no progress: a read hit the end of the file or a write
    /// transferred nothing.
    #[error(
        "{dir} of {len} bytes at file offset {offset} stopped after {done} bytes \
         (end of file or no progress)"
    )]
    Short {
        dir: Direction,
        offset: u64,
        len: usize,
        done: usize,
    },
    /// The op's range does not fit in a file offset (`off_t`).
    #[error("{dir} of {len} bytes at file offset {offset} reaches past the largest file offset")]
    OffsetRange {
        dir: Direction,
        offset: u64,
        len: usize,
    },
    /// A staged write of the file failed with an errno ([`SegmentRing`]).
    #[error("write of {len} bytes at offset {offset} of {} failed after {done} bytes", path.display())]
    FileWrite {
        path: PathBuf,
        offset: u64,
        len: usize,
        done: usize,
        #[source]
        source: std::io::Error,
    },
    /// A staged write of the file transferred nothing ([`SegmentRing`]).
    #[error(
        "write of {len} bytes at offset {offset} of {} stopped after {done} bytes (no progress)",
        path.display()
    )]
    FileNoProgress {
        path: PathBuf,
        offset: u64,
        len: usize,
        done: usize,
    },
    /// The fdatasync of the file failed ([`SegmentRing`]).
    #[error("fdatasync of {} failed", path.display())]
    FileSync {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An earlier write or fdatasync of the file failed; only a new file can be written
    /// ([`SegmentRing`]).
    #[error(
        "an earlier write or fdatasync of {} failed, so what it holds is unknown; \
         only a new segment can be written",
        path.display()
    )]
    FileFailed { path: PathBuf },
    /// A write to an `O_DIRECT` file that does not start and end on a block boundary
    /// ([`SegmentRing`]).
    #[error(
        "O_DIRECT needs offsets and lengths that are multiples of {DIRECT_ALIGN_BYTES} bytes; \
         got {len} bytes at offset {offset} of {}",
        path.display()
    )]
    Unaligned {
        path: PathBuf,
        offset: u64,
        len: usize,
    },
    /// A write or sync without a file started on the ring ([`SegmentRing::start`]).
    #[error("no segment file is open on the log's io_uring")]
    NoFile,
}

impl IoError {
    /// The file offset where the failing I/O stopped, if the error is about one I/O.
    pub fn offset(&self) -> Option<u64> {
        match self {
            IoError::Transfer { at, .. } => Some(*at),
            IoError::Short { offset, done, .. }
            | IoError::FileWrite { offset, done, .. }
            | IoError::FileNoProgress { offset, done, .. } => {
                Some(offset.saturating_add(u64::try_from(*done).unwrap_or(u64::MAX)))
            }
            IoError::OffsetRange { offset, .. } | IoError::Unaligned { offset, .. } => {
                Some(*offset)
            }
            IoError::Refused { .. }
            | IoError::Setup { .. }
            | IoError::Probe { .. }
            | IoError::Unsupported { .. }
            | IoError::Submit { .. }
            | IoError::FileSync { .. }
            | IoError::FileFailed { .. }
            | IoError::NoFile => None,
        }
    }

    /// The errno behind the error, if there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            IoError::Refused { source }
            | IoError::Setup { source, .. }
            | IoError::Probe { source }
            | IoError::Submit { source }
            | IoError::Transfer { source, .. }
            | IoError::FileWrite { source, .. }
            | IoError::FileSync { source, .. } => source.raw_os_error(),
            IoError::Unsupported { .. }
            | IoError::Short { .. }
            | IoError::OffsetRange { .. }
            | IoError::FileNoProgress { .. }
            | IoError::FileFailed { .. }
            | IoError::Unaligned { .. }
            | IoError::NoFile => None,
        }
    }
}

/// For callers that speak `std::io::Result` (the log's storage seam): the kind follows the
/// errno where there is one, and the `IoError` stays the message and source.
impl From<IoError> for std::io::Error {
    fn from(e: IoError) -> std::io::Error {
        use std::io::ErrorKind;
        let kind = match &e {
            IoError::Refused { source }
            | IoError::Setup { source, .. }
            | IoError::Probe { source }
            | IoError::Submit { source }
            | IoError::Transfer { source, .. }
            | IoError::FileWrite { source, .. }
            | IoError::FileSync { source, .. } => source.kind(),
            IoError::Short {
                dir: Direction::Read,
                ..
            } => ErrorKind::UnexpectedEof,
            IoError::Short { .. } | IoError::FileNoProgress { .. } => ErrorKind::WriteZero,
            IoError::OffsetRange { .. } | IoError::Unaligned { .. } => ErrorKind::InvalidInput,
            IoError::Unsupported { .. } => ErrorKind::Unsupported,
            IoError::FileFailed { .. } | IoError::NoFile => ErrorKind::Other,
        };
        std::io::Error::new(kind, e)
    }
}

/// Which way the bytes move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the file into memory.
    Read,
    /// From memory into the file.
    Write,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Read => "read",
            Direction::Write => "write",
        })
    }
}

/// One file range to read, scattered into borrowed buffers in the order they were pushed.
pub struct ReadOp<'a> {
    transfer: Transfer,
    // The op hands raw pointers to the kernel; this borrow keeps every buffer alive and
    // exclusively ours until the op is dropped, which is after the I/O call returned.
    _buffers: PhantomData<&'a mut [u8]>,
}

impl<'a> ReadOp<'a> {
    /// An empty read of the file starting at byte `offset`.
    pub fn new(offset: u64) -> Self {
        ReadOp {
            transfer: Transfer::new(offset),
            _buffers: PhantomData,
        }
    }

    /// Appends `buf` to the range: the op now also reads the next `buf.len()` bytes of the
    /// file into it.
    pub fn push(&mut self, buf: &'a mut [u8]) {
        self.transfer.push(buf.as_mut_ptr(), buf.len());
    }

    /// Bytes this op reads.
    pub fn len(&self) -> usize {
        self.transfer.len
    }

    /// Whether no buffer was pushed.
    pub fn is_empty(&self) -> bool {
        self.transfer.len == 0
    }

    /// Memory segments after merging adjacent buffers (one means a plain, non-vectored read).
    pub fn segments(&self) -> usize {
        self.transfer.segs.len()
    }
}

/// One file range to write, gathered from borrowed buffers in the order they were pushed.
pub struct WriteOp<'a> {
    transfer: Transfer,
    // As for `ReadOp`: the borrow keeps the buffers alive and unchanged while the kernel reads
    // them.
    _buffers: PhantomData<&'a [u8]>,
}

impl<'a> WriteOp<'a> {
    /// An empty write to the file starting at byte `offset`.
    pub fn new(offset: u64) -> Self {
        WriteOp {
            transfer: Transfer::new(offset),
            _buffers: PhantomData,
        }
    }

    /// Appends `buf` to the range: the op now also writes `buf` to the next `buf.len()` bytes
    /// of the file.
    pub fn push(&mut self, buf: &'a [u8]) {
        // The pointer is only ever read through (the kernel copies from it for a write); it is
        // `*mut` because that is what `iovec` holds.
        self.transfer.push(buf.as_ptr().cast_mut(), buf.len());
    }

    /// Bytes this op writes.
    pub fn len(&self) -> usize {
        self.transfer.len
    }

    /// Whether no buffer was pushed.
    pub fn is_empty(&self) -> bool {
        self.transfer.len == 0
    }

    /// Memory segments after merging adjacent buffers (one means a plain, non-vectored write).
    pub fn segments(&self) -> usize {
        self.transfer.segs.len()
    }
}

/// Gives the I/O engines uniform access to the progress state inside a `ReadOp` or `WriteOp`.
trait AsTransfer {
    fn transfer(&mut self) -> &mut Transfer;
}

impl AsTransfer for ReadOp<'_> {
    fn transfer(&mut self) -> &mut Transfer {
        &mut self.transfer
    }
}

impl AsTransfer for WriteOp<'_> {
    fn transfer(&mut self) -> &mut Transfer {
        &mut self.transfer
    }
}

/// A file range, its memory segments and how far the I/O has got.
struct Transfer {
    offset: u64,
    segs: Vec<libc::iovec>,
    len: usize,
    done: usize,
    retries: u32,
    // The segments still to move after a partial transfer; empty while `done == 0`, so the
    // common case submits `segs` directly without copying.
    rest: Vec<libc::iovec>,
}

impl Transfer {
    fn new(offset: u64) -> Self {
        Transfer {
            offset,
            segs: Vec::new(),
            len: 0,
            done: 0,
            retries: 0,
            rest: Vec::new(),
        }
    }

    fn push(&mut self, ptr: *mut u8, len: usize) {
        if len == 0 {
            return;
        }
        self.len = self.len.saturating_add(len);
        if let Some(last) = self.segs.last_mut() {
            // Merging is pure address arithmetic: the kernel needs one range, not one Rust
            // object, and both buffers are borrowed for the whole call.
            if (last.iov_base as usize).wrapping_add(last.iov_len) == ptr as usize {
                last.iov_len += len;
                return;
            }
        }
        self.segs.push(libc::iovec {
            iov_base: ptr.cast(),
            iov_len: len,
        });
    }

    /// Prepares the op for a (new) run and checks that its range is a valid file range.
    fn start(&mut self, dir: Direction) -> Result<(), IoError> {
        self.done = 0;
        self.retries = 0;
        self.rest.clear();
        let fits = u64::try_from(self.len)
            .ok()
            .and_then(|len| self.offset.checked_add(len))
            .is_some_and(|end| i64::try_from(end).is_ok());
        if fits {
            Ok(())
        } else {
            Err(IoError::OffsetRange {
                dir,
                offset: self.offset,
                len: self.len,
            })
        }
    }

    fn is_done(&self) -> bool {
        self.done >= self.len
    }

    /// File offset of the next byte to move (checked to fit `off_t` by `start`).
    fn position(&self) -> u64 {
        self.offset
            .saturating_add(u64::try_from(self.done).unwrap_or(u64::MAX))
    }

    /// `position` as an `off_t`.
    fn position_off_t(&self) -> i64 {
        i64::try_from(self.position()).expect("start() checked that the op's end fits in off_t")
    }

    /// The segments still to move, at most `SEGMENTS_PER_IO_MAX` of them.
    fn pending(&self) -> &[libc::iovec] {
        let segs = if self.done == 0 {
            &self.segs
        } else {
            &self.rest
        };
        &segs[..segs.len().min(SEGMENTS_PER_IO_MAX)]
    }

    /// Records that `n` more bytes moved and recomputes the remaining segments.
    fn advance(&mut self, n: usize) {
        self.done = self.done.saturating_add(n).min(self.len);
        self.rest.clear();
        let mut skip = self.done;
        for seg in &self.segs {
            if skip >= seg.iov_len {
                skip -= seg.iov_len;
                continue;
            }
            self.rest.push(libc::iovec {
                iov_base: seg.iov_base.cast::<u8>().wrapping_add(skip).cast(),
                iov_len: seg.iov_len - skip,
            });
            skip = 0;
        }
    }

    /// Folds one completed system call or CQE (`Ok(bytes)` or `Err(errno)`) into the op.
    fn complete(&mut self, dir: Direction, result: Result<usize, i32>) -> Step {
        match result {
            Ok(0) => Step::Failed(IoError::Short {
                dir,
                offset: self.offset,
                len: self.len,
                done: self.done,
            }),
            Ok(n) => {
                self.retries = 0;
                self.advance(n);
                if self.is_done() {
                    Step::Done
                } else {
                    Step::Again
                }
            }
            Err(errno) if (errno == libc::EINTR || errno == libc::EAGAIN) => {
                self.retries += 1;
                if self.retries <= RETRIES_MAX {
                    Step::Again
                } else {
                    Step::Failed(self.failure(dir, errno))
                }
            }
            Err(errno) => Step::Failed(self.failure(dir, errno)),
        }
    }

    fn failure(&self, dir: Direction, errno: i32) -> IoError {
        IoError::Transfer {
            dir,
            offset: self.offset,
            len: self.len,
            at: self.position(),
            source: std::io::Error::from_raw_os_error(errno),
        }
    }
}

/// What to do with an op after one of its I/Os completed.
enum Step {
    Done,
    Again,
    Failed(IoError),
}

/// Alignment that `O_DIRECT` asks of buffers, file offsets and lengths, in bytes (the logical
/// block size of every disk lego runs on is at most this), for every engine: the page stores'
/// buffers and the log's staging buffers alike.
pub const DIRECT_ALIGN_BYTES: usize = 4096;

const _: () = assert!(DIRECT_ALIGN_BYTES.is_power_of_two());

/// A zeroed byte buffer whose first byte is [`DIRECT_ALIGN_BYTES`]-aligned, for `O_DIRECT`
/// reads. It over-allocates by one alignment unit and starts inside, so no `unsafe` is needed;
/// moving the value does not move the bytes.
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// A buffer of `len` zero bytes.
    pub fn new(len: usize) -> AlignedBuf {
        let storage = vec![0u8; len + DIRECT_ALIGN_BYTES];
        let start = storage.as_ptr().align_offset(DIRECT_ALIGN_BYTES);
        assert!(
            start < DIRECT_ALIGN_BYTES,
            "a u8 pointer can always be aligned within one alignment unit"
        );
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// Whether a read of `buf` at `offset` meets the alignment `O_DIRECT` asks for.
pub fn is_direct_aligned(offset: u64, buf: &[u8]) -> bool {
    let mask = DIRECT_ALIGN_BYTES - 1;
    buf.as_ptr().align_offset(DIRECT_ALIGN_BYTES) == 0
        && buf.len() & mask == 0
        && offset & (mask as u64) == 0
}

/// Converts a byte count to the `u32` an SQE or iovec count field holds, clamped (the loop
/// moves the rest later as if the transfer were short).
fn clamp_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Aligned page buffers and a scratch file for the I/O tests of this module and the stores.

    use crate::PAGE_SIZE;

    /// One page-aligned page, as O_DIRECT wants it.
    #[repr(C, align(4096))]
    #[derive(Clone)]
    pub struct Page(pub [u8; PAGE_SIZE]);

    /// `n` zeroed, page-aligned pages in one contiguous allocation.
    pub fn pages(n: usize) -> Vec<Page> {
        vec![Page([0; PAGE_SIZE]); n]
    }

    /// An unlinked scratch file in the system temporary directory.
    pub fn tempfile() -> std::fs::File {
        let path = std::env::temp_dir().join(format!(
            "lego-io-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .expect("creating a scratch file");
        std::fs::remove_file(&path).expect("unlinking the scratch file");
        file
    }

    /// Fills a page with a pattern derived from `seed`, so each page differs.
    pub fn fill(page: &mut [u8], seed: u64) {
        for (i, b) in page.iter_mut().enumerate() {
            *b = (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjacent_buffers_merge_into_one_segment() {
        let mut bufs = test_support::pages(3);
        let (a, rest) = bufs.split_at_mut(1);
        let (b, c) = rest.split_at_mut(1);
        let mut op = ReadOp::new(0);
        op.push(&mut a[0].0);
        op.push(&mut b[0].0);
        assert_eq!(op.segments(), 1);
        assert_eq!(op.len(), 2 * crate::PAGE_SIZE);
        let mut other = test_support::pages(1);
        op.push(&mut other[0].0);
        assert_eq!(op.segments(), 2);
        // Pushing in reverse memory order must not merge.
        let mut op2 = WriteOp::new(0);
        op2.push(&c[0].0);
        op2.push(&b[0].0);
        assert_eq!(op2.segments(), 2);
    }

    #[test]
    fn advance_recomputes_remaining_segments() {
        let mut t = Transfer::new(100);
        let mut a = [0u8; 10];
        let mut b = [0u8; 10];
        t.push(a.as_mut_ptr(), 10);
        t.push(b.as_mut_ptr(), 10);
        t.start(Direction::Read).expect("small range fits");
        t.advance(13);
        assert_eq!(t.position(), 113);
        let rest = t.pending();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].iov_len, 7);
        assert_eq!(rest[0].iov_base as usize, b.as_ptr() as usize + 3);
    }

    #[test]
    fn complete_classifies_results() {
        let mut buf = [0u8; 8];
        let mut t = Transfer::new(0);
        t.push(buf.as_mut_ptr(), 8);
        t.start(Direction::Read).expect("small range fits");
        assert!(matches!(t.complete(Direction::Read, Ok(3)), Step::Again));
        assert!(matches!(
            t.complete(Direction::Read, Err(libc::EINTR)),
            Step::Again
        ));
        assert!(matches!(
            t.complete(Direction::Read, Ok(0)),
            Step::Failed(IoError::Short { done: 3, .. })
        ));
        assert!(matches!(t.complete(Direction::Read, Ok(5)), Step::Done));
        match t.complete(Direction::Write, Err(libc::EIO)) {
            Step::Failed(e) => assert_eq!(e.errno(), Some(libc::EIO)),
            _ => panic!("EIO must fail the op"),
        }
        for _ in 0..RETRIES_MAX {
            assert!(matches!(
                t.complete(Direction::Read, Err(libc::EAGAIN)),
                Step::Again
            ));
        }
        assert!(matches!(
            t.complete(Direction::Read, Err(libc::EAGAIN)),
            Step::Failed(_)
        ));
    }

    #[test]
    fn ranges_past_off_t_are_refused() {
        let mut buf = [0u8; 8];
        let mut t = Transfer::new(i64::MAX as u64 - 4);
        t.push(buf.as_mut_ptr(), 8);
        assert!(matches!(
            t.start(Direction::Write),
            Err(IoError::OffsetRange { .. })
        ));
    }
}
