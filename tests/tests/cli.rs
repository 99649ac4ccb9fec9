//! The `lego` command: `lego run [--cache SIZE] [--backend URL] -- PROG ARGS...` runs PROG
//! under the shim with the exit status passed through; misuse is a usage error. `lego pool`
//! and `lego pool gc` against real memcached servers (and a port where nothing listens).

use lego_tests::memcached::Memcached;
use lego_tests::{
    assert_rss_within_cache, assert_same_output, free_port, heavy, lego_bin, program, shim_lib,
    Run, TempDir,
};

#[test]
fn run_pages_a_program_through_a_small_cache() {
    let _serial = heavy();
    let bin = program("heap_mixed");
    let args = ["256", "3"];
    let native = Run::new(&bin).args(args).measure_rss().run();
    let store = TempDir::new("cli-store");
    let backend = store.backend();
    let shimmed = Run::new(lego_bin())
        .args(["run", "--cache", "48M", "--backend", &backend, "--"])
        .args([bin.as_os_str()])
        .args(args)
        .measure_rss()
        .label("lego run")
        .run();
    // `lego run` must have preloaded the sibling library: it is found next to the binary.
    assert!(shim_lib().is_file());
    assert_same_output(&native, &shimmed);
    assert_rss_within_cache(&shimmed, 48, Some(&native));
}

#[test]
fn run_passes_the_exit_status_through() {
    let out = Run::new(lego_bin())
        .args(["run", "--cache", "64M", "--"])
        .args([program("hello").as_os_str()])
        .args(["5"])
        .run();
    assert_eq!(out.code, Some(5), "{out}");
    assert_eq!(out.stdout, "main ran\nheap works\n", "{out}");
}

#[test]
fn run_sets_stats_for_the_program() {
    let out = Run::new(lego_bin())
        .args(["run", "--cache", "64M", "--"])
        .args([program("hello").as_os_str()])
        .env("LEGO_STATS", "1")
        .run();
    out.assert_success();
    assert!(
        out.stderr.contains("lego: stats"),
        "the program did not run under the shim:\n{out}"
    );
}

#[test]
fn run_without_a_program_is_a_usage_error() {
    for args in [
        &["run"][..],
        &["run", "--"][..],
        &["run", "--cache", "48M"][..],
    ] {
        let out = Run::new(lego_bin()).args(args).run();
        assert!(
            out.code.is_some_and(|c| c != 0),
            "lego {args:?} must fail:\n{out}"
        );
        assert!(
            out.stderr.to_lowercase().contains("usage"),
            "lego {args:?} must print a usage message on stderr:\n{out}"
        );
        assert!(!out.stdout.contains("main ran"), "{out}");
    }
}

#[test]
fn run_with_a_bad_cache_size_fails_clearly() {
    let out = Run::new(lego_bin())
        .args(["run", "--cache", "banana", "--"])
        .args([program("hello").as_os_str()])
        .run();
    assert!(out.code.is_some_and(|c| c != 0), "{out}");
    assert!(
        !out.stdout.contains("main ran"),
        "main ran with a bad cache size:\n{out}"
    );
    assert!(
        out.stderr.contains("banana"),
        "the error must name the bad value:\n{out}"
    );
}

