//! `archive-push` (for `archive_command`) and `archive-get` (for
//! `restore_command`), with their helpers that run detached: the
//! asynchronous pusher, and the prefetcher that fetches the next segments
//! before recovery asks for them.
//!
//! Asynchronous push archives ahead, from PostgreSQL's own queue: the
//! pusher lists the segments PostgreSQL has waiting (`.ready` in
//! `pg_wal/archive_status`), archives them straight from `pg_wal` with N
//! workers, and leaves a marker for each; `archive_command` for a segment
//! returns as soon as its marker is there, usually at once. Nothing is
//! copied: the queue is PostgreSQL's, which keeps every segment until its
//! `archive_command` succeeds, so a segment is never acknowledged before it
//! is in the repository, and a pusher that cannot reach the repository makes
//! `archive_command` fail after `--timeout` (PostgreSQL retries and keeps
//! its WAL). Spool (by default `pg_wal/blockstream_spool` of the data
//! directory, which backups leave out):
//!
//! ```text
//! SPOOL/ok/<WAL file>      archived ahead; removed once PostgreSQL took it
//! SPOOL/failed/<WAL file>  why the pusher could not archive it (then archive_command fails)
//! SPOOL/out.lock           held by the one pusher running
//! SPOOL/out.error          the pusher's last failure (JSON)
//! SPOOL/in/<WAL file>      fetched ahead by archive-get --prefetch
//! SPOOL/in.lock            held by the one prefetcher running
//! ```

use std::fs::{self, File};
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use blockstream::archive::{self, Pushed, WalFile};
use blockstream::lsn::{parse_wal_file_name, wal_file_name};
use blockstream::repo::Repo;
use blockstream::restore::extract_file;
use blockstream::{catalog, safe_fs, timefmt};
use serde_json::json;

use super::args::{ArchiveGetArgs, ArchivePushArgs, DaemonArgs};
use super::usage_error;

pub const DEFAULT_SPOOL: &str = "pg_wal/blockstream_spool";
/// A helper with nothing to do stops after this long.
const IDLE: Duration = Duration::from_secs(10);

fn absolute(p: &Path) -> PathBuf {
    if blockstream::storage::is_url(p) {
        return p.to_path_buf();
    }
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Holds `path` with flock; None when another process does.
fn try_lock(path: &Path) -> anyhow::Result<Option<File>> {
    let f = File::options().read(true).write(true).create(true).truncate(false).open(path)?;
    // SAFETY: flock on a descriptor we own.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    Ok((rc == 0).then_some(f))
}

/// Starts this program detached (own session, no terminal, output to a log).
fn spawn_detached(args: &[String], log: &Path) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let out = File::options().create(true).append(true).open(log)?;
    let mut cmd = Command::new(exe);
    cmd.args(args).stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
    // SAFETY: setsid in the child between fork and exec: async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn()?;
    Ok(())
}

