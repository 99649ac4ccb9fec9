//! Configuration through `LEGO_*` variables: a bad setting stops the program before `main`
//! with exit status 2 and one `lego: ` line naming the variable and the bad value; an empty
//! value means unset; `LEGO_STATS=1` prints a summary on stderr. Heaps of terabytes run and
//! cost what they use.

use lego_tests::{assert_same_output, heavy, program, Outcome, Run, ShimSetup, TempDir, MIB};

/// Exit status of a program stopped by a bad setting.
const EXIT_BAD_SETTING: i32 = 2;

/// The largest `LEGO_HEAP_SIZE` (the runtime's `config::HEAP_BYTES_MAX`), as the refusal
/// names it.
const HEAP_SIZE_MAX: &str = "8T (8796093022208 bytes)";

/// How much more peak RSS (KiB) a terabyte heap may cost than the default 64 GiB one running
/// the same program: the page table, page map and span directory grow with the pages used,
/// not with the heap, so what is left is run-to-run noise (about 0.5 MiB here).
const LARGE_HEAP_EXTRA_RSS_KIB: u64 = 4 * 1024;

fn hello_with(env: &[(&str, &str)]) -> Outcome {
    let mut run = Run::new(program("hello")).shim();
    for (k, v) in env {
        run = run.env(k, v);
    }
    run.run()
}

/// Asserts the run was refused: status 2, main never ran, and stderr is exactly one line
/// starting `lego: ` that contains every string in `mentions`.
fn assert_refused(out: &Outcome, mentions: &[&str]) {
    assert_eq!(
        out.code,
        Some(EXIT_BAD_SETTING),
        "a bad setting must exit with status 2:\n{out}"
    );
    assert!(
        !out.stdout.contains("main ran"),
        "main ran despite a bad setting:\n{out}"
    );
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "stderr must be exactly one line:\n{out}");
    assert!(
        lines[0].starts_with("lego: "),
        "the line must start with 'lego: ':\n{out}"
    );
    for m in mentions {
        assert!(
            lines[0].contains(m),
            "the message must mention {m:?}:\n{out}"
        );
    }
}

#[test]
fn cache_size_not_a_size() {
    let out = hello_with(&[("LEGO_CACHE_SIZE", "banana")]);
    assert_refused(&out, &["LEGO_CACHE_SIZE", "banana"]);
}

#[test]
fn cache_larger_than_heap() {
    let out = hello_with(&[("LEGO_CACHE_SIZE", "2G"), ("LEGO_HEAP_SIZE", "1G")]);
    assert_refused(&out, &["LEGO_CACHE_SIZE", "2G", "LEGO_HEAP_SIZE"]);
}

/// The log's settings without a log directory tune nothing: refused, naming both variables.
#[test]
fn log_settings_without_a_log_dir_are_refused() {
    let out = hello_with(&[("LEGO_FLUSH_MS", "200")]);
    assert_refused(&out, &["LEGO_FLUSH_MS", "LEGO_LOG_DIR"]);
    let out = hello_with(&[("LEGO_LOG_DIR", "/tmp/x"), ("LEGO_SYNC", "sometimes")]);
    assert_refused(&out, &["LEGO_SYNC", "sometimes", "fdatasync"]);
}

/// A restore image that is not one stops the program before main, naming the variable.
#[test]
fn restore_from_a_file_that_is_not_an_image_is_refused() {
    let dir = TempDir::new("notimage");
    let path = dir.path().join("heap.img");
    std::fs::write(&path, b"this is not a heap image").expect("write");
    let out = hello_with(&[("LEGO_RESTORE", path.to_str().expect("utf-8"))]);
    assert_eq!(out.code, Some(3), "{out}");
    assert!(!out.stdout.contains("main ran"), "{out}");
    assert!(
        out.stderr.contains("LEGO_RESTORE") && out.stderr.contains("not a lego heap image"),
        "{out}"
    );
}

#[test]
fn unknown_backend() {
    let out = hello_with(&[("LEGO_BACKEND", "redis:x")]);
    assert_refused(&out, &["LEGO_BACKEND", "redis:x"]);
}