/// `lego replay --checkpoint` recovers the newest program checkpoint of a log (written here
/// with the library's writer), `--strict` refuses a damaged log with exit status 2, `lego
/// inspect` lists the program checkpoints, and `scripts/replay.sh` passes the options through.
#[test]
fn replay_checkpoint_strict_and_inspect_of_program_checkpoints() {
    use lego_runtime::log::{EpochOrigin, EpochPage, LogWriter, RegionInfo, WriterOptions};
    use std::process::Command;

    let dir = TempDir::new("cli-program-checkpoint");
    let log = dir.path().join("heap");
    let image = dir.path().join("heap.img");
    let region = RegionInfo {
        base: 0x7c40_0000_0000,
        len: 8 * 4096,
    };
    let mut w = LogWriter::create(&log, region, WriterOptions::default()).expect("creating");
    for (n, origin) in [
        (1u8, EpochOrigin::Automatic),
        (2, EpochOrigin::Program),
        (3, EpochOrigin::Automatic),
    ] {
        let data = vec![n; 4096];
        w.append_epoch_as(
            origin,
            &[EpochPage {
                page: 1,
                data: Some(&data),
            }],
        )
        .expect("appending");
    }
    drop(w);
    let lego = |args: &[&str]| {
        let out = Command::new(lego_bin())
            .args(args)
            .output()
            .expect("running lego");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code(), text)
    };
    let log_s = log.to_str().expect("a UTF-8 path");
    let image_s = image.to_str().expect("a UTF-8 path");

    let (code, text) = lego(&["replay", log_s, "-o", image_s, "--checkpoint"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("recovered program checkpoint epoch 2"),
        "{text}"
    );
    let bytes = std::fs::read(&image).expect("the image");
    assert!(
        bytes[2 * 4096..3 * 4096].iter().all(|&b| b == 2),
        "epoch 2's page"
    );

    let (code, text) = lego(&[
        "replay",
        log_s,
        "-o",
        image_s,
        "--checkpoint",
        "--epoch",
        "3",
    ]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("cannot be used with"), "{text}");

    let (code, text) = lego(&["inspect", log_s]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("program checkpoints (lego_checkpoint): 2")
            && text.contains("--checkpoint would recover program checkpoint epoch 2"),
        "{text}"
    );

    let out = Command::new("bash")
        .arg(lego_tests::repo_root().join("scripts/replay.sh"))
        .args([log_s, image_s, "--checkpoint", "--strict"])
        .output()
        .expect("running scripts/replay.sh");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("recovered program checkpoint epoch 2")
            && text.contains("continues from epoch 2"),
        "{text}"
    );

    // A torn tail: the default recovers epoch 2, --strict refuses and writes nothing.
    let seg = log.join("seg-000001.lego");
    let len = std::fs::metadata(&seg).expect("stat").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .and_then(|f| f.set_len(len - 1))
        .expect("cutting the segment");
    std::fs::remove_file(&image).expect("removing the image");
    let (code, text) = lego(&["replay", log_s, "-o", image_s, "--strict"]);
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("--strict") && text.contains("seg-000001.lego from offset"),
        "{text}"
    );
    assert!(!image.exists(), "--strict writes no image");
    let (code, text) = lego(&["replay", log_s, "-o", image_s]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("recovered program checkpoint epoch 2"),
        "{text}"
    );
}

/// Stores `key` on `server` with a page-sized value, expiring after `ttl_s` (0: never).
fn set(server: &Memcached, key: &str, ttl_s: u32) {
    let value = vec![b'x'; 4104];
    let mut request = format!("set {key} 0 {ttl_s} {}\r\n", value.len()).into_bytes();
    request.extend_from_slice(&value);
    request.extend_from_slice(b"\r\n");
    assert_eq!(server.talk(&request, "\r\n"), "STORED\r\n", "storing {key}");
}

/// Whether `server` holds `key`.
fn has(server: &Memcached, key: &str) -> bool {
    server
        .talk(format!("get {key}\r\n").as_bytes(), "END\r\n")
        .starts_with("VALUE")
}

/// A live heap (its lease, as a running lego holds it, and two pages), an orphaned heap
/// (three pages, no lease: a process killed with SIGKILL whose lease expired) and another
/// program's key, written with raw connections.
const LIVE: &str = "lego:00000000000a11fe";
const ORPHAN: &str = "lego:00000000000dead0";
const FOREIGN: &str = "session:42";

fn fill(server: &Memcached) {
    set(server, &format!("{LIVE}:lease"), 60);
    for page in ["0", "1"] {
        set(server, &format!("{LIVE}:{page}"), 0);
    }
    for page in ["0", "1", "2f"] {
        set(server, &format!("{ORPHAN}:{page}"), 0);
    }
    set(server, FOREIGN, 0);
}

