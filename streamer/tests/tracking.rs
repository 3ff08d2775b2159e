//! Changed-block tracking on real clusters: the summarizer's answers checked
//! against WAL itself (pg_walinspect), each special record kind on its own,
//! a crash, and a tracking gap.
//!
//! Run as root with pg_blocktrack installed:
//! `cargo test --release -p blockstream --test tracking -- --test-threads=1`.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;

const RELSEG: u64 = 131_072;

/// (tablespace, database, relfilenode, fork, block)
type BlockRef = (u32, u32, u32, u8, u64);

#[derive(Debug, Clone)]
struct Row {
    path: String,
    rel: u32,
    fork: u8,
    limit: Option<u64>,
    full_copy: bool,
    blocks: Vec<u64>,
}

fn tracked_cluster(name: &str, extra_conf: &str) -> Cluster {
    let base = scratch(name);
    let c = Cluster::init("source", &base);
    let conf = c.data.join("postgresql.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap();
    // No background changes in the middle of a measured range.
    text.push_str("autovacuum = off\n");
    text.push_str(extra_conf);
    std::fs::write(&conf, text).unwrap();
    c.start();
    c.sql("postgres", "CREATE EXTENSION pg_blocktrack; CREATE EXTENSION pg_walinspect;");
    c
}

/// Asks for a summary ending at the current end of WAL; returns where it ends.
fn flush(c: &Cluster) -> String {
    c.sql("postgres", "SELECT blocktrack.flush_summary()::text")
}

fn changed(c: &Cluster, since: &str, until: &str) -> Vec<Row> {
    let out = c.sql(
        "postgres",
        &format!(
            "SELECT path, coalesce(relfilenode, 0), forknum, segno, coalesce(limit_block, -1), full_copy, encode(blocks, 'hex') \
             FROM blocktrack.changed_blocks('{since}', '{until}') ORDER BY path"
        ),
    );
    out.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            let segno: u64 = f[3].parse().unwrap();
            let hex = f[6];
            let blocks = (0..hex.len() / 8)
                .map(|i| {
                    let b = u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16).unwrap().swap_bytes();
                    segno * RELSEG + b as u64
                })
                .collect();
            Row {
                path: f[0].to_string(),
                rel: f[1].parse().unwrap(),
                fork: f[2].parse().unwrap(),
                limit: f[4].parse::<i64>().ok().filter(|&l| l >= 0).map(|l| l as u64),
                full_copy: f[5] == "t",
                blocks,
            }
        })
        .collect()
}

/// The tablespace and database of a relation file's path.
fn spc_db(path: &str) -> (u32, u32) {
    if path.starts_with("global/") {
        (1664, 0)
    } else if path.starts_with("base/") {
        (1663, path.split('/').nth(1).unwrap().parse().unwrap())
    } else {
        let parts: Vec<&str> = path.split('/').collect();
        (parts[1].parse().unwrap(), parts[3].parse().unwrap())
    }
}

fn reported_blocks(rows: &[Row]) -> BTreeSet<BlockRef> {
    let mut s = BTreeSet::new();
    for r in rows {
        let (spc, dbid) = spc_db(&r.path);
        for &b in &r.blocks {
            s.insert((spc, dbid, r.rel, r.fork, b));
        }
    }
    s
}

/// Every block reference in WAL between two LSNs, from pg_walinspect (FSM forks left out:
/// they are copied whole and not tracked).
fn wal_blocks(c: &Cluster, since: &str, until: &str) -> BTreeSet<BlockRef> {
    let out = c.sql(
        "postgres",
        &format!("SELECT block_ref FROM pg_get_wal_records_info('{since}', '{until}') WHERE block_ref IS NOT NULL"),
    );
    let mut s = BTreeSet::new();
    for line in out.lines() {
        for part in line.split("blkref #").skip(1) {
            let words: Vec<&str> = part.split_whitespace().collect();
            let rel = words.iter().position(|w| *w == "rel").unwrap();
            let ids: Vec<u32> = words[rel + 1].split('/').map(|x| x.parse().unwrap()).collect();
            let fork = match words[words.iter().position(|w| *w == "fork").unwrap() + 1] {
                "main" => 0,
                "fsm" => 1,
                "vm" => 2,
                "init" => 3,
                f => panic!("unknown fork {f}"),
            };
            let blk: u64 = words[words.iter().position(|w| *w == "blk").unwrap() + 1]
                .trim_end_matches(|ch: char| !ch.is_ascii_digit())
                .parse()
                .unwrap();
            if fork != 1 {
                s.insert((ids[0], ids[1], ids[2], fork, blk));
            }
        }
    }
    s
}

fn filenode(c: &Cluster, rel: &str) -> u32 {
    c.sql("postgres", &format!("SELECT pg_relation_filenode('{rel}')")).parse().unwrap()
}

fn rows_of(rows: &[Row], rel: u32, fork: u8) -> Vec<&Row> {
    rows.iter().filter(|r| r.rel == rel && r.fork == fork).collect()
}

