//! Restore modes on real clusters. `--delta`: over a data directory that
//! went on with pgbench after the backup (the failed primary to re-seed),
//! over an empty directory, over one a server is using, and killed midway.
//! `--db-include`: one database of three restored from a chain, the cluster
//! starts, the others are dropped.
//!
//! Run as root with pg_blocktrack installed:
//! `cargo test --release -p blockstream --test restore_modes -- --test-threads=1`.

mod common;

use std::path::Path;

use common::*;

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Bytes of `backup` (a restored data directory) that `other` does not
/// have: 8 kB blocks that differ, and the whole of files it lacks. The
/// files every restore writes itself are left out.
fn changed_bytes(backup: &Path, other: &Path) -> u64 {
    let mut total = 0;
    for (rel, bytes) in tree(backup) {
        if ["backup_label", "recovery.signal", "postgresql.auto.conf", "tablespace_map"].contains(&rel.as_str()) {
            continue;
        }
        let theirs = std::fs::read(other.join(&rel)).unwrap_or_default();
        for (i, block) in bytes.chunks(8192).enumerate() {
            let at = i * 8192;
            if theirs.get(at..at + block.len()) != Some(block) {
                total += block.len() as u64;
            }
        }
    }
    total
}

/// A started cluster with pg_blocktrack and pgbench data at `scale`, and
/// where its repository goes.
fn pgbench_source(base: &Path, scale: u32) -> (Cluster, std::path::PathBuf) {
    let src = Cluster::init("source", base);
    src.start();
    src.sql("postgres", "CREATE EXTENSION pg_blocktrack");
    src.pgbench_init(scale);
    (src, base.join("repo"))
}

/// `pgbench -c 2 -t transactions`, to the end.
fn pgbench_run(c: &Cluster, transactions: u32) {
    let mut load = c.pgbench(&["-c", "2", "-t", &transactions.to_string()]);
    assert!(load.wait().unwrap().success(), "pgbench failed");
}

fn restore_json(repo: &Path, target: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["restore", "--repo", path(repo), "-D", path(target), "-j", "2", "--output", "json"];
    args.extend_from_slice(extra);
    serde_json::from_str(&bs_ok(&args)).unwrap()
}

/// A delta guided by the target's tracking left the same files, byte for
/// byte, as one that compared every block of another copy of the target.
fn assert_same_files_as_compared(tracked: &Path, compared: &Path) {
    let (tracked, compared) = (tree(tracked), tree(compared));
    assert_eq!(tracked.len(), compared.len());
    for (rel, bytes) in &tracked {
        assert!(compared.get(rel) == Some(bytes), "{rel} differs between the tracked and the compared delta");
    }
}

/// Starts the restored `data` on a port of its own; its data must be the
/// backup's (`pg_dumpall`, pgbench's balances, amcheck).
fn start_and_check(name: &str, data: &Path, base: &Path, at_backup: &str, what: &str) {
    let back = Cluster::restored(name, data, base);
    back.start();
    back.wait_promoted();
    assert_same_dump(at_backup, &back.dumpall(), what);
    assert_pgbench_balances(&back, what);
    assert_amcheck_clean(&back, what);
    back.stop();
}

