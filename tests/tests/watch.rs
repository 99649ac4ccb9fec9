//! Watching a running program: its statistics published while it runs (`lego stats`), the
//! metrics endpoint (`LEGO_METRICS`), and `lego top` in a real terminal (tmux). Each test
//! gives the program a runtime directory of its own (`XDG_RUNTIME_DIR`).

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lego_runtime::watch::metrics::parse_exposition;
use lego_tests::{heavy, lego_bin, program, Live, Outcome, Run, TempDir};

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("stat").permissions().mode() & 0o7777
}

/// The pid whose statistics file appears in `dir`, waiting for it.
fn published_pid(dir: &Path) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_suffix(".json").and_then(|p| p.parse().ok()) {
                    return pid;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "nothing published in {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn lego(runtime_dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(lego_bin())
        .args(args)
        .env("XDG_RUNTIME_DIR", runtime_dir)
        .output()
        .expect("lego runs")
}

fn stats_json(runtime_dir: &Path, pid: u32) -> serde_json::Value {
    let out = lego(runtime_dir, &["stats", &pid.to_string(), "--json"]);
    assert!(
        out.status.success(),
        "lego stats: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("lego stats --json prints one JSON object")
}

fn scrape(socket: &Path) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connect");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: lego\r\n\r\n")
        .expect("send");
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("read");
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body.to_string()
}

fn sample(samples: &[(String, f64)], series: &str) -> f64 {
    samples
        .iter()
        .find(|(s, _)| s == series)
        .unwrap_or_else(|| panic!("{series} is not exported"))
        .1
}

/// heap_sweeps over a heap 4x the cache, held (sweeping) until its stdin closes, watched by
/// `watch` while it runs.
fn watched_run(
    runtime_dir: &Path,
    extra: &[(&str, String)],
    watch: impl FnOnce(&mut Live),
) -> Outcome {
    let mut run = Run::new(program("heap_sweeps"))
        .args(["64", "2"])
        .shim()
        .env("LEGO_CACHE_SIZE", "16M")
        .env("XDG_RUNTIME_DIR", runtime_dir);
    for (k, v) in extra {
        run = run.env(k, v);
    }
    run.run_with(|live| {
        live.wait_for_line(|l| l == "holding", Duration::from_secs(120))
            .expect("the program reaches its holding sweeps");
        watch(live);
        live.close_stdin();
    })
}

#[test]
fn a_running_program_publishes_its_statistics_and_metrics_and_leaves_nothing() {
    let _serial = heavy();
    let dir = TempDir::new("watch-live");
    let socket = dir.path().join("metrics.sock");
    let published = dir.path().join("lego");
    let mut pid = 0;
    let out = watched_run(
        dir.path(),
        &[("LEGO_METRICS", format!("unix:{}", socket.display()))],
        |_| {
            pid = published_pid(&published);
            assert_eq!(
                mode(&published),
                0o700,
                "the statistics directory is owner-only"
            );
            let file = published.join(format!("{pid}.json"));
            assert_eq!(mode(&file), 0o600, "the statistics file is owner-only");
            assert_eq!(mode(&socket), 0o600, "the metrics socket is owner-only");

            let listed = lego(dir.path(), &["stats"]);
            let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
            assert!(listed.contains(&format!("{pid} heap_sweeps")), "{listed}");

            let first = stats_json(dir.path(), pid);
            assert_eq!(first["pid"], pid);
            let first_metrics = parse_exposition(&scrape(&socket));
            std::thread::sleep(Duration::from_millis(2500));
            let second = stats_json(dir.path(), pid);
            let second_metrics = parse_exposition(&scrape(&socket));
            let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k}"));
            assert!(
                n(&second, "published_ms") > n(&first, "published_ms"),
                "republished"
            );
            for key in ["pages_fetched", "pages_written_back", "pages_evicted"] {
                assert!(
                    n(&second, key) > n(&first, key),
                    "{key} moves while the program runs"
                );
                // The endpoint gives the same counters: at least what the file said a moment
                // before it was scraped, and never more than the next file says.
                let series = format!("lego_{key}_total");
                let (m1, m2) = (
                    sample(&first_metrics, &series),
                    sample(&second_metrics, &series),
                );
                assert!(
                    m1 >= n(&first, key) as f64 && m1 <= n(&second, key) as f64,
                    "{series}"
                );
                assert!(m2 >= n(&second, key) as f64, "{series}");
            }
            // Counters only grow.
            for (series, v1) in &first_metrics {
                if series.contains("_total") {
                    assert!(sample(&second_metrics, series) >= *v1, "{series} went down");
                }
            }
            assert_eq!(sample(&second_metrics, "lego_cache_pages"), 4096.0);
        },
    );
    out.assert_success();
    assert!(out.stdout.contains("all checks passed"), "{out}");
    assert!(
        !published.join(format!("{pid}.json")).exists(),
        "the statistics file is removed at exit"
    );
    assert!(!socket.exists(), "the metrics socket is removed at exit");
    let gone = lego(dir.path(), &["stats", &pid.to_string()]);
    assert_eq!(gone.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&gone.stderr).contains("publishes no statistics"));
}

