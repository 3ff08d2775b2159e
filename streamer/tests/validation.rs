//! Validation on real clusters: our page checksum against the server's,
//! damaged repositories caught by verify, validate_backup and drill, a page
//! corrupted on disk caught by the next backup, and drills that pass and are
//! remembered.
//!
//! Run as root with pg_blocktrack installed:
//! `cargo test --release -p blockstream --test validation -- --test-threads=1`.

mod common;

use std::path::Path;

use common::*;

fn source(name: &str) -> (std::path::PathBuf, Cluster) {
    let base = scratch(name);
    let c = Cluster::init("source", &base);
    let conf = c.data.join("postgresql.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str("autovacuum = off\n");
    std::fs::write(&conf, text).unwrap();
    c.start();
    c.sql("postgres", "CREATE EXTENSION pg_blocktrack");
    (base, c)
}

/// PostgreSQL's pg_checksum_page and ours agree on real heap, index,
/// visibility-map and free-space-map pages, and both equal what is on disk.
#[test]
fn rust_checksum_equals_the_servers_on_real_pages() {
    let (_base, c) = source("checksum");
    c.pgbench_init(2);
    c.sql("postgres", "CREATE INDEX ON pgbench_accounts (abalance)");
    c.sql("postgres", "VACUUM");
    c.sql("postgres", "CHECKPOINT");
    let files = c.sql(
        "postgres",
        "SELECT CASE WHEN f <> '' THEN f WHEN c.relkind = 'i' THEN 'index' ELSE 'heap' END || '|' || pg_relation_filepath(r) || f \
         FROM unnest(ARRAY['pgbench_accounts', 'pgbench_accounts_pkey', \
         'pgbench_accounts_abalance_idx', 'pgbench_branches', 'pgbench_tellers', 'pgbench_history']::regclass[]) r, \
         unnest(ARRAY['', '_vm', '_fsm']) f, pg_class c WHERE c.oid = r",
    );
    let mut kinds = std::collections::BTreeMap::new();
    let mut compared = 0;
    for line in files.lines() {
        let (kind, path) = line.split_once('|').unwrap();
        let full = c.data.join(path);
        let Ok(bytes) = std::fs::read(&full) else { continue };
        let pages: Vec<usize> = (0..bytes.len() / 8192).filter(|&b| b < 400 || b % 7 == 0).collect();
        let list: Vec<String> = pages.iter().map(|b| b.to_string()).collect();
        let server = c.sql(
            "postgres",
            &format!(
                "SELECT b, blocktrack.page_checksum(pg_read_binary_file('{path}', b * 8192, 8192), b) \
                 FROM unnest(ARRAY[{}]::int8[]) b \
                 WHERE get_byte(pg_read_binary_file('{path}', b * 8192 + 14, 2), 0) \
                     + get_byte(pg_read_binary_file('{path}', b * 8192 + 14, 2), 1) > 0",
                list.join(",")
            ),
        );
        for line in server.lines() {
            let (b, sc) = line.split_once('|').unwrap();
            let b: usize = b.parse().unwrap();
            let page: &[u8; 8192] = bytes[b * 8192..(b + 1) * 8192].try_into().unwrap();
            let ours = blockstream::checksum::page_checksum(page, b as u32);
            assert_eq!(ours as i32, sc.parse::<i32>().unwrap(), "{path} block {b}");
            assert_eq!(ours, blockstream::checksum::header(page).checksum, "{path} block {b} on disk");
            compared += 1;
            *kinds.entry(kind.trim_start_matches('_').to_string()).or_insert(0) += 1;
        }
    }
    assert!(compared >= 1000, "only {compared} pages compared");
    for kind in ["heap", "index", "vm", "fsm"] {
        assert!(kinds.get(kind).copied().unwrap_or(0) > 0, "no {kind} page compared: {kinds:?}");
        eprintln!("{kind}: {} pages", kinds[kind]);
    }
}

fn flip(path: &Path, at: usize) {
    let mut b = std::fs::read(path).unwrap();
    b[at] ^= 0x20;
    std::fs::write(path, b).unwrap();
}

fn validate_rows(c: &Cluster, repo: &Path) -> String {
    c.sql(
        "postgres",
        &format!(
            "SELECT check_name || ': ' || ok || ': ' || detail FROM blocktrack.validate_backup('{}')",
            repo.display()
        ),
    )
}

/// One flipped byte in a data chunk, the manifest, or the WAL of the backup:
/// verify exits 1 naming it, validate_backup fails a row naming it, drill fails.
#[test]
fn damage_is_caught_by_verify_validate_and_drill() {
    let (base, c) = source("damage5");
    c.pgbench_init(2);
    let repo = base.join("repo");
    let id = backup(&c, &repo, &["-j", "2"])["backup_id"].as_str().unwrap().to_string();
    let dir = repo.join("backups").join(&id);
    let repo_s = repo.to_str().unwrap();
    let rows = validate_rows(&c, &repo);
    assert_eq!(rows.lines().filter(|l| l.contains(": true: ")).count(), 8, "{rows}");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let wal =
        m["files"].as_array().unwrap().iter().find(|f| f["path"].as_str().unwrap().starts_with("pg_wal/0")).unwrap();
    let data =
        m["files"].as_array().unwrap().iter().find(|f| f["path"].as_str().unwrap().starts_with("base/")).unwrap();

    for (what, file, needle) in [
        ("data chunk", data, data["path"].as_str().unwrap().to_string()),
        ("WAL", wal, wal["path"].as_str().unwrap().to_string()),
    ] {
        let (s, ch) = (file["chunks"][0][0].as_u64().unwrap(), file["chunks"][0][1].as_u64().unwrap());
        let chunk = &m["streams"][s as usize]["chunks"][ch as usize];
        let stream = dir.join(format!("stream-{s:02}.bsz"));
        let pristine = std::fs::read(&stream).unwrap();
        flip(&stream, (chunk["offset"].as_u64().unwrap() + chunk["stored"].as_u64().unwrap() / 3) as usize);

        let (code, out, _) = bs(&["verify", "--repo", repo_s]);
        assert_eq!(code, 1, "{what}: {out}");
        assert!(out.contains(&format!("chunk {ch} of stream-{s:02}.bsz")) && out.contains(&needle), "{what}: {out}");
        let rows = validate_rows(&c, &repo);
        assert!(rows.contains("chunks: false") && rows.contains(&needle), "{what}: {rows}");
        let (code, out, _) = bs(&["drill", "--repo", repo_s, "--output", "json"]);
        assert_eq!(code, 1, "{what}: drill must fail: {out}");
        let d: serde_json::Value = serde_json::from_str(&out).unwrap();
        let problems = d["problems"].to_string();
        assert!(problems.contains("restore failed") && problems.contains("is damaged"), "{what}: {problems}");
        std::fs::write(&stream, pristine).unwrap();
    }

    let manifest = dir.join("manifest.json");
    let pristine = std::fs::read(&manifest).unwrap();
    flip(&manifest, pristine.len() / 2);
    let (code, out, _) = bs(&["verify", "--repo", repo_s]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("manifest.json") && out.contains("is damaged"), "{out}");
    let (code, _, err) = bs(&["drill", "--repo", repo_s, "--backup", &id]);
    assert_eq!(code, 1, "drill of a damaged manifest must fail: {err}");
    assert!(err.contains("manifest.json") && err.contains("is damaged"), "{err}");
    let rows = validate_rows(&c, &repo);
    assert!(rows.contains("manifest: false:") && rows.contains("is damaged"), "{rows}");
    std::fs::write(&manifest, pristine).unwrap();
    let rows = validate_rows(&c, &repo);
    assert_eq!(rows.lines().filter(|l| l.contains(": true: ")).count(), 8, "{rows}");
}

/// A page corrupted on disk (cluster stopped, byte flipped, restarted, page
/// not in shared buffers): the next backup names its file and block.
#[test]
fn corrupt_page_on_disk_is_reported_by_the_next_backup() {
    let (base, c) = source("corrupt");
    c.sql("postgres", "CREATE TABLE victim AS SELECT g, repeat('v', 200) AS filler FROM generate_series(1, 20000) g");
    c.sql("postgres", "CHECKPOINT");
    let path = c.sql("postgres", "SELECT pg_relation_filepath('victim')");
    c.stop();
    flip(&c.data.join(&path), 50 * 8192 + 4000);
    c.start();
    let repo = base.join("repo");
    let mut args: Vec<String> = vec!["backup".into(), "-D".into(), c.data.display().to_string()];
    args.extend(c.conn());
    args.extend(["--repo".into(), repo.display().to_string()]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _, err) = bs(&argv);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("\"{path}\" block 50 (stored 0x")), "{err}");
    let info: serde_json::Value =
        serde_json::from_str(&bs_ok(&["info", "--repo", repo.to_str().unwrap(), "--output", "json"])).unwrap();
    assert_eq!(info["backups"].as_array().unwrap().len(), 0, "the failed backup is not kept");

    let kept = backup(&c, &repo, &["--allow-checksum-failures"]);
    let id = kept["backup_id"].as_str().unwrap();
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo.join("backups").join(id).join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(m["checksum_failures"][0]["path"], path.as_str());
    assert_eq!(m["checksum_failures"][0]["block"], 50);
    let (code, out, _) = bs(&["verify", "--repo", repo.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(out.contains(&format!("\"{path}\" block 50 failed its checksum")), "{out}");
    // Without verification the page is simply copied, and verify's own
    // pass over every stored page finds it.
    let unchecked = backup(&c, &repo, &["--no-verify-checksums"])["backup_id"].as_str().unwrap().to_string();
    let (code, out, _) = bs(&["verify", "--repo", repo.to_str().unwrap(), "--backup", &unchecked]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("page checksums: \"{path}\" block 50 in backup {unchecked}: stored checksum 0x")),
        "{out}"
    );
}

