//! The engine without PostgreSQL: backups of a [`FakeCluster`] (a data
//! directory with a valid pg_control and WAL, and a session that plays the
//! server) that run in seconds, as any user.
//!
//! `cargo test --release -p blockstream --test engine`

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use blockstream::backup::{run_backup, BackupMode, BackupOptions};
use blockstream::copy::CopyConfig;
use blockstream::progress::Progress;
use blockstream::repo::Repo;
use blockstream::testing::FakeCluster;
use blockstream::verify::verify_backup;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("bs-engine-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn options(data: &Path, repo: &Path, mode: BackupMode, jobs: usize) -> BackupOptions {
    BackupOptions {
        pgdata: data.to_path_buf(),
        repo: repo.to_path_buf(),
        jobs,
        copy: CopyConfig::default(),
        label: Some("engine test".into()),
        fast: true,
        mode,
        no_fallback: false,
        verify_checksums: false,
        allow_checksum_failures: false,
    }
}

/// Pieces are hashed from the bytes that are stored, never from a second
/// read of the live file: a file rewritten, truncated and regrown while it
/// is copied, again and again, still gives backups whose every digest
/// verifies (and the backups saw the truncations).
#[test]
fn concurrent_writes_and_truncation_never_break_a_digest() {
    use std::os::unix::fs::FileExt;
    let base = scratch("truncate");
    let mut c = FakeCluster::create(&base.join("data"), 42);
    let rel = c.data.join("base/5/16384");
    let size = 8u64 << 20;
    std::fs::write(&rel, vec![1u8; size as usize]).unwrap();
    let repo = base.join("repo");
    let mut truncated = 0;
    for round in 0..30 {
        let stop = AtomicBool::new(false);
        let file = std::fs::OpenOptions::new().write(true).open(&rel).unwrap();
        let m = std::thread::scope(|s| {
            s.spawn(|| {
                let mut n = round as u64 + 1;
                let mut chunk = vec![0u8; 256 << 10];
                while !stop.load(Ordering::Relaxed) {
                    n = n.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                    let len = (n >> 40) % size;
                    file.set_len(len).unwrap();
                    file.set_len(size).unwrap();
                    // Rewrite from the cut on, with bytes that change every time.
                    chunk.fill((n >> 56) as u8 | 1);
                    let mut at = len & !0xFFF;
                    while at < size {
                        file.write_all_at(&chunk[..(size - at).min(chunk.len() as u64) as usize], at).unwrap();
                        at += chunk.len() as u64;
                    }
                }
            });
            let m = run_backup(&options(&c.data, &repo, BackupMode::Full, 4), &mut c.session(), &Progress::default());
            stop.store(true, Ordering::Relaxed);
            m.unwrap()
        });
        truncated += m.files.iter().filter(|f| f.truncated).count();
        let check = verify_backup(&Repo::open(&repo).unwrap(), &m.backup_id, 2, &Progress::default());
        assert!(check.problems.is_empty(), "round {round}: {:?}", check.problems);
    }
    assert!(truncated > 0, "no backup saw a truncation: the test did not race");
    eprintln!("{truncated} truncated copies in 30 backups, every digest verified");
    std::fs::remove_dir_all(&base).unwrap();
}

/// Full, then an incremental that stores only the blocks written since,
/// then a restore of the chain by the command line that equals the source.
#[test]
fn full_incremental_and_chain_restore_round_trip() {
    let base = scratch("roundtrip");
    let mut c = FakeCluster::create(&base.join("data"), 43);
    for b in 0..200 {
        c.write_block("base/5/16384", b, (b % 200) as u8 + 1);
    }
    for b in 0..10 {
        c.write_block("base/5/16390", b, 7);
    }
    let repo = base.join("repo");
    let full =
        run_backup(&options(&c.data, &repo, BackupMode::Full, 2), &mut c.session(), &Progress::default()).unwrap();
    for b in [3, 150, 199, 200, 201] {
        c.write_block("base/5/16384", b, 0xEE);
    }
    let incr =
        run_backup(&options(&c.data, &repo, BackupMode::Incr, 2), &mut c.session(), &Progress::default()).unwrap();
    assert_eq!(incr.parent.as_deref(), Some(full.backup_id.as_str()), "{:?}", incr.full_reason);
    let f = incr.files.iter().find(|f| f.path == "base/5/16384").unwrap();
    let inc = f.incremental.as_ref().expect("stored incrementally");
    assert_eq!(inc.runs, vec![(3, 1), (150, 1), (199, 3)]);
    assert!(incr
        .files
        .iter()
        .find(|f| f.path == "base/5/16390")
        .unwrap()
        .incremental
        .as_ref()
        .unwrap()
        .runs
        .is_empty());
    let repo_h = Repo::open(&repo).unwrap();
    for id in [&full.backup_id, &incr.backup_id] {
        let check = verify_backup(&repo_h, id, 2, &Progress::default());
        assert!(check.problems.is_empty(), "{:?}", check.problems);
    }

    // Restore through the command line (run as root it writes as the data
    // owner: give the fake cluster to an unprivileged user first).
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        let ok = std::process::Command::new("chown").args(["-R", "nobody"]).arg(&c.data).status().unwrap();
        assert!(ok.success());
    }
    let target = base.join("restored");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_blockstream"))
        .args(["restore", "--repo", repo.to_str().unwrap(), "-D", target.to_str().unwrap(), "-j", "2"])
        .args(if root { vec!["--owner", "nobody"] } else { vec![] })
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for rel in ["base/5/16384", "base/5/16390", "PG_VERSION", "global/pg_control", "pg_xact/0000"] {
        assert_eq!(std::fs::read(c.data.join(rel)).unwrap(), std::fs::read(target.join(rel)).unwrap(), "{rel}");
    }
    assert!(target.join("backup_label").exists() && target.join("recovery.signal").exists());
    std::fs::remove_dir_all(&base).unwrap();
}
