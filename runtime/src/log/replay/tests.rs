//! Tests of replay: damage anywhere in the last epoch, every target, checkpoints and
//! generations, chains of segments, directories, and the property tests against the model.

use super::*;
use crate::log::format::{
    segment_file_name, RegionInfo, SegmentHeader, BLOCK_BYTES_U64, PAGE_BYTES,
    SEGMENT_FLAG_CHECKPOINT,
};
use crate::log::segment::{
    LogWriter, MemoryStorage, SyncMode, WriterOptions, SEGMENT_BYTES_TARGET_MIN,
};
use crate::log::test_support::{
    epoch_pages, memory_options, page, replay_mem, seeded_changes, segments_of, Change, Model,
};
use crate::test_support::TestDir;
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
