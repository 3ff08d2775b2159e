//! `blockstream report`: one self-contained HTML page about a repository,
//! charts drawn as inline SVG (no script, no network): backup duration by
//! type, stored size and compression ratio, changed share, drill RTO and
//! verify outcomes over time, the chain of backups as a picture, and the
//! retention state.
//!
//! The layout has fixed sizes (a header, then one 280-pixel section per
//! chart, 1000 pixels wide) so that a screenshot can be checked region by
//! region.

use std::fmt::Write as _;

use serde_json::Value;

use crate::catalog::BackupRow;
use crate::expire::Decision;
use crate::timefmt::parse_iso8601;

pub const WIDTH: u32 = 1000;
pub const HEADER: u32 = 90;
pub const SECTION: u32 = 280;
/// The charts, in page order (each in its own section, after the header).
pub const CHARTS: [&str; 6] = ["duration", "size", "changed", "rto", "verify", "chain"];

const COLORS: [(&str, &str); 3] = [("full", "#1f5fbf"), ("diff", "#e07b00"), ("incr", "#2a9d3a")];
const OK: &str = "#2a9d3a";
const BAD: &str = "#d0312d";

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn color(kind: &str) -> &'static str {
    COLORS.iter().find(|(k, _)| *k == kind).map_or("#666", |(_, c)| c)
}

/// A plot area: maps time and value to pixels, and draws axes.
struct Plot {
    t0: f64,
    t1: f64,
    y1: f64,
    svg: String,
}

const PLOT_X: f64 = 70.0;
const PLOT_W: f64 = 880.0;
const PLOT_Y: f64 = 20.0;
const PLOT_H: f64 = 200.0;

impl Plot {
    fn new(times: &[f64], ymax: f64, unit: &str) -> Plot {
        let t0 = times.iter().copied().fold(f64::INFINITY, f64::min);
        let t1 = times.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let (t0, t1) = if t0.is_finite() {
            let pad = (t1 - t0) * 0.05 + 1.0;
            (t0 - pad, t1 + pad)
        } else {
            (0.0, 1.0)
        };
        let y1 = if ymax > 0.0 { ymax * 1.15 } else { 1.0 };
        let mut svg = String::new();
        let _ = write!(
            svg,
            r##"<rect x="{PLOT_X}" y="{PLOT_Y}" width="{PLOT_W}" height="{PLOT_H}" fill="#f7f7f9" stroke="#ccc"/>"##
        );
        for k in 0..=4 {
            let v = y1 * k as f64 / 4.0;
            let y = PLOT_Y + PLOT_H - PLOT_H * k as f64 / 4.0;
            let _ = write!(
                svg,
                r##"<line x1="{PLOT_X}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#e3e3e3"/><text x="{}" y="{:.1}" font-size="11" text-anchor="end" fill="#555">{} {unit}</text>"##,
                PLOT_X + PLOT_W,
                PLOT_X - 6.0,
                y + 4.0,
                short(v)
            );
        }
        // Time ticks: clock times within a day, dates beyond.
        for k in 0..=4 {
            let t = t0 + (t1 - t0) * k as f64 / 4.0;
            let x = PLOT_X + PLOT_W * k as f64 / 4.0;
            let stamp =
                crate::timefmt::iso8601(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.max(0.0) as u64));
            let label = if t1 - t0 < 86_400.0 { &stamp[11..19] } else { &stamp[..10] };
            let _ = write!(
                svg,
                r##"<text x="{x:.1}" y="{:.1}" font-size="11" text-anchor="middle" fill="#555">{label}</text>"##,
                PLOT_Y + PLOT_H + 14.0
            );
        }
        Plot { t0, t1, y1, svg }
    }

    fn x(&self, t: f64) -> f64 {
        PLOT_X + (t - self.t0) / (self.t1 - self.t0).max(1.0) * PLOT_W
    }

    fn y(&self, v: f64) -> f64 {
        PLOT_Y + PLOT_H - v / self.y1 * PLOT_H
    }

    fn dot(&mut self, t: f64, v: f64, fill: &str, title: &str) {
        let _ = write!(
            self.svg,
            r#"<circle cx="{:.1}" cy="{:.1}" r="6" fill="{fill}"><title>{}</title></circle>"#,
            self.x(t),
            self.y(v),
            esc(title)
        );
    }

    fn line(&mut self, points: &[(f64, f64)], stroke: &str) {
        if points.len() < 2 {
            return;
        }
        let d: Vec<String> = points.iter().map(|&(t, v)| format!("{:.1},{:.1}", self.x(t), self.y(v))).collect();
        let _ = write!(
            self.svg,
            r#"<polyline points="{}" fill="none" stroke="{stroke}" stroke-width="2.5"/>"#,
            d.join(" ")
        );
    }

    fn bar(&mut self, t: f64, v: f64, fill: &str, title: &str) {
        let (x, y) = (self.x(t), self.y(v));
        let _ = write!(
            self.svg,
            r#"<rect x="{:.1}" y="{y:.1}" width="14" height="{:.1}" fill="{fill}"><title>{}</title></rect>"#,
            x - 7.0,
            (PLOT_Y + PLOT_H - y).max(1.0),
            esc(title)
        );
    }
}

