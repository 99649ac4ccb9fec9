//! Heap tests on anonymous `MAP_NORESERVE` regions. Discards are real (`MADV_DONTNEED` on a
//! private anonymous mapping reads back as zero), so "fresh memory is zero" is checked for
//! real, not assumed.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::size_class::SMALL_MAX_BYTES;
use super::*;
use crate::test_support::Rng;

const REGION_BYTES: usize = 1 << 30;

/// A mapped region for one test heap; unmapped on drop (tests only: lego never unmaps).
struct TestRegion {
    base: *mut u8,
    len: usize,
}

// SAFETY: the region is plain memory; the heap inside synchronizes itself.
unsafe impl Send for TestRegion {}
// SAFETY: as above.
unsafe impl Sync for TestRegion {}

impl TestRegion {
    fn new(len: usize) -> TestRegion {
        // SAFETY: a fresh private anonymous mapping; nothing else is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap of the test region failed");
        TestRegion {
            base: p.cast(),
            len,
        }
    }

    /// A heap on this region. The `'static` is a lie bounded by the test: the region outlives
    /// every use of the heap in it.
    fn create(&self) -> &'static Heap {
        // SAFETY: the region is fresh, zeroed, page-aligned and owned by this test.
        unsafe { Heap::create(self.base, self.len) }.expect("creating the test heap")
    }
}

