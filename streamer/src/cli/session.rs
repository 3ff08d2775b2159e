//! The backup session over libpq ([`super::pq`]): connections made as psql
//! makes them, and [`BackupSession`] on top of the extension's
//! `blocktrack.backup_start` / `backup_stop`.

use blockstream::backup::{BackupSession, ParentRef, ServerInfo, StartInfo, StopInfo};
use blockstream::lsn::Lsn;
use blockstream::plan::ChangedSegment;
use blockstream::{Error, Result};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockstream::progress::Progress;

use super::args::ConnArgs;
use super::pq::{Conn, DbError, Rows};

/// libpq connection keywords from the flags, in psql's order: `-h`, `-p`,
/// `-U`, then `-d` (a database name, connection string or URI, expanded by
/// libpq), then our application name as the fallback. Everything not given
/// comes from libpq's environment variables, service file and defaults.
pub fn conn_params(args: &ConnArgs, application: &str) -> Vec<(&'static str, String)> {
    let mut p = Vec::new();
    if let Some(h) = &args.host {
        p.push(("host", h.clone()));
    }
    if let Some(port) = args.port {
        p.push(("port", port.to_string()));
    }
    if let Some(u) = &args.user {
        p.push(("user", u.clone()));
    }
    if let Some(d) = &args.dbname {
        p.push(("dbname", d.clone()));
    }
    p.push(("fallback_application_name", application.to_string()));
    p
}

/// Connects as psql would with the same flags and environment.
pub fn connect(args: &ConnArgs, application: &str) -> Result<Conn> {
    let params = conn_params(args, application);
    let borrowed: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Conn::connect(&borrowed).map_err(Error::Server)
}

/// A backup's session: one connection, shared by the engine's calls and the
/// progress reporter (which take turns on it).
pub struct PgSession {
    client: Arc<Mutex<Conn>>,
    target: String,
}

fn server_err(what: &str, target: &str) -> impl FnOnce(DbError) -> Error {
    let (what, target) = (what.to_string(), target.to_string());
    move |e| Error::Server(format!("{what} failed on server {target}: {e}"))
}

fn one_row(rows: Rows, what: &str) -> Result<Vec<Option<String>>> {
    rows.rows.into_iter().next().ok_or_else(|| Error::Server(format!("{what} returned no row")))
}

fn field<T: std::str::FromStr>(row: &[Option<String>], i: usize, what: &str) -> Result<T> {
    let v = row.get(i).and_then(|v| v.as_deref()).ok_or_else(|| Error::Server(format!("{what} returned NULL")))?;
    v.parse().map_err(|_| Error::Server(format!("{what} returned \"{v}\"")))
}

fn bool_field(row: &[Option<String>], i: usize, what: &str) -> Result<bool> {
    match row.get(i).and_then(|v| v.as_deref()) {
        Some("t") => Ok(true),
        Some("f") => Ok(false),
        other => Err(Error::Server(format!("{what} returned {other:?} where a boolean was expected"))),
    }
}

/// Bytes from `encode(..., 'hex')`.
fn unhex(s: &str, what: &str) -> Result<Vec<u8>> {
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return Err(Error::Server(format!("{what}: odd-length hex")));
    }
    let nib = |c: u8| match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        _ => Err(Error::Server(format!("{what}: bad hex digit"))),
    };
    b.chunks_exact(2).map(|p| Ok(nib(p[0])? << 4 | nib(p[1])?)).collect()
}

