//! The summarizer: a background worker that reads WAL as it is flushed and
//! writes which blocks changed into summary files.
//!
//! It reads with PostgreSQL's own xlogreader (`read_local_xlog_page_no_wait`,
//! so it notices the end of WAL and sleeps on its latch instead of spinning),
//! turns every record into block-table changes ([`crate::wal_records`]) and
//! writes the table as a summary file (`$PGDATA/pg_blocktrack/summaries`) when
//! it passes `blocktrack.max_summary_memory`, when `blocktrack.summary_interval`
//! has passed, when a backup asks for one (`flush_request`), at every WAL
//! segment switch (pg_backup_start switches segments just before the
//! checkpoint that starts a backup, so summaries begin where backups begin
//! and an incremental's range holds no change from before its parent), and
//! at shutdown.
//! After each durable summary it records the end LSN in `pg_blocktrack/state`
//! and only then advances its replication slot to it; a crash therefore
//! resumes exactly at the end of the last durable summary, with the WAL from
//! there still held.
//!
//! At start it checks what it finds: another system identifier (a data
//! directory copied from elsewhere), a timeline whose history left the
//! summarized one before the summaries end, state ahead of WAL (a restored
//! copy), a missing or invalidated slot. Each starts tracking afresh at the
//! current redo pointer and writes a gap summary over the lost range, so no
//! incremental backup can build on a parent older than the gap. A timeline
//! whose history holds the summaries (a promotion at the end of replayed
//! WAL) is no gap: they go on under it.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use blockstream::blkref::{list_summaries, write_summary, BlockRefTable, SummaryHeader, TrackerState};
use blockstream::lsn::Lsn;
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::pg_sys;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;

use crate::guc;
use crate::slot::{self, SlotState};
use crate::status::STATUS;
use crate::wal_records::{checkpoint_record, is_segment_switch, summarize_record};
use crate::walread;

