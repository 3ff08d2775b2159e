//! On-disk formats: the only code that reads or writes their bytes, each
//! bounding every length it decodes before it sizes an allocation or a loop.
//!
//! - [`manifest`]: `manifest.json`, the only proof that a backup exists;
//! - [`stream`]: stream files and the chunks inside them;
//! - [`blkref`]: the changed-block summaries pg_blocktrack writes, and its state file;
//! - [`backup_label`], [`pg_control`]: PostgreSQL's own files a backup reads;
//! - [`lsn`]: LSNs and WAL file names;
//! - [`timeline`]: timeline history files, and what a history holds;
//! - [`wal`]: WAL records of a stopped server, for the blocks they change;
//! - [`pg_database`]: database names and OIDs, from a backup's copy of the catalog.

pub mod backup_label;
pub mod blkref;
pub mod lsn;
pub mod manifest;
pub mod pg_control;
pub mod pg_database;
pub mod stream;
pub mod timeline;
pub mod wal;

/// Little-endian integers at `at` of bytes whose length the caller has
/// already checked (an index past the end panics, as slicing does).
pub(crate) fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
