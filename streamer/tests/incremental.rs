//! Incremental and differential backups on real clusters: a chain with a
//! different change set before each backup, every backup restored and
//! compared with the source as it was; load during every backup; a tracking
//! gap that forces a full backup; a missing parent.
//!
//! Run as root with pg_blocktrack installed:
//! `cargo test --release -p blockstream --test incremental -- --test-threads=1`.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;

fn source(base: &Path) -> Cluster {
    let c = Cluster::init("source", base);
    c.start();
    c.sql("postgres", "CREATE EXTENSION pg_blocktrack; CREATE EXTENSION pg_visibility; CREATE EXTENSION amcheck;");
    c
}

/// pg_visibility finds no page whose visibility map bits lie, and amcheck
/// finds no corrupt index or heap, in any database.
fn assert_physically_sane(c: &Cluster, what: &str) {
    for db in c.sql("postgres", "SELECT datname FROM pg_database WHERE datallowconn ORDER BY 1").lines() {
        c.sql(db, "CREATE EXTENSION IF NOT EXISTS pg_visibility");
        let bad = c.sql(
            db,
            "SELECT (SELECT count(*) FROM pg_class c CROSS JOIN LATERAL pg_check_visible(c.oid) \
                      WHERE c.relkind IN ('r', 'm', 't') AND c.relpersistence = 'p') \
                 + (SELECT count(*) FROM pg_class c CROSS JOIN LATERAL pg_check_frozen(c.oid) \
                      WHERE c.relkind IN ('r', 'm', 't') AND c.relpersistence = 'p')",
        );
        assert_eq!(bad, "0", "{what}: pg_visibility reports {bad} tuples in database {db}");
    }
    assert_amcheck_clean(c, what);
}