/// After a mixed workload, every block WAL references between two summary
/// boundaries is reported, and nothing else: the same set, block for block.
#[test]
fn oracle_changed_blocks_equal_wal_block_references() {
    let c = tracked_cluster("oracle", "");
    c.sql(
        "postgres",
        "CREATE TABLE will_change (id int PRIMARY KEY, v text);
         CREATE TABLE will_grow (id int, v text);
         CREATE TABLE will_shrink (id int, v text);
         CREATE TABLE will_get_vacuumed (id int, v text);
         INSERT INTO will_change SELECT g, repeat('c', 100) FROM generate_series(1, 50000) g;
         INSERT INTO will_shrink SELECT g, repeat('s', 100) FROM generate_series(1, 50000) g;
         INSERT INTO will_get_vacuumed SELECT g, repeat('v', 100) FROM generate_series(1, 50000) g;",
    );
    c.sql("postgres", "VACUUM");
    c.sql("postgres", "CHECKPOINT");
    let a = flush(&c);
    for sql in [
        "UPDATE will_change SET v = 'changed' WHERE id % 37 = 0",
        "INSERT INTO will_grow SELECT g, repeat('g', 300) FROM generate_series(1, 30000) g",
        "DELETE FROM will_shrink WHERE id > 10000",
        "VACUUM will_shrink",
        "DELETE FROM will_get_vacuumed WHERE id % 3 = 0",
        "VACUUM will_get_vacuumed",
        "UPDATE will_grow SET v = 'x' WHERE id < 100",
    ] {
        c.sql("postgres", sql);
    }
    let b = flush(&c);
    let rows = changed(&c, &a, &b);
    let reported = reported_blocks(&rows);
    let wal = wal_blocks(&c, &a, &b);
    assert!(wal.len() > 1000, "the workload touched only {} blocks", wal.len());
    let missing: Vec<_> = wal.difference(&reported).take(5).collect();
    let extra: Vec<_> = reported.difference(&wal).take(5).collect();
    assert!(missing.is_empty(), "blocks in WAL but not reported, e.g. {missing:?}");
    assert!(extra.is_empty(), "blocks reported but not in WAL, e.g. {extra:?}");

    // Nothing outside the workload: every user relation reported is one of its tables or indexes.
    let workload: BTreeSet<u32> = c
        .sql(
            "postgres",
            "SELECT pg_relation_filenode(c.oid) FROM pg_class c \
             WHERE c.relname IN ('will_change', 'will_change_pkey', 'will_grow', 'will_shrink', 'will_get_vacuumed') \
                OR c.oid IN (SELECT reltoastrelid FROM pg_class WHERE relname LIKE 'will_%')",
        )
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    let user: BTreeSet<u32> = rows.iter().map(|r| r.rel).filter(|&r| r >= 16384).collect();
    assert!(user.is_subset(&workload), "relations outside the workload reported: {:?}", user.difference(&workload));
    // VACUUM truncated will_shrink: its limit is its new length.
    let shrink = filenode(&c, "will_shrink");
    let blocks: u64 = c.sql("postgres", "SELECT pg_relation_size('will_shrink') / 8192").parse().unwrap();
    assert_eq!(rows_of(&rows, shrink, 0)[0].limit, Some(blocks));
}

/// Where the server's own WAL summarizer (PostgreSQL 17+) has summarized up to.
fn server_summarized(c: &Cluster) -> String {
    c.sql("postgres", "SELECT summarized_lsn FROM pg_get_wal_summarizer_state()")
}

