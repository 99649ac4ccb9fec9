//! Reading the log back: [`plan`] finds the last complete epoch and where each of its pages
//! is, [`write_image`] writes the heap image, [`replay_dir`] does both for a directory and
//! [`inspect_dir`] describes a log without writing anything.
//!
//! Rules of replay (point-in-time recovery; `docs/DESIGN.md`, "The log", says why):
//! - Segments are read in sequence order, every block's CRC and every page's CRC is checked,
//!   and epochs are applied in order. An epoch is applied only once its commit record is read
//!   and matches the records before it; an incomplete epoch is never applied.
//! - The first bad or missing record ends the segment it is in; nothing after it in that
//!   segment is applied. A later segment is applied only if it continues the chain of epochs:
//!   its first epoch is the one after the last applied epoch, or it begins with a checkpoint
//!   (a full image) numbered after it. So the image is always exactly some committed epoch.
//! - The image is complete only from epoch 1 or from a checkpoint: a log whose oldest segment
//!   starts elsewhere, with no checkpoint after it, gives no image.
//! - A damaged newest checkpoint applies nothing and the segments after it do not continue the
//!   chain: the image is the previous generation's newest epoch, and the report says it fell
//!   back ([`ReplayReport::fell_back_from`]).
//! - [`Target::ProgramCheckpoint`] recovers the newest epoch `lego_checkpoint()` made;
//!   [`check_strict`] (`--strict`) refuses a log with any damage.
//! - Replay only reads the log (no lock): it can run while a writer appends.
//!
//! Two passes: the first reads the whole log sequentially, checks it and keeps, per page, the
//! place of its newest committed version (a map, not the pages); the second reads those pages
//! (in log order, runs of adjacent pages in one read), checks their CRC again and writes the
//! non-zero ones to the image. Replay never holds more than [`RUN_PAGES_MAX`] pages (twice,
//! with [`plan_into`]) and [`READ_AHEAD_CHUNKS`] + 1 chunks of [`READ_CHUNK_BYTES`].
//!
//! Reading at the disk's speed: segment files are read with `O_DIRECT` into aligned buffers
//! (buffered reads cost more kernel time than the disk takes; file systems that refuse
//! `O_DIRECT`, like tmpfs, are read through the page cache), and in the first pass a reader
//! thread per segment keeps the next chunks in flight while the current one is checked.
//! [`replay_dir`] plans with [`plan_into`], whose first pass writes every checked page version
//! into the (temporary) image as it reads it, so that the second pass reads again only the
//! pages whose written version did not turn out final: usually none. The image is written
//! through the page cache, its writeback started as the second pass goes so that the final
//! `fdatasync` has less left to do.

use std::collections::HashMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::Scope;

use thiserror::Error;

use super::format::{
    parse_segment_file_name, BatchCrc, BlockKind, Commit, CommitKind, EntryKind, EpochOrigin,
    FormatError, ImageHeader, PageEntry, PageGroup, Record, RegionInfo, SegmentHeader, BLOCK_BYTES,
    BLOCK_BYTES_U64, PAGE_BYTES,
};
use crate::io::{self, AlignedBuf, DIRECT_ALIGN_BYTES};
use crate::PAGE_SIZE;

/// Bytes read from a segment at once in the first pass.
pub const READ_CHUNK_BYTES: usize = 2 << 20;

/// Chunks the first pass's reader thread reads ahead of the one being checked.
pub const READ_AHEAD_CHUNKS: usize = 2;

/// Image bytes written between two starts of their writeback.
pub const WRITEBACK_BYTES: usize = 16 << 20;

/// Most pages read (and written) with one call in the second pass.
pub const RUN_PAGES_MAX: usize = 256;

const _: () =
    assert!(READ_CHUNK_BYTES.is_multiple_of(BLOCK_BYTES) && READ_CHUNK_BYTES >= BLOCK_BYTES);
// Blocks and pages of the log are aligned as O_DIRECT asks, so every read replay makes is.
const _: () = assert!(BLOCK_BYTES.is_multiple_of(DIRECT_ALIGN_BYTES) && PAGE_SIZE == BLOCK_BYTES);
const _: () = assert!(READ_AHEAD_CHUNKS >= 1);

/// Program checkpoints `lego inspect` lists by number per segment (the newest ones; the rest
/// are counted).
pub const INSPECT_PROGRAM_EPOCHS_SHOWN: usize = 16;

/// Which epoch a replay recovers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Target {
    /// The newest complete epoch (point-in-time recovery).
    #[default]
    Newest,
    /// Epoch N (`--epoch N`).
    Epoch(u64),
    /// The newest program checkpoint, an epoch `lego_checkpoint()` made (`--checkpoint`):
    /// automatic epochs after it are left out.
    ProgramCheckpoint,
}

/// How `lego replay` recovers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayOptions {
    pub target: Target,
    /// Refuse (write no image) when anything in the log is damaged or left out, instead of
    /// recovering the last epoch before the damage (`--strict`).
    pub strict: bool,
}

/// Read access to one segment: a file, or bytes in memory (tests). Shared with the reader
/// thread of the first pass, hence `Sync`.
pub trait SegmentSource: Sync {
    /// Bytes in the segment.
    fn size(&self) -> u64;
    /// Reads at `offset` into `buf`, like `pread`: fewer bytes only at the end, 0 past it.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize>;
}

impl SegmentSource for [u8] {
    fn size(&self) -> u64 {
        <[u8]>::len(self) as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.len());
        let n = buf.len().min(<[u8]>::len(self) - start);
        buf[..n].copy_from_slice(&self[start..start + n]);
        Ok(n)
    }
}

impl SegmentSource for Vec<u8> {
    fn size(&self) -> u64 {
        self.as_slice().len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        SegmentSource::read_at(self.as_slice(), offset, buf)
    }
}

impl<T: SegmentSource + ?Sized> SegmentSource for Box<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        (**self).read_at(offset, buf)
    }
}

/// A segment file opened for reading; its length is taken once, at open. Reads whose buffer,
/// offset and length are aligned go through a second descriptor opened with `O_DIRECT`, the
/// others (and all of them where the file system refuses `O_DIRECT`) through the page cache.
pub struct SegmentFile {
    file: File,
    /// The same file opened with `O_DIRECT`, unless its file system refused that.
    direct: Option<File>,
    /// Set when a direct read failed with `EINVAL` (a file system that opens with `O_DIRECT`
    /// but cannot read that way): later reads go through the page cache.
    direct_refused: AtomicBool,
    len: u64,
}

impl SegmentFile {
    /// Opens the segment at `path` read-only.
    pub fn open(path: &Path) -> std::io::Result<SegmentFile> {
        let file = File::open(path)?;
        let meta = file.metadata()?;
        let direct = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(d) => {
                // The path could name another file by now (a segment replaced by compaction):
                // then only the first descriptor is used.
                let d_meta = d.metadata()?;
                (d_meta.dev() == meta.dev() && d_meta.ino() == meta.ino()).then_some(d)
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                log::debug!(
                    "{} refuses O_DIRECT; replay reads it through the page cache",
                    path.display()
                );
                None
            }
            Err(e) => return Err(e),
        };
        Ok(SegmentFile {
            file,
            direct,
            direct_refused: AtomicBool::new(false),
            len: meta.len(),
        })
    }
}

/// `pread` that retries when interrupted.
fn pread(file: &File, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match file.read_at(buf, offset) {
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

impl SegmentSource for SegmentFile {
    fn size(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(direct) = &self.direct {
            if io::is_direct_aligned(offset, buf) && !self.direct_refused.load(Ordering::Relaxed) {
                // A short tail comes back short, which is what `read_at` promises; the caller's
                // next read is then unaligned and goes through the page cache, finding the end.
                match pread(direct, offset, buf) {
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        self.direct_refused.store(true, Ordering::Relaxed);
                    }
                    other => return other,
                }
            }
        }
        pread(&self.file, offset, buf)
    }
}

/// One segment of a log: its sequence number (from its file name), where it is, its bytes.
pub struct Segment<S> {
    pub seq: u64,
    pub path: PathBuf,
    pub source: S,
}

/// Where a replay is, for a progress display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// First pass: `done` of `total` bytes of the log read.
    ReadingLog { done: u64, total: u64 },
    /// Second pass: `done` of `total` pages written to the image.
    WritingImage { done: u64, total: u64 },
}

/// Errors that leave nothing usable (or an image that could not be written).
#[derive(Debug, Error)]
pub enum ReplayError {
    #[error("reading the log directory {dir} failed")]
    ReadDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("opening the segment {path} failed")]
    OpenSegment {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{dir} holds no log segments (files named like seg-000001.lego)")]
    NoSegments { dir: PathBuf },
    #[error("the log in {dir} holds no complete epoch: {reason}")]
    NothingCommitted { dir: PathBuf, reason: String },
    #[error(
        "the log in {dir} cannot give a whole heap: its oldest segment {path} starts at epoch \
         {first_epoch}, which is neither the first epoch nor a checkpoint, and no checkpoint \
         follows (older segments are missing)"
    )]
    NoBase {
        dir: PathBuf,
        path: PathBuf,
        first_epoch: u64,
    },
    #[error(
        "the log in {dir} holds no program checkpoint (an epoch made by lego_checkpoint()) that \
         replay can reach: it holds epochs {first} to {last}, all cut automatically; replay \
         without --checkpoint recovers epoch {last}"
    )]
    NoProgramCheckpoint { dir: PathBuf, first: u64, last: u64 },
    #[error(
        "the log in {dir} is damaged, and --strict recovers nothing from a damaged log: \
         {first}{}; replay without --strict recovers the last complete epoch before the damage",
        match more {
            0 => String::new(),
            n => format!(" (and {n} more parts of the log)"),
        }
    )]
    Strict {
        dir: PathBuf,
        /// The first damaged or left-out part: segment, offset and reason.
        first: String,
        more: usize,
    },
    #[error(
        "epoch {asked} cannot be recovered from {dir}: replay can give epochs {first} to {last}{}",
        if *asked > *last {
            " (the usable log ends before it)"
        } else {
            " (it was checkpointed away)"
        }
    )]
    EpochNotAvailable {
        dir: PathBuf,
        asked: u64,
        first: u64,
        last: u64,
    },
    #[error("{path} exists and is not a lego heap image; refusing to replace it (choose another -o IMAGE)")]
    ImageInTheWay { path: PathBuf },
    #[error("{what} {path} failed")]
    Image {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the segment {path} changed while it was replayed: the page at offset {offset} no \
         longer matches what the first pass read"
    )]
    LogChanged {
        path: PathBuf,
        offset: u64,
        #[source]
        source: FormatError,
    },
    #[error("reading the segment {path} at offset {offset} failed")]
    ReadSegment {
        path: PathBuf,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
}

/// Why part of a segment was not applied: a record that is bad or missing.
#[derive(Debug, Error)]
pub enum Damage {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("reading the segment failed")]
    Read(#[source] std::io::Error),
    #[error("the file ends {have} bytes into a {BLOCK_BYTES}-byte block (a torn write)")]
    PartialBlock { have: u64 },
    #[error("the file ends in the middle of epoch {epoch}, before its commit record")]
    EndsMidEpoch { epoch: u64 },
    #[error("the {record} belongs to epoch {found}; epoch {expected} comes next here")]
    WrongEpoch {
        record: Record,
        found: u64,
        expected: u64,
    },
    #[error("the {record} belongs to another log (id {found:#018x}; this segment's is {expected:#018x})")]
    WrongLog {
        record: Record,
        found: u64,
        expected: u64,
    },
    #[error("page group {found} of epoch {epoch} is where group {expected} should be")]
    GroupOrder {
        epoch: u64,
        found: u32,
        expected: u32,
    },
    #[error("a page record names page {page}, outside the region of {pages} pages")]
    PageOutOfRange { page: u64, pages: u64 },
    #[error("epoch {epoch} lists more pages than the region has ({pages})")]
    EpochTooLarge { epoch: u64, pages: u64 },
    #[error(
        "the commit record of epoch {epoch} gives {field} {committed}, but the records before \
         it give {found}"
    )]
    CommitMismatch {
        epoch: u64,
        field: &'static str,
        committed: u64,
        found: u64,
    },
    #[error("the segment's header says it starts with a checkpoint, but epoch {epoch} is not one")]
    NotACheckpoint { epoch: u64 },
}

