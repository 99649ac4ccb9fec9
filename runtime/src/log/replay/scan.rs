//! Checking one segment: [`read_header`] reads its header, [`scan_body`] reads its epochs
//! block by block, checking every block's and every page's CRC and every commit record
//! against the records before it, and hands over each committed epoch ([`Committed`]) and
//! the place of each page version ([`Loc`]).
//!
//! Rules: the first bad or missing record ends the scan of the segment ([`BodyEnd::Damaged`]);
//! an epoch is handed over only once its commit record has been read and matches. The scan
//! decides nothing about the chain of segments: that is the first pass's (`plan`).

use super::reader::Reader;
use super::{Damage, SegmentSource};
use crate::log::format::{
    BatchCrc, BlockKind, Commit, CommitKind, EntryKind, EpochOrigin, FormatError, PageEntry,
    PageGroup, Record, SegmentHeader, BLOCK_BYTES, BLOCK_BYTES_U64,
};

/// The place of one page's newest committed version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Loc {
    /// Index of the segment in the list replayed.
    pub(crate) seg: usize,
    pub(crate) offset: u64,
    pub(crate) epoch: u64,
    pub(crate) crc: u32,
    /// The payload is all zeros (it is not written: the image reads zeros there already).
    pub(super) zero: bool,
}

/// One committed epoch, as the first pass hands it over.
pub(super) struct Committed<'p> {
    pub(super) epoch: u64,
    pub(super) kind: CommitKind,
    pub(super) origin: EpochOrigin,
    /// Bytes of the epoch in the segment, commit record included.
    pub(super) bytes: u64,
    pub(super) pages: &'p [(u64, Option<Loc>)],
}

/// How the body of a segment ended.
pub(super) enum BodyEnd {
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
pub(super) fn read_header<S: SegmentSource + ?Sized>(
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
pub(super) struct ScanHooks<'h> {
    /// Each committed epoch.
    pub(super) on_commit: &'h mut dyn FnMut(&Committed<'_>),
    /// Each page version whose payload passed its CRC check, committed or not yet.
    pub(super) on_page: &'h mut dyn FnMut(u64, &Loc, &[u8]),
    /// Bytes of the segment read so far.
    pub(super) progress: &'h mut dyn FnMut(u64),
}