/// Reports a running operation's progress over its session every half
/// second (`blocktrack.progress_report`, shown by the `blocktrack.progress`
/// view), and turns a `blocktrack.cancel_backup()` into a cancel of the
/// engine. Stops and says `done` when dropped.
pub struct Reporter {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl PgSession {
    fn conn(&self) -> std::sync::MutexGuard<'_, Conn> {
        self.client.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts reporting `progress` of a `kind` operation on `repository`.
    pub fn report(&self, kind: &'static str, repository: String, progress: Arc<Progress>) -> Reporter {
        let stop = Arc::new(AtomicBool::new(false));
        let (client, flag) = (self.client.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let send = |phase: &str, r: &blockstream::progress::Report| -> Option<bool> {
                let mut c = client.lock().unwrap_or_else(|p| p.into_inner());
                let args = [
                    kind.to_string(),
                    phase.to_string(),
                    r.bytes_done.to_string(),
                    r.bytes_total.to_string(),
                    r.files_done.to_string(),
                    r.files_total.to_string(),
                    r.streams.to_string(),
                    format!("{:.3}", r.elapsed_secs),
                    format!("{:.3}", r.phase_secs),
                    repository.clone(),
                ];
                let a: Vec<Option<&str>> = args.iter().map(|s| Some(s.as_str())).collect();
                c.query(
                    "SELECT blocktrack.progress_report($1, $2, $3::int8, $4::int8, $5::int8, $6::int8, $7::int4, \
                     $8::float8, $9::float8, $10)",
                    &a,
                )
                .ok()
                .map(|rows| rows.get(0, 0) == Some("t"))
            };
            while !flag.load(Ordering::Relaxed) {
                let r = progress.report();
                if !r.phase.is_empty() && send(&r.phase, &r) == Some(true) {
                    progress.cancel();
                }
                for _ in 0..5 {
                    if flag.load(Ordering::Relaxed) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            let _ = send("done", &progress.report());
        });
        Reporter { stop, thread: Some(thread) }
    }

    pub fn connect(args: &ConnArgs) -> Result<PgSession> {
        let client = connect(args, "blockstream")?;
        let target = format!("{}{}", client.describe(), if client.ssl_in_use() { " over TLS" } else { "" });
        Ok(PgSession { client: Arc::new(Mutex::new(client)), target })
    }

    pub fn target(&self) -> &str {
        &self.target
    }

    /// The data directory as the server reports it (needs superuser or pg_read_all_settings).
    pub fn data_directory(&mut self) -> Option<String> {
        self.conn()
            .query("SELECT setting FROM pg_settings WHERE name = 'data_directory'", &[])
            .ok()
            .and_then(|r| r.get(0, 0).map(str::to_string))
    }
}

impl BackupSession for PgSession {
    fn server_info(&mut self) -> Result<ServerInfo> {
        let target = self.target.clone();
        let ext = self
            .conn()
            .query("SELECT extversion FROM pg_extension WHERE extname = 'pg_blocktrack'", &[])
            .map_err(server_err("checking for pg_blocktrack", &target))?;
        if ext.rows.is_empty() {
            return Err(Error::Server(format!(
                "extension pg_blocktrack is not installed in the database of {target}: run CREATE EXTENSION pg_blocktrack there"
            )));
        }
        let what = "reading server settings";
        let row = one_row(
            self.conn()
                .query(
                    "SELECT (SELECT system_identifier::text FROM pg_control_system()), \
                            current_setting('server_version_num'), \
                            (SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'), \
                            current_setting('block_size')",
                    &[],
                )
                .map_err(server_err(what, &target))?,
            what,
        )?;
        Ok(ServerInfo {
            system_identifier: field(&row, 0, what)?,
            pg_version_num: field(&row, 1, what)?,
            wal_segment_size: field(&row, 2, what)?,
            block_size: field(&row, 3, what)?,
        })
    }