/// Why a whole segment, or the part of one after some offset, was not applied.
#[derive(Debug, Error)]
pub enum DropReason {
    #[error("{damage}")]
    Damaged {
        /// Offset of the bad or missing record.
        at: u64,
        damage: Damage,
    },
    #[error("its header names segment {found}, but its file name says {expected}")]
    SeqMismatch { found: u64, expected: u64 },
    #[error("it belongs to another log (id {found:#018x}; the log's is {expected:#018x})")]
    OtherLog { found: u64, expected: u64 },
    #[error(
        "it describes another region ({:#x} + {} bytes; the log's is {:#x} + {} bytes)",
        found.base, found.len, expected.base, expected.len
    )]
    OtherRegion {
        found: RegionInfo,
        expected: RegionInfo,
    },
    #[error(
        "it starts at epoch {first}, which does not follow epoch {last} (the last one applied) \
         and is not a checkpoint"
    )]
    DoesNotContinue { first: u64, last: u64 },
    #[error("the replay stopped after epoch {target}, as asked (--epoch or --checkpoint)")]
    AfterTarget { target: u64 },
}

/// A part of the log that replay did not apply.
#[derive(Debug)]
pub struct Dropped {
    pub path: PathBuf,
    /// Offset of the first byte not applied (0: the whole segment).
    pub offset: u64,
    /// Bytes from `offset` to the end of the segment.
    pub bytes: u64,
    /// The incomplete epoch that started at `offset`, if one did.
    pub epoch: Option<u64>,
    pub reason: DropReason,
}

impl Dropped {
    /// Whether this is damage (rather than the part after `--epoch N`).
    pub fn is_damage(&self) -> bool {
        !matches!(self.reason, DropReason::AfterTarget { .. })
    }
}

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.path.file_name().unwrap_or(self.path.as_os_str());
        if self.offset == 0 {
            write!(f, "{} (all {} bytes)", name.to_string_lossy(), self.bytes)?;
        } else {
            write!(
                f,
                "{} from offset {} ({} bytes)",
                name.to_string_lossy(),
                self.offset,
                self.bytes
            )?;
        }
        if let Some(epoch) = self.epoch {
            write!(f, ", epoch {epoch}")?;
        }
        match &self.reason {
            DropReason::Damaged { at, damage } => {
                write!(f, ": at offset {at}: {}", error_chain(damage))
            }
            other => write!(f, ": {other}"),
        }
    }
}

/// What a replay recovered and what it left out.
#[derive(Debug)]
pub struct ReplayReport {
    /// The epoch the image holds.
    pub epoch: u64,
    /// The epoch the image was built from: 1, or the newest checkpoint applied.
    pub base_epoch: u64,
    /// Whether `epoch` is a program checkpoint (the image header says so too).
    pub origin: EpochOrigin,
    /// The oldest epoch this log can give (`--epoch`): 1, or the oldest checkpoint applied.
    pub first_epoch: u64,
    /// The newest program checkpoint replay went through (what `--checkpoint` recovers), and
    /// how many it went through.
    pub newest_program: Option<u64>,
    pub program_epochs: u64,
    /// A newer generation replay could not use: its checkpoint segment (or one whose header is
    /// unreadable) is damaged, so the image is the older generation's newest complete epoch.
    pub fell_back_from: Option<PathBuf>,
    pub region: RegionInfo,
    pub log_id: u64,
    /// Segments whose epochs were read (wholly or in part).
    pub segments_read: usize,
    /// Bytes of the log read in the first pass.
    pub log_bytes_read: u64,
    /// Non-zero pages in the image (filled in by [`write_image`]).
    pub pages: u64,
    /// Length of the image file (filled in by [`write_image`]).
    pub image_bytes: u64,
    pub dropped: Vec<Dropped>,
}

impl fmt::Display for ReplayReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "recovered {}epoch {} (built from epoch {}{})",
            if self.origin.is_program() {
                "program checkpoint "
            } else {
                ""
            },
            self.epoch,
            self.base_epoch,
            if self.base_epoch == 1 {
                ""
            } else {
                ", a checkpoint"
            }
        )?;
        if let Some(path) = &self.fell_back_from {
            let name = path.file_name().unwrap_or(path.as_os_str());
            writeln!(
                f,
                "the newest generation (from {}) is damaged at its checkpoint: fell back to \
                 the previous generation's last complete epoch",
                name.to_string_lossy()
            )?;
        }
        match self.newest_program {
            Some(p) if p != self.epoch => writeln!(
                f,
                "newest program checkpoint: epoch {p} (lego replay --checkpoint recovers it)"
            )?,
            Some(_) => {}
            None => writeln!(f, "no program checkpoint (lego_checkpoint) in the log")?,
        }
        writeln!(
            f,
            "region {:#x}, {} bytes; {} non-zero pages ({} bytes) in an image file of {} bytes",
            self.region.base,
            self.region.len,
            self.pages,
            self.pages * PAGE_BYTES,
            self.image_bytes
        )?;
        writeln!(
            f,
            "read {} segments, {} bytes of log",
            self.segments_read, self.log_bytes_read
        )?;
        if self.dropped.is_empty() {
            return writeln!(f, "nothing dropped");
        }
        writeln!(f, "not applied:")?;
        // Whole segments left out for the same kind of reason are summed up in one line.
        let mut rest = &self.dropped[..];
        while let Some((first, tail)) = rest.split_first() {
            writeln!(f, "  {first}")?;
            let same = tail
                .iter()
                .take_while(|d| {
                    first.offset == 0
                        && d.offset == 0
                        && std::mem::discriminant(&d.reason)
                            == std::mem::discriminant(&first.reason)
                })
                .count();
            if same > 0 {
                let bytes: u64 = tail[..same].iter().map(|d| d.bytes).sum();
                writeln!(
                    f,
                    "  and the {same} segments after it ({bytes} bytes), for the same reason"
                )?;
            }
            rest = &tail[same..];
        }
        Ok(())
    }
}

/// The place of one page's newest committed version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Loc {
    /// Index of the segment in the list replayed.
    pub(crate) seg: usize,
    pub(crate) offset: u64,
    pub(crate) epoch: u64,
    pub(crate) crc: u32,
    /// The payload is all zeros (it is not written: the image reads zeros there already).
    zero: bool,
}

/// The outcome of the first pass: what the image will hold.
pub struct Plan {
    pub report: ReplayReport,
    index: HashMap<u64, Loc>,
    /// What the first pass wrote to the image ([`plan_into`]): per page, the version whose
    /// bytes the image holds, or `None` when the image may hold stale bytes there.
    written: HashMap<u64, Option<Loc>>,
}

/// The first pass's early writes: every page version it reads (checked, committed or not) is
/// written to the image at once, so that the versions that turn out final need no second
/// read. Adjacent pages are written together from a staging buffer of [`RUN_PAGES_MAX`]
/// pages. The image goes through the page cache, so a page rewritten by later epochs costs a
/// copy, not a disk write; the second pass puts right every page whose written version is
/// not the final one.
struct EarlyWrites<'w> {
    out: &'w mut dyn ImageSink,
    staging: Vec<u8>,
    first_page: u64,
    staged: usize,
    written: HashMap<u64, Option<Loc>>,
    /// The first failed write; nothing is written after it.
    error: Option<std::io::Error>,
}

impl<'w> EarlyWrites<'w> {
    fn new(out: &'w mut dyn ImageSink) -> Self {
        EarlyWrites {
            out,
            staging: vec![0; RUN_PAGES_MAX * PAGE_SIZE],
            first_page: 0,
            staged: 0,
            written: HashMap::new(),
            error: None,
        }
    }

    /// Takes the checked `payload` of `page`, found at `loc`.
    fn page(&mut self, page: u64, loc: &Loc, payload: &[u8]) {
        if self.error.is_some() {
            return;
        }
        if loc.zero {
            // Not written: a page written before now holds bytes that are not this version.
            if self.written.contains_key(&page) {
                self.flush();
                self.written.insert(page, None);
            }
            return;
        }
        let follows = self.staged > 0
            && self.staged < RUN_PAGES_MAX
            && page == self.first_page + self.staged as u64;
        if !follows {
            self.flush();
            self.first_page = page;
        }
        let at = self.staged * PAGE_SIZE;
        self.staging[at..at + PAGE_SIZE].copy_from_slice(payload);
        self.staged += 1;
        self.written.insert(page, Some(*loc));
    }

    /// Writes the staged pages.
    fn flush(&mut self) {
        if self.staged == 0 || self.error.is_some() {
            return;
        }
        let bytes = &self.staging[..self.staged * PAGE_SIZE];
        if let Err(e) = self
            .out
            .write_all_at(ImageHeader::page_offset(self.first_page), bytes)
        {
            self.error = Some(e);
        }
        self.staged = 0;
    }
}

impl Plan {
    /// Pages that have a (possibly all-zero) version to write.
    pub fn pages_to_write(&self) -> u64 {
        self.index.len() as u64
    }
}

/// Reads a segment through a buffer of [`READ_CHUNK_BYTES`], either on demand or, made with
/// [`Reader::with_read_ahead`], from a thread that reads the chunks in order ahead of use.
struct Reader<'a, S: SegmentSource + ?Sized> {
    src: &'a S,
    len: u64,
    buf: AlignedBuf,
    start: u64,
    filled: usize,
    // Bytes read from the source so far and handed to the scan (for progress).
    read: u64,
    ahead: Option<ReadAhead>,
}

/// The scan's end of a reader thread: chunks come in order from offset 0 on `full`, and
/// buffers go back on `free`. Dropping it ends the thread (its next send or receive fails).
struct ReadAhead {
    full: mpsc::Receiver<Chunk>,
    free: mpsc::Sender<AlignedBuf>,
}

/// A chunk the reader thread read: `result` is the byte count or the read's error.
struct Chunk {
    start: u64,
    buf: AlignedBuf,
    result: std::io::Result<usize>,
}

