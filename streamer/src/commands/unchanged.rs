//! What a delta restore may keep of its target without reading it: the
//! blocks the target's own change tracking proves unchanged since the
//! restored backup started.
//!
//! The case is a failed primary, or any copy of the backed-up cluster that
//! went on after the backup, brought back to the backup's point. When the
//! target
//! - is the same cluster (system identifier) and a primary, shut down
//!   cleanly (every change to its files is in WAL before its shutdown
//!   checkpoint) or not (a crash: a page reaches the disk only after the
//!   WAL that changed it, so every change is in the WAL up to where its
//!   valid WAL ends, which is where crash recovery would end it); a
//!   standby's data directory is compared in full: what it replayed past
//!   its last restartpoint is not proven here yet;
//! - logs hint-bit changes (data checksums or `wal_log_hints`): the first
//!   hint-bit change to a page after a checkpoint writes the page to WAL,
//!   and a later one touches a page already in WAL since that checkpoint;
//! - has a WAL history that holds the backup's timeline up to where it
//!   started, pg_blocktrack summaries of its WAL from there on, none of
//!   them a gap, and the WAL after them in pg_wal (the summarizer stops
//!   with the other processes at shutdown, before they are done writing):
//!   up to the shutdown checkpoint, or after a crash every record up to
//!   the last checkpoint and on to the end of the valid WAL, read with
//!   [`crate::wal`];
//!
//! then a block none of those summaries names holds what it held when the
//! backup started. That is a valid copy of the block for the backup, as
//! the copy the backup read was: recovery replays every change from the
//! backup's start, and a block's first change after a checkpoint carries
//! the whole page. pg_rewind relies on the same rule, and incremental
//! backups on this very one. Forks that are not main forks, non-relation
//! files, files of a database created or dropped since, segments at or
//! past a truncation are compared in full as before.
//!
//! Anything short of that is no error: the restore compares every block,
//! and says why.

use std::path::Path;

use crate::blkref::{covering, decode_summary, list_summaries, BlockRefTable, TrackerState};
use crate::lsn::Lsn;
use crate::manifest::{Incremental, Manifest};
use crate::pg_control::{
    ControlFile, IN_ARCHIVE_RECOVERY, IN_CRASH_RECOVERY, IN_PRODUCTION, SHUTTING_DOWN, SHUT_DOWN, SHUT_DOWN_IN_RECOVERY,
};
use crate::plan::{ChangeSet, FileCopy, Planner};
use crate::safe_fs;
use crate::timeline::{read_history, History};
use crate::wal::{self, WalEnd};

/// Where pg_blocktrack keeps its state and summaries in a data directory.
const TRACKING_DIR: &str = "pg_blocktrack";

/// Summary files read at most, in all (a week of a busy server's summaries
/// comes to a few MiB).
const MAX_SUMMARY_TOTAL: u64 = 1 << 30;

/// WAL after the summaries read at most (a summarizer that fell behind
/// this far is better replaced by comparing); it also bounds the largest
/// record read into memory.
const MAX_TAIL: u64 = 64 << 20;

/// The target's WAL directory: `pg_wal`, or where its link points (initdb
/// -X makes one); an absolute link only.
fn wal_dir(target: &Path) -> std::result::Result<std::path::PathBuf, String> {
    let p = target.join("pg_wal");
    let md = p.symlink_metadata().map_err(|e| format!("the target's pg_wal: {e}"))?;
    if md.is_dir() {
        return Ok(p);
    }
    if md.file_type().is_symlink() {
        let to = std::fs::read_link(&p).map_err(|e| format!("the target's pg_wal: {e}"))?;
        if to.is_absolute() {
            return Ok(to);
        }
    }
    Err("the target's pg_wal is neither a directory nor an absolute link to one".into())
}

/// Per file of the restored backup: the blocks of it that may differ in the
/// target (`None`: compare all of it).
pub struct TargetChanges {
    pub files: Vec<Option<Incremental>>,
    /// What proved it, for the report.
    pub basis: String,
}

