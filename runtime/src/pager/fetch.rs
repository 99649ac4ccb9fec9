//! Fetching a claimed run of evicted pages (`Fetching`): reading it in chunks from the store
//! (or, for `IMAGE` pages, from the restore image), checking every page against its checksum
//! and installing the good ones write-protected (they are clean: the store has them).
//!
//! Rules: a corrupt copy is never installed. A page whose read fails in a way that may pass is
//! read again, up to [`FETCH_ATTEMPTS_MAX`] times, while its neighbours are installed: a
//! transient store error, or a copy the store handed back as good that fails the pager's own
//! checksum (damaged on the way). A copy the store itself reports lost (it checked what it
//! has, and a store with several copies tried them all) is final. After the attempts, the
//! faulting page is poisoned whatever failed; a read-ahead page is poisoned only when its copy
//! is lost or corrupt, and otherwise (transient, refused) goes back to `Evicted`. A run is
//! given back whole when a chunk fails ([`release_claim`]). The cache lock is never
//! held across a read. This is where a fault reads the store (`PageStore::fetch`, in
//! [`read_pages`]).

use super::buf::PageBuf;
use super::install::{finish_run, install_pages, Outcome, Source};
use super::restore::read_image_pages;
use super::{publish_resident, Shared, FETCH_CHUNK_PAGES, FETCH_FIRST_CHUNK_PAGES, STATS};
use crate::cache::{PageState, IMAGE, REMOVED};

use crate::stats::Counter;

/// Times a page of a fetch is read before a failure that may pass (a transient store error, a
/// copy that fails its checksum) counts as final.
pub(super) const FETCH_ATTEMPTS_MAX: u32 = 3;
/// The wait before the next read of a failed page grows by this much each attempt, in ms
/// (inside the gate: an epoch cut or a fork waits for the retries too).
const FETCH_RETRY_MS: u64 = 2;
use crate::store::{FailureKind, Outcome as StoreOutcome, PageRead, PageWant};
use crate::PAGE_SIZE;

/// Fetches the claimed run `[first, first+n)` from the store in chunks. When a thread faulted
/// on `first` (`faulting`), the first chunk is small so that it runs again soon, and the
/// larger ones follow while it works on the first pages (a sequential reader that catches up
/// waits only for the chunk it needs). Each chunk's pages are named to the store
/// (`PageStore::read_ahead`) before the chunk before it is read and installed, and so are the
/// first `then` pages after the run (the first chunk of the fetch that is expected to follow
/// it: the handler's prefetch of a sweep's next window). If a read fails, the rest of the run
/// is given back unread.
pub(super) fn fetch_in_chunks(
    sh: &Shared,
    first: usize,
    n: usize,
    faulting: Option<usize>,
    buf: &mut PageBuf,
    then: usize,
) {
    debug_assert!(faulting.is_none() || faulting == Some(first));
    let mut at = first;
    while at < first + n {
        let chunk = if at == first && faulting.is_some() {
            FETCH_FIRST_CHUNK_PAGES
        } else {
            FETCH_CHUNK_PAGES
        };
        let len = chunk.min(first + n - at);
        let next = at + len;
        if next < first + n {
            read_ahead(sh, next, FETCH_CHUNK_PAGES.min(first + n - next));
        } else if then > 0 {
            read_ahead(sh, next, then);
        }
        if !fetch_chunk(sh, at, len, faulting, buf) {
            release_claim(sh, at + len, first + n - (at + len));
            return;
        }
        at += len;
    }
}

/// Tells the store which pages a coming chunk will ask for (`PageStore::read_ahead`), so that
/// a remote store sends their requests while the current chunk's replies are read and
/// installed. Only for pages that are evicted (claimed or about to be) and in the store (not
/// the restore image), and that lie in the region; otherwise nothing is said.
fn read_ahead(sh: &Shared, first: usize, n: usize) {
    let wants: Option<Vec<PageWant>> = {
        let t = sh.cache.lock();
        if first + n > t.pages() {
            return;
        }
        (first..first + n)
            .map(|p| {
                let state = t.state(p);
                let evicted = state == PageState::Evicted || state == PageState::Fetching;
                (evicted && !t.has_flag(p, IMAGE)).then(|| PageWant {
                    page: p as u64,
                    crc: t.crc(p),
                    version: t.version(p),
                })
            })
            .collect()
    };
    if let Some(wants) = wants {
        sh.store.read_ahead(&wants);
    }
}

