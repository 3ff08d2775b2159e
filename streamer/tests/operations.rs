//! The operating loop on real clusters: backups scheduled by a real pg_cron
//! through `blocktrack.run_backup`, cancelled mid-way, watched in
//! `blocktrack.progress`; the catalog, metrics (parsed by Prometheus' own
//! parser), retention and the HTML report (opened in headless Chromium).
//!
//! Run as root with pg_blocktrack installed:
//! `cargo test --release -p blockstream --test operations -- --test-threads=1`.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn info(repo: &Path) -> serde_json::Value {
    serde_json::from_str(&bs_ok(&["info", "--repo", path(repo), "--output", "json"])).unwrap()
}

fn ids(repo: &Path) -> Vec<String> {
    if !repo.join("repo.json").exists() {
        return Vec::new();
    }
    info(repo)["backups"].as_array().unwrap().iter().map(|b| b["backup_id"].as_str().unwrap().to_string()).collect()
}

/// Waits until `f` holds, up to `secs`.
fn wait_for(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < until, "{what}: not within {secs} s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn cluster(base: &Path, conf: &str, scale: u32) -> Cluster {
    let c = Cluster::init("source", base);
    c.append_conf(conf);
    c.start();
    c.sql("postgres", "CREATE EXTENSION pg_blocktrack");
    c.pgbench_init(scale);
    c
}

/// A real pg_cron runs `run_backup` on a schedule: a full and then an
/// incremental backup, made in a background worker; the latest restores.
#[test]
fn pg_cron_schedules_backups_from_sql() {
    let base = scratch("cron");
    let c = cluster(
        &base,
        "shared_preload_libraries = 'pg_cron,pg_blocktrack'\ncron.database_name = 'postgres'\ncron.host = '/tmp'",
        2,
    );
    c.sql("postgres", "UPDATE pgbench_accounts SET abalance = 1 WHERE aid <= 100");
    c.sql("postgres", "CREATE EXTENSION pg_cron");
    let repo = base.join("repo");
    c.sql(
        "postgres",
        &format!(
            "SELECT cron.schedule('nightly', '* * * * *', $$SELECT blocktrack.run_backup('{0}', 'full'); \
             SELECT blocktrack.run_backup('{0}', 'incr')$$)",
            repo.display()
        ),
    );
    wait_for(150, "the cron job", || {
        c.sql("postgres", "SELECT count(*) FROM cron.job_run_details WHERE status IN ('succeeded', 'failed')") != "0"
    });
    c.sql("postgres", "SELECT cron.unschedule('nightly')");
    let detail = c.sql("postgres", "SELECT status || ': ' || coalesce(return_message, '') FROM cron.job_run_details");
    assert!(detail.starts_with("succeeded"), "{detail}");
    let list = info(&repo)["backups"].as_array().unwrap().clone();
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!((list[0]["type"].as_str(), list[1]["type"].as_str()), (Some("full"), Some("incr")));
    assert_eq!(list[1]["parent"], list[0]["backup_id"]);
    let rows = c.sql(
        "postgres",
        &format!(
            "SELECT backup_type || ':' || status FROM blocktrack.backups('{}') ORDER BY backup_id",
            repo.display()
        ),
    );
    assert_eq!(rows, "full:ok\nincr:ok");
    // The data as of the incremental (pg_cron's own tables moved on since).
    let digest = "SELECT md5(string_agg(aid || ':' || abalance, ',' ORDER BY aid)) FROM pgbench_accounts";
    let expected = c.sql("postgres", digest);
    let r = restore_and_start("restored", &repo, &base, 2, &[]);
    assert_eq!(r.sql("postgres", digest), expected, "restore of the scheduled incremental");
    assert_eq!(r.sql("postgres", "SELECT count(*) FROM pgbench_accounts WHERE abalance = 1"), "100");
}

