//! Tests of the whole configuration: every accepted form, every refusal and its message,
//! defaults on given machines, the documentation table, the process environment.

use super::parse::parse_meminfo_total;
use super::*;
use std::cell::RefCell;
use std::collections::HashMap;

const RAM: u64 = 16 * GIB;
const HOST: Host = Host {
    total_ram_bytes: RAM,
    online_cpus: 8,
};

fn config_on(pairs: &[(&str, &str)], host: Host) -> Result<Config, ConfigError> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|&(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    Config::from_lookup_on(|name| map.get(name).cloned(), host)
}

fn config(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
    config_on(pairs, HOST)
}

fn error(pairs: &[(&str, &str)]) -> String {
    match config(pairs) {
        Ok(c) => panic!("{pairs:?} was accepted: {c:?}"),
        Err(e) => {
            let text = e.to_string();
            assert!(!text.contains('\n'), "multi-line message: {text}");
            text
        }
    }
}

#[test]
fn sizes_in_every_accepted_form() {
    let cases: &[(&str, u64)] = &[
        ("4096", 4096),
        ("1", 1),
        ("4096B", 4096),
        ("512K", 512 * KIB),
        ("512k", 512 * KIB),
        ("512KB", 512 * KIB),
        ("512KiB", 512 * KIB),
        ("512M", 512 * MIB),
        ("512MB", 512 * MIB),
        ("512MiB", 512 * MIB),
        ("512mib", 512 * MIB),
        ("4G", 4 * GIB),
        ("4 G", 4 * GIB),
        ("4GiB", 4 * GIB),
        ("1T", TIB),
        ("1.5G", 3 * GIB / 2),
        ("0.5M", MIB / 2),
        ("1.25K", 1280),
        ("1.0001K", 1024), // fractions of a byte round down
        ("25%", RAM / 4),
        ("100%", RAM),
        ("1%", RAM / 100),
        ("12.5%", RAM / 8),
        (" 8M ", 8 * MIB),
        ("16384T", 16384 * TIB),
    ];
    for &(text, want) in cases {
        assert_eq!(parse_size(text, RAM), Ok(want), "{text}");
    }
}

#[test]
fn sizes_rejected() {
    let not_a_size = [
        "banana", "", "M", "-1", "1.", ".5", "1.2.3", "4X", "4GG", "1e9", "0x10", "1.5", "5%%", "%",
    ];
    for text in not_a_size {
        assert!(
            matches!(parse_size(text, RAM), Err(SizeError::NotASize { .. })),
            "{text}: {:?}",
            parse_size(text, RAM)
        );
    }
    for text in ["0", "0K", "0.0001K", "0G"] {
        assert!(
            matches!(parse_size(text, RAM), Err(SizeError::Zero { .. })),
            "{text}"
        );
    }
    for text in ["0%", "200%", "100.5%", "0.5%"] {
        assert!(
            matches!(
                parse_size(text, RAM),
                Err(SizeError::PercentOutOfRange { .. })
            ),
            "{text}"
        );
    }
    for text in ["16777216T", "99999999999999999999"] {
        assert!(
            matches!(parse_size(text, RAM), Err(SizeError::TooLarge { .. })),
            "{text}"
        );
    }
    assert!(matches!(
        parse_size("25%", 0),
        Err(SizeError::RamUnknown { .. })
    ));
}

#[test]
fn defaults() {
    let c = config(&[]).expect("defaults are valid");
    assert_eq!(c.cache_bytes, RAM / 4);
    assert_eq!(c.heap_bytes, 64 * GIB);
    assert_eq!(
        c.backend,
        BackendSpec::File {
            dir: PathBuf::from("/tmp")
        }
    );
    assert_eq!(c.stats, StatsSink::Off);
    assert_eq!(c.log_level, LevelFilter::Off);
    assert_eq!(c.handler_threads, 8);
    assert_eq!(c.evict_batch_pages, EVICT_BATCH_PAGES_DEFAULT);
    assert_eq!(c.fault_injection, None);
}

#[test]
fn default_backend_follows_tmpdir() {
    let c = config(&[("TMPDIR", "/var/tmp")]).expect("valid");
    assert_eq!(
        c.backend,
        BackendSpec::File {
            dir: PathBuf::from("/var/tmp")
        }
    );
    let e = error(&[("TMPDIR", "scratch")]);
    assert!(e.starts_with("TMPDIR=\"scratch\""), "{e}");
    // An explicit backend wins over TMPDIR, even a bad TMPDIR.
    let c = config(&[("TMPDIR", "scratch"), ("LEGO_BACKEND", "file:/srv")]).expect("valid");
    assert_eq!(
        c.backend,
        BackendSpec::File {
            dir: PathBuf::from("/srv")
        }
    );
}