/// Gives back claimed `Fetching` pages without reading them: evicted again (or absent if the
/// program discarded them meanwhile), waking any thread that waits on them.
fn release_claim(sh: &Shared, first: usize, n: usize) {
    if n == 0 {
        return;
    }
    {
        let mut t = sh.cache.lock();
        for p in first..first + n {
            let removed = t.has_flag(p, REMOVED);
            t.set_flag(p, REMOVED, false);
            if removed {
                sh.drop_store_copy(&mut t, p);
            }
            t.set_state(
                p,
                if removed {
                    PageState::Absent
                } else {
                    PageState::Evicted
                },
            );
        }
        publish_resident(t.resident());
    }
    sh.cache.room_freed();
    let _ = sh.kernel.uffd.wake(sh.addr_of(first), n * PAGE_SIZE);
}

/// Fetches the claimed pages `[first, first+n)` (at most [`FETCH_CHUNK_PAGES`]), checks every
/// page against its checksum, and installs the good ones write-protected (clean). A page that
/// fails for a reason that may pass (a transient store error, a copy that failed its check) is
/// read again, up to [`FETCH_ATTEMPTS_MAX`] times in all; its neighbours are installed
/// meanwhile. What still fails then: the faulting page is poisoned, and so is a read-ahead page
/// whose copy is lost or corrupt; a read-ahead page that only hit transient errors is put back
/// as evicted. False if any page failed.
fn fetch_chunk(
    sh: &Shared,
    first: usize,
    n: usize,
    faulting: Option<usize>,
    buf: &mut PageBuf,
) -> bool {
    let faulting = faulting.filter(|f| (first..first + n).contains(f));
    // Pages still in the restore image have no checksum in the table (replay checked the
    // log's when it wrote the image).
    let expect: Vec<Expect> = {
        let t = sh.cache.lock();
        (first..first + n)
            .map(|p| {
                if t.has_flag(p, IMAGE) {
                    Expect::Image
                } else {
                    Expect::Store {
                        crc: t.crc(p),
                        version: t.version(p),
                    }
                }
            })
            .collect()
    };
    let (status, last_error, log_error) = read_with_retries(sh, first, &expect, buf, faulting);
    let mut out: Vec<Outcome> = status
        .iter()
        .enumerate()
        .map(|(i, st)| match st {
            PageFetch::Good | PageFetch::FromLog => Outcome::Pending,
            // Its copy may be fine: a read-ahead page stays evicted.
            PageFetch::Transient | PageFetch::Refused if Some(first + i) != faulting => {
                Outcome::Skipped
            }
            _ => Outcome::Failed,
        })
        .collect();
    let all_good = status
        .iter()
        .all(|st| matches!(st, PageFetch::Good | PageFetch::FromLog));
    let corrupt_faulting = faulting.filter(|&f| status[f - first] == PageFetch::Corrupt);
    // SAFETY: `buf` holds the `n` pages just read (at most its size, checked by `pages_mut`)
    // and is not touched until this returns; the run was claimed (`Fetching`) by this thread.
    unsafe { install_pages(sh, first, buf.addr(0) as *const u8, true, &mut out) };
    let mut why = if corrupt_faulting.is_some() || last_error.is_empty() {
        "its copy in the store failed its CRC32C check or could not be installed".to_string()
    } else {
        format!("fetching it from the store failed: {last_error}")
    };
    if let Some(e) = log_error {
        why = format!("{why}; the log could not give it either: {e}");
    }
    let installed = finish_run(sh, first, &out, Source::Store, &why);
    if status.contains(&PageFetch::FromLog) {
        // The store lost them: their next eviction writes them to it again.
        let mut t = sh.cache.lock();
        for (i, st) in status.iter().enumerate() {
            if *st == PageFetch::FromLog {
                t.forget_stored(first + i);
            }
        }
    }
    STATS.add(Counter::PagesFetched, installed);
    STATS.add(Counter::BytesFetched, installed * PAGE_SIZE as u64);
    if installed > 1 {
        STATS.add(Counter::PagesReadAhead, installed - 1);
    }
    if let Some(page) = corrupt_faulting {
        log::error!(
            "the copy of the page at {:#x} in the store failed its CRC32C check",
            sh.addr_of(page)
        );
    }
    all_good
}

