//! Anonymous mappings served by lego (`LEGO_MMAP=1`): programs that map, grow, unmap,
//! guard, drop and protect anonymous memory, with a cache far smaller than their mappings,
//! print exactly what they print natively; the statistics show that the mappings' pages were
//! really evicted and fetched back; a JIT's page flips between writable and executable and
//! keeps its code across evictions.

use lego_tests::{
    assert_rss_within_cache, assert_same_output, heavy, program, Run, ShimSetup, Stats,
};

/// The cache of every run here, in MiB (the smallest lego accepts).
const CACHE_MIB: u64 = 16;

/// Runs `name ARGS` natively and under lego with `LEGO_MMAP=1` plus `env`, checks the output
/// byte for byte, exit 0, the resident peak and peak RSS within the cache, and returns the
/// stats.
fn served(name: &str, args: &[&str], env: &[(&str, &str)]) -> Stats {
    let _serial = heavy();
    let bin = program(name);
    let native = Run::new(&bin).args(args).measure_rss().run();
    native.assert_success();
    let setup = ShimSetup::new(name, CACHE_MIB);
    let mut run = setup.apply(Run::new(&bin).args(args)).env("LEGO_MMAP", "1");
    for (k, v) in env {
        run = run.env(k, v);
    }
    let shimmed = run.run();
    assert_same_output(&native, &shimmed);
    assert_rss_within_cache(&shimmed, CACHE_MIB, Some(&native));
    let stats = setup.stats();
    stats.assert_oversubscribed(CACHE_MIB);
    let n = |k: &str| {
        stats
            .number(k)
            .unwrap_or_else(|| panic!("no {k} in the stats:\n{}", stats.raw))
    };
    assert_eq!(n("pages_poisoned"), 0, "{}", stats.raw);
    eprintln!(
        "{name}: {} mappings served ({} bytes), {} of their pages evicted; {} pages evicted, {} fetched, peak resident {} pages, peak RSS {:?} KiB (native {:?})",
        n("mappings_served"),
        n("mapped_bytes"),
        n("mapped_pages_evicted"),
        stats.pages_evicted,
        stats.pages_fetched,
        stats.peak_resident_pages,
        shimmed.peak_rss_kib,
        native.peak_rss_kib
    );
    stats
}

/// 160 MiB of mappings (then more) in a 16 MiB cache: growth in place and by a move, partial
/// unmaps, PROT_NONE guards and a read-only range (faults reported the same), an mremap the
/// kernel refuses (EFAULT both ways), MADV_DONTNEED and MADV_FREE, MAP_FIXED over its own
/// mapping, MREMAP_FIXED, and 600 mappings of random sizes mapped and unmapped.
#[test]
fn mapping_calls_match_the_kernel_under_a_small_cache() {
    let stats = served("mmap_ops", &["32"], &[]);
    let n = |k: &str| stats.number(k).expect("key");
    assert!(
        n("mappings_served") >= 6,
        "the program's mappings were not served:\n{}",
        stats.raw
    );
    assert!(
        n("mapped_bytes") >= 160 << 20,
        "served fewer bytes than the program maps:\n{}",
        stats.raw
    );
    // The mappings are ten times the cache: most evictions are of their pages.
    assert!(
        n("mapped_pages_evicted") * 2 > stats.pages_evicted,
        "the mappings' pages were not the ones paged:\n{}",
        stats.raw
    );
}

/// With `LEGO_MMAP` unset the same program runs on ordinary mappings: nothing is served.
#[test]
fn mappings_stay_ordinary_by_default() {
    let _serial = heavy();
    let bin = program("mmap_ops");
    let native = Run::new(&bin).args(["8"]).run();
    let setup = ShimSetup::new("mmap-off", CACHE_MIB);
    let shimmed = setup.apply(Run::new(&bin).args(["8"])).run();
    assert_same_output(&native, &shimmed);
    let stats = setup.stats();
    assert_eq!(stats.number("mappings_served"), Some(0), "{}", stats.raw);
}

/// A JIT page (served: `LEGO_MMAP_MIN=4K`) flipped 10 000 times between read-write and
/// read-execute, patched while writable and called while executable; every thousand flips
/// a 48 MiB sweep pushes it out of the 16 MiB cache while it is writable, and an always
/// executable page (pinned) is called after each sweep.
#[test]
fn jit_page_flips_between_writable_and_executable() {
    let stats = served("jit", &["10000", "48"], &[("LEGO_MMAP_MIN", "4K")]);
    let n = |k: &str| stats.number(k).expect("key");
    assert_eq!(n("mappings_served"), 2, "{}", stats.raw);
    assert!(
        n("mapped_pages_evicted") >= 1,
        "the code page was never evicted, so its coming back was not tested:\n{}",
        stats.raw
    );
}
