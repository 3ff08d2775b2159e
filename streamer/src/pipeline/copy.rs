//! The parallel copy: pieces of files in, chunks in N stream files out.
//!
//! One thread per stream. Threads take pieces (up to `piece_size` bytes of one
//! file) from a shared bounded channel, so streams stay balanced by bytes
//! whatever the file sizes, and a large relation segment is read by all
//! threads at once. Each thread runs the stages in order, each in its own
//! type: read ([`GuardedMap`]) → hash the piece → append to a
//! [`ChunkBuilder`] → when the chunk is full, run the filter stack ([`ChunkEncoder`]) →
//! hash and write ([`StreamWriter`]). Results go back as `Result`s when the
//! threads are joined.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver};

use crate::blkref::RELSEG_BLOCKS;
use crate::checksum::{self, BLCKSZ};

use crate::codec::{ChunkEncoder, Compression};
use crate::error::{Error, Result};
use crate::guard::GuardedMap;
use crate::hash::{sha256, Digest};
use crate::pgdata::SourceFile;
use crate::progress::Progress;
use crate::stream::{ChunkBuilder, StreamWriter};

/// Up to `piece_size` bytes of one file, read and hashed as a unit.
#[derive(Clone, Copy, Debug)]
pub struct Piece {
    pub file: u32,
    pub index: u32,
    pub offset: u64,
    pub len: u64,
}

#[derive(Clone, Copy, Debug)]
pub struct CopyConfig {
    pub compression: Compression,
    /// The backup's chunk key, in an encrypted repository: chunks are
    /// sealed after compression.
    pub chunk_key: Option<crate::crypt::ChunkKey>,
    /// A chunk is closed once its raw size reaches this.
    pub chunk_size: usize,
    pub piece_size: u64,
    /// Upper bound on bytes read per second, over all threads (`--max-rate`).
    pub max_rate: Option<u64>,
    /// Check the page checksums of relation files, with pg_basebackup's rules
    /// for a backup that started at this LSN.
    pub verify_checksums_before: Option<u64>,
    /// The cluster's block size and blocks per segment (from pg_control),
    /// for page checksums.
    pub block_size: usize,
    pub relseg_blocks: u32,
}

impl Default for CopyConfig {
    fn default() -> Self {
        CopyConfig {
            compression: Compression::default(),
            chunk_key: None,
            chunk_size: 4 << 20,
            piece_size: 1 << 20,
            max_rate: None,
            verify_checksums_before: None,
            block_size: BLCKSZ,
            relseg_blocks: RELSEG_BLOCKS,
        }
    }
}

/// Holds the copy under `max_rate` bytes per second, shared by all threads.
struct Throttle {
    rate: Option<u64>,
    began: Instant,
    bytes: AtomicU64,
}

impl Throttle {
    fn new(rate: Option<u64>) -> Self {
        Throttle { rate, began: Instant::now(), bytes: AtomicU64::new(0) }
    }

    /// Accounts for `n` bytes and sleeps until they fit under the rate.
    fn take(&self, n: u64) {
        let Some(rate) = self.rate else { return };
        let total = self.bytes.fetch_add(n, Ordering::Relaxed) + n;
        let due = Duration::from_secs_f64(total as f64 / rate as f64);
        let elapsed = self.began.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
    }
}

/// What the copy learned about the files it read.
#[derive(Debug, Default)]
pub struct CopyOutcome {
    /// (file, piece index, digest of the bytes stored)
    pub digests: Vec<(u32, u32, Digest)>,
    /// (file, stream, chunk), one per distinct chunk a file's bytes went to
    pub locations: Vec<(u32, u16, u32)>,
    pub truncated: Vec<u32>,
    pub vanished: Vec<u32>,
    pub bytes_read: u64,
    /// (file, absolute block, stored checksum, computed checksum) of pages
    /// that failed their checksum twice.
    pub checksum_failures: Vec<(u32, u32, u16, u16)>,
    pub pages_checked: u64,
    pub checksum_secs: f64,
}