/// Reads the pages `expect` describes into `buf` and checks each against its checksum,
/// reading again those that failed in a way that may pass, up to [`FETCH_ATTEMPTS_MAX`] times
/// in all, then from the log those the store could not give. Returns each page's state and the
/// last failure's description, and why the log could not give the `faulting` page (or, if
/// the log gave that one, the first it could not give).
fn read_with_retries(
    sh: &Shared,
    first: usize,
    expect: &[Expect],
    buf: &mut PageBuf,
    faulting: Option<usize>,
) -> (Vec<PageFetch>, String, Option<String>) {
    let mut status = vec![PageFetch::Unread; expect.len()];
    let mut last_error = String::new();
    // A store that checked each page against the checksum asked for is not checked again.
    let verified = sh.store.verifies_reads();
    for attempt in 1..=FETCH_ATTEMPTS_MAX {
        if let Err(e) = read_pages(sh, first, expect, buf, &mut status) {
            last_error = e;
        }
        // Verify every page before anything is installed: a corrupt copy is never served.
        for (i, st) in status.iter_mut().enumerate() {
            if *st == PageFetch::Read {
                let good = match expect[i] {
                    Expect::Store { crc, .. } => verified || crc32c::crc32c(buf.page(i)) == crc,
                    Expect::Image => true,
                };
                *st = if good {
                    PageFetch::Good
                } else {
                    PageFetch::Corrupt
                };
            }
        }
        if status.iter().any(|st| *st != PageFetch::Good) {
            STATS.add(Counter::FetchErrors, 1);
        }
        let retry = status
            .iter()
            .any(|st| matches!(st, PageFetch::Transient | PageFetch::Corrupt));
        if !retry {
            break;
        }
        if attempt < FETCH_ATTEMPTS_MAX {
            for st in status.iter_mut() {
                if matches!(st, PageFetch::Transient | PageFetch::Corrupt) {
                    *st = PageFetch::Unread;
                }
            }
            super::sleep_ms(FETCH_RETRY_MS * u64::from(attempt));
        }
    }
    let log_error = read_from_log(sh, first, expect, buf, &mut status, faulting);
    (status, last_error, log_error)
}

/// The copy of last resort: pages the store could not give, read from the log when it holds
/// their exact content (a pool with one copy whose server died; see `Durable::log_first`).
/// Returns why the log could not give the `faulting` page, or else the first it could not
/// give, if any.
fn read_from_log(
    sh: &Shared,
    first: usize,
    expect: &[Expect],
    buf: &mut PageBuf,
    status: &mut [PageFetch],
    faulting: Option<usize>,
) -> Option<String> {
    let index = sh.durable.as_ref().and_then(|d| d.index.as_ref())?;
    if status.iter().all(|st| *st == PageFetch::Good) {
        return None;
    }
    let mut first_failure = None;
    let mut pages = buf.pages_mut(expect.len());
    for (i, st) in status.iter_mut().enumerate() {
        let Expect::Store { crc, .. } = expect[i] else {
            continue;
        };
        if *st == PageFetch::Good {
            continue;
        }
        match index.read((first + i) as u64, crc, pages[i]) {
            Ok(()) => {
                *st = PageFetch::FromLog;
                STATS.add(Counter::PagesFromLog, 1);
                if FROM_LOG.allow() {
                    log::warn!(
                        "the page at {:#x} was read from the log: the store could not give it",
                        sh.addr_of(first + i)
                    );
                }
            }
            Err(e) => {
                log::debug!(
                    "the page at {:#x} is not in the log either: {e}",
                    sh.addr_of(first + i)
                );
                let why = crate::logging::error_chain(&e);
                if Some(first + i) == faulting {
                    first_failure = Some(why);
                } else {
                    first_failure.get_or_insert(why);
                }
            }
        }
    }
    first_failure
}

