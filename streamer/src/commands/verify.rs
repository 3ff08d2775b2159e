//! Reading a backup's chunks back, in parallel: the shared core of restore and verify.
//!
//! [`check_chunks`] reads every stored chunk and checks its SHA-256, without
//! decompressing: restore runs it before it changes anything in place.
//! [`decode_chunks`] reads, checks, decompresses and parses every chunk,
//! checks each record against the manifest's file list, hands it to a
//! visitor (restore writes it) and returns every piece it saw (with its
//! digest when asked, [`PieceCheck`]), which [`check_file_digests`] compares
//! with the manifest. [`verify_backup`] checks everything, always.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::bounded;

use crate::codec::{ChunkDecoder, Filter};
use crate::crypt::{ChunkKey, Keyring};
use crate::error::{Error, Result};
use crate::hash::{file_digest, sha256, to_hex, Digest};
use crate::manifest::{ChunkMeta, FileEntry, Manifest};
use crate::progress::Progress;
use crate::repo::Repo;
use crate::stream::{parse_chunk, Record, StreamReader};

/// Names a chunk in messages: `chunk 3 of stream-01.bsz in backup 20261127T031500F`.
pub struct ChunkName<'a> {
    pub backup: &'a str,
    pub stream: &'a str,
    pub chunk: u32,
}

impl fmt::Display for ChunkName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "chunk {} of {} in backup {}", self.chunk, self.stream, self.backup)
    }
}

/// The files with bytes in a chunk, for error messages.
fn files_in(m: &Manifest, stream: u16, chunk: u32) -> String {
    let names: Vec<&str> =
        m.files.iter().filter(|f| f.chunks.contains(&(stream, chunk))).map(|f| f.path.as_str()).collect();
    match names.len() {
        0 => String::new(),
        1..=5 => format!(" (it holds {})", names.join(", ")),
        n => format!(" (it holds {} and {} more files)", names[..5].join(", "), n - 5),
    }
}

fn annotate(e: Error, m: &Manifest, stream: u16, chunk: u32) -> Error {
    match e {
        Error::Corrupt(msg) => Error::Corrupt(format!("{msg}{}", files_in(m, stream, chunk))),
        other => other,
    }
}

/// Opens every stream file of backup `m` (without following a symbolic
/// link; each header checked), in stream order.
pub fn open_streams(repo: &Repo, m: &Manifest) -> Result<Vec<StreamReader>> {
    m.streams
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let key = crate::storage::join(&Repo::backup_key(&m.backup_id), &s.name);
            StreamReader::open(repo.store(), &key, i as u16, &m.backup_id)
        })
        .collect()
}

/// Runs `work` on every chunk of the backup on `jobs` threads; stops at the
/// first error or when cancelled.
fn for_each_chunk<T: Send + Default>(
    streams: &[StreamReader],
    m: &Manifest,
    jobs: usize,
    progress: &Progress,
    only: Option<&[(u16, u32)]>,
    work: impl Fn(&StreamReader, u16, u32, &mut T) -> Result<()> + Sync,
) -> Result<Vec<T>> {
    let mut items: Vec<(u16, u32)> = Vec::new();
    match only {
        Some(list) => items.extend_from_slice(list),
        None => {
            for (s, st) in m.streams.iter().enumerate() {
                items.extend((0..st.chunks.len() as u32).map(|c| (s as u16, c)));
            }
        }
    }
    let (tx, rx) = bounded::<(u16, u32)>(jobs.max(1) * 4);
    let failed = AtomicBool::new(false);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..jobs.max(1))
            .map(|_| {
                let rx = rx.clone();
                let (failed, work) = (&failed, &work);
                s.spawn(move || -> Result<T> {
                    let mut acc = T::default();
                    for (stream, chunk) in rx {
                        progress.check_cancel()?;
                        let Some(reader) = streams.get(stream as usize) else {
                            failed.store(true, Ordering::Relaxed);
                            return Err(Error::Corrupt(format!(
                                "backup {} names stream {stream}, but has {} streams",
                                m.backup_id,
                                streams.len()
                            )));
                        };
                        if let Err(e) = work(reader, stream, chunk, &mut acc) {
                            failed.store(true, Ordering::Relaxed);
                            return Err(annotate(e, m, stream, chunk));
                        }
                    }
                    Ok(acc)
                })
            })
            .collect();
        drop(rx);
        for item in items {
            if failed.load(Ordering::Relaxed) || progress.check_cancel().is_err() || tx.send(item).is_err() {
                break;
            }
        }
        drop(tx);
        let mut out = Vec::new();
        let mut first_err = None;
        for h in handles {
            match h.join().expect("chunk thread panicked") {
                Ok(t) => out.push(t),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        progress.check_cancel()?;
        match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    })
}

