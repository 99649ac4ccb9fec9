//! The memcached pool (`LEGO_BACKEND=memcached://...`) under real programs: memcached started
//! the way users start it (`memcached -l 127.0.0.1 -p PORT -M -m MB`), on loopback, and
//! always stopped.

use std::time::{Duration, Instant};

use lego_tests::memcached::{pool_backend, Memcached};
use lego_tests::{heavy, program, Run, ShimSetup};

/// The workload of the kill tests: four threads rewriting and checking 128 MiB of pages at
/// random under a 32 MiB cache (every page written back, fetched and rewritten many times),
/// with a digest of the final state that does not depend on scheduling. With `hold` it then
/// keeps checking and writing back every page until its stdin closes: the tests that wait for
/// the pool to heal do so while it runs.
const WORKLOAD: &str = "pager_stress";
const WORKLOAD_ARGS: [&str; 4] = ["128", "4", "150000", "hold"];
/// How long a test waits for the pool to be back to two copies of every page, in seconds.
const HEAL_WAIT_S: u64 = 300;

/// What a broken-server test waits for before the program may finish.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// Nothing: the program finishes its work and exits.
    Nothing,
    /// The pool back to two copies of every page, re-replicated (read from the statistics
    /// the program publishes while it holds).
    Healed,
}
/// When the test kills a server after the start, in milliseconds.
const KILL_AFTER_MS: u64 = 2500;

/// Runs the workload on a pool of three servers and, midway, does `mishap` to one of them
/// (kills it, restarts it). Returns the run and its set-up (whose stats a run that exited
/// wrote).
fn break_one_of_three(
    label: &str,
    env: &[(&str, &str)],
    mishap: fn(&mut Memcached),
    wait: Wait,
) -> (lego_tests::Outcome, ShimSetup) {
    break_one_of_three_once(label, env, mishap, wait, None)
}

/// [`break_one_of_three`], the mishap waiting (after [`KILL_AFTER_MS`]) until the program's
/// published statistic `kill_when` is above 0, for at most [`HEAL_WAIT_S`].
fn break_one_of_three_once(
    label: &str,
    env: &[(&str, &str)],
    mishap: fn(&mut Memcached),
    wait: Wait,
    kill_when: Option<&'static str>,
) -> (lego_tests::Outcome, ShimSetup) {
    let mut servers: Vec<Memcached> = (0..3).map(|_| Memcached::start(256)).collect();
    let setup = ShimSetup::new(label, 32);
    let runtime_dir = setup.dir.path().join("run");
    std::fs::create_dir_all(&runtime_dir).expect("the runtime directory");
    let mut run = setup
        .apply(Run::new(program(WORKLOAD)).args(WORKLOAD_ARGS))
        .env("LEGO_BACKEND", pool_backend(&servers))
        .env("LEGO_TIMEOUT_MS", "500")
        .env("XDG_RUNTIME_DIR", &runtime_dir)
        .hang_after(600);
    for (k, v) in env {
        run = run.env(k, v);
    }
    let mut victim = servers.remove(1);
    let published = runtime_dir.join("lego");
    let breaker = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(KILL_AFTER_MS));
        if let Some(stat) = kill_when {
            let deadline = Instant::now() + Duration::from_secs(HEAL_WAIT_S);
            while published_number(&published, stat).unwrap_or(0) == 0 && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        mishap(&mut victim);
        victim
    });
    let out = run.run_with(|live| {
        // A program that dies (SIGBUS with one copy) never holds.
        if live
            .wait_for_line(|l| l == "holding", Duration::from_secs(600))
            .is_none()
        {
            return;
        }
        // The break has happened once the program holds, or it happens now.
        while !breaker.is_finished() {
            std::thread::sleep(Duration::from_millis(100));
        }
        if wait == Wait::Healed {
            wait_until_healed(&runtime_dir.join("lego"));
        }
    });
    let _victim = breaker.join().expect("the thread that breaks a server");
    (out, setup)
}

