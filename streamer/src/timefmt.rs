//! UTC timestamps without a calendar crate: backup ids and ISO 8601 strings.

use std::time::{SystemTime, UNIX_EPOCH};

/// (year, month, day, hour, minute, second) in UTC.
pub fn utc_parts(t: SystemTime) -> (i64, u32, u32, u32, u32, u32) {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day, (rem / 3600) as u32, (rem % 3600 / 60) as u32, (rem % 60) as u32)
}

/// Seconds since the epoch of a `20261127T031500` stamp.
pub fn parse_compact(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 15 || b[8] != b'T' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (h, mi, sec) = (num(9..11)?, num(11..13)?, num(13..15)?);
    // Howard Hinnant's days_from_civil.
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + h * 3600 + mi * 60 + sec).ok()
}

/// Seconds since the epoch of `2026-11-27T03:15:00Z` (as [`iso8601`] writes it).
pub fn parse_iso8601(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' || b[19] != b'Z'
    {
        return None;
    }
    let compact: String = [&s[0..4], &s[5..7], &s[8..10], "T", &s[11..13], &s[14..16], &s[17..19]].concat();
    parse_compact(&compact)
}

/// Seconds since the epoch of a timestamp as PostgreSQL's
/// `recovery_target_time` takes it: `YYYY-MM-DD HH:MM:SS[.fraction]`
/// (or with `T`), then `Z`, `UTC`, `+HH`, `+HHMM`, `+HH:MM` or `-...`;
/// without a zone, UTC.
pub fn parse_timestamp(s: &str) -> Option<f64> {
    let s = s.trim();
    if s.len() < 19 {
        return None;
    }
    let (date, rest) = s.split_at(10);
    let b = date.as_bytes();
    if b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let rest = rest.strip_prefix(' ').or_else(|| rest.strip_prefix('T'))?;
    let (clock, zone) = rest.split_at(8.min(rest.len()));
    let c = clock.as_bytes();
    if c.len() != 8 || c[2] != b':' || c[5] != b':' {
        return None;
    }
    let compact: String =
        [&date[0..4], &date[5..7], &date[8..10], "T", &clock[0..2], &clock[3..5], &clock[6..8]].concat();
    let mut secs = parse_compact(&compact)? as f64;
    let mut zone = zone;
    if let Some(frac) = zone.strip_prefix('.') {
        let end = frac.find(|c: char| !c.is_ascii_digit()).unwrap_or(frac.len());
        secs += format!("0.{}", &frac[..end]).parse::<f64>().ok()?;
        zone = &frac[end..];
    }
    let zone = zone.trim();
    let offset = match zone {
        "" | "Z" | "UTC" | "GMT" | "+00" | "-00" => 0.0,
        z if z.starts_with('+') || z.starts_with('-') => {
            let sign = if z.starts_with('-') { -1.0 } else { 1.0 };
            let digits: String = z[1..].chars().filter(|c| *c != ':').collect();
            let (h, m) = match digits.len() {
                2 => (digits.parse::<f64>().ok()?, 0.0),
                4 => (digits[..2].parse::<f64>().ok()?, digits[2..].parse::<f64>().ok()?),
                _ => return None,
            };
            sign * (h * 3600.0 + m * 60.0)
        }
        _ => return None,
    };
    Some(secs - offset)
}

/// `20261127T031500` — the stamp a backup id starts with.
pub fn compact(t: SystemTime) -> String {
    let (y, mo, d, h, mi, s) = utc_parts(t);
    format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}")
}

/// `2026-11-27T03:15:00Z`.
pub fn iso8601(t: SystemTime) -> String {
    let (y, mo, d, h, mi, s) = utc_parts(t);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn known_dates() {
        assert_eq!(iso8601(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_795_749_300);
        assert_eq!(iso8601(t), "2026-11-27T03:15:00Z");
        assert_eq!(compact(t), "20261127T031500");
        assert_eq!(parse_compact("20261127T031500F"), Some(1_795_749_300));
        assert_eq!(parse_compact("20000229T000000"), Some(951_782_400));
        assert_eq!(parse_iso8601("2026-11-27T03:15:00Z"), Some(1_795_749_300));
        assert_eq!(parse_iso8601("2026-11-27 03:15:00"), None);
        assert_eq!(parse_timestamp("2026-11-27 03:15:00"), Some(1_795_749_300.0));
        assert_eq!(parse_timestamp("2026-11-27 04:15:00+01"), Some(1_795_749_300.0));
        assert_eq!(parse_timestamp("2026-11-27T03:15:00.5Z"), Some(1_795_749_300.5));
        assert_eq!(parse_timestamp("2026-11-26 22:45:00-04:30"), Some(1_795_749_300.0));
        assert_eq!(parse_timestamp("yesterday"), None);
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(iso8601(leap), "2000-02-29T00:00:00Z");
    }
}
