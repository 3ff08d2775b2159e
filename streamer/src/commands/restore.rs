//! Restore: a backup from the repository into a new data directory, in parallel.
//!
//! Order, so that a failed or killed restore loses nothing and leaves nothing
//! that looks startable:
//!
//! 1. Everything is checked before a byte is removed or written: the chain of
//!    manifests, the tablespace mapping, the target (empty, or `--force` and
//!    no server using it), every tablespace location (absent or empty, as
//!    pg_basebackup requires; a non-empty one only when named by
//!    `--tablespace-map` with `--force`, and never while a server uses it),
//!    and every stored chunk against its SHA-256.
//! 2. Run as root, the process switches to the target's owner (see
//!    [`crate::privs`]); repository files are opened before that.
//! 3. What `--force` replaces is emptied; directories, tablespace links and
//!    files (sized with fallocate, so a full disk is an error and never a
//!    SIGBUS on a mapped page) are created, and N threads decode chunks and
//!    write each record through a memory map of its target file. Each record
//!    is one piece of one file, so threads never write the same bytes. Every
//!    file's digest is compared with the manifest.
//! 4. `backup_label`, `tablespace_map`, `recovery.signal` and the recovery
//!    settings are written, then `global/pg_control`, last of all: a data
//!    directory without it cannot start, so one left by a killed or failed
//!    restore never runs crash recovery from a half-restored copy. A rerun
//!    with `--force` completes it. Then the file systems are synced.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{symlink, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Instant, SystemTime};

use memmap2::MmapOptions;

use crate::archive;
use crate::chain::{load_chain, resolve, Take};
use crate::error::{Error, Result};
use crate::lsn::Lsn;
use crate::manifest::{check_absolute_path, check_relative_path, FileEntry, Manifest};
use crate::privs::{self, Postmaster, User};
use crate::progress::Progress;
use crate::repo::Repo;
use crate::safe_fs;
use crate::timefmt;
use crate::verify::{check_chunks, check_file_digests, decode_chunks, open_streams};

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
    /// Reading every chunk and checking its digest, before anything is written.
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
}

pub fn run_restore(opts: &RestoreOptions, progress: &Progress) -> Result<RestoreReport> {
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
    check_archive_reaches(&repo, m, &opts.recovery_target)?;
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
    let plan = resolve(&chain);
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

    // 1. The target and the tablespace locations, before anything is read.
    let postmasters = privs::running_postmasters();
    let target_state = check_dir(&opts.target, opts.force, "target directory", &postmasters)?;
    let mut replace = Vec::new();
    for (oid, loc) in &locations {
        let named = opts.tablespace_map.iter().any(|(_, new)| new.trim_end_matches('/') == loc);
        let what = format!("tablespace {oid} location");
        match check_dir(Path::new(loc), opts.force && named, &what, &postmasters) {
            Ok(DirState::Replace) => replace.push(PathBuf::from(loc)),
            Ok(_) => {}
            Err(Error::Conflict(msg)) if !named && msg.contains("is not empty") => {
                return Err(Error::Conflict(format!(
                    "{what} \"{loc}\" is not empty: a tablespace is restored only into an absent or empty directory; map it elsewhere with --tablespace-map OLD=NEW, or name it with --tablespace-map {loc}={loc} and --force to replace its contents"
                )));
            }
            Err(e) => return Err(e),
        }
    }
    let owner = if privs::is_root() {
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

    // 2. Every chunk that will be used, checked before a single byte is written.
    let t = Instant::now();
    let streams = chain
        .iter()
        .zip(&needed)
        .map(|(b, chunks)| if chunks.is_empty() { Ok(Vec::new()) } else { open_streams(&repo, b) })
        .collect::<Result<Vec<_>>>()?;
    let mut bytes_stored = 0;
    for ((b, chunks), readers) in chain.iter().zip(&needed).zip(&streams) {
        bytes_stored += check_chunks(readers, b, opts.jobs, progress, Some(chunks))?;
    }
    let verify_secs = t.elapsed().as_secs_f64();

    // 3. As the owner: replace, lay out, write.
    if let Some(u) = &owner {
        prepare_target_as_root(&opts.target, target_state, u)?;
        privs::become_user(u)?;
    }
    match target_state {
        DirState::Absent => safe_fs::create_dir(&opts.target, 0o700)?,
        DirState::Empty => {}
        DirState::Replace => empty_dir(&opts.target)?,
    }
    for dir in &replace {
        empty_dir(dir)?;
    }
    let t = Instant::now();
    create_layout(&opts.target, m, &locations, opts.jobs)?;
    let layout_secs = t.elapsed().as_secs_f64();
    let target = opts.target.as_path();
    let control_bytes = Mutex::new(vec![0u8; control.size as usize]);
    for (((b, take), chunks), readers) in chain.iter().zip(&plan).zip(&needed).zip(&streams) {
        if chunks.is_empty() {
            continue;
        }
        let bs = b.block_size as u64;
        let digests = decode_chunks(readers, b, repo.keyring(), opts.jobs, progress, Some(chunks), |p| {
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
            write_record(target, &p.file.path, p.record.offset, p.record.data, t, bs)?;
            crate::failpoint::hit("restore-record");
            Ok(())
        })?;
        check_file_digests(b, digests, Some(&|fi| take.contains_key(&fi)))?;
    }
    let write_secs = t.elapsed().as_secs_f64() - layout_secs;

    // 4. What recovery needs, then pg_control, then the disk.
    write_recovery_files(&opts.target, &locations, m, opts)?;
    crate::failpoint::hit("restore-written");
    let t = Instant::now();
    sync_filesystem(&opts.target)?;
    for (_, loc) in &locations {
        sync_filesystem(Path::new(loc))?;
    }
    let control_mode = (control.mode & 0o640) | 0o600;
    let global = opts.target.join("global");
    safe_fs::write_durably(&global, "pg_control", &control_bytes.into_inner().expect("not poisoned"), control_mode)?;
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
        verify_secs,
        layout_secs,
        write_secs,
        sync_secs,
        duration_secs: duration,
        throughput_mib_s: bytes_restored as f64 / (1 << 20) as f64 / duration.max(1e-9),
        jobs: opts.jobs as u32,
    })
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
    let gaps = archive::gaps(repo, &listing, m.timeline, Lsn((stop_seg + 1) * seg), seg)?;
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

