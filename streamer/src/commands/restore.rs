//! Restore: a backup from the repository into a new data directory, in
//! parallel; or over an existing one (`--delta`); or some databases only
//! (`--db-include`).
//!
//! Order, so that a failed or killed restore loses nothing and leaves nothing
//! that looks startable:
//!
//! 1. Checked before a byte is removed or written: the chain of manifests,
//!    the tablespace mapping, the target (empty, or `--force`/`--delta` and
//!    no server using it), every tablespace location (absent or empty, as
//!    pg_basebackup requires; a non-empty one only when named by
//!    `--tablespace-map` with `--force`, or with `--delta`, and never while
//!    a server uses it). When anything in place will be replaced or changed,
//!    every stored chunk needed is also read and checked against its SHA-256
//!    first; into a new or empty directory each chunk is checked as it is
//!    read for decoding, so it is read once.
//! 2. Run as root, the process switches to the target's owner (see
//!    [`crate::privs`]); repository files are opened before that.
//! 3. What `--force` replaces is emptied; `--delta` removes `pg_control`
//!    first, then what the backup does not hold. Directories, tablespace
//!    links and files (sized with fallocate, so a full disk is an error at
//!    once, not a short write later) are created, and N threads decode
//!    chunks and write each record's runs of blocks with positioned writes
//!    (with `--delta`, only the blocks that differ). Each record is one piece
//!    of one file, so threads never write the same bytes. Every piece of
//!    every file must be seen once (see [`PieceCheck`] for what checks the bytes).
//! 4. `backup_label`, `tablespace_map`, `recovery.signal` and the recovery
//!    settings are written, then `global/pg_control`, last of all: a data
//!    directory without it cannot start, so one left by a killed or failed
//!    restore never runs crash recovery from a half-restored copy. A rerun
//!    with `--force` or `--delta` completes it. Then the file systems are synced.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{symlink, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Instant, SystemTime};

use crate::archive;
use crate::blkref::BlockSet;
use crate::chain::{load_chain, resolve, Resolution, Take};
use crate::error::{Error, Result};
use crate::lsn::Lsn;
use crate::manifest::{check_absolute_path, check_relative_path, FileEntry, Incremental, Manifest};
use crate::pg_database;
use crate::privs::{self, Postmaster, User};
use crate::progress::Progress;
use crate::repo::Repo;
use crate::safe_fs;
use crate::stream::StreamReader;
use crate::timefmt;
use crate::timeline::{History, MAX_HISTORY_BYTES};
use crate::unchanged::{self, TargetChanges};
use crate::verify::{check_chunks, check_file_digests, decode_chunks, open_streams, PieceCheck};

/// A WAL segment served by archive-get is small: every piece is hashed.
const DIGEST: PieceCheck = PieceCheck::Digest;

/// The control file: restored last.
pub const CONTROL_FILE: &str = "global/pg_control";
/// PostgreSQL's control file is 8 kB; anything much larger is not one.
const CONTROL_FILE_MAX: u64 = 64 << 10;

/// Where recovery stops.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum RecoveryTarget {
    /// Replay all WAL that can be found (the end of the archive).
    #[default]
    EndOfWal,
    /// Stop as soon as the backup is consistent.
    Immediate,
    Time(String),
    Lsn(Lsn),
    Xid(String),
    /// A restore point made with `pg_create_restore_point`.
    Name(String),
}

#[derive(Clone, Debug)]
pub struct RestoreOptions {
    pub repo: crate::storage::SharedStore,
    pub target: PathBuf,
    /// `latest` or a backup id.
    pub backup: String,
    pub jobs: usize,
    /// (old location or tablespace oid, new location)
    pub tablespace_map: Vec<(String, String)>,
    pub force: bool,
    pub recovery_target: RecoveryTarget,
    /// Written as `restore_command`; `None` leaves recovery to pg_wal alone.
    pub restore_command: Option<String>,
    /// Run as root: the user to write as (default: the owner of an existing
    /// target, else the backup's data-directory owner).
    pub owner: Option<String>,
    /// `recovery_target_action` (promote, pause, shutdown) when a target is set.
    pub target_action: Option<String>,
    /// `recovery_target_timeline` (latest, current or a number).
    pub target_timeline: Option<String>,
    /// The key of an encrypted repository.
    pub encryption: crate::crypt::Encryption,
    /// Restore over an existing data directory, rewriting only the blocks
    /// that differ and removing what the backup does not hold.
    pub delta: bool,
    /// How the written bytes are checked (see [`PieceCheck`]).
    pub check: PieceCheck,
    /// Restore only these databases (and postgres, template0, template1):
    /// the relation files of the others become sparse files of zeros.
    pub db_include: Vec<String>,
    /// A delta restore compares every block of the target even when the
    /// target's own change tracking names those that may differ.
    pub compare_all: bool,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct RestoreReport {
    pub backup_id: String,
    /// The backups read, full backup first.
    pub chain: Vec<String>,
    pub target: String,
    /// The user the files were written as, when run as root.
    pub owner: Option<String>,
    pub files: u64,
    pub bytes_restored: u64,
    pub bytes_stored: u64,
    /// Bytes of file data written to the target (a delta restore writes
    /// only the blocks that differ; a new file's zeros are not written).
    pub bytes_written: u64,
    /// A delta restore: files kept with every byte already right.
    pub files_unchanged: u64,
    /// A delta restore: files, links and directories of the target that the
    /// backup does not hold, removed.
    pub removed: u64,
    pub delta: bool,
    /// A delta restore: what told which blocks to compare (the target's
    /// change tracking, or every block and why).
    pub delta_basis: Option<String>,
    /// A delta restore: bytes of the target read to compare.
    pub bytes_compared: u64,
    /// `--db-include`: the databases whose relation files are zeros; drop them.
    pub databases_excluded: Vec<String>,
    /// Reading every chunk and checking its digest, before anything is
    /// written: only when something in place is replaced or changed.
    pub verify_secs: f64,
    /// Creating directories, links and sized files.
    pub layout_secs: f64,
    /// Decoding and writing data, checking file digests.
    pub write_secs: f64,
    /// Waiting for the data to reach the disk.
    pub sync_secs: f64,
    pub duration_secs: f64,
    pub throughput_mib_s: f64,
    pub jobs: u32,
}

/// What the target directory holds before the restore.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DirState {
    Absent,
    Empty,
    /// Not empty, and `--force` says to replace its contents.
    Replace,
    /// Not empty, and `--delta` says to bring it to the backup's contents.
    Delta,
}

pub fn run_restore(opts: &RestoreOptions, progress: &Progress) -> Result<RestoreReport> {
    restore(opts, progress, false)
}

/// The data directory of a backup exactly as its chain holds it, for a
/// merge: no recovery settings, `backup_label` or `recovery.signal`
/// written, no archive checked, no change of user. The caller owns `target`.
pub(crate) fn restore_as_backed_up(opts: &RestoreOptions, progress: &Progress) -> Result<RestoreReport> {
    restore(opts, progress, true)
}

