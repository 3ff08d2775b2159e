//! Retention: which backups a policy lets go, and removing them safely.
//!
//! The policy, as pgBackRest's: keep the newest `retain_full` full backups
//! (everything older than the oldest of them goes); of the differential
//! backups since, keep the newest `retain_diff`; of the incremental ones,
//! the newest `retain_incr`, or those younger than `retain_days`. Whatever a
//! kept backup's chain needs is kept, always. WAL lives inside the backups
//! that need it, so it goes with them.
//!
//! Removal runs under the repository lock, newest first (a backup before
//! the parent it builds on), and removes each backup's manifest first: a
//! backup without its manifest is not a backup any more, so a kill at any
//! point leaves every listed backup complete and restorable; the next
//! writer removes the rest of a half-removed directory.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::manifest::MANIFEST_FILE;
use crate::repo::{Repo, RepoLock};

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Policy {
    pub retain_full: usize,
    pub retain_diff: Option<usize>,
    pub retain_incr: Option<usize>,
    pub retain_days: Option<f64>,
}

impl Policy {
    pub fn check(&self) -> Result<()> {
        if self.retain_full == 0 {
            return Err(Error::Usage("retain_full must be at least 1".into()));
        }
        if self.retain_incr.is_some() && self.retain_days.is_some() {
            return Err(Error::Usage("give retain_incr or retain_days, not both".into()));
        }
        if self.retain_days.is_some_and(|d| d.is_nan() || d <= 0.0) {
            return Err(Error::Usage("retain_days must be more than 0".into()));
        }
        Ok(())
    }
}

/// What retention knows of a backup.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub backup_id: String,
    /// full, diff or incr.
    pub backup_type: String,
    /// None for a full backup, or when the manifest cannot be read.
    pub parent: Option<String>,
    /// When it ended (seconds since the epoch), when known.
    pub stop_secs: Option<u64>,
    pub damaged: bool,
}

/// The verdict on one backup.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Decision {
    pub backup_id: String,
    pub expire: bool,
    pub reason: String,
}

/// Decides, for every backup (oldest first), whether `policy` lets it go.
pub fn plan(entries: &[Entry], policy: &Policy, now: u64) -> Vec<Decision> {
    let fulls: Vec<&Entry> = entries.iter().rev().filter(|e| e.backup_type == "full" && !e.damaged).collect();
    let oldest_kept = fulls.get(policy.retain_full.min(fulls.len()).saturating_sub(1)).map(|e| e.backup_id.as_str());
    let mut verdict: BTreeMap<&str, (bool, String)> = BTreeMap::new();
    let (mut diffs, mut incrs) = (0usize, 0usize);
    for e in entries.iter().rev() {
        let id = e.backup_id.as_str();
        let v = match oldest_kept {
            Some(k) if id < k => {
                (true, format!("older than {k}, the oldest of the {} full backups kept", policy.retain_full))
            }
            _ if e.damaged => (false, "its manifest cannot be read: left for the operator".into()),
            _ if e.backup_type == "full" => (false, "a full backup kept by retain_full".into()),
            _ if e.backup_type == "diff" => {
                diffs += 1;
                match policy.retain_diff {
                    Some(n) if diffs > n => (true, format!("beyond the {n} differential backups kept")),
                    _ => (false, "a differential backup kept".into()),
                }
            }
            _ => {
                incrs += 1;
                match (policy.retain_incr, policy.retain_days, e.stop_secs) {
                    (Some(n), _, _) if incrs > n => (true, format!("beyond the {n} incremental backups kept")),
                    (_, Some(d), Some(t)) if (now.saturating_sub(t)) as f64 > d * 86_400.0 => {
                        (true, format!("older than {d} days"))
                    }
                    _ => (false, "an incremental backup kept".into()),
                }
            }
        };
        verdict.insert(id, v);
    }
    let parents: BTreeMap<&str, &str> =
        entries.iter().filter_map(|e| e.parent.as_deref().map(|p| (e.backup_id.as_str(), p))).collect();
    // What builds on an expiring backup expires with it (oldest first, so it
    // carries down a chain)...
    for e in entries {
        let id = e.backup_id.as_str();
        if let Some(&p) = parents.get(id) {
            if verdict.get(p).is_some_and(|v| v.0) && verdict.get(id).is_some_and(|v| !v.0) {
                verdict.insert(id, (true, format!("builds on {p}, which expires")));
            }
        }
    }
    // ... and a kept backup keeps its whole chain.
    let kept: Vec<&str> = verdict.iter().filter(|(_, (x, _))| !x).map(|(id, _)| *id).collect();
    let mut needed: BTreeSet<(&str, &str)> = BTreeSet::new();
    for k in kept {
        let mut at = k;
        while let Some(&p) = parents.get(at) {
            needed.insert((p, k));
            at = p;
        }
    }
    for (p, child) in needed {
        if let Some(v) = verdict.get_mut(p) {
            if v.0 {
                *v = (false, format!("needed by {child}, which is kept"));
            }
        }
    }
    entries
        .iter()
        .map(|e| {
            let (expire, reason) = verdict.remove(e.backup_id.as_str()).unwrap_or((false, String::new()));
            Decision { backup_id: e.backup_id.clone(), expire, reason }
        })
        .collect()
}

/// The retention entries of a repository, oldest first.
pub fn entries(repo: &Repo) -> Result<Vec<Entry>> {
    repo.backup_ids()?
        .into_iter()
        .map(|id| {
            Ok(match repo.load_manifest(&id) {
                Ok(m) => Entry {
                    backup_type: crate::catalog::type_name(m.backup_type).into(),
                    parent: m.parent.clone(),
                    stop_secs: crate::timefmt::parse_iso8601(&m.stop_time),
                    damaged: false,
                    backup_id: id,
                },
                Err(_) => Entry {
                    backup_type: match id.as_bytes().last() {
                        Some(b'I') => "incr",
                        Some(b'D') => "diff",
                        _ => "full",
                    }
                    .into(),
                    parent: None,
                    stop_secs: None,
                    damaged: true,
                    backup_id: id,
                },
            })
        })
        .collect()
}

