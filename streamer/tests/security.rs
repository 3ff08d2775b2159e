//! Attacks and mistakes, each tried on a real cluster or a crafted
//! repository: a role granted only EXECUTE, hostile repositories (a 2^50
//! length, a FIFO, a one-byte WAL segment size, a symbolic link to
//! pg_control) read from SQL, `--force` aimed at a running cluster, a
//! manifest naming a root-only tablespace location, a symbolic link in the
//! data directory, loose repository modes, a drill another user tries to
//! reach, malformed manifests, an interrupted restore, and connections over
//! TLS, `.pgpass` and service files.
//!
//! Run as root with pg_blocktrack installed:
//! `cargo test --release -p blockstream --test security -- --test-threads=1`.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A started cluster with pg_blocktrack and pgbench data.
fn source(base: &Path, conf: &str) -> Cluster {
    let c = Cluster::init("source", base);
    if !conf.is_empty() {
        c.append_conf(conf);
    }
    c.start();
    c.sql("postgres", "CREATE EXTENSION pg_blocktrack");
    c.pgbench_init(1);
    c
}

/// psql as `role`, errors with their SQLSTATE (VERBOSITY verbose).
fn sql_as(c: &Cluster, role: &str, sql: &str) -> Result<String, String> {
    let out = run(Command::new(pg_bin("psql"))
        .args(["-h", "/tmp", "-p", &c.port.to_string(), "-U", role, "-d", "postgres", "-XAtq"])
        .args(["-v", "ON_ERROR_STOP=1", "-v", "VERBOSITY=verbose", "-c", sql]));
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn validate_sql(repo: &Path) -> String {
    format!("SELECT check_name || ': ' || ok || ': ' || detail FROM blocktrack.validate_backup('{}')", repo.display())
}

/// A copy of `repo` at `to` whose latest manifest `change` edits (re-signed).
fn hostile_copy(repo: &Path, to: &Path, id: &str, change: impl FnOnce(&mut blockstream::manifest::Manifest)) {
    copy_tree(repo, to);
    let mut m = load_manifest(to, id);
    change(&mut m);
    store_manifest(to, &m);
    chown_postgres(&to.join("backups").join(id).join("manifest.json"));
}

/// Finding 1: validate_backup needs privileges and an allowed path; hostile
/// repositories it reads fail a row, never crash, hang or leak. The
/// postmaster does not restart and an unrelated session survives.
#[test]
fn sql_paths_are_checked_and_hostile_repositories_fail_cleanly() {
    let base = scratch("sqlpaths");
    let allowed = base.join("allowed");
    std::fs::create_dir(&allowed).unwrap();
    chown_postgres(&allowed);
    let c = source(&base, &format!("blocktrack.allowed_repositories = '{}'", allowed.display()));
    let repo = allowed.join("repo");
    let id = backup(&c, &repo, &["-j", "2"])["backup_id"].as_str().unwrap().to_string();
    let started = c.postmaster_start_time();
    let bystander = Command::new(pg_bin("psql"))
        .args(c.conn())
        .args(["-d", "postgres", "-XAtqc", "SELECT pg_sleep(25), 'bystander survived'"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();

    c.sql(
        "postgres",
        "CREATE ROLE grantee LOGIN; GRANT USAGE ON SCHEMA blocktrack TO grantee;
         GRANT EXECUTE ON FUNCTION blocktrack.validate_backup(text, text) TO grantee;
         CREATE ROLE nobody_role LOGIN;",
    );
    let err = sql_as(&c, "nobody_role", &validate_sql(&repo)).unwrap_err();
    assert!(err.contains("42501") && err.contains("permission denied for schema blocktrack"), "{err}");
    let err = sql_as(&c, "grantee", &validate_sql(&repo)).unwrap_err();
    assert!(err.contains("42501") && err.contains("permission denied to use repository"), "{err}");
    assert!(err.contains("pg_read_server_files"), "{err}");
    let err = sql_as(&c, "grantee", "SET blocktrack.allowed_repositories = '/'").unwrap_err();
    assert!(err.contains("42501"), "a grantee cannot widen the allow-list: {err}");

    c.sql("postgres", "GRANT pg_read_server_files TO grantee");
    std::os::unix::fs::symlink("/etc", allowed.join("escape")).unwrap();
    for outside in [PathBuf::from("/etc"), allowed.join("../allowed/../"), allowed.join("escape"), c.data.clone()] {
        let err = sql_as(&c, "grantee", &validate_sql(&outside)).unwrap_err();
        assert!(err.contains("42501") && err.contains("is not under blocktrack.allowed_repositories"), "{err}");
    }
    let err = sql_as(&c, "grantee", &validate_sql(&allowed.join("absent"))).unwrap_err();
    assert!(err.contains("58P01") && err.contains("does not exist"), "{err}");
    let rows = sql_as(&c, "grantee", &validate_sql(&repo)).unwrap();
    assert!(rows.lines().count() == 8 && rows.lines().all(|l| l.contains(": true: ")), "{rows}");

    // A chunk that claims 2^50 raw bytes (Rust would abort the backend allocating it).
    let raw = allowed.join("raw");
    hostile_copy(&repo, &raw, &id, |m| m.streams[0].chunks[0].raw = 1 << 50);
    let rows = sql_as(&c, "grantee", &validate_sql(&raw)).unwrap();
    assert!(rows.contains("manifest: false:") && rows.contains("1125899906842624 raw bytes"), "{rows}");

    // A one-byte WAL segment size and a huge LSN range (a loop of 2^64 steps).
    let wal = allowed.join("walseg");
    hostile_copy(&repo, &wal, &id, |m| {
        m.wal_segment_size = 1;
        m.stop_lsn = blockstream::lsn::Lsn(u64::MAX - 1);
    });
    let rows = sql_as(&c, "grantee", &validate_sql(&wal)).unwrap();
    assert!(rows.contains("manifest: false:") && rows.contains("wal_segment_size 1,"), "{rows}");

    // A stream that is a FIFO: refused at once, not read forever.
    let fifo = allowed.join("fifo");
    copy_tree(&repo, &fifo);
    let stream = fifo.join("backups").join(&id).join("stream-00.bsz");
    std::fs::remove_file(&stream).unwrap();
    run_ok(Command::new("mkfifo").arg(&stream));
    chown_postgres(&stream);
    let t = Instant::now();
    let rows = sql_as(&c, "grantee", &validate_sql(&fifo)).unwrap();
    assert!(t.elapsed() < Duration::from_secs(20), "validate_backup took {:?} on a FIFO", t.elapsed());
    assert!(rows.contains("chunks: false:") && rows.contains("it is a FIFO, not a regular file"), "{rows}");

    // A stream that is a link to the server's own pg_control: not followed, nothing of it shown.
    let link = allowed.join("link");
    copy_tree(&repo, &link);
    let stream = link.join("backups").join(&id).join("stream-00.bsz");
    std::fs::remove_file(&stream).unwrap();
    std::os::unix::fs::symlink(c.data.join("global/pg_control"), &stream).unwrap();
    let rows = sql_as(&c, "grantee", &validate_sql(&link)).unwrap();
    assert!(rows.contains("chunks: false:") && rows.contains("symbolic link"), "{rows}");
    assert!(!rows.contains("bad magic"), "bytes of the link's target were read: {rows}");
    // A backup directory that is a link is not a backup.
    let dirlink = allowed.join("dirlink");
    std::fs::create_dir_all(dirlink.join("backups")).unwrap();
    std::fs::copy(repo.join("repo.json"), dirlink.join("repo.json")).unwrap();
    std::os::unix::fs::symlink(repo.join("backups").join(&id), dirlink.join("backups").join(&id)).unwrap();
    run_ok(Command::new("chown").args(["-R", "postgres:postgres"]).arg(&dirlink));
    let err = sql_as(&c, "grantee", &validate_sql(&dirlink)).unwrap_err();
    assert!(err.contains("holds no backup yet"), "{err}");

    assert_eq!(c.postmaster_start_time(), started, "the postmaster restarted");
    let out = bystander.wait_with_output().unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("bystander survived"),
        "an unrelated session was cut"
    );
}

fn file_count(dir: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                n += 1;
            }
        }
    }
    n
}

