//! Helpers shared by the integration tests: finding the built shim, compiling the test
//! programs in `tests/c/`, running them natively and under `liblego.so` (to completion, or
//! watched and acted on while they run: [`Run::run_with`]), and reading what they left behind
//! (output, exit status or signal, peak RSS, the stats JSON). [`memcached`] starts, kills and
//! restarts the servers of a pool; [`netns`] makes "hosts" behind links a test can cut.
//!
//! Rules: every run gets a clean environment as far as lego is concerned (no inherited
//! `LEGO_*` or `LD_PRELOAD`), so a developer's shell settings cannot change a test's
//! meaning; runs that page hundreds of MiB take [`heavy`] so two of them never overlap on a
//! 2-core machine; nothing here asserts timings.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

pub mod memcached;
pub mod netns;

/// One mebibyte, in bytes.
pub const MIB: u64 = 1 << 20;

/// Resident memory (KiB) a program may use under the shim beyond its DRAM cache and the
/// native RSS of the smallest program (`hello`, about 1.5 MiB: the binary, libc, the loader):
/// the runtime's own internal heap (page table, eviction state, I/O buffers), the
/// handler threads' stacks, the shim's text and data, and pages the kernel maps outside
/// the managed region (program stacks, shared-library text and data: python's libpython).
///
/// Measured peak RSS minus cache on the reference machine (2 vCPU, Linux 6.18): C programs
/// 3.0-3.8 MiB (heap_mixed 512 MiB in 48 MiB: 3.7 MiB), sqlite3 4.2 MiB, python3 11.4 MiB
/// (its interpreter text is outside the heap). 16 MiB leaves headroom over the largest
/// without letting a leak the size of the cache through. Each test prints its numbers
/// (`--nocapture`: `peak RSS ... KiB, limit ... KiB`).
pub const STATED_OVERHEAD_KIB: u64 = 16 * 1024;

/// The page size lego manages (the runtime's `PAGE_SIZE`).
pub const PAGE_SIZE_BYTES: u64 = 4096;

/// A run still going after this long is taken to be hung and is killed, so a deadlocked
/// shim fails the test instead of stalling CI forever. It is a hang guard, not a speed
/// check: the slowest run takes a small fraction of it. `LEGO_TEST_HANG_S` overrides it.
const HANG_GUARD_S: u64 = 600;

/// The `/usr/bin/time` used to measure peak RSS: `%M` is the maximum resident set size in
/// KiB of the child and its waited-for descendants.
const TIME_BIN: &str = "/usr/bin/time";

/// A marker in front of `%M` so the RSS line cannot be confused with the program's stderr.
const RSS_MARKER: &str = "lego-tests-peak-rss-kib:";

/// The repository root (the workspace that contains `tests/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent directory")
        .to_path_buf()
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` if set, else `<repo>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                repo_root().join(dir)
            }
        }
        _ => repo_root().join("target"),
    }
}

fn release_artifact(name: &str) -> PathBuf {
    let path = target_dir().join("release").join(name);
    assert!(
        path.is_file(),
        "{} is missing: run cargo build --release first (the tests drive the release build)",
        path.display()
    );
    path
}

/// `target/release/liblego.so`, the preload library under test.
pub fn shim_lib() -> PathBuf {
    release_artifact("liblego.so")
}

/// `target/release/lego`, the CLI.
pub fn lego_bin() -> PathBuf {
    release_artifact("lego")
}

/// Where compiled programs and scratch directories go: `target/lego-tests/`.
pub fn work_dir() -> PathBuf {
    let dir = target_dir().join("lego-tests");
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

/// A file under `tests/real/` (scripts for the real programs).
pub fn real_file(name: &str) -> PathBuf {
    repo_root().join("tests").join("real").join(name)
}

fn mtime(path: &Path) -> Option<SystemTime> {
    fs::metadata(path).and_then(|m| m.modified()).ok()
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// A name no other thread or test process uses at the same time.
fn unique_suffix() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    )
}

