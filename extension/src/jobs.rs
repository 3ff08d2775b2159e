//! Backups run from SQL: `blocktrack.run_backup` starts a dynamic background
//! worker that runs the blockstream engine, so a pg_cron job needs no
//! command line, no password and no shell.
//!
//! The worker connects as the calling role to the calling database, so the
//! role's own privileges apply to `pg_backup_start`. The engine runs on its
//! own thread (all asynchronous signals blocked, as in [`crate::engine`]);
//! whenever it needs the server (start, changed blocks, stop) it sends a
//! request over a channel and the worker's main thread, the only one that
//! runs PostgreSQL code, answers it inside a transaction. Between requests
//! the main thread publishes progress into the job's slot and watches for a
//! cancel: `pg_cancel_backend` or `pg_terminate_backend` on the worker, or
//! `blocktrack.cancel_backup()`. A cancelled or failed backup is abandoned
//! cleanly: the engine stops and removes what it wrote, the repository lock
//! is released, and `pg_backup_stop` is called.

use std::sync::Arc;
use std::time::Duration;

use blockstream::backup::{
    run_backup, BackupMode, BackupOptions, BackupSession, ParentRef, ServerInfo, StartInfo, StopInfo,
};
use blockstream::codec::Compression;
use blockstream::copy::CopyConfig;
use blockstream::lsn::Lsn;
use blockstream::plan::ChangedSegment;
use blockstream::progress::Progress;
use crossbeam_channel::{bounded, Receiver, Sender};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::pg_sys;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;

use crate::errors::raise;
use crate::paths;
use crate::progress::{self as jobs, Slot, DONE, FAILED, KIND_BACKUP, RUNNING, SOURCE_SQL, STARTING};
use crate::{backup_session, tracking};

/// What the engine thread asks of the server.
enum Request {
    ServerInfo,
    Start { label: String, fast: bool, parent: Option<ParentRef> },
    Changed { since: Lsn, until: Lsn, timeline: u32 },
    Stop,
}

enum Response {
    ServerInfo(blockstream::Result<ServerInfo>),
    Start(blockstream::Result<StartInfo>),
    Changed(blockstream::Result<Vec<ChangedSegment>>),
    Stop(blockstream::Result<StopInfo>),
}

/// The engine's side of the session: every call is a round trip to the
/// worker's main thread.
struct ChannelSession {
    tx: Sender<Request>,
    rx: Receiver<Response>,
}

fn gone() -> blockstream::Error {
    blockstream::Error::Server("the background worker stopped answering".into())
}

impl BackupSession for ChannelSession {
    fn server_info(&mut self) -> blockstream::Result<ServerInfo> {
        self.tx.send(Request::ServerInfo).map_err(|_| gone())?;
        match self.rx.recv().map_err(|_| gone())? {
            Response::ServerInfo(r) => r,
            _ => Err(gone()),
        }
    }

    fn start(&mut self, label: &str, fast: bool, parent: Option<ParentRef>) -> blockstream::Result<StartInfo> {
        self.tx.send(Request::Start { label: label.into(), fast, parent }).map_err(|_| gone())?;
        match self.rx.recv().map_err(|_| gone())? {
            Response::Start(r) => r,
            _ => Err(gone()),
        }
    }

    fn changed_blocks(&mut self, since: Lsn, until: Lsn, timeline: u32) -> blockstream::Result<Vec<ChangedSegment>> {
        self.tx.send(Request::Changed { since, until, timeline }).map_err(|_| gone())?;
        match self.rx.recv().map_err(|_| gone())? {
            Response::Changed(r) => r,
            _ => Err(gone()),
        }
    }

    fn stop(&mut self) -> blockstream::Result<StopInfo> {
        self.tx.send(Request::Stop).map_err(|_| gone())?;
        match self.rx.recv().map_err(|_| gone())? {
            Response::Stop(r) => r,
            _ => Err(gone()),
        }
    }
}

/// Runs `f` in a transaction of this worker; a PostgreSQL ERROR becomes Err
/// (the transaction is aborted and the error state cleared).
fn in_transaction<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    // SAFETY: the standard sequence for a background worker connected to a
    // database: a transaction with an active snapshot around SPI work.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let r = PgTryBuilder::new(std::panic::AssertUnwindSafe(|| Ok(f())))
        .catch_others(|e| {
            Err(match &e {
                CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => r.message().to_string(),
                CaughtError::RustPanic { ereport, .. } => ereport.message().to_string(),
            })
        })
        .execute();
    // SAFETY: as above; after an error the transaction is aborted, as
    // PostgreSQL's own error recovery does.
    unsafe {
        match &r {
            Ok(_) => {
                pg_sys::PopActiveSnapshot();
                pg_sys::CommitTransactionCommand();
            }
            Err(_) => {
                pg_sys::FlushErrorState();
                pg_sys::AbortCurrentTransaction();
            }
        }
    }
    r
}

