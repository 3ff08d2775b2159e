//! Encryption at rest: AES-256-GCM (RustCrypto's `aes-gcm`, AES-NI and
//! CLMUL where the CPU has them), keys derived with HKDF-SHA256, the key
//! encryption key from a passphrase with Argon2id or from a raw key file.
//! Nothing here implements a primitive; it only decides what is sealed
//! under which key, nonce and associated data.
//!
//! Keys:
//! - the **repository key** (32 random bytes) is created with the first
//!   encrypted backup and stored only wrapped (sealed) by the key
//!   encryption key in `keys.json`; `blockstream key rotate` rewraps it
//!   under a new passphrase or key file without touching data;
//! - the **key encryption key** is Argon2id(passphrase, salt) with the
//!   parameters stored next to the wrapped key, or the 32 bytes of a key
//!   file;
//! - every use gets its own subkey, HKDF-SHA256(repository key, purpose):
//!   one per backup for its chunks, one for manifests.
//!
//! Sealed bytes are `nonce (12, random) || ciphertext || tag (16)`. The
//! associated data binds each sealed thing to its place: a chunk to its
//! stream and index (its backup through the subkey), a manifest to its
//! backup id; a chunk moved, swapped or replayed elsewhere fails its tag.
//! Random 96-bit nonces stay far below the 2^32 messages per key NIST
//! allows for them: the chunk key changes with every backup.

use std::path::Path;

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::hash::to_hex;

/// The object holding the wrapped repository key.
pub const KEYS_FILE: &str = "keys.json";
pub const CIPHER: &str = "aes-256-gcm";
const KEYS_FORMAT: &str = "blockstream-keys";
const NONCE: usize = 12;
const TAG: usize = 16;
/// Bytes sealing adds.
pub const OVERHEAD: usize = NONCE + TAG;
/// What marks a sealed whole object (a manifest).
pub const SEALED_MAGIC: &[u8; 8] = b"BSSEAL1\n";

/// Argon2id parameters for new passphrases: 64 MiB, 3 passes, 1 lane
/// (RFC 9106's second recommended option), about 0.2 s here.
const ARGON_MEMORY_KIB: u32 = 64 * 1024;
const ARGON_ITERATIONS: u32 = 3;
const ARGON_LANES: u32 = 1;

/// What an operation knows of a repository's encryption.
#[derive(Clone, Debug, Default)]
pub struct Encryption {
    /// The key, when given.
    pub key: Option<KeySource>,
    /// Use a plain repository although a key was given, or read plain
    /// manifests in an encrypted one.
    pub allow_plain: bool,
}

/// Where the key encryption key comes from.
#[derive(Clone)]
pub enum KeySource {
    Passphrase(Vec<u8>),
    /// The 32 bytes of a key file.
    Raw([u8; 32]),
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeySource::Passphrase(_) => "KeySource::Passphrase(..)",
            KeySource::Raw(_) => "KeySource::Raw(..)",
        })
    }
}

/// Reads a secret file, refusing one that others than its owner may read.
fn read_secret_file(path: &Path, what: &str, max: u64) -> Result<Vec<u8>> {
    use std::os::unix::fs::PermissionsExt;
    let md = std::fs::metadata(path).map_err(Error::io("read", path))?;
    if !md.is_file() {
        return Err(Error::Usage(format!("{what} \"{}\" is not a regular file", path.display())));
    }
    let mode = md.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::Usage(format!(
            "{what} \"{}\" has mode {mode:04o}: it must be readable by its owner only (chmod 600)",
            path.display()
        )));
    }
    if md.len() > max {
        return Err(Error::Usage(format!("{what} \"{}\" is {} bytes, more than {max}", path.display(), md.len())));
    }
    std::fs::read(path).map_err(Error::io("read", path))
}

impl KeySource {
    /// A passphrase from a file (mode 0600; one trailing newline dropped).
    pub fn passphrase_file(path: &Path) -> Result<KeySource> {
        let mut p = read_secret_file(path, "passphrase file", 4096)?;
        if p.last() == Some(&b'\n') {
            p.pop();
        }
        KeySource::passphrase(p, &format!("passphrase file \"{}\"", path.display()))
    }

    /// A passphrase given directly (`BLOCKSTREAM_PASSPHRASE`).
    pub fn passphrase(p: Vec<u8>, what: &str) -> Result<KeySource> {
        if p.is_empty() {
            return Err(Error::Usage(format!("{what} is empty")));
        }
        Ok(KeySource::Passphrase(p))
    }

    /// A raw key file: exactly 32 bytes (mode 0600).
    pub fn key_file(path: &Path) -> Result<KeySource> {
        let bytes = read_secret_file(path, "key file", 64)?;
        let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
            Error::Usage(format!(
                "key file \"{}\" holds {} bytes, expected exactly 32 (head -c 32 /dev/urandom)",
                path.display(),
                bytes.len()
            ))
        })?;
        Ok(KeySource::Raw(key))
    }
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).expect("the kernel's random source is available");
    b
}