/// run_backup of a large cluster with one stream, cancelled three ways
/// (pg_cancel_backend, cancel_backup(), pg_terminate_backend) while it
/// copies: nothing listed, no lock, no backup left running, and the next
/// backup works. The progress view shows SQL and CLI backups advancing.
#[test]
fn run_backup_is_cancelled_cleanly_and_progress_advances() {
    let base = scratch("cancel");
    let c = cluster(&base, "", 50);
    let repo = base.join("repo");
    let progress = |c: &Cluster| {
        c.sql("postgres", "SELECT pid || '|' || source || '|' || phase || '|' || bytes_done || '|' || bytes_total FROM blocktrack.progress")
    };
    for how in ["pg_cancel_backend", "cancel_backup", "pg_terminate_backend"] {
        let out = c.sql(
            "postgres",
            &format!("SELECT blocktrack.run_backup('{}', 'full', jobs => 1, wait => false) IS NULL", repo.display()),
        );
        assert_eq!(out, "t");
        let mut samples: Vec<u64> = Vec::new();
        wait_for(60, "the SQL backup copying", || {
            let p = progress(&c);
            let f: Vec<&str> = p.split('|').collect();
            if f.len() == 5 && f[2] == "copy" {
                samples.push(f[3].parse().unwrap());
            }
            samples.len() >= 3
        });
        assert!(samples.windows(2).all(|w| w[1] >= w[0]) && samples[2] > samples[0], "{how}: bytes done {samples:?}");
        let pid: i32 = progress(&c).split('|').next().unwrap().parse().unwrap();
        let source = progress(&c);
        assert!(source.contains("|sql|"), "{source}");
        match how {
            "cancel_backup" => assert_eq!(c.sql("postgres", "SELECT blocktrack.cancel_backup()"), "1"),
            f => assert_eq!(c.sql("postgres", &format!("SELECT {f}({pid})")), "t"),
        }
        wait_for(60, "the cancelled backup to end", || progress(&c).is_empty());
        assert!(ids(&repo).is_empty(), "{how}: a cancelled backup is listed");
        let lock = std::fs::read_to_string(repo.join("lock")).unwrap_or_default();
        assert!(lock.is_empty(), "{how}: the lock was left held by {lock}");
        assert_eq!(
            c.sql("postgres", "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'blocktrack_backup_%'"),
            "0",
            "{how}: the backup's slot is left"
        );
        assert_eq!(
            c.sql("postgres", &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}")),
            "0",
            "{how}: the worker is still there"
        );
        let err = c.try_sql("postgres", "SELECT pg_backup_stop()").unwrap_err();
        assert!(err.contains("backup is not in progress"), "{err}");
        let left: Vec<_> = std::fs::read_dir(repo.join("backups")).unwrap().flatten().collect();
        assert!(left.is_empty(), "{how}: the cancelled backup's files were left: {left:?}");
    }
    // The next backup works, from SQL; then a CLI backup shows in the view too.
    let id = c.sql("postgres", &format!("SELECT blocktrack.run_backup('{}', 'full')", repo.display()));
    assert_eq!(ids(&repo), vec![id]);
    let mut args = vec!["backup".to_string(), "-D".into(), c.data.display().to_string()];
    args.extend(c.conn());
    args.extend([
        "--repo".into(),
        repo.display().to_string(),
        "--max-rate".into(),
        "60M".into(),
        "-j".into(),
        "2".into(),
    ]);
    let mut cli = blockstream().args(&args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let mut samples: Vec<u64> = Vec::new();
    wait_for(60, "the CLI backup in the view", || {
        let p = progress(&c);
        let f: Vec<&str> = p.split('|').collect();
        if f.len() == 5 && f[1] == "cli" && f[2] == "copy" {
            samples.push(f[3].parse().unwrap());
        }
        samples.len() >= 3
    });
    assert!(samples[2] > samples[0], "CLI bytes done {samples:?}");
    assert!(cli.wait().unwrap().success());
    assert!(progress(&c).is_empty(), "a finished CLI backup still shows");
    assert_eq!(ids(&repo).len(), 2);
}

/// Who may call what: nothing without grants; with them, only allowed
/// repositories; an unknown repository is named with its SQLSTATE.
#[test]
fn sql_operations_follow_the_privilege_rules() {
    let base = scratch("opspriv");
    let allowed = base.join("allowed");
    std::fs::create_dir(&allowed).unwrap();
    chown_postgres(&allowed);
    let c = cluster(&base, &format!("blocktrack.allowed_repositories = '{}'", allowed.display()), 1);
    let repo = allowed.join("repo");
    c.sql(
        "postgres",
        "CREATE ROLE nobody_role LOGIN;
         CREATE ROLE operator LOGIN REPLICATION;
         GRANT USAGE ON SCHEMA blocktrack TO operator;
         GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA blocktrack TO operator;
         GRANT SELECT ON blocktrack.progress TO operator;
         GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean), pg_backup_stop(boolean) TO operator;",
    );
    let as_role = |role: &str, sql: &str| {
        let out = run(Command::new(pg_bin("psql"))
            .args(["-h", "/tmp", "-p", &c.port.to_string(), "-U", role, "-d", "postgres", "-XAtq"])
            .args(["-v", "ON_ERROR_STOP=1", "-v", "VERBOSITY=verbose", "-c", sql]));
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).to_string())
        }
    };
    let r = repo.display();
    for sql in [
        format!("SELECT blocktrack.run_backup('{r}')"),
        format!("SELECT * FROM blocktrack.backups('{r}')"),
        format!("SELECT * FROM blocktrack.metrics('{r}')"),
        format!("SELECT * FROM blocktrack.expire('{r}', 1)"),
        format!("SELECT * FROM blocktrack.run_verify('{r}')"),
        "SELECT * FROM blocktrack.progress".to_string(),
        "SELECT blocktrack.cancel_backup()".to_string(),
    ] {
        let err = as_role("nobody_role", &sql).unwrap_err();
        assert!(err.contains("42501"), "{sql}: {err}");
    }
    // Granted EXECUTE but not pg_write_server_files: refused.
    let err = as_role("operator", &format!("SELECT blocktrack.run_backup('{r}')")).unwrap_err();
    assert!(err.contains("42501") && err.contains("pg_write_server_files"), "{err}");
    c.sql("postgres", "GRANT pg_write_server_files, pg_read_server_files TO operator");
    let err = as_role("operator", &format!("SELECT blocktrack.run_backup('{}')", base.join("elsewhere").display()))
        .unwrap_err();
    assert!(err.contains("42501") && err.contains("not under blocktrack.allowed_repositories"), "{err}");
    let id = as_role("operator", &format!("SELECT blocktrack.run_backup('{r}', 'full')")).unwrap();
    assert_eq!(ids(&repo), vec![id.clone()]);
    assert_eq!(as_role("operator", &format!("SELECT backup_id FROM blocktrack.backups('{r}')")).unwrap(), id);
    let rows =
        as_role("operator", &format!("SELECT backup_id || ':' || ok FROM blocktrack.run_verify('{r}')")).unwrap();
    assert_eq!(rows, format!("{id}:true"));
    let err = as_role("operator", &format!("SELECT * FROM blocktrack.backups('{}')", allowed.join("absent").display()))
        .unwrap_err();
    assert!(err.contains("58P01"), "{err}");
}

