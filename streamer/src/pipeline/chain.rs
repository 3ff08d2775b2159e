//! A backup and the backups it builds on, and where each block of a restored
//! file comes from.
//!
//! Rule (as PostgreSQL 17's `reconstruct.c`): a block of a file in the
//! backup being restored comes from the newest backup of the chain that
//! stores it. Walking from newest to oldest, the search stops with zeros when
//! a backup does not have the file, when its copy of the file is shorter than
//! the block, or when the block is at or past the backup's limit block for
//! that file (the fork was truncated or re-created since: older copies are
//! stale). A backup that stores a file whole ends the search.

use std::collections::HashMap;

use crate::blkref::BlockSet;
use crate::error::{Error, Result};
use crate::manifest::{BackupType, Manifest};
use crate::repo::Repo;

/// The chain of `id`: its full backup first, `id` last.
pub fn load_chain(repo: &Repo, id: &str) -> Result<Vec<Manifest>> {
    let mut chain = vec![repo.load_manifest(id)?];
    loop {
        let child = chain.last().unwrap();
        let Some(parent) = child.parent.clone() else { break };
        if chain.len() > 10_000 || chain.iter().any(|m| m.backup_id == parent) {
            return Err(Error::Corrupt(format!(
                "backup {} has a parent chain that loops back to {parent}",
                child.backup_id
            )));
        }
        let m = repo.load_manifest(&parent).map_err(|e| {
            Error::Corrupt(format!("backup {} builds on backup {parent}, which cannot be used: {e}", child.backup_id))
        })?;
        if m.system_identifier != child.system_identifier || m.start_lsn > child.start_lsn {
            return Err(Error::Corrupt(format!(
                "backup {} names {parent} as its parent, but {parent} is of system {} starting at {}, and {} of system {} starts at {}",
                child.backup_id, m.system_identifier, m.start_lsn, child.backup_id, child.system_identifier, child.start_lsn
            )));
        }
        chain.push(m);
    }
    chain.reverse();
    if chain[0].backup_type != BackupType::Full {
        return Err(Error::Corrupt(format!("the chain of backup {id} does not start with a full backup")));
    }
    Ok(chain)
}

/// What a backup of the chain contributes to one restored file.
#[derive(Clone, Debug)]
pub enum Take {
    /// Every stored byte of the file.
    All,
    /// Only these blocks.
    Blocks(BlockSet),
}

impl Take {
    /// Whether block `b` is taken.
    pub fn takes(&self, b: u32) -> bool {
        match self {
            Take::All => true,
            Take::Blocks(s) => s.contains(b),
        }
    }
}

/// Where every block of the restored files comes from.
#[derive(Clone, Debug, Default)]
pub struct Resolution {
    /// For every backup of the chain (same order), the files (by index in
    /// that backup's manifest) and blocks it contributes to restoring the last one.
    pub take: Vec<HashMap<u32, Take>>,
    /// Files of the last backup (by index) with blocks no backup stores:
    /// they are zeros. A new file is zeros already; a delta restore must
    /// write them over what the target held.
    pub zeros: Vec<(u32, BlockSet)>,
}

