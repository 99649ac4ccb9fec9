//! The test programs in `tests/c/` under the shim with a cache about a tenth of their heap:
//! output byte for byte equal to the native run, exit 0, peak RSS within the cache plus the
//! stated overhead, and the stats proving pages really were evicted and fetched back.

use lego_tests::{
    assert_rss_within_cache, assert_same_output, heavy, program, Outcome, Run, ShimSetup, Stats,
    TempDir, MIB,
};

/// Runs `name ARGS` natively and under the shim with a `cache_mib` cache, and checks
/// everything an oversubscribed run must satisfy. Returns the shim run and its stats.
fn oversubscribed(
    name: &str,
    args: &[&str],
    cache_mib: u64,
    check_stats: bool,
) -> (Outcome, Option<Stats>) {
    let _serial = heavy();
    let bin = program(name);
    let native = Run::new(&bin).args(args).measure_rss().run();
    native.assert_success();
    let setup = ShimSetup::new(name, cache_mib);
    let mut run = setup.apply(Run::new(&bin).args(args));
    if !check_stats {
        // Without a stats file: in a forking program parent and child would both write it.
        run = run.env("LEGO_STATS", "0");
    }
    let shimmed = run.run();
    assert_same_output(&native, &shimmed);
    if check_stats {
        assert_rss_within_cache(&shimmed, cache_mib, Some(&native));
    }
    let stats = check_stats.then(|| {
        let stats = setup.stats();
        stats.assert_oversubscribed(cache_mib);
        eprintln!(
            "{}: evicted {} fetched {} zero-filled {} written back {} peak resident {} pages, heap top {} bytes",
            shimmed.what,
            stats.pages_evicted,
            stats.pages_fetched,
            stats.pages_zero_filled,
            stats.pages_written_back,
            stats.peak_resident_pages,
            stats.heap_top_bytes
        );
        stats
    });
    (shimmed, stats)
}

/// 512 MiB of mixed small/medium/large blocks, sequential and random sweeps, frees,
/// reallocs: all in a 48 MiB cache.
#[test]
fn single_threaded_mixed_heap() {
    let (_, stats) = oversubscribed("heap_mixed", &["512", "1"], 48, true);
    let stats = stats.expect("stats were read");
    assert!(
        stats.heap_top_bytes >= 8 * 48 * MIB,
        "heap top {} bytes is not ~10x the 48 MiB cache:\n{}",
        stats.heap_top_bytes,
        stats.raw
    );
}

/// Four threads with 110 MiB each and a ring of producer/consumer queues whose messages are
/// freed by the thread that did not allocate them.
#[test]
fn multi_threaded_with_cross_thread_frees() {
    oversubscribed("heap_threads", &["110", "20000"], 40, true);
}

/// calloc over dirty freed memory, realloc prefixes, aligned allocations, overflow errors,
/// errno kept by free.
#[test]
fn allocation_api_corners() {
    oversubscribed("alloc_api", &["192"], 18, true);
}

/// fork with most of the heap evicted: the child sees the pre-fork contents while the
/// parent rewrites them, and both can allocate and free afterwards. The fork is served (the
/// tests run as root: the kernel reports forks), so nothing is paged in and the peak RSS is
/// held to the cache.
#[test]
fn fork_with_evicted_pages() {
    let (_, stats) = oversubscribed("fork_evicted", &["256"], 24, true);
    let stats = stats.expect("stats were read");
    assert_eq!(stats.number("fork_page_ins"), Some(0), "{}", stats.raw);
    assert_eq!(stats.number("forks_served"), Some(1), "{}", stats.raw);
}

/// The same fork without `CAP_SYS_PTRACE` (dropped with `setpriv`): the kernel refuses fork
/// events, so lego brings every evicted page back before the fork and the child's copy of the
/// region is ordinary memory; the output is the same.
#[test]
fn fork_without_fork_events_pages_in() {
    let _serial = heavy();
    let bin = program("fork_evicted");
    let native = Run::new(&bin).args(["256"]).run();
    let setup = ShimSetup::new("fork-pagein", 24);
    let shimmed = setup
        .apply(Run::new(lego_tests::which("setpriv")))
        .args([
            "--bounding-set=-sys_ptrace".as_ref(),
            "--inh-caps=-sys_ptrace".as_ref(),
            "--".as_ref(),
            bin.as_os_str(),
            "256".as_ref(),
        ])
        .run();
    assert_same_output(&native, &shimmed);
    let stats = setup.stats();
    assert!(
        stats.number("fork_page_ins").unwrap_or(0) > 0,
        "without CAP_SYS_PTRACE the fork must page the heap in:\n{}",
        stats.raw
    );
    assert_eq!(stats.number("forks_served"), Some(0), "{}", stats.raw);
}