/// full → incr → incr → diff → incr, a different change set before each;
/// every backup restores to exactly the source as it was.
#[test]
fn chain_of_incrementals_and_a_differential_restores_every_point() {
    let base = scratch("chain");
    let src = source(&base);
    src.sql(
        "postgres",
        "CREATE TABLE will_change (id int PRIMARY KEY, v text);
         CREATE TABLE will_grow (id int, v text);
         CREATE TABLE will_shrink (id int, v text);
         CREATE TABLE will_get_vacuumed (id int, v text);
         CREATE TABLE will_get_dropped (id int, v text);
         CREATE TABLE will_get_rewritten (id int PRIMARY KEY, v text);
         INSERT INTO will_change SELECT g, repeat('c', 100) FROM generate_series(1, 40000) g;
         INSERT INTO will_shrink SELECT g, repeat('s', 100) FROM generate_series(1, 40000) g;
         INSERT INTO will_get_vacuumed SELECT g, repeat('v', 100) FROM generate_series(1, 40000) g;
         INSERT INTO will_get_dropped SELECT g, repeat('d', 100) FROM generate_series(1, 20000) g;
         INSERT INTO will_get_rewritten SELECT g, repeat('r', 100) FROM generate_series(1, 20000) g;",
    );
    src.sql("postgres", "VACUUM (FREEZE)");
    let repo = base.join("repo");
    let mut points = Vec::new();
    let mut take = |kind: &str, expect: &str| {
        let out = backup(&src, &repo, &["-j", "2", "--type", kind, "--no-fallback"]);
        assert_eq!(out["type"], expect, "{out}");
        points.push((out["backup_id"].as_str().unwrap().to_string(), src.dumpall(), out));
    };
    take("full", "full");

    // 1: updates clear visibility bits of some frozen pages; a new table grows.
    src.sql("postgres", "UPDATE will_change SET v = 'changed once' WHERE id <= 2000 OR id % 1000 = 0");
    src.sql("postgres", "INSERT INTO will_grow SELECT g, repeat('g', 200) FROM generate_series(1, 30000) g");
    take("incr", "incr");

    // 2: VACUUM truncates one table, vacuums another, a table is dropped.
    src.sql("postgres", "DELETE FROM will_shrink WHERE id > 5000");
    src.sql("postgres", "VACUUM will_shrink");
    src.sql("postgres", "DELETE FROM will_get_vacuumed WHERE id % 4 = 0");
    src.sql("postgres", "VACUUM will_get_vacuumed");
    src.sql("postgres", "DROP TABLE will_get_dropped");
    take("incr", "incr");

    // 3 (differential, on the full): a rewrite and a new database.
    src.sql("postgres", "VACUUM FULL will_get_rewritten");
    src.sql("postgres", "CREATE DATABASE newdb");
    src.sql("newdb", "CREATE TABLE fresh AS SELECT g FROM generate_series(1, 10000) g");
    take("diff", "diff");

    // 4 (on the differential): TRUNCATE and refill, more growth.
    src.sql("postgres", "TRUNCATE will_change");
    src.sql("postgres", "INSERT INTO will_change SELECT g, 'refilled' FROM generate_series(1, 5000) g");
    src.sql("postgres", "INSERT INTO will_grow SELECT g, 'more' FROM generate_series(1, 10000) g");
    src.sql("postgres", "VACUUM will_grow");
    take("incr", "incr");

    // Parents: each incremental builds on the one before; the differential on the full.
    let ids: Vec<&str> = points.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(points[1].2["parent"], ids[0]);
    assert_eq!(points[2].2["parent"], ids[1]);
    assert_eq!(points[3].2["parent"], ids[0]);
    assert_eq!(points[4].2["parent"], ids[3]);
    // Incrementals store a fraction of the blocks, by the tool's count and
    // on disk: every stream file of each incremental is far smaller than the full's.
    let share = points[1].2["changed_share"].as_f64().unwrap();
    assert!(share > 0.0 && share < 0.5, "changed share {share}");
    let on_disk = |id: &str| -> u64 {
        std::fs::read_dir(repo.join("backups").join(id))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("stream-"))
            .map(|e| e.metadata().unwrap().len())
            .sum()
    };
    let full_bytes = on_disk(ids[0]);
    for (i, id) in ids.iter().enumerate().skip(1) {
        let bytes = on_disk(id);
        assert_eq!(bytes, points[i].2["stats"]["bytes_written"].as_u64().unwrap(), "backup {i}: bytes written");
        // The differential copies the new database whole; the others are small.
        let limit = if i == 3 { full_bytes } else { full_bytes / 2 };
        assert!(bytes < limit, "backup {i} ({id}) stores {bytes} bytes, the full {full_bytes}");
    }
    // A table dropped since the parent is absent from the next manifest.
    let dropped = points[0].2["backup_id"].as_str().unwrap();
    let dropped_paths: Vec<String> = load_manifest(&repo, dropped)
        .files
        .iter()
        .map(|f| f.path.clone())
        .filter(|p| p.starts_with("base/") && !load_manifest(&repo, ids[2]).files.iter().any(|f| &f.path == p))
        .collect();
    assert!(!dropped_paths.is_empty(), "the dropped table's files are in the manifest after DROP");
    bs_ok(&["verify", "--repo", repo.to_str().unwrap()]);

    for (i, (id, dump, _)) in points.iter().enumerate() {
        let name = format!("restored-{i}");
        let restored = restore_and_start(&name, &repo, &base, 3, &["--backup", id]);
        assert_same_dump(dump, &restored.dumpall(), &format!("restore of backup {i} ({id})"));
        assert_physically_sane(&restored, &format!("restore of backup {i}"));
        restored.stop();
        let _ = std::fs::remove_dir_all(base.join(format!("{name}-data")));
    }
}

