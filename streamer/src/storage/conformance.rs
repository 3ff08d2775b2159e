//! The contract of [`Store`], written once and run against every driver.

//! Public (hidden) so that the object-store tests run it against a live
//! bucket.

use super::*;

fn names(entries: &[Entry]) -> Vec<(String, Kind, u64)> {
    entries.iter().map(|e| (e.name.clone(), e.kind, e.size)).collect()
}

/// Runs the whole contract on an empty, missing store.
pub fn contract(store: &dyn Store) {
    assert_eq!(store.root_state().unwrap(), RootState::Missing);
    store.init().unwrap();
    // An object store has no directories: an empty prefix is a missing one.
    let state = store.root_state().unwrap();
    assert!(state == RootState::Empty || (store.local_root().is_none() && state == RootState::Missing), "{state:?}");

    // Whole objects: atomic replace, bounded reads, not found.
    store.put("repo.json", b"one").unwrap();
    assert_eq!(store.root_state().unwrap(), RootState::Holds);
    store.put("repo.json", b"two!").unwrap();
    assert_eq!(store.read("repo.json", 4).unwrap(), b"two!");
    let err = store.read("repo.json", 3).unwrap_err().to_string();
    assert!(err.contains("more than the 3 allowed"), "{err}");
    let err = store.read("backups/nothing", 10).unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert!(store.open("nothing").err().unwrap().is_not_found());

    // put_new never replaces.
    assert!(store.put_new("archive/00000001/a.bsw", b"first").unwrap());
    assert!(!store.put_new("archive/00000001/a.bsw", b"second").unwrap());
    assert_eq!(store.read("archive/00000001/a.bsw", 100).unwrap(), b"first");

    // Objects written in parts; never over an existing one.
    let mut w = store.create("backups/20261127T031500F/stream-00.bsz").unwrap();
    w.write_all(b"hello ").unwrap();
    w.write_all(b"world").unwrap();
    w.finish().unwrap();
    assert!(store.create("backups/20261127T031500F/stream-00.bsz").is_err());
    let r = store.open("backups/20261127T031500F/stream-00.bsz").unwrap();
    assert_eq!(r.len(), 11);
    let mut buf = [0u8; 5];
    r.read_exact_at(&mut buf, 6).unwrap();
    assert_eq!(&buf, b"world");
    assert!(r.read_exact_at(&mut buf, 7).is_err(), "a read past the end fails");

    // Logs: records in order.
    store.append("verify.jsonl", b"{\"a\":1}\n").unwrap();
    store.append("verify.jsonl", b"{\"a\":2}\n").unwrap();
    assert_eq!(store.read("verify.jsonl", 1 << 10).unwrap(), b"{\"a\":1}\n{\"a\":2}\n");

    // Listing: direct children, sorted, objects with sizes.
    let root: Vec<(String, Kind, u64)> =
        names(&store.list("").unwrap()).into_iter().filter(|(n, _, _)| n != "lock").collect();
    assert_eq!(
        root,
        vec![
            ("archive".into(), Kind::Prefix, 0),
            ("backups".into(), Kind::Prefix, 0),
            ("repo.json".into(), Kind::Object, 4),
            ("verify.jsonl".into(), Kind::Object, 16),
        ]
    );
    assert_eq!(
        names(&store.list("backups/20261127T031500F").unwrap()),
        vec![("stream-00.bsz".into(), Kind::Object, 11)]
    );
    assert!(store.list("archive/00000002").unwrap().is_empty(), "a missing prefix lists nothing");
    assert!(store.list("archive/00000001").unwrap()[0].modified.is_some());
    assert_eq!(store.total_bytes() - store.read("lock", 1 << 10).map_or(0, |b| b.len() as u64), 4 + 5 + 11 + 16);

    // Keys are plain relative names.
    for bad in ["", "/etc/passwd", "../x", "a/../b", "a//b", "a/./b", "a/"] {
        assert!(store.read(bad, 10).is_err(), "{bad:?}");
        assert!(store.put(bad, b"x").is_err(), "{bad:?}");
    }

    // Removal.
    store.remove("archive/00000001/a.bsw").unwrap();
    store.remove("archive/00000001/a.bsw").unwrap();
    assert!(store.list("archive/00000001").unwrap().is_empty());
    store.remove_prefix("backups/20261127T031500F").unwrap();
    assert!(store.list("backups").unwrap().iter().all(|e| e.name != "20261127T031500F"));
    store.remove_prefix("backups/20261127T031500F").unwrap();

    // One lock holder at a time.
    let lock = store.lock().unwrap();
    assert!(lock.taken_over().is_none());
    let err = store.lock().unwrap_err().to_string();
    assert!(err.contains("is locked by another blockstream process"), "{err}");
    drop(lock);
    drop(store.lock().unwrap());
}

#[test]
fn memory_store_keeps_the_contract() {
    use super::memory::MemoryStore;
    let store = MemoryStore::new("contract");
    contract(&store);
    // Memory only: a created object appears when finished, not before.
    let mut w = store.create("x/y").unwrap();
    w.write_all(b"partial").unwrap();
    assert!(store.read("x/y", 100).unwrap_err().is_not_found());
    w.finish().unwrap();
    assert_eq!(store.read("x/y", 100).unwrap(), b"partial");
}

#[test]
fn posix_store_keeps_the_contract() {
    use super::posix::PosixStore;
    use std::os::unix::fs::MetadataExt;
    let root = std::env::temp_dir().join(format!("bs-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let store = PosixStore::new(&root.join("repo"));
    contract(&store);
    // Modes whatever the umask, no symbolic link followed.
    // SAFETY: umask(2) only changes this process's file mode creation mask.
    let old = unsafe { libc::umask(0) };
    store.put("deep/er/file", b"x").unwrap();
    unsafe { libc::umask(old) };
    let repo = root.join("repo");
    assert_eq!(std::fs::metadata(repo.join("deep/er")).unwrap().mode() & 0o777, 0o750);
    assert_eq!(std::fs::metadata(repo.join("deep/er/file")).unwrap().mode() & 0o777, 0o640);
    std::os::unix::fs::symlink("/etc", repo.join("etc")).unwrap();
    let err = store.read("etc/hostname", 1 << 20).unwrap_err().to_string();
    assert!(err.contains("is refused"), "{err}");
    assert!(store.list("etc").unwrap_err().to_string().contains("is refused"));
    assert!(store.put("etc/x", b"x").unwrap_err().to_string().contains("is not a directory"));
    let entries = store.list("").unwrap();
    assert_eq!(entries.iter().find(|e| e.name == "etc").map(|e| e.kind), Some(Kind::Other));
    std::fs::remove_dir_all(&root).unwrap();
}
