//! The `lego` command: `lego run [--cache SIZE] [--backend URL] -- PROG ARGS...` runs PROG
//! under the shim with the exit status passed through; misuse is a usage error.

use lego_tests::{
    assert_rss_within_cache, assert_same_output, heavy, lego_bin, program, shim_lib, Run, TempDir,
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
    assert!(text.contains("give one of them"), "{text}");

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