/// `lego pool` prints one line per server, the one that answered with what lego holds there
/// by heap and the one where nothing listens as down, and a closing line; it exits 1 then,
/// and 0 when every server answered; `--heaps` lists the heaps.
#[test]
fn pool_describes_servers_up_and_down() {
    let server = Memcached::start(16);
    fill(&server);
    let nobody = format!("127.0.0.1:{}", free_port());
    let url = format!("memcached://{},{nobody}", server.addr);

    let out = Run::new(lego_bin()).args(["pool", &url]).run();
    assert_eq!(out.code, Some(1), "{out}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    let up = lines[0];
    assert!(
        up.starts_with(&format!("{} up: memcached 1.6", server.addr))
            && up.contains(", -M, memory ")
            && up.contains("1 live heap (3 items")
            && up.contains("1 orphaned heap (3 items")
            && up.contains("other items: 1 ("),
        "{out}"
    );
    assert!(
        lines[1].starts_with(&format!("{nobody} down: ")) && lines[1].contains("refused"),
        "{out}"
    );
    assert!(
        lines[2].starts_with("pool: 2 servers, 1 up, 1 down; lego holds 6 items")
            && lines[2].contains("of 2 heaps, 1 live")
            && lines[2].contains("orphaned: 3 items"),
        "{out}"
    );
    assert!(
        out.stderr
            .contains(&format!("1 of 2 servers did not answer: {nobody}")),
        "{out}"
    );

    let out = Run::new(lego_bin())
        .args(["pool", "--heaps", &format!("memcached://{}", server.addr)])
        .run();
    assert_eq!(out.code, Some(0), "{out}");
    assert!(
        out.stdout.contains("  heap 00000000000a11fe live")
            && out.stdout.contains("lease ")
            && out
                .stdout
                .contains("  heap 00000000000dead0 orphaned: 3 items"),
        "{out}"
    );
    // Looking changes nothing.
    assert!(has(&server, &format!("{ORPHAN}:2f")) && has(&server, FOREIGN));
}

/// `lego pool gc` deletes the orphaned heap's pages and nothing else, says what it freed,
/// still collects when another server is down (exit 1), and frees nothing the second time.
#[test]
fn pool_gc_frees_an_orphaned_heap() {
    let server = Memcached::start(16);
    fill(&server);
    let nobody = format!("127.0.0.1:{}", free_port());
    let out = Run::new(lego_bin())
        .args([
            "pool",
            "gc",
            &format!("memcached://{nobody},{}", server.addr),
        ])
        .run();
    assert_eq!(out.code, Some(1), "{out}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0].starts_with(&format!("{nobody} down: ")), "{out}");
    assert!(
        lines[1].starts_with(&format!(
            "{}: 2 heaps (1 live), 1 collected: 3 keys deleted, ",
            server.addr
        )) && lines[1].contains("KiB freed"),
        "{out}"
    );
    assert!(
        lines[2].starts_with("gc: 2 servers, 1 failed; 3 keys deleted"),
        "{out}"
    );
    for page in ["0", "1", "2f"] {
        assert!(!has(&server, &format!("{ORPHAN}:{page}")), "{out}");
    }
    for key in [
        format!("{LIVE}:lease"),
        format!("{LIVE}:0"),
        format!("{LIVE}:1"),
        FOREIGN.to_owned(),
    ] {
        assert!(has(&server, &key), "{key} must be kept:\n{out}");
    }

    let url = format!("memcached://{}", server.addr);
    let out = Run::new(lego_bin()).args(["pool", "gc", &url]).run();
    assert_eq!(out.code, Some(0), "{out}");
    assert!(
        out.stdout
            .contains("1 heap (1 live), 0 collected: 0 keys deleted, 0 B freed"),
        "{out}"
    );
    let out = Run::new(lego_bin()).args(["pool", &url]).run();
    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("nothing orphaned"), "{out}");
}

#[test]
fn pool_usage_errors_exit_2() {
    for args in [
        &["pool"][..],
        &["pool", "gc"][..],
        &["pool", "file:/tmp"][..],
        &["pool", "memcached://127.0.0.1"][..],
        &["pool", "--bogus", "memcached://127.0.0.1:1"][..],
    ] {
        let out = Run::new(lego_bin()).args(args).run();
        assert_eq!(out.code, Some(2), "lego {args:?}:\n{out}");
        assert!(out.stderr.to_lowercase().contains("usage: lego"), "{out}");
    }
}

#[test]
fn help_and_version_answer_everywhere() {
    let lego = |args: &[&str]| Run::new(lego_bin()).args(args).run();
    let top = lego(&["--help"]);
    assert_eq!(top.code, Some(0), "{top}");
    assert!(top.stdout.contains("Usage: lego <COMMAND>"), "{top}");
    let commands = [
        "run",
        "replay",
        "inspect",
        "pool",
        "stats",
        "top",
        "completions",
    ];
    for c in commands {
        assert!(
            top.stdout.contains(&format!("  {c} ")),
            "lego --help lists {c}:\n{top}"
        );
        for args in [&[c, "--help"][..], &["help", c][..]] {
            let out = lego(args);
            assert_eq!(out.code, Some(0), "lego {args:?}:\n{out}");
            assert!(
                out.stdout.contains(&format!("Usage: lego {c}")),
                "lego {args:?}:\n{out}"
            );
            assert!(out.stderr.is_empty(), "lego {args:?}:\n{out}");
        }
    }
    let pool_gc = lego(&["pool", "gc", "--help"]);
    assert_eq!(pool_gc.code, Some(0), "{pool_gc}");
    assert!(pool_gc.stdout.contains("--heap <ID>"), "{pool_gc}");
    for args in [&["--version"][..], &["-V"][..]] {
        let out = lego(args);
        assert_eq!(out.code, Some(0), "lego {args:?}:\n{out}");
        let line = out.stdout.trim();
        assert!(
            line.starts_with("lego ") && line.contains(" (commit ") && !line.contains("(commit )"),
            "lego {args:?} names the version and the commit:\n{out}"
        );
    }
    for (args, says) in [
        (&["--bogus"][..], "unexpected argument '--bogus'"),
        (&["nosuch"][..], "unrecognized subcommand 'nosuch'"),
        (&["top", "--bogus"][..], "unexpected argument '--bogus'"),
        (&["stats", "twelve"][..], "invalid value 'twelve'"),
        (
            &["replay", "logs", "-o", "x", "--epoch", "0"][..],
            "--epoch <N>",
        ),
        (&[][..], "Usage: lego <COMMAND>"),
    ] {
        let out = lego(args);
        assert_eq!(out.code, Some(2), "lego {args:?}:\n{out}");
        assert!(
            out.stderr.contains(says),
            "lego {args:?} says {says:?}:\n{out}"
        );
        assert!(
            out.stderr.contains("Usage: lego") || out.stderr.contains("try '--help'"),
            "lego {args:?} gives the usage or the way to it:\n{out}"
        );
        assert!(out.stdout.is_empty(), "lego {args:?}:\n{out}");
    }
}

#[test]
fn shell_completions_are_printed_on_request() {
    let bash = Run::new(lego_bin()).args(["completions", "bash"]).run();
    assert_eq!(bash.code, Some(0), "{bash}");
    assert!(
        bash.stdout.contains("complete -F") && bash.stdout.contains("replay"),
        "{bash}"
    );
    let dir = TempDir::new("completions");
    let script = dir.path().join("lego.bash");
    std::fs::write(&script, &bash.stdout).expect("write");
    let check = Run::new("/bin/bash")
        .args([std::ffi::OsStr::new("-n"), script.as_os_str()])
        .run();
    assert_eq!(check.code, Some(0), "bash -n accepts the script:\n{check}");
    let zsh = Run::new(lego_bin()).args(["completions", "zsh"]).run();
    assert_eq!(zsh.code, Some(0), "{zsh}");
    assert!(zsh.stdout.starts_with("#compdef lego"), "{zsh}");
    let bad = Run::new(lego_bin()).args(["completions", "tcsh"]).run();
    assert_eq!(bad.code, Some(2), "{bad}");
}
