//! The `lego` command-line tool: argument parsing and the commands' logic. The binary in
//! `src/bin/lego.rs` only calls [`main`].
//!
//! `lego run [--cache SIZE] [--heap SIZE] [--backend URL] [--stats DEST] -- PROGRAM ARGS...`
//! sets `LD_PRELOAD` to the `liblego.so` next to the `lego` binary and the matching `LEGO_*`
//! variables, then executes the program in place (its exit status is the command's).

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use thiserror::Error;

pub const USAGE: &str = "usage: lego run [--cache SIZE] [--heap SIZE] [--backend URL] [--stats 1|FILE.json] -- PROGRAM [ARGS...]";

#[derive(Debug, Error)]
pub enum CliError {
    #[error("{0}\n{USAGE}")]
    Usage(String),
    #[error("cannot find liblego.so next to the lego binary (looked for {0}); build it with `cargo build --release`")]
    NoLibrary(PathBuf),
    #[error("cannot run {program}: {source}")]
    Exec {
        program: String,
        #[source]
        source: std::io::Error,
    },
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
    let mut env = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = args[i].to_string_lossy();
        let var = match a.as_ref() {
            "--" => {
                i += 1;
                break;
            }
            "--cache" => "LEGO_CACHE_SIZE",
            "--heap" => "LEGO_HEAP_SIZE",
            "--backend" => "LEGO_BACKEND",
            "--stats" => "LEGO_STATS",
            s if s.starts_with('-') => {
                return Err(CliError::Usage(format!("unknown option {s}")));
            }
            _ => break,
        };
        let value = args
            .get(i + 1)
            .ok_or_else(|| CliError::Usage(format!("{a} needs a value")))?;
        env.push((var, value.clone()));
        i += 2;
    }
    let program = args
        .get(i)
        .cloned()
        .ok_or_else(|| CliError::Usage("no program to run".into()))?;
    Ok(RunArgs {
        env,
        program,
        args: args[i + 1..].to_vec(),
    })
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

/// Runs `lego` with `args` (without the program name). Returns only on error.
pub fn main(args: &[OsString]) -> Result<(), CliError> {
    match args.first().map(|a| a.to_string_lossy()) {
        Some(cmd) if cmd == "run" => {
            let run = parse_run(&args[1..])?;
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
        Some(cmd) if cmd == "-h" || cmd == "--help" || cmd == "help" => {
            println!("{USAGE}");
            Ok(())
        }
        Some(cmd) => Err(CliError::Usage(format!("unknown command {cmd}"))),
        None => Err(CliError::Usage("no command given".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
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
