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
        repo: blockstream::storage::at(repo).unwrap(),
        jobs,
        copy: CopyConfig::default(),
        label: Some("engine test".into()),
        fast: true,
        mode,
        no_fallback: false,
        verify_checksums: false,
        allow_checksum_failures: false,
        encryption: Default::default(),
        merge_of: None,
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

/// A WAL segment as PostgreSQL writes one: a long page header naming the
/// system and the segment size, then content.
fn fake_segment(sysid: u64, seg_size: u32, fill: u8) -> Vec<u8> {
    let mut s = vec![fill; seg_size as usize];
    s[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
    s[2..4].copy_from_slice(&0x0002u16.to_le_bytes());
    s[24..32].copy_from_slice(&sysid.to_le_bytes());
    s[32..36].copy_from_slice(&seg_size.to_le_bytes());
    s
}

/// The WAL archive without a server: pushes round-trip; the same content
/// again is success, other content and another system's segment are refused
/// keeping the archived copy; a missing segment is a named gap; a timeline's
/// history leads the search to its parent; pruning keeps what a backup needs.
#[test]
fn archive_push_fetch_gaps_and_prune() {
    use blockstream::archive::{self, Pushed};
    use blockstream::codec::Compression;
    use blockstream::lsn::{wal_file_name, Lsn};
    let base = scratch("archive");
    let seg: u32 = 1 << 20;
    let repo = Repo::open_or_create(&base.join("repo"), 42, 150000).unwrap();
    let zstd = Compression::Zstd { level: 3 };
    let push = |name: &str, bytes: &[u8]| {
        let p = base.join(name);
        std::fs::write(&p, bytes).unwrap();
        archive::push(&repo, &p, name, zstd)
    };
    for n in 1..=6u64 {
        if n != 4 {
            let name = wal_file_name(1, n, seg as u64);
            assert!(matches!(push(&name, &fake_segment(42, seg, n as u8)).unwrap(), Pushed::Stored { .. }), "{name}");
        }
    }
    let two = wal_file_name(1, 2, seg as u64);
    assert_eq!(archive::fetch(&repo, &two).unwrap().unwrap(), fake_segment(42, seg, 2));
    assert_eq!(push(&two, &fake_segment(42, seg, 2)).unwrap(), Pushed::AlreadyThere);
    let stored = std::fs::read(base.join("repo").join(archive::relative_path(&two).unwrap())).unwrap();
    let err = push(&two, &fake_segment(42, seg, 99)).unwrap_err().to_string();
    assert!(
        err.contains("is already archived with other content") && err.contains("the archived copy is kept"),
        "{err}"
    );
    let err = push(&wal_file_name(1, 7, seg as u64), &fake_segment(43, seg, 7)).unwrap_err().to_string();
    assert!(err.contains("43") && err.contains("42"), "another system's segment: {err}");
    assert_eq!(std::fs::read(base.join("repo").join(archive::relative_path(&two).unwrap())).unwrap(), stored);
    assert!(archive::fetch(&repo, &wal_file_name(1, 4, seg as u64)).unwrap().is_none());
    // A gap at segment 4, named.
    let listing = archive::list(&repo, seg as u64).unwrap();
    let gaps = archive::gaps(&repo, &listing, 1, Lsn(seg as u64), seg as u64).unwrap();
    assert_eq!(gaps.len(), 1, "{:?}", gaps.iter().map(|g| &g.text).collect::<Vec<_>>());
    assert_eq!((gaps[0].first_segment, gaps[0].last_segment), (4, 4));
    assert!(gaps[0].text.contains(&wal_file_name(1, 4, seg as u64)), "{}", gaps[0].text);
    // Timeline 2 forks from 1 in segment 5: the path runs through 1 up to the fork.
    assert!(matches!(
        push("00000002.history", b"1\t0/500ABC\tno recovery target specified\n").unwrap(),
        Pushed::Stored { .. }
    ));
    for n in 5..=8u64 {
        push(&wal_file_name(2, n, seg as u64), &fake_segment(42, seg, 50 + n as u8)).unwrap();
    }
    let listing = archive::list(&repo, seg as u64).unwrap();
    let gaps = archive::gaps(&repo, &listing, 2, Lsn(5 * seg as u64), seg as u64).unwrap();
    assert!(gaps.is_empty(), "{:?}", gaps.iter().map(|g| &g.text).collect::<Vec<_>>());
    // Pruning for a backup that starts in segment 5 removes 1..3 and keeps the rest.
    let removed = blockstream::expire::prune_archive(&repo, Lsn(5 * seg as u64), seg as u64, false).unwrap();
    assert_eq!(removed.len(), 3, "{removed:?}");
    assert!(archive::fetch(&repo, &wal_file_name(1, 3, seg as u64)).unwrap().is_none());
    assert!(archive::fetch(&repo, &wal_file_name(1, 5, seg as u64)).unwrap().is_some());
    assert!(archive::fetch(&repo, "00000002.history").unwrap().is_some());
    // Timeline 1 went on past the fork (the old primary), with segment 7 missing.
    push(&wal_file_name(1, 8, seg as u64), &fake_segment(42, seg, 8)).unwrap();
    let listing = archive::list(&repo, seg as u64).unwrap();
    let texts = |g: &[archive::Gap]| g.iter().map(|g| g.text.clone()).collect::<Vec<_>>();
    // A backup that ended before the fork follows timeline 2, which has it all.
    let before = archive::gaps(&repo, &listing, 1, Lsn(5 * seg as u64 + 0x100), seg as u64).unwrap();
    assert!(before.is_empty(), "{:?}", texts(&before));
    // One that ended on timeline 1 after the fork cannot follow timeline 2:
    // its WAL is timeline 1's, where segment 7 is missing.
    let after = archive::gaps(&repo, &listing, 1, Lsn(6 * seg as u64 + 0xA0), seg as u64).unwrap();
    assert_eq!(after.len(), 1, "{:?}", texts(&after));
    assert_eq!((after[0].timeline, after[0].first_segment, after[0].last_segment), (1, 7, 7));
}

/// Committed repositories, one per manifest format version
/// (`tests/fixtures/repo-vN`, a full and an incremental backup of a fake
/// cluster): every later version must still verify and restore each. Their
/// restored files' SHA-256 are in `tests/fixtures/repo-vN.sha256`. Version
/// 1 has `compression`, version 2 the filter stack. When the format version
/// changes, add the new fixture (never rewrite an old one) with
/// `cargo test --release -p blockstream --test engine -- --ignored write_format_fixture`.
const FIXTURE_FILES: [&str; 5] = ["base/5/16384", "base/5/16390", "PG_VERSION", "global/pg_control", "pg_xact/0000"];

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[test]
#[ignore]
fn write_format_fixture() {
    let base = scratch("fixture");
    let mut c = FakeCluster::create(&base.join("data"), 7_000_000_000_000_000_001);
    for b in 0..40 {
        c.write_block("base/5/16384", b, b as u8 + 1);
    }
    let version = blockstream::manifest::VERSION;
    let repo = fixture_dir().join(format!("repo-v{version}"));
    assert!(!repo.exists(), "the fixture of version {version} exists: old fixtures are never rewritten");
    run_backup(&options(&c.data, &repo, BackupMode::Full, 2), &mut c.session(), &Progress::default()).unwrap();
    c.write_block("base/5/16384", 7, 0xEE);
    c.write_block("base/5/16390", 0, 0xDD);
    run_backup(&options(&c.data, &repo, BackupMode::Incr, 2), &mut c.session(), &Progress::default()).unwrap();
    let _ = std::fs::remove_file(repo.join("lock"));
    let sums: String = FIXTURE_FILES
        .iter()
        .map(|rel| {
            let d = blockstream::hash::sha256(&std::fs::read(c.data.join(rel)).unwrap());
            format!("{}  {rel}\n", blockstream::hash::to_hex(&d))
        })
        .collect();
    std::fs::write(fixture_dir().join(format!("repo-v{version}.sha256")), sums).unwrap();
}

#[test]
fn every_format_fixture_still_verifies_and_restores() {
    for version in 1..=blockstream::manifest::VERSION {
        fixture_verifies_and_restores(version);
    }
}

fn fixture_verifies_and_restores(version: u32) {
    let base = scratch(&format!("fixture-read-v{version}"));
    // A copy: verify logs into the repository.
    let name = format!("repo-v{version}");
    let repo = base.join(&name);
    let ok = std::process::Command::new("cp").arg("-a").arg(fixture_dir().join(&name)).arg(&repo).status().unwrap();
    assert!(ok.success());
    let r = Repo::open(&repo).unwrap();
    assert_eq!(r.info.version, 1);
    let ids = r.backup_ids().unwrap();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert_eq!(r.load_manifest(&ids[1]).unwrap().parent.as_deref(), Some(ids[0].as_str()));
    let raw = std::fs::read_to_string(repo.join(format!("backups/{}/manifest.json", ids[0]))).unwrap();
    assert!(raw.contains(&format!("\"version\": {version},")), "{name} holds manifests of version {version}");
    assert!(!r.load_manifest(&ids[0]).unwrap().filters.is_empty(), "{name}: zstd, read into the filter stack");
    for id in &ids {
        let check = verify_backup(&r, id, 2, &Progress::default());
        assert!(check.problems.is_empty(), "{id}: {:?}", check.problems.iter().map(|p| &p.detail).collect::<Vec<_>>());
    }
    let root = unsafe { libc::geteuid() } == 0;
    let target = base.join("restored");
    if root {
        std::fs::create_dir(&target).unwrap();
        let ok = std::process::Command::new("chown").args(["nobody"]).arg(&target).status().unwrap();
        assert!(ok.success());
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_blockstream"))
        .args(["restore", "--repo", repo.to_str().unwrap(), "-D", target.to_str().unwrap(), "-j", "2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let expected = std::fs::read_to_string(fixture_dir().join(format!("{name}.sha256"))).unwrap();
    let mut lines = 0;
    for line in expected.lines() {
        let (sum, rel) = line.split_once("  ").unwrap();
        let d = blockstream::hash::sha256(&std::fs::read(target.join(rel)).unwrap());
        assert_eq!(blockstream::hash::to_hex(&d), sum, "{rel}");
        lines += 1;
    }
    assert_eq!(lines, FIXTURE_FILES.len());
    std::fs::remove_dir_all(&base).unwrap();
}
