//! Write-ahead log positions and segment file names.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::Error;

/// A position in the write-ahead log, printed as PostgreSQL prints `pg_lsn`.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// Number of the WAL segment that holds the byte at this position.
    pub fn segment(self, segment_size: u64) -> u64 {
        self.0 / segment_size
    }

    /// Number of the segment that holds the byte just before this position,
    /// which is where a record ending here lives.
    pub fn previous_segment(self, segment_size: u64) -> u64 {
        self.0.saturating_sub(1) / segment_size
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

impl FromStr for Lsn {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::Usage(format!("invalid LSN \"{s}\": expected two hexadecimal numbers like 0/16B3748"));
        let (hi, lo) = s.trim().split_once('/').ok_or_else(bad)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(bad());
        }
        let hi = u64::from_str_radix(hi, 16).map_err(|_| bad())?;
        let lo = u64::from_str_radix(lo, 16).map_err(|_| bad())?;
        Ok(Lsn(hi << 32 | lo))
    }
}

impl Serialize for Lsn {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The file name of WAL segment `segno` on timeline `tli` (PostgreSQL's `XLogFileName`).
pub fn wal_file_name(tli: u32, segno: u64, segment_size: u64) -> String {
    let per_id = 0x1_0000_0000u64 / segment_size;
    format!("{:08X}{:08X}{:08X}", tli, segno / per_id, segno % per_id)
}

/// Parses a WAL segment file name back into (timeline, segment number).
pub fn parse_wal_file_name(name: &str, segment_size: u64) -> Option<(u32, u64)> {
    if name.len() != 24 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let tli = u32::from_str_radix(&name[0..8], 16).ok()?;
    let log = u64::from_str_radix(&name[8..16], 16).ok()?;
    let seg = u64::from_str_radix(&name[16..24], 16).ok()?;
    let per_id = 0x1_0000_0000u64 / segment_size;
    if seg >= per_id {
        return None;
    }
    Some((tli, log * per_id + seg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_like_postgres() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn.0, 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert_eq!("0/0".parse::<Lsn>().unwrap(), Lsn(0));
        for bad in ["", "1", "x/1", "1/", "/1", "123456789/0", "1/2/3"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn wal_file_names_match_postgres() {
        let seg = 16 * 1024 * 1024;
        let lsn: Lsn = "1/2A000028".parse().unwrap();
        assert_eq!(wal_file_name(1, lsn.segment(seg), seg), "00000001000000010000002A");
        assert_eq!(parse_wal_file_name("00000001000000010000002A", seg), Some((1, lsn.segment(seg))));
        assert_eq!(Lsn(0x2000000).previous_segment(seg), 1);
        assert_eq!(parse_wal_file_name("000000010000000100000100", seg), None);
    }
}
