//! SQL over a repository: its catalog, its metrics, retention and verify.
//! The engine does the work (on an engine thread, cancellable, as
//! `validate_backup` does); paths follow [`crate::paths`].

use blockstream::catalog::{self, BackupRow};
use blockstream::expire::{self, Decision, Policy};
use blockstream::metrics::{self, Sample, ServerFacts};
use blockstream::repo::Repo;
use blockstream::verify::verify_backup;
use pgrx::prelude::*;

use crate::engine;
use crate::errors::raise;
use crate::paths::{self, Access};

fn open(root: &std::path::Path) -> Repo {
    paths::open_repo(root, &paths::encryption())
        .unwrap_or_else(|e| raise(PgSqlErrorCode::ERRCODE_UNDEFINED_FILE, e.to_string(), None))
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The catalog of the repository at `repo`.
pub fn backups(repo: Option<&str>) -> Vec<BackupRow> {
    let root = paths::check_repository(repo, Access::Read);
    let enc = paths::encryption();
    let r = engine::run(move |_| {
        let repo = paths::open_repo(&root, &enc)?;
        catalog::list(&repo)
    });
    r.unwrap_or_else(|e| raise(PgSqlErrorCode::ERRCODE_UNDEFINED_FILE, e.to_string(), None))
}

/// The samples `blockstream metrics` prints, plus the summarizer's lag.
pub fn metrics(repo: Option<&str>) -> Vec<Sample> {
    let root = paths::check_repository(repo, Access::Read);
    let lag = {
        let st = *crate::status::STATUS.share();
        crate::tracking::flush_lsn().0.saturating_sub(st.summarized_lsn)
    };
    let failed =
        Spi::get_one::<i64>("SELECT failed_count FROM pg_stat_archiver").ok().flatten().map(|n| n.max(0) as u64);
    let enc = paths::encryption();
    let r = engine::run(move |_| {
        let repo = paths::open_repo(&root, &enc)?;
        let rows = catalog::list(&repo)?;
        let seg =
            rows.last().and_then(|r| repo.load_manifest(&r.backup_id).ok()).map_or(16 << 20, |m| m.wal_segment_size);
        Ok::<_, blockstream::Error>(metrics::samples(
            &rows,
            repo.store().total_bytes(),
            now(),
            ServerFacts { summarizer_lag_bytes: Some(lag), archive_failed_count: failed },
            blockstream::archive::facts(&repo, seg).as_ref(),
        ))
    });
    r.unwrap_or_else(|e| raise(PgSqlErrorCode::ERRCODE_UNDEFINED_FILE, e.to_string(), None))
}

/// Retention under `policy`: the decisions, carried out unless `dry_run`.
pub fn expire(repo: Option<&str>, policy: Policy, dry_run: bool) -> Vec<(Decision, bool)> {
    let root = paths::check_repository(repo, if dry_run { Access::Read } else { Access::Write });
    if let Err(e) = policy.check() {
        raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, e.to_string(), None);
    }
    let _ = open(&root);
    let enc = paths::encryption();
    let r = engine::run(move |_| {
        let repo = paths::open_repo(&root, &enc)?;
        let lock = if dry_run { None } else { Some(repo.lock()?) };
        if let Some(l) = &lock {
            repo.remove_incomplete(l)?;
        }
        let decisions = expire::plan(&expire::entries(&repo)?, &policy, now());
        let removed = match &lock {
            Some(l) => expire::execute(&repo, l, &decisions)?,
            None => Vec::new(),
        };
        if let Some((start, seg)) = expire::oldest_kept(&repo, &decisions) {
            expire::prune_archive(&repo, start, seg, dry_run)?;
        }
        Ok::<_, blockstream::Error>(
            decisions
                .into_iter()
                .map(|d| {
                    let done = removed.contains(&d.backup_id);
                    (d, done)
                })
                .collect(),
        )
    });
    r.unwrap_or_else(|e| raise(PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, e.to_string(), None))
}

/// Verifies one backup, or every one, and records the outcome in the
/// repository's verify log: (backup id, ok, problems, first problem).
pub fn verify(repo: Option<&str>, backup_id: Option<&str>) -> Vec<(String, bool, i64, Option<String>)> {
    let root = paths::check_repository(repo, Access::Write);
    let repository = open(&root);
    let ids = match backup_id {
        None => repository
            .backup_ids()
            .unwrap_or_else(|e| raise(PgSqlErrorCode::ERRCODE_UNDEFINED_FILE, e.to_string(), None)),
        Some(id) => vec![repository
            .resolve(id)
            .unwrap_or_else(|e| raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, e.to_string(), None))],
    };
    let jobs = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(4);
    let enc = paths::encryption();
    engine::run(move |progress| {
        let repo = paths::open_repo(&root, &enc).expect("opened above");
        ids.iter()
            .map(|id| {
                let check = verify_backup(&repo, id, jobs, progress);
                let first = check.problems.first().map(|p| format!("{}: {}", p.check, p.detail));
                let record = serde_json::json!({
                    "backup_id": id,
                    "time": blockstream::timefmt::iso8601(std::time::SystemTime::now()),
                    "ok": check.problems.is_empty(),
                    "problems": check.problems,
                    "secs": check.secs,
                    "stored_bytes": check.stored_bytes,
                    "source": "sql",
                });
                let _ = catalog::append_log(&repo, catalog::VERIFY_LOG, &record);
                (id.clone(), check.problems.is_empty(), check.problems.len() as i64, first)
            })
            .collect()
    })
}
