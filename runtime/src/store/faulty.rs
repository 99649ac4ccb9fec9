//! [`FaultyStore`]: fault injection at the store seam, for tests (`LEGO_FAULT_INJECT`).
//!
//! It wraps a real store and, for the operation a [`FaultPlan`] names, lets exactly
//! `after_pages` pages through untouched; the pages past that budget are affected, each on its
//! own (its neighbours in the batch still reach the inner store):
//! - [`FaultEffect::Errno`]: the page fails with that errno, without reaching the inner store;
//! - [`FaultEffect::Corrupt`]: nothing fails, but the page comes back with one byte changed, as
//!   from a store that hands back a damaged or foreign copy (the pager must notice by the
//!   page's checksum);
//! - [`FaultEffect::Delay`]: the call waits that long before it goes on, as a slow server.
//!
//! With `once`, only the first page past the budget is affected, and the store works again
//! afterwards (a dropped packet, a server that restarted). The budget is shared by all threads.
//! The other operations and `discard` always pass through. A [`FaultOp::ReadBack`] plan leaves
//! the store alone: the epoch's read-back applies its [`FaultBudget`] to what it read.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use super::error::op_name;
use super::{FailureKind, Outcome, PageRead, PageStore, PageWant, PageWrite, StoreError};
use crate::config::{FaultEffect, FaultOp, FaultPlan};

/// The byte of a page that a corrupting plan changes.
const CORRUPT_BYTE_OFFSET: usize = 100;

/// A plan's budget of pages that pass, shared by every thread that uses it (the store's
/// calls, or the epoch's read-back for [`FaultOp::ReadBack`]).
pub struct FaultBudget {
    plan: FaultPlan,
    // Pages of the planned operation let through so far (never above `plan.after_pages`).
    passed: AtomicU64,
    // Set once a `once` plan has affected its page.
    fired: AtomicBool,
}

