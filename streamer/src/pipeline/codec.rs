//! What a chunk goes through between its raw records and the bytes stored
//! in a stream: a stack of filters, recorded per backup in the manifest.
//!
//! The write side runs the filters in order ([`ChunkEncoder`]), the read
//! side undoes them in reverse ([`ChunkDecoder`]), as pgBackRest stacks its
//! I/O filters: compression (zstd at a chosen level, or none), then, in an
//! encrypted repository, AES-256-GCM ([`crate::crypt`]) with the chunk's
//! stream and index as associated data. Every chunk goes through the
//! stack on its own (one zstd frame each), so any chunk can be checked and
//! restored without its neighbours, and each thread keeps one encoder or
//! decoder with its contexts for every chunk it handles.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::crypt::{ChunkCipher, ChunkKey};
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

/// One stage of the stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "filter", rename_all = "lowercase")]
pub enum Filter {
    /// One zstd frame per chunk.
    Zstd { level: i32 },
    /// Sealed with the backup's chunk key ([`crate::crypt`]).
    #[serde(rename = "aes-256-gcm")]
    Aes256Gcm,
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Filter::Zstd { level } => write!(f, "zstd:{level}"),
            Filter::Aes256Gcm => write!(f, "aes-256-gcm"),
        }
    }
}

/// The stack for a compression choice: `[zstd]`, or empty for none.
pub fn filters_for(c: Compression) -> Vec<Filter> {
    stack(c, false)
}

/// The stack for a compression choice, then encryption when asked.
pub fn stack(c: Compression, encrypted: bool) -> Vec<Filter> {
    let mut s = match c {
        Compression::None => Vec::new(),
        Compression::Zstd { level } => vec![Filter::Zstd { level }],
    };
    if encrypted {
        s.push(Filter::Aes256Gcm);
    }
    s
}

/// The compression a stack applies (for display and for the archive's header).
pub fn compression_of(filters: &[Filter]) -> Compression {
    filters
        .iter()
        .find_map(|f| match *f {
            Filter::Zstd { level } => Some(Compression::Zstd { level }),
            Filter::Aes256Gcm => None,
        })
        .unwrap_or(Compression::None)
}

/// Whether the stack encrypts.
pub fn is_encrypted(filters: &[Filter]) -> bool {
    filters.contains(&Filter::Aes256Gcm)
}

/// `zstd:3`, or `none` for an empty stack; stages joined by `+`.
pub fn describe(filters: &[Filter]) -> String {
    if filters.is_empty() {
        return "none".into();
    }
    filters.iter().map(Filter::to_string).collect::<Vec<_>>().join("+")
}

/// Refuses a stack this build cannot undo: anything but an optional
/// compression stage followed by an optional encryption stage (a manifest
/// from a hostile or newer writer).
pub fn check_stack(filters: &[Filter]) -> Result<()> {
    let ok =
        matches!(filters, [] | [Filter::Zstd { .. }] | [Filter::Aes256Gcm] | [Filter::Zstd { .. }, Filter::Aes256Gcm]);
    if !ok {
        return Err(Error::Corrupt(format!(
            "filter stack \"{}\" is not compression then encryption, each at most once",
            describe(filters)
        )));
    }
    Ok(())
}

fn cipher_for(filters: &[Filter], key: Option<ChunkKey>) -> Result<Option<ChunkCipher>> {
    match (is_encrypted(filters), key) {
        (false, _) => Ok(None),
        (true, Some(k)) => Ok(Some(ChunkCipher::new(&k))),
        (true, None) => Err(Error::Usage("the backup's chunks are encrypted and no key was given".into())),
    }
}

/// Runs a chunk through the stack, write side.
pub struct ChunkEncoder {
    compressor: Compressor,
    cipher: Option<ChunkCipher>,
    scratch: Vec<u8>,
}

impl ChunkEncoder {
    /// `key`: the backup's chunk key, needed when the stack encrypts.
    pub fn new(filters: &[Filter], key: Option<ChunkKey>) -> Result<Self> {
        check_stack(filters)?;
        Ok(ChunkEncoder {
            compressor: Compressor::new(compression_of(filters))?,
            cipher: cipher_for(filters, key)?,
            scratch: Vec::new(),
        })
    }

    /// The stored form of `raw`, chunk `chunk` of `stream`, in `out` (cleared first).
    pub fn encode(&mut self, raw: &[u8], out: &mut Vec<u8>, stream: &str, chunk: u32) -> Result<()> {
        match &self.cipher {
            None => self.compressor.compress(raw, out),
            Some(c) => {
                self.compressor.compress(raw, &mut self.scratch)?;
                c.seal(stream, chunk, &self.scratch, out);
                Ok(())
            }
        }
    }
}

/// Undoes the stack, read side.
pub struct ChunkDecoder {
    decompressor: Decompressor,
    cipher: Option<ChunkCipher>,
    scratch: Vec<u8>,
}

impl ChunkDecoder {
    /// `key`: the backup's chunk key, needed when the stack encrypts.
    pub fn new(filters: &[Filter], key: Option<ChunkKey>) -> Result<Self> {
        check_stack(filters)?;
        Ok(ChunkDecoder {
            decompressor: Decompressor::new(compression_of(filters))?,
            cipher: cipher_for(filters, key)?,
            scratch: Vec::new(),
        })
    }

