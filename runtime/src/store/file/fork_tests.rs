//! Fork generations of the file store, without a real fork: the parent object and the child
//! object that [`PageStore::fork_child`] makes from it right after the freeze (what a real
//! child would see) are used side by side, and a generation is ended by closing its pipe's
//! write end. Every check is about what the stores read back or what the files hold.

use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;

use super::*;
use crate::config::{FaultEffect, FaultOp, FaultPlan};
use crate::io::test_support::{fill, pages, Page};
use crate::store::conformance::{check_all, store_all, SUITE_PAGES};
use crate::store::memory::MemoryStore;
use crate::store::FaultyStore;

use super::tests::TestDir;

const HEAP_PAGES: u64 = 4096;

fn open(dir: &TestDir, options: FileOptions) -> FileStore {
    FileStore::open_with(&dir.0, HEAP_PAGES * PAGE_BYTES, options).expect("opening the store")
}

/// The read and write ends of a generation's pipe.
fn pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe().expect("a pipe")
}

/// Content of `indices` for the `round`-th write: every round and page differs.
fn contents(indices: &[u64], round: u64) -> Vec<Page> {
    let mut src = pages(indices.len());
    for (p, &page) in src.iter_mut().zip(indices) {
        fill(&mut p.0, page.wrapping_mul(1_000_003) ^ round);
    }
    src
}

/// Writes round `round` of `indices` (as that version) and returns what was written.
fn write(store: &dyn PageStore, indices: &[u64], round: u64) -> Vec<Page> {
    let src = contents(indices, round);
    let version = u32::try_from(round).expect("a small round");
    store_all(store, indices, &src, version);
    src
}

/// Reads `indices` in one batch and checks each against `want`.
fn expect(store: &dyn PageStore, indices: &[u64], want: &[&Page]) {
    assert_eq!(indices.len(), want.len());
    let mut dst = pages(indices.len());
    let mut reads: Vec<PageRead<'_>> = dst
        .iter_mut()
        .zip(indices.iter().zip(want))
        .map(|(p, (&page, w))| PageRead::new(page, &mut p.0, crc32c::crc32c(&w.0), 1))
        .collect();
    if let Err(e) = store.fetch(&mut reads) {
        let failed: Vec<u64> = reads
            .iter()
            .filter(|r| !r.outcome.is_done())
            .map(|r| r.page)
            .collect();
        panic!(
            "{}: pages {failed:?} are not what was expected: {e}",
            store.describe()
        );
    }
    drop(reads);
    for (i, (got, w)) in dst.iter().zip(want).enumerate() {
        assert!(got.0 == w.0, "page {} differs", indices[i]);
    }
}

/// `expect` with the pages of `src` (written for `indices`) at positions `at`.
fn expect_some(store: &dyn PageStore, indices: &[u64], src: &[Page], at: std::ops::Range<usize>) {
    let want: Vec<&Page> = src[at.clone()].iter().collect();
    expect(store, &indices[at], &want);
}

fn all(src: &[Page]) -> Vec<&Page> {
    src.iter().collect()
}

/// Blocks the layer's file has on disk.
fn blocks(store: &FileStore, layer: usize) -> u64 {
    store
        .layers
        .layer(layer)
        .file
        .metadata()
        .expect("fstat of a layer")
        .blocks()
}

fn range(r: std::ops::Range<u64>) -> Vec<u64> {
    r.collect()
}

