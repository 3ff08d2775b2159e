//! The repository: layout, identity object (`repo.json`), the writer lock,
//! and the backups it lists. Every byte goes through a [`Store`]
//! ([`crate::storage`]): a directory, or memory in tests.
//!
//! ```text
//! REPO/
//!   repo.json              format, version, system identifier, PostgreSQL version
//!   keys.json              in an encrypted repository: the wrapped key (see crate::crypt)
//!   lock                   the writer lock (flock(2)-ed in a directory)
//!   backups/<id>/          manifest.json (last), stream-NN.bsz, backup_label, tablespace_map
//!   archive/<timeline>/    archived WAL (see crate::archive)
//!   verify.jsonl, drills.jsonl   logs (see crate::catalog)
//! ```
//!
//! The manifest is the commit point: a prefix under `backups/` without
//! `manifest.json` is a backup that never finished; it is invisible to
//! every reader and removed by the next writer (only when its name is a
//! backup id and it holds nothing but the objects a backup writes).
//!
//! In a directory everything is created with mode 0750 (directories) or
//! 0640 (files), whatever the umask: a repository holds the whole database.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::crypt::{KeySource, Keyring, KEYS_FILE};
use crate::error::{Error, Result};
use crate::manifest::{limits, BackupType, Manifest, MANIFEST_FILE};
use crate::storage::{Entry, Kind, RootState, SharedStore, Store, StoreLock};
use crate::timefmt;

pub const REPO_FILE: &str = "repo.json";
pub const REPO_FORMAT: &str = "blockstream-repository";
pub const REPO_VERSION: u32 = 1;
pub const BACKUPS_DIR: &str = "backups";

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
    store: SharedStore,
    pub info: RepoInfo,
    /// `keys.json`, when the repository is encrypted.
    keys_json: Option<Vec<u8>>,
    /// The repository key, once [`Repo::unlock`]ed.
    keys: Option<Keyring>,
    /// Read plain manifests in an encrypted repository.
    allow_plain: bool,
}

/// Purpose (HKDF info) of the manifests' key.
const MANIFEST_PURPOSE: &str = "blockstream manifests";

/// Held while a process writes to the repository; released on drop (or death).
#[derive(Debug)]
pub struct RepoLock {
    _held: Box<dyn StoreLock>,
    /// The holder recorded by a process that died holding the lock.
    pub taken_over: Option<String>,
}

impl Repo {
    /// Opens an existing repository in a directory.
    pub fn open(root: &Path) -> Result<Repo> {
        Repo::open_store(crate::storage::at(root)?)
    }

