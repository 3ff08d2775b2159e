//! The repository: layout, identity file (`repo.json`) and the writer lock.
//!
//! ```text
//! REPO/
//!   repo.json              format, version, system identifier, PostgreSQL version
//!   lock                   flock(2)-ed by the one process that writes
//!   backups/<id>/          manifest.json (last), stream-NN.bsz, backup_label, tablespace_map
//! ```
//!
//! A directory under `backups/` without `manifest.json` is a backup that never
//! finished; it is invisible to every reader and removed by the next writer
//! (only when its name is a backup id and it holds nothing but the files a
//! backup writes).
//!
//! Everything is created with mode 0750 (directories) or 0640 (files),
//! whatever the umask: a repository holds the whole database.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::manifest::{limits, BackupType, Manifest, MANIFEST_FILE};
use crate::safe_fs::{self, DIR_MODE, FILE_MODE};
use crate::timefmt;

pub const REPO_FILE: &str = "repo.json";
pub const REPO_FORMAT: &str = "blockstream-repository";
pub const REPO_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoInfo {
    pub format: String,
    pub version: u32,
    pub system_identifier: u64,
    pub pg_version_num: u32,
    pub created: String,
}

#[derive(Debug)]
pub struct Repo {
    root: PathBuf,
    pub info: RepoInfo,
}

/// Held while a process writes to the repository; released on drop (or death).
#[derive(Debug)]
pub struct RepoLock {
    file: File,
    /// The holder recorded by a process that died holding the lock.
    pub taken_over: Option<String>,
}

impl Drop for RepoLock {
    fn drop(&mut self) {
        // A clean release leaves the file empty; the kernel drops the flock with the descriptor.
        let _ = self.file.set_len(0);
    }
}

