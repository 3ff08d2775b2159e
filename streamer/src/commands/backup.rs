//! The online backup: start, copy, stop, WAL, manifest.
//!
//! Order matters (README, "How it works"): `pg_backup_start` (through
//! [`BackupSession`]), copy every file but `global/pg_control`, copy
//! `global/pg_control`, `pg_backup_stop`, copy WAL from the start segment to
//! the stop segment, make the streams durable, store the manifest last. A
//! backup that fails anywhere before its manifest is stored does not exist.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Instant, SystemTime};

use crate::backup_label::BackupLabel;
use crate::copy::{copy_pieces, CopyConfig, CopyOutcome, Piece};
use crate::error::{Error, Result};
use crate::hash::{file_digest, to_hex, Digest};
use crate::lsn::Lsn;
use crate::manifest::{
    piece_layout, BackupType, ChecksumFailure, FileEntry, Incremental, Manifest, Stats, StreamEntry, FORMAT, VERSION,
};
use crate::pgdata::{self, SourceFile};
use crate::plan::{ChangeSet, ChangedSegment, FileCopy, Planner};
use crate::progress::Progress;
use crate::repo::Repo;
use crate::storage::{self, SharedStore};
use crate::stream::StreamWriter;
use crate::timefmt;

/// What the engine needs to know about the server before it starts.
#[derive(Clone, Debug)]
pub struct ServerInfo {
    pub system_identifier: u64,
    pub pg_version_num: u32,
    pub wal_segment_size: u64,
    pub block_size: u32,
}

#[derive(Clone, Debug)]
pub struct StartInfo {
    pub start_lsn: Lsn,
    pub timeline: u32,
    pub system_identifier: u64,
    pub data_checksums: bool,
    /// Whether the changed blocks since the parent (when one was given) are known.
    pub incremental_ok: bool,
    pub reason: Option<String>,
}

#[derive(Clone, Debug)]
pub struct StopInfo {
    pub stop_lsn: Lsn,
    pub timeline: u32,
    pub backup_label: String,
    pub tablespace_map: String,
    /// The CRC of the checkpoint record the backup starts from (at the
    /// label's CHECKPOINT LOCATION), when the server could read it.
    pub checkpoint_crc: Option<u32>,
}

/// What the server needs to know of a parent to decide whether an
/// incremental backup can build on it: where it starts and stops, and the
/// checkpoint record (LSN and CRC) that proves it lies in the server's WAL
/// history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParentRef {
    pub start_lsn: Lsn,
    pub timeline: u32,
    pub stop_lsn: Lsn,
    pub checkpoint: Option<(Lsn, u32)>,
}

impl ParentRef {
    pub fn of(m: &Manifest) -> ParentRef {
        ParentRef {
            start_lsn: m.start_lsn,
            timeline: m.timeline,
            stop_lsn: m.stop_lsn,
            checkpoint: m.checkpoint_lsn.zip(m.checkpoint_crc),
        }
    }
}

/// The server side of a backup: `blocktrack.backup_start` / `backup_stop` on
/// one session, over libpq (the CLI) or SPI (the extension).
pub trait BackupSession {
    fn server_info(&mut self) -> Result<ServerInfo>;
    /// Starts the backup; with a parent, also says whether the blocks changed
    /// since then are known and the parent lies in this server's history.
    fn start(&mut self, label: &str, fast: bool, parent: Option<ParentRef>) -> Result<StartInfo>;
    /// The blocks changed from `since` to `until` (`blocktrack.changed_blocks`).
    fn changed_blocks(&mut self, since: Lsn, until: Lsn, timeline: u32) -> Result<Vec<ChangedSegment>>;
    fn stop(&mut self) -> Result<StopInfo>;
}

/// What kind of backup was asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackupMode {
    Full,
    /// Blocks changed since the latest backup.
    Incr,
    /// Blocks changed since the latest full backup.
    Diff,
    /// Incremental when the chain can continue, full otherwise.
    Auto,
}

