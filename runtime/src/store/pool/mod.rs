//! [`PoolStore`]: a heap's pages on a pool of servers, sharded and replicated, failing over to
//! other copies, never serving a wrong one. `LEGO_BACKEND=memcached://A,B,C` with
//! `LEGO_REPLICAS=N` and `LEGO_REPLICATION=MODE`.
//!
//! - Placement ([`placement`]): groups of 16 pages are placed by rendezvous hashing; a group's
//!   copies go to the first N servers of its ranking that are up. The server list is fixed
//!   for a run (a restart with another list re-seeds from the log: `lego replay --to`).
//! - What the pool knows ([`records`]): for each page the checksum and version of its newest
//!   stored copy, and which servers hold that version. A fetch reads from a holder in ranking
//!   order; a copy that is missing, old or damaged (the member checks checksum and version) is
//!   dropped from the holders and the next holder is tried; a page no holder could give is
//!   `Transient` while a holder is down (it may come back), `Lost` when every holder answered
//!   without it.
//! - Replication: `pessimistic` writes every copy before a write-back completes;
//!   `optimistic` writes the first copy and queues the others ([`queue`]) for the pool's thread;
//!   `adaptive` is pessimistic while the pool's free memory is above `LEGO_ADAPTIVE_FREE` and
//!   optimistic below it. A write that a server refuses goes to the next server of the
//!   ranking, so a page gets its copies while enough servers are up.
//! - Failover and repair ([`health`], [`upkeep`]): a server failing 3 times in a row is marked
//!   down and probed with backoff; the pool's thread (`lego-pool`) writes the queued copies,
//!   probes, watches free memory, and re-replicates pages that have fewer than N copies on up
//!   servers (after a server went down, or came back empty) from a surviving copy.
//! - Ordering: writes of the same page by write-backs, discards and repair are serialised by
//!   stripe locks (by group); the pool's thread writes queued copies without them, and a
//!   writer of a page it is writing waits for it ([`queue`]). So an older copy never lands
//!   after a newer one on a server.
//!
//! Rules: the records' lock is never held across I/O; stripe locks are taken in index order
//! and before the records' lock.

mod coded;
pub mod coding;
pub mod health;
pub mod member;
pub mod placement;
pub mod queue;
pub mod records;
mod upkeep;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

use self::health::Health;
use self::member::Member;
use self::placement::Placement;
use self::queue::ReplicaQueue;
use self::records::Records;
use super::{
    discard_range, refuse_bad_reads, refuse_bad_writes, FailureKind, LogCopies, Outcome, PageRead,
    PageStore, PageWant, PageWrite, StoreError, StoreOp, PAGE_BYTES,
};
use crate::config::{PoolSettings, Replication};
use crate::logging::{error_chain, RateLimit};

static POOL_FULL: RateLimit = RateLimit::new(3);

/// Stripe locks that order writes of the same pages.
const STRIPES: usize = 64;
/// Queued copies a write-back takes along, per page of its own, at most (more than one, so
/// that write-backs also drain a queue that has grown).
const QUEUED_RIDERS_PER_PAGE: usize = 2;

/// Counters of the pool, for the stats.
#[derive(Default)]
struct Counters {
    /// Pages served by a copy other than the first one tried.
    failovers: AtomicU64,
    /// Copies written by repair (a page back to N copies).
    rereplicated: AtomicU64,
    /// Switches of adaptive replication.
    mode_switches: AtomicU64,
    /// Copies found missing, old or damaged on a server.
    bad_copies: AtomicU64,
    /// Pages served from the replica queue.
    queue_reads: AtomicU64,
    /// Servers found restarted (empty).
    restarts: AtomicU64,
    /// Pages stored with one copy because the log held them (adaptive, memory scarce).
    log_copies: AtomicU64,
}

/// Per-server page counters.
#[derive(Default)]
struct ServerCounters {
    fetched: AtomicU64,
    stored: AtomicU64,
    /// Write-backs it refused because it was full.
    full: AtomicU64,
    /// Requests (fetch or store batches) sent to it, and the time they took, in
    /// microseconds: their ratio is its latency.
    requests: AtomicU64,
    busy_us: AtomicU64,
}

impl ServerCounters {
    /// Counts one request that started at `start`.
    fn timed(&self, start: std::time::Instant) {
        self.requests.fetch_add(1, Relaxed);
        let us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.busy_us.fetch_add(us, Relaxed);
    }
}

