//! The WAL archive of a repository: what `archive-push` stores and
//! `archive-get` serves, one file per WAL file; the only code that reads or
//! writes their bytes.
//!
//! ```text
//! REPO/archive/<timeline, 8 hex digits>/<WAL file name>.bsw
//! ```
//!
//! for WAL segments, timeline history files (`00000002.history`), backup
//! history files (`...backup`) and partial segments (`...partial`, from
//! `wal-receive` and promotions). Each file is a 128-byte header and the
//! zstd-compressed (or stored) content:
//!
//! ```text
//! magic "BSWA" | version u32 | system identifier u64 | raw length u64 | stored length u64
//! | SHA-256 of the raw content (32) | compression u8 (0 none, 1 zstd) | encrypted u8
//! | 6 zero bytes | file name (56, zero-padded) | CRC-32C of the 124 bytes before it
//! ```
//!
//! In an encrypted repository (version 2) the content after compression is
//! sealed with the archive's key and the file's name as associated data
//! ([`crate::crypt::WalCipher`]), and the digest is an HMAC-SHA256 of the
//! raw content under a key of the repository, so the header tells nothing
//! of what the file holds; a file altered, renamed or from another
//! repository fails its tag.
//!
//! A file is stored with [`crate::storage::Store::put_new`], atomically,
//! durably and never over an existing object (in a directory: temporary
//! name, fsync, `link(2)`, directory fsync), so two pushers of the same file
//! never overwrite each other. A file already archived is compared by its
//! SHA-256: the same content is success, other content is refused and the
//! archived copy kept.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::path::Path;

use crate::blkref::crc32c;
use crate::codec::{Compression, Compressor, Decompressor};
use crate::error::{Error, Result};
use crate::hash::{sha256, to_hex, Digest};
use crate::lsn::{parse_wal_file_name, wal_file_name, Lsn};
use crate::repo::Repo;
use crate::safe_fs;
use crate::storage::{self, Kind};
use crate::timeline::History;

pub const ARCHIVE_DIR: &str = "archive";
/// Where `wal-receive` writes the segment it is receiving.
pub const RECEIVE_DIR: &str = "receive";
/// The asynchronous pusher's last status (JSON).
pub const PUSH_STATUS: &str = "archive/push-status.json";
const MAGIC: &[u8; 4] = b"BSWA";
const VERSION: u32 = 1;
/// Files of an encrypted repository.
const VERSION_SEALED: u32 = 2;
const HEADER_LEN: usize = 128;
/// The largest WAL file there is: a 1 GB segment.
pub const MAX_RAW: u64 = 1 << 30;
const SUFFIX: &str = ".bsw";

/// What kind of WAL file a name is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalFile {
    Segment {
        tli: u32,
        log: u32,
        seg: u32,
    },
    Partial {
        tli: u32,
        log: u32,
        seg: u32,
    },
    History {
        tli: u32,
    },
    /// A backup history file (`<segment>.<offset>.backup`).
    BackupHistory {
        tli: u32,
    },
}

fn hex8(s: &str) -> Option<u32> {
    (s.len() == 8 && s.bytes().all(|b| b.is_ascii_hexdigit())).then(|| u32::from_str_radix(s, 16).ok()).flatten()
}

impl WalFile {
    /// Classifies a file name PostgreSQL gives `archive_command` or asks
    /// `restore_command` for; None for anything else.
    pub fn parse(name: &str) -> Option<WalFile> {
        if let Some(t) = name.strip_suffix(".history") {
            return hex8(t).filter(|&t| t > 0).map(|tli| WalFile::History { tli });
        }
        if let Some(rest) = name.strip_suffix(".backup") {
            let (seg, off) = rest.split_once('.')?;
            let ok = seg.len() == 24 && off.len() == 8 && off.bytes().all(|b| b.is_ascii_hexdigit());
            return ok.then(|| hex8(&seg[..8])).flatten().map(|tli| WalFile::BackupHistory { tli });
        }
        let (base, partial) = match name.strip_suffix(".partial") {
            Some(b) => (b, true),
            None => (name, false),
        };
        if base.len() != 24 {
            return None;
        }
        let (tli, log, seg) = (hex8(&base[..8])?, hex8(&base[8..16])?, hex8(&base[16..])?);
        if tli == 0 {
            return None;
        }
        Some(if partial { WalFile::Partial { tli, log, seg } } else { WalFile::Segment { tli, log, seg } })
    }

