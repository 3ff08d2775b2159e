//! One function per command: options from flags, the engine, the summary.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use blockstream::backup::{run_backup, BackupMode, BackupOptions};
use blockstream::copy::CopyConfig;
use blockstream::manifest::Manifest;
use blockstream::progress::Progress;
use blockstream::repo::Repo;
use blockstream::restore::{run_restore, RecoveryTarget, RestoreOptions};
use blockstream::verify::{verify_backup, PieceCheck};
use serde_json::json;

use super::args::{
    BackupArgs, BackupKind, Checkpoint, CleanupArgs, Cli, Command, ExpireArgs, InfoArgs, KeyCommand, KeyRotateArgs,
    MergeArgs, MetricsArgs, Output, ReportArgs, RestoreArgs, RetentionArgs, VerifyArgs,
};
use super::output::{mib, with_progress};
use super::session::PgSession;
use super::usage_error;

pub fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Backup(a) => backup(a),
        Command::Restore(a) => restore(a),
        Command::Info(a) => info(a),
        Command::Verify(a) => verify(a),
        Command::Drill(a) => super::drill::drill(a),
        Command::ArchiveGet(a) => super::archive::archive_get(a),
        Command::ArchivePush(a) => super::archive::archive_push(a),
        Command::WalReceive(a) => super::receive::wal_receive(a),
        Command::ArchivePushDaemon(a) => super::archive::push_daemon(a),
        Command::ArchiveGetDaemon(a) => super::archive::get_daemon(a),
        Command::Metrics(a) => metrics(a),
        Command::Expire(a) => expire(a),
        Command::Merge(a) => merge(a),
        Command::Report(a) => report(a),
        Command::Cleanup(a) => cleanup(a),
        Command::Key(KeyCommand::Rotate(a)) => key_rotate(a),
    }
}

/// Progress bars: when asked for, or by default when both stdout and
/// stderr are terminals and the output is text.
fn progress_on(flag: bool, output: Output) -> bool {
    // SAFETY: isatty has no preconditions.
    flag || (output == Output::Text && unsafe { libc::isatty(1) == 1 && libc::isatty(2) == 1 })
}

/// Run as root, a command that writes into a repository (a log line, a
/// removal) becomes the repository's owner first, so that what it writes
/// belongs to the same user as the rest of the repository.
fn become_repo_owner(repo: &Repo) -> anyhow::Result<()> {
    if !blockstream::privs::is_root() {
        return Ok(());
    }
    let Some(root) = repo.local_root() else { return Ok(()) };
    match blockstream::privs::owner_of(root) {
        Some(0) | None => Ok(()),
        Some(uid) => Ok(blockstream::privs::become_user(&blockstream::privs::user_by_uid(uid)?)?),
    }
}

