//! `blockstream drill`: prove a backup restores. Restore it into a scratch
//! directory, start a throwaway postmaster on it (as the data directory's
//! owner when run as root), wait until recovery ends, run amcheck on every
//! B-tree index (with heapallindexed), pg_visibility's checks on every
//! relation and the user's own SQL, record the figures in the repository's
//! drill log (`drills.jsonl`), and remove everything unless --keep.

use std::ffi::CStr;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use blockstream::progress::Progress;
use blockstream::repo::Repo;
use blockstream::restore::{run_restore, RecoveryTarget, RestoreOptions};
use blockstream::timefmt;
use postgres::{Client, NoTls};
use serde_json::json;

use super::args::{DrillArgs, Output};
use super::output::with_progress;

pub const DRILL_LOG: &str = "drills.jsonl";

/// The name of the user with id `uid`.
fn user_name(uid: u32) -> Option<String> {
    // SAFETY: getpwuid returns a pointer into static storage or NULL; the name is copied at once.
    unsafe {
        let pw = libc::getpwuid(uid);
        (!pw.is_null()).then(|| CStr::from_ptr((*pw).pw_name).to_string_lossy().into_owned())
    }
}

fn pg_bindir(a: &DrillArgs, pg_version_num: u32) -> PathBuf {
    if let Some(d) = &a.pg_bindir {
        return d.clone();
    }
    if let Some(d) = std::env::var_os("PG_BINDIR") {
        return PathBuf::from(d);
    }
    PathBuf::from(format!("/usr/lib/postgresql/{}/bin", pg_version_num / 10000))
}

