//! The persistent physical replication slot that holds WAL until the
//! summarizer has turned it into a durable summary.
//!
//! The slot is acquired only for the moment it is created, advanced or
//! dropped; its restart LSN only ever moves to the end of a durable summary,
//! so after a crash the summarizer finds every record it has not summarized.

use std::ffi::CString;

use blockstream::lsn::Lsn;
use pgrx::pg_sys;

use crate::pgver;

pub enum SlotState {
    Missing,
    /// Invalidated by max_slot_wal_keep_size: WAL it held may be gone.
    Invalidated,
    Holding(Lsn),
}

fn cname(name: &str) -> CString {
    CString::new(name).expect("slot names have no NUL byte")
}

pub fn inspect(name: &str) -> SlotState {
    let n = cname(name);
    // SAFETY: SearchNamedReplicationSlot takes the control lock itself; the
    // slot's fields are read under its spinlock, as PostgreSQL does.
    unsafe {
        let s = pg_sys::SearchNamedReplicationSlot(n.as_ptr(), true);
        if s.is_null() {
            return SlotState::Missing;
        }
        pg_sys::SpinLockAcquire(&mut (*s).mutex);
        let (restart, invalidated) = ((*s).data.restart_lsn, pgver::slot_invalidated(&(*s).data));
        pg_sys::SpinLockRelease(&mut (*s).mutex);
        if invalidated {
            SlotState::Invalidated
        } else {
            SlotState::Holding(Lsn(restart))
        }
    }
}

/// Creates the slot, reserving WAL from the current redo pointer (a record
/// boundary that every later record follows); returns that LSN.
pub fn create(name: &str) -> Lsn {
    let n = cname(name);
    // SAFETY: the sequence of pg_create_physical_replication_slot(name, true, false).
    unsafe {
        pgver::slot_create(&n);
        pg_sys::ReplicationSlotReserveWal();
        pg_sys::ReplicationSlotMarkDirty();
        pg_sys::ReplicationSlotSave();
        let lsn = (*pg_sys::MyReplicationSlot).data.restart_lsn;
        pg_sys::ReplicationSlotRelease();
        Lsn(lsn)
    }
}

pub fn drop_if_exists(name: &str) {
    if !matches!(inspect(name), SlotState::Missing) {
        let n = cname(name);
        // SAFETY: drops a slot nobody holds (nowait: an active slot raises an error).
        unsafe { pg_sys::ReplicationSlotDrop(n.as_ptr(), true) };
    }
}

/// Moves the slot's restart LSN forward to `to`. False when the slot is
/// missing or was invalidated.
pub fn advance(name: &str, to: Lsn) -> bool {
    match inspect(name) {
        SlotState::Holding(current) if current < to => {}
        SlotState::Holding(_) => return true,
        _ => return false,
    }
    let n = cname(name);
    // SAFETY: the sequence of pg_physical_replication_slot_advance: acquire,
    // set restart_lsn under the spinlock, mark dirty, release, recompute the
    // WAL every slot needs.
    unsafe {
        pgver::slot_acquire(&n);
        let s = pg_sys::MyReplicationSlot;
        pg_sys::SpinLockAcquire(&mut (*s).mutex);
        let ok = !pgver::slot_invalidated(&(*s).data);
        if ok && (*s).data.restart_lsn < to.0 {
            (*s).data.restart_lsn = to.0;
        }
        pg_sys::SpinLockRelease(&mut (*s).mutex);
        if ok {
            pg_sys::ReplicationSlotMarkDirty();
        }
        pg_sys::ReplicationSlotRelease();
        pg_sys::ReplicationSlotsComputeRequiredLSN();
        ok
    }
}
