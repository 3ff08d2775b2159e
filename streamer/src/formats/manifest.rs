//! `manifest.json`: what a backup holds and where; the only code that reads or writes it.
//!
//! A backup exists exactly when its manifest does: the manifest is written
//! last, to a temporary name, fsynced and renamed into place.
//!
//! The file is pretty-printed JSON whose last member is `manifest_checksum`,
//! the SHA-256 of every byte before the `,` that precedes that member (the
//! scheme of PostgreSQL's `backup_manifest`), so damage anywhere is caught
//! before a single field is trusted.

use std::path::{Component, Path};

use serde::{Deserialize, Serialize};

use crate::codec::{Compression, Filter};
use crate::error::{Error, Result};
use crate::hash::{sha256, to_hex};
use crate::lsn::Lsn;
use crate::safe_fs;
use crate::stream::stream_file_name;

pub const MANIFEST_FILE: &str = "manifest.json";
pub const FORMAT: &str = "blockstream-manifest";
pub const VERSION: u32 = 2;
/// Versions this build reads: 1 named one `compression`, 2 records the
/// chunk filter stack (`filters`).
pub const READS_VERSIONS: [u32; 2] = [1, 2];
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
    /// The checkpoint record the backup starts from (backup_label's
    /// CHECKPOINT LOCATION) and its CRC: what proves to a later server that
    /// this backup lies in its WAL history (see [`crate::blkref`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_lsn: Option<Lsn>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_crc: Option<u32>,
    pub start_time: String,
    pub stop_time: String,
    pub wal_segment_size: u64,
    pub data_checksums: bool,
    /// What every chunk went through on its way into a stream, in write
    /// order; readers undo it in reverse (see [`crate::codec`]).
    #[serde(default)]
    pub filters: Vec<Filter>,
    /// Format 1's single filter: read (into `filters`), never written.
    #[serde(default, rename = "compression", skip_serializing)]
    pub compression_v1: Option<Compression>,
    /// Bytes per piece of the two-level file digest (see [`crate::hash`]).
    pub piece_size: u64,
    /// PostgreSQL's block size (BLCKSZ): the unit of incremental copies.
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    /// Blocks per relation segment file (RELSEG_SIZE).
    #[serde(default = "default_relseg_size")]
    pub relseg_size: u32,
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

fn default_relseg_size() -> u32 {
    131_072
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

/// Limits of the format. Every length or count a manifest gives is checked
/// against these, or against what the manifest itself holds, before it sizes
/// an allocation or a loop.
pub mod limits {
    /// A manifest file is read whole; larger ones are refused.
    pub const MANIFEST_BYTES: u64 = 2 << 30;
    /// PostgreSQL's block sizes (`--with-blocksize`): 1 to 32 kB, powers of two.
    pub const BLOCK_SIZE: std::ops::RangeInclusive<u32> = 1024..=32768;
    /// PostgreSQL's WAL segment sizes (`initdb --wal-segsize`): 1 MB to 1 GB, powers of two.
    pub const WAL_SEGMENT_SIZE: std::ops::RangeInclusive<u64> = (1 << 20)..=(1 << 30);
    /// Pieces: powers of two from 64 kB to 64 MB (the copy uses 1 MB).
    pub const PIECE_SIZE: std::ops::RangeInclusive<u64> = (64 << 10)..=(64 << 20);
    /// Blocks per relation segment file (`--with-segsize`): up to 2^31 - 1.
    pub const RELSEG_SIZE: std::ops::RangeInclusive<u32> = 1..=(u32::MAX >> 1);
    /// A chunk's raw (decompressed) size: the copy closes a chunk at 64 MB at
    /// most, plus the piece that crossed the line and record headers.
    pub const CHUNK_RAW: u64 = 192 << 20;
    /// What zstd may add to incompressible input, with room to spare.
    pub fn stored_bound(raw: u64) -> u64 {
        raw + (raw >> 7) + 1024
    }
}

/// A tablespace location is a clean absolute path: no `.`, `..` or empty
/// components, no trailing slash, no NUL or newline.
pub fn check_absolute_path(p: &str) -> std::result::Result<(), &'static str> {
    if !p.starts_with('/') {
        return Err("it is not absolute");
    }
    if p == "/" {
        return Err("it is the root directory");
    }
    if p.contains('\0') || p.contains('\n') || p.contains('\r') {
        return Err("it contains a NUL byte or a line break");
    }
    if p.len() > 1 && p[1..].split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err("it has an empty, \".\" or \"..\" component");
    }
    Ok(())
}