fn from_hex(s: &str, what: &str) -> Result<Vec<u8>> {
    crate::hash::from_hex(s, 128)
        .ok_or_else(|| Error::Corrupt(format!("{what} is not a hex string of at most 128 bytes")))
}

/// Seals `plain` under `key` with `aad`: nonce || ciphertext || tag.
fn seal_with(cipher: &Aes256Gcm, aad: &[u8], plain: &[u8], out: &mut Vec<u8>) {
    let nonce = random::<NONCE>();
    out.clear();
    out.reserve(plain.len() + OVERHEAD);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plain);
    let tag = cipher
        .encrypt_in_place_detached(Nonce::from_slice(&nonce), aad, &mut out[NONCE..])
        .expect("AES-GCM seals any length a chunk can have");
    out.extend_from_slice(&tag);
}

/// Opens bytes [`seal_with`] made; false when the tag does not match.
fn open_with(cipher: &Aes256Gcm, aad: &[u8], sealed: &[u8], out: &mut Vec<u8>) -> bool {
    if sealed.len() < OVERHEAD {
        return false;
    }
    let (nonce, rest) = sealed.split_at(NONCE);
    let (body, tag) = rest.split_at(rest.len() - TAG);
    out.clear();
    out.extend_from_slice(body);
    cipher.decrypt_in_place_detached(Nonce::from_slice(nonce), aad, out, Tag::from_slice(tag)).is_ok()
}

fn cipher(key: &[u8; 32]) -> Aes256Gcm {
    Aes256Gcm::new(key.into())
}

#[derive(Serialize, Deserialize)]
struct KeysFile {
    format: String,
    version: u32,
    cipher: String,
    kek: Kek,
    /// The repository key sealed by the key encryption key, in hex.
    wrapped: String,
    changed: String,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "kebab-case")]
enum Kek {
    Passphrase { kdf: String, memory_kib: u32, iterations: u32, lanes: u32, salt: String },
    KeyFile,
}

const WRAP_AAD: &[u8] = b"blockstream repository key";

fn kek(kek: &Kek, src: &KeySource) -> Result<[u8; 32]> {
    match (kek, src) {
        (Kek::Passphrase { kdf, memory_kib, iterations, lanes, salt }, KeySource::Passphrase(p)) => {
            // Bounded before they size anything: a hostile keys.json must
            // not make us allocate gigabytes or loop for hours.
            let ok = kdf == "argon2id"
                && (8..=1 << 20).contains(memory_kib)
                && (1..=64).contains(iterations)
                && (1..=16).contains(lanes);
            if !ok {
                return Err(Error::Corrupt(format!(
                    "{KEYS_FILE} has key derivation {kdf} with {memory_kib} KiB, {iterations} passes, {lanes} lanes: \
                     expected argon2id with at most 1 GiB, 64 passes and 16 lanes"
                )));
            }
            let salt = from_hex(salt, "the salt in keys.json")?;
            if !(16..=64).contains(&salt.len()) {
                return Err(Error::Corrupt(format!("{KEYS_FILE} has a salt of {} bytes", salt.len())));
            }
            let params = argon2::Params::new(*memory_kib, *iterations, *lanes, Some(32))
                .map_err(|e| Error::Corrupt(format!("{KEYS_FILE}: argon2 parameters: {e}")))?;
            let mut out = [0u8; 32];
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
                .hash_password_into(p, &salt, &mut out)
                .map_err(|e| Error::Corrupt(format!("{KEYS_FILE}: argon2: {e}")))?;
            Ok(out)
        }
        (Kek::KeyFile, KeySource::Raw(k)) => Ok(*k),
        (Kek::Passphrase { .. }, KeySource::Raw(_)) => {
            Err(Error::Usage("the repository key is wrapped by a passphrase, and a key file was given".into()))
        }
        (Kek::KeyFile, KeySource::Passphrase(_)) => {
            Err(Error::Usage("the repository key is wrapped by a key file, and a passphrase was given".into()))
        }
    }
}

fn new_kek(src: &KeySource) -> Kek {
    match src {
        KeySource::Passphrase(_) => Kek::Passphrase {
            kdf: "argon2id".into(),
            memory_kib: ARGON_MEMORY_KIB,
            iterations: ARGON_ITERATIONS,
            lanes: ARGON_LANES,
            salt: to_hex(&random::<16>()),
        },
        KeySource::Raw(_) => Kek::KeyFile,
    }
}

/// The repository key, unwrapped.
#[derive(Clone)]
pub struct Keyring {
    key: [u8; 32],
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keyring(..)")
    }
}

