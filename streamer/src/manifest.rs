//! `manifest.json`: what a backup holds and where; the only code that reads or writes it.
//!
//! A backup exists exactly when its manifest does: the manifest is written
//! last, to a temporary name, fsynced and renamed into place.
//!
//! The file is pretty-printed JSON whose last member is `manifest_checksum`,
//! the SHA-256 of every byte before the `,` that precedes that member (the
//! scheme of PostgreSQL's `backup_manifest`), so damage anywhere is caught
//! before a single field is trusted.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Component, Path};

use serde::{Deserialize, Serialize};

use crate::codec::Compression;
use crate::error::{Error, Result};
use crate::hash::{sha256, to_hex};
use crate::lsn::Lsn;
use crate::stream::stream_file_name;

pub const MANIFEST_FILE: &str = "manifest.json";
pub const FORMAT: &str = "blockstream-manifest";
pub const VERSION: u32 = 1;
const CHECKSUM_KEY: &str = ",\n  \"manifest_checksum\": \"";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupType {
    Full,
    Incr,
    Diff,
}

impl BackupType {
    /// The letter that ends a backup id.
    pub fn letter(self) -> char {
        match self {
            BackupType::Full => 'F',
            BackupType::Incr => 'I',
            BackupType::Diff => 'D',
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub backup_id: String,
    pub backup_type: BackupType,
    pub parent: Option<String>,
    pub label: String,
    pub system_identifier: u64,
    pub pg_version_num: u32,
    pub timeline: u32,
    pub start_lsn: Lsn,
    pub stop_lsn: Lsn,
    pub start_time: String,
    pub stop_time: String,
    pub wal_segment_size: u64,
    pub data_checksums: bool,
    pub compression: Compression,
    /// Bytes per piece of the two-level file digest (see [`crate::hash`]).
    pub piece_size: u64,
    /// PostgreSQL's block size (BLCKSZ): the unit of incremental copies.
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    /// Why a full backup was taken when an incremental one was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_reason: Option<String>,
    /// Mode and owner of the data directory itself.
    pub data_directory: Owner,
    pub tablespaces: Vec<Tablespace>,
    pub directories: Vec<DirEntry>,
    pub files: Vec<FileEntry>,
    pub streams: Vec<StreamEntry>,
    pub backup_label: String,
    pub tablespace_map: Option<String>,
    /// Pages whose checksum did not match when they were copied (kept only
    /// with --allow-checksum-failures).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checksum_failures: Vec<ChecksumFailure>,
    pub stats: Stats,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChecksumFailure {
    pub path: String,
    /// Absolute block number (segment number times blocks per segment, plus the block in the file).
    pub block: u32,
    /// The checksum in the page header.
    pub stored: u16,
    /// The checksum the page's content gives.
    pub computed: u16,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tablespace {
    pub oid: u32,
    /// Absolute path the `pg_tblspc/<oid>` link pointed to.
    pub location: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub path: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    /// Two-level SHA-256 of the content as copied (see [`crate::hash`]).
    pub sha256: String,
    /// PostgreSQL truncated the file while it was read: the part past the new
    /// end was stored as zeros, and WAL replay from the start LSN truncates it again.
    #[serde(default, skip_serializing_if = "is_false")]
    pub truncated: bool,
    /// The file disappeared before it could be read (dropped during the
    /// backup); WAL replay removes it too, so restore does not create it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub vanished: bool,
    /// Where its bytes live: (stream, chunk) pairs.
    pub chunks: Vec<(u16, u32)>,
    /// Present when only some blocks are stored: the others come from the
    /// parent chain. Absent: the whole file is stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incremental: Option<Incremental>,
}

/// The blocks an incremental backup stores of a file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incremental {
    /// Blocks at or past this one (counted from the start of the file) never
    /// come from an older backup: they are stored here, or are zeros.
    pub limit_block: u32,
    /// Stored blocks as (first block, count) runs, ascending, not overlapping.
    pub runs: Vec<(u32, u32)>,
}

impl Incremental {
    pub fn stored_blocks(&self) -> u64 {
        self.runs.iter().map(|&(_, n)| n as u64).sum()
    }

    pub fn holds(&self, block: u32) -> bool {
        let i = self.runs.partition_point(|&(s, _)| s <= block);
        i > 0 && {
            let (s, n) = self.runs[i - 1];
            block < s + n
        }
    }
}

/// (offset, length) of every piece a backup stores of a file, in order: the
/// whole file cut every `piece_size` bytes, or each run of stored blocks cut
/// the same way. Copy, restore and verify all derive pieces from this.
pub fn piece_layout(size: u64, incremental: Option<&Incremental>, piece_size: u64, block_size: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut cut = |from: u64, to: u64| {
        let mut at = from;
        while at < to {
            let len = piece_size.min(to - at);
            out.push((at, len));
            at += len;
        }
    };
    match incremental {
        None => cut(0, size),
        Some(inc) => {
            for &(start, count) in &inc.runs {
                let from = start as u64 * block_size;
                let to = ((start as u64 + count as u64) * block_size).min(size);
                cut(from, to);
            }
        }
    }
    out
}

impl FileEntry {
    pub fn pieces(&self, piece_size: u64, block_size: u64) -> Vec<(u64, u64)> {
        piece_layout(self.size, self.incremental.as_ref(), piece_size, block_size)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamEntry {
    pub name: String,
    pub bytes: u64,
    pub chunks: Vec<ChunkMeta>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkMeta {
    pub offset: u64,
    pub stored: u64,
    pub raw: u64,
    /// SHA-256 of the stored (compressed) bytes.
    pub sha256: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub duration_secs: f64,
    /// Time spent in `pg_backup_start` (its checkpoint) and `pg_backup_stop`.
    pub server_secs: f64,
    pub files: u64,
    /// Bytes read from the data directory and tablespaces, WAL excluded.
    pub data_bytes: u64,
    pub wal_bytes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub compression_ratio: f64,
    pub throughput_mib_s: f64,
    pub jobs: u32,
    /// Main-fork segment files of an incremental backup, their blocks, and
    /// how many of those blocks it stored.
    #[serde(default)]
    pub incremental_files: u64,
    #[serde(default)]
    pub trackable_blocks: u64,
    #[serde(default)]
    pub changed_blocks: u64,
    /// Pages whose checksum was verified during the copy, and the time it took (all threads).
    #[serde(default)]
    pub pages_checked: u64,
    #[serde(default)]
    pub checksum_secs: f64,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn default_block_size() -> u32 {
    8192
}

/// A path from a manifest is safe when it is relative, non-empty and has no
/// `..`, `.` or empty components; restore writes nothing else.
pub fn check_relative_path(p: &str) -> Result<()> {
    let bad = |why: &str| Err(Error::Corrupt(format!("manifest path \"{p}\" is refused: {why}")));
    if p.is_empty() {
        return bad("it is empty");
    }
    if p.contains('\0') {
        return bad("it contains a NUL byte");
    }
    if p.starts_with('/') {
        return bad("it is absolute");
    }
    for c in Path::new(p).components() {
        match c {
            Component::Normal(_) => {}
            Component::ParentDir => return bad("it contains \"..\""),
            _ => return bad("it is not a plain relative path"),
        }
    }
    if p.split('/').any(|s| s.is_empty() || s == ".") {
        return bad("it has an empty or \".\" component");
    }
    Ok(())
}

impl Manifest {
    /// Checks what restore relies on: safe paths, chunk references inside
    /// the stream lists, stream names, tablespace locations.
    pub fn validate(&self) -> Result<()> {
        if self.format != FORMAT || self.version != VERSION {
            return Err(Error::Corrupt(format!(
                "manifest of backup {} has format \"{}\" version {}, expected \"{FORMAT}\" version {VERSION}",
                self.backup_id, self.format, self.version
            )));
        }
        if self.piece_size == 0 || self.block_size == 0 || !self.piece_size.is_multiple_of(self.block_size as u64) {
            return Err(Error::Corrupt(format!(
                "manifest of backup {} has piece_size {} and block_size {}: pieces must be whole blocks",
                self.backup_id, self.piece_size, self.block_size
            )));
        }
        if (self.backup_type == BackupType::Full) != self.parent.is_none() {
            return Err(Error::Corrupt(format!(
                "manifest of backup {} is of type {:?} with parent {:?}",
                self.backup_id, self.backup_type, self.parent
            )));
        }
        for (i, s) in self.streams.iter().enumerate() {
            if s.name != stream_file_name(i) {
                return Err(Error::Corrupt(format!(
                    "manifest of backup {} names stream {i} \"{}\", expected \"{}\"",
                    self.backup_id,
                    s.name,
                    stream_file_name(i)
                )));
            }
        }
        for d in &self.directories {
            check_relative_path(&d.path)?;
        }
        let mut seen = std::collections::HashSet::new();
        for f in &self.files {
            check_relative_path(&f.path)?;
            if !seen.insert(f.path.as_str()) {
                return Err(Error::Corrupt(format!("manifest lists file \"{}\" twice", f.path)));
            }
            if let Some(inc) = &f.incremental {
                let blocks = f.size.div_ceil(self.block_size as u64);
                let mut end = 0u64;
                for &(start, count) in &inc.runs {
                    if count == 0 || (start as u64) < end || start as u64 + count as u64 > blocks {
                        return Err(Error::Corrupt(format!(
                            "manifest gives \"{}\" the block run ({start}, {count}), out of order or past its {blocks} blocks",
                            f.path
                        )));
                    }
                    end = start as u64 + count as u64;
                }
                if self.parent.is_none() {
                    return Err(Error::Corrupt(format!(
                        "manifest of full backup {} lists \"{}\" as incremental",
                        self.backup_id, f.path
                    )));
                }
            }
            for &(s, c) in &f.chunks {
                let ok = self.streams.get(s as usize).is_some_and(|st| (c as usize) < st.chunks.len());
                if !ok {
                    return Err(Error::Corrupt(format!(
                        "manifest places file \"{}\" in chunk {c} of stream {s}, which does not exist",
                        f.path
                    )));
                }
            }
        }
        let mut oids = std::collections::HashSet::new();
        for t in &self.tablespaces {
            if !t.location.starts_with('/') || t.location.split('/').any(|c| c == "..") {
                return Err(Error::Corrupt(format!(
                    "manifest gives tablespace {} the location \"{}\", which is not an absolute path without \"..\"",
                    t.oid, t.location
                )));
            }
            if !oids.insert(t.oid) {
                return Err(Error::Corrupt(format!("manifest lists tablespace {} twice", t.oid)));
            }
        }
        Ok(())
    }

    /// Serializes with the trailing checksum.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut body = serde_json::to_vec_pretty(self).expect("a manifest always serializes");
        // Drop the closing "\n}" and append the checksum member.
        assert!(body.ends_with(b"\n}"));
        body.truncate(body.len() - 2);
        let digest = to_hex(&sha256(&body));
        body.extend_from_slice(CHECKSUM_KEY.as_bytes());
        body.extend_from_slice(digest.as_bytes());
        body.extend_from_slice(b"\"\n}\n");
        body
    }

    /// Parses and checks bytes written by [`Manifest::to_bytes`]; `what` names the file.
    pub fn from_bytes(bytes: &[u8], what: &Path) -> Result<Manifest> {
        let bad = |why: String| Error::Corrupt(format!("manifest \"{}\" {why}", what.display()));
        let key = CHECKSUM_KEY.as_bytes();
        let pos = bytes
            .windows(key.len())
            .rposition(|w| w == key)
            .ok_or_else(|| bad("has no manifest_checksum member".into()))?;
        let stored = bytes[pos + key.len()..]
            .split(|&b| b == b'"')
            .next()
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .unwrap_or_default();
        let found = to_hex(&sha256(&bytes[..pos]));
        if stored != found {
            return Err(bad(format!("is damaged: checksum {found}, expected {stored}")));
        }
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| bad(format!("does not parse: {e}")))?;
        m.validate()?;
        Ok(m)
    }

    /// Reads and checks `dir/manifest.json`.
    pub fn load(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST_FILE);
        let bytes = fs::read(&path).map_err(Error::io("read", &path))?;
        Manifest::from_bytes(&bytes, &path)
    }

    /// Writes `dir/manifest.json` atomically and durably: temporary file,
    /// fsync, rename, fsync of the directory.
    pub fn store(&self, dir: &Path) -> Result<()> {
        let tmp = dir.join(format!("{MANIFEST_FILE}.tmp"));
        let path = dir.join(MANIFEST_FILE);
        let mut f = File::create(&tmp).map_err(Error::io("create", &tmp))?;
        f.write_all(&self.to_bytes()).map_err(Error::io("write", &tmp))?;
        f.sync_all().map_err(Error::io("fsync", &tmp))?;
        drop(f);
        fs::rename(&tmp, &path).map_err(Error::io("rename into place", &path))?;
        fsync_dir(dir)
    }
}

/// Makes a directory's entries durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(Error::io("fsync directory", dir))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn sample() -> Manifest {
        Manifest {
            format: FORMAT.into(),
            version: VERSION,
            backup_id: "20261127T031500F".into(),
            backup_type: BackupType::Full,
            parent: None,
            label: "test".into(),
            system_identifier: 7_412_345_678_901_234_567,
            pg_version_num: 150018,
            timeline: 1,
            start_lsn: Lsn(0x2000028),
            stop_lsn: Lsn(0x2000138),
            start_time: "2026-11-27T03:15:00Z".into(),
            stop_time: "2026-11-27T03:15:09Z".into(),
            wal_segment_size: 16 << 20,
            data_checksums: true,
            compression: Compression::Zstd { level: 3 },
            piece_size: 1 << 20,
            block_size: 8192,
            full_reason: None,
            data_directory: Owner { mode: 0o700, uid: 1, gid: 1 },
            tablespaces: vec![],
            directories: vec![DirEntry { path: "base".into(), mode: 0o700, uid: 1, gid: 1 }],
            files: vec![FileEntry {
                path: "base/1/1259".into(),
                size: 8192,
                mode: 0o600,
                uid: 1,
                gid: 1,
                mtime: 0,
                sha256: "00".repeat(32),
                truncated: false,
                vanished: false,
                chunks: vec![(0, 0)],
                incremental: None,
            }],
            streams: vec![StreamEntry {
                name: "stream-00.bsz".into(),
                bytes: 100,
                chunks: vec![ChunkMeta { offset: 32, stored: 68, raw: 8216, sha256: "11".repeat(32) }],
            }],
            backup_label: "START WAL LOCATION: 0/2000028\n".into(),
            tablespace_map: None,
            checksum_failures: vec![],
            stats: Stats::default(),
        }
    }

    #[test]
    fn round_trip_and_checksum() {
        let m = sample();
        let bytes = m.to_bytes();
        assert_eq!(Manifest::from_bytes(&bytes, Path::new("m")).unwrap(), m);
        // One flipped byte anywhere before the checksum is caught.
        let mut bad = bytes.clone();
        let i = bad.iter().position(|&b| b == b'7').unwrap();
        bad[i] = b'8';
        let err = Manifest::from_bytes(&bad, Path::new("m")).unwrap_err().to_string();
        assert!(err.contains("is damaged"), "{err}");
    }

    #[test]
    fn piece_layouts() {
        assert_eq!(piece_layout(0, None, 1 << 20, 8192), vec![]);
        assert_eq!(piece_layout(3 << 20, None, 1 << 20, 8192).len(), 3);
        assert_eq!(piece_layout((1 << 20) + 5, None, 1 << 20, 8192), vec![(0, 1 << 20), (1 << 20, 5)]);
        let inc = Incremental { limit_block: 300, runs: vec![(0, 1), (5, 200), (299, 1)] };
        assert_eq!(
            piece_layout(300 * 8192, Some(&inc), 1 << 20, 8192),
            vec![(0, 8192), (5 * 8192, 128 * 8192), (133 * 8192, 72 * 8192), (299 * 8192, 8192)]
        );
        assert!(inc.holds(0) && inc.holds(5) && inc.holds(204) && !inc.holds(205) && inc.holds(299) && !inc.holds(1));
        assert_eq!(inc.stored_blocks(), 202);
    }

    #[test]
    fn unsafe_paths_are_refused() {
        for p in ["/etc/passwd", "../x", "base/../../x", "", "a//b", "./a", "a/./b"] {
            assert!(check_relative_path(p).is_err(), "{p} must be refused");
        }
        check_relative_path("base/1/1259").unwrap();
        let mut m = sample();
        m.files[0].path = "base/../../../etc/passwd".into();
        let err = Manifest::from_bytes(&m.to_bytes(), Path::new("m")).unwrap_err().to_string();
        assert!(err.contains("contains \"..\""), "{err}");
        let mut m = sample();
        m.files[0].chunks = vec![(0, 5)];
        assert!(m.validate().is_err());
    }
}
