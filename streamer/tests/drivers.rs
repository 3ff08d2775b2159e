//! One suite, every repository driver: the same lifecycle (archive-push,
//! full backup under pgbench, incremental, info, verify, restore that
//! matches the source, PITR through archive-get, drill, expire) runs on a
//! directory and on S3 (the Garage cluster of `scripts/garage.sh`). Then
//! what only an object store can do wrong: a node stopped mid-backup, a
//! wrong secret key, a backup killed mid-upload and `cleanup`.
//!
//! The S3 tests need `AWS_ENDPOINT_URL` and the keys (CI sources
//! `/tmp/blockstream-garage/env`); without them they say so and pass.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn garage() -> bool {
    let up = std::env::var_os("AWS_ENDPOINT_URL").is_some();
    if !up {
        eprintln!("skipped: no S3 store (run scripts/garage.sh start and source /tmp/blockstream-garage/env)");
    }
    up
}

fn s3_repo(name: &str) -> PathBuf {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    PathBuf::from(format!("s3://blockstream/e2e/{name}-{}-{nanos}", std::process::id()))
}

fn info(repo: &Path) -> serde_json::Value {
    serde_json::from_str(&bs_ok(&["info", "--repo", path(repo), "--output", "json"])).unwrap()
}

fn backup_ids(repo: &Path) -> Vec<String> {
    info(repo)["backups"].as_array().unwrap().iter().map(|b| b["backup_id"].as_str().unwrap().to_string()).collect()
}

/// The whole life of a repository, the same on every driver; `push` adds
/// options to archive-push (S3 pushes asynchronously through a local spool).
fn lifecycle(name: &str, repo: &Path, push: &str) {
    let base = scratch(name);
    let c = Cluster::init("source", &base);
    let push = push.replace("BASE", path(&base));
    c.append_conf(&format!(
        "archive_mode = on\narchive_command = '{} archive-push --repo {} {push} %p'\n",
        env!("CARGO_BIN_EXE_blockstream"),
        repo.display()
    ));
    c.start();
    c.sql("postgres", "CREATE EXTENSION pg_blocktrack");
    c.pgbench_init(5);

    // A full backup while pgbench writes, then an incremental after more.
    let mut load = c.pgbench(&["-n", "-c", "2", "-T", "4"]);
    let full = backup(&c, repo, &["-j", "2", "--type", "full"]);
    assert!(load.wait().unwrap().success());
    run_ok(Command::new(pg_bin("pgbench")).args(c.conn()).args(["-n", "-c", "2", "-t", "500", "postgres"]));
    c.sql("postgres", "CREATE TABLE marks AS SELECT 'at-incr'::text AS m");
    let incr = backup(&c, repo, &["-j", "2", "--type", "incr"]);
    assert_eq!(incr["type"], "incr", "{incr}");
    let full_id = full["backup_id"].as_str().unwrap().to_string();
    let incr_id = incr["backup_id"].as_str().unwrap().to_string();
    assert!(
        incr["stats"]["changed_blocks"].as_u64().unwrap() > 0
            && incr["changed_share"].as_f64().unwrap() < 0.75
            && incr["stats"]["data_bytes"].as_u64().unwrap() < full["stats"]["data_bytes"].as_u64().unwrap(),
        "an incremental reads changed blocks only: {incr} vs {full}"
    );
    assert_eq!(backup_ids(repo), vec![full_id.clone(), incr_id.clone()]);

    // The state to restore to: a mark, archived.
    let expected = c.dumpall();
    c.sql("postgres", "SELECT pg_create_restore_point('drivers_point')");
    switch_and_wait(&c);
    // After the point: more changes that a restore to it must not show.
    c.sql("postgres", "INSERT INTO marks VALUES ('after-point')");
    switch_and_wait(&c);

    // verify reads every chunk of every backup and the archive.
    let out = bs_ok(&["verify", "--repo", path(repo)]);
    assert!(out.contains(&incr_id), "{out}");

    // Restore the chain at -j 4 to the restore point: archive-get fetches the WAL.
    let r = restore_and_start("restored", repo, &base, 4, &["--target-name", "drivers_point"]);
    assert_same_dump(&expected, &r.dumpall(), "restore of the chain to the restore point");
    assert_eq!(r.sql("postgres", "SELECT string_agg(m, ',') FROM marks"), "at-incr");
    let sum = r.sql(
        "postgres",
        "SELECT (SELECT sum(abalance) FROM pgbench_accounts) = (SELECT sum(delta) FROM pgbench_history)",
    );
    assert_eq!(sum, "t", "pgbench's balance invariant");
    assert_amcheck_clean(&r, "restored cluster");
    r.stop();

    // A drill proves the latest backup restores and records it in the repository.
    let drill: serde_json::Value =
        serde_json::from_str(&bs_ok(&["drill", "--repo", path(repo), "--output", "json"])).unwrap();
    assert_eq!(drill["ok"], true, "{drill}");
    assert!(info(repo).to_string().contains(&incr_id));

    // A second full, then expire keeps one full: the first chain goes.
    let second = backup(&c, repo, &["-j", "2", "--type", "full"]);
    let out = bs_ok(&["expire", "--repo", path(repo), "--retain-full", "1", "--output", "json"]);
    let ids = backup_ids(repo);
    assert_eq!(ids, vec![second["backup_id"].as_str().unwrap().to_string()], "{out}");
    bs_ok(&["verify", "--repo", path(repo)]);
    c.stop();
}

