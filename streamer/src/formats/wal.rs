//! WAL records, read from a stopped server's `pg_wal`: which blocks a
//! stretch of WAL changed. A delta restore reads the few records between
//! where pg_blocktrack's summaries end and the server's last checkpoint
//! (the summarizer stops with the other processes at shutdown, before the
//! last of their WAL is flushed).
//!
//! The page and record layouts are xlog_internal.h's and xlogrecord.h's,
//! the same from PostgreSQL 15 to 18. Every page header is checked against
//! the address it was read from (a recycled segment holds old pages), and
//! every record's CRC-32C. Anything that changes relations other than
//! through its block references (XLR_SPECIAL_REL_UPDATE, storage and
//! database records, a transaction that drops relations, a prepared
//! transaction, a `wal_level` change) is not followed: the caller then
//! compares every block instead.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{u16_at, u32_at, u64_at};
use crate::blkref::{crc32c, BlockRefTable, RelFork};
use crate::lsn::{wal_file_name, Lsn};
use crate::safe_fs;

const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
const XLP_LONG_HEADER: u16 = 0x0002;
const SHORT_PAGE_HEADER: u64 = 24;
const LONG_PAGE_HEADER: u64 = 40;
const RECORD_HEADER: usize = 24;
/// XLogRecordMaxSize: no record is larger.
const MAX_RECORD: u64 = 1020 << 20;

const XLR_SPECIAL_REL_UPDATE: u8 = 0x01;
const XLR_MAX_BLOCK_ID: u8 = 32;
const XLR_BLOCK_ID_DATA_SHORT: u8 = 255;
const XLR_BLOCK_ID_DATA_LONG: u8 = 254;
const XLR_BLOCK_ID_ORIGIN: u8 = 253;
const XLR_BLOCK_ID_TOPLEVEL_XID: u8 = 252;
const BKPBLOCK_FORK_MASK: u8 = 0x0F;
const BKPBLOCK_HAS_IMAGE: u8 = 0x10;
const BKPBLOCK_SAME_REL: u8 = 0x80;
const BKPIMAGE_HAS_HOLE: u8 = 0x01;
/// PGLZ, LZ4 and ZSTD.
const BKPIMAGE_COMPRESSED: u8 = 0x04 | 0x08 | 0x10;

const RM_XLOG: u8 = 0;
const RM_XACT: u8 = 1;
const RM_SMGR: u8 = 2;
const RM_DBASE: u8 = 4;
const RM_TBLSPC: u8 = 5;
const XLOG_SWITCH: u8 = 0x40;
const XLOG_PARAMETER_CHANGE: u8 = 0x60;
const XLOG_XACT_OPMASK: u8 = 0x70;
const XLOG_XACT_PREPARE: u8 = 0x10;
const XLOG_XACT_ASSIGNMENT: u8 = 0x50;
const XLOG_XACT_HAS_INFO: u8 = 0x80;
const XACT_XINFO_HAS_RELFILENODES: u32 = 1 << 2;

/// Reads WAL pages of one timeline from a directory of segment files.
struct Pages<'a> {
    dir: &'a Path,
    timeline: u32,
    segment_size: u64,
    page_size: u64,
    system_identifier: u64,
    segment: Option<(u64, File)>,
    page_at: Option<u64>,
    page: Vec<u8>,
}

