//! Flags, following PostgreSQL tool conventions (`-D`, `-d`, `-h`, `-p`, `-U`,
//! `-j`, `-P`), parsed and validated in one place.

use std::path::PathBuf;

use blockstream::codec::Compression;
use blockstream::lsn::Lsn;
use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "blockstream",
    version,
    about = "Block-level parallel backup and restore for PostgreSQL",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Take an online backup of a running cluster into a repository
    #[command(disable_help_flag = true)]
    Backup(BackupArgs),
    /// Restore a backup into a new data directory
    Restore(RestoreArgs),
    /// Show the backups in a repository
    Info(InfoArgs),
    /// Check every chunk and file digest of stored backups
    Verify(VerifyArgs),
    /// Prove a backup restores: restore it, start it, check it, record the figures
    Drill(DrillArgs),
    /// Fetch a WAL file from the repository (for restore_command)
    ArchiveGet(ArchiveGetArgs),
    /// Archive a WAL file into the repository (for archive_command)
    ArchivePush(ArchivePushArgs),
    /// Stream WAL into the repository's archive over the replication protocol
    WalReceive(WalReceiveArgs),
    /// The asynchronous pusher archive-push --async starts (not for direct use)
    #[command(hide = true)]
    ArchivePushDaemon(DaemonArgs),
    /// The prefetcher archive-get --prefetch starts (not for direct use)
    #[command(hide = true)]
    ArchiveGetDaemon(DaemonArgs),
    /// Print Prometheus metrics of a repository (for node_exporter's textfile collector)
    Metrics(MetricsArgs),
    /// Remove backups a retention policy lets go (and nothing a kept backup needs)
    Expire(ExpireArgs),
    /// Write a self-contained HTML report of a repository
    Report(ReportArgs),
    /// Remove what killed writers left: unfinished backups and incomplete multipart uploads
    Cleanup(CleanupArgs),
    /// Build a full backup from a chain inside the repository, without the server (incremental forever)
    Merge(MergeArgs),
    /// The repository key of an encrypted repository
    #[command(subcommand)]
    Key(KeyCommand),
}

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Wrap the repository key under a new passphrase or key file (the data is not re-encrypted)
    Rotate(KeyRotateArgs),
}

/// The key of an encrypted repository (a passphrase, or a raw key file).
#[derive(Args, Debug, Clone, Default)]
pub struct KeyArgs {
    /// File holding the repository's passphrase (mode 0600); default: $BLOCKSTREAM_PASSPHRASE
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// File holding a raw 32-byte key (mode 0600), instead of a passphrase
    #[arg(long, value_name = "FILE", conflicts_with = "passphrase_file")]
    pub key_file: Option<PathBuf>,
    /// Use a plain repository although a key was given, or read plain backups in an encrypted one
    #[arg(long)]
    pub allow_plain: bool,
}

#[derive(Args, Debug)]
pub struct KeyRotateArgs {
    /// Repository directory or s3://bucket/prefix
    #[arg(long, value_name = "DIR")]
    pub repo: PathBuf,
    #[command(flatten)]
    pub keys: KeyArgs,
    /// File holding the new passphrase (mode 0600); default: $BLOCKSTREAM_NEW_PASSPHRASE
    #[arg(long, value_name = "FILE")]
    pub new_passphrase_file: Option<PathBuf>,
    /// File holding the new raw 32-byte key (mode 0600)
    #[arg(long, value_name = "FILE", conflicts_with = "new_passphrase_file")]
    pub new_key_file: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackupKind {
    /// Copy every file
    Full,
    /// Only blocks changed since the latest backup
    Incr,
    /// Only blocks changed since the latest full backup
    Diff,
    /// Incremental when the chain can continue, full otherwise
    Auto,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Checkpoint {
    /// Checkpoint at once (pg_backup_start with fast = true)
    Fast,
    /// Let the checkpoint spread over checkpoint_completion_target
    Spread,
}

/// How to reach the server, as psql takes it: libpq fills in the rest from
/// its environment variables (PGHOST, PGPORT, PGUSER, PGDATABASE, PGSSLMODE,
/// PGSERVICE, PGPASSFILE, ...), service file and `.pgpass`.
#[derive(Args, Debug, Clone, Default)]
pub struct ConnArgs {
    /// Connection string or database name
    #[arg(short = 'd', long = "dbname", value_name = "CONNSTR")]
    pub dbname: Option<String>,
    /// Server host or socket directory
    #[arg(short = 'h', long = "host", value_name = "HOST")]
    pub host: Option<String>,
    /// Server port
    #[arg(short = 'p', long = "port", value_name = "PORT")]
    pub port: Option<u16>,
    /// Database user
    #[arg(short = 'U', long = "username", value_name = "USER")]
    pub user: Option<String>,
}

fn jobs_parser() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..=256)
}