impl Keyring {
    /// A new repository key and the `keys.json` that wraps it under `src`.
    pub fn create(src: &KeySource) -> Result<(Keyring, Vec<u8>)> {
        let ring = Keyring { key: random::<32>() };
        let bytes = ring.wrap(src)?;
        Ok((ring, bytes))
    }

    /// `keys.json` bytes wrapping this key under `src` (a fresh salt).
    pub fn wrap(&self, src: &KeySource) -> Result<Vec<u8>> {
        let kek_spec = new_kek(src);
        let kek_key = kek(&kek_spec, src)?;
        let mut sealed = Vec::new();
        seal_with(&cipher(&kek_key), WRAP_AAD, &self.key, &mut sealed);
        let file = KeysFile {
            format: KEYS_FORMAT.into(),
            version: 1,
            cipher: CIPHER.into(),
            kek: kek_spec,
            wrapped: to_hex(&sealed),
            changed: crate::timefmt::iso8601(std::time::SystemTime::now()),
        };
        Ok(serde_json::to_vec_pretty(&file).expect("keys serialize"))
    }

    /// Unwraps the repository key of `keys.json` with `src`; `location`
    /// names the repository in the refusal.
    pub fn open(keys_json: &[u8], src: &KeySource, location: &str) -> Result<Keyring> {
        let file: KeysFile = serde_json::from_slice(keys_json)
            .map_err(|e| Error::Corrupt(format!("{KEYS_FILE} of \"{location}\" does not parse: {e}")))?;
        if file.format != KEYS_FORMAT || file.version != 1 || file.cipher != CIPHER {
            return Err(Error::Corrupt(format!(
                "{KEYS_FILE} of \"{location}\" has format \"{}\" version {} cipher \"{}\", expected \"{KEYS_FORMAT}\" 1 \"{CIPHER}\"",
                file.format, file.version, file.cipher
            )));
        }
        let sealed = from_hex(&file.wrapped, "the wrapped key in keys.json")?;
        let kek_key = kek(&file.kek, src)?;
        let mut key = Vec::new();
        if sealed.len() != 32 + OVERHEAD || !open_with(&cipher(&kek_key), WRAP_AAD, &sealed, &mut key) {
            return Err(Error::Usage(format!("repository \"{location}\" is encrypted; the key does not open it")));
        }
        Ok(Keyring { key: key.try_into().expect("32 bytes checked") })
    }

    fn subkey(&self, purpose: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        hkdf::Hkdf::<sha2::Sha256>::new(None, &self.key)
            .expand(purpose.as_bytes(), &mut out)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        out
    }

    /// The key of backup `backup_id`'s chunks.
    pub fn chunk_key(&self, backup_id: &str) -> ChunkKey {
        ChunkKey(self.subkey(&format!("blockstream chunks {backup_id}")))
    }

    /// Seals a whole object (a manifest): magic, then nonce, ciphertext, tag;
    /// `aad` names its place.
    pub fn seal_object(&self, purpose: &str, aad: &str, plain: &[u8]) -> Vec<u8> {
        let mut sealed = Vec::new();
        seal_with(&cipher(&self.subkey(purpose)), aad.as_bytes(), plain, &mut sealed);
        let mut out = Vec::with_capacity(SEALED_MAGIC.len() + sealed.len());
        out.extend_from_slice(SEALED_MAGIC);
        out.extend_from_slice(&sealed);
        out
    }

    /// Opens [`Keyring::seal_object`]'s bytes; `what` names the object.
    pub fn open_object(&self, purpose: &str, aad: &str, bytes: &[u8], what: &str) -> Result<Vec<u8>> {
        let sealed = bytes
            .strip_prefix(SEALED_MAGIC.as_slice())
            .ok_or_else(|| Error::Corrupt(format!("\"{what}\" is not encrypted")))?;
        let mut out = Vec::new();
        if !open_with(&cipher(&self.subkey(purpose)), aad.as_bytes(), sealed, &mut out) {
            return Err(Error::Corrupt(format!(
                "\"{what}\" fails its authentication tag: it was altered, moved or sealed with another key"
            )));
        }
        Ok(out)
    }
}

/// Seals and opens archived WAL files: one key for the archive, the file's
/// name as associated data, and a keyed digest (HMAC-SHA256) of the raw
/// content in the file's header, so that the header says nothing of what
/// the file holds while a second push of the same file is still
/// recognised.
pub struct WalCipher {
    cipher: Aes256Gcm,
    mac_key: [u8; 32],
}

impl Keyring {
    pub fn wal(&self) -> WalCipher {
        WalCipher { cipher: cipher(&self.subkey("blockstream wal")), mac_key: self.subkey("blockstream wal digests") }
    }
}