    pub fn timeline(&self) -> u32 {
        match *self {
            WalFile::Segment { tli, .. }
            | WalFile::Partial { tli, .. }
            | WalFile::History { tli }
            | WalFile::BackupHistory { tli } => tli,
        }
    }
}

/// Where a WAL file lives in the archive, relative to the repository root.
pub fn relative_path(name: &str) -> Result<String> {
    let kind = WalFile::parse(name).ok_or_else(|| Error::Usage(format!("\"{name}\" is not the name of a WAL file")))?;
    Ok(format!("{ARCHIVE_DIR}/{:08X}/{name}{SUFFIX}", kind.timeline()))
}

/// The header of an archived file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub system_identifier: u64,
    pub raw_len: u64,
    pub stored_len: u64,
    /// SHA-256 of the raw content, or its HMAC-SHA256 when encrypted.
    pub raw_sha256: Digest,
    pub compressed: bool,
    pub encrypted: bool,
    pub name: String,
}

fn encode_header(h: &Header) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[0..4].copy_from_slice(MAGIC);
    b[4..8].copy_from_slice(&(if h.encrypted { VERSION_SEALED } else { VERSION }).to_le_bytes());
    b[8..16].copy_from_slice(&h.system_identifier.to_le_bytes());
    b[16..24].copy_from_slice(&h.raw_len.to_le_bytes());
    b[24..32].copy_from_slice(&h.stored_len.to_le_bytes());
    b[32..64].copy_from_slice(&h.raw_sha256);
    b[64] = h.compressed as u8;
    b[65] = h.encrypted as u8;
    let n = h.name.len().min(55);
    b[72..72 + n].copy_from_slice(&h.name.as_bytes()[..n]);
    let crc = crc32c(&b[..124]);
    b[124..128].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes and checks an archived file's header (the first bytes of a file
/// of `total_len` bytes); `what` names it.
pub fn decode_header(b: &[u8], total_len: u64, what: &dyn std::fmt::Display) -> Result<Header> {
    let bad = |why: String| Error::Corrupt(format!("archived WAL file \"{what}\" {why}"));
    if b.len() < HEADER_LEN {
        return Err(bad(format!("is {} bytes, shorter than its header", b.len())));
    }
    let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    let stored_crc = u32::from_le_bytes(b[124..128].try_into().unwrap());
    if crc32c(&b[..124]) != stored_crc || &b[0..4] != MAGIC {
        return Err(bad("has a damaged header".into()));
    }
    let version = u32::from_le_bytes(b[4..8].try_into().unwrap());
    if version != VERSION && version != VERSION_SEALED {
        return Err(bad(format!("has format version {version}, expected {VERSION} or {VERSION_SEALED}")));
    }
    let name_end = b[72..124].iter().position(|&c| c == 0).map_or(124, |p| 72 + p);
    let h = Header {
        system_identifier: u64_at(8),
        raw_len: u64_at(16),
        stored_len: u64_at(24),
        raw_sha256: b[32..64].try_into().unwrap(),
        compressed: b[64] == 1,
        encrypted: version == VERSION_SEALED,
        name: String::from_utf8_lossy(&b[72..name_end]).into_owned(),
    };
    let seal = if h.encrypted { crate::crypt::OVERHEAD as u64 } else { 0 };
    if h.raw_len > MAX_RAW || h.stored_len > crate::manifest::limits::stored_bound(h.raw_len) + seal {
        return Err(bad(format!("claims {} raw and {} stored bytes", h.raw_len, h.stored_len)));
    }
    if total_len != HEADER_LEN as u64 + h.stored_len {
        return Err(bad(format!("is {total_len} bytes, its header says {}", HEADER_LEN as u64 + h.stored_len)));
    }
    Ok(h)
}

/// The bytes of an archived file for `raw`.
pub fn encode(name: &str, system_identifier: u64, raw: &[u8], compression: Compression) -> Result<Vec<u8>> {
    encode_with(name, system_identifier, raw, compression, 1, None)
}

