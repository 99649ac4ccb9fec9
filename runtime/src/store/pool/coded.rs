//! The erasure-coded pool (`LEGO_REDUNDANCY=rs:K+M`): stripes of K consecutive pages of a
//! placement group with M parity values, in place (docs/DESIGN.md, "Erasure coding").
//!
//! - A data page is an ordinary page value on one server (its holder in the records): a
//!   fetch of a healthy pool is the replica pool's fetch with one copy.
//! - Write ([`store`]): the batch's pages grouped by stripe; a stripe not whole in the batch
//!   reads its other data values first (a degraded read if it must); the stripe is encoded
//!   and its data and parity values are written in one pipeline per server. A parity value is
//!   recorded only if every data value of its stripe written with it was acknowledged
//!   (invariant P, `records.rs`).
//! - Read ([`fetch`]): the data values from their holders; a page whose holder is down, or
//!   whose value was missing, old or damaged, is rebuilt from any K values of its stripe whose
//!   versions are the records' ([`gather`]), and the rebuilt page's CRC32C must be the
//!   record's, or it is `Lost`: never other bytes.
//! - Discard ([`discard`]) and repair ([`repair_round`]) keep the stripes whole.
//!
//! Rules: everything done to a stripe holds its group's stripe lock (a fetch only for its
//! degraded reads: a normal read is checked against the records like a replica's, while a
//! rebuild needs the stripe's values and records to agree, so it waits for a write under
//! way); the records' lock is never held across I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::coding::Code;
use super::placement::GROUP_PAGES;
use super::records::{self, Arrays, Copy};
use super::Inner;
use crate::config::CodeShape;
use crate::io::AlignedBuf;
use crate::store::parity::{Cover, ParityKey, ParityRead, ParityWrite};
use crate::store::{
    discard_range, refuse_bad_reads, refuse_bad_writes, FailureKind, Outcome, PageRead, PageWrite,
    StoreError, StoreOp,
};
use crate::PAGE_SIZE;

/// Stripes one repair round rebuilds or re-encodes at most.
pub(super) const REPAIR_STRIPES_PER_ROUND_MAX: usize = 64;
/// Stripes one round of a write touches, at most ([`store`]). A round holds, per stripe, its
/// K+M values read, its M parity values and the requests of its values: about 44 KiB at
/// rs:4+2 and 60 KiB at rs:8+2, so a round stays under 4 MiB whatever the eviction batch.
pub(super) const STORE_STRIPES_PER_ROUND_MAX: usize = 64;
/// Stripes one repair round looks at.
const REPAIR_SCAN_STRIPES_PER_ROUND: u64 = 1 << 14;

/// The code of a pool and its counters.
pub(super) struct Coded {
    code: Code,
    /// K, as a page count.
    k: u64,
    /// K + M.
    width: usize,
    counters: CodedCounters,
}

#[derive(Default)]
struct CodedCounters {
    /// Pages rebuilt from their stripe (degraded reads that succeeded).
    rebuilt: AtomicU64,
    /// Pages that needed a degraded read.
    degraded_reads: AtomicU64,
    /// Values (data and parity) written by repair.
    repairs: AtomicU64,
    /// Bytes of pages encoded or rebuilt.
    bytes_coded: AtomicU64,
    /// Stripes written with fewer values than K+M, or whose parity could not be encoded.
    stripes_left_short: AtomicU64,
}

impl Coded {
    pub(super) fn new(shape: CodeShape) -> Coded {
        let code = Code::new(shape.data, shape.parity)
            .expect("the configuration checked the code's shape");
        assert!(
            GROUP_PAGES.is_multiple_of(shape.data as u64),
            "a stripe lies in a group"
        );
        Coded {
            code,
            k: shape.data as u64,
            width: shape.data + shape.parity,
            counters: CodedCounters::default(),
        }
    }

    pub(super) fn data(&self) -> usize {
        self.code.data()
    }

    fn m(&self) -> usize {
        self.code.parity()
    }

    fn stripe(&self, page: u64) -> u64 {
        page / self.k
    }

    fn first_page(&self, stripe: u64) -> u64 {
        stripe * self.k
    }
}

/// What the records say of one stripe.
#[derive(Clone)]
struct Snapshot {
    stripe: u64,
    copies: Vec<Copy>,
    parity: u64,
}

impl Snapshot {
    fn take(inner: &Inner, coded: &Coded, records: &Arrays, stripe: u64) -> Snapshot {
        let first = coded.first_page(stripe);
        let copies = (first..first + coded.k)
            .map(|p| {
                if p < inner.pages {
                    records.get(p)
                } else {
                    Copy::default()
                }
            })
            .collect();
        Snapshot {
            stripe,
            copies,
            parity: records.parity(stripe),
        }
    }

    fn cover(&self) -> Vec<Cover> {
        self.copies
            .iter()
            .map(|c| Cover {
                version: c.version,
                crc: if c.version == 0 { 0 } else { c.crc },
            })
            .collect()
    }

    fn live(&self) -> bool {
        self.copies.iter().any(|c| c.version != 0)
    }

    /// Whether every value of a live stripe is on an up server.
    fn whole(&self, inner: &Inner, coded: &Coded, up: u64) -> bool {
        let (_, data, parity) = self.placed(inner, coded, up);
        data == 0 && parity == 0
    }