impl WalCipher {
    pub fn seal(&self, name: &str, plain: &[u8], out: &mut Vec<u8>) {
        seal_with(&self.cipher, format!("wal {name}").as_bytes(), plain, out);
    }

    /// False when the tag does not match (altered, renamed, another key).
    pub fn open(&self, name: &str, sealed: &[u8], out: &mut Vec<u8>) -> bool {
        open_with(&self.cipher, format!("wal {name}").as_bytes(), sealed, out)
    }

    pub fn digest(&self, raw: &[u8]) -> [u8; 32] {
        use hmac::Mac;
        let mut m =
            <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(&self.mac_key).expect("HMAC takes any key length");
        m.update(raw);
        m.finalize().into_bytes().into()
    }
}

/// Whether bytes are a sealed object.
pub fn is_sealed(bytes: &[u8]) -> bool {
    bytes.starts_with(SEALED_MAGIC)
}

/// The key of one backup's chunks.
#[derive(Clone, Copy)]
pub struct ChunkKey([u8; 32]);

impl std::fmt::Debug for ChunkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChunkKey(..)")
    }
}

/// Seals and opens one backup's chunks (the key schedule computed once).
pub struct ChunkCipher {
    cipher: Aes256Gcm,
}

/// The associated data of a chunk: its stream and its index.
fn chunk_aad(stream: &str, chunk: u32) -> Vec<u8> {
    format!("chunk {stream} {chunk}").into_bytes()
}

impl ChunkCipher {
    pub fn new(key: &ChunkKey) -> ChunkCipher {
        ChunkCipher { cipher: cipher(&key.0) }
    }

    pub fn seal(&self, stream: &str, chunk: u32, plain: &[u8], out: &mut Vec<u8>) {
        seal_with(&self.cipher, &chunk_aad(stream, chunk), plain, out);
    }

    /// False when the tag does not match (altered, moved, another key).
    pub fn open(&self, stream: &str, chunk: u32, sealed: &[u8], out: &mut Vec<u8>) -> bool {
        open_with(&self.cipher, &chunk_aad(stream, chunk), sealed, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_open_and_refuse() {
        let pass = KeySource::Passphrase(b"correct horse".to_vec());
        let (ring, json) = Keyring::create(&pass).unwrap();
        let again = Keyring::open(&json, &pass, "r").unwrap();
        assert_eq!(ring.key, again.key);
        let err = Keyring::open(&json, &KeySource::Passphrase(b"wrong".to_vec()), "r").unwrap_err().to_string();
        assert_eq!(err, "repository \"r\" is encrypted; the key does not open it");
        assert!(Keyring::open(&json, &KeySource::Raw([1; 32]), "r").is_err());
        // Rewrapped under a key file: the same repository key; the old passphrase no longer opens it.
        let raw = KeySource::Raw([7; 32]);
        let json2 = ring.wrap(&raw).unwrap();
        assert_eq!(Keyring::open(&json2, &raw, "r").unwrap().key, ring.key);
        assert!(Keyring::open(&json2, &pass, "r").is_err());
        // A hostile cost is refused before it allocates.
        let text = String::from_utf8(json).unwrap().replace("65536", "4294967295");
        let err = Keyring::open(text.as_bytes(), &pass, "r").unwrap_err().to_string();
        assert!(err.contains("at most 1 GiB"), "{err}");
    }

    #[test]
    fn chunks_are_bound_to_their_place_and_objects_to_theirs() {
        let (ring, _) = Keyring::create(&KeySource::Raw([3; 32])).unwrap();
        let c = ChunkCipher::new(&ring.chunk_key("20261129T120000F"));
        let mut sealed = Vec::new();
        c.seal("stream-00.bsz", 4, b"records", &mut sealed);
        assert_eq!(sealed.len(), 7 + OVERHEAD);
        let mut out = Vec::new();
        assert!(c.open("stream-00.bsz", 4, &sealed, &mut out));
        assert_eq!(out, b"records");
        assert!(!c.open("stream-01.bsz", 4, &sealed, &mut out), "another stream");
        assert!(!c.open("stream-00.bsz", 5, &sealed, &mut out), "another index");
        let other = ChunkCipher::new(&ring.chunk_key("20261129T130000I"));
        assert!(!other.open("stream-00.bsz", 4, &sealed, &mut out), "another backup");
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x10;
            assert!(!c.open("stream-00.bsz", 4, &bad, &mut out), "bit flipped at {i}");
        }
        let obj = ring.seal_object("manifest", "20261129T120000F", b"{}");
        assert!(is_sealed(&obj));
        assert_eq!(ring.open_object("manifest", "20261129T120000F", &obj, "m").unwrap(), b"{}");
        assert!(ring.open_object("manifest", "20261129T130000I", &obj, "m").is_err());
    }
}
