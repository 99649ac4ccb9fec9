//! The pool over in-memory members that go down, come back empty or hand back damaged
//! copies: pages are always served right or not at all, and the pool gets back to N copies.
//! (The same pool over real memcached servers: `store::conformance` and `tests/tests/pool.rs`.)

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::member::test_member::TestMember;
use super::member::Member;
use super::*;
use crate::io::test_support::{fill, pages, Page};
use crate::seal::SealKey;
use crate::store::conformance::{check_all, SUITE_PAGES};

const HEAP_BYTES: u64 = SUITE_PAGES * PAGE_BYTES;
/// How long a test waits for the pool's thread to repair, at most.
const REPAIR_WAIT_MS: u64 = 15_000;

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
}

fn pool(n: usize, replicas: usize, replication: Replication) -> (PoolStore, Vec<Arc<TestMember>>) {
    let members: Vec<Arc<TestMember>> = (0..n)
        .map(|i| Arc::new(TestMember::new(&format!("10.0.0.{i}:11211"), HEAP_BYTES)))
        .collect();
    let boxed: Vec<Box<dyn Member>> = members
        .iter()
        .map(|m| Box::new(Shared(Arc::clone(m))) as Box<dyn Member>)
        .collect();
    let settings = PoolSettings {
        replicas,
        replication,
        ..PoolSettings::default()
    };
    let store = PoolStore::new("test://pool".into(), boxed, HEAP_BYTES, settings).expect("pool");
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
        fill(&mut p.0, seed ^ i as u64);
    }
    src
}

fn store_pages(store: &PoolStore, first: u64, src: &[Page], version: u32) {
    let mut writes: Vec<PageWrite<'_>> = src
        .iter()
        .enumerate()
        .map(|(i, p)| PageWrite::new(first + i as u64, &p.0, version))
        .collect();
    store.store(&mut writes).expect("stored");
}