/// Finding 2: --force never empties a running cluster's data directory or
/// tablespace, and removes nothing before every check has passed.
#[test]
fn force_never_touches_a_running_cluster() {
    let base = scratch("force");
    let ts = base.join("ts1");
    std::fs::create_dir(&ts).unwrap();
    chown_postgres(&ts);
    let c = source(&base, "");
    c.sql("postgres", &format!("CREATE TABLESPACE ts1 LOCATION '{}'", ts.display()));
    c.sql("postgres", "CREATE TABLE in_ts TABLESPACE ts1 AS SELECT g FROM generate_series(1, 10000) g");
    let repo = base.join("repo");
    backup(&c, &repo, &["-j", "2"]);
    let before = file_count(&ts);
    let repo_s = path(&repo);

    let target = base.join("new");
    let map = format!("{}={}", ts.display(), ts.display());
    for extra in [vec![], vec!["--tablespace-map", &map]] {
        let mut args = vec!["restore", "--repo", repo_s, "-D", path(&target), "--force"];
        args.extend(extra);
        let (code, _, err) = bs(&args);
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("is in use: the server with pid") && err.contains("uses it as tablespace"), "{err}");
    }
    let (code, _, err) = bs(&["restore", "--repo", repo_s, "-D", path(&c.data), "--force", "--tablespace-map", &map]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is in use: the server with pid") && err.contains("runs on data directory"), "{err}");
    assert_eq!(file_count(&ts), before, "the live tablespace was touched");
    assert_eq!(c.sql("postgres", "SELECT count(*) FROM in_ts"), "10000");

    // Every chunk is checked before a byte of a --force target is removed.
    let busy = base.join("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("keep-me"), b"x").unwrap();
    chown_postgres(&busy);
    let id = bs_ok(&["info", "--repo", repo_s, "--output", "json"]);
    let id: serde_json::Value = serde_json::from_str(&id).unwrap();
    let id = id["backups"][0]["backup_id"].as_str().unwrap().to_string();
    let m = load_manifest(&repo, &id);
    let stream = repo.join("backups").join(&id).join("stream-00.bsz");
    let pristine = std::fs::read(&stream).unwrap();
    let mut bytes = pristine.clone();
    bytes[(m.streams[0].chunks[0].offset + 10) as usize] ^= 1;
    std::fs::write(&stream, &bytes).unwrap();
    let moved = format!("{}={}", ts.display(), base.join("ts-moved").display());
    let (code, _, err) = bs(&["restore", "--repo", repo_s, "-D", path(&busy), "--force", "--tablespace-map", &moved]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is damaged"), "{err}");
    assert!(busy.join("keep-me").exists(), "--force removed files before the chunks were checked");
    std::fs::write(&stream, &pristine).unwrap();

    // Stopped, a non-empty tablespace location is replaced only when named.
    let expected = c.dumpall();
    c.stop();
    let (code, _, err) = bs(&["restore", "--repo", repo_s, "-D", path(&target), "--force"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "\"{}\" is not empty: a tablespace is restored only into an absent or empty directory",
            ts.display()
        )),
        "{err}"
    );
    assert_eq!(file_count(&ts), before);
    // The same cluster re-seeded in place, its tablespace named.
    bs_ok(&["restore", "--repo", repo_s, "-D", path(&c.data), "--force", "--tablespace-map", &map]);
    let again = Cluster::restored("reseeded", &c.data, &base);
    again.start();
    again.wait_promoted();
    assert_same_dump(&expected, &again.dumpall(), "re-seeded in place");
}

/// Finding 3: a restore run as root writes as the data owner, never as
/// root, so a manifest cannot make it write where that owner cannot.
#[test]
fn restore_as_root_writes_only_as_the_owner() {
    let base = scratch("asroot");
    let ts = base.join("ts1");
    std::fs::create_dir(&ts).unwrap();
    chown_postgres(&ts);
    let c = source(&base, "");
    c.sql("postgres", &format!("CREATE TABLESPACE ts1 LOCATION '{}'", ts.display()));
    c.sql("postgres", "CREATE TABLE in_ts TABLESPACE ts1 AS SELECT g FROM generate_series(1, 1000) g");
    let repo = base.join("repo");
    let id = backup(&c, &repo, &[])["backup_id"].as_str().unwrap().to_string();

    // The manifest names a location inside a root-only directory.
    let rootonly = base.join("rootonly");
    std::fs::create_dir(&rootonly).unwrap();
    std::fs::set_permissions(&rootonly, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let evil = base.join("evil");
    let ssh = rootonly.join(".ssh");
    hostile_copy(&repo, &evil, &id, |m| m.tablespaces[0].location = ssh.display().to_string());
    let (code, _, err) = bs(&["restore", "--repo", path(&evil), "-D", path(&base.join("t1"))]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("\"{}\"", ssh.display())) && err.contains("Permission denied"), "{err}");
    assert!(!ssh.exists(), "root wrote into a root-only directory on behalf of a manifest");

    // A manifest that says the data directory belonged to root.
    let rooted = base.join("rooted");
    hostile_copy(&repo, &rooted, &id, |m| m.data_directory.uid = 0);
    let elsewhere = format!("{}={}", ts.display(), base.join("ts-t2").display());
    let (code, _, err) =
        bs(&["restore", "--repo", path(&rooted), "-D", path(&base.join("t2")), "--tablespace-map", &elsewhere]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("never writes as root") && err.contains("--owner"), "{err}");
    let (code, _, err) = bs(&[
        "restore",
        "--repo",
        path(&repo),
        "-D",
        path(&base.join("t3")),
        "--owner",
        "root",
        "--tablespace-map",
        &elsewhere,
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("never writes as root"), "{err}");
    let (code, _, err) = bs(&["drill", "--repo", path(&rooted)]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("never runs a server as root"), "{err}");

    // A good restore as root: every file belongs to the data owner.
    let target = base.join("t4");
    let moved = base.join("ts-moved");
    let map = format!("{}={}", ts.display(), moved.display());
    let out = bs_ok(&["restore", "--repo", path(&repo), "-D", path(&target), "--tablespace-map", &map]);
    assert!(out.contains("written as user postgres"), "{out}");
    let postgres_uid = std::fs::metadata(&c.data).unwrap().uid();
    for dir in [&target, &moved] {
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let md = std::fs::symlink_metadata(e.path()).unwrap();
                assert_eq!(md.uid(), postgres_uid, "{} is not the data owner's", e.path().display());
                if !md.file_type().is_symlink() {
                    assert_eq!(md.mode() & 0o027, 0, "{} has mode {:o}", e.path().display(), md.mode());
                }
                if md.is_dir() {
                    stack.push(e.path());
                }
            }
        }
    }
}