/// Writes the file `path` of backup `id` to `dest`, checked against its
/// digest: how `archive-get` serves WAL segments kept in backups.
pub fn extract_file(repo: &Repo, id: &str, path: &str, dest: &Path) -> Result<()> {
    let m = repo.load_manifest(id)?;
    let index = m
        .files
        .iter()
        .position(|f| f.path == path && !f.vanished)
        .ok_or_else(|| Error::Usage(format!("backup {id} holds no file \"{path}\"")))? as u32;
    let streams = open_streams(repo, &m)?;
    let out = File::create(dest).map_err(Error::io("create", dest))?;
    out.set_len(m.files[index as usize].size).map_err(Error::io("size", dest))?;
    let chunks = m.files[index as usize].chunks.clone();
    let digests = decode_chunks(&streams, &m, repo.keyring(), 1, &Progress::default(), Some(&chunks), |p| {
        if p.file_index == index {
            use std::os::unix::fs::FileExt;
            out.write_all_at(p.record.data, p.record.offset).map_err(Error::io("write", dest))?;
        }
        Ok(())
    })?;
    check_file_digests(&m, digests, Some(&|fi| fi == index))?;
    out.sync_all().map_err(Error::io("fsync", dest))
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
            "{what} \"{}\" holds postmaster.pid: stop the server that uses it before restoring over it",
            dir.display()
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
        let p = e.map_err(Error::io("read directory", dir))?.path();
        let md = fs::symlink_metadata(&p).map_err(Error::io("stat", &p))?;
        if md.is_dir() {
            fs::remove_dir_all(&p).map_err(Error::io("remove", &p))?;
        } else {
            fs::remove_file(&p).map_err(Error::io("remove", &p))?;
        }
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

fn create_layout(target: &Path, m: &Manifest, locations: &[(u32, String)], jobs: usize) -> Result<()> {
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
        symlink(loc, &link).map_err(Error::io("create tablespace link", &link))?;
    }
    for d in dirs.iter().filter(|d| in_tablespace(&d.path)) {
        let p = target.join(&d.path);
        fs::create_dir_all(&p).map_err(Error::io("create directory", &p))?;
        set_mode(&p, dir_mode(d.mode))?;
    }
    // Files: creating and sizing a thousand files is kernel work worth
    // spreading over threads. pg_control is written last, on its own.
    let files: Vec<_> = m.files.iter().filter(|f| !f.vanished && f.path != CONTROL_FILE).collect();
    let per = files.len().div_ceil(jobs.max(1)).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = files.chunks(per).map(|part| s.spawn(move || create_files(target, part))).collect();
        handles.into_iter().try_for_each(|h| h.join().expect("layout thread panicked"))
    })
}