impl Drop for TestRegion {
    fn drop(&mut self) {
        // SAFETY: the mapping was made in `new` and nothing uses it any more.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

static DISCARDED: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());

fn discard(addr: *mut u8, len: usize) {
    assert_eq!(
        addr.addr() % PAGE_SIZE,
        0,
        "discard address not page-aligned"
    );
    assert_eq!(len % PAGE_SIZE, 0, "discard length not page-aligned");
    assert!(len > 0);
    // SAFETY: the heap hands over a page-aligned range of its own region it no longer uses.
    let rc = unsafe { libc::madvise(addr.cast(), len, libc::MADV_DONTNEED) };
    assert_eq!(rc, 0, "madvise failed");
    DISCARDED
        .lock()
        .expect("discard log poisoned")
        .push((addr.addr(), len));
}

fn discards_in(heap: &Heap) -> Vec<(usize, usize)> {
    let log = DISCARDED.lock().expect("discard log poisoned");
    log.iter()
        .copied()
        .filter(|&(a, _)| heap.contains(a as *const u8))
        .collect()
}

fn fill(p: *mut u8, len: usize, byte: u8) {
    // SAFETY: callers pass live allocations of at least `len` bytes.
    unsafe { std::ptr::write_bytes(p, byte, len) };
}

fn check(p: *mut u8, len: usize, byte: u8) -> bool {
    // SAFETY: callers pass live allocations of at least `len` bytes.
    let s = unsafe { std::slice::from_raw_parts(p, len) };
    s.iter().all(|&b| b == byte)
}

/// Resident pages of `[p, p+len)` per mincore.
fn resident_pages(p: *mut u8, len: usize) -> usize {
    let pages = len.div_ceil(PAGE_SIZE);
    let mut vec = vec![0u8; pages];
    let start = p.addr() & !(PAGE_SIZE - 1);
    // SAFETY: the range is mapped (inside a test region) and `vec` has one byte per page.
    let rc = unsafe {
        libc::mincore(
            start as *mut libc::c_void,
            pages * PAGE_SIZE,
            vec.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "mincore failed");
    vec.iter().filter(|&&b| b & 1 != 0).count()
}

/// A size for the stress tests, drawn from `rng` (seeded, so a test is reproducible): mostly
/// small, some medium, a few large.
fn draw_size(rng: &mut Rng) -> usize {
    match rng.below(100) {
        0..=69 => rng.below(257) as usize,
        70..=94 => rng.below(SMALL_MAX_BYTES as u64 + 1) as usize,
        _ => rng.below(600_000) as usize,
    }
}

#[test]
fn create_checks_its_arguments() {
    let r = TestRegion::new(REGION_BYTES);
    // SAFETY: the region is mapped; bad arguments are refused before anything is written.
    unsafe {
        assert!(matches!(
            Heap::create(r.base.add(8), 1 << 20),
            Err(HeapError::MisalignedBase { .. })
        ));
        assert!(matches!(
            Heap::create(r.base, 12345),
            Err(HeapError::MisalignedLength { .. })
        ));
        assert!(matches!(
            Heap::create(r.base, 4 * PAGE_SIZE),
            Err(HeapError::RegionTooSmall { .. })
        ));
        assert!(matches!(
            Heap::open(r.base, r.len),
            Err(HeapError::BadMagic { .. })
        ));
    }
    let heap = r.create();
    assert_eq!(heap.bytes_in_use(), 0);
    assert!(heap.locks_free());
    // SAFETY: same region, a heap image is present.
    unsafe {
        assert!(matches!(
            Heap::open(r.base, r.len / 2),
            Err(HeapError::LengthMismatch { .. })
        ));
    }
    let msg = HeapError::BadVersion {
        base: 0x1000,
        found: 7,
    }
    .to_string();
    assert!(msg.contains("version 7"), "{msg}");
}

#[test]
fn all_sizes_do_not_overlap() {
    let r = TestRegion::new(REGION_BYTES);
    let heap = r.create();
    let mut blocks = Vec::new();
    let mut sizes: Vec<usize> = (0..=1024).collect();
    sizes.extend((1025..=SMALL_MAX_BYTES + 4096).step_by(97));
    sizes.extend([65536, 65537, 100_000, 1 << 20, (1 << 20) + 1, 3 << 20]);
    for (i, &size) in sizes.iter().enumerate() {
        for _ in 0..3 {
            let p = heap.malloc(size);
            assert!(!p.is_null(), "malloc({size})");
            assert_eq!(p.addr() % 16, 0, "malloc({size}) misaligned");
            assert!(heap.usable_size(p) >= size.max(1), "usable_size for {size}");
            assert!(heap.contains(p));
            fill(p, size, i as u8);
            blocks.push((p, size, i as u8));
        }
    }
    for &(p, size, b) in &blocks {
        assert!(check(p, size, b), "block of {size} bytes was overwritten");
    }
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
    while !blocks.is_empty() {
        let (p, size, b) = blocks.swap_remove(rng.below(blocks.len() as u64) as usize);
        assert!(check(p, size, b), "block of {size} bytes was overwritten");
        heap.free(p, discard);
    }
    assert_eq!(heap.bytes_in_use(), 0);
    assert_eq!(heap.invalid_frees(), 0);
    assert!(heap.locks_free());
}

#[test]
fn malloc_zero_is_unique() {
    let r = TestRegion::new(REGION_BYTES);
    let heap = r.create();
    let a = heap.malloc(0);
    let b = heap.malloc(0);
    assert!(!a.is_null() && !b.is_null() && a != b);
    heap.free(a, discard);
    heap.free(b, discard);
}

#[test]
fn small_objects_stay_dense() {
    let r = TestRegion::new(REGION_BYTES);
    let heap = r.create();
    let ptrs: Vec<_> = (0..256).map(|_| heap.malloc(16)).collect();
    let lo = ptrs.iter().map(|p| p.addr()).min().expect("non-empty");
    let hi = ptrs.iter().map(|p| p.addr()).max().expect("non-empty");
    assert!(
        hi - lo < PAGE_SIZE,
        "256 16-byte objects spread over {} bytes",
        hi - lo
    );
    // A new slab is touched as it is used: one object of a fresh 4 KiB-class slab leaves the
    // slab's other pages untouched.
    let big = heap.malloc(4096);
    assert!(resident_pages(big.wrapping_add(PAGE_SIZE), 4 * PAGE_SIZE) == 0);
    for p in ptrs {
        heap.free(p, discard);
    }
    heap.free(big, discard);
}

#[test]
fn calloc_zeroes_reused_memory() {
    let r = TestRegion::new(REGION_BYTES);
    let heap = r.create();
    for &size in &[1usize, 16, 100, 1000, 5000, 32768, 40000, 70000, 1 << 20] {
        let dirty: Vec<_> = (0..8).map(|_| heap.malloc(size)).collect();
        for &p in &dirty {
            fill(p, size, 0xAA);
        }
        for &p in &dirty {
            heap.free(p, discard);
        }
        for _ in 0..8 {
            let p = heap.calloc(1, size);
            assert!(!p.is_null());
            assert!(check(p, size, 0), "calloc({size}) returned dirty memory");
            fill(p, size, 0x55);
            heap.free(p, discard);
        }
    }
    assert!(
        heap.calloc(usize::MAX / 2, 3).is_null(),
        "calloc overflow must fail"
    );
    assert_eq!(heap.bytes_in_use(), 0);
}

#[test]
fn calloc_of_fresh_memory_does_not_touch_it() {
    let r = TestRegion::new(REGION_BYTES);
    let heap = r.create();
    heap.set_retain_bytes(0);
    let len = 8 << 20;
    let p = heap.calloc(1, len);
    assert!(!p.is_null());
    assert_eq!(resident_pages(p, len), 0, "calloc wrote fresh pages");
    fill(p, len, 7);
    heap.free(p, discard);
    // The same pages come back discarded: still no memset.
    let q = heap.calloc(len, 1);
    assert_eq!(q, p);
    assert_eq!(resident_pages(q, len), 0, "calloc wrote discarded pages");
    assert!(check(q, len, 0));
    heap.free(q, discard);
}

#[test]
fn large_free_discards_page_aligned_ranges() {
    let r = TestRegion::new(REGION_BYTES);
    let heap = r.create();
    heap.set_retain_bytes(0);
    let len = (1 << 20) + 123;
    let p = heap.malloc(len);
    fill(p, len, 0x11);
    heap.free(p, discard);
    let d = discards_in(heap);
    let covered: usize = d
        .iter()
        .filter(|&&(a, l)| a <= p.addr() + len && a + l >= p.addr())
        .map(|&(_, l)| l)
        .sum();
    assert!(covered >= len, "freed run was not given back: {d:?}");
    assert_eq!(resident_pages(p, len), 0);
    // Small dirty runs are kept until they merge into one long enough to give back.
    let before = discards_in(heap).len();
    let a = heap.malloc(40_000);
    let b = heap.malloc(40_000);
    assert_eq!(b.addr(), a.addr() + 40_960, "adjacent runs");
    fill(a, 40_000, 1);
    fill(b, 40_000, 1);
    heap.free(a, discard);
    assert_eq!(
        discards_in(heap).len(),
        before,
        "a 40 KB run is too short to give back"
    );
    heap.free(b, discard);
    assert!(
        discards_in(heap).len() > before,
        "the merged 80 KB run was kept"
    );
    assert_eq!(heap.retained_bytes(), 0);
}

#[test]
fn freed_runs_stay_dirty_up_to_the_retain_budget() {
    let r = TestRegion::new(REGION_BYTES);
    let heap = r.create();
    heap.set_retain_bytes(4 << 20);
    let len = 1 << 20;
    let before = discards_in(heap).len();
    // Below the budget: kept dirty, reused without a discard, and calloc clears it.
    let p = heap.malloc(len);
    fill(p, len, 0x22);
    heap.free(p, discard);
    assert_eq!(
        discards_in(heap).len(),
        before,
        "a run under the budget was given back"
    );
    assert!(heap.retained_bytes() >= len as u64);
    let q = heap.calloc(1, len);
    assert_eq!(q, p, "the retained run is reused");
    assert!(check(q, len, 0), "calloc of a retained run must clear it");
    assert_eq!(heap.retained_bytes(), 0);
    // Over the budget: given back.
    let big = heap.malloc(8 << 20);
    fill(big, 8 << 20, 0x33);
    heap.free(big, discard);
    assert!(
        discards_in(heap).len() > before,
        "a run over the budget was kept"
    );
    assert!(heap.retained_bytes() <= 4 << 20);
    heap.free(q, discard);
}

#[test]
fn realloc_keeps_contents() {
    let r = TestRegion::new(REGION_BYTES);
    let heap = r.create();
    let steps = [
        1usize,
        24,
        200,
        3000,
        30_000,
        40_000,
        200_000,
        3 << 20,
        100_000,
        50_000,
        5000,
        8,
        1,
    ];
    let mut p = heap.malloc(steps[0]);
    fill(p, steps[0], 0x3C);
    let mut have = steps[0];
    for &size in &steps[1..] {
        p = heap.realloc(p, size, discard);
        assert!(!p.is_null(), "realloc to {size}");
        assert!(heap.usable_size(p) >= size);
        let kept = have.min(size);
        assert!(check(p, kept, 0x3C), "realloc to {size} lost bytes");
        fill(p, size, 0x3C);
        have = size;
    }
    assert!(
        heap.realloc(p, 0, discard).is_null(),
        "realloc(p, 0) frees and returns null"
    );
    let q = heap.realloc(std::ptr::null_mut(), 100, discard);
    assert!(!q.is_null());
    heap.free(q, discard);
    assert_eq!(heap.bytes_in_use(), 0);
    assert_eq!(heap.invalid_frees(), 0);
}

#[test]
fn realloc_grows_large_in_place_at_top() {
    let r = TestRegion::new(REGION_BYTES);
    let heap = r.create();
    let mut p = heap.malloc(1 << 20);
    fill(p, 1 << 20, 9);
    let first = p;
    let mut size = 1 << 20;
    for _ in 0..5 {
        size *= 2;
        p = heap.realloc(p, size, discard);
        assert_eq!(p, first, "a growing vector at the top should not move");
    }
    assert!(check(p, 1 << 20, 9));
    heap.free(p, discard);
}

#[test]
fn memalign_aligns() {
    let r = TestRegion::new(REGION_BYTES);
    let heap = r.create();
    let mut blocks = Vec::new();
    let mut align = 16;
    while align <= 2 << 20 {
        for &size in &[1usize, 17, align / 2, align, align + 1, 3 * align, 100_000] {
            let p = heap.memalign(align, size);
            assert!(!p.is_null(), "memalign({align}, {size})");
            assert_eq!(p.addr() % align, 0, "memalign({align}, {size})");
            assert!(heap.usable_size(p) >= size);
            fill(p, size, align.trailing_zeros() as u8);
            blocks.push((p, size, align.trailing_zeros() as u8));
        }
        align *= 2;
    }
    for (p, size, b) in blocks {
        assert!(check(p, size, b), "aligned block overwritten");
        heap.free(p, discard);
    }
    assert!(
        heap.memalign(48, 10).is_null(),
        "non-power-of-two alignment must fail"
    );
    assert_eq!(heap.bytes_in_use(), 0);
}

#[test]
fn invalid_frees_are_counted_not_fatal() {
    let r = TestRegion::new(REGION_BYTES);
    let heap = r.create();
    let a = heap.malloc(64);
    let big = heap.malloc(1 << 20);
    heap.free(a, discard);
    heap.free(a, discard); // double free
    heap.free(big.wrapping_add(PAGE_SIZE), discard); // inside a large run
    heap.free(big.wrapping_add(8), discard); // misaligned
    heap.free(r.base.wrapping_add(100), discard); // header
    heap.free(r.base.wrapping_add(r.len - 16), discard); // above top
    assert_eq!(heap.usable_size(a), 0);
    assert!(heap.realloc(a, 10, discard).is_null());
    let b = heap.malloc(128);
    heap.free(b.wrapping_add(16), discard); // not an object start
    heap.free(b.wrapping_add(128), discard); // the next object, never handed out
    assert_eq!(heap.invalid_frees(), 8);
    // The heap is intact: the freed object comes back once, not twice.
    let c = heap.malloc(64);
    let d = heap.malloc(64);
    assert_ne!(c, d);
    for p in [b, c, d, big] {
        heap.free(p, discard);
    }
    assert_eq!(heap.bytes_in_use(), 0);
    assert_eq!(heap.invalid_frees(), 8);
    assert!(heap.locks_free());
}

#[test]
fn out_of_space_returns_null() {
    let r = TestRegion::new(16 << 20);
    let heap = r.create();
    assert!(heap.malloc(64 << 20).is_null());
    assert!(heap.malloc(usize::MAX).is_null());
    assert!(heap.memalign(1 << 30, 10).is_null());
    let mut got = Vec::new();
    loop {
        let p = heap.malloc(1 << 20);
        if p.is_null() {
            break;
        }
        got.push(p);
    }
    assert!(got.len() >= 10, "only {} MiB fit in 16 MiB", got.len());
    for p in got {
        heap.free(p, discard);
    }
    assert!(
        !heap.malloc(1 << 20).is_null(),
        "freed space must be reusable"
    );
}

#[test]
fn root_and_stats() {
    let r = TestRegion::new(REGION_BYTES);
    let heap = r.create();
    assert!(heap.root().is_null());
    let p = heap.malloc(100);
    heap.set_root(p);
    assert_eq!(heap.root(), p);
    assert_eq!(heap.bytes_in_use(), 112);
    assert!(heap.top_bytes() > 0 && heap.top_bytes() < 4 << 20);
    let big = heap.malloc(1 << 20);
    assert_eq!(heap.bytes_in_use(), 112 + (1 << 20));
    heap.free(big, discard);
    heap.free(p, discard);
    assert_eq!(heap.bytes_in_use(), 0);
}

#[test]
fn reopen_continues_the_same_heap() {
    let r = TestRegion::new(REGION_BYTES);
    let heap = r.create();
    let mut rng = Rng::new(42);
    let mut live: Vec<(*mut u8, usize, u8)> = Vec::new();
    for i in 0..2000 {
        let size = draw_size(&mut rng);
        let p = heap.malloc(size);
        fill(p, size, i as u8);
        live.push((p, size, i as u8));
        if rng.below(3) == 0 {
            let (p, _, _) = live.swap_remove(rng.below(live.len() as u64) as usize);
            heap.free(p, discard);
        }
    }
    heap.set_root(live[0].0);
    let in_use = heap.bytes_in_use();
    // SAFETY: the same region at the same base, with no heap call in flight.
    let again = unsafe { Heap::open(r.base, r.len) }.expect("reopening the heap");
    // The thread caches are dropped on open (their objects stay allocated: a bounded leak).
    let leaked = again.bytes_in_use() - in_use;
    assert!(
        leaked < 1 << 20,
        "{leaked} bytes leaked from the thread caches"
    );
    assert_eq!(again.root(), live[0].0);
    for i in 0..2000 {
        let size = draw_size(&mut rng);
        let p = again.malloc(size);
        fill(p, size, i as u8);
        live.push((p, size, i as u8));
        let (p, size, b) = live.swap_remove(rng.below(live.len() as u64) as usize);
        assert!(check(p, size, b), "block lost across reopen");
        again.free(p, discard);
    }
    for (p, size, b) in live {
        assert!(check(p, size, b), "block lost across reopen");
        again.free(p, discard);
    }
    assert_eq!(
        again.bytes_in_use(),
        leaked,
        "only the dropped caches stay in use"
    );
    assert_eq!(again.invalid_frees(), 0);
}

#[test]
fn fork_hooks_give_the_child_a_working_heap() {
    let r = TestRegion::new(REGION_BYTES);
    let heap = r.create();
    let p = heap.malloc(1000);
    fill(p, 1000, 3);
    heap.prepare_fork();
    assert!(!heap.locks_free());
    // SAFETY: the child only calls the heap (which allocates nothing through libc or Rust)
    // and `_exit`s; it never returns into the test harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        heap.after_fork_child();
        let mut ok = heap.locks_free() && check(p, 1000, 3);
        let q = heap.malloc(5000);
        ok &= !q.is_null();
        heap.free(p, discard_in_child);
        heap.free(q, discard_in_child);
        ok &= heap.bytes_in_use() == 0;
        // SAFETY: ends the child without running the harness's atexit handlers.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    heap.after_fork_parent();
    assert!(heap.locks_free());
    let mut status = 0;
    // SAFETY: waits for the child forked above.
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(rc, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child status {status:#x}"
    );
    assert!(check(p, 1000, 3));
    heap.free(p, discard);
}

/// The child of a fork must not touch the (possibly locked) discard log.
fn discard_in_child(addr: *mut u8, len: usize) {
    // SAFETY: as in `discard`.
    unsafe { libc::madvise(addr.cast(), len, libc::MADV_DONTNEED) };
}

/// Four threads malloc, free, realloc and calloc at random, checking every block's bytes, and
/// pass a share of their blocks to the next thread to free (cross-arena frees).
#[test]
fn threads_stress() {
    const THREADS: usize = 4;
    const OPS: usize = if cfg!(debug_assertions) {
        30_000
    } else {
        300_000
    };
    let r = Arc::new(TestRegion::new(REGION_BYTES));
    let heap = r.create();
    type Block = (usize, usize, u8);
    let queues: Arc<Vec<Mutex<VecDeque<Block>>>> =
        Arc::new((0..THREADS).map(|_| Mutex::new(VecDeque::new())).collect());
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let queues = queues.clone();
            let _region = r.clone();
            std::thread::spawn(move || {
                let mut rng = Rng::new(0x1234_5678 + t as u64 * 7919);
                let mut live: Vec<Block> = Vec::new();
                let verify = |(p, size, b): Block| {
                    assert!(
                        check(p as *mut u8, size, b),
                        "thread {t}: block of {size} bytes overwritten"
                    );
                };
                for i in 0..OPS {
                    let tag = (i % 251) as u8 + 1;
                    match rng.below(10) {
                        0..=3 => {
                            let size = draw_size(&mut rng);
                            let p = heap.malloc(size);
                            assert!(!p.is_null());
                            fill(p, size, tag);
                            live.push((p.addr(), size, tag));
                        }
                        4 => {
                            let size = draw_size(&mut rng);
                            let p = heap.calloc(1, size);
                            assert!(check(p, size, 0), "thread {t}: calloc({size}) dirty");
                            fill(p, size, tag);
                            live.push((p.addr(), size, tag));
                        }
                        5..=6 if !live.is_empty() => {
                            let blk = live.swap_remove(rng.below(live.len() as u64) as usize);
                            verify(blk);
                            heap.free(blk.0 as *mut u8, discard);
                        }
                        7 if !live.is_empty() => {
                            let k = rng.below(live.len() as u64) as usize;
                            let (p, size, b) = live[k];
                            verify(live[k]);
                            let new_size = draw_size(&mut rng).max(1);
                            let q = heap.realloc(p as *mut u8, new_size, discard);
                            assert!(!q.is_null());
                            assert!(
                                check(q, size.min(new_size), b),
                                "thread {t}: realloc lost bytes"
                            );
                            fill(q, new_size, b);
                            live[k] = (q.addr(), new_size, b);
                        }
                        8 if !live.is_empty() => {
                            let blk = live.swap_remove(rng.below(live.len() as u64) as usize);
                            verify(blk);
                            queues[(t + 1) % THREADS]
                                .lock()
                                .expect("queue")
                                .push_back(blk);
                        }
                        _ => {
                            let got: Vec<Block> =
                                queues[t].lock().expect("queue").drain(..).collect();
                            for blk in got {
                                verify(blk);
                                heap.free(blk.0 as *mut u8, discard);
                            }
                        }
                    }
                    if live.len() > 2000 {
                        let blk = live.swap_remove(0);
                        heap.free(blk.0 as *mut u8, discard);
                    }
                }
                for blk in live {
                    verify(blk);
                    heap.free(blk.0 as *mut u8, discard);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("stress thread failed");
    }
    for q in queues.iter() {
        for blk in q.lock().expect("queue").drain(..) {
            heap.free(blk.0 as *mut u8, discard);
        }
    }
    assert_eq!(heap.bytes_in_use(), 0);
    assert_eq!(heap.invalid_frees(), 0);
    assert!(heap.locks_free());
    assert!(
        heap.top_bytes() < 512 << 20,
        "heap grew to {} bytes",
        heap.top_bytes()
    );
}

#[test]
fn is_small_tells_classes_from_runs() {
    let r = TestRegion::new(REGION_BYTES);
    let heap = r.create();
    let a = heap.malloc(SMALL_MAX_BYTES);
    let b = heap.malloc(SMALL_MAX_BYTES + 1);
    assert!(heap.is_small(a));
    assert!(!heap.is_small(b));
    assert_eq!(heap.usable_size(b) % PAGE_SIZE, 0);
    heap.free(a, discard);
    heap.free(b, discard);
}

/// More live threads than arenas: the extra ones share arenas with exclusive owners (locked
/// path next to lock-free caches), and dead threads' claims are taken over afterwards.
#[test]
fn more_threads_than_arenas() {
    const THREADS: usize = ARENAS_MAX + 16;
    let r = Arc::new(TestRegion::new(REGION_BYTES));
    let heap = r.create();
    for round in 0..2 {
        let barrier = Arc::new(std::sync::Barrier::new(THREADS));
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let barrier = barrier.clone();
                let _region = r.clone();
                std::thread::spawn(move || {
                    let mut rng = Rng::new(77 + t as u64 + round * 1000);
                    let mut live = Vec::new();
                    // Everyone holds an arena (claimed or shared) before anyone frees.
                    let first = heap.malloc(24);
                    barrier.wait();
                    for i in 0..2000 {
                        let size = rng.below(600) as usize;
                        let p = heap.malloc(size);
                        fill(p, size, i as u8);
                        live.push((p, size, i as u8));
                        if rng.below(2) == 0 {
                            let (p, size, b) =
                                live.swap_remove(rng.below(live.len() as u64) as usize);
                            assert!(check(p, size, b), "thread {t}: block overwritten");
                            heap.free(p, discard);
                        }
                    }
                    for (p, size, b) in live {
                        assert!(check(p, size, b), "thread {t}: block overwritten");
                        heap.free(p, discard);
                    }
                    heap.free(first, discard);
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread failed");
        }
    }
    assert_eq!(heap.bytes_in_use(), 0);
    assert_eq!(heap.invalid_frees(), 0);
}

/// A heap of 4 TiB: descriptors of runs far above 256 GiB (where a descriptor's byte offset /
/// 64 no longer fits a `u32`) route frees and lookups right, a free run of terabytes is reused,
/// and the metadata touched stays a few pages however large the region is.
#[test]
fn four_tib_region_works_and_touches_little() {
    const TIB: usize = 1 << 40;
    let r = TestRegion::new(4 * TIB);
    let heap = r.create();
    // Fresh runs are not touched by calloc: only the heap's metadata is written.
    let a = heap.calloc(1, TIB);
    let b = heap.calloc(2, TIB);
    assert!(!a.is_null() && !b.is_null(), "3 TiB fit in a 4 TiB heap");
    assert_eq!(heap.usable_size(b), 2 * TIB);
    // Slabs and their descriptor pages now come from above 3 TiB.
    let mut small = Vec::new();
    for i in 0..10_000usize {
        let p = heap.malloc(16 + i % 2000);
        assert!(!p.is_null());
        assert!(p.addr() - r.base.addr() > 3 * TIB);
        fill(p, 16, i as u8);
        small.push(p);
    }
    let large: Vec<*mut u8> = (0..64).map(|_| heap.malloc(1 << 20)).collect();
    for &p in &large {
        assert!(!p.is_null());
        fill(p, 1 << 20, 0x5a);
        assert_eq!(heap.usable_size(p), 1 << 20);
    }
    for (i, &p) in small.iter().enumerate() {
        assert!(heap.is_small(p));
        assert!(check(p, 16, i as u8), "object {i} changed");
    }
    for p in small.drain(..).chain(large) {
        heap.free(p, discard);
    }
    heap.free(a, discard);
    heap.free(b, discard);
    assert_eq!(heap.invalid_frees(), 0);
    assert_eq!(heap.bytes_in_use(), 0);
    // The two freed runs merged: 3 TiB fit again without moving top.
    let top = heap.top_bytes();
    let c = heap.malloc(3 * TIB);
    assert!(!c.is_null(), "the freed 3 TiB are reused");
    assert_eq!(heap.top_bytes(), top);
    heap.free(c, discard);
    // Header, page map (4 GiB reserved) and span directory (64 MiB reserved): a few pages.
    let meta = heap.data_start_page as usize * PAGE_SIZE;
    assert!(meta > 4 << 30, "the page map of 4 TiB is 4 GiB");
    let touched = resident_pages(r.base, meta);
    assert!(touched <= 64, "{touched} metadata pages touched");
    assert!(heap.locks_free());
}

/// The largest region the allocator names with 32-bit pages is accepted, one page more is not.
#[test]
fn region_size_limit() {
    let r = TestRegion::new(REGION_BYTES_MAX + PAGE_SIZE);
    // SAFETY: the region is mapped, fresh and owned by this test.
    unsafe {
        assert_eq!(
            Heap::create(r.base, REGION_BYTES_MAX + PAGE_SIZE).err(),
            Some(HeapError::RegionTooLarge {
                len: REGION_BYTES_MAX + PAGE_SIZE
            })
        );
        let heap = Heap::create(r.base, REGION_BYTES_MAX).expect("the largest region");
        // A new heap has written its header and nothing else; the range also covers the
        // page map's slots of the pages below top (the metadata's own: 16 MiB of 16 GiB).
        let [meta, data] = Heap::written_ranges(r.base).expect("a heap");
        assert_eq!(meta.start, 0);
        assert!(meta.end <= 17 << 20, "a fresh heap's page map: {meta:?}");
        assert!(
            data.start > 16 << 30,
            "the directory follows the 16 GiB page map"
        );
        assert_eq!(data.end as u64, heap.top_bytes());
        let p = heap.malloc(REGION_BYTES_MAX / 2);
        assert!(!p.is_null());
        let q = heap.malloc(100);
        assert!(heap.is_small(q));
        // The page map's slots of every page below top may have been written.
        let [meta, data] = Heap::written_ranges(r.base).expect("a heap");
        assert!(meta.end as u64 >= heap.top_bytes() / PAGE_SIZE as u64 * 4);
        assert_eq!(data.end as u64, heap.top_bytes());
        heap.free(q, discard);
        heap.free(p, discard);
        assert_eq!(Heap::written_ranges(r.base.add(PAGE_SIZE)), None);
    }
}

/// A thread frees objects another thread allocated: they go into its own cache (its next
/// mallocs reuse them) and back to the owner's slabs in batches, and frees of objects sitting
/// in a cache are refused whichever thread tries.
#[test]
fn remote_frees_go_back_to_their_owner_in_batches() {
    const OBJECTS: usize = 2000;
    const SIZE: usize = 64;
    let r = Arc::new(TestRegion::new(REGION_BYTES));
    let heap = r.create();
    let (tx, rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<usize>();
    let owner = std::thread::spawn(move || {
        let a = Heap::exclusive_arena();
        let ps: Vec<usize> = (0..OBJECTS)
            .map(|i| {
                let p = heap.malloc(SIZE);
                fill(p, SIZE, i as u8);
                p.addr()
            })
            .collect();
        tx.send((a, ps)).expect("sending the objects");
        // Frees of objects another thread's cache holds are double frees.
        let cached = done_rx.recv().expect("waiting for the freeing thread");
        heap.free(std::ptr::with_exposed_provenance_mut(cached), discard);
    });
    let (owner_arena, ps) = rx.recv().expect("receiving the objects");
    let me = Heap::exclusive_arena();
    for (i, &p) in ps.iter().enumerate() {
        let p = heap.base().with_addr(p);
        assert!(check(p, SIZE, i as u8), "object {i} overwritten");
        heap.free(p, discard);
    }
    assert_eq!(heap.invalid_frees(), 0);
    assert_eq!(heap.bytes_in_use(), 0);
    let bound = u64::from(arena::TCACHE_COUNT_MAX) * SIZE as u64;
    if let (Some(a), Some(m)) = (owner_arena, me) {
        if a != m {
            let (counted, _) = heap.arena_bytes(a);
            let (_, cached) = heap.arena_bytes(m);
            assert!(
                counted <= bound,
                "{counted} bytes still counted by the owner"
            );
            assert_eq!(
                counted, cached,
                "the owner counts exactly what my cache holds"
            );
            assert!(
                cached > 0,
                "the remote frees went through this thread's cache"
            );
        }
    }
    // The next malloc reuses a freed object; freeing it twice is refused.
    let q = heap.malloc(SIZE);
    assert!(
        ps.contains(&q.addr()),
        "a malloc reuses a remotely freed object"
    );
    heap.free(q, discard);
    heap.free(q, discard);
    assert_eq!(heap.invalid_frees(), 1);
    done_tx.send(q.addr()).expect("telling the owner");
    owner.join().expect("owner thread failed");
    assert_eq!(
        heap.invalid_frees(),
        2,
        "a free of an object in another cache is refused"
    );
    assert_eq!(heap.bytes_in_use(), 0);
}

/// A thread that exits gives its caches back: its objects return to their slabs, the slabs
/// to the page heap, and its arena holds nothing.
#[test]
fn a_dead_threads_cache_is_given_back() {
    // The heap must outlive every thread exit that may flush it: its region is never unmapped.
    let r = Box::leak(Box::new(TestRegion::new(REGION_BYTES)));
    let heap = r.create();
    assert!(heap.flush_caches_at_thread_exit(discard));
    let worker = std::thread::spawn(move || {
        let mut rng = Rng::new(9);
        let mut live = Vec::new();
        for i in 0..5000 {
            let size = rng.below(1024) as usize + 1;
            let p = heap.malloc(size);
            fill(p, size, i as u8);
            live.push((p, size, i as u8));
            if live.len() > 200 {
                let (p, size, b) = live.swap_remove(rng.below(live.len() as u64) as usize);
                assert!(check(p, size, b), "block overwritten");
                heap.free(p, discard);
            }
        }
        for (p, size, b) in live {
            assert!(check(p, size, b), "block overwritten");
            heap.free(p, discard);
        }
        let a = Heap::exclusive_arena();
        if let Some(a) = a {
            assert!(
                heap.arena_bytes(a).1 > 0,
                "the cache holds objects before exit"
            );
        }
        a
    });
    let a = worker.join().expect("worker failed");
    assert_eq!(heap.bytes_in_use(), 0);
    assert_eq!(heap.invalid_frees(), 0);
    if let Some(a) = a {
        assert_eq!(
            heap.arena_bytes(a),
            (0, 0),
            "the dead thread's cache is empty"
        );
        assert!(
            heap.arena_holds_no_slab(a),
            "the dead thread's slabs are given back"
        );
    }
    // The memory is reusable by anyone: one more thread allocates and frees.
    std::thread::spawn(move || {
        let p = heap.malloc(100);
        fill(p, 100, 1);
        heap.free(p, discard);
    })
    .join()
    .expect("second worker failed");
}

/// With the budget following the live large allocations, a loop that replaces big blocks one
/// at a time reuses the freed ones (nothing given back, nothing to fault in again), and what
/// is kept stays within half the live bytes and shrinks with them.
#[test]
fn retained_large_blocks_follow_the_live_ones() {
    const BLOCKS: usize = 20;
    const BLOCK: usize = 4 << 20;
    let r = TestRegion::new(REGION_BYTES);
    let heap = r.create();
    heap.set_retain_bytes(1 << 20);
    heap.set_retain_max_bytes(64 << 20);
    let mut live: Vec<*mut u8> = (0..BLOCKS)
        .map(|i| {
            let p = heap.malloc(BLOCK);
            fill(p, BLOCK, i as u8);
            p
        })
        .collect();
    let before = discards_in(heap).len();
    let mut rng = Rng::new(13);
    for i in 0..200 {
        let k = rng.below(BLOCKS as u64) as usize;
        heap.free(live[k], discard);
        let p = heap.malloc(BLOCK);
        assert_eq!(
            resident_pages(p, BLOCK),
            BLOCK / PAGE_SIZE,
            "step {i}: the new block is a retained one, all resident"
        );
        fill(p, BLOCK, i as u8);
        live[k] = p;
        let bound = heap.bytes_in_use() / RETAIN_LIVE_DIVISOR;
        assert!(
            heap.retained_bytes() <= bound,
            "step {i}: kept more than half the live bytes"
        );
    }
    assert_eq!(
        discards_in(heap).len(),
        before,
        "a freed block was given back although it was reused"
    );
    for p in live.drain(..) {
        heap.free(p, discard);
    }
    assert!(
        heap.retained_bytes() <= 1 << 20,
        "with nothing live, only the fixed budget is kept: {} bytes",
        heap.retained_bytes()
    );
    assert_eq!(heap.bytes_in_use(), 0);
}

// ----- served mappings (KIND_MAPPED) -----

fn rw() -> u8 {
    PROT_RW
}

#[test]
fn mappings_are_zeroed_page_runs_that_free_refuses() {
    let r = TestRegion::new(REGION_BYTES);
    let h = r.create();
    let m = h
        .map_pages(10 * PAGE_SIZE + 1, rw(), discard)
        .expect("room");
    assert_eq!(m.addr() % PAGE_SIZE, 0);
    // SAFETY: the mapping is 11 pages of this test's region.
    let bytes = unsafe { std::slice::from_raw_parts_mut(m, 11 * PAGE_SIZE) };
    assert!(bytes.iter().all(|&b| b == 0));
    bytes.fill(0xab);
    assert!(h.is_mapped(m.addr(), 11 * PAGE_SIZE));
    assert!(
        h.is_mapped(m.addr() + 5 * PAGE_SIZE, PAGE_SIZE),
        "any page is found"
    );
    assert!(!h.is_mapped(m.addr(), 12 * PAGE_SIZE));
    // free, realloc and malloc_usable_size refuse a mapping, even at its start.
    let before = h.invalid_frees();
    h.free(m, discard);
    assert_eq!(h.invalid_frees(), before + 1);
    assert!(h.realloc(m, 100, discard).is_null());
    assert_eq!(h.usable_size(m), 0);
    assert!(
        h.is_mapped(m.addr(), 11 * PAGE_SIZE),
        "the refused free changed nothing"
    );
    // And the mapping calls refuse a malloc block.
    let block = h.malloc(1 << 20);
    assert!(!h.is_mapped(block.addr(), PAGE_SIZE));
    assert!(h.unmap_begin(block.addr(), PAGE_SIZE).is_err());
    assert!(h.protect_pages(block.addr(), PAGE_SIZE, 0).is_err());
    h.free(block, discard);
    assert!(h.locks_free());
}

#[test]
fn partial_unmaps_split_and_pages_come_back_fresh() {
    let r = TestRegion::new(REGION_BYTES);
    let h = r.create();
    let pages = 64;
    let m = h.map_pages(pages * PAGE_SIZE, rw(), discard).expect("room");
    let at = |p: usize| m.addr() + p * PAGE_SIZE;
    // SAFETY: the mapping's pages belong to this test.
    unsafe { std::ptr::write_bytes(m, 0x5a, pages * PAGE_SIZE) };
    // Unmap the middle: two pieces remain.
    let u = h.unmap_begin(at(16), 16 * PAGE_SIZE).expect("mapped");
    assert_eq!(
        (u.addr, u.len, u.protected),
        (at(16), 16 * PAGE_SIZE, false)
    );
    assert!(!h.is_mapped(at(16), PAGE_SIZE), "limbo is not mapped");
    assert!(h.unmap_begin(at(16), PAGE_SIZE).is_err(), "no second unmap");
    discard(u.addr as *mut u8, u.len);
    h.unmap_finish(u);
    assert!(h.is_mapped(at(0), 16 * PAGE_SIZE));
    assert!(h.is_mapped(at(32), 32 * PAGE_SIZE));
    assert!(!h.is_mapped(at(0), 17 * PAGE_SIZE));
    // The hole is reused, fresh (no discard needed), by a mapping that fits it.
    let n = h.map_pages(16 * PAGE_SIZE, rw(), discard).expect("room");
    assert_eq!(n.addr(), at(16), "the hole is taken");
    // SAFETY: the new mapping's pages belong to this test.
    assert!(unsafe { std::slice::from_raw_parts(n, 16 * PAGE_SIZE) }
        .iter()
        .all(|&b| b == 0));
    // Unmapping across the two pieces and the new mapping works as one range.
    let u = h.unmap_begin(at(8), 40 * PAGE_SIZE).expect("all mapped");
    discard(u.addr as *mut u8, u.len);
    h.unmap_finish(u);
    assert!(h.is_mapped(at(0), 8 * PAGE_SIZE) && h.is_mapped(at(48), 16 * PAGE_SIZE));
    assert!(!h.overlaps_mapping(at(8), 40 * PAGE_SIZE));
    for (a, l) in [(at(0), 8), (at(48), 16)] {
        let u = h.unmap_begin(a, l * PAGE_SIZE).expect("mapped");
        h.unmap_finish(u);
    }
    assert!(!h.overlaps_mapping(m.addr(), pages * PAGE_SIZE));
    // Everything merged back: one mapping of all of it fits where the first one was.
    let again = h.map_pages(pages * PAGE_SIZE, rw(), discard).expect("room");
    assert_eq!(again, m);
    assert!(h.locks_free());
}

#[test]
fn protections_split_pieces_and_mremap_needs_one() {
    let r = TestRegion::new(REGION_BYTES);
    let h = r.create();
    let m = h.map_pages(32 * PAGE_SIZE, rw(), discard).expect("room");
    let at = |p: usize| m.addr() + p * PAGE_SIZE;
    assert_eq!(h.mapping_prot(at(0), 32 * PAGE_SIZE), Ok(PROT_RW));
    h.protect_pages(at(4), 4 * PAGE_SIZE, 0).expect("mapped");
    assert_eq!(h.mapping_prot(at(4), 4 * PAGE_SIZE), Ok(0));
    assert_eq!(h.mapping_prot(at(0), 4 * PAGE_SIZE), Ok(PROT_RW));
    assert!(matches!(
        h.mapping_prot(at(0), 32 * PAGE_SIZE),
        Err(MapError::Mixed { .. })
    ));
    let mut seen = Vec::new();
    h.for_each_mapping(|a, l, p| seen.push((a, l / PAGE_SIZE, p)));
    assert_eq!(
        seen,
        vec![(at(0), 4, PROT_RW), (at(4), 4, 0), (at(8), 24, PROT_RW)]
    );
    // An unmap over the guard says the protection must be put back first.
    let u = h.unmap_begin(at(2), 4 * PAGE_SIZE).expect("mapped");
    assert!(u.protected);
    h.unmap_finish(u);
    let u = h.unmap_begin(at(8), 8 * PAGE_SIZE).expect("mapped");
    assert!(!u.protected);
    h.unmap_finish(u);
    assert!(h.locks_free());
}

#[test]
fn growth_in_place_takes_the_free_run_or_the_top() {
    let r = TestRegion::new(REGION_BYTES);
    let h = r.create();
    let a = h.map_pages(8 * PAGE_SIZE, rw(), discard).expect("room");
    // At the top: grows.
    assert_eq!(
        h.grow_in_place(a.addr(), 8 * PAGE_SIZE, 16 * PAGE_SIZE, discard),
        Ok(PROT_RW)
    );
    assert!(h.is_mapped(a.addr(), 16 * PAGE_SIZE));
    // A neighbour after it: cannot.
    let b = h.map_pages(8 * PAGE_SIZE, rw(), discard).expect("room");
    assert_eq!(b.addr(), a.addr() + 16 * PAGE_SIZE);
    assert!(h
        .grow_in_place(a.addr(), 16 * PAGE_SIZE, 17 * PAGE_SIZE, discard)
        .is_err());
    // A prefix of a mapping cannot grow over the rest of it.
    assert!(h
        .grow_in_place(a.addr(), 4 * PAGE_SIZE, 8 * PAGE_SIZE, discard)
        .is_err());
    // Once the neighbour is gone, its free run is taken (a part of it).
    let u = h.unmap_begin(b.addr(), 8 * PAGE_SIZE).expect("mapped");
    h.unmap_finish(u);
    assert_eq!(
        h.grow_in_place(a.addr(), 16 * PAGE_SIZE, 20 * PAGE_SIZE, discard),
        Ok(PROT_RW)
    );
    assert!(h.is_mapped(a.addr(), 20 * PAGE_SIZE));
    assert!(!h.is_mapped(a.addr(), 21 * PAGE_SIZE));
    assert!(h.locks_free());
}

#[test]
fn a_full_region_refuses_a_mapping() {
    let r = TestRegion::new(REGION_BYTES);
    let h = r.create();
    assert!(h.map_pages(REGION_BYTES, rw(), discard).is_none());
    let big = h
        .map_pages(REGION_BYTES / 2, rw(), discard)
        .expect("half fits");
    assert!(h.map_pages(REGION_BYTES / 2, rw(), discard).is_none());
    let u = h.unmap_begin(big.addr(), REGION_BYTES / 2).expect("mapped");
    h.unmap_finish(u);
    assert!(h.map_pages(REGION_BYTES / 2, rw(), discard).is_some());
    assert!(h.locks_free());
}
