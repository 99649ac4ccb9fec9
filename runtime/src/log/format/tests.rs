//! Tests of the format: every record round-trips, and every field a decoder checks is
//! refused when it is wrong.

use super::*;
use crate::log::test_support::page;

const REGION: RegionInfo = RegionInfo {
    base: 0x7f12_3450_0000,
    len: 64 * PAGE_BYTES,
};

fn header() -> SegmentHeader {
    SegmentHeader {
        seq: 3,
        log_id: 0x0123_4567_89ab_cdef,
        region: REGION,
        first_epoch: 17,
        flags: SEGMENT_FLAG_CHECKPOINT,
    }
}

fn group() -> PageGroup {
    let p = page(5);
    PageGroup {
        epoch: 9,
        log_id: 77,
        index: 2,
        entries: vec![
            PageEntry::data(9, 4, &p),
            PageEntry::zero(9, 5),
            PageEntry::data(9, 63, &page(6)),
        ],
    }
}

fn commit(kind: CommitKind) -> Commit {
    Commit {
        kind,
        epoch: 9,
        log_id: 77,
        groups: 3,
        pages: 300,
        body_bytes: 3 * BLOCK_BYTES_U64 + 250 * PAGE_BYTES,
        batch_crc: 0xdead_beef,
        origin: EpochOrigin::Automatic,
    }
}

fn image_header() -> ImageHeader {
    ImageHeader {
        region: REGION,
        epoch: 12,
        log_id: 77,
        pages: 40,
        origin: EpochOrigin::Automatic,
    }
}

#[test]
fn every_record_kind_round_trips() {
    let h = header();
    assert_eq!(SegmentHeader::decode(&h.encode().0), Ok(h));
    let plain = SegmentHeader { flags: 0, ..h };
    assert_eq!(SegmentHeader::decode(&plain.encode().0), Ok(plain));
    assert!(!plain.starts_with_checkpoint() && h.starts_with_checkpoint());

    let g = group();
    let block = g.encode();
    assert_eq!(BlockKind::of(&block.0), Ok(BlockKind::PageGroup));
    assert_eq!(PageGroup::decode(&block.0), Ok(g.clone()));
    assert_eq!(g.payload_blocks(), 2);
    let full = PageGroup {
        entries: (0..GROUP_ENTRIES_MAX as u64)
            .map(|i| PageEntry::zero(9, i))
            .collect(),
        ..g.clone()
    };
    assert_eq!(PageGroup::decode(&full.encode().0), Ok(full));

    for kind in [CommitKind::Delta, CommitKind::Checkpoint] {
        let c = commit(kind);
        let block = c.encode();
        assert_eq!(BlockKind::of(&block.0), Ok(BlockKind::Commit));
        assert_eq!(Commit::decode(&block.0), Ok(c));
    }

    let i = image_header();
    let block = i.encode();
    assert!(ImageHeader::has_magic(&block.0));
    assert_eq!(ImageHeader::decode(&block.0), Ok(i));
    assert_eq!(ImageHeader::page_offset(0), 4096);
    assert_eq!(ImageHeader::page_offset(3), 4 * 4096);
}

#[test]
fn page_entries_check_their_payload() {
    let p = page(1);
    let e = PageEntry::data(4, 10, &p);
    assert_eq!(e.check_payload(&p), Ok(()));
    let mut bad = p.clone();
    bad[4095] ^= 1;
    assert!(matches!(
        e.check_payload(&bad),
        Err(FormatError::BadCrc {
            record: Record::PageEntry,
            ..
        })
    ));
    assert!(matches!(
        e.check_payload(&p[..100]),
        Err(FormatError::Truncated { .. })
    ));
    // The CRC covers the header too: the same payload under another page or epoch fails.
    for other in [PageEntry { page: 11, ..e }, PageEntry { epoch: 5, ..e }] {
        assert!(other.check_payload(&p).is_err());
    }
    let z = PageEntry::zero(4, 10);
    assert_eq!(z.check_payload(&[]), Ok(()));
    assert!(PageEntry { page: 12, ..z }.check_payload(&[]).is_err());
}

