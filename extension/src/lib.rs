//! pg_blocktrack: changed-block tracking and online backups for PostgreSQL.
//!
//! This file holds the module lines and the thin SQL layer: every
//! `#[pg_extern]` checks its arguments and calls the module that does the work.
//! All functions live in schema `blocktrack` (see the control file) and are
//! revoked from PUBLIC (`sql/finalize.sql`).

use pgrx::prelude::*;
use pgrx::AnyNumeric;

mod backup_session;
mod engine;
mod errors;
mod guc;
mod jobs;
mod paths;
mod pglsn;
mod pgver;
mod progress;
mod repository;
mod slot;
mod status;
mod summarizer;
mod tracking;
mod validate;
mod wal_records;
mod walread;

use std::time::Duration;

use blockstream::lsn::Lsn;

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
    guc::register();
    status::init();
    progress::init();
    summarizer::register();
}

fn not_null<T>(v: Option<T>, name: &str) -> T {
    v.unwrap_or_else(|| {
        errors::raise(PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED, format!("{name} must not be NULL"), None)
    })
}

fn timeout_ms(ms: i32) -> Duration {
    if ms < 0 {
        errors::raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("wait_timeout_ms must not be negative, got {ms}"),
            None,
        );
    }
    Duration::from_millis(ms as u64)
}

/// Starts an online backup in this session (PostgreSQL's `pg_backup_start`)
/// and holds WAL from its start with a temporary replication slot. With a
/// parent (its start LSN and timeline; its stop LSN and the LSN and CRC of
/// its checkpoint record, from `backup_stop`), waits up to
/// `wait_timeout_ms` for the summaries to reach this backup's start and
/// says whether an incremental backup on that parent is possible, and why
/// not: the changes since it must be known, and it must lie in this
/// server's WAL history.
#[pg_extern(volatile, parallel_unsafe)]
#[allow(clippy::type_complexity, clippy::too_many_arguments)] // one argument per SQL parameter
fn backup_start(
    label: Option<&str>,
    fast: default!(Option<bool>, true),
    parent_start_lsn: default!(Option<PgLsn>, "NULL"),
    parent_tli: default!(Option<i32>, "NULL"),
    wait_timeout_ms: default!(Option<i32>, 60000),
    parent_stop_lsn: default!(Option<PgLsn>, "NULL"),
    parent_checkpoint_lsn: default!(Option<PgLsn>, "NULL"),
    parent_checkpoint_crc: default!(Option<i64>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(start_lsn, PgLsn),
        name!(start_tli, i32),
        name!(system_identifier, AnyNumeric),
        name!(data_checksums, bool),
        name!(slot_name, String),
        name!(incremental_ok, bool),
        name!(reason, Option<String>),
    ),
> {
    let fast = not_null(fast, "fast");
    let timeout = timeout_ms(not_null(wait_timeout_ms, "wait_timeout_ms"));
    if parent_tli.is_some_and(|t| t < 1) {
        errors::raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("parent_tli must be a timeline (1 or more), got {}", parent_tli.unwrap()),
            None,
        );
    }
    let crc = parent_checkpoint_crc.map(|c| {
        u32::try_from(c).unwrap_or_else(|_| {
            errors::raise(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("parent_checkpoint_crc must be a 32-bit CRC (0 to 4294967295), got {c}"),
                None,
            )
        })
    });
    let parent = parent_start_lsn.map(|l| tracking::Parent {
        start: Lsn::from(l),
        timeline: parent_tli.map(|t| t as u32),
        stop: parent_stop_lsn.map(Lsn::from),
        checkpoint: parent_checkpoint_lsn.map(Lsn::from).zip(crc),
    });
    let s = backup_session::start(label, fast);
    // From here on the backup runs: report problems as rows, never as errors.
    let (ok, reason) = tracking::incremental_check(parent, Lsn::from(s.start_lsn), s.start_tli as u32, timeout);
    TableIterator::once((
        s.start_lsn,
        s.start_tli,
        s.system_identifier,
        s.data_checksums,
        s.slot_name,
        ok,
        (!ok).then_some(reason),
    ))
}

