//! The fault suite: a backup or restore killed (-9) at every failpoint, the
//! server stopped with `-m immediate` mid-backup, the repository's and the
//! target's file systems full, and two backups at once. After each fault
//! the repository lists no partial backup, the lock does not block, the
//! next backup succeeds and the latest good backup restores to exactly the
//! source's data.
//!
//! Run as root with pg_blocktrack installed:
//! `cargo test --release -p blockstream --test faults -- --test-threads=1`.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn ids(repo: &Path) -> Vec<String> {
    let info: serde_json::Value =
        serde_json::from_str(&bs_ok(&["info", "--repo", path(repo), "--output", "json"])).unwrap();
    info["backups"].as_array().unwrap().iter().map(|b| b["backup_id"].as_str().unwrap().to_string()).collect()
}

fn backup_args(c: &Cluster, repo: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = vec!["backup".to_string(), "-D".into(), c.data.display().to_string()];
    a.extend(c.conn());
    a.extend(["--repo".into(), repo.display().to_string(), "-j".into(), "2".into()]);
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// Runs blockstream with a failpoint armed.
fn with_failpoint(args: &[String], failpoint: &str) -> Output {
    run(blockstream().args(args).env(blockstream::failpoint::ENV, failpoint))
}

fn killed(out: &Output) -> bool {
    use std::os::unix::process::ExitStatusExt;
    out.status.signal() == Some(libc::SIGKILL)
}

/// Restores the latest backup and checks it equals `expected`.
fn restore_matches(repo: &Path, base: &Path, name: &str, expected: &str) {
    let c = restore_and_start(name, repo, base, 2, &[]);
    assert_same_dump(expected, &c.dumpall(), name);
    c.stop();
}

/// kill -9 at eight points of a backup or restore: nothing partial is
/// listed, the lock is taken over with a message, the next backup works and
/// the latest backup restores to the source's data.
#[test]
fn kill_9_at_every_failpoint_loses_nothing() {
    let base = scratch("kill9");
    let c = Cluster::init("source", &base);
    c.start();
    c.sql("postgres", "CREATE EXTENSION pg_blocktrack");
    c.pgbench_init(2);
    let repo = base.join("repo");
    backup(&c, &repo, &["-j", "2"]);
    let points = [
        ("copy-chunk@3", "full", "while streams are written"),
        ("data-copied", "full", "between the data files and pg_control"),
        ("wal-chunk@1", "full", "while WAL is copied"),
        ("backup-stopped", "incr", "right after pg_backup_stop"),
        ("durable-write:manifest.json", "full", "while the manifest is written"),
        ("manifest-renamed", "incr", "right after the manifest's rename"),
        ("copy-chunk@2", "incr", "during an incremental"),
    ];
    for (n, (point, kind, what)) in points.iter().enumerate() {
        run_ok(Command::new(pg_bin("pgbench")).args(c.conn()).args(["-n", "-c", "2", "-t", "200", "postgres"]));
        let before = ids(&repo);
        let out = with_failpoint(&backup_args(&c, &repo, &["--type", kind]), point);
        assert!(killed(&out), "{what}: the backup was not killed: {}", String::from_utf8_lossy(&out.stderr));
        let after = ids(&repo);
        if *point == "manifest-renamed" {
            // The backup was complete: it is listed and sound.
            assert_eq!(after.len(), before.len() + 1, "{what}");
            bs_ok(&["verify", "--repo", path(&repo), "--backup", after.last().unwrap()]);
        } else {
            assert_eq!(after, before, "{what}: a partial backup is listed");
        }
        // The lock does not block, and says whose it was.
        let args = backup_args(&c, &repo, &["--type", "incr"]);
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, err) = bs(&a);
        assert_eq!(code, 0, "{what}: the next backup failed: {err}");
        assert!(
            err.contains("took over the lock") && err.contains("left by a process that died holding it"),
            "{what}: {err}"
        );
        assert_eq!(std::fs::read_dir(repo.join("backups")).unwrap().count(), ids(&repo).len(), "{what}: leftovers");
        let expected = c.dumpall();
        restore_matches(&repo, &base, &format!("after-kill-{n}"), &expected);
    }

    // A restore killed mid-way, run again with --force.
    let expected = c.dumpall();
    let target = base.join("killed-restore");
    let out = run(blockstream()
        .args(["restore", "--repo", path(&repo), "-D", path(&target), "-j", "2"])
        .env(blockstream::failpoint::ENV, "restore-record@30"));
    assert!(killed(&out), "the restore was not killed");
    bs_ok(&["restore", "--repo", path(&repo), "-D", path(&target), "-j", "2", "--force"]);
    let r = Cluster::restored("rerun", &target, &base);
    r.start();
    r.wait_promoted();
    assert_same_dump(&expected, &r.dumpall(), "killed restore rerun with --force");
}