/// Finding 4: the drill's server is reachable by its own OS user only.
#[test]
fn drill_server_admits_only_its_own_user() {
    let base = scratch("drillpriv");
    let c = source(&base, "");
    let repo = base.join("my repo's");
    backup(&c, &repo, &[]);
    let dir = base.join("drill");
    let out = bs_ok(&["drill", "--repo", path(&repo), "--keep", "--dir", path(&dir), "--output", "json"]);
    let d: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(d["ok"], true, "{d}");
    let data = dir.join("data");
    let stop = || run(as_postgres("pg_ctl").arg("-D").arg(&data).args(["-m", "immediate", "-w", "stop"]));
    let md = std::fs::metadata(&dir).unwrap();
    assert_eq!((md.mode() & 0o777, md.uid()), (0o700, std::fs::metadata(&c.data).unwrap().uid()));
    assert_eq!(mode_of(&dir.join(".s.PGSQL.5432")) & 0o777, 0o700);
    let psql = |user: &str| {
        run(Command::new("runuser").args(["-u", user, "--"]).arg(pg_bin("psql")).args([
            "-h",
            path(&dir),
            "-p",
            "5432",
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-XAtc",
            "SELECT 1",
        ]))
    };
    let other = psql("nobody");
    assert!(!other.status.success(), "another local user reached the drill's server");
    let owner = psql("postgres");
    assert!(owner.status.success(), "{}", String::from_utf8_lossy(&owner.stderr));
    let conf = std::fs::read_to_string(data.join("postgresql.auto.conf")).unwrap();
    stop();
    // The quoted restore_command works through sh, quote and space included.
    let cmd = conf.lines().find_map(|l| l.strip_prefix("restore_command = ")).unwrap();
    let cmd = unquote_setting(cmd);
    let m: serde_json::Value =
        serde_json::from_str(&bs_ok(&["info", "--repo", path(&repo), "--output", "json"])).unwrap();
    let wal = load_manifest(&repo, m["backups"][0]["backup_id"].as_str().unwrap())
        .files
        .iter()
        .find(|f| f.path.starts_with("pg_wal/0"))
        .unwrap()
        .path
        .clone();
    let wal = wal.trim_start_matches("pg_wal/");
    let fetched = base.join("fetched-wal");
    let cmd = cmd.replace("%f", wal).replace("%p", path(&fetched));
    run_ok(Command::new("sh").args(["-c", &cmd]));
    assert_eq!(std::fs::metadata(&fetched).unwrap().len(), 16 << 20);
}

