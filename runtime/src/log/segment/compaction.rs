//! Compaction: [`LogWriter::compact_within`] replays the log into a temporary image and writes
//! it as a checkpoint in a new generation, keeping the newest program checkpoint (and copying
//! the epochs after it) when they fit the limit.
//!
//! Rules: compaction never writes a checkpoint of less than was reported durable (a log that
//! replays to an older epoch is left alone, with an error); every page it copies is checked
//! against its CRC again; the temporary image is never named like a segment and is removed
//! afterwards.

use std::fs::OpenOptions;
use std::io::ErrorKind;
use std::os::unix::fs::OpenOptionsExt;

use super::writer::list_segments;
use super::{LogError, LogWriter, COMPACT_LATER_DIVISOR, COPY_CHUNK_PAGES};
use crate::log::format::{EntryKind, EpochOrigin, EpochPage, PageEntry};
use crate::log::image::ImageReader;
use crate::log::replay::{
    plan, plan_collecting, read_exact_at, write_image, LaterEpoch, LaterEpochs, Plan, ReplayError,
    Segment, SegmentSource,
};
use crate::PAGE_SIZE;

impl LogWriter {
    /// Bounds the log: [`LogWriter::compact_within`] with the log limit given last (or
    /// [`LOG_MAX_BYTES_DEFAULT`]).
    pub fn compact(&mut self) -> Result<u64, LogError> {
        self.compact_within(self.log_max_bytes)
    }

    /// Bounds the log, whose limit is `log_max_bytes` (`LEGO_LOG_MAX`, compared with
    /// [`LogWriter::log_bytes`]): replays its committed epochs into a temporary image in the
    /// log directory ([`COMPACT_IMAGE_NAME`], mode 0600, never named like a segment, removed
    /// afterwards) and writes that as a checkpoint in a new generation. Returns the epoch of
    /// the new generation's last epoch (what the default replay gives).
    ///
    /// Program checkpoints survive it: when automatic epochs follow the newest program
    /// checkpoint P (and no automatic checkpoint came between), the checkpoint is of P, marked
    /// as a program checkpoint, and the epochs after P are copied after it (their records
    /// re-written under new numbers), so the default replay still gives the newest epoch and
    /// `--checkpoint` gives P. When those epochs hold more than `log_max_bytes` /
    /// [`COMPACT_LATER_DIVISOR`] bytes the new generation would outgrow the limit at once:
    /// the checkpoint is then of the newest epoch, with a warning, and P stays recoverable only
    /// while the previous generation is kept. A checkpoint of an epoch that was a program
    /// checkpoint keeps the mark.
    ///
    /// The previous generation stays (the fallback should the new checkpoint be damaged); the
    /// one before it is removed once an epoch after the new checkpoint is durable.
    ///
    /// Works on a broken writer (that is how it recovers after a failed write): the last
    /// epoch replay finds committed becomes the checkpoint's content, which is the last one
    /// reported durable or the failed one if its commit made it. A log that replays to an
    /// epoch older than the last one reported durable is damaged (the newest checkpoint, say,
    /// so that replay fell back to the previous generation): it is left as it is and the
    /// error says so. The image need not be durable: until the checkpoint is, the old
    /// segments are all there.
    ///
    /// Memory: replay's first pass keeps the place of every page of the heap (tens of bytes
    /// per page; twice when P is kept) and of every page record after P; the pages themselves
    /// go through bounded buffers.
    pub fn compact_within(&mut self, log_max_bytes: u64) -> Result<u64, LogError> {
        self.log_max_bytes = log_max_bytes;
        let dir = self.storage.location();
        let mut segments = Vec::new();
        for seq in list_segments(self.storage.as_ref())? {
            let path = self.storage.segment_path(seq);
            let source = self
                .storage
                .open_segment(seq)
                .map_err(|source| LogError::Io {
                    path: path.clone(),
                    what: "opening (to compact the log)",
                    source,
                })?;
            segments.push(Segment { seq, path, source });
        }
        let later_bytes_max = log_max_bytes / COMPACT_LATER_DIVISOR;
        let replay_err = |e| LogError::Replay {
            dir: dir.clone(),
            source: Box::new(e),
        };
        let (mut newest, later) = match plan_collecting(&dir, &segments, later_bytes_max) {
            Ok(found) => found,
            // Nothing was ever committed: the heap the log vouches for is empty.
            Err(ReplayError::NoSegments { .. } | ReplayError::NothingCommitted { .. })
                if self.last_committed == 0 =>
            {
                drop(segments);
                return self.checkpoint(&[]);
            }
            Err(e) => return Err(replay_err(e)),
        };
        let replayed = newest.report.epoch;
        if replayed < self.last_committed {
            return Err(LogError::CompactionBehind {
                dir,
                replayed,
                committed: self.last_committed,
            });
        }
        // The checkpoint must be numbered after everything replay saw.
        self.next_epoch = self.next_epoch.max(replayed + 1);
        let program = newest.report.newest_program.filter(|&p| p < replayed);
        let keep = match program {
            Some(p) if later.active && later.over => {
                log::warn!(
                    "compacting the log in {}: the epochs after the program checkpoint of epoch \
                     {p} hold more than {later_bytes_max} bytes (half the log limit of \
                     {log_max_bytes}), so the checkpoint is of epoch {replayed}; `lego replay \
                     --checkpoint` finds epoch {p} only until the previous generation is removed",
                    dir.display()
                );
                None
            }
            Some(p) if later.active => Some(p),
            _ => None,
        };
        let result = match keep {
            None => {
                let origin = newest.report.origin;
                self.checkpoint_from_plan(&mut newest, &segments, origin)
            }
            Some(p) => self.compact_keeping(p, &segments, &later, &mut newest),
        };
        let epoch = result?;
        log::debug!(
            "compacted the log in {} to a new generation ending at epoch {epoch} (replayed \
             epoch {replayed}{}); its generation holds {} bytes, the log {}",
            dir.display(),
            match keep {
                Some(p) => format!(", kept the program checkpoint of epoch {p}"),
                None => String::new(),
            },
            self.log_bytes(),
            self.total_bytes()
        );
        Ok(epoch)
    }