/// Every other setting rejects garbage the same way.
#[test]
fn every_setting_rejects_garbage() {
    let cases: &[(&str, &str)] = &[
        ("LEGO_CACHE_SIZE", "0"),
        ("LEGO_CACHE_SIZE", "250%"),
        ("LEGO_CACHE_SIZE", "12Q"),
        ("LEGO_HEAP_SIZE", "lots"),
        ("LEGO_BACKEND", "file:relative/dir"),
        ("LEGO_STATS", "yes"),
        ("LEGO_LOG_LEVEL", "loud"),
        ("LEGO_HANDLER_THREADS", "many"),
        ("LEGO_FAULT_INJECT", "bogus"),
        ("LEGO_MMAP", "2"),
        ("LEGO_MMAP", "maybe"),
        ("LEGO_MMAP_MIN", "100"),
        ("LEGO_MMAP_MIN", "huge"),
    ];
    for &(var, value) in cases {
        let out = hello_with(&[(var, value)]);
        assert_refused(&out, &[var, value]);
    }
}

/// An empty value is the same as unset: the program runs with the defaults.
#[test]
fn empty_values_mean_unset() {
    let vars = [
        "LEGO_CACHE_SIZE",
        "LEGO_HEAP_SIZE",
        "LEGO_BACKEND",
        "LEGO_STATS",
        "LEGO_LOG_LEVEL",
        "LEGO_HANDLER_THREADS",
        "LEGO_FAULT_INJECT",
    ];
    for var in vars {
        let out = hello_with(&[(var, "")]);
        out.assert_success();
        assert_eq!(
            out.stdout, "main ran\nheap works\n",
            "{var}= (empty):\n{out}"
        );
    }
    let all: Vec<(&str, &str)> = vars.iter().map(|v| (*v, "")).collect();
    let out = hello_with(&all);
    out.assert_success();
    assert_eq!(out.stdout, "main ran\nheap works\n", "all empty:\n{out}");
}

/// Good settings of every kind are accepted.
#[test]
fn good_settings_run() {
    let dir = TempDir::new("settings-store");
    let backend = dir.backend();
    let out = hello_with(&[
        ("LEGO_CACHE_SIZE", "64M"),
        ("LEGO_HEAP_SIZE", "4G"),
        ("LEGO_BACKEND", &backend),
        ("LEGO_STATS", "0"),
        ("LEGO_LOG_LEVEL", "off"),
        ("LEGO_HANDLER_THREADS", "2"),
    ]);
    out.assert_success();
    assert_eq!(out.stdout, "main ran\nheap works\n", "{out}");
    let out = hello_with(&[("LEGO_CACHE_SIZE", "5%")]);
    out.assert_success();
    assert_eq!(out.stdout, "main ran\nheap works\n", "{out}");
}

#[test]
fn stats_summary_on_stderr() {
    let out = hello_with(&[("LEGO_STATS", "1"), ("LEGO_CACHE_SIZE", "64M")]);
    out.assert_success();
    assert_eq!(out.stdout, "main ran\nheap works\n", "{out}");
    assert!(
        out.stderr.contains("lego: stats"),
        "LEGO_STATS=1 printed no summary:\n{out}"
    );
}

/// The exit status of the program passes through the shim untouched.
#[test]
fn exit_status_passes_through() {
    let out = Run::new(program("hello")).args(["7"]).shim().run();
    assert_eq!(out.code, Some(7), "{out}");
    assert_eq!(out.stdout, "main ran\nheap works\n", "{out}");
}

/// A heap above the largest accepted is refused before main, naming the variable, the value
/// and the largest value accepted; the largest itself runs.
#[test]
fn heap_size_above_the_largest_is_refused() {
    for value in ["9T", "8796093026304", "64T"] {
        let out = hello_with(&[("LEGO_HEAP_SIZE", value)]);
        assert_refused(&out, &["LEGO_HEAP_SIZE", value, HEAP_SIZE_MAX]);
    }
    let out = hello_with(&[("LEGO_HEAP_SIZE", "8T")]);
    out.assert_success();
    assert_eq!(out.stdout, "main ran\nheap works\n", "{out}");
}

