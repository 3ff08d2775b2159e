//! Where a repository's objects live: one trait, [`Store`], owns every
//! repository operation, and drivers implement it.
//!
//! - [`posix::PosixStore`]: a directory on a local or mounted file system
//!   (modes 0750/0640 whatever the umask, no symbolic link followed, every
//!   write durable: temporary file, fsync, rename or link, directory fsync).
//! - [`s3::S3Store`]: a key prefix of an S3-compatible bucket
//!   (`s3://bucket/prefix`).
//! - [`memory::MemoryStore`]: a map in memory, for engine tests that need no
//!   disk, no root and no server.
//!
//! Keys are relative, `/`-separated, plain names (`backups/<id>/manifest.json`):
//! no empty component, no `.` or `..`, no NUL; [`check_key`] refuses the
//! rest before a driver sees them. "Directories" are key prefixes.
//!
//! The data-directory side (memory-mapped reads of a live cluster, fallocate
//! and mapped writes on restore) stays on the file system on purpose: only
//! the repository goes through this seam.

pub mod memory;
pub mod posix;
pub mod repo;
pub mod s3;

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use crate::error::{Error, Result};

/// What a name under a prefix is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// An object (a regular file).
    Object,
    /// A prefix holding objects (a directory).
    Prefix,
    /// Anything else a file system can hold (a symbolic link, a FIFO, ...):
    /// never read, named in messages.
    Other,
}

/// One name directly under a prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub kind: Kind,
    /// Bytes of an object (0 for the rest).
    pub size: u64,
    pub modified: Option<SystemTime>,
}

/// Whether the repository's root holds anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RootState {
    Missing,
    Empty,
    Holds,
}

/// Positional reads of one object, shared by reading threads.
pub trait ObjectReader: Send + Sync {
    /// The object's size when it was opened.
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fills `buf` from `offset`; an object shorter than that is an error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

/// A new object written front to back. It exists under its key only after
/// [`ObjectWriter::finish`]; dropped before, it leaves nothing a reader
/// would take for complete.
pub trait ObjectWriter: Send {
    fn write_all(&mut self, bytes: &[u8]) -> Result<()>;
    /// Makes the object durable and visible.
    fn finish(self: Box<Self>) -> Result<()>;
}

/// Held while one process writes to the repository; released on drop, and
/// by the store when its holder dies.
pub trait StoreLock: Send + Sync + fmt::Debug {
    /// The holder a process that died holding the lock left behind.
    fn taken_over(&self) -> Option<&str>;
}

/// A multipart upload that was started and neither completed nor aborted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upload {
    pub key: String,
    pub id: String,
    /// When it started, as the store reports it.
    pub initiated: String,
}

/// Every operation on a repository.
pub trait Store: Send + Sync + fmt::Debug {
    /// How messages name the repository: a path or a URL.
    fn location(&self) -> String;
    /// How messages name one object.
    fn describe(&self, key: &str) -> String {
        format!("{}/{key}", self.location().trim_end_matches('/'))
    }
    /// The directory holding the repository, for a driver that has one
    /// (ownership and mode checks, `wal-receive`'s partial segment).
    fn local_root(&self) -> Option<&Path> {
        None
    }
    fn root_state(&self) -> Result<RootState>;
    /// Creates an empty repository root.
    fn init(&self) -> Result<()>;
    /// The whole object, refused when larger than `max` bytes (checked
    /// before anything is allocated). Not found is [`Error::is_not_found`].
    fn read(&self, key: &str, max: u64) -> Result<Vec<u8>>;
    /// An object for positional reads.
    fn open(&self, key: &str) -> Result<Box<dyn ObjectReader>>;
    /// Stores `bytes` under `key` atomically (readers see the old object or
    /// the new one) and durably, replacing what was there.
    fn put(&self, key: &str, bytes: &[u8]) -> Result<()>;
    /// Stores `bytes` under `key` atomically and durably unless the key
    /// exists; false (and nothing changed) when it does.
    fn put_new(&self, key: &str, bytes: &[u8]) -> Result<bool>;
    /// A new object, written in parts (see [`ObjectWriter`]). An existing
    /// object under `key` is an error.
    fn create(&self, key: &str) -> Result<Box<dyn ObjectWriter>>;
    /// Appends one record (a line) to a log, durably; concurrent appends
    /// never interleave.
    fn append(&self, key: &str, record: &[u8]) -> Result<()>;
    /// The names directly under `prefix` ("" for the root), sorted; none when
    /// the prefix does not exist.
    fn list(&self, prefix: &str) -> Result<Vec<Entry>>;
    /// Removes an object durably; a missing one is no error.
    fn remove(&self, key: &str) -> Result<()>;
    /// Removes everything under `prefix`, and the prefix.
    fn remove_prefix(&self, prefix: &str) -> Result<()>;
    /// Takes the writer lock, or says who holds it.
    fn lock(&self) -> Result<Box<dyn StoreLock>>;
    /// Bytes the repository holds.
    fn total_bytes(&self) -> u64;
    /// Uploads left behind by writers that died (object stores only).
    fn incomplete_uploads(&self) -> Result<Vec<Upload>> {
        Ok(Vec::new())
    }
    /// Aborts one of [`Store::incomplete_uploads`], freeing its parts.
    fn abort_upload(&self, _upload: &Upload) -> Result<()> {
        Ok(())
    }
}

/// A shared store.
pub type SharedStore = Arc<dyn Store>;

/// Whether a `--repo` argument names an object store rather than a directory.
pub fn is_url(location: &Path) -> bool {
    location.to_str().is_some_and(|s| s.starts_with("s3://"))
}

/// The store behind a `--repo` argument: `s3://bucket/prefix` (configured
/// from the environment, see [`s3`]), or a directory.
pub fn at(location: &Path) -> Result<SharedStore> {
    match location.to_str() {
        Some(url) if is_url(location) => Ok(Arc::new(s3::S3Store::from_url(url)?)),
        _ => Ok(Arc::new(posix::PosixStore::new(location))),
    }
}

/// Refuses a key that is not a plain relative name.
pub fn check_key(key: &str) -> Result<()> {
    let bad = key.is_empty()
        || key.contains('\0')
        || key.split('/').any(|c| c.is_empty() || c == "." || c == "..")
        || key.starts_with('/');
    if bad {
        return Err(Error::Corrupt(format!("\"{key}\" is not a plain relative object name")));
    }
    Ok(())
}

/// `prefix/name`, or `name` at the root.
pub fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{}/{name}", prefix.trim_end_matches('/'))
    }
}

#[doc(hidden)]
pub mod conformance;