fn server(e: String) -> blockstream::Error {
    blockstream::Error::Server(e)
}

/// Answers one request of the engine, in a transaction of this worker.
fn answer(req: Request) -> Response {
    match req {
        Request::ServerInfo => Response::ServerInfo(Ok(ServerInfo {
            // SAFETY: plain reads of the control data and server settings.
            system_identifier: unsafe { pg_sys::GetSystemIdentifier() },
            pg_version_num: pg_sys::PG_VERSION_NUM,
            wal_segment_size: unsafe { pg_sys::wal_segment_size } as u64,
            block_size: pg_sys::BLCKSZ,
        })),
        Request::Start { label, fast, parent } => Response::Start(
            in_transaction(|| {
                let s = backup_session::start(Some(&label), fast);
                let p = parent.map(|p| tracking::Parent {
                    start: p.start_lsn,
                    timeline: Some(p.timeline),
                    stop: Some(p.stop_lsn),
                    checkpoint: p.checkpoint,
                });
                let start = Lsn::from(s.start_lsn);
                let (ok, reason) = tracking::incremental_check(p, start, s.start_tli as u32, Duration::from_secs(60));
                StartInfo {
                    start_lsn: start,
                    timeline: s.start_tli as u32,
                    // SAFETY: a plain read of the control data.
                    system_identifier: unsafe { pg_sys::GetSystemIdentifier() },
                    data_checksums: s.data_checksums,
                    incremental_ok: ok,
                    reason: (!ok).then_some(reason),
                }
            })
            .map_err(server),
        ),
        Request::Changed { since, until, timeline } => Response::Changed(
            in_transaction(|| {
                tracking::wait_for_summary(until, Duration::from_secs(60))?;
                let (table, _) = tracking::changes_between(since, until, Some(timeline))
                    .map_err(|why| format!("changed blocks from {since} to {until} are not known: {why}"))?;
                Ok::<_, String>(
                    tracking::segment_rows(&table)
                        .into_iter()
                        .map(|r| ChangedSegment {
                            path: r.path,
                            relfilenode: (r.rel != 0).then_some(r.rel),
                            fork: r.fork,
                            segno: r.segno,
                            limit_block: r.limit_block,
                            full_copy: r.full_copy,
                            blocks: r.blocks,
                        })
                        .collect(),
                )
            })
            .and_then(|r| r)
            .map_err(server),
        ),
        Request::Stop => Response::Stop(
            in_transaction(|| {
                let s = backup_session::stop(false);
                StopInfo {
                    stop_lsn: Lsn::from(s.stop_lsn),
                    timeline: s.stop_tli as u32,
                    backup_label: s.labelfile,
                    tablespace_map: s.spcmapfile,
                    checkpoint_crc: s.checkpoint.map(|(_, c)| c),
                }
            })
            .map_err(server),
        ),
    }
}

/// Whether the worker was asked to stop: a query cancel (SIGINT), SIGTERM,
/// or `cancel_backup()`.
fn stop_requested(slot: usize) -> bool {
    // SAFETY: flags set by PostgreSQL's signal handlers; cleared here, so
    // that no later CHECK_FOR_INTERRUPTS turns the cancel into an ERROR that
    // would skip the clean-up.
    let cancel = unsafe {
        let c = pg_sys::QueryCancelPending != 0;
        pg_sys::QueryCancelPending = 0;
        c
    };
    cancel || BackgroundWorker::sigterm_received() || jobs::JOBS.share().slots[slot].cancel
}

