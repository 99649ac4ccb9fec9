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

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Seek};
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use thiserror::Error;

use super::format::{
    segment_file_name, BatchCrc, Block, Commit, CommitKind, EntryKind, EpochOrigin, EpochPage,
    PageEntry, PageGroup, RegionInfo, SegmentHeader, BLOCK_BYTES_U64, GROUP_ENTRIES_MAX,
    SEGMENT_FLAG_CHECKPOINT,
};
use super::image::ImageReader;
use super::replay::{
    inspect_segment, plan, plan_collecting, read_exact_at, write_image, LaterEpoch, Plan,
    ReplayError, Segment, SegmentFile, SegmentSource,
};
use crate::io::{self, IoError, SegmentRing, WriteOp};
use crate::PAGE_SIZE;

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
        source: super::format::FormatError,
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
    Image(#[from] super::image::ImageError),
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
        source: Box<super::replay::ReplayError>,
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

/// Where segments live: a directory on disk ([`LogDir`]) or memory ([`MemoryStorage`]). The
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

/// A log directory, locked for one writer for as long as the value lives. Segments are written
/// through io_uring ([`io::staged`]): `append` may return before its bytes are written, and
/// `sync_segment`, `flush`, `create_segment`, `remove_segment` and drop wait for them. Where
/// io_uring is refused, `pwritev` and `fdatasync` (one warning says so).
pub struct LogDir {
    dir: PathBuf,
    // Holding the lock is all this field does; dropping it closes the file and unlocks.
    _lock: Flock<File>,
    current: Option<(u64, File)>,
    // The io_uring engine; `None` when io_uring is refused (or turned off), and segments are
    // written with `pwritev` and `fdatasync`.
    ring: Option<Box<SegmentRing>>,
    // Whether segments are opened with O_DIRECT (io_uring only; cleared when the file system
    // refuses it).
    direct: bool,
}

/// How a [`LogDir`] writes its segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogDirOptions {
    /// Write through io_uring (falling back to `pwritev` with one warning when it is
    /// refused); `false` uses `pwritev` from the start, with the same warning.
    pub uring: bool,
    /// Open segments with `O_DIRECT` when writing through io_uring, so the log does not fill
    /// the page cache (buffered I/O where the file system refuses it).
    pub direct: bool,
}

impl Default for LogDirOptions {
    fn default() -> Self {
        LogDirOptions {
            uring: true,
            direct: true,
        }
    }
}

/// What a [`LogDir`] writes with, for messages and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogEngine {
    /// io_uring with staging buffers, registered or not, and whether files are `O_DIRECT`.
    Uring { registered: bool, direct: bool },
    /// `pwritev` and `fdatasync`.
    Sync,
}

impl LogDir {
    /// Opens `dir` for writing, creating it (mode 0700) when it does not exist, and takes its
    /// lock. A directory that exists keeps its mode; a warning says so when others can read it.
    pub fn open(dir: &Path) -> Result<LogDir, LogError> {
        Self::open_with(dir, LogDirOptions::default())
    }

    /// [`LogDir::open`] with a choice of I/O engine.
    pub fn open_with(dir: &Path, options: LogDirOptions) -> Result<LogDir, LogError> {
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                let meta = std::fs::metadata(dir).map_err(|source| LogError::CreateDir {
                    dir: dir.to_path_buf(),
                    source,
                })?;
                if !meta.is_dir() {
                    return Err(LogError::NotADirectory {
                        dir: dir.to_path_buf(),
                    });
                }
                if meta.mode() & 0o077 != 0 {
                    log::warn!(
                        "the log directory {} has mode {:o}: other users can list it (the \
                         segments themselves are 0600); chmod 700 it",
                        dir.display(),
                        meta.mode() & 0o777
                    );
                }
            }
            Err(source) => {
                return Err(LogError::CreateDir {
                    dir: dir.to_path_buf(),
                    source,
                })
            }
        }
        let lock = lock_dir(dir)?;
        let ring = if options.uring {
            SegmentRing::new().map_err(|e| match &e {
                IoError::Refused { source } | IoError::Setup { source, .. } => {
                    format!("{e} ({source})")
                }
                other => other.to_string(),
            })
        } else {
            Err("io_uring is turned off for this log directory".to_string())
        };
        let ring = match ring {
            Ok(ring) => Some(Box::new(ring)),
            Err(why) => {
                log::warn!(
                    "{why}; the log in {} is written with pwritev and fdatasync",
                    dir.display()
                );
                None
            }
        };
        let log_dir = LogDir {
            dir: dir.to_path_buf(),
            _lock: lock,
            current: None,
            ring,
            direct: options.direct,
        };
        log::info!("log directory {}: {:?}", dir.display(), log_dir.engine());
        Ok(log_dir)
    }

    /// The I/O engine segments are written with.
    pub fn engine(&self) -> LogEngine {
        match &self.ring {
            Some(ring) => LogEngine::Uring {
                registered: ring.registered(),
                direct: self.direct,
            },
            None => LogEngine::Sync,
        }
    }

    /// Injects a failure into the io_uring engine's I/O (tests only; the engine must be
    /// io_uring).
    #[cfg(test)]
    pub(crate) fn inject(&mut self, at: io::staged::FaultAt, fault: io::staged::Fault) {
        self.ring
            .as_mut()
            .expect("faults are injected into the io_uring engine")
            .inject(at, fault);
    }

    /// Waits for the newest segment's writes in flight and reports their first failure.
    fn finish_current(&mut self) -> std::io::Result<()> {
        if let (Some(ring), Some((_, file))) = (&mut self.ring, &self.current) {
            ring.finish(file.as_fd())?;
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn current(&mut self) -> std::io::Result<&mut File> {
        match &mut self.current {
            Some((_, f)) => Ok(f),
            None => Err(std::io::Error::other("no segment was created yet")),
        }
    }
}

/// Takes the exclusive lock on `dir/lock` and writes our PID into it.
fn lock_dir(dir: &Path) -> Result<Flock<File>, LogError> {
    let path = dir.join(LOCK_FILE_NAME);
    let lock_err = |source| LogError::Lock {
        dir: dir.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(lock_err)?;
    let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((mut file, Errno::EWOULDBLOCK)) => {
            return Err(LogError::Locked {
                dir: dir.to_path_buf(),
                holder: read_pid(&mut file),
            })
        }
        Err((_, errno)) => return Err(lock_err(errno.into())),
    };
    // The PID is only for messages: a stale one left by a dead holder is simply overwritten.
    let pid = format!("{}\n", std::process::id());
    lock.set_len(0).map_err(lock_err)?;
    lock.write_all_at(pid.as_bytes(), 0).map_err(lock_err)?;
    Ok(lock)
}

/// The PID a lock holder wrote into the lock file, if it is there yet.
fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.take(LOCK_FILE_BYTES_MAX)
        .read_to_string(&mut text)
        .ok()?;
    text.trim().parse().ok()
}

impl LogStorage for LogDir {
    fn create_segment(&mut self, seq: u64) -> std::io::Result<()> {
        // The previous segment's writes complete (or report their failure) before the next
        // segment exists.
        self.finish_current()?;
        self.current = None;
        let path = self.segment_path(seq);
        let open = |direct: bool| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(if direct { libc::O_DIRECT } else { 0 })
                .open(&path)
        };
        let direct = self.ring.is_some() && self.direct;
        let (file, direct) = match open(direct) {
            Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                log::info!(
                    "the file system of {} refuses O_DIRECT; the log is written buffered",
                    self.dir.display()
                );
                self.direct = false;
                (open(false)?, false)
            }
            other => (other?, direct),
        };
        if let Some(ring) = &mut self.ring {
            ring.start(&path, direct);
        }
        self.current = Some((seq, file));
        Ok(())
    }

    fn append(&mut self, offset: u64, pieces: &[&[u8]]) -> std::io::Result<()> {
        let (Some(ring), Some((_, file))) = (&mut self.ring, &self.current) else {
            let file = self.current()?;
            let mut op = WriteOp::new(offset);
            for p in pieces {
                op.push(p);
            }
            return io::sync::write_at(file.as_fd(), &mut [op]).map_err(std::io::Error::other);
        };
        Ok(ring.write(file.as_fd(), offset, pieces)?)
    }

    fn sync_segment(&mut self) -> std::io::Result<()> {
        match (&mut self.ring, &self.current) {
            (Some(ring), Some((_, file))) => Ok(ring.sync(file.as_fd())?),
            _ => self.current()?.sync_data(),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match (&mut self.ring, &self.current) {
            (Some(ring), Some((_, file))) => Ok(ring.flush(file.as_fd())?),
            _ => Ok(()),
        }
    }

    fn sync_dir(&mut self) -> std::io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }

    fn remove_segment(&mut self, seq: u64) -> std::io::Result<()> {
        if self.current.as_ref().is_some_and(|(s, _)| *s == seq) {
            let finished = self.finish_current();
            self.current = None;
            finished?;
        } else if let (Some(ring), Some((_, file))) = (&mut self.ring, &self.current) {
            // Writes in flight end here at the latest, so their failure is not lost.
            ring.flush(file.as_fd())?;
        }
        std::fs::remove_file(self.segment_path(seq))
    }

    fn segments(&self) -> std::io::Result<Vec<u64>> {
        let mut seqs = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            if let Some(seq) = entry
                .file_name()
                .to_str()
                .and_then(super::format::parse_segment_file_name)
            {
                seqs.push(seq);
            }
        }
        seqs.sort_unstable();
        Ok(seqs)
    }

    fn segment_path(&self, seq: u64) -> PathBuf {
        self.dir.join(segment_file_name(seq))
    }

    fn location(&self) -> PathBuf {
        self.dir.clone()
    }
}

impl Drop for LogDir {
    fn drop(&mut self) {
        if let Err(e) = self.finish_current() {
            log::error!(
                "writing the end of the log in {} failed: {e}",
                self.dir.display()
            );
        }
    }
}

/// Segments in memory, shared with whoever holds a clone (tests read what the writer wrote).
#[derive(Clone, Default)]
pub struct MemoryStorage {
    segments: Arc<Mutex<BTreeMap<u64, Vec<u8>>>>,
    current: Option<u64>,
}

impl MemoryStorage {
    pub fn new() -> MemoryStorage {
        MemoryStorage::default()
    }

    /// A copy of every segment, by sequence number.
    pub fn snapshot(&self) -> BTreeMap<u64, Vec<u8>> {
        self.segments
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the bytes of segment `seq` (tests damage a log the writer still holds).
    #[cfg(test)]
    pub(crate) fn replace_segment(&self, seq: u64, bytes: Vec<u8>) {
        self.segments
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(seq, bytes);
    }
}

impl LogStorage for MemoryStorage {
    fn create_segment(&mut self, seq: u64) -> std::io::Result<()> {
        let mut segs = self.segments.lock().unwrap_or_else(PoisonError::into_inner);
        if segs.contains_key(&seq) {
            return Err(ErrorKind::AlreadyExists.into());
        }
        segs.insert(seq, Vec::new());
        self.current = Some(seq);
        Ok(())
    }