/// 1.5 MiB.
pub fn bytes(b: u64) -> String {
    let f = b as f64;
    if f >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", f / (1u64 << 30) as f64)
    } else if f >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", f / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", f / 1024.0)
    }
}

/// 1.5k, 20M, 3.2G.
fn short(v: f64) -> String {
    let a = v.abs();
    if a >= 1e9 {
        format!("{:.1}G", v / 1e9)
    } else if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 10.0 || a == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn section(out: &mut String, id: &str, title: &str, legend: &str, body: &str) {
    let _ = write!(
        out,
        r#"<section id="chart-{id}"><h2>{}</h2><div class="legend">{legend}</div><svg width="{WIDTH}" height="236" viewBox="0 0 {WIDTH} 236" xmlns="http://www.w3.org/2000/svg">{body}</svg></section>"#,
        esc(title)
    );
}

fn legend_types() -> String {
    COLORS.iter().map(|(k, c)| format!(r#"<span><i style="background:{c}"></i>{k}</span>"#)).collect()
}

/// The page. `decisions` is the retention state under a policy, when given.
pub fn render(
    repository: &str,
    rows: &[BackupRow],
    verifies: &[Value],
    drills: &[Value],
    decisions: Option<&[Decision]>,
    generated: &str,
) -> String {
    let ok: Vec<&BackupRow> = rows.iter().filter(|r| r.status == "ok").collect();
    let t = |r: &BackupRow| parse_iso8601(&r.start_time).unwrap_or(0) as f64;
    let times: Vec<f64> = ok.iter().map(|r| t(r)).collect();
    let mut page = String::new();
    let _ = write!(
        page,
        r#"<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>blockstream report: {repo}</title><style>
body{{margin:0;font-family:'DejaVu Sans',Arial,sans-serif;color:#222;background:#fff;width:{WIDTH}px}}
header{{height:{HEADER}px;box-sizing:border-box;padding:14px 20px;border-bottom:1px solid #ddd}}
header h1{{font-size:20px;margin:0 0 6px}} header p{{margin:0;font-size:13px;color:#555}}
section{{height:{SECTION}px;box-sizing:border-box;padding:6px 20px 0;overflow:hidden}}
h2{{font-size:15px;margin:4px 0 0;display:inline-block}} .legend{{display:inline-block;margin-left:16px;font-size:12px}}
.legend span{{margin-right:12px}} .legend i{{display:inline-block;width:10px;height:10px;margin-right:4px;border-radius:2px}}
table{{border-collapse:collapse;font-size:11px;margin:10px 20px;width:960px}} td,th{{border:1px solid #ddd;padding:3px 7px;text-align:left}}
th{{background:#f3f3f3}} .expire{{color:{BAD};font-weight:bold}} .keep{{color:{OK}}}
</style></head><body><header><h1>blockstream report</h1><p>repository {repo} &middot; {n} backups ({damaged} damaged) &middot; {drills} drills, {verifies} verifies logged &middot; generated {generated}</p></header>"#,
        repo = esc(repository),
        n = rows.len(),
        damaged = rows.len() - ok.len(),
        drills = drills.len(),
        verifies = verifies.len(),
    );

    // Duration by type.
    let mut p = Plot::new(&times, ok.iter().map(|r| r.duration_secs).fold(0.0, f64::max), "s");
    for (kind, c) in COLORS {
        let pts: Vec<(f64, f64)> =
            ok.iter().filter(|r| r.backup_type == kind).map(|r| (t(r), r.duration_secs)).collect();
        p.line(&pts, c);
        for r in ok.iter().filter(|r| r.backup_type == kind) {
            p.dot(t(r), r.duration_secs, c, &format!("{} ({kind}): {:.1} s", r.backup_id, r.duration_secs));
        }
    }
    section(&mut page, "duration", "Backup duration, by type", &legend_types(), &p.svg);

    // Stored size (bars) and compression ratio (line, scaled to the bars' axis).
    let max_written = ok.iter().map(|r| r.bytes_written as f64).fold(0.0, f64::max);
    let max_ratio = ok.iter().map(|r| r.compression_ratio).fold(0.0, f64::max).max(1e-9);
    let mut p = Plot::new(&times, max_written, "B");
    for r in &ok {
        p.bar(
            t(r),
            r.bytes_written as f64,
            color(&r.backup_type),
            &format!("{}: {} bytes stored", r.backup_id, r.bytes_written),
        );
    }
    let ratio: Vec<(f64, f64)> = ok.iter().map(|r| (t(r), r.compression_ratio / max_ratio * max_written)).collect();
    p.line(&ratio, "#7a3db8");
    for (r, &(x, y)) in ok.iter().zip(&ratio) {
        p.dot(x, y, "#7a3db8", &format!("{}: compression {:.2}x", r.backup_id, r.compression_ratio));
    }
    let legend = format!(
        r#"{}<span><i style="background:#7a3db8"></i>compression ratio (top = {:.1}x)</span>"#,
        legend_types(),
        max_ratio
    );
    section(&mut page, "size", "Stored size and compression ratio", &legend, &p.svg);

    // Changed share of incremental and differential backups.
    let changed: Vec<&&BackupRow> = ok.iter().filter(|r| r.changed_share.is_some()).collect();
    let mut p = Plot::new(&times, changed.iter().map(|r| 100.0 * r.changed_share.unwrap()).fold(0.0, f64::max), "%");
    for r in &changed {
        let v = 100.0 * r.changed_share.unwrap();
        p.bar(t(r), v, color(&r.backup_type), &format!("{}: {v:.2}% of blocks changed", r.backup_id));
    }
    section(&mut page, "changed", "Changed share (incremental and differential)", &legend_types(), &p.svg);

    // Drill RTO.
    let drill_pts: Vec<(f64, f64, bool, String)> = drills
        .iter()
        .filter_map(|d| {
            let time = parse_iso8601(d["time"].as_str()?)? as f64;
            Some((
                time,
                d["rto_secs"].as_f64().unwrap_or(0.0),
                d["ok"].as_bool().unwrap_or(false),
                d["backup_id"].as_str().unwrap_or("").to_string(),
            ))
        })
        .collect();
    let dt: Vec<f64> = drill_pts.iter().map(|d| d.0).collect();
    let mut p = Plot::new(&dt, drill_pts.iter().map(|d| d.1).fold(0.0, f64::max), "s");
    p.line(&drill_pts.iter().map(|d| (d.0, d.1)).collect::<Vec<_>>(), "#888");
    for (time, rto, good, id) in &drill_pts {
        p.dot(
            *time,
            *rto,
            if *good { OK } else { BAD },
            &format!("drill of {id}: {rto:.1} s, {}", if *good { "passed" } else { "FAILED" }),
        );
    }
    let legend = format!(
        r#"<span><i style="background:{OK}"></i>passed</span><span><i style="background:{BAD}"></i>failed</span>"#
    );
    section(&mut page, "rto", "Restore drills: recovery time (restore + recovery)", &legend, &p.svg);

    // Verify outcomes.
    let ver: Vec<(f64, bool, String)> = verifies
        .iter()
        .filter_map(|v| {
            Some((
                parse_iso8601(v["time"].as_str()?)? as f64,
                v["ok"].as_bool().unwrap_or(false),
                v["backup_id"].as_str().unwrap_or("").to_string(),
            ))
        })
        .collect();
    let vt: Vec<f64> = ver.iter().map(|v| v.0).collect();
    let mut p = Plot::new(&vt, 1.0, "");
    for (time, good, id) in &ver {
        p.dot(
            *time,
            if *good { 0.75 } else { 0.25 },
            if *good { OK } else { BAD },
            &format!("verify of {id}: {}", if *good { "ok" } else { "problems" }),
        );
    }
    section(&mut page, "verify", "Verify outcomes (top: ok, bottom: problems)", &legend, &p.svg);

    // The chain: one box per backup, an arrow to its parent.
    let mut svg = String::new();
    let n = rows.len().max(1);
    let step = (PLOT_W / n as f64).min(150.0);
    let pos = |i: usize| PLOT_X + step * i as f64;
    let _ = write!(
        svg,
        r##"<defs><marker id="arrow" markerWidth="8" markerHeight="8" refX="7" refY="4" orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#555"/></marker></defs>"##
    );
    for (i, r) in rows.iter().enumerate() {
        let y = match r.backup_type.as_str() {
            "full" => 40.0,
            "diff" => 110.0,
            _ => 170.0,
        };
        if let Some(pi) = r.parent.as_ref().and_then(|p| rows.iter().position(|x| &x.backup_id == p)) {
            let py = match rows[pi].backup_type.as_str() {
                "full" => 40.0,
                "diff" => 110.0,
                _ => 170.0,
            };
            let _ = write!(
                svg,
                r##"<path d="M{:.1},{:.1} C{:.1},{:.1} {:.1},{:.1} {:.1},{:.1}" fill="none" stroke="#555" stroke-width="1.5" marker-end="url(#arrow)"/>"##,
                pos(i) + 4.0,
                y + 12.0,
                pos(i) - step / 2.0,
                y + 12.0,
                pos(pi) + step / 2.0,
                py + 12.0,
                pos(pi) + step * 0.8,
                py + 12.0
            );
        }
        let fill = if r.status == "ok" { color(&r.backup_type) } else { BAD };
        let expire = decisions.and_then(|d| d.iter().find(|d| d.backup_id == r.backup_id)).is_some_and(|d| d.expire);
        let _ = write!(
            svg,
            r##"<rect x="{:.1}" y="{y}" width="{:.1}" height="24" rx="5" fill="{fill}" opacity="{}"{}><title>{}</title></rect><text x="{:.1}" y="{}" font-size="10" fill="#fff">{}</text>"##,
            pos(i) + 4.0,
            (step * 0.8).max(8.0),
            if expire { "0.35" } else { "1" },
            if expire { r##" stroke="#d0312d" stroke-dasharray="4 2""## } else { "" },
            esc(&format!("{} ({}{})", r.backup_id, r.backup_type, if expire { ", would expire" } else { "" })),
            pos(i) + 8.0,
            y + 16.0,
            esc(&r.backup_id[9..15.min(r.backup_id.len())])
        );
    }
    let legend = format!(r#"{}<span>arrows point to the parent; faded boxes would expire</span>"#, legend_types());
    section(&mut page, "chain", "The chain of backups", &legend, &svg);

    // Retention state.
    let _ = write!(
        page,
        r#"<h2 style="margin:10px 20px 0">Backups and retention</h2><table id="backups"><tr><th>backup</th><th>type</th><th>parent</th><th>started</th><th>seconds</th><th>stored</th><th>ratio</th><th>status</th><th>last verify</th><th>last drill</th><th>retention</th></tr>"#
    );
    let _ = write!(page, "<!-- hover a retention cell for the reason -->");
    for r in rows {
        let verdict = decisions.and_then(|d| d.iter().find(|d| d.backup_id == r.backup_id));
        let outcome = |o: &Option<crate::catalog::Outcome>| match o {
            Some(o) => format!("{} {}", esc(&o.time), if o.ok { "ok" } else { "FAILED" }),
            None => "-".into(),
        };
        let _ = write!(
            page,
            r#"<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{}</td><td>{:.2}x</td><td>{}</td><td>{}</td><td>{}</td><td class="{}" title="{}">{}</td></tr>"#,
            esc(&r.backup_id),
            esc(&r.backup_type),
            esc(r.parent.as_deref().unwrap_or("-")),
            esc(&r.start_time.replace('T', " ")),
            r.duration_secs,
            crate::report::bytes(r.bytes_written),
            r.compression_ratio,
            esc(&r.status),
            outcome(&r.last_verify),
            outcome(&r.last_drill),
            if verdict.is_some_and(|v| v.expire) { "expire" } else { "keep" },
            verdict.map_or(String::new(), |v| esc(&v.reason)),
            verdict.map_or("-", |v| if v.expire { "would expire" } else { "kept" }),
        );
    }
    page.push_str("</table></body></html>\n");
    page
}
