//! A repository in memory: the engine's tests run backup, restore and verify
//! against it in seconds, with no disk, no root and no server. It keeps the
//! contract of [`Store`] (atomic puts, `put_new` never replaces, a created
//! object is visible only once finished, one lock holder), so a test that
//! passes here exercises the engine, not a driver's accident.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use super::{check_key, Entry, Kind, ObjectReader, ObjectWriter, RootState, Store, StoreLock};
use crate::error::{Error, Result};

#[derive(Debug, Default)]
struct Inner {
    created: bool,
    objects: BTreeMap<String, (Arc<Vec<u8>>, SystemTime)>,
    locked: bool,
}

/// A repository held in memory; clones share it.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    name: String,
    inner: Arc<Mutex<Inner>>,
}

impl MemoryStore {
    pub fn new(name: &str) -> MemoryStore {
        MemoryStore { name: name.to_string(), inner: Arc::default() }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn not_found(&self, key: &str) -> Error {
        Error::Io {
            op: "open",
            path: PathBuf::from(self.describe(key)),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        }
    }

    /// The bytes of an object, for tests that damage one with
    /// [`MemoryStore::replace`].
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.inner().objects.get(key).map(|(b, _)| b.to_vec())
    }

    /// Replaces an object's bytes as a fault would, with no check.
    pub fn replace(&self, key: &str, bytes: Vec<u8>) {
        self.inner().objects.insert(key.to_string(), (Arc::new(bytes), SystemTime::now()));
    }

    /// Every key, sorted.
    pub fn keys(&self) -> Vec<String> {
        self.inner().objects.keys().cloned().collect()
    }
}

struct MemoryReader(Arc<Vec<u8>>);

impl ObjectReader for MemoryReader {
    fn len(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.0.get(start..end))
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

struct MemoryWriter {
    store: MemoryStore,
    key: String,
    bytes: Vec<u8>,
}

impl ObjectWriter for MemoryWriter {
    fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        self.bytes.extend_from_slice(bytes);
        Ok(())
    }
    fn finish(self: Box<Self>) -> Result<()> {
        let MemoryWriter { store, key, bytes } = *self;
        let mut inner = store.inner();
        if inner.objects.contains_key(&key) {
            return Err(Error::Conflict(format!("\"{}\" exists", store.describe(&key))));
        }
        inner.objects.insert(key, (Arc::new(bytes), SystemTime::now()));
        Ok(())
    }
}

#[derive(Debug)]
struct MemoryLock(MemoryStore);

impl StoreLock for MemoryLock {
    fn taken_over(&self) -> Option<&str> {
        None
    }
}

impl Drop for MemoryLock {
    fn drop(&mut self) {
        self.0.inner().locked = false;
    }
}

impl Store for MemoryStore {
    fn location(&self) -> String {
        format!("memory://{}", self.name)
    }

    fn root_state(&self) -> Result<RootState> {
        let inner = self.inner();
        Ok(match (inner.created, inner.objects.is_empty()) {
            (false, _) => RootState::Missing,
            (true, true) => RootState::Empty,
            (true, false) => RootState::Holds,
        })
    }

    fn init(&self) -> Result<()> {
        self.inner().created = true;
        Ok(())
    }

    fn read(&self, key: &str, max: u64) -> Result<Vec<u8>> {
        check_key(key)?;
        let bytes = self.inner().objects.get(key).map(|(b, _)| Arc::clone(b)).ok_or_else(|| self.not_found(key))?;
        if bytes.len() as u64 > max {
            return Err(Error::Corrupt(format!(
                "\"{}\" is {} bytes, more than the {max} allowed",
                self.describe(key),
                bytes.len()
            )));
        }
        Ok(bytes.to_vec())
    }

    fn open(&self, key: &str) -> Result<Box<dyn ObjectReader>> {
        check_key(key)?;
        let bytes = self.inner().objects.get(key).map(|(b, _)| Arc::clone(b)).ok_or_else(|| self.not_found(key))?;
        Ok(Box::new(MemoryReader(bytes)))
    }

    fn put(&self, key: &str, bytes: &[u8]) -> Result<()> {
        check_key(key)?;
        crate::failpoint::hit_named("durable-write", key.rsplit('/').next().unwrap_or(key));
        self.inner().objects.insert(key.to_string(), (Arc::new(bytes.to_vec()), SystemTime::now()));
        Ok(())
    }

    fn put_new(&self, key: &str, bytes: &[u8]) -> Result<bool> {
        check_key(key)?;
        let mut inner = self.inner();
        if inner.objects.contains_key(key) {
            return Ok(false);
        }
        inner.objects.insert(key.to_string(), (Arc::new(bytes.to_vec()), SystemTime::now()));
        Ok(true)
    }

    fn create(&self, key: &str) -> Result<Box<dyn ObjectWriter>> {
        check_key(key)?;
        if self.inner().objects.contains_key(key) {
            return Err(Error::Conflict(format!("\"{}\" exists", self.describe(key))));
        }
        Ok(Box::new(MemoryWriter { store: self.clone(), key: key.to_string(), bytes: Vec::new() }))
    }

    fn append(&self, key: &str, record: &[u8]) -> Result<()> {
        check_key(key)?;
        let mut inner = self.inner();
        let entry = inner.objects.entry(key.to_string()).or_insert_with(|| (Arc::new(Vec::new()), SystemTime::now()));
        Arc::make_mut(&mut entry.0).extend_from_slice(record);
        entry.1 = SystemTime::now();
        Ok(())
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>> {
        if !prefix.is_empty() {
            check_key(prefix)?;
        }
        let start = if prefix.is_empty() { String::new() } else { format!("{prefix}/") };
        let inner = self.inner();
        let mut out: BTreeMap<String, Entry> = BTreeMap::new();
        for (k, (bytes, modified)) in inner.objects.range(start.clone()..) {
            let Some(rest) = k.strip_prefix(&start) else { break };
            let entry = match rest.split_once('/') {
                Some((dir, _)) => Entry { name: dir.to_string(), kind: Kind::Prefix, size: 0, modified: None },
                None => Entry {
                    name: rest.to_string(),
                    kind: Kind::Object,
                    size: bytes.len() as u64,
                    modified: Some(*modified),
                },
            };
            out.entry(entry.name.clone()).or_insert(entry);
        }
        Ok(out.into_values().collect())
    }

    fn remove(&self, key: &str) -> Result<()> {
        check_key(key)?;
        self.inner().objects.remove(key);
        Ok(())
    }

    fn remove_prefix(&self, prefix: &str) -> Result<()> {
        check_key(prefix)?;
        let start = format!("{prefix}/");
        self.inner().objects.retain(|k, _| !k.starts_with(&start));
        Ok(())
    }

    fn lock(&self) -> Result<Box<dyn StoreLock>> {
        let mut inner = self.inner();
        if inner.locked {
            return Err(Error::Conflict(format!(
                "repository \"{}\" is locked by another blockstream process",
                self.location()
            )));
        }
        inner.locked = true;
        Ok(Box::new(MemoryLock(self.clone())))
    }

    fn total_bytes(&self) -> u64 {
        self.inner().objects.values().map(|(b, _)| b.len() as u64).sum()
    }
}