struct Inner {
    /// Erasure coding instead of copies (`LEGO_REDUNDANCY=rs:K+M`, [`coded`]).
    code: Option<coded::Coded>,
    members: Vec<Box<dyn Member>>,
    health: Vec<Health>,
    served: Vec<ServerCounters>,
    placement: Placement,
    records: Records,
    queue: ReplicaQueue,
    stripes: Vec<Mutex<()>>,
    settings: PoolSettings,
    /// Current mode of adaptive replication (fixed for the other two): memory is scarce.
    optimistic: AtomicBool,
    /// With adaptive replication and a log: what the log holds. While memory is scarce, a
    /// page the log holds gets one copy in the pool (the log stands in for the others).
    log: OnceLock<Arc<dyn LogCopies>>,
    counters: Counters,
    /// Some page may have fewer copies than it should.
    repair_needed: AtomicBool,
    /// Wakes the pool's thread (queued copies, a server down).
    wake: (Mutex<bool>, Condvar),
    /// The store is gone: the pool's thread ends (tests make many pools; the preload's
    /// lives as long as the process).
    stop: AtomicBool,
    /// Held while leases are renewed or released, so that none is renewed after exit
    /// released it.
    leases: Mutex<()>,
    /// The pool's thread renews the heap's leases: false for a restore until it takes the
    /// leases over (its claim has no time to live, and must keep none while the start may
    /// still give the heap back).
    renewing: AtomicBool,
    name: String,
    pages: u64,
}

/// A heap's pages on a pool of servers.
pub struct PoolStore {
    inner: Arc<Inner>,
}

impl PoolStore {
    /// A pool over `members` (each a server already open), for a heap of `heap_bytes`, with
    /// its thread started. `name` names the pool in errors (`memcached://A,B`).
    pub fn new(
        name: String,
        members: Vec<Box<dyn Member>>,
        heap_bytes: u64,
        settings: PoolSettings,
    ) -> Result<PoolStore, StoreError> {
        PoolStore::new_with(name, members, heap_bytes, settings, true)
    }

    /// [`PoolStore::new`] for a restore: the pool's thread renews no lease until
    /// [`PoolStore::take_over_leases`].
    pub fn new_restoring(
        name: String,
        members: Vec<Box<dyn Member>>,
        heap_bytes: u64,
        settings: PoolSettings,
    ) -> Result<PoolStore, StoreError> {
        PoolStore::new_with(name, members, heap_bytes, settings, false)
    }

    fn new_with(
        name: String,
        members: Vec<Box<dyn Member>>,
        heap_bytes: u64,
        settings: PoolSettings,
        renewing: bool,
    ) -> Result<PoolStore, StoreError> {
        assert!(
            settings.replicas >= 1 && settings.replicas <= members.len(),
            "the configuration checks the copies against the servers"
        );
        let pages = heap_bytes.div_ceil(PAGE_BYTES);
        let names: Vec<String> = members.iter().map(|m| m.server().to_owned()).collect();
        if let Some(shape) = settings.code {
            assert!(
                shape.data + shape.parity <= members.len(),
                "the configuration checks a stripe's values against the servers"
            );
        }
        let stripe_pages = settings.code.map_or(0, |c| c.data as u64);
        let records = Records::with_stripes(pages, stripe_pages).map_err(|e| StoreError::Open {
            backend: name.clone(),
            what: "reserving the pool's page records".into(),
            source: Box::new(e),
        })?;
        let health: Vec<Health> = members.iter().map(|_| Health::default()).collect();
        for (member, h) in members.iter().zip(&health) {
            if let Ok(info) = member.info() {
                h.answered(info.pid, info.uptime_s);
            }
        }
        let inner = Arc::new(Inner {
            code: settings.code.map(coded::Coded::new),
            served: members.iter().map(|_| ServerCounters::default()).collect(),
            members,
            health,
            placement: Placement::new(&names),
            records,
            queue: ReplicaQueue::default(),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            settings,
            optimistic: AtomicBool::new(settings.replication == Replication::Optimistic),
            log: OnceLock::new(),
            counters: Counters::default(),
            repair_needed: AtomicBool::new(false),
            wake: (Mutex::new(false), Condvar::new()),
            stop: AtomicBool::new(false),
            leases: Mutex::new(()),
            renewing: AtomicBool::new(renewing),
            name,
            pages,
        });
        // Always: it renews the leases that keep other processes' collections off this heap.
        upkeep::start(Arc::clone(&inner)).map_err(|e| StoreError::Open {
            backend: inner.name.clone(),
            what: "starting the pool's thread lego-pool".into(),
            source: Box::new(e),
        })?;
        log::info!("page store: {}", PoolStore::describe_inner(&inner));
        Ok(PoolStore { inner })
    }

