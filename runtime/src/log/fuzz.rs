//! Fuzzing of the log's parsers (tests only): the block decoders of [`format`](super::format),
//! the segment scan of [`replay`](super::replay) (replay and inspect of whole logs in memory)
//! and the image reader of [`image`](super::image), with random bytes and, mostly, with
//! mutations of valid inputs: a log written by the real writer whose records are decoded,
//! changed one field at a time (extreme values: 0, `u32::MAX`, `u64::MAX`, 2^57, off by one)
//! and encoded again with right CRCs, so that the change gets past the checksums and reaches
//! the checks behind them; and bytes flipped, blocks copied, segments cut, dropped or renumbered.
//!
//! What every property asserts: no panic; an error is the module's own type and says something;
//! what decodes encodes back to the same bytes; a replay gives an image consistent with its
//! report (and, when only unsealed damage was done, exactly the image of one epoch written).
//! No hang and no allocation proportional to a field: inputs are bounded (a few hundred KiB),
//! and images go to a sparse sink that stores only the blocks written, so a replay that
//! allocated for a page index or a region length taken from the input would abort the test.
//!
//! Case counts: each property's default keeps the whole fuzz pass at about a minute of
//! `cargo test --release`; `LEGO_FUZZ_CASES=N` runs N cases of each
//! ([`crate::fuzz_support`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use proptest::prelude::*;
use proptest::sample::Index;

use super::format::{
    BlockKind, Commit, CommitKind, EntryKind, EpochOrigin, FormatError, ImageHeader, PageEntry,
    PageGroup, RegionInfo, SegmentHeader, BLOCK_BYTES, BLOCK_BYTES_U64, CRC_OFFSET, EPOCH_MAX,
    FORMAT_VERSION, FORMAT_VERSION_MIN, GROUP_ENTRIES_MAX, IMAGE_MAGIC, KIND_CHECKPOINT,
    KIND_COMMIT, KIND_PAGE_GROUP, PAGE_BYTES, REGION_END_MAX, SEGMENT_MAGIC,
};
use super::image::{ImageReader, IMAGE_CHUNK_PAGES};
use super::replay::{
    inspect, plan, plan_into, write_image, ImageSink, ReplayError, ReplayReport, Segment,
};
use super::segment::{LogWriter, MemoryStorage, SyncMode, WriterOptions, SEGMENT_BYTES_TARGET_MIN};
use super::test_support::{epoch_pages, memory_options, page, seeded_changes, segments_of, Model};
use crate::fuzz_support::{config, Extreme};
use crate::logging::error_chain;
use crate::test_support::TestDir;
use crate::PAGE_SIZE;

const REGION: RegionInfo = RegionInfo {
    base: 0x7c00_0000_0000,
    len: 24 * PAGE_BYTES,
};
const LOG_ID: u64 = 0x00c0_ffee_d00d;

// ---------------------------------------------------------------------------------------------
// Blocks

/// Seals `block` as the encoders do: CRC32C of the bytes before [`CRC_OFFSET`], stored there.
fn seal(block: &mut [u8]) {
    let crc = crc32c::crc32c(&block[..CRC_OFFSET]);
    block[CRC_OFFSET..BLOCK_BYTES].copy_from_slice(&crc.to_le_bytes());
}