impl TargetChanges {
    /// Whether block `block` of file `index` may differ in the target.
    pub fn may_differ(&self, index: usize, block: u32) -> bool {
        self.files[index].as_ref().is_none_or(|inc| inc.holds(block))
    }
}

/// The blocks of the target `target` that may differ from backup `m`, or why
/// the target's change tracking cannot tell.
pub fn target_changes(target: &Path, m: &Manifest) -> std::result::Result<TargetChanges, String> {
    let control = safe_fs::read_beneath(target, "global/pg_control", crate::pg_control::MAX_LEN as u64)
        .and_then(|b| ControlFile::parse(&b, &target.join("global/pg_control").display()))
        .map_err(|e| format!("the target's control file: {e}"))?;
    if control.system_identifier != m.system_identifier {
        return Err(format!(
            "the target is another cluster (system identifier {}, the backup's {})",
            control.system_identifier, m.system_identifier
        ));
    }
    if control.block_size != m.block_size || control.relseg_size != m.relseg_size {
        return Err("the target's block or segment size is not the backup's".into());
    }
    // A primary shut down cleanly: every change to its files is in WAL
    // before its shutdown checkpoint record. One that crashed: every change
    // is in WAL before the end of its valid WAL, which follows its last
    // checkpoint record.
    let until = control.checkpoint;
    let crashed = match control.state {
        SHUT_DOWN => false,
        SHUTTING_DOWN | IN_CRASH_RECOVERY | IN_PRODUCTION => true,
        SHUT_DOWN_IN_RECOVERY | IN_ARCHIVE_RECOVERY => {
            return Err(format!(
                "the target is a standby (stopped in recovery at {}); this version relies only on a primary's tracking",
                control.min_recovery_point
            ))
        }
        s => return Err(format!("the target stopped while starting up (control file state {s})")),
    };
    // A copy older than the backup never went through its start: nothing
    // in its tracking speaks of the backup's blocks.
    if until < m.start_lsn {
        return Err(format!(
            "the target's last checkpoint at {until} is before the backup started at {}: it is an older copy",
            m.start_lsn
        ));
    }
    if control.data_checksum_version == 0 && !control.wal_log_hints {
        return Err(
            "the target has neither data checksums nor wal_log_hints: hint-bit changes are not in its WAL".into()
        );
    }
    let history = if control.timeline <= 1 {
        History::only(control.timeline)
    } else {
        read_history(&wal_dir(target)?, control.timeline).map_err(|e| format!("the target's WAL: {e}"))?
    };
    history
        .holds(m.timeline, m.start_lsn)
        .map_err(|why| format!("the backup is not in the target's history: {why}"))?;

    // The tracking directory must be the target's own, not a link elsewhere.
    for dir in [TRACKING_DIR.to_string(), format!("{TRACKING_DIR}/summaries")] {
        match target.join(&dir).symlink_metadata() {
            Ok(md) if md.is_dir() => {}
            Ok(_) => return Err(format!("the target's {dir} is not a directory")),
            Err(_) => return Err(format!("the target has no {dir}: pg_blocktrack did not track it")),
        }
    }
    let tracking = target.join(TRACKING_DIR);
    let state_rel = format!("{TRACKING_DIR}/state");
    let state = safe_fs::read_beneath(target, &state_rel, 64)
        .and_then(|b| TrackerState::decode(&b, &target.join(&state_rel).display()))
        .map_err(|e| e.to_string())?;
    if state.system_identifier != m.system_identifier {
        return Err(format!("the target's {TRACKING_DIR}/state is of another cluster"));
    }
    if state.valid_since > m.start_lsn {
        return Err(format!(
            "the target's summaries are unbroken only since {}, after the backup started at {}",
            state.valid_since, m.start_lsn
        ));
    }
    let files = list_summaries(&tracking.join("summaries")).map_err(|e| e.to_string())?;
    let total: u64 = files.iter().map(|f| f.bytes).sum();
    if total > MAX_SUMMARY_TOTAL {
        return Err(format!(
            "the target's summaries come to {total} bytes, more than the {MAX_SUMMARY_TOTAL} read for a delta"
        ));
    }
    // The summarizer stops with the other processes at shutdown: the last
    // of their WAL, up to the checkpoint, is read from pg_wal below. After
    // a crash the summaries may end past the last checkpoint.
    let summarized =
        files.iter().filter(|f| history.holds(f.timeline, f.end).is_ok()).map(|f| f.end).max().unwrap_or(m.start_lsn);
    let summarized = if crashed { summarized.max(m.start_lsn) } else { summarized.clamp(m.start_lsn, until) };
    let chosen = covering(&files, &history, m.start_lsn, summarized).map_err(|why| format!("the target's {why}"))?;
    let mut table = BlockRefTable::default();
    for f in &chosen {
        // Below the target, following no link on the way.
        let name = f.path.file_name().and_then(|n| n.to_str()).ok_or("a summary file name is not text")?;
        let rel = format!("{TRACKING_DIR}/summaries/{name}");
        let (h, t) = safe_fs::read_beneath(target, &rel, MAX_SUMMARY_TOTAL)
            .and_then(|b| decode_summary(&b, &f.path.display()))
            .map_err(|e| e.to_string())?;
        if h.system_identifier != m.system_identifier {
            return Err(format!("summary \"{}\" is of another cluster", f.path.display()));
        }
        if (h.timeline, h.start, h.end) != (f.timeline, f.start, f.end) {
            return Err(format!(
                "summary \"{}\" covers {} to {}, not what its name says",
                f.path.display(),
                h.start,
                h.end
            ));
        }
        if h.gap {
            return Err(format!("summary \"{}\" marks a gap in the target's tracking", f.path.display()));
        }
        table.merge(&t);
    }
    let mut tail_records = 0;
    let mut followed_to = until;
    if crashed || summarized < until {
        let limit = Lsn(summarized.0.saturating_add(MAX_TAIL));
        if until > limit {
            return Err(format!(
                "the target's WAL is summarized up to {summarized}, more than {} MiB before its last checkpoint at {until}",
                MAX_TAIL >> 20
            ));
        }
        if history.timeline_of(summarized) != control.timeline {
            return Err(format!("the target's WAL from {summarized} to {until} spans a timeline switch"));
        }
        let dir = wal_dir(target)?;
        let to = if crashed { WalEnd::AfterCheckpoint { checkpoint: until, limit } } else { WalEnd::Record(until) };
        (tail_records, followed_to) = wal::changes_between(
            &dir,
            control.timeline,
            m.system_identifier,
            control.wal_segment_size as u64,
            control.wal_block_size as u64,
            summarized,
            to,
            &mut table,
        )
        .map_err(|why| format!("the target's WAL after its summaries: {why}"))?;
    }
    let tablespace_dir = format!("PG_{}_{}", m.pg_version_num / 10000, control.catalog_version);
    let changes = ChangeSet::from_table(&table, m.relseg_size, &tablespace_dir);
    let planner = Planner::new(m, &changes);
    let files = m
        .files
        .iter()
        .map(|f| match planner.plan_file(&f.path, f.size) {
            FileCopy::Whole => None,
            FileCopy::Blocks(inc) => Some(inc),
        })
        .collect();
    Ok(TargetChanges {
        files,
        basis: format!(
            "the target's change tracking from {} to {} ({} summaries, {} WAL records after them{}) names the blocks that may differ",
            m.start_lsn,
            followed_to,
            chosen.len(),
            tail_records,
            if crashed { ", to the end of its WAL: it stopped without a shutdown checkpoint" } else { "" }
        ),
    })
}
