//! Unmodified real programs under the shim with a heap about ten times the cache:
//! `python3` (with `PYTHONMALLOC=malloc`, so every object is in the malloc heap) and
//! `sqlite3 :memory:` (every database page is in the malloc heap). Output must equal the
//! native run's, peak RSS must stay within the cache plus the stated overhead, and the
//! stats must show the heap really grew to ~10x the cache. Redis (its `malloc` is lego's, the
//! jemalloc it links answers only size queries) is driven over loopback by its own clients.

use lego_tests::{
    assert_rss_within_cache, assert_same_output, free_port, heavy, python3, real_file, which,
    Outcome, Run, ShimSetup, MIB,
};

/// Rows of the sqlite database: about 340 MiB of heap natively.
const SQLITE_ROWS: u64 = 160_000;

/// Scale of the Python structure: about 220 MiB of heap natively.
const PYTHON_SCALE: u64 = 1_200_000;

fn check_real(native: &Outcome, shimmed: &Outcome, setup: &ShimSetup) {
    assert_same_output(native, shimmed);
    check_paged(native, shimmed, setup, 8);
}

/// What every run here must show besides its output: peak RSS within the cache plus the
/// stated overhead, the cache oversubscribed, and a heap at least `times` the cache.
fn check_paged(native: &Outcome, shimmed: &Outcome, setup: &ShimSetup, times: u64) {
    assert_rss_within_cache(shimmed, setup.cache_mib, Some(native));
    let stats = setup.stats();
    stats.assert_oversubscribed(setup.cache_mib);
    assert!(
        stats.heap_top_bytes >= times * setup.cache_mib * MIB,
        "{}: heap_top_bytes {} is less than {times}x the {} MiB cache, so the test did not \
         oversubscribe the cache as much as it means to:\n{}",
        shimmed.what,
        stats.heap_top_bytes,
        setup.cache_mib,
        stats.raw
    );
    eprintln!(
        "{}: native peak RSS {:?} KiB; under lego heap top {} MiB, evicted {} fetched {} pages",
        shimmed.what,
        native.peak_rss_kib,
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

/// Keys of the Redis dataset, and each value's size: about 45 MiB of peak RSS natively and
/// about 75 MiB of lego heap (over four times the cache; ten would triple the test's time).
const REDIS_KEYS: u64 = 100_000;
const REDIS_VALUE_BYTES: usize = 200;
/// Random reads by `redis-benchmark` after the load, over the whole key space.
const REDIS_READS: u64 = 10_000;

/// The value of key `i`: its number, then a pattern that depends on it, `REDIS_VALUE_BYTES`
/// bytes; `round` > 0 gives the overwritten values of the second phase.
fn redis_value(i: u64, round: u64) -> String {
    redis_value_of(i, round, REDIS_VALUE_BYTES)
}

/// [`redis_value`] of `bytes` bytes.
fn redis_value_of(i: u64, round: u64, bytes: usize) -> String {
    let mut v = format!("{i:012}-{round}-");
    let mut x = i.wrapping_mul(2_654_435_761).wrapping_add(round);
    while v.len() < bytes {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        v.push(char::from(b'a' + (x >> 59) as u8 % 26));
    }
    v
}

/// RESP commands for `redis-cli --pipe`.
fn resp(commands: impl Iterator<Item = Vec<String>>) -> Vec<u8> {
    let mut out = Vec::new();
    for words in commands {
        out.extend_from_slice(format!("*{}\r\n", words.len()).as_bytes());
        for w in words {
            out.extend_from_slice(format!("${}\r\n{w}\r\n", w.len()).as_bytes());
        }
    }
    out
}

/// Runs a Redis client (never preloaded: this test process is not) against `port`; its
/// standard output. Panics with the client's output if it fails.
fn redis_client(program: &str, port: u16, args: &[&str], stdin: Option<Vec<u8>>) -> String {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(which(program))
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
    if let Some(data) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(&data)
            .unwrap_or_else(|e| panic!("{program} stopped reading its input: {e}"));
    }
    let out = child.wait_with_output().expect("the client ran");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Loads the dataset into the Redis server on `port`, reads it at random, changes part of it
/// (every 7th key overwritten, every 11th deleted) and reads it again; returns what must be
/// the same with and without lego: the dataset's digest, its size and sampled values.
fn drive_redis(port: u16) -> String {
    let load = resp(
        (0..REDIS_KEYS).map(|i| vec!["SET".into(), format!("key:{i:012}"), redis_value(i, 0)]),
    );
    let piped = redis_client("redis-cli", port, &["--pipe"], Some(load));
    assert!(piped.contains("errors: 0"), "the load failed:\n{piped}");
    let reads = REDIS_READS.to_string();
    let keys = REDIS_KEYS.to_string();
    let bench = [
        "-q",
        "-c",
        "4",
        "-n",
        &reads,
        "-r",
        &keys,
        "GET",
        "key:__rand_int__",
    ];
    redis_client("redis-benchmark", port, &bench, None);
    let change = resp(
        (0..REDIS_KEYS)
            .filter(|i| i % 7 == 0 || i % 11 == 0)
            .map(|i| {
                if i % 11 == 0 {
                    vec!["DEL".into(), format!("key:{i:012}")]
                } else {
                    vec!["SET".into(), format!("key:{i:012}"), redis_value(i, 1)]
                }
            }),
    );
    let piped = redis_client("redis-cli", port, &["--pipe"], Some(change));
    assert!(piped.contains("errors: 0"), "the changes failed:\n{piped}");
    redis_client("redis-benchmark", port, &bench, None);
    let mut seen = String::new();
    for cmd in [&["DBSIZE"][..], &["DEBUG", "DIGEST"]] {
        seen += &redis_client("redis-cli", port, cmd, None);
    }
    // Values checked one by one, spread over the key space (kept, overwritten, deleted).
    for i in (0..REDIS_KEYS).step_by(9_973) {
        let got = redis_client("redis-cli", port, &["GET", &format!("key:{i:012}")], None);
        let want = match (i % 11, i % 7) {
            (0, _) => String::new(),
            (_, 0) => redis_value(i, 1),
            _ => redis_value(i, 0),
        };
        assert_eq!(
            got.trim_end_matches('\n'),
            want,
            "key:{i:012} reads back wrong"
        );
        seen += &got;
    }
    seen
}

/// `redis-server` on `port` of loopback, logging to stdout, with no snapshots and the debug
/// command on (for `DEBUG DIGEST`); each test adds what it needs.
fn redis_server(port: u16) -> Run {
    Run::new(which("redis-server")).args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--enable-debug-command",
        "local",
        "--logfile",
        "",
    ])
}