/// Compiles `tests/c/NAME.c` (gcc) or `tests/c/NAME.cpp` (g++) with `-O2 -pthread` into
/// `target/lego-tests/bin/NAME` and returns the binary's path. The binary is rebuilt only
/// when it is older than its source or `common.h`, so reruns are fast; it is built under a
/// temporary name and renamed, so parallel tests (and test binaries) never see half a file.
pub fn program(name: &str) -> PathBuf {
    let src_dir = repo_root().join("tests").join("c");
    let (src, compiler, extra): (PathBuf, &str, &[&str]) = {
        let c = src_dir.join(format!("{name}.c"));
        let cpp = src_dir.join(format!("{name}.cpp"));
        if c.is_file() {
            (c, "gcc", &["-std=gnu11"])
        } else if cpp.is_file() {
            (cpp, "g++", &["-std=c++17"])
        } else {
            panic!(
                "no test program {name}: neither {} nor {} exists",
                c.display(),
                cpp.display()
            )
        }
    };
    let bin_dir = work_dir().join("bin");
    fs::create_dir_all(&bin_dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", bin_dir.display()));
    let out = bin_dir.join(name);
    let newest_input = [mtime(&src), mtime(&src_dir.join("common.h"))]
        .into_iter()
        .flatten()
        .max();
    if let (Some(built), Some(input)) = (mtime(&out), newest_input) {
        if built >= input {
            return out;
        }
    }
    let tmp = bin_dir.join(format!(".{name}.{}", unique_suffix()));
    let result = Command::new(compiler)
        .args(extra)
        .args(["-O2", "-g", "-Wall", "-Wextra", "-pthread", "-o"])
        .arg(&tmp)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {compiler} (is it installed?): {e}"));
    assert!(
        result.status.success(),
        "{compiler} failed to compile {}:\n{}",
        src.display(),
        String::from_utf8_lossy(&result.stderr)
    );
    fs::rename(&tmp, &out)
        .unwrap_or_else(|e| panic!("cannot rename {} to {}: {e}", tmp.display(), out.display()));
    out
}

/// The real executable behind `python3` on PATH (pyenv and similar put a shell script
/// there; under LD_PRELOAD that script's bash would be paged too, so run the binary).
pub fn python3() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let out = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run python3 (is it installed?): {e}"));
        assert!(
            out.status.success(),
            "python3 -c failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
    .clone()
}

/// Finds `name` on PATH (for `sqlite3`).
pub fn which(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is not on PATH: install it (scripts/test.sh does)"))
}

/// Ports [`free_port`] has handed out in this process.
static PORTS_GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());

/// A loopback port no one listens on now, and one this process has not been given before:
/// the kernel may hand the same free port to two `bind(0)` calls once the first listener is
/// closed, and two tests running in parallel must not start servers on one port (or find
/// one test's server where the other expects nobody).
pub fn free_port() -> u16 {
    let mut given = PORTS_GIVEN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

static HEAVY: Mutex<()> = Mutex::new(());

/// Serializes the runs that page hundreds of MiB: take it for the whole test. A test that
/// failed while holding it poisons nothing that matters, so poisoning is ignored.
pub fn heavy() -> MutexGuard<'static, ()> {
    HEAVY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A directory under `target/lego-tests/tmp/`, removed with everything in it on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates a fresh directory whose name starts with `label`.
    pub fn new(label: &str) -> TempDir {
        TempDir::new_in(&work_dir().join("tmp"), label)
    }

    /// Creates a fresh directory under `base` (e.g. `/tmp`, which every user can reach,
    /// for the unprivileged-user test).
    pub fn new_in(base: &Path, label: &str) -> TempDir {
        let path = base.join(format!("lego-tests-{label}-{}", unique_suffix()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TempDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `file:<dir>`, a `LEGO_BACKEND` value storing pages in this directory.
    pub fn backend(&self) -> String {
        format!("file:{}", self.path.display())
    }

    /// Makes the directory readable, writable and searchable by everyone (for the
    /// unprivileged-user test).
    pub fn open_to_all(&self) {
        fs::set_permissions(&self.path, fs::Permissions::from_mode(0o1777))
            .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", self.path.display()));
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// How a run ended and what it printed.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// What was run, for messages.
    pub what: String,
    /// Everything the program wrote to stdout.
    pub stdout: String,
    /// Everything the program wrote to stderr (the RSS line of `/usr/bin/time` removed).
    pub stderr: String,
    /// The exit status, if it exited.
    pub code: Option<i32>,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    /// Peak RSS in KiB, if measured.
    pub peak_rss_kib: Option<u64>,
    /// The run was killed by the hang guard.
    pub hung: bool,
}

impl Outcome {
    /// Panics with the whole story unless the program exited 0.
    pub fn assert_success(&self) {
        assert!(
            self.code == Some(0),
            "{} did not exit 0:\n{self}",
            self.what
        );
    }

    /// Lines of stderr that start with `lego: `.
    pub fn lego_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| l.starts_with("lego: "))
            .collect()
    }

    /// Peak RSS, which the run must have measured.
    pub fn rss_kib(&self) -> u64 {
        self.peak_rss_kib
            .unwrap_or_else(|| panic!("{}: peak RSS was not measured:\n{self}", self.what))
    }
}

/// Keeps the head and the tail of a long text, for failure messages.
fn abbreviate(text: &str) -> String {
    const SHOWN_BYTES_MAX: usize = 6000;
    if text.len() <= SHOWN_BYTES_MAX {
        return text.to_string();
    }
    let mut head = SHOWN_BYTES_MAX / 2;
    while !text.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = text.len() - SHOWN_BYTES_MAX / 2;
    while !text.is_char_boundary(tail) {
        tail += 1;
    }
    format!(
        "{}\n[... {} bytes ...]\n{}",
        &text[..head],
        tail - head,
        &text[tail..]
    )
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "--- {}: exit {:?}, signal {:?}, peak RSS {:?} KiB{}",
            self.what,
            self.code,
            self.signal,
            self.peak_rss_kib,
            if self.hung {
                ", HUNG: killed by the hang guard"
            } else {
                ""
            }
        )?;
        writeln!(f, "--- stdout:\n{}", abbreviate(&self.stdout))?;
        write!(f, "--- stderr:\n{}", abbreviate(&self.stderr))
    }
}

