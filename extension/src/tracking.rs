//! What the SQL functions ask of the tracker: its status, its summaries, the
//! blocks changed between two LSNs, waiting for summaries to reach an LSN, and
//! whether an incremental backup can build on a parent.

use std::time::{Duration, Instant};

use blockstream::blkref::{covering, list_summaries, read_summary, BlockRefTable, SummaryFile, MAIN_FORK};
use blockstream::lsn::Lsn;
use blockstream::timeline::History;
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::errors::raise;
use crate::status::{wake_summarizer, STATUS};
use crate::summarizer::summaries_dir;

/// `PG_15_<catalog version>`: the directory a tablespace holds for this server.
pub fn tablespace_dir() -> String {
    format!("PG_{}_{}", pg_sys::PG_VERSION_NUM / 10000, pg_sys::CATALOG_VERSION_NO)
}

pub fn flush_lsn() -> Lsn {
    wal_end().0
}

/// The end of WAL this server has, and its timeline: what is flushed on a
/// primary, what is replayed on a standby (WAL received but not replayed yet
/// may still be overwritten by a restart of the stream).
pub fn wal_end() -> (Lsn, u32) {
    let mut tli: pg_sys::TimeLineID = 0;
    // SAFETY: plain reads of shared state.
    let lsn = unsafe {
        if pg_sys::RecoveryInProgress() {
            pg_sys::GetXLogReplayRecPtr(&mut tli)
        } else {
            pg_sys::GetFlushRecPtr(&mut tli)
        }
    };
    (Lsn(lsn), tli)
}

/// Timeline `tli` and its history, from this server's `pg_wal`. Timeline 1
/// has none; any other needs its history file (a promotion writes it, a
/// standby fetches it before following the timeline).
pub fn history(tli: u32) -> Result<History, String> {
    // SAFETY: DataDir is set (absolute) before any backend or worker runs.
    let dd = unsafe { std::ffi::CStr::from_ptr(pg_sys::DataDir) };
    blockstream::timeline::read_history(&std::path::Path::new(&*dd.to_string_lossy()).join("pg_wal"), tli)
}

/// The history of the timeline this server writes (or replays) now.
pub fn current_history() -> Result<History, String> {
    history(wal_end().1)
}

