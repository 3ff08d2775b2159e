//! Timeline history files (`pg_wal/0000000N.history`): which timelines a
//! server's WAL went through, and where each one ended.
//!
//! A history file of timeline N lists, one line each, every ancestor
//! timeline and the LSN where N's history left it (`<parent>\t<switch
//! LSN>\t<reason>`; blank lines and `#` comments are skipped, as PostgreSQL
//! does). WAL of an ancestor before its switch point is WAL of N too: a
//! summary of timeline 1 up to the point where timeline 2 began describes
//! timeline 2's history as well, and a backup that ended there is a parent
//! an incremental on timeline 2 can build on.

use std::path::Path;

use crate::lsn::Lsn;

/// Bytes read of a history file at most: a line per timeline switch, a few
/// dozen bytes each; PostgreSQL itself writes far less than this.
pub const MAX_HISTORY_BYTES: u64 = 1 << 20;

/// One line of a timeline history file: timeline `parent` ended at `switch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Switch {
    pub parent: u32,
    pub switch: Lsn,
}

/// Parses a timeline history file. Timelines must increase and switch points
/// must not go back, as PostgreSQL requires.
pub fn parse_history(text: &str) -> Result<Vec<Switch>, String> {
    let mut out: Vec<Switch> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut f = line.split_whitespace();
        let (Some(parent), Some(switch)) = (f.next(), f.next()) else {
            return Err(format!("line {}: expected a timeline and a switch LSN, got \"{line}\"", n + 1));
        };
        let parent: u32 = parent
            .parse()
            .ok()
            .filter(|&t| t > 0)
            .ok_or_else(|| format!("line {}: \"{parent}\" is not a timeline", n + 1))?;
        let switch: Lsn = switch.parse().map_err(|_| format!("line {}: \"{switch}\" is not an LSN", n + 1))?;
        if let Some(prev) = out.last() {
            if parent <= prev.parent {
                return Err(format!("line {}: timeline {parent} does not follow timeline {}", n + 1, prev.parent));
            }
            if switch < prev.switch {
                return Err(format!("line {}: switch point {switch} is before {}", n + 1, prev.switch));
            }
        }
        out.push(Switch { parent, switch });
    }
    Ok(out)
}

/// A timeline and its history: the ancestors it went through and where it
/// left each of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct History {
    pub timeline: u32,
    switches: Vec<Switch>,
}

impl History {
    /// Timeline 1, or any timeline whose history file is not needed: no ancestors.
    pub fn only(timeline: u32) -> History {
        History { timeline, switches: Vec::new() }
    }

    /// Timeline `timeline` with the contents of its history file.
    pub fn parse(timeline: u32, text: &str) -> Result<History, String> {
        let switches = parse_history(text)?;
        if let Some(s) = switches.iter().find(|s| s.parent >= timeline) {
            return Err(format!("the history of timeline {timeline} names timeline {} as an ancestor", s.parent));
        }
        Ok(History { timeline, switches })
    }

    pub fn switches(&self) -> &[Switch] {
        &self.switches
    }

    /// Where `tli` ends in this history: `Some(None)` for this timeline
    /// itself (it has not ended), `Some(Some(lsn))` for an ancestor, None
    /// for a timeline not in this history.
    pub fn end_of(&self, tli: u32) -> Option<Option<Lsn>> {
        if tli == self.timeline {
            return Some(None);
        }
        self.switches.iter().find(|s| s.parent == tli).map(|s| Some(s.switch))
    }

    /// Whether WAL of timeline `tli` up to `lsn` is part of this history;
    /// the reason when it is not.
    pub fn holds(&self, tli: u32, lsn: Lsn) -> Result<(), String> {
        match self.end_of(tli) {
            Some(None) => Ok(()),
            Some(Some(end)) if lsn <= end => Ok(()),
            Some(Some(end)) => {
                Err(format!("timeline {tli} ends at {end} in the history of timeline {}, before {lsn}", self.timeline))
            }
            None => Err(format!("timeline {tli} is not in the history of timeline {}", self.timeline)),
        }
    }