/// Stops the backup of this session; returns what the backup needs besides
/// the data files: the stop LSN, `backup_label` and `tablespace_map`, and
/// the LSN and CRC of the checkpoint record the backup starts from (what a
/// later incremental backup uses to prove this one is in its history).
#[pg_extern(volatile, parallel_unsafe)]
#[allow(clippy::type_complexity)]
fn backup_stop(
    wait_for_archive: default!(Option<bool>, false),
) -> TableIterator<
    'static,
    (
        name!(stop_lsn, PgLsn),
        name!(stop_tli, i32),
        name!(labelfile, String),
        name!(spcmapfile, String),
        name!(checkpoint_lsn, Option<PgLsn>),
        name!(checkpoint_crc, Option<i64>),
    ),
> {
    let s = backup_session::stop(not_null(wait_for_archive, "wait_for_archive"));
    TableIterator::once((
        s.stop_lsn,
        s.stop_tli,
        s.labelfile,
        s.spcmapfile,
        s.checkpoint.map(|(l, _)| PgLsn::from(l)),
        s.checkpoint.map(|(_, c)| c as i64),
    ))
}

/// The summarizer's state: positions, lag, slot, memory, last error.
#[pg_extern(volatile, parallel_safe)]
#[allow(clippy::type_complexity)]
fn status() -> TableIterator<
    'static,
    (
        name!(enabled, bool),
        name!(worker_pid, Option<i32>),
        name!(system_identifier, AnyNumeric),
        name!(timeline, i32),
        name!(summarized_lsn, PgLsn),
        name!(pending_lsn, PgLsn),
        name!(flush_lsn, PgLsn),
        name!(lag_bytes, i64),
        name!(valid_since_lsn, PgLsn),
        name!(oldest_summary_lsn, Option<PgLsn>),
        name!(summaries, i64),
        name!(slot_name, String),
        name!(slot_restart_lsn, Option<PgLsn>),
        name!(memory_bytes, i64),
        name!(peak_memory_bytes, i64),
        name!(records, i64),
        name!(last_error, Option<String>),
    ),
> {
    let st = *status::STATUS.share();
    let files = blockstream::blkref::list_summaries(&summarizer::summaries_dir()).unwrap_or_default();
    let slot = guc::slot_name();
    let restart = match slot::inspect(&slot) {
        slot::SlotState::Holding(l) => Some(PgLsn::from(l)),
        _ => None,
    };
    let flush = tracking::flush_lsn();
    // SAFETY: a plain read of the control data.
    let sysid = unsafe { pg_sys::GetSystemIdentifier() };
    TableIterator::once((
        guc::ENABLED.get(),
        (st.pid != 0).then_some(st.pid),
        AnyNumeric::from(sysid),
        st.timeline as i32,
        PgLsn(st.summarized_lsn),
        PgLsn(st.pending_lsn),
        flush.into(),
        flush.0.saturating_sub(st.summarized_lsn) as i64,
        PgLsn(st.valid_since),
        files.first().map(|f| f.start.into()),
        files.len() as i64,
        slot,
        restart,
        st.table_memory as i64,
        st.peak_table_memory as i64,
        st.records as i64,
        st.error(),
    ))
}

/// WAL waiting to be archived, as the server's files show it: segments
/// marked `.ready` in `pg_wal/archive_status` (with `archive-push --async`
/// too: its pusher archives from that queue), the age of the oldest, and
/// the asynchronous pusher's last error in its default spool
/// (`pg_wal/blockstream_spool`). `blocktrack.archive_status()` joins it with
/// `pg_stat_archiver`.
#[pg_extern(volatile, parallel_safe)]
fn archive_queue() -> TableIterator<
    'static,
    (name!(ready_segments, i64), name!(ready_oldest_age_seconds, Option<f64>), name!(spool_error, Option<String>)),
> {
    // Relative to the data directory, the backend's working directory.
    let (mut ready, mut ready_age) = (0i64, None::<f64>);
    for e in std::fs::read_dir("pg_wal/archive_status").into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().ends_with(".ready") {
            ready += 1;
            let age = e.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
            if let Some(a) = age.map(|d| d.as_secs_f64()) {
                ready_age = Some(ready_age.map_or(a, |b: f64| b.max(a)));
            }
        }
    }
    let error = std::fs::read_to_string("pg_wal/blockstream_spool/out.error")
        .ok()
        .map(|s| s.trim().chars().take(1000).collect());
    TableIterator::once((ready, ready_age, error))
}

