//! `validate_backup` and `page_checksum`: the repository checks of
//! `blockstream verify`, run inside the server so a pg_cron job can prove a
//! backup restores; and PostgreSQL's own page checksum, to cross-check ours.

use blockstream::verify::{verify_backup, CHECKS};
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::engine;
use crate::errors::raise;
use crate::paths;

unsafe extern "C-unwind" {
    fn pg_checksum_page(page: *mut std::ffi::c_char, blkno: pg_sys::BlockNumber) -> u16;
}

/// PostgreSQL's checksum of `page` as block `blkno` (storage/checksum.h).
pub fn server_page_checksum(page: Option<&[u8]>, blkno: Option<i64>) -> i32 {
    let (Some(page), Some(blkno)) = (page, blkno) else {
        raise(PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED, "page and blkno must not be NULL", None);
    };
    if page.len() != pg_sys::BLCKSZ as usize {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("page is {} bytes, expected {}", page.len(), pg_sys::BLCKSZ),
            None,
        );
    }
    let Ok(blkno) = u32::try_from(blkno) else {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("block number {blkno} is out of range (0 to {})", u32::MAX),
            None,
        );
    };
    if blockstream::checksum::header(page).upper == 0 {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("block {blkno} is a new page (pd_upper 0): PostgreSQL does not checksum new pages"),
            None,
        );
    }
    // pg_checksum_page zeroes pd_checksum while it works: give it a copy, aligned.
    let mut copy = vec![0u64; page.len() / 8];
    // SAFETY: copy has exactly page.len() bytes; u64 alignment satisfies the 4-byte alignment it needs.
    unsafe {
        std::ptr::copy_nonoverlapping(page.as_ptr(), copy.as_mut_ptr() as *mut u8, page.len());
        pg_checksum_page(copy.as_mut_ptr() as *mut std::ffi::c_char, blkno) as i32
    }
}

/// (check, ok, detail) rows for one backup of the repository at `repo`.
pub fn validate(repo: Option<&str>, backup_id: Option<&str>) -> Vec<(String, bool, String)> {
    let root = paths::check_repository(repo, paths::Access::Read);
    let Some(backup_id) = backup_id else {
        raise(PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED, "backup_id must not be NULL", None);
    };
    let enc = crate::paths::encryption();
    let repository = crate::paths::open_repo(&root, &enc)
        .unwrap_or_else(|e| raise(PgSqlErrorCode::ERRCODE_UNDEFINED_FILE, e.to_string(), None));
    let id = repository
        .resolve(backup_id)
        .unwrap_or_else(|e| raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, e.to_string(), None));
    let jobs = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(4);
    let (check, sysid) = {
        let id = id.clone();
        let root = root.clone();
        engine::run(move |progress| {
            let repository = crate::paths::open_repo(&root, &enc).expect("opened above");
            let sysid = repository.load_manifest(&id).ok().map(|m| m.system_identifier);
            (verify_backup(&repository, &id, jobs, progress), sysid)
        })
    };
    // SAFETY: a plain read of the control data.
    let ours = unsafe { pg_sys::GetSystemIdentifier() };
    let mut rows = Vec::new();
    rows.push(match sysid {
        Some(s) if s == ours => {
            ("system identifier".to_string(), true, format!("backup {id} is of this cluster ({s})"))
        }
        Some(s) => (
            "system identifier".to_string(),
            false,
            format!("backup {id} is of the cluster with system identifier {s}, this one is {ours}"),
        ),
        None => ("system identifier".to_string(), false, format!("backup {id} has no readable manifest")),
    });
    for name in CHECKS {
        let found: Vec<&str> = check.problems.iter().filter(|p| p.check == name).map(|p| p.detail.as_str()).collect();
        let detail = match found.len() {
            0 => match name {
                "chunks" => format!("{} bytes of chunks read and matched", check.stored_bytes),
                "files" => format!("{} files match their digests", check.files),
                "page checksums" => format!("{} stored pages match their checksums", check.pages_checked),
                _ => "ok".to_string(),
            },
            1 => found[0].to_string(),
            n => format!("{} (and {} more)", found[0], n - 1),
        };
        rows.push((name.to_string(), found.is_empty(), detail));
    }
    rows
}