impl Manifest {
    /// Bytes of content the backup stores of a file that did not vanish: the
    /// whole file, or its runs of blocks (cut at the file's end).
    fn stored_bytes(&self, f: &FileEntry) -> u128 {
        match &f.incremental {
            None => f.size as u128,
            Some(inc) => inc
                .runs
                .iter()
                .map(|&(s, n)| {
                    let from = s as u128 * self.block_size as u128;
                    let to = ((s as u128 + n as u128) * self.block_size as u128).min(f.size as u128);
                    to.saturating_sub(from)
                })
                .sum(),
        }
    }

    /// Checks what every reader relies on: sizes within the format's limits,
    /// safe paths, chunk references inside the stream lists, chunks laid out
    /// inside their streams, stream names, tablespace locations, and that the
    /// content the files claim fits in the chunks that hold it. Every error
    /// names the field and its value.
    pub fn validate(&self) -> Result<()> {
        let id = &self.backup_id;
        let bad = |why: String| Err(Error::Corrupt(format!("manifest of backup {id} {why}")));
        if self.format != FORMAT || !READS_VERSIONS.contains(&self.version) {
            return bad(format!(
                "has format \"{}\" version {}, expected \"{FORMAT}\" version 1 to {VERSION}",
                self.format, self.version
            ));
        }
        if let Err(e) = crate::codec::check_stack(&self.filters) {
            return bad(e.to_string());
        }
        if !crate::repo::is_backup_id(id) || !id.ends_with(self.backup_type.letter()) {
            return bad(format!("has backup_id \"{id}\" of type {:?}: not a backup id of that type", self.backup_type));
        }
        if let Some(p) = &self.parent {
            if !crate::repo::is_backup_id(p) || p >= id {
                return bad(format!("has parent \"{p}\", which is not the id of an earlier backup"));
            }
        }
        if (self.backup_type == BackupType::Full) != self.parent.is_none() {
            return bad(format!("is of type {:?} with parent {:?}", self.backup_type, self.parent));
        }
        if !limits::BLOCK_SIZE.contains(&self.block_size) || !self.block_size.is_power_of_two() {
            return bad(format!("has block_size {}, expected a power of two from 1024 to 32768", self.block_size));
        }
        if !limits::WAL_SEGMENT_SIZE.contains(&self.wal_segment_size) || !self.wal_segment_size.is_power_of_two() {
            return bad(format!(
                "has wal_segment_size {}, expected a power of two from 1 MB to 1 GB",
                self.wal_segment_size
            ));
        }
        if !limits::PIECE_SIZE.contains(&self.piece_size)
            || !self.piece_size.is_power_of_two()
            || self.piece_size < self.block_size as u64
        {
            return bad(format!(
                "has piece_size {} (block_size {}), expected a power of two from 64 kB to 64 MB, of whole blocks",
                self.piece_size, self.block_size
            ));
        }
        if !limits::RELSEG_SIZE.contains(&self.relseg_size) {
            return bad(format!("has relseg_size {}, expected 1 to {}", self.relseg_size, limits::RELSEG_SIZE.end()));
        }
        if self.timeline == 0 {
            return bad("has timeline 0".into());
        }
        if self.stop_lsn < self.start_lsn {
            return bad(format!("has stop_lsn {} before its start_lsn {}", self.stop_lsn, self.start_lsn));
        }
        // Every WAL segment from start to stop is one file of the backup.
        let seg = self.wal_segment_size;
        let segments =
            self.stop_lsn.previous_segment(seg).max(self.start_lsn.segment(seg)) - self.start_lsn.segment(seg) + 1;
        if segments > self.files.len() as u64 {
            return bad(format!(
                "has a WAL range from {} to {} of {segments} segments, but lists only {} files",
                self.start_lsn,
                self.stop_lsn,
                self.files.len()
            ));
        }

        let mut total_raw: u128 = 0;
        for (i, s) in self.streams.iter().enumerate() {
            if s.name != stream_file_name(i) {
                return bad(format!("names stream {i} \"{}\", expected \"{}\"", s.name, stream_file_name(i)));
            }
            let mut end = crate::stream::HEADER_LEN;
            for (k, c) in s.chunks.iter().enumerate() {
                let fits = c.offset >= end
                    && c.raw <= limits::CHUNK_RAW
                    && c.stored <= limits::stored_bound(c.raw)
                    && c.offset.checked_add(c.stored).is_some_and(|e| e <= s.bytes);
                if !fits || c.sha256.len() != 64 {
                    return bad(format!(
                        "places chunk {k} of {} at offset {} with {} stored and {} raw bytes: outside the stream's {} bytes, overlapping chunk {}, or larger than a chunk can be",
                        s.name,
                        c.offset,
                        c.stored,
                        c.raw,
                        s.bytes,
                        k.saturating_sub(1)
                    ));
                }
                end = c.offset + c.stored;
                total_raw += c.raw as u128;
            }
        }
        for d in &self.directories {
            check_relative_path(&d.path)?;
        }
        let mut seen = std::collections::HashSet::new();
        let segment_bytes = self.relseg_size as u64 * self.block_size as u64;
        let mut content: u128 = 0;
        for f in &self.files {
            check_relative_path(&f.path)?;
            if !seen.insert(f.path.as_str()) {
                return bad(format!("lists file \"{}\" twice", f.path));
            }
            if let Some(inc) = &f.incremental {
                if self.parent.is_none() {
                    return bad(format!("lists \"{}\" as incremental in a full backup", f.path));
                }
                if f.size > segment_bytes {
                    return bad(format!(
                        "gives incremental file \"{}\" size {}, larger than a relation segment ({segment_bytes} bytes)",
                        f.path, f.size
                    ));
                }
                let blocks = f.size.div_ceil(self.block_size as u64);
                let mut end = 0u64;
                for &(start, count) in &inc.runs {
                    if count == 0 || (start as u64) < end || start as u64 + count as u64 > blocks {
                        return bad(format!(
                            "gives \"{}\" the block run ({start}, {count}), out of order or past its {blocks} blocks",
                            f.path
                        ));
                    }
                    end = start as u64 + count as u64;
                }
            }
            for &(s, c) in &f.chunks {
                let ok = self.streams.get(s as usize).is_some_and(|st| (c as usize) < st.chunks.len());
                if !ok {
                    return bad(format!("places file \"{}\" in chunk {c} of stream {s}, which does not exist", f.path));
                }
            }
            if !f.vanished {
                content += self.stored_bytes(f);
            }
        }
        if content > total_raw {
            return bad(format!("lists {content} bytes of file content, but its chunks hold only {total_raw} bytes"));
        }
        let mut oids = std::collections::HashSet::new();
        for t in &self.tablespaces {
            if let Err(why) = check_absolute_path(&t.location) {
                return bad(format!(
                    "gives tablespace {} the location \"{}\", which is refused: {why}",
                    t.oid, t.location
                ));
            }
            if !oids.insert(t.oid) {
                return bad(format!("lists tablespace {} twice", t.oid));
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
        let mut m: Manifest = serde_json::from_slice(bytes).map_err(|e| bad(format!("does not parse: {e}")))?;
        if m.version == 1 {
            let c = m.compression_v1.take().ok_or_else(|| bad("is of version 1 and has no compression".into()))?;
            m.filters = crate::codec::filters_for(c);
        }
        m.validate()?;
        Ok(m)
    }

    /// Reads and checks `dir/manifest.json` (a regular file, no symbolic link).
    pub fn load(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST_FILE);
        let bytes = safe_fs::read_regular(&path, limits::MANIFEST_BYTES)?;
        Manifest::from_bytes(&bytes, &path)
    }

    /// Writes `dir/manifest.json` atomically and durably (mode 0640).
    pub fn store(&self, dir: &Path) -> Result<()> {
        safe_fs::write_durably(dir, MANIFEST_FILE, &self.to_bytes(), safe_fs::FILE_MODE)
    }
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
            checkpoint_lsn: Some(Lsn(0x2000060)),
            checkpoint_crc: Some(0x1234_5678),
            start_time: "2026-11-27T03:15:00Z".into(),
            stop_time: "2026-11-27T03:15:09Z".into(),
            wal_segment_size: 16 << 20,
            data_checksums: true,
            filters: crate::codec::filters_for(Compression::Zstd { level: 3 }),
            compression_v1: None,
            piece_size: 1 << 20,
            block_size: 8192,
            relseg_size: 131_072,
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