/// Reads the epochs of one segment after its header, handing each committed one to
/// `hooks.on_commit`, until the end of the file, the first damage, or the first epoch after
/// `stop_after`.
///
/// Long (about 105 lines) for a reason: it is the state machine of a segment's blocks (a
/// group or a commit, per epoch), and every way a block can be bad ends the scan with that
/// epoch's start; the entries (`Entries::scan`), payloads (`scan_payload`) and the commit's
/// checks (`check_commit`) are already out of it.
pub(super) fn scan_body<S: SegmentSource + ?Sized>(
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
                    let mut entries = Entries {
                        seg,
                        epoch,
                        region_pages,
                        batch: &mut batch,
                        pending,
                    };
                    if let Err((at, d)) =
                        entries.scan(reader, &group, group_at, &mut offset, on_page)
                    {
                        return damaged(at, d);
                    }
                }
                BlockKind::Commit => {
                    let commit = match Commit::decode(block) {
                        Ok(c) => c,
                        Err(e) => return damaged(offset, e.into()),
                    };
                    let read = EpochRead {
                        epoch,
                        start,
                        end: offset,
                        groups,
                        pages: pending.len(),
                        batch: &batch,
                    };
                    if let Err(d) = check_commit(&commit, header, &read) {
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

/// Where [`scan_body`] puts the entries of an epoch's page groups as it reads them.
struct Entries<'e> {
    seg: usize,
    epoch: u64,
    region_pages: u64,
    /// The CRC over the entries' CRCs, which the commit record carries.
    batch: &'e mut BatchCrc,
    /// Each entry's page and the place of its payload (`None`: a `ZERO` record).
    pending: &'e mut Vec<(u64, Option<Loc>)>,
}

impl Entries<'_> {
    /// Reads the entries of `group` (its block at `group_at`) and their payloads, which follow
    /// it from `*offset` on. Damage comes back with the offset it is at.
    fn scan<S: SegmentSource + ?Sized>(
        &mut self,
        reader: &mut Reader<'_, S>,
        group: &PageGroup,
        group_at: u64,
        offset: &mut u64,
        on_page: &mut dyn FnMut(u64, &Loc, &[u8]),
    ) -> Result<(), (u64, Damage)> {
        let (epoch, region_pages) = (self.epoch, self.region_pages);
        for entry in &group.entries {
            if entry.page >= region_pages {
                let d = Damage::PageOutOfRange {
                    page: entry.page,
                    pages: region_pages,
                };
                return Err((group_at, d));
            }
            if self.pending.len() as u64 >= region_pages {
                let d = Damage::EpochTooLarge {
                    epoch,
                    pages: region_pages,
                };
                return Err((group_at, d));
            }
            let loc = match entry.kind {
                EntryKind::Zero => {
                    entry.check_payload(&[]).map_err(|e| (group_at, e.into()))?;
                    None
                }
                EntryKind::Page => {
                    let at = Loc {
                        seg: self.seg,
                        offset: *offset,
                        epoch,
                        crc: entry.crc,
                        zero: false,
                    };
                    let loc = scan_payload(reader, entry, at, on_page).map_err(|d| (*offset, d))?;
                    *offset += BLOCK_BYTES_U64;
                    Some(loc)
                }
            };
            self.batch.push(entry.crc);
            self.pending.push((entry.page, loc));
        }
        Ok(())
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

/// The epoch [`scan_body`] read up to its commit record: what that record must match.
struct EpochRead<'b> {
    epoch: u64,
    /// Offsets of its first block and of its commit record.
    start: u64,
    end: u64,
    groups: u32,
    pages: usize,
    batch: &'b BatchCrc,
}

/// Checks a commit record against the epoch read before it: its log and epoch, the counts of
/// groups and pages, the body's bytes, the CRC over the entries' CRCs, and that the first
/// epoch of a checkpoint segment is a checkpoint.
fn check_commit(
    commit: &Commit,
    header: &SegmentHeader,
    read: &EpochRead<'_>,
) -> Result<(), Damage> {
    const R: Record = Record::Commit;
    let epoch = read.epoch;
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
    expect_field(
        epoch,
        "page groups",
        commit.groups.into(),
        read.groups.into(),
    )?;
    expect_field(epoch, "page count", commit.pages, read.pages as u64)?;
    expect_field(
        epoch,
        "body bytes",
        commit.body_bytes,
        read.end - read.start,
    )?;
    expect_field(
        epoch,
        "batch CRC",
        commit.batch_crc.into(),
        read.batch.value().into(),
    )?;
    let first_of_checkpoint_segment =
        read.start == BLOCK_BYTES_U64 && header.starts_with_checkpoint();
    if first_of_checkpoint_segment && commit.kind != CommitKind::Checkpoint {
        return Err(Damage::NotACheckpoint { epoch });
    }
    Ok(())
}

/// Reads and checks the payload of the `PAGE` entry `entry`, which is at `at` (`at.zero` is
/// filled in here), and hands it to `on_page`. Damage is at `at.offset`.
fn scan_payload<S: SegmentSource + ?Sized>(
    reader: &mut Reader<'_, S>,
    entry: &PageEntry,
    mut at: Loc,
    on_page: &mut dyn FnMut(u64, &Loc, &[u8]),
) -> Result<Loc, Damage> {
    let payload = reader.block(at.offset).map_err(Damage::Read)?;
    if payload.is_empty() {
        return Err(Damage::EndsMidEpoch { epoch: at.epoch });
    }
    if payload.len() < BLOCK_BYTES {
        let have = payload.len() as u64;
        return Err(Damage::PartialBlock { have });
    }
    entry.check_payload(payload)?;
    at.zero = payload.iter().all(|&b| b == 0);
    on_page(entry.page, &at, payload);
    Ok(at)
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
