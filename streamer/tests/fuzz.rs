//! Fuzzing of every decoder of data read from disk: the manifest, stream
//! chunks (parsing and decompression), summary files, `backup_label` and
//! `pg_control`. Inputs are mutations of valid seeds (bit flips, byte
//! overwrites with boundary values, insertions, deletions, splices), random
//! bytes, and, for the manifest, typed mutations of its fields re-signed
//! with a valid checksum so they reach the checks behind it.
//!
//! Requirements checked for every input: no panic, and no single allocation
//! larger than a bound set by the input's real size (a counting global
//! allocator records the largest request made while a decoder runs).
//!
//! `cargo test --release -p blockstream --test fuzz` runs 100,000 inputs per
//! target; `FUZZ_ITERS=10000000` (and `FUZZ_SEED`) run longer. No cluster,
//! no root needed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;

use blockstream::backup_label::BackupLabel;
use blockstream::blkref::{crc32c, decode_summary, encode_summary, BlockRefTable, RelFork, SummaryHeader};
use blockstream::codec::{Compression, Compressor, Decompressor};
use blockstream::hash::{sha256, to_hex};
use blockstream::lsn::Lsn;
use blockstream::manifest::{
    limits, BackupType, ChunkMeta, DirEntry, FileEntry, Incremental, Manifest, Owner, Stats, StreamEntry, Tablespace,
};
use blockstream::pg_control::ControlFile;
use blockstream::stream::{parse_chunk, ChunkBuilder};
use blockstream::timeline;

// ---- the allocation meter -------------------------------------------------

struct Meter;

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
    static BOUND: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// Writes "fuzz: allocation of N bytes above the bound M" without allocating.