    fn describe_inner(inner: &Inner) -> String {
        if let Some(code) = inner.settings.code {
            return format!(
                "{} ({} servers, rs:{}+{}: stripes of {} pages with {} parity, pessimistic)",
                inner.name,
                inner.members.len(),
                code.data,
                code.parity,
                code.data,
                code.parity
            );
        }
        let mode = match inner.settings.replication {
            Replication::Adaptive if inner.log_covers_now() => "adaptive, one copy and the log now",
            Replication::Adaptive if inner.optimistic.load(Relaxed) => "adaptive, optimistic now",
            Replication::Adaptive => "adaptive, pessimistic now",
            other => other.name(),
        };
        format!(
            "{} ({} servers, {} {}, {mode})",
            inner.name,
            inner.members.len(),
            inner.settings.replicas,
            if inner.settings.replicas == 1 {
                "copy"
            } else {
                "copies"
            },
        )
    }
}

/// Seeding a pool from a log (`lego replay --to`) and restoring a heap from it (`LEGO_RESTORE`
/// of a pool image): the pool's side.
impl PoolStore {
    /// What the pool knows of `page`'s newest copy (its checksum, version and holders).
    pub fn stored_copy(&self, page: u64) -> records::Copy {
        self.inner.records.lock().get(page)
    }

    /// The servers, `HOST:PORT`, in the order the holder bits count them.
    pub fn servers(&self) -> Vec<String> {
        self.inner
            .members
            .iter()
            .map(|m| m.server().to_owned())
            .collect()
    }

    /// Takes the copies a pool image lists as this heap's (a restore): each page's checksum,
    /// version and holders. Pages outside the heap are refused. The pool's thread then checks
    /// the copies' count as after a server came back.
    pub fn adopt(
        &self,
        pages: impl IntoIterator<Item = (u64, records::Copy)>,
    ) -> Result<u64, StoreError> {
        let inner = &*self.inner;
        let all = if inner.members.len() >= 64 {
            u64::MAX
        } else {
            (1u64 << inner.members.len()) - 1
        };
        let mut adopted = 0;
        let mut records = inner.records.lock();
        for (page, copy) in pages {
            if page >= inner.pages || copy.version == 0 || copy.holders & !all != 0 {
                return Err(inner.pool_error(
                    StoreOp::Fetch,
                    page,
                    FailureKind::Refused,
                    format!(
                        "the pool image's copy (version {}, holders {:#x}) does not fit this \
                         pool of {} servers and {} pages",
                        copy.version,
                        copy.holders,
                        inner.members.len(),
                        inner.pages
                    ),
                ));
            }
            records.set(page, copy.crc, copy.version, copy.holders);
            adopted += 1;
        }
        drop(records);
        inner.repair_needed.store(true, Relaxed);
        inner.wake_thread();
        Ok(adopted)
    }

    /// Ends a seeding: stops the pool's thread (no renewal after this) and sets the heap's
    /// lease on every server to a seeded one, without a time to live, so that no collection
    /// frees the heap before it is restored.
    pub fn seal_as_seeded(&self) -> Result<(), StoreError> {
        let inner = &*self.inner;
        inner.stop.store(true, Relaxed);
        inner.wake_thread();
        // Held so that a renewal under way ends first; none starts after `stop`.
        let _leases = inner.leases.lock().unwrap_or_else(|e| e.into_inner());
        for (s, m) in inner.members.iter().enumerate() {
            m.seed_lease().map_err(|why| {
                inner.pool_error(
                    StoreOp::Store,
                    0,
                    FailureKind::Transient,
                    format!(
                        "setting the seeded heap's lease on {} failed: {why}",
                        inner.members[s].server()
                    ),
                )
            })?;
        }
        Ok(())
    }

