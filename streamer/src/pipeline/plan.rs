//! What an incremental backup copies of each file: all of it, or the blocks
//! that changed since its parent.
//!
//! Only main-fork segment files of relations that the parent backup holds can
//! be incremental. Everything else is copied whole: files new since the
//! parent, `_vm` and `_fsm` forks (the visibility map is not reliably
//! WAL-logged, the FSM not at all), `_init` forks, non-relation files, files of
//! a database created or dropped since the parent, segments at or past their
//! fork's limit block, and files where more than 90% of the blocks changed.
//!
//! An incremental file stores the changed blocks plus every block from the
//! limit block (if the fork was truncated or re-created in the range) to the
//! end of the file, so a restore never takes a block at or past the limit
//! from an older backup.

use std::collections::HashMap;

use crate::blkref::BlockRefTable;
use crate::manifest::{Incremental, Manifest};
use crate::pgdata::SourceFile;

/// One row of `blocktrack.changed_blocks`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangedSegment {
    pub path: String,
    /// None for a whole-database row.
    pub relfilenode: Option<u32>,
    pub fork: u8,
    pub segno: u32,
    /// The fork's limit block (absolute block number).
    pub limit_block: Option<u32>,
    pub full_copy: bool,
    /// Changed blocks, relative to the segment.
    pub blocks: Vec<u32>,
}

/// The `blocks` column of `blocktrack.changed_blocks` (bytea): each block
/// number as 4 bytes, little-endian. The extension encodes, the command
/// line decodes; both through these two functions.
pub fn encode_blocks(blocks: &[u32]) -> Vec<u8> {
    blocks.iter().flat_map(|b| b.to_le_bytes()).collect()
}

/// Decodes [`encode_blocks`]; `what` names the row in the error.
pub fn decode_blocks(bytes: &[u8], what: &str) -> crate::Result<Vec<u32>> {
    if !bytes.len().is_multiple_of(4) {
        return Err(crate::Error::Server(format!(
            "changed_blocks returned {} bytes of blocks for \"{what}\", not a multiple of 4",
            bytes.len()
        )));
    }
    Ok(bytes.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))).collect())
}

/// The changed-block rows, indexed for planning.
#[derive(Debug, Default)]
pub struct ChangeSet {
    segments: HashMap<String, ChangedSegment>,
    /// Limit block per relation fork, keyed by the path of its first segment.
    limits: HashMap<String, u32>,
    /// Database directories created or dropped in the range.
    whole_dirs: Vec<String>,
}

impl ChangeSet {
    pub fn new(rows: Vec<ChangedSegment>) -> ChangeSet {
        let mut cs = ChangeSet::default();
        for r in rows {
            if r.relfilenode.is_none() {
                cs.whole_dirs.push(format!("{}/", r.path));
                continue;
            }
            if let Some(l) = r.limit_block {
                let base = relation_base(&r.path).to_string();
                let e = cs.limits.entry(base).or_insert(l);
                *e = (*e).min(l);
            }
            cs.segments.insert(r.path.clone(), r);
        }
        cs
    }
}

impl ChangeSet {
    /// The changes of a block table read from summary files, with segment
    /// files of `relseg_blocks` blocks and tablespaces' version directory
    /// `tablespace_dir` (`PG_15_202209061`).
    pub fn from_table(table: &BlockRefTable, relseg_blocks: u32, tablespace_dir: &str) -> ChangeSet {
        let mut cs = ChangeSet::default();
        for (k, c) in table.sorted() {
            if k.is_database() {
                cs.whole_dirs.push(format!("{}/", k.path(0, tablespace_dir)));
                continue;
            }
            if let Some(l) = c.limit {
                let e = cs.limits.entry(k.path(0, tablespace_dir)).or_insert(l);
                *e = (*e).min(l);
            }
            for b in c.blocks.iter() {
                let segno = b / relseg_blocks;
                let path = k.path(segno, tablespace_dir);
                cs.segments
                    .entry(path.clone())
                    .or_insert_with(|| ChangedSegment {
                        path,
                        relfilenode: Some(k.rel),
                        fork: k.fork,
                        segno,
                        limit_block: c.limit,
                        full_copy: false,
                        blocks: Vec::new(),
                    })
                    .blocks
                    .push(b % relseg_blocks);
            }
        }
        cs
    }
}

