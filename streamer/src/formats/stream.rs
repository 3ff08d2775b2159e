//! Stream files and the chunks inside them; the only code that reads or writes their bytes.
//!
//! A stream file (`stream-NN.bsz`) is a 32-byte header followed by chunks laid
//! end to end. The header is
//!
//! ```text
//! magic "BLKSTRM\0" (8) | format version u32 LE | stream number u32 LE | backup id (16, ASCII, zero-padded)
//! ```
//!
//! Each chunk is one independently compressed unit (a zstd frame, or the raw
//! bytes with `--compress none`); its offset, stored and raw lengths and the
//! SHA-256 of its stored bytes live in the manifest, so a chunk is checked
//! before it is decompressed. Decompressed, a chunk is
//!
//! ```text
//! magic "BSC1" (4) | record count u32 LE | records
//! record: file index u32 LE | length u32 LE | byte offset u64 LE | length bytes
//! ```
//!
//! where the file index points into the manifest's file list and the record's
//! bytes belong at that offset of that file.

use std::fmt;

use crate::error::{Error, Result};
use crate::hash::{sha256, to_hex};
use crate::manifest::{limits, ChunkMeta};
use crate::storage::{ObjectReader, ObjectWriter, Store};

pub const STREAM_MAGIC: &[u8; 8] = b"BLKSTRM\0";
pub const STREAM_VERSION: u32 = 1;
pub const HEADER_LEN: u64 = 32;
pub const CHUNK_MAGIC: &[u8; 4] = b"BSC1";
const CHUNK_HEADER_LEN: usize = 8;
const RECORD_HEADER_LEN: usize = 16;

pub fn stream_file_name(index: usize) -> String {
    format!("stream-{index:02}.bsz")
}

/// `stream-NN.bsz` (two or more digits).
pub fn is_stream_file_name(name: &str) -> bool {
    name.strip_prefix("stream-")
        .and_then(|r| r.strip_suffix(".bsz"))
        .is_some_and(|n| n.len() >= 2 && n.bytes().all(|b| b.is_ascii_digit()))
}

fn header(index: u32, backup_id: &str) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[0..8].copy_from_slice(STREAM_MAGIC);
    h[8..12].copy_from_slice(&STREAM_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&index.to_le_bytes());
    let id = backup_id.as_bytes();
    let n = id.len().min(16);
    h[16..16 + n].copy_from_slice(&id[..n]);
    h
}

/// Builds the decompressed form of one chunk.
pub struct ChunkBuilder {
    buf: Vec<u8>,
    records: u32,
}

impl ChunkBuilder {
    pub fn with_capacity(bytes: usize) -> Self {
        let mut buf = Vec::with_capacity(bytes);
        buf.extend_from_slice(&[0u8; CHUNK_HEADER_LEN]);
        ChunkBuilder { buf, records: 0 }
    }

    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    pub fn raw_len(&self) -> usize {
        self.buf.len()
    }

    /// Appends the bytes that belong at `offset` of file `file`; returns
    /// the copy as it will be stored.
    pub fn push(&mut self, file: u32, offset: u64, data: &[u8]) -> &[u8] {
        let len = u32::try_from(data.len()).expect("a record is at most one piece, far below 4 GiB");
        self.buf.extend_from_slice(&file.to_le_bytes());
        self.buf.extend_from_slice(&len.to_le_bytes());
        self.buf.extend_from_slice(&offset.to_le_bytes());
        let at = self.buf.len();
        self.buf.extend_from_slice(data);
        self.records += 1;
        &self.buf[at..]
    }

    /// The finished chunk; call [`ChunkBuilder::reset`] before reuse.
    pub fn finish(&mut self) -> &[u8] {
        self.buf[0..4].copy_from_slice(CHUNK_MAGIC);
        self.buf[4..8].copy_from_slice(&self.records.to_le_bytes());
        &self.buf
    }

    pub fn reset(&mut self) {
        self.buf.truncate(CHUNK_HEADER_LEN);
        self.records = 0;
    }
}

/// One record of a decompressed chunk.
#[derive(Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub file: u32,
    pub offset: u64,
    pub data: &'a [u8],
}

