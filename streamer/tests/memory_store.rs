//! The engine against a repository held in memory: a chain of backups,
//! verify, expire, a damaged chunk and a restore, with no disk repository,
//! no server and no root. One test in its own binary: run as root, the
//! restore becomes the data owner for the rest of the process.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockstream::backup::{run_backup, BackupMode, BackupOptions};
use blockstream::copy::CopyConfig;
use blockstream::expire::{self, Policy};
use blockstream::progress::Progress;
use blockstream::repo::Repo;
use blockstream::restore::{run_restore, RecoveryTarget, RestoreOptions};
use blockstream::storage::memory::MemoryStore;
use blockstream::storage::SharedStore;
use blockstream::testing::FakeCluster;
use blockstream::verify::verify_backup;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join("blockstream-engine").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn backup(c: &mut FakeCluster, store: &SharedStore, mode: BackupMode) -> blockstream::manifest::Manifest {
    let opts = BackupOptions {
        pgdata: c.data.clone(),
        repo: Arc::clone(store),
        jobs: 2,
        copy: CopyConfig::default(),
        label: Some("memory".into()),
        fast: true,
        mode,
        no_fallback: true,
        verify_checksums: false,
        allow_checksum_failures: false,
        encryption: Default::default(),
        merge_of: None,
    };
    run_backup(&opts, &mut c.session(), &Progress::default()).unwrap()
}

fn restore(store: &SharedStore, target: &Path, owner: Option<&str>) -> blockstream::Result<()> {
    let opts = RestoreOptions {
        repo: Arc::clone(store),
        target: target.to_path_buf(),
        backup: "latest".into(),
        jobs: 2,
        tablespace_map: Vec::new(),
        force: false,
        recovery_target: RecoveryTarget::EndOfWal,
        restore_command: None,
        owner: owner.map(str::to_string),
        target_action: None,
        target_timeline: None,
        encryption: Default::default(),
        delta: false,
        check: Default::default(),
        db_include: Vec::new(),
        compare_all: false,
    };
    run_restore(&opts, &Progress::default()).map(|_| ())
}

#[test]
fn a_repository_in_memory_holds_a_chain_that_verifies_expires_and_restores() {
    let base = scratch("memory");
    let mut c = FakeCluster::create(&base.join("data"), 44);
    for b in 0..300 {
        c.write_block("base/5/16384", b, (b % 250) as u8 + 1);
    }
    let mem = MemoryStore::new("engine");
    let store: SharedStore = Arc::new(mem.clone());

    // Two chains: full, incr, diff, incr; then a second full.
    let full1 = backup(&mut c, &store, BackupMode::Full);
    c.write_block("base/5/16384", 10, 0xA1);
    let incr1 = backup(&mut c, &store, BackupMode::Incr);
    c.write_block("base/5/16384", 299, 0xA2);
    c.write_block("base/5/16390", 0, 0xA3);
    let diff = backup(&mut c, &store, BackupMode::Diff);
    c.write_block("base/5/16384", 300, 0xA4);
    let incr2 = backup(&mut c, &store, BackupMode::Incr);
    assert_eq!(incr1.parent.as_deref(), Some(full1.backup_id.as_str()));
    assert_eq!(diff.parent.as_deref(), Some(full1.backup_id.as_str()));
    assert_eq!(incr2.parent.as_deref(), Some(diff.backup_id.as_str()));
    let f = incr2.files.iter().find(|f| f.path == "base/5/16384").unwrap();
    assert_eq!(f.incremental.as_ref().expect("stored incrementally").runs, vec![(300, 1)]);
    c.write_block("base/5/16384", 5, 0xB5);
    let full2 = backup(&mut c, &store, BackupMode::Full);

    let repo = Repo::open_store(Arc::clone(&store)).unwrap();
    assert_eq!(repo.location(), "memory://engine");
    let ids = repo.backup_ids().unwrap();
    assert_eq!(ids.len(), 5, "{ids:?}");
    for id in &ids {
        let check = verify_backup(&repo, id, 2, &Progress::default());
        assert!(check.problems.is_empty(), "{id}: {:?}", check.problems.iter().map(|p| &p.detail).collect::<Vec<_>>());
    }

    // Expire keeps one full: the first chain goes, manifest first, and
    // nothing of it is left in the store.
    let decisions = expire::plan(
        &expire::entries(&repo).unwrap(),
        &Policy { retain_full: 1, retain_diff: None, retain_incr: None, retain_days: None },
        u64::MAX / 2,
    );
    let lock = repo.lock().unwrap();
    let mut removed = expire::execute(&repo, &lock, &decisions).unwrap();
    drop(lock);
    removed.sort();
    let mut first_chain = vec![full1.backup_id.clone(), incr1.backup_id, diff.backup_id, incr2.backup_id];
    first_chain.sort();
    assert_eq!(removed, first_chain);
    assert_eq!(repo.backup_ids().unwrap(), vec![full2.backup_id.clone()]);
    assert!(mem.keys().iter().all(|k| !k.contains(&full1.backup_id)), "{:?}", mem.keys());

    // A flipped byte in a stored chunk: verify names the chunk, restore
    // refuses before it writes anything.
    let stream = format!("backups/{}/stream-00.bsz", full2.backup_id);
    let good = mem.get(&stream).unwrap();
    let mut bad = good.clone();
    let at = full2.streams[0].chunks[0].offset as usize + 3;
    bad[at] ^= 0x40;
    mem.replace(&stream, bad);
    let check = verify_backup(&repo, &full2.backup_id, 2, &Progress::default());
    let all = check.problems.iter().map(|p| p.detail.as_str()).collect::<Vec<_>>().join("\n");
    assert!(all.contains(&format!("chunk 0 of stream-00.bsz in backup {} is damaged", full2.backup_id)), "{all}");
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        let ok = std::process::Command::new("chown").args(["-R", "nobody"]).arg(&base).status().unwrap();
        assert!(ok.success());
    }
    let owner = root.then_some("nobody");
    let target = base.join("restored");
    let err = restore(&store, &target, owner).unwrap_err().to_string();
    assert!(err.contains("is damaged"), "{err}");
    assert!(!target.join("global/pg_control").exists(), "nothing written from a damaged backup");

    // Mended, the restore equals the source.
    mem.replace(&stream, good);
    let _ = std::fs::remove_dir_all(&target);
    restore(&store, &target, owner).unwrap();
    for rel in ["base/5/16384", "base/5/16390", "PG_VERSION", "global/pg_control", "pg_xact/0000"] {
        assert_eq!(std::fs::read(c.data.join(rel)).unwrap(), std::fs::read(target.join(rel)).unwrap(), "{rel}");
    }
    assert!(target.join("backup_label").exists() && target.join("recovery.signal").exists());
}
