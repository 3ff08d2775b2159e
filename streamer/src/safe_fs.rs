//! File access that a hostile repository or data directory cannot turn
//! against us.
//!
//! Rules (see "Security model" in the README):
//!
//! - Repository files are opened with `O_NOFOLLOW | O_NONBLOCK` below a root
//!   directory, one component at a time with `openat(2)`, so no symbolic link
//!   inside a repository is ever followed, and anything that is not a regular
//!   file (a FIFO that would block forever, a device, a socket) is refused
//!   before a byte is read.
//! - Whole files are read only up to a limit the caller names, sized from
//!   `fstat`, so a file's claimed size never sizes an allocation.
//! - What we write into a repository is created with mode 0640 (directories
//!   0750) whatever the umask, with `O_EXCL` or `O_NOFOLLOW`, and made durable
//!   by one helper: temporary file, fsync, rename, fsync of the directory.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::{Component, Path};

use crate::error::{Error, Result};

/// Mode of every directory a repository holds.
pub const DIR_MODE: u32 = 0o750;
/// Mode of every file a repository holds.
pub const FILE_MODE: u32 = 0o640;

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::Usage(format!("path \"{}\" contains a NUL byte", p.display())))
}

fn last_os_error(op: &'static str, path: &Path) -> Error {
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ELOOP) || e.raw_os_error() == Some(libc::ENOTDIR) {
        return Error::Corrupt(format!(
            "\"{}\" is refused: a symbolic link or a non-directory where a directory was expected",
            path.display()
        ));
    }
    Error::Io { op, path: path.to_path_buf(), source: e }
}

/// Checks that an open file is a regular file; names what it is otherwise.
fn require_regular(file: &File, path: &Path) -> Result<std::fs::Metadata> {
    let md = file.metadata().map_err(Error::io("stat", path))?;
    if md.file_type().is_file() {
        return Ok(md);
    }
    use std::os::unix::fs::FileTypeExt;
    let ft = md.file_type();
    let what = if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_block_device() || ft.is_char_device() {
        "a device"
    } else {
        "not a regular file"
    };
    Err(Error::Corrupt(format!("\"{}\" is refused: it is {what}, not a regular file", path.display())))
}

/// Clears O_NONBLOCK once we know the descriptor is a regular file.
fn make_blocking(file: &File) {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if fl >= 0 {
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
        }
    }
}

/// Opens `path` for reading without following a symbolic link in its last
/// component and without blocking; refuses anything but a regular file.
pub fn open_regular(path: &Path) -> Result<File> {
    let c = cstr(path)?;
    // SAFETY: open(2) with a NUL-terminated path; the descriptor is owned by the File.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(last_os_error("open", path));
    }
    // SAFETY: fd is a fresh descriptor we own.
    let file = unsafe { File::from_raw_fd(fd) };
    require_regular(&file, path)?;
    make_blocking(&file);
    Ok(file)
}

/// Opens the regular file `rel` (plain relative components only) below the
/// directory `root`, following no symbolic link on the way: every directory
/// is opened with `O_NOFOLLOW | O_DIRECTORY` relative to the one before.
/// `root` itself is opened as given (the operator named it).
pub fn open_beneath(root: &Path, rel: &str) -> Result<File> {
    let full = root.join(rel);
    let comps: Vec<&std::ffi::OsStr> = Path::new(rel)
        .components()
        .map(|c| match c {
            Component::Normal(s) => Ok(s),
            _ => Err(Error::Corrupt(format!("\"{rel}\" is not a plain relative path"))),
        })
        .collect::<Result<_>>()?;
    let Some((last, dirs)) = comps.split_last() else {
        return Err(Error::Corrupt(format!("\"{rel}\" names no file")));
    };
    let c = cstr(root)?;
    // SAFETY: open(2) with a NUL-terminated path.
    let mut dirfd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) };
    if dirfd < 0 {
        return Err(last_os_error("open directory", root));
    }
    let close = |fd: libc::c_int| {
        // SAFETY: closing a descriptor we opened and no longer use.
        unsafe { libc::close(fd) };
    };
    let mut at = root.to_path_buf();
    for d in dirs {
        at.push(d);
        let c = CString::new(d.as_bytes()).map_err(|_| Error::Corrupt(format!("\"{rel}\" contains a NUL byte")))?;
        // SAFETY: openat(2) relative to a directory descriptor we own.
        let next = unsafe {
            libc::openat(dirfd, c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        };
        let err = (next < 0).then(|| last_os_error("open directory", &at));
        close(dirfd);
        if let Some(e) = err {
            return Err(e);
        }
        dirfd = next;
    }
    let c = CString::new(last.as_bytes()).map_err(|_| Error::Corrupt(format!("\"{rel}\" contains a NUL byte")))?;
    // SAFETY: as above.
    let fd = unsafe {
        libc::openat(dirfd, c.as_ptr(), libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
    };
    let err = (fd < 0).then(|| last_os_error("open", &full));
    close(dirfd);
    if let Some(e) = err {
        return Err(e);
    }
    // SAFETY: fd is a fresh descriptor we own.
    let file = unsafe { File::from_raw_fd(fd) };
    require_regular(&file, &full)?;
    make_blocking(&file);
    Ok(file)
}

/// Reads all of an open regular file, refusing one larger than `max` bytes
/// (the size comes from `fstat`, and reading stops at `max` + 1 bytes even if
/// the file grows meanwhile).
pub fn read_all(mut file: File, path: &Path, max: u64) -> Result<Vec<u8>> {
    let size = file.metadata().map_err(Error::io("stat", path))?.len();
    if size > max {
        return Err(Error::Corrupt(format!("\"{}\" is {size} bytes, more than the {max} allowed", path.display())));
    }
    let mut buf = Vec::with_capacity(size as usize);
    (&mut file).take(max + 1).read_to_end(&mut buf).map_err(Error::io("read", path))?;
    if buf.len() as u64 > max {
        return Err(Error::Corrupt(format!("\"{}\" grew past the {max} bytes allowed while read", path.display())));
    }
    Ok(buf)
}

/// [`open_regular`] then [`read_all`].
pub fn read_regular(path: &Path, max: u64) -> Result<Vec<u8>> {
    read_all(open_regular(path)?, path, max)
}

/// [`open_beneath`] then [`read_all`].
pub fn read_beneath(root: &Path, rel: &str, max: u64) -> Result<Vec<u8>> {
    read_all(open_beneath(root, rel)?, &root.join(rel), max)
}

/// Sets the mode of an open file or directory, whatever the umask was.
pub fn set_mode(file: &File, path: &Path, mode: u32) -> Result<()> {
    file.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(Error::io("set mode of", path))
}

/// Creates a new file (never an existing one, never through a symbolic
/// link) with `mode`.
pub fn create_new(path: &Path, mode: u32) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = File::options()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(Error::io("create", path))?;
    set_mode(&f, path, mode)?;
    Ok(f)
}

