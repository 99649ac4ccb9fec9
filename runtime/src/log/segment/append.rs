//! One epoch being streamed: [`EpochAppend`] takes pages in chunks, cuts page groups every
//! [`GROUP_ENTRIES_MAX`] pages however they arrive, writes each group as it fills, and on
//! [`EpochAppend::commit`] syncs the data, writes the commit record and syncs again.
//!
//! Rules: memory is one open group (at most [`GROUP_ENTRIES_MAX`] copied pages); the bytes
//! are the same however the pages are chunked; dropped uncommitted, an epoch that wrote
//! nothing leaves no trace, and one that wrote something breaks the writer (checkpoint next).

use super::{LogError, LogWriter};
use crate::log::format::{
    BatchCrc, Block, Commit, CommitKind, EntryKind, EpochOrigin, EpochPage, PageEntry, PageGroup,
    BLOCK_BYTES, GROUP_ENTRIES_MAX,
};
use crate::PAGE_SIZE;

/// One epoch being written by [`LogWriter::begin_epoch`] (or a checkpoint), page group by
/// page group. See the module documentation for what dropping it uncommitted does.
pub struct EpochAppend<'w> {
    pub(super) writer: &'w mut LogWriter,
    pub(super) epoch: u64,
    pub(super) kind: CommitKind,
    pub(super) origin: EpochOrigin,
    // The epoch's segment is still to be started (at its first write).
    pub(super) rotate: bool,
    // Some byte of the epoch (its segment's header included) reached the storage.
    pub(super) wrote: bool,
    // Committed, or failed (the writer is broken): nothing more may be written.
    pub(super) finished: bool,
    // A page group of fewer than GROUP_ENTRIES_MAX entries was written (the last call of a
    // whole epoch): no page may follow it.
    pub(super) sealed: bool,
    // The open page group: its entries, and in `buf` the payloads of its PAGE entries in
    // order. Held back until the group is full so that groups are cut every
    // GROUP_ENTRIES_MAX pages however the pages arrive.
    pub(super) open: Vec<PageEntry>,
    pub(super) buf: Vec<u8>,
    // What the commit record will say.
    pub(super) groups: u32,
    pub(super) pages: u64,
    pub(super) body_bytes: u64,
    pub(super) batch: BatchCrc,
    // Where the pages written so far are, for the page index: published only once their
    // bytes are in the file (`append` may return before they are written, and a read of
    // the log through the index must never find less than the page).
    pub(super) unpublished: Vec<Indexed>,
}

/// A page's place in the log, waiting to be published in the page index.
#[derive(Clone, Copy)]
pub(super) struct Indexed {
    page: u64,
    /// `(seq, offset, crc)` of its payload; `None`: a zero record.
    at: Option<(u64, u64, u32)>,
}

/// Pages whose places an epoch keeps unpublished at most: past it, the writer waits for its
/// writes to reach the file and publishes them (a checkpoint of a large heap would otherwise
/// keep one entry per page until its commit).
const UNPUBLISHED_PAGES_MAX: usize = 64 * 1024;

/// Where the payloads of a page group to write are.
enum Payloads<'p, 'd> {
    /// In the open group's buffer.
    Buffered,
    /// In the caller's pages.
    Pages(&'p [EpochPage<'d>]),
}

