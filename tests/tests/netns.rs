//! The memcached pool across a network that breaks: three "hosts", each a network namespace
//! with its own memcached behind a veth link ([`lego_tests::netns`]), a program under lego in
//! this namespace keeping two copies of every page (`LEGO_REPLICAS=2`), and one host's link
//! cut while the program pages through the pool, then mended. No page may be lost or
//! poisoned, the output must be the native output, and by exit the mended server must have
//! its copies back.
//!
//! Needs root (network namespaces); without `CAP_NET_ADMIN` and `CAP_SYS_ADMIN` the test
//! says so and skips. CI runs as root, so there it always runs.

use std::time::{Duration, Instant};

use lego_tests::memcached::{pool_backend, Memcached};
use lego_tests::netns::{self, NetHost};
use lego_tests::{heavy, program, Run, ShimSetup};

/// Hosts in the pool, each with one server.
const HOSTS: usize = 3;
/// The host whose link is cut.
const CUT_HOST: usize = 1;
/// Memory of each server, in MiB: two copies of the whole heap fit on the two hosts left
/// while one is cut off, with room for memcached's slab overhead (a 4 KiB page and its
/// header take a 4.5 KiB slab chunk).
const SERVER_MIB: u32 = 128;
/// The program's heap, and a cache four times smaller (lego's smallest cache), in MiB.
const HEAP_MIB: u64 = 64;
const CACHE_MIB: u64 = HEAP_MIB / 4;
/// Sweeps of the heap that print checksums (the program holds, sweeping on, after them).
const PASSES: u32 = 6;
/// `LEGO_TIMEOUT_MS`: a cut server costs a few of these before it is marked down.
const TIMEOUT_MS: u64 = 300;
/// How long the link stays cut: well past the failures that mark a server down (3 x
/// `TIMEOUT_MS`) and its first probe (1 s later), so the pool must fail over rather than wait.
const CUT_MS: u64 = 3000;
/// How long the program keeps paging after the link is mended before it is told to finish:
/// a down server is probed 1, 3, 7 s after it was marked down (backoff from 1 s, doubling),
/// so the probe that finds it back comes within about 5 s of the mend, and its pages are
/// then re-replicated. A bound on how long the test waits, not a speed it checks.
const RECOVERY_WAIT_MS: u64 = 12_000;
/// Bound on waiting for the program's first sweep (it takes well under a second natively).
const FIRST_PASS_WAIT_S: u64 = 120;
/// Hang guard of the run under lego.
const HANG_S: u64 = 300;

#[test]
fn a_server_cut_off_mid_run_loses_no_page_and_gets_its_copies_back() {
    if let Some(why) = netns::unavailable() {
        eprintln!("SKIPPED a_server_cut_off_mid_run_loses_no_page_and_gets_its_copies_back: {why}");
        return;
    }
    let _serial = heavy();
    let args = [HEAP_MIB.to_string(), PASSES.to_string()];
    let native = Run::new(program("heap_sweeps")).args(&args).run();
    native.assert_success();

    netns::reap_leftovers();
    let hosts: Vec<NetHost> = (0..HOSTS).map(|_| NetHost::create()).collect();
    let servers: Vec<Memcached> = hosts
        .iter()
        .map(|h| Memcached::start_in_netns(h.name(), &h.ip(), SERVER_MIB))
        .collect();
    let cut = &hosts[CUT_HOST];
    eprintln!(
        "pool {}; cutting {} (link {}) after the first sweep",
        pool_backend(&servers),
        servers[CUT_HOST].addr,
        cut.veth()
    );

    let setup = ShimSetup::new("netns", CACHE_MIB);
    let mut cut_mid_run = false;
    let mut held_after_mending = false;
    let out = setup
        .apply(Run::new(program("heap_sweeps")).args(&args))
        .env("LEGO_BACKEND", pool_backend(&servers))
        .env("LEGO_REPLICAS", "2")
        .env("LEGO_TIMEOUT_MS", TIMEOUT_MS.to_string())
        .hang_after(HANG_S)
        .run_with(|live| {
            // After the first sweep every server holds pages: cut one off while the program
            // goes on sweeping (fetching and writing back through the pool).
            let first = Duration::from_secs(FIRST_PASS_WAIT_S);
            if live
                .wait_for_line(|l| l.starts_with("pass 0 "), first)
                .is_none()
            {
                return; // It died or hung before: its outcome says how.
            }
            cut.cut();
            cut_mid_run = !live.finished();
            std::thread::sleep(Duration::from_millis(CUT_MS));
            cut.mend();
            let mended = Instant::now();
            // It holds, sweeping, until stdin closes; let it page on (through its passes,
            // then holding) while the pool finds the server back and re-replicates, then tell
            // it to finish.
            if live
                .wait_for_line(|l| l == "holding", Duration::from_secs(HANG_S))
                .is_none()
            {
                return;
            }
            let recovery = Duration::from_millis(RECOVERY_WAIT_MS);
            std::thread::sleep(recovery.saturating_sub(mended.elapsed()));
            held_after_mending = !live.finished();
            live.close_stdin();
        });
    eprintln!("{out}");

    lego_tests::assert_same_output(&native, &out);
    assert!(
        cut_mid_run && held_after_mending,
        "the link must be cut while the program ran and it must still run after the mend \
         (cut mid-run: {cut_mid_run}, running after the mend: {held_after_mending}):\n{out}"
    );
    let stats = setup.stats();
    let pool_stat = |key: &str| {
        stats.number(key).unwrap_or_else(|| {
            panic!(
                "the stats JSON has no numeric {key:?}: the pool does not report replication \
                 yet:\n{}",
                stats.raw
            )
        })
    };
    stats.assert_oversubscribed(CACHE_MIB);
    assert_eq!(
        stats.number("pages_poisoned"),
        Some(0),
        "a page was poisoned although a second copy of it was on a server that stayed up:\n{}",
        stats.raw
    );
    for key in [
        "pool_failovers",
        "pool_rereplicated_pages",
        "pool_servers_down",
        "pool_mode_switches",
    ] {
        eprintln!("{key}: {:?}", stats.number(key));
    }
    assert_eq!(
        pool_stat("pool_underreplicated_pages"),
        0,
        "copies were still missing at exit, {RECOVERY_WAIT_MS} ms after the link came back:\n{}",
        stats.raw
    );
    assert!(
        pool_stat("pool_failovers") >= 1,
        "the pool never failed over although {} was cut off for {CUT_MS} ms mid-run:\n{}",
        servers[CUT_HOST].addr,
        stats.raw
    );
}