/// [`encode`], compressing with `threads` threads while another thread
/// hashes: one segment at a time uses every core.
pub fn encode_with(
    name: &str,
    system_identifier: u64,
    raw: &[u8],
    compression: Compression,
    threads: usize,
    keys: Option<&crate::crypt::Keyring>,
) -> Result<Vec<u8>> {
    let mut stored = Vec::new();
    let compressed = !matches!(compression, Compression::None);
    let mut compressor = Compressor::with_threads(compression, threads)?;
    let wal = keys.map(|k| k.wal());
    let digest = |raw: &[u8]| match &wal {
        Some(w) => w.digest(raw),
        None => sha256(raw),
    };
    let raw_sha256 = if raw.len() >= 1 << 20 {
        std::thread::scope(|s| {
            let hash = s.spawn(|| digest(raw));
            let done = compressor.compress(raw, &mut stored);
            let digest = hash.join().expect("the hashing thread does not panic");
            done.map(|_| digest)
        })?
    } else {
        compressor.compress(raw, &mut stored)?;
        digest(raw)
    };
    if let Some(w) = &wal {
        let mut sealed = Vec::new();
        w.seal(name, &stored, &mut sealed);
        stored = sealed;
    }
    let h = Header {
        system_identifier,
        raw_len: raw.len() as u64,
        stored_len: stored.len() as u64,
        raw_sha256,
        compressed,
        encrypted: wal.is_some(),
        name: name.into(),
    };
    let mut out = Vec::with_capacity(HEADER_LEN + stored.len());
    out.extend_from_slice(&encode_header(&h));
    out.extend_from_slice(&stored);
    Ok(out)
}

/// The raw content of an archived file, checked against its header's
/// SHA-256; `what` names it.
pub fn decode(
    bytes: &[u8],
    what: &dyn std::fmt::Display,
    keys: Option<&crate::crypt::Keyring>,
) -> Result<(Header, Vec<u8>)> {
    let h = decode_header(bytes, bytes.len() as u64, what)?;
    let wal = match (h.encrypted, keys) {
        (false, _) => None,
        (true, Some(k)) => Some(k.wal()),
        (true, None) => {
            return Err(Error::Usage(format!("archived WAL file \"{what}\" is encrypted and no key was given")))
        }
    };
    let opened;
    let body = match &wal {
        None => &bytes[HEADER_LEN..],
        Some(w) => {
            let mut plain = Vec::new();
            if !w.open(&h.name, &bytes[HEADER_LEN..], &mut plain) {
                return Err(Error::Corrupt(format!(
                    "archived WAL file \"{what}\" fails its authentication tag: it was altered, renamed or sealed with another key"
                )));
            }
            opened = plain;
            &opened[..]
        }
    };
    let mut raw = Vec::new();
    let c = if h.compressed { Compression::Zstd { level: 1 } } else { Compression::None };
    if h.raw_len > crate::manifest::limits::CHUNK_RAW {
        // A segment larger than a chunk (up to 1 GB): streamed, so memory
        // follows what the frame really holds, never the header's claim,
        // and reading stops one byte past it.
        use std::io::Read;
        let result = if h.compressed {
            zstd::stream::read::Decoder::with_buffer(body).and_then(|d| d.take(h.raw_len + 1).read_to_end(&mut raw))
        } else {
            body.take(h.raw_len + 1).read_to_end(&mut raw)
        };
        result.map_err(|e| Error::Corrupt(format!("archived WAL file \"{what}\" does not decompress: {e}")))?;
    } else {
        Decompressor::new(c)?.decompress(body, h.raw_len as usize, &mut raw, what)?;
    }
    if raw.len() as u64 != h.raw_len {
        return Err(Error::Corrupt(format!(
            "archived WAL file \"{what}\" holds {} bytes, expected {}",
            raw.len(),
            h.raw_len
        )));
    }
    let digest = match &wal {
        Some(w) => w.digest(&raw),
        None => sha256(&raw),
    };
    if digest != h.raw_sha256 {
        return Err(Error::Corrupt(format!(
            "archived WAL file \"{what}\" is damaged: {} {}, expected {}",
            if wal.is_some() { "hmac-sha256" } else { "sha256" },
            to_hex(&digest),
            to_hex(&h.raw_sha256)
        )));
    }
    Ok((h, raw))
}