/// On PostgreSQL 17 and later the server summarizes WAL too (`summarize_wal`,
/// the summaries its own incremental backups use). Over the same workload,
/// between two checkpoints, our changed blocks and limit blocks equal what
/// the server's summaries hold (`pg_wal_summary_contents`, what pg_walsummary
/// prints), block for block.
#[test]
fn changed_blocks_equal_the_servers_own_summaries() {
    let major = server_major();
    if major < 17 {
        eprintln!("PostgreSQL {major} has no WAL summarizer of its own: nothing to compare with");
        return;
    }
    let c = tracked_cluster("walsummary", "summarize_wal = on\n");
    c.sql(
        "postgres",
        "CREATE TABLE will_change (id int PRIMARY KEY, v text);
         CREATE TABLE will_shrink (id int, v text);
         INSERT INTO will_change SELECT g, repeat('c', 100) FROM generate_series(1, 50000) g;
         INSERT INTO will_shrink SELECT g, repeat('s', 100) FROM generate_series(1, 50000) g;",
    );
    c.sql("postgres", "VACUUM");
    // Each range starts and ends at a checkpoint's redo pointer, where the
    // server ends a summary; ours end where flush_summary is asked, just
    // after. Between the two lie only the checkpoint's own records, which
    // reference no block (autovacuum is off, nothing else runs).
    c.sql("postgres", "CHECKPOINT");
    let start = c.sql("postgres", "SELECT redo_lsn FROM pg_control_checkpoint()");
    let a = flush(&c);
    for sql in [
        "UPDATE will_change SET v = 'changed' WHERE id % 37 = 0",
        "CREATE TABLE will_grow AS SELECT g AS id, repeat('g', 300) AS v FROM generate_series(1, 30000) g",
        "DELETE FROM will_shrink WHERE id > 10000",
        "VACUUM will_shrink",
        "TRUNCATE will_change",
        "INSERT INTO will_change SELECT g, 'new' FROM generate_series(1, 1000) g",
        "DROP TABLE will_grow",
    ] {
        c.sql("postgres", sql);
    }
    c.sql("postgres", "CHECKPOINT");
    let end = c.sql("postgres", "SELECT redo_lsn FROM pg_control_checkpoint()");
    let b = flush(&c);
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while c.sql("postgres", &format!("SELECT '{}'::pg_lsn >= '{end}'::pg_lsn", server_summarized(&c))) != "t" {
        assert!(std::time::Instant::now() < until, "the server's summarizer did not reach {end} in 60 s");
        std::thread::sleep(Duration::from_millis(200));
    }

    // The server's summaries inside [start, end] must cover it without a hole.
    let summaries = c.sql(
        "postgres",
        &format!(
            "SELECT tli, start_lsn, end_lsn FROM pg_available_wal_summaries() \
             WHERE start_lsn >= '{start}' AND end_lsn <= '{end}' ORDER BY start_lsn"
        ),
    );
    let ranges: Vec<Vec<String>> = summaries.lines().map(|l| l.split('|').map(String::from).collect()).collect();
    assert!(!ranges.is_empty(), "no server summary between {start} and {end}");
    assert_eq!(ranges[0][1], start, "the server's summaries: {summaries}");
    assert_eq!(ranges.last().unwrap()[2], end, "the server's summaries: {summaries}");
    for w in ranges.windows(2) {
        assert_eq!(w[0][2], w[1][1], "a hole between the server's summaries: {summaries}");
    }

    let mut theirs = BTreeSet::new();
    let mut their_limits = std::collections::BTreeMap::new();
    for r in &ranges {
        let rows = c.sql(
            "postgres",
            &format!(
                "SELECT reltablespace, reldatabase, relfilenode, relforknumber, relblocknumber, is_limit_block \
                 FROM pg_wal_summary_contents({}, '{}', '{}')",
                r[0], r[1], r[2]
            ),
        );
        for l in rows.lines() {
            let f: Vec<&str> = l.split('|').collect();
            let key = (
                f[0].parse::<u32>().unwrap(),
                f[1].parse::<u32>().unwrap(),
                f[2].parse::<u32>().unwrap(),
                f[3].parse::<u8>().unwrap(),
            );
            let blk: u64 = f[4].parse().unwrap();
            if f[5] == "t" {
                // Over several summaries the lowest limit holds (blocks past
                // it in later summaries are listed on their own).
                let e = their_limits.entry(key).or_insert(blk);
                *e = (*e).min(blk);
            } else if key.3 != 1 {
                theirs.insert((key.0, key.1, key.2, key.3, blk));
            }
        }
    }
    let rows = changed(&c, &a, &b);
    let ours = reported_blocks(&rows);
    assert!(theirs.len() > 500, "the workload touched only {} blocks", theirs.len());
    let missing: Vec<_> = theirs.difference(&ours).take(5).collect();
    assert!(missing.is_empty(), "blocks in the server's summaries but not ours, e.g. {missing:?}");
    // The one difference: when a fork is truncated or dropped, the server
    // forgets the blocks at or past the new end that changed before (the
    // fork ends there); ours keeps them (the limit already says older
    // copies end there, so both rebuild the same file). Every other block
    // must be in both.
    let superseded = |k: &BlockRef| their_limits.get(&(k.0, k.1, k.2, k.3)).is_some_and(|&l| k.4 >= l);
    let extra: Vec<_> = ours.difference(&theirs).filter(|k| !superseded(k)).take(5).collect();
    assert!(extra.is_empty(), "blocks in ours but not the server's summaries, e.g. {extra:?}");
    assert!(ours.difference(&theirs).any(superseded), "the workload truncates and drops: some blocks are superseded");

    // Limits: every main fork the server saw created, truncated or dropped
    // has the same limit in ours. (A visibility map's limit is 0 in ours
    // whenever its relation is truncated: backups copy it whole.)
    let key_of = |r: &Row| {
        let (spc, db) = spc_db(&r.path);
        (spc, db, r.rel, r.fork)
    };
    let our_limits: std::collections::BTreeMap<_, _> =
        rows.iter().filter_map(|r| r.limit.map(|l| (key_of(r), l))).collect();
    assert!(their_limits.keys().any(|k| k.3 == 0), "the workload truncates: the server records limits");
    for (k, l) in &their_limits {
        if k.3 != 0 {
            continue;
        }
        assert_eq!(our_limits.get(k), Some(l), "limit block of {k:?}: the server's {l}, ours {:?}", our_limits.get(k));
    }
}

#[test]
fn truncate_gives_new_and_old_relfilenodes_a_limit_of_zero() {
    let c = tracked_cluster("truncate", "");
    c.sql("postgres", "CREATE TABLE t AS SELECT g FROM generate_series(1, 100000) g");
    let old = filenode(&c, "t");
    let a = flush(&c);
    c.sql("postgres", "TRUNCATE t; INSERT INTO t SELECT generate_series(1, 10)");
    let new = filenode(&c, "t");
    let b = flush(&c);
    assert_ne!(old, new);
    let rows = changed(&c, &a, &b);
    for rel in [old, new] {
        let r = rows_of(&rows, rel, 0);
        assert!(!r.is_empty() && r[0].limit == Some(0) && r[0].full_copy, "relfilenode {rel}: {r:?}");
    }
}