/// Served forks (issue 14): twelve forks of a heap six times the cache, each child checking
/// the heap of its fork while its parent rewrites a third of it, then writing, freeing and
/// reallocating on its own side; both evict meanwhile. Output equal to the native run; no page
/// brought back for a fork; the parent within its cache; each child within its own cache
/// (its peak RSS from `getrusage(RUSAGE_CHILDREN)`); children that exec or are killed let the
/// store's frozen copies go (no generation left at exit).
#[test]
fn forks_leave_evicted_pages_evicted() {
    let _serial = heavy();
    let bin = program("fork_both_evict");
    let cache_mib = 16;
    for mode in ["wait", "mixed"] {
        let args = ["96", "12", mode];
        let native = Run::new(&bin).args(args).measure_rss().run();
        native.assert_success();
        let setup = ShimSetup::new(&format!("fork-{mode}"), cache_mib);
        let shimmed = setup.apply(Run::new(&bin).args(args)).run();
        assert_same_output(&native, &shimmed);
        assert!(shimmed.stdout.contains("all forks ok"), "{shimmed}");
        assert_rss_within_cache(&shimmed, cache_mib, Some(&native));
        let children_kib: u64 = shimmed
            .stderr
            .lines()
            .find_map(|l| l.strip_prefix("children_maxrss_kib="))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no children_maxrss_kib line:\n{shimmed}"));
        let limit = lego_tests::rss_limit_kib(cache_mib);
        assert!(
            children_kib <= limit,
            "{mode}: a child's peak RSS {children_kib} KiB exceeds its cache {cache_mib} MiB plus \
             the overhead ({limit} KiB): it was paged in\n{shimmed}"
        );
        let stats = setup.stats();
        stats.assert_oversubscribed(cache_mib);
        assert_eq!(
            stats.number("fork_page_ins"),
            Some(0),
            "{mode}: {}",
            stats.raw
        );
        assert_eq!(
            stats.number("forks_served"),
            Some(12),
            "{mode}: {}",
            stats.raw
        );
        assert_eq!(
            stats.number("fork_generations_live"),
            Some(0),
            "{mode}: every child is gone, so no copy may stay frozen for one: {}",
            stats.raw
        );
        eprintln!(
            "{mode}: parent peak RSS {} KiB, children's {children_kib} KiB, evicted {} fetched {}",
            shimmed.rss_kib(),
            stats.pages_evicted,
            stats.pages_fetched
        );
    }
}

/// read(2) into and write(2) from evicted buffers: the kernel's own accesses fault.
#[test]
fn syscalls_on_evicted_buffers() {
    let dir = TempDir::new("syscall-files");
    let dir_arg = dir.path().to_string_lossy().into_owned();
    oversubscribed("syscall_buffers", &[&dir_arg, "256"], 24, true);
}

/// C++: four std::threads building unordered_maps, maps and churning strings (~330 MiB).
#[test]
fn cpp_containers_multi_threaded() {
    oversubscribed("cpp_maps", &["18000"], 32, true);
}

/// Four threads writing their own words of the same pages while the evictor moves those
/// pages out: no write may be lost, no page served stale or as zeros.
#[test]
fn concurrent_writers_on_pages_being_evicted() {
    oversubscribed("pager_stress", &["160", "4", "60000"], 16, true);
}

/// The runtime's own allocations must not live in the region it pages, even in a run that
/// barely allocates: checked from the stats JSON.
#[test]
fn internal_heap_is_outside_the_managed_region() {
    let setup = ShimSetup::new("disjoint", 64);
    let out = setup.apply(Run::new(program("hello"))).run();
    out.assert_success();
    assert!(out.stdout.starts_with("main ran\n"), "{out}");
    let stats = setup.stats();
    stats.assert_internal_heap_disjoint();
}
