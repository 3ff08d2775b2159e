//! Read-only memory maps of live data files that survive concurrent truncation.
//!
//! PostgreSQL truncates relation files while a backup runs (VACUUM truncation,
//! DROP, TRUNCATE). Touching a mapped page that lies past the new end of file
//! raises SIGBUS, which would kill the process. This module installs one
//! process-wide SIGBUS handler and keeps a lock-free table of the address
//! ranges it guards. When a fault lands inside a guarded range, the handler
//! maps anonymous zero pages over the rest of that range (`MAP_FIXED`) and
//! flags the range; the faulting instruction is then retried and reads zeros.
//! Faults anywhere else go to the handler that was installed before ours
//! (Rust's own stack-overflow handler, or the default action), so a real bug
//! still crashes.
//!
//! Invariant for callers: the bytes of a [`GuardedMap`] are the file's bytes at
//! some moment during the read, except that a range flagged by
//! [`GuardedMap::truncated`] may read as zeros from the fault onwards. For a
//! backup both are harmless: pages changed or truncated after the backup's
//! start LSN are rewritten by WAL replay (full-page writes are forced during a
//! backup, and the truncation itself is WAL-logged), and the copy is marked
//! truncated in the manifest.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;

use memmap2::{Mmap, MmapOptions};

const SLOTS: usize = 512;

struct Slot {
    claimed: AtomicBool,
    start: AtomicUsize,
    end: AtomicUsize,
    hit: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY_SLOT: Slot = Slot {
    claimed: AtomicBool::new(false),
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    hit: AtomicBool::new(false),
};

static REGISTRY: [Slot; SLOTS] = [EMPTY_SLOT; SLOTS];
static PAGE_SIZE: AtomicUsize = AtomicUsize::new(4096);
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// Installs the SIGBUS handler once per process.
fn install() -> io::Result<()> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let r = INSTALLED.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if page > 0 {
            PAGE_SIZE.store(page as usize, Ordering::Relaxed);
        }
        // SAFETY: a zeroed sigaction is a valid value to fill in; sigaction(2)
        // reads `new` and writes `old`, both valid for the call. PREVIOUS is
        // set before our handler can run, so the handler always finds it.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) != 0 {
                return Err(io::Error::last_os_error().raw_os_error().unwrap_or(0));
            }
            let _ = PREVIOUS.set(old);
            let mut new: libc::sigaction = std::mem::zeroed();
            new.sa_sigaction = on_sigbus as *const () as usize;
            new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut new.sa_mask);
            if libc::sigaction(libc::SIGBUS, &new, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error().raw_os_error().unwrap_or(0));
            }
        }
        Ok(())
    });
    r.map_err(io::Error::from_raw_os_error)
}

