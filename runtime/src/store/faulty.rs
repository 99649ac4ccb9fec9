//! [`FaultyStore`]: fault injection at the store seam, for tests (`LEGO_FAULT_INJECT`).
//!
//! It wraps a real store and, for the operation a [`FaultPlan`] names, lets exactly
//! `after_pages` pages through; the call that crosses that budget forwards the pages still
//! within it (a realistic partial write or read) and then fails, and every later call of that
//! operation fails without touching the inner store. The other operation and `discard` always
//! pass through. The budget is shared by all threads. With [`FaultEffect::Corrupt`] nothing
//! fails: every fetched page past the budget comes back with one byte changed, as from a store
//! that hands back a damaged or foreign copy (the pager must notice by the page's checksum).
//! A [`FaultOp::ReadBack`] plan leaves the store alone: the epoch's read-back applies its
//! [`FaultBudget`] to what it read.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{op_name, PageRead, PageStore, PageWrite, StoreError};
use crate::config::{FaultEffect, FaultOp, FaultPlan};

/// The byte of a page that a corrupting plan changes.
const CORRUPT_BYTE_OFFSET: usize = 100;

/// A plan's budget of pages that pass, shared by every thread that uses it (the store's
/// calls, or the epoch's read-back for [`FaultOp::ReadBack`]).
pub struct FaultBudget {
    plan: FaultPlan,
    // Pages of the planned operation let through so far (never above `plan.after_pages`).
    passed: AtomicU64,
}

impl FaultBudget {
    pub fn new(plan: FaultPlan) -> FaultBudget {
        FaultBudget {
            plan,
            passed: AtomicU64::new(0),
        }
    }

    pub fn plan(&self) -> FaultPlan {
        self.plan
    }

    /// Takes up to `want` pages from the budget; returns how many were granted.
    fn grant(&self, want: usize) -> usize {
        let want = u64::try_from(want).unwrap_or(u64::MAX);
        let limit = self.plan.after_pages;
        let before = self
            .passed
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |passed| {
                Some(passed.saturating_add(want).min(limit))
            })
            .expect("the update closure always returns Some");
        let granted = before.saturating_add(want).min(limit) - before;
        usize::try_from(granted).expect("granted pages are at most the batch length")
    }

    fn injected(&self, page: u64) -> StoreError {
        let errno = match self.plan.effect {
            FaultEffect::Errno(errno) => errno,
            // A corrupting or delaying plan never fails a call; EIO if one ever asks.
            FaultEffect::Corrupt | FaultEffect::Delay { .. } => libc::EIO,
        };
        StoreError::Injected {
            op: self.plan.op,
            page,
            source: std::io::Error::from_raw_os_error(errno),
        }
    }

    /// Applies the plan to a batch that was just read: the pages past the budget make the
    /// call fail, or come back with one byte changed.
    pub fn after_read(&self, batch: &mut [PageRead<'_>]) -> Result<(), StoreError> {
        let granted = self.grant(batch.len());
        match self.plan.effect {
            FaultEffect::Corrupt => {
                for read in &mut batch[granted..] {
                    if let Some(b) = read.buf.get_mut(CORRUPT_BYTE_OFFSET) {
                        *b ^= 0x5a;
                    }
                }
                Ok(())
            }
            // Not implemented yet: a delaying plan passes every page through.
            FaultEffect::Delay { .. } => Ok(()),
            FaultEffect::Errno(_) => match batch.get(granted) {
                Some(r) => Err(self.injected(r.page)),
                None => Ok(()),
            },
        }
    }
}

/// A store that fails on purpose after a number of pages.
pub struct FaultyStore<S: PageStore> {
    inner: S,
    budget: FaultBudget,
}

impl<S: PageStore> FaultyStore<S> {
    /// Wraps `inner` with the fault plan.
    pub fn new(inner: S, plan: FaultPlan) -> FaultyStore<S> {
        FaultyStore {
            inner,
            budget: FaultBudget::new(plan),
        }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }
}

