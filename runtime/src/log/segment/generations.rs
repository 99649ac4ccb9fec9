//! Tests of the log's generations (the previous one kept as the fallback for a damaged newest
//! checkpoint), of program checkpoints through compaction and resume, of `--strict`, and of
//! version 1 logs.

use std::collections::BTreeMap;
use std::path::Path;

use super::*;
use crate::log::format::{
    EpochOrigin, ImageHeader, RegionInfo, BLOCK_BYTES, CRC_OFFSET, PAGE_BYTES,
};
use crate::log::image::ImageReader;
use crate::log::replay::{
    check_strict, inspect, replay_dir_with, resolve_target, ReplayOptions, ReplayReport, Target,
};
use crate::log::test_support::{epoch_pages, page, replay_mem, segments_of, Change, Model};
use crate::test_support::TestDir;

const LOG_ID: u64 = 42;

const SMALL: RegionInfo = RegionInfo {
    base: 0x7e40_0000_0000,
    len: 16 * PAGE_BYTES,
};

const LARGE: RegionInfo = RegionInfo {
    base: 0x7e80_0000_0000,
    len: 4096 * PAGE_BYTES,
};

/// Blocks of a large checkpoint damaged one at a time (besides its first and last ones).
const SAMPLED_BLOCKS: usize = 24;

fn options(target: u64) -> WriterOptions {
    crate::log::test_support::memory_options(target, LOG_ID)
}

fn writer(storage: &MemoryStorage, region: RegionInfo, target: u64) -> LogWriter {
    LogWriter::with_storage(Box::new(storage.clone()), region, options(target))
        .expect("creating the writer")
}

/// `n` pages changed in epoch `e` (distinct while `n` <= the region's pages / 2): some `ZERO`
/// records, some all-zero pages, the rest with contents of their own.
fn changes(e: u64, n: u64, region: RegionInfo) -> Vec<Change> {
    let pages = region.pages();
    (0..n)
        .map(|i| {
            let p = (i * 2 + e) % pages;
            let data = match (i + e) % 7 {
                0 => None,
                1 => Some(vec![0; PAGE_SIZE]),
                _ => Some(page(e * 10_000 + i)),
            };
            (p, data)
        })
        .collect()
}

/// The heap after each epoch, by epoch number (compaction gives old contents new numbers).
struct History {
    model: Model,
    at: BTreeMap<u64, Model>,
}

impl History {
    fn new(region: RegionInfo) -> History {
        History {
            model: Model::new(region, LOG_ID),
            at: BTreeMap::new(),
        }
    }

    /// Appends epoch `e`'s changes (of origin `origin`) and records the heap after it.
    fn append(&mut self, w: &mut LogWriter, origin: EpochOrigin, c: &[Change]) -> u64 {
        let epoch = w
            .append_epoch_as(origin, &epoch_pages(c))
            .expect("appending");
        self.model.apply(c);
        self.at.insert(epoch, self.model.clone());
        epoch
    }

    /// The image replay must write for epoch `epoch`.
    fn image(&self, epoch: u64, origin: EpochOrigin) -> Vec<u8> {
        image_as(&self.at[&epoch], epoch, origin)
    }
}

/// [`Model::image`] with the header's origin flag.
fn image_as(model: &Model, epoch: u64, origin: EpochOrigin) -> Vec<u8> {
    let mut img = model.image(epoch);
    let mut header = ImageHeader::decode(&img[..BLOCK_BYTES]).expect("an image");
    header.origin = origin;
    img[..BLOCK_BYTES].copy_from_slice(&header.encode().0);
    img
}

/// Whether two images hold the same heap (region, log id, pages, origin, bytes): only the
/// epoch number may differ.
fn same_heap(a: &[u8], b: &[u8]) -> bool {
    let ha = ImageHeader::decode(&a[..BLOCK_BYTES]).expect("an image");
    let hb = ImageHeader::decode(&b[..BLOCK_BYTES]).expect("an image");
    ImageHeader { epoch: 0, ..ha } == ImageHeader { epoch: 0, ..hb }
        && a[BLOCK_BYTES..] == b[BLOCK_BYTES..]
}

fn replay(storage: &MemoryStorage, target: Target) -> Result<(ReplayReport, Vec<u8>), String> {
    let segs = segments_of(storage);
    let dir = Path::new("memory:");
    let epoch = resolve_target(dir, &segs, target).map_err(|e| e.to_string())?;
    replay_mem(&segs, epoch).map_err(|e| e.to_string())
}