/// The SIGBUS handler. Uses only atomics and mmap(2), both safe in a signal handler.
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    let page = PAGE_SIZE.load(Ordering::Relaxed);
    for slot in REGISTRY.iter() {
        let start = slot.start.load(Ordering::Acquire);
        if start == 0 {
            continue;
        }
        let end = slot.end.load(Ordering::Acquire);
        if addr >= start && addr < end {
            let from = addr & !(page - 1);
            // SAFETY: [from, end) lies inside a mapping owned by a live
            // GuardedMap (the slot is cleared before it unmaps); replacing it
            // with private zero pages keeps it mapped and readable.
            let p = unsafe {
                libc::mmap(
                    from as *mut libc::c_void,
                    end - from,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                slot.hit.store(true, Ordering::Release);
                return;
            }
            break;
        }
    }
    // Not ours: hand it on.
    // SAFETY: PREVIOUS holds the disposition that was installed before ours;
    // calling its handler with the same arguments is what the kernel would have done.
    unsafe {
        match PREVIOUS.get() {
            Some(prev) if prev.sa_sigaction != libc::SIG_DFL && prev.sa_sigaction != libc::SIG_IGN => {
                if prev.sa_flags & libc::SA_SIGINFO != 0 {
                    let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                        std::mem::transmute(prev.sa_sigaction);
                    f(sig, info, ctx);
                } else {
                    let f: extern "C" fn(libc::c_int) = std::mem::transmute(prev.sa_sigaction);
                    f(sig);
                }
            }
            _ => {
                // Restore the default action; returning retries the access,
                // which faults again and terminates the process as usual.
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
    }
}

/// A read-only map of `len` bytes at `offset` of a file that may shrink while it is read.
pub struct GuardedMap {
    map: Option<Mmap>,
    slot: usize,
}

impl GuardedMap {
    /// Maps `len` bytes of `file` from `offset` (a multiple of the page size).
    /// The range may extend past the end of the file: that part reads as zeros
    /// and sets [`GuardedMap::truncated`].
    pub fn map(file: &File, offset: u64, len: usize) -> io::Result<GuardedMap> {
        assert!(len > 0, "an empty range needs no map");
        install()?;
        let slot = claim_slot()?;
        // SAFETY: the file is a live PostgreSQL data file that other processes
        // may write or truncate while it is mapped. Concurrent writes can only
        // change the bytes we copy (torn pages, fixed by WAL replay, see the
        // module comment); truncation is made harmless by the SIGBUS guard,
        // which is registered below before any byte of the map is touched.
        // The bytes are only copied and hashed, never trusted as structure.
        let map = unsafe { MmapOptions::new().offset(offset).len(len).populate().map(file) };
        let map = match map {
            Ok(m) => m,
            Err(e) => {
                REGISTRY[slot].claimed.store(false, Ordering::Release);
                return Err(e);
            }
        };
        let _ = map.advise(memmap2::Advice::Sequential);
        let s = &REGISTRY[slot];
        s.hit.store(false, Ordering::Relaxed);
        s.end.store(map.as_ptr() as usize + map.len(), Ordering::Release);
        s.start.store(map.as_ptr() as usize, Ordering::Release);
        Ok(GuardedMap { map: Some(map), slot })
    }

    pub fn data(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// True when part of the range lay past the end of the file when it was read.
    pub fn truncated(&self) -> bool {
        REGISTRY[self.slot].hit.load(Ordering::Acquire)
    }
}

impl Drop for GuardedMap {
    fn drop(&mut self) {
        let s = &REGISTRY[self.slot];
        // Stop guarding before the range is unmapped and can be reused by anyone.
        s.start.store(0, Ordering::Release);
        s.end.store(0, Ordering::Release);
        drop(self.map.take());
        s.claimed.store(false, Ordering::Release);
    }
}

fn claim_slot() -> io::Result<usize> {
    for (i, s) in REGISTRY.iter().enumerate() {
        if s.claimed.compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            return Ok(i);
        }
    }
    Err(io::Error::other(format!("more than {SLOTS} guarded maps are open at once")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp_file(name: &str, pages: usize) -> (std::path::PathBuf, File) {
        let path = std::env::temp_dir().join(format!("bs-guard-{name}-{}", std::process::id()));
        let mut f = File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        for i in 0..pages {
            f.write_all(&vec![(i % 250 + 1) as u8; 4096]).unwrap();
        }
        (path, f)
    }

    #[test]
    fn truncation_after_mapping_reads_zeros_and_is_flagged() {
        let (path, f) = temp_file("after", 64);
        let m = GuardedMap::map(&f, 0, 64 * 4096).unwrap();
        f.set_len(10 * 4096).unwrap();
        let data = m.data().to_vec(); // would be SIGBUS without the guard
        assert!(m.truncated());
        assert!(data[..10 * 4096].iter().enumerate().all(|(i, &b)| b == (i / 4096 % 250 + 1) as u8));
        assert!(data[10 * 4096..].iter().all(|&b| b == 0));
        drop(m);
        // The slot is free again and a clean read is not flagged.
        let m = GuardedMap::map(&f, 0, 10 * 4096).unwrap();
        assert_eq!(m.data().len(), 10 * 4096);
        assert!(!m.truncated());
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn range_past_end_of_file_reads_zeros() {
        let (path, f) = temp_file("past", 2);
        let m = GuardedMap::map(&f, 0, 8 * 4096).unwrap();
        assert!(m.data()[2 * 4096..].iter().all(|&b| b == 0));
        assert!(m.truncated());
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn concurrent_truncation_never_crashes() {
        let (path, f) = temp_file("concurrent", 256);
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    f.set_len(if n.is_multiple_of(2) { 4096 * (n % 200) } else { 256 * 4096 }).unwrap();
                    n += 1;
                }
            });
            let mut flagged = 0;
            for _ in 0..300 {
                let m = GuardedMap::map(&f, 0, 256 * 4096).unwrap();
                let sum: u64 = m.data().iter().map(|&b| b as u64).sum();
                std::hint::black_box(sum);
                flagged += m.truncated() as u32;
            }
            stop.store(true, Ordering::Relaxed);
            assert!(flagged > 0, "the truncating thread never caught a reader");
        });
        std::fs::remove_file(path).unwrap();
    }
}
