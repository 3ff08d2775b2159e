//! The S3 driver against a real S3-compatible store: the Garage cluster
//! that `scripts/garage.sh start` runs (CI starts it and sources its env).
//! Without `AWS_ENDPOINT_URL` the tests say so and pass: they need the store.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use blockstream::storage::s3::{self, S3Config, S3Store};
use blockstream::storage::{conformance, Store};

fn config(name: &str) -> Option<S3Config> {
    if std::env::var_os("AWS_ENDPOINT_URL").is_none() {
        eprintln!("skipped: no S3 store (run scripts/garage.sh start and source /tmp/blockstream-garage/env)");
        return None;
    }
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    let url = format!("s3://blockstream/tests/{name}-{}-{nanos}", std::process::id());
    Some(S3Config::from_url(&url).unwrap())
}

#[test]
fn s3_store_keeps_the_contract() {
    let Some(c) = config("contract") else { return };
    let store = S3Store::new(&c).unwrap();
    conformance::contract(&store);
    assert!(store.location().starts_with("s3://blockstream/tests/contract-"));
}

#[test]
fn multipart_objects_read_back_by_range_with_one_part_in_flight() {
    let Some(c) = config("multipart") else { return };
    let store = S3Store::new(&c).unwrap();
    // 20 MiB in 100 KiB writes: three parts (8 + 8 + 4 MiB).
    let data: Vec<u8> = (0..20u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let mut w = store.create("backups/x/stream-00.bsz").unwrap();
    for piece in data.chunks(100 << 10) {
        w.write_all(piece).unwrap();
    }
    w.finish().unwrap();
    // Process-wide; the contract test's small objects may add a few bytes.
    let peak = s3::peak_bytes_in_flight();
    assert!(peak <= s3::FIRST_PART as u64 + 1024, "one writer held {peak} bytes");
    let r = store.open("backups/x/stream-00.bsz").unwrap();
    assert_eq!(r.len(), data.len() as u64);
    // A range across the first part boundary, and the last bytes.
    let mut buf = vec![0u8; 1 << 20];
    let at = (8u64 << 20) - 4096;
    r.read_exact_at(&mut buf, at).unwrap();
    assert_eq!(buf, &data[at as usize..at as usize + buf.len()]);
    let mut tail = [0u8; 7];
    r.read_exact_at(&mut tail, data.len() as u64 - 7).unwrap();
    assert_eq!(&tail, &data[data.len() - 7..]);
    assert!(store.incomplete_uploads().unwrap().is_empty());
    store.remove_prefix("backups").unwrap();
    let left = store.list("").unwrap();
    assert!(left.is_empty(), "{left:?}");

    // (In the same test: the in-flight figure above is process-wide.)
    an_upload_left_by_a_dead_writer_is_listed_and_aborted(&store);
}

fn an_upload_left_by_a_dead_writer_is_listed_and_aborted(store: &S3Store) {
    let mut w = store.create("backups/y/stream-00.bsz").unwrap();
    w.write_all(&vec![7u8; s3::FIRST_PART + 10]).unwrap();
    // The writer's process "dies": no finish, no abort.
    std::mem::forget(w);
    let left = store.incomplete_uploads().unwrap();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].key, "backups/y/stream-00.bsz");
    assert!(store.read("backups/y/stream-00.bsz", 1 << 30).unwrap_err().is_not_found());
    store.abort_upload(&left[0]).unwrap();
    assert!(store.incomplete_uploads().unwrap().is_empty());

    // A writer dropped before finishing aborts its own upload.
    let mut w = store.create("backups/y/stream-01.bsz").unwrap();
    w.write_all(&vec![7u8; s3::FIRST_PART + 10]).unwrap();
    drop(w);
    assert!(store.incomplete_uploads().unwrap().is_empty());
}

#[test]
fn a_wrong_secret_key_is_a_clear_error() {
    let Some(mut c) = config("badkey") else { return };
    c.secret_access_key = "0".repeat(64);
    c.attempts = 2;
    let store = S3Store::new(&c).unwrap();
    let err = store.put("repo.json", b"{}").unwrap_err().to_string();
    assert!(err.contains("HTTP 403"), "{err}");
    assert!(err.contains("repo.json"), "{err}");
    let err = blockstream::repo::Repo::open_store(Arc::new(store)).unwrap_err().to_string();
    assert!(err.contains("HTTP 403"), "{err}");
}

#[test]
fn a_lock_whose_lease_ran_out_is_taken_over_and_a_live_one_is_not() {
    let Some(mut c) = config("lock") else { return };
    c.lock_lease = Duration::from_secs(3);
    let store = S3Store::new(&c).unwrap();
    // A holder that died: its lease ran out a minute ago.
    let expired = UNIX_EPOCH.elapsed().unwrap().as_secs() - 60;
    let body = format!(r#"{{"owner":"host db1 pid 4242","token":"dead","expires":{expired}}}"#);
    store.put("lock", body.as_bytes()).unwrap();
    let lock = store.lock().unwrap();
    assert_eq!(lock.taken_over(), Some("host db1 pid 4242"));
    // Renewed past its first lease while held.
    std::thread::sleep(Duration::from_secs(4));
    let err = store.lock().unwrap_err().to_string();
    assert!(err.contains("is locked by another blockstream process (host"), "{err}");
    drop(lock);
    assert!(store.read("lock", 1 << 10).unwrap_err().is_not_found(), "released on drop");
    drop(store.lock().unwrap());
}
