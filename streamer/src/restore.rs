//! Restore: a backup from the repository into a new data directory, in parallel.
//!
//! Nothing is written until every chunk of the backup has been read and
//! matched against its SHA-256. Then directories, tablespace links and files
//! (sized with fallocate, so a full disk is an error and never a SIGBUS on a
//! mapped page) are created, and N threads decode chunks and write each
//! record through a memory map of its target file. Each record is one piece
//! of one file, so threads never write the same bytes. Finally every file's
//! digest is compared with the manifest, `backup_label`, `tablespace_map` and
//! `recovery.signal` are written with what recovery needs to find WAL, and
//! the file systems are synced.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{symlink, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use memmap2::MmapOptions;

use crate::chain::{load_chain, resolve, Take};
use crate::error::{Error, Result};
use crate::lsn::Lsn;
use crate::manifest::{check_relative_path, FileEntry, Manifest};
use crate::progress::Progress;
use crate::repo::Repo;
use crate::timefmt;
use crate::verify::{check_chunks, check_file_digests, decode_chunks};

/// Where recovery stops.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum RecoveryTarget {
    /// Replay all WAL that can be found, then promote.
    #[default]
    EndOfWal,
    /// Stop as soon as the backup is consistent.
    Immediate,
    Time(String),
    Lsn(Lsn),
}

