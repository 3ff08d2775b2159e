//! The backup session over libpq's protocol: connection settings resolved the
//! way libpq resolves them, and [`BackupSession`] on top of the extension's
//! `blocktrack.backup_start` / `backup_stop`.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use blockstream::backup::{BackupSession, ServerInfo, StartInfo, StopInfo};
use blockstream::lsn::Lsn;
use blockstream::plan::ChangedSegment;
use blockstream::{Error, Result};
use postgres::config::Host;
use postgres::{Client, Config, NoTls};

use super::args::ConnArgs;

/// Connection settings: flags over the connection string over the environment over defaults.
pub fn resolve_config(args: &ConnArgs) -> Result<Config> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let parsed = match &args.dbname {
        Some(d) if d.contains('=') || d.starts_with("postgres://") || d.starts_with("postgresql://") => {
            Some(Config::from_str(d).map_err(|e| Error::Usage(format!("invalid connection string \"{d}\": {e}")))?)
        }
        _ => None,
    };
    let plain_dbname = args.dbname.clone().filter(|_| parsed.is_none());

    let hosts: Vec<String> = if let Some(h) = &args.host {
        h.split(',').map(str::to_string).collect()
    } else if let Some(p) = parsed.as_ref().filter(|p| !p.get_hosts().is_empty()) {
        p.get_hosts()
            .iter()
            .map(|h| match h {
                Host::Tcp(s) => s.clone(),
                Host::Unix(p) => p.display().to_string(),
            })
            .collect()
    } else if let Some(h) = env("PGHOST") {
        h.split(',').map(str::to_string).collect()
    } else {
        // libpq's default socket directory on Debian, then the upstream one.
        let dir = ["/var/run/postgresql", "/tmp"].into_iter().find(|d| Path::new(d).is_dir()).unwrap_or("/tmp");
        vec![dir.to_string()]
    };
    let port = match args.port {
        Some(p) => p,
        None => match parsed.as_ref().and_then(|p| p.get_ports().first().copied()) {
            Some(p) => p,
            None => match env("PGPORT") {
                Some(p) => p.parse().map_err(|_| Error::Usage(format!("invalid PGPORT \"{p}\"")))?,
                None => 5432,
            },
        },
    };
    let user = args
        .user
        .clone()
        .or_else(|| parsed.as_ref().and_then(|p| p.get_user().map(str::to_string)))
        .or_else(|| env("PGUSER"))
        .or_else(|| env("USER"))
        .unwrap_or_else(|| "postgres".to_string());
    let dbname = plain_dbname
        .or_else(|| parsed.as_ref().and_then(|p| p.get_dbname().map(str::to_string)))
        .or_else(|| env("PGDATABASE"))
        .unwrap_or_else(|| user.clone());

    let mut cfg = Config::new();
    for h in &hosts {
        cfg.host(h);
    }
    cfg.port(port).user(&user).dbname(&dbname);
    match parsed.as_ref().and_then(|p| p.get_password().map(<[u8]>::to_vec)) {
        Some(pw) => {
            cfg.password(pw);
        }
        None => {
            if let Some(pw) = env("PGPASSWORD") {
                cfg.password(pw);
            }
        }
    }
    let app = parsed
        .as_ref()
        .and_then(|p| p.get_application_name().map(str::to_string))
        .or_else(|| env("PGAPPNAME"))
        .unwrap_or_else(|| "blockstream".to_string());
    cfg.application_name(&app);
    let timeout = parsed
        .as_ref()
        .and_then(|p| p.get_connect_timeout().copied())
        .or_else(|| env("PGCONNECT_TIMEOUT").and_then(|t| t.parse().ok()).map(Duration::from_secs))
        .unwrap_or(Duration::from_secs(10));
    cfg.connect_timeout(timeout);
    Ok(cfg)
}

/// `host=/tmp port=5432 user=postgres dbname=postgres`, for messages.
pub fn describe(cfg: &Config) -> String {
    let hosts: Vec<String> = cfg
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(s) => s.clone(),
            Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    format!(
        "host={} port={} user={} dbname={}",
        hosts.join(","),
        cfg.get_ports().first().copied().unwrap_or(5432),
        cfg.get_user().unwrap_or(""),
        cfg.get_dbname().unwrap_or("")
    )
}

pub struct PgSession {
    client: Client,
    target: String,
}

fn server_err(what: &str, target: &str) -> impl FnOnce(postgres::Error) -> Error {
    let (what, target) = (what.to_string(), target.to_string());
    move |e| {
        let msg = match e.as_db_error() {
            Some(db) => format!(
                "{} (SQLSTATE {}){}",
                db.message(),
                db.code().code(),
                db.hint().or(db.detail()).map(|h| format!(": {h}")).unwrap_or_default()
            ),
            None => e.to_string(),
        };
        Error::Server(format!("{what} failed on server {target}: {msg}"))
    }
}