#[test]
fn default_cache_is_capped_by_heap_and_rounded_to_pages() {
    let host = Host {
        total_ram_bytes: 1024 * GIB + 123,
        online_cpus: 1000,
    };
    let c = config_on(&[("LEGO_HEAP_SIZE", "100G")], host).expect("valid");
    assert_eq!(c.cache_bytes, 100 * GIB);
    assert_eq!(c.handler_threads, HANDLER_THREADS_MAX);
    let host = Host {
        total_ram_bytes: 8 * GIB + 5,
        online_cpus: 0,
    };
    let c = config_on(&[], host).expect("valid");
    assert_eq!(c.cache_bytes % PAGE_BYTES, 0);
    assert_eq!(c.handler_threads, 1);
}

#[test]
fn default_cache_on_tiny_machine_is_an_error_not_a_fallback() {
    let host = Host {
        total_ram_bytes: 32 * MIB,
        online_cpus: 1,
    };
    let e = config_on(&[], host).expect_err("8 MiB cache is too small");
    assert!(e.to_string().contains("25% of RAM (the default)"), "{e}");
}

#[test]
fn every_setting_parsed() {
    let c = config(&[
        ("LEGO_CACHE_SIZE", "48M"),
        ("LEGO_HEAP_SIZE", "1G"),
        ("LEGO_BACKEND", "file:/var/lib/lego"),
        ("LEGO_STATS", "/tmp/out.json"),
        ("LEGO_LOG_LEVEL", "DeBuG"),
        ("LEGO_HANDLER_THREADS", "3"),
        ("LEGO_EVICT_BATCH", "1024"),
        ("LEGO_FAULT_INJECT", "store:enospc:after=7"),
    ])
    .expect("valid");
    assert_eq!(
        c,
        Config {
            cache_bytes: 48 * MIB,
            heap_bytes: GIB,
            backend: BackendSpec::File {
                dir: PathBuf::from("/var/lib/lego")
            },
            stats: StatsSink::Json(PathBuf::from("/tmp/out.json")),
            log_level: LevelFilter::Debug,
            handler_threads: 3,
            evict_batch_pages: 1024,
            fault_injection: Some(FaultPlan {
                op: FaultOp::Store,
                after_pages: 7,
                effect: FaultEffect::Errno(libc::ENOSPC),
                once: false,
            }),
            spawn_failure: None,
            panic_injection: None,
            stall_injection: None,
            log: None,
            restore: None,
            pool: PoolSettings::default(),
            key_file: None,
            publish: true,
            metrics: None,
            mmap: true,
            mmap_min_bytes: MMAP_MIN_BYTES_DEFAULT,
        }
    );
    assert_eq!(c.cache_pages(), 48 * MIB / PAGE_BYTES);
    assert_eq!(c.heap_pages(), GIB / PAGE_BYTES);
    assert!(c.to_string().contains("fault injection"));
}

#[test]
fn rounding_to_pages() {
    let c = config(&[
        ("LEGO_CACHE_SIZE", "16777217"),
        ("LEGO_HEAP_SIZE", "1073741825"),
    ])
    .expect("valid");
    assert_eq!(c.cache_bytes, 16 * MIB);
    assert_eq!(c.heap_bytes, GIB + PAGE_BYTES);
    let c = config(&[("LEGO_HEAP_SIZE", "8T")]).expect("the maximum is accepted");
    assert_eq!(c.heap_bytes, HEAP_BYTES_MAX);
}

#[test]
fn other_accepted_forms() {
    for (value, want) in [
        ("0", StatsSink::Off),
        ("1", StatsSink::Stderr),
        ("stats.json", StatsSink::Json(PathBuf::from("stats.json"))),
    ] {
        assert_eq!(config(&[("LEGO_STATS", value)]).expect(value).stats, want);
    }
    for (value, want) in [
        ("off", LevelFilter::Off),
        ("ERROR", LevelFilter::Error),
        ("warn", LevelFilter::Warn),
        ("Info", LevelFilter::Info),
        ("trace", LevelFilter::Trace),
    ] {
        assert_eq!(
            config(&[("LEGO_LOG_LEVEL", value)]).expect(value).log_level,
            want
        );
    }
    let plan = config(&[("LEGO_FAULT_INJECT", "fetch:eio:after=0")])
        .expect("valid")
        .fault_injection;
    assert_eq!(
        plan,
        Some(FaultPlan {
            op: FaultOp::Fetch,
            after_pages: 0,
            effect: FaultEffect::Errno(libc::EIO),
            once: false,
        })
    );
    let plan = config(&[("LEGO_FAULT_INJECT", "fetch:corrupt:after=5")])
        .expect("valid")
        .fault_injection;
    assert_eq!(
        plan,
        Some(FaultPlan {
            op: FaultOp::Fetch,
            after_pages: 5,
            effect: FaultEffect::Corrupt,
            once: false,
        })
    );
    let plan = config(&[("LEGO_FAULT_INJECT", "readback:corrupt:after=0")])
        .expect("valid")
        .fault_injection;
    assert_eq!(
        plan.map(|p| (p.op, p.effect)),
        Some((FaultOp::ReadBack, FaultEffect::Corrupt))
    );
    let c = config(&[("LEGO_FAULT_INJECT", "spawn:lego-logwrite")]).expect("valid");
    assert_eq!(c.spawn_failure, Some("lego-logwrite"));
    let c = config(&[("LEGO_FAULT_INJECT", "panic:fork")]).expect("valid");
    assert_eq!(c.panic_injection, Some("fork"));
    assert_eq!(c.fault_injection, None);
    let c = config(&[("LEGO_FAULT_INJECT", "stall:snapshot:250")]).expect("valid");
    assert_eq!(
        c.stall_injection,
        Some(Stall {
            point: "snapshot",
            ms: 250
        })
    );
    assert_eq!(c.fault_injection, None);
    for threads in ["1", "256"] {
        config(&[("LEGO_HANDLER_THREADS", threads)]).expect(threads);
    }
    config(&[("LEGO_EVICT_BATCH", "16")]).expect("16 is the minimum");
}