fn default_jobs() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(8)
}

/// zstd threads for one pushed segment: the cores left beside the thread
/// that hashes it (1 on 2 cores, where a second zstd thread measured no
/// gain), at most 4.
fn default_push_threads() -> usize {
    (std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).saturating_sub(1)).clamp(1, 4)
}

fn parse_compression(s: &str) -> Result<Compression, String> {
    s.parse().map_err(|e: blockstream::Error| e.to_string())
}

fn parse_rate(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    match num.parse::<u64>() {
        Ok(n) if n > 0 => Ok(n * mult),
        _ => Err(format!("invalid rate \"{s}\": expected a positive number of bytes per second, like 100M")),
    }
}

fn parse_lsn(s: &str) -> Result<Lsn, String> {
    s.parse().map_err(|e: blockstream::Error| e.to_string())
}

fn parse_mapping(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((old, new)) if !old.is_empty() && !new.is_empty() => Ok((old.to_string(), new.to_string())),
        _ => Err(format!("invalid tablespace mapping \"{s}\": expected OLDDIR=NEWDIR")),
    }
}

#[derive(Args, Debug)]
pub struct BackupArgs {
    /// Data directory of the cluster (default: $PGDATA, else asked from the server)
    #[arg(short = 'D', long = "pgdata", value_name = "PGDATA")]
    pub pgdata: Option<PathBuf>,
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Repository directory (created on the first backup)
    #[arg(long, value_name = "DIR")]
    pub repo: PathBuf,
    #[command(flatten)]
    pub keys: KeyArgs,
    /// Backup type
    #[arg(long = "type", value_enum, default_value = "full")]
    pub kind: BackupKind,
    /// Fail instead of taking a full backup when an incremental one is impossible
    #[arg(long)]
    pub no_fallback: bool,
    /// Parallel streams (threads)
    #[arg(short = 'j', long = "jobs", value_name = "N", value_parser = jobs_parser(), default_value_t = default_jobs())]
    pub jobs: usize,
    /// Compression: zstd[:LEVEL] or none
    #[arg(long = "compress", value_name = "METHOD", value_parser = parse_compression, default_value = "zstd:3")]
    pub compress: Compression,
    /// Checkpoint mode for the backup start
    #[arg(short = 'c', long = "checkpoint", value_enum, default_value = "fast")]
    pub checkpoint: Checkpoint,
    /// Do not verify page checksums while copying
    #[arg(long)]
    pub no_verify_checksums: bool,
    /// Keep the backup even when pages fail their checksum (they are listed in the manifest)
    #[arg(long)]
    pub allow_checksum_failures: bool,
    /// Limit reading from the data directory to RATE bytes per second (suffix k, M or G)
    #[arg(short = 'r', long = "max-rate", value_name = "RATE", value_parser = parse_rate)]
    pub max_rate: Option<u64>,
    /// Backup label (default: blockstream <backup id>)
    #[arg(short = 'l', long = "label")]
    pub label: Option<String>,
    /// Show progress
    #[arg(short = 'P', long = "progress")]
    pub progress: bool,
    /// Output format of the summary
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
    /// Print help
    #[arg(long, action = ArgAction::Help)]
    pub help: Option<bool>,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("recovery_target").args(["target_time", "target_lsn", "target_xid", "target_name", "target"])))]
