//! The durable heap's log: epochs of changed pages appended to segment files, and the replay
//! that turns them back into a heap image.
//!
//! - [`format`]: the on-disk layout of segments, records and images (pure, no I/O); its field
//!   codec and shared checks in `format/fields.rs`.
//! - [`segment`]: writing the log. `segment/mod.rs` holds the limits, the options,
//!   [`LogError`] and the [`segment::LogStorage`] seam; `dir.rs` the log directory and its
//!   lock; `writer.rs` the [`LogWriter`] (segments, syncs, checkpoints, generations);
//!   `append.rs` one streamed epoch ([`EpochAppend`]); `resume.rs` continuing a log from an
//!   image; `compaction.rs` bounding it; `memory.rs` the storage in memory the tests use.
//!   Its io_uring engine (staging buffers, writes in flight, linked fdatasync) is
//!   [`crate::io::staged`], with `pwritev` as the fallback.
//! - [`replay`]: reading the log back. `replay/mod.rs` holds the limits, the options,
//!   [`ReplayError`] and the entry points for a directory ([`replay_dir`]); `source.rs` read
//!   access to a segment ([`replay::SegmentSource`], `O_DIRECT` files); `reader.rs` the
//!   buffered reader and its read-ahead thread; `scan.rs` the checks of one segment's
//!   records; `plan.rs` the first pass over the whole log; `write.rs` the second pass, which
//!   writes the image; `report.rs` what was recovered and left out; `inspect.rs` `lego
//!   inspect`.
//! - [`image`]: reading a heap image back: in bounded chunks (checkpoints from an image), or
//!   page by page on demand (`LEGO_RESTORE`).
//! - [`pool_image`]: a *pool image*, what `lego replay --to memcached://...` leaves locally
//!   once the heap's pages are in a pool: the header, the heap id, the servers and per page its
//!   checksum, version and holders (`LEGO_RESTORE` of a heap from a pool).
//! - Tests only: `fuzz` (the log's fuzz properties) and `test_support` (a model of the heap
//!   the log describes, page contents, replay in memory); what the whole crate's tests share
//!   is in `crate::test_support`.
//!
//! Rules: the log is the only durable copy of the heap, so nothing here ever applies a record
//! whose checksum does not match or an epoch whose commit record is missing; everything is
//! written and read through [`segment::LogStorage`] and [`replay::SegmentSource`] so tests can
//! run it in memory and inject failures. This module knows nothing of the pager: it takes
//! pages and gives pages. The design and its reasons are in `docs/DESIGN.md`, "The log".

pub mod format;
pub mod image;
pub mod pool_image;
pub mod replay;
pub mod segment;

#[cfg(test)]
mod fuzz;

pub use format::{EpochOrigin, EpochPage, FormatError, RegionInfo};
pub use image::{ImageError, ImageReader};
pub use replay::{
    inspect_dir, replay_dir, replay_dir_with, Inspection, Progress, ReplayError, ReplayOptions,
    ReplayReport, Target,
};
pub use segment::{
    CheckpointSource, EpochAppend, IndexError, Located, LogDir, LogDirOptions, LogEngine, LogError,
    LogWriter, PageIndex, SyncMode, WriterOptions,
};