#[derive(Clone, Debug)]
pub struct BackupOptions {
    pub pgdata: PathBuf,
    pub repo: SharedStore,
    pub jobs: usize,
    pub copy: CopyConfig,
    pub label: Option<String>,
    pub fast: bool,
    pub mode: BackupMode,
    /// Fail instead of falling back to a full backup.
    pub no_fallback: bool,
    /// Check page checksums while copying (when the cluster has them).
    pub verify_checksums: bool,
    /// Keep a backup in which pages failed their checksum.
    pub allow_checksum_failures: bool,
    /// The key of an encrypted repository (or of one to encrypt from its
    /// first backup on).
    pub encryption: crate::crypt::Encryption,
    /// A merge: the backup whose chain was restored into `pgdata`. The new
    /// backup takes its owners, modes, times and tablespace locations, and
    /// is verified before it is listed.
    pub merge_of: Option<std::sync::Arc<Manifest>>,
}

/// Takes a full online backup of the cluster behind `session` into the repository.
pub fn run_backup(opts: &BackupOptions, session: &mut dyn BackupSession, progress: &Progress) -> Result<Manifest> {
    let began = Instant::now();
    if opts.jobs == 0 {
        return Err(Error::Usage("jobs must be at least 1".into()));
    }
    let server = session.server_info()?;
    let control = pgdata::read_control_file(&opts.pgdata)?;
    if control.system_identifier != server.system_identifier {
        return Err(Error::Conflict(format!(
            "data directory \"{}\" belongs to the cluster with system identifier {}, but the server reports {}: the data directory and the connection point at different clusters",
            opts.pgdata.display(),
            control.system_identifier,
            server.system_identifier
        )));
    }
    if control.block_size != server.block_size || control.wal_segment_size as u64 != server.wal_segment_size {
        return Err(Error::Server(format!(
            "the server reports block size {} and WAL segment size {}, but \"{}\" says {} and {}",
            server.block_size,
            server.wal_segment_size,
            opts.pgdata.join("global/pg_control").display(),
            control.block_size,
            control.wal_segment_size
        )));
    }
    let mut repo = Repo::open_or_create_store(opts.repo.clone(), server.system_identifier, server.pg_version_num)?;
    let lock = repo.lock()?;
    if let Some(src) = &opts.encryption.key {
        repo.enable_encryption(src, opts.encryption.allow_plain, &lock)?;
    }
    repo.unlock(opts.encryption.key.as_ref(), opts.encryption.allow_plain)?;
    if let Some(holder) = &lock.taken_over {
        progress.warn(format!(
            "took over the lock of repository \"{}\" left by a process that died holding it ({holder})",
            repo.location()
        ));
    }
    let (_, foreign) = repo.remove_incomplete(&lock)?;
    for f in foreign {
        progress.warn(format!(
            "\"{}\" is not a backup of this repository; left alone",
            repo.describe(&Repo::backup_key(&f))
        ));
    }

    // The parent, when an incremental or differential backup is asked for.
    let mut full_reason = None;
    let parent = match opts.mode {
        BackupMode::Full => None,
        mode => match find_parent(&repo, mode, &control)? {
            Ok(p) => Some(p),
            Err(why) => {
                full_reason = Some(why);
                None
            }
        },
    };
    if let (Some(why), true) = (&full_reason, opts.no_fallback) {
        return Err(Error::Conflict(format!("an incremental backup is not possible: {why}")));
    }

    let label = opts.label.clone().unwrap_or_else(|| "blockstream".to_string());
    progress.start_phase("checkpoint", 0);
    let t = Instant::now();
    let start = session.start(&label, opts.fast, parent.as_ref().map(ParentRef::of))?;
    let server_secs = t.elapsed().as_secs_f64();
    let parent = match parent {
        Some(p) if start.incremental_ok => Some(p),
        Some(p) => {
            let why = format!(
                "the blocks changed since backup {} are not known: {}",
                p.backup_id,
                start.reason.clone().unwrap_or_default()
            );
            if opts.no_fallback {
                return Err(Error::Conflict(format!("an incremental backup is not possible: {why}")));
            }
            full_reason = Some(why);
            None
        }
        None => None,
    };
    let changes = match &parent {
        Some(p) => Some(ChangeSet::new(session.changed_blocks(p.start_lsn, start.start_lsn, p.timeline)?)),
        None => None,
    };
    let backup_type = match (&parent, opts.mode) {
        (None, _) => BackupType::Full,
        (Some(_), BackupMode::Diff) => BackupType::Diff,
        (Some(_), _) => BackupType::Incr,
    };
    let id = repo.new_backup_id(backup_type, &lock)?;
    let prefix = Repo::backup_key(&id);
    // From here on a failure removes what this backup wrote (a kill leaves
    // it to the next writer); nothing is listed without a manifest.
    let result = copy_and_record(
        opts,
        session,
        progress,
        &repo,
        &server,
        &control,
        Record { id: id.clone(), prefix, backup_type, parent, changes, start, label, full_reason, server_secs, began },
    );
    if result.is_err() {
        repo.remove_failed(&id, &lock);
    }
    drop(lock);
    result
}