/// What [`Run::run_with`] does while the program runs.
type During<'a> = Box<dyn FnOnce(&mut Live) + 'a>;

/// A program to run, natively or under the shim.
pub struct Run {
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    shim: Option<PathBuf>,
    measure_rss: bool,
    stdin: Option<Vec<u8>>,
    wrapper: Vec<OsString>,
    label: Option<String>,
    hang_s: Option<u64>,
}

impl Run {
    /// Runs `program` natively unless [`Run::shim`] is called.
    pub fn new(program: impl AsRef<Path>) -> Run {
        Run {
            program: program.as_ref().to_path_buf(),
            args: Vec::new(),
            env: Vec::new(),
            shim: None,
            measure_rss: false,
            stdin: None,
            wrapper: Vec::new(),
            label: None,
            hang_s: None,
        }
    }

    /// Kills the run as hung after `secs` seconds instead of the default guard: for runs
    /// that must end quickly or not at all (a test of a hang).
    pub fn hang_after(mut self, secs: u64) -> Run {
        self.hang_s = Some(secs);
        self
    }

    /// Appends arguments.
    pub fn args<I, S>(mut self, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    /// Sets an environment variable for the program.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Run {
        self.env
            .push((key.as_ref().to_os_string(), value.as_ref().to_os_string()));
        self
    }

    /// Preloads `target/release/liblego.so`.
    pub fn shim(self) -> Run {
        self.shim_at(shim_lib())
    }

    /// Preloads the library at `lib` (a copy of the shim, for the permission test).
    pub fn shim_at(mut self, lib: impl AsRef<Path>) -> Run {
        self.shim = Some(lib.as_ref().to_path_buf());
        self
    }

    /// Measures peak RSS with `/usr/bin/time -f %M`.
    pub fn measure_rss(mut self) -> Run {
        self.measure_rss = true;
        self
    }

    /// Feeds `data` on stdin (otherwise stdin is /dev/null).
    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Run {
        self.stdin = Some(data.into());
        self
    }

    /// Runs the program through `wrapper` (e.g. `setpriv ...`), which must exec its
    /// arguments. The wrapper itself never gets LD_PRELOAD: `env` sets it just before the
    /// program.
    pub fn wrapped<I, S>(mut self, wrapper: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.wrapper = wrapper
            .into_iter()
            .map(|a| a.as_ref().to_os_string())
            .collect();
        self
    }

    /// Names the run in messages (default: `[shim]` or `[native]` and the command line).
    pub fn label(mut self, label: impl Into<String>) -> Run {
        self.label = Some(label.into());
        self
    }

    /// Runs to completion and returns what happened.
    ///
    /// The command is `[time -f ...] [wrapper...] env [LD_PRELOAD=lib] PROGRAM ARGS`: only
    /// the program itself is preloaded, never `time` or the wrapper, which would otherwise
    /// be paged too and blur what is measured.
    pub fn run(self) -> Outcome {
        self.execute(None)
    }