fn restore(opts: &RestoreOptions, progress: &Progress, as_backed_up: bool) -> Result<RestoreReport> {
    let began = Instant::now();
    if opts.jobs == 0 {
        return Err(Error::Usage("jobs must be at least 1".into()));
    }
    let mut repo = Repo::open_store(opts.repo.clone())?;
    repo.unlock(opts.encryption.key.as_ref(), opts.encryption.allow_plain)?;
    let id = match opts.backup.as_str() {
        "latest" => choose_backup(&repo, &opts.recovery_target)?,
        other => repo.resolve(other)?,
    };
    let chain = load_chain(&repo, &id)?;
    let m = chain.last().expect("a chain holds at least its target");
    let mut follow = None;
    if !as_backed_up {
        check_archive_reaches(&repo, m, &opts.recovery_target)?;
        if opts.target_timeline.is_none() {
            follow = timeline_to_follow(&repo, m)?;
        }
    }
    let locations = map_tablespaces(m, &opts.tablespace_map)?;
    let control = m.files.iter().find(|f| f.path == CONTROL_FILE && !f.vanished).ok_or_else(|| {
        Error::Corrupt(format!("backup {id} holds no {CONTROL_FILE}: it is not a backup of a data directory"))
    })?;
    if control.size > CONTROL_FILE_MAX || control.incremental.is_some() {
        return Err(Error::Corrupt(format!(
            "backup {id} holds a {CONTROL_FILE} of {} bytes{}: not a control file",
            control.size,
            if control.incremental.is_some() { ", stored incrementally" } else { "" }
        )));
    }
    let Resolution { take: mut plan, zeros } = resolve(&chain);
    if opts.delta && opts.force {
        return Err(Error::Usage(
            "--delta and --force exclude each other: --delta keeps what already matches, --force replaces everything"
                .into(),
        ));
    }

    // 1. The target and the tablespace locations, before anything is read.
    let postmasters = privs::running_postmasters();
    let in_place = |state: DirState| if opts.delta && state == DirState::Replace { DirState::Delta } else { state };
    let target_state = in_place(check_dir(&opts.target, opts.force || opts.delta, "target directory", &postmasters)?);
    let mut replace = Vec::new();
    let mut changes_in_place = matches!(target_state, DirState::Replace | DirState::Delta);
    let mut fresh_locations = Vec::new();
    for (oid, loc) in &locations {
        let named = opts.tablespace_map.iter().any(|(_, new)| new.trim_end_matches('/') == loc);
        let what = format!("tablespace {oid} location");
        match check_dir(Path::new(loc), (opts.force && named) || opts.delta, &what, &postmasters).map(in_place) {
            Ok(DirState::Replace) => {
                replace.push(PathBuf::from(loc));
                changes_in_place = true;
            }
            Ok(DirState::Delta) => changes_in_place = true,
            Ok(_) => fresh_locations.push(PathBuf::from(loc)),
            Err(Error::Conflict(msg)) if !named && msg.contains("is not empty") => {
                return Err(Error::Conflict(format!(
                    "{what} \"{loc}\" is not empty: a tablespace is restored only into an absent or empty directory; map it elsewhere with --tablespace-map OLD=NEW, or name it with --tablespace-map {loc}={loc} and --force to replace its contents, or restore with --delta"
                )));
            }
            Err(e) => return Err(e),
        }
    }
    let owner = if privs::is_root() && !as_backed_up {
        Some(resolve_owner(&opts.target, opts.owner.as_deref(), m)?)
    } else {
        if let Some(o) = &opts.owner {
            let u = privs::user_by_name(o)?;
            // SAFETY: geteuid has no preconditions.
            if u.uid != unsafe { libc::geteuid() } {
                return Err(Error::Usage(format!("--owner {o}: only root can restore as another user")));
            }
        }
        None
    };

    // 2. Before anything in place is removed or changed, every chunk that
    //    will be used is read and checked. Into a new or empty directory the
    //    chunks are checked as they are decoded instead, and read once: a
    //    failure there empties the directory again (below), a kill leaves
    //    it without pg_control, which cannot start.
    let t = Instant::now();
    let streams = chain.iter().map(|b| open_streams(&repo, b)).collect::<Result<Vec<_>>>()?;
    let (sparse, databases_excluded) = if opts.db_include.is_empty() {
        (vec![false; m.files.len()], Vec::new())
    } else {
        exclude_databases(&repo, &chain, &mut plan, &streams, &opts.db_include)?
    };
    // The chunks of each backup that hold blocks the restore takes from it.
    let needed: Vec<Vec<(u16, u32)>> = chain
        .iter()
        .zip(&plan)
        .map(|(b, take)| {
            let set: BTreeSet<(u16, u32)> =
                take.keys().flat_map(|&fi| b.files[fi as usize].chunks.iter().copied()).collect();
            set.into_iter().collect()
        })
        .collect();
    let mut bytes_stored = 0;
    for ((b, chunks), readers) in chain.iter().zip(&needed).zip(&streams) {
        if changes_in_place {
            bytes_stored += check_chunks(readers, b, opts.jobs, progress, Some(chunks))?;
        } else {
            bytes_stored += chunks.iter().map(|&(s, c)| b.streams[s as usize].chunks[c as usize].stored).sum::<u64>();
        }
    }
    let verify_secs = t.elapsed().as_secs_f64();

    // 3. As the owner: replace, lay out, write.
    if let Some(u) = &owner {
        prepare_target_as_root(&opts.target, target_state, u)?;
        privs::become_user(u)?;
    }
    // A restore into a new or empty directory that fails takes back what it
    // wrote, as pg_basebackup does; a killed one leaves no pg_control.
    let outcome = (|| -> Result<RestoreReport> {
        // A delta restore over a copy of this cluster: which blocks its own
        // change tracking says may differ (read as the owner, before
        // anything is removed).
        let (unchanged, delta_basis) = if target_state != DirState::Delta {
            (None, None)
        } else if opts.compare_all {
            (None, Some("every block compared (--delta-compare-all)".to_string()))
        } else {
            match unchanged::target_changes(&opts.target, m) {
                Ok(tc) => {
                    let basis = tc.basis.clone();
                    (Some(tc), Some(basis))
                }
                Err(why) => (None, Some(format!("every block compared: {why}"))),
            }
        };
        let mut removed = 0;
        let mut unlinker = Unlinker::start(Vec::new());
        match target_state {
            DirState::Absent => safe_fs::create_dir(&opts.target, 0o700)?,
            DirState::Empty => {}
            DirState::Replace => empty_dir(&opts.target)?,
            DirState::Delta => {
                let (n, later) = prune_for_delta(&opts.target, m, &locations)?;
                removed += n;
                unlinker = Unlinker::start(later);
            }
        }
        for dir in &replace {
            empty_dir(dir)?;
        }
        let t = Instant::now();
        let old_sizes = create_layout(&opts.target, m, &locations, opts.jobs, opts.delta, &sparse)?;
        if let Some(u) = &unchanged {
            prefetch_compared(&opts.target, m, u, &old_sizes);
        }
        let layout_secs = t.elapsed().as_secs_f64();
        let target = opts.target.as_path();
        let control_bytes = Mutex::new(vec![0u8; control.size as usize]);
        let written = AtomicU64::new(0);
        let compared = AtomicU64::new(0);
        // Per file of the restored backup: whether a byte of it was written.
        let touched: Vec<AtomicBool> = m.files.iter().map(|_| AtomicBool::new(false)).collect();
        let n = chain.len();
        for (k, (((b, take), chunks), readers)) in chain.iter().zip(&plan).zip(&needed).zip(&streams).enumerate() {
            if chunks.is_empty() {
                continue;
            }
            // A file's index in the restored backup, from its index in backup k.
            let in_target: Option<HashMap<&str, usize>> = (k + 1 < n).then(|| {
                m.files.iter().enumerate().filter(|(_, f)| !f.vanished).map(|(i, f)| (f.path.as_str(), i)).collect()
            });
            let bs = b.block_size as u64;
            let digests =
                decode_chunks(readers, b, repo.keyring(), opts.jobs, progress, Some(chunks), opts.check, |p| {
                    let Some(t) = take.get(&p.file_index) else { return Ok(()) };
                    if p.file.path == CONTROL_FILE {
                        // Held back: written last.
                        let mut buf = control_bytes.lock().expect("no thread panics holding it");
                        let end = p.record.offset as usize + p.record.data.len();
                        if end > buf.len() {
                            return Err(Error::Corrupt(format!(
                                "backup {} stores bytes of {CONTROL_FILE} past its size",
                                b.backup_id
                            )));
                        }
                        buf[p.record.offset as usize..end].copy_from_slice(p.record.data);
                        return Ok(());
                    }
                    let ti = match &in_target {
                        None => p.file_index as usize,
                        Some(ix) => *ix.get(p.file.path.as_str()).expect("resolve takes only files the target has"),
                    };
                    let differ = unchanged.as_ref().map(|u| u.files[ti].as_ref());
                    let (w, c) = write_record(
                        target,
                        &p.file.path,
                        p.record.offset,
                        p.record.data,
                        t,
                        bs,
                        old_sizes[ti],
                        differ,
                    )?;
                    if w > 0 {
                        written.fetch_add(w, Ordering::Relaxed);
                        touched[ti].store(true, Ordering::Relaxed);
                    }
                    compared.fetch_add(c, Ordering::Relaxed);
                    crate::failpoint::hit("restore-record");
                    Ok(())
                })?;
            check_file_digests(b, digests, Some(&|fi| take.contains_key(&fi)), opts.check)?;
        }
        if opts.delta {
            // Blocks no backup stores are zeros, over whatever the target held there.
            for (ti, blocks) in zeros.iter().filter(|(ti, _)| !sparse[*ti as usize]) {
                let f = &m.files[*ti as usize];
                let old = f.size.min(old_sizes[*ti as usize]);
                let w =
                    zero_blocks(target, &f.path, blocks, m.block_size as u64, old, unchanged.as_ref(), *ti as usize)?;
                if w > 0 {
                    written.fetch_add(w, Ordering::Relaxed);
                    touched[*ti as usize].store(true, Ordering::Relaxed);
                }
            }
        }
        let write_secs = t.elapsed().as_secs_f64() - layout_secs;
        let files_unchanged = if opts.delta {
            m.files
                .iter()
                .zip(&touched)
                .zip(&old_sizes)
                .filter(|((f, t), &old)| {
                    !f.vanished && f.path != CONTROL_FILE && !t.load(Ordering::Relaxed) && old == f.size
                })
                .count() as u64
        } else {
            0
        };

        unlinker.finish()?;

        // 4. What recovery needs, then pg_control, then the disk.
        if !as_backed_up {
            write_recovery_files(&opts.target, &locations, m, opts, follow.as_ref())?;
        }
        crate::failpoint::hit("restore-written");
        let t = Instant::now();
        sync_filesystem(&opts.target)?;
        for (_, loc) in &locations {
            sync_filesystem(Path::new(loc))?;
        }
        let control_mode = (control.mode & 0o640) | 0o600;
        let global = opts.target.join("global");
        safe_fs::write_durably(
            &global,
            "pg_control",
            &control_bytes.into_inner().expect("not poisoned"),
            control_mode,
        )?;
        let sync_secs = t.elapsed().as_secs_f64();
        let bytes_restored: u64 = m.files.iter().filter(|f| !f.vanished).map(|f| f.size).sum();
        let duration = began.elapsed().as_secs_f64();
        Ok(RestoreReport {
            backup_id: id,
            chain: chain.iter().map(|b| b.backup_id.clone()).collect(),
            target: opts.target.display().to_string(),
            owner: owner.map(|u| u.name),
            files: m.files.iter().filter(|f| !f.vanished).count() as u64,
            bytes_restored,
            bytes_stored,
            bytes_written: written.into_inner() + control.size,
            files_unchanged,
            removed,
            delta: opts.delta,
            delta_basis,
            bytes_compared: compared.into_inner(),
            databases_excluded,
            verify_secs,
            layout_secs,
            write_secs,
            sync_secs,
            duration_secs: duration,
            throughput_mib_s: bytes_restored as f64 / (1 << 20) as f64 / duration.max(1e-9),
            jobs: opts.jobs as u32,
        })
    })();
    if outcome.is_err() {
        if matches!(target_state, DirState::Absent | DirState::Empty) {
            let _ = empty_dir(&opts.target);
            if target_state == DirState::Absent {
                let _ = fs::remove_dir(&opts.target);
            }
        }
        for loc in &fresh_locations {
            let _ = empty_dir(loc);
        }
    }
    outcome
}

