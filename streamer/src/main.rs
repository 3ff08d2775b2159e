//! The `blockstream` command: argument parsing, then one function per command.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    match cli::run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("blockstream: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
