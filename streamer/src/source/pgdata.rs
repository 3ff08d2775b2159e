//! What a data directory holds, and what an online backup must leave out.
//!
//! The rules follow PostgreSQL 15's `basebackup.c`: directories whose
//! contents are recreated at startup are kept empty, server-private files are
//! skipped, temporary and unlogged (non-init) relation forks are skipped, and
//! `pg_wal` is kept without its contents (the backup carries the WAL it needs
//! separately). `pg_blocktrack/` (our own tracking state) is skipped too: a
//! restored cluster starts its tracking afresh.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::lsn::{wal_file_name, Lsn};
use crate::manifest::{DirEntry, Owner, Tablespace};
pub use crate::pg_control::ControlFile;
use crate::safe_fs;

/// Directories kept, but empty.
const EXCLUDE_DIR_CONTENTS: &[&str] =
    &["pg_stat_tmp", "pg_replslot", "pg_dynshmem", "pg_notify", "pg_serial", "pg_snapshots", "pg_subtrans", "pg_wal"];

/// Top-level entries skipped altogether.
const EXCLUDE_TOP: &[&str] = &["pg_blocktrack"];

/// Files skipped wherever they are (`pg_internal.init` by prefix).
const EXCLUDE_FILES: &[&str] = &[
    "postgresql.auto.conf.tmp",
    "current_logfiles.tmp",
    "backup_label",
    "tablespace_map",
    "backup_manifest",
    "postmaster.pid",
    "postmaster.opts",
];

/// A file of the data directory (or a tablespace, or pg_wal) to copy.
#[derive(Clone, Debug)]
pub struct SourceFile {
    /// Path relative to the data directory, `/`-separated; tablespace files
    /// are under `pg_tblspc/<oid>/`.
    pub rel: String,
    pub abs: PathBuf,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
}

#[derive(Debug, Default)]
pub struct Inventory {
    pub files: Vec<SourceFile>,
    pub dirs: Vec<DirEntry>,
    pub tablespaces: Vec<Tablespace>,
    pub data_directory: Owner,
    /// Entries left out, and why (symbolic links other than `pg_wal` and
    /// tablespaces are never followed).
    pub skipped: Vec<(String, String)>,
}

/// Reads and checks `global/pg_control` of a data directory.
pub fn read_control_file(pgdata: &Path) -> Result<ControlFile> {
    let path = pgdata.join("global/pg_control");
    let bytes = safe_fs::read_regular(&path, crate::pg_control::MAX_LEN as u64).map_err(|e| {
        if e.is_not_found() {
            Error::Usage(format!(
                "\"{}\" is not a PostgreSQL data directory: global/pg_control is missing",
                pgdata.display()
            ))
        } else {
            e
        }
    })?;
    ControlFile::parse(&bytes, &path.display())
}

/// `PG_15_202209061`: the directory a tablespace holds for this server version.
pub fn tablespace_version_dir(pg_version_num: u32, catalog_version: u32) -> String {
    format!("PG_{}_{}", pg_version_num / 10000, catalog_version)
}