fn set_outcome(slot: usize, state: u8, id: Option<&str>, message: &str) {
    let mut all = jobs::JOBS.exclusive();
    let s = &mut all.slots[slot];
    s.state = state;
    if let Some(id) = id {
        jobs::put(&mut s.backup_id, id);
    }
    jobs::put(&mut s.message, message);
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn blocktrack_job_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let slot = arg.value();
    if slot >= jobs::SLOTS {
        return;
    }
    let req: Slot = jobs::JOBS.share().slots[slot];
    BackgroundWorker::connect_worker_to_spi_by_oid(
        Some(pg_sys::Oid::from(req.dboid)),
        Some(pg_sys::Oid::from(req.roleoid)),
    );
    {
        let mut all = jobs::JOBS.exclusive();
        let s = &mut all.slots[slot];
        // SAFETY: this process's own pid.
        s.pid = unsafe { pg_sys::MyProcPid };
        s.state = RUNNING;
    }
    let outcome = run_backup_job(slot, &req);
    // A backup left running in this session (failed or cancelled) is stopped.
    let abandoned = in_transaction(|| {
        // SAFETY: reads this session's backup state.
        if unsafe { pg_sys::get_backup_status() } == pg_sys::SessionBackupState::SESSION_BACKUP_RUNNING {
            // Read-only SPI: a standby cannot assign the transaction id a
            // modifying SPI call takes.
            backup_session::select("SELECT pg_backup_stop(false)", &[]).is_ok()
        } else {
            false
        }
    });
    match outcome {
        Ok(id) => set_outcome(slot, DONE, Some(&id), &format!("backup {id} done")),
        Err(msg) => {
            let msg = match abandoned {
                Ok(true) => format!("{msg} (the backup was abandoned: pg_backup_stop called, nothing listed)"),
                _ => msg,
            };
            set_outcome(slot, FAILED, None, &msg);
        }
    }
}

