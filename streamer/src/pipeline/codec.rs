//! Compression of chunks: zstd at a chosen level, or none.
//!
//! Every chunk is compressed on its own into one zstd frame, so any chunk can
//! be checked and restored without its neighbours.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "algorithm", rename_all = "lowercase")]
pub enum Compression {
    None,
    Zstd { level: i32 },
}

impl Default for Compression {
    fn default() -> Self {
        Compression::Zstd { level: 3 }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compression::None => write!(f, "none"),
            Compression::Zstd { level } => write!(f, "zstd:{level}"),
        }
    }
}

impl FromStr for Compression {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let (algo, level) = match s.split_once(':') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        match (algo, level) {
            ("none", None) => Ok(Compression::None),
            ("zstd", None) => Ok(Compression::default()),
            ("zstd", Some(l)) => {
                let range = zstd::compression_level_range();
                match l.parse::<i32>() {
                    Ok(level) if range.contains(&level) && level != 0 => Ok(Compression::Zstd { level }),
                    _ => Err(Error::Usage(format!(
                        "invalid zstd level \"{l}\": expected an integer from 1 to {}",
                        range.end()
                    ))),
                }
            }
            _ => Err(Error::Usage(format!("invalid compression \"{s}\": expected zstd, zstd:LEVEL or none"))),
        }
    }
}

/// Compresses chunks, reusing one zstd context.
pub struct Compressor {
    zstd: Option<zstd::bulk::Compressor<'static>>,
}

impl Compressor {
    pub fn new(c: Compression) -> Result<Self> {
        let zstd = match c {
            Compression::None => None,
            Compression::Zstd { level } => Some(
                zstd::bulk::Compressor::new(level)
                    .map_err(|e| Error::Usage(format!("could not set up zstd level {level}: {e}")))?,
            ),
        };
        Ok(Compressor { zstd })
    }

    /// The same, compressing each input with `threads` threads (zstd's
    /// own multithreading; the frame is an ordinary one). For one large
    /// input at a time, like a WAL segment pushed by archive_command.
    pub fn with_threads(c: Compression, threads: usize) -> Result<Self> {
        let mut me = Compressor::new(c)?;
        if let (Some(z), true) = (&mut me.zstd, threads > 1) {
            z.set_parameter(zstd::zstd_safe::CParameter::NbWorkers(threads.min(16) as u32))
                .map_err(|e| Error::Usage(format!("could not use {threads} zstd threads: {e}")))?;
        }
        Ok(me)
    }

    /// Compresses `raw` into `out` (cleared first).
    pub fn compress(&mut self, raw: &[u8], out: &mut Vec<u8>) -> Result<()> {
        out.clear();
        match &mut self.zstd {
            None => out.extend_from_slice(raw),
            Some(z) => {
                out.reserve(zstd::zstd_safe::compress_bound(raw.len()));
                z.compress_to_buffer(raw, out)
                    .map_err(|e| Error::Corrupt(format!("zstd compression of {} bytes failed: {e}", raw.len())))?;
            }
        }
        Ok(())
    }
}

/// Decompresses chunks, reusing one zstd context.
pub struct Decompressor {
    zstd: Option<zstd::bulk::Decompressor<'static>>,
}

impl Decompressor {
    pub fn new(c: Compression) -> Result<Self> {
        let zstd = match c {
            Compression::None => None,
            Compression::Zstd { .. } => Some(
                zstd::bulk::Decompressor::new()
                    .map_err(|e| Error::Corrupt(format!("could not set up zstd decompression: {e}")))?,
            ),
        };
        Ok(Decompressor { zstd })
    }

    /// Decompresses `stored` into `out`, which must come to exactly `raw_len` bytes.
    /// `what` names the chunk in errors.
    pub fn decompress(
        &mut self,
        stored: &[u8],
        raw_len: usize,
        out: &mut Vec<u8>,
        what: &dyn fmt::Display,
    ) -> Result<()> {
        out.clear();
        if raw_len as u64 > crate::manifest::limits::CHUNK_RAW {
            return Err(Error::Corrupt(format!(
                "{what} claims {raw_len} raw bytes, more than a chunk can hold ({})",
                crate::manifest::limits::CHUNK_RAW
            )));
        }
        match &mut self.zstd {
            None => out.extend_from_slice(stored),
            Some(z) => {
                out.reserve(raw_len);
                z.decompress_to_buffer(stored, out)
                    .map_err(|e| Error::Corrupt(format!("{what} does not decompress: {e}")))?;
            }
        }
        if out.len() != raw_len {
            return Err(Error::Corrupt(format!("{what} decompresses to {} bytes, expected {raw_len}", out.len())));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        assert_eq!("none".parse::<Compression>().unwrap(), Compression::None);
        assert_eq!("zstd".parse::<Compression>().unwrap(), Compression::Zstd { level: 3 });
        assert_eq!("zstd:9".parse::<Compression>().unwrap(), Compression::Zstd { level: 9 });
        for bad in ["gzip", "zstd:", "zstd:x", "zstd:99", "none:1", "zstd:0"] {
            assert!(bad.parse::<Compression>().is_err(), "{bad}");
        }
    }

    #[test]
    fn round_trip_and_length_check() {
        let raw: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        for c in [Compression::None, Compression::Zstd { level: 3 }] {
            let mut stored = Vec::new();
            Compressor::new(c).unwrap().compress(&raw, &mut stored).unwrap();
            let mut d = Decompressor::new(c).unwrap();
            let mut out = Vec::new();
            d.decompress(&stored, raw.len(), &mut out, &"chunk 0").unwrap();
            assert_eq!(out, raw);
            let err = d.decompress(&stored, raw.len() + 1, &mut out, &"chunk 0").unwrap_err();
            assert!(err.to_string().contains("chunk 0"), "{err}");
        }
    }
}