/// A full backup and an incremental under pgbench; the source then goes on
/// (pgbench, a new table, a stray file) and stops. `--delta` over its data
/// directory brings it back to the incremental's point, writing far fewer
/// bytes than a full restore; the same restore into an empty directory
/// writes every byte and gives the same data.
#[test]
fn delta_brings_a_diverged_data_directory_back_to_the_backup() {
    let base = scratch("delta");
    let (src, repo) = pgbench_source(&base, 10);
    backup(&src, &repo, &["-j", "2"]);
    pgbench_run(&src, 1500);
    let incr = backup(&src, &repo, &["-j", "2", "--type", "incr"]);
    assert_eq!(incr["type"], "incr", "{incr}");
    let at_backup = src.dumpall();

    // The cluster goes on after the backup.
    pgbench_run(&src, 2000);
    src.sql("postgres", "CREATE TABLE after_backup AS SELECT g FROM generate_series(1, 50000) g");
    // Summarized; then more changes, which the summarizer may not reach
    // before it stops (the delta reads them from the WAL).
    src.sql("postgres", "SELECT blocktrack.flush_summary()");
    src.sql("postgres", "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid % 997 = 0");
    assert_ne!(src.dumpall(), at_backup);

    // Refused while the server runs: nothing is touched.
    let (code, _, err) =
        bs(&["restore", "--repo", path(&repo), "-D", path(&src.data), "--delta", "--backup", "latest"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is in use") && err.contains("stop that server"), "{err}");
    assert!(src.data.join("global/pg_control").exists());
    assert!(src.try_sql("postgres", "SELECT 1").is_ok(), "the server still runs");
    // --delta with --force is a usage error.
    let (code, _, err) = bs(&["restore", "--repo", path(&repo), "-D", path(&src.data), "--delta", "--force"]);
    assert_eq!(code, 2, "{err}");
    src.stop();

    // Things the backup does not hold are removed; a file of the backup
    // that was truncated or grew is brought back.
    std::fs::write(src.data.join("base/1/stray_file"), b"not from the backup").unwrap();
    std::fs::create_dir(src.data.join("stray_dir")).unwrap();
    std::os::unix::fs::symlink("/etc", src.data.join("stray_link")).unwrap();
    chown_postgres(&src.data.join("base/1/stray_file"));
    let diverged = base.join("diverged-copy");
    copy_tree(&src.data, &diverged);
    let compared_copy = base.join("diverged-compared");
    copy_tree(&src.data, &compared_copy);

    // The target's own change tracking (summaries, then the WAL after them
    // up to its shutdown checkpoint) names the blocks to rewrite: nothing of
    // the relations is read.
    let r = restore_json(&repo, &src.data, &["--delta"]);
    assert_eq!(r["delta"], true);
    let basis = r["delta_basis"].as_str().unwrap();
    eprintln!("delta over the diverged cluster: {basis}");
    assert!(basis.contains("the target's change tracking from"), "{r}");
    let (delta_written, restored) = (r["bytes_written"].as_u64().unwrap(), r["bytes_restored"].as_u64().unwrap());
    assert!(
        delta_written > 0 && delta_written < restored / 2,
        "a delta restore wrote {delta_written} of {restored} bytes: {r}"
    );
    assert!(r["bytes_compared"].as_u64().unwrap() < restored / 10, "{r}");
    // The same delta comparing every block gives the same files, byte for byte.
    let rc = restore_json(&repo, &compared_copy, &["--delta", "--delta-compare-all"]);
    assert_eq!(rc["delta_basis"], "every block compared (--delta-compare-all)", "{rc}");
    assert!(rc["bytes_compared"].as_u64().unwrap() > restored / 2, "{rc}");
    assert_same_files_as_compared(&src.data, &compared_copy);
    assert!(r["files_unchanged"].as_u64().unwrap() > 100, "{r}");
    assert!(r["removed"].as_u64().unwrap() >= 3, "{r}");
    for gone in ["base/1/stray_file", "stray_dir", "stray_link"] {
        assert!(std::fs::symlink_metadata(src.data.join(gone)).is_err(), "{gone} is still there");
    }
    assert!(Path::new("/etc/passwd").exists(), "the link was removed, not followed");
    start_and_check("delta-restored", &src.data, &base, &at_backup, "delta restore over the diverged cluster");

    // Over an empty directory, --delta is a plain restore: every byte written.
    let empty = base.join("empty-data");
    std::fs::create_dir(&empty).unwrap();
    chown_postgres(&empty);
    let r = restore_json(&repo, &empty, &["--delta"]);
    let (written, restored) = (r["bytes_written"].as_u64().unwrap(), r["bytes_restored"].as_u64().unwrap());
    assert!(written * 10 > restored * 9, "into an empty directory {written} of {restored} bytes: {r}");
    let fresh = Cluster::restored("delta-empty", &empty, &base);
    // Before it starts: the backup's files as restored, to count what the
    // diverged copy had changed. The delta wrote those blocks and no others.
    let changed = changed_bytes(&empty, &diverged);
    // Every differing block, and at most a few more that the target's WAL
    // touched after the backup started without changing them in the end.
    assert!(
        delta_written >= changed && delta_written <= changed + changed / 2 + 8192,
        "the delta wrote {delta_written} bytes where {changed} differed"
    );
    let compared_written = rc["bytes_written"].as_u64().unwrap();
    assert!(
        compared_written >= changed && compared_written <= changed + 8192,
        "comparing every block, the delta wrote {compared_written} bytes where {changed} differed"
    );
    // A second delta over a copy that already matches writes only pg_control.
    let r = restore_json(&repo, &empty, &["--delta"]);
    assert_eq!(r["bytes_written"], 8192, "a delta over a matching copy: {r}");
    // All but pg_control (rewritten last) and postgresql.auto.conf (cut
    // back: the first restore appended its recovery settings).
    assert_eq!(r["files_unchanged"].as_u64().unwrap() + 2, r["files"].as_u64().unwrap(), "{r}");
    fresh.start();
    fresh.wait_promoted();
    assert_same_dump(&at_backup, &fresh.dumpall(), "delta restore into an empty directory");
    fresh.stop();
}

/// A primary that crashed (`pg_ctl -m immediate`) with changed pages on
/// disk that its summaries do not name: it ran with few shared buffers, so
/// updates after its last summary and its last checkpoint were written out
/// as buffers were evicted; a table was truncated (TRUNCATE: a new file,
/// the old one dropped at commit), one shrunk by VACUUM and one created in
/// that stretch too. `--delta` follows its WAL past the checkpoint to where
/// the valid WAL ends, as crash recovery would, and gives the same files,
/// byte for byte, as a delta comparing every block; the result starts at
/// the backup's point.
#[test]
fn delta_over_a_crashed_primary_follows_its_wal_to_the_end() {
    let base = scratch("delta-crash");
    let src = Cluster::init("source", &base);
    // Summaries only when asked for; buffers evicted (and written) early.
    src.append_conf("shared_buffers = 16MB\nblocktrack.summary_interval = 3600");
    src.start();
    src.sql("postgres", "CREATE EXTENSION pg_blocktrack");
    src.pgbench_init(10);
    src.sql("postgres", "CREATE TABLE shrinks AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 50000) g");
    let repo = base.join("repo");
    backup(&src, &repo, &["-j", "2"]);
    let at_backup = src.dumpall();
    pgbench_run(&src, 500);
    src.sql("postgres", "CHECKPOINT");
    src.sql("postgres", "SELECT blocktrack.flush_summary()");
    // After the last summary and the last checkpoint: files truncated,
    // shrunk and created, and about 3000 pages of pgbench_accounts
    // changed, more than the shared buffers hold.
    src.sql("postgres", "TRUNCATE pgbench_history");
    src.sql("postgres", "DELETE FROM shrinks WHERE g > 1000");
    src.sql("postgres", "VACUUM shrinks");
    let size: u64 = src.sql("postgres", "SELECT pg_relation_size('shrinks')").parse().unwrap();
    assert!(size < 1 << 20, "VACUUM truncated shrinks to {size} bytes");
    src.sql("postgres", "CREATE TABLE after_backup AS SELECT g FROM generate_series(1, 20000) g");
    for k in 0..3 {
        src.sql("postgres", &format!("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid % 997 = {k}"));
    }
    run(as_postgres("pg_ctl").arg("-D").arg(&src.data).args(["-m", "immediate", "-w", "stop"]));
    // A crash that takes the postmaster too leaves its postmaster.pid: no
    // process uses the directory, but the file is not proof enough.
    let pid_file = src.data.join("postmaster.pid");
    std::fs::write(&pid_file, "4194000\n").unwrap();
    let (code, _, err) = bs(&["restore", "--repo", path(&repo), "-D", path(&src.data), "--delta"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("holds postmaster.pid") && err.contains("if none runs on it"), "{err}");
    std::fs::remove_file(&pid_file).unwrap();
    let compared_copy = base.join("crashed-compared");
    copy_tree(&src.data, &compared_copy);

    let r = restore_json(&repo, &src.data, &["--delta"]);
    let basis = r["delta_basis"].as_str().unwrap();
    eprintln!("delta over the crashed primary: {basis}");
    assert!(basis.contains("to the end of its WAL: it stopped without a shutdown checkpoint"), "{r}");
    let records: u64 = basis
        .split(" WAL records after them")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count of WAL records in: {basis}"));
    assert!(records >= 3000, "the updates after the last summary were read from the WAL: {basis}");
    let restored = r["bytes_restored"].as_u64().unwrap();
    assert!(r["bytes_compared"].as_u64().unwrap() < restored / 10, "{r}");
    let rc = restore_json(&repo, &compared_copy, &["--delta", "--delta-compare-all"]);
    assert_same_files_as_compared(&src.data, &compared_copy);
    assert_eq!(rc["delta_basis"], "every block compared (--delta-compare-all)", "{rc}");
    start_and_check("crash-restored", &src.data, &base, &at_backup, "delta restore over the crashed primary");
}

/// A delta restore killed midway leaves a directory without pg_control
/// (it cannot start, so it is never taken for a good copy); run again, it
/// completes.
#[test]
fn delta_killed_midway_cannot_start_and_a_rerun_completes() {
    use std::os::unix::process::ExitStatusExt;
    let base = scratch("delta-kill");
    let (src, repo) = pgbench_source(&base, 5);
    // A copy of the cluster from before the backup, stopped cleanly.
    src.stop();
    let stale = base.join("stale-copy");
    copy_tree(&src.data, &stale);
    src.start();
    backup(&src, &repo, &["-j", "2"]);
    let at_backup = src.dumpall();
    pgbench_run(&src, 1000);
    src.stop();

    let out = run(blockstream()
        .args(["restore", "--repo", path(&repo), "-D", path(&src.data), "--delta", "-j", "2"])
        .env(blockstream::failpoint::ENV, "restore-record"));
    assert_eq!(out.status.signal(), Some(libc::SIGKILL), "{out:?}");
    assert!(!src.data.join("global/pg_control").exists(), "a killed delta leaves no pg_control");
    let start = run(as_postgres("pg_ctl")
        .args(["-D", path(&src.data), "-l"])
        .arg(base.join("killed.log"))
        .args(["-w", "-t", "20", "start"]));
    assert!(!start.status.success(), "a half-restored directory started");

    // Without its control file the target's tracking proves nothing: every block is compared.
    let r = restore_json(&repo, &src.data, &["--delta"]);
    let basis = r["delta_basis"].as_str().unwrap();
    assert!(basis.starts_with("every block compared: the target's control file"), "{r}");
    let back = Cluster::restored("delta-rerun", &src.data, &base);
    back.start();
    back.wait_promoted();
    assert_same_dump(&at_backup, &back.dumpall(), "delta rerun after a kill");
    assert_pgbench_balances(&back, "delta rerun");
    back.stop();

    // Over a copy older than the backup its tracking proves nothing either.
    let r = restore_json(&repo, &stale, &["--delta"]);
    let basis = r["delta_basis"].as_str().unwrap();
    assert!(basis.starts_with("every block compared: the target's last checkpoint"), "{r}");
    let old = Cluster::restored("delta-stale", &stale, &base);
    old.start();
    old.wait_promoted();
    assert_same_dump(&at_backup, &old.dumpall(), "delta over a copy older than the backup");
    old.stop();
}

/// `--db-include shop` from a chain (full + incremental): shop's data equals
/// the source's, the cluster starts, `analytics` (left out, in a tablespace
/// too) is listed as not restored, its files are zeros that take no space,
/// and it can be dropped. An unknown name is a usage error naming the
/// databases the backup holds.
#[test]
fn db_include_restores_one_database_and_the_catalogs() {
    let base = scratch("dbinclude");
    let src = Cluster::init("source", &base);
    src.start();
    src.sql("postgres", "CREATE EXTENSION pg_blocktrack");
    let spc = base.join("spc");
    std::fs::create_dir(&spc).unwrap();
    chown_postgres(&spc);
    src.sql("postgres", &format!("CREATE TABLESPACE spc LOCATION '{}'", spc.display()));
    src.sql("postgres", "CREATE DATABASE shop");
    src.sql("postgres", "CREATE DATABASE analytics");
    src.sql("shop", "CREATE TABLE orders AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 100000) g");
    src.sql("shop", "CREATE INDEX ON orders (v)");
    src.sql("analytics", "CREATE TABLE facts AS SELECT g, repeat('a', 200) AS v FROM generate_series(1, 100000) g");
    src.sql("analytics", "CREATE TABLE far TABLESPACE spc AS SELECT g FROM generate_series(1, 100000) g");
    src.sql("postgres", "CREATE TABLE kept AS SELECT g FROM generate_series(1, 1000) g");
    let repo = base.join("repo");
    backup(&src, &repo, &["-j", "2"]);
    src.sql("shop", "UPDATE orders SET v = 'changed' WHERE id % 100 = 0");
    src.sql("analytics", "UPDATE facts SET v = 'changed' WHERE g % 100 = 0");
    let incr = backup(&src, &repo, &["-j", "2", "--type", "incr"]);
    assert_eq!(incr["type"], "incr", "{incr}");
    // pg_dump brackets its output with \\restrict KEY, a random key per run.
    let dump = |c: &Cluster, db: &str| {
        let out = run_ok(std::process::Command::new(pg_bin("pg_dump")).args(c.conn()).arg(db));
        out.lines()
            .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let shop = dump(&src, "shop");
    let kept = src.sql("postgres", "SELECT count(*), sum(g) FROM kept");

    let target = base.join("partial-data");
    let new_spc = base.join("spc-restored");
    let map = format!("{}={}", spc.display(), new_spc.display());
    let (code, _, err) =
        bs(&["restore", "--repo", path(&repo), "-D", path(&target), "--db-include", "nosuch", "-T", &map]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("holds no database of that name") && err.contains("analytics, postgres, shop"), "{err}");
    assert!(err.contains("Usage: blockstream restore"), "{err}");
    assert!(!target.join("global/pg_control").exists());
    let r = restore_json(&repo, &target, &["--db-include", "shop", "-T", &map]);
    assert_eq!(r["databases_excluded"], serde_json::json!(["analytics"]), "{r}");
    let analytics_oid: u32 =
        src.sql("postgres", "SELECT oid FROM pg_database WHERE datname = 'analytics'").parse().unwrap();
    // The left-out database's relation files exist at their size, as zeros without blocks.
    let facts = src.sql("analytics", "SELECT pg_relation_filepath('facts')");
    let md = std::fs::metadata(target.join(&facts)).unwrap();
    assert!(md.len() > 1 << 20, "{facts} is {} bytes", md.len());
    use std::os::unix::fs::MetadataExt;
    assert_eq!(md.blocks(), 0, "{facts} takes no space");
    assert!(std::fs::read(target.join(&facts)).unwrap().iter().all(|&b| b == 0));
    let c = Cluster::restored("partial", &target, &base);
    c.start();
    c.wait_promoted();
    assert_eq!(dump(&c, "shop"), shop, "shop equals the source");
    assert_eq!(c.sql("postgres", "SELECT count(*), sum(g) FROM kept"), kept);
    c.sql("postgres", "DROP DATABASE analytics");
    assert!(!target.join(format!("base/{analytics_oid}")).exists());
    assert_amcheck_clean(&c, "restore with --db-include shop, analytics dropped");
    c.stop();
    src.stop();
}

fn ids(repo: &Path) -> Vec<(String, String)> {
    let info: serde_json::Value =
        serde_json::from_str(&bs_ok(&["info", "--repo", path(repo), "--output", "json"])).unwrap();
    info["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["backup_id"].as_str().unwrap().to_string(), b["type"].as_str().unwrap().to_string()))
        .collect()
}

/// Every regular file under `dir` with its bytes (postgresql.auto.conf
/// without the comment restore adds, which names the backup and the time).
fn tree(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(dir).unwrap().display().to_string();
            if md.is_dir() {
                stack.push(p);
            } else if md.is_file() {
                let mut bytes = std::fs::read(&p).unwrap();
                if rel == "postgresql.auto.conf" {
                    let text = String::from_utf8(bytes).unwrap();
                    bytes =
                        text.lines().filter(|l| !l.starts_with("# added by blockstream")).collect::<String>().into();
                }
                out.insert(rel, bytes);
            }
        }
    }
    out
}

/// full → incr → incr, merged: a killed merge leaves the chain as it was;
/// the merged full restores byte for byte as the chain did, verifies, and
/// once expire has dropped the chain it still restores equal to the source.
#[test]
fn merge_makes_a_full_backup_that_restores_like_the_chain() {
    use std::os::unix::process::ExitStatusExt;
    let base = scratch("merge");
    let (src, repo) = pgbench_source(&base, 5);
    src.sql("postgres", "CREATE TABLE will_drop AS SELECT g FROM generate_series(1, 20000) g");
    backup(&src, &repo, &["-j", "2"]);
    pgbench_run(&src, 800);
    src.sql("postgres", "CREATE TABLE grows AS SELECT g FROM generate_series(1, 50000) g");
    backup(&src, &repo, &["-j", "2", "--type", "incr"]);
    src.sql("postgres", "DROP TABLE will_drop; INSERT INTO grows SELECT g FROM generate_series(1, 50000) g");
    pgbench_run(&src, 800);
    let last = backup(&src, &repo, &["-j", "2", "--type", "incr"]);
    assert_eq!(last["type"], "incr", "{last}");
    let at_backup = src.dumpall();
    let before = ids(&repo);
    assert_eq!(before.len(), 3);
    // merge runs as the repository's owner (postgres here, as backup made it).
    let work = base.join("scratch");
    std::fs::create_dir(&work).unwrap();
    chown_postgres(&work);

    // A full backup has no chain to merge.
    let (code, _, err) = bs(&["merge", "--repo", path(&repo), "--backup", &before[0].0, "--scratch", path(&work)]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is a full backup") && err.contains("Usage: blockstream merge"), "{err}");
    // A scratch that is a file, or missing, is bad input.
    let file = base.join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    for (bad, says) in [(file.clone(), "is not a directory"), (base.join("missing"), "No such file")] {
        let (code, _, err) = bs(&["merge", "--repo", path(&repo), "--scratch", path(&bad)]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("--scratch") && err.contains(says) && err.contains("Usage: blockstream merge"), "{err}");
    }

    // Killed while restoring the chain, and while writing the new backup: the chain is untouched.
    for failpoint in ["restore-record", "copy-chunk@3"] {
        let out = run(blockstream()
            .args(["merge", "--repo", path(&repo), "--scratch", path(&work), "-j", "2"])
            .env(blockstream::failpoint::ENV, failpoint));
        assert_eq!(out.status.signal(), Some(libc::SIGKILL), "{failpoint}: {out:?}");
        assert_eq!(ids(&repo), before, "after a merge killed at {failpoint}");
    }
    bs_ok(&["verify", "--repo", path(&repo)]);

    let r: serde_json::Value = serde_json::from_str(&bs_ok(&[
        "merge",
        "--repo",
        path(&repo),
        "--scratch",
        path(&work),
        "-j",
        "2",
        "--output",
        "json",
    ]))
    .unwrap();
    let merged = r["backup_id"].as_str().unwrap().to_string();
    let chain: Vec<&str> = before.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(r["merged"], serde_json::json!(chain), "{r}");
    let after = ids(&repo);
    assert_eq!(after.len(), 4, "{after:?}");
    assert_eq!(after[3], (merged.clone(), "full".to_string()));
    let m = load_manifest(&repo, &merged);
    let origin = load_manifest(&repo, chain[2]);
    assert!(m.parent.is_none() && m.files.iter().all(|f| f.incremental.is_none()));
    assert_eq!((m.start_lsn, m.stop_lsn, &m.backup_label), (origin.start_lsn, origin.stop_lsn, &origin.backup_label));
    // The merge removed its scratch copy, and those of the merges killed before it.
    let left: Vec<_> = std::fs::read_dir(&work).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "scratch left behind: {left:?}");
    bs_ok(&["verify", "--repo", path(&repo), "--backup", &merged]);

    // Byte for byte, the merged backup restores as the chain does.
    let from_chain = base.join("chain-data");
    let from_merged = base.join("merged-data");
    restore_json(&repo, &from_chain, &["--backup", chain[2]]);
    restore_json(&repo, &from_merged, &["--backup", &merged]);
    let (a, b) = (tree(&from_chain), tree(&from_merged));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "the same files");
    for (k, v) in &a {
        assert!(b[k] == *v, "{k} differs between the chain's restore and the merged backup's");
    }

    // The chain can go; the merged backup restores on its own.
    bs_ok(&["expire", "--repo", path(&repo), "--retain-full", "1"]);
    assert_eq!(ids(&repo), vec![(merged.clone(), "full".to_string())]);
    let c = restore_and_start("merged-restored", &repo, &base, 2, &[]);
    assert_same_dump(&at_backup, &c.dumpall(), "restore of the merged backup after expire");
    assert_pgbench_balances(&c, "merged backup");
    assert_amcheck_clean(&c, "merged backup");
    c.stop();
    src.stop();
}
