//! `pg_lsn` as a Rust type for `#[pg_extern]` arguments and results.
//!
//! pgrx 0.18 has no binding for `pg_lsn`; it is a pass-by-value 64-bit
//! integer, so the glue is a newtype that moves the Datum as it is.

use blockstream::lsn::Lsn;
use pgrx::callconv::{Arg, ArgAbi, BoxRet, FcInfo};
use pgrx::datum::Datum;
use pgrx::nullable::Nullable;
use pgrx::pg_sys;
use pgrx::{FromDatum, IntoDatum};

#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(transparent)]
pub struct PgLsn(pub u64);

impl From<Lsn> for PgLsn {
    fn from(l: Lsn) -> Self {
        PgLsn(l.0)
    }
}

impl From<PgLsn> for Lsn {
    fn from(l: PgLsn) -> Self {
        Lsn(l.0)
    }
}

impl std::fmt::Display for PgLsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        Lsn(self.0).fmt(f)
    }
}

impl IntoDatum for PgLsn {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        Some(pg_sys::Datum::from(self.0))
    }

    fn type_oid() -> pg_sys::Oid {
        pg_sys::PG_LSNOID
    }
}

impl FromDatum for PgLsn {
    unsafe fn from_polymorphic_datum(datum: pg_sys::Datum, is_null: bool, _typoid: pg_sys::Oid) -> Option<Self> {
        (!is_null).then(|| PgLsn(datum.value() as u64))
    }
}

// SAFETY: pg_lsn is passed by value as a 64-bit Datum; FromDatum reads it as such.
unsafe impl<'fcx> ArgAbi<'fcx> for PgLsn {
    unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> Self {
        let index = arg.index();
        // SAFETY: the caller guarantees the argument is a pg_lsn.
        unsafe { arg.unbox_arg_using_from_datum() }.unwrap_or_else(|| panic!("argument {index} must not be null"))
    }

    unsafe fn unbox_nullable_arg(arg: Arg<'_, 'fcx>) -> Nullable<Self> {
        // SAFETY: as above.
        unsafe { arg.unbox_arg_using_from_datum() }.into()
    }
}

// SAFETY: the returned Datum is a by-value pg_lsn, matching the declared SQL type.
unsafe impl BoxRet for PgLsn {
    unsafe fn box_into<'fcx>(self, fcinfo: &mut FcInfo<'fcx>) -> Datum<'fcx> {
        // SAFETY: a by-value Datum needs no memory context.
        unsafe { fcinfo.return_raw_datum(pg_sys::Datum::from(self.0)) }
    }
}

pgrx::impl_sql_translatable!(PgLsn, "pg_lsn");
