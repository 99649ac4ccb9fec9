//! The pool's thread, `lego-pool`: everything the pool does that no fault or eviction waits
//! for. Each round (every [`TICK_MS`], or when woken):
//! 1. writes the other copies of pages in the replica queue (optimistic replication);
//! 2. every [`HEALTH_CHECK_MS`]: probes the servers that are down (with backoff) and asks the
//!    others how they are; a server found restarted loses its copies in the records; the
//!    pool's free memory decides adaptive replication's mode, with hysteresis;
//! 3. while some page may have fewer copies on up servers than it should, repairs up to
//!    [`REPAIR_PAGES_PER_ROUND`] of them from a surviving copy.
//!
//! It never holds the records' lock across I/O, and takes a page's stripe lock around reading
//! and writing its copies, like the evictor.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::health::Probed;
use super::queue::{ReplicaQueue, Waiting};
use super::Inner;
use crate::config::Replication;
use crate::io::AlignedBuf;
use crate::store::memcached::lease::LEASE_RENEW_S;
use crate::store::{Outcome, PageRead, PageWrite};
use crate::PAGE_SIZE;

/// Longest sleep of the thread between two rounds, in milliseconds.
const TICK_MS: u64 = 100;
/// How often the servers are asked how they are, in milliseconds.
const HEALTH_CHECK_MS: u64 = 1000;
/// Queued pages whose copies one batch writes. (A write-back of a page in the batch waits
/// for the batch; but smaller batches drain the queue slower, and a fuller queue costs
/// memory: 64 made the bench's optimistic runs outgrow their cgroup.)
const QUEUE_PAGES_PER_ROUND: usize = 256;
/// Batches of queued pages one round writes at most (the round's other duties, leases
/// among them, must not wait for a queue that never empties).
const QUEUE_BATCHES_PER_ROUND: usize = 8;
/// Pages one repair round copies.
const REPAIR_PAGES_PER_ROUND: usize = 256;
/// Page records one repair round looks at.
const REPAIR_SCAN_PER_ROUND: u64 = 1 << 16;
/// Points above `LEGO_ADAPTIVE_FREE` at which adaptive replication turns pessimistic again.
const ADAPTIVE_HYSTERESIS_PERCENT: u64 = 5;

pub(super) fn start(inner: Arc<Inner>) -> std::io::Result<()> {
    crate::threads::spawn("lego-pool", move || run(&inner))
}

fn run(inner: &Inner) {
    // Pages of heaps whose process died (their lease lapsed) are freed once, off the
    // program's start.
    for member in &inner.members {
        if let Some(what) = member.collect_orphans() {
            log::info!("pool server {}: {what}", member.server());
        }
        // A collection may take a while: the leases must not lapse meanwhile.
        renew_leases(inner);
    }
    let mut last_check = Instant::now();
    let mut last_renewal = Instant::now();
    let mut cursor = 0u64;
    let mut clean_since_scan_start = true;
    loop {
        {
            let (flag, cv) = &inner.wake;
            let mut woken = flag.lock().unwrap_or_else(|e| e.into_inner());
            if !*woken {
                woken = cv
                    .wait_timeout(woken, Duration::from_millis(TICK_MS))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            *woken = false;
        }
        if inner.stop.load(Relaxed) {
            return;
        }
        drain_queue(inner);
        if last_check.elapsed() >= Duration::from_millis(HEALTH_CHECK_MS) {
            last_check = Instant::now();
            check_servers(inner);
        }
        if last_renewal.elapsed() >= Duration::from_secs(u64::from(LEASE_RENEW_S)) {
            last_renewal = Instant::now();
            renew_leases(inner);
        }
        if inner.repair_needed.load(Relaxed) {
            let top = inner.records.lock().top();
            let (next, clean) = repair_round(inner, cursor, top);
            clean_since_scan_start &= clean;
            if next >= top {
                // A whole pass: done if nothing needed (or waited for) a copy.
                if clean_since_scan_start {
                    inner.repair_needed.store(false, Relaxed);
                }
                cursor = 0;
                clean_since_scan_start = true;
            } else {
                cursor = next;
            }
        }
    }
}

/// Queued pages taken for their other copies (marked `Draining`, see [`super::queue`]): the
/// versions that are still the newest, each with the servers that hold it already. Stale
/// versions are finished when taken.
pub(super) struct Queued<'q> {
    queue: &'q ReplicaQueue,
    taken: Vec<(u64, Waiting)>,
    /// Indexes into `taken` of the pages still to be copied.
    live: Vec<usize>,
    /// Servers holding each live page's version already.
    pub(super) holders: Vec<u64>,
}