/// `base/5/16384.2` → `base/5/16384`.
fn relation_base(path: &str) -> &str {
    match path.rsplit_once('.') {
        Some((base, seg)) if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) => base,
        _ => path,
    }
}

/// The segment number of a main-fork relation segment file, or None for
/// any other file.
pub fn main_fork_segment(path: &str) -> Option<u32> {
    crate::pgdata::relation_file(path).filter(|&(fork, _)| fork == 0).map(|(_, segno)| segno)
}

/// How to copy one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileCopy {
    Whole,
    Blocks(Incremental),
}

/// Decides, for every file of the data directory, whether to copy it whole
/// or only its changed blocks.
pub struct Planner<'a> {
    parent: HashMap<&'a str, u64>,
    changes: &'a ChangeSet,
    block_size: u64,
    /// Blocks per relation segment file of the cluster (RELSEG_SIZE).
    relseg_blocks: u64,
}

impl<'a> Planner<'a> {
    /// A planner for a backup of a cluster whose block size and segment size
    /// are the parent's (the caller checks that they are).
    pub fn new(parent: &'a Manifest, changes: &'a ChangeSet) -> Planner<'a> {
        Planner {
            parent: parent.files.iter().filter(|f| !f.vanished).map(|f| (f.path.as_str(), f.size)).collect(),
            changes,
            block_size: parent.block_size as u64,
            relseg_blocks: parent.relseg_size as u64,
        }
    }

    pub fn plan(&self, f: &SourceFile) -> FileCopy {
        self.plan_file(&f.rel, f.size)
    }

    /// [`Planner::plan`] of the file `rel` of `size` bytes.
    pub fn plan_file(&self, rel: &str, size: u64) -> FileCopy {
        let Some(segno) = main_fork_segment(rel) else { return FileCopy::Whole };
        if !self.parent.contains_key(rel) {
            return FileCopy::Whole;
        }
        if self.changes.whole_dirs.iter().any(|d| rel.starts_with(d.as_str())) {
            return FileCopy::Whole;
        }
        let seg_start = segno as u64 * self.relseg_blocks;
        let limit = self.changes.limits.get(relation_base(rel)).copied();
        if limit.is_some_and(|l| l as u64 <= seg_start) {
            return FileCopy::Whole;
        }
        if self.changes.segments.get(rel).is_some_and(|r| r.full_copy) {
            return FileCopy::Whole;
        }
        let blocks = size.div_ceil(self.block_size);
        let limit_rel = limit.map_or(blocks, |l| (l as u64 - seg_start).min(blocks));
        let mut stored: Vec<u32> = self
            .changes
            .segments
            .get(rel)
            .map(|r| r.blocks.iter().copied().filter(|&b| (b as u64) < limit_rel).collect())
            .unwrap_or_default();
        stored.sort_unstable();
        stored.dedup();
        let tail = blocks - limit_rel;
        if (stored.len() as u64 + tail) * 10 > blocks * 9 {
            return FileCopy::Whole;
        }
        let mut runs: Vec<(u32, u32)> = Vec::new();
        for b in stored {
            match runs.last_mut() {
                Some((s, n)) if *s + *n == b => *n += 1,
                _ => runs.push((b, 1)),
            }
        }
        if tail > 0 {
            runs.push((limit_rel as u32, tail as u32));
        }
        FileCopy::Blocks(Incremental { limit_block: limit_rel as u32, runs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_lists_round_trip_and_odd_lengths_are_refused() {
        let blocks = vec![0, 7, 131_071, u32::MAX];
        assert_eq!(decode_blocks(&encode_blocks(&blocks), "x").unwrap(), blocks);
        let err = decode_blocks(&[1, 2, 3], "base/5/16384").unwrap_err().to_string();
        assert!(err.contains("3 bytes of blocks for \"base/5/16384\""), "{err}");
    }
    use crate::manifest::tests::sample;

    fn file(rel: &str, blocks: u64) -> SourceFile {
        SourceFile { rel: rel.into(), abs: rel.into(), size: blocks * 8192, mode: 0o600, uid: 0, gid: 0, mtime: 0 }
    }

    use crate::blkref::RELSEG_BLOCKS;

    fn parent_with(paths: &[&str]) -> Manifest {
        let mut m = sample();
        let proto = m.files[0].clone();
        m.files = paths.iter().map(|p| crate::manifest::FileEntry { path: p.to_string(), ..proto.clone() }).collect();
        m
    }

    fn seg(path: &str, rel: u32, segno: u32, limit: Option<u32>, blocks: Vec<u32>) -> ChangedSegment {
        ChangedSegment {
            path: path.into(),
            relfilenode: Some(rel),
            fork: 0,
            segno,
            limit_block: limit,
            full_copy: limit.is_some_and(|l| l <= segno * RELSEG_BLOCKS),
            blocks,
        }
    }

    #[test]
    fn recognizes_main_fork_segments() {
        assert_eq!(main_fork_segment("base/5/16384"), Some(0));
        assert_eq!(main_fork_segment("base/5/16384.3"), Some(3));
        assert_eq!(main_fork_segment("global/1262"), Some(0));
        assert_eq!(main_fork_segment("pg_tblspc/16400/PG_15_202209061/5/16401.1"), Some(1));
        for other in [
            "base/5/16384_vm",
            "base/5/16384_fsm.1",
            "base/5/16384_init",
            "base/5/PG_VERSION",
            "pg_xact/0000",
            "base/5/pg_filenode.map",
            "pg_wal/000000010000000000000003",
        ] {
            assert_eq!(main_fork_segment(other), None, "{other}");
        }
    }

    #[test]
    fn plans_each_kind_of_file() {
        let parent = parent_with(&[
            "base/5/100",
            "base/5/200",
            "base/5/300",
            "base/5/400",
            "base/5/500.1",
            "base/7/600",
            "base/5/100_vm",
        ]);
        let cs = ChangeSet::new(vec![
            seg("base/5/100", 100, 0, None, vec![3, 1, 2, 9]),
            seg("base/5/300", 300, 0, Some(50), vec![10]),
            seg("base/5/400", 400, 0, Some(0), vec![]),
            seg("base/5/500", 500, 0, Some(RELSEG_BLOCKS), vec![]),
            ChangedSegment {
                path: "base/7".into(),
                relfilenode: None,
                fork: 0,
                segno: 0,
                limit_block: Some(0),
                full_copy: true,
                blocks: vec![],
            },
        ]);
        let p = Planner::new(&parent, &cs);
        assert_eq!(
            p.plan(&file("base/5/100", 100)),
            FileCopy::Blocks(Incremental { limit_block: 100, runs: vec![(1, 3), (9, 1)] })
        );
        // Unchanged since the parent: nothing stored.
        assert_eq!(p.plan(&file("base/5/200", 100)), FileCopy::Blocks(Incremental { limit_block: 100, runs: vec![] }));
        // Truncated to 50 and grown again to 60: block 10 plus everything from the limit.
        assert_eq!(
            p.plan(&file("base/5/300", 60)),
            FileCopy::Blocks(Incremental { limit_block: 50, runs: vec![(10, 1), (50, 10)] })
        );
        assert_eq!(p.plan(&file("base/5/400", 100)), FileCopy::Whole, "re-created fork");
        assert_eq!(p.plan(&file("base/5/500.1", 100)), FileCopy::Whole, "segment at the limit");
        assert_eq!(p.plan(&file("base/7/600", 100)), FileCopy::Whole, "database created since");
        assert_eq!(p.plan(&file("base/5/999", 100)), FileCopy::Whole, "new since the parent");
        assert_eq!(p.plan(&file("base/5/100_vm", 1)), FileCopy::Whole, "visibility map");
        // Mostly changed: cheaper whole.
        let cs = ChangeSet::new(vec![seg("base/5/100", 100, 0, None, (0..95).collect())]);
        assert_eq!(Planner::new(&parent, &cs).plan(&file("base/5/100", 100)), FileCopy::Whole);
    }

    /// A server built --with-segsize: segments of 1024 blocks, as pg_control
    /// and the parent's manifest say; limits count from the segment's start.
    #[test]
    fn segment_size_comes_from_the_cluster() {
        let mut parent = parent_with(&["base/5/700", "base/5/700.1", "base/5/700.2"]);
        parent.relseg_size = 1024;
        let row = |segno: u32, limit: Option<u32>, blocks: Vec<u32>| ChangedSegment {
            full_copy: limit.is_some_and(|l| l <= segno * 1024),
            ..seg(
                &if segno == 0 { "base/5/700".to_string() } else { format!("base/5/700.{segno}") },
                700,
                segno,
                limit,
                blocks,
            )
        };
        let cs = ChangeSet::new(vec![
            row(0, Some(1500), vec![7]),
            row(1, Some(1500), vec![3, 600]),
            row(2, Some(1500), vec![]),
        ]);
        let p = Planner::new(&parent, &cs);
        assert_eq!(
            p.plan(&file("base/5/700", 1024)),
            FileCopy::Blocks(Incremental { limit_block: 1024, runs: vec![(7, 1)] })
        );
        // Segment 1 starts at block 1024: the limit 1500 is its block 476.
        assert_eq!(
            p.plan(&file("base/5/700.1", 1024)),
            FileCopy::Blocks(Incremental { limit_block: 476, runs: vec![(3, 1), (476, 548)] })
        );
        assert_eq!(p.plan(&file("base/5/700.2", 10)), FileCopy::Whole, "past the limit");
    }

    #[test]
    fn a_block_table_plans_like_changed_block_rows() {
        use crate::blkref::{BlockRefTable, RelFork};
        let mut t = BlockRefTable::default();
        let key = |spc, rel| RelFork { spc, db: 5, rel, fork: 0 };
        t.mark_block(key(1663, 16384), 5);
        t.mark_block(key(1663, 16384), RELSEG_BLOCKS + 2);
        t.set_limit(key(1663, 16390), 30);
        t.mark_block(key(16400, 16500), 1);
        t.mark_database(1663, 7);
        let cs = ChangeSet::from_table(&t, RELSEG_BLOCKS, "PG_15_202209061");
        let parent = parent_with(&[
            "base/5/16384",
            "base/5/16384.1",
            "base/5/16390",
            "base/5/16391",
            "pg_tblspc/16400/PG_15_202209061/5/16500",
            "base/7/16384",
        ]);
        let p = Planner::new(&parent, &cs);
        let blocks = |rel: &str, n: u64| match p.plan_file(rel, n * 8192) {
            FileCopy::Blocks(inc) => inc.runs,
            FileCopy::Whole => vec![(u32::MAX, 0)],
        };
        assert_eq!(blocks("base/5/16384", 100), vec![(5, 1)]);
        assert_eq!(blocks("base/5/16384.1", 100), vec![(2, 1)]);
        // Truncated to 30 blocks: everything from there on.
        assert_eq!(blocks("base/5/16390", 100), vec![(30, 70)]);
        assert_eq!(blocks("base/5/16391", 100), Vec::<(u32, u32)>::new());
        assert_eq!(blocks("pg_tblspc/16400/PG_15_202209061/5/16500", 100), vec![(1, 1)]);
        // A database created or dropped: whole.
        assert_eq!(blocks("base/7/16384", 100), vec![(u32::MAX, 0)]);
    }
}
