//! Block reference tables and the files that store them: which blocks of which
//! relation forks changed in a range of WAL.
//!
//! The summarizer of pg_blocktrack fills a [`BlockRefTable`] from WAL records
//! and writes it as a summary file (`<tli><start><end>.bts`) once it is large
//! enough or a backup asks for it; the SQL functions read summary files back
//! and merge them. This module is the only code that reads or writes those
//! bytes and the tracker's `state` file; it has no PostgreSQL dependency, so
//! both sides and the unit tests share it (as PostgreSQL's own `blkreftable.c`
//! is shared by server and frontend).
//!
//! Summary file, all integers little-endian:
//!
//! ```text
//! header (64 bytes): magic "BTS1" | version u32 | system identifier u64 | timeline u32
//!                    | flags u32 (1 = gap: changes unknown) | start LSN u64 | end LSN u64
//!                    | entry count u32 | 20 zero bytes
//! entry:             tablespace u32 | database u32 | relfilenode u32 | fork u8
//!                    | has limit u8 | 2 zero bytes | limit block u32 | block count u32
//!                    | encoded length u32 | blocks: ascending, first as a varint, then
//!                      the differences as varints
//! checkpoints:       count u32 | (LSN u64 | CRC u32) per checkpoint record
//!                    read in the range (version 2; version 1 has none)
//! trailer:           CRC-32C u32 of every byte before it
//! ```
//!
//! The checkpoints are how a backup's parent is proven to lie in this
//! server's WAL history: the checkpoint record a backup started from (its
//! LSN and the record's own CRC) must appear in the summaries between the
//! parent and the new backup. A data directory reverted to a snapshot, or
//! two servers promoted onto one timeline, write other records at the same
//! LSNs, and their CRCs differ.
//!
//! Entries are sorted by (tablespace, database, relfilenode, fork). A
//! relfilenode of 0 stands for a whole database: every file of that database
//! directory must be copied in full. A limit block says that blocks at or past
//! it have no valid older copy (the fork was created, truncated or dropped in
//! the range): a backup copies them in full.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use super::{u32_at, u64_at};
use crate::error::{Error, Result};
use crate::lsn::Lsn;
use crate::safe_fs;
use crate::timeline::History;

pub const MAIN_FORK: u8 = 0;
pub const FSM_FORK: u8 = 1;
pub const VM_FORK: u8 = 2;
pub const INIT_FORK: u8 = 3;

/// Blocks per relation segment file (RELSEG_SIZE with 8 kB blocks).
pub const RELSEG_BLOCKS: u32 = 131_072;

const MAGIC: &[u8; 4] = b"BTS1";
const VERSION: u32 = 2;
/// Summaries without the checkpoint list are still read.
const VERSION_1: u32 = 1;
/// The tracker's state file keeps its own version.
const STATE_VERSION: u32 = 1;
const HEADER_LEN: usize = 64;
const ENTRY_HEADER_LEN: usize = 28;
pub const FLAG_GAP: u32 = 1;

/// One relation fork, or (with `rel == 0`) a whole database.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelFork {
    pub spc: u32,
    pub db: u32,
    pub rel: u32,
    pub fork: u8,
}

impl RelFork {
    pub fn database(spc: u32, db: u32) -> RelFork {
        RelFork { spc, db, rel: 0, fork: MAIN_FORK }
    }

    pub fn is_database(&self) -> bool {
        self.rel == 0
    }

    /// Path of segment `segno` relative to the data directory, as PostgreSQL
    /// names it; `tablespace_dir` is `PG_15_<catversion>`. A whole-database
    /// entry gives the database directory.
    pub fn path(&self, segno: u32, tablespace_dir: &str) -> String {
        let dir = match self.spc {
            1664 => "global".to_string(),
            1663 => format!("base/{}", self.db),
            spc => format!("pg_tblspc/{spc}/{tablespace_dir}/{}", self.db),
        };
        if self.is_database() {
            return dir;
        }
        let fork = match self.fork {
            FSM_FORK => "_fsm",
            VM_FORK => "_vm",
            INIT_FORK => "_init",
            _ => "",
        };
        if segno == 0 {
            format!("{dir}/{}{fork}", self.rel)
        } else {
            format!("{dir}/{}{fork}.{segno}", self.rel)
        }
    }
}

