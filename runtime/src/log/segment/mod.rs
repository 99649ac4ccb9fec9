//! Writing the log: [`LogWriter`] appends epochs to segment files, synchronously, and
//! [`LogDir`] is the directory they live in, owned by one writer at a time.
//!
//! Rules:
//! - The directory is created `0700` and every segment file `0600` with `O_CREAT|O_EXCL`
//!   (`seg-000001.lego`, ...): the log holds the heap, secrets included. A segment is never
//!   rewritten or reopened for writing; new data always goes to the end of the newest one.
//! - One epoch is appended as its page groups and payloads, then `fdatasync`, then its commit
//!   record, then `fdatasync` again: the commit is written only once the data it vouches for
//!   is durable, and the epoch counts as durable only once the commit is. With
//!   [`SyncMode::None`] both syncs are skipped (the kernel writes back when it likes: a crash
//!   of the machine may lose any number of recent epochs, a crash of the process none).
//! - An epoch never spans two segments. A new segment starts when the current one has reached
//!   [`WriterOptions::segment_bytes_target`] (so a segment exceeds it by at most one epoch),
//!   and before every checkpoint.
//! - An epoch is streamed ([`LogWriter::begin_epoch`], [`EpochAppend::add`] in chunks,
//!   [`EpochAppend::commit`]): page groups are cut every [`GROUP_ENTRIES_MAX`] pages however
//!   the pages arrive and written as they fill, so memory is one open group (at most 126
//!   copied pages) and the bytes are the same as for the whole epoch at once
//!   ([`LogWriter::append_epoch`] and [`LogWriter::checkpoint`] are the one-call form).
//! - After a failed write or sync the writer does not know what is durable, so it never
//!   pretends: the epoch's number is skipped, and the only thing it accepts next is a
//!   checkpoint ([`LogWriter::checkpoint`], [`LogWriter::checkpoint_from_image`] or
//!   [`LogWriter::compact`]: a full image in a new segment, which replay accepts after a
//!   gap). See `docs/DESIGN.md`, "The log".
//! - An [`EpochAppend`] dropped without commit is abandoned. If nothing of it reached the
//!   storage it leaves no trace and its number goes to the next epoch. If some of it did, its
//!   blocks sit without a commit record at the end of the segment, where replay stops: the
//!   writer treats this like a failed write (number used up, broken, checkpoint next), so no
//!   committed epoch is ever written behind an uncommitted one.
//! - Compaction ([`LogWriter::compact`]) and [`LogWriter::resume`] write their checkpoint in a
//!   new segment numbered after every segment there, as an epoch numbered after every epoch
//!   there. A crash before it is durable leaves the old log, which replays as before; after,
//!   the checkpoint. The temporary image compaction replays into is never named like a
//!   segment.
//! - Generations: a checkpoint starts one. The previous generation is kept whole (replay
//!   falls back to it when the newest checkpoint is damaged); the one before it is removed at
//!   the first commit of an epoch after the new checkpoint. [`LogWriter::log_bytes`] counts
//!   the current generation only.
//! - Epochs record their origin ([`EpochOrigin`]): compaction keeps the newest program
//!   checkpoint, copying the automatic epochs after it behind a checkpoint of it, unless they
//!   are too large for the log limit ([`LogWriter::compact_within`]).
//! - `LOG_DIR/lock` holds an exclusive `flock` for as long as the [`LogDir`] lives, and the
//!   holder's PID: a second writer is refused with a message naming both.
//!
//! The I/O goes through [`LogStorage`], so tests run the same writer against memory and
//! against storage that fails on purpose. The disk implementation uses buffered `pwritev` and
//! `fdatasync`; the batched io_uring writer the pager will use writes the same format.
//!
//! Layout: this file holds the limits, the options, [`LogError`] and the [`LogStorage`] seam;
//! `dir` is the disk storage ([`LogDir`]: the directory, its lock, io_uring or `pwritev`);
//! `memory` the storage in memory that tests use (`MemoryStorage`, tests only); `writer` the
//! [`LogWriter`] (segments, syncs, checkpoints, removing old generations); `append` one epoch
//! being streamed ([`EpochAppend`]); `resume` continuing a log from an image; `compaction`
//! bounding the log with a checkpoint of its replay.

use std::path::PathBuf;

use thiserror::Error;

