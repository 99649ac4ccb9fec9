//! The `lego` command-line tool; all logic lives in `lego_runtime::cli`.

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    match lego_runtime::cli::main(&args) {
        Ok(()) => {}
        // `--help` and `--version` (to stdout, status 0) and clap's usage errors.
        Err(lego_runtime::cli::CliError::Clap(e)) => e.exit(),
        Err(e @ lego_runtime::cli::CliError::Usage(_)) => {
            eprint!("{e}");
            std::process::exit(e.exit_status());
        }
        Err(e) => {
            eprintln!("lego: {e}");
            std::process::exit(e.exit_status());
        }
    }
}
