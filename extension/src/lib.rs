//! pg_blocktrack: changed-block tracking and online backups for PostgreSQL.
//!
//! This file holds the module lines and the thin SQL layer: every
//! `#[pg_extern]` checks its arguments and calls the module that does the work.
//! All functions live in schema `blocktrack` (see the control file) and are
//! revoked from PUBLIC (`sql/finalize.sql`).

use pgrx::prelude::*;

mod backup_session;
mod errors;
mod pglsn;

pub use pglsn::PgLsn;

::pgrx::pg_module_magic!(name, version);

pgrx::extension_sql_file!("../../sql/finalize.sql", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // SAFETY: a backend global, read while the library is being loaded.
    if unsafe { !pg_sys::process_shared_preload_libraries_in_progress } {
        errors::raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "pg_blocktrack must be loaded via shared_preload_libraries",
            Some("add pg_blocktrack to shared_preload_libraries in postgresql.conf and restart the server"),
        );
    }
}

/// Starts an online backup in this session (PostgreSQL's `pg_backup_start`)
/// and holds WAL from its start with a temporary replication slot.
#[pg_extern(volatile, parallel_unsafe)]
fn backup_start(
    label: Option<&str>,
    fast: default!(bool, true),
) -> TableIterator<
    'static,
    (
        name!(start_lsn, PgLsn),
        name!(start_tli, i32),
        name!(system_identifier, AnyNumeric),
        name!(data_checksums, bool),
        name!(slot_name, String),
    ),
> {
    let s = backup_session::start(label, fast);
    TableIterator::once((s.start_lsn, s.start_tli, s.system_identifier, s.data_checksums, s.slot_name))
}

/// Stops the backup of this session; returns what the backup needs besides
/// the data files: the stop LSN, `backup_label` and `tablespace_map`.
#[pg_extern(volatile, parallel_unsafe)]
fn backup_stop(
    wait_for_archive: default!(bool, false),
) -> TableIterator<
    'static,
    (name!(stop_lsn, PgLsn), name!(stop_tli, i32), name!(labelfile, String), name!(spcmapfile, String)),
> {
    let s = backup_session::stop(wait_for_archive);
    TableIterator::once((s.stop_lsn, s.stop_tli, s.labelfile, s.spcmapfile))
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn backup_start_then_stop_in_one_session() {
        let (lsn, tli) = Spi::get_two::<String, i32>(
            "SELECT start_lsn::text, start_tli FROM blocktrack.backup_start('pg_test', true)",
        )
        .unwrap();
        assert!(lsn.is_some() && tli.unwrap() >= 1);
        let slots = Spi::get_one::<i64>(
            "SELECT count(*) FROM pg_replication_slots WHERE temporary AND active_pid = pg_backend_pid()",
        )
        .unwrap();
        assert_eq!(slots, Some(1), "the backup holds WAL with a temporary slot");
        let (label, after) =
            Spi::get_two::<String, bool>("SELECT labelfile, stop_lsn >= $$0/0$$::pg_lsn FROM blocktrack.backup_stop()")
                .unwrap();
        assert!(label.unwrap().contains("LABEL: pg_test"));
        assert_eq!(after, Some(true));
    }

    #[pg_test(error = "no backup is running in this session")]
    fn backup_stop_without_start_is_refused() {
        Spi::run("SELECT * FROM blocktrack.backup_stop()").unwrap();
    }

    #[pg_test(error = "a backup is already running in this session")]
    fn second_backup_start_is_refused() {
        Spi::run("SELECT * FROM blocktrack.backup_start('one')").unwrap();
        Spi::run("SELECT * FROM blocktrack.backup_start('two')").unwrap();
    }
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["shared_preload_libraries = 'pg_blocktrack'", "wal_level = replica"]
    }
}
