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

fn reported_blocks(rows: &[Row]) -> BTreeSet<BlockRef> {
    let mut s = BTreeSet::new();
    for r in rows {
        let (spc, dbid) = if r.path.starts_with("global/") {
            (1664, 0)
        } else if r.path.starts_with("base/") {
            (1663, r.path.split('/').nth(1).unwrap().parse().unwrap())
        } else {
            let parts: Vec<&str> = r.path.split('/').collect();
            (parts[1].parse().unwrap(), parts[3].parse().unwrap())
        };
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
    assert!(n[0].path.starts_with(&format!("pg_tblspc/{spc}/PG_15_")), "{n:?}");
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
