//! The conformance suite of [`PageStore`]: one set of checks that every backend passes before
//! anything is built on it (the file store in each of its I/O modes, the in-memory store, the
//! fault-injecting wrapper over each, and every future backend). [`check_all`] runs them all
//! against fresh stores from a factory; each check says which rule of the seam it holds.

use super::{FailureKind, Outcome, PageRead, PageStore, PageWrite, StoreError};
use crate::io::test_support::{fill, pages, Page};
use crate::PAGE_SIZE;

/// Pages of the heap every store of the suite is opened for.
pub(crate) const SUITE_PAGES: u64 = 16_384;

/// Makes a fresh, empty store for a heap of [`SUITE_PAGES`] pages.
pub(crate) type Factory<'a> = &'a dyn Fn() -> Box<dyn PageStore>;

/// Runs every check against fresh stores from `make`.
pub(crate) fn check_all(make: Factory<'_>) {
    round_trips_of_every_shape(&*make());
    later_versions_replace_earlier_ones(&*make());
    one_bad_page_does_not_fail_its_neighbours(&*make());
    never_stored_pages_read_as_zeros_or_not_at_all(&*make());
    a_copy_that_does_not_match_is_never_served(&*make());
    discard_forgets_exactly_its_range(&*make());
    pages_outside_the_heap_are_refused(&*make());
    empty_batches_do_nothing(&*make());
    several_batches_in_flight_at_once(&*make());
    pages_already_decided_are_left_alone(&*make());
    concurrent_callers(&*make());
}

/// The CRC32C of a page of zeros.
fn zero_crc() -> u32 {
    crc32c::crc32c(&[0; PAGE_SIZE])
}

/// Pages of distinct content for `indices`, filled from `seed`.
fn contents(indices: &[u64], seed: u64) -> Vec<Page> {
    let mut src = pages(indices.len());
    for (p, &page) in src.iter_mut().zip(indices) {
        fill(&mut p.0, page ^ seed);
    }
    src
}

/// Stores `src[i]` as `version` of `indices[i]`, all in one batch; every page must be done.
pub(crate) fn store_all(store: &dyn PageStore, indices: &[u64], src: &[Page], version: u32) {
    let mut writes: Vec<PageWrite<'_>> = src
        .iter()
        .zip(indices)
        .map(|(p, &page)| PageWrite::new(page, &p.0, version))
        .collect();
    store
        .store(&mut writes)
        .unwrap_or_else(|e| panic!("{}: storing {} pages: {e}", store.describe(), indices.len()));
    assert!(writes.iter().all(|w| w.outcome.is_done()));
}

/// Fetches `indices` expecting `src`'s content as `version`, and compares.
fn fetch_expecting(store: &dyn PageStore, indices: &[u64], src: &[Page], version: u32) {
    let mut dst = pages(indices.len());
    let mut reads: Vec<PageRead<'_>> = dst
        .iter_mut()
        .zip(indices.iter().zip(src))
        .map(|(p, (&page, s))| PageRead::new(page, &mut p.0, crc32c::crc32c(&s.0), version))
        .collect();
    store.fetch(&mut reads).unwrap_or_else(|e| {
        panic!(
            "{}: fetching {} pages: {e}",
            store.describe(),
            indices.len()
        )
    });
    assert!(reads.iter().all(|r| r.outcome.is_done()));
    drop(reads);
    for (i, (a, b)) in src.iter().zip(&dst).enumerate() {
        assert!(
            a.0 == b.0,
            "{}: page {} differs",
            store.describe(),
            indices[i]
        );
    }
}

fn round_trip(store: &dyn PageStore, indices: &[u64], seed: u64) {
    let src = contents(indices, seed);
    store_all(store, indices, &src, 1);
    fetch_expecting(store, indices, &src, 1);
}

/// Batches of every length the pager sends, contiguous, at both ends of the heap, scattered.
fn round_trips_of_every_shape(store: &dyn PageStore) {
    for n in [1u64, 2, 7, 64, 255, 256, 1024] {
        let contiguous: Vec<u64> = (100..100 + n).collect();
        round_trip(store, &contiguous, n);
        let tail: Vec<u64> = (SUITE_PAGES - n..SUITE_PAGES).collect();
        round_trip(store, &tail, n + 1);
        let mut scattered: Vec<u64> = (0..n).map(|i| i * 13 + (i % 3)).collect();
        scattered.dedup();
        round_trip(store, &scattered, n + 2);
    }
}

