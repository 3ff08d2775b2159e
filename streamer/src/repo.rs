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
//! finished; it is invisible to every reader and removed by the next writer.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::manifest::{fsync_dir, BackupType, Manifest, MANIFEST_FILE};
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
    _file: File,
}

impl Repo {
    /// Opens an existing repository.
    pub fn open(root: &Path) -> Result<Repo> {
        let file = root.join(REPO_FILE);
        let bytes = match fs::read(&file) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(if root.exists() {
                    Error::Usage(format!(
                        "\"{}\" is not a blockstream repository: {REPO_FILE} is missing",
                        root.display()
                    ))
                } else {
                    Error::Usage(format!("repository \"{}\" does not exist", root.display()))
                });
            }
            Err(e) => return Err(Error::Io { op: "read", path: file, source: e }),
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
            fs::create_dir_all(root.join("backups")).map_err(Error::io("create repository", root))?;
            let info = RepoInfo {
                format: REPO_FORMAT.into(),
                version: REPO_VERSION,
                system_identifier,
                pg_version_num,
                created: timefmt::iso8601(SystemTime::now()),
            };
            let file = root.join(REPO_FILE);
            let tmp = root.join(format!("{REPO_FILE}.tmp"));
            let mut f = File::create(&tmp).map_err(Error::io("create", &tmp))?;
            f.write_all(&serde_json::to_vec_pretty(&info).unwrap()).map_err(Error::io("write", &tmp))?;
            f.sync_all().map_err(Error::io("fsync", &tmp))?;
            fs::rename(&tmp, &file).map_err(Error::io("rename into place", &file))?;
            fsync_dir(root)?;
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

    /// Takes the writer lock, or says who holds it.
    pub fn lock(&self) -> Result<RepoLock> {
        let path = self.root.join("lock");
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(Error::io("open lock file", &path))?;
        // SAFETY: flock on a file descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let holder = fs::read_to_string(&path).unwrap_or_default();
            let holder = holder.trim();
            return Err(Error::Conflict(format!(
                "repository \"{}\" is locked by another blockstream process{}",
                self.root.display(),
                if holder.is_empty() { String::new() } else { format!(" ({holder})") }
            )));
        }
        file.set_len(0).map_err(Error::io("write", &path))?;
        let _ = write!(file, "pid {}", std::process::id());
        Ok(RepoLock { _file: file })
    }

    /// Ids of complete backups (those with a manifest), oldest first.
    pub fn backup_ids(&self) -> Result<Vec<String>> {
        let dir = self.backups_dir();
        let mut ids = Vec::new();
        for e in fs::read_dir(&dir).map_err(Error::io("read directory", &dir))? {
            let e = e.map_err(Error::io("read directory", &dir))?;
            let id = e.file_name().to_string_lossy().into_owned();
            if is_backup_id(&id) && e.path().join(MANIFEST_FILE).is_file() {
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

    pub fn load_manifest(&self, id: &str) -> Result<Manifest> {
        let m = Manifest::load(&self.backup_dir(id))?;
        if m.backup_id != id {
            return Err(Error::Corrupt(format!(
                "manifest in \"{}\" describes backup {}, not {id}",
                self.backup_dir(id).display(),
                m.backup_id
            )));
        }
        Ok(m)
    }

    /// Removes backup directories that never got a manifest. Needs the lock.
    pub fn remove_incomplete(&self, _lock: &RepoLock) -> Result<Vec<String>> {
        let dir = self.backups_dir();
        let mut removed = Vec::new();
        for e in fs::read_dir(&dir).map_err(Error::io("read directory", &dir))? {
            let e = e.map_err(Error::io("read directory", &dir))?;
            let p = e.path();
            if p.is_dir() && !p.join(MANIFEST_FILE).is_file() {
                fs::remove_dir_all(&p).map_err(Error::io("remove incomplete backup", &p))?;
                removed.push(e.file_name().to_string_lossy().into_owned());
            }
        }
        Ok(removed)
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
        assert!(repo.backup_ids().unwrap().is_empty(), "no manifest, no backup");
        assert_eq!(repo.remove_incomplete(&lock).unwrap(), vec![id]);
        drop(lock);
        let err = Repo::open_or_create(&root, 43, 150018).err().unwrap().to_string();
        assert!(err.contains("system identifier 42, not to this one (43)"), "{err}");
        let err = repo.resolve("latest").unwrap_err().to_string();
        assert!(err.contains("holds no backup yet"), "{err}");
        fs::remove_dir_all(&root).unwrap();
    }
}