/// Reads every chunk and checks its digest. Returns the stored bytes checked.
/// Only the chunks in `only`, when given.
pub fn check_chunks(
    streams: &[StreamReader],
    m: &Manifest,
    jobs: usize,
    progress: &Progress,
    only: Option<&[(u16, u32)]>,
) -> Result<u64> {
    let total: u64 = match only {
        None => m.streams.iter().flat_map(|s| &s.chunks).map(|c| c.stored).sum(),
        Some(list) => list.iter().map(|&(s, c)| m.streams[s as usize].chunks[c as usize].stored).sum(),
    };
    progress.start_phase("verify", total);
    let per_thread =
        for_each_chunk(streams, m, jobs, progress, only, |reader, stream, chunk, bytes: &mut (u64, Vec<u8>)| {
            let meta = &m.streams[stream as usize].chunks[chunk as usize];
            let name = ChunkName { backup: &m.backup_id, stream: &m.streams[stream as usize].name, chunk };
            reader.read_chunk(meta, &mut bytes.1, &name)?;
            bytes.0 += meta.stored;
            progress.add(meta.stored);
            Ok(())
        })?;
    Ok(per_thread.iter().map(|(n, _)| n).sum())
}

/// A record checked against the manifest: its file and piece.
pub struct Placed<'a, 'r> {
    pub file: &'a FileEntry,
    pub file_index: u32,
    pub piece: u32,
    pub record: &'r Record<'r>,
}

/// Where the records of a backup may go: the pieces each file stores (whole
/// files are cut every `piece_size` bytes; incremental ones store runs).
struct PieceIndex<'m> {
    m: &'m Manifest,
    layouts: Vec<Option<Vec<(u64, u64)>>>,
}

impl<'m> PieceIndex<'m> {
    fn new(m: &'m Manifest) -> Self {
        let layouts = m
            .files
            .iter()
            .map(|f| (f.incremental.is_some() && !f.vanished).then(|| f.pieces(m.piece_size, m.block_size as u64)))
            .collect();
        PieceIndex { m, layouts }
    }

    /// The file and piece index of record `i` of chunk `name`, checked against the manifest.
    fn locate(&self, rec: &Record, i: usize, name: &ChunkName) -> Result<(&'m FileEntry, u32)> {
        let m = self.m;
        let file = m.files.get(rec.file as usize).ok_or_else(|| {
            Error::Corrupt(format!(
                "{name}: record {i} names file {} but the manifest lists {} files",
                rec.file,
                m.files.len()
            ))
        })?;
        let len = rec.data.len() as u64;
        let piece = match &self.layouts[rec.file as usize] {
            // A file that vanished during the copy may hold some of its
            // pieces; they are never restored, only kept inside the file.
            None if file.vanished => (len <= m.piece_size
                && rec.offset.checked_add(len).is_some_and(|e| e <= file.size))
            .then_some((rec.offset / m.piece_size) as u32),
            None => (rec.offset < file.size
                && rec.offset.is_multiple_of(m.piece_size)
                && len == m.piece_size.min(file.size - rec.offset))
            .then_some((rec.offset / m.piece_size) as u32),
            Some(pieces) => pieces.binary_search(&(rec.offset, len)).ok().map(|k| k as u32),
        };
        piece.map(|p| (file, p)).ok_or_else(|| {
            Error::Corrupt(format!(
                "{name}: record {i} for \"{}\" holds {len} bytes at offset {}, which is not a piece this backup stores of that {}-byte file",
                file.path, rec.offset, file.size
            ))
        })
    }
}

/// Reads chunk `meta` into `stored` (its SHA-256 checked) and undoes the
/// backup's filter stack into `raw` with the thread's decoder, made on first use.
fn decode_chunk(
    reader: &StreamReader,
    meta: &ChunkMeta,
    (filters, key): (&[Filter], Option<ChunkKey>),
    name: &ChunkName,
    stored: &mut Vec<u8>,
    raw: &mut Vec<u8>,
    decoder: &mut Option<ChunkDecoder>,
) -> Result<()> {
    reader.read_chunk(meta, stored, name)?;
    let dec = match decoder {
        Some(d) => d,
        None => decoder.insert(ChunkDecoder::new(filters, key)?),
    };
    dec.decode(stored, meta.raw as usize, raw, name.stream, name.chunk, name)
}