/// Asks the summarizer for a summary ending at or after `lsn` and waits for
/// it, up to `timeout`. Err says how far it got and why.
pub fn wait_for_summary(lsn: Lsn, timeout: Duration) -> Result<Lsn, String> {
    {
        let mut st = STATUS.exclusive();
        if Lsn(st.summarized_lsn) >= lsn {
            return Ok(Lsn(st.summarized_lsn));
        }
        st.flush_request = st.flush_request.max(lsn.0);
    }
    wake_summarizer();
    let began = Instant::now();
    loop {
        let (summarized, pid, err) = {
            let st = STATUS.share();
            (Lsn(st.summarized_lsn), st.pid, st.error())
        };
        if summarized >= lsn {
            return Ok(summarized);
        }
        if began.elapsed() >= timeout {
            let why = if pid == 0 {
                match err {
                    Some(e) => format!(" (the summarizer is not running; its last error: {e})"),
                    None => " (the summarizer is not running)".to_string(),
                }
            } else {
                String::new()
            };
            return Err(format!(
                "WAL is summarized up to {summarized}, not yet to {lsn}, after {} ms{why}",
                timeout.as_millis()
            ));
        }
        // SAFETY: waiting on our own latch, as any backend may.
        unsafe {
            pg_sys::WaitLatch(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                20,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
        check_for_interrupts!();
    }
}

/// Merged changes over `[since, until)` in this server's WAL history, or why
/// they are not known. `since_tli`, when given, is the timeline `since` was
/// read on: it must be this server's, or an ancestor it left after `since`.
pub fn changes_between(
    since: Lsn,
    until: Lsn,
    since_tli: Option<u32>,
) -> Result<(BlockRefTable, Vec<SummaryFile>), String> {
    let history = current_history()?;
    if let Some(t) = since_tli {
        history
            .holds(t, since)
            .map_err(|why| format!("{since} on timeline {t} is not in this server's history: {why}"))?;
    }
    let (valid_since, sysid) = {
        let st = STATUS.share();
        // SAFETY: a plain read of the control data.
        (Lsn(st.valid_since), unsafe { pg_sys::GetSystemIdentifier() })
    };
    if since < valid_since {
        return Err(format!("changes are tracked without a gap only since {valid_since}, after {since}"));
    }
    let files = list_summaries(&summaries_dir()).map_err(|e| e.to_string())?;
    let chosen = covering(&files, &history, since, until)?;
    let mut merged = BlockRefTable::default();
    for f in &chosen {
        let (h, t) = read_summary(&f.path).map_err(|e| e.to_string())?;
        if h.gap {
            return Err(format!("changes between {} and {} are unknown (a tracking gap)", h.start, h.end));
        }
        if h.system_identifier != sysid {
            return Err(format!(
                "summary \"{}\" belongs to system {}, not {sysid}",
                f.path.display(),
                h.system_identifier
            ));
        }
        merged.merge(&t);
    }
    Ok((merged, chosen))
}

/// What backup_start is told of a parent backup.
#[derive(Clone, Copy, Debug)]
pub struct Parent {
    pub start: Lsn,
    pub timeline: Option<u32>,
    pub stop: Option<Lsn>,
    /// The parent's checkpoint record: LSN and CRC.
    pub checkpoint: Option<(Lsn, u32)>,
}

/// Whether an incremental backup starting at `start` can build on `parent`;
/// the reason when not. The changes since the parent must be known without
/// a gap, and the parent must lie in this server's WAL history: it ends
/// before this backup starts (as PostgreSQL 17 requires), and its
/// checkpoint record, same LSN and same CRC, is among those the summaries
/// between it and now recorded. A data directory put back from a snapshot,
/// a copy started without a new timeline, or another server promoted onto
/// the same timeline write other records at those LSNs.
pub fn incremental_check(parent: Option<Parent>, start: Lsn, start_tli: u32, timeout: Duration) -> (bool, String) {
    let Some(p) = parent else {
        return (false, "no parent backup given".into());
    };
    // A parent on an ancestor timeline is in this server's history when it
    // ended before the switch point (PostgreSQL 17's rule for its own
    // incrementals): the WAL up to there is the same on both timelines.
    if let Some(t) = p.timeline.filter(|t| *t != start_tli) {
        let end = p.stop.unwrap_or(p.start);
        if let Err(why) = history(start_tli).and_then(|h| h.holds(t, end)) {
            return (
                false,
                format!("the parent backup is on timeline {t}, the server on {start_tli}, and the parent is not in its history: {why}"),
            );
        }
    }
    if p.start > start {
        return (false, format!("the parent backup starts at {}, after this backup's start {start}", p.start));
    }
    if let Some(stop) = p.stop {
        if stop > start {
            return (
                false,
                format!(
                    "the parent backup ends at {stop}, after this backup's start {start}: it does not come before this backup in this server's history"
                ),
            );
        }
    }
    if let Err(why) = wait_for_summary(start, timeout) {
        return (false, why);
    }
    let table = match changes_between(p.start, start, p.timeline) {
        Ok((t, _)) => t,
        Err(why) => return (false, why),
    };
    let Some((lsn, crc)) = p.checkpoint else {
        return (false, "the parent backup records no checkpoint to prove it lies in this server's WAL history".into());
    };
    match table.checkpoints().iter().find(|(l, _)| *l == lsn) {
        Some((_, c)) if *c == crc => (true, String::new()),
        Some((_, c)) => (
            false,
            format!(
                "the parent backup's checkpoint record at {lsn} has CRC {crc:08x}, but this server's WAL has one with CRC {c:08x} there: the parent comes from another WAL history (a data directory put back from a snapshot, or another server on the same timeline)"
            ),
        ),
        None => (
            false,
            format!(
                "the parent backup's checkpoint record at {lsn} is not in this server's WAL history from {} to {start}: the parent comes from another history",
                p.start
            ),
        ),
    }
}

/// One row of changed_blocks().
pub struct SegmentChanges {
    pub path: String,
    pub spc: u32,
    pub db: u32,
    pub rel: u32,
    pub fork: u8,
    pub segno: u32,
    pub limit_block: Option<u32>,
    pub full_copy: bool,
    pub blocks: Vec<u32>,
}

/// Rows per segment file: blocks relative to the segment; `limit_block` is the
/// fork's limit (an absolute block number); `full_copy` when the segment
/// starts at or past the limit. Segments past the limit that have no row must
/// be copied in full too. A whole-database entry is one row with relfilenode 0.
pub fn segment_rows(table: &BlockRefTable) -> Vec<SegmentChanges> {
    let tsdir = tablespace_dir();
    let mut rows = Vec::new();
    for (k, c) in table.sorted() {
        if k.is_database() {
            rows.push(SegmentChanges {
                path: k.path(0, &tsdir),
                spc: k.spc,
                db: k.db,
                rel: 0,
                fork: MAIN_FORK,
                segno: 0,
                limit_block: Some(0),
                full_copy: true,
                blocks: Vec::new(),
            });
            continue;
        }
        // Segments of this server's own RELSEG_SIZE (--with-segsize changes it).
        let relseg = pg_sys::RELSEG_SIZE;
        let mut per_seg: std::collections::BTreeMap<u32, Vec<u32>> = std::collections::BTreeMap::new();
        for b in c.blocks.iter() {
            per_seg.entry(b / relseg).or_default().push(b % relseg);
        }
        if let Some(l) = c.limit {
            per_seg.entry(l / relseg).or_default();
        }
        for (segno, blocks) in per_seg {
            rows.push(SegmentChanges {
                path: k.path(segno, &tsdir),
                spc: k.spc,
                db: k.db,
                rel: k.rel,
                fork: k.fork,
                segno,
                limit_block: c.limit,
                full_copy: c.limit.is_some_and(|l| l as u64 <= segno as u64 * relseg as u64),
                blocks,
            });
        }
    }
    rows
}

pub fn check_range(since: Option<Lsn>, until: Option<Lsn>) -> (Lsn, Lsn) {
    let (Some(since), Some(until)) = (since, until) else {
        raise(PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED, "since_lsn and until_lsn must not be NULL", None);
    };
    if since > until {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("since_lsn {since} is after until_lsn {until}"),
            Some("give the older LSN first"),
        );
    }
    let flush = flush_lsn();
    if until > flush {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("until_lsn {until} is in the future: WAL ends at {flush}"),
            None,
        );
    }
    (since, until)
}