impl Pages<'_> {
    /// The page starting at `at`, its header checked.
    fn load(&mut self, at: u64) -> Result<(), String> {
        if self.page_at == Some(at) {
            return Ok(());
        }
        let segno = at / self.segment_size;
        if self.segment.as_ref().is_none_or(|(s, _)| *s != segno) {
            let name = wal_file_name(self.timeline, segno, self.segment_size);
            let f = safe_fs::open_beneath(self.dir, &name).map_err(|e| e.to_string())?;
            self.segment = Some((segno, f));
        }
        let (_, f) = self.segment.as_ref().expect("just opened");
        self.page.resize(self.page_size as usize, 0);
        let name = || wal_file_name(self.timeline, segno, self.segment_size);
        f.read_exact_at(&mut self.page, at % self.segment_size)
            .map_err(|e| format!("could not read WAL file \"{}\" at {}: {e}", name(), Lsn(at)))?;
        let addr = u64_at(&self.page, 8);
        if addr != at {
            return Err(format!("WAL page {} in \"{}\" is of {} (a recycled file)", Lsn(at), name(), Lsn(addr)));
        }
        let info = u16_at(&self.page, 2);
        if at.is_multiple_of(self.segment_size) {
            let long_ok = info & XLP_LONG_HEADER != 0
                && u64_at(&self.page, 24) == self.system_identifier
                && u32_at(&self.page, 32) as u64 == self.segment_size
                && u32_at(&self.page, 36) as u64 == self.page_size;
            if !long_ok {
                return Err(format!("WAL file \"{}\" is not of this cluster or layout", name()));
            }
        }
        self.page_at = Some(at);
        Ok(())
    }

    fn header_len(&self) -> u64 {
        if u16_at(&self.page, 2) & XLP_LONG_HEADER != 0 {
            LONG_PAGE_HEADER
        } else {
            SHORT_PAGE_HEADER
        }
    }

    /// Where a record that would start at `at` starts: past the page header
    /// when `at` is the start of a page.
    fn record_start(&mut self, at: u64) -> Result<u64, String> {
        let at = at.next_multiple_of(8);
        if !at.is_multiple_of(self.page_size) {
            return Ok(at);
        }
        self.load(at)?;
        if u16_at(&self.page, 2) & XLP_FIRST_IS_CONTRECORD != 0 {
            return Err(format!("WAL page {} continues a record, where one should start", Lsn(at)));
        }
        Ok(at + self.header_len())
    }

    /// `len` bytes of the record starting at `at` into `out`, across page
    /// headers; returns where the bytes end.
    fn read(&mut self, mut at: u64, len: usize, out: &mut Vec<u8>) -> Result<u64, String> {
        out.clear();
        while out.len() < len {
            let off = at % self.page_size;
            let page = at - off;
            self.load(page)?;
            if off == 0 {
                // A record going on from the page before.
                let rem = u32_at(&self.page, 16) as usize;
                if u16_at(&self.page, 2) & XLP_FIRST_IS_CONTRECORD == 0 || rem < len - out.len() {
                    return Err(format!("WAL page {} does not continue the record before it", Lsn(at)));
                }
                at += self.header_len();
                continue;
            }
            let take = ((self.page_size - off) as usize).min(len - out.len());
            out.extend_from_slice(&self.page[off as usize..off as usize + take]);
            at += take as u64;
        }
        Ok(at)
    }
}

/// Marks in `table` every block the WAL records from `from` (a record's end,
/// as summaries end) to `to` (the start of a record) change, reading
/// timeline `timeline`'s segment files in `dir`. Returns the number of
/// records read, or why the range cannot be followed.
#[allow(clippy::too_many_arguments)]
pub fn changes_between(
    dir: &Path,
    timeline: u32,
    system_identifier: u64,
    segment_size: u64,
    page_size: u64,
    from: Lsn,
    to: Lsn,
    table: &mut BlockRefTable,
) -> Result<u64, String> {
    let mut pages = Pages {
        dir,
        timeline,
        segment_size,
        page_size,
        system_identifier,
        segment: None,
        page_at: None,
        page: Vec::new(),
    };
    let mut at = pages.record_start(from.0)?;
    let mut records = 0;
    let mut rec = Vec::new();
    while at < to.0 {
        pages.read(at, RECORD_HEADER, &mut rec)?;
        let len = u32_at(&rec, 0) as u64;
        if len < RECORD_HEADER as u64 || len > MAX_RECORD || len > to.0 - at {
            return Err(format!("WAL record at {} claims {len} bytes", Lsn(at)));
        }
        let end = pages.read(at, len as usize, &mut rec)?;
        let mut crc_input = Vec::with_capacity(rec.len());
        crc_input.extend_from_slice(&rec[RECORD_HEADER..]);
        crc_input.extend_from_slice(&rec[..20]);
        if crc32c(&crc_input) != u32_at(&rec, 20) {
            return Err(format!("WAL record at {} fails its CRC check", Lsn(at)));
        }
        let (rmid, info) = (rec[17], rec[16]);
        record_changes(&rec, table)
            .map_err(|why| format!("WAL record at {} (resource manager {rmid}): {why}", Lsn(at)))?;
        records += 1;
        at = if rmid == RM_XLOG && info & 0xF0 == XLOG_SWITCH {
            pages.record_start(end.next_multiple_of(segment_size))?
        } else {
            pages.record_start(end)?
        };
    }
    if at != to.0 {
        return Err(format!("the WAL records from {from} end at {}, not at {to}", Lsn(at)));
    }
    Ok(records)
}