#[test]
fn vacuum_truncation_sets_the_new_length_as_limit() {
    let c = tracked_cluster("vacuum", "");
    c.sql("postgres", "CREATE TABLE t AS SELECT g, repeat('x', 200) AS v FROM generate_series(1, 100000) g");
    c.sql("postgres", "VACUUM t");
    c.sql("postgres", "DELETE FROM t WHERE g > 5000");
    let a = flush(&c);
    c.sql("postgres", "VACUUM t");
    let b = flush(&c);
    let blocks: u64 = c.sql("postgres", "SELECT pg_relation_size('t') / 8192").parse().unwrap();
    assert!(blocks < 500, "VACUUM did not truncate (still {blocks} blocks)");
    let rows = changed(&c, &a, &b);
    let r = rows_of(&rows, filenode(&c, "t"), 0);
    assert_eq!(r[0].limit, Some(blocks), "{r:?}");
    assert!(!r[0].full_copy, "segment 0 starts before the limit");
}

/// DROP TABLE, then a new table that gets the same relfilenode (forced with
/// binary-upgrade mode, the only way to reuse one on demand): the file
/// cannot come from the older backup, so its limit is 0.
#[test]
fn drop_then_reuse_of_a_relfilenode() {
    let c = tracked_cluster("reuse", "");
    c.sql("postgres", "CREATE TABLE old AS SELECT g FROM generate_series(1, 50000) g");
    let node = filenode(&c, "old");
    let a = flush(&c);
    c.sql("postgres", "DROP TABLE old");
    c.sql("postgres", "CHECKPOINT");
    c.stop();
    c.start_with("-b");
    // This server build also wants one LSN per attribute in binary-upgrade mode.
    let versions = if c
        .sql("postgres", "SELECT count(*) FROM pg_proc WHERE proname = 'binary_upgrade_set_next_attribute_versions'")
        == "1"
    {
        "SELECT binary_upgrade_set_next_attribute_versions(ARRAY['0/0']::pg_lsn[]);"
    } else {
        ""
    };
    c.sql(
        "postgres",
        &format!(
            "SELECT binary_upgrade_set_next_pg_type_oid(900001); \
             SELECT binary_upgrade_set_next_array_pg_type_oid(900002); \
             SELECT binary_upgrade_set_next_heap_pg_class_oid({node}); \
             SELECT binary_upgrade_set_next_heap_relfilenode({node}); \
             {versions}
             CREATE TABLE reused (g int); INSERT INTO reused SELECT generate_series(1, 1000);"
        ),
    );
    assert_eq!(filenode(&c, "reused"), node, "the relfilenode was not reused");
    let b = flush(&c);
    let rows = changed(&c, &a, &b);
    let r = rows_of(&rows, node, 0);
    assert!(!r.is_empty() && r[0].limit == Some(0) && r[0].full_copy, "{r:?}");
    assert!(!r[0].blocks.is_empty(), "the new table's blocks are tracked too");
}

#[test]
fn create_database_marks_the_whole_database() {
    let c = tracked_cluster("createdb", "");
    let a = flush(&c);
    c.sql("postgres", "CREATE DATABASE by_copy STRATEGY FILE_COPY");
    c.sql("postgres", "CREATE DATABASE by_wal STRATEGY WAL_LOG");
    let b = flush(&c);
    let rows = changed(&c, &a, &b);
    for db in ["by_copy", "by_wal"] {
        let oid = c.sql("postgres", &format!("SELECT oid FROM pg_database WHERE datname = '{db}'"));
        let path = format!("base/{oid}");
        let r: Vec<_> = rows.iter().filter(|r| r.path == path).collect();
        assert!(r.len() == 1 && r[0].rel == 0 && r[0].full_copy, "{db}: {r:?}");
    }
}

#[test]
fn set_tablespace_moves_to_a_new_file_with_limit_zero() {
    let c = tracked_cluster("settablespace", "");
    let loc = c.data.parent().unwrap().join("ts");
    std::fs::create_dir(&loc).unwrap();
    chown_postgres(&loc);
    c.sql("postgres", &format!("CREATE TABLESPACE ts LOCATION '{}'", loc.display()));
    c.sql("postgres", "CREATE TABLE t AS SELECT g FROM generate_series(1, 50000) g");
    let old = filenode(&c, "t");
    let a = flush(&c);
    c.sql("postgres", "ALTER TABLE t SET TABLESPACE ts");
    let b = flush(&c);
    let new = filenode(&c, "t");
    let spc = c.sql("postgres", "SELECT oid FROM pg_tablespace WHERE spcname = 'ts'");
    let rows = changed(&c, &a, &b);
    let n = rows_of(&rows, new, 0);
    let major = c.sql("postgres", "SELECT current_setting('server_version_num')::int / 10000");
    assert!(n[0].path.starts_with(&format!("pg_tblspc/{spc}/PG_{major}_")), "{n:?}");
    assert!(n[0].limit == Some(0) && n[0].full_copy);
    let o = rows_of(&rows, old, 0);
    assert!(o[0].limit == Some(0), "{o:?}");
}

