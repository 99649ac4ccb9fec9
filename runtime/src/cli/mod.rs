//! The `lego` command-line tool: argument parsing and the commands' logic. The binary in
//! `src/bin/lego.rs` only calls [`main`].
//!
//! `lego run [--cache SIZE] [--heap SIZE] [--backend URL] [--stats DEST] -- PROGRAM ARGS...`
//! sets `LD_PRELOAD` to the `liblego.so` next to the `lego` binary and the matching `LEGO_*`
//! variables, then executes the program in place (its exit status is the command's).
//!
//! `lego replay LOG_DIR -o IMAGE [--epoch N | --checkpoint] [--strict]` rebuilds the heap
//! image of the last complete epoch (of epoch N, or of the newest program checkpoint: an epoch
//! `lego_checkpoint()` made) from a log directory, with a progress line on stderr when stderr
//! is a terminal, and prints what it recovered and what it left out; it fails only when nothing
//! usable is there, or with `--strict` when anything in the log is damaged. With `--to
//! memcached://HOST:PORT,... [--replicas N] [--key-file FILE]` the heap goes to that pool
//! instead (under a new heap id, kept for its restore; its values sealed under the key, as
//! with `LEGO_KEY_FILE`) and `-o` names the small *pool image* `LEGO_RESTORE` takes
//! (`crate::seed`). `lego inspect
//! LOG_DIR` describes the segments, epochs (program checkpoints among them) and damage of a
//! log.

use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::log::replay::{
    inspect_dir, replay_dir_with, Progress, ReplayError, ReplayOptions, Target,
};
use crate::logging::error_chain;
use crate::seed::{replay_to_pool, SeedOptions};

pub mod args;
pub mod pool;
pub mod watch;

/// How often the progress line on a terminal is redrawn, at most.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug, Error)]
pub enum CliError {
    /// A usage error, rendered as clap renders its own (message, usage line, hint).
    #[error("{0}")]
    Usage(String),
    /// What clap says: a usage error, or `--help` / `--version` (printed, status 0).
    #[error("{0}")]
    Clap(clap::Error),
    #[error("cannot find liblego.so next to the lego binary (looked for {0}); build it with `cargo build --release`")]
    NoLibrary(PathBuf),
    #[error("cannot run {program}: {source}")]
    Exec {
        program: String,
        #[source]
        source: std::io::Error,
    },
    // The binary prints only the top-level message, so the causes are spelled out in it.
    #[error("{}", error_chain(source))]
    Replay {
        #[source]
        source: ReplayError,
    },
    #[error("{}", error_chain(source))]
    Seed {
        #[source]
        source: crate::seed::SeedError,
    },
    #[error("{}", error_chain(source))]
    Watch {
        #[source]
        source: crate::watch::read::ReadError,
    },
    #[error("the terminal failed: {source}")]
    Terminal {
        #[source]
        source: std::io::Error,
    },
    /// `lego pool`: some server did not answer (the others were printed).
    #[error("{failed} of {total} servers did not answer: {names}")]
    ServersFailed {
        failed: usize,
        total: usize,
        names: String,
    },
    #[error(
        "no server of the pool holds heap {heap_id:016x} (lego pool --heaps lists the heaps \
         there are)"
    )]
    HeapNotFound { heap_id: u64 },
}

impl CliError {
    /// The status `lego` exits with: 1 when a pool's server did not answer or holds no such
    /// heap, 2 otherwise.
    pub fn exit_status(&self) -> i32 {
        match self {
            CliError::ServersFailed { .. } | CliError::HeapNotFound { .. } => 1,
            CliError::Clap(e) => e.exit_code(),
            _ => 2,
        }
    }
}

impl From<ReplayError> for CliError {
    fn from(source: ReplayError) -> Self {
        CliError::Replay { source }
    }
}