/// Waits until the Redis server says it accepts connections (after loading what it found).
fn wait_redis_ready(live: &lego_tests::Live) {
    let ready = live.wait_for_line(
        |l| l.contains("Ready to accept connections"),
        std::time::Duration::from_secs(120),
    );
    assert!(
        ready.is_some(),
        "redis-server did not start:\n{}",
        live.stdout_so_far()
    );
}

/// Runs `redis-server` (as `make` builds it) on a loopback port, drives it from this process
/// and shuts it down; the server's outcome and what the driver read.
fn redis_run(make: impl Fn(u16) -> Run) -> (Outcome, String) {
    let port = free_port();
    let mut seen = String::new();
    let out = make(port).run_with(|live| {
        wait_redis_ready(live);
        seen = drive_redis(port);
        redis_client("redis-cli", port, &["SHUTDOWN", "NOSAVE"], None);
    });
    (out, seen)
}

#[test]
fn redis_serves_a_dataset_four_times_the_cache() {
    let _serial = heavy();
    let make = |port: u16| redis_server(port).args(["--appendonly", "no"]);
    let (native, native_seen) = redis_run(|port| make(port).measure_rss());
    native.assert_success();
    let setup = ShimSetup::new("redis", 16);
    let (shimmed, shimmed_seen) = redis_run(|port| setup.apply(make(port)));
    shimmed.assert_success();
    assert_eq!(
        native_seen, shimmed_seen,
        "Redis under lego holds another dataset than natively"
    );
    check_paged(&native, &shimmed, &setup, 4);
}

/// Keys of the dataset the background-save test writes out, and each value's size: a heap of
/// about 190 MiB, more than ten times its 16 MiB cache. Large values keep the test short: the
/// child walks the keys in hash order, so each key costs it a fault or two on a page the cache
/// does not hold (with 200-byte values ten times as many keys took two minutes a save).
const REDIS_SAVE_KEYS: u64 = 45_000;
const REDIS_SAVE_VALUE_BYTES: usize = 4_000;