/// The summary files, oldest first; `is_gap` marks ranges whose changes are unknown.
#[pg_extern(volatile, parallel_safe)]
fn summaries() -> TableIterator<
    'static,
    (
        name!(tli, i32),
        name!(start_lsn, PgLsn),
        name!(end_lsn, PgLsn),
        name!(is_gap, bool),
        name!(relations, i64),
        name!(bytes, i64),
    ),
> {
    let files = blockstream::blkref::list_summaries(&summarizer::summaries_dir())
        .unwrap_or_else(|e| errors::raise(PgSqlErrorCode::ERRCODE_IO_ERROR, e.to_string(), None));
    let rows: Vec<_> = files
        .into_iter()
        .filter_map(|f| {
            // A file removed by the summarizer since the listing is skipped.
            let (h, t) = blockstream::blkref::read_summary(&f.path).ok()?;
            Some((f.timeline as i32, h.start.into(), h.end.into(), h.gap, t.len() as i64, f.bytes as i64))
        })
        .collect();
    TableIterator::new(rows)
}

/// Waits (up to `wait_timeout_ms`) until summaries cover WAL up to `until_lsn`
/// (default: the current end of WAL), asking the summarizer to write one now.
/// Returns the LSN the summaries reach.
#[pg_extern(volatile, parallel_unsafe)]
fn flush_summary(until_lsn: default!(Option<PgLsn>, "NULL"), wait_timeout_ms: default!(Option<i32>, 60000)) -> PgLsn {
    let timeout = timeout_ms(not_null(wait_timeout_ms, "wait_timeout_ms"));
    let flush = tracking::flush_lsn();
    let until = until_lsn.map(Lsn::from).unwrap_or(flush);
    if until > flush {
        errors::raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("until_lsn {until} is in the future: WAL ends at {flush}"),
            None,
        );
    }
    match tracking::wait_for_summary(until, timeout) {
        Ok(l) => l.into(),
        Err(why) => errors::raise(PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, why, None),
    }
}

/// The blocks changed from `since_lsn` to `until_lsn`, one row per relation
/// segment file (blocks relative to the segment, as little-endian u32s).
/// `limit_block` is the fork's limit: blocks at or past it have no older copy,
/// so segments at or past it are copied in full (`full_copy`), also those
/// without a row. A row whose relfilenode is NULL stands for a whole database
/// (CREATE or DROP DATABASE in the range): copy that directory in full.
/// `since_tli`, the timeline `since_lsn` was read on, may be an ancestor of
/// the server's when its history left it after `since_lsn`.
#[pg_extern(volatile, parallel_safe)]
#[allow(clippy::type_complexity)]
fn changed_blocks(
    since_lsn: Option<PgLsn>,
    until_lsn: Option<PgLsn>,
    since_tli: default!(Option<i32>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(path, String),
        name!(spcoid, pg_sys::Oid),
        name!(dboid, pg_sys::Oid),
        name!(relfilenode, Option<pg_sys::Oid>),
        name!(forknum, i16),
        name!(segno, i32),
        name!(limit_block, Option<i64>),
        name!(full_copy, bool),
        name!(nblocks, i32),
        name!(blocks, Vec<u8>),
    ),
> {
    let (since, until) = tracking::check_range(since_lsn.map(Lsn::from), until_lsn.map(Lsn::from));
    if let Some(t) = since_tli.filter(|t| *t < 1) {
        errors::raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("since_tli must be a timeline (1 or more), got {t}"),
            None,
        );
    }
    if let Err(why) = tracking::wait_for_summary(until, Duration::from_secs(60)) {
        errors::raise(PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, why, None);
    }
    let (table, _) = tracking::changes_between(since, until, since_tli.map(|t| t as u32)).unwrap_or_else(|why| {
        errors::raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("changed blocks from {since} to {until} are not known: {why}"),
            Some("take a full backup"),
        )
    });
    let rows: Vec<_> = tracking::segment_rows(&table)
        .into_iter()
        .map(|r| {
            let bytes = blockstream::plan::encode_blocks(&r.blocks);
            (
                r.path,
                pg_sys::Oid::from(r.spc),
                pg_sys::Oid::from(r.db),
                (r.rel != 0).then(|| pg_sys::Oid::from(r.rel)),
                r.fork as i16,
                r.segno as i32,
                r.limit_block.map(i64::from),
                r.full_copy,
                r.blocks.len() as i32,
                bytes,
            )
        })
        .collect();
    TableIterator::new(rows)
}