    /// The raw form of `stored`, chunk `chunk` of `stream`, in `out`, which
    /// must come to exactly `raw_len` bytes. An encrypted chunk's tag is
    /// checked before anything is decompressed.
    pub fn decode(
        &mut self,
        stored: &[u8],
        raw_len: usize,
        out: &mut Vec<u8>,
        stream: &str,
        chunk: u32,
        what: &dyn fmt::Display,
    ) -> Result<()> {
        match &self.cipher {
            None => self.decompressor.decompress(stored, raw_len, out, what),
            Some(c) => {
                if !c.open(stream, chunk, stored, &mut self.scratch) {
                    return Err(Error::Corrupt(format!(
                        "{what} fails its authentication tag: it was altered, moved or sealed with another key"
                    )));
                }
                self.decompressor.decompress(&self.scratch, raw_len, out, what)
            }
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
            Compression::Zstd { level } => {
                let mut z = zstd::bulk::Compressor::new(level)
                    .map_err(|e| Error::Usage(format!("could not set up zstd level {level}: {e}")))?;
                // Every frame carries the XXH64 of its content, which the
                // decompressor checks: a decoding fault is caught without
                // re-hashing restored bytes with SHA-256.
                z.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))
                    .map_err(|e| Error::Usage(format!("could not enable zstd frame checksums: {e}")))?;
                Some(z)
            }
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
    fn frames_carry_a_content_checksum_that_decoding_checks() {
        let raw: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let stack = filters_for(Compression::Zstd { level: 3 });
        let mut stored = Vec::new();
        ChunkEncoder::new(&stack, None).unwrap().encode(&raw, &mut stored, "s", 1).unwrap();
        // Frame header descriptor: bit 2 is the content checksum flag.
        assert_eq!(&stored[..4], &[0x28, 0xb5, 0x2f, 0xfd]);
        assert_ne!(stored[4] & 0x04, 0, "content checksum flag set");
        let n = stored.len();
        stored[n - 1] ^= 0x40;
        let mut out = Vec::new();
        let err = ChunkDecoder::new(&stack, None).unwrap().decode(&stored, raw.len(), &mut out, "s", 1, &"chunk 1");
        let err = err.unwrap_err().to_string();
        assert!(err.contains("chunk 1 does not decompress") && err.contains("checksum"), "{err}");
    }

    #[test]
    fn stacks_round_trip_and_name_themselves() {
        let raw: Vec<u8> = (0..50_000u32).map(|i| (i % 13) as u8).collect();
        for c in [Compression::None, Compression::Zstd { level: 5 }] {
            let stack = filters_for(c);
            assert_eq!(compression_of(&stack), c);
            let mut stored = Vec::new();
            ChunkEncoder::new(&stack, None).unwrap().encode(&raw, &mut stored, "s", 1).unwrap();
            let mut out = Vec::new();
            ChunkDecoder::new(&stack, None).unwrap().decode(&stored, raw.len(), &mut out, "s", 1, &"chunk 1").unwrap();
            assert_eq!(out, raw);
        }
        assert_eq!(describe(&[]), "none");
        assert_eq!(describe(&filters_for(Compression::Zstd { level: 3 })), "zstd:3");
        let json = serde_json::to_string(&filters_for(Compression::Zstd { level: 3 })).unwrap();
        assert_eq!(json, r#"[{"filter":"zstd","level":3}]"#);
        let two = [Filter::Zstd { level: 1 }, Filter::Zstd { level: 2 }];
        assert!(ChunkDecoder::new(&two, None).err().unwrap().to_string().contains("each at most once"));
        let backwards = [Filter::Aes256Gcm, Filter::Zstd { level: 1 }];
        assert!(ChunkDecoder::new(&backwards, None).is_err());
        // Encrypted: sealed after compression, bound to stream and index.
        let (ring, _) = crate::crypt::Keyring::create(&crate::crypt::KeySource::Raw([9; 32])).unwrap();
        let key = ring.chunk_key("20261129T120000F");
        let enc = stack(Compression::Zstd { level: 3 }, true);
        assert_eq!(describe(&enc), "zstd:3+aes-256-gcm");
        assert!(ChunkEncoder::new(&enc, None).is_err(), "no key, no encrypted stack");
        let mut stored = Vec::new();
        ChunkEncoder::new(&enc, Some(key)).unwrap().encode(&raw, &mut stored, "stream-00.bsz", 3).unwrap();
        let mut plain = Vec::new();
        ChunkEncoder::new(&filters_for(Compression::Zstd { level: 3 }), None)
            .unwrap()
            .encode(&raw, &mut plain, "stream-00.bsz", 3)
            .unwrap();
        assert_eq!(stored.len(), plain.len() + crate::crypt::OVERHEAD);
        let mut dec = ChunkDecoder::new(&enc, Some(key)).unwrap();
        let mut out = Vec::new();
        dec.decode(&stored, raw.len(), &mut out, "stream-00.bsz", 3, &"chunk 3").unwrap();
        assert_eq!(out, raw);
        let err = dec.decode(&stored, raw.len(), &mut out, "stream-00.bsz", 4, &"chunk 4").unwrap_err().to_string();
        assert!(err.contains("chunk 4 fails its authentication tag"), "{err}");
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
