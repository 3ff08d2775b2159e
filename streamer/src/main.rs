//! The `blockstream` command: argument parsing, then one function per command.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    // Like other Unix tools, end quietly when the reader of our output goes
    // away (`blockstream info | head`) instead of panicking on EPIPE.
    // SAFETY: restoring the default disposition of SIGPIPE at startup.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    blockstream::failpoint::arm_from_env();
    let result = cli::run();
    if std::env::var_os("BLOCKSTREAM_S3_STATS").is_some() {
        // For benchmarks: what S3 uploads held in memory at most.
        eprintln!("s3: peak bytes in flight {}", blockstream::storage::s3::peak_bytes_in_flight());
    }
    match result {
        Ok(code) => code,
        Err(e) => {
            // An engine error about a flag's value is bad input, like a bad flag.
            if let Some(blockstream::Error::Usage(msg)) = e.downcast_ref::<blockstream::Error>() {
                if msg.starts_with("--") {
                    eprintln!("blockstream: error: {msg}\n\n{}", cli::usage_line());
                    return ExitCode::from(2);
                }
            }
            // The chain of causes, each once: the engine's I/O errors already
            // end with the system error they wrap.
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !msg.contains(&c) {
                    msg.push_str(": ");
                    msg.push_str(&c);
                }
            }
            eprintln!("blockstream: error: {msg}");
            ExitCode::from(1)
        }
    }
}
