//! Paths that come from SQL: who may name one, and which ones.
//!
//! As with `COPY ... FROM 'file'`, a function that reads a repository needs
//! superuser or the privileges of `pg_read_server_files` (writing one:
//! `pg_write_server_files`), and the path must lie under one of the
//! directories in `blocktrack.allowed_repositories` (a superuser-only
//! setting; empty allows none). Both the path and the allowed directories are
//! canonicalized (symbolic links resolved, `..` removed) before they are
//! compared, so neither a link nor `..` leads outside the list; from then on
//! the engine opens files below the canonical path without following any
//! symbolic link.
//!
//! An object-store repository (`s3://bucket/prefix`) must equal or lie
//! below an `s3://` entry of the list, compared key component by key
//! component (`..` and empty components are refused before). Its
//! credentials come from the server's environment or the AWS files in the
//! server user's home, never from SQL.

use std::path::PathBuf;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::errors::raise;
use crate::guc;

/// What a function does with the repository it is given.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// Whether the current user has the privileges of `role` (or is superuser).
fn has_role(role: u32) -> bool {
    // SAFETY: plain catalog lookups for the current user, valid in any backend.
    unsafe { pg_sys::superuser() || pg_sys::has_privs_of_role(pg_sys::GetUserId(), pg_sys::Oid::from(role)) }
}

/// The allowed directories, canonicalized; entries that do not exist are left out.
fn allowed() -> Vec<PathBuf> {
    guc::allowed_repositories()
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty() && !e.starts_with("s3://"))
        .filter_map(|e| std::fs::canonicalize(e).ok())
        .collect()
}

/// Whether the object-store repository `url` is under an `s3://` entry.
fn s3_allowed(url: &str) -> bool {
    let Ok((bucket, prefix)) = blockstream::storage::s3::parse_url(url) else { return false };
    guc::allowed_repositories().split(',').map(str::trim).filter(|e| e.starts_with("s3://")).any(|e| {
        blockstream::storage::s3::parse_url(e)
            .is_ok_and(|(b, p)| b == bucket && (p.is_empty() || prefix == p || prefix.starts_with(&format!("{p}/"))))
    })
}

/// Checks that the current user may use the repository at `repo` for
/// `access`, and returns its canonical path. Raises 22004 (NULL), 42501 (no
/// privilege, or not under an allowed directory), 22023 (not absolute),
/// 58P01 (does not exist).
pub fn check_repository(repo: Option<&str>, access: Access) -> PathBuf {
    let Some(repo) = repo else {
        raise(PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED, "repository path must not be NULL", None);
    };
    let (role, role_name) = match access {
        Access::Read => (pg_sys::ROLE_PG_READ_SERVER_FILES, "pg_read_server_files"),
        Access::Write => (pg_sys::ROLE_PG_WRITE_SERVER_FILES, "pg_write_server_files"),
    };
    if !has_role(role) {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied to use repository \"{repo}\""),
            Some(&format!("only superusers and roles with the privileges of {role_name} may use a repository")),
        );
    }
    if repo.starts_with("s3://") {
        if let Err(e) = blockstream::storage::s3::parse_url(repo) {
            raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, e.to_string(), None);
        }
        if !s3_allowed(repo) {
            raise(
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("repository \"{repo}\" is not under blocktrack.allowed_repositories"),
                Some("a superuser lists the s3://bucket/prefix URLs repositories may be under with blocktrack.allowed_repositories"),
            );
        }
        return PathBuf::from(repo);
    }
    if !repo.starts_with('/') {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("repository path \"{repo}\" must be absolute"),
            None,
        );
    }
    // A repository a backup is about to create: its parent must exist.
    let probe = std::path::Path::new(repo);
    let canonical = match std::fs::canonicalize(probe) {
        Ok(p) => Ok(p),
        Err(_) if access == Access::Write && probe.parent().is_some_and(|p| p.is_dir()) => {
            std::fs::canonicalize(probe.parent().unwrap()).map(|p| p.join(probe.file_name().unwrap_or_default()))
        }
        Err(e) => Err(e),
    };
    let canonical = match canonical {
        Ok(p) => p,
        Err(e) => {
            raise(PgSqlErrorCode::ERRCODE_UNDEFINED_FILE, format!("repository \"{repo}\" does not exist: {e}"), None)
        }
    };
    if !allowed().iter().any(|a| canonical.starts_with(a)) {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("repository \"{}\" is not under blocktrack.allowed_repositories", canonical.display()),
            Some("a superuser lists the directories repositories may be in with blocktrack.allowed_repositories"),
        );
    }
    canonical
}

/// The key source the settings name: (kind, path), kind 0 none, 1 a
/// passphrase file, 2 a key file (`blocktrack.key_file` wins).
pub fn key_setting() -> (u8, String) {
    let (pass, key) = guc::key_files();
    if !key.is_empty() {
        (2, key)
    } else if !pass.is_empty() {
        (1, pass)
    } else {
        (0, String::new())
    }
}

/// Reads the key a setting names (from the backend or a worker).
pub fn key_from(kind: u8, path: &str) -> blockstream::Result<blockstream::crypt::Encryption> {
    use blockstream::crypt::KeySource;
    let key = match kind {
        1 => Some(KeySource::passphrase_file(std::path::Path::new(path))?),
        2 => Some(KeySource::key_file(std::path::Path::new(path))?),
        _ => None,
    };
    Ok(blockstream::crypt::Encryption { key, allow_plain: false })
}

/// The key of encrypted repositories from `blocktrack.passphrase_file` or
/// `blocktrack.key_file`; a file that cannot be used is 28000.
pub fn encryption() -> blockstream::crypt::Encryption {
    let (kind, path) = key_setting();
    key_from(kind, &path).unwrap_or_else(|e| {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION,
            e.to_string(),
            Some("blocktrack.passphrase_file or blocktrack.key_file names the key of encrypted repositories"),
        )
    })
}

/// Opens the repository at `root` and unlocks it with `enc`.
pub fn open_repo(
    root: &std::path::Path,
    enc: &blockstream::crypt::Encryption,
) -> blockstream::Result<blockstream::repo::Repo> {
    let mut repo = blockstream::repo::Repo::open(root)?;
    repo.unlock(enc.key.as_ref(), enc.allow_plain)?;
    Ok(repo)
}