/// How restore checks the bytes it writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PieceCheck {
    /// Every piece of every file is seen exactly once. Its bytes are
    /// covered by the chunk's SHA-256 (checked before decoding), the
    /// encrypted chunk's tag, and zstd's frame checksum of the decoded content.
    #[default]
    Coverage,
    /// Also each piece's SHA-256, and each file's digest from them, as
    /// `verify` does: this catches a fault in the backup between reading a
    /// file and compressing it, which the chunk's own checks cannot.
    Digest,
}

#[derive(Default)]
struct DecodeState {
    stored: Vec<u8>,
    raw: Vec<u8>,
    digests: Vec<(u32, u32, Digest)>,
    /// One decoder (its contexts) per thread, reused for every chunk.
    decoder: Option<ChunkDecoder>,
}

/// Reads, checks, decompresses and parses every chunk (or the chunks in
/// `only`); calls `visit` for each record of a file that restore creates;
/// returns every piece seen, with its digest when `check` asks for digests
/// (zeros otherwise).
#[allow(clippy::too_many_arguments)]
pub fn decode_chunks(
    streams: &[StreamReader],
    m: &Manifest,
    keys: Option<&Keyring>,
    jobs: usize,
    progress: &Progress,
    only: Option<&[(u16, u32)]>,
    check: PieceCheck,
    visit: impl Fn(&Placed) -> Result<()> + Sync,
) -> Result<Vec<(u32, u32, Digest)>> {
    let total: u64 = m.streams.iter().flat_map(|s| &s.chunks).map(|c| c.raw).sum();
    progress.start_phase("restore", total);
    let index = PieceIndex::new(m);
    let key = keys.map(|k| k.chunk_key(&m.backup_id));
    let per_thread =
        for_each_chunk(streams, m, jobs, progress, only, |reader, stream, chunk, st: &mut DecodeState| {
            let meta = &m.streams[stream as usize].chunks[chunk as usize];
            let name = ChunkName { backup: &m.backup_id, stream: &m.streams[stream as usize].name, chunk };
            decode_chunk(reader, meta, (&m.filters, key), &name, &mut st.stored, &mut st.raw, &mut st.decoder)?;
            for (i, rec) in parse_chunk(&st.raw, &name)?.iter().enumerate() {
                let (file, piece) = index.locate(rec, i, &name)?;
                let digest = match check {
                    PieceCheck::Digest => sha256(rec.data),
                    PieceCheck::Coverage => [0; 32],
                };
                st.digests.push((rec.file, piece, digest));
                if !file.vanished {
                    visit(&Placed { file, file_index: rec.file, piece, record: rec })?;
                }
            }
            progress.add(meta.raw);
            Ok(())
        })?;
    Ok(per_thread.into_iter().flat_map(|s| s.digests).collect())
}

/// Checks that every piece of each file was seen once and (with
/// [`PieceCheck::Digest`]) compares the piece digests seen with the file's
/// digest in the manifest (only for the files `only` accepts, when given):
/// one message per file that is incomplete or does not match.
fn file_digest_problems(
    m: &Manifest,
    digests: Vec<(u32, u32, Digest)>,
    only: Option<&dyn Fn(u32) -> bool>,
    check: PieceCheck,
) -> Vec<String> {
    let mut per_file: Vec<Vec<(u32, Digest)>> = vec![Vec::new(); m.files.len()];
    for (f, p, d) in digests {
        per_file[f as usize].push((p, d));
    }
    let mut problems = Vec::new();
    for (i, (f, mut pieces)) in m.files.iter().zip(per_file).enumerate() {
        if f.vanished || only.is_some_and(|o| !o(i as u32)) {
            continue;
        }
        pieces.sort_by_key(|(p, _)| *p);
        let expected = f.pieces(m.piece_size, m.block_size as u64).len();
        if pieces.len() != expected || pieces.iter().enumerate().any(|(k, (p, _))| k as u32 != *p) {
            problems.push(format!(
                "backup {} holds {} of the {expected} pieces it should store of \"{}\"",
                m.backup_id,
                pieces.len(),
                f.path
            ));
            continue;
        }
        if check == PieceCheck::Coverage {
            continue;
        }
        let d: Vec<Digest> = pieces.into_iter().map(|(_, d)| d).collect();
        let found = to_hex(&file_digest(&d));
        if found != f.sha256 {
            problems.push(format!(
                "content of \"{}\" in backup {} has digest {found}, expected {}",
                f.path, m.backup_id, f.sha256
            ));
        }
    }
    problems
}

