//! Merge (incremental forever): a full backup built from a chain, inside the
//! repository, without the server.
//!
//! The chain of the chosen backup is restored, exactly as backed up (no
//! recovery settings), into a scratch directory; that copy is then backed
//! up as a full backup by the ordinary backup engine, with a session that
//! replays the chosen backup's own start, stop, label and WAL instead of
//! asking a server. The new backup therefore restores to the same point as
//! the chain: same LSNs, same `backup_label`, the same WAL segments, and
//! the owners, modes, times and tablespace locations of the original data
//! directory.
//!
//! Safety:
//! - the chain is only read; a merge killed at any point leaves it intact
//!   and listed, and leaves at most an unfinished backup without a manifest,
//!   which the next writer removes;
//! - the new backup is written under the repository lock, and verified
//!   (every chunk, every file digest, the WAL, page checksums) before its
//!   manifest is stored: nothing is listed that failed;
//! - the scratch directory is created new (mode 0700), holds only what the
//!   restore writes (the same path checks as a restore), and is removed at
//!   the end, failed or not. It needs room for the restored cluster.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::backup::{run_backup, BackupMode, BackupOptions, BackupSession, ServerInfo, StartInfo, StopInfo};
use crate::chain::load_chain;
use crate::copy::CopyConfig;
use crate::error::{Error, Result};
use crate::lsn::Lsn;
use crate::manifest::Manifest;
use crate::plan::ChangedSegment;
use crate::progress::Progress;
use crate::repo::Repo;
use crate::restore::{restore_as_backed_up, RecoveryTarget, RestoreOptions};
use crate::storage::SharedStore;
use crate::verify::PieceCheck;

#[derive(Clone, Debug)]
pub struct MergeOptions {
    pub repo: SharedStore,
    /// `latest` or a backup id: the last backup of the chain to merge.
    pub backup: String,
    pub jobs: usize,
    /// A directory with room for the restored cluster; a new directory is
    /// made inside it and removed at the end.
    pub scratch: PathBuf,
    pub encryption: crate::crypt::Encryption,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct MergeReport {
    /// The new full backup.
    pub backup_id: String,
    /// The chain it replaces, full backup first.
    pub merged: Vec<String>,
    pub bytes_restored: u64,
    pub bytes_stored: u64,
    pub restore_secs: f64,
    /// Writing and verifying the new backup.
    pub backup_secs: f64,
    pub duration_secs: f64,
}

/// The server side of a merge: the chosen backup's own start and stop.
struct Replay(Arc<Manifest>);

impl BackupSession for Replay {
    fn server_info(&mut self) -> Result<ServerInfo> {
        let m = &self.0;
        Ok(ServerInfo {
            system_identifier: m.system_identifier,
            pg_version_num: m.pg_version_num,
            wal_segment_size: m.wal_segment_size,
            block_size: m.block_size,
        })
    }

    fn start(&mut self, _label: &str, _fast: bool, _parent: Option<crate::backup::ParentRef>) -> Result<StartInfo> {
        let m = &self.0;
        Ok(StartInfo {
            start_lsn: m.start_lsn,
            timeline: m.timeline,
            system_identifier: m.system_identifier,
            data_checksums: m.data_checksums,
            incremental_ok: false,
            reason: None,
        })
    }

    fn changed_blocks(&mut self, _since: Lsn, _until: Lsn, _timeline: u32) -> Result<Vec<ChangedSegment>> {
        Err(Error::Usage("a merge takes a full backup: it has no changed blocks".into()))
    }

