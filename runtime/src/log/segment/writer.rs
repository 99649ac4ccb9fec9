//! [`LogWriter`]: appends epochs to segments one after the other, syncs them as
//! [`SyncMode`] says, starts a segment (and a generation) for every checkpoint, and removes the
//! generation before the previous one once an epoch after the new checkpoint is durable.
//!
//! Rules (the module documentation of [`super`] gives them in full): an epoch never spans two
//! segments; its commit record is written only after the pages it vouches for; after a failed
//! write or sync the writer accepts nothing but a checkpoint.

use std::collections::BTreeMap;
use std::path::Path;

use super::resume::CheckpointSource;
use super::{
    EpochAppend, LogDir, LogError, LogStorage, SyncMode, WriterOptions, LOG_MAX_BYTES_DEFAULT,
    SEGMENT_BYTES_TARGET_MIN,
};
use crate::log::format::{
    segment_file_name, BatchCrc, CommitKind, EpochOrigin, EpochPage, PageEntry, RegionInfo,
    SegmentHeader, BLOCK_BYTES_U64, SEGMENT_FLAG_CHECKPOINT,
};
use crate::log::image::ImageReader;
use crate::PAGE_SIZE;

/// Appends epochs to a log, one segment after the other.
pub struct LogWriter {
    pub(super) storage: Box<dyn LogStorage>,
    pub(super) region: RegionInfo,
    pub(super) log_id: u64,
    pub(super) options: WriterOptions,
    // Newest segment (0 before the first one is created) and where its next byte goes.
    pub(super) seq: u64,
    pub(super) offset: u64,
    pub(super) next_epoch: u64,
    // The last epoch whose commit was reported durable (0: none yet).
    pub(super) last_committed: u64,
    // Set by a failed write or sync, or an epoch abandoned after writing: the writer accepts
    // only a checkpoint until one succeeds.
    pub(super) broken: bool,
    // Bytes of each segment the log holds, by sequence number (for `log_bytes`).
    pub(super) segment_bytes: BTreeMap<u64, u64>,
    // First segment of the current generation: the segment of the newest durable checkpoint,
    // or 0 (the log's first segment) before any.
    pub(super) generation: u64,
    // Segments numbered below this are removed once an epoch after the current generation's
    // checkpoint is durable (the generation before the previous one).
    pub(super) remove_below: Option<u64>,
    // The log size compaction decides with (see `compact_within`).
    pub(super) log_max_bytes: u64,
    // Payload copies of a streaming epoch's open page group, kept between epochs so that its
    // allocation (at most GROUP_ENTRIES_MAX pages) is made once.
    pub(super) group_buf: Vec<u8>,
    // Where each page's newest record is, when the pager reads pages back from the log.
    pub(super) index: Option<std::sync::Arc<super::index::PageIndex>>,
}

impl LogWriter {
    /// Starts a new log in `dir` (created 0700 if missing) for `region`. The directory must
    /// not hold segments already: continuing an existing log is [`LogWriter::resume`]'s job.
    pub fn create(
        dir: &Path,
        region: RegionInfo,
        options: WriterOptions,
    ) -> Result<LogWriter, LogError> {
        Self::with_storage(Box::new(LogDir::open(dir)?), region, options)
    }

    /// Starts a new log on `storage`, which must hold no segment. Nothing is written until
    /// the first epoch.
    pub fn with_storage(
        storage: Box<dyn LogStorage>,
        region: RegionInfo,
        options: WriterOptions,
    ) -> Result<LogWriter, LogError> {
        check_settings(region, &options)?;
        let existing = list_segments(storage.as_ref())?;
        if let Some(&seq) = existing.first() {
            return Err(LogError::NotEmpty {
                dir: storage.location(),
                name: segment_file_name(seq),
            });
        }
        Ok(LogWriter {
            storage,
            region,
            log_id: options.log_id.unwrap_or_else(random_log_id),
            options,
            seq: 0,
            offset: 0,
            next_epoch: 1,
            last_committed: 0,
            broken: false,
            segment_bytes: BTreeMap::new(),
            generation: 0,
            remove_below: None,
            log_max_bytes: LOG_MAX_BYTES_DEFAULT,
            group_buf: Vec::new(),
            index: None,
        })
    }

    /// From now on, records in `index` where every page this writer appends is.
    pub fn set_index(&mut self, index: std::sync::Arc<super::index::PageIndex>) {
        self.index = Some(index);
    }

