//! Settings of pg_blocktrack (all in the `blocktrack.` namespace).

use std::ffi::CString;

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

/// Summarize WAL into changed-block sets. Turning it off drops the WAL-holding
/// slot; turning it back on starts a new unbroken range (a gap for older parents).
pub static ENABLED: GucSetting<bool> = GucSetting::<bool>::new(true);
/// Summary files older than this many minutes are removed (0 keeps them forever).
pub static SUMMARY_KEEP_TIME: GucSetting<i32> = GucSetting::<i32>::new(7 * 24 * 60);
/// A summary is written once the in-memory table passes this many MB.
pub static MAX_SUMMARY_MEMORY: GucSetting<i32> = GucSetting::<i32>::new(64);
/// A summary is written at least this often (seconds) while WAL is being written.
pub static SUMMARY_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(60);
/// Directories (comma-separated) that repositories named in SQL must lie under;
/// empty allows none. Superuser-only.
pub static ALLOWED_REPOSITORIES: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// The key of encrypted repositories: a passphrase file, or a raw key file.
pub static PASSPHRASE_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static KEY_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// The persistent physical replication slot that holds WAL until it is summarized.
pub static SLOT_NAME: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"pg_blocktrack"));

pub fn register() {
    GucRegistry::define_bool_guc(
        c"blocktrack.enabled",
        c"Summarize WAL into changed-block sets for incremental backups.",
        c"Off drops the replication slot that holds WAL for the summarizer; back on, tracking restarts and older backups cannot be incremental parents.",
        &ENABLED,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"blocktrack.summary_keep_time",
        c"Minutes to keep WAL summaries (0 keeps them forever).",
        c"Incremental backups need summaries back to their parent's start.",
        &SUMMARY_KEEP_TIME,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_MIN,
    );
    GucRegistry::define_int_guc(
        c"blocktrack.max_summary_memory",
        c"Memory of the summarizer's block table before it is written out.",
        c"",
        &MAX_SUMMARY_MEMORY,
        1,
        64 * 1024,
        GucContext::Sighup,
        GucFlags::UNIT_MB,
    );
    GucRegistry::define_int_guc(
        c"blocktrack.summary_interval",
        c"Longest time between two WAL summaries while WAL is written.",
        c"",
        &SUMMARY_INTERVAL,
        1,
        24 * 3600,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_string_guc(
        c"blocktrack.allowed_repositories",
        c"Directories (comma-separated) that repositories named in SQL must lie under.",
        c"Empty allows none. Paths are compared after resolving symbolic links and \"..\".",
        &ALLOWED_REPOSITORIES,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"blocktrack.passphrase_file",
        c"File holding the passphrase of encrypted repositories (mode 0600, owned by the server's user).",
        c"Superuser-only; the passphrase itself never appears in SQL.",
        &PASSPHRASE_FILE,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"blocktrack.key_file",
        c"File holding the raw 32-byte key of encrypted repositories (mode 0600), instead of a passphrase.",
        c"Superuser-only.",
        &KEY_FILE,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"blocktrack.slot_name",
        c"Name of the physical replication slot that holds WAL until it is summarized.",
        c"",
        &SLOT_NAME,
        GucContext::Postmaster,
        GucFlags::default(),
    );
}

pub fn slot_name() -> String {
    SLOT_NAME.get().map(|c| c.to_string_lossy().into_owned()).unwrap_or_else(|| "pg_blocktrack".into())
}

fn text(g: &GucSetting<Option<CString>>) -> String {
    g.get().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
}

/// (passphrase file, key file), empty when unset.
pub fn key_files() -> (String, String) {
    (text(&PASSPHRASE_FILE), text(&KEY_FILE))
}

pub fn allowed_repositories() -> String {
    ALLOWED_REPOSITORIES.get().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
}
