//! The online backup: start, copy, stop, WAL, manifest.
//!
//! Order matters and is the protocol of DESIGN.md: `pg_backup_start` (through
//! [`BackupSession`]), copy every file but `global/pg_control`, copy
//! `global/pg_control`, `pg_backup_stop`, copy WAL from the start segment to
//! the stop segment, fsync the streams, write the manifest last. A backup that
//! fails anywhere before the manifest is renamed into place does not exist.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use crate::copy::{copy_pieces, pieces_of, CopyConfig, CopyOutcome};
use crate::error::{Error, Result};
use crate::hash::{file_digest, to_hex, Digest};
use crate::lsn::Lsn;
use crate::manifest::{fsync_dir, BackupType, FileEntry, Manifest, Stats, StreamEntry, FORMAT, VERSION};
use crate::pgdata::{self, SourceFile};
use crate::progress::Progress;
use crate::repo::Repo;
use crate::stream::StreamWriter;
use crate::timefmt;

/// What the engine needs to know about the server before it starts.
#[derive(Clone, Debug)]
pub struct ServerInfo {
    pub system_identifier: u64,
    pub pg_version_num: u32,
    pub wal_segment_size: u64,
}

#[derive(Clone, Debug)]
pub struct StartInfo {
    pub start_lsn: Lsn,
    pub timeline: u32,
    pub system_identifier: u64,
    pub data_checksums: bool,
}

#[derive(Clone, Debug)]
pub struct StopInfo {
    pub stop_lsn: Lsn,
    pub timeline: u32,
    pub backup_label: String,
    pub tablespace_map: String,
}

/// The server side of a backup: `blocktrack.backup_start` / `backup_stop` on
/// one session, over libpq (the CLI) or SPI (the extension).
pub trait BackupSession {
    fn server_info(&mut self) -> Result<ServerInfo>;
    fn start(&mut self, label: &str, fast: bool) -> Result<StartInfo>;
    fn stop(&mut self) -> Result<StopInfo>;
}

#[derive(Clone, Debug)]
pub struct BackupOptions {
    pub pgdata: PathBuf,
    pub repo: PathBuf,
    pub jobs: usize,
    pub copy: CopyConfig,
    pub label: Option<String>,
    pub fast: bool,
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
    let repo = Repo::open_or_create(&opts.repo, server.system_identifier, server.pg_version_num)?;
    let lock = repo.lock()?;
    repo.remove_incomplete(&lock)?;
    let id = repo.new_backup_id(BackupType::Full, &lock)?;
    let dir = repo.backup_dir(&id);
    fs::create_dir(&dir).map_err(Error::io("create backup directory", &dir))?;

    let label = opts.label.clone().unwrap_or_else(|| format!("blockstream {id}"));
    progress.start_phase("checkpoint", 0);
    let t = Instant::now();
    let start = session.start(&label, opts.fast)?;
    let mut server_secs = t.elapsed().as_secs_f64();
    let start_time = timefmt::iso8601(SystemTime::now());
    if start.system_identifier != server.system_identifier {
        return Err(Error::Server(format!(
            "server changed its system identifier from {} to {} during the backup",
            server.system_identifier, start.system_identifier
        )));
    }

    let inv =
        pgdata::scan(&opts.pgdata, &pgdata::tablespace_version_dir(server.pg_version_num, control.catalog_version))?;
    let mut files = inv.files;
    files.sort_by(|a, b| a.rel.cmp(&b.rel));
    let control_idx = files
        .iter()
        .position(|f| f.rel == "global/pg_control")
        .ok_or_else(|| Error::Usage(format!("\"{}\" has no global/pg_control", opts.pgdata.display())))?;

    let mut writers = (0..opts.jobs).map(|i| StreamWriter::create(&dir, i as u16, &id)).collect::<Result<Vec<_>>>()?;

