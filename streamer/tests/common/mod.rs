//! Test harness: real PostgreSQL 15 clusters (initdb -k, run as `postgres`),
//! clients run as root over the socket in /tmp, and the `blockstream` binary.
//! Every cluster gets its own port and directory and is stopped (by data
//! directory, never by process name) when dropped.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

pub fn pg_bin(name: &str) -> PathBuf {
    let dir = std::env::var("PG_BINDIR").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into());
    Path::new(&dir).join(name)
}

/// The major version of the PostgreSQL binaries in `bindir`, from `pg_ctl --version`
/// ("pg_ctl (PostgreSQL) 18.6", or "... 15.20 (Debian ...)").
pub fn major_of(bindir: &Path) -> Option<u32> {
    let out = Command::new(bindir.join("pg_ctl")).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split_whitespace().skip_while(|w| *w != "(PostgreSQL)").nth(1)?.split('.').next()?.parse().ok()
}

/// The major version of the binaries under test (PG_BINDIR).
pub fn server_major() -> u32 {
    major_of(pg_bin("pg_ctl").parent().unwrap()).expect("the binaries under test print their version")
}

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// A fresh directory for a test, owned by postgres so clusters and tablespaces can live in it.
/// Directories of earlier runs of the same test are removed.
pub fn scratch(name: &str) -> PathBuf {
    let root = Path::new("/tmp/blockstream-e2e");
    for old in std::fs::read_dir(root).into_iter().flatten().flatten() {
        if old.file_name().to_string_lossy().rsplit_once('-').is_some_and(|(n, _)| n == name) {
            let _ = std::fs::remove_dir_all(old.path());
        }
    }
    let d = root.join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    chown_postgres(&d);
    chown_postgres(d.parent().unwrap());
    d
}

pub fn chown_postgres(p: &Path) {
    run_ok(Command::new("chown").arg("postgres:postgres").arg(p));
}

fn next_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(0, 5600 + (std::process::id() % 40) as u16 * 10, Ordering::SeqCst, Ordering::SeqCst);
    loop {
        let p = NEXT.fetch_add(1, Ordering::SeqCst);
        if !Path::new(&format!("/tmp/.s.PGSQL.{p}")).exists() {
            return p;
        }
    }
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"))
}

pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn as_postgres(bin: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).arg(pg_bin(bin));
    c
}

pub struct Cluster {
    pub name: String,
    pub data: PathBuf,
    pub port: u16,
    pub log: PathBuf,
    /// Extra server options for `pg_ctl -o` (restored clusters get their own port this way).
    options: String,
}

impl Cluster {
    /// initdb -k and the project's test settings; not started.
    pub fn init(name: &str, base: &Path) -> Cluster {
        let data = base.join(format!("{name}-data"));
        run_ok(as_postgres("initdb").args(["-k", "-A", "trust", "-U", "postgres", "-D"]).arg(&data));
        let mut conf = std::fs::read_to_string(workspace().join("pg_test_configs/blocktrack.conf")).unwrap();
        let port = next_port();
        conf.push_str(&format!("\nport = {port}\n"));
        let path = data.join("postgresql.conf");
        let mut all = std::fs::read_to_string(&path).unwrap();
        all.push_str(&conf);
        std::fs::write(&path, all).unwrap();
        Cluster { name: name.into(), log: base.join(format!("{name}.log")), data, port, options: String::new() }
    }

    /// A data directory made by a restore, started on its own port without archiving.
    pub fn restored(name: &str, data: &Path, base: &Path) -> Cluster {
        let port = next_port();
        Cluster {
            name: name.into(),
            data: data.to_path_buf(),
            port,
            log: base.join(format!("{name}.log")),
            options: format!("-p {port} -c archive_mode=off"),
        }
    }

    pub fn start(&self) {
        self.start_with("")
    }

    /// Appends settings to postgresql.conf (takes effect at the next start or reload).
    pub fn append_conf(&self, text: &str) {
        let path = self.data.join("postgresql.conf");
        let mut all = std::fs::read_to_string(&path).unwrap();
        all.push('\n');
        all.push_str(text);
        all.push('\n');
        std::fs::write(&path, all).unwrap();
    }