/// PostgreSQL's own checksum of an 8 kB page as block `blkno` (absolute:
/// segment number times blocks per segment plus the block in the file).
#[pg_extern(immutable, parallel_safe)]
fn page_checksum(page: Option<&[u8]>, blkno: Option<i64>) -> i32 {
    validate::server_page_checksum(page, blkno)
}

/// Checks a backup of the repository at `repo` through the blockstream
/// engine: that it belongs to this cluster, its manifest, the chain of backups
/// it builds on, every chunk and file digest, the WAL from its start to its
/// stop, and the checksum of every stored page. One row per check.
#[pg_extern(volatile, parallel_unsafe)]
fn validate_backup(
    repo: Option<&str>,
    backup_id: default!(Option<&str>, "'latest'"),
) -> TableIterator<'static, (name!(check_name, String), name!(ok, bool), name!(detail, String))> {
    TableIterator::new(validate::validate(repo, backup_id))
}

/// Takes a backup of this cluster into the repository at `repo` in a
/// background worker (full, incr, diff or auto), so a pg_cron job needs no
/// command line. With `wait` (the default) returns the backup id when it is
/// done and raises its error when it fails; without, returns NULL at once
/// (watch `blocktrack.progress`). Needs superuser or pg_write_server_files,
/// a repository under `blocktrack.allowed_repositories`, and the privileges
/// of a backup role.
#[pg_extern(volatile, parallel_unsafe)]
fn run_backup(
    repo: Option<&str>,
    r#type: default!(Option<&str>, "'auto'"),
    jobs: default!(Option<i32>, 2),
    compress: default!(Option<&str>, "'zstd:3'"),
    wait: default!(Option<bool>, true),
) -> Option<String> {
    jobs::run(
        repo,
        not_null(r#type, "type"),
        not_null(jobs, "jobs"),
        not_null(compress, "compress"),
        not_null(wait, "wait"),
    )
}

/// Asks running backups to stop (all, or the one whose `pid` shows in
/// `blocktrack.progress`); returns how many were asked. A backup started
/// from SQL also stops on `pg_cancel_backend` or `pg_terminate_backend`.
#[pg_extern(volatile, parallel_unsafe)]
fn cancel_backup(pid: default!(Option<i32>, "NULL")) -> i64 {
    jobs::cancel(pid)
}

/// The jobs running now, started from SQL or by the command line; the view
/// `blocktrack.progress` shows them.
#[pg_extern(volatile, parallel_safe)]
#[allow(clippy::type_complexity)]
fn progress_rows() -> TableIterator<
    'static,
    (
        name!(pid, i32),
        name!(kind, String),
        name!(source, String),
        name!(repository, String),
        name!(phase, String),
        name!(files_done, i64),
        name!(files_total, i64),
        name!(bytes_done, i64),
        name!(bytes_total, i64),
        name!(streams, i32),
        name!(mib_per_sec, f64),
        name!(elapsed_secs, f64),
        name!(remaining_secs, Option<f64>),
        name!(cancel_requested, bool),
    ),
> {
    let all = *progress::JOBS.share();
    let rows: Vec<_> = all
        .slots
        .iter()
        .filter(|s| s.active())
        .map(|s| {
            let r = blockstream::progress::Report {
                phase: progress::get(&s.phase),
                bytes_done: s.bytes_done,
                bytes_total: s.bytes_total,
                files_done: s.files_done,
                files_total: s.files_total,
                streams: s.streams as u64,
                elapsed_secs: s.elapsed_secs,
                phase_secs: s.phase_secs,
            };
            (
                if s.pid != 0 { s.pid } else { s.requester },
                match s.kind {
                    progress::KIND_VERIFY => "verify",
                    progress::KIND_RESTORE => "restore",
                    _ => "backup",
                }
                .to_string(),
                if s.source == progress::SOURCE_CLI { "cli" } else { "sql" }.to_string(),
                progress::get(&s.repo),
                r.phase.clone(),
                s.files_done as i64,
                s.files_total as i64,
                s.bytes_done as i64,
                s.bytes_total as i64,
                s.streams as i32,
                r.mib_per_sec(),
                s.elapsed_secs,
                r.remaining_secs(),
                s.cancel,
            )
        })
        .collect();
    TableIterator::new(rows)
}

/// How the command line reports a backup it runs over this session; the
/// phase `done` ends the report. Returns whether the backup should stop
/// (`cancel_backup`).
#[pg_extern(volatile, parallel_unsafe)]
#[allow(clippy::too_many_arguments)] // one argument per SQL parameter
fn progress_report(
    kind: Option<&str>,
    phase: Option<&str>,
    bytes_done: default!(Option<i64>, 0),
    bytes_total: default!(Option<i64>, 0),
    files_done: default!(Option<i64>, 0),
    files_total: default!(Option<i64>, 0),
    streams: default!(Option<i32>, 0),
    elapsed_secs: default!(Option<f64>, 0.0),
    phase_secs: default!(Option<f64>, 0.0),
    repository: default!(Option<&str>, "NULL"),
) -> bool {
    let kind = match not_null(kind, "kind") {
        "backup" => progress::KIND_BACKUP,
        "verify" => progress::KIND_VERIFY,
        "restore" => progress::KIND_RESTORE,
        k => errors::raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("kind \"{k}\" is not one of backup, verify, restore"),
            None,
        ),
    };
    let phase = not_null(phase, "phase");
    // SAFETY: this backend's own pid.
    let me = unsafe { pg_sys::MyProcPid };
    let Some(i) = progress::cli_slot(me) else { return false };
    if phase == "done" {
        progress::JOBS.exclusive().slots[i].state = progress::FREE;
        return false;
    }
    let nonneg = |v: Option<i64>| v.unwrap_or(0).max(0) as u64;
    let mut all = progress::JOBS.exclusive();
    let s = &mut all.slots[i];
    s.kind = kind;
    progress::put(&mut s.phase, phase);
    if let Some(r) = repository {
        progress::put(&mut s.repo, r);
    }
    s.bytes_done = nonneg(bytes_done);
    s.bytes_total = nonneg(bytes_total);
    s.files_done = nonneg(files_done);
    s.files_total = nonneg(files_total);
    s.streams = streams.unwrap_or(0).max(0) as u32;
    s.elapsed_secs = elapsed_secs.unwrap_or(0.0).max(0.0);
    s.phase_secs = phase_secs.unwrap_or(0.0).max(0.0);
    s.cancel
}