#[test]
fn unlogged_table_main_fork_is_not_tracked() {
    let c = tracked_cluster("unlogged", "");
    c.sql("postgres", "CREATE UNLOGGED TABLE u (g int)");
    let node = filenode(&c, "u");
    let a = flush(&c);
    c.sql("postgres", "INSERT INTO u SELECT generate_series(1, 100000)");
    let b = flush(&c);
    let rows = changed(&c, &a, &b);
    assert!(rows_of(&rows, node, 0).is_empty(), "an unlogged main fork has no WAL: {:?}", rows_of(&rows, node, 0));
    // Its init fork was created before `a`; creating another records a limit.
    let a = flush(&c);
    c.sql("postgres", "CREATE UNLOGGED TABLE u2 (g int)");
    let b = flush(&c);
    let rows = changed(&c, &a, &b);
    let init = rows_of(&rows, filenode(&c, "u2"), 3);
    assert!(!init.is_empty() && init[0].limit == Some(0), "{init:?}");
}

#[test]
fn prepared_transaction_that_drops_a_table() {
    let c = tracked_cluster("prepared", "");
    c.sql("postgres", "CREATE TABLE p AS SELECT g FROM generate_series(1, 10000) g");
    let node = filenode(&c, "p");
    c.sql("postgres", "BEGIN; DROP TABLE p; PREPARE TRANSACTION 'drop_p';");
    let a = flush(&c);
    c.sql("postgres", "COMMIT PREPARED 'drop_p'");
    let b = flush(&c);
    let rows = changed(&c, &a, &b);
    let r = rows_of(&rows, node, 0);
    assert!(!r.is_empty() && r[0].limit == Some(0), "{r:?}");
}

/// An immediate shutdown under pgbench: after restart no block changed before
/// the crash is missing, and the summaries have no gap.
#[test]
fn crash_loses_no_change() {
    let c = tracked_cluster("crash", "");
    c.pgbench_init(5);
    let a = flush(&c);
    let mut pgbench = c.pgbench(&["-n", "-c", "2", "-T", "60"]);
    std::thread::sleep(Duration::from_secs(4));
    run_ok(as_postgres("pg_ctl").arg("-D").arg(&c.data).args(["-m", "immediate", "-w", "stop"]));
    let _ = pgbench.kill();
    let _ = pgbench.wait();
    c.start();
    let b = flush(&c);
    let valid: String = c.sql("postgres", &format!("SELECT valid_since_lsn <= '{a}' FROM blocktrack.status()"));
    assert_eq!(valid, "t", "the restart made a gap");
    let rows = changed(&c, &a, &b);
    let reported = reported_blocks(&rows);
    let wal = wal_blocks(&c, &a, &b);
    assert!(wal.len() > 100);
    let missing: Vec<_> = wal.difference(&reported).take(5).collect();
    assert!(missing.is_empty(), "blocks changed before the crash are missing, e.g. {missing:?}");
}