    /// Which values of the stripe are where they should be: walking the data slots, then the
    /// parity slots, a value stays if its server is up and holds no value met before. Returns
    /// the servers of the values that stay, and the data and parity slots (a bit each) to
    /// write again.
    fn placed(&self, inner: &Inner, coded: &Coded, up: u64) -> (u64, u32, u32) {
        if !self.live() {
            return (0, 0, 0);
        }
        let k = coded.data();
        // Each value's server (None: no value, or not up).
        let server: Vec<Option<usize>> = (0..coded.width)
            .map(|t| {
                let s = if t < k {
                    let c = self.copies[t];
                    if c.version == 0 {
                        return None;
                    }
                    let h = c.holders & up;
                    (h != 0).then(|| h.trailing_zeros() as usize)
                } else {
                    records::parity_server(self.parity, t - k)
                };
                s.filter(|&s| up & (1 << s) != 0)
            })
            .collect();
        let live = |t: usize| t >= k || self.copies[t].version != 0;
        let mut seen = 0u64;
        let mut stays = vec![false; coded.width];
        // Values on their home server first (a value moved aside for a down home gives way
        // to it), then the others.
        for home_pass in [true, false] {
            for t in 0..coded.width {
                let Some(s) = server[t] else { continue };
                if stays[t] || seen & (1 << s) != 0 {
                    continue;
                }
                let home = inner
                    .placement
                    .stripe_candidates(coded.first_page(self.stripe), self.stripe, coded.width, t)
                    .servers()[0];
                let home = usize::from(home);
                // Away from home: it stays only while its home cannot take it (down, or
                // holding a value at its own home); else it goes home, which frees the
                // server it is on for the value whose home that is.
                let home_free = up & (1 << home) != 0 && seen & (1 << home) == 0;
                if home == s || (!home_pass && !home_free) {
                    stays[t] = true;
                    seen |= 1 << s;
                }
            }
        }
        let (mut data, mut parity) = (0u32, 0u32);
        for (t, &stay) in stays.iter().enumerate() {
            if live(t) && !stay {
                if t < k {
                    data |= 1 << t;
                } else {
                    parity |= 1 << (t - k);
                }
            }
        }
        (seen, data, parity)
    }
}

/// Where a slot's value is, for reading.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Slot {
    /// Its bytes are in the job's buffer (read, zeros, or handed over).
    Have,
    /// Readable from this server (not tried yet).
    Untried(usize),
    /// Asked for in the round under way.
    Asked(usize),
    /// Not available (down, missing, old, damaged, or no value).
    Gone,
}

/// One stripe to read: the wanted data slots, with the rest of the stripe as sources for a
/// rebuild. `buf` holds K data then M parity pages.
struct Job {
    stripe: u64,
    snap: Snapshot,
    cover: Vec<Cover>,
    buf: AlignedBuf,
    slots: Vec<Slot>,
    /// Data slots the caller needs (a bit each).
    wanted: u32,
    /// A value was not read for a reason that may pass (a server down or failing).
    transient: bool,
    /// Whether the wanted slots are in `buf`, checked (after [`gather`]).
    done: bool,
    /// Slots that were rebuilt.
    rebuilt: u32,
}

impl Job {
    /// A job over `snap` for `wanted`; slots whose bytes the caller has are set with
    /// [`Job::have`].
    fn new(inner: &Inner, coded: &Coded, stripe: u64, snap: Snapshot, wanted: u32) -> Job {
        let up = inner.up_mask();
        let k = coded.data();
        let mut buf = AlignedBuf::new(coded.width * PAGE_SIZE);
        let mut slots = Vec::with_capacity(coded.width);
        let mut transient = false;
        for (j, c) in snap.copies.iter().enumerate() {
            slots.push(if c.version == 0 {
                buf.as_mut_slice()[j * PAGE_SIZE..(j + 1) * PAGE_SIZE].fill(0);
                Slot::Have
            } else {
                match inner.next_holder(coded.first_page(stripe) + j as u64, c.holders & up) {
                    Some(s) => Slot::Untried(s),
                    None => {
                        transient |= c.holders != 0;
                        Slot::Gone
                    }
                }
            });
        }
        for m in 0..coded.m() {
            slots.push(match records::parity_server(snap.parity, m) {
                Some(s) if up & (1 << s) != 0 => Slot::Untried(s),
                Some(_) => {
                    transient = true;
                    Slot::Gone
                }
                None => Slot::Gone,
            });
        }
        debug_assert_eq!(slots.len(), k + coded.m());
        Job {
            stripe,
            cover: snap.cover(),
            snap,
            buf,
            slots,
            wanted,
            transient,
            done: false,
            rebuilt: 0,
        }
    }

    /// Data slot `j` holds `bytes` (its recorded version, checked by the caller).
    fn have(&mut self, j: usize, bytes: &[u8]) {
        self.buf.as_mut_slice()[j * PAGE_SIZE..(j + 1) * PAGE_SIZE].copy_from_slice(bytes);
        self.slots[j] = Slot::Have;
    }

    fn page_bytes(&self, j: usize) -> &[u8] {
        &self.buf.as_slice()[j * PAGE_SIZE..(j + 1) * PAGE_SIZE]
    }

    fn wanted_have(&self) -> bool {
        (0..self.slots.len())
            .filter(|&j| self.wanted & (1 << j) != 0)
            .all(|j| self.slots[j] == Slot::Have)
    }

    /// Picks this round's reads: every wanted slot not read yet and, if a wanted slot is
    /// gone, enough others (data first, then parity) to reach K values. False if the job
    /// cannot be finished.
    fn plan(&mut self, k: usize) -> bool {
        if self.wanted_have() {
            return true;
        }
        let mut asked = 0;
        for j in 0..k {
            if self.wanted & (1 << j) != 0 {
                if let Slot::Untried(s) = self.slots[j] {
                    self.slots[j] = Slot::Asked(s);
                    asked += 1;
                }
            }
        }
        let wanted_gone =
            (0..k).any(|j| self.wanted & (1 << j) != 0 && self.slots[j] == Slot::Gone);
        if wanted_gone {
            let have = self.slots.iter().filter(|s| **s == Slot::Have).count();
            let mut need = k.saturating_sub(have + asked);
            for slot in self.slots.iter_mut() {
                if need == 0 {
                    break;
                }
                if let Slot::Untried(s) = *slot {
                    *slot = Slot::Asked(s);
                    need -= 1;
                }
            }
            if need > 0 {
                // Undo nothing: what was asked is read anyway, and the job fails after.
                return self.slots.iter().any(|s| matches!(s, Slot::Asked(_))) && have + asked >= k;
            }
        }
        true
    }
}

