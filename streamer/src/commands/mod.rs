//! What the command line and the SQL functions run, built on the formats,
//! the pipeline and the storage seam.
//!
//! - [`backup`], [`restore`], [`verify`], [`expire`]: the backup life cycle;
//! - [`merge`]: a full backup made from a chain, without the server;
//! - [`archive`]: the WAL archive (push, fetch, listing, gaps);
//! - [`catalog`], [`metrics`], [`report`]: what a repository says of itself.

pub mod archive;
pub mod backup;
pub mod catalog;
pub mod expire;
pub mod merge;
pub mod metrics;
pub mod report;
pub mod restore;
pub mod unchanged;
pub mod verify;
