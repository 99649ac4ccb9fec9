//! Appending a cut to the log, on the log writer thread (`lego-logwrite`), while the flusher
//! puts the cut's pages back: first the held evicted pages, read back from the store and
//! checked against their CRC (so that a store failing on the first chunk leaves nothing of
//! the epoch in the log), then the snapshot pages, the copied pages and the zero records;
//! then the commit.
//!
//! Rules: the writer is shared with the flusher behind a mutex, each holding it only while it
//! uses it; the snapshot slots are only read. A read-back that fails is tried
//! [`STORE_READ_ATTEMPTS_MAX`] times, and so is one whose copy fails its CRC here; a copy that
//! still fails then, or that the store reports lost, is lost (never appended).
//! This is where an epoch reads the store (`PageStore::fetch`, in [`read_back`]).

use std::sync::{mpsc, Arc, Mutex};

use super::super::buf::PageBuf;
use super::super::{Shared, STATS};
use super::cut::Cut;
use super::lock_writer;
use crate::log::{EpochOrigin, EpochPage, LogError, LogWriter};
use crate::stats::Counter;
use crate::store::{FailureKind, Outcome, PageRead};

/// Pages read back from the store and appended at once (evicted dirty pages).
const STORE_READ_PAGES: usize = 64;
/// Reads of one chunk of evicted pages tried before the epoch fails (a store that fails
/// briefly does not cost an epoch).
const STORE_READ_ATTEMPTS_MAX: u32 = 3;
/// Pause between two reads of the same chunk, in milliseconds.
const STORE_READ_RETRY_MS: u64 = 20;
/// Resident pages appended to the log at once.
const APPEND_PAGES: usize = 1024;

/// Why appending a cut failed.
pub(super) enum AppendError {
    /// Writing the log failed.
    Log(LogError),
    /// Reading evicted pages back from the store failed, again and again: the epoch is
    /// retried later with everything it held.
    StoreRead(String),
    /// These evicted pages' store copies failed their CRC32C check: their content is lost.
    Lost(Vec<usize>),
}

/// The log writer thread's two ends: a cut to append, and what appending it gave.
pub(super) struct Appender {
    pub(super) jobs: mpsc::Sender<(Arc<Cut>, EpochOrigin)>,
    pub(super) done: mpsc::Receiver<Result<u64, AppendError>>,
}

impl Appender {
    pub(super) fn start(
        shared: &Arc<Shared>,
        writer: &Arc<Mutex<LogWriter>>,
    ) -> std::io::Result<Appender> {
        let (jobs, job_rx) = mpsc::channel::<(Arc<Cut>, EpochOrigin)>();
        let (done_tx, done) = mpsc::channel();
        let (sh, writer) = (Arc::clone(shared), Arc::clone(writer));
        // Allocated once here, so that no epoch can fail for want of a buffer.
        let mut buf = PageBuf::new(STORE_READ_PAGES)?;
        crate::threads::spawn("lego-logwrite", move || {
            for (cut, origin) in job_rx {
                let result = append_cut(&sh, &mut lock_writer(&writer), &cut, origin, &mut buf);
                if done_tx.send(result).is_err() {
                    return;
                }
            }
        })?;
        Ok(Appender { jobs, done })
    }
}