/// Runs every block decoder on `bytes`: what decodes must encode back to the same block, and
/// what does not must say why.
fn check_decoders(bytes: &[u8]) -> Result<(), TestCaseError> {
    fn outcome<T>(
        r: Result<T, FormatError>,
        encode: impl Fn(&T) -> Vec<u8>,
        bytes: &[u8],
    ) -> Result<(), TestCaseError> {
        match r {
            Ok(x) => {
                // A header of an older format version decodes too, and is written back at the
                // current one: the same block but for the version field (bytes 8..12).
                let mut again = encode(&x);
                let old = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
                if again != bytes[..BLOCK_BYTES]
                    && (FORMAT_VERSION_MIN..FORMAT_VERSION).contains(&old)
                {
                    again[8..12].copy_from_slice(&old.to_le_bytes());
                    seal(&mut again);
                }
                prop_assert!(again == bytes[..BLOCK_BYTES], "decoded, not the same");
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
        Ok(())
    }
    outcome(
        SegmentHeader::decode(bytes),
        |h| h.encode().0.to_vec(),
        bytes,
    )?;
    outcome(PageGroup::decode(bytes), |g| g.encode().0.to_vec(), bytes)?;
    outcome(Commit::decode(bytes), |c| c.encode().0.to_vec(), bytes)?;
    outcome(ImageHeader::decode(bytes), |h| h.encode().0.to_vec(), bytes)?;
    match BlockKind::of(bytes) {
        Ok(_) => prop_assert!(bytes.len() >= BLOCK_BYTES),
        Err(e) => prop_assert!(!e.to_string().is_empty()),
    }
    Ok(())
}

/// A block that starts like one of the records (magic or kind, version, page size), with
/// random bytes after, sealed or not: random bytes almost never get past the first checks.
fn shaped_block() -> impl Strategy<Value = Vec<u8>> {
    (
        0usize..5,
        proptest::collection::vec(any::<u8>(), BLOCK_BYTES - 16),
        any::<bool>(),
        proptest::collection::vec((0usize..BLOCK_BYTES, any::<u8>()), 0..4),
    )
        .prop_map(|(shape, rest, sealed, zeros)| {
            let mut b = vec![0u8; BLOCK_BYTES];
            match shape {
                0 => b[..8].copy_from_slice(&SEGMENT_MAGIC),
                1 => b[..8].copy_from_slice(&IMAGE_MAGIC),
                2 => b[..4].copy_from_slice(&KIND_PAGE_GROUP.to_le_bytes()),
                3 => b[..4].copy_from_slice(&KIND_COMMIT.to_le_bytes()),
                _ => b[..4].copy_from_slice(&KIND_CHECKPOINT.to_le_bytes()),
            }
            if shape < 2 {
                b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
                b[12..16].copy_from_slice(&4096u32.to_le_bytes());
            } else {
                // A small entry count, so that a page group's entries are decoded.
                b[4..8].copy_from_slice(&u32::from(rest[0] % 130).to_le_bytes());
                b[8..16].copy_from_slice(&rest[1..9]);
            }
            b[16..].copy_from_slice(&rest);
            // Mostly zeros after the fields, as the encoders leave them.
            let keep = 64 + usize::from(rest[9]) * 16;
            for x in &mut b[keep.min(CRC_OFFSET)..CRC_OFFSET] {
                *x = 0;
            }
            for (at, x) in zeros {
                b[at] = x;
            }
            if sealed {
                seal(&mut b);
            }
            b
        })
}

fn region() -> impl Strategy<Value = RegionInfo> {
    prop_oneof![
        Just(REGION),
        (0u64..(1 << 45), 1u64..(1 << 20)).prop_map(|(base, pages)| RegionInfo {
            base: base * PAGE_BYTES,
            len: pages * PAGE_BYTES,
        }),
        (1u64..(1 << 45)).prop_map(|pages| RegionInfo {
            base: 0,
            len: pages * PAGE_BYTES,
        }),
    ]
}

fn segment_header() -> impl Strategy<Value = SegmentHeader> {
    (1u64.., any::<u64>(), region(), 1u64..=EPOCH_MAX, 0u32..2).prop_map(
        |(seq, log_id, region, first_epoch, flags)| SegmentHeader {
            seq,
            log_id,
            region,
            first_epoch,
            flags,
        },
    )
}

fn page_group() -> impl Strategy<Value = PageGroup> {
    (
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
        proptest::collection::vec(
            (any::<bool>(), any::<u64>(), any::<u32>()),
            1..=GROUP_ENTRIES_MAX,
        ),
    )
        .prop_map(|(epoch, log_id, index, entries)| PageGroup {
            epoch,
            log_id,
            index,
            entries: entries
                .into_iter()
                .map(|(data, page, crc)| PageEntry {
                    kind: if data {
                        EntryKind::Page
                    } else {
                        EntryKind::Zero
                    },
                    epoch,
                    page,
                    crc,
                })
                .collect(),
        })
}

fn commit() -> impl Strategy<Value = Commit> {
    (
        any::<bool>(),
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
        any::<bool>(),
    )
        .prop_map(
            |(ckpt, epoch, log_id, groups, pages, body_bytes, batch_crc, program)| Commit {
                kind: if ckpt {
                    CommitKind::Checkpoint
                } else {
                    CommitKind::Delta
                },
                epoch,
                log_id,
                groups,
                pages,
                body_bytes,
                batch_crc,
                origin: EpochOrigin::from_program_flag(program),
            },
        )
}

fn image_header() -> impl Strategy<Value = ImageHeader> {
    (
        region(),
        0..=EPOCH_MAX,
        any::<u64>(),
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(|(region, epoch, log_id, pages, program)| ImageHeader {
            region,
            epoch,
            log_id,
            pages: pages % (region.pages() + 1),
            origin: EpochOrigin::from_program_flag(program),
        })
}

/// Overwrites the 4 or 8 bytes at `at` (rounded down to a multiple of 4) with a value.
fn patch(block: &mut [u8], at: usize, wide: bool, value: Extreme) {
    let at = (at / 4 * 4).min(CRC_OFFSET - 8);
    if wide {
        let mut x = [0; 8];
        x.copy_from_slice(&block[at..at + 8]);
        let v = value.apply(u64::from_le_bytes(x));
        block[at..at + 8].copy_from_slice(&v.to_le_bytes());
    } else {
        let mut x = [0; 4];
        x.copy_from_slice(&block[at..at + 4]);
        let v = value.apply(u32::from_le_bytes(x).into()) as u32;
        block[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
}

proptest! {
    #![proptest_config(config(30_000))]

    /// Random bytes of any length, and blocks that start like a record.
    #[test]
    fn fuzz_decoders_take_any_bytes(
        bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..=BLOCK_BYTES + 64),
            shaped_block(),
        ],
    ) {
        check_decoders(&bytes)?;
        let e = PageEntry::zero(1, 2);
        prop_assert!(e.check_payload(&bytes).is_err() || bytes.is_empty());
    }

    /// Records with any field values: each decodes to itself or is refused, never to another
    /// record; a field overwritten in the encoded block (CRC made right again) is checked.
    #[test]
    fn fuzz_records_round_trip_and_patched_fields_are_checked(
        h in segment_header(),
        g in page_group(),
        c in commit(),
        i in image_header(),
        at in 0usize..CRC_OFFSET,
        wide in any::<bool>(),
        value in any::<Extreme>(),
    ) {
        prop_assert_eq!(SegmentHeader::decode(&h.encode().0), Ok(h));
        prop_assert_eq!(PageGroup::decode(&g.encode().0), Ok(g.clone()));
        prop_assert_eq!(Commit::decode(&c.encode().0), Ok(c));
        prop_assert_eq!(ImageHeader::decode(&i.encode().0), Ok(i));
        // Fields the strategies keep valid, made invalid: refused, or still itself.
        let odd = SegmentHeader { first_epoch: value.apply(h.first_epoch), ..h };
        let d = SegmentHeader::decode(&odd.encode().0);
        prop_assert!(d.is_err() || d == Ok(odd));
        let odd = ImageHeader { pages: value.apply(i.pages), ..i };
        let d = ImageHeader::decode(&odd.encode().0);
        prop_assert!(d.is_err() || d == Ok(odd));
        for mut block in [h.encode().0, g.encode().0, c.encode().0, i.encode().0] {
            patch(&mut block, at, wide, value);
            seal(&mut block);
            check_decoders(&block)?;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Logs

/// One record of a segment, decoded (or kept as bytes where decoding stopped).
#[derive(Debug, Clone)]
enum Unit {
    Header(SegmentHeader),
    /// A page group block and its payload blocks, in order.
    Group(PageGroup, Vec<Vec<u8>>),
    Commit(Commit),
    Raw(Vec<u8>),
}

/// Decodes a segment the writer wrote into its records.
fn units_of(bytes: &[u8]) -> Vec<Unit> {
    let mut units = Vec::new();
    let Ok(h) = SegmentHeader::decode(bytes) else {
        return vec![Unit::Raw(bytes.to_vec())];
    };
    units.push(Unit::Header(h));
    let mut at = BLOCK_BYTES;
    while at < bytes.len() {
        let block = &bytes[at..];
        let unit = match BlockKind::of(block) {
            Ok(BlockKind::PageGroup) => PageGroup::decode(block).ok().and_then(|g| {
                let n = g.payload_blocks();
                let end = at + (n + 1) * BLOCK_BYTES;
                let payloads = bytes.get(at + BLOCK_BYTES..end)?;
                let payloads = payloads.chunks(BLOCK_BYTES).map(<[u8]>::to_vec).collect();
                Some(Unit::Group(g, payloads))
            }),
            Ok(BlockKind::Commit) => Commit::decode(block).ok().map(Unit::Commit),
            Err(_) => None,
        };
        match unit {
            Some(u) => {
                at += match &u {
                    Unit::Group(_, p) => (p.len() + 1) * BLOCK_BYTES,
                    _ => BLOCK_BYTES,
                };
                units.push(u);
            }
            None => {
                units.push(Unit::Raw(bytes[at..].to_vec()));
                break;
            }
        }
    }
    units
}

fn bytes_of(units: &[Unit]) -> Vec<u8> {
    let mut out = Vec::new();
    for u in units {
        match u {
            Unit::Header(h) => out.extend_from_slice(&h.encode().0),
            Unit::Group(g, payloads) => {
                out.extend_from_slice(&g.encode().0);
                for p in payloads {
                    out.extend_from_slice(p);
                }
            }
            Unit::Commit(c) => out.extend_from_slice(&c.encode().0),
            Unit::Raw(b) => out.extend_from_slice(b),
        }
    }
    out
}

/// Makes every entry CRC match its (possibly changed) entry and payload, and every commit
/// record but the one at `keep` match the records before it: after this, only the change
/// made on purpose is inconsistent.
fn repair(units: &mut [Unit], keep: Option<usize>) {
    let mut crcs = Vec::new();
    let mut groups = 0u32;
    let mut body = 0u64;
    for (i, u) in units.iter_mut().enumerate() {
        match u {
            Unit::Group(g, payloads) => {
                let mut next = payloads.iter();
                for e in &mut g.entries {
                    *e = match e.kind {
                        EntryKind::Zero => PageEntry::zero(e.epoch, e.page),
                        EntryKind::Page => match next.next() {
                            Some(p) if p.len() == PAGE_SIZE => PageEntry::data(e.epoch, e.page, p),
                            _ => *e,
                        },
                    };
                    crcs.push(e.crc);
                }
                groups += 1;
                body += ((payloads.len() + 1) * BLOCK_BYTES) as u64;
            }
            Unit::Commit(c) => {
                if keep != Some(i) {
                    let mut batch = super::format::BatchCrc::default();
                    for &crc in &crcs {
                        batch.push(crc);
                    }
                    c.batch_crc = batch.value();
                    c.pages = crcs.len() as u64;
                    c.groups = groups;
                    c.body_bytes = body;
                }
                crcs.clear();
                groups = 0;
                body = 0;
            }
            Unit::Header(_) | Unit::Raw(_) => {}
        }
    }
}

/// Changes field `field` of `unit` to `value`.
fn change_field(unit: &mut Unit, field: u8, value: Extreme) {
    let v = |orig: u64| value.apply(orig);
    let v32 = |orig: u32| value.apply(orig.into()) as u32;
    match unit {
        Unit::Header(h) => match field % 7 {
            0 => h.seq = v(h.seq),
            1 => h.log_id = v(h.log_id),
            2 => h.region.base = v(h.region.base),
            3 => h.region.len = v(h.region.len),
            4 => h.first_epoch = v(h.first_epoch),
            5 => h.flags = v32(h.flags),
            _ => h.flags ^= super::format::SEGMENT_FLAG_CHECKPOINT,
        },
        Unit::Group(g, payloads) => {
            let k = (value.raw() % g.entries.len() as u64) as usize;
            // The payload of entry k, if it has one.
            let slot = g.entries[..k]
                .iter()
                .filter(|e| e.kind == EntryKind::Page)
                .count();
            match field % 9 {
                0 => {
                    g.epoch = v(g.epoch);
                    for e in &mut g.entries {
                        e.epoch = g.epoch;
                    }
                }
                1 => g.log_id = v(g.log_id),
                2 => g.index = v32(g.index),
                3 => g.entries[k].page = v(g.entries[k].page),
                4 => g.entries[k].epoch = v(g.entries[k].epoch),
                5 => {
                    let e = &mut g.entries[k];
                    if e.kind == EntryKind::Page {
                        e.kind = EntryKind::Zero;
                        if slot < payloads.len() {
                            payloads.remove(slot);
                        }
                    } else {
                        e.kind = EntryKind::Page;
                        payloads.insert(slot.min(payloads.len()), page(value.raw()));
                    }
                }
                6 if g.entries.len() > 1 => {
                    let e = g.entries.remove(k);
                    if e.kind == EntryKind::Page && slot < payloads.len() {
                        payloads.remove(slot);
                    }
                }
                7 if g.entries.len() < GROUP_ENTRIES_MAX => {
                    let e = g.entries[k];
                    g.entries.insert(k, e);
                    if e.kind == EntryKind::Page && slot < payloads.len() {
                        let p = payloads[slot].clone();
                        payloads.insert(slot, p);
                    }
                }
                _ => {
                    if let Some(p) = payloads.get_mut(slot) {
                        let at = (value.raw() as usize / 8) % p.len();
                        p[at] ^= 1 << (value.raw() % 8);
                    }
                }
            }
        }
        Unit::Commit(c) => match field % 7 {
            0 => {
                c.kind = match c.kind {
                    CommitKind::Delta => CommitKind::Checkpoint,
                    CommitKind::Checkpoint => CommitKind::Delta,
                }
            }
            1 => c.epoch = v(c.epoch),
            2 => c.log_id = v(c.log_id),
            3 => c.groups = v32(c.groups),
            4 => c.pages = v(c.pages),
            5 => c.body_bytes = v(c.body_bytes),
            _ => c.batch_crc = v32(c.batch_crc),
        },
        Unit::Raw(_) => {}
    }
}

/// Renumbers the epochs of a decoded segment from `value` on (wrapping, as a damaged or
/// hostile log may).
fn shift_epochs(units: &mut [Unit], value: Extreme) {
    let Some(Unit::Header(h)) = units.first_mut() else {
        return;
    };
    let first = value.apply(h.first_epoch);
    let delta = first.wrapping_sub(h.first_epoch);
    h.first_epoch = first;
    for u in units.iter_mut() {
        match u {
            Unit::Group(g, _) => {
                g.epoch = g.epoch.wrapping_add(delta);
                for e in &mut g.entries {
                    e.epoch = e.epoch.wrapping_add(delta);
                }
            }
            Unit::Commit(c) => c.epoch = c.epoch.wrapping_add(delta),
            Unit::Header(_) | Unit::Raw(_) => {}
        }
    }
}

/// One change to a log. `Field` works on decoded records (re-encoded with right block CRCs,
/// and with `repair` right entry and batch CRCs too); the others on bytes.
#[derive(Debug, Clone)]
enum Mutation {
    Field {
        seg: Index,
        unit: Index,
        field: u8,
        value: Extreme,
        repair: bool,
    },
    /// Overwrites a 4- or 8-byte word of a block and seals the block again.
    Patch {
        seg: Index,
        block: Index,
        at: usize,
        wide: bool,
        value: Extreme,
    },
    /// Copies a whole block over another (of the same segment or another).
    CopyBlock {
        from_seg: Index,
        from: Index,
        to_seg: Index,
        to: Index,
    },
    Flip {
        seg: Index,
        at: Index,
        xor: u8,
    },
    Truncate {
        seg: Index,
        len: Index,
    },
    /// Renumbers every epoch of a segment (header, groups, entries, commits) consistently,
    /// from a first epoch of `value`, with every CRC made right.
    ShiftEpochs {
        seg: Index,
        value: Extreme,
    },
    Drop {
        seg: Index,
    },
    Renumber {
        seg: Index,
        value: Extreme,
    },
}

impl Mutation {
    /// Whether the change leaves every CRC wrong where it changed something: then replay
    /// must give exactly the image of some epoch written.
    fn unsealed(&self) -> bool {
        matches!(self, Mutation::Flip { .. } | Mutation::Truncate { .. })
    }
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<Index>(), any::<Index>(), any::<u8>(), any::<Extreme>(), proptest::bool::weighted(0.7))
            .prop_map(|(seg, unit, field, value, repair)| Mutation::Field { seg, unit, field, value, repair }),
        2 => (any::<Index>(), any::<Index>(), prop_oneof![0usize..64, 0..CRC_OFFSET], any::<bool>(), any::<Extreme>())
            .prop_map(|(seg, block, at, wide, value)| Mutation::Patch { seg, block, at, wide, value }),
        1 => (any::<Index>(), any::<Index>(), any::<Index>(), any::<Index>())
            .prop_map(|(from_seg, from, to_seg, to)| Mutation::CopyBlock { from_seg, from, to_seg, to }),
        2 => (any::<Index>(), any::<Index>(), 1u8..)
            .prop_map(|(seg, at, xor)| Mutation::Flip { seg, at, xor }),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(seg, len)| Mutation::Truncate { seg, len }),
        1 => (any::<Index>(), any::<Extreme>()).prop_map(|(seg, value)| Mutation::ShiftEpochs { seg, value }),
        1 => prop_oneof![
            any::<Index>().prop_map(|seg| Mutation::Drop { seg }),
            (any::<Index>(), any::<Extreme>()).prop_map(|(seg, value)| Mutation::Renumber { seg, value }),
        ],
    ]
}

/// Applies `mutations` to `segs`: record changes first (on decoded segments), then byte
/// changes, then whole segments.
// Long (about 105 lines) for a reason: one short arm per kind of mutation, in the three
// phases the order of which matters; the arms share the decoded segments.
fn mutate(segs: &mut Vec<Segment<Vec<u8>>>, mutations: &[Mutation]) {
    let fields: Vec<_> = mutations
        .iter()
        .filter_map(|m| match m {
            Mutation::Field {
                seg,
                unit,
                field,
                value,
                repair,
            } => Some((seg, unit, field, value, repair, None)),
            Mutation::ShiftEpochs { seg, value } => Some((seg, seg, &0, value, &true, Some(value))),
            _ => None,
        })
        .collect();
    if !fields.is_empty() && !segs.is_empty() {
        let mut decoded: Vec<Vec<Unit>> = segs.iter().map(|s| units_of(&s.source)).collect();
        let mut repairs: Vec<(usize, Option<usize>)> = Vec::new();
        for (seg, unit, field, value, repair, shift) in fields {
            let s = seg.index(decoded.len());
            let u = unit.index(decoded[s].len());
            if let Some(value) = shift {
                shift_epochs(&mut decoded[s], *value);
                repairs.push((s, None));
                continue;
            }
            change_field(&mut decoded[s][u], *field, *value);
            if *repair {
                let keep = matches!(decoded[s][u], Unit::Commit(_)).then_some(u);
                repairs.push((s, keep));
            }
        }
        for (s, keep) in repairs {
            repair(&mut decoded[s], keep);
        }
        for (seg, units) in segs.iter_mut().zip(&decoded) {
            seg.source = bytes_of(units);
        }
    }
    for m in mutations {
        if segs.is_empty() {
            return;
        }
        let n = segs.len();
        match m {
            Mutation::Patch {
                seg,
                block,
                at,
                wide,
                value,
            } => {
                let src = &mut segs[seg.index(n)].source;
                let blocks = src.len() / BLOCK_BYTES;
                if blocks > 0 {
                    let b = block.index(blocks) * BLOCK_BYTES;
                    let block = &mut src[b..b + BLOCK_BYTES];
                    patch(block, *at, *wide, *value);
                    seal(block);
                }
            }
            Mutation::CopyBlock {
                from_seg,
                from,
                to_seg,
                to,
            } => {
                let (fs, ts) = (from_seg.index(n), to_seg.index(n));
                let (fb, tb) = (
                    segs[fs].source.len() / BLOCK_BYTES,
                    segs[ts].source.len() / BLOCK_BYTES,
                );
                if fb > 0 && tb > 0 {
                    let f = from.index(fb) * BLOCK_BYTES;
                    let t = to.index(tb) * BLOCK_BYTES;
                    let block = segs[fs].source[f..f + BLOCK_BYTES].to_vec();
                    segs[ts].source[t..t + BLOCK_BYTES].copy_from_slice(&block);
                }
            }
            Mutation::Flip { seg, at, xor } => {
                let src = &mut segs[seg.index(n)].source;
                if !src.is_empty() {
                    let i = at.index(src.len());
                    src[i] ^= xor;
                }
            }
            Mutation::Truncate { seg, len } => {
                let src = &mut segs[seg.index(n)].source;
                let keep = len.index(src.len() + 1);
                src.truncate(keep);
            }
            Mutation::Drop { seg } => {
                segs.remove(seg.index(n));
            }
            Mutation::Renumber { seg, value } => {
                let s = &mut segs[seg.index(n)];
                s.seq = value.apply(s.seq);
            }
            Mutation::Field { .. } | Mutation::ShiftEpochs { .. } => {}
        }
    }
    // Replay takes segments in ascending order, as a directory listing gives them.
    segs.sort_by_key(|s| s.seq);
}

/// An image in memory that holds only the blocks written to it: a replay that wrote at a
/// page index taken from a damaged record costs nothing here, as on a sparse file.
#[derive(Default)]
struct SparseImage {
    blocks: BTreeMap<u64, Vec<u8>>,
    len: u64,
}

impl ImageSink for SparseImage {
    fn write_all_at(&mut self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        assert!(
            offset.is_multiple_of(BLOCK_BYTES_U64) && bytes.len().is_multiple_of(BLOCK_BYTES),
            "replay writes whole blocks"
        );
        for (k, b) in bytes.chunks(BLOCK_BYTES).enumerate() {
            self.blocks
                .insert(offset / BLOCK_BYTES_U64 + k as u64, b.to_vec());
        }
        self.len = self.len.max(offset + bytes.len() as u64);
        Ok(())
    }

    fn set_len(&mut self, len: u64) -> std::io::Result<()> {
        self.blocks.retain(|&b, _| b * BLOCK_BYTES_U64 < len);
        self.len = len;
        Ok(())
    }
}

impl std::fmt::Debug for SparseImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SparseImage({} blocks, {} bytes)",
            self.blocks.len(),
            self.len
        )
    }
}