    /// Ends a restore's start: the claimed heap's lease becomes this process's on every
    /// server (renewed and released as any running heap's from now on). On an error the
    /// leases are not renewed; the caller gives the heap back.
    pub fn take_over_leases(&self) -> Result<(), StoreError> {
        let inner = &*self.inner;
        let _leases = inner.leases.lock().unwrap_or_else(|e| e.into_inner());
        if inner.stop.load(Relaxed) {
            return Err(inner.pool_error(
                StoreOp::Fetch,
                0,
                FailureKind::Refused,
                "the heap was given back to the pool already".into(),
            ));
        }
        for m in &inner.members {
            m.take_over_lease().map_err(|why| {
                inner.pool_error(
                    StoreOp::Fetch,
                    0,
                    FailureKind::Transient,
                    format!(
                        "taking over the heap's lease on {} failed: {why}",
                        m.server()
                    ),
                )
            })?;
        }
        inner.renewing.store(true, Relaxed);
        Ok(())
    }

    /// Stops the pool's thread and its renewals (a restore gives the heap back): once this
    /// returns, no renewal is under way and none starts.
    pub fn stop_renewals(&self) {
        let inner = &*self.inner;
        inner.stop.store(true, Relaxed);
        inner.wake_thread();
        let _leases = inner.leases.lock().unwrap_or_else(|e| e.into_inner());
        inner.renewing.store(false, Relaxed);
    }
}

impl Drop for PoolStore {
    fn drop(&mut self) {
        self.inner.stop.store(true, Relaxed);
        self.inner.wake_thread();
    }
}

