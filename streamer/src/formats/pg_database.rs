//! The database names and OIDs a backup holds, read from its own copy of
//! the `pg_database` catalog: `global/pg_filenode.map` names the file of the
//! mapped relation `pg_database` (OID 1262), and that file's heap pages hold
//! one tuple per database whose first two columns are `oid` and `datname`
//! (PostgreSQL 12 and later). What `restore --db-include` needs; nothing
//! else reads catalogs.
//!
//! Every offset and length comes from the bytes and is bounded by the page
//! before it is used; a page that is not a heap page of the expected shape
//! is an error naming the block.

use super::{u16_at, u32_at};
use crate::error::{Error, Result};

/// The relation map of shared catalogs.
pub const FILENODE_MAP: &str = "global/pg_filenode.map";
/// `pg_database`'s OID (its file has this number unless it was rewritten).
pub const PG_DATABASE_OID: u32 = 1262;
const RELMAPPER_FILEMAGIC: u32 = 0x0059_2717;
/// Mappings a relation map holds at most (PostgreSQL's MAX_MAPPINGS).
const MAX_MAPPINGS: u32 = 64;
/// The largest `pg_database` file read: far more than any cluster's.
pub const MAX_CATALOG_BYTES: u64 = 64 << 20;
const NAMEDATALEN: usize = 64;
const LP_NORMAL: u32 = 1;
/// The tuple was deleted by a committed transaction (hint bit set).
const HEAP_XMAX_COMMITTED: u16 = 0x0400;
const HEAP_XMAX_INVALID: u16 = 0x0800;
const HEAP_XMAX_LOCK_ONLY: u16 = 0x0080;

/// The file number of `pg_database` in a relation map; `what` names the file in errors.
pub fn pg_database_filenode(map: &[u8], what: &str) -> Result<u32> {
    if map.len() < 8 || u32_at(map, 0) != RELMAPPER_FILEMAGIC {
        return Err(Error::Corrupt(format!("{what} is not a relation map (magic or size is wrong)")));
    }
    let n = u32_at(map, 4);
    if n > MAX_MAPPINGS || map.len() < 8 + n as usize * 8 {
        return Err(Error::Corrupt(format!("{what} claims {n} mappings in {} bytes", map.len())));
    }
    (0..n as usize)
        .map(|i| (u32_at(map, 8 + i * 8), u32_at(map, 12 + i * 8)))
        .find(|&(oid, _)| oid == PG_DATABASE_OID)
        .map(|(_, node)| node)
        .ok_or_else(|| Error::Corrupt(format!("{what} does not map pg_database ({PG_DATABASE_OID})")))
}

