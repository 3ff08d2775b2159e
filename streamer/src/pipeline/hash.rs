//! SHA-256 digests: hex form, a hashing writer, and the file digest.
//!
//! A file's digest is a two-level SHA-256: the file is cut into pieces of
//! `piece_size` bytes (the last one shorter), each piece is hashed, and the
//! file digest is the SHA-256 of the concatenated piece digests. Pieces are
//! what the parallel copy hands out, so every thread hashes what it reads and
//! nobody reads a file twice; the manifest records `piece_size`.

use sha2::{Digest as _, Sha256};

pub type Digest = [u8; 32];

pub fn sha256(data: &[u8]) -> Digest {
    Sha256::digest(data).into()
}

pub fn to_hex(d: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(d.len() * 2);
    for b in d {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

/// The bytes of a hex string of at most `max` bytes; None for anything
/// else. Byte-wise: a string from disk may hold anything, not only ASCII.
pub fn from_hex(s: &str, max: usize) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 2 * max {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    s.as_bytes().chunks(2).map(|p| Some(digit(p[0])? << 4 | digit(p[1])?)).collect()
}

/// The digest of a file from the digests of its pieces, in order.
pub fn file_digest(pieces: &[Digest]) -> Digest {
    let mut h = Sha256::new();
    for p in pieces {
        h.update(p);
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digest() {
        let d = sha256(b"abc");
        assert_eq!(to_hex(&d), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_ne!(file_digest(&[d]), file_digest(&[d, d]));
    }
}