    /// Puts rules at the top of pg_hba.conf (first match wins).
    pub fn prepend_hba(&self, lines: &str) {
        let path = self.data.join("pg_hba.conf");
        let old = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("{lines}\n{old}")).unwrap();
    }

    /// The server's start time, to prove it did not restart.
    pub fn postmaster_start_time(&self) -> String {
        self.sql("postgres", "SELECT pg_postmaster_start_time()")
    }

    /// Starts with extra server options (`-b` for binary-upgrade mode, say).
    pub fn start_with(&self, extra: &str) {
        let mut c = as_postgres("pg_ctl");
        c.args(["-D"]).arg(&self.data).args(["-l"]).arg(&self.log).args(["-w", "-t", "120"]);
        let options = format!("{} {extra}", self.options);
        if !options.trim().is_empty() {
            c.args(["-o", options.trim()]);
        }
        let out = run(c.arg("start"));
        if !out.status.success() {
            panic!(
                "cluster {} did not start: {}\n{}",
                self.name,
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }

    pub fn stop(&self) {
        if self.data.join("postmaster.pid").exists() {
            let _ = run(as_postgres("pg_ctl").arg("-D").arg(&self.data).args(["-m", "fast", "-w", "stop"]));
        }
    }

    pub fn conn(&self) -> Vec<String> {
        vec!["-h".into(), "/tmp".into(), "-p".into(), self.port.to_string(), "-U".into(), "postgres".into()]
    }

    pub fn try_sql(&self, db: &str, sql: &str) -> Result<String, String> {
        let out = run(Command::new(pg_bin("psql")).args(self.conn()).args([
            "-d",
            db,
            "-XAtq",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ]));
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    pub fn sql(&self, db: &str, sql: &str) -> String {
        self.try_sql(db, sql).unwrap_or_else(|e| panic!("on {}: {sql}\n{e}", self.name))
    }

    /// Waits until recovery has ended and the server accepts writes.
    pub fn wait_promoted(&self) {
        let until = Instant::now() + Duration::from_secs(120);
        loop {
            if self.try_sql("postgres", "SELECT pg_is_in_recovery()").as_deref() == Ok("f") {
                return;
            }
            assert!(Instant::now() < until, "{} still in recovery after 120 s", self.name);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn pgbench(&self, args: &[&str]) -> Child {
        Command::new(pg_bin("pgbench"))
            .args(self.conn())
            .args(args)
            .arg("postgres")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    pub fn pgbench_init(&self, scale: u32) {
        run_ok(Command::new(pg_bin("pgbench")).args(self.conn()).args([
            "-i",
            "-q",
            "-s",
            &scale.to_string(),
            "postgres",
        ]));
    }

    /// `pg_dumpall` without comments and blank lines: equal output, equal data.
    pub fn dumpall(&self) -> String {
        let out = run_ok(Command::new(pg_bin("pg_dumpall")).args(self.conn()));
        // 15.14+ brackets the dump with \\restrict KEY ... \\unrestrict KEY, a random key per run.
        out.lines()
            .filter(|l| {
                !l.starts_with("--") && !l.is_empty() && !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.data.join("postmaster.pid").exists() {
            let _ = run(as_postgres("pg_ctl").arg("-D").arg(&self.data).args(["-m", "immediate", "-w", "stop"]));
        }
    }
}

pub fn blockstream() -> Command {
    Command::new(env!("CARGO_BIN_EXE_blockstream"))
}

/// Runs blockstream; returns (exit code, stdout, stderr).
pub fn bs(args: &[&str]) -> (i32, String, String) {
    let out = run(blockstream().args(args));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn bs_ok(args: &[&str]) -> String {
    let (code, out, err) = bs(args);
    assert_eq!(code, 0, "blockstream {args:?} failed:\n{out}\n{err}");
    out
}

/// Backs up `c` into `repo`; returns the JSON summary.
pub fn backup(c: &Cluster, repo: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args: Vec<String> = vec!["backup".into(), "-D".into(), c.data.display().to_string()];
    args.extend(c.conn());
    args.extend(["--repo".into(), repo.display().to_string(), "--output".into(), "json".into()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    serde_json::from_str(&bs_ok(&a)).unwrap()
}

/// Restores `repo` into `target` with `-j jobs`, starts it and waits for the end of recovery.
pub fn restore_and_start(name: &str, repo: &Path, base: &Path, jobs: u32, extra: &[&str]) -> Cluster {
    let target = base.join(format!("{name}-data"));
    let mut args = vec![
        "restore".to_string(),
        "--repo".into(),
        repo.display().to_string(),
        "-D".into(),
        target.display().to_string(),
        "-j".into(),
        jobs.to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    bs_ok(&a);
    let c = Cluster::restored(name, &target, base);
    c.start();
    c.wait_promoted();
    c
}

/// pgbench's invariant: the balances of accounts, tellers and branches sum
/// to the same number. (The history holds only the last run's deltas:
/// pgbench empties it when it starts.)
pub fn assert_pgbench_balances(c: &Cluster, what: &str) {
    let sums = c.sql(
        "postgres",
        "SELECT (SELECT sum(abalance) FROM pgbench_accounts) || ' ' || (SELECT sum(tbalance) FROM pgbench_tellers) \
         || ' ' || (SELECT sum(bbalance) FROM pgbench_branches)",
    );
    let v: Vec<&str> = sums.split(' ').collect();
    assert!(v.len() == 3 && v.iter().all(|x| *x == v[0]), "{what}: pgbench balances disagree: {sums}");
}

/// pg_amcheck finds no corrupt index or heap in any database (heapallindexed).
pub fn assert_amcheck_clean(c: &Cluster, what: &str) {
    let amcheck =
        run(Command::new(pg_bin("pg_amcheck")).args(c.conn()).args(["--all", "--install-missing", "--heapallindexed"]));
    assert!(
        amcheck.status.success() && amcheck.stdout.is_empty(),
        "{what}: pg_amcheck reported problems:\n{}{}",
        String::from_utf8_lossy(&amcheck.stdout),
        String::from_utf8_lossy(&amcheck.stderr)
    );
}

/// Asserts two dumps are equal, showing the first difference.
pub fn assert_same_dump(expected: &str, found: &str, what: &str) {
    if expected != found {
        let (e, f): (Vec<_>, Vec<_>) = (expected.lines().collect(), found.lines().collect());
        let i = e.iter().zip(&f).position(|(a, b)| a != b).unwrap_or(e.len().min(f.len()));
        panic!(
            "{what}: pg_dumpall differs at line {i} ({} vs {} lines)\nexpected: {:?}\nfound:    {:?}",
            e.len(),
            f.len(),
            e.get(i),
            f.get(i)
        );
    }
}

/// The manifest of backup `id`, parsed by the engine.
pub fn load_manifest(repo: &Path, id: &str) -> blockstream::manifest::Manifest {
    blockstream::manifest::Manifest::load(&repo.join("backups").join(id)).unwrap()
}

/// Writes a (possibly hostile) manifest back with a valid checksum, as an
/// attacker with write access to the repository could.
pub fn store_manifest(repo: &Path, m: &blockstream::manifest::Manifest) {
    m.store(&repo.join("backups").join(&m.backup_id)).unwrap();
}

/// Copies a directory tree (cp -a).
pub fn copy_tree(from: &Path, to: &Path) {
    run_ok(Command::new("cp").arg("-a").arg(from).arg(to));
}

/// Mode bits of a path (not following a link).
pub fn mode_of(p: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

/// Switches to a new WAL segment and waits until the archiver has archived
/// the one it closed.
pub fn switch_and_wait(c: &Cluster) {
    let name = c.sql("postgres", "SELECT pg_walfile_name(pg_switch_wal())");
    let until = Instant::now() + Duration::from_secs(90);
    loop {
        let last = c.sql("postgres", "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver");
        if last.as_str() >= name.as_str() && !last.is_empty() {
            return;
        }
        assert!(Instant::now() < until, "{name} was not archived (last archived: {last:?})");
        std::thread::sleep(Duration::from_millis(100));
    }
}
