//! The catalog of a repository: one row per backup with what its manifest
//! says and the outcome of its last verify and drill, from the logs the
//! repository keeps (`verify.jsonl`, `drills.jsonl`: one JSON object per
//! line, appended as one record so concurrent writers never interleave a
//! line). Read by `info`, `metrics`, `report` and the SQL functions.
//!
//! In an encrypted repository every line is `{"sealed": "<hex>"}`: the
//! record sealed with the logs' key and the log's name as associated data.
//! Readers skip what they cannot open, and plain lines there (someone
//! writing "the drill passed" into a repository they cannot read) unless
//! `--allow-plain`.

use std::collections::HashMap;

use serde::Serialize;
use serde_json::Value;

use crate::error::Result;
use crate::manifest::{BackupType, Manifest};
use crate::repo::Repo;

pub const DRILL_LOG: &str = "drills.jsonl";
pub const VERIFY_LOG: &str = "verify.jsonl";
/// A log larger than this is read only in part (its newest lines matter).
const LOG_MAX: u64 = 256 << 20;

const LOG_PURPOSE: &str = "blockstream logs";

/// Appends one JSON line to a repository log, durably (sealed in an
/// encrypted repository).
pub fn append_log(repo: &Repo, name: &str, record: &Value) -> Result<()> {
    let line = line(repo, name, record)?;
    repo.store().append(name, format!("{line}\n").as_bytes())
}

/// A record as a line of the object `name`: sealed in an encrypted repository.
pub fn line(repo: &Repo, name: &str, record: &Value) -> Result<Value> {
    Ok(match repo.keyring() {
        Some(k) => {
            let sealed = k.seal_object(LOG_PURPOSE, name, record.to_string().as_bytes());
            serde_json::json!({ "sealed": crate::hash::to_hex(&sealed) })
        }
        None if repo.is_encrypted() => {
            return Err(crate::Error::Usage(format!(
                "repository \"{}\" is encrypted and no key was given",
                repo.location()
            )))
        }
        None => record.clone(),
    })
}

/// Every well-formed line of a repository log, oldest first (none when absent).
pub fn read_log(repo: &Repo, name: &str) -> Vec<Value> {
    let bytes = repo.store().read(name, LOG_MAX).unwrap_or_default();
    String::from_utf8_lossy(&bytes)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| match (v["sealed"].as_str(), repo.keyring()) {
            (Some(hex), Some(k)) => {
                let sealed = crate::hash::from_hex(hex, 1 << 19)?;
                let plain = k.open_object(LOG_PURPOSE, name, &sealed, name).ok()?;
                serde_json::from_slice(&plain).ok()
            }
            (Some(_), None) => None,
            (None, _) if repo.is_encrypted() && !repo.allows_plain() => None,
            (None, _) => Some(v),
        })
        .collect()
}

/// The newest entry of a log for each backup id.
pub fn last_by_backup(entries: &[Value]) -> HashMap<String, Value> {
    let mut out = HashMap::new();
    for v in entries {
        if let Some(id) = v["backup_id"].as_str() {
            out.insert(id.to_string(), v.clone());
        }
    }
    out
}

/// The outcome of a verify or a drill.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Outcome {
    pub time: String,
    pub ok: bool,
    /// The first problem, when there was one.
    pub detail: Option<String>,
    /// A drill's restore plus recovery time.
    pub rto_secs: Option<f64>,
}

impl Outcome {
    fn from_log(v: &Value) -> Outcome {
        let detail = v["problems"].as_array().and_then(|p| p.first()).map(|p| match p.as_str() {
            Some(s) => s.to_string(),
            None => p["detail"].as_str().map(String::from).unwrap_or_else(|| p.to_string()),
        });
        Outcome {
            time: v["time"].as_str().unwrap_or("").to_string(),
            ok: v["ok"].as_bool().unwrap_or(false),
            detail,
            rto_secs: v["rto_secs"].as_f64(),
        }
    }
}

/// One backup of the catalog.
#[derive(Clone, Debug, Serialize)]
pub struct BackupRow {
    pub backup_id: String,
    /// full, incr or diff (from the id when the manifest is damaged).
    pub backup_type: String,
    pub parent: Option<String>,
    /// ok, or damaged (with `detail`).
    pub status: String,
    pub detail: Option<String>,
    pub start_time: String,
    pub stop_time: String,
    pub start_lsn: String,
    pub stop_lsn: String,
    pub timeline: u32,
    pub duration_secs: f64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// The size of the data directory it restores to.
    pub restored_bytes: u64,
    pub compression_ratio: f64,
    /// Changed blocks over trackable blocks, for incremental and differential backups.
    pub changed_share: Option<f64>,
    pub last_verify: Option<Outcome>,
    pub last_drill: Option<Outcome>,
}

pub fn type_name(t: BackupType) -> &'static str {
    match t {
        BackupType::Full => "full",
        BackupType::Incr => "incr",
        BackupType::Diff => "diff",
    }
}

fn type_from_id(id: &str) -> &'static str {
    match id.as_bytes().last() {
        Some(b'I') => "incr",
        Some(b'D') => "diff",
        _ => "full",
    }
}

impl BackupRow {
    pub fn from_manifest(m: &Manifest) -> BackupRow {
        let s = &m.stats;
        BackupRow {
            backup_id: m.backup_id.clone(),
            backup_type: type_name(m.backup_type).into(),
            parent: m.parent.clone(),
            status: "ok".into(),
            detail: None,
            start_time: m.start_time.clone(),
            stop_time: m.stop_time.clone(),
            start_lsn: m.start_lsn.to_string(),
            stop_lsn: m.stop_lsn.to_string(),
            timeline: m.timeline,
            duration_secs: s.duration_secs,
            bytes_read: s.bytes_read,
            bytes_written: s.bytes_written,
            restored_bytes: m.files.iter().filter(|f| !f.vanished).map(|f| f.size).sum(),
            compression_ratio: s.compression_ratio,
            changed_share: m.parent.is_some().then(|| s.changed_blocks as f64 / s.trackable_blocks.max(1) as f64),
            last_verify: None,
            last_drill: None,
        }
    }

    fn damaged(id: &str, why: String) -> BackupRow {
        BackupRow {
            backup_id: id.into(),
            backup_type: type_from_id(id).into(),
            parent: None,
            status: "damaged".into(),
            detail: Some(why),
            start_time: String::new(),
            stop_time: String::new(),
            start_lsn: String::new(),
            stop_lsn: String::new(),
            timeline: 0,
            duration_secs: 0.0,
            bytes_read: 0,
            bytes_written: 0,
            restored_bytes: 0,
            compression_ratio: 0.0,
            changed_share: None,
            last_verify: None,
            last_drill: None,
        }
    }
}

/// Every backup of the repository, oldest first, with its last verify and drill.
pub fn list(repo: &Repo) -> Result<Vec<BackupRow>> {
    let verifies = last_by_backup(&read_log(repo, VERIFY_LOG));
    let drills = last_by_backup(&read_log(repo, DRILL_LOG));
    let mut rows = Vec::new();
    for id in repo.backup_ids()? {
        let mut row = match repo.load_manifest(&id) {
            Ok(m) => BackupRow::from_manifest(&m),
            Err(e) => BackupRow::damaged(&id, e.to_string()),
        };
        row.last_verify = verifies.get(&id).map(Outcome::from_log);
        row.last_drill = drills.get(&id).map(Outcome::from_log);
        rows.push(row);
    }
    Ok(rows)
}