fn report_over(size: usize, bound: usize) {
    let mut buf = [0u8; 128];
    let mut n = 0;
    let mut put = |s: &[u8]| {
        for &b in s {
            if n < buf.len() {
                buf[n] = b;
                n += 1;
            }
        }
    };
    let num = |mut v: usize, out: &mut dyn FnMut(&[u8])| {
        let mut d = [0u8; 20];
        let mut i = d.len();
        loop {
            i -= 1;
            d[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        out(&d[i..]);
    };
    put(b"fuzz: allocation of ");
    num(size, &mut put);
    put(b" bytes above the bound ");
    num(bound, &mut put);
    put(b"\n");
    // SAFETY: writing a stack buffer to stderr.
    unsafe { libc::write(2, buf.as_ptr().cast(), n) };
}

/// Records an allocation; false when it breaks the current bound (the
/// allocation then fails, and the process aborts naming its size).
fn note(size: usize) -> bool {
    TRACKING
        .try_with(|t| {
            if !t.get() {
                return true;
            }
            let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
            let bound = BOUND.try_with(|b| b.get()).unwrap_or(usize::MAX);
            if size > bound {
                report_over(size, bound);
                return false;
            }
            true
        })
        .unwrap_or(true)
}

// SAFETY: forwards every call to the system allocator unchanged, except that
// an allocation above the bound being enforced fails (returns null).
unsafe impl GlobalAlloc for Meter {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !note(layout.size()) {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !note(layout.size()) {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !note(new_size) {
            return std::ptr::null_mut();
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Meter = Meter;

/// Runs `f` under an allocation bound; returns the largest single allocation it made.
fn metered<T>(bound: usize, f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    BOUND.with(|b| b.set(bound));
    TRACKING.with(|t| t.set(true));
    let r = f();
    TRACKING.with(|t| t.set(false));
    (r, LARGEST.with(|l| l.get()))
}

// ---- inputs -----------------------------------------------------------------

/// xorshift64*: deterministic and fast.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
    /// A boundary value or a random one.
    fn interesting(&mut self) -> u64 {
        const V: [u64; 16] = [
            0,
            1,
            2,
            7,
            255,
            4096,
            8192,
            1 << 20,
            1 << 31,
            u32::MAX as u64,
            1 << 32,
            1 << 33,
            1 << 40,
            1 << 50,
            i64::MAX as u64,
            u64::MAX,
        ];
        if self.chance(3) {
            self.next()
        } else {
            V[self.below(V.len() as u64) as usize]
        }
    }
}

fn iterations() -> u64 {
    std::env::var("FUZZ_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000)
}

fn rng(target: u64) -> Rng {
    let seed = std::env::var("FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5EED_0000_0000_0001u64);
    Rng(seed ^ target.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
}

/// One to eight byte-level mutations of `seed`.
fn mutate(r: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + r.below(8) {
        let len = b.len() as u64;
        match r.below(7) {
            0 if len > 0 => {
                let i = r.below(len) as usize;
                b[i] ^= 1 << r.below(8);
            }
            1 if len > 0 => {
                let i = r.below(len) as usize;
                b[i] = r.next() as u8;
            }
            2 if len >= 8 => {
                // A boundary value written over 4 or 8 bytes, little-endian.
                let v = r.interesting().to_le_bytes();
                let w = if r.chance(2) { 4 } else { 8 };
                let i = r.below(len - w as u64 + 1) as usize;
                b[i..i + w].copy_from_slice(&v[..w]);
            }
            3 => {
                let i = r.below(len + 1) as usize;
                let n = 1 + r.below(16) as usize;
                let bytes: Vec<u8> = (0..n).map(|_| r.next() as u8).collect();
                b.splice(i..i, bytes);
            }
            4 if len > 0 => {
                let i = r.below(len) as usize;
                let n = (1 + r.below(64) as usize).min(b.len() - i);
                b.drain(i..i + n);
            }
            5 if len > 0 => {
                // Splice a slice of the input over another place.
                let (i, j) = (r.below(len) as usize, r.below(len) as usize);
                let n = (1 + r.below(32) as usize).min(b.len() - i).min(b.len() - j);
                let part = b[i..i + n].to_vec();
                b[j..j + n].copy_from_slice(&part);
            }
            _ => {
                if len > 0 && r.chance(8) {
                    b.truncate(r.below(len) as usize);
                }
            }
        }
    }
    b
}

/// Runs `target` on `n` inputs from `make`; fails on a panic or an
/// allocation above `bound(input length)`.
fn run(
    name: &str,
    n: u64,
    mut make: impl FnMut(u64) -> Vec<u8>,
    bound: impl Fn(usize) -> usize,
    target: impl Fn(&[u8]),
) {
    let began = std::time::Instant::now();
    for i in 0..n {
        let input = make(i);
        let limit = bound(input.len());
        let ((), largest) = metered(limit, || {
            if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target(&input))) {
                let msg = p.downcast_ref::<String>().cloned().or(p.downcast_ref::<&str>().map(|s| s.to_string()));
                panic!(
                    "{name}: input {i} ({} bytes) panicked: {msg:?}\n{:02x?}",
                    input.len(),
                    &input[..input.len().min(512)]
                );
            }
        });
        assert!(
            largest <= limit,
            "{name}: input {i} ({} bytes) made an allocation of {largest} bytes, above the bound {limit}",
            input.len()
        );
    }
    eprintln!("{name}: {n} inputs in {:.1} s, no panic, allocations within bounds", began.elapsed().as_secs_f64());
}

// ---- the manifest -------------------------------------------------------------

fn sample_manifest() -> Manifest {
    let file = |path: &str, size: u64, inc: Option<Incremental>| FileEntry {
        path: path.into(),
        size,
        mode: 0o600,
        uid: 101,
        gid: 104,
        mtime: 1_764_000_000,
        sha256: "ab".repeat(32),
        truncated: false,
        vanished: false,
        chunks: vec![(0, 0), (1, 0)],
        incremental: inc,
    };
    Manifest {
        format: "blockstream-manifest".into(),
        version: blockstream::manifest::VERSION,
        backup_id: "20261127T031500I".into(),
        backup_type: BackupType::Incr,
        parent: Some("20261127T021500F".into()),
        label: "fuzz".into(),
        system_identifier: 7_412_345_678_901_234_567,
        pg_version_num: 150018,
        timeline: 1,
        start_lsn: Lsn(0x3000028),
        stop_lsn: Lsn(0x3000138),
        checkpoint_lsn: Some(Lsn(0x3000060)),
        checkpoint_crc: Some(0x1234_5678),
        start_time: "2026-11-27T03:15:00Z".into(),
        stop_time: "2026-11-27T03:15:09Z".into(),
        wal_segment_size: 16 << 20,
        data_checksums: true,
        filters: blockstream::codec::filters_for(Compression::Zstd { level: 3 }),
        compression_v1: None,
        piece_size: 1 << 20,
        block_size: 8192,
        relseg_size: 131_072,
        full_reason: None,
        data_directory: Owner { mode: 0o700, uid: 101, gid: 104 },
        tablespaces: vec![Tablespace { oid: 16400, location: "/srv/ts1".into(), mode: 0o700, uid: 101, gid: 104 }],
        directories: vec![DirEntry { path: "base/5".into(), mode: 0o700, uid: 101, gid: 104 }],
        files: vec![
            file("base/5/16384", 40 * 8192, Some(Incremental { limit_block: 40, runs: vec![(0, 2), (17, 3)] })),
            file("global/pg_control", 8192, None),
            file("pg_wal/000000010000000000000003", 16 << 20, None),
        ],
        streams: vec![
            StreamEntry {
                name: "stream-00.bsz".into(),
                bytes: 32 + 9000,
                chunks: vec![ChunkMeta { offset: 32, stored: 9000, raw: 9 << 20, sha256: "11".repeat(32) }],
            },
            StreamEntry {
                name: "stream-01.bsz".into(),
                bytes: 32 + 7000,
                chunks: vec![ChunkMeta { offset: 32, stored: 7000, raw: 9 << 20, sha256: "22".repeat(32) }],
            },
        ],
        backup_label: "START WAL LOCATION: 0/3000028 (file 000000010000000000000003)\n".into(),
        tablespace_map: None,
        checksum_failures: vec![],
        stats: Stats::default(),
    }
}

const CHECKSUM_KEY: &[u8] = b",\n  \"manifest_checksum\": \"";

/// Gives manifest bytes a valid trailing checksum (when they still have the member).
fn resign(mut b: Vec<u8>) -> Vec<u8> {
    let Some(pos) = b.windows(CHECKSUM_KEY.len()).rposition(|w| w == CHECKSUM_KEY) else { return b };
    let digest = to_hex(&sha256(&b[..pos]));
    b.truncate(pos + CHECKSUM_KEY.len());
    b.extend_from_slice(digest.as_bytes());
    b.extend_from_slice(b"\"\n}\n");
    b
}

fn mutate_manifest_fields(r: &mut Rng, m: &mut Manifest) {
    let strings = [
        "",
        "..",
        "../x",
        "/",
        "/etc/passwd",
        "a//b",
        "./a",
        "base/5/../../x",
        "20261127T031500F",
        "x\0y",
        "pg_tblspc/16400/../../..",
    ];
    let s = |r: &mut Rng| -> String {
        if r.chance(2) {
            strings[r.below(strings.len() as u64) as usize].to_string()
        } else {
            (0..r.below(40)).map(|_| (b'!' + r.below(90) as u8) as char).collect()
        }
    };
    for _ in 0..1 + r.below(4) {
        let v = r.interesting();
        let nf = m.files.len() as u64;
        let f = r.below(nf.max(1)) as usize;
        match r.below(22) {
            0 => m.wal_segment_size = v,
            1 => m.piece_size = v,
            2 => m.block_size = v as u32,
            3 => m.relseg_size = v as u32,
            4 if nf > 0 => m.files[f].size = v,
            5 if nf > 0 => {
                m.files[f].incremental = Some(Incremental {
                    limit_block: v as u32,
                    runs: vec![(r.interesting() as u32, r.interesting() as u32)],
                })
            }
            6 => m.streams[0].chunks[0].raw = v,
            7 => m.streams[0].chunks[0].stored = v,
            8 => m.streams[0].chunks[0].offset = v,
            9 => m.streams[1].bytes = v,
            10 => m.start_lsn = Lsn(v),
            11 => m.stop_lsn = Lsn(v),
            12 => m.parent = Some(s(r)),
            13 => m.backup_id = s(r),
            14 => m.tablespaces[0].location = s(r),
            15 if nf > 0 => m.files[f].path = s(r),
            16 if nf > 0 => m.files[f].chunks.push((r.interesting() as u16, r.interesting() as u32)),
            17 => m.timeline = v as u32,
            18 if nf > 0 => m.files[f].vanished = r.chance(2),
            19 => {
                let c = m.streams[0].chunks[0].clone();
                for _ in 0..r.below(50) {
                    m.streams[0].chunks.push(c.clone());
                }
            }
            20 if nf > 0 => {
                let e = m.files[f].clone();
                m.files.push(e);
            }
            _ => m.directories.push(DirEntry { path: s(r), mode: v as u32, uid: 0, gid: 0 }),
        }
    }
}

/// What every reader derives from a manifest it accepted.
fn use_manifest(m: &Manifest) {
    let mut pieces = 0usize;
    for f in m.files.iter().filter(|f| !f.vanished) {
        pieces += f.pieces(m.piece_size, m.block_size as u64).len();
    }
    let seg = m.wal_segment_size;
    let mut segs = 0u64;
    for _ in m.start_lsn.segment(seg)..=m.stop_lsn.previous_segment(seg).max(m.start_lsn.segment(seg)) {
        segs += 1;
        assert!(segs <= m.files.len() as u64, "WAL loop ran past the files");
    }
    std::hint::black_box(pieces);
}

#[test]
fn manifest() {
    let seed = sample_manifest();
    let seed_bytes = seed.to_bytes();
    Manifest::from_bytes(&seed_bytes, Path::new("seed")).expect("the seed is valid");
    let mut r = rng(1);
    run(
        "manifest",
        iterations(),
        |_| match r.below(4) {
            0 => {
                let mut m = seed.clone();
                mutate_manifest_fields(&mut r, &mut m);
                m.to_bytes()
            }
            1 => resign(mutate(&mut r, &seed_bytes)),
            2 => mutate(&mut r, &seed_bytes),
            _ => {
                let mut m = seed.clone();
                mutate_manifest_fields(&mut r, &mut m);
                resign(mutate(&mut r, &m.to_bytes()))
            }
        },
        // JSON parsing allocates in proportion to the text; the pieces a
        // manifest implies are bounded by the chunk bytes it lists, a few
        // hundred times the text at most.
        |len| 1024 * len + (1 << 20),
        |b| {
            if let Ok(m) = Manifest::from_bytes(b, Path::new("fuzz")) {
                use_manifest(&m);
            }
        },
    );
}

// ---- stream chunks ---------------------------------------------------------------

#[test]
fn stream_chunk() {
    let mut builder = ChunkBuilder::with_capacity(1 << 16);
    for (i, len) in [8192usize, 100, 0, 3000].into_iter().enumerate() {
        let data: Vec<u8> = (0..len).map(|k| (k * 7 + i) as u8).collect();
        builder.push(i as u32, (i * 8192) as u64, &data);
    }
    let raw = builder.finish().to_vec();
    let mut compressed = Vec::new();
    Compressor::new(Compression::Zstd { level: 3 }).unwrap().compress(&raw, &mut compressed).unwrap();
    let mut r = rng(2);
    let raw_len = raw.len();
    run(
        "stream chunk",
        iterations(),
        |i| {
            let mut out = if i % 2 == 0 { mutate(&mut r, &raw) } else { mutate(&mut r, &compressed) };
            // The first 8 bytes carry the length the manifest claims (a bounded value, as validate() ensures).
            let claimed = if r.chance(2) { raw_len as u64 } else { r.interesting() % (limits::CHUNK_RAW + 2) };
            let mut input = claimed.to_le_bytes().to_vec();
            input.append(&mut out);
            input
        },
        // Decompression sizes its output by the raw length the (validated)
        // manifest gives, at most one chunk; parsing adds a record table.
        |len| (limits::CHUNK_RAW as usize + 64).max(64 * len),
        |b| {
            let (claimed, body) = b.split_at(8);
            let claimed = u64::from_le_bytes(claimed.try_into().unwrap()) as usize;
            let _ = parse_chunk(body, &"fuzz");
            let mut out = Vec::new();
            let mut d = Decompressor::new(Compression::Zstd { level: 3 }).unwrap();
            if d.decompress(body, claimed, &mut out, &"fuzz").is_ok() {
                let _ = parse_chunk(&out, &"fuzz");
            }
        },
    );
}

// ---- summary files ---------------------------------------------------------------

#[test]
fn summary_file() {
    let mut t = BlockRefTable::default();
    for b in [0u32, 1, 2, 7, 1000, 131_072, 4_000_000] {
        t.mark_block(RelFork { spc: 1663, db: 5, rel: 16384, fork: 0 }, b);
    }
    t.set_limit(RelFork { spc: 1663, db: 5, rel: 16390, fork: 0 }, 12);
    t.mark_database(1663, 16400);
    let h = SummaryHeader { system_identifier: 7, timeline: 1, gap: false, start: Lsn(0x100), end: Lsn(0x2000) };
    let seed = encode_summary(&h, &t);
    let mut r = rng(3);
    run(
        "summary file",
        iterations(),
        |_| {
            let mut b = mutate(&mut r, &seed);
            if b.len() >= 4 && r.chance(2) {
                // Give it a valid checksum so the fields behind it are reached.
                let n = b.len() - 4;
                let crc = crc32c(&b[..n]);
                b[n..].copy_from_slice(&crc.to_le_bytes());
            }
            b
        },
        // A block set allocates 512-byte bitmaps as blocks arrive: each
        // allocation is small whatever the block numbers say.
        |len| 64 * len + 4096,
        |b| {
            let _ = decode_summary(b, &"fuzz");
        },
    );
}

// ---- backup_label and pg_control -------------------------------------------------------

#[test]
fn backup_label() {
    let seed = b"START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nCHECKPOINT LOCATION: 0/2000060\n\
BACKUP METHOD: streamed\nBACKUP FROM: primary\nSTART TIME: 2026-11-27 03:15:00 UTC\nLABEL: nightly\nSTART TIMELINE: 1\n";
    assert!(BackupLabel::parse(std::str::from_utf8(seed).unwrap()).is_ok());
    let mut r = rng(4);
    run(
        "backup_label",
        iterations(),
        |_| mutate(&mut r, seed),
        |len| 4 * len + 4096,
        |b| {
            let _ = BackupLabel::parse(&String::from_utf8_lossy(b));
        },
    );
}

#[test]
fn pg_control() {
    let mut seed = vec![0u8; 8192];
    seed[0..8].copy_from_slice(&42u64.to_le_bytes());
    seed[8..12].copy_from_slice(&1300u32.to_le_bytes());
    seed[208..216].copy_from_slice(&1_234_567.0f64.to_le_bytes());
    for (at, v) in [(216, 8192u32), (220, 131_072), (224, 8192), (228, 16 << 20)] {
        seed[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    let crc = crc32c(&seed[..288]);
    seed[288..292].copy_from_slice(&crc.to_le_bytes());
    ControlFile::parse(&seed, &"seed").expect("the seed is valid");
    let mut r = rng(5);
    run(
        "pg_control",
        iterations(),
        |_| {
            let mut b = mutate(&mut r, &seed);
            if b.len() >= 292 && r.chance(2) {
                let crc = crc32c(&b[..288]);
                b[288..292].copy_from_slice(&crc.to_le_bytes());
            }
            b
        },
        |len| 4 * len + 4096,
        |b| {
            let _ = ControlFile::parse(b, &"fuzz");
        },
    );
}

// ---- archived WAL files ------------------------------------------------------------

#[test]
fn archived_wal_file() {
    use blockstream::archive;
    let wal: Vec<u8> = (0..65_536u32).map(|i| if i % 512 < 40 { (i * 31) as u8 } else { 0 }).collect();
    let seed = archive::encode("000000010000000000000003", 42, &wal, Compression::Zstd { level: 3 }).unwrap();
    assert_eq!(archive::decode(&seed, &"seed", None).unwrap().1, wal);
    // The same file sealed (an encrypted repository): decoded with the key.
    let (ring, _) = blockstream::crypt::Keyring::create(&blockstream::crypt::KeySource::Raw([6; 32])).unwrap();
    let sealed_seed =
        archive::encode_with("000000010000000000000003", 42, &wal, Compression::Zstd { level: 3 }, 1, Some(&ring))
            .unwrap();
    assert_eq!(archive::decode(&sealed_seed, &"seed", Some(&ring)).unwrap().1, wal);
    let history = b"1\t0/3000060\tno recovery target specified\n2\t0/5000100\tat restore point \"a\"\n";
    let mut r = rng(6);
    run(
        "archived WAL file",
        iterations(),
        |i| {
            let mut b = mutate(&mut r, if i % 2 == 0 { &seed } else { &sealed_seed });
            if b.len() >= 128 && r.chance(2) {
                if r.chance(2) {
                    // A header that claims another raw length, up to past the largest segment.
                    let claim = r.interesting() % (archive::MAX_RAW + 2);
                    b[16..24].copy_from_slice(&claim.to_le_bytes());
                }
                let crc = crc32c(&b[..124]);
                b[124..128].copy_from_slice(&crc.to_le_bytes());
            }
            b
        },
        // Up to one chunk's worth is sized by the (bounded) header; past it,
        // memory follows what the frame really decompresses to.
        |len| (limits::CHUNK_RAW as usize + 64).max(64 * len),
        |b| {
            let _ = archive::decode(b, &"fuzz", None);
            if archive::decode(b, &"fuzz", Some(&ring)).is_ok()
                && b.len() == sealed_seed.len()
                && b[128..] != sealed_seed[128..]
            {
                panic!("an altered sealed WAL file authenticated");
            }
            let _ = timeline::History::parse(3, &String::from_utf8_lossy(b));
        },
    );
    run(
        "timeline history",
        iterations(),
        |_| mutate(&mut r, history),
        |len| 8 * len + 4096,
        |b| {
            let _ = timeline::History::parse(3, &String::from_utf8_lossy(b));
        },
    );
}

// ---- WAL records ----------------------------------------------------------------

/// The block references of a WAL record, as a delta restore reads them
/// from a stopped server's pg_wal (after the record's CRC passed: the
/// decoder must hold for any bytes a CRC collision or a bug lets through).
#[test]
fn wal_record() {
    use blockstream::wal::record_changes;
    // A heap record: one block with an image and data, then main data.
    let mut seed = vec![0u8; 24];
    seed.extend_from_slice(&[0, 0x10 | 0x20, 8, 0, 0x40, 0, 0x20, 0, 0x01]);
    for v in [1663u32, 5, 16384, 7] {
        seed.extend_from_slice(&v.to_le_bytes());
    }
    seed.extend_from_slice(&[1, 0x80 | 0x20, 4, 0]);
    seed.extend_from_slice(&9u32.to_le_bytes());
    seed.extend_from_slice(&[255, 6]);
    seed.extend(std::iter::repeat_n(0xAB, 0x40 + 8 + 4 + 6));
    let len = seed.len() as u32;
    seed[0..4].copy_from_slice(&len.to_le_bytes());
    seed[17] = 10;
    let mut t = BlockRefTable::default();
    record_changes(&seed, &mut t).unwrap();
    assert!(t.get(&RelFork { spc: 1663, db: 5, rel: 16384, fork: 0 }).unwrap().blocks.contains(9));
    let mut r = rng(8);
    run(
        "WAL record",
        iterations(),
        |_| mutate(&mut r, &seed),
        |len| 64 * len + 4096,
        |b| {
            let _ = record_changes(b, &mut BlockRefTable::default());
        },
    );
}

// ---- encrypted chunks, manifests and keys.json --------------------------------------

/// The decrypting decoders: a sealed chunk through the filter stack, a
/// sealed manifest and `keys.json` (with a raw key: no Argon2 per input).
/// Nothing panics, allocations stay bounded, and no altered input ever
/// authenticates.
#[test]
fn sealed_objects() {
    use blockstream::codec::{stack, ChunkDecoder, ChunkEncoder};
    use blockstream::crypt::{KeySource, Keyring};
    let src = KeySource::Raw([5; 32]);
    let (ring, keys_json) = Keyring::create(&src).unwrap();
    let key = ring.chunk_key("20261129T120000F");
    let filters = stack(Compression::Zstd { level: 3 }, true);
    let raw: Vec<u8> = (0..20_000u32).map(|i| (i % 97) as u8).collect();
    let mut chunk = Vec::new();
    ChunkEncoder::new(&filters, Some(key)).unwrap().encode(&raw, &mut chunk, "stream-00.bsz", 0).unwrap();
    let manifest = ring.seal_object("blockstream manifests", "20261129T120000F", &sample_manifest().to_bytes());
    let seeds = [chunk.clone(), manifest.clone(), keys_json.clone()];
    let mut r = rng(9);
    run(
        "sealed objects",
        iterations(),
        |i| {
            let mut out = mutate(&mut r, &seeds[(i % 3) as usize]);
            out.insert(0, (i % 3) as u8);
            out
        },
        |len| (limits::CHUNK_RAW as usize + 64).max(64 * len),
        |b| {
            let (which, body) = (b[0], &b[1..]);
            match which {
                0 => {
                    let mut out = Vec::new();
                    let mut d = ChunkDecoder::new(&filters, Some(key)).unwrap();
                    let ok = d.decode(body, raw.len(), &mut out, "stream-00.bsz", 0, &"fuzz").is_ok();
                    assert!(!ok || body == chunk.as_slice(), "an altered chunk authenticated");
                }
                1 => {
                    let ok = ring.open_object("blockstream manifests", "20261129T120000F", body, "fuzz").is_ok();
                    assert!(!ok || body == manifest.as_slice(), "an altered manifest authenticated");
                }
                _ => {
                    let _ = Keyring::open(body, &src, "fuzz");
                }
            }
        },
    );
}