    /// Opens an existing repository in any store.
    pub fn open_store(store: SharedStore) -> Result<Repo> {
        let bytes = match store.read(REPO_FILE, 1 << 20) {
            Ok(b) => b,
            Err(e) if e.is_not_found() => {
                return Err(if store.root_state().unwrap_or(RootState::Holds) == RootState::Missing {
                    Error::Usage(format!("repository \"{}\" does not exist", store.location()))
                } else {
                    Error::Usage(format!(
                        "\"{}\" is not a blockstream repository: {REPO_FILE} is missing",
                        store.location()
                    ))
                });
            }
            Err(e) => return Err(e),
        };
        let info: RepoInfo = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Corrupt(format!("\"{}\" does not parse: {e}", store.describe(REPO_FILE))))?;
        if info.format != REPO_FORMAT || info.version != REPO_VERSION {
            return Err(Error::Corrupt(format!(
                "\"{}\" has format \"{}\" version {}, expected \"{REPO_FORMAT}\" version {REPO_VERSION}",
                store.describe(REPO_FILE),
                info.format,
                info.version
            )));
        }
        let keys_json = match store.read(KEYS_FILE, 1 << 16) {
            Ok(b) => Some(b),
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(e),
        };
        Ok(Repo { store, info, keys_json, keys: None, allow_plain: false })
    }

    /// Whether the repository is encrypted (holds `keys.json`).
    pub fn is_encrypted(&self) -> bool {
        self.keys_json.is_some()
    }

    /// Whether plain objects are accepted in an encrypted repository.
    pub fn allows_plain(&self) -> bool {
        self.allow_plain
    }

    /// The repository key, when unlocked.
    pub fn keyring(&self) -> Option<&Keyring> {
        self.keys.as_ref()
    }

    /// Opens the repository key with `src`. An encrypted repository needs
    /// it; a key given for a plain repository is refused unless
    /// `allow_plain` (its backups are readable by whoever reads it).
    pub fn unlock(&mut self, src: Option<&KeySource>, allow_plain: bool) -> Result<()> {
        self.allow_plain = allow_plain;
        if self.keys.is_some() {
            return Ok(());
        }
        match (&self.keys_json, src) {
            (Some(json), Some(src)) => self.keys = Some(Keyring::open(json, src, &self.location())?),
            (Some(_), None) => {
                return Err(Error::Usage(format!(
                    "repository \"{}\" is encrypted: give its passphrase (BLOCKSTREAM_PASSPHRASE or --passphrase-file) or its --key-file",
                    self.location()
                )))
            }
            (None, Some(_)) if !allow_plain => {
                return Err(Error::Usage(format!(
                    "repository \"{}\" is not encrypted, and a key was given: refused (--allow-plain to use it unencrypted)",
                    self.location()
                )))
            }
            _ => {}
        }
        Ok(())
    }

    /// Makes a repository that holds no backup yet encrypted: creates the
    /// repository key, wraps it under `src` and stores `keys.json`. One
    /// that holds plain backups is refused unless `allow_plain` (it would
    /// mix them with encrypted ones). Needs the lock.
    pub fn enable_encryption(&mut self, src: &KeySource, allow_plain: bool, _lock: &RepoLock) -> Result<()> {
        if self.is_encrypted() {
            return Ok(());
        }
        if !self.backup_ids()?.is_empty() && !allow_plain {
            return Err(Error::Usage(format!(
                "repository \"{}\" holds unencrypted backups: an encrypted backup would mix with them (--allow-plain to do it anyway)",
                self.location()
            )));
        }
        let (ring, json) = Keyring::create(src)?;
        if !self.store.put_new(KEYS_FILE, &json)? {
            return Err(Error::Conflict(format!("\"{}\" appeared while it was created", self.describe(KEYS_FILE))));
        }
        self.keys_json = Some(json);
        self.keys = Some(ring);
        self.allow_plain = allow_plain;
        Ok(())
    }

    /// Rewraps the repository key under `new` (the data stays as it is).
    /// Needs the repository unlocked and the lock.
    pub fn rotate_key(&mut self, new: &KeySource, _lock: &RepoLock) -> Result<()> {
        let ring = self.keys.as_ref().ok_or_else(|| {
            Error::Usage(format!("repository \"{}\" is not unlocked: no key to rotate", self.location()))
        })?;
        let json = ring.wrap(new)?;
        self.store.put(KEYS_FILE, &json)?;
        self.keys_json = Some(json);
        Ok(())
    }

    /// Opens the repository in a directory, creating it for this cluster if
    /// the directory is absent or empty. Refuses a repository of another cluster.
    pub fn open_or_create(root: &Path, system_identifier: u64, pg_version_num: u32) -> Result<Repo> {
        Repo::open_or_create_store(crate::storage::at(root)?, system_identifier, pg_version_num)
    }

    /// [`Repo::open_or_create`] in any store.
    pub fn open_or_create_store(store: SharedStore, system_identifier: u64, pg_version_num: u32) -> Result<Repo> {
        if store.root_state()? != RootState::Holds {
            store.init()?;
            let info = RepoInfo {
                format: REPO_FORMAT.into(),
                version: REPO_VERSION,
                system_identifier,
                pg_version_num,
                created: timefmt::iso8601(SystemTime::now()),
            };
            let bytes = serde_json::to_vec_pretty(&info).expect("repository info serializes");
            store.put(REPO_FILE, &bytes)?;
        }
        let repo = Repo::open_store(store)?;
        if repo.info.system_identifier != system_identifier {
            return Err(Error::Conflict(format!(
                "repository \"{}\" belongs to the cluster with system identifier {}, not to this one ({system_identifier})",
                repo.location(),
                repo.info.system_identifier
            )));
        }
        if repo.info.pg_version_num / 10000 != pg_version_num / 10000 {
            return Err(Error::Conflict(format!(
                "repository \"{}\" holds backups of PostgreSQL {}, the server runs {}",
                repo.location(),
                repo.info.pg_version_num / 10000,
                pg_version_num / 10000
            )));
        }
        Ok(repo)
    }

    /// Where the repository's objects live.
    pub fn store(&self) -> &dyn Store {
        &*self.store
    }

    /// The same store, to share with threads.
    pub fn shared_store(&self) -> SharedStore {
        Arc::clone(&self.store)
    }

    /// How messages name the repository (its directory, or its URL).
    pub fn location(&self) -> String {
        self.store.location()
    }

    /// The repository's directory, when it is one.
    pub fn local_root(&self) -> Option<&Path> {
        self.store.local_root()
    }

    /// How messages name an object of the repository.
    pub fn describe(&self, key: &str) -> String {
        self.store.describe(key)
    }

    /// The key prefix of backup `id`.
    pub fn backup_key(id: &str) -> String {
        format!("{BACKUPS_DIR}/{id}")
    }

    /// Takes the writer lock, or says who holds it (see the store's driver
    /// for what the lock is and guarantees).
    pub fn lock(&self) -> Result<RepoLock> {
        let held = self.store.lock()?;
        let taken_over = held.taken_over().map(str::to_string);
        Ok(RepoLock { _held: held, taken_over })
    }

    /// Ids of complete backups (those with a manifest), oldest first.
    pub fn backup_ids(&self) -> Result<Vec<String>> {
        let mut ids = Vec::new();
        for e in self.store.list(BACKUPS_DIR)? {
            // A backup is a real prefix (never a symbolic link) holding a
            // manifest; one that is not a regular file is listed, and refused
            // with its reason when read.
            if is_backup_id(&e.name) && e.kind == Kind::Prefix && self.has_manifest(&e.name)? {
                ids.push(e.name);
            }
        }
        ids.sort();
        Ok(ids)
    }

    fn has_manifest(&self, id: &str) -> Result<bool> {
        Ok(self.store.list(&Repo::backup_key(id))?.iter().any(|e| e.name == MANIFEST_FILE && e.kind != Kind::Prefix))
    }

    /// Resolves `latest` or an id to an existing backup.
    pub fn resolve(&self, which: &str) -> Result<String> {
        let ids = self.backup_ids()?;
        if which == "latest" {
            return ids
                .last()
                .cloned()
                .ok_or_else(|| Error::Usage(format!("repository \"{}\" holds no backup yet", self.location())));
        }
        if ids.iter().any(|i| i == which) {
            Ok(which.to_string())
        } else {
            Err(Error::Usage(format!(
                "backup \"{which}\" is not in repository \"{}\"{}",
                self.location(),
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
        let key = format!("{}/{MANIFEST_FILE}", Repo::backup_key(id));
        let mut bytes = self.store.read(&key, limits::MANIFEST_BYTES)?;
        let what = self.describe(&key);
        if crate::crypt::is_sealed(&bytes) {
            let keys = self.keys.as_ref().ok_or_else(|| {
                Error::Usage(format!(
                    "\"{what}\" is encrypted and no key was given (or the repository lost its keys.json)"
                ))
            })?;
            bytes = keys.open_object(MANIFEST_PURPOSE, id, &bytes, &what)?;
        } else if self.is_encrypted() && !self.allow_plain {
            return Err(Error::Corrupt(format!(
                "\"{what}\" is not encrypted, in an encrypted repository: refused (--allow-plain to read it)"
            )));
        }
        let m = Manifest::from_bytes(&bytes, Path::new(&what))?;
        if m.backup_id != id {
            return Err(Error::Corrupt(format!(
                "manifest in \"{}\" describes backup {}, not {id}",
                self.describe(&Repo::backup_key(id)),
                m.backup_id
            )));
        }
        Ok(m)
    }

    /// Stores a backup's manifest, the commit point of the backup: atomically
    /// and durably, after everything it lists.
    pub fn store_manifest(&self, m: &Manifest) -> Result<()> {
        let mut bytes = m.to_bytes();
        if let Some(keys) = &self.keys {
            bytes = keys.seal_object(MANIFEST_PURPOSE, &m.backup_id, &bytes);
        }
        self.store.put(&format!("{}/{MANIFEST_FILE}", Repo::backup_key(&m.backup_id)), &bytes)
    }

    /// Removes backup prefixes that never got a manifest: those named like a
    /// backup id that hold nothing but what a backup writes. Anything else
    /// under `backups/` is left alone and named in the second list. Needs the
    /// lock.
    pub fn remove_incomplete(&self, lock: &RepoLock) -> Result<(Vec<String>, Vec<String>)> {
        // Uploads a killed writer left (object stores) hold parts that cost
        // space and are listed nowhere else; the lock says their writer is gone.
        self.abort_incomplete_uploads(lock)?;
        let (mut removed, mut foreign) = (Vec::new(), Vec::new());
        for e in self.store.list(BACKUPS_DIR)? {
            let real_dir = e.kind == Kind::Prefix;
            if real_dir && is_backup_id(&e.name) && self.has_manifest(&e.name)? {
                continue;
            }
            let key = Repo::backup_key(&e.name);
            if real_dir && is_backup_id(&e.name) && holds_only_backup_files(&self.store.list(&key)?) {
                self.store.remove_prefix(&key)?;
                removed.push(e.name);
            } else {
                foreign.push(e.name);
            }
        }
        Ok((removed, foreign))
    }

    /// Aborts the multipart uploads writers that died left in an object
    /// store (none in a directory); returns them. Needs the lock: a live
    /// writer holds it while it uploads.
    pub fn abort_incomplete_uploads(&self, _lock: &RepoLock) -> Result<Vec<crate::storage::Upload>> {
        let uploads = self.store.incomplete_uploads()?;
        for u in &uploads {
            self.store.abort_upload(u)?;
        }
        Ok(uploads)
    }

    /// Removes one backup that never got a manifest (a backup that failed
    /// just now). Needs the lock.
    pub fn remove_failed(&self, id: &str, _lock: &RepoLock) {
        let key = Repo::backup_key(id);
        if is_backup_id(id) && !self.has_manifest(id).unwrap_or(true) {
            if let Ok(entries) = self.store.list(&key) {
                if holds_only_backup_files(&entries) {
                    let _ = self.store.remove_prefix(&key);
                }
            }
        }
    }

    /// A fresh id later than every backup in the repository: the current
    /// UTC second, or one second past the latest id when that is not later.
    /// Needs the lock.
    pub fn new_backup_id(&self, kind: BackupType, _lock: &RepoLock) -> Result<String> {
        let now = SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let after = self.backup_ids()?.last().and_then(|l| timefmt::parse_compact(l)).map_or(0, |t| t + 1);
        let taken: Vec<String> = self.store.list(BACKUPS_DIR)?.into_iter().map(|e| e.name).collect();
        let mut t = now.max(after);
        loop {
            let id = format!("{}{}", timefmt::compact(std::time::UNIX_EPOCH + Duration::from_secs(t)), kind.letter());
            // A prefix left by a failed backup of that second is skipped, not reused.
            if !taken.contains(&id) {
                return Ok(id);
            }
            t += 1;
        }
    }
}

/// Whether a backup prefix holds only objects a backup writes (streams,
/// its label files, a manifest being written), nothing else.
fn holds_only_backup_files(entries: &[Entry]) -> bool {
    entries.iter().all(|e| {
        let ours = crate::stream::is_stream_file_name(&e.name)
            || matches!(e.name.as_str(), "backup_label" | "tablespace_map" | "manifest.json.tmp");
        ours && e.kind == Kind::Object
    })
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
    use std::fs;

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
        let dir = |id: &str| root.join("backups").join(id);
        fs::create_dir_all(dir(&id)).unwrap();
        fs::write(dir(&id).join("stream-00.bsz"), b"x").unwrap();
        assert!(repo.backup_ids().unwrap().is_empty(), "no manifest, no backup");
        // Not ours: an operator's directory, a backup-named directory with other files, a symbolic link.
        fs::create_dir_all(root.join("backups/lost+found")).unwrap();
        fs::create_dir_all(dir("20200101T000000F")).unwrap();
        fs::write(dir("20200101T000000F").join("notes.txt"), b"keep me").unwrap();
        std::os::unix::fs::symlink("/etc", dir("20200101T000001F")).unwrap();
        let (removed, mut foreign) = repo.remove_incomplete(&lock).unwrap();
        foreign.sort();
        assert_eq!(removed, vec![id]);
        assert_eq!(foreign, vec!["20200101T000000F", "20200101T000001F", "lost+found"]);
        assert!(dir("20200101T000000F").join("notes.txt").exists());
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