impl Inner {
    /// Locks the stripes of `pages`, in index order.
    fn lock_stripes(&self, pages: impl Iterator<Item = u64>) -> Vec<MutexGuard<'_, ()>> {
        let mut wanted = [false; STRIPES];
        for page in pages {
            wanted[(Placement::group(page) % STRIPES as u64) as usize] = true;
        }
        wanted
            .iter()
            .enumerate()
            .filter(|(_, &w)| w)
            .map(|(i, _)| self.stripes[i].lock().unwrap_or_else(|e| e.into_inner()))
            .collect()
    }

    /// The log, while it stands in for the other copies of the pages it holds: adaptive
    /// replication with a log, memory scarce.
    fn log_covers_now(&self) -> bool {
        self.log_now().is_some()
    }

    fn log_now(&self) -> Option<&dyn LogCopies> {
        let scarce = self.settings.replication == Replication::Adaptive
            && self.settings.replicas > 1
            && self.optimistic.load(Relaxed);
        self.log.get().filter(|_| scarce).map(|l| &**l)
    }

    fn up_mask(&self) -> u64 {
        self.health
            .iter()
            .enumerate()
            .filter(|(_, h)| h.is_up())
            .fold(0, |m, (i, _)| m | 1 << i)
    }

    /// A member's request failed as a whole: counts it, and wakes the thread when it marks
    /// the server down.
    fn member_failed(&self, server: usize, e: &StoreError) {
        if self.health[server].failed() {
            log::warn!(
                "pool server {} is down: {}",
                self.members[server].server(),
                error_chain(e)
            );
            self.repair_needed.store(true, Relaxed);
            self.wake_thread();
        }
    }

    fn wake_thread(&self) {
        let (flag, cv) = &self.wake;
        *flag.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_one();
    }

    fn pool_error(&self, op: StoreOp, page: u64, kind: FailureKind, why: String) -> StoreError {
        StoreError::Io {
            backend: self.name.clone(),
            op,
            page,
            kind,
            source: why.into(),
        }
    }

    /// The first server of `page`'s ranking among `candidates` (a bit each).
    fn next_holder(&self, page: u64, candidates: u64) -> Option<usize> {
        // One candidate (one copy, or one server left) is first whatever the ranking.
        match candidates.count_ones() {
            0 => return None,
            1 => return Some(candidates.trailing_zeros() as usize),
            _ => {}
        }
        self.placement
            .ranking(page)
            .servers()
            .iter()
            .find(|&&s| candidates & (1 << s) != 0)
            .map(|&s| usize::from(s))
    }

    /// Sends each server the gets that the first round of [`Inner::fetch`] of `pages` will
    /// ask it for (the same choice of holders, from the same records), so that the fetch
    /// only reads the replies. Pages the fetch serves without a server (never stored, in the
    /// queue, another version) are left out.
    fn read_ahead(&self, pages: &[PageWant]) {
        let mut by_server: Vec<Vec<PageWant>> = vec![Vec::new(); self.members.len()];
        let up = self.up_mask();
        {
            let records = self.records.lock();
            for w in pages {
                if w.page >= self.pages {
                    return;
                }
                let copy = records.get(w.page);
                if copy.version == 0 || copy.version != w.version {
                    continue;
                }
                if let Some(s) = self.next_holder(w.page, copy.holders & up) {
                    by_server[s].push(*w);
                }
            }
        }
        for (server, wants) in by_server.iter_mut().enumerate() {
            wants.retain(|w| !self.queue.holds(w.page, w.version));
            if !wants.is_empty() {
                self.members[server].read_ahead(wants);
            }
        }
    }

    /// Reads a batch from the pages' holders (see the module documentation); `counted`:
    /// a fetch of the pager (counted in the stats), not one of repair.
    fn fetch(&self, batch: &mut [PageRead<'_>], counted: bool) -> Result<(), StoreError> {
        if let Some(code) = &self.code {
            return coded::fetch(self, code, batch, counted);
        }
        let inner = self;
        let mut first_error = refuse_bad_reads(&inner.name, inner.pages, batch.iter_mut());
        // Each pending page's holders (of the version asked for), in ranking order; pages
        // the pool never stored read as zeros, as in every store.
        let mut holders: Vec<u64> = vec![0; batch.len()];
        {
            let records = inner.records.lock();
            for (i, r) in batch.iter_mut().enumerate() {
                if r.outcome != Outcome::Pending {
                    continue;
                }
                let copy = records.get(r.page);
                if copy.version == 0 {
                    r.buf.fill(0);
                    let found = crc32c::crc32c(r.buf);
                    if found == r.crc {
                        r.outcome = Outcome::Done;
                    } else {
                        let e = super::lost_read(&inner.name, r, found);
                        first_error.get_or_insert(e);
                    }
                } else if copy.version == r.version {
                    holders[i] = copy.holders;
                }
            }
        }
        // A page still waiting for its other copies is served from the queue's bytes.
        for (i, r) in batch.iter_mut().enumerate() {
            if r.outcome == Outcome::Pending
                && inner.queue.read(r.page, r.version, r.buf)
                && crc32c::crc32c(r.buf) == r.crc
            {
                r.outcome = Outcome::Done;
                inner.counters.queue_reads.fetch_add(1, Relaxed);
                holders[i] = 0;
            }
        }
        let mut tried: Vec<u64> = vec![0; batch.len()];
        let mut transient: Vec<bool> = vec![false; batch.len()];
        // The server each page was last read from, and each server's last error.
        let mut last_server: Vec<Option<usize>> = vec![None; batch.len()];
        let mut server_errors: Vec<Option<StoreError>> =
            (0..inner.members.len()).map(|_| None).collect();
        let mut round = 0;
        loop {
            let up = inner.up_mask();
            let mut by_server: Vec<Vec<usize>> = vec![Vec::new(); inner.members.len()];
            for (i, r) in batch.iter().enumerate() {
                if r.outcome != Outcome::Pending {
                    continue;
                }
                let left = holders[i] & !tried[i];
                match inner.next_holder(r.page, left & up) {
                    Some(s) => {
                        tried[i] |= 1 << s;
                        last_server[i] = Some(s);
                        by_server[s].push(i);
                    }
                    None => {
                        // No holder left to try: a holder that is down may come back.
                        if left != 0 {
                            transient[i] = true;
                        }
                    }
                }
            }
            if by_server.iter().all(Vec::is_empty) {
                break;
            }
            for (server, positions) in by_server.iter().enumerate() {
                if positions.is_empty() {
                    continue;
                }
                let mut sub: Vec<PageRead<'_>> = Vec::with_capacity(positions.len());
                let mut at = positions.iter().peekable();
                for (i, r) in batch.iter_mut().enumerate() {
                    if at.peek() == Some(&&i) {
                        at.next();
                        sub.push(PageRead::new(r.page, &mut *r.buf, r.crc, r.version));
                    }
                }
                let start = std::time::Instant::now();
                let result = inner.members[server].fetch(&mut sub);
                inner.served[server].timed(start);
                let outcomes: Vec<(u64, u32, Outcome)> =
                    sub.iter().map(|r| (r.page, r.version, r.outcome)).collect();
                drop(sub);
                let mut fetched = 0;
                let mut bad = Vec::new();
                // Whether this server failed for some page (not only missed copies).
                let mut failed_here = false;
                for (&i, (page, version, outcome)) in positions.iter().zip(outcomes) {
                    match outcome {
                        Outcome::Done => {
                            batch[i].outcome = Outcome::Done;
                            fetched += 1;
                            if round > 0 && counted {
                                inner.counters.failovers.fetch_add(1, Relaxed);
                            }
                        }
                        Outcome::Failed(FailureKind::Lost) => bad.push((page, version)),
                        Outcome::Failed(_) | Outcome::Pending => {
                            transient[i] = true;
                            failed_here = true;
                        }
                    }
                }
                if counted {
                    inner.served[server].fetched.fetch_add(fetched, Relaxed);
                }
                if !bad.is_empty() {
                    // Missing, old or damaged here: this server no longer counts as a holder.
                    let mut records = inner.records.lock();
                    for &(page, version) in &bad {
                        records.drop_holder(page, version, server);
                    }
                    drop(records);
                    inner
                        .counters
                        .bad_copies
                        .fetch_add(bad.len() as u64, Relaxed);
                    inner.repair_needed.store(true, Relaxed);
                    inner.wake_thread();
                }
                match result {
                    Ok(()) => inner.health[server].succeeded(),
                    Err(e) => {
                        if failed_here {
                            inner.member_failed(server, &e);
                        } else {
                            inner.health[server].succeeded();
                        }
                        server_errors[server] = Some(e);
                    }
                }
            }
            round += 1;
        }
        for (i, r) in batch.iter_mut().enumerate() {
            if r.outcome != Outcome::Pending {
                continue;
            }
            let kind = if transient[i] {
                FailureKind::Transient
            } else {
                FailureKind::Lost
            };
            r.outcome = Outcome::Failed(kind);
            if first_error.is_none() {
                // The error of the server it was last read from, or the pool's own.
                let server_error = last_server[i].and_then(|s| server_errors[s].take());
                first_error = Some(server_error.unwrap_or_else(|| {
                    let why = if kind == FailureKind::Transient {
                        "every server holding a copy of the page is down".to_string()
                    } else {
                        format!(
                            "no server holds version {} of the page ({} of its copies were \
                             missing, old or damaged)",
                            r.version,
                            tried[i].count_ones()
                        )
                    };
                    inner.pool_error(StoreOp::Fetch, r.page, kind, why)
                }));
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Writes `version` of the pages `positions` of `batch` to servers until each has `need`
    /// copies (or no up server is left to try); returns the servers that acknowledged each.
    /// Servers in `skip[k]` are not tried for position k (they hold the copy already).
    fn write_copies(
        &self,
        batch: &mut [PageWrite<'_>],
        positions: &[usize],
        need: &[usize],
        acked: &mut [u64],
    ) -> Option<StoreError> {
        let mut tried: Vec<u64> = acked.to_vec();
        let mut first_error = None;
        loop {
            let up = self.up_mask();
            let mut by_server: Vec<Vec<usize>> = vec![Vec::new(); self.members.len()];
            for (k, &i) in positions.iter().enumerate() {
                let mut missing = need[k].saturating_sub(acked[k].count_ones() as usize);
                if missing == 0 {
                    continue;
                }
                for &s in self.placement.ranking(batch[i].page).servers() {
                    let bit = 1u64 << s;
                    if missing > 0 && up & bit != 0 && tried[k] & bit == 0 {
                        tried[k] |= bit;
                        by_server[s as usize].push(k);
                        missing -= 1;
                    }
                }
            }
            if by_server.iter().all(Vec::is_empty) {
                return first_error;
            }
            for (server, ks) in by_server.iter().enumerate() {
                if ks.is_empty() {
                    continue;
                }
                let mut sub: Vec<PageWrite<'_>> = ks
                    .iter()
                    .map(|&k| {
                        let w = &batch[positions[k]];
                        PageWrite::with_crc(w.page, w.buf, w.crc, w.version)
                    })
                    .collect();
                let start = std::time::Instant::now();
                let result = self.members[server].store(&mut sub);
                self.served[server].timed(start);
                let mut stored = 0;
                for (w, &k) in sub.iter().zip(ks) {
                    if w.outcome == Outcome::Done {
                        acked[k] |= 1 << server;
                        stored += 1;
                    }
                }
                self.served[server].stored.fetch_add(stored, Relaxed);
                match result {
                    Ok(()) => self.health[server].succeeded(),
                    Err(e) if self.members[server].is_full(&e) => {
                        // Full, not failing: the copies go to the next servers, or the page
                        // stays in the cache until there is room.
                        self.served[server].full.fetch_add(1, Relaxed);
                        if POOL_FULL.allow() {
                            log::warn!(
                                "pool server {} is full (memcached -m): pages go to other \
                                 servers, or stay in the cache until there is room",
                                self.members[server].server()
                            );
                        }
                        first_error.get_or_insert(e);
                    }
                    Err(e) => {
                        self.member_failed(server, &e);
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
    }
}

impl PageStore for PoolStore {
    fn fetch(&self, batch: &mut [PageRead<'_>]) -> Result<(), StoreError> {
        self.inner.fetch(batch, true)
    }

    fn read_ahead(&self, pages: &[PageWant]) {
        self.inner.read_ahead(pages);
    }

    fn store(&self, batch: &mut [PageWrite<'_>]) -> Result<(), StoreError> {
        let inner = &*self.inner;
        if let Some(code) = &inner.code {
            return coded::store(inner, code, batch);
        }
        let mut first_error = refuse_bad_writes(&inner.name, inner.pages, batch);
        let positions: Vec<usize> = (0..batch.len())
            .filter(|&i| batch[i].outcome == Outcome::Pending)
            .collect();
        if positions.is_empty() {
            return first_error.map_or(Ok(()), Err);
        }
        let replicas = inner.settings.replicas;
        // Adaptive with a log, memory scarce: one copy of the pages the evictor found in the
        // log (committed, outside an epoch in flight: `log_held`), every copy of the others.
        // Else optimistic only while the queue has room for every page's other copies.
        let log = inner.log_now();
        let optimistic = log.is_none()
            && replicas > 1
            && inner.optimistic.load(Relaxed)
            && inner.queue.has_room(positions.len());
        let need: Vec<usize> = positions
            .iter()
            .map(|&i| match log {
                Some(log) if batch[i].log_held && log.holds(batch[i].page, batch[i].crc) => 1,
                _ if optimistic => 1,
                _ => replicas,
            })
            .collect();
        let n = positions.len();
        let pages: Vec<u64> = positions.iter().map(|&i| batch[i].page).collect();
        let _stripes = inner.lock_stripes(pages.iter().copied());
        // The pool's thread may be writing older copies of these pages: wait for it.
        inner.queue.hold(&pages);
        // Queued copies of earlier write-backs ride along, in the same requests (one
        // round per server for both, instead of a round of the pool's thread's besides).
        let queued = if replicas > 1 {
            upkeep::Queued::take(inner, n * QUEUED_RIDERS_PER_PAGE)
        } else {
            upkeep::Queued::none(inner)
        };
        let mut all: Vec<PageWrite<'_>> = positions
            .iter()
            .map(|&i| {
                let w = &batch[i];
                PageWrite::with_crc(w.page, w.buf, w.crc, w.version)
            })
            .collect();
        all.extend(queued.writes());
        let mut need_all = need.clone();
        need_all.resize(all.len(), replicas);
        let mut acked = vec![0u64; n];
        acked.extend_from_slice(&queued.holders);
        let every: Vec<usize> = (0..all.len()).collect();
        if let Some(e) = inner.write_copies(&mut all, &every, &need_all, &mut acked) {
            first_error.get_or_insert(e);
        }
        drop(all);
        queued.finish(inner, &acked[n..]);
        acked.truncate(n);
        let mut short = false;
        let mut log_copies = 0;
        let mut failed = None;
        {
            let mut records = inner.records.lock();
            for (k, &i) in positions.iter().enumerate() {
                let w = &mut batch[i];
                if acked[k] == 0 {
                    w.outcome = Outcome::Failed(FailureKind::Transient);
                    failed.get_or_insert(w.page);
                    continue;
                }
                w.outcome = Outcome::Done;
                records.set(w.page, w.crc, w.version, acked[k]);
                if (acked[k].count_ones() as usize) < need[k] {
                    short = true;
                }
                if need[k] < replicas && !optimistic {
                    log_copies += 1;
                }
            }
        }
        inner.counters.log_copies.fetch_add(log_copies, Relaxed);
        if optimistic {
            for (k, &i) in positions.iter().enumerate() {
                let w = &batch[i];
                if acked[k] != 0 && (acked[k].count_ones() as usize) < replicas {
                    inner.queue.push(w.page, w.crc, w.version, w.buf);
                }
            }
            // The next write-back carries them, or the pool's thread within its tick.
        } else if short {
            // Fewer servers up than copies: the pool's thread adds them when it can.
            inner.repair_needed.store(true, Relaxed);
        }
        // Older queued versions not replaced above (written with all their copies now, or not
        // at all) go back to the pool's thread, which drops the stale ones.
        inner.queue.release(&pages);
        if batch.iter().all(|w| w.outcome.is_done()) {
            return Ok(());
        }
        match failed {
            // A page the pool refused (outside the heap, a bad buffer).
            None => first_error.map_or(Ok(()), Err),
            Some(page) => Err(first_error.unwrap_or_else(|| {
                inner.pool_error(
                    StoreOp::Store,
                    page,
                    FailureKind::Transient,
                    "no server of the pool is up".into(),
                )
            })),
        }
    }

    fn discard(&self, first: u64, count: u64) -> Result<(), StoreError> {
        let inner = &*self.inner;
        if let Some(code) = &inner.code {
            return coded::discard(inner, code, first, count);
        }
        let Some(range) = discard_range(&inner.name, first, count, inner.pages)? else {
            return Ok(());
        };
        let top = inner.records.lock().top();
        let range = range.start..range.end.min(top);
        if range.is_empty() {
            return Ok(());
        }
        let _stripes = if range.end - range.start >= STRIPES as u64 * placement::GROUP_PAGES {
            inner.lock_stripes(0..STRIPES as u64 * placement::GROUP_PAGES)
        } else {
            inner.lock_stripes(range.clone())
        };
        let mut by_server: Vec<Vec<u64>> = vec![Vec::new(); inner.members.len()];
        // The pool's thread (or a write-back carrying queued copies) may be writing copies of
        // these pages: wait, and forget them in the same step, so none is taken meanwhile.
        inner.queue.settle_and_remove(range.clone());
        {
            let mut records = inner.records.lock();
            for page in range {
                let copy = records.get(page);
                if copy.version == 0 {
                    continue;
                }
                for (s, list) in by_server.iter_mut().enumerate() {
                    if copy.holders & (1 << s) != 0 {
                        list.push(page);
                    }
                }
                records.clear(page);
            }
        }
        // Best effort: a copy left behind is never served (the page's record is gone).
        let up = inner.up_mask();
        let mut first_error = None;
        for (s, pages) in by_server.iter().enumerate() {
            if !pages.is_empty() && up & (1 << s) != 0 {
                if let Err(e) = inner.members[s].delete(pages) {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn describe(&self) -> String {
        PoolStore::describe_inner(&self.inner)
    }

    fn report(&self) -> Vec<(String, String)> {
        upkeep::report(&self.inner)
    }

    /// One copy, or adaptive replication (which keeps one copy of what the log holds while
    /// memory is scarce); never with erasure coding.
    fn wants_log_copy(&self) -> bool {
        let s = &self.inner.settings;
        self.inner.code.is_none() && (s.replicas == 1 || s.replication == Replication::Adaptive)
    }

    fn log_copy_now(&self) -> bool {
        self.inner.code.is_none()
            && (self.inner.settings.replicas == 1 || self.inner.log_covers_now())
    }

    fn log_stands_in(&self, log: Arc<dyn LogCopies>) {
        let _ = self.inner.log.set(log);
    }

    /// Every member checks checksum and version; the queue's and the zero pages' bytes are
    /// checked here.
    fn verifies_reads(&self) -> bool {
        true
    }

    /// Releases the heap's leases; its pages stay (late faults at exit) until the next
    /// collection finds them without a lease.
    fn at_exit(&self) {
        // The thread stops first: it would renew the leases (and take a lapsed lease as a
        // sign of lost copies).
        self.inner.stop.store(true, Relaxed);
        self.inner.wake_thread();
        let _leases = self.inner.leases.lock().unwrap_or_else(|e| e.into_inner());
        for m in &self.inner.members {
            m.at_exit();
        }
    }
}

#[cfg(test)]
mod tests;