use crate::log::format::{RegionInfo, BLOCK_BYTES_U64, GROUP_ENTRIES_MAX};
use crate::log::replay::{SegmentFile, SegmentSource};
use crate::PAGE_SIZE;

mod append;
mod compaction;
mod dir;
mod index;
#[cfg(test)]
mod memory;
mod resume;
mod writer;

#[cfg(test)]
mod generations;
#[cfg(test)]
mod tests;

pub use append::EpochAppend;
pub use dir::{LogDir, LogDirOptions, LogEngine};
pub use index::{IndexError, Located, PageIndex};
#[cfg(test)]
pub use memory::MemoryStorage;
pub use resume::CheckpointSource;
pub use writer::LogWriter;

/// Name of the lock file inside the log directory.
pub const LOCK_FILE_NAME: &str = "lock";

/// Default size at which the writer starts a new segment, in bytes.
pub const SEGMENT_BYTES_TARGET_DEFAULT: u64 = 64 << 20;

/// Smallest accepted segment size target: the header and one epoch of one page.
pub const SEGMENT_BYTES_TARGET_MIN: u64 = 4 * BLOCK_BYTES_U64;

/// Name of the temporary image compaction writes in the log directory (then removes): not a
/// segment's name, so replay and inspect never take it for one.
pub const COMPACT_IMAGE_NAME: &str = ".lego-compact.img";

/// The log size compaction assumes until it is told one ([`LogWriter::compact_within`]), in
/// bytes: the pager's smallest default `LEGO_LOG_MAX`.
pub const LOG_MAX_BYTES_DEFAULT: u64 = 64 << 20;

/// Compaction keeps the epochs after the newest program checkpoint (copied after a
/// checkpoint of it) only while they are at most the log limit divided by this: beyond that
/// the new generation would soon outgrow the limit again and compaction would run after
/// almost every epoch.
pub const COMPACT_LATER_DIVISOR: u64 = 2;

/// Pages compaction reads and re-writes at once when it copies an epoch.
pub const COPY_CHUNK_PAGES: usize = GROUP_ENTRIES_MAX;

/// Most bytes of the lock file read to find the holder's PID.
const LOCK_FILE_BYTES_MAX: u64 = 64;

/// Whether the writer waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// `fdatasync` before and after each commit record (`LEGO_SYNC=fdatasync`, the default).
    Data,
    /// No syncs (`LEGO_SYNC=none`): durable against a crash of the process only.
    None,
}

/// Settings of a [`LogWriter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterOptions {
    /// A new segment starts once the current one holds this many bytes.
    pub segment_bytes_target: u64,
    pub sync: SyncMode,
    /// The log's id; `None` picks a random one (tests fix it to compare bytes).
    pub log_id: Option<u64>,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            segment_bytes_target: SEGMENT_BYTES_TARGET_DEFAULT,
            sync: SyncMode::Data,
            log_id: None,
        }
    }
}

