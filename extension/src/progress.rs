//! Jobs and their progress, in shared memory: what `blocktrack.progress`
//! shows, whether a backup runs in a background worker started from SQL
//! (`run_backup`) or in the blockstream command line (which reports over its
//! session with `progress_report`), and how a job learns it is cancelled.
//!
//! A slot belongs to the backend whose pid it holds (the worker, or the CLI's
//! session backend); a slot whose backend is gone is free again.

use pgrx::lwlock::PgLwLock;
use pgrx::prelude::*;
use pgrx::shmem::PGRXSharedMemory;
use pgrx::{pg_shmem_init, pg_sys};

pub const SLOTS: usize = 16;

pub const KIND_BACKUP: u8 = 1;
pub const KIND_VERIFY: u8 = 2;
pub const KIND_RESTORE: u8 = 3;

pub const SOURCE_SQL: u8 = 1;
pub const SOURCE_CLI: u8 = 2;

pub const FREE: u8 = 0;
/// Claimed by a requester; the worker has not attached yet.
pub const STARTING: u8 = 1;
pub const RUNNING: u8 = 2;
pub const DONE: u8 = 3;
pub const FAILED: u8 = 4;

#[derive(Copy, Clone)]
pub struct Slot {
    pub state: u8,
    pub kind: u8,
    pub source: u8,
    pub cancel: bool,
    /// The backend doing the work (worker or CLI session), 0 until attached.
    pub pid: i32,
    /// The backend that asked (run_backup's caller).
    pub requester: i32,
    pub dboid: u32,
    pub roleoid: u32,
    /// Request of a backup: mode (b'f', b'i', b'd', b'a'), jobs, compression.
    pub mode: u8,
    pub jobs: u32,
    pub compress: [u8; 32],
    pub repo: [u8; 1024],
    /// The key of an encrypted repository: 0 none, 1 a passphrase file, 2 a key file.
    pub key_kind: u8,
    pub key_file: [u8; 1024],
    pub backup_id: [u8; 24],
    pub phase: [u8; 16],
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub files_done: u64,
    pub files_total: u64,
    pub streams: u32,
    pub elapsed_secs: f64,
    pub phase_secs: f64,
    /// The outcome: an error message, or what the job did.
    pub message: [u8; 512],
}

impl Default for Slot {
    fn default() -> Self {
        Slot {
            state: FREE,
            kind: 0,
            source: 0,
            cancel: false,
            pid: 0,
            requester: 0,
            dboid: 0,
            roleoid: 0,
            mode: 0,
            jobs: 0,
            compress: [0; 32],
            repo: [0; 1024],
            key_kind: 0,
            key_file: [0; 1024],
            backup_id: [0; 24],
            phase: [0; 16],
            bytes_done: 0,
            bytes_total: 0,
            files_done: 0,
            files_total: 0,
            streams: 0,
            elapsed_secs: 0.0,
            phase_secs: 0.0,
            message: [0; 512],
        }
    }
}

#[derive(Copy, Clone)]
pub struct Jobs {
    pub slots: [Slot; SLOTS],
}

impl Default for Jobs {
    fn default() -> Self {
        Jobs { slots: [Slot::default(); SLOTS] }
    }
}

// SAFETY: plain old data, no pointers.
unsafe impl PGRXSharedMemory for Jobs {}

pub static JOBS: PgLwLock<Jobs> = unsafe { PgLwLock::new(c"pg_blocktrack_jobs") };

pub fn init() {
    pg_shmem_init!(JOBS);
}

/// Copies `s` into a fixed field (cut at the field's size, on a char boundary).
pub fn put(field: &mut [u8], s: &str) {
    field.fill(0);
    let mut n = s.len().min(field.len() - 1);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    field[..n].copy_from_slice(&s.as_bytes()[..n]);
}

pub fn get(field: &[u8]) -> String {
    let n = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..n]).into_owned()
}

/// Whether a backend or worker with this pid exists.
pub fn alive(pid: i32) -> bool {
    // SAFETY: BackendPidGetProc only reads the process array under its own lock.
    pid != 0 && unsafe { !pg_sys::BackendPidGetProc(pid).is_null() }
}

impl Slot {
    /// Free, or held by a backend that is gone, or a finished job nobody waits for.
    fn reusable(&self) -> bool {
        match self.state {
            FREE => true,
            STARTING => !alive(self.requester),
            RUNNING => !alive(self.pid),
            _ => !alive(self.requester) || self.source == SOURCE_CLI,
        }
    }

    /// Running (or about to), by a backend that still exists.
    pub fn active(&self) -> bool {
        (self.state == RUNNING && alive(self.pid)) || (self.state == STARTING && alive(self.requester))
    }
}

/// Claims a slot, filled in by `fill`; None when all are busy.
pub fn claim(fill: impl FnOnce(&mut Slot)) -> Option<usize> {
    let mut jobs = JOBS.exclusive();
    let i = jobs.slots.iter().position(Slot::reusable)?;
    let mut s = Slot::default();
    fill(&mut s);
    jobs.slots[i] = s;
    Some(i)
}

/// The slot a CLI session reports into: its own, or a new one.
pub fn cli_slot(pid: i32) -> Option<usize> {
    {
        let jobs = JOBS.share();
        if let Some(i) = jobs.slots.iter().position(|s| s.source == SOURCE_CLI && s.pid == pid && s.state == RUNNING) {
            return Some(i);
        }
    }
    claim(|s| {
        s.state = RUNNING;
        s.source = SOURCE_CLI;
        s.pid = pid;
        s.requester = pid;
    })
}

/// Updates the progress of slot `i` from an engine report.
pub fn update(i: usize, r: &blockstream::progress::Report) {
    let mut jobs = JOBS.exclusive();
    let s = &mut jobs.slots[i];
    put(&mut s.phase, &r.phase);
    s.bytes_done = r.bytes_done;
    s.bytes_total = r.bytes_total;
    s.files_done = r.files_done;
    s.files_total = r.files_total;
    s.streams = r.streams as u32;
    s.elapsed_secs = r.elapsed_secs;
    s.phase_secs = r.phase_secs;
}