/// The databases of the restored backup, from its `pg_database`.
fn backup_databases(
    repo: &Repo,
    chain: &[Manifest],
    plan: &[HashMap<u32, Take>],
    streams: &[Vec<StreamReader>],
) -> Result<Vec<(String, u32)>> {
    let m = chain.last().expect("a chain holds at least its target");
    let map = restored_file(repo, chain, plan, streams, pg_database::FILENODE_MAP, 64 << 10)?;
    let what = format!("{} of backup {}", pg_database::FILENODE_MAP, m.backup_id);
    let heap_path = format!("global/{}", pg_database::pg_database_filenode(&map, &what)?);
    let heap = restored_file(repo, chain, plan, streams, &heap_path, pg_database::MAX_CATALOG_BYTES)?;
    pg_database::databases(
        &heap,
        m.block_size as usize,
        &format!("{heap_path} (pg_database) of backup {}", m.backup_id),
    )
}

/// The database a relation file belongs to: `base/DB/...` or
/// `pg_tblspc/SPC/VERSION/DB/...`, for a file whose name starts with a digit.
fn database_of_relation(path: &str) -> Option<u32> {
    let parts: Vec<&str> = path.split('/').collect();
    let (db, name) = match parts.as_slice() {
        ["base", db, name] => (db, name),
        ["pg_tblspc", _, _, db, name] => (db, name),
        _ => return None,
    };
    name.starts_with(|c: char| c.is_ascii_digit()).then(|| db.parse().ok()).flatten()
}

/// `--db-include`: takes the relation files of every other database (but
/// postgres, template0 and template1) out of the plan. Returns, per file of
/// the restored backup, whether it is left sparse, and the names left out.
fn exclude_databases(
    repo: &Repo,
    chain: &[Manifest],
    plan: &mut [HashMap<u32, Take>],
    streams: &[Vec<StreamReader>],
    include: &[String],
) -> Result<(Vec<bool>, Vec<String>)> {
    let m = chain.last().expect("a chain holds at least its target");
    let dbs = backup_databases(repo, chain, plan, streams)?;
    for name in include {
        if !dbs.iter().any(|(d, _)| d == name) {
            let mut known: Vec<&str> = dbs.iter().map(|(d, _)| d.as_str()).collect();
            known.sort_unstable();
            return Err(Error::Usage(format!(
                "--db-include {name}: backup {} holds no database of that name (it holds {})",
                m.backup_id,
                known.join(", ")
            )));
        }
    }
    const ALWAYS: [&str; 3] = ["postgres", "template0", "template1"];
    let keep: HashSet<u32> =
        dbs.iter().filter(|(d, _)| include.contains(d) || ALWAYS.contains(&d.as_str())).map(|&(_, oid)| oid).collect();
    let left_out = |path: &str| database_of_relation(path).is_some_and(|db| !keep.contains(&db));
    for (b, take) in chain.iter().zip(plan.iter_mut()) {
        take.retain(|&fi, _| !left_out(&b.files[fi as usize].path));
    }
    let sparse: Vec<bool> = m.files.iter().map(|f| left_out(&f.path)).collect();
    let present: HashSet<u32> =
        m.files.iter().zip(&sparse).filter(|(_, &s)| s).filter_map(|(f, _)| database_of_relation(&f.path)).collect();
    let mut names: Vec<String> =
        dbs.into_iter().filter(|(_, oid)| present.contains(oid) && !keep.contains(oid)).map(|(d, _)| d).collect();
    names.sort();
    names.dedup();
    Ok((sparse, names))
}