/// What `lego replay` was asked to do.
#[derive(Debug, PartialEq, Eq)]
pub struct ReplayArgs {
    pub log_dir: PathBuf,
    pub image: PathBuf,
    /// The epoch to recover (`--epoch N`, `--checkpoint`), and `--strict`.
    pub options: ReplayOptions,
    /// `--to memcached://...`: the pool that receives the heap (then `image` is the pool
    /// image), and `--replicas N` (1 unless given).
    pub to: Option<Vec<String>>,
    pub replicas: usize,
    /// `--key-file FILE`: the pool's values are sealed under that key (`LEGO_KEY_FILE`).
    pub key_file: Option<PathBuf>,
}

/// A clap error as a usage error (the tests and `lego` print it the same way).
fn clap_usage(e: clap::Error) -> CliError {
    CliError::Usage(e.render().to_string())
}

/// Parses the arguments that follow `lego SUBCOMMAND`.
fn parse_sub(subcommand: &str, args: &[OsString]) -> Result<args::Command, CliError> {
    let mut all = vec![OsString::from(subcommand)];
    all.extend(args.iter().cloned());
    args::parse(&all).map_err(clap_usage)
}

/// Parses the arguments that follow `lego replay`.
pub fn parse_replay(args: &[OsString]) -> Result<ReplayArgs, CliError> {
    match parse_sub("replay", args)? {
        args::Command::Replay(r) => replay_args(r),
        _ => unreachable!("parsed as replay"),
    }
}

/// The checks of `lego replay` that clap does not make.
fn replay_args(r: args::ReplayCmd) -> Result<ReplayArgs, CliError> {
    let usage = |m: String| args::usage_error(Some("replay"), m);
    let target = match (r.epoch, r.checkpoint) {
        (Some(n), _) => Target::Epoch(n),
        (None, true) => Target::ProgramCheckpoint,
        (None, false) => Target::Newest,
    };
    let to =
        r.to.as_deref()
            .map(pool::parse_pool_url)
            .transpose()
            .map_err(usage)?;
    let replicas = match &r.replicas {
        None => None,
        Some(v) => Some(
            v.parse::<usize>()
                .ok()
                .filter(|n| (1..=crate::config::REPLICAS_MAX).contains(n))
                .ok_or_else(|| {
                    usage(format!(
                        "--replicas {v} is not a number of copies: expected a whole number \
                         from 1 to {}",
                        crate::config::REPLICAS_MAX
                    ))
                })?,
        ),
    };
    if let (Some(n), None) = (replicas, &to) {
        return Err(usage(format!(
            "--replicas {n} is for a replay into a pool: give --to memcached://HOST:PORT[,...] too"
        )));
    }
    if let (Some(_), None) = (&r.key_file, &to) {
        return Err(usage(
            "--key-file seals the values of a pool: give --to memcached://HOST:PORT[,...] too \
             (a heap image is a local file, not sealed)"
                .into(),
        ));
    }
    if let (Some(servers), Some(n)) = (&to, replicas) {
        if n > servers.len() {
            return Err(usage(format!(
                "--replicas {n} asks for more copies than the pool has servers ({}): give at \
                 most {}",
                servers.len(),
                servers.len()
            )));
        }
    }
    let image = r.output.ok_or_else(|| {
        usage(if to.is_some() {
            "no -o POOL_IMAGE given (the local file LEGO_RESTORE takes to restore from the pool)"
                .to_string()
        } else {
            "no -o IMAGE given".to_string()
        })
    })?;
    Ok(ReplayArgs {
        log_dir: r.log_dir,
        image,
        options: ReplayOptions {
            target,
            strict: r.strict,
        },
        to,
        replicas: replicas.unwrap_or(1),
        key_file: r.key_file,
    })
}

/// Parses the arguments that follow `lego inspect`.
pub fn parse_inspect(args: &[OsString]) -> Result<PathBuf, CliError> {
    match parse_sub("inspect", args)? {
        args::Command::Inspect { log_dir } => Ok(log_dir),
        _ => unreachable!("parsed as inspect"),
    }
}

/// A progress line on stderr, redrawn in place (`\r`) when stderr is a terminal; nothing
/// otherwise.
struct ProgressLine {
    enabled: bool,
    last: Option<Instant>,
    width: usize,
}

