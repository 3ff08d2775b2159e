//! PostgreSQL's WAL reader over this server's own WAL (`pg_wal`), for the
//! summarizer and for reading one record's header in a backend.

use pgrx::pg_sys;

// The callbacks the WAL reader calls, as the C symbols themselves (pgrx's
// bindings wrap these functions for calls from Rust, not as pointers).
unsafe extern "C-unwind" {
    pub fn read_local_xlog_page_no_wait(
        state: *mut pg_sys::XLogReaderState,
        target_page: pg_sys::XLogRecPtr,
        req_len: std::ffi::c_int,
        target_rec: pg_sys::XLogRecPtr,
        cur_page: *mut std::ffi::c_char,
    ) -> std::ffi::c_int;
    pub fn wal_segment_open(
        state: *mut pg_sys::XLogReaderState,
        next_seg: pg_sys::XLogSegNo,
        tli: *mut pg_sys::TimeLineID,
    );
    pub fn wal_segment_close(state: *mut pg_sys::XLogReaderState);
}

/// A WAL reader over local WAL that never waits for WAL to arrive, and the
/// private state its page callback uses (palloc'd in the current context).
pub fn allocate() -> (*mut pg_sys::XLogReaderState, *mut pg_sys::ReadLocalXLogPageNoWaitPrivate) {
    // SAFETY: allocates PostgreSQL's WAL reader with the local page-read
    // callbacks; `private` is the state read_local_xlog_page_no_wait expects.
    unsafe {
        let private = pg_sys::palloc0(std::mem::size_of::<pg_sys::ReadLocalXLogPageNoWaitPrivate>())
            as *mut pg_sys::ReadLocalXLogPageNoWaitPrivate;
        let mut routine = pg_sys::XLogReaderRoutine {
            page_read: Some(read_local_xlog_page_no_wait),
            segment_open: Some(wal_segment_open),
            segment_close: Some(wal_segment_close),
        };
        let reader =
            pg_sys::XLogReaderAllocate(pg_sys::wal_segment_size, std::ptr::null(), &mut routine, private.cast());
        if reader.is_null() {
            pgrx::error!("out of memory while allocating a WAL reading processor");
        }
        (reader, private)
    }
}

/// The header CRC of the record that starts at `lsn` (a record already
/// flushed), or why it cannot be read.
pub fn record_crc(lsn: u64) -> Result<u32, String> {
    let (reader, _private) = allocate();
    // SAFETY: the reader was just allocated; XLogBeginRead wants a record
    // start, which the caller gives; the reader is freed before returning.
    unsafe {
        pg_sys::XLogBeginRead(reader, lsn);
        let mut errormsg: *mut std::ffi::c_char = std::ptr::null_mut();
        let record = pg_sys::XLogReadRecord(reader, &mut errormsg);
        let result = if record.is_null() {
            let msg = if errormsg.is_null() {
                "no record there".to_string()
            } else {
                std::ffi::CStr::from_ptr(errormsg).to_string_lossy().into_owned()
            };
            Err(msg)
        } else if (*reader).ReadRecPtr != lsn {
            Err(format!("the record read starts at {:X}", (*reader).ReadRecPtr))
        } else {
            Ok((*(*reader).record).header.xl_crc)
        };
        pg_sys::XLogReaderFree(reader);
        result
    }
}
