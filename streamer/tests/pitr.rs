//! Continuous archiving and point-in-time recovery on real clusters:
//! `archive_command = blockstream archive-push` (synchronous, asynchronous,
//! and asynchronous into a repository it cannot reach); restores to a time,
//! an LSN, a restore point, a transaction and the end of the archive, each
//! checked by data; a second PITR on the timeline the first one made; a gap
//! in the archive; a push of other content under an archived name; archive
//! health from the server (`blocktrack.archive_status()`); `wal-receive` as
//! a synchronous standby keeping every acknowledged commit when the primary
//! is lost.
//!
//! Run as root with pg_blocktrack installed:
//! `cargo test --release -p blockstream --test pitr -- --test-threads=1`.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn archive_conf(repo: &Path, extra: &str) -> String {
    format!(
        "archive_mode = on\narchive_command = '{} archive-push --repo {} {extra} %p'\n",
        env!("CARGO_BIN_EXE_blockstream"),
        repo.display()
    )
}

fn archived_cluster(base: &Path, repo: &Path, extra: &str) -> Cluster {
    let c = Cluster::init("source", base);
    c.append_conf(&archive_conf(repo, extra));
    c.start();
    c.sql("postgres", "CREATE EXTENSION pg_blocktrack");
    c.pgbench_init(2);
    c
}

/// A digest of everything the tests change.
const DIGEST: &str =
    "SELECT md5(coalesce((SELECT string_agg(aid || ':' || abalance, ',' ORDER BY aid) FROM pgbench_accounts), '') \
                      || coalesce((SELECT string_agg(s, ',' ORDER BY s) FROM states), ''))";

struct Point {
    digest: String,
    time: String,
    lsn: String,
    xid: String,
}

/// Records a state: a row in `states`, then where and when it is, and a
/// restore point named `name`.
fn mark(c: &Cluster, name: &str) -> Point {
    let xid =
        c.sql("postgres", &format!("BEGIN; INSERT INTO states VALUES ('{name}'); SELECT txid_current(); COMMIT;"));
    let time =
        c.sql("postgres", "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'");
    c.sql("postgres", &format!("SELECT pg_create_restore_point('{name}')"));
    let lsn = c.sql("postgres", "SELECT pg_current_wal_lsn()");
    Point { digest: c.sql("postgres", DIGEST), time, lsn, xid }
}

fn pgbench(c: &Cluster, t: &str) {
    run_ok(Command::new(pg_bin("pgbench")).args(c.conn()).args(["-n", "-c", "2", "-t", t, "postgres"]));
}

fn restore_digest(repo: &Path, base: &Path, name: &str, extra: &[&str]) -> String {
    let r = restore_and_start(name, repo, base, 2, extra);
    let d = r.sql("postgres", DIGEST);
    r.stop();
    let _ = std::fs::remove_dir_all(base.join(format!("{name}-data")));
    d
}

