//! The repository in a directory: today's layout, byte for byte.
//!
//! Reads open every component below the root with `O_NOFOLLOW` and refuse
//! anything but a regular file ([`crate::safe_fs`]); directories are created
//! 0750 and files 0640 whatever the umask, and a new directory's entry is
//! made durable in its parent. Writes are durable before they return:
//! `put` is temporary file, fsync, rename, directory fsync; `put_new` links
//! the temporary file into place, which never replaces an existing name;
//! `create` writes the final name and fsyncs it and its directory on
//! `finish`. The lock is `flock(2)` on `REPO/lock`, which the kernel drops
//! when its holder dies; the holder's pid is written into the file and
//! cleared on release, so a pid found there when the lock is free was left
//! by a process that died holding it.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::{check_key, Entry, Kind, ObjectReader, ObjectWriter, RootState, Store, StoreLock};
use crate::error::{Error, Result};
use crate::safe_fs::{self, DIR_MODE, FILE_MODE};
use crate::timefmt;

/// A repository directory.
#[derive(Debug, Clone)]
pub struct PosixStore {
    root: PathBuf,
}

impl PosixStore {
    pub fn new(root: &Path) -> PosixStore {
        PosixStore { root: root.to_path_buf() }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// Creates the directories of `key`'s parent that are missing (0750,
    /// each entry made durable); an existing component that is not a real
    /// directory is refused.
    fn ensure_parent(&self, key: &str) -> Result<PathBuf> {
        let mut dir = self.root.clone();
        let comps: Vec<&str> = key.split('/').collect();
        for c in &comps[..comps.len() - 1] {
            let parent = dir.clone();
            dir.push(c);
            match std::fs::symlink_metadata(&dir) {
                Ok(md) if md.is_dir() => {}
                Ok(_) => {
                    return Err(Error::Conflict(format!("\"{}\" exists and is not a directory", dir.display())));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    safe_fs::create_dir(&dir, DIR_MODE)?;
                    safe_fs::fsync_dir(&parent)?;
                }
                Err(e) => return Err(Error::Io { op: "stat", path: dir, source: e }),
            }
        }
        Ok(dir)
    }
}

struct PosixReader {
    file: File,
    len: u64,
}

impl ObjectReader for PosixReader {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
}

struct PosixWriter {
    file: File,
    path: PathBuf,
    dir: PathBuf,
}

impl ObjectWriter for PosixWriter {
    fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        self.file.write_all(bytes).map_err(Error::io("write", &self.path))
    }
    fn finish(self: Box<Self>) -> Result<()> {
        self.file.sync_all().map_err(Error::io("fsync", &self.path))?;
        safe_fs::fsync_dir(&self.dir)
    }
}

#[derive(Debug)]
struct PosixLock {
    file: File,
    taken_over: Option<String>,
}

impl StoreLock for PosixLock {
    fn taken_over(&self) -> Option<&str> {
        self.taken_over.as_deref()
    }
}

impl Drop for PosixLock {
    fn drop(&mut self) {
        // A clean release leaves the file empty; the kernel drops the flock with the descriptor.
        let _ = self.file.set_len(0);
    }
}

impl Store for PosixStore {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn describe(&self, key: &str) -> String {
        self.path(key).display().to_string()
    }

    fn local_root(&self) -> Option<&Path> {
        Some(&self.root)
    }

    fn root_state(&self) -> Result<RootState> {
        match std::fs::read_dir(&self.root) {
            Ok(mut d) => Ok(if d.next().is_none() { RootState::Empty } else { RootState::Holds }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RootState::Missing),
            Err(e) => Err(Error::Io { op: "read directory", path: self.root.clone(), source: e }),
        }
    }