/// Fetches the pages and returns how many came back right (a wrong one fails the test).
fn fetch_pages(store: &PoolStore, first: u64, src: &[Page], version: u32) -> usize {
    let mut dst = pages(src.len());
    let mut reads: Vec<PageRead<'_>> = dst
        .iter_mut()
        .zip(src)
        .enumerate()
        .map(|(i, (d, s))| PageRead::new(first + i as u64, &mut d.0, crc32c::crc32c(&s.0), version))
        .collect();
    let _ = store.fetch(&mut reads);
    let done: Vec<bool> = reads.iter().map(|r| r.outcome.is_done()).collect();
    drop(reads);
    for (i, ok) in done.iter().enumerate() {
        if *ok {
            assert!(
                dst[i].0 == src[i].0,
                "page {} served wrong",
                first + i as u64
            );
        }
    }
    done.iter().filter(|&&ok| ok).count()
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_millis(REPAIR_WAIT_MS);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn pools_of_test_members_conform_in_every_mode() {
    check_all(&|| Box::new(pool(1, 1, Replication::Adaptive).0));
    for replication in [
        Replication::Pessimistic,
        Replication::Optimistic,
        Replication::Adaptive,
    ] {
        check_all(&|| Box::new(pool(3, 2, replication).0));
        check_all(&|| Box::new(pool(4, 3, replication).0));
    }
}

/// With two copies, losing any one server loses nothing, in every mode; the pool fails over
/// and then gives the lost copies back on the two servers left.
#[test]
fn a_server_lost_costs_nothing_with_two_copies() {
    for replication in [
        Replication::Pessimistic,
        Replication::Optimistic,
        Replication::Adaptive,
    ] {
        for dead in 0..3 {
            let (store, members) = pool(3, 2, replication);
            let src = contents(512, 11);
            store_pages(&store, 0, &src, 1);
            wait_until("every page has two copies", || {
                stat(&store, "pool_underreplicated_pages") == 0
            });
            members[dead].down.store(true, Relaxed);
            assert_eq!(fetch_pages(&store, 0, &src, 1), 512, "{replication:?}");
            assert!(stat(&store, "pool_failovers") > 0);
            // New write-backs go around the dead server, and repair re-replicates the rest.
            let more = contents(64, 12);
            store_pages(&store, 1000, &more, 1);
            // Its failures (and the pool's thread's looks) mark it down.
            wait_until("the dead server is marked down", || {
                stat(&store, "pool_servers_down") == 1
            });
            wait_until("the pool is back to two copies", || {
                stat(&store, "pool_underreplicated_pages") == 0
            });
            assert!(stat(&store, "pool_rereplicated_pages") > 0);
            // Now any second server may go too.
            let other = (dead + 1) % 3;
            members[other].down.store(true, Relaxed);
            assert_eq!(fetch_pages(&store, 0, &src, 1), 512);
            assert_eq!(fetch_pages(&store, 1000, &more, 1), 64);
        }
    }
}

/// With one copy, the pages of a dead server are not served (transient: it may come back),
/// the others are; nothing wrong is ever served; when it comes back its pages are.
#[test]
fn with_one_copy_a_dead_servers_pages_wait_for_it() {
    let (store, members) = pool(3, 1, Replication::Pessimistic);
    let src = contents(512, 21);
    store_pages(&store, 0, &src, 1);
    members[1].down.store(true, Relaxed);
    let served = fetch_pages(&store, 0, &src, 1);
    assert!(served > 0 && served < 512, "{served}");
    let mut dst = pages(512);
    let mut reads: Vec<PageRead<'_>> = dst
        .iter_mut()
        .zip(&src)
        .enumerate()
        .map(|(i, (d, s))| PageRead::new(i as u64, &mut d.0, crc32c::crc32c(&s.0), 1))
        .collect();
    let err = store
        .fetch(&mut reads)
        .expect_err("some pages are on the dead server");
    assert_eq!(err.kind(), FailureKind::Transient);
    assert!(reads
        .iter()
        .all(|r| r.outcome.is_done() || r.outcome == Outcome::Failed(FailureKind::Transient)));
    drop(reads);
    members[1].down.store(false, Relaxed);
    wait_until("the server is up again", || {
        stat(&store, "pool_servers_down") == 0
    });
    assert_eq!(fetch_pages(&store, 0, &src, 1), 512);
}

/// A server that hands back damaged copies: never served, the other copy is, and the pool
/// writes good copies again.
#[test]
fn damaged_copies_are_detected_and_served_from_another() {
    let (store, members) = pool(3, 2, Replication::Pessimistic);
    let src = contents(256, 31);
    store_pages(&store, 0, &src, 1);
    members[0].corrupt.store(true, Relaxed);
    assert_eq!(fetch_pages(&store, 0, &src, 1), 256);
    assert!(stat(&store, "pool_bad_copies") > 0);
    members[0].corrupt.store(false, Relaxed);
    wait_until("the damaged copies are replaced", || {
        stat(&store, "pool_underreplicated_pages") == 0
    });
    for m in [1, 2] {
        members[m].down.store(true, Relaxed);
        assert_eq!(fetch_pages(&store, 0, &src, 1), 256);
        members[m].down.store(false, Relaxed);
    }
}

/// A server restarted empty: found by its new pid, its copies forgotten and written again.
#[test]
fn a_server_restarted_empty_is_refilled() {
    let (store, members) = pool(3, 2, Replication::Adaptive);
    let src = contents(512, 41);
    store_pages(&store, 0, &src, 1);
    members[2].restart_empty();
    wait_until("the restart is found and repaired", || {
        stat(&store, "pool_restarts") == 1 && stat(&store, "pool_underreplicated_pages") == 0
    });
    assert!(stat(&store, "pool_rereplicated_pages") > 0);
    for m in [0, 1] {
        members[m].down.store(true, Relaxed);
    }
    let served = fetch_pages(&store, 0, &src, 1);
    assert!(served > 0, "the refilled server holds copies");
    for m in [0, 1] {
        members[m].down.store(false, Relaxed);
    }
    wait_until("the servers are up", || {
        stat(&store, "pool_servers_down") == 0
    });
    assert_eq!(fetch_pages(&store, 0, &src, 1), 512);
}

/// Optimistic replication: a write-back completes on the first copy; until the others are
/// written, the queue's bytes serve the page if that server dies.
#[test]
fn optimistic_copies_follow_and_the_queue_covers_the_window() {
    let (store, members) = pool(2, 2, Replication::Optimistic);
    // Server 1 is down while the pages are written: each gets one copy, on server 0, and
    // waits in the queue for its second.
    members[1].down.store(true, Relaxed);
    let src = contents(128, 51);
    store_pages(&store, 0, &src, 1);
    assert!(stat(&store, "pool_queued_pages") > 0);
    members[0].down.store(true, Relaxed);
    assert_eq!(fetch_pages(&store, 0, &src, 1), 128);
    assert!(stat(&store, "pool_queue_reads") > 0);
    members[0].down.store(false, Relaxed);
    members[1].down.store(false, Relaxed);
    wait_until("the queue is written out", || {
        stat(&store, "pool_queued_pages") == 0 && stat(&store, "pool_underreplicated_pages") == 0
    });
    members[0].down.store(true, Relaxed);
    assert_eq!(fetch_pages(&store, 0, &src, 1), 128);
}

/// Discarded pages leave every server and read as zeros.
#[test]
fn discards_reach_every_copy() {
    let (store, members) = pool(3, 3, Replication::Pessimistic);
    let src = contents(32, 61);
    store_pages(&store, 0, &src, 1);
    store.discard(0, 32).expect("discarded");
    for m in &members {
        let mut dst = pages(1);
        let mut reads = [PageRead::new(
            5,
            &mut dst[0].0,
            crc32c::crc32c(&src[5].0),
            1,
        )];
        let _ = m.fetch(&mut reads);
        assert_ne!(
            reads[0].outcome,
            Outcome::Done,
            "a copy survived the discard"
        );
    }
    assert_eq!(stat(&store, "pool_stored_pages"), 0);
}

/// Against real memcached servers: a value overwritten behind lego's back with a flipped
/// bit, another page's value, or an older version of the page is never served; the other
/// copy is, and the bad ones are counted.
#[test]
fn bad_values_on_a_real_server_are_detected_and_served_from_another_copy() {
    bad_values_are_served_from_another_copy(None);
}

/// The same with sealed values (`LEGO_KEY_FILE`): each bad value fails to open (or names an
/// older version), is counted as a seal failure, and the other copy is served.
#[test]
fn bad_sealed_values_are_refused_and_served_from_another_copy() {
    let key = SealKey::from_bytes([0x42; crate::seal::KEY_BYTES]);
    bad_values_are_served_from_another_copy(Some(&key));
}

/// Raw access to a heap's values on real servers, behind the pool's back (also the coded
/// pool's tests').
pub(super) struct Raw {
    conns: Vec<crate::store::memcached::connection::Connection>,
    heap_id: u64,
}

impl Raw {
    pub(super) fn new(addrs: &[String], heap_id: u64) -> Raw {
        use crate::store::memcached::connection::Connection;
        Raw {
            conns: addrs
                .iter()
                .map(|a| Connection::new(a, 2000).expect("a connection"))
                .collect(),
            heap_id,
        }
    }

    fn key(&self, page: u64) -> String {
        format!("lego:{:016x}:{page:x}", self.heap_id)
    }

    /// The key of parity `slot` of `stripe`.
    pub(super) fn parity_key(&self, stripe: u64, slot: u8) -> String {
        crate::store::memcached::keys::parity_key(self.heap_id, stripe, slot)
    }

    fn get(&self, server: usize, page: u64) -> Vec<u8> {
        self.get_key(server, &self.key(page))
            .expect("the value is there")
    }

    /// The value of `key` on `server`, if it has one.
    pub(super) fn get_key(&self, server: usize, key: &str) -> Option<Vec<u8>> {
        use crate::store::memcached::protocol::{self, Reply};
        let mut request = Vec::new();
        protocol::get(&mut request, key, 0);
        protocol::noop(&mut request);
        let mut value = None;
        self.conns[server]
            .pipeline(&request, |reply| {
                if let Reply::Value { data, .. } = reply {
                    value = Some(data.to_vec());
                }
            })
            .expect("a raw get");
        value
    }

    /// The value of `page` on `server`, if it has one.
    pub(super) fn get_page(&self, server: usize, page: u64) -> Option<Vec<u8>> {
        self.get_key(server, &self.key(page))
    }

    fn set(&self, server: usize, page: u64, value: &[u8]) {
        self.set_key(server, &self.key(page), value);
    }

    pub(super) fn set_key(&self, server: usize, key: &str, value: &[u8]) {
        use crate::store::memcached::protocol;
        let mut request = Vec::new();
        protocol::set(&mut request, key, value, 0);
        protocol::noop(&mut request);
        self.conns[server]
            .pipeline(&request, |_| {})
            .expect("a raw set");
    }

    pub(super) fn set_page(&self, server: usize, page: u64, value: &[u8]) {
        self.set(server, page, value);
    }
}

fn bad_values_are_served_from_another_copy(key: Option<&SealKey>) {
    use crate::store::memcached::test_server::TestServer;
    use crate::store::memcached::{SEALED_VALUE_BYTES, VALUE_BYTES};

    let servers: Vec<TestServer> = (0..3).map(|_| TestServer::start(64, false)).collect();
    let addrs: Vec<String> = servers.iter().map(|s| s.addr.clone()).collect();
    let heap_id = 0x00c0_ffee_0000_0001;
    let settings = PoolSettings {
        replicas: 2,
        replication: Replication::Pessimistic,
        ..PoolSettings::default()
    };
    let store = crate::store::open_memcached_pool_as(&addrs, &settings, HEAP_BYTES, heap_id, key)
        .expect("the pool");
    let raw = Raw::new(&addrs, heap_id);
    let first_holder = |page: u64| Placement::new(&addrs).ranking(page).servers()[0] as usize;

    let old = contents(16, 71);
    store_pages(&store, 0, &old, 1);
    let old_value_of_5 = raw.get(first_holder(5), 5);
    let old_value_of_9 = raw.get(first_holder(9), 9);
    let src = contents(16, 72);
    store_pages(&store, 0, &src, 2);
    let value_of_6 = raw.get(first_holder(6), 6);
    assert_eq!(
        value_of_6.len(),
        if key.is_some() {
            SEALED_VALUE_BYTES
        } else {
            VALUE_BYTES
        }
    );
    if key.is_some() {
        // No value holds its page in the clear, nor the page's checksum.
        let page = &src[6].0;
        assert!(!value_of_6.windows(64).any(|w| w == &page[..64]));
        let crc = crc32c::crc32c(page).to_le_bytes();
        assert!(!value_of_6.windows(4).any(|w| w == crc));
    }
    // Page 5: its older version. Page 6: a flipped bit in the page. Page 7: page 8's value.
    raw.set(first_holder(5), 5, &old_value_of_5);
    let mut flipped = value_of_6;
    flipped[100] ^= 0x10;
    raw.set(first_holder(6), 6, &flipped);
    let other = raw.get(first_holder(8), 8);
    raw.set(first_holder(7), 7, &other);
    let mut bad = 3;
    if key.is_some() {
        // Page 9: its older value relabelled as the current version (the label is in the
        // clear, the seal binds the version it was made for).
        let mut relabelled = old_value_of_9;
        relabelled[0..4].copy_from_slice(&2u32.to_le_bytes());
        raw.set(first_holder(9), 9, &relabelled);
        // Page 10: a value of another heap's page 10, same version, same key file.
        let other_heap =
            crate::store::open_memcached_pool_as(&addrs, &settings, HEAP_BYTES, heap_id + 1, key)
                .expect("another heap's pool");
        store_pages(&other_heap, 10, &src[10..11], 2);
        let theirs = Raw::new(&addrs, heap_id + 1).get(first_holder(10), 10);
        raw.set(first_holder(10), 10, &theirs);
        bad += 2;
    }

    assert_eq!(
        fetch_pages(&store, 0, &src, 2),
        16,
        "every page served right"
    );
    assert_eq!(stat(&store, "pool_bad_copies"), bad);
    assert!(stat(&store, "pool_failovers") >= bad);
    // Each value that does not open is counted (page 5's names an older version: not opened).
    let failures = if key.is_some() { bad - 1 } else { 0 };
    assert_eq!(stat(&store, "pool_seal_failures"), failures);
    let sealed = store
        .report()
        .into_iter()
        .find(|(n, _)| n == "pool_sealed")
        .expect("pool_sealed")
        .1;
    assert_eq!(sealed, if key.is_some() { "yes" } else { "no" });
    wait_until("the bad copies are replaced", || {
        stat(&store, "pool_underreplicated_pages") == 0
    });
    // The copies written again are good: every page is served from them too.
    for page in 5..(5 + bad) {
        let mut dst = pages(1);
        let mut reads = [PageRead::new(
            page,
            &mut dst[0].0,
            crc32c::crc32c(&src[page as usize].0),
            2,
        )];
        let _ = store.fetch(&mut reads);
        assert!(reads[0].outcome.is_done());
    }
    drop(servers);
}

/// With one copy and no other, a sealed value that does not open fails the fetch as lost
/// (the pager then reads the log, or raises SIGBUS) and leaves no byte of it in the page.
#[test]
fn a_sealed_value_that_does_not_open_with_no_other_copy_is_lost() {
    use crate::store::memcached::test_server::TestServer;

    let server = TestServer::start(64, false);
    let addrs = vec![server.addr.clone()];
    let heap_id = 0x00c0_ffee_0000_0004;
    let key = SealKey::from_bytes([0x17; crate::seal::KEY_BYTES]);
    let store = crate::store::open_memcached_pool_as(
        &addrs,
        &PoolSettings::default(),
        HEAP_BYTES,
        heap_id,
        Some(&key),
    )
    .expect("the pool");
    let raw = Raw::new(&addrs, heap_id);
    let src = contents(4, 73);
    store_pages(&store, 0, &src, 1);
    assert_eq!(fetch_pages(&store, 0, &src, 1), 4, "sealed round trip");
    // Page 1: a flipped bit in the tag. Page 2: page 3's value. Page 3: under another key.
    let mut flipped = raw.get(0, 1);
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    raw.set(0, 1, &flipped);
    raw.set(0, 2, &raw.get(0, 3));
    let other_key = SealKey::from_bytes([0x18; crate::seal::KEY_BYTES]);
    let other = crate::store::open_memcached_pool_as(
        &addrs,
        &PoolSettings::default(),
        HEAP_BYTES,
        heap_id,
        Some(&other_key),
    )
    .expect("the same heap under another key");
    store_pages(&other, 3, &src[3..4], 1);
    for page in 1..4u64 {
        let mut dst = pages(1);
        dst[0].0.fill(0xee);
        let mut reads = [PageRead::new(
            page,
            &mut dst[0].0,
            crc32c::crc32c(&src[page as usize].0),
            1,
        )];
        let e = store
            .fetch(&mut reads)
            .expect_err("a value that does not open");
        assert_eq!(reads[0].outcome, Outcome::Failed(FailureKind::Lost), "{e}");
        assert!(
            dst[0].0.iter().all(|&b| b == 0),
            "page {page}: nothing of the value is left in the buffer"
        );
    }
    assert_eq!(stat(&store, "pool_seal_failures"), 3);
    assert_eq!(
        fetch_pages(&store, 0, &src[..1], 1),
        1,
        "page 0 is untouched"
    );
    drop(server);
}

/// Against real memcached servers: the pool takes its heap's lease on every server at open
/// (so another process's collection keeps off its pages) and releases it at exit.
#[test]
fn the_pool_holds_a_lease_on_every_server_until_exit() {
    use crate::store::memcached::connection::Connection;
    use crate::store::memcached::protocol::{self, Reply};
    use crate::store::memcached::test_server::TestServer;

    let servers: Vec<TestServer> = (0..2).map(|_| TestServer::start(64, false)).collect();
    let addrs: Vec<String> = servers.iter().map(|s| s.addr.clone()).collect();
    let heap_id = 0x00c0_ffee_0000_0002;
    let store = crate::store::open_memcached_pool_as(
        &addrs,
        &PoolSettings::default(),
        HEAP_BYTES,
        heap_id,
        None,
    )
    .expect("the pool");
    let has_lease = |addr: &str| {
        let conn = Connection::new(addr, 2000).expect("a connection");
        let mut request = Vec::new();
        protocol::get(&mut request, &format!("lego:{heap_id:016x}:lease"), 0);
        protocol::noop(&mut request);
        let mut found = false;
        conn.pipeline(&request, |reply| {
            found |= matches!(reply, Reply::Value { .. })
        })
        .expect("a raw get");
        found
    };
    for a in &addrs {
        assert!(has_lease(a), "no lease on {a} after open");
    }
    store.at_exit();
    for a in &addrs {
        assert!(!has_lease(a), "the lease on {a} outlived the exit");
    }
}

/// Against real memcached servers: pages read ahead (`read_ahead`, then the fetch of exactly
/// those pages) are served right, over one pipeline sent ahead per server; a read-ahead that
/// a newer version of its pages left behind is never served, and one no fetch asks for is
/// harmless.
#[test]
fn pages_read_ahead_are_served_right_and_stale_read_aheads_never() {
    use crate::store::memcached::test_server::TestServer;

    let servers: Vec<TestServer> = (0..2).map(|_| TestServer::start(64, false)).collect();
    let addrs: Vec<String> = servers.iter().map(|s| s.addr.clone()).collect();
    let settings = PoolSettings {
        replicas: 1,
        ..PoolSettings::default()
    };
    let store = crate::store::open_memcached_pool_as(
        &addrs,
        &settings,
        HEAP_BYTES,
        0x00c0_ffee_0000_0003,
        None,
    )
    .expect("the pool");
    let wants = |src: &[Page], version: u32| -> Vec<PageWant> {
        src.iter()
            .enumerate()
            .map(|(i, p)| PageWant {
                page: i as u64,
                crc: crc32c::crc32c(&p.0),
                version,
            })
            .collect()
    };
    // (used, sent) read-aheads over the servers, from the report's server lines.
    let read_aheads = || -> (u64, u64) {
        let mut total = (0, 0);
        for (name, line) in store.report() {
            if !name.starts_with("pool_server_") {
                continue;
            }
            let counts = line
                .split(' ')
                .find_map(|w| w.strip_prefix("read_ahead="))
                .expect("read_ahead= in the server's line");
            let (used, sent) = counts.split_once('/').expect("used/sent");
            total.0 += used.parse::<u64>().expect("a number");
            total.1 += sent.parse::<u64>().expect("a number");
        }
        total
    };

    let old = contents(64, 81);
    store_pages(&store, 0, &old, 1);
    store.read_ahead(&wants(&old, 1));
    let (used, sent) = read_aheads();
    assert!(sent >= 1 && used == 0, "sent {sent}, used {used}");
    assert_eq!(
        fetch_pages(&store, 0, &old, 1),
        64,
        "every page served right"
    );
    assert_eq!(
        read_aheads(),
        (sent, sent),
        "the fetch read what was sent ahead"
    );

    // Read ahead, then the pages get a newer version before the fetch: the replies waiting
    // in the socket hold the old one, and the fetch of the new one must not take them.
    store.read_ahead(&wants(&old, 1));
    let new = contents(64, 82);
    store_pages(&store, 0, &new, 2);
    assert_eq!(
        fetch_pages(&store, 0, &new, 2),
        64,
        "the new version served"
    );
    assert_eq!(read_aheads().0, sent, "the stale read-ahead was not used");

    // A read-ahead no fetch asks for (another run of pages) changes nothing.
    store.read_ahead(&wants(&new[..16], 2));
    assert_eq!(fetch_pages(&store, 0, &new, 2), 64);
    drop(servers);
}

/// A member whose server reports `used` bytes of its 64 MiB (the adaptive mode's signal).
struct Tight {
    member: Arc<TestMember>,
    used: Arc<AtomicU64>,
}

impl PageStore for Tight {
    fn fetch(&self, batch: &mut [PageRead<'_>]) -> Result<(), StoreError> {
        self.member.fetch(batch)
    }
    fn store(&self, batch: &mut [PageWrite<'_>]) -> Result<(), StoreError> {
        self.member.store(batch)
    }
    fn discard(&self, first: u64, count: u64) -> Result<(), StoreError> {
        self.member.discard(first, count)
    }
    fn describe(&self) -> String {
        self.member.describe()
    }
}

impl Member for Tight {
    fn server(&self) -> &str {
        self.member.server()
    }
    fn info(&self) -> Result<crate::store::memcached::ServerInfo, StoreError> {
        let mut info = self.member.info()?;
        info.used_bytes = self.used.load(Relaxed).min(info.limit_bytes);
        Ok(info)
    }
    fn delete(&self, pages: &[u64]) -> Result<(), StoreError> {
        self.member.delete(pages)
    }
    fn reconnect(&self) {}
    fn wire_bytes(&self) -> (u64, u64) {
        (0, 0)
    }
}

/// The log as the pool sees it: the (page, checksum) pairs it holds.
#[derive(Default)]
struct FakeLog(Mutex<std::collections::HashSet<(u64, u32)>>);

impl LogCopies for FakeLog {
    fn holds(&self, page: u64, crc: u32) -> bool {
        self.0.lock().unwrap().contains(&(page, crc))
    }
}

/// Adaptive replication with a log, memory scarce: a page the log holds gets one copy in the
/// pool (the log stands in for the other), a page it lacks gets two; the switch is counted
/// and described. Once memory is plentiful again, repair gives every page its second copy.
#[test]
fn adaptive_with_a_log_keeps_one_copy_of_what_the_log_holds_while_memory_is_scarce() {
    let used = Arc::new(AtomicU64::new(60 << 20)); // 6% free, under the default 20%
    let members: Vec<Arc<TestMember>> = (0..3)
        .map(|i| Arc::new(TestMember::new(&format!("10.0.1.{i}:11211"), HEAP_BYTES)))
        .collect();
    let boxed: Vec<Box<dyn Member>> = members
        .iter()
        .map(|m| {
            Box::new(Tight {
                member: Arc::clone(m),
                used: Arc::clone(&used),
            }) as Box<dyn Member>
        })
        .collect();
    let settings = PoolSettings {
        replicas: 2,
        replication: Replication::Adaptive,
        ..PoolSettings::default()
    };
    let store = PoolStore::new("test://pool".into(), boxed, HEAP_BYTES, settings).expect("pool");
    assert!(
        store.wants_log_copy(),
        "adaptive pools want the log's index"
    );
    let log = Arc::new(FakeLog::default());
    store.log_stands_in(Arc::clone(&log) as Arc<dyn LogCopies>);
    let src = contents(64, 77);
    for (i, p) in src.iter().enumerate() {
        if i % 2 == 0 {
            log.0
                .lock()
                .unwrap()
                .insert((i as u64, crc32c::crc32c(&p.0)));
        }
    }
    assert!(
        !store.log_copy_now(),
        "memory is plentiful until the thread looks"
    );
    wait_until("the pool finds memory scarce", || {
        stat(&store, "pool_mode_switches") == 1
    });
    assert!(store.log_copy_now());
    assert!(
        store.describe().contains("one copy and the log now"),
        "{}",
        store.describe()
    );
    // As the evictor writes in this mode: every page flagged as found in the log; the pool
    // keeps one copy only of those the log really holds (the even ones).
    let mut writes: Vec<PageWrite<'_>> = src
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut w = PageWrite::new(i as u64, &p.0, 1);
            w.log_held = true;
            w
        })
        .collect();
    store.store(&mut writes).expect("stored");
    drop(writes);
    assert_eq!(stat(&store, "pool_log_copies"), 32);
    // Not flagged (the evictor did not check the log): every copy, log or not.
    let more = contents(2, 78);
    log.0
        .lock()
        .unwrap()
        .insert((64, crc32c::crc32c(&more[0].0)));
    store_pages(&store, 64, &more[..1], 1);
    assert_eq!(
        stat(&store, "pool_log_copies"),
        32,
        "an unflagged write gets every copy"
    );
    assert_eq!(
        stat(&store, "pool_queued_pages"),
        0,
        "nothing is queued for later"
    );
    // One member down at a time: the pages the log lacks always have another copy; each
    // page the log holds is missing exactly while its only server is down.
    let mut unserved = vec![0usize; 64];
    for member in &members {
        member.down.store(true, Relaxed);
        let mut dst = pages(64);
        let mut reads: Vec<PageRead<'_>> = dst
            .iter_mut()
            .zip(&src)
            .enumerate()
            .map(|(i, (d, s))| PageRead::new(i as u64, &mut d.0, crc32c::crc32c(&s.0), 1))
            .collect();
        let _ = store.fetch(&mut reads);
        let done: Vec<bool> = reads.iter().map(|r| r.outcome.is_done()).collect();
        drop(reads);
        for (i, d) in dst.iter().enumerate() {
            if done[i] {
                assert!(d.0 == src[i].0, "page {i} served wrong");
            } else {
                unserved[i] += 1;
            }
        }
        member.down.store(false, Relaxed);
    }
    for (i, n) in unserved.iter().enumerate() {
        let want = if i % 2 == 0 { 1 } else { 0 };
        assert_eq!(
            *n, want,
            "page {i}: unserved with {n} of 3 servers down in turn"
        );
    }
    // Plentiful again: back to two copies of every page.
    used.store(0, Relaxed);
    wait_until("the pool is pessimistic and whole again", || {
        stat(&store, "pool_mode_switches") == 2
            && stat(&store, "pool_servers_down") == 0
            && stat(&store, "pool_underreplicated_pages") == 0
    });
    assert!(!store.log_copy_now());
    for (m, member) in members.iter().enumerate() {
        member.down.store(true, Relaxed);
        assert_eq!(fetch_pages(&store, 0, &src, 1), 64, "server {m} down");
        member.down.store(false, Relaxed);
    }
}
