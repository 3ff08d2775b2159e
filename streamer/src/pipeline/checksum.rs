//! PostgreSQL's data page checksum (`storage/checksum_impl.h`), and the rules
//! pg_basebackup checks pages by.
//!
//! The page is read as 32 parallel lanes of 32-bit words, each mixed with an
//! FNV-1a-like step from its own starting offset, then two rounds of zeros;
//! the lanes are XOR-folded, the (absolute) block number is XORed in, and the
//! result is reduced to 1..=65535. `pd_checksum` counts as zero while the sum
//! is computed.

/// PostgreSQL's default block size; the algorithm works on any page whose
/// size is a multiple of 128 bytes (1 kB to 32 kB pages are).
pub const BLCKSZ: usize = 8192;
const N_SUMS: usize = 32;
const FNV_PRIME: u32 = 16_777_619;

const BASE_OFFSETS: [u32; N_SUMS] = [
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2, 0x83E13D2C, 0xF8D4474F,
    0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C, 0xF718902A, 0x0B1C9CDB, 0xE58F764B, 0x187636BC,
    0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979, 0xCCA6C0B2, 0x304A0979, 0x85AA43D4, 0x783125BB, 0x6CA8EAA2, 0xE407EAC6,
    0x4B5CFC3E, 0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
];

#[inline(always)]
fn comp(sum: u32, value: u32) -> u32 {
    let tmp = sum ^ value;
    tmp.wrapping_mul(FNV_PRIME) ^ (tmp >> 17)
}

/// The checksum PostgreSQL stores in `pd_checksum` for `page` (one block of
/// the cluster's block size) at absolute block `blkno`.
pub fn page_checksum(page: &[u8], blkno: u32) -> u16 {
    let mut sums = BASE_OFFSETS;
    for (row, chunk) in page.chunks_exact(4 * N_SUMS).enumerate() {
        for (j, sum) in sums.iter_mut().enumerate() {
            let at = 4 * j;
            let mut v = u32::from_ne_bytes(chunk[at..at + 4].try_into().unwrap());
            // pd_checksum (bytes 8..10 of the page) counts as zero.
            if row == 0 && j == 2 {
                v &= if cfg!(target_endian = "little") { 0xFFFF_0000 } else { 0x0000_FFFF };
            }
            *sum = comp(*sum, v);
        }
    }
    for _ in 0..2 {
        for sum in sums.iter_mut() {
            *sum = comp(*sum, 0);
        }
    }
    let folded = sums.iter().fold(0u32, |acc, s| acc ^ s) ^ blkno;
    ((folded % 65535) + 1) as u16
}

/// The fields of a page header the checks need.
pub struct PageHeader {
    pub lsn: u64,
    pub checksum: u16,
    pub upper: u16,
}

pub fn header(page: &[u8]) -> PageHeader {
    let hi = u32::from_ne_bytes(page[0..4].try_into().unwrap()) as u64;
    let lo = u32::from_ne_bytes(page[4..8].try_into().unwrap()) as u64;
    PageHeader {
        lsn: hi << 32 | lo,
        checksum: u16::from_ne_bytes(page[8..10].try_into().unwrap()),
        upper: u16::from_ne_bytes(page[14..16].try_into().unwrap()),
    }
}

/// pg_basebackup's rule: a page is checked unless it is new (never
/// initialized: `pd_upper` 0) or was changed at or after the backup's start
/// LSN (it may be torn; WAL replay rewrites it).
pub fn worth_checking(page: &[u8], start_lsn: u64) -> bool {
    let h = header(page);
    h.upper != 0 && h.lsn < start_lsn
}

/// The segment number of a file that carries page checksums (a relation
/// segment file of any fork; not pg_control, pg_filenode.map,
/// pg_internal.init or PG_VERSION), or None.
pub fn segment_of_checksummed_file(path: &str) -> Option<u32> {
    crate::pgdata::relation_file(path).map(|(_, segno)| segno)
}

pub fn is_checksummed_file(path: &str) -> bool {
    segment_of_checksummed_file(path).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page as PostgreSQL lays it out, with its checksum filled in.
    fn page_with_checksum(seed: u32, blkno: u32) -> [u8; BLCKSZ] {
        let mut p = [0u8; BLCKSZ];
        let mut x = seed;
        for b in p.iter_mut() {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            *b = (x >> 24) as u8;
        }
        p[14..16].copy_from_slice(&1000u16.to_ne_bytes());
        let c = page_checksum(&p, blkno);
        p[8..10].copy_from_slice(&c.to_ne_bytes());
        p
    }

    #[test]
    fn stored_checksum_does_not_change_the_sum_and_blocks_differ() {
        let p = page_with_checksum(7, 3);
        let stored = header(&p).checksum;
        assert_eq!(page_checksum(&p, 3), stored, "pd_checksum must count as zero");
        assert_ne!(page_checksum(&p, 4), stored, "the block number is part of the sum");
        let mut q = p;
        q[5000] ^= 1;
        assert_ne!(page_checksum(&q, 3), stored, "one flipped bit changes the sum");
        assert!((1..=65535).contains(&stored));
    }

    #[test]
    fn which_pages_and_files_are_checked() {
        let p = page_with_checksum(1, 0);
        assert!(worth_checking(&p, u64::MAX));
        assert!(!worth_checking(&[0u8; BLCKSZ], u64::MAX), "new pages are skipped");
        assert!(!worth_checking(&p, 0), "pages changed after the start are skipped");
        for yes in
            ["base/5/16384", "base/5/16384.1", "base/5/16384_vm", "global/1262", "pg_tblspc/1/PG_15_2/5/16400_fsm"]
        {
            assert!(is_checksummed_file(yes), "{yes}");
        }
        assert_eq!(segment_of_checksummed_file("base/5/16384_vm.2"), Some(2));
        assert_eq!(segment_of_checksummed_file("base/5/16384"), Some(0));
        for no in [
            "global/pg_control",
            "base/5/pg_filenode.map",
            "base/5/PG_VERSION",
            "base/5/pg_internal.init",
            "pg_xact/0000",
            "base/5/16384_x",
        ] {
            assert!(!is_checksummed_file(no), "{no}");
        }
    }
}