    fn init(&self) -> Result<()> {
        if let Some(parent) = self.root.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(Error::io("create repository", &self.root))?;
        }
        safe_fs::create_dir(&self.root, DIR_MODE)
    }

    fn read(&self, key: &str, max: u64) -> Result<Vec<u8>> {
        check_key(key)?;
        safe_fs::read_beneath(&self.root, key, max)
    }

    fn open(&self, key: &str) -> Result<Box<dyn ObjectReader>> {
        check_key(key)?;
        let file = safe_fs::open_beneath(&self.root, key)?;
        let len = file.metadata().map_err(Error::io("stat", &self.path(key)))?.len();
        Ok(Box::new(PosixReader { file, len }))
    }

    fn put(&self, key: &str, bytes: &[u8]) -> Result<()> {
        check_key(key)?;
        let dir = self.ensure_parent(key)?;
        let name = key.rsplit('/').next().expect("a checked key has a last component");
        safe_fs::write_durably(&dir, name, bytes, FILE_MODE)
    }

    fn put_new(&self, key: &str, bytes: &[u8]) -> Result<bool> {
        check_key(key)?;
        let dir = self.ensure_parent(key)?;
        let path = self.path(key);
        let name = key.rsplit('/').next().expect("a checked key has a last component");
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let mut f = safe_fs::create_new(&tmp, FILE_MODE)?;
        let written = f.write_all(bytes).and_then(|_| f.sync_all());
        drop(f);
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::Io { op: "write", path: tmp, source: e });
        }
        // link(2) never replaces an existing name: of two writers, one wins.
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                safe_fs::fsync_dir(&dir)?;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(Error::Io { op: "link into place", path, source: e }),
        }
    }

    fn create(&self, key: &str) -> Result<Box<dyn ObjectWriter>> {
        check_key(key)?;
        let dir = self.ensure_parent(key)?;
        let path = self.path(key);
        let file = safe_fs::create_new(&path, FILE_MODE)?;
        Ok(Box::new(PosixWriter { file, path, dir }))
    }

    fn append(&self, key: &str, record: &[u8]) -> Result<()> {
        check_key(key)?;
        self.ensure_parent(key)?;
        let path = self.path(key);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(FILE_MODE)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(Error::io("open log", &path))?;
        if !f.metadata().map_err(Error::io("stat", &path))?.is_file() {
            return Err(Error::Corrupt(format!("log \"{}\" is not a regular file", path.display())));
        }
        // One write(2) with O_APPEND: concurrent appenders never interleave a record.
        f.write_all(record).map_err(Error::io("append to", &path))?;
        f.sync_data().map_err(Error::io("fsync", &path))
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>> {
        let dir = if prefix.is_empty() {
            self.root.clone()
        } else {
            check_key(prefix)?;
            self.path(prefix)
        };
        match std::fs::symlink_metadata(&dir) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => {
                return Err(Error::Corrupt(format!(
                    "\"{}\" is refused: a symbolic link or a non-directory where a directory was expected",
                    dir.display()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::Io { op: "stat", path: dir, source: e }),
        }
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(Error::io("read directory", &dir))? {
            let e = e.map_err(Error::io("read directory", &dir))?;
            let Ok(name) = e.file_name().into_string() else { continue };
            let md = e.metadata().ok();
            let kind = match md.as_ref().map(|m| m.file_type()) {
                Some(t) if t.is_dir() => Kind::Prefix,
                Some(t) if t.is_file() => Kind::Object,
                _ => Kind::Other,
            };
            let size = if kind == Kind::Object { md.as_ref().map_or(0, |m| m.len()) } else { 0 };
            out.push(Entry { name, kind, size, modified: md.and_then(|m| m.modified().ok()) });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn remove(&self, key: &str) -> Result<()> {
        check_key(key)?;
        let path = self.path(key);
        match std::fs::remove_file(&path) {
            Ok(()) => safe_fs::fsync_dir(path.parent().expect("a key has a parent directory")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::Io { op: "remove", path, source: e }),
        }
    }

    fn remove_prefix(&self, prefix: &str) -> Result<()> {
        check_key(prefix)?;
        let path = self.path(prefix);
        // remove_dir_all removes a symbolic link itself, never what it points to.
        match std::fs::remove_dir_all(&path) {
            Ok(()) => safe_fs::fsync_dir(path.parent().expect("a key has a parent directory")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::Io { op: "remove", path, source: e }),
        }
    }

    fn lock(&self) -> Result<Box<dyn StoreLock>> {
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
        Ok(Box::new(PosixLock { file, taken_over }))
    }

    fn total_bytes(&self) -> u64 {
        let mut total = 0;
        let mut stack = vec![self.root.clone()];
        while let Some(p) = stack.pop() {
            let Ok(md) = std::fs::symlink_metadata(&p) else { continue };
            if md.is_dir() {
                stack.extend(std::fs::read_dir(&p).into_iter().flatten().flatten().map(|e| e.path()));
            } else if md.is_file() {
                total += md.len();
            }
        }
        total
    }
}
