//! The hot path and what it decides: read -> hash -> compress -> write, and
//! its reverse.
//!
//! - [`plan`]: what an incremental backup copies of each file;
//! - [`copy`]: spreads the pieces of those files over N parallel streams;
//! - [`chain`]: which backup of a chain each restored block comes from;
//! - [`codec`]: the chunk filter stack (zstd, then encryption), one
//!   encoder or decoder per thread;
//! - [`crypt`]: AES-256-GCM sealing, the repository key and its wrapping;
//! - [`hash`]: SHA-256 of pieces and the two-level file digest;
//! - [`checksum`]: PostgreSQL's page checksum.

pub mod chain;
pub mod checksum;
pub mod codec;
pub mod copy;
pub mod crypt;
pub mod hash;
pub mod plan;
