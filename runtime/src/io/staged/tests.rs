//! The io_uring engine through [`LogDir`] and [`LogWriter`], on real files: round trips with
//! and without `O_DIRECT`, the `pwritev` fallback, and failures injected into the ring's I/O
//! (short writes, `ENOSPC`, `EIO` on fdatasync, a cancelled linked chain). Every test replays
//! what is on disk afterwards.

use std::path::Path;

use super::{Fault, FaultAt, STAGING_BUFFERS, STAGING_BUFFER_BYTES};
use crate::log::format::{parse_segment_file_name, RegionInfo, PAGE_BYTES};
use crate::log::replay::Segment;
use crate::log::segment::{
    LogDir, LogDirOptions, LogEngine, LogError, LogStorage, LogWriter, SyncMode, WriterOptions,
};
use crate::log::test_support::{epoch_pages, page, replay_mem, Change, Model};
use crate::test_support::TestDir;
use crate::PAGE_SIZE;

const REGION: RegionInfo = RegionInfo {
    base: 0x7e00_0000_0000,
    len: 4096 * PAGE_BYTES,
};

fn options(sync: SyncMode) -> WriterOptions {
    WriterOptions {
        segment_bytes_target: 64 << 20,
        sync,
        log_id: Some(42),
    }
}

fn uring(direct: bool) -> LogDirOptions {
    LogDirOptions {
        uring: true,
        direct,
    }
}

/// Every segment file in `dir`, as replay reads them.
fn segments_on_disk(dir: &Path) -> Vec<Segment<Vec<u8>>> {
    let mut segs: Vec<Segment<Vec<u8>>> = std::fs::read_dir(dir)
        .expect("listing the log directory")
        .filter_map(|e| {
            let e = e.expect("a directory entry");
            let seq = parse_segment_file_name(e.file_name().to_str()?)?;
            Some(Segment {
                seq,
                path: e.path(),
                source: std::fs::read(e.path()).expect("reading a segment"),
            })
        })
        .collect();
    segs.sort_by_key(|s| s.seq);
    segs
}

/// The error and all its sources, as one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Changes of epoch `e`: `pages` pages from `first` on, and one page zeroed.
fn changes(e: u64, first: u64, pages: u64) -> Vec<Change> {
    let mut c: Vec<Change> = (first..first + pages)
        .map(|p| (p, Some(page(e * 10_000 + p))))
        .collect();
    c.push((4000 + e, None));
    c
}

/// Epochs of all sizes, a checkpoint and more epochs through each engine, replayed from disk
/// byte for byte.
#[test]
fn epochs_round_trip_through_every_engine() {
    let cases = [
        (uring(true), SyncMode::Data),
        (uring(false), SyncMode::Data),
        (uring(true), SyncMode::None),
        (
            LogDirOptions {
                uring: false,
                direct: true,
            },
            SyncMode::Data,
        ),
    ];
    for (i, (dir_options, sync)) in cases.into_iter().enumerate() {
        let dir = TestDir::new(&format!("uring-round-trip-{i}"));
        let logs = dir.0.join("heap");
        let log_dir = LogDir::open_with(&logs, dir_options).expect("opening");
        match (dir_options.uring, log_dir.engine()) {
            (true, LogEngine::Uring { direct, .. }) => assert_eq!(direct, dir_options.direct),
            (false, LogEngine::Sync) => {}
            (_, engine) => panic!("{dir_options:?} gave {engine:?}"),
        }
        let mut w =
            LogWriter::with_storage(Box::new(log_dir), REGION, options(sync)).expect("creating");
        let mut model = Model::new(REGION, 42);
        // 1, 300 and 2000 pages: inside one staging buffer, across two, across all of them
        // several times (2000 pages are about 8 MiB).
        for (e, pages) in [(1u64, 1u64), (2, 300), (3, 2000), (4, 7)] {
            let c = changes(e, e * 3, pages);
            assert_eq!(w.append_epoch(&epoch_pages(&c)).expect("appending"), e);
            model.apply(&c);
        }
        let full = model.checkpoint_changes();
        assert_eq!(w.checkpoint(&epoch_pages(&full)).expect("checkpoint"), 5);
        let c = changes(6, 100, 50);
        assert_eq!(w.append_epoch(&epoch_pages(&c)).expect("appending"), 6);
        model.apply(&c);
        drop(w);
        let (report, image) = replay_mem(&segments_on_disk(&logs), None).expect("replays");
        assert_eq!((report.epoch, report.base_epoch), (6, 5), "{dir_options:?}");
        assert!(image == model.image(6), "{dir_options:?} {sync:?}");
    }
}

