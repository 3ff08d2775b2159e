//! Running the blockstream engine inside a backend.
//!
//! Engine threads must never run PostgreSQL code or take PostgreSQL's
//! signals, so the engine runs on a thread spawned with every asynchronous
//! signal blocked (its own worker threads inherit the mask). Synchronous
//! fault signals stay unblocked: the kernel would turn a blocked SIGBUS into
//! a crash, and the engine's memory-map guard handles SIGBUS itself. The
//! backend's own thread waits on its latch, answers cancel requests by
//! cancelling the engine, and alone talks to PostgreSQL.

use std::sync::Arc;
use std::time::Duration;

use blockstream::progress::Progress;
use pgrx::pg_sys;
use pgrx::prelude::*;

/// Starts `work` on an engine thread: every asynchronous signal blocked
/// (its own threads inherit the mask), so PostgreSQL's handlers only ever
/// run on the backend's thread.
pub fn spawn<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
    // SAFETY: sigset and pthread_sigmask calls on this thread's own mask,
    // restored right after the spawn.
    unsafe {
        let mut block: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut block);
        for s in [libc::SIGBUS, libc::SIGSEGV, libc::SIGFPE, libc::SIGILL] {
            libc::sigdelset(&mut block, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &block, &mut old);
        let h = std::thread::Builder::new().name("blockstream".into()).spawn(work);
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        h.unwrap_or_else(|e| error!("could not start an engine thread: {e}"))
    }
}

/// Runs `work` on an engine thread and waits for it, cancellable.
pub fn run<T: Send + 'static>(work: impl FnOnce(&Progress) -> T + Send + 'static) -> T {
    let progress = Arc::new(Progress::default());
    let p = progress.clone();
    let handle = spawn(move || work(&p));
    while !handle.is_finished() {
        // SAFETY: flags set by PostgreSQL's signal handlers, read as PostgreSQL's own macros do.
        let interrupted = unsafe { pg_sys::InterruptPending != 0 };
        if interrupted && unsafe { pg_sys::QueryCancelPending != 0 || pg_sys::ProcDiePending != 0 } {
            progress.cancel();
            let _ = handle.join();
            check_for_interrupts!();
            error!("canceled");
        }
        // SAFETY: waiting on our own latch, as any backend may.
        unsafe {
            pg_sys::WaitLatch(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                Duration::from_millis(50).as_millis() as std::ffi::c_long,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
    }
    match handle.join() {
        Ok(v) => v,
        Err(_) => error!("the engine thread panicked"),
    }
}