/// Runs the backup of `req` on an engine thread, serving its requests.
fn run_backup_job(slot: usize, req: &Slot) -> Result<String, String> {
    let compression: Compression = jobs::get(&req.compress).parse().map_err(|e: blockstream::Error| e.to_string())?;
    // SAFETY: DataDir is set before any worker runs.
    let pgdata = unsafe { std::ffi::CStr::from_ptr(pg_sys::DataDir) }.to_string_lossy().into_owned();
    let opts = BackupOptions {
        pgdata: pgdata.into(),
        repo: blockstream::storage::at(std::path::Path::new(&jobs::get(&req.repo))).map_err(|e| e.to_string())?,
        jobs: req.jobs as usize,
        copy: CopyConfig { compression, ..CopyConfig::default() },
        encryption: paths::key_from(req.key_kind, &jobs::get(&req.key_file)).map_err(|e| e.to_string())?,
        merge_of: None,
        label: Some("blocktrack.run_backup".into()),
        fast: true,
        mode: match req.mode {
            b'f' => BackupMode::Full,
            b'i' => BackupMode::Incr,
            b'd' => BackupMode::Diff,
            _ => BackupMode::Auto,
        },
        no_fallback: false,
        verify_checksums: true,
        allow_checksum_failures: false,
    };
    let progress = Arc::new(Progress::default());
    let (req_tx, req_rx) = bounded::<Request>(1);
    let (resp_tx, resp_rx) = bounded::<Response>(1);
    let engine_progress = progress.clone();
    let handle = crate::engine::spawn(move || {
        let mut session = ChannelSession { tx: req_tx, rx: resp_rx };
        run_backup(&opts, &mut session, &engine_progress).map(|m| m.backup_id).map_err(|e| e.to_string())
    });
    let mut cancelled = false;
    loop {
        match req_rx.recv_timeout(Duration::from_millis(100)) {
            Ok(r) => {
                let _ = resp_tx.send(answer(r));
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
        }
        jobs::update(slot, &progress.report());
        if !cancelled && stop_requested(slot) {
            cancelled = true;
            progress.cancel();
        }
        // SAFETY: resets this process's latch, set by the signal handlers.
        unsafe { pg_sys::ResetLatch(pg_sys::MyLatch) };
    }
    let result = handle.join().unwrap_or_else(|_| Err("the engine thread panicked".into()));
    match result {
        Err(_) if cancelled => Err("canceled".into()),
        r => r,
    }
}

/// `blocktrack.run_backup`: checks, claims a job slot, starts the worker,
/// and (with `wait`) waits for it. Returns the backup id, or NULL without `wait`.
pub fn run(repo: Option<&str>, kind: &str, jobs_n: i32, compress: &str, wait: bool) -> Option<String> {
    let root = paths::check_repository(repo, paths::Access::Write);
    let mode = match kind {
        "full" => b'f',
        "incr" => b'i',
        "diff" => b'd',
        "auto" => b'a',
        _ => raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("backup type \"{kind}\" is not one of full, incr, diff, auto"),
            None,
        ),
    };
    if !(1..=64).contains(&jobs_n) {
        raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("jobs must be 1 to 64, got {jobs_n}"), None);
    }
    if let Err(e) = compress.parse::<Compression>() {
        raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, e.to_string(), None);
    }
    let root_s = root.display().to_string();
    if root_s.len() >= 1024 {
        raise(PgSqlErrorCode::ERRCODE_NAME_TOO_LONG, format!("repository path \"{root_s}\" is too long"), None);
    }
    // The key setting of this session, read here (the worker sees only the server's settings).
    let (key_kind, key_path) = paths::key_setting();
    if key_path.len() >= 1024 {
        raise(PgSqlErrorCode::ERRCODE_NAME_TOO_LONG, format!("key file path \"{key_path}\" is too long"), None);
    }
    // SAFETY: plain reads of this backend's identity.
    let (me, dboid, roleoid) = unsafe { (pg_sys::MyProcPid, pg_sys::MyDatabaseId, pg_sys::GetUserId()) };
    let slot = jobs::claim(|s| {
        s.state = STARTING;
        s.kind = KIND_BACKUP;
        s.source = SOURCE_SQL;
        s.requester = me;
        s.dboid = dboid.into();
        s.roleoid = roleoid.into();
        s.mode = mode;
        s.jobs = jobs_n as u32;
        jobs::put(&mut s.compress, compress);
        jobs::put(&mut s.repo, &root_s);
        s.key_kind = key_kind;
        jobs::put(&mut s.key_file, &key_path);
        jobs::put(&mut s.phase, "starting");
    })
    .unwrap_or_else(|| {
        raise(
            PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            format!("all {} job slots are busy", jobs::SLOTS),
            Some("wait for running backups to finish"),
        )
    });
    let worker = BackgroundWorkerBuilder::new("pg_blocktrack backup")
        .set_type("pg_blocktrack backup")
        .set_library("pg_blocktrack")
        .set_function("blocktrack_job_main")
        .set_argument(Some(pg_sys::Datum::from(slot)))
        .enable_spi_access()
        // After enable_spi_access, which sets RecoveryFinished: a job runs on
        // a hot standby too (a backup from the standby, from pg_cron there).
        .set_start_time(BgWorkerStartTime::ConsistentState)
        .set_restart_time(None)
        .set_notify_pid(me)
        .load_dynamic();
    let worker = match worker {
        Ok(w) => w,
        Err(e) => {
            jobs::JOBS.exclusive().slots[slot].state = jobs::FREE;
            raise(
                PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
                format!("could not start a background worker: {e:?}"),
                Some("raise max_worker_processes"),
            )
        }
    };
    if worker.wait_for_startup().is_err() {
        jobs::JOBS.exclusive().slots[slot].state = jobs::FREE;
        raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, "the backup worker did not start", None);
    }
    if !wait {
        return None;
    }
    // Wait for the outcome; a cancel of this session cancels the backup.
    loop {
        let (state, id, msg) = {
            let all = jobs::JOBS.share();
            let s = &all.slots[slot];
            (s.state, jobs::get(&s.backup_id), jobs::get(&s.message))
        };
        if state == DONE || state == FAILED {
            jobs::JOBS.exclusive().slots[slot].state = jobs::FREE;
            if state == FAILED {
                raise(PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, format!("backup failed: {msg}"), None);
            }
            return Some(id);
        }
        // SAFETY: flags set by PostgreSQL's signal handlers.
        if unsafe { pg_sys::InterruptPending != 0 && (pg_sys::QueryCancelPending != 0 || pg_sys::ProcDiePending != 0) }
        {
            jobs::JOBS.exclusive().slots[slot].cancel = true;
            check_for_interrupts!();
        }
        // SAFETY: waiting on our own latch (the worker's exit sets it too: notify_pid).
        unsafe {
            pg_sys::WaitLatch(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                100,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
    }
}

/// `blocktrack.cancel_backup(pid)`: asks running jobs (all, or the one of
/// `pid`) to stop; workers also get a query cancel. Returns how many.
pub fn cancel(pid: Option<i32>) -> i64 {
    let mut n = 0;
    let mut signal = Vec::new();
    {
        let mut all = jobs::JOBS.exclusive();
        for s in all.slots.iter_mut().filter(|s| s.active()) {
            if pid.is_none_or(|p| p == s.pid) {
                s.cancel = true;
                n += 1;
                if s.source == SOURCE_SQL && s.pid != 0 {
                    signal.push(s.pid);
                }
            }
        }
    }
    for p in signal {
        // SAFETY: SIGINT to a background worker of this server, as pg_cancel_backend sends.
        unsafe { libc::kill(p, libc::SIGINT) };
    }
    n
}