fn create_files(target: &Path, files: &[&FileEntry]) -> Result<()> {
    for f in files {
        check_relative_path(&f.path)?;
        let p = target.join(&f.path);
        let mode = file_mode(f.mode);
        let open =
            || OpenOptions::new().write(true).create_new(true).mode(mode).custom_flags(libc::O_NOFOLLOW).open(&p);
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
        if f.size > 0 {
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
    Ok(())
}

thread_local! {
    /// The restored file this thread wrote blocks of last, kept open:
    /// consecutive records of a chunk mostly belong to one file.
    static OPEN: std::cell::RefCell<Option<(PathBuf, File)>> = const { std::cell::RefCell::new(None) };
}

/// Records of an older backup of the chain smaller than this are written
/// with pwrite: mapping a few blocks costs more than copying them (an
/// incremental stores many single blocks).
const MAP_AT_LEAST: usize = 64 * 1024;

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

/// Writes `runs` (byte ranges of `data`) at `offset` of `file` through a
/// memory map of the record's range.
fn map_and_copy(file: &File, path: &Path, offset: u64, data: &[u8], runs: &[(usize, usize)]) -> Result<()> {
    // SAFETY: the file was created by this restore and sized with fallocate,
    // so every page of the range is backed by allocated blocks; no other
    // process uses it, and no other thread writes the same bytes (each block
    // of a restored file has exactly one source, and a backup's pieces do not
    // overlap). Bytes outside `runs` are left untouched.
    let mut map =
        unsafe { MmapOptions::new().offset(offset).len(data.len()).map_mut(file) }.map_err(Error::io("map", path))?;
    for &(from, to) in runs {
        map[from..to].copy_from_slice(&data[from..to]);
    }
    drop(map);
    start_writeback(file, offset, data.len());
    Ok(())
}

/// Writes the blocks of a record that `take` assigns to this backup into the
/// restored file `rel`.
fn write_record(target: &Path, rel: &str, offset: u64, data: &[u8], take: &Take, bs: u64) -> Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    let path = target.join(rel);
    if let Take::All = take {
        // The common case (a whole file of the backup being restored): measured
        // fastest as open, map, copy, unmap, start writeback, close.
        let file = OpenOptions::new().read(true).write(true).open(&path).map_err(Error::io("open", &path))?;
        return map_and_copy(&file, &path, offset, data, &[(0, data.len())]);
    }
    // The runs of blocks this backup is the newest source of.
    let (first, nblocks) = (offset / bs, (data.len() as u64).div_ceil(bs));
    let mut runs = Vec::new();
    let mut k = 0;
    while k < nblocks {
        if !take.takes((first + k) as u32) {
            k += 1;
            continue;
        }
        let run = k;
        while k < nblocks && take.takes((first + k) as u32) {
            k += 1;
        }
        runs.push(((run * bs) as usize, ((k * bs) as usize).min(data.len())));
    }
    if runs.is_empty() {
        return Ok(());
    }
    OPEN.with(|cell| {
        let mut open = cell.borrow_mut();
        if open.as_ref().is_none_or(|(p, _)| *p != path) {
            let file = OpenOptions::new().read(true).write(true).open(&path).map_err(Error::io("open", &path))?;
            *open = Some((path.clone(), file));
        }
        let file = &open.as_ref().expect("just opened").1;
        if data.len() >= MAP_AT_LEAST {
            return map_and_copy(file, &path, offset, data, &runs);
        }
        use std::os::unix::fs::FileExt;
        for (from, to) in runs {
            file.write_all_at(&data[from..to], offset + from as u64).map_err(Error::io("write", &path))?;
        }
        start_writeback(file, offset, data.len());
        Ok(())
    })
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

fn write_recovery_files(target: &Path, locations: &[(u32, String)], m: &Manifest, opts: &RestoreOptions) -> Result<()> {
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
    fn modes_are_masked_to_what_postgres_accepts() {
        assert_eq!((dir_mode(0o777), dir_mode(0o700), dir_mode(0)), (0o750, 0o700, 0o700));
        assert_eq!((file_mode(0o4777), file_mode(0o600), file_mode(0o640)), (0o640, 0o600, 0o640));
    }
}