/// The server stopped with -m immediate while files are copied: the backup
/// fails naming the server, nothing is listed; after a restart the next
/// incremental is correct or falls back to full with the reason.
#[test]
fn server_stopped_mid_backup() {
    let base = scratch("immediate");
    let c = Cluster::init("source", &base);
    c.start();
    c.sql("postgres", "CREATE EXTENSION pg_blocktrack");
    c.pgbench_init(5);
    let repo = base.join("repo");
    backup(&c, &repo, &[]);
    let before = ids(&repo);
    let args = backup_args(&c, &repo, &["--type", "full", "--max-rate", "8M"]);
    let child = blockstream().args(&args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    run_ok(as_postgres("pg_ctl").arg("-D").arg(&c.data).args(["-m", "immediate", "-w", "stop"]));
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("failed on server") || err.contains("could not connect"), "{err}");
    assert_eq!(ids(&repo), before, "a backup of a stopped server is listed");
    c.start();
    run_ok(Command::new(pg_bin("pgbench")).args(c.conn()).args(["-n", "-c", "2", "-t", "300", "postgres"]));
    let m = backup(&c, &repo, &["--type", "incr"]);
    assert!(m["type"] == "incr" || m["full_reason"].is_string(), "{m}");
    let expected = c.dumpall();
    restore_matches(&repo, &base, "after-immediate", &expected);
}

fn mount_tmpfs(dir: &Path, size: &str) {
    std::fs::create_dir_all(dir).unwrap();
    run_ok(Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755"), "tmpfs"]).arg(dir));
}

struct Unmount<'a>(&'a Path);

impl Drop for Unmount<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0).status();
    }
}

/// The repository's file system fills up: the error names the path, no
/// partial backup is listed (its files are removed), and the earlier backup
/// still verifies and restores.
#[test]
fn repository_disk_full() {
    let base = scratch("repofull");
    let c = Cluster::init("source", &base);
    c.start();
    c.sql("postgres", "CREATE EXTENSION pg_blocktrack");
    c.pgbench_init(1);
    let small = base.join("small");
    mount_tmpfs(&small, "12m");
    let _unmount = Unmount(&small);
    chown_postgres(&small);
    let repo = small.join("repo");
    backup(&c, &repo, &[]);
    let expected = c.dumpall();
    let used = String::from_utf8(run_ok(Command::new("du").args(["-sb"]).arg(&repo)).into()).unwrap();
    eprintln!("first backup uses {used}");
    // Data that does not compress: the next full backup cannot fit.
    c.sql(
        "postgres",
        "CREATE TABLE noise AS SELECT g, decode(md5(g::text) || md5((g * 7)::text), 'hex') AS a, \
         decode(md5((g * 3)::text), 'hex') AS b FROM generate_series(1, 300000) g",
    );
    let args = backup_args(&c, &repo, &[]);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _, err) = bs(&a);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("No space left on device") && err.contains(path(&repo)), "{err}");
    assert_eq!(ids(&repo).len(), 1, "a partial backup is listed");
    assert_eq!(std::fs::read_dir(repo.join("backups")).unwrap().count(), 1, "the failed backup's files were left");
    bs_ok(&["verify", "--repo", path(&repo)]);
    restore_matches(&repo, &base, "after-full-repo", &expected);
}

/// The restore target's file system fills up: a clear error, and the
/// directory cannot start (no pg_control).
#[test]
fn restore_target_disk_full() {
    let base = scratch("targetfull");
    let c = Cluster::init("source", &base);
    c.start();
    c.sql("postgres", "CREATE EXTENSION pg_blocktrack");
    c.pgbench_init(2);
    let repo = base.join("repo");
    backup(&c, &repo, &[]);
    let small = base.join("small");
    mount_tmpfs(&small, "24m");
    let _unmount = Unmount(&small);
    chown_postgres(&small);
    let target = small.join("target");
    let (code, _, err) = bs(&["restore", "--repo", path(&repo), "-D", path(&target)]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("No space left on device") && err.contains(path(&target)), "{err}");
    assert!(!target.join("global/pg_control").exists(), "a target that ran out of space holds pg_control");
    let port = 5599;
    let start = run(as_postgres("pg_ctl").arg("-D").arg(&target).args([
        "-o",
        &format!("-p {port}"),
        "-w",
        "-t",
        "20",
        "start",
    ]));
    assert!(!start.status.success(), "a target that ran out of space started");
}

/// Two backups at once: the second is refused, naming the holder.
#[test]
fn second_backup_at_once_is_refused() {
    let base = scratch("twoatonce");
    let c = Cluster::init("source", &base);
    c.start();
    c.sql("postgres", "CREATE EXTENSION pg_blocktrack");
    c.pgbench_init(2);
    let repo = base.join("repo");
    backup(&c, &repo, &[]);
    let mut first = blockstream()
        .args(backup_args(&c, &repo, &["--max-rate", "2M"]))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(repo.join("lock")).unwrap_or_default().is_empty() {
        assert!(Instant::now() < until, "the first backup never took the lock");
        std::thread::sleep(Duration::from_millis(50));
    }
    let args = backup_args(&c, &repo, &[]);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _, err) = bs(&a);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("is locked by another blockstream process (pid {} since", first.id())), "{err}");
    assert!(first.wait().unwrap().success());
    assert_eq!(ids(&repo).len(), 2);
}
