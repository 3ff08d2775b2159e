//! Encryption at rest, through the engine, on a repository in memory (no
//! server, no disk repository): chunks and manifests sealed, no plaintext
//! anywhere, every kind of tampering named, wrong and missing keys refused,
//! key rotation, and an encrypted chain that restores equal to the source.
//! One test in its own binary: run as root, the restore becomes the data
//! owner for the rest of the process.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockstream::backup::{run_backup, BackupMode, BackupOptions};
use blockstream::copy::CopyConfig;
use blockstream::crypt::{Encryption, KeySource};
use blockstream::progress::Progress;
use blockstream::repo::Repo;
use blockstream::restore::{run_restore, RecoveryTarget, RestoreOptions};
use blockstream::storage::memory::MemoryStore;
use blockstream::storage::SharedStore;
use blockstream::testing::FakeCluster;
use blockstream::verify::verify_backup;

const MARKER: &[u8] = b"MARKER-not-for-your-eyes-7d1e";

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join("blockstream-engine").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn pass(p: &str) -> Encryption {
    Encryption { key: Some(KeySource::Passphrase(p.as_bytes().to_vec())), allow_plain: false }
}

fn backup(
    c: &mut FakeCluster,
    store: &SharedStore,
    mode: BackupMode,
    enc: &Encryption,
) -> blockstream::Result<blockstream::manifest::Manifest> {
    let opts = BackupOptions {
        pgdata: c.data.clone(),
        repo: Arc::clone(store),
        jobs: 2,
        // Small chunks: several per stream.
        copy: CopyConfig { chunk_size: 64 << 10, ..CopyConfig::default() },
        label: Some("encrypted".into()),
        fast: true,
        mode,
        no_fallback: true,
        verify_checksums: false,
        allow_checksum_failures: false,
        encryption: enc.clone(),
        merge_of: None,
    };
    run_backup(&opts, &mut c.session(), &Progress::default())
}

fn restore(store: &SharedStore, target: &Path, owner: Option<&str>, enc: &Encryption) -> blockstream::Result<()> {
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
        encryption: enc.clone(),
        delta: false,
        check: Default::default(),
        db_include: Vec::new(),
        compare_all: false,
    };
    run_restore(&opts, &Progress::default()).map(|_| ())
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Every object of the store, and every chunk decompressed as if it were
/// plain zstd: does the marker show anywhere?
fn marker_visible(mem: &MemoryStore) -> bool {
    mem.keys().iter().any(|k| {
        let bytes = mem.get(k).unwrap();
        if contains(&bytes, MARKER) {
            return true;
        }
        // Any zstd frame in a stream, decompressed.
        k.ends_with(".bsz")
            && (0..bytes.len())
                .filter(|&i| bytes[i..].starts_with(&[0x28, 0xb5, 0x2f, 0xfd]))
                .any(|i| zstd::stream::decode_all(&bytes[i..]).is_ok_and(|raw| contains(&raw, MARKER)))
    })
}

fn source(base: &Path) -> FakeCluster {
    let mut c = FakeCluster::create(&base.join("data"), 45);
    for b in 0..120 {
        c.write_block("base/5/16384", b, (b % 250) as u8 + 1);
    }
    let mut page = vec![0u8; 8192];
    for (i, b) in MARKER.iter().cycle().take(4000).enumerate() {
        page[100 + i] = *b;
    }
    std::fs::write(c.data.join("base/5/16399"), &page).unwrap();
    c
}