/// Lists what a backup of `pgdata` copies. Symbolic links are followed only
/// where PostgreSQL puts them: `pg_wal` (copied as a directory) and the
/// tablespace links in `pg_tblspc`. Any other symbolic link is skipped and
/// named in [`Inventory::skipped`]: a link made inside the data directory to
/// a file its owner cannot read must not end up readable in a backup taken
/// by root.
pub fn scan(pgdata: &Path, tablespace_dir: &str) -> Result<Inventory> {
    let md = fs::metadata(pgdata).map_err(Error::io("stat data directory", pgdata))?;
    let mut inv = Inventory {
        data_directory: Owner { mode: md.mode() & 0o7777, uid: md.uid(), gid: md.gid() },
        ..Default::default()
    };
    let mut seen = HashSet::new();
    seen.insert((md.dev(), md.ino()));
    walk(pgdata, "", true, &mut inv, &mut seen)?;

    let tblspc = pgdata.join("pg_tblspc");
    if let Ok(entries) = fs::read_dir(&tblspc) {
        for e in entries {
            let e = e.map_err(Error::io("read directory", &tblspc))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(oid) = name.parse::<u32>() else { continue };
            let link = e.path();
            let lmd = fs::symlink_metadata(&link).map_err(Error::io("stat", &link))?;
            if lmd.is_dir() {
                // An in-place tablespace (allow_in_place_tablespaces): an ordinary directory.
                let rel = format!("pg_tblspc/{oid}");
                inv.dirs.push(dir_entry(&rel, &lmd));
                walk(&link, &rel, false, &mut inv, &mut seen)?;
                continue;
            }
            let location = fs::read_link(&link).map_err(Error::io("read tablespace link", &link))?;
            let location = if location.is_absolute() { location } else { tblspc.join(location) };
            let lmd = fs::metadata(&location).map_err(Error::io("stat tablespace", &location))?;
            inv.tablespaces.push(Tablespace {
                oid,
                location: location.to_string_lossy().into_owned(),
                mode: lmd.mode() & 0o7777,
                uid: lmd.uid(),
                gid: lmd.gid(),
            });
            let vdir = location.join(tablespace_dir);
            let rel = format!("pg_tblspc/{oid}/{tablespace_dir}");
            match fs::symlink_metadata(&vdir) {
                Ok(vmd) if vmd.is_dir() => {
                    inv.dirs.push(dir_entry(&rel, &vmd));
                    walk(&vdir, &rel, false, &mut inv, &mut seen)?;
                }
                _ => {} // an empty tablespace of another server version
            }
        }
    }
    inv.tablespaces.sort_by_key(|t| t.oid);
    Ok(inv)
}

fn dir_entry(rel: &str, md: &fs::Metadata) -> DirEntry {
    DirEntry { path: rel.to_string(), mode: md.mode() & 0o7777, uid: md.uid(), gid: md.gid() }
}

fn join_rel(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    }
}

/// True for `t123_456`, `t123_456_fsm`, `t123_456.1`: a temporary relation.
fn is_temp_relation(name: &str) -> bool {
    let Some(rest) = name.strip_prefix('t') else { return false };
    let Some((backend, rel)) = rest.split_once('_') else { return false };
    !backend.is_empty()
        && backend.bytes().all(|b| b.is_ascii_digit())
        && rel.bytes().next().is_some_and(|b| b.is_ascii_digit())
}

/// A relation file name, `<relfilenode>[_fsm|_vm|_init][.<segno>]`: its
/// relfilenode, fork number (0 main, 1 fsm, 2 vm, 3 init) and segment.
/// The one parser of PostgreSQL's relation file names in the project.
pub fn relation_name(name: &str) -> Option<(&str, u8, u32)> {
    let end = name.find(|c: char| !c.is_ascii_digit()).unwrap_or(name.len());
    if end == 0 {
        return None;
    }
    let (node, rest) = name.split_at(end);
    let (fork, rest) = match rest {
        r if r.starts_with("_fsm") => (1, &r[4..]),
        r if r.starts_with("_vm") => (2, &r[3..]),
        r if r.starts_with("_init") => (3, &r[5..]),
        r => (0, r),
    };
    let segno = match rest.strip_prefix('.') {
        None if rest.is_empty() => 0,
        Some(seg) if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) => seg.parse().ok()?,
        _ => return None,
    };
    Some((node, fork, segno))
}

/// The fork and segment of a relation file given by its path in the data
/// directory (in `global/`, `base/<db>/` or `pg_tblspc/<spc>/<version>/<db>/`).
pub fn relation_file(path: &str) -> Option<(u8, u32)> {
    let (dir, name) = path.rsplit_once('/')?;
    let relation_dir = dir == "global"
        || dir.strip_prefix("base/").is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
        || (dir.starts_with("pg_tblspc/") && dir.split('/').count() == 4);
    if !relation_dir {
        return None;
    }
    relation_name(name).map(|(_, fork, segno)| (fork, segno))
}