/// One row per backup of the repository at `repo`: what it is, its sizes
/// and times, its status, and its last verify and drill.
#[pg_extern(volatile, parallel_safe)]
#[allow(clippy::type_complexity)]
fn backups(
    repo: Option<&str>,
) -> TableIterator<
    'static,
    (
        name!(backup_id, String),
        name!(backup_type, String),
        name!(parent, Option<String>),
        name!(status, String),
        name!(start_time, Option<pgrx::datum::TimestampWithTimeZone>),
        name!(stop_time, Option<pgrx::datum::TimestampWithTimeZone>),
        name!(start_lsn, Option<String>),
        name!(stop_lsn, Option<String>),
        name!(timeline, i32),
        name!(duration_secs, f64),
        name!(bytes_read, i64),
        name!(bytes_written, i64),
        name!(restored_bytes, i64),
        name!(compression_ratio, f64),
        name!(changed_share, Option<f64>),
        name!(last_verify_time, Option<pgrx::datum::TimestampWithTimeZone>),
        name!(last_verify_ok, Option<bool>),
        name!(last_drill_time, Option<pgrx::datum::TimestampWithTimeZone>),
        name!(last_drill_ok, Option<bool>),
        name!(last_drill_rto_secs, Option<f64>),
        name!(detail, Option<String>),
    ),