#[test]
fn empty_means_unset() {
    let empty: Vec<(&str, &str)> = SETTINGS
        .iter()
        .map(|s| (s.name, ""))
        .chain([("TMPDIR", "  ")])
        .collect();
    assert_eq!(config(&empty), config(&[]));
}

#[test]
fn rejections_name_variable_value_and_expectation() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("LEGO_CACHE_SIZE", "banana")],
            "LEGO_CACHE_SIZE=\"banana\" is not a size: expected a number with an optional \
             K, M, G or T suffix (512M, 4G) or a percentage of RAM (25%)",
        ),
        (&[("LEGO_CACHE_SIZE", "0")], "LEGO_CACHE_SIZE=\"0\" is zero"),
        (
            &[("LEGO_CACHE_SIZE", "200%")],
            "LEGO_CACHE_SIZE=\"200%\" is not a valid share of RAM",
        ),
        (
            &[("LEGO_CACHE_SIZE", "8M")],
            "LEGO_CACHE_SIZE=\"8M\" (8388608 bytes) is too small",
        ),
        (
            &[("LEGO_CACHE_SIZE", "2G"), ("LEGO_HEAP_SIZE", "1G")],
            "LEGO_CACHE_SIZE=\"2G\" (2147483648 bytes) is larger than \
             LEGO_HEAP_SIZE=\"1G\" (1073741824 bytes): the cache holds part of the heap, \
             so it must not exceed it",
        ),
        (
            &[("LEGO_CACHE_SIZE", "100G")],
            "LEGO_CACHE_SIZE=\"100G\" (107374182400 bytes) is larger than \
             LEGO_HEAP_SIZE=64G (the default)",
        ),
        (
            &[("LEGO_HEAP_SIZE", "8796093026304")],
            "LEGO_HEAP_SIZE=\"8796093026304\" (8796093026304 bytes) is too large: the \
             largest heap accepted is 8T (8796093022208 bytes)",
        ),
        (
            &[("LEGO_HEAP_SIZE", "64T")],
            "LEGO_HEAP_SIZE=\"64T\" (70368744177664 bytes) is too large",
        ),
        (
            &[("LEGO_HEAP_SIZE", "x")],
            "LEGO_HEAP_SIZE=\"x\" is not a size",
        ),
        (
            &[("LEGO_BACKEND", "redis:x")],
            "LEGO_BACKEND=\"redis:x\" is not a known backend: expected one of file:DIR",
        ),
        (
            &[("LEGO_BACKEND", "/tmp")],
            "LEGO_BACKEND=\"/tmp\" is not a known backend",
        ),
        (
            &[("LEGO_BACKEND", "file:tmp")],
            "LEGO_BACKEND=\"file:tmp\" does not name an absolute directory",
        ),
        (
            &[("LEGO_BACKEND", "file:")],
            "LEGO_BACKEND=\"file:\" does not name an absolute directory",
        ),
        (
            &[("LEGO_STATS", "yes")],
            "LEGO_STATS=\"yes\" is not a stats destination",
        ),
        (
            &[("LEGO_STATS", "2")],
            "LEGO_STATS=\"2\" is not a stats destination",
        ),
        (
            &[("LEGO_LOG_LEVEL", "loud")],
            "LEGO_LOG_LEVEL=\"loud\" is not a log level: expected off, error, warn, info, \
             debug or trace",
        ),
        (
            &[("LEGO_HANDLER_THREADS", "0")],
            "LEGO_HANDLER_THREADS=\"0\" is not a whole number of threads from 1 to 256",
        ),
        (
            &[("LEGO_HANDLER_THREADS", "257")],
            "LEGO_HANDLER_THREADS=\"257\" is not a whole number",
        ),
        (
            &[("LEGO_HANDLER_THREADS", "two")],
            "LEGO_HANDLER_THREADS=\"two\" is not a whole number",
        ),
        (
            &[("LEGO_EVICT_BATCH", "8")],
            "LEGO_EVICT_BATCH=\"8\" is not a whole number of pages from 16 to 1024",
        ),
        (
            &[("LEGO_EVICT_BATCH", "2048")],
            "LEGO_EVICT_BATCH=\"2048\" is not a whole number",
        ),
        (
            &[("LEGO_FAULT_INJECT", "fetch:eio")],
            "LEGO_FAULT_INJECT=\"fetch:eio\" is not a fault plan (it needs exactly three \
             parts",
        ),
        (
            &[("LEGO_FAULT_INJECT", "read:eio:after=1")],
            "(unknown operation)",
        ),
        (
            &[("LEGO_FAULT_INJECT", "stall:evict:10")],
            "(unknown stall point)",
        ),
        (
            &[("LEGO_FAULT_INJECT", "stall:snapshot:0")],
            "(MS must be a whole number of milliseconds from 1 to 60000)",
        ),
        (
            &[("LEGO_FAULT_INJECT", "stall:snapshot")],
            "(a stall needs a point and a time: stall:POINT:MS)",
        ),
        (
            &[("LEGO_FAULT_INJECT", "fetch:eperm:after=1")],
            "(unknown errno)",
        ),
        (
            &[("LEGO_FAULT_INJECT", "fetch:eio:before=1")],
            "(the third part must be after=N)",
        ),
        (
            &[("LEGO_FAULT_INJECT", "fetch:eio:after=-1")],
            "(N must be a whole number of pages)",
        ),
        (
            &[("LEGO_FAULT_INJECT", "fetch:eio:after=1:x")],
            "(it needs exactly three parts",
        ),
        (
            &[("LEGO_FAULT_INJECT", "store:corrupt:after=1")],
            "(only fetched pages can come back corrupt)",
        ),
        (
            &[("LEGO_FAULT_INJECT", "spawn:lego-nothing")],
            "(unknown thread): expected",
        ),
    ];
    for &(pairs, want) in cases {
        let got = error(pairs);
        assert!(got.contains(want), "{pairs:?}:\n got  {got}\n want {want}");
    }
}