/// A page stored again is read back with its new content and version.
fn later_versions_replace_earlier_ones(store: &dyn PageStore) {
    let indices = [40u64, 41, 42];
    let old = contents(&indices, 1);
    store_all(store, &indices, &old, 1);
    let new = contents(&indices, 2);
    store_all(store, &indices, &new, 2);
    fetch_expecting(store, &indices, &new, 2);
}

/// A batch with a page the store refuses (outside the heap, a misaligned buffer) and one it
/// has lost: those fail with their own outcome, the others are served.
fn one_bad_page_does_not_fail_its_neighbours(store: &dyn PageStore) {
    let indices = [10u64, 11, 12, 13];
    let src = contents(&indices, 7);
    store_all(store, &indices, &src, 1);
    let mut dst = pages(5);
    let (good, rest) = dst.split_at_mut(3);
    let (wrong, spare) = rest.split_at_mut(1);
    let misaligned = &mut spare[0].0[1..];
    let mut slots = good.iter_mut();
    let mut reads = vec![
        PageRead::new(
            10,
            &mut slots.next().expect("3 slots").0,
            crc32c::crc32c(&src[0].0),
            1,
        ),
        PageRead::new(SUITE_PAGES + 5, misaligned, 0, 1),
        PageRead::new(
            11,
            &mut slots.next().expect("3 slots").0,
            crc32c::crc32c(&src[1].0),
            1,
        ),
        // Page 12 with the checksum of other content: lost, as far as this read is concerned.
        PageRead::new(12, &mut wrong[0].0, crc32c::crc32c(&src[0].0), 1),
        PageRead::new(
            13,
            &mut slots.next().expect("3 slots").0,
            crc32c::crc32c(&src[3].0),
            1,
        ),
    ];
    let err = store.fetch(&mut reads).expect_err("two pages fail");
    assert!(err.page().is_some(), "the error names a page: {err}");
    let outcomes: Vec<Outcome> = reads.iter().map(|r| r.outcome).collect();
    assert_eq!(
        outcomes,
        [
            Outcome::Done,
            Outcome::Failed(FailureKind::Refused),
            Outcome::Done,
            Outcome::Failed(FailureKind::Lost),
            Outcome::Done,
        ],
        "{}",
        store.describe()
    );
    drop(reads);
    assert!(good[0].0 == src[0].0 && good[1].0 == src[1].0 && good[2].0 == src[3].0);

    // The same for writes: a refused page, its neighbours written.
    let more = contents(&[20, 21], 9);
    let bad = pages(1);
    let mut writes = vec![
        PageWrite::new(20, &more[0].0, 1),
        PageWrite::new(SUITE_PAGES, &bad[0].0, 1),
        PageWrite::new(21, &more[1].0, 1),
    ];
    let err = store.store(&mut writes).expect_err("one page is refused");
    assert_eq!(err.kind(), FailureKind::Refused);
    let outcomes: Vec<Outcome> = writes.iter().map(|w| w.outcome).collect();
    assert_eq!(
        outcomes,
        [
            Outcome::Done,
            Outcome::Failed(FailureKind::Refused),
            Outcome::Done
        ]
    );
    fetch_expecting(store, &[20, 21], &more, 1);
}

/// A page never stored reads as zeros when zeros are what the reader expects; when it
/// expects other content the page is lost, never served as something else.
fn never_stored_pages_read_as_zeros_or_not_at_all(store: &dyn PageStore) {
    let mut dst = pages(2);
    for p in dst.iter_mut() {
        p.0.fill(0xAA);
    }
    let (a, b) = dst.split_at_mut(1);
    let mut reads = [
        PageRead::new(3000, &mut a[0].0, zero_crc(), 1),
        PageRead::new(3001, &mut b[0].0, 0x1234_5678, 1),
    ];
    let err = store.fetch(&mut reads).expect_err("the second is lost");
    assert_eq!(err.kind(), FailureKind::Lost);
    assert_eq!(reads[0].outcome, Outcome::Done);
    assert_eq!(reads[1].outcome, Outcome::Failed(FailureKind::Lost));
    assert!(reads[0].buf.iter().all(|&b| b == 0));
}

