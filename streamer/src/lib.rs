//! blockstream: the backup engine of pg_blocktrack.
//!
//! The pipeline, one module per stage or on-disk format:
//!
//! - [`pgdata`] lists what a data directory holds and what a backup must skip;
//! - [`guard`] maps live data files for reading and survives concurrent truncation;
//! - [`plan`] decides what an incremental backup copies of each file;
//! - [`copy`] spreads the pieces of those files over N parallel streams
//!   (read → hash → compress → write, one thread per stream);
//! - [`stream`] owns the bytes of a stream file and of the chunks inside it;
//! - [`manifest`] owns `manifest.json`, the only proof that a backup exists;
//! - [`repo`] owns the repository layout, its identity object and its lock;
//!   [`storage`] is the seam every repository byte goes through (the
//!   [`storage::Store`] trait; a directory, or memory for tests), and
//!   [`safe_fs`] is how a directory's files are opened and written (no
//!   symbolic link followed, nothing but regular files read, modes 0640/0750);
//! - [`pg_control`] decodes PostgreSQL's control file;
//! - [`privs`] keeps restore from writing as root;
//! - [`backup`] and [`restore`] are the two commands built on top, [`chain`]
//!   resolves which backup of a chain each restored block comes from;
//! - [`verify`] checks stored chunks against their digests, [`checksum`]
//!   computes PostgreSQL's page checksums;
//! - [`blkref`] owns the changed-block summaries pg_blocktrack writes.
//!
//! The engine never talks to PostgreSQL itself: [`backup::BackupSession`] is
//! implemented by the command line (over libpq), by the extension's
//! `run_backup` (over SPI in its background worker) and, for tests, by
//! [`testing::FakeSession`].

pub mod archive;
pub mod backup;
pub mod backup_label;
pub mod blkref;
pub mod catalog;
pub mod chain;
pub mod checksum;
pub mod codec;
pub mod copy;
pub mod error;
pub mod expire;
pub mod failpoint;
pub mod guard;
pub mod hash;
pub mod lsn;
pub mod manifest;
pub mod metrics;
pub mod pg_control;
pub mod pgdata;
pub mod plan;
pub mod privs;
pub mod progress;
pub mod repo;
pub mod report;
pub mod restore;
pub mod safe_fs;
pub mod storage;
pub mod stream;
#[doc(hidden)]
pub mod testing;
pub mod timefmt;
pub mod verify;

pub use error::{Error, Result};