#[test]
fn fault_plans_once_and_delay() {
    let plan = |value: &str| {
        config(&[("LEGO_FAULT_INJECT", value)])
            .expect(value)
            .fault_injection
            .expect("a store plan")
    };
    assert_eq!(
        plan("fetch:eio:after=3:once"),
        FaultPlan {
            op: FaultOp::Fetch,
            after_pages: 3,
            effect: FaultEffect::Errno(libc::EIO),
            once: true,
        }
    );
    assert_eq!(
        plan("STORE:ENOSPC:after=0:ONCE"),
        FaultPlan {
            op: FaultOp::Store,
            after_pages: 0,
            effect: FaultEffect::Errno(libc::ENOSPC),
            once: true,
        }
    );
    assert_eq!(
        plan("fetch:corrupt:after=1:once").effect,
        FaultEffect::Corrupt
    );
    assert!(plan("readback:corrupt:after=1:once").once);
    assert_eq!(
        plan("fetch:delay=50:after=10"),
        FaultPlan {
            op: FaultOp::Fetch,
            after_pages: 10,
            effect: FaultEffect::Delay { ms: 50 },
            once: false,
        }
    );
    assert_eq!(
        plan("store:Delay=60000:after=0:once"),
        FaultPlan {
            op: FaultOp::Store,
            after_pages: 0,
            effect: FaultEffect::Delay {
                ms: FAULT_DELAY_MS_MAX
            },
            once: true,
        }
    );
    assert_eq!(
        plan("fetch:delay=1:after=0").effect,
        FaultEffect::Delay { ms: 1 }
    );
    let text = config(&[("LEGO_FAULT_INJECT", "fetch:delay=5:after=2:once")])
        .expect("valid")
        .to_string();
    assert!(
        text.contains("Delay { ms: 5 } after 2 pages, once"),
        "{text}"
    );

    // Every refusal names the variable, quotes the value, says what is wrong and gives the
    // expected forms, the new ones included.
    let refused: &[(&str, &str)] = &[
        (
            "fetch:delay=0:after=1",
            "MS must be a whole number of milliseconds from 1 to 60000",
        ),
        ("fetch:delay=60001:after=1", "from 1 to 60000"),
        ("store:delay=-5:after=1", "from 1 to 60000"),
        ("fetch:delay=:after=1", "from 1 to 60000"),
        ("fetch:delay=1.5:after=1", "from 1 to 60000"),
        (
            "readback:delay=5:after=1",
            "only fetch and store can be delayed",
        ),
        (
            "fetch:delay=5",
            "it needs exactly three parts separated by ':', or four ending in once",
        ),
        ("fetch:eio:after=1:twice", "or four ending in once"),
        ("fetch:eio:once", "the third part must be after=N"),
        ("fetch:eio:after=1:once:once", "or four ending in once"),
        (
            "store:corrupt:after=1:once",
            "only fetched pages can come back corrupt",
        ),
        ("fetch:slow:after=1", "unknown errno"),
    ];
    for &(value, problem) in refused {
        let got = error(&[("LEGO_FAULT_INJECT", value)]);
        let head = format!("LEGO_FAULT_INJECT={value:?} is not a fault plan (");
        assert!(got.starts_with(&head), "{value}: {got}");
        assert!(got.contains(problem), "{value}: {got}");
        for form in [
            "fetch:delay=MS:after=N or store:delay=MS:after=N with MS from 1 to 60000",
            "ending in :once",
            "OP:ERRNO:after=N",
        ] {
            assert!(got.contains(form), "{value}: {got}");
        }
    }
}