/// The bytes of file `path` of the restored backup (at most `max`),
/// assembled from the chain as a restore would write it, every piece's
/// digest checked.
fn restored_file(
    repo: &Repo,
    chain: &[Manifest],
    plan: &[HashMap<u32, Take>],
    streams: &[Vec<StreamReader>],
    path: &str,
    max: u64,
) -> Result<Vec<u8>> {
    let m = chain.last().expect("a chain holds at least its target");
    let f = m
        .files
        .iter()
        .find(|f| f.path == path && !f.vanished)
        .ok_or_else(|| Error::Corrupt(format!("backup {} holds no {path}", m.backup_id)))?;
    if f.size > max {
        return Err(Error::Corrupt(format!("{path} of backup {} is {} bytes, more than {max}", m.backup_id, f.size)));
    }
    let buf = Mutex::new(vec![0u8; f.size as usize]);
    for (k, b) in chain.iter().enumerate() {
        let Some(fi) = b.files.iter().position(|e| e.path == path && !e.vanished) else { continue };
        let Some(take) = plan[k].get(&(fi as u32)) else { continue };
        let bs = b.block_size as u64;
        let chunks = b.files[fi].chunks.clone();
        let digests =
            decode_chunks(&streams[k], b, repo.keyring(), 1, &Progress::default(), Some(&chunks), DIGEST, |p| {
                if p.file_index != fi as u32 {
                    return Ok(());
                }
                let mut out = buf.lock().expect("no thread panics holding it");
                let size = out.len() as u64;
                let (offset, data) = (p.record.offset, p.record.data);
                for (i, block) in data.chunks(bs as usize).enumerate() {
                    let at = offset + i as u64 * bs;
                    if take.takes((at / bs) as u32) && at < size {
                        let n = block.len().min((size - at) as usize);
                        out[at as usize..at as usize + n].copy_from_slice(&block[..n]);
                    }
                }
                Ok(())
            })?;
        check_file_digests(b, digests, Some(&|i| i == fi as u32), DIGEST)?;
    }
    Ok(buf.into_inner().expect("not poisoned"))
}

/// The backup a point-in-time restore starts from: the newest one that
/// ended before the target (the newest one for targets only recovery can place).
pub fn choose_backup(repo: &Repo, target: &RecoveryTarget) -> Result<String> {
    let ids = repo.backup_ids()?;
    let what = match target {
        RecoveryTarget::Time(t) => format!("time {t}"),
        RecoveryTarget::Lsn(l) => format!("LSN {l}"),
        _ => return repo.resolve("latest"),
    };
    let want_time = match target {
        RecoveryTarget::Time(t) => Some(timefmt::parse_timestamp(t).ok_or_else(|| {
            Error::Usage(format!("recovery target time \"{t}\" is not a timestamp like 2026-11-27 03:15:00+00"))
        })?),
        _ => None,
    };
    for id in ids.iter().rev() {
        let Ok(m) = repo.load_manifest(id) else { continue };
        let fits = match (target, want_time) {
            (_, Some(want)) => timefmt::parse_iso8601(&m.stop_time).is_some_and(|stop| stop as f64 <= want),
            (RecoveryTarget::Lsn(l), _) => m.stop_lsn <= *l,
            _ => true,
        };
        if fits {
            return Ok(id.clone());
        }
    }
    match ids.first() {
        Some(oldest) => {
            let m = repo.load_manifest(oldest)?;
            Err(Error::Usage(format!(
                "recovery target {what} is before the end of the oldest backup {oldest} (it ended at {}, LSN {}): no backup can reach it",
                m.stop_time, m.stop_lsn
            )))
        }
        None => Err(Error::Usage(format!("repository \"{}\" holds no backup yet", repo.location()))),
    }
}

/// Refuses a restore that recovery could not finish for want of archived
/// WAL: a gap in the archive before the target LSN, or (for the end of the
/// archive) anywhere after the backup, where recovery would stop silently.
fn check_archive_reaches(repo: &Repo, m: &Manifest, target: &RecoveryTarget) -> Result<()> {
    let seg = m.wal_segment_size;
    let listing = archive::list(repo, seg)?;
    // Only when the archive holds WAL of this backup's history past its end.
    let stop_seg = m.stop_lsn.previous_segment(seg);
    let beyond = listing.segments.iter().any(|(t, s)| *t >= m.timeline && s.iter().any(|&n| n > stop_seg));
    if !beyond {
        return Ok(());
    }
    let gaps = archive::gaps(repo, &listing, m.timeline, m.stop_lsn, seg)?;
    let Some(first) = gaps.first() else { return Ok(()) };
    match target {
        RecoveryTarget::Lsn(l) => match gaps.iter().find(|g| g.first_segment <= l.segment(seg)) {
            Some(g) => Err(Error::Conflict(format!(
                "recovery to {l} from backup {} cannot finish: {}; restore to an earlier target",
                m.backup_id, g.text
            ))),
            None => Ok(()),
        },
        RecoveryTarget::EndOfWal => Err(Error::Conflict(format!(
            "recovery to the end of the archive from backup {} would stop silently at a gap: {}; give a target before it",
            m.backup_id, first.text
        ))),
        _ => Ok(()),
    }
}

/// The timeline recovery follows when the user named none, and why, when
/// PostgreSQL's default would fail: it follows the newest timeline the
/// repository holds a history file of (`recovery_target_timeline =
/// latest`), and refuses to start when that timeline left the backup's
/// before the backup ended — after a failover, the old primary's backups
/// sit beside the promoted server's, whose history files restore_command
/// serves. The newest timeline whose history holds the backup is followed
/// instead, else the backup's own. None when the default is right.
fn timeline_to_follow(repo: &Repo, m: &Manifest) -> Result<Option<(String, String)>> {
    // Every history file the repository can serve: the archive's first,
    // then those in backups' pg_wal.
    let mut known: BTreeMap<u32, Option<String>> = BTreeMap::new();
    for t in archive::list(repo, m.wal_segment_size)?.histories {
        known.insert(t, None);
    }
    for id in repo.backup_ids()? {
        let Ok(b) = repo.load_manifest(&id) else { continue };
        for f in b.files.iter().filter(|f| !f.vanished) {
            let name = f.path.strip_prefix("pg_wal/").and_then(archive::WalFile::parse);
            if let Some(archive::WalFile::History { tli }) = name {
                known.entry(tli).or_insert_with(|| Some(id.clone()));
            }
        }
    }
    let mut newest_why: Option<String> = None;
    for (&t, from) in known.iter().rev().filter(|(t, _)| **t > m.timeline) {
        let name = format!("{t:08X}.history");
        let bytes = match from {
            None => match archive::fetch(repo, &name)? {
                Some(b) => b,
                None => continue,
            },
            Some(id) => extract_bytes(repo, id, &format!("pg_wal/{name}"), MAX_HISTORY_BYTES)?,
        };
        let history = History::parse(t, &String::from_utf8_lossy(&bytes))
            .map_err(|e| Error::Corrupt(format!("timeline history {name} in the repository: {e}")))?;
        match (history.holds(m.timeline, m.stop_lsn), &newest_why) {
            (Ok(()), None) => return Ok(None),
            (Ok(()), Some(why)) => return Ok(Some((t.to_string(), why.clone()))),
            (Err(why), None) => newest_why = Some(format!("{why}, where backup {} ends", m.backup_id)),
            (Err(_), Some(_)) => {}
        }
    }
    Ok(newest_why.map(|why| ("current".to_string(), why)))
}

/// Writes the file `path` of backup `id` to `dest`, checked against its
/// digest: how `archive-get` serves WAL segments kept in backups.
pub fn extract_file(repo: &Repo, id: &str, path: &str, dest: &Path) -> Result<()> {
    let out = File::create(dest).map_err(Error::io("create", dest))?;
    extract_with(
        repo,
        id,
        path,
        |size| out.set_len(size).map_err(Error::io("size", dest)),
        |offset, data| {
            use std::os::unix::fs::FileExt;
            out.write_all_at(data, offset).map_err(Error::io("write", dest))
        },
    )?;
    out.sync_all().map_err(Error::io("fsync", dest))
}