> {
    let ts = |s: &str| {
        blockstream::timefmt::parse_iso8601(s).and_then(|secs| {
            pgrx::datum::TimestampWithTimeZone::try_from(pg_sys::TimestampTz::from(
                (secs as i64 - 946_684_800) * 1_000_000,
            ))
            .ok()
        })
    };
    let rows: Vec<_> = repository::backups(repo)
        .into_iter()
        .map(|r| {
            (
                r.backup_id.clone(),
                r.backup_type.clone(),
                r.parent.clone(),
                r.status.clone(),
                ts(&r.start_time),
                ts(&r.stop_time),
                (!r.start_lsn.is_empty()).then(|| r.start_lsn.clone()),
                (!r.stop_lsn.is_empty()).then(|| r.stop_lsn.clone()),
                r.timeline as i32,
                r.duration_secs,
                r.bytes_read as i64,
                r.bytes_written as i64,
                r.restored_bytes as i64,
                r.compression_ratio,
                r.changed_share,
                r.last_verify.as_ref().and_then(|o| ts(&o.time)),
                r.last_verify.as_ref().map(|o| o.ok),
                r.last_drill.as_ref().and_then(|o| ts(&o.time)),
                r.last_drill.as_ref().map(|o| o.ok),
                r.last_drill.as_ref().and_then(|o| o.rto_secs),
                r.detail.clone(),
            )
        })
        .collect();
    TableIterator::new(rows)
}

/// The Prometheus samples of the repository at `repo` (what `blockstream
/// metrics` prints, plus the summarizer's lag), one row each, for
/// postgres_exporter; `labels` is in Prometheus' `{k="v"}` form.
#[pg_extern(volatile, parallel_safe)]
#[allow(clippy::type_complexity)]
fn metrics(
    repo: Option<&str>,
) -> TableIterator<
    'static,
    (name!(metric, String), name!(labels, String), name!(value, f64), name!(kind, String), name!(help, String)),
> {
    let rows: Vec<_> = repository::metrics(repo)
        .into_iter()
        .map(|s| (s.name.clone(), s.label_text(), s.value, s.kind.to_string(), s.help.to_string()))
        .collect();
    TableIterator::new(rows)
}

/// Retention, as `blockstream expire`: keep the newest `retain_full` full
/// backups, `retain_diff` differential ones, `retain_incr` incremental ones
/// or those younger than `retain_days`, and whatever a kept backup needs.
/// One row per backup: whether it expires, whether it was removed, why.
#[pg_extern(volatile, parallel_unsafe)]
fn expire(
    repo: Option<&str>,
    retain_full: Option<i32>,
    retain_diff: default!(Option<i32>, "NULL"),
    retain_incr: default!(Option<i32>, "NULL"),
    retain_days: default!(Option<f64>, "NULL"),
    dry_run: default!(Option<bool>, false),
) -> TableIterator<'static, (name!(backup_id, String), name!(expire, bool), name!(removed, bool), name!(reason, String))>
{
    let count = |v: Option<i32>, name: &str| {
        v.map(|n| {
            usize::try_from(n).unwrap_or_else(|_| {
                errors::raise(
                    PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                    format!("{name} must not be negative, got {n}"),
                    None,
                )
            })
        })
    };
    let policy = blockstream::expire::Policy {
        retain_full: count(Some(not_null(retain_full, "retain_full")), "retain_full").unwrap_or(0),
        retain_diff: count(retain_diff, "retain_diff"),
        retain_incr: count(retain_incr, "retain_incr"),
        retain_days,
    };
    let rows: Vec<_> = repository::expire(repo, policy, not_null(dry_run, "dry_run"))
        .into_iter()
        .map(|(d, removed)| (d.backup_id, d.expire, removed, d.reason))
        .collect();
    TableIterator::new(rows)
}

/// Verifies one backup (or all) of the repository at `repo`, as `blockstream
/// verify`, and records the outcome in its verify log.
#[pg_extern(volatile, parallel_unsafe)]
fn run_verify(
    repo: Option<&str>,
    backup_id: default!(Option<&str>, "NULL"),
) -> TableIterator<
    'static,
    (name!(backup_id, String), name!(ok, bool), name!(problems, i64), name!(detail, Option<String>)),
> {
    TableIterator::new(repository::verify(repo, backup_id))
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
        let (label, after) = Spi::get_two::<String, bool>(&format!(
            "SELECT labelfile, stop_lsn >= '{}'::pg_lsn AND checkpoint_lsn >= '{}'::pg_lsn AND checkpoint_crc IS NOT NULL \
             FROM blocktrack.backup_stop()",
            lsn.as_deref().unwrap(),
            lsn.as_deref().unwrap()
        ))
        .unwrap();
        assert!(label.unwrap().contains("LABEL: pg_test"));
        assert_eq!(after, Some(true), "the stop LSN and the checkpoint come after the start");
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
