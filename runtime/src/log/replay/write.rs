//! The second pass: [`write_image`] reads the pages of a [`Plan`](super::Plan) in log order,
//! in runs of up to [`RUN_PAGES_MAX`] adjacent pages, checks each page's CRC again and writes
//! the non-zero ones to an [`ImageSink`] (a file, or memory in tests), then the image header.
//!
//! Rules: a page whose CRC no longer matches is never written (the log changed under the
//! replay: [`ReplayError::LogChanged`]); zero pages stay holes; pages the first pass wrote
//! early that the image does not hold become zeros again.

use std::fs::File;
use std::io::ErrorKind;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{
    read_exact_at, Loc, Plan, Progress, ReplayError, Segment, SegmentSource, RUN_PAGES_MAX,
    WRITEBACK_BYTES,
};
use crate::io::{self, AlignedBuf};
use crate::log::format::{EntryKind, ImageHeader, PageEntry, BLOCK_BYTES_U64};
use crate::PAGE_SIZE;

/// Where the image's bytes go: a file, or memory (tests).
pub trait ImageSink {
    /// Writes all of `bytes` at `offset` (extending the image as needed).
    fn write_all_at(&mut self, offset: u64, bytes: &[u8]) -> std::io::Result<()>;
    /// Sets the image's length (bytes past the last write read as zeros).
    fn set_len(&mut self, len: u64) -> std::io::Result<()>;
    /// Starts making the bytes written so far durable without waiting (a hint: the caller
    /// still syncs at the end). The default does nothing.
    fn start_writeback(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ImageSink for File {
    fn write_all_at(&mut self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        FileExt::write_all_at(self, bytes, offset)
    }

    fn set_len(&mut self, len: u64) -> std::io::Result<()> {
        File::set_len(self, len)
    }

    fn start_writeback(&mut self) -> std::io::Result<()> {
        io::sync::start_writeback(self.as_fd())
    }
}

impl ImageSink for Vec<u8> {
    fn write_all_at(&mut self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        let at = usize::try_from(offset).map_err(|_| ErrorKind::InvalidInput)?;
        let end = at + bytes.len();
        if self.len() < end {
            self.resize(end, 0);
        }
        self[at..end].copy_from_slice(bytes);
        Ok(())
    }

    fn set_len(&mut self, len: u64) -> std::io::Result<()> {
        self.resize(
            usize::try_from(len).map_err(|_| ErrorKind::InvalidInput)?,
            0,
        );
        Ok(())
    }
}

/// The second pass: writes the image that `plan` describes into `out` (which must be empty,
/// or hold only what [`plan_into`] wrote for this plan), and fills in the report's page count
/// and image size. `segments` must be the ones the plan
/// was made from; `image` is only for messages.
pub fn write_image<S: SegmentSource, W: ImageSink>(
    plan: &mut Plan,
    segments: &[Segment<S>],
    out: &mut W,
    image: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<(), ReplayError> {
    let write_err = |source| ReplayError::Image {
        path: image.to_path_buf(),
        what: "writing the image",
        source,
    };
    let total = plan.index.len() as u64;
    let mut pages = 0u64;
    let mut end_page: Option<u64> = None;
    // Pages whose final version the first pass wrote already ([`plan_into`]) are done; a
    // zero version is never among them.
    let mut order = Vec::new();
    for (&page, &loc) in &plan.index {
        if plan.written.get(&page) == Some(&Some(loc)) {
            pages += 1;
            end_page = Some(end_page.map_or(page + 1, |e| e.max(page + 1)));
        } else {
            order.push((page, loc));
        }
    }
    order.sort_unstable_by_key(|&(_, l)| (l.seg, l.offset));
    let mut done = total - order.len() as u64;
    // Aligned, so that the runs are read with O_DIRECT (their offsets are whole blocks).
    let mut buf = AlignedBuf::new(RUN_PAGES_MAX * PAGE_SIZE);
    let mut unsynced = 0usize;
    for run in runs(&order) {
        let (first_page, first) = run[0];
        let seg = &segments[first.seg];
        let bytes = &mut buf.as_mut_slice()[..run.len() * PAGE_SIZE];
        read_exact_at(seg, first.offset, bytes)?;
        // Every page is checked again before any of the run is written: the log may have
        // been replaced since the first pass, and a wrong page must never reach the image.
        check_run(seg, run, bytes)?;
        // Non-zero pages are written, adjacent ones together; zero pages stay holes, unless
        // the first pass wrote other bytes there.
        let is_zero = |k: usize| {
            bytes[k * PAGE_SIZE..(k + 1) * PAGE_SIZE]
                .iter()
                .all(|&b| b == 0)
        };
        let needs_write = |k: usize| !is_zero(k) || plan.written.contains_key(&run[k].0);
        let mut i = 0;
        while i < run.len() {
            if !needs_write(i) {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < run.len() && needs_write(j) {
                j += 1;
            }
            let page = first_page + i as u64;
            out.write_all_at(
                ImageHeader::page_offset(page),
                &bytes[i * PAGE_SIZE..j * PAGE_SIZE],
            )
            .map_err(write_err)?;
            unsynced += (j - i) * PAGE_SIZE;
            for k in i..j {
                if !is_zero(k) {
                    pages += 1;
                    let end = first_page + k as u64 + 1;
                    end_page = Some(end_page.map_or(end, |e| e.max(end)));
                }
            }
            i = j;
        }
        // The disk writes the image while the next runs are read, not all at the end.
        if unsynced >= WRITEBACK_BYTES {
            out.start_writeback().map_err(write_err)?;
            unsynced = 0;
        }
        done += run.len() as u64;
        progress(Progress::WritingImage { done, total });
    }
    zero_stale_pages(plan, end_page, out).map_err(write_err)?;
    let header = ImageHeader {
        region: plan.report.region,
        epoch: plan.report.epoch,
        log_id: plan.report.log_id,
        pages,
        origin: plan.report.origin,
    };
    let len = end_page.map_or(BLOCK_BYTES_U64, ImageHeader::page_offset);
    out.set_len(len).map_err(write_err)?;
    out.write_all_at(0, &header.encode().0).map_err(write_err)?;
    plan.report.pages = pages;
    plan.report.image_bytes = len;
    Ok(())
}

/// Checks every page of `run`, read into `bytes`, against the CRC its entry had in the first
/// pass.
fn check_run<S: SegmentSource>(
    seg: &Segment<S>,
    run: &[(u64, Loc)],
    bytes: &[u8],
) -> Result<(), ReplayError> {
    for (k, &(page, loc)) in run.iter().enumerate() {
        let entry = PageEntry {
            kind: EntryKind::Page,
            epoch: loc.epoch,
            page,
            crc: loc.crc,
        };
        entry
            .check_payload(&bytes[k * PAGE_SIZE..(k + 1) * PAGE_SIZE])
            .map_err(|source| ReplayError::LogChanged {
                path: seg.path.clone(),
                offset: loc.offset,
                source,
            })?;
    }
    Ok(())
}

/// Pages the first pass wrote that the image does not hold (a version of an incomplete
/// epoch, or one a checkpoint left out) become zeros again, in runs of up to
/// [`RUN_PAGES_MAX`]; past `end_page`, the image's `set_len` cuts them off.
fn zero_stale_pages<W: ImageSink>(
    plan: &Plan,
    end_page: Option<u64>,
    out: &mut W,
) -> std::io::Result<()> {
    let mut stale: Vec<u64> = plan
        .written
        .keys()
        .copied()
        .filter(|p| !plan.index.contains_key(p) && end_page.is_some_and(|e| *p < e))
        .collect();
    stale.sort_unstable();
    let zeros = vec![0u8; RUN_PAGES_MAX * PAGE_SIZE];
    let mut rest = &stale[..];
    while let Some(&first) = rest.first() {
        let n = rest
            .iter()
            .take(RUN_PAGES_MAX)
            .enumerate()
            .take_while(|&(k, &p)| p == first + k as u64)
            .count();
        out.write_all_at(ImageHeader::page_offset(first), &zeros[..n * PAGE_SIZE])?;
        rest = &rest[n..];
    }
    Ok(())
}

/// Splits `order` (sorted by place in the log) into runs of pages that are adjacent both in
/// the log and in the region, at most [`RUN_PAGES_MAX`] long.
fn runs(order: &[(u64, Loc)]) -> impl Iterator<Item = &[(u64, Loc)]> {
    let mut rest = order;
    std::iter::from_fn(move || {
        let (&(page0, loc0), _) = rest.split_first()?;
        let mut n = 1;
        while n < rest.len().min(RUN_PAGES_MAX) {
            let (page, loc) = rest[n];
            let step = n as u64;
            if loc.seg != loc0.seg
                || loc.offset != loc0.offset + step * BLOCK_BYTES_U64
                || page != page0 + step
            {
                break;
            }
            n += 1;
        }
        let (run, tail) = rest.split_at(n);
        rest = tail;
        Some(run)
    })
}
