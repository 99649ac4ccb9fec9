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