pub struct RestoreArgs {
    /// Repository directory or s3://bucket/prefix
    #[arg(long, value_name = "DIR")]
    pub repo: PathBuf,
    #[command(flatten)]
    pub keys: KeyArgs,
    /// New data directory (must be empty or absent, unless --force)
    #[arg(short = 'D', long = "pgdata", value_name = "TARGET")]
    pub pgdata: PathBuf,
    /// Backup to restore: an id or "latest"
    #[arg(long, value_name = "ID", default_value = "latest")]
    pub backup: String,
    /// Parallel threads
    #[arg(short = 'j', long = "jobs", value_name = "N", value_parser = jobs_parser(), default_value_t = default_jobs())]
    pub jobs: usize,
    /// Restore the tablespace at OLDDIR (or with that OID) into NEWDIR
    #[arg(short = 'T', long = "tablespace-map", value_name = "OLDDIR=NEWDIR", value_parser = parse_mapping)]
    pub tablespace_map: Vec<(String, String)>,
    /// Replace the contents of a non-empty target directory (never one a server uses)
    #[arg(long)]
    pub force: bool,
    /// Restore over an existing data directory: rewrite only the blocks that differ, remove what the backup lacks
    #[arg(long, conflicts_with = "force")]
    pub delta: bool,
    /// With --delta, read and compare every block, even when the target's own change tracking (pg_blocktrack) proves which may differ
    #[arg(long, requires = "delta")]
    pub delta_compare_all: bool,
    /// Also recompute every restored file's SHA-256 digest (verify and drill always do)
    #[arg(long)]
    pub check_digests: bool,
    /// Restore only this database (repeatable) with postgres, template0 and template1; the others' relation files are left as zeros, to be dropped
    #[arg(long = "db-include", value_name = "NAME")]
    pub db_include: Vec<String>,
    /// Run as root: write as this user (default: the target's owner, else the backup's data-directory owner)
    #[arg(long, value_name = "USER")]
    pub owner: Option<String>,
    /// Stop recovery at this time
    #[arg(long, value_name = "TIMESTAMP")]
    pub target_time: Option<String>,
    /// Stop recovery at this LSN
    #[arg(long, value_name = "LSN", value_parser = parse_lsn)]
    pub target_lsn: Option<Lsn>,
    /// Stop recovery at this transaction id
    #[arg(long, value_name = "XID")]
    pub target_xid: Option<String>,
    /// Stop recovery at this restore point (pg_create_restore_point)
    #[arg(long, value_name = "NAME")]
    pub target_name: Option<String>,
    /// Stop recovery as soon as the backup is consistent
    #[arg(long, value_parser = ["immediate"])]
    pub target: Option<String>,
    /// What the server does at the target
    #[arg(long, value_parser = ["promote", "pause", "shutdown"], default_value = "promote")]
    pub target_action: String,
    /// The timeline to recover along: latest, current or a number
    #[arg(long, value_name = "TIMELINE")]
    pub target_timeline: Option<String>,
    /// Segments archive-get fetches ahead during recovery (0: none)
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub prefetch: usize,
    /// restore_command written for recovery (default: this program's archive-get)
    #[arg(long, value_name = "COMMAND")]
    pub restore_command: Option<String>,
    /// Show progress
    #[arg(short = 'P', long = "progress")]
    pub progress: bool,
    /// Output format of the summary
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
}

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Repository directory or s3://bucket/prefix
    #[arg(long, value_name = "DIR")]
    pub repo: PathBuf,
    #[command(flatten)]
    pub keys: KeyArgs,
    /// Output format
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Repository directory or s3://bucket/prefix
    #[arg(long, value_name = "DIR")]
    pub repo: PathBuf,
    #[command(flatten)]
    pub keys: KeyArgs,
    /// Backup to check: an id, "latest" or "all"
    #[arg(long, value_name = "ID", default_value = "all")]
    pub backup: String,
    /// Parallel threads
    #[arg(short = 'j', long = "jobs", value_name = "N", value_parser = jobs_parser(), default_value_t = default_jobs())]
    pub jobs: usize,
    /// Show progress (the default on a terminal)
    #[arg(short = 'P', long = "progress")]
    pub progress: bool,
    /// Output format
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
}