#[test]
fn lifecycle_on_a_directory() {
    let base = scratch("drivers-posix-repo");
    lifecycle("drivers-posix", &base.join("repo"), "");
}

#[test]
fn lifecycle_on_s3() {
    if !garage() {
        return;
    }
    lifecycle("drivers-s3", &s3_repo("lifecycle"), "--async --workers 4 --spool BASE/spool");
}

/// Objects of the repository as the S3 API lists them (the test's own view,
/// through the same store).
fn uploads(repo: &Path) -> usize {
    let store = blockstream::storage::at(repo).unwrap();
    store.incomplete_uploads().unwrap().len()
}

/// A backup killed while it uploads leaves no backup listed; `cleanup`
/// aborts the multipart uploads it left, and says how many.
#[test]
fn killed_upload_is_not_listed_and_cleanup_aborts_it() {
    if !garage() {
        return;
    }
    let base = scratch("drivers-kill");
    let repo = s3_repo("kill");
    let c = Cluster::init("source", &base);
    c.start();
    c.sql("postgres", "CREATE EXTENSION pg_blocktrack");
    c.pgbench_init(10);
    backup(&c, &repo, &["-j", "2"]);
    let before = backup_ids(&repo);

    let mut args: Vec<String> = vec!["backup".into(), "-D".into(), c.data.display().to_string()];
    args.extend(c.conn());
    args.extend(
        ["--repo", path(&repo), "-j", "2", "--type", "full", "--max-rate", "8M", "--compress", "none"]
            .map(String::from),
    );
    // A short lease, so that the dead process's lock runs out soon.
    let mut child = blockstream()
        .args(&args)
        .env("BLOCKSTREAM_S3_LOCK_LEASE", "6")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(60);
    while uploads(&repo) == 0 {
        assert!(Instant::now() < until, "the backup never started a multipart upload");
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(uploads(&repo) > 0);
    assert_eq!(backup_ids(&repo), before, "a killed backup is not listed");

    // The lock the killed process held runs out (BLOCKSTREAM_S3_LOCK_LEASE in CI is short).
    let (code, out, err) = bs(&["cleanup", "--repo", path(&repo), "--dry-run"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("would abort"), "{out}");
    assert!(uploads(&repo) > 0, "a dry run aborts nothing");
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        let (code, out, err) = bs(&["cleanup", "--repo", path(&repo)]);
        if code == 0 {
            assert!(out.contains("aborted"), "{out}");
            break;
        }
        assert!(err.contains("is locked"), "{err}");
        assert!(Instant::now() < until, "the dead backup's lock never ran out: {err}");
        std::thread::sleep(Duration::from_secs(2));
    }
    assert_eq!(uploads(&repo), 0, "cleanup aborted every orphaned upload");
    // The unfinished backup's prefix is gone too; the repository verifies.
    let listed = blockstream::storage::at(&repo).unwrap().list("backups").unwrap();
    assert_eq!(listed.len(), before.len(), "{listed:?}");
    bs_ok(&["verify", "--repo", path(&repo)]);
    c.stop();
}

/// A wrong secret key: exit 1 and the store's refusal named; nothing written.
#[test]
fn wrong_secret_key_is_a_clear_error() {
    if !garage() {
        return;
    }
    let base = scratch("drivers-badkey");
    let repo = s3_repo("badkey");
    let c = Cluster::init("source", &base);
    c.start();
    c.sql("postgres", "CREATE EXTENSION pg_blocktrack");
    let mut args: Vec<String> = vec!["backup".into(), "-D".into(), c.data.display().to_string()];
    args.extend(c.conn());
    args.extend(["--repo", path(&repo)].map(String::from));
    let out = run(blockstream().args(&args).env("AWS_SECRET_ACCESS_KEY", "0".repeat(64)));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("HTTP 403"), "{err}");
    assert!(err.contains(path(&repo)), "{err}");
    let (code, _, err) = bs(&["info", "--repo", path(&repo)]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("does not exist"), "nothing was written: {err}");
    // No credentials at all: a usage error naming what to set.
    let out = run(blockstream()
        .args(["info", "--repo", path(&repo)])
        .env_remove("AWS_ACCESS_KEY_ID")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("AWS_ACCESS_KEY_ID"));
    c.stop();
}

