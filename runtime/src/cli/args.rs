//! The command line's grammar, with clap: every command, its options and its help text.
//! [`parse`] turns arguments into a [`Command`]; the checks clap cannot express (a replay
//! into a pool needs a pool image, copies no more than servers, ...) are made where each
//! command's arguments are built, with the same usage error form.
//!
//! Rules: a usage error is clap's (the message, the usage line, a hint at `--help`) and
//! exits with status 2; `--help` and `--version` print to stdout and exit 0.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, CommandFactory, Parser, Subcommand};

use super::CliError;

/// `lego --version`: the package's version and the commit it was built from.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("LEGO_BUILD_COMMIT"),
    ")"
);

/// lego: far memory and a durable heap for unmodified Linux programs.
///
/// Programs run under lego with `LD_PRELOAD=liblego.so` (or `lego run`); their heap lives in
/// a bounded DRAM cache in front of a page store, tuned with LEGO_* variables (see the
/// README's Configuration).
#[derive(Debug, Parser)]
#[command(name = "lego", version = VERSION)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a program under lego (sets LD_PRELOAD to the liblego.so next to lego).
    Run(RunCmd),
    /// Rebuild the heap of a log's last complete epoch, into an image or a pool.
    Replay(ReplayCmd),
    /// Describe a log: its segments, epochs, checkpoints and damage.
    Inspect {
        /// The log directory (LEGO_LOG_DIR of the run).
        log_dir: PathBuf,
    },
    /// Show a pool of memcached servers, or collect the pages of dead heaps on it.
    Pool(PoolCmd),
    /// Print a running program's statistics once (the lego processes of this user without a
    /// PID).
    Stats {
        /// The process.
        pid: Option<u32>,
        /// One JSON object, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Watch a running program live (every lego process of this user without a PID).
    Top {
        /// The process.
        pid: Option<u32>,
        /// Print this many views a second apart instead of drawing on the terminal.
        #[arg(short = 'n', long, value_name = "N")]
        iterations: Option<u64>,
    },
    /// Print a completion script for a shell (source it from the shell's start-up file).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
pub struct RunCmd {
    /// DRAM cache size (LEGO_CACHE_SIZE), e.g. 256M.
    #[arg(long, value_name = "SIZE")]
    pub cache: Option<OsString>,
    /// Reserved heap size (LEGO_HEAP_SIZE), e.g. 64G.
    #[arg(long, value_name = "SIZE")]
    pub heap: Option<OsString>,
    /// Page store (LEGO_BACKEND): file:DIR or memcached://HOST:PORT[,HOST:PORT...].
    #[arg(long, value_name = "URL")]
    pub backend: Option<OsString>,
    /// Statistics at exit (LEGO_STATS): 1 for stderr, or FILE.json.
    #[arg(long, value_name = "1|FILE.json")]
    pub stats: Option<OsString>,
    /// The program and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        value_name = "PROGRAM [ARGS]..."
    )]
    pub command: Vec<OsString>,
}

#[derive(Debug, Args)]
pub struct ReplayCmd {
    /// The log directory (LEGO_LOG_DIR of the run).
    pub log_dir: PathBuf,
    /// The heap image to write (with --to: the small pool image LEGO_RESTORE takes).
    #[arg(short = 'o', long = "output", value_name = "IMAGE")]
    pub output: Option<PathBuf>,
    /// Recover epoch N instead of the newest complete one.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..), conflicts_with = "checkpoint")]
    pub epoch: Option<u64>,
    /// Recover the newest epoch the program asked for with lego_checkpoint().
    #[arg(long)]
    pub checkpoint: bool,
    /// Refuse a log with any damage anywhere.
    #[arg(long)]
    pub strict: bool,
    /// Seed an empty pool with the heap instead of writing an image.
    #[arg(long, value_name = "memcached://HOST:PORT[,...]")]
    pub to: Option<String>,
    /// Copies of every page in the pool (with --to), from 1 to 8.
    #[arg(long, value_name = "N")]
    pub replicas: Option<String>,
    /// Seal the pool's values under this key file (with --to), as LEGO_KEY_FILE does.
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct PoolCmd {
    #[command(subcommand)]
    pub action: Option<PoolAction>,
    /// One line per heap on each server.
    #[arg(long)]
    pub heaps: bool,
    /// The pool: memcached://HOST:PORT[,HOST:PORT...].
    pub url: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum PoolAction {
    /// Free the pages of heaps whose process is gone (their lease lapsed).
    Gc {
        /// Delete this one heap instead (16 hex digits, as `lego pool --heaps` shows): a
        /// seeded one never restored, or an orphan; a running heap is kept.
        #[arg(long, value_name = "ID")]
        heap: Option<String>,
        /// The pool: memcached://HOST:PORT[,HOST:PORT...].
        url: String,
    },
}

/// Parses `args` (without the program name).
pub fn parse(args: &[OsString]) -> Result<Command, clap::Error> {
    let argv = std::iter::once(OsString::from("lego")).chain(args.iter().cloned());
    Cli::try_parse_from(argv).map(|c| c.command)
}

/// A usage error of `subcommand` (`None`: of lego itself) in clap's form: the message, the
/// usage line and the hint at `--help`.
pub fn usage_error(subcommand: Option<&str>, message: impl std::fmt::Display) -> CliError {
    let mut cmd = Cli::command();
    let cmd = match subcommand.and_then(|s| cmd.find_subcommand_mut(s)) {
        Some(sub) => {
            let mut sub = sub
                .clone()
                .bin_name(format!("lego {}", subcommand.unwrap_or("")));
            sub.error(clap::error::ErrorKind::ValueValidation, message)
                .render()
        }
        None => cmd
            .error(clap::error::ErrorKind::ValueValidation, message)
            .render(),
    };
    CliError::Usage(cmd.to_string())
}

/// Writes the completion script for `shell` to `out`.
pub fn completions(shell: clap_complete::Shell, out: &mut dyn std::io::Write) {
    clap_complete::generate(shell, &mut Cli::command(), "lego", out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grammar_is_consistent() {
        Cli::command().debug_assert();
    }
}
