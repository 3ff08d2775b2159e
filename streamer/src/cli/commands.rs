//! One function per command: options from flags, the engine, the summary.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use blockstream::backup::{run_backup, BackupMode, BackupOptions};
use blockstream::copy::CopyConfig;
use blockstream::manifest::Manifest;
use blockstream::progress::Progress;
use blockstream::repo::Repo;
use blockstream::restore::{extract_file, run_restore, RecoveryTarget, RestoreOptions};
use blockstream::verify::verify_backup;
use serde_json::json;

use super::args::{
    ArchiveGetArgs, BackupArgs, BackupKind, Checkpoint, Cli, Command, InfoArgs, Output, RestoreArgs, VerifyArgs,
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
        Command::ArchiveGet(a) => archive_get(a),
    }
}

fn absolute(p: &Path) -> PathBuf {
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
    become_cluster_owner(&pgdata)?;
    let opts = BackupOptions {
        pgdata: absolute(&pgdata),
        repo: absolute(&a.repo),
        jobs: a.jobs,
        copy: CopyConfig { compression: a.compress, max_rate: a.max_rate, ..CopyConfig::default() },
        label: a.label.clone(),
        fast: a.checkpoint == Checkpoint::Fast,
        mode,
        no_fallback: a.no_fallback,
        verify_checksums: !a.no_verify_checksums,
        allow_checksum_failures: a.allow_checksum_failures,
    };
    let progress = Progress::default();
    let m = with_progress(a.progress, &progress, || run_backup(&opts, &mut session, &progress))?;
    if let Some(why) = &m.full_reason {
        eprintln!("blockstream: took a full backup: {why}");
    }
    let s = &m.stats;
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&backup_json(&m, &opts.repo))?),
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
                m.compression
            );
            println!("  {:.1} MiB/s; {:.1} s in pg_backup_start/stop", s.throughput_mib_s, s.server_secs);
            println!("  repository {}", opts.repo.display());
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

fn backup_json(m: &Manifest, repo: &Path) -> serde_json::Value {
    json!({
        "backup_id": m.backup_id,
        "type": type_name(m),
        "parent": m.parent,
        "repository": repo.display().to_string(),
        "label": m.label,
        "system_identifier": m.system_identifier.to_string(),
        "timeline": m.timeline,
        "start_lsn": m.start_lsn.to_string(),
        "stop_lsn": m.stop_lsn.to_string(),
        "start_time": m.start_time,
        "stop_time": m.stop_time,
        "compression": m.compression.to_string(),
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
    let repo = absolute(&a.repo);
    let recovery_target = match (&a.target_time, a.target_lsn, &a.target) {
        (Some(t), _, _) => RecoveryTarget::Time(t.clone()),
        (_, Some(l), _) => RecoveryTarget::Lsn(l),
        (_, _, Some(_)) => RecoveryTarget::Immediate,
        _ => RecoveryTarget::EndOfWal,
    };
    let restore_command = match &a.restore_command {
        Some(c) => Some(c.clone()),
        None => {
            let exe = std::env::current_exe().context("cannot find this program's path for restore_command")?;
            Some(format!(
                "{} archive-get --repo {} %f \"%p\"",
                shell_quote(&exe.display().to_string()),
                shell_quote(&repo.display().to_string())
            ))
        }
    };
    let opts = RestoreOptions {
        repo,
        target: absolute(&a.pgdata),
        backup: a.backup.clone(),
        jobs: a.jobs,
        tablespace_map: a.tablespace_map.clone(),
        force: a.force,
        recovery_target,
        restore_command,
        owner: a.owner.clone(),
    };
    let progress = Progress::default();
    let r = with_progress(a.progress, &progress, || run_restore(&opts, &progress))?;
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
    let loose = blockstream::safe_fs::loose_modes(repo.root(), 6);
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
    let repo = Repo::open(&absolute(&a.repo))?;
    warn_loose_modes(&repo);
    let mut rows = Vec::new();
    for id in repo.backup_ids()? {
        rows.push((id.clone(), repo.load_manifest(&id)));
    }
    let drills = super::drill::last_drills(repo.root());
    match a.output {
        Output::Json => {
            let backups: Vec<serde_json::Value> = rows
                .iter()
                .map(|(id, m)| match m {
                    Ok(m) => {
                        let mut v = backup_json(m, repo.root());
                        v["last_drill"] = drills.get(id).cloned().unwrap_or(serde_json::Value::Null);
                        v
                    }
                    Err(e) => json!({"backup_id": id, "error": e.to_string()}),
                })
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({
                    "repository": repo.root().display().to_string(),
                    "system_identifier": repo.info.system_identifier.to_string(),
                    "pg_version_num": repo.info.pg_version_num,
                    "backups": backups,
                }))?
            );
        }
        Output::Text => {
            println!(
                "repository {} (system identifier {}, PostgreSQL {})",
                repo.root().display(),
                repo.info.system_identifier,
                repo.info.pg_version_num / 10000
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
    Ok(ExitCode::SUCCESS)
}

fn verify(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let repo = Repo::open(&absolute(&a.repo))?;
    warn_loose_modes(&repo);
    let ids = if a.backup == "all" { repo.backup_ids()? } else { vec![repo.resolve(&a.backup)?] };
    let progress = Progress::default();
    let results: Vec<_> = ids.iter().map(|id| verify_backup(&repo, id, a.jobs, &progress)).collect();
    let problems: usize = results.iter().map(|r| r.problems.len()).sum();
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
            println!("{}", serde_json::to_string_pretty(&json!({"backups": list, "problems": problems}))?);
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
                println!("repository {} holds no backup", repo.root().display());
            }
        }
    }
    Ok(if problems > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

fn archive_get(a: ArchiveGetArgs) -> anyhow::Result<ExitCode> {
    if a.file.is_empty() || a.file.contains('/') || a.file.starts_with('.') {
        usage_error(format!("invalid WAL file name \"{}\"", a.file));
    }
    let repo = Repo::open(&absolute(&a.repo))?;
    let wanted = format!("pg_wal/{}", a.file);
    for id in repo.backup_ids()?.iter().rev() {
        let Ok(m) = repo.load_manifest(id) else { continue };
        if m.files.iter().any(|f| f.path == wanted && !f.vanished) {
            extract_file(&repo, id, &wanted, &a.path)?;
            return Ok(ExitCode::SUCCESS);
        }
    }
    eprintln!("blockstream: archive-get: {} is not in repository {}", a.file, repo.root().display());
    Ok(ExitCode::from(1))
}