/// Appends that do not follow each other, unaligned pieces without O_DIRECT, and O_DIRECT's
/// refusal of unaligned ones.
#[test]
fn scattered_and_unaligned_appends() {
    let dir = TestDir::new("uring-scattered");
    let logs = dir.0.join("heap");
    let mut d = LogDir::open_with(&logs, uring(false)).expect("opening");
    d.create_segment(1).expect("creating");
    let a = page(1);
    let b = page(2);
    d.append(3 * PAGE_BYTES, &[&a[..100], &a[100..]])
        .expect("appending");
    d.append(0, &[&b[..7]]).expect("appending");
    d.append(7, &[&b[7..]]).expect("appending");
    d.sync_segment().expect("syncing");
    let bytes = std::fs::read(logs.join("seg-000001.lego")).expect("reading");
    assert_eq!(bytes.len(), 4 * PAGE_SIZE);
    assert!(bytes[..PAGE_SIZE] == b[..]);
    assert!(bytes[PAGE_SIZE..3 * PAGE_SIZE].iter().all(|&x| x == 0));
    assert!(bytes[3 * PAGE_SIZE..] == a[..]);
    drop(d);

    let logs = dir.0.join("direct");
    let mut d = LogDir::open_with(&logs, uring(true)).expect("opening");
    d.create_segment(1).expect("creating");
    let err = d
        .append(0, &[&a[..100]])
        .expect_err("unaligned under O_DIRECT");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert!(err.to_string().contains("seg-000001.lego"), "{err}");
}

/// The writer's I/O numbering on one segment with `SyncMode::Data`: the header is write and
/// fsync 0, epoch `e` writes its body as write `2e - 1` (synced by fsync `2e - 1`) and its
/// commit as write `2e` (fsync `2e`), as long as each body fits one staging buffer.
fn body(e: usize) -> usize {
    2 * e - 1
}
fn commit(e: usize) -> usize {
    2 * e
}

/// How an injected failure in epoch 3 ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The epoch is written and reported durable anyway (the failure was recovered).
    Durable,
    /// The epoch is reported failed; the text is in the error and replay gives `replayed`.
    Failed {
        errno_text: &'static str,
        replayed: u64,
    },
}