/// Removes the backups `decisions` expire, newest first, each manifest
/// first. Returns the ids removed.
pub fn execute(repo: &Repo, _lock: &RepoLock, decisions: &[Decision]) -> Result<Vec<String>> {
    let mut doomed: Vec<&str> = decisions.iter().filter(|d| d.expire).map(|d| d.backup_id.as_str()).collect();
    doomed.sort_unstable_by(|a, b| b.cmp(a));
    let mut removed = Vec::new();
    for id in doomed {
        // The manifest first: from then on the backup is not listed, and
        // the rest is what any writer removes as an incomplete backup.
        let prefix = Repo::backup_key(id);
        repo.store().remove(&crate::storage::join(&prefix, MANIFEST_FILE))?;
        crate::failpoint::hit("expire-manifest-removed");
        repo.store().remove_prefix(&prefix)?;
        removed.push(id.to_string());
    }
    Ok(removed)
}

/// Archived WAL no kept backup needs: segments (and partial segments and
/// backup history files) before the oldest kept backup's start segment.
/// Timeline history files stay. Returns the names, removed unless `dry_run`.
pub fn prune_archive(
    repo: &Repo,
    oldest_start: crate::lsn::Lsn,
    segment_size: u64,
    dry_run: bool,
) -> Result<Vec<String>> {
    let first = oldest_start.segment(segment_size);
    let mut out = Vec::new();
    for (name, key) in crate::archive::files(repo)? {
        let base = name.split('.').next().unwrap_or("");
        let Some((_, segno)) = crate::lsn::parse_wal_file_name(base, segment_size) else { continue };
        if segno < first {
            if !dry_run {
                repo.store().remove(&key)?;
            }
            out.push(name);
        }
    }
    Ok(out)
}

/// The start LSN and segment size of the oldest backup `decisions` keep.
pub fn oldest_kept(repo: &Repo, decisions: &[Decision]) -> Option<(crate::lsn::Lsn, u64)> {
    decisions
        .iter()
        .filter(|d| !d.expire)
        .filter_map(|d| repo.load_manifest(&d.backup_id).ok())
        .map(|m| (m.start_lsn, m.wal_segment_size))
        .min_by_key(|(l, _)| *l)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(id: &str, parent: Option<&str>, day: u64) -> Entry {
        let t = match id.as_bytes().last() {
            Some(b'I') => "incr",
            Some(b'D') => "diff",
            _ => "full",
        };
        Entry {
            backup_id: id.into(),
            backup_type: t.into(),
            parent: parent.map(String::from),
            stop_secs: Some(day * 86_400),
            damaged: false,
        }
    }

    fn expired(d: &[Decision]) -> Vec<&str> {
        d.iter().filter(|d| d.expire).map(|d| d.backup_id.as_str()).collect()
    }

    #[test]
    fn keeps_what_the_policy_and_the_chains_need() {
        let chain = vec![
            e("20260101T000000F", None, 1),
            e("20260102T000000I", Some("20260101T000000F"), 2),
            e("20260103T000000F", None, 3),
            e("20260104T000000I", Some("20260103T000000F"), 4),
            e("20260105T000000D", Some("20260103T000000F"), 5),
            e("20260106T000000I", Some("20260105T000000D"), 6),
            e("20260107T000000D", Some("20260103T000000F"), 7),
            e("20260108T000000I", Some("20260107T000000D"), 8),
        ];
        let p = |full, diff, incr, days| Policy {
            retain_full: full,
            retain_diff: diff,
            retain_incr: incr,
            retain_days: days,
        };
        // One full: everything before the newest full goes.
        assert_eq!(expired(&plan(&chain, &p(1, None, None, None), 9)), vec!["20260101T000000F", "20260102T000000I"]);
        // Two fulls: nothing goes.
        assert!(expired(&plan(&chain, &p(2, None, None, None), 9)).is_empty());
        // One differential: the older one goes with the incremental on it.
        assert_eq!(
            expired(&plan(&chain, &p(1, Some(1), None, None), 9)),
            vec!["20260101T000000F", "20260102T000000I", "20260105T000000D", "20260106T000000I"]
        );
        // One incremental: the newest stays, with its chain.
        let d = plan(&chain, &p(1, None, Some(1), None), 9);
        assert_eq!(expired(&d), vec!["20260101T000000F", "20260102T000000I", "20260104T000000I", "20260106T000000I"]);
        assert!(d[5].reason.contains("beyond the 1 incremental"), "{:?}", d[5]);
        // No differential: the incrementals on them go too.
        let d = plan(&chain, &p(1, Some(0), None, None), 9);
        assert_eq!(
            expired(&d),
            vec![
                "20260101T000000F",
                "20260102T000000I",
                "20260105T000000D",
                "20260106T000000I",
                "20260107T000000D",
                "20260108T000000I"
            ]
        );
        assert!(d[7].reason.contains("builds on 20260107T000000D"), "{:?}", d[7]);
        // Younger than three days at day 9: the incrementals of days 6 and 8 only.
        assert_eq!(
            expired(&plan(&chain, &p(1, None, None, Some(3.0)), 9 * 86_400)),
            vec!["20260101T000000F", "20260102T000000I", "20260104T000000I"]
        );
        assert!(p(0, None, None, None).check().is_err() && p(1, None, Some(1), Some(1.0)).check().is_err());
    }
}
