//! blockstream: the backup engine of pg_blocktrack.
//!
//! The folders show the architecture:
//!
//! ```text
//! source/     the data directory: what it holds (pgdata), live reads that
//!             survive truncation (guard)
//! pipeline/   read -> hash -> compress -> write and back: plan, copy, chain,
//!             codec, hash, checksum
//! formats/    the bytes on disk: manifest, stream, blkref, backup_label,
//!             pg_control, lsn, timeline
//! storage/    the repository seam: the Store trait, posix and memory
//!             drivers, and repo (layout, identity, lock) on top
//! commands/   backup, restore, verify, expire, archive, catalog, metrics, report
//! ```
//!
//! with [`safe_fs`] (how a directory's files are opened and written: no
//! symbolic link followed, nothing but regular files read, modes
//! 0640/0750), [`privs`] (never writing as root), [`error`], [`progress`],
//! [`failpoint`] and [`timefmt`] beside them. Every module keeps its short
//! path (`blockstream::manifest`).
//!
//! The engine never talks to PostgreSQL itself: [`backup::BackupSession`] is
//! implemented by the command line (over libpq), by the extension's
//! `run_backup` (over SPI in its background worker) and, for tests, by
//! [`testing::FakeSession`].

pub mod commands;
pub mod error;
pub mod failpoint;
pub mod formats;
pub mod pipeline;
pub mod privs;
pub mod progress;
pub mod safe_fs;
pub mod source;
pub mod storage;
#[doc(hidden)]
pub mod testing;
pub mod timefmt;

// Every module keeps its short path (`blockstream::manifest`, `crate::repo`):
// the folders show the architecture, the paths stay what callers know.
pub use commands::{archive, backup, catalog, expire, merge, metrics, report, restore, unchanged, verify};
pub use formats::{backup_label, blkref, lsn, manifest, pg_control, pg_database, stream, timeline, wal};
pub use pipeline::{chain, checksum, codec, copy, crypt, hash, plan};
pub use source::{guard, pgdata};
pub use storage::repo;

pub use error::{Error, Result};