/// The bytes of the file `path` of backup `id`, checked against its digest,
/// when it holds no more than `max` bytes.
pub fn extract_bytes(repo: &Repo, id: &str, path: &str, max: u64) -> Result<Vec<u8>> {
    let buf = std::sync::Mutex::new(Vec::new());
    extract_with(
        repo,
        id,
        path,
        |size| {
            if size > max {
                return Err(Error::Corrupt(format!("\"{path}\" of backup {id} holds {size} bytes, more than {max}")));
            }
            *buf.lock().expect("not poisoned") = vec![0; size as usize];
            Ok(())
        },
        |offset, data| {
            let mut b = buf.lock().expect("not poisoned");
            let end = offset as usize + data.len();
            if end > b.len() {
                return Err(Error::Corrupt(format!("\"{path}\" of backup {id} has a piece past its size")));
            }
            b[offset as usize..end].copy_from_slice(data);
            Ok(())
        },
    )?;
    Ok(buf.into_inner().expect("not poisoned"))
}

fn extract_with(
    repo: &Repo,
    id: &str,
    path: &str,
    size: impl FnOnce(u64) -> Result<()>,
    write: impl Fn(u64, &[u8]) -> Result<()> + Sync,
) -> Result<()> {
    let m = repo.load_manifest(id)?;
    let index = m
        .files
        .iter()
        .position(|f| f.path == path && !f.vanished)
        .ok_or_else(|| Error::Usage(format!("backup {id} holds no file \"{path}\"")))? as u32;
    let streams = open_streams(repo, &m)?;
    size(m.files[index as usize].size)?;
    let chunks = m.files[index as usize].chunks.clone();
    let digests = decode_chunks(&streams, &m, repo.keyring(), 1, &Progress::default(), Some(&chunks), DIGEST, |p| {
        if p.file_index == index {
            write(p.record.offset, p.record.data)?;
        }
        Ok(())
    })?;
    check_file_digests(&m, digests, Some(&|fi| fi == index), DIGEST)
}

/// The location every tablespace of the backup restores to.
fn map_tablespaces(m: &Manifest, map: &[(String, String)]) -> Result<Vec<(u32, String)>> {
    for (old, new) in map {
        let new_clean = new.trim_end_matches('/');
        if let Err(why) = check_absolute_path(new_clean) {
            return Err(Error::Usage(format!(
                "tablespace mapping \"{old}={new}\": the new location is refused: {why}"
            )));
        }
        let hit = m.tablespaces.iter().any(|t| t.location == *old || t.oid.to_string() == *old);
        if !hit {
            let known: Vec<String> = m.tablespaces.iter().map(|t| format!("{} ({})", t.location, t.oid)).collect();
            return Err(Error::Usage(format!(
                "tablespace mapping \"{old}={new}\" matches no tablespace of backup {}{}",
                m.backup_id,
                if known.is_empty() { " (it has none)".into() } else { format!(" (it has {})", known.join(", ")) }
            )));
        }
    }
    Ok(m.tablespaces
        .iter()
        .map(|t| {
            let new = map
                .iter()
                .find(|(old, _)| *old == t.location || *old == t.oid.to_string())
                .map(|(_, new)| new.trim_end_matches('/').to_string())
                .unwrap_or_else(|| t.location.clone());
            (t.oid, new)
        })
        .collect())
}

/// What `dir` holds, and whether the restore may use it: absent, empty, or
/// (with `replace`) non-empty to be emptied; never a directory a running
/// server uses, nor one holding a `postmaster.pid`. Removes nothing.
fn check_dir(dir: &Path, replace: bool, what: &str, postmasters: &[Postmaster]) -> Result<DirState> {
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(DirState::Absent),
        Err(e) => return Err(Error::Io { op: "stat", path: dir.to_path_buf(), source: e }),
        Ok(md) if !md.is_dir() => {
            return Err(Error::Conflict(format!("{what} \"{}\" exists and is not a directory", dir.display())));
        }
        Ok(_) => {}
    }
    if let Some(who) = privs::postmaster_using(dir, postmasters) {
        return Err(Error::Conflict(format!(
            "{what} \"{}\" is in use: {who}; stop that server before restoring over it",
            dir.display()
        )));
    }
    let mut entries = fs::read_dir(dir).map_err(Error::io("read directory", dir))?;
    if entries.next().is_none() {
        return Ok(DirState::Empty);
    }
    if !replace {
        return Err(Error::Conflict(format!(
            "{what} \"{}\" is not empty: restore into an empty directory, or use --force to replace its contents",
            dir.display()
        )));
    }
    if dir.join("postmaster.pid").exists() {
        return Err(Error::Conflict(format!(
            "{what} \"{}\" holds postmaster.pid: stop the server that uses it before restoring over it; if none runs on it (the server crashed, and no process here uses the directory), remove {}",
            dir.display(),
            dir.join("postmaster.pid").display()
        )));
    }
    Ok(DirState::Replace)
}

/// The user a restore run as root writes as.
fn resolve_owner(target: &Path, flag: Option<&str>, m: &Manifest) -> Result<User> {
    let user = match (flag, privs::owner_of(target)) {
        (Some(name), _) => privs::user_by_name(name)?,
        (None, Some(0)) => {
            return Err(Error::Usage(format!(
                "target directory \"{}\" is owned by root, and restore never writes as root: give the user that will run the server with --owner, or chown the directory",
                target.display()
            )))
        }
        (None, Some(uid)) => privs::user_by_uid(uid)?,
        (None, None) => privs::user_by_uid(m.data_directory.uid).map_err(|_| {
            Error::Usage(format!(
                "the data directory of backup {} belonged to user id {}, which has no local user here: give the user that will run the server with --owner",
                m.backup_id, m.data_directory.uid
            ))
        })?,
    };
    if user.uid == 0 {
        return Err(Error::Usage(
            "restore never writes as root: give the user that will run the server with --owner".into(),
        ));
    }
    Ok(user)
}

/// Run as root, before switching to `owner`: the target directory the
/// command line named (never a path from a manifest) is created if absent,
/// and given to the owner.
fn prepare_target_as_root(target: &Path, state: DirState, owner: &User) -> Result<()> {
    if state == DirState::Absent {
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).map_err(Error::io("create directory", parent))?;
        }
        safe_fs::create_dir(target, 0o700)?;
    }
    std::os::unix::fs::lchown(target, Some(owner.uid), Some(owner.gid)).map_err(Error::io("change owner of", target))
}

/// Removes everything inside `dir` (never following a symbolic link).
fn empty_dir(dir: &Path) -> Result<()> {
    for e in fs::read_dir(dir).map_err(Error::io("read directory", dir))? {
        remove_entry(&e.map_err(Error::io("read directory", dir))?.path())?;
    }
    Ok(())
}

/// Directory modes PostgreSQL accepts: owner rwx, group at most r-x.
fn dir_mode(m: u32) -> u32 {
    (m & 0o750) | 0o700
}

/// File modes PostgreSQL accepts: owner rw, group at most r.
fn file_mode(m: u32) -> u32 {
    (m & 0o640) | 0o600
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(Error::io("set mode of", path))
}

