//! `backup_start` / `backup_stop`: an online backup held by the calling session.
//!
//! Both go through SPI to PostgreSQL's own `pg_backup_start` / `pg_backup_stop`
//! in the caller's backend, so the backup belongs to that session: PostgreSQL
//! aborts it if the session ends. WAL from the start on is held by a
//! temporary physical replication slot created before the backup starts (its
//! restart LSN is the redo pointer at that moment, which is not later than the
//! backup's checkpoint); the slot lives until the session ends or the next
//! `backup_start`, so the caller can copy WAL up to the stop LSN after `backup_stop`.

use blockstream::backup_label::BackupLabel;
use blockstream::lsn::Lsn;
use pgrx::prelude::*;
use pgrx::AnyNumeric;

use crate::errors::raise;
use crate::walread;
use crate::PgLsn;

pub struct Started {
    pub start_lsn: PgLsn,
    pub start_tli: i32,
    pub system_identifier: AnyNumeric,
    pub data_checksums: bool,
    pub slot_name: String,
}

pub struct Stopped {
    pub stop_lsn: PgLsn,
    pub stop_tli: i32,
    pub labelfile: String,
    pub spcmapfile: String,
    /// The checkpoint record the backup starts from (backup_label's
    /// CHECKPOINT LOCATION) and its CRC, when it can be read.
    pub checkpoint: Option<(Lsn, u32)>,
}

fn backup_running() -> bool {
    // SAFETY: reads this backend's session backup state.
    unsafe { pg_sys::get_backup_status() == pg_sys::SessionBackupState::SESSION_BACKUP_RUNNING }
}

fn slot_name() -> String {
    // SAFETY: MyProcPid is set for every backend before any function runs.
    format!("blocktrack_backup_{}", unsafe { pg_sys::MyProcPid })
}

/// Runs a SELECT for its effect, through read-only SPI (as every query
/// here: a standby cannot assign the transaction id a modifying SPI call
/// takes, and none of these changes a table).
pub fn select(query: &str, args: &[pgrx::datum::DatumWithOid]) -> Result<(), pgrx::spi::SpiError> {
    Spi::connect(|client| client.select(query, None, args).map(|_| ()))
}

fn spi_text(query: &str, args: &[pgrx::datum::DatumWithOid]) -> String {
    match Spi::connect(|client| client.select(query, Some(1), args)?.first().get_one::<String>()) {
        Ok(Some(s)) => s,
        Ok(None) => error!("\"{query}\" returned NULL"),
        Err(e) => error!("\"{query}\" failed: {e}"),
    }
}

/// The timeline WAL is written on now (or replayed, on a standby).
fn current_timeline() -> i32 {
    // SAFETY: plain reads of shared state, valid in any backend.
    unsafe {
        if !pg_sys::RecoveryInProgress() {
            return pg_sys::GetWALInsertionTimeLine() as i32;
        }
    }
    spi_text("SELECT timeline_id::text FROM pg_control_checkpoint()", &[])
        .parse()
        .unwrap_or_else(|_| error!("pg_control_checkpoint() returned a timeline that is not a number"))
}

pub fn start(label: Option<&str>, fast: bool) -> Started {
    let Some(label) = label else {
        raise(PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED, "backup label must not be NULL", None);
    };
    if label.is_empty() {
        raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, "backup label must not be empty", None);
    }
    if label.len() >= 1024 || label.contains('\n') {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("backup label of {} bytes is refused: it must be one line of at most 1023 bytes", label.len()),
            None,
        );
    }
    if backup_running() {
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "a backup is already running in this session",
            Some("call blocktrack.backup_stop() before starting another one"),
        );
    }
    let slot = slot_name();
    // A slot left by an earlier backup of this session is ours to replace.
    select(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
         WHERE slot_name = $1 AND temporary AND active_pid = pg_backend_pid()",
        &[slot.as_str().into()],
    )
    .unwrap_or_else(|e| error!("could not drop replication slot \"{slot}\": {e}"));
    select("SELECT pg_create_physical_replication_slot($1, true, true)", &[slot.as_str().into()])
        .unwrap_or_else(|e| error!("could not create temporary replication slot \"{slot}\": {e}"));
    let lsn = spi_text("SELECT pg_backup_start($1, $2)::text", &[label.into(), fast.into()]);
    let lsn: Lsn = lsn.parse().unwrap_or_else(|e| error!("pg_backup_start returned \"{lsn}\": {e}"));
    // SAFETY: plain reads of the control data.
    let (sysid, checksums) = unsafe { (pg_sys::GetSystemIdentifier(), pg_sys::DataChecksumsEnabled()) };
    Started {
        start_lsn: lsn.into(),
        start_tli: current_timeline(),
        system_identifier: AnyNumeric::from(sysid),
        data_checksums: checksums,
        slot_name: slot,
    }
}

pub fn stop(wait_for_archive: bool) -> Stopped {
    if !backup_running() {
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "no backup is running in this session",
            Some("call blocktrack.backup_start() first, in the same session"),
        );
    }
    let row = Spi::connect(|client| {
        client
            .select(
                "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop($1)",
                Some(1),
                &[wait_for_archive.into()],
            )?
            .first()
            .get_three::<String, String, String>()
    })
    .unwrap_or_else(|e| error!("pg_backup_stop failed: {e}"));
    let (Some(lsn), Some(labelfile), spcmapfile) = row else { error!("pg_backup_stop returned NULL") };
    let lsn: Lsn = lsn.parse().unwrap_or_else(|e| error!("pg_backup_stop returned \"{lsn}\": {e}"));
    let checkpoint = match BackupLabel::parse(&labelfile) {
        Ok(l) => match walread::record_crc(l.checkpoint_lsn.0) {
            Ok(crc) => Some((l.checkpoint_lsn, crc)),
            Err(why) => {
                warning!("pg_blocktrack: could not read the checkpoint record at {}: {why}", l.checkpoint_lsn);
                None
            }
        },
        Err(e) => {
            warning!("pg_blocktrack: {e}");
            None
        }
    };
    Stopped {
        stop_lsn: lsn.into(),
        stop_tli: current_timeline(),
        labelfile,
        spcmapfile: spcmapfile.unwrap_or_default(),
        checkpoint,
    }
}