    fn append(&mut self, offset: u64, pieces: &[&[u8]]) -> std::io::Result<()> {
        let seq = self.current.ok_or(ErrorKind::NotFound)?;
        let mut segs = self.segments.lock().unwrap_or_else(PoisonError::into_inner);
        let seg = segs.get_mut(&seq).ok_or(ErrorKind::NotFound)?;
        let mut at = usize::try_from(offset).map_err(|_| ErrorKind::InvalidInput)?;
        for p in pieces {
            let end = at + p.len();
            if seg.len() < end {
                seg.resize(end, 0);
            }
            seg[at..end].copy_from_slice(p);
            at = end;
        }
        Ok(())
    }

    fn sync_segment(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    fn sync_dir(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    fn remove_segment(&mut self, seq: u64) -> std::io::Result<()> {
        let mut segs = self.segments.lock().unwrap_or_else(PoisonError::into_inner);
        segs.remove(&seq)
            .map(|_| ())
            .ok_or(ErrorKind::NotFound.into())
    }

    fn segments(&self) -> std::io::Result<Vec<u64>> {
        let segs = self.segments.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(segs.keys().copied().collect())
    }

    fn segment_path(&self, seq: u64) -> PathBuf {
        PathBuf::from(format!("memory:{}", segment_file_name(seq)))
    }

    fn location(&self) -> PathBuf {
        PathBuf::from("memory:")
    }

    fn open_segment(&self, seq: u64) -> std::io::Result<Box<dyn SegmentSource>> {
        let segs = self.segments.lock().unwrap_or_else(PoisonError::into_inner);
        let bytes = segs.get(&seq).ok_or(ErrorKind::NotFound)?.clone();
        Ok(Box::new(bytes))
    }

    /// Memory has no directory: the temporary image goes to the system's temporary directory,
    /// under a name of this storage's own (tests run side by side).
    fn scratch_image_path(&self) -> PathBuf {
        std::env::temp_dir().join(format!(
            "lego-memory-compact-{}-{:p}.img",
            std::process::id(),
            Arc::as_ptr(&self.segments)
        ))
    }
}

/// Appends epochs to a log, one segment after the other.
pub struct LogWriter {
    storage: Box<dyn LogStorage>,
    region: RegionInfo,
    log_id: u64,
    options: WriterOptions,
    // Newest segment (0 before the first one is created) and where its next byte goes.
    seq: u64,
    offset: u64,
    next_epoch: u64,
    // The last epoch whose commit was reported durable (0: none yet).
    last_committed: u64,
    // Set by a failed write or sync, or an epoch abandoned after writing: the writer accepts
    // only a checkpoint until one succeeds.
    broken: bool,
    // Bytes of each segment the log holds, by sequence number (for `log_bytes`).
    segment_bytes: BTreeMap<u64, u64>,
    // First segment of the current generation: the segment of the newest durable checkpoint,
    // or 0 (the log's first segment) before any.
    generation: u64,
    // Segments numbered below this are removed once an epoch after the current generation's
    // checkpoint is durable (the generation before the previous one).
    remove_below: Option<u64>,
    // The log size compaction decides with (see `compact_within`).
    log_max_bytes: u64,
    // Payload copies of a streaming epoch's open page group, kept between epochs so that its
    // allocation (at most GROUP_ENTRIES_MAX pages) is made once.
    group_buf: Vec<u8>,
}

impl LogWriter {
    /// Starts a new log in `dir` (created 0700 if missing) for `region`. The directory must
    /// not hold segments already: continuing an existing log is [`LogWriter::resume`]'s job.
    pub fn create(
        dir: &Path,
        region: RegionInfo,
        options: WriterOptions,
    ) -> Result<LogWriter, LogError> {
        Self::with_storage(Box::new(LogDir::open(dir)?), region, options)
    }

    /// Starts a new log on `storage`, which must hold no segment. Nothing is written until
    /// the first epoch.
    pub fn with_storage(
        storage: Box<dyn LogStorage>,
        region: RegionInfo,
        options: WriterOptions,
    ) -> Result<LogWriter, LogError> {
        check_settings(region, &options)?;
        let existing = list_segments(storage.as_ref())?;
        if let Some(&seq) = existing.first() {
            return Err(LogError::NotEmpty {
                dir: storage.location(),
                name: segment_file_name(seq),
            });
        }
        Ok(LogWriter {
            storage,
            region,
            log_id: options.log_id.unwrap_or_else(random_log_id),
            options,
            seq: 0,
            offset: 0,
            next_epoch: 1,
            last_committed: 0,
            broken: false,
            segment_bytes: BTreeMap::new(),
            generation: 0,
            remove_below: None,
            log_max_bytes: LOG_MAX_BYTES_DEFAULT,
            group_buf: Vec::new(),
        })
    }

    /// Continues the log in `dir` after a restore from `image` (made by `lego replay` of this
    /// directory, possibly with `--epoch N`): takes the directory's lock, checks that the
    /// image's log id and region are the log's, and writes the image as a checkpoint numbered
    /// after every epoch found in the directory (and after the image's), in a new segment
    /// numbered after every segment there; once it is durable the older segments are removed.
    /// So the history after the image's epoch is cut off, and a crash before the checkpoint is
    /// durable leaves the log as it was.
    ///
    /// A directory without segments starts a new log whose first epoch is that checkpoint,
    /// under the image's log id (the same log, continued elsewhere) and numbered after the
    /// image's epoch. The log keeps its id: `options.log_id` is not used here.
    pub fn resume(
        dir: &Path,
        region: RegionInfo,
        options: WriterOptions,
        image: &Path,
    ) -> Result<LogWriter, LogError> {
        // The image is checked before the directory is locked (or created).
        let reader = ImageReader::open(image)?;
        Self::resume_reader(Box::new(LogDir::open(dir)?), region, options, reader)
    }

    /// [`LogWriter::resume`] on any storage.
    pub fn resume_with_storage(
        storage: Box<dyn LogStorage>,
        region: RegionInfo,
        options: WriterOptions,
        image: &Path,
    ) -> Result<LogWriter, LogError> {
        let reader = ImageReader::open(image)?;
        Self::resume_reader(storage, region, options, reader)
    }

    fn resume_reader(
        storage: Box<dyn LogStorage>,
        region: RegionInfo,
        options: WriterOptions,
        mut image: ImageReader,
    ) -> Result<LogWriter, LogError> {
        check_settings(region, &options)?;
        let ih = *image.header();
        if ih.region != region {
            return Err(LogError::ImageRegion {
                image: image.path().to_path_buf(),
                found: ih.region,
                expected: region,
            });
        }
        let dir = storage.location();
        let mut log_id: Option<u64> = None;
        let mut max_epoch = 0u64;
        let mut max_seq = 0u64;
        let mut segment_bytes = BTreeMap::new();
        // Where the newest generation there starts: its checkpoint segment, or the first.
        let mut generation = 0u64;
        for (i, seq) in list_segments(storage.as_ref())?.into_iter().enumerate() {
            let path = storage.segment_path(seq);
            let source = storage.open_segment(seq).map_err(|source| LogError::Io {
                path: path.clone(),
                what: "opening (to resume the log)",
                source,
            })?;
            segment_bytes.insert(seq, source.size());
            max_seq = max_seq.max(seq);
            // Every segment is read to its end: the new checkpoint must be numbered after
            // every epoch committed anywhere in the directory, or replay could stop before it.
            let info = inspect_segment(i, &Segment { seq, path, source });
            // A segment whose header cannot be read holds nothing replay would apply; its
            // number is still taken.
            let Ok(h) = info.header else { continue };
            if h.region != region {
                return Err(LogError::SegmentRegion {
                    path: info.path,
                    found: h.region,
                    expected: region,
                });
            }
            match log_id {
                None => log_id = Some(h.log_id),
                Some(first) if first != h.log_id => {
                    return Err(LogError::MixedLogs {
                        dir,
                        path: info.path,
                        first,
                        second: h.log_id,
                    })
                }
                Some(_) => {}
            }
            max_epoch = max_epoch
                .max(h.first_epoch)
                .max(info.last_epoch.unwrap_or(0));
            if h.starts_with_checkpoint() && info.checkpoints > 0 {
                generation = seq;
            }
        }
        let log_id = match log_id {
            Some(id) if id != ih.log_id => {
                return Err(LogError::LogIdMismatch {
                    dir,
                    image: image.path().to_path_buf(),
                    image_id: ih.log_id,
                    log_id: id,
                })
            }
            Some(id) => id,
            None => ih.log_id,
        };
        let mut w = LogWriter {
            storage,
            region,
            log_id,
            options,
            seq: max_seq,
            offset: 0,
            next_epoch: max_epoch.max(ih.epoch) + 1,
            last_committed: 0,
            broken: false,
            segment_bytes,
            generation,
            remove_below: None,
            log_max_bytes: LOG_MAX_BYTES_DEFAULT,
            group_buf: Vec::new(),
        };
        let epoch = w.checkpoint_from_reader(&mut image, ih.origin)?;
        if ih.epoch < max_epoch {
            // Restored from an older epoch (`--epoch N`): the history after it is another
            // branch, which must not come back as a fallback. Only the new checkpoint stays.
            w.remove_older_now(epoch);
        }
        log::info!(
            "the log in {} continues from the image {} (epoch {}) with the checkpoint of \
             epoch {epoch}",
            dir.display(),
            image.path().display(),
            ih.epoch
        );
        Ok(w)
    }

    pub fn log_id(&self) -> u64 {
        self.log_id
    }

    /// The number the next epoch will get.
    pub fn next_epoch(&self) -> u64 {
        self.next_epoch
    }

    /// The newest segment's sequence number (0 before the first epoch).
    pub fn segment(&self) -> u64 {
        self.seq
    }

    /// Bytes of the log's current generation: the segments from the newest durable
    /// checkpoint on (all of them before the first checkpoint). This is what `LEGO_LOG_MAX`
    /// bounds; the previous generation, kept as the fallback should the newest checkpoint be
    /// damaged, is not counted (see [`LogWriter::total_bytes`]).
    pub fn log_bytes(&self) -> u64 {
        self.segment_bytes
            .range(self.generation..)
            .map(|(_, b)| b)
            .sum()
    }

    /// Bytes of every segment the log holds: both generations (at most about twice
    /// `LEGO_LOG_MAX`, and between a compaction and the next commit a third generation's
    /// checkpoint).
    pub fn total_bytes(&self) -> u64 {
        self.segment_bytes.values().sum()
    }

    /// The first segment of the current generation (0 before the first checkpoint: the log's
    /// first segment).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether only a checkpoint (or [`LogWriter::compact`]) is accepted next.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Number of the last epoch that committed durably (0 if none).
    pub fn last_committed(&self) -> u64 {
        self.last_committed
    }

    /// Appends one epoch of `pages` (each at most once) and returns its number once it is
    /// durable (with [`SyncMode::Data`]).
    pub fn append_epoch(&mut self, pages: &[EpochPage<'_>]) -> Result<u64, LogError> {
        self.append_epoch_as(EpochOrigin::Automatic, pages)
    }

    /// [`LogWriter::append_epoch`] of an epoch whose origin the commit record tells
    /// ([`EpochOrigin::Program`]: made by `lego_checkpoint()`).
    pub fn append_epoch_as(
        &mut self,
        origin: EpochOrigin,
        pages: &[EpochPage<'_>],
    ) -> Result<u64, LogError> {
        if self.broken {
            return Err(self.needs_checkpoint());
        }
        self.check_pages(pages, &[])?;
        let mut epoch = self.begin(CommitKind::Delta, origin);
        epoch.push(pages, true)?;
        epoch.commit()
    }

    /// Starts a streaming epoch cut automatically (a timer, dirty pages): pages are added in
    /// chunks with [`EpochAppend::add`] and written as they come; nothing is durable until
    /// [`EpochAppend::commit`].
    pub fn begin_epoch(&mut self) -> Result<EpochAppend<'_>, LogError> {
        self.begin_epoch_as(EpochOrigin::Automatic)
    }

    /// [`LogWriter::begin_epoch`] for an epoch of the given origin: [`EpochOrigin::Program`]
    /// for the epoch a `lego_checkpoint()` call made, which `lego replay --checkpoint`
    /// recovers and compaction keeps.
    pub fn begin_epoch_as(&mut self, origin: EpochOrigin) -> Result<EpochAppend<'_>, LogError> {
        if self.broken {
            return Err(self.needs_checkpoint());
        }
        Ok(self.begin(CommitKind::Delta, origin))
    }

    /// Appends an automatic checkpoint: `pages` must be every non-zero page of the heap. It
    /// starts a new segment and a new generation; the generation before the previous one is
    /// removed once an epoch after this checkpoint is durable (oldest first, so a crash in
    /// between leaves a contiguous run that still replays). Returns its epoch.
    pub fn checkpoint(&mut self, pages: &[EpochPage<'_>]) -> Result<u64, LogError> {
        self.checkpoint_as(EpochOrigin::Automatic, pages)
    }

    /// [`LogWriter::checkpoint`] of a heap that is a program checkpoint.
    pub fn checkpoint_as(
        &mut self,
        origin: EpochOrigin,
        pages: &[EpochPage<'_>],
    ) -> Result<u64, LogError> {
        self.check_pages(pages, &[])?;
        let mut append = self.begin(CommitKind::Checkpoint, origin);
        append.push(pages, true)?;
        append.commit()
    }

    /// Streams a checkpoint from the heap image `image` (as `lego replay` writes it; its
    /// region must be the log's) into a new segment, reading it in chunks of
    /// [`IMAGE_CHUNK_PAGES`](super::image::IMAGE_CHUNK_PAGES) and skipping holes and all-zero pages, then removes the older
    /// segments as [`LogWriter::checkpoint`] does. Returns the checkpoint's epoch (a new
    /// number). Works on a broken writer, and clears that state. The image's log id is not
    /// checked: its content becomes the heap's.
    /// The checkpoint is a program checkpoint when the image's header says its epoch was one.
    pub fn checkpoint_from_image(&mut self, image: &Path) -> Result<u64, LogError> {
        let mut reader = ImageReader::open(image)?;
        let origin = reader.header().origin;
        self.checkpoint_from_reader(&mut reader, origin)
    }

    fn checkpoint_from_reader(
        &mut self,
        image: &mut ImageReader,
        origin: EpochOrigin,
    ) -> Result<u64, LogError> {
        let found = image.header().region;
        if found != self.region {
            return Err(LogError::ImageRegion {
                image: image.path().to_path_buf(),
                found,
                expected: self.region,
            });
        }
        let mut append = self.begin(CommitKind::Checkpoint, origin);
        // An error here drops `append` uncommitted: see `EpochAppend`'s drop.
        while let Some(pages) = image.next_chunk()? {
            append.add(&pages)?;
        }
        append.commit()
    }

    /// Bounds the log: [`LogWriter::compact_within`] with the log limit given last (or
    /// [`LOG_MAX_BYTES_DEFAULT`]).
    pub fn compact(&mut self) -> Result<u64, LogError> {
        self.compact_within(self.log_max_bytes)
    }

    /// Bounds the log, whose limit is `log_max_bytes` (`LEGO_LOG_MAX`, compared with
    /// [`LogWriter::log_bytes`]): replays its committed epochs into a temporary image in the
    /// log directory ([`COMPACT_IMAGE_NAME`], mode 0600, never named like a segment, removed
    /// afterwards) and writes that as a checkpoint in a new generation. Returns the epoch of
    /// the new generation's last epoch (what the default replay gives).
    ///
    /// Program checkpoints survive it: when automatic epochs follow the newest program
    /// checkpoint P (and no automatic checkpoint came between), the checkpoint is of P, marked
    /// as a program checkpoint, and the epochs after P are copied after it (their records
    /// re-written under new numbers), so the default replay still gives the newest epoch and
    /// `--checkpoint` gives P. When those epochs hold more than `log_max_bytes` /
    /// [`COMPACT_LATER_DIVISOR`] bytes the new generation would outgrow the limit at once:
    /// the checkpoint is then of the newest epoch, with a warning, and P stays recoverable only
    /// while the previous generation is kept. A checkpoint of an epoch that was a program
    /// checkpoint keeps the mark.
    ///
    /// The previous generation stays (the fallback should the new checkpoint be damaged); the
    /// one before it is removed once an epoch after the new checkpoint is durable.
    ///
    /// Works on a broken writer (that is how it recovers after a failed write): the last
    /// epoch replay finds committed becomes the checkpoint's content, which is the last one
    /// reported durable or the failed one if its commit made it. A log that replays to an
    /// epoch older than the last one reported durable is damaged (the newest checkpoint, say,
    /// so that replay fell back to the previous generation): it is left as it is and the
    /// error says so. The image need not be durable: until the checkpoint is, the old
    /// segments are all there.
    ///
    /// Memory: replay's first pass keeps the place of every page of the heap (tens of bytes
    /// per page; twice when P is kept) and of every page record after P; the pages themselves
    /// go through bounded buffers.
    pub fn compact_within(&mut self, log_max_bytes: u64) -> Result<u64, LogError> {
        self.log_max_bytes = log_max_bytes;
        let dir = self.storage.location();
        let mut segments = Vec::new();
        for seq in list_segments(self.storage.as_ref())? {
            let path = self.storage.segment_path(seq);
            let source = self
                .storage
                .open_segment(seq)
                .map_err(|source| LogError::Io {
                    path: path.clone(),
                    what: "opening (to compact the log)",
                    source,
                })?;
            segments.push(Segment { seq, path, source });
        }
        let later_bytes_max = log_max_bytes / COMPACT_LATER_DIVISOR;
        let replay_err = |e| LogError::Replay {
            dir: dir.clone(),
            source: Box::new(e),
        };
        let (mut newest, later) = match plan_collecting(&dir, &segments, later_bytes_max) {
            Ok(found) => found,
            // Nothing was ever committed: the heap the log vouches for is empty.
            Err(ReplayError::NoSegments { .. } | ReplayError::NothingCommitted { .. })
                if self.last_committed == 0 =>
            {
                drop(segments);
                return self.checkpoint(&[]);
            }
            Err(e) => return Err(replay_err(e)),
        };
        let replayed = newest.report.epoch;
        if replayed < self.last_committed {
            return Err(LogError::CompactionBehind {
                dir,
                replayed,
                committed: self.last_committed,
            });
        }
        // The checkpoint must be numbered after everything replay saw.
        self.next_epoch = self.next_epoch.max(replayed + 1);
        let program = newest.report.newest_program.filter(|&p| p < replayed);
        let keep = match program {
            Some(p) if later.active && later.over => {
                log::warn!(
                    "compacting the log in {}: the epochs after the program checkpoint of epoch \
                     {p} hold more than {later_bytes_max} bytes (half the log limit of \
                     {log_max_bytes}), so the checkpoint is of epoch {replayed}; `lego replay \
                     --checkpoint` finds epoch {p} only until the previous generation is removed",
                    dir.display()
                );
                None
            }
            Some(p) if later.active => Some(p),
            _ => None,
        };
        let result = match keep {
            None => {
                let origin = newest.report.origin;
                self.checkpoint_from_plan(&mut newest, &segments, origin)
            }
            Some(p) => {
                let kept = plan(&dir, &segments, Some(p), &mut |_| {})
                    .map_err(replay_err)
                    .and_then(|mut at_p| {
                        self.checkpoint_from_plan(&mut at_p, &segments, EpochOrigin::Program)
                    })
                    .and_then(|mut last| {
                        for e in &later.epochs {
                            last = self.copy_epoch(&segments, e)?;
                        }
                        Ok(last)
                    });
                match kept {
                    Ok(last) => Ok(last),
                    Err(e) => {
                        // The checkpoint of P may be durable with only some of the epochs
                        // after it: replay would give less than was committed. The checkpoint
                        // of the newest epoch puts that right.
                        log::error!(
                            "compacting the log in {} around the program checkpoint of epoch \
                             {p} failed ({e}); compacting to epoch {replayed} instead",
                            dir.display()
                        );
                        let origin = newest.report.origin;
                        self.checkpoint_from_plan(&mut newest, &segments, origin)
                    }
                }
            }
        };
        let epoch = result?;
        log::debug!(
            "compacted the log in {} to a new generation ending at epoch {epoch} (replayed \
             epoch {replayed}{}); its generation holds {} bytes, the log {}",
            dir.display(),
            match keep {
                Some(p) => format!(", kept the program checkpoint of epoch {p}"),
                None => String::new(),
            },
            self.log_bytes(),
            self.total_bytes()
        );
        Ok(epoch)
    }

    /// Writes the image `plan` describes to the temporary image and checkpoints from it.
    fn checkpoint_from_plan<S: SegmentSource>(
        &mut self,
        plan: &mut Plan,
        segments: &[Segment<S>],
        origin: EpochOrigin,
    ) -> Result<u64, LogError> {
        let dir = self.storage.location();
        let scratch = self.storage.scratch_image_path();
        let scratch_err = |what, source| LogError::Scratch {
            path: scratch.clone(),
            what,
            source,
        };
        // We hold the directory's lock: a file left there by a compaction that crashed is
        // nobody else's.
        match std::fs::remove_file(&scratch) {
            Ok(()) => log::debug!("removed a stale {}", scratch.display()),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(scratch_err("removing the stale", e)),
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&scratch)
            .map_err(|e| scratch_err("creating (mode 0600)", e))?;
        let result = write_image(plan, segments, &mut file, &scratch, &mut |_| {})
            .map_err(|e| LogError::Replay {
                dir: dir.clone(),
                source: Box::new(e),
            })
            .and_then(|()| {
                drop(file);
                let mut reader = ImageReader::open(&scratch)?;
                self.checkpoint_from_reader(&mut reader, origin)
            });
        if let Err(e) = std::fs::remove_file(&scratch) {
            log::warn!(
                "removing the temporary image {} after compacting failed: {e}",
                scratch.display()
            );
        }
        result
    }

    /// Re-writes one committed epoch of the old generation (read from `segments`, every page
    /// checked against its CRC again) as the next epoch of this one.
    fn copy_epoch<S: SegmentSource>(
        &mut self,
        segments: &[Segment<S>],
        e: &LaterEpoch,
    ) -> Result<u64, LogError> {
        let dir = self.storage.location();
        let mut buf = vec![0u8; COPY_CHUNK_PAGES * PAGE_SIZE];
        let mut append = self.begin_epoch_as(e.origin)?;
        for chunk in e.pages.chunks(COPY_CHUNK_PAGES) {
            for (k, (page, loc)) in chunk.iter().enumerate() {
                let Some(loc) = loc else { continue };
                let seg = &segments[loc.seg];
                let bytes = &mut buf[k * PAGE_SIZE..(k + 1) * PAGE_SIZE];
                let checked = read_exact_at(seg, loc.offset, bytes).and_then(|()| {
                    PageEntry {
                        kind: EntryKind::Page,
                        epoch: loc.epoch,
                        page: *page,
                        crc: loc.crc,
                    }
                    .check_payload(bytes)
                    .map_err(|source| ReplayError::LogChanged {
                        path: seg.path.clone(),
                        offset: loc.offset,
                        source,
                    })
                });
                checked.map_err(|e| LogError::Replay {
                    dir: dir.clone(),
                    source: Box::new(e),
                })?;
            }
            let pages: Vec<EpochPage<'_>> = chunk
                .iter()
                .enumerate()
                .map(|(k, (page, loc))| EpochPage {
                    page: *page,
                    data: loc.map(|_| &buf[k * PAGE_SIZE..(k + 1) * PAGE_SIZE]),
                })
                .collect();
            append.add(&pages)?;
        }
        append.commit()
    }

    fn needs_checkpoint(&self) -> LogError {
        LogError::NeedsCheckpoint {
            epoch: self.next_epoch - 1,
        }
    }

    fn begin(&mut self, kind: CommitKind, origin: EpochOrigin) -> EpochAppend<'_> {
        let rotate = kind == CommitKind::Checkpoint
            || self.seq == 0
            || self.offset >= self.options.segment_bytes_target;
        let buf = std::mem::take(&mut self.group_buf);
        EpochAppend {
            epoch: self.next_epoch,
            writer: self,
            kind,
            origin,
            rotate,
            wrote: false,
            finished: false,
            sealed: false,
            open: Vec::new(),
            buf,
            groups: 0,
            pages: 0,
            body_bytes: 0,
            batch: BatchCrc::default(),
        }
    }

    /// Removes every segment older than the newest, after the checkpoint `epoch` in it is
    /// durable (a resume from an older epoch: no previous generation is kept).
    fn remove_older_now(&mut self, epoch: u64) {
        self.remove_below = None;
        self.remove_segments_below(self.seq, epoch);
    }

    /// Removes the segments numbered below `below`, oldest first (`epoch` is the checkpoint
    /// or epoch that makes them unneeded, for messages). A segment that cannot be removed
    /// costs space, not correctness (replay skips to the checkpoint), so failures are
    /// warnings.
    fn remove_segments_below(&mut self, below: u64, epoch: u64) {
        let older: Vec<u64> = match self.storage.segments() {
            Ok(all) => all.into_iter().filter(|&s| s < below).collect(),
            Err(e) => {
                log::warn!(
                    "listing {} after the checkpoint of epoch {epoch} failed: {e}",
                    self.storage.location().display()
                );
                return;
            }
        };
        if older.is_empty() {
            return;
        }
        // Oldest first: a crash in between leaves a contiguous run that still replays.
        for seq in older {
            if let Err(e) = self.storage.remove_segment(seq) {
                log::warn!(
                    "removing {} (no longer needed after epoch {epoch}) failed: {e}",
                    self.storage.segment_path(seq).display()
                );
                return;
            }
            self.segment_bytes.remove(&seq);
        }
        if self.options.sync == SyncMode::Data {
            if let Err(e) = self.storage.sync_dir() {
                log::warn!(
                    "syncing {} after removing old segments failed: {e}",
                    self.storage.location().display()
                );
            }
        }
    }

    /// Checks `pages` (in range, one page long, none twice, none already in `open`) before
    /// anything of them is written.
    fn check_pages(&self, pages: &[EpochPage<'_>], open: &[PageEntry]) -> Result<(), LogError> {
        let region_pages = self.region.pages();
        let mut seen = Vec::with_capacity(pages.len() + open.len());
        for p in pages {
            if p.page >= region_pages {
                return Err(LogError::PageOutOfRange {
                    page: p.page,
                    pages: region_pages,
                });
            }
            if let Some(d) = p.data.filter(|d| d.len() != PAGE_SIZE) {
                return Err(LogError::PageLength {
                    page: p.page,
                    len: d.len(),
                });
            }
            seen.push(p.page);
        }
        seen.extend(open.iter().map(|e| e.page));
        seen.sort_unstable();
        match seen.windows(2).find(|w| w[0] == w[1]) {
            Some(w) => Err(LogError::DuplicatePage { page: w[0] }),
            None => Ok(()),
        }
    }

    /// Appends `pieces` at the end of the newest segment, first starting a new segment for
    /// `epoch` if `rotate` says so. Returns the bytes appended.
    fn write_pieces(
        &mut self,
        epoch: u64,
        kind: CommitKind,
        rotate: &mut bool,
        pieces: &[&[u8]],
        what: &'static str,
    ) -> Result<u64, LogError> {
        if *rotate {
            self.start_segment(epoch, kind)?;
            *rotate = false;
        }
        let bytes: u64 = pieces.iter().map(|p| p.len() as u64).sum();
        if bytes == 0 {
            return Ok(0);
        }
        self.storage
            .append(self.offset, pieces)
            .map_err(|source| self.io_error(what, source))?;
        self.offset += bytes;
        self.segment_bytes.insert(self.seq, self.offset);
        Ok(bytes)
    }

    /// Makes what was appended durable (`SyncMode::Data`), or at least written to the file
    /// (`SyncMode::None`: the storage may still have writes in flight, and a commit record
    /// must never reach the file before the pages it vouches for).
    fn sync(&mut self, what: &'static str) -> Result<(), LogError> {
        let result = match self.options.sync {
            SyncMode::Data => self.storage.sync_segment(),
            SyncMode::None => self.storage.flush(),
        };
        result.map_err(|source| self.io_error(what, source))
    }

    /// Creates the next segment and writes its header (durably, directory entry included).
    fn start_segment(&mut self, first_epoch: u64, kind: CommitKind) -> Result<(), LogError> {
        let seq = self.seq + 1;
        let header = SegmentHeader {
            seq,
            log_id: self.log_id,
            region: self.region,
            first_epoch,
            flags: match kind {
                CommitKind::Checkpoint => SEGMENT_FLAG_CHECKPOINT,
                CommitKind::Delta => 0,
            },
        };
        let block = header.encode();
        let path = self.storage.segment_path(seq);
        let io_err = |what, source| LogError::Io {
            path: path.clone(),
            what,
            source,
        };
        self.storage
            .create_segment(seq)
            .map_err(|e| io_err("creating the file (O_EXCL, mode 0600)", e))?;
        // The segment exists from here on: the next one must get the next number even if
        // writing this header fails.
        self.seq = seq;
        self.offset = 0;
        self.segment_bytes.insert(seq, 0);
        self.storage
            .append(0, &[&block.0])
            .map_err(|e| io_err("writing the header", e))?;
        self.offset = BLOCK_BYTES_U64;
        self.segment_bytes.insert(seq, self.offset);
        if self.options.sync == SyncMode::Data {
            self.storage
                .sync_segment()
                .map_err(|e| io_err("fdatasync of the header", e))?;
            self.storage
                .sync_dir()
                .map_err(|e| io_err("syncing the directory after creating", e))?;
        }
        log::debug!(
            "log segment {} started at epoch {first_epoch}",
            path.display()
        );
        Ok(())
    }

    fn io_error(&self, what: &'static str, source: std::io::Error) -> LogError {
        LogError::Io {
            path: self.storage.segment_path(self.seq),
            what,
            source,
        }
    }
}

/// Checks a writer's region and settings.
fn check_settings(region: RegionInfo, options: &WriterOptions) -> Result<(), LogError> {
    region
        .check(super::format::Record::SegmentHeader)
        .map_err(|source| LogError::Region { region, source })?;
    if options.segment_bytes_target < SEGMENT_BYTES_TARGET_MIN {
        return Err(LogError::SegmentTarget {
            bytes: options.segment_bytes_target,
        });
    }
    Ok(())
}

fn list_segments(storage: &dyn LogStorage) -> Result<Vec<u64>, LogError> {
    storage.segments().map_err(|source| LogError::List {
        dir: storage.location(),
        source,
    })
}

/// One epoch being written by [`LogWriter::begin_epoch`] (or a checkpoint), page group by
/// page group. See the module documentation for what dropping it uncommitted does.
pub struct EpochAppend<'w> {
    writer: &'w mut LogWriter,
    epoch: u64,
    kind: CommitKind,
    origin: EpochOrigin,
    // The epoch's segment is still to be started (at its first write).
    rotate: bool,
    // Some byte of the epoch (its segment's header included) reached the storage.
    wrote: bool,
    // Committed, or failed (the writer is broken): nothing more may be written.
    finished: bool,
    // A page group of fewer than GROUP_ENTRIES_MAX entries was written (the last call of a
    // whole epoch): no page may follow it.
    sealed: bool,
    // The open page group: its entries, and in `buf` the payloads of its PAGE entries in
    // order. Held back until the group is full so that groups are cut every
    // GROUP_ENTRIES_MAX pages however the pages arrive.
    open: Vec<PageEntry>,
    buf: Vec<u8>,
    // What the commit record will say.
    groups: u32,
    pages: u64,
    body_bytes: u64,
    batch: BatchCrc,
}

/// Where the payloads of a page group to write are.
enum Payloads<'p, 'd> {
    /// In the open group's buffer.
    Buffered,
    /// In the caller's pages.
    Pages(&'p [EpochPage<'d>]),
}

impl EpochAppend<'_> {
    /// The epoch's number (what [`EpochAppend::commit`] returns).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Appends pages of this epoch: full page groups are written as they fill, the last
    /// partial one is kept (at most [`GROUP_ENTRIES_MAX`] pages, copied) until more pages or
    /// the commit come. `pages` are checked first (range, length, no page twice within the
    /// call or the open group); a refused call writes nothing and the epoch goes on. Each
    /// page must appear at most once in the whole epoch: the caller guarantees it across
    /// calls (a page written twice would be applied in its last version).
    pub fn add(&mut self, pages: &[EpochPage<'_>]) -> Result<(), LogError> {
        self.check_writable()?;
        // Only the internal one-call form writes a partial group, and adds nothing after it.
        assert!(!self.sealed, "no page may follow a partial page group");
        self.writer.check_pages(pages, &self.open)?;
        self.push(pages, false)
    }

    /// Writes what is left of the epoch, `fdatasync`, the commit record, `fdatasync` (with
    /// [`SyncMode::Data`]), and returns the epoch's number. An epoch without pages commits
    /// too: it gets a new number and a commit record.
    pub fn commit(mut self) -> Result<u64, LogError> {
        self.check_writable()?;
        self.push(&[], true)?;
        let commit = Commit {
            kind: self.kind,
            epoch: self.epoch,
            log_id: self.writer.log_id,
            groups: self.groups,
            pages: self.pages,
            body_bytes: self.body_bytes,
            batch_crc: self.batch.value(),
            origin: self.origin,
        }
        .encode();
        debug_assert!(Commit::decode(&commit.0).is_ok());
        let written = (|| {
            // An empty epoch may not have its segment yet.
            self.writer.write_pieces(
                self.epoch,
                self.kind,
                &mut self.rotate,
                &[],
                "writing a segment header",
            )?;
            self.wrote = true;
            self.writer.sync("fdatasync before a commit record")?;
            self.writer.write_pieces(
                self.epoch,
                self.kind,
                &mut self.rotate,
                &[&commit.0],
                "writing a commit record",
            )?;
            self.writer.sync("fdatasync after a commit record")
        })();
        if let Err(e) = written {
            return Err(self.fail(e));
        }
        self.finished = true;
        let w = &mut *self.writer;
        w.next_epoch = self.epoch + 1;
        w.last_committed = self.epoch;
        if self.kind == CommitKind::Checkpoint {
            w.broken = false;
            // A new generation: the current one becomes the previous (kept as the fallback),
            // and the one before it goes once an epoch after this checkpoint is durable.
            w.remove_below = Some(w.generation);
            w.generation = w.seq;
        } else if let Some(below) = w.remove_below.take() {
            w.remove_segments_below(below, self.epoch);
        }
        Ok(self.epoch)
    }

    fn check_writable(&self) -> Result<(), LogError> {
        if self.finished {
            return Err(self.writer.needs_checkpoint());
        }
        Ok(())
    }

    /// Adds checked `pages`; with `last`, also writes the open group and any partial group
    /// of `pages` (nothing may follow then but the commit).
    fn push(&mut self, pages: &[EpochPage<'_>], last: bool) -> Result<(), LogError> {
        let mut rest = pages;
        let mut groups: Vec<(Box<Block>, Payloads<'_, '_>)> = Vec::new();
        if !self.open.is_empty() {
            let n = (GROUP_ENTRIES_MAX - self.open.len()).min(rest.len());
            let (head, tail) = rest.split_at(n);
            for p in head {
                self.buffer(p);
            }
            rest = tail;
            if self.open.len() == GROUP_ENTRIES_MAX || last {
                self.sealed |= self.open.len() < GROUP_ENTRIES_MAX;
                let entries = std::mem::take(&mut self.open);
                groups.push((self.seal_group(entries), Payloads::Buffered));
            }
        }
        // Whole groups (and with `last` the final partial one) go straight from the caller's
        // pages, without a copy.
        while rest.len() >= GROUP_ENTRIES_MAX || (last && !rest.is_empty()) {
            let (chunk, tail) = rest.split_at(GROUP_ENTRIES_MAX.min(rest.len()));
            self.sealed |= chunk.len() < GROUP_ENTRIES_MAX;
            let entries = chunk.iter().map(|p| self.entry(p)).collect();
            groups.push((self.seal_group(entries), Payloads::Pages(chunk)));
            rest = tail;
        }
        if !groups.is_empty() {
            let mut pieces: Vec<&[u8]> = Vec::new();
            for (block, payloads) in &groups {
                pieces.push(&block.0);
                match payloads {
                    Payloads::Buffered => pieces.extend(self.buf.chunks(PAGE_SIZE)),
                    Payloads::Pages(chunk) => pieces.extend(chunk.iter().filter_map(|p| p.data)),
                }
            }
            let written = self.writer.write_pieces(
                self.epoch,
                self.kind,
                &mut self.rotate,
                &pieces,
                "writing an epoch's pages",
            );
            match written {
                Ok(bytes) => {
                    self.wrote = true;
                    self.body_bytes += bytes;
                }
                Err(e) => return Err(self.fail(e)),
            }
            if groups.iter().any(|(_, p)| matches!(p, Payloads::Buffered)) {
                self.buf.clear();
            }
        }
        debug_assert!(rest.len() < GROUP_ENTRIES_MAX && (rest.is_empty() || !last));
        for p in rest {
            self.buffer(p);
        }
        Ok(())
    }

    fn entry(&self, p: &EpochPage<'_>) -> PageEntry {
        match p.data {
            Some(d) => PageEntry::data(self.epoch, p.page, d),
            None => PageEntry::zero(self.epoch, p.page),
        }
    }

    /// Copies `p` into the open group.
    fn buffer(&mut self, p: &EpochPage<'_>) {
        debug_assert!(self.open.len() < GROUP_ENTRIES_MAX);
        let entry = self.entry(p);
        if let Some(d) = p.data {
            if self.buf.capacity() == 0 {
                self.buf.reserve_exact(GROUP_ENTRIES_MAX * PAGE_SIZE);
            }
            self.buf.extend_from_slice(d);
        }
        self.open.push(entry);
    }

    /// Encodes the next page group of the epoch and counts it for the commit record.
    fn seal_group(&mut self, entries: Vec<PageEntry>) -> Box<Block> {
        for e in &entries {
            self.batch.push(e.crc);
        }
        self.pages += entries.len() as u64;
        let group = PageGroup {
            epoch: self.epoch,
            log_id: self.writer.log_id,
            index: self.groups,
            entries,
        };
        self.groups += 1;
        group.encode()
    }

    /// After a failed write or sync the epoch's fate is unknown: its number is used up and
    /// the writer accepts only a checkpoint.
    fn fail(&mut self, e: LogError) -> LogError {
        self.finished = true;
        let w = &mut *self.writer;
        w.broken = true;
        w.next_epoch = self.epoch + 1;
        log::error!("writing epoch {} to the log failed: {e}", self.epoch);
        e
    }
}

impl Drop for EpochAppend<'_> {
    fn drop(&mut self) {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        self.writer.group_buf = buf;
        if self.finished || !self.wrote {
            // Committed, failed (already handled), or abandoned without a trace: in the last
            // case the number is free for the next epoch.
            return;
        }
        // Abandoned after writing: the epoch's blocks lack a commit record, so a later epoch
        // in the same segment would never be replayed. Its number is used up and only a
        // checkpoint (or `compact`) may follow, as after a failed write.
        let w = &mut *self.writer;
        w.broken = true;
        w.next_epoch = self.epoch + 1;
        log::warn!(
            "epoch {} was abandoned after part of it was written; the log continues only \
             after a checkpoint",
            self.epoch
        );
    }
}

/// A log id that differs between logs: std's per-process random hash keys, mixed with the
/// time and the PID (any of them alone would do; creation is not security-sensitive).
fn random_log_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    h.finish()
}

#[cfg(test)]
mod generations;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::format::{ImageHeader, BLOCK_BYTES, PAGE_BYTES};
    use crate::log::image::ImageError;
    use crate::log::replay::replay_dir;
    use crate::log::test_support::{
        epoch_pages, page, replay_mem, segments_of, Change, Model, TestDir,
    };
    use std::os::unix::fs::PermissionsExt;