/// Restores to A's time, LSN, restore point and transaction give exactly
/// state A; a restore to the end of the archive gives the latest data.
#[test]
fn pitr_to_every_kind_of_target() {
    let base = scratch("pitr");
    let repo = base.join("repo");
    let c = archived_cluster(&base, &repo, "");
    c.sql("postgres", "CREATE TABLE states (s text)");
    backup(&c, &repo, &["-j", "2"]);
    pgbench(&c, "400");
    let a = mark(&c, "point_a");
    std::thread::sleep(Duration::from_millis(1200));
    pgbench(&c, "400");
    switch_and_wait(&c);
    pgbench(&c, "300");
    let b = mark(&c, "point_b");
    switch_and_wait(&c);
    assert_ne!(a.digest, b.digest);
    for (name, args) in [
        ("at-time", vec!["--target-time", a.time.as_str()]),
        ("at-lsn", vec!["--target-lsn", a.lsn.as_str()]),
        ("at-name", vec!["--target-name", "point_a"]),
        ("at-xid", vec!["--target-xid", a.xid.as_str()]),
    ] {
        assert_eq!(restore_digest(&repo, &base, name, &args), a.digest, "restore {args:?}");
    }
    assert_eq!(restore_digest(&repo, &base, "at-end", &[]), b.digest, "restore to the end of the archive");
    // A target before the oldest backup is refused.
    let (code, _, err) = bs(&[
        "restore",
        "--repo",
        path(&repo),
        "-D",
        path(&base.join("early")),
        "--target-time",
        "2001-01-01 00:00:00+00",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is before the end of the oldest backup"), "{err}");
    // The archive is continuous: verify says so; info shows the range.
    bs_ok(&["verify", "--repo", path(&repo)]);
    let info: serde_json::Value =
        serde_json::from_str(&bs_ok(&["info", "--repo", path(&repo), "--output", "json"])).unwrap();
    assert!(info["archive"]["timelines"][0]["segments"].as_u64().unwrap() >= 2, "{info}");
    assert!(info["recoverable"]["latest_lsn"].as_str().is_some(), "{info}");
    // Archive health from the server: nothing waits; then a failing
    // archive_command shows as failures, a waiting segment and lag.
    let health =
        "SELECT archived_count >= 2, last_archived_age_seconds < 600, failed_count, ready_segments, lag_bytes \
                  FROM blocktrack.archive_status()";
    assert_eq!(c.sql("postgres", health), "t|t|0|0|0");
    c.sql("postgres", "ALTER SYSTEM SET archive_command = 'false'");
    c.sql("postgres", "SELECT pg_reload_conf()");
    c.sql("postgres", "INSERT INTO states VALUES ('unarchived')");
    c.sql("postgres", "SELECT pg_switch_wal()");
    let until = Instant::now() + Duration::from_secs(60);
    while c.sql("postgres", "SELECT failed_count FROM blocktrack.archive_status()") == "0" {
        assert!(Instant::now() < until, "the failing archive_command was not run");
        std::thread::sleep(Duration::from_millis(100));
    }
    let lag = c.sql("postgres", "SELECT ready_segments, lag_bytes, lag_seconds >= 0 FROM blocktrack.archive_status()");
    assert_eq!(lag, format!("1|{}|t", 16 << 20), "{lag}");
}

/// Asynchronous push with 4 workers under pgbench: nothing is lost; a
/// restore to the end equals the source.
#[test]
fn async_push_loses_nothing() {
    let base = scratch("asyncpush");
    let repo = base.join("repo");
    let spool = base.join("spool");
    let c = archived_cluster(&base, &repo, &format!("--async --workers 4 --spool {}", spool.display()));
    c.sql("postgres", "CREATE TABLE states (s text)");
    backup(&c, &repo, &[]);
    let mut load = c.pgbench(&["-n", "-c", "4", "-T", "8"]);
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(1200));
        c.sql("postgres", "SELECT pg_switch_wal()");
    }
    assert!(load.wait().unwrap().success());
    let end = mark(&c, "end");
    switch_and_wait(&c);
    // PostgreSQL's queue drains, and it took every marker the pusher left.
    let until = Instant::now() + Duration::from_secs(60);
    let ready = |c: &Cluster| {
        std::fs::read_dir(c.data.join("pg_wal/archive_status"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".ready"))
            .count()
    };
    while ready(&c) > 0 || std::fs::read_dir(spool.join("ok")).unwrap().count() > 0 {
        assert!(Instant::now() < until, "the archive queue did not drain");
        std::thread::sleep(Duration::from_millis(100));
    }
    let status: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo.join("archive/push-status.json")).unwrap()).unwrap();
    assert_eq!(status["push_failures"], 0, "{status}");
    // The pusher's status, in info, comes to nothing queued.
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let info = bs_ok(&["info", "--repo", path(&repo)]);
        if info.contains("async push lag: 0 files, 0 bytes queued") {
            break;
        }
        assert!(Instant::now() < until, "{info}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let segments = std::fs::read_dir(repo.join("archive/00000001")).unwrap().count();
    assert!(segments >= 8, "only {segments} segments archived");
    bs_ok(&["verify", "--repo", path(&repo)]);
    assert_eq!(restore_digest(&repo, &base, "async-end", &[]), end.digest);
}

