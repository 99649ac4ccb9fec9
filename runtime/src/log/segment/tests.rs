//! Tests of the writer and the log directory: the lock, modes, rotation, refused epochs,
//! failures and what continues after them, streaming, checkpoints from images, compaction and
//! resume.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::Path;

use super::*;
use crate::log::format::{
    segment_file_name, CommitKind, EpochOrigin, EpochPage, ImageHeader, RegionInfo, SegmentHeader,
    BLOCK_BYTES, PAGE_BYTES,
};
use crate::log::image::ImageError;
use crate::log::replay::replay_dir;
use crate::log::test_support::{epoch_pages, page, replay_mem, segments_of, Change, Model};
use crate::test_support::TestDir;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};

const REGION: RegionInfo = RegionInfo {
    base: 0x7e00_0000_0000,
    len: 32 * PAGE_BYTES,
};

fn options(target: u64) -> WriterOptions {
    WriterOptions {
        segment_bytes_target: target,
        sync: SyncMode::Data,
        log_id: Some(42),
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

#[test]
fn a_second_writer_is_refused_with_the_directory_and_the_holder() {
    let dir = TestDir::new("lock");
    let logs = dir.0.join("heap");
    let first = LogDir::open(&logs).expect("the first writer gets the directory");
    let err = match LogDir::open(&logs) {
        Err(e) => e,
        Ok(_) => panic!("a second writer must be refused"),
    };
    assert!(
        matches!(&err, LogError::Locked { dir, holder: Some(pid) }
            if dir == &logs && *pid == std::process::id()),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(text.contains(&logs.display().to_string()), "{text}");
    assert!(text.contains(&std::process::id().to_string()), "{text}");
    // A writer through LogWriter is refused the same way.
    assert!(matches!(
        LogWriter::create(&logs, REGION, options(1 << 20)),
        Err(LogError::Locked { .. })
    ));
    drop(first);
    LogDir::open(&logs).expect("the lock is free once its holder is gone");
}

#[test]
fn directory_0700_and_files_0600() {
    let dir = TestDir::new("modes");
    let logs = dir.0.join("heap");
    let mut w = LogWriter::create(&logs, REGION, options(1 << 20)).expect("creating");
    let p = page(1);
    w.append_epoch(&[EpochPage {
        page: 0,
        data: Some(&p),
    }])
    .expect("appending");
    assert_eq!(mode(&logs), 0o700);
    assert_eq!(mode(&logs.join(LOCK_FILE_NAME)), 0o600);
    let seg = logs.join("seg-000001.lego");
    assert_eq!(mode(&seg), 0o600);
    assert_eq!(
        std::fs::read_to_string(logs.join(LOCK_FILE_NAME)).expect("lock file"),
        format!("{}\n", std::process::id())
    );
    // header + group + payload + commit
    assert_eq!(
        std::fs::metadata(&seg).expect("stat").len(),
        4 * BLOCK_BYTES_U64
    );
    drop(w);

    // A directory that holds a log is not overwritten by a new writer.
    let err = match LogWriter::create(&logs, REGION, options(1 << 20)) {
        Err(e) => e,
        Ok(_) => panic!("a directory with segments must be refused"),
    };
    assert!(
        matches!(&err, LogError::NotEmpty { dir, name } if dir == &logs && name == "seg-000001.lego"),
        "{err:?}"
    );
    // A file where the directory should be is refused.
    let file = dir.0.join("file");
    std::fs::write(&file, b"x").expect("writing a file");
    assert!(matches!(
        LogDir::open(&file),
        Err(LogError::NotADirectory { .. })
    ));
}

#[test]
fn segments_rotate_at_the_size_target_between_epochs() {
    let storage = MemoryStorage::new();
    // Room for the header and 5 blocks: an epoch of 2 pages (4 blocks) fits once.
    let target = 6 * BLOCK_BYTES_U64;
    let mut w = LogWriter::with_storage(Box::new(storage.clone()), REGION, options(target))
        .expect("creating");
    let data: Vec<Vec<u8>> = (0..8).map(page).collect();
    for e in 0..4u64 {
        let changes = [
            EpochPage {
                page: 2 * e,
                data: Some(&data[2 * e as usize]),
            },
            EpochPage {
                page: 2 * e + 1,
                data: Some(&data[2 * e as usize + 1]),
            },
        ];
        assert_eq!(w.append_epoch(&changes).expect("appending"), e + 1);
    }
    let segs = storage.snapshot();
    // Epochs 1+2 (the second starts below the target), then 3+4.
    assert_eq!(segs.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
    for (seq, bytes) in &segs {
        let h = SegmentHeader::decode(bytes).expect("header");
        assert_eq!(h.seq, *seq);
        assert_eq!(h.first_epoch, 2 * seq - 1);
        assert_eq!(bytes.len() as u64, 9 * BLOCK_BYTES_U64);
    }
    assert_eq!(w.segment(), 2);
    assert_eq!(w.next_epoch(), 5);
}

#[test]
fn bad_epochs_are_refused_before_anything_is_written() {
    let storage = MemoryStorage::new();
    let mut w = LogWriter::with_storage(Box::new(storage.clone()), REGION, options(1 << 20))
        .expect("creating");
    let p = page(3);
    let short = [0u8; 100];
    type Expected = fn(&LogError) -> bool;
    let cases: Vec<(Vec<EpochPage<'_>>, Expected)> = vec![
        (
            vec![EpochPage {
                page: 32,
                data: Some(&p),
            }],
            |e| {
                matches!(
                    e,
                    LogError::PageOutOfRange {
                        page: 32,
                        pages: 32
                    }
                )
            },
        ),
        (
            vec![EpochPage {
                page: 1,
                data: Some(&short),
            }],
            |e| matches!(e, LogError::PageLength { page: 1, len: 100 }),
        ),
        (
            vec![
                EpochPage {
                    page: 7,
                    data: Some(&p),
                },
                EpochPage {
                    page: 3,
                    data: None,
                },
                EpochPage {
                    page: 7,
                    data: None,
                },
            ],
            |e| matches!(e, LogError::DuplicatePage { page: 7 }),
        ),
    ];
    for (pages, expected) in cases {
        let err = w.append_epoch(&pages).expect_err("refused");
        assert!(expected(&err), "{err:?}");
    }
    assert!(storage.snapshot().is_empty());
    assert_eq!(w.next_epoch(), 1);
    // An empty epoch is fine: it commits nothing but advances the epoch.
    assert_eq!(w.append_epoch(&[]).expect("empty epoch"), 1);

    assert!(matches!(
        LogWriter::with_storage(Box::new(MemoryStorage::new()), REGION, options(4096)),
        Err(LogError::SegmentTarget { bytes: 4096 })
    ));
    let odd = RegionInfo {
        base: 4096,
        len: 100,
    };
    assert!(matches!(
        LogWriter::with_storage(Box::new(MemoryStorage::new()), odd, options(1 << 20)),
        Err(LogError::Region { .. })
    ));
}

/// Which storage call fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Create,
    Append,
    Sync,
}

/// Memory storage whose `nth` call of `op` (counting from 0) fails with `EIO`, once.
struct Failing {
    inner: MemoryStorage,
    op: Op,
    nth: usize,
    calls: usize,
    // With `true`, a failing append still writes its bytes (the error came afterwards,
    // as with an fsync that fails after the data reached the disk).
    writes_anyway: bool,
}

impl Failing {
    fn hit(&mut self, op: Op) -> std::io::Result<()> {
        if op != self.op {
            return Ok(());
        }
        self.calls += 1;
        if self.calls - 1 == self.nth {
            Err(std::io::Error::from_raw_os_error(libc::EIO))
        } else {
            Ok(())
        }
    }
}

impl LogStorage for Failing {
    fn create_segment(&mut self, seq: u64) -> std::io::Result<()> {
        self.hit(Op::Create)?;
        self.inner.create_segment(seq)
    }
    fn append(&mut self, offset: u64, pieces: &[&[u8]]) -> std::io::Result<()> {
        let r = self.hit(Op::Append);
        if r.is_ok() || self.writes_anyway {
            self.inner.append(offset, pieces)?;
        }
        r
    }
    fn sync_segment(&mut self) -> std::io::Result<()> {
        self.hit(Op::Sync)
    }
    fn sync_dir(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn remove_segment(&mut self, seq: u64) -> std::io::Result<()> {
        self.inner.remove_segment(seq)
    }
    fn segments(&self) -> std::io::Result<Vec<u64>> {
        self.inner.segments()
    }
    fn segment_path(&self, seq: u64) -> PathBuf {
        self.inner.segment_path(seq)
    }
    fn location(&self) -> PathBuf {
        self.inner.location()
    }
    fn open_segment(&self, seq: u64) -> std::io::Result<Box<dyn SegmentSource>> {
        self.inner.open_segment(seq)
    }
    fn scratch_image_path(&self) -> PathBuf {
        self.inner.scratch_image_path()
    }
}

/// A failed create, write or sync at any point of the third epoch: the writer reports it,
/// never reports the epoch durable, accepts only a checkpoint next, and the log then
/// replays either to the last epoch that was reported durable or, after the checkpoint,
/// to the checkpoint's image.
#[test]
fn after_a_failed_write_or_sync_only_a_checkpoint_continues_the_log() {
    // Calls made by epochs 1 and 2 (one segment): create 1, append 1 + 2 each, sync 1 + 2
    // each. The third epoch's calls are the ones that fail.
    // The last number is the epoch a replay finds right after the failure.
    let cases = [
        (Op::Append, 5, false, 2), // the pages of epoch 3
        (Op::Sync, 5, false, 2),   // the fdatasync before its commit
        (Op::Append, 6, false, 2), // its commit record
        (Op::Append, 6, true, 3),  // its commit record, written but reported failed
        (Op::Sync, 6, false, 3),   // the fdatasync after the commit: the data is there
    ];
    for (op, nth, writes_anyway, replayed) in cases {
        let inner = MemoryStorage::new();
        let failing = Failing {
            inner: inner.clone(),
            op,
            nth,
            calls: 0,
            writes_anyway,
        };
        let mut w =
            LogWriter::with_storage(Box::new(failing), REGION, options(1 << 20)).expect("creating");
        let mut model = Model::new(REGION, 42);
        let mut images = vec![model.image(0)];
        for e in 1..=2u64 {
            let changes: Vec<Change> = vec![(e, Some(page(e))), (10 + e, Some(page(10 + e)))];
            w.append_epoch(&epoch_pages(&changes)).expect("appending");
            model.apply(&changes);
            images.push(model.image(e));
        }
        let changes: Vec<Change> = vec![(3, Some(page(3))), (1, None)];
        let err = w
            .append_epoch(&epoch_pages(&changes))
            .expect_err("the injected failure is reported");
        assert!(matches!(err, LogError::Io { .. }), "{op:?} {nth}: {err:?}");
        // The failed epoch is at most replayed as a whole (if its commit got through).
        let (report, image) =
            replay_mem(&segments_of(&inner), None).expect("epochs 1 and 2 replay");
        let mut with_third = model.clone();
        with_third.apply(&changes);
        assert_eq!(report.epoch, replayed, "{op:?} {nth}");
        if replayed == 2 {
            assert!(image == images[2], "{op:?} {nth}: a torn epoch was applied");
        } else {
            assert!(image == with_third.image(3), "{op:?} {nth}");
        }
        // Nothing but a checkpoint is accepted now.
        assert!(matches!(
            w.append_epoch(&epoch_pages(&changes)),
            Err(LogError::NeedsCheckpoint { epoch: 3 })
        ));
        // The writer cannot know whether epoch 3 is in the log; the checkpoint holds the
        // heap as the program has it, which includes epoch 3's changes.
        let full = with_third.checkpoint_changes();
        assert_eq!(w.checkpoint(&epoch_pages(&full)).expect("checkpoint"), 4);
        let next: Vec<Change> = vec![(20, Some(page(20)))];
        assert_eq!(w.append_epoch(&epoch_pages(&next)).expect("appending"), 5);
        with_third.apply(&next);
        let segs = segments_of(&inner);
        assert_eq!(
            segs.len(),
            2,
            "the older segment stays as the previous generation"
        );
        let (report, image) = replay_mem(&segs, None).expect("replays");
        assert_eq!((report.epoch, report.base_epoch), (5, 4));
        assert!(image == with_third.image(5), "{op:?} {nth}");
    }
}

#[test]
fn a_failed_segment_creation_is_reported_and_the_next_segment_gets_a_new_number() {
    let inner = MemoryStorage::new();
    let failing = Failing {
        inner: inner.clone(),
        op: Op::Create,
        nth: 1,
        calls: 0,
        writes_anyway: false,
    };
    let mut w =
        LogWriter::with_storage(Box::new(failing), REGION, options(SEGMENT_BYTES_TARGET_MIN))
            .expect("creating");
    let p = page(1);
    let one = [EpochPage {
        page: 0,
        data: Some(&p),
    }];
    assert_eq!(w.append_epoch(&one).expect("first epoch"), 1);
    assert!(matches!(w.append_epoch(&one), Err(LogError::Io { .. })));
    assert_eq!(w.checkpoint(&one).expect("checkpoint"), 3);
    let names: Vec<u64> = inner.snapshot().keys().copied().collect();
    // Segment 1 stays as the previous generation.
    assert_eq!(names, vec![1, 2]);
    let (report, _) = replay_mem(&segments_of(&inner), None).expect("replays");
    assert_eq!(report.epoch, 3);
}

// Streaming epochs, checkpoints from images, compaction and resume.

/// A region large enough for several page groups per epoch.
const BIG: RegionInfo = RegionInfo {
    base: 0x7e00_0000_0000,
    len: 512 * PAGE_BYTES,
};

fn memory_writer(storage: &MemoryStorage, region: RegionInfo, target: u64) -> LogWriter {
    LogWriter::with_storage(Box::new(storage.clone()), region, options(target)).expect("creating")
}

/// `n` distinct pages (n <= the region's pages, a power of two) changed in epoch `e`: some
/// `ZERO` records, some all-zero pages, the rest with contents of their own.
fn changes_of(e: u64, n: u64, region_pages: u64) -> Vec<Change> {
    (0..n)
        .map(|i| {
            let p = (i * 7 + e * 13) % region_pages;
            let data = match (i + e) % 5 {
                0 => None,
                1 => Some(vec![0; PAGE_SIZE]),
                _ => Some(page(e * 1000 + i)),
            };
            (p, data)
        })
        .collect()
}

fn as_segments(map: &BTreeMap<u64, Vec<u8>>) -> Vec<crate::log::replay::Segment<Vec<u8>>> {
    map.iter()
        .map(|(&seq, b)| crate::log::replay::Segment {
            seq,
            path: PathBuf::from(segment_file_name(seq)),
            source: b.clone(),
        })
        .collect()
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("listing")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn streaming_epochs_write_the_same_bytes_as_whole_epochs() {
    let first = changes_of(1, 300, BIG.pages());
    let third = changes_of(3, 130, BIG.pages());
    let whole = MemoryStorage::new();
    let mut w = memory_writer(&whole, BIG, 1 << 20);
    assert_eq!(w.append_epoch(&epoch_pages(&first)).expect("appending"), 1);
    assert_eq!(w.append_epoch(&[]).expect("an empty epoch"), 2);
    assert_eq!(w.append_epoch(&epoch_pages(&third)).expect("appending"), 3);
    let expected = whole.snapshot();
    // The format did not change: epoch 1 is what `encode_epoch` lays out.
    let encoded = super::super::format::encode_epoch(
        1,
        42,
        CommitKind::Delta,
        EpochOrigin::Automatic,
        &epoch_pages(&first),
    );
    let mut bytes: Vec<u8> = encoded
        .body
        .iter()
        .flat_map(|p| p.bytes().to_vec())
        .collect();
    bytes.extend_from_slice(&encoded.commit.0);
    let seg = &expected[&1];
    assert!(seg[BLOCK_BYTES..BLOCK_BYTES + bytes.len()] == bytes[..]);

    for chunk in [1usize, 2, 7, 125, 126, 127, 252, 299, 300] {
        let streamed = MemoryStorage::new();
        let mut w = memory_writer(&streamed, BIG, 1 << 20);
        let mut e = w.begin_epoch().expect("beginning");
        assert_eq!(e.epoch(), 1);
        for c in epoch_pages(&first).chunks(chunk) {
            e.add(c).expect("adding");
            e.add(&[]).expect("adding nothing");
        }
        assert_eq!(e.commit().expect("committing"), 1);
        let e = w.begin_epoch().expect("beginning");
        assert_eq!(e.commit().expect("an empty epoch commits"), 2);
        let mut e = w.begin_epoch().expect("beginning");
        for c in epoch_pages(&third).chunks(chunk) {
            e.add(c).expect("adding");
        }
        assert_eq!(e.commit().expect("committing"), 3);
        assert_eq!(w.last_committed(), 3);
        assert!(streamed.snapshot() == expected, "chunks of {chunk} pages");
        assert_eq!(w.log_bytes(), expected[&1].len() as u64);
    }
}

#[test]
fn a_refused_add_writes_nothing_and_the_epoch_goes_on() {
    let storage = MemoryStorage::new();
    let mut w = memory_writer(&storage, BIG, 1 << 20);
    let p = page(1);
    let mut e = w.begin_epoch().expect("beginning");
    let one = [EpochPage {
        page: 3,
        data: Some(&p),
    }];
    e.add(&one).expect("adding");
    // Page 3 is in the open group already.
    assert!(matches!(
        e.add(&one),
        Err(LogError::DuplicatePage { page: 3 })
    ));
    let outside = [EpochPage {
        page: BIG.pages(),
        data: Some(&p),
    }];
    assert!(matches!(
        e.add(&outside),
        Err(LogError::PageOutOfRange { .. })
    ));
    assert_eq!(e.commit().expect("committing"), 1);
    let mut model = Model::new(BIG, 42);
    model.apply(&[(3, Some(p.clone()))]);
    let (report, image) = replay_mem(&segments_of(&storage), None).expect("replays");
    assert_eq!(report.epoch, 1);
    assert!(image == model.image(1));
}

/// Dropping an epoch before its commit: without a trace if nothing was written (the next
/// epoch gets its number), else the writer asks for a checkpoint, and `compact` gives it.
#[test]
fn an_abandoned_epoch_leaves_no_trace_or_asks_for_a_checkpoint() {
    let storage = MemoryStorage::new();
    let mut w = memory_writer(&storage, BIG, 1 << 20);
    let mut model = Model::new(BIG, 42);
    let first = changes_of(1, 10, BIG.pages());
    assert_eq!(w.append_epoch(&epoch_pages(&first)).expect("appending"), 1);
    model.apply(&first);
    let before = storage.snapshot();
    {
        // Fewer pages than a group: they are only buffered.
        let mut e = w.begin_epoch().expect("beginning");
        e.add(&epoch_pages(&changes_of(2, 100, BIG.pages())))
            .expect("adding");
    }
    assert!(storage.snapshot() == before, "nothing was written");
    assert!(!w.is_broken());
    assert_eq!(w.next_epoch(), 2);
    let second = changes_of(3, 20, BIG.pages());
    assert_eq!(w.append_epoch(&epoch_pages(&second)).expect("appending"), 2);
    model.apply(&second);
    {
        // A whole group reaches the log, then the epoch is dropped.
        let mut e = w.begin_epoch().expect("beginning");
        e.add(&epoch_pages(&changes_of(4, 200, BIG.pages())))
            .expect("adding");
    }
    assert!(w.is_broken());
    assert!(matches!(
        w.append_epoch(&[]),
        Err(LogError::NeedsCheckpoint { epoch: 3 })
    ));
    assert!(matches!(
        w.begin_epoch(),
        Err(LogError::NeedsCheckpoint { epoch: 3 })
    ));
    let (report, image) = replay_mem(&segments_of(&storage), None).expect("replays");
    assert_eq!(report.epoch, 2);
    assert!(image == model.image(2));
    assert_eq!(report.dropped.len(), 1, "the abandoned blocks are left out");
    assert_eq!(w.compact().expect("compacting"), 4);
    assert!(!w.is_broken());
    let third = changes_of(5, 30, BIG.pages());
    assert_eq!(w.append_epoch(&epoch_pages(&third)).expect("appending"), 5);
    model.apply(&third);
    let (report, image) = replay_mem(&segments_of(&storage), None).expect("replays");
    assert_eq!((report.epoch, report.base_epoch), (5, 4));
    // The previous generation, kept as the fallback, still ends in the abandoned blocks.
    assert_eq!(report.dropped.len(), 1, "{report}");
    assert!(image == model.image(5));
}

/// Compares two images: the same region, log id, pages and bytes; the epoch may differ.
fn same_but_epoch(a: &[u8], b: &[u8]) -> bool {
    let ha = ImageHeader::decode(&a[..BLOCK_BYTES]).expect("an image");
    let hb = ImageHeader::decode(&b[..BLOCK_BYTES]).expect("an image");
    ImageHeader { epoch: 0, ..ha } == ImageHeader { epoch: 0, ..hb }
        && a[BLOCK_BYTES..] == b[BLOCK_BYTES..]
}

#[test]
fn a_checkpoint_from_a_replayed_image_replays_to_the_same_image() {
    let dir = TestDir::new("ckpt-image");
    let logs = dir.0.join("heap");
    let mut w = LogWriter::create(&logs, BIG, options(16 * BLOCK_BYTES_U64)).expect("creating");
    let mut model = Model::new(BIG, 42);
    for e in 1..=6 {
        let c = changes_of(e, 40, BIG.pages());
        w.append_epoch(&epoch_pages(&c)).expect("appending");
        model.apply(&c);
    }
    drop(w);
    let image = dir.0.join("heap.img");
    replay_dir(&logs, &image, None, &mut |_| {}).expect("replays");
    assert!(std::fs::read(&image).expect("the image") == model.image(6));

    // Into another log (with an epoch of its own, which the checkpoint replaces).
    let other = dir.0.join("other");
    let mut w = LogWriter::create(
        &other,
        BIG,
        WriterOptions {
            log_id: Some(7),
            ..options(1 << 20)
        },
    )
    .expect("creating");
    w.append_epoch(&epoch_pages(&changes_of(9, 5, BIG.pages())))
        .expect("appending");
    assert_eq!(w.checkpoint_from_image(&image).expect("checkpoint"), 2);
    assert_eq!(w.last_committed(), 2);
    assert_eq!(
        file_names(&other),
        vec![
            "lock".to_string(),
            segment_file_name(1),
            segment_file_name(2)
        ]
    );
    drop(w);
    let again = dir.0.join("again.img");
    let report = replay_dir(&other, &again, None, &mut |_| {}).expect("replays");
    assert_eq!((report.epoch, report.base_epoch), (2, 2));
    let mut expected = model.clone();
    expected.log_id = 7;
    assert!(std::fs::read(&again).expect("the image") == expected.image(2));
}

/// A sparse image of a larger region, with holes across chunks and explicitly written
/// zero pages; and images that must be refused.
#[test]
fn sparse_images_checkpoint_their_non_zero_pages_and_bad_images_are_refused() {
    let region = RegionInfo {
        base: 0x7e00_0000_0000,
        len: 8192 * PAGE_BYTES,
    };
    let dir = TestDir::new("sparse-image");
    let path = dir.0.join("sparse.img");
    let mut model = Model::new(region, 99);
    for p in [5u64, 3000, 3001, 4301, 8191] {
        model.apply(&[(p, Some(page(p)))]);
    }
    {
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .expect("creating");
        f.set_len(ImageHeader::page_offset(8192)).expect("sizing");
        // Zeros written as data, crossing chunk boundaries.
        let zeros = vec![0u8; 400 * PAGE_SIZE];
        f.write_all_at(&zeros, ImageHeader::page_offset(4000))
            .expect("writing zeros");
        let img = model.image(12);
        for p in [5u64, 3000, 3001, 4301, 8191] {
            let at = ImageHeader::page_offset(p);
            let i = usize::try_from(at).expect("small");
            f.write_all_at(&img[i..i + PAGE_SIZE], at).expect("writing");
        }
        f.write_all_at(&img[..BLOCK_BYTES], 0).expect("header");
    }
    let storage = MemoryStorage::new();
    let mut w = memory_writer(&storage, region, 1 << 20);
    assert_eq!(w.checkpoint_from_image(&path).expect("checkpoint"), 1);
    let (report, image) = replay_mem(&segments_of(&storage), None).expect("replays");
    assert_eq!(report.pages, 5);
    let mut expected = model.clone();
    expected.log_id = 42;
    assert!(image == expected.image(1));

    // Cut short by a page: the header's page count gives it away; nothing was written
    // (the pages found fit in the open group), so the writer is not broken.
    let len = std::fs::metadata(&path).expect("stat").len();
    let f = OpenOptions::new().write(true).open(&path).expect("opening");
    f.set_len(len - PAGE_BYTES).expect("cutting");
    let before = storage.snapshot();
    let err = w.checkpoint_from_image(&path).expect_err("refused");
    assert!(
        matches!(
            err,
            LogError::Image(ImageError::PageCount {
                header: 5,
                found: 4,
                ..
            })
        ),
        "{err:?}"
    );
    assert!(storage.snapshot() == before && !w.is_broken());
    // Not a whole number of pages.
    f.set_len(len - 100).expect("cutting");
    assert!(matches!(
        w.checkpoint_from_image(&path),
        Err(LogError::Image(ImageError::Length { .. }))
    ));
    // Not an image at all.
    let text = dir.0.join("text");
    std::fs::write(&text, b"hello").expect("writing");
    let err = w.checkpoint_from_image(&text).expect_err("refused");
    assert!(err.to_string().contains("not a lego heap image"), "{err}");
    // Another region.
    let small = MemoryStorage::new();
    let mut w = memory_writer(&small, REGION, 1 << 20);
    let image = dir.0.join("small.img");
    std::fs::write(&image, Model::new(BIG, 42).image(3)).expect("writing");
    assert!(matches!(
        w.checkpoint_from_image(&image),
        Err(LogError::ImageRegion { .. })
    ));
    assert!(small.snapshot().is_empty());
}

/// Compaction: the log's current generation shrinks to one checkpoint segment that
/// replays like the log did (the previous generation stays); a crash while it is written
/// leaves the old log (replays to its last epoch), a crash while the old segments are
/// removed leaves the checkpoint.
#[test]
fn compaction_bounds_the_log_and_a_crash_in_it_replays_the_last_committed_epoch() {
    let storage = MemoryStorage::new();
    let mut w = memory_writer(&storage, REGION, SEGMENT_BYTES_TARGET_MIN);
    let mut model = Model::new(REGION, 42);
    for e in 1..=8 {
        let c = changes_of(e, 6, REGION.pages());
        w.append_epoch(&epoch_pages(&c)).expect("appending");
        model.apply(&c);
    }
    let before = storage.snapshot();
    assert_eq!(before.len(), 8, "one epoch per segment");
    let bytes_before = w.log_bytes();
    assert_eq!(
        bytes_before,
        before.values().map(|b| b.len() as u64).sum::<u64>()
    );
    let (report, image8) = replay_mem(&as_segments(&before), None).expect("replays");
    assert_eq!(report.epoch, 8);
    assert!(image8 == model.image(8));

    assert_eq!(w.compact().expect("compacting"), 9);
    let after = storage.snapshot();
    assert_eq!(
        after.keys().copied().collect::<Vec<_>>(),
        (1..=9).collect::<Vec<u64>>(),
        "the first generation stays as the fallback"
    );
    assert!(w.log_bytes() < bytes_before);
    assert_eq!(w.log_bytes(), after[&9].len() as u64);
    assert_eq!(w.total_bytes(), bytes_before + w.log_bytes());
    assert_eq!(w.generation(), 9);
    let (report, image) = replay_mem(&as_segments(&after), None).expect("replays");
    assert_eq!((report.epoch, report.base_epoch), (9, 9));
    assert!(same_but_epoch(&image, &image8));
    assert!(image == model.image(9));
    assert!(!storage.scratch_image_path().exists(), "no image left");

    let ckpt = &after[&9];
    let cuts = (0..ckpt.len()).step_by(331).chain([ckpt.len() - 1]);
    for cut in cuts {
        let mut crashed = before.clone();
        crashed.insert(9, ckpt[..cut].to_vec());
        let (report, image) = replay_mem(&as_segments(&crashed), None).expect("replays");
        assert_eq!(report.epoch, 8, "cut at {cut}");
        assert!(image == image8, "cut at {cut}");
    }
    for kept_from in 1..=8u64 {
        let mut crashed: BTreeMap<u64, Vec<u8>> = before
            .range(kept_from..)
            .map(|(&s, b)| (s, b.clone()))
            .collect();
        crashed.insert(9, ckpt.clone());
        let (report, image) = replay_mem(&as_segments(&crashed), None).expect("replays");
        assert_eq!(
            (report.epoch, report.base_epoch),
            (9, 9),
            "from {kept_from}"
        );
        assert!(image == model.image(9), "from {kept_from}");
    }
    // The log goes on after the checkpoint.
    let c = changes_of(10, 6, REGION.pages());
    assert_eq!(w.append_epoch(&epoch_pages(&c)).expect("appending"), 10);
    model.apply(&c);
    let (report, image) = replay_mem(&segments_of(&storage), None).expect("replays");
    assert_eq!((report.epoch, report.base_epoch), (10, 9));
    assert!(image == model.image(10));
    assert_eq!(
        storage.snapshot().len(),
        10,
        "the previous generation stays"
    );
}

/// After a failed write or sync (the cases of the test above), `compact` makes the last
/// epoch replay finds the checkpoint's content, and the log goes on.
#[test]
fn a_broken_writer_recovers_by_compacting() {
    let cases = [
        (Op::Append, 5, false, 2),
        (Op::Sync, 5, false, 2),
        (Op::Append, 6, false, 2),
        (Op::Append, 6, true, 3),
        (Op::Sync, 6, false, 3),
        // The first epoch's pages: nothing was ever committed.
        (Op::Append, 1, false, 0),
    ];
    for (op, nth, writes_anyway, replayed) in cases {
        let inner = MemoryStorage::new();
        let failing = Failing {
            inner: inner.clone(),
            op,
            nth,
            calls: 0,
            writes_anyway,
        };
        let mut w =
            LogWriter::with_storage(Box::new(failing), REGION, options(1 << 20)).expect("creating");
        let mut models = vec![Model::new(REGION, 42)];
        let all: Vec<Vec<Change>> = (1..=3u64)
            .map(|e| vec![(e, Some(page(e))), (10 + e, Some(page(10 + e))), (30, None)])
            .collect();
        for changes in &all {
            let mut m = models.last().expect("a model").clone();
            m.apply(changes);
            models.push(m);
            if w.append_epoch(&epoch_pages(changes)).is_err() {
                break;
            }
        }
        let failed = models.len() as u64 - 1;
        assert!(w.is_broken(), "{op:?} {nth}");
        assert_eq!(w.last_committed(), failed - 1, "{op:?} {nth}");
        let epoch = w.compact().expect("compacting");
        assert_eq!(epoch, failed + 1, "{op:?} {nth}");
        assert!(!w.is_broken());
        assert_eq!(w.last_committed(), epoch);
        let mut expected = models[usize::try_from(replayed).expect("small")].clone();
        let next: Vec<Change> = vec![(20, Some(page(20)))];
        assert_eq!(
            w.append_epoch(&epoch_pages(&next)).expect("appending"),
            epoch + 1
        );
        expected.apply(&next);
        let segs = segments_of(&inner);
        // The first generation stays as the fallback (the next compaction removes it).
        assert_eq!(segs.len(), 2, "{op:?} {nth}");
        let (report, image) = replay_mem(&segs, None).expect("replays");
        assert_eq!((report.epoch, report.base_epoch), (epoch + 1, epoch));
        assert!(image == expected.image(epoch + 1), "{op:?} {nth}");
    }
}

/// Resume after a restore from an older epoch: the checkpoint is numbered after the whole
/// log (a crash while it is written replays the old log's last epoch, never an older one),
/// epochs after it replay on top; another log's image is refused.
// Long (about 125 lines) for a reason: one scenario, step by step (replay, restore, resume,
// crash in the checkpoint, epochs after it, another log's image), each step checked against
// the one before; cut into functions, the state the steps hand on would be passed around.
#[test]
fn resume_continues_a_log_from_a_replayed_image() {
    let dir = TestDir::new("resume");
    let logs = dir.0.join("heap");
    let opts = options(SEGMENT_BYTES_TARGET_MIN);
    let mut w = LogWriter::create(&logs, REGION, opts).expect("creating");
    let mut models = vec![Model::new(REGION, 42)];
    for e in 1..=5 {
        let c = changes_of(e, 6, REGION.pages());
        w.append_epoch(&epoch_pages(&c)).expect("appending");
        let mut m = models.last().expect("a model").clone();
        m.apply(&c);
        models.push(m);
    }
    let image = dir.0.join("heap.img");
    replay_dir(&logs, &image, Some(3), &mut |_| {}).expect("replays epoch 3");
    match LogWriter::resume(&logs, REGION, opts, &image) {
        Err(LogError::Locked { .. }) => {}
        Err(e) => panic!("expected the lock to refuse: {e:?}"),
        Ok(_) => panic!("a second writer must be refused"),
    }
    drop(w);
    let old: Vec<(String, Vec<u8>)> = (1..=5)
        .map(|s| {
            let name = segment_file_name(s);
            let bytes = std::fs::read(logs.join(&name)).expect("a segment");
            (name, bytes)
        })
        .collect();

    let mut w = LogWriter::resume(&logs, REGION, opts, &image).expect("resuming");
    assert_eq!((w.last_committed(), w.next_epoch(), w.log_id()), (6, 7, 42));
    assert_eq!(
        file_names(&logs),
        vec!["lock".to_string(), segment_file_name(6)]
    );
    let ckpt = std::fs::read(logs.join(segment_file_name(6))).expect("the checkpoint");
    let mut model = models[3].clone();
    for e in 7..=8 {
        let c = changes_of(e, 6, REGION.pages());
        assert_eq!(w.append_epoch(&epoch_pages(&c)).expect("appending"), e);
        model.apply(&c);
    }
    assert_eq!(w.compact().expect("compacting"), 9);
    // The resumed generation (segments 6 to 8) stays as the previous one.
    let mut names = vec!["lock".to_string()];
    names.extend((6..=9).map(segment_file_name));
    assert_eq!(file_names(&logs), names);
    assert_eq!(mode(&logs.join(segment_file_name(9))), 0o600);
    drop(w);
    let out = dir.0.join("after.img");
    let report = replay_dir(&logs, &out, None, &mut |_| {}).expect("replays");
    assert_eq!((report.epoch, report.base_epoch), (9, 9));
    assert!(std::fs::read(&out).expect("the image") == model.image(9));

    // A crash while resume wrote its checkpoint: the old log replays to its last epoch.
    let mut crashed: BTreeMap<u64, Vec<u8>> = old
        .iter()
        .enumerate()
        .map(|(i, (_, b))| (i as u64 + 1, b.clone()))
        .collect();
    for cut in (0..ckpt.len()).step_by(509).chain([ckpt.len() - 1]) {
        crashed.insert(6, ckpt[..cut].to_vec());
        let (report, image) = replay_mem(&as_segments(&crashed), None).expect("replays");
        assert_eq!(report.epoch, 5, "cut at {cut}");
        assert!(image == models[5].image(5), "cut at {cut}");
    }
    crashed.insert(6, ckpt);
    let (report, image) = replay_mem(&as_segments(&crashed), None).expect("replays");
    assert_eq!(report.epoch, 6);
    assert!(same_but_epoch(&image, &models[3].image(3)));

    // Another log's image is refused, naming both ids, and the log is left as it was.
    let other = dir.0.join("other");
    let mut w = LogWriter::create(
        &other,
        REGION,
        WriterOptions {
            log_id: Some(0x77),
            ..opts
        },
    )
    .expect("creating");
    w.append_epoch(&epoch_pages(&changes_of(1, 3, REGION.pages())))
        .expect("appending");
    drop(w);
    let foreign = dir.0.join("other.img");
    replay_dir(&other, &foreign, None, &mut |_| {}).expect("replays");
    let err = match LogWriter::resume(&logs, REGION, opts, &foreign) {
        Err(e) => e,
        Ok(_) => panic!("another log's image must be refused"),
    };
    assert!(
        matches!(
            err,
            LogError::LogIdMismatch {
                image_id: 0x77,
                log_id: 42,
                ..
            }
        ),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("0x0000000000000077") && text.contains("0x000000000000002a"),
        "{text}"
    );
    assert_eq!(file_names(&logs), names, "the log is left as it was");
    // Another region is refused too.
    let region = RegionInfo {
        len: 64 * PAGE_BYTES,
        ..REGION
    };
    assert!(matches!(
        LogWriter::resume(&logs, region, opts, &out),
        Err(LogError::ImageRegion { .. })
    ));

    // An empty directory: a new log under the image's id, numbered after its epoch.
    let fresh = dir.0.join("fresh");
    let w = LogWriter::resume(&fresh, REGION, opts, &out).expect("resuming");
    assert_eq!((w.log_id(), w.last_committed()), (42, 10));
    drop(w);
    let report = replay_dir(&fresh, &out, None, &mut |_| {}).expect("replays");
    assert_eq!((report.epoch, report.base_epoch), (10, 10));
    assert!(std::fs::read(&out).expect("the image") == model.image(10));
}

/// The page index learns where an epoch's pages are only once their bytes are in the file
/// (at the flush before the commit record): an append may return with its writes still in
/// flight, and a read through the index then found less than the page (seen as a short read
/// of a compaction's new segment after a pool server died).
#[test]
fn the_index_names_a_page_only_once_its_bytes_are_written() {
    let storage = MemoryStorage::new();
    let mut w = memory_writer(&storage, BIG, 1 << 20);
    let dir = TestDir::new("index-publish");
    let index = std::sync::Arc::new(PageIndex::new(dir.path(), BIG.pages()).expect("an index"));
    w.set_index(index.clone());
    let n = crate::log::format::GROUP_ENTRIES_MAX as u64 * 2;
    let pages: Vec<Vec<u8>> = (0..n).map(|i| page(i + 1)).collect();
    let epoch: Vec<EpochPage<'_>> = pages
        .iter()
        .enumerate()
        .map(|(i, d)| EpochPage {
            page: i as u64,
            data: Some(d),
        })
        .collect();
    let mut e = w.begin_epoch().expect("beginning");
    e.add(&epoch)
        .expect("adding whole groups, which are written at once");
    assert!(
        (0..n).all(|p| index.locate(p) == Located::Nowhere),
        "no page may be named before its bytes are in the file"
    );
    e.commit().expect("committing");
    for (p, d) in pages.iter().enumerate() {
        assert!(
            matches!(index.locate(p as u64), Located::At { crc, .. } if crc == crc32c::crc32c(d)),
            "page {p} must be named after the commit"
        );
    }
}