#[cfg(test)]
pub(crate) mod test_support {
    //! A model of the heap the log describes, page contents, and replay in memory.

    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};

    use super::format::{EpochPage, ImageHeader, RegionInfo, BLOCK_BYTES_U64};
    use super::replay::{plan, plan_into, write_image, ReplayError, ReplayReport, Segment};
    use super::segment::MemoryStorage;
    use crate::test_support::Rng;
    use crate::PAGE_SIZE;

    /// A page whose bytes follow from `seed` (never all zeros).
    pub fn page(seed: u64) -> Vec<u8> {
        let mut p = vec![0u8; PAGE_SIZE];
        let mut rng = Rng::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        for chunk in p.chunks_mut(8) {
            chunk.copy_from_slice(&rng.next().to_le_bytes());
        }
        p
    }

    /// One change of an epoch: the page's new content, or `None` for a `ZERO` record.
    pub type Change = (u64, Option<Vec<u8>>);

    /// Changes from `page -> seed`, as the property tests draw them: seed 0 is a `ZERO` record,
    /// 1 a page of zeros written as data, any other the page [`page`] makes from it.
    pub fn seeded_changes(seeds: &BTreeMap<u64, u64>) -> Vec<Change> {
        seeds
            .iter()
            .map(|(&p, &seed)| match seed {
                0 => (p, None),
                1 => (p, Some(vec![0; PAGE_SIZE])),
                s => (p, Some(page(s))),
            })
            .collect()
    }

    /// Writer options for a log in memory: segments of `target` bytes, no syncs, `log_id`.
    pub fn memory_options(target: u64, log_id: u64) -> super::segment::WriterOptions {
        super::segment::WriterOptions {
            segment_bytes_target: target,
            sync: super::segment::SyncMode::None,
            log_id: Some(log_id),
        }
    }

    /// Borrows changes as the writer takes them.
    pub fn epoch_pages(changes: &[Change]) -> Vec<EpochPage<'_>> {
        changes
            .iter()
            .map(|(page, data)| EpochPage {
                page: *page,
                data: data.as_deref(),
            })
            .collect()
    }

    /// What the heap holds after each epoch, kept the simple way.
    #[derive(Clone)]
    pub struct Model {
        pub region: RegionInfo,
        pub log_id: u64,
        pub pages: BTreeMap<u64, Vec<u8>>,
    }

    impl Model {
        pub fn new(region: RegionInfo, log_id: u64) -> Model {
            Model {
                region,
                log_id,
                pages: BTreeMap::new(),
            }
        }

        pub fn apply(&mut self, changes: &[Change]) {
            for (page, data) in changes {
                match data {
                    Some(d) => self.pages.insert(*page, d.clone()),
                    None => self.pages.remove(page),
                };
            }
        }

        /// Every non-zero page, as a checkpoint logs them.
        pub fn checkpoint_changes(&self) -> Vec<Change> {
            self.pages
                .iter()
                .filter(|(_, d)| d.iter().any(|&b| b != 0))
                .map(|(&p, d)| (p, Some(d.clone())))
                .collect()
        }

        /// The image file replay must write for this state at `epoch`, byte for byte.
        pub fn image(&self, epoch: u64) -> Vec<u8> {
            let nonzero: Vec<(&u64, &Vec<u8>)> = self
                .pages
                .iter()
                .filter(|(_, d)| d.iter().any(|&b| b != 0))
                .collect();
            let len = nonzero
                .last()
                .map_or(BLOCK_BYTES_U64, |(&p, _)| ImageHeader::page_offset(p + 1));
            let mut img = vec![0u8; usize::try_from(len).expect("small test images")];
            let header = ImageHeader {
                region: self.region,
                epoch,
                log_id: self.log_id,
                pages: nonzero.len() as u64,
                origin: super::format::EpochOrigin::Automatic,
            };
            img[..PAGE_SIZE].copy_from_slice(&header.encode().0);
            for (&p, d) in nonzero {
                let at = usize::try_from(ImageHeader::page_offset(p)).expect("small");
                img[at..at + PAGE_SIZE].copy_from_slice(d);
            }
            img
        }
    }

    /// The segments of a memory log, as replay reads them.
    pub fn segments_of(storage: &MemoryStorage) -> Vec<Segment<Vec<u8>>> {
        storage
            .snapshot()
            .into_iter()
            .map(|(seq, bytes)| Segment {
                seq,
                path: PathBuf::from(super::format::segment_file_name(seq)),
                source: bytes,
            })
            .collect()
    }

    /// Both passes of replay in memory: the report and the image bytes. Replays twice, with
    /// and without the first pass writing early ([`plan_into`]), and checks that both give
    /// the same image and report.
    pub fn replay_mem(
        segments: &[Segment<Vec<u8>>],
        target: Option<u64>,
    ) -> Result<(ReplayReport, Vec<u8>), ReplayError> {
        let dir = Path::new("memory:");
        let name = Path::new("memory:image");
        let two_pass = (|| {
            let mut plan = plan(dir, segments, target, &mut |_| {})?;
            let mut image = Vec::new();
            write_image(&mut plan, segments, &mut image, name, &mut |_| {})?;
            assert_eq!(plan.report.image_bytes, image.len() as u64);
            Ok::<_, ReplayError>((plan.report, image))
        })();
        let early = (|| {
            let mut image = Vec::new();
            let mut plan = plan_into(dir, segments, target, &mut image, name, &mut |_| {})?;
            write_image(&mut plan, segments, &mut image, name, &mut |_| {})?;
            assert_eq!(plan.report.image_bytes, image.len() as u64);
            Ok::<_, ReplayError>((plan.report, image))
        })();
        match (&two_pass, &early) {
            (Ok((r1, i1)), Ok((r2, i2))) => {
                assert!(i1 == i2, "early writes give another image");
                assert_eq!(
                    (r1.epoch, r1.pages, r1.image_bytes, r1.dropped.len()),
                    (r2.epoch, r2.pages, r2.image_bytes, r2.dropped.len())
                );
            }
            (Err(e1), Err(e2)) => assert_eq!(e1.to_string(), e2.to_string()),
            _ => panic!(
                "early writes change the outcome: {:?} vs {:?}",
                two_pass
                    .as_ref()
                    .map(|r| r.0.epoch)
                    .map_err(ToString::to_string),
                early
                    .as_ref()
                    .map(|r| r.0.epoch)
                    .map_err(ToString::to_string)
            ),
        }
        two_pass
    }
}