    /// Runs to completion like [`Run::run`], calling `during` on this thread while the
    /// program runs: it can wait for lines of the program's output, feed its stdin, and act
    /// on the world around it in the meantime (kill a server, cut a link). The program's
    /// stdin is a pipe that stays open until `during` returns (or calls
    /// [`Live::close_stdin`]); [`Run::stdin`] does not apply. If `during` panics the program
    /// is killed, reaped, and the panic goes on.
    pub fn run_with(self, during: impl FnOnce(&mut Live)) -> Outcome {
        self.execute(Some(Box::new(during)))
    }

    fn execute(self, during: Option<During<'_>>) -> Outcome {
        let mut argv: Vec<OsString> = Vec::new();
        if self.measure_rss {
            argv.extend([
                TIME_BIN.into(),
                "-f".into(),
                format!("{RSS_MARKER}%M").into(),
            ]);
        }
        argv.extend(self.wrapper.iter().cloned());
        argv.push("env".into());
        if let Some(lib) = &self.shim {
            let mut kv = OsString::from("LD_PRELOAD=");
            kv.push(lib);
            argv.push(kv);
        }
        argv.push(self.program.clone().into());
        argv.extend(self.args.iter().cloned());

        let what = format!(
            "{}{} {}",
            match (&self.label, &self.shim) {
                (Some(label), _) => format!("[{label}] "),
                (None, Some(_)) => "[shim] ".to_string(),
                (None, None) => "[native] ".to_string(),
            },
            self.program
                .file_name()
                .unwrap_or_default()
                .to_string_lossy(),
            self.args
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        );
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("LEGO_") || k == "LD_PRELOAD" {
                cmd.env_remove(&key);
            }
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.stdin(if self.stdin.is_some() || during.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so the hang guard can kill time, wrapper and program.
        .process_group(0);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", argv[0].to_string_lossy()));
        let feeder = self.stdin.filter(|_| during.is_none()).map(|data| {
            let mut pipe = child.stdin.take().expect("stdin was piped");
            // A program that dies early closes its stdin; that is reported by its status.
            std::thread::spawn(move || {
                let _ = pipe.write_all(&data);
            })
        });
        let hang_s = self.hang_s.unwrap_or_else(|| {
            std::env::var("LEGO_TEST_HANG_S")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(HANG_GUARD_S)
        });
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let pgid = i32::try_from(child.id()).expect("pids fit in i32");
        let guard = std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) =
                done_rx.recv_timeout(Duration::from_secs(hang_s))
            {
                // SAFETY: kill(2) has no memory-safety requirements; the group is ours
                // (process_group(0) above) and its leader is still running: the main thread
                // signals `done` right after reaping it, so only that instant is a race.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
                return true;
            }
            false
        });
        let stdout_lines = Arc::new(LiveStdout::default());
        let stdout_reader = {
            let pipe = child.stdout.take().expect("stdout was piped");
            let lines = Arc::clone(&stdout_lines);
            std::thread::spawn(move || lines.collect(pipe))
        };
        let stderr_reader = {
            let mut pipe = child.stderr.take().expect("stderr was piped");
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                let _ = pipe.read_to_end(&mut bytes);
                bytes
            })
        };
        if let Some(during) = during {
            let mut live = Live {
                stdin: child.stdin.take(),
                stdout: Arc::clone(&stdout_lines),
            };
            if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(|| during(&mut live))) {
                // SAFETY: kill(2) has no memory-safety requirements; the group is ours
                // (process_group(0) above) and its leader has not been reaped yet.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
                let _ = child.wait();
                let _ = done_tx.send(());
                std::panic::resume_unwind(panic);
            }
        }
        // Both pipes to their end, then the reaping, as `wait_with_output` does: the hang
        // guard stays armed while a descendant that inherited them keeps them open.
        let _ = stdout_reader.join();
        let stderr_bytes = stderr_reader.join().unwrap_or_default();
        let status = child
            .wait()
            .unwrap_or_else(|e| panic!("waiting for {what} failed: {e}"));
        let _ = done_tx.send(());
        let hung = guard.join().unwrap_or(false);
        if let Some(feeder) = feeder {
            let _ = feeder.join();
        }

        let stdout = String::from_utf8_lossy(&stdout_lines.bytes()).into_owned();
        let mut stderr = String::from_utf8_lossy(&stderr_bytes).into_owned();
        let mut code = status.code();
        let mut signal = status.signal();
        let mut peak_rss_kib = None;
        if self.measure_rss {
            let (rest, rss, child_code, child_signal) = split_time_report(&stderr);
            stderr = rest;
            peak_rss_kib = rss;
            // time exits with the child's status; when the child was killed, report the
            // signal it names rather than time's own exit code.
            if child_signal.is_some() {
                signal = child_signal;
                code = None;
            } else if let Some(c) = child_code {
                code = Some(c);
            }
        }
        Outcome {
            what,
            stdout,
            stderr,
            code,
            signal,
            peak_rss_kib,
            hung,
        }
    }
}