/// Creates the directories, tablespace links and files of the backup; in a
/// delta restore, keeps those that exist (pruned by [`prune_for_delta`]).
/// Returns each file's size before (by index in the manifest; 0 for a file
/// created here): bytes below it are compared before they are written.
fn create_layout(
    target: &Path,
    m: &Manifest,
    locations: &[(u32, String)],
    jobs: usize,
    delta: bool,
    sparse: &[bool],
) -> Result<Vec<u64>> {
    set_mode(target, dir_mode(m.data_directory.mode))?;
    let mut dirs: Vec<_> = m.directories.iter().collect();
    dirs.sort_by(|a, b| a.path.cmp(&b.path));
    let in_tablespace = |p: &str| {
        p.starts_with("pg_tblspc/") && m.tablespaces.iter().any(|t| p.starts_with(&format!("pg_tblspc/{}/", t.oid)))
    };
    for d in dirs.iter().filter(|d| !in_tablespace(&d.path)) {
        let p = target.join(&d.path);
        fs::create_dir_all(&p).map_err(Error::io("create directory", &p))?;
        set_mode(&p, dir_mode(d.mode))?;
    }
    for t in &m.tablespaces {
        let loc = &locations.iter().find(|(o, _)| *o == t.oid).expect("every tablespace is mapped").1;
        let loc = Path::new(loc);
        fs::create_dir_all(loc).map_err(Error::io("create tablespace directory", loc))?;
        set_mode(loc, dir_mode(t.mode))?;
        let link = target.join(format!("pg_tblspc/{}", t.oid));
        fs::create_dir_all(link.parent().unwrap()).map_err(Error::io("create directory", &link))?;
        if delta && fs::read_link(&link).is_ok_and(|to| to == loc) {
            continue;
        }
        symlink(loc, &link).map_err(Error::io("create tablespace link", &link))?;
    }
    for d in dirs.iter().filter(|d| in_tablespace(&d.path)) {
        let p = target.join(&d.path);
        fs::create_dir_all(&p).map_err(Error::io("create directory", &p))?;
        set_mode(&p, dir_mode(d.mode))?;
    }
    // Files: creating and sizing a thousand files is kernel work worth
    // spreading over threads. pg_control is written last, on its own.
    let files: Vec<(usize, &FileEntry, bool)> = m
        .files
        .iter()
        .enumerate()
        .filter(|(_, f)| !f.vanished && f.path != CONTROL_FILE)
        .map(|(i, f)| (i, f, sparse[i]))
        .collect();
    let per = files.len().div_ceil(jobs.max(1)).max(1);
    let found = std::thread::scope(|s| {
        let handles: Vec<_> =
            files.chunks(per).map(|part| s.spawn(move || create_files(target, part, delta))).collect();
        handles.into_iter().map(|h| h.join().expect("layout thread panicked")).collect::<Result<Vec<_>>>()
    })?;
    let mut old = vec![0; m.files.len()];
    for (i, size) in found.into_iter().flatten() {
        old[i] = size;
    }
    Ok(old)
}

/// Creates (or in a delta restore, opens) and sizes each file; returns the
/// size each had before, where it was not 0. A sparse file (of a database
/// `--db-include` leaves out) is sized without allocating: all zeros.
fn create_files(target: &Path, files: &[(usize, &FileEntry, bool)], delta: bool) -> Result<Vec<(usize, u64)>> {
    let mut old = Vec::new();
    for &(i, f, sparse) in files {
        check_relative_path(&f.path)?;
        let p = target.join(&f.path);
        let mode = file_mode(f.mode);
        let open = || {
            OpenOptions::new()
                .read(delta)
                .write(true)
                .create_new(!delta)
                .create(delta)
                .mode(mode)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&p)
        };
        let file = match open() {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // A parent the manifest does not list as a directory.
                let parent = p.parent().unwrap_or(target);
                fs::create_dir_all(parent).map_err(Error::io("create directory", parent))?;
                open().map_err(Error::io("create", &p))?
            }
            Err(e) => return Err(Error::Io { op: "create", path: p, source: e }),
        };
        if delta {
            let md = file.metadata().map_err(Error::io("stat", &p))?;
            if !md.is_file() {
                return Err(Error::Conflict(format!("\"{}\" in the target is not a regular file", p.display())));
            }
            if sparse {
                file.set_len(0).map_err(Error::io("truncate", &p))?;
            } else if md.len() > 0 {
                old.push((i, md.len()));
            }
            if md.len() > f.size {
                file.set_len(f.size).map_err(Error::io("truncate", &p))?;
            }
        }
        if sparse {
            file.set_len(f.size).map_err(Error::io("size", &p))?;
        } else if f.size > 0 {
            // SAFETY: fallocate on a descriptor we own, for a range we own.
            let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, f.size as libc::off_t) };
            if rc != 0 {
                return Err(Error::Io {
                    op: "allocate space for",
                    path: p,
                    source: std::io::Error::from_raw_os_error(rc),
                });
            }
        }
        safe_fs::set_mode(&file, &p, mode)?;
    }
    Ok(old)
}

/// A delta restore that the target's change tracking guides compares only
/// small files (non-relation files, forks other than main): asks the kernel
/// to read them ahead, up to PREFETCH_MAX bytes in all, so the writing
/// threads do not wait for each in turn.
fn prefetch_compared(target: &Path, m: &Manifest, u: &TargetChanges, old_sizes: &[u64]) {
    const PREFETCH_MAX: u64 = 256 << 20;
    let mut budget = PREFETCH_MAX;
    for (i, f) in m.files.iter().enumerate() {
        let old = old_sizes[i].min(f.size);
        if f.vanished || u.files[i].is_some() || old == 0 || old > budget {
            continue;
        }
        if let Ok(file) = safe_fs::open_beneath(target, &f.path) {
            budget -= old;
            // SAFETY: fadvise on a descriptor we own; only a hint.
            unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, old as libc::off_t, libc::POSIX_FADV_WILLNEED) };
        }
    }
}

thread_local! {
    /// The restored file this thread wrote blocks of last, kept open:
    /// consecutive records of a chunk mostly belong to one file.
    static OPEN: std::cell::RefCell<Option<(PathBuf, File)>> = const { std::cell::RefCell::new(None) };
}

/// Writes smaller than this do not start writeback themselves: scattered
/// blocks (an incremental's, a delta's) are left to the final sync, which
/// sorts and merges them. Kicking each off made the writing threads wait in
/// the block layer's writeback throttling (wbt) instead of decoding.
const WRITEBACK_MIN: u64 = 256 << 10;

/// Starts writeback of a range just written, so the final sync waits for little.
fn start_writeback(file: &File, offset: u64, len: usize) {
    // SAFETY: sync_file_range on a descriptor we own; it only schedules I/O.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Writes `runs` (byte ranges of `data`) at `offset` of `file`, one write
/// each, and starts their writeback. Bytes outside `runs` are left
/// untouched. Returns the bytes written.
///
/// Plain writes, not a memory map: on a file sized with fallocate each
/// first touch of a mapped page zeroes it and dirties its buffers one page
/// at a time (ext4's page_mkwrite), which made a restore at -j 1 spend
/// three quarters of its time in the kernel; a write of whole pages does
/// neither.
fn write_runs(file: &File, path: &Path, offset: u64, data: &[u8], runs: &[(usize, usize)]) -> Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut written = 0;
    for &(from, to) in runs {
        file.write_all_at(&data[from..to], offset + from as u64).map_err(Error::io("write", path))?;
        written += (to - from) as u64;
    }
    if written >= WRITEBACK_MIN {
        start_writeback(file, offset, data.len());
    }
    Ok(written)
}

