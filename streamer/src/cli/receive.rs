//! `blockstream wal-receive`: streams WAL over the replication protocol into
//! the repository as it is written, like pg_receivewal, for an RPO of about
//! zero without waiting for segment switches.
//!
//! The segment being received is written (uncompressed, preallocated) to
//! `REPO/receive/<segment>.partial`; a finished segment is archived like
//! any other (`archive::push`) and its partial file removed. `archive-get`
//! serves a partial file when the archive lacks the segment, so a restore
//! to the end of the archive replays everything received. With
//! `--synchronous` every write is fsynced before it is acknowledged, so the
//! receiver can be a synchronous standby (its `application_name` in
//! `synchronous_standby_names`): a commit the primary acknowledged is on the
//! backup host's disk. A persistent physical slot (`--slot`) keeps the WAL
//! the receiver has not confirmed.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use blockstream::archive;
use blockstream::codec::Compression;
use blockstream::lsn::{parse_wal_file_name, wal_file_name, Lsn};
use blockstream::repo::Repo;
use blockstream::safe_fs;

use super::args::WalReceiveArgs;
use super::pq::{Conn, Copy};
use super::session::conn_params;

use blockstream::archive::RECEIVE_DIR;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Microseconds since 2000-01-01, PostgreSQL's clock.
fn pg_now() -> i64 {
    let unix =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0);
    unix - 946_684_800_000_000
}

/// The standby status update: written, flushed, applied (invalid) and the time.
fn status(written: Lsn, flushed: Lsn, reply: bool) -> Vec<u8> {
    let mut m = Vec::with_capacity(34);
    m.push(b'r');
    m.extend_from_slice(&written.0.to_be_bytes());
    m.extend_from_slice(&flushed.0.to_be_bytes());
    m.extend_from_slice(&0u64.to_be_bytes());
    m.extend_from_slice(&pg_now().to_be_bytes());
    m.push(reply as u8);
    m
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn one(conn: &mut Conn, sql: &str) -> anyhow::Result<Vec<Option<String>>> {
    let rows = conn.simple(sql).map_err(|e| anyhow::anyhow!("{sql} failed: {e}"))?;
    rows.rows.into_iter().next().with_context(|| format!("{sql} returned no row"))
}

/// `16MB` → 16777216 (SHOW's units).
fn parse_show_size(s: &str) -> Option<u64> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().ok()?;
    Some(
        n * match unit {
            "" | "B" => 1,
            "kB" => 1 << 10,
            "MB" => 1 << 20,
            "GB" => 1 << 30,
            _ => return None,
        },
    )
}

/// The segment being received: its partial file and where it starts.
struct Segment {
    name: String,
    path: PathBuf,
    file: File,
    start: u64,
}