/// The child keeps every page's fork-time bytes while the parent overwrites and discards;
/// the parent reads its new ones, also in batches that mix layers.
#[test]
fn a_child_reads_the_fork_time_copies_while_the_parent_changes_them() {
    let dir = TestDir::new("fork-time");
    for options in FileOptions::ALL_MODES {
        let store = open(&dir, options);
        let mut indices = range(0..64);
        indices.extend([100, 200, 300, HEAP_PAGES - 1]);
        let v1 = write(&store, &indices, 1);
        assert!(store.fork_freeze());
        let child = store.fork_child().expect("the child's store");
        let (hup, held) = pipe();
        store.fork_parent(Some(hup));
        assert_eq!(store.generations_live(), 1);

        let v2 = write(&store, &indices[..32], 2);
        store.discard(32, 32).expect("discarding in the parent");
        store
            .discard(HEAP_PAGES - 1, 1)
            .expect("discarding the last page");
        expect(&*child, &indices, &all(&v1));
        expect(&store, &indices[..32], &all(&v2));
        // One batch over both layers: pages 16..32 are new, 100 and 200 from the fork.
        let mixed = [16u64, 17, 18, 100, 200, 31];
        let want = [&v2[16], &v2[17], &v2[18], &v1[64], &v1[65], &v2[31]];
        expect(&store, &mixed, &want);
        expect(
            &*child,
            &mixed,
            &[&v1[16], &v1[17], &v1[18], &v1[64], &v1[65], &v1[31]],
        );
        drop(held);
    }
}

/// The child's own writes and discards are its own; the parent's copies do not change, and
/// the parent's later writes do not reach the child. The child's directory is made at its
/// first write and removed with it.
#[test]
fn a_childs_writes_are_its_own() {
    let dir = TestDir::new("own-writes");
    let store = open(&dir, FileOptions::default());
    let indices = range(0..16);
    let v1 = write(&store, &indices, 1);
    assert!(store.fork_freeze());
    let child = store.fork_child().expect("the child's store");
    let (hup, _held) = pipe();
    store.fork_parent(Some(hup));
    assert_eq!(dir.entries(), 1, "the child makes nothing before it writes");

    let c = write(&*child, &indices[..8], 3);
    assert_eq!(
        dir.entries(),
        2,
        "the child's first write makes its directory"
    );
    child.discard(4, 8).expect("discarding in the child");
    let c2 = write(&*child, &indices[8..10], 4);
    expect_some(&*child, &indices, &c, 0..4);
    expect(&*child, &indices[8..10], &all(&c2));
    expect_some(&*child, &indices, &v1, 12..16);
    expect(&store, &indices, &all(&v1));

    let p = write(&store, &indices[..4], 5);
    expect(&store, &indices[..4], &all(&p));
    expect_some(&*child, &indices, &c, 0..4);
    assert!(
        child.describe().contains("forked child"),
        "{}",
        child.describe()
    );
    drop(child);
    assert_eq!(dir.entries(), 1, "the child's directory goes with it");
    expect(&store, &indices[..4], &all(&p));
}

/// Closing the pipe's write end ends the generation: the next write goes to the lowest layer
/// again (and punches the page's copy in the newer one), and a discard frees the blocks of
/// the formerly frozen layer, which it kept while the generation lived.
#[test]
fn the_generation_ends_when_the_pipe_closes() {
    let dir = TestDir::new("ends");
    let store = open(&dir, FileOptions::default());
    let indices = range(0..64);
    let v1 = write(&store, &indices, 1);
    let full = blocks(&store, 0);
    assert!(full > 0, "64 written pages take blocks");
    assert!(store.fork_freeze());
    let (hup, held) = pipe();
    store.fork_parent(Some(hup));

    let v2 = write(&store, &indices[..8], 2);
    assert_eq!(store.map.get(0), 1, "a frozen layer is not written");
    store.discard(32, 32).expect("discarding while frozen");
    assert_eq!(blocks(&store, 0), full, "the frozen layer keeps its blocks");
    assert!(blocks(&store, 1) > 0);
    assert_eq!(store.generations_live(), 1);

    drop(held);
    let v3 = write(&store, &indices[..8], 3);
    assert_eq!(store.generations_live(), 0, "the write saw the pipe close");
    assert_eq!(store.map.get(0), 0, "writes go to the unfrozen layer again");
    assert_eq!(
        blocks(&store, 1),
        0,
        "the stale copies in layer 1 were punched"
    );
    expect(&store, &indices[..8], &all(&v3));
    drop(v2);

    store.discard(32, 32).expect("discarding after the end");
    assert!(
        blocks(&store, 0) < full,
        "the formerly frozen layer gave its discarded pages back"
    );
    expect_some(&store, &indices, &v1, 8..32);
    assert!(store
        .report()
        .contains(&("fork_generations_live".into(), "0".into())));
}