thread_local! {
    /// A delta restore's buffer for the target's bytes under a record.
    static OLD_BYTES: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A delta restore: writes `runs` (byte ranges of `data`) at `offset` of
/// `file`, where the bytes below `old` held data before. Those are read
/// with one read per record (a memory map would fault them in a page at a
/// time) and compared block by block; only blocks that differ are written,
/// consecutive ones in one write. Returns the bytes written.
fn compare_and_write(
    file: &File,
    path: &Path,
    offset: u64,
    data: &[u8],
    runs: &[(usize, usize)],
    old: u64,
    bs: usize,
) -> Result<u64> {
    use std::os::unix::fs::FileExt;
    let compare_to = old.saturating_sub(offset).min(data.len() as u64) as usize;
    OLD_BYTES.with(|cell| {
        let mut target = cell.borrow_mut();
        target.resize(compare_to, 0);
        file.read_exact_at(&mut target, offset).map_err(Error::io("read", path))?;
        let mut written = 0;
        let mut flush = |from: usize, to: usize| -> Result<()> {
            if from < to {
                file.write_all_at(&data[from..to], offset + from as u64).map_err(Error::io("write", path))?;
                written += (to - from) as u64;
            }
            Ok(())
        };
        for &(from, to) in runs {
            // `pending` starts a run of differing blocks not yet written.
            let mut pending = None;
            let mut at = from;
            while at < to.min(compare_to) {
                let end = (at + bs).min(to).min(compare_to);
                if target[at..end] == data[at..end] {
                    if let Some(p) = pending.take() {
                        flush(p, at)?;
                    }
                } else if pending.is_none() {
                    pending = Some(at);
                }
                at = end;
            }
            flush(pending.unwrap_or(at), to)?;
        }
        if written >= WRITEBACK_MIN {
            start_writeback(file, offset, data.len());
        }
        Ok(written)
    })
}

/// Writes the blocks of a record that `take` assigns to this backup into the
/// restored file `rel`, comparing the bytes below `old` first (a delta
/// restore). With `differ` (the target's change tracking: `Some(None)` says
/// compare all of this file), blocks below `old` that it proves unchanged are
/// neither read nor written, and those that may differ are written without
/// reading them. Returns the bytes written and the bytes read to compare.
#[allow(clippy::too_many_arguments)]
fn write_record(
    target: &Path,
    rel: &str,
    offset: u64,
    data: &[u8],
    take: &Take,
    bs: u64,
    old: u64,
    differ: Option<Option<&Incremental>>,
) -> Result<(u64, u64)> {
    if data.is_empty() {
        return Ok((0, 0));
    }
    let first = offset / bs;
    let nblocks = (data.len() as u64).div_ceil(bs);
    let kept_unread = |k: u64| {
        let at = (first + k) * bs;
        at < old && matches!(differ, Some(Some(inc)) if !inc.holds((first + k) as u32))
    };
    let wanted = |k: u64| take.takes((first + k) as u32) && !kept_unread(k);
    // Runs of blocks this backup is the newest source of, less what is kept.
    let mut runs = Vec::new();
    let mut k = 0;
    while k < nblocks {
        if !wanted(k) {
            k += 1;
            continue;
        }
        let run = k;
        while k < nblocks && wanted(k) {
            k += 1;
        }
        runs.push(((run * bs) as usize, ((k * bs) as usize).min(data.len())));
    }
    if runs.is_empty() {
        return Ok((0, 0));
    }
    let path = target.join(rel);
    let blind = matches!(differ, Some(Some(_)));
    with_open_file(&path, |file| {
        if offset < old && !blind {
            let compared = old.saturating_sub(offset).min(data.len() as u64);
            Ok((compare_and_write(file, &path, offset, data, &runs, old, bs as usize)?, compared))
        } else {
            Ok((write_runs(file, &path, offset, data, &runs)?, 0))
        }
    })
}

/// Runs `f` on `path`, opened for reading and writing; the thread keeps the
/// last file open, since consecutive records mostly belong to one file.
fn with_open_file<T>(path: &Path, f: impl FnOnce(&File) -> Result<T>) -> Result<T> {
    OPEN.with(|cell| {
        let mut open = cell.borrow_mut();
        if open.as_ref().is_none_or(|(p, _)| p != path) {
            let file = OpenOptions::new().read(true).write(true).open(path).map_err(Error::io("open", path))?;
            *open = Some((path.to_path_buf(), file));
        }
        f(&open.as_ref().expect("just opened").1)
    })
}

/// A delta restore: writes zeros over the blocks of `rel` in `blocks` (those
/// no backup of the chain stores) below `old`, where the target's bytes are
/// not zeros already. Returns the bytes written.
fn zero_blocks(
    target: &Path,
    rel: &str,
    blocks: &BlockSet,
    bs: u64,
    old: u64,
    unchanged: Option<&TargetChanges>,
    index: usize,
) -> Result<u64> {
    use std::os::unix::fs::FileExt;
    let path = target.join(rel);
    let mut buf = vec![0u8; bs as usize];
    let zeros = vec![0u8; bs as usize];
    let mut written = 0;
    // Not through the thread's cached descriptor: this runs on the calling
    // thread, which outlives the restore.
    let file = OpenOptions::new().read(true).write(true).open(&path).map_err(Error::io("open", &path))?;
    for b in blocks.iter() {
        let at = b as u64 * bs;
        if at >= old {
            break;
        }
        if unchanged.is_some_and(|u| !u.may_differ(index, b)) {
            continue;
        }
        let len = bs.min(old - at) as usize;
        file.read_exact_at(&mut buf[..len], at).map_err(Error::io("read", &path))?;
        if buf[..len] != zeros[..len] {
            file.write_all_at(&zeros[..len], at).map_err(Error::io("write", &path))?;
            written += len as u64;
        }
    }
    Ok(written)
}

/// A delta restore, before anything is written: removes `global/pg_control`
/// first (durably: a delta killed midway leaves a directory that cannot
/// start), then every file, link and directory of the target and of its
/// tablespace locations that the backup does not hold. Follows no link:
/// a tablespace link that points to its mapped location is kept, any other
/// link is removed. Returns how many entries were removed, and the large
/// files it leaves to an [`Unlinker`]: on this file system each removal of a
/// WAL segment costs milliseconds, which the restore's reads and writes can
/// hide; no restored path is one of them.
fn prune_for_delta(target: &Path, m: &Manifest, locations: &[(u32, String)]) -> Result<(u64, Vec<PathBuf>)> {
    let global = target.join("global");
    match fs::remove_file(global.join("pg_control")) {
        Ok(()) => {
            File::open(&global).and_then(|d| d.sync_all()).map_err(Error::io("sync directory", &global))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::Io { op: "remove", path: global.join("pg_control"), source: e }),
    }
    let files: HashSet<&str> =
        m.files.iter().filter(|f| !f.vanished && f.path != CONTROL_FILE).map(|f| f.path.as_str()).collect();
    let mut dirs: HashSet<&str> = m.directories.iter().map(|d| d.path.as_str()).collect();
    for f in &files {
        let mut p = *f;
        while let Some(i) = p.rfind('/') {
            p = &p[..i];
            if !dirs.insert(p) {
                break;
            }
        }
    }
    let links: HashMap<String, &str> =
        locations.iter().map(|(oid, loc)| (format!("pg_tblspc/{oid}"), loc.as_str())).collect();
    let mut removed = 0;
    let mut later = Vec::new();
    prune_dir(target, "", &files, &dirs, &links, &mut removed, &mut later)?;
    for (oid, loc) in locations {
        if Path::new(loc).is_dir() {
            let r = format!("pg_tblspc/{oid}");
            prune_dir(Path::new(loc), &r, &files, &dirs, &HashMap::new(), &mut removed, &mut later)?;
        }
    }
    Ok((removed + later.len() as u64, later))
}

/// Files at least this large are removed by the [`Unlinker`], beside the restore.
const UNLINK_LATER: u64 = 1 << 20;

/// Removes files on a thread of its own while the restore goes on; the
/// restore waits for it before it writes what recovery needs (and pg_control).
struct Unlinker(Option<std::thread::JoinHandle<Result<()>>>);

impl Unlinker {
    fn start(paths: Vec<PathBuf>) -> Unlinker {
        if paths.is_empty() {
            return Unlinker(None);
        }
        Unlinker(Some(std::thread::spawn(move || {
            for p in paths {
                match fs::remove_file(&p) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(Error::Io { op: "remove", path: p, source: e })
                    }
                    _ => {}
                }
            }
            Ok(())
        })))
    }

    fn finish(mut self) -> Result<()> {
        match self.0.take() {
            None => Ok(()),
            Some(h) => h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
        }
    }
}

impl Drop for Unlinker {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            let _ = h.join();
        }
    }
}