/// A command run as `user` (through runuser when we are root and they are not us).
fn as_user(user: &str, as_root: bool, program: &Path) -> Command {
    if as_root && user != "root" {
        let mut c = Command::new("runuser");
        c.args(["-u", user, "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

pub fn drill(a: DrillArgs) -> anyhow::Result<ExitCode> {
    let repo_path = std::path::absolute(&a.repo).unwrap_or(a.repo.clone());
    let repo = Repo::open(&repo_path)?;
    let id = repo.resolve(&a.backup)?;
    let m = repo.load_manifest(&id)?;
    let as_root = unsafe { libc::geteuid() } == 0;
    let owner = user_name(m.data_directory.uid).unwrap_or_else(|| "postgres".into());
    let bindir = pg_bindir(&a, m.pg_version_num);
    if !bindir.join("pg_ctl").exists() {
        bail!("no pg_ctl in \"{}\": give the PostgreSQL binaries with --pg-bindir", bindir.display());
    }
    let base = match &a.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("blockstream-drill-{id}-{}", std::process::id())),
    };
    if base.exists() && fs::read_dir(&base)?.next().is_some() {
        bail!("drill directory \"{}\" is not empty", base.display());
    }
    fs::create_dir_all(&base).with_context(|| format!("could not create \"{}\"", base.display()))?;
    if as_root {
        std::os::unix::fs::chown(&base, Some(m.data_directory.uid), Some(m.data_directory.gid))?;
    }
    let data = base.join("data");
    let started = SystemTime::now();
    let mut problems: Vec<String> = Vec::new();

    // 1. Restore, tablespaces inside the scratch directory.
    let exe = std::env::current_exe()?;
    let opts = RestoreOptions {
        repo: repo_path.clone(),
        target: data.clone(),
        backup: id.clone(),
        jobs: a.jobs,
        tablespace_map: m
            .tablespaces
            .iter()
            .map(|t| (t.oid.to_string(), base.join(format!("tablespace-{}", t.oid)).display().to_string()))
            .collect(),
        force: false,
        recovery_target: RecoveryTarget::Immediate,
        restore_command: Some(format!("'{}' archive-get --repo '{}' %f \"%p\"", exe.display(), repo_path.display())),
    };
    let progress = Progress::default();
    let t = Instant::now();
    let restored = with_progress(a.progress, &progress, || run_restore(&opts, &progress));
    let restore_secs = t.elapsed().as_secs_f64();
    let mut recovery_secs = 0.0;
    let mut check_secs = 0.0;
    let (mut indexes, mut relations) = (0u64, 0u64);
    let mut server_started = false;

    match restored {
        Err(e) => problems.push(format!("restore failed: {e}")),
        Ok(_) => {
            // 2. A throwaway postmaster: private socket directory, trust only there.
            let hba = base.join("drill_hba.conf");
            fs::write(&hba, "local all all trust\n")?;
            if as_root {
                std::os::unix::fs::chown(&hba, Some(m.data_directory.uid), Some(m.data_directory.gid))?;
            }
            let options = format!(
                "-c port=5432 -c listen_addresses='' -c unix_socket_directories='{}' -c hba_file='{}' \
                 -c archive_mode=off -c blocktrack.enabled=off -c cluster_name=blockstream-drill",
                base.display(),
                hba.display()
            );
            let t = Instant::now();
            let out = as_user(&owner, as_root, &bindir.join("pg_ctl"))
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(base.join("server.log"))
                .args(["-o", &options, "-w", "-t", "3600", "start"])
                .output()?;
            server_started = out.status.success();
            if !server_started {
                let log = fs::read_to_string(base.join("server.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                problems.push(format!(
                    "the restored cluster did not start: {}",
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                ));
            } else {
                let conn = |db: &str| -> anyhow::Result<Client> {
                    Ok(postgres::Config::new()
                        .host(base.to_str().unwrap())
                        .port(5432)
                        .user(&owner)
                        .dbname(db)
                        .application_name("blockstream drill")
                        .connect(NoTls)?)
                };
                let mut promoted = false;
                for _ in 0..36_000 {
                    if let Ok(mut c) = conn("postgres") {
                        if c.query_one("SELECT NOT pg_is_in_recovery()", &[])
                            .map(|r| r.get::<_, bool>(0))
                            .unwrap_or(false)
                        {
                            promoted = true;
                            break;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                recovery_secs = t.elapsed().as_secs_f64();
                if !promoted {
                    problems.push("the restored cluster did not finish recovery within an hour".into());
                } else {
                    // 3. Checks, database by database.
                    let t = Instant::now();
                    let dbs =
                        names(&mut conn("postgres")?, "SELECT datname FROM pg_database WHERE datallowconn ORDER BY 1")?;
                    for db in &dbs {
                        let mut c = match conn(db) {
                            Ok(c) => c,
                            Err(e) => {
                                problems.push(format!("database {db}: could not connect: {e}"));
                                continue;
                            }
                        };
                        if let Err(e) = c.batch_execute(
                            "CREATE EXTENSION IF NOT EXISTS amcheck; CREATE EXTENSION IF NOT EXISTS pg_visibility;",
                        ) {
                            problems.push(format!("database {db}: amcheck or pg_visibility unavailable: {e}"));
                            continue;
                        }
                        let idx = names(
                            &mut c,
                            "SELECT c.oid::regclass::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
                             JOIN pg_am am ON am.oid = c.relam \
                             WHERE am.amname = 'btree' AND c.relpersistence <> 't' AND i.indisvalid AND i.indisready",
                        )?;
                        for i in idx {
                            indexes += 1;
                            if let Err(e) = c.execute("SELECT bt_index_check($1::text::regclass, true)", &[&i]) {
                                problems.push(format!("database {db}: index {i}: {}", db_error(&e)));
                            }
                        }
                        let rels = names(
                            &mut c,
                            "SELECT oid::regclass::text FROM pg_class \
                             WHERE relkind IN ('r', 'm', 't') AND relpersistence = 'p'",
                        )?;
                        for r in rels {
                            relations += 1;
                            let q = "SELECT (SELECT count(*) FROM pg_check_visible($1::text::regclass)) \
                                     + (SELECT count(*) FROM pg_check_frozen($1::text::regclass))";
                            match c.query_one(q, &[&r]) {
                                Ok(row) if row.get::<_, i64>(0) == 0 => {}
                                Ok(row) => problems.push(format!(
                                    "database {db}: relation {r}: pg_visibility finds {} tuples its visibility map misstates",
                                    row.get::<_, i64>(0)
                                )),
                                Err(e) => problems.push(format!("database {db}: relation {r}: {}", db_error(&e))),
                            }
                        }
                    }
                    if let Some(file) = &a.check_sql {
                        let sql = fs::read_to_string(file)
                            .with_context(|| format!("could not read check file \"{}\"", file.display()))?;
                        if let Err(e) = conn("postgres")?.batch_execute(&sql) {
                            problems.push(format!("check file \"{}\": {}", file.display(), db_error(&e)));
                        }
                    }
                    check_secs = t.elapsed().as_secs_f64();
                }
            }
        }
    }

    // 4. Stop and clean up, then record.
    if server_started && !a.keep {
        let _ = as_user(&owner, as_root, &bindir.join("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
    if !a.keep {
        let _ = fs::remove_dir_all(&base);
    }
    let ok = problems.is_empty();
    let record = json!({
        "backup_id": id,
        "time": timefmt::iso8601(started),
        "ok": ok,
        "restore_secs": restore_secs,
        "recovery_secs": recovery_secs,
        "rto_secs": restore_secs + recovery_secs,
        "check_secs": check_secs,
        "indexes_checked": indexes,
        "relations_checked": relations,
        "problems": problems,
    });
    let log = repo.root().join(DRILL_LOG);
    let mut f = OpenOptions::new().create(true).append(true).open(&log)?;
    f.write_all(format!("{record}\n").as_bytes())?;
    f.sync_all()?;

    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&record)?),
        Output::Text => {
            println!(
                "drill of backup {id}: {} (restore {restore_secs:.1} s, recovery {recovery_secs:.1} s, checks {check_secs:.1} s)",
                if ok { "passed" } else { "FAILED" }
            );
            println!("  {indexes} B-tree indexes checked with amcheck, {relations} relations with pg_visibility");
            for p in &problems {
                println!("  problem: {p}");
            }
            if a.keep {
                println!("  kept in {}; stop it with: pg_ctl -D {} stop", base.display(), data.display());
            }
        }
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// The first column of every row a query returns, as text.
fn names(c: &mut Client, sql: &str) -> Result<Vec<String>, postgres::Error> {
    Ok(c.query(sql, &[])?.iter().map(|r| r.get(0)).collect())
}

fn db_error(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{} (SQLSTATE {})", d.message(), d.code().code()),
        None => e.to_string(),
    }
}

/// The latest drill of each backup, from the repository's drill log.
pub fn last_drills(repo: &Path) -> std::collections::HashMap<String, serde_json::Value> {
    let mut out = std::collections::HashMap::new();
    if let Ok(text) = fs::read_to_string(repo.join(DRILL_LOG)) {
        for line in text.lines() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                if let Some(id) = v["backup_id"].as_str() {
                    out.insert(id.to_string(), v);
                }
            }
        }
    }
    out
}