/// What a program printed on stdout so far, shared between the thread that reads it and a
/// [`Live`] that waits for lines of it.
#[derive(Default)]
struct LiveStdout {
    state: Mutex<LiveStdoutState>,
    grew: Condvar,
}

#[derive(Default)]
struct LiveStdoutState {
    bytes: Vec<u8>,
    /// The program closed its stdout (it exited, or was killed).
    closed: bool,
}

impl LiveStdout {
    /// Reads `pipe` to its end, waking waiters at every chunk.
    fn collect(&self, mut pipe: impl Read) {
        let mut chunk = [0u8; 8192];
        loop {
            let n = match pipe.read(&mut chunk) {
                Ok(0) | Err(_) => 0,
                Ok(n) => n,
            };
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if n == 0 {
                state.closed = true;
                self.grew.notify_all();
                return;
            }
            state.bytes.extend_from_slice(&chunk[..n]);
            self.grew.notify_all();
        }
    }

    fn bytes(&self) -> Vec<u8> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .bytes
            .clone()
    }
}

/// A program while it runs, handed to the closure of [`Run::run_with`].
pub struct Live {
    stdin: Option<ChildStdin>,
    stdout: Arc<LiveStdout>,
}

impl Live {
    /// Waits until the program has printed a whole line (ended by a newline) for which
    /// `wanted` is true, and returns it; None if the program closed its stdout (it exited or
    /// died) or `timeout` passed first. Lines printed before the call count too.
    pub fn wait_for_line(
        &self,
        wanted: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut state = self.stdout.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let text = String::from_utf8_lossy(&state.bytes);
            let complete = text.rfind('\n').map_or("", |end| &text[..end]);
            if let Some(line) = complete.lines().find(|l| wanted(l)) {
                return Some(line.to_string());
            }
            let now = Instant::now();
            if state.closed || now >= deadline {
                return None;
            }
            state = self
                .stdout
                .grew
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The program has closed its stdout: it exited or was killed.
    pub fn finished(&self) -> bool {
        self.stdout
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .closed
    }

    /// Everything the program printed on stdout so far.
    pub fn stdout_so_far(&self) -> String {
        String::from_utf8_lossy(&self.stdout.bytes()).into_owned()
    }

    /// Writes `data` to the program's stdin. A program that exited (or closed its stdin)
    /// makes this do nothing: how it ended is reported by its outcome.
    pub fn send(&mut self, data: &[u8]) {
        if let Some(pipe) = self.stdin.as_mut() {
            if pipe.write_all(data).and_then(|()| pipe.flush()).is_err() {
                self.stdin = None;
            }
        }
    }

    /// Closes the program's stdin: it reads end of file.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }
}

/// Removes GNU time's report from `stderr`: the `%M` line (last) and the "Command exited
/// with non-zero status N" / "Command terminated by signal N" line before it. Returns the
/// program's own stderr, the peak RSS, and the status or signal time reported. Works even
/// when the program's stderr did not end with a newline (time's report then starts mid-line).
fn split_time_report(stderr: &str) -> (String, Option<u64>, Option<i32>, Option<i32>) {
    let Some(marker) = stderr.rfind(RSS_MARKER) else {
        return (stderr.to_string(), None, None, None);
    };
    let rss = stderr[marker + RSS_MARKER.len()..].trim().parse().ok();
    let mut rest = &stderr[..marker];
    let mut code = None;
    let mut signal = None;
    const EXITED: &str = "Command exited with non-zero status ";
    const KILLED: &str = "Command terminated by signal ";
    for (prefix, is_signal) in [(EXITED, false), (KILLED, true)] {
        if let Some(at) = rest.rfind(prefix) {
            let tail = &rest[at + prefix.len()..];
            // Only time's own line, the last one before the marker.
            if !tail.trim_end().contains('\n') {
                let n = tail.trim().parse().ok();
                if is_signal {
                    signal = n;
                } else {
                    code = n;
                }
                rest = &rest[..at];
                break;
            }
        }
    }
    (rest.to_string(), rss, code, signal)
}

/// Native peak RSS (KiB) of `hello`, the smallest program: the binary, libc and the loader.
pub fn baseline_rss_kib() -> u64 {
    static BASELINE: OnceLock<u64> = OnceLock::new();
    *BASELINE.get_or_init(|| {
        let out = Run::new(program("hello")).measure_rss().run();
        out.assert_success();
        out.rss_kib()
    })
}

/// The most resident memory (KiB) a run with a `cache_mib` cache may have:
/// cache + [`STATED_OVERHEAD_KIB`] + the native RSS of `hello`.
pub fn rss_limit_kib(cache_mib: u64) -> u64 {
    cache_mib * 1024 + STATED_OVERHEAD_KIB + baseline_rss_kib()
}

/// Asserts the shim run's peak RSS is within [`rss_limit_kib`], and prints the numbers
/// (visible with `--nocapture`) so the overhead can be tightened from measurements.
pub fn assert_rss_within_cache(out: &Outcome, cache_mib: u64, native: Option<&Outcome>) {
    let rss = out.rss_kib();
    let limit = rss_limit_kib(cache_mib);
    eprintln!(
        "{}: peak RSS {rss} KiB under a {cache_mib} MiB cache (overhead {} KiB over the cache), \
         limit {limit} KiB; native peak RSS {:?} KiB",
        out.what,
        rss.saturating_sub(cache_mib * 1024),
        native.and_then(|n| n.peak_rss_kib)
    );
    assert!(
        rss <= limit,
        "{}: peak RSS {rss} KiB exceeds cache {cache_mib} MiB + overhead {} KiB + baseline {} KiB = {limit} KiB",
        out.what,
        STATED_OVERHEAD_KIB,
        baseline_rss_kib()
    );
}

/// Asserts the shim run printed exactly what the native run printed, and both exited 0.
pub fn assert_same_output(native: &Outcome, shimmed: &Outcome) {
    native.assert_success();
    assert!(
        !shimmed.stdout.contains("WRONG DATA"),
        "{} read back wrong data:\n{shimmed}",
        shimmed.what
    );
    shimmed.assert_success();
    if native.stdout != shimmed.stdout {
        let first_diff = native
            .stdout
            .lines()
            .zip(shimmed.stdout.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(
                native
                    .stdout
                    .lines()
                    .count()
                    .min(shimmed.stdout.lines().count()),
            );
        panic!(
            "{} printed something other than the native run (first differing line {}):\n\
             --- native stdout:\n{}\n{shimmed}",
            shimmed.what,
            first_diff + 1,
            abbreviate(&native.stdout)
        );
    }
}

/// The statistics lego writes at exit with `LEGO_STATS=/path.json`.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Pages written out and dropped from the cache.
    pub pages_evicted: u64,
    /// Pages read back from the store on a fault.
    pub pages_fetched: u64,
    /// Pages first touched and filled with zeros.
    pub pages_zero_filled: u64,
    /// Pages written to the store.
    pub pages_written_back: u64,
    /// Most pages resident at once.
    pub peak_resident_pages: u64,
    /// free() calls on pointers lego did not allocate.
    pub foreign_frees: u64,
    /// Start of the managed (paged) region.
    pub region_base: u64,
    /// Length of the managed region in bytes.
    pub region_len: u64,
    /// Start of the runtime's internal heap.
    pub internal_heap_base: u64,
    /// Length of the internal heap in bytes.
    pub internal_heap_len: u64,
    /// Highest heap offset ever handed out, in bytes.
    pub heap_top_bytes: u64,
    /// The raw JSON, for messages.
    pub raw: String,
}

/// Finds `"key"` in a flat JSON object and returns its value: a number's text or a
/// string's contents (escapes are not needed for the keys read here).
pub fn json_value(json: &str, key: &str) -> Option<String> {
    let needle = format!("\"{key}\"");
    let mut from = 0;
    while let Some(found) = json[from..].find(&needle) {
        let after = from + found + needle.len();
        let rest = json[after..].trim_start();
        if let Some(rest) = rest.strip_prefix(':') {
            let rest = rest.trim_start();
            if let Some(s) = rest.strip_prefix('"') {
                return s.find('"').map(|end| s[..end].to_string());
            }
            let end = rest
                .find(|c: char| c == ',' || c == '}' || c.is_whitespace())
                .unwrap_or(rest.len());
            return Some(rest[..end].to_string());
        }
        from = after;
    }
    None
}

/// Parses `0x`-prefixed hex or decimal.
pub fn parse_number(text: &str) -> Option<u64> {
    let t = text.trim();
    match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => t.parse().ok(),
    }
}

