//! `global/pg_control`: the fields of PostgreSQL's control file the engine
//! needs; the only code that decodes it.
//!
//! The file is a `ControlFileData` struct in the server's native layout
//! (little-endian on the machines we run on) followed by zeros up to 8 kB.
//! Its last member is a CRC-32C of every byte before it. The layout grew
//! between releases, so rather than trusting one table of offsets the
//! decoder finds the CRC (the one 4-byte-aligned offset where it matches
//! what precedes it) and `floatFormat` (the constant 1234567.0 PostgreSQL
//! stores to check the float format), and reads the sizes that follow it.
//! A file that is damaged, truncated or not a control file is refused with
//! what was wrong.

use std::fmt;

use super::{u32_at, u64_at};
use crate::blkref::crc32c;
use crate::error::{Error, Result};
use crate::lsn::Lsn;

/// The control file is at most this large (PG_CONTROL_FILE_SIZE).
pub const MAX_LEN: usize = 8192;
/// PostgreSQL's `FLOATFORMAT_VALUE`.
const FLOAT_FORMAT: f64 = 1_234_567.0;

/// `DB_SHUTDOWNED`: a primary shut down cleanly.
pub const SHUT_DOWN: u32 = 1;
/// `DB_SHUTDOWNED_IN_RECOVERY`: a standby shut down cleanly.
pub const SHUT_DOWN_IN_RECOVERY: u32 = 2;
/// `DB_SHUTDOWNING`: a primary that stopped while shutting down (a crash).
pub const SHUTTING_DOWN: u32 = 3;
/// `DB_IN_CRASH_RECOVERY`: a primary that stopped in crash recovery.
pub const IN_CRASH_RECOVERY: u32 = 4;
/// `DB_IN_ARCHIVE_RECOVERY`: a standby, or a server recovering from archived WAL.
pub const IN_ARCHIVE_RECOVERY: u32 = 5;
/// `DB_IN_PRODUCTION`: a running primary, or one that crashed.
pub const IN_PRODUCTION: u32 = 6;

/// The fields of a control file the engine uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlFile {
    pub system_identifier: u64,
    pub pg_control_version: u32,
    pub catalog_version: u32,
    /// `state`: how the server last left the data directory ([`SHUT_DOWN`] ...).
    pub state: u32,
    /// The last checkpoint record and its redo pointer and timeline.
    pub checkpoint: Lsn,
    pub redo: Lsn,
    pub timeline: u32,
    /// A standby's data files hold changes up to here (0 on a primary).
    pub min_recovery_point: Lsn,
    /// The server's `wal_log_hints` when it last wrote the file.
    pub wal_log_hints: bool,
    /// BLCKSZ, RELSEG_SIZE, XLOG_BLCKSZ and the WAL segment size.
    pub block_size: u32,
    pub relseg_size: u32,
    pub wal_block_size: u32,
    pub wal_segment_size: u32,
    pub data_checksum_version: u32,
}