impl<'q> Queued<'q> {
    /// Takes up to `n` queued pages.
    pub(super) fn take(inner: &'q Inner, n: usize) -> Queued<'q> {
        let taken = inner.queue.take(n);
        let mut live = Vec::with_capacity(taken.len());
        let mut holders = Vec::with_capacity(taken.len());
        let mut stale = Vec::new();
        if !taken.is_empty() {
            let records = inner.records.lock();
            for (k, (page, w)) in taken.iter().enumerate() {
                let copy = records.get(*page);
                if copy.version == w.version {
                    holders.push(copy.holders);
                    live.push(k);
                } else {
                    stale.push((*page, w.version, true));
                }
            }
        }
        if !stale.is_empty() {
            inner.queue.finish(&stale);
        }
        Queued {
            queue: &inner.queue,
            taken,
            live,
            holders,
        }
    }

    /// Nothing taken.
    pub(super) fn none(inner: &'q Inner) -> Queued<'q> {
        Queued {
            queue: &inner.queue,
            taken: Vec::new(),
            live: Vec::new(),
            holders: Vec::new(),
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// The writes of the live pages, in order.
    pub(super) fn writes(&self) -> impl Iterator<Item = PageWrite<'_>> {
        self.live.iter().map(|&k| {
            let (page, w) = &self.taken[k];
            PageWrite::with_crc(*page, w.bytes.as_slice(), w.crc, w.version)
        })
    }

    /// Records the copies written (`acked`: the servers now holding each live page, those
    /// it held before included) and gives the pages back to the queue: gone when they have
    /// every copy, else to be tried again. Returns whether every page has every copy.
    pub(super) fn finish(mut self, inner: &Inner, acked: &[u64]) -> bool {
        let replicas = inner.settings.replicas;
        let mut done = Vec::with_capacity(self.live.len());
        let mut complete_all = true;
        {
            let mut records = inner.records.lock();
            for (j, &k) in self.live.iter().enumerate() {
                let (page, w) = &self.taken[k];
                records.add_holders(*page, w.version, acked[j] & !self.holders[j]);
                let complete = acked[j].count_ones() as usize >= replicas;
                complete_all &= complete;
                done.push((*page, w.version, complete));
            }
        }
        inner.queue.finish(&done);
        self.live.clear();
        // The buffers of pages that left the queue serve the next ones.
        for (_, w) in std::mem::take(&mut self.taken) {
            inner.queue.recycle(w);
        }
        complete_all
    }
}

/// Pages taken and never finished (a panic while writing them) go back to the queue, so that
/// no writer waits for them forever.
impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if !self.live.is_empty() {
            let back: Vec<(u64, u32, bool)> = self
                .live
                .iter()
                .map(|&k| (self.taken[k].0, self.taken[k].1.version, false))
                .collect();
            self.queue.finish(&back);
        }
    }
}

/// Writes the other copies of queued pages, [`QUEUE_PAGES_PER_ROUND`] at a time, for at most
/// [`QUEUE_BATCHES_PER_ROUND`] batches. No stripe lock is held: the taken pages are
/// `Draining`, and every other writer of them waits for that to end (see [`super::queue`]),
/// so write-backs of other pages go on while these copies are written. (While write-backs
/// run, they carry most queued copies themselves: see `PoolStore::store`.)
fn drain_queue(inner: &Inner) {
    for _ in 0..QUEUE_BATCHES_PER_ROUND {
        let queued = Queued::take(inner, QUEUE_PAGES_PER_ROUND);
        if queued.is_empty() {
            // Nothing queued, or only stale versions (finished): done for this round.
            queued.finish(inner, &[]);
            return;
        }
        let mut batch: Vec<PageWrite<'_>> = queued.writes().collect();
        let positions: Vec<usize> = (0..batch.len()).collect();
        let need = vec![inner.settings.replicas; batch.len()];
        let mut acked = queued.holders.clone();
        let _ = inner.write_copies(&mut batch, &positions, &need, &mut acked);
        drop(batch);
        // Not enough servers up: try again next round.
        if !queued.finish(inner, &acked) {
            return;
        }
    }
}

/// Renews the heap's lease on every server that is up. A lease found lapsed (the process was
/// stopped, or cut off from the server, for longer than its TTL) means a collection may have
/// freed the heap's pages there: its copies are forgotten and written again, as after a
/// restart.
fn renew_leases(inner: &Inner) {
    let _leases = inner.leases.lock().unwrap_or_else(|e| e.into_inner());
    if inner.stop.load(Relaxed) || !inner.renewing.load(Relaxed) {
        return; // Released at exit, or a restore's claim that must keep no time to live.
    }
    for (s, member) in inner.members.iter().enumerate() {
        if !inner.health[s].is_up() {
            continue;
        }
        match member.renew_lease() {
            Ok(false) => {}
            Ok(true) => {
                let forgotten = inner.records.lock().forget_server(s);
                inner.repair_needed.store(true, Relaxed);
                if forgotten > 0 {
                    log::warn!(
                        "pool server {}: this heap's lease had lapsed, so its {forgotten} \
                         copies there may be gone; they are written again",
                        member.server()
                    );
                }
            }
            Err(e) => log::warn!(
                "pool server {}: renewing the lease failed: {e}",
                member.server()
            ),
        }
    }
}

/// Probes the servers that are down and due, asks the others how they are, and sets
/// adaptive replication's mode from the pool's free memory.
fn check_servers(inner: &Inner) {
    let now = Instant::now();
    let mut limit = 0u64;
    let mut used = 0u64;
    for (s, member) in inner.members.iter().enumerate() {
        let health = &inner.health[s];
        let was_up = health.is_up();
        if !was_up && !health.probe_due(now) {
            continue;
        }
        match member.info() {
            Ok(info) => {
                limit += info.limit_bytes;
                used += info.used_bytes.min(info.limit_bytes);
                let probed = health.answered(info.pid, info.uptime_s);
                if !was_up {
                    member.reconnect();
                    log::info!("pool server {} is up again", member.server());
                    inner.repair_needed.store(true, Relaxed);
                }
                if probed == Probed::Restarted {
                    let forgotten = inner.records.lock().forget_server(s);
                    inner.counters.restarts.fetch_add(1, Relaxed);
                    inner.repair_needed.store(true, Relaxed);
                    log::info!(
                        "pool server {} restarted: its {forgotten} copies are gone and are \
                         written again",
                        member.server()
                    );
                }
            }
            Err(e) => {
                if was_up {
                    inner.member_failed(s, &e);
                } else {
                    health.probe_failed(now);
                }
            }
        }
    }
    if inner.settings.replication == Replication::Adaptive && limit > 0 {
        let free_percent = (limit - used) * 100 / limit;
        let threshold = u64::from(inner.settings.adaptive_free_percent);
        let optimistic = inner.optimistic.load(Relaxed);
        let switch_to = if !optimistic && free_percent < threshold {
            Some(true)
        } else if optimistic && free_percent >= threshold + ADAPTIVE_HYSTERESIS_PERCENT {
            Some(false)
        } else {
            None
        };
        if let Some(to) = switch_to {
            inner.optimistic.store(to, Relaxed);
            inner.counters.mode_switches.fetch_add(1, Relaxed);
            let mode = match (to, inner.log.get().is_some()) {
                (true, true) => "one copy and the log",
                (true, false) => "optimistic",
                (false, _) => "pessimistic",
            };
            log::info!(
                "pool replication is {mode} now: {free_percent}% of the pool's memory is free \
                 (the threshold is {threshold}%)"
            );
            if !to {
                inner.repair_needed.store(true, Relaxed);
            }
        }
    }
}

/// Whether a page short of copies needs none now: the log stands in for the others (memory
/// scarce) and it has one on an up server. Repair adds them once memory is plentiful again.
fn log_covers(inner: &Inner, page: u64, crc: u32, up_holders: u64) -> bool {
    up_holders != 0 && inner.log_now().is_some_and(|log| log.holds(page, crc))
}

/// How many of a page's holders are up, against how many copies it should have now.
fn short_of_copies(inner: &Inner, holders: u64, up: u64) -> bool {
    let want = inner.settings.replicas.min(up.count_ones() as usize);
    ((holders & up).count_ones() as usize) < want
}

/// Looks at the records from `cursor` and gives up to [`REPAIR_PAGES_PER_ROUND`] pages that
/// are short of copies their copies back. Returns where to go on, and whether everything
/// looked at was whole (false if a page was repaired, or could not be for now).
fn repair_round(inner: &Inner, cursor: u64, top: u64) -> (u64, bool) {
    if let Some(code) = &inner.code {
        return super::coded::repair_round(inner, code, cursor, top);
    }
    let up = inner.up_mask();
    let end = top.min(cursor + REPAIR_SCAN_PER_ROUND);
    let mut short: Vec<u64> = Vec::new();
    let mut next = end;
    {
        let records = inner.records.lock();
        for page in cursor..end {
            let copy = records.get(page);
            if copy.version != 0
                && short_of_copies(inner, copy.holders, up)
                && !log_covers(inner, page, copy.crc, copy.holders & up)
            {
                short.push(page);
                if short.len() == REPAIR_PAGES_PER_ROUND {
                    next = page + 1;
                    break;
                }
            }
        }
    }
    if short.is_empty() {
        return (next, true);
    }
    let _stripes = inner.lock_stripes(short.iter().copied());
    // Read each page from an up holder (the records again, under the stripes).
    let mut bufs = AlignedBuf::new(short.len() * PAGE_SIZE);
    let copies: Vec<_> = {
        let records = inner.records.lock();
        short.iter().map(|&p| records.get(p)).collect()
    };
    let mut reads: Vec<PageRead<'_>> = short
        .iter()
        .zip(&copies)
        .zip(bufs.as_mut_slice().chunks_mut(PAGE_SIZE))
        .map(|((&page, copy), buf)| PageRead::new(page, buf, copy.crc, copy.version))
        .collect();
    // The pool's own fetch: holders in ranking order, bad copies dropped.
    let _ = inner.fetch(&mut reads, false);
    let readable: Vec<usize> = (0..reads.len())
        .filter(|&k| reads[k].outcome == Outcome::Done)
        .collect();
    let outcomes: Vec<bool> = reads.iter().map(|r| r.outcome == Outcome::Done).collect();
    drop(reads);
    let mut writes: Vec<PageWrite<'_>> = Vec::with_capacity(readable.len());
    let mut acked: Vec<u64> = Vec::with_capacity(readable.len());
    {
        let records = inner.records.lock();
        for (k, chunk) in bufs.as_slice().chunks(PAGE_SIZE).enumerate() {
            if !outcomes[k] {
                continue;
            }
            let copy = records.get(short[k]);
            if copy.version != copies[k].version {
                continue; // Stored anew meanwhile (cannot happen under the stripes).
            }
            writes.push(PageWrite::with_crc(
                short[k],
                chunk,
                copies[k].crc,
                copies[k].version,
            ));
            acked.push(copy.holders & up);
        }
    }
    let before = acked.clone();
    let positions: Vec<usize> = (0..writes.len()).collect();
    let want = inner.settings.replicas.min(up.count_ones() as usize);
    let need = vec![want; writes.len()];
    let _ = inner.write_copies(&mut writes, &positions, &need, &mut acked);
    let mut records = inner.records.lock();
    let mut written = 0;
    for (k, w) in writes.iter().enumerate() {
        written += records.add_holders(w.page, w.version, acked[k] & !before[k]);
    }
    drop(records);
    inner.counters.rereplicated.fetch_add(written, Relaxed);
    (next, false)
}

/// The pool's statistics, for the report at exit: pool-wide counters, then one line per
/// server.
pub(super) fn report(inner: &Inner) -> Vec<(String, String)> {
    let up = inner.up_mask();
    let (mut short, mut stored) = (0u64, 0u64);
    {
        let records = inner.records.lock();
        for page in 0..records.top() {
            let copy = records.get(page);
            if copy.version != 0 {
                stored += 1;
                if ((copy.holders & up).count_ones() as usize) < inner.settings.replicas {
                    short += 1;
                }
            }
        }
    }
    let c = &inner.counters;
    let mut out = vec![
        ("pool_stored_pages".to_string(), stored.to_string()),
        ("pool_underreplicated_pages".to_string(), short.to_string()),
        (
            "pool_servers_down".to_string(),
            (inner.members.len() as u64 - u64::from(up.count_ones())).to_string(),
        ),
        (
            "pool_failovers".to_string(),
            c.failovers.load(Relaxed).to_string(),
        ),
        (
            "pool_rereplicated_pages".to_string(),
            c.rereplicated.load(Relaxed).to_string(),
        ),
        (
            "pool_mode_switches".to_string(),
            c.mode_switches.load(Relaxed).to_string(),
        ),
        (
            "pool_bad_copies".to_string(),
            c.bad_copies.load(Relaxed).to_string(),
        ),
        (
            "pool_queue_reads".to_string(),
            c.queue_reads.load(Relaxed).to_string(),
        ),
        (
            "pool_restarts".to_string(),
            c.restarts.load(Relaxed).to_string(),
        ),
        (
            "pool_queued_pages".to_string(),
            inner.queue.len().to_string(),
        ),
        (
            "pool_log_copies".to_string(),
            c.log_copies.load(Relaxed).to_string(),
        ),
        (
            "pool_sealed".to_string(),
            if inner.members.iter().all(|m| m.is_sealed()) {
                "yes"
            } else {
                "no"
            }
            .to_string(),
        ),
        (
            "pool_seal_failures".to_string(),
            inner
                .members
                .iter()
                .map(|m| m.seal_failures())
                .sum::<u64>()
                .to_string(),
        ),
    ];
    if let Some(code) = &inner.code {
        out.extend(super::coded::report(inner, code));
    }
    for (s, member) in inner.members.iter().enumerate() {
        let h = &inner.health[s];
        let (sent, received) = member.wire_bytes();
        let (ahead_sent, ahead_used) = member.read_ahead_counts();
        out.push((
            format!("pool_server_{s}"),
            format!(
                "{} {} fetched={} stored={} errors={} downs={} full={} requests={} busy_us={} \
                 bytes_sent={sent} bytes_received={received} read_ahead={ahead_used}/{ahead_sent}",
                member.server(),
                if h.is_up() { "up" } else { "down" },
                inner.served[s].fetched.load(Relaxed),
                inner.served[s].stored.load(Relaxed),
                h.errors.load(Relaxed),
                h.downs.load(Relaxed),
                inner.served[s].full.load(Relaxed),
                inner.served[s].requests.load(Relaxed),
                inner.served[s].busy_us.load(Relaxed),
            ),
        ));
    }
    out
}