impl Stats {
    /// Any numeric key of the stats JSON (`store_errors`, `fork_page_ins`, ...), or None.
    pub fn number(&self, key: &str) -> Option<u64> {
        json_value(&self.raw, key).and_then(|v| parse_number(&v))
    }

    /// Reads and parses the stats file, panicking with its contents if a key is missing.
    pub fn read(path: &Path) -> Stats {
        let raw = fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("LEGO_STATS file {} was not written: {e}", path.display()));
        Stats::parse(&raw)
    }

    /// Parses the JSON text.
    pub fn parse(raw: &str) -> Stats {
        let get = |key: &str| -> u64 {
            let value = json_value(raw, key)
                .unwrap_or_else(|| panic!("stats JSON has no key {key:?}:\n{raw}"));
            parse_number(&value).unwrap_or_else(|| {
                panic!("stats JSON key {key:?} is not a number: {value:?}\n{raw}")
            })
        };
        Stats {
            pages_evicted: get("pages_evicted"),
            pages_fetched: get("pages_fetched"),
            pages_zero_filled: get("pages_zero_filled"),
            pages_written_back: get("pages_written_back"),
            peak_resident_pages: get("peak_resident_pages"),
            foreign_frees: get("foreign_frees"),
            region_base: get("region_base"),
            region_len: get("region_len"),
            internal_heap_base: get("internal_heap_base"),
            internal_heap_len: get("internal_heap_len"),
            heap_top_bytes: get("heap_top_bytes"),
            raw: raw.to_string(),
        }
    }

    /// Asserts what every oversubscribed run must show: pages were evicted and fetched back
    /// (so the cache really was small), the resident peak stayed within the cache, and the
    /// runtime's internal heap does not overlap the managed region.
    pub fn assert_oversubscribed(&self, cache_mib: u64) {
        assert!(
            self.pages_evicted > 0,
            "no page was evicted, so the cache was not small:\n{}",
            self.raw
        );
        assert!(
            self.pages_fetched > 0,
            "no page was fetched back from the store:\n{}",
            self.raw
        );
        let cache_pages = cache_mib * MIB / PAGE_SIZE_BYTES;
        assert!(
            self.peak_resident_pages <= cache_pages,
            "peak_resident_pages {} exceeds the cache of {cache_pages} pages:\n{}",
            self.peak_resident_pages,
            self.raw
        );
        self.assert_internal_heap_disjoint();
    }

    /// Asserts `[internal_heap_base, +len)` and `[region_base, +len)` do not overlap.
    pub fn assert_internal_heap_disjoint(&self) {
        assert!(self.region_len > 0, "region_len is 0:\n{}", self.raw);
        assert!(
            self.internal_heap_len > 0,
            "internal_heap_len is 0:\n{}",
            self.raw
        );
        let region_end = self.region_base.saturating_add(self.region_len);
        let internal_end = self
            .internal_heap_base
            .saturating_add(self.internal_heap_len);
        assert!(
            internal_end <= self.region_base || region_end <= self.internal_heap_base,
            "the internal heap [{:#x}, {internal_end:#x}) overlaps the managed region [{:#x}, {region_end:#x}):\n{}",
            self.internal_heap_base,
            self.region_base,
            self.raw
        );
    }
}

