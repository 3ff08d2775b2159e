//! `archive-push` (for `archive_command`) and `archive-get` (for
//! `restore_command`), with their helpers that run detached: the
//! asynchronous pusher that drains the spool, and the prefetcher that
//! fetches the next segments before recovery asks for them.
//!
//! Spool (local disk, by default `pg_wal/blockstream_spool` of the data
//! directory, which backups leave out):
//!
//! ```text
//! SPOOL/out/<WAL file>     queued by archive-push --async, removed once archived
//! SPOOL/out.lock           held by the one pusher running
//! SPOOL/out.error          the pusher's last failure (JSON)
//! SPOOL/in/<WAL file>      fetched ahead by archive-get --prefetch
//! SPOOL/in.lock            held by the one prefetcher running
//! ```
//!
//! PostgreSQL keeps a WAL file until `archive_command` succeeds, so the
//! asynchronous mode answers success only once the file is safely in the
//! spool (fsynced), and answers failure when the spool stays full, or the
//! oldest queued file waits, longer than `--timeout`: then nothing is lost,
//! PostgreSQL retries and keeps its WAL.

use std::fs::{self, File};
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use blockstream::archive::{self, Pushed, WalFile};
use blockstream::codec::Compression;
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

fn dir_bytes(dir: &Path) -> (u64, u64, Option<SystemTime>) {
    let (mut files, mut bytes, mut oldest) = (0, 0, None::<SystemTime>);
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        if let Ok(md) = e.metadata() {
            files += 1;
            bytes += md.len();
            let t = md.modified().ok();
            oldest = match (oldest, t) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
    }
    (files, bytes, oldest)
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().map(|n| n * mult).map_err(|_| format!("invalid size \"{s}\": expected a number like 4G"))
}

pub fn size_parser(s: &str) -> Result<u64, String> {
    parse_size(s)
}