/// A quoted postgresql.conf value, unquoted as the server's parser does
/// (a backslash escapes the next character, '' is a quote).
fn unquote_setting(v: &str) -> String {
    let inner = v.trim().strip_prefix('\'').and_then(|v| v.strip_suffix('\'')).unwrap();
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.extend(chars.next()),
            '\'' => {
                chars.next();
                out.push('\'');
            }
            c => out.push(c),
        }
    }
    out
}

/// Finding 5: a repository is 0750/0640 whatever the umask; looser modes are named.
#[test]
fn repository_modes_hold_whatever_the_umask() {
    let base = scratch("modes");
    let c = source(&base, "");
    let repo = base.join("repo");
    let mut args = vec!["backup".to_string(), "-D".into(), c.data.display().to_string()];
    args.extend(c.conn());
    args.extend(["--repo".into(), repo.display().to_string()]);
    let bin = env!("CARGO_BIN_EXE_blockstream");
    let script = format!("umask 000; exec {bin} \"$@\"");
    run_ok(Command::new("sh").args(["-c", &script, "sh"]).args(&args));
    bs_ok(&["drill", "--repo", path(&repo)]);
    let mut stack = vec![repo.clone()];
    let mut seen = 0;
    while let Some(p) = stack.pop() {
        let md = std::fs::symlink_metadata(&p).unwrap();
        let want = if md.is_dir() { 0o750 } else { 0o640 };
        assert_eq!(md.mode() & 0o7777, want, "{}", p.display());
        seen += 1;
        if md.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().flatten().map(|e| e.path()));
        }
    }
    assert!(seen >= 8, "only {seen} paths");
    let other = run(Command::new("runuser").args(["-u", "nobody", "--", bin, "info", "--repo", path(&repo)]));
    assert!(!other.status.success(), "another local user read the repository");
    let stream = std::fs::read_dir(repo.join("backups")).unwrap().next().unwrap().unwrap().path().join("stream-00.bsz");
    std::fs::set_permissions(&stream, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    for cmd in ["info", "verify"] {
        let (code, _, err) = bs(&[cmd, "--repo", path(&repo)]);
        assert_eq!(code, 0, "{err}");
        assert!(err.contains(&format!("\"{}\" has mode 0644", stream.display())), "{cmd}: {err}");
    }
}