/// Reads the wanted slots of every job: each from its server, or rebuilt from K values of the
/// stripe at the snapshot's versions (a round per server per step, at most K+M steps). A job
/// ends `done` only with every wanted slot in its buffer and checked.
fn gather(inner: &Inner, coded: &Coded, jobs: &mut [Job]) -> Option<StoreError> {
    let k = coded.data();
    let m = coded.m();
    let parity_count = u8::try_from(m).expect("at most 4");
    let mut first_error = None;
    for _ in 0..=coded.width {
        let mut any = false;
        for job in jobs.iter_mut() {
            if !job.done && !job.wanted_have() {
                job.plan(k);
            }
            any |= job.slots.iter().any(|s| matches!(s, Slot::Asked(_)));
        }
        if !any {
            break;
        }
        for server in 0..inner.members.len() {
            let mut asked: Vec<(usize, usize)> = Vec::new();
            for (x, job) in jobs.iter().enumerate() {
                for (j, s) in job.slots.iter().enumerate() {
                    if *s == Slot::Asked(server) {
                        asked.push((x, j));
                    }
                }
            }
            if asked.is_empty() {
                continue;
            }
            let mut pages: Vec<PageRead<'_>> = Vec::new();
            let mut parity: Vec<ParityRead<'_>> = Vec::new();
            let mut page_of: Vec<(usize, usize)> = Vec::new();
            let mut parity_of: Vec<(usize, usize)> = Vec::new();
            for (x, job) in jobs.iter_mut().enumerate() {
                let Job {
                    stripe,
                    snap,
                    cover,
                    buf,
                    slots,
                    ..
                } = job;
                for (j, chunk) in buf.as_mut_slice().chunks_mut(PAGE_SIZE).enumerate() {
                    if slots[j] != Slot::Asked(server) {
                        continue;
                    }
                    if j < k {
                        let c = snap.copies[j];
                        pages.push(PageRead::new(
                            *stripe * coded.k + j as u64,
                            chunk,
                            c.crc,
                            c.version,
                        ));
                        page_of.push((x, j));
                    } else {
                        parity.push(ParityRead {
                            key: ParityKey {
                                stripe: *stripe,
                                slot: (j - k) as u8,
                            },
                            buf: chunk,
                            cover,
                            parity: parity_count,
                            outcome: Outcome::Pending,
                        });
                        parity_of.push((x, j));
                    }
                }
            }
            let start = std::time::Instant::now();
            let result = inner.members[server].exchange(&mut pages, &mut parity);
            inner.served[server].timed(start);
            let outcomes: Vec<(Outcome, (usize, usize))> = pages
                .iter()
                .map(|r| r.outcome)
                .zip(page_of)
                .chain(parity.iter().map(|r| r.outcome).zip(parity_of))
                .collect();
            drop(pages);
            drop(parity);
            let mut failed_here = false;
            let mut bad: Vec<(u64, usize)> = Vec::new();
            for (outcome, (x, j)) in outcomes {
                let job = &mut jobs[x];
                match outcome {
                    Outcome::Done => job.slots[j] = Slot::Have,
                    Outcome::Failed(FailureKind::Lost) => {
                        job.slots[j] = Slot::Gone;
                        bad.push((job.stripe, j));
                    }
                    _ => {
                        job.slots[j] = Slot::Gone;
                        job.transient = true;
                        failed_here = true;
                    }
                }
            }
            if !bad.is_empty() {
                // Missing, old or damaged there: no longer counted as held.
                let mut records = inner.records.lock();
                for &(stripe, j) in &bad {
                    if j < k {
                        let x = jobs.iter().position(|job| job.stripe == stripe);
                        let version = x.map_or(0, |x| jobs[x].snap.copies[j].version);
                        records.drop_holder(coded.first_page(stripe) + j as u64, version, server);
                    } else {
                        records.drop_parity(stripe, j - k, server);
                    }
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
                    first_error.get_or_insert(e);
                }
            }
        }
    }
    for job in jobs.iter_mut() {
        if job.wanted_have() {
            job.done = true;
            continue;
        }
        let present: Vec<bool> = job.slots.iter().map(|s| *s == Slot::Have).collect();
        if present.iter().filter(|&&p| p).count() < k {
            continue;
        }
        let missing: Vec<usize> = (0..k).filter(|&j| !present[j]).collect();
        let mut values: Vec<(&mut [u8], bool)> = job
            .buf
            .as_mut_slice()
            .chunks_mut(PAGE_SIZE)
            .zip(&present)
            .map(|(c, &p)| (c, p))
            .collect();
        if coded.code.rebuild(&mut values).is_err() {
            continue;
        }
        drop(values);
        coded
            .counters
            .bytes_coded
            .fetch_add((k * PAGE_SIZE) as u64, Relaxed);
        // Each rebuilt page must be exactly the one the records know.
        let ok = missing
            .iter()
            .all(|&j| crc32c::crc32c(job.page_bytes(j)) == job.snap.copies[j].crc);
        if ok {
            for &j in &missing {
                job.slots[j] = Slot::Have;
                job.rebuilt |= 1 << j;
            }
            job.done = job.wanted_have();
        }
    }
    first_error
}