static FROM_LOG: crate::logging::RateLimit = crate::logging::RateLimit::new(2);

/// Where a fetched page's content comes from, and what it must match.
#[derive(Clone, Copy)]
enum Expect {
    /// The restore image (checked by replay when it wrote the image).
    Image,
    /// The store, which holds this version with this checksum.
    Store { crc: u32, version: u32 },
}

/// How far one page of a fetched chunk has got.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PageFetch {
    /// Not read yet (or to be read again).
    Unread,
    /// Read, not yet checked.
    Read,
    /// Read and matching its checksum.
    Good,
    /// Read from the log (the store could not give it), matching its checksum.
    FromLog,
    /// Read, but its bytes do not match the checksum.
    Corrupt,
    /// The read failed in a way that may pass.
    Transient,
    /// The store refuses the read (a bad request): trying again cannot help, but the copy may
    /// be fine.
    Refused,
    /// The copy is gone (the store has none that matches).
    Lost,
}

/// Reads the `Unread` pages of `first..first + expect.len()` into `buf`: from the restore
/// image the pages that are still there, from the store the others, and marks each one
/// `Read` or failed. Returns a description of the first failure.
fn read_pages(
    sh: &Shared,
    first: usize,
    expect: &[Expect],
    buf: &mut PageBuf,
    status: &mut [PageFetch],
) -> Result<(), String> {
    let mut slices = buf.pages_mut(expect.len());
    let mut from_store: Vec<PageRead<'_>> = Vec::with_capacity(expect.len());
    let mut store_slot: Vec<usize> = Vec::with_capacity(expect.len());
    let mut first_error: Option<String> = None;
    let mut i = 0;
    let mut rest = slices.as_mut_slice();
    while i < expect.len() {
        // A run of pages from the same source, all to be read or all not.
        let image = matches!(expect[i], Expect::Image);
        let unread = status[i] == PageFetch::Unread;
        let n = (i..expect.len())
            .take_while(|&j| {
                matches!(expect[j], Expect::Image) == image
                    && (status[j] == PageFetch::Unread) == unread
            })
            .count();
        let (run, tail) = std::mem::take(&mut rest).split_at_mut(n);
        rest = tail;
        if !unread {
            // Read already (or failed for good): left as it is.
        } else if image {
            let mut bufs: Vec<&mut [u8]> = run.iter_mut().map(|b| &mut **b).collect();
            let result = read_image_pages(sh.restore.as_ref(), first + i, &mut bufs);
            let st = if result.is_ok() {
                PageFetch::Read
            } else {
                PageFetch::Transient
            };
            status[i..i + n].iter_mut().for_each(|s| *s = st);
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        } else {
            for (k, b) in run.iter_mut().enumerate() {
                let Expect::Store { crc, version } = expect[i + k] else {
                    unreachable!("the run holds store pages only");
                };
                from_store.push(PageRead::new((first + i + k) as u64, b, crc, version));
                store_slot.push(i + k);
            }
        }
        i += n;
    }
    if !from_store.is_empty() {
        if let Err(e) = sh.store.fetch(&mut from_store) {
            first_error.get_or_insert(e.to_string());
        }
        for (r, &slot) in from_store.iter().zip(&store_slot) {
            status[slot] = match r.outcome {
                StoreOutcome::Done => PageFetch::Read,
                StoreOutcome::Failed(FailureKind::Transient) | StoreOutcome::Pending => {
                    PageFetch::Transient
                }
                StoreOutcome::Failed(FailureKind::Refused) => PageFetch::Refused,
                StoreOutcome::Failed(FailureKind::Lost) => PageFetch::Lost,
            };
        }
    }
    first_error.map_or(Ok(()), Err)
}