/// Reads up to [`READ_CHUNK_BYTES`] at `start` into `buf` (whose length is a multiple of
/// [`BLOCK_BYTES`]): the bytes read, fewer only at the end of the segment (as of `len`).
fn read_chunk<S: SegmentSource + ?Sized>(
    src: &S,
    len: u64,
    start: u64,
    buf: &mut AlignedBuf,
) -> std::io::Result<usize> {
    let want = usize::try_from(len.saturating_sub(start))
        .unwrap_or(usize::MAX)
        .min(buf.len());
    // The request is rounded up to whole blocks so that it stays aligned for O_DIRECT; a file
    // that ends inside the last block simply gives fewer bytes.
    let ask = want.next_multiple_of(BLOCK_BYTES).min(buf.len());
    let bytes = buf.as_mut_slice();
    let mut filled = 0;
    while filled < want {
        let n = src.read_at(start + filled as u64, &mut bytes[filled..ask])?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    // Bytes appended after the length was taken are not part of this replay.
    Ok(filled.min(want))
}

impl<'a, S: SegmentSource + ?Sized> Reader<'a, S> {
    fn new(src: &'a S) -> Self {
        let len = src.size();
        // A small segment gets a small buffer: no need to zero 2 MiB for a few blocks.
        let buf_len = usize::try_from(len.next_multiple_of(BLOCK_BYTES_U64))
            .map_or(READ_CHUNK_BYTES, |l| l.clamp(BLOCK_BYTES, READ_CHUNK_BYTES));
        Reader {
            src,
            len,
            buf: AlignedBuf::new(buf_len),
            start: 0,
            filled: 0,
            read: 0,
            ahead: None,
        }
    }

    /// A reader whose chunks are read by a thread of `scope`, [`READ_AHEAD_CHUNKS`] ahead of
    /// the scan, when the segment holds more than one chunk.
    fn with_read_ahead<'scope>(src: &'a S, scope: &'scope Scope<'scope, '_>) -> Self
    where
        'a: 'scope,
    {
        let mut reader = Reader::new(src);
        if reader.len <= READ_CHUNK_BYTES as u64 {
            return reader;
        }
        let (full_tx, full) = mpsc::channel::<Chunk>();
        let (free, free_rx) = mpsc::channel::<AlignedBuf>();
        for _ in 0..READ_AHEAD_CHUNKS {
            free.send(AlignedBuf::new(READ_CHUNK_BYTES))
                .expect("the receiver is alive");
        }
        let len = reader.len;
        scope.spawn(move || {
            let mut start = 0u64;
            while start < len {
                let Ok(mut buf) = free_rx.recv() else { return };
                let result = read_chunk(src, len, start, &mut buf);
                let last = !matches!(result, Ok(n) if n == READ_CHUNK_BYTES);
                if full_tx.send(Chunk { start, buf, result }).is_err() || last {
                    return;
                }
                start += READ_CHUNK_BYTES as u64;
            }
        });
        reader.ahead = Some(ReadAhead { full, free });
        reader
    }

    /// The block at `offset`: [`BLOCK_BYTES`] bytes, fewer at the end of the segment.
    fn block(&mut self, offset: u64) -> std::io::Result<&[u8]> {
        let in_buffer =
            offset >= self.start && offset + BLOCK_BYTES_U64 <= self.start + self.filled as u64;
        if !in_buffer && !self.next_chunk(offset)? {
            self.fill(offset)?;
        }
        let from = usize::try_from(offset - self.start).expect("inside the buffer");
        let to = (from + BLOCK_BYTES).min(self.filled);
        Ok(&self.buf.as_slice()[from.min(to)..to])
    }

    /// Takes the reader thread's next chunk when it starts at `offset` (the scan goes on where
    /// the current chunk ends): `Ok(false)` when there is no thread or the scan jumped (then
    /// the thread is dropped and the reader reads on demand).
    fn next_chunk(&mut self, offset: u64) -> std::io::Result<bool> {
        let Some(ahead) = &self.ahead else {
            return Ok(false);
        };
        if offset != self.start + self.filled as u64 {
            self.ahead = None;
            return Ok(false);
        }
        let Ok(chunk) = ahead.full.recv() else {
            // The thread stopped after the last chunk: the segment ends here.
            self.start = offset;
            self.filled = 0;
            return Ok(true);
        };
        if chunk.start != offset {
            self.ahead = None;
            return Ok(false);
        }
        let old = std::mem::replace(&mut self.buf, chunk.buf);
        // A buffer of the first, on-demand read may be smaller; the thread needs full ones.
        if old.len() == READ_CHUNK_BYTES {
            let _ = ahead.free.send(old);
        }
        self.start = chunk.start;
        self.filled = 0;
        self.filled = chunk.result?;
        self.read += self.filled as u64;
        Ok(true)
    }

    fn fill(&mut self, offset: u64) -> std::io::Result<()> {
        self.start = offset;
        self.filled = 0;
        self.filled = read_chunk(self.src, self.len, offset, &mut self.buf)?;
        self.read += self.filled as u64;
        Ok(())
    }
}

/// One committed epoch, as the first pass hands it over.
struct Committed<'p> {
    epoch: u64,
    kind: CommitKind,
    origin: EpochOrigin,
    /// Bytes of the epoch in the segment, commit record included.
    bytes: u64,
    pages: &'p [(u64, Option<Loc>)],
}

/// One committed delta epoch after the newest program checkpoint, as compaction copies it:
/// each page record's page and the place of its payload (`None`: a `ZERO` record).
pub(crate) struct LaterEpoch {
    pub(crate) origin: EpochOrigin,
    pub(crate) pages: Vec<(u64, Option<Loc>)>,
}

/// The epochs after the newest program checkpoint of the chain (compaction keeps them after
/// a checkpoint of that program checkpoint), collected while they are at most `bytes_max`.
pub(crate) struct LaterEpochs {
    pub(crate) epochs: Vec<LaterEpoch>,
    /// Bytes of those epochs in the log.
    pub(crate) bytes: u64,
    bytes_max: u64,
    /// A program checkpoint was seen and no automatic checkpoint came after it.
    pub(crate) active: bool,
    /// The epochs came to more than `bytes_max`: they are not kept.
    pub(crate) over: bool,
}

impl LaterEpochs {
    pub(crate) fn new(bytes_max: u64) -> LaterEpochs {
        LaterEpochs {
            epochs: Vec::new(),
            bytes: 0,
            bytes_max,
            active: false,
            over: false,
        }
    }

    fn restart(&mut self, active: bool) {
        self.epochs.clear();
        self.bytes = 0;
        self.active = active;
        self.over = false;
    }

    fn take(&mut self, e: &Committed<'_>) {
        if e.origin.is_program() {
            self.restart(true);
        } else if e.kind == CommitKind::Checkpoint {
            // An automatic checkpoint after the program checkpoint: the epochs after that
            // cannot be applied as changes over it.
            self.restart(false);
        } else if self.active && !self.over {
            self.bytes += e.bytes;
            if self.bytes > self.bytes_max {
                self.over = true;
                self.epochs = Vec::new();
            } else {
                self.epochs.push(LaterEpoch {
                    origin: e.origin,
                    pages: e.pages.to_vec(),
                });
            }
        }
    }
}

/// How the body of a segment ended.
enum BodyEnd {
    /// Every byte belongs to a committed epoch.
    Clean,
    /// The next epoch is after the target; nothing from `offset` on was read.
    Stopped { offset: u64 },
    /// The epoch that started at `epoch_start` is incomplete: the record at `at` is bad.
    Damaged {
        epoch: u64,
        epoch_start: u64,
        at: u64,
        damage: Damage,
    },
}

/// Reads the segment header at offset 0.
fn read_header<S: SegmentSource + ?Sized>(
    reader: &mut Reader<'_, S>,
) -> Result<SegmentHeader, Damage> {
    let block = reader.block(0).map_err(Damage::Read)?;
    if block.is_empty() {
        return Err(FormatError::Truncated {
            record: Record::SegmentHeader,
            need: BLOCK_BYTES,
            have: 0,
        }
        .into());
    }
    Ok(SegmentHeader::decode(block)?)
}

/// What [`scan_body`] tells its caller as it goes.
struct ScanHooks<'h> {
    /// Each committed epoch.
    on_commit: &'h mut dyn FnMut(&Committed<'_>),
    /// Each page version whose payload passed its CRC check, committed or not yet.
    on_page: &'h mut dyn FnMut(u64, &Loc, &[u8]),
    /// Bytes of the segment read so far.
    progress: &'h mut dyn FnMut(u64),
}

/// Reads the epochs of one segment after its header, handing each committed one to
/// `hooks.on_commit`, until the end of the file, the first damage, or the first epoch after
/// `stop_after`.
fn scan_body<S: SegmentSource + ?Sized>(
    seg: usize,
    reader: &mut Reader<'_, S>,
    header: &SegmentHeader,
    stop_after: Option<u64>,
    pending: &mut Vec<(u64, Option<Loc>)>,
    hooks: ScanHooks<'_>,
) -> BodyEnd {
    let ScanHooks {
        on_commit,
        on_page,
        progress,
    } = hooks;
    let region_pages = header.region.pages();
    let mut offset = BLOCK_BYTES_U64;
    let mut epoch = header.first_epoch;
    loop {
        if stop_after.is_some_and(|target| epoch > target) {
            return BodyEnd::Stopped { offset };
        }
        let start = offset;
        let damaged = |at, damage| BodyEnd::Damaged {
            epoch,
            epoch_start: start,
            at,
            damage,
        };
        pending.clear();
        let mut batch = BatchCrc::default();
        let mut groups = 0u32;
        loop {
            progress(reader.read);
            let block = match reader.block(offset) {
                Ok(b) => b,
                Err(e) => return damaged(offset, Damage::Read(e)),
            };
            if block.is_empty() {
                return if offset == start {
                    BodyEnd::Clean
                } else {
                    damaged(offset, Damage::EndsMidEpoch { epoch })
                };
            }
            if block.len() < BLOCK_BYTES {
                let have = block.len() as u64;
                return damaged(offset, Damage::PartialBlock { have });
            }
            let kind = match BlockKind::of(block) {
                Ok(kind) => kind,
                Err(e) => return damaged(offset, e.into()),
            };
            match kind {
                BlockKind::PageGroup => {
                    let group = match PageGroup::decode(block) {
                        Ok(g) => g,
                        Err(e) => return damaged(offset, e.into()),
                    };
                    if let Err(d) = check_group(&group, header, epoch, groups) {
                        return damaged(offset, d);
                    }
                    let group_at = offset;
                    groups += 1;
                    offset += BLOCK_BYTES_U64;
                    for entry in &group.entries {
                        if entry.page >= region_pages {
                            let d = Damage::PageOutOfRange {
                                page: entry.page,
                                pages: region_pages,
                            };
                            return damaged(group_at, d);
                        }
                        if pending.len() as u64 >= region_pages {
                            let d = Damage::EpochTooLarge {
                                epoch,
                                pages: region_pages,
                            };
                            return damaged(group_at, d);
                        }
                        let loc = match entry.kind {
                            EntryKind::Zero => {
                                if let Err(e) = entry.check_payload(&[]) {
                                    return damaged(group_at, e.into());
                                }
                                None
                            }
                            EntryKind::Page => {
                                let payload = match reader.block(offset) {
                                    Ok(b) => b,
                                    Err(e) => return damaged(offset, Damage::Read(e)),
                                };
                                if payload.is_empty() {
                                    return damaged(offset, Damage::EndsMidEpoch { epoch });
                                }
                                if payload.len() < BLOCK_BYTES {
                                    let have = payload.len() as u64;
                                    return damaged(offset, Damage::PartialBlock { have });
                                }
                                if let Err(e) = entry.check_payload(payload) {
                                    return damaged(offset, e.into());
                                }
                                let loc = Loc {
                                    seg,
                                    offset,
                                    epoch,
                                    crc: entry.crc,
                                    zero: payload.iter().all(|&b| b == 0),
                                };
                                on_page(entry.page, &loc, payload);
                                offset += BLOCK_BYTES_U64;
                                Some(loc)
                            }
                        };
                        batch.push(entry.crc);
                        pending.push((entry.page, loc));
                    }
                }
                BlockKind::Commit => {
                    let commit = match Commit::decode(block) {
                        Ok(c) => c,
                        Err(e) => return damaged(offset, e.into()),
                    };
                    let first_of_checkpoint_segment =
                        start == BLOCK_BYTES_U64 && header.starts_with_checkpoint();
                    let checked = check_commit(&commit, header, epoch, groups, pending.len())
                        .and_then(|()| {
                            expect_field(epoch, "body bytes", commit.body_bytes, offset - start)
                        })
                        .and_then(|()| {
                            expect_field(
                                epoch,
                                "batch CRC",
                                commit.batch_crc.into(),
                                batch.value().into(),
                            )
                        })
                        .and_then(|()| {
                            if first_of_checkpoint_segment && commit.kind != CommitKind::Checkpoint
                            {
                                Err(Damage::NotACheckpoint { epoch })
                            } else {
                                Ok(())
                            }
                        });
                    if let Err(d) = checked {
                        return damaged(offset, d);
                    }
                    offset += BLOCK_BYTES_U64;
                    on_commit(&Committed {
                        epoch,
                        kind: commit.kind,
                        origin: commit.origin,
                        bytes: offset - start,
                        pages: pending,
                    });
                    epoch += 1;
                    break;
                }
            }
        }
    }
}

fn check_group(
    group: &PageGroup,
    header: &SegmentHeader,
    epoch: u64,
    index: u32,
) -> Result<(), Damage> {
    const R: Record = Record::PageGroup;
    if group.log_id != header.log_id {
        return Err(Damage::WrongLog {
            record: R,
            found: group.log_id,
            expected: header.log_id,
        });
    }
    if group.epoch != epoch {
        return Err(Damage::WrongEpoch {
            record: R,
            found: group.epoch,
            expected: epoch,
        });
    }
    if group.index != index {
        return Err(Damage::GroupOrder {
            epoch,
            found: group.index,
            expected: index,
        });
    }
    Ok(())
}

