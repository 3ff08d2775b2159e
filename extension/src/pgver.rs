//! What differs between the PostgreSQL versions pg_blocktrack builds for
//! (15, 16, 17, 18), in one place: every `#[cfg(feature = "pgNN")]` of the
//! extension lives here, one function per difference, and the rest of the
//! code calls these.
//!
//! - 16 renamed `RelFileNode` (spcNode, dbNode, relNode) to
//!   `RelFileLocator` (spcOid, dbOid, relNumber), in block references and in
//!   the relations a commit or abort drops (`xnodes` became `xlocators`);
//!   the record layouts of storage_xlog.h and dbcommands_xlog.h kept the
//!   same three 32-bit fields, so [`crate::wal_records`] reads them alike.
//! - 16 replaced a slot's `invalidated_at` LSN with an `invalidated` cause.
//! - 17 added `failover` and `synced` to `ReplicationSlotCreate`; 18 added
//!   `error_if_invalid` to `ReplicationSlotAcquire`.

use pgrx::pg_sys;

/// A relation file: tablespace, database and relfilenode (or relfilenumber).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelFile {
    pub spc: u32,
    pub db: u32,
    pub rel: u32,
}

/// Block reference `id` of the record the reader just returned: the
/// relation file, fork and block. None when the record has no such reference.
///
/// # Safety
/// `reader` must hold a record just returned by XLogReadRecord.
pub unsafe fn block_tag(reader: *mut pg_sys::XLogReaderState, id: u8) -> Option<(RelFile, u8, u32)> {
    let mut fork: pg_sys::ForkNumber::Type = 0;
    let mut blkno: pg_sys::BlockNumber = 0;
    #[cfg(feature = "pg15")]
    let mut r = pg_sys::RelFileNode::default();
    #[cfg(not(feature = "pg15"))]
    let mut r = pg_sys::RelFileLocator::default();
    // SAFETY: the caller guarantees a current decoded record; the out
    // parameters are ours.
    let found =
        unsafe { pg_sys::XLogRecGetBlockTagExtended(reader, id, &mut r, &mut fork, &mut blkno, std::ptr::null_mut()) };
    found.then(|| (rel_file(&r), fork as u8, blkno))
}

#[cfg(feature = "pg15")]
fn rel_file(r: &pg_sys::RelFileNode) -> RelFile {
    RelFile { spc: r.spcNode.to_u32(), db: r.dbNode.to_u32(), rel: r.relNode.to_u32() }
}

#[cfg(not(feature = "pg15"))]
fn rel_file(r: &pg_sys::RelFileLocator) -> RelFile {
    RelFile { spc: r.spcOid.to_u32(), db: r.dbOid.to_u32(), rel: r.relNumber.to_u32() }
}

/// The relation files a transaction record drops: those of a commit or
/// abort (prepared or not); empty for any other transaction record.
///
/// # Safety
/// `rec` must be a record of the transaction resource manager just
/// returned by XLogReadRecord.
pub unsafe fn dropped_relations(rec: *const pg_sys::DecodedXLogRecord) -> Vec<RelFile> {
    // SAFETY: the caller guarantees a current decoded transaction record;
    // ParseCommitRecord and ParseAbortRecord point into its main data, which
    // lives as long as the record.
    unsafe {
        let info = (*rec).header.xl_info;
        let xop = info as u32 & pg_sys::XLOG_XACT_OPMASK;
        let (nrels, files) = if xop == pg_sys::XLOG_XACT_COMMIT || xop == pg_sys::XLOG_XACT_COMMIT_PREPARED {
            let mut parsed = pg_sys::xl_xact_parsed_commit::default();
            pg_sys::ParseCommitRecord(info, (*rec).main_data as *mut pg_sys::xl_xact_commit, &mut parsed);
            #[cfg(feature = "pg15")]
            let files = parsed.xnodes;
            #[cfg(not(feature = "pg15"))]
            let files = parsed.xlocators;
            (parsed.nrels, files)
        } else if xop == pg_sys::XLOG_XACT_ABORT || xop == pg_sys::XLOG_XACT_ABORT_PREPARED {
            let mut parsed = pg_sys::xl_xact_parsed_abort::default();
            pg_sys::ParseAbortRecord(info, (*rec).main_data as *mut pg_sys::xl_xact_abort, &mut parsed);
            #[cfg(feature = "pg15")]
            let files = parsed.xnodes;
            #[cfg(not(feature = "pg15"))]
            let files = parsed.xlocators;
            (parsed.nrels, files)
        } else {
            return Vec::new();
        };
        if files.is_null() {
            return Vec::new();
        }
        (0..nrels.max(0) as usize).map(|i| rel_file(&*files.add(i))).collect()
    }
}

/// Whether a slot's WAL reservation was invalidated (by
/// max_slot_wal_keep_size, or on a standby by a conflict).
pub fn slot_invalidated(data: &pg_sys::ReplicationSlotPersistentData) -> bool {
    #[cfg(feature = "pg15")]
    {
        data.restart_lsn == 0 && data.invalidated_at != 0
    }
    #[cfg(not(feature = "pg15"))]
    {
        data.invalidated != pg_sys::ReplicationSlotInvalidationCause::RS_INVAL_NONE
    }
}

/// Creates a persistent physical slot and makes it this backend's
/// `MyReplicationSlot`, as pg_create_physical_replication_slot does.
///
/// # Safety
/// Must run in a backend or background worker attached to shared memory,
/// with no slot acquired.
pub unsafe fn slot_create(name: &std::ffi::CStr) {
    let persistent = pg_sys::ReplicationSlotPersistency::RS_PERSISTENT;
    // SAFETY: as the caller guarantees; the name outlives the call.
    unsafe {
        #[cfg(any(feature = "pg15", feature = "pg16"))]
        pg_sys::ReplicationSlotCreate(name.as_ptr(), false, persistent, false);
        #[cfg(not(any(feature = "pg15", feature = "pg16")))]
        pg_sys::ReplicationSlotCreate(name.as_ptr(), false, persistent, false, false, false);
    }
}

/// Acquires the slot without waiting (an active slot raises an error).
///
/// # Safety
/// As [`slot_create`].
pub unsafe fn slot_acquire(name: &std::ffi::CStr) {
    // SAFETY: as the caller guarantees; the name outlives the call.
    unsafe {
        #[cfg(not(feature = "pg18"))]
        pg_sys::ReplicationSlotAcquire(name.as_ptr(), true);
        // An invalidated slot is acquired too: the caller checks and reports it.
        #[cfg(feature = "pg18")]
        pg_sys::ReplicationSlotAcquire(name.as_ptr(), true, false);
    }
}