/// Common environment for an oversubscribed shim run: the cache, a private page store
/// directory and a stats file.
pub struct ShimSetup {
    /// Holds the store's files and the stats file; removed on drop.
    pub dir: TempDir,
    /// Cache size in MiB.
    pub cache_mib: u64,
}

impl ShimSetup {
    /// A fresh store directory for a run with a `cache_mib` cache.
    pub fn new(label: &str, cache_mib: u64) -> ShimSetup {
        ShimSetup {
            dir: TempDir::new(label),
            cache_mib,
        }
    }

    /// Where the stats JSON goes.
    pub fn stats_path(&self) -> PathBuf {
        self.dir.path().join("stats.json")
    }

    /// Applies the shim, `LEGO_CACHE_SIZE`, `LEGO_BACKEND` (a `store/` subdirectory) and
    /// `LEGO_STATS` to `run`, and measures peak RSS.
    pub fn apply(&self, run: Run) -> Run {
        let store = self.dir.path().join("store");
        fs::create_dir_all(&store)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", store.display()));
        run.shim()
            .measure_rss()
            .env("LEGO_CACHE_SIZE", format!("{}M", self.cache_mib))
            .env("LEGO_BACKEND", format!("file:{}", store.display()))
            .env("LEGO_STATS", self.stats_path())
    }