fn check_commit(
    commit: &Commit,
    header: &SegmentHeader,
    epoch: u64,
    groups: u32,
    pages: usize,
) -> Result<(), Damage> {
    const R: Record = Record::Commit;
    if commit.log_id != header.log_id {
        return Err(Damage::WrongLog {
            record: R,
            found: commit.log_id,
            expected: header.log_id,
        });
    }
    if commit.epoch != epoch {
        return Err(Damage::WrongEpoch {
            record: R,
            found: commit.epoch,
            expected: epoch,
        });
    }
    expect_field(epoch, "page groups", commit.groups.into(), groups.into())?;
    expect_field(epoch, "page count", commit.pages, pages as u64)
}

fn expect_field(epoch: u64, field: &'static str, committed: u64, found: u64) -> Result<(), Damage> {
    if committed == found {
        Ok(())
    } else {
        Err(Damage::CommitMismatch {
            epoch,
            field,
            committed,
            found,
        })
    }
}

/// The chain of applied epochs while the first pass runs.
struct Chain {
    log_id: u64,
    region: RegionInfo,
    /// Path and first epoch of the oldest segment applied, for the "no base" message.
    oldest: (PathBuf, u64),
    /// The last epoch applied (the first segment's first epoch minus one before any).
    last: u64,
    /// The epoch the image starts from, once it is complete (from epoch 1 or a checkpoint).
    base: Option<u64>,
    /// The first base (the oldest epoch the chain can give).
    first_base: Option<u64>,
    applied: u64,
    /// Whether the last epoch applied is a program checkpoint.
    last_origin: EpochOrigin,
    /// The newest program checkpoint applied, and how many were.
    newest_program: Option<u64>,
    program_epochs: u64,
    /// Index of the newest segment an epoch was applied from.
    last_segment: usize,
}

/// The first pass: reads `segments` (ascending sequence numbers) and works out the image of
/// the last complete epoch, or of epoch `target` when given. `dir` is only for messages.
pub fn plan<S: SegmentSource>(
    dir: &Path,
    segments: &[Segment<S>],
    target: Option<u64>,
    progress: &mut dyn FnMut(Progress),
) -> Result<Plan, ReplayError> {
    plan_with(dir, segments, target, None, None, progress)
}

/// [`plan`] of the newest epoch that also collects the epochs after the newest program
/// checkpoint (up to `later_bytes_max` bytes of them), for compaction.
pub(crate) fn plan_collecting<S: SegmentSource>(
    dir: &Path,
    segments: &[Segment<S>],
    later_bytes_max: u64,
) -> Result<(Plan, LaterEpochs), ReplayError> {
    let mut later = LaterEpochs::new(later_bytes_max);
    let plan = plan_once(dir, segments, None, None, Some(&mut later), &mut |_| {})?;
    Ok((plan, later))
}

/// The epoch number `target` asks for: the newest program checkpoint is found by a first
/// replay without a target (the log is read twice for `--checkpoint`: a program checkpoint is
/// only known to be the newest once the log has been read to its end).
pub fn resolve_target<S: SegmentSource>(
    dir: &Path,
    segments: &[Segment<S>],
    target: Target,
) -> Result<Option<u64>, ReplayError> {
    match target {
        Target::Newest => Ok(None),
        Target::Epoch(n) => Ok(Some(n)),
        Target::ProgramCheckpoint => {
            let p = plan_once(dir, segments, None, None, None, &mut |_| {})?;
            match p.report.newest_program {
                Some(epoch) => Ok(Some(epoch)),
                None => Err(ReplayError::NoProgramCheckpoint {
                    dir: dir.to_path_buf(),
                    first: p.report.first_epoch,
                    last: p.report.epoch,
                }),
            }
        }
    }
}

/// `--strict`: refuses when anything in the log is damaged or left out. The parts a replay
/// with a target did not read (after the target) are read on their own here, so damage there
/// counts too.
pub fn check_strict<S: SegmentSource>(
    dir: &Path,
    segments: &[Segment<S>],
    report: &ReplayReport,
) -> Result<(), ReplayError> {
    let mut damage: Vec<String> = report
        .dropped
        .iter()
        .filter(|d| d.is_damage())
        .map(ToString::to_string)
        .collect();
    for d in report.dropped.iter().filter(|d| !d.is_damage()) {
        let Some((i, seg)) = segments.iter().enumerate().find(|(_, s)| s.path == d.path) else {
            continue;
        };
        let info = inspect_segment(i, seg);
        let name = seg.path.file_name().unwrap_or(seg.path.as_os_str());
        let name = name.to_string_lossy();
        match (&info.header, &info.damage) {
            (Err(e), _) => damage.push(format!(
                "{name} (all {} bytes): at offset 0: {}",
                info.bytes,
                error_chain(e)
            )),
            (Ok(_), Some((at, e))) => damage.push(format!(
                "{name} from offset {} ({} bytes): at offset {at}: {}",
                info.clean_bytes,
                info.bytes - info.clean_bytes,
                error_chain(e)
            )),
            (Ok(_), None) => {}
        }
    }
    match damage.first() {
        None => Ok(()),
        Some(first) => Err(ReplayError::Strict {
            dir: dir.to_path_buf(),
            first: first.clone(),
            more: damage.len() - 1,
        }),
    }
}

/// [`plan`] that also writes every page version it reads to `out` (an empty image, named
/// `image` in messages), so that [`write_image`] then only writes what is not final there yet:
/// with a log whose newest versions of pages are read last, nothing is read twice.
pub fn plan_into<S: SegmentSource>(
    dir: &Path,
    segments: &[Segment<S>],
    target: Option<u64>,
    out: &mut dyn ImageSink,
    image: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<Plan, ReplayError> {
    let mut early = EarlyWrites::new(out);
    let mut plan = plan_with(dir, segments, target, Some(&mut early), None, progress)?;
    early.flush();
    if let Some(source) = early.error {
        return Err(ReplayError::Image {
            path: image.to_path_buf(),
            what: "writing the image",
            source,
        });
    }
    plan.written = early.written;
    Ok(plan)
}

fn plan_with<S: SegmentSource>(
    dir: &Path,
    segments: &[Segment<S>],
    target: Option<u64>,
    early: Option<&mut EarlyWrites<'_>>,
    later: Option<&mut LaterEpochs>,
    progress: &mut dyn FnMut(Progress),
) -> Result<Plan, ReplayError> {
    match plan_once(dir, segments, target, early, later, progress) {
        // An epoch before everything the log can still give: say what it can give.
        Err(ReplayError::NothingCommitted { .. } | ReplayError::NoBase { .. })
            if target.is_some() =>
        {
            let err = plan_once(dir, segments, None, None, None, &mut |_| {})
                .map(|p| ReplayError::EpochNotAvailable {
                    dir: dir.to_path_buf(),
                    asked: target.expect("checked by the guard"),
                    first: p.report.first_epoch,
                    last: p.report.epoch,
                })
                .unwrap_or_else(|e| e);
            Err(err)
        }
        other => other,
    }
}

fn plan_once<S: SegmentSource>(
    dir: &Path,
    segments: &[Segment<S>],
    target: Option<u64>,
    mut early: Option<&mut EarlyWrites<'_>>,
    mut later: Option<&mut LaterEpochs>,
    progress: &mut dyn FnMut(Progress),
) -> Result<Plan, ReplayError> {
    if segments.is_empty() {
        return Err(ReplayError::NoSegments {
            dir: dir.to_path_buf(),
        });
    }
    let total: u64 = segments.iter().map(|s| s.source.size()).sum();
    let mut done = 0u64;
    let mut chain: Option<Chain> = None;
    let mut index: HashMap<u64, Loc> = HashMap::new();
    let mut pending = Vec::new();
    let mut dropped = Vec::new();
    let mut segments_read = 0;
    // The newest segment that may have started a generation (its header says it starts with
    // a checkpoint, or cannot be read) and from which nothing was applied: if it comes after
    // every segment applied, replay fell back to the previous generation.
    let mut unusable_start: Option<(usize, PathBuf)> = None;
    // One reader thread per segment, ended (and joined) when its reader is dropped.
    std::thread::scope(|scope| {
        for (i, seg) in segments.iter().enumerate() {
            let len = seg.source.size();
            let whole = |reason| Dropped {
                path: seg.path.clone(),
                offset: 0,
                bytes: len,
                epoch: None,
                reason,
            };
            if let (Some(c), Some(t)) = (&chain, target) {
                if c.last >= t {
                    dropped.push(whole(DropReason::AfterTarget { target: t }));
                    continue;
                }
            }
            let mut reader = Reader::with_read_ahead(&seg.source, scope);
            let header = match read_header(&mut reader) {
                Ok(h) => h,
                Err(damage) => {
                    done += reader.read;
                    dropped.push(whole(DropReason::Damaged { at: 0, damage }));
                    unusable_start = Some((i, seg.path.clone()));
                    continue;
                }
            };
            if let Err(reason) = accepts(chain.as_ref(), seg, &header) {
                done += reader.read;
                dropped.push(whole(reason));
                continue;
            }
            let c = chain.get_or_insert_with(|| Chain {
                log_id: header.log_id,
                region: header.region,
                oldest: (seg.path.clone(), header.first_epoch),
                last: header.first_epoch - 1,
                base: None,
                first_base: None,
                applied: 0,
                last_origin: EpochOrigin::Automatic,
                newest_program: None,
                program_epochs: 0,
                last_segment: i,
            });
            segments_read += 1;
            let applied_before = c.applied;
            let mut on_commit = |e: &Committed<'_>| {
                if e.kind == CommitKind::Checkpoint {
                    index.clear();
                    c.base = Some(e.epoch);
                } else if e.epoch == 1 {
                    c.base = Some(1);
                }
                c.first_base = c.first_base.or(c.base);
                c.last_origin = e.origin;
                if e.origin.is_program() {
                    c.newest_program = Some(e.epoch);
                    c.program_epochs += 1;
                }
                c.last_segment = i;
                if let Some(l) = later.as_deref_mut() {
                    l.take(e);
                }
                for &(page, loc) in e.pages {
                    match loc {
                        Some(loc) => {
                            index.insert(page, loc);
                        }
                        None => {
                            index.remove(&page);
                        }
                    }
                }
                c.last = e.epoch;
                c.applied += 1;
            };
            let mut on_page = |page: u64, loc: &Loc, payload: &[u8]| {
                if let Some(e) = early.as_deref_mut() {
                    e.page(page, loc, payload);
                }
            };
            let mut on_read = |read: u64| {
                progress(Progress::ReadingLog {
                    done: done + read,
                    total,
                })
            };
            let end = scan_body(
                i,
                &mut reader,
                &header,
                target,
                &mut pending,
                ScanHooks {
                    on_commit: &mut on_commit,
                    on_page: &mut on_page,
                    progress: &mut on_read,
                },
            );
            done += reader.read;
            let applied_none = c.applied == applied_before;
            if applied_none
                && header.starts_with_checkpoint()
                && matches!(end, BodyEnd::Damaged { .. })
            {
                unusable_start = Some((i, seg.path.clone()));
            }
            match end {
                BodyEnd::Stopped { offset } if offset < len => dropped.push(Dropped {
                    path: seg.path.clone(),
                    offset,
                    bytes: len - offset,
                    epoch: None,
                    reason: DropReason::AfterTarget {
                        target: target.expect("only a target stops a segment early"),
                    },
                }),
                BodyEnd::Clean | BodyEnd::Stopped { .. } => {}
                BodyEnd::Damaged {
                    epoch,
                    epoch_start,
                    at,
                    damage,
                } => dropped.push(Dropped {
                    path: seg.path.clone(),
                    offset: epoch_start,
                    bytes: len - epoch_start,
                    epoch: Some(epoch),
                    reason: DropReason::Damaged { at, damage },
                }),
            }
        }
    });
    progress(Progress::ReadingLog { done, total });
    let first_damage = || {
        dropped
            .iter()
            .find(|d| d.is_damage())
            .map(ToString::to_string)
            .unwrap_or_else(|| "no segment holds a commit record".into())
    };
    let Some(chain) = chain.filter(|c| c.applied > 0) else {
        return Err(ReplayError::NothingCommitted {
            dir: dir.to_path_buf(),
            reason: first_damage(),
        });
    };
    let Some(base) = chain.base else {
        return Err(ReplayError::NoBase {
            dir: dir.to_path_buf(),
            path: chain.oldest.0,
            first_epoch: chain.oldest.1,
        });
    };
    if let Some(t) = target.filter(|&t| t != chain.last) {
        return Err(ReplayError::EpochNotAvailable {
            dir: dir.to_path_buf(),
            asked: t,
            first: chain.first_base.unwrap_or(base),
            last: chain.last,
        });
    }
    let fell_back_from = unusable_start
        .filter(|(i, _)| *i > chain.last_segment)
        .map(|(_, path)| path);
    Ok(Plan {
        report: ReplayReport {
            epoch: chain.last,
            base_epoch: base,
            origin: chain.last_origin,
            first_epoch: chain.first_base.unwrap_or(base),
            newest_program: chain.newest_program,
            program_epochs: chain.program_epochs,
            fell_back_from,
            region: chain.region,
            log_id: chain.log_id,
            segments_read,
            log_bytes_read: done,
            pages: 0,
            image_bytes: 0,
            dropped,
        },
        index,
        written: HashMap::new(),
    })
}