/// Asynchronous push into a repository the pusher cannot reach: after
/// --timeout archive_command fails, PostgreSQL keeps the segment and says
/// why, the server reports it; once the repository is back, everything is
/// archived and a restore to the end has it all.
#[test]
fn async_push_fails_while_the_repository_is_unreachable() {
    use std::os::unix::fs::PermissionsExt;
    let base = scratch("unreachable");
    let repo = base.join("repo");
    let c = archived_cluster(&base, &repo, "--async --timeout 3");
    c.sql("postgres", "CREATE TABLE states (s text)");
    backup(&c, &repo, &[]);
    pgbench(&c, "100");
    switch_and_wait(&c);
    std::fs::set_permissions(&repo, std::fs::Permissions::from_mode(0o000)).unwrap();
    pgbench(&c, "100");
    let end = mark(&c, "end");
    let stuck = c.sql("postgres", "SELECT pg_walfile_name(pg_switch_wal())");
    let until = Instant::now() + Duration::from_secs(60);
    while c.sql("postgres", "SELECT failed_count FROM pg_stat_archiver") == "0" {
        assert!(Instant::now() < until, "archive_command did not fail");
        std::thread::sleep(Duration::from_millis(200));
    }
    let row = c.sql(
        "postgres",
        "SELECT last_failed_wal, ready_segments >= 1, async_push_error IS NOT NULL FROM blocktrack.archive_status()",
    );
    assert_eq!(row, format!("{stuck}|t|t"));
    assert!(c.data.join(format!("pg_wal/{stuck}")).exists(), "PostgreSQL did not keep {stuck}");
    let log = std::fs::read_to_string(&c.log).unwrap();
    assert!(log.contains(&format!("{stuck}\" was not archived within --timeout 3 s")), "{log}");
    std::fs::set_permissions(&repo, std::fs::Permissions::from_mode(0o750)).unwrap();
    let until = Instant::now() + Duration::from_secs(120);
    while c.sql("postgres", "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver").as_str() < stuck.as_str() {
        assert!(Instant::now() < until, "{stuck} was not archived once the repository was back");
        std::thread::sleep(Duration::from_millis(200));
    }
    bs_ok(&["verify", "--repo", path(&repo)]);
    assert_eq!(restore_digest(&repo, &base, "after-outage", &[]), end.digest);
}

/// After a PITR the restored cluster goes on, on timeline 2, archiving into
/// the same repository; a second PITR along timeline 2 reaches its state.
#[test]
fn second_pitr_on_the_new_timeline() {
    let base = scratch("timeline2");
    let repo = base.join("repo");
    let c = archived_cluster(&base, &repo, "");
    c.sql("postgres", "CREATE TABLE states (s text)");
    backup(&c, &repo, &[]);
    pgbench(&c, "300");
    let a = mark(&c, "point_a");
    pgbench(&c, "300");
    switch_and_wait(&c);
    c.stop();
    // The first PITR, started with archiving on: its timeline's history and WAL go to the repository.
    let target = base.join("tl2-data");
    bs_ok(&["restore", "--repo", path(&repo), "-D", path(&target), "--target-name", "point_a"]);
    let r = Cluster::restored("tl2", &target, &base);
    let conf = r.data.join("postgresql.auto.conf");
    let mut auto = std::fs::read_to_string(&conf).unwrap();
    auto.push_str(&archive_conf(&repo, ""));
    std::fs::write(&conf, auto).unwrap();
    run_ok(as_postgres("pg_ctl").arg("-D").arg(&r.data).arg("-l").arg(&r.log).args([
        "-o",
        &format!("-p {}", r.port),
        "-w",
        "-t",
        "120",
        "start",
    ]));
    r.wait_promoted();
    assert_eq!(r.sql("postgres", DIGEST), a.digest);
    assert_eq!(r.sql("postgres", "SELECT timeline_id FROM pg_control_checkpoint()"), "2");
    pgbench(&r, "200");
    let c2 = mark(&r, "point_c");
    switch_and_wait(&r);
    assert!(repo.join("archive/00000002/00000002.history.bsw").exists(), "the new timeline's history was not archived");
    r.stop();
    assert_eq!(
        restore_digest(&repo, &base, "along-tl2", &["--target-name", "point_c", "--target-timeline", "latest"]),
        c2.digest
    );
    bs_ok(&["verify", "--repo", path(&repo)]);
}