    fn start(&mut self, label: &str, fast: bool, parent: Option<ParentRef>) -> Result<StartInfo> {
        let target = self.target.clone();
        let text = |f: &dyn Fn(&ParentRef) -> Option<String>| parent.as_ref().and_then(f);
        let parent_lsn = text(&|p| Some(p.start_lsn.to_string()));
        let parent_tli = text(&|p| Some(p.timeline.to_string()));
        let parent_stop = text(&|p| Some(p.stop_lsn.to_string()));
        let parent_ckpt = text(&|p| p.checkpoint.map(|(l, _)| l.to_string()));
        let parent_crc = text(&|p| p.checkpoint.map(|(_, c)| c.to_string()));
        let what = "blocktrack.backup_start";
        let row = one_row(
            self.conn()
                .query(
                    "SELECT start_lsn::text, start_tli, system_identifier::text, data_checksums, incremental_ok, reason \
                     FROM blocktrack.backup_start($1, $2::bool, $3::text::pg_lsn, $4::int4, \
                          parent_stop_lsn => $5::text::pg_lsn, parent_checkpoint_lsn => $6::text::pg_lsn, \
                          parent_checkpoint_crc => $7::int8)",
                    &[
                        Some(label),
                        Some(if fast { "t" } else { "f" }),
                        parent_lsn.as_deref(),
                        parent_tli.as_deref(),
                        parent_stop.as_deref(),
                        parent_ckpt.as_deref(),
                        parent_crc.as_deref(),
                    ],
                )
                .map_err(server_err(what, &target))?,
            what,
        )?;
        Ok(StartInfo {
            start_lsn: field(&row, 0, what)?,
            timeline: field(&row, 1, what)?,
            system_identifier: field(&row, 2, what)?,
            data_checksums: bool_field(&row, 3, what)?,
            incremental_ok: bool_field(&row, 4, what)?,
            reason: row.get(5).cloned().flatten(),
        })
    }

    fn changed_blocks(&mut self, since: Lsn, until: Lsn, timeline: u32) -> Result<Vec<ChangedSegment>> {
        let target = self.target.clone();
        let what = "blocktrack.changed_blocks";
        let rows = self
            .conn()
            .query(
                "SELECT path, relfilenode::int8, forknum::int4, segno, limit_block, full_copy, encode(blocks, 'hex') \
                 FROM blocktrack.changed_blocks($1::text::pg_lsn, $2::text::pg_lsn, $3::int4)",
                &[Some(&since.to_string()), Some(&until.to_string()), Some(&timeline.to_string())],
            )
            .map_err(server_err(what, &target))?;
        rows.rows
            .iter()
            .map(|r| {
                let path: String = field(r, 0, what)?;
                let blocks = unhex(r.get(6).and_then(|v| v.as_deref()).unwrap_or(""), what)?;
                let blocks = blockstream::plan::decode_blocks(&blocks, &path)?;
                Ok(ChangedSegment {
                    relfilenode: r.get(1).cloned().flatten().map(|v| v.parse()).transpose().map_err(|_| {
                        Error::Server(format!("{what} returned a relfilenode that is not a number for \"{path}\""))
                    })?,
                    fork: field(r, 2, what)?,
                    segno: field(r, 3, what)?,
                    limit_block: r.get(4).cloned().flatten().map(|v| v.parse()).transpose().map_err(|_| {
                        Error::Server(format!("{what} returned a limit block that is not a number for \"{path}\""))
                    })?,
                    full_copy: bool_field(r, 5, what)?,
                    blocks,
                    path,
                })
            })
            .collect()
    }

    fn stop(&mut self) -> Result<StopInfo> {
        let target = self.target.clone();
        let what = "blocktrack.backup_stop";
        let row = one_row(
            self.conn()
                .query(
                    "SELECT stop_lsn::text, stop_tli, labelfile, spcmapfile, checkpoint_crc \
                     FROM blocktrack.backup_stop(false)",
                    &[],
                )
                .map_err(server_err(what, &target))?,
            what,
        )?;
        Ok(StopInfo {
            stop_lsn: field(&row, 0, what)?,
            timeline: field(&row, 1, what)?,
            backup_label: row.get(2).cloned().flatten().unwrap_or_default(),
            tablespace_map: row.get(3).cloned().flatten().unwrap_or_default(),
            checkpoint_crc: row.get(4).cloned().flatten().and_then(|v| v.parse().ok()),
        })
    }
}
