//! SHA-256 digests: hex form, a hashing writer, and the file digest.
//!
//! A file's digest is a two-level SHA-256: the file is cut into pieces of
//! `piece_size` bytes (the last one shorter), each piece is hashed, and the
//! file digest is the SHA-256 of the concatenated piece digests. Pieces are
//! what the parallel copy hands out, so every thread hashes what it reads and
//! nobody reads a file twice; the manifest records `piece_size`.

use std::io::{self, Write};

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

/// The digest of a file from the digests of its pieces, in order.
pub fn file_digest(pieces: &[Digest]) -> Digest {
    let mut h = Sha256::new();
    for p in pieces {
        h.update(p);
    }
    h.finalize().into()
}

/// A writer that hashes and counts what passes through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter { inner, hasher: Sha256::new(), written: 0 }
    }

    /// Digest and byte count of everything written since the last call; starts over.
    pub fn take_digest(&mut self) -> (Digest, u64) {
        let d = std::mem::take(&mut self.hasher).finalize().into();
        (d, std::mem::take(&mut self.written))
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digest_and_writer_agree() {
        let d = sha256(b"abc");
        assert_eq!(to_hex(&d), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        let mut w = HashingWriter::new(Vec::new());
        w.write_all(b"a").unwrap();
        w.write_all(b"bc").unwrap();
        assert_eq!(w.take_digest(), (d, 3));
        assert_eq!(w.get_ref(), b"abc");
        assert_ne!(file_digest(&[d]), file_digest(&[d, d]));
    }
}