/// Three generations in one region: epochs 1 to 4 (generation 1), a compaction (checkpoint
/// 5) and epochs 6 and 7 (generation 2), a compaction (checkpoint 8) and epochs 9 and 10.
/// Each generation is one segment. Returns the log, the history, the writer, and the bytes of
/// generation 3's segment up to the end of its checkpoint.
fn three_generations(region: RegionInfo, pages: u64) -> (MemoryStorage, History, LogWriter, usize) {
    let storage = MemoryStorage::new();
    let mut w = writer(&storage, region, 1 << 30);
    let mut h = History::new(region);
    for e in 1..=4 {
        h.append(&mut w, EpochOrigin::Automatic, &changes(e, pages, region));
    }
    assert_eq!(w.compact().expect("compacting"), 5);
    h.at.insert(5, h.model.clone());
    for e in 6..=7 {
        h.append(&mut w, EpochOrigin::Automatic, &changes(e, pages, region));
    }
    assert_eq!(w.compact().expect("compacting"), 8);
    h.at.insert(8, h.model.clone());
    let ckpt_end = storage.snapshot()[&3].len();
    for e in 9..=10 {
        h.append(&mut w, EpochOrigin::Automatic, &changes(e, pages, region));
    }
    let segs: Vec<u64> = storage.snapshot().keys().copied().collect();
    assert_eq!(
        segs,
        vec![2, 3],
        "generation 1 went at the first epoch after checkpoint 8"
    );
    (storage, h, w, ckpt_end)
}

/// Replays the log with segment 3 replaced by `seg3` and checks that it gives exactly epoch
/// 7, generation 2's last, and says it fell back (unless `clean`: a checkpoint segment that
/// holds only its header is what a crash right after creating it leaves).
fn check_fallback(storage: &MemoryStorage, h: &History, seg3: &[u8], what: &str, clean: bool) {
    let mut segs = segments_of(storage);
    segs[1].source = seg3.to_vec();
    let (report, image) = replay_mem(&segs, None)
        .unwrap_or_else(|e| panic!("{what}: the previous generation must replay: {e}"));
    assert_eq!(report.epoch, 7, "{what}: {report}");
    assert!(
        image == h.image(7, EpochOrigin::Automatic),
        "{what}: a torn heap"
    );
    if !clean {
        assert_eq!(
            report.fell_back_from.as_deref(),
            Some(Path::new("seg-000003.lego")),
            "{what}: {report}"
        );
        assert!(report.to_string().contains("fell back"), "{what}: {report}");
        assert!(
            check_strict(Path::new("memory:"), &segs, &report).is_err(),
            "{what}: --strict must refuse"
        );
    }
}

/// Every block of a small newest checkpoint cut off and flipped: replay gives exactly the
/// previous generation's last committed epoch, and says so; compaction refuses such a log.
#[test]
fn damage_anywhere_in_a_small_newest_checkpoint_falls_back_to_the_previous_generation() {
    let (storage, h, mut w, ckpt_end) = three_generations(SMALL, 6);
    let full = storage.snapshot()[&3].clone();
    let (report, image) = replay(&storage, Target::Newest).expect("replays");
    assert_eq!((report.epoch, report.base_epoch), (10, 8));
    assert!(report.dropped.is_empty() && report.fell_back_from.is_none());
    assert!(image == h.image(10, EpochOrigin::Automatic));
    let blocks = ckpt_end / BLOCK_BYTES;
    assert!(blocks >= 4, "header, group, payloads, commit");
    for b in 0..blocks {
        for cut in [b * BLOCK_BYTES, b * BLOCK_BYTES + 1 + b % 4000] {
            let what = format!("cut at {cut}");
            check_fallback(&storage, &h, &full[..cut], &what, cut == BLOCK_BYTES);
        }
        for (at, mask) in [(b * 131 % CRC_OFFSET, 0x01u8), (CRC_OFFSET + b % 4, 0xff)] {
            let mut bad = full.clone();
            bad[b * BLOCK_BYTES + at] ^= mask;
            let what = format!("block {b}, byte {at} ^ {mask:#x}");
            check_fallback(&storage, &h, &bad, &what, false);
        }
    }
    // Compaction of that log would go back to epoch 7: it refuses and leaves the log.
    let mut bad = full.clone();
    bad[BLOCK_BYTES + 8] ^= 1;
    storage.replace_segment(3, bad);
    let before = storage.snapshot();
    assert!(matches!(
        w.compact(),
        Err(LogError::CompactionBehind {
            replayed: 7,
            committed: 10,
            ..
        })
    ));
    assert!(storage.snapshot() == before, "the log is left as it was");
}