/// What the first part of a backup decided, for the part that copies.
struct Record {
    id: String,
    /// Key prefix of the backup's objects.
    prefix: String,
    backup_type: BackupType,
    parent: Option<Manifest>,
    changes: Option<ChangeSet>,
    start: StartInfo,
    label: String,
    full_reason: Option<String>,
    server_secs: f64,
    began: Instant,
}

/// Copies the files, stops the backup, copies WAL and writes the manifest.
fn copy_and_record(
    opts: &BackupOptions,
    session: &mut dyn BackupSession,
    progress: &Progress,
    repo: &Repo,
    server: &ServerInfo,
    control: &pgdata::ControlFile,
    rec: Record,
) -> Result<Manifest> {
    let Record { id, prefix, backup_type, parent, changes, start, label, full_reason, mut server_secs, began } = rec;
    let start_time = timefmt::iso8601(SystemTime::now());
    if start.system_identifier != server.system_identifier {
        return Err(Error::Server(format!(
            "server changed its system identifier from {} to {} during the backup",
            server.system_identifier, start.system_identifier
        )));
    }

    let inv =
        pgdata::scan(&opts.pgdata, &pgdata::tablespace_version_dir(server.pg_version_num, control.catalog_version))?;
    for (path, why) in &inv.skipped {
        progress.warn(format!("skipped \"{path}\": {why}"));
    }
    let mut files = inv.files;
    files.sort_by(|a, b| a.rel.cmp(&b.rel));
    let control_idx = files
        .iter()
        .position(|f| f.rel == "global/pg_control")
        .ok_or_else(|| Error::Usage(format!("\"{}\" has no global/pg_control", opts.pgdata.display())))?;

    let mut writers = (0..opts.jobs)
        .map(|i| StreamWriter::create(repo.store(), &prefix, i as u16, &id))
        .collect::<Result<Vec<_>>>()?;

    let (mut copies, stats) = plan_copies(&files, parent.as_ref().zip(changes.as_ref()), server.block_size);
    let mut copy_cfg = opts.copy;
    copy_cfg.chunk_key = repo.keyring().map(|k| k.chunk_key(&id));
    copy_cfg.block_size = control.block_size as usize;
    copy_cfg.relseg_blocks = control.relseg_size;
    if opts.verify_checksums && start.data_checksums {
        copy_cfg.verify_checksums_before = Some(start.start_lsn.0);
    }
    let layout = |i: usize, files: &[SourceFile], copies: &[Option<Incremental>]| {
        piece_layout(files[i].size, copies[i].as_ref(), opts.copy.piece_size, server.block_size as u64)
    };

    // Largest files first, so the last pieces handed out are small ones.
    let mut order: Vec<usize> = (0..files.len()).filter(|&i| i != control_idx).collect();
    order.sort_by(|&a, &b| files[b].size.cmp(&files[a].size).then(a.cmp(&b)));
    let pieces: Vec<Piece> = order.iter().flat_map(|&i| pieces_for(i, &layout(i, &files, &copies))).collect();
    let data_bytes: u64 = pieces.iter().map(|p| p.len).sum::<u64>() + files[control_idx].size;
    progress.start_phase("copy", data_bytes);
    progress.set_streams(writers.len() as u64);
    let mut outcome = copy_pieces(&files, pieces, &mut writers, &copy_cfg, progress)?;
    crate::failpoint::hit("data-copied");
    // pg_control goes last, after every other file has been read.
    let pieces = pieces_for(control_idx, &layout(control_idx, &files, &copies));
    outcome.merge(copy_pieces(&files, pieces, &mut writers[..1], &copy_cfg, progress)?);
    let checksum_failures = checksum_failures(&outcome, &files, opts.allow_checksum_failures)?;

    progress.start_phase("stop", 0);
    let t = Instant::now();
    let (stop, label_info) = stop_backup(session, &start)?;
    server_secs += t.elapsed().as_secs_f64();

    let wal = pgdata::wal_files(&opts.pgdata, start.timeline, start.start_lsn, stop.stop_lsn, server.wal_segment_size)?;
    let first_wal = files.len();
    let wal_bytes: u64 = wal.iter().map(|f| f.size).sum();
    files.extend(wal);
    copies.resize(files.len(), None);
    let pieces: Vec<Piece> =
        (first_wal..files.len()).flat_map(|i| pieces_for(i, &layout(i, &files, &copies))).collect();
    progress.start_phase("wal", wal_bytes);
    for w in writers.iter_mut() {
        w.failpoint = "wal-chunk";
    }
    let wal_cfg = CopyConfig { chunk_key: copy_cfg.chunk_key, ..opts.copy };
    let wal_outcome = copy_pieces(&files, pieces, &mut writers, &wal_cfg, progress)?;
    if let Some(&v) = wal_outcome.vanished.first() {
        return Err(Error::Server(format!(
            "WAL segment \"{}\" was removed while the backup needed it",
            files[v as usize].abs.display()
        )));
    }
    outcome.merge(wal_outcome);

    let streams = writers
        .into_iter()
        .map(|w| w.finish().map(|(name, bytes, chunks)| StreamEntry { name, bytes, chunks }))
        .collect::<Result<Vec<_>>>()?;
    let (checksum_pages, checksum_secs) = (outcome.pages_checked, outcome.checksum_secs);
    let layouts: Vec<usize> = (0..files.len()).map(|i| layout(i, &files, &copies).len()).collect();
    let entries = file_entries(&files, copies, &layouts, outcome)?;

    let store = repo.store();
    store.put(&storage::join(&prefix, "backup_label"), stop.backup_label.as_bytes())?;
    if !stop.tablespace_map.is_empty() {
        store.put(&storage::join(&prefix, "tablespace_map"), stop.tablespace_map.as_bytes())?;
    }

    let bytes_written: u64 = streams.iter().map(|s| s.bytes).sum();
    let duration = began.elapsed().as_secs_f64();
    let bytes_read = data_bytes + wal_bytes;
    let files_count = files.len() as u64;
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        backup_id: id,
        backup_type,
        parent: parent.as_ref().map(|p| p.backup_id.clone()),
        label,
        system_identifier: server.system_identifier,
        pg_version_num: server.pg_version_num,
        timeline: start.timeline,
        start_lsn: start.start_lsn,
        stop_lsn: stop.stop_lsn,
        checkpoint_lsn: Some(label_info.checkpoint_lsn),
        checkpoint_crc: stop.checkpoint_crc,
        start_time,
        stop_time: timefmt::iso8601(SystemTime::now()),
        wal_segment_size: server.wal_segment_size,
        data_checksums: start.data_checksums,
        filters: crate::codec::stack(opts.copy.compression, repo.keyring().is_some()),
        compression_v1: None,
        piece_size: opts.copy.piece_size,
        block_size: server.block_size,
        relseg_size: control.relseg_size,
        full_reason,
        data_directory: inv.data_directory,
        tablespaces: inv.tablespaces,
        directories: inv.dirs,
        files: entries,
        streams,
        backup_label: stop.backup_label,
        tablespace_map: (!stop.tablespace_map.is_empty()).then_some(stop.tablespace_map),
        checksum_failures,
        stats: Stats {
            duration_secs: duration,
            server_secs,
            files: files_count,
            data_bytes,
            wal_bytes,
            bytes_read,
            bytes_written,
            compression_ratio: bytes_read as f64 / bytes_written.max(1) as f64,
            throughput_mib_s: bytes_read as f64 / (1 << 20) as f64 / duration.max(1e-9),
            jobs: opts.jobs as u32,
            pages_checked: checksum_pages,
            checksum_secs,
            ..stats
        },
    };
    let mut manifest = manifest;
    if let Some(origin) = &opts.merge_of {
        adopt_origin(&mut manifest, origin);
        manifest.validate()?;
        progress.start_phase("verify", 0);
        let check = crate::verify::verify_manifest(repo, &manifest, opts.jobs, progress);
        if let Some(p) = check.problems.iter().find(|p| p.check != "archive") {
            return Err(Error::Corrupt(format!(
                "the merged backup {} failed verification and is not listed: {}: {}",
                manifest.backup_id, p.check, p.detail
            )));
        }
    }
    progress.start_phase("manifest", 0);
    manifest.validate()?;
    repo.store_manifest(&manifest)?;
    crate::failpoint::hit("manifest-renamed");
    Ok(manifest)
}