#[derive(Args, Debug)]
pub struct DrillArgs {
    /// Repository directory or s3://bucket/prefix
    #[arg(long, value_name = "DIR")]
    pub repo: PathBuf,
    #[command(flatten)]
    pub keys: KeyArgs,
    /// Backup to drill: an id or "latest"
    #[arg(long, value_name = "ID", default_value = "latest")]
    pub backup: String,
    /// SQL to run on the restored cluster (database postgres); an error fails the drill
    #[arg(long, value_name = "FILE")]
    pub check_sql: Option<PathBuf>,
    /// Leave the restored cluster running in its directory
    #[arg(long)]
    pub keep: bool,
    /// Scratch directory (default: a new one under the temporary directory)
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Run as root: run the drill's server as this user (default: the backup's data-directory owner)
    #[arg(long, value_name = "USER")]
    pub owner: Option<String>,
    /// Database role the checks connect as (default: the OS user's name)
    #[arg(long = "user", value_name = "ROLE")]
    pub user: Option<String>,
    /// Directory of pg_ctl (default: $PG_BINDIR, else /usr/lib/postgresql/<major>/bin)
    #[arg(long, value_name = "DIR")]
    pub pg_bindir: Option<PathBuf>,
    /// Parallel restore threads
    #[arg(short = 'j', long = "jobs", value_name = "N", value_parser = jobs_parser(), default_value_t = default_jobs())]
    pub jobs: usize,
    /// Show progress
    #[arg(short = 'P', long = "progress")]
    pub progress: bool,
    /// Output format
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
}

#[derive(Args, Debug)]
pub struct ArchiveGetArgs {
    /// Repository directory or s3://bucket/prefix
    #[arg(long, value_name = "DIR")]
    pub repo: PathBuf,
    #[command(flatten)]
    pub keys: KeyArgs,
    /// Fetch this many following segments ahead, in parallel, into the spool
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub prefetch: usize,
    /// Local directory for prefetched segments (default: pg_wal/blockstream_spool)
    #[arg(long, value_name = "DIR")]
    pub spool: Option<PathBuf>,
    /// WAL file name (%f)
    pub file: String,
    /// Where to write it (%p)
    pub path: PathBuf,
}

#[derive(Args, Debug)]
pub struct MetricsArgs {
    /// Repository directory or s3://bucket/prefix
    #[arg(long, value_name = "DIR")]
    pub repo: PathBuf,
    #[command(flatten)]
    pub keys: KeyArgs,
}

/// A retention policy, as pgBackRest's: the newest N full backups, and of
/// the backups since, N differential and N incremental ones (or D days).
#[derive(Args, Debug, Clone)]
pub struct RetentionArgs {
    /// Full backups to keep (everything older than the oldest of them goes)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub retain_full: Option<u32>,
    /// Differential backups to keep (with what builds on them)
    #[arg(long, value_name = "N")]
    pub retain_diff: Option<u32>,
    /// Incremental backups to keep
    #[arg(long, value_name = "N", conflicts_with = "retain_days")]
    pub retain_incr: Option<u32>,
    /// Keep incremental backups younger than this many days
    #[arg(long, value_name = "DAYS")]
    pub retain_days: Option<f64>,
}