pub fn archive_push(a: ArchivePushArgs) -> anyhow::Result<ExitCode> {
    let name = a.path.file_name().and_then(|n| n.to_str()).unwrap_or("").to_string();
    if WalFile::parse(&name).is_none() {
        usage_error(format!("\"{}\" is not a WAL file (its name must be PostgreSQL's)", a.path.display()));
    }
    let repo_path = absolute(&a.repo);
    if !a.r#async {
        let repo = open_or_create(&repo_path, &a.path)?;
        push_one(&repo, &a.path, &name, a.compress)?;
        return Ok(ExitCode::SUCCESS);
    }
    let spool = absolute(&a.spool);
    let out = spool.join("out");
    fs::create_dir_all(&out).with_context(|| format!("could not create spool \"{}\"", out.display()))?;
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    // A pusher that keeps failing: fail too, so PostgreSQL keeps its WAL.
    let (_, _, oldest) = dir_bytes(&out);
    if let Some(age) = oldest.and_then(|t| t.elapsed().ok()) {
        if age > Duration::from_secs(a.timeout) {
            let why = fs::read_to_string(spool.join("out.error")).unwrap_or_default();
            ensure_pusher(&a, &spool)?;
            anyhow::bail!(
                "WAL has waited {} s in spool \"{}\", longer than --timeout {}: the repository cannot be reached ({}); PostgreSQL keeps the WAL and retries",
                age.as_secs(),
                out.display(),
                a.timeout,
                why.trim()
            );
        }
    }
    let size = fs::metadata(&a.path).with_context(|| format!("could not stat \"{}\"", a.path.display()))?.len();
    loop {
        let (_, queued, _) = dir_bytes(&out);
        if queued + size <= a.max_spool {
            break;
        }
        ensure_pusher(&a, &spool)?;
        if Instant::now() > deadline {
            anyhow::bail!(
                "spool \"{}\" holds {queued} bytes, the limit is {}: not queued within --timeout {} s; PostgreSQL keeps the WAL and retries",
                out.display(),
                a.max_spool,
                a.timeout
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Queue it: a temporary name, fsync, rename, fsync of the directory.
    let tmp = out.join(format!(".{name}.{}.tmp", std::process::id()));
    {
        let mut src = File::open(&a.path).with_context(|| format!("could not open \"{}\"", a.path.display()))?;
        let mut dst = File::create(&tmp).with_context(|| format!("could not create \"{}\"", tmp.display()))?;
        std::io::copy(&mut src, &mut dst).with_context(|| format!("could not copy into \"{}\"", tmp.display()))?;
        dst.sync_all()?;
    }
    fs::rename(&tmp, out.join(&name))?;
    safe_fs::fsync_dir(&out)?;
    ensure_pusher(&a, &spool)?;
    Ok(ExitCode::SUCCESS)
}

/// The repository, created on the first push when it does not exist yet
/// (identity from the segment and PG_VERSION in the working directory, the
/// data directory when PostgreSQL runs archive_command).
fn open_or_create(root: &Path, wal: &Path) -> anyhow::Result<Repo> {
    if root.join(blockstream::repo::REPO_FILE).exists() {
        return Ok(Repo::open(root)?);
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
    Ok(Repo::open_or_create(root, sysid, version * 10000)?)
}

fn push_one(repo: &Repo, path: &Path, name: &str, compression: Compression) -> anyhow::Result<Pushed> {
    let r = archive::push(repo, path, name, compression)?;
    Ok(r)
}

/// Makes sure a pusher drains the spool (starts one unless one runs).
fn ensure_pusher(a: &ArchivePushArgs, spool: &Path) -> anyhow::Result<()> {
    let lock = spool.join("out.lock");
    if try_lock(&lock)?.is_none() {
        return Ok(());
    }
    let args = vec![
        "archive-push-daemon".to_string(),
        "--repo".into(),
        absolute(&a.repo).display().to_string(),
        "--spool".into(),
        spool.display().to_string(),
        "--workers".into(),
        a.workers.to_string(),
        "--compress".into(),
        a.compress.to_string(),
    ];
    spawn_detached(&args, &spool.join("out.log"))
}

/// The asynchronous pusher: N workers archive what the spool holds, oldest
/// first, and remove each file once it is archived; stops when idle.
pub fn push_daemon(a: DaemonArgs) -> anyhow::Result<ExitCode> {
    let spool = absolute(&a.spool);
    let Some(_lock) = try_lock(&spool.join("out.lock"))? else { return Ok(ExitCode::SUCCESS) };
    let out = spool.join("out");
    let mut idle_since = Instant::now();
    let mut failures = 0u64;
    let mut last: Option<String> = None;
    loop {
        let mut names: Vec<String> = fs::read_dir(&out)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        if names.is_empty() {
            if idle_since.elapsed() > IDLE {
                return Ok(ExitCode::SUCCESS);
            }
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        idle_since = Instant::now();
        let repo = match open_or_create(&absolute(&a.repo), &out.join(&names[0])) {
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
                    let (repo, out) = (&repo, &out);
                    s.spawn(move || {
                        let mut done = Vec::new();
                        for name in rx {
                            let path = out.join(&name);
                            let r = archive::push(repo, &path, &name, a.compress).map_err(|e| e.to_string());
                            if r.is_ok() {
                                let _ = fs::remove_file(&path);
                            }
                            done.push((name, r));
                        }
                        done
                    })
                })
                .collect();
            drop(rx);
            for n in &names {
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
                Err(e) => {
                    failed = true;
                    failures += 1;
                    record_error(&spool, &e);
                }
            }
        }
        let _ = safe_fs::fsync_dir(&out);
        let (files, bytes, oldest) = dir_bytes(&out);
        let status = json!({
            "time": timefmt::iso8601(SystemTime::now()),
            "last_archived": last,
            "queue_files": files,
            "queue_bytes": bytes,
            "queue_oldest_secs": oldest.and_then(|t| t.elapsed().ok()).map(|d| d.as_secs_f64()).unwrap_or(0.0),
            "push_failures": failures,
        });
        let _ = safe_fs::write_durably(
            &repo.root().join(archive::ARCHIVE_DIR),
            "push-status.json",
            status.to_string().as_bytes(),
            safe_fs::FILE_MODE,
        );
        if failed {
            std::thread::sleep(Duration::from_secs(1));
        } else {
            let _ = fs::remove_file(spool.join("out.error"));
        }
    }
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
    let repo = Repo::open(&absolute(&a.repo))?;
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
    let args = vec![
        "archive-get-daemon".to_string(),
        "--repo".into(),
        absolute(&a.repo).display().to_string(),
        "--spool".into(),
        spool.display().to_string(),
        "--workers".into(),
        a.prefetch.to_string(),
        "--after".into(),
        a.file.clone(),
    ];
    let _ = spawn_detached(&args, &spool.join("in.log"));
}

/// The prefetcher: fetches the `workers` segments after `--after` in
/// parallel into the spool (each checked, written whole and renamed), and
/// drops what recovery has passed.
pub fn get_daemon(a: DaemonArgs) -> anyhow::Result<ExitCode> {
    let spool = absolute(&a.spool);
    let Some(_lock) = try_lock(&spool.join("in.lock"))? else { return Ok(ExitCode::SUCCESS) };
    let dir = spool.join("in");
    let repo = Repo::open(&absolute(&a.repo))?;
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
    let status = catalog::read_log(&repo.root().join(archive::ARCHIVE_DIR), "push-status.json").pop();
    json!({"timelines": timelines, "bytes": listing.bytes, "histories": listing.histories, "push_status": status})
}
