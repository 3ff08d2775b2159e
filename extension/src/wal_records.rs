//! From one decoded WAL record to changes in a block reference table.
//!
//! Follows PostgreSQL 17's walsummarizer.c and PostgreSQL 15's
//! pg_rewind/parsexlog.c: every block reference marks its block (FSM forks
//! are ignored: they are copied whole); relation creation and drops lower a
//! fork's limit block to 0, truncation to the new length; CREATE DATABASE and
//! DROP DATABASE mark the whole database directory; `wal_level` falling to
//! minimal, and any record flagged XLR_SPECIAL_REL_UPDATE that is not
//! understood here, make the range a gap (the next backup must be full).
//!
//! The record layouts of storage_xlog.h, dbcommands_xlog.h and xlog_internal.h
//! are not in pgrx's bindings; they are declared here, the same for
//! PostgreSQL 15 to 18 (what differs between versions is in [`crate::pgver`]).

use blockstream::blkref::{BlockRefTable, RelFork, FSM_FORK, INIT_FORK, MAIN_FORK, VM_FORK};
use pgrx::pg_sys;

use crate::pgver;

const XLR_INFO_MASK: u8 = 0x0F;
const XLR_SPECIAL_REL_UPDATE: u8 = 0x01;

const XLOG_SMGR_CREATE: u8 = 0x10;
const XLOG_SMGR_TRUNCATE: u8 = 0x20;
const SMGR_TRUNCATE_HEAP: i32 = 0x0001;
const SMGR_TRUNCATE_VM: i32 = 0x0002;

const XLOG_DBASE_CREATE_FILE_COPY: u8 = 0x00;
const XLOG_DBASE_CREATE_WAL_LOG: u8 = 0x10;
const XLOG_DBASE_DROP: u8 = 0x20;

const XLOG_CHECKPOINT_SHUTDOWN: u8 = 0x00;
const XLOG_CHECKPOINT_ONLINE: u8 = 0x10;
const XLOG_SWITCH: u8 = 0x40;
const XLOG_PARAMETER_CHANGE: u8 = 0x60;
const WAL_LEVEL_REPLICA: i32 = 1;