/// Blocks per bitmap chunk of a [`BlockSet`] (512 bytes of bits).
const SET_CHUNK_BLOCKS: u32 = 4096;
const SET_CHUNK_WORDS: usize = (SET_CHUNK_BLOCKS / 64) as usize;

/// A set of block numbers: bitmaps of 4096 blocks, present only where a
/// block is set, so memory follows the blocks inserted and never the
/// largest block number (a block number read from a file cannot size an
/// allocation).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockSet {
    chunks: std::collections::BTreeMap<u32, Box<[u64; SET_CHUNK_WORDS]>>,
    count: u32,
}

impl BlockSet {
    pub fn insert(&mut self, block: u32) -> bool {
        let bits = self.chunks.entry(block / SET_CHUNK_BLOCKS).or_insert_with(|| Box::new([0; SET_CHUNK_WORDS]));
        let i = block % SET_CHUNK_BLOCKS;
        let (w, bit) = ((i / 64) as usize, i % 64);
        let new = bits[w] & (1 << bit) == 0;
        if new {
            bits[w] |= 1 << bit;
            self.count += 1;
        }
        new
    }

    pub fn contains(&self, block: u32) -> bool {
        let i = block % SET_CHUNK_BLOCKS;
        self.chunks.get(&(block / SET_CHUNK_BLOCKS)).is_some_and(|bits| bits[(i / 64) as usize] & (1 << (i % 64)) != 0)
    }

    pub fn len(&self) -> u32 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes of memory the bitmaps hold.
    pub fn memory(&self) -> usize {
        self.chunks.len() * (SET_CHUNK_WORDS * 8 + 32)
    }

    /// Blocks in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.chunks.iter().flat_map(|(&c, bits)| {
            bits.iter().enumerate().flat_map(move |(i, &w)| {
                let mut w = w;
                std::iter::from_fn(move || {
                    if w == 0 {
                        return None;
                    }
                    let b = w.trailing_zeros();
                    w &= w - 1;
                    Some(c * SET_CHUNK_BLOCKS + i as u32 * 64 + b)
                })
            })
        })
    }

    pub fn union_with(&mut self, other: &BlockSet) {
        for b in other.iter() {
            self.insert(b);
        }
    }
}

/// What changed in one relation fork.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Blocks at or past this have no valid older copy.
    pub limit: Option<u32>,
    pub blocks: BlockSet,
}

/// Changed blocks per relation fork over a range of WAL.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockRefTable {
    entries: HashMap<RelFork, Changes>,
    memory: usize,
    /// (LSN, CRC) of the checkpoint records read, in WAL order.
    checkpoints: Vec<(Lsn, u32)>,
}

const ENTRY_OVERHEAD: usize = 64;

impl BlockRefTable {
    pub fn mark_block(&mut self, key: RelFork, block: u32) {
        let e = self.entries.entry(key).or_insert_with(|| {
            self.memory += ENTRY_OVERHEAD;
            Changes::default()
        });
        let before = e.blocks.memory();
        e.blocks.insert(block);
        self.memory += e.blocks.memory() - before;
    }

    /// Lowers the limit block of a fork (creation and drop: 0; truncation: the new length).
    pub fn set_limit(&mut self, key: RelFork, limit: u32) {
        let e = self.entries.entry(key).or_insert_with(|| {
            self.memory += ENTRY_OVERHEAD;
            Changes::default()
        });
        e.limit = Some(e.limit.map_or(limit, |l| l.min(limit)));
    }

    /// Every file of a database changed (CREATE DATABASE by file copy, DROP DATABASE).
    pub fn mark_database(&mut self, spc: u32, db: u32) {
        self.set_limit(RelFork::database(spc, db), 0);
    }

    /// Adds another table's changes (order does not matter: blocks are a
    /// union, limits a minimum).
    /// Records a checkpoint record read at `lsn` whose header CRC is `crc`.
    pub fn record_checkpoint(&mut self, lsn: Lsn, crc: u32) {
        self.checkpoints.push((lsn, crc));
        self.memory += 12;
    }