    // Largest files first, so the last pieces handed out are small ones.
    let mut order: Vec<usize> = (0..files.len()).filter(|&i| i != control_idx).collect();
    order.sort_by(|&a, &b| files[b].size.cmp(&files[a].size).then(a.cmp(&b)));
    let pieces = pieces_of(&files, order.into_iter(), opts.copy.piece_size);
    let data_bytes: u64 = files.iter().map(|f| f.size).sum();
    progress.start_phase("copy", data_bytes);
    let mut outcome = copy_pieces(&files, pieces, &mut writers, &opts.copy, progress)?;
    // pg_control goes last, after every other file has been read.
    let pieces = pieces_of(&files, std::iter::once(control_idx), opts.copy.piece_size);
    outcome.merge(copy_pieces(&files, pieces, &mut writers[..1], &opts.copy, progress)?);

    progress.start_phase("stop", 0);
    let t = Instant::now();
    let stop = session.stop()?;
    server_secs += t.elapsed().as_secs_f64();
    if stop.timeline != start.timeline {
        return Err(Error::Server(format!(
            "timeline changed from {} to {} during the backup (a promotion?): take the backup again",
            start.timeline, stop.timeline
        )));
    }

    let wal = pgdata::wal_files(&opts.pgdata, start.timeline, start.start_lsn, stop.stop_lsn, server.wal_segment_size)?;
    let first_wal = files.len();
    let wal_bytes: u64 = wal.iter().map(|f| f.size).sum();
    files.extend(wal);
    let pieces = pieces_of(&files, first_wal..files.len(), opts.copy.piece_size);
    progress.start_phase("wal", wal_bytes);
    let wal_outcome = copy_pieces(&files, pieces, &mut writers, &opts.copy, progress)?;
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
    let entries = file_entries(&files, outcome, opts.copy.piece_size)?;

    write_durably(&dir.join("backup_label"), stop.backup_label.as_bytes())?;
    if !stop.tablespace_map.is_empty() {
        write_durably(&dir.join("tablespace_map"), stop.tablespace_map.as_bytes())?;
    }

    let bytes_written: u64 = streams.iter().map(|s| s.bytes).sum();
    let duration = began.elapsed().as_secs_f64();
    let bytes_read = data_bytes + wal_bytes;
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        backup_id: id,
        backup_type: BackupType::Full,
        parent: None,
        label,
        system_identifier: server.system_identifier,
        pg_version_num: server.pg_version_num,
        timeline: start.timeline,
        start_lsn: start.start_lsn,
        stop_lsn: stop.stop_lsn,
        start_time,
        stop_time: timefmt::iso8601(SystemTime::now()),
        wal_segment_size: server.wal_segment_size,
        data_checksums: start.data_checksums,
        compression: opts.copy.compression,
        piece_size: opts.copy.piece_size,
        data_directory: inv.data_directory,
        tablespaces: inv.tablespaces,
        directories: inv.dirs,
        files: entries,
        streams,
        backup_label: stop.backup_label,
        tablespace_map: (!stop.tablespace_map.is_empty()).then_some(stop.tablespace_map),
        stats: Stats {
            duration_secs: duration,
            server_secs,
            files: files.len() as u64,
            data_bytes,
            wal_bytes,
            bytes_read,
            bytes_written,
            compression_ratio: bytes_read as f64 / bytes_written.max(1) as f64,
            throughput_mib_s: bytes_read as f64 / (1 << 20) as f64 / duration.max(1e-9),
            jobs: opts.jobs as u32,
        },
    };
    manifest.validate()?;
    manifest.store(&dir)?;
    fsync_dir(&repo.backups_dir())?;
    drop(lock);
    Ok(manifest)
}

/// Manifest entries from what the copy saw: digests assembled in piece order,
/// chunk locations, truncation and disappearance flags.
fn file_entries(files: &[SourceFile], outcome: CopyOutcome, piece_size: u64) -> Result<Vec<FileEntry>> {
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
        let expected = f.size.div_ceil(piece_size) as usize;
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
        });
    }
    Ok(entries)
}

fn write_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(Error::io("create", path))?;
    f.write_all(bytes).map_err(Error::io("write", path))?;
    f.sync_all().map_err(Error::io("fsync", path))
}