/// Finding 6: a symbolic link the data owner makes inside the data directory
/// is not followed by a backup run as root.
#[test]
fn backup_never_follows_a_link_in_the_data_directory() {
    let base = scratch("links");
    let c = source(&base, "");
    run_ok(
        Command::new("runuser").args(["-u", "postgres", "--", "ln", "-s", "/etc/shadow"]).arg(c.data.join("stolen")),
    );
    run_ok(
        Command::new("runuser").args(["-u", "postgres", "--", "ln", "-s", "/root"]).arg(c.data.join("base/stolen_dir")),
    );
    let repo = base.join("repo");
    let mut args = vec!["backup".to_string(), "-D".into(), c.data.display().to_string()];
    args.extend(c.conn());
    args.extend(["--repo".into(), repo.display().to_string(), "--output".into(), "json".into()]);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = bs(&a);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("skipped \"stolen\": a symbolic link (to \"/etc/shadow\") is not followed"), "{err}");
    assert!(err.contains("skipped \"base/stolen_dir\""), "{err}");
    let id = serde_json::from_str::<serde_json::Value>(&out).unwrap()["backup_id"].as_str().unwrap().to_string();
    let m = load_manifest(&repo, &id);
    assert!(!m.files.iter().any(|f| f.path.contains("stolen")), "a linked file was stored");
}