/// A stored page read with a checksum other than its own is not served.
fn a_copy_that_does_not_match_is_never_served(store: &dyn PageStore) {
    let indices = [500u64];
    let src = contents(&indices, 3);
    store_all(store, &indices, &src, 4);
    let mut dst = pages(1);
    let mut reads = [PageRead::new(
        500,
        &mut dst[0].0,
        crc32c::crc32c(&src[0].0) ^ 1,
        4,
    )];
    let err = store.fetch(&mut reads).expect_err("a mismatch");
    assert!(
        matches!(err, StoreError::Mismatch { page: 500, .. }),
        "{err}"
    );
    assert_eq!(reads[0].outcome, Outcome::Failed(FailureKind::Lost));
}

/// Discarded pages read as zeros; their neighbours survive; a range past the end is
/// clipped, one starting past the end is refused.
fn discard_forgets_exactly_its_range(store: &dyn PageStore) {
    let indices = [5u64, 6, 7];
    let src = contents(&indices, 9);
    store_all(store, &indices, &src, 1);
    store.discard(6, 1).expect("discarding page 6");
    let zero = pages(1);
    fetch_expecting(store, &[5, 7], &[src[0].clone(), src[2].clone()], 1);
    fetch_expecting(store, &[6], &zero, 1);
    store
        .discard(SUITE_PAGES - 1, 100)
        .expect("a discard clipped at the end");
    let err = store.discard(SUITE_PAGES, 1).expect_err("past the end");
    assert!(matches!(err, StoreError::PageOutOfRange { .. }), "{err}");
    assert_eq!(err.kind(), FailureKind::Refused);
    store.discard(SUITE_PAGES, 0).expect("an empty discard");
}

/// Pages at or past the heap's end are refused on every operation.
fn pages_outside_the_heap_are_refused(store: &dyn PageStore) {
    let mut buf = pages(1);
    let mut reads = [PageRead::new(SUITE_PAGES, &mut buf[0].0, zero_crc(), 1)];
    let err = store.fetch(&mut reads).expect_err("outside");
    assert!(matches!(err, StoreError::PageOutOfRange { page, .. } if page == SUITE_PAGES));
    assert_eq!(reads[0].outcome, Outcome::Failed(FailureKind::Refused));
    let src = pages(1);
    let mut writes = [PageWrite::new(u64::MAX, &src[0].0, 1)];
    let err = store.store(&mut writes).expect_err("outside");
    assert_eq!(err.kind(), FailureKind::Refused);
}

fn empty_batches_do_nothing(store: &dyn PageStore) {
    store.fetch(&mut []).expect("an empty fetch");
    store.store(&mut []).expect("an empty store");
    store.fetch_all(&mut []).expect("no batches");
}

/// `fetch_all` serves every batch, each page with its own outcome.
fn several_batches_in_flight_at_once(store: &dyn PageStore) {
    let a: Vec<u64> = (1000..1064).collect();
    let b: Vec<u64> = (2000..2016).collect();
    let (sa, sb) = (contents(&a, 11), contents(&b, 12));
    store_all(store, &a, &sa, 1);
    store_all(store, &b, &sb, 1);
    let (mut da, mut db) = (pages(a.len()), pages(b.len()));
    let mut ra: Vec<PageRead<'_>> = da
        .iter_mut()
        .zip(a.iter().zip(&sa))
        .map(|(p, (&page, s))| PageRead::new(page, &mut p.0, crc32c::crc32c(&s.0), 1))
        .collect();
    let mut rb: Vec<PageRead<'_>> = db
        .iter_mut()
        .zip(b.iter().zip(&sb))
        .map(|(p, (&page, s))| PageRead::new(page, &mut p.0, crc32c::crc32c(&s.0), 1))
        .collect();
    // One page of the second batch expected as other content: only it fails.
    rb[3].crc ^= 1;
    let err = store
        .fetch_all(&mut [&mut ra, &mut rb])
        .expect_err("one page is lost");
    assert_eq!(err.page(), Some(2003));
    assert!(ra.iter().all(|r| r.outcome.is_done()));
    assert_eq!(rb[3].outcome, Outcome::Failed(FailureKind::Lost));
    assert_eq!(
        rb.iter().filter(|r| r.outcome.is_done()).count(),
        b.len() - 1
    );
    drop((ra, rb));
    assert!(da.iter().zip(&sa).all(|(d, s)| d.0 == s.0));
}

