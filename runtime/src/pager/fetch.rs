//! Fetching a claimed run of evicted pages (`Fetching`): reading it in chunks from the store
//! (or, for `IMAGE` pages, from the restore image), checking every page against its checksum
//! and installing the good ones write-protected (they are clean: the store has them).
//!
//! Rules: a corrupt copy is never installed (the page is poisoned); a page that cannot be
//! read is poisoned only when a thread faulted on it, read-ahead pages go back to `Evicted`;
//! a run is given back whole when a chunk fails ([`release_claim`]). The cache lock is never
//! held across a read. This is where a fault reads the store (`PageStore::fetch`, in
//! [`read_pages`]).

use super::buf::PageBuf;
use super::install::{finish_run, install_pages, poison, Outcome, Source};
use super::restore::read_image_pages;
use super::{publish_resident, Shared, FETCH_CHUNK_PAGES, FETCH_FIRST_CHUNK_PAGES, STATS};
use crate::cache::{PageState, IMAGE, REMOVED};
use crate::stats::Counter;
use crate::store::PageRead;
use crate::PAGE_SIZE;

/// Fetches the claimed run `[first, first+n)` from the store in chunks. When a thread faulted
/// on `first` (`faulting`), the first chunk is small so that it runs again soon, and the
/// larger ones follow while it works on the first pages (a sequential reader that catches up
/// waits only for the chunk it needs). If a read fails, the rest of the run is given back
/// unread.
pub(super) fn fetch_in_chunks(
    sh: &Shared,
    first: usize,
    n: usize,
    faulting: Option<usize>,
    buf: &mut PageBuf,
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
        if !fetch_chunk(sh, at, len, faulting, buf) {
            release_claim(sh, at + len, first + n - (at + len));
            return;
        }
        at += len;
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
                t.forget_stored(p);
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
/// page against its checksum, and installs the good ones write-protected (clean). If `faulting`
/// is among them and cannot be fetched it is poisoned; the read-ahead pages that fail are put
/// back as evicted (or poisoned when their copy is corrupt). False if the read failed.
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
    let crcs: Vec<Option<u32>> = {
        let t = sh.cache.lock();
        (first..first + n)
            .map(|p| (!t.has_flag(p, IMAGE)).then(|| t.crc(p)))
            .collect()
    };
    let result = read_pages(sh, first, &crcs, buf);
    if let Err(e) = result {
        STATS.add(Counter::FetchErrors, 1);
        let mut t = sh.cache.lock();
        for p in first..first + n {
            let removed = t.has_flag(p, REMOVED);
            t.set_flag(p, REMOVED, false);
            t.set_state(
                p,
                if removed {
                    PageState::Absent
                } else if Some(p) == faulting {
                    PageState::Poisoned
                } else {
                    PageState::Evicted
                },
            );
        }
        publish_resident(t.resident());
        drop(t);
        sh.cache.room_freed();
        let _ = sh.kernel.uffd.wake(sh.addr_of(first), n * PAGE_SIZE);
        if let Some(page) = faulting {
            poison(sh, page, &format!("fetching it from the store failed: {e}"));
        }
        return false;
    }
    // Verify every page before anything is installed: a corrupt copy is never served.
    let mut good = vec![true; n];
    for i in 0..n {
        if let Some(want) = crcs[i] {
            if crc32c::crc32c(buf.page(i)) != want {
                good[i] = false;
            }
        }
    }
    let mut out: Vec<Outcome> = good
        .iter()
        .map(|&g| if g { Outcome::Pending } else { Outcome::Failed })
        .collect();
    let bad_faulting = faulting.filter(|&f| !good[f - first]);
    // Corrupt copies are not installed: they are poisoned (below, by `finish_run`).
    // SAFETY: `buf` holds the `n` pages just read (at most its size, checked by `pages_mut`)
    // and is not touched until this returns; the run was claimed (`Fetching`) by this thread.
    unsafe { install_pages(sh, first, buf.addr(0) as *const u8, true, &mut out) };
    let installed = finish_run(
        sh,
        first,
        &out,
        Source::Store,
        "its copy in the store failed its CRC32C check or could not be installed",
    );
    STATS.add(Counter::PagesFetched, installed);
    STATS.add(Counter::BytesFetched, installed * PAGE_SIZE as u64);
    if installed > 1 {
        STATS.add(Counter::PagesReadAhead, installed - 1);
    }
    if let Some(page) = bad_faulting {
        log::error!(
            "the copy of the page at {:#x} in the store failed its CRC32C check",
            sh.addr_of(page)
        );
    }
    true
}

/// Reads pages `first..first + crcs.len()` into `buf`: from the restore image the pages that
/// are still there (no checksum in `crcs`), from the store the others.
fn read_pages(
    sh: &Shared,
    first: usize,
    crcs: &[Option<u32>],
    buf: &mut PageBuf,
) -> Result<(), String> {
    let mut slices = buf.pages_mut(crcs.len());
    let mut from_store: Vec<PageRead<'_>> = Vec::with_capacity(crcs.len());
    let mut i = 0;
    let mut rest = slices.as_mut_slice();
    while i < crcs.len() {
        // A run of pages from the same source.
        let image = crcs[i].is_none();
        let n = crcs[i..]
            .iter()
            .take_while(|c| c.is_none() == image)
            .count();
        let (run, tail) = std::mem::take(&mut rest).split_at_mut(n);
        rest = tail;
        if image {
            let mut bufs: Vec<&mut [u8]> = run.iter_mut().map(|b| &mut **b).collect();
            read_image_pages(sh.restore.as_ref(), first + i, &mut bufs)?;
        } else {
            for (k, b) in run.iter_mut().enumerate() {
                from_store.push(PageRead {
                    page: (first + i + k) as u64,
                    buf: b,
                });
            }
        }
        i += n;
    }
    if from_store.is_empty() {
        return Ok(());
    }
    sh.store.fetch(&mut from_store).map_err(|e| e.to_string())
}