impl SparseImage {
    /// The non-zero blocks, for comparing images.
    fn nonzero(&self) -> BTreeMap<u64, &[u8]> {
        self.blocks
            .iter()
            .filter(|(_, b)| b.iter().any(|&x| x != 0))
            .map(|(&k, b)| (k, b.as_slice()))
            .collect()
    }
}

/// Both ways of replaying (two passes, and early writes): the same outcome, and an image
/// that agrees with its report.
fn replay_sparse(
    segs: &[Segment<Vec<u8>>],
    target: Option<u64>,
) -> Result<Result<(ReplayReport, SparseImage), ReplayError>, TestCaseError> {
    let dir = Path::new("memory:");
    let name = Path::new("memory:image");
    let two_pass = plan(dir, segs, target, &mut |_| {}).and_then(|mut p| {
        let mut image = SparseImage::default();
        write_image(&mut p, segs, &mut image, name, &mut |_| {})?;
        Ok((p.report, image))
    });
    let early = (|| {
        let mut image = SparseImage::default();
        let mut p = plan_into(dir, segs, target, &mut image, name, &mut |_| {})?;
        write_image(&mut p, segs, &mut image, name, &mut |_| {})?;
        Ok::<_, ReplayError>((p.report, image))
    })();
    match (&two_pass, &early) {
        (Ok((r1, i1)), Ok((r2, i2))) => {
            prop_assert_eq!(
                (r1.epoch, r1.base_epoch, r1.pages, r1.image_bytes),
                (r2.epoch, r2.base_epoch, r2.pages, r2.image_bytes)
            );
            prop_assert!(
                i1.nonzero() == i2.nonzero(),
                "early writes give another image"
            );
        }
        (Err(e1), Err(e2)) => prop_assert_eq!(e1.to_string(), e2.to_string()),
        _ => prop_assert!(false, "early writes change the outcome"),
    }
    if let Ok((report, image)) = &two_pass {
        prop_assert!(report.base_epoch <= report.epoch);
        prop_assert!(target.is_none_or(|t| t == report.epoch));
        prop_assert!(report
            .region
            .check(super::format::Record::ImageHeader)
            .is_ok());
        prop_assert_eq!(image.len, report.image_bytes);
        let header = ImageHeader::decode(image.blocks.get(&0).map_or(&[][..], |b| b))
            .map_err(|e| TestCaseError::fail(format!("the image header: {e}")))?;
        prop_assert_eq!(
            header,
            ImageHeader {
                region: report.region,
                epoch: report.epoch,
                log_id: report.log_id,
                pages: report.pages,
                origin: report.origin,
            }
        );
        prop_assert_eq!(image.nonzero().len() as u64, report.pages + 1);
        prop_assert!(report.pages <= report.region.pages());
        prop_assert!(!report.to_string().is_empty());
        for d in &report.dropped {
            prop_assert!(!d.to_string().is_empty());
        }
    }
    if let Err(e) = &two_pass {
        prop_assert!(!error_chain(e).is_empty());
    }
    Ok(two_pass)
}