/// pgbench runs during every backup of a chain and stops before its
/// backup_stop: each restore equals the source at that point.
#[test]
fn chain_under_load_restores_every_point() {
    let base = scratch("chainload");
    let src = source(&base);
    src.pgbench_init(10);
    let repo = base.join("repo");
    let mut points = Vec::new();
    for (kind, rate) in [("full", "40M"), ("incr", "3M"), ("incr", "3M")] {
        let mut pgbench = src.pgbench(&["-n", "-c", "2", "-T", "2"]);
        let mut args: Vec<String> = vec!["backup".into(), "-D".into(), src.data.display().to_string()];
        args.extend(src.conn());
        args.extend(
            [
                "--repo",
                repo.to_str().unwrap(),
                "-j",
                "2",
                "--type",
                kind,
                "--no-fallback",
                "--max-rate",
                rate,
                "--output",
                "json",
            ]
            .map(String::from),
        );
        let mut child = blockstream().args(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        assert!(pgbench.wait().unwrap().success());
        assert!(child.try_wait().unwrap().is_none(), "{kind}: pgbench must stop before backup_stop");
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{kind} backup failed: {}", String::from_utf8_lossy(&out.stderr));
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(summary["type"], kind);
        // pgbench committed transactions between the backup's start and its stop.
        let during = src.sql(
            "postgres",
            &format!(
                "SELECT count(*) FROM pgbench_history WHERE mtime BETWEEN '{}'::timestamptz AND '{}'::timestamptz",
                summary["start_time"].as_str().unwrap(),
                summary["stop_time"].as_str().unwrap()
            ),
        );
        assert!(during.parse::<u64>().unwrap() > 50, "{kind}: only {during} transactions during the copy");
        points.push((summary["backup_id"].as_str().unwrap().to_string(), src.dumpall()));
    }
    for (i, (id, dump)) in points.iter().enumerate() {
        let restored = restore_and_start(&format!("restored-{i}"), &repo, &base, 2, &["--backup", id]);
        assert_same_dump(dump, &restored.dumpall(), &format!("restore of backup {i} ({id})"));
        restored.stop();
    }
}

/// A gap in tracking: --type incr falls back to full and says why;
/// --no-fallback refuses. A missing parent stops a restore, naming it.
#[test]
fn gap_forces_full_and_missing_parent_is_named() {
    let base = scratch("fallback");
    let src = source(&base);
    src.pgbench_init(2);
    let repo = base.join("repo");
    let full = backup(&src, &repo, &["-j", "2"])["backup_id"].as_str().unwrap().to_string();

    // Tracking off and on again: changes since the full backup are unknown.
    src.sql("postgres", "ALTER SYSTEM SET blocktrack.enabled = off");
    src.sql("postgres", "SELECT pg_reload_conf()");
    let wait_slot = |present: bool| {
        for _ in 0..100 {
            let n = src.sql("postgres", "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pg_blocktrack'");
            if (n == "1") == present {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the slot did not {}", if present { "come back" } else { "go away" });
    };
    wait_slot(false);
    // WAL moves on and a checkpoint moves the redo pointer past where tracking stopped.
    src.sql("postgres", "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid < 1000");
    src.sql("postgres", "SELECT pg_switch_wal()");
    src.sql("postgres", "CHECKPOINT");
    src.sql("postgres", "ALTER SYSTEM SET blocktrack.enabled = on");
    src.sql("postgres", "SELECT pg_reload_conf()");
    wait_slot(true);

    let mut args: Vec<String> = vec!["backup".into(), "-D".into(), src.data.display().to_string()];
    args.extend(src.conn());
    args.extend(["--repo", repo.to_str().unwrap(), "--type", "incr"].map(String::from));
    let mut strict = args.clone();
    strict.push("--no-fallback".into());
    let (code, _, err) = bs(&strict.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("an incremental backup is not possible") && err.contains(&full), "{err}");
    assert!(err.contains("without a gap only since"), "{err}");
    let info: serde_json::Value =
        serde_json::from_str(&bs_ok(&["info", "--repo", repo.to_str().unwrap(), "--output", "json"])).unwrap();
    assert_eq!(info["backups"].as_array().unwrap().len(), 1, "the refused backup left nothing behind");

    args.extend(["--output".into(), "json".into()]);
    let (code, out, err) = bs(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("took a full backup") && err.contains("without a gap only since"), "{err}");
    let out: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(out["type"], "full");
    assert!(out["full_reason"].as_str().unwrap().contains(&full));

    // Now an incremental on that full backup works; without its parent it cannot restore.
    src.sql("postgres", "UPDATE pgbench_accounts SET abalance = 1 WHERE aid < 100");
    let incr = backup(&src, &repo, &["--type", "incr", "--no-fallback"]);
    let parent = incr["parent"].as_str().unwrap().to_string();
    std::fs::rename(repo.join("backups").join(&parent), base.join("parent-moved")).unwrap();
    let target = base.join("target");
    let (code, _, err) = bs(&["restore", "--repo", repo.to_str().unwrap(), "-D", target.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!("builds on backup {parent}, which cannot be used")),
        "the error must name the missing parent: {err}"
    );
    let (code, out, _) = bs(&["verify", "--repo", repo.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(out.contains(&parent), "{out}");

    // A damaged (not missing) parent: its manifest, then one of its chunks.
    std::fs::rename(base.join("parent-moved"), repo.join("backups").join(&parent)).unwrap();
    let manifest = repo.join("backups").join(&parent).join("manifest.json");
    let pristine = std::fs::read(&manifest).unwrap();
    let mut bad = pristine.clone();
    bad[pristine.len() / 3] ^= 0x01;
    std::fs::write(&manifest, &bad).unwrap();
    let (code, _, err) = bs(&["restore", "--repo", repo.to_str().unwrap(), "-D", target.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("builds on backup {parent}, which cannot be used")) && err.contains("is damaged"),
        "{err}"
    );
    std::fs::write(&manifest, &pristine).unwrap();
    let m = load_manifest(&repo, &parent);
    let stream = repo.join("backups").join(&parent).join("stream-00.bsz");
    let pristine = std::fs::read(&stream).unwrap();
    let mut bad = pristine.clone();
    bad[(m.streams[0].chunks[0].offset + 5) as usize] ^= 0x01;
    std::fs::write(&stream, &bad).unwrap();
    let (code, _, err) = bs(&["restore", "--repo", repo.to_str().unwrap(), "-D", target.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("chunk 0 of stream-00.bsz in backup {parent} is damaged")), "{err}");
    assert!(!target.exists(), "a restore from a damaged parent wrote its target");
    std::fs::write(&stream, &pristine).unwrap();
}

/// A data directory put back from a copy writes other WAL at LSNs an
/// incremental of the abandoned history covered: the next incremental must
/// not build on that backup. It falls back to full, naming the reason, and
/// its restore holds the new history's change and not the abandoned one's.
#[test]
fn parent_from_an_abandoned_history_is_refused() {
    let base = scratch("history");
    let src = source(&base);
    src.sql("postgres", "CREATE TABLE rows (id int PRIMARY KEY, v text); INSERT INTO rows SELECT g, 'original' FROM generate_series(1, 1000) g");
    let repo = base.join("repo");
    backup(&src, &repo, &[]);
    src.stop();
    let snapshot = base.join("snapshot");
    copy_tree(&src.data, &snapshot);
    src.start();
    src.sql("postgres", "UPDATE rows SET v = 'abandoned history' WHERE id = 1");
    let i1 = backup(&src, &repo, &["--type", "incr", "--no-fallback"]);
    let i1_stop = i1["stop_lsn"].as_str().unwrap().to_string();
    // The data directory is put back: state, summaries and slot come back with it.
    src.stop();
    std::fs::remove_dir_all(&src.data).unwrap();
    copy_tree(&snapshot, &src.data);
    src.start();
    src.sql("postgres", "UPDATE rows SET v = 'new history' WHERE id = 2");
    let until = std::time::Instant::now() + Duration::from_secs(60);
    // Past the abandoned incremental's whole range, so only its checkpoint can tell.
    while src.sql("postgres", &format!("SELECT pg_current_wal_lsn() > '{i1_stop}'")) != "t" {
        assert!(std::time::Instant::now() < until, "WAL never passed the abandoned incremental's stop");
        src.sql("postgres", "CREATE TABLE IF NOT EXISTS filler (v text); INSERT INTO filler SELECT repeat('f', 500) FROM generate_series(1, 2000); SELECT pg_switch_wal();");
    }
    let mut args: Vec<String> = vec!["backup".into(), "-D".into(), src.data.display().to_string()];
    args.extend(src.conn());
    args.extend(["--repo", repo.to_str().unwrap(), "--type", "incr", "--output", "json"].map(String::from));
    let (code, out, err) = bs(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{err}");
    let next: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_ne!(next["parent"], i1["backup_id"], "the next incremental built on a backup of the abandoned history");
    assert_eq!(next["type"], "full", "{next}");
    let reason = next["full_reason"].as_str().unwrap();
    assert!(reason.contains(i1["backup_id"].as_str().unwrap()) && reason.contains("comes from another"), "{reason}");
    let expected = src.dumpall();
    let restored = restore_and_start("restored", &repo, &base, 2, &[]);
    assert_same_dump(&expected, &restored.dumpall(), "restore after the history changed");
    assert_eq!(restored.sql("postgres", "SELECT v FROM rows WHERE id IN (1, 2) ORDER BY id"), "original\nnew history");
}