impl ControlFile {
    /// Decodes and checks control file bytes; `what` names the file.
    pub fn parse(bytes: &[u8], what: &dyn fmt::Display) -> Result<ControlFile> {
        let bad = |why: String| Error::Corrupt(format!("control file \"{what}\" {why}"));
        if bytes.len() < 256 || bytes.len() > MAX_LEN {
            return Err(bad(format!("is {} bytes, expected 256 to {MAX_LEN}", bytes.len())));
        }
        // The CRC member: the first aligned offset where it matches.
        let crc_at = (256..=512.min(bytes.len() - 4))
            .step_by(4)
            .find(|&k| crc32c(&bytes[..k]) == u32_at(bytes, k))
            .ok_or_else(|| bad("has no valid checksum: it is damaged or not a control file".into()))?;
        let float_at = (160..crc_at.saturating_sub(48))
            .step_by(8)
            .find(|&k| f64::from_le_bytes(bytes[k..k + 8].try_into().unwrap()) == FLOAT_FORMAT)
            .ok_or_else(|| bad("has no float format marker: not a control file of this architecture".into()))?;
        let c = ControlFile {
            system_identifier: u64_at(bytes, 0),
            pg_control_version: u32_at(bytes, 8),
            catalog_version: u32_at(bytes, 12),
            state: u32_at(bytes, 16),
            checkpoint: Lsn(u64_at(bytes, 32)),
            redo: Lsn(u64_at(bytes, 40)),
            timeline: u32_at(bytes, 48),
            // The members before floatFormat have had one layout from 13
            // to 18: minRecoveryPoint, its timeline, backupStartPoint,
            // backupEndPoint, backupEndRequired, wal_level, wal_log_hints,
            // six more ints and bools, maxAlign.
            min_recovery_point: Lsn(u64_at(bytes, float_at - 72)),
            wal_log_hints: bytes[float_at - 32] != 0,
            block_size: u32_at(bytes, float_at + 8),
            relseg_size: u32_at(bytes, float_at + 12),
            wal_block_size: u32_at(bytes, float_at + 16),
            wal_segment_size: u32_at(bytes, float_at + 20),
            data_checksum_version: u32_at(bytes, float_at + 44),
        };
        let pow2 = |v: u32, lo: u32, hi: u32| v.is_power_of_two() && (lo..=hi).contains(&v);
        if !pow2(c.block_size, 1024, 32768) {
            return Err(bad(format!("gives block size {}, expected a power of two from 1024 to 32768", c.block_size)));
        }
        if c.relseg_size == 0 || c.relseg_size > u32::MAX >> 1 {
            return Err(bad(format!("gives {} blocks per segment, expected 1 to {}", c.relseg_size, u32::MAX >> 1)));
        }
        if !pow2(c.wal_block_size, 1024, 65536) {
            return Err(bad(format!("gives WAL block size {}", c.wal_block_size)));
        }
        if !pow2(c.wal_segment_size, 1 << 20, 1 << 30) {
            return Err(bad(format!(
                "gives WAL segment size {}, expected a power of two from 1 MB to 1 GB",
                c.wal_segment_size
            )));
        }
        if c.pg_control_version < 1300 {
            return Err(bad(format!("has version {}, older than PostgreSQL 13's 1300", c.pg_control_version)));
        }
        Ok(c)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A control file laid out as PostgreSQL 15 writes it on x86-64.
    pub fn sample(system_identifier: u64) -> Vec<u8> {
        let mut b = vec![0u8; MAX_LEN];
        b[0..8].copy_from_slice(&system_identifier.to_le_bytes());
        b[8..12].copy_from_slice(&1300u32.to_le_bytes());
        b[12..16].copy_from_slice(&202_209_061u32.to_le_bytes());
        b[16..20].copy_from_slice(&SHUT_DOWN.to_le_bytes());
        b[32..40].copy_from_slice(&0x0300_0060u64.to_le_bytes());
        b[40..48].copy_from_slice(&0x0300_0028u64.to_le_bytes());
        b[48..52].copy_from_slice(&1u32.to_le_bytes());
        b[208..216].copy_from_slice(&FLOAT_FORMAT.to_le_bytes());
        for (at, v) in [(216, 8192u32), (220, 131_072), (224, 8192), (228, 16 << 20), (252, 1)] {
            b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
        let crc = crc32c(&b[..288]);
        b[288..292].copy_from_slice(&crc.to_le_bytes());
        b
    }

    #[test]
    fn parses_and_refuses_damage() {
        let b = sample(42);
        let c = ControlFile::parse(&b, &"pg_control").unwrap();
        assert_eq!(
            (c.system_identifier, c.block_size, c.relseg_size, c.wal_segment_size),
            (42, 8192, 131_072, 16 << 20)
        );
        assert_eq!(
            (c.checkpoint, c.redo, c.timeline, c.data_checksum_version),
            (Lsn(0x0300_0060), Lsn(0x0300_0028), 1, 1)
        );
        assert_eq!((c.state, c.min_recovery_point, c.wal_log_hints), (SHUT_DOWN, Lsn(0), false));
        let mut d = b.clone();
        d[220] ^= 1;
        let err = ControlFile::parse(&d, &"pg_control").unwrap_err().to_string();
        assert!(err.contains("has no valid checksum"), "{err}");
        assert!(ControlFile::parse(&b[..100], &"x").unwrap_err().to_string().contains("is 100 bytes"));
        // A checksum that matches over absurd sizes is still refused.
        let mut d = b.clone();
        d[216..220].copy_from_slice(&3u32.to_le_bytes());
        let crc = crc32c(&d[..288]);
        d[288..292].copy_from_slice(&crc.to_le_bytes());
        assert!(ControlFile::parse(&d, &"x").unwrap_err().to_string().contains("block size 3"));
    }
}