/// Finding 7: malformed manifests end with exit 1 and a message naming the
/// field and its value (no panic, no division by zero, no huge allocation,
/// no hang on a FIFO).
#[test]
fn malformed_manifests_are_refused_by_name() {
    let base = scratch("malformed");
    let c = source(&base, "");
    let repo = base.join("repo");
    let id = backup(&c, &repo, &[])["backup_id"].as_str().unwrap().to_string();
    type Edit = Box<dyn Fn(&mut blockstream::manifest::Manifest)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        ("segzero", Box::new(|m| m.wal_segment_size = 0), "has wal_segment_size 0,"),
        ("seg2to33", Box::new(|m| m.wal_segment_size = 1 << 33), "has wal_segment_size 8589934592,"),
        (
            "tinypieces",
            Box::new(|m| {
                m.piece_size = 1;
                m.block_size = 1;
                m.files[0].size = 1 << 40;
            }),
            "has block_size 1,",
        ),
        ("bigfile", Box::new(|m| m.files[0].size = 1 << 40), "bytes of file content, but its chunks hold only"),
        ("parent", Box::new(|m| m.parent = Some("/some/dir".into())), "has parent \"/some/dir\""),
    ];
    for (name, change, needle) in cases {
        let copy = base.join(name);
        hostile_copy(&repo, &copy, &id, change);
        for cmd in [
            vec!["verify", "--repo", path(&copy)],
            vec!["restore", "--repo", path(&copy), "-D", path(&base.join(format!("{name}-t")))],
        ] {
            let (code, out, err) = bs(&cmd);
            assert_eq!(code, 1, "{name} {cmd:?}: {out}{err}");
            assert!(format!("{out}{err}").contains(needle), "{name} {cmd:?}: {out}{err}");
            assert!(!err.contains("panicked"), "{err}");
        }
    }
    // A manifest that is a FIFO.
    let fifo = base.join("fifo");
    copy_tree(&repo, &fifo);
    let manifest = fifo.join("backups").join(&id).join("manifest.json");
    std::fs::remove_file(&manifest).unwrap();
    run_ok(Command::new("mkfifo").arg(&manifest));
    let t = Instant::now();
    let (code, out, err) = bs(&["verify", "--repo", path(&fifo), "--backup", &id]);
    assert!(t.elapsed() < Duration::from_secs(20));
    assert_eq!(code, 1, "{out}{err}");
    assert!(format!("{out}{err}").contains("it is a FIFO"), "{out}{err}");
}

