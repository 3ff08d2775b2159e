//! Raising errors with a SQLSTATE, a message and an optional hint.
//!
//! Messages are lowercase, without a final period, and name the value involved.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

/// Raises ERROR with `code`, `message` and, when given, `hint`. Never returns.
pub fn raise(code: PgSqlErrorCode, message: impl Into<String>, hint: Option<&str>) -> ! {
    let mut report = ErrorReport::new(code, message.into(), "pg_blocktrack");
    if let Some(h) = hint {
        report = report.set_hint(h);
    }
    report.report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}