/// [`file_digest_problems`], as an error for the first one.
pub fn check_file_digests(
    m: &Manifest,
    digests: Vec<(u32, u32, Digest)>,
    only: Option<&dyn Fn(u32) -> bool>,
    check: PieceCheck,
) -> Result<()> {
    match file_digest_problems(m, digests, only, check).into_iter().next() {
        Some(p) => Err(Error::Corrupt(p)),
        None => Ok(()),
    }
}

/// One thing wrong with a backup.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Problem {
    /// Which check found it: manifest, chain, chunks, files, wal, page checksums.
    pub check: &'static str,
    pub detail: String,
}

/// The checks `verify` and `validate_backup` run, in order.
pub const CHECKS: [&str; 7] = ["manifest", "chain", "chunks", "files", "wal", "page checksums", "archive"];

/// What verifying one backup found.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BackupCheck {
    pub backup_id: String,
    pub problems: Vec<Problem>,
    pub stored_bytes: u64,
    pub files: u64,
    pub pages_checked: u64,
    pub secs: f64,
}

#[derive(Default)]
struct VerifyState {
    decoder: Option<ChunkDecoder>,
    stored: Vec<u8>,
    raw: Vec<u8>,
    digests: Vec<(u32, u32, Digest)>,
    problems: Vec<Problem>,
    damaged: Vec<(u16, u32)>,
    bytes: u64,
    pages: u64,
}

/// Verifies one backup completely: its manifest, its chain of parents, every
/// chunk's digest, every file's digest, the WAL from its start to its stop,
/// and the checksum of every stored page PostgreSQL had not touched since
/// the backup started. Reads every chunk once, on `jobs` threads. Problems
/// are collected, not stopped at.
pub fn verify_backup(repo: &Repo, id: &str, jobs: usize, progress: &Progress) -> BackupCheck {
    match repo.load_manifest(id) {
        Ok(m) => verify_manifest(repo, &m, jobs, progress),
        Err(e) => BackupCheck {
            backup_id: id.to_string(),
            problems: vec![Problem { check: "manifest", detail: e.to_string() }],
            stored_bytes: 0,
            files: 0,
            pages_checked: 0,
            secs: 0.0,
        },
    }
}

