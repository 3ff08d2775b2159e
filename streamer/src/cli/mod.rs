//! The command line: [`args`] turns raw flags into validated options (clap
//! exits with code 2 and a usage line on bad flags), [`session`] talks to
//! PostgreSQL, [`commands`] runs the engine and [`output`] prints the result.

mod args;
mod commands;
mod output;
mod session;

use std::process::ExitCode;

use clap::Parser;

pub fn run() -> anyhow::Result<ExitCode> {
    let cli = args::Cli::parse();
    commands::dispatch(cli)
}