    const REGION: RegionInfo = RegionInfo {
        base: 0x7e00_0000_0000,
        len: 32 * PAGE_BYTES,
    };

    fn options(target: u64) -> WriterOptions {
        WriterOptions {
            segment_bytes_target: target,
            sync: SyncMode::Data,
            log_id: Some(42),
        }
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
    }

    #[test]
    fn a_second_writer_is_refused_with_the_directory_and_the_holder() {
        let dir = TestDir::new("lock");
        let logs = dir.0.join("heap");
        let first = LogDir::open(&logs).expect("the first writer gets the directory");
        let err = match LogDir::open(&logs) {
            Err(e) => e,
            Ok(_) => panic!("a second writer must be refused"),
        };
        assert!(
            matches!(&err, LogError::Locked { dir, holder: Some(pid) }
                if dir == &logs && *pid == std::process::id()),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(text.contains(&logs.display().to_string()), "{text}");
        assert!(text.contains(&std::process::id().to_string()), "{text}");
        // A writer through LogWriter is refused the same way.
        assert!(matches!(
            LogWriter::create(&logs, REGION, options(1 << 20)),
            Err(LogError::Locked { .. })
        ));
        drop(first);
        LogDir::open(&logs).expect("the lock is free once its holder is gone");
    }

    #[test]
    fn directory_0700_and_files_0600() {
        let dir = TestDir::new("modes");
        let logs = dir.0.join("heap");
        let mut w = LogWriter::create(&logs, REGION, options(1 << 20)).expect("creating");
        let p = page(1);
        w.append_epoch(&[EpochPage {
            page: 0,
            data: Some(&p),
        }])
        .expect("appending");
        assert_eq!(mode(&logs), 0o700);
        assert_eq!(mode(&logs.join(LOCK_FILE_NAME)), 0o600);
        let seg = logs.join("seg-000001.lego");
        assert_eq!(mode(&seg), 0o600);
        assert_eq!(
            std::fs::read_to_string(logs.join(LOCK_FILE_NAME)).expect("lock file"),
            format!("{}\n", std::process::id())
        );
        // header + group + payload + commit
        assert_eq!(
            std::fs::metadata(&seg).expect("stat").len(),
            4 * BLOCK_BYTES_U64
        );
        drop(w);

        // A directory that holds a log is not overwritten by a new writer.
        let err = match LogWriter::create(&logs, REGION, options(1 << 20)) {
            Err(e) => e,
            Ok(_) => panic!("a directory with segments must be refused"),
        };
        assert!(
            matches!(&err, LogError::NotEmpty { dir, name } if dir == &logs && name == "seg-000001.lego"),
            "{err:?}"
        );
        // A file where the directory should be is refused.
        let file = dir.0.join("file");
        std::fs::write(&file, b"x").expect("writing a file");
        assert!(matches!(
            LogDir::open(&file),
            Err(LogError::NotADirectory { .. })
        ));
    }

    #[test]
    fn segments_rotate_at_the_size_target_between_epochs() {
        let storage = MemoryStorage::new();
        // Room for the header and 5 blocks: an epoch of 2 pages (4 blocks) fits once.
        let target = 6 * BLOCK_BYTES_U64;
        let mut w = LogWriter::with_storage(Box::new(storage.clone()), REGION, options(target))
            .expect("creating");
        let data: Vec<Vec<u8>> = (0..8).map(page).collect();
        for e in 0..4u64 {
            let changes = [
                EpochPage {
                    page: 2 * e,
                    data: Some(&data[2 * e as usize]),
                },
                EpochPage {
                    page: 2 * e + 1,
                    data: Some(&data[2 * e as usize + 1]),
                },
            ];
            assert_eq!(w.append_epoch(&changes).expect("appending"), e + 1);
        }
        let segs = storage.snapshot();
        // Epochs 1+2 (the second starts below the target), then 3+4.
        assert_eq!(segs.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
        for (seq, bytes) in &segs {
            let h = SegmentHeader::decode(bytes).expect("header");
            assert_eq!(h.seq, *seq);
            assert_eq!(h.first_epoch, 2 * seq - 1);
            assert_eq!(bytes.len() as u64, 9 * BLOCK_BYTES_U64);
        }
        assert_eq!(w.segment(), 2);
        assert_eq!(w.next_epoch(), 5);
    }

    #[test]
    fn bad_epochs_are_refused_before_anything_is_written() {
        let storage = MemoryStorage::new();
        let mut w = LogWriter::with_storage(Box::new(storage.clone()), REGION, options(1 << 20))
            .expect("creating");
        let p = page(3);
        let short = [0u8; 100];
        type Expected = fn(&LogError) -> bool;
        let cases: Vec<(Vec<EpochPage<'_>>, Expected)> = vec![
            (
                vec![EpochPage {
                    page: 32,
                    data: Some(&p),
                }],
                |e| {
                    matches!(
                        e,
                        LogError::PageOutOfRange {
                            page: 32,
                            pages: 32
                        }
                    )
                },
            ),
            (
                vec![EpochPage {
                    page: 1,
                    data: Some(&short),
                }],
                |e| matches!(e, LogError::PageLength { page: 1, len: 100 }),
            ),
            (
                vec![
                    EpochPage {
                        page: 7,
                        data: Some(&p),
                    },
                    EpochPage {
                        page: 3,
                        data: None,
                    },
                    EpochPage {
                        page: 7,
                        data: None,
                    },
                ],
                |e| matches!(e, LogError::DuplicatePage { page: 7 }),
            ),
        ];
        for (pages, expected) in cases {
            let err = w.append_epoch(&pages).expect_err("refused");
            assert!(expected(&err), "{err:?}");
        }
        assert!(storage.snapshot().is_empty());
        assert_eq!(w.next_epoch(), 1);
        // An empty epoch is fine: it commits nothing but advances the epoch.
        assert_eq!(w.append_epoch(&[]).expect("empty epoch"), 1);

        assert!(matches!(
            LogWriter::with_storage(Box::new(MemoryStorage::new()), REGION, options(4096)),
            Err(LogError::SegmentTarget { bytes: 4096 })
        ));
        let odd = RegionInfo {
            base: 4096,
            len: 100,
        };
        assert!(matches!(
            LogWriter::with_storage(Box::new(MemoryStorage::new()), odd, options(1 << 20)),
            Err(LogError::Region { .. })
        ));
    }

    /// Which storage call fails.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Op {
        Create,
        Append,
        Sync,
    }

    /// Memory storage whose `nth` call of `op` (counting from 0) fails with `EIO`, once.
    struct Failing {
        inner: MemoryStorage,
        op: Op,
        nth: usize,
        calls: usize,
        // With `true`, a failing append still writes its bytes (the error came afterwards,
        // as with an fsync that fails after the data reached the disk).
        writes_anyway: bool,
    }

    impl Failing {
        fn hit(&mut self, op: Op) -> std::io::Result<()> {
            if op != self.op {
                return Ok(());
            }
            self.calls += 1;
            if self.calls - 1 == self.nth {
                Err(std::io::Error::from_raw_os_error(libc::EIO))
            } else {
                Ok(())
            }
        }
    }

    impl LogStorage for Failing {
        fn create_segment(&mut self, seq: u64) -> std::io::Result<()> {
            self.hit(Op::Create)?;
            self.inner.create_segment(seq)
        }
        fn append(&mut self, offset: u64, pieces: &[&[u8]]) -> std::io::Result<()> {
            let r = self.hit(Op::Append);
            if r.is_ok() || self.writes_anyway {
                self.inner.append(offset, pieces)?;
            }
            r
        }
        fn sync_segment(&mut self) -> std::io::Result<()> {
            self.hit(Op::Sync)
        }
        fn sync_dir(&mut self) -> std::io::Result<()> {
            Ok(())
        }
        fn remove_segment(&mut self, seq: u64) -> std::io::Result<()> {
            self.inner.remove_segment(seq)
        }
        fn segments(&self) -> std::io::Result<Vec<u64>> {
            self.inner.segments()
        }
        fn segment_path(&self, seq: u64) -> PathBuf {
            self.inner.segment_path(seq)
        }
        fn location(&self) -> PathBuf {
            self.inner.location()
        }
        fn open_segment(&self, seq: u64) -> std::io::Result<Box<dyn SegmentSource>> {
            self.inner.open_segment(seq)
        }
        fn scratch_image_path(&self) -> PathBuf {
            self.inner.scratch_image_path()
        }
    }

    /// A failed create, write or sync at any point of the third epoch: the writer reports it,
    /// never reports the epoch durable, accepts only a checkpoint next, and the log then
    /// replays either to the last epoch that was reported durable or, after the checkpoint,
    /// to the checkpoint's image.
    #[test]
    fn after_a_failed_write_or_sync_only_a_checkpoint_continues_the_log() {
        // Calls made by epochs 1 and 2 (one segment): create 1, append 1 + 2 each, sync 1 + 2
        // each. The third epoch's calls are the ones that fail.
        // The last number is the epoch a replay finds right after the failure.
        let cases = [
            (Op::Append, 5, false, 2), // the pages of epoch 3
            (Op::Sync, 5, false, 2),   // the fdatasync before its commit
            (Op::Append, 6, false, 2), // its commit record
            (Op::Append, 6, true, 3),  // its commit record, written but reported failed
            (Op::Sync, 6, false, 3),   // the fdatasync after the commit: the data is there
        ];
        for (op, nth, writes_anyway, replayed) in cases {
            let inner = MemoryStorage::new();
            let failing = Failing {
                inner: inner.clone(),
                op,
                nth,
                calls: 0,
                writes_anyway,
            };
            let mut w = LogWriter::with_storage(Box::new(failing), REGION, options(1 << 20))
                .expect("creating");
            let mut model = Model::new(REGION, 42);
            let mut images = vec![model.image(0)];
            for e in 1..=2u64 {
                let changes: Vec<Change> = vec![(e, Some(page(e))), (10 + e, Some(page(10 + e)))];
                w.append_epoch(&epoch_pages(&changes)).expect("appending");
                model.apply(&changes);
                images.push(model.image(e));
            }
            let changes: Vec<Change> = vec![(3, Some(page(3))), (1, None)];
            let err = w
                .append_epoch(&epoch_pages(&changes))
                .expect_err("the injected failure is reported");
            assert!(matches!(err, LogError::Io { .. }), "{op:?} {nth}: {err:?}");
            // The failed epoch is at most replayed as a whole (if its commit got through).
            let (report, image) =
                replay_mem(&segments_of(&inner), None).expect("epochs 1 and 2 replay");
            let mut with_third = model.clone();
            with_third.apply(&changes);
            assert_eq!(report.epoch, replayed, "{op:?} {nth}");
            if replayed == 2 {
                assert!(image == images[2], "{op:?} {nth}: a torn epoch was applied");
            } else {
                assert!(image == with_third.image(3), "{op:?} {nth}");
            }
            // Nothing but a checkpoint is accepted now.
            assert!(matches!(
                w.append_epoch(&epoch_pages(&changes)),
                Err(LogError::NeedsCheckpoint { epoch: 3 })
            ));
            // The writer cannot know whether epoch 3 is in the log; the checkpoint holds the
            // heap as the program has it, which includes epoch 3's changes.
            let full = with_third.checkpoint_changes();
            assert_eq!(w.checkpoint(&epoch_pages(&full)).expect("checkpoint"), 4);
            let next: Vec<Change> = vec![(20, Some(page(20)))];
            assert_eq!(w.append_epoch(&epoch_pages(&next)).expect("appending"), 5);
            with_third.apply(&next);
            let segs = segments_of(&inner);
            assert_eq!(
                segs.len(),
                2,
                "the older segment stays as the previous generation"
            );
            let (report, image) = replay_mem(&segs, None).expect("replays");
            assert_eq!((report.epoch, report.base_epoch), (5, 4));
            assert!(image == with_third.image(5), "{op:?} {nth}");
        }
    }

    #[test]
    fn a_failed_segment_creation_is_reported_and_the_next_segment_gets_a_new_number() {
        let inner = MemoryStorage::new();
        let failing = Failing {
            inner: inner.clone(),
            op: Op::Create,
            nth: 1,
            calls: 0,
            writes_anyway: false,
        };
        let mut w =
            LogWriter::with_storage(Box::new(failing), REGION, options(SEGMENT_BYTES_TARGET_MIN))
                .expect("creating");
        let p = page(1);
        let one = [EpochPage {
            page: 0,
            data: Some(&p),
        }];
        assert_eq!(w.append_epoch(&one).expect("first epoch"), 1);
        assert!(matches!(w.append_epoch(&one), Err(LogError::Io { .. })));
        assert_eq!(w.checkpoint(&one).expect("checkpoint"), 3);
        let names: Vec<u64> = inner.snapshot().keys().copied().collect();
        // Segment 1 stays as the previous generation.
        assert_eq!(names, vec![1, 2]);
        let (report, _) = replay_mem(&segments_of(&inner), None).expect("replays");
        assert_eq!(report.epoch, 3);
    }

    // Streaming epochs, checkpoints from images, compaction and resume.

    /// A region large enough for several page groups per epoch.
    const BIG: RegionInfo = RegionInfo {
        base: 0x7e00_0000_0000,
        len: 512 * PAGE_BYTES,
    };

    fn memory_writer(storage: &MemoryStorage, region: RegionInfo, target: u64) -> LogWriter {
        LogWriter::with_storage(Box::new(storage.clone()), region, options(target))
            .expect("creating")
    }

    /// `n` distinct pages (n <= the region's pages, a power of two) changed in epoch `e`: some
    /// `ZERO` records, some all-zero pages, the rest with contents of their own.
    fn changes_of(e: u64, n: u64, region_pages: u64) -> Vec<Change> {
        (0..n)
            .map(|i| {
                let p = (i * 7 + e * 13) % region_pages;
                let data = match (i + e) % 5 {
                    0 => None,
                    1 => Some(vec![0; PAGE_SIZE]),
                    _ => Some(page(e * 1000 + i)),
                };
                (p, data)
            })
            .collect()
    }

    fn as_segments(map: &BTreeMap<u64, Vec<u8>>) -> Vec<crate::log::replay::Segment<Vec<u8>>> {
        map.iter()
            .map(|(&seq, b)| crate::log::replay::Segment {
                seq,
                path: PathBuf::from(segment_file_name(seq)),
                source: b.clone(),
            })
            .collect()
    }

    fn file_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("listing")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn streaming_epochs_write_the_same_bytes_as_whole_epochs() {
        let first = changes_of(1, 300, BIG.pages());
        let third = changes_of(3, 130, BIG.pages());
        let whole = MemoryStorage::new();
        let mut w = memory_writer(&whole, BIG, 1 << 20);
        assert_eq!(w.append_epoch(&epoch_pages(&first)).expect("appending"), 1);
        assert_eq!(w.append_epoch(&[]).expect("an empty epoch"), 2);
        assert_eq!(w.append_epoch(&epoch_pages(&third)).expect("appending"), 3);
        let expected = whole.snapshot();
        // The format did not change: epoch 1 is what `encode_epoch` lays out.
        let encoded = super::super::format::encode_epoch(
            1,
            42,
            CommitKind::Delta,
            EpochOrigin::Automatic,
            &epoch_pages(&first),
        );
        let mut bytes: Vec<u8> = encoded
            .body
            .iter()
            .flat_map(|p| p.bytes().to_vec())
            .collect();
        bytes.extend_from_slice(&encoded.commit.0);
        let seg = &expected[&1];
        assert!(seg[BLOCK_BYTES..BLOCK_BYTES + bytes.len()] == bytes[..]);

        for chunk in [1usize, 2, 7, 125, 126, 127, 252, 299, 300] {
            let streamed = MemoryStorage::new();
            let mut w = memory_writer(&streamed, BIG, 1 << 20);
            let mut e = w.begin_epoch().expect("beginning");
            assert_eq!(e.epoch(), 1);
            for c in epoch_pages(&first).chunks(chunk) {
                e.add(c).expect("adding");
                e.add(&[]).expect("adding nothing");
            }
            assert_eq!(e.commit().expect("committing"), 1);
            let e = w.begin_epoch().expect("beginning");
            assert_eq!(e.commit().expect("an empty epoch commits"), 2);
            let mut e = w.begin_epoch().expect("beginning");
            for c in epoch_pages(&third).chunks(chunk) {
                e.add(c).expect("adding");
            }
            assert_eq!(e.commit().expect("committing"), 3);
            assert_eq!(w.last_committed(), 3);
            assert!(streamed.snapshot() == expected, "chunks of {chunk} pages");
            assert_eq!(w.log_bytes(), expected[&1].len() as u64);
        }
    }

    #[test]
    fn a_refused_add_writes_nothing_and_the_epoch_goes_on() {
        let storage = MemoryStorage::new();
        let mut w = memory_writer(&storage, BIG, 1 << 20);
        let p = page(1);
        let mut e = w.begin_epoch().expect("beginning");
        let one = [EpochPage {
            page: 3,
            data: Some(&p),
        }];
        e.add(&one).expect("adding");
        // Page 3 is in the open group already.
        assert!(matches!(
            e.add(&one),
            Err(LogError::DuplicatePage { page: 3 })
        ));
        let outside = [EpochPage {
            page: BIG.pages(),
            data: Some(&p),
        }];
        assert!(matches!(
            e.add(&outside),
            Err(LogError::PageOutOfRange { .. })
        ));
        assert_eq!(e.commit().expect("committing"), 1);
        let mut model = Model::new(BIG, 42);
        model.apply(&[(3, Some(p.clone()))]);
        let (report, image) = replay_mem(&segments_of(&storage), None).expect("replays");
        assert_eq!(report.epoch, 1);
        assert!(image == model.image(1));
    }

    /// Dropping an epoch before its commit: without a trace if nothing was written (the next
    /// epoch gets its number), else the writer asks for a checkpoint, and `compact` gives it.
    #[test]
    fn an_abandoned_epoch_leaves_no_trace_or_asks_for_a_checkpoint() {
        let storage = MemoryStorage::new();
        let mut w = memory_writer(&storage, BIG, 1 << 20);
        let mut model = Model::new(BIG, 42);
        let first = changes_of(1, 10, BIG.pages());
        assert_eq!(w.append_epoch(&epoch_pages(&first)).expect("appending"), 1);
        model.apply(&first);
        let before = storage.snapshot();
        {
            // Fewer pages than a group: they are only buffered.
            let mut e = w.begin_epoch().expect("beginning");
            e.add(&epoch_pages(&changes_of(2, 100, BIG.pages())))
                .expect("adding");
        }
        assert!(storage.snapshot() == before, "nothing was written");
        assert!(!w.is_broken());
        assert_eq!(w.next_epoch(), 2);
        let second = changes_of(3, 20, BIG.pages());
        assert_eq!(w.append_epoch(&epoch_pages(&second)).expect("appending"), 2);
        model.apply(&second);
        {
            // A whole group reaches the log, then the epoch is dropped.
            let mut e = w.begin_epoch().expect("beginning");
            e.add(&epoch_pages(&changes_of(4, 200, BIG.pages())))
                .expect("adding");
        }
        assert!(w.is_broken());
        assert!(matches!(
            w.append_epoch(&[]),
            Err(LogError::NeedsCheckpoint { epoch: 3 })
        ));
        assert!(matches!(
            w.begin_epoch(),
            Err(LogError::NeedsCheckpoint { epoch: 3 })
        ));
        let (report, image) = replay_mem(&segments_of(&storage), None).expect("replays");
        assert_eq!(report.epoch, 2);
        assert!(image == model.image(2));
        assert_eq!(report.dropped.len(), 1, "the abandoned blocks are left out");
        assert_eq!(w.compact().expect("compacting"), 4);
        assert!(!w.is_broken());
        let third = changes_of(5, 30, BIG.pages());
        assert_eq!(w.append_epoch(&epoch_pages(&third)).expect("appending"), 5);
        model.apply(&third);
        let (report, image) = replay_mem(&segments_of(&storage), None).expect("replays");
        assert_eq!((report.epoch, report.base_epoch), (5, 4));
        // The previous generation, kept as the fallback, still ends in the abandoned blocks.
        assert_eq!(report.dropped.len(), 1, "{report}");
        assert!(image == model.image(5));
    }

    /// Compares two images: the same region, log id, pages and bytes; the epoch may differ.
    fn same_but_epoch(a: &[u8], b: &[u8]) -> bool {
        let ha = ImageHeader::decode(&a[..BLOCK_BYTES]).expect("an image");
        let hb = ImageHeader::decode(&b[..BLOCK_BYTES]).expect("an image");
        ImageHeader { epoch: 0, ..ha } == ImageHeader { epoch: 0, ..hb }
            && a[BLOCK_BYTES..] == b[BLOCK_BYTES..]
    }

    #[test]
    fn a_checkpoint_from_a_replayed_image_replays_to_the_same_image() {
        let dir = TestDir::new("ckpt-image");
        let logs = dir.0.join("heap");
        let mut w = LogWriter::create(&logs, BIG, options(16 * BLOCK_BYTES_U64)).expect("creating");
        let mut model = Model::new(BIG, 42);
        for e in 1..=6 {
            let c = changes_of(e, 40, BIG.pages());
            w.append_epoch(&epoch_pages(&c)).expect("appending");
            model.apply(&c);
        }
        drop(w);
        let image = dir.0.join("heap.img");
        replay_dir(&logs, &image, None, &mut |_| {}).expect("replays");
        assert!(std::fs::read(&image).expect("the image") == model.image(6));

        // Into another log (with an epoch of its own, which the checkpoint replaces).
        let other = dir.0.join("other");
        let mut w = LogWriter::create(
            &other,
            BIG,
            WriterOptions {
                log_id: Some(7),
                ..options(1 << 20)
            },
        )
        .expect("creating");
        w.append_epoch(&epoch_pages(&changes_of(9, 5, BIG.pages())))
            .expect("appending");
        assert_eq!(w.checkpoint_from_image(&image).expect("checkpoint"), 2);
        assert_eq!(w.last_committed(), 2);
        assert_eq!(
            file_names(&other),
            vec![
                "lock".to_string(),
                segment_file_name(1),
                segment_file_name(2)
            ]
        );
        drop(w);
        let again = dir.0.join("again.img");
        let report = replay_dir(&other, &again, None, &mut |_| {}).expect("replays");
        assert_eq!((report.epoch, report.base_epoch), (2, 2));
        let mut expected = model.clone();
        expected.log_id = 7;
        assert!(std::fs::read(&again).expect("the image") == expected.image(2));
    }

    /// A sparse image of a larger region, with holes across chunks and explicitly written
    /// zero pages; and images that must be refused.
    #[test]
    fn sparse_images_checkpoint_their_non_zero_pages_and_bad_images_are_refused() {
        let region = RegionInfo {
            base: 0x7e00_0000_0000,
            len: 8192 * PAGE_BYTES,
        };
        let dir = TestDir::new("sparse-image");
        let path = dir.0.join("sparse.img");
        let mut model = Model::new(region, 99);
        for p in [5u64, 3000, 3001, 4301, 8191] {
            model.apply(&[(p, Some(page(p)))]);
        }
        {
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .expect("creating");
            f.set_len(ImageHeader::page_offset(8192)).expect("sizing");
            // Zeros written as data, crossing chunk boundaries.
            let zeros = vec![0u8; 400 * PAGE_SIZE];
            f.write_all_at(&zeros, ImageHeader::page_offset(4000))
                .expect("writing zeros");
            let img = model.image(12);
            for p in [5u64, 3000, 3001, 4301, 8191] {
                let at = ImageHeader::page_offset(p);
                let i = usize::try_from(at).expect("small");
                f.write_all_at(&img[i..i + PAGE_SIZE], at).expect("writing");
            }
            f.write_all_at(&img[..BLOCK_BYTES], 0).expect("header");
        }
        let storage = MemoryStorage::new();
        let mut w = memory_writer(&storage, region, 1 << 20);
        assert_eq!(w.checkpoint_from_image(&path).expect("checkpoint"), 1);
        let (report, image) = replay_mem(&segments_of(&storage), None).expect("replays");
        assert_eq!(report.pages, 5);
        let mut expected = model.clone();
        expected.log_id = 42;
        assert!(image == expected.image(1));

        // Cut short by a page: the header's page count gives it away; nothing was written
        // (the pages found fit in the open group), so the writer is not broken.
        let len = std::fs::metadata(&path).expect("stat").len();
        let f = OpenOptions::new().write(true).open(&path).expect("opening");
        f.set_len(len - PAGE_BYTES).expect("cutting");
        let before = storage.snapshot();
        let err = w.checkpoint_from_image(&path).expect_err("refused");
        assert!(
            matches!(
                err,
                LogError::Image(ImageError::PageCount {
                    header: 5,
                    found: 4,
                    ..
                })
            ),
            "{err:?}"
        );
        assert!(storage.snapshot() == before && !w.is_broken());
        // Not a whole number of pages.
        f.set_len(len - 100).expect("cutting");
        assert!(matches!(
            w.checkpoint_from_image(&path),
            Err(LogError::Image(ImageError::Length { .. }))
        ));
        // Not an image at all.
        let text = dir.0.join("text");
        std::fs::write(&text, b"hello").expect("writing");
        let err = w.checkpoint_from_image(&text).expect_err("refused");
        assert!(err.to_string().contains("not a lego heap image"), "{err}");
        // Another region.
        let small = MemoryStorage::new();
        let mut w = memory_writer(&small, REGION, 1 << 20);
        let image = dir.0.join("small.img");
        std::fs::write(&image, Model::new(BIG, 42).image(3)).expect("writing");
        assert!(matches!(
            w.checkpoint_from_image(&image),
            Err(LogError::ImageRegion { .. })
        ));
        assert!(small.snapshot().is_empty());
    }

    /// Compaction: the log's current generation shrinks to one checkpoint segment that
    /// replays like the log did (the previous generation stays); a crash while it is written
    /// leaves the old log (replays to its last epoch), a crash while the old segments are
    /// removed leaves the checkpoint.
    #[test]
    fn compaction_bounds_the_log_and_a_crash_in_it_replays_the_last_committed_epoch() {
        let storage = MemoryStorage::new();
        let mut w = memory_writer(&storage, REGION, SEGMENT_BYTES_TARGET_MIN);
        let mut model = Model::new(REGION, 42);
        for e in 1..=8 {
            let c = changes_of(e, 6, REGION.pages());
            w.append_epoch(&epoch_pages(&c)).expect("appending");
            model.apply(&c);
        }
        let before = storage.snapshot();
        assert_eq!(before.len(), 8, "one epoch per segment");
        let bytes_before = w.log_bytes();
        assert_eq!(
            bytes_before,
            before.values().map(|b| b.len() as u64).sum::<u64>()
        );
        let (report, image8) = replay_mem(&as_segments(&before), None).expect("replays");
        assert_eq!(report.epoch, 8);
        assert!(image8 == model.image(8));

        assert_eq!(w.compact().expect("compacting"), 9);
        let after = storage.snapshot();
        assert_eq!(
            after.keys().copied().collect::<Vec<_>>(),
            (1..=9).collect::<Vec<u64>>(),
            "the first generation stays as the fallback"
        );
        assert!(w.log_bytes() < bytes_before);
        assert_eq!(w.log_bytes(), after[&9].len() as u64);
        assert_eq!(w.total_bytes(), bytes_before + w.log_bytes());
        assert_eq!(w.generation(), 9);
        let (report, image) = replay_mem(&as_segments(&after), None).expect("replays");
        assert_eq!((report.epoch, report.base_epoch), (9, 9));
        assert!(same_but_epoch(&image, &image8));
        assert!(image == model.image(9));
        assert!(!storage.scratch_image_path().exists(), "no image left");

        let ckpt = &after[&9];
        let cuts = (0..ckpt.len()).step_by(331).chain([ckpt.len() - 1]);
        for cut in cuts {
            let mut crashed = before.clone();
            crashed.insert(9, ckpt[..cut].to_vec());
            let (report, image) = replay_mem(&as_segments(&crashed), None).expect("replays");
            assert_eq!(report.epoch, 8, "cut at {cut}");
            assert!(image == image8, "cut at {cut}");
        }
        for kept_from in 1..=8u64 {
            let mut crashed: BTreeMap<u64, Vec<u8>> = before
                .range(kept_from..)
                .map(|(&s, b)| (s, b.clone()))
                .collect();
            crashed.insert(9, ckpt.clone());
            let (report, image) = replay_mem(&as_segments(&crashed), None).expect("replays");
            assert_eq!(
                (report.epoch, report.base_epoch),
                (9, 9),
                "from {kept_from}"
            );
            assert!(image == model.image(9), "from {kept_from}");
        }
        // The log goes on after the checkpoint.
        let c = changes_of(10, 6, REGION.pages());
        assert_eq!(w.append_epoch(&epoch_pages(&c)).expect("appending"), 10);
        model.apply(&c);
        let (report, image) = replay_mem(&segments_of(&storage), None).expect("replays");
        assert_eq!((report.epoch, report.base_epoch), (10, 9));
        assert!(image == model.image(10));
        assert_eq!(
            storage.snapshot().len(),
            10,
            "the previous generation stays"
        );
    }

    /// After a failed write or sync (the cases of the test above), `compact` makes the last
    /// epoch replay finds the checkpoint's content, and the log goes on.
    #[test]
    fn a_broken_writer_recovers_by_compacting() {
        let cases = [
            (Op::Append, 5, false, 2),
            (Op::Sync, 5, false, 2),
            (Op::Append, 6, false, 2),
            (Op::Append, 6, true, 3),
            (Op::Sync, 6, false, 3),
            // The first epoch's pages: nothing was ever committed.
            (Op::Append, 1, false, 0),
        ];
        for (op, nth, writes_anyway, replayed) in cases {
            let inner = MemoryStorage::new();
            let failing = Failing {
                inner: inner.clone(),
                op,
                nth,
                calls: 0,
                writes_anyway,
            };
            let mut w = LogWriter::with_storage(Box::new(failing), REGION, options(1 << 20))
                .expect("creating");
            let mut models = vec![Model::new(REGION, 42)];
            let all: Vec<Vec<Change>> = (1..=3u64)
                .map(|e| vec![(e, Some(page(e))), (10 + e, Some(page(10 + e))), (30, None)])
                .collect();
            for changes in &all {
                let mut m = models.last().expect("a model").clone();
                m.apply(changes);
                models.push(m);
                if w.append_epoch(&epoch_pages(changes)).is_err() {
                    break;
                }
            }
            let failed = models.len() as u64 - 1;
            assert!(w.is_broken(), "{op:?} {nth}");
            assert_eq!(w.last_committed(), failed - 1, "{op:?} {nth}");
            let epoch = w.compact().expect("compacting");
            assert_eq!(epoch, failed + 1, "{op:?} {nth}");
            assert!(!w.is_broken());
            assert_eq!(w.last_committed(), epoch);
            let mut expected = models[usize::try_from(replayed).expect("small")].clone();
            let next: Vec<Change> = vec![(20, Some(page(20)))];
            assert_eq!(
                w.append_epoch(&epoch_pages(&next)).expect("appending"),
                epoch + 1
            );
            expected.apply(&next);
            let segs = segments_of(&inner);
            // The first generation stays as the fallback (the next compaction removes it).
            assert_eq!(segs.len(), 2, "{op:?} {nth}");
            let (report, image) = replay_mem(&segs, None).expect("replays");
            assert_eq!((report.epoch, report.base_epoch), (epoch + 1, epoch));
            assert!(image == expected.image(epoch + 1), "{op:?} {nth}");
        }
    }

    /// Resume after a restore from an older epoch: the checkpoint is numbered after the whole
    /// log (a crash while it is written replays the old log's last epoch, never an older one),
    /// epochs after it replay on top; another log's image is refused.
    #[test]
    fn resume_continues_a_log_from_a_replayed_image() {
        let dir = TestDir::new("resume");
        let logs = dir.0.join("heap");
        let opts = options(SEGMENT_BYTES_TARGET_MIN);
        let mut w = LogWriter::create(&logs, REGION, opts).expect("creating");
        let mut models = vec![Model::new(REGION, 42)];
        for e in 1..=5 {
            let c = changes_of(e, 6, REGION.pages());
            w.append_epoch(&epoch_pages(&c)).expect("appending");
            let mut m = models.last().expect("a model").clone();
            m.apply(&c);
            models.push(m);
        }
        let image = dir.0.join("heap.img");
        replay_dir(&logs, &image, Some(3), &mut |_| {}).expect("replays epoch 3");
        match LogWriter::resume(&logs, REGION, opts, &image) {
            Err(LogError::Locked { .. }) => {}
            Err(e) => panic!("expected the lock to refuse: {e:?}"),
            Ok(_) => panic!("a second writer must be refused"),
        }
        drop(w);
        let old: Vec<(String, Vec<u8>)> = (1..=5)
            .map(|s| {
                let name = segment_file_name(s);
                let bytes = std::fs::read(logs.join(&name)).expect("a segment");
                (name, bytes)
            })
            .collect();

        let mut w = LogWriter::resume(&logs, REGION, opts, &image).expect("resuming");
        assert_eq!((w.last_committed(), w.next_epoch(), w.log_id()), (6, 7, 42));
        assert_eq!(
            file_names(&logs),
            vec!["lock".to_string(), segment_file_name(6)]
        );
        let ckpt = std::fs::read(logs.join(segment_file_name(6))).expect("the checkpoint");
        let mut model = models[3].clone();
        for e in 7..=8 {
            let c = changes_of(e, 6, REGION.pages());
            assert_eq!(w.append_epoch(&epoch_pages(&c)).expect("appending"), e);
            model.apply(&c);
        }
        assert_eq!(w.compact().expect("compacting"), 9);
        // The resumed generation (segments 6 to 8) stays as the previous one.
        let mut names = vec!["lock".to_string()];
        names.extend((6..=9).map(segment_file_name));
        assert_eq!(file_names(&logs), names);
        assert_eq!(mode(&logs.join(segment_file_name(9))), 0o600);
        drop(w);
        let out = dir.0.join("after.img");
        let report = replay_dir(&logs, &out, None, &mut |_| {}).expect("replays");
        assert_eq!((report.epoch, report.base_epoch), (9, 9));
        assert!(std::fs::read(&out).expect("the image") == model.image(9));

        // A crash while resume wrote its checkpoint: the old log replays to its last epoch.
        let mut crashed: BTreeMap<u64, Vec<u8>> = old
            .iter()
            .enumerate()
            .map(|(i, (_, b))| (i as u64 + 1, b.clone()))
            .collect();
        for cut in (0..ckpt.len()).step_by(509).chain([ckpt.len() - 1]) {
            crashed.insert(6, ckpt[..cut].to_vec());
            let (report, image) = replay_mem(&as_segments(&crashed), None).expect("replays");
            assert_eq!(report.epoch, 5, "cut at {cut}");
            assert!(image == models[5].image(5), "cut at {cut}");
        }
        crashed.insert(6, ckpt);
        let (report, image) = replay_mem(&as_segments(&crashed), None).expect("replays");
        assert_eq!(report.epoch, 6);
        assert!(same_but_epoch(&image, &models[3].image(3)));

        // Another log's image is refused, naming both ids, and the log is left as it was.
        let other = dir.0.join("other");
        let mut w = LogWriter::create(
            &other,
            REGION,
            WriterOptions {
                log_id: Some(0x77),
                ..opts
            },
        )
        .expect("creating");
        w.append_epoch(&epoch_pages(&changes_of(1, 3, REGION.pages())))
            .expect("appending");
        drop(w);
        let foreign = dir.0.join("other.img");
        replay_dir(&other, &foreign, None, &mut |_| {}).expect("replays");
        let err = match LogWriter::resume(&logs, REGION, opts, &foreign) {
            Err(e) => e,
            Ok(_) => panic!("another log's image must be refused"),
        };
        assert!(
            matches!(
                err,
                LogError::LogIdMismatch {
                    image_id: 0x77,
                    log_id: 42,
                    ..
                }
            ),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains("0x0000000000000077") && text.contains("0x000000000000002a"),
            "{text}"
        );
        assert_eq!(file_names(&logs), names, "the log is left as it was");
        // Another region is refused too.
        let region = RegionInfo {
            len: 64 * PAGE_BYTES,
            ..REGION
        };
        assert!(matches!(
            LogWriter::resume(&logs, region, opts, &out),
            Err(LogError::ImageRegion { .. })
        ));

        // An empty directory: a new log under the image's id, numbered after its epoch.
        let fresh = dir.0.join("fresh");
        let w = LogWriter::resume(&fresh, REGION, opts, &out).expect("resuming");
        assert_eq!((w.log_id(), w.last_committed()), (42, 10));
        drop(w);
        let report = replay_dir(&fresh, &out, None, &mut |_| {}).expect("replays");
        assert_eq!((report.epoch, report.base_epoch), (10, 10));
        assert!(std::fs::read(&out).expect("the image") == model.image(10));
    }
}