fn prune_dir(
    dir: &Path,
    rel: &str,
    files: &HashSet<&str>,
    dirs: &HashSet<&str>,
    links: &HashMap<String, &str>,
    removed: &mut u64,
    later: &mut Vec<PathBuf>,
) -> Result<()> {
    for e in fs::read_dir(dir).map_err(Error::io("read directory", dir))? {
        let e = e.map_err(Error::io("read directory", dir))?;
        let p = e.path();
        let Some(name) = e.file_name().to_str().map(String::from) else {
            // Not UTF-8: no manifest path names it.
            remove_entry(&p)?;
            *removed += 1;
            continue;
        };
        let r = if rel.is_empty() { name } else { format!("{rel}/{name}") };
        let md = fs::symlink_metadata(&p).map_err(Error::io("stat", &p))?;
        let keep = if md.file_type().is_symlink() {
            links.get(&r).is_some_and(|loc| fs::read_link(&p).is_ok_and(|to| to == Path::new(loc)))
        } else if md.is_dir() {
            dirs.contains(r.as_str())
        } else {
            md.is_file() && files.contains(r.as_str())
        };
        if !keep && md.is_file() && md.len() >= UNLINK_LATER && !dirs.contains(r.as_str()) {
            later.push(p);
        } else if !keep {
            remove_entry(&p)?;
            *removed += 1;
        } else if md.is_dir() {
            prune_dir(&p, &r, files, dirs, links, removed, later)?;
        }
    }
    Ok(())
}

/// Removes a file, link or directory tree, never following a link.
fn remove_entry(p: &Path) -> Result<()> {
    let md = fs::symlink_metadata(p).map_err(Error::io("stat", p))?;
    if md.is_dir() {
        fs::remove_dir_all(p).map_err(Error::io("remove", p))
    } else {
        fs::remove_file(p).map_err(Error::io("remove", p))
    }
}

/// `tablespace_map` escapes `\n`, `\r` and `\` with a backslash, as PostgreSQL writes it.
fn escape_tablespace_path(p: &str) -> String {
    let mut s = String::with_capacity(p.len());
    for c in p.chars() {
        if matches!(c, '\n' | '\r' | '\\') {
            s.push('\\');
        }
        s.push(c);
    }
    s
}

/// A setting value quoted for postgresql.conf, whose parser takes a backslash
/// as an escape character inside quotes and '' as a quote.
fn quote_setting(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "''"))
}

fn write_recovery_files(
    target: &Path,
    locations: &[(u32, String)],
    m: &Manifest,
    opts: &RestoreOptions,
    follow: Option<&(String, String)>,
) -> Result<()> {
    let write = |name: &str, bytes: &[u8], append: bool| -> Result<()> {
        let p = target.join(name);
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .append(append)
            .truncate(!append)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&p)
            .map_err(Error::io("write", &p))?;
        f.write_all(bytes).map_err(Error::io("write", &p))?;
        Ok(())
    };
    write("backup_label", m.backup_label.as_bytes(), false)?;
    if !locations.is_empty() {
        let map: String =
            locations.iter().map(|(oid, loc)| format!("{oid} {}\n", escape_tablespace_path(loc))).collect();
        write("tablespace_map", map.as_bytes(), false)?;
    }
    write("recovery.signal", b"", false)?;
    // A backup taken from a standby holds its standby.signal: without it the
    // restored cluster recovers to the backup's end (or the target) and is
    // promoted, as from a primary's backup. Create it again to make a standby.
    let standby = target.join("standby.signal");
    match fs::remove_file(&standby) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(Error::Io { op: "remove", path: standby, source: e })
        }
        _ => {}
    }
    let mut conf = format!(
        "\n# added by blockstream restore of backup {} at {}\n",
        m.backup_id,
        timefmt::iso8601(SystemTime::now())
    );
    if let Some(cmd) = &opts.restore_command {
        conf += &format!("restore_command = {}\n", quote_setting(cmd));
    }
    match &opts.recovery_target {
        RecoveryTarget::EndOfWal => {}
        RecoveryTarget::Immediate => conf += "recovery_target = 'immediate'\n",
        RecoveryTarget::Time(t) => conf += &format!("recovery_target_time = {}\n", quote_setting(t)),
        RecoveryTarget::Lsn(l) => conf += &format!("recovery_target_lsn = '{l}'\n"),
        RecoveryTarget::Xid(x) => conf += &format!("recovery_target_xid = {}\n", quote_setting(x)),
        RecoveryTarget::Name(n) => conf += &format!("recovery_target_name = {}\n", quote_setting(n)),
    }
    if opts.recovery_target != RecoveryTarget::EndOfWal {
        let action = opts.target_action.as_deref().unwrap_or("promote");
        conf += &format!("recovery_target_action = {}\n", quote_setting(action));
    }
    if let Some(t) = &opts.target_timeline {
        conf += &format!("recovery_target_timeline = {}\n", quote_setting(t));
    } else if let Some((t, why)) = follow {
        // The newest timeline is not of this backup's history.
        conf += &format!("# not the newest timeline: {}\n", why.replace('\n', " "));
        conf += &format!("recovery_target_timeline = {}\n", quote_setting(t));
    }
    write("postgresql.auto.conf", conf.as_bytes(), true)
}

fn sync_filesystem(path: &Path) -> Result<()> {
    let f = File::open(path).map_err(Error::io("open", path))?;
    // SAFETY: syncfs on a descriptor we own.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(Error::Io {
            op: "sync file system of",
            path: path.to_path_buf(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_like_postgres() {
        assert_eq!(escape_tablespace_path("/a b\\c\nd"), "/a b\\\\c\\\nd");
        assert_eq!(quote_setting("it's"), "'it''s'");
        assert_eq!(quote_setting(r"a'\''b"), r"'a''\\''''b'");
    }

    #[test]
    fn refuses_non_empty_target_without_force() {
        let d = std::env::temp_dir().join(format!("bs-prep-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        assert_eq!(check_dir(&d, false, "target directory", &[]).unwrap(), DirState::Absent);
        fs::create_dir_all(&d).unwrap();
        assert_eq!(check_dir(&d, false, "target directory", &[]).unwrap(), DirState::Empty);
        fs::write(d.join("x"), b"1").unwrap();
        let err = check_dir(&d, false, "target directory", &[]).unwrap_err().to_string();
        assert!(err.contains("is not empty"), "{err}");
        fs::write(d.join("postmaster.pid"), b"1").unwrap();
        let err = check_dir(&d, true, "target directory", &[]).unwrap_err().to_string();
        assert!(err.contains("postmaster.pid"), "{err}");
        fs::remove_file(d.join("postmaster.pid")).unwrap();
        assert_eq!(check_dir(&d, true, "target directory", &[]).unwrap(), DirState::Replace);
        assert!(d.join("x").exists(), "checking removes nothing");
        let running = [Postmaster { pid: 1, data_directory: d.clone(), tablespaces: vec![] }];
        let err = check_dir(&d, true, "target directory", &running).unwrap_err().to_string();
        assert!(err.contains("is in use: the server with pid 1"), "{err}");
        empty_dir(&d).unwrap();
        assert!(fs::read_dir(&d).unwrap().next().is_none());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn relation_files_name_their_database() {
        assert_eq!(database_of_relation("base/16384/16385"), Some(16384));
        assert_eq!(database_of_relation("base/16384/16385_fsm"), Some(16384));
        assert_eq!(database_of_relation("base/16384/16385.2"), Some(16384));
        assert_eq!(database_of_relation("pg_tblspc/16390/PG_15_202209061/16384/16391"), Some(16384));
        for other in ["base/16384/PG_VERSION", "base/16384/pg_filenode.map", "global/1262", "base/x/1", "base/1"] {
            assert_eq!(database_of_relation(other), None, "{other}");
        }
    }

    #[test]
    fn modes_are_masked_to_what_postgres_accepts() {
        assert_eq!((dir_mode(0o777), dir_mode(0o700), dir_mode(0)), (0o750, 0o700, 0o700));
        assert_eq!((file_mode(0o4777), file_mode(0o600), file_mode(0o640)), (0o640, 0o600, 0o640));
    }
}
