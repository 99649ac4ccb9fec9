//! Continuing a log after a restore: [`LogWriter::resume`] checks the image against the log
//! (region, log id), and writes it as a checkpoint numbered after every epoch and every
//! segment in the directory.
//!
//! Rules: the image is checked before the directory is locked; a crash before the checkpoint
//! is durable leaves the log as it was; a resume from an older epoch removes the branch after
//! it, so that it can never come back as a fallback.

use std::collections::BTreeMap;
use std::path::Path;

use super::writer::{check_settings, list_segments};
use super::{LogDir, LogError, LogStorage, LogWriter, WriterOptions, LOG_MAX_BYTES_DEFAULT};
use crate::log::format::{EpochPage, ImageHeader, RegionInfo};
use crate::log::image::ImageReader;
use crate::log::replay::{inspect_segment, Segment, SegmentSource};

/// What a resumed log's first checkpoint is read from: a heap image ([`ImageReader`]), or a
/// heap restored from a pool (the pager reads its pages back from the pool, checked). The
/// header says which epoch of which log the pages are (its `pages` is not checked here: a
/// source checks its own count).
pub trait CheckpointSource {
    fn header(&self) -> ImageHeader;
    /// Names the source in messages.
    fn path(&self) -> &Path;
    /// The non-zero pages of the next chunk, ascending; `None` once every page was given.
    fn next_chunk(&mut self) -> Result<Option<Vec<EpochPage<'_>>>, LogError>;
}

impl CheckpointSource for ImageReader {
    fn header(&self) -> ImageHeader {
        *ImageReader::header(self)
    }

    fn path(&self) -> &Path {
        ImageReader::path(self)
    }

    fn next_chunk(&mut self) -> Result<Option<Vec<EpochPage<'_>>>, LogError> {
        Ok(ImageReader::next_chunk(self)?)
    }
}

impl LogWriter {
    /// Continues the log in `dir` after a restore from `image` (made by `lego replay` of this
    /// directory, possibly with `--epoch N`): takes the directory's lock, checks that the
    /// image's log id and region are the log's, and writes the image as a checkpoint numbered
    /// after every epoch found in the directory (and after the image's), in a new segment
    /// numbered after every segment there; once it is durable the older segments are removed.
    /// So the history after the image's epoch is cut off, and a crash before the checkpoint is
    /// durable leaves the log as it was.
    ///
    /// A directory without segments starts a new log whose first epoch is that checkpoint,
    /// under the image's log id (the same log, continued elsewhere) and numbered after the
    /// image's epoch. The log keeps its id: `options.log_id` is not used here.
    pub fn resume(
        dir: &Path,
        region: RegionInfo,
        options: WriterOptions,
        image: &Path,
    ) -> Result<LogWriter, LogError> {
        Self::resume_indexed(dir, region, options, image, None)
    }

    /// [`LogWriter::resume`] with a page index that records the image's checkpoint and every
    /// page appended after it (see [`LogWriter::set_index`]).
    pub fn resume_indexed(
        dir: &Path,
        region: RegionInfo,
        options: WriterOptions,
        image: &Path,
        index: Option<std::sync::Arc<super::index::PageIndex>>,
    ) -> Result<LogWriter, LogError> {
        // The image is checked before the directory is locked (or created).
        let mut reader = ImageReader::open(image)?;
        Self::resume_reader(
            Box::new(LogDir::open(dir)?),
            region,
            options,
            &mut reader,
            index,
        )
    }

    /// [`LogWriter::resume_indexed`] from any [`CheckpointSource`] (a heap restored from a
    /// pool), checked against the log as an image is.
    pub fn resume_from(
        dir: &Path,
        region: RegionInfo,
        options: WriterOptions,
        source: &mut dyn CheckpointSource,
        index: Option<std::sync::Arc<super::index::PageIndex>>,
    ) -> Result<LogWriter, LogError> {
        Self::resume_reader(Box::new(LogDir::open(dir)?), region, options, source, index)
    }

    /// [`LogWriter::resume`] on any storage.
    pub fn resume_with_storage(
        storage: Box<dyn LogStorage>,
        region: RegionInfo,
        options: WriterOptions,
        image: &Path,
    ) -> Result<LogWriter, LogError> {
        let mut reader = ImageReader::open(image)?;
        Self::resume_reader(storage, region, options, &mut reader, None)
    }

