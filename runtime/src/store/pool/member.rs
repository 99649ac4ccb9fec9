//! [`Member`]: what the pool needs of one server beyond [`PageStore`]: its name, how it is
//! (`stats`), deleting values, dropping its connections, and for an erasure-coded pool the
//! parity values ([`crate::store::parity`]) read and written in the same pipeline as pages.
//! [`MemcachedServer`] is the real one; the tests also run the pool over in-memory members
//! that fail, lose or damage pages and parity on demand.

use std::sync::atomic::Ordering::Relaxed;

use crate::store::memcached::gc::DumpLimits;
use crate::store::memcached::lease::Renewal;
use crate::store::memcached::{MemcachedServer, ServerInfo};
use crate::store::parity::{ParityKey, ParityRead, ParityWrite};
use crate::store::{FailureKind, Outcome, PageRead, PageStore, PageWrite, StoreError, StoreOp};

/// The error of a member asked for parity it does not store.
fn no_parity(server: &str, op: StoreOp, stripe: u64) -> StoreError {
    StoreError::Io {
        backend: server.to_owned(),
        op,
        page: stripe,
        kind: FailureKind::Refused,
        source: "this member stores no parity values".into(),
    }
}

/// One server of the pool.
pub trait Member: PageStore {
    /// `HOST:PORT`.
    fn server(&self) -> &str;
    /// Asks the server how it is; an error when it does not answer.
    fn info(&self) -> Result<ServerInfo, StoreError>;
    /// Deletes the values of `pages` (best effort).
    fn delete(&self, pages: &[u64]) -> Result<(), StoreError>;
    /// Drops idle connections (after the server was down).
    fn reconnect(&self);
    /// Bytes sent to and received from the server.
    fn wire_bytes(&self) -> (u64, u64);
    /// Pipelines sent ahead of their fetch, and those a fetch read.
    fn read_ahead_counts(&self) -> (u64, u64) {
        (0, 0)
    }
    /// Values fetched that did not open, and pages that could not be sealed (a pool with a
    /// key, `LEGO_KEY_FILE`).
    fn seal_failures(&self) -> u64 {
        0
    }
    /// Whether the values sent to this server are sealed.
    fn is_sealed(&self) -> bool {
        false
    }
    /// Whether `e` (from this member) says the server is full: not a failure of the
    /// server, which stays up and keeps serving what it holds.
    fn is_full(&self, _e: &StoreError) -> bool {
        false
    }
    /// Renews this heap's lease on the server: `Ok(true)` when the lease had lapsed (and a
    /// collection may have deleted the heap's pages there), `Ok(false)` when it was extended.
    fn renew_lease(&self) -> Result<bool, String> {
        Ok(false)
    }
    /// Frees the pages of heaps whose lease is gone (dead processes), never this heap's.
    fn collect_orphans(&self) -> Option<String> {
        None
    }
    /// Sets the lease of a heap seeded from a log: it never lapses and says the heap waits
    /// for its restore (`lego replay --to`).
    fn seed_lease(&self) -> Result<(), String> {
        Ok(())
    }
    /// Takes over a seeded heap's lease for this process (a restore from a pool image).
    fn take_over_lease(&self) -> Result<(), String> {
        Ok(())
    }
    /// Reads `pages` and `parity` in one pipeline, so that a degraded read stays one round
    /// per server; each gets its outcome (a parity value whose cover differs is an old copy:
    /// `Failed(Lost)`). The default reads the pages and refuses parity.
    fn exchange(
        &self,
        pages: &mut [PageRead<'_>],
        parity: &mut [ParityRead<'_>],
    ) -> Result<(), StoreError> {
        let result = if pages.is_empty() {
            Ok(())
        } else {
            self.fetch(pages)
        };
        if parity.is_empty() {
            return result;
        }
        for r in parity.iter_mut() {
            r.outcome = Outcome::Failed(FailureKind::Refused);
        }
        Err(no_parity(
            self.server(),
            StoreOp::Fetch,
            parity[0].key.stripe,
        ))
    }
    /// Writes `pages` and `parity` in one pipeline. The default writes the pages and refuses
    /// parity.
    fn store_with_parity(
        &self,
        pages: &mut [PageWrite<'_>],
        parity: &mut [ParityWrite<'_>],
    ) -> Result<(), StoreError> {
        let result = if pages.is_empty() {
            Ok(())
        } else {
            self.store(pages)
        };
        if parity.is_empty() {
            return result;
        }
        for w in parity.iter_mut() {
            w.outcome = Outcome::Failed(FailureKind::Refused);
        }
        Err(no_parity(
            self.server(),
            StoreOp::Store,
            parity[0].key.stripe,
        ))
    }
    /// Deletes parity values (best effort). The default refuses.
    fn delete_parity(&self, keys: &[ParityKey]) -> Result<(), StoreError> {
        match keys.first() {
            None => Ok(()),
            Some(k) => Err(no_parity(self.server(), StoreOp::Discard, k.stripe)),
        }
    }
    /// Pipelines sent to the server (each fetch, store or exchange is one per
    /// [`crate::store::memcached::PIPELINE_REQUESTS_MAX`] requests).
    fn pipelines(&self) -> u64 {
        0
    }
}

impl Member for MemcachedServer {
    fn server(&self) -> &str {
        MemcachedServer::server(self)
    }

    fn info(&self) -> Result<ServerInfo, StoreError> {
        MemcachedServer::info(self)
    }

    fn delete(&self, pages: &[u64]) -> Result<(), StoreError> {
        MemcachedServer::delete(self, pages)
    }

    fn reconnect(&self) {
        MemcachedServer::reconnect(self);
    }

    fn wire_bytes(&self) -> (u64, u64) {
        (
            self.traffic.bytes_sent.load(Relaxed),
            self.traffic.bytes_received.load(Relaxed),
        )
    }

    fn read_ahead_counts(&self) -> (u64, u64) {
        (
            self.traffic.ahead_sent.load(Relaxed),
            self.traffic.ahead_used.load(Relaxed),
        )
    }

    fn seal_failures(&self) -> u64 {
        self.traffic.seal_failures.load(Relaxed)
    }

    fn is_sealed(&self) -> bool {
        MemcachedServer::is_sealed(self)
    }

    fn is_full(&self, e: &StoreError) -> bool {
        // memcached started with -M: "SERVER_ERROR out of memory storing object".
        crate::logging::error_chain(e).contains("out of memory")
    }

    fn renew_lease(&self) -> Result<bool, String> {
        match MemcachedServer::renew_lease(self) {
            Ok(renewal) => Ok(renewal == Renewal::Started),
            Err(e) => Err(crate::logging::error_chain(&e)),
        }
    }

    fn seed_lease(&self) -> Result<(), String> {
        MemcachedServer::seed_lease(self).map_err(|e| crate::logging::error_chain(&e))
    }

    fn take_over_lease(&self) -> Result<(), String> {
        MemcachedServer::take_over_lease(self).map_err(|e| crate::logging::error_chain(&e))
    }

    fn exchange(
        &self,
        pages: &mut [PageRead<'_>],
        parity: &mut [ParityRead<'_>],
    ) -> Result<(), StoreError> {
        MemcachedServer::exchange(self, pages, parity)
    }

    fn store_with_parity(
        &self,
        pages: &mut [PageWrite<'_>],
        parity: &mut [ParityWrite<'_>],
    ) -> Result<(), StoreError> {
        MemcachedServer::store_with_parity(self, pages, parity)
    }

    fn delete_parity(&self, keys: &[ParityKey]) -> Result<(), StoreError> {
        MemcachedServer::delete_parity(self, keys)
    }

    fn pipelines(&self) -> u64 {
        self.traffic.pipelines.load(Relaxed)
    }

    fn collect_orphans(&self) -> Option<String> {
        match MemcachedServer::collect_orphans(self, &DumpLimits::IN_PROCESS) {
            Ok(r) if r.heaps_collected > 0 => Some(format!(
                "freed {} pages ({} bytes) of {} heaps whose process is gone",
                r.keys_deleted, r.bytes_freed, r.heaps_collected
            )),
            Ok(_) => None,
            Err(e) => Some(format!(
                "collecting dead heaps' pages failed: {}",
                crate::logging::error_chain(&e)
            )),
        }
    }
}

#[cfg(test)]
pub(crate) mod test_member {
    //! An in-memory member whose failures a test switches on and off.
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
    use std::sync::Mutex;

    use super::*;
    use crate::store::memory::MemoryStore;
    use crate::store::parity;

    pub(crate) struct TestMember {
        name: String,
        heap_bytes: u64,
        store: Mutex<MemoryStore>,
        /// Every request fails (a dead server).
        pub(crate) down: AtomicBool,
        /// Fetches hand back a flipped bit.
        pub(crate) corrupt: AtomicBool,
        pid: AtomicU64,
        pub(crate) fetches: AtomicU64,
        /// Parity values as the server would hold them (encoded), by (stripe, slot).
        parity: Mutex<HashMap<(u64, u8), Vec<u8>>>,
        /// Parity writes fail (pages are still written).
        pub(crate) fail_parity_writes: AtomicBool,
        /// Page writes fail (parity is still written).
        pub(crate) fail_page_writes: AtomicBool,
        /// Calls that would be one pipeline each on a real server.
        pub(crate) pipelines: AtomicU64,
    }

    impl TestMember {
        pub(crate) fn new(name: &str, heap_bytes: u64) -> TestMember {
            TestMember {
                name: name.to_owned(),
                heap_bytes,
                store: Mutex::new(MemoryStore::new(heap_bytes)),
                down: AtomicBool::new(false),
                corrupt: AtomicBool::new(false),
                pid: AtomicU64::new(1),
                fetches: AtomicU64::new(0),
                parity: Mutex::new(HashMap::new()),
                fail_parity_writes: AtomicBool::new(false),
                fail_page_writes: AtomicBool::new(false),
                pipelines: AtomicU64::new(0),
            }
        }

        /// Restarts the server empty (another pid).
        pub(crate) fn restart_empty(&self) {
            *self.store.lock().unwrap() = MemoryStore::new(self.heap_bytes);
            self.parity.lock().unwrap().clear();
            self.pid.fetch_add(1, Relaxed);
        }

        /// Parity values held.
        pub(crate) fn parity_values(&self) -> usize {
            self.parity.lock().unwrap().len()
        }

        /// Puts back an older parity value (a late write, or one left from before).
        pub(crate) fn parity_value(&self, stripe: u64, slot: u8) -> Option<Vec<u8>> {
            self.parity.lock().unwrap().get(&(stripe, slot)).cloned()
        }

        pub(crate) fn put_parity_value(&self, stripe: u64, slot: u8, value: Vec<u8>) {
            self.parity.lock().unwrap().insert((stripe, slot), value);
        }

        fn fetch_pages(&self, batch: &mut [PageRead<'_>]) -> Result<(), StoreError> {
            if self.corrupt.load(Relaxed) {
                // What a server with a flipped bit would hand back: the member's own check
                // (as MemcachedServer's) finds it.
                let result = self.store.lock().unwrap().fetch(batch);
                for r in batch.iter_mut() {
                    if r.outcome == Outcome::Done {
                        r.buf[7] ^= 1;
                        r.outcome = Outcome::Failed(FailureKind::Lost);
                    }
                }
                return result.and(Err(StoreError::Mismatch {
                    backend: self.name.clone(),
                    page: batch.first().map_or(0, |r| r.page),
                    found: 0,
                    expected: 1,
                    version: 0,
                }));
            }
            self.store.lock().unwrap().fetch(batch)
        }

        fn gone(&self, page: u64) -> StoreError {
            StoreError::Io {
                backend: self.name.clone(),
                op: crate::store::StoreOp::Fetch,
                page,
                kind: FailureKind::Transient,
                source: "the test server is down".into(),
            }
        }
    }

    impl PageStore for TestMember {
        fn fetch(&self, batch: &mut [PageRead<'_>]) -> Result<(), StoreError> {
            self.fetches.fetch_add(1, Relaxed);
            self.pipelines.fetch_add(1, Relaxed);
            if self.down.load(Relaxed) {
                for r in batch.iter_mut().filter(|r| r.outcome == Outcome::Pending) {
                    r.outcome = Outcome::Failed(FailureKind::Transient);
                }
                return Err(self.gone(batch.first().map_or(0, |r| r.page)));
            }
            self.fetch_pages(batch)
        }

        fn store(&self, batch: &mut [PageWrite<'_>]) -> Result<(), StoreError> {
            self.pipelines.fetch_add(1, Relaxed);
            if self.down.load(Relaxed) || self.fail_page_writes.load(Relaxed) {
                for w in batch.iter_mut().filter(|w| w.outcome == Outcome::Pending) {
                    w.outcome = Outcome::Failed(FailureKind::Transient);
                }
                return Err(self.gone(batch.first().map_or(0, |w| w.page)));
            }
            self.store.lock().unwrap().store(batch)
        }

        fn discard(&self, first: u64, count: u64) -> Result<(), StoreError> {
            if self.down.load(Relaxed) {
                return Err(self.gone(first));
            }
            self.store.lock().unwrap().discard(first, count)
        }

        fn describe(&self) -> String {
            self.name.clone()
        }
    }

    impl Member for TestMember {
        fn server(&self) -> &str {
            &self.name
        }

        fn info(&self) -> Result<ServerInfo, StoreError> {
            if self.down.load(Relaxed) {
                return Err(self.gone(0));
            }
            Ok(ServerInfo {
                pid: self.pid.load(Relaxed),
                uptime_s: 1,
                limit_bytes: 64 << 20,
                used_bytes: 0,
                version: "test".into(),
            })
        }

        fn delete(&self, pages: &[u64]) -> Result<(), StoreError> {
            for &p in pages {
                self.discard(p, 1)?;
            }
            Ok(())
        }

        fn reconnect(&self) {}

        fn wire_bytes(&self) -> (u64, u64) {
            (0, 0)
        }

        fn pipelines(&self) -> u64 {
            self.pipelines.load(Relaxed)
        }

        fn exchange(
            &self,
            pages: &mut [PageRead<'_>],
            parity: &mut [ParityRead<'_>],
        ) -> Result<(), StoreError> {
            self.pipelines.fetch_add(1, Relaxed);
            if !pages.is_empty() {
                self.fetches.fetch_add(1, Relaxed);
            }
            if self.down.load(Relaxed) {
                for r in pages.iter_mut().filter(|r| r.outcome == Outcome::Pending) {
                    r.outcome = Outcome::Failed(FailureKind::Transient);
                }
                for r in parity.iter_mut() {
                    r.outcome = Outcome::Failed(FailureKind::Transient);
                }
                return Err(self.gone(0));
            }
            let mut result = if pages.is_empty() {
                Ok(())
            } else {
                self.fetch_pages(pages)
            };
            let held = self.parity.lock().unwrap();
            let corrupt = self.corrupt.load(Relaxed);
            for r in parity.iter_mut() {
                let value = held.get(&(r.key.stripe, r.key.slot)).map(|v| {
                    let mut v = v.clone();
                    if corrupt {
                        let last = v.len() - 1;
                        v[last] ^= 1;
                    }
                    v
                });
                r.outcome = match value.map(|v| parity::decode(&v, r)) {
                    Some(Ok(())) => Outcome::Done,
                    _ => {
                        if result.is_ok() {
                            result = Err(StoreError::Io {
                                backend: self.name.clone(),
                                op: StoreOp::Fetch,
                                page: r.key.stripe,
                                kind: FailureKind::Lost,
                                source: "the parity value is missing, old or damaged".into(),
                            });
                        }
                        Outcome::Failed(FailureKind::Lost)
                    }
                };
            }
            result
        }

        fn store_with_parity(
            &self,
            pages: &mut [PageWrite<'_>],
            parity: &mut [ParityWrite<'_>],
        ) -> Result<(), StoreError> {
            // One pipeline: counted once, by the pages' store or here.
            let mut result = if pages.is_empty() {
                self.pipelines.fetch_add(1, Relaxed);
                Ok(())
            } else {
                self.store(pages)
            };
            let failing = self.down.load(Relaxed) || self.fail_parity_writes.load(Relaxed);
            let mut held = self.parity.lock().unwrap();
            for w in parity.iter_mut() {
                if failing {
                    w.outcome = Outcome::Failed(FailureKind::Transient);
                    if result.is_ok() {
                        result = Err(self.gone(w.key.stripe));
                    }
                    continue;
                }
                let mut value = Vec::new();
                parity::encode(w, &mut value);
                held.insert((w.key.stripe, w.key.slot), value);
                w.outcome = Outcome::Done;
            }
            result
        }

        fn delete_parity(&self, keys: &[ParityKey]) -> Result<(), StoreError> {
            if self.down.load(Relaxed) {
                return Err(self.gone(0));
            }
            let mut held = self.parity.lock().unwrap();
            for k in keys {
                held.remove(&(k.stripe, k.slot));
            }
            Ok(())
        }
    }
}
