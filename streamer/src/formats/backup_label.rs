//! `backup_label`: the text file `pg_backup_stop` returns, which tells
//! recovery where a backup starts; the only code that parses it.
//!
//! ```text
//! START WAL LOCATION: 0/2000028 (file 000000010000000000000002)
//! CHECKPOINT LOCATION: 0/2000060
//! BACKUP METHOD: streamed
//! BACKUP FROM: primary
//! START TIME: 2026-11-27 03:15:00 UTC
//! LABEL: blockstream
//! START TIMELINE: 1
//! ```
//!
//! PostgreSQL 17 adds `INCREMENTAL FROM LSN` and `INCREMENTAL FROM TLI`.
//! Unknown lines are ignored, as PostgreSQL ignores them.

use crate::error::{Error, Result};
use crate::lsn::Lsn;

/// A label longer than this is not one (PostgreSQL's labels are one line of
/// at most MAXPGPATH bytes plus a few short lines).
pub const MAX_LEN: usize = 64 << 10;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupLabel {
    pub start_lsn: Lsn,
    /// The WAL file named on the START WAL LOCATION line.
    pub start_wal_file: String,
    pub checkpoint_lsn: Lsn,
    /// `streamed` or `pg_start_backup`.
    pub method: Option<String>,
    /// `primary` or `standby`.
    pub from: Option<String>,
    pub start_time: Option<String>,
    pub label: Option<String>,
    pub start_timeline: Option<u32>,
}

impl BackupLabel {
    pub fn parse(text: &str) -> Result<BackupLabel> {
        let bad = |why: String| Error::Corrupt(format!("backup_label {why}"));
        if text.len() > MAX_LEN {
            return Err(bad(format!("is {} bytes, more than the {MAX_LEN} a label can be", text.len())));
        }
        let mut start: Option<(Lsn, String)> = None;
        let (mut checkpoint, mut method, mut from, mut time, mut label, mut tli) = (None, None, None, None, None, None);
        for (n, line) in text.lines().enumerate() {
            let Some((key, value)) = line.split_once(": ") else { continue };
            match key {
                "START WAL LOCATION" => {
                    // 0/2000028 (file 000000010000000000000002)
                    let (lsn, rest) = value.split_once(' ').unwrap_or((value, ""));
                    let file = rest
                        .strip_prefix("(file ")
                        .and_then(|r| r.strip_suffix(')'))
                        .filter(|f| f.len() == 24 && f.bytes().all(|b| b.is_ascii_hexdigit()))
                        .ok_or_else(|| {
                            bad(format!("line {}: START WAL LOCATION \"{value}\" names no WAL file", n + 1))
                        })?;
                    let lsn = lsn.parse().map_err(|e| bad(format!("line {}: {e}", n + 1)))?;
                    start = Some((lsn, file.to_string()));
                }
                "CHECKPOINT LOCATION" => {
                    checkpoint = Some(value.parse().map_err(|e| bad(format!("line {}: {e}", n + 1)))?);
                }
                "BACKUP METHOD" => method = Some(value.to_string()),
                "BACKUP FROM" => from = Some(value.to_string()),
                "START TIME" => time = Some(value.to_string()),
                "LABEL" => label = Some(value.to_string()),
                "START TIMELINE" => {
                    let t: u32 =
                        value.parse().ok().filter(|&t| t > 0).ok_or_else(|| {
                            bad(format!("line {}: START TIMELINE \"{value}\" is not a timeline", n + 1))
                        })?;
                    tli = Some(t);
                }
                _ => {}
            }
        }
        let (start_lsn, start_wal_file) = start.ok_or_else(|| bad("has no START WAL LOCATION line".into()))?;
        let checkpoint_lsn = checkpoint.ok_or_else(|| bad("has no CHECKPOINT LOCATION line".into()))?;
        if checkpoint_lsn < start_lsn {
            return Err(bad(format!("puts the checkpoint at {checkpoint_lsn}, before the start {start_lsn}")));
        }
        Ok(BackupLabel {
            start_lsn,
            start_wal_file,
            checkpoint_lsn,
            method,
            from,
            start_time: time,
            label,
            start_timeline: tli,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n\
        CHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\nBACKUP FROM: primary\n\
        START TIME: 2026-11-27 03:15:00 UTC\nLABEL: blockstream: nightly\nSTART TIMELINE: 1\n";

    #[test]
    fn parses_what_postgres_writes() {
        let l = BackupLabel::parse(SAMPLE).unwrap();
        assert_eq!((l.start_lsn, l.checkpoint_lsn, l.start_timeline), (Lsn(0x2000028), Lsn(0x2000060), Some(1)));
        assert_eq!(l.start_wal_file, "000000010000000000000002");
        assert_eq!(l.label.as_deref(), Some("blockstream: nightly"));
        assert_eq!(l.from.as_deref(), Some("primary"));
        for (bad, why) in [
            ("", "no START WAL LOCATION"),
            ("START WAL LOCATION: 0/1 (file x)\n", "names no WAL file"),
            ("START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n", "no CHECKPOINT LOCATION"),
            (
                "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nCHECKPOINT LOCATION: 0/1\n",
                "before the start",
            ),
        ] {
            let err = BackupLabel::parse(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }
}