    fn stop(&mut self) -> Result<StopInfo> {
        let m = &self.0;
        Ok(StopInfo {
            stop_lsn: m.stop_lsn,
            timeline: m.timeline,
            backup_label: m.backup_label.clone(),
            tablespace_map: m.tablespace_map.clone().unwrap_or_default(),
            checkpoint_crc: m.checkpoint_crc,
        })
    }
}

const SCRATCH_PREFIX: &str = "blockstream-merge-";

/// Removes the scratch copies of merges that were killed: directories
/// (never links) named for a process that no longer runs.
fn remove_dead_scratch(scratch: &Path) {
    let Ok(entries) = std::fs::read_dir(scratch) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(SCRATCH_PREFIX).and_then(|p| p.parse::<u32>().ok()) else { continue };
        let is_dir = std::fs::symlink_metadata(e.path()).is_ok_and(|m| m.is_dir());
        if is_dir && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A scratch directory made new, removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn run_merge(opts: &MergeOptions, progress: &Progress) -> Result<MergeReport> {
    let began = Instant::now();
    if opts.jobs == 0 {
        return Err(Error::Usage("jobs must be at least 1".into()));
    }
    let mut repo = Repo::open_store(opts.repo.clone())?;
    repo.unlock(opts.encryption.key.as_ref(), opts.encryption.allow_plain)?;
    let id = repo.resolve(&opts.backup)?;
    let chain = load_chain(&repo, &id)?;
    if chain.len() == 1 {
        return Err(Error::Usage(format!("--backup {id} is a full backup: there is no chain to merge")));
    }
    let m = Arc::new(chain.last().expect("a chain holds its target").clone());
    // A bad --scratch is bad input (exit 2), like a bad flag.
    match std::fs::metadata(&opts.scratch) {
        Ok(md) if md.is_dir() => {}
        Ok(_) => return Err(Error::Usage(format!("--scratch \"{}\" is not a directory", opts.scratch.display()))),
        Err(e) => return Err(Error::Usage(format!("--scratch \"{}\": {e}", opts.scratch.display()))),
    }
    remove_dead_scratch(&opts.scratch);
    let dir = opts.scratch.join(format!("{SCRATCH_PREFIX}{}", std::process::id()));
    crate::safe_fs::create_dir(&dir, 0o700)?;
    let scratch = Scratch(dir);
    let data = scratch.0.join("data");

    let t = Instant::now();
    let restored = restore_as_backed_up(
        &RestoreOptions {
            repo: opts.repo.clone(),
            target: data.clone(),
            backup: id.clone(),
            jobs: opts.jobs,
            tablespace_map: m
                .tablespaces
                .iter()
                .map(|t| (t.oid.to_string(), tablespace_dir(&scratch.0, t.oid).display().to_string()))
                .collect(),
            force: false,
            recovery_target: RecoveryTarget::Immediate,
            restore_command: None,
            owner: None,
            target_action: None,
            target_timeline: None,
            encryption: opts.encryption.clone(),
            delta: false,
            check: PieceCheck::Digest,
            db_include: Vec::new(),
            compare_all: false,
        },
        progress,
    )?;
    let restore_secs = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let ids: Vec<String> = chain.iter().map(|b| b.backup_id.clone()).collect();
    let backup = BackupOptions {
        pgdata: data,
        repo: opts.repo.clone(),
        jobs: opts.jobs,
        copy: CopyConfig { compression: crate::codec::compression_of(&m.filters), ..CopyConfig::default() },
        label: Some(format!("merge of {}", ids.join(" + "))),
        fast: true,
        mode: BackupMode::Full,
        no_fallback: false,
        // Page checksums are checked by the verification before listing.
        verify_checksums: false,
        allow_checksum_failures: true,
        encryption: opts.encryption.clone(),
        merge_of: Some(Arc::clone(&m)),
    };
    let merged = run_backup(&backup, &mut Replay(Arc::clone(&m)), progress)?;
    let backup_secs = t.elapsed().as_secs_f64();
    drop(scratch);
    Ok(MergeReport {
        backup_id: merged.backup_id,
        merged: ids,
        bytes_restored: restored.bytes_restored,
        bytes_stored: merged.stats.bytes_written,
        restore_secs,
        backup_secs,
        duration_secs: began.elapsed().as_secs_f64(),
    })
}

fn tablespace_dir(scratch: &Path, oid: u32) -> PathBuf {
    scratch.join(format!("tablespace-{oid}"))
}