    /// Compaction that keeps the program checkpoint `p`: a checkpoint of `p`, then `later`
    /// (the epochs after it) copied behind it. Should that fail part way, the checkpoint of
    /// `newest` (the newest epoch) is written instead.
    fn compact_keeping<S: SegmentSource>(
        &mut self,
        p: u64,
        segments: &[Segment<S>],
        later: &LaterEpochs,
        newest: &mut Plan,
    ) -> Result<u64, LogError> {
        let dir = self.storage.location();
        let kept = plan(&dir, segments, Some(p), &mut |_| {})
            .map_err(|e| LogError::Replay {
                dir: dir.clone(),
                source: Box::new(e),
            })
            .and_then(|mut at_p| {
                self.checkpoint_from_plan(&mut at_p, segments, EpochOrigin::Program)
            })
            .and_then(|mut last| {
                for e in &later.epochs {
                    last = self.copy_epoch(segments, e)?;
                }
                Ok(last)
            });
        match kept {
            Ok(last) => Ok(last),
            Err(e) => {
                // The checkpoint of P may be durable with only some of the epochs after it:
                // replay would give less than was committed. The checkpoint of the newest
                // epoch puts that right.
                log::error!(
                    "compacting the log in {} around the program checkpoint of epoch {p} failed \
                     ({e}); compacting to epoch {} instead",
                    dir.display(),
                    newest.report.epoch
                );
                let origin = newest.report.origin;
                self.checkpoint_from_plan(newest, segments, origin)
            }
        }
    }

    /// Writes the image `plan` describes to the temporary image and checkpoints from it.
    fn checkpoint_from_plan<S: SegmentSource>(
        &mut self,
        plan: &mut Plan,
        segments: &[Segment<S>],
        origin: EpochOrigin,
    ) -> Result<u64, LogError> {
        let dir = self.storage.location();
        let scratch = self.storage.scratch_image_path();
        let scratch_err = |what, source| LogError::Scratch {
            path: scratch.clone(),
            what,
            source,
        };
        // We hold the directory's lock: a file left there by a compaction that crashed is
        // nobody else's.
        match std::fs::remove_file(&scratch) {
            Ok(()) => log::debug!("removed a stale {}", scratch.display()),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(scratch_err("removing the stale", e)),
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&scratch)
            .map_err(|e| scratch_err("creating (mode 0600)", e))?;
        let result = write_image(plan, segments, &mut file, &scratch, &mut |_| {})
            .map_err(|e| LogError::Replay {
                dir: dir.clone(),
                source: Box::new(e),
            })
            .and_then(|()| {
                drop(file);
                let mut reader = ImageReader::open(&scratch)?;
                self.checkpoint_from_reader(&mut reader, origin)
            });
        if let Err(e) = std::fs::remove_file(&scratch) {
            log::warn!(
                "removing the temporary image {} after compacting failed: {e}",
                scratch.display()
            );
        }
        result
    }

    /// Re-writes one committed epoch of the old generation (read from `segments`, every page
    /// checked against its CRC again) as the next epoch of this one.
    fn copy_epoch<S: SegmentSource>(
        &mut self,
        segments: &[Segment<S>],
        e: &LaterEpoch,
    ) -> Result<u64, LogError> {
        let dir = self.storage.location();
        let mut buf = vec![0u8; COPY_CHUNK_PAGES * PAGE_SIZE];
        let mut append = self.begin_epoch_as(e.origin)?;
        for chunk in e.pages.chunks(COPY_CHUNK_PAGES) {
            for (k, (page, loc)) in chunk.iter().enumerate() {
                let Some(loc) = loc else { continue };
                let seg = &segments[loc.seg];
                let bytes = &mut buf[k * PAGE_SIZE..(k + 1) * PAGE_SIZE];
                let checked = read_exact_at(seg, loc.offset, bytes).and_then(|()| {
                    PageEntry {
                        kind: EntryKind::Page,
                        epoch: loc.epoch,
                        page: *page,
                        crc: loc.crc,
                    }
                    .check_payload(bytes)
                    .map_err(|source| ReplayError::LogChanged {
                        path: seg.path.clone(),
                        offset: loc.offset,
                        source,
                    })
                });
                checked.map_err(|e| LogError::Replay {
                    dir: dir.clone(),
                    source: Box::new(e),
                })?;
            }
            let pages: Vec<EpochPage<'_>> = chunk
                .iter()
                .enumerate()
                .map(|(k, (page, loc))| EpochPage {
                    page: *page,
                    data: loc.map(|_| &buf[k * PAGE_SIZE..(k + 1) * PAGE_SIZE]),
                })
                .collect();
            append.add(&pages)?;
        }
        append.commit()
    }
}