impl FaultBudget {
    pub fn new(plan: FaultPlan) -> FaultBudget {
        FaultBudget {
            plan,
            passed: AtomicU64::new(0),
            fired: AtomicBool::new(false),
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

    /// The positions of a batch of `len` pages that the plan affects: none, one, or all past
    /// the budget.
    fn affected(&self, len: usize) -> std::ops::Range<usize> {
        if self.plan.once && self.fired.load(Ordering::Relaxed) {
            return len..len;
        }
        let granted = self.grant(len);
        if granted == len {
            return len..len;
        }
        if self.plan.once {
            if self.fired.swap(true, Ordering::Relaxed) {
                return len..len;
            }
            return granted..granted + 1;
        }
        granted..len
    }

    fn errno(&self) -> i32 {
        match self.plan.effect {
            FaultEffect::Errno(errno) => errno,
            // Only an errno plan fails pages; EIO if one ever asks.
            FaultEffect::Corrupt | FaultEffect::Delay { .. } => libc::EIO,
        }
    }

    fn injected(&self, page: u64) -> StoreError {
        StoreError::Injected {
            op: self.plan.op,
            page,
            source: std::io::Error::from_raw_os_error(self.errno()),
        }
    }

    /// Before the pages of a batch of `len` go to the inner store: waits for a delaying plan,
    /// and returns the positions an errno plan fails and a corrupting plan changes.
    fn before(&self, len: usize) -> std::ops::Range<usize> {
        let hit = self.affected(len);
        if let FaultEffect::Delay { ms } = self.plan.effect {
            if !hit.is_empty() {
                std::thread::sleep(Duration::from_millis(ms));
            }
        }
        hit
    }

    /// Applies the plan to a batch that was just read (the epoch's read-back): of the pages
    /// read, those past the budget fail, or come back with one byte changed.
    pub fn after_read(&self, batch: &mut [PageRead<'_>]) -> Result<(), StoreError> {
        let read = positions(batch.iter().map(|r| r.outcome == Outcome::Done));
        let hit = self.before(read.len());
        self.apply_to_reads(batch, &read[hit])
    }

    /// Applies the plan's effect to the pages of `batch` at `targets`.
    fn apply_to_reads(
        &self,
        batch: &mut [PageRead<'_>],
        targets: &[usize],
    ) -> Result<(), StoreError> {
        let mut first_error = None;
        for &i in targets {
            let read = &mut batch[i];
            match self.plan.effect {
                FaultEffect::Corrupt => {
                    if let Some(b) = read.buf.get_mut(CORRUPT_BYTE_OFFSET) {
                        *b ^= 0x5a;
                    }
                }
                FaultEffect::Errno(_) => {
                    read.outcome = Outcome::Failed(FailureKind::of_errno(Some(self.errno())));
                    first_error.get_or_insert_with(|| self.injected(read.page));
                }
                FaultEffect::Delay { .. } => {}
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// The positions at which `selected` is true.
fn positions(selected: impl Iterator<Item = bool>) -> Vec<usize> {
    selected
        .enumerate()
        .filter_map(|(i, yes)| yes.then_some(i))
        .collect()
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
    /// Passed on: what the inner store reads ahead is checked on the fetch like any read, and
    /// a fetch the injector changes simply does not match it.
    fn read_ahead(&self, pages: &[PageWant]) {
        self.inner.read_ahead(pages);
    }

    fn fetch(&self, batch: &mut [PageRead<'_>]) -> Result<(), StoreError> {
        if self.budget.plan.op != FaultOp::Fetch {
            return self.inner.fetch(batch);
        }
        // Only the pages still to be decided count against the budget.
        let pending = positions(batch.iter().map(|r| r.outcome == Outcome::Pending));
        let hit = self.budget.before(pending.len());
        let targets = &pending[hit];
        match self.budget.plan.effect {
            FaultEffect::Errno(_) => {
                // The failed pages are decided here; the inner store reads only the others.
                let injected = self.budget.apply_to_reads(batch, targets);
                let inner = self.inner.fetch(batch);
                injected.and(inner)
            }
            FaultEffect::Corrupt => {
                let inner = self.inner.fetch(batch);
                let read: Vec<usize> = targets
                    .iter()
                    .copied()
                    .filter(|&i| batch[i].outcome == Outcome::Done)
                    .collect();
                let _ = self.budget.apply_to_reads(batch, &read);
                inner
            }
            FaultEffect::Delay { .. } => self.inner.fetch(batch),
        }
    }

    fn store(&self, batch: &mut [PageWrite<'_>]) -> Result<(), StoreError> {
        if self.budget.plan.op != FaultOp::Store {
            return self.inner.store(batch);
        }
        let pending = positions(batch.iter().map(|w| w.outcome == Outcome::Pending));
        let hit = self.budget.before(pending.len());
        let mut first_error = None;
        if let FaultEffect::Errno(errno) = self.budget.plan.effect {
            for &i in &pending[hit] {
                let write = &mut batch[i];
                write.outcome = Outcome::Failed(FailureKind::of_errno(Some(errno)));
                first_error.get_or_insert_with(|| self.budget.injected(write.page));
            }
        }
        let inner = self.inner.store(batch);
        first_error.map_or(inner, Err)
    }

    fn discard(&self, first: u64, count: u64) -> Result<(), StoreError> {
        self.inner.discard(first, count)
    }

    fn at_exit(&self) {
        self.inner.at_exit();
    }

    fn report(&self) -> Vec<(String, String)> {
        self.inner.report()
    }

    fn wants_log_copy(&self) -> bool {
        self.inner.wants_log_copy()
    }

    fn log_copy_now(&self) -> bool {
        self.inner.log_copy_now()
    }

    fn log_stands_in(&self, log: std::sync::Arc<dyn crate::store::LogCopies>) {
        self.inner.log_stands_in(log)
    }

    fn fork_freeze(&self) -> bool {
        self.inner.fork_freeze()
    }

    fn fork_parent(&self, hup: Option<std::os::fd::OwnedFd>) {
        self.inner.fork_parent(hup)
    }

    /// The inner store's child, wrapped with the same plan (and a budget of its own).
    fn fork_child(&self) -> Result<Box<dyn PageStore>, StoreError> {
        Ok(Box::new(FaultyStore::new(
            self.inner.fork_child()?,
            self.budget.plan,
        )))
    }

    fn describe(&self) -> String {
        let plan = self.budget.plan;
        let once = if plan.once { " once" } else { "" };
        let what = match plan.effect {
            FaultEffect::Errno(errno) => format!("fails with errno {errno}"),
            FaultEffect::Corrupt => "pages come back changed".to_string(),
            FaultEffect::Delay { ms } => format!("waits {ms} ms"),
        };
        format!(
            "{} (faulty: {} {what}{once} after {} pages)",
            self.inner.describe(),
            op_name(plan.op),
            plan.after_pages
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records which pages reached it; every page it sees succeeds.
    #[derive(Default)]
    struct Recorder {
        fetched: Mutex<Vec<u64>>,
        stored: Mutex<Vec<u64>>,
    }

    impl PageStore for Recorder {
        fn fetch(&self, batch: &mut [PageRead<'_>]) -> Result<(), StoreError> {
            let mut fetched = self.fetched.lock().expect("test lock");
            for r in batch.iter_mut().filter(|r| r.outcome == Outcome::Pending) {
                fetched.push(r.page);
                r.outcome = Outcome::Done;
            }
            Ok(())
        }
        fn store(&self, batch: &mut [PageWrite<'_>]) -> Result<(), StoreError> {
            let mut stored = self.stored.lock().expect("test lock");
            for w in batch.iter_mut().filter(|w| w.outcome == Outcome::Pending) {
                stored.push(w.page);
                w.outcome = Outcome::Done;
            }
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
        pages.map(|page| PageWrite::new(page, buf, 1)).collect()
    }

    fn plan(op: FaultOp, after_pages: u64, effect: FaultEffect) -> FaultPlan {
        FaultPlan {
            op,
            after_pages,
            effect,
            once: false,
        }
    }

    #[test]
    fn store_fails_exactly_after_n_pages() {
        let store = FaultyStore::new(
            Recorder::default(),
            plan(FaultOp::Store, 10, FaultEffect::Errno(libc::ENOSPC)),
        );
        let buf = [0u8; 8];
        store.store(&mut writes(0..4, &buf)).expect("4 of 10");
        store.store(&mut writes(4..8, &buf)).expect("8 of 10");
        let mut crossing = writes(8..12, &buf);
        let err = store.store(&mut crossing).expect_err("crosses the budget");
        assert!(matches!(
            err,
            StoreError::Injected {
                op: FaultOp::Store,
                page: 10,
                ..
            }
        ));
        assert_eq!(err.errno(), Some(libc::ENOSPC));
        let outcomes: Vec<Outcome> = crossing.iter().map(|w| w.outcome).collect();
        let failed = Outcome::Failed(FailureKind::Transient);
        assert_eq!(outcomes, [Outcome::Done, Outcome::Done, failed, failed]);
        let err = store
            .store(&mut writes(20..21, &buf))
            .expect_err("after budget");
        assert!(matches!(err, StoreError::Injected { page: 20, .. }));
        // Exactly ten pages reached the inner store.
        let stored = store.inner().stored.lock().expect("test lock").clone();
        assert_eq!(stored, (0..10).collect::<Vec<_>>());
        // Fetches and discards are untouched.
        let mut buf2 = [0u8; 8];
        let mut reads = [PageRead::new(3, &mut buf2, 0, 1)];
        store.fetch(&mut reads).expect("fetch passes");
        store.discard(0, 100).expect("discard passes");
        assert!(store.describe().contains("store fails with errno"));
    }

    #[test]
    fn fetch_fails_from_the_first_call_when_budget_is_zero() {
        let store = FaultyStore::new(
            Recorder::default(),
            plan(FaultOp::Fetch, 0, FaultEffect::Errno(libc::EIO)),
        );
        let mut bufs = [[0u8; 8]; 2];
        let mut reads: Vec<PageRead<'_>> = bufs
            .iter_mut()
            .enumerate()
            .map(|(i, buf)| PageRead::new(7 + i as u64, buf, 0, 1))
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
        assert_eq!(err.kind(), FailureKind::Transient);
        assert!(store.inner().fetched.lock().expect("test lock").is_empty());
        store
            .store(&mut writes(0..3, &[0u8; 8]))
            .expect("stores pass when fetch is the planned op");
    }

    #[test]
    fn corrupt_plan_changes_pages_past_the_budget_and_fails_nothing() {
        let store = FaultyStore::new(
            Recorder::default(),
            plan(FaultOp::Fetch, 1, FaultEffect::Corrupt),
        );
        let mut bufs = [[7u8; 4096]; 3];
        let mut reads: Vec<PageRead<'_>> = bufs
            .iter_mut()
            .enumerate()
            .map(|(i, buf)| PageRead::new(i as u64, buf, 0, 1))
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

    /// `once`: the first page past the budget is affected, then the store works again.
    #[test]
    fn once_plans_affect_one_page() {
        let store = FaultyStore::new(
            Recorder::default(),
            FaultPlan {
                once: true,
                ..plan(FaultOp::Fetch, 2, FaultEffect::Corrupt)
            },
        );
        let mut bufs = [[7u8; 4096]; 5];
        let mut reads: Vec<PageRead<'_>> = bufs
            .iter_mut()
            .enumerate()
            .map(|(i, buf)| PageRead::new(i as u64, buf, 0, 1))
            .collect();
        store.fetch(&mut reads).expect("corrupting fails nothing");
        drop(reads);
        let changed: Vec<bool> = bufs.iter().map(|b| b != &[7u8; 4096]).collect();
        assert_eq!(changed, [false, false, true, false, false]);
        assert!(store.describe().contains("once"));

        let store = FaultyStore::new(
            Recorder::default(),
            FaultPlan {
                once: true,
                ..plan(FaultOp::Store, 0, FaultEffect::Errno(libc::EIO))
            },
        );
        let buf = [0u8; 8];
        let mut first = writes(0..3, &buf);
        let err = store.store(&mut first).expect_err("the first page fails");
        assert_eq!(err.page(), Some(0));
        assert_eq!(first[0].outcome, Outcome::Failed(FailureKind::Transient));
        assert!(first[1..].iter().all(|w| w.outcome.is_done()));
        store
            .store(&mut writes(0..3, &buf))
            .expect("then it works again");
    }

    /// Pages a layer above already decided are neither affected nor counted.
    #[test]
    fn decided_pages_are_left_alone_and_not_counted() {
        let store = FaultyStore::new(
            Recorder::default(),
            plan(FaultOp::Fetch, 1, FaultEffect::Errno(libc::EIO)),
        );
        let mut bufs = [[0u8; 8]; 3];
        let mut reads: Vec<PageRead<'_>> = bufs
            .iter_mut()
            .enumerate()
            .map(|(i, buf)| PageRead::new(i as u64, buf, 0, 1))
            .collect();
        reads[0].outcome = Outcome::Failed(FailureKind::Refused);
        let err = store
            .fetch(&mut reads)
            .expect_err("the second pending page fails");
        assert_eq!(err.page(), Some(2));
        let outcomes: Vec<Outcome> = reads.iter().map(|r| r.outcome).collect();
        assert_eq!(
            outcomes,
            [
                Outcome::Failed(FailureKind::Refused),
                Outcome::Done,
                Outcome::Failed(FailureKind::Transient)
            ]
        );
        assert_eq!(*store.inner().fetched.lock().expect("test lock"), [1]);
    }

    #[test]
    fn delay_plans_wait_and_then_pass() {
        let store = FaultyStore::new(
            Recorder::default(),
            plan(FaultOp::Fetch, 1, FaultEffect::Delay { ms: 30 }),
        );
        let mut bufs = [[0u8; 8]; 2];
        let mut reads: Vec<PageRead<'_>> = bufs
            .iter_mut()
            .enumerate()
            .map(|(i, buf)| PageRead::new(i as u64, buf, 0, 1))
            .collect();
        let start = std::time::Instant::now();
        store.fetch(&mut reads).expect("a delay fails nothing");
        assert!(
            start.elapsed() >= Duration::from_millis(30),
            "the call waited its delay"
        );
        assert!(reads.iter().all(|r| r.outcome.is_done()));
        assert!(store.describe().contains("waits 30 ms"));
    }

    #[test]
    fn budget_is_exact_across_threads() {
        let store = FaultyStore::new(
            Recorder::default(),
            plan(FaultOp::Store, 1000, FaultEffect::Errno(libc::EIO)),
        );
        let buf = [0u8; 8];
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let store = &store;
                let buf = &buf;
                s.spawn(move || {
                    for i in 0..100u64 {
                        let first = (t * 100 + i) * 7;
                        let _ = store.store(&mut writes(first..first + 7, buf));
                    }
                });
            }
        });
        assert_eq!(store.inner().stored.lock().expect("test lock").len(), 1000);
    }

    #[test]
    fn open_wraps_the_file_store_when_a_plan_is_given() {
        let dir = std::env::temp_dir();
        let plan = plan(FaultOp::Fetch, 1, FaultEffect::Errno(libc::EIO));
        let spec = crate::config::BackendSpec::File { dir: dir.clone() };
        let store = crate::store::open(
            &spec,
            &Default::default(),
            16 * crate::PAGE_SIZE as u64,
            Some(&plan),
            None,
        )
        .expect("opening a faulty file store");
        assert!(store.describe().starts_with("file:"));
        assert!(store
            .describe()
            .contains("faulty: fetch fails with errno 5 after 1 pages"));
        let plain = crate::store::open(
            &spec,
            &Default::default(),
            16 * crate::PAGE_SIZE as u64,
            None,
            None,
        )
        .expect("opening a plain file store");
        assert!(!plain.describe().contains("faulty"));
    }
}