/// Every encoder's output with each byte changed in turn must fail to decode.
#[test]
fn any_changed_byte_is_detected() {
    type Fails = fn(&[u8]) -> bool;
    let blocks: Vec<(Box<Block>, Fails)> = vec![
        (header().encode(), |b| SegmentHeader::decode(b).is_err()),
        (group().encode(), |b| PageGroup::decode(b).is_err()),
        (commit(CommitKind::Delta).encode(), |b| {
            Commit::decode(b).is_err()
        }),
        (image_header().encode(), |b| ImageHeader::decode(b).is_err()),
    ];
    for (block, fails) in blocks {
        for i in 0..BLOCK_BYTES {
            let mut b = block.clone();
            b.0[i] ^= 0x5a;
            assert!(fails(&b.0), "changing byte {i} of {block:?} went unnoticed");
        }
    }
}

#[test]
fn short_input_is_truncated_and_zeros_are_unwritten() {
    let h = header().encode();
    for n in [0, 1, 8, 100, BLOCK_BYTES - 1] {
        assert!(matches!(
            SegmentHeader::decode(&h.0[..n]),
            Err(FormatError::Truncated { need: BLOCK_BYTES, have, .. }) if have == n
        ));
        assert!(matches!(
            Commit::decode(&commit(CommitKind::Delta).encode().0[..n]),
            Err(FormatError::Truncated { .. })
        ));
    }
    let zeros = Block::zeroed();
    assert_eq!(SegmentHeader::decode(&zeros.0), Err(FormatError::Unwritten));
    assert_eq!(BlockKind::of(&zeros.0), Err(FormatError::Unwritten));
    assert_eq!(Commit::decode(&zeros.0), Err(FormatError::Unwritten));
    assert_eq!(ImageHeader::decode(&zeros.0), Err(FormatError::Unwritten));
}

#[test]
fn magic_version_kind_and_fields_are_named_in_errors() {
    let mut b = header().encode();
    b.0[0] = b'X';
    let e = SegmentHeader::decode(&b.0).expect_err("bad magic");
    assert!(matches!(e, FormatError::BadMagic { .. }));
    assert!(e.to_string().contains("LEGO-LOG"), "{e}");

    let mut b = header().encode();
    put_u32(&mut b.0, 8, 3);
    b.seal();
    let e = SegmentHeader::decode(&b.0).expect_err("version 3");
    assert_eq!(
        e,
        FormatError::UnsupportedVersion {
            record: Record::SegmentHeader,
            found: 3,
            supported: 2
        }
    );
    assert!(e.to_string().contains("versions 1 to 2"), "{e}");

    let mut b = group().encode();
    b.0[..4].copy_from_slice(b"WHAT");
    b.seal();
    let e = BlockKind::of(&b.0).expect_err("unknown kind");
    assert_eq!(
        e,
        FormatError::UnknownKind {
            kind: u32::from_le_bytes(*b"WHAT")
        }
    );
    assert!(e.to_string().contains("WHAT"), "{e}");
    assert!(PageGroup::decode(&b.0).is_err());
    assert!(Commit::decode(&b.0).is_err());

    // Fields that pass the CRC but make no sense (a writer bug) are refused too.
    let sealed = |f: &dyn Fn(&mut Block)| {
        let mut b = header().encode();
        f(&mut b);
        b.seal();
        SegmentHeader::decode(&b.0)
    };
    let field = |r: Result<SegmentHeader, FormatError>| match r {
        Err(FormatError::BadField { field, .. }) => field,
        other => panic!("expected a bad field, got {other:?}"),
    };
    assert_eq!(field(sealed(&|b| put_u32(&mut b.0, 12, 8192))), "page size");
    assert_eq!(
        field(sealed(&|b| put_u64(&mut b.0, 32, 4097))),
        "region base"
    );
    assert_eq!(
        field(sealed(&|b| put_u64(&mut b.0, 40, 0))),
        "region length"
    );
    assert_eq!(
        field(sealed(&|b| put_u64(&mut b.0, 40, REGION_END_MAX))),
        "region length"
    );
    assert_eq!(
        field(sealed(&|b| put_u64(&mut b.0, 16, 0))),
        "sequence number"
    );
    assert_eq!(field(sealed(&|b| put_u64(&mut b.0, 48, 0))), "first epoch");
    assert_eq!(field(sealed(&|b| put_u32(&mut b.0, 56, 6))), "flags");
    assert_eq!(field(sealed(&|b| b.0[100] = 1)), "reserved byte");

    let mut b = group().encode();
    put_u32(&mut b.0, 4, 0);
    b.seal();
    assert!(matches!(
        PageGroup::decode(&b.0),
        Err(FormatError::BadField {
            field: "entry count",
            ..
        })
    ));
    let mut b = group().encode();
    // The second entry's epoch differs from its group's.
    put_u64(&mut b.0, GROUP_ENTRIES_OFFSET + ENTRY_BYTES + 8, 10);
    b.seal();
    assert!(matches!(
        PageGroup::decode(&b.0),
        Err(FormatError::BadField { field: "epoch", .. })
    ));
}