/// A merged backup describes the data directory its chain was taken from,
/// not the scratch copy it was read from: owners, modes and times of every
/// directory and file, and the tablespace locations, come from `origin`.
fn adopt_origin(m: &mut Manifest, origin: &Manifest) {
    m.data_directory = origin.data_directory;
    for t in &mut m.tablespaces {
        if let Some(o) = origin.tablespaces.iter().find(|o| o.oid == t.oid) {
            *t = o.clone();
        }
    }
    let dirs: std::collections::HashMap<&str, &crate::manifest::DirEntry> =
        origin.directories.iter().map(|d| (d.path.as_str(), d)).collect();
    for d in &mut m.directories {
        if let Some(o) = dirs.get(d.path.as_str()) {
            (d.mode, d.uid, d.gid) = (o.mode, o.uid, o.gid);
        }
    }
    let files: std::collections::HashMap<&str, &crate::manifest::FileEntry> =
        origin.files.iter().map(|f| (f.path.as_str(), f)).collect();
    for f in &mut m.files {
        if let Some(o) = files.get(f.path.as_str()) {
            (f.mode, f.uid, f.gid, f.mtime) = (o.mode, o.uid, o.gid, o.mtime);
        }
    }
}

/// What to copy of each file: all of it (None), or the blocks changed since
/// the parent; with the counts the manifest's statistics keep.
fn plan_copies(
    files: &[SourceFile],
    parent: Option<(&Manifest, &ChangeSet)>,
    block_size: u32,
) -> (Vec<Option<Incremental>>, Stats) {
    let mut copies: Vec<Option<Incremental>> = vec![None; files.len()];
    let mut stats = Stats::default();
    if let Some((p, changes)) = parent {
        let planner = Planner::new(p, changes);
        for (i, f) in files.iter().enumerate() {
            if let FileCopy::Blocks(inc) = planner.plan(f) {
                stats.incremental_files += 1;
                stats.trackable_blocks += f.size.div_ceil(block_size as u64);
                stats.changed_blocks += inc.stored_blocks();
                copies[i] = Some(inc);
            }
        }
    }
    (copies, stats)
}