/// Resolves the chain of the last backup: see [`Resolution`].
pub fn resolve(chain: &[Manifest]) -> Resolution {
    let n = chain.len();
    let target = &chain[n - 1];
    let bs = target.block_size as u64;
    let index: Vec<HashMap<&str, u32>> = chain
        .iter()
        .map(|m| {
            m.files.iter().enumerate().filter(|(_, f)| !f.vanished).map(|(i, f)| (f.path.as_str(), i as u32)).collect()
        })
        .collect();
    let mut plan: Vec<HashMap<u32, Take>> = vec![HashMap::new(); n];
    let mut zeros = Vec::new();
    for (ti, tf) in target.files.iter().enumerate() {
        if tf.vanished {
            continue;
        }
        if tf.incremental.is_none() {
            plan[n - 1].insert(ti as u32, Take::All);
            continue;
        }
        // The file in each backup, newest first, up to the first whole copy.
        let mut versions = Vec::new();
        for k in (0..n).rev() {
            let Some(&fi) = index[k].get(tf.path.as_str()) else { break };
            let e = &chain[k].files[fi as usize];
            versions.push((k, fi, e));
            if e.incremental.is_none() {
                break;
            }
        }
        let mut none = BlockSet::default();
        for b in 0..tf.size.div_ceil(bs) as u32 {
            let mut found = false;
            for &(k, fi, e) in &versions {
                if b as u64 >= e.size.div_ceil(bs) {
                    break;
                }
                found = match &e.incremental {
                    None => true,
                    Some(inc) if inc.holds(b) => true,
                    Some(inc) if b >= inc.limit_block => break,
                    Some(_) => false,
                };
                if found {
                    if let Take::Blocks(s) = plan[k].entry(fi).or_insert_with(|| Take::Blocks(BlockSet::default())) {
                        s.insert(b);
                    }
                    break;
                }
            }
            if !found {
                none.insert(b);
            }
        }
        if !none.is_empty() {
            zeros.push((ti as u32, none));
        }
    }
    Resolution { take: plan, zeros }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::sample;
    use crate::manifest::{FileEntry, Incremental};

    fn backup(id: &str, parent: Option<&str>, files: Vec<(&str, u64, Option<Incremental>)>) -> Manifest {
        let mut m = sample();
        m.backup_id = id.into();
        m.parent = parent.map(String::from);
        m.backup_type = if parent.is_some() { BackupType::Incr } else { BackupType::Full };
        let proto = m.files[0].clone();
        m.files = files
            .into_iter()
            .map(|(p, blocks, inc)| FileEntry {
                path: p.into(),
                size: blocks * 8192,
                incremental: inc,
                ..proto.clone()
            })
            .collect();
        m
    }

    fn blocks(t: Option<&Take>) -> Vec<u32> {
        match t {
            Some(Take::Blocks(s)) => s.iter().collect(),
            Some(Take::All) => vec![u32::MAX],
            None => vec![],
        }
    }

    #[test]
    fn newest_copy_wins_and_limits_stop_the_search() {
        let full = backup("F", None, vec![("a", 10, None), ("b", 10, None), ("c", 4, None)]);
        let i1 = backup(
            "I1",
            Some("F"),
            vec![
                ("a", 10, Some(Incremental { limit_block: 10, runs: vec![(2, 2)] })),
                // b truncated to 3 then regrown to 6: blocks 3..6 stored here.
                ("b", 6, Some(Incremental { limit_block: 3, runs: vec![(0, 1), (3, 3)] })),
                ("c", 4, None),
            ],
        );
        let i2 = backup(
            "I2",
            Some("I1"),
            vec![
                ("a", 12, Some(Incremental { limit_block: 12, runs: vec![(3, 1), (11, 1)] })),
                ("b", 8, Some(Incremental { limit_block: 8, runs: vec![(7, 1)] })),
                ("c", 4, Some(Incremental { limit_block: 4, runs: vec![] })),
            ],
        );
        let Resolution { take: plan, zeros } = resolve(&[full, i1, i2]);
        // a: 3 and 11 from I2, 2 from I1, the rest of 0..10 from F, 10 is zeros (F's copy is shorter).
        assert_eq!(blocks(plan[2].get(&0)), vec![3, 11]);
        assert_eq!(blocks(plan[1].get(&0)), vec![2]);
        assert_eq!(blocks(plan[0].get(&0)), vec![0, 1, 4, 5, 6, 7, 8, 9]);
        // b: 7 from I2; 0, 3, 4, 5 from I1; 1, 2 from F; 6 is zeros (I1's copy has 6 blocks).
        assert_eq!(blocks(plan[2].get(&1)), vec![7]);
        assert_eq!(blocks(plan[1].get(&1)), vec![0, 3, 4, 5]);
        assert_eq!(blocks(plan[0].get(&1)), vec![1, 2]);
        // c: whole in I1, nothing changed since.
        assert_eq!(blocks(plan[1].get(&2)), vec![0, 1, 2, 3]);
        assert!(!plan[0].contains_key(&2));
        // Zeros: a's block 10 and b's block 6, nothing of c.
        let z: Vec<(u32, Vec<u32>)> = zeros.iter().map(|(f, s)| (*f, s.iter().collect())).collect();
        assert_eq!(z, vec![(0, vec![10]), (1, vec![6])]);
    }
}
