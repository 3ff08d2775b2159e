//! `blockstream drill`: prove a backup restores. Restore it into a scratch
//! directory, start a throwaway postmaster on it, wait until recovery ends,
//! run amcheck on every B-tree index (with heapallindexed), pg_visibility's
//! checks on every relation and the user's own SQL, record the figures in the
//! repository's drill log (`drills.jsonl`), and remove everything unless --keep.
//!
//! Who can reach the throwaway server: only the drill's own OS user. Run as
//! root, the drill becomes the data owner (`--owner`, else the backup's
//! data-directory owner; never root) before it writes anything; the scratch
//! directory is 0700 and owned by that user, the server listens on no TCP
//! address and on a socket of mode 0700 in that directory, and accepts only
//! `peer` authentication of that OS user (mapped to the role `--user`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use blockstream::manifest::Manifest;
use blockstream::privs::{self, User};
use blockstream::progress::Progress;
use blockstream::repo::Repo;
use blockstream::restore::{run_restore, RecoveryTarget, RestoreOptions};
use blockstream::{safe_fs, timefmt};
use serde_json::json;

use super::args::{DrillArgs, Output};
use super::commands::shell_quote;
use super::output::with_progress;
use super::pq::{Conn, DbError};

/// The drill's server listens here, inside its private directory.
const DRILL_PORT: u16 = 5432;

fn pg_bindir(a: &DrillArgs, pg_version_num: u32) -> PathBuf {
    if let Some(d) = &a.pg_bindir {
        return d.clone();
    }
    if let Some(d) = std::env::var_os("PG_BINDIR") {
        return PathBuf::from(d);
    }
    PathBuf::from(format!("/usr/lib/postgresql/{}/bin", pg_version_num / 10000))
}

/// A data directory of one major version starts only under that major's
/// server: refuse before restoring anything, naming both.
/// `pg_ctl --version` runs as the drill's user, as everything after it does.
fn check_major(bindir: &Path, id: &str, pg_version_num: u32, owner: &User) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let pg_ctl = bindir.join("pg_ctl");
    let mut cmd = Command::new(&pg_ctl);
    if privs::is_root() {
        cmd.uid(owner.uid).gid(owner.gid);
    }
    let out = cmd.arg("--version").output().with_context(|| format!("could not run \"{}\"", pg_ctl.display()))?;
    // "pg_ctl (PostgreSQL) 18.6" (or "... 18.6 (Debian ...)")
    let text = String::from_utf8_lossy(&out.stdout);
    let major = text
        .split_whitespace()
        .skip_while(|w| *w != "(PostgreSQL)")
        .nth(1)
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse::<u32>().ok())
        .with_context(|| format!("\"{} --version\" printed no version: {}", pg_ctl.display(), text.trim()))?;
    if major != pg_version_num / 10000 {
        return Err(blockstream::Error::Usage(format!(
            "--pg-bindir (or PG_BINDIR) \"{}\" holds PostgreSQL {major}, but backup {id} is of PostgreSQL {}: a data directory starts only under its own major version",
            bindir.display(),
            pg_version_num / 10000
        ))
        .into());
    }
    Ok(())
}

/// What one drill found.
#[derive(Default)]
struct Findings {
    problems: Vec<String>,
    restore_secs: f64,
    recovery_secs: f64,
    check_secs: f64,
    indexes: u64,
    relations: u64,
}

/// A drill's scratch space and the user it runs as.
struct Drill {
    id: String,
    manifest: Manifest,
    repo: PathBuf,
    owner: User,
    role: String,
    bindir: PathBuf,
    base: PathBuf,
}

impl Drill {
    fn data(&self) -> PathBuf {
        self.base.join("data")
    }

    fn connect(&self, db: &str) -> Result<Conn, String> {
        let port = DRILL_PORT.to_string();
        let base = self.base.display().to_string();
        Conn::connect(&[
            ("host", &base),
            ("port", &port),
            ("user", &self.role),
            ("dbname", db),
            ("application_name", "blockstream drill"),
            ("sslmode", "disable"),
        ])
    }

    fn pg_ctl(&self) -> Command {
        let mut c = Command::new(self.bindir.join("pg_ctl"));
        c.arg("-D").arg(self.data());
        c
    }
}

