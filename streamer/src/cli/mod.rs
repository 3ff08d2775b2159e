//! The command line: [`args`] turns raw flags into validated options,
//! [`session`] talks to PostgreSQL, [`commands`] runs the engine and
//! [`output`] prints the result. Bad flags end with exit code 2, the error and
//! a usage line; failures of the work itself end with exit code 1.

mod archive;
mod args;
mod commands;
mod drill;
mod output;
mod pq;
mod receive;
mod session;

use std::process::ExitCode;

use clap::{CommandFactory, Parser};

pub fn run() -> anyhow::Result<ExitCode> {
    let cli = match args::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind::*;
            if matches!(e.kind(), DisplayHelp | DisplayVersion | DisplayHelpOnMissingArgumentOrSubcommand) {
                e.exit();
            }
            let text = e.render().to_string();
            eprint!("{text}");
            if !text.contains("Usage:") {
                eprintln!("\n{}", usage_line());
            }
            return Ok(ExitCode::from(2));
        }
    };
    commands::dispatch(cli)
}

/// The usage line of the subcommand named on the command line, or of the program.
pub fn usage_line() -> String {
    let mut cmd = args::Cli::command();
    cmd.build();
    let sub = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let target = sub.as_deref().and_then(|s| cmd.find_subcommand_mut(s).map(|c| c.render_usage()));
    match target {
        Some(u) => u.to_string(),
        None => cmd.render_usage().to_string(),
    }
}

/// A `--repo` argument made absolute (a directory) or checked (an
/// `s3://` URL and its configuration: a bad URL or missing credentials is
/// a usage error).
pub fn repo_arg(p: &std::path::Path) -> std::path::PathBuf {
    if blockstream::storage::is_url(p) {
        if let Err(e) = blockstream::storage::s3::S3Config::from_url(&p.to_string_lossy()) {
            usage_error(e);
        }
        return p.to_path_buf();
    }
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The key the flags or the environment give: `--key-file`, else
/// `--passphrase-file`, else `$BLOCKSTREAM_PASSPHRASE`, else none.
pub fn encryption(k: &args::KeyArgs) -> anyhow::Result<blockstream::crypt::Encryption> {
    use blockstream::crypt::KeySource;
    let key = if let Some(f) = &k.key_file {
        Some(KeySource::key_file(f)?)
    } else if let Some(f) = &k.passphrase_file {
        Some(KeySource::passphrase_file(f)?)
    } else if let Some(p) = std::env::var_os("BLOCKSTREAM_PASSPHRASE") {
        use std::os::unix::ffi::OsStringExt;
        Some(KeySource::passphrase(p.into_vec(), "BLOCKSTREAM_PASSPHRASE")?)
    } else {
        None
    };
    Ok(blockstream::crypt::Encryption { key, allow_plain: k.allow_plain })
}

/// The key flags again, for a command this one starts (a daemon, a
/// restore_command): files only; a passphrase from the environment is
/// inherited by a child, never written into a command line.
pub fn key_flags(k: &args::KeyArgs) -> Vec<String> {
    let abs = |p: &std::path::Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()).display().to_string();
    let mut v = Vec::new();
    if let Some(f) = &k.passphrase_file {
        v.extend(["--passphrase-file".to_string(), abs(f)]);
    }
    if let Some(f) = &k.key_file {
        v.extend(["--key-file".to_string(), abs(f)]);
    }
    if k.allow_plain {
        v.push("--allow-plain".into());
    }
    v
}

/// Opens the repository of a `--repo` argument and unlocks it with the key given.
pub fn open_repo(repo: &std::path::Path, k: &args::KeyArgs) -> anyhow::Result<blockstream::repo::Repo> {
    let mut r = blockstream::repo::Repo::open(&repo_arg(repo))?;
    let e = encryption(k)?;
    r.unlock(e.key.as_ref(), e.allow_plain)?;
    Ok(r)
}

/// A usage error found after parsing: message, usage line, exit code 2.
pub fn usage_error(msg: impl std::fmt::Display) -> ! {
    eprintln!("error: {msg}\n\n{}", usage_line());
    std::process::exit(2)
}