#[test]
fn encrypted_repositories_hide_everything_and_name_every_tampering() {
    let base = scratch("encryption");
    let mut c = source(&base);

    // The check is meaningful: a plain repository shows the marker.
    let plain_mem = MemoryStore::new("plain");
    let plain: SharedStore = Arc::new(plain_mem.clone());
    backup(&mut c, &plain, BackupMode::Full, &Encryption::default()).unwrap();
    assert!(marker_visible(&plain_mem), "the marker must be visible in a plain repository");

    // An encrypted chain: full, then incremental.
    let mem = MemoryStore::new("sealed");
    let store: SharedStore = Arc::new(mem.clone());
    let enc = pass("correct horse battery staple");
    let full = backup(&mut c, &store, BackupMode::Full, &enc).unwrap();
    c.write_block("base/5/16384", 7, 0xEE);
    let incr = backup(&mut c, &store, BackupMode::Incr, &enc).unwrap();
    assert_eq!(incr.parent.as_deref(), Some(full.backup_id.as_str()));
    assert_eq!(blockstream::codec::describe(&full.filters), "zstd:3+aes-256-gcm");
    assert!(mem.get("keys.json").is_some());
    assert!(!marker_visible(&mem), "the marker shows in an encrypted repository");
    let manifest = mem.get(&format!("backups/{}/manifest.json", full.backup_id)).unwrap();
    assert!(!contains(&manifest, b"base/5/16384"), "file names are sealed too");

    // No key, a wrong key, a key file for a passphrase: clear refusals.
    let mut repo = Repo::open_store(Arc::clone(&store)).unwrap();
    assert!(repo.is_encrypted());
    let err = repo.load_manifest(&full.backup_id).unwrap_err().to_string();
    assert!(err.contains("is encrypted and no key was given"), "{err}");
    let err = repo.unlock(None, false).unwrap_err().to_string();
    assert!(err.contains("is encrypted: give its passphrase"), "{err}");
    let err = repo.unlock(pass("wrong").key.as_ref(), false).unwrap_err().to_string();
    assert_eq!(err, "repository \"memory://sealed\" is encrypted; the key does not open it");
    let err = repo.unlock(Some(&KeySource::Raw([1; 32])), false).unwrap_err().to_string();
    assert!(err.contains("wrapped by a passphrase"), "{err}");
    // A plain backup into it is refused; a key for the plain repository too.
    let err = backup(&mut c, &store, BackupMode::Full, &Encryption::default()).unwrap_err().to_string();
    assert!(err.contains("is encrypted: give its passphrase"), "{err}");
    let err = backup(&mut c, &plain, BackupMode::Full, &enc).unwrap_err().to_string();
    assert!(err.contains("holds unencrypted backups"), "{err}");

    repo.unlock(enc.key.as_ref(), false).unwrap();
    for id in [&full.backup_id, &incr.backup_id] {
        let check = verify_backup(&repo, id, 2, &Progress::default());
        assert!(check.problems.is_empty(), "{id}: {:?}", check.problems.iter().map(|p| &p.detail).collect::<Vec<_>>());
    }

    // A flipped bit in the manifest: named, and the backup is no longer readable.
    let mkey = format!("backups/{}/manifest.json", incr.backup_id);
    let good_manifest = mem.get(&mkey).unwrap();
    let mut bad = good_manifest.clone();
    let n = bad.len();
    bad[n / 2] ^= 0x01;
    mem.replace(&mkey, bad);
    let err = repo.load_manifest(&incr.backup_id).unwrap_err().to_string();
    assert!(err.contains("manifest.json\" fails its authentication tag"), "{err}");
    // A manifest of another backup put in its place: its tag binds its id.
    mem.replace(&mkey, mem.get(&format!("backups/{}/manifest.json", full.backup_id)).unwrap());
    assert!(repo.load_manifest(&incr.backup_id).unwrap_err().to_string().contains("fails its authentication tag"));
    mem.replace(&mkey, good_manifest);

    // A flipped bit in a chunk: verify names it (its digest, then its tag).
    // The stream with the most chunks: how pieces spread over the streams
    // depends on the threads' timing.
    let s = (0..full.streams.len()).max_by_key(|&i| full.streams[i].chunks.len()).unwrap();
    let sname = full.streams[s].name.clone();
    let skey = format!("backups/{}/{sname}", full.backup_id);
    let good_stream = mem.get(&skey).unwrap();
    let mut bad = good_stream.clone();
    let at = full.streams[s].chunks[1].offset as usize + 20;
    bad[at] ^= 0x04;
    mem.replace(&skey, bad);
    let check = verify_backup(&repo, &full.backup_id, 2, &Progress::default());
    let all = check.problems.iter().map(|p| p.detail.as_str()).collect::<Vec<_>>().join("\n");
    assert!(all.contains(&format!("chunk 1 of {sname} in backup {}", full.backup_id)), "{all}");
    mem.replace(&skey, good_stream.clone());

    // Two chunks swapped, with the manifest kept consistent (re-sealed by
    // someone holding the key): every digest matches, the tags do not.
    let m = repo.load_manifest(&full.backup_id).unwrap();
    let chunks = &m.streams[s].chunks;
    assert!(chunks.len() >= 2, "several chunks per stream");
    let (a, b) = (&chunks[0], &chunks[1]);
    let header = &good_stream[..a.offset as usize];
    let bytes_a = &good_stream[a.offset as usize..(a.offset + a.stored) as usize];
    let bytes_b = &good_stream[b.offset as usize..(b.offset + b.stored) as usize];
    let rest = &good_stream[(b.offset + b.stored) as usize..];
    let swapped = [header, bytes_b, bytes_a, rest].concat();
    let mut forged = m.clone();
    let fc = &mut forged.streams[s].chunks;
    fc.swap(0, 1);
    fc[0].offset = a.offset;
    fc[1].offset = a.offset + b.stored;
    mem.replace(&skey, swapped);
    repo.store_manifest(&forged).unwrap();
    let check = verify_backup(&repo, &full.backup_id, 2, &Progress::default());
    let all = check.problems.iter().map(|p| p.detail.as_str()).collect::<Vec<_>>().join("\n");
    assert!(all.contains("fails its authentication tag"), "a swap went unnoticed: {all}");
    mem.replace(&skey, good_stream);
    repo.store_manifest(&m).unwrap();

    // Rotation: the new passphrase opens it, the old one no longer does.
    let lock = repo.lock().unwrap();
    let new = pass("new passphrase");
    repo.rotate_key(new.key.as_ref().unwrap(), &lock).unwrap();
    drop(lock);
    let mut reopened = Repo::open_store(Arc::clone(&store)).unwrap();
    let err = reopened.unlock(enc.key.as_ref(), false).unwrap_err().to_string();
    assert!(err.contains("the key does not open it"), "{err}");
    reopened.unlock(new.key.as_ref(), false).unwrap();
    assert!(verify_backup(&reopened, &incr.backup_id, 2, &Progress::default()).problems.is_empty());

    // Restores: without the key refused before anything is written; with
    // the new key, equal to the source.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        let ok = std::process::Command::new("chown").args(["-R", "nobody"]).arg(&base).status().unwrap();
        assert!(ok.success());
    }
    let owner = root.then_some("nobody");
    let target = base.join("restored");
    let err = restore(&store, &target, owner, &Encryption::default()).unwrap_err().to_string();
    assert!(err.contains("is encrypted: give its passphrase"), "{err}");
    assert!(!target.exists());
    // A flipped bit in a chunk of the chain: refused before anything is written.
    let skey = format!("backups/{}/stream-00.bsz", incr.backup_id);
    let good = mem.get(&skey).unwrap();
    let mut bad = good.clone();
    let at = incr.streams[0].chunks[0].offset as usize + 9;
    bad[at] ^= 0x80;
    mem.replace(&skey, bad);
    let err = restore(&store, &target, owner, &new).unwrap_err().to_string();
    assert!(err.contains("is damaged"), "{err}");
    assert!(!target.join("global/pg_control").exists(), "nothing written from a damaged chain");
    mem.replace(&skey, good);
    let _ = std::fs::remove_dir_all(&target);
    restore(&store, &target, owner, &new).unwrap();
    for rel in ["base/5/16384", "base/5/16399", "PG_VERSION", "global/pg_control", "pg_xact/0000"] {
        assert_eq!(std::fs::read(c.data.join(rel)).unwrap(), std::fs::read(target.join(rel)).unwrap(), "{rel}");
    }
}