fn absolute(p: &Path) -> PathBuf {
    if blockstream::storage::is_url(p) {
        return p.to_path_buf();
    }
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

fn backup(a: BackupArgs) -> anyhow::Result<ExitCode> {
    let mode = match a.kind {
        BackupKind::Full => BackupMode::Full,
        BackupKind::Incr => BackupMode::Incr,
        BackupKind::Diff => BackupMode::Diff,
        BackupKind::Auto => BackupMode::Auto,
    };
    let mut session = PgSession::connect(&a.conn)?;
    let pgdata = match a.pgdata.clone().or_else(|| std::env::var_os("PGDATA").map(PathBuf::from)) {
        Some(p) => p,
        None => session
            .data_directory()
            .map(PathBuf::from)
            .context("no data directory given and the server does not show it to this user: use -D or set PGDATA")?,
    };
    // Read the key files while still the invoking user (they are 0600).
    let encryption = super::encryption(&a.keys)?;
    become_cluster_owner(&pgdata)?;
    let opts = BackupOptions {
        pgdata: absolute(&pgdata),
        repo: blockstream::storage::at(&super::repo_arg(&a.repo))?,
        jobs: a.jobs,
        copy: CopyConfig { compression: a.compress, max_rate: a.max_rate, ..CopyConfig::default() },
        label: a.label.clone(),
        fast: a.checkpoint == Checkpoint::Fast,
        mode,
        no_fallback: a.no_fallback,
        verify_checksums: !a.no_verify_checksums,
        allow_checksum_failures: a.allow_checksum_failures,
        encryption,
        merge_of: None,
    };
    let progress = std::sync::Arc::new(Progress::default());
    let reporter = session.report("backup", opts.repo.location(), progress.clone());
    let m = with_progress(progress_on(a.progress, a.output), &progress, || run_backup(&opts, &mut session, &progress));
    drop(reporter);
    let m = m?;
    if let Some(why) = &m.full_reason {
        eprintln!("blockstream: took a full backup: {why}");
    }
    let s = &m.stats;
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&backup_json(&m, &opts.repo.location()))?),
        Output::Text => {
            println!(
                "backup {} ({}) of {} done in {:.1} s",
                m.backup_id,
                type_name(&m),
                session.target(),
                s.duration_secs
            );
            if let Some(p) = &m.parent {
                println!(
                    "  builds on {p}: {} of {} blocks changed in {} incremental files ({:.2}%)",
                    s.changed_blocks,
                    s.trackable_blocks,
                    s.incremental_files,
                    100.0 * s.changed_blocks as f64 / s.trackable_blocks.max(1) as f64
                );
            }
            println!("  start {}  stop {}  timeline {}", m.start_lsn, m.stop_lsn, m.timeline);
            println!(
                "  read    {} ({} data + {} WAL) in {} files",
                mib(s.bytes_read),
                mib(s.data_bytes),
                mib(s.wal_bytes),
                s.files
            );
            println!(
                "  written {} in {} streams, ratio {:.2}x ({})",
                mib(s.bytes_written),
                m.streams.len(),
                s.compression_ratio,
                blockstream::codec::describe(&m.filters)
            );
            println!("  {:.1} MiB/s; {:.1} s in pg_backup_start/stop", s.throughput_mib_s, s.server_secs);
            println!("  repository {}", opts.repo.location());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Run as root, a backup becomes the owner of the data directory before it
/// reads or writes anything: the repository then belongs to the cluster's
/// owner (mode 0750/0640), the server can read it (validate_backup,
/// archive-get), and no file the owner could not read ends up in it.
fn become_cluster_owner(pgdata: &Path) -> anyhow::Result<()> {
    if !blockstream::privs::is_root() {
        return Ok(());
    }
    let uid = blockstream::privs::owner_of(pgdata)
        .with_context(|| format!("could not stat data directory \"{}\"", pgdata.display()))?;
    if uid == 0 {
        anyhow::bail!(
            "data directory \"{}\" is owned by root: it is not a PostgreSQL data directory",
            pgdata.display()
        );
    }
    let user = blockstream::privs::user_by_uid(uid)?;
    blockstream::privs::become_user(&user)?;
    Ok(())
}

fn type_name(m: &Manifest) -> &'static str {
    match m.backup_type {
        blockstream::manifest::BackupType::Full => "full",
        blockstream::manifest::BackupType::Incr => "incr",
        blockstream::manifest::BackupType::Diff => "diff",
    }
}

fn backup_json(m: &Manifest, repo: &str) -> serde_json::Value {
    json!({
        "backup_id": m.backup_id,
        "type": type_name(m),
        "parent": m.parent,
        "repository": repo,
        "label": m.label,
        "system_identifier": m.system_identifier.to_string(),
        "timeline": m.timeline,
        "start_lsn": m.start_lsn.to_string(),
        "stop_lsn": m.stop_lsn.to_string(),
        "start_time": m.start_time,
        "stop_time": m.stop_time,
        "compression": blockstream::codec::describe(&m.filters),
        "filters": m.filters,
        "streams": m.streams.len(),
        "full_reason": m.full_reason,
        "changed_share": if m.parent.is_some() {
            json!(m.stats.changed_blocks as f64 / m.stats.trackable_blocks.max(1) as f64)
        } else {
            serde_json::Value::Null
        },
        "stats": m.stats,
    })
}

