//! Progress shared between engine threads and whoever displays it.
//!
//! Workers add bytes and files with relaxed atomics; a display thread (the
//! CLI's progress bar and its report to the server's `blocktrack.progress`
//! view, or the extension's background worker) polls [`Progress::report`].
//! Setting `cancel` makes the engine stop at the next piece or chunk and
//! return an error.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crate::error::{Error, Result};

#[derive(Default)]
pub struct Progress {
    total: AtomicU64,
    done: AtomicU64,
    files_total: AtomicU64,
    files_done: AtomicU64,
    streams: AtomicU64,
    phase: Mutex<String>,
    /// When the first phase began, and when the current one did.
    began: Mutex<Option<(Instant, Instant)>>,
    cancel: AtomicBool,
    warnings: Mutex<Vec<String>>,
}

/// Where an operation stands.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    pub phase: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub files_done: u64,
    pub files_total: u64,
    pub streams: u64,
    /// Seconds since the operation began, and since its phase began.
    pub elapsed_secs: f64,
    pub phase_secs: f64,
}

impl Report {
    /// MiB per second in the current phase.
    pub fn mib_per_sec(&self) -> f64 {
        self.bytes_done as f64 / (1 << 20) as f64 / self.phase_secs.max(1e-3)
    }

    /// Seconds left in the current phase at its rate so far, when known.
    pub fn remaining_secs(&self) -> Option<f64> {
        (self.bytes_done > 0 && self.bytes_total >= self.bytes_done)
            .then(|| (self.bytes_total - self.bytes_done) as f64 * self.phase_secs / self.bytes_done as f64)
    }
}

impl Progress {
    /// Starts a new phase of `total` bytes.
    pub fn start_phase(&self, phase: &str, total: u64) {
        *self.phase.lock().unwrap() = phase.to_string();
        self.done.store(0, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
        self.files_done.store(0, Ordering::Relaxed);
        self.files_total.store(0, Ordering::Relaxed);
        let now = Instant::now();
        let mut b = self.began.lock().unwrap();
        *b = Some((b.map_or(now, |(first, _)| first), now));
    }

    pub fn add(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }

    /// More files for the current phase to handle.
    pub fn add_files(&self, n: u64) {
        self.files_total.fetch_add(n, Ordering::Relaxed);
    }

    pub fn file_done(&self) {
        self.files_done.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_streams(&self, n: u64) {
        self.streams.store(n, Ordering::Relaxed);
    }

    /// (phase, bytes done, bytes total)
    pub fn snapshot(&self) -> (String, u64, u64) {
        (self.phase.lock().unwrap().clone(), self.done.load(Ordering::Relaxed), self.total.load(Ordering::Relaxed))
    }

    /// Everything known about where the operation stands.
    pub fn report(&self) -> Report {
        let (phase, bytes_done, bytes_total) = self.snapshot();
        let (elapsed_secs, phase_secs) =
            self.began.lock().unwrap().map_or((0.0, 0.0), |(first, current)| {
                (first.elapsed().as_secs_f64(), current.elapsed().as_secs_f64())
            });
        Report {
            phase,
            bytes_done,
            bytes_total,
            files_done: self.files_done.load(Ordering::Relaxed),
            files_total: self.files_total.load(Ordering::Relaxed),
            streams: self.streams.load(Ordering::Relaxed),
            elapsed_secs,
            phase_secs,
        }
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

    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    pub fn check_cancel(&self) -> Result<()> {
        if self.cancel.load(Ordering::Relaxed) {
            Err(Error::Conflict("canceled".into()))
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_rates_and_estimates() {
        let p = Progress::default();
        assert_eq!(p.report().phase, "");
        p.start_phase("copy", 1000);
        p.add_files(4);
        p.set_streams(2);
        p.add(250);
        p.file_done();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let r = p.report();
        assert_eq!((r.bytes_done, r.bytes_total, r.files_done, r.files_total, r.streams), (250, 1000, 1, 4, 2));
        let left = r.remaining_secs().unwrap();
        assert!(left > 2.5 * r.phase_secs && left < 3.5 * r.phase_secs, "{left} vs {}", r.phase_secs);
        p.start_phase("wal", 10);
        let r = p.report();
        assert!(r.elapsed_secs >= r.phase_secs && r.files_total == 0);
    }
}