#[test]
fn injected_failures_are_reported_and_never_replay_torn() {
    use Outcome::*;
    let enospc = "No space left on device";
    let eio = "Input/output error";
    let ebadf = "Bad file descriptor";
    let cases: Vec<(&str, FaultAt, Fault, u64, Outcome)> = vec![
        // A short write of the body is finished and the fdatasync repeated after it.
        (
            "short body",
            FaultAt::Write(body(3)),
            Fault::Short,
            3,
            Durable,
        ),
        // The same for a body that spans staging buffers (its first buffer comes back short,
        // the buffer after it is already in flight).
        (
            "short large body",
            FaultAt::Write(body(3)),
            Fault::Short,
            600,
            Durable,
        ),
        (
            "short commit",
            FaultAt::Write(commit(3)),
            Fault::Short,
            3,
            Durable,
        ),
        (
            "ENOSPC body",
            FaultAt::Write(body(3)),
            Fault::Errno(libc::ENOSPC),
            3,
            Failed {
                errno_text: enospc,
                replayed: 2,
            },
        ),
        (
            "ENOSPC large body",
            FaultAt::Write(body(3)),
            Fault::Errno(libc::ENOSPC),
            600,
            Failed {
                errno_text: enospc,
                replayed: 2,
            },
        ),
        (
            "ENOSPC commit",
            FaultAt::Write(commit(3)),
            Fault::Errno(libc::ENOSPC),
            3,
            Failed {
                errno_text: enospc,
                replayed: 2,
            },
        ),
        (
            "EIO fdatasync before the commit",
            FaultAt::Fsync(body(3)),
            Fault::Errno(libc::EIO),
            3,
            Failed {
                errno_text: eio,
                replayed: 2,
            },
        ),
        // The commit reached the file, only its fdatasync failed: the epoch is reported
        // failed (it may not survive a crash of the machine) yet is whole in the page cache.
        (
            "EIO fdatasync after the commit",
            FaultAt::Fsync(commit(3)),
            Fault::Errno(libc::EIO),
            3,
            Failed {
                errno_text: eio,
                replayed: 3,
            },
        ),
        // The kernel fails the write (EBADF) and cancels the fdatasync linked to it.
        (
            "cancelled chain: body",
            FaultAt::Write(body(3)),
            Fault::BadFd,
            3,
            Failed {
                errno_text: ebadf,
                replayed: 2,
            },
        ),
        (
            "cancelled chain: commit",
            FaultAt::Write(commit(3)),
            Fault::BadFd,
            3,
            Failed {
                errno_text: ebadf,
                replayed: 2,
            },
        ),
    ];
    for (i, (name, at, fault, pages, outcome)) in cases.into_iter().enumerate() {
        for direct in [false, true] {
            if direct && fault == Fault::Short && name == "short commit" {
                continue; // half a block cannot be written with O_DIRECT
            }
            let dir = TestDir::new(&format!("uring-fault-{i}-{direct}"));
            let logs = dir.0.join("heap");
            let mut log_dir = LogDir::open_with(&logs, uring(direct)).expect("opening");
            log_dir.inject(at, fault);
            let mut w = LogWriter::with_storage(Box::new(log_dir), REGION, options(SyncMode::Data))
                .expect("creating");
            let mut model = Model::new(REGION, 42);
            let mut images = vec![model.image(0)];
            for e in 1..=2u64 {
                let c = changes(e, e, 2);
                w.append_epoch(&epoch_pages(&c)).expect("appending");
                model.apply(&c);
                images.push(model.image(e));
            }
            let third = changes(3, 10, pages);
            let mut with_third = model.clone();
            with_third.apply(&third);
            let result = w.append_epoch(&epoch_pages(&third));
            let segs = segments_on_disk(&logs);
            let (report, image) = replay_mem(&segs, None).expect("what is on disk replays");
            match outcome {
                Durable => {
                    assert_eq!(result.expect(name), 3);
                    assert_eq!(report.epoch, 3, "{name}");
                    assert!(image == with_third.image(3), "{name}");
                    continue;
                }
                Failed {
                    errno_text,
                    replayed,
                } => {
                    let err = match result {
                        Err(e) => e,
                        Ok(e) => panic!("{name}: epoch {e} was reported durable"),
                    };
                    assert!(matches!(err, LogError::Io { .. }), "{name}: {err:?}");
                    let text = chain(&err);
                    assert!(text.contains("seg-000001.lego"), "{name}: {text}");
                    assert!(text.contains(errno_text), "{name}: {text}");
                    assert_eq!(report.epoch, replayed, "{name}: {text}");
                    let expected = if replayed == 3 {
                        with_third.image(3)
                    } else {
                        images[2].clone()
                    };
                    assert!(image == expected, "{name}: a torn epoch was replayed");
                }
            }
            // Only a checkpoint continues the log, in a new segment.
            assert!(
                matches!(
                    w.append_epoch(&epoch_pages(&changes(4, 1, 1))),
                    Err(LogError::NeedsCheckpoint { epoch: 3 })
                ),
                "{name}"
            );
            let full = with_third.checkpoint_changes();
            assert_eq!(w.checkpoint(&epoch_pages(&full)).expect(name), 4);
            let next = changes(5, 30, 2);
            assert_eq!(w.append_epoch(&epoch_pages(&next)).expect(name), 5);
            with_third.apply(&next);
            drop(w);
            let segs = segments_on_disk(&logs);
            assert_eq!(
                segs.len(),
                2,
                "{name}: the older segment stays as the previous generation"
            );
            let (report, image) = replay_mem(&segs, None).expect("replays");
            assert_eq!((report.epoch, report.base_epoch), (5, 4), "{name}");
            assert!(image == with_third.image(5), "{name}");
        }
    }
}

