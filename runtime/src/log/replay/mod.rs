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
//!
//! Layout: `source` is read access to a segment (the [`SegmentSource`] trait, files opened
//! for `O_DIRECT`); `reader` buffers a segment and runs the first pass's read-ahead thread;
//! `scan` checks the records of one segment; `plan` is the first pass over the whole log;
//! `write` is the second pass, writing the image; `report` says what was recovered and what
//! was left out; `inspect` describes a log without replaying it. This file holds the
//! limits, the options, the error and the entry points for a directory.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::io::DIRECT_ALIGN_BYTES;
use crate::log::format::{parse_segment_file_name, FormatError, ImageHeader, BLOCK_BYTES};
use crate::logging::error_chain;
use crate::PAGE_SIZE;

mod inspect;
mod plan;
mod reader;
mod report;
mod scan;
mod source;
mod write;

#[cfg(test)]
mod tests;

pub use inspect::{inspect, inspect_dir, inspect_segment, Inspection, SegmentInfo};
pub use plan::{plan, plan_into, resolve_target, Plan};
pub(crate) use plan::{plan_collecting, LaterEpoch, LaterEpochs};
pub use report::{Damage, DropReason, Dropped, ReplayReport};
pub(crate) use scan::Loc;
pub(crate) use source::read_exact_at;
pub use source::{Segment, SegmentFile, SegmentSource};
pub use write::{write_image, ImageSink};

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