/// Whether the segment with `header` continues the chain applied so far.
fn accepts<S>(
    chain: Option<&Chain>,
    seg: &Segment<S>,
    header: &SegmentHeader,
) -> Result<(), DropReason> {
    if header.seq != seg.seq {
        return Err(DropReason::SeqMismatch {
            found: header.seq,
            expected: seg.seq,
        });
    }
    let Some(c) = chain else {
        return Ok(());
    };
    if header.log_id != c.log_id {
        return Err(DropReason::OtherLog {
            found: header.log_id,
            expected: c.log_id,
        });
    }
    if header.region != c.region {
        return Err(DropReason::OtherRegion {
            found: header.region,
            expected: c.region,
        });
    }
    let follows = header.first_epoch == c.last + 1;
    let restarts = header.starts_with_checkpoint() && header.first_epoch > c.last;
    if follows || restarts {
        Ok(())
    } else {
        Err(DropReason::DoesNotContinue {
            first: header.first_epoch,
            last: c.last,
        })
    }
}

/// Where the image's bytes go: a file, or memory (tests).
pub trait ImageSink {
    /// Writes all of `bytes` at `offset` (extending the image as needed).
    fn write_all_at(&mut self, offset: u64, bytes: &[u8]) -> std::io::Result<()>;
    /// Sets the image's length (bytes past the last write read as zeros).
    fn set_len(&mut self, len: u64) -> std::io::Result<()>;
    /// Starts making the bytes written so far durable without waiting (a hint: the caller
    /// still syncs at the end). The default does nothing.
    fn start_writeback(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ImageSink for File {
    fn write_all_at(&mut self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        FileExt::write_all_at(self, bytes, offset)
    }

    fn set_len(&mut self, len: u64) -> std::io::Result<()> {
        File::set_len(self, len)
    }

    fn start_writeback(&mut self) -> std::io::Result<()> {
        io::sync::start_writeback(self.as_fd())
    }
}

impl ImageSink for Vec<u8> {
    fn write_all_at(&mut self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        let at = usize::try_from(offset).map_err(|_| ErrorKind::InvalidInput)?;
        let end = at + bytes.len();
        if self.len() < end {
            self.resize(end, 0);
        }
        self[at..end].copy_from_slice(bytes);
        Ok(())
    }

    fn set_len(&mut self, len: u64) -> std::io::Result<()> {
        self.resize(
            usize::try_from(len).map_err(|_| ErrorKind::InvalidInput)?,
            0,
        );
        Ok(())
    }
}

/// The second pass: writes the image that `plan` describes into `out` (which must be empty,
/// or hold only what [`plan_into`] wrote for this plan), and fills in the report's page count
/// and image size. `segments` must be the ones the plan
/// was made from; `image` is only for messages.
pub fn write_image<S: SegmentSource, W: ImageSink>(
    plan: &mut Plan,
    segments: &[Segment<S>],
    out: &mut W,
    image: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<(), ReplayError> {
    let write_err = |source| ReplayError::Image {
        path: image.to_path_buf(),
        what: "writing the image",
        source,
    };
    let total = plan.index.len() as u64;
    let mut pages = 0u64;
    let mut end_page: Option<u64> = None;
    // Pages whose final version the first pass wrote already ([`plan_into`]) are done; a
    // zero version is never among them.
    let mut order = Vec::new();
    for (&page, &loc) in &plan.index {
        if plan.written.get(&page) == Some(&Some(loc)) {
            pages += 1;
            end_page = Some(end_page.map_or(page + 1, |e| e.max(page + 1)));
        } else {
            order.push((page, loc));
        }
    }
    order.sort_unstable_by_key(|&(_, l)| (l.seg, l.offset));
    let mut done = total - order.len() as u64;
    // Aligned, so that the runs are read with O_DIRECT (their offsets are whole blocks).
    let mut buf = AlignedBuf::new(RUN_PAGES_MAX * PAGE_SIZE);
    let mut unsynced = 0usize;
    for run in runs(&order) {
        let (first_page, first) = run[0];
        let seg = &segments[first.seg];
        let bytes = &mut buf.as_mut_slice()[..run.len() * PAGE_SIZE];
        read_exact_at(seg, first.offset, bytes)?;
        // Every page is checked again before any of the run is written: the log may have
        // been replaced since the first pass, and a wrong page must never reach the image.
        for (k, &(page, loc)) in run.iter().enumerate() {
            let entry = PageEntry {
                kind: EntryKind::Page,
                epoch: loc.epoch,
                page,
                crc: loc.crc,
            };
            entry
                .check_payload(&bytes[k * PAGE_SIZE..(k + 1) * PAGE_SIZE])
                .map_err(|source| ReplayError::LogChanged {
                    path: seg.path.clone(),
                    offset: loc.offset,
                    source,
                })?;
        }
        // Non-zero pages are written, adjacent ones together; zero pages stay holes, unless
        // the first pass wrote other bytes there.
        let is_zero = |k: usize| {
            bytes[k * PAGE_SIZE..(k + 1) * PAGE_SIZE]
                .iter()
                .all(|&b| b == 0)
        };
        let needs_write = |k: usize| !is_zero(k) || plan.written.contains_key(&run[k].0);
        let mut i = 0;
        while i < run.len() {
            if !needs_write(i) {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < run.len() && needs_write(j) {
                j += 1;
            }
            let page = first_page + i as u64;
            out.write_all_at(
                ImageHeader::page_offset(page),
                &bytes[i * PAGE_SIZE..j * PAGE_SIZE],
            )
            .map_err(write_err)?;
            unsynced += (j - i) * PAGE_SIZE;
            for k in i..j {
                if !is_zero(k) {
                    pages += 1;
                    let end = first_page + k as u64 + 1;
                    end_page = Some(end_page.map_or(end, |e| e.max(end)));
                }
            }
            i = j;
        }
        // The disk writes the image while the next runs are read, not all at the end.
        if unsynced >= WRITEBACK_BYTES {
            out.start_writeback().map_err(write_err)?;
            unsynced = 0;
        }
        done += run.len() as u64;
        progress(Progress::WritingImage { done, total });
    }
    // Pages the first pass wrote that the image does not hold (a version of an incomplete
    // epoch, or one a checkpoint left out) become zeros again; past the end, `set_len` cuts
    // them off.
    let mut stale: Vec<u64> = plan
        .written
        .keys()
        .copied()
        .filter(|p| !plan.index.contains_key(p) && end_page.is_some_and(|e| *p < e))
        .collect();
    stale.sort_unstable();
    let zeros = vec![0u8; RUN_PAGES_MAX * PAGE_SIZE];
    let mut rest = &stale[..];
    while let Some(&first) = rest.first() {
        let n = rest
            .iter()
            .take(RUN_PAGES_MAX)
            .enumerate()
            .take_while(|&(k, &p)| p == first + k as u64)
            .count();
        out.write_all_at(ImageHeader::page_offset(first), &zeros[..n * PAGE_SIZE])
            .map_err(write_err)?;
        rest = &rest[n..];
    }
    let header = ImageHeader {
        region: plan.report.region,
        epoch: plan.report.epoch,
        log_id: plan.report.log_id,
        pages,
        origin: plan.report.origin,
    };
    let len = end_page.map_or(BLOCK_BYTES_U64, ImageHeader::page_offset);
    out.set_len(len).map_err(write_err)?;
    out.write_all_at(0, &header.encode().0).map_err(write_err)?;
    plan.report.pages = pages;
    plan.report.image_bytes = len;
    Ok(())
}

/// Splits `order` (sorted by place in the log) into runs of pages that are adjacent both in
/// the log and in the region, at most [`RUN_PAGES_MAX`] long.
fn runs(order: &[(u64, Loc)]) -> impl Iterator<Item = &[(u64, Loc)]> {
    let mut rest = order;
    std::iter::from_fn(move || {
        let (&(page0, loc0), _) = rest.split_first()?;
        let mut n = 1;
        while n < rest.len().min(RUN_PAGES_MAX) {
            let (page, loc) = rest[n];
            let step = n as u64;
            if loc.seg != loc0.seg
                || loc.offset != loc0.offset + step * BLOCK_BYTES_U64
                || page != page0 + step
            {
                break;
            }
            n += 1;
        }
        let (run, tail) = rest.split_at(n);
        rest = tail;
        Some(run)
    })
}

/// Reads all of `buf` at `offset` of `seg` for the second pass (and compaction's copies).
pub(crate) fn read_exact_at<S: SegmentSource>(
    seg: &Segment<S>,
    offset: u64,
    buf: &mut [u8],
) -> Result<(), ReplayError> {
    let mut done = 0;
    while done < buf.len() {
        let at = offset + done as u64;
        match seg.source.read_at(at, &mut buf[done..]) {
            Ok(0) => {
                return Err(ReplayError::LogChanged {
                    path: seg.path.clone(),
                    offset: at,
                    source: FormatError::Truncated {
                        record: Record::PageEntry,
                        need: buf.len(),
                        have: done,
                    },
                })
            }
            Ok(n) => done += n,
            Err(source) => {
                return Err(ReplayError::ReadSegment {
                    path: seg.path.clone(),
                    offset: at,
                    source,
                })
            }
        }
    }
    Ok(())
}

/// The segments in `dir`, ascending, and the other entries found there (for `inspect`).
pub fn open_segments(dir: &Path) -> Result<(Vec<Segment<SegmentFile>>, Vec<String>), ReplayError> {
    let read_dir_err = |source| ReplayError::ReadDir {
        dir: dir.to_path_buf(),
        source,
    };
    let mut found = Vec::new();
    let mut others = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_dir_err)? {
        let entry = entry.map_err(read_dir_err)?;
        let name = entry.file_name();
        match name.to_str().and_then(parse_segment_file_name) {
            Some(seq) => found.push((seq, entry.path())),
            None => others.push(name.to_string_lossy().into_owned()),
        }
    }
    found.sort_unstable();
    others.sort_unstable();
    let segments = found
        .into_iter()
        .map(|(seq, path)| {
            SegmentFile::open(&path)
                .map(|source| Segment {
                    seq,
                    path: path.clone(),
                    source,
                })
                .map_err(|source| ReplayError::OpenSegment { path, source })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((segments, others))
}

/// `lego replay`: replays the log in `dir` into a new image file at `image` (mode 0600),
/// written under a temporary name and renamed into place once it is durable. An existing
/// file at `image` is replaced only if it is a lego image.
pub fn replay_dir(
    dir: &Path,
    image: &Path,
    target: Option<u64>,
    progress: &mut dyn FnMut(Progress),
) -> Result<ReplayReport, ReplayError> {
    let options = ReplayOptions {
        target: target.map_or(Target::Newest, Target::Epoch),
        strict: false,
    };
    replay_dir_with(dir, image, &options, progress)
}

/// [`replay_dir`] with a choice of target (`--checkpoint`) and recovery mode (`--strict`:
/// any damage anywhere in the log is an error, and no image is written).
pub fn replay_dir_with(
    dir: &Path,
    image: &Path,
    options: &ReplayOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<ReplayReport, ReplayError> {
    check_replaceable(image)?;
    let (segments, _) = open_segments(dir)?;
    let target = resolve_target(dir, &segments, options.target)?;
    let image_err = |what, source| ReplayError::Image {
        path: image.to_path_buf(),
        what,
        source,
    };
    let name = image
        .file_name()
        .ok_or_else(|| image_err("naming", ErrorKind::InvalidInput.into()))?;
    let partial = image.with_file_name(format!(
        ".{}.partial-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .map_err(|source| ReplayError::Image {
            path: partial.clone(),
            what: "creating the temporary image",
            source,
        })?;
    // The first pass already writes the pages it reads (under the temporary name), so the
    // image is created before it; it is removed whatever fails.
    let result =
        plan_into(dir, &segments, target, &mut file, &partial, progress).and_then(|mut plan| {
            if options.strict {
                check_strict(dir, &segments, &plan.report)?;
            }
            write_image(&mut plan, &segments, &mut file, &partial, progress)?;
            file.sync_data()
                .map_err(|source| image_err("fdatasync of the image", source))?;
            std::fs::rename(&partial, image)
                .map_err(|source| image_err("renaming the finished image to", source))?;
            Ok(plan.report)
        });
    let report = match result {
        Ok(report) => report,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    let parent = image
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(|source| image_err("syncing the directory of", source))?;
    Ok(report)
}

/// Refuses to replace anything at `image` but a regular file that starts like a lego image.
fn check_replaceable(image: &Path) -> Result<(), ReplayError> {
    let meta = match std::fs::symlink_metadata(image) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ReplayError::Image {
                path: image.to_path_buf(),
                what: "looking at the existing",
                source,
            })
        }
    };
    let mut head = [0u8; 8];
    let is_image = meta.is_file()
        && File::open(image)
            .and_then(|f| f.read_exact_at(&mut head, 0))
            .is_ok()
        && ImageHeader::has_magic(&head);
    if is_image {
        Ok(())
    } else {
        Err(ReplayError::ImageInTheWay {
            path: image.to_path_buf(),
        })
    }
}

/// What `lego inspect` says about one segment, read on its own.
#[derive(Debug)]
pub struct SegmentInfo {
    pub seq: u64,
    pub path: PathBuf,
    pub bytes: u64,
    /// The header, or why it is unreadable (then nothing else was read).
    pub header: Result<SegmentHeader, Damage>,
    /// Committed epochs: how many, the first and the last.
    pub epochs: u64,
    pub first_epoch: Option<u64>,
    pub last_epoch: Option<u64>,
    pub checkpoints: u64,
    /// Program checkpoints among the committed epochs: how many, and the newest
    /// [`INSPECT_PROGRAM_EPOCHS_SHOWN`] of them, ascending.
    pub program_count: u64,
    pub program_epochs: Vec<u64>,
    /// Page records in committed epochs: with a payload, and `ZERO` ones.
    pub page_records: u64,
    pub zero_records: u64,
    /// Where the committed epochs end, and the damage after them if the segment does not
    /// end there.
    pub clean_bytes: u64,
    pub damage: Option<(u64, Damage)>,
}

impl fmt::Display for SegmentInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.path.file_name().unwrap_or(self.path.as_os_str());
        write!(f, "{}  {} bytes", name.to_string_lossy(), self.bytes)?;
        let header = match &self.header {
            Ok(h) => h,
            Err(d) => return write!(f, "\n    unreadable header: {}", error_chain(d)),
        };
        write!(
            f,
            "\n    log {:#018x}, region {:#x} + {} bytes, starts at epoch {}{}",
            header.log_id,
            header.region.base,
            header.region.len,
            header.first_epoch,
            if header.starts_with_checkpoint() {
                " (a checkpoint)"
            } else {
                ""
            }
        )?;
        match (self.first_epoch, self.last_epoch) {
            (Some(a), Some(b)) => write!(
                f,
                "\n    {} epochs ({a} to {b}{}), {} page records, {} zero records",
                self.epochs,
                match self.checkpoints {
                    0 => String::new(),
                    n => format!(", {n} checkpoints"),
                },
                self.page_records,
                self.zero_records
            )?,
            _ => write!(f, "\n    no complete epoch")?,
        }
        if self.program_count > 0 {
            let list: Vec<String> = self.program_epochs.iter().map(u64::to_string).collect();
            let hidden = self.program_count - self.program_epochs.len() as u64;
            write!(
                f,
                "\n    program checkpoints (lego_checkpoint): {}{}",
                if hidden > 0 {
                    format!("{hidden} older ones, then ")
                } else {
                    String::new()
                },
                list.join(", ")
            )?;
        }
        match &self.damage {
            None => Ok(()),
            Some((at, d)) => write!(
                f,
                "\n    damage: {} bytes from offset {} not usable: at offset {at}: {}",
                self.bytes - self.clean_bytes,
                self.clean_bytes,
                error_chain(d)
            ),
        }
    }
}

/// What `lego inspect` says about a log directory.
#[derive(Debug)]
pub struct Inspection {
    pub dir: PathBuf,
    pub segments: Vec<SegmentInfo>,
    /// Entries of the directory that are not segments (the lock file, strays).
    pub others: Vec<String>,
    /// What a replay would recover, or why it would fail.
    pub replay: Result<ReplayReport, ReplayError>,
}

impl Inspection {
    /// Whether every segment reads to its end without damage and replay would succeed.
    pub fn is_clean(&self) -> bool {
        self.segments
            .iter()
            .all(|s| s.header.is_ok() && s.damage.is_none())
            && self.replay.is_ok()
    }
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total: u64 = self.segments.iter().map(|s| s.bytes).sum();
        writeln!(
            f,
            "{}: {} segments, {} bytes",
            self.dir.display(),
            self.segments.len(),
            total
        )?;
        for s in &self.segments {
            writeln!(f, "  {s}")?;
        }
        if !self.others.is_empty() {
            writeln!(f, "other files: {}", self.others.join(", "))?;
        }
        match &self.replay {
            Ok(r) => {
                write!(
                    f,
                    "replay would recover {}epoch {} (built from epoch {}), {} pages logged; ",
                    if r.origin.is_program() {
                        "program checkpoint "
                    } else {
                        ""
                    },
                    r.epoch,
                    r.base_epoch,
                    r.pages
                )?;
                match r.newest_program {
                    Some(p) => {
                        write!(f, "--checkpoint would recover program checkpoint epoch {p}")?
                    }
                    None => write!(f, "the log holds no program checkpoint")?,
                }
                if let Some(path) = &r.fell_back_from {
                    let name = path.file_name().unwrap_or(path.as_os_str());
                    write!(
                        f,
                        "; the newest generation (from {}) is damaged at its checkpoint, so it \
                         would fall back to the previous generation",
                        name.to_string_lossy()
                    )?;
                }
                let damage: Vec<&Dropped> = r.dropped.iter().filter(|d| d.is_damage()).collect();
                if damage.is_empty() {
                    writeln!(f)
                } else {
                    writeln!(f, "; it would leave out:")?;
                    for d in damage {
                        writeln!(f, "  {d}")?;
                    }
                    Ok(())
                }
            }
            Err(e) => writeln!(f, "replay would fail: {}", error_chain(e)),
        }
    }
}

/// `lego inspect`: reads every segment of `dir` on its own, then works out what a replay
/// would recover (without writing an image).
pub fn inspect_dir(dir: &Path) -> Result<Inspection, ReplayError> {
    let (segments, others) = open_segments(dir)?;
    Ok(inspect(dir, &segments, others))
}

/// [`inspect_dir`] for segments already opened.
pub fn inspect<S: SegmentSource>(
    dir: &Path,
    segments: &[Segment<S>],
    others: Vec<String>,
) -> Inspection {
    let infos = segments
        .iter()
        .enumerate()
        .map(|(i, seg)| inspect_segment(i, seg))
        .collect();
    let replay = plan(dir, segments, None, &mut |_| {}).map(|mut p| {
        p.report.pages = p.pages_to_write();
        p.report
    });
    Inspection {
        dir: dir.to_path_buf(),
        segments: infos,
        others,
        replay,
    }
}

/// Reads one segment on its own (header, committed epochs, damage), as `inspect` shows it.
pub fn inspect_segment<S: SegmentSource>(index: usize, seg: &Segment<S>) -> SegmentInfo {
    let bytes = seg.source.size();
    let mut reader = Reader::new(&seg.source);
    let header = read_header(&mut reader);
    let mut info = SegmentInfo {
        seq: seg.seq,
        path: seg.path.clone(),
        bytes,
        header,
        epochs: 0,
        first_epoch: None,
        last_epoch: None,
        checkpoints: 0,
        program_count: 0,
        program_epochs: Vec::new(),
        page_records: 0,
        zero_records: 0,
        clean_bytes: 0,
        damage: None,
    };
    let Ok(header) = info.header.as_ref().map(|h| *h) else {
        return info;
    };
    let mut on_commit = |e: &Committed<'_>| {
        info.epochs += 1;
        info.first_epoch = info.first_epoch.or(Some(e.epoch));
        info.last_epoch = Some(e.epoch);
        if e.kind == CommitKind::Checkpoint {
            info.checkpoints += 1;
        }
        if e.origin.is_program() {
            info.program_count += 1;
            if info.program_epochs.len() == INSPECT_PROGRAM_EPOCHS_SHOWN {
                info.program_epochs.remove(0);
            }
            info.program_epochs.push(e.epoch);
        }
        let zero = e.pages.iter().filter(|(_, loc)| loc.is_none()).count() as u64;
        info.page_records += e.pages.len() as u64 - zero;
        info.zero_records += zero;
    };
    let end = scan_body(
        index,
        &mut reader,
        &header,
        None,
        &mut Vec::new(),
        ScanHooks {
            on_commit: &mut on_commit,
            on_page: &mut |_, _, _| {},
            progress: &mut |_| {},
        },
    );
    match end {
        BodyEnd::Clean | BodyEnd::Stopped { .. } => info.clean_bytes = bytes,
        BodyEnd::Damaged {
            epoch_start,
            at,
            damage,
            ..
        } => {
            info.clean_bytes = epoch_start;
            info.damage = Some((at, damage));
        }
    }
    info
}