/// A log written by the real writer: random epochs of pages of [`REGION`] (some of them
/// checkpoints) in segments of a random size, and the model image after each epoch.
fn written_log(
    epochs: &[(BTreeMap<u64, u64>, bool)],
    target: u64,
) -> (Vec<Segment<Vec<u8>>>, Vec<Vec<u8>>) {
    let storage = MemoryStorage::new();
    let options = memory_options(target, LOG_ID);
    let mut w = LogWriter::with_storage(Box::new(storage.clone()), REGION, options)
        .expect("creating the writer");
    let mut model = Model::new(REGION, LOG_ID);
    let mut images = vec![model.image(0)];
    for (changes, checkpoint) in epochs {
        let changes = seeded_changes(changes);
        model.apply(&changes);
        let epoch = if *checkpoint {
            w.checkpoint(&epoch_pages(&model.checkpoint_changes()))
        } else {
            w.append_epoch(&epoch_pages(&changes))
        }
        .expect("writing");
        images.push(model.image(epoch));
    }
    (segments_of(&storage), images)
}

fn epochs() -> impl Strategy<Value = Vec<(BTreeMap<u64, u64>, bool)>> {
    proptest::collection::vec(
        (
            proptest::collection::btree_map(0..REGION.pages(), 0u64..1000, 0..10),
            proptest::bool::weighted(0.15),
        ),
        1..8,
    )
}