/// Marks the blocks of one whole record (header included, its length and
/// CRC already checked); Err when it changes relations in a way its block
/// references do not say, or is malformed.
pub fn record_changes(rec: &[u8], table: &mut BlockRefTable) -> Result<(), String> {
    if rec.len() < RECORD_HEADER {
        return Err(format!("a record of {} bytes", rec.len()));
    }
    let (info, rmid) = (rec[16], rec[17]);
    if info & XLR_SPECIAL_REL_UPDATE != 0 || matches!(rmid, RM_SMGR | RM_DBASE | RM_TBLSPC) {
        return Err("it creates, truncates or drops files".into());
    }
    if rmid == RM_XLOG && info & 0xF0 == XLOG_PARAMETER_CHANGE {
        return Err("it changes server parameters such as wal_level".into());
    }
    let mut pos = RECORD_HEADER;
    let mut data_total: u64 = 0;
    let mut main_len: u64 = 0;
    let mut rel: Option<(u32, u32, u32)> = None;
    let short = || "its block headers end early".to_string();
    let take = |pos: &mut usize, n: usize| -> Result<usize, String> {
        let at = *pos;
        if at + n > rec.len() {
            return Err(short());
        }
        *pos += n;
        Ok(at)
    };
    while ((rec.len() - pos) as u64) > data_total {
        let id = rec[take(&mut pos, 1)?];
        match id {
            XLR_BLOCK_ID_DATA_SHORT => {
                main_len = rec[take(&mut pos, 1)?] as u64;
                data_total += main_len;
                break;
            }
            XLR_BLOCK_ID_DATA_LONG => {
                main_len = u32_at(rec, take(&mut pos, 4)?) as u64;
                data_total += main_len;
                break;
            }
            XLR_BLOCK_ID_ORIGIN => {
                take(&mut pos, 2)?;
            }
            XLR_BLOCK_ID_TOPLEVEL_XID => {
                take(&mut pos, 4)?;
            }
            id if id <= XLR_MAX_BLOCK_ID => {
                let flags = rec[take(&mut pos, 1)?];
                data_total += u16_at(rec, take(&mut pos, 2)?) as u64;
                if flags & BKPBLOCK_HAS_IMAGE != 0 {
                    let image_len = u16_at(rec, take(&mut pos, 2)?);
                    take(&mut pos, 2)?;
                    let image_info = rec[take(&mut pos, 1)?];
                    if image_info & BKPIMAGE_COMPRESSED != 0 && image_info & BKPIMAGE_HAS_HOLE != 0 {
                        take(&mut pos, 2)?;
                    }
                    data_total += image_len as u64;
                }
                if flags & BKPBLOCK_SAME_REL == 0 {
                    let at = take(&mut pos, 12)?;
                    rel = Some((u32_at(rec, at), u32_at(rec, at + 4), u32_at(rec, at + 8)));
                }
                let (spc, db, relnode) = rel.ok_or("a block reference names the relation before it, and none came")?;
                let block = u32_at(rec, take(&mut pos, 4)?);
                let fork = flags & BKPBLOCK_FORK_MASK;
                if fork > 3 || relnode == 0 {
                    return Err(format!("a block reference names fork {fork} of relation {relnode}"));
                }
                table.mark_block(RelFork { spc, db, rel: relnode, fork }, block);
            }
            other => return Err(format!("unknown block id {other}")),
        }
    }
    if (rec.len() - pos) as u64 != data_total {
        return Err(format!("{} bytes follow its headers, which announce {data_total}", rec.len() - pos));
    }
    if rmid == RM_XACT {
        let op = info & XLOG_XACT_OPMASK;
        if op == XLOG_XACT_PREPARE {
            return Err("it prepares a transaction, which may drop relations".into());
        }
        // Commit, abort and their prepared forms: xact_time, then xinfo.
        if op < XLOG_XACT_ASSIGNMENT && info & XLOG_XACT_HAS_INFO != 0 {
            let main = &rec[rec.len() - main_len as usize..];
            if main.len() < 12 {
                return Err("its transaction data is short".into());
            }
            if u32_at(main, 8) & XACT_XINFO_HAS_RELFILENODES != 0 {
                return Err("a transaction that drops relations ends".into());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = 8192;
    const SEG: u64 = 1 << 20;

    /// A record of `rmid`/`info` with one block reference (an image of
    /// `image` bytes and `data` bytes of data) and `main` bytes of main data.
    fn record(rmid: u8, info: u8, block: Option<(u32, u32)>, image: u16, data: u16, main: &[u8]) -> Vec<u8> {
        let mut h = Vec::new();
        let mut payload = Vec::new();
        if let Some((rel, blk)) = block {
            h.push(0u8);
            h.push(if image > 0 { BKPBLOCK_HAS_IMAGE } else { 0 });
            h.extend_from_slice(&data.to_le_bytes());
            if image > 0 {
                h.extend_from_slice(&image.to_le_bytes());
                h.extend_from_slice(&0u16.to_le_bytes());
                h.push(0);
            }
            for v in [1663u32, 5, rel, blk] {
                h.extend_from_slice(&v.to_le_bytes());
            }
            payload.extend(std::iter::repeat_n(0xAB, image as usize + data as usize));
        }
        if !main.is_empty() {
            h.push(XLR_BLOCK_ID_DATA_SHORT);
            h.push(main.len() as u8);
        }
        let mut body = h;
        body.extend_from_slice(&payload);
        body.extend_from_slice(main);
        let mut r = vec![0u8; RECORD_HEADER];
        r[0..4].copy_from_slice(&((RECORD_HEADER + body.len()) as u32).to_le_bytes());
        r[16] = info;
        r[17] = rmid;
        let mut crc_input = body.clone();
        crc_input.extend_from_slice(&r[..20]);
        r[20..24].copy_from_slice(&crc32c(&crc_input).to_le_bytes());
        r.extend_from_slice(&body);
        r
    }

    /// Lays `records` out as PostgreSQL would from the start of segment 1 of
    /// timeline 1 (one 1 MiB segment file in a new directory); returns the
    /// directory, each record's start and the end of the last.
    fn lay_out(name: &str, records: &[Vec<u8>]) -> (std::path::PathBuf, Vec<u64>, u64) {
        let dir = std::env::temp_dir().join(format!("blockstream-wal-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let base = SEG;
        let mut seg = vec![0u8; SEG as usize];
        let mut at = 0u64; // offset in the segment
        let mut starts = Vec::new();
        let write_header = |seg: &mut Vec<u8>, off: u64, rem: u32| {
            let o = off as usize;
            let long = off == 0;
            seg[o..o + 2].copy_from_slice(&0xD110u16.to_le_bytes());
            let info = if long { XLP_LONG_HEADER } else { 0 } | if rem > 0 { XLP_FIRST_IS_CONTRECORD } else { 0 };
            seg[o + 2..o + 4].copy_from_slice(&info.to_le_bytes());
            seg[o + 4..o + 8].copy_from_slice(&1u32.to_le_bytes());
            seg[o + 8..o + 16].copy_from_slice(&(base + off).to_le_bytes());
            seg[o + 16..o + 20].copy_from_slice(&rem.to_le_bytes());
            if long {
                seg[o + 24..o + 32].copy_from_slice(&7u64.to_le_bytes());
                seg[o + 32..o + 36].copy_from_slice(&(SEG as u32).to_le_bytes());
                seg[o + 36..o + 40].copy_from_slice(&(PAGE as u32).to_le_bytes());
                LONG_PAGE_HEADER
            } else {
                SHORT_PAGE_HEADER
            }
        };
        for r in records {
            if at.is_multiple_of(PAGE) {
                at += write_header(&mut seg, at, 0);
            }
            starts.push(base + at);
            let mut left = &r[..];
            while !left.is_empty() {
                if at.is_multiple_of(PAGE) {
                    at += write_header(&mut seg, at, left.len() as u32);
                }
                let n = ((PAGE - at % PAGE) as usize).min(left.len());
                seg[at as usize..at as usize + n].copy_from_slice(&left[..n]);
                at += n as u64;
                left = &left[n..];
            }
            at = at.next_multiple_of(8);
        }
        let end = base + at;
        // The page after the last record, as a server would have begun it.
        if at.is_multiple_of(PAGE) {
            write_header(&mut seg, at, 0);
        }
        std::fs::write(dir.join(wal_file_name(1, 1, SEG)), &seg).unwrap();
        (dir, starts, end)
    }

    fn follow(dir: &Path, from: u64, to: u64) -> (Result<u64, String>, BlockRefTable) {
        let mut t = BlockRefTable::default();
        (changes_between(dir, 1, 7, SEG, PAGE, Lsn(from), Lsn(to), &mut t), t)
    }

    fn key(rel: u32) -> RelFork {
        RelFork { spc: 1663, db: 5, rel, fork: 0 }
    }

    #[test]
    fn follows_records_across_pages() {
        // Images large enough that records span pages, and a short one.
        let recs = vec![
            record(10, 0, Some((16384, 3)), 8000, 40, &[1, 2, 3]),
            record(10, 0, Some((16384, 9)), 0, 20, &[4; 10]),
            record(10, 0, Some((16390, 70_000)), 8192, 0, &[]),
            record(RM_XLOG, 0x10, None, 0, 0, &[0; 88]),
        ];
        let (dir, starts, _) = lay_out("pages", &recs);
        let (n, t) = follow(&dir, starts[0], starts[3]);
        assert_eq!(n.unwrap(), 3);
        assert!(t.get(&key(16384)).unwrap().blocks.contains(3));
        assert!(t.get(&key(16384)).unwrap().blocks.contains(9));
        assert!(t.get(&key(16390)).unwrap().blocks.contains(70_000));
        // From the middle: only what follows.
        let (n, t) = follow(&dir, starts[2], starts[3]);
        assert_eq!(n.unwrap(), 1);
        assert!(t.get(&key(16384)).is_none());
        // A range that does not end at a record's start is refused.
        let (n, _) = follow(&dir, starts[0], starts[3] + 8);
        assert!(n.unwrap_err().contains("claims"), "a record longer than the range");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn refuses_what_it_cannot_follow() {
        let drop_rels = {
            let mut main = vec![0u8; 8];
            main.extend_from_slice(&XACT_XINFO_HAS_RELFILENODES.to_le_bytes());
            record(RM_XACT, XLOG_XACT_HAS_INFO, None, 0, 0, &main)
        };
        let plain_commit = {
            let mut main = vec![0u8; 8];
            main.extend_from_slice(&1u32.to_le_bytes());
            record(RM_XACT, XLOG_XACT_HAS_INFO, None, 0, 0, &main)
        };
        let truncate = record(RM_SMGR, 0x20 | XLR_SPECIAL_REL_UPDATE, None, 0, 0, &[0; 16]);
        let recs = vec![plain_commit, drop_rels, truncate, record(RM_XLOG, 0x10, None, 0, 0, &[0; 8])];
        let (dir, s, _) = lay_out("refuses", &recs);
        assert_eq!(follow(&dir, s[0], s[1]).0.unwrap(), 1);
        assert!(follow(&dir, s[0], s[2]).0.unwrap_err().contains("drops relations"));
        assert!(follow(&dir, s[2], s[3]).0.unwrap_err().contains("creates, truncates or drops"));
        // A flipped bit fails the CRC; a page of another address is refused.
        let path = dir.join(wal_file_name(1, 1, SEG));
        let mut seg = std::fs::read(&path).unwrap();
        let at = (s[0] - SEG) as usize + RECORD_HEADER + 3;
        seg[at] ^= 1;
        std::fs::write(&path, &seg).unwrap();
        assert!(follow(&dir, s[0], s[1]).0.unwrap_err().contains("CRC"));
        seg[at] ^= 1;
        seg[8..16].copy_from_slice(&0u64.to_le_bytes());
        std::fs::write(&path, &seg).unwrap();
        assert!(follow(&dir, s[0], s[1]).0.unwrap_err().contains("recycled"));
        assert!(follow(&dir, s[0], s[1]).1.is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn garbage_never_panics() {
        // Random bytes where the headers are: every outcome is Ok or Err.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for round in 0..200 {
            let mut rec = vec![0u8; 24 + (round % 60)];
            for b in rec.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            let _ = record_changes(&rec, &mut BlockRefTable::default());
        }
    }
}