/// Two live generations, ended in either order: each child keeps its own fork-time bytes
/// while the other generation ends, and the parent its newest ones.
#[test]
fn nested_generations_end_in_either_order() {
    let dir = TestDir::new("nested");
    for first_ends_first in [true, false] {
        let store = open(&dir, FileOptions::default());
        let indices = range(0..32);
        let v1 = write(&store, &indices, 1);
        assert!(store.fork_freeze());
        let c1 = store.fork_child().expect("the first child");
        let (hup1, held1) = pipe();
        store.fork_parent(Some(hup1));
        let v2 = write(&store, &indices[..16], 2);
        assert!(store.fork_freeze());
        let c2 = store.fork_child().expect("the second child");
        let (hup2, held2) = pipe();
        store.fork_parent(Some(hup2));
        assert_eq!(store.generations_live(), 2);
        let v3 = write(&store, &indices[..8], 3);
        store.discard(24, 8).expect("discarding");

        let check_c1 = || expect(&*c1, &indices, &all(&v1));
        let check_c2 = || {
            expect(&*c2, &indices[..16], &all(&v2));
            expect_some(&*c2, &indices, &v1, 16..32);
        };
        check_c1();
        check_c2();

        let (ended, survivor): (OwnedFd, OwnedFd) = if first_ends_first {
            (held1, held2)
        } else {
            (held2, held1)
        };
        drop(ended);
        let v4 = write(&store, &indices[8..12], 4);
        store.discard(20, 12).expect("discarding after one ended");
        assert_eq!(store.generations_live(), 1);
        if first_ends_first {
            check_c2();
        } else {
            check_c1();
        }
        expect(&store, &indices[..8], &all(&v3));
        expect(&store, &indices[8..12], &all(&v4));
        expect_some(&store, &indices, &v2, 12..16);
        expect_some(&store, &indices, &v1, 16..20);

        drop(survivor);
        let v5 = write(&store, &indices[12..14], 5);
        assert_eq!(store.generations_live(), 0);
        expect(&store, &indices[..8], &all(&v3));
        expect(&store, &indices[8..12], &all(&v4));
        expect(&store, &indices[12..14], &all(&v5));
        expect_some(&store, &indices, &v2, 14..16);
        expect_some(&store, &indices, &v1, 16..20);
    }
}

/// A child that forks: the grandchild reads the child's own pages and those the child
/// inherited, each as they were at its fork.
#[test]
fn a_grandchild_reads_both_ancestors() {
    let dir = TestDir::new("grandchild");
    let store = open(&dir, FileOptions::default());
    let indices = range(0..16);
    let v1 = write(&store, &indices, 1);
    assert!(store.fork_freeze());
    let child = store.fork_child().expect("the child");
    let (hup, _held) = pipe();
    store.fork_parent(Some(hup));
    let c = write(&*child, &indices[..8], 2);
    assert!(child.fork_freeze());
    let grandchild = child.fork_child().expect("the grandchild");
    let (hup, _held_by_grandchild) = pipe();
    child.fork_parent(Some(hup));
    let c2 = write(&*child, &indices[..4], 3);
    let g = write(&*grandchild, &indices[12..], 4);

    expect_some(&*grandchild, &indices, &c, 0..8);
    expect_some(&*grandchild, &indices, &v1, 8..12);
    expect(&*grandchild, &indices[12..], &all(&g));
    expect(&*child, &indices[..4], &all(&c2));
    expect_some(&*child, &indices, &c, 4..8);
    expect_some(&*child, &indices, &v1, 8..16);
    expect(&store, &indices, &all(&v1));
}