#[repr(C)]
#[derive(Clone, Copy)]
struct RelFileNode {
    spc: u32,
    db: u32,
    rel: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct XlSmgrCreate {
    rnode: RelFileNode,
    fork: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct XlSmgrTruncate {
    blkno: u32,
    rnode: RelFileNode,
    flags: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct XlDbaseCreateFileCopy {
    db_id: u32,
    tablespace_id: u32,
    src_db_id: u32,
    src_tablespace_id: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct XlDbaseCreateWalLog {
    db_id: u32,
    tablespace_id: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct XlDbaseDropHeader {
    db_id: u32,
    ntablespaces: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct XlParameterChange {
    max_connections: i32,
    max_worker_processes: i32,
    max_wal_senders: i32,
    max_prepared_xacts: i32,
    max_locks_per_xact: i32,
    wal_level: i32,
    wal_log_hints: bool,
    track_commit_timestamp: bool,
}

fn key(r: &RelFileNode, fork: u8) -> RelFork {
    RelFork { spc: r.spc, db: r.db, rel: r.rel, fork }
}

/// The record's main data as `T`, when it is long enough.
///
/// # Safety
/// `rec` must be a record just returned by XLogReadRecord.
unsafe fn main_data<T: Copy>(rec: *const pg_sys::DecodedXLogRecord, at: usize) -> Option<T> {
    // SAFETY: main_data points to main_data_len readable bytes for the life of the record.
    unsafe {
        let len = (*rec).main_data_len as usize;
        if len < at + std::mem::size_of::<T>() || (*rec).main_data.is_null() {
            return None;
        }
        Some(std::ptr::read_unaligned((*rec).main_data.add(at) as *const T))
    }
}

/// True when the record the reader just returned is a WAL segment switch.
/// pg_backup_start switches segments right before its checkpoint, so a
/// summary cut here ends where the next backup's range begins.
///
/// # Safety
/// `reader` must hold a record just returned by XLogReadRecord.
pub unsafe fn is_segment_switch(reader: *mut pg_sys::XLogReaderState) -> bool {
    // SAFETY: the caller guarantees a current decoded record.
    unsafe {
        let rec = (*reader).record;
        (*rec).header.xl_rmid as u32 == pg_sys::RmgrIds::RM_XLOG_ID
            && (*rec).header.xl_info & !XLR_INFO_MASK == XLOG_SWITCH
    }
}

/// The LSN and header CRC of the record the reader just returned, when it is
/// a checkpoint record: what proves a backup lies in this server's history.
///
/// # Safety
/// `reader` must hold a record just returned by XLogReadRecord.
pub unsafe fn checkpoint_record(reader: *mut pg_sys::XLogReaderState) -> Option<(u64, u32)> {
    // SAFETY: the caller guarantees a current decoded record.
    unsafe {
        let rec = (*reader).record;
        let info = (*rec).header.xl_info & !XLR_INFO_MASK;
        ((*rec).header.xl_rmid as u32 == pg_sys::RmgrIds::RM_XLOG_ID
            && (info == XLOG_CHECKPOINT_ONLINE || info == XLOG_CHECKPOINT_SHUTDOWN))
            .then(|| ((*reader).ReadRecPtr, (*rec).header.xl_crc))
    }
}

/// Adds the changes of the record the reader just returned to `table`.
/// Returns why the record makes the range a gap, if it does.
///
/// # Safety
/// `reader` must hold a record just returned by XLogReadRecord.
pub unsafe fn summarize_record(reader: *mut pg_sys::XLogReaderState, table: &mut BlockRefTable) -> Option<String> {
    // SAFETY: the caller guarantees a current decoded record.
    unsafe {
        let rec = (*reader).record;
        let max_block_id = (*rec).max_block_id;
        for id in 0..=max_block_id {
            let Some((r, fork, blkno)) = pgver::block_tag(reader, id as u8) else { continue };
            if fork == FSM_FORK {
                continue;
            }
            let r = RelFileNode { spc: r.spc, db: r.db, rel: r.rel };
            table.mark_block(key(&r, fork), blkno);
        }

        let rmid = (*rec).header.xl_rmid as u32;
        let info = (*rec).header.xl_info;
        let op = info & !XLR_INFO_MASK;
        let lsn = (*reader).ReadRecPtr;
        match rmid {
            pg_sys::RmgrIds::RM_SMGR_ID => {
                if op == XLOG_SMGR_CREATE {
                    let x: XlSmgrCreate = main_data(rec, 0)?;
                    if x.fork as u8 != FSM_FORK {
                        table.set_limit(key(&x.rnode, x.fork as u8), 0);
                    }
                    return None;
                }
                if op == XLOG_SMGR_TRUNCATE {
                    let x: XlSmgrTruncate = main_data(rec, 0)?;
                    if x.flags & SMGR_TRUNCATE_HEAP != 0 {
                        table.set_limit(key(&x.rnode, MAIN_FORK), x.blkno);
                    }
                    if x.flags & SMGR_TRUNCATE_VM != 0 {
                        // The VM is copied whole; a limit keeps the entry honest.
                        table.set_limit(key(&x.rnode, VM_FORK), 0);
                    }
                    return None;
                }
            }
            pg_sys::RmgrIds::RM_XACT_ID => {
                for f in pgver::dropped_relations(rec) {
                    let r = RelFileNode { spc: f.spc, db: f.db, rel: f.rel };
                    for fork in [MAIN_FORK, VM_FORK, INIT_FORK] {
                        table.set_limit(key(&r, fork), 0);
                    }
                }
                return None;
            }
            pg_sys::RmgrIds::RM_DBASE_ID => {
                match op {
                    XLOG_DBASE_CREATE_FILE_COPY => {
                        let x: XlDbaseCreateFileCopy = main_data(rec, 0)?;
                        table.mark_database(x.tablespace_id, x.db_id);
                    }
                    XLOG_DBASE_CREATE_WAL_LOG => {
                        let x: XlDbaseCreateWalLog = main_data(rec, 0)?;
                        table.mark_database(x.tablespace_id, x.db_id);
                    }
                    XLOG_DBASE_DROP => {
                        let x: XlDbaseDropHeader = main_data(rec, 0)?;
                        for i in 0..x.ntablespaces.max(0) as usize {
                            let spc: u32 = main_data(rec, std::mem::size_of::<XlDbaseDropHeader>() + 4 * i)?;
                            table.mark_database(spc, x.db_id);
                        }
                    }
                    _ => {}
                }
                return None;
            }
            pg_sys::RmgrIds::RM_XLOG_ID => {
                if op == XLOG_PARAMETER_CHANGE {
                    let x: XlParameterChange = main_data(rec, 0)?;
                    if x.wal_level < WAL_LEVEL_REPLICA {
                        return Some(format!("wal_level fell to minimal at {}", blockstream::lsn::Lsn(lsn)));
                    }
                }
                return None;
            }
            _ => {}
        }
        if info & XLR_SPECIAL_REL_UPDATE != 0 {
            return Some(format!(
                "record at {} (resource manager {rmid}, info 0x{info:02x}) changes relation files in a way the summarizer does not know",
                blockstream::lsn::Lsn(lsn)
            ));
        }
        None
    }
}