/// The system identifier and segment size a WAL segment's first page (a
/// long page header) names, or why it does not look like one.
pub fn segment_identity(raw: &[u8]) -> std::result::Result<(u64, u32), String> {
    if raw.len() < 40 {
        return Err(format!("it is {} bytes, too short for a WAL segment", raw.len()));
    }
    let magic = u16::from_le_bytes([raw[0], raw[1]]);
    let info = u16::from_le_bytes([raw[2], raw[3]]);
    const XLP_LONG_HEADER: u16 = 0x0002;
    if info & XLP_LONG_HEADER == 0 || !(0xD000..0xD200).contains(&magic) {
        return Err(format!("its first page has no long header (magic 0x{magic:04x}, info 0x{info:04x})"));
    }
    Ok((u64::from_le_bytes(raw[24..32].try_into().unwrap()), u32::from_le_bytes(raw[32..36].try_into().unwrap())))
}

/// What a push did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushed {
    Stored {
        raw: u64,
        stored: u64,
    },
    /// Already archived with the same content.
    AlreadyThere,
}

/// Archives the WAL file at `source` as `name`: checks that a segment
/// belongs to this repository's cluster, compresses, and stores it
/// atomically and durably; the same content again is success, other content
/// is refused (the archived copy is kept).
pub fn push(repo: &Repo, source: &Path, name: &str, compression: Compression) -> Result<Pushed> {
    push_with(repo, source, name, compression, 1)
}

/// [`push`], compressing with `threads` threads.
pub fn push_with(repo: &Repo, source: &Path, name: &str, compression: Compression, threads: usize) -> Result<Pushed> {
    let kind = WalFile::parse(name).ok_or_else(|| Error::Usage(format!("\"{name}\" is not the name of a WAL file")))?;
    let raw = safe_fs::read_regular(source, MAX_RAW)?;
    let sysid = repo.info.system_identifier;
    if let WalFile::Segment { .. } | WalFile::Partial { .. } = kind {
        let (seg_sysid, seg_size) = segment_identity(&raw)
            .map_err(|why| Error::Corrupt(format!("\"{}\" is not a WAL segment: {why}", source.display())))?;
        if seg_sysid != sysid {
            return Err(Error::Conflict(format!(
                "WAL segment \"{}\" belongs to the cluster with system identifier {seg_sysid}, repository \"{}\" to {sysid}",
                source.display(),
                repo.location()
            )));
        }
        if matches!(kind, WalFile::Segment { .. }) && seg_size as usize != raw.len() {
            return Err(Error::Corrupt(format!(
                "WAL segment \"{}\" is {} bytes, its header says {seg_size}",
                source.display(),
                raw.len()
            )));
        }
    }
    let key = relative_path(name)?;
    let what = repo.describe(&key);
    if repo.is_encrypted() && repo.keyring().is_none() {
        return Err(Error::Usage(format!("repository \"{}\" is encrypted and no key was given", repo.location())));
    }
    if let Some(h) = existing_header(repo, &key)? {
        return same_or_refuse(repo, &h, &raw, &what);
    }
    let bytes = encode_with(name, sysid, &raw, compression, threads, repo.keyring())?;
    // Never over an existing object: of two concurrent pushes of a file, one stores it.
    if repo.store().put_new(&key, &bytes)? {
        return Ok(Pushed::Stored { raw: raw.len() as u64, stored: bytes.len() as u64 });
    }
    let h = existing_header(repo, &key)?.ok_or_else(|| Error::Conflict(format!("\"{what}\" vanished")))?;
    same_or_refuse(repo, &h, &raw, &what)
}