/// A segment deleted from the middle of the archive: verify names it, a
/// restore past it is refused naming it, a restore before it works.
#[test]
fn gap_in_the_archive() {
    let base = scratch("archgap");
    let repo = base.join("repo");
    let c = archived_cluster(&base, &repo, "");
    c.sql("postgres", "CREATE TABLE states (s text)");
    backup(&c, &repo, &[]);
    pgbench(&c, "200");
    let a = mark(&c, "point_a");
    switch_and_wait(&c);
    for _ in 0..3 {
        pgbench(&c, "200");
        switch_and_wait(&c);
    }
    let b = mark(&c, "point_b");
    switch_and_wait(&c);
    // Remove the segment after A's.
    let a_seg = c.sql("postgres", &format!("SELECT pg_walfile_name('{}')", a.lsn));
    let next = format!("{}{:08X}", &a_seg[..16], u32::from_str_radix(&a_seg[16..], 16).unwrap() + 1);
    let victim = repo.join(format!("archive/00000001/{next}.bsw"));
    assert!(victim.exists(), "{} is not archived", victim.display());
    std::fs::remove_file(&victim).unwrap();
    let (code, out, _) = bs(&["verify", "--repo", path(&repo)]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("archive: WAL segment {next} is missing from the archive")), "{out}");
    let (code, _, err) =
        bs(&["restore", "--repo", path(&repo), "-D", path(&base.join("past")), "--target-lsn", &b.lsn]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot finish") && err.contains(&next), "{err}");
    let (code, _, err) = bs(&["restore", "--repo", path(&repo), "-D", path(&base.join("end"))]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("would stop silently at a gap") && err.contains(&next), "{err}");
    assert!(!base.join("past").exists() && !base.join("end").exists(), "a refused restore wrote its target");
    assert_eq!(restore_digest(&repo, &base, "before-gap", &["--target-lsn", &a.lsn]), a.digest);
}

/// Pushing other content under an archived name fails and keeps the
/// archived copy; the same content again succeeds.
#[test]
fn push_of_other_content_is_refused() {
    let base = scratch("pushdiff");
    let repo = base.join("repo");
    let c = archived_cluster(&base, &repo, "");
    backup(&c, &repo, &[]);
    pgbench(&c, "100");
    switch_and_wait(&c);
    let name = c.sql("postgres", "SELECT last_archived_wal FROM pg_stat_archiver");
    let archived = repo.join(format!("archive/00000001/{name}.bsw"));
    let before = std::fs::read(&archived).unwrap();
    // The segment as PostgreSQL archived it, from a fresh copy out of the archive.
    let original = base.join(&name);
    bs_ok(&["archive-get", "--repo", path(&repo), &name, path(&original)]);
    bs_ok(&["archive-push", "--repo", path(&repo), path(&original)]);
    let altered_dir = base.join("altered");
    std::fs::create_dir(&altered_dir).unwrap();
    let altered = altered_dir.join(&name);
    let mut bytes = std::fs::read(&original).unwrap();
    bytes[100_000] ^= 0xFF;
    std::fs::write(&altered, &bytes).unwrap();
    let (code, _, err) = bs(&["archive-push", "--repo", path(&repo), path(&altered)]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("is already archived with other content") && err.contains("the archived copy is kept"),
        "{err}"
    );
    assert_eq!(std::fs::read(&archived).unwrap(), before, "the archived copy changed");
    // A segment of another cluster is refused too.
    let other = Cluster::init("other", &base);
    other.start();
    let seg = other.sql("postgres", "SELECT pg_walfile_name(pg_current_wal_lsn())");
    let foreign = other.data.join("pg_wal").join(&seg);
    let (code, _, err) = bs(&["archive-push", "--repo", path(&repo), path(&foreign)]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("belongs to the cluster with system identifier"), "{err}");
}