impl ProgressLine {
    fn new() -> ProgressLine {
        ProgressLine {
            enabled: std::io::stderr().is_terminal(),
            last: None,
            width: 0,
        }
    }

    fn update(&mut self, p: Progress) {
        if !self.enabled || self.last.is_some_and(|t| t.elapsed() < PROGRESS_INTERVAL) {
            return;
        }
        self.last = Some(Instant::now());
        let (what, done, total, unit) = match p {
            Progress::ReadingLog { done, total } => {
                ("reading the log", done >> 20, total >> 20, "MiB")
            }
            Progress::WritingImage { done, total } => ("writing the image", done, total, "pages"),
        };
        let percent = (done * 100).checked_div(total).unwrap_or(100);
        let line = format!("lego replay: {what}: {done}/{total} {unit} ({percent}%)");
        self.width = self.width.max(line.len());
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r{line:<w$}", w = self.width);
        let _ = err.flush();
    }

    fn finish(&mut self) {
        if self.enabled && self.width > 0 {
            let _ = write!(std::io::stderr().lock(), "\r{:w$}\r", "", w = self.width);
        }
    }
}

/// What `lego run` was asked to do.
#[derive(Debug, PartialEq, Eq)]
pub struct RunArgs {
    pub env: Vec<(&'static str, OsString)>,
    pub program: OsString,
    pub args: Vec<OsString>,
}

/// Parses the arguments that follow `lego run`.
pub fn parse_run(args: &[OsString]) -> Result<RunArgs, CliError> {
    match parse_sub("run", args)? {
        args::Command::Run(r) => Ok(run_args(r)),
        _ => unreachable!("parsed as run"),
    }
}

fn run_args(r: args::RunCmd) -> RunArgs {
    let env = [
        ("LEGO_CACHE_SIZE", r.cache),
        ("LEGO_HEAP_SIZE", r.heap),
        ("LEGO_BACKEND", r.backend),
        ("LEGO_STATS", r.stats),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.map(|v| (k, v)))
    .collect();
    let mut command = r.command.into_iter();
    RunArgs {
        env,
        program: command.next().expect("clap requires the program"),
        args: command.collect(),
    }
}

/// The `liblego.so` that sits next to the running `lego` binary.
pub fn sibling_library() -> Result<PathBuf, CliError> {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("lego"));
    let lib = exe.with_file_name("liblego.so");
    if lib.is_file() {
        Ok(lib)
    } else {
        Err(CliError::NoLibrary(lib))
    }
}

