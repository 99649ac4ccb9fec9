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
//! - After a failed write or sync the writer does not know what is durable, so it never
//!   pretends: the epoch's number is skipped, and the only thing it accepts next is a
//!   [`LogWriter::checkpoint`] (a full image in a new segment, which replay accepts after a
//!   gap). See `docs/DESIGN.md`, "The log".
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
    encode_epoch, segment_file_name, CommitKind, EpochPage, RegionInfo, SegmentHeader,
    BLOCK_BYTES_U64, SEGMENT_FLAG_CHECKPOINT,
};
use super::uring::SegmentRing;
use crate::io::{self, IoError, WriteOp};
use crate::PAGE_SIZE;

/// Name of the lock file inside the log directory.
pub const LOCK_FILE_NAME: &str = "lock";

/// Default size at which the writer starts a new segment, in bytes.
pub const SEGMENT_BYTES_TARGET_DEFAULT: u64 = 64 << 20;

/// Smallest accepted segment size target: the header and one epoch of one page.
pub const SEGMENT_BYTES_TARGET_MIN: u64 = 4 * BLOCK_BYTES_U64;

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
}

/// A log directory, locked for one writer for as long as the value lives. Segments are written
/// through io_uring ([`super::uring`]): `append` may return before its bytes are written, and
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
    pub(crate) fn inject(&mut self, at: super::uring::FaultAt, fault: super::uring::Fault) {
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
    // Set by a failed write or sync: the writer accepts only a checkpoint until one succeeds.
    broken: bool,
}

impl LogWriter {
    /// Starts a new log in `dir` (created 0700 if missing) for `region`. The directory must
    /// not hold segments already: continuing an existing log is the restore path's job.
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
        region
            .check(super::format::Record::SegmentHeader)
            .map_err(|source| LogError::Region { region, source })?;
        if options.segment_bytes_target < SEGMENT_BYTES_TARGET_MIN {
            return Err(LogError::SegmentTarget {
                bytes: options.segment_bytes_target,
            });
        }
        let existing = storage.segments().map_err(|source| LogError::List {
            dir: storage.location(),
            source,
        })?;
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
            broken: false,
        })
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

    /// Appends one epoch of `pages` (each at most once) and returns its number once it is
    /// durable (with [`SyncMode::Data`]).
    pub fn append_epoch(&mut self, pages: &[EpochPage<'_>]) -> Result<u64, LogError> {
        if self.broken {
            return Err(LogError::NeedsCheckpoint {
                epoch: self.next_epoch - 1,
            });
        }
        self.check_pages(pages)?;
        let rotate = self.seq == 0 || self.offset >= self.options.segment_bytes_target;
        self.write_epoch(pages, CommitKind::Delta, rotate)
    }

    /// Appends a checkpoint: `pages` must be every non-zero page of the heap. It starts a new
    /// segment, and once it is durable the older segments are removed (oldest first, so a
    /// crash in between leaves a contiguous run that still replays). Returns its epoch.
    pub fn checkpoint(&mut self, pages: &[EpochPage<'_>]) -> Result<u64, LogError> {
        self.check_pages(pages)?;
        let epoch = self.write_epoch(pages, CommitKind::Checkpoint, true)?;
        self.broken = false;
        let older: Vec<u64> = match self.storage.segments() {
            Ok(all) => all.into_iter().filter(|&s| s < self.seq).collect(),
            Err(e) => {
                log::warn!(
                    "listing {} after the checkpoint of epoch {epoch} failed: {e}",
                    self.storage.location().display()
                );
                return Ok(epoch);
            }
        };
        // The checkpoint is durable: what follows only bounds the log. A segment that cannot
        // be removed costs space, not correctness (replay skips to the checkpoint).
        for seq in older {
            if let Err(e) = self.storage.remove_segment(seq) {
                log::warn!(
                    "removing {} (older than the checkpoint of epoch {epoch}) failed: {e}",
                    self.storage.segment_path(seq).display()
                );
                return Ok(epoch);
            }
        }
        if self.options.sync == SyncMode::Data {
            if let Err(e) = self.storage.sync_dir() {
                log::warn!(
                    "syncing {} after removing old segments failed: {e}",
                    self.storage.location().display()
                );
            }
        }
        Ok(epoch)
    }

    fn check_pages(&self, pages: &[EpochPage<'_>]) -> Result<(), LogError> {
        let region_pages = self.region.pages();
        let mut seen = Vec::with_capacity(pages.len());
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
        seen.sort_unstable();
        match seen.windows(2).find(|w| w[0] == w[1]) {
            Some(w) => Err(LogError::DuplicatePage { page: w[0] }),
            None => Ok(()),
        }
    }

    fn write_epoch(
        &mut self,
        pages: &[EpochPage<'_>],
        kind: CommitKind,
        rotate: bool,
    ) -> Result<u64, LogError> {
        let epoch = self.next_epoch;
        // From here on a failure leaves the epoch's fate unknown: its number is used up.
        self.next_epoch += 1;
        match self.try_write_epoch(epoch, pages, kind, rotate) {
            Ok(()) => Ok(epoch),
            Err(e) => {
                self.broken = true;
                log::error!("writing epoch {epoch} to the log failed: {e}");
                Err(e)
            }
        }
    }

    fn try_write_epoch(
        &mut self,
        epoch: u64,
        pages: &[EpochPage<'_>],
        kind: CommitKind,
        rotate: bool,
    ) -> Result<(), LogError> {
        if rotate {
            self.start_segment(epoch, kind)?;
        }
        let encoded = encode_epoch(epoch, self.log_id, kind, pages);
        let body: Vec<&[u8]> = encoded.body.iter().map(|p| p.bytes()).collect();
        let sync = self.options.sync == SyncMode::Data;
        self.storage
            .append(self.offset, &body)
            .map_err(|source| self.io_error("writing an epoch's pages", source))?;
        if sync {
            self.storage
                .sync_segment()
                .map_err(|source| self.io_error("fdatasync before a commit record", source))?;
        }
        debug_assert!(super::format::Commit::decode(&encoded.commit.0).is_ok());
        self.storage
            .append(self.offset + encoded.body_bytes, &[&encoded.commit.0])
            .map_err(|source| self.io_error("writing a commit record", source))?;
        if sync {
            self.storage
                .sync_segment()
                .map_err(|source| self.io_error("fdatasync after a commit record", source))?;
        }
        self.offset += encoded.bytes();
        Ok(())
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
        self.storage
            .append(0, &[&block.0])
            .map_err(|e| io_err("writing the header", e))?;
        if self.options.sync == SyncMode::Data {
            self.storage
                .sync_segment()
                .map_err(|e| io_err("fdatasync of the header", e))?;
            self.storage
                .sync_dir()
                .map_err(|e| io_err("syncing the directory after creating", e))?;
        }
        self.offset = BLOCK_BYTES_U64;
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
mod tests {
    use super::*;
    use crate::log::format::PAGE_BYTES;
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
            assert_eq!(segs.len(), 1, "the checkpoint removed the older segment");
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
        assert_eq!(names, vec![2]);
        let (report, _) = replay_mem(&segments_of(&inner), None).expect("replays");
        assert_eq!(report.epoch, 3);
    }
}