/// (name, OID) of every live tuple of a `pg_database` heap file. A tuple
/// whose deletion is known committed is skipped; one whose deleter is not
/// known (no hint bit) is kept: a renamed database may then appear under
/// both names with one OID, which is harmless for choosing files.
pub fn databases(heap: &[u8], block_size: usize, what: &str) -> Result<Vec<(String, u32)>> {
    if block_size < 1024 || !heap.len().is_multiple_of(block_size) {
        return Err(Error::Corrupt(format!("{what}: {} bytes is not a whole number of pages", heap.len())));
    }
    let mut out = Vec::new();
    for (blk, page) in heap.chunks_exact(block_size).enumerate() {
        if page.iter().all(|&b| b == 0) {
            continue;
        }
        let bad = |why: &str| Error::Corrupt(format!("{what} block {blk}: {why}"));
        let (lower, upper) = (u16_at(page, 12) as usize, u16_at(page, 14) as usize);
        if lower < 24 || lower > upper || upper > block_size {
            return Err(bad(&format!("page header bounds {lower}..{upper} are not a heap page's")));
        }
        for lp in (24..lower - lower % 4).step_by(4) {
            let word = u32_at(page, lp);
            let (off, flags, len) = ((word & 0x7fff) as usize, (word >> 15) & 3, (word >> 17) as usize);
            if flags != LP_NORMAL {
                continue;
            }
            if off < upper || off + len > block_size || len < 24 {
                return Err(bad(&format!("line pointer at {lp} points outside the tuple space ({off}, {len} bytes)")));
            }
            let tup = &page[off..off + len];
            let infomask = u16_at(tup, 20);
            if infomask & HEAP_XMAX_COMMITTED != 0 && infomask & (HEAP_XMAX_INVALID | HEAP_XMAX_LOCK_ONLY) == 0 {
                continue;
            }
            let hoff = tup[22] as usize;
            if hoff < 23 || hoff + 4 + NAMEDATALEN > len {
                return Err(bad(&format!("tuple at {off} has a header of {hoff} bytes in {len}")));
            }
            let oid = u32_at(tup, hoff);
            let name = &tup[hoff + 4..hoff + 4 + NAMEDATALEN];
            let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(NAMEDATALEN)];
            let name = String::from_utf8_lossy(name).into_owned();
            if !out.contains(&(name.clone(), oid)) {
                out.push((name, oid));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A heap page with the given (oid, name, infomask) tuples.
    fn page(tuples: &[(u32, &str, u16)]) -> Vec<u8> {
        let mut p = vec![0u8; 8192];
        let mut upper = 8192;
        for (i, &(oid, name, infomask)) in tuples.iter().enumerate() {
            let len = 24 + 4 + 64 + 40;
            upper -= len;
            let t = &mut p[upper..upper + len];
            t[20..22].copy_from_slice(&infomask.to_le_bytes());
            t[22] = 24;
            t[24..28].copy_from_slice(&oid.to_le_bytes());
            t[28..28 + name.len()].copy_from_slice(name.as_bytes());
            let lp = (upper as u32) | (LP_NORMAL << 15) | ((len as u32) << 17);
            p[24 + i * 4..28 + i * 4].copy_from_slice(&lp.to_le_bytes());
        }
        let lower = 24 + tuples.len() * 4;
        p[12..14].copy_from_slice(&(lower as u16).to_le_bytes());
        p[14..16].copy_from_slice(&(upper as u16).to_le_bytes());
        p
    }

    #[test]
    fn reads_names_and_skips_committed_deletions() {
        let mut heap =
            page(&[(5, "postgres", 0), (16384, "shop", HEAP_XMAX_INVALID), (16385, "gone", HEAP_XMAX_COMMITTED)]);
        heap.extend(vec![0u8; 8192]);
        let dbs = databases(&heap, 8192, "pg_database").unwrap();
        assert_eq!(dbs, vec![("postgres".to_string(), 5), ("shop".to_string(), 16384)]);
    }

    #[test]
    fn bounds_every_offset() {
        let mut p = page(&[(5, "postgres", 0)]);
        // A line pointer past the page.
        let lp = 8190u32 | (LP_NORMAL << 15) | (100 << 17);
        p[24..28].copy_from_slice(&lp.to_le_bytes());
        assert!(databases(&p, 8192, "x").unwrap_err().to_string().contains("x block 0: line pointer"));
        let mut p = page(&[(5, "postgres", 0)]);
        p[12..14].copy_from_slice(&9000u16.to_le_bytes());
        assert!(databases(&p, 8192, "x").is_err());
        assert!(databases(&[1u8; 100], 8192, "x").is_err());
        // Tuple header longer than the tuple.
        let mut p = page(&[(5, "postgres", 0)]);
        let upper = u16_at(&p, 14) as usize;
        p[upper + 22] = 200;
        assert!(databases(&p, 8192, "x").is_err());
    }

    #[test]
    fn finds_pg_database_in_the_map() {
        let mut map = vec![0u8; 524];
        map[0..4].copy_from_slice(&RELMAPPER_FILEMAGIC.to_le_bytes());
        map[4..8].copy_from_slice(&2u32.to_le_bytes());
        map[8..16].copy_from_slice(&[0xbd, 4, 0, 0, 0xbd, 4, 0, 0]);
        map[16..20].copy_from_slice(&PG_DATABASE_OID.to_le_bytes());
        map[20..24].copy_from_slice(&16999u32.to_le_bytes());
        assert_eq!(pg_database_filenode(&map, "map").unwrap(), 16999);
        map[4..8].copy_from_slice(&1000u32.to_le_bytes());
        assert!(pg_database_filenode(&map, "map").unwrap_err().to_string().contains("claims 1000 mappings"));
        assert!(pg_database_filenode(b"short", "map").is_err());
    }
}
