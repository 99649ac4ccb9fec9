//! What a replay says about the log: [`ReplayReport`] (what the image holds and which parts
//! of the log were left out), [`Dropped`] (one such part), and why it was left out
//! ([`DropReason`], [`Damage`]).
//!
//! Rules: every byte of the log that a replay does not apply is named here with its segment,
//! offset and reason; damage is reported, never repaired or guessed around.

use std::fmt;
use std::path::PathBuf;

use thiserror::Error;

use crate::log::format::{EpochOrigin, FormatError, Record, RegionInfo, BLOCK_BYTES, PAGE_BYTES};
use crate::logging::error_chain;

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
