//! Unmodified real programs under the shim with a heap about ten times the cache:
//! `python3` (with `PYTHONMALLOC=malloc`, so every object is in the malloc heap) and
//! `sqlite3 :memory:` (every database page is in the malloc heap). Output must equal the
//! native run's, peak RSS must stay within the cache plus the stated overhead, and the
//! stats must show the heap really grew to ~10x the cache.

use lego_tests::{
    assert_rss_within_cache, assert_same_output, heavy, python3, real_file, which, Outcome, Run,
    ShimSetup, MIB,
};

/// Rows of the sqlite database: about 340 MiB of heap natively.
const SQLITE_ROWS: u64 = 160_000;

/// Scale of the Python structure: about 220 MiB of heap natively.
const PYTHON_SCALE: u64 = 1_200_000;

fn check_real(native: &Outcome, shimmed: &Outcome, setup: &ShimSetup) {
    assert_same_output(native, shimmed);
    assert_rss_within_cache(shimmed, setup.cache_mib, Some(native));
    let stats = setup.stats();
    stats.assert_oversubscribed(setup.cache_mib);
    assert!(
        stats.heap_top_bytes >= 8 * setup.cache_mib * MIB,
        "{}: heap_top_bytes {} is less than 8x the {} MiB cache, so the test did not \
         oversubscribe the cache ~10x:\n{}",
        shimmed.what,
        stats.heap_top_bytes,
        setup.cache_mib,
        stats.raw
    );
    eprintln!(
        "{}: heap top {} MiB, evicted {} fetched {} pages",
        shimmed.what,
        stats.heap_top_bytes / MIB,
        stats.pages_evicted,
        stats.pages_fetched
    );
}

#[test]
fn python_builds_a_structure_ten_times_the_cache() {
    let _serial = heavy();
    let script = real_file("structure.py");
    let scale = PYTHON_SCALE.to_string();
    let python = python3();
    let make = || {
        Run::new(&python)
            .args([script.as_os_str(), scale.as_ref()])
            .env("PYTHONMALLOC", "malloc")
            .env("PYTHONHASHSEED", "0")
            .env("PYTHONDONTWRITEBYTECODE", "1")
    };
    let native = make().measure_rss().run();
    let setup = ShimSetup::new("python", 20);
    let shimmed = setup.apply(make()).run();
    check_real(&native, &shimmed, &setup);
}

#[test]
fn sqlite_in_memory_database_ten_times_the_cache() {
    let _serial = heavy();
    let sql = std::fs::read_to_string(real_file("bigdb.sql"))
        .expect("tests/real/bigdb.sql is readable")
        .replace("__ROWS__", &SQLITE_ROWS.to_string());
    let sqlite = which("sqlite3");
    let make = || Run::new(&sqlite).args([":memory:"]).stdin(sql.clone());
    let native = make().measure_rss().run();
    assert!(
        native.stdout.contains("\nok\n"),
        "integrity_check did not say ok:\n{native}"
    );
    let setup = ShimSetup::new("sqlite", 32);
    let shimmed = setup.apply(make()).run();
    check_real(&native, &shimmed, &setup);
}