/// Rewrites block `blkno` of a relation file with `change` applied and a
/// correct checksum, as a bug in PostgreSQL would (the page is not torn).
fn rewrite_page(file: &Path, blkno: u32, change: impl FnOnce(&mut [u8])) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(file).unwrap();
    let mut page = vec![0u8; 8192];
    f.read_exact_at(&mut page, blkno as u64 * 8192).unwrap();
    change(&mut page);
    let sum = blockstream::checksum::page_checksum(&page, blkno);
    page[8..10].copy_from_slice(&sum.to_ne_bytes());
    f.write_all_at(&page, blkno as u64 * 8192).unwrap();
}

/// Drills fail for what is wrong inside a backup that is intact as files:
/// an index whose keys were changed (amcheck), and a visibility map that
/// marks a page all-visible while it holds deleted tuples (pg_visibility).
#[test]
fn drills_fail_on_amcheck_and_pg_visibility_findings() {
    let (base, c) = source("drillfind");
    for sql in [
        "CREATE TABLE indexed AS SELECT g AS k FROM generate_series(1, 20000) g",
        "CREATE INDEX indexed_k ON indexed (k)",
        "CREATE TABLE visible AS SELECT g, repeat('v', 50) AS pad FROM generate_series(1, 5000) g",
        "VACUUM (FREEZE) visible",
        "DELETE FROM visible WHERE g <= 20",
        "CHECKPOINT",
    ] {
        c.sql("postgres", sql);
    }
    let index = c.data.join(c.sql("postgres", "SELECT pg_relation_filepath('indexed_k')"));
    let vm = c.data.join(format!("{}_vm", c.sql("postgres", "SELECT pg_relation_filepath('visible')")));
    c.stop();
    // The first leaf page: change the key of its first tuple.
    rewrite_page(&index, 1, |p| {
        let upper = u16::from_ne_bytes(p[14..16].try_into().unwrap()) as usize;
        p[upper + 8] ^= 0x55;
    });
    // Heap block 0 marked all-visible and all-frozen again, though it holds deleted tuples.
    rewrite_page(&vm, 0, |p| p[24] |= 0x03);
    c.start();
    let repo = base.join("repo");
    backup(&c, &repo, &[]);
    let (code, out, _) = bs(&["drill", "--repo", repo.to_str().unwrap(), "--output", "json"]);
    assert_eq!(code, 1, "{out}");
    let d: serde_json::Value = serde_json::from_str(&out).unwrap();
    let problems: Vec<String> =
        d["problems"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect();
    assert!(
        problems.iter().any(|p| p.contains("index indexed_k:")),
        "amcheck found nothing in the changed index: {problems:?}"
    );
    assert!(
        problems.iter().any(|p| p.contains("relation visible: pg_visibility finds") && p.contains("misstates")),
        "pg_visibility found nothing: {problems:?}"
    );
}

/// validate_backup is cancelled by statement_timeout (a query cancel) long
/// before it would have finished, and the server stays up. Four
/// validations in one statement make "finished" long enough to tell apart
/// from a cancel that waits for the end.
#[test]
fn validate_backup_is_cancellable() {
    let (base, c) = source("cancel");
    c.pgbench_init(30);
    let repo = base.join("repo");
    backup(&c, &repo, &["-j", "2"]);
    let started = c.sql("postgres", "SELECT pg_postmaster_start_time()");
    assert!(validate_rows(&c, &repo).lines().count() == 8);
    let four = format!(
        "SELECT count(*) FROM generate_series(1, 4) g, LATERAL blocktrack.validate_backup(CASE WHEN g > 0 THEN '{}' END) v",
        repo.display()
    );
    let t = std::time::Instant::now();
    assert_eq!(c.sql("postgres", &four), "32");
    let whole = t.elapsed();
    let t = std::time::Instant::now();
    let err = c.try_sql("postgres", &format!("SET statement_timeout = '100ms'; {four}")).unwrap_err();
    let cancelled = t.elapsed();
    assert!(err.contains("canceling statement due to statement timeout"), "{err}");
    assert!(cancelled < whole / 2, "cancel took {cancelled:?}, four whole validations {whole:?}");
    assert_eq!(c.sql("postgres", "SELECT pg_postmaster_start_time()"), started);
}

/// A drill of a good backup passes and records its figures; the drill log
/// survives the next backup and shows in info.
#[test]
fn drill_passes_and_is_remembered() {
    let (base, c) = source("drill");
    c.pgbench_init(2);
    let repo = base.join("repo");
    let id = backup(&c, &repo, &["-j", "2"])["backup_id"].as_str().unwrap().to_string();
    let check = base.join("check.sql");
    std::fs::write(
        &check,
        "DO $$ BEGIN IF (SELECT count(*) FROM pgbench_accounts) <> 200000 THEN RAISE 'rows lost'; END IF; END $$;",
    )
    .unwrap();
    let out =
        bs_ok(&["drill", "--repo", repo.to_str().unwrap(), "--check-sql", check.to_str().unwrap(), "--output", "json"]);
    let d: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(d["ok"], true, "{d}");
    assert!(d["indexes_checked"].as_u64().unwrap() > 10 && d["relations_checked"].as_u64().unwrap() > 10, "{d}");
    assert!(d["restore_secs"].as_f64().unwrap() > 0.0 && d["recovery_secs"].as_f64().unwrap() > 0.0);
    // A failing user check fails the drill.
    std::fs::write(&check, "SELECT 1/0").unwrap();
    let (code, out, _) = bs(&["drill", "--repo", repo.to_str().unwrap(), "--check-sql", check.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("division by zero"), "{out}");

    backup(&c, &repo, &["--type", "incr"]);
    let log = std::fs::read_to_string(repo.join("drills.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 2, "{log}");
    let info: serde_json::Value =
        serde_json::from_str(&bs_ok(&["info", "--repo", repo.to_str().unwrap(), "--output", "json"])).unwrap();
    let first = info["backups"].as_array().unwrap().iter().find(|b| b["backup_id"] == id.as_str()).unwrap();
    assert_eq!(first["last_drill"]["ok"], false, "the latest drill of that backup failed its user check");
    assert!(bs_ok(&["info", "--repo", repo.to_str().unwrap()]).contains("last drill"));
}

/// A backup of one major version is refused by a drill given another
/// major's binaries, before anything is restored, naming both versions; a
/// plain restore started by another major's pg_ctl is refused by the server.
#[test]
fn another_major_version_is_refused() {
    let this = server_major();
    let other = [
        "/usr/lib/postgresql/15/bin",
        "/opt/blockstream/pg/16/bin",
        "/opt/blockstream/pg/17/bin",
        "/opt/blockstream/pg/18/bin",
    ]
    .iter()
    .map(Path::new)
    .find(|d| major_of(d).is_some_and(|m| m != this))
    .expect("another PostgreSQL major version is installed (scripts/setup.sh unpacks 18 beside Debian's 15)");
    let other_major = major_of(other).unwrap();
    let (base, c) = source("othermajor");
    c.sql("postgres", "CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g");
    let repo = base.join("repo");
    let id = backup(&c, &repo, &[])["backup_id"].as_str().unwrap().to_string();

    let drill_dir = base.join("drill");
    let (code, _, err) = bs(&[
        "drill",
        "--repo",
        repo.to_str().unwrap(),
        "--pg-bindir",
        other.to_str().unwrap(),
        "--dir",
        drill_dir.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(&format!("holds PostgreSQL {other_major}, but backup {id} is of PostgreSQL {this}")), "{err}");
    assert!(!drill_dir.join("data").exists(), "nothing is restored before the refusal");

    let target = base.join("restored");
    bs_ok(&["restore", "--repo", repo.to_str().unwrap(), "-D", target.to_str().unwrap()]);
    // Settings of one major may not parse under another (18's initdb writes
    // autovacuum_worker_slots, which 15 rejects before it looks at the data
    // directory): empty configuration files, so what refuses is the version.
    for conf in ["postgresql.conf", "postgresql.auto.conf"] {
        std::fs::write(target.join(conf), "").unwrap();
    }
    let log = base.join("other.log");
    chown_postgres(&base);
    let out =
        run(std::process::Command::new("runuser").args(["-u", "postgres", "--"]).arg(other.join("pg_ctl")).args([
            "-D",
            target.to_str().unwrap(),
            "-l",
            log.to_str().unwrap(),
            "-o",
            "-p 5999",
            "-w",
            "-t",
            "30",
            "start",
        ]));
    assert!(!out.status.success(), "PostgreSQL {other_major} started a PostgreSQL {this} data directory");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("incompatible with server")
            && text.contains(&format!("initialized by PostgreSQL version {this}")),
        "{text}"
    );
}