/// Creates directory `path` with `mode` (whatever the umask); an existing
/// directory (not a symbolic link) gets `mode` too.
pub fn create_dir(path: &Path, mode: u32) -> Result<()> {
    match std::fs::create_dir(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::Io { op: "create directory", path: path.to_path_buf(), source: e }),
    }
    let md = std::fs::symlink_metadata(path).map_err(Error::io("stat", path))?;
    if !md.is_dir() {
        return Err(Error::Conflict(format!("\"{}\" exists and is not a directory", path.display())));
    }
    if md.mode() & 0o7777 != mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(Error::io("set mode of", path))?;
    }
    Ok(())
}

/// Makes a directory's entries durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(Error::io("fsync directory", dir))
}

/// Writes `dir/name` atomically and durably with `mode`: a temporary file
/// (`name.tmp`, replaced if a killed writer left one), fsync, rename, fsync
/// of the directory. Readers see the old file or the new one, never a part.
pub fn write_durably(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(name);
    let mut f = File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)
        .map_err(Error::io("create", &tmp))?;
    set_mode(&f, &tmp, mode)?;
    f.write_all(bytes).map_err(Error::io("write", &tmp))?;
    crate::failpoint::hit_named("durable-write", name);
    f.sync_all().map_err(Error::io("fsync", &tmp))?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(Error::io("rename into place", &path))?;
    fsync_dir(dir)
}

/// Paths in a tree whose modes let others than the owner and group in, or
/// let the group write: `(path, mode)`. Symbolic links are not followed.
pub fn loose_modes(root: &Path, limit: usize) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(md) = std::fs::symlink_metadata(&p) else { continue };
        let mode = md.mode() & 0o7777;
        if !md.file_type().is_symlink() && mode & 0o027 != 0 {
            out.push((p.display().to_string(), mode));
            if out.len() >= limit {
                break;
            }
        }
        if md.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("bs-safefs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn fifos_symlinks_and_oversized_files_are_refused() {
        let d = scratch("refuse");
        std::fs::create_dir(d.join("sub")).unwrap();
        std::fs::write(d.join("sub/ok"), b"hello").unwrap();
        assert_eq!(read_beneath(&d, "sub/ok", 10).unwrap(), b"hello");
        let err = read_beneath(&d, "sub/ok", 4).unwrap_err().to_string();
        assert!(err.contains("is 5 bytes, more than the 4 allowed"), "{err}");

        let fifo = CString::new(d.join("sub/fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: mkfifo with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let err = read_beneath(&d, "sub/fifo", 10).unwrap_err().to_string();
        assert!(err.contains("it is a FIFO"), "{err}");
        let err = read_regular(&d.join("sub/fifo"), 10).unwrap_err().to_string();
        assert!(err.contains("it is a FIFO"), "{err}");

        std::os::unix::fs::symlink("/etc/hostname", d.join("sub/link")).unwrap();
        let err = read_beneath(&d, "sub/link", 1000).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        std::os::unix::fs::symlink(d.join("sub"), d.join("linkdir")).unwrap();
        let err = read_beneath(&d, "linkdir/ok", 1000).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        assert!(read_beneath(&d, "../x", 10).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn modes_ignore_the_umask() {
        let d = scratch("modes");
        // SAFETY: umask only changes this process's file creation mask.
        let old = unsafe { libc::umask(0) };
        create_dir(&d.join("dir"), DIR_MODE).unwrap();
        write_durably(&d.join("dir"), "f", b"x", FILE_MODE).unwrap();
        drop(create_new(&d.join("dir/g"), FILE_MODE).unwrap());
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let mode = |p: &str| std::fs::metadata(d.join(p)).unwrap().mode() & 0o7777;
        assert_eq!((mode("dir"), mode("dir/f"), mode("dir/g")), (0o750, 0o640, 0o640));
        assert!(loose_modes(&d.join("dir"), 10).is_empty());
        std::fs::set_permissions(d.join("dir/f"), std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(loose_modes(&d.join("dir"), 10), vec![(d.join("dir/f").display().to_string(), 0o644)]);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