impl Repo {
    /// Opens an existing repository.
    pub fn open(root: &Path) -> Result<Repo> {
        let file = root.join(REPO_FILE);
        let bytes = match safe_fs::read_regular(&file, 1 << 20) {
            Ok(b) => b,
            Err(e) if e.is_not_found() => {
                return Err(if root.exists() {
                    Error::Usage(format!(
                        "\"{}\" is not a blockstream repository: {REPO_FILE} is missing",
                        root.display()
                    ))
                } else {
                    Error::Usage(format!("repository \"{}\" does not exist", root.display()))
                });
            }
            Err(e) => return Err(e),
        };
        let info: RepoInfo = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Corrupt(format!("\"{}\" does not parse: {e}", file.display())))?;
        if info.format != REPO_FORMAT || info.version != REPO_VERSION {
            return Err(Error::Corrupt(format!(
                "\"{}\" has format \"{}\" version {}, expected \"{REPO_FORMAT}\" version {REPO_VERSION}",
                file.display(),
                info.format,
                info.version
            )));
        }
        Ok(Repo { root: root.to_path_buf(), info })
    }

    /// Opens the repository, creating it for this cluster if the directory is
    /// absent or empty. Refuses a repository of another cluster.
    pub fn open_or_create(root: &Path, system_identifier: u64, pg_version_num: u32) -> Result<Repo> {
        let empty = match fs::read_dir(root) {
            Ok(mut d) => d.next().is_none(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => return Err(Error::Io { op: "read directory", path: root.to_path_buf(), source: e }),
        };
        if empty {
            if let Some(parent) = root.parent() {
                fs::create_dir_all(parent).map_err(Error::io("create repository", root))?;
            }
            safe_fs::create_dir(root, DIR_MODE)?;
            safe_fs::create_dir(&root.join("backups"), DIR_MODE)?;
            let info = RepoInfo {
                format: REPO_FORMAT.into(),
                version: REPO_VERSION,
                system_identifier,
                pg_version_num,
                created: timefmt::iso8601(SystemTime::now()),
            };
            let bytes = serde_json::to_vec_pretty(&info).expect("repository info serializes");
            safe_fs::write_durably(root, REPO_FILE, &bytes, FILE_MODE)?;
        }
        let repo = Repo::open(root)?;
        if repo.info.system_identifier != system_identifier {
            return Err(Error::Conflict(format!(
                "repository \"{}\" belongs to the cluster with system identifier {}, not to this one ({system_identifier})",
                root.display(),
                repo.info.system_identifier
            )));
        }
        if repo.info.pg_version_num / 10000 != pg_version_num / 10000 {
            return Err(Error::Conflict(format!(
                "repository \"{}\" holds backups of PostgreSQL {}, the server runs {}",
                root.display(),
                repo.info.pg_version_num / 10000,
                pg_version_num / 10000
            )));
        }
        Ok(repo)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn backups_dir(&self) -> PathBuf {
        self.root.join("backups")
    }

    pub fn backup_dir(&self, id: &str) -> PathBuf {
        self.backups_dir().join(id)
    }

    /// Takes the writer lock, or says who holds it. The lock is `flock(2)`,
    /// which the kernel releases when its holder dies; the holder's pid is
    /// written into the file and cleared on release, so a pid found there
    /// when the lock is free was left by a process that died holding it:
    /// `taken_over` names it.
    pub fn lock(&self) -> Result<RepoLock> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.root.join("lock");
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(Error::io("open lock file", &path))?;
        let md = file.metadata().map_err(Error::io("stat", &path))?;
        if !md.is_file() {
            return Err(Error::Corrupt(format!("lock file \"{}\" is not a regular file", path.display())));
        }
        // SAFETY: flock on a file descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        let holder = {
            let mut s = String::new();
            let _ = (&file).take(256).read_to_string(&mut s);
            s.trim().to_string()
        };
        if rc != 0 {
            return Err(Error::Conflict(format!(
                "repository \"{}\" is locked by another blockstream process{}",
                self.root.display(),
                if holder.is_empty() { String::new() } else { format!(" ({holder})") }
            )));
        }
        let taken_over = (!holder.is_empty()).then_some(holder);
        file.set_len(0).map_err(Error::io("write", &path))?;
        let _ = write!(file, "pid {} since {}", std::process::id(), timefmt::iso8601(SystemTime::now()));
        let _ = file.sync_data();
        Ok(RepoLock { file, taken_over })
    }

    /// Ids of complete backups (those with a manifest), oldest first.
    pub fn backup_ids(&self) -> Result<Vec<String>> {
        let dir = self.backups_dir();
        let mut ids = Vec::new();
        for e in fs::read_dir(&dir).map_err(Error::io("read directory", &dir))? {
            let e = e.map_err(Error::io("read directory", &dir))?;
            let id = e.file_name().to_string_lossy().into_owned();
            // A backup is a real directory (never a symbolic link) holding a
            // manifest; one that is not a regular file is listed, and refused
            // with its reason when read.
            let real_dir = e.file_type().is_ok_and(|t| t.is_dir());
            let has_manifest = fs::symlink_metadata(e.path().join(MANIFEST_FILE)).is_ok_and(|m| !m.is_dir());
            if is_backup_id(&id) && real_dir && has_manifest {
                ids.push(id);
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Resolves `latest` or an id to an existing backup.
    pub fn resolve(&self, which: &str) -> Result<String> {
        let ids = self.backup_ids()?;
        if which == "latest" {
            return ids
                .last()
                .cloned()
                .ok_or_else(|| Error::Usage(format!("repository \"{}\" holds no backup yet", self.root.display())));
        }
        if ids.iter().any(|i| i == which) {
            Ok(which.to_string())
        } else {
            Err(Error::Usage(format!(
                "backup \"{which}\" is not in repository \"{}\"{}",
                self.root.display(),
                match ids.last() {
                    Some(l) => format!(" (latest is {l})"),
                    None => " (it holds no backup yet)".into(),
                }
            )))
        }
    }

    /// Reads and checks the manifest of backup `id`, following no symbolic link.
    pub fn load_manifest(&self, id: &str) -> Result<Manifest> {
        if !is_backup_id(id) {
            return Err(Error::Usage(format!("\"{id}\" is not a backup id (like 20261127T031500F)")));
        }
        let rel = format!("backups/{id}/{MANIFEST_FILE}");
        let bytes = safe_fs::read_beneath(&self.root, &rel, limits::MANIFEST_BYTES)?;
        let m = Manifest::from_bytes(&bytes, &self.root.join(&rel))?;
        if m.backup_id != id {
            return Err(Error::Corrupt(format!(
                "manifest in \"{}\" describes backup {}, not {id}",
                self.backup_dir(id).display(),
                m.backup_id
            )));
        }
        Ok(m)
    }

    /// Removes backup directories that never got a manifest: those named
    /// like a backup id that hold nothing but what a backup writes. Anything
    /// else under `backups/` is left alone and named in the second list.
    /// Needs the lock.
    pub fn remove_incomplete(&self, _lock: &RepoLock) -> Result<(Vec<String>, Vec<String>)> {
        let dir = self.backups_dir();
        let (mut removed, mut foreign) = (Vec::new(), Vec::new());
        for e in fs::read_dir(&dir).map_err(Error::io("read directory", &dir))? {
            let e = e.map_err(Error::io("read directory", &dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let p = e.path();
            let real_dir = e.file_type().is_ok_and(|t| t.is_dir());
            if real_dir && is_backup_id(&name) && fs::symlink_metadata(p.join(MANIFEST_FILE)).is_ok() {
                continue;
            }
            if real_dir && is_backup_id(&name) && holds_only_backup_files(&p) {
                fs::remove_dir_all(&p).map_err(Error::io("remove incomplete backup", &p))?;
                removed.push(name);
            } else {
                foreign.push(name);
            }
        }
        if !removed.is_empty() {
            safe_fs::fsync_dir(&dir)?;
        }
        Ok((removed, foreign))
    }

    /// Removes one backup directory that never got a manifest (a backup that
    /// failed just now). Needs the lock.
    pub fn remove_failed(&self, id: &str, _lock: &RepoLock) {
        let p = self.backup_dir(id);
        if is_backup_id(id) && !p.join(MANIFEST_FILE).exists() && holds_only_backup_files(&p) {
            let _ = fs::remove_dir_all(&p);
        }
    }

    /// A fresh id later than every backup in the repository: the current
    /// UTC second, or one second past the latest id when that is not later.
    /// Needs the lock.
    pub fn new_backup_id(&self, kind: BackupType, _lock: &RepoLock) -> Result<String> {
        let now = SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let after = self.backup_ids()?.last().and_then(|l| timefmt::parse_compact(l)).map_or(0, |t| t + 1);
        let mut t = now.max(after);
        loop {
            let id = format!("{}{}", timefmt::compact(std::time::UNIX_EPOCH + Duration::from_secs(t)), kind.letter());
            // A directory left by a failed backup of that second is skipped, not reused.
            if !self.backup_dir(&id).exists() {
                return Ok(id);
            }
            t += 1;
        }
    }
}

/// Whether a directory holds only regular files a backup writes (streams,
/// its label files, a manifest being written), nothing else.
fn holds_only_backup_files(dir: &Path) -> bool {
    let Ok(rd) = fs::read_dir(dir) else { return false };
    rd.flatten().all(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        let ours = crate::stream::is_stream_file_name(&name)
            || matches!(name.as_str(), "backup_label" | "tablespace_map" | "manifest.json.tmp");
        ours && e.file_type().is_ok_and(|t| t.is_file())
    })
}

/// Creates the directory of a new backup (mode 0750).
pub fn create_backup_dir(path: &Path) -> Result<()> {
    fs::create_dir(path).map_err(Error::io("create backup directory", path))?;
    safe_fs::create_dir(path, DIR_MODE)
}

/// `20261127T031500F`
pub fn is_backup_id(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 16
        && b[..8].iter().all(u8::is_ascii_digit)
        && b[8] == b'T'
        && b[9..15].iter().all(u8::is_ascii_digit)
        && matches!(b[15], b'F' | b'I' | b'D')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_open_lock_and_refuse_other_cluster() {
        let root = std::env::temp_dir().join(format!("bs-repo-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        assert!(Repo::open(&root).unwrap_err().to_string().contains("does not exist"));
        let repo = Repo::open_or_create(&root, 42, 150018).unwrap();
        let lock = repo.lock().unwrap();
        let err = Repo::open(&root).unwrap().lock().err().unwrap().to_string();
        assert!(err.contains("is locked by another blockstream process (pid"), "{err}");
        let id = repo.new_backup_id(BackupType::Full, &lock).unwrap();
        assert!(is_backup_id(&id), "{id}");
        fs::create_dir_all(repo.backup_dir(&id)).unwrap();
        fs::write(repo.backup_dir(&id).join("stream-00.bsz"), b"x").unwrap();
        assert!(repo.backup_ids().unwrap().is_empty(), "no manifest, no backup");
        // Not ours: an operator's directory, a backup-named directory with other files, a symbolic link.
        fs::create_dir_all(repo.backups_dir().join("lost+found")).unwrap();
        fs::create_dir_all(repo.backup_dir("20200101T000000F")).unwrap();
        fs::write(repo.backup_dir("20200101T000000F").join("notes.txt"), b"keep me").unwrap();
        std::os::unix::fs::symlink("/etc", repo.backup_dir("20200101T000001F")).unwrap();
        let (removed, mut foreign) = repo.remove_incomplete(&lock).unwrap();
        foreign.sort();
        assert_eq!(removed, vec![id]);
        assert_eq!(foreign, vec!["20200101T000000F", "20200101T000001F", "lost+found"]);
        assert!(repo.backup_dir("20200101T000000F").join("notes.txt").exists());
        drop(lock);
        // A clean release leaves no holder behind; a holder left in the file is a dead process's.
        assert!(repo.lock().unwrap().taken_over.is_none());
        fs::write(root.join("lock"), b"pid 999999 since 2026-01-01T00:00:00Z").unwrap();
        assert_eq!(repo.lock().unwrap().taken_over.as_deref(), Some("pid 999999 since 2026-01-01T00:00:00Z"));
        use std::os::unix::fs::MetadataExt;
        assert_eq!(fs::metadata(&root).unwrap().mode() & 0o777, 0o750);
        assert_eq!(fs::metadata(root.join(REPO_FILE)).unwrap().mode() & 0o777, 0o640);
        assert_eq!(fs::metadata(root.join("lock")).unwrap().mode() & 0o777, 0o640);
        let err = Repo::open_or_create(&root, 43, 150018).err().unwrap().to_string();
        assert!(err.contains("system identifier 42, not to this one (43)"), "{err}");
        let err = repo.resolve("latest").unwrap_err().to_string();
        assert!(err.contains("holds no backup yet"), "{err}");
        fs::remove_dir_all(&root).unwrap();
    }
}