#[test]
fn every_variable_read_is_documented_once() {
    let read = RefCell::new(Vec::<String>::new());
    Config::from_lookup_on(
        |name| {
            read.borrow_mut().push(name.to_owned());
            None
        },
        HOST,
    )
    .expect("defaults are valid");
    let mut read = read.into_inner();
    read.retain(|n| n != vars::TMPDIR);
    read.sort();
    let mut documented: Vec<String> = SETTINGS.iter().map(|s| s.name.to_owned()).collect();
    documented.sort();
    let before = documented.len();
    documented.dedup();
    assert_eq!(before, documented.len(), "a setting is documented twice");
    assert_eq!(read, documented);
    for s in documented_settings() {
        assert!(s.name.starts_with("LEGO_"));
        assert!(!s.default.is_empty() && !s.example.is_empty() && !s.meaning.is_empty());
    }
}

#[test]
fn documented_examples_are_accepted() {
    for s in documented_settings() {
        let mut pairs = vec![(s.name, s.example)];
        // The cache example must fit the heap example and vice versa.
        if s.name == vars::HEAP_SIZE {
            pairs.push((vars::CACHE_SIZE, "512M"));
        }
        // The log's settings tune a log.
        if [vars::FLUSH_MS, vars::FLUSH_PAGES, vars::SYNC, vars::LOG_MAX].contains(&s.name) {
            pairs.push((vars::LOG_DIR, "/var/lib/app/heap"));
        }
        // The pool's settings tune a pool.
        if [
            vars::REPLICAS,
            vars::REPLICATION,
            vars::ADAPTIVE_FREE,
            vars::TIMEOUT_MS,
            vars::KEY_FILE,
        ]
        .contains(&s.name)
        {
            pairs.push((vars::BACKEND, "memcached://10.0.0.5:11211,10.0.0.6:11211"));
        }
        // The code's example needs K+M servers.
        if s.name == vars::REDUNDANCY {
            pairs.push((vars::BACKEND, "memcached://h:1,h:2,h:3,h:4,h:5,h:6"));
        }
        config(&pairs).unwrap_or_else(|e| panic!("{}={}: {e}", s.name, s.example));
    }
}

#[test]
fn meminfo_parsing() {
    let text = "MemTotal:       16318464 kB\nMemFree:         1234 kB\n";
    assert_eq!(parse_meminfo_total(text), Some(16318464 * KIB));
    assert_eq!(parse_meminfo_total("MemFree: 1 kB\n"), None);
    assert_eq!(parse_meminfo_total("MemTotal: x kB\n"), None);
    assert!(total_ram_bytes() > 0, "this machine's RAM is readable");
    assert!(online_cpus() >= 1);
}

/// Marks the child process that [`from_env_reads_the_process_environment`] starts.
const CHILD_MARKER: &str = "LEGO_CONFIG_TEST_CHILD";

/// Runs `Config::from_env` in a child copy of this test binary with `env` set (the
/// environment of this process is shared by parallel tests, so it is never modified), and
/// returns the child's one-line answer.
fn from_env_in_child(env: &[(&str, std::ffi::OsString)]) -> String {
    use std::process::Command;
    let exe = std::env::current_exe().expect("the test binary has a path");
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", "config::tests::from_env_child", "--nocapture"]);
    cmd.args(["--test-threads", "1"]);
    for s in SETTINGS {
        cmd.env_remove(s.name);
    }
    cmd.env_remove(vars::TMPDIR).env(CHILD_MARKER, "1");
    for (name, value) in env {
        cmd.env(name, value);
    }
    let out = cmd.output().expect("the child runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child failed: {stdout}");
    stdout
        .lines()
        .find_map(|l| l.split_once("from_env: ").map(|(_, answer)| answer))
        .unwrap_or_else(|| panic!("no answer in: {stdout}"))
        .to_owned()
}

#[test]
fn from_env_child() {
    if std::env::var_os(CHILD_MARKER).is_none() {
        return;
    }
    match Config::from_env() {
        Ok(c) => println!(
            "from_env: ok {:?} {:?} {}",
            c.backend, c.stats, c.cache_bytes
        ),
        Err(e) => println!("from_env: err {e}"),
    }
}