    /// The checkpoint records read, in WAL order.
    pub fn checkpoints(&self) -> &[(Lsn, u32)] {
        &self.checkpoints
    }

    pub fn merge(&mut self, other: &BlockRefTable) {
        self.checkpoints.extend_from_slice(&other.checkpoints);
        for (k, c) in &other.entries {
            if let Some(l) = c.limit {
                self.set_limit(*k, l);
            }
            for b in c.blocks.iter() {
                self.mark_block(*k, b);
            }
        }
    }

    pub fn get(&self, key: &RelFork) -> Option<&Changes> {
        self.entries.get(key)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Approximate heap bytes held.
    pub fn memory(&self) -> usize {
        self.memory
    }

    /// Entries sorted by key.
    pub fn sorted(&self) -> Vec<(&RelFork, &Changes)> {
        let mut v: Vec<_> = self.entries.iter().collect();
        v.sort_by_key(|(k, _)| **k);
        v
    }

    pub fn clear(&mut self) {
        self.checkpoints.clear();
        self.entries.clear();
        self.memory = 0;
    }
}

/// The header of a summary file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SummaryHeader {
    pub system_identifier: u64,
    pub timeline: u32,
    pub gap: bool,
    pub start: Lsn,
    pub end: Lsn,
}

/// A summary file found in the summaries directory (from its name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SummaryFile {
    pub path: PathBuf,
    pub timeline: u32,
    pub start: Lsn,
    pub end: Lsn,
    pub bytes: u64,
}

pub fn summary_file_name(tli: u32, start: Lsn, end: Lsn) -> String {
    format!("{tli:08X}{:016X}{:016X}.bts", start.0, end.0)
}

fn parse_summary_file_name(name: &str) -> Option<(u32, Lsn, Lsn)> {
    let stem = name.strip_suffix(".bts")?;
    if stem.len() != 40 || !stem.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some((
        u32::from_str_radix(&stem[..8], 16).ok()?,
        Lsn(u64::from_str_radix(&stem[8..24], 16).ok()?),
        Lsn(u64::from_str_radix(&stem[24..], 16).ok()?),
    ))
}

/// CRC-32C (Castagnoli), the checksum PostgreSQL uses for WAL and control files.
pub fn crc32c(data: &[u8]) -> u32 {
    ::crc32c::crc32c(data)
}

/// [`crc32c`] of the bytes already summed into `crc`, then `data`.
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    ::crc32c::crc32c_append(crc, data)
}

fn put_varint(out: &mut Vec<u8>, mut v: u32) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(data: &[u8], pos: &mut usize) -> Option<u32> {
    let mut v: u64 = 0;
    for shift in (0..35).step_by(7) {
        let b = *data.get(*pos)?;
        *pos += 1;
        v |= ((b & 0x7f) as u64) << shift;
        if b & 0x80 == 0 {
            return u32::try_from(v).ok();
        }
    }
    None
}

/// The bytes of a summary file.
pub fn encode_summary(h: &SummaryHeader, table: &BlockRefTable) -> Vec<u8> {
    let entries = table.sorted();
    let mut out = Vec::with_capacity(HEADER_LEN + entries.len() * 40);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&h.system_identifier.to_le_bytes());
    out.extend_from_slice(&h.timeline.to_le_bytes());
    out.extend_from_slice(&(if h.gap { FLAG_GAP } else { 0 }).to_le_bytes());
    out.extend_from_slice(&h.start.0.to_le_bytes());
    out.extend_from_slice(&h.end.0.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    out.resize(HEADER_LEN, 0);
    let mut enc = Vec::new();
    for (k, c) in entries {
        enc.clear();
        let mut prev = None;
        for b in c.blocks.iter() {
            put_varint(&mut enc, prev.map_or(b, |p| b - p));
            prev = Some(b);
        }
        out.extend_from_slice(&k.spc.to_le_bytes());
        out.extend_from_slice(&k.db.to_le_bytes());
        out.extend_from_slice(&k.rel.to_le_bytes());
        out.push(k.fork);
        out.push(c.limit.is_some() as u8);
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&c.limit.unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&c.blocks.len().to_le_bytes());
        out.extend_from_slice(&(enc.len() as u32).to_le_bytes());
        out.extend_from_slice(&enc);
    }
    out.extend_from_slice(&(table.checkpoints.len() as u32).to_le_bytes());
    for (lsn, crc) in &table.checkpoints {
        out.extend_from_slice(&lsn.0.to_le_bytes());
        out.extend_from_slice(&crc.to_le_bytes());
    }
    let crc = crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Parses summary file bytes, checking every field against its bounds; `what` names the file.