/// Reads a batch (`PageStore::fetch` of a coded pool). `counted`: a fetch of the pager.
pub(super) fn fetch(
    inner: &Inner,
    coded: &Coded,
    batch: &mut [PageRead<'_>],
    counted: bool,
) -> Result<(), StoreError> {
    let mut first_error = refuse_bad_reads(&inner.name, inner.pages, batch.iter_mut());
    let mut holder: Vec<Option<usize>> = vec![None; batch.len()];
    let mut degraded: Vec<bool> = vec![false; batch.len()];
    // Asked for with another checksum than the pool's: no rebuild can give those bytes.
    let mut unbuildable: Vec<bool> = vec![false; batch.len()];
    let up = inner.up_mask();
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
                    first_error.get_or_insert(crate::store::lost_read(&inner.name, r, found));
                }
            } else if copy.version == r.version {
                holder[i] = inner.next_holder(r.page, copy.holders & up);
                unbuildable[i] = copy.crc != r.crc;
                degraded[i] = holder[i].is_none() && !unbuildable[i];
            } else {
                r.outcome = Outcome::Failed(FailureKind::Lost);
                first_error.get_or_insert(inner.pool_error(
                    StoreOp::Fetch,
                    r.page,
                    FailureKind::Lost,
                    format!(
                        "the pool holds version {} of the page, not {}",
                        copy.version, r.version
                    ),
                ));
            }
        }
    }
    // The normal round: each data value from its holder, one pipeline per server.
    for server in 0..inner.members.len() {
        if !holder.contains(&Some(server)) {
            continue;
        }
        let mut sub: Vec<PageRead<'_>> = Vec::new();
        let mut positions: Vec<usize> = Vec::new();
        for (i, r) in batch.iter_mut().enumerate() {
            if holder[i] == Some(server) && r.outcome == Outcome::Pending {
                sub.push(PageRead::new(r.page, &mut *r.buf, r.crc, r.version));
                positions.push(i);
            }
        }
        let start = std::time::Instant::now();
        let result = inner.members[server].fetch(&mut sub);
        inner.served[server].timed(start);
        let outcomes: Vec<(u64, u32, Outcome)> =
            sub.iter().map(|r| (r.page, r.version, r.outcome)).collect();
        drop(sub);
        let mut failed_here = false;
        let mut fetched = 0;
        let mut bad = Vec::new();
        for (&i, (page, version, outcome)) in positions.iter().zip(outcomes) {
            match outcome {
                Outcome::Done => {
                    batch[i].outcome = Outcome::Done;
                    fetched += 1;
                }
                _ if unbuildable[i] => batch[i].outcome = outcome,
                Outcome::Failed(FailureKind::Lost) => {
                    bad.push((page, version));
                    degraded[i] = true;
                }
                _ => {
                    failed_here = true;
                    degraded[i] = true;
                }
            }
        }
        if counted {
            inner.served[server].fetched.fetch_add(fetched, Relaxed);
        }
        if !bad.is_empty() {
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
                first_error.get_or_insert(e);
            }
        }
    }
    // Degraded reads: the stripes of the pages not read yet.
    let mut by_stripe: BTreeMap<u64, u32> = BTreeMap::new();
    for (i, r) in batch.iter().enumerate() {
        if degraded[i] && r.outcome == Outcome::Pending {
            *by_stripe.entry(coded.stripe(r.page)).or_default() |= 1 << (r.page % coded.k);
        }
    }
    if !by_stripe.is_empty() {
        // A degraded read waits for a write of its stripes under way: their values on the
        // servers and the records agree only between two writes.
        let _stripes = inner.lock_stripes(by_stripe.keys().map(|&s| coded.first_page(s)));
        let mut jobs: Vec<Job> = {
            let records = inner.records.lock();
            by_stripe
                .iter()
                .map(|(&stripe, &wanted)| {
                    let snap = Snapshot::take(inner, coded, &records, stripe);
                    (stripe, snap, wanted)
                })
                .collect::<Vec<_>>()
        }
        .into_iter()
        .map(|(stripe, snap, wanted)| Job::new(inner, coded, stripe, snap, wanted))
        .collect();
        // Stripe-mates this fetch read already are not read again.
        for job in &mut jobs {
            for r in batch.iter() {
                if r.outcome == Outcome::Done && coded.stripe(r.page) == job.stripe {
                    let j = (r.page % coded.k) as usize;
                    let c = job.snap.copies[j];
                    if c.version == r.version && c.crc == r.crc {
                        job.have(j, r.buf);
                    }
                }
            }
        }
        if let Some(e) = gather(inner, coded, &mut jobs) {
            first_error.get_or_insert(e);
        }
        for (i, r) in batch.iter_mut().enumerate() {
            if !(degraded[i] && r.outcome == Outcome::Pending) {
                continue;
            }
            coded.counters.degraded_reads.fetch_add(1, Relaxed);
            let job = jobs
                .iter()
                .find(|job| job.stripe == coded.stripe(r.page))
                .expect("a job per degraded stripe");
            let j = (r.page % coded.k) as usize;
            let c = job.snap.copies[j];
            if job.done && c.version == r.version && c.crc == r.crc {
                r.buf.copy_from_slice(job.page_bytes(j));
                if crc32c::crc32c(r.buf) == r.crc {
                    r.outcome = Outcome::Done;
                    if job.rebuilt & (1 << j) != 0 {
                        coded.counters.rebuilt.fetch_add(1, Relaxed);
                    }
                    continue;
                }
            }
            let kind = if job.transient && !job.done {
                FailureKind::Transient
            } else {
                FailureKind::Lost
            };
            r.outcome = Outcome::Failed(kind);
            first_error = Some(inner.pool_error(
                StoreOp::Fetch,
                r.page,
                kind,
                format!(
                    "its server cannot give it and fewer than {} values of its stripe {} \
                     match the pool's records{}",
                    coded.data(),
                    job.stripe,
                    if kind == FailureKind::Transient {
                        " (a server holding some is down)"
                    } else {
                        ""
                    }
                ),
            ));
        }
    }
    // Left pending (a failed page with no degraded read): cannot happen, but never silently.
    for r in batch.iter_mut().filter(|r| r.outcome == Outcome::Pending) {
        r.outcome = Outcome::Failed(FailureKind::Transient);
    }
    if batch.iter().all(|r| r.outcome.is_done()) {
        Ok(())
    } else {
        Err(first_error.unwrap_or_else(|| {
            inner.pool_error(
                StoreOp::Fetch,
                batch[0].page,
                FailureKind::Transient,
                "a page of the batch could not be read".into(),
            )
        }))
    }
}

/// One value to write: a data page or a parity value of a stripe.
struct Outgoing<'a> {
    stripe: u64,
    slot: usize,
    page: u64,
    buf: &'a [u8],
    crc: u32,
    version: u32,
    cover: &'a [Cover],
    /// The server tried first (where the value is now), before the home and the spares.
    prefer: Option<usize>,
    /// May share a server with another value of its stripe when no other is up (a data page
    /// of a write-back: stored with less redundancy rather than not at all).
    crowd: bool,
    tried: u64,
    server: Option<usize>,
    acked: Option<usize>,
}

