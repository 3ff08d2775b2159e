//! What the summarizer shares with backends: positions, counters, its latch
//! and its last error. Shared memory holds only this status; summary files and
//! the state file are the source of truth.

use pgrx::lwlock::PgLwLock;
use pgrx::prelude::*;
use pgrx::shmem::PGRXSharedMemory;
use pgrx::{pg_shmem_init, pg_sys};

#[derive(Copy, Clone)]
pub struct TrackerStatus {
    /// Process id of the summarizer, 0 when it is not running.
    pub pid: i32,
    pub timeline: u32,
    /// End of the last durable summary.
    pub summarized_lsn: u64,
    /// End of the last record read (summarized in memory, not yet on disk).
    pub pending_lsn: u64,
    /// Summaries are unbroken from here.
    pub valid_since: u64,
    /// A backend wants a summary ending at or after this LSN as soon as possible.
    pub flush_request: u64,
    /// The summarizer's latch (an address in shared memory), 0 when not running.
    pub latch: usize,
    pub table_memory: u64,
    pub peak_table_memory: u64,
    pub records: u64,
    pub summaries_written: u64,
    pub last_error: [u8; 256],
}

impl Default for TrackerStatus {
    fn default() -> Self {
        TrackerStatus {
            pid: 0,
            timeline: 0,
            summarized_lsn: 0,
            pending_lsn: 0,
            valid_since: 0,
            flush_request: 0,
            latch: 0,
            table_memory: 0,
            peak_table_memory: 0,
            records: 0,
            summaries_written: 0,
            last_error: [0; 256],
        }
    }
}

// SAFETY: plain old data without pointers into process-local memory (the latch
// address points into shared memory, the same in every process).
unsafe impl PGRXSharedMemory for TrackerStatus {}

pub static STATUS: PgLwLock<TrackerStatus> = unsafe { PgLwLock::new(c"pg_blocktrack_status") };

pub fn init() {
    pg_shmem_init!(STATUS);
}

impl TrackerStatus {
    pub fn set_error(&mut self, msg: &str) {
        self.last_error = [0; 256];
        let b = msg.as_bytes();
        let n = b.len().min(255);
        self.last_error[..n].copy_from_slice(&b[..n]);
    }

    pub fn error(&self) -> Option<String> {
        let n = self.last_error.iter().position(|&b| b == 0).unwrap_or(256);
        (n > 0).then(|| String::from_utf8_lossy(&self.last_error[..n]).into_owned())
    }
}

/// Wakes the summarizer (after setting `flush_request`).
pub fn wake_summarizer() {
    let latch = STATUS.share().latch;
    if latch != 0 {
        // SAFETY: the summarizer publishes its own process latch, which lives
        // in shared memory for as long as the process exists; SetLatch on a
        // latch of an exited process is harmless.
        unsafe { pg_sys::SetLatch(latch as *mut pg_sys::Latch) };
    }
}