pub fn archive_push(a: ArchivePushArgs) -> anyhow::Result<ExitCode> {
    let name = a.path.file_name().and_then(|n| n.to_str()).unwrap_or("").to_string();
    if WalFile::parse(&name).is_none() {
        usage_error(format!("\"{}\" is not a WAL file (its name must be PostgreSQL's)", a.path.display()));
    }
    let repo_path = super::repo_arg(&a.repo);
    if !a.r#async {
        let repo = open_or_create(&repo_path, &a.path, &a.keys)?;
        archive::push_with(&repo, &a.path, &name, a.compress, a.threads)?;
        return Ok(ExitCode::SUCCESS);
    }
    let spool = absolute(&a.spool);
    let wal_dir = absolute(a.path.parent().unwrap_or(Path::new(".")));
    for d in ["ok", "failed"] {
        fs::create_dir_all(spool.join(d)).with_context(|| format!("could not create spool \"{}\"", spool.display()))?;
    }
    let (ok, failed) = (spool.join("ok").join(&name), spool.join("failed").join(&name));
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    let mut started = false;
    loop {
        if taken(&ok, &a.path)? {
            return Ok(ExitCode::SUCCESS);
        }
        if let Ok(why) = fs::read_to_string(&failed) {
            let _ = fs::remove_file(&failed);
            anyhow::bail!("{}", why.trim());
        }
        if !started || Instant::now() > deadline - Duration::from_secs(a.timeout) / 2 {
            ensure_pusher(&a, &spool, &wal_dir)?;
            started = true;
        }
        if Instant::now() > deadline {
            let why = fs::read_to_string(spool.join("out.error")).unwrap_or_default();
            anyhow::bail!(
                "\"{}\" was not archived within --timeout {} s ({}); PostgreSQL keeps the WAL and retries",
                a.path.display(),
                a.timeout,
                if why.trim().is_empty() { "no error recorded" } else { why.trim() }
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether the marker `ok` says this very file was archived: a marker older
/// than the file belongs to an earlier file of that name (a restored data
/// directory reusing names) and is removed. A fresh marker stays until the
/// pusher sees that PostgreSQL no longer waits for the segment: removing it
/// here would let the pusher, listing the queue in between, archive the
/// segment a second time.
fn taken(ok: &Path, file: &Path) -> anyhow::Result<bool> {
    let Ok(marker) = fs::symlink_metadata(ok) else { return Ok(false) };
    let file_time = fs::metadata(file).and_then(|m| m.modified()).ok();
    let fresh = matches!((marker.modified().ok(), file_time), (Some(m), Some(f)) if m >= f) && marker.is_file();
    if !fresh {
        let _ = fs::remove_file(ok);
    }
    Ok(fresh)
}

/// The repository, created on the first push when it does not exist yet
/// (identity from the segment and PG_VERSION in the working directory, the
/// data directory when PostgreSQL runs archive_command).
/// Unlocks the repository for pushing. A key given for a repository that
/// is not encrypted yet is refused (PostgreSQL keeps the WAL and retries):
/// the first backup given the key encrypts the repository, and pushes store
/// sealed WAL from then on; no plaintext WAL is ever written next to it.
fn unlock_for_push(repo: &mut Repo, keys: &super::args::KeyArgs) -> anyhow::Result<()> {
    let e = super::encryption(keys)?;
    if e.key.is_some() && !repo.is_encrypted() && !e.allow_plain && repo.backup_ids()?.is_empty() {
        anyhow::bail!(
            "repository \"{}\" is not encrypted yet: its first backup given this key encrypts it, and WAL is archived from then on",
            repo.location()
        );
    }
    repo.unlock(e.key.as_ref(), e.allow_plain)?;
    Ok(())
}

fn open_or_create(root: &Path, wal: &Path, keys: &super::args::KeyArgs) -> anyhow::Result<Repo> {
    let store = blockstream::storage::at(root)?;
    if store.root_state()? == blockstream::storage::RootState::Holds {
        let mut repo = Repo::open_store(store)?;
        unlock_for_push(&mut repo, keys)?;
        return Ok(repo);
    }
    let raw = safe_fs::read_regular(wal, archive::MAX_RAW)?;
    let (sysid, _) = archive::segment_identity(&raw).map_err(|why| {
        anyhow::anyhow!(
            "repository \"{}\" does not exist and \"{}\" cannot create it: {why}",
            root.display(),
            wal.display()
        )
    })?;
    let version: u32 = fs::read_to_string("PG_VERSION").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(15);
    let mut repo = Repo::open_or_create_store(store, sysid, version * 10000)?;
    unlock_for_push(&mut repo, keys)?;
    Ok(repo)
}

/// Makes sure a pusher runs (starts one unless one does).
fn ensure_pusher(a: &ArchivePushArgs, spool: &Path, wal_dir: &Path) -> anyhow::Result<()> {
    let lock = spool.join("out.lock");
    if try_lock(&lock)?.is_none() {
        return Ok(());
    }
    let mut args = vec![
        "archive-push-daemon".to_string(),
        "--repo".into(),
        super::repo_arg(&a.repo).display().to_string(),
        "--spool".into(),
        spool.display().to_string(),
        "--wal".into(),
        wal_dir.display().to_string(),
        "--workers".into(),
        a.workers.to_string(),
        "--compress".into(),
        a.compress.to_string(),
    ];
    args.extend(super::key_flags(&a.keys));
    spawn_detached(&args, &spool.join("out.log"))
}

/// The segments PostgreSQL waits to archive, with when each was marked
/// ready: timeline histories first (as its archiver takes them), then by name.
fn waiting(wal_dir: &Path) -> Vec<(String, Option<SystemTime>)> {
    let mut names = Vec::new();
    for e in fs::read_dir(wal_dir.join("archive_status")).into_iter().flatten().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if let Some(base) = n.strip_suffix(".ready") {
            if WalFile::parse(base).is_some() {
                names.push((base.to_string(), e.metadata().and_then(|m| m.modified()).ok()));
            }
        }
    }
    names.sort_by_key(|(n, _)| (!n.ends_with(".history"), n.clone()));
    names
}

/// The asynchronous pusher: archives what PostgreSQL has waiting with N
/// workers and leaves a marker for each; stops when idle.
pub fn push_daemon(a: DaemonArgs) -> anyhow::Result<ExitCode> {
    let spool = absolute(&a.spool);
    let Some(_lock) = try_lock(&spool.join("out.lock"))? else { return Ok(ExitCode::SUCCESS) };
    let Some(wal_dir) = a.wal.as_ref().map(|w| absolute(w)) else {
        usage_error("archive-push-daemon needs --wal");
    };
    let (ok_dir, failed_dir) = (spool.join("ok"), spool.join("failed"));
    let mut idle_since = Instant::now();
    let mut failures = 0u64;
    let mut last: Option<String> = None;
    loop {
        let queue = waiting(&wal_dir);
        drop_taken_markers(&ok_dir, &queue);
        let todo: Vec<String> = queue
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| !ok_dir.join(n).exists() && !failed_dir.join(n).exists())
            .take(256)
            .collect();
        if todo.is_empty() {
            if idle_since.elapsed() > IDLE {
                return Ok(ExitCode::SUCCESS);
            }
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        idle_since = Instant::now();
        let repo = match open_or_create(&super::repo_arg(&a.repo), &wal_dir.join(&todo[0]), &a.keys) {
            Ok(r) => r,
            Err(e) => {
                failures += 1;
                record_error(&spool, &format!("{e:#}"));
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        let (tx, rx) = crossbeam_channel::bounded::<String>(a.workers * 2);
        let results: Vec<(String, Result<Pushed, String>)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..a.workers)
                .map(|_| {
                    let rx = rx.clone();
                    let (repo, wal_dir, ok_dir) = (&repo, &wal_dir, &ok_dir);
                    s.spawn(move || {
                        let mut done = Vec::new();
                        for name in rx {
                            let r = archive::push(repo, &wal_dir.join(&name), &name, a.compress)
                                .map_err(|e| e.to_string())
                                .and_then(|p| {
                                    // Archived durably; the marker only saves a push.
                                    File::create(ok_dir.join(&name)).map(|_| p).map_err(|e| e.to_string())
                                });
                            done.push((name, r));
                        }
                        done
                    })
                })
                .collect();
            drop(rx);
            for n in &todo {
                if tx.send(n.clone()).is_err() {
                    break;
                }
            }
            drop(tx);
            handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
        });
        let mut failed = false;
        for (name, r) in results {
            match r {
                Ok(_) => last = Some(name),
                // Taken by archive_command meanwhile (and maybe recycled):
                // nothing is wrong.
                Err(_) if !wal_dir.join("archive_status").join(format!("{name}.ready")).exists() => {}
                Err(e) => {
                    failed = true;
                    failures += 1;
                    record_error(&spool, &e);
                    // A refusal (other content, another system) is final for
                    // this file; anything else is retried.
                    if e.contains("already archived with other content") || e.contains("belongs to the cluster") {
                        let _ = fs::write(failed_dir.join(&name), &e);
                    }
                }
            }
        }
        // What still waits unarchived, for info and the metrics.
        let now_waiting = waiting(&wal_dir);
        let left: Vec<Option<SystemTime>> =
            now_waiting.iter().filter(|(n, _)| !ok_dir.join(n).exists()).map(|(_, t)| *t).collect();
        let queued = left.len();
        let oldest = left.iter().flatten().min().copied();
        let status = json!({
            "time": timefmt::iso8601(SystemTime::now()),
            "last_archived": last,
            "queue_files": queued,
            "queue_bytes": queued as u64 * segment_bytes(&wal_dir),
            "queue_oldest_secs": if queued == 0 { 0.0 } else { oldest.and_then(|t| t.elapsed().ok()).map(|d| d.as_secs_f64()).unwrap_or(0.0) },
            "push_failures": failures,
        });
        if let Ok(line) = catalog::line(&repo, archive::PUSH_STATUS, &status) {
            let _ = repo.store().put(archive::PUSH_STATUS, line.to_string().as_bytes());
        }
        if failed {
            std::thread::sleep(Duration::from_secs(1));
        } else {
            let _ = fs::remove_file(spool.join("out.error"));
        }
    }
}

/// Removes the markers of segments PostgreSQL no longer waits for (its
/// archive_command took them). `waiting` is listed after every marker
/// there was made, so a marker still needed is never removed.
fn drop_taken_markers(ok_dir: &Path, waiting: &[(String, Option<SystemTime>)]) {
    for e in fs::read_dir(ok_dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !waiting.iter().any(|(n, _)| *n == name) {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// The size of a segment in `wal_dir` (16 MiB unless a segment says otherwise).
fn segment_bytes(wal_dir: &Path) -> u64 {
    fs::read_dir(wal_dir)
        .into_iter()
        .flatten()
        .flatten()
        .find(|e| e.file_name().len() == 24 && WalFile::parse(&e.file_name().to_string_lossy()).is_some())
        .and_then(|e| e.metadata().ok())
        .map_or(16 << 20, |m| m.len())
}

fn record_error(spool: &Path, msg: &str) {
    let e = json!({"time": timefmt::iso8601(SystemTime::now()), "error": msg});
    let _ = fs::write(spool.join("out.error"), e.to_string());
    eprintln!("blockstream archive-push-daemon: {msg}");
}

/// `restore_command`: the prefetched copy, the archive, or a backup;
/// exit 1 without a word when none has the file (how recovery learns the
/// archive ends).
pub fn archive_get(a: ArchiveGetArgs) -> anyhow::Result<ExitCode> {
    if a.file.is_empty() || a.file.contains('/') || a.file.starts_with('.') {
        usage_error(format!("invalid WAL file name \"{}\"", a.file));
    }
    let spool = a.spool.as_ref().map(|s| absolute(s));
    if let Some(spool) = &spool {
        let ahead = spool.join("in").join(&a.file);
        if ahead.exists() && fs::rename(&ahead, &a.path).is_ok() {
            prefetch_after(&a, spool);
            return Ok(ExitCode::SUCCESS);
        }
    }
    let repo = super::open_repo(&a.repo, &a.keys)?;
    if let Some(raw) = archive::fetch(&repo, &a.file)? {
        archive::write_file(&a.path, &raw)?;
        if let Some(spool) = &spool {
            prefetch_after(&a, spool);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if fetch_from_backups(&repo, &a.file, &a.path)? {
        return Ok(ExitCode::SUCCESS);
    }
    Ok(ExitCode::from(1))
}

fn fetch_from_backups(repo: &Repo, file: &str, dest: &Path) -> anyhow::Result<bool> {
    let wanted = format!("pg_wal/{file}");
    for id in repo.backup_ids()?.iter().rev() {
        let Ok(m) = repo.load_manifest(id) else { continue };
        if m.files.iter().any(|f| f.path == wanted && !f.vanished) {
            extract_file(repo, id, &wanted, dest)?;
            return Ok(true);
        }
    }
    Ok(false)
}

/// Starts a prefetcher for the segments after `a.file`, unless one runs.
fn prefetch_after(a: &ArchiveGetArgs, spool: &Path) {
    if a.prefetch == 0 || !matches!(WalFile::parse(&a.file), Some(WalFile::Segment { .. })) {
        return;
    }
    let _ = fs::create_dir_all(spool.join("in"));
    let Ok(Some(_)) = try_lock(&spool.join("in.lock")) else { return };
    let mut args = vec![
        "archive-get-daemon".to_string(),
        "--repo".into(),
        super::repo_arg(&a.repo).display().to_string(),
        "--spool".into(),
        spool.display().to_string(),
        "--workers".into(),
        a.prefetch.to_string(),
        "--after".into(),
        a.file.clone(),
    ];
    args.extend(super::key_flags(&a.keys));
    let _ = spawn_detached(&args, &spool.join("in.log"));
}

/// The prefetcher: fetches the `workers` segments after `--after` in
/// parallel into the spool (each checked, written whole and renamed), and
/// drops what recovery has passed.
pub fn get_daemon(a: DaemonArgs) -> anyhow::Result<ExitCode> {
    let spool = absolute(&a.spool);
    let Some(_lock) = try_lock(&spool.join("in.lock"))? else { return Ok(ExitCode::SUCCESS) };
    let dir = spool.join("in");
    let repo = super::open_repo(&a.repo, &a.keys)?;
    let after = a.after.clone().unwrap_or_default();
    // The segment size: from the newest backup (the archive names do not carry it).
    let seg_size = repo
        .backup_ids()?
        .last()
        .and_then(|id| repo.load_manifest(id).ok())
        .map(|m| m.wal_segment_size)
        .unwrap_or(16 << 20);
    let Some((tli, segno)) = parse_wal_file_name(&after, seg_size) else { return Ok(ExitCode::SUCCESS) };
    // What recovery has passed goes.
    for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if parse_wal_file_name(&n, seg_size).is_some_and(|(_, s)| s <= segno) {
            let _ = fs::remove_file(e.path());
        }
    }
    let wanted: Vec<String> = (1..=a.workers as u64)
        .map(|k| wal_file_name(tli, segno + k, seg_size))
        .filter(|n| !dir.join(n).exists())
        .collect();
    std::thread::scope(|s| {
        for name in &wanted {
            let (repo, dir) = (&repo, &dir);
            s.spawn(move || {
                if let Ok(Some(raw)) = archive::fetch(repo, name) {
                    let tmp = dir.join(format!(".{name}.tmp"));
                    if archive::write_file(&tmp, &raw).is_ok() {
                        let _ = fs::rename(&tmp, dir.join(name));
                    }
                }
            });
        }
    });
    Ok(ExitCode::SUCCESS)
}

/// The archive's state for `info` and `metrics`: per timeline, the first and
/// last segment and how many; the pusher's last status.
pub fn summary(repo: &Repo, seg_size: u64) -> serde_json::Value {
    let Ok(listing) = archive::list(repo, seg_size) else { return serde_json::Value::Null };
    let timelines: Vec<serde_json::Value> = listing
        .segments
        .iter()
        .map(|(t, s)| {
            json!({
                "timeline": t,
                "first": s.first().map(|&n| wal_file_name(*t, n, seg_size)),
                "last": s.last().map(|&n| wal_file_name(*t, n, seg_size)),
                "segments": s.len(),
                "end_lsn": s.last().map(|&n| blockstream::lsn::Lsn((n + 1) * seg_size).to_string()),
            })
        })
        .collect();
    let status = catalog::read_log(repo, archive::PUSH_STATUS).pop();
    json!({"timelines": timelines, "bytes": listing.bytes, "histories": listing.histories, "push_status": status})
}