impl PgSession {
    pub fn connect(args: &ConnArgs) -> Result<PgSession> {
        let cfg = resolve_config(args)?;
        let target = describe(&cfg);
        let client = cfg.connect(NoTls).map_err(|e| {
            let detail = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| {
                let mut s = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(inner) = src {
                    s = format!("{s}: {inner}");
                    src = inner.source();
                }
                s
            });
            Error::Server(format!("could not connect to server ({target}): {detail}"))
        })?;
        Ok(PgSession { client, target })
    }

    pub fn target(&self) -> &str {
        &self.target
    }

    /// The data directory as the server reports it (needs superuser or pg_read_all_settings).
    pub fn data_directory(&mut self) -> Option<String> {
        self.client
            .query_opt("SELECT setting FROM pg_settings WHERE name = 'data_directory'", &[])
            .ok()
            .flatten()
            .map(|r| r.get(0))
    }
}

impl BackupSession for PgSession {
    fn server_info(&mut self) -> Result<ServerInfo> {
        let target = self.target.clone();
        let ext = self
            .client
            .query_opt("SELECT extversion FROM pg_extension WHERE extname = 'pg_blocktrack'", &[])
            .map_err(server_err("checking for pg_blocktrack", &target))?;
        if ext.is_none() {
            return Err(Error::Server(format!(
                "extension pg_blocktrack is not installed in the database of {target}: run CREATE EXTENSION pg_blocktrack there"
            )));
        }
        let row = self
            .client
            .query_one(
                "SELECT (SELECT system_identifier::text FROM pg_control_system()), \
                        current_setting('server_version_num')::int4, \
                        (SELECT setting::int8 FROM pg_settings WHERE name = 'wal_segment_size'), \
                        current_setting('block_size')::int4",
                &[],
            )
            .map_err(server_err("reading server settings", &target))?;
        let sysid: String = row.get(0);
        Ok(ServerInfo {
            system_identifier: sysid
                .parse()
                .map_err(|_| Error::Server(format!("server {target} reported system identifier \"{sysid}\"")))?,
            pg_version_num: row.get::<_, i32>(1) as u32,
            wal_segment_size: row.get::<_, i64>(2) as u64,
            block_size: row.get::<_, i32>(3) as u32,
        })
    }

    fn start(&mut self, label: &str, fast: bool, parent: Option<(Lsn, u32)>) -> Result<StartInfo> {
        let target = self.target.clone();
        let parent_lsn = parent.map(|(l, _)| l.to_string());
        let parent_tli = parent.map(|(_, t)| t as i32);
        let row = self
            .client
            .query_one(
                "SELECT start_lsn::text, start_tli, system_identifier::text, data_checksums, incremental_ok, reason \
                 FROM blocktrack.backup_start($1, $2, $3::text::pg_lsn, $4)",
                &[&label, &fast, &parent_lsn, &parent_tli],
            )
            .map_err(server_err("blocktrack.backup_start", &target))?;
        let lsn: String = row.get(0);
        let sysid: String = row.get(2);
        Ok(StartInfo {
            start_lsn: lsn.parse()?,
            timeline: row.get::<_, i32>(1) as u32,
            system_identifier: sysid
                .parse()
                .map_err(|_| Error::Server(format!("backup_start returned system identifier \"{sysid}\"")))?,
            data_checksums: row.get(3),
            incremental_ok: row.get(4),
            reason: row.get(5),
        })
    }

    fn changed_blocks(&mut self, since: Lsn, until: Lsn, timeline: u32) -> Result<Vec<ChangedSegment>> {
        let target = self.target.clone();
        let rows = self
            .client
            .query(
                "SELECT path, relfilenode::int8, forknum::int4, segno, limit_block, full_copy, blocks \
                 FROM blocktrack.changed_blocks($1::text::pg_lsn, $2::text::pg_lsn, $3)",
                &[&since.to_string(), &until.to_string(), &(timeline as i32)],
            )
            .map_err(server_err("blocktrack.changed_blocks", &target))?;
        rows.iter()
            .map(|r| {
                let path: String = r.get(0);
                let blocks: Vec<u8> = r.get(6);
                if !blocks.len().is_multiple_of(4) {
                    return Err(Error::Server(format!(
                        "changed_blocks returned {} bytes of blocks for \"{path}\", not a multiple of 4",
                        blocks.len()
                    )));
                }
                Ok(ChangedSegment {
                    relfilenode: r.get::<_, Option<i64>>(1).map(|v| v as u32),
                    fork: r.get::<_, i32>(2) as u8,
                    segno: r.get::<_, i32>(3) as u32,
                    limit_block: r.get::<_, Option<i64>>(4).map(|v| v as u32),
                    full_copy: r.get(5),
                    blocks: blocks.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect(),
                    path,
                })
            })
            .collect()
    }

    fn stop(&mut self) -> Result<StopInfo> {
        let target = self.target.clone();
        let row = self
            .client
            .query_one("SELECT stop_lsn::text, stop_tli, labelfile, spcmapfile FROM blocktrack.backup_stop(false)", &[])
            .map_err(server_err("blocktrack.backup_stop", &target))?;
        let lsn: String = row.get(0);
        Ok(StopInfo {
            stop_lsn: lsn.parse()?,
            timeline: row.get::<_, i32>(1) as u32,
            backup_label: row.get(2),
            tablespace_map: row.get(3),
        })
    }
}