pub fn register() {
    BackgroundWorkerBuilder::new("pg_blocktrack summarizer")
        .set_type("pg_blocktrack summarizer")
        .set_library("pg_blocktrack")
        .set_function("blocktrack_summarizer_main")
        .enable_spi_access()
        // After enable_spi_access, which sets RecoveryFinished: a standby
        // summarizes the WAL it replays, so backups can read from it.
        .set_start_time(BgWorkerStartTime::ConsistentState)
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

/// `$PGDATA/pg_blocktrack`.
pub fn base_dir() -> PathBuf {
    // SAFETY: DataDir is set (absolute) before any backend or worker runs.
    let dd = unsafe { std::ffi::CStr::from_ptr(pg_sys::DataDir) };
    PathBuf::from(dd.to_string_lossy().into_owned()).join("pg_blocktrack")
}

pub fn summaries_dir() -> PathBuf {
    base_dir().join("summaries")
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn blocktrack_summarizer_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // Shared catalogs only: the summarizer needs no database.
    BackgroundWorker::connect_worker_to_spi(None, None);
    {
        let mut st = STATUS.exclusive();
        // SAFETY: MyProcPid and MyLatch belong to this process; the latch is in shared memory.
        unsafe {
            st.pid = pg_sys::MyProcPid;
            st.latch = pg_sys::MyLatch as usize;
        }
    }
    PgTryBuilder::new(run)
        .catch_others(|e| {
            let msg = match &e {
                CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => r.message().to_string(),
                CaughtError::RustPanic { ereport, .. } => ereport.message().to_string(),
            };
            let mut st = STATUS.exclusive();
            st.set_error(&msg);
            st.pid = 0;
            st.latch = 0;
            drop(st);
            e.rethrow()
        })
        .execute();
    let mut st = STATUS.exclusive();
    st.pid = 0;
    st.latch = 0;
}

enum Stop {
    Shutdown,
    Disabled,
    /// Start over (the slot was lost under us): the next start records the gap.
    Restart,
}

fn run() {
    loop {
        while !guc::ENABLED.get() {
            if !BackgroundWorker::wait_latch(Some(Duration::from_secs(1))) {
                return;
            }
            reload_config();
        }
        let mut s = Summarizer::open();
        match s.follow() {
            Stop::Shutdown => {
                s.flush();
                return;
            }
            Stop::Disabled => {
                s.flush();
                slot::drop_if_exists(&s.slot);
                log!("pg_blocktrack: tracking disabled at {}: the slot is dropped", s.next);
            }
            Stop::Restart => {}
        }
    }
}

fn reload_config() {
    if BackgroundWorker::sighup_received() {
        // SAFETY: the standard way for a background worker to re-read the configuration.
        unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
    }
}

struct Summarizer {
    slot: String,
    system_identifier: u64,
    timeline: u32,
    reader: *mut pg_sys::XLogReaderState,
    private: *mut pg_sys::ReadLocalXLogPageNoWaitPrivate,
    table: BlockRefTable,
    /// Start of the summary being built.
    summary_start: Lsn,
    /// End of the last record read.
    next: Lsn,
    valid_since: Lsn,
    gap: Option<String>,
    last_flush: Instant,
    records: u64,
    peak_memory: usize,
}

impl Summarizer {
    /// Reads the state, checks it against the server and the slot, and
    /// positions a WAL reader where summarizing resumes.
    fn open() -> Summarizer {
        let base = base_dir();
        let dir = summaries_dir();
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| error!("could not create \"{}\": {e}", dir.display()));
        let slot = guc::slot_name();
        // SAFETY: a plain read of the control data.
        let system_identifier = unsafe { pg_sys::GetSystemIdentifier() };
        let (flush, timeline) = crate::tracking::wal_end();
        let prior = match TrackerState::load(&base) {
            Ok(p) => p,
            Err(e) => {
                warning!("pg_blocktrack: {e}; tracking starts afresh");
                None
            }
        };
        // The summaries so far go on when they are of this timeline, or of an
        // ancestor this timeline left at or after where they end (a promoted
        // standby: WAL up to the switch point is the same on both).
        let history = crate::tracking::history(timeline);
        let continues = |p: &TrackerState| {
            p.system_identifier == system_identifier
                && (p.timeline == timeline || history.as_ref().is_ok_and(|h| h.holds(p.timeline, p.resume_lsn).is_ok()))
        };
        let lost = match prior {
            None => Some("no tracking state yet".to_string()),
            Some(p) if p.system_identifier != system_identifier => Some(format!(
                "the tracking state belongs to system {}, this is {system_identifier}",
                p.system_identifier
            )),
            Some(p) if !continues(&p) => {
                let why = match &history {
                    Ok(h) => h.holds(p.timeline, p.resume_lsn).err().unwrap_or_default(),
                    Err(e) => e.clone(),
                };
                Some(format!("the timeline changed from {} to {timeline}: {why}", p.timeline))
            }
            Some(p) if p.resume_lsn > flush => Some(format!(
                "the tracking state ends at {}, past the end of WAL {flush} (a restored data directory?)",
                p.resume_lsn
            )),
            Some(p) => match slot::inspect(&slot) {
                SlotState::Missing => Some(format!("replication slot \"{slot}\" is missing")),
                SlotState::Invalidated => Some(format!(
                    "replication slot \"{slot}\" was invalidated (max_slot_wal_keep_size): WAL from {} may be gone",
                    p.resume_lsn
                )),
                SlotState::Holding(r) if r > p.resume_lsn => {
                    Some(format!("replication slot \"{slot}\" holds WAL only from {r}, not from {}", p.resume_lsn))
                }
                SlotState::Holding(_) => {
                    // SAFETY: a plain read of a server global.
                    let seg_size = unsafe { pg_sys::wal_segment_size } as u64;
                    let segno = p.resume_lsn.segment(seg_size);
                    // The segment is on the timeline that holds resume_lsn, or,
                    // for the one holding a switch point, on the newer one.
                    let tlis = match &history {
                        Ok(h) => vec![h.timeline_of(p.resume_lsn), timeline],
                        Err(_) => vec![timeline],
                    };
                    let name = blockstream::lsn::wal_file_name(tlis[0], segno, seg_size);
                    let dd = base.parent().expect("pg_blocktrack is inside the data directory");
                    let present = tlis
                        .iter()
                        .any(|t| dd.join("pg_wal").join(blockstream::lsn::wal_file_name(*t, segno, seg_size)).exists());
                    // SAFETY: as above.
                    let removed = unsafe { pg_sys::XLogGetLastRemovedSegno() };
                    if removed >= segno || !present {
                        Some(format!("WAL segment {name} holding {} is gone (pg_resetwal?)", p.resume_lsn))
                    } else {
                        None
                    }
                }
            },
        };
        let (start, valid_since) = match (&lost, prior) {
            (None, Some(p)) => (p.resume_lsn, p.valid_since),
            (Some(why), _) => {
                if prior.is_some_and(|p| p.system_identifier != system_identifier) {
                    for f in list_summaries(&dir).unwrap_or_default() {
                        let _ = std::fs::remove_file(&f.path);
                    }
                }
                slot::drop_if_exists(&slot);
                let start = slot::create(&slot);
                // The new slot holds WAL from the redo pointer: when that is not
                // past where the summaries end, nothing was lost.
                let same_history = prior.filter(|p| continues(p) && p.resume_lsn <= flush);
                match same_history {
                    Some(p) if start <= p.resume_lsn => {
                        log!("pg_blocktrack: {why}; the new slot holds WAL from {start}, no change is lost");
                        (start, p.valid_since)
                    }
                    _ => {
                        if let Some(p) = prior.filter(|p| continues(p) && p.resume_lsn < start) {
                            // Make the lost range visible in summaries() and impossible to build on.
                            let h = SummaryHeader {
                                system_identifier,
                                timeline,
                                gap: true,
                                start: p.resume_lsn,
                                end: start,
                            };
                            if let Err(e) = write_summary(&dir, &h, &BlockRefTable::default()) {
                                error!("{e}");
                            }
                        }
                        if prior.is_some() {
                            log!("pg_blocktrack: tracking restarts at {start}: {why}");
                        }
                        // State ahead of WAL: WAL up to the old resume point is
                        // being written again, differently. No parent may start
                        // before that point.
                        let valid = prior.filter(continues).map_or(start, |p| start.max(p.resume_lsn));
                        (start, valid)
                    }
                }
            }
            (None, None) => unreachable!("no prior state is always a restart"),
        };
        // A summary written after the state last moved (a crash in between)
        // is written again; so are half-written temporary files.
        for f in list_summaries(&dir).unwrap_or_default() {
            if f.start >= start {
                let _ = std::fs::remove_file(&f.path);
            }
        }
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().ends_with(".tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let state = TrackerState { system_identifier, timeline, resume_lsn: start, valid_since };
        state.store(&base).unwrap_or_else(|e| error!("{e}"));

        let (reader, private) = walread::allocate();
        // SAFETY: the reader was just allocated; `start` is where the last
        // durable summary ended, a record boundary.
        unsafe { pg_sys::XLogBeginRead(reader, start.0) };
        {
            let mut st = STATUS.exclusive();
            st.timeline = timeline;
            st.summarized_lsn = start.0;
            st.pending_lsn = start.0;
            st.valid_since = valid_since.0;
            st.set_error("");
        }
        Summarizer {
            slot,
            system_identifier,
            timeline,
            reader,
            private,
            table: BlockRefTable::default(),
            summary_start: start,
            next: start,
            valid_since,
            gap: None,
            last_flush: Instant::now(),
            records: 0,
            peak_memory: 0,
        }
    }

    /// Reads and summarizes WAL until told to stop.
    fn follow(&mut self) -> Stop {
        let nap = Duration::from_millis(200);
        loop {
            if BackgroundWorker::sighup_received() {
                // SAFETY: the standard way for a background worker to re-read the configuration.
                unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
                if !guc::ENABLED.get() {
                    return Stop::Disabled;
                }
            }
            let mut errormsg: *mut std::ffi::c_char = std::ptr::null_mut();
            // SAFETY: the reader was allocated and positioned in open().
            let record = unsafe { pg_sys::XLogReadRecord(self.reader, &mut errormsg) };
            if record.is_null() {
                // SAFETY: `private` is ours and lives as long as the reader.
                let end_of_wal = unsafe { (*self.private).end_of_wal };
                if !end_of_wal {
                    let msg = if errormsg.is_null() {
                        "unknown error".to_string()
                    } else {
                        // SAFETY: xlogreader returns a NUL-terminated message.
                        unsafe { std::ffi::CStr::from_ptr(errormsg) }.to_string_lossy().into_owned()
                    };
                    error!("pg_blocktrack: could not read WAL at {}: {msg}", self.next);
                }
                // Caught up with the flushed (or replayed) WAL.
                self.publish();
                if !self.follow_timeline() {
                    return Stop::Restart;
                }
                let due = self.flush_requested() || self.interval_passed();
                if self.next > self.summary_start && due && !self.flush() {
                    return Stop::Restart;
                }
                // SAFETY: as above; re-position after the last complete record.
                unsafe {
                    (*self.private).end_of_wal = false;
                    pg_sys::XLogBeginRead(self.reader, self.next.0);
                }
                if !BackgroundWorker::wait_latch(Some(nap)) {
                    return Stop::Shutdown;
                }
                continue;
            }
            // SAFETY: XLogReadRecord just returned a record for this reader.
            if let Some((lsn, crc)) = unsafe { checkpoint_record(self.reader) } {
                self.table.record_checkpoint(Lsn(lsn), crc);
            }
            // SAFETY: as above.
            if let Some(why) = unsafe { summarize_record(self.reader, &mut self.table) } {
                if self.gap.is_none() {
                    warning!("pg_blocktrack: {why}; no incremental backup can span this point");
                    self.gap = Some(why);
                }
            }
            // SAFETY: as above.
            self.next = Lsn(unsafe { (*self.reader).EndRecPtr });
            self.records += 1;
            self.peak_memory = self.peak_memory.max(self.table.memory());
            if self.records.is_multiple_of(1024) {
                self.publish();
                if BackgroundWorker::sigterm_received() {
                    return Stop::Shutdown;
                }
            }
            let full = self.table.memory() > guc::MAX_SUMMARY_MEMORY.get() as usize * 1024 * 1024;
            // SAFETY: as above.
            let switch = unsafe { is_segment_switch(self.reader) };
            if (full || switch || self.flush_requested() || self.interval_passed())
                && (!self.follow_timeline() || !self.flush())
            {
                return Stop::Restart;
            }
        }
    }

    /// The server moved to another timeline (a standby promoted, or
    /// following its upstream's new timeline). When the one summarized so
    /// far is in the new one's history past where the durable summaries
    /// end, summaries go on under the new timeline: the reader returns
    /// only WAL of the server's history (it reads up to the replay LSN,
    /// which a promotion's switch point is never before, and then pages of
    /// the new timeline). Else false: start over, and open() records the gap.
    fn follow_timeline(&mut self) -> bool {
        let (_, tli) = crate::tracking::wal_end();
        if tli == self.timeline {
            return true;
        }
        let from = self.timeline;
        match crate::tracking::history(tli).and_then(|h| h.holds(from, self.summary_start).map(|()| h)) {
            Ok(h) => {
                let switch = h.end_of(from).flatten().map_or("?".to_string(), |l| l.to_string());
                log!("pg_blocktrack: the timeline changed from {from} to {tli} at {switch}; summaries go on");
                self.timeline = tli;
                let state = TrackerState {
                    system_identifier: self.system_identifier,
                    timeline: tli,
                    resume_lsn: self.summary_start,
                    valid_since: self.valid_since,
                };
                state.store(&base_dir()).unwrap_or_else(|e| error!("{e}"));
                STATUS.exclusive().timeline = tli;
                true
            }
            Err(why) => {
                log!(
                    "pg_blocktrack: the timeline changed from {from} to {tli} at {}; tracking starts over: {why}",
                    self.next
                );
                false
            }
        }
    }

    fn flush_requested(&self) -> bool {
        let request = Lsn(STATUS.share().flush_request);
        request > self.summary_start && self.next >= request
    }

    fn interval_passed(&self) -> bool {
        self.last_flush.elapsed() >= Duration::from_secs(guc::SUMMARY_INTERVAL.get().max(1) as u64)
    }

    /// Writes the pending summary, records it in the state file, advances the
    /// slot. False when the slot turned out lost (start over).
    fn flush(&mut self) -> bool {
        if self.next <= self.summary_start {
            return true;
        }
        let base = base_dir();
        let h = SummaryHeader {
            system_identifier: self.system_identifier,
            timeline: self.timeline,
            gap: self.gap.is_some(),
            start: self.summary_start,
            end: self.next,
        };
        write_summary(&summaries_dir(), &h, &self.table).unwrap_or_else(|e| error!("{e}"));
        if self.gap.take().is_some() {
            self.valid_since = self.next;
        }
        let state = TrackerState {
            system_identifier: self.system_identifier,
            timeline: self.timeline,
            resume_lsn: self.next,
            valid_since: self.valid_since,
        };
        state.store(&base).unwrap_or_else(|e| error!("{e}"));
        self.table.clear();
        self.summary_start = self.next;
        self.last_flush = Instant::now();
        {
            let mut st = STATUS.exclusive();
            st.summarized_lsn = self.next.0;
            st.summaries_written += 1;
        }
        self.publish();
        remove_old_summaries();
        if !slot::advance(&self.slot, self.next) {
            warning!("pg_blocktrack: replication slot \"{}\" is lost; tracking starts over", self.slot);
            return false;
        }
        true
    }

    fn publish(&self) {
        let mut st = STATUS.exclusive();
        st.pending_lsn = self.next.0;
        st.valid_since = self.valid_since.0;
        st.table_memory = self.table.memory() as u64;
        st.peak_table_memory = st.peak_table_memory.max(self.peak_memory as u64);
        st.records = self.records;
    }
}

/// Removes summaries older than blocktrack.summary_keep_time.
fn remove_old_summaries() {
    let keep = guc::SUMMARY_KEEP_TIME.get();
    if keep <= 0 {
        return;
    }
    let limit = Duration::from_secs(keep as u64 * 60);
    for f in list_summaries(&summaries_dir()).unwrap_or_default() {
        let old = std::fs::metadata(&f.path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age > limit);
        if old {
            let _ = std::fs::remove_file(&f.path);
        }
    }
}