/// Splits a decompressed chunk into its records, checking every header field
/// against the chunk's bounds. `what` names the chunk in errors.
pub fn parse_chunk<'a>(raw: &'a [u8], what: &dyn fmt::Display) -> Result<Vec<Record<'a>>> {
    if raw.len() < CHUNK_HEADER_LEN {
        return Err(Error::Corrupt(format!("{what} is {} bytes, shorter than its header", raw.len())));
    }
    if &raw[0..4] != CHUNK_MAGIC {
        return Err(Error::Corrupt(format!("{what} has bad magic {:02x?}, expected {:02x?}", &raw[0..4], CHUNK_MAGIC)));
    }
    let count = u32::from_le_bytes(raw[4..8].try_into().unwrap()) as usize;
    let mut records = Vec::with_capacity(count.min(raw.len() / RECORD_HEADER_LEN));
    let mut pos = CHUNK_HEADER_LEN;
    for i in 0..count {
        let Some(h) = raw.get(pos..pos + RECORD_HEADER_LEN) else {
            return Err(Error::Corrupt(format!("{what}: record {i} of {count} starts past the end at byte {pos}")));
        };
        let file = u32::from_le_bytes(h[0..4].try_into().unwrap());
        let len = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
        let offset = u64::from_le_bytes(h[8..16].try_into().unwrap());
        pos += RECORD_HEADER_LEN;
        let Some(data) = raw.get(pos..pos + len) else {
            return Err(Error::Corrupt(format!(
                "{what}: record {i} claims {len} bytes at byte {pos}, but the chunk ends at {}",
                raw.len()
            )));
        };
        records.push(Record { file, offset, data });
        pos += len;
    }
    if pos != raw.len() {
        return Err(Error::Corrupt(format!("{what}: {} bytes follow the last of {count} records", raw.len() - pos)));
    }
    Ok(records)
}

/// Appends stored chunks to a new stream object, hashing each on its way out.
pub struct StreamWriter {
    pub index: u16,
    /// The failpoint hit after each chunk (see [`crate::failpoint`]).
    pub failpoint: &'static str,
    name: String,
    what: String,
    out: Box<dyn ObjectWriter>,
    offset: u64,
    pub chunks: Vec<ChunkMeta>,
}

impl StreamWriter {
    /// Creates stream `index` of `backup_id` under the key prefix `prefix`.
    pub fn create(store: &dyn Store, prefix: &str, index: u16, backup_id: &str) -> Result<Self> {
        let name = stream_file_name(index as usize);
        let key = crate::storage::join(prefix, &name);
        let mut out = store.create(&key)?;
        out.write_all(&header(index.into(), backup_id))?;
        Ok(StreamWriter {
            index,
            failpoint: "copy-chunk",
            name,
            what: store.describe(&key),
            out,
            offset: HEADER_LEN,
            chunks: Vec::new(),
        })
    }

    /// The stream's name in its backup (`stream-NN.bsz`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Index the next appended chunk will get.
    pub fn next_chunk(&self) -> u32 {
        self.chunks.len() as u32
    }

    /// Writes one stored chunk and records where it lives and its digest.
    pub fn append(&mut self, stored: &[u8], raw_len: usize) -> Result<u32> {
        let digest = sha256(stored);
        self.out.write_all(stored)?;
        crate::failpoint::hit(self.failpoint);
        let n = stored.len() as u64;
        self.chunks.push(ChunkMeta { offset: self.offset, stored: n, raw: raw_len as u64, sha256: to_hex(&digest) });
        self.offset += n;
        Ok(self.chunks.len() as u32 - 1)
    }

    /// Size of the stream so far.
    pub fn bytes(&self) -> u64 {
        self.offset
    }

    /// How messages name the stream.
    pub fn describe(&self) -> &str {
        &self.what
    }

    /// Makes the stream durable and returns its name, size and chunk list.
    pub fn finish(self) -> Result<(String, u64, Vec<ChunkMeta>)> {
        self.out.finish()?;
        Ok((self.name, self.offset, self.chunks))
    }
}

/// Reads chunks of one stream object, checking each against its digest.
/// Shared by reading threads (reads are positional).
pub struct StreamReader {
    what: String,
    object: Box<dyn ObjectReader>,
    len: u64,
}

impl StreamReader {
    /// Opens object `key` (in a directory: a regular file, reached without
    /// following a symbolic link) and checks its header names stream `index`
    /// of `backup_id`.
    pub fn open(store: &dyn Store, key: &str, index: u16, backup_id: &str) -> Result<Self> {
        let what = store.describe(key);
        let object = store.open(key)?;
        let len = object.len();
        let mut h = [0u8; HEADER_LEN as usize];
        object
            .read_exact_at(&mut h, 0)
            .map_err(|e| Error::Corrupt(format!("stream file \"{what}\" has no complete header: {e}")))?;
        let expected = header(index.into(), backup_id);
        if h[0..8] != expected[0..8] {
            return Err(Error::Corrupt(format!(
                "stream file \"{what}\" has bad magic {:02x?}, expected {:02x?}",
                &h[0..8],
                STREAM_MAGIC
            )));
        }
        let version = u32::from_le_bytes(h[8..12].try_into().unwrap());
        if version != STREAM_VERSION {
            return Err(Error::Corrupt(format!(
                "stream file \"{what}\" has format version {version}, expected {STREAM_VERSION}"
            )));
        }
        if h != expected {
            return Err(Error::Corrupt(format!(
                "stream file \"{what}\" belongs to another stream or backup (header names stream {} of \"{}\", expected stream {index} of \"{backup_id}\")",
                u32::from_le_bytes(h[12..16].try_into().unwrap()),
                String::from_utf8_lossy(&h[16..]).trim_end_matches('\0')
            )));
        }
        Ok(StreamReader { what, object, len })
    }