#[test]
fn publishing_can_be_turned_off() {
    let dir = TempDir::new("watch-off");
    let out = Run::new(program("hello"))
        .shim()
        .env("LEGO_PUBLISH", "off")
        .env("XDG_RUNTIME_DIR", dir.path())
        .run();
    out.assert_success();
    assert!(!dir.path().join("lego").exists(), "nothing published");
    let bad = Run::new(program("hello"))
        .shim()
        .env("LEGO_PUBLISH", "sometimes")
        .run();
    assert_eq!(bad.code, Some(2), "{bad}");
    assert!(
        bad.stderr
            .contains("LEGO_PUBLISH=\"sometimes\" is not a switch"),
        "{bad}"
    );
}

/// A tmux server of the test's own (its own socket), killed on drop.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    fn start(dir: &Path, runtime_dir: &Path, width: u16, height: u16) -> Tmux {
        let t = Tmux {
            socket: dir.join("tmux.sock"),
        };
        let status = t
            .cmd()
            .args([
                "new-session",
                "-d",
                "-x",
                &width.to_string(),
                "-y",
                &height.to_string(),
            ])
            .args(["-e", &format!("XDG_RUNTIME_DIR={}", runtime_dir.display())])
            .arg("sh")
            .status()
            .expect("tmux runs (apt-get install tmux)");
        assert!(status.success());
        t
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("tmux");
        c.arg("-S").arg(&self.socket).env_remove("TMUX");
        c
    }

    fn send(&self, keys: &[&str]) {
        assert!(self
            .cmd()
            .arg("send-keys")
            .args(keys)
            .status()
            .expect("tmux")
            .success());
    }

    fn pane(&self) -> String {
        let out = self
            .cmd()
            .args(["capture-pane", "-p"])
            .output()
            .expect("tmux");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn wait_for(&self, what: &str, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let pane = self.pane();
            if wanted(&pane) {
                return pane;
            }
            assert!(
                Instant::now() < deadline,
                "{what} never showed; the pane:\n{pane}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").status();
    }
}

#[test]
fn lego_top_shows_a_running_program_in_a_real_terminal() {
    let _serial = heavy();
    let dir = TempDir::new("watch-top");
    let published = dir.path().join("lego");
    let out = watched_run(dir.path(), &[], |_| {
        let pid = published_pid(&published);
        let tmux = Tmux::start(dir.path(), dir.path(), 110, 30);
        tmux.send(&[&format!("{} top {pid}", lego_bin().display()), "Enter"]);
        let pane = tmux.wait_for("the view with rates", |p| {
            p.contains("lego top - pid")
                && p.lines().any(|l| {
                    l.starts_with("pages") && l.contains("fetched") && !l.contains("fetched 0/s")
                })
        });
        assert!(pane.contains(&format!("pid {pid} heap_sweeps")), "{pane}");
        let cache = pane
            .lines()
            .find(|l| l.starts_with("cache"))
            .expect("a cache line");
        assert!(
            cache.contains("of 16.0 MiB resident") && cache.contains("[#"),
            "{cache}"
        );
        assert!(pane.lines().any(|l| l.starts_with("faults")), "{pane}");
        // A small terminal: every line is cut to its width.
        assert!(tmux
            .cmd()
            .args(["resize-window", "-x", "40", "-y", "6"])
            .status()
            .expect("tmux")
            .success());
        let small = tmux.wait_for("the view cut to 40 columns", |p| {
            p.contains("lego top")
                && p.lines().all(|l| l.chars().count() <= 40)
                && !p.lines().any(|l| l.contains("(q quits)"))
        });
        assert!(small.lines().count() <= 6, "{small}");
        tmux.send(&["q"]);
        tmux.wait_for("the shell back after q", |p| !p.contains("lego top - pid"));
    });
    out.assert_success();

    // The view of a process that exits says so and keeps its last figures.
    let out = watched_run(dir.path(), &[], |live| {
        let pid = published_pid(&published);
        let tmux = Tmux::start(dir.path(), dir.path(), 110, 30);
        tmux.send(&[&format!("{} top {pid}", lego_bin().display()), "Enter"]);
        tmux.wait_for("the view", |p| p.contains("lego top - pid"));
        live.close_stdin();
        let pane = tmux.wait_for("the exit", |p| p.contains("EXITED"));
        assert!(pane.lines().any(|l| l.starts_with("cache")), "{pane}");
        tmux.send(&["q"]);
        tmux.wait_for("the shell back after q", |p| !p.contains("lego top - pid"));
    });
    out.assert_success();
}