/// Without syncs, a failed write is reported by `flush`, or by the next call that needs the
/// ring: an append that needs its buffer, `create_segment`, `remove_segment`.
#[test]
fn without_syncs_failures_surface_at_flush_or_the_next_segment() {
    let buffer_pages = STAGING_BUFFER_BYTES / PAGE_SIZE;
    let p = page(7);
    let pages = |n: usize| vec![&p[..]; n];
    let dir = TestDir::new("uring-nosync");

    // flush
    let logs = dir.0.join("flush");
    let mut d = LogDir::open_with(&logs, uring(true)).expect("opening");
    d.inject(FaultAt::Write(0), Fault::Errno(libc::ENOSPC));
    d.create_segment(1).expect("creating");
    d.append(0, &pages(3)).expect("the append only queues");
    let err = d.flush().expect_err("flush reports the write");
    let text = chain(&err);
    assert!(
        text.contains("seg-000001.lego")
            && text.contains("offset 0")
            && text.contains("No space left on device"),
        "{text}"
    );
    // The segment stays failed.
    assert!(d.append(3 * PAGE_BYTES, &pages(1)).is_err());
    assert!(d.flush().is_err());
    // A new segment is fine.
    d.create_segment(2).expect("a new segment");
    d.append(0, &pages(1)).expect("appending");
    d.flush().expect("flushing");
    drop(d);

    // an append that needs the failed write's buffer
    let logs = dir.0.join("append");
    let mut d = LogDir::open_with(&logs, uring(true)).expect("opening");
    d.inject(FaultAt::Write(0), Fault::Errno(libc::EIO));
    d.create_segment(1).expect("creating");
    let mut at = 0u64;
    let mut failed = false;
    for _ in 0..=STAGING_BUFFERS {
        match d.append(at, &pages(buffer_pages)) {
            Ok(()) => at += STAGING_BUFFER_BYTES as u64,
            Err(e) => {
                assert!(chain(&e).contains("Input/output error"), "{e}");
                failed = true;
                break;
            }
        }
    }
    assert!(
        failed,
        "the failed write was reported when its buffer was needed again"
    );
    drop(d);

    // create_segment and remove_segment
    for remove in [false, true] {
        let logs = dir.0.join(format!("next-{remove}"));
        let mut d = LogDir::open_with(&logs, uring(true)).expect("opening");
        d.inject(FaultAt::Write(0), Fault::Errno(libc::ENOSPC));
        d.create_segment(1).expect("creating");
        d.append(0, &pages(2)).expect("the append only queues");
        let err = if remove {
            d.remove_segment(1).expect_err("removing reports the write")
        } else {
            d.create_segment(2)
                .expect_err("the next segment reports the write")
        };
        assert!(chain(&err).contains("seg-000001.lego"), "{err}");
        // Reported once: the next segment starts.
        d.create_segment(3).expect("creating");
    }
}

/// With `SyncMode::None` the writer never syncs; dropping the log directory writes what is
/// queued, so a clean exit loses nothing.
#[test]
fn without_syncs_drop_writes_everything() {
    let dir = TestDir::new("uring-nosync-drop");
    let logs = dir.0.join("heap");
    let d = LogDir::open_with(&logs, uring(true)).expect("opening");
    let mut w =
        LogWriter::with_storage(Box::new(d), REGION, options(SyncMode::None)).expect("creating");
    let mut model = Model::new(REGION, 42);
    for e in 1..=5u64 {
        let c = changes(e, e * 7, 40 * e);
        w.append_epoch(&epoch_pages(&c)).expect("appending");
        model.apply(&c);
    }
    drop(w);
    let (report, image) = replay_mem(&segments_on_disk(&logs), None).expect("replays");
    assert_eq!(report.epoch, 5);
    assert!(image == model.image(5));
}