    /// The timeline whose WAL holds the byte at `lsn` (PostgreSQL's
    /// `tliOfPointInHistory`).
    pub fn timeline_of(&self, lsn: Lsn) -> u32 {
        self.switches.iter().find(|s| lsn < s.switch).map_or(self.timeline, |s| s.parent)
    }
}

/// Timeline `tli` and its history, from its history file in the WAL
/// directory `wal_dir` (timeline 1 has none). The file is opened below
/// `wal_dir` with no link followed, must be a regular file (a FIFO would
/// block the reader) and at most [`MAX_HISTORY_BYTES`].
pub fn read_history(wal_dir: &Path, tli: u32) -> std::result::Result<History, String> {
    if tli <= 1 {
        return Ok(History::only(tli));
    }
    let name = format!("{tli:08X}.history");
    let path = wal_dir.join(&name);
    let bytes = crate::safe_fs::read_beneath(wal_dir, &name, MAX_HISTORY_BYTES)
        .map_err(|e| format!("could not read the history of timeline {tli}: {e}"))?;
    let text = String::from_utf8(bytes).map_err(|_| format!("\"{}\" is not text", path.display()))?;
    History::parse(tli, &text).map_err(|e| format!("\"{}\": {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_postgres_writes() {
        let text = "1\t0/3000060\tno recovery target specified\n\n# a comment\n2\t0/5000100\tat restore point \"x\"\n";
        assert_eq!(
            parse_history(text).unwrap(),
            vec![Switch { parent: 1, switch: Lsn(0x3000060) }, Switch { parent: 2, switch: Lsn(0x5000100) }]
        );
        assert_eq!(parse_history("").unwrap(), vec![]);
    }

    #[test]
    fn refuses_what_postgres_would_not_write() {
        assert!(parse_history("1\n").unwrap_err().contains("line 1: expected a timeline and a switch LSN"));
        assert!(parse_history("x\t0/1\n").unwrap_err().contains("\"x\" is not a timeline"));
        assert!(parse_history("0\t0/1\n").unwrap_err().contains("\"0\" is not a timeline"));
        assert!(parse_history("1\tzz\n").unwrap_err().contains("\"zz\" is not an LSN"));
        assert!(parse_history("2\t0/10\n1\t0/20\n")
            .unwrap_err()
            .contains("line 2: timeline 1 does not follow timeline 2"));
        assert!(parse_history("1\t0/20\n2\t0/10\n").unwrap_err().contains("line 2: switch point 0/10 is before 0/20"));
        assert!(History::parse(2, "2\t0/10\n").unwrap_err().contains("names timeline 2 as an ancestor"));
    }

    #[test]
    fn what_a_history_holds() {
        let h = History::parse(3, "1\t0/100\tx\n2\t0/200\ty\n").unwrap();
        assert_eq!(h.end_of(3), Some(None));
        assert_eq!(h.end_of(1), Some(Some(Lsn(0x100))));
        assert_eq!(h.end_of(4), None);
        assert!(h.holds(1, Lsn(0x100)).is_ok());
        assert!(h.holds(2, Lsn(0x180)).is_ok());
        assert!(h.holds(3, Lsn(u64::MAX)).is_ok());
        assert_eq!(
            h.holds(1, Lsn(0x101)).unwrap_err(),
            "timeline 1 ends at 0/100 in the history of timeline 3, before 0/101"
        );
        assert_eq!(h.holds(5, Lsn(1)).unwrap_err(), "timeline 5 is not in the history of timeline 3");
        assert_eq!((h.timeline_of(Lsn(0xff)), h.timeline_of(Lsn(0x100)), h.timeline_of(Lsn(0x200))), (1, 2, 3));
        let one = History::only(1);
        assert!(one.holds(1, Lsn(5)).is_ok());
        assert!(one.holds(2, Lsn(5)).is_err());
        assert_eq!(one.timeline_of(Lsn(5)), 1);
    }
}