fn existing_header(repo: &Repo, key: &str) -> Result<Option<Header>> {
    let what = repo.describe(key);
    match repo.store().open(key) {
        Ok(f) => {
            let len = f.len();
            let mut b = vec![0u8; HEADER_LEN.min(len as usize)];
            f.read_exact_at(&mut b, 0).map_err(Error::io("read", Path::new(&what)))?;
            Ok(Some(decode_header(&b, len, &what)?))
        }
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

fn same_or_refuse(repo: &Repo, h: &Header, raw: &[u8], what: &str) -> Result<Pushed> {
    let digest = match (h.encrypted, repo.keyring()) {
        (true, Some(k)) => k.wal().digest(raw),
        (true, None) => return Err(Error::Usage(format!("\"{what}\" is encrypted and no key was given"))),
        (false, _) => sha256(raw),
    };
    if h.raw_sha256 == digest && h.raw_len == raw.len() as u64 {
        Ok(Pushed::AlreadyThere)
    } else {
        Err(Error::Conflict(format!(
            "\"{what}\" is already archived with other content (sha256 {}, this one {}): the archived copy is kept",
            to_hex(&h.raw_sha256),
            to_hex(&digest)
        )))
    }
}

/// Reads the archived WAL file `name` (falling back to `name.partial` for a
/// segment), checked; None when the archive does not hold it.
pub fn fetch(repo: &Repo, name: &str) -> Result<Option<Vec<u8>>> {
    let mut candidates = vec![name.to_string()];
    if let Some(WalFile::Segment { .. }) = WalFile::parse(name) {
        candidates.push(format!("{name}.partial"));
    }
    for n in candidates {
        let key = relative_path(&n)?;
        match repo.store().read(&key, HEADER_LEN as u64 + crate::manifest::limits::stored_bound(MAX_RAW)) {
            Ok(bytes) => {
                let (h, mut raw) = decode(&bytes, &repo.describe(&key), repo.keyring())?;
                // The name is the associated data of a sealed file: checked
                // against the one asked for, a file moved elsewhere is refused.
                if h.name != n {
                    return Err(Error::Corrupt(format!(
                        "archived WAL file \"{}\" holds \"{}\"",
                        repo.describe(&key),
                        h.name
                    )));
                }
                if !h.encrypted && repo.is_encrypted() && !repo.allows_plain() {
                    return Err(Error::Corrupt(format!(
                        "archived WAL file \"{}\" is not encrypted, in an encrypted repository: refused (--allow-plain to use it)",
                        repo.describe(&key)
                    )));
                }
                if h.system_identifier != repo.info.system_identifier {
                    return Err(Error::Corrupt(format!(
                        "archived WAL file \"{}\" belongs to system {}, the repository to {}",
                        repo.describe(&key),
                        h.system_identifier,
                        repo.info.system_identifier
                    )));
                }
                if n.ends_with(".partial") {
                    // A partial segment served whole: the rest is zeros, where recovery ends.
                    if let Ok((_, size)) = segment_identity(&raw) {
                        raw.resize(size as usize, 0);
                    }
                }
                return Ok(Some(raw));
            }
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e),
        }
    }
    // The segment `wal-receive` is streaming into, preallocated to its size.
    if let Some(WalFile::Segment { .. }) = WalFile::parse(name) {
        match repo.store().read(&format!("{RECEIVE_DIR}/{name}.partial"), MAX_RAW) {
            Ok(raw) => {
                if let Ok((sysid, _)) = segment_identity(&raw) {
                    if sysid == repo.info.system_identifier {
                        return Ok(Some(raw));
                    }
                }
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Writes `raw` to `dest` durably (a temporary name in its directory, then rename).
pub fn write_file(dest: &Path, raw: &[u8]) -> Result<()> {
    let dir = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.blockstream.tmp", dest.file_name().and_then(|n| n.to_str()).unwrap_or("wal")));
    let mut f = File::create(&tmp).map_err(Error::io("create", &tmp))?;
    f.write_all(raw).and_then(|_| f.sync_all()).map_err(Error::io("write", &tmp))?;
    drop(f);
    std::fs::rename(&tmp, dest).map_err(Error::io("rename into place", dest))
}

/// What the archive holds, per timeline.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    /// Segment numbers per timeline.
    pub segments: BTreeMap<u32, BTreeSet<u64>>,
    pub partials: BTreeMap<u32, BTreeSet<u64>>,
    pub histories: BTreeSet<u32>,
    pub bytes: u64,
    /// When the latest segment was archived.
    pub newest_modified: Option<std::time::SystemTime>,
}

/// Lists the archive (names only; nothing is read).
pub fn list(repo: &Repo, segment_size: u64) -> Result<Listing> {
    let mut out = Listing::default();
    for d in repo.store().list(ARCHIVE_DIR)? {
        if d.kind != Kind::Prefix {
            continue;
        }
        for f in repo.store().list(&storage::join(ARCHIVE_DIR, &d.name))? {
            let Some(wal) = f.name.strip_suffix(SUFFIX) else { continue };
            if f.kind != Kind::Object {
                continue;
            }
            out.bytes += f.size;
            match WalFile::parse(wal) {
                Some(WalFile::Segment { .. }) => {
                    if let Some((t, segno)) = parse_wal_file_name(wal, segment_size) {
                        out.segments.entry(t).or_default().insert(segno);
                    }
                    out.newest_modified = out.newest_modified.max(f.modified);
                }
                Some(WalFile::Partial { tli, .. }) => {
                    if let Some((_, segno)) = parse_wal_file_name(&wal[..24], segment_size) {
                        out.partials.entry(tli).or_default().insert(segno);
                    }
                }
                Some(WalFile::History { tli }) => {
                    out.histories.insert(tli);
                }
                _ => {}
            }
        }
    }
    Ok(out)
}

/// The timelines from `tli` to the newest one whose history holds `tli` up
/// to `stop` (the end of a backup), with the LSN where each one ends (None
/// for the last): from the archived history files. A timeline that left
/// `tli` before `stop` forked from another history (a failover before the
/// backup ended, the old primary going on): recovery from that backup cannot
/// follow it, PostgreSQL refuses to, and neither does this path.
pub fn timeline_path(repo: &Repo, tli: u32, stop: Lsn, listing: &Listing) -> Result<Vec<(u32, Option<Lsn>)>> {
    let mut newest: Option<History> = None;
    for &t in listing.histories.iter().rev().filter(|&&t| t > tli) {
        let Some(raw) = fetch(repo, &format!("{t:08X}.history"))? else { continue };
        let history = History::parse(t, &String::from_utf8_lossy(&raw))
            .map_err(|e| Error::Corrupt(format!("archived timeline history {t:08X}.history: {e}")))?;
        if history.holds(tli, stop).is_ok() {
            newest = Some(history);
            break;
        }
    }
    let Some(history) = newest else { return Ok(vec![(tli, None)]) };
    let mut path: Vec<(u32, Option<Lsn>)> =
        history.switches().iter().skip_while(|s| s.parent != tli).map(|s| (s.parent, Some(s.switch))).collect();
    path.push((history.timeline, None));
    Ok(path)
}

/// A run of segments the archive lacks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gap {
    pub timeline: u32,
    pub first_segment: u64,
    pub last_segment: u64,
    /// "WAL segment ... is missing from the archive"
    pub text: String,
}

/// Gaps in the archive after a backup that ended at `stop` on timeline
/// `tli`: from the segment after the one holding `stop` to the newest
/// segment archived on the newest timeline that descends from that point
/// ([`timeline_path`]).
pub fn gaps(repo: &Repo, listing: &Listing, tli: u32, stop: Lsn, segment_size: u64) -> Result<Vec<Gap>> {
    let path = timeline_path(repo, tli, stop, listing)?;
    let mut problems = Vec::new();
    let mut segno = stop.previous_segment(segment_size) + 1;
    let last_tli = path.last().map_or(tli, |(t, _)| *t);
    let newest = listing.segments.get(&last_tli).and_then(|s| s.last().copied()).unwrap_or(segno);
    for (t, end) in &path {
        let until = match end {
            // The segment holding the switch point continues on the next timeline.
            Some(lsn) => lsn.segment(segment_size),
            None => newest + 1,
        };
        let have = listing.segments.get(t);
        let mut missing_from: Option<u64> = None;
        for s in segno..until {
            let present = have.is_some_and(|h| h.contains(&s))
                || (end.is_some() && listing.partials.get(t).is_some_and(|p| p.contains(&s)));
            match (present, missing_from) {
                (false, None) => missing_from = Some(s),
                (true, Some(from)) => {
                    problems.push(gap_text(*t, from, s - 1, segment_size));
                    missing_from = None;
                }
                _ => {}
            }
        }
        if let Some(from) = missing_from {
            problems.push(gap_text(*t, from, until.saturating_sub(1), segment_size));
        }
        segno = until;
    }
    Ok(problems)
}

fn gap_text(tli: u32, from: u64, to: u64, segment_size: u64) -> Gap {
    Gap { timeline: tli, first_segment: from, last_segment: to, text: gap_words(tli, from, to, segment_size) }
}

fn gap_words(tli: u32, from: u64, to: u64, segment_size: u64) -> String {
    if from == to {
        format!("WAL segment {} is missing from the archive", wal_file_name(tli, from, segment_size))
    } else {
        format!(
            "WAL segments {} to {} are missing from the archive",
            wal_file_name(tli, from, segment_size),
            wal_file_name(tli, to, segment_size)
        )
    }
}

/// What the metrics say of the archive.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Facts {
    pub segments: u64,
    pub bytes: u64,
    /// When the newest segment was archived (seconds since the epoch).
    pub newest_secs: Option<u64>,
    /// From the asynchronous pusher's last status, when there is one.
    pub queue_bytes: Option<u64>,
    pub queue_oldest_secs: Option<f64>,
    pub push_failures: Option<u64>,
}

/// The archive's facts (None when the repository has no archive).
pub fn facts(repo: &Repo, segment_size: u64) -> Option<Facts> {
    if repo.store().list(ARCHIVE_DIR).ok()?.is_empty() {
        return None;
    }
    let listing = list(repo, segment_size).ok()?;
    let newest_secs =
        listing.newest_modified.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_secs());
    let status: Option<serde_json::Value> = crate::catalog::read_log(repo, PUSH_STATUS).pop();
    Some(Facts {
        segments: listing.segments.values().map(|s| s.len() as u64).sum(),
        bytes: listing.bytes,
        newest_secs,
        queue_bytes: status.as_ref().and_then(|s| s["queue_bytes"].as_u64()),
        queue_oldest_secs: status.as_ref().and_then(|s| s["queue_oldest_secs"].as_f64()),
        push_failures: status.as_ref().and_then(|s| s["push_failures"].as_u64()),
    })
}

/// Reads and checks every archived WAL file (digest, and in an encrypted
/// repository its tag and name): how many were read, and a message for
/// each one that fails.
pub fn verify_files(repo: &Repo) -> Result<(u64, Vec<String>)> {
    let mut problems = Vec::new();
    let files = files(repo)?;
    for (name, key) in &files {
        let what = repo.describe(key);
        let checked = repo
            .store()
            .read(
                key,
                HEADER_LEN as u64 + crate::manifest::limits::stored_bound(MAX_RAW) + crate::crypt::OVERHEAD as u64,
            )
            .and_then(|bytes| decode(&bytes, &what, repo.keyring()));
        match checked {
            Ok((h, _)) if h.name != *name => problems.push(format!("\"{what}\" holds \"{}\"", h.name)),
            Ok((h, _)) if !h.encrypted && repo.is_encrypted() && !repo.allows_plain() => {
                problems.push(format!("\"{what}\" is not encrypted, in an encrypted repository"))
            }
            Ok(_) => {}
            Err(e) => problems.push(e.to_string()),
        }
    }
    Ok((files.len() as u64, problems))
}

/// Every archived WAL file (for expire): (name, key).
pub fn files(repo: &Repo) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for d in repo.store().list(ARCHIVE_DIR)? {
        if d.kind != Kind::Prefix {
            continue;
        }
        let prefix = storage::join(ARCHIVE_DIR, &d.name);
        for f in repo.store().list(&prefix)? {
            if let (Some(wal), Kind::Object) = (f.name.strip_suffix(SUFFIX), f.kind) {
                out.push((wal.to_string(), storage::join(&prefix, &f.name)));
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_round_trip() {
        assert_eq!(WalFile::parse("000000010000000200000003"), Some(WalFile::Segment { tli: 1, log: 2, seg: 3 }));
        assert_eq!(WalFile::parse("00000002.history"), Some(WalFile::History { tli: 2 }));
        assert_eq!(WalFile::parse("000000010000000000000003.00000028.backup"), Some(WalFile::BackupHistory { tli: 1 }));
        assert_eq!(
            WalFile::parse("000000030000000000000009.partial"),
            Some(WalFile::Partial { tli: 3, log: 0, seg: 9 })
        );
        for bad in ["", "00000000.history", "x", "../000000010000000000000003", "00000001000000000000000G"] {
            assert_eq!(WalFile::parse(bad), None, "{bad}");
        }
        assert_eq!(relative_path("000000010000000200000003").unwrap(), "archive/00000001/000000010000000200000003.bsw");
        let raw: Vec<u8> = (0..100_000u32).map(|i| (i % 7) as u8).collect();
        let bytes = encode("000000010000000200000003", 42, &raw, Compression::Zstd { level: 3 }).unwrap();
        let (h, back) = decode(&bytes, &"x", None).unwrap();
        assert_eq!((h.system_identifier, back), (42, raw));
        let mut bad = bytes.clone();
        let n = bad.len();
        bad[n - 3] ^= 1;
        assert!(decode(&bad, &"x", None).is_err());
        let mut bad = bytes.clone();
        bad[20] ^= 1;
        assert!(decode(&bad, &"x", None).unwrap_err().to_string().contains("damaged header"));
        assert!(decode_header(&bytes[..HEADER_LEN], bytes.len() as u64 + 1, &"x").is_err());
    }
}