pub fn decode_summary(bytes: &[u8], what: &dyn fmt::Display) -> Result<(SummaryHeader, BlockRefTable)> {
    let bad = |why: String| Error::Corrupt(format!("summary file \"{what}\" {why}"));
    if bytes.len() < HEADER_LEN + 4 {
        return Err(bad(format!("is {} bytes, shorter than header and checksum", bytes.len())));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    let (stored, found) = (u32_at(crc, 0), crc32c(body));
    if stored != found {
        return Err(bad(format!("has checksum 0x{found:08x}, expected 0x{stored:08x}")));
    }
    if &body[0..4] != MAGIC {
        return Err(bad(format!("has bad magic {:02x?}, expected {:02x?}", &body[0..4], MAGIC)));
    }
    let version = u32_at(body, 4);
    if version != VERSION && version != VERSION_1 {
        return Err(bad(format!("has format version {version}, expected {VERSION_1} or {VERSION}")));
    }
    let h = SummaryHeader {
        system_identifier: u64_at(body, 8),
        timeline: u32_at(body, 16),
        gap: u32_at(body, 20) & FLAG_GAP != 0,
        start: Lsn(u64_at(body, 24)),
        end: Lsn(u64_at(body, 32)),
    };
    if h.end < h.start {
        return Err(bad(format!("ends at {} before its start {}", h.end, h.start)));
    }
    let count = u32_at(body, 40) as usize;
    let mut table = BlockRefTable::default();
    let mut pos = HEADER_LEN;
    for i in 0..count {
        if pos + ENTRY_HEADER_LEN > body.len() {
            return Err(bad(format!("entry {i} of {count} starts past the end at byte {pos}")));
        }
        let key = RelFork {
            spc: u32_at(body, pos),
            db: u32_at(body, pos + 4),
            rel: u32_at(body, pos + 8),
            fork: body[pos + 12],
        };
        if key.fork > INIT_FORK {
            return Err(bad(format!("entry {i} has fork number {}, expected 0 to {INIT_FORK}", key.fork)));
        }
        let has_limit = body[pos + 13];
        let limit = u32_at(body, pos + 16);
        let nblocks = u32_at(body, pos + 20);
        let enc_len = u32_at(body, pos + 24) as usize;
        pos += ENTRY_HEADER_LEN;
        let Some(enc) = body.get(pos..pos + enc_len) else {
            return Err(bad(format!("entry {i} claims {enc_len} bytes of blocks at byte {pos}, past the end")));
        };
        if has_limit > 1 {
            return Err(bad(format!("entry {i} has limit flag {has_limit}, expected 0 or 1")));
        }
        if has_limit == 1 {
            table.set_limit(key, limit);
        }
        let mut p = 0;
        let mut prev: Option<u32> = None;
        for n in 0..nblocks {
            let d = get_varint(enc, &mut p)
                .ok_or_else(|| bad(format!("entry {i}: block {n} of {nblocks} is cut short")))?;
            let b = match prev {
                None => d,
                Some(p) if d > 0 => p.checked_add(d).ok_or_else(|| bad(format!("entry {i}: block {n} overflows")))?,
                Some(_) => return Err(bad(format!("entry {i}: block {n} does not ascend"))),
            };
            table.mark_block(key, b);
            prev = Some(b);
        }
        if p != enc.len() {
            return Err(bad(format!("entry {i}: {} bytes follow its {nblocks} blocks", enc.len() - p)));
        }
        if nblocks == 0 && has_limit == 0 {
            return Err(bad(format!("entry {i} has neither blocks nor a limit")));
        }
        pos += enc_len;
    }
    if version >= VERSION {
        let Some(n) = body.get(pos..pos + 4).map(|b| u32_at(b, 0) as usize) else {
            return Err(bad(format!("ends at byte {pos} before its checkpoint count")));
        };
        pos += 4;
        if n > (body.len() - pos) / 12 {
            return Err(bad(format!(
                "claims {n} checkpoints, more than its {} remaining bytes hold",
                body.len() - pos
            )));
        }
        for _ in 0..n {
            table.record_checkpoint(Lsn(u64_at(body, pos)), u32_at(body, pos + 8));
            pos += 12;
        }
    }
    if pos != body.len() {
        return Err(bad(format!("has {} bytes after its {count} entries", body.len() - pos)));
    }
    Ok((h, table))
}

/// Writes a summary durably: temporary file, fsync, rename, fsync of the directory.
pub fn write_summary(dir: &Path, h: &SummaryHeader, table: &BlockRefTable) -> Result<PathBuf> {
    let name = summary_file_name(h.timeline, h.start, h.end);
    write_durably(dir, &name, &encode_summary(h, table))?;
    Ok(dir.join(name))
}

/// Files in the data directory get PostgreSQL's own mode.
const PGDATA_FILE_MODE: u32 = 0o600;

/// Summary files larger than this are refused unread (a summary of 64 GB of
/// block table encodes to far less).
pub const MAX_SUMMARY_BYTES: u64 = 8 << 30;

fn write_durably(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    safe_fs::write_durably(dir, name, bytes, PGDATA_FILE_MODE)
}

pub fn read_summary(path: &Path) -> Result<(SummaryHeader, BlockRefTable)> {
    let bytes = safe_fs::read_regular(path, MAX_SUMMARY_BYTES)?;
    decode_summary(&bytes, &path.display())
}

/// Summary files in `dir`, by start LSN. Leftover temporary files are ignored.
pub fn list_summaries(dir: &Path) -> Result<Vec<SummaryFile>> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::Io { op: "read directory", path: dir.to_path_buf(), source: e }),
    };
    for e in entries {
        let e = e.map_err(Error::io("read directory", dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some((timeline, start, end)) = parse_summary_file_name(&name) {
            let bytes = e.metadata().map(|m| m.len()).unwrap_or(0);
            out.push(SummaryFile { path: e.path(), timeline, start, end, bytes });
        }
    }
    out.sort_by_key(|s| (s.start, s.end));
    Ok(out)
}

/// The summaries that cover `[since, until)` without a hole, each of WAL in
/// `history` (a summary of an ancestor timeline up to its switch point is;
/// one past it describes WAL this server never had), or why there are none.
/// Gap summaries are checked by the caller after reading (their flag is in
/// the header).
pub fn covering(
    files: &[SummaryFile],
    history: &History,
    since: Lsn,
    until: Lsn,
) -> std::result::Result<Vec<SummaryFile>, String> {
    if until <= since {
        return Ok(Vec::new());
    }
    let mut chosen = Vec::new();
    let mut off_history: Option<String> = None;
    let mut at = since;
    for f in files.iter().filter(|f| f.end > since && f.start < until) {
        if let Err(why) = history.holds(f.timeline, f.end) {
            off_history.get_or_insert(format!("the summary from {} to {} is of other WAL: {why}", f.start, f.end));
            continue;
        }
        if f.start > at {
            let why = off_history.map_or(String::new(), |w| format!(" ({w})"));
            return Err(format!("no summary covers WAL from {at} to {}{why}", f.start));
        }
        if f.end > at {
            at = f.end;
        }
        chosen.push(f.clone());
        if at >= until {
            return Ok(chosen);
        }
    }
    let why = off_history.map_or(String::new(), |w| format!(" ({w})"));
    Err(format!("WAL is summarized only up to {at}, not to {until}{why}"))
}

/// The tracker's own state: where its summaries resume, and since when they are unbroken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrackerState {
    pub system_identifier: u64,
    pub timeline: u32,
    /// End of the last durable summary: reading resumes here.
    pub resume_lsn: Lsn,
    /// Summaries cover every change from here on, without a gap.
    pub valid_since: Lsn,
}