/// Quotes a word for a shell command line (restore_command runs through sh).
pub fn shell_quote(s: &str) -> String {
    if s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-+=:@".contains(&b)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn restore(a: RestoreArgs) -> anyhow::Result<ExitCode> {
    let repo = super::repo_arg(&a.repo);
    let recovery_target = if let Some(t) = &a.target_time {
        RecoveryTarget::Time(t.clone())
    } else if let Some(l) = a.target_lsn {
        RecoveryTarget::Lsn(l)
    } else if let Some(x) = &a.target_xid {
        RecoveryTarget::Xid(x.clone())
    } else if let Some(n) = &a.target_name {
        RecoveryTarget::Name(n.clone())
    } else if a.target.is_some() {
        RecoveryTarget::Immediate
    } else {
        RecoveryTarget::EndOfWal
    };
    let restore_command = match &a.restore_command {
        Some(c) => Some(c.clone()),
        None => {
            let exe = std::env::current_exe().context("cannot find this program's path for restore_command")?;
            let prefetch = if a.prefetch > 0 {
                format!(" --prefetch {} --spool {}", a.prefetch, super::archive::DEFAULT_SPOOL)
            } else {
                String::new()
            };
            let keys: String = super::key_flags(&a.keys).iter().map(|f| format!(" {}", shell_quote(f))).collect();
            if a.keys.passphrase_file.is_none()
                && a.keys.key_file.is_none()
                && std::env::var_os("BLOCKSTREAM_PASSPHRASE").is_some()
            {
                eprintln!(
                    "blockstream: warning: the passphrase came from BLOCKSTREAM_PASSPHRASE: restore_command needs it in the server's environment, or restore with --passphrase-file"
                );
            }
            Some(format!(
                "{} archive-get --repo {}{keys}{prefetch} %f \"%p\"",
                shell_quote(&exe.display().to_string()),
                shell_quote(&repo.display().to_string())
            ))
        }
    };
    let opts = RestoreOptions {
        repo: blockstream::storage::at(&repo)?,
        target: absolute(&a.pgdata),
        backup: a.backup.clone(),
        jobs: a.jobs,
        tablespace_map: a.tablespace_map.clone(),
        force: a.force,
        recovery_target,
        restore_command,
        owner: a.owner.clone(),
        target_action: Some(a.target_action.clone()),
        target_timeline: a.target_timeline.clone(),
        encryption: super::encryption(&a.keys)?,
        delta: a.delta,
        check: if a.check_digests { PieceCheck::Digest } else { PieceCheck::Coverage },
        db_include: a.db_include.clone(),
        compare_all: a.delta_compare_all,
    };
    let progress = Progress::default();
    let r = with_progress(progress_on(a.progress, a.output), &progress, || run_restore(&opts, &progress))?;
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&r)?),
        Output::Text => {
            println!(
                "restored backup {} into {} in {:.1} s{}",
                r.backup_id,
                r.target,
                r.duration_secs,
                r.owner.as_ref().map(|o| format!(", written as user {o}")).unwrap_or_default()
            );
            if r.chain.len() > 1 {
                println!("  from the chain {}", r.chain.join(" <- "));
            }
            println!(
                "  {} in {} files from {} stored; {} threads, {:.1} MiB/s",
                mib(r.bytes_restored),
                r.files,
                mib(r.bytes_stored),
                r.jobs,
                r.throughput_mib_s
            );
            if !r.databases_excluded.is_empty() {
                println!(
                    "  not restored (their files are zeros): {}; drop them once the server is up: DROP DATABASE name",
                    r.databases_excluded.join(", ")
                );
            }
            if r.delta {
                println!(
                    "  delta: {} written, {} read to compare, {} files unchanged, {} entries removed",
                    mib(r.bytes_written),
                    mib(r.bytes_compared),
                    r.files_unchanged,
                    r.removed
                );
                if let Some(basis) = &r.delta_basis {
                    println!("  delta: {basis}");
                }
            }
            println!(
                "  {:.2} s checking chunks, {:.2} s creating files, {:.2} s writing, {:.2} s syncing",
                r.verify_secs, r.layout_secs, r.write_secs, r.sync_secs
            );
            println!("  start it with: pg_ctl -D {} start", shell_quote(&r.target));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Warns on stderr about repository paths others than the owner and group
/// may read, or the group may write.
fn warn_loose_modes(repo: &Repo) {
    let Some(root) = repo.local_root() else { return };
    let loose = blockstream::safe_fs::loose_modes(root, 6);
    for (path, mode) in loose.iter().take(5) {
        eprintln!(
            "blockstream: warning: \"{path}\" has mode {mode:04o}: a repository holds the whole database; use 0750 for directories and 0640 for files"
        );
    }
    if loose.len() > 5 {
        eprintln!("blockstream: warning: more paths of the repository have loose modes");
    }
}

fn info(a: InfoArgs) -> anyhow::Result<ExitCode> {
    let repo = super::open_repo(&a.repo, &a.keys)?;
    warn_loose_modes(&repo);
    let mut rows = Vec::new();
    for id in repo.backup_ids()? {
        rows.push((id.clone(), repo.load_manifest(&id)));
    }
    let drills = super::drill::last_drills(&repo);
    let archive = super::archive::summary(&repo, segment_size(&repo));
    // What can be recovered: from the end of the oldest backup to the end of
    // the newest archived segment (or of the newest backup).
    let oldest = rows.iter().find_map(|(_, m)| m.as_ref().ok());
    let newest = rows.iter().rev().find_map(|(_, m)| m.as_ref().ok());
    let archive_end = archive["timelines"].as_array().and_then(|t| {
        t.iter().filter_map(|t| t["end_lsn"].as_str()).filter_map(|l| l.parse::<blockstream::lsn::Lsn>().ok()).max()
    });
    let latest = match (newest.map(|m| m.stop_lsn), archive_end) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    let recoverable = json!({
        "earliest_time": oldest.map(|m| m.stop_time.clone()),
        "earliest_lsn": oldest.map(|m| m.stop_lsn.to_string()),
        "latest_lsn": latest.map(|l| l.to_string()),
    });
    match a.output {
        Output::Json => {
            let backups: Vec<serde_json::Value> = rows
                .iter()
                .map(|(id, m)| match m {
                    Ok(m) => {
                        let mut v = backup_json(m, &repo.location());
                        v["last_drill"] = drills.get(id).cloned().unwrap_or(serde_json::Value::Null);
                        v
                    }
                    Err(e) => json!({"backup_id": id, "error": e.to_string()}),
                })
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({
                    "repository": repo.location(),
                    "system_identifier": repo.info.system_identifier.to_string(),
                    "pg_version_num": repo.info.pg_version_num,
                    "encrypted": repo.is_encrypted(),
                    "backups": backups,
                    "archive": archive,
                    "recoverable": recoverable,
                }))?
            );
        }
        Output::Text => {
            println!(
                "repository {} (system identifier {}, PostgreSQL {}{})",
                repo.location(),
                repo.info.system_identifier,
                repo.info.pg_version_num / 10000,
                if repo.is_encrypted() { ", encrypted with AES-256-GCM" } else { "" }
            );
            if rows.is_empty() {
                println!("  no backups yet");
            } else {
                println!(
                    "  {:<17} {:<5} {:<17} {:<21} {:>8} {:>11} {:>11} {:>8}  {:<12} {:<12}",
                    "backup",
                    "type",
                    "parent",
                    "started",
                    "seconds",
                    "read",
                    "stored",
                    "changed",
                    "start lsn",
                    "stop lsn"
                );
            }
            for (id, m) in &rows {
                match m {
                    Ok(m) => println!(
                        "  {:<17} {:<5} {:<17} {:<21} {:>8.1} {:>11} {:>11} {:>8}  {:<12} {:<12}",
                        id,
                        type_name(m),
                        m.parent.as_deref().unwrap_or("-"),
                        m.start_time,
                        m.stats.duration_secs,
                        mib(m.stats.bytes_read),
                        mib(m.stats.bytes_written),
                        if m.parent.is_some() {
                            format!(
                                "{:.2}%",
                                100.0 * m.stats.changed_blocks as f64 / m.stats.trackable_blocks.max(1) as f64
                            )
                        } else {
                            "all".to_string()
                        },
                        m.start_lsn.to_string(),
                        m.stop_lsn.to_string()
                    ),
                    Err(e) => println!("  {id:<17} damaged: {e}"),
                }
                if let Some(d) = drills.get(id) {
                    println!(
                        "  {:<17} last drill {}: {} (restore {:.1} s + recovery {:.1} s)",
                        "",
                        d["time"].as_str().unwrap_or("?"),
                        if d["ok"].as_bool() == Some(true) { "passed" } else { "FAILED" },
                        d["restore_secs"].as_f64().unwrap_or(0.0),
                        d["recovery_secs"].as_f64().unwrap_or(0.0)
                    );
                }
            }
        }
    }
    if a.output == Output::Text {
        for t in archive["timelines"].as_array().into_iter().flatten() {
            println!(
                "  archive timeline {}: {} segments, {} to {}",
                t["timeline"],
                t["segments"],
                t["first"].as_str().unwrap_or("-"),
                t["last"].as_str().unwrap_or("-")
            );
        }
        let status = &archive["push_status"];
        if let Some(time) = status["time"].as_str() {
            println!(
                "  async push lag: {} files, {} bytes queued, the oldest waiting {:.1} s; {} failures (at {time})",
                status["queue_files"],
                status["queue_bytes"],
                status["queue_oldest_secs"].as_f64().unwrap_or(0.0),
                status["push_failures"]
            );
        }
        if let (Some(e), Some(l)) = (recoverable["earliest_lsn"].as_str(), recoverable["latest_lsn"].as_str()) {
            println!("  recoverable from {} ({e}) to {l}", recoverable["earliest_time"].as_str().unwrap_or("?"));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn verify(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let repo = super::open_repo(&a.repo, &a.keys)?;
    warn_loose_modes(&repo);
    become_repo_owner(&repo)?;
    let ids = if a.backup == "all" { repo.backup_ids()? } else { vec![repo.resolve(&a.backup)?] };
    let progress = Progress::default();
    let results: Vec<_> = with_progress(progress_on(a.progress, a.output), &progress, || {
        ids.iter().map(|id| verify_backup(&repo, id, a.jobs, &progress)).collect()
    });
    for r in &results {
        let record = json!({
            "backup_id": r.backup_id,
            "time": blockstream::timefmt::iso8601(std::time::SystemTime::now()),
            "ok": r.problems.is_empty(),
            "problems": r.problems,
            "secs": r.secs,
            "stored_bytes": r.stored_bytes,
            "source": "cli",
        });
        if let Err(e) = blockstream::catalog::append_log(&repo, blockstream::catalog::VERIFY_LOG, &record) {
            eprintln!("blockstream: warning: the verify log was not written: {e}");
        }
    }
    // With every backup, the WAL archive too: each file read and checked.
    let (archived, archive_problems) =
        if a.backup == "all" { blockstream::archive::verify_files(&repo)? } else { (0, Vec::new()) };
    let problems: usize = results.iter().map(|r| r.problems.len()).sum::<usize>() + archive_problems.len();
    match a.output {
        Output::Json => {
            let list: Vec<_> = results
                .iter()
                .map(|r| {
                    json!({
                        "backup_id": r.backup_id,
                        "ok": r.problems.is_empty(),
                        "problems": r.problems,
                        "stored_bytes": r.stored_bytes,
                        "files": r.files,
                        "pages_checked": r.pages_checked,
                        "secs": r.secs,
                        "throughput_mib_s": r.stored_bytes as f64 / (1 << 20) as f64 / r.secs.max(1e-9),
                    })
                })
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({
                    "backups": list,
                    "archive": {"files": archived, "problems": archive_problems},
                    "problems": problems,
                }))?
            );
        }
        Output::Text => {
            for r in &results {
                if r.problems.is_empty() {
                    println!(
                        "backup {}: ok ({} stored, {} files, {} pages checked, {:.1} s, {:.0} MiB/s)",
                        r.backup_id,
                        mib(r.stored_bytes),
                        r.files,
                        r.pages_checked,
                        r.secs,
                        r.stored_bytes as f64 / (1 << 20) as f64 / r.secs.max(1e-9)
                    );
                }
                for p in &r.problems {
                    println!("backup {}: {}: {}", r.backup_id, p.check, p.detail);
                }
            }
            if ids.is_empty() {
                println!("repository {} holds no backup", repo.location());
            }
            if archived > 0 && archive_problems.is_empty() {
                println!("archive: ok ({archived} files)");
            }
            for p in &archive_problems {
                println!("archive: {p}");
            }
        }
    }
    Ok(if problems > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

fn metrics(a: MetricsArgs) -> anyhow::Result<ExitCode> {
    let repo = super::open_repo(&a.repo, &a.keys)?;
    let rows = blockstream::catalog::list(&repo)?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let seg = segment_size(&repo);
    let samples = blockstream::metrics::samples(
        &rows,
        repo.store().total_bytes(),
        now,
        blockstream::metrics::ServerFacts::default(),
        blockstream::archive::facts(&repo, seg).as_ref(),
    );
    print!("{}", blockstream::metrics::to_text(&samples));
    Ok(ExitCode::SUCCESS)
}

/// The WAL segment size of the repository's cluster (from its newest backup).
fn segment_size(repo: &Repo) -> u64 {
    repo.backup_ids()
        .ok()
        .and_then(|ids| ids.last().and_then(|id| repo.load_manifest(id).ok()))
        .map(|m| m.wal_segment_size)
        .unwrap_or(16 << 20)
}

fn policy(r: &RetentionArgs) -> Option<blockstream::expire::Policy> {
    Some(blockstream::expire::Policy {
        retain_full: r.retain_full? as usize,
        retain_diff: r.retain_diff.map(|n| n as usize),
        retain_incr: r.retain_incr.map(|n| n as usize),
        retain_days: r.retain_days,
    })
}

/// Rewraps the repository key under a new passphrase or key file.
fn key_rotate(a: KeyRotateArgs) -> anyhow::Result<ExitCode> {
    use blockstream::crypt::KeySource;
    let mut repo = super::open_repo(&a.repo, &a.keys)?;
    if !repo.is_encrypted() {
        usage_error(format!("repository \"{}\" is not encrypted: there is no key to rotate", repo.location()));
    }
    let new = if let Some(f) = &a.new_key_file {
        KeySource::key_file(f)?
    } else if let Some(f) = &a.new_passphrase_file {
        KeySource::passphrase_file(f)?
    } else if let Some(p) = std::env::var_os("BLOCKSTREAM_NEW_PASSPHRASE") {
        use std::os::unix::ffi::OsStringExt;
        KeySource::passphrase(p.into_vec(), "BLOCKSTREAM_NEW_PASSPHRASE")?
    } else {
        usage_error("give the new key: --new-passphrase-file, --new-key-file or $BLOCKSTREAM_NEW_PASSPHRASE")
    };
    become_repo_owner(&repo)?;
    let lock = repo.lock()?;
    repo.rotate_key(&new, &lock)?;
    println!("rotated the key of repository \"{}\": the old key no longer opens it", repo.location());
    Ok(ExitCode::SUCCESS)
}

/// Aborts incomplete multipart uploads and removes unfinished backups,
/// under the lock (a live writer's uploads are never touched).
fn cleanup(a: CleanupArgs) -> anyhow::Result<ExitCode> {
    let repo = super::open_repo(&a.repo, &a.keys)?;
    become_repo_owner(&repo)?;
    let (uploads, removed, foreign) = if a.dry_run {
        (repo.store().incomplete_uploads()?, Vec::new(), Vec::new())
    } else {
        let lock = repo.lock()?;
        let uploads = repo.abort_incomplete_uploads(&lock)?;
        let (removed, foreign) = repo.remove_incomplete(&lock)?;
        (uploads, removed, foreign)
    };
    match a.output {
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "dry_run": a.dry_run,
                "uploads": uploads.iter().map(|u| serde_json::json!({"key": u.key, "initiated": u.initiated})).collect::<Vec<_>>(),
                "removed_backups": removed,
                "foreign": foreign,
            })
        ),
        Output::Text => {
            let verb = if a.dry_run { "would abort" } else { "aborted" };
            println!("{verb} {} incomplete upload(s)", uploads.len());
            for u in &uploads {
                println!("  {} (started {})", repo.describe(&u.key), u.initiated);
            }
            if !a.dry_run {
                println!(
                    "removed {} unfinished backup(s){}",
                    removed.len(),
                    if removed.is_empty() { String::new() } else { format!(": {}", removed.join(", ")) }
                );
            }
            for f in &foreign {
                println!(
                    "left alone: \"{}\" is not a backup this program wrote",
                    repo.describe(&format!("backups/{f}"))
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn merge(a: MergeArgs) -> anyhow::Result<ExitCode> {
    let encryption = super::encryption(&a.keys)?;
    let repo = super::open_repo(&a.repo, &a.keys)?;
    become_repo_owner(&repo)?;
    let opts = blockstream::merge::MergeOptions {
        repo: blockstream::storage::at(&super::repo_arg(&a.repo))?,
        backup: a.backup.clone(),
        jobs: a.jobs,
        scratch: absolute(&a.scratch.clone().unwrap_or_else(std::env::temp_dir)),
        encryption,
    };
    let progress = Progress::default();
    let r = with_progress(progress_on(a.progress, a.output), &progress, || {
        blockstream::merge::run_merge(&opts, &progress)
    })?;
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&r)?),
        Output::Text => {
            println!("merged {} into full backup {} in {:.1} s", r.merged.join(" <- "), r.backup_id, r.duration_secs);
            println!(
                "  {} restored in {:.1} s, {} stored and verified in {:.1} s",
                mib(r.bytes_restored),
                r.restore_secs,
                mib(r.bytes_stored),
                r.backup_secs
            );
            println!("  the chain can now go: blockstream expire --repo {} --retain-full N", a.repo.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn expire(a: ExpireArgs) -> anyhow::Result<ExitCode> {
    let Some(policy) = policy(&a.retention) else { usage_error("--retain-full is required") };
    if let Err(e) = policy.check() {
        usage_error(e);
    }
    let repo = super::open_repo(&a.repo, &a.keys)?;
    become_repo_owner(&repo)?;
    let lock = if a.dry_run { None } else { Some(repo.lock()?) };
    if let Some(l) = &lock {
        // Leftovers of a killed backup or expire go first.
        repo.remove_incomplete(l)?;
    }
    let before = repo.store().total_bytes();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let decisions = blockstream::expire::plan(&blockstream::expire::entries(&repo)?, &policy, now);
    let progress = Progress::default();
    let doomed = decisions.iter().filter(|d| d.expire).count() as u64;
    let removed = match &lock {
        None => Vec::new(),
        Some(l) => with_progress(progress_on(a.progress, a.output), &progress, || {
            progress.start_phase("expire", doomed);
            let r = blockstream::expire::execute(&repo, l, &decisions);
            progress.add(doomed);
            r
        })?,
    };
    let wal = match blockstream::expire::oldest_kept(&repo, &decisions) {
        Some((start, seg)) => blockstream::expire::prune_archive(&repo, start, seg, a.dry_run)?,
        None => Vec::new(),
    };
    let after = repo.store().total_bytes();
    match a.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "dry_run": a.dry_run,
                "decisions": decisions,
                "removed": removed,
                "archived_wal_removed": wal,
                "repository_bytes_before": before,
                "repository_bytes_after": after,
            }))?
        ),
        Output::Text => {
            for d in &decisions {
                let what = match (d.expire, a.dry_run) {
                    (true, true) => "would expire",
                    (true, false) => "expired",
                    (false, _) => "kept",
                };
                println!("{} {what}: {}", d.backup_id, d.reason);
            }
            if a.dry_run {
                println!("dry run: {doomed} backups and {} archived WAL files would be removed", wal.len());
            } else {
                println!(
                    "removed {} backups and {} archived WAL files; repository {} -> {}",
                    removed.len(),
                    wal.len(),
                    mib(before),
                    mib(after)
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn report(a: ReportArgs) -> anyhow::Result<ExitCode> {
    let repo = super::open_repo(&a.repo, &a.keys)?;
    let rows = blockstream::catalog::list(&repo)?;
    let verifies = blockstream::catalog::read_log(&repo, blockstream::catalog::VERIFY_LOG);
    let drills = blockstream::catalog::read_log(&repo, blockstream::catalog::DRILL_LOG);
    let decisions = match policy(&a.retention) {
        Some(p) => {
            if let Err(e) = p.check() {
                usage_error(e);
            }
            let now =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            Some(blockstream::expire::plan(&blockstream::expire::entries(&repo)?, &p, now))
        }
        None => None,
    };
    let html = blockstream::report::render(
        &repo.location(),
        &rows,
        &verifies,
        &drills,
        decisions.as_deref(),
        &blockstream::timefmt::iso8601(std::time::SystemTime::now()),
    );
    std::fs::write(&a.output, html).with_context(|| format!("could not write \"{}\"", a.output.display()))?;
    println!(
        "wrote {} ({} backups, {} drills, {} verifies)",
        a.output.display(),
        rows.len(),
        drills.len(),
        verifies.len()
    );
    Ok(ExitCode::SUCCESS)
}
