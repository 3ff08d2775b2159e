//! A cluster without PostgreSQL, for tests of the engine that run in
//! seconds with no server and no root: a data directory with a valid
//! `pg_control`, relation files and WAL segments, and a [`BackupSession`]
//! that plays the server's part (start and stop LSNs advance like WAL, the
//! backup label is PostgreSQL's, the changed blocks are the ones the test
//! wrote through [`FakeCluster::write_block`]).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::backup::{BackupSession, ParentRef, ServerInfo, StartInfo, StopInfo};
use crate::blkref::crc32c;
use crate::error::Result;
use crate::lsn::{wal_file_name, Lsn};
use crate::plan::ChangedSegment;

/// Bytes of a control file as PostgreSQL 15 writes it on x86-64, with the
/// given identity and sizes.
pub fn control_file(system_identifier: u64, block_size: u32, relseg_size: u32, wal_segment_size: u32) -> Vec<u8> {
    let mut b = vec![0u8; crate::pg_control::MAX_LEN];
    b[0..8].copy_from_slice(&system_identifier.to_le_bytes());
    b[8..12].copy_from_slice(&1300u32.to_le_bytes());
    b[12..16].copy_from_slice(&202_209_061u32.to_le_bytes());
    b[48..52].copy_from_slice(&1u32.to_le_bytes());
    b[208..216].copy_from_slice(&1_234_567.0f64.to_le_bytes());
    for (at, v) in [(216, block_size), (220, relseg_size), (224, 8192), (228, wal_segment_size), (252, 0)] {
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    let crc = crc32c(&b[..288]);
    b[288..292].copy_from_slice(&crc.to_le_bytes());
    b
}

/// A data directory and the server that would run on it.
pub struct FakeCluster {
    pub data: PathBuf,
    pub system_identifier: u64,
    pub block_size: u32,
    pub wal_segment_size: u64,
    /// The next WAL position.
    pub lsn: Lsn,
    /// Blocks written since the last backup started, by relation file.
    changed: BTreeMap<String, Vec<u32>>,
    /// Start LSN of every backup taken, and whether its parent is known.
    pub tracked_since: Option<Lsn>,
    backup_start: Option<Lsn>,
}

impl FakeCluster {
    /// A new data directory at `data` (which must not exist).
    pub fn create(data: &Path, system_identifier: u64) -> FakeCluster {
        let wal_segment_size = 1u64 << 20;
        for d in ["global", "base/5", "pg_wal/archive_status", "pg_xact"] {
            fs::create_dir_all(data.join(d)).unwrap();
        }
        fs::write(data.join("PG_VERSION"), "15\n").unwrap();
        fs::write(data.join("base/5/PG_VERSION"), "15\n").unwrap();
        fs::write(data.join("pg_xact/0000"), vec![0u8; 8192]).unwrap();
        fs::write(data.join("global/pg_control"), control_file(system_identifier, 8192, 131_072, 1 << 20)).unwrap();
        FakeCluster {
            data: data.to_path_buf(),
            system_identifier,
            block_size: 8192,
            wal_segment_size,
            lsn: Lsn(3 * wal_segment_size + 40),
            changed: BTreeMap::new(),
            tracked_since: None,
            backup_start: None,
        }
    }

    /// Writes block `block` of relation file `rel` (like `base/5/16384`),
    /// extending it, and remembers the change for the next incremental.
    pub fn write_block(&mut self, rel: &str, block: u32, fill: u8) {
        let path = self.data.join(rel);
        let f = fs::OpenOptions::new().create(true).write(true).truncate(false).open(&path).unwrap();
        let mut page = vec![fill; self.block_size as usize];
        // A page header a checksum pass skips: pd_upper 0 marks a new page.
        page[14] = 0;
        page[15] = 0;
        f.write_all_at(&page, block as u64 * self.block_size as u64).unwrap();
        self.changed.entry(rel.to_string()).or_default().push(block);
        self.lsn = Lsn(self.lsn.0 + 200);
    }

    /// Writes WAL segments from the one holding `from` to the one holding `to`.
    fn write_wal(&self, from: Lsn, to: Lsn) {
        for segno in from.segment(self.wal_segment_size)..=to.segment(self.wal_segment_size) {
            let name = wal_file_name(1, segno, self.wal_segment_size);
            let path = self.data.join("pg_wal").join(name);
            if !path.exists() {
                fs::write(&path, vec![segno as u8; self.wal_segment_size as usize]).unwrap();
            }
        }
    }

    /// The session of one backup.
    pub fn session(&mut self) -> FakeSession<'_> {
        FakeSession { cluster: self }
    }
}

/// The server side of a backup of a [`FakeCluster`].
pub struct FakeSession<'a> {
    cluster: &'a mut FakeCluster,
}

impl BackupSession for FakeSession<'_> {
    fn server_info(&mut self) -> Result<ServerInfo> {
        Ok(ServerInfo {
            system_identifier: self.cluster.system_identifier,
            pg_version_num: 150_018,
            wal_segment_size: self.cluster.wal_segment_size,
            block_size: self.cluster.block_size,
        })
    }

    fn start(&mut self, _label: &str, _fast: bool, parent: Option<ParentRef>) -> Result<StartInfo> {
        let c = &mut *self.cluster;
        // pg_backup_start switches to a new segment and checkpoints there.
        let seg = c.wal_segment_size;
        let start = Lsn((c.lsn.0 / seg + 1) * seg + 40);
        c.lsn = Lsn(start.0 + 100);
        let ok = match (parent, c.tracked_since) {
            (Some(p), Some(since)) => p.start_lsn >= since,
            _ => false,
        };
        c.backup_start = Some(start);
        Ok(StartInfo {
            start_lsn: start,
            timeline: 1,
            system_identifier: c.system_identifier,
            data_checksums: false,
            incremental_ok: ok,
            reason: (!ok).then(|| "no parent, or changes not tracked since it".to_string()),
        })
    }

    fn changed_blocks(&mut self, _since: Lsn, _until: Lsn, _timeline: u32) -> Result<Vec<ChangedSegment>> {
        Ok(self
            .cluster
            .changed
            .iter()
            .map(|(path, blocks)| {
                let rel = path.rsplit('/').next().unwrap().parse().unwrap();
                ChangedSegment {
                    path: path.clone(),
                    relfilenode: Some(rel),
                    fork: 0,
                    segno: 0,
                    limit_block: None,
                    full_copy: false,
                    blocks: blocks.clone(),
                }
            })
            .collect())
    }

    fn stop(&mut self) -> Result<StopInfo> {
        let c = &mut *self.cluster;
        let start = c.backup_start.take().expect("a backup was started");
        c.lsn = Lsn(c.lsn.0 + 500);
        let stop = c.lsn;
        c.write_wal(start, stop);
        c.changed.clear();
        c.tracked_since = Some(c.tracked_since.unwrap_or(start));
        let label = format!(
            "START WAL LOCATION: {start} (file {})\nCHECKPOINT LOCATION: {}\nBACKUP METHOD: streamed\n\
             BACKUP FROM: primary\nSTART TIME: 2026-11-29 00:00:00 UTC\nLABEL: test\nSTART TIMELINE: 1\n",
            wal_file_name(1, start.segment(c.wal_segment_size), c.wal_segment_size),
            Lsn(start.0 + 40)
        );
        Ok(StopInfo {
            stop_lsn: stop,
            timeline: 1,
            backup_label: label,
            tablespace_map: String::new(),
            checkpoint_crc: Some(0xC0FF_EE00),
        })
    }
}