    pub fn log_id(&self) -> u64 {
        self.log_id
    }

    /// The number the next epoch will get.
    pub fn next_epoch(&self) -> u64 {
        self.next_epoch
    }

    /// The newest segment's sequence number (0 before the first epoch).
    pub fn segment(&self) -> u64 {
        self.seq
    }

    /// Bytes of the log's current generation: the segments from the newest durable
    /// checkpoint on (all of them before the first checkpoint). This is what `LEGO_LOG_MAX`
    /// bounds; the previous generation, kept as the fallback should the newest checkpoint be
    /// damaged, is not counted (see [`LogWriter::total_bytes`]).
    pub fn log_bytes(&self) -> u64 {
        self.segment_bytes
            .range(self.generation..)
            .map(|(_, b)| b)
            .sum()
    }

    /// Bytes of every segment the log holds: both generations (at most about twice
    /// `LEGO_LOG_MAX`, and between a compaction and the next commit a third generation's
    /// checkpoint).
    pub fn total_bytes(&self) -> u64 {
        self.segment_bytes.values().sum()
    }

    /// The first segment of the current generation (0 before the first checkpoint: the log's
    /// first segment).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether only a checkpoint (or [`LogWriter::compact`]) is accepted next.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Number of the last epoch that committed durably (0 if none).
    pub fn last_committed(&self) -> u64 {
        self.last_committed
    }

    /// Appends one epoch of `pages` (each at most once) and returns its number once it is
    /// durable (with [`SyncMode::Data`]).
    pub fn append_epoch(&mut self, pages: &[EpochPage<'_>]) -> Result<u64, LogError> {
        self.append_epoch_as(EpochOrigin::Automatic, pages)
    }

    /// [`LogWriter::append_epoch`] of an epoch whose origin the commit record tells
    /// ([`EpochOrigin::Program`]: made by `lego_checkpoint()`).
    pub fn append_epoch_as(
        &mut self,
        origin: EpochOrigin,
        pages: &[EpochPage<'_>],
    ) -> Result<u64, LogError> {
        if self.broken {
            return Err(self.needs_checkpoint());
        }
        self.check_pages(pages, &[])?;
        let mut epoch = self.begin(CommitKind::Delta, origin);
        epoch.push(pages, true)?;
        epoch.commit()
    }

    /// Starts a streaming epoch cut automatically (a timer, dirty pages): pages are added in
    /// chunks with [`EpochAppend::add`] and written as they come; nothing is durable until
    /// [`EpochAppend::commit`].
    pub fn begin_epoch(&mut self) -> Result<EpochAppend<'_>, LogError> {
        self.begin_epoch_as(EpochOrigin::Automatic)
    }

    /// [`LogWriter::begin_epoch`] for an epoch of the given origin: [`EpochOrigin::Program`]
    /// for the epoch a `lego_checkpoint()` call made, which `lego replay --checkpoint`
    /// recovers and compaction keeps.
    pub fn begin_epoch_as(&mut self, origin: EpochOrigin) -> Result<EpochAppend<'_>, LogError> {
        if self.broken {
            return Err(self.needs_checkpoint());
        }
        Ok(self.begin(CommitKind::Delta, origin))
    }