/// A page whose outcome a layer above already set is neither read nor written.
fn pages_already_decided_are_left_alone(store: &dyn PageStore) {
    let indices = [60u64, 61, 62];
    let src = contents(&indices, 21);
    store_all(store, &indices, &src, 1);
    let newer = contents(&indices, 22);
    let mut writes: Vec<PageWrite<'_>> = newer
        .iter()
        .zip(&indices)
        .map(|(p, &page)| PageWrite::new(page, &p.0, 2))
        .collect();
    writes[1].outcome = Outcome::Failed(FailureKind::Transient);
    let _ = store.store(&mut writes);
    assert_eq!(writes[1].outcome, Outcome::Failed(FailureKind::Transient));
    assert!(writes[0].outcome.is_done() && writes[2].outcome.is_done());
    // Page 61 still holds version 1.
    fetch_expecting(store, &[61], &src[1..2], 1);
    let mut dst = pages(3);
    for p in dst.iter_mut() {
        p.0.fill(0x55);
    }
    let mut reads: Vec<PageRead<'_>> = dst
        .iter_mut()
        .zip(indices.iter().zip(&newer))
        .map(|(p, (&page, s))| PageRead::new(page, &mut p.0, crc32c::crc32c(&s.0), 2))
        .collect();
    reads[0].outcome = Outcome::Failed(FailureKind::Refused);
    let _ = store.fetch(&mut reads[..1]);
    assert_eq!(reads[0].outcome, Outcome::Failed(FailureKind::Refused));
    assert!(
        reads[0].buf.iter().all(|&b| b == 0x55),
        "an undecided page only is read"
    );
    store.fetch(&mut reads[2..]).expect("page 62 is version 2");
}