pub fn wal_receive(a: WalReceiveArgs) -> anyhow::Result<ExitCode> {
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    let params = conn_params(&a.conn, &a.application_name);
    let mut borrowed: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
    borrowed.push(("replication", "true"));
    let mut conn = Conn::connect(&borrowed).map_err(anyhow::Error::msg)?;
    let ident = one(&mut conn, "IDENTIFY_SYSTEM")?;
    let field = |i: usize| ident.get(i).cloned().flatten().unwrap_or_default();
    let sysid: u64 = field(0).parse().context("IDENTIFY_SYSTEM returned no system identifier")?;
    let tli: u32 = field(1).parse().context("IDENTIFY_SYSTEM returned no timeline")?;
    let xlogpos: Lsn = field(2).parse()?;
    let version: u32 =
        one(&mut conn, "SHOW server_version_num")?.first().cloned().flatten().unwrap_or_default().parse()?;
    let seg_size = one(&mut conn, "SHOW wal_segment_size")?
        .first()
        .cloned()
        .flatten()
        .and_then(|s| parse_show_size(&s))
        .context("could not read wal_segment_size")?;
    let root = super::repo_arg(&a.repo);
    let mut repo = Repo::open_or_create(&root, sysid, version)?;
    let e = super::encryption(&a.keys)?;
    repo.unlock(e.key.as_ref(), e.allow_plain)?;
    let recv = root.join(RECEIVE_DIR);
    safe_fs::create_dir(&recv, safe_fs::DIR_MODE)?;
    if let Some(slot) = &a.slot {
        if let Err(e) =
            conn.simple(&format!("CREATE_REPLICATION_SLOT \"{}\" PHYSICAL RESERVE_WAL", slot.replace('"', "")))
        {
            if e.sqlstate.as_deref() != Some("42710") {
                bail!("could not create replication slot \"{slot}\": {e}");
            }
        }
    }
    // The timeline's history, for a restore to follow it.
    if tli > 1 {
        let hist = format!("{tli:08X}.history");
        if !root.join(archive::relative_path(&hist)?).exists() {
            let row = one(&mut conn, &format!("TIMELINE_HISTORY {tli}"))?;
            let content = row.get(1).cloned().flatten().unwrap_or_default();
            let tmp = recv.join(&hist);
            fs::write(&tmp, content)?;
            archive::push(&repo, &tmp, &hist, Compression::None)?;
            let _ = fs::remove_file(&tmp);
        }
    }
    let start = resume_point(&repo, &recv, tli, xlogpos, seg_size)?;
    let slot = a.slot.as_ref().map(|s| format!("SLOT \"{}\" ", s.replace('"', ""))).unwrap_or_default();
    conn.start_copy_both(&format!("START_REPLICATION {slot}PHYSICAL {start} TIMELINE {tli}"))
        .map_err(|e| anyhow::anyhow!("could not start streaming at {start} on timeline {tli}: {e}"))?;
    eprintln!(
        "blockstream: wal-receive: streaming from {start} on timeline {tli} into {}{}",
        root.display(),
        if a.synchronous { " (synchronous)" } else { "" }
    );

    let mut seg: Option<Segment> = None;
    let mut written = start;
    let mut last_status = Instant::now();
    while !STOP.load(Ordering::Relaxed) {
        let msg = match conn.get_copy(Duration::from_millis(500)) {
            Ok(Copy::Data(m)) => m,
            Ok(Copy::Idle) => {
                if last_status.elapsed() > Duration::from_secs(1) {
                    if let Some(s) = &seg {
                        s.file.sync_data()?;
                    }
                    conn.put_copy(&status(written, written, false)).map_err(anyhow::Error::msg)?;
                    last_status = Instant::now();
                }
                continue;
            }
            Ok(Copy::End) => bail!("the server ended the stream at {written} (a timeline switch or a shutdown)"),
            Err(e) => bail!("streaming stopped at {written}: {e}"),
        };
        match msg.first() {
            Some(b'w') if msg.len() >= 25 => {
                let mut at = be64(&msg, 1);
                let mut data = &msg[25..];
                while !data.is_empty() {
                    let segno = at / seg_size;
                    if seg.as_ref().is_none_or(|s| s.start != segno * seg_size) {
                        if let Some(done) = seg.take() {
                            finish(&repo, done)?;
                        }
                        seg = Some(open_segment(&recv, tli, segno, seg_size)?);
                    }
                    let s = seg.as_ref().expect("opened above");
                    let room = (s.start + seg_size - at) as usize;
                    let n = room.min(data.len());
                    s.file
                        .write_all_at(&data[..n], at - s.start)
                        .with_context(|| format!("could not write {}", s.path.display()))?;
                    at += n as u64;
                    data = &data[n..];
                    if at == s.start + seg_size {
                        finish(&repo, seg.take().expect("open"))?;
                    }
                }
                written = Lsn(at);
                if a.synchronous {
                    if let Some(s) = &seg {
                        s.file.sync_data()?;
                    }
                    conn.put_copy(&status(written, written, false)).map_err(anyhow::Error::msg)?;
                    last_status = Instant::now();
                }
            }
            // A keepalive that asks for a reply.
            Some(b'k') if msg.len() >= 18 && msg[17] == 1 => {
                if let Some(s) = &seg {
                    s.file.sync_data()?;
                }
                conn.put_copy(&status(written, written, false)).map_err(anyhow::Error::msg)?;
                last_status = Instant::now();
            }
            _ => {}
        }
    }
    if let Some(s) = &seg {
        s.file.sync_data()?;
    }
    eprintln!("blockstream: wal-receive: stopped at {written}");
    Ok(ExitCode::SUCCESS)
}

/// Where streaming resumes: the start of the segment a partial file holds,
/// else the segment after the newest archived one of this timeline, else
/// the segment the server writes now.
fn resume_point(repo: &Repo, recv: &Path, tli: u32, xlogpos: Lsn, seg_size: u64) -> anyhow::Result<Lsn> {
    let mut partial: Option<u64> = None;
    for e in fs::read_dir(recv)?.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if let Some(base) = n.strip_suffix(".partial") {
            if let Some((t, s)) = parse_wal_file_name(base, seg_size) {
                if t == tli {
                    partial = Some(partial.map_or(s, |p| p.min(s)));
                }
            }
        }
    }
    if let Some(s) = partial {
        return Ok(Lsn(s * seg_size));
    }
    let listing = archive::list(repo, seg_size)?;
    if let Some(&last) = listing.segments.get(&tli).and_then(|s| s.last()) {
        return Ok(Lsn((last + 1) * seg_size));
    }
    Ok(Lsn(xlogpos.segment(seg_size) * seg_size))
}

fn open_segment(recv: &Path, tli: u32, segno: u64, seg_size: u64) -> anyhow::Result<Segment> {
    let name = wal_file_name(tli, segno, seg_size);
    let path = recv.join(format!("{name}.partial"));
    let file = File::options().read(true).write(true).create(true).truncate(false).open(&path)?;
    if file.metadata()?.len() < seg_size {
        file.set_len(seg_size)?;
    }
    safe_fs::set_mode(&file, &path, safe_fs::FILE_MODE)?;
    Ok(Segment { name, path, file, start: segno * seg_size })
}

/// A whole segment: archived, then its partial file removed.
fn finish(repo: &Repo, s: Segment) -> anyhow::Result<()> {
    s.file.sync_all()?;
    drop(s.file);
    let whole = s.path.with_extension("");
    fs::rename(&s.path, &whole)?;
    archive::push(repo, &whole, &s.name, Compression::Zstd { level: 1 })?;
    fs::remove_file(&whole)?;
    Ok(())
}