/// Errors of the log directory and the writer. Each names the directory or file involved.
#[derive(Debug, Error)]
pub enum LogError {
    #[error("creating the log directory {dir} failed (LEGO_LOG_DIR must name a directory this user can create or write)")]
    CreateDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a directory", dir.display())]
    NotADirectory { dir: PathBuf },
    #[error(
        "the log directory {dir} is in use by another writer{}; \
         give each process its own LEGO_LOG_DIR",
        holder.map(|p| format!(" (process {p})")).unwrap_or_default()
    )]
    Locked { dir: PathBuf, holder: Option<u32> },
    #[error("locking the log directory {dir} (file {LOCK_FILE_NAME}) failed")]
    Lock {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the log directory {dir} already holds a log (segment {name}); replay it with \
         `lego replay`, then move it away or choose another directory"
    )]
    NotEmpty { dir: PathBuf, name: String },
    #[error("listing the log directory {dir} failed")]
    List {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the region at {:#x} of {} bytes cannot be logged", region.base, region.len)]
    Region {
        region: RegionInfo,
        #[source]
        source: crate::log::format::FormatError,
    },
    #[error("a segment size target of {bytes} bytes is too small: it must be at least {SEGMENT_BYTES_TARGET_MIN}")]
    SegmentTarget { bytes: u64 },
    #[error("page {page} of the epoch is {len} bytes long; a page is {PAGE_SIZE} bytes")]
    PageLength { page: u64, len: usize },
    #[error("page {page} is outside the region, which has {pages} pages")]
    PageOutOfRange { page: u64, pages: u64 },
    #[error("page {page} appears twice in one epoch")]
    DuplicatePage { page: u64 },
    #[error("{what} for segment {path} failed")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "an earlier write to the log failed, so epoch {epoch} may or may not be durable; \
         only a checkpoint (a full image in a new segment) can continue the log"
    )]
    NeedsCheckpoint { epoch: u64 },
    #[error(transparent)]
    Image(#[from] crate::log::image::ImageError),
    #[error(
        "the heap image {image} is of the region at {:#x} of {} bytes, but the log is of the \
         region at {:#x} of {} bytes",
        found.base, found.len, expected.base, expected.len
    )]
    ImageRegion {
        image: PathBuf,
        found: RegionInfo,
        expected: RegionInfo,
    },
    #[error(
        "the segment {path} is of the region at {:#x} of {} bytes, but the log is resumed for \
         the region at {:#x} of {} bytes",
        found.base, found.len, expected.base, expected.len
    )]
    SegmentRegion {
        path: PathBuf,
        found: RegionInfo,
        expected: RegionInfo,
    },
    #[error(
        "the heap image {image} was replayed from the log {image_id:#018x}, but the log in \
         {dir} is {log_id:#018x}; resume with an image replayed from {dir}, or give the \
         restored program another LEGO_LOG_DIR"
    )]
    LogIdMismatch {
        dir: PathBuf,
        image: PathBuf,
        image_id: u64,
        log_id: u64,
    },
    #[error(
        "the log directory {dir} holds segments of two logs ({first:#018x}, and \
         {second:#018x} in {path}); move the segments that do not belong away"
    )]
    MixedLogs {
        dir: PathBuf,
        path: PathBuf,
        first: u64,
        second: u64,
    },
    #[error("compacting the log in {dir} failed: it does not replay")]
    Replay {
        dir: PathBuf,
        #[source]
        source: Box<crate::log::replay::ReplayError>,
    },
    #[error(
        "compacting the log in {dir} would lose epochs: replay recovers epoch {replayed}, but \
         epoch {committed} was committed; the log is damaged and is left as it is (see \
         `lego inspect`)"
    )]
    CompactionBehind {
        dir: PathBuf,
        replayed: u64,
        committed: u64,
    },
    #[error("{what} the temporary image {path} failed")]
    Scratch {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Where segments live: a directory on disk ([`LogDir`]) or memory (`MemoryStorage`, tests). The
/// writer creates segments one after the other and only ever appends to the newest.
pub trait LogStorage: Send {
    /// Creates segment `seq`, which must not exist, and makes it the one `append` writes to.
    fn create_segment(&mut self, seq: u64) -> std::io::Result<()>;
    /// Writes `pieces`, one after the other, at byte `offset` of the newest segment.
    fn append(&mut self, offset: u64, pieces: &[&[u8]]) -> std::io::Result<()>;
    /// Makes the newest segment's data durable (`fdatasync`).
    fn sync_segment(&mut self) -> std::io::Result<()>;
    /// Waits until everything appended so far has reached the file (the kernel's page cache
    /// at least, without `fdatasync`), and reports the failure of any of it. `append` may
    /// return before its bytes are written; `sync_segment` implies a flush.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    /// Makes the directory's entries durable (created and removed segments).
    fn sync_dir(&mut self) -> std::io::Result<()>;
    /// Removes segment `seq`.
    fn remove_segment(&mut self, seq: u64) -> std::io::Result<()>;
    /// Sequence numbers of the segments that exist, ascending.
    fn segments(&self) -> std::io::Result<Vec<u64>>;
    /// Where segment `seq` is, for messages.
    fn segment_path(&self, seq: u64) -> PathBuf;
    /// The directory (or its stand-in), for messages.
    fn location(&self) -> PathBuf;
    /// Opens segment `seq` for reading (compaction and resume read the log back). The default
    /// opens the file at [`LogStorage::segment_path`].
    fn open_segment(&self, seq: u64) -> std::io::Result<Box<dyn SegmentSource>> {
        Ok(Box::new(SegmentFile::open(&self.segment_path(seq))?))
    }
    /// Where compaction writes its temporary image. The default is
    /// [`COMPACT_IMAGE_NAME`] in [`LogStorage::location`]: in the log's directory (same file
    /// system, same permissions), under a name that is not a segment's.
    fn scratch_image_path(&self) -> PathBuf {
        self.location().join(COMPACT_IMAGE_NAME)
    }
}