/// Six threads round-trip their own pages at once.
fn concurrent_callers(store: &dyn PageStore) {
    std::thread::scope(|s| {
        for t in 0..6u64 {
            s.spawn(move || {
                for round in 0..20u64 {
                    let first = t * 512 + (round % 4) * 64;
                    let indices: Vec<u64> = (first..first + 64).collect();
                    round_trip(store, &indices, t * 100 + round);
                }
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FaultEffect, FaultOp, FaultPlan};
    use crate::config::{PoolSettings, Replication};
    use crate::store::memcached::test_server::TestServer;
    use crate::store::memory::MemoryStore;
    use crate::store::open_memcached_pool;
    use crate::store::{FaultyStore, FileOptions, FileStore, PAGE_BYTES};

    fn heap_bytes() -> u64 {
        SUITE_PAGES * PAGE_BYTES
    }

    /// A plan that never fires (its budget is every page there could be).
    fn idle_plan(op: FaultOp) -> FaultPlan {
        FaultPlan {
            op,
            after_pages: u64::MAX,
            effect: FaultEffect::Errno(libc::EIO),
            once: false,
        }
    }

    #[test]
    fn the_memory_store_conforms() {
        check_all(&|| Box::new(MemoryStore::new(heap_bytes())));
    }

    #[test]
    fn the_file_store_conforms_in_every_mode() {
        let dir = std::env::temp_dir();
        for options in FileOptions::ALL_MODES {
            check_all(&|| {
                Box::new(
                    FileStore::open_with(&dir, heap_bytes(), options).expect("opening the store"),
                )
            });
        }
    }

    #[test]
    fn the_faulty_wrapper_conforms_while_its_plan_waits() {
        let dir = std::env::temp_dir();
        for op in [FaultOp::Fetch, FaultOp::Store, FaultOp::ReadBack] {
            check_all(&|| {
                Box::new(FaultyStore::new(
                    MemoryStore::new(heap_bytes()),
                    idle_plan(op),
                ))
            });
            check_all(&|| {
                let file = FileStore::open(&dir, heap_bytes()).expect("opening the store");
                Box::new(FaultyStore::new(file, idle_plan(op)))
            });
        }
    }

    /// Against real memcached servers on loopback: one server, a pool of two, and a pool of
    /// three keeping two copies in each replication mode.
    #[test]
    fn the_memcached_pool_conforms() {
        let servers: Vec<TestServer> = (0..3).map(|_| TestServer::start(64, false)).collect();
        let addrs: Vec<String> = servers.iter().map(|s| s.addr.clone()).collect();
        let open = |n: usize, settings: PoolSettings| {
            Box::new(
                open_memcached_pool(&addrs[..n], &settings, heap_bytes(), None)
                    .expect("opening the pool"),
            ) as Box<dyn PageStore>
        };
        check_all(&|| open(1, PoolSettings::default()));
        check_all(&|| open(2, PoolSettings::default()));
        // Sealed values (LEGO_KEY_FILE) keep every promise of the trait.
        let key = crate::seal::SealKey::from_bytes([0x5e; crate::seal::KEY_BYTES]);
        check_all(&|| {
            Box::new(
                open_memcached_pool(
                    &addrs[..2],
                    &PoolSettings::default(),
                    heap_bytes(),
                    Some(&key),
                )
                .expect("opening the sealed pool"),
            ) as Box<dyn PageStore>
        });
        for replication in [
            Replication::Pessimistic,
            Replication::Optimistic,
            Replication::Adaptive,
        ] {
            let settings = PoolSettings {
                replicas: 2,
                replication,
                ..PoolSettings::default()
            };
            check_all(&|| open(3, settings));
        }
    }

    /// A server that may evict (started without `-M`) is refused, with the reason; so is one
    /// that is not there.
    #[test]
    fn a_memcached_that_may_evict_is_refused() {
        let evicting = TestServer::start(64, true);
        let settings = PoolSettings::default();
        let e = open_memcached_pool(
            std::slice::from_ref(&evicting.addr),
            &settings,
            heap_bytes(),
            None,
        )
        .err()
        .expect("refused");
        let text = crate::logging::error_chain(&e);
        assert!(
            text.contains("-M") && text.contains(&evicting.addr),
            "{text}"
        );
        drop(evicting);
        let gone = "127.0.0.1:1".to_string();
        let e = open_memcached_pool(&[gone], &settings, heap_bytes(), None)
            .err()
            .expect("nothing listens there");
        assert!(
            e.to_string()
                .contains("connecting to the server 127.0.0.1:1"),
            "{e}"
        );
    }

    #[test]
    fn a_boxed_store_conforms() {
        check_all(&|| {
            let inner: Box<dyn PageStore> = Box::new(MemoryStore::new(heap_bytes()));
            Box::new(inner)
        });
    }

    /// Every outcome kind, from the faulty wrapper: a transient page that works when tried
    /// again (`once`), and a lasting failure that keeps failing.
    #[test]
    fn transient_failures_pass_when_once_and_stay_otherwise() {
        let plan = FaultPlan {
            op: FaultOp::Fetch,
            after_pages: 2,
            effect: FaultEffect::Errno(libc::EIO),
            once: true,
        };
        let store = FaultyStore::new(MemoryStore::new(heap_bytes()), plan);
        let indices = [1u64, 2, 3, 4];
        let src = contents(&indices, 5);
        store_all(&store, &indices, &src, 1);
        let mut dst = pages(4);
        let mut reads: Vec<PageRead<'_>> = dst
            .iter_mut()
            .zip(indices.iter().zip(&src))
            .map(|(p, (&page, s))| PageRead::new(page, &mut p.0, crc32c::crc32c(&s.0), 1))
            .collect();
        let err = store
            .fetch(&mut reads)
            .expect_err("the third page fails once");
        assert_eq!(err.kind(), FailureKind::Transient);
        assert_eq!(err.page(), Some(3));
        let outcomes: Vec<Outcome> = reads.iter().map(|r| r.outcome).collect();
        assert_eq!(
            outcomes,
            [
                Outcome::Done,
                Outcome::Done,
                Outcome::Failed(FailureKind::Transient),
                Outcome::Done
            ]
        );
        drop(reads);
        // Tried again, it is served.
        fetch_expecting(&store, &indices, &src, 1);

        let lasting = FaultyStore::new(
            MemoryStore::new(heap_bytes()),
            FaultPlan {
                once: false,
                ..plan
            },
        );
        store_all(&lasting, &indices, &src, 1);
        for _ in 0..3 {
            let mut dst = pages(1);
            let mut reads = [PageRead::new(
                4,
                &mut dst[0].0,
                crc32c::crc32c(&src[3].0),
                1,
            )];
            let budget_left = lasting.fetch(&mut reads);
            // The first two pages of the budget went to earlier calls; then it keeps failing.
            if budget_left.is_err() {
                assert_eq!(reads[0].outcome, Outcome::Failed(FailureKind::Transient));
            }
        }
        let mut dst = pages(1);
        let mut reads = [PageRead::new(
            4,
            &mut dst[0].0,
            crc32c::crc32c(&src[3].0),
            1,
        )];
        assert!(
            lasting.fetch(&mut reads).is_err(),
            "a lasting failure stays"
        );
    }
}