/// [`verify_backup`] of a manifest already read: one in the repository, or
/// one about to be stored (a merge checks its backup before listing it).
pub fn verify_manifest(repo: &Repo, m: &Manifest, jobs: usize, progress: &Progress) -> BackupCheck {
    let began = std::time::Instant::now();
    let id = m.backup_id.as_str();
    let mut check = BackupCheck {
        backup_id: id.to_string(),
        problems: Vec::new(),
        stored_bytes: 0,
        files: m.files.len() as u64,
        pages_checked: 0,
        secs: 0.0,
    };
    let problem = |check: &'static str, detail: String| Problem { check, detail };
    let key = repo.keyring().map(|k| k.chunk_key(&m.backup_id));
    if m.parent.is_some() {
        if let Err(e) = crate::chain::load_chain(repo, id) {
            check.problems.push(problem("chain", e.to_string()));
        }
    }
    // Every WAL segment from the start to the stop must be in the backup.
    let seg = m.wal_segment_size;
    for segno in m.start_lsn.segment(seg)..=m.stop_lsn.previous_segment(seg).max(m.start_lsn.segment(seg)) {
        if progress.check_cancel().is_err() {
            break;
        }
        let name = format!("pg_wal/{}", crate::lsn::wal_file_name(m.timeline, segno, seg));
        if !m.files.iter().any(|f| f.path == name && !f.vanished) {
            check.problems.push(problem(
                "wal",
                format!("WAL segment {name} needed from {} to {} is not in the backup", m.start_lsn, m.stop_lsn),
            ));
        }
    }

    let streams = match open_streams(repo, m) {
        Ok(s) => s,
        Err(e) => {
            check.problems.push(problem("chunks", e.to_string()));
            check.secs = began.elapsed().as_secs_f64();
            return check;
        }
    };
    let total: u64 = m.streams.iter().flat_map(|s| &s.chunks).map(|c| c.stored).sum();
    progress.start_phase("verify", total);
    let index = PieceIndex::new(m);
    let checksummed: Vec<Option<u32>> = m
        .files
        .iter()
        .map(|f| if m.data_checksums { crate::checksum::segment_of_checksummed_file(&f.path) } else { None })
        .collect();
    let outcome = for_each_chunk(&streams, m, jobs, progress, None, |reader, stream, chunk, st: &mut VerifyState| {
        let meta = &m.streams[stream as usize].chunks[chunk as usize];
        let name = ChunkName { backup: &m.backup_id, stream: &m.streams[stream as usize].name, chunk };
        progress.add(meta.stored);
        let mut decode = || -> Result<()> {
            decode_chunk(reader, meta, (&m.filters, key), &name, &mut st.stored, &mut st.raw, &mut st.decoder)?;
            st.bytes += meta.stored;
            for (i, rec) in parse_chunk(&st.raw, &name)?.iter().enumerate() {
                let (file, piece) = index.locate(rec, i, &name)?;
                st.digests.push((rec.file, piece, sha256(rec.data)));
                if let Some(segno) = checksummed[rec.file as usize] {
                    use crate::checksum::{header, page_checksum, worth_checking};
                    let bs = m.block_size as usize;
                    let first = segno as u64 * m.relseg_size as u64 + rec.offset / bs as u64;
                    for (k, page) in rec.data.chunks_exact(bs).enumerate() {
                        if !worth_checking(page, m.start_lsn.0) {
                            continue;
                        }
                        st.pages += 1;
                        let blkno = (first + k as u64) as u32;
                        let (stored, computed) = (header(page).checksum, page_checksum(page, blkno));
                        let known = m.checksum_failures.iter().any(|c| c.path == file.path && c.block == blkno);
                        if stored != computed && !known {
                            st.problems.push(Problem {
                                check: "page checksums",
                                detail: format!(
                                    "\"{}\" block {blkno} in backup {}: stored checksum 0x{stored:04x}, computed 0x{computed:04x}",
                                    file.path, m.backup_id
                                ),
                            });
                        }
                    }
                }
            }
            Ok(())
        };
        if let Err(e) = decode() {
            st.problems.push(Problem { check: "chunks", detail: annotate(e, m, stream, chunk).to_string() });
            st.damaged.push((stream, chunk));
        }
        Ok(())
    });
    let states = match outcome {
        Ok(s) => s,
        Err(e) => {
            check.problems.push(problem("chunks", e.to_string()));
            check.secs = began.elapsed().as_secs_f64();
            return check;
        }
    };
    let mut digests = Vec::new();
    let mut damaged = Vec::new();
    for st in states {
        check.problems.extend(st.problems);
        check.stored_bytes += st.bytes;
        check.pages_checked += st.pages;
        digests.extend(st.digests);
        damaged.extend(st.damaged);
    }
    // File digests, for files without pieces in a damaged chunk (those are reported already).
    let healthy = |i: u32| !m.files[i as usize].chunks.iter().any(|c| damaged.contains(c));
    for p in file_digest_problems(m, digests, Some(&healthy), PieceCheck::Digest) {
        check.problems.push(problem("files", p));
    }
    for c in &m.checksum_failures {
        check.problems.push(problem(
            "page checksums",
            format!(
                "\"{}\" block {} failed its checksum when backup {} was taken (stored 0x{:04x}, computed 0x{:04x})",
                c.path, c.block, m.backup_id, c.stored, c.computed
            ),
        ));
    }
    // The archive, when there is one: continuous from this backup's end to
    // the newest archived segment, along the timelines after it.
    let seg = m.wal_segment_size;
    let stop_seg = m.stop_lsn.previous_segment(seg);
    match crate::archive::list(repo, seg) {
        Ok(listing) if listing.segments.iter().any(|(t, s)| *t >= m.timeline && s.iter().any(|&n| n > stop_seg)) => {
            match crate::archive::gaps(repo, &listing, m.timeline, m.stop_lsn, seg) {
                Ok(gaps) => {
                    for g in gaps {
                        check.problems.push(problem("archive", format!("{} (after backup {})", g.text, m.backup_id)));
                    }
                }
                Err(e) => check.problems.push(problem("archive", e.to_string())),
            }
        }
        Ok(_) => {}
        Err(e) => check.problems.push(problem("archive", e.to_string())),
    }
    check.secs = began.elapsed().as_secs_f64();
    check
}