/// Forks that never end use up the layers: a fork is refused (nothing changes) while the
/// child of the last one allowed can still write, and the store keeps working; once the
/// generations end, forks work again, and a failed fork ends its generation at once.
#[test]
fn layers_run_out_and_the_store_keeps_working() {
    let dir = TestDir::new("layers-max");
    let store = open(&dir, FileOptions::default());
    let mut held = Vec::new();
    let mut last_child = None;
    let mut written = Vec::new();
    for round in 0..=LAYERS_MAX as u64 {
        written.push(write(&store, &[round], round + 1));
        if !store.fork_freeze() {
            break;
        }
        last_child = Some(store.fork_child().expect("a child"));
        let (hup, end) = pipe();
        store.fork_parent(Some(hup));
        held.push(end);
    }
    let forks = held.len();
    assert!(
        (1..LAYERS_MAX).contains(&forks),
        "{forks} forks before refusing"
    );
    assert_eq!(
        store.layer_count(),
        LAYERS_MAX - 1,
        "one is left for a child"
    );
    assert_eq!(store.generations_live(), forks);
    // The refusal changed nothing: the last page is still writable and readable.
    let last = u64::try_from(forks).expect("a few forks");
    let again = write(&store, &[last], 100);
    expect(&store, &[last], &all(&again));
    for (page, src) in written.iter().enumerate().take(forks) {
        expect(&store, &[page as u64], &all(src));
    }
    let child = last_child.expect("at least one fork");
    let own = write(&*child, &[2000], 7);
    expect(&*child, &[2000], &all(&own));

    drop(held);
    store
        .discard(3000, 1)
        .expect("a discard polls the generations");
    assert_eq!(store.generations_live(), 0);
    assert!(
        store.fork_freeze(),
        "forks work again: the idle layers are merged"
    );
    assert_eq!(store.layer_count(), LAYERS_MAX - 1);
    for (page, src) in written.iter().enumerate().take(forks) {
        expect(&store, &[page as u64], &all(src));
    }
    expect(&store, &[last], &all(&again));
    store.fork_parent(None);
    assert_eq!(store.generations_live(), 0);
    let after = write(&store, &[0], 200);
    assert_eq!(store.map.get(0), 0, "a failed fork froze nothing for long");
    expect(&store, &[0], &all(&after));
}

/// The newest content written to each page.
type Newest = std::collections::BTreeMap<u64, Page>;

/// Writes round `round` of `indices` and records it in `newest`.
fn record(newest: &mut Newest, store: &dyn PageStore, indices: &[u64], round: u64) {
    for (page, src) in indices.iter().zip(write(store, indices, round)) {
        newest.insert(*page, src);
    }
}

/// Forks that follow one another (each child gone before the next fork) never run out of
/// layers: the layers no child reads are merged, and every page keeps its newest bytes, in
/// the parent and in each child.
#[test]
fn forks_that_follow_one_another_never_run_out() {
    let dir = TestDir::new("sequential");
    for options in FileOptions::ALL_MODES {
        let store = open(&dir, options);
        let mut newest = Newest::new();
        record(&mut newest, &store, &range(0..8), 1);
        for round in 2..40u64 {
            record(
                &mut newest,
                &store,
                &[round % 8, 100 + round, 101 + round],
                round,
            );
            // A page written and discarded since: the merge must not bring it back as data.
            write(&store, &[500 + round], round);
            store.discard(500 + round, 1).expect("discarding");
            assert!(store.fork_freeze(), "fork {round} is served");
            let child = store.fork_child().expect("the child");
            let (hup, held) = pipe();
            store.fork_parent(Some(hup));
            let indices: Vec<u64> = newest.keys().copied().collect();
            let want: Vec<&Page> = newest.values().collect();
            expect(&*child, &indices, &want);
            let mut after = newest.clone();
            record(&mut after, &store, &[round % 8, 3000], round + 1000);
            expect(&*child, &indices, &want);
            drop(child);
            drop(held);
            newest = after;
            assert!(store.layer_count() < LAYERS_MAX);
        }
        let indices: Vec<u64> = newest.keys().copied().collect();
        let want: Vec<&Page> = newest.values().collect();
        expect(&store, &indices, &want);
    }
}

