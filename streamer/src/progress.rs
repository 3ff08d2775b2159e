//! Progress shared between engine threads and whoever displays it.
//!
//! Workers add bytes with relaxed atomics; a display thread (the CLI's progress
//! bar, or the extension's `pgstat_progress_update_param`) polls. Setting
//! `cancel` makes the engine stop at the next piece or chunk and return an error.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::error::{Error, Result};

#[derive(Default)]
pub struct Progress {
    total: AtomicU64,
    done: AtomicU64,
    phase: Mutex<String>,
    cancel: AtomicBool,
    warnings: Mutex<Vec<String>>,
}

impl Progress {
    /// Starts a new phase of `total` bytes.
    pub fn start_phase(&self, phase: &str, total: u64) {
        *self.phase.lock().unwrap() = phase.to_string();
        self.done.store(0, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
    }

    pub fn add(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }

    /// (phase, bytes done, bytes total)
    pub fn snapshot(&self) -> (String, u64, u64) {
        (self.phase.lock().unwrap().clone(), self.done.load(Ordering::Relaxed), self.total.load(Ordering::Relaxed))
    }

    /// Records a warning for whoever runs the engine to show.
    pub fn warn(&self, msg: String) {
        self.warnings.lock().unwrap().push(msg);
    }

    /// The warnings recorded since the last call.
    pub fn take_warnings(&self) -> Vec<String> {
        std::mem::take(&mut *self.warnings.lock().unwrap())
    }

    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    pub fn check_cancel(&self) -> Result<()> {
        if self.cancel.load(Ordering::Relaxed) {
            Err(Error::Conflict("canceled".into()))
        } else {
            Ok(())
        }
    }
}