fn walk(dir: &Path, rel: &str, top: bool, inv: &mut Inventory, seen: &mut HashSet<(u64, u64)>) -> Result<()> {
    let mut entries = Vec::new();
    for e in fs::read_dir(dir).map_err(Error::io("read directory", dir))? {
        let e = e.map_err(Error::io("read directory", dir))?;
        entries.push(e.file_name().to_string_lossy().into_owned());
    }
    entries.sort();
    // Unlogged relations: every fork except _init is skipped when an _init fork exists.
    let unlogged: HashSet<&str> = entries
        .iter()
        .filter_map(|n| n.strip_suffix("_init"))
        .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        .collect();
    for name in &entries {
        if top && EXCLUDE_TOP.contains(&name.as_str()) {
            continue;
        }
        if EXCLUDE_FILES.contains(&name.as_str())
            || name.starts_with("pg_internal.init")
            || name.starts_with("pgsql_tmp")
        {
            continue;
        }
        if is_temp_relation(name) {
            continue;
        }
        if let Some((node, _, _)) = relation_name(name) {
            if unlogged.contains(node) && !name.ends_with("_init") && !name.contains("_init.") {
                continue;
            }
        }
        let path = dir.join(name);
        let child = join_rel(rel, name);
        let md = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            // Gone since the listing (a dropped relation): WAL replay removes it too.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::Io { op: "stat", path, source: e }),
        };
        let md = if md.file_type().is_symlink() {
            let expected = top && (name == "pg_wal" || name == "pg_tblspc");
            let target = fs::read_link(&path).map(|t| t.display().to_string()).unwrap_or_default();
            match fs::metadata(&path) {
                Ok(m) if expected && m.is_dir() => m,
                _ => {
                    inv.skipped.push((child, format!("a symbolic link (to \"{target}\") is not followed")));
                    continue;
                }
            }
        } else {
            md
        };
        if md.is_dir() {
            inv.dirs.push(dir_entry(&child, &md));
            if top && name == "pg_tblspc" {
                continue; // tablespaces are listed by scan()
            }
            if top && name == "pg_wal" {
                // Keep pg_wal/archive_status, nothing else.
                let st = path.join("archive_status");
                if let Ok(smd) = fs::metadata(&st) {
                    inv.dirs.push(dir_entry("pg_wal/archive_status", &smd));
                }
                continue;
            }
            if top && EXCLUDE_DIR_CONTENTS.contains(&name.as_str()) {
                continue;
            }
            if !seen.insert((md.dev(), md.ino())) {
                return Err(Error::Usage(format!(
                    "\"{}\" leads back to a directory already copied (a symbolic link loop)",
                    path.display()
                )));
            }
            walk(&path, &child, false, inv, seen)?;
        } else if md.is_file() {
            inv.files.push(SourceFile {
                rel: child,
                abs: path,
                size: md.len(),
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                mtime: md.mtime(),
            });
        }
        // Sockets, FIFOs and devices are not part of a cluster.
    }
    Ok(())
}