#[test]
fn from_env_reads_the_process_environment() {
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;
    let got = from_env_in_child(&[
        ("LEGO_CACHE_SIZE", "32M".into()),
        ("LEGO_STATS", "1".into()),
        ("TMPDIR", "/var/tmp".into()),
    ]);
    assert_eq!(
        got,
        format!("ok File {{ dir: \"/var/tmp\" }} Stderr {}", 32 * MIB)
    );
    let got = from_env_in_child(&[("LEGO_CACHE_SIZE", "banana".into())]);
    assert!(
        got.starts_with("err LEGO_CACHE_SIZE=\"banana\" is not a size"),
        "{got}"
    );
    let got = from_env_in_child(&[("LEGO_CACHE_SIZE", "".into())]);
    assert!(got.starts_with("ok "), "empty means unset: {got}");
    let bad = OsString::from_vec(b"4\xffG".to_vec());
    let got = from_env_in_child(&[("LEGO_HEAP_SIZE", bad.clone())]);
    assert!(
        got.starts_with("err LEGO_HEAP_SIZE=\"4\u{fffd}G\" is not valid UTF-8"),
        "{got}"
    );
    // A non-UTF-8 TMPDIR only matters when it would give the default backend.
    let got = from_env_in_child(&[("TMPDIR", bad.clone())]);
    assert!(got.starts_with("err TMPDIR="), "{got}");
    let got = from_env_in_child(&[("TMPDIR", bad), ("LEGO_BACKEND", "file:/srv".into())]);
    assert!(got.starts_with("ok File { dir: \"/srv\" }"), "{got}");
}

#[test]
fn log_settings_need_a_log_dir_and_have_defaults() {
    let err = config(&[("LEGO_FLUSH_MS", "200")]).expect_err("refused");
    let msg = err.to_string();
    assert!(
        msg.starts_with("LEGO_FLUSH_MS is set but LEGO_LOG_DIR is not"),
        "{msg}"
    );
    assert!(config(&[("LEGO_SYNC", "none")]).is_err());
    let c = config(&[
        ("LEGO_LOG_DIR", "/var/lib/app/heap"),
        ("LEGO_CACHE_SIZE", "64M"),
    ])
    .expect("valid");
    let log = c.log.expect("a log");
    assert_eq!(log.dir, PathBuf::from("/var/lib/app/heap"));
    assert_eq!(log.flush_ms, Some(FLUSH_MS_DEFAULT as u64));
    assert_eq!(log.flush_pages, 4096, "a quarter of a 64 MiB cache");
    assert_eq!(log.sync, LogSync::Fdatasync);
    assert_eq!(log.log_max_bytes, None);
    let msg = config(&[("LEGO_LOG_DIR", "/l"), ("LEGO_SYNC", "always")])
        .expect_err("bad sync")
        .to_string();
    assert!(
        msg.starts_with("LEGO_SYNC=\"always\" is not a sync mode"),
        "{msg}"
    );
    let msg = config(&[("LEGO_LOG_DIR", "/l"), ("LEGO_FLUSH_MS", "5")])
        .expect_err("too short")
        .to_string();
    assert!(msg.contains("from 10 to 3600000, or manual"), "{msg}");
    let msg = config(&[("LEGO_LOG_DIR", "/l"), ("LEGO_FLUSH_MS", "often")])
        .expect_err("not a number")
        .to_string();
    assert!(
        msg.starts_with("LEGO_FLUSH_MS=\"often\" is not an epoch interval"),
        "{msg}"
    );
    for manual in ["manual", "MANUAL"] {
        let c = config(&[("LEGO_LOG_DIR", "/l"), ("LEGO_FLUSH_MS", manual)]).expect(manual);
        assert_eq!(c.log.expect("a log").flush_ms, None);
    }
    let msg = config(&[
        ("LEGO_LOG_DIR", "/l"),
        ("LEGO_FLUSH_MS", "manual"),
        ("LEGO_FLUSH_PAGES", "100"),
    ])
    .expect_err("contradiction")
    .to_string();
    assert!(
        msg.starts_with("LEGO_FLUSH_PAGES is set but LEGO_FLUSH_MS=manual"),
        "{msg}"
    );
    let msg = config(&[("LEGO_LOG_DIR", "/l"), ("LEGO_LOG_MAX", "1M")])
        .expect_err("too small")
        .to_string();
    assert!(msg.starts_with("LEGO_LOG_MAX=\"1M\""), "{msg}");
    assert!(config(&[("LEGO_LOG_DIR", "")])
        .expect("empty")
        .log
        .is_none());
    let c = config(&[("LEGO_RESTORE", "/tmp/heap.img")]).expect("restore alone");
    assert_eq!(c.restore, Some(PathBuf::from("/tmp/heap.img")));
}

