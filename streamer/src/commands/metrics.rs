//! Prometheus metrics of a repository, for node_exporter's textfile
//! collector (`blockstream metrics`) and for postgres_exporter
//! (`blocktrack.metrics(repo)` returns the same samples as rows).
//!
//! Names follow Prometheus conventions: a `blockstream_` prefix, base units
//! in the name (`_seconds`, `_bytes`), gauges for states and sizes, a
//! `type` label for the backup type. Every family has HELP and TYPE lines.

use std::fmt::Write as _;

use crate::catalog::BackupRow;
use crate::timefmt::parse_iso8601;

/// One sample.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub help: &'static str,
    /// gauge or counter
    pub kind: &'static str,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    /// `{type="full"}`, or empty.
    pub fn label_text(&self) -> String {
        if self.labels.is_empty() {
            return String::new();
        }
        let parts: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")))
            .collect();
        format!("{{{}}}", parts.join(","))
    }
}

/// What the server adds when the metrics are taken inside it.
#[derive(Clone, Copy, Debug, Default)]
pub struct ServerFacts {
    pub summarizer_lag_bytes: Option<u64>,
    /// pg_stat_archiver's failed_count.
    pub archive_failed_count: Option<u64>,
}

/// The samples for a repository: `rows` from [`crate::catalog::list`],
/// `repository_bytes` its size on disk, `now` seconds since the epoch.
pub fn samples(
    rows: &[BackupRow],
    repository_bytes: u64,
    now: u64,
    server: ServerFacts,
    archive: Option<&crate::archive::Facts>,
) -> Vec<Sample> {
    let mut out = Vec::new();
    let mut push = |name: &str, help: &'static str, kind: &'static str, labels: &[(&str, &str)], value: f64| {
        out.push(Sample {
            name: format!("blockstream_{name}"),
            help,
            kind,
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            value,
        });
    };
    for kind in ["full", "diff", "incr"] {
        let Some(last) = rows.iter().rev().find(|r| r.status == "ok" && r.backup_type == kind) else { continue };
        let stop = parse_iso8601(&last.stop_time).unwrap_or(0) as f64;
        let l = [("type", kind)];
        push(
            "last_backup_timestamp_seconds",
            "When the newest backup of this type ended (Unix time).",
            "gauge",
            &l,
            stop,
        );
        push(
            "last_backup_age_seconds",
            "Seconds since the newest backup of this type ended.",
            "gauge",
            &l,
            (now as f64 - stop).max(0.0),
        );
        push(
            "last_backup_duration_seconds",
            "How long the newest backup of this type took.",
            "gauge",
            &l,
            last.duration_secs,
        );
        push(
            "last_backup_read_bytes",
            "Bytes the newest backup of this type read.",
            "gauge",
            &l,
            last.bytes_read as f64,
        );
        push(
            "last_backup_written_bytes",
            "Bytes the newest backup of this type stored.",
            "gauge",
            &l,
            last.bytes_written as f64,
        );
        push(
            "last_backup_compression_ratio",
            "Bytes read over bytes stored, newest backup of this type.",
            "gauge",
            &l,
            last.compression_ratio,
        );
    }
    let newest = |f: &dyn Fn(&BackupRow) -> Option<&crate::catalog::Outcome>| {
        rows.iter().filter_map(f).filter_map(|o| parse_iso8601(&o.time).map(|t| (t, o))).max_by_key(|(t, _)| *t)
    };
    if let Some((t, o)) = newest(&|r| r.last_verify.as_ref()) {
        push("last_verify_timestamp_seconds", "When the newest verify ran (Unix time).", "gauge", &[], t as f64);
        push(
            "last_verify_success",
            "1 when the newest verify found no problem, else 0.",
            "gauge",
            &[],
            o.ok as u8 as f64,
        );
    }
    if let Some((t, o)) = newest(&|r| r.last_drill.as_ref()) {
        push("last_drill_timestamp_seconds", "When the newest restore drill ran (Unix time).", "gauge", &[], t as f64);
        push("last_drill_success", "1 when the newest restore drill passed, else 0.", "gauge", &[], o.ok as u8 as f64);
        push(
            "last_drill_rto_seconds",
            "Restore plus recovery time of the newest drill.",
            "gauge",
            &[],
            o.rto_secs.unwrap_or(0.0),
        );
    }
    push("repository_size_bytes", "Bytes the repository holds on disk.", "gauge", &[], repository_bytes as f64);
    for state in ["ok", "damaged"] {
        let n = rows.iter().filter(|r| r.status == state).count();
        push("backups", "Backups in the repository, by state.", "gauge", &[("state", state)], n as f64);
    }
    if let Some(lag) = server.summarizer_lag_bytes {
        push("summarizer_lag_bytes", "WAL not yet summarized by pg_blocktrack.", "gauge", &[], lag as f64);
    }
    if let Some(n) = server.archive_failed_count {
        push(
            "archive_command_failures_total",
            "Failed archive_command runs (pg_stat_archiver).",
            "counter",
            &[],
            n as f64,
        );
    }
    if let Some(a) = archive {
        push("archive_segments", "WAL segments in the archive.", "gauge", &[], a.segments as f64);
        push("archive_size_bytes", "Bytes the WAL archive holds.", "gauge", &[], a.bytes as f64);
        if let Some(t) = a.newest_secs {
            push(
                "archive_last_segment_timestamp_seconds",
                "When the newest WAL segment was archived (Unix time).",
                "gauge",
                &[],
                t as f64,
            );
            push(
                "archive_last_segment_age_seconds",
                "Seconds since the newest WAL segment was archived.",
                "gauge",
                &[],
                now.saturating_sub(t) as f64,
            );
        }
        if let Some(b) = a.queue_bytes {
            push(
                "archive_lag_bytes",
                "WAL queued for asynchronous archiving, not yet archived.",
                "gauge",
                &[],
                b as f64,
            );
        }
        if let Some(s) = a.queue_oldest_secs {
            push("archive_lag_seconds", "How long the oldest queued WAL file has waited.", "gauge", &[], s);
        }
        if let Some(f) = a.push_failures {
            push(
                "archive_push_failures_total",
                "Failed pushes by the asynchronous pusher since it started.",
                "counter",
                &[],
                f as f64,
            );
        }
    }
    // One family's samples together (the exposition format requires it).
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The text exposition format (version 0.0.4).
pub fn to_text(samples: &[Sample]) -> String {
    let mut out = String::new();
    let mut last = "";
    for s in samples {
        if s.name != last {
            let _ = writeln!(out, "# HELP {} {}", s.name, s.help);
            let _ = writeln!(out, "# TYPE {} {}", s.name, s.kind);
            last = &s.name;
        }
        let _ = writeln!(out, "{}{} {}", s.name, s.label_text(), s.value);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{BackupRow, Outcome};

    fn row(id: &str, kind: &str, stop: &str, status: &str) -> BackupRow {
        BackupRow {
            backup_id: id.into(),
            backup_type: kind.into(),
            parent: None,
            status: status.into(),
            detail: None,
            start_time: stop.into(),
            stop_time: stop.into(),
            start_lsn: "0/1".into(),
            stop_lsn: "0/2".into(),
            timeline: 1,
            duration_secs: 2.5,
            bytes_read: 1000,
            bytes_written: 100,
            restored_bytes: 1000,
            compression_ratio: 10.0,
            changed_share: None,
            last_verify: None,
            last_drill: None,
        }
    }

    #[test]
    fn families_are_grouped_with_help_and_type() {
        let mut rows = vec![
            row("20261127T000000F", "full", "2026-11-27T00:00:10Z", "ok"),
            row("20261127T010000I", "incr", "2026-11-27T01:00:10Z", "ok"),
            row("20261127T020000I", "incr", "", "damaged"),
        ];
        rows[1].last_drill =
            Some(Outcome { time: "2026-11-27T03:00:00Z".into(), ok: true, detail: None, rto_secs: Some(4.5) });
        let now = crate::timefmt::parse_iso8601("2026-11-27T02:00:10Z").unwrap();
        let s =
            samples(&rows, 12345, now, ServerFacts { summarizer_lag_bytes: Some(7), archive_failed_count: None }, None);
        let text = to_text(&s);
        assert!(text.contains("blockstream_last_backup_age_seconds{type=\"incr\"} 3600\n"), "{text}");
        assert!(text.contains("blockstream_last_backup_age_seconds{type=\"full\"} 7200\n"), "{text}");
        assert!(text.contains("blockstream_backups{state=\"damaged\"} 1\n"), "{text}");
        assert!(text.contains("blockstream_last_drill_rto_seconds 4.5\n"), "{text}");
        assert!(text.contains("blockstream_summarizer_lag_bytes 7\n"), "{text}");
        assert!(!text.contains("last_verify"), "no verify yet: {text}");
        // Each family's HELP and TYPE appear once, before its samples.
        for family in ["blockstream_last_backup_age_seconds", "blockstream_backups"] {
            assert_eq!(text.matches(&format!("# TYPE {family} gauge")).count(), 1, "{text}");
        }
    }
}