/// A number in the statistics a live program publishes under `published`, if any.
fn published_number(published: &std::path::Path, name: &str) -> Option<u64> {
    lego_runtime::watch::read::published(published)
        .into_iter()
        .filter(|(_, alive)| *alive)
        .find_map(|(pid, _)| {
            let stats = lego_runtime::watch::read::read(published, pid).ok()?;
            let v = stats.get(name)?;
            v.as_str()
                .and_then(|s| s.parse::<u64>().ok())
                .or(v.as_u64())
        })
}

/// Waits, while the program holds, until its published statistics say every page has two
/// copies again and some were re-replicated; fails the test after [`HEAL_WAIT_S`].
fn wait_until_healed(published: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(HEAL_WAIT_S);
    let mut last = String::new();
    loop {
        for (pid, alive) in lego_runtime::watch::read::published(published) {
            if !alive {
                continue;
            }
            if let Ok(stats) = lego_runtime::watch::read::read(published, pid) {
                let n = |k: &str| {
                    stats.get(k).and_then(|v| {
                        v.as_str()
                            .and_then(|s| s.parse::<u64>().ok())
                            .or(v.as_u64())
                    })
                };
                if n("pool_underreplicated_pages") == Some(0)
                    && n("pool_rereplicated_pages").is_some_and(|r| r > 0)
                {
                    return;
                }
                last = serde_json::Value::Object(stats).to_string();
            }
        }
        assert!(
            Instant::now() < deadline,
            "the pool was not back to two copies of every page after {HEAL_WAIT_S} s; last \
             statistics: {last}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// [`break_one_of_three`], killing the server.
fn kill_one_of_three(
    label: &str,
    env: &[(&str, &str)],
    wait: Wait,
) -> (lego_tests::Outcome, ShimSetup) {
    break_one_of_three(label, env, Memcached::kill, wait)
}

/// A server restarted empty mid-run: the run finishes with the same output, the pool finds
/// the restart and writes the lost copies again (counted), and every page has two copies at
/// exit.
#[test]
fn a_server_restarted_empty_mid_run_is_refilled() {
    let _serial = heavy();
    let native = native_workload();
    let (out, setup) = break_one_of_three(
        "pool-restart",
        &[("LEGO_REPLICAS", "2")],
        Memcached::restart,
        Wait::Healed,
    );
    out.assert_success();
    assert_eq!(out.stdout, native.stdout, "{out}");
    let stats = setup.stats();
    assert_eq!(stats.number("pages_poisoned"), Some(0), "{}", stats.raw);
    assert!(
        stats.number("pool_restarts").is_some_and(|n| n >= 1)
            || stats.number("pool_bad_copies").is_some_and(|n| n > 0),
        "the pool must have found the restart: {}",
        stats.raw
    );
    assert_back_to_two_copies(&stats, "restarted empty");
    assert_eq!(stats.number("pool_servers_down"), Some(0), "{}", stats.raw);
}

/// A pool too small for the heap: the servers answer "out of memory", stay up, and keep
/// what they hold; the pages that do not fit stay in the cache (which overflows); the program
/// gives the same output, and the log says the pool is full.
#[test]
fn a_full_pool_loses_nothing_and_says_so() {
    let _serial = heavy();
    let native = Run::new(program("sigbus_fetch")).args(["96"]).run();
    native.assert_success();
    let (a, b) = (Memcached::start(8), Memcached::start(8));
    let setup = ShimSetup::new("pool-full", 16);
    let out = setup
        .apply(Run::new(program("sigbus_fetch")).args(["96"]))
        .env("LEGO_BACKEND", pool_backend([&a, &b]))
        .env("LEGO_LOG_LEVEL", "warn")
        .hang_after(300)
        .run();
    out.assert_success();
    assert_eq!(out.stdout, native.stdout, "{out}");
    assert!(
        out.stderr.contains("is full (memcached -m)"),
        "the log must say the pool is full:\n{out}"
    );
    let stats = setup.stats();
    assert_eq!(stats.number("pages_poisoned"), Some(0), "{}", stats.raw);
    assert_eq!(
        stats.number("pool_servers_down"),
        Some(0),
        "a full server is not down: {}",
        stats.raw
    );
    assert!(
        stats.number("pages_fetched").is_some_and(|n| n > 1000),
        "what fit in the pool came back from it: {}",
        stats.raw
    );
}

/// The lost server's copies were written again (the test saw every page back to two copies
/// while the program ran), and at exit no page lacks a copy but those still queued for one.
fn assert_back_to_two_copies(stats: &lego_tests::Stats, what: &str) {
    assert!(
        stats
            .number("pool_rereplicated_pages")
            .is_some_and(|n| n > 0),
        "{what}: the lost copies must have been written again: {}",
        stats.raw
    );
    let short = stats.number("pool_underreplicated_pages");
    let queued = stats.number("pool_queued_pages");
    assert!(
        short.is_some() && short <= queued,
        "{what}: at exit only pages queued for their second copy may have one: {}",
        stats.raw
    );
}

/// The workload without lego (its stdin at end of file: it holds no time): the output every
/// run must give.
fn native_workload() -> lego_tests::Outcome {
    let native = Run::new(program(WORKLOAD)).args(WORKLOAD_ARGS).run();
    native.assert_success();
    native
}

/// A run that lost a server mid-run and lost nothing: exit 0, the native output, no page
/// poisoned, and the pool saw the server go (so the kill happened mid-run). Returns its stats.
fn assert_survived(
    out: &lego_tests::Outcome,
    setup: &ShimSetup,
    native: &lego_tests::Outcome,
    what: &str,
) -> lego_tests::Stats {
    out.assert_success();
    assert_eq!(out.stdout, native.stdout, "{what}: {out}");
    assert!(!out.stdout.contains("WRONG DATA"), "{what}: {out}");
    let stats = setup.stats();
    assert_eq!(
        stats.number("pages_poisoned"),
        Some(0),
        "{what}: {}",
        stats.raw
    );
    assert!(
        stats.raw.contains(" down fetched="),
        "{what}: the killed server must be down at exit (was it killed after the run?):\n{}",
        stats.raw
    );
    stats
}

/// Kill one of three servers in the middle of a heap workload four times larger than the
/// cache, with two copies of every page, in each replication mode: identical output, no page
/// lost, and the pool back to two copies of every page on the two servers left.
#[test]
fn a_server_killed_mid_run_costs_nothing_with_two_copies() {
    let _serial = heavy();
    let native = native_workload();
    for mode in ["pessimistic", "optimistic", "adaptive"] {
        let (out, setup) = kill_one_of_three(
            &format!("pool-kill-{mode}"),
            &[("LEGO_REPLICAS", "2"), ("LEGO_REPLICATION", mode)],
            Wait::Healed,
        );
        let stats = assert_survived(&out, &setup, &native, mode);
        assert!(
            stats.number("pages_fetched").is_some_and(|n| n > 10_000),
            "{mode}: the workload must page: {}",
            stats.raw
        );
        assert_back_to_two_copies(&stats, mode);
    }
}

/// With one copy and the log on, the log is the second copy: pages are evicted only once the
/// log holds them, and those of the killed server are read back from it. Identical output.
#[test]
fn a_server_killed_with_one_copy_and_the_log_costs_nothing() {
    let _serial = heavy();
    let native = native_workload();
    let logs = lego_tests::TempDir::new("pool-kill-log");
    let log_dir = logs.path().join("log");
    let log_dir = log_dir.to_str().expect("a UTF-8 path");
    let (out, setup) = kill_one_of_three(
        "pool-kill-one-copy-log",
        &[("LEGO_REPLICAS", "1"), ("LEGO_LOG_DIR", log_dir)],
        Wait::Nothing,
    );
    let stats = assert_survived(&out, &setup, &native, "one copy and the log");
    assert!(
        stats.number("pages_from_log").is_some_and(|n| n > 0),
        "the killed server's pages must have come back from the log: {}",
        stats.raw
    );
    // The log kept working after the loss: no epoch failed for want of a page the pool lost.
    assert_eq!(stats.number("log_errors"), Some(0), "{}", stats.raw);
    assert!(
        stats.number("epochs_committed").is_some_and(|n| n > 3),
        "epochs must go on being committed: {}",
        stats.raw
    );
}

/// Adaptive replication with the log on, the pool's memory scarce (`LEGO_ADAPTIVE_FREE=90`:
/// scarce once a tenth of it is used): the log stands in for the second copy of the pages it
/// holds, so they get one copy in the pool; a server killed mid-run costs nothing, its
/// one-copy pages come back from the log. Identical output.
#[test]
fn adaptive_with_scarce_memory_and_the_log_keeps_one_copy_and_loses_nothing() {
    let _serial = heavy();
    let native = native_workload();
    let logs = lego_tests::TempDir::new("pool-kill-adaptive-log");
    let log_dir = logs.path().join("log");
    let log_dir = log_dir.to_str().expect("a UTF-8 path");
    // The kill waits until pages have been stored with one copy (the switch happened).
    let (out, setup) = break_one_of_three_once(
        "pool-kill-adaptive-log",
        &[
            ("LEGO_REPLICAS", "2"),
            ("LEGO_REPLICATION", "adaptive"),
            ("LEGO_ADAPTIVE_FREE", "90"),
            ("LEGO_LOG_DIR", log_dir),
            ("LEGO_LOG_LEVEL", "info"),
        ],
        Memcached::kill,
        Wait::Nothing,
        Some("pool_log_copies"),
    );
    let stats = assert_survived(&out, &setup, &native, "adaptive, scarce, with the log");
    assert!(
        out.stderr
            .contains("pool replication is one copy and the log now"),
        "the switch must be logged at info:\n{out}"
    );
    assert!(
        stats.number("pool_mode_switches").is_some_and(|n| n >= 1),
        "{}",
        stats.raw
    );
    assert!(
        stats.number("pool_log_copies").is_some_and(|n| n > 1000),
        "pages the log held must have been stored with one copy: {}",
        stats.raw
    );
    assert!(
        stats.number("pages_from_log").is_some_and(|n| n > 0),
        "the killed server's one-copy pages must have come back from the log: {}",
        stats.raw
    );
    assert_eq!(stats.number("log_errors"), Some(0), "{}", stats.raw);
}

/// With one copy and no log, a killed server's pages are gone: the program that touches one
/// dies with SIGBUS and a message, and never reads wrong data.
#[test]
fn a_server_killed_with_one_copy_and_no_log_is_sigbus_never_wrong_data() {
    let _serial = heavy();
    let (out, _setup) = kill_one_of_three(
        "pool-kill-one-copy",
        &[("LEGO_REPLICAS", "1")],
        Wait::Nothing,
    );
    assert!(!out.stdout.contains("WRONG DATA"), "{out}");
    assert_eq!(
        out.signal,
        Some(libc::SIGBUS),
        "expected death by SIGBUS:\n{out}"
    );
    assert!(
        out.stderr.contains("lego: SIGBUS"),
        "stderr must explain the SIGBUS in a 'lego: ' line:\n{out}"
    );
}

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

/// The marker `seal_marker` writes into every page (`tests/c/seal_marker.c`).
const SEAL_MARKER: &[u8] = b"lego-seal-test:plaintext-marker!";

/// Writes a key file of 32 random-looking bytes, readable by its owner only, in `dir`.
fn key_file(dir: &lego_tests::TempDir) -> std::path::PathBuf {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.path().join("pool.key");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .expect("creating the key file");
    let bytes: Vec<u8> = (0..32u8)
        .map(|i| i.wrapping_mul(97).wrapping_add(13))
        .collect();
    f.write_all(&bytes).expect("writing the key file");
    path
}

/// Every value a server holds (`lru_crawler metadump all`, then a get of each key), with
/// its key.
fn server_values(addr: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    use lego_runtime::store::memcached::connection::Connection;
    use lego_runtime::store::memcached::{dump, protocol};
    use std::ops::ControlFlow;
    let conn = Connection::new(addr, 5000).expect("a connection to the server");
    let mut keys = Vec::new();
    conn.text_lines(
        "lru_crawler metadump all",
        std::time::Instant::now() + Duration::from_secs(60),
        |line| {
            if let Ok(item) = dump::parse_line(line) {
                keys.push(item.key);
            }
            ControlFlow::Continue(())
        },
    )
    .expect("a dump of the server's items");
    let mut values = Vec::new();
    for chunk in keys.chunks(256) {
        let mut request = Vec::new();
        for (k, key) in chunk.iter().enumerate() {
            let key = std::str::from_utf8(key).expect("lego's keys are text");
            protocol::get(&mut request, key, k as u32);
        }
        protocol::noop(&mut request);
        conn.pipeline(&request, |reply| {
            if let protocol::Reply::Value { opaque, data } = reply {
                values.push((chunk[opaque as usize].clone(), data.to_vec()));
            }
        })
        .expect("getting the values");
    }
    values
}

/// Runs `seal_marker` (48 MiB in a 16 MiB cache) on a fresh pool of `servers` servers with
/// `LEGO_REDUNDANCY=redundancy`, `LEGO_KEY_FILE` set or not; returns the run, its stats, and
/// every value the servers hold after it.
fn marker_run(
    label: &str,
    servers: usize,
    redundancy: &str,
    key: Option<&std::path::Path>,
) -> (lego_tests::Outcome, lego_tests::Stats, Vec<Vec<u8>>) {
    let servers: Vec<Memcached> = (0..servers).map(|_| Memcached::start(256)).collect();
    let setup = ShimSetup::new(label, 16);
    let mut run = setup
        .apply(Run::new(program("seal_marker")).args(["48"]))
        .env("LEGO_BACKEND", pool_backend(&servers))
        .env("LEGO_REDUNDANCY", redundancy)
        .hang_after(300);
    if let Some(k) = key {
        run = run.env("LEGO_KEY_FILE", k);
    }
    let out = run.run();
    let stats = setup.stats();
    let values = servers
        .iter()
        .flat_map(|s| server_values(&s.addr))
        .filter(|(k, _)| k.starts_with(b"lego:") && !k.ends_with(b":lease"))
        .map(|(_, v)| v)
        .collect();
    (out, stats, values)
}

/// With `LEGO_KEY_FILE` the pool holds no page in the clear: no value on any server holds the
/// marker every page of the program carries, while the same run without a key leaves it in
/// plain sight (so the scan can fail); both give the native output.
#[test]
fn with_a_key_the_pool_holds_no_plaintext_page() {
    let _serial = heavy();
    assert_no_plaintext_with_a_key("seal", 2, "replicas:2");
}

/// The same for an erasure-coded pool (`rs:4+2` on six servers): neither its data values nor
/// its parity values hold a page in the clear.
#[test]
fn with_a_key_a_coded_pool_holds_no_plaintext_page() {
    let _serial = heavy();
    assert_no_plaintext_with_a_key("seal-rs", CODED_SERVERS, "rs:4+2");
}

/// The two runs of the tests above (without a key, the control; with one) on `servers`
/// servers with `LEGO_REDUNDANCY=redundancy`, and what they must show.
fn assert_no_plaintext_with_a_key(label: &str, servers: usize, redundancy: &str) {
    let native = Run::new(program("seal_marker")).args(["48"]).run();
    native.assert_success();
    let has_marker = |v: &Vec<u8>| v.windows(SEAL_MARKER.len()).any(|w| w == SEAL_MARKER);

    let (plain, stats, values) = marker_run(&format!("{label}-plain"), servers, redundancy, None);
    plain.assert_success();
    assert_eq!(plain.stdout, native.stdout, "{plain}");
    assert!(
        values.len() > 1000,
        "most pages were evicted to the pool: {}",
        values.len()
    );
    assert!(
        values.iter().filter(|v| has_marker(v)).count() > 1000,
        "without a key the pages are in the clear (the control)"
    );
    assert_pool_sealed(&stats, false);

    let dir = lego_tests::TempDir::new("seal-key");
    let key = key_file(&dir);
    let (sealed, stats, values) =
        marker_run(&format!("{label}-keyed"), servers, redundancy, Some(&key));
    sealed.assert_success();
    assert_eq!(sealed.stdout, native.stdout, "{sealed}");
    assert!(
        values.len() > 1000,
        "most pages were evicted to the pool: {}",
        values.len()
    );
    let clear = values.iter().filter(|v| has_marker(v)).count();
    assert_eq!(
        clear,
        0,
        "{clear} of {} values hold a page in the clear",
        values.len()
    );
    assert_pool_sealed(&stats, true);
    assert!(
        stats.number("pages_fetched").is_some_and(|n| n > 1000),
        "{}",
        stats.raw
    );
    // The key appears nowhere lego writes.
    let key_bytes = std::fs::read(&key).expect("the key file");
    assert!(
        !sealed.stderr.as_bytes().windows(32).any(|w| w == key_bytes),
        "{sealed}"
    );
    assert!(!stats.raw.as_bytes().windows(32).any(|w| w == key_bytes));
}

/// The stats say whether the pool's values were sealed (`pool_sealed`) as `sealed` says, and,
/// when they were, that every value opened (`pool_seal_failures` 0).
fn assert_pool_sealed(stats: &lego_tests::Stats, sealed: bool) {
    assert_eq!(
        lego_tests::json_value(&stats.raw, "pool_sealed").as_deref(),
        Some(if sealed { "yes" } else { "no" }),
        "{}",
        stats.raw
    );
    if sealed {
        assert_eq!(stats.number("pool_seal_failures"), Some(0), "{}", stats.raw);
    }
}

/// Servers of the erasure-coded pool tests (rs:4+2 needs six).
const CODED_SERVERS: usize = 6;

/// Runs the workload on six servers with `LEGO_REDUNDANCY=rs:4+2` and, midway, kills the
/// servers `victims` (`SIGKILL`). With `heal`, once the program holds, the victims are
/// restarted empty and the test waits until the published statistics say every stripe is
/// whole again (`pool_stripes_short=0`, after repairs). The workload is the kill tests' own
/// (`pager_stress`, heap four times the cache: every page written back, fetched and rewritten
/// many times), whose `hold` lets the test wait while pages keep moving. With `key`, every
/// value is sealed (`LEGO_KEY_FILE`).
fn kill_coded(
    label: &str,
    victims: &[usize],
    heal: bool,
    key: Option<&std::path::Path>,
) -> (lego_tests::Outcome, ShimSetup) {
    let servers: Vec<Memcached> = (0..CODED_SERVERS).map(|_| Memcached::start(256)).collect();
    let setup = ShimSetup::new(label, 32);
    let runtime_dir = setup.dir.path().join("run");
    std::fs::create_dir_all(&runtime_dir).expect("the runtime directory");
    let mut run = setup
        .apply(Run::new(program(WORKLOAD)).args(WORKLOAD_ARGS))
        .env("LEGO_BACKEND", pool_backend(&servers))
        .env("LEGO_REDUNDANCY", "rs:4+2")
        .env("LEGO_TIMEOUT_MS", "500")
        .env("XDG_RUNTIME_DIR", &runtime_dir)
        .hang_after(600);
    if let Some(k) = key {
        run = run.env("LEGO_KEY_FILE", k);
    }
    let victims = victims.to_vec();
    let breaker = std::thread::spawn(move || {
        let mut servers = servers;
        std::thread::sleep(Duration::from_millis(KILL_AFTER_MS));
        for &v in &victims {
            servers[v].kill();
        }
        (servers, victims)
    });
    let mut kept = None;
    let out = run.run_with(|live| {
        if live
            .wait_for_line(|l| l == "holding", Duration::from_secs(600))
            .is_none()
        {
            return;
        }
        let (mut servers, victims) = breaker.join().expect("the thread that kills servers");
        if heal {
            for &v in &victims {
                servers[v].restart();
            }
            wait_until_stripes_whole(&runtime_dir.join("lego"));
        }
        kept = Some(servers);
    });
    drop(kept);
    (out, setup)
}

/// Waits, while the program holds, until its published statistics say every stripe has its
/// K+M values on up servers after some were repaired; fails the test after [`HEAL_WAIT_S`].
fn wait_until_stripes_whole(published: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(HEAL_WAIT_S);
    let mut last = String::new();
    loop {
        for (pid, alive) in lego_runtime::watch::read::published(published) {
            if !alive {
                continue;
            }
            if let Ok(stats) = lego_runtime::watch::read::read(published, pid) {
                let n = |k: &str| {
                    stats.get(k).and_then(|v| {
                        v.as_str()
                            .and_then(|s| s.parse::<u64>().ok())
                            .or(v.as_u64())
                    })
                };
                if n("pool_stripes_short") == Some(0)
                    && n("pool_servers_down") == Some(0)
                    && n("pool_stripe_repairs").is_some_and(|r| r > 0)
                {
                    return;
                }
                last = serde_json::Value::Object(stats).to_string();
            }
        }
        assert!(
            Instant::now() < deadline,
            "the coded pool was not back to whole stripes after {HEAL_WAIT_S} s; last \
             statistics: {last}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// rs:4+2 on six servers, two of them killed mid-run: identical output, no page lost (pages
/// of the dead servers rebuilt from their stripes); the servers restarted empty, the pool
/// repairs every stripe back to six values.
#[test]
fn two_of_six_servers_killed_cost_nothing_with_rs_4_2() {
    let _serial = heavy();
    let stats = two_of_six_killed("pool-rs-kill-two", None);
    assert_pool_sealed(&stats, false);
}

/// The same with sealed values (`LEGO_KEY_FILE`): data and parity values sealed, two servers
/// killed, identical output, every stripe repaired, and no value that failed to open.
#[test]
fn two_of_six_servers_killed_cost_nothing_with_rs_4_2_and_a_key() {
    let _serial = heavy();
    let dir = lego_tests::TempDir::new("rs-key");
    let key = key_file(&dir);
    let stats = two_of_six_killed("pool-rs-key-kill-two", Some(&key));
    assert_pool_sealed(&stats, true);
}

/// The run of the two tests above (rs:4+2, servers 1 and 4 killed and restarted empty) and
/// what both must show; returns its stats.
fn two_of_six_killed(label: &str, key: Option<&std::path::Path>) -> lego_tests::Stats {
    let native = native_workload();
    let (out, setup) = kill_coded(label, &[1, 4], true, key);
    out.assert_success();
    assert_eq!(out.stdout, native.stdout, "{out}");
    assert!(!out.stdout.contains("WRONG DATA"), "{out}");
    let stats = setup.stats();
    assert_eq!(stats.number("pages_poisoned"), Some(0), "{}", stats.raw);
    assert!(
        stats.number("pages_fetched").is_some_and(|n| n > 10_000),
        "the workload must page: {}",
        stats.raw
    );
    assert!(
        stats.number("pool_rebuilt_pages").is_some_and(|n| n > 0),
        "pages of the killed servers must have been rebuilt: {}",
        stats.raw
    );
    assert!(
        stats.number("pool_stripe_repairs").is_some_and(|n| n > 0),
        "{}",
        stats.raw
    );
    stats
}

/// rs:4+2 on six servers, three of them killed mid-run: more than the code survives. The
/// program that touches a lost page dies with SIGBUS and a message, and never reads wrong
/// data.
#[test]
fn three_of_six_servers_killed_with_rs_4_2_is_sigbus_never_wrong_data() {
    let _serial = heavy();
    let (out, _setup) = kill_coded("pool-rs-kill-three", &[0, 2, 5], false, None);
    assert!(!out.stdout.contains("WRONG DATA"), "{out}");
    assert_eq!(
        out.signal,
        Some(libc::SIGBUS),
        "expected death by SIGBUS:\n{out}"
    );
    assert!(
        out.stderr.contains("lego: SIGBUS"),
        "stderr must explain the SIGBUS in a 'lego: ' line:\n{out}"
    );
}

/// Servers of the pool whose memory lego's own must not grow with.
const WIDE_POOL_SERVERS: usize = 10;

/// Sequential sweeps over a heap four times the cache on a pool of ten servers stay within the
/// cache plus the stated overhead in every scheme (one copy, two copies, rs:4+2): the buffers
/// lego keeps per server (reply buffers, pipelines sent ahead) must not multiply the overhead
/// by the servers. Every scheme runs on the same servers (each run is its own heap).
#[test]
fn sweeps_on_a_pool_of_ten_servers_stay_within_the_stated_overhead() {
    const CACHE_MIB: u64 = 32;
    let _serial = heavy();
    let args = ["128", "3"];
    let native = Run::new(program("heap_sweeps"))
        .args(args)
        .measure_rss()
        .run();
    native.assert_success();
    let servers: Vec<Memcached> = (0..WIDE_POOL_SERVERS)
        .map(|_| Memcached::start(128))
        .collect();
    for redundancy in ["replicas:1", "replicas:2", "rs:4+2"] {
        let setup = ShimSetup::new("pool-wide-rss", CACHE_MIB);
        let out = setup
            .apply(Run::new(program("heap_sweeps")).args(args))
            .env("LEGO_BACKEND", pool_backend(&servers))
            .env("LEGO_REDUNDANCY", redundancy)
            .hang_after(120)
            .run();
        lego_tests::assert_same_output(&native, &out);
        let stats = setup.stats();
        assert!(
            stats.number("pages_fetched").is_some_and(|n| n > 10_000),
            "{redundancy}: the pages must have come back from the pool:\n{}",
            stats.raw
        );
        eprintln!("LEGO_REDUNDANCY={redundancy}:");
        lego_tests::assert_rss_within_cache(&out, CACHE_MIB, Some(&native));
    }
}

/// Random rewrites under rs:4+2 on ten servers, with the largest eviction batch
/// (`LEGO_EVICT_BATCH=1024`), stay within the cache plus the stated overhead: a coded write
/// holds its stripes' values, parity and requests for a bounded number of stripes at a time,
/// not for every page of the batch (random pages lie each in a stripe of its own).
#[test]
fn coded_random_writes_with_the_largest_eviction_batch_stay_within_the_stated_overhead() {
    const CACHE_MIB: u64 = 32;
    let _serial = heavy();
    let args = ["128", "2", "40000"];
    let native = Run::new(program(WORKLOAD)).args(args).measure_rss().run();
    native.assert_success();
    let servers: Vec<Memcached> = (0..WIDE_POOL_SERVERS)
        .map(|_| Memcached::start(128))
        .collect();
    let setup = ShimSetup::new("pool-coded-write-rss", CACHE_MIB);
    let out = setup
        .apply(Run::new(program(WORKLOAD)).args(args))
        .env("LEGO_BACKEND", pool_backend(&servers))
        .env("LEGO_REDUNDANCY", "rs:4+2")
        .env("LEGO_EVICT_BATCH", "1024")
        .hang_after(120)
        .run();
    lego_tests::assert_same_output(&native, &out);
    let stats = setup.stats();
    assert!(
        stats
            .number("pages_written_back")
            .is_some_and(|n| n > 10_000),
        "the pages must have gone to the pool:\n{}",
        stats.raw
    );
    lego_tests::assert_rss_within_cache(&out, CACHE_MIB, Some(&native));
}