#[test]
fn pool_settings_are_parsed_and_checked_against_the_backend() {
    let pool = "memcached://10.0.0.5:11211,10.0.0.6:11211,10.0.0.7:11211";
    let c = config(&[
        ("LEGO_BACKEND", pool),
        ("LEGO_REPLICAS", "2"),
        ("LEGO_REPLICATION", "Optimistic"),
        ("LEGO_ADAPTIVE_FREE", "10%"),
        ("LEGO_TIMEOUT_MS", "300"),
    ])
    .expect("valid");
    assert_eq!(
        c.pool,
        PoolSettings {
            replicas: 2,
            replication: Replication::Optimistic,
            adaptive_free_percent: 10,
            timeout_ms: 300,
            code: None,
        }
    );
    assert_eq!(c.key_file, None);
    let keyed = config(&[("LEGO_BACKEND", pool), ("LEGO_KEY_FILE", "/k")]).expect("valid");
    assert_eq!(keyed.key_file, Some(std::path::PathBuf::from("/k")));
    let defaults = config(&[("LEGO_BACKEND", pool)]).expect("valid");
    assert_eq!(defaults.pool, PoolSettings::default());
    assert_eq!(defaults.pool.replication, Replication::Adaptive);
    assert_eq!(
        config(&[("LEGO_BACKEND", pool), ("LEGO_ADAPTIVE_FREE", "35")])
            .expect("valid")
            .pool
            .adaptive_free_percent,
        35
    );

    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("LEGO_REPLICAS", "2")],
            "LEGO_REPLICAS tunes a memcached pool, but LEGO_BACKEND is not one",
        ),
        (
            &[("LEGO_BACKEND", "file:/tmp"), ("LEGO_TIMEOUT_MS", "100")],
            "LEGO_TIMEOUT_MS tunes a memcached pool",
        ),
        (
            &[("LEGO_KEY_FILE", "/tmp/key")],
            "LEGO_KEY_FILE tunes a memcached pool, but LEGO_BACKEND is not one",
        ),
        (
            &[("LEGO_BACKEND", pool), ("LEGO_REPLICAS", "4")],
            "LEGO_REPLICAS=4 asks for more copies than the pool has servers (3)",
        ),
        (
            &[("LEGO_BACKEND", pool), ("LEGO_REDUNDANCY", "replicas:4")],
            "LEGO_REDUNDANCY=replicas:4 asks for more copies than the pool has servers (3)",
        ),
        (
            &[("LEGO_BACKEND", pool), ("LEGO_REPLICAS", "0")],
            "LEGO_REPLICAS=\"0\" is not a whole number of copies from 1 to 8",
        ),
        (
            &[("LEGO_BACKEND", pool), ("LEGO_REPLICATION", "lazy")],
            "LEGO_REPLICATION=\"lazy\" is not a replication mode: expected pessimistic, optimistic or adaptive",
        ),
        (
            &[("LEGO_BACKEND", pool), ("LEGO_ADAPTIVE_FREE", "95%")],
            "LEGO_ADAPTIVE_FREE=\"95%\" is not a whole number of percent from 1 to 90",
        ),
        (
            &[("LEGO_BACKEND", pool), ("LEGO_TIMEOUT_MS", "5")],
            "LEGO_TIMEOUT_MS=\"5\" is not a whole number of milliseconds from 10 to 60000",
        ),
    ];
    for (pairs, expected) in cases {
        let got = config(pairs).expect_err("invalid").to_string();
        assert!(got.starts_with(expected), "{pairs:?}: {got}");
    }
}