/// Finding 8: an interrupted restore cannot start; a rerun with --force completes it.
#[test]
fn interrupted_restore_cannot_start() {
    let base = scratch("interrupted");
    let c = source(&base, "");
    let repo = base.join("repo");
    backup(&c, &repo, &["-j", "2"]);
    let expected = c.dumpall();
    let target = base.join("target");
    let out = run(blockstream()
        .args(["restore", "--repo", path(&repo), "-D", path(&target), "-j", "2"])
        .env(blockstream::failpoint::ENV, "restore-record@20"));
    assert_eq!(out.status.code(), None, "the restore was to be killed");
    assert!(!target.join("global/pg_control").exists(), "pg_control was written before the end");
    let half = Cluster::restored("half", &target, &base);
    let try_start = |log: &str| {
        run(as_postgres("pg_ctl").arg("-D").arg(&target).arg("-l").arg(base.join(log)).args([
            "-o",
            &format!("-p {}", half.port),
            "-w",
            "-t",
            "20",
            "start",
        ]))
    };
    assert!(!try_start("half1.log").status.success(), "a half-restored directory started");
    // Killed when everything but pg_control is in place: still not startable, for that reason.
    std::fs::remove_dir_all(&target).unwrap();
    let out = run(blockstream()
        .args(["restore", "--repo", path(&repo), "-D", path(&target), "-j", "2"])
        .env(blockstream::failpoint::ENV, "restore-written"));
    assert_eq!(out.status.code(), None, "the restore was to be killed");
    assert!(target.join("backup_label").exists() && !target.join("global/pg_control").exists());
    assert!(!try_start("half2.log").status.success(), "a restore killed before pg_control started");
    let log = std::fs::read_to_string(base.join("half2.log")).unwrap_or_default();
    assert!(log.contains("global/pg_control"), "{log}");
    bs_ok(&["restore", "--repo", path(&repo), "-D", path(&target), "-j", "2", "--force"]);
    half.start();
    half.wait_promoted();
    assert_same_dump(&expected, &half.dumpall(), "restore completed by a rerun with --force");
}

/// Finding 9 (the CLI part): a password given on the command line never
/// appears in a message.
#[test]
fn passwords_never_appear_in_messages() {
    for conn in ["host=/tmp port=1 user=postgres password=sekrit-pw dbname=postgres", "password=sekrit-pw bogus"] {
        let (code, out, err) = bs(&["backup", "--repo", "/tmp/never", "-D", "/tmp", "-d", conn]);
        assert_eq!(code, 1, "{out}{err}");
        assert!(!format!("{out}{err}").contains("sekrit"), "{err}");
        assert!(err.contains("could not connect to server"), "{err}");
    }
}

/// Writes a CA and a server certificate for localhost with the openssl CLI.
fn make_certs(dir: &Path, ca: &str) {
    let ssl = |args: &[&str]| run_ok(Command::new("openssl").current_dir(dir).args(args));
    ssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        &format!("/CN={ca}"),
        "-keyout",
        &format!("{ca}.key"),
        "-out",
        &format!("{ca}.crt"),
    ]);
    ssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        &format!("{ca}-server.key"),
        "-out",
        &format!("{ca}-server.csr"),
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
    ssl(&[
        "x509",
        "-req",
        "-in",
        &format!("{ca}-server.csr"),
        "-CA",
        &format!("{ca}.crt"),
        "-CAkey",
        &format!("{ca}.key"),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        &format!("{ca}-server.crt"),
    ]);
}