/// The pages that failed their checksum while copied, sorted; an error
/// naming the first five unless the backup may keep them.
fn checksum_failures(outcome: &CopyOutcome, files: &[SourceFile], allow: bool) -> Result<Vec<ChecksumFailure>> {
    let mut failures: Vec<ChecksumFailure> = outcome
        .checksum_failures
        .iter()
        .map(|&(f, block, stored, computed)| ChecksumFailure {
            path: files[f as usize].rel.clone(),
            block,
            stored,
            computed,
        })
        .collect();
    failures.sort_by(|a, b| (&a.path, a.block).cmp(&(&b.path, b.block)));
    if failures.is_empty() || allow {
        return Ok(failures);
    }
    let list: Vec<String> = failures
        .iter()
        .take(5)
        .map(|c| format!("\"{}\" block {} (stored 0x{:04x}, computed 0x{:04x})", c.path, c.block, c.stored, c.computed))
        .collect();
    Err(Error::Corrupt(format!(
        "{} page{} failed checksum verification: {}{}; the backup is not kept (--allow-checksum-failures keeps it)",
        failures.len(),
        if failures.len() == 1 { "" } else { "s" },
        list.join(", "),
        if failures.len() > 5 { ", ..." } else { "" }
    )))
}

/// `pg_backup_stop`, and the checks that the backup it ends is the one that
/// started: the label's start LSN, the same timeline.
fn stop_backup(session: &mut dyn BackupSession, start: &StartInfo) -> Result<(StopInfo, BackupLabel)> {
    let stop = session.stop()?;
    let label = BackupLabel::parse(&stop.backup_label)
        .map_err(|e| Error::Server(format!("pg_backup_stop returned a backup_label that does not parse: {e}")))?;
    if label.start_lsn != start.start_lsn {
        return Err(Error::Server(format!(
            "backup_label starts at {}, but pg_backup_start returned {}",
            label.start_lsn, start.start_lsn
        )));
    }
    crate::failpoint::hit("backup-stopped");
    if stop.timeline != start.timeline {
        return Err(Error::Server(format!(
            "timeline changed from {} to {} during the backup (a promotion?): take the backup again",
            start.timeline, stop.timeline
        )));
    }
    Ok((stop, label))
}