/// A store that cannot serve a child says so; the fault injector forwards to the file
/// store's child, wrapped with the same plan.
#[test]
fn other_stores_refuse_and_the_injector_forwards() {
    let memory = MemoryStore::new(HEAP_PAGES * PAGE_BYTES);
    assert!(!memory.fork_freeze());
    let e = memory
        .fork_child()
        .err()
        .expect("the memory store has no child");
    assert!(matches!(e, StoreError::ForkUnsupported { .. }), "{e}");
    assert_eq!(e.kind(), FailureKind::Refused);

    let dir = TestDir::new("faulty");
    let plan = FaultPlan {
        op: FaultOp::Fetch,
        after_pages: u64::MAX,
        effect: FaultEffect::Errno(libc::EIO),
        once: false,
    };
    let faulty = FaultyStore::new(open(&dir, FileOptions::default()), plan);
    let v1 = write(&faulty, &[5, 6], 1);
    assert!(faulty.fork_freeze());
    let child = faulty.fork_child().expect("the wrapped child");
    let (hup, _held) = pipe();
    faulty.fork_parent(Some(hup));
    write(&faulty, &[5], 2);
    assert!(
        child.describe().contains("forked child") && child.describe().contains("errno 5"),
        "{}",
        child.describe()
    );
    expect(&*child, &[5, 6], &all(&v1));
}

/// A store and what must live as long as it: the generation's write end (and the parent,
/// for a child's store).
struct WithGeneration {
    store: Box<dyn PageStore>,
    _held: OwnedFd,
    _parent: Option<FileStore>,
}

impl PageStore for WithGeneration {
    fn fetch(&self, batch: &mut [PageRead<'_>]) -> Result<(), StoreError> {
        self.store.fetch(batch)
    }

    fn fetch_all(&self, batches: &mut [&mut [PageRead<'_>]]) -> Result<(), StoreError> {
        self.store.fetch_all(batches)
    }

    fn store(&self, batch: &mut [PageWrite<'_>]) -> Result<(), StoreError> {
        self.store.store(batch)
    }

    fn discard(&self, first: u64, count: u64) -> Result<(), StoreError> {
        self.store.discard(first, count)
    }

    fn verifies_reads(&self) -> bool {
        self.store.verifies_reads()
    }

    fn describe(&self) -> String {
        self.store.describe()
    }
}

/// A store for the suite with a live generation over pages the suite never reads unwritten
/// (it reads pages 3000 and 3001 as never stored); for `child`, the child's store of it.
fn live_generation(dir: &Path, options: FileOptions, child: bool) -> Box<dyn PageStore> {
    let parent =
        FileStore::open_with(dir, SUITE_PAGES * PAGE_BYTES, options).expect("opening the store");
    let mut before = range(0..64);
    before.extend(5000..5100);
    write(&parent, &before, 1);
    assert!(parent.fork_freeze());
    let child_store = child.then(|| parent.fork_child().expect("the child's store"));
    let (hup, held) = pipe();
    parent.fork_parent(Some(hup));
    assert_eq!(parent.generations_live(), 1);
    Box::new(match child_store {
        Some(store) => WithGeneration {
            store,
            _held: held,
            _parent: Some(parent),
        },
        None => WithGeneration {
            store: Box::new(parent),
            _held: held,
            _parent: None,
        },
    })
}

#[test]
fn the_store_conforms_with_a_live_generation_and_as_a_child() {
    let dir = TestDir::new("conformance");
    for options in FileOptions::ALL_MODES {
        check_all(&|| live_generation(&dir.0, options, false));
        check_all(&|| live_generation(&dir.0, options, true));
    }
    assert_eq!(dir.entries(), 0, "every store removed its directory");
}
