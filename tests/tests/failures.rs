//! Failures on purpose: no permission to use userfaultfd, a store that cannot give a page
//! back (SIGBUS, never wrong data), a store that cannot take pages (ENOSPC).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use lego_tests::{heavy, program, shim_lib, Outcome, Run, ShimSetup, Stats, TempDir};

/// Exit status when userfaultfd is not permitted.
const EXIT_NO_PERMISSION: i32 = 3;

/// The unprivileged user the permission test runs as (nobody).
const NOBODY_ID: &str = "65534";

/// True if stderr contains `0x` followed by at least one hex digit (a page address).
fn has_hex_address(text: &str) -> bool {
    text.match_indices("0x").any(|(i, _)| {
        text[i + 2..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_hexdigit())
    })
}

fn copy_executable(from: &Path, to_dir: &Path) -> std::path::PathBuf {
    let to = to_dir.join(from.file_name().expect("a file name"));
    fs::copy(from, &to)
        .unwrap_or_else(|e| panic!("cannot copy {} to {}: {e}", from.display(), to.display()));
    fs::set_permissions(&to, fs::Permissions::from_mode(0o755))
        .expect("chmod 755 on a file we own");
    to
}

/// As a user without CAP_SYS_PTRACE, with `vm.unprivileged_userfaultfd=0` and
/// `/dev/userfaultfd` closed to others, the shim cannot register its region: it must say
/// so, with every way out, and exit 3 before main.
#[test]
fn no_userfaultfd_permission() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: switching to an unprivileged user needs root");
        return;
    }
    let sysctl = fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd").unwrap_or_default();
    assert_eq!(
        sysctl.trim(),
        "0",
        "this test needs vm.unprivileged_userfaultfd=0 (the Linux default): with 1 an \
         unprivileged user may use userfaultfd and there is nothing to refuse"
    );
    if let Ok(meta) = fs::metadata("/dev/userfaultfd") {
        assert_eq!(
            meta.permissions().mode() & 0o006,
            0,
            "this test needs /dev/userfaultfd closed to other users (mode 0600)"
        );
    }
    // The unprivileged user must be able to read the library and run the program.
    let dir = TempDir::new_in(Path::new("/tmp"), "noperm");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
        .expect("chmod 755 on our dir");
    let lib = copy_executable(&shim_lib(), dir.path());
    let hello = copy_executable(&program("hello"), dir.path());
    let store = TempDir::new_in(Path::new("/tmp"), "noperm-store");
    store.open_to_all();
    let out = Run::new(&hello)
        .shim_at(&lib)
        .env("LEGO_BACKEND", store.backend())
        .env("LEGO_CACHE_SIZE", "64M")
        .wrapped([
            "setpriv",
            &format!("--reuid={NOBODY_ID}"),
            &format!("--regid={NOBODY_ID}"),
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .run();
    assert!(
        !out.stdout.contains("main ran"),
        "main ran without userfaultfd permission:\n{out}"
    );
    assert_eq!(
        out.code,
        Some(EXIT_NO_PERMISSION),
        "expected exit status 3:\n{out}"
    );
    let lines = out.lego_lines();
    assert_eq!(
        lines.len(),
        1,
        "expected one 'lego: ' line on stderr:\n{out}"
    );
    for needed in [
        "CAP_SYS_PTRACE",
        "vm.unprivileged_userfaultfd",
        "/dev/userfaultfd",
    ] {
        assert!(
            lines[0].contains(needed),
            "the message must mention {needed}:\n{out}"
        );
    }
}

/// Runs `sigbus_fetch 128` with a 32 MiB cache and the given fault plan; returns the
/// outcome and the stats, if the run lived to write them.
fn run_with_fault(plan: &str) -> (Outcome, Option<Stats>) {
    run_with_fault_env(plan, &[])
}

/// [`run_with_fault`] with more variables set.
fn run_with_fault_env(plan: &str, env: &[(&str, &str)]) -> (Outcome, Option<Stats>) {
    let setup = ShimSetup::new("fault", 32);
    let mut run = setup
        .apply(Run::new(program("sigbus_fetch")).args(["128"]))
        .env("LEGO_FAULT_INJECT", plan)
        .hang_after(300);
    for &(k, v) in env {
        run = run.env(k, v);
    }
    let out = run.run();
    let stats = setup.stats_path().is_file().then(|| setup.stats());
    (out, stats)
}

/// A page that cannot be fetched kills the faulting thread with SIGBUS and a message that
/// names the page; the program never sees wrong data.
#[test]
fn failed_fetch_is_sigbus_not_wrong_data() {
    let _serial = heavy();
    for plan in ["fetch:eio:after=0", "fetch:eio:after=3000"] {
        let (out, _) = run_with_fault(plan);
        assert!(
            !out.stdout.contains("WRONG DATA"),
            "{plan}: the program read wrong data:\n{out}"
        );
        assert!(
            !out.stdout.contains("all checks passed"),
            "{plan}: evicted pages could not be fetched, yet the program completed:\n{out}"
        );
        assert_eq!(
            out.signal,
            Some(libc::SIGBUS),
            "{plan}: expected death by SIGBUS (7):\n{out}"
        );
        assert!(
            out.stderr.contains("lego: ") && out.stderr.contains("SIGBUS"),
            "{plan}: stderr must explain the SIGBUS in a 'lego: ' line:\n{out}"
        );
        assert!(
            has_hex_address(&out.stderr),
            "{plan}: stderr must name the page address in hex:\n{out}"
        );
    }
}

/// A fetch that fails once (a dropped packet, a store that hiccups: `...:once`) is tried
/// again and served, a copy handed back changed once is read again, and a write-back batch
/// that fails once is put back and written later: the program completes with every byte right,
/// no page is poisoned, and the stats count the failure.
#[test]
fn transient_store_failures_are_retried_and_served() {
    let _serial = heavy();
    let native = Run::new(program("sigbus_fetch")).args(["128"]).run();
    native.assert_success();
    for plan in [
        "fetch:eio:after=0:once",
        "fetch:eio:after=3000:once",
        "fetch:corrupt:after=100:once",
        // A write-back batch that fails on one page while the others reach the store: the
        // batch is put back, its copies forgotten, and written again later.
        "store:eio:after=3000:once",
    ] {
        let (out, stats) = run_with_fault(plan);
        assert!(!out.stdout.contains("WRONG DATA"), "{plan}: {out}");
        out.assert_success();
        assert_eq!(out.stdout, native.stdout, "{plan}: {out}");
        let stats = stats.unwrap_or_else(|| panic!("{plan}: no stats were written:\n{out}"));
        assert_eq!(
            stats.number("pages_poisoned"),
            Some(0),
            "{plan}: {}",
            stats.raw
        );
        let counter = if plan.starts_with("store") {
            "store_errors"
        } else {
            "fetch_errors"
        };
        assert!(
            stats.number(counter).is_some_and(|n| n >= 1),
            "{plan}: the injected failure never happened:\n{}",
            stats.raw
        );
    }
}

/// The same after an epoch has run over the evicted pages (`epoch_readback ... touch`, with a
/// durable heap): the epoch's `PAGEMAP_SCAN` leaves write-protect markers on missing pages,
/// which `UFFDIO_POISON` refused with `EEXIST`, so the faulting thread faulted again forever
/// instead of getting SIGBUS (found while writing the epoch read-back test).
#[test]
fn failed_fetch_after_an_epoch_is_sigbus_not_a_hang() {
    let _serial = heavy();
    for plan in ["fetch:eio:after=256", "fetch:corrupt:after=256"] {
        let log = TempDir::new("fault-log");
        let setup = ShimSetup::new("fault-epoch", 16);
        let out = setup
            .apply(Run::new(program("epoch_readback")).args(["run", "64", "touch"]))
            .env("LEGO_LOG_DIR", log.path().join("log"))
            .env("LEGO_FLUSH_MS", "manual")
            .env("LEGO_FAULT_INJECT", plan)
            .hang_after(120)
            .run();
        assert!(
            !out.hung,
            "{plan}: the faulting thread never got SIGBUS:\n{out}"
        );
        assert!(!out.stdout.contains("WRONG DATA"), "{plan}: {out}");
        assert!(!out.stdout.contains("block ok"), "{plan}: {out}");
        assert_eq!(out.signal, Some(libc::SIGBUS), "{plan}: {out}");
        assert!(out.stderr.contains("lego: SIGBUS"), "{plan}: {out}");
    }
}

/// A store that runs out of space must not cost data: the program either completes with
/// the right output (pages stay resident when write-back fails) or stops with a clear
/// `lego: ` message.
#[test]
fn store_out_of_space_never_gives_wrong_data() {
    let _serial = heavy();
    let native = Run::new(program("sigbus_fetch")).args(["128"]).run();
    native.assert_success();
    for plan in ["store:enospc:after=0", "store:enospc:after=5000"] {
        let (out, stats) = run_with_fault(plan);
        assert!(
            !out.stdout.contains("WRONG DATA"),
            "{plan}: the program read wrong data:\n{out}"
        );
        if out.code == Some(0) {
            assert_eq!(
                out.stdout, native.stdout,
                "{plan}: completed with different output:\n{out}"
            );
            // Completing proves nothing unless writes to the store really failed.
            let stats = stats
                .as_ref()
                .unwrap_or_else(|| panic!("{plan}: no stats file after a clean exit:\n{out}"));
            assert!(
                stats.number("store_errors").is_some_and(|n| n > 0),
                "{plan}: the injected ENOSPC never happened (store_errors is not > 0):\n{}",
                stats.raw
            );
        } else {
            assert!(
                !out.lego_lines().is_empty(),
                "{plan}: the program failed without a 'lego: ' message saying why:\n{out}"
            );
        }
        eprintln!(
            "{plan}: exit {:?} signal {:?}, store_errors {:?}; stderr: {}",
            out.code,
            out.signal,
            stats.as_ref().and_then(|s| s.number("store_errors")),
            out.stderr.trim()
        );
    }
}

#[test]
fn hex_address_detection() {
    assert!(has_hex_address("lego: SIGBUS at page 0x7f12a000"));
    assert!(!has_hex_address("lego: 0x"));
    assert!(!has_hex_address("no address"));
}

/// A failed write-back while the program hands pages back (`REMOVE` events waiting to be read)
/// must put every page back: the program completes with every byte it wrote. Before the fix
/// the evictor's put-back ignored `EAGAIN` from `UFFDIO_COPY`, marked the page resident, and
/// the next touch read zeros (the program crashed on its own zeroed pointers).
#[test]
fn failed_write_back_puts_pages_back_while_events_wait() {
    let _serial = heavy();
    let native = Run::new(program("writeback_race")).args(["96", "8"]).run();
    native.assert_success();
    let setup = ShimSetup::new("writeback-race", 16);
    let out = setup
        .apply(Run::new(program("writeback_race")).args(["96", "8"]))
        .env("LEGO_FAULT_INJECT", "store:eio:after=0")
        .run();
    assert!(!out.stdout.contains("WRONG DATA"), "{out}");
    out.assert_success();
    assert_eq!(out.stdout, native.stdout, "{out}");
    let stats = setup.stats();
    assert!(
        stats.number("store_errors").is_some_and(|n| n > 0),
        "the injected write-back failures never happened:\n{}",
        stats.raw
    );
    assert!(
        stats.number("events_remove").is_some_and(|n| n > 0),
        "the program's madvise calls must reach lego as REMOVE events:\n{}",
        stats.raw
    );
}

/// A store that hands back a changed page (`fetch:corrupt`): the faulting thread gets SIGBUS
/// with a message naming the page and the failed check, never the changed bytes.
#[test]
fn corrupt_store_copy_is_sigbus_not_wrong_data() {
    let _serial = heavy();
    for plan in ["fetch:corrupt:after=0", "fetch:corrupt:after=3000"] {
        let (out, _) = run_with_fault(plan);
        assert!(
            !out.stdout.contains("WRONG DATA"),
            "{plan}: the program read the corrupted bytes:\n{out}"
        );
        assert_eq!(out.signal, Some(libc::SIGBUS), "{plan}: {out}");
        assert!(
            out.stderr.contains("lego: SIGBUS") && out.stderr.contains("CRC32C"),
            "{plan}: stderr must say the copy failed its check:\n{out}"
        );
        assert!(has_hex_address(&out.stderr), "{plan}: {out}");
    }
}

/// A panic inside the shim with the internal heap's locks held (`LEGO_FAULT_INJECT=panic:fork`
/// panics inside `fork()` after taking them) ends the process at once with one `lego:` line
/// and SIGABRT. The default panic hook allocated, and so hung on those locks.
#[test]
fn a_panic_in_the_shim_aborts_with_one_line() {
    let _serial = heavy();
    let setup = ShimSetup::new("panic", 24);
    let out = setup
        .apply(Run::new(program("fork_evicted")))
        .env("LEGO_FAULT_INJECT", "panic:fork")
        .hang_after(60)
        .run();
    assert!(!out.hung, "the panic hung instead of aborting:\n{out}");
    assert_eq!(out.signal, Some(libc::SIGABRT), "{out}");
    let lines = out.lego_lines();
    assert_eq!(lines.len(), 1, "exactly one lego line:\n{out}");
    assert!(
        lines[0].starts_with("lego: internal error, aborting: ")
            && lines[0].contains("injected panic inside fork()"),
        "{out}"
    );
}
