//! `fork` support: before the fork, the gate is closed (no handler or evictor is mid-work)
//! and every evicted page is brought back, so that the child, whose copy of the region is
//! ordinary memory no longer served by lego, sees exactly the parent's heap; in the parent
//! after the fork, fault handling and eviction resume. The preload library takes the user
//! heap's locks before [`Runtime::prepare_fork`] (they may fault, so the handlers still run
//! then) and the internal heap's after it.
//!
//! Rules: page-in ignores the cache size (the cache may exceed it until the fork is over) and
//! uses only the buffer mapped at start; it waits until no page is in transit.

use std::sync::Mutex;

use super::buf::PageBuf;
use super::fault::{plan_fault, Plan};
use super::fetch::fetch_in_chunks;
use super::{PagerError, Runtime, Shared, FETCH_CHUNK_PAGES, STATS};
use crate::cache::PageState;
use crate::stats::Counter;

/// The buffer `fork` pages evicted pages in through (mapped at start).
pub(super) struct ForkBuf {
    buf: Mutex<PageBuf>,
}

impl ForkBuf {
    pub(super) fn new() -> Result<ForkBuf, PagerError> {
        let buf = PageBuf::new(FETCH_CHUNK_PAGES).map_err(|source| PagerError::Buffer {
            what: "buffer fork pages evicted pages in through".into(),
            source,
        })?;
        Ok(ForkBuf {
            buf: Mutex::new(buf),
        })
    }
}

impl Runtime {
    /// Before `fork`: stops eviction and fault handling, and brings every evicted page back, so
    /// that the child (whose copy of the region is ordinary memory, no longer served by lego)
    /// sees exactly the parent's heap. The cache may exceed its size until the fork is over.
    pub fn prepare_fork(&self) {
        self.shared.gate.close();
        let mut buf = self
            .shared
            .fork
            .buf
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        page_in_everything(&self.shared, &mut buf);
    }

    /// In the parent after `fork`: resumes fault handling and eviction.
    pub fn after_fork_parent(&self) {
        self.shared.gate.open();
        let _t = self.shared.cache.lock();
        self.shared.cache.want_eviction_all();
    }
}

/// Brings every evicted page back into memory (for `fork`), ignoring the cache size, and waits
/// until no page is in transit. Called with the gate closed, so no handler or evictor runs;
/// `buf` ([`FETCH_CHUNK_PAGES`] pages) was mapped at start.
fn page_in_everything(sh: &Shared, buf: &mut PageBuf) {
    let pages = sh.cache.lock().high();
    let mut page = 0;
    let mut brought = 0u64;
    while page < pages {
        let state = sh.cache.lock().state(page);
        if state == PageState::Evicted {
            if let Plan::Fetch { first, n } = plan_fault(sh, page, true) {
                fetch_in_chunks(sh, first, n, Some(first), buf, 0);
                brought += n as u64;
                page = first + n;
                continue;
            }
        }
        page += 1;
    }
    STATS.add(Counter::ForkPageIns, brought);
}