#[derive(Clone, Debug)]
pub struct RestoreOptions {
    pub repo: PathBuf,
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
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct RestoreReport {
    pub backup_id: String,
    /// The backups read, full backup first.
    pub chain: Vec<String>,
    pub target: String,
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

pub fn run_restore(opts: &RestoreOptions, progress: &Progress) -> Result<RestoreReport> {
    let began = Instant::now();
    if opts.jobs == 0 {
        return Err(Error::Usage("jobs must be at least 1".into()));
    }
    let repo = Repo::open(&opts.repo)?;
    let id = repo.resolve(&opts.backup)?;
    let chain = load_chain(&repo, &id)?;
    let m = chain.last().expect("a chain holds at least its target");
    let locations = map_tablespaces(m, &opts.tablespace_map)?;
    let plan = resolve(&chain);
    // Per backup of the chain: the chunks holding the files it contributes.
    let needed: Vec<Vec<(u16, u32)>> = chain
        .iter()
        .zip(&plan)
        .map(|(b, take)| {
            let set: BTreeSet<(u16, u32)> =
                take.keys().flat_map(|&fi| b.files[fi as usize].chunks.iter().copied()).collect();
            set.into_iter().collect()
        })
        .collect();

    prepare_dir(&opts.target, opts.force, "target directory")?;
    for (_, loc) in &locations {
        prepare_dir(Path::new(loc), opts.force, "tablespace directory")?;
    }

    // 1. Every chunk that will be used, checked before a single byte is written.
    let t = Instant::now();
    let mut bytes_stored = 0;
    for (b, chunks) in chain.iter().zip(&needed) {
        bytes_stored += check_chunks(&repo.backup_dir(&b.backup_id), b, opts.jobs, progress, Some(chunks))?;
    }
    let verify_secs = t.elapsed().as_secs_f64();

    // 2. Layout, then data: each backup of the chain writes the blocks it holds newest.
    let t = Instant::now();
    let as_root = unsafe { libc::geteuid() } == 0;
    create_layout(&opts.target, m, &locations, as_root, opts.jobs)?;
    let layout_secs = t.elapsed().as_secs_f64();
    let target = opts.target.as_path();
    for ((b, take), chunks) in chain.iter().zip(&plan).zip(&needed) {
        if chunks.is_empty() {
            continue;
        }
        let bs = b.block_size as u64;
        let digests =
            decode_chunks(&repo.backup_dir(&b.backup_id), b, opts.jobs, progress, Some(chunks), |p| {
                match take.get(&p.file_index) {
                    None => Ok(()),
                    Some(t) => write_record(target, &p.file.path, p.record.offset, p.record.data, t, bs),
                }
            })?;
        check_file_digests(b, digests, Some(&|fi| take.contains_key(&fi)))?;
    }
    let write_secs = t.elapsed().as_secs_f64() - layout_secs;

    // 3. What recovery needs.
    write_recovery_files(&opts.target, m, &locations, opts, as_root)?;
    let t = Instant::now();
    sync_filesystem(&opts.target)?;
    for (_, loc) in &locations {
        sync_filesystem(Path::new(loc))?;
    }
    let sync_secs = t.elapsed().as_secs_f64();
    let bytes_restored: u64 = m.files.iter().filter(|f| !f.vanished).map(|f| f.size).sum();
    let duration = began.elapsed().as_secs_f64();
    Ok(RestoreReport {
        backup_id: id,
        chain: chain.iter().map(|b| b.backup_id.clone()).collect(),
        target: opts.target.display().to_string(),
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

/// Writes the file `path` of backup `id` to `dest`, checked against its
/// digest: how `archive-get` serves WAL segments kept in backups.
pub fn extract_file(repo: &Repo, id: &str, path: &str, dest: &Path) -> Result<()> {
    let m = repo.load_manifest(id)?;
    let dir = repo.backup_dir(id);
    let index = m
        .files
        .iter()
        .position(|f| f.path == path && !f.vanished)
        .ok_or_else(|| Error::Usage(format!("backup {id} holds no file \"{path}\"")))? as u32;
    let out = File::create(dest).map_err(Error::io("create", dest))?;
    out.set_len(m.files[index as usize].size).map_err(Error::io("size", dest))?;
    let chunks = m.files[index as usize].chunks.clone();
    let digests = decode_chunks(&dir, &m, 1, &Progress::default(), Some(&chunks), |p| {
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
        if !new.starts_with('/') {
            return Err(Error::Usage(format!(
                "tablespace mapping \"{old}={new}\": new location must be an absolute path"
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

/// Creates `dir` or checks it is empty; with `force`, empties it unless a server runs there.
fn prepare_dir(dir: &Path, force: bool, what: &str) -> Result<()> {
    let mut entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return fs::create_dir_all(dir).map_err(Error::io("create", dir));
        }
        Err(e) => return Err(Error::Io { op: "read directory", path: dir.to_path_buf(), source: e }),
    };
    if entries.next().is_none() {
        return Ok(());
    }
    if !force {
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

fn set_owner(path: &Path, mode: u32, uid: u32, gid: u32, as_root: bool) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(Error::io("set mode of", path))?;
    if as_root {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(Error::io("change owner of", path))?;
    }
    Ok(())
}

fn create_layout(target: &Path, m: &Manifest, locations: &[(u32, String)], as_root: bool, jobs: usize) -> Result<()> {
    let dd = m.data_directory;
    set_owner(target, dd.mode, dd.uid, dd.gid, as_root)?;
    let mut dirs: Vec<_> = m.directories.iter().collect();
    dirs.sort_by(|a, b| a.path.cmp(&b.path));
    let in_tablespace = |p: &str| {
        p.starts_with("pg_tblspc/") && m.tablespaces.iter().any(|t| p.starts_with(&format!("pg_tblspc/{}/", t.oid)))
    };
    for d in dirs.iter().filter(|d| !in_tablespace(&d.path)) {
        let p = target.join(&d.path);
        fs::create_dir_all(&p).map_err(Error::io("create directory", &p))?;
        set_owner(&p, d.mode, d.uid, d.gid, as_root)?;
    }
    for t in &m.tablespaces {
        let loc = &locations.iter().find(|(o, _)| *o == t.oid).expect("every tablespace is mapped").1;
        let loc = Path::new(loc);
        fs::create_dir_all(loc).map_err(Error::io("create tablespace directory", loc))?;
        set_owner(loc, t.mode, t.uid, t.gid, as_root)?;
        let link = target.join(format!("pg_tblspc/{}", t.oid));
        fs::create_dir_all(link.parent().unwrap()).map_err(Error::io("create directory", &link))?;
        symlink(loc, &link).map_err(Error::io("create tablespace link", &link))?;
        if as_root {
            std::os::unix::fs::lchown(&link, Some(t.uid), Some(t.gid)).map_err(Error::io("change owner of", &link))?;
        }
    }
    for d in dirs.iter().filter(|d| in_tablespace(&d.path)) {
        let p = target.join(&d.path);
        fs::create_dir_all(&p).map_err(Error::io("create directory", &p))?;
        set_owner(&p, d.mode, d.uid, d.gid, as_root)?;
    }
    // Files: creating and sizing a thousand files is kernel work worth spreading over threads.
    let files: Vec<_> = m.files.iter().filter(|f| !f.vanished).collect();
    let per = files.len().div_ceil(jobs.max(1)).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> =
            files.chunks(per).map(|part| s.spawn(move || create_files(target, part, as_root))).collect();
        handles.into_iter().try_for_each(|h| h.join().expect("layout thread panicked"))
    })
}

fn create_files(target: &Path, files: &[&FileEntry], as_root: bool) -> Result<()> {
    for f in files {
        check_relative_path(&f.path)?;
        let p = target.join(&f.path);
        let file = match OpenOptions::new().write(true).create_new(true).mode(0o600).open(&p) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // A parent the manifest does not list as a directory.
                let parent = p.parent().unwrap_or(target);
                fs::create_dir_all(parent).map_err(Error::io("create directory", parent))?;
                OpenOptions::new().write(true).create_new(true).mode(0o600).open(&p).map_err(Error::io("create", &p))?
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
        set_owner(&p, f.mode, f.uid, f.gid, as_root)?;
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

fn quote_setting(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

fn write_recovery_files(
    target: &Path,
    m: &Manifest,
    locations: &[(u32, String)],
    opts: &RestoreOptions,
    as_root: bool,
) -> Result<()> {
    let dd = m.data_directory;
    let write = |name: &str, bytes: &[u8], append: bool| -> Result<()> {
        let p = target.join(name);
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .append(append)
            .truncate(!append)
            .open(&p)
            .map_err(Error::io("write", &p))?;
        f.write_all(bytes).map_err(Error::io("write", &p))?;
        set_owner(&p, 0o600, dd.uid, dd.gid, as_root)
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
    }
    if opts.recovery_target != RecoveryTarget::EndOfWal {
        conf += "recovery_target_action = 'promote'\n";
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
    }

    #[test]
    fn refuses_non_empty_target_without_force() {
        let d = std::env::temp_dir().join(format!("bs-prep-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        prepare_dir(&d, false, "target directory").unwrap();
        fs::write(d.join("x"), b"1").unwrap();
        let err = prepare_dir(&d, false, "target directory").unwrap_err().to_string();
        assert!(err.contains("is not empty"), "{err}");
        fs::write(d.join("postmaster.pid"), b"1").unwrap();
        assert!(prepare_dir(&d, true, "target directory").unwrap_err().to_string().contains("postmaster.pid"));
        fs::remove_file(d.join("postmaster.pid")).unwrap();
        prepare_dir(&d, true, "target directory").unwrap();
        assert!(fs::read_dir(&d).unwrap().next().is_none());
        fs::remove_dir_all(&d).unwrap();
    }
}