    fn resume_reader(
        storage: Box<dyn LogStorage>,
        region: RegionInfo,
        options: WriterOptions,
        image: &mut dyn CheckpointSource,
        index: Option<std::sync::Arc<super::index::PageIndex>>,
    ) -> Result<LogWriter, LogError> {
        check_settings(region, &options)?;
        let ih = image.header();
        if ih.region != region {
            return Err(LogError::ImageRegion {
                image: image.path().to_path_buf(),
                found: ih.region,
                expected: region,
            });
        }
        let dir = storage.location();
        let Survey {
            log_id,
            max_epoch,
            max_seq,
            segment_bytes,
            generation,
        } = survey(storage.as_ref(), region)?;
        let log_id = match log_id {
            Some(id) if id != ih.log_id => {
                return Err(LogError::LogIdMismatch {
                    dir,
                    image: image.path().to_path_buf(),
                    image_id: ih.log_id,
                    log_id: id,
                })
            }
            Some(id) => id,
            None => ih.log_id,
        };
        let mut w = LogWriter {
            storage,
            region,
            log_id,
            options,
            seq: max_seq,
            offset: 0,
            next_epoch: max_epoch.max(ih.epoch) + 1,
            last_committed: 0,
            broken: false,
            segment_bytes,
            generation,
            remove_below: None,
            log_max_bytes: LOG_MAX_BYTES_DEFAULT,
            group_buf: Vec::new(),
            index,
        };
        let epoch = w.checkpoint_from_reader(image, ih.origin)?;
        if ih.epoch < max_epoch {
            // Restored from an older epoch (`--epoch N`): the history after it is another
            // branch, which must not come back as a fallback. Only the new checkpoint stays.
            w.remove_older_now(epoch);
        }
        log::info!(
            "the log in {} continues from the image {} (epoch {}) with the checkpoint of \
             epoch {epoch}",
            dir.display(),
            image.path().display(),
            ih.epoch
        );
        Ok(w)
    }
}

/// What a resume finds in the log directory, every segment read to its end.
struct Survey {
    /// The log id of the segments there (`None`: no segment with a readable header).
    log_id: Option<u64>,
    /// The newest epoch any segment holds or starts at (0: none).
    max_epoch: u64,
    /// The highest segment number there, readable or not (0: none).
    max_seq: u64,
    segment_bytes: BTreeMap<u64, u64>,
    /// Where the newest generation there starts: its checkpoint segment, or the first.
    generation: u64,
}

/// Reads every segment of `storage` on its own: the new checkpoint must be numbered after
/// every epoch committed anywhere there, or replay could stop before it. Segments of another
/// region or of two different logs are refused.
fn survey(storage: &dyn LogStorage, region: RegionInfo) -> Result<Survey, LogError> {
    let mut log_id: Option<u64> = None;
    let mut max_epoch = 0u64;
    let mut max_seq = 0u64;
    let mut segment_bytes = BTreeMap::new();
    let mut generation = 0u64;
    for (i, seq) in list_segments(storage)?.into_iter().enumerate() {
        let path = storage.segment_path(seq);
        let source = storage.open_segment(seq).map_err(|source| LogError::Io {
            path: path.clone(),
            what: "opening (to resume the log)",
            source,
        })?;
        segment_bytes.insert(seq, source.size());
        max_seq = max_seq.max(seq);
        // Every segment is read to its end: the new checkpoint must be numbered after
        // every epoch committed anywhere in the directory, or replay could stop before it.
        let info = inspect_segment(i, &Segment { seq, path, source });
        // A segment whose header cannot be read holds nothing replay would apply; its
        // number is still taken.
        let Ok(h) = info.header else { continue };
        if h.region != region {
            return Err(LogError::SegmentRegion {
                path: info.path,
                found: h.region,
                expected: region,
            });
        }
        match log_id {
            None => log_id = Some(h.log_id),
            Some(first) if first != h.log_id => {
                return Err(LogError::MixedLogs {
                    dir: storage.location(),
                    path: info.path,
                    first,
                    second: h.log_id,
                })
            }
            Some(_) => {}
        }
        max_epoch = max_epoch
            .max(h.first_epoch)
            .max(info.last_epoch.unwrap_or(0));
        if h.starts_with_checkpoint() && info.checkpoints > 0 {
            generation = seq;
        }
    }
    Ok(Survey {
        log_id,
        max_epoch,
        max_seq,
        segment_bytes,
        generation,
    })
}