/// Appends the cut as one epoch. The evicted pages are read back from the store first, so that
/// a store that fails leaves nothing of the epoch in the log when their first chunk fails.
fn append_cut(
    sh: &Shared,
    writer: &mut LogWriter,
    cut: &Cut,
    origin: EpochOrigin,
    buf: &mut PageBuf,
) -> Result<u64, AppendError> {
    let durable = sh.durable.as_ref().expect("epochs run only with a log");
    let mut epoch = writer.begin_epoch_as(origin).map_err(AppendError::Log)?;
    // Evicted pages, read back from the store and checked against their checksums.
    for chunk in cut.evicted.chunks(STORE_READ_PAGES) {
        read_back(sh, chunk, buf)?;
        let pages: Vec<EpochPage<'_>> = chunk
            .iter()
            .enumerate()
            .map(|(i, &(p, _, _))| EpochPage {
                page: p as u64,
                data: Some(buf.page(i)),
            })
            .collect();
        epoch.add(&pages).map_err(AppendError::Log)?;
    }
    // Resident pages, from the snapshot area.
    for chunk in cut.moved.chunks(APPEND_PAGES) {
        let pages: Vec<EpochPage<'_>> = chunk
            .iter()
            .map(|&p| EpochPage {
                page: p as u64,
                data: Some(durable.snapshot.page(p)),
            })
            .collect();
        epoch.add(&pages).map_err(AppendError::Log)?;
    }
    let copied: Vec<EpochPage<'_>> = cut
        .copied
        .iter()
        .map(|(p, b)| EpochPage {
            page: *p as u64,
            data: Some(b),
        })
        .collect();
    epoch.add(&copied).map_err(AppendError::Log)?;
    let zeros: Vec<EpochPage<'_>> = cut
        .zeros
        .iter()
        .map(|&p| EpochPage {
            page: p as u64,
            data: None,
        })
        .collect();
    epoch.add(&zeros).map_err(AppendError::Log)?;
    epoch.commit().map_err(AppendError::Log)
}

/// Reads the held evicted pages `chunk` (page, CRC32C and version of the store's copy) into
/// `buf` and checks each. A read that fails, or a copy that fails the check here, is tried
/// again up to [`STORE_READ_ATTEMPTS_MAX`] times in all (as the fault path does); a copy the
/// store reports lost, or that still fails its check then, is lost.
fn read_back(
    sh: &Shared,
    chunk: &[(usize, u32, u32)],
    buf: &mut PageBuf,
) -> Result<(), AppendError> {
    let durable = sh.durable.as_ref().expect("epochs run only with a log");
    let mut attempt = 1;
    let mut lost: Vec<usize> = Vec::new();
    loop {
        lost.clear();
        // Pages the store handed back as good that fail the checksum here (damaged on the
        // way): read again like a transient failure, lost once the attempts are used up.
        let mut corrupt: Vec<usize> = Vec::new();
        let unread: Option<String> = {
            let mut slices = buf.pages_mut(chunk.len());
            let mut batch: Vec<PageRead<'_>> = slices
                .iter_mut()
                .zip(chunk)
                .map(|(b, &(p, crc, version))| PageRead::new(p as u64, b, crc, version))
                .collect();
            let fetched = sh.store.fetch(&mut batch);
            let injected = match &durable.readback_faults {
                Some(faults) => faults.after_read(&mut batch),
                None => Ok(()),
            };
            let mut unread = false;
            for r in &batch {
                match r.outcome {
                    Outcome::Done if crc32c::crc32c(r.buf) != r.crc => {
                        corrupt.push(r.page as usize)
                    }
                    Outcome::Done => {}
                    // The store checked what it has: final.
                    Outcome::Failed(FailureKind::Lost) => lost.push(r.page as usize),
                    Outcome::Failed(_) | Outcome::Pending => unread = true,
                }
            }
            unread.then(|| match injected.and(fetched) {
                Err(e) => e.to_string(),
                Ok(()) => "the store left a page unread".to_string(),
            })
        };
        if unread.is_none() && corrupt.is_empty() {
            break;
        }
        STATS.add(Counter::FetchErrors, 1);
        let what = unread
            .clone()
            .unwrap_or_else(|| format!("{} copies failed their CRC32C check", corrupt.len()));
        if attempt >= STORE_READ_ATTEMPTS_MAX {
            if unread.is_none() {
                lost.append(&mut corrupt);
                break;
            }
            return Err(AppendError::StoreRead(format!(
                "{} pages from the page at {:#x}, {attempt} attempts: {what}",
                chunk.len(),
                sh.addr_of(chunk[0].0)
            )));
        }
        log::warn!(
            "reading {} evicted pages back from the store for the log failed (attempt {attempt} of {STORE_READ_ATTEMPTS_MAX}): {what}",
            chunk.len()
        );
        attempt += 1;
        super::super::sleep_ms(STORE_READ_RETRY_MS);
    }
    if lost.is_empty() {
        Ok(())
    } else {
        lost.sort_unstable();
        lost.dedup();
        Err(AppendError::Lost(lost))
    }
}