/// Runs `lego` with `args` (without the program name). `run` returns only on error.
pub fn main(args: &[OsString]) -> Result<(), CliError> {
    match args::parse(args).map_err(CliError::Clap)? {
        args::Command::Run(r) => {
            let run = run_args(r);
            let lib = sibling_library()?;
            let mut preload = lib.into_os_string();
            if let Some(old) = std::env::var_os("LD_PRELOAD").filter(|v| !v.is_empty()) {
                preload.push(" ");
                preload.push(old);
            }
            let mut cmd = Command::new(&run.program);
            cmd.args(&run.args).env("LD_PRELOAD", preload);
            for (k, v) in &run.env {
                cmd.env(k, v);
            }
            let source = cmd.exec();
            Err(CliError::Exec {
                program: run.program.to_string_lossy().into_owned(),
                source,
            })
        }
        args::Command::Replay(r) => {
            let a = replay_args(r)?;
            let mut line = ProgressLine::new();
            if let Some(servers) = &a.to {
                let options = SeedOptions {
                    replay: a.options,
                    servers: servers.clone(),
                    replicas: a.replicas,
                    timeout_ms: crate::config::PoolSettings::default().timeout_ms,
                    key_file: a.key_file.clone(),
                };
                let result =
                    replay_to_pool(&a.log_dir, &a.image, &options, &mut |p| line.update(p));
                line.finish();
                let report = result.map_err(|source| CliError::Seed { source })?;
                print!("{report}");
                let key = match &a.key_file {
                    Some(k) => format!(" LEGO_KEY_FILE={}", k.display()),
                    None => String::new(),
                };
                println!(
                    "pool image written to {} (restore with LEGO_BACKEND=memcached://{}{key} \
                     LEGO_RESTORE={})",
                    a.image.display(),
                    servers.join(","),
                    a.image.display()
                );
                return Ok(());
            }
            let result = replay_dir_with(&a.log_dir, &a.image, &a.options, &mut |p| line.update(p));
            line.finish();
            let report = result?;
            print!("{report}");
            println!("image written to {}", a.image.display());
            Ok(())
        }
        args::Command::Inspect { log_dir } => {
            print!("{}", inspect_dir(&log_dir)?);
            Ok(())
        }
        args::Command::Pool(p) => {
            let a = pool::pool_args(p)?;
            pool::run(&a, &mut std::io::stdout().lock())
        }
        args::Command::Stats { pid, json } => {
            watch::run_stats(pid, json, &mut std::io::stdout().lock())
        }
        args::Command::Top { pid, iterations } => watch::run_top(pid, iterations),
        args::Command::Completions { shell } => {
            args::completions(shell, &mut std::io::stdout().lock());
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn replay_arguments_in_any_order() {
        let want = ReplayArgs {
            log_dir: PathBuf::from("logs"),
            image: PathBuf::from("heap.img"),
            options: ReplayOptions {
                target: Target::Epoch(7),
                strict: false,
            },
            to: None,
            replicas: 1,
            key_file: None,
        };
        for v in [
            &["logs", "-o", "heap.img", "--epoch", "7"][..],
            &["--epoch", "7", "--output", "heap.img", "logs"][..],
        ] {
            assert_eq!(parse_replay(&os(v)).expect("parses"), want);
        }
        let plain = parse_replay(&os(&["logs", "-o", "x"])).expect("parses");
        assert_eq!(plain.options, ReplayOptions::default());
        let program =
            parse_replay(&os(&["--checkpoint", "logs", "-o", "x", "--strict"])).expect("parses");
        assert_eq!(
            program.options,
            ReplayOptions {
                target: Target::ProgramCheckpoint,
                strict: true,
            }
        );
    }

    #[test]
    fn replay_into_a_pool_arguments() {
        let a = parse_replay(&os(&[
            "logs",
            "--to",
            "memcached://127.0.0.1:11211,127.0.0.1:11212",
            "--replicas",
            "2",
            "-o",
            "heap.pool",
            "--checkpoint",
        ]))
        .expect("parses");
        assert_eq!(
            a.to,
            Some(vec![
                "127.0.0.1:11211".to_owned(),
                "127.0.0.1:11212".to_owned()
            ])
        );
        assert_eq!(a.replicas, 2);
        assert_eq!(a.image, PathBuf::from("heap.pool"));
        assert_eq!(a.options.target, Target::ProgramCheckpoint);
        let one =
            parse_replay(&os(&["logs", "--to", "memcached://h:1", "-o", "p"])).expect("parses");
        assert_eq!(one.replicas, 1);
        assert_eq!(one.key_file, None);
        let keyed = parse_replay(&os(&[
            "logs",
            "--to",
            "memcached://h:1",
            "--key-file",
            "/k",
            "-o",
            "p",
        ]))
        .expect("parses");
        assert_eq!(keyed.key_file, Some(PathBuf::from("/k")));
        for (v, says) in [
            (
                &["logs", "--key-file", "/k", "-o", "p"][..],
                "seals the values of a pool",
            ),
            (
                &["logs", "--to", "file:/tmp", "-o", "p"][..],
                "is not a pool",
            ),
            (
                &["logs", "--to", "memcached://", "-o", "p"][..],
                "is not a pool",
            ),
            (&["logs", "--to"][..], "a value is required"),
            (&["logs", "--replicas", "2", "-o", "p"][..], "give --to"),
            (
                &[
                    "logs",
                    "--to",
                    "memcached://h:1",
                    "--replicas",
                    "2",
                    "-o",
                    "p",
                ][..],
                "more copies than the pool has servers",
            ),
            (
                &[
                    "logs",
                    "--to",
                    "memcached://h:1",
                    "--replicas",
                    "0",
                    "-o",
                    "p",
                ][..],
                "not a number of copies",
            ),
            (&["logs", "--to", "memcached://h:1"][..], "no -o POOL_IMAGE"),
        ] {
            match parse_replay(&os(v)) {
                Err(CliError::Usage(m)) => assert!(m.contains(says), "{v:?}: {m}"),
                other => panic!("{v:?} must be a usage error, not {other:?}"),
            }
        }
    }

    #[test]
    fn bad_replay_and_inspect_arguments_are_usage_errors() {
        for v in [
            &[][..],
            &["logs"][..],
            &["-o", "x"][..],
            &["logs", "-o"][..],
            &["logs", "-o", "x", "--epoch", "0"][..],
            &["logs", "-o", "x", "--epoch", "seven"][..],
            &["logs", "more", "-o", "x"][..],
            &["logs", "-o", "x", "--bogus"][..],
            &["logs", "-o", "x", "--epoch", "3", "--checkpoint"][..],
        ] {
            assert!(
                matches!(parse_replay(&os(v)), Err(CliError::Usage(_))),
                "{v:?} must be a usage error"
            );
        }
        assert_eq!(
            parse_inspect(&os(&["logs"])).expect("parses"),
            PathBuf::from("logs")
        );
        for v in [&[][..], &["a", "b"][..], &["--x"][..]] {
            assert!(matches!(parse_inspect(&os(v)), Err(CliError::Usage(_))));
        }
    }

    #[test]
    fn replay_and_inspect_commands() {
        use crate::log::format::{EpochPage, RegionInfo};
        use crate::log::test_support::page;
        use crate::log::{LogWriter, WriterOptions};
        use crate::test_support::TestDir;

        let dir = TestDir::new("cli");
        let logs = dir.0.join("heap");
        let region = RegionInfo {
            base: 0x7c00_0000_0000,
            len: 16 * 4096,
        };
        let mut w = LogWriter::create(&logs, region, WriterOptions::default()).expect("creating");
        let p = page(1);
        w.append_epoch(&[EpochPage {
            page: 3,
            data: Some(&p),
        }])
        .expect("appending");
        drop(w);
        let image = dir.0.join("heap.img");
        let arg = |p: &std::path::Path| p.as_os_str().to_os_string();
        main(&[
            OsString::from("replay"),
            arg(&logs),
            "-o".into(),
            arg(&image),
        ])
        .expect("replay succeeds");
        let bytes = std::fs::read(&image).expect("the image exists");
        assert_eq!(bytes.len(), 5 * 4096);
        assert!(bytes[4 * 4096..] == p[..]);
        main(&[OsString::from("inspect"), arg(&logs)]).expect("inspect succeeds");

        let empty = dir.0.join("empty");
        std::fs::create_dir(&empty).expect("mkdir");
        let err = main(&[
            OsString::from("replay"),
            arg(&empty),
            "-o".into(),
            arg(&image),
        ])
        .expect_err("nothing to replay");
        assert!(matches!(err, CliError::Replay { .. }));
        assert!(err.to_string().contains("holds no log segments"), "{err}");
        let err = main(&[OsString::from("inspect"), arg(&dir.0.join("missing"))])
            .expect_err("no such directory");
        assert!(err.to_string().contains("No such file"), "{err}");
    }

    /// `--checkpoint` recovers the newest program checkpoint (or says there is none),
    /// `--strict` refuses a damaged log and writes no image.
    #[test]
    fn replay_checkpoint_and_strict() {
        use crate::log::format::{EpochPage, ImageHeader, RegionInfo, BLOCK_BYTES};
        use crate::log::test_support::page;
        use crate::log::{EpochOrigin, LogWriter, WriterOptions};
        use crate::test_support::TestDir;
        let dir = TestDir::new("cli-checkpoint");
        let logs = dir.0.join("heap");
        let region = RegionInfo {
            base: 0x7c00_0000_0000,
            len: 16 * 4096,
        };
        let arg = |p: &std::path::Path| p.as_os_str().to_os_string();
        let image = dir.0.join("heap.img");
        let replay = |extra: &[&str]| {
            let mut args = vec![
                OsString::from("replay"),
                arg(&logs),
                "-o".into(),
                arg(&image),
            ];
            args.extend(extra.iter().map(OsString::from));
            main(&args)
        };
        let mut w = LogWriter::create(&logs, region, WriterOptions::default()).expect("creating");
        let pages: Vec<Vec<u8>> = (0..3).map(page).collect();
        let epoch = |w: &mut LogWriter, i: usize, origin| {
            w.append_epoch_as(
                origin,
                &[EpochPage {
                    page: 2,
                    data: Some(&pages[i]),
                }],
            )
            .expect("appending")
        };
        epoch(&mut w, 0, EpochOrigin::Automatic);
        let err = replay(&["--checkpoint"]).expect_err("no program checkpoint yet");
        let text = err.to_string();
        assert!(
            text.contains("no program checkpoint") && text.contains("epochs 1 to 1"),
            "{text}"
        );
        assert!(!image.exists(), "no image is written");
        epoch(&mut w, 1, EpochOrigin::Program);
        epoch(&mut w, 2, EpochOrigin::Automatic);
        replay(&["--checkpoint"]).expect("recovers epoch 2");
        let bytes = std::fs::read(&image).expect("the image");
        let header = ImageHeader::decode(&bytes[..BLOCK_BYTES]).expect("an image");
        assert_eq!((header.epoch, header.origin), (2, EpochOrigin::Program));
        assert!(bytes[3 * 4096..4 * 4096] == pages[1][..]);
        replay(&["--strict"]).expect("a clean log passes --strict");
        drop(w);
        // A torn tail: the default recovers epoch 2, --strict refuses.
        let seg = logs.join(crate::log::format::segment_file_name(1));
        let len = std::fs::metadata(&seg).expect("stat").len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&seg)
            .and_then(|f| f.set_len(len - 10))
            .expect("cutting the segment");
        std::fs::remove_file(&image).expect("removing the image");
        let err = replay(&["--strict"]).expect_err("damage is refused");
        let text = err.to_string();
        assert!(
            text.contains("--strict")
                && text.contains("seg-000001.lego from offset")
                && text.contains("torn write"),
            "{text}"
        );
        assert!(!image.exists(), "--strict writes no image");
        replay(&[]).expect("the default recovers the epoch before the damage");
        let bytes = std::fs::read(&image).expect("the image");
        let header = ImageHeader::decode(&bytes[..BLOCK_BYTES]).expect("an image");
        assert_eq!(header.epoch, 2);
    }

    #[test]
    fn run_options_become_variables() {
        let r = parse_run(&os(&["--cache", "64M", "--", "prog", "-x"])).expect("parses");
        assert_eq!(r.env, vec![("LEGO_CACHE_SIZE", OsString::from("64M"))]);
        assert_eq!(r.program, OsString::from("prog"));
        assert_eq!(r.args, os(&["-x"]));
    }

    #[test]
    fn program_without_separator() {
        let r = parse_run(&os(&["ls", "-l"])).expect("parses");
        assert_eq!(r.program, OsString::from("ls"));
        assert_eq!(r.args, os(&["-l"]));
    }

    #[test]
    fn missing_program_and_bad_options_are_usage_errors() {
        assert!(matches!(parse_run(&os(&[])), Err(CliError::Usage(_))));
        assert!(matches!(
            parse_run(&os(&["--cache"])),
            Err(CliError::Usage(_))
        ));
        assert!(matches!(
            parse_run(&os(&["--bogus", "1", "--", "x"])),
            Err(CliError::Usage(_))
        ));
    }
}