/// The pieces of file `i` as copy work.
fn pieces_for(i: usize, layout: &[(u64, u64)]) -> Vec<Piece> {
    layout
        .iter()
        .enumerate()
        .map(|(k, &(offset, len))| Piece { file: i as u32, index: k as u32, offset, len })
        .collect()
}

/// The backup to build on: the latest one (incr, auto) or the latest full one
/// (diff). The inner Err says why there is none.
fn find_parent(
    repo: &Repo,
    mode: BackupMode,
    control: &pgdata::ControlFile,
) -> Result<std::result::Result<Manifest, String>> {
    let ids = repo.backup_ids()?;
    for id in ids.iter().rev() {
        let m = repo.load_manifest(id)?;
        if mode == BackupMode::Diff && m.backup_type != BackupType::Full {
            continue;
        }
        if m.block_size != control.block_size || m.relseg_size != control.relseg_size {
            return Ok(Err(format!(
                "backup {id} has block size {} and {} blocks per segment, the cluster {} and {}",
                m.block_size, m.relseg_size, control.block_size, control.relseg_size
            )));
        }
        return Ok(Ok(m));
    }
    Ok(Err(if mode == BackupMode::Diff {
        "the repository holds no full backup to build on".to_string()
    } else {
        "the repository holds no backup to build on".to_string()
    }))
}

/// Manifest entries from what the copy saw: digests assembled in piece order,
/// chunk locations, truncation and disappearance flags.
fn file_entries(
    files: &[SourceFile],
    copies: Vec<Option<Incremental>>,
    layouts: &[usize],
    outcome: CopyOutcome,
) -> Result<Vec<FileEntry>> {
    let mut pieces: Vec<Vec<(u32, Digest)>> = vec![Vec::new(); files.len()];
    for (f, i, d) in outcome.digests {
        pieces[f as usize].push((i, d));
    }
    let mut chunks: Vec<BTreeSet<(u16, u32)>> = vec![BTreeSet::new(); files.len()];
    for (f, s, c) in outcome.locations {
        chunks[f as usize].insert((s, c));
    }
    let truncated: BTreeSet<u32> = outcome.truncated.into_iter().collect();
    let vanished: BTreeSet<u32> = outcome.vanished.into_iter().collect();
    let mut entries = Vec::with_capacity(files.len());
    for (i, f) in files.iter().enumerate() {
        let mut p = std::mem::take(&mut pieces[i]);
        p.sort_by_key(|(idx, _)| *idx);
        let is_vanished = vanished.contains(&(i as u32));
        let expected = layouts[i];
        if !is_vanished && (p.len() != expected || p.iter().enumerate().any(|(k, (idx, _))| k as u32 != *idx)) {
            return Err(Error::Corrupt(format!("copy of \"{}\" produced {} of its {expected} pieces", f.rel, p.len())));
        }
        let digests: Vec<Digest> = p.into_iter().map(|(_, d)| d).collect();
        entries.push(FileEntry {
            path: f.rel.clone(),
            size: f.size,
            mode: f.mode,
            uid: f.uid,
            gid: f.gid,
            mtime: f.mtime,
            sha256: if is_vanished { String::new() } else { to_hex(&file_digest(&digests)) },
            truncated: truncated.contains(&(i as u32)),
            vanished: is_vanished,
            chunks: std::mem::take(&mut chunks[i]).into_iter().collect(),
            incremental: copies[i].clone(),
        });
    }
    Ok(entries)
}