impl CopyOutcome {
    pub fn merge(&mut self, o: CopyOutcome) {
        self.checksum_failures.extend(o.checksum_failures);
        self.pages_checked += o.pages_checked;
        self.checksum_secs += o.checksum_secs;
        self.digests.extend(o.digests);
        self.locations.extend(o.locations);
        self.truncated.extend(o.truncated);
        self.vanished.extend(o.vanished);
        self.bytes_read += o.bytes_read;
    }
}

/// Copies `pieces` of `files` into the streams, one thread per writer.
pub fn copy_pieces(
    files: &[SourceFile],
    pieces: Vec<Piece>,
    writers: &mut [StreamWriter],
    cfg: &CopyConfig,
    progress: &Progress,
) -> Result<CopyOutcome> {
    let (tx, rx) = bounded::<Piece>(writers.len() * 4);
    let failed = AtomicBool::new(false);
    let throttle = Throttle::new(cfg.max_rate);
    // Pieces left per file, so progress can count files as they complete.
    let remaining: Vec<AtomicU32> = (0..files.len()).map(|_| AtomicU32::new(0)).collect();
    for p in &pieces {
        if remaining[p.file as usize].fetch_add(1, Ordering::Relaxed) == 0 {
            progress.add_files(1);
        }
    }
    let remaining = &remaining;
    std::thread::scope(|s| {
        let handles: Vec<_> = writers
            .iter_mut()
            .map(|w| {
                let rx = rx.clone();
                let (failed, throttle) = (&failed, &throttle);
                s.spawn(move || {
                    let r = stream_worker(files, rx, w, cfg, progress, throttle, remaining);
                    if r.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    r
                })
            })
            .collect();
        drop(rx);
        for p in pieces {
            if failed.load(Ordering::Relaxed) || progress.check_cancel().is_err() || tx.send(p).is_err() {
                break;
            }
        }
        drop(tx);
        let mut outcome = CopyOutcome::default();
        let mut first_err = None;
        for h in handles {
            match h.join().expect("copy thread panicked") {
                Ok(o) => outcome.merge(o),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        progress.check_cancel()?;
        match first_err {
            Some(e) => Err(e),
            None => Ok(outcome),
        }
    })
}

fn stream_worker(
    files: &[SourceFile],
    rx: Receiver<Piece>,
    writer: &mut StreamWriter,
    cfg: &CopyConfig,
    progress: &Progress,
    throttle: &Throttle,
    remaining: &[AtomicU32],
) -> Result<CopyOutcome> {
    let mut encoder = ChunkEncoder::new(&crate::codec::stack(cfg.compression, cfg.chunk_key.is_some()), cfg.chunk_key)?;
    let mut chunk = ChunkBuilder::with_capacity(cfg.chunk_size + cfg.piece_size as usize + 4096);
    let mut stored = Vec::new();
    let mut out = CopyOutcome::default();
    let mut open: Option<(u32, File)> = None;
    let piece_done = |file: u32| {
        if remaining[file as usize].fetch_sub(1, Ordering::Relaxed) == 1 {
            progress.file_done();
        }
    };
    for piece in rx {
        progress.check_cancel()?;
        let src = &files[piece.file as usize];
        if open.as_ref().map(|(f, _)| *f) != Some(piece.file) {
            // Never through a symbolic link: the scan listed a regular file.
            open = match File::options().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(&src.abs) {
                Ok(f) => Some((piece.file, f)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    out.vanished.push(piece.file);
                    None
                }
                Err(e) => return Err(Error::Io { op: "open", path: src.abs.clone(), source: e }),
            };
        }
        let Some((_, file)) = &open else {
            piece_done(piece.file);
            continue;
        };
        throttle.take(piece.len);
        let map = GuardedMap::map(file, piece.offset, piece.len as usize).map_err(Error::io("map", &src.abs))?;
        // The live file is read exactly once, into the chunk; the digest and
        // the page checksums are taken from that copy, so they describe the
        // stored bytes even when PostgreSQL writes or truncates the file
        // meanwhile.
        let data = chunk.push(piece.file, piece.offset, map.data());
        let truncated = map.truncated();
        drop(map);
        if let Some(start) = cfg.verify_checksums_before {
            let t = Instant::now();
            check_pages(file, src, piece, data, start, cfg, &mut out);
            out.checksum_secs += t.elapsed().as_secs_f64();
        }
        out.digests.push((piece.file, piece.index, sha256(data)));
        let loc = (piece.file, writer.index, writer.next_chunk());
        if out.locations.last() != Some(&loc) {
            out.locations.push(loc);
        }
        if truncated {
            out.truncated.push(piece.file);
        }
        out.bytes_read += piece.len;
        progress.add(piece.len);
        piece_done(piece.file);
        if chunk.raw_len() >= cfg.chunk_size {
            flush(&mut chunk, &mut encoder, &mut stored, writer)?;
        }
    }
    if !chunk.is_empty() {
        flush(&mut chunk, &mut encoder, &mut stored, writer)?;
    }
    Ok(out)
}

/// Checks the page checksums of a piece of a relation file, as pg_basebackup
/// does: pages that are new or changed since the backup started are skipped,
/// a mismatch is read again once (straight from the file: the page may have
/// been half written), and a second mismatch is a failure.
fn check_pages(
    file: &File,
    src: &SourceFile,
    piece: Piece,
    data: &[u8],
    start: u64,
    cfg: &CopyConfig,
    out: &mut CopyOutcome,
) {
    use std::os::unix::fs::FileExt;
    let Some(segno) = checksum::segment_of_checksummed_file(&src.rel) else { return };
    let bs = cfg.block_size;
    let first = segno as u64 * cfg.relseg_blocks as u64 + piece.offset / bs as u64;
    let mut again = vec![0u8; bs];
    for (k, page) in data.chunks_exact(bs).enumerate() {
        if !checksum::worth_checking(page, start) {
            continue;
        }
        out.pages_checked += 1;
        let blkno = (first + k as u64) as u32;
        let stored = checksum::header(page).checksum;
        if checksum::page_checksum(page, blkno) == stored {
            continue;
        }
        if file.read_exact_at(&mut again, piece.offset + (k * bs) as u64).is_err() {
            continue; // truncated meanwhile: WAL replay takes care of it
        }
        if !checksum::worth_checking(&again, start) {
            continue;
        }
        let (stored, computed) = (checksum::header(&again).checksum, checksum::page_checksum(&again, blkno));
        if stored != computed {
            out.checksum_failures.push((piece.file, blkno, stored, computed));
        }
    }
}

fn flush(
    chunk: &mut ChunkBuilder,
    encoder: &mut ChunkEncoder,
    stored: &mut Vec<u8>,
    writer: &mut StreamWriter,
) -> Result<()> {
    let raw = chunk.finish();
    encoder.encode(raw, stored, writer.name(), writer.next_chunk())?;
    writer.append(stored, raw.len())?;
    chunk.reset();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file that shrank between the scan and the copy: the pieces past its
    /// new end are stored as zeros and the file is flagged truncated.
    #[test]
    fn pieces_past_a_new_end_are_zeros_and_flagged() {
        let dir = std::env::temp_dir().join(format!("bs-copy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let abs = dir.join("16384");
        std::fs::write(&abs, vec![7u8; 8192]).unwrap();
        let src = SourceFile { rel: "base/5/16384".into(), abs, size: 4 << 20, mode: 0o600, uid: 0, gid: 0, mtime: 0 };
        let pieces: Vec<Piece> =
            (0..4).map(|i| Piece { file: 0, index: i, offset: i as u64 * (1 << 20), len: 1 << 20 }).collect();
        let store = crate::storage::memory::MemoryStore::new("copy");
        let mut writers = vec![StreamWriter::create(&store, "backups/x", 0, "20261127T031500F").unwrap()];
        let out = copy_pieces(&[src], pieces, &mut writers, &CopyConfig::default(), &Progress::default()).unwrap();
        assert_eq!(out.truncated.iter().filter(|&&f| f == 0).count(), 4, "{:?}", out.truncated);
        assert_eq!(out.digests.len(), 4);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