pub fn drill(a: DrillArgs) -> anyhow::Result<ExitCode> {
    let repo_path = super::repo_arg(&a.repo);
    let repo = super::open_repo(&repo_path, &a.keys)?;
    let id = repo.resolve(&a.backup)?;
    let manifest = repo.load_manifest(&id)?;
    let owner = drill_owner(&a, &manifest)?;
    let bindir = pg_bindir(&a, manifest.pg_version_num);
    if !bindir.join("pg_ctl").exists() {
        bail!("no pg_ctl in \"{}\": give the PostgreSQL binaries with --pg-bindir", bindir.display());
    }
    check_major(&bindir, &id, manifest.pg_version_num, &owner)?;
    let base = match &a.dir {
        Some(d) => std::path::absolute(d).unwrap_or(d.clone()),
        None => std::env::temp_dir().join(format!("blockstream-drill-{id}-{}", std::process::id())),
    };
    let role = a.user.clone().unwrap_or_else(|| owner.name.clone());
    let d = Drill { id, manifest, repo: repo_path, owner, role, bindir, base };
    make_private_dir(&d)?;
    if privs::is_root() {
        // Everything from here on, the restore included, runs as the drill's user.
        privs::become_user(&d.owner)?;
    }

    let started = SystemTime::now();
    let mut f = Findings::default();
    let mut server_started = false;
    match restore(&d, &a, &mut f) {
        Err(e) => f.problems.push(format!("restore failed: {e}")),
        Ok(()) => match start_server(&d, &mut f) {
            Err(e) => f.problems.push(e),
            Ok(()) => {
                server_started = true;
                if wait_for_recovery(&d, &mut f) {
                    run_checks(&d, &a, &mut f)?;
                }
            }
        },
    }
    if server_started && !a.keep {
        let _ = d.pg_ctl().args(["-m", "immediate", "-w", "stop"]).output();
    }
    if !a.keep {
        let _ = fs::remove_dir_all(&d.base);
    }

    let ok = f.problems.is_empty();
    let record = json!({
        "backup_id": d.id,
        "time": timefmt::iso8601(started),
        "ok": ok,
        "restore_secs": f.restore_secs,
        "recovery_secs": f.recovery_secs,
        "rto_secs": f.restore_secs + f.recovery_secs,
        "check_secs": f.check_secs,
        "indexes_checked": f.indexes,
        "relations_checked": f.relations,
        "problems": f.problems,
    });
    blockstream::catalog::append_log(&repo, blockstream::catalog::DRILL_LOG, &record)
        .context("could not append to the drill log")?;
    print_summary(&d, &a, &f, &record)?;
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// The user the drill runs as: ourselves, or (as root) `--owner` or the
/// backup's data-directory owner; never root.
fn drill_owner(a: &DrillArgs, m: &Manifest) -> anyhow::Result<User> {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let user = match (&a.owner, privs::is_root()) {
        (Some(name), true) => privs::user_by_name(name)?,
        (None, true) => privs::user_by_uid(m.data_directory.uid).map_err(|_| {
            anyhow::anyhow!(
                "the data directory of backup {} belonged to user id {}, which has no local user here: give the user to run the drill's server as with --owner",
                m.backup_id,
                m.data_directory.uid
            )
        })?,
        (Some(name), false) => {
            let u = privs::user_by_name(name)?;
            if u.uid != me {
                bail!("--owner {name}: only root can drill as another user");
            }
            u
        }
        (None, false) => privs::user_by_uid(me)?,
    };
    if user.uid == 0 {
        bail!("the drill never runs a server as root: give the user to run it as with --owner");
    }
    Ok(user)
}

/// The scratch directory: absent or empty, then mode 0700 and owned by the drill's user.
fn make_private_dir(d: &Drill) -> anyhow::Result<()> {
    if let Ok(mut rd) = fs::read_dir(&d.base) {
        if rd.next().is_some() {
            bail!("drill directory \"{}\" is not empty", d.base.display());
        }
    }
    if let Some(parent) = d.base.parent() {
        fs::create_dir_all(parent).with_context(|| format!("could not create \"{}\"", parent.display()))?;
    }
    safe_fs::create_dir(&d.base, 0o700)?;
    if privs::is_root() {
        std::os::unix::fs::lchown(&d.base, Some(d.owner.uid), Some(d.owner.gid))
            .with_context(|| format!("could not give \"{}\" to {}", d.base.display(), d.owner.name))?;
    }
    Ok(())
}

/// Restores into `base/data`, tablespaces inside the scratch directory.
fn restore(d: &Drill, a: &DrillArgs, f: &mut Findings) -> blockstream::Result<()> {
    let exe = std::env::current_exe().map_err(blockstream::Error::io("find", Path::new("/proc/self/exe")))?;
    let opts = RestoreOptions {
        repo: blockstream::storage::at(&d.repo)?,
        target: d.data(),
        backup: d.id.clone(),
        jobs: a.jobs,
        tablespace_map: d
            .manifest
            .tablespaces
            .iter()
            .map(|t| (t.oid.to_string(), d.base.join(format!("tablespace-{}", t.oid)).display().to_string()))
            .collect(),
        force: false,
        recovery_target: RecoveryTarget::Immediate,
        restore_command: Some(format!(
            "{} archive-get --repo {}{} %f \"%p\"",
            shell_quote(&exe.display().to_string()),
            shell_quote(&d.repo.display().to_string()),
            super::key_flags(&a.keys).iter().map(|f| format!(" {}", shell_quote(f))).collect::<String>()
        )),
        owner: None,
        target_action: None,
        target_timeline: None,
        encryption: super::encryption(&a.keys).map_err(|e| blockstream::Error::Usage(e.to_string()))?,
        delta: false,
        // A drill is the proof a backup restores: every file's digest too.
        check: blockstream::verify::PieceCheck::Digest,
        db_include: Vec::new(),
        compare_all: false,
    };
    let progress = Progress::default();
    let t = Instant::now();
    let r = with_progress(a.progress, &progress, || run_restore(&opts, &progress));
    f.restore_secs = t.elapsed().as_secs_f64();
    r.map(|_| ())
}

/// Starts the throwaway server: private socket, no TCP, peer authentication only.
fn start_server(d: &Drill, f: &mut Findings) -> Result<(), String> {
    let write = |name: &str, text: String| -> Result<PathBuf, String> {
        let p = d.base.join(name);
        fs::write(&p, text).map_err(|e| format!("could not write \"{}\": {e}", p.display()))?;
        Ok(p)
    };
    let hba = write("drill_hba.conf", "local all all peer map=drill\n".into())?;
    let ident = write("drill_ident.conf", format!("drill {} {}\n", d.owner.name, d.role))?;
    let quote = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', "''"));
    let options = format!(
        "-c port={DRILL_PORT} -c listen_addresses='' -c unix_socket_directories={} -c unix_socket_permissions=0700 \
         -c hba_file={} -c ident_file={} -c archive_mode=off -c blocktrack.enabled=off -c cluster_name=blockstream-drill",
        quote(&d.base),
        quote(&hba),
        quote(&ident)
    );
    let t = Instant::now();
    let out = d
        .pg_ctl()
        .arg("-l")
        .arg(d.base.join("server.log"))
        .args(["-o", &options, "-w", "-t", "3600", "start"])
        .output()
        .map_err(|e| format!("could not run pg_ctl: {e}"))?;
    f.recovery_secs = t.elapsed().as_secs_f64();
    if out.status.success() {
        return Ok(());
    }
    let log = fs::read_to_string(d.base.join("server.log")).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(5).collect();
    Err(format!("the restored cluster did not start: {}", tail.into_iter().rev().collect::<Vec<_>>().join(" | ")))
}

/// Waits (up to an hour) until recovery has ended; false and a problem otherwise.
fn wait_for_recovery(d: &Drill, f: &mut Findings) -> bool {
    let t = Instant::now();
    let mut last_error = String::new();
    while t.elapsed() < Duration::from_secs(3600) {
        match d.connect("postgres") {
            Ok(mut c) => match c.query("SELECT NOT pg_is_in_recovery()", &[]) {
                Ok(r) if r.get(0, 0) == Some("t") => {
                    f.recovery_secs += t.elapsed().as_secs_f64();
                    return true;
                }
                Ok(_) => {}
                Err(e) => last_error = e.to_string(),
            },
            Err(e) => last_error = e,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f.problems.push(format!("the restored cluster did not finish recovery within an hour (last error: {last_error})"));
    false
}

/// The first column of every row a query returns.
fn names(c: &mut Conn, sql: &str) -> Result<Vec<String>, DbError> {
    Ok(c.query(sql, &[])?.rows.into_iter().filter_map(|r| r.into_iter().next().flatten()).collect())
}

/// amcheck on every B-tree, pg_visibility on every relation, then the user's SQL.
fn run_checks(d: &Drill, a: &DrillArgs, f: &mut Findings) -> anyhow::Result<()> {
    let t = Instant::now();
    let mut admin = d.connect("postgres").map_err(anyhow::Error::msg)?;
    let dbs = names(&mut admin, "SELECT datname FROM pg_database WHERE datallowconn ORDER BY 1")
        .map_err(|e| anyhow::anyhow!("could not list databases: {e}"))?;
    for db in &dbs {
        let mut c = match d.connect(db) {
            Ok(c) => c,
            Err(e) => {
                f.problems.push(format!("database {db}: could not connect: {e}"));
                continue;
            }
        };
        if let Err(e) = c.batch("CREATE EXTENSION IF NOT EXISTS amcheck; CREATE EXTENSION IF NOT EXISTS pg_visibility;")
        {
            f.problems.push(format!("database {db}: amcheck or pg_visibility unavailable: {e}"));
            continue;
        }
        let indexes = names(
            &mut c,
            "SELECT c.oid::regclass::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
             JOIN pg_am am ON am.oid = c.relam \
             WHERE am.amname = 'btree' AND c.relpersistence <> 't' AND i.indisvalid AND i.indisready",
        )
        .map_err(|e| anyhow::anyhow!("database {db}: could not list indexes: {e}"))?;
        for i in indexes {
            f.indexes += 1;
            if let Err(e) = c.query("SELECT bt_index_check($1::text::regclass, true)", &[Some(&i)]) {
                f.problems.push(format!("database {db}: index {i}: {e}"));
            }
        }
        let relations = names(
            &mut c,
            "SELECT oid::regclass::text FROM pg_class WHERE relkind IN ('r', 'm', 't') AND relpersistence = 'p'",
        )
        .map_err(|e| anyhow::anyhow!("database {db}: could not list relations: {e}"))?;
        for r in relations {
            f.relations += 1;
            let q = "SELECT (SELECT count(*) FROM pg_check_visible($1::text::regclass)) \
                     + (SELECT count(*) FROM pg_check_frozen($1::text::regclass))";
            match c.query(q, &[Some(&r)]) {
                Ok(rows) if rows.get(0, 0) == Some("0") => {}
                Ok(rows) => f.problems.push(format!(
                    "database {db}: relation {r}: pg_visibility finds {} tuples its visibility map misstates",
                    rows.get(0, 0).unwrap_or("?")
                )),
                Err(e) => f.problems.push(format!("database {db}: relation {r}: {e}")),
            }
        }
    }
    if let Some(file) = &a.check_sql {
        let sql =
            fs::read_to_string(file).with_context(|| format!("could not read check file \"{}\"", file.display()))?;
        if let Err(e) = admin.batch(&sql) {
            f.problems.push(format!("check file \"{}\": {e}", file.display()));
        }
    }
    f.check_secs = t.elapsed().as_secs_f64();
    Ok(())
}

fn print_summary(d: &Drill, a: &DrillArgs, f: &Findings, record: &serde_json::Value) -> anyhow::Result<()> {
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(record)?),
        Output::Text => {
            println!(
                "drill of backup {}: {} (restore {:.1} s, recovery {:.1} s, checks {:.1} s)",
                d.id,
                if f.problems.is_empty() { "passed" } else { "FAILED" },
                f.restore_secs,
                f.recovery_secs,
                f.check_secs
            );
            println!(
                "  {} B-tree indexes checked with amcheck, {} relations with pg_visibility",
                f.indexes, f.relations
            );
            for p in &f.problems {
                println!("  problem: {p}");
            }
            if a.keep {
                println!("  kept in {}; stop it with: pg_ctl -D {} stop", d.base.display(), d.data().display());
            }
        }
    }
    Ok(())
}

/// The latest drill of each backup, from the repository's drill log.
pub fn last_drills(repo: &Repo) -> std::collections::HashMap<String, serde_json::Value> {
    blockstream::catalog::last_by_backup(&blockstream::catalog::read_log(repo, blockstream::catalog::DRILL_LOG))
}