/// The WAL segments from the one holding `start` to the one holding the byte
/// before `stop` on timeline `tli`, plus every timeline history file, from `pg_wal`.
pub fn wal_files(pgdata: &Path, tli: u32, start: Lsn, stop: Lsn, segment_size: u64) -> Result<Vec<SourceFile>> {
    let wal = pgdata.join("pg_wal");
    let mut out = Vec::new();
    for segno in start.segment(segment_size)..=stop.previous_segment(segment_size).max(start.segment(segment_size)) {
        let name = wal_file_name(tli, segno, segment_size);
        let path = wal.join(&name);
        let md = fs::symlink_metadata(&path).map_err(|e| {
            Error::Server(format!(
                "WAL segment {name} needed from {start} to {stop} is not in \"{}\": {e}",
                wal.display()
            ))
        })?;
        out.push(source_file(format!("pg_wal/{name}"), path, &md));
    }
    for e in fs::read_dir(&wal).map_err(Error::io("read directory", &wal))? {
        let e = e.map_err(Error::io("read directory", &wal))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.len() == 16 && name.ends_with(".history") {
            let md = e.metadata().map_err(Error::io("stat", &e.path()))?;
            if !md.is_file() {
                continue;
            }
            out.push(source_file(format!("pg_wal/{name}"), e.path(), &md));
        }
    }
    Ok(out)
}

fn source_file(rel: String, abs: PathBuf, md: &fs::Metadata) -> SourceFile {
    SourceFile { rel, abs, size: md.len(), mode: md.mode() & 0o7777, uid: md.uid(), gid: md.gid(), mtime: md.mtime() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relation_names() {
        assert!(is_temp_relation("t3_16384"));
        assert!(is_temp_relation("t3_16384_fsm"));
        assert!(!is_temp_relation("16384"));
        assert!(!is_temp_relation("tablespace_map"));
        assert_eq!(relation_name("16384"), Some(("16384", 0, 0)));
        assert_eq!(relation_name("16384.2"), Some(("16384", 0, 2)));
        assert_eq!(relation_name("16384_vm"), Some(("16384", 2, 0)));
        assert_eq!(relation_name("16384_fsm.3"), Some(("16384", 1, 3)));
        assert_eq!(relation_name("PG_VERSION"), None);
        assert_eq!(relation_name("12abc"), None);
        assert_eq!(relation_name("12."), None);
        assert_eq!(relation_file("base/5/16384_init"), Some((3, 0)));
        assert_eq!(relation_file("pg_tblspc/1/PG_15_2/5/7.1"), Some((0, 1)));
        assert_eq!(relation_file("pg_xact/0000"), None);
    }

    #[test]
    fn scan_applies_basebackup_exclusions() {
        let root = std::env::temp_dir().join(format!("bs-scan-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for d in ["base/5", "global", "pg_wal/archive_status", "pg_stat_tmp", "pg_blocktrack/summaries", "pg_tblspc"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        for f in [
            "PG_VERSION",
            "postmaster.pid",
            "global/pg_control",
            "global/pg_internal.init",
            "base/5/1259",
            "base/5/16384",
            "base/5/16384_fsm",
            "base/5/16384_init",
            "base/5/t4_16390",
            "base/5/pgsql_tmp123",
            "pg_wal/000000010000000000000001",
            "pg_stat_tmp/global.stat",
            "pg_blocktrack/state",
        ] {
            fs::write(root.join(f), b"x").unwrap();
        }
        std::os::unix::fs::symlink("/etc/shadow", root.join("base/5/16999")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("base/6")).unwrap();
        let inv = scan(&root, "PG_15_1").unwrap();
        let files: Vec<&str> = inv.files.iter().map(|f| f.rel.as_str()).collect();
        assert_eq!(files, vec!["PG_VERSION", "base/5/1259", "base/5/16384_init", "global/pg_control"]);
        let skipped: Vec<&str> = inv.skipped.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(skipped, vec!["base/5/16999", "base/6"]);
        assert!(inv.skipped[0].1.contains("(to \"/etc/shadow\") is not followed"), "{:?}", inv.skipped);
        let dirs: Vec<&str> = inv.dirs.iter().map(|d| d.path.as_str()).collect();
        assert!(dirs.contains(&"pg_wal") && dirs.contains(&"pg_wal/archive_status") && dirs.contains(&"pg_stat_tmp"));
        assert!(!dirs.iter().any(|d| d.starts_with("pg_blocktrack")));
        fs::remove_dir_all(&root).unwrap();
    }
}
