//! The `lego` command-line tool; all logic lives in `lego_runtime::cli`.

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if let Err(e) = lego_runtime::cli::main(&args) {
        eprintln!("lego: {e}");
        std::process::exit(e.exit_status());
    }
}