/// One of the three Garage nodes (not the one the client talks to) stops
/// mid-backup: the backup completes on the remaining quorum and restores.
#[test]
fn a_node_stopped_mid_backup() {
    if !garage() {
        return;
    }
    let base = scratch("drivers-node");
    let repo = s3_repo("node");
    let c = Cluster::init("source", &base);
    c.start();
    c.sql("postgres", "CREATE EXTENSION pg_blocktrack");
    c.pgbench_init(10);
    let mut args: Vec<String> = vec!["backup".into(), "-D".into(), c.data.display().to_string()];
    args.extend(c.conn());
    args.extend(
        ["--repo", path(&repo), "-j", "2", "--max-rate", "20M", "--compress", "none", "--output", "json"]
            .map(String::from),
    );
    let child = blockstream().args(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let until = Instant::now() + Duration::from_secs(60);
    while uploads(&repo) == 0 {
        assert!(Instant::now() < until, "the backup never started a multipart upload");
        std::thread::sleep(Duration::from_millis(100));
    }
    let garage_dir = std::env::var("GARAGE_DIR").unwrap_or_else(|_| "/tmp/blockstream-garage".into());
    let script = workspace().join("scripts/garage.sh");
    run_ok(Command::new("bash").arg(&script).args(["kill", "3", &garage_dir]));
    let out = child.wait_with_output().unwrap();
    let restart = run(Command::new("bash").arg(&script).args(["restart", "3", &garage_dir]));
    assert!(out.status.success(), "backup with a node down failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(restart.status.success(), "{}", String::from_utf8_lossy(&restart.stderr));
    let expected = c.dumpall();
    c.stop();
    let r = restore_and_start("restored", &repo, &base, 2, &[]);
    assert_same_dump(&expected, &r.dumpall(), "restore of a backup taken with a node down");
    r.stop();
}

/// The SQL functions on an S3 repository: run_backup from a background
/// worker, backups(), validate_backup() and verify(); a URL outside the
/// allow-list is 42501. The server reads the credentials from its own
/// environment (the test starts it with the AWS_* variables).
#[test]
fn sql_functions_on_s3() {
    if !garage() {
        return;
    }
    let base = scratch("drivers-sql");
    let repo = s3_repo("sql");
    let c = Cluster::init("source", &base);
    c.append_conf("blocktrack.allowed_repositories = 's3://blockstream/e2e'\n");
    c.start();
    c.sql("postgres", "CREATE EXTENSION pg_blocktrack");
    c.pgbench_init(2);
    let r = path(&repo);
    let full = c.sql("postgres", &format!("SELECT blocktrack.run_backup('{r}', 'full')"));
    run_ok(Command::new(pg_bin("pgbench")).args(c.conn()).args(["-n", "-t", "200", "postgres"]));
    let incr = c.sql("postgres", &format!("SELECT blocktrack.run_backup('{r}', 'incr')"));
    assert_eq!(
        c.sql("postgres", &format!("SELECT string_agg(backup_id || ':' || backup_type, ',' ORDER BY backup_id) FROM blocktrack.backups('{r}')")),
        format!("{full}:full,{incr}:incr")
    );
    assert_eq!(backup_ids(&repo), vec![full.clone(), incr.clone()], "the CLI sees what SQL wrote");
    let bad = c.sql("postgres", &format!("SELECT count(*) FROM blocktrack.validate_backup('{r}') WHERE NOT ok"));
    assert_eq!(bad, "0");
    let checked = c.sql("postgres", &format!("SELECT count(*) FROM blocktrack.run_verify('{r}') WHERE ok"));
    assert_eq!(checked, "2");
    let err = c.try_sql("postgres", "SELECT * FROM blocktrack.backups('s3://blockstream/elsewhere')").unwrap_err();
    assert!(err.contains("is not under blocktrack.allowed_repositories"), "{err}");
    let err = c.try_sql("postgres", "SELECT * FROM blocktrack.backups('s3://blockstream/e2e/../x')").unwrap_err();
    assert!(err.contains("is not a plain key prefix"), "{err}");
    c.stop();
    let expected_restore = restore_and_start("restored", &repo, &base, 2, &[]);
    assert_amcheck_clean(&expected_restore, "restore of a backup run_backup put in S3");
    expected_restore.stop();
}

/// Every object of a repository, through its store.
fn all_objects(repo: &Path) -> Vec<(String, Vec<u8>)> {
    let store = blockstream::storage::at(repo).unwrap();
    let mut out = Vec::new();
    let mut todo = vec![String::new()];
    while let Some(prefix) = todo.pop() {
        for e in store.list(&prefix).unwrap() {
            let key = blockstream::storage::join(&prefix, &e.name);
            match e.kind {
                blockstream::storage::Kind::Prefix => todo.push(key),
                _ => out.push((key.clone(), store.read(&key, 1 << 30).unwrap())),
            }
        }
    }
    out
}

fn holds(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// An encrypted repository on a driver: backup, incr, verify, restore;
/// no plaintext in any object (zstd frames decompressed too); clear
/// refusals for a missing, wrong or loosely kept key; key rotation.
fn encrypted(name: &str, repo: &Path) {
    const MARKER: &str = "MARKER-secret-row-5c2a9";
    let base = scratch(name);
    // Owned by postgres: archive_command and restore_command read them as the server's user.
    let secret = |file: &str, text: &str, mode: u32| {
        let p = base.join(file);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
        chown_postgres(&p);
        p.display().to_string()
    };
    let pass = secret("pass", "correct horse battery staple\n", 0o600);
    let loose = secret("loose", "correct horse battery staple\n", 0o644);
    let c = Cluster::init("source", &base);
    c.append_conf(&format!(
        "archive_mode = on\narchive_command = '{} archive-push --repo {} --passphrase-file {pass} %p'\n",
        env!("CARGO_BIN_EXE_blockstream"),
        repo.display()
    ));
    c.start();
    c.sql("postgres", "CREATE EXTENSION pg_blocktrack");
    c.pgbench_init(2);
    c.sql("postgres", &format!("CREATE TABLE secrets AS SELECT '{MARKER}' || g AS s FROM generate_series(1, 5000) g"));

    // A passphrase file others may read is refused, and nothing is written.
    let mut args: Vec<String> = vec!["backup".into(), "-D".into(), c.data.display().to_string()];
    args.extend(c.conn());
    args.extend(["--repo", path(repo), "-j", "2"].map(String::from));
    let with = |extra: &[&str]| {
        let mut a = args.clone();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let out = run(blockstream().args(with(&["--passphrase-file", &loose])));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("has mode 0644: it must be readable by its owner only"), "{err}");
    assert!(all_objects(repo).iter().all(|(k, _)| !k.starts_with("backups/")), "a refused backup wrote nothing");

    let full: serde_json::Value =
        serde_json::from_str(&bs_ok(&argv(&with(&["--passphrase-file", &pass, "--output", "json"])))).unwrap();
    run_ok(Command::new(pg_bin("pgbench")).args(c.conn()).args(["-n", "-t", "300", "postgres"]));
    let incr: serde_json::Value =
        serde_json::from_str(&bs_ok(&argv(&with(&["--passphrase-file", &pass, "--type", "incr", "--output", "json"]))))
            .unwrap();
    assert_eq!(incr["parent"], full["backup_id"]);
    // A restore point after the incremental, reached through the encrypted archive.
    c.sql("postgres", "INSERT INTO secrets VALUES ('at the point')");
    let expected = c.dumpall();
    c.sql("postgres", "SELECT pg_create_restore_point('enc_point')");
    switch_and_wait(&c);
    c.sql("postgres", "INSERT INTO secrets VALUES ('after the point')");
    switch_and_wait(&c);
    c.stop();

    // No plaintext anywhere; every zstd frame decompressed shows none either.
    let objects = all_objects(repo);
    assert!(objects.iter().any(|(k, _)| k == "keys.json"));
    assert!(objects.iter().filter(|(k, _)| k.starts_with("archive/")).count() >= 3, "WAL was archived");
    for (key, bytes) in &objects {
        assert!(!holds(bytes, MARKER.as_bytes()), "{key} holds the marker");
        for i in (0..bytes.len().saturating_sub(4)).filter(|&i| bytes[i..].starts_with(&[0x28, 0xb5, 0x2f, 0xfd])) {
            if let Ok(raw) = zstd::stream::decode_all(&bytes[i..]) {
                assert!(!holds(&raw, MARKER.as_bytes()), "{key} holds a plain zstd frame with the marker");
            }
        }
    }

    // info says so; verify and restore need the key.
    let info_out: serde_json::Value =
        serde_json::from_str(&bs_ok(&["info", "--repo", path(repo), "--passphrase-file", &pass, "--output", "json"]))
            .unwrap();
    assert_eq!(info_out["encrypted"], true, "{info_out}");
    let (code, _, err) = bs(&["verify", "--repo", path(repo)]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is encrypted: give its passphrase"), "{err}");
    let out = run(blockstream().args(["verify", "--repo", path(repo)]).env("BLOCKSTREAM_PASSPHRASE", "wrong"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("is encrypted; the key does not open it"), "{err}");
    let (code, _, err) =
        bs(&["verify", "--repo", path(repo), "--key-file", &base.join("absent").display().to_string()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("absent"), "{err}");
    let out = bs_ok(&["verify", "--repo", path(repo), "--passphrase-file", &pass]);
    assert!(out.contains("archive: ok"), "{out}");
    // The verify log is sealed; with the key, metrics read it back.
    let store = blockstream::storage::at(repo).unwrap();
    let log = store.read("verify.jsonl", 1 << 20).unwrap();
    assert!(holds(&log, b"\"sealed\"") && !holds(&log, b"backup_id"), "{}", String::from_utf8_lossy(&log));
    let metrics = bs_ok(&["metrics", "--repo", path(repo), "--passphrase-file", &pass]);
    assert!(metrics.contains("last_verify_success 1"), "{metrics}");

    // A flipped bit in an archived segment: verify names it.
    let (seg_key, seg) = objects
        .iter()
        .filter(|(k, _)| k.starts_with("archive/") && k.ends_with(".bsw") && !k.contains(".history"))
        .max_by_key(|(k, _)| k.clone())
        .unwrap();
    let mut bad = seg.clone();
    let n = bad.len();
    bad[n - 40] ^= 0x08;
    store.put(seg_key, &bad).unwrap();
    if !blockstream::storage::is_url(repo) {
        chown_postgres(&repo.join(seg_key)); // written as root here; verify runs as the repository's owner
    }
    let (code, out, _) = bs(&["verify", "--repo", path(repo), "--passphrase-file", &pass]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("fails its authentication tag") && out.contains(seg_key.as_str()), "{out}");
    store.put(seg_key, seg).unwrap();

    // Rotation: the new passphrase restores the chain; the old one is refused.
    let new = secret("new", "a brand new passphrase\n", 0o600);
    bs_ok(&["key", "rotate", "--repo", path(repo), "--passphrase-file", &pass, "--new-passphrase-file", &new]);
    let (code, _, err) = bs(&["verify", "--repo", path(repo), "--passphrase-file", &pass]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("the key does not open it"), "{err}");
    let r = restore_and_start("restored", repo, &base, 2, &["--passphrase-file", &new, "--target-name", "enc_point"]);
    assert_same_dump(&expected, &r.dumpall(), "restore of an encrypted chain to a point in its encrypted archive");
    assert_eq!(r.sql("postgres", "SELECT count(*) FROM secrets"), "5001");
    r.stop();
}

fn argv(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn encrypted_on_a_directory() {
    let base = scratch("drivers-enc-posix-repo");
    encrypted("drivers-enc-posix", &base.join("repo"));
}

#[test]
fn encrypted_on_s3() {
    if !garage() {
        return;
    }
    encrypted("drivers-enc-s3", &s3_repo("encrypted"));
}

/// SQL on an encrypted repository: the key comes from a superuser-only
/// setting naming a file; run_backup encrypts from the first backup on,
/// the catalog, validate_backup and run_verify open it, and without the
/// setting the repository is refused with the reason.
#[test]
fn sql_functions_on_an_encrypted_repository() {
    let base = scratch("drivers-sql-enc");
    let repo = base.join("repo");
    let pass = base.join("pass");
    std::fs::write(&pass, "sql passphrase\n").unwrap();
    std::fs::set_permissions(&pass, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    chown_postgres(&pass);
    let c = Cluster::init("source", &base);
    c.append_conf(&format!(
        "blocktrack.allowed_repositories = '{}'\nblocktrack.passphrase_file = '{}'\n",
        base.display(),
        pass.display()
    ));
    c.start();
    c.sql("postgres", "CREATE EXTENSION pg_blocktrack");
    c.pgbench_init(2);
    let r = path(&repo);
    let full = c.sql("postgres", &format!("SELECT blocktrack.run_backup('{r}', 'full')"));
    run_ok(Command::new(pg_bin("pgbench")).args(c.conn()).args(["-n", "-t", "200", "postgres"]));
    let incr = c.sql("postgres", &format!("SELECT blocktrack.run_backup('{r}', 'incr')"));
    let expected = c.dumpall();
    assert!(repo.join("keys.json").exists(), "run_backup encrypted the repository");
    assert_eq!(
        c.sql(
            "postgres",
            &format!("SELECT string_agg(backup_id, ',' ORDER BY backup_id) FROM blocktrack.backups('{r}')")
        ),
        format!("{full},{incr}")
    );
    assert_eq!(c.sql("postgres", &format!("SELECT count(*) FROM blocktrack.validate_backup('{r}') WHERE NOT ok")), "0");
    assert_eq!(c.sql("postgres", &format!("SELECT count(*) FROM blocktrack.run_verify('{r}') WHERE ok")), "2");
    // Without the setting: refused, saying why.
    let err = c
        .try_sql("postgres", &format!("SET blocktrack.passphrase_file = ''; SELECT * FROM blocktrack.backups('{r}')"))
        .unwrap_err();
    assert!(err.contains("is encrypted"), "{err}");
    // Only a superuser names the key file.
    c.sql("postgres", "CREATE ROLE grantee LOGIN");
    let err = run(Command::new(pg_bin("psql")).args(c.conn()).args([
        "-U",
        "grantee",
        "-d",
        "postgres",
        "-XAtqc",
        "SET blocktrack.passphrase_file = '/tmp/x'",
    ]));
    assert!(String::from_utf8_lossy(&err.stderr).contains("permission denied"), "{err:?}");
    c.stop();
    let pass_s = pass.display().to_string();
    let restored = restore_and_start("restored", &repo, &base, 2, &["--passphrase-file", &pass_s]);
    assert_same_dump(&expected, &restored.dumpall(), "restore of what run_backup encrypted");
    restored.stop();
}

/// Kills the TLS front when the test ends.
struct Proxy(std::process::Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A store behind a private certificate authority: https with
/// `AWS_CA_BUNDLE` works end to end; without it the certificate is refused
/// at once (no retries), naming the problem.
#[test]
fn s3_over_tls_with_a_private_ca() {
    if !garage() {
        return;
    }
    let base = scratch("drivers-tls");
    // A private CA, and the store's certificate signed by it.
    let (ca, ca_key) = (base.join("ca.pem"), base.join("ca.key"));
    let (cert, key, csr, ext) =
        (base.join("srv.pem"), base.join("srv.key"), base.join("srv.csr"), base.join("srv.ext"));
    run_ok(Command::new("openssl").args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]).args([
        "-subj",
        "/CN=blockstream test CA",
        "-keyout",
        path(&ca_key),
        "-out",
        path(&ca),
    ]));
    std::fs::write(&ext, "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n").unwrap();
    run_ok(Command::new("openssl").args(["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1"]).args([
        "-keyout",
        path(&key),
        "-out",
        path(&csr),
    ]));
    run_ok(Command::new("openssl").args(["x509", "-req", "-days", "1", "-CAcreateserial"]).args([
        "-in",
        path(&csr),
        "-CA",
        path(&ca),
        "-CAkey",
        path(&ca_key),
        "-extfile",
        path(&ext),
        "-out",
        path(&cert),
    ]));
    let port = 3444;
    let _proxy = Proxy(
        Command::new("python3")
            .arg(workspace().join("bench/tls_proxy.py"))
            .args([&port.to_string(), "127.0.0.1:3900", path(&cert), path(&key)])
            .spawn()
            .unwrap(),
    );
    let until = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < until, "the TLS front did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let repo = s3_repo("tls");
    let endpoint = format!("https://127.0.0.1:{port}");

    // Without the CA: refused, quickly, saying why.
    let t = Instant::now();
    let out = run(blockstream().args(["info", "--repo", path(&repo)]).env("AWS_ENDPOINT_URL", &endpoint));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("certificate") || err.contains("UnknownIssuer"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(5), "a certificate error is not retried: {:?}", t.elapsed());

    // With it: a backup and its verification over https.
    let c = Cluster::init("source", &base);
    c.start();
    c.sql("postgres", "CREATE EXTENSION pg_blocktrack");
    let mut args: Vec<String> = vec!["backup".into(), "-D".into(), c.data.display().to_string()];
    args.extend(c.conn());
    args.extend(["--repo", path(&repo), "--output", "json"].map(String::from));
    let tls = |cmd: &mut Command| {
        cmd.env("AWS_ENDPOINT_URL", &endpoint).env("AWS_CA_BUNDLE", &ca);
    };
    let mut b = blockstream();
    b.args(&args);
    tls(&mut b);
    let out = run(&mut b);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut v = blockstream();
    v.args(["verify", "--repo", path(&repo)]);
    tls(&mut v);
    let out = run(&mut v);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(": ok ("));
    c.stop();
}