impl<S: PageStore> PageStore for FaultyStore<S> {
    fn fetch(&self, batch: &mut [PageRead<'_>]) -> Result<(), StoreError> {
        // Not implemented yet: a delaying plan passes every call through.
        if self.budget.plan.op != FaultOp::Fetch
            || matches!(self.budget.plan.effect, FaultEffect::Delay { .. })
        {
            return self.inner.fetch(batch);
        }
        if self.budget.plan.effect == FaultEffect::Corrupt {
            self.inner.fetch(batch)?;
            return self.budget.after_read(batch);
        }
        let granted = self.budget.grant(batch.len());
        let (pass, fail) = batch.split_at_mut(granted);
        if !pass.is_empty() {
            self.inner.fetch(pass)?;
        }
        match fail.first() {
            Some(r) => Err(self.budget.injected(r.page)),
            None => Ok(()),
        }
    }

    fn store(&self, batch: &[PageWrite<'_>]) -> Result<(), StoreError> {
        if self.budget.plan.op != FaultOp::Store
            || matches!(self.budget.plan.effect, FaultEffect::Delay { .. })
        {
            return self.inner.store(batch);
        }
        let granted = self.budget.grant(batch.len());
        let (pass, fail) = batch.split_at(granted);
        if !pass.is_empty() {
            self.inner.store(pass)?;
        }
        match fail.first() {
            Some(w) => Err(self.budget.injected(w.page)),
            None => Ok(()),
        }
    }

    fn discard(&self, first: u64, count: u64) -> Result<(), StoreError> {
        self.inner.discard(first, count)
    }

    fn at_exit(&self) {
        self.inner.at_exit();
    }

    fn describe(&self) -> String {
        let plan = self.budget.plan;
        match plan.effect {
            FaultEffect::Errno(errno) => format!(
                "{} (faulty: {} fails with errno {errno} after {} pages)",
                self.inner.describe(),
                op_name(plan.op),
                plan.after_pages
            ),
            FaultEffect::Corrupt => format!(
                "{} (faulty: {} pages come back changed after {} pages)",
                self.inner.describe(),
                op_name(plan.op),
                plan.after_pages
            ),
            FaultEffect::Delay { ms } => format!(
                "{} (faulty: {} waits {ms} ms after {} pages)",
                self.inner.describe(),
                op_name(plan.op),
                plan.after_pages
            ),
        }
    }
}

// Boxed stores (what `store::open` returns) can be wrapped too.
impl PageStore for Box<dyn PageStore> {
    fn fetch(&self, batch: &mut [PageRead<'_>]) -> Result<(), StoreError> {
        (**self).fetch(batch)
    }

    fn store(&self, batch: &[PageWrite<'_>]) -> Result<(), StoreError> {
        (**self).store(batch)
    }

    fn discard(&self, first: u64, count: u64) -> Result<(), StoreError> {
        (**self).discard(first, count)
    }

    fn at_exit(&self) {
        (**self).at_exit();
    }

    fn describe(&self) -> String {
        (**self).describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records which pages reached it.
    #[derive(Default)]
    struct Recorder {
        fetched: Mutex<Vec<u64>>,
        stored: Mutex<Vec<u64>>,
    }

    impl PageStore for Recorder {
        fn fetch(&self, batch: &mut [PageRead<'_>]) -> Result<(), StoreError> {
            let mut fetched = self.fetched.lock().expect("test lock");
            fetched.extend(batch.iter().map(|r| r.page));
            Ok(())
        }
        fn store(&self, batch: &[PageWrite<'_>]) -> Result<(), StoreError> {
            let mut stored = self.stored.lock().expect("test lock");
            stored.extend(batch.iter().map(|w| w.page));
            Ok(())
        }
        fn discard(&self, _first: u64, _count: u64) -> Result<(), StoreError> {
            Ok(())
        }
        fn describe(&self) -> String {
            "recorder".to_string()
        }
    }

    fn writes(pages: std::ops::Range<u64>, buf: &[u8]) -> Vec<PageWrite<'_>> {
        pages.map(|page| PageWrite { page, buf }).collect()
    }

    #[test]
    fn store_fails_exactly_after_n_pages() {
        let plan = FaultPlan {
            op: FaultOp::Store,
            after_pages: 10,
            effect: FaultEffect::Errno(libc::ENOSPC),
            once: false,
        };
        let store = FaultyStore::new(Recorder::default(), plan);
        let buf = [0u8; 8];
        store.store(&writes(0..4, &buf)).expect("4 of 10");
        store.store(&writes(4..8, &buf)).expect("8 of 10");
        let err = store
            .store(&writes(8..12, &buf))
            .expect_err("crosses the budget");
        assert!(matches!(
            err,
            StoreError::Injected {
                op: FaultOp::Store,
                page: 10,
                ..
            }
        ));
        assert_eq!(err.errno(), Some(libc::ENOSPC));
        let err = store
            .store(&writes(20..21, &buf))
            .expect_err("after budget");
        assert!(matches!(err, StoreError::Injected { page: 20, .. }));
        // Exactly ten pages reached the inner store.
        let stored = store.inner().stored.lock().expect("test lock").clone();
        assert_eq!(stored, (0..10).collect::<Vec<_>>());
        // Fetches and discards are untouched.
        let mut buf2 = [0u8; 8];
        let mut reads = [PageRead {
            page: 3,
            buf: &mut buf2,
        }];
        store.fetch(&mut reads).expect("fetch passes");
        store.discard(0, 100).expect("discard passes");
        assert!(store.describe().contains("store fails with errno"));
    }

    #[test]
    fn fetch_fails_from_the_first_call_when_budget_is_zero() {
        let plan = FaultPlan {
            op: FaultOp::Fetch,
            after_pages: 0,
            effect: FaultEffect::Errno(libc::EIO),
            once: false,
        };
        let store = FaultyStore::new(Recorder::default(), plan);
        let mut bufs = [[0u8; 8]; 2];
        let mut reads: Vec<PageRead<'_>> = bufs
            .iter_mut()
            .enumerate()
            .map(|(i, buf)| PageRead {
                page: 7 + i as u64,
                buf,
            })
            .collect();
        let err = store.fetch(&mut reads).expect_err("no budget");
        assert!(matches!(
            err,
            StoreError::Injected {
                op: FaultOp::Fetch,
                page: 7,
                ..
            }
        ));
        assert_eq!(err.errno(), Some(libc::EIO));
        assert!(store.inner().fetched.lock().expect("test lock").is_empty());
        store
            .store(&writes(0..3, &[0u8; 8]))
            .expect("stores pass when fetch is the planned op");
    }

    #[test]
    fn corrupt_plan_changes_pages_past_the_budget_and_fails_nothing() {
        let plan = FaultPlan {
            op: FaultOp::Fetch,
            after_pages: 1,
            effect: FaultEffect::Corrupt,
            once: false,
        };
        let store = FaultyStore::new(Recorder::default(), plan);
        let mut bufs = [[7u8; 4096]; 3];
        let mut reads: Vec<PageRead<'_>> = bufs
            .iter_mut()
            .enumerate()
            .map(|(i, buf)| PageRead {
                page: i as u64,
                buf,
            })
            .collect();
        store
            .fetch(&mut reads)
            .expect("a corrupting plan fails no call");
        drop(reads);
        assert_eq!(bufs[0], [7u8; 4096], "within the budget: untouched");
        for b in &bufs[1..] {
            let changed = b.iter().filter(|&&x| x != 7).count();
            assert_eq!(changed, 1, "past the budget: exactly one byte changed");
        }
        assert!(store.describe().contains("come back changed"));
    }

    #[test]
    fn budget_is_exact_across_threads() {
        let plan = FaultPlan {
            op: FaultOp::Store,
            after_pages: 1000,
            effect: FaultEffect::Errno(libc::EIO),
            once: false,
        };
        let store = FaultyStore::new(Recorder::default(), plan);
        let buf = [0u8; 8];
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let store = &store;
                let buf = &buf;
                s.spawn(move || {
                    for i in 0..100u64 {
                        let first = (t * 100 + i) * 7;
                        let _ = store.store(&writes(first..first + 7, buf));
                    }
                });
            }
        });
        assert_eq!(store.inner().stored.lock().expect("test lock").len(), 1000);
    }

    #[test]
    fn open_wraps_the_file_store_when_a_plan_is_given() {
        let dir = std::env::temp_dir();
        let plan = FaultPlan {
            op: FaultOp::Fetch,
            after_pages: 1,
            effect: FaultEffect::Errno(libc::EIO),
            once: false,
        };
        let spec = crate::config::BackendSpec::File { dir: dir.clone() };
        let store = crate::store::open(&spec, 16 * crate::PAGE_SIZE as u64, Some(&plan))
            .expect("opening a faulty file store");
        assert!(store.describe().starts_with("file:"));
        assert!(store
            .describe()
            .contains("faulty: fetch fails with errno 5 after 1 pages"));
        let plain = crate::store::open(&spec, 16 * crate::PAGE_SIZE as u64, None)
            .expect("opening a plain file store");
        assert!(!plain.describe().contains("faulty"));
    }
}