#[test]
fn redundancy_is_copies_or_a_code_checked_against_the_servers_and_the_mode() {
    let six = "memcached://h:1,h:2,h:3,h:4,h:5,h:6";
    let c = config(&[("LEGO_BACKEND", six), ("LEGO_REDUNDANCY", "rs:4+2")]).expect("valid");
    assert_eq!(
        c.pool.code,
        Some(crate::config::CodeShape { data: 4, parity: 2 })
    );
    assert_eq!(c.pool.replicas, 1);
    // A code writes pessimistically by default (the pool's default is adaptive).
    assert_eq!(c.pool.replication, Replication::Pessimistic);
    let c = config(&[
        ("LEGO_BACKEND", six),
        ("LEGO_REDUNDANCY", "RS:2+1"),
        ("LEGO_REPLICATION", "pessimistic"),
    ])
    .expect("valid");
    assert_eq!(
        c.pool.code,
        Some(crate::config::CodeShape { data: 2, parity: 1 })
    );
    let c = config(&[("LEGO_BACKEND", six), ("LEGO_REDUNDANCY", "replicas:3")]).expect("valid");
    assert_eq!((c.pool.replicas, c.pool.code), (3, None));
    assert_eq!(c.pool.replication, Replication::Adaptive);
    let same = config(&[
        ("LEGO_BACKEND", six),
        ("LEGO_REDUNDANCY", "replicas:2"),
        ("LEGO_REPLICAS", "2"),
    ])
    .expect("the same thing twice");
    assert_eq!(same.pool.replicas, 2);
    // A code with a key: parity values are sealed like pages.
    let sealed = config(&[
        ("LEGO_BACKEND", six),
        ("LEGO_REDUNDANCY", "rs:4+2"),
        ("LEGO_KEY_FILE", "/k"),
    ])
    .expect("a sealed coded pool");
    assert_eq!(sealed.pool.code, Some(CodeShape { data: 4, parity: 2 }));
    assert_eq!(sealed.key_file, Some(std::path::PathBuf::from("/k")));

    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("LEGO_REDUNDANCY", "rs:4+2")],
            "LEGO_REDUNDANCY tunes a memcached pool, but LEGO_BACKEND is not one",
        ),
        (
            &[("LEGO_BACKEND", six), ("LEGO_REDUNDANCY", "raid5")],
            "LEGO_REDUNDANCY=\"raid5\" is not a redundancy: expected replicas:N",
        ),
        (
            &[("LEGO_BACKEND", six), ("LEGO_REDUNDANCY", "rs:4")],
            "LEGO_REDUNDANCY=\"rs:4\" is not a redundancy",
        ),
        (
            &[("LEGO_BACKEND", six), ("LEGO_REDUNDANCY", "rs:3+2")],
            "LEGO_REDUNDANCY=\"rs:3+2\" is not a code lego supports: K (data pages of a stripe) must be 2, 4, 8 or 16",
        ),
        (
            &[("LEGO_BACKEND", six), ("LEGO_REDUNDANCY", "rs:4+5")],
            "LEGO_REDUNDANCY=\"rs:4+5\" is not a code lego supports",
        ),
        (
            &[("LEGO_BACKEND", six), ("LEGO_REDUNDANCY", "rs:4+0")],
            "LEGO_REDUNDANCY=\"rs:4+0\" is not a code lego supports",
        ),
        (
            &[("LEGO_BACKEND", six), ("LEGO_REDUNDANCY", "rs:8+2")],
            "LEGO_REDUNDANCY=rs:8+2 needs 10 servers (every value of a stripe lives on a different server), but the pool has 6",
        ),
        (
            &[("LEGO_BACKEND", six), ("LEGO_REDUNDANCY", "replicas:9")],
            "LEGO_REDUNDANCY=\"replicas:9\" is not a whole number of copies from 1 to 8",
        ),
        (
            &[
                ("LEGO_BACKEND", six),
                ("LEGO_REDUNDANCY", "rs:4+2"),
                ("LEGO_REPLICAS", "2"),
            ],
            "LEGO_REDUNDANCY=rs:4+2 and LEGO_REPLICAS=2 disagree: set only one of them",
        ),
        (
            &[
                ("LEGO_BACKEND", six),
                ("LEGO_REDUNDANCY", "replicas:3"),
                ("LEGO_REPLICAS", "2"),
            ],
            "LEGO_REDUNDANCY=replicas:3 and LEGO_REPLICAS=2 disagree",
        ),
        (
            &[
                ("LEGO_BACKEND", six),
                ("LEGO_REDUNDANCY", "rs:4+2"),
                ("LEGO_REPLICATION", "optimistic"),
            ],
            "LEGO_REDUNDANCY=rs:4+2 writes parity with its data, so LEGO_REPLICATION=optimistic is not supported with it",
        ),
        (
            &[
                ("LEGO_BACKEND", six),
                ("LEGO_REDUNDANCY", "rs:4+2"),
                ("LEGO_REPLICATION", "adaptive"),
            ],
            "LEGO_REDUNDANCY=rs:4+2 writes parity with its data, so LEGO_REPLICATION=adaptive",
        ),
    ];
    for (pairs, expected) in cases {
        let got = config(pairs).expect_err("invalid").to_string();
        assert!(got.starts_with(expected), "{pairs:?}: {got}");
    }
}

#[test]
fn mmap_switch_and_threshold() {
    let c = config(&[]).expect("defaults");
    assert!(c.mmap, "on by default");
    assert_eq!(c.mmap_min_bytes, MMAP_MIN_BYTES_DEFAULT);
    let c = config(&[("LEGO_MMAP", "1"), ("LEGO_MMAP_MIN", "1M")]).expect("valid");
    assert!(c.mmap);
    assert_eq!(c.mmap_min_bytes, MIB);
    let c = config(&[("LEGO_MMAP", "off"), ("LEGO_MMAP_MIN", "5000")]).expect("valid");
    assert!(!c.mmap);
    assert_eq!(c.mmap_min_bytes, 8192, "rounded up to pages");
    let e = error(&[("LEGO_MMAP", "2")]);
    assert!(e.contains("LEGO_MMAP=\"2\""), "{e}");
    assert!(e.contains("expected 1"), "{e}");
    for bad in ["0", "100", "2T", "lots"] {
        let e = error(&[("LEGO_MMAP_MIN", bad)]);
        assert!(e.contains("LEGO_MMAP_MIN"), "{bad}: {e}");
        assert!(e.contains(bad), "{bad}: {e}");
    }
}
