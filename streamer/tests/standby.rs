//! Backups taken from a streaming standby, the primary's I/O left to its
//! traffic: the summarizer runs on the standby over the WAL it replays; a
//! full backup and an incremental are taken from the standby while pgbench
//! runs on the primary, and restore to a cluster that starts, keeps
//! pgbench's invariant and passes amcheck; a quiet one equals the primary.
//! After the standby is promoted, the next incremental builds on the backup
//! taken before the switch point (the timeline history proves it lies in the
//! promoted server's history) and its restore equals the promoted server;
//! the old primary, started again on its own timeline, is not in that
//! history: its next incremental falls back to full and says why.
//!
//! Run as root with pg_blocktrack installed:
//! `cargo test --release -p blockstream --test standby -- --test-threads=1`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(120);
    while !f() {
        assert!(Instant::now() < until, "{what}: not within 120 s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A streaming standby of `primary` made with pg_basebackup -R, started.
fn standby_of(primary: &Cluster, base: &Path) -> Cluster {
    let data = base.join("standby-data");
    run_ok(
        as_postgres("pg_basebackup")
            .args(primary.conn())
            .arg("-D")
            .arg(&data)
            .args(["-R", "-X", "stream", "-c", "fast"]),
    );
    let s = Cluster::restored("standby", &data, base);
    s.start();
    assert_eq!(s.sql("postgres", "SELECT pg_is_in_recovery()"), "t");
    s
}

/// The standby has replayed everything the primary has written so far.
fn caught_up(primary: &Cluster, standby: &Cluster) {
    let lsn = primary.sql("postgres", "SELECT pg_current_wal_lsn()");
    wait_until("the standby's replay", || {
        standby.sql("postgres", &format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn")) == "t"
    });
}

/// A checkpoint on the primary, replayed by the standby: the next
/// pg_backup_start there begins at a new restartpoint.
fn checkpoint(primary: &Cluster, standby: &Cluster) {
    primary.sql("postgres", "CHECKPOINT");
    caught_up(primary, standby);
}

#[test]
fn backups_from_a_standby_restore_and_go_on_across_a_promotion() {
    let base = scratch("standby");
    let primary = Cluster::init("primary", &base);
    primary.start();
    primary.sql("postgres", "CREATE EXTENSION pg_blocktrack");
    primary.pgbench_init(5);
    let standby = standby_of(&primary, &base);
    // The standby's own summarizer, over the WAL it replays.
    wait_until("the standby's summarizer", || {
        standby.sql("postgres", "SELECT worker_pid IS NOT NULL AND valid_since_lsn <> '0/0' FROM blocktrack.status()")
            == "t"
    });
    let repo = base.join("repo");
    let repo_s = repo.to_str().unwrap();

    // Full and incremental from the standby, pgbench on the primary throughout.
    let mut load = primary.pgbench(&["-c", "2", "-T", "600"]);
    checkpoint(&primary, &standby);
    let full = backup(&standby, &repo, &["-j", "2"]);
    assert_eq!(full["type"], "full", "{full}");
    std::thread::sleep(Duration::from_secs(2));
    checkpoint(&primary, &standby);
    let incr = backup(&standby, &repo, &["-j", "2", "--type", "incr", "--no-fallback"]);
    assert_eq!(incr["type"], "incr", "{incr}");
    let _ = load.kill();
    let _ = load.wait();
    let m = load_manifest(&repo, incr["backup_id"].as_str().unwrap());
    assert!(m.backup_label.contains("BACKUP FROM: standby"), "{}", m.backup_label);
    assert!(m.files.iter().any(|f| f.path == "standby.signal"), "the standby's files are what is backed up");

    let restored = restore_and_start("restored", &repo, &base, 2, &[]);
    assert!(!restored.data.join("standby.signal").exists(), "a restore recovers and is promoted, not a standby");
    assert_eq!(restored.sql("postgres", "SELECT pg_is_in_recovery()"), "f");
    assert_pgbench_balances(&restored, "chain taken from the standby under pgbench");
    assert_amcheck_clean(&restored, "chain taken from the standby under pgbench");
    let restored_history: u64 = restored.sql("postgres", "SELECT count(*) FROM pgbench_history").parse().unwrap();
    assert!(restored_history > 0, "pgbench's transactions up to the backup are there");
    restored.stop();
    drop(restored);

    // Quiet: an incremental from the standby equals the primary.
    checkpoint(&primary, &standby);
    let quiet = backup(&standby, &repo, &["--type", "incr", "--no-fallback"]);
    assert_eq!(quiet["type"], "incr", "{quiet}");
    let restored = restore_and_start("quiet", &repo, &base, 2, &[]);
    assert_same_dump(&primary.dumpall(), &restored.dumpall(), "incremental from a caught-up standby");
    restored.stop();
    drop(restored);

    // From SQL on the standby, as a pg_cron job there would: the background
    // worker's backup_start and backup_stop run on the standby too.
    let sql_repo = base.join("sql-repo");
    standby.append_conf(&format!("blocktrack.allowed_repositories = '{}'", base.display()));
    standby.sql("postgres", "SELECT pg_reload_conf()");
    wait_until("the reloaded setting", || {
        standby.sql("postgres", "SHOW blocktrack.allowed_repositories") == base.display().to_string()
    });
    checkpoint(&primary, &standby);
    let id = standby.sql("postgres", &format!("SELECT blocktrack.run_backup('{}', 'full')", sql_repo.display()));
    let m = load_manifest(&sql_repo, &id);
    assert!(m.backup_label.contains("BACKUP FROM: standby"), "a SQL backup on the standby: {}", m.backup_label);

    // Failover: the standby becomes a primary on timeline 2. Its summaries
    // go on across the switch point, and the next incremental builds on the
    // backup of timeline 1: it ended before timeline 2 began.
    primary.stop();
    run_ok(as_postgres("pg_ctl").arg("-D").arg(&standby.data).args(["-w", "promote"]));
    standby.wait_promoted();
    wait_until("the summarizer on the new timeline", || {
        standby.sql("postgres", "SELECT timeline = 2 AND worker_pid IS NOT NULL FROM blocktrack.status()") == "t"
    });
    let valid_since = standby.sql("postgres", "SELECT valid_since_lsn FROM blocktrack.status()");
    let switch = standby.sql("postgres", "SELECT pg_current_wal_lsn()");
    assert_eq!(
        standby.sql("postgres", &format!("SELECT '{valid_since}'::pg_lsn <= '{}'::pg_lsn", quiet["start_lsn"].as_str().unwrap())),
        "t",
        "the promotion left no gap: changes are known since {valid_since}, before the last backup of timeline 1 (now {switch})"
    );
    let mut w = standby.pgbench(&["-c", "2", "-t", "300"]);
    assert!(w.wait().unwrap().success());
    let after = backup(&standby, &repo, &["-j", "2", "--type", "incr", "--no-fallback"]);
    assert_eq!(after["type"], "incr", "{after}");
    assert_eq!(after["parent"], quiet["backup_id"], "{after}");
    let m = load_manifest(&repo, after["backup_id"].as_str().unwrap());
    assert_eq!(m.timeline, 2, "the incremental is of timeline 2");
    let restored = restore_and_start("promoted", &repo, &base, 2, &[]);
    assert_same_dump(&standby.dumpall(), &restored.dumpall(), "incremental on timeline 2 over a parent on timeline 1");
    assert_pgbench_balances(&restored, "incremental across the promotion");
    assert_amcheck_clean(&restored, "incremental across the promotion");
    restored.stop();
    drop(restored);
    standby.stop();

    // The old primary, started again, writes timeline 1 on past the switch
    // point: the backup of timeline 2 is not in its history. With
    // --no-fallback the incremental fails naming why; without it the backup
    // is full and records why.
    primary.start();
    wait_until("the old primary's summarizer", || {
        primary.sql("postgres", "SELECT worker_pid IS NOT NULL FROM blocktrack.status()") == "t"
    });
    let mut w = primary.pgbench(&["-c", "2", "-t", "100"]);
    assert!(w.wait().unwrap().success());
    let mut args: Vec<String> = vec!["backup".into(), "-D".into(), primary.data.display().to_string()];
    args.extend(primary.conn());
    args.extend(["--repo".into(), repo_s.into(), "--type".into(), "incr".into()]);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _, err) = bs(&[a.as_slice(), &["--no-fallback"]].concat());
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("timeline 2 is not in the history of timeline 1"), "the refusal names the timelines: {err}");
    let (code, _, err) = bs(&a);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("took a full backup") && err.contains("timeline"), "{err}");
    let info = bs_ok(&["info", "--repo", repo_s, "--output", "json"]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    let last = v["backups"].as_array().unwrap().last().unwrap().clone();
    assert!(
        last["parent"].is_null() && last["full_reason"].as_str().is_some_and(|r| r.contains("timeline")),
        "the old primary's backup is full and records why: {last}"
    );
    let restored = restore_and_start("old-primary", &repo, &base, 2, &[]);
    assert_same_dump(&primary.dumpall(), &restored.dumpall(), "full backup of the old primary");
}