/// Waits (polling `INFO persistence` on `port`) until `field` reads 0 and `status` reads ok.
fn redis_wait_persistence(port: u16, in_progress: &str, status: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    loop {
        let info = redis_client("redis-cli", port, &["INFO", "persistence"], None);
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}:")))
                .map(|v| v.trim().to_string())
        };
        if field(in_progress).as_deref() == Some("0") {
            assert_eq!(
                field(status).as_deref(),
                Some("ok"),
                "the background save failed:\n{info}"
            );
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the background save did not finish:\n{info}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Starts a fresh Redis (not preloaded) over `dir` with `args`, and returns its `DEBUG DIGEST`
/// and its key count once it has loaded what it found there.
fn redis_loaded_digest(dir: &std::path::Path, args: &[&str]) -> (String, String) {
    let port = free_port();
    let mut found = (String::new(), String::new());
    let dir_arg = dir.to_string_lossy().into_owned();
    let out = redis_server(port)
        .args(["--dir", &dir_arg])
        .args(args)
        .run_with(|live| {
            wait_redis_ready(live);
            found = (
                redis_client("redis-cli", port, &["DEBUG", "DIGEST"], None),
                redis_client("redis-cli", port, &["DBSIZE"], None),
            );
            redis_client("redis-cli", port, &["SHUTDOWN", "NOSAVE"], None);
        });
    out.assert_success();
    found
}

/// Issue 14: Redis with a dataset more than ten times its cache saves it in the background:
/// `BGSAVE` and `BGREWRITEAOF` each fork a child that writes the whole dataset out while the
/// parent goes on serving. The fork pages nothing in (the child reads its evicted pages from
/// the parent's store copies of the moment of the fork), so the peak RSS of the run (the
/// parent's, and each child's) stays within the cache plus the stated overhead; the dump and
/// the rewritten AOF each load into a fresh Redis with the same `DEBUG DIGEST`.
#[test]
fn redis_saves_a_dataset_ten_times_the_cache_in_the_background() {
    let _serial = heavy();
    let dir = lego_tests::TempDir::new("redis-save");
    let dir_arg = dir.path().to_string_lossy().into_owned();
    let cache_mib = 16;
    let setup = ShimSetup::new("redis-save", cache_mib);
    let port = free_port();
    let mut digest = String::new();
    let out = setup
        .apply(redis_server(port).args([
            "--appendonly",
            "no",
            "--dir",
            &dir_arg,
            "--dbfilename",
            "dump.rdb",
            "--appenddirname",
            "aof",
        ]))
        .run_with(|live| {
            wait_redis_ready(live);
            let load = resp((0..REDIS_SAVE_KEYS).map(|i| {
                vec![
                    "SET".into(),
                    format!("key:{i:012}"),
                    redis_value_of(i, 0, REDIS_SAVE_VALUE_BYTES),
                ]
            }));
            redis_client("redis-cli", port, &["--pipe"], Some(load));
            digest = redis_client("redis-cli", port, &["DEBUG", "DIGEST"], None);
            redis_client("redis-cli", port, &["BGSAVE"], None);
            redis_wait_persistence(port, "rdb_bgsave_in_progress", "rdb_last_bgsave_status");
            redis_client("redis-cli", port, &["BGREWRITEAOF"], None);
            redis_wait_persistence(port, "aof_rewrite_in_progress", "aof_last_bgrewrite_status");
            // Still the same dataset in the parent.
            assert_eq!(
                redis_client("redis-cli", port, &["DEBUG", "DIGEST"], None),
                digest,
                "the parent's dataset changed over the saves"
            );
            redis_client("redis-cli", port, &["SHUTDOWN", "NOSAVE"], None);
        });
    out.assert_success();
    let keys = format!("{REDIS_SAVE_KEYS}\n");
    let (from_dump, n) = redis_loaded_digest(dir.path(), &["--dbfilename", "dump.rdb"]);
    assert_eq!(
        (from_dump.as_str(), n.as_str()),
        (digest.as_str(), keys.as_str()),
        "the dump"
    );
    std::fs::remove_file(dir.path().join("dump.rdb")).expect("remove the dump");
    let (from_aof, n) = redis_loaded_digest(
        dir.path(),
        &["--appendonly", "yes", "--appenddirname", "aof"],
    );
    assert_eq!(
        (from_aof.as_str(), n.as_str()),
        (digest.as_str(), keys.as_str()),
        "the AOF"
    );
    assert_rss_within_cache(&out, cache_mib, None);
    let stats = setup.stats();
    stats.assert_oversubscribed(cache_mib);
    assert!(
        stats.heap_top_bytes >= 10 * cache_mib * MIB,
        "the heap ({} bytes) is not ten times the cache:\n{}",
        stats.heap_top_bytes,
        stats.raw
    );
    assert_eq!(stats.number("fork_page_ins"), Some(0), "{}", stats.raw);
    assert_eq!(stats.number("forks_served"), Some(2), "{}", stats.raw);
}