/// Sampled blocks of a large newest checkpoint (a seed in the output replays a failure).
#[test]
fn damage_in_sampled_blocks_of_a_large_newest_checkpoint_falls_back() {
    let (storage, h, _w, ckpt_end) = three_generations(LARGE, 1500);
    let full = storage.snapshot()[&3].clone();
    let blocks = ckpt_end / BLOCK_BYTES;
    assert!(blocks > 1000, "a checkpoint of many page groups");
    let seed = std::env::var("LEGO_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    eprintln!("sampled checkpoint damage: LEGO_TEST_SEED={seed}");
    let mut x = seed;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut sample: Vec<usize> = vec![0, 1, 2, blocks - 1];
    sample.extend((0..SAMPLED_BLOCKS).map(|_| (next() % blocks as u64) as usize));
    for b in sample {
        let at = (next() % BLOCK_BYTES as u64) as usize;
        let mut bad = full.clone();
        bad[b * BLOCK_BYTES + at] ^= 1 << (next() % 8);
        check_fallback(
            &storage,
            &h,
            &bad,
            &format!("seed {seed}: block {b} byte {at}"),
            false,
        );
        let cut = b * BLOCK_BYTES + at;
        let clean = cut == BLOCK_BYTES;
        check_fallback(
            &storage,
            &h,
            &full[..cut],
            &format!("seed {seed}: cut {cut}"),
            clean,
        );
    }
}

/// Damage after the newest checkpoint costs only the damaged epochs, as before generations.
#[test]
fn damage_after_the_newest_checkpoint_gives_the_last_good_epoch_before_it() {
    let (storage, h, _w, ckpt_end) = three_generations(SMALL, 6);
    let mut bad = storage.snapshot()[&3].clone();
    // The first block of epoch 9.
    bad[ckpt_end + 100] ^= 0x10;
    storage.replace_segment(3, bad);
    let (report, image) = replay(&storage, Target::Newest).expect("replays");
    assert_eq!((report.epoch, report.base_epoch), (8, 8));
    assert!(report.fell_back_from.is_none(), "{report}");
    assert!(image == h.image(8, EpochOrigin::Automatic));
}

/// Compaction after compaction: the log holds the previous generation whole and the current
/// one, `log_bytes` counts the current one, and replay gives the newest epoch.
#[test]
fn compactions_keep_exactly_two_generations() {
    let storage = MemoryStorage::new();
    // Segments of about two epochs: each generation is several segments.
    let mut w = writer(&storage, SMALL, 12 * BLOCK_BYTES as u64);
    let mut h = History::new(SMALL);
    let mut starts = vec![1u64];
    let mut e = 0;
    for round in 0..6 {
        for _ in 0..5 {
            e += 1;
            h.append(&mut w, EpochOrigin::Automatic, &changes(e, 4, SMALL));
        }
        let seqs: Vec<u64> = storage.snapshot().keys().copied().collect();
        let previous = starts[starts.len().saturating_sub(2)];
        assert_eq!(
            seqs[0], previous,
            "round {round}: the previous generation is whole"
        );
        assert!(
            seqs.len() > 2,
            "round {round}: generations of several segments"
        );
        let epoch = w.compact().expect("compacting");
        h.at.insert(epoch, h.model.clone());
        e = epoch;
        starts.push(w.generation());
        assert_eq!(w.generation(), w.segment());
        let seqs: Vec<u64> = storage.snapshot().keys().copied().collect();
        // Until an epoch after the new checkpoint is durable, the oldest one is there too.
        assert_eq!(
            seqs[0],
            starts[starts.len().saturating_sub(3)],
            "round {round}"
        );
        e = h.append(&mut w, EpochOrigin::Automatic, &changes(e + 1, 4, SMALL));
        let snap = storage.snapshot();
        let seqs: Vec<u64> = snap.keys().copied().collect();
        assert_eq!(
            seqs[0],
            starts[starts.len() - 2],
            "round {round}: two generations"
        );
        let bytes = |from: u64| snap.range(from..).map(|(_, b)| b.len() as u64).sum::<u64>();
        assert_eq!(w.log_bytes(), bytes(w.generation()), "round {round}");
        assert_eq!(w.total_bytes(), bytes(0), "round {round}");
        let (report, image) = replay(&storage, Target::Newest).expect("replays");
        assert_eq!(
            (report.epoch, report.base_epoch),
            (e, epoch),
            "round {round}"
        );
        assert!(report.dropped.is_empty(), "round {round}: {report}");
        assert!(image == h.image(e, EpochOrigin::Automatic), "round {round}");
        // The previous generation's epochs can still be asked for.
        let first = report.first_epoch;
        assert_eq!(
            first,
            if round == 0 {
                1
            } else {
                starts_epoch(&storage, seqs[0])
            }
        );
        let (_, old) = replay_mem(&segments_of(&storage), Some(first)).expect("replays");
        assert!(
            old == h.image(first, EpochOrigin::Automatic),
            "round {round}"
        );
    }
}

/// The first epoch of segment `seq`.
fn starts_epoch(storage: &MemoryStorage, seq: u64) -> u64 {
    let bytes = &storage.snapshot()[&seq];
    crate::log::format::SegmentHeader::decode(&bytes[..BLOCK_BYTES])
        .expect("a header")
        .first_epoch
}

/// P (a program checkpoint), automatic epochs after it, compaction: the default replay gives
/// the newest heap, `--checkpoint` gives P's, both byte for byte as a replay before the
/// compaction did; again after a second compaction; and after one whose later epochs are
/// too large, P is found only while the previous generation lasts, then `--checkpoint` is
/// an error (never an automatic epoch).
// Long (about 115 lines) for a reason: one life of a log through three compactions, each
// replayed both ways and compared with the replays before it; the steps hand their images on.
#[test]
fn program_checkpoints_survive_compaction() {
    let storage = MemoryStorage::new();
    let mut w = writer(&storage, SMALL, 1 << 20);
    let mut h = History::new(SMALL);
    for e in 1..=2 {
        h.append(&mut w, EpochOrigin::Automatic, &changes(e, 5, SMALL));
    }
    assert_eq!(
        h.append(&mut w, EpochOrigin::Program, &changes(3, 5, SMALL)),
        3
    );
    for e in 4..=6 {
        h.append(&mut w, EpochOrigin::Automatic, &changes(e, 5, SMALL));
    }
    let (newest, ref_n) = replay(&storage, Target::Newest).expect("replays");
    assert_eq!((newest.epoch, newest.newest_program), (6, Some(3)));
    assert!(newest
        .to_string()
        .contains("newest program checkpoint: epoch 3"));
    let (at_p, ref_p) = replay(&storage, Target::ProgramCheckpoint).expect("replays");
    assert_eq!((at_p.epoch, at_p.origin), (3, EpochOrigin::Program));
    assert!(at_p
        .to_string()
        .starts_with("recovered program checkpoint epoch 3"));
    assert!(ref_p == h.image(3, EpochOrigin::Program));

    // Checkpoint 7 holds epoch 3's heap; 8 to 10 are epochs 4 to 6 again.
    assert_eq!(w.compact_within(1 << 30).expect("compacting"), 10);
    let (report, image) = replay(&storage, Target::Newest).expect("replays");
    assert_eq!((report.epoch, report.base_epoch), (10, 7));
    assert_eq!(
        (report.origin, report.newest_program),
        (EpochOrigin::Automatic, Some(7))
    );
    assert!(
        same_heap(&image, &ref_n),
        "the default replay gives epoch 6's heap"
    );
    let (report, image) = replay(&storage, Target::ProgramCheckpoint).expect("replays");
    assert_eq!((report.epoch, report.origin), (7, EpochOrigin::Program));
    assert!(
        same_heap(&image, &ref_p),
        "--checkpoint gives epoch 3's heap"
    );
    let text = inspect(Path::new("memory:"), &segments_of(&storage), Vec::new()).to_string();
    assert!(
        text.contains("program checkpoints (lego_checkpoint): 3\n"),
        "{text}"
    );
    assert!(
        text.contains("program checkpoints (lego_checkpoint): 7\n"),
        "{text}"
    );
    assert!(
        text.contains("--checkpoint would recover program checkpoint epoch 7"),
        "{text}"
    );

    // More automatic epochs and a second compaction: P (now checkpoint 7) is kept again.
    h.model = h.at[&6].clone();
    for e in 11..=12 {
        h.append(&mut w, EpochOrigin::Automatic, &changes(e, 5, SMALL));
    }
    let (_, ref_n) = replay(&storage, Target::Newest).expect("replays");
    assert_eq!(w.compact_within(1 << 30).expect("compacting"), 18);
    let (report, image) = replay(&storage, Target::Newest).expect("replays");
    assert_eq!((report.epoch, report.base_epoch), (18, 13));
    assert!(same_heap(&image, &ref_n));
    let (report, image) = replay(&storage, Target::ProgramCheckpoint).expect("replays");
    assert_eq!(report.epoch, 13);
    assert!(same_heap(&image, &ref_p));

    // A limit whose half the epochs after P exceed: the checkpoint is of the newest epoch.
    let small_limit = 4 * BLOCK_BYTES as u64;
    assert_eq!(w.compact_within(small_limit).expect("compacting"), 19);
    let (report, image) = replay(&storage, Target::Newest).expect("replays");
    assert_eq!(
        (report.epoch, report.base_epoch, report.origin),
        (19, 19, EpochOrigin::Automatic)
    );
    assert!(same_heap(&image, &ref_n));
    let (report, image) =
        replay(&storage, Target::ProgramCheckpoint).expect("the previous generation");
    assert_eq!(report.epoch, 13);
    assert!(same_heap(&image, &ref_p));
    // Two more generations later P is gone: an error that names what is there.
    let mut e = 19;
    for _ in 0..2 {
        h.append(&mut w, EpochOrigin::Automatic, &changes(e + 1, 5, SMALL));
        e = w.compact_within(small_limit).expect("compacting");
        h.at.insert(e, h.model.clone());
        e = h.append(&mut w, EpochOrigin::Automatic, &changes(e + 1, 5, SMALL));
    }
    let err = replay(&storage, Target::ProgramCheckpoint).expect_err("no program checkpoint");
    assert!(
        err.contains("holds no program checkpoint") && err.contains(&format!("to {e}")),
        "{err}"
    );
    let (report, image) = replay(&storage, Target::Newest).expect("replays");
    assert_eq!(report.epoch, e);
    assert!(image == h.image(e, EpochOrigin::Automatic));

    // A checkpoint of a program checkpoint keeps the mark.
    let p = h.append(&mut w, EpochOrigin::Program, &changes(e + 1, 5, SMALL));
    let ckpt = w.compact().expect("compacting");
    assert_eq!(ckpt, p + 1);
    h.at.insert(ckpt, h.model.clone());
    let (report, image) = replay(&storage, Target::ProgramCheckpoint).expect("replays");
    assert_eq!(
        (report.epoch, report.base_epoch, report.origin),
        (ckpt, ckpt, EpochOrigin::Program)
    );
    assert!(image == h.image(ckpt, EpochOrigin::Program));
}

/// `resume` from an image of a program checkpoint writes a program checkpoint; from an
/// automatic one, an automatic checkpoint. Resuming from the newest epoch keeps the old log
/// as the previous generation; from an older one, only the new checkpoint.
#[test]
fn resume_keeps_the_program_mark_of_its_image() {
    let dir = TestDir::new("resume-program");
    let logs = dir.0.join("heap");
    let mut w = LogWriter::create(&logs, SMALL, options(1 << 20)).expect("creating");
    let mut h = History::new(SMALL);
    h.append(&mut w, EpochOrigin::Automatic, &changes(1, 5, SMALL));
    h.append(&mut w, EpochOrigin::Program, &changes(2, 5, SMALL));
    h.append(&mut w, EpochOrigin::Automatic, &changes(3, 5, SMALL));
    drop(w);
    let image = dir.0.join("heap.img");
    let again = dir.0.join("again.img");
    let strict = |target| ReplayOptions {
        target,
        strict: true,
    };
    let resume_from = |target, origin| {
        let report = replay_dir_with(&logs, &image, &strict(target), &mut |_| {}).expect("replays");
        assert_eq!(report.origin, origin);
        let header = *ImageReader::open(&image).expect("the image").header();
        assert_eq!(header.origin, origin);
        let w = LogWriter::resume(&logs, SMALL, options(1 << 20), &image).expect("resuming");
        let ckpt = w.last_committed();
        let report = replay_dir_with(&logs, &again, &ReplayOptions::default(), &mut |_| {})
            .expect("replays");
        assert_eq!(
            (report.epoch, report.base_epoch, report.origin),
            (ckpt, ckpt, origin)
        );
        assert!(same_heap(
            &std::fs::read(&again).expect("the image"),
            &std::fs::read(&image).expect("the image")
        ));
        w
    };
    // Epoch 2, older than the log's newest: the checkpoint (epoch 4) is all that stays.
    let mut w = resume_from(Target::ProgramCheckpoint, EpochOrigin::Program);
    assert_eq!(w.last_committed(), 4);
    assert_eq!(
        crate::log::inspect_dir(&logs)
            .expect("inspects")
            .segments
            .len(),
        1
    );
    h.model = h.at[&2].clone();
    h.append(&mut w, EpochOrigin::Automatic, &changes(5, 5, SMALL));
    drop(w);
    // Epoch 5, the newest: the old log stays as the previous generation.
    let w = resume_from(Target::Newest, EpochOrigin::Automatic);
    assert_eq!(w.last_committed(), 6);
    drop(w);
    let inspection = crate::log::inspect_dir(&logs).expect("inspects");
    assert_eq!(inspection.segments.len(), 2, "{inspection}");
    let recovered = std::fs::read(&again).expect("the image");
    assert!(same_heap(&recovered, &h.image(5, EpochOrigin::Automatic)));
}

/// `--strict` refuses a log with damage anywhere (after an `--epoch` target too) and passes a
/// clean one.
#[test]
fn strict_refuses_damage_anywhere() {
    let storage = MemoryStorage::new();
    let mut w = writer(&storage, SMALL, 1 << 20);
    let mut h = History::new(SMALL);
    for e in 1..=3 {
        h.append(&mut w, EpochOrigin::Automatic, &changes(e, 5, SMALL));
    }
    let dir = Path::new("memory:");
    let segs = segments_of(&storage);
    let (report, _) = replay_mem(&segs, None).expect("replays");
    check_strict(dir, &segs, &report).expect("a clean log");
    let (report, _) = replay_mem(&segs, Some(2)).expect("replays");
    check_strict(dir, &segs, &report).expect("a clean log with a target");
    let mut bad = segs[0].source.clone();
    let len = bad.len();
    bad[len - 50] ^= 4;
    let mut segs = segs;
    segs[0].source = bad;
    for target in [None, Some(1)] {
        let (report, image) = replay_mem(&segs, target).expect("the default recovers");
        assert_eq!(report.epoch, target.unwrap_or(2));
        assert!(image == h.image(report.epoch, EpochOrigin::Automatic));
        let err = check_strict(dir, &segs, &report).expect_err("--strict refuses");
        let text = err.to_string();
        assert!(
            text.contains("seg-000001.lego from offset")
                && text.contains("CRC32C")
                && text.contains("--strict"),
            "{text}"
        );
    }
}

/// A log and an image written by format version 1 (no origin flags) read as before, every
/// epoch automatic.
#[test]
fn version_1_logs_and_images_still_read() {
    let storage = MemoryStorage::new();
    let mut w = writer(&storage, SMALL, 10 * BLOCK_BYTES as u64);
    let mut h = History::new(SMALL);
    for e in 1..=4 {
        h.append(&mut w, EpochOrigin::Automatic, &changes(e, 5, SMALL));
    }
    let as_version_1 = |b: &mut [u8]| {
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        let crc = crc32c::crc32c(&b[..CRC_OFFSET]);
        b[CRC_OFFSET..BLOCK_BYTES].copy_from_slice(&crc.to_le_bytes());
    };
    let mut segs = segments_of(&storage);
    assert!(segs.len() > 1);
    for s in &mut segs {
        as_version_1(&mut s.source);
    }
    let (report, image) = replay_mem(&segs, None).expect("a version 1 log replays");
    assert_eq!((report.epoch, report.newest_program), (4, None));
    assert!(image == h.image(4, EpochOrigin::Automatic));
    let inspection = inspect(Path::new("memory:"), &segs, Vec::new());
    assert!(inspection.is_clean(), "{inspection}");
    let mut old_image = image.clone();
    as_version_1(&mut old_image);
    let header = ImageHeader::decode(&old_image[..BLOCK_BYTES]).expect("a version 1 image");
    assert_eq!((header.epoch, header.origin), (4, EpochOrigin::Automatic));
}
