//! The first pass: [`plan`] reads the whole log in sequence order, keeps the segments that
//! continue the chain of epochs, and works out, per page, the place of its newest committed
//! version (a [`Plan`]). [`plan_into`] also writes every checked page version into the image
//! as it reads it (so the second pass reads again only what did not turn out final), and
//! `plan_collecting` collects the epochs after the newest program checkpoint for compaction.
//!
//! Rules: an epoch counts only once committed; a segment counts only if it continues the
//! chain (its first epoch follows the last applied one, or it starts with a checkpoint after
//! it); a target that is not exactly an epoch the log can give is an error that says which
//! epochs it can give.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::reader::Reader;
use super::scan::{read_header, scan_body, BodyEnd, Committed, ScanHooks};
use super::{
    DropReason, Dropped, ImageSink, Loc, Progress, ReplayError, ReplayReport, Segment,
    SegmentSource, Target, RUN_PAGES_MAX,
};
use crate::log::format::{CommitKind, EpochOrigin, ImageHeader, RegionInfo, SegmentHeader};
use crate::PAGE_SIZE;

/// The outcome of the first pass: what the image will hold.
pub struct Plan {
    pub report: ReplayReport,
    pub(super) index: HashMap<u64, Loc>,
    /// What the first pass wrote to the image ([`plan_into`]): per page, the version whose
    /// bytes the image holds, or `None` when the image may hold stale bytes there.
    pub(super) written: HashMap<u64, Option<Loc>>,
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

impl Chain {
    /// The chain that starts with `seg` (index `i`), whose header is `header`.
    fn new<S>(seg: &Segment<S>, header: &SegmentHeader, i: usize) -> Chain {
        Chain {
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
        }
    }

    /// Applies the committed epoch `e` of segment `i`: its pages' places go into `index` (a
    /// checkpoint starts it afresh; a `ZERO` record removes the page).
    fn apply(&mut self, e: &Committed<'_>, i: usize, index: &mut HashMap<u64, Loc>) {
        if e.kind == CommitKind::Checkpoint {
            index.clear();
            self.base = Some(e.epoch);
        } else if e.epoch == 1 {
            self.base = Some(1);
        }
        self.first_base = self.first_base.or(self.base);
        self.last_origin = e.origin;
        if e.origin.is_program() {
            self.newest_program = Some(e.epoch);
            self.program_epochs += 1;
        }
        self.last_segment = i;
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
        self.last = e.epoch;
        self.applied += 1;
    }
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

// Long (about 110 lines) for a reason: it is the one loop over the segments inside the thread
// scope their reader threads live in, and the scan's hooks borrow the pass's state (the chain,
// the index, the early writes, the progress); the chain's bookkeeping (`Chain`), the verdict
// (`FirstPass::conclude`) and the parts left out (`left_out`) are already out of it.
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
            let c = chain.get_or_insert_with(|| Chain::new(seg, &header, i));
            segments_read += 1;
            let applied_before = c.applied;
            let mut on_commit = |e: &Committed<'_>| {
                c.apply(e, i, &mut index);
                if let Some(l) = later.as_deref_mut() {
                    l.take(e);
                }
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
            dropped.extend(left_out(seg, end, target));
        }
    });
    progress(Progress::ReadingLog { done, total });
    FirstPass {
        chain,
        index,
        dropped,
        segments_read,
        done,
        unusable_start,
    }
    .conclude(dir, target)
}

/// What the first pass found, before it is judged: the chain applied, the places of its
/// pages, what was left out, and how much was read.
struct FirstPass {
    chain: Option<Chain>,
    index: HashMap<u64, Loc>,
    dropped: Vec<Dropped>,
    segments_read: usize,
    /// Bytes of the log read.
    done: u64,
    /// The newest segment that may have started a generation and from which nothing was
    /// applied (see `plan_once`).
    unusable_start: Option<(usize, PathBuf)>,
}

impl FirstPass {
    /// The plan, or why the log gives none (for `target`, when given).
    fn conclude(self, dir: &Path, target: Option<u64>) -> Result<Plan, ReplayError> {
        let FirstPass {
            chain,
            index,
            dropped,
            segments_read,
            done,
            unusable_start,
        } = self;
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
}

/// The part of `seg` after the end of its scan that was not applied, if any.
fn left_out<S: SegmentSource>(
    seg: &Segment<S>,
    end: BodyEnd,
    target: Option<u64>,
) -> Option<Dropped> {
    let len = seg.source.size();
    match end {
        BodyEnd::Stopped { offset } if offset < len => Some(Dropped {
            path: seg.path.clone(),
            offset,
            bytes: len - offset,
            epoch: None,
            reason: DropReason::AfterTarget {
                target: target.expect("only a target stops a segment early"),
            },
        }),
        BodyEnd::Clean | BodyEnd::Stopped { .. } => None,
        BodyEnd::Damaged {
            epoch,
            epoch_start,
            at,
            damage,
        } => Some(Dropped {
            path: seg.path.clone(),
            offset: epoch_start,
            bytes: len - epoch_start,
            epoch: Some(epoch),
            reason: DropReason::Damaged { at, damage },
        }),
    }
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
