//! The memcached pool (`LEGO_BACKEND=memcached://...`) under real programs: memcached started
//! the way users start it (`memcached -l 127.0.0.1 -p PORT -M -m MB`), on loopback, and
//! always stopped.

use lego_tests::memcached::{pool_backend, Memcached};
use lego_tests::{heavy, program, Run, ShimSetup};

/// A program whose heap is four times its cache runs on a pool of two servers with the same
/// output as without lego: its evicted pages went to the servers and came back.
#[test]
fn a_program_runs_on_a_pool_of_two_servers() {
    let _serial = heavy();
    let native = Run::new(program("sigbus_fetch")).args(["128"]).run();
    native.assert_success();
    let (a, b) = (Memcached::start(128), Memcached::start(128));
    let setup = ShimSetup::new("pool", 32);
    let out = setup
        .apply(Run::new(program("sigbus_fetch")).args(["128"]))
        .env("LEGO_BACKEND", pool_backend([&a, &b]))
        .hang_after(300)
        .run();
    out.assert_success();
    assert_eq!(out.stdout, native.stdout, "{out}");
    let stats = setup.stats();
    assert!(
        stats.number("pages_fetched").is_some_and(|n| n > 10_000),
        "the pages must have come back from the pool:\n{}",
        stats.raw
    );
    assert_eq!(stats.number("pages_poisoned"), Some(0), "{}", stats.raw);
    assert!(
        stats.raw.contains(&pool_backend([&a, &b])),
        "the run must have used the pool:\n{}",
        stats.raw
    );
}