/// Writes every value to a server: its preferred one, its home, then the spares, each up,
/// not tried, and holding no other value of the stripe (`used`, by stripe); one pipeline per
/// server a round, a failed value tried on the next server in the next round.
fn send(
    inner: &Inner,
    coded: &Coded,
    values: &mut [Outgoing<'_>],
    used: &mut BTreeMap<u64, u64>,
) -> Option<StoreError> {
    let k = coded.data();
    let parity_count = u8::try_from(coded.m()).expect("at most 4");
    let mut first_error = None;
    for _ in 0..=inner.members.len() {
        let up = inner.up_mask();
        let mut any = false;
        for v in values.iter_mut() {
            if v.acked.is_some() || v.server.is_some() {
                continue;
            }
            let taken = used.get(&v.stripe).copied().unwrap_or(0);
            let candidates = inner.placement.stripe_candidates(
                coded.first_page(v.stripe),
                v.stripe,
                coded.width,
                v.slot,
            );
            let order = || {
                v.prefer
                    .into_iter()
                    .chain(candidates.servers().iter().map(|&s| usize::from(s)))
            };
            let free = |s: usize| up & (1 << s) != 0 && v.tried & (1 << s) == 0;
            // A data value with no server free of its stripe still goes to an up one (the
            // page is stored, with less redundancy, and repair moves it when it can).
            let choice = order()
                .find(|&s| free(s) && taken & (1 << s) == 0)
                .or_else(|| {
                    if !v.crowd {
                        return None;
                    }
                    // Any server of the group's ranking will do.
                    let all = inner.placement.ranking(coded.first_page(v.stripe));
                    let found = all
                        .servers()
                        .iter()
                        .map(|&s| usize::from(s))
                        .find(|&s| free(s));
                    found
                });
            if let Some(s) = choice {
                v.server = Some(s);
                v.tried |= 1 << s;
                *used.entry(v.stripe).or_default() |= 1 << s;
                any = true;
            }
        }
        if !any {
            break;
        }
        for server in 0..inner.members.len() {
            let mut pages: Vec<PageWrite<'_>> = Vec::new();
            let mut parity: Vec<ParityWrite<'_>> = Vec::new();
            let mut page_of = Vec::new();
            let mut parity_of = Vec::new();
            for (x, v) in values.iter().enumerate() {
                if v.server != Some(server) || v.acked.is_some() {
                    continue;
                }
                if v.slot < k {
                    pages.push(PageWrite::with_crc(v.page, v.buf, v.crc, v.version));
                    page_of.push(x);
                } else {
                    parity.push(ParityWrite {
                        key: ParityKey {
                            stripe: v.stripe,
                            slot: (v.slot - k) as u8,
                        },
                        buf: v.buf,
                        cover: v.cover,
                        parity: parity_count,
                        outcome: Outcome::Pending,
                    });
                    parity_of.push(x);
                }
            }
            if pages.is_empty() && parity.is_empty() {
                continue;
            }
            let start = std::time::Instant::now();
            let result = inner.members[server].store_with_parity(&mut pages, &mut parity);
            inner.served[server].timed(start);
            let outcomes: Vec<(usize, Outcome)> = page_of
                .into_iter()
                .zip(pages.iter().map(|w| w.outcome))
                .chain(parity_of.into_iter().zip(parity.iter().map(|w| w.outcome)))
                .collect();
            let mut stored = 0;
            for (x, outcome) in outcomes {
                let v = &mut values[x];
                if outcome == Outcome::Done {
                    v.acked = Some(server);
                    if v.slot < k {
                        stored += 1;
                    }
                } else {
                    // Another server next round (this one stays taken for the stripe: the
                    // value may still land there).
                    v.server = None;
                }
            }
            inner.served[server].stored.fetch_add(stored, Relaxed);
            match result {
                Ok(()) => inner.health[server].succeeded(),
                Err(e) if inner.members[server].is_full(&e) => {
                    inner.served[server].full.fetch_add(1, Relaxed);
                    first_error.get_or_insert(e);
                }
                Err(e) => {
                    inner.member_failed(server, &e);
                    first_error.get_or_insert(e);
                }
            }
        }
    }
    first_error
}

/// Writes a batch (`PageStore::store` of a coded pool), in rounds of consecutive writes that
/// touch at most [`STORE_STRIPES_PER_ROUND_MAX`] stripes: a round holds, for each of its
/// stripes, the other data values read, the parity values encoded and every value's request,
/// so the bound is what bounds the memory of a write (a batch of random pages, each in a
/// stripe of its own, would otherwise hold all of that for every page of an eviction batch).
pub(super) fn store(
    inner: &Inner,
    coded: &Coded,
    batch: &mut [PageWrite<'_>],
) -> Result<(), StoreError> {
    let mut first_error = None;
    let mut at = 0;
    while at < batch.len() {
        let mut stripes: BTreeSet<u64> = BTreeSet::new();
        let mut end = at;
        while end < batch.len() {
            let stripe = coded.stripe(batch[end].page);
            if !stripes.contains(&stripe) && stripes.len() == STORE_STRIPES_PER_ROUND_MAX {
                break;
            }
            stripes.insert(stripe);
            end += 1;
        }
        if let Err(e) = store_round(inner, coded, &mut batch[at..end]) {
            first_error.get_or_insert(e);
        }
        at = end;
    }
    first_error.map_or(Ok(()), Err)
}

/// One round of [`store`]: writes that touch at most [`STORE_STRIPES_PER_ROUND_MAX`] stripes.
fn store_round(
    inner: &Inner,
    coded: &Coded,
    batch: &mut [PageWrite<'_>],
) -> Result<(), StoreError> {
    debug_assert!(
        batch
            .iter()
            .map(|w| coded.stripe(w.page))
            .collect::<BTreeSet<u64>>()
            .len()
            <= STORE_STRIPES_PER_ROUND_MAX
    );
    let mut first_error = refuse_bad_writes(&inner.name, inner.pages, batch);
    let positions: Vec<usize> = (0..batch.len())
        .filter(|&i| batch[i].outcome == Outcome::Pending)
        .collect();
    if positions.is_empty() {
        return first_error.map_or(Ok(()), Err);
    }
    let k = coded.data();
    let _stripes = inner.lock_stripes(positions.iter().map(|&i| batch[i].page));
    // The batch's pages by stripe, slot by slot.
    let mut stripes: BTreeMap<u64, Vec<Option<usize>>> = BTreeMap::new();
    for &i in &positions {
        let slot = (batch[i].page % coded.k) as usize;
        stripes
            .entry(coded.stripe(batch[i].page))
            .or_insert_with(|| vec![None; k])[slot] = Some(i);
    }
    let snaps: BTreeMap<u64, Snapshot> = {
        let records = inner.records.lock();
        stripes
            .keys()
            .map(|&s| (s, Snapshot::take(inner, coded, &records, s)))
            .collect()
    };
    // Round 1: the other data values of stripes the batch does not fill.
    let mut jobs: Vec<Job> = Vec::new();
    for (&stripe, slots) in &stripes {
        let snap = &snaps[&stripe];
        let wanted = (0..k)
            .filter(|&j| slots[j].is_none() && snap.copies[j].version != 0)
            .fold(0u32, |w, j| w | 1 << j);
        if wanted != 0 {
            jobs.push(Job::new(inner, coded, stripe, snap.clone(), wanted));
        }
    }
    if !jobs.is_empty() {
        let _ = gather(inner, coded, &mut jobs);
    }
    // Encode each stripe whose K data pages are known.
    struct Encoded {
        cover: Vec<Cover>,
        parity: Vec<Vec<u8>>,
    }
    let zeros = vec![0u8; PAGE_SIZE];
    let mut encoded: BTreeMap<u64, Encoded> = BTreeMap::new();
    for (&stripe, slots) in &stripes {
        let snap = &snaps[&stripe];
        let job = jobs.iter().find(|j| j.stripe == stripe);
        if job.is_some_and(|j| !j.done) {
            continue; // Its data values are written alone; its parity bytes are cleared.
        }
        let data: Vec<&[u8]> = (0..k)
            .map(|j| match slots[j] {
                Some(i) => batch[i].buf,
                None if snap.copies[j].version == 0 => &zeros[..],
                None => job.expect("a job for a partial stripe").page_bytes(j),
            })
            .collect();
        let mut parity = vec![vec![0u8; PAGE_SIZE]; coded.m()];
        coded
            .code
            .encode(&data, &mut parity)
            .expect("K pages and M parity pages");
        coded
            .counters
            .bytes_coded
            .fetch_add((k * PAGE_SIZE) as u64, Relaxed);
        let mut cover = snap.cover();
        for j in 0..k {
            if let Some(i) = slots[j] {
                cover[j] = Cover {
                    version: batch[i].version,
                    crc: batch[i].crc,
                };
            }
        }
        encoded.insert(stripe, Encoded { cover, parity });
    }
    // Round 2: every data value and every parity value, one pipeline per server.
    let mut used: BTreeMap<u64, u64> = BTreeMap::new();
    for (&stripe, slots) in &stripes {
        let snap = &snaps[&stripe];
        let taken = slots
            .iter()
            .zip(&snap.copies)
            .filter(|(slot, c)| slot.is_none() && c.version != 0)
            .fold(0u64, |t, (_, c)| t | c.holders);
        used.insert(stripe, taken);
    }
    let mut values: Vec<Outgoing<'_>> = Vec::new();
    for (&stripe, slots) in &stripes {
        let snap = &snaps[&stripe];
        for (j, slot) in slots.iter().enumerate() {
            if let Some(i) = *slot {
                let w = &batch[i];
                let holders = snap.copies[j].holders;
                values.push(Outgoing {
                    stripe,
                    slot: j,
                    page: w.page,
                    buf: w.buf,
                    crc: w.crc,
                    version: w.version,
                    cover: &[],
                    crowd: true,
                    prefer: (holders.count_ones() == 1).then(|| holders.trailing_zeros() as usize),
                    tried: 0,
                    server: None,
                    acked: None,
                });
            }
        }
        if let Some(e) = encoded.get(&stripe) {
            for (m, p) in e.parity.iter().enumerate() {
                values.push(Outgoing {
                    stripe,
                    slot: k + m,
                    page: 0,
                    buf: p,
                    crc: 0,
                    version: 0,
                    cover: &e.cover,
                    crowd: false,
                    prefer: records::parity_server(snap.parity, m),
                    tried: 0,
                    server: None,
                    acked: None,
                });
            }
        }
    }
    if let Some(e) = send(inner, coded, &mut values, &mut used) {
        first_error.get_or_insert(e);
    }
    // The records: acknowledged data values, and parity only where all of its stripe's new
    // data values were acknowledged (invariant P).
    let mut short = false;
    let mut acked_page: BTreeMap<u64, usize> = BTreeMap::new();
    let mut acked_parity: BTreeMap<(u64, usize), usize> = BTreeMap::new();
    for v in &values {
        if let Some(s) = v.acked {
            if v.slot < k {
                acked_page.insert(v.page, s);
            } else {
                acked_parity.insert((v.stripe, v.slot - k), s);
            }
        }
    }
    drop(values);
    let mut failed = None;
    {
        let mut records = inner.records.lock();
        for (&stripe, slots) in &stripes {
            let mut all_acked = true;
            for &i in slots.iter().flatten() {
                let w = &mut batch[i];
                match acked_page.get(&w.page) {
                    Some(&s) => {
                        records.set(w.page, w.crc, w.version, 1 << s);
                        w.outcome = Outcome::Done;
                    }
                    None => {
                        all_acked = false;
                        w.outcome = Outcome::Failed(FailureKind::Transient);
                        failed.get_or_insert(w.page);
                    }
                }
            }
            let mut word = 0u64;
            if all_acked && encoded.contains_key(&stripe) {
                for m in 0..coded.m() {
                    word = records::with_parity_server(
                        word,
                        m,
                        acked_parity.get(&(stripe, m)).copied(),
                    );
                }
            }
            records.set_parity(stripe, word);
            if (0..coded.m()).any(|m| records::parity_server(word, m).is_none()) {
                short = true;
            }
        }
    }
    if short {
        coded.counters.stripes_left_short.fetch_add(1, Relaxed);
        inner.repair_needed.store(true, Relaxed);
        inner.wake_thread();
    }
    if batch.iter().all(|w| w.outcome.is_done()) {
        return Ok(());
    }
    match failed {
        None => first_error.map_or(Ok(()), Err),
        Some(page) => Err(first_error.unwrap_or_else(|| {
            inner.pool_error(
                StoreOp::Store,
                page,
                FailureKind::Transient,
                "no server of the pool that holds nothing else of its stripe is up".into(),
            )
        })),
    }
}

/// Forgets pages `[first, first + count)` (`PageStore::discard` of a coded pool): a stripe
/// discarded whole loses its K+M values; a stripe discarded in part has its parity encoded
/// again with zeros in those slots before their old data values are deleted.
pub(super) fn discard(
    inner: &Inner,
    coded: &Coded,
    first: u64,
    count: u64,
) -> Result<(), StoreError> {
    let Some(range) = discard_range(&inner.name, first, count, inner.pages)? else {
        return Ok(());
    };
    let top = inner.records.lock().top();
    let range = range.start..range.end.min(top);
    if range.is_empty() {
        return Ok(());
    }
    let k = coded.data();
    let _stripes = if range.end - range.start >= super::STRIPES as u64 * GROUP_PAGES {
        inner.lock_stripes(0..super::STRIPES as u64 * GROUP_PAGES)
    } else {
        inner.lock_stripes(range.clone())
    };
    let mut page_deletes: Vec<Vec<u64>> = vec![Vec::new(); inner.members.len()];
    let mut parity_deletes: Vec<Vec<ParityKey>> = vec![Vec::new(); inner.members.len()];
    let mut jobs: Vec<Job> = Vec::new();
    {
        let mut records = inner.records.lock();
        for stripe in coded.stripe(range.start)..=coded.stripe(range.end - 1) {
            let snap = Snapshot::take(inner, coded, &records, stripe);
            if !snap.live() {
                continue;
            }
            let first_page = coded.first_page(stripe);
            let mut kept = 0u32;
            for (j, c) in snap.copies.iter().enumerate() {
                let page = first_page + j as u64;
                if c.version == 0 {
                    continue;
                }
                if range.contains(&page) {
                    for (s, list) in page_deletes.iter_mut().enumerate() {
                        if c.holders & (1 << s) != 0 {
                            list.push(page);
                        }
                    }
                    records.clear(page);
                } else {
                    kept |= 1 << j;
                }
            }
            // The old parity covers the discarded versions: not valid from now on.
            records.set_parity(stripe, 0);
            if kept == 0 {
                for m in 0..coded.m() {
                    if let Some(s) = records::parity_server(snap.parity, m) {
                        parity_deletes[s].push(ParityKey {
                            stripe,
                            slot: m as u8,
                        });
                    }
                }
            } else {
                jobs.push(Job::new(inner, coded, stripe, snap, kept));
            }
        }
    }
    let mut first_error = None;
    if !jobs.is_empty() {
        let _ = gather(inner, coded, &mut jobs);
        let snaps_now: Vec<Snapshot> = {
            let records = inner.records.lock();
            jobs.iter()
                .map(|j| Snapshot::take(inner, coded, &records, j.stripe))
                .collect()
        };
        // Per stripe: its new cover, its parity pages, and where its parity was.
        type Reencoded = (u64, Vec<Cover>, Vec<Vec<u8>>, u64);
        let mut parity: Vec<Reencoded> = Vec::new();
        for (job, now) in jobs.iter().zip(&snaps_now) {
            if !job.done {
                inner.repair_needed.store(true, Relaxed);
                continue;
            }
            let zeros = vec![0u8; PAGE_SIZE];
            let data: Vec<&[u8]> = (0..k)
                .map(|j| {
                    if now.copies[j].version == 0 {
                        &zeros[..]
                    } else {
                        job.page_bytes(j)
                    }
                })
                .collect();
            let mut p = vec![vec![0u8; PAGE_SIZE]; coded.m()];
            coded
                .code
                .encode(&data, &mut p)
                .expect("K pages and M parity pages");
            coded
                .counters
                .bytes_coded
                .fetch_add((k * PAGE_SIZE) as u64, Relaxed);
            parity.push((job.stripe, now.cover(), p, job.snap.parity));
        }
        let mut used: BTreeMap<u64, u64> = BTreeMap::new();
        for (job, now) in jobs.iter().zip(&snaps_now) {
            used.insert(job.stripe, now.copies.iter().fold(0, |u, c| u | c.holders));
        }
        let mut values: Vec<Outgoing<'_>> = Vec::new();
        for (stripe, cover, p, old_word) in &parity {
            for (m, buf) in p.iter().enumerate() {
                values.push(Outgoing {
                    stripe: *stripe,
                    slot: k + m,
                    page: 0,
                    buf,
                    crc: 0,
                    version: 0,
                    cover,
                    crowd: false,
                    prefer: records::parity_server(*old_word, m),
                    tried: 0,
                    server: None,
                    acked: None,
                });
            }
        }
        if let Some(e) = send(inner, coded, &mut values, &mut used) {
            first_error.get_or_insert(e);
        }
        let mut records = inner.records.lock();
        for (stripe, _, _, _) in &parity {
            let mut word = 0u64;
            for v in values.iter().filter(|v| v.stripe == *stripe) {
                word = records::with_parity_server(word, v.slot - k, v.acked);
            }
            records.set_parity(*stripe, word);
            if (0..coded.m()).any(|m| records::parity_server(word, m).is_none()) {
                inner.repair_needed.store(true, Relaxed);
            }
        }
    }
    // Best effort: a value left behind is never served (its records are gone).
    let up = inner.up_mask();
    for s in 0..inner.members.len() {
        if up & (1 << s) == 0 {
            continue;
        }
        if !page_deletes[s].is_empty() {
            if let Err(e) = inner.members[s].delete(&page_deletes[s]) {
                first_error.get_or_insert(e);
            }
        }
        if !parity_deletes[s].is_empty() {
            if let Err(e) = inner.members[s].delete_parity(&parity_deletes[s]) {
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Looks at the stripes from page `cursor` on and makes up to
/// [`REPAIR_STRIPES_PER_ROUND_MAX`] of them whole: data values whose holder is not up are
/// rebuilt and written again (home, else a spare holding nothing of the stripe), then parity
/// values missing or on a server not up are encoded and written. Returns where to go on (a
/// page) and whether everything looked at was whole.
pub(super) fn repair_round(inner: &Inner, coded: &Coded, cursor: u64, top: u64) -> (u64, bool) {
    let up = inner.up_mask();
    let k = coded.data();
    let first_stripe = coded.stripe(cursor);
    let end_stripe = top
        .div_ceil(coded.k)
        .min(first_stripe + REPAIR_SCAN_STRIPES_PER_ROUND);
    let mut short: Vec<u64> = Vec::new();
    let mut next = coded.first_page(end_stripe);
    {
        let records = inner.records.lock();
        for stripe in first_stripe..end_stripe {
            if !Snapshot::take(inner, coded, &records, stripe).whole(inner, coded, up) {
                short.push(stripe);
                if short.len() == REPAIR_STRIPES_PER_ROUND_MAX {
                    next = coded.first_page(stripe + 1);
                    break;
                }
            }
        }
    }
    if short.is_empty() {
        return (next, true);
    }
    let _stripes = inner.lock_stripes(short.iter().map(|&s| coded.first_page(s)));
    let mut jobs: Vec<Job> = {
        let records = inner.records.lock();
        short
            .iter()
            .map(|&s| (s, Snapshot::take(inner, coded, &records, s)))
            .collect::<Vec<_>>()
    }
    .into_iter()
    .map(|(stripe, snap)| {
        let live = (0..k)
            .filter(|&j| snap.copies[j].version != 0)
            .fold(0u32, |w, j| w | 1 << j);
        Job::new(inner, coded, stripe, snap, live)
    })
    .collect();
    let _ = gather(inner, coded, &mut jobs);
    let up = inner.up_mask();
    let mut parity: BTreeMap<u64, (Vec<Cover>, Vec<Vec<u8>>)> = BTreeMap::new();
    for job in jobs.iter().filter(|j| j.done) {
        let data: Vec<&[u8]> = (0..k).map(|j| job.page_bytes(j)).collect();
        let mut p = vec![vec![0u8; PAGE_SIZE]; coded.m()];
        coded
            .code
            .encode(&data, &mut p)
            .expect("K pages and M parity pages");
        coded
            .counters
            .bytes_coded
            .fetch_add((k * PAGE_SIZE) as u64, Relaxed);
        parity.insert(job.stripe, (job.cover.clone(), p));
    }
    let mut used: BTreeMap<u64, u64> = BTreeMap::new();
    let mut values: Vec<Outgoing<'_>> = Vec::new();
    for job in jobs.iter().filter(|j| j.done) {
        let snap = &job.snap;
        let (taken, data_moves, parity_moves) = snap.placed(inner, coded, up);
        used.insert(job.stripe, taken);
        for (j, c) in snap.copies.iter().enumerate() {
            if data_moves & (1 << j) != 0 {
                values.push(Outgoing {
                    stripe: job.stripe,
                    slot: j,
                    page: coded.first_page(job.stripe) + j as u64,
                    buf: job.page_bytes(j),
                    crc: c.crc,
                    version: c.version,
                    cover: &[],
                    crowd: false,
                    prefer: None,
                    tried: 0,
                    server: None,
                    acked: None,
                });
            }
        }
        let (cover, p) = &parity[&job.stripe];
        for (m, buf) in p.iter().enumerate() {
            if parity_moves & (1 << m) != 0 {
                values.push(Outgoing {
                    stripe: job.stripe,
                    slot: k + m,
                    page: 0,
                    buf,
                    crc: 0,
                    version: 0,
                    cover,
                    crowd: false,
                    prefer: None,
                    tried: 0,
                    server: None,
                    acked: None,
                });
            }
        }
    }
    let _ = send(inner, coded, &mut values, &mut used);
    let mut written = 0;
    {
        let mut records = inner.records.lock();
        for job in jobs.iter().filter(|j| j.done) {
            let now = Snapshot::take(inner, coded, &records, job.stripe);
            if now.cover() != job.cover {
                continue; // Changed meanwhile (cannot happen under the stripe lock).
            }
            let mut word = now.parity;
            for v in values.iter().filter(|v| v.stripe == job.stripe) {
                let Some(s) = v.acked else { continue };
                written += 1;
                if v.slot < k {
                    let c = job.snap.copies[v.slot];
                    records.set(v.page, c.crc, c.version, 1 << s);
                } else {
                    word = records::with_parity_server(word, v.slot - k, Some(s));
                }
            }
            records.set_parity(job.stripe, word);
        }
    }
    coded.counters.repairs.fetch_add(written, Relaxed);
    (next, false)
}

/// The coded pool's statistics.
pub(super) fn report(inner: &Inner, coded: &Coded) -> Vec<(String, String)> {
    let up = inner.up_mask();
    let (mut short, mut stripes) = (0u64, 0u64);
    {
        let records = inner.records.lock();
        for stripe in 0..records.stripes_top() {
            let snap = Snapshot::take(inner, coded, &records, stripe);
            if snap.live() {
                stripes += 1;
                if !snap.whole(inner, coded, up) {
                    short += 1;
                }
            }
        }
    }
    let c = &coded.counters;
    vec![
        (
            "pool_redundancy".to_string(),
            format!("rs:{}+{}", coded.data(), coded.m()),
        ),
        ("pool_stripes".to_string(), stripes.to_string()),
        ("pool_stripes_short".to_string(), short.to_string()),
        (
            "pool_rebuilt_pages".to_string(),
            c.rebuilt.load(Relaxed).to_string(),
        ),
        (
            "pool_degraded_reads".to_string(),
            c.degraded_reads.load(Relaxed).to_string(),
        ),
        (
            "pool_stripe_repairs".to_string(),
            c.repairs.load(Relaxed).to_string(),
        ),
        (
            "pool_bytes_coded".to_string(),
            c.bytes_coded.load(Relaxed).to_string(),
        ),
        (
            "pool_stripes_written_short".to_string(),
            c.stripes_left_short.load(Relaxed).to_string(),
        ),
    ]
}

#[cfg(test)]
#[path = "coded_tests.rs"]
mod tests;
