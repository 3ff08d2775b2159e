//! WAL records, read from a stopped server's `pg_wal`: which blocks a
//! stretch of WAL changed. A delta restore reads the few records between
//! where pg_blocktrack's summaries end and the server's shutdown checkpoint
//! (the summarizer stops with the other processes at shutdown, before the
//! last of their WAL is flushed), or after a crash on to the end of the
//! valid WAL ([`WalEnd`]).
//!
//! The page and record layouts are xlog_internal.h's and xlogrecord.h's,
//! the same from PostgreSQL 15 to 18. Every page header is checked against
//! the address it was read from (a recycled segment holds old pages), and
//! every record's CRC-32C and link to the record before. Records are read
//! as pg_blocktrack's summarizer (extension/src/wal_records.rs) and
//! PostgreSQL's walsummarizer.c read them ([`record_changes`]); what they
//! would make a gap (a tablespace created or dropped, `wal_level` falling
//! to minimal, an unknown record flagged XLR_SPECIAL_REL_UPDATE) is not
//! followed: the caller then compares every block instead.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{u16_at, u32_at, u64_at};
use crate::blkref::{crc32c, crc32c_append, BlockRefTable, RelFork, FSM_FORK, INIT_FORK, MAIN_FORK, VM_FORK};
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
const WAL_LEVEL_REPLICA: i32 = 1;
const XLOG_SMGR_CREATE: u8 = 0x10;
const XLOG_SMGR_TRUNCATE: u8 = 0x20;
const SMGR_TRUNCATE_HEAP: u32 = 0x0001;
const SMGR_TRUNCATE_VM: u32 = 0x0002;
const XLOG_DBASE_CREATE_FILE_COPY: u8 = 0x00;
const XLOG_DBASE_CREATE_WAL_LOG: u8 = 0x10;
const XLOG_DBASE_DROP: u8 = 0x20;
const XLOG_XACT_OPMASK: u8 = 0x70;
const XLOG_XACT_COMMIT: u8 = 0x00;
const XLOG_XACT_ABORT: u8 = 0x20;
const XLOG_XACT_COMMIT_PREPARED: u8 = 0x30;
const XLOG_XACT_ABORT_PREPARED: u8 = 0x40;
const XLOG_XACT_HAS_INFO: u8 = 0x80;
const XACT_XINFO_HAS_DBINFO: u32 = 1 << 0;
const XACT_XINFO_HAS_SUBXACTS: u32 = 1 << 1;
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
    /// The page starting at `at`, its header checked. A missing segment,
    /// a short one or a page of another address is [`Unread::Invalid`] (where
    /// WAL may end); any other failure to read is [`Unread::Fatal`].
    fn load(&mut self, at: u64) -> Result<(), Unread> {
        if self.page_at == Some(at) {
            return Ok(());
        }
        let segno = at / self.segment_size;
        if self.segment.as_ref().is_none_or(|(s, _)| *s != segno) {
            let name = wal_file_name(self.timeline, segno, self.segment_size);
            let f = safe_fs::open_beneath(self.dir, &name).map_err(|e| {
                if e.is_not_found() {
                    Unread::Invalid(e.to_string())
                } else {
                    Unread::Fatal(e.to_string())
                }
            })?;
            self.segment = Some((segno, f));
        }
        let (_, f) = self.segment.as_ref().expect("just opened");
        self.page.resize(self.page_size as usize, 0);
        let name = || wal_file_name(self.timeline, segno, self.segment_size);
        f.read_exact_at(&mut self.page, at % self.segment_size).map_err(|e| {
            let why = format!("could not read WAL file \"{}\" at {}: {e}", name(), Lsn(at));
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Unread::Invalid(why)
            } else {
                Unread::Fatal(why)
            }
        })?;
        let addr = u64_at(&self.page, 8);
        if addr != at {
            return Err(Unread::Invalid(format!(
                "WAL page {} in \"{}\" is of {} (a recycled file)",
                Lsn(at),
                name(),
                Lsn(addr)
            )));
        }
        let info = u16_at(&self.page, 2);
        if at.is_multiple_of(self.segment_size) {
            let long_ok = info & XLP_LONG_HEADER != 0
                && u64_at(&self.page, 24) == self.system_identifier
                && u32_at(&self.page, 32) as u64 == self.segment_size
                && u32_at(&self.page, 36) as u64 == self.page_size;
            if !long_ok {
                return Err(Unread::Invalid(format!("WAL file \"{}\" is not of this cluster or layout", name())));
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
    fn record_start(&mut self, at: u64) -> Result<u64, Unread> {
        let at = at.next_multiple_of(8);
        if !at.is_multiple_of(self.page_size) {
            return Ok(at);
        }
        self.load(at)?;
        if u16_at(&self.page, 2) & XLP_FIRST_IS_CONTRECORD != 0 {
            return Err(Unread::Invalid(format!("WAL page {} continues a record, where one should start", Lsn(at))));
        }
        Ok(at + self.header_len())
    }

    /// `len` bytes of the record starting at `at` into `out`, across page
    /// headers; returns where the bytes end.
    fn read(&mut self, mut at: u64, len: usize, out: &mut Vec<u8>) -> Result<u64, Unread> {
        out.clear();
        while out.len() < len {
            let off = at % self.page_size;
            let page = at - off;
            self.load(page)?;
            if off == 0 {
                // A record going on from the page before.
                let rem = u32_at(&self.page, 16) as usize;
                if u16_at(&self.page, 2) & XLP_FIRST_IS_CONTRECORD == 0 || rem < len - out.len() {
                    return Err(Unread::Invalid(format!(
                        "WAL page {} does not continue the record before it",
                        Lsn(at)
                    )));
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

/// How far [`changes_between`] follows the WAL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalEnd {
    /// To the start of this record, every record before it read (a clean
    /// shutdown's checkpoint record).
    Record(Lsn),
    /// Every record up to the start of `checkpoint` read, then on to the end
    /// of the valid WAL, as crash recovery finds it: the first record that
    /// cannot be read (a page of another address, a zero or short length, a
    /// wrong link to the record before, a failed CRC) ends it. A record that
    /// reads but goes past `limit` is an error, not an end.
    AfterCheckpoint { checkpoint: Lsn, limit: Lsn },
}

/// Why WAL could not be read.
enum Unread {
    /// No valid record here (where the valid WAL ends, after a crash).
    Invalid(String),
    /// A record larger than what may be read, or a file that could not be
    /// read: never taken for the end of the WAL.
    Fatal(String),
}

impl Unread {
    fn why(self) -> String {
        match self {
            Unread::Invalid(w) | Unread::Fatal(w) => w,
        }
    }
}

/// Reads the whole record starting at `at` into `rec`, checked: its length
/// (no further than `limit`), its link to the record before (`prev`, when
/// known) and its CRC. Returns where it ends.
fn read_record(pages: &mut Pages, at: u64, prev: Option<u64>, limit: u64, rec: &mut Vec<u8>) -> Result<u64, Unread> {
    pages.read(at, RECORD_HEADER, rec)?;
    let len = u32_at(rec, 0) as u64;
    if len < RECORD_HEADER as u64 || len > MAX_RECORD {
        return Err(Unread::Invalid(format!("WAL record at {} claims {len} bytes", Lsn(at))));
    }
    if let Some(p) = prev.filter(|&p| u64_at(rec, 8) != p) {
        return Err(Unread::Invalid(format!(
            "WAL record at {} links to {}, not to the record before it at {}",
            Lsn(at),
            Lsn(u64_at(rec, 8)),
            Lsn(p)
        )));
    }
    if len > limit.saturating_sub(at) {
        return Err(Unread::Fatal(format!("WAL record at {} claims {len} bytes, past {}", Lsn(at), Lsn(limit))));
    }
    let end = pages.read(at, len as usize, rec)?;
    // The CRC covers the data after the header, then the header up to the CRC.
    if crc32c_append(crc32c(&rec[RECORD_HEADER..]), &rec[..20]) != u32_at(rec, 20) {
        return Err(Unread::Invalid(format!("WAL record at {} fails its CRC check", Lsn(at))));
    }
    Ok(end)
}

/// Marks in `table` every block the WAL records from `from` (a record's end,
/// as summaries end) up to `to` change, reading timeline `timeline`'s
/// segment files in `dir`. Returns the number of records read and where the
/// WAL followed ends, or why the range cannot be followed.
#[allow(clippy::too_many_arguments)]
pub fn changes_between(
    dir: &Path,
    timeline: u32,
    system_identifier: u64,
    segment_size: u64,
    page_size: u64,
    from: Lsn,
    to: WalEnd,
    table: &mut BlockRefTable,
) -> Result<(u64, Lsn), String> {
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
    // Records before `must_read` must all be there; past it, with `to_end`,
    // the first one that is not ends the WAL.
    let (must_read, limit, to_end) = match to {
        WalEnd::Record(l) => (l.0, l.0, false),
        WalEnd::AfterCheckpoint { checkpoint, limit } => (checkpoint.0, limit.0, true),
    };
    let mut at = from.0;
    let mut prev = None;
    let mut records = 0;
    let mut rec = Vec::new();
    loop {
        let start = match pages.record_start(at) {
            Ok(s) => s,
            Err(Unread::Invalid(_)) if to_end && at >= must_read => break,
            Err(e) => return Err(e.why()),
        };
        if !to_end && start >= must_read {
            at = start;
            break;
        }
        let end = match read_record(&mut pages, start, prev, limit, &mut rec) {
            Ok(end) => end,
            Err(Unread::Invalid(_)) if to_end && start >= must_read => break,
            Err(e) => return Err(e.why()),
        };
        let (rmid, info) = (rec[17], rec[16]);
        record_changes(&rec, table)
            .map_err(|why| format!("WAL record at {} (resource manager {rmid}): {why}", Lsn(start)))?;
        records += 1;
        prev = Some(start);
        at = if rmid == RM_XLOG && info & 0xF0 == XLOG_SWITCH { end.next_multiple_of(segment_size) } else { end };
    }
    if !to_end && at != must_read {
        return Err(format!("the WAL records from {from} end at {}, not at {}", Lsn(at), Lsn(must_read)));
    }
    Ok((records, Lsn(at)))
}

/// Marks the changes of one whole record (header included, its length and
/// CRC already checked) as PostgreSQL's WAL summarizer and pg_blocktrack's
/// do: every block reference but the free space map's marks its block; a
/// relation created or dropped lowers its forks' limit to 0, a truncation
/// to the new length; CREATE and DROP DATABASE mark the whole database.
/// Err when it changes relation files in a way this does not follow (a
/// tablespace created or dropped, `wal_level` falling to minimal, any other
/// record flagged XLR_SPECIAL_REL_UPDATE), or is malformed.
pub fn record_changes(rec: &[u8], table: &mut BlockRefTable) -> Result<(), String> {
    if rec.len() < RECORD_HEADER {
        return Err(format!("a record of {} bytes", rec.len()));
    }
    let (info, rmid) = (rec[16], rec[17]);
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
                if fork > INIT_FORK || relnode == 0 {
                    return Err(format!("a block reference names fork {fork} of relation {relnode}"));
                }
                // The free space map is compared in full: its changes are not all logged.
                if fork != FSM_FORK {
                    table.mark_block(RelFork { spc, db, rel: relnode, fork }, block);
                }
            }
            other => return Err(format!("unknown block id {other}")),
        }
    }
    if (rec.len() - pos) as u64 != data_total {
        return Err(format!("{} bytes follow its headers, which announce {data_total}", rec.len() - pos));
    }
    let main = &rec[rec.len() - main_len as usize..];
    let need = |n: usize, what: &str| {
        if main.len() < n {
            Err(format!("its {what} data holds {} bytes, fewer than {n}", main.len()))
        } else {
            Ok(())
        }
    };
    let relfork = |at: usize, fork: u8| RelFork {
        spc: u32_at(main, at),
        db: u32_at(main, at + 4),
        rel: u32_at(main, at + 8),
        fork,
    };
    let op = info & 0xF0;
    match rmid {
        RM_SMGR if op == XLOG_SMGR_CREATE => {
            // xl_smgr_create: the relation, then the fork.
            need(16, "relation creation")?;
            let fork = u32_at(main, 12);
            if fork > INIT_FORK as u32 {
                return Err(format!("it creates fork {fork}"));
            }
            if fork as u8 != FSM_FORK {
                table.set_limit(relfork(0, fork as u8), 0);
            }
            return Ok(());
        }
        RM_SMGR if op == XLOG_SMGR_TRUNCATE => {
            // xl_smgr_truncate: the new length, the relation, the forks truncated.
            need(20, "truncation")?;
            let flags = u32_at(main, 16);
            if flags & SMGR_TRUNCATE_HEAP != 0 {
                table.set_limit(relfork(4, MAIN_FORK), u32_at(main, 0));
            }
            if flags & SMGR_TRUNCATE_VM != 0 {
                table.set_limit(relfork(4, VM_FORK), 0);
            }
            return Ok(());
        }
        RM_XACT => {
            for r in dropped_relations(info, main)? {
                for fork in [MAIN_FORK, VM_FORK, INIT_FORK] {
                    table.set_limit(RelFork { fork, ..r }, 0);
                }
            }
            return Ok(());
        }
        RM_DBASE => {
            match op {
                XLOG_DBASE_CREATE_FILE_COPY | XLOG_DBASE_CREATE_WAL_LOG => {
                    // Both start with the new database's OID and tablespace.
                    need(8, "database creation")?;
                    table.mark_database(u32_at(main, 4), u32_at(main, 0));
                }
                XLOG_DBASE_DROP => {
                    // The database, how many tablespaces, then each of them.
                    need(8, "database drop")?;
                    let n = u32_at(main, 4) as usize;
                    if n > (main.len() - 8) / 4 {
                        return Err(format!("it drops a database from {n} tablespaces, more than its data holds"));
                    }
                    for i in 0..n {
                        table.mark_database(u32_at(main, 8 + 4 * i), u32_at(main, 0));
                    }
                }
                other => return Err(format!("an unknown database record (info 0x{other:02x})")),
            }
            return Ok(());
        }
        RM_TBLSPC => return Err("it creates or drops a tablespace".into()),
        RM_XLOG if op == XLOG_PARAMETER_CHANGE => {
            // xl_parameter_change: wal_level after five ints.
            need(24, "parameter change")?;
            let level = u32_at(main, 20) as i32;
            if level < WAL_LEVEL_REPLICA {
                return Err(format!("wal_level fell to minimal (level {level})"));
            }
            return Ok(());
        }
        _ => {}
    }
    if info & XLR_SPECIAL_REL_UPDATE != 0 {
        return Err(format!("it changes relation files in a way not followed here (info 0x{info:02x})"));
    }
    Ok(())
}

/// The relations a commit or abort record (`main`, its main data) drops,
/// as ParseCommitRecord and ParseAbortRecord read them: xact_time, xinfo,
/// then the database, the subtransactions and the relations, each when
/// xinfo says it is there.
fn dropped_relations(info: u8, main: &[u8]) -> Result<Vec<RelFork>, String> {
    let op = info & XLOG_XACT_OPMASK;
    let ends = matches!(op, XLOG_XACT_COMMIT | XLOG_XACT_ABORT | XLOG_XACT_COMMIT_PREPARED | XLOG_XACT_ABORT_PREPARED);
    if !ends || info & XLOG_XACT_HAS_INFO == 0 {
        return Ok(Vec::new());
    }
    let short = || format!("its transaction data ({} bytes) ends early", main.len());
    let word = |at: usize| if at + 4 <= main.len() { Ok(u32_at(main, at)) } else { Err(short()) };
    let xinfo = word(8)?;
    let mut at = 12;
    if xinfo & XACT_XINFO_HAS_DBINFO != 0 {
        at += 8;
    }
    if xinfo & XACT_XINFO_HAS_SUBXACTS != 0 {
        let n = word(at)? as usize;
        at = n.checked_mul(4).and_then(|b| b.checked_add(at + 4)).filter(|&e| e <= main.len()).ok_or_else(short)?;
    }
    if xinfo & XACT_XINFO_HAS_RELFILENODES == 0 {
        return Ok(Vec::new());
    }
    let n = word(at)? as usize;
    at += 4;
    if n > (main.len() - at) / 12 {
        return Err(short());
    }
    Ok((0..n)
        .map(|i| {
            let r = at + 12 * i;
            RelFork { spc: u32_at(main, r), db: u32_at(main, r + 4), rel: u32_at(main, r + 8), fork: MAIN_FORK }
        })
        .collect())
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

    /// `r` with its link to the record before set to `prev`, its CRC made again.
    fn relink(r: &[u8], prev: u64) -> Vec<u8> {
        let mut r = r.to_vec();
        r[8..16].copy_from_slice(&prev.to_le_bytes());
        let mut crc_input = r[RECORD_HEADER..].to_vec();
        crc_input.extend_from_slice(&r[..20]);
        let crc = crc32c(&crc_input);
        r[20..24].copy_from_slice(&crc.to_le_bytes());
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
            // Linked to the record before, as PostgreSQL links them.
            let r = relink(r, starts.last().copied().unwrap_or(0));
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
        let r = changes_between(dir, 1, 7, SEG, PAGE, Lsn(from), WalEnd::Record(Lsn(to)), &mut t);
        (r.map(|(n, _)| n), t)
    }

    /// To the end of the valid WAL after the checkpoint record at `checkpoint`.
    fn to_end(dir: &Path, from: u64, checkpoint: u64, limit: u64) -> (Result<(u64, Lsn), String>, BlockRefTable) {
        let mut t = BlockRefTable::default();
        let to = WalEnd::AfterCheckpoint { checkpoint: Lsn(checkpoint), limit: Lsn(limit) };
        (changes_between(dir, 1, 7, SEG, PAGE, Lsn(from), to, &mut t), t)
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
        let rel = |r: u32| [1663u32, 5, r].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
        // A commit (database info, two subtransactions) that drops two relations.
        let drop_rels = {
            let mut main = vec![0u8; 8];
            let xinfo = XACT_XINFO_HAS_DBINFO | XACT_XINFO_HAS_SUBXACTS | XACT_XINFO_HAS_RELFILENODES;
            main.extend_from_slice(&xinfo.to_le_bytes());
            main.extend_from_slice(&[5, 0, 0, 0, 0x7F, 6, 0, 0]);
            main.extend_from_slice(&2u32.to_le_bytes());
            main.extend_from_slice(&[0; 8]);
            main.extend_from_slice(&2u32.to_le_bytes());
            main.extend(rel(16400));
            main.extend(rel(16401));
            record(RM_XACT, XLOG_XACT_COMMIT | XLOG_XACT_HAS_INFO, None, 0, 0, &main)
        };
        let plain_commit = {
            let mut main = vec![0u8; 8];
            main.extend_from_slice(&1u32.to_le_bytes());
            main.extend_from_slice(&[0; 8]);
            record(RM_XACT, XLOG_XACT_HAS_INFO, None, 0, 0, &main)
        };
        // pgbench_history truncated to 7 blocks, with its visibility map.
        let truncate = {
            let mut main = 7u32.to_le_bytes().to_vec();
            main.extend(rel(16410));
            main.extend_from_slice(&(SMGR_TRUNCATE_HEAP | SMGR_TRUNCATE_VM).to_le_bytes());
            record(RM_SMGR, XLOG_SMGR_TRUNCATE | XLR_SPECIAL_REL_UPDATE, None, 0, 0, &main)
        };
        let create = {
            let mut main = rel(16420);
            main.extend_from_slice(&0u32.to_le_bytes());
            record(RM_SMGR, XLOG_SMGR_CREATE | XLR_SPECIAL_REL_UPDATE, None, 0, 0, &main)
        };
        let create_db = record(RM_DBASE, XLOG_DBASE_CREATE_WAL_LOG, None, 0, 0, &[0x10, 0x40, 0, 0, 0x7F, 6, 0, 0]);
        let tablespace = record(RM_TBLSPC, 0, None, 0, 0, &[0; 8]);
        let unknown = record(99, XLR_SPECIAL_REL_UPDATE, None, 0, 0, &[0; 8]);
        let minimal = {
            let mut main = vec![0u8; 20];
            main.extend_from_slice(&0u32.to_le_bytes());
            main.extend_from_slice(&[0; 4]);
            record(RM_XLOG, XLOG_PARAMETER_CHANGE, None, 0, 0, &main)
        };
        let short_drop = record(RM_XACT, XLOG_XACT_ABORT | XLOG_XACT_HAS_INFO, None, 0, 0, &{
            let mut main = vec![0u8; 8];
            main.extend_from_slice(&XACT_XINFO_HAS_RELFILENODES.to_le_bytes());
            main.extend_from_slice(&1000u32.to_le_bytes());
            main
        });
        let recs = vec![
            plain_commit,
            drop_rels,
            truncate,
            create,
            create_db,
            tablespace,
            unknown,
            minimal,
            short_drop,
            record(RM_XLOG, 0x10, None, 0, 0, &[0; 8]),
        ];
        let (dir, s, _) = lay_out("refuses", &recs);
        let (n, t) = follow(&dir, s[0], s[5]);
        assert_eq!(n.unwrap(), 5);
        let limit = |r: u32, fork: u8| t.get(&RelFork { spc: 1663, db: 5, rel: r, fork }).and_then(|c| c.limit);
        for fork in [MAIN_FORK, VM_FORK, INIT_FORK] {
            assert_eq!(limit(16400, fork), Some(0));
            assert_eq!(limit(16401, fork), Some(0));
        }
        assert_eq!((limit(16410, MAIN_FORK), limit(16410, VM_FORK)), (Some(7), Some(0)));
        assert_eq!(limit(16420, MAIN_FORK), Some(0));
        assert!(t.get(&RelFork::database(1663, 0x4010)).is_some(), "the new database is marked whole");
        assert!(follow(&dir, s[5], s[6]).0.unwrap_err().contains("tablespace"));
        assert!(follow(&dir, s[6], s[7]).0.unwrap_err().contains("not followed here"));
        assert!(follow(&dir, s[7], s[8]).0.unwrap_err().contains("wal_level fell to minimal"));
        assert!(follow(&dir, s[8], s[9]).0.unwrap_err().contains("ends early"));
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

    /// After a crash: every record to the last checkpoint must read; after
    /// it, the WAL ends where a record does not (zeros, a record of
    /// another time that does not link to the one before, a recycled page),
    /// and what the records before that end change is marked.
    #[test]
    fn follows_a_crashed_server_to_the_end_of_its_wal() {
        let checkpoint = record(RM_XLOG, 0x10, None, 0, 0, &[0; 88]);
        let recs = vec![
            record(10, 0, Some((16384, 3)), 0, 40, &[1]),
            checkpoint,
            record(10, 0, Some((16384, 9)), 8000, 20, &[2]),
            record(10, 0, Some((16390, 5)), 0, 20, &[3]),
        ];
        let (dir, s, end) = lay_out("crash", &recs);
        let limit = SEG + (64 << 10);
        // Zeros after the last record end the WAL there.
        let ends_at = |r: (u64, Lsn)| (r.0, r.1 .0.next_multiple_of(8));
        let (r, t) = to_end(&dir, s[0], s[1], limit);
        assert_eq!(ends_at(r.unwrap()), (4, end));
        for (rel, blk) in [(16384, 3), (16384, 9), (16390, 5)] {
            assert!(t.get(&key(rel)).unwrap().blocks.contains(blk), "{rel} block {blk}");
        }
        // Summaries that end past the checkpoint: only what follows them.
        let (r, t) = to_end(&dir, s[3], s[1], limit);
        assert_eq!(ends_at(r.unwrap()), (1, end));
        assert!(t.get(&key(16384)).is_none());
        // And when they end at the end of the WAL: nothing more.
        assert_eq!(to_end(&dir, end, s[1], limit).0.unwrap(), (0, Lsn(end)));
        // A valid record of another time where the WAL goes on: its link to
        // the record before is wrong, so the WAL ends before it.
        let path = dir.join(wal_file_name(1, 1, SEG));
        let mut seg = std::fs::read(&path).unwrap();
        let stale = relink(&record(10, 0, Some((16500, 1)), 0, 8, &[]), 0x1234_5678);
        let at = (end.next_multiple_of(8) - SEG) as usize;
        seg[at..at + stale.len()].copy_from_slice(&stale);
        std::fs::write(&path, &seg).unwrap();
        let (r, t) = to_end(&dir, s[0], s[1], limit);
        assert_eq!(ends_at(r.unwrap()), (4, end));
        assert!(t.get(&key(16500)).is_none());
        // The same linked to the record before is followed.
        let linked = relink(&stale, s[3]);
        seg[at..at + linked.len()].copy_from_slice(&linked);
        std::fs::write(&path, &seg).unwrap();
        assert_eq!(to_end(&dir, s[0], s[1], limit).0.unwrap().0, 5);
        // A record that reads but goes past the limit is no end: an error.
        let err = to_end(&dir, s[0], s[1], s[3] + 8).0.unwrap_err();
        assert!(err.contains("past"), "{err}");
        // Before the checkpoint every record must read: a damaged one is an error.
        let first = (s[0] - SEG) as usize + RECORD_HEADER + 1;
        seg[first] ^= 1;
        std::fs::write(&path, &seg).unwrap();
        assert!(to_end(&dir, s[0], s[1], limit).0.unwrap_err().contains("CRC"));
        // After it, a damaged record ends the WAL before it.
        seg[first] ^= 1;
        let third = (s[3] - SEG) as usize + RECORD_HEADER + 1;
        seg[third] ^= 1;
        std::fs::write(&path, &seg).unwrap();
        let (n, at) = to_end(&dir, s[0], s[1], limit).0.unwrap();
        assert!(n == 3 && at > Lsn(s[2]) && at <= Lsn(s[3]), "{n} records to {at}");
        // No segment where the WAL would go on: it ends there. One that is
        // there but cannot be read is an error, never an end.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(to_end(&dir, s[2], s[1], limit).0.unwrap(), (0, Lsn(s[2])));
        std::fs::create_dir(&path).unwrap();
        assert!(to_end(&dir, s[2], s[1], limit).0.is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Segments with random bytes changed, followed both ways: every
    /// outcome is Ok or Err, and what is read stays within the limit.
    #[test]
    fn damaged_segments_never_panic() {
        let recs: Vec<Vec<u8>> = (0..40u32)
            .map(|i| record(10, 0, Some((16384, i)), if i % 3 == 0 { 8000 } else { 0 }, 30, &[7; 9]))
            .collect();
        let (dir, s, end) = lay_out("damaged", &recs);
        let path = dir.join(wal_file_name(1, 1, SEG));
        let clean = std::fs::read(&path).unwrap();
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        for _ in 0..300 {
            let mut seg = clean.clone();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = (x % (end - SEG + 64)) as usize;
                seg[at] ^= (x >> 32) as u8 | 1;
            }
            std::fs::write(&path, &seg).unwrap();
            let _ = follow(&dir, s[0], s[39]);
            if let Ok((n, at)) = to_end(&dir, s[0], s[5], SEG + (256 << 10)).0 {
                assert!(n <= 40 && at.0 <= end + 8192, "{n} records to {at}");
            }
        }
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