#[test]
fn epochs_are_laid_out_in_groups_with_their_payloads() {
    let data: Vec<Vec<u8>> = (0..300).map(page).collect();
    for n in [0usize, 1, 125, 126, 127, 300] {
        let pages: Vec<EpochPage<'_>> = (0..n)
            .map(|i| EpochPage {
                page: i as u64,
                // Every third page is a ZERO record.
                data: (i % 3 != 0).then(|| data[i].as_slice()),
            })
            .collect();
        let e = encode_epoch(5, 99, CommitKind::Delta, EpochOrigin::Automatic, &pages);
        let groups = n.div_ceil(GROUP_ENTRIES_MAX);
        let payloads = (0..n).filter(|i| i % 3 != 0).count();
        assert_eq!(e.body.len(), groups + payloads);
        assert_eq!(e.body_bytes, ((groups + payloads) * BLOCK_BYTES) as u64);
        assert_eq!(e.bytes(), e.body_bytes + BLOCK_BYTES_U64);
        let c = Commit::decode(&e.commit.0).expect("the commit decodes");
        assert_eq!(c.groups as usize, groups);
        assert_eq!(c.pages, n as u64);
        assert_eq!(c.body_bytes, e.body_bytes);
        // Walk the body as replay does: a group, then its payloads.
        let mut batch = BatchCrc::default();
        let mut i = 0;
        let mut index = 0;
        while i < e.body.len() {
            let g = PageGroup::decode(e.body[i].bytes()).expect("a group block");
            assert_eq!((g.epoch, g.log_id, g.index), (5, 99, index));
            index += 1;
            i += 1;
            for entry in &g.entries {
                batch.push(entry.crc);
                match entry.kind {
                    EntryKind::Page => {
                        assert!(matches!(e.body[i], Piece::Payload(_)));
                        entry.check_payload(e.body[i].bytes()).expect("payload CRC");
                        i += 1;
                    }
                    EntryKind::Zero => entry.check_payload(&[]).expect("zero CRC"),
                }
            }
        }
        assert_eq!(c.batch_crc, batch.value());
    }
}

#[test]
fn segment_file_names() {
    assert_eq!(segment_file_name(1), "seg-000001.lego");
    assert_eq!(segment_file_name(1_234_567), "seg-1234567.lego");
    assert_eq!(parse_segment_file_name("seg-000001.lego"), Some(1));
    assert_eq!(parse_segment_file_name("seg-1234567.lego"), Some(1_234_567));
    for bad in [
        "seg-000000.lego",
        "seg-00001.lego",
        "seg-0000001.lego",
        "seg-00000a.lego",
        "seg-000001.lego.tmp",
        "seg-+00001.lego",
        "lock",
    ] {
        assert_eq!(parse_segment_file_name(bad), None, "{bad}");
    }
}