impl EpochAppend<'_> {
    /// The epoch's number (what [`EpochAppend::commit`] returns).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Appends pages of this epoch: full page groups are written as they fill, the last
    /// partial one is kept (at most [`GROUP_ENTRIES_MAX`] pages, copied) until more pages or
    /// the commit come. `pages` are checked first (range, length, no page twice within the
    /// call or the open group); a refused call writes nothing and the epoch goes on. Each
    /// page must appear at most once in the whole epoch: the caller guarantees it across
    /// calls (a page written twice would be applied in its last version).
    pub fn add(&mut self, pages: &[EpochPage<'_>]) -> Result<(), LogError> {
        self.check_writable()?;
        // Only the internal one-call form writes a partial group, and adds nothing after it.
        assert!(!self.sealed, "no page may follow a partial page group");
        self.writer.check_pages(pages, &self.open)?;
        self.push(pages, false)
    }

    /// Writes what is left of the epoch, `fdatasync`, the commit record, `fdatasync` (with
    /// [`SyncMode::Data`]), and returns the epoch's number. An epoch without pages commits
    /// too: it gets a new number and a commit record.
    pub fn commit(mut self) -> Result<u64, LogError> {
        self.check_writable()?;
        self.push(&[], true)?;
        let commit = Commit {
            kind: self.kind,
            epoch: self.epoch,
            log_id: self.writer.log_id,
            groups: self.groups,
            pages: self.pages,
            body_bytes: self.body_bytes,
            batch_crc: self.batch.value(),
            origin: self.origin,
        }
        .encode();
        debug_assert!(Commit::decode(&commit.0).is_ok());
        let written = (|| {
            // An empty epoch may not have its segment yet.
            self.writer.write_pieces(
                self.epoch,
                self.kind,
                &mut self.rotate,
                &[],
                "writing a segment header",
            )?;
            self.wrote = true;
            self.writer.sync("fdatasync before a commit record")?;
            self.publish();
            self.writer.write_pieces(
                self.epoch,
                self.kind,
                &mut self.rotate,
                &[&commit.0],
                "writing a commit record",
            )?;
            self.writer.sync("fdatasync after a commit record")
        })();
        if let Err(e) = written {
            return Err(self.fail(e));
        }
        self.finished = true;
        let w = &mut *self.writer;
        w.next_epoch = self.epoch + 1;
        w.last_committed = self.epoch;
        if self.kind == CommitKind::Checkpoint {
            w.broken = false;
            // A new generation: the current one becomes the previous (kept as the fallback),
            // and the one before it goes once an epoch after this checkpoint is durable.
            w.remove_below = Some(w.generation);
            w.generation = w.seq;
        } else if let Some(below) = w.remove_below.take() {
            w.remove_segments_below(below, self.epoch);
        }
        Ok(self.epoch)
    }

    fn check_writable(&self) -> Result<(), LogError> {
        if self.finished {
            return Err(self.writer.needs_checkpoint());
        }
        Ok(())
    }

    /// Adds checked `pages`; with `last`, also writes the open group and any partial group
    /// of `pages` (nothing may follow then but the commit).
    pub(super) fn push(&mut self, pages: &[EpochPage<'_>], last: bool) -> Result<(), LogError> {
        let mut rest = pages;
        let mut groups: Vec<(Box<Block>, Payloads<'_, '_>)> = Vec::new();
        // The pages of the buffered group, and whether each has a payload (for the index).
        let mut buffered_pages: Vec<(u64, bool)> = Vec::new();
        if !self.open.is_empty() {
            let n = (GROUP_ENTRIES_MAX - self.open.len()).min(rest.len());
            let (head, tail) = rest.split_at(n);
            for p in head {
                self.buffer(p);
            }
            rest = tail;
            if self.open.len() == GROUP_ENTRIES_MAX || last {
                self.sealed |= self.open.len() < GROUP_ENTRIES_MAX;
                let entries = std::mem::take(&mut self.open);
                buffered_pages = entries
                    .iter()
                    .map(|e| (e.page, e.kind == EntryKind::Page))
                    .collect();
                groups.push((self.seal_group(entries), Payloads::Buffered));
            }
        }
        // Whole groups (and with `last` the final partial one) go straight from the caller's
        // pages, without a copy.
        while rest.len() >= GROUP_ENTRIES_MAX || (last && !rest.is_empty()) {
            let (chunk, tail) = rest.split_at(GROUP_ENTRIES_MAX.min(rest.len()));
            self.sealed |= chunk.len() < GROUP_ENTRIES_MAX;
            let entries = chunk.iter().map(|p| self.entry(p)).collect();
            groups.push((self.seal_group(entries), Payloads::Pages(chunk)));
            rest = tail;
        }
        if !groups.is_empty() {
            let mut pieces: Vec<&[u8]> = Vec::new();
            for (block, payloads) in &groups {
                pieces.push(&block.0);
                match payloads {
                    Payloads::Buffered => pieces.extend(self.buf.chunks(PAGE_SIZE)),
                    Payloads::Pages(chunk) => pieces.extend(chunk.iter().filter_map(|p| p.data)),
                }
            }
            let written = self.writer.write_pieces(
                self.epoch,
                self.kind,
                &mut self.rotate,
                &pieces,
                "writing an epoch's pages",
            );
            match written {
                Ok(bytes) => {
                    self.wrote = true;
                    self.body_bytes += bytes;
                    if self.writer.index.is_some() {
                        let start = self.writer.offset - bytes;
                        index_groups(
                            &mut self.unpublished,
                            self.writer.seq,
                            start,
                            &groups,
                            &buffered_pages,
                            &self.buf,
                        );
                    }
                }
                Err(e) => return Err(self.fail(e)),
            }
            if groups.iter().any(|(_, p)| matches!(p, Payloads::Buffered)) {
                self.buf.clear();
            }
        }
        if self.unpublished.len() >= UNPUBLISHED_PAGES_MAX {
            // The pages are in the file once the writes in flight are: then they can be read.
            if let Err(e) = self.writer.storage.flush() {
                let e = self.writer.io_error("writing an epoch's pages", e);
                return Err(self.fail(e));
            }
            self.publish();
        }
        debug_assert!(rest.len() < GROUP_ENTRIES_MAX && (rest.is_empty() || !last));
        for p in rest {
            self.buffer(p);
        }
        Ok(())
    }

    /// Publishes in the page index where the pages written so far are (their bytes are in the
    /// file: the caller flushed or synced the storage since they were appended).
    fn publish(&mut self) {
        let Some(index) = &self.writer.index else {
            return;
        };
        for e in self.unpublished.drain(..) {
            match e.at {
                Some((seq, offset, crc)) => index.record(e.page, seq, offset, crc),
                None => index.record_zero(e.page),
            }
        }
    }

    fn entry(&self, p: &EpochPage<'_>) -> PageEntry {
        match p.data {
            Some(d) => PageEntry::data(self.epoch, p.page, d),
            None => PageEntry::zero(self.epoch, p.page),
        }
    }

    /// Copies `p` into the open group.
    fn buffer(&mut self, p: &EpochPage<'_>) {
        debug_assert!(self.open.len() < GROUP_ENTRIES_MAX);
        let entry = self.entry(p);
        if let Some(d) = p.data {
            if self.buf.capacity() == 0 {
                self.buf.reserve_exact(GROUP_ENTRIES_MAX * PAGE_SIZE);
            }
            self.buf.extend_from_slice(d);
        }
        self.open.push(entry);
    }

    /// Encodes the next page group of the epoch and counts it for the commit record.
    fn seal_group(&mut self, entries: Vec<PageEntry>) -> Box<Block> {
        for e in &entries {
            self.batch.push(e.crc);
        }
        self.pages += entries.len() as u64;
        let group = PageGroup {
            epoch: self.epoch,
            log_id: self.writer.log_id,
            index: self.groups,
            entries,
        };
        self.groups += 1;
        group.encode()
    }

    /// After a failed write or sync the epoch's fate is unknown: its number is used up and
    /// the writer accepts only a checkpoint.
    fn fail(&mut self, e: LogError) -> LogError {
        self.finished = true;
        let w = &mut *self.writer;
        w.broken = true;
        w.next_epoch = self.epoch + 1;
        log::error!("writing epoch {} to the log failed: {e}", self.epoch);
        e
    }
}

/// Adds to `out` where the pages of `groups`, written at `start` of segment `seq`, are: each
/// group is its block, then its pages' payloads in order (zero records have none).
fn index_groups(
    out: &mut Vec<Indexed>,
    seq: u64,
    start: u64,
    groups: &[(Box<Block>, Payloads<'_, '_>)],
    buffered_pages: &[(u64, bool)],
    buf: &[u8],
) {
    let mut offset = start;
    for (_, payloads) in groups {
        offset += BLOCK_BYTES as u64;
        let mut note = |page: u64, data: Option<&[u8]>| match data {
            Some(d) => {
                out.push(Indexed {
                    page,
                    at: Some((seq, offset, crc32c::crc32c(d))),
                });
                offset += PAGE_SIZE as u64;
            }
            None => out.push(Indexed { page, at: None }),
        };
        match payloads {
            Payloads::Buffered => {
                let mut data = buf.chunks(PAGE_SIZE);
                for &(page, has_data) in buffered_pages {
                    note(page, if has_data { data.next() } else { None });
                }
            }
            Payloads::Pages(chunk) => {
                for p in chunk.iter() {
                    note(p.page, p.data);
                }
            }
        }
    }
}

impl Drop for EpochAppend<'_> {
    fn drop(&mut self) {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        self.writer.group_buf = buf;
        if self.finished || !self.wrote {
            // Committed, failed (already handled), or abandoned without a trace: in the last
            // case the number is free for the next epoch.
            return;
        }
        // Abandoned after writing: the epoch's blocks lack a commit record, so a later epoch
        // in the same segment would never be replayed. Its number is used up and only a
        // checkpoint (or `compact`) may follow, as after a failed write.
        let w = &mut *self.writer;
        w.broken = true;
        w.next_epoch = self.epoch + 1;
        log::warn!(
            "epoch {} was abandoned after part of it was written; the log continues only \
             after a checkpoint",
            self.epoch
        );
    }
}
