//! Who writes: restore and drill never write as root on behalf of a manifest.
//!
//! Run as root, they open what they read from the repository first, then
//! switch the whole process to an unprivileged owner (the owner of an
//! existing target directory, `--owner`, or the manifest's data-directory
//! owner; never uid 0) before the first byte is written. Files are then
//! created by that user, with modes from the manifest masked to what
//! PostgreSQL allows (0750 for directories, 0640 for files).
//!
//! Also here: finding running postmasters, so that `--force` never empties a
//! data directory or tablespace a server is using.

use std::ffi::{CStr, CString};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A local user to run as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

fn from_passwd(pw: *const libc::passwd) -> Option<User> {
    if pw.is_null() {
        return None;
    }
    // SAFETY: getpwnam/getpwuid return a pointer to a valid passwd entry (or
    // NULL, handled above); its fields are copied at once.
    unsafe {
        Some(User {
            name: CStr::from_ptr((*pw).pw_name).to_string_lossy().into_owned(),
            uid: (*pw).pw_uid,
            gid: (*pw).pw_gid,
        })
    }
}

/// The user named `name` (or a numeric uid).
pub fn user_by_name(name: &str) -> Result<User> {
    if let Ok(uid) = name.parse::<u32>() {
        return user_by_uid(uid);
    }
    let c = CString::new(name).map_err(|_| Error::Usage(format!("invalid user name \"{name}\"")))?;
    // SAFETY: getpwnam with a NUL-terminated name; the result is copied before any other call.
    from_passwd(unsafe { libc::getpwnam(c.as_ptr()) })
        .ok_or_else(|| Error::Usage(format!("there is no local user \"{name}\"")))
}

/// The user with id `uid`.
pub fn user_by_uid(uid: u32) -> Result<User> {
    // SAFETY: getpwuid; the result is copied before any other call.
    from_passwd(unsafe { libc::getpwuid(uid) })
        .ok_or_else(|| Error::Usage(format!("there is no local user with id {uid}")))
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Switches the whole process (every thread) to `user` for good: groups,
/// gid, uid. Refuses uid 0.
pub fn become_user(user: &User) -> Result<()> {
    if user.uid == 0 {
        return Err(Error::Usage(
            "refusing to write as root: give the user that will run the server with --owner".into(),
        ));
    }
    // SAFETY: setgroups/setgid/setuid on this process; glibc applies them to
    // every thread. The order drops groups and gid while we may still.
    unsafe {
        let groups = [user.gid];
        if libc::setgroups(1, groups.as_ptr()) != 0 || libc::setgid(user.gid) != 0 || libc::setuid(user.uid) != 0 {
            return Err(Error::Io {
                op: "switch to user",
                path: PathBuf::from(&user.name),
                source: std::io::Error::last_os_error(),
            });
        }
        if libc::geteuid() != user.uid || libc::setuid(0) == 0 {
            return Err(Error::Conflict(format!("could not drop root privileges for user {}", user.name)));
        }
    }
    Ok(())
}

/// Whether process `pid` exists (signal 0; EPERM means it exists).
pub fn process_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks for the process.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The pid a data directory's `postmaster.pid` names, when that process is alive.
pub fn live_postmaster_pid(datadir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(datadir.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    process_alive(pid).then_some(pid)
}

/// A running postmaster: its pid, data directory and the (resolved) locations
/// of its tablespaces.
#[derive(Debug)]
pub struct Postmaster {
    pub pid: i32,
    pub data_directory: PathBuf,
    pub tablespaces: Vec<PathBuf>,
}

/// Postmasters running on this machine that we can see: processes named
/// `postgres` (or `postmaster`) whose working directory (a postmaster works
/// in its data directory) holds a `postmaster.pid` naming them.
pub fn running_postmasters() -> Vec<Postmaster> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else { return out };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if !matches!(comm.trim(), "postgres" | "postmaster") {
            continue;
        }
        let Ok(cwd) = std::fs::read_link(e.path().join("cwd")) else { continue };
        if live_postmaster_pid(&cwd) != Some(pid) {
            continue;
        }
        let mut tablespaces = Vec::new();
        for t in std::fs::read_dir(cwd.join("pg_tblspc")).into_iter().flatten().flatten() {
            if let Ok(loc) = std::fs::canonicalize(t.path()) {
                tablespaces.push(loc);
            }
        }
        out.push(Postmaster { pid, data_directory: cwd, tablespaces });
    }
    out
}

/// The running postmaster that uses `dir` as its data directory or as a
/// tablespace, or whose data directory or tablespace lies inside `dir`.
pub fn postmaster_using(dir: &Path, postmasters: &[Postmaster]) -> Option<String> {
    let dir = std::fs::canonicalize(dir).ok()?;
    for p in postmasters {
        if p.data_directory.starts_with(&dir) {
            return Some(format!(
                "the server with pid {} runs on data directory \"{}\"",
                p.pid,
                p.data_directory.display()
            ));
        }
        if let Some(t) = p.tablespaces.iter().find(|t| t.starts_with(&dir) || dir.starts_with(t)) {
            return Some(format!(
                "the server with pid {} (data directory \"{}\") uses it as tablespace \"{}\"",
                p.pid,
                p.data_directory.display(),
                t.display()
            ));
        }
    }
    None
}

/// The owner (uid) of an existing path, not following a symbolic link.
pub fn owner_of(path: &Path) -> Option<u32> {
    std::fs::symlink_metadata(path).ok().map(|m| m.uid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_processes() {
        assert_eq!(user_by_uid(0).unwrap().name, "root");
        assert_eq!(user_by_name("root").unwrap().uid, 0);
        assert!(user_by_name("no-such-user-here").unwrap_err().to_string().contains("no local user"));
        assert!(process_alive(std::process::id() as i32));
        assert!(!process_alive(0));
        assert!(become_user(&User { name: "root".into(), uid: 0, gid: 0 })
            .unwrap_err()
            .to_string()
            .contains("--owner"));
    }
}
