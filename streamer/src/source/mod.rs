//! The data-directory side: what a live cluster holds and how it is read.
//! It stays on the file system on purpose (memory maps of live files), apart
//! from the repository's [`crate::storage`].
//!
//! - [`pgdata`]: what a data directory holds and what a backup must skip;
//! - [`guard`]: maps live data files for reading and survives concurrent truncation.

pub mod guard;
pub mod pgdata;