const STATE_MAGIC: &[u8; 4] = b"BTST";
const STATE_LEN: usize = 40;

impl TrackerState {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(STATE_LEN);
        b.extend_from_slice(STATE_MAGIC);
        b.extend_from_slice(&STATE_VERSION.to_le_bytes());
        b.extend_from_slice(&self.system_identifier.to_le_bytes());
        b.extend_from_slice(&self.timeline.to_le_bytes());
        b.extend_from_slice(&self.resume_lsn.0.to_le_bytes());
        b.extend_from_slice(&self.valid_since.0.to_le_bytes());
        let crc = crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8], what: &dyn fmt::Display) -> Result<TrackerState> {
        let bad = |why: String| Error::Corrupt(format!("tracker state \"{what}\" {why}"));
        if b.len() != STATE_LEN {
            return Err(bad(format!("is {} bytes, expected {STATE_LEN}", b.len())));
        }
        let (stored, found) = (u32_at(b, 36), crc32c(&b[..36]));
        if stored != found {
            return Err(bad(format!("has checksum 0x{found:08x}, expected 0x{stored:08x}")));
        }
        if &b[0..4] != STATE_MAGIC || u32_at(b, 4) != STATE_VERSION {
            return Err(bad(format!(
                "has magic {:02x?} version {}, expected {:02x?} version {STATE_VERSION}",
                &b[0..4],
                u32_at(b, 4),
                STATE_MAGIC
            )));
        }
        Ok(TrackerState {
            system_identifier: u64_at(b, 8),
            timeline: u32_at(b, 16),
            resume_lsn: Lsn(u64_at(b, 20)),
            valid_since: Lsn(u64_at(b, 28)),
        })
    }

    /// Reads `dir/state`; `None` when there is none.
    pub fn load(dir: &Path) -> Result<Option<TrackerState>> {
        let path = dir.join("state");
        match safe_fs::read_regular(&path, STATE_LEN as u64) {
            Ok(b) => TrackerState::decode(&b, &path.display()).map(Some),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn store(&self, dir: &Path) -> Result<()> {
        write_durably(dir, "state", &self.encode())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(rel: u32) -> RelFork {
        RelFork { spc: 1663, db: 5, rel, fork: MAIN_FORK }
    }

    #[test]
    fn crc32c_known_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c_append(crc32c(b"1234"), b"56789"), 0xE306_9283);
    }

    #[test]
    fn block_sets_iterate_in_order() {
        let mut s = BlockSet::default();
        for b in [900, 3, 64, 63, 131_071, 3] {
            s.insert(b);
        }
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![3, 63, 64, 900, 131_071]);
        assert_eq!(s.len(), 5);
        assert!(s.contains(64) && !s.contains(65));
    }

    #[test]
    fn summary_round_trip_and_damage() {
        let mut t = BlockRefTable::default();
        for b in [0, 1, 2, 7, 1000, 131_072, 4_000_000] {
            t.mark_block(key(16384), b);
        }
        t.set_limit(key(16390), 12);
        t.set_limit(key(16390), 40); // a higher limit does not raise it
        t.mark_block(RelFork { fork: VM_FORK, ..key(16384) }, 0);
        t.mark_database(1663, 16400);
        t.record_checkpoint(Lsn(0x1000), 0xDEAD_BEEF);
        let h = SummaryHeader { system_identifier: 7, timeline: 1, gap: false, start: Lsn(0x100), end: Lsn(0x2000) };
        let bytes = encode_summary(&h, &t);
        let (h2, t2) = decode_summary(&bytes, &"s").unwrap();
        assert_eq!((h2, &t2), (h, &t));
        assert_eq!(t2.get(&key(16390)).unwrap().limit, Some(12));
        assert_eq!(t2.checkpoints(), &[(Lsn(0x1000), 0xDEAD_BEEF)]);
        for i in [0, 30, HEADER_LEN + 5, bytes.len() - 6] {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            let err = decode_summary(&bad, &"s").unwrap_err().to_string();
            assert!(err.contains("summary file \"s\" has checksum"), "{err}");
        }
        let err = decode_summary(&bytes[..40], &"s").unwrap_err().to_string();
        assert!(err.contains("shorter than header"), "{err}");
    }

    #[test]
    fn merge_is_union_and_minimum() {
        let mut a = BlockRefTable::default();
        a.mark_block(key(1), 5);
        a.set_limit(key(2), 10);
        let mut b = BlockRefTable::default();
        b.mark_block(key(1), 6);
        b.set_limit(key(2), 3);
        a.merge(&b);
        assert_eq!(a.get(&key(1)).unwrap().blocks.iter().collect::<Vec<_>>(), vec![5, 6]);
        assert_eq!(a.get(&key(2)).unwrap().limit, Some(3));
    }

    #[test]
    fn coverage_needs_contiguous_summaries() {
        let f =
            |s: u64, e: u64| SummaryFile { path: PathBuf::new(), timeline: 1, start: Lsn(s), end: Lsn(e), bytes: 0 };
        let files = vec![f(100, 200), f(200, 300), f(300, 400)];
        let one = History::only(1);
        assert_eq!(covering(&files, &one, Lsn(150), Lsn(350)).unwrap().len(), 3);
        assert_eq!(covering(&files, &one, Lsn(200), Lsn(300)).unwrap().len(), 1);
        assert!(covering(&files, &one, Lsn(50), Lsn(350)).unwrap_err().contains("no summary covers WAL from 0/32"));
        assert!(covering(&files, &one, Lsn(150), Lsn(450)).unwrap_err().contains("only up to 0/190"));
        let holes = vec![f(100, 200), f(250, 300)];
        assert!(covering(&holes, &one, Lsn(150), Lsn(260)).is_err());
        assert!(covering(&files, &History::only(2), Lsn(150), Lsn(160))
            .unwrap_err()
            .contains("timeline 1 is not in the history of timeline 2"));
        // After a promotion at 0x12C: timeline 1's summaries up to the switch
        // point, then timeline 2's, are one history.
        let g = |t: u32, s: u64, e: u64| SummaryFile {
            path: PathBuf::new(),
            timeline: t,
            start: Lsn(s),
            end: Lsn(e),
            bytes: 0,
        };
        let promoted = History::parse(2, "1\t0/12C\tno recovery target specified\n").unwrap();
        let across = vec![g(1, 100, 200), g(1, 200, 300), g(2, 300, 400)];
        assert_eq!(covering(&across, &promoted, Lsn(150), Lsn(350)).unwrap().len(), 3);
        // Timeline 1 past the switch point (the old primary's WAL after the
        // failover) is not this server's history, even where it would close a hole.
        let diverged = vec![g(1, 100, 350), g(2, 350, 400)];
        let err = covering(&diverged, &promoted, Lsn(150), Lsn(380)).unwrap_err();
        assert!(
            err.contains("no summary covers WAL from 0/96 to 0/15E (the summary from 0/64 to 0/15E is of other WAL: timeline 1 ends at 0/12C"),
            "{err}"
        );
    }

    #[test]
    fn names_and_paths() {
        let n = summary_file_name(1, Lsn(0x1_0000_0028), Lsn(0x2_0000_0000));
        assert_eq!(parse_summary_file_name(&n), Some((1, Lsn(0x1_0000_0028), Lsn(0x2_0000_0000))));
        assert_eq!(key(16384).path(0, "PG_15_1"), "base/5/16384");
        assert_eq!(RelFork { fork: FSM_FORK, ..key(16384) }.path(2, "x"), "base/5/16384_fsm.2");
        assert_eq!(RelFork { spc: 16500, db: 5, rel: 7, fork: 0 }.path(1, "PG_15_1"), "pg_tblspc/16500/PG_15_1/5/7.1");
        assert_eq!(RelFork::database(1663, 16400).path(0, "x"), "base/16400");
        let st = TrackerState { system_identifier: 9, timeline: 2, resume_lsn: Lsn(77), valid_since: Lsn(5) };
        assert_eq!(TrackerState::decode(&st.encode(), &"state").unwrap(), st);
    }
}