/// With the summarizer held back, a small max_slot_wal_keep_size invalidates
/// its slot: backup_start says no incremental is possible, and why.
#[test]
fn invalidated_slot_is_a_gap() {
    let c = tracked_cluster("gap", "max_slot_wal_keep_size = 32MB\nmax_wal_size = 64MB\nmin_wal_size = 32MB\n");
    c.sql("postgres", "CREATE TABLE filler (v text)");
    let a = flush(&c);
    let pid: i32 = c.sql("postgres", "SELECT worker_pid FROM blocktrack.status()").parse().unwrap();
    // SAFETY: signalling the summarizer process of this test's own cluster.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    for _ in 0..6 {
        c.sql("postgres", "INSERT INTO filler SELECT repeat(md5(g::text), 100) FROM generate_series(1, 5000) g; SELECT pg_switch_wal();");
    }
    c.sql("postgres", "CHECKPOINT");
    let status = c.sql("postgres", "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'pg_blocktrack'");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    assert_eq!(status, "lost", "the slot was not invalidated");
    // The summarizer notices (now or after its restart) and tracks afresh.
    let mut ok = String::new();
    for _ in 0..100 {
        ok = c.sql("postgres", &format!("SELECT valid_since_lsn > '{a}' FROM blocktrack.status()"));
        if ok == "t" {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(ok, "t", "tracking did not restart after the slot was lost");
    let row = c.sql(
        "postgres",
        &format!("SELECT incremental_ok, reason FROM blocktrack.backup_start('gap', true, '{a}', 1, 60000)"),
    );
    assert!(row.starts_with("f|"), "{row}");
    assert!(row.contains("without a gap only since") || row.contains("a tracking gap"), "{row}");
    let gaps = c.sql("postgres", "SELECT count(*) FROM blocktrack.summaries() WHERE is_gap");
    assert_eq!(gaps, "1", "the lost range shows as a gap summary");
}

/// Waits until the server answers again (after a crash restart) and the
/// summarizer runs.
fn wait_for_summarizer(c: &Cluster) {
    let until = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(pid) = c.try_sql("postgres", "SELECT worker_pid FROM blocktrack.status()") {
            if !pid.is_empty() {
                return;
            }
        }
        assert!(std::time::Instant::now() < until, "the summarizer did not come back");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// kill -9 of the summarizer, again and again under pgbench (the postmaster
/// restarts everything each time): no block WAL references is lost, and no
/// gap appears.
#[test]
fn summarizer_killed_in_a_loop_loses_no_block() {
    let c = tracked_cluster("killworker", "");
    c.pgbench_init(3);
    let a = flush(&c);
    for round in 0..4 {
        let mut pgbench = c.pgbench(&["-n", "-c", "2", "-T", "30"]);
        std::thread::sleep(Duration::from_millis(1500 + 400 * round));
        let pid: i32 = c.sql("postgres", "SELECT worker_pid FROM blocktrack.status()").parse().unwrap();
        // SAFETY: killing the summarizer process of this test's own cluster.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        let _ = pgbench.wait();
        wait_for_summarizer(&c);
        let new_pid: i32 = c.sql("postgres", "SELECT worker_pid FROM blocktrack.status()").parse().unwrap();
        assert_ne!(new_pid, pid, "round {round}: the summarizer was not restarted");
    }
    run_ok(
        std::process::Command::new(pg_bin("pgbench")).args(c.conn()).args(["-n", "-c", "2", "-t", "200", "postgres"]),
    );
    let b = flush(&c);
    let valid = c.sql("postgres", &format!("SELECT valid_since_lsn <= '{a}' FROM blocktrack.status()"));
    assert_eq!(valid, "t", "a killed summarizer made a gap");
    let reported = reported_blocks(&changed(&c, &a, &b));
    let wal = wal_blocks(&c, &a, &b);
    assert!(wal.len() > 500, "only {} blocks changed", wal.len());
    let missing: Vec<_> = wal.difference(&reported).take(5).collect();
    assert!(missing.is_empty(), "blocks lost across the kills, e.g. {missing:?}");
}

/// A summary file damaged on disk (a flipped bit, a cut, removal) is never
/// read as "no changes": changed_blocks refuses the range with the reason
/// and an incremental backup on a parent before it is not possible.
#[test]
fn damaged_summaries_are_gaps_never_no_changes() {
    let c = tracked_cluster("damagedsummary", "");
    c.sql("postgres", "CREATE TABLE t AS SELECT g, repeat('x', 100) AS v FROM generate_series(1, 20000) g");
    let a = flush(&c);
    c.sql("postgres", "UPDATE t SET v = 'y' WHERE g % 10 = 0");
    let b = flush(&c);
    assert!(!changed(&c, &a, &b).is_empty());
    let dir = c.data.join("pg_blocktrack/summaries");
    let file = c.sql(
        "postgres",
        &format!("SELECT start_lsn::text || ' ' || end_lsn::text FROM blocktrack.summaries() WHERE end_lsn > '{a}' AND start_lsn < '{b}' ORDER BY bytes DESC LIMIT 1"),
    );
    let (s, e) = file.split_once(' ').unwrap();
    let lsn = |t: &str| {
        let (hi, lo) = t.split_once('/').unwrap();
        u64::from_str_radix(hi, 16).unwrap() << 32 | u64::from_str_radix(lo, 16).unwrap()
    };
    let path = dir.join(format!("{:08X}{:016X}{:016X}.bts", 1, lsn(s), lsn(e)));
    let pristine = std::fs::read(&path).unwrap();
    let query = format!("SELECT count(*) FROM blocktrack.changed_blocks('{a}', '{b}')");
    let mut flipped = pristine.clone();
    flipped[pristine.len() / 2] ^= 0x04;
    for (what, bytes, needle) in [
        ("a flipped bit", Some(flipped), "has checksum"),
        ("a cut", Some(pristine[..pristine.len() - 9].to_vec()), "checksum"),
        ("removal", None, "summar"),
    ] {
        match &bytes {
            Some(b) => std::fs::write(&path, b).unwrap(),
            None => std::fs::remove_file(&path).unwrap(),
        }
        let err = c.try_sql("postgres", &query).unwrap_err();
        assert!(err.contains("are not known") && err.contains(needle), "{what}: {err}");
        let row = c.sql(
            "postgres",
            &format!("SELECT incremental_ok, reason FROM blocktrack.backup_start('damaged', true, '{a}', 1)"),
        );
        assert!(row.starts_with("f|"), "{what}: {row}");
        std::fs::write(&path, &pristine).unwrap();
        chown_postgres(&path);
    }
    assert!(!changed(&c, &a, &b).is_empty(), "the repaired summary reads again");
}

/// Each other cause of a gap: tracking state of another system, or of a
/// timeline this server's history left before it, state ahead of WAL, and tracking turned off around wal_level
/// minimal. Each moves the start of the unbroken range past the old parent.
#[test]
fn every_gap_cause_moves_the_unbroken_range() {
    let c = tracked_cluster("gapcauses", "");
    c.sql("postgres", "CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g");
    let valid = |c: &Cluster| c.sql("postgres", "SELECT valid_since_lsn::text FROM blocktrack.status()");
    // The summarizer records the gap when it (re)opens, which may be a
    // moment after it is running (a reload wakes it within a second).
    let after = |c: &Cluster, lsn: &str| -> bool {
        let until = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if c.sql("postgres", &format!("SELECT valid_since_lsn > '{lsn}' FROM blocktrack.status()")) == "t" {
                return true;
            }
            if std::time::Instant::now() > until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };

    // Another system's tracking state (a pg_blocktrack directory copied in).
    let a = flush(&c);
    let other = Cluster::init("other", c.data.parent().unwrap());
    other.start();
    other.sql("postgres", "SELECT 1");
    std::thread::sleep(Duration::from_secs(1));
    other.stop();
    c.stop();
    std::fs::copy(other.data.join("pg_blocktrack/state"), c.data.join("pg_blocktrack/state")).unwrap();
    c.start();
    wait_for_summarizer(&c);
    assert!(after(&c, &a), "another system's state: valid since {}", valid(&c));
    let log = std::fs::read_to_string(&c.log).unwrap();
    assert!(log.contains("the tracking state belongs to system"), "{log}");

    // A timeline switch at the end of WAL (archive recovery promotes onto
    // timeline 2): timeline 1 up to the switch point is timeline 2's
    // history, so the summaries go on, no gap: changes since a point of
    // timeline 1 are still known.
    c.sql("postgres", "UPDATE t SET g = g + 1 WHERE g < 10");
    let a = flush(&c);
    let valid_before = valid(&c);
    c.stop();
    std::fs::write(c.data.join("recovery.signal"), "").unwrap();
    chown_postgres(&c.data.join("recovery.signal"));
    c.append_conf("restore_command = 'false'");
    c.start();
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while c.try_sql("postgres", "SELECT pg_is_in_recovery()").as_deref() != Ok("f") {
        assert!(std::time::Instant::now() < until, "no promotion");
        std::thread::sleep(Duration::from_millis(200));
    }
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while c.sql("postgres", "SELECT timeline FROM blocktrack.status()") != "2" {
        assert!(std::time::Instant::now() < until, "the summarizer never moved to timeline 2");
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_for_summarizer(&c);
    c.sql("postgres", "UPDATE t SET g = g + 1 WHERE g > 990");
    let b = flush(&c);
    assert_eq!(valid(&c), valid_before, "a promotion is no gap");
    let log = std::fs::read_to_string(&c.log).unwrap();
    assert!(log.contains("the timeline changed from 1 to 2 at") && log.contains("summaries go on"), "{log}");
    let rel = c.sql("postgres", "SELECT pg_relation_filepath('t')");
    let across = changed(&c, &a, &b);
    assert!(across.iter().any(|r| r.path == rel && !r.blocks.is_empty()), "changes across the switch: {across:?}");
    assert_eq!(
        c.sql("postgres", &format!("SELECT count(*) > 0 FROM blocktrack.changed_blocks('{a}', '{b}', 1)")),
        "t",
        "timeline 1 before the switch point is this server's history"
    );
    let err =
        c.try_sql("postgres", &format!("SELECT count(*) FROM blocktrack.changed_blocks('{a}', '{b}', 3)")).unwrap_err();
    assert!(err.contains("timeline 3 is not in the history of timeline 2"), "{err}");
    let err =
        c.try_sql("postgres", &format!("SELECT count(*) FROM blocktrack.changed_blocks('{b}', '{b}', 1)")).unwrap_err();
    assert!(err.contains("timeline 1 ends at"), "a point of timeline 1 past its switch point: {err}");

    // Tracking state of timeline 1 past the switch point (an old primary's,
    // which wrote on after the failover): not this server's history.
    c.stop();
    let dir = c.data.join("pg_blocktrack");
    let mut st = blockstream::blkref::TrackerState::load(&dir).unwrap().unwrap();
    st.timeline = 1;
    st.resume_lsn = b.parse().unwrap();
    st.store(&dir).unwrap();
    chown_postgres(&dir.join("state"));
    c.start();
    wait_for_summarizer(&c);
    assert!(after(&c, &b), "timeline 1 past its switch point: valid since {}", valid(&c));
    let log = std::fs::read_to_string(&c.log).unwrap();
    assert!(log.contains("the timeline changed from 1 to 2: timeline 1 ends at"), "{log}");
    let row =
        c.sql("postgres", &format!("SELECT incremental_ok, reason FROM blocktrack.backup_start('tl', true, '{a}', 1)"));
    assert!(row.starts_with("f|changes are tracked without a gap only since"), "{row}");

    // State ahead of WAL: the data directory goes back to a copy, the tracking state does not.
    c.stop();
    let copy = c.data.parent().unwrap().join("reverted");
    copy_tree(&c.data, &copy);
    c.start();
    c.sql("postgres", "INSERT INTO t SELECT g FROM generate_series(1, 200000) g");
    let ahead = flush(&c);
    c.stop();
    std::fs::remove_dir_all(copy.join("pg_blocktrack")).unwrap();
    copy_tree(&c.data.join("pg_blocktrack"), &copy.join("pg_blocktrack"));
    let reverted = Cluster::restored("reverted", &copy, c.data.parent().unwrap());
    reverted.start();
    wait_for_summarizer(&reverted);
    let v = reverted.sql(
        "postgres",
        &format!(
            "SELECT valid_since_lsn >= '{ahead}' AND valid_since_lsn > pg_current_wal_lsn() FROM blocktrack.status()"
        ),
    );
    assert_eq!(v, "t", "state ahead of WAL: the valid range must start past the old resume point");
    reverted.stop();
    c.start();

    // Tracking off, wal_level minimal and back: a gap over what was not tracked.
    let a = flush(&c);
    c.sql("postgres", "ALTER SYSTEM SET blocktrack.enabled = off");
    c.sql("postgres", "SELECT pg_reload_conf()");
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while c.sql("postgres", "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pg_blocktrack'") != "0" {
        assert!(std::time::Instant::now() < until, "blocktrack.enabled = off did not drop the slot");
        std::thread::sleep(Duration::from_millis(200));
    }
    c.stop();
    c.append_conf("wal_level = minimal\nmax_wal_senders = 0");
    c.start();
    c.sql("postgres", "INSERT INTO t SELECT g FROM generate_series(1, 1000) g");
    c.stop();
    c.append_conf("wal_level = replica\nmax_wal_senders = 4");
    c.start();
    c.sql("postgres", "ALTER SYSTEM RESET blocktrack.enabled");
    c.sql("postgres", "SELECT pg_reload_conf()");
    wait_for_summarizer(&c);
    assert!(after(&c, &a), "wal_level minimal: valid since {}", valid(&c));
}

/// The settings: enabled off drops the slot and on again starts a new range;
/// slot_name names the slot; summary_interval writes summaries unasked;
/// max_summary_memory cuts them by size; summary_keep_time removes old ones.
#[test]
fn settings_do_what_they_say() {
    let c = tracked_cluster(
        "gucs",
        "blocktrack.slot_name = 'custom_tracker'\nblocktrack.summary_interval = 1\nblocktrack.max_summary_memory = 1\n",
    );
    wait_for_summarizer(&c);
    assert_eq!(c.sql("postgres", "SELECT slot_name FROM blocktrack.status()"), "custom_tracker");
    assert_eq!(c.sql("postgres", "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'custom_tracker'"), "1");
    // summary_interval = 1 s: summaries follow WAL without being asked.
    c.sql("postgres", "CREATE TABLE t (v text); INSERT INTO t SELECT 'x' FROM generate_series(1, 1000)");
    let lsn = c.sql("postgres", "SELECT pg_current_wal_insert_lsn()::text");
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while c.sql("postgres", &format!("SELECT summarized_lsn >= '{lsn}' FROM blocktrack.status()")) != "t" {
        assert!(std::time::Instant::now() < until, "no summary within summary_interval");
        std::thread::sleep(Duration::from_millis(200));
    }
    // max_summary_memory = 1 MB: a change set of thousands of relations (about
    // 600 bytes of block table each) is cut into several summaries.
    let before: i64 = c.sql("postgres", "SELECT count(*) FROM blocktrack.summaries()").parse().unwrap();
    c.sql("postgres", "ALTER SYSTEM SET blocktrack.summary_interval = 3600");
    c.sql("postgres", "SELECT pg_reload_conf()");
    std::thread::sleep(Duration::from_millis(500));
    c.sql(
        "postgres",
        "DO $$ BEGIN FOR i IN 1..6000 LOOP EXECUTE format('CREATE TABLE m%s AS SELECT 1 AS v', i); END LOOP; END $$",
    );
    flush(&c);
    let after: i64 = c.sql("postgres", "SELECT count(*) FROM blocktrack.summaries()").parse().unwrap();
    let peak: i64 = c.sql("postgres", "SELECT peak_memory_bytes FROM blocktrack.status()").parse().unwrap();
    assert!(after - before >= 3, "only {} summaries for a large change set", after - before);
    assert!(peak <= 2 << 20, "the block table grew to {peak} bytes past max_summary_memory");
    // summary_keep_time: summaries older than it go at the next summary.
    let oldest = c.sql("postgres", "SELECT start_lsn::text FROM blocktrack.summaries() ORDER BY start_lsn LIMIT 1");
    for e in std::fs::read_dir(c.data.join("pg_blocktrack/summaries")).unwrap().flatten() {
        run_ok(std::process::Command::new("touch").args(["-d", "3 hours ago"]).arg(e.path()));
    }
    c.sql("postgres", "ALTER SYSTEM SET blocktrack.summary_keep_time = '1h'");
    c.sql("postgres", "SELECT pg_reload_conf()");
    std::thread::sleep(Duration::from_millis(500));
    c.sql("postgres", "INSERT INTO t VALUES ('after')");
    flush(&c);
    let left = c.sql("postgres", &format!("SELECT count(*) FROM blocktrack.summaries() WHERE start_lsn <= '{oldest}'"));
    assert_eq!(left, "0", "summaries older than summary_keep_time were kept");
    // enabled = off drops the slot; on again tracks from a new point.
    let a = flush(&c);
    c.sql("postgres", "ALTER SYSTEM SET blocktrack.enabled = off");
    c.sql("postgres", "SELECT pg_reload_conf()");
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while c.sql("postgres", "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'custom_tracker'") != "0" {
        assert!(std::time::Instant::now() < until, "enabled = off kept the slot");
        std::thread::sleep(Duration::from_millis(200));
    }
    c.sql("postgres", "INSERT INTO t VALUES ('untracked'); SELECT pg_switch_wal(); CHECKPOINT;");
    c.sql("postgres", "ALTER SYSTEM SET blocktrack.enabled = on");
    c.sql("postgres", "SELECT pg_reload_conf()");
    wait_for_summarizer(&c);
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while c.sql("postgres", &format!("SELECT valid_since_lsn > '{a}' FROM blocktrack.status()")) != "t" {
        assert!(std::time::Instant::now() < until, "enabled on again did not start a new range");
        std::thread::sleep(Duration::from_millis(200));
    }
}
