//! The coded pool over in-memory members that go down, come back empty, fail parity or data
//! writes, or hold old or forged parity: a page is served right or not at all, and repair
//! brings every stripe back to K+M values.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::super::member::test_member::TestMember;
use super::super::member::Member;
use super::super::*;
use crate::config::CodeShape;
use crate::io::test_support::{fill, pages, Page};
use crate::store::conformance::{check_all, SUITE_PAGES};
use crate::store::parity::{self, Cover, ParityKey, ParityRead, ParityWrite};
use crate::PAGE_SIZE;

const HEAP_BYTES: u64 = SUITE_PAGES * PAGE_BYTES;
/// How long a test waits for the pool's thread to repair, at most.
const REPAIR_WAIT_MS: u64 = 20_000;

/// A member shared between the pool and the test (which flips its switches).
struct Shared(Arc<TestMember>);

impl PageStore for Shared {
    fn fetch(&self, batch: &mut [PageRead<'_>]) -> Result<(), StoreError> {
        self.0.fetch(batch)
    }
    fn store(&self, batch: &mut [PageWrite<'_>]) -> Result<(), StoreError> {
        self.0.store(batch)
    }
    fn discard(&self, first: u64, count: u64) -> Result<(), StoreError> {
        self.0.discard(first, count)
    }
    fn describe(&self) -> String {
        self.0.describe()
    }
}

impl Member for Shared {
    fn server(&self) -> &str {
        self.0.server()
    }
    fn info(&self) -> Result<crate::store::memcached::ServerInfo, StoreError> {
        self.0.info()
    }
    fn delete(&self, pages: &[u64]) -> Result<(), StoreError> {
        self.0.delete(pages)
    }
    fn reconnect(&self) {}
    fn wire_bytes(&self) -> (u64, u64) {
        (0, 0)
    }
    fn exchange(
        &self,
        pages: &mut [PageRead<'_>],
        parity: &mut [ParityRead<'_>],
    ) -> Result<(), StoreError> {
        self.0.exchange(pages, parity)
    }
    fn store_with_parity(
        &self,
        pages: &mut [PageWrite<'_>],
        parity: &mut [ParityWrite<'_>],
    ) -> Result<(), StoreError> {
        self.0.store_with_parity(pages, parity)
    }
    fn delete_parity(&self, keys: &[ParityKey]) -> Result<(), StoreError> {
        self.0.delete_parity(keys)
    }
    fn pipelines(&self) -> u64 {
        self.0.pipelines()
    }
}

pub(crate) fn coded_pool(n: usize, k: usize, m: usize) -> (PoolStore, Vec<Arc<TestMember>>) {
    let members: Vec<Arc<TestMember>> = (0..n)
        .map(|i| Arc::new(TestMember::new(&format!("10.0.1.{i}:11211"), HEAP_BYTES)))
        .collect();
    let boxed: Vec<Box<dyn Member>> = members
        .iter()
        .map(|m| Box::new(Shared(Arc::clone(m))) as Box<dyn Member>)
        .collect();
    let settings = PoolSettings {
        replication: Replication::Pessimistic,
        code: Some(CodeShape { data: k, parity: m }),
        ..PoolSettings::default()
    };
    let store = PoolStore::new("test://coded".into(), boxed, HEAP_BYTES, settings).expect("pool");
    (store, members)
}

fn stat(store: &PoolStore, name: &str) -> u64 {
    store
        .report()
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no {name} in the report"))
        .1
        .parse()
        .expect("a number")
}

fn contents(n: usize, seed: u64) -> Vec<Page> {
    let mut src = pages(n);
    for (i, p) in src.iter_mut().enumerate() {
        fill(&mut p.0, seed.wrapping_mul(1000).wrapping_add(i as u64));
    }
    src
}

/// Stores the pages at `at` (page indexes) and returns each one's outcome.
fn store_at(store: &PoolStore, at: &[u64], src: &[Page], version: u32) -> Vec<Outcome> {
    let mut writes: Vec<PageWrite<'_>> = at
        .iter()
        .zip(src)
        .map(|(&p, s)| PageWrite::new(p, &s.0, version))
        .collect();
    let _ = store.store(&mut writes);
    writes.iter().map(|w| w.outcome).collect()
}

/// Fetches the pages at `at` and returns each one's outcome (a wrong page fails the test).
fn fetch_at(store: &PoolStore, at: &[u64], src: &[Page], version: u32) -> Vec<Outcome> {
    let mut dst = pages(src.len());
    let mut reads: Vec<PageRead<'_>> = dst
        .iter_mut()
        .zip(src)
        .zip(at)
        .map(|((d, s), &p)| PageRead::new(p, &mut d.0, crc32c::crc32c(&s.0), version))
        .collect();
    let _ = store.fetch(&mut reads);
    let outcomes: Vec<Outcome> = reads.iter().map(|r| r.outcome).collect();
    drop(reads);
    for (i, o) in outcomes.iter().enumerate() {
        if o.is_done() {
            assert!(dst[i].0 == src[i].0, "page {} served wrong", at[i]);
        }
    }
    outcomes
}

fn all_done(outcomes: &[Outcome]) -> bool {
    outcomes.iter().all(|o| o.is_done())
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_millis(REPAIR_WAIT_MS);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Full stripes, a lone page and two pages of one stripe.
fn layout() -> Vec<u64> {
    let mut at: Vec<u64> = (0..64).collect();
    at.push(100);
    at.extend([201, 202]);
    at.push(SUITE_PAGES - 1);
    at
}

#[test]
fn coded_pools_of_test_members_conform() {
    check_all(&|| Box::new(coded_pool(3, 2, 1).0));
    check_all(&|| Box::new(coded_pool(6, 4, 2).0));
    check_all(&|| Box::new(coded_pool(8, 4, 2).0));
}

/// Every page reads back byte for byte after any M members go down (each of the 15 pairs of
/// six for rs:4+2, each of three for rs:2+1), and the read was a rebuild.
#[test]
fn every_page_reads_back_after_any_m_members_go_down() {
    for (n, k, m) in [(3, 2, 1), (6, 4, 2)] {
        let at = layout();
        let src = contents(at.len(), 7);
        let downs: Vec<Vec<usize>> = (0u32..1 << n)
            .filter(|mask| mask.count_ones() as usize == m)
            .map(|mask| (0..n).filter(|i| mask & (1 << i) != 0).collect())
            .collect();
        for down in downs {
            let (store, members) = coded_pool(n, k, m);
            assert!(all_done(&store_at(&store, &at, &src, 1)));
            assert_eq!(stat(&store, "pool_stripes_short"), 0);
            for &d in &down {
                members[d].down.store(true, Relaxed);
            }
            let got = fetch_at(&store, &at, &src, 1);
            assert!(all_done(&got), "rs:{k}+{m} down {down:?}: {got:?}");
            assert!(stat(&store, "pool_rebuilt_pages") > 0, "down {down:?}");
        }
    }
}

/// One more member down than M: pages on the down members are not served (transient), the
/// others are, and nothing wrong is ever served.
#[test]
fn more_than_m_down_serves_nothing_wrong() {
    let (store, members) = coded_pool(6, 4, 2);
    let at = layout();
    let src = contents(at.len(), 8);
    assert!(all_done(&store_at(&store, &at, &src, 1)));
    for d in [0, 2, 4] {
        members[d].down.store(true, Relaxed);
    }
    let got = fetch_at(&store, &at, &src, 1);
    assert!(got.iter().any(|o| o.is_done()));
    assert!(
        got.contains(&Outcome::Failed(FailureKind::Transient)),
        "{got:?}"
    );
    assert!(
        !got.contains(&Outcome::Failed(FailureKind::Lost)),
        "{got:?}"
    );
}

/// A healthy read takes one pipeline per server, as one copy of replicas does; a read with a
/// server down takes at most two (the data round and the degraded round).
#[test]
fn reads_take_one_round_per_server_healthy_and_two_degraded() {
    let (store, members) = coded_pool(6, 4, 2);
    let at: Vec<u64> = (0..256).collect();
    let src = contents(at.len(), 9);
    assert!(all_done(&store_at(&store, &at, &src, 1)));
    let before: Vec<u64> = members.iter().map(|m| m.pipelines()).collect();
    assert!(all_done(&fetch_at(&store, &at, &src, 1)));
    for (i, m) in members.iter().enumerate() {
        assert_eq!(m.pipelines() - before[i], 1, "member {i}");
    }
    members[3].down.store(true, Relaxed);
    let before: Vec<u64> = members.iter().map(|m| m.pipelines()).collect();
    assert!(all_done(&fetch_at(&store, &at, &src, 1)));
    for (i, m) in members.iter().enumerate() {
        assert!(m.pipelines() - before[i] <= 2, "member {i}");
    }
    // A write-back of whole stripes is one pipeline per server too (data and parity).
    members[3].down.store(false, Relaxed);
    let before: Vec<u64> = members.iter().map(|m| m.pipelines()).collect();
    assert!(all_done(&store_at(&store, &at, &src, 2)));
    for (i, m) in members.iter().enumerate() {
        assert_eq!(m.pipelines() - before[i], 1, "member {i}");
    }
}

/// A parity write that fails leaves its stripe short (its byte cleared), the pages are
/// stored, and repair writes the parity later; then any two members may go.
#[test]
fn a_failed_parity_write_is_repaired() {
    let (store, members) = coded_pool(6, 4, 2);
    let at = layout();
    let src = contents(at.len(), 10);
    members[1].fail_parity_writes.store(true, Relaxed);
    assert!(all_done(&store_at(&store, &at, &src, 1)));
    assert!(stat(&store, "pool_stripes_short") > 0);
    members[1].fail_parity_writes.store(false, Relaxed);
    wait_until("every stripe is whole", || {
        stat(&store, "pool_stripes_short") == 0
    });
    assert!(stat(&store, "pool_stripe_repairs") > 0);
    members[0].down.store(true, Relaxed);
    members[5].down.store(true, Relaxed);
    assert!(all_done(&fetch_at(&store, &at, &src, 1)));
}

/// A data write that fails on a pool of exactly K+M servers has nowhere else to go: that page
/// is transient (it stays in the cache), its stripe's parity is not recorded (it would cover a
/// version the pool does not hold), and the page's older version still reads.
#[test]
fn a_failed_data_write_records_no_parity_for_its_stripe() {
    let (store, members) = coded_pool(6, 4, 2);
    let at: Vec<u64> = (0..4).collect();
    let v1 = contents(4, 11);
    assert!(all_done(&store_at(&store, &at, &v1, 1)));
    for m in &members {
        m.fail_page_writes.store(true, Relaxed);
    }
    let v2 = contents(4, 12);
    let got = store_at(&store, &at, &v2, 2);
    assert!(
        got.iter()
            .all(|o| *o == Outcome::Failed(FailureKind::Transient)),
        "{got:?}"
    );
    assert_eq!(stat(&store, "pool_stripes_short"), 1);
    for m in &members {
        m.fail_page_writes.store(false, Relaxed);
    }
    // The failed writes marked the members down: they come back at their next probe.
    wait_until("the members are up", || {
        stat(&store, "pool_servers_down") == 0
    });
    assert!(all_done(&fetch_at(&store, &at, &v1, 1)));
    wait_until("the stripe is whole again", || {
        stat(&store, "pool_stripes_short") == 0
    });
    members[0].down.store(true, Relaxed);
    members[1].down.store(true, Relaxed);
    assert!(all_done(&fetch_at(&store, &at, &v1, 1)));
}

/// The member holding `page`'s data value.
fn holder(store: &PoolStore, page: u64) -> usize {
    let h = store.stored_copy(page).holders;
    assert_eq!(h.count_ones(), 1, "one data value");
    h.trailing_zeros() as usize
}

/// The member holding parity `slot` of `stripe`.
fn parity_holder(store: &PoolStore, stripe: u64, slot: usize) -> Option<usize> {
    super::records::parity_server(store.inner.records.lock().parity(stripe), slot)
}

/// Versions are never combined: a stripe-mate rewritten while one parity write fails leaves
/// that member's old parity; with the changed page's member down the read rebuilds from the
/// other parity, and when only old or forged parity is left it is not served at all.
#[test]
fn values_of_other_versions_are_never_combined() {
    let (store, members) = coded_pool(6, 4, 2);
    let at: Vec<u64> = (0..4).collect();
    let v1 = contents(4, 13);
    assert!(all_done(&store_at(&store, &at, &v1, 1)));
    let p0 = parity_holder(&store, 0, 0).expect("parity 0");
    let p1 = parity_holder(&store, 0, 1).expect("parity 1");
    let old_p1 = members[p1].parity_value(0, 1).expect("held");
    // Page 2 again, with parity 0's write failing: its old parity stays there.
    members[p0].fail_parity_writes.store(true, Relaxed);
    let v2 = contents(1, 14);
    assert!(all_done(&store_at(&store, &[2], &v2, 2)));
    members[p0].fail_parity_writes.store(false, Relaxed);
    assert_eq!(
        parity_holder(&store, 0, 0),
        None,
        "the failed parity is not recorded"
    );
    let mut now = v1.clone();
    now[2] = v2[0].clone();
    let d = holder(&store, 2);
    members[d].down.store(true, Relaxed);
    // Rebuilt from pages 0, 1, 3 and parity 1 (parity 0 is old: not used).
    assert!(all_done(&fetch_at(&store, &[2], &v2, 2)));
    // Parity 1 replaced by its old value (a late write): only old parity is left.
    members[p1].put_parity_value(0, 1, old_p1);
    let got = fetch_at(&store, &[2], &v2, 2);
    assert!(!got[0].is_done(), "{got:?}");
    // A forged parity with the right cover but other bytes: the rebuilt page's crc is
    // checked, so it is refused too.
    let cover: Vec<Cover> = (0..4u64)
        .map(|p| {
            let c = store.stored_copy(p);
            Cover {
                version: c.version,
                crc: c.crc,
            }
        })
        .collect();
    let forged = vec![0x77u8; PAGE_SIZE];
    let mut value = Vec::new();
    parity::encode(
        &ParityWrite {
            key: ParityKey { stripe: 0, slot: 1 },
            buf: &forged,
            cover: &cover,
            parity: 2,
            outcome: Outcome::Pending,
        },
        &mut value,
    );
    {
        let mut records = store.inner.records.lock();
        let word = super::records::with_parity_server(records.parity(0), 1, Some(p1));
        records.set_parity(0, word);
    }
    members[p1].put_parity_value(0, 1, value);
    let got = fetch_at(&store, &[2], &v2, 2);
    // Not served (transient: the data value's own member may come back).
    assert!(!got[0].is_done(), "{got:?}");
    // The member back: the page is its own value again.
    members[d].down.store(false, Relaxed);
    wait_until("the member serves the page again", || {
        fetch_at(&store, &[2], &v2, 2)[0].is_done()
    });
    assert!(all_done(&fetch_at(
        &store,
        &[0, 1, 3],
        &[now[0].clone(), now[1].clone(), now[3].clone()],
        1
    )));
}

/// A member restarted empty: the pool finds the restart, forgets what it held, and repair
/// rebuilds its data values and parity; then any two members may go.
#[test]
fn a_member_restarted_empty_is_refilled() {
    let (store, members) = coded_pool(6, 4, 2);
    let at = layout();
    let src = contents(at.len(), 15);
    assert!(all_done(&store_at(&store, &at, &src, 1)));
    members[2].restart_empty();
    wait_until("the restart is found and repaired", || {
        stat(&store, "pool_restarts") == 1 && stat(&store, "pool_stripes_short") == 0
    });
    assert!(stat(&store, "pool_stripe_repairs") > 0);
    assert!(members[2].parity_values() > 0);
    members[0].down.store(true, Relaxed);
    members[4].down.store(true, Relaxed);
    assert!(all_done(&fetch_at(&store, &at, &src, 1)));
}

/// A member down with spares in the pool: new stripes go around it and repair moves what it
/// held onto spares, so every stripe is whole while it stays down; without spares its
/// stripes wait for it to come back.
#[test]
fn a_member_down_is_replaced_by_spares_or_waited_for() {
    let (store, members) = coded_pool(8, 4, 2);
    let at = layout();
    let src = contents(at.len(), 16);
    assert!(all_done(&store_at(&store, &at, &src, 1)));
    members[5].down.store(true, Relaxed);
    wait_until("the member is marked down", || {
        stat(&store, "pool_servers_down") == 1
    });
    let more: Vec<u64> = (1000..1064).collect();
    let src2 = contents(more.len(), 17);
    assert!(all_done(&store_at(&store, &more, &src2, 1)));
    wait_until("every stripe is whole on the others", || {
        stat(&store, "pool_stripes_short") == 0
    });
    members[1].down.store(true, Relaxed);
    members[6].down.store(true, Relaxed);
    assert!(all_done(&fetch_at(&store, &at, &src, 1)));
    assert!(all_done(&fetch_at(&store, &more, &src2, 1)));

    let (store, members) = coded_pool(6, 4, 2);
    assert!(all_done(&store_at(&store, &at, &src, 1)));
    members[3].down.store(true, Relaxed);
    wait_until("the member is marked down", || {
        stat(&store, "pool_servers_down") == 1
    });
    assert!(stat(&store, "pool_stripes_short") > 0);
    assert!(all_done(&fetch_at(&store, &at, &src, 1)));
    members[3].down.store(false, Relaxed);
    wait_until("the member is back and every stripe whole", || {
        stat(&store, "pool_servers_down") == 0 && stat(&store, "pool_stripes_short") == 0
    });
    members[0].down.store(true, Relaxed);
    members[3].down.store(true, Relaxed);
    assert!(all_done(&fetch_at(&store, &at, &src, 1)));
}

/// A discard of part of a stripe encodes its parity again without those pages; a discard of
/// whole stripes deletes their parity. The rest reads back after any two members go down.
#[test]
fn partial_and_whole_stripe_discards_keep_the_rest_whole() {
    for down in [[0, 1], [2, 3], [4, 5], [0, 5]] {
        let (store, members) = coded_pool(6, 4, 2);
        let at: Vec<u64> = (0..64).collect();
        let src = contents(at.len(), 18);
        assert!(all_done(&store_at(&store, &at, &src, 1)));
        let parity_before: usize = members.iter().map(|m| m.parity_values()).sum();
        assert_eq!(parity_before, 16 * 2);
        // Pages 5 and 6 (part of stripe 1), and pages 16..32 (stripes 4..8 whole).
        store.discard(5, 2).expect("discarded");
        store.discard(16, 16).expect("discarded");
        let parity_after: usize = members.iter().map(|m| m.parity_values()).sum();
        assert_eq!(parity_after, 12 * 2);
        assert_eq!(stat(&store, "pool_stripes_short"), 0);
        let kept: Vec<u64> = at
            .iter()
            .copied()
            .filter(|p| !(5..7).contains(p) && !(16..32).contains(p))
            .collect();
        let kept_src: Vec<Page> = kept.iter().map(|&p| src[p as usize].clone()).collect();
        let zeros = pages(2);
        for d in down {
            members[d].down.store(true, Relaxed);
        }
        assert!(all_done(&fetch_at(&store, &kept, &kept_src, 1)), "{down:?}");
        // Discarded pages read as zeros.
        assert!(all_done(&fetch_at(&store, &[5, 6], &zeros, 1)));
    }
}

/// Values of a stripe never share a server, whatever was down when they were written.
#[test]
fn values_of_a_stripe_never_share_a_server() {
    let (store, members) = coded_pool(7, 4, 2);
    let at: Vec<u64> = (0..128).collect();
    let src = contents(at.len(), 19);
    members[2].down.store(true, Relaxed);
    wait_until("the member is marked down", || {
        let _ = fetch_at(&store, &[0], &src[..1], 1);
        stat(&store, "pool_servers_down") == 1
    });
    assert!(all_done(&store_at(&store, &at, &src, 1)));
    members[2].down.store(false, Relaxed);
    let _ = store_at(&store, &at[..8], &src[..8], 2);
    for stripe in 0..32u64 {
        let mut servers: Vec<usize> = (0..4).map(|j| holder(&store, stripe * 4 + j)).collect();
        servers.extend((0..2).filter_map(|m| parity_holder(&store, stripe, m)));
        let n = servers.len();
        servers.sort_unstable();
        servers.dedup();
        assert_eq!(servers.len(), n, "stripe {stripe}");
    }
}

mod real {
    //! The same over real memcached servers on loopback.
    use super::super::super::tests::Raw;
    use super::*;
    use crate::seal::SealKey;
    use crate::store::memcached::test_server::TestServer;
    use crate::store::memcached::{random_heap_id, MemcachedServer};

    fn open_coded(addrs: &[String], k: usize, m: usize) -> PoolStore {
        let settings = PoolSettings {
            replication: Replication::Pessimistic,
            code: Some(CodeShape { data: k, parity: m }),
            ..PoolSettings::default()
        };
        crate::store::open_memcached_pool(addrs, &settings, HEAP_BYTES, None).expect("the pool")
    }

    #[test]
    fn coded_memcached_pools_conform() {
        let servers: Vec<TestServer> = (0..6).map(|_| TestServer::start(64, false)).collect();
        let addrs: Vec<String> = servers.iter().map(|s| s.addr.clone()).collect();
        check_all(&|| Box::new(open_coded(&addrs[..3], 2, 1)));
        check_all(&|| Box::new(open_coded(&addrs, 4, 2)));
    }

    /// Parity values round-trip through a real server in the same pipeline as pages (one
    /// `mn` a call); a value of another cover is old, one of another shape is damaged.
    #[test]
    fn a_server_stores_and_reads_parity_with_pages_in_one_pipeline() {
        let server = TestServer::start(64, false);
        let s = MemcachedServer::open(&server.addr, 0x5eed, HEAP_BYTES, 2000).expect("open");
        let src = contents(2, 30);
        let par = contents(1, 31);
        let cover = vec![
            Cover { version: 1, crc: 5 },
            Cover { version: 0, crc: 0 },
            Cover { version: 3, crc: 7 },
            Cover { version: 4, crc: 9 },
        ];
        let mut pages_w: Vec<PageWrite<'_>> = src
            .iter()
            .enumerate()
            .map(|(i, p)| PageWrite::new(i as u64, &p.0, 1))
            .collect();
        let key = ParityKey { stripe: 0, slot: 1 };
        let mut parity_w = vec![ParityWrite {
            key,
            buf: &par[0].0,
            cover: &cover,
            parity: 2,
            outcome: Outcome::Pending,
        }];
        let before = s.traffic.pipelines.load(Relaxed);
        s.store_with_parity(&mut pages_w, &mut parity_w)
            .expect("stored");
        assert_eq!(s.traffic.pipelines.load(Relaxed) - before, 1);
        assert!(parity_w[0].outcome.is_done());
        let read = |cover: &[Cover], parity: u8| -> (Vec<Outcome>, Outcome, bool) {
            let mut dst = pages(3);
            let (pdst, rest) = dst.split_at_mut(2);
            let mut reads: Vec<PageRead<'_>> = pdst
                .iter_mut()
                .zip(&src)
                .enumerate()
                .map(|(i, (d, s))| PageRead::new(i as u64, &mut d.0, crc32c::crc32c(&s.0), 1))
                .collect();
            let mut preads = vec![ParityRead {
                key,
                buf: &mut rest[0].0,
                cover,
                parity,
                outcome: Outcome::Pending,
            }];
            let before = s.traffic.pipelines.load(Relaxed);
            let _ = s.exchange(&mut reads, &mut preads);
            assert_eq!(
                s.traffic.pipelines.load(Relaxed) - before,
                1,
                "one pipeline"
            );
            let outcomes = reads.iter().map(|r| r.outcome).collect();
            let p = preads[0].outcome;
            drop(preads);
            (outcomes, p, rest[0].0 == par[0].0)
        };
        let (pages_got, parity_got, same) = read(&cover, 2);
        assert!(all_done(&pages_got) && parity_got.is_done() && same);
        let mut older = cover.clone();
        older[2].version = 2;
        let (_, parity_got, _) = read(&older, 2);
        assert_eq!(
            parity_got,
            Outcome::Failed(FailureKind::Lost),
            "an old cover"
        );
        let (_, parity_got, _) = read(&cover, 3);
        assert_eq!(
            parity_got,
            Outcome::Failed(FailureKind::Lost),
            "another shape"
        );
        s.delete_parity(&[key]).expect("deleted");
        let (_, parity_got, _) = read(&cover, 2);
        assert_eq!(parity_got, Outcome::Failed(FailureKind::Lost), "gone");
        assert!(s.traffic.parity_bytes.load(Relaxed) > 0);
    }

    fn open_sealed(addrs: &[String], k: usize, m: usize, heap_id: u64) -> PoolStore {
        let settings = PoolSettings {
            replication: Replication::Pessimistic,
            code: Some(CodeShape { data: k, parity: m }),
            ..PoolSettings::default()
        };
        let key = SealKey::from_bytes([0x2c; crate::seal::KEY_BYTES]);
        crate::store::open_memcached_pool_as(addrs, &settings, HEAP_BYTES, heap_id, Some(&key))
            .expect("the sealed pool")
    }

    #[test]
    fn sealed_coded_memcached_pools_conform() {
        let servers: Vec<TestServer> = (0..6).map(|_| TestServer::start(64, false)).collect();
        let addrs: Vec<String> = servers.iter().map(|s| s.addr.clone()).collect();
        check_all(&|| Box::new(open_sealed(&addrs[..3], 2, 1, random_heap_id())));
        check_all(&|| Box::new(open_sealed(&addrs, 4, 2, random_heap_id())));
    }

    /// With a key, data and parity values changed on the servers (a flipped bit, another
    /// stripe's or page's value, an old parity value) are refused and counted; a page whose
    /// own value is bad is rebuilt from the good values of its stripe, and one with fewer
    /// than K good values left is not served at all, never with wrong bytes.
    #[test]
    fn tampered_sealed_values_are_refused_and_rebuilt_from_the_others() {
        tampered_values_are_refused_and_rebuilt(true);
    }

    /// The same without a key: the values' checksums and the parity values' covers find them.
    #[test]
    fn tampered_values_are_refused_and_rebuilt_from_the_others() {
        tampered_values_are_refused_and_rebuilt(false);
    }

    fn tampered_values_are_refused_and_rebuilt(sealed: bool) {
        let servers: Vec<TestServer> = (0..6).map(|_| TestServer::start(64, false)).collect();
        let addrs: Vec<String> = servers.iter().map(|s| s.addr.clone()).collect();
        let heap_id = 0x00c0_ffee_0000_0c0d + u64::from(sealed);
        let store = if sealed {
            open_sealed(&addrs, 4, 2, heap_id)
        } else {
            let settings = PoolSettings {
                replication: Replication::Pessimistic,
                code: Some(CodeShape { data: 4, parity: 2 }),
                ..PoolSettings::default()
            };
            crate::store::open_memcached_pool_as(&addrs, &settings, HEAP_BYTES, heap_id, None)
                .expect("the pool")
        };
        let raw = Raw::new(&addrs, heap_id);
        let at: Vec<u64> = (0..12).collect();
        let v1 = contents(at.len(), 50);
        assert!(all_done(&store_at(&store, &at, &v1, 1)));
        let parity_at = |stripe: u64, slot: u8| {
            parity_holder(&store, stripe, usize::from(slot)).expect("parity recorded")
        };
        let old_parity = raw
            .get_key(parity_at(2, 0), &raw.parity_key(2, 0))
            .expect("parity 0 of stripe 2");
        // Stripe 2 written again: its parity 0 held above is now an old value.
        let v2 = contents(4, 51);
        assert!(all_done(&store_at(&store, &at[8..12], &v2, 2)));
        let flip = |server: usize, key: &str| {
            let mut v = raw.get_key(server, key).expect("the value is there");
            let at = v.len() / 2;
            v[at] ^= 0x04;
            raw.set_key(server, key, &v);
        };
        let page_key = |page: u64| crate::store::memcached::keys::page_key(heap_id, page);
        // Stripe 0: page 0 flipped, parity 0 replaced by stripe 1's parity 0.
        flip(holder(&store, 0), &page_key(0));
        let swapped = raw
            .get_key(parity_at(1, 0), &raw.parity_key(1, 0))
            .expect("parity 0 of stripe 1");
        raw.set_key(parity_at(0, 0), &raw.parity_key(0, 0), &swapped);
        // Stripe 1: page 5's value replaced by page 6's, parity 1 flipped.
        let six = raw.get_page(holder(&store, 6), 6).expect("page 6");
        raw.set_page(holder(&store, 5), 5, &six);
        flip(parity_at(1, 1), &raw.parity_key(1, 1));
        // Stripe 2: page 8 flipped, parity 0 its old value, parity 1 flipped.
        flip(holder(&store, 8), &page_key(8));
        raw.set_key(parity_at(2, 0), &raw.parity_key(2, 0), &old_parity);
        flip(parity_at(2, 1), &raw.parity_key(2, 1));

        assert!(all_done(&fetch_at(&store, &[0], &v1[0..1], 1)), "rebuilt");
        assert!(all_done(&fetch_at(&store, &[5], &v1[5..6], 1)), "rebuilt");
        let got = fetch_at(&store, &[8], &v2[0..1], 2);
        assert!(!got[0].is_done(), "three good values of six: {got:?}");
        assert!(all_done(&fetch_at(&store, &at[9..12], &v2[1..], 2)));
        assert!(all_done(&fetch_at(&store, &at[1..5], &v1[1..5], 1)));
        // Both were degraded reads (rebuilt by the read, or by a repair that took the stripe
        // first: the pool's thread is woken by the bad copies).
        assert!(stat(&store, "pool_degraded_reads") >= 2);
        assert!(stat(&store, "pool_bad_copies") >= 3);
        // Sealed: pages 0, 5 and 8 did not open, and at least one parity value of stripe 2
        // (its old value names older versions: it is refused without being opened).
        let failures = stat(&store, "pool_seal_failures");
        if sealed {
            assert!(failures >= 4, "{failures}");
        } else {
            assert_eq!(failures, 0);
        }
    }

    /// Every value a pool holds for `pages` (data values and their stripes' parity values),
    /// over every server.
    fn every_value(raw: &Raw, servers: usize, pages: &[u64], k: u64, m: u8) -> Vec<Vec<u8>> {
        let mut values = Vec::new();
        for server in 0..servers {
            for &p in pages {
                values.extend(raw.get_page(server, p));
            }
            let mut stripes: Vec<u64> = pages.iter().map(|p| p / k).collect();
            stripes.dedup();
            for stripe in stripes {
                for slot in 0..m {
                    values.extend(raw.get_key(server, &raw.parity_key(stripe, slot)));
                }
            }
        }
        values
    }

    /// With a key, no value of a coded pool (data or parity) holds a page in the clear, nor
    /// its checksum; without one the same stripes do (the control: the scan can fail). A
    /// stripe with one page written and three never stored is the case where a parity value
    /// could hold that page in the clear.
    #[test]
    fn a_sealed_coded_pool_holds_no_plaintext_page() {
        let servers: Vec<TestServer> = (0..6).map(|_| TestServer::start(64, false)).collect();
        let addrs: Vec<String> = servers.iter().map(|s| s.addr.clone()).collect();
        let at: Vec<u64> = (0..8).chain([12]).collect();
        let src = contents(at.len(), 52);
        let leaks = |values: &[Vec<u8>]| {
            values
                .iter()
                .filter(|v| {
                    src.iter().any(|p| {
                        v.windows(64).any(|w| w == &p.0[1000..1064])
                            || v.windows(4)
                                .any(|w| w == crc32c::crc32c(&p.0).to_le_bytes())
                    })
                })
                .count()
        };
        let plain_id = 0x00c0_ffee_0000_0c0e;
        let settings = PoolSettings {
            replication: Replication::Pessimistic,
            code: Some(CodeShape { data: 4, parity: 2 }),
            ..PoolSettings::default()
        };
        let plain =
            crate::store::open_memcached_pool_as(&addrs, &settings, HEAP_BYTES, plain_id, None)
                .expect("the pool");
        assert!(all_done(&store_at(&plain, &at, &src, 1)));
        let values = every_value(&Raw::new(&addrs, plain_id), 6, &at, 4, 2);
        assert_eq!(values.len(), 9 + 3 * 2, "nine pages, three stripes");
        assert!(leaks(&values) >= 9, "without a key pages are in the clear");

        let sealed_id = 0x00c0_ffee_0000_0c0f;
        let sealed = open_sealed(&addrs, 4, 2, sealed_id);
        assert!(all_done(&store_at(&sealed, &at, &src, 1)));
        let values = every_value(&Raw::new(&addrs, sealed_id), 6, &at, 4, 2);
        assert_eq!(values.len(), 9 + 3 * 2);
        assert_eq!(leaks(&values), 0, "a value holds a page or its checksum");
        assert!(all_done(&fetch_at(&sealed, &at, &src, 1)));
    }

    /// rs:4+2 over six real servers: two of them killed, every page still reads back.
    #[test]
    fn two_of_six_real_servers_killed_lose_nothing() {
        let mut servers: Vec<Option<TestServer>> =
            (0..6).map(|_| Some(TestServer::start(64, false))).collect();
        let addrs: Vec<String> = servers.iter().flatten().map(|s| s.addr.clone()).collect();
        let store = open_coded(&addrs, 4, 2);
        let at = layout();
        let src = contents(at.len(), 32);
        assert!(all_done(&store_at(&store, &at, &src, 1)));
        servers[1] = None;
        servers[4] = None;
        assert!(all_done(&fetch_at(&store, &at, &src, 1)));
        assert!(stat(&store, "pool_rebuilt_pages") > 0);
        // New write-backs with two servers gone (no spare): stored, stripes short.
        let more: Vec<u64> = (2000..2016).collect();
        let src2 = contents(more.len(), 33);
        let got = store_at(&store, &more, &src2, 1);
        assert!(all_done(&got), "{got:?}");
        assert!(all_done(&fetch_at(&store, &more, &src2, 1)));
        assert!(stat(&store, "pool_stripes_short") > 0);
    }
}

/// Two of six members down while pages are written (no spare: data values share servers,
/// parity for the down homes is not written), then both restarted empty: repair moves the
/// shared values home and writes the missing parity, every stripe is whole, and any two
/// members may go again.
#[test]
fn values_written_around_two_down_members_go_home_when_they_return() {
    let (store, members) = coded_pool(6, 4, 2);
    let at = layout();
    let src = contents(at.len(), 40);
    assert!(all_done(&store_at(&store, &at, &src, 1)));
    members[1].down.store(true, Relaxed);
    members[4].down.store(true, Relaxed);
    wait_until("both members are marked down", || {
        let _ = fetch_at(&store, &at, &src, 1);
        stat(&store, "pool_servers_down") == 2
    });
    let src2 = contents(at.len(), 41);
    assert!(all_done(&store_at(&store, &at, &src2, 2)));
    assert!(all_done(&fetch_at(&store, &at, &src2, 2)));
    assert!(stat(&store, "pool_stripes_short") > 0);
    for d in [1, 4] {
        members[d].restart_empty();
        members[d].down.store(false, Relaxed);
    }
    wait_until("every stripe is whole again", || {
        stat(&store, "pool_servers_down") == 0 && stat(&store, "pool_stripes_short") == 0
    });
    for down in [[0, 2], [3, 5], [1, 4]] {
        for d in down {
            members[d].down.store(true, Relaxed);
        }
        assert!(all_done(&fetch_at(&store, &at, &src2, 2)), "{down:?}");
        for d in down {
            members[d].down.store(false, Relaxed);
        }
        wait_until("the members are up", || {
            stat(&store, "pool_servers_down") == 0
        });
    }
}
