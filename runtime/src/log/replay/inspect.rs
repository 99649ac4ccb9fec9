//! `lego inspect`: [`inspect_dir`] reads every segment of a log on its own
//! ([`inspect_segment`]: header, committed epochs, damage) and works out what a replay would
//! recover, without writing an image.
//!
//! Rules: inspecting only reads; it shows every segment, including the ones a replay would
//! skip, and the entries of the directory that are not segments.

use std::fmt;
use std::path::{Path, PathBuf};

use super::reader::Reader;
use super::scan::{read_header, scan_body, BodyEnd, Committed, ScanHooks};
use super::{
    open_segments, plan, Damage, Dropped, ReplayError, ReplayReport, Segment, SegmentSource,
    INSPECT_PROGRAM_EPOCHS_SHOWN,
};
use crate::log::format::{CommitKind, SegmentHeader};
use crate::logging::error_chain;

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