/// An error and its sources, joined with ": ", for one-line messages.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::format::{segment_file_name, SEGMENT_FLAG_CHECKPOINT};
    use crate::log::segment::{
        LogWriter, MemoryStorage, SyncMode, WriterOptions, SEGMENT_BYTES_TARGET_MIN,
    };
    use crate::log::test_support::{
        epoch_pages, memory_options, page, replay_mem, seeded_changes, segments_of, Change, Model,
        TestDir,
    };
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::os::unix::fs::PermissionsExt;

    const REGION: RegionInfo = RegionInfo {
        base: 0x7d00_0000_0000,
        len: 24 * PAGE_BYTES,
    };
    const LOG_ID: u64 = 0xfeed_f00d;

    fn options(target: u64) -> WriterOptions {
        memory_options(target, LOG_ID)
    }

    fn writer(storage: &MemoryStorage, target: u64) -> LogWriter {
        LogWriter::with_storage(Box::new(storage.clone()), REGION, options(target))
            .expect("creating the writer")
    }

    /// Four epochs; the last one overwrites a page, adds two, and zeroes one (a `ZERO`
    /// record), and epoch 3 logs an all-zero page (which must be a hole in the image).
    fn epochs() -> Vec<Vec<Change>> {
        vec![
            (0..6).map(|p| (p, Some(page(p)))).collect(),
            vec![(3, Some(page(33))), (7, Some(page(7))), (1, None)],
            vec![(0, Some(vec![0; PAGE_SIZE])), (9, Some(page(9)))],
            vec![
                (3, Some(page(333))),
                (10, None),
                (2, Some(page(22))),
                (23, Some(page(23))),
            ],
        ]
    }

    /// Writes `epochs` and returns the log, each epoch's model image, and the bytes the last
    /// segment had before the last epoch.
    fn build(target: u64) -> (MemoryStorage, Vec<Vec<u8>>, u64) {
        let storage = MemoryStorage::new();
        let mut w = writer(&storage, target);
        let mut model = Model::new(REGION, LOG_ID);
        let mut images = vec![model.image(0)];
        let all = epochs();
        let mut before_last = 0;
        for (i, changes) in all.iter().enumerate() {
            if i + 1 == all.len() {
                // The last segment's length now, or 0 if the last epoch will start a new one.
                let snap = storage.snapshot();
                let (seq, bytes) = snap.iter().next_back().expect("a segment");
                let rotates = bytes.len() as u64 >= target;
                before_last = if rotates { 0 } else { bytes.len() as u64 };
                assert_eq!(*seq, w.segment());
            }
            w.append_epoch(&epoch_pages(changes)).expect("appending");
            model.apply(changes);
            images.push(model.image(i as u64 + 1));
        }
        (storage, images, before_last)
    }

    /// Replays with the last segment replaced by `last`.
    fn replay_with_last(storage: &MemoryStorage, last: Vec<u8>) -> (ReplayReport, Vec<u8>) {
        let mut segs = segments_of(storage);
        segs.last_mut().expect("a segment").source = last;
        replay_mem(&segs, None).expect("the earlier epochs always replay")
    }

    /// Cut the last epoch at every byte, and change every byte of it: the image is exactly the
    /// previous epoch's. Done with the last epoch inside a segment and with the last epoch in a
    /// segment of its own (then the segment's header is cut and changed too).
    #[test]
    fn damage_anywhere_in_the_last_epoch_gives_exactly_the_previous_epoch() {
        for target in [1 << 20, SEGMENT_BYTES_TARGET_MIN] {
            let (storage, images, before_last) = build(target);
            let full = segments_of(&storage).pop().expect("a segment").source;
            let (report, image) = replay_with_last(&storage, full.clone());
            assert_eq!(report.epoch, 4);
            assert!(report.dropped.is_empty(), "{report}");
            assert!(image == images[4], "the whole log must give epoch 4");
            let start = usize::try_from(before_last).expect("small");
            assert!(
                full.len() - start >= 5 * BLOCK_BYTES,
                "the last epoch is several blocks"
            );
            for cut in start..full.len() {
                let (report, image) = replay_with_last(&storage, full[..cut].to_vec());
                assert_eq!(report.epoch, 3, "cut at {cut}");
                assert!(
                    image == images[3],
                    "cut at {cut}: image differs from epoch 3"
                );
                // Only a cut right after the last complete record (or the new segment's
                // header) leaves nothing to report.
                let clean = if before_last == 0 { BLOCK_BYTES } else { start };
                assert_eq!(
                    report.dropped.len(),
                    usize::from(cut != clean),
                    "cut at {cut}: {report}"
                );
            }
            for (pos, mask) in (start..full.len()).flat_map(|p| [(p, 0xff), (p, 1 << (p % 8))]) {
                let mut bad = full.clone();
                bad[pos] ^= mask;
                let (report, image) = replay_with_last(&storage, bad);
                assert_eq!(report.epoch, 3, "byte {pos} ^ {mask:#x}");
                assert!(image == images[3], "byte {pos} ^ {mask:#x}: image differs");
                assert!(
                    report.dropped.iter().any(Dropped::is_damage),
                    "byte {pos}: the damage must be reported"
                );
            }
        }
    }

    #[test]
    fn every_epoch_can_be_asked_for() {
        let (storage, images, _) = build(SEGMENT_BYTES_TARGET_MIN);
        let segs = segments_of(&storage);
        for epoch in 1..=4u64 {
            let (report, image) = replay_mem(&segs, Some(epoch)).expect("replays");
            assert_eq!(report.epoch, epoch);
            assert!(image == images[epoch as usize], "epoch {epoch}");
            assert_eq!(
                report.dropped.iter().filter(|d| !d.is_damage()).count(),
                (4 - epoch) as usize,
                "the later segments are listed as not applied"
            );
        }
        let err = replay_mem(&segs, Some(5)).expect_err("epoch 5 does not exist");
        assert!(
            matches!(
                err,
                ReplayError::EpochNotAvailable {
                    asked: 5,
                    first: 1,
                    last: 4,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("ends before"), "{err}");
    }

    #[test]
    fn the_report_counts_pages_bytes_and_segments() {
        let (storage, images, _) = build(1 << 20);
        let segs = segments_of(&storage);
        let (report, image) = replay_mem(&segs, None).expect("replays");
        assert!(image == images[4]);
        // Pages 0 (all zeros), 1 and 10 (zeroed) are holes.
        assert_eq!(report.pages, 7);
        assert_eq!(report.image_bytes, ImageHeader::page_offset(24));
        assert_eq!(report.segments_read, 1);
        assert_eq!(report.log_bytes_read, segs[0].source.size());
        assert_eq!((report.base_epoch, report.log_id), (1, LOG_ID));
        let text = report.to_string();
        assert!(text.contains("recovered epoch 4"), "{text}");
        assert!(text.contains("nothing dropped"), "{text}");
    }

    #[test]
    fn checkpoints_bound_the_log_and_survive_a_crash_in_the_middle() {
        let storage = MemoryStorage::new();
        let mut w = writer(&storage, SEGMENT_BYTES_TARGET_MIN);
        let mut model = Model::new(REGION, LOG_ID);
        for e in 1..=3u64 {
            let changes: Vec<Change> = vec![(e, Some(page(e))), (e + 5, Some(page(50 + e)))];
            w.append_epoch(&epoch_pages(&changes)).expect("appending");
            model.apply(&changes);
        }
        let before = storage.snapshot();
        let image3 = model.image(3);
        // The heap frees page 2 before the checkpoint: the checkpoint does not hold it.
        let freed: Vec<Change> = vec![(2, None)];
        model.apply(&freed);
        let full = model.checkpoint_changes();
        assert_eq!(w.checkpoint(&epoch_pages(&full)).expect("checkpoint"), 4);
        let after = storage.snapshot();
        // The first generation (segments 1 to 3) stays as the fallback until the next one.
        assert_eq!(after.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        let image4 = model.image(4);
        let (report, image) = replay_mem(&segments_of(&storage), None).expect("replays");
        assert_eq!((report.epoch, report.base_epoch), (4, 4));
        assert!(image == image4);

        let as_segments = |map: &BTreeMap<u64, Vec<u8>>| -> Vec<Segment<Vec<u8>>> {
            map.iter()
                .map(|(&seq, b)| Segment {
                    seq,
                    path: PathBuf::from(segment_file_name(seq)),
                    source: b.clone(),
                })
                .collect()
        };
        // A crash while the checkpoint was being written: the old segments are all there and
        // the checkpoint's segment is cut anywhere. Replay gives epoch 3.
        let ckpt = &after[&4];
        for cut in (0..ckpt.len()).step_by(512) {
            let mut crashed = before.clone();
            crashed.insert(4, ckpt[..cut].to_vec());
            let (report, image) = replay_mem(&as_segments(&crashed), None).expect("replays");
            assert_eq!(report.epoch, 3, "cut at {cut}");
            assert!(image == image3, "cut at {cut}");
        }
        // A crash while the old segments were being removed (oldest first): any suffix of them
        // is left, and replay still gives the checkpoint.
        for kept_from in 1..=4u64 {
            let mut crashed: BTreeMap<u64, Vec<u8>> = before
                .iter()
                .filter(|(&s, _)| s >= kept_from)
                .map(|(&s, b)| (s, b.clone()))
                .collect();
            crashed.insert(4, ckpt.clone());
            let (report, image) = replay_mem(&as_segments(&crashed), None).expect("replays");
            assert_eq!(
                (report.epoch, report.base_epoch),
                (4, 4),
                "from {kept_from}"
            );
            assert!(image == image4, "from {kept_from}");
            // The epochs before the checkpoint stay replayable while their segments exist.
            if kept_from == 1 {
                let (_, image) = replay_mem(&as_segments(&crashed), Some(3)).expect("epoch 3");
                assert!(image == image3);
            } else {
                let err = replay_mem(&as_segments(&crashed), Some(3)).expect_err("gone");
                assert!(
                    matches!(
                        err,
                        ReplayError::EpochNotAvailable {
                            asked: 3,
                            first: 4,
                            last: 4,
                            ..
                        }
                    ),
                    "from {kept_from}: {err:?}"
                );
                assert!(err.to_string().contains("checkpointed away"), "{err}");
            }
        }
    }

    #[test]
    fn segments_that_do_not_continue_the_chain_are_skipped_and_reported() {
        let (storage, images, _) = build(SEGMENT_BYTES_TARGET_MIN);
        let segs = segments_of(&storage);
        assert_eq!(segs.len(), 4, "one epoch per segment");
        let reason = |segs: &[Segment<Vec<u8>>]| {
            let (report, image) = replay_mem(segs, None).expect("replays");
            (report, image)
        };

        // A missing segment in the middle: replay stops before it.
        let mut gap: Vec<Segment<Vec<u8>>> = segments_of(&storage);
        gap.remove(2);
        let (report, image) = reason(&gap);
        assert_eq!(report.epoch, 2);
        assert!(image == images[2]);
        assert!(
            matches!(
                report.dropped[0].reason,
                DropReason::DoesNotContinue { first: 4, last: 2 }
            ),
            "{report}"
        );

        // A segment from another log, renamed into the sequence.
        let other = MemoryStorage::new();
        let mut w = LogWriter::with_storage(
            Box::new(other.clone()),
            REGION,
            WriterOptions {
                log_id: Some(LOG_ID + 1),
                ..options(1 << 20)
            },
        )
        .expect("creating");
        for _ in 0..3 {
            w.append_epoch(&[]).expect("appending");
        }
        let foreign = segments_of(&other).remove(0).source;
        let mut mixed = segments_of(&storage);
        mixed.push(Segment {
            seq: 5,
            path: PathBuf::from(segment_file_name(5)),
            source: foreign.clone(),
        });
        let (report, image) = reason(&mixed);
        assert_eq!(report.epoch, 4);
        assert!(image == images[4]);
        // Its header says it is segment 1: that is checked before the log id.
        assert!(matches!(
            report.dropped[0].reason,
            DropReason::SeqMismatch {
                found: 1,
                expected: 5
            }
        ));
        let mut relabelled = SegmentHeader::decode(&foreign).expect("header");
        relabelled.seq = 5;
        relabelled.first_epoch = 5;
        let mut foreign5 = foreign.clone();
        foreign5[..BLOCK_BYTES].copy_from_slice(&relabelled.encode().0);
        mixed.last_mut().expect("pushed").source = foreign5;
        let (report, _) = reason(&mixed);
        assert_eq!(report.epoch, 4);
        assert!(matches!(
            report.dropped[0].reason,
            DropReason::OtherLog { .. }
        ));

        // A segment claiming to start with a checkpoint that is not one is not applied.
        let mut liar = segments_of(&storage);
        let mut h = SegmentHeader::decode(&liar[3].source).expect("header");
        h.flags = SEGMENT_FLAG_CHECKPOINT;
        h.first_epoch = 9;
        liar[3].source[..BLOCK_BYTES].copy_from_slice(&h.encode().0);
        let (report, image) = reason(&liar);
        assert_eq!(report.epoch, 3);
        assert!(image == images[3]);
    }

    #[test]
    fn nothing_usable_is_an_error_that_says_why() {
        let dir = Path::new("memory:");
        let none: Vec<Segment<Vec<u8>>> = Vec::new();
        assert!(matches!(
            plan(dir, &none, None, &mut |_| {}),
            Err(ReplayError::NoSegments { .. })
        ));

        let (storage, _, _) = build(1 << 20);
        let mut segs = segments_of(&storage);
        // Only the header and part of epoch 1.
        segs[0].source.truncate(3 * BLOCK_BYTES);
        let err = replay_mem(&segs, None).expect_err("no complete epoch");
        assert!(
            matches!(err, ReplayError::NothingCommitted { .. }),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("before its commit record"),
            "{err}"
        );

        segs[0].source.truncate(100);
        let err = replay_mem(&segs, None).expect_err("no header");
        assert!(
            err.to_string().contains("segment header is cut short"),
            "{err}"
        );

        // A log whose oldest segment starts at epoch 2 (the first was deleted by hand).
        let (storage, _, _) = build(SEGMENT_BYTES_TARGET_MIN);
        let mut segs = segments_of(&storage);
        segs.remove(0);
        let err = replay_mem(&segs, None).expect_err("no base");
        assert!(
            matches!(&err, ReplayError::NoBase { first_epoch: 2, .. }),
            "{err:?}"
        );
    }

    /// The same log written to disk: `replay_dir` writes the image file (0600) byte for byte
    /// as in memory, replaces an old image but nothing else, and `inspect_dir` describes it.
    #[test]
    fn replay_and_inspect_a_directory() {
        let dir = TestDir::new("replay-dir");
        let logs = dir.0.join("heap");
        let mut w = LogWriter::create(
            &logs,
            REGION,
            WriterOptions {
                sync: SyncMode::Data,
                ..options(SEGMENT_BYTES_TARGET_MIN)
            },
        )
        .expect("creating");
        let mut model = Model::new(REGION, LOG_ID);
        for changes in epochs() {
            w.append_epoch(&epoch_pages(&changes)).expect("appending");
            model.apply(&changes);
        }
        drop(w);
        let image = dir.0.join("heap.img");
        let mut seen = Vec::new();
        let report = replay_dir(&logs, &image, None, &mut |p| seen.push(p)).expect("replays");
        assert_eq!(report.epoch, 4);
        assert!(std::fs::read(&image).expect("the image") == model.image(4));
        assert_eq!(
            std::fs::metadata(&image)
                .expect("stat")
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        assert!(matches!(
            seen.last(),
            Some(Progress::WritingImage { done, total }) if done == total
        ));
        let read_total = seen.iter().find_map(|p| match p {
            Progress::ReadingLog { done, total } if done == total => Some(*total),
            _ => None,
        });
        assert_eq!(read_total, Some(report.log_bytes_read));

        // Replaying again replaces the image (it is one), with another epoch.
        let report = replay_dir(&logs, &image, Some(2), &mut |_| {}).expect("replays");
        assert_eq!(report.epoch, 2);
        let mut two = Model::new(REGION, LOG_ID);
        for changes in &epochs()[..2] {
            two.apply(changes);
        }
        assert!(std::fs::read(&image).expect("the image") == two.image(2));
        // A file that is not an image is never replaced.
        let precious = dir.0.join("precious.txt");
        std::fs::write(&precious, b"keep me").expect("writing");
        let err = replay_dir(&logs, &precious, None, &mut |_| {}).expect_err("refused");
        assert!(matches!(err, ReplayError::ImageInTheWay { .. }), "{err:?}");
        assert_eq!(std::fs::read(&precious).expect("still there"), b"keep me");
        let leftovers: Vec<_> = std::fs::read_dir(&dir.0)
            .expect("listing")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("partial"))
            .collect();
        assert!(leftovers.is_empty(), "no temporary image is left behind");

        // Damage the last segment's tail and inspect.
        let last = logs.join(segment_file_name(4));
        let len = std::fs::metadata(&last).expect("stat").len();
        let f = OpenOptions::new()
            .write(true)
            .open(&last)
            .expect("opening the last segment");
        f.set_len(len - 100).expect("cutting it");
        let inspection = inspect_dir(&logs).expect("inspects");
        assert_eq!(inspection.segments.len(), 4);
        assert_eq!(inspection.others, vec!["lock".to_string()]);
        assert!(!inspection.is_clean());
        let text = inspection.to_string();
        assert!(text.contains("seg-000004.lego"), "{text}");
        assert!(text.contains("damage:"), "{text}");
        assert!(text.contains("replay would recover epoch 3"), "{text}");
        let first = &inspection.segments[0];
        assert_eq!(
            (first.epochs, first.first_epoch, first.last_epoch),
            (1, Some(1), Some(1))
        );
        assert_eq!((first.page_records, first.zero_records), (6, 0));

        let empty = dir.0.join("empty");
        std::fs::create_dir(&empty).expect("mkdir");
        let err = replay_dir(&empty, &image, None, &mut |_| {}).expect_err("no segments");
        assert!(matches!(err, ReplayError::NoSegments { .. }));
    }

    /// One epoch of the random log: changes, and whether it is a checkpoint.
    #[derive(Debug, Clone)]
    struct RandomEpoch {
        // page -> 0: ZERO record, 1: all-zero page, else: content seed
        changes: BTreeMap<u64, u64>,
        checkpoint: bool,
    }

    fn random_epoch() -> impl Strategy<Value = RandomEpoch> {
        (
            proptest::collection::btree_map(0..REGION.pages(), 0u64..1000, 0..14),
            proptest::bool::weighted(0.15),
        )
            .prop_map(|(changes, checkpoint)| RandomEpoch {
                changes,
                checkpoint,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Random epochs (pages, contents, checkpoints, segment sizes) replay to the model's
        /// image at the end and at every epoch still in the log.
        #[test]
        fn random_logs_replay_like_the_model(
            epochs in proptest::collection::vec(random_epoch(), 1..12),
            target in prop_oneof![
                Just(SEGMENT_BYTES_TARGET_MIN),
                Just(10 * BLOCK_BYTES_U64),
                Just(1u64 << 20),
            ],
        ) {
            let storage = MemoryStorage::new();
            let mut w = writer(&storage, target);
            let mut model = Model::new(REGION, LOG_ID);
            let mut images = vec![model.image(0)];
            let mut base = 1;
            for (i, e) in epochs.iter().enumerate() {
                let changes = seeded_changes(&e.changes);
                model.apply(&changes);
                let epoch = if e.checkpoint {
                    base = i as u64 + 1;
                    w.checkpoint(&epoch_pages(&model.checkpoint_changes()))
                } else {
                    w.append_epoch(&epoch_pages(&changes))
                }
                .expect("writing");
                prop_assert_eq!(epoch, i as u64 + 1);
                images.push(model.image(epoch));
            }
            let segs = segments_of(&storage);
            let last = epochs.len() as u64;
            let (report, image) = replay_mem(&segs, None).expect("replays");
            prop_assert_eq!(report.epoch, last);
            prop_assert_eq!(report.base_epoch, base);
            prop_assert!(report.dropped.is_empty());
            prop_assert!(image == images[last as usize]);
            // The previous generation is kept too: epochs from its base on replay.
            let first = report.first_epoch;
            prop_assert!(first <= base);
            for epoch in 1..=last {
                match replay_mem(&segs, Some(epoch)) {
                    Ok((report, image)) => {
                        prop_assert!(epoch >= first);
                        prop_assert_eq!(report.epoch, epoch);
                        prop_assert!(image == images[epoch as usize], "epoch {}", epoch);
                    }
                    Err(e) => {
                        prop_assert!(epoch < first, "epoch {}: {}", epoch, e);
                    }
                }
            }
        }

        /// Whatever bytes a segment holds, replay neither panics nor applies an epoch that is
        /// not in the log: it gives an image of one of the epochs written, or an error.
        #[test]
        fn garbage_never_becomes_an_epoch(
            flips in proptest::collection::vec((0usize..40_000, any::<u8>()), 1..6),
            cut in 0usize..50_000,
        ) {
            let (storage, images, _) = build(1 << 20);
            let mut segs = segments_of(&storage);
            let seg = &mut segs[0].source;
            for (pos, x) in flips {
                if let Some(b) = seg.get_mut(pos) {
                    *b ^= x;
                }
            }
            seg.truncate(cut);
            if let Ok((report, image)) = replay_mem(&segs, None) {
                prop_assert!(report.epoch <= 4);
                prop_assert!(image == images[report.epoch as usize]);
            }
        }
    }

    #[test]
    fn an_epoch_page_is_written_once_even_when_logged_in_many_epochs() {
        // Page 5 is rewritten in every epoch; only its last version is read in the second pass
        // and the image holds it.
        let storage = MemoryStorage::new();
        let mut w = writer(&storage, 1 << 20);
        let mut model = Model::new(REGION, LOG_ID);
        for e in 0..20u64 {
            let changes: Vec<Change> = vec![(5, Some(page(e + 100)))];
            w.append_epoch(&epoch_pages(&changes)).expect("appending");
            model.apply(&changes);
        }
        let segs = segments_of(&storage);
        let plan = plan(Path::new("memory:"), &segs, None, &mut |_| {}).expect("plans");
        assert_eq!(plan.pages_to_write(), 1);
        let (_, image) = replay_mem(&segs, None).expect("replays");
        assert!(image == model.image(20));
    }

    /// A segment of several read chunks (so the first pass reads it through its reader
    /// thread, and from a directory with O_DIRECT where the file system allows it): replays
    /// like the model whole, and cut or changed inside the last epoch (at chunk boundaries and
    /// in a torn last block) gives exactly the epoch before.
    #[test]
    fn segments_of_several_read_chunks_replay_like_the_model() {
        const PAGES: u64 = 2048;
        let region = RegionInfo {
            base: 0x7e00_0000_0000,
            len: PAGES * PAGE_BYTES,
        };
        let storage = MemoryStorage::new();
        let mut w = LogWriter::with_storage(Box::new(storage.clone()), region, options(1 << 40))
            .expect("creating the writer");
        let all: Vec<Vec<Change>> = vec![
            (0..1000).map(|p| (p, Some(page(p)))).collect(),
            (500..1500)
                .map(|p| (p, (p % 7 != 0).then(|| page(p + 5000))))
                .collect(),
            (0..800)
                .map(|p| {
                    (
                        p,
                        Some(if p % 9 == 0 {
                            vec![0; PAGE_SIZE]
                        } else {
                            page(p + 9000)
                        }),
                    )
                })
                .collect(),
        ];
        let mut model = Model::new(region, LOG_ID);
        let mut images = vec![model.image(0)];
        let mut before_last = 0;
        for (i, changes) in all.iter().enumerate() {
            before_last = storage.snapshot().values().map(Vec::len).sum::<usize>();
            w.append_epoch(&epoch_pages(changes)).expect("appending");
            model.apply(changes);
            images.push(model.image(i as u64 + 1));
        }
        drop(w);
        let snap = storage.snapshot();
        assert_eq!(snap.len(), 1, "one segment");
        let whole = snap.values().next().expect("a segment").clone();
        assert!(whole.len() > 4 * READ_CHUNK_BYTES);

        let dir = TestDir::new("replay-chunks");
        let logs = dir.0.join("heap");
        std::fs::create_dir(&logs).expect("creating the log directory");
        let seg_path = logs.join(segment_file_name(1));
        let image = dir.0.join("heap.img");
        let check = |bytes: &[u8], epoch: u64| {
            let (report, got) = replay_with_last(&storage, bytes.to_vec());
            assert_eq!(report.epoch, epoch, "{} bytes", bytes.len());
            assert!(got == images[epoch as usize], "{} bytes", bytes.len());
            std::fs::write(&seg_path, bytes).expect("writing the segment");
            let report = replay_dir(&logs, &image, None, &mut |_| {}).expect("replays");
            assert_eq!(report.epoch, epoch, "{} bytes, from a file", bytes.len());
            assert!(
                std::fs::read(&image).expect("the image") == images[epoch as usize],
                "{} bytes, from a file",
                bytes.len()
            );
        };
        check(&whole, 3);
        // The first chunk boundary inside the last epoch.
        let edge = before_last.next_multiple_of(READ_CHUNK_BYTES);
        for cut in [
            before_last + BLOCK_BYTES,
            edge - BLOCK_BYTES,
            edge,
            edge + 100,
            edge + BLOCK_BYTES,
            whole.len() - BLOCK_BYTES,
            whole.len() - 1,
        ] {
            assert!(cut > before_last && cut < whole.len());
            check(&whole[..cut], 2);
        }
        for at in [edge - 1, edge, whole.len() - BLOCK_BYTES / 2] {
            assert!(at > before_last);
            let mut flipped = whole.clone();
            flipped[at] ^= 0x20;
            check(&flipped, 2);
        }
    }
}