/// `wal-receive --synchronous` as the primary's synchronous standby: the
/// primary is lost (`pg_ctl stop -m immediate`) in the middle of commits and
/// pgbench; a restore to the end of the repository has every commit the
/// primary acknowledged, including those in the segment still being
/// received.
#[test]
fn wal_receive_keeps_every_acknowledged_commit() {
    let base = scratch("walreceive");
    let repo = base.join("repo");
    let c = Cluster::init("source", &base);
    c.start();
    c.sql("postgres", "CREATE EXTENSION pg_blocktrack");
    c.pgbench_init(2);
    c.sql("postgres", "CREATE TABLE acked (n int)");
    let mut receiver = start_receiver(&c, &repo);
    backup(&c, &repo, &[]);
    c.sql("postgres", "ALTER SYSTEM SET synchronous_standby_names = 'blockstream_receiver'");
    c.sql("postgres", "SELECT pg_reload_conf()");
    wait_sync(&c);
    let acked = commit_until_lost(&c, 0);
    assert!(acked > 20, "only {acked} commits before the primary was lost");
    wait_exit(&mut receiver);
    let partial: Vec<String> = std::fs::read_dir(repo.join("receive"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial"))
        .collect();
    assert_eq!(partial.len(), 1, "the segment being received: {partial:?}");
    assert!(std::fs::read_dir(repo.join("archive/00000001")).unwrap().count() >= 2, "no finished segment was archived");
    assert_eq!(restored_commits(&repo, &base, "received", acked), acked.to_string(), "acknowledged commits missing");
    // The primary restarts (crash recovery); the receiver resumes at its
    // partial segment; another loss; the restore has both rounds.
    c.start();
    let mut receiver = start_receiver(&c, &repo);
    wait_sync(&c);
    let acked2 = commit_until_lost(&c, acked);
    assert!(acked2 > acked + 20, "only {} commits after the restart", acked2 - acked);
    wait_exit(&mut receiver);
    assert_eq!(restored_commits(&repo, &base, "resumed", acked2), acked2.to_string(), "acknowledged commits missing");
}

/// wal-receive as the repository's owner (restores read the repository as
/// that user), as the synchronous standby `blockstream_receiver`.
fn start_receiver(c: &Cluster, repo: &Path) -> std::process::Child {
    let mut receiver = Command::new("runuser")
        .args(["-u", "postgres", "--", env!("CARGO_BIN_EXE_blockstream"), "wal-receive", "--repo", path(repo)])
        .args(["-h", "/tmp", "-p", &c.port.to_string(), "-U", "postgres", "--synchronous"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    while c.sql("postgres", "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'blockstream_receiver'")
        != "1"
    {
        if receiver.try_wait().unwrap().is_some() {
            let mut err = String::new();
            std::io::Read::read_to_string(receiver.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("wal-receive exited: {err}");
        }
        assert!(Instant::now() < until, "wal-receive did not connect");
        std::thread::sleep(Duration::from_millis(100));
    }
    receiver
}

fn wait_sync(c: &Cluster) {
    let until = Instant::now() + Duration::from_secs(30);
    while c
        .sql("postgres", "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'blockstream_receiver'")
        != "sync"
    {
        assert!(Instant::now() < until, "wal-receive did not become the synchronous standby");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Commits numbered rows one by one under pgbench until the primary is
/// stopped with -m immediate (after 5 s); returns the last acknowledged.
fn commit_until_lost(c: &Cluster, from: u32) -> u32 {
    let mut load = c.pgbench(&["-n", "-c", "2", "-T", "30"]);
    let data = c.data.clone();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(5));
        run(as_postgres("pg_ctl").arg("-D").arg(&data).args(["-m", "immediate", "-w", "stop"]));
    });
    let mut acked = from;
    while c.try_sql("postgres", &format!("INSERT INTO acked VALUES ({})", acked + 1)).is_ok() {
        acked += 1;
    }
    killer.join().unwrap();
    let _ = load.wait();
    acked
}

fn wait_exit(receiver: &mut std::process::Child) {
    let until = Instant::now() + Duration::from_secs(30);
    while receiver.try_wait().unwrap().is_none() {
        assert!(Instant::now() < until, "wal-receive did not notice the primary was gone");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Restores the end of the repository; how many of 1..=acked it has (and
/// pgbench's balance invariant holds).
fn restored_commits(repo: &Path, base: &Path, name: &str, acked: u32) -> String {
    let r = restore_and_start(name, repo, base, 2, &[]);
    let found = r.sql("postgres", &format!("SELECT count(DISTINCT n) FROM acked WHERE n <= {acked}"));
    let total =
        r.sql("postgres", "SELECT sum(abalance) = (SELECT sum(bbalance) FROM pgbench_branches) FROM pgbench_accounts");
    assert_eq!(total, "t", "pgbench's balance invariant");
    r.stop();
    let _ = std::fs::remove_dir_all(base.join(format!("{name}-data")));
    found
}