    /// Appends an automatic checkpoint: `pages` must be every non-zero page of the heap. It
    /// starts a new segment and a new generation; the generation before the previous one is
    /// removed once an epoch after this checkpoint is durable (oldest first, so a crash in
    /// between leaves a contiguous run that still replays). Returns its epoch.
    pub fn checkpoint(&mut self, pages: &[EpochPage<'_>]) -> Result<u64, LogError> {
        self.checkpoint_as(EpochOrigin::Automatic, pages)
    }

    /// [`LogWriter::checkpoint`] of a heap that is a program checkpoint.
    pub fn checkpoint_as(
        &mut self,
        origin: EpochOrigin,
        pages: &[EpochPage<'_>],
    ) -> Result<u64, LogError> {
        self.check_pages(pages, &[])?;
        let mut append = self.begin(CommitKind::Checkpoint, origin);
        append.push(pages, true)?;
        append.commit()
    }

    /// Streams a checkpoint from the heap image `image` (as `lego replay` writes it; its
    /// region must be the log's) into a new segment, reading it in chunks of
    /// [`IMAGE_CHUNK_PAGES`](crate::log::image::IMAGE_CHUNK_PAGES) and skipping holes and all-zero pages, then removes the older
    /// segments as [`LogWriter::checkpoint`] does. Returns the checkpoint's epoch (a new
    /// number). Works on a broken writer, and clears that state. The image's log id is not
    /// checked: its content becomes the heap's.
    /// The checkpoint is a program checkpoint when the image's header says its epoch was one.
    pub fn checkpoint_from_image(&mut self, image: &Path) -> Result<u64, LogError> {
        let mut reader = ImageReader::open(image)?;
        let origin = reader.header().origin;
        self.checkpoint_from_reader(&mut reader, origin)
    }

    pub(super) fn checkpoint_from_reader(
        &mut self,
        image: &mut dyn CheckpointSource,
        origin: EpochOrigin,
    ) -> Result<u64, LogError> {
        let found = image.header().region;
        if found != self.region {
            return Err(LogError::ImageRegion {
                image: image.path().to_path_buf(),
                found,
                expected: self.region,
            });
        }
        let mut append = self.begin(CommitKind::Checkpoint, origin);
        // An error here drops `append` uncommitted: see `EpochAppend`'s drop.
        while let Some(pages) = image.next_chunk()? {
            append.add(&pages)?;
        }
        append.commit()
    }

    pub(super) fn needs_checkpoint(&self) -> LogError {
        LogError::NeedsCheckpoint {
            epoch: self.next_epoch - 1,
        }
    }

    pub(super) fn begin(&mut self, kind: CommitKind, origin: EpochOrigin) -> EpochAppend<'_> {
        let rotate = kind == CommitKind::Checkpoint
            || self.seq == 0
            || self.offset >= self.options.segment_bytes_target;
        let buf = std::mem::take(&mut self.group_buf);
        EpochAppend {
            epoch: self.next_epoch,
            writer: self,
            kind,
            origin,
            rotate,
            wrote: false,
            finished: false,
            sealed: false,
            open: Vec::new(),
            buf,
            groups: 0,
            pages: 0,
            body_bytes: 0,
            batch: BatchCrc::default(),
            unpublished: Vec::new(),
        }
    }

    /// Removes every segment older than the newest, after the checkpoint `epoch` in it is
    /// durable (a resume from an older epoch: no previous generation is kept).
    pub(super) fn remove_older_now(&mut self, epoch: u64) {
        self.remove_below = None;
        self.remove_segments_below(self.seq, epoch);
    }

    /// Removes the segments numbered below `below`, oldest first (`epoch` is the checkpoint
    /// or epoch that makes them unneeded, for messages). A segment that cannot be removed
    /// costs space, not correctness (replay skips to the checkpoint), so failures are
    /// warnings.
    pub(super) fn remove_segments_below(&mut self, below: u64, epoch: u64) {
        let older: Vec<u64> = match self.storage.segments() {
            Ok(all) => all.into_iter().filter(|&s| s < below).collect(),
            Err(e) => {
                log::warn!(
                    "listing {} after the checkpoint of epoch {epoch} failed: {e}",
                    self.storage.location().display()
                );
                return;
            }
        };
        if older.is_empty() {
            return;
        }
        // Oldest first: a crash in between leaves a contiguous run that still replays.
        for seq in older {
            if let Err(e) = self.storage.remove_segment(seq) {
                log::warn!(
                    "removing {} (no longer needed after epoch {epoch}) failed: {e}",
                    self.storage.segment_path(seq).display()
                );
                return;
            }
            self.segment_bytes.remove(&seq);
            log::debug!(
                "removed {} (no longer needed after epoch {epoch})",
                self.storage.segment_path(seq).display()
            );
        }
        if self.options.sync == SyncMode::Data {
            if let Err(e) = self.storage.sync_dir() {
                log::warn!(
                    "syncing {} after removing old segments failed: {e}",
                    self.storage.location().display()
                );
            }
        }
    }

    /// Checks `pages` (in range, one page long, none twice, none already in `open`) before
    /// anything of them is written.
    pub(super) fn check_pages(
        &self,
        pages: &[EpochPage<'_>],
        open: &[PageEntry],
    ) -> Result<(), LogError> {
        let region_pages = self.region.pages();
        let mut seen = Vec::with_capacity(pages.len() + open.len());
        for p in pages {
            if p.page >= region_pages {
                return Err(LogError::PageOutOfRange {
                    page: p.page,
                    pages: region_pages,
                });
            }
            if let Some(d) = p.data.filter(|d| d.len() != PAGE_SIZE) {
                return Err(LogError::PageLength {
                    page: p.page,
                    len: d.len(),
                });
            }
            seen.push(p.page);
        }
        seen.extend(open.iter().map(|e| e.page));
        seen.sort_unstable();
        match seen.windows(2).find(|w| w[0] == w[1]) {
            Some(w) => Err(LogError::DuplicatePage { page: w[0] }),
            None => Ok(()),
        }
    }

    /// Appends `pieces` at the end of the newest segment, first starting a new segment for
    /// `epoch` if `rotate` says so. Returns the bytes appended.
    pub(super) fn write_pieces(
        &mut self,
        epoch: u64,
        kind: CommitKind,
        rotate: &mut bool,
        pieces: &[&[u8]],
        what: &'static str,
    ) -> Result<u64, LogError> {
        if *rotate {
            self.start_segment(epoch, kind)?;
            *rotate = false;
        }
        let bytes: u64 = pieces.iter().map(|p| p.len() as u64).sum();
        if bytes == 0 {
            return Ok(0);
        }
        self.storage
            .append(self.offset, pieces)
            .map_err(|source| self.io_error(what, source))?;
        self.offset += bytes;
        self.segment_bytes.insert(self.seq, self.offset);
        Ok(bytes)
    }

    /// Makes what was appended durable (`SyncMode::Data`), or at least written to the file
    /// (`SyncMode::None`: the storage may still have writes in flight, and a commit record
    /// must never reach the file before the pages it vouches for).
    pub(super) fn sync(&mut self, what: &'static str) -> Result<(), LogError> {
        let result = match self.options.sync {
            SyncMode::Data => self.storage.sync_segment(),
            SyncMode::None => self.storage.flush(),
        };
        result.map_err(|source| self.io_error(what, source))
    }

    /// Creates the next segment and writes its header (durably, directory entry included).
    pub(super) fn start_segment(
        &mut self,
        first_epoch: u64,
        kind: CommitKind,
    ) -> Result<(), LogError> {
        let seq = self.seq + 1;
        let header = SegmentHeader {
            seq,
            log_id: self.log_id,
            region: self.region,
            first_epoch,
            flags: match kind {
                CommitKind::Checkpoint => SEGMENT_FLAG_CHECKPOINT,
                CommitKind::Delta => 0,
            },
        };
        let block = header.encode();
        let path = self.storage.segment_path(seq);
        let io_err = |what, source| LogError::Io {
            path: path.clone(),
            what,
            source,
        };
        self.storage
            .create_segment(seq)
            .map_err(|e| io_err("creating the file (O_EXCL, mode 0600)", e))?;
        // The segment exists from here on: the next one must get the next number even if
        // writing this header fails.
        self.seq = seq;
        self.offset = 0;
        self.segment_bytes.insert(seq, 0);
        self.storage
            .append(0, &[&block.0])
            .map_err(|e| io_err("writing the header", e))?;
        self.offset = BLOCK_BYTES_U64;
        self.segment_bytes.insert(seq, self.offset);
        if self.options.sync == SyncMode::Data {
            self.storage
                .sync_segment()
                .map_err(|e| io_err("fdatasync of the header", e))?;
            self.storage
                .sync_dir()
                .map_err(|e| io_err("syncing the directory after creating", e))?;
        }
        log::debug!(
            "log segment {} started at epoch {first_epoch}",
            path.display()
        );
        Ok(())
    }

    pub(super) fn io_error(&self, what: &'static str, source: std::io::Error) -> LogError {
        LogError::Io {
            path: self.storage.segment_path(self.seq),
            what,
            source,
        }
    }
}

/// Checks a writer's region and settings.
pub(super) fn check_settings(region: RegionInfo, options: &WriterOptions) -> Result<(), LogError> {
    region
        .check(crate::log::format::Record::SegmentHeader)
        .map_err(|source| LogError::Region { region, source })?;
    if options.segment_bytes_target < SEGMENT_BYTES_TARGET_MIN {
        return Err(LogError::SegmentTarget {
            bytes: options.segment_bytes_target,
        });
    }
    Ok(())
}

pub(super) fn list_segments(storage: &dyn LogStorage) -> Result<Vec<u64>, LogError> {
    storage.segments().map_err(|source| LogError::List {
        dir: storage.location(),
        source,
    })
}

/// A log id that differs between logs: std's per-process random hash keys, mixed with the
/// time and the PID (any of them alone would do; creation is not security-sensitive).
fn random_log_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    h.finish()
}