/// Connections as psql makes them: TLS with verify-full (pg_stat_ssl shows
/// it), a wrong CA refused, a password from .pgpass, a service name.
#[test]
fn tls_pgpass_and_service_files_work_as_in_psql() {
    let base = scratch("tls");
    let certs = base.join("certs");
    std::fs::create_dir(&certs).unwrap();
    make_certs(&certs, "ca");
    make_certs(&certs, "otherca");
    let c = Cluster::init("source", &base);
    for f in ["ca-server.crt", "ca-server.key"] {
        std::fs::copy(certs.join(f), c.data.join(f)).unwrap();
        chown_postgres(&c.data.join(f));
        std::fs::set_permissions(c.data.join(f), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    }
    c.append_conf(
        "ssl = on\nssl_cert_file = 'ca-server.crt'\nssl_key_file = 'ca-server.key'\nlisten_addresses = '127.0.0.1'\npassword_encryption = 'scram-sha-256'",
    );
    c.prepend_hba("hostssl all all 127.0.0.1/32 scram-sha-256\nhostnossl all all 127.0.0.1/32 reject");
    c.start();
    c.sql("postgres", "CREATE EXTENSION pg_blocktrack; ALTER ROLE postgres PASSWORD 'tls-secret-pw'");
    c.pgbench_init(2);
    let pgpass = base.join("pgpass");
    std::fs::write(&pgpass, format!("localhost:{}:*:postgres:tls-secret-pw\n", c.port)).unwrap();
    std::fs::set_permissions(&pgpass, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let services = base.join("pg_service.conf");
    std::fs::write(
        &services,
        format!(
            "[nightly]\nhost=localhost\nport={}\nuser=postgres\ndbname=postgres\nsslmode=verify-full\nsslrootcert={}\n",
            c.port,
            certs.join("ca.crt").display()
        ),
    )
    .unwrap();
    let repo = base.join("repo");
    let conninfo = |ca: &str, mode: &str| {
        format!(
            "host=localhost port={} user=postgres dbname=postgres sslmode={mode} sslrootcert={}",
            c.port,
            certs.join(format!("{ca}.crt")).display()
        )
    };
    let bin = env!("CARGO_BIN_EXE_blockstream");
    let bs_env = |conn: &str, extra: &[&str]| {
        let mut cmd = Command::new(bin);
        cmd.args(["backup", "-D", path(&c.data), "--repo", path(&repo), "-d", conn])
            .args(extra)
            .env("PGPASSFILE", &pgpass)
            .env("PGSERVICEFILE", &services)
            .env_remove("PGHOST")
            .env_remove("PGPORT");
        cmd
    };

    // verify-full with the right CA, slowed down so pg_stat_ssl can be read while it runs.
    let child = bs_env(&conninfo("ca", "verify-full"), &["--max-rate", "4M"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    let ssl = loop {
        let s = c.sql(
            "postgres",
            "SELECT CASE WHEN s.ssl THEN 'tls ' || s.version ELSE 'plain' END \
             FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'blockstream'",
        );
        if !s.is_empty() || Instant::now() > until {
            break s;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(ssl.starts_with("tls TLSv1."), "pg_stat_ssl: {ssl:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("over TLS"));

    // The wrong CA: refused, clearly.
    let out = run(&mut bs_env(&conninfo("otherca", "verify-full"), &[]));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("could not connect to server") && err.contains("certificate verify failed"), "{err}");
    // Without TLS the server refuses (hostnossl reject).
    let out =
        run(&mut bs_env(&format!("host=localhost port={} user=postgres dbname=postgres sslmode=disable", c.port), &[]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("rejects connection"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A service name, the password again from .pgpass.
    let out = run(&mut bs_env("service=nightly", &["--type", "incr"]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Without .pgpass there is no password to use.
    let out = run(bs_env("service=nightly", &[]).env("PGPASSFILE", "/nonexistent"));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("password"), "{}", String::from_utf8_lossy(&out.stderr));
}