/// The blocks of a model image (a `Vec` as [`Model::image`] makes it), non-zero ones only.
fn blocks_of(image: &[u8]) -> BTreeMap<u64, &[u8]> {
    image
        .chunks(BLOCK_BYTES)
        .enumerate()
        .filter(|(_, b)| b.iter().any(|&x| x != 0))
        .map(|(k, b)| (k as u64, b))
        .collect()
}

proptest! {
    #![proptest_config(config(12_000))]

    /// A log with records changed (past their CRCs), bytes flipped, blocks copied, segments
    /// cut, dropped and renumbered: replay and inspect end with a report or an error, the
    /// same both ways; with only unsealed damage, the image is exactly one epoch's.
    #[test]
    fn fuzz_mutated_logs_replay_or_fail_cleanly(
        epochs in epochs(),
        target in prop_oneof![
            Just(SEGMENT_BYTES_TARGET_MIN),
            Just(10 * BLOCK_BYTES_U64),
            Just(1u64 << 20),
        ],
        mutations in proptest::collection::vec(mutation(), 0..5),
        asked in any::<Extreme>(),
    ) {
        let (mut segs, images) = written_log(&epochs, target);
        let last = epochs.len() as u64;
        mutate(&mut segs, &mutations);
        let outcome = replay_sparse(&segs, None)?;
        if let Ok((report, image)) = &outcome {
            if mutations.iter().all(Mutation::unsealed) {
                prop_assert!(report.epoch <= last);
                prop_assert!(image.nonzero() == blocks_of(&images[report.epoch as usize]));
            }
            if mutations.is_empty() {
                prop_assert_eq!(report.epoch, last);
                prop_assert!(report.dropped.is_empty());
            }
        } else {
            prop_assert!(!mutations.is_empty(), "the log as written replays");
        }
        let inspection = inspect(Path::new("memory:"), &segs, Vec::new());
        prop_assert!(!inspection.to_string().is_empty());
        match (&inspection.replay, &outcome) {
            (Ok(a), Ok((b, _))) => prop_assert_eq!(a.epoch, b.epoch),
            (Err(a), Err(b)) => prop_assert_eq!(a.to_string(), b.to_string()),
            _ => prop_assert!(false, "inspect and replay disagree"),
        }
        // A replay to a chosen epoch: that epoch, or an error.
        let mut targets = vec![asked.apply(last)];
        if let Ok((report, _)) = &outcome {
            targets.push(report.base_epoch);
        }
        for t in targets {
            if let Ok((report, image)) = replay_sparse(&segs, Some(t))? {
                prop_assert_eq!(report.epoch, t);
                if mutations.iter().all(Mutation::unsealed) {
                    prop_assert!(t <= last);
                    prop_assert!(image.nonzero() == blocks_of(&images[t as usize]));
                }
            }
        }
    }
}

