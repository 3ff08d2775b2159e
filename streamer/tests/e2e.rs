//! End-to-end tests on real PostgreSQL 15 clusters: online backups under
//! load, parallel restores that must start and hold exactly the source's
//! data, tablespaces, damaged repositories and bad input.
//!
//! Run as root (clusters run as `postgres`), with pg_blocktrack installed:
//! `cargo test --release -p blockstream --test e2e -- --test-threads=1`.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

fn manifest_of(repo: &Path, id: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(repo.join("backups").join(id).join("manifest.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// pgbench runs while files are copied and stops before backup_stop; during
/// the copy one table is dropped and another truncated by VACUUM. Restores
/// with -j 1 and -j 4 must both equal the source.
#[test]
fn full_backup_under_load_restores_identically() {
    let base = scratch("load");
    let src = Cluster::init("source", &base);
    src.start();
    src.sql("postgres", "CREATE EXTENSION pg_blocktrack");
    src.pgbench_init(5);
    // will_shrink is the largest file: copied first, it is still being read
    // when VACUUM truncates it (its rows are deleted before the backup, so
    // the VACUUM during the copy is quick).
    src.sql(
        "postgres",
        "CREATE TABLE will_get_dropped AS SELECT g, repeat('d', 500) AS filler FROM generate_series(1, 20000) g;
         CREATE TABLE will_shrink AS SELECT g, repeat('s', 500) AS filler FROM generate_series(1, 150000) g;
         ALTER TABLE will_shrink SET (autovacuum_enabled = off);",
    );
    src.sql("postgres", "DELETE FROM will_shrink WHERE g > 500");
    src.sql("postgres", "CHECKPOINT");
    let shrink_path = src.sql("postgres", "SELECT pg_relation_filepath('will_shrink')");
    let repo = base.join("repo");

    // About 170 MiB at 12 MiB/s: the copy takes ~14 s; pgbench runs for the first 6.
    let mut pgbench = src.pgbench(&["-n", "-c", "2", "-T", "6"]);
    let mut args: Vec<String> = vec!["backup".into(), "-D".into(), src.data.display().to_string()];
    args.extend(src.conn());
    args.extend(
        ["--repo", &repo.display().to_string(), "-j", "2", "--max-rate", "12M", "--output", "json"].map(String::from),
    );
    let mut backup = blockstream().args(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();

    // Wait until the copy is under way (a stream file holds its first chunk:
    // 4 MiB of data read; will_shrink compresses to almost nothing, so the
    // stream's size says little more), then change the schema.
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let copying = std::fs::read_dir(repo.join("backups"))
            .ok()
            .into_iter()
            .flatten()
            .flatten()
            .any(|b| std::fs::metadata(b.path().join("stream-00.bsz")).map(|m| m.len() > 32).unwrap_or(false));
        if copying {
            break;
        }
        assert!(Instant::now() < until, "the backup never started copying");
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = src.sql("postgres", "SELECT pg_relation_size('will_shrink')");
    src.sql("postgres", "VACUUM will_shrink");
    src.sql("postgres", "DROP TABLE will_get_dropped");
    let after = src.sql("postgres", "SELECT pg_relation_size('will_shrink')");
    assert!(
        after.parse::<u64>().unwrap() < before.parse::<u64>().unwrap() / 4,
        "VACUUM did not truncate: {before} -> {after}"
    );
    assert!(backup.try_wait().unwrap().is_none(), "the backup ended before the schema changes were done");

    assert!(pgbench.wait().unwrap().success(), "pgbench failed");
    assert!(backup.try_wait().unwrap().is_none(), "pgbench must stop before backup_stop");
    let out = backup.wait_with_output().unwrap();
    assert!(out.status.success(), "backup failed: {}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = summary["backup_id"].as_str().unwrap();

    // The truncation hit a mapped read of will_shrink: the copy says so.
    let m = manifest_of(&repo, id);
    let shrunk = m["files"].as_array().unwrap().iter().find(|f| f["path"] == shrink_path.as_str()).unwrap();
    assert_eq!(shrunk["truncated"], true, "VACUUM's truncation of {shrink_path} was not seen by the copy: {shrunk}");

    let expected = src.dumpall();
    assert!(expected.contains("will_shrink") && !expected.contains("will_get_dropped"));
    for jobs in [1, 4] {
        let restored = restore_and_start(&format!("restored-j{jobs}"), &repo, &base, jobs, &[]);
        assert_same_dump(&expected, &restored.dumpall(), &format!("restore -j {jobs}"));
        restored.stop();
    }
}

/// pgbench runs from before the start to after the end of the backup: the
/// restored cluster keeps pgbench's invariant and amcheck finds nothing.
#[test]
fn backup_with_load_throughout_keeps_pgbench_invariant() {
    let base = scratch("throughout");
    let src = Cluster::init("source", &base);
    src.start();
    src.sql("postgres", "CREATE EXTENSION pg_blocktrack");
    src.pgbench_init(10);
    let repo = base.join("repo");
    let mut pgbench = src.pgbench(&["-n", "-c", "2", "-T", "600"]);
    std::thread::sleep(Duration::from_secs(2));
    backup(&src, &repo, &["-j", "2"]);
    assert!(pgbench.try_wait().unwrap().is_none(), "pgbench must still run when the backup ends");
    let _ = pgbench.kill();
    let _ = pgbench.wait();

    let restored = restore_and_start("restored", &repo, &base, 2, &[]);
    let sums = restored.sql(
        "postgres",
        "SELECT (SELECT sum(abalance) FROM pgbench_accounts) || ' ' || (SELECT sum(tbalance) FROM pgbench_tellers) \
         || ' ' || (SELECT sum(bbalance) FROM pgbench_branches) || ' ' || (SELECT count(*) FROM pgbench_history)",
    );
    let v: Vec<i64> = sums.split(' ').map(|s| s.parse().unwrap()).collect();
    assert!(v[0] == v[1] && v[1] == v[2], "balances disagree after restore: {sums}");
    assert!(v[3] > 0, "no pgbench transaction made it into the backup: {sums}");
    assert_amcheck_clean(&restored, "restore under load");
}

/// A table and index in a user tablespace restore with and without --tablespace-map.
#[test]
fn tablespace_restores_with_and_without_mapping() {
    let base = scratch("tablespace");
    let src = Cluster::init("source", &base);
    src.start();
    let location = base.join("ts1");
    std::fs::create_dir(&location).unwrap();
    chown_postgres(&location);
    src.sql("postgres", "CREATE EXTENSION pg_blocktrack");
    src.sql("postgres", &format!("CREATE TABLESPACE ts1 LOCATION '{}'", location.display()));
    src.sql(
        "postgres",
        "CREATE TABLE in_ts TABLESPACE ts1 AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 50000) g;
         CREATE INDEX in_ts_v ON in_ts (v) TABLESPACE ts1;",
    );
    let checksum = "SELECT md5(string_agg(id || ':' || v, ',' ORDER BY id)) FROM in_ts";
    let expected = src.sql("postgres", checksum);
    let repo = base.join("repo");
    backup(&src, &repo, &["-j", "2"]);

    // With a mapping: the tablespace lands in the new place.
    let moved = base.join("ts1-moved");
    let map = format!("{}={}", location.display(), moved.display());
    let restored = restore_and_start("mapped", &repo, &base, 2, &["--tablespace-map", &map]);
    assert_eq!(restored.sql("postgres", checksum), expected);
    assert_eq!(
        restored.sql("postgres", "SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'ts1'"),
        moved.display().to_string()
    );
    assert_eq!(restored.sql("postgres", "SELECT count(*) FROM in_ts WHERE v = md5('4242')"), "1");
    restored.stop();

    // Without a mapping: the original location, which must be free.
    src.stop();
    std::fs::rename(&location, base.join("ts1-source")).unwrap();
    let restored = restore_and_start("unmapped", &repo, &base, 2, &[]);
    assert_eq!(restored.sql("postgres", checksum), expected);
    assert_eq!(
        restored.sql("postgres", "SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'ts1'"),
        location.display().to_string()
    );
    restored.stop();
}

/// One flipped byte in a stream: restore fails naming the chunk and its
/// files before writing them; verify fails too. A manifest path with `..` is refused.
#[test]
fn damaged_stream_and_unsafe_manifest_are_refused() {
    let base = scratch("damage");
    let src = Cluster::init("source", &base);
    src.start();
    src.sql("postgres", "CREATE EXTENSION pg_blocktrack");
    src.pgbench_init(2);
    let repo = base.join("repo");
    let id = backup(&src, &repo, &["-j", "2"])["backup_id"].as_str().unwrap().to_string();
    let dir = repo.join("backups").join(&id);
    let m = manifest_of(&repo, &id);
    let chunk = &m["streams"][1]["chunks"][0];
    let victims: Vec<String> = m["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["chunks"].as_array().unwrap().iter().any(|c| c[0] == 1 && c[1] == 0))
        .map(|f| f["path"].as_str().unwrap().to_string())
        .collect();
    assert!(!victims.is_empty());

    let stream = dir.join("stream-01.bsz");
    let pristine = std::fs::read(&stream).unwrap();
    let mut bytes = pristine.clone();
    let at = (chunk["offset"].as_u64().unwrap() + chunk["stored"].as_u64().unwrap() / 2) as usize;
    bytes[at] ^= 0x01;
    std::fs::write(&stream, &bytes).unwrap();

    let target = base.join("target");
    let (code, _, err) = bs(&["restore", "--repo", repo.to_str().unwrap(), "-D", target.to_str().unwrap(), "-j", "2"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("chunk 0 of stream-01.bsz in backup {id} is damaged")), "{err}");
    assert!(err.contains(&victims[0]), "the error must name a file in the chunk: {err}");
    // Into a new directory each chunk is checked as it is read; the failed
    // restore takes back what it wrote (as root it cannot remove the
    // directory it gave to the owner, only empty it).
    let left = std::fs::read_dir(&target).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "a failed restore into a new directory left {left} entries in it");
    let (code, out, _) = bs(&["verify", "--repo", repo.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(out.contains("chunk 0 of stream-01.bsz"), "{out}");

    std::fs::write(&stream, &pristine).unwrap();
    bs_ok(&["verify", "--repo", repo.to_str().unwrap()]);

    // A manifest with a valid checksum but a path that climbs out of the target.
    let mut manifest = blockstream::manifest::Manifest::load(&dir).unwrap();
    manifest.files[0].path = "../escaped".into();
    manifest.store(&dir).unwrap();
    let target = base.join("target2");
    let (code, _, err) = bs(&["restore", "--repo", repo.to_str().unwrap(), "-D", target.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("manifest path \"../escaped\" is refused: it contains \"..\""), "{err}");
    assert!(!base.join("escaped").exists());
}

/// Bad flags exit 2 with a usage line; bad situations exit 1 with a message
/// naming what is wrong; a killed backup leaves no backup behind.
#[test]
fn cli_bad_input_and_refusals() {
    for args in [
        vec![],
        vec!["backup"],
        vec!["backup", "--repo", "/tmp/x", "--bogus"],
        vec!["backup", "--repo", "/tmp/x", "--compress", "zstd:99"],
        vec!["backup", "--repo", "/tmp/x", "--compress", "lz4"],
        vec!["restore", "--repo", "/tmp/x", "-D", "/tmp/y", "-j", "0"],
        vec!["restore", "--repo", "/tmp/x"],
        vec!["restore", "--repo", "/tmp/x", "-D", "/tmp/y", "--target-lsn", "nonsense"],
        vec!["restore", "--repo", "/tmp/x", "-D", "/tmp/y", "--tablespace-map", "nodelimiter"],
        vec!["nosuchcommand"],
    ] {
        let (code, _, err) = bs(&args);
        assert_eq!(code, 2, "blockstream {args:?} must be a usage error: {err}");
        assert!(err.contains("Usage:"), "blockstream {args:?} must print a usage line: {err}");
    }

    let base = scratch("cli");
    let (code, _, err) = bs(&["restore", "--repo", "/nonexistent/repo", "-D", base.join("t").to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("repository \"/nonexistent/repo\" does not exist"), "{err}");
    let (code, _, err) = bs(&["info", "--repo", base.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("is not a blockstream repository"), "{err}");

    let repo = base.join("repo");
    let (code, _, err) =
        bs(&["backup", "-D", "/tmp", "-h", "/tmp", "-p", "1", "-U", "postgres", "--repo", repo.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("could not connect to server (host=/tmp port=1"), "{err}");

    let a = Cluster::init("a", &base);
    a.start();
    let b = Cluster::init("b", &base);
    b.start();
    let mut args: Vec<String> =
        vec!["backup".into(), "-D".into(), a.data.display().to_string(), "--repo".into(), repo.display().to_string()];
    args.extend(a.conn());
    let (code, _, err) = bs(&argv(&args));
    assert_eq!(code, 1);
    assert!(err.contains("extension pg_blocktrack is not installed"), "{err}");
    a.sql("postgres", "CREATE EXTENSION pg_blocktrack");
    b.sql("postgres", "CREATE EXTENSION pg_blocktrack");
    bs_ok(&argv(&args));

    // -D of one cluster, connection to the other.
    let mut mixed: Vec<String> = vec![
        "backup".into(),
        "-D".into(),
        a.data.display().to_string(),
        "--repo".into(),
        base.join("repo2").display().to_string(),
    ];
    mixed.extend(b.conn());
    let (code, _, err) = bs(&argv(&mixed));
    assert_eq!(code, 1);
    assert!(err.contains("point at different clusters"), "{err}");

    // Cluster b into a's repository.
    let mut other: Vec<String> =
        vec!["backup".into(), "-D".into(), b.data.display().to_string(), "--repo".into(), repo.display().to_string()];
    other.extend(b.conn());
    let (code, _, err) = bs(&argv(&other));
    assert_eq!(code, 1);
    assert!(err.contains("belongs to the cluster with system identifier"), "{err}");

    // A second writer is told who holds the lock.
    let lock = std::fs::File::open(repo.join("lock")).unwrap();
    assert_eq!(unsafe { libc::flock(std::os::unix::io::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX | libc::LOCK_NB) }, 0);
    let (code, _, err) = bs(&argv(&args));
    assert_eq!(code, 1);
    assert!(err.contains("is locked by another blockstream process"), "{err}");
    drop(lock);

    // A backup killed mid-copy leaves nothing that claims to be a backup.
    let ids_before = bs_ok(&["info", "--repo", repo.to_str().unwrap(), "--output", "json"]);
    let mut slow = args.clone();
    slow.extend(["--max-rate".into(), "1M".into()]);
    let mut child = blockstream().args(&slow).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    child.kill().unwrap();
    child.wait().unwrap();
    let partial = std::fs::read_dir(repo.join("backups")).unwrap().count();
    assert_eq!(partial, 2, "the killed backup's directory is there, without a manifest");
    assert_eq!(bs_ok(&["info", "--repo", repo.to_str().unwrap(), "--output", "json"]), ids_before);
    let (code, _, err) = bs(&[
        "restore",
        "--repo",
        repo.to_str().unwrap(),
        "-D",
        base.join("t2").to_str().unwrap(),
        "--backup",
        "20990101T000000F",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("is not in repository"), "{err}");
    // The next backup removes the leftover and succeeds.
    bs_ok(&argv(&args));
    let info: serde_json::Value =
        serde_json::from_str(&bs_ok(&["info", "--repo", repo.to_str().unwrap(), "--output", "json"])).unwrap();
    assert_eq!(info["backups"].as_array().unwrap().len(), 2);
    assert_eq!(std::fs::read_dir(repo.join("backups")).unwrap().count(), 2);

    // A non-empty target is refused without --force.
    let target = base.join("busy");
    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(target.join("keep"), b"x").unwrap();
    let (code, _, err) = bs(&["restore", "--repo", repo.to_str().unwrap(), "-D", target.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("is not empty"), "{err}");
    assert!(target.join("keep").exists());
}

fn argv(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The extension refuses to be created unless it is preloaded.
#[test]
fn extension_requires_shared_preload_libraries() {
    let base = scratch("preload");
    let c = Cluster::init("plain", &base);
    let conf = c.data.join("postgresql.conf");
    let text = std::fs::read_to_string(&conf).unwrap().replace("shared_preload_libraries = 'pg_blocktrack'", "");
    std::fs::write(&conf, text).unwrap();
    c.start();
    let err = c.try_sql("postgres", "CREATE EXTENSION pg_blocktrack").unwrap_err();
    assert!(err.contains("pg_blocktrack must be loaded via shared_preload_libraries"), "{err}");
}

/// libpq's environment fills in what the flags leave out, as in psql; -D
/// defaults to $PGDATA, then to the server's data_directory.
#[test]
fn environment_and_data_directory_defaults() {
    let base = scratch("defaults");
    let c = Cluster::init("source", &base);
    c.start();
    c.sql("postgres", "CREATE EXTENSION pg_blocktrack");
    c.pgbench_init(1);
    let repo = base.join("repo");
    let env_backup = |pgdata: Option<&Path>| {
        let mut cmd = blockstream();
        cmd.args(["backup", "--repo", repo.to_str().unwrap(), "--output", "json"])
            .env("PGHOST", "/tmp")
            .env("PGPORT", c.port.to_string())
            .env("PGUSER", "postgres")
            .env("PGDATABASE", "postgres")
            .env("PGAPPNAME", "env-test")
            .env_remove("PGDATA");
        if let Some(d) = pgdata {
            cmd.env("PGDATA", d);
        }
        let out = run(&mut cmd);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let a = env_backup(Some(&c.data));
    let b = env_backup(None);
    assert_eq!(a["system_identifier"], b["system_identifier"]);
    let info: serde_json::Value =
        serde_json::from_str(&bs_ok(&["info", "--repo", repo.to_str().unwrap(), "--output", "json"])).unwrap();
    assert_eq!(info["backups"].as_array().unwrap().len(), 2);
    // A wrong PGPORT is what libpq tries.
    let out = run(blockstream()
        .args(["backup", "--repo", repo.to_str().unwrap(), "-D", c.data.to_str().unwrap()])
        .env("PGHOST", "/tmp")
        .env("PGPORT", "1"));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("port=1"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A role with only the documented grants takes full and incremental backups.
#[test]
fn least_privilege_role_backs_up() {
    let base = scratch("leastpriv");
    let c = Cluster::init("source", &base);
    c.start();
    c.sql("postgres", "CREATE EXTENSION pg_blocktrack");
    c.pgbench_init(1);
    c.sql(
        "postgres",
        "CREATE ROLE backup_role LOGIN REPLICATION;
         GRANT USAGE ON SCHEMA blocktrack TO backup_role;
         GRANT EXECUTE ON FUNCTION blocktrack.backup_start(text, boolean, pg_lsn, integer, integer, pg_lsn, pg_lsn, bigint),
                                   blocktrack.backup_stop(boolean),
                                   blocktrack.changed_blocks(pg_lsn, pg_lsn, integer) TO backup_role;
         GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean), pg_backup_stop(boolean) TO backup_role;",
    );
    let repo = base.join("repo");
    let args = |kind: &str| -> Vec<String> {
        vec![
            "backup".into(),
            "-D".into(),
            c.data.display().to_string(),
            "-h".into(),
            "/tmp".into(),
            "-p".into(),
            c.port.to_string(),
            "-U".into(),
            "backup_role".into(),
            "-d".into(),
            "postgres".into(),
            "--repo".into(),
            repo.display().to_string(),
            "--type".into(),
            kind.into(),
            "--no-fallback".into(),
        ]
    };
    let a = args("full");
    bs_ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    c.sql("postgres", "UPDATE pgbench_accounts SET abalance = 7 WHERE aid < 500");
    let a = args("incr");
    let out = bs_ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.contains("(incr)"), "{out}");
    let expected = c.dumpall();
    let restored = restore_and_start("restored", &repo, &base, 2, &[]);
    assert_same_dump(&expected, &restored.dumpall(), "backup by the least-privilege role");
    // Without REPLICATION the temporary slot cannot be made, and the message says so.
    c.sql("postgres", "ALTER ROLE backup_role NOREPLICATION");
    let a = args("full");
    let (code, _, err) = bs(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("replication"), "{err}");
}

/// Recovery targets and archive-get on a real restore: stopping at the
/// backup's stop LSN gives exactly the data of the backup; with the WAL
/// removed from pg_wal, recovery fetches it through archive-get; a target
/// past the WAL there is stops the server with PostgreSQL's message.
#[test]
fn recovery_targets_and_archive_get() {
    let base = scratch("targets");
    let c = Cluster::init("source", &base);
    c.start();
    c.sql("postgres", "CREATE EXTENSION pg_blocktrack");
    c.pgbench_init(1);
    let repo = base.join("repo");
    let b = backup(&c, &repo, &[]);
    let expected = c.dumpall();
    c.sql("postgres", "UPDATE pgbench_branches SET bbalance = 99");
    let stop = b["stop_lsn"].as_str().unwrap();
    let r = restore_and_start("at-lsn", &repo, &base, 2, &["--target-lsn", stop]);
    assert_same_dump(&expected, &r.dumpall(), "restore to the stop LSN");
    r.stop();

    // archive-get serves the WAL once pg_wal no longer has it.
    let target = base.join("from-archive");
    bs_ok(&["restore", "--repo", repo.to_str().unwrap(), "-D", target.to_str().unwrap()]);
    let mut removed = 0;
    for e in std::fs::read_dir(target.join("pg_wal")).unwrap().flatten() {
        if e.file_name().len() == 24 {
            std::fs::remove_file(e.path()).unwrap();
            removed += 1;
        }
    }
    assert!(removed > 0);
    let r = Cluster::restored("from-archive", &target, &base);
    r.start();
    r.wait_promoted();
    assert_same_dump(&expected, &r.dumpall(), "recovery through archive-get");
    let log = std::fs::read_to_string(&r.log).unwrap_or_default();
    assert!(log.contains("restored log file"), "recovery did not use restore_command: {log}");
    r.stop();

    // A target time past the end of the WAL there is: PostgreSQL refuses to finish.
    let target = base.join("too-far");
    bs_ok(&[
        "restore",
        "--repo",
        repo.to_str().unwrap(),
        "-D",
        target.to_str().unwrap(),
        "--target-time",
        "2999-01-01 00:00:00+00",
    ]);
    let conf = std::fs::read_to_string(target.join("postgresql.auto.conf")).unwrap();
    assert!(
        conf.contains("recovery_target_time = '2999-01-01 00:00:00+00'")
            && conf.contains("recovery_target_action = 'promote'"),
        "{conf}"
    );
    let r = Cluster::restored("too-far", &target, &base);
    let _ = run(as_postgres("pg_ctl").arg("-D").arg(&target).arg("-l").arg(&r.log).args([
        "-o",
        &format!("-p {} -c archive_mode=off", r.port),
        "-w",
        "-t",
        "60",
        "start",
    ]));
    // pg_ctl -w may return once the server takes read-only connections, before
    // recovery has run out of WAL and stopped: wait for the verdict in the log.
    let until = Instant::now() + Duration::from_secs(60);
    let mut log = std::fs::read_to_string(&r.log).unwrap_or_default();
    while !log.contains("recovery ended before configured recovery target was reached") && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(200));
        log = std::fs::read_to_string(&r.log).unwrap_or_default();
    }
    assert!(log.contains("recovery ended before configured recovery target was reached"), "{log}");
    assert!(!log.contains("database system is ready to accept connections"), "it must not promote: {log}");
}