/// `heap_mixed` (64 MiB of heap in a 16 MiB cache, so it evicts and fetches) with heaps of
/// 64 GiB, 1 TiB and 4 TiB: the same output, and the terabyte heaps' peak RSS within a few MiB
/// of the 64 GiB one's (nothing per heap page is allocated up front).
#[test]
fn terabyte_heaps_run_and_cost_only_what_they_use() {
    const CACHE_MIB: u64 = 16;
    let _serial = heavy();
    let bin = program("heap_mixed");
    let args = ["64", "3"];
    let native = Run::new(&bin).args(args).run();
    native.assert_success();
    let mut rss = Vec::new();
    for (heap, bytes) in [("64G", 64u64 << 30), ("1T", 1 << 40), ("4T", 4 << 40)] {
        let setup = ShimSetup::new(&format!("heap-{heap}"), CACHE_MIB);
        let out = setup
            .apply(Run::new(&bin).args(args))
            .env("LEGO_HEAP_SIZE", heap)
            .label(format!("[shim] heap_mixed 64 3 with LEGO_HEAP_SIZE={heap}"))
            .run();
        assert_same_output(&native, &out);
        let stats = setup.stats();
        stats.assert_oversubscribed(CACHE_MIB);
        assert_eq!(stats.region_len, bytes, "{}", stats.raw);
        eprintln!(
            "LEGO_HEAP_SIZE={heap}: peak RSS {} KiB, evicted {} fetched {} pages, heap top {} MiB",
            out.rss_kib(),
            stats.pages_evicted,
            stats.pages_fetched,
            stats.heap_top_bytes / MIB
        );
        rss.push((heap, out.rss_kib()));
    }
    let (_, base) = rss[0];
    for &(heap, kib) in &rss[1..] {
        assert!(
            kib <= base + LARGE_HEAP_EXTRA_RSS_KIB,
            "LEGO_HEAP_SIZE={heap} peaked at {kib} KiB, more than {LARGE_HEAP_EXTRA_RSS_KIB} KiB \
             over the {base} KiB of LEGO_HEAP_SIZE=64G"
        );
    }
}

/// A key file that cannot be used stops the program before main, with status 2 and one line
/// naming `LEGO_KEY_FILE`, the file and what is wrong with it (and never a byte of a key).
#[test]
fn a_bad_key_file_is_refused_before_main() {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = TempDir::new("key-file");
    let write = |name: &str, bytes: &[u8], mode: u32| {
        let path = dir.path().join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .expect("creating a key file");
        f.write_all(bytes).expect("writing a key file");
        // The mode asked for, whatever the umask.
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .expect("chmod");
        path.display().to_string()
    };
    let missing = dir.path().join("absent.key").display().to_string();
    let short = write("short.key", &[7u8; 16], 0o600);
    let open_to_all = write("shared.key", &[7u8; 32], 0o644);
    let a_dir = dir.path().join("key.d");
    std::fs::create_dir(&a_dir).expect("a directory");
    let a_dir = a_dir.display().to_string();
    // No server is needed: the key is checked before anything connects.
    let backend = ("LEGO_BACKEND", "memcached://127.0.0.1:1");
    for (path, says) in [
        (&missing, "cannot open"),
        (&short, "16 bytes long"),
        (&open_to_all, "others can read it"),
        (&a_dir, "not a regular file"),
    ] {
        let out = hello_with(&[backend, ("LEGO_KEY_FILE", path)]);
        assert_refused(&out, &["LEGO_KEY_FILE", path, says]);
    }
    // A key file without a pool seals nothing: refused too.
    let good = write("good.key", &[9u8; 32], 0o600);
    let out = hello_with(&[("LEGO_KEY_FILE", &good)]);
    assert_refused(&out, &["LEGO_KEY_FILE"]);
}