    /// Reads the stats the run left.
    pub fn stats(&self) -> Stats {
        Stats::read(&self.stats_path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_values_of_both_kinds() {
        let json = r#"{"pages_evicted": 12, "region_base":"0x7f00", "heap_top_bytes" : "4096",
            "x":{"pages_fetched":3}, "last":7}"#;
        assert_eq!(json_value(json, "pages_evicted").as_deref(), Some("12"));
        assert_eq!(json_value(json, "region_base").as_deref(), Some("0x7f00"));
        assert_eq!(json_value(json, "heap_top_bytes").as_deref(), Some("4096"));
        assert_eq!(json_value(json, "pages_fetched").as_deref(), Some("3"));
        assert_eq!(json_value(json, "last").as_deref(), Some("7"));
        assert_eq!(json_value(json, "missing"), None);
        assert_eq!(parse_number("0x7f00"), Some(0x7f00));
        assert_eq!(parse_number("4096"), Some(4096));
        assert_eq!(parse_number("banana"), None);
    }

    #[test]
    fn time_report_is_split_off() {
        let (rest, rss, code, signal) = split_time_report(
            "hello\nCommand exited with non-zero status 3\nlego-tests-peak-rss-kib:1332\n",
        );
        assert_eq!(
            (rest.as_str(), rss, code, signal),
            ("hello\n", Some(1332), Some(3), None)
        );
        let (rest, rss, code, signal) = split_time_report(
            "lego: boom\nCommand terminated by signal 7\nlego-tests-peak-rss-kib:99\n",
        );
        assert_eq!(
            (rest.as_str(), rss, code, signal),
            ("lego: boom\n", Some(99), None, Some(7))
        );
        let (rest, rss, _, _) = split_time_report("lego-tests-peak-rss-kib:5\n");
        assert_eq!((rest.as_str(), rss), ("", Some(5)));
        let (rest, rss, code, _) = split_time_report(
            "no newline at the endCommand exited with non-zero status 2\nlego-tests-peak-rss-kib:7\n",
        );
        assert_eq!(
            (rest.as_str(), rss, code),
            ("no newline at the end", Some(7), Some(2))
        );
        let (rest, rss, code, _) = split_time_report("just the program\n");
        assert_eq!(
            (rest.as_str(), rss, code),
            ("just the program\n", None, None)
        );
    }

    #[test]
    fn a_live_run_is_watched_and_fed() {
        const WAIT: Duration = Duration::from_secs(60);
        let mut seen = None;
        let mut held = None;
        let mut finished_while_held = true;
        let out = Run::new(program("heap_sweeps"))
            .args(["2", "1"])
            .run_with(|live| {
                seen = live.wait_for_line(|l| l.starts_with("pass 0 "), WAIT);
                // It holds until its stdin closes or has data.
                held = live.wait_for_line(|l| l == "holding", WAIT);
                finished_while_held = live.finished();
                assert!(live.stdout_so_far().ends_with("holding\n"));
                live.send(b"stop\n");
            });
        out.assert_success();
        assert_eq!(held.as_deref(), Some("holding"), "{out}");
        assert!(!finished_while_held, "{out}");
        let seen = seen.expect("the first sweep's line");
        assert!(
            out.stdout.contains(&format!("{seen}\nholding\nfinal ")),
            "{out}"
        );
        assert!(out.stdout.ends_with("all checks passed\n"), "{out}");
    }

    #[test]
    fn a_panic_while_live_kills_the_program() {
        // A program that would outlive the hang guard: only the kill can end it before that.
        const GUARD_S: u64 = 120;
        let started = Instant::now();
        let panicked = std::panic::catch_unwind(|| {
            Run::new("sleep")
                .args(["600"])
                .hang_after(GUARD_S)
                .run_with(|_| panic!("the test gave up"))
        });
        assert!(panicked.is_err());
        assert!(
            started.elapsed() < Duration::from_secs(GUARD_S),
            "the program was not killed when the closure panicked (the hang guard ended it)"
        );
    }

    #[test]
    fn native_runs_are_captured() {
        let out = Run::new(program("hello")).args(["5"]).measure_rss().run();
        assert_eq!(out.code, Some(5), "{out}");
        assert!(out.stdout.starts_with("main ran\n"), "{out}");
        assert!(out.stderr.is_empty(), "{out}");
        assert!(out.rss_kib() > 0);
    }
}