/// Fields that name a huge place are refused or cost nothing: a segment of a region of
/// 2^57 bytes whose one page is the region's last replays into a sparse image of that size
/// without allocating for it, and counts of `u32::MAX` and `u64::MAX` are refused at once.
#[test]
fn huge_fields_are_refused_or_cost_nothing() {
    let region = RegionInfo {
        base: 0,
        len: REGION_END_MAX,
    };
    let last_page = region.pages() - 1;
    let storage = MemoryStorage::new();
    let options = WriterOptions {
        segment_bytes_target: 1 << 20,
        sync: SyncMode::None,
        log_id: Some(LOG_ID),
    };
    let mut w = LogWriter::with_storage(Box::new(storage.clone()), region, options)
        .expect("creating the writer");
    let p = page(7);
    w.append_epoch(&[super::format::EpochPage {
        page: last_page,
        data: Some(&p),
    }])
    .expect("appending");
    let segs = segments_of(&storage);
    let (report, image) = replay_sparse(&segs, None)
        .expect("consistent")
        .expect("replays");
    assert_eq!(report.image_bytes, ImageHeader::page_offset(last_page + 1));
    assert_eq!(image.blocks.len(), 2, "the header and the one page");
    assert_eq!(image.blocks[&(last_page + 1)], p);

    // Counts far beyond what a block or a region holds.
    let mut g = PageGroup {
        epoch: 1,
        log_id: LOG_ID,
        index: 0,
        entries: vec![PageEntry::zero(1, 0)],
    }
    .encode();
    g.0[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    seal(&mut g.0);
    assert!(matches!(
        PageGroup::decode(&g.0),
        Err(FormatError::BadField {
            field: "entry count",
            ..
        })
    ));
    let mut segs = segments_of(&storage);
    let mut units = units_of(&segs[0].source);
    for u in &mut units {
        if let Unit::Commit(c) = u {
            c.pages = u64::MAX;
            c.body_bytes = u64::MAX;
        }
    }
    segs[0].source = bytes_of(&units);
    let err = replay_sparse(&segs, None)
        .expect("consistent")
        .expect_err("a commit whose counts do not match is not applied");
    assert!(matches!(err, ReplayError::NothingCommitted { .. }), "{err}");

    // Epoch numbers near 2^64 are refused where they enter (a replay counting on from one
    // overflowed).
    let h = SegmentHeader::decode(&segs[0].source).expect("a header");
    let far = SegmentHeader {
        first_epoch: u64::MAX,
        ..h
    };
    assert!(matches!(
        SegmentHeader::decode(&far.encode().0),
        Err(FormatError::BadField {
            field: "first epoch",
            ..
        })
    ));
    let image = ImageHeader {
        region,
        epoch: EPOCH_MAX + 1,
        log_id: LOG_ID,
        pages: 0,
        origin: EpochOrigin::Automatic,
    };
    assert!(matches!(
        ImageHeader::decode(&image.encode().0),
        Err(FormatError::BadField { field: "epoch", .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// Images

/// One change to an image file.
#[derive(Debug, Clone)]
enum ImageMutation {
    Flip {
        at: Index,
        xor: u8,
    },
    /// Cuts the file, or makes it longer with a hole, to `len` bytes.
    SetLen {
        len: Extreme,
    },
    /// Overwrites a word of the header and seals it again.
    Patch {
        at: usize,
        wide: bool,
        value: Extreme,
    },
}

fn image_mutation() -> impl Strategy<Value = ImageMutation> {
    prop_oneof![
        (any::<Index>(), 1u8..).prop_map(|(at, xor)| ImageMutation::Flip { at, xor }),
        any::<Extreme>().prop_map(|len| ImageMutation::SetLen { len }),
        prop_oneof![
            // A field of the header: version, page size, region, epoch, log id, pages.
            proptest::sample::select(vec![
                (8, false),
                (12, false),
                (16, true),
                (24, true),
                (32, true),
                (40, true),
                (48, true)
            ]),
            (0usize..64, any::<bool>()),
        ]
        .prop_flat_map(|(at, wide)| any::<Extreme>()
            .prop_map(move |value| ImageMutation::Patch { at, wide, value })),
    ]
}

/// Reads the whole image with [`ImageReader::next_chunk`]: the pages handed out, or the
/// error that ended the reading. Every chunk is checked against the file's bytes.
fn read_image(
    reader: &mut ImageReader,
    file: &[u8],
    file_len: u64,
) -> Result<Result<BTreeMap<u64, Vec<u8>>, String>, TestCaseError> {
    let end = file_len.saturating_sub(BLOCK_BYTES_U64) / PAGE_BYTES;
    let mut pages = BTreeMap::new();
    // Each chunk holds at least one page and pages come once: a bound on the calls.
    for _ in 0..=end + 1 {
        match reader.next_chunk() {
            Ok(Some(chunk)) => {
                prop_assert!(!chunk.is_empty() && chunk.len() <= IMAGE_CHUNK_PAGES);
                for p in chunk {
                    prop_assert!(p.page < end, "page {} past the end {}", p.page, end);
                    prop_assert!(pages.keys().next_back().is_none_or(|&last| last < p.page));
                    let data = p.data.expect("image pages have data");
                    let at = usize::try_from(ImageHeader::page_offset(p.page)).expect("small");
                    prop_assert!(data == &file[at..at + PAGE_SIZE]);
                    prop_assert!(data.iter().any(|&b| b != 0));
                    pages.insert(p.page, data.to_vec());
                }
            }
            Ok(None) => return Ok(Ok(pages)),
            Err(e) => {
                let text = error_chain(&e);
                prop_assert!(text.contains("heap.img"), "{}", text);
                return Ok(Err(text));
            }
        }
    }
    Err(TestCaseError::fail("next_chunk did not end"))
}

proptest! {
    #![proptest_config(config(4_000))]

    /// Images (valid ones, changed ones, random files): opening checks them, reading hands
    /// out exactly the file's non-zero pages and ends, data runs cover them, and a log
    /// resumed from an image replays to the same pages.
    // Long (about 135 lines) for a reason: one property over one generated file, checked by
    // every reader of images in turn (open, chunks, data runs, resume and replay), which must
    // agree with each other on the same bytes.
    #[test]
    fn fuzz_image_reader_takes_any_file(
        pages in proptest::collection::btree_map(0u64..64, 2u64..1000, 0..10),
        region_pages in 64u64..4096,
        epoch in 1u64..1000,
        mutations in proptest::collection::vec(image_mutation(), 0..4),
        random in proptest::option::weighted(0.1, proptest::collection::vec(any::<u8>(), 0..3 * BLOCK_BYTES)),
    ) {
        let dir = TestDir::new("fuzz-image");
        let path = dir.0.join("heap.img");
        let region = RegionInfo { base: 0x7b00_0000_0000, len: region_pages * PAGE_BYTES };
        let header = ImageHeader { region, epoch, log_id: LOG_ID, pages: pages.len() as u64, origin: EpochOrigin::Automatic };
        let mut bytes = match &random {
            Some(r) => r.clone(),
            None => {
                let len = pages.keys().next_back().map_or(0, |&p| p + 1);
                let mut b = vec![0u8; BLOCK_BYTES + usize::try_from(len).expect("small") * PAGE_SIZE];
                b[..BLOCK_BYTES].copy_from_slice(&header.encode().0);
                for (&p, &seed) in &pages {
                    let at = usize::try_from(ImageHeader::page_offset(p)).expect("small");
                    b[at..at + PAGE_SIZE].copy_from_slice(&page(seed));
                }
                b
            }
        };
        // The file's length may end past its bytes (a hole), up to a bound that keeps the
        // reading of holes (without SEEK_DATA) short.
        let mut file_len = bytes.len() as u64;
        for m in &mutations {
            match m {
                ImageMutation::Flip { at, xor } => {
                    if !bytes.is_empty() {
                        let i = at.index(bytes.len());
                        bytes[i] ^= xor;
                    }
                }
                ImageMutation::SetLen { len } => {
                    file_len = len.apply(file_len) % (BLOCK_BYTES_U64 + 1024 * PAGE_BYTES);
                    bytes.truncate(usize::try_from(file_len).expect("small"));
                }
                ImageMutation::Patch { at, wide, value } => {
                    if bytes.len() >= BLOCK_BYTES {
                        patch(&mut bytes[..BLOCK_BYTES], *at, *wide, *value);
                        seal(&mut bytes[..BLOCK_BYTES]);
                    }
                }
            }
        }
        let f = File::create(&path).expect("creating the image");
        f.write_all_at(&bytes, 0).expect("writing the image");
        f.set_len(file_len).expect("sizing the image");
        drop(f);
        bytes.resize(usize::try_from(file_len).expect("small"), 0);

        let mut reader = match ImageReader::open(&path) {
            Ok(r) => r,
            Err(e) => {
                prop_assert!(error_chain(&e).contains("heap.img"));
                prop_assert!(random.is_some() || !mutations.is_empty(), "a valid image: {}", e);
                return Ok(());
            }
        };
        let end = (file_len - BLOCK_BYTES_U64) / PAGE_BYTES;
        prop_assert!(end <= reader.header().region.pages());
        let opened = *reader.header();

        // Data runs are ascending, inside the file, and cover every non-zero page.
        let mut runs = Vec::new();
        reader.for_each_data_run(|first, n| runs.push((first, n)));
        let mut covered = BTreeMap::new();
        let mut prev_end = 0;
        for &(first, n) in &runs {
            prop_assert!(n > 0 && first >= prev_end && first + n <= end, "runs {:?}", runs);
            prev_end = first + n;
            covered.insert(first, n);
        }
        let file_pages: BTreeMap<u64, Vec<u8>> = (0..end)
            .filter_map(|p| {
                let at = usize::try_from(ImageHeader::page_offset(p)).expect("small");
                let data = &bytes[at..at + PAGE_SIZE];
                data.iter().any(|&b| b != 0).then(|| (p, data.to_vec()))
            })
            .collect();
        for &p in file_pages.keys() {
            let in_run = covered.range(..=p).next_back().is_some_and(|(&f, &n)| p < f + n);
            prop_assert!(in_run, "page {} is in no data run {:?}", p, runs);
        }
        // Single pages, past the end too.
        for &p in file_pages.keys().take(2).chain([end, end + 1].iter()) {
            let mut a = vec![1u8; PAGE_SIZE];
            reader.read_pages(p, &mut [&mut a]).expect("reading a page");
            prop_assert!(a == file_pages.get(&p).cloned().unwrap_or_else(|| vec![0; PAGE_SIZE]));
        }

        let read = read_image(&mut reader, &bytes, file_len)?;
        match &read {
            Ok(found) => {
                prop_assert!(found == &file_pages);
                prop_assert_eq!(found.len() as u64, opened.pages);
            }
            Err(text) => {
                prop_assert!(file_pages.len() as u64 != opened.pages, "{}", text);
                prop_assert!(random.is_some() || !mutations.is_empty(), "a valid image: {}", text);
            }
        }

        // A log resumed from the image holds its pages, or the image is refused.
        let storage = MemoryStorage::new();
        let options = WriterOptions {
            segment_bytes_target: 1 << 20,
            sync: SyncMode::None,
            log_id: Some(LOG_ID),
        };
        match LogWriter::resume_with_storage(Box::new(storage.clone()), opened.region, options, &path) {
            Ok(w) => {
                prop_assert!(read.is_ok(), "resumed from an image that does not read");
                prop_assert!(w.last_committed() > opened.epoch, "epoch {} after the image's {}", w.last_committed(), opened.epoch);
                drop(w);
                let segs = segments_of(&storage);
                let (report, image) = replay_sparse(&segs, None)?
                    .map_err(|e| TestCaseError::fail(format!("the resumed log: {e}")))?;
                prop_assert_eq!(report.region, opened.region);
                let replayed: BTreeMap<u64, Vec<u8>> = image
                    .nonzero()
                    .into_iter()
                    .filter(|&(k, _)| k > 0)
                    .map(|(k, b)| (k - 1, b.to_vec()))
                    .collect();
                prop_assert!(replayed == file_pages);
            }
            Err(e) => {
                prop_assert!(!error_chain(&e).is_empty());
                prop_assert!(read.is_err(), "an image that reads is refused: {}", error_chain(&e));
            }
        }
    }
}
