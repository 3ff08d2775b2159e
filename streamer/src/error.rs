//! Errors of the engine.
//!
//! Policy: every message is lowercase, has no final period, and names the file,
//! LSN or value involved together with what was expected. Variants say what
//! kind of failure it is, so callers can map them to exit codes or SQLSTATEs:
//! [`Error::Usage`] is bad input from the caller, [`Error::Corrupt`] a damaged
//! repository, [`Error::Conflict`] a state that forbids the operation (lock held,
//! other cluster, non-empty target), [`Error::Server`] a refusal by PostgreSQL.

use std::path::{Path, PathBuf};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("could not {op} \"{}\": {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Corrupt(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Server(String),
}

impl Error {
    /// A closure for `map_err` that names the operation and the file.
    pub fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
        move |source| Error::Io { op, path: path.to_path_buf(), source }
    }

    /// True when the error is an I/O error saying the file does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}