#[derive(Args, Debug)]
pub struct CleanupArgs {
    /// Repository directory or s3://bucket/prefix
    #[arg(long, value_name = "DIR")]
    pub repo: PathBuf,
    #[command(flatten)]
    pub keys: KeyArgs,
    /// Say what would be removed, remove nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Output format
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// Repository directory or s3://bucket/prefix
    #[arg(long, value_name = "DIR")]
    pub repo: PathBuf,
    #[command(flatten)]
    pub keys: KeyArgs,
    /// The last backup of the chain to merge: an id or "latest"
    #[arg(long, value_name = "ID", default_value = "latest")]
    pub backup: String,
    /// Parallel threads
    #[arg(short = 'j', long = "jobs", value_name = "N", value_parser = jobs_parser(), default_value_t = default_jobs())]
    pub jobs: usize,
    /// Where the chain is restored while it is merged (needs room for the cluster); default $TMPDIR or /tmp
    #[arg(long, value_name = "DIR")]
    pub scratch: Option<PathBuf>,
    /// Show progress
    #[arg(short = 'P', long = "progress")]
    pub progress: bool,
    /// Output format
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(Args, Debug)]
pub struct ExpireArgs {
    /// Repository directory or s3://bucket/prefix
    #[arg(long, value_name = "DIR")]
    pub repo: PathBuf,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub retention: RetentionArgs,
    /// Say what would be removed, remove nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Show progress (the default on a terminal)
    #[arg(short = 'P', long = "progress")]
    pub progress: bool,
    /// Output format
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
}

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// Repository directory or s3://bucket/prefix
    #[arg(long, value_name = "DIR")]
    pub repo: PathBuf,
    #[command(flatten)]
    pub keys: KeyArgs,
    /// The HTML file to write
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: PathBuf,
    /// Show the retention state under this policy
    #[command(flatten)]
    pub retention: RetentionArgs,
}

#[derive(Args, Debug)]
pub struct ArchivePushArgs {
    /// Repository directory (created by the first push when absent)
    #[arg(long, value_name = "DIR")]
    pub repo: PathBuf,
    #[command(flatten)]
    pub keys: KeyArgs,
    /// Compression: zstd[:LEVEL] or none
    #[arg(long = "compress", value_name = "METHOD", value_parser = parse_compression, default_value = "zstd:1")]
    pub compress: Compression,
    /// zstd threads for one segment (default: the cores but one, at most 4)
    #[arg(long, value_name = "N", value_parser = jobs_parser(), default_value_t = default_push_threads())]
    pub threads: usize,
    /// Return as soon as a background pusher has archived the file: it
    /// archives every segment PostgreSQL has waiting (.ready), ahead, in parallel
    #[arg(long = "async")]
    pub r#async: bool,
    /// Directory of the background pusher's markers and log, relative to the data directory
    #[arg(long, value_name = "DIR", default_value = "pg_wal/blockstream_spool")]
    pub spool: PathBuf,
    /// Segments the background pusher archives in parallel
    #[arg(long, value_name = "N", value_parser = jobs_parser(), default_value_t = 4)]
    pub workers: usize,
    /// Fail, so PostgreSQL keeps the WAL and retries, when the file is not archived within this many seconds
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub timeout: u64,
    /// The WAL file (%p)
    pub path: PathBuf,
}

#[derive(Args, Debug)]
pub struct DaemonArgs {
    #[arg(long, value_name = "DIR")]
    pub repo: PathBuf,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[arg(long, value_name = "DIR")]
    pub spool: PathBuf,
    #[arg(long, value_name = "N", value_parser = jobs_parser(), default_value_t = 4)]
    pub workers: usize,
    #[arg(long = "compress", value_name = "METHOD", value_parser = parse_compression, default_value = "zstd:1")]
    pub compress: Compression,
    /// Prefetch the segments after this one
    #[arg(long, value_name = "WALFILE")]
    pub after: Option<String>,
    /// The pg_wal directory whose waiting segments the pusher archives
    #[arg(long, value_name = "DIR")]
    pub wal: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct WalReceiveArgs {
    /// Repository directory (created when absent)
    #[arg(long, value_name = "DIR")]
    pub repo: PathBuf,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Persistent physical replication slot to stream from (created when absent)
    #[arg(long, value_name = "NAME")]
    pub slot: Option<String>,
    /// fsync every write before acknowledging it (to be a synchronous standby)
    #[arg(long)]
    pub synchronous: bool,
    /// application_name to connect with (what synchronous_standby_names names)
    #[arg(long, value_name = "NAME", default_value = "blockstream_receiver")]
    pub application_name: String,
}
