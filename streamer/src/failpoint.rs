//! Failpoints: named places where the fault tests kill the process, to prove
//! that a process dying there loses nothing.
//!
//! Only the command line arms them, from `BLOCKSTREAM_FAILPOINT=name` (the
//! first time the place is reached) or `name@N` (the N-th time). The process
//! then sends itself SIGKILL: no destructor, no flush, exactly `kill -9`.
//! Inside the server (the extension links this crate) they are never armed.
//!
//! Places: `copy-chunk` (a stream chunk was just written), `data-copied`
//! (every data file is in the streams, pg_control not yet), `wal-chunk` (a
//! chunk of WAL was just written), `backup-stopped` (right after
//! `pg_backup_stop`), `durable-write` (a temporary file is written but not
//! yet renamed; `durable-write:manifest.json` for the manifest),
//! `manifest-renamed`, `restore-record` (a
//! restored record was just written), `restore-written` (every file is
//! written, pg_control not yet).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

static ARMED: OnceLock<(String, u64)> = OnceLock::new();
static HITS: AtomicU64 = AtomicU64::new(0);

pub const ENV: &str = "BLOCKSTREAM_FAILPOINT";

/// Arms the failpoint named in the environment, if any.
pub fn arm_from_env() {
    let Ok(spec) = std::env::var(ENV) else { return };
    let (name, nth) = match spec.split_once('@') {
        Some((n, k)) => (n.to_string(), k.parse().unwrap_or(1)),
        None => (spec, 1),
    };
    let _ = ARMED.set((name, nth.max(1)));
}

/// Kills the process here if this failpoint is armed and due.
#[inline]
pub fn hit(name: &str) {
    hit_named(name, "");
}

/// Like [`hit`], for a place reached for several files: armed as
/// `place` (any file) or `place:file`.
#[inline]
pub fn hit_named(place: &str, file: &str) {
    let Some((armed, nth)) = ARMED.get() else { return };
    let matches = match armed.split_once(':') {
        Some((p, f)) => p == place && f == file,
        None => armed == place,
    };
    if matches && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *nth {
        // SAFETY: sending SIGKILL to ourselves; nothing runs after it.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