/// Parses Prometheus text with Prometheus' own Python parser; returns
/// {"name{labels}": value}.
fn parse_prometheus(text: &str) -> serde_json::Value {
    let script = "import sys, json\nfrom prometheus_client.parser import text_string_to_metric_families\n\
        out = {}\nfor fam in text_string_to_metric_families(sys.stdin.read()):\n\
        \x20   for s in fam.samples:\n\
        \x20       labels = ','.join(f'{k}={v}' for k, v in sorted(s.labels.items()))\n\
        \x20       out[s.name + '{' + labels + '}'] = s.value\nprint(json.dumps(out))\n";
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "prometheus_client refused the metrics: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Metrics parse with Prometheus' parser and agree with `info`; the SQL
/// function gives the same samples. Retention: a dry run lists exactly what
/// the real run removes, every kept backup verifies and the newest
/// incremental restores; an expire killed mid-way leaves every listed
/// backup restorable. The report opens in Chromium, draws its charts and
/// names every backup.
#[test]
fn metrics_retention_and_report() {
    let base = scratch("opsmetrics");
    let c = cluster(&base, "", 2);
    let repo = base.join("repo");
    let pgbench =
        |t: &str| run_ok(Command::new(pg_bin("pgbench")).args(c.conn()).args(["-n", "-c", "2", "-t", t, "postgres"]));
    let mut last_dump = String::new();
    for (kind, load) in [
        ("full", "200"),
        ("incr", "300"),
        ("incr", "100"),
        ("full", "200"),
        ("incr", "300"),
        ("diff", "100"),
        ("incr", "200"),
    ] {
        backup(&c, &repo, &["--type", kind, "--no-fallback"]);
        last_dump = c.dumpall();
        pgbench(load);
        std::thread::sleep(Duration::from_millis(1100));
    }
    bs_ok(&["verify", "--repo", path(&repo)]);
    bs_ok(&["drill", "--repo", path(&repo)]);

    // Metrics against info.
    let text = bs_ok(&["metrics", "--repo", path(&repo)]);
    let m = parse_prometheus(&text);
    let list = info(&repo)["backups"].as_array().unwrap().clone();
    let last = |kind: &str| list.iter().rev().find(|b| b["type"] == kind).unwrap().clone();
    for kind in ["full", "incr", "diff"] {
        let b = last(kind);
        assert_eq!(
            m[format!("blockstream_last_backup_duration_seconds{{type={kind}}}")].as_f64(),
            b["stats"]["duration_secs"].as_f64(),
            "{kind}"
        );
        assert_eq!(
            m[format!("blockstream_last_backup_written_bytes{{type={kind}}}")].as_f64(),
            b["stats"]["bytes_written"].as_f64(),
            "{kind}"
        );
        assert_eq!(
            m[format!("blockstream_last_backup_read_bytes{{type={kind}}}")].as_f64(),
            b["stats"]["bytes_read"].as_f64(),
            "{kind}"
        );
    }
    assert_eq!(m["blockstream_backups{state=ok}"].as_f64(), Some(7.0));
    assert_eq!(m["blockstream_last_verify_success{}"].as_f64(), Some(1.0));
    assert_eq!(m["blockstream_last_drill_success{}"].as_f64(), Some(1.0));
    assert!(m["blockstream_last_drill_rto_seconds{}"].as_f64().unwrap() > 0.0);
    let size: f64 =
        String::from_utf8(run_ok(Command::new("du").args(["-sb", "--apparent-size"]).arg(&repo)).into_bytes())
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
    let reported = m["blockstream_repository_size_bytes{}"].as_f64().unwrap();
    assert!((reported - size).abs() < 64.0 * 1024.0, "repository size {reported} vs du {size}");
    // The same samples from SQL (ages and sizes move; compare the rest),
    // plus what only the server knows: its summarizer lag and archiver failures.
    let server_only = c.sql(
        "postgres",
        &format!("SELECT string_agg(metric || ' ' || value, ',' ORDER BY metric) FROM blocktrack.metrics('{}') WHERE metric IN ('blockstream_archive_command_failures_total', 'blockstream_summarizer_lag_bytes')", repo.display()),
    );
    assert!(
        server_only.starts_with("blockstream_archive_command_failures_total 0,blockstream_summarizer_lag_bytes "),
        "{server_only}"
    );
    let sql = c.sql(
        "postgres",
        &format!("SELECT metric || labels || ' ' || value FROM blocktrack.metrics('{}') WHERE metric NOT LIKE '%age_seconds' AND metric NOT LIKE '%size_bytes' AND metric NOT LIKE '%lag_bytes' AND metric <> 'blockstream_archive_command_failures_total'", repo.display()),
    );
    for line in sql.lines() {
        let (name, value) = line.rsplit_once(' ').unwrap();
        let expected = text
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} not in the CLI's metrics"));
        let v: f64 = expected.rsplit_once(' ').unwrap().1.parse().unwrap();
        assert!((v - value.parse::<f64>().unwrap()).abs() < 1e-6, "{line} vs {expected}");
    }
    assert!(
        c.sql(
            "postgres",
            &format!(
                "SELECT count(*) FROM blocktrack.metrics('{}') WHERE metric = 'blockstream_summarizer_lag_bytes'",
                repo.display()
            )
        ) == "1"
    );

    // Retention: the dry run names exactly what the real run removes.
    let dry: serde_json::Value = serde_json::from_str(&bs_ok(&[
        "expire",
        "--repo",
        path(&repo),
        "--retain-full",
        "1",
        "--retain-incr",
        "1",
        "--dry-run",
        "--output",
        "json",
    ]))
    .unwrap();
    let would: Vec<String> = dry["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["expire"] == true)
        .map(|d| d["backup_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids(&repo).len(), 7, "the dry run removed something");
    assert!(would.len() >= 3, "{would:?}");
    // A report with the retention state, before anything goes.
    let html = base.join("report.html");
    bs_ok(&["report", "--repo", path(&repo), "-o", path(&html), "--retain-full", "1", "--retain-incr", "1"]);
    check_report(&html, &ids(&repo), &base);
    // A kill between removing the first manifest and its files.
    let out = run(blockstream()
        .args(["expire", "--repo", path(&repo), "--retain-full", "1", "--retain-incr", "1"])
        .env(blockstream::failpoint::ENV, "expire-manifest-removed"));
    assert_eq!(out.status.code(), None, "the expire was not killed");
    let listed = ids(&repo);
    assert_eq!(listed.len(), 6, "{listed:?}");
    bs_ok(&["verify", "--repo", path(&repo)]);
    let before = info(&repo);
    let real: serde_json::Value = serde_json::from_str(&bs_ok(&[
        "expire",
        "--repo",
        path(&repo),
        "--retain-full",
        "1",
        "--retain-incr",
        "1",
        "--output",
        "json",
    ]))
    .unwrap();
    let mut removed: Vec<String> =
        real["removed"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    removed.push(would.iter().find(|w| !listed.contains(w)).unwrap().clone());
    removed.sort();
    assert_eq!(removed, would, "the dry run and the real run disagree");
    let kept = ids(&repo);
    assert_eq!(kept.len() + would.len(), 7);
    assert!(real["repository_bytes_after"].as_u64() < real["repository_bytes_before"].as_u64(), "{real}");
    eprintln!(
        "repository {} -> {} bytes after expire ({} backups listed before)",
        real["repository_bytes_before"],
        real["repository_bytes_after"],
        before["backups"].as_array().unwrap().len()
    );
    bs_ok(&["verify", "--repo", path(&repo)]);
    let r = restore_and_start("after-expire", &repo, &base, 2, &[]);
    assert_same_dump(&last_dump, &r.dumpall(), "the newest incremental after expire");
}

/// Opens the report in headless Chromium: no console message, every chart
/// region holds drawn (colored) pixels, every backup id is on the page.
fn check_report(html: &Path, ids: &[String], base: &Path) {
    let text = std::fs::read_to_string(html).unwrap();
    for id in ids {
        assert!(text.contains(id.as_str()), "{id} is not in the report");
    }
    let shot = base.join("report.png");
    let height =
        blockstream::report::HEADER + blockstream::report::SECTION * blockstream::report::CHARTS.len() as u32 + 300;
    let out = run(Command::new("chromium").args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--enable-logging=stderr",
        "--v=0",
        &format!("--user-data-dir={}", base.join("chromium").display()),
        &format!("--window-size={},{height}", blockstream::report::WIDTH),
        &format!("--screenshot={}", shot.display()),
        &format!("file://{}", html.display()),
    ]));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "chromium failed: {log}");
    assert!(!log.contains("CONSOLE"), "the page logged to the console: {log}");
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&shot).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut buf).unwrap();
    let channels = frame.color_type.samples();
    let pixel = |x: u32, y: u32| {
        let i = (y as usize * frame.width as usize + x as usize) * channels;
        (buf[i], buf[i + 1], buf[i + 2])
    };
    for (k, chart) in blockstream::report::CHARTS.iter().enumerate() {
        let top = blockstream::report::HEADER + blockstream::report::SECTION * k as u32 + 30;
        let mut colored = 0;
        for y in top..top + 230 {
            for x in 0..frame.width {
                let (r, g, b) = pixel(x, y);
                if r.max(g).max(b) - r.min(g).min(b) > 60 {
                    colored += 1;
                }
            }
        }
        // One dot is about a hundred pixels; every chart here has at least one mark.
        assert!(colored > 60, "chart {chart} has only {colored} drawn pixels");
    }
}