    /// How messages name the stream.
    pub fn describe(&self) -> &str {
        &self.what
    }

    /// Reads the stored bytes of a chunk into `buf` and checks their SHA-256.
    /// The chunk must lie inside the file and within the format's limits
    /// before anything is allocated for it. `what` names the chunk in errors.
    pub fn read_chunk(&self, meta: &ChunkMeta, buf: &mut Vec<u8>, what: &dyn fmt::Display) -> Result<()> {
        let end = meta.offset.checked_add(meta.stored);
        if meta.stored > limits::stored_bound(limits::CHUNK_RAW) || end.is_none_or(|e| e > self.len) {
            return Err(Error::Corrupt(format!(
                "{what} is missing: {} bytes at offset {} lie past the end of \"{}\" ({} bytes)",
                meta.stored, meta.offset, self.what, self.len
            )));
        }
        buf.clear();
        buf.resize(meta.stored as usize, 0);
        self.object.read_exact_at(buf, meta.offset).map_err(|e| {
            Error::Corrupt(format!(
                "{what} is missing: could not read {} bytes at offset {}: {e}",
                meta.stored, meta.offset
            ))
        })?;
        let found = to_hex(&sha256(buf));
        if found != meta.sha256 {
            return Err(Error::Corrupt(format!("{what} is damaged: sha256 {found}, expected {}", meta.sha256)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_round_trip() {
        let mut b = ChunkBuilder::with_capacity(64);
        assert!(b.is_empty());
        b.push(7, 8192, b"hello");
        b.push(1, 0, b"");
        let raw = b.finish().to_vec();
        let recs = parse_chunk(&raw, &"chunk 0").unwrap();
        assert_eq!(
            recs,
            vec![Record { file: 7, offset: 8192, data: b"hello" }, Record { file: 1, offset: 0, data: b"" }]
        );
        b.reset();
        assert!(b.is_empty());
    }

    #[test]
    fn damaged_chunks_are_refused_with_position() {
        let mut b = ChunkBuilder::with_capacity(64);
        b.push(7, 0, b"hello");
        let raw = b.finish().to_vec();
        let err = parse_chunk(&raw[..raw.len() - 1], &"chunk 3 of stream-01.bsz").unwrap_err().to_string();
        assert!(err.contains("chunk 3 of stream-01.bsz") && err.contains("record 0"), "{err}");
        let mut bad = raw.clone();
        bad[0] = b'X';
        assert!(parse_chunk(&bad, &"c").unwrap_err().to_string().contains("bad magic"));
        let mut long = raw.clone();
        long.push(0);
        assert!(parse_chunk(&long, &"c").unwrap_err().to_string().contains("follow the last"));
    }

    #[test]
    fn stream_write_read_and_tamper() {
        let store = crate::storage::memory::MemoryStore::new("streams");
        let mut w = StreamWriter::create(&store, "backups/x", 1, "20261127T031500F").unwrap();
        w.append(b"first", 5).unwrap();
        w.append(b"second", 6).unwrap();
        let (name, bytes, chunks) = w.finish().unwrap();
        assert_eq!((name.as_str(), bytes), ("stream-01.bsz", HEADER_LEN + 11));
        let key = format!("backups/x/{name}");
        let r = StreamReader::open(&store, &key, 1, "20261127T031500F").unwrap();
        let mut buf = Vec::new();
        r.read_chunk(&chunks[1], &mut buf, &"chunk 1").unwrap();
        assert_eq!(buf, b"second");
        assert!(StreamReader::open(&store, &key, 2, "20261127T031500F").is_err());
        let past = ChunkMeta { offset: bytes - 2, stored: 5, ..chunks[1].clone() };
        let err = r.read_chunk(&past, &mut buf, &"chunk 9").unwrap_err().to_string();
        assert!(err.contains("chunk 9 is missing") && err.contains("past the end"), "{err}");
        let mut damaged = store.get(&key).unwrap();
        damaged[chunks[1].offset as usize] = b'S';
        store.replace(&key, damaged);
        let r = StreamReader::open(&store, &key, 1, "20261127T031500F").unwrap();
        let err = r.read_chunk(&chunks[1], &mut buf, &"chunk 1").unwrap_err().to_string();
        assert!(err.contains("chunk 1 is damaged"), "{err}");
    }
}
